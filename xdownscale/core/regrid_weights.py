"""Regridding weights on the sphere, on plain numpy arrays (no xarray).

Two kinds of weights, both applied by the same masked, renormalising rule (:meth:`Weights.apply`):

* :class:`SeparableWeights` for rectilinear source and target grids (1-D latitude and longitude).
  The 2-D weight of target cell ``(i, k)`` on source cell ``(j, l)`` is the product
  ``Wy[i, j] * Wx[k, l]``, so regridding a field ``X`` of shape (ny, nx) is
  ``out = Wy @ X @ Wx.T`` - exact, and fast (evaluated as two short stencils, one per axis).

  - conservative: ``Wy[i, j]`` is the overlap of the latitude bands ``[sin(lat_lo), sin(lat_hi)]`` of
    target row ``i`` and source row ``j`` divided by the band of row ``i``; ``Wx[k, l]`` the overlap of
    the longitude intervals (with periodic wrap) divided by the width of target column ``k``. The area of
    a cell on the sphere is ``R^2 * dlon * (sin(lat_hi) - sin(lat_lo))``, so the product is exactly the
    fraction of the target cell covered by the source cell, and the area-weighted mean is conserved to
    round-off wherever the target grid covers the source grid (including the polar rows: cell bounds of
    a grid that reaches the poles are snapped to +-90).
  - bilinear: 1-D linear interpolation in latitude and in longitude (degrees). Longitudes wrap around on
    periodic (global) sources, so there is no seam at the dateline or the 0 meridian. On global sources
    the rows between the outermost source row and the pole interpolate towards the zonal mean of that
    row, placed at the pole (as ESMF's ``Pole="all"``), so no polar row is left empty.

* :class:`PointWeights`: any sparse matrix from flattened source cells to flattened target cells. Built
  here by :func:`sphere_linear_weights` (linear interpolation on a Delaunay triangulation of the source
  points in gnomonic projections, for curvilinear grids such as rotated-pole ones), or from weights
  computed by ESMF.

Masking rule (both kinds). Let ``c`` be the fraction of a target cell covered by the source domain
(bilinear: 1 inside the domain, 0 outside; conservative: the covered area fraction) and ``v`` the fraction
of its interpolation stencil (bilinear) or covered area (conservative) where the source value is not NaN.
The target value is NaN when ``c * v < mask_threshold`` (or ``c * v == 0``); otherwise it is the weighted
mean over the valid source cells, the weights renormalised to sum to one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.spatial import Delaunay

__all__ = [
    "PointWeights",
    "SeparableWeights",
    "Weights",
    "barycentric_transforms",
    "conservative_weights_1d",
    "curvilinear_vertices",
    "lat_cell_bounds",
    "linear_weights_1d",
    "lon_cell_bounds",
    "separable_weights",
    "sphere_linear_weights",
    "sphere_xyz",
]

_EPS_DEG = 1e-9  # tolerance in degrees for "exactly on the edge"


def _sort_lon(lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order of ``lon`` along the circle and its values unwrapped to increase from the start.

    Monotonic longitudes (possibly jumping at the dateline or the 0 meridian, in either direction) are
    unwrapped as they come, which keeps a cyclic duplicate column (0 .. 360) at both ends. Otherwise the
    run starts after the largest gap along the circle. Either way a regional grid that crosses the
    dateline becomes one increasing run, whatever convention (0..360, -180..180) it is stored in.
    """
    lon = np.asarray(lon, dtype=float)
    u = np.rad2deg(np.unwrap(np.deg2rad(lon)))
    step = np.diff(u)
    if np.all(step >= 0) or np.all(step <= 0):
        order = np.argsort(u, kind="stable")
        return order, u[order]
    lw = np.mod(lon, 360.0)
    order = np.argsort(lw, kind="stable")
    ls = lw[order]
    start = (int(np.argmax(np.diff(np.append(ls, ls[0] + 360.0)))) + 1) % ls.size
    order = np.roll(order, -start)
    ls = np.roll(ls, -start)
    return order, ls[0] + np.mod(ls - ls[0], 360.0)


def _edges_from_centres(c: np.ndarray) -> np.ndarray:
    """Cell edges (n + 1,) from increasing centres: midpoints, half a step beyond each end."""
    mid = 0.5 * (c[1:] + c[:-1])
    return np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])


def _check_axis(values: np.ndarray, what: str) -> np.ndarray:
    values = np.asarray(values, dtype=float).ravel()
    if values.size < 2:
        raise ValueError(f"{what} needs at least 2 points to define cells, got {values.size}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{what} contains non-finite values")
    return values


def lat_cell_bounds(lat: np.ndarray) -> np.ndarray:
    """Latitude cell bounds from cell centres, shape (n, 2), ``[:, 0] < [:, 1]``.

    Bounds are midpoints between neighbouring centres; the outer ones lie half a step beyond the first
    and last centre, clipped to [-90, 90] and snapped to the pole when it is less than half a step away
    (so global grids, Gaussian ones included, cover the sphere exactly). Works for either order of ``lat``.
    """
    lat = _check_axis(lat, "latitude")
    order = np.argsort(lat, kind="stable")
    edges = _edges_from_centres(lat[order])
    first, last = lat[order][0], lat[order][-1]
    if edges[0] + 90.0 < 0.5 * (lat[order][1] - first) or edges[0] < -90.0:
        edges[0] = -90.0
    if 90.0 - edges[-1] < 0.5 * (last - lat[order][-2]) or edges[-1] > 90.0:
        edges[-1] = 90.0
    out = np.empty((lat.size, 2))
    out[order, 0] = edges[:-1]
    out[order, 1] = edges[1:]
    return out


def lon_cell_bounds(lon: np.ndarray, periodic: bool) -> np.ndarray:
    """Longitude cell bounds from cell centres, shape (n, 2), ``[:, 0] < lon < [:, 1]``.

    Neighbours are found along the circle, whatever the convention (0..360, -180..180) and order of
    ``lon``; periodic grids close the circle (the last cell ends where the first begins, plus 360).
    """
    lon = _check_axis(lon, "longitude")
    order, ls = _sort_lon(lon)
    if periodic:
        ext = np.concatenate([[ls[-1] - 360.0], ls, [ls[0] + 360.0]])
        edges = 0.5 * (ext[1:] + ext[:-1])
    else:
        edges = _edges_from_centres(ls)
    out = np.empty((lon.size, 2))
    out[order, 0] = edges[:-1]
    out[order, 1] = edges[1:]
    # in the convention of the centres: each cell's bounds bracket its own centre value
    out += 360.0 * np.round((lon - out.mean(axis=1)) / 360.0)[:, None]
    return out


def conservative_weights_1d(src_bounds: np.ndarray, tgt_bounds: np.ndarray, axis: str) -> sp.csr_matrix:
    """Fraction of each target interval covered by each source interval, shape (n_target, n_source), CSR.

    ``axis="lat"`` measures the overlap in sin(latitude) (area on the sphere), ``axis="lon"`` in degrees
    with periodic wrap (the intervals may use any 360-degree convention). Row sums are the fraction of the
    target cell covered by the whole source axis. Bounds are (n, 2) with ``[:, 0] <= [:, 1]``.
    """
    src = np.asarray(src_bounds, dtype=float)
    tgt = np.asarray(tgt_bounds, dtype=float)
    if axis == "lat":
        s_lo, s_hi = (np.sin(np.deg2rad(np.clip(src[:, k], -90.0, 90.0))) for k in (0, 1))
        t_lo, t_hi = (np.sin(np.deg2rad(np.clip(tgt[:, k], -90.0, 90.0))) for k in (0, 1))
        shifts: tuple[float, ...] = (0.0,)
    elif axis == "lon":
        a0 = float(np.min(src[:, 0]))
        s_lo, s_hi = src[:, 0], np.minimum(src[:, 1], a0 + 360.0)
        t_lo = np.mod(tgt[:, 0] - a0, 360.0) + a0
        t_hi = t_lo + (tgt[:, 1] - tgt[:, 0])
        shifts = (0.0, 360.0)  # t_lo >= a0, so only the source copy one turn east can overlap too
    else:
        raise ValueError(f"axis must be 'lat' or 'lon', got {axis!r}")
    size = t_hi - t_lo
    inv = np.divide(1.0, size, out=np.zeros_like(size), where=size > 0)
    blocks = []
    step = max(1, 2_000_000 // max(src.shape[0], 1))  # bounded memory for long axes
    for i in range(0, tgt.shape[0], step):
        lo, hi, w = t_lo[i : i + step, None], t_hi[i : i + step, None], inv[i : i + step, None]
        ov = np.zeros((lo.shape[0], src.shape[0]))
        for d in shifts:
            ov += np.maximum(np.minimum(s_hi[None, :] + d, hi) - np.maximum(s_lo[None, :] + d, lo), 0.0)
        blocks.append(sp.csr_matrix(ov * w))
    return sp.csr_matrix(sp.vstack(blocks, format="csr"))


def _linear_1d(s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation from increasing nodes ``s`` to points ``t`` as (rows, cols, weights).

    Points outside [s[0], s[-1]] (beyond a tiny tolerance) get no weights.
    """
    inside = (t >= s[0] - _EPS_DEG) & (t <= s[-1] + _EPS_DEG)
    rows = np.nonzero(inside)[0]
    tt = np.clip(t[inside], s[0], s[-1])
    if s.size == 1:
        return rows, np.zeros_like(rows), np.ones(rows.size)
    j = np.clip(np.searchsorted(s, tt, side="right") - 1, 0, s.size - 2)
    step = s[j + 1] - s[j]
    f = np.divide(tt - s[j], step, out=np.zeros_like(tt), where=step > 0)
    return (
        np.concatenate([rows, rows]),
        np.concatenate([j, j + 1]),
        np.concatenate([1.0 - f, f]),
    )


def linear_weights_1d(src: np.ndarray, tgt: np.ndarray, axis: str, periodic: bool = False) -> sp.csr_matrix:
    """Linear interpolation weights along one axis, shape (n_target, n_source), as CSR.

    ``axis="lon"`` wraps the target longitudes onto the source convention and, when ``periodic``,
    interpolates across the seam between the last and the first source longitude. Rows of targets outside
    the source range are empty.
    """
    src = _check_axis(src, "source " + ("longitude" if axis == "lon" else "latitude"))
    tgt = np.asarray(tgt, dtype=float).ravel()
    n = src.size
    if axis == "lat":
        order = np.argsort(src, kind="stable")
        rows, cols, vals = _linear_1d(src[order], tgt)
        cols = order[cols]
    elif axis == "lon":
        order, s = _sort_lon(src)
        t = np.mod(tgt - s[0], 360.0) + s[0]
        if periodic:
            s = np.append(s, s[0] + 360.0)
            order = np.append(order, order[0])
        else:  # a target just below s[0] (by round-off) was mapped a whole turn up
            t = np.where(t > s[-1] + _EPS_DEG, np.where(t - 360.0 >= s[0] - _EPS_DEG, s[0], t), t)
        rows, cols, vals = _linear_1d(s, t)
        cols = order[cols]
    else:
        raise ValueError(f"axis must be 'lat' or 'lon', got {axis!r}")
    m = sp.coo_matrix((vals, (rows, cols)), shape=(tgt.size, n))
    m.sum_duplicates()
    m.eliminate_zeros()
    return m.tocsr()


@dataclass(eq=False)
class Weights(ABC):
    """Base of the weight containers: the masked, renormalising application rule.

    Subclasses set ``src_shape``, ``tgt_shape`` and ``coverage`` (shape ``tgt_shape``: the fraction of
    each target cell covered by the source domain) and implement ``_contract`` with weights whose rows
    are normalised to sum to one wherever ``coverage > 0``.
    """

    src_shape: tuple[int, ...]
    tgt_shape: tuple[int, ...]
    coverage: np.ndarray
    _cast_cache: dict[Any, Any] = field(default_factory=dict, init=False, repr=False)

    @abstractmethod
    def _contract(self, x: np.ndarray) -> np.ndarray:
        """Apply the normalised weights: (B, *src_shape) -> (B, *tgt_shape), dtype of ``x``."""

    @property
    def covered(self) -> np.ndarray:
        """Boolean mask (``tgt_shape``) of target cells that receive any weight from the source."""
        return np.asarray(self.coverage > 0)

    def apply(self, x: np.ndarray, mask_threshold: float = 0.5) -> np.ndarray:
        """Regrid ``x`` of shape (..., *src_shape) to (..., *tgt_shape).

        float32 stays float32 and float64 stays float64 (other types become float32). See the module
        docstring for the masking rule; ``mask_threshold`` is in [0, 1].
        """
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating) or x.dtype.itemsize < 4:
            x = x.astype(np.float32)
        lead = x.shape[: x.ndim - len(self.src_shape)]
        if x.shape[len(lead) :] != tuple(self.src_shape):
            raise ValueError(f"expected trailing shape {self.src_shape}, got {x.shape}")
        x3 = x.reshape((-1, *self.src_shape))
        out = np.empty((x3.shape[0], *self.tgt_shape), dtype=x.dtype)
        # slabs of a few tens of MB: temporaries stay small whatever the number of time steps
        step = max(1, (1 << 23) // max(int(np.prod(self.tgt_shape)), 1))
        for i in range(0, x3.shape[0], step):
            out[i : i + step] = self._apply_slab(np.ascontiguousarray(x3[i : i + step]), mask_threshold)
        return out.reshape(lead + tuple(self.tgt_shape))

    def dropped(self, mask_threshold: float = 0.5, dtype: Any = np.float64) -> np.ndarray:
        """Boolean mask (``tgt_shape``) of the target cells that are NaN for input without NaN: the source
        covers less than ``mask_threshold`` of them."""
        return np.asarray(self.coverage < _least(mask_threshold, dtype))

    def _apply_slab(self, x3: np.ndarray, mask_threshold: float) -> np.ndarray:
        least = _least(mask_threshold, x3.dtype)
        invalid = np.isnan(x3)
        if not invalid.any():
            out = self._contract(x3)
            drop = self.dropped(mask_threshold, x3.dtype)  # (tgt_shape), the same for every slice
        else:
            out = self._contract(np.where(invalid, 0, x3).astype(x3.dtype, copy=False))
            frac = self._contract((~invalid).astype(x3.dtype))
            # Cells whose stencil is entirely valid are left undivided, so they come out bit for bit as
            # from the NaN-free path: results must not depend on NaN elsewhere in the same dask chunk.
            partial = np.abs(frac - 1) > 64 * np.finfo(x3.dtype).eps
            with np.errstate(invalid="ignore", divide="ignore"):
                np.divide(out, frac, out=out, where=partial)
            np.copyto(frac, 1, where=~partial)
            frac *= self._cast(self.coverage, x3.dtype)
            drop = frac < least
        np.copyto(out, np.asarray(np.nan, dtype=out.dtype), where=drop)
        return out

    def _cast(self, a: Any, dtype: np.dtype) -> Any:
        """``a`` (an attribute of self) in ``dtype``, converted once per dtype."""
        key = (id(a), np.dtype(dtype).str)
        hit = self._cast_cache.get(key)
        if hit is None:
            hit = a.astype(dtype)
            self._cast_cache[key] = hit
        return hit


def _least(mask_threshold: float, dtype: Any) -> float:
    """The smallest valid fraction a target cell keeps a value with (1e-6 below the threshold: round-off
    of weights summing to exactly the threshold)."""
    return max(float(mask_threshold) - 1e-6, float(np.finfo(dtype).tiny))


def _last(x2: np.ndarray, w: sp.csr_matrix) -> np.ndarray:
    """(M, n) @ w.T -> (M, m), w sparse. Each output sums its row's non-zeros in a fixed order, so a
    row of ``x2`` gives the same bits whatever M is (results do not depend on dask chunking)."""
    return np.ascontiguousarray((w @ np.ascontiguousarray(x2.T)).T)


def _normalise_rows(w: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray]:
    s = np.asarray(w.sum(axis=1)).ravel()
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
    return sp.csr_matrix(sp.diags(inv) @ w), s


def _padded(w: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """A sparse (m, n) matrix as K stencil entries per row: indices and weights, each shape (K, m)."""
    w = sp.csr_matrix(w)
    w.sort_indices()
    nnz = np.diff(w.indptr)
    m = w.shape[0]
    k = max(int(nnz.max()) if m else 0, 1)
    rows = np.repeat(np.arange(m), nnz)
    pos = np.arange(w.nnz) - np.repeat(w.indptr[:-1], nnz)
    idx = np.zeros((k, m), dtype=np.intp)
    val = np.zeros((k, m))
    idx[pos, rows] = w.indices
    val[pos, rows] = w.data
    return idx, val


def _stencil(x: np.ndarray, idx: np.ndarray, val: np.ndarray, axis: int) -> np.ndarray:
    """Weighted sum of K gathered slices along ``axis`` (1 or 2) of a 3-D array, terms in a fixed order."""
    shape = (1, -1, 1) if axis == 1 else (1, 1, -1)
    out = np.take(x, idx[0], axis=axis, mode="clip")
    out *= val[0].reshape(shape)
    if idx.shape[0] > 1:
        tmp = np.empty_like(out)
        for k in range(1, idx.shape[0]):
            np.take(x, idx[k], axis=axis, out=tmp, mode="clip")
            tmp *= val[k].reshape(shape)
            out += tmp
    return out


@dataclass(eq=False)
class SeparableWeights(Weights):
    """Weights of a rectilinear-to-rectilinear regridding: ``out = Wy @ X @ Wx.T``.

    ``wy`` (n_target_lat, n_source_lat) and ``wx`` (n_target_lon, n_source_lon) are sparse with
    normalised rows; ``pole_south``/``pole_north`` (n_target_lat,) weigh the zonal means of the
    southernmost/northernmost source row (``south_row``/``north_row``) placed at the pole (bilinear on
    global sources only, otherwise None). The products are evaluated as K-point stencils along each axis
    (gather, multiply, add), which is as fast as BLAS here and gives every time step the same bits
    whatever else is in its chunk.
    """

    wy: Any = None
    wx: Any = None
    pole_south: np.ndarray | None = None
    pole_north: np.ndarray | None = None
    south_row: int = 0
    north_row: int = -1

    def __post_init__(self) -> None:
        self._iy, self._vy = _padded(self.wy)
        self._ix, self._vx = _padded(self.wx)

    def _contract(self, x: np.ndarray) -> np.ndarray:
        _, ny, nx = x.shape
        nty, ntx = self.tgt_shape
        ky, kx = self._iy.shape[0], self._ix.shape[0]
        vy, vx = self._cast(self._vy, x.dtype), self._cast(self._vx, x.dtype)
        if ny * ntx * kx + nty * ntx * ky <= nty * nx * ky + nty * ntx * kx:  # x first is cheaper
            out = _stencil(_stencil(x, self._ix, vx, 2), self._iy, vy, 1)
        else:
            out = _stencil(_stencil(x, self._iy, vy, 1), self._ix, vx, 2)
        for w, row in ((self.pole_south, self.south_row), (self.pole_north, self.north_row)):
            if w is not None:
                rows = np.nonzero(w)[0]  # the few target rows between the pole and the source
                zonal = x[:, row, :].mean(axis=-1)  # (b,)
                out[:, rows, :] += self._cast(w, x.dtype)[None, rows, None] * zonal[:, None, None]
        return out


@dataclass(eq=False)
class PointWeights(Weights):
    """Weights as one sparse matrix from flattened source cells to flattened target cells.

    ``matrix`` has shape (prod(tgt_shape), prod(src_shape)) and normalised rows.
    """

    matrix: Any = None

    @classmethod
    def from_matrix(cls, matrix: Any, src_shape: tuple[int, ...], tgt_shape: tuple[int, ...]) -> PointWeights:
        """Wrap a raw (not normalised) sparse or dense weight matrix; its row sums give the coverage."""
        m = sp.csr_matrix(matrix, dtype=float)
        m.data[~np.isfinite(m.data)] = 0.0
        m.eliminate_zeros()
        norm, cover = _normalise_rows(m)
        return cls(tuple(src_shape), tuple(tgt_shape), np.clip(cover, 0, 1).reshape(tgt_shape), matrix=norm)

    def _contract(self, x: np.ndarray) -> np.ndarray:
        b = x.shape[0]
        m = self._cast(self.matrix, x.dtype)
        out = _last(x.reshape(b, -1), m)
        return out.reshape((b, *self.tgt_shape))


def separable_weights(
    src_lat: np.ndarray,
    src_lon: np.ndarray,
    tgt_lat: np.ndarray,
    tgt_lon: np.ndarray,
    method: str,
    *,
    src_periodic: bool,
    tgt_periodic: bool,
    src_lat_bounds: np.ndarray | None = None,
    src_lon_bounds: np.ndarray | None = None,
    tgt_lat_bounds: np.ndarray | None = None,
    tgt_lon_bounds: np.ndarray | None = None,
) -> SeparableWeights:
    """Weights from a rectilinear grid to another (1-D latitudes and longitudes in any order/convention).

    Parameters
    ----------
    src_lat, src_lon, tgt_lat, tgt_lon
        Cell-centre coordinates in degrees, shapes (ny,), (nx,), (nty,), (ntx,).
    method
        ``"bilinear"`` or ``"conservative"``.
    src_periodic, tgt_periodic
        Whether the grids wrap around in longitude.
    src_lat_bounds, ...
        Optional cell bounds, shape (n, 2); derived from the centres when not given (conservative only).

    Returns
    -------
    SeparableWeights
        Applied with ``.apply(x, mask_threshold)`` to arrays of shape (..., ny, nx).
    """
    src_lat = _check_axis(src_lat, "source latitude")
    src_lon = _check_axis(src_lon, "source longitude")
    tgt_lat = np.asarray(tgt_lat, dtype=float).ravel()
    tgt_lon = np.asarray(tgt_lon, dtype=float).ravel()
    pole_s = pole_n = None
    if method == "conservative":
        sb_lat = _sorted_bounds(src_lat_bounds, lat_cell_bounds, src_lat)
        tb_lat = _sorted_bounds(tgt_lat_bounds, lat_cell_bounds, tgt_lat)
        sb_lon = _sorted_bounds(src_lon_bounds, lon_cell_bounds, src_lon, src_periodic)
        tb_lon = _sorted_bounds(tgt_lon_bounds, lon_cell_bounds, tgt_lon, tgt_periodic)
        wy, cover_y = _normalise_rows(conservative_weights_1d(sb_lat, tb_lat, "lat"))
        wx, cover_x = _normalise_rows(conservative_weights_1d(sb_lon, tb_lon, "lon"))
    elif method == "bilinear":
        s = np.sort(src_lat)
        south = bool(src_periodic and -90.0 < s[0] and s[0] - (s[1] - s[0]) <= -90.0 + _EPS_DEG)
        north = bool(src_periodic and s[-1] < 90.0 and s[-1] + (s[-1] - s[-2]) >= 90.0 - _EPS_DEG)
        aug = np.concatenate([[-90.0] if south else [], src_lat, [90.0] if north else []])
        w_aug = linear_weights_1d(aug, tgt_lat, "lat").tocsc()
        k = int(south)
        if south:
            pole_s = w_aug[:, 0].toarray().ravel()
        if north:
            pole_n = w_aug[:, -1].toarray().ravel()
        wy = sp.csr_matrix(w_aug[:, k : k + src_lat.size])
        wx = linear_weights_1d(src_lon, tgt_lon, "lon", periodic=src_periodic)
        cover_y = np.asarray(w_aug.sum(axis=1)).ravel()
        cover_x = np.asarray(wx.sum(axis=1)).ravel()
        # linear weights already sum to one inside; snap round-off so coverage is exactly 0 or 1
        cover_y = (cover_y > 0.5).astype(float)
        cover_x = (cover_x > 0.5).astype(float)
    else:
        raise ValueError(f"method must be 'bilinear' or 'conservative', got {method!r}")
    coverage = np.clip(np.outer(cover_y, cover_x), 0.0, 1.0)
    return SeparableWeights(
        (src_lat.size, src_lon.size),
        (tgt_lat.size, tgt_lon.size),
        coverage,
        wy=sp.csr_matrix(wy),
        wx=sp.csr_matrix(wx),
        pole_south=pole_s,
        pole_north=pole_n,
        south_row=int(np.argmin(src_lat)),
        north_row=int(np.argmax(src_lat)),
    )


def _sorted_bounds(bounds: np.ndarray | None, derive: Any, *args: Any) -> np.ndarray:
    """Given bounds (n, 2) with each pair put in increasing order, or bounds derived from the centres."""
    b = derive(*args) if bounds is None else np.asarray(bounds, dtype=float).reshape(-1, 2)
    return np.sort(b, axis=1)


def sphere_xyz(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Unit vectors (..., 3) of points given in degrees."""
    la, lo = np.deg2rad(np.asarray(lat, dtype=float)), np.deg2rad(np.asarray(lon, dtype=float))
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1)


def _tangent_basis(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    helper = np.array([0.0, 0.0, 1.0]) if abs(c[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e1 = np.cross(helper, c)
    e1 /= np.linalg.norm(e1)
    return e1, np.cross(c, e1)


def _locate(
    src: np.ndarray, tgt: np.ndarray, centre: np.ndarray, max_edge: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Triangulate ``src`` (unit vectors) in the gnomonic projection about ``centre`` and find the
    triangle and barycentric weights of each ``tgt``. Returns (found, vertices (n, 3), weights (n, 3))."""
    e1, e2 = _tangent_basis(centre)

    def project(v: np.ndarray) -> np.ndarray:
        d = v @ centre
        return np.stack([(v @ e1) / d, (v @ e2) / d], axis=-1)

    tri = Delaunay(project(src))
    simp = tri.simplices
    transform = barycentric_transforms(tri.points, simp)
    if getattr(tri, "_transform", False) is None:
        # scipy computes this lazily, one small LAPACK call per triangle; with a multi-threaded OpenBLAS
        # on a busy machine that takes seconds. The closed form gives the same array at once.
        tri._transform = transform
    # Drop slivers along concave edges of the domain: triangles with an edge much longer than usual.
    edge = np.max(
        np.stack(
            [np.linalg.norm(src[simp[:, a]] - src[simp[:, b]], axis=1) for a, b in ((0, 1), (1, 2), (2, 0))]
        ),
        axis=0,
    )
    if max_edge is None:
        max_edge = 2.0 * float(np.quantile(edge, 0.9))
    p = project(tgt)
    s = tri.find_simplex(p)
    found = s >= 0
    found[found] = edge[s[found]] <= max_edge
    t = transform[s[found]]
    b = np.einsum("ijk,ik->ij", t[:, :2], p[found] - t[:, 2])
    bary = np.concatenate([b, 1.0 - b.sum(axis=1, keepdims=True)], axis=1)
    bary = np.clip(bary, 0.0, None)
    bary /= bary.sum(axis=1, keepdims=True)
    return found, simp[s[found]], bary, max_edge


def barycentric_transforms(points: np.ndarray, simplices: np.ndarray) -> np.ndarray:
    """Affine maps to barycentric coordinates of 2-D triangles, as :attr:`scipy.spatial.Delaunay.transform`.

    Shape (n, 3, 2): ``c[:2] = T[:2] @ (x - T[2])``, ``c[2] = 1 - c[0] - c[1]``; NaN for degenerate
    triangles.
    """
    v = points[simplices]  # (n, 3, 2)
    r = v[:, 2]
    m = np.stack([v[:, 0] - r, v[:, 1] - r], axis=2)  # columns: edge vectors, (n, 2, 2)
    det = m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = (
            np.stack(
                [np.stack([m[:, 1, 1], -m[:, 0, 1]], axis=1), np.stack([-m[:, 1, 0], m[:, 0, 0]], axis=1)],
                axis=1,
            )
            / det[:, None, None]
        )
    inv[det == 0] = np.nan
    return np.concatenate([inv, r[:, None, :]], axis=1)


def sphere_linear_weights(
    src_lat: np.ndarray, src_lon: np.ndarray, tgt_lat: np.ndarray, tgt_lon: np.ndarray
) -> PointWeights:
    """Linear interpolation on the sphere from scattered/curvilinear source points to target points.

    The source points are triangulated (Delaunay) in a gnomonic projection - about the centre of the
    source domain for regional sources, about each face of a cube for global ones - and each target point
    gets the barycentric weights of the triangle containing it (great circles are straight lines in the
    gnomonic projection, so the interpolation is linear along the triangle's edges). Target points outside
    the triangulated source domain get no weights (they become NaN when applied).

    Parameters
    ----------
    src_lat, src_lon
        Source coordinates in degrees, shape ``src_shape`` (e.g. (ny, nx)).
    tgt_lat, tgt_lon
        Target coordinates in degrees, shape ``tgt_shape``.

    Returns
    -------
    PointWeights
        Sparse weights (3 non-zeros per covered target point).
    """
    src_shape = np.shape(src_lat)
    tgt_shape = np.shape(tgt_lat)
    src = sphere_xyz(np.ravel(src_lat), np.ravel(src_lon))
    tgt = sphere_xyz(np.ravel(tgt_lat), np.ravel(tgt_lon))
    if src.shape[0] < 3:
        raise ValueError("linear interpolation on the sphere needs at least 3 source points")
    mean = src.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    centre = mean / norm if norm > 0 else np.array([0.0, 0.0, 1.0])
    regional = norm > 0.3 and float(np.min(src @ centre)) > np.cos(np.deg2rad(75.0))
    if regional:
        faces = [centre]
        tgt_face = np.zeros(tgt.shape[0], dtype=int)
        src_sel = [np.ones(src.shape[0], dtype=bool)]
        tgt_face[tgt @ centre <= np.cos(np.deg2rad(85.0))] = -1  # cannot be inside the domain
    else:
        faces = [np.eye(3)[i] * sgn for i in range(3) for sgn in (1.0, -1.0)]
        proj = tgt @ np.stack(faces).T
        tgt_face = np.argmax(proj, axis=1)
        # a face reaches 54.7 deg from its centre; take sources up to 75 deg so triangles at the edge exist
        src_sel = [src @ f > np.cos(np.deg2rad(75.0)) for f in faces]
    rows, cols, vals = [], [], []
    max_edge: float | None = None
    for k, f in enumerate(faces):
        ti = np.nonzero(tgt_face == k)[0]
        si = np.nonzero(src_sel[k])[0]
        if ti.size == 0 or si.size < 3:
            continue
        found, verts, bary, max_edge = _locate(src[si], tgt[ti], f, max_edge)
        r = ti[found]
        rows.append(np.repeat(r, 3))
        cols.append(si[verts].ravel())
        vals.append(bary.ravel())
    n_t, n_s = tgt.shape[0], src.shape[0]
    if rows:
        m = sp.coo_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_t, n_s)
        ).tocsr()
    else:
        m = sp.csr_matrix((n_t, n_s))
    return PointWeights.from_matrix(m, src_shape, tgt_shape)


def curvilinear_vertices(lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cell corners (ny + 1, nx + 1) of a curvilinear grid from its centres (ny, nx), in degrees.

    Each interior corner is the mean (on the sphere) of the four surrounding centres; the outer ones are
    extrapolated linearly. Used to give ESMF the cell bounds that conservative regridding needs.
    """
    xyz = sphere_xyz(lat, lon)
    ny, nx = xyz.shape[:2]
    if ny < 2 or nx < 2:
        raise ValueError("a curvilinear grid needs at least 2x2 points to derive cell corners")
    ext = np.empty((ny + 2, nx + 2, 3))
    ext[1:-1, 1:-1] = xyz
    ext[0, 1:-1] = 2 * xyz[0] - xyz[1]
    ext[-1, 1:-1] = 2 * xyz[-1] - xyz[-2]
    ext[:, 0] = 2 * ext[:, 1] - ext[:, 2]
    ext[:, -1] = 2 * ext[:, -2] - ext[:, -3]
    v = 0.25 * (ext[:-1, :-1] + ext[1:, :-1] + ext[:-1, 1:] + ext[1:, 1:])
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    vlat = np.rad2deg(np.arcsin(np.clip(v[..., 2], -1, 1)))
    vlon = np.rad2deg(np.arctan2(v[..., 1], v[..., 0]))
    # keep the longitude convention of the input and continuity along rows
    ref = np.pad(np.asarray(lon, dtype=float), ((0, 1), (0, 1)), mode="edge")
    vlon = ref + ((vlon - ref + 180.0) % 360.0 - 180.0)
    return vlat, vlon
