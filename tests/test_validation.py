"""Perfect-model validation of a downscaling model (the metric training keeps the best weights by)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xdownscale.datasets import synthetic_precipitation
from xdownscale.models.validation import PerfectModelValidation
from xdownscale.transforms import LogNormalize
from xdownscale.xr.spectra import psd


class _Oracle(torch.nn.Module):
    """Returns a fixed set of fields (in transformed space) whatever the input: a stand-in network."""

    def __init__(self, fields: np.ndarray) -> None:
        super().__init__()
        self.fields = torch.from_numpy(fields.astype(np.float32))[:, None]
        self.offset = 0
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        out = self.fields[self.offset : self.offset + x.shape[0]]
        self.offset = (self.offset + x.shape[0]) % self.fields.shape[0]
        return out


@pytest.fixture(scope="module")
def setup() -> tuple[PerfectModelValidation, LogNormalize, np.ndarray]:
    da = synthetic_precipitation(ny=16, nx=24, ntime=12, mask=True, seed=5)
    mask = ~np.isnan(da.values).all(axis=0)
    transform = LogNormalize().fit(da)
    target = psd(da.copy(data=transform.forward(da.values)))
    target = target.mean(target.dims[0], keep_attrs=True)
    val = PerfectModelValidation(da, transform, target, mask, factor=4, members=3, max_fields=8, seed=1)
    return val, transform, mask


def test_a_model_returning_the_truth_scores_zero(setup: tuple) -> None:
    val, transform, _ = setup
    truth = np.nan_to_num(np.asarray(transform.forward(val.truth)), nan=0.0)
    scores = val.score(_Oracle(truth))
    assert scores["crps"] == pytest.approx(0.0, abs=1e-4)
    assert scores["mae_mean"] == pytest.approx(0.0, abs=1e-4)
    assert scores["mean_ratio"] == pytest.approx(1.0, rel=1e-4)
    assert scores["bilinear_mae"] > 0.05  # the coarse-grained field does lose detail


def test_a_model_returning_the_bilinear_field_scores_its_mae(setup: tuple) -> None:
    """A deterministic ensemble's CRPS is its mean absolute error: the bar the model must beat."""
    val, transform, _ = setup
    bilinear = np.nan_to_num(np.asarray(transform.forward(val.bilinear)), nan=0.0)
    scores = val.score(_Oracle(bilinear))
    assert scores["crps"] == pytest.approx(val.bilinear_mae, rel=1e-4)
    assert scores["mae_mean"] == pytest.approx(val.bilinear_mae, rel=1e-4)


def test_crps_of_an_ensemble_matches_the_pairwise_formula(setup: tuple) -> None:
    """CRPS = E|X - y| - 0.5 E|X - X'| for the empirical ensemble, checked cell by cell."""
    val, transform, _ = setup
    rng = np.random.default_rng(0)
    n = val.inputs.shape[0]
    members = np.stack(
        [
            np.nan_to_num(np.asarray(transform.forward(val.truth)), nan=0.0)
            + rng.normal(0, 0.3, val.inputs.shape)
            for _ in range(val.members)
        ]
    )  # member-major, as score draws them
    scores = val.score(_Oracle(members.reshape(-1, *val.inputs.shape[1:])))
    # generated amounts below the training data's smallest positive value are dry, as in downscaling
    phys = np.asarray(transform.inverse(members, dry=True), dtype=np.float64)  # (M, n, h, w)
    skill = np.abs(phys - val.truth[None]).mean(axis=0)
    spread = np.abs(phys[:, None] - phys[None]).mean(axis=(0, 1))
    expected = (skill - 0.5 * spread)[val.valid].mean()
    assert n == 8 and scores["crps"] == pytest.approx(expected, rel=1e-6)
