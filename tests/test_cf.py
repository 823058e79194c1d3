"""xdownscale.xr.cf: finding grids and time axes the CF way, on the layouts real files use."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from xdownscale.datasets import global_grid, regional_grid
from xdownscale.errors import MissingCoordinateError
from xdownscale.xr.cf import (
    find_grid,
    find_time,
    grid_extent,
    grid_spacing_km,
    standard_layout,
    wrap_longitude,
)

LAT = {"standard_name": "latitude", "units": "degrees_north"}
LON = {"standard_name": "longitude", "units": "degrees_east"}


def field(lat, lon, *, dims=("time", "lat", "lon"), lat_attrs=LAT, lon_attrs=LON, names=("lat", "lon")):
    lat, lon = np.asarray(lat, float), np.asarray(lon, float)
    ynam, xnam = names
    sizes = {"time": 2, ynam: lat.size, xnam: lon.size}
    dims = tuple({"lat": ynam, "lon": xnam}.get(d, d) for d in dims)
    data = np.arange(np.prod([sizes[d] for d in dims]), dtype=float).reshape([sizes[d] for d in dims])
    return xr.DataArray(
        data,
        dims=dims,
        coords={
            ynam: (ynam, lat, dict(lat_attrs)),
            xnam: (xnam, lon, dict(lon_attrs)),
            "time": xr.date_range("2000-01-01", periods=2),
        },
        name="pr",
    )


def rotated_pole(ny=6, nx=8, *, transpose=False, attrs=True):
    """A curvilinear grid like a rotated-pole RCM: dims rlat/rlon, 2-D lat/lon auxiliary coordinates."""
    rlat = np.linspace(-3, 3, ny)
    rlon = np.linspace(-4, 4, nx)
    rl, rL = np.meshgrid(rlat, rlon, indexing="ij")
    angle = np.deg2rad(20.0)  # rotate so that lat and lon vary along both dims
    lat = 45.0 + rl * np.cos(angle) + rL * np.sin(angle) * 0.3
    lon = 10.0 + rL * np.cos(angle) - rl * np.sin(angle) * 0.3
    coords = {
        "rlat": (
            "rlat",
            rlat,
            {"standard_name": "grid_latitude", "units": "degrees", "axis": "Y"} if attrs else {},
        ),
        "rlon": (
            "rlon",
            rlon,
            {"standard_name": "grid_longitude", "units": "degrees", "axis": "X"} if attrs else {},
        ),
        "lat": (("rlat", "rlon"), lat, LAT if attrs else {}),
        "lon": (("rlat", "rlon"), lon, LON if attrs else {}),
    }
    da = xr.DataArray(np.zeros((ny, nx)), dims=("rlat", "rlon"), coords=coords, name="tas")
    return da.transpose("rlon", "rlat") if transpose else da


# ---------------------------------------------------------------- rectilinear
@pytest.mark.parametrize(
    "dims", [("time", "lat", "lon"), ("time", "lon", "lat"), ("lon", "time", "lat"), ("lat", "lon", "time")]
)
def test_rectilinear_any_dim_order(dims):
    grid = find_grid(field(np.arange(30, 40, 2.0), np.arange(-10, 0, 2.0), dims=dims))
    assert (grid.lat, grid.lon, grid.ydim, grid.xdim) == ("lat", "lon", "lat", "lon")
    assert not grid.curvilinear and not grid.periodic
    assert grid.dims == ("lat", "lon")


def test_rectilinear_descending_latitude_and_shape():
    da = field(np.arange(40, 30, -2.0), np.arange(0, 10, 2.0))
    grid = find_grid(da)
    assert grid.lat == "lat" and grid.shape(da) == (5, 5)


@pytest.mark.parametrize(
    "lon", [np.arange(350.0, 360.0, 1.0), np.arange(-10.0, 0.0, 1.0), np.arange(0, 360.0, 2.5)]
)
def test_rectilinear_longitude_conventions(lon):
    assert find_grid(field(np.arange(30, 40.0), lon)).lon == "lon"


def test_dataset_grid():
    grid = find_grid(regional_grid(4, 5))
    assert (grid.ydim, grid.xdim) == ("lat", "lon")


# ---------------------------------------------------------------- periodicity
@pytest.mark.parametrize("lon0", [0.0, -180.0])
def test_periodic_global_grid(lon0):
    g = global_grid(2.5, lon0=lon0)
    assert find_grid(g).periodic
    # cell centres starting at the meridian (0, 2.5, ..., 357.5) are just as global
    lon = np.arange(lon0, lon0 + 360.0, 2.5)
    assert find_grid(field(np.arange(-88.75, 90, 2.5), lon)).periodic


@pytest.mark.parametrize(
    "lon", [np.arange(-10.0, 5.0, 0.25), np.arange(350.0, 365.0, 0.25) % 360, np.arange(0, 357.5, 2.5)]
)
def test_regional_grid_not_periodic(lon):
    # the last case misses one 2.5-deg column: a gap, so not periodic
    assert not find_grid(field(np.arange(30, 40.0), lon)).periodic


def test_curvilinear_global_periodic():
    lat1, lon1 = np.linspace(-80, 80, 9), np.arange(0, 360.0, 10.0)
    lat, lon = np.meshgrid(lat1, lon1, indexing="ij")
    da = xr.DataArray(
        np.zeros(lat.shape),
        dims=("j", "i"),
        coords={"lat": (("j", "i"), lat, LAT), "lon": (("j", "i"), lon, LON)},
    )
    grid = find_grid(da)
    assert grid.curvilinear and grid.periodic and grid.dims == ("j", "i")


# ---------------------------------------------------------------- curvilinear
@pytest.mark.parametrize("transpose", [False, True])
def test_curvilinear_rotated_pole(transpose):
    da = rotated_pole(transpose=transpose)
    grid = find_grid(da)
    assert (grid.lat, grid.lon) == ("lat", "lon")
    assert (grid.ydim, grid.xdim) == ("rlat", "rlon")
    assert grid.curvilinear and not grid.periodic
    assert grid.shape(da) == (6, 8)


@pytest.mark.parametrize("transpose", [False, True])
def test_curvilinear_without_axis_attrs_orders_dims_by_latitude(transpose):
    # no axis/standard_name on rlat/rlon: y is the dim along which latitude changes most
    da = rotated_pole(transpose=transpose)
    for name in ("rlat", "rlon"):
        da[name].attrs = {}
    da = da.rename({"rlat": "a", "rlon": "b"})
    grid = find_grid(da)
    assert (grid.ydim, grid.xdim) == ("a", "b")


# ---------------------------------------------------------------- names and attributes
def test_odd_names_with_cf_attributes():
    da = field(np.arange(30, 40.0), np.arange(0, 10.0), names=("a", "b"))
    grid = find_grid(da)
    assert (grid.lat, grid.lon, grid.ydim, grid.xdim) == ("a", "b", "a", "b")


def test_units_attribute_alone_is_enough():
    da = field(
        np.arange(30, 40.0),
        np.arange(0, 10.0),
        names=("y", "x"),
        lat_attrs={"units": "degrees_north"},
        lon_attrs={"units": "degrees_east"},
    )
    assert find_grid(da).dims == ("y", "x")


@pytest.mark.parametrize("names", [("lat", "lon"), ("latitude", "longitude")])
def test_no_attributes_found_by_guessing(names):
    da = field(np.arange(30, 40.0), np.arange(0, 10.0), names=names, lat_attrs={}, lon_attrs={})
    grid = find_grid(da)
    assert (grid.lat, grid.lon) == names
    assert da[names[0]].attrs == {}  # the input is not modified


def test_no_attributes_implausible_latitudes_are_refused():
    da = field(np.arange(100, 110.0), np.arange(0, 10.0), lat_attrs={}, lon_attrs={})
    with pytest.raises(MissingCoordinateError, match="Cannot find the latitude and longitude"):
        find_grid(da)


def test_missing_coordinates_lists_what_was_found_and_the_fix():
    da = field(np.arange(30, 40.0), np.arange(0, 10.0), names=("y", "x"), lat_attrs={}, lon_attrs={})
    with pytest.raises(
        MissingCoordinateError,
        match=r"Cannot find the latitude and longitude of 'pr'\. Found: .*y\('y',\) \(no CF attributes\).*"
        r"x\('x',\) \(no CF attributes\).*standard_name'\] = 'latitude'.*'degrees_north'",
    ):
        find_grid(da)


def test_missing_longitude_only():
    da = field(np.arange(30, 40.0), np.arange(0, 10.0), names=("lat", "x"), lon_attrs={})
    with pytest.raises(
        MissingCoordinateError,
        match=r"Cannot find the longitude of 'pr'.*lat\('lat',\) \{'standard_name': 'latitude'",
    ):
        find_grid(da)


def test_no_coordinates_at_all():
    with pytest.raises(MissingCoordinateError, match="Found: no coordinates at all"):
        find_grid(xr.DataArray(np.zeros((3, 4)), dims=("y", "x")))


def test_station_data_is_refused():
    da = xr.DataArray(
        np.zeros((4, 3)),
        dims=("time", "station"),
        name="precip",
        coords={
            "lat": ("station", [40.0, 41.0, 42.0], LAT),
            "lon": ("station", [-3.0, -2.0, -1.0], LON),
            "time": xr.date_range("2000-01-01", periods=4),
        },
    )
    with pytest.raises(
        MissingCoordinateError,
        match=r"'precip' has latitude 'lat' and longitude 'lon' along the same dimension 'station': "
        r"these are points \(e\.g\. stations\), not a grid",
    ):
        find_grid(da)


def test_mixed_dimensionality_is_refused():
    da = rotated_pole()
    da = da.assign_coords(lon=("rlon", np.linspace(0, 5, 8), LON))
    with pytest.raises(
        MissingCoordinateError,
        match=r"latitude 'lat' with dims \('rlat', 'rlon'\) and longitude 'lon' with dims \('rlon',\)",
    ):
        find_grid(da)


# ---------------------------------------------------------------- time
def test_find_time_datetime64_without_attributes():
    da = field(np.arange(3.0), np.arange(3.0)).rename(time="t")
    assert find_time(da) == "t"


@pytest.mark.parametrize("calendar", ["noleap", "360_day"])
def test_find_time_cftime(calendar):
    time = xr.date_range("2000-01-01", periods=3, calendar=calendar)
    da = xr.DataArray(np.zeros(3), dims="day", coords={"day": time})
    assert find_time(da) == "day"


def test_find_time_by_axis_attribute():
    da = xr.DataArray(np.zeros(3), dims="step", coords={"step": ("step", [0.0, 1.0, 2.0], {"axis": "T"})})
    assert find_time(da) == "step"


def test_find_time_absent():
    da = xr.DataArray(np.zeros((2, 3)), dims=("lat", "lon"), name="orog")
    with pytest.raises(
        MissingCoordinateError,
        match=r"Cannot find a time dimension in 'orog' \(dims \('lat', 'lon'\)\)\. "
        r"Give it a datetime coordinate",
    ):
        find_time(da)
    assert find_time(da, required=False) is None


# ---------------------------------------------------------------- spacing, extent, layout
def test_grid_spacing_quarter_degree_at_40n():
    g = regional_grid(9, 9, lat0=39.0, lon0=0.0, res=0.25)  # centred on 40.125 N
    dy, dx = grid_spacing_km(g)
    assert dy == pytest.approx(27.80, abs=0.05)
    assert dx == pytest.approx(27.80 * np.cos(np.deg2rad(40.125)), rel=2e-3)
    assert dx == pytest.approx(21.3, abs=0.1)


def test_grid_spacing_curvilinear_is_haversine():
    # a 1-degree grid stored as 2-D coordinates around the equator: dy = 111.19 km, dx = dy cos(lat)
    lat, lon = np.meshgrid(np.arange(-2.0, 3.0), np.arange(10.0, 15.0), indexing="ij")
    da = xr.DataArray(
        np.zeros(lat.shape),
        dims=("j", "i"),
        coords={"lat": (("j", "i"), lat, LAT), "lon": (("j", "i"), lon, LON)},
    )
    dy, dx = grid_spacing_km(da)
    assert dy == pytest.approx(111.19, abs=0.01)
    assert dx == pytest.approx(111.19 * np.mean(np.cos(np.deg2rad(lat))), rel=1e-4)
    dy_rot, dx_rot = grid_spacing_km(rotated_pole(ny=5, nx=5))
    assert dy_rot == pytest.approx(1.5 * 111.19, rel=0.1) and dx_rot == pytest.approx(
        2.0 * 111.19 * 0.72, rel=0.15
    )


def test_grid_spacing_across_the_dateline():
    g = field(np.array([0.0, 1.0]), np.array([179.0, -180.0, -179.0]))
    _, dx = grid_spacing_km(g)
    assert dx == pytest.approx(111.19 * np.cos(np.deg2rad(0.5)), rel=1e-3)


def test_grid_extent():
    ext = grid_extent(regional_grid(4, 4, lat0=30.0, lon0=-10.0, res=1.0))
    assert ext == {"lat_min": 30.5, "lat_max": 33.5, "lon_min": -9.5, "lon_max": -6.5}


def test_wrap_longitude():
    np.testing.assert_allclose(
        wrap_longitude(np.array([0.0, 180.0, 359.0, -190.0])), [0.0, -180.0, -1.0, 170.0]
    )
    np.testing.assert_allclose(wrap_longitude(np.array([-10.0, 370.0]), start=0.0), [350.0, 10.0])


def test_standard_layout_sorts_descending_latitude_and_moves_dims_last():
    da = field(np.arange(40, 30, -2.0), np.arange(-10, 0, 2.0), dims=("lat", "lon", "time"))
    out = standard_layout(da)
    assert out.dims == ("time", "lat", "lon")
    assert np.all(np.diff(out.lat) > 0)
    np.testing.assert_array_equal(out.sel(lat=40.0).values, da.sel(lat=40.0).transpose("time", "lon").values)
    assert out.lat.attrs == LAT


def test_standard_layout_wraps_regional_0_360_longitudes():
    lon = np.array([350.0, 352.0, 354.0, 356.0, 358.0, 0.0, 2.0, 4.0])
    da = field(np.arange(30, 34.0), lon)
    out = standard_layout(da)
    np.testing.assert_allclose(out.lon, [-10, -8, -6, -4, -2, 0, 2, 4])
    np.testing.assert_array_equal(out.sel(lon=-10.0).values, da.sel(lon=350.0).values)
    assert out.lon.attrs == LON


def test_standard_layout_global_0_360_becomes_monotonic():
    g = global_grid(30.0)  # lon 15 .. 345
    da = xr.DataArray(np.arange(6 * 12.0).reshape(6, 12), dims=("lat", "lon"), coords=g.coords)
    out = standard_layout(da.isel(lat=slice(None, None, -1)))
    assert np.all(np.diff(out.lon) > 0) and np.all(np.diff(out.lat) > 0)
    assert out.lon.min() >= -180 and out.lon.max() < 180
    np.testing.assert_array_equal(out.sel(lon=-15.0).values, da.sel(lon=345.0).values)


def test_standard_layout_keeps_a_regional_grid_crossing_180_in_0_360():
    lon = np.array([176.0, 178.0, 180.0, 182.0, 184.0])
    out = standard_layout(field(np.arange(3.0), lon))
    np.testing.assert_allclose(out.lon, lon)


def test_standard_layout_regional_dateline_in_minus_180_180():
    lon = np.array([176.0, 178.0, -180.0, -178.0])
    out = standard_layout(field(np.arange(3.0), lon))
    np.testing.assert_allclose(out.lon, [176.0, 178.0, 180.0, 182.0])


def test_standard_layout_dataset():
    ds = regional_grid(3, 4).isel(lat=slice(None, None, -1))
    ds["pr"] = (("lon", "lat"), np.arange(12.0).reshape(4, 3))
    out = standard_layout(ds)
    assert np.all(np.diff(out.lat) > 0)
    np.testing.assert_array_equal(out.pr.values, ds.pr.values[:, ::-1])


def test_standard_layout_curvilinear_only_transposes():
    da = rotated_pole(transpose=True)
    out = standard_layout(da)
    assert out.dims == ("rlat", "rlon")
    xr.testing.assert_identical(out, da.transpose("rlat", "rlon"))
