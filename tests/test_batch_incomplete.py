"""The command line as a user meets it: a half-written store says so, the job prints what it chose once,
and the tool does not warn about its own chunking."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from xdownscale.batch import COMPLETE_ATTR, STATUS_ATTR, check_complete, open_input
from xdownscale.cli import main
from xdownscale.errors import InputError, PerformanceWarning


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
        "-v",
        "pr",
        "-m",
        str(model),
        "--out",
        str(out),
        "--scale",
        "200 km",
        "--block",
        "2",
        "--quiet",
        *extra,
    ]


def test_a_half_written_store_says_so_and_resume_finishes_it(cm_model, coarse_file, tmp_path, monkeypatch):
    out = tmp_path / "job.zarr"
    real_to_zarr = xr.Dataset.to_zarr
    writes = {"n": 0}

    def killed_after_one_block(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("region") is not None:
            writes["n"] += 1
            if writes["n"] > 1:
                raise KeyboardInterrupt  # the job is stopped while writing its second block
        return real_to_zarr(self, *args, **kwargs)

    monkeypatch.setattr(xr.Dataset, "to_zarr", killed_after_one_block)
    stopped = CliRunner().invoke(main, _args(coarse_file, cm_model.path, out))
    assert stopped.exit_code != 0
    monkeypatch.setattr(xr.Dataset, "to_zarr", real_to_zarr)

    opened = xr.open_zarr(out)
    assert opened.attrs[COMPLETE_ATTR] is False
    assert opened.attrs[STATUS_ATTR].startswith("INCOMPLETE: 1 of 6 blocks written")
    assert "--resume" in opened.attrs[STATUS_ATTR]
    with pytest.raises(InputError, match=r"job\.zarr is an incomplete xdownscale output: .*--resume"):
        check_complete(out)
    with pytest.raises(InputError, match="incomplete xdownscale output"):
        open_input([out], "pr")
    demo = CliRunner().invoke(main, ["demo", "--input", str(out), "--model", str(cm_model.path)])
    assert demo.exit_code != 0 and "--resume" in demo.output

    resumed = CliRunner().invoke(main, [*_args(coarse_file, cm_model.path, out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    done = xr.open_zarr(out)
    assert done.attrs[COMPLETE_ATTR] is True and done.attrs[STATUS_ATTR] == "complete"
    assert np.isfinite(done["pr"].values[:, cm_model.grid["mask"].values]).all()
    check_complete(out)


def test_the_job_prints_model_scale_and_qdm_once_and_no_chunking_warnings(cm_model, coarse_file, tmp_path):
    out = tmp_path / "qdm.zarr"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(main, _args(coarse_file, cm_model.path, out, "--qdm-hist", "1991/1992"))
    assert result.exit_code == 0, result.output
    assert not [w for w in caught if issubclass(w.category, PerformanceWarning)], [
        str(w.message) for w in caught
    ]
    lines = result.output.splitlines()
    assert sum(line.startswith("model ") for line in lines) == 1 and cm_model.name in result.output
    assert sum(line.startswith("scale ") for line in lines) == 1 and "km" in result.output
    assert "QDM      fitted on 1991/1992" in result.output
    assert f"written  'pr' to {out} (complete)" in result.output


def test_open_input_chunks_fields_whole_and_time_by_block(coarse_file):
    da = open_input([coarse_file], "pr", chunks=5)
    assert da.chunks is not None
    assert da.chunks[0] == (5, 5, 2) and len(da.chunks[1]) == 1 and len(da.chunks[2]) == 1


def test_partial_coverage_is_an_error_unless_allowed(cm_model, coarse_file, tmp_path):
    part = tmp_path / "part.nc"
    xr.open_dataset(coarse_file).isel(lon=slice(0, 3)).to_netcdf(part)
    refused = CliRunner().invoke(main, _args(part, cm_model.path, tmp_path / "a.nc"))
    assert refused.exit_code != 0 and "On the command line: --allow-partial" in refused.output
    allowed = CliRunner().invoke(main, [*_args(part, cm_model.path, tmp_path / "b.nc"), "--allow-partial"])
    assert allowed.exit_code == 0, allowed.output
    assert "note" in allowed.output and "of the model's cells lie outside the input" in allowed.output


@pytest.mark.timeout(30)  # the bug this pins looped forever, recording its own re-emitted warnings
def test_job_notes_collect_our_warnings_and_pass_others_through_once():
    from xdownscale.cli import _notes
    from xdownscale.errors import XDownscaleWarning

    with warnings.catch_warnings(record=True) as outer:
        warnings.simplefilter("always")
        with _notes() as notes:
            warnings.warn("from another library", UserWarning, stacklevel=1)
            warnings.warn("ours", XDownscaleWarning, stacklevel=1)
            warnings.warn("ours", XDownscaleWarning, stacklevel=1)
    assert notes == ["ours"]
    assert [str(w.message) for w in outer] == ["from another library"]
