"""Regridding: xdownscale.xr.regrid (DataArrays) and xdownscale.core.regrid_weights (numpy)."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import xarray as xr
from _dask_helpers import CountingScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from xdownscale.core import regrid_weights as rw
from xdownscale.errors import GridMismatchError, InputError, MissingCoordinateError, PerformanceWarning
from xdownscale.xr import regrid as regrid_mod
from xdownscale.xr.regrid import Regridder, regrid

LAT_ATTRS = {"standard_name": "latitude", "units": "degrees_north"}
LON_ATTRS = {"standard_name": "longitude", "units": "degrees_east"}


# -- helpers ------------------------------------------------------------------------------------------


def global_grid(ny: int, nx: int, lon0: float = 0.0, *, names=("lat", "lon"), descending=False) -> xr.Dataset:
    """A global grid with cell centres; latitude bands of equal width reaching the poles."""
    lat = -90.0 + (np.arange(ny) + 0.5) * 180.0 / ny
    lon = lon0 + np.arange(nx) * 360.0 / nx
    if descending:
        lat = lat[::-1]
    return xr.Dataset(coords={names[0]: (names[0], lat, LAT_ATTRS), names[1]: (names[1], lon, LON_ATTRS)})


def regional_grid(lat: np.ndarray, lon: np.ndarray, names=("lat", "lon")) -> xr.Dataset:
    return xr.Dataset(coords={names[0]: (names[0], lat, LAT_ATTRS), names[1]: (names[1], lon, LON_ATTRS)})


def field(grid: xr.Dataset, func, ntime: int = 0, dtype=np.float64, name: str = "tas") -> xr.DataArray:
    """``func(lat, lon)`` on ``grid`` (dims lat, lon, from the grid's first two coordinates)."""
    ylat, xlon = list(grid.coords)[:2]
    la, lo = np.meshgrid(grid[ylat].values, grid[xlon].values, indexing="ij")
    values = np.asarray(func(la, lo), dtype=dtype)
    da = xr.DataArray(values, coords=grid.coords, dims=(ylat, xlon), name=name, attrs={"units": "K"})
    if ntime:
        da = da.expand_dims(time=np.arange(ntime)).copy()
        da.values = da.values * (1.0 + 0.1 * np.arange(ntime))[:, None, None].astype(dtype)
    return da


def smooth(la, lo):
    r = np.deg2rad
    return 2.0 + np.cos(r(la)) * np.cos(r(lo)) + 0.5 * np.sin(r(la)) + 0.3 * np.cos(r(la)) * np.sin(2 * r(lo))


def area_mean(da: xr.DataArray) -> float:
    """Area-weighted mean with exact sin-band weights (cells of equal longitude width)."""
    lat = da["lat"].values
    b = rw.lat_cell_bounds(lat)
    w = np.sin(np.deg2rad(b[:, 1])) - np.sin(np.deg2rad(b[:, 0]))
    w2 = xr.DataArray(w, dims="lat", coords={"lat": lat})
    return float(da.weighted(w2).mean(("lat", "lon")))


def rotated_grid(nr: int = 41, nc: int = 51, step: float = 0.44, centre=(40.0, -3.0)) -> xr.Dataset:
    """A rotated-pole-like curvilinear grid: regular in (rlat, rlon), 2-D lat/lon after a rotation."""
    rlat = (np.arange(nr) - (nr - 1) / 2) * step
    rlon = (np.arange(nc) - (nc - 1) / 2) * step
    xyz = rw.sphere_xyz(*np.meshgrid(rlat, rlon, indexing="ij"))
    phi, lam = np.deg2rad(centre[0]), np.deg2rad(centre[1])
    tilt = np.array([[np.cos(phi), 0, -np.sin(phi)], [0, 1, 0], [np.sin(phi), 0, np.cos(phi)]])
    turn = np.array([[np.cos(lam), -np.sin(lam), 0], [np.sin(lam), np.cos(lam), 0], [0, 0, 1]])
    g = xyz @ (turn @ tilt).T
    lat = np.rad2deg(np.arcsin(g[..., 2]))
    lon = np.rad2deg(np.arctan2(g[..., 1], g[..., 0]))
    return xr.Dataset(
        coords={
            "rlat": ("rlat", rlat, {"standard_name": "grid_latitude", "units": "degrees", "axis": "Y"}),
            "rlon": ("rlon", rlon, {"standard_name": "grid_longitude", "units": "degrees", "axis": "X"}),
            "lat": (("rlat", "rlon"), lat, LAT_ATTRS),
            "lon": (("rlat", "rlon"), lon, LON_ATTRS),
        }
    )


# -- basic properties ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["bilinear", "conservative"])
@pytest.mark.parametrize(
    ("src", "tgt"), [((30, 48), (120, 192)), ((120, 192), (30, 48)), ((36, 72), (45, 80))]
)
def test_constant_field_stays_constant(method, src, tgt):
    da = field(global_grid(*src), lambda la, lo: 0 * la + 7.5)
    out = regrid(da, global_grid(*tgt, lon0=-180.0), method)
    assert out.shape == tgt
    np.testing.assert_allclose(out.values, 7.5, rtol=1e-12)


def test_bilinear_reproduces_linear_function_inside_the_domain():
    src = regional_grid(np.linspace(30.0, 50.0, 11), np.linspace(-10.0, 10.0, 21))
    tgt = regional_grid(np.linspace(30.3, 49.9, 29), np.linspace(-9.87, 9.95, 37) % 360.0)

    def f(la, lo):
        return 3.0 + 2.0 * la - 0.5 * ((lo + 180.0) % 360.0 - 180.0)

    out = regrid(field(src, f), tgt, "bilinear")
    np.testing.assert_allclose(out.values, field(tgt, f).values, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("src", "tgt"),
    [((60, 96), (240, 384)), ((240, 384), (60, 96)), ((45, 90), (64, 128)), ((73, 144), (19, 30))],
)
def test_conservative_conserves_the_area_mean_including_poles(src, tgt):
    rng = np.random.default_rng(0)
    source = global_grid(*src, lon0=1.25)
    da = field(source, smooth) + xr.DataArray(rng.random(src), dims=("lat", "lon"))
    out = regrid(da, global_grid(*tgt, lon0=-180.0), "conservative")
    assert not out.isnull().any()  # polar rows included
    assert area_mean(out) == pytest.approx(area_mean(da), rel=1e-6)


@given(st.integers(2, 40), st.integers(3, 50), st.integers(2, 40), st.integers(3, 50), st.floats(-180, 180))
@settings(max_examples=25, deadline=None)
def test_conservative_weights_conserve_for_any_global_grids(ny, nx, mty, mtx, lon0):
    """Property: exact separable weights conserve the sin-band area mean between any global grids."""
    src, tgt = global_grid(ny, nx), global_grid(mty, mtx, lon0=lon0)
    x = np.random.default_rng(ny * 1000 + nx).random((ny, nx))
    w = rw.separable_weights(
        src.lat.values,
        src.lon.values,
        tgt.lat.values,
        tgt.lon.values,
        "conservative",
        src_periodic=True,
        tgt_periodic=True,
    )
    out = w.apply(x, 0.5)
    da = xr.DataArray(x, coords=src.coords, dims=("lat", "lon"))
    do = xr.DataArray(out, coords=tgt.coords, dims=("lat", "lon"))
    assert area_mean(do) == pytest.approx(area_mean(da), rel=1e-9)


def test_bilinear_global_has_no_seam_and_no_empty_polar_rows():
    src = global_grid(36, 72, lon0=2.5)  # 2.5 .. 357.5: targets near 0/360 lie across the seam
    out = regrid(field(src, smooth), global_grid(180, 360, lon0=-180.0), "bilinear")
    assert not out.isnull().any()
    expected = field(global_grid(180, 360, lon0=-180.0), smooth)
    err = np.abs(out - expected)
    assert float(err.max()) < 0.02  # interpolation error of a 5-degree grid
    seam = err.sel(lon=slice(-3, 3)).max()
    assert float(seam) < 2 * float(err.sel(lon=slice(60, 120)).max())  # no worse at the seam


@pytest.mark.parametrize("method", ["bilinear", "conservative"])
def test_longitude_conventions_are_equivalent(method):
    src360 = global_grid(30, 48, lon0=0.0)  # 0 .. 352.5
    da360 = field(src360, smooth, ntime=2)
    da180 = da360.assign_coords(lon=((da360.lon + 180) % 360) - 180).sortby("lon")  # -180 .. 172.5
    for tgt in (global_grid(50, 72, lon0=-180.0), global_grid(50, 72, lon0=0.0)):
        a, b = regrid(da360, tgt, method), regrid(da180, tgt, method)
        np.testing.assert_allclose(a.values, b.values, rtol=1e-12)
        np.testing.assert_array_equal(a.lon.values, tgt.lon.values)
    out180 = regrid(da360, global_grid(50, 72, lon0=-180.0), method)
    out360 = regrid(da360, global_grid(50, 72, lon0=0.0), method)
    np.testing.assert_allclose(
        out180.assign_coords(lon=out180.lon % 360).sortby("lon").values, out360.values, rtol=1e-12
    )


@pytest.mark.parametrize("method", ["bilinear", "conservative"])
def test_global_source_with_a_cyclic_duplicate_column(method):
    lon = np.arange(0.0, 360.1, 7.5)  # 0 .. 360: the last column repeats the first
    src = regional_grid(-90.0 + (np.arange(24) + 0.5) * 7.5, lon)
    da = field(src, smooth)
    out = regrid(da, global_grid(45, 96, lon0=-180.0), method)
    assert not out.isnull().any()
    assert float(regrid(da * 0 + 2.0, global_grid(45, 96, lon0=-180.0), method).std()) < 1e-12


def test_regional_source_across_the_dateline():
    lon = np.concatenate([np.arange(160.0, 180.0, 2.0), np.arange(-180.0, -158.0, 2.0)])
    src = regional_grid(np.arange(-10.0, 11.0, 2.0), lon)

    def f(la, lo):
        return la + 0.25 * (lo % 360.0)

    tgt = regional_grid(np.arange(-9.0, 10.0, 1.0), np.arange(165.0, 196.0, 1.0))
    out = regrid(field(src, f), tgt, "bilinear")
    np.testing.assert_allclose(out.values, field(tgt, f).values, atol=1e-10)


@pytest.mark.parametrize("method", ["bilinear", "conservative"])
def test_descending_latitude_is_equivalent(method):
    up = field(global_grid(30, 48), smooth, ntime=2)
    down = up.isel(lat=slice(None, None, -1))
    tgt_up, tgt_down = global_grid(45, 60), global_grid(45, 60, descending=True)
    a = regrid(up, tgt_up, method)
    np.testing.assert_allclose(regrid(down, tgt_up, method).values, a.values, rtol=1e-12)
    b = regrid(down, tgt_down, method)
    np.testing.assert_array_equal(b.lat.values, tgt_down.lat.values)
    np.testing.assert_allclose(b.values, a.values[:, ::-1], rtol=1e-12)


def test_any_dim_order_in_and_target_order_out():
    da = field(global_grid(30, 48), smooth, ntime=3)
    tgt = global_grid(45, 60)
    ref = regrid(da, tgt)
    out = regrid(da.transpose("lon", "time", "lat"), tgt)
    assert out.dims == ("time", "lat", "lon")
    np.testing.assert_allclose(out.values, ref.values, rtol=1e-12)
    tgt_da = xr.DataArray(np.zeros((60, 45)), coords=tgt.coords, dims=("lon", "lat"))
    out = regrid(da, tgt_da)
    assert out.dims == ("time", "lon", "lat")
    np.testing.assert_allclose(out.transpose("time", "lat", "lon").values, ref.values, rtol=1e-12)


def test_output_metadata_follows_the_target():
    da = field(global_grid(30, 48, names=("y", "x")), smooth, ntime=2)
    da.attrs["grid_mapping"] = "crs"
    tgt = global_grid(45, 60, names=("latitude", "longitude"))
    tgt["latitude"].attrs["long_name"] = "target latitude"
    out = regrid(da, tgt)
    assert out.dims == ("time", "latitude", "longitude")
    assert out.name == "tas" and out.attrs == {"units": "K"}
    assert out["latitude"].attrs["long_name"] == "target latitude"
    np.testing.assert_array_equal(out["longitude"].values, tgt["longitude"].values)
    assert "y" not in out.coords and "x" not in out.coords
    np.testing.assert_array_equal(out.time.values, da.time.values)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("method", ["bilinear", "conservative"])
def test_float_dtype_is_preserved(dtype, method):
    da = field(global_grid(30, 48), smooth, ntime=2, dtype=dtype)
    out = regrid(da, global_grid(60, 96), method)
    assert out.dtype == dtype
    ref = regrid(da.astype(np.float64), global_grid(60, 96), method)
    np.testing.assert_allclose(out.values, ref.values, rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_integer_input_becomes_float32():
    da = field(global_grid(30, 48), lambda la, lo: 0 * la + 3, dtype=np.int16)
    out = regrid(da, global_grid(60, 96))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.values, 3.0)


# -- dask ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["bilinear", "conservative"])
def test_dask_stays_lazy_keeps_time_chunks_and_builds_weights_once(method, monkeypatch):
    calls = []
    build = regrid_mod._build_weights

    def counting(*args, **kwargs):
        calls.append(args[:2])
        return build(*args, **kwargs)

    monkeypatch.setattr(regrid_mod, "_build_weights", counting)
    monkeypatch.setattr(regrid_mod, "_CACHE", type(regrid_mod._CACHE)())
    da = field(global_grid(30, 48), smooth, ntime=7, dtype=np.float32)
    lazy = da.chunk({"time": 3})
    tgt = global_grid(45, 60)
    with dask.config.set(scheduler=CountingScheduler(0)):
        out = regrid(lazy, tgt, method)
        out2 = regrid(lazy.isel(time=slice(0, 4)), tgt, method)
    assert isinstance(out.data, dask.array.Array)
    assert out.chunks == ((3, 3, 1), (45,), (60,))
    assert out2.chunks[0] == (3, 1)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.compute().values, regrid(da, tgt, method).values, rtol=1e-6)
    assert len(calls) == 1  # once for all chunks and both calls


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("method", "backend"), [("bilinear", "auto"), ("conservative", "auto"), ("bilinear", "delaunay")]
)
def test_result_does_not_depend_on_chunking(method, backend, dtype):
    """Bit for bit, also when NaN occur in some time steps only (other chunks take the NaN-free path)."""
    da = field(global_grid(30, 48), smooth, ntime=7, dtype=dtype)
    da[2, 3:6, 10:14] = np.nan
    tgt = global_grid(45, 60, lon0=-180.0)
    ref = regrid(da, tgt, method, backend=backend).values
    for chunk in (1, 2, 3):
        out = regrid(da.chunk({"time": chunk}), tgt, method, backend=backend)
        np.testing.assert_array_equal(out.values, ref)
    np.testing.assert_array_equal(regrid(da.isel(time=[0]), tgt, method, backend=backend).values, ref[[0]])


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["threads", "processes"])
def test_same_result_under_dask_schedulers(scheduler):
    da = field(global_grid(30, 48), smooth, ntime=6)
    da[:, 2:5, 3:9] = np.nan
    tgt = global_grid(45, 60)
    ref = regrid(da, tgt, "conservative")
    with dask.config.set(scheduler=scheduler):
        out = regrid(da.chunk({"time": 2}), tgt, "conservative").compute()
    np.testing.assert_array_equal(out.values, ref.values)


def test_horizontal_chunks_are_merged_with_a_warning():
    da = field(global_grid(30, 48), smooth, ntime=2).chunk({"lat": 10, "lon": 16})
    with pytest.warns(PerformanceWarning, match="split into several dask chunks along its horizontal"):
        out = regrid(da, global_grid(45, 60))
    assert out.chunks[1:] == ((45,), (60,))
    np.testing.assert_allclose(out.values, regrid(da.compute(), global_grid(45, 60)).values)


# -- masks and domains --------------------------------------------------------------------------------


def test_bilinear_nan_mask_rule():
    src = regional_grid(np.array([0.0, 1.0, 2.0]), np.array([0.0, 1.0, 2.0, 3.0]))
    da = field(src, lambda la, lo: 10.0 + 0 * la)
    da = da.where(da.lon >= 2)  # "sea" = NaN in columns 0 and 1
    tgt = regional_grid(np.array([0.5, 1.5]), np.array([1.25, 1.5, 1.75, 2.5]))
    out = regrid(da, tgt, "bilinear")  # valid stencil weights: 0.25, 0.5, 0.75, 1
    np.testing.assert_array_equal(np.isnan(out.values), [[True, False, False, False]] * 2)
    np.testing.assert_allclose(out.values[:, 1:], 10.0)  # renormalised over the valid cells
    strict = regrid(da, tgt, "bilinear", mask_threshold=1.0)
    np.testing.assert_array_equal(np.isnan(strict.values), [[True, True, True, False]] * 2)
    loose = regrid(da, tgt, "bilinear", mask_threshold=0.0)
    assert not loose.isnull().any()


def test_conservative_nan_mask_rule_with_a_sea_mask():
    src = regional_grid(np.array([0.5, 1.5]), np.array([0.5, 1.5, 2.5, 3.5]))  # cells 0..2 x 0..4
    da = field(src, lambda la, lo: 1.0 + lo)
    da = da.where(da.lon > 1)  # sea = NaN west of lon 1
    tgt = regional_grid(np.array([0.5, 1.5]), np.array([0.6, 1.4, 2.2, 3.0]))  # cells 0.2-1.0, 1.0-1.8, ...
    out = regrid(da, tgt, "conservative").values[0]
    assert np.isnan(out[0])  # only sea
    np.testing.assert_allclose(out[1], 2.5)  # 1.0-1.8 lies in the land cell 1..2 (value 2.5)
    np.testing.assert_allclose(out[2], (0.2 * 2.5 + 0.6 * 3.5) / 0.8)  # 1.8-2.6
    half = regional_grid(np.array([0.5, 1.5]), np.array([1.0, 2.0]))  # cell 0.5-1.5: half sea, half land
    assert float(regrid(da, half, "conservative", mask_threshold=0.5)[0, 0]) == pytest.approx(2.5)
    assert np.isnan(float(regrid(da, half, "conservative", mask_threshold=0.6)[0, 0]))
    with pytest.raises(InputError, match="needs at least 2 points to define cells"):
        regrid(da, regional_grid(np.array([1.0]), np.array([1.0, 2.0])), "conservative")


def test_regional_source_leaves_outside_target_cells_nan():
    src = regional_grid(np.arange(30.0, 50.1, 2.0), np.arange(-10.0, 10.1, 2.0))  # cells 29..51, -11..11
    tgt = regional_grid(np.arange(25.5, 55.0, 1.0), np.arange(-15.5, 15.0, 1.0))
    for method, (lat0, lat1, lon0, lon1) in (
        ("bilinear", (30, 50, -10, 10)),
        ("conservative", (29, 51, -11, 11)),
    ):
        out = regrid(field(src, smooth), tgt, method)
        inside = (out.lat > lat0) & (out.lat < lat1) & (out.lon > lon0) & (out.lon < lon1)
        np.testing.assert_array_equal(out.notnull().values, inside.transpose("lat", "lon").values)


# -- curvilinear --------------------------------------------------------------------------------------


def test_rotated_pole_source_to_rectilinear_target():
    src = rotated_grid()
    da = xr.DataArray(
        smooth(src.lat.values, src.lon.values), coords=src.coords, dims=("rlat", "rlon"), name="pr"
    )
    da = da.expand_dims(time=2).copy()
    tgt = regional_grid(np.arange(34.0, 46.01, 0.25), np.arange(-9.0, 3.01, 0.25))
    out = regrid(da, tgt)
    assert out.dims == ("time", "lat", "lon") and "rlat" not in out.coords
    err = np.abs(out.isel(time=0) - field(tgt, smooth))
    assert int(err.count()) > 0.9 * err.size  # the target box lies inside the rotated domain
    assert float(err.max()) < 1e-4


def test_rectilinear_source_to_curvilinear_target_and_outside_is_nan():
    src = regional_grid(np.arange(30.0, 50.01, 0.5), np.arange(-12.0, 6.01, 0.5))
    tgt = rotated_grid(nr=61, nc=61, step=0.44)  # reaches beyond the source box
    out = regrid(field(src, smooth), tgt)
    assert out.dims == ("rlat", "rlon") and out.lat.dims == ("rlat", "rlon")
    expected = smooth(tgt.lat.values, tgt.lon.values)
    inside = (tgt.lat > 30.5) & (tgt.lat < 49.5) & (tgt.lon > -11.5) & (tgt.lon < 5.5)
    assert np.isfinite(out.values[inside.values]).all()
    assert np.isnan(out.values[((tgt.lat > 50.5) | (tgt.lon < -12.5)).values]).all()
    assert np.nanmax(np.abs(out.values - expected)) < 1e-4


def test_delaunay_on_a_global_source_covers_the_whole_sphere():
    src, tgt = global_grid(36, 72, lon0=2.5), global_grid(90, 180, lon0=-180.0)
    out = regrid(field(src, smooth), tgt, backend="delaunay")
    assert not out.isnull().any()  # poles and seam included
    assert float(np.abs(out - field(tgt, smooth)).max()) < 0.02


def test_curvilinear_conservative_without_xesmf_is_refused(monkeypatch):
    monkeypatch.setattr(regrid_mod, "_xesmf_available", lambda: False)
    da = xr.DataArray(np.ones((41, 51)), coords=rotated_grid().coords, dims=("rlat", "rlon"))
    with pytest.raises(
        InputError, match=r"needs xESMF.*method='bilinear'.*conda install -c conda-forge xesmf"
    ):
        regrid(da, global_grid(10, 20), "conservative")


# -- backends -----------------------------------------------------------------------------------------


def test_backend_selection(monkeypatch):
    rect, curv = global_grid(10, 20), rotated_grid()
    g = {"rect": regrid_mod.find_grid(rect), "curv": regrid_mod.find_grid(curv)}
    monkeypatch.setattr(regrid_mod, "_xesmf_available", lambda: False)
    assert regrid_mod._choose_backend("auto", "bilinear", g["rect"], g["rect"]) == "separable"
    assert regrid_mod._choose_backend("auto", "bilinear", g["curv"], g["rect"]) == "delaunay"
    assert regrid_mod._choose_backend("auto", "bilinear", g["rect"], g["curv"]) == "delaunay"
    with pytest.raises(InputError, match=r"backend='xesmf' was requested.*conda-forge xesmf"):
        regrid_mod._choose_backend("xesmf", "bilinear", g["curv"], g["rect"])
    monkeypatch.setattr(regrid_mod, "_xesmf_available", lambda: True)
    assert regrid_mod._choose_backend("auto", "bilinear", g["rect"], g["rect"]) == "separable"
    assert regrid_mod._choose_backend("auto", "conservative", g["curv"], g["rect"]) == "xesmf"
    with pytest.raises(InputError, match=r"rectilinear grids only.*source grid is curvilinear"):
        regrid_mod._choose_backend("separable", "bilinear", g["curv"], g["rect"])
    with pytest.raises(InputError, match="backend='delaunay' only interpolates"):
        regrid_mod._choose_backend("delaunay", "conservative", g["rect"], g["rect"])
    with pytest.raises(InputError, match="polar rows"):
        regrid_mod._choose_backend("xarray-regrid", "conservative", g["rect"], g["rect"])


def test_xesmf_request_without_xesmf_raises(monkeypatch):
    monkeypatch.setattr(regrid_mod, "_xesmf_available", lambda: False)
    da = field(global_grid(10, 20), smooth)
    with pytest.raises(InputError, match=r"conda install -c conda-forge xesmf"):
        regrid(da, global_grid(20, 40), backend="xesmf")


def test_xesmf_weights_are_applied_with_our_mask_rule(monkeypatch):
    """The xESMF path only computes weights; stand in for ESMF with the delaunay weights."""
    monkeypatch.setattr(regrid_mod, "_xesmf_available", lambda: True)
    monkeypatch.setattr(regrid_mod, "_CACHE", type(regrid_mod._CACHE)())

    def fake(method, src, tgt, sgrid, tgrid):
        slat, slon = regrid_mod._mesh(src, sgrid)
        tlat, tlon = regrid_mod._mesh(tgt, tgrid)
        return rw.PointWeights.from_matrix(
            rw.sphere_linear_weights(slat, slon, tlat, tlon).matrix, src["shape"], tgt["shape"]
        )

    monkeypatch.setattr(regrid_mod, "_xesmf_weights", fake)
    src = rotated_grid()
    da = xr.DataArray(smooth(src.lat.values, src.lon.values), coords=src.coords, dims=("rlat", "rlon"))
    rg = Regridder(da, regional_grid(np.arange(36.0, 44.0, 0.5), np.arange(-7.0, 1.0, 0.5)))
    assert rg.backend == "xesmf"
    assert np.isfinite(rg(da).values).all()


def test_xesmf_glue_passes_grids_and_reads_scipy_weights(monkeypatch):
    """The xESMF glue with a stand-in module: grids (with corners for conservative) in, weights out."""
    import sys
    import types

    seen = {}

    class FakeRegridder:
        def __init__(self, ds_in, ds_out, method, periodic):
            seen.update(ds_in=ds_in, ds_out=ds_out, method=method, periodic=periodic)
            w = rw.sphere_linear_weights(
                ds_in.lat.values, ds_in.lon.values, ds_out.lat.values, ds_out.lon.values
            )
            self.weights = w.matrix.tocoo()

    monkeypatch.setitem(sys.modules, "xesmf", types.SimpleNamespace(Regridder=FakeRegridder))
    monkeypatch.setattr(regrid_mod, "_CACHE", type(regrid_mod._CACHE)())
    src = rotated_grid()
    da = xr.DataArray(smooth(src.lat.values, src.lon.values), coords=src.coords, dims=("rlat", "rlon"))
    tgt = regional_grid(np.arange(36.0, 44.0, 0.5), np.arange(-7.0, 1.0, 0.5))
    out = regrid(da, tgt, "conservative")  # auto picks xesmf: it can be imported
    assert seen["method"] == "conservative" and seen["periodic"] is False
    assert seen["ds_in"].lat_b.shape == (42, 52) and seen["ds_out"].lon_b.shape == (17, 17)
    np.testing.assert_allclose(seen["ds_out"].lon_b.values[0, :2], [-7.25, -6.75])
    assert np.abs(out - field(tgt, smooth)).max() < 1e-3


def test_xarray_regrid_backend_matches_the_separable_weights():
    da = field(global_grid(30, 48, lon0=3.75), smooth, ntime=2)
    da[:, 3:6, 10:14] = np.nan
    tgt = global_grid(45, 64, lon0=-180.0)
    a = regrid(da, tgt, backend="xarray-regrid")
    b = regrid(da, tgt)
    assert a.dims == b.dims and a.dtype == b.dtype
    np.testing.assert_array_equal(a.isnull().values, b.isnull().values)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-10)


# -- Regridder ----------------------------------------------------------------------------------------


def test_regridder_reuses_weights_across_arrays_and_instances():
    src, tgt = global_grid(30, 48), global_grid(45, 60)
    rg = Regridder(src, tgt, "conservative")
    assert Regridder(src, tgt, "conservative").weights is rg.weights  # cached on coordinate values
    assert "conservative" in repr(rg)
    a = rg(field(src, smooth, ntime=2))
    b = rg(field(src, lambda la, lo: la, name="other"))
    assert a.shape == (2, 45, 60) and b.name == "other"
    ds = xr.Dataset({"a": field(src, smooth), "c": ("time", [1.0, 2.0])}, attrs={"title": "t"})
    out = rg(ds)
    assert set(out.data_vars) == {"a", "c"} and out.attrs == {"title": "t"}
    np.testing.assert_allclose(out["a"].values, rg(field(src, smooth)).values)


def test_cf_bounds_are_used_for_conservative_weights():
    lat = np.array([-60.0, 0.0, 60.0])
    bounds = np.array([[-90.0, -30.0], [-30.0, 30.0], [30.0, 90.0]])
    src = xr.Dataset(
        {"lat_bnds": (("lat", "nv"), bounds)},
        coords={
            "lat": ("lat", lat, {**LAT_ATTRS, "bounds": "lat_bnds"}),
            "lon": ("lon", [0.0, 180.0], LON_ATTRS),
        },
    )
    rg = Regridder(src, global_grid(6, 4), "conservative")
    x = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    out = rg.weights.apply(x)
    # the target band -30..0 lies inside source band -30..30 only (bounds from the file, not midpoints)
    np.testing.assert_allclose(out[2], 2.0)


# -- errors -------------------------------------------------------------------------------------------


def test_target_without_lat_lon_raises():
    da = field(global_grid(10, 20), smooth)
    with pytest.raises(MissingCoordinateError, match="Cannot find the latitude and longitude"):
        regrid(da, xr.Dataset(coords={"a": ("a", [1.0, 2.0]), "b": ("b", [3.0, 4.0])}))


def test_unknown_method_and_backend_raise():
    da = field(global_grid(10, 20), smooth)
    with pytest.raises(
        InputError, match="Unknown regridding method 'nearest'; valid methods are bilinear, conservative"
    ):
        regrid(da, global_grid(20, 40), "nearest")
    with pytest.raises(
        InputError, match="valid backends are auto, separable, delaunay, xesmf, xarray-regrid"
    ):
        regrid(da, global_grid(20, 40), backend="esmf")
    with pytest.raises(InputError, match="mask_threshold must be between 0 and 1"):
        regrid(da, global_grid(20, 40), mask_threshold=1.5)


@pytest.mark.parametrize("method", ["bilinear", "conservative"])
def test_target_outside_the_source_domain_raises(method):
    da = field(regional_grid(np.arange(30.0, 45.0, 1.0), np.arange(-10.0, 5.0, 1.0)), smooth)
    tgt = regional_grid(np.arange(-40.0, -20.0, 0.5), np.arange(100.0, 120.0, 0.5))
    with pytest.raises(
        GridMismatchError, match=r"source lat 30\.\.44, lon -10\.\.4; target lat -40\.\.-20.5"
    ):
        regrid(da, tgt, method)


def test_regridder_refuses_data_on_another_grid():
    rg = Regridder(global_grid(30, 48), global_grid(45, 60))
    with pytest.raises(
        GridMismatchError, match=r"not on the source grid of this Regridder .*shape \(30, 48\)"
    ):
        rg(field(global_grid(31, 48), smooth))


def test_target_dim_clash_raises():
    src = rotated_grid()
    da = xr.DataArray(np.ones((3, 41, 51)), coords=src.coords, dims=("lat_", "rlat", "rlon"))
    tgt = regional_grid(np.arange(36.0, 44.0, 0.5), np.arange(-7.0, 1.0, 0.5), names=("lat_", "lon_"))
    with pytest.raises(InputError, match="already has a dimension named 'lat_'"):
        regrid(da, tgt)


# -- numpy layer --------------------------------------------------------------------------------------


def test_lat_cell_bounds_snap_to_the_poles():
    gauss = np.rad2deg(np.arcsin(np.polynomial.legendre.leggauss(16)[0]))
    b = rw.lat_cell_bounds(gauss)
    assert b[0, 0] == -90.0 and b[-1, 1] == 90.0
    np.testing.assert_allclose(b[1:, 0], b[:-1, 1])
    regional = rw.lat_cell_bounds(np.array([44.0, 42.0, 40.0]))  # descending: per cell, any order
    np.testing.assert_allclose(regional, [[43.0, 45.0], [41.0, 43.0], [39.0, 41.0]])


def test_curvilinear_vertices_of_a_regular_grid_are_midpoints():
    lon, lat = np.meshgrid(np.arange(-10.0, 10.1, 1.0), np.arange(-5.0, 5.1, 1.0))
    vlat, vlon = rw.curvilinear_vertices(lat, lon)
    assert vlat.shape == (12, 22)
    np.testing.assert_allclose(vlon[5], np.arange(-10.5, 10.6, 1.0), atol=1e-3)
    np.testing.assert_allclose(vlat[:, 10], np.arange(-5.5, 5.6, 1.0), atol=1e-2)


def test_weights_apply_checks_the_shape():
    w = rw.separable_weights(
        [0.0, 1.0], [0.0, 1.0], [0.5], [0.5], "bilinear", src_periodic=False, tgt_periodic=False
    )
    with pytest.raises(ValueError, match=r"expected trailing shape \(2, 2\)"):
        w.apply(np.zeros((3, 2)))


def test_barycentric_transforms_match_scipy():
    from scipy.spatial import Delaunay

    tri = Delaunay(np.random.default_rng(1).random((15, 2)))
    np.testing.assert_allclose(
        rw.barycentric_transforms(tri.points, tri.simplices), tri.transform, atol=1e-10
    )


# -- real data (opt-in) -------------------------------------------------------------------------------


@pytest.mark.data
@pytest.mark.parametrize(
    "coarse", ["cmip5_cnrm-cm5_pr_historical_djf1983-2002.nc", "ncep_r1_pr_djf1983-2002.nc"]
)
def test_real_coarse_fields_onto_the_eobs_grid(iberia_dir, coarse):
    pr = xr.open_dataset(iberia_dir / coarse)["pr"].isel(time=slice(0, 60))
    target = xr.open_dataset(iberia_dir / "eobs_0.25deg_tp_djf1991-2000.nc")
    src_lat, src_lon = pr.lat.values, pr.lon.values
    for method in ("bilinear", "conservative"):
        out = regrid(pr, target, method)
        assert out.shape == (60, 41, 61) and out.dtype == np.float32
        np.testing.assert_array_equal(out.lat.values, target.lat.values)
        interior = (
            (out.lat >= src_lat.min())
            & (out.lat <= src_lat.max())
            & (out.lon >= src_lon.min())
            & (out.lon <= src_lon.max())
        )
        assert bool(np.isfinite(out.where(interior, 0.0)).all())
        assert int(interior.sum()) > 0.5 * interior.size
    # conservation: sum over target cells of area * covered fraction * value equals the sum over source
    # cells of area * fraction covered by the target grid * value (exact overlaps on both sides)
    mean = pr.mean("time").astype(np.float64)
    fine = Regridder(pr, target, "conservative")
    back = Regridder(target, pr, "conservative")
    out = fine(mean, mask_threshold=0.0).values

    def areas(lat, lon):
        b = rw.lat_cell_bounds(lat)
        bl = rw.lon_cell_bounds(lon, periodic=False)
        return np.outer(np.sin(np.deg2rad(b[:, 1])) - np.sin(np.deg2rad(b[:, 0])), bl[:, 1] - bl[:, 0])

    lhs = np.nansum(areas(target.lat.values, target.lon.values) * fine.weights.coverage * out)
    rhs = np.sum(areas(src_lat, src_lon) * back.weights.coverage * mean.values)
    assert lhs == pytest.approx(rhs, rel=1e-6)
