"""Find the horizontal grid and the time axis of a DataArray the CF way.

Latitude and longitude are looked up with cf-xarray from their CF attributes (``standard_name``,
``units`` such as ``degrees_north``, ``axis``), never by a hard-coded name. Many real files carry no
attributes at all on their coordinates; for those, cf-xarray's own heuristics
(:meth:`cf_xarray.accessor.CFAccessor.guess_coord_axis`) are tried next and the values are checked
to be plausible (latitudes within [-90, 90]). When both fail, :class:`MissingCoordinateError` lists
what was found and the attribute to set.

Supported layouts
-----------------
* rectilinear: 1-D latitude and longitude dimension coordinates, in any dimension order, latitude
  ascending or descending, longitude in 0..360 or -180..180;
* curvilinear: 2-D latitude/longitude auxiliary coordinates over two dimensions (for example a
  rotated-pole grid with dims ``rlat``/``rlon``).

A grid is *periodic* (global in longitude) when its longitudes wrap around the whole circle.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal, overload

import cf_xarray  # noqa: F401  (registers the .cf accessor)
import numpy as np
import xarray as xr

from ..errors import InputError, MissingCoordinateError

__all__ = [
    "Grid",
    "find_grid",
    "find_time",
    "grid_extent",
    "grid_spacing_km",
    "standard_layout",
    "wrap_longitude",
]

EARTH_RADIUS_KM = 6371.0
KM_PER_DEGREE = np.pi * EARTH_RADIUS_KM / 180.0


@dataclass(frozen=True)
class Grid:
    """Where the horizontal grid of an xarray object lives.

    Attributes
    ----------
    lat, lon
        Names of the latitude and longitude coordinates.
    ydim, xdim
        Names of the two horizontal dimensions (equal to ``lat``/``lon`` on rectilinear grids).
    curvilinear
        True when latitude and longitude are 2-D coordinates.
    periodic
        True when the grid wraps around the globe in longitude.
    """

    lat: str
    lon: str
    ydim: str
    xdim: str
    curvilinear: bool
    periodic: bool

    @property
    def dims(self) -> tuple[str, str]:
        """The horizontal dimensions, ``(ydim, xdim)``."""
        return (self.ydim, self.xdim)

    def shape(self, obj: xr.DataArray | xr.Dataset) -> tuple[int, int]:
        """The horizontal shape ``(ny, nx)`` of ``obj``."""
        return (obj.sizes[self.ydim], obj.sizes[self.xdim])


def _describe(obj: xr.DataArray | xr.Dataset) -> str:
    parts = []
    for name, coord in obj.coords.items():
        attrs = {k: coord.attrs[k] for k in ("standard_name", "units", "axis") if k in coord.attrs}
        parts.append(f"{name!s}{tuple(str(d) for d in coord.dims)} {attrs or '(no CF attributes)'}")
    return "; ".join(parts) if parts else "no coordinates at all"


def _label(obj: xr.DataArray | xr.Dataset) -> str:
    name = getattr(obj, "name", None)
    return f"'{name}'" if name is not None else "the input"


def _attrs_key(attrs: dict[Any, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(k), repr(v)) for k, v in attrs.items()))


def _cf_lookup(obj: xr.DataArray | xr.Dataset) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """cf-xarray's ``coordinates`` and ``axes`` of ``obj``, kept for objects whose coordinates have the
    same names, dims, dtypes and attributes: they depend on nothing else, and a downscaling looks them up
    a few tens of times on the same grids (about 2 ms each)."""
    key: Any = (
        type(obj).__name__,
        tuple(
            (str(n), tuple(map(str, v.dims)), v.dtype.str, _attrs_key(v.attrs)) for n, v in obj.coords.items()
        ),
        str(obj.attrs.get("coordinates")),
    )
    if isinstance(obj, xr.Dataset):
        key += (tuple(str(v.attrs.get("coordinates")) for v in obj.data_vars.values()),)
    with _CF_LOCK:
        hit = _CF_CACHE.get(key)
        if hit is not None:
            _CF_CACHE.move_to_end(key)
            return hit
    parts: list[dict[str, list[str]]] = []
    for what in ("coordinates", "axes"):
        try:
            parts.append({k: list(map(str, v)) for k, v in getattr(obj.cf, what).items()})
        except Exception:  # cf-xarray can fail on exotic attributes; treat as "nothing found"
            parts.append({})
    found = (parts[0], parts[1])
    with _CF_LOCK:
        _CF_CACHE[key] = found
        while len(_CF_CACHE) > 64:
            _CF_CACHE.popitem(last=False)
    return found


_CF_LOCK = threading.Lock()
_CF_CACHE: OrderedDict[Any, tuple[dict[str, list[str]], dict[str, list[str]]]] = OrderedDict()


def _cf_names(obj: xr.DataArray | xr.Dataset, key: str) -> list[str]:
    names = _cf_lookup(obj)[0].get(key, [])
    return [n for n in names if n in obj.coords]


def _pick(obj: xr.DataArray | xr.Dataset, names: list[str]) -> str | None:
    """Prefer a coordinate that spans the data's dims, then the one with most dimensions."""
    if not names:
        return None
    dims = set(obj.dims)
    usable = [n for n in names if set(obj[n].dims) <= dims and obj[n].ndim in (1, 2)]
    if not usable:
        return None
    return sorted(usable, key=lambda n: -obj[n].ndim)[0]


def _plausible(obj: xr.DataArray | xr.Dataset, lat: str, lon: str) -> bool:
    la = np.asarray(obj[lat].values, dtype=float)
    lo = np.asarray(obj[lon].values, dtype=float)
    finite = np.isfinite(la).all() and np.isfinite(lo).all()
    return bool(
        finite and np.nanmin(la) >= -90.0 - 1e-6 and np.nanmax(la) <= 90.0 + 1e-6 and np.ptp(lo) <= 720.0
    )


def find_grid(obj: xr.DataArray | xr.Dataset) -> Grid:
    """Find the horizontal grid of ``obj``.

    Parameters
    ----------
    obj
        DataArray or Dataset with latitude and longitude coordinates.

    Returns
    -------
    Grid
        Names of the coordinates and dimensions, and whether the grid is curvilinear and global.

    Raises
    ------
    MissingCoordinateError
        Latitude or longitude cannot be found, or their dimensions do not form a 2-D grid.
    """
    lat = _pick(obj, _cf_names(obj, "latitude"))
    lon = _pick(obj, _cf_names(obj, "longitude"))
    if lat is None or lon is None:
        try:
            guessed = obj.cf.guess_coord_axis()
        except Exception:
            guessed = obj
        glat = lat or _pick(guessed, _cf_names(guessed, "latitude"))
        glon = lon or _pick(guessed, _cf_names(guessed, "longitude"))
        if glat is not None and glon is not None and _plausible(obj, glat, glon):
            lat, lon = glat, glon
    if lat is None or lon is None:
        missing = " and ".join(n for n, v in (("latitude", lat), ("longitude", lon)) if v is None)
        raise MissingCoordinateError(
            f"Cannot find the {missing} of {_label(obj)}. Found: {_describe(obj)}. "
            "Set the CF attributes on the coordinates, e.g. "
            "da['y'].attrs['standard_name'] = 'latitude' (units 'degrees_north') and "
            "da['x'].attrs['standard_name'] = 'longitude' (units 'degrees_east')."
        )
    la, lo = obj[lat], obj[lon]
    if la.ndim == 1 and lo.ndim == 1:
        ydim, xdim = la.dims[0], lo.dims[0]
        curvilinear = False
        if ydim == xdim:
            raise MissingCoordinateError(
                f"{_label(obj)} has latitude '{lat}' and longitude '{lon}' along the same dimension "
                f"'{ydim}': these are points (e.g. stations), not a grid. Pass gridded data with "
                "separate latitude and longitude dimensions."
            )
    elif la.ndim == 2 and lo.ndim == 2 and set(la.dims) == set(lo.dims):
        ydim, xdim = _curvilinear_dims(obj, lat, la.dims)
        curvilinear = True
    else:
        raise MissingCoordinateError(
            f"{_label(obj)} has latitude '{lat}' with dims {tuple(map(str, la.dims))} and longitude "
            f"'{lon}' with dims {tuple(map(str, lo.dims))}; expected both 1-D (rectilinear) or both "
            "2-D over the same two dimensions (curvilinear)."
        )
    grid = Grid(str(lat), str(lon), str(ydim), str(xdim), curvilinear, False)
    return Grid(grid.lat, grid.lon, grid.ydim, grid.xdim, curvilinear, _is_periodic(obj, grid))


def _curvilinear_dims(obj: xr.DataArray | xr.Dataset, lat: str, dims: tuple[Any, ...]) -> tuple[Any, Any]:
    """Order the two dims of a 2-D latitude as (y, x): latitude varies most along y."""
    a, b = dims
    axes = _cf_lookup(obj)[1]
    if b in axes.get("Y", []) or a in axes.get("X", []):
        return b, a
    if a in axes.get("Y", []) or b in axes.get("X", []):
        return a, b
    la = np.asarray(obj[lat].transpose(a, b).values, dtype=float)
    along_a = np.nanmean(np.abs(np.diff(la, axis=0))) if la.shape[0] > 1 else 0.0
    along_b = np.nanmean(np.abs(np.diff(la, axis=1))) if la.shape[1] > 1 else 0.0
    return (a, b) if along_a >= along_b else (b, a)


def _is_periodic(obj: xr.DataArray | xr.Dataset, grid: Grid) -> bool:
    lon = np.asarray(obj[grid.lon].values, dtype=float)
    if grid.curvilinear:
        lon = np.asarray(obj[grid.lon].transpose(grid.ydim, grid.xdim).values, dtype=float)
        row = lon[lon.shape[0] // 2]
    else:
        row = lon
    if row.size < 3:
        return False
    step = np.abs(np.diff(np.unwrap(np.deg2rad(row))))
    span = np.rad2deg(step.sum() + np.median(step))
    return bool(abs(span - 360.0) < 0.5 * np.rad2deg(np.median(step)) + 1e-6)


@overload
def find_time(obj: xr.DataArray | xr.Dataset, *, required: Literal[True] = ...) -> str: ...
@overload
def find_time(obj: xr.DataArray | xr.Dataset, *, required: bool) -> str | None: ...
def find_time(obj: xr.DataArray | xr.Dataset, *, required: bool = True) -> str | None:
    """Name of the time dimension of ``obj`` (CF ``T`` axis or datetime-typed dimension).

    Raises
    ------
    MissingCoordinateError
        ``required`` is True and no time dimension exists.
    """
    coordinates, axes = _cf_lookup(obj)
    names = axes.get("T", []) + coordinates.get("time", [])
    for n in names:
        if n in obj.dims:
            return str(n)
    for d in obj.dims:
        if d in obj.coords:
            values = obj[d]
            if np.issubdtype(values.dtype, np.datetime64) or (
                values.dtype == object and values.size and hasattr(values.values.flat[0], "calendar")
            ):
                return str(d)
    if required:
        raise MissingCoordinateError(
            f"Cannot find a time dimension in {_label(obj)} (dims {tuple(map(str, obj.dims))}). "
            "Give it a datetime coordinate (decode it with xr.open_dataset(..., decode_times=True)) "
            "or set the attribute axis='T' on the time coordinate."
        )
    return None


def wrap_longitude(lon: np.ndarray | xr.DataArray, start: float = -180.0) -> Any:
    """Map longitudes into ``[start, start + 360)``."""
    return (lon - start) % 360.0 + start


def standard_layout(obj: xr.DataArray | xr.Dataset, grid: Grid | None = None) -> Any:
    """Return ``obj`` with horizontal dims last (y, x) and, on rectilinear grids, ascending
    latitude and monotonically increasing longitude (wrapped to -180..180 unless that breaks
    monotonicity, then 0..360)."""
    grid = grid or find_grid(obj)
    if isinstance(obj, xr.DataArray):
        obj = obj.transpose(..., grid.ydim, grid.xdim)
    if grid.curvilinear:
        return obj
    lat = obj[grid.lat].values
    if lat.size > 1 and lat[0] > lat[-1]:
        obj = obj.isel({grid.ydim: slice(None, None, -1)})
    lon = np.asarray(obj[grid.lon].values, dtype=float)
    for start in (-180.0, 0.0):
        wrapped = wrap_longitude(lon, start)
        order = np.argsort(wrapped, kind="stable")
        if grid.periodic or (np.all(np.diff(wrapped[order]) > 0) and _contiguous(wrapped[order])):
            new = obj.assign_coords({grid.lon: (grid.xdim, wrapped, obj[grid.lon].attrs)})
            return new.isel({grid.xdim: order})
    return obj


def _contiguous(lon: np.ndarray) -> bool:
    if lon.size < 3:
        return True
    step = np.diff(lon)
    return bool(step.max() <= 1.5 * np.median(step) + 1e-9)


def grid_spacing_km(obj: xr.DataArray | xr.Dataset, grid: Grid | None = None) -> tuple[float, float]:
    """Mean grid spacing ``(dy_km, dx_km)``, with the x spacing scaled by cos(latitude)."""
    grid = grid or find_grid(obj)
    lat = obj[grid.lat]
    lon = obj[grid.lon]
    if grid.curvilinear:
        la = np.deg2rad(np.asarray(lat.transpose(grid.ydim, grid.xdim).values, dtype=float))
        lo = np.deg2rad(np.asarray(lon.transpose(grid.ydim, grid.xdim).values, dtype=float))
        steps_y = (
            _haversine(la[1:, :], lo[1:, :], la[:-1, :], lo[:-1, :])
            if la.shape[0] > 1
            else np.array([np.nan])
        )
        steps_x = (
            _haversine(la[:, 1:], lo[:, 1:], la[:, :-1], lo[:, :-1])
            if la.shape[1] > 1
            else np.array([np.nan])
        )
        return float(np.nanmean(steps_y)), float(np.nanmean(steps_x))
    la = np.asarray(lat.values, dtype=float)
    lo = np.asarray(lon.values, dtype=float)
    dy = float(np.mean(np.abs(np.diff(la)))) * KM_PER_DEGREE if la.size > 1 else float("nan")
    # median of the steps taken modulo 360: a 0..360 axis cut across the Greenwich meridian and stored
    # sorted (0.7, 2.1, ..., 345.9, ...) has one jump that is not a grid step
    dlon = float(np.median(np.abs((np.diff(lo) + 180.0) % 360.0 - 180.0))) if lo.size > 1 else float("nan")
    dx = dlon * KM_PER_DEGREE * float(np.mean(np.cos(np.deg2rad(la))))
    return dy, dx


def _haversine(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0, 1)))


def grid_extent(obj: xr.DataArray | xr.Dataset, grid: Grid | None = None) -> dict[str, float]:
    """Latitude and longitude bounds of the cell centres (longitudes as in ``obj``)."""
    grid = grid or find_grid(obj)
    la = np.asarray(obj[grid.lat].values, dtype=float)
    lo = np.asarray(obj[grid.lon].values, dtype=float)
    return {
        "lat_min": float(np.nanmin(la)),
        "lat_max": float(np.nanmax(la)),
        "lon_min": float(np.nanmin(lo)),
        "lon_max": float(np.nanmax(lo)),
    }


def require_float(da: xr.DataArray) -> xr.DataArray:
    """Integer data (e.g. packed precipitation) is promoted to float32 with a check on its name."""
    if not np.issubdtype(da.dtype, np.floating):
        if not np.issubdtype(da.dtype, np.number):
            raise InputError(
                f"{_label(da)} has dtype {da.dtype}; expected numbers. Decode the file with "
                "xr.open_dataset(..., mask_and_scale=True) or convert with da.astype('float32')."
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            da = da.astype("float32")
    return da
