"""Real CMIP/CORDEX files as they come (issue 15), end to end on the tiny trained model.

Each test builds a small synthetic file with the real-world shape of the input: a CMIP-like field in
0..360 longitudes (regional and global, sorted or cut across the Greenwich meridian), an ensemble with
``realization`` and a leading ``height``, a CORDEX-like rotated-pole grid that covers the model only
partly, a field with NaN over the sea, negative values, and the attributes of a CNRM-CM5 file.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr

import xdownscale
from xdownscale.errors import GridMismatchError, InputError, UnitError, XDownscaleWarning
from xdownscale.xr.domain import allow_partial_coverage

LAT_ATTRS = {"standard_name": "latitude", "units": "degrees_north"}
LON_ATTRS = {"standard_name": "longitude", "units": "degrees_east"}
NTIME = 3
RUN = {"scale": "200 km", "seed": 3, "progress": False}


def _values(lat: np.ndarray, lon: np.ndarray, ntime: int = NTIME) -> np.ndarray:
    """A smooth, positive precipitation pattern in kg m-2 s-1 (about 1-9 mm/day)."""
    t = np.arange(ntime, dtype=float)[:, None, None]
    mm_day = 5.0 + 3.0 * np.sin(np.deg2rad(lat) * 9.0 + t) * np.cos(np.deg2rad(lon) * 7.0 - 0.5 * t)
    return (mm_day / 86400.0).astype("float32")


def _time(ntime: int = NTIME) -> xr.DataArray:
    return xr.DataArray(
        xr.date_range("1990-12-01T12:00", periods=ntime, freq="D").values, dims="time", name="time"
    )


def _rectilinear(lat: np.ndarray, lon: np.ndarray, attrs: dict[str, str] | None = None) -> xr.DataArray:
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    return xr.DataArray(
        _values(la, lo),
        dims=("time", "lat", "lon"),
        coords={"time": _time(), "lat": ("lat", lat, LAT_ATTRS), "lon": ("lon", lon, LON_ATTRS)},
        name="pr",
        attrs=attrs or {"units": "kg m-2 s-1", "standard_name": "precipitation_flux"},
    )


def _cmip_iberia() -> xr.DataArray:
    """1.40625-degree CMIP-like grid (CNRM-CM5 spacing) over Iberia, in -180..180."""
    lat = 31.0 + 1.40625 * np.arange(6)
    lon = -14.0625 + 1.40625 * np.arange(14)  # -14.06 .. 4.22: crosses the Greenwich meridian
    return _rectilinear(lat, lon)


def _to_0_360(da: xr.DataArray, *, sort: bool) -> xr.DataArray:
    out = da.assign_coords(lon=("lon", da["lon"].values % 360.0, LON_ATTRS))
    return out.sortby("lon") if sort else out


def _rotated_pole(rlat: np.ndarray, rlon: np.ndarray, pole_lat: float, pole_lon: float) -> tuple:
    """Geographic lat/lon (2-D) of a rotated-pole grid, as in CORDEX files (CF rotated_latitude_longitude)."""
    pr, lr = np.meshgrid(np.deg2rad(rlat), np.deg2rad(rlon), indexing="ij")
    pp, lp = np.deg2rad(pole_lat), np.deg2rad(pole_lon)
    lat = np.arcsin(np.sin(pr) * np.sin(pp) + np.cos(pr) * np.cos(lr) * np.cos(pp))
    lon = (
        lp
        - np.pi
        + np.arctan2(np.cos(pr) * np.sin(lr), np.sin(pp) * np.cos(pr) * np.cos(lr) - np.cos(pp) * np.sin(pr))
    )
    return np.rad2deg(lat), (np.rad2deg(lon) + 180.0) % 360.0 - 180.0


def _cordex(rlon_max: float = 3.52) -> xr.DataArray:
    """A CORDEX-like 0.44-degree rotated-pole grid centred on the model's domain (36 N, 7 W)."""
    rlat = np.arange(-3.52, 3.53, 0.44)
    rlon = np.arange(-3.52, rlon_max + 0.01, 0.44)
    lat, lon = _rotated_pole(rlat, rlon, pole_lat=54.0, pole_lon=173.0)
    return xr.DataArray(
        _values(lat[None], lon[None]),
        dims=("time", "rlat", "rlon"),
        coords={
            "time": _time(),
            "rlat": ("rlat", rlat, {"standard_name": "grid_latitude", "units": "degrees"}),
            "rlon": ("rlon", rlon, {"standard_name": "grid_longitude", "units": "degrees"}),
            "lat": (("rlat", "rlon"), lat, LAT_ATTRS),
            "lon": (("rlat", "rlon"), lon, LON_ATTRS),
        },
        name="pr",
        attrs={"units": "kg m-2 s-1", "standard_name": "precipitation_flux"},
    )


# -- 1. longitudes 0..360 -------------------------------------------------------------------------
@pytest.mark.parametrize("sort", [True, False], ids=["sorted-0..360", "cut-across-0"])
def test_cmip_0_360_across_greenwich_gives_the_same_output(cm_model, sort):
    ref = _cmip_iberia()
    cmip = _to_0_360(ref, sort=sort)
    assert float(cmip["lon"].min()) < 5 and float(cmip["lon"].max()) > 355
    expected = ref.downscale.cm(model=cm_model.path, **RUN)
    out = cmip.downscale.cm(model=cm_model.path, **RUN)
    xr.testing.assert_identical(out.drop_attrs(), expected.drop_attrs())
    assert np.isfinite(out.values[:, cm_model.grid["mask"].values]).all()


def test_global_cmip_file_in_0_360_gives_the_same_output(cm_model):
    lat = -88.59375 + 1.40625 * np.arange(127)
    ref = _rectilinear(lat, -180.0 + 1.40625 * np.arange(256))
    cmip = _to_0_360(ref, sort=True)
    assert xdownscale.xr.cf.find_grid(cmip).periodic
    expected = ref.downscale.cm(model=cm_model.path, **RUN)
    out = cmip.downscale.cm(model=cm_model.path, **RUN)
    xr.testing.assert_identical(out.drop_attrs(), expected.drop_attrs())


# -- 2. extra dimensions --------------------------------------------------------------------------
def test_single_realization_and_leading_height_are_squeezed_into_scalar_coords(cm_model):
    plain = _cmip_iberia()
    cmip = plain.expand_dims(realization=["r1i1p1"]).expand_dims(height=[2.0])
    assert cmip.dims[:2] == ("height", "realization")
    out = cmip.downscale.cm(model=cm_model.path, members=2, **RUN)
    assert out.dims == ("time", "member", "lat", "lon")
    assert float(out["height"]) == 2.0 and str(out["realization"].values) == "r1i1p1"
    expected = plain.downscale.cm(model=cm_model.path, members=2, **RUN)
    np.testing.assert_array_equal(out.values, expected.values)


def test_an_esm_member_dim_is_renamed_realization(cm_model):
    cmip = _cmip_iberia().expand_dims(member=["r2i1p1"])
    out = cmip.downscale.cm(model=cm_model.path, members=2, **RUN)
    assert out.sizes["member"] == 2 and out["member"].values.tolist() == [0, 1]
    assert str(out["realization"].values) == "r2i1p1"


def test_an_esm_ensemble_downscales_in_one_call_with_independent_noise(cm_model):
    plain = _cmip_iberia()
    ens = xr.concat([plain, plain * 1.5, plain], dim="realization")
    ens["realization"] = ["r1i1p1", "r2i1p1", "r3i1p1"]
    out = ens.chunk({"time": 2}).downscale.cm(model=cm_model.path, members=2, **{**RUN, "seed": 7})
    assert out.chunks is not None
    assert out.dims == ("realization", "time", "member", "lat", "lon")
    assert out["realization"].values.tolist() == ["r1i1p1", "r2i1p1", "r3i1p1"]
    seeds = out["downscale_seed"].values.tolist()
    assert seeds == [xdownscale.api.realization_seed(7, i) for i in range(3)] and len(set(seeds)) == 3
    assert out.attrs["downscale_seed"] == 7 and "history" in out.attrs
    # each realization is what downscaling it alone with its seed gives
    alone = plain.downscale.cm(model=cm_model.path, members=2, **{**RUN, "seed": seeds[2]})
    np.testing.assert_allclose(out.isel(realization=2).values, alone.values, rtol=1e-6, atol=1e-12)
    # same input, different noise: realizations 0 and 2 differ; the wetter one is wetter
    mask = cm_model.grid["mask"].values
    assert not np.allclose(out.values[0][..., mask], out.values[2][..., mask])
    means = out.where(xr.DataArray(mask, dims=("lat", "lon"))).mean(("time", "member", "lat", "lon"))
    assert float(means[1]) > 1.3 * float(means[0])
    as_member = ens.rename(realization="member").downscale.cm(model=cm_model.path, **RUN)
    assert as_member.dims == ("realization", "time", "lat", "lon")


def test_extra_dims_that_cannot_be_squeezed_are_clear_errors(cm_model):
    levels = _cmip_iberia().expand_dims(height=[2.0, 10.0])
    with pytest.raises(InputError, match=r"'height' \(length 2\)"):
        levels.downscale.cm(model=cm_model.path, **RUN)
    both = _cmip_iberia().expand_dims(member=[0], realization=[1])
    with pytest.raises(InputError, match=r"both 'member' and 'realization'.*rename"):
        both.downscale.cm(model=cm_model.path, **RUN)


# -- 3. a Dataset -----------------------------------------------------------------------------------
def test_dataset_accessor_points_to_the_variable(cm_model):
    ds = _cmip_iberia().to_dataset()
    ds["time_bnds"] = ("time", np.arange(NTIME))
    with pytest.raises(
        InputError, match=r"holds \['pr', 'time_bnds'\]. Select it: ds\['pr'\]\.downscale\.cm"
    ):
        ds.downscale.cm(model=cm_model.path)
    assert not hasattr(ds.downscale, "_private")
    with pytest.raises(InputError, match="this Dataset has no data variables"):
        xr.Dataset().downscale.sde(model=cm_model.path)


# -- 4. NaN over the sea ----------------------------------------------------------------------------
def test_sea_nan_in_the_coarse_input_keeps_coastal_land(cm_model):
    cmip = _cmip_iberia()
    sea = cmip["lon"] < -9.0  # the model's sea is its western edge
    out = cmip.where(~sea).downscale.cm(model=cm_model.path, **RUN)
    mask = cm_model.grid["mask"].values
    np.testing.assert_array_equal(np.isnan(out.values), np.broadcast_to(~mask, out.shape))


def test_an_all_nan_day_stays_nan(cm_model):
    cmip = _cmip_iberia().copy()
    cmip[1] = np.nan
    out = cmip.downscale.cm(model=cm_model.path, **RUN)
    assert np.isnan(out.values[1]).all() and np.isfinite(out.values[0][cm_model.grid["mask"].values]).all()


# -- 5. coverage ------------------------------------------------------------------------------------
def test_cordex_rotated_grid_covering_the_domain(cm_model):
    out = _cordex().downscale.cm(model=cm_model.path, **RUN)
    mask = cm_model.grid["mask"].values
    np.testing.assert_array_equal(np.isnan(out.values), np.broadcast_to(~mask, out.shape))


def test_cordex_rotated_grid_with_partial_coverage_errors_or_warns(cm_model):
    part = _cordex(rlon_max=0.9)  # stops short of the model's eastern edge
    with pytest.raises(GridMismatchError, match=r"'pr' covers .*\d+\.\d% of the model's cells lie outside"):
        part.downscale.cm(model=cm_model.path, **RUN)
    with allow_partial_coverage(), pytest.warns(XDownscaleWarning, match=r"\d+\.\d% of the model's cells"):
        out = part.downscale.cm(model=cm_model.path, **RUN)
    mask = cm_model.grid["mask"].values
    gone = np.isnan(out.values[0]) & mask
    assert gone.any() and gone[:, -1].all() and not gone[:, :4].any()
    assert np.isfinite(out.values[0][mask & ~gone]).all()


def test_rectilinear_partial_coverage_in_longitude(cm_model):
    cmip = _cmip_iberia().sel(lon=slice(None, -8.0))
    with pytest.raises(GridMismatchError, match=r"lon -14\.06\.\.-8\.44.*lie outside the input"):
        cmip.downscale.cm(model=cm_model.path, **RUN)


def test_curvilinear_copy_of_a_rectilinear_grid_gives_the_same_field(cm_model):
    rect = _cmip_iberia()
    la, lo = xr.broadcast(rect["lat"], rect["lon"])
    curv = rect.rename(lat="y", lon="x").assign_coords(
        lat=(("y", "x"), la.values, LAT_ATTRS), lon=(("y", "x"), lo.values, LON_ATTRS)
    )
    kwargs = dict(model=cm_model.path, transform=False, lowpass=False)
    a = xdownscale.prepare(rect, **kwargs).values
    b = xdownscale.prepare(curv, **kwargs).values
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a, b, rtol=0.05)


# -- 6. values, units and attributes --------------------------------------------------------------
def test_negative_precipitation_is_clipped_with_a_count(cm_model):
    cmip = _cmip_iberia().copy()
    cmip[0, 2, 3:6] = -1e-6
    with pytest.warns(XDownscaleWarning, match=r"'pr' has 3 negative values \(lowest -1e-06 kg m-2 s-1\)"):
        out = cmip.downscale.cm(model=cm_model.path, **RUN)
    assert np.isfinite(out.values[:, cm_model.grid["mask"].values]).all()


def test_lazy_negative_precipitation_warns_at_compute(cm_model):
    cmip = _cmip_iberia().copy()
    cmip[1, 0, 0] = -2e-6
    lazy = cmip.chunk({"time": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error", XDownscaleWarning)
        out = lazy.downscale.cm(model=cm_model.path, **RUN)
    with pytest.warns(XDownscaleWarning, match="1 negative value in one dask chunk"):
        out.compute(scheduler="synchronous")


def test_a_length_that_is_not_a_water_depth_is_refused(cm_model):
    cmip = _cmip_iberia()
    cmip.attrs["units"] = "furlongs"
    with pytest.raises(
        UnitError, match=r"'pr' has units 'furlongs', a length \(furlong\) that is not a depth of water"
    ):
        cmip.downscale.cm(model=cm_model.path, **RUN)


def test_output_attributes_are_cf_consistent_and_the_inputs_own(cm_model):
    cnrm = _cmip_iberia()
    cnrm.attrs = {
        "units": "kg m-2 s-1",
        "standard_name": "lwe_precipitation_rate",
        "long_name": "Precipitation",
    }
    out = cnrm.downscale.cm(model=cm_model.path, **RUN)
    assert out.attrs["units"] == "kg m-2 s-1"
    assert out.attrs["standard_name"] == "precipitation_flux"
    assert out.attrs["long_name"] == "Precipitation"
    assert cm_model.name in out.attrs["history"] and out.attrs["downscale_model"] == cm_model.name
    daily = cnrm * 86400.0
    daily.attrs = {"units": "mm/day"}
    out = daily.downscale.cm(model=cm_model.path, **RUN)
    assert out.attrs["standard_name"] == "lwe_precipitation_rate"
    assert out.attrs["long_name"] == "precipitation"
    model_long_name = cm_model.variable.get("long_name")
    assert not model_long_name or model_long_name not in out.attrs.values()


# -- 5. a dry day -----------------------------------------------------------------------------------
def test_an_all_zero_coarse_day_stays_dry(cm_model):
    cmip = _cmip_iberia()
    cmip[1] = 0.0  # a dry day everywhere
    out = cmip.downscale.cm(model=cm_model.path, members=3, **RUN)
    land = cm_model.grid["mask"].values
    assert (out.values[1][..., land] == 0).all()
    assert (out.values[0][..., land] > 0).any()
    wet = cmip.downscale.cm(model=cm_model.path, members=3, preserve=False, **RUN)
    assert (wet.values[1][..., land] > 0).any()  # what preserve= prevents: the network alone rains
