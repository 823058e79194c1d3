"""The domain adapter (``xdownscale.xr.domain``) on its own: no model, no torch."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr

from xdownscale.datasets import regional_grid
from xdownscale.errors import (
    ChunkingError,
    GridMismatchError,
    InputError,
    PerformanceWarning,
    XDownscaleWarning,
)
from xdownscale.xr.cf import find_grid
from xdownscale.xr.domain import (
    allow_partial_coverage,
    cut_to_domain,
    degree_spacing,
    domain_centre_lon,
    fill_nan_nearest,
    pad_edges,
    partial_coverage_allowed,
    rechunk_horizontal,
    squeeze_extra_dims,
    uncovered_fraction,
    wrap_to_domain,
)

LAT = {"standard_name": "latitude", "units": "degrees_north"}
LON = {"standard_name": "longitude", "units": "degrees_east"}


def _field(lat: np.ndarray, lon: np.ndarray, ntime: int = 2) -> xr.DataArray:
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    values = np.stack([np.sin(np.deg2rad(la) * 5 + t) * np.cos(np.deg2rad(lo) * 3) for t in range(ntime)])
    return xr.DataArray(
        values,
        dims=("time", "lat", "lon"),
        coords={
            "time": xr.date_range("2000-01-01", periods=ntime, freq="D"),
            "lat": ("lat", lat, LAT),
            "lon": ("lon", lon, LON),
        },
        name="pr",
    )


@pytest.fixture
def greenwich_target() -> xr.Dataset:
    """A 0.25-degree model domain across the Greenwich meridian (3 W .. 3 E), with a masked corner."""
    grid = regional_grid(12, 24, lat0=40.0, lon0=-3.0)
    mask = np.ones((12, 24), dtype=bool)
    mask[:3, :3] = False
    return grid.assign(mask=(("lat", "lon"), mask))


def test_centre_longitude_across_greenwich_and_the_dateline(greenwich_target):
    assert domain_centre_lon(greenwich_target) == pytest.approx(0.0)
    pacific = regional_grid(4, 40, lat0=0.0, lon0=175.0)  # 175 E .. 175 W
    assert domain_centre_lon(pacific) == pytest.approx(180.0) or domain_centre_lon(pacific) == pytest.approx(
        -180.0
    )


def test_spacing_of_a_0_360_axis_cut_across_greenwich():
    ds = _field(np.array([40.0, 41.0, 42.0]), np.array([0.0, 2.0, 4.0, 354.0, 356.0, 358.0]))
    assert degree_spacing(ds, find_grid(ds)) == (1.0, 2.0)


@pytest.mark.parametrize("sort", [True, False])
def test_0_360_input_is_cut_like_the_same_data_in_minus180_180(greenwich_target, sort):
    lon = np.arange(-10.0, 10.1, 1.0)
    ref = _field(np.arange(37.0, 47.1, 1.0), lon)
    cmip = ref.assign_coords(lon=("lon", lon % 360.0, LON))
    if sort:
        cmip = cmip.sortby("lon")
    grid = find_grid(cmip)
    out = cut_to_domain(cmip, grid, greenwich_target)
    expected = cut_to_domain(ref, find_grid(ref), greenwich_target)
    xr.testing.assert_identical(out, expected)
    assert np.all(np.diff(out["lon"].values) > 0) and out["lon"].values[0] < -3 < 3 < out["lon"].values[-1]


def test_wrap_keeps_values_inside_the_window_bit_identical():
    lon = np.array([-14.1, -0.3, 0.1, 4.7])
    ref = _field(np.array([40.0, 41.0]), lon)
    out = wrap_to_domain(ref, find_grid(ref), centre=0.0)
    np.testing.assert_array_equal(out["lon"].values, lon)
    desc = ref.isel(lat=slice(None, None, -1))
    assert wrap_to_domain(desc, find_grid(desc), 0.0)["lat"].values.tolist() == [40.0, 41.0]


def test_coverage_is_checked_in_longitude_and_latitude(greenwich_target):
    west = _field(np.arange(37.0, 47.1, 1.0), np.arange(-10.0, 1.1, 1.0))
    with pytest.raises(
        GridMismatchError, match=r"'pr' covers lat 37\.00\.\.47\.00, lon -10\.00\.\.1\.00.*% of the"
    ):
        cut_to_domain(west, find_grid(west), greenwich_target)
    south = _field(np.arange(37.0, 41.1, 1.0), np.arange(-10.0, 10.1, 1.0))
    with pytest.raises(GridMismatchError, match="allow_partial_coverage"):
        cut_to_domain(south, find_grid(south), greenwich_target)
    with allow_partial_coverage():
        assert partial_coverage_allowed()
        with pytest.warns(XDownscaleWarning, match=r"\d+\.\d% of the model's cells lie outside the input"):
            cut_to_domain(west, find_grid(west), greenwich_target)
    assert not partial_coverage_allowed()
    with pytest.warns(XDownscaleWarning, match="come back NaN"):
        cut_to_domain(west, find_grid(west), greenwich_target, partial=True)


def test_uncovered_fraction_counts_only_the_models_own_cells(greenwich_target):
    # input ends exactly where the masked corner (3x3 cells at the south-west) begins to matter
    da = _field(np.arange(40.125, 43.0, 0.25), np.arange(-2.375, 3.0, 0.25))
    grid = find_grid(da)
    fraction = uncovered_fraction(da, grid, greenwich_target)
    total = int(greenwich_target["mask"].sum())
    # the two missing columns (-2.875, -2.625) and one missing row (40.125 is present) minus masked cells
    lon_t = greenwich_target["lon"].values
    missing = np.zeros((12, 24), dtype=bool)
    missing[:, lon_t < -2.375] = True
    assert fraction == pytest.approx((missing & greenwich_target["mask"].values).sum() / total)


def test_pad_edges_rectilinear_and_curvilinear():
    rect = _field(np.array([40.0, 41.0, 42.0]), np.array([0.0, 1.5, 3.0]))
    padded = pad_edges(rect, find_grid(rect))
    assert padded["lat"].values.tolist() == [39.0, 40.0, 41.0, 42.0, 43.0]
    assert padded["lon"].values.tolist() == [-1.5, 0.0, 1.5, 3.0, 4.5]
    la, lo = xr.broadcast(rect["lat"], rect["lon"])
    curv = rect.rename(lat="y", lon="x").assign_coords(
        lat=(("y", "x"), la.values, LAT), lon=(("y", "x"), lo.values, LON)
    )
    cp = pad_edges(curv, find_grid(curv))
    np.testing.assert_allclose(cp["lat"].values[:, 0], [39.0, 40.0, 41.0, 42.0, 43.0])
    np.testing.assert_allclose(cp["lon"].values[0], [-1.5, 0.0, 1.5, 3.0, 4.5])
    np.testing.assert_array_equal(cp.values[:, 0, 0], rect.values[:, 0, 0])


def test_fill_nan_nearest_eager_lazy_and_all_nan_fields():
    da = _field(np.arange(40.0, 45.0), np.arange(0.0, 6.0), ntime=3)
    da[:, :, :2] = np.nan  # "sea" in the two western columns
    da[2] = np.nan  # a missing day
    grid = find_grid(da)
    eager = fill_nan_nearest(da, grid)
    np.testing.assert_array_equal(eager.values[:2, :, 0], da.values[:2, :, 2])
    assert np.isnan(eager.values[2]).all()
    lazy = fill_nan_nearest(da.chunk({"time": 1}), grid)
    assert lazy.chunks is not None
    np.testing.assert_array_equal(lazy.values, eager.values)


def test_rechunk_horizontal_warns_only_when_asked():
    da = _field(np.arange(40.0, 45.0), np.arange(0.0, 6.0)).chunk({"lat": 2})
    grid = find_grid(da)
    with pytest.warns(PerformanceWarning, match=r"Chunk along time only instead: da\.chunk"):
        rechunk_horizontal(da, grid)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = rechunk_horizontal(da, grid, warn=False)
    assert len(out.chunks[1]) == 1
    with pytest.raises(ChunkingError, match=r"'pr' is chunked along .* too large to become one chunk"):
        rechunk_horizontal(da, grid, max_field_bytes=8)


def test_squeeze_extra_dims_rules():
    da = _field(np.arange(40.0, 43.0), np.arange(0.0, 3.0))
    grid = find_grid(da)
    out = squeeze_extra_dims(da.expand_dims(height=[2.0]), grid, "time")
    assert out.dims == ("time", "lat", "lon") and float(out["height"]) == 2.0
    out = squeeze_extra_dims(da.expand_dims(member=["r1"]), grid, "time")
    assert "member" not in out.coords and str(out["realization"].values) == "r1"
    with pytest.raises(
        InputError,
        match=r"'pr' has the extra dimension\(s\) 'realization' \(length 2\) \(the input's 'member'",
    ):
        squeeze_extra_dims(da.expand_dims(member=["r1", "r2"]), grid, "time")
