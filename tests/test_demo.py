"""``xdownscale demo`` on a user's file with a tiny model (the shipped one is tested in test_weights)."""

from __future__ import annotations

from click.testing import CliRunner

from xdownscale.cli import main


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
    assert "ms per field" in result.output and cm_model.name in result.output


def test_demo_errors_are_clear(cm_model, tmp_path):
    result = CliRunner().invoke(
        main, ["demo", "--input", str(tmp_path / "missing.nc"), "--model", str(cm_model.path)]
    )
    assert result.exit_code != 0 and "not found" in result.output
