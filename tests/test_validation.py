"""Perfect-model validation of a downscaling model (the metric training keeps the best weights by)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from xdownscale.datasets import synthetic_precipitation
from xdownscale.models.validation import PerfectModelValidation
from xdownscale.transforms import LogNormalize
from xdownscale.xr.spectra import Scale, psd, upscale


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


def _data() -> tuple[xr.DataArray, LogNormalize, xr.DataArray, np.ndarray]:
    da = synthetic_precipitation(ny=16, nx=24, ntime=12, mask=True, seed=5)
    mask = ~np.isnan(da.values).all(axis=0)
    transform = LogNormalize().fit(da)
    target = psd(da.copy(data=transform.forward(da.values)))
    return da, transform, target.mean(target.dims[0], keep_attrs=True), mask


def _build(**kwargs: bool) -> tuple[PerfectModelValidation, LogNormalize, np.ndarray]:
    da, transform, target, mask = _data()
    val = PerfectModelValidation(
        da, transform, target, mask, factor=4, members=3, max_fields=8, seed=1, **kwargs
    )
    return val, transform, mask


@pytest.fixture(scope="module")
def setup() -> tuple[PerfectModelValidation, LogNormalize, np.ndarray]:
    """The network's members as they come out (no preserve), noised at the coarse grid's Nyquist scale."""
    return _build(auto_scale=False, preserve=False)


@pytest.fixture(scope="module")
def default() -> tuple[PerfectModelValidation, LogNormalize, np.ndarray]:
    """The default: what a user's ``.downscale.cm()`` call does (scale="auto", preserve=True)."""
    return _build()


@pytest.mark.parametrize("which", ["setup", "default"])
def test_a_model_returning_the_truth_scores_zero(which: str, request: pytest.FixtureRequest) -> None:
    """Also with preserve: the truth's coarse-cell means are the coarse fields, so it comes back as it is."""
    val, transform, _ = request.getfixturevalue(which)
    truth = np.nan_to_num(np.asarray(transform.forward(val.truth)), nan=0.0)
    scores = val.score(_Oracle(truth))
    assert scores["crps"] == pytest.approx(0.0, abs=1e-4)
    assert scores["mae_mean"] == pytest.approx(0.0, abs=1e-4)
    assert scores["mean_ratio"] == pytest.approx(1.0, rel=1e-4)
    assert scores["bilinear_mae"] > 0.05  # the coarse-grained field does lose detail
    assert scores["spectral_distance"] == pytest.approx(0.0, abs=1e-6)
    assert scores["psd_factor"] == pytest.approx(1.0, abs=1e-6)


def test_a_model_returning_the_bilinear_field_scores_its_mae(setup: tuple) -> None:
    """A deterministic ensemble's CRPS is its mean absolute error: the bar the model must beat."""
    val, transform, _ = setup
    bilinear = np.nan_to_num(np.asarray(transform.forward(val.bilinear)), nan=0.0)
    scores = val.score(_Oracle(bilinear))
    assert scores["crps"] == pytest.approx(val.bilinear_mae, rel=1e-4)
    assert scores["mae_mean"] == pytest.approx(val.bilinear_mae, rel=1e-4)
    # and its spectrum, smooth below the coarse scale, is far from the truth's: the largest factor is
    # the deficit of power at the smallest scales (the log distance averages over all wavenumbers)
    assert scores["psd_factor"] > 10.0 and scores["spectral_distance"] > 1.0
    assert scores["psd_factor"] >= np.exp(scores["spectral_distance"])


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


def test_default_restores_the_coarse_cell_means(default: tuple) -> None:
    """With preserve (the default), every member's mean over the valid fine cells of a coarse cell is the
    coarse-grained value there, whatever the network returns; signs and the mask are kept."""
    val, _, mask = default
    rng = np.random.default_rng(3)
    samples = rng.normal(0.0, 1.0, (val.inputs.shape[0], val.members, *val.inputs.shape[1:]))
    phys = val.physical(samples)
    assert np.isnan(phys[..., ~mask]).all() and (phys[..., mask] >= 0).all()
    grid = _data()[0].isel(time=slice(0, phys.shape[0]))
    members = xr.DataArray(phys, dims=("time", "member", "lat", "lon"), coords=grid.coords)
    truth = grid.copy(data=val.truth)
    got = upscale(members, val.factor).transpose("member", "time", ...).values
    expected = upscale(truth, val.factor).values
    ok = np.isfinite(expected)
    assert ok.sum() > 10
    np.testing.assert_allclose(got[:, ok], np.broadcast_to(expected, got.shape)[:, ok], rtol=1e-9)


def test_default_noise_level_is_the_auto_scale(setup: tuple, default: tuple) -> None:
    """scale="auto" lies between 4 and 2 coarse cells (wavelength), the plain level at 2; a larger scale
    has a larger noise level; the card's text says which."""
    target = _data()[2]
    plain, auto = setup[0], default[0]
    assert plain.sigma == pytest.approx(Scale.from_wavenumber(0.125, psd=target).sigma, rel=1e-9)
    assert 0.0625 - 1e-9 <= auto.scale_wavenumber <= 0.125 + 1e-9
    assert auto.sigma == pytest.approx(
        Scale.from_wavenumber(auto.scale_wavenumber, psd=target).sigma, rel=1e-6
    )
    assert "preserve=True" in auto.metric and "preserve=False" in plain.metric


def test_log_spectral_distance_of_a_spectrum_to_itself_and_to_a_scaled_one() -> None:
    from xdownscale.core.spectra import log_spectral_distance

    ref = np.array([1.0, 0.5, 0.1, 0.01, np.nan])
    assert log_spectral_distance(ref, ref)[:2] == (0.0, 1.0)
    other = ref * np.array([2.0, 0.5, 1.0, 4.0, 1.0])
    distance, factor, worst = log_spectral_distance(other, ref)
    assert worst == 3 and factor == pytest.approx(4.0)
    assert distance == pytest.approx(np.sqrt(np.mean(np.log([2.0, 0.5, 1.0, 4.0]) ** 2)))
    assert np.isnan(log_spectral_distance(np.zeros(3), ref[:3])[0])
