"""The shipped Iberia assimilation pair (SLAMS and SDA): both load by name with their sha256 verified,
their cards say what they are and how good they are, and a tiny analysis on a synthetic background on
the model grid with two stations runs (no real data needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import xdownscale
from xdownscale.assimilate import sda, slams

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
SHIPPED = {"slams": "slams-eobs-iberia-0.25deg-pr", "sda": "sda-eobs-iberia-0.25deg-pr"}


@pytest.mark.parametrize("kind", sorted(SHIPPED))
def test_shipped_assimilation_model_loads_by_name_with_its_sha256(kind):
    name = SHIPPED[kind]
    model = xdownscale.load_model(name)
    card = json.loads((WEIGHTS / f"{name}.json").read_text())
    assert model.kind == kind and model.name == name
    assert model.sha256 == card["sha256"]
    assert model.shape == (41, 61)
    assert (model.autoencoder is not None) == (kind == "slams")
    assert model.variable["units"] == "mm d-1"
    assert "non-commercial" in card["training"]["licence"]
    assert card["intended_use"]
    assert any("satellite" in item and "E-OBS" in item for item in card["limitations"])
    skill = card["metrics"]["skill"]
    for row in ("background", kind):
        assert np.isfinite(skill[row]["rmse_withheld_stations_mm_per_day"])


def test_shipped_assimilation_models_are_small():
    total = sum((WEIGHTS / f"{name}.safetensors").stat().st_size for name in SHIPPED.values())
    assert total < 20 * 2**20


@pytest.mark.filterwarnings("ignore:steps=")
@pytest.mark.parametrize("kind", sorted(SHIPPED))
def test_tiny_analysis_on_the_model_grid(kind):
    model = xdownscale.load_model(SHIPPED[kind])
    grid = model.grid
    lat, lon = grid["lat"].values, grid["lon"].values
    rng = np.random.default_rng(0)
    times = np.arange("1998-01-01", "1998-01-04", dtype="datetime64[D]").astype("datetime64[ns]")
    values = rng.gamma(0.5, 4.0, (times.size, lat.size, lon.size)).astype(np.float32)
    values = np.where(model.mask[None], values, np.nan)
    background = xr.DataArray(
        values,
        dims=("time", "lat", "lon"),
        coords={"time": times, "lat": lat, "lon": lon},
        name="tp",
        attrs={"units": "mm/day", "standard_name": "lwe_precipitation_rate"},
    )
    iy, ix = np.argwhere(model.mask)[[10, -10]].T
    stations = xr.DataArray(
        np.array([[2.0, 5.0]] * times.size),
        dims=("time", "station"),
        coords={
            "time": times,
            "station": ["a", "b"],
            "lat": ("station", lat[iy]),
            "lon": ("station", lon[ix]),
        },
        name="precip",
        attrs={"units": "mm/day"},
    )
    fn = {"sda": sda, "slams": slams}[kind]
    an = fn(
        background,
        model=model,
        stations=stations,
        stations_std=1.0,
        background_std=3.0,
        members=2,
        steps=4,
        seed=0,
    )
    assert an.dims == ("time", "member", "lat", "lon")
    assert an.sizes == {"time": 3, "member": 2, "lat": 41, "lon": 61}
    assert an.attrs["units"] == "mm d-1"
    land = an.values[:, :, model.mask]
    assert np.isfinite(land).all() and (land >= 0).all()
    assert np.isnan(an.values[:, :, ~model.mask]).all()
