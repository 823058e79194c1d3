"""Temperature end to end: a tas model trained on degC fields downscales K and degC inputs, with additive
QDM, no clipping at zero, and the input's large scales kept by the low-pass rule."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import xdownscale
from xdownscale.datasets import coarsen_like_esm, synthetic_temperature
from xdownscale.errors import InputError, UnitError

RUN = {"scale": "200 km", "seed": 0, "progress": False}


@pytest.fixture(scope="module")
def tas_fine() -> xr.DataArray:
    """Winter-like temperatures around 0 degC (negative values must survive), sea masked, in degC."""
    tas = synthetic_temperature(ny=16, nx=24, ntime=40, seed=1, mask=True, units="K")
    celsius = (tas - 278.0).assign_attrs(units="degC")  # centred near 0 degC
    celsius.name = "tas"
    return celsius


@pytest.fixture(scope="module")
def tas_model(tas_fine: xr.DataArray, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    path = xdownscale.train(
        kind="cm",
        data=tas_fine,
        variable="tas",
        out=tmp_path_factory.mktemp("tas-model"),
        name="tiny-tas",
        steps=20,
        batch_size=8,
        channels=(8, 16),
        checkpoint_every=None,
        progress=False,
        val_fraction=0.1,
    )
    return xdownscale.load_model(path)


def _coarse(fine: xr.DataArray) -> xr.DataArray:
    return coarsen_like_esm(fine.fillna(float(fine.mean())), factor=4)


def test_a_tas_model_standardises_and_keeps_kelvin(tas_model):
    assert tas_model.variable["kind"] == "temperature" and tas_model.variable["units"] == "K"
    assert tas_model.transform.log is False


def test_kelvin_and_celsius_inputs_give_the_same_field_in_their_own_units(tas_model, tas_fine):
    celsius = _coarse(tas_fine)
    kelvin = (celsius + 273.15).assign_attrs(units="K")
    out_c = celsius.downscale.cm(model=tas_model, **RUN)
    out_k = kelvin.downscale.cm(model=tas_model, **RUN)
    assert out_c.attrs["units"] == "degC" and out_k.attrs["units"] == "K"
    np.testing.assert_allclose(out_k.values - 273.15, out_c.values, atol=2e-3)
    mask = tas_model.grid["mask"].values
    assert (out_c.values[:, mask] < 0).any(), "negative degC values must not be clipped"
    assert out_c.attrs["downscale_preserve"] == "lowpass"


def test_preserve_keeps_the_inputs_large_scales(tas_model, tas_fine):
    coarse = _coarse(tas_fine)
    kept = xdownscale.convert_units(coarse.downscale.cm(model=tas_model, **RUN), "K")
    free = xdownscale.convert_units(coarse.downscale.cm(model=tas_model, preserve=False, **RUN), "K")
    bilinear = coarse.downscale.prepare(model=tas_model, transform=False)  # in the model's units, K
    assert bilinear.attrs["units"] == "K"
    mask = xr.DataArray(tas_model.grid["mask"].values, dims=("lat", "lon"))

    def mean_error(field: xr.DataArray) -> float:
        block = (field - bilinear).where(mask).mean(("lat", "lon"))  # domain mean, per day
        return float(np.abs(block).mean())

    assert mean_error(kept) <= mean_error(free) + 1e-6
    assert mean_error(kept) < 0.05  # K: the domain mean follows the input


def test_additive_qdm_removes_a_warm_bias(tas_model, tas_fine):
    coarse = _coarse(tas_fine)
    warm = (coarse + 3.0).assign_attrs(units="degC")  # a model 3 K too warm everywhere
    corrected = warm.downscale.prepare(model=tas_model, transform=False, qdm=True)
    raw = warm.downscale.prepare(model=tas_model, transform=False)
    truth = coarse.downscale.prepare(model=tas_model, transform=False)
    assert float((raw - truth).mean()) == pytest.approx(3.0, abs=0.05)
    assert abs(float((corrected - truth).mean())) < 1.0
    for rule in ("mean", "smooth-mean"):
        with pytest.raises(InputError, match=rf"preserve='{rule}' scales the output multiplicatively"):
            warm.downscale.cm(model=tas_model, preserve=rule, **RUN)


def test_precipitation_units_into_a_tas_model_are_refused(tas_model, tas_fine):
    pr = _coarse(tas_fine).assign_attrs(units="mm/day")
    with pytest.raises(UnitError):
        pr.downscale.cm(model=tas_model, **RUN)
