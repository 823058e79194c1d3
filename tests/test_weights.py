"""The shipped weights: they load with their sha256 verified, their cards say what they are, and the
README's main job (``xdownscale demo``) runs with them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import xdownscale
from xdownscale.cli import main
from xdownscale.demo import DEFAULT_MODEL, SAMPLE

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
SHIPPED = ["cm-eobs-iberia-0.25deg-pr", "sde-eobs-iberia-0.25deg-pr"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_loads_by_name_with_its_sha256(name):
    model = xdownscale.load_model(name)
    card = json.loads((WEIGHTS / f"{name}.json").read_text())
    assert model.sha256 == card["sha256"]
    assert model.grid.sizes["lat"] == 41 and model.grid.sizes["lon"] == 61
    assert model.reference_quantiles is not None and model.reference_quantiles.sizes["quantiles"] == 500
    assert "non-commercial" in card["training"]["licence"]
    assert card["intended_use"] and card["limitations"]


def test_shipped_models_are_listed_and_small():
    names = {row["name"] for row in xdownscale.list_models()}
    assert set(SHIPPED) <= names
    total = sum(p.stat().st_size for p in WEIGHTS.glob("*.safetensors"))
    assert total < 50 * 2**20


def test_demo_sample_is_an_esm_like_coarse_field():
    import xarray as xr

    pr = xr.open_dataset(SAMPLE)["pr"]
    assert pr.attrs["units"] == "kg m-2 s-1" and np.isfinite(pr.values).all()
    assert "make_demo_sample.py" in pr.attrs["comment"]


def test_readme_main_job_runs(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--days", "2", "--members", "2"])
    assert result.exit_code == 0, result.output
    assert DEFAULT_MODEL in result.output
    assert (tmp_path / "demo.png").exists() and (tmp_path / "demo.nc").exists()


def test_readme_lists_every_shipped_model() -> None:
    readme = (WEIGHTS.parent / "README.md").read_text(encoding="utf-8")
    missing = [p.stem for p in sorted(WEIGHTS.glob("*.json")) if f"`{p.stem}`" not in readme]
    assert not missing, f"README.md's model table lacks {missing}"


def test_shipped_joint_model_downscales_a_two_variable_dataset() -> None:
    import pandas as pd
    import xarray as xr

    model = xdownscale.load_model("cm-eobs-iberia-0.5deg-pr-tas")
    assert model.joint and model.variables == ["tas", "pr"] and model.shape == (19, 29)
    card = json.loads((WEIGHTS / "cm-eobs-iberia-0.5deg-pr-tas.json").read_text())
    assert card["intended_use"] and "non-commercial" in card["training"]["licence"]
    # a CMIP-like Dataset on a 1.5 deg grid, in the CMIP units: one call, both variables back
    rng = np.random.default_rng(0)
    lat, lon = np.arange(33.0, 47.0, 1.5), np.arange(-12.0, 7.0, 1.5)
    shape = (4, lat.size, lon.size)
    ds = xr.Dataset(
        {
            "pr": (("time", "lat", "lon"), rng.gamma(0.6, 3.0, shape) / 86400.0, {"units": "kg m-2 s-1"}),
            "tas": (("time", "lat", "lon"), 281.0 + rng.normal(0.0, 2.0, shape), {"units": "K"}),
        },
        coords={"time": pd.date_range("2000-01-01", periods=4), "lat": lat, "lon": lon},
    )
    fine = ds.downscale.cm(model="cm-eobs-iberia-0.5deg-pr-tas", members=2, progress=False)
    assert fine["tas"].attrs["units"] == "K" and fine["pr"].attrs["units"] == "kg m-2 s-1"
    land = model.mask
    assert np.isfinite(fine["tas"].values[..., land]).all() and (fine["pr"].values[..., land] >= 0).all()
    assert 270.0 < float(fine["tas"].mean()) < 292.0
