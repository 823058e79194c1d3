"""Restore the large scales of a downscaled field exactly: mass-conserving, sign-keeping corrections.

A generative model re-creates the small scales of a field; the large scales must be the input's. Noise
left in a log-transformed space turns into a positive bias after ``exp`` (Jensen), and an imperfect
network drifts too, so after denoising the output's mean over each input (coarse) grid cell is pulled
back to the input's. Each fine cell belongs to the coarse cell its centre lies in (``cell``); with ``y`` the
output and ``p`` the (bias-corrected) input on the fine grid, the constraints are

``mean(y[cell == j]) == mean(p[cell == j])`` for every coarse cell ``j``,

means over the valid (unmasked) fine cells. Interpolation does not keep cell means (a bilinear field's
mean over a cell mixes in its neighbours'), so where the input's own coarse values are given, ``p`` is
first scaled over each cell to mean that value, times the relative change the bias correction made
there (its means before, ``base``, and after, ``p``), or that value evenly where ``base`` is dry over
the cell: then the output means exactly what the input says over each of its cells.

For non-negative variables (precipitation) the correction is multiplicative, so signs and dry cells are
kept and a dry coarse cell comes back dry: a few passes scale ``y`` by a *smooth* field (the ratios of
the coarse means interpolated to the fine grid with the matrix ``S``), which leaves almost no seams at
coarse-cell edges, then one exact pass scales each coarse cell by its remaining ratio, which meets the
constraints to round-off (the cells partition the fine grid, so the passes of different cells do not
interact). Where the output is dry over a whole coarse cell that the input says is wet, the input's own
values are used there (a multiplicative correction cannot create rain from nothing). With ``wet_min``
(the smallest amount the training data record), values below it are drizzle: in a coarse cell that also
has values at or above it they are set to 0 and the cell's wet values scaled up to keep its mean; in a
coarse cell with no value that high, its rain goes to its largest values, as many as its total holds
whole ``wet_min`` amounts (at least one), the others become 0.

Numerics only (numpy); :mod:`xdownscale.xr.preserve` finds ``cell`` and ``S`` from the grids.
"""

from __future__ import annotations

import numpy as np

from .transforms import WET_TOLERANCE

__all__ = ["preserve_means"]

#: fields corrected together (memory: a few (fields, fine cells) arrays)
_BATCH = 256


def preserve_means(
    y: np.ndarray,
    p: np.ndarray,
    cell: np.ndarray,
    smooth: np.ndarray | None = None,
    *,
    passes: int = 2,
    wet_min: float | None = None,
    coarse: np.ndarray | None = None,
    base: np.ndarray | None = None,
) -> np.ndarray:
    """Scale non-negative fields ``y`` so that their coarse-cell means equal those of ``p`` (or, with
    ``coarse``, the input's coarse values).

    Parameters
    ----------
    y
        Downscaled fields, shape (..., N) over the N fine cells (NaN = masked), values >= 0.
    p
        Reference fields (the input on the fine grid), broadcastable to ``y``; NaN where masked.
    cell
        Shape (N,), integer: the coarse cell (0 .. M-1) each fine cell's centre lies in; -1 for fine cells
        in none (they keep their values).
    smooth
        Optional shape (N, M): interpolation weights from the coarse-cell centres to the fine cells, for
        the smooth passes. Without it only the exact (piecewise constant) pass is made.
    passes
        Number of smooth passes before the exact one.
    wet_min
        Optional dry threshold, the smallest amount the training data record: the rain of each coarse
        cell is put in values of at least ``wet_min`` where its total allows (see above), the means kept
        (None: no threshold).
    coarse
        Optional, shape (..., M) broadcastable to ``y``'s leading axes: the input's values on its own cells
        (NaN: unknown, the cell keeps the mean of ``p``). Each cell's target mean becomes its value times
        ``mean(p) / mean(base)`` over the cell, the bias correction's relative change (1 without ``base``).
    base
        Optional, like ``p``: the input on the fine grid before bias correction.

    Returns
    -------
    ndarray
        ``y`` corrected, float64, same shape; NaN where ``y`` or ``p`` is NaN. Fields are corrected
        independently (the valid cells may differ between fields).

    Raises
    ------
    ValueError
        Negative values in ``y`` or ``p``, or ``cell`` of the wrong shape.
    """
    y = np.array(y, dtype=np.float64, copy=True)
    p = np.broadcast_to(np.asarray(p, dtype=np.float64), y.shape)
    shape = y.shape
    n = shape[-1]
    cell = np.asarray(cell)
    if cell.shape != (n,):
        raise ValueError(f"cell must have shape ({n},) like the fields' last axis; got {cell.shape}.")
    y2 = y.reshape(-1, n)
    p2 = p.reshape(-1, n)
    finite = np.isfinite(y2) & np.isfinite(p2)
    if (np.nan_to_num(y2) < 0).any() or (np.nan_to_num(p2) < 0).any():
        raise ValueError("preserve_means keeps signs multiplicatively: y and p must be >= 0.")
    out = np.where(finite, y2, np.nan)
    c2 = b2 = None
    if coarse is not None:
        c2 = np.asarray(coarse, dtype=np.float64)
        c2 = np.broadcast_to(c2, (*shape[:-1], c2.shape[-1])).reshape(-1, c2.shape[-1])
        b2 = p2 if base is None else np.broadcast_to(np.asarray(base, np.float64), shape).reshape(-1, n)
    s = None if smooth is None else np.asarray(smooth, dtype=np.float64)
    # fields with the same valid cells (usually all of them: the model's mask) are corrected together
    patterns, group = np.unique(np.packbits(finite, axis=1), axis=0, return_inverse=True)
    for g in range(len(patterns)):
        fields = np.flatnonzero(group.ravel() == g)
        common = finite[fields[0]]
        valid = common & (cell >= 0)
        if not valid.any():
            continue
        cells, index = np.unique(cell[valid], return_inverse=True)
        members = np.zeros((cells.size, n))
        members[index, np.flatnonzero(valid)] = 1.0
        mean = members / members.sum(axis=1, keepdims=True)  # (M, N): means over the valid fine cells
        spread = members.T  # (N, M): a coarse value to its fine cells
        owner = np.full(n, -1)
        owner[valid] = index
        sg = None if s is None else s[:, cells]
        for start in range(0, fields.size, _BATCH):
            part = fields[start : start + _BATCH]
            yv = np.where(common, out[part], 0.0)
            pv = np.where(common, p2[part], 0.0)
            if c2 is not None and b2 is not None:
                pv = _to_coarse_values(pv, np.where(common, b2[part], 0.0), c2[part][:, cells], mean)
            fixed = _correct(yv, pv, mean, spread, sg, valid, passes)
            if wet_min is not None:
                fixed = _without_drizzle(fixed, pv @ mean.T, valid, owner, wet_min)
            out[part] = np.where(common, fixed, np.nan)
    return out.reshape(shape)


def _to_coarse_values(p: np.ndarray, base: np.ndarray, values: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``p`` (F, N) scaled over each coarse cell so that its mean there is ``values`` (F, M) times
    mean(p) / mean(base); where ``base`` is dry over a cell, ``values`` itself, evenly; where ``values``
    is NaN, ``p`` unchanged."""
    before = base @ mean.T
    tiny = 1e-12 * np.maximum(np.abs(before).max(axis=1, keepdims=True), 1e-300)
    known = np.isfinite(values)
    ok = (before > tiny) & known
    ratio = np.divide(np.where(ok, values, 0.0), before, out=np.ones_like(before), where=ok)
    even = np.where(known & ~ok, values, 0.0)
    members = (mean > 0).astype(np.float64)  # (M, N)
    scaled = np.where((known & ~ok).astype(np.float64) @ members > 0, even @ members, p * (ratio @ members))
    # a fine cell in no coarse cell (or masked) keeps its value
    return np.where(members.any(axis=0), scaled, p)


def _correct(
    y: np.ndarray,
    p: np.ndarray,
    mean: np.ndarray,
    spread: np.ndarray,
    s: np.ndarray | None,
    valid: np.ndarray,
    passes: int,
) -> np.ndarray:
    """All passes for a stack of fields (F, N)."""
    target = p @ mean.T  # (F, M)
    tiny = 1e-12 * np.maximum(np.abs(target).max(axis=1, keepdims=True), 1e-300)
    dry = target <= tiny
    # a dry coarse cell stays dry; a wet one the output left dry takes the input's values
    y = np.where(valid & ((dry @ spread.T) > 0), 0.0, y)
    empty = ((y @ mean.T) <= tiny) & ~dry
    y = np.where(valid & ((empty @ spread.T) > 0), p, y)

    def ratios(y: np.ndarray) -> np.ndarray:
        have = y @ mean.T
        return np.divide(target, have, out=np.zeros_like(target), where=~dry & (have > 0))

    if s is not None:
        # interpolate from the wet cells only (a dry cell's ratio is undefined): a field that already
        # meets every mean gets the ratio 1 everywhere
        weight = (~dry).astype(np.float64) @ s.T  # (F, N)
        for _ in range(passes):
            smooth = np.divide(ratios(y) @ s.T, weight, out=np.ones_like(weight), where=weight > 0)
            y = np.where(valid, y * smooth, y)
    return np.where(valid, y * (ratios(y) @ spread.T), y)


def _without_drizzle(
    y: np.ndarray, target: np.ndarray, valid: np.ndarray, owner: np.ndarray, wet_min: float
) -> np.ndarray:
    """``y`` (F, N) that meets the coarse means ``target`` (F, M) with its rain in recorded amounts: in a
    coarse cell with values of at least ``wet_min`` the smaller ones become 0; in a cell without any,
    the rain goes to its largest values, as many as the cell's total holds whole ``wet_min`` amounts (at
    least one); the kept values are scaled to keep the means. ``owner`` (N,) is each valid fine cell's
    coarse cell (column of ``target``)."""
    fields, cells = target.shape
    where = np.flatnonzero(valid)
    own = owner[where]
    yv = y[:, where]
    counts = np.bincount(own, minlength=cells).astype(np.float64)
    slot = (np.arange(fields)[:, None] * cells + own[None, :]).ravel()  # (field, coarse cell) of each value

    def per_cell(values: np.ndarray) -> np.ndarray:
        return np.bincount(slot, weights=values.ravel(), minlength=fields * cells).reshape(fields, cells)

    wet = yv >= wet_min * (1.0 - WET_TOLERANCE)
    has_wet = per_cell(wet.astype(np.float64)) > 0
    keep = wet
    drizzle_only = ~has_wet & (target > 0)
    if drizzle_only.any():
        whole = np.floor(target * counts / wet_min + WET_TOLERANCE)
        carriers = np.clip(whole, 1.0, counts)
        # rank of each value within its coarse cell, largest first: one sort of (cell, -value) keys per
        # field; the cells' blocks sit at the same places in every sorted row
        top = np.maximum(yv.max(axis=1, keepdims=True), 1e-300)
        order = np.argsort(own[None, :] + 0.5 * (1.0 - yv / top), axis=1, kind="stable")
        starts = np.concatenate([[0.0], np.cumsum(counts)[:-1]])
        rank = np.empty_like(yv)
        np.put_along_axis(rank, order, (np.arange(own.size) - starts[np.sort(own)])[None, :], axis=1)
        keep = np.where(has_wet[:, own], wet, rank < carriers[:, own])
    yv = np.where(keep, yv, 0.0)
    have = per_cell(yv) / counts
    ratio = np.divide(target, have, out=np.ones_like(target), where=have > 0)
    out = y.copy()
    out[:, where] = yv * ratio[:, own]
    return out
