"""Joint models of several variables: training on two grids, the card, and ``ds.downscale.cm``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from click.testing import CliRunner

import xdownscale
from xdownscale.errors import InputError
from xdownscale.models import load_model

LAT, LON = np.linspace(40.0, 44.0, 9), np.linspace(-5.0, 1.0, 13)


def _fields(ntime: int = 48, fine: bool = False) -> tuple[xr.DataArray, xr.DataArray]:
    """Precipitation on a 0.5 deg grid (``fine``: 0.25 deg) and temperature on a 1 deg grid (``fine``:
    0.5 deg; one cell of it sea), wet days colder: the two share their daily weather."""
    rng = np.random.default_rng(0)
    t = pd.date_range("2000-01-01", periods=ntime)
    weather = rng.normal(size=(ntime, 1, 1))
    lat, lon = (np.linspace(40.0, 44.0, 17), np.linspace(-5.0, 1.0, 25)) if fine else (LAT, LON)
    pr = rng.gamma(0.6, 2.0, (ntime, lat.size, lon.size)) * np.exp(weather)
    tas = 281.0 - 2.0 * weather + rng.normal(0.0, 1.0, (ntime, lat[::2].size, lon[::2].size))
    tas[:, 0, 0] = np.nan
    coords = {"time": t, "lat": lat, "lon": lon}
    coarse = {"time": t, "lat": lat[::2], "lon": lon[::2]}
    return (
        xr.DataArray(pr, dims=("time", "lat", "lon"), coords=coords, name="pr", attrs={"units": "mm/day"}),
        xr.DataArray(tas, dims=("time", "lat", "lon"), coords=coarse, name="tas", attrs={"units": "K"}),
    )


@pytest.fixture(scope="module")
def joint(tmp_path_factory: pytest.TempPathFactory) -> xdownscale.models.Model:
    pr, tas = _fields()
    path = xdownscale.train(
        "cm",
        data=[pr, tas],
        variable=["pr", "tas"],
        out=tmp_path_factory.mktemp("joint"),
        steps=4,
        batch_size=4,
        channels=(8, 16),
        progress=False,
        checkpoint_every=None,
    )
    return load_model(path)


def _coarse(ntime: int = 6, tas_units: str = "K") -> xr.Dataset:
    rng = np.random.default_rng(1)
    lat, lon = np.linspace(39.0, 45.0, 4), np.linspace(-6.0, 2.0, 5)
    tas = 281.0 + rng.normal(0.0, 2.0, (ntime, 4, 5))
    if tas_units == "degC":
        tas = tas - 273.15
    return xr.Dataset(
        {
            "pr": (
                ("time", "lat", "lon"),
                rng.gamma(0.6, 2.0, (ntime, 4, 5)) / 86400.0,
                {"units": "kg m-2 s-1"},
            ),
            "tas": (("time", "lat", "lon"), tas, {"units": tas_units}),
        },
        coords={"time": pd.date_range("2001-01-01", periods=ntime), "lat": lat, "lon": lon},
    )


SCALES = {"pr": "sigma=0.5", "tas": "sigma=0.2"}


def test_joint_training_card_and_loading(joint: xdownscale.models.Model) -> None:
    assert joint.joint and joint.variables == ["pr", "tas"]
    config = joint.card["architecture"]["config"]
    assert config["in_channels"] == config["out_channels"] == config["noise_channels"] == 2
    # temperature came from the coarser grid, bilinearly: the grid is precipitation's; the cells next to
    # temperature's sea cell have no data in both, so the joint mask drops them
    assert joint.shape == (9, 13) and not joint.mask[0, 0] and joint.mask[4, 6]
    pr, tas = joint.for_variable("pr"), joint.for_variable("tas")
    assert pr.transform.log and not tas.transform.log
    assert pr.variable["units"] == "mm d-1" and tas.variable["kind"] == "temperature"
    assert float(tas.reference_quantiles.sel(quantiles=0.5, method="nearest").mean()) == pytest.approx(
        281.0, abs=1.0
    )
    assert float(pr.reference_quantiles.max()) < 200.0
    assert not np.allclose(pr.target_psd.values, tas.target_psd.values)
    assert "variables='pr' [mm d-1], 'tas' [K]" in repr(joint)
    with pytest.raises(InputError, match="has no variable 'rr'"):
        joint.for_variable("rr")


def test_joint_training_validates_every_variable_in_the_perfect_model(
    joint: xdownscale.models.Model,
) -> None:
    validation = joint.card["training"]["validation"]
    # the fixture holds out the last 10% of its days: each variable coarse-grained, downscaled back together
    assert set(validation["per_variable"]) == {"pr", "tas"}
    for scores in validation["per_variable"].values():
        assert scores["crps"] > 0 and scores["bilinear_mae"] > 0
    relative = np.mean([s["crps"] / s["bilinear_mae"] for s in validation["per_variable"].values()])
    assert validation["crps"] == pytest.approx(relative) and validation["bilinear_mae"] == 1.0
    assert (
        "each at its own scale (sigma pr" in validation["metric"] and "preserve=True" in validation["metric"]
    )


def test_joint_training_errors(tmp_path: Path) -> None:
    pr, tas = _fields()
    with pytest.raises(InputError, match="consistency model trained with loss='ect'"):
        xdownscale.train("sde", data=[pr, tas], variable=["pr", "tas"], out=tmp_path / "a", steps=1)
    with pytest.raises(InputError, match=r"Variable\(s\) \['rr'\] are in none"):
        xdownscale.train("cm", data=[pr, tas], variable=["pr", "rr"], out=tmp_path / "b", steps=1)
    with pytest.raises(InputError, match="may be named once"):
        xdownscale.train("cm", data=[pr, tas], variable=["pr", "pr"], out=tmp_path / "c", steps=1)
    later = tas.assign_coords(time=tas.time + pd.Timedelta(days=47))
    with pytest.raises(InputError, match="share 1 time step"):
        xdownscale.train("cm", data=[pr, later], variable=["pr", "tas"], out=tmp_path / "d", steps=1)


def test_cli_trains_a_joint_model_from_files_on_two_grids(tmp_path: Path) -> None:
    from xdownscale.cli import main

    pr, tas = _fields(fine=True)
    pr.to_netcdf(tmp_path / "pr.nc")
    tas.to_netcdf(tmp_path / "tas.nc")
    args = ["train", "cm", str(tmp_path / "pr.nc"), str(tmp_path / "tas.nc"), "--variable", "tas"]
    args += ["--variable", "pr", "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2"]
    args += ["--channels", "8,16", "--quiet", "--checkpoint-every", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    card = json.loads(next((tmp_path / "run").glob("cm-*.json")).read_text())
    # the grid of the first variable (temperature, 0.5 deg); precipitation averaged onto it
    assert card["grid"]["shape"] == [9, 13] and [v["name"] for v in card["variables"]] == ["tas", "pr"]
    assert card["variables"][1]["reference_quantiles"]["key"] == "aux.reference_quantiles.pr"


def test_dataset_downscaling_per_variable(joint: xdownscale.models.Model) -> None:
    ds = _coarse(tas_units="degC")
    out = ds.downscale.cm(model=joint, scale=SCALES, members=2, seed=3, progress=False)
    assert set(out.data_vars) == {"pr", "tas"} and out["pr"].dims == ("time", "member", "lat", "lon")
    # each variable back in its caller's units, with its own scale in its attributes
    assert out["pr"].attrs["units"] == "kg m-2 s-1" and out["tas"].attrs["units"] == "degC"
    assert (
        out["pr"].attrs["downscale_scale_sigma"] == 0.5 and out["tas"].attrs["downscale_scale_sigma"] == 0.2
    )
    assert out.attrs["downscale_model"] == joint.name
    assert float(out["pr"].min()) >= 0.0 and -5.0 < float(out["tas"].mean()) < 20.0
    assert np.array_equal(np.isnan(out["tas"].isel(time=0, member=0)), ~joint.mask)
    # members differ, the same seed repeats
    assert not np.allclose(out["tas"].isel(member=0), out["tas"].isel(member=1))
    again = ds.downscale.cm(model=joint, scale=SCALES, members=2, seed=3, progress=False)
    xr.testing.assert_equal(again["tas"], out["tas"])


def test_dataset_downscaling_is_lazy_and_chunk_invariant(joint: xdownscale.models.Model) -> None:
    ds = _coarse()
    eager = xdownscale.downscale_dataset(ds, model=joint, scale=SCALES, members=2, progress=False)
    for chunks in (1, 4):
        lazy = xdownscale.downscale_dataset(ds.chunk({"time": chunks}), model=joint, scale=SCALES, members=2)
        assert lazy["pr"].chunks is not None
        for v in ("pr", "tas"):
            np.testing.assert_allclose(lazy[v].values, eager[v].values, rtol=1e-5, atol=1e-6)


def test_at_sigma_min_the_joint_model_returns_its_input(joint: xdownscale.models.Model) -> None:
    ds = _coarse()
    out = ds.downscale.cm(model=joint, scale="sigma=0.002", preserve=False, progress=False)
    for v in ("pr", "tas"):
        expected = xdownscale.prepare(ds[v], model=joint.for_variable(v), transform=False)
        expected = xdownscale.convert_units(expected, ds[v].attrs["units"])
        np.testing.assert_allclose(
            out[v].values, expected.values, rtol=1e-4, atol=1e-6 * float(abs(expected).max())
        )


def test_a_warming_survives_and_qdm_is_per_variable(joint: xdownscale.models.Model) -> None:
    ds = _coarse(ntime=12)
    base = ds.downscale.cm(model=joint, scale=SCALES, progress=False)
    warm = ds.assign(tas=ds["tas"] + 2.0).downscale.cm(model=joint, scale=SCALES, progress=False)
    assert float((warm["tas"] - base["tas"]).mean()) == pytest.approx(2.0, abs=0.05)
    # QDM additive for temperature: a 5 K warm bias in the historical period is removed
    biased = ds.assign(tas=ds["tas"] + 5.0)
    fixed = biased.downscale.cm(model=joint, scale=SCALES, qdm=True, progress=False)
    truth = float(joint.for_variable("tas").reference_quantiles.sel(quantiles=0.5, method="nearest").mean())
    assert abs(float(fixed["tas"].mean()) - truth) < 1.5 < abs(float(biased["tas"].mean()) - truth)
    # with QDM precipitation keeps the regridded, corrected input's cell means (the default)
    assert (
        fixed["pr"].attrs["history"].endswith("preserve 'smooth-mean'")
        and "QDM" in fixed["pr"].attrs["history"]
    )


def test_variables_matched_by_kind_or_by_name(joint: xdownscale.models.Model) -> None:
    ds = _coarse().rename({"tas": "t2m", "pr": "precip"})
    out = ds.downscale.cm(model=joint, scale=SCALES, progress=False)
    assert (
        set(out.data_vars) == {"t2m", "precip"}
        and out.attrs["downscale_variables"] == "pr <- precip, tas <- t2m"
    )
    two = _coarse().assign(tmax=_coarse()["tas"] + 5.0).drop_vars("tas")
    two["tmin"] = two["tmax"] - 10.0
    with pytest.raises(InputError, match=r"needs 'tas' \(temperature\).*2 data variables of that kind"):
        two.downscale.cm(model=joint, scale=SCALES)
    out = two.downscale.cm(model=joint, variables={"tas": "tmin"}, scale=SCALES, progress=False)
    assert set(out.data_vars) == {"pr", "tmin"}
    with pytest.raises(InputError, match="the Dataset has no 'tg'"):
        two.downscale.cm(model=joint, variables={"tas": "tg"})
    with pytest.raises(InputError, match=r"names \['rr'\], which model"):
        two.downscale.cm(model=joint, variables={"rr": "pr"})


def test_dataset_downscaling_errors(joint: xdownscale.models.Model) -> None:
    ds = _coarse()
    with pytest.raises(InputError, match="steps=2 with a different noise level per variable"):
        ds.downscale.cm(model=joint, scale=SCALES, steps=2)
    with pytest.raises(InputError, match="has no entry for 'tas'"):
        ds.downscale.cm(model=joint, scale={"pr": "sigma=0.5"})
    with pytest.raises(InputError, match=r"Select it: ds\['pr'\].downscale.cm\(...\). \(A joint model"):
        ds.downscale.cm(model="cm-eobs-iberia-0.25deg-pr")
    with pytest.raises(InputError, match="downscales one variable"):
        xdownscale.downscale_dataset(ds, model="cm-eobs-iberia-0.25deg-pr")
    with pytest.raises(InputError, match=r"needs an xarray\.Dataset"):
        xdownscale.downscale_dataset(ds["pr"], model=joint)  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"ds\.downscale\.sde works on one variable"):
        ds.downscale.sde(model=joint)


@pytest.mark.filterwarnings("ignore:.*training range:xdownscale.errors.XDownscaleWarning")  # a 4-step model
def test_cli_downscales_several_variables_into_one_store(
    joint: xdownscale.models.Model, tmp_path: Path
) -> None:
    from xdownscale.cli import main

    ds = _coarse(ntime=10)
    ds.to_netcdf(tmp_path / "coarse.nc")
    out = tmp_path / "fine.zarr"
    args = ["downscale", str(tmp_path / "coarse.nc"), "-v", "pr", "-v", "tas", "--model", str(joint.path)]
    args += ["--out", str(out), "--scale", "sigma=0.3", "--members", "2", "--block", "4", "--quiet"]
    args += ["--qdm-hist", "2001-01-01/2001-01-10"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.count("model    ") == 2 and "written  'tas'" in result.output
    written = xr.open_zarr(out)
    assert set(written.data_vars) == {"pr", "tas"} and written["tas"].sizes["member"] == 2
    # the same as the call in Python with the same resolved QDM and scale, block by block
    again = ds.downscale.cm(model=joint, scale="sigma=0.3", members=2, qdm=True, progress=False)
    for v in ("pr", "tas"):
        np.testing.assert_allclose(written[v].values, again[v].values, rtol=1e-5, atol=1e-6)
    # a finished job resumes to the same store; another model or setting is refused
    assert CliRunner().invoke(main, [*args, "--resume"]).exit_code == 0
    other = [a if a != "sigma=0.3" else "sigma=0.4" for a in args]
    refused = CliRunner().invoke(main, [*other, "--resume"])
    assert refused.exit_code != 0 and "different job" in refused.output
    single = CliRunner().invoke(main, [*args[:6], "--model", "cm-eobs-iberia-0.25deg-pr", *args[8:]])
    assert single.exit_code != 0 and "downscales one variable" in single.output
