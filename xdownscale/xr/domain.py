"""The model's domain on the input's grid: longitude conventions, coverage, cutting, edge padding, coastal
NaN, extra dimensions and horizontal chunking.

These are the xarray adapters that bring a coarse climate-model field, as it comes in a CMIP or CORDEX
file, into the shape the regridder and the network expect. No torch here.

What happens to an input (see also ``docs/user-guide/input.md``):

* **Longitudes** of a rectilinear input are wrapped into a 360-degree window centred on the model's
  domain and sorted (:func:`wrap_to_domain`), so 0..360 files (every CMIP model's native convention)
  over a region that crosses the Greenwich meridian, sorted or not, give the same cut as the same data
  in -180..180. Only the values outside the window are moved (by exactly 360), so the output equals
  that of the -180..180 file up to the rounding of ``lon - 360``.
* **Coverage** is checked for every grid type, in both directions (:func:`uncovered_fraction`): a
  field of ones is regridded onto the model grid after the input has been cut and padded; model cells
  (outside the model's own mask) that get no value are uncovered. Any uncovered cell is a
  :class:`~xdownscale.errors.GridMismatchError`, unless partial coverage is allowed with
  :func:`allow_partial_coverage`; then a warning names the uncovered fraction and those cells come back
  NaN.
* **Cutting and padding** (:func:`cut_to_domain`): the input is cut to the model domain plus two input
  cells, and the outermost input cells are repeated one cell outwards (:func:`pad_edges`, rectilinear
  and curvilinear grids alike), so an input covers the domain when its cell centres reach to within one
  of its cells of the model's outermost cell centres.
* **NaN over the sea** (:func:`fill_nan_nearest`): NaN cells of each coarse field are filled from the
  nearest valid cell of the same field before interpolation, so coastal land cells of the model are not
  lost next to a NaN (sea) coarse cell; the model's own mask sets the sea back to NaN. A field that is
  all NaN stays all NaN.
* **Extra dimensions** (:func:`squeeze_extra_dims`): dimensions other than time and the grid of length
  1 (a ``height`` of 2 m, a single ``realization``) are squeezed into scalar coordinates, which the
  output keeps. An input dimension or scalar coordinate called ``member`` (the ESM's ensemble) is
  renamed ``realization``, CMIP's name for it: ``member`` is the dimension of the generated ensemble.
  Longer extra dimensions are an :class:`~xdownscale.errors.InputError` that says how to loop over them.
* **Chunking** (:func:`rechunk_horizontal`): each field must be one dask chunk; chunks along the grid
  are merged (with a :class:`~xdownscale.errors.PerformanceWarning` unless ``warn=False``).
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Hashable, Iterator

import numpy as np
import xarray as xr

from ..errors import ChunkingError, GridMismatchError, InputError, PerformanceWarning, XDownscaleWarning
from .cf import Grid, find_grid, grid_extent, grid_spacing_km

__all__ = [
    "ENSEMBLE_DIM",
    "MAX_FIELD_BYTES",
    "allow_partial_coverage",
    "cut_to_domain",
    "degree_spacing",
    "domain_centre_lon",
    "fill_nan_nearest",
    "pad_edges",
    "partial_coverage_allowed",
    "rechunk_horizontal",
    "squeeze_extra_dims",
    "uncovered_fraction",
    "wrap_to_domain",
]

#: one horizontal field larger than this (bytes) cannot be made a single dask chunk
MAX_FIELD_BYTES = 2**31
#: the name an input's own ensemble dimension ``member`` is given (CMIP's ``realization``)
ENSEMBLE_DIM = "realization"
#: the generated ensemble dimension of the output
MEMBER_DIM = "member"

_PARTIAL: contextvars.ContextVar[bool] = contextvars.ContextVar("xdownscale_partial_coverage", default=False)
_EPS = 1e-6


def _label(da: xr.DataArray) -> str:
    return f"'{da.name}'" if da.name is not None else "the input"


# --------------------------------------------------------------------------------------------------
# partial coverage switch
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def allow_partial_coverage(allow: bool = True) -> Iterator[None]:
    """Allow inputs that cover the model's domain only partly, inside a ``with`` block.

    Model cells outside the input come back NaN, and a :class:`~xdownscale.errors.XDownscaleWarning`
    names the uncovered fraction. Without it such an input is a
    :class:`~xdownscale.errors.GridMismatchError`. The setting is per thread and per asyncio task
    (a :class:`contextvars.ContextVar`); the coverage check runs when the call is made, so lazy
    (dask) results may be computed after the block.

    Parameters
    ----------
    allow
        True to allow partial coverage, False to forbid it again inside an outer block.

    Examples
    --------
    >>> from xdownscale.xr.domain import allow_partial_coverage, partial_coverage_allowed
    >>> with allow_partial_coverage():
    ...     partial_coverage_allowed()
    True
    >>> partial_coverage_allowed()
    False
    """
    token = _PARTIAL.set(bool(allow))
    try:
        yield
    finally:
        _PARTIAL.reset(token)


def partial_coverage_allowed() -> bool:
    """Whether partial coverage is allowed here (see :func:`allow_partial_coverage`)."""
    return _PARTIAL.get()


# --------------------------------------------------------------------------------------------------
# spacing and chunking
# --------------------------------------------------------------------------------------------------
def degree_spacing(da: xr.DataArray | xr.Dataset, grid: Grid) -> tuple[float, float]:
    """Typical grid spacing ``(dy, dx)`` in degrees (median step; curvilinear: from km at 111.2 km/deg).

    Longitudes are compared modulo 360, so 0..360 axes cut across the Greenwich meridian (sorted or not)
    give their true step.

    Examples
    --------
    >>> import xarray as xr
    >>> from xdownscale.xr.cf import find_grid
    >>> g = xr.Dataset(coords={"lat": ("lat", [40.0, 41.0], {"units": "degrees_north"}),
    ...                        "lon": ("lon", [0.0, 2.0, 356.0, 358.0], {"units": "degrees_east"})})
    >>> degree_spacing(g, find_grid(g))
    (1.0, 2.0)
    """
    if grid.curvilinear:
        dy_km, dx_km = grid_spacing_km(da, grid)
        return dy_km / 111.2, dx_km / 111.2
    lat = np.asarray(da[grid.lat].values, dtype=float)
    lon = np.asarray(da[grid.lon].values, dtype=float)
    dy = float(np.median(np.abs(np.diff(lat)))) if lat.size > 1 else 180.0
    if lon.size > 1:
        step = np.abs((np.diff(lon) + 180.0) % 360.0 - 180.0)
        dx = float(np.median(step))
    else:
        dx = 360.0
    return dy, dx


def rechunk_horizontal(
    da: xr.DataArray, grid: Grid, *, warn: bool = True, max_field_bytes: int = MAX_FIELD_BYTES
) -> xr.DataArray:
    """Merge dask chunks along the horizontal dims so that each field is one chunk.

    Parameters
    ----------
    da
        Dask-backed (or NumPy-backed: returned unchanged) data.
    grid
        Its grid (:func:`~xdownscale.xr.cf.find_grid`).
    warn
        Warn (:class:`~xdownscale.errors.PerformanceWarning`) when chunks are merged. Callers that
        chose the chunks themselves (the command line) pass False.
    max_field_bytes
        Largest field that may become one chunk.

    Raises
    ------
    ChunkingError
        One field is larger than ``max_field_bytes``.
    """
    if da.chunks is None:
        return da
    chunks = dict(zip(da.dims, da.chunks, strict=False))
    if all(len(chunks[d]) == 1 for d in grid.dims):
        return da
    field_bytes = da.sizes[grid.ydim] * da.sizes[grid.xdim] * da.dtype.itemsize
    if field_bytes > max_field_bytes:
        raise ChunkingError(
            f"{_label(da)} is chunked along {grid.dims} and one field ({field_bytes / 2**30:.1f} GiB) is too "
            "large to become one chunk. Cut the domain first (e.g. with .sel) or chunk only along time."
        )
    if warn:
        warnings.warn(
            f"{_label(da)} is chunked along its horizontal dims {grid.dims}; rechunking them to one chunk "
            f"each. Chunk along time only instead: da.chunk({{'time': 32, {grid.ydim!r}: -1, "
            f"{grid.xdim!r}: -1}}).",
            PerformanceWarning,
            stacklevel=3,
        )
    return da.chunk({grid.ydim: -1, grid.xdim: -1})


# --------------------------------------------------------------------------------------------------
# extra dimensions
# --------------------------------------------------------------------------------------------------
def squeeze_extra_dims(da: xr.DataArray, grid: Grid, time: str) -> xr.DataArray:
    """Bring ``da`` to (time, y, x): squeeze length-1 extra dims into scalar coordinates.

    An input dimension or scalar coordinate named ``member`` is renamed ``realization`` first (the
    output's ``member`` is the generated ensemble). Length-1 dims such as ``height`` (2 m) or a single
    ``realization`` are squeezed; their coordinate values stay as scalar coordinates.

    Raises
    ------
    InputError
        An extra dimension is longer than 1 (e.g. an ensemble of several realizations, or several
        heights), or ``member`` and ``realization`` are both present.

    Examples
    --------
    >>> import numpy as np
    >>> from xdownscale.datasets import synthetic_precipitation
    >>> from xdownscale.xr.cf import find_grid
    >>> pr = synthetic_precipitation(ny=4, nx=4, ntime=2).expand_dims(height=[2.0], member=["r1i1p1"])
    >>> out = squeeze_extra_dims(pr, find_grid(pr), "time")
    >>> out.dims, float(out["height"]), str(out["realization"].values)
    (('time', 'lat', 'lon'), 2.0, 'r1i1p1')
    """
    if MEMBER_DIM in da.dims or MEMBER_DIM in da.coords:
        if ENSEMBLE_DIM in da.dims or ENSEMBLE_DIM in da.coords:
            raise InputError(
                f"{_label(da)} has both '{MEMBER_DIM}' and '{ENSEMBLE_DIM}'; xdownscale names the input's "
                f"ensemble '{ENSEMBLE_DIM}' and the generated one '{MEMBER_DIM}'. Drop or rename one first, "
                f"e.g. da.rename({{'{MEMBER_DIM}': 'esm_member'}})."
            )
        da = da.rename({MEMBER_DIM: ENSEMBLE_DIM})
        renamed = f" (the input's '{MEMBER_DIM}', renamed: '{MEMBER_DIM}' is the generated ensemble)"
    else:
        renamed = ""
    keep = {time, *grid.dims}
    extra = [d for d in da.dims if d not in keep]
    long = {str(d): da.sizes[d] for d in extra if da.sizes[d] > 1}
    if long:
        first, size = next(iter(long.items()))
        listed = ", ".join(
            f"'{d}' (length {n}){renamed if d == ENSEMBLE_DIM else ''}" for d, n in long.items()
        )
        raise InputError(
            f"{_label(da)} has the extra dimension(s) {listed} besides time '{time}' and the grid "
            f"{grid.dims}; a model downscales one field per time step. Select one, e.g. "
            f"da.isel({first}=0), or downscale each and combine: xr.concat([da.isel({first}=i)"
            f".downscale.cm(model=...) for i in range({size})], dim='{first}'). Noise is keyed by time "
            "and member, so use a different seed= per slice for independent noise."
        )
    for d in extra:
        da = da.squeeze(d, drop=False)
    return da


# --------------------------------------------------------------------------------------------------
# longitudes
# --------------------------------------------------------------------------------------------------
def domain_centre_lon(target: xr.DataArray | xr.Dataset, grid: Grid | None = None) -> float:
    """Centre longitude of a (regional) domain: the midpoint of its longitude range, taken on the
    circle, so domains across the Greenwich meridian or the dateline have their true centre."""
    grid = grid or find_grid(target)
    lon = np.deg2rad(np.asarray(target[grid.lon].values, dtype=float).ravel())
    mean = np.arctan2(np.nanmean(np.sin(lon)), np.nanmean(np.cos(lon)))
    rel = (np.rad2deg(lon - mean) + 180.0) % 360.0 - 180.0
    return float(np.rad2deg(mean) + 0.5 * (np.nanmin(rel) + np.nanmax(rel)))


def _wrap_values(lon: np.ndarray, start: float) -> np.ndarray:
    """Move values outside [start, start + 360) by whole turns; values inside are left bit-identical."""
    lon = np.asarray(lon, dtype=float)
    turns = np.floor((lon - start) / 360.0)
    return np.where(turns == 0, lon, lon - 360.0 * turns)


def wrap_to_domain(da: xr.DataArray, grid: Grid, centre: float) -> xr.DataArray:
    """Rectilinear ``da`` with longitudes in ``[centre - 180, centre + 180)``, ascending, and latitude
    ascending, horizontal dims last.

    A 0..360 file over a region that crosses the Greenwich meridian (sorted 0, 1.4, ..., 358.6 or cut
    as 345, ..., 358.6, 0, 1.4) becomes contiguous around ``centre``. Curvilinear grids are returned
    with their dims reordered only (their 2-D coordinates are handled by the regridder in any
    convention).

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> from xdownscale.xr.cf import find_grid
    >>> da = xr.DataArray(np.arange(4.0)[None, :], dims=("lat", "lon"), coords={
    ...     "lat": ("lat", [40.0], {"units": "degrees_north"}),
    ...     "lon": ("lon", [0.0, 2.0, 356.0, 358.0], {"units": "degrees_east"})})
    >>> out = wrap_to_domain(da, find_grid(da), centre=0.0)
    >>> out["lon"].values.tolist(), out.values.tolist()
    ([-4.0, -2.0, 0.0, 2.0], [[2.0, 3.0, 0.0, 1.0]])
    """
    da = da.transpose(..., grid.ydim, grid.xdim)
    if grid.curvilinear:
        return da
    lat = np.asarray(da[grid.lat].values, dtype=float)
    if lat.size > 1 and lat[0] > lat[-1]:
        da = da.isel({grid.ydim: slice(None, None, -1)})
    lon = _wrap_values(np.asarray(da[grid.lon].values, dtype=float), centre - 180.0)
    order = np.argsort(lon, kind="stable")
    da = da.assign_coords({grid.lon: (grid.xdim, lon, da[grid.lon].attrs)})
    if not np.array_equal(order, np.arange(order.size)):
        da = da.isel({grid.xdim: order})
    return da


# --------------------------------------------------------------------------------------------------
# cutting, padding, coverage
# --------------------------------------------------------------------------------------------------
def pad_edges(da: xr.DataArray, grid: Grid) -> xr.DataArray:
    """Repeat the outermost cells one cell outwards, with coordinates continued by one grid step.

    Rectilinear grids continue their 1-D latitude/longitude; curvilinear grids continue their 2-D
    latitude/longitude linearly along each dim (longitude steps taken modulo 360). Latitudes are
    clipped to [-90, 90]. This lets bilinear interpolation reach the model's outermost cells when the
    input's outermost centres lie within one input cell of them. Dask inputs keep one chunk per field.
    """
    padded = da.pad({grid.ydim: 1, grid.xdim: 1}, mode="edge")
    coords: dict[Hashable, tuple[tuple[str, ...], np.ndarray, dict[Hashable, object]]] = {}
    if grid.curvilinear:
        for name in (grid.lat, grid.lon):
            values = np.asarray(da[name].transpose(*grid.dims).values, dtype=float)
            ext = _extend_2d(values, periodic=name == grid.lon)
            if name == grid.lat:
                ext = np.clip(ext, -90.0, 90.0)
            coords[name] = (grid.dims, ext, dict(da[name].attrs))
    else:
        for name, dim in ((grid.lat, grid.ydim), (grid.lon, grid.xdim)):
            values = np.asarray(da[name].values, dtype=float)
            step = values[1] - values[0] if values.size > 1 else 1.0
            ext = np.concatenate([[values[0] - step], values, [values[-1] + step]])
            if name == grid.lat:
                ext = np.clip(ext, -90.0, 90.0)
            coords[name] = ((dim,), ext, dict(da[name].attrs))
    padded = padded.assign_coords(coords)
    if padded.chunks is not None:  # dask puts the padding into chunks of its own
        padded = padded.chunk({grid.ydim: -1, grid.xdim: -1})
    return padded


def _extend_2d(values: np.ndarray, *, periodic: bool) -> np.ndarray:
    """Continue a 2-D coordinate array by one cell on every side (linear extrapolation)."""

    def step(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d = a - b
        return (d + 180.0) % 360.0 - 180.0 if periodic else d

    out = values
    for axis in (0, 1):
        n = out.shape[axis]
        first = np.take(out, [0], axis=axis)
        last = np.take(out, [n - 1], axis=axis)
        if n > 1:
            first = first + step(first, np.take(out, [1], axis=axis))
            last = last + step(last, np.take(out, [n - 2], axis=axis))
        out = np.concatenate([first, out, last], axis=axis)
    return out


def uncovered_fraction(da: xr.DataArray, grid: Grid, target: xr.Dataset) -> float:
    """Fraction of the model's cells (outside its own mask) that ``da``'s grid does not reach.

    A field of ones on ``da``'s horizontal grid is regridded (bilinear) onto ``target``; cells left
    without a value are uncovered. Works alike for rectilinear, curvilinear and global grids.
    ``target["mask"]`` (True = the model has a value), when present, limits the count to the model's
    own cells. Only coordinates are read: dask data is not computed.
    """
    from .regrid import regrid

    coords = {k: v for k, v in da.coords.items() if set(v.dims) <= set(grid.dims) and v.dims}
    ones = xr.DataArray(np.ones(grid.shape(da)), dims=grid.dims, coords=coords)
    on_target = regrid(ones, target, "bilinear")
    missing = on_target.isnull()
    if "mask" in target:
        needed = target["mask"].astype(bool)
        total = int(needed.sum())
        uncovered = int((missing & needed).sum())
    else:
        total = int(missing.size)
        uncovered = int(missing.sum())
    return uncovered / total if total else 0.0


def _extent_text(obj: xr.DataArray | xr.Dataset, grid: Grid, centre: float) -> str:
    e = grid_extent(obj, grid)
    lon = _wrap_values(np.asarray(obj[grid.lon].values, dtype=float).ravel(), centre - 180.0)
    return (
        f"lat {e['lat_min']:.2f}..{e['lat_max']:.2f}, lon {float(np.nanmin(lon)):.2f}.."
        f"{float(np.nanmax(lon)):.2f}"
    )


def cut_to_domain(
    da: xr.DataArray, grid: Grid, target: xr.Dataset, *, partial: bool | None = None
) -> xr.DataArray:
    """Cut ``da`` to the model domain ``target`` plus a margin, pad its edges and check coverage.

    Parameters
    ----------
    da
        Coarse input on a rectilinear (any longitude convention, sorted or not, global or regional) or
        curvilinear grid, any leading dims.
    grid
        Its grid (:func:`~xdownscale.xr.cf.find_grid`).
    target
        The model's grid: a Dataset with latitude/longitude and, optionally, a boolean ``mask``.
    partial
        Allow partial coverage (warning) instead of an error; None: as set by
        :func:`allow_partial_coverage`.

    Returns
    -------
    DataArray
        ``da`` with horizontal dims last; rectilinear grids with ascending latitude and longitudes
        around the domain's centre; cut to the domain plus two cells and padded by one cell
        (:func:`pad_edges`). A global input and a global model are not cut.

    Raises
    ------
    GridMismatchError
        Model cells (outside its mask) lie beyond the input, and partial coverage is not allowed. The
        message gives both extents and the uncovered fraction.

    Warns
    -----
    XDownscaleWarning
        Partial coverage is allowed and some model cells are not covered (they come back NaN).
    """
    allow = partial_coverage_allowed() if partial is None else bool(partial)
    tgrid = find_grid(target)
    centre = domain_centre_lon(target, tgrid)
    da = wrap_to_domain(da, grid, centre)
    source = _extent_text(da, grid, centre)
    if not (grid.periodic and tgrid.periodic):
        da = pad_edges(_cut(da, grid, target, tgrid, centre), grid)
    fraction = uncovered_fraction(da, grid, target)
    if fraction > 0:
        text = (
            f"{_label(da)} covers {source}; the model grid spans {_extent_text(target, tgrid, centre)}, so "
            f"{fraction:.1%} of the model's cells lie outside the input (beyond one input cell from its "
            "outermost cell centres)"
        )
        if not allow:
            raise GridMismatchError(
                f"{text}. Pass an input that covers the model's domain, or allow partial coverage (the "
                "uncovered cells come back NaN): with xdownscale.xr.domain.allow_partial_coverage(): ..."
            )
        warnings.warn(f"{text}; they come back NaN.", XDownscaleWarning, stacklevel=3)
    return da


def _cut(da: xr.DataArray, grid: Grid, target: xr.Dataset, tgrid: Grid, centre: float) -> xr.DataArray:
    """Select the input cells within two input cells of the target's extent (index ranges)."""
    dy, dx = degree_spacing(da, grid)
    tlat = np.asarray(target[tgrid.lat].values, dtype=float)
    tlon = _wrap_values(np.asarray(target[tgrid.lon].values, dtype=float), centre - 180.0)
    lat_lo, lat_hi = np.nanmin(tlat) - 2 * dy - _EPS, np.nanmax(tlat) + 2 * dy + _EPS
    lon_lo, lon_hi = np.nanmin(tlon) - 2 * dx - _EPS, np.nanmax(tlon) + 2 * dx + _EPS
    if grid.curvilinear:
        lat = np.asarray(da[grid.lat].transpose(*grid.dims).values, dtype=float)
        lon = _wrap_values(np.asarray(da[grid.lon].transpose(*grid.dims).values, dtype=float), centre - 180.0)
        inside = (lat >= lat_lo) & (lat <= lat_hi) & (lon >= lon_lo) & (lon <= lon_hi)
        rows = np.flatnonzero(inside.any(axis=1))
        cols = np.flatnonzero(inside.any(axis=0))
        if rows.size == 0 or cols.size == 0:
            return da
        ysel = np.arange(rows[0], rows[-1] + 1)
        xsel = np.arange(cols[0], cols[-1] + 1)
    else:
        lat = np.asarray(da[grid.lat].values, dtype=float)
        lon = np.asarray(da[grid.lon].values, dtype=float)
        ysel = np.flatnonzero((lat >= lat_lo) & (lat <= lat_hi))
        xsel = np.flatnonzero((lon >= lon_lo) & (lon <= lon_hi))
        if ysel.size == 0 or xsel.size == 0:
            return da
    if ysel.size == da.sizes[grid.ydim] and xsel.size == da.sizes[grid.xdim]:
        return da
    return da.isel({grid.ydim: ysel, grid.xdim: xsel})


# --------------------------------------------------------------------------------------------------
# NaN over the sea
# --------------------------------------------------------------------------------------------------
def _fill_fields(values: np.ndarray, sampling: tuple[float, float]) -> np.ndarray:
    from scipy import ndimage

    out = np.array(values, copy=True)
    flat = out.reshape(-1, *out.shape[-2:])
    for field in flat:
        nan = np.isnan(field)
        if not nan.any() or nan.all():
            continue
        index = ndimage.distance_transform_edt(
            nan, sampling=sampling, return_distances=False, return_indices=True
        )
        field[...] = field[tuple(index)]
    return out


def fill_nan_nearest(da: xr.DataArray, grid: Grid) -> xr.DataArray:
    """Fill the NaN cells of each field from its nearest valid cell (distances in km along the grid).

    Coarse climate-model fields from providers that mask the sea come with NaN over it; bilinear
    interpolation would then lose the model's coastal land cells next to them. Filling before
    interpolation keeps them; the model's own mask sets the sea back to NaN afterwards. A field that is
    entirely NaN (a missing day) stays NaN. Lazy for dask input (one task per chunk, fields in one
    chunk each).

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> from xdownscale.xr.cf import find_grid
    >>> da = xr.DataArray([[np.nan, 1.0, 2.0]], dims=("lat", "lon"), coords={
    ...     "lat": ("lat", [40.0], {"units": "degrees_north"}),
    ...     "lon": ("lon", [0.0, 1.0, 2.0], {"units": "degrees_east"})})
    >>> fill_nan_nearest(da, find_grid(da)).values.tolist()
    [[1.0, 1.0, 2.0]]
    """
    dy_km, dx_km = grid_spacing_km(da, grid)
    sampling = (
        float(dy_km) if np.isfinite(dy_km) and dy_km > 0 else 1.0,
        float(dx_km) if np.isfinite(dx_km) and dx_km > 0 else 1.0,
    )
    da = da.transpose(..., grid.ydim, grid.xdim)
    if da.chunks is None:
        if not np.isnan(da.values).any():
            return da
        return da.copy(data=_fill_fields(da.values, sampling))
    import dask.array as dsa

    data = da.data
    if len(data.chunks[-2]) > 1 or len(data.chunks[-1]) > 1:
        data = data.rechunk({data.ndim - 2: -1, data.ndim - 1: -1})
    filled = dsa.map_blocks(_fill_fields, data, sampling, dtype=data.dtype, token="xdownscale-fill-nan")
    return da.copy(data=filled)
