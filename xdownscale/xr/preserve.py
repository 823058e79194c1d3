"""The grids' side of ``preserve=`` (keeping the input's large scales): which input cell each fine cell
lies in, interpolation from the input cells' centres, and each variable's default rule.
:func:`xdownscale.preserve.preserve_large_scales` applies the rules to DataArrays.

Rules per kind of variable:

* ``"mean"`` (precipitation and other non-negative amounts): over each cell of the *input's* grid, the
  mean of the output's fine cells whose centres lie in it equals the input's value there (times the
  relative change the bias correction made over the cell), to round-off; the correction is
  multiplicative and smooth (see :mod:`xdownscale.core.preserve`), so it keeps signs, dry cells and the
  NaN mask. A climate-change signal of the input is passed on cell by cell. (``"smooth-mean"``, the same
  with the regridded input's cell means as targets, is this rule with a ``coarse`` of grid only.)
* ``"lowpass"`` (temperature and other unbounded variables): the low-pass of the output at the input's
  resolution equals the low-pass of the input: ``y + lowpass(p - y)``.

Both act per field (time step and member), so results do not depend on chunking. On a curvilinear
input grid a fine cell belongs to the input cell with the nearest centre and the correction is piecewise
constant (no smooth field).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import xarray as xr

from ..core.regrid_weights import lat_cell_bounds, linear_weights_1d, lon_cell_bounds
from ..errors import InputError
from .cf import find_grid

__all__ = ["coarse_cell_operators", "default_rule"]


def _containing(centres: np.ndarray, bounds: np.ndarray, *, period: float | None = None) -> np.ndarray:
    """Index of the interval of ``bounds`` (n, 2) that holds each of ``centres``; -1 for none."""
    lo = bounds[:, 0][None, :]
    width = (bounds[:, 1] - bounds[:, 0])[None, :]
    offset = centres[:, None] - lo
    if period is not None:
        offset = np.mod(offset, period)
    inside = (offset >= 0) & (offset < width)
    return np.where(inside.any(axis=1), inside.argmax(axis=1), -1)


def coarse_cell_operators(
    fine: xr.DataArray | xr.Dataset, coarse: xr.DataArray
) -> tuple[np.ndarray, sp.csr_matrix | None]:
    """The coarse cell each fine cell's centre lies in, and interpolation from the coarse cell centres.

    Returns
    -------
    cell
        Shape (N,), N = fine cells in (lat, lon) row-major order: index (row-major over ``coarse``'s own
        horizontal dims) of the coarse cell holding the fine cell's centre, -1 outside every coarse cell.
        On a curvilinear coarse grid, the cell with the nearest centre (on the sphere).
    smooth
        Shape (N, M), sparse: bilinear weights from the coarse cell centres to the fine cell centres, or
        None for a curvilinear coarse grid.

    Raises
    ------
    InputError
        The model grid is curvilinear, or the coarse grid has fewer than 2 x 2 cells.
    """
    fgrid, cgrid = find_grid(fine), find_grid(coarse)
    if fgrid.curvilinear:
        raise InputError("preserve needs a model grid with 1-D latitude and longitude. Pass preserve=False.")
    flat = np.asarray(fine[fgrid.lat].values, dtype=float)
    flon = np.asarray(fine[fgrid.lon].values, dtype=float)
    shape = (coarse.sizes[cgrid.ydim], coarse.sizes[cgrid.xdim])
    if min(shape) < 2:
        raise InputError(
            f"preserve needs an input grid with at least 2 x 2 cells; it has {shape[0]} x {shape[1]}. "
            "Pass preserve=False."
        )
    if cgrid.curvilinear:
        from scipy.spatial import cKDTree

        def xyz(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
            la, lo = np.deg2rad(lat), np.deg2rad(lon)
            return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1)

        clat = np.asarray(coarse[cgrid.lat].transpose(cgrid.ydim, cgrid.xdim).values, dtype=float)
        clon = np.asarray(coarse[cgrid.lon].transpose(cgrid.ydim, cgrid.xdim).values, dtype=float)
        lat2, lon2 = np.meshgrid(flat, flon, indexing="ij")
        _, cell = cKDTree(xyz(clat.ravel(), clon.ravel())).query(xyz(lat2.ravel(), lon2.ravel()))
        return np.asarray(cell, dtype=np.int64), None
    clat = np.asarray(coarse[cgrid.lat].values, dtype=float)
    clon = np.asarray(coarse[cgrid.lon].values, dtype=float)
    iy = _containing(flat, lat_cell_bounds(clat))
    ix = _containing(flon, lon_cell_bounds(clon, cgrid.periodic), period=360.0)
    cell = np.where((iy[:, None] >= 0) & (ix[None, :] >= 0), iy[:, None] * clon.size + ix[None, :], -1)
    sy = _held_at_the_edges(linear_weights_1d(clat, flat, "lat").toarray(), clat, flat)
    sx = linear_weights_1d(clon, flon, "lon", periodic=cgrid.periodic).toarray()
    sx = _held_at_the_edges(sx, clon, flon, period=360.0)
    return cell.ravel(), sp.kron(sp.csr_matrix(sy), sp.csr_matrix(sx), format="csr")


def _held_at_the_edges(
    weights: np.ndarray, centres: np.ndarray, targets: np.ndarray, *, period: float | None = None
) -> np.ndarray:
    """1-D interpolation ``weights`` (targets, centres) whose empty rows (targets beyond the outermost
    centre) take the nearest centre's value: the interpolated field is held constant out to the edge."""
    empty = weights.sum(axis=1) == 0
    if empty.any():
        gap = targets[empty, None] - centres[None, :]
        if period is not None:
            gap = (gap + period / 2) % period - period / 2
        weights = weights.copy()
        weights[np.flatnonzero(empty), np.abs(gap).argmin(axis=1)] = 1.0
    return weights


def default_rule(kind: str, bias_corrected: bool = False) -> str:
    """``"lowpass"`` for variables other than precipitation; for precipitation ``"mean"`` (the input's
    own cell values), or ``"smooth-mean"`` when the input is bias-corrected: QDM is fitted on the
    regridded input's per-cell distributions, so its correction holds for that field's cell means, not
    for the input's raw cell values (on CNRM-CM5, "mean" with QDM raised the error of the long-term mean
    from 0.42 to 0.57 mm/day; see docs/evaluation.md)."""
    if kind != "precipitation":
        return "lowpass"
    return "smooth-mean" if bias_corrected else "mean"
