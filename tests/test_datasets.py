"""Synthetic fields of xdownscale.datasets: shapes, determinism, dryness, spectral slope."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from xdownscale.datasets import (
    coarsen_like_esm,
    gaussian_random_field,
    global_grid,
    regional_grid,
    synthetic_precipitation,
    synthetic_temperature,
)
from xdownscale.errors import InputError
from xdownscale.xr.cf import find_grid, find_time


def radial_spectrum(fields: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged |FFT|^2 of square periodic fields, k in cycles per cell (integer rings)."""
    n = fields.shape[-1]
    power = (np.abs(np.fft.fft2(fields)) ** 2).mean(axis=0)
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n), indexing="ij"))
    ring = np.rint(k * n).astype(int)
    rings = np.arange(1, n // 2)
    return rings / n, np.array([power[ring == r].mean() for r in rings])


@pytest.mark.parametrize("slope", [0.0, 2.0, 3.0, 4.0])
def test_grf_recovers_spectral_slope(slope):
    k, p = radial_spectrum(gaussian_random_field((64, 64), slope=slope, ntime=16, seed=3))
    fitted = np.polyfit(np.log(k), np.log(p), 1)[0]
    assert fitted == pytest.approx(-slope, abs=0.25)


def test_grf_shape_variance_determinism():
    f = gaussian_random_field((20, 30), ntime=3, seed=5, variance=4.0)
    assert f.shape == (3, 20, 30) and f.dtype == np.float64
    np.testing.assert_allclose(f.mean(axis=(1, 2)), 0.0, atol=1e-12)
    np.testing.assert_allclose(f.var(axis=(1, 2)), 4.0)
    np.testing.assert_array_equal(f, gaussian_random_field((20, 30), ntime=3, seed=5, variance=4.0))
    assert not np.allclose(f, gaussian_random_field((20, 30), ntime=3, seed=6, variance=4.0))
    assert gaussian_random_field((8, 8), ntime=None).shape == (8, 8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": (1, 8)}, r"shape must be at least \(2, 2\)"),
        ({"ntime": 0}, "ntime must be >= 1"),
        ({"variance": -1.0}, "variance must be >= 0"),
    ],
)
def test_grf_errors(kwargs, match):
    with pytest.raises(InputError, match=match):
        gaussian_random_field(**kwargs)


def test_regional_grid_cf_and_corner():
    g = regional_grid(4, 6, lat0=34.0, lon0=-10.0, res=0.5)
    np.testing.assert_allclose(g.lat, [34.25, 34.75, 35.25, 35.75])
    np.testing.assert_allclose(g.lon[[0, -1]], [-9.75, -7.25])
    assert g.lat.attrs["standard_name"] == "latitude" and g.lon.attrs["units"] == "degrees_east"
    grid = find_grid(g)
    assert (grid.lat, grid.lon, grid.periodic) == ("lat", "lon", False)
    with pytest.raises(InputError, match=r"leave \[-90, 90\]"):
        regional_grid(10, 4, lat0=88.0, res=1.0)
    with pytest.raises(InputError, match="need ny, nx >= 1 and res > 0"):
        regional_grid(0, 4)


def test_global_grid_periodic_both_conventions():
    g = global_grid(2.5)
    assert g.sizes == {"lat": 72, "lon": 144}
    assert find_grid(g).periodic
    g180 = global_grid(2.5, lon0=-180.0)
    assert float(g180.lon.min()) == -178.75 and find_grid(g180).periodic
    with pytest.raises(InputError, match="180 must be a multiple of res_deg"):
        global_grid(0.7)


def test_synthetic_precipitation_properties():
    pr = synthetic_precipitation()
    assert pr.dims == ("time", "lat", "lon") and pr.shape == (90, 32, 48)
    assert pr.dtype == np.float32 and pr.name == "pr"
    assert pr.attrs["units"] == "mm/day" and pr.attrs["standard_name"] == "lwe_precipitation_rate"
    values = pr.values
    assert (values >= 0).all()
    assert 0.55 < (values == 0).mean() < 0.65
    wet = values[values > 0]
    assert np.mean(wet) > np.median(wet) * 1.3  # skewed
    assert (values == 0).all(axis=(1, 2)).any() or (values == 0).mean(axis=(1, 2)).max() > 0.9  # dry days
    # spatially correlated: neighbours agree on wet/dry far more often than chance
    wet_mask = values > 0
    assert (wet_mask[:, :, 1:] == wet_mask[:, :, :-1]).mean() > 0.85
    # wetter in the north (the climatology factor)
    profile = pr.mean(("time", "lon")).values
    assert profile[-4:].mean() > profile[:4].mean()
    assert find_time(pr) == "time" and find_grid(pr).lat == "lat"


def test_synthetic_precipitation_deterministic_and_seeded():
    a = synthetic_precipitation(ny=8, nx=8, ntime=10, seed=4)
    xr.testing.assert_identical(a, synthetic_precipitation(ny=8, nx=8, ntime=10, seed=4))
    assert not np.array_equal(a.values, synthetic_precipitation(ny=8, nx=8, ntime=10, seed=5).values)


def test_synthetic_precipitation_units_and_mask():
    mm = synthetic_precipitation(ny=8, nx=12, ntime=5)
    flux = synthetic_precipitation(ny=8, nx=12, ntime=5, units="kg m-2 s-1")
    assert flux.attrs["standard_name"] == "precipitation_flux"
    np.testing.assert_allclose(flux.values * 86400, mm.values, rtol=1e-6)
    totals = synthetic_precipitation(ny=8, nx=12, ntime=5, units="mm")
    assert totals.attrs["standard_name"] == "lwe_thickness_of_precipitation_amount"
    masked = synthetic_precipitation(ny=32, nx=48, ntime=5, mask=True)
    sea = np.isnan(masked.values)
    assert (sea == sea[0]).all()  # the same cells every day
    assert 0.05 < sea[0].mean() < 0.35
    assert sea[0, :, 0].all() and not sea[0, :, -1].any()  # west coast
    np.testing.assert_array_equal(
        masked.values[~sea], synthetic_precipitation(ny=32, nx=48, ntime=5).values[~sea]
    )
    with pytest.raises(InputError, match="units 'inch' are not offered"):
        synthetic_precipitation(units="inch")


@pytest.mark.parametrize("calendar", ["noleap", "360_day"])
def test_synthetic_calendars(calendar):
    pr = synthetic_precipitation(ny=4, nx=4, ntime=40, calendar=calendar, start="2001-02-20")
    assert pr.time.values[0].calendar == calendar
    assert find_time(pr) == "time"
    if calendar == "360_day":
        assert pr.time.values[10].day == 30  # 2001-02-30 exists in a 360-day year


def test_synthetic_temperature():
    tas = synthetic_temperature(ny=16, nx=16, ntime=20)
    assert tas.name == "tas" and tas.attrs["units"] == "K" and tas.attrs["standard_name"] == "air_temperature"
    assert tas.dtype == np.float32
    assert 278 < float(tas.mean()) < 288
    profile = tas.mean(("time", "lon")).values
    assert profile[0] > profile[-1]  # colder in the north
    degc = synthetic_temperature(ny=16, nx=16, ntime=20, units="degC")
    np.testing.assert_allclose(degc.values + 273.15, tas.values, atol=1e-4)
    assert np.isnan(synthetic_temperature(ny=16, nx=16, ntime=2, mask=True).values).any()
    with pytest.raises(InputError, match="use 'K' or 'degC'"):
        synthetic_temperature(units="degF")


def test_coarsen_like_esm_block_means():
    pr = synthetic_precipitation(ny=8, nx=12, ntime=3)
    coarse = coarsen_like_esm(pr, factor=4)
    assert coarse.shape == (3, 2, 3)
    np.testing.assert_allclose(coarse.values[:, 1, 2], pr.values[:, 4:8, 8:12].mean(axis=(1, 2)), rtol=1e-5)
    # the coarse cell centres are the block means of the fine ones (regional_grid's corner convention)
    np.testing.assert_allclose(coarse.lat, [34.5, 35.5])
    np.testing.assert_allclose(coarse.lon, [-9.5, -8.5, -7.5])
    assert coarse.attrs["units"] == "mm/day"
    fine = synthetic_precipitation(ny=32, nx=48, ntime=2, mask=True)
    masked = coarsen_like_esm(fine, factor=4)
    all_sea = np.isnan(fine.values[0]).reshape(8, 4, 12, 4).all(axis=(1, 3))
    np.testing.assert_array_equal(np.isnan(masked.values[0]), all_sea)  # NaN only where no land at all
    assert 0 < all_sea.sum() < np.isnan(fine.values[0]).reshape(8, 4, 12, 4).any(axis=(1, 3)).sum()
