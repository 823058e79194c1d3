"""Power spectra, scale selection, low-pass filter and block averaging (core and xarray layers)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dask
import dask.array as dsa
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from xdownscale.core import spectra as core
from xdownscale.errors import GridMismatchError, InputError, PerformanceWarning
from xdownscale.xr.spectra import Scale, lowpass, psd, select_scale, upscale

LAT_ATTRS = {"standard_name": "latitude", "units": "degrees_north"}
LON_ATTRS = {"standard_name": "longitude", "units": "degrees_east"}
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "iberia"


def on_grid(
    values: np.ndarray, *, regional: bool = True, name: str = "pr", units: str | None = "mm/day"
) -> xr.DataArray:
    """(time, lat, lon) or (lat, lon) DataArray: regional 0.25 deg box or a global grid."""
    ny, nx = values.shape[-2:]
    if regional:
        lat = 34.0 + 0.25 * np.arange(ny)
        lon = -10.0 + 0.25 * np.arange(nx)
    else:
        lat = -90 + 180 / ny * (np.arange(ny) + 0.5)
        lon = 360 / nx * np.arange(nx)
    dims = ("lat", "lon") if values.ndim == 2 else ("time", "lat", "lon")
    coords = {"lat": ("lat", lat, LAT_ATTRS), "lon": ("lon", lon, LON_ATTRS)}
    if values.ndim == 3:
        coords["time"] = ("time", np.arange(values.shape[0]))
    attrs = {"units": units, "long_name": "test field"} if units else {"long_name": "test field"}
    return xr.DataArray(values, dims=dims, coords=coords, name=name, attrs=attrs)


def power_law_fields(n: int, shape: tuple[int, int], spectrum, seed: int) -> np.ndarray:
    """Gaussian random fields whose radial PSD is ``spectrum(k)`` (in the normalisation of radial_psd)."""
    h, w = shape
    rng = np.random.default_rng(seed)
    k = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.fftfreq(w)[None, :] ** 2)
    amp = np.zeros_like(k)
    amp[k > 0] = np.sqrt(spectrum(k[k > 0]))
    white = rng.standard_normal((n, h, w))
    # FFT of unit white noise has E|X|^2 = H W; P2 = |X|^2/(HW)^2 must be spectrum(k).
    return np.real(np.fft.ifft2(np.fft.fft2(white) * amp * math.sqrt(h * w)))


def no_compute(dsk, keys, **kwargs):  # a dask scheduler that fails: proves laziness
    raise AssertionError("dask computed before .compute()")


# ---------------------------------------------------------------------------------------------- PSD
def test_white_noise_psd_is_flat_at_s2_over_cells():
    s, shape = 1.7, (48, 64)
    x = np.random.default_rng(1).normal(0.0, s, (300, *shape))
    k, p = core.radial_psd(x)
    assert k[0] == pytest.approx(1 / 48) and k[-1] == pytest.approx(0.5) and k.size == 24
    level = s**2 / (48 * 64)
    mean = p.mean(axis=0)
    np.testing.assert_allclose(mean, level, rtol=0.08)
    assert mean.mean() == pytest.approx(level, rel=0.02)


@pytest.mark.parametrize("window", ["hann", ("tukey", 0.3), "blackman"])
def test_window_is_power_compensated(window):
    s, shape = 0.5, (40, 40)
    x = np.random.default_rng(2).normal(3.0, s, (300, *shape))
    _, p = core.radial_psd(x, window=window)
    assert p.mean() == pytest.approx(s**2 / 1600, rel=0.03)


def test_psd_of_a_sine_is_a_spike_with_its_power():
    h, w = 32, 32
    x = 2.0 * np.cos(2 * np.pi * 4 * np.arange(w) / w)[None, :] * np.ones((h, 1))
    _, p = core.radial_psd(x)
    assert np.argmax(p) == 3  # k = 4/32
    # the power A^2/2 = 2 of the wave sits in its annulus: PSD * (coefficients in the annulus) = 2
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.fftfreq(w)[None, :]
    members = np.rint(np.sqrt(kx**2 + ky**2) * 32) == 4
    assert p[3] * members.sum() == pytest.approx(2.0)


@settings(max_examples=25, deadline=None)
@given(
    scale=st.floats(0.1, 100.0),
    offset=st.floats(-100.0, 100.0),
    ny=st.integers(4, 24),
    nx=st.integers(4, 24),
)
def test_psd_scales_with_square_and_ignores_offsets(scale, offset, ny, nx):
    x = np.random.default_rng(ny * 100 + nx).normal(size=(ny, nx))
    _, p = core.radial_psd(x)
    _, q = core.radial_psd(scale * x + offset)
    np.testing.assert_allclose(q, scale**2 * p, rtol=1e-6, atol=1e-12 * scale**2)


def test_psd_is_batched_over_leading_dims():
    x = np.random.default_rng(3).normal(size=(2, 3, 16, 20))
    k, p = core.radial_psd(x)
    assert p.shape == (2, 3, k.size)
    np.testing.assert_allclose(p[1, 2], core.radial_psd(x[1, 2])[1])


def test_masked_field_gives_finite_spectrum_close_to_unmasked_at_large_scales():
    shape = (64, 64)
    fields = power_law_fields(40, shape, lambda k: 1e-3 * k**-2.5, seed=4)
    yy, xx = np.mgrid[0:64, 0:64]
    land = (xx - 6) ** 2 / 34**2 + (yy - 30) ** 2 / 26**2 < 1  # a blob, ~42% of the cells
    assert 0.35 < land.mean() < 0.45
    masked = np.where(land, np.nan, fields)
    k, full = core.radial_psd(fields)
    _, part = core.radial_psd(masked)
    assert np.isfinite(part).all()
    ratio = part.mean(0) / full.mean(0)
    large = k <= 0.1
    np.testing.assert_allclose(ratio[large], 1.0, atol=0.3)
    # white noise on the valid cells keeps its level everywhere
    noise = np.where(land, np.nan, np.random.default_rng(5).normal(0, 2.0, (200, *shape)))
    _, pn = core.radial_psd(noise)
    assert pn.mean() == pytest.approx(4.0 / 4096, rel=0.03)


def test_all_nan_field_gives_nan_not_an_error():
    x = np.full((2, 8, 8), np.nan)
    x[1] = np.random.default_rng(0).normal(size=(8, 8))
    _, p = core.radial_psd(x)
    assert np.isnan(p[0]).all() and np.isfinite(p[1]).all()


def test_radial_psd_errors():
    with pytest.raises(InputError, match=r"shape \(\.\.\., H, W\).*got shape \(5,\)"):
        core.radial_psd(np.zeros(5))
    with pytest.raises(InputError, match="Unknown window 'nope'"):
        core.radial_psd(np.zeros((4, 4)), window="nope")


def test_psd_dataarray_dims_coords_attrs():
    x = np.random.default_rng(6).normal(size=(5, 24, 32))
    da = on_grid(x, regional=True)
    p = psd(da)
    assert p.dims == ("time", "wavenumber")
    np.testing.assert_array_equal(p["time"], da["time"])
    assert p.attrs["n_cells"] == 24 * 32
    assert p.attrs["units"] == "(mm/day)**2"
    assert "n_cells" in p.attrs["normalisation"]
    dy = 0.25 * math.pi * 6371 / 180
    dx = dy * np.cos(np.deg2rad(da.lat.values)).mean()
    assert p.attrs["spacing_km"] == pytest.approx(math.sqrt(dy * dx), rel=1e-6)
    np.testing.assert_allclose(p["wavelength_km"], p.attrs["spacing_km"] / p["wavenumber"])
    np.testing.assert_allclose(p.values, core.radial_psd(x)[1])
    assert psd(on_grid(x, units=None)).attrs["units"] == "1"


def test_psd_is_lazy_and_warns_when_fields_are_split():
    da = on_grid(np.random.default_rng(7).normal(size=(6, 16, 16)))
    with dask.config.set(scheduler=no_compute):
        lazy = psd(da.chunk({"time": 2}))
    assert isinstance(lazy.data, dsa.Array)
    xr.testing.assert_allclose(lazy.compute(), psd(da))
    with pytest.warns(PerformanceWarning, match="rechunking to one chunk"):
        split = psd(da.chunk({"time": 3, "lat": 8}))
    xr.testing.assert_allclose(split.compute(), psd(da))


# ---------------------------------------------------------------------------------------------- Scale
@pytest.fixture(scope="module")
def white_psd():
    s = 0.47
    da = on_grid(np.random.default_rng(8).normal(0, s, (200, 32, 32)))
    return s, psd(da)


def test_white_noise_maps_back_to_its_sigma(white_psd):
    s, p = white_psd
    for k in (0.05, 0.2, 0.45):
        assert Scale.from_wavenumber(k, psd=p).sigma == pytest.approx(s, rel=0.04)
    # sigma a bit above the flat level: the spectrum is below it from the first bin on -> error
    with pytest.raises(
        InputError, match=r"sigma=0\.6 is outside the range of the reference PSD.*valid values"
    ):
        Scale.from_sigma(0.6, psd=p)


@pytest.fixture(scope="module")
def red_psd():
    da = on_grid(power_law_fields(30, (64, 64), lambda k: 1e-4 * k**-2.0, seed=9))
    return psd(da)


def test_sigma_and_wavenumber_round_trip(red_psd):
    for k in (0.03, 0.0667, 0.2):
        scale = Scale.from_wavenumber(k, psd=red_psd)
        expected = math.sqrt(4096 * 1e-4 * k**-2.0)
        assert scale.sigma == pytest.approx(expected, rel=0.15)
        back = Scale.from_sigma(scale.sigma, psd=red_psd)
        assert back.wavenumber == pytest.approx(k, rel=0.02)
        assert back.sigma == scale.sigma
        assert back.wavelength_km == pytest.approx(red_psd.attrs["spacing_km"] / back.wavenumber)
    assert Scale.parse("sigma=2", psd=red_psd).wavenumber == pytest.approx(
        Scale.from_sigma(2.0, psd=red_psd).wavenumber
    )
    with pytest.raises(InputError, match=r"sigma=100 is outside .*valid values are in \["):
        Scale.from_sigma(100.0, psd=red_psd)
    with pytest.raises(InputError, match=r"sigma=0\.5 is outside"):
        Scale.from_sigma(0.5, psd=red_psd)


def test_km_wavenumber_round_trip():
    for km in (55.0, 150.0, 1234.5):
        scale = Scale.from_km(km, spacing_km=25.0)
        assert scale.wavenumber == pytest.approx(25.0 / km)
        again = Scale.from_wavenumber(scale.wavenumber, spacing_km=25.0)
        assert again.wavelength_km == pytest.approx(km)
    assert Scale.from_km(50.0, spacing_km=25.0).wavenumber == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("150 km", Scale(25.0 / 150, 150.0)),
        ("150km", Scale(25.0 / 150, 150.0)),
        (" 1.5e2 KM ", Scale(25.0 / 150, 150.0)),
        ("0.0667", Scale(0.0667, 25.0 / 0.0667)),
        ("k=0.0667", Scale(0.0667, 25.0 / 0.0667)),
        (0.0667, Scale(0.0667, 25.0 / 0.0667)),
        ("sigma=0.47", Scale(None, None, 0.47)),
        (Scale(0.1), Scale(0.1, 250.0)),
        ({"wavenumber": 0.1, "wavelength_km": None, "sigma": 2.0}, Scale(0.1, 250.0, 2.0)),
    ],
)
def test_parse(value, expected):
    got = Scale.parse(value, spacing_km=25.0)
    assert got.wavenumber == pytest.approx(expected.wavenumber)
    assert got.wavelength_km == pytest.approx(expected.wavelength_km)
    assert got.sigma == expected.sigma


def test_parse_errors():
    with pytest.raises(InputError, match=r"Cannot read the scale '150 miles'.*'150 km'.*'sigma=0.47'"):
        Scale.parse("150 miles")
    with pytest.raises(InputError, match="'auto' is resolved from two power spectra"):
        Scale.parse("auto")
    with pytest.raises(InputError, match=r"Cannot read a scale from list"):
        Scale.parse([0.1])
    with pytest.raises(InputError, match=r"Cannot read a scale from bool"):
        Scale.parse(True)
    with pytest.raises(InputError, match=r"Wavenumber 0\.0 is outside the valid range \(0, 0\.5\]"):
        Scale.parse(0.0)
    with pytest.raises(InputError, match=r"Wavenumber 0\.7 is outside the valid range \(0, 0\.5\]"):
        Scale.from_wavenumber(0.7)
    with pytest.raises(InputError, match=r"30 km is below two grid cells: .* 25 km, .* >= 50 km"):
        Scale.from_km(30.0, spacing_km=25.0)
    with pytest.raises(InputError, match="Cannot turn 150 km into a wavenumber without the grid spacing"):
        Scale.parse("150 km")
    with pytest.raises(InputError, match="sigma must be a positive"):
        Scale.parse("sigma=-1")
    with pytest.raises(InputError, match="needs a wavenumber or a sigma"):
        Scale(None)
    with pytest.raises(InputError, match="spacing_km must be a positive grid spacing"):
        Scale.from_km(100.0, spacing_km=0.0)
    with pytest.raises(InputError, match=r"Unknown keys \['k'\] for a Scale"):
        Scale.from_dict({"k": 0.1})
    with pytest.raises(InputError, match="must be a power spectrum as returned by"):
        Scale.from_sigma(0.5, psd=xr.DataArray(np.ones(3), dims="k"))
    with pytest.raises(InputError, match="has no attribute 'n_cells'"):
        Scale.from_sigma(0.5, psd=xr.DataArray(np.ones(3), dims="wavenumber"))


def test_scale_dict_round_trip_and_with_psd(red_psd):
    scale = Scale.from_km(800.0, psd=red_psd)
    assert scale.sigma is not None and scale.wavelength_km == 800.0
    assert Scale.from_dict(json.loads(json.dumps(scale.to_dict()))) == scale
    filled = Scale.parse("sigma=2.5").with_psd(red_psd)
    assert filled.wavenumber is not None and filled.sigma == 2.5
    assert Scale(0.1).with_psd(red_psd) == Scale.from_wavenumber(0.1, psd=red_psd)
    assert "k=0.1 cycles/cell" in str(Scale(0.1, None, 0.3)) and "sigma=0.3" in str(Scale(0.1, None, 0.3))
    with pytest.raises(Exception, match="cannot assign"):
        scale.sigma = 1.0  # frozen


# ---------------------------------------------------------------------------------------------- select_scale
def test_select_scale_recovers_a_planted_crossing():
    shape, k0 = (64, 64), 0.1
    fine = power_law_fields(60, shape, lambda k: 1e-3 * (k / k0) ** -2.0, seed=10)
    coarse = power_law_fields(60, shape, lambda k: 1e-3 * (k / k0) ** -4.0, seed=11)
    p_fine, p_coarse = psd(on_grid(fine)), psd(on_grid(coarse))
    scale = select_scale(p_fine, p_coarse)
    assert abs(scale.wavenumber - k0) <= 1 / 64
    expected = math.sqrt(
        4096 * core.interp_loglog(scale.wavenumber, p_fine.wavenumber.values, p_fine.mean("time").values)
    )
    assert scale.sigma == pytest.approx(expected)
    assert scale.sigma == pytest.approx(math.sqrt(4096 * 1e-3), rel=0.2)
    assert scale.wavelength_km == pytest.approx(p_fine.attrs["spacing_km"] / scale.wavenumber)


def test_select_scale_errors(red_psd):
    with pytest.raises(
        InputError, match=r"never falls below the fine one.*ratio 2 at the largest.*pass scale="
    ):
        select_scale(red_psd, red_psd * 2)
    with pytest.raises(InputError, match=r"lies below the fine one at every scale .*qdm=True.*pass scale="):
        select_scale(red_psd, red_psd / 2)
    with pytest.raises(InputError, match=r"no bin where both are finite"):
        select_scale(red_psd, red_psd * 0)
    other = psd(on_grid(np.random.default_rng(0).normal(size=(2, 32, 48))))
    with pytest.raises(
        GridMismatchError, match=r"psd_fine \(32 wavenumber bins, 4096 cells\) and psd_coarse \(16"
    ):
        select_scale(red_psd, other)
    with pytest.raises(InputError, match="psd_coarse must be a power spectrum"):
        select_scale(red_psd, red_psd.values)


# ---------------------------------------------------------------------------------------------- lowpass
def test_lowpass_keeps_only_the_long_wave_on_a_periodic_grid():
    ny, nx = 32, 64
    x = np.arange(nx)
    long = np.sin(2 * np.pi * 2 * x / nx)
    short = 0.5 * np.cos(2 * np.pi * 20 * x / nx)
    da = on_grid(np.broadcast_to(long + short, (3, ny, nx)).astype("float32").copy(), regional=False)
    out = lowpass(da, 0.1)
    np.testing.assert_allclose(out.values, np.broadcast_to(long, (3, ny, nx)), atol=1e-5)
    assert out.dtype == np.float32 and out.dims == da.dims and out.attrs == da.attrs
    xr.testing.assert_identical(out.coords.to_dataset(), da.coords.to_dataset())
    # both axes periodic in the core function: exact in 2-D too
    yy, xx = np.mgrid[0:ny, 0:nx]
    f = np.sin(2 * np.pi * (xx / nx + yy / ny)) + np.sin(2 * np.pi * (15 * xx / nx + 8 * yy / ny))
    got = core.lowpass_filter(f, 0.1, periodic=(True, True))
    np.testing.assert_allclose(got, np.sin(2 * np.pi * (xx / nx + yy / ny)), atol=1e-12)


def test_lowpass_identity_above_the_corner_wavenumber():
    da = on_grid(np.random.default_rng(12).normal(size=(2, 16, 16)))
    xr.testing.assert_identical(lowpass(da, 0.5 * math.sqrt(2)), da)
    # just below the corner, only the corner coefficients go
    assert not np.array_equal(core.lowpass_filter(da.values, 0.7, periodic=(True, True)), da.values)


def test_lowpass_regional_grid_has_no_edge_ringing():
    ny, nx = 40, 60
    yy, xx = np.mgrid[0:ny, 0:nx]
    ramp = 10.0 + 0.1 * xx + 0.05 * yy  # smooth but not periodic: an FFT would ring at the edges
    out = lowpass(on_grid(ramp), 0.1)
    assert np.abs(out.values - ramp).max() < 0.02 * np.ptp(ramp)
    periodic = core.lowpass_filter(ramp, 0.1, periodic=(True, True))
    assert np.abs(periodic - ramp).max() > 0.05 * np.ptp(ramp)


def test_lowpass_restores_nan_and_is_lazy():
    x = np.random.default_rng(13).normal(size=(4, 20, 24))
    x[:, :5, :7] = np.nan
    da = on_grid(x)
    out = lowpass(da, "200 km")
    assert np.array_equal(np.isnan(out.values), np.isnan(x))
    assert np.isfinite(out.values[~np.isnan(x)]).all()
    with dask.config.set(scheduler=no_compute):
        lazy = lowpass(da.chunk({"time": 1}), 0.1)
    assert isinstance(lazy.data, dsa.Array)
    xr.testing.assert_allclose(lazy.compute(), lowpass(da, 0.1))
    transposed = lowpass(da.transpose("lon", "time", "lat"), 0.1)
    assert transposed.dims == ("lon", "time", "lat")
    xr.testing.assert_allclose(transposed.transpose(*da.dims), lowpass(da, 0.1))


def test_lowpass_errors():
    da = on_grid(np.zeros((8, 8)))
    with pytest.raises(InputError, match=r"cut-off wavenumber must be > 0 .*got -0\.1"):
        lowpass(da, -0.1)
    with pytest.raises(InputError, match="has only a noise level"):
        lowpass(da, "sigma=0.4")
    with pytest.raises(InputError, match="Cannot read the scale 'x'"):
        lowpass(da, "x")
    with pytest.raises(InputError, match="low-pass cut-off must be a wavenumber > 0"):
        core.lowpass_filter(np.zeros((4, 4)), 0.0)


# ---------------------------------------------------------------------------------------------- upscale
def test_upscale_block_means_coords_and_trimming():
    x = np.arange(2 * 9 * 10, dtype="float32").reshape(2, 9, 10)
    x[0, 0, 0] = np.nan
    x[1, 4:8, 4:8] = np.nan
    da = on_grid(x)
    out = upscale(da, 4)
    assert out.shape == (2, 2, 2) and out.dtype == np.float32 and out.attrs == da.attrs
    assert out.dims == da.dims
    np.testing.assert_allclose(out.lat, [34.0 + 0.25 * 1.5, 34.0 + 0.25 * 5.5])
    np.testing.assert_allclose(out.lon, [-10.0 + 0.25 * 1.5, -10.0 + 0.25 * 5.5])
    block = x[0, :4, :4]
    assert out.values[0, 0, 0] == pytest.approx(np.nanmean(block))
    assert np.isnan(out.values[1, 1, 1])
    assert out.values[1, 0, 1] == pytest.approx(x[1, :4, 4:8].mean())
    np.testing.assert_allclose(out.values, core.block_mean(x, 4), equal_nan=True)
    assert out.lat.attrs == LAT_ATTRS


def test_upscale_longitude_across_the_dateline_and_lazy():
    x = np.random.default_rng(14).normal(size=(3, 8, 8))
    da = on_grid(x).assign_coords(lon=("lon", np.array([356, 357, 358, 359, 0, 1, 2, 3.0]), LON_ATTRS))
    out = upscale(da, 4)
    np.testing.assert_allclose(out.lon, [357.5, 1.5])
    with dask.config.set(scheduler=no_compute):
        lazy = upscale(da.chunk({"time": 1}), 4)
    xr.testing.assert_allclose(lazy.compute(), out)


def test_upscale_errors():
    da = on_grid(np.zeros((8, 12)))
    for bad in (0, 2.5, True, "4"):
        with pytest.raises(InputError, match="factor must be an integer >= 1"):
            upscale(da, bad)
    with pytest.raises(InputError, match=r"factor 9 is larger than the grid of 'pr' \(8 x 12 cells"):
        upscale(da, 9)
    with pytest.raises(InputError, match="block size must be an integer >= 1"):
        core.block_mean(np.zeros((4, 4)), 0)
    with pytest.raises(InputError, match=r"block size 5 is larger than the grid \(4 x 4\)"):
        core.block_mean(np.zeros((4, 4)), 5)


# ---------------------------------------------------------------------------------------------- real data
@pytest.mark.data
@pytest.mark.skipif(
    not (DATA / "eobs_0.25deg_tp_djf1991-2000.nc").exists(), reason="../shared/data is absent"
)
def test_eobs_spectrum_with_its_sea_mask_is_finite():
    da = xr.open_dataset(DATA / "eobs_0.25deg_tp_djf1991-2000.nc")["tp"].isel(time=slice(0, 60)).load()
    p = psd(da)
    assert np.isfinite(p.values).all() and (p.values >= 0).all()  # all-dry days have zero power
    assert (p.mean("time").values > 0).all()
    assert p.attrs["spacing_km"] == pytest.approx(25, rel=0.15)
