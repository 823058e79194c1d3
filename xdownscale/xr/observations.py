"""Observations on the state grid, for data assimilation (no torch: numpy and scipy.sparse only).

* Stations (in-situ): a DataArray ``(time, station)`` with latitude/longitude coordinates along the
  station dimension (found the CF way, as :func:`xdownscale.xr.cf.find_grid` does for grids). Each
  station becomes a fractional grid index ``(iy, ix)`` of the state grid, which the bilinear operator
  :class:`xdownscale.core.observations.BilinearPoints` interpolates at. Stations outside the state
  domain are dropped with a :class:`~xdownscale.errors.XDownscaleWarning` that names them.
* Satellite (ex-situ): a DataArray on its own latitude/longitude grid. Each satellite pixel becomes a
  row of area-averaging weights over the state cells (exact spherical overlap fractions, the
  conservative weights of :mod:`xdownscale.core.regrid_weights`); pixels covered less than
  ``min_coverage`` by the state grid are dropped. Used by :class:`xdownscale.core.observations.AreaAverage`.

Values are converted to the state's units; the error standard deviation comes from the ``std=``
argument or the attribute ``error_std`` (a scalar attribute, or a coordinate along the station
dimension); NaN marks a missing observation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import cf_xarray  # noqa: F401  (registers the .cf accessor)
import numpy as np
import scipy.sparse as sp
import xarray as xr

from ..core import regrid_weights as rw
from ..errors import GridMismatchError, InputError, MissingCoordinateError, UnitError, XDownscaleWarning
from .cf import Grid, find_grid, find_time, grid_extent
from .units import convert_units, format_units, parse_units

__all__ = [
    "ERROR_STD_ATTR",
    "SatelliteObservations",
    "StationObservations",
    "error_std_values",
    "find_points",
    "on_state_times",
    "satellite_on_grid",
    "satellite_weights",
    "station_indices",
    "stations_on_grid",
]

#: attribute (or coordinate along the station dimension) holding the observation error std
ERROR_STD_ATTR = "error_std"


def _label(da: Any) -> str:
    name = getattr(da, "name", None)
    return f"'{name}'" if name is not None else "the observations"


@dataclass
class StationObservations:
    """Stations put on a state grid.

    Attributes
    ----------
    values
        (ntime, N) in the state's units, NaN = missing, on the state's time steps.
    std
        (N,) error standard deviation in the state's units.
    iy, ix
        (N,) fractional row/column indices on the state grid.
    names
        (N,) station labels kept (stations outside the domain are dropped).
    """

    values: np.ndarray
    std: np.ndarray
    iy: np.ndarray
    ix: np.ndarray
    names: list[str]


@dataclass
class SatelliteObservations:
    """A satellite field put on a state grid.

    Attributes
    ----------
    values
        (ntime, M) in the state's units for the M kept pixels, NaN = missing.
    std
        (M,) error standard deviation in the state's units.
    weights
        scipy.sparse CSR (M, ny * nx): area-averaging weights from the state cells, rows sum to one.
    """

    values: np.ndarray
    std: np.ndarray
    weights: sp.csr_matrix


def _coord_names(obj: xr.DataArray, key: str) -> list[str]:
    try:
        names = list(obj.cf.coordinates.get(key, []))
    except Exception:
        names = []
    if not names:
        try:
            names = list(obj.cf.guess_coord_axis().cf.coordinates.get(key, []))
        except Exception:
            names = []
    return [n for n in names if n in obj.coords]


def find_points(obs: xr.DataArray) -> tuple[str, str, str]:
    """Names of the latitude, longitude and point (station) dimension of point observations.

    Raises
    ------
    MissingCoordinateError
        No latitude/longitude along a common non-time dimension.
    """
    time = find_time(obs, required=False)
    lats = [n for n in _coord_names(obs, "latitude") if obs[n].ndim == 1 and obs[n].dims[0] != time]
    lons = [n for n in _coord_names(obs, "longitude") if obs[n].ndim == 1 and obs[n].dims[0] != time]
    for la in lats:
        for lo in lons:
            if obs[la].dims == obs[lo].dims:
                return la, lo, str(obs[la].dims[0])
    found = ", ".join(f"{n}{tuple(map(str, c.dims))}" for n, c in obs.coords.items()) or "none"
    raise MissingCoordinateError(
        f"Cannot find the station latitude and longitude of {_label(obs)} (coordinates: {found}). Station "
        "observations need 1-D latitude and longitude coordinates along the station dimension, e.g. "
        "obs = obs.assign_coords(lat=('station', lats), lon=('station', lons)) with "
        "attrs standard_name='latitude' / 'longitude'."
    )


def _axis_index(values: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Fractional index of ``points`` on a monotonic 1-D axis; NaN outside [first, last]."""
    idx = np.arange(values.size, dtype=float)
    if values[0] > values[-1]:
        values, idx = values[::-1], idx[::-1]
    out = np.interp(points, values, idx)
    out[(points < values[0]) | (points > values[-1])] = np.nan
    return out


def _state_grid(state: xr.DataArray | xr.Dataset) -> Grid:
    grid = find_grid(state)
    if grid.curvilinear:
        raise GridMismatchError(
            "Assimilation supports rectilinear state grids (1-D latitude and longitude); the state grid "
            f"has 2-D '{grid.lat}'/'{grid.lon}'. Regrid the state first with xdownscale.regrid."
        )
    return grid


def station_indices(
    stations: xr.DataArray, state: xr.DataArray | xr.Dataset
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fractional grid indices of the stations on the state grid.

    Returns
    -------
    iy, ix, inside
        Fractional row/column indices (NaN outside) and a bool mask of the stations inside the domain.

    Raises
    ------
    MissingCoordinateError
        The stations or the state have no latitude/longitude.
    """
    la, lo, _ = find_points(stations)
    grid = _state_grid(state)
    glat = np.asarray(state[grid.lat].values, dtype=float)
    glon = np.asarray(state[grid.lon].values, dtype=float)
    slat = np.asarray(stations[la].values, dtype=float)
    slon = np.asarray(stations[lo].values, dtype=float)
    iy = _axis_index(glat, slat)
    ascending = glon[-1] > glon[0]
    west = glon.min()
    # station longitudes into the grid's convention: [west, west + 360)
    slon = np.mod(slon - west, 360.0) + west
    if grid.periodic and ascending:
        # between the last column and the first one again (ix in [nx - 1, nx)) wraps around
        ext = np.concatenate([glon, [glon[0] + 360.0]])
        ix = np.interp(slon, ext, np.arange(ext.size, dtype=float))
    else:
        ix = _axis_index(glon, slon)
    inside = np.isfinite(iy) & np.isfinite(ix)
    return iy, ix, inside


def error_std_values(obs: xr.DataArray, std: Any, points_dim: str | None, what: str, arg: str) -> np.ndarray:
    """Error std (in the observations' units) per point, or a scalar broadcast later."""
    if std is None:
        if ERROR_STD_ATTR in obs.coords:
            std = obs.coords[ERROR_STD_ATTR]
        elif ERROR_STD_ATTR in obs.attrs:
            std = obs.attrs[ERROR_STD_ATTR]
        else:
            raise InputError(
                f"No observation error for the {what} {_label(obs)}: pass {arg}= (a number, or a DataArray "
                f"along '{points_dim}', in the observations' units) or set "
                f"obs.attrs['{ERROR_STD_ATTR}']."
            )
    if isinstance(std, xr.DataArray):
        if points_dim is not None and points_dim in std.dims:
            std = std.reindex({points_dim: obs[points_dim]}) if points_dim in obs.coords else std
        values = np.asarray(std.values, dtype=float)
    else:
        try:
            values = np.asarray(std, dtype=float)
        except (TypeError, ValueError):
            raise InputError(
                f"{arg}={std!r} is not a number; pass the error std in the observations' units."
            ) from None
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise InputError(
            f"{arg} for {_label(obs)} must be finite and > 0 (an error standard deviation), got {values}."
        )
    return values


def _convert(obs: xr.DataArray, std: np.ndarray, units: str, what: str) -> tuple[xr.DataArray, np.ndarray]:
    """Observations and their error std in ``units`` (std scales without the offset)."""
    try:
        src = parse_units(obs)
        out = convert_units(obs, units)
    except UnitError as err:
        raise UnitError(
            f"The {what} {_label(obs)} cannot be used with the state in '{units}': {err}"
        ) from None
    pair = xr.DataArray(np.array([0.0, 1.0]), dims="_", attrs={"units": format_units(src)})
    zero, one = convert_units(pair, units, units=src).values
    return out, std * abs(float(one - zero))


def on_state_times(obs: xr.DataArray, state: xr.DataArray, what: str) -> xr.DataArray:
    """``obs`` reindexed onto the time steps of ``state`` (missing steps become NaN)."""
    t_obs = find_time(obs)
    t_state = find_time(state)
    obs = obs.rename({t_obs: t_state}) if t_obs != t_state else obs
    times = state[t_state]
    common = np.intersect1d(np.asarray(obs[t_state].values), np.asarray(times.values))
    if common.size == 0:
        raise InputError(
            f"No time step of the {what} {_label(obs)} "
            f"({obs[t_state].values[0]} .. {obs[t_state].values[-1]}) "
            f"matches the background ({times.values[0]} .. {times.values[-1]}). Select overlapping dates."
        )
    return obs.reindex({t_state: times})


def _check_any(values: np.ndarray, obs: xr.DataArray, what: str) -> None:
    if not np.isfinite(values).any():
        raise InputError(
            f"All {what} values of {_label(obs)} are missing (NaN) on the background's time steps and inside "
            "its domain; there is nothing to assimilate. Check the dates, the domain, or drop this modality."
        )


def stations_on_grid(
    stations: xr.DataArray,
    state: xr.DataArray,
    *,
    std: Any = None,
    units: str | None = None,
) -> StationObservations:
    """Put station observations on the state grid and time steps.

    Parameters
    ----------
    stations
        ``(time, station)`` with latitude/longitude coordinates along ``station`` and a ``units`` attribute.
    state
        The background on the state grid, ``(time, ..., lat, lon)``.
    std
        Observation error std in the stations' units: a number or a DataArray along the station
        dimension; default: coordinate or attribute ``error_std``.
    units
        Units to convert to (default: the state's ``units`` attribute).

    Raises
    ------
    MissingCoordinateError
        No station latitude/longitude, or no time coordinate.
    UnitError
        Units missing or not convertible to the state's.
    GridMismatchError
        No station lies inside the state domain.
    InputError
        No error std, no common time step, or all observations missing.
    """
    _, _, dim = find_points(stations)
    iy, ix, inside = station_indices(stations, state)
    names = [
        str(v) for v in (stations[dim].values if dim in stations.coords else np.arange(stations.sizes[dim]))
    ]
    if not inside.any():
        ext = grid_extent(state)
        raise GridMismatchError(
            f"None of the {len(names)} stations of {_label(stations)} lies inside the state domain "
            f"(lat {ext['lat_min']:.2f}..{ext['lat_max']:.2f}, "
            f"lon {ext['lon_min']:.2f}..{ext['lon_max']:.2f}). "
            "Pass stations inside the domain."
        )
    if not inside.all():
        out = [n for n, k in zip(names, inside, strict=True) if not k]
        shown = ", ".join(out[:20]) + (f" and {len(out) - 20} more" if len(out) > 20 else "")
        warnings.warn(
            f"{len(out)} of {len(names)} stations of {_label(stations)} lie outside the state domain and are "
            f"dropped: {shown}.",
            XDownscaleWarning,
            stacklevel=3,
        )
    stds = error_std_values(stations, std, dim, "stations", "stations_std")
    stds = np.broadcast_to(stds, (stations.sizes[dim],)) if stds.ndim == 0 else stds
    if stds.shape != (stations.sizes[dim],):
        raise InputError(
            f"stations_std has {stds.size} values; {_label(stations)} has {stations.sizes[dim]} stations."
        )
    target_units = units or state.attrs.get("units")
    if target_units is None:
        raise UnitError("The background has no units attribute; set background.attrs['units'].")
    conv, stds = _convert(stations, stds, target_units, "stations")
    conv = on_state_times(conv, state, "stations")
    t = find_time(state)
    values = np.asarray(conv.transpose(t, dim).values, dtype=float)[:, inside]
    _check_any(values, stations, "station")
    return StationObservations(
        values=values,
        std=np.asarray(stds, dtype=float)[inside],
        iy=iy[inside],
        ix=ix[inside],
        names=[n for n, k in zip(names, inside, strict=True) if k],
    )


def satellite_weights(
    satellite: xr.DataArray | xr.Dataset, state: xr.DataArray | xr.Dataset, *, min_coverage: float = 0.5
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Area-averaging weights from the state cells to the satellite pixels.

    Returns
    -------
    weights, keep
        CSR (M, ny * nx) with rows summing to one, for the M pixels (in the satellite's (y, x) order,
        flattened) kept; ``keep`` is the bool mask over all ``nsy * nsx`` pixels.

    Raises
    ------
    GridMismatchError
        No satellite pixel is covered by at least ``min_coverage`` of state cells.
    """
    sgrid = find_grid(satellite)
    grid = _state_grid(state)
    if sgrid.curvilinear:
        raise GridMismatchError(
            f"The satellite field has a curvilinear grid ('{sgrid.lat}'/'{sgrid.lon}' are 2-D); regrid it "
            "to a rectilinear grid first."
        )
    glat = np.asarray(state[grid.lat].values, dtype=float)
    glon = np.asarray(state[grid.lon].values, dtype=float)
    slat = np.asarray(satellite[sgrid.lat].values, dtype=float)
    slon = np.asarray(satellite[sgrid.lon].values, dtype=float)
    wy = rw.conservative_weights_1d(rw.lat_cell_bounds(glat), rw.lat_cell_bounds(slat), "lat")
    wx = rw.conservative_weights_1d(
        rw.lon_cell_bounds(glon, grid.periodic), rw.lon_cell_bounds(slon, sgrid.periodic), "lon"
    )
    coverage = np.outer(wy.sum(axis=1), wx.sum(axis=1)).ravel()
    keep = coverage >= min_coverage
    if not keep.any():
        se, ge = grid_extent(satellite, sgrid), grid_extent(state, grid)
        raise GridMismatchError(
            f"The satellite grid (lat {se['lat_min']:.2f}..{se['lat_max']:.2f}, lon {se['lon_min']:.2f}.."
            f"{se['lon_max']:.2f}) does not overlap the state grid "
            f"(lat {ge['lat_min']:.2f}..{ge['lat_max']:.2f}, "
            f"lon {ge['lon_min']:.2f}..{ge['lon_max']:.2f}) by at least {min_coverage:.0%} of any pixel. "
            "Pass satellite data over the state domain."
        )
    w = sp.kron(sp.csr_matrix(wy), sp.csr_matrix(wx), format="csr")[np.flatnonzero(keep)]
    rows = np.asarray(w.sum(axis=1)).ravel()
    w = sp.diags(1.0 / rows) @ w
    return sp.csr_matrix(w), keep


def satellite_on_grid(
    satellite: xr.DataArray,
    state: xr.DataArray,
    *,
    std: Any = None,
    units: str | None = None,
    min_coverage: float = 0.5,
) -> SatelliteObservations:
    """Put a gridded (satellite) field on the state grid as area averages.

    Parameters
    ----------
    satellite
        ``(time, y, x)`` on its own latitude/longitude grid with a ``units`` attribute.
    state
        The background on the state grid.
    std
        Error std in the satellite's units: a number, or an array broadcastable to ``(y, x)``; default:
        attribute ``error_std``.
    units
        Units to convert to (default: the state's).
    min_coverage
        Minimum fraction of a pixel covered by the state grid for it to be used.

    Raises
    ------
    MissingCoordinateError, UnitError, GridMismatchError, InputError
        As :func:`stations_on_grid`, for the satellite grid.
    """
    sgrid = find_grid(satellite)
    weights, keep = satellite_weights(satellite, state, min_coverage=min_coverage)
    stds = error_std_values(satellite, std, None, "satellite field", "satellite_std")
    stds = np.broadcast_to(stds, sgrid.shape(satellite)).ravel() if stds.ndim <= 2 else stds
    target_units = units or state.attrs.get("units")
    if target_units is None:
        raise UnitError("The background has no units attribute; set background.attrs['units'].")
    conv, stds = _convert(satellite, stds, target_units, "satellite field")
    conv = on_state_times(conv, state, "satellite field")
    t = find_time(state)
    values = np.asarray(conv.transpose(t, *sgrid.dims).values, dtype=float)
    values = values.reshape(values.shape[0], -1)[:, keep]
    _check_any(values, satellite, "satellite")
    return SatelliteObservations(values=values, std=np.asarray(stds, dtype=float)[keep], weights=weights)
