"""``xdownscale demo`` on a user's file with a tiny model (the shipped one is tested in test_weights)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import xarray as xr
from click.testing import CliRunner

from xdownscale.cli import main
from xdownscale.demo import demo_paths


def test_demo_on_a_users_file(cm_model, fine_data, tmp_path):
    coarse = fine_data.fillna(0.0).coarsen(lat=4, lon=4).mean().isel(time=slice(0, 3)).astype("float32")
    coarse.attrs = {"units": "mm/day"}
    for c in ("lat", "lon"):
        coarse[c].attrs = dict(fine_data[c].attrs)
    path = tmp_path / "coarse.nc"
    coarse.to_dataset(name="precip").to_netcdf(path)
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        main,
        [
            "demo",
            "--input",
            str(path),
            "--variable",
            "precip",
            "--model",
            str(cm_model.path),
            "--out",
            str(out),
            "--members",
            "2",
            "--days",
            "2",
            "--scale",
            "200 km",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo.nc").exists() and (tmp_path / "demo.png").stat().st_size > 10_000
    assert "the first 2 of 3 days" in result.output
    assert "ms per field" in result.output and cm_model.name in result.output


def test_demo_errors_are_clear(cm_model, tmp_path):
    result = CliRunner().invoke(
        main, ["demo", "--input", str(tmp_path / "missing.nc"), "--model", str(cm_model.path)]
    )
    assert result.exit_code != 0 and "not found" in result.output


def _users_file(fine_data, tmp_path: Path, ntime: int = 5) -> Path:
    coarse = fine_data.fillna(0.0).coarsen(lat=4, lon=4).mean().isel(time=slice(0, ntime)).astype("float32")
    coarse.attrs = {"units": "mm/day"}
    for c in ("lat", "lon"):
        coarse[c].attrs = dict(fine_data[c].attrs)
    path = tmp_path / "coarse.nc"
    coarse.to_dataset(name="precip").to_netcdf(path)
    return path


def test_demo_writes_inside_an_existing_directory_and_says_how_many_days(cm_model, fine_data, tmp_path):
    path = _users_file(fine_data, tmp_path)
    out_dir = tmp_path / "figures"
    out_dir.mkdir()
    args = ["demo", "--input", str(path), "--model", str(cm_model.path), "--members", "2", "--days", "2"]
    result = CliRunner().invoke(main, [*args, "--scale", "200 km", "--out", str(out_dir)])
    assert result.exit_code == 0, result.output
    assert (out_dir / "xdownscale-demo.png").exists() and (out_dir / "xdownscale-demo.nc").exists()
    assert "the first 2 of 5 days" in result.output and "--days 5 for all" in result.output
    assert "mm/day" in result.output and "mean       input" in result.output


def test_demo_paths_directory_or_prefix(tmp_path):
    assert demo_paths(tmp_path) == (tmp_path / "xdownscale-demo.nc", tmp_path / "xdownscale-demo.png")
    assert demo_paths(f"{tmp_path}/new/") == (
        tmp_path / "new" / "xdownscale-demo.nc",
        tmp_path / "new" / "xdownscale-demo.png",
    )
    assert demo_paths(tmp_path / "run.v1") == (tmp_path / "run.v1.nc", tmp_path / "run.v1.png")


def test_demo_on_the_shipped_sample_warns_nothing(tmp_path, monkeypatch):
    """The shipped model on the shipped sample: no warning, the PNG in --out, not in the working dir."""
    from xdownscale.models import list_models

    if not any(m["name"] == "cm-eobs-iberia-0.25deg-pr" for m in list_models()):
        pytest.skip("shipped weights not found")
    from xdownscale.demo import run_demo

    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = run_demo(members=2, days=2)
    assert result.png == Path("xdownscale-demo") / "xdownscale-demo.png" and result.png.exists()
    assert "note" not in result.summary and "the sample's own resolution" in result.summary


def test_demo_variable_errors_name_the_variables(cm_model, fine_data, tmp_path):
    path = _users_file(fine_data, tmp_path)
    two = tmp_path / "two.nc"
    ds = xr.open_dataset(path)
    ds.assign(other=ds["precip"]).to_netcdf(two)
    runner = CliRunner()
    several = runner.invoke(main, ["demo", "--input", str(two), "--model", str(cm_model.path)])
    assert (
        several.exit_code != 0
        and "holds the variables ['other', 'precip']; pass --variable" in several.output
    )
    wrong = runner.invoke(main, ["demo", "--input", str(path), "-v", "pr", "--model", str(cm_model.path)])
    assert wrong.exit_code != 0 and "--variable 'pr' is not in" in wrong.output
