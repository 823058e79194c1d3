"""``xdownscale train sda|slams`` and the ``.assimilate`` accessor on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

import xdownscale
from xdownscale.cli import main
from xdownscale.datasets import synthetic_temperature


@pytest.fixture(scope="module")
def state_file(tmp_path_factory):
    state = synthetic_temperature(8, 8, 12, seed=0)
    path = tmp_path_factory.mktemp("state") / "state.nc"
    state.to_dataset(name="tas").to_netcdf(path)
    return path


def test_train_sda_from_the_cli_and_assimilate_with_the_accessor(state_file, tmp_path):
    out = tmp_path / "sda"
    result = CliRunner().invoke(
        main,
        [
            "train",
            "sda",
            "--state",
            str(state_file),
            "--out",
            str(out),
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--window",
            "3",
            "--channels",
            "8",
            "--hidden",
            "8",
            "--num-res-blocks",
            "1",
            "--checkpoint-every",
            "2",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    path = next(out.glob("*.safetensors"))
    model = xdownscale.load_model(path)
    assert model.kind == "sda"
    background = xr.open_dataset(state_file)["tas"].isel(time=slice(0, 3))
    stations = background.isel(
        lat=xr.DataArray([2, 5], dims="station"), lon=xr.DataArray([3, 6], dims="station")
    )
    stations = stations.assign_coords(station=["a", "b"])
    stations.attrs = dict(background.attrs)
    analysis = background.assimilate.sda(
        model=path, stations=stations, stations_std=0.5, members=2, steps=4, seed=0
    )
    assert analysis.dims[:2] == ("time", "member") and analysis.sizes["member"] == 2
    assert np.isfinite(analysis.values).all()
    assert analysis.attrs["units"] == background.attrs["units"]


def test_train_slams_cli_errors_are_clear(state_file, tmp_path):
    bad = tmp_path / "two.nc"
    xr.Dataset({"a": ("x", [1.0]), "b": ("x", [2.0])}).to_netcdf(bad)
    result = CliRunner().invoke(
        main,
        ["train", "slams", "--state", str(state_file), "--stations", str(bad), "--out", str(tmp_path / "o")],
    )
    assert result.exit_code != 0 and "expected one variable" in result.output
