"""Small synthetic fields with known answers, for tests, docs and doctests.

Nothing here reads a file or the network: every field is generated from a seed, so the same call
gives the same values everywhere.

* :func:`gaussian_random_field` - numpy fields with a power-law spectrum ``P(k) ~ k**-slope``;
* :func:`regional_grid`, :func:`global_grid` - empty latitude/longitude grids with CF attributes;
* :func:`synthetic_precipitation`, :func:`synthetic_temperature` - daily fields on a regional grid;
* :func:`coarsen_like_esm` - block means, to make coarse "ESM-like" inputs from a fine field.

Examples
--------
>>> from xdownscale.datasets import coarsen_like_esm, synthetic_precipitation
>>> pr = synthetic_precipitation(ny=16, nx=24, ntime=10)
>>> pr.dims, pr.attrs["units"]
(('time', 'lat', 'lon'), 'mm/day')
>>> coarsen_like_esm(pr, factor=4).shape
(10, 4, 6)
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy.special import ndtri

from .errors import InputError

__all__ = [
    "coarsen_like_esm",
    "gaussian_random_field",
    "global_grid",
    "regional_grid",
    "synthetic_precipitation",
    "synthetic_temperature",
]

_LAT_ATTRS = {"standard_name": "latitude", "long_name": "latitude", "units": "degrees_north", "axis": "Y"}
_LON_ATTRS = {"standard_name": "longitude", "long_name": "longitude", "units": "degrees_east", "axis": "X"}
_PRECIPITATION = {
    # units -> (factor from mm/day, standard_name)
    "mm/day": (1.0, "lwe_precipitation_rate"),
    "mm d-1": (1.0, "lwe_precipitation_rate"),
    "mm day-1": (1.0, "lwe_precipitation_rate"),
    "mm": (1.0, "lwe_thickness_of_precipitation_amount"),
    "mm/s": (1.0 / 86400.0, "lwe_precipitation_rate"),
    "mm s-1": (1.0 / 86400.0, "lwe_precipitation_rate"),
    "kg m-2 s-1": (1.0 / 86400.0, "precipitation_flux"),
}
_TEMPERATURE = {"K": 0.0, "degC": -273.15}
DRY_FRACTION = 0.6


def gaussian_random_field(
    shape: tuple[int, int] = (64, 64),
    *,
    slope: float = 3.0,
    ntime: int | None = 8,
    seed: int = 0,
    variance: float = 1.0,
) -> np.ndarray:
    """Gaussian random fields with a power-law spectrum ``P(k) ~ k**-slope``.

    White noise is coloured in Fourier space: its 2-D FFT is multiplied by ``|k|**(-slope / 2)``, where
    ``|k|`` is the radial wavenumber in cycles per grid cell, and the mean (``k = 0``) is removed. Each
    field is then scaled to zero mean and exactly the sample variance ``variance``. The fields are
    periodic in both directions.

    Parameters
    ----------
    shape
        ``(ny, nx)`` of one field.
    slope
        Spectral slope: the radially averaged power spectral density falls as ``k**-slope``
        (0 gives white noise; 3 is a smooth, precipitation-like field).
    ntime
        Number of independent fields; None returns one 2-D field.
    seed
        Seed of :func:`numpy.random.default_rng`.
    variance
        Sample variance of each field.

    Returns
    -------
    numpy.ndarray
        float64, shape ``(ntime, ny, nx)`` (or ``(ny, nx)`` when ``ntime`` is None).

    Examples
    --------
    >>> f = gaussian_random_field((32, 32), ntime=2, seed=1)
    >>> f.shape, round(float(f[0].var()), 6)
    ((2, 32, 32), 1.0)
    """
    ny, nx = (int(n) for n in shape)
    if ny < 2 or nx < 2:
        raise InputError(f"gaussian_random_field: shape must be at least (2, 2); got {shape!r}.")
    if variance < 0:
        raise InputError(f"gaussian_random_field: variance must be >= 0; got {variance!r}.")
    n = 1 if ntime is None else int(ntime)
    if n < 1:
        raise InputError(f"gaussian_random_field: ntime must be >= 1 or None; got {ntime!r}.")
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, ny, nx))
    k = np.hypot(np.fft.fftfreq(ny)[:, None], np.fft.rfftfreq(nx)[None, :])
    amplitude = np.zeros_like(k)
    amplitude[k > 0] = k[k > 0] ** (-slope / 2.0)
    fields = np.fft.irfft2(np.fft.rfft2(noise) * amplitude, s=(ny, nx))
    fields -= fields.mean(axis=(-2, -1), keepdims=True)
    std = fields.std(axis=(-2, -1), keepdims=True)
    fields *= np.sqrt(variance) / np.where(std > 0, std, 1.0)
    return fields[0] if ntime is None else fields


def _centres(start: float, n: int, res: float) -> np.ndarray:
    return start + res * (np.arange(n) + 0.5)


def regional_grid(
    ny: int, nx: int, *, lat0: float = 34.0, lon0: float = -10.0, res: float = 0.25
) -> xr.Dataset:
    """An empty regional latitude/longitude grid with CF attributes.

    Parameters
    ----------
    ny, nx
        Number of cells along latitude and longitude.
    lat0, lon0
        South-west corner of the domain (the outer edge of the first cell), in degrees. Cell centres are
        at ``lat0 + res * (i + 0.5)``, so the blocks of a ``factor`` times coarser grid with the same
        corner have their centres exactly at the block means.
    res
        Grid spacing in degrees.

    Returns
    -------
    xarray.Dataset
        No data variables; coordinates ``lat`` (ascending) and ``lon``.

    Examples
    --------
    >>> g = regional_grid(2, 3)
    >>> g.lat.values.tolist(), g.lon.values.tolist()
    ([34.125, 34.375], [-9.875, -9.625, -9.375])
    """
    if ny < 1 or nx < 1 or not res > 0:
        raise InputError(f"regional_grid: need ny, nx >= 1 and res > 0; got ny={ny}, nx={nx}, res={res}.")
    lat = _centres(lat0, ny, res)
    if lat[0] - res / 2 < -90 - 1e-9 or lat[-1] + res / 2 > 90 + 1e-9:
        raise InputError(
            f"regional_grid: {ny} rows of {res} deg from lat0={lat0} leave [-90, 90]; lower ny or lat0."
        )
    return xr.Dataset(
        coords={
            "lat": ("lat", lat, _LAT_ATTRS),
            "lon": ("lon", _centres(lon0, nx, res), _LON_ATTRS),
        }
    )


def global_grid(res_deg: float, *, lon0: float = 0.0) -> xr.Dataset:
    """An empty global latitude/longitude grid with CF attributes.

    Parameters
    ----------
    res_deg
        Grid spacing in degrees; 180 must be a multiple of it.
    lon0
        Western edge of the first column (0 gives longitudes in 0..360, -180 in -180..180).

    Returns
    -------
    xarray.Dataset
        Coordinates ``lat`` (cell centres from ``-90 + res/2`` to ``90 - res/2``) and ``lon``.

    Examples
    --------
    >>> g = global_grid(2.5)
    >>> g.sizes["lat"], g.sizes["lon"], float(g.lon[0]), float(g.lat[0])
    (72, 144, 1.25, -88.75)
    """
    ny = 180.0 / res_deg if res_deg > 0 else 0.0
    if res_deg <= 0 or abs(ny - round(ny)) > 1e-6:
        raise InputError(
            f"global_grid: 180 must be a multiple of res_deg; got res_deg={res_deg!r} (try 2.5, 1, 0.25)."
        )
    ny_i = round(ny)
    return regional_grid(ny_i, 2 * ny_i, lat0=-90.0, lon0=lon0, res=res_deg)


def _time(ntime: int, start: str, calendar: str) -> xr.DataArray:
    times = xr.date_range(start, periods=ntime, freq="D", calendar=calendar)
    return xr.DataArray(times, dims="time", attrs={"standard_name": "time", "axis": "T"})


def _sea_mask(ny: int, nx: int) -> np.ndarray:
    """True over a wavy "ocean" along the western edge and the south-west corner (about 20% of cells)."""
    y = (np.arange(ny) + 0.5) / ny
    x = (np.arange(nx) + 0.5) / nx
    coast = 0.12 + 0.05 * np.sin(2 * np.pi * 1.5 * y) + 0.15 * np.clip(0.3 - y, 0, None) / 0.3
    return x[None, :] < coast[:, None]


def _field(
    name: str,
    values: np.ndarray,
    grid: xr.Dataset,
    time: xr.DataArray,
    attrs: dict[str, str],
) -> xr.DataArray:
    return xr.DataArray(
        values.astype(np.float32),
        dims=("time", "lat", "lon"),
        coords={"time": time, "lat": grid["lat"], "lon": grid["lon"]},
        name=name,
        attrs=attrs,
    )


def synthetic_precipitation(
    ny: int = 32,
    nx: int = 48,
    ntime: int = 90,
    *,
    seed: int = 0,
    res: float = 0.25,
    mask: bool = False,
    units: str = "mm/day",
    start: str = "1991-12-01",
    calendar: str = "standard",
) -> xr.DataArray:
    """Daily precipitation: positive, skewed, about 60% dry cells, spatially correlated.

    A latent Gaussian field ``z = 0.6 * d(t) + 0.8 * g(t, y, x)`` mixes a daily domain-wide anomaly ``d``
    (some days are wetter than others) with a Gaussian random field ``g`` of spectral slope 3. Cells with
    ``z`` below its 60% quantile are dry (0); wet cells get ``2 * (exp(1.5 (z - z60)) - 1)`` mm/day times a
    climatology that grows from 0.7 in the south to 1.3 in the north (so latitude profiles are not flat).

    Parameters
    ----------
    ny, nx, ntime
        Grid size and number of days.
    seed
        Random seed; the same seed gives the same values.
    res
        Grid spacing in degrees (see :func:`regional_grid` for the coordinates).
    mask
        Set a "sea" along the western edge to NaN, as in station-based gridded products (E-OBS).
    units
        ``"mm/day"`` (CF standard name ``lwe_precipitation_rate``), ``"mm"`` (daily totals,
        ``lwe_thickness_of_precipitation_amount``), ``"mm s-1"`` or ``"kg m-2 s-1"``
        (``precipitation_flux``; 1 kg m-2 s-1 = 86400 mm/day).
    start, calendar
        First day and CF calendar (``"standard"`` gives numpy datetimes, others cftime objects).

    Returns
    -------
    xarray.DataArray
        ``pr`` with dims ``(time, lat, lon)``, float32.

    Examples
    --------
    >>> pr = synthetic_precipitation(ny=8, nx=8, ntime=30, seed=1)
    >>> pr.shape, pr.attrs["standard_name"], bool((pr >= 0).all())
    ((30, 8, 8), 'lwe_precipitation_rate', True)
    >>> 0.4 < float((pr == 0).mean()) < 0.8
    True
    """
    if units not in _PRECIPITATION:
        raise InputError(
            f"synthetic_precipitation: units {units!r} are not offered; use one of "
            f"{', '.join(map(repr, _PRECIPITATION))} (or convert afterwards with xdownscale.convert_units)."
        )
    factor, standard_name = _PRECIPITATION[units]
    grid = regional_grid(ny, nx, res=res)
    rng = np.random.default_rng([seed, 1])
    daily = rng.standard_normal((ntime, 1, 1))
    z = 0.6 * daily + 0.8 * gaussian_random_field((ny, nx), slope=3.0, ntime=ntime, seed=seed)
    threshold = float(ndtri(DRY_FRACTION))
    climatology = np.linspace(0.7, 1.3, ny)[None, :, None]
    values = np.where(z > threshold, 2.0 * np.expm1(1.5 * (z - threshold)), 0.0) * climatology * factor
    if mask:
        values[:, _sea_mask(ny, nx)] = np.nan
    attrs = {
        "standard_name": standard_name,
        "long_name": "synthetic daily precipitation",
        "units": units,
    }
    return _field("pr", values, grid, _time(ntime, start, calendar), attrs)


def synthetic_temperature(
    ny: int = 32,
    nx: int = 48,
    ntime: int = 90,
    *,
    seed: int = 0,
    res: float = 0.25,
    mask: bool = False,
    units: str = "K",
    start: str = "1991-12-01",
    calendar: str = "standard",
) -> xr.DataArray:
    """Daily near-surface air temperature: a north-south gradient plus correlated anomalies.

    ``T = 283.15 K - 0.7 K/deg * (lat - mean lat) + 3 K * (0.5 d(t) + 0.866 g(t, y, x))``, with ``d`` a
    daily domain-wide anomaly and ``g`` a Gaussian random field of spectral slope 3.

    Parameters
    ----------
    ny, nx, ntime, seed, res, mask, start, calendar
        As for :func:`synthetic_precipitation`.
    units
        ``"K"`` or ``"degC"``.

    Returns
    -------
    xarray.DataArray
        ``tas`` with dims ``(time, lat, lon)``, float32, standard name ``air_temperature``.

    Examples
    --------
    >>> tas = synthetic_temperature(ny=8, nx=8, ntime=5)
    >>> tas.attrs["units"], 270 < float(tas.mean()) < 295
    ('K', True)
    """
    if units not in _TEMPERATURE:
        raise InputError(
            f"synthetic_temperature: units {units!r} are not offered; use 'K' or 'degC' (or convert "
            "afterwards with xdownscale.convert_units)."
        )
    grid = regional_grid(ny, nx, res=res)
    lat = grid["lat"].values
    rng = np.random.default_rng([seed, 2])
    daily = rng.standard_normal((ntime, 1, 1))
    anomaly = 0.5 * daily + np.sqrt(0.75) * gaussian_random_field((ny, nx), slope=3.0, ntime=ntime, seed=seed)
    values = 283.15 - 0.7 * (lat - lat.mean())[None, :, None] + 3.0 * anomaly + _TEMPERATURE[units]
    if mask:
        values[:, _sea_mask(ny, nx)] = np.nan
    attrs = {
        "standard_name": "air_temperature",
        "long_name": "synthetic near-surface air temperature",
        "units": units,
    }
    return _field("tas", values, grid, _time(ntime, start, calendar), attrs)


def coarsen_like_esm(da: xr.DataArray, factor: int = 4) -> xr.DataArray:
    """Average ``da`` over ``factor x factor`` blocks of cells, as a coarse "ESM-like" input.

    This is :func:`xdownscale.xr.spectra.upscale`: NaN cells are ignored within a block (a block is NaN
    only when all its cells are), the coordinates are the block means, and trailing rows and columns that
    do not fill a whole block are dropped.

    Parameters
    ----------
    da
        Field(s) on a latitude/longitude grid.
    factor
        Block size in cells.

    Returns
    -------
    xarray.DataArray
        The coarse field, with the attributes of ``da``.

    Examples
    --------
    >>> tas = synthetic_temperature(ny=8, nx=12, ntime=2)
    >>> coarse = coarsen_like_esm(tas, factor=4)
    >>> coarse.shape, coarse.lat.values.tolist()
    ((2, 2, 3), [34.5, 35.5])
    """
    from .xr.spectra import upscale

    return upscale(da, factor=factor)
