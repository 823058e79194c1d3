"""Power spectra, scale selection, low-pass filter and block averaging (core and xarray layers)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import dask
import dask.array as dsa
import numpy as np
import pytest
import scipy.ndimage
import xarray as xr
from _dask_helpers import no_compute
from hypothesis import given, settings
from hypothesis import strategies as st

from xdownscale import api
from xdownscale.core import spectra as core
from xdownscale.errors import GridMismatchError, InputError, PerformanceWarning, XDownscaleWarning
from xdownscale.preparation import lazy_sigma
from xdownscale.xr.spectra import Scale, lowpass, masked_estimator, psd, select_scale, upscale

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


# ---------------------------------------------------------------------------------------------- masked PSD
def coastline_mask(ny: int = 41, nx: int = 61) -> np.ndarray:
    """True on "land": a peninsula with a wavy coast, like Iberia on the E-OBS grid (41 x 61 cells),
    with the strip of another coast in the north-east and in the south (~58% land)."""
    y = np.arange(ny)[:, None] + 0.5
    x = np.arange(nx)[None, :] + 0.5
    west = 5 + 2.0 * np.sin(2 * np.pi * y / 17)
    east = 38 + 10 * (y - 6) / 30 + 2.5 * np.sin(2 * np.pi * y / 11)
    peninsula = (x > west) & (x < east) & (y > 6 + 1.5 * np.sin(2 * np.pi * x / 23)) & (y < 36)
    north_east = (x > 44) & (y > 33 + 2 * np.sin(2 * np.pi * x / 13))
    south = (y < 4 + 1.5 * np.cos(2 * np.pi * x / 19)) & (x > 14)
    return peninsula | north_east | south


def cropped_power_law(n: int, shape: tuple[int, int], beta: float, seed: int) -> tuple[np.ndarray, float]:
    """Non-periodic fields with PSD ``c k^-beta``: a corner of periodic fields on a 4x larger grid.

    Returns the fields and ``c`` in the normalisation of radial_psd on ``shape``.
    """
    h, w = shape
    big = power_law_fields(n, (4 * h, 4 * w), lambda k: k**-beta, seed)
    return big[:, :h, :w], 16.0


def bilinear_upsample(coarse: np.ndarray, factor: int) -> np.ndarray:
    """Bilinear interpolation of (B, h, w) cell means onto a grid ``factor`` times finer."""
    h, w = coarse.shape[-2:]
    yc = (np.arange(h * factor) + 0.5) / factor - 0.5
    xc = (np.arange(w * factor) + 0.5) / factor - 0.5
    yy, xx = np.meshgrid(yc, xc, indexing="ij")
    return np.stack([scipy.ndimage.map_coordinates(c, [yy, xx], order=1, mode="nearest") for c in coarse])


def small_scale_ratio(k: np.ndarray, p_smooth: np.ndarray, p_rough: np.ndarray, k_min: float) -> float:
    small = k > k_min
    return float(np.nansum(p_smooth.mean(0)[small]) / np.nansum(p_rough.mean(0)[small]))


def test_valid_windows_tile_the_land_with_the_largest_rectangles():
    land = coastline_mask()
    windows = core.valid_windows(land)
    assert windows[0] == (7, 7, 29, 29)
    used = np.zeros_like(land, dtype=int)
    for top, left, height, width in windows:
        assert min(height, width) >= core.MIN_WINDOW
        assert land[top : top + height, left : left + width].all()
        used[top : top + height, left : left + width] += 1
    assert used.max() == 1  # no overlap
    areas = [h * w for _, _, h, w in windows]
    assert areas == sorted(areas, reverse=True)
    assert core.valid_windows(np.ones((5, 7), dtype=bool), 2) == [(0, 0, 5, 7)]
    assert core.valid_windows(np.zeros((5, 7), dtype=bool), 2) == []


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(2, 4))
def test_largest_window_is_the_largest_valid_rectangle(seed, m):
    valid = np.random.default_rng(seed).random((9, 11)) < 0.8
    best = 0
    for top in range(9):
        for left in range(11):
            for bottom in range(top + m, 10):
                for right in range(left + m, 12):
                    if valid[top:bottom, left:right].all():
                        best = max(best, (bottom - top) * (right - left))
    windows = core.valid_windows(valid, m)
    assert (windows[0][2] * windows[0][3] if windows else 0) == best


def test_masked_white_noise_is_flat_at_the_full_grid_level_and_maps_back_to_its_sigma():
    s, land = 1.3, coastline_mask()
    h, w = land.shape
    noise = np.where(land, np.random.default_rng(5).normal(4.0, s, (150, h, w)), np.nan)
    _, p = core.radial_psd(noise)
    mean = p.mean(0)
    resolved = np.isfinite(mean)
    assert not resolved[0] and resolved[1:].all()  # 41 cells > the largest window (29 cells)
    level = s**2 / (h * w)  # the full grid's cells, sea included
    np.testing.assert_allclose(mean[resolved], level, rtol=0.1)
    assert mean[resolved].mean() == pytest.approx(level, rel=0.03)
    da = on_grid(noise)
    spectrum = psd(da)
    assert spectrum.attrs["n_cells"] == h * w and spectrum.attrs["masked"] == "windows"
    for k0 in (0.1, 0.25, 0.45):
        assert Scale.from_wavenumber(k0, psd=spectrum).sigma == pytest.approx(s, rel=0.06)


@pytest.mark.parametrize("beta", [2.0, 3.0, 4.0])
def test_masked_estimator_recovers_a_power_law_where_filling_does_not(beta):
    land = coastline_mask()
    fields, c = cropped_power_law(60, land.shape, beta, seed=int(beta))
    masked = np.where(land, fields, np.nan)
    k, new = core.radial_psd(masked)
    _, old = core.radial_psd(masked, masked="fill")
    truth = c * k**-beta
    ratio = new.mean(0) / truth
    resolved = np.flatnonzero(np.isfinite(ratio))
    assert 0.6 < ratio[resolved[0]] < 1.6
    np.testing.assert_allclose(ratio[resolved[1:]], 1.0, rtol=0.25)
    small = k > 4 / 29  # below a quarter of the largest window's side
    np.testing.assert_allclose(ratio[small], 1.0, rtol=0.2)
    if beta >= 3:  # the land-sea edges of the filled field add power at small scales
        assert (old.mean(0)[small] / truth[small]).min() > 2


def test_bilinear_field_shows_its_lack_of_small_scales_on_a_masked_grid():
    land = coastline_mask()
    h, w = land.shape
    rough, _ = cropped_power_law(60, (44, 64), 3.0, seed=2)
    smooth = bilinear_upsample(core.block_mean(rough, 4), 4)[:, :h, :w]  # 4x from 11 x 16 cells
    rough = rough[:, :h, :w]
    k, p_rough = core.radial_psd(np.where(land, rough, np.nan))
    _, p_smooth = core.radial_psd(np.where(land, smooth, np.nan))
    assert small_scale_ratio(k, p_smooth, p_rough, 0.25) < 0.05
    # the mean-filled estimator sees the coast instead: it is what the test guards against
    _, f_rough = core.radial_psd(np.where(land, rough, np.nan), masked="fill")
    _, f_smooth = core.radial_psd(np.where(land, smooth, np.nan), masked="fill")
    assert small_scale_ratio(k, f_smooth, f_rough, 0.25) > 0.3
    # on the complete grid (the reference) the smooth field lacks the small scales too
    _, full_rough = core.radial_psd(rough, window="hann")
    _, full_smooth = core.radial_psd(smooth, window="hann")
    assert small_scale_ratio(k, full_smooth, full_rough, 0.25) < 0.05


def periodogram_by_hand(x: np.ndarray) -> np.ndarray:
    """Mean of |FFT2(x - mean)|^2 / (H W)^2 over the annuli, written out with the full FFT."""
    h, w = x.shape[-2:]
    n = min(h, w)
    p2 = np.abs(np.fft.fft2(x - x.mean(axis=(-2, -1), keepdims=True))) ** 2 / (h * w) ** 2
    ring = np.rint(np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.fftfreq(w)[None, :] ** 2) * n)
    return np.stack([p2[..., ring == i].mean(axis=-1) for i in range(1, n // 2 + 1)], axis=-1)


def test_complete_fields_keep_the_plain_periodogram():
    x = np.random.default_rng(12).normal(size=(4, 24, 30)).cumsum(axis=-1)
    _, p = core.radial_psd(x)
    np.testing.assert_allclose(p, periodogram_by_hand(x), rtol=1e-10)
    np.testing.assert_array_equal(core.radial_psd(x, masked="fill")[1], p)
    np.testing.assert_array_equal(core.radial_psd(x, masked="windows", min_window=30)[1], p)


def test_fill_keeps_the_former_masked_estimator():
    x = np.random.default_rng(13).normal(size=(3, 24, 30))
    x[:, :, :8] = np.nan
    _, p = core.radial_psd(x, masked="fill")
    filled = np.where(np.isfinite(x), x - np.nanmean(x, axis=(-2, -1), keepdims=True), 0.0)
    np.testing.assert_allclose(p, periodogram_by_hand(filled) / (22 / 30), rtol=1e-10)


def test_each_mask_of_a_batch_gets_its_own_windows():
    rng = np.random.default_rng(14)
    x = rng.normal(size=(5, 24, 32))
    x[0, :, :10] = np.nan
    x[1, :6, :] = np.nan
    x[2] = np.nan
    x[4, :, :10] = np.nan
    _, batch = core.radial_psd(x)
    for i in (0, 1, 3, 4):
        np.testing.assert_allclose(batch[i], core.radial_psd(x[i])[1], rtol=1e-12)
    assert np.isnan(batch[2]).all()
    np.testing.assert_allclose(batch[3], periodogram_by_hand(x[3]), rtol=1e-10)
    # a 24 x 22 window resolves wavelengths up to 22 cells: the 24-cell bin is NaN, the next is not
    assert np.isnan(batch[0, 0]) and np.isfinite(batch[0, 1:]).all()


def test_masked_psd_is_lazy_and_records_its_estimator():
    land = coastline_mask(24, 32)
    x = np.where(land, np.random.default_rng(15).normal(size=(4, 24, 32)), np.nan)
    da = on_grid(x)
    with dask.config.set(scheduler=no_compute):
        lazy = psd(da.chunk({"time": 2}))
    assert lazy.attrs["masked"] == "windows"
    xr.testing.assert_allclose(lazy.compute(), psd(da))
    assert psd(da, masked="fill").attrs["masked"] == "fill"
    assert psd(on_grid(np.nan_to_num(x))).attrs["masked"] == "none"
    np.testing.assert_allclose(psd(da, masked="fill").values, core.radial_psd(x, masked="fill")[1])


def test_masked_psd_errors():
    x = np.random.default_rng(16).normal(size=(12, 12))
    x[::3, ::3] = np.nan  # holes everywhere: no 8 x 8 window
    with pytest.raises(InputError, match=r"has 128 valid cells but no all-valid rectangle of at least 8 x 8"):
        core.radial_psd(x)
    with pytest.raises(InputError, match=r"masked='nope' is not an estimator.*'windows'.*'fill'"):
        core.radial_psd(x, masked="nope")
    with pytest.raises(InputError, match=r"masked='nope' is not an estimator"):
        psd(on_grid(x), masked="nope")
    with pytest.raises(InputError, match=r"min_window must be >= 2 cells.*got 1"):
        core.radial_psd(x, min_window=1)
    with pytest.raises(InputError, match=r"min_window must be an integer number of cells.*got 2\.5"):
        core.valid_windows(np.ones((4, 4), dtype=bool), 2.5)
    with pytest.raises(InputError, match=r"valid_windows needs a 2-D mask.*got shape \(2, 4, 4\)"):
        core.valid_windows(np.ones((2, 4, 4), dtype=bool))
    with pytest.raises(InputError, match="Unknown window 'nope'"):
        psd(on_grid(x), window="nope")
    tiny = core.radial_psd(x, min_window=2)[1]  # 2 x 2 windows resolve the 2-cell wavelength only
    assert np.isnan(tiny[:-1]).all() and np.isfinite(tiny[-1])


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
def spectrum_da(values: np.ndarray, k: np.ndarray, masked: str = "windows") -> xr.DataArray:
    return xr.DataArray(
        values,
        dims="wavenumber",
        coords={"wavenumber": k},
        attrs={"n_cells": 4096, "spacing_km": 25.0, "masked": masked},
    )


K64 = np.arange(1, 33) / 64


def test_drop_wavenumber_finds_the_half_power_point():
    fine = 1e-4 * K64**-2.0
    k0 = 0.1
    coarse = fine * np.exp(-((K64 / k0) ** 4))  # half power at k0 * ln(2)^(1/4) = 0.0912
    found = core.drop_wavenumber(K64, fine, coarse)
    assert found == pytest.approx(k0 * math.log(2) ** 0.25, abs=0.5 / 64)
    assert core.drop_wavenumber(K64, fine, coarse, threshold=0.1) > found
    assert core.drop_wavenumber(K64, fine, coarse, k_min=0.2) == 0.2  # below already at k_min
    assert core.drop_wavenumber(K64, fine, coarse, k_max=0.05) is None
    assert core.drop_wavenumber(K64, fine, fine) is None
    with pytest.raises(InputError, match=r"threshold must be > 0 \(0\.5 is the half-power point\); got 0"):
        core.drop_wavenumber(K64, fine, coarse, threshold=0)
    with pytest.raises(InputError, match=r"threshold must be a number > 0; got 'x'"):
        core.drop_wavenumber(K64, fine, coarse, threshold="x")
    with pytest.raises(InputError, match=r"0 < k_min <= k_max; got k_min=0\.3, k_max=0\.2"):
        core.drop_wavenumber(K64, fine, coarse, k_min=0.3, k_max=0.2)
    with pytest.raises(InputError, match="no bin where both are finite and positive"):
        core.drop_wavenumber(K64, fine, np.zeros_like(fine))


def test_select_scale_stays_between_two_and_four_input_cells():
    fine = spectrum_da(1e-4 * K64**-2.0, K64)
    drop = spectrum_da(fine.values * np.exp(-((K64 / 0.1) ** 4)), K64)
    # the input's grid is 4x coarser: Nyquist k_in = 0.125 (2 input cells), k_lo = 0.0625 (4 cells)
    scale = select_scale(fine, drop, input_wavenumber=0.125)
    assert scale.wavenumber == pytest.approx(0.1 * math.log(2) ** 0.25, abs=0.5 / 64)
    expected = math.sqrt(4096 * core.interp_loglog(scale.wavenumber, K64, fine.values))
    assert scale.sigma == pytest.approx(expected)
    assert scale.wavelength_km == pytest.approx(25.0 / scale.wavenumber)
    # as much power as the target down to the input's Nyquist scale: keep everything it resolves
    assert select_scale(fine, fine * 0.9, input_wavenumber=0.125).wavenumber == pytest.approx(0.125)
    # less than half the power already at 4 input cells: no larger scale than that
    assert select_scale(fine, fine * 0.3, input_wavenumber=0.125).wavenumber == pytest.approx(0.0625)
    # a drop at large scales (k = 0.02) is the input's overall variance, not missing detail
    early = spectrum_da(fine.values * np.where(K64 < 0.04, 1.0, 0.4), K64)
    assert select_scale(fine, early, input_wavenumber=0.125).wavenumber == pytest.approx(0.0625)
    assert select_scale(fine, early, input_wavenumber=0.125, max_input_cells=8).wavenumber < 3 / 64
    assert select_scale(fine, drop, input_wavenumber=0.125, threshold=0.9).wavenumber < scale.wavenumber


def test_select_scale_without_the_input_resolution_recovers_a_planted_drop():
    shape, k0 = (64, 64), 0.1
    fine = power_law_fields(60, shape, lambda k: 1e-3 * (k / k0) ** -2.0, seed=10)
    coarse = power_law_fields(
        60, shape, lambda k: 1e-3 * (k / k0) ** -2.0 * np.exp(-((k / k0) ** 4)), seed=11
    )
    p_fine, p_coarse = psd(on_grid(fine)), psd(on_grid(coarse))
    scale = select_scale(p_fine, p_coarse)
    assert abs(scale.wavenumber - k0 * math.log(2) ** 0.25) <= 1 / 64
    assert scale.sigma == pytest.approx(math.sqrt(4096 * 1e-3), rel=0.2)


def test_select_scale_compares_like_with_like(red_psd):
    legacy = red_psd.copy()
    del legacy.attrs["masked"]
    windows = red_psd.copy()
    windows.attrs["masked"] = "windows"
    with pytest.raises(
        InputError, match=r"psd_fine was computed with masked='fill' and psd_coarse with masked='windows'"
    ):
        select_scale(legacy, windows * 0.5, input_wavenumber=0.1)
    assert red_psd.attrs["masked"] == "none"  # no NaN: compares with either
    select_scale(red_psd, windows * 0.5, input_wavenumber=0.1)
    assert masked_estimator(legacy) == "fill" and masked_estimator(red_psd) == "windows"


def test_select_scale_errors(red_psd):
    with pytest.raises(
        InputError,
        match=r"never falls below 0\.5 times the fine one.*ratio 2 at the largest.*input_wavenumber=",
    ):
        select_scale(red_psd, red_psd * 2)
    with pytest.raises(
        InputError, match=r"lies below 0\.5 times the fine one from the largest scale on .*qdm=True.*scale="
    ):
        select_scale(red_psd, red_psd / 4)
    with pytest.raises(InputError, match=r"no bin where both are finite"):
        select_scale(red_psd, red_psd * 0)
    with pytest.raises(InputError, match=r"input_wavenumber must be the input grid's Nyquist.*got 0\.7"):
        select_scale(red_psd, red_psd, input_wavenumber=0.7)
    with pytest.raises(InputError, match=r"input_wavenumber must be a number; got 'x'"):
        select_scale(red_psd, red_psd, input_wavenumber="x")
    with pytest.raises(InputError, match=r"threshold must be a power ratio > 0.*got -1"):
        select_scale(red_psd, red_psd, threshold=-1)
    with pytest.raises(InputError, match=r"threshold and max_input_cells must be numbers"):
        select_scale(red_psd, red_psd, threshold="x")
    with pytest.raises(InputError, match=r"max_input_cells must be >= 2 .*got 1"):
        select_scale(red_psd, red_psd, max_input_cells=1)
    other = psd(on_grid(np.random.default_rng(0).normal(size=(2, 32, 48))))
    with pytest.raises(
        GridMismatchError, match=r"psd_fine \(32 wavenumber bins, 4096 cells\) and psd_coarse \(16"
    ):
        select_scale(red_psd, other)
    with pytest.raises(InputError, match="psd_coarse must be a power spectrum"):
        select_scale(red_psd, red_psd.values)


def fake_model(target: xr.DataArray) -> SimpleNamespace:
    return SimpleNamespace(name="test-model", target_psd=target)


def test_auto_scale_compares_the_input_with_the_target_estimator_and_warns_at_the_bound():
    land = coastline_mask(32, 48)
    rng = np.random.default_rng(17)
    target = psd(on_grid(np.where(land, rng.normal(size=(20, 32, 48)), np.nan))).mean("time", keep_attrs=True)
    smooth = bilinear_upsample(rng.normal(size=(20, 8, 12)), 4)
    transformed = on_grid(np.where(land, smooth, np.nan))
    transformed["time"] = np.datetime64("2000-01-01") + np.arange(20) * np.timedelta64(1, "D")
    transformed.attrs[api.INPUT_WAVENUMBER_ATTR] = 0.125
    model = fake_model(target)
    picked = api.resolve_scale("auto", model, transformed)
    spectrum = psd(transformed, masked="windows").mean("time", keep_attrs=True)
    assert picked == select_scale(target, spectrum, input_wavenumber=0.125)
    assert 0.0625 <= picked.wavenumber <= 0.125
    # an older card (no 'masked' attribute): the input is estimated the old way too
    legacy = target.copy()
    del legacy.attrs["masked"]
    old_way = psd(transformed, masked="fill").mean("time", keep_attrs=True)
    assert api.resolve_scale("auto", fake_model(legacy), transformed) == select_scale(
        legacy, old_way, input_wavenumber=0.125
    )
    # the lazy path gives the same sigma
    lazy = lazy_sigma(transformed.chunk({"time": 5}), model, 365)
    assert float(lazy.compute()) == pytest.approx(picked.sigma)
    weak = transformed * 0.1
    weak.attrs = transformed.attrs
    with pytest.warns(
        XDownscaleWarning, match=r"less than 0\.5 times the power of model 'test-model'.*4 input grid cells"
    ):
        bound = api.resolve_scale("auto", model, weak)
    assert bound.wavenumber == pytest.approx(0.0625)


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
needs_eobs = pytest.mark.skipif(
    not (DATA / "eobs_0.25deg_tp_djf1991-2000.nc").exists(), reason="../shared/data is absent"
)


@pytest.mark.data
@needs_eobs
def test_eobs_spectrum_with_its_sea_mask_is_finite():
    da = xr.open_dataset(DATA / "eobs_0.25deg_tp_djf1991-2000.nc")["tp"].isel(time=slice(0, 60)).load()
    p = psd(da)
    # the 1000 km bin is longer than the largest all-land window (23 x 31 cells): not measurable
    assert np.isnan(p.values[:, 0]).all()
    assert np.isfinite(p.values[:, 1:]).all() and (p.values[:, 1:] >= 0).all()  # dry days: zero power
    assert (p.mean("time").values[1:] > 0).all()
    assert p.attrs["spacing_km"] == pytest.approx(25, rel=0.15) and p.attrs["n_cells"] == 41 * 61


@pytest.mark.data
@needs_eobs
def test_bilinear_from_one_degree_eobs_lacks_the_small_scales():
    from xdownscale.xr.regrid import regrid

    tp = xr.open_dataset(DATA / "eobs_0.25deg_tp_djf1991-2000.nc")["tp"].isel(time=slice(0, 300)).load()
    bilinear = regrid(upscale(tp, 4), tp, method="bilinear")  # 1 deg block means, back to 0.25 deg
    land = np.isfinite(tp.isel(time=0)) & np.isfinite(bilinear.isel(time=0))
    below_100km = None
    ratios = {}
    for method in ("windows", "fill"):
        p_eobs = psd(tp.where(land), masked=method).mean("time")
        p_bilinear = psd(bilinear.where(land), masked=method).mean("time")
        below_100km = p_eobs["wavelength_km"] < 100
        ratios[method] = float(p_bilinear.where(below_100km).sum() / p_eobs.where(below_100km).sum())
    assert below_100km is not None and int(below_100km.sum()) >= 10
    assert ratios["windows"] < 0.1  # measured: 0.012
    assert ratios["fill"] > 0.3  # the coast's edges: measured 0.72
