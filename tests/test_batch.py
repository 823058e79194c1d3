"""Batch jobs from the command line: incremental zarr writes, resume after SIGKILL, netCDF output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from click.testing import CliRunner

from xdownscale.batch import PROGRESS_ATTR, parse_period
from xdownscale.cli import main
from xdownscale.errors import InputError


@pytest.fixture(scope="module")
def coarse_file(fine_data: xr.DataArray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    coarse = fine_data.fillna(0.0).coarsen(lat=4, lon=4).mean().astype("float32") / 86400.0
    coarse.attrs = {"units": "kg m-2 s-1", "standard_name": "precipitation_flux"}
    for c in ("lat", "lon"):
        coarse[c].attrs = dict(fine_data[c].attrs)
    path = tmp_path_factory.mktemp("input") / "pr_coarse.nc"
    coarse.isel(time=slice(0, 12)).to_dataset(name="pr").to_netcdf(path)
    return path


def _args(coarse_file: Path, model: object, out: Path, *extra: str) -> list[str]:
    return [
        "downscale",
        str(coarse_file),
        "--variable",
        "pr",
        "--model",
        str(model),
        "--out",
        str(out),
        "--scale",
        "200 km",
        "--members",
        "2",
        "--seed",
        "7",
        "--block",
        "2",
        "--quiet",
        *extra,
    ]


def test_zarr_job_writes_everything_and_matches_the_python_api(cm_model, coarse_file, tmp_path):
    out = tmp_path / "out.zarr"
    result = CliRunner().invoke(main, _args(coarse_file, cm_model.path, out))
    assert result.exit_code == 0, result.output
    ds = xr.open_zarr(out)
    assert ds["pr"].dims == ("time", "member", "lat", "lon")
    assert ds["pr"].attrs["units"] == "kg m-2 s-1"
    assert sorted(zarr.open_group(str(out)).attrs[PROGRESS_ATTR]) == list(range(6))
    coarse = xr.open_dataset(coarse_file)["pr"]
    direct = coarse.downscale.cm(model=cm_model.path, scale="200 km", members=2, seed=7, progress=False)
    np.testing.assert_allclose(ds["pr"].values, direct.values, rtol=2e-6, atol=0)


def test_existing_store_needs_resume_and_the_same_job(cm_model, coarse_file, tmp_path):
    out = tmp_path / "out.zarr"
    assert CliRunner().invoke(main, _args(coarse_file, cm_model.path, out)).exit_code == 0
    again = CliRunner().invoke(main, _args(coarse_file, cm_model.path, out))
    assert again.exit_code != 0 and "--resume" in again.output
    other = CliRunner().invoke(main, _args(coarse_file, cm_model.path, out, "--seed", "8", "--resume"))
    assert other.exit_code != 0 and "different job" in other.output


def test_netcdf_output_for_small_jobs(cm_model, coarse_file, tmp_path):
    out = tmp_path / "small.nc"
    result = CliRunner().invoke(main, _args(coarse_file, cm_model.path, out))
    assert result.exit_code == 0, result.output
    ds = xr.open_dataset(out)
    assert ds["pr"].sizes["member"] == 2 and ds["pr"].sizes["time"] == 12


def test_bad_cli_input_is_a_clear_error(cm_model, coarse_file, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, _args(tmp_path / "nope.nc", cm_model.path, tmp_path / "o.zarr"))
    assert missing.exit_code != 0 and "not found" in missing.output
    wrong_var = runner.invoke(
        main,
        [
            "downscale",
            str(coarse_file),
            "--variable",
            "tas",
            "--model",
            str(cm_model.path),
            "--out",
            str(tmp_path / "o.zarr"),
        ],
    )
    assert wrong_var.exit_code != 0 and "'tas' is not in" in wrong_var.output
    bad_out = runner.invoke(main, _args(coarse_file, cm_model.path, tmp_path / "o.txt"))
    assert bad_out.exit_code != 0 and ".zarr" in bad_out.output
    with pytest.raises(InputError, match="START/END"):
        parse_period("1983")


def test_models_command_lists_models(cm_model, monkeypatch):
    monkeypatch.setenv("XDOWNSCALE_WEIGHTS", str(Path(cm_model.path).parent))
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0 and cm_model.name in result.output


def test_killed_job_resumes_to_the_same_store(cm_model, coarse_file, tmp_path):
    """SIGKILL a running job after some blocks, resume it, and compare with an uninterrupted run."""
    killed = tmp_path / "killed.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "xdownscale.cli",
        *_args(coarse_file, cm_model.path, killed, "--batch-size", "1", "--method", "cm", "--steps", "6"),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done: list[int] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = list(zarr.open_group(str(killed), mode="r").attrs.get(PROGRESS_ATTR, []))
        except Exception:
            done = []
        if len(done) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    assert 2 <= len(done) < 6

    resumed = CliRunner().invoke(
        main, [*_args(coarse_file, cm_model.path, killed, "--batch-size", "1", "--steps", "6"), "--resume"]
    )
    assert resumed.exit_code == 0, resumed.output
    uninterrupted = tmp_path / "uninterrupted.zarr"
    assert (
        CliRunner()
        .invoke(main, _args(coarse_file, cm_model.path, uninterrupted, "--batch-size", "1", "--steps", "6"))
        .exit_code
        == 0
    )
    a = xr.open_zarr(killed)["pr"].values
    b = xr.open_zarr(uninterrupted)["pr"].values
    np.testing.assert_array_equal(a, b)
    assert sorted(zarr.open_group(str(killed)).attrs[PROGRESS_ATTR]) == list(range(6))
