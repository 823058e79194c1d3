"""`xdownscale train` through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from xdownscale.cli import main
from xdownscale.datasets import synthetic_precipitation
from xdownscale.models import load_model


@pytest.fixture(scope="module")
def nc(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("data")
    da = synthetic_precipitation(ny=16, nx=24, ntime=20, mask=True, units="mm", seed=5)
    paths = []
    for i, part in enumerate((da.isel(time=slice(0, 10)), da.isel(time=slice(10, 20)))):
        paths.append(root / f"pr_{i}.nc")
        part.to_dataset().to_netcdf(paths[-1])
    return paths


def _args(out: Path, *extra: str) -> list[str]:
    return [
        "--variable",
        "pr",
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--channels",
        "8,16",
        "--seed",
        "3",
        "--checkpoint-every",
        "1",
        "--device",
        "cpu",
        "-q",
        *extra,
    ]


def test_cli_train_writes_model(tmp_path: Path, nc: list[Path]) -> None:
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(
        main,
        [
            "train",
            "cm",
            *map(str, nc),
            *_args(out, "--name", "cli-model", "--val-time", "1991-12-15/1991-12-20"),
        ],
    )
    assert result.exit_code == 0, result.output
    weights = out / "cli-model.safetensors"
    assert f"Model written to {weights}" in result.output
    model = load_model(weights)
    assert model.kind == "cm" and model.variable["units"] == "mm d-1"  # "mm" on daily steps: daily totals
    assert model.card["training"]["validation_period"] == ["1991-12-15", "1991-12-20"]
    assert model.card["training"]["seed"] == 3
    assert json.loads((out / "config.json").read_text())["architecture"]["channels"] == [8, 16]
    # a second run into the same directory needs --resume; with it, the finished run is written again
    again = runner.invoke(
        main,
        [
            "train",
            "cm",
            *map(str, nc),
            *_args(out, "--name", "cli-model", "--val-time", "1991-12-15/1991-12-20"),
        ],
    )
    assert (
        again.exit_code == 1 and "already holds a training run" in again.output and "--resume" in again.output
    )
    resumed = runner.invoke(
        main,
        [
            "train",
            "cm",
            *map(str, nc),
            *_args(out, "--name", "cli-model", "--resume", "--val-time", "1991-12-15/1991-12-20"),
        ],
    )
    assert resumed.exit_code == 0, resumed.output


def test_cli_train_sde_default_name(tmp_path: Path, nc: list[Path]) -> None:
    result = CliRunner().invoke(
        main, ["train", "sde", str(nc[0].parent / "pr_*.nc"), *_args(tmp_path), "--static-inputs"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sde-pr-16x24.safetensors").is_file()
    config = load_model(tmp_path / "sde-pr-16x24.json").card["architecture"]["config"]
    assert config["static_channels"] == 3 and config["static_shape"] == [16, 24]
    assert load_model(tmp_path / "sde-pr-16x24.json").kind == "sde"


def test_cli_train_errors(tmp_path: Path, nc: list[Path]) -> None:
    runner = CliRunner()
    bad_var = runner.invoke(main, ["train", "cm", str(nc[0]), *_args(tmp_path)[2:], "--variable", "tas"])
    assert bad_var.exit_code == 1
    assert "Error: Variable 'tas' is not in the training data" in bad_var.output and "'pr'" in bad_var.output
    bad_kind = runner.invoke(main, ["train", "gan", str(nc[0]), *_args(tmp_path)])
    assert bad_kind.exit_code == 2 and "No such command 'gan'" in bad_kind.output
    bad_channels = runner.invoke(main, ["train", "cm", str(nc[0]), *_args(tmp_path), "--channels", "8,x"])
    assert bad_channels.exit_code == 2 and "comma-separated integers" in bad_channels.output
    no_data = runner.invoke(main, ["train", "cm", "--out", str(tmp_path)])
    assert no_data.exit_code == 2 and "Missing argument 'DATA...'" in no_data.output


def test_cli_help() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "train" in result.output
    result = CliRunner().invoke(main, ["train", "--help"])
    assert result.exit_code == 0 and all(kind in result.output for kind in ("cm", "sde", "slams", "sda"))
    result = CliRunner().invoke(main, ["train", "cm", "--help"])
    assert result.exit_code == 0 and "--checkpoint-every" in result.output and "--val-time" in result.output
