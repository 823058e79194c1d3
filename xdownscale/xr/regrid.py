"""Regrid DataArrays onto the horizontal grid of another DataArray or Dataset.

:func:`regrid` is the one-call entry point; :class:`Regridder` computes the weights once and applies
them to any number of arrays on the same source grid. Weights are also kept in a small in-memory cache
keyed on the grids' coordinate values, so repeated :func:`regrid` calls between the same grids reuse them.

Grids are found with :func:`xdownscale.xr.cf.find_grid` (CF attributes, then cf-xarray's heuristics),
never by coordinate name.

Methods and backends
--------------------
``method="bilinear"``
    Linear interpolation in latitude and longitude (rectilinear grids) or linear interpolation on a
    triangulation of the source points (curvilinear grids).
``method="conservative"``
    First-order conservative remapping: each target cell is the area-weighted mean of the source cells
    it overlaps. The area-weighted mean over the covered domain is conserved (to round-off).

``backend="auto"`` picks:

* ``"separable"`` when source and target are both rectilinear (1-D latitude and longitude). Weights are
  computed here, exactly, and factorised along the two axes (``out = Wy @ X @ Wx.T``, see
  :mod:`xdownscale.core.regrid_weights`): latitude weights are overlaps of sin(latitude) bands
  (conservative) or linear interpolation, longitude weights overlaps of intervals (conservative) or
  linear interpolation, both with periodic wrap-around on global grids. This replaces xarray-regrid as
  the default: xarray-regrid's conservative method leaves the polar rows of global grids NaN and
  conserves the global mean only to ~1e-4 (it derives cell edges from padded centre points), and its
  grid handling keys on the coordinate names ``lat``/``latitude``. The separable weights conserve the
  mean to round-off including polar rows, and need neither ``sparse`` nor ESMF.
* ``"xesmf"`` when a grid is curvilinear (2-D latitude/longitude, e.g. rotated pole) and ``import xesmf``
  succeeds. ESMF computes the weights; they are applied here, with the masking rule below.
* ``"delaunay"`` when a grid is curvilinear and xESMF is not installed (it needs ESMF, which is not
  pip-installable): linear interpolation on the sphere with barycentric weights on a Delaunay
  triangulation of the source points (:func:`~xdownscale.core.regrid_weights.sphere_linear_weights`).
  Bilinear only: conservative regridding of curvilinear grids needs xESMF.

``backend="xarray-regrid"`` is available on request for bilinear regridding of rectilinear grids
(``da.regrid.linear``), with the same masking rule; it is slower (xarray's ``interp`` per chunk) and
its conservative method is refused for the reason above.

Domains, wrap-around and missing values
---------------------------------------
* Longitudes may use different conventions (0..360, -180..180) in source and target; latitudes may
  descend; horizontal dimensions may come in any order.
* Global (periodic) sources wrap around: no seam or NaN at the dateline or the 0 meridian. Bilinear
  rows between the outermost source row and a pole interpolate towards the zonal mean of that row.
* Regional sources: target cells outside the source domain are NaN. For bilinear, "outside" means
  beyond the outermost source cell centres (no extrapolation); for conservative, the fraction of the
  target cell covered by source cells is compared with ``mask_threshold`` as below. A target grid
  that lies entirely outside the source domain raises :class:`~xdownscale.errors.GridMismatchError`.
* NaN rule: a target value is NaN when the fraction of its interpolation stencil (bilinear: sum of the
  weights of the valid source points) or of its area (conservative: area covered by valid source cells
  divided by the target cell area) is below ``mask_threshold`` (default 0.5); otherwise it is the
  weighted mean over the valid source cells, weights renormalised. So coastlines of a sea = NaN field
  neither bleed NaN into land cells nor shrink the land by more than half a stencil.

Output
------
The data on the target grid, with the target's horizontal coordinates (names, values, attributes), the
other dimensions of the input kept (dask chunks along them too) and the horizontal dimensions last, in
the target's order. Attributes are kept (except ``grid_mapping``, which described the source grid).
float32 stays float32, float64 stays float64. Dask input stays lazy; horizontal dimensions split into
several chunks are merged into one (with a :class:`~xdownscale.errors.PerformanceWarning`).
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import numpy as np
import xarray as xr

from ..core import regrid_weights as rw
from ..errors import GridMismatchError, InputError, PerformanceWarning
from .cf import Grid, find_grid, grid_extent, require_float

__all__ = ["BACKENDS", "METHODS", "Regridder", "regrid"]

METHODS = ("bilinear", "conservative")
BACKENDS = ("auto", "separable", "delaunay", "xesmf", "xarray-regrid")

_Y, _X = "__regrid_y__", "__regrid_x__"
_CACHE_SIZE = 16
_CACHE: OrderedDict[tuple[Any, ...], rw.Weights] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_XESMF_HINT = "conda install -c conda-forge xesmf"


def regrid(
    da: xr.DataArray,
    target: xr.DataArray | xr.Dataset,
    method: str = "bilinear",
    *,
    backend: str = "auto",
    mask_threshold: float = 0.5,
) -> xr.DataArray:
    """Regrid ``da`` onto the horizontal grid of ``target``.

    Parameters
    ----------
    da
        Data on a rectilinear or curvilinear latitude/longitude grid, any other dimensions, numpy or dask.
    target
        DataArray or Dataset whose latitude/longitude coordinates define the target grid.
    method
        ``"bilinear"`` or ``"conservative"``.
    backend
        ``"auto"`` (see the module docstring), ``"separable"``, ``"delaunay"``, ``"xesmf"`` or
        ``"xarray-regrid"``.
    mask_threshold
        Minimum valid fraction of a target cell's stencil or area (0..1) for it not to be NaN.

    Returns
    -------
    xarray.DataArray
        ``da`` on the target grid; horizontal dimensions last, in the target's order.

    Raises
    ------
    MissingCoordinateError
        ``da`` or ``target`` has no recognisable latitude/longitude.
    InputError
        Unknown method or backend, or a backend that cannot do what was asked.
    GridMismatchError
        The target grid lies entirely outside the source domain.

    Examples
    --------
    >>> import xarray as xr
    >>> from xdownscale.datasets import global_grid
    >>> coarse = xr.ones_like(global_grid(10.0).lat * global_grid(10.0).lon)  # 18 x 36, lon 5..355
    >>> out = regrid(coarse, global_grid(1.0, lon0=-180.0), "conservative")
    >>> out.sizes["lat"], out.sizes["lon"], float(out.lon[0]), float(out.min()), float(out.max())
    (180, 360, -179.5, 1.0, 1.0)
    """
    regridder = Regridder(da, target, method, backend=backend, mask_threshold=mask_threshold)
    if isinstance(da, xr.Dataset):
        return regridder(da)
    return regridder._regrid_array(da, regridder.mask_threshold, check=False)


class Regridder:
    """Regridding weights from one grid to another, computed once, applied to many arrays.

    Parameters
    ----------
    source
        DataArray or Dataset on the source grid (only its latitude/longitude coordinates are used).
    target
        DataArray or Dataset on the target grid.
    method
        ``"bilinear"`` or ``"conservative"``.
    backend
        See :func:`regrid`.
    mask_threshold
        Default for :meth:`__call__`, see :func:`regrid`.

    Examples
    --------
    >>> from xdownscale.datasets import regional_grid, synthetic_temperature
    >>> coarse = synthetic_temperature(8, 12, ntime=4, res=1.0)  # 34..42 N, 10 W..2 E
    >>> rg = Regridder(coarse, regional_grid(32, 48, res=0.25), "conservative")
    >>> rg(coarse).sizes == {"time": 4, "lat": 32, "lon": 48}, rg(coarse.isel(time=0)).dims
    (True, ('lat', 'lon'))
    """

    def __init__(
        self,
        source: xr.DataArray | xr.Dataset,
        target: xr.DataArray | xr.Dataset,
        method: str = "bilinear",
        *,
        backend: str = "auto",
        mask_threshold: float = 0.5,
    ) -> None:
        if method not in METHODS:
            raise InputError(f"Unknown regridding method {method!r}; valid methods are {', '.join(METHODS)}.")
        if backend not in BACKENDS:
            raise InputError(
                f"Unknown regridding backend {backend!r}; valid backends are {', '.join(BACKENDS)}."
            )
        self.mask_threshold = _check_threshold(mask_threshold)
        self.method = method
        self.source_grid = find_grid(source)
        self.target_grid = find_grid(target)
        self.backend = _choose_backend(backend, method, self.source_grid, self.target_grid)
        self._src = _grid_arrays(source, self.source_grid)
        tgt = _grid_arrays(target, self.target_grid)
        self.target_shape = self.target_grid.shape(target)
        #: the horizontal dims of the regridded output, in the target's own order
        self.target_dims = _horizontal_order(target, self.target_grid)
        tg = self.target_grid
        self._target_coords = {
            k: target.coords[k].variable
            for k in dict.fromkeys((tg.lat, tg.lon, *tg.dims))
            if k in target.coords
        }
        # xarray-regrid computes its own weights; ours are still built to check the overlap
        weights_backend = "separable" if self.backend == "xarray-regrid" else self.backend
        self.weights = _cached_weights(
            weights_backend, method, self._src, tgt, self.source_grid, self.target_grid
        )
        if not self.weights.covered.any():
            raise GridMismatchError(
                "The target grid lies entirely outside the source domain: "
                f"source {_extent(source, self.source_grid)}; target {_extent(target, self.target_grid)}. "
                "Regrid onto a target grid that overlaps the source."
            )

    def __repr__(self) -> str:
        return (
            f"<Regridder {self.method} ({self.backend}): {self._src['shape']} -> {self.target_shape}, "
            f"periodic source: {self.source_grid.periodic}>"
        )

    def __call__(
        self, da: xr.DataArray | xr.Dataset, *, mask_threshold: float | None = None
    ) -> xr.DataArray | xr.Dataset:
        """Regrid ``da`` (a DataArray, or every variable of a Dataset that lies on the source grid).

        Variables of a Dataset without horizontal dimensions are kept as they are; those with only one of
        them (e.g. cell bounds) are dropped.
        """
        thr = self.mask_threshold if mask_threshold is None else _check_threshold(mask_threshold)
        if isinstance(da, xr.Dataset):
            dims = set(self.source_grid.dims)
            out = {}
            for name, var in da.data_vars.items():
                if dims <= set(var.dims):
                    out[name] = self._regrid_array(var, thr)
                elif not dims & set(var.dims):
                    out[name] = var
            return xr.Dataset(out, attrs=da.attrs)
        return self._regrid_array(da, thr)

    # -- internals -------------------------------------------------------------------------------------

    def _regrid_array(self, da: xr.DataArray, thr: float, *, check: bool = True) -> xr.DataArray:
        ydim, xdim = self.source_grid.dims
        if check:
            self._check_source(da)
        da = require_float(da)
        if da.dtype.itemsize < 4:
            da = da.astype(np.float32)
        chunks = da.chunksizes
        if any(len(chunks.get(d, ())) > 1 for d in (ydim, xdim)):
            warnings.warn(
                f"{_label(da)} is split into several dask chunks along its horizontal dimensions "
                f"{ydim!r}/{xdim!r}; regridding needs each horizontal slice in one chunk, so they are "
                f"merged. Chunk along other dimensions instead: da.chunk({{{ydim!r}: -1, {xdim!r}: -1}}).",
                PerformanceWarning,
                stacklevel=3,
            )
            da = da.chunk({ydim: -1, xdim: -1})
        da = da.drop_vars([k for k, v in da.coords.items() if set(v.dims) & {ydim, xdim}])
        ty, tx = self.target_grid.dims
        clash = [d for d in (ty, tx) if d in da.dims and d not in (ydim, xdim)]
        if clash:
            raise InputError(
                f"{_label(da)} already has a dimension named {clash[0]!r}, which is a horizontal dimension "
                f"of the target grid. Rename it first, e.g. da.rename({{{clash[0]!r}: 'other'}})."
            )
        if self.backend == "xarray-regrid":
            out = self._apply_xarray_regrid(da, thr)
        else:
            out = self._apply_weights(da, thr)
        out = out.rename({_Y: ty, _X: tx}).assign_coords(self._target_coords)
        out = out.transpose(..., *self.target_dims)
        out.attrs = {k: v for k, v in da.attrs.items() if k != "grid_mapping"}
        out.name = da.name
        return out

    def _apply_weights(self, da: xr.DataArray, thr: float) -> xr.DataArray:
        weights = self.weights
        nty, ntx = self.target_shape

        def apply(x: np.ndarray) -> np.ndarray:
            return weights.apply(x, thr)

        return xr.apply_ufunc(
            apply,
            da,
            input_core_dims=[list(self.source_grid.dims)],
            output_core_dims=[[_Y, _X]],
            dask="parallelized",
            output_dtypes=[da.dtype],
            dask_gufunc_kwargs={"output_sizes": {_Y: nty, _X: ntx}},
            keep_attrs=True,
        )

    def _apply_xarray_regrid(self, da: xr.DataArray, thr: float) -> xr.DataArray:
        import xarray_regrid  # noqa: F401  (registers the .regrid accessor)

        ydim, xdim = self.source_grid.dims
        lat, lon = "latitude", "longitude"  # the names xarray-regrid recognises for its global padding
        src = da.rename({ydim: lat, xdim: lon}).assign_coords({lat: self._src["lat"], lon: self._src["lon"]})
        tgt = xr.Dataset(coords={lat: (lat, self._tgt_1d("lat")), lon: (lon, self._tgt_1d("lon"))})
        valid = src.notnull().astype(da.dtype)
        num = src.fillna(0).regrid.linear(tgt, time_dim=None)
        den = valid.regrid.linear(tgt, time_dim=None)
        out = (num / den).where((den > 0) & (den >= thr - 1e-6)).astype(da.dtype)
        out = out.drop_vars([lat, lon]).rename({lat: _Y, lon: _X})
        return out.transpose(..., _Y, _X)

    def _tgt_1d(self, which: str) -> np.ndarray:
        name = self.target_grid.lat if which == "lat" else self.target_grid.lon
        return np.asarray(self._target_coords[name].values, dtype=float)

    def _check_source(self, da: xr.DataArray) -> None:
        try:
            grid = find_grid(da)
        except InputError as err:
            raise GridMismatchError(
                f"{_label(da)} is not on the source grid of this Regridder: {err}"
            ) from err
        same = grid.dims == self.source_grid.dims
        if same:
            arrays = _grid_arrays(da, grid)
            same = arrays["shape"] == self._src["shape"] and all(
                np.array_equal(arrays[k], self._src[k]) for k in ("lat", "lon")
            )
        if not same:
            raise GridMismatchError(
                f"{_label(da)} is not on the source grid of this Regridder "
                f"(dims {tuple(self.source_grid.dims)}, shape {self._src['shape']}); "
                f"got dims {grid.dims} with shape {grid.shape(da)}. "
                "Build a Regridder for its grid, or call xdownscale.xr.regrid.regrid(da, target)."
            )


def _check_threshold(value: float) -> float:
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise InputError(f"mask_threshold must be between 0 and 1, got {value!r}.")
    return v


def _label(da: xr.DataArray) -> str:
    return f"'{da.name}'" if da.name is not None else "the input"


def _xesmf_available() -> bool:
    try:
        import xesmf  # noqa: F401
    except Exception:  # ImportError, or ESMF's own errors when esmpy is broken
        return False
    return True


def _choose_backend(backend: str, method: str, src: Grid, tgt: Grid) -> str:
    curvilinear = src.curvilinear or tgt.curvilinear
    which = (
        "source and target"
        if src.curvilinear and tgt.curvilinear
        else "source"
        if src.curvilinear
        else "target"
    )
    if backend == "auto":
        if not curvilinear:
            return "separable"
        if _xesmf_available():
            return "xesmf"
        if method == "conservative":
            raise InputError(
                f"Conservative regridding of a curvilinear grid ({which}) needs xESMF, which is not "
                f"installed. Use method='bilinear', or install it with `{_XESMF_HINT}`."
            )
        return "delaunay"
    if backend == "xesmf" and not _xesmf_available():
        raise InputError(
            "backend='xesmf' was requested but xesmf cannot be imported (it needs ESMF, which pip cannot "
            f"install). Install it with `{_XESMF_HINT}`, or use backend='auto'."
        )
    if backend in ("separable", "xarray-regrid") and curvilinear:
        raise InputError(
            f"backend={backend!r} handles rectilinear grids only (1-D latitude and longitude), but the "
            f"{which} grid is curvilinear. Use backend='auto' (delaunay or xesmf)."
        )
    if backend == "delaunay" and method == "conservative":
        raise InputError(
            "backend='delaunay' only interpolates (method='bilinear'). For conservative regridding use "
            f"backend='auto' on rectilinear grids, or install xESMF (`{_XESMF_HINT}`) for curvilinear ones."
        )
    if backend == "xarray-regrid" and method == "conservative":
        raise InputError(
            "backend='xarray-regrid' is refused for method='conservative': it leaves the polar rows of "
            "global grids NaN and does not conserve the area mean exactly. Use backend='auto' "
            "(exact separable weights)."
        )
    return backend


def _bounds(obj: xr.DataArray | xr.Dataset, name: str) -> np.ndarray | None:
    """CF cell bounds (n, 2) of the 1-D coordinate ``name``, when ``obj`` carries them."""
    bname = obj[name].attrs.get("bounds")
    if bname is None or bname not in (obj.variables if isinstance(obj, xr.Dataset) else obj.coords):
        return None
    b = obj[bname]
    dim = obj[name].dims[0]
    if b.ndim != 2 or dim not in b.dims or b.sizes[dim] != obj.sizes[dim]:
        return None
    values = np.asarray(b.transpose(dim, ...).values, dtype=float)
    return values if values.shape[1] == 2 else None


def _grid_arrays(obj: xr.DataArray | xr.Dataset, grid: Grid) -> dict[str, Any]:
    """Latitude/longitude values (1-D, or 2-D in (y, x) order) and CF bounds of a grid."""
    if grid.curvilinear:
        lat = np.asarray(obj[grid.lat].transpose(*grid.dims).values, dtype=float)
        lon = np.asarray(obj[grid.lon].transpose(*grid.dims).values, dtype=float)
        lat_b = lon_b = None
    else:
        lat = np.asarray(obj[grid.lat].values, dtype=float)
        lon = np.asarray(obj[grid.lon].values, dtype=float)
        lat_b, lon_b = _bounds(obj, grid.lat), _bounds(obj, grid.lon)
    return {"lat": lat, "lon": lon, "lat_bounds": lat_b, "lon_bounds": lon_b, "shape": grid.shape(obj)}


def _key(arrays: dict[str, Any], grid: Grid) -> tuple[Any, ...]:
    h = hashlib.sha1()
    for k in ("lat", "lon", "lat_bounds", "lon_bounds"):
        a = arrays[k]
        h.update(b"-" if a is None else np.ascontiguousarray(a).tobytes() + str(a.shape).encode())
    return (arrays["shape"], grid.curvilinear, grid.periodic, h.hexdigest())


def _cached_weights(
    backend: str, method: str, src: dict[str, Any], tgt: dict[str, Any], sgrid: Grid, tgrid: Grid
) -> rw.Weights:
    key = (backend, method, _key(src, sgrid), _key(tgt, tgrid))
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    try:
        weights = _build_weights(backend, method, src, tgt, sgrid, tgrid)
    except ValueError as err:  # from the numpy layer: degenerate grids
        raise InputError(
            f"Cannot build {method} regridding weights: {err}. A grid needs at least 2 points along "
            "latitude and longitude, or CF cell bounds (attribute 'bounds') for conservative regridding."
        ) from err
    with _CACHE_LOCK:
        _CACHE[key] = weights
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return weights


def _build_weights(
    backend: str, method: str, src: dict[str, Any], tgt: dict[str, Any], sgrid: Grid, tgrid: Grid
) -> rw.Weights:
    if backend == "separable":
        return rw.separable_weights(
            src["lat"],
            src["lon"],
            tgt["lat"],
            tgt["lon"],
            method,
            src_periodic=sgrid.periodic or _closes_circle(src["lon"]),
            tgt_periodic=tgrid.periodic,
            src_lat_bounds=src["lat_bounds"],
            src_lon_bounds=src["lon_bounds"],
            tgt_lat_bounds=tgt["lat_bounds"],
            tgt_lon_bounds=tgt["lon_bounds"],
        )
    slat, slon = _mesh(src, sgrid)
    tlat, tlon = _mesh(tgt, tgrid)
    if backend == "delaunay":
        return rw.sphere_linear_weights(slat, slon, tlat, tlon)
    return _xesmf_weights(method, src, tgt, sgrid, tgrid)


def _closes_circle(lon: np.ndarray) -> bool:
    """A rectilinear longitude axis with a cyclic duplicate column (e.g. 0, 2.5, ..., 360) is global too,
    though :func:`~xdownscale.xr.cf.find_grid` calls it not periodic; it wraps around for regridding."""
    u = np.rad2deg(np.unwrap(np.deg2rad(np.asarray(lon, dtype=float))))
    return bool(u.size > 2 and np.ptp(u) >= 360.0 - 1e-6)


def _mesh(arrays: dict[str, Any], grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    if grid.curvilinear:
        return arrays["lat"], arrays["lon"]
    lon, lat = np.meshgrid(arrays["lon"], arrays["lat"])
    return lat, lon


def _vertices(arrays: dict[str, Any], grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Cell corners (ny + 1, nx + 1) for ESMF's conservative method."""
    if grid.curvilinear:
        return rw.curvilinear_vertices(arrays["lat"], arrays["lon"])
    lat_b = arrays["lat_bounds"] if arrays["lat_bounds"] is not None else rw.lat_cell_bounds(arrays["lat"])
    lon_b = (
        arrays["lon_bounds"]
        if arrays["lon_bounds"] is not None
        else rw.lon_cell_bounds(arrays["lon"], grid.periodic)
    )
    lon_v, lat_v = np.meshgrid(_edges(arrays["lon"], lon_b), _edges(arrays["lat"], lat_b))
    return lat_v, lon_v


def _edges(centres: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """The n + 1 cell edges of a 1-D axis in the order of its centres."""
    b = np.sort(np.asarray(bounds, dtype=float), axis=1)
    step = (centres[-1] - centres[0] + 180.0) % 360.0 - 180.0 if centres.size > 1 else 1.0
    return np.append(b[:, 0], b[-1, 1]) if step >= 0 else np.append(b[:, 1], b[-1, 0])


def _xesmf_weights(
    method: str, src: dict[str, Any], tgt: dict[str, Any], sgrid: Grid, tgrid: Grid
) -> rw.Weights:
    import scipy.sparse as sp
    import xesmf as xe

    def esmf_grid(arrays: dict[str, Any], grid: Grid) -> xr.Dataset:
        lat, lon = _mesh(arrays, grid)
        ds = xr.Dataset(coords={"lat": (("y", "x"), lat), "lon": (("y", "x"), lon)})
        if method == "conservative":
            lat_v, lon_v = _vertices(arrays, grid)
            ds = ds.assign_coords(lat_b=(("y_b", "x_b"), lat_v), lon_b=(("y_b", "x_b"), lon_v))
        return ds

    regridder = xe.Regridder(esmf_grid(src, sgrid), esmf_grid(tgt, tgrid), method, periodic=sgrid.periodic)
    w = regridder.weights
    if isinstance(w, xr.DataArray):  # xESMF >= 0.7 wraps a sparse.COO (its .tocsr() gives scipy's CSR)
        w = w.data
    matrix = w if sp.issparse(w) else w.tocsr() if hasattr(w, "tocsr") else sp.csr_matrix(np.asarray(w))
    return rw.PointWeights.from_matrix(matrix, src["shape"], tgt["shape"])


def _horizontal_order(target: xr.DataArray | xr.Dataset, grid: Grid) -> tuple[str, str]:
    """The target's own order of its horizontal dims (for the output's last two dims)."""
    candidates: list[tuple[Hashable, ...]] = []
    if isinstance(target, xr.DataArray):
        candidates.append(target.dims)
    else:
        candidates.extend(v.dims for v in target.data_vars.values())
    if grid.curvilinear:
        candidates.append(target[grid.lat].dims)
    for dims in candidates:
        order = [str(d) for d in dims if d in grid.dims]
        if len(order) == 2:
            return order[0], order[1]
    return grid.ydim, grid.xdim


def _extent(obj: xr.DataArray | xr.Dataset, grid: Grid) -> str:
    e = grid_extent(obj, grid)
    return (
        f"lat {e['lat_min']:.4g}..{e['lat_max']:.4g}, lon {e['lon_min']:.4g}..{e['lon_max']:.4g}"
        f"{' (global)' if grid.periodic else ''}"
    )
