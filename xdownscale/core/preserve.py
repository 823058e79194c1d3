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
kept and a dry coarse cell comes back dry. ``y`` is first scaled by a *smooth* field ``S r``: values
``r`` at the coarse-cell centres interpolated bilinearly to the fine grid (the matrix ``S``), so there
are no seams at coarse-cell edges. The constraints are linear in ``r`` (``A r = t``, ``A[j, m]`` the mean
over cell ``j`` of ``y * S[:, m]``), and ``r`` is their solution nearest to 1 (the least-norm change,
``r = 1 + A^T (A A^T)^-1 (t - A 1)``), so the smooth field alone meets them wherever it stays positive.
Then one exact pass scales each coarse cell by its remaining ratio, which meets the constraints to
round-off (the cells partition the fine grid, so the cells' passes do not interact); it only does work
where the smooth field was floored at :data:`SMOOTH_FLOOR`, and on the small residual of the solve's
ridge. (Two passes of interpolated ratios before the exact pass, the earlier method, meet the means only
approximately: on E-OBS validation days coarse-grained to 1 degree the solved field brought the
spectrum nearer the truth's, log-spectral distance 0.47 against 0.60, and lowered the CRPS by 1%.)
Where the output is dry over a whole coarse cell that the input says is wet, the input's own values are
used there (a multiplicative correction cannot create rain from nothing). With ``wet_min``
(the smallest amount the training data record), values below it are drizzle: in a coarse cell that also
has values at or above it they are set to 0 and the cell's wet values scaled up to keep its mean; in a
coarse cell with no value that high, its rain goes to its largest values, as many as its total holds
whole ``wet_min`` amounts (at least one), the others become 0. On a grid of known shape, the output's rain
first recedes from the dry coarse cells: before the means are restored, each fine cell next to (one of the
8 neighbours of) a fine cell of a dry coarse cell keeps :data:`DRY_EDGE` of its value. The truth's rain
ends inside a wet cell, the network's runs up to the dry cell and was cut there: on E-OBS validation days
coarse-grained to 1 degree, 79% of those neighbours are dry in the truth and 62% in the output, whose
squared jumps between neighbours were twice as large across coarse-cell edges as inside cells (the
truth's: 1.1 times). After the drizzle rule, specks and holes go: a wet fine cell with at most
:data:`~xdownscale.core.transforms.SPECK` of its valid neighbours (of 8) wet becomes dry, a dry one with
at least :data:`~xdownscale.core.transforms.HOLE` of them wet becomes wet (``wet_min``), and each coarse
cell's wet values are scaled to keep its mean (a coarse cell the rule would leave without rain keeps its
values). Value by value, the drizzle rule leaves the network's light rain speckled: on E-OBS days
coarse-grained to 1 degree the fields had twice the truth's number of separate wet patches and 2.5x its
power at 50 km on dry days. An E-OBS field itself has few specks (0.9% of its wet cells): the rule changes
it by 0.002 mm/day on average and its spectrum by under 3%; the receding edges change it by 0.02 mm/day
and its power by up to 1.2x (21% of its cells next to a dry coarse cell have rain). Callers pass the
grid's shape only for models whose training data are that coherent (:attr:`xdownscale.LogNormalize.coherent`).

Numerics only (torch, float64, on the CPU or an accelerator; the operators' structure is built once per
mask with numpy and scipy): :mod:`xdownscale.xr.preserve` finds ``cell`` and ``S`` from the grids and
:mod:`xdownscale.preserve` applies the correction to DataArrays. The smooth field's constraints are
solved exactly in banded form on the CPU (one banded Cholesky solve per field) and by Jacobi-
preconditioned conjugate gradients on an accelerator (all fields of a batch at once, to a relative
residual of :data:`CG_RTOL`: the output agrees with the banded solve's to about 1e-12 of its largest
value, and the exact pass meets the means to round-off either way).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from .transforms import HOLE, SPECK, WET_TOLERANCE

__all__ = ["MeanPreserver", "float64_device", "preserve_means"]

#: most fields corrected together
_BATCH = 256
#: floats of work arrays per batch (about 12 per fine cell and field, plus the solve's): about 400 MB,
#: whatever the grid
_BUDGET = 50_000_000

#: smallest value of the smooth multiplier: where the least-norm field would go lower (or negative), the
#: exact pass takes over
SMOOTH_FLOOR = 0.05
#: share of its value a fine cell next to a dry coarse cell keeps before the means are restored (on a grid
#: of known shape): the rain that the truth keeps away from a dry cell's edge (on E-OBS validation days
#: coarse-grained to 1 degree, 79% of such cells are dry; the network's output, 62%)
DRY_EDGE = 0.1
#: relative ridge on the constraints' Gram matrix
_RIDGE = 1e-6
#: relative residual (largest over the fields of a batch) at which conjugate gradients stop
CG_RTOL = 1e-10
#: most conjugate-gradient iterations (about 70-90 reach :data:`CG_RTOL` on the paper's 240 x 384 grid)
CG_MAX_ITER = 1000
_SOLVERS = ("auto", "banded", "cg")


def preserve_means(
    y: np.ndarray,
    p: np.ndarray,
    cell: np.ndarray,
    smooth: np.ndarray | sp.spmatrix | None = None,
    *,
    wet_min: float | None = None,
    coarse: np.ndarray | None = None,
    base: np.ndarray | None = None,
    device: str | torch.device | None = None,
    solver: str = "auto",
    grid_shape: tuple[int, int] | None = None,
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
        Optional shape (N, M), dense or sparse: interpolation weights from the coarse-cell centres to
        the fine cells, for the smooth field. Without it only the exact (piecewise constant) pass is made.
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
    device
        Where the arithmetic runs (float64): ``"cpu"`` (default), ``"cuda"``, ... A device without
        float64 (Apple's ``"mps"``) runs it on the CPU.
    solver
        The smooth field's linear systems: ``"banded"`` (exact, one banded Cholesky solve per field, on
        the CPU), ``"cg"`` (conjugate gradients, all fields at once, on ``device``) or ``"auto"``
        (``"cg"`` on an accelerator, ``"banded"`` on the CPU).
    grid_shape
        Optional (rows, columns) of the fine grid, N = rows x columns in row-major order: with
        ``wet_min``, single wet cells among dry ones and dry holes inside rain then go (see above).

    Returns
    -------
    ndarray
        ``y`` corrected, float64, same shape; NaN where ``y`` or ``p`` is NaN. Fields are corrected
        independently (the valid cells may differ between fields).

    Raises
    ------
    ValueError
        Negative values in ``y`` or ``p``, ``cell`` or ``grid_shape`` not matching the fields' last axis, or
        an unknown ``solver``.
    """
    if solver not in _SOLVERS:
        raise ValueError(f"solver={solver!r}: expected one of {', '.join(map(repr, _SOLVERS))}.")
    dev = float64_device(device)
    y = np.asarray(y, dtype=np.float64)
    p = np.broadcast_to(np.asarray(p, dtype=np.float64), y.shape)
    shape = y.shape
    n = shape[-1]
    cell = np.asarray(cell)
    if cell.shape != (n,):
        raise ValueError(f"cell must have shape ({n},) like the fields' last axis; got {cell.shape}.")
    if grid_shape is not None and int(np.prod(grid_shape)) != n:
        raise ValueError(
            f"grid_shape {tuple(grid_shape)} must hold the fields' last axis of {n} cells (rows x columns)."
        )
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
    s = None
    if smooth is not None:
        s = sp.csr_matrix(smooth, dtype=np.float64)
        if s.shape[0] != n:
            raise ValueError(f"smooth must have {n} rows like the fields' last axis; got shape {s.shape}.")
    banded = solver == "banded" or (solver == "auto" and dev.type == "cpu")

    def put(a: np.ndarray) -> torch.Tensor:
        return _tensor(a, dev, torch.float64)

    # fields with the same valid cells (usually all of them: the model's mask) are corrected together
    patterns, group = np.unique(np.packbits(finite, axis=1), axis=0, return_inverse=True)
    for g in range(len(patterns)):
        fields = np.flatnonzero(group.ravel() == g)
        common = finite[fields[0]]
        if not (common & (cell >= 0)).any():
            continue
        fix = MeanPreserver(common, cell, s, dev, wet_min=wet_min, banded=banded, grid_shape=grid_shape)
        for start in range(0, fields.size, fix.batch):
            part = fields[start : start + fix.batch]
            c = b = None
            if c2 is not None and b2 is not None:
                c, b = put(c2[part]), put(b2[part])
            fixed = fix(put(out[part]), put(p2[part]), coarse=c, base=b)
            out[part] = np.where(common, fixed.cpu().numpy(), np.nan)
    return out.reshape(shape)


class MeanPreserver:
    """:func:`preserve_means` for fields that share one set of valid cells, on tensors: the operators are
    built once (on ``device``), then each call corrects a stack of fields there.

    Parameters
    ----------
    common
        Shape (N,), bool: the valid fine cells (the others are NaN in the output).
    cell, smooth, wet_min
        As for :func:`preserve_means`.
    device
        Where the operators live and the arithmetic runs (float64).
    banded
        Solve the smooth field's systems in banded form on the CPU (else conjugate gradients on
        ``device``).
    grid_shape
        As for :func:`preserve_means`.
    """

    def __init__(
        self,
        common: np.ndarray,
        cell: np.ndarray,
        smooth: sp.csr_matrix | None,
        device: torch.device,
        *,
        wet_min: float | None = None,
        banded: bool = True,
        grid_shape: tuple[int, int] | None = None,
    ) -> None:
        self.ops = _Cells(common & (cell >= 0), cell, smooth, device, banded=banded)
        self.keep = torch.as_tensor(common, device=device)
        self.wet_min = wet_min
        self.patches = None if grid_shape is None or wet_min is None else _WetArea(common, grid_shape, device)
        #: fields per call within the memory budget
        self.batch = self.ops.batch

    def __call__(
        self,
        y: torch.Tensor,
        p: torch.Tensor,
        *,
        coarse: torch.Tensor | None = None,
        base: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``y`` (F, N) corrected to the coarse means of ``p`` (F, N), or with ``coarse`` (F, M over all
        the input's cells) and ``base`` (F, N) to the input's values (see :func:`preserve_means`);
        float64 tensors on the operators' device. Cells outside ``common`` come back as ``y`` has them."""
        ops = self.ops
        yv = torch.where(self.keep, y, 0.0)
        pv = torch.where(self.keep, p, 0.0)
        if coarse is not None and base is not None:
            pv = _to_coarse_values(pv, torch.where(self.keep, base, 0.0), coarse[:, ops.cells_t], ops)
        target = ops.means(pv)  # (F, M)
        if self.patches is not None:
            yv = self.patches.dry_edges(yv, target, ops)
        fixed = _correct(yv, pv, target, ops)
        if self.wet_min is not None:
            fixed = _without_drizzle(fixed, target, ops, self.wet_min)
            if self.patches is not None:
                fixed = self.patches(fixed, target, ops, self.wet_min)
        return torch.where(self.keep, fixed, y)


def float64_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device that has float64 (the CPU for none given, or one without)."""
    dev = torch.device("cpu" if device is None else device)
    return dev if dev.type in ("cpu", "cuda") else torch.device("cpu")


class _Cells:
    """The operators of one set of valid fine cells, built once for all its fields: the coarse cell of
    each (``owner``, -1 for none), means over the coarse cells and back (index arrays: memory and time
    grow with the fine cells, not with fine times coarse cells), the smooth solve's structure, and how
    many fields a batch holds within :data:`_BUDGET`."""

    def __init__(
        self,
        valid: np.ndarray,
        cell: np.ndarray,
        smooth: sp.csr_matrix | None,
        device: torch.device | None = None,
        *,
        banded: bool = True,
    ) -> None:
        dev = torch.device("cpu") if device is None else device
        n = valid.size
        self.cells, index = np.unique(cell[valid], return_inverse=True)
        self.cells_t = torch.as_tensor(self.cells, device=dev)
        m = self.cells.size
        owner = np.full(n, -1)
        owner[valid] = index
        self.device = dev
        self.valid = torch.as_tensor(valid, device=dev)
        self.where = torch.as_tensor(np.flatnonzero(valid), device=dev)
        self.own = torch.as_tensor(index.astype(np.int64), device=dev)  # owner of each valid cell
        self._gather = torch.as_tensor(np.maximum(owner, 0), device=dev)
        counts = np.bincount(index, minlength=m).astype(np.float64)
        self.counts = _tensor(counts, dev)
        self.solve = None
        if smooth is not None:
            self.solve = _SmoothSolve(smooth[:, self.cells], owner, counts, dev, banded)
        per_field = 12 * n + (0 if self.solve is None else self.solve.size)
        self.batch = int(np.clip(_BUDGET // per_field, 1, _BATCH))

    def means(self, x: torch.Tensor) -> torch.Tensor:
        """(F, N) -> (F, M): means over the valid fine cells of each coarse cell."""
        return _sum_into(x[:, self.where], self.own, self.counts.numel()) / self.counts

    def spread(self, v: torch.Tensor) -> torch.Tensor:
        """(F, M) -> (F, N): each valid fine cell takes its coarse cell's value; the others 0 (False)."""
        return torch.where(self.valid, v[:, self._gather], torch.zeros((), dtype=v.dtype, device=v.device))


def _tensor(a: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``a`` as a tensor on ``device`` (its own dtype unless ``dtype`` is given)."""
    return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)


def _sum_into(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """(F, K) values summed into ``size`` columns by ``index`` (K,): (F, size)."""
    out = torch.zeros(values.shape[0], size, dtype=values.dtype, device=values.device)
    return out.index_add_(1, index, values)


class _SmoothSolve:
    """The least-norm smooth multiplier's linear algebra for one set of valid fine cells.

    ``A[j, m]``, the mean over cell ``j`` of ``y * S[:, m]``, is nonzero only where a fine cell of ``j``
    interpolates from centre ``m`` (the entries ``(ja, ma)``); its nonzeros are sums of ``y`` over the
    gather's (entry, fine cell, weight) triples for every field. ``A A^T`` couples the cells that share a
    centre. Banded (the CPU): in the cells' own (row-major) order, or in reverse Cuthill-McKee order
    where that is narrower, it is banded and each field's system is solved in banded form. Otherwise
    (an accelerator): preconditioned conjugate gradients with ``A A^T`` applied as two scatters, all
    fields at once."""

    def __init__(
        self, s: sp.csr_matrix, owner: np.ndarray, counts: np.ndarray, device: torch.device, banded: bool
    ) -> None:
        rows = np.asarray(s.sum(axis=1)).ravel()  # interpolate from the cells with valid fine cells only
        s = (sp.diags(np.divide(1.0, rows, out=np.zeros_like(rows), where=rows > 0)) @ s).tocsr()
        cells = s.shape[1]
        coo = s.tocoo()
        inside = (owner[coo.row] >= 0) & (coo.data != 0)
        n, m, w = coo.row[inside], coo.col[inside], coo.data[inside]
        j = owner[n]
        entries, slot = np.unique(j * cells + m, return_inverse=True)
        ja, ma = entries // cells, entries % cells

        def put(a: np.ndarray) -> torch.Tensor:
            return _tensor(a, device)

        self.cells, self.entries = cells, entries.size
        self.ja, self.ma = put(ja), put(ma)
        self.slot, self.n, self.w = put(slot.astype(np.int64)), put(n.astype(np.int64)), put(w / counts[j])
        keep = coo.data != 0
        self.s_row, self.s_col, self.s_w = (
            put(coo.row[keep].astype(np.int64)),
            put(coo.col[keep]),
            put(coo.data[keep]),
        )
        self.fine = s.shape[0]
        self.banded = banded
        self.size = 8 * cells + 3 * entries.size + 2 * int(inside.sum())  # floats per field
        if banded:
            self._band_structure(ja, ma, cells, put)

    def _band_structure(self, ja: np.ndarray, ma: np.ndarray, cells: int, put: Any) -> None:
        from scipy.sparse.csgraph import reverse_cuthill_mckee

        # pairs of entries in one column m meet in A A^T at (ja[e1], ja[e2])
        by_column = np.argsort(ma, kind="stable")
        starts = np.searchsorted(ma[by_column], np.arange(cells + 1))
        width = max(int(np.diff(starts).max(initial=0)), 1)
        rank = np.arange(ma.size) - starts[ma[by_column]]
        table = np.full((cells, width), -1)
        table[ma[by_column], rank] = by_column  # the entries of each column, padded with -1
        e1, e2 = (x.ravel() for x in (np.repeat(table, width, axis=1), np.tile(table, (1, width))))
        keep = (e1 >= 0) & (e2 >= 0)
        e1, e2 = e1[keep], e2[keep]
        pattern = sp.csr_matrix((np.ones(e1.size), (ja[e1], ja[e2])), shape=(cells, cells))
        orders = [np.arange(cells), np.asarray(reverse_cuthill_mckee(pattern, symmetric_mode=True))]
        positions = [np.argsort(order) for order in orders]
        widths = [np.abs(pos[ja[e1]] - pos[ja[e2]]).max(initial=0) for pos in positions]
        best = int(np.argmin(widths))  # the cells' own order, or reverse Cuthill-McKee where narrower
        order, position = orders[best].astype(np.int64), positions[best].astype(np.int64)
        lo, hi = position[ja[e1]], position[ja[e2]]
        keep = lo >= hi
        self.band = int((lo - hi)[keep].max(initial=0)) + 1
        # lower banded form: (row r, column c <= r) of the reordered matrix sits at [r - c, c]
        self.e1, self.e2 = put(e1[keep]), put(e2[keep])
        self.band_index = put((lo - hi)[keep] * cells + hi[keep])
        self.order, self.position = put(order), put(position)
        self.size += self.band * cells + 2 * int(keep.sum())

    def multiplier(self, y: torch.Tensor, target: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """``S r`` (F, N), floored at :data:`SMOOTH_FLOOR`: ``r`` (F, M) the least-norm change from 1
        that makes the coarse means of ``y * S r`` equal ``target`` (F, M) in the ``live`` cells (wet,
        with rain in ``y``)."""
        a = _sum_into(y[:, self.n] * self.w, self.slot, self.entries)  # (F, E): A's nonzeros
        have = _sum_into(a, self.ja, self.cells)  # A 1: the current means
        a = a * live[:, self.ja]  # rows of cells without a constraint: zero
        rhs = torch.where(live, target - have, 0.0)
        lam = self._banded(a, rhs, live) if self.banded else self._cg(a, rhs, live)
        r = 1.0 + _sum_into(a * lam[:, self.ja], self.ma, self.cells)
        return _sum_into(r[:, self.s_col] * self.s_w, self.s_row, self.fine).clamp_min(SMOOTH_FLOOR)

    def _banded(self, a: torch.Tensor, rhs: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """``(A A^T + ridge)^-1 rhs`` (F, M), one banded Cholesky solve per field (on the CPU)."""
        from scipy.linalg import solveh_banded

        fields, cells = rhs.shape
        gram = _sum_into(a[:, self.e1] * a[:, self.e2], self.band_index, self.band * cells)
        gram = gram.reshape(fields, self.band, cells)
        gram[:, 0] += _ridge(gram[:, 0].sum(dim=1), live[:, self.order])
        g, b = gram.cpu().numpy(), rhs[:, self.order].cpu().numpy()
        lam = np.stack([solveh_banded(g[f], b[f], lower=True, check_finite=False) for f in range(fields)])
        return torch.as_tensor(lam, device=rhs.device)[:, self.position]

    def _cg(self, a: torch.Tensor, rhs: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """``(A A^T + ridge)^-1 rhs`` (F, M) by Jacobi-preconditioned conjugate gradients, all fields at
        once, until the largest relative residual is below :data:`CG_RTOL`."""
        cells = self.cells
        diag = _sum_into(a * a, self.ja, cells)
        ridge = _ridge(diag.sum(dim=1), live)
        inverse = 1.0 / (diag + ridge)

        def gram(v: torch.Tensor) -> torch.Tensor:
            u = _sum_into(a * v[:, self.ja], self.ma, cells)  # A^T v
            return _sum_into(a * u[:, self.ma], self.ja, cells) + ridge * v

        def dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return (u * v).sum(dim=1, keepdim=True)

        tiny = torch.finfo(torch.float64).tiny
        x = torch.zeros_like(rhs)
        residual = rhs.clone()
        z = inverse * residual
        direction = z.clone()
        rz = dot(residual, z)
        norm = rhs.norm(dim=1, keepdim=True).clamp_min(tiny)
        for _ in range(CG_MAX_ITER):
            if float((residual.norm(dim=1, keepdim=True) / norm).max()) < CG_RTOL:
                break
            q = gram(direction)
            alpha = rz / dot(direction, q).clamp_min(tiny)
            x += alpha * direction
            residual -= alpha * q
            z = inverse * residual
            rz_next = dot(residual, z)
            direction = z + (rz_next / rz.clamp_min(tiny)) * direction
            rz = rz_next
        return x


def _tiny(values: torch.Tensor) -> torch.Tensor:
    """(F, 1): what counts as 0 among the values (F, M) of each field, 1e-12 of its largest magnitude
    (a dry coarse cell's target is at most this)."""
    return 1e-12 * values.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)


def _to_coarse_values(p: torch.Tensor, base: torch.Tensor, values: torch.Tensor, ops: _Cells) -> torch.Tensor:
    """``p`` (F, N) scaled over each coarse cell so that its mean there is ``values`` (F, M) times
    mean(p) / mean(base); where ``base`` is dry over a cell, ``values`` itself, evenly; where ``values``
    is NaN, ``p`` unchanged."""
    before = ops.means(base)
    tiny = _tiny(before)
    known = torch.isfinite(values)
    ok = (before > tiny) & known
    ratio = torch.where(ok, torch.where(ok, values, 0.0) / torch.where(ok, before, 1.0), 1.0)
    even = torch.where(known & ~ok, values, 0.0)
    scaled = torch.where(ops.spread(known & ~ok), ops.spread(even), p * ops.spread(ratio))
    # a fine cell in no coarse cell (or masked) keeps its value
    return torch.where(ops.valid, scaled, p)


def _correct(y: torch.Tensor, p: torch.Tensor, target: torch.Tensor, ops: _Cells) -> torch.Tensor:
    """The smooth field and the exact pass for a stack of fields (F, N); ``target`` (F, M) the means
    of ``p`` over the coarse cells."""
    tiny = _tiny(target)
    dry = target <= tiny
    # a dry coarse cell stays dry; a wet one the output left dry takes the input's values
    y = torch.where(ops.spread(dry), 0.0, y)
    empty = (ops.means(y) <= tiny) & ~dry
    y = torch.where(ops.spread(empty), p, y)
    if ops.solve is not None:
        live = ~dry & (ops.means(y) > 0)
        y = torch.where(ops.valid, y * ops.solve.multiplier(y, target, live), y)
    have = ops.means(y)
    usable = ~dry & (have > 0)
    ratios = torch.where(usable, target / torch.where(usable, have, 1.0), 0.0)
    return torch.where(ops.valid, y * ops.spread(ratios), y)


def _ridge(trace: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Diagonal added to the Gram matrices (F, M) of trace ``trace`` (F,): rows of cells without a
    constraint become the identity (scaled; their multiplier is 0); a small ridge keeps nearly dependent
    constraints solvable, the exact pass absorbing what it leaves."""
    scale = (trace / live.shape[1]).clamp_min(1e-300)[:, None]
    return torch.where(live, _RIDGE * scale, scale)


def _without_drizzle(y: torch.Tensor, target: torch.Tensor, ops: _Cells, wet_min: float) -> torch.Tensor:
    """``y`` (F, N) that meets the coarse means ``target`` (F, M) with its rain in recorded amounts: in a
    coarse cell with values of at least ``wet_min`` the smaller ones become 0; in a cell without any,
    the rain goes to its largest values, as many as the cell's total holds whole ``wet_min`` amounts (at
    least one); the kept values are scaled to keep the means."""
    fields, cells = target.shape
    own = ops.own
    yv = y[:, ops.where]
    counts = ops.counts

    def per_cell(values: torch.Tensor) -> torch.Tensor:
        return _sum_into(values, own, cells)

    wet = yv >= wet_min * (1.0 - WET_TOLERANCE)
    has_wet = per_cell(wet.to(yv.dtype)) > 0
    keep = wet
    drizzle_only = ~has_wet & (target > 0)
    if bool(drizzle_only.any()):
        whole = torch.floor(target * counts / wet_min + WET_TOLERANCE)
        carriers = torch.minimum(whole.clamp_min(1.0), counts)
        # rank of each value within its coarse cell, largest first: one sort of (cell, -value) keys per
        # field; the cells' blocks sit at the same places in every sorted row
        top = yv.amax(dim=1, keepdim=True).clamp_min(1e-300)
        order = torch.argsort(own[None, :] + 0.5 * (1.0 - yv / top), dim=1, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        first = torch.arange(own.numel(), device=yv.device) - starts[torch.sort(own).values]
        rank = torch.empty_like(yv).scatter_(1, order, first.to(yv.dtype).expand(fields, -1).contiguous())
        keep = torch.where(has_wet[:, own], wet, rank < carriers[:, own])
    yv = torch.where(keep, yv, 0.0)
    have = per_cell(yv) / counts
    ratio = torch.where(have > 0, target / torch.where(have > 0, have, 1.0), 1.0)
    out = y.clone()
    out[:, ops.where] = yv * ratio[:, own]
    return out


class _WetArea:
    """Specks and holes of the wet area removed (see the module's description): ``common`` (N,) the
    valid cells of a grid of ``shape`` (rows, columns)."""

    def __init__(self, common: np.ndarray, shape: tuple[int, int], device: torch.device) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.keep = torch.as_tensor(common, device=device)
        self.kernel = torch.ones(1, 1, 3, 3, dtype=torch.float64, device=device)
        self.kernel[..., 1, 1] = 0.0  # the 8 neighbours
        self.valid = self._count(self.keep[None])  # (1, N): valid neighbours of each cell

    def _count(self, flags: torch.Tensor) -> torch.Tensor:
        """(F, N) flags -> (F, N): how many of each cell's 8 neighbours are set."""
        grid = flags.to(torch.float64).reshape(-1, 1, *self.shape)
        return torch.nn.functional.conv2d(grid, self.kernel, padding=1).reshape(flags.shape[0], -1)

    def dry_edges(self, y: torch.Tensor, target: torch.Tensor, ops: _Cells) -> torch.Tensor:
        """``y`` (F, N) with the values of the cells next to a dry coarse cell (of ``target`` (F, M); the
        8 neighbours of its valid cells) times :data:`DRY_EDGE`, before the means are restored."""
        dry = ops.spread(target <= _tiny(target)) & ops.valid & self.keep
        edge = (self._count(dry) > 0) & ~dry & ops.valid & self.keep
        return torch.where(edge, y * DRY_EDGE, y)

    def __call__(self, y: torch.Tensor, target: torch.Tensor, ops: _Cells, wet_min: float) -> torch.Tensor:
        """``y`` (F, N), the drizzle rule's output, without specks and holes, the coarse means
        ``target`` (F, M) kept."""
        wet = (y >= wet_min * (1.0 - WET_TOLERANCE)) & self.keep
        count, valid = self._count(wet), self.valid
        speck = wet & (SPECK[1] * count <= SPECK[0] * valid)
        hole = ~wet & (HOLE[1] * count >= HOLE[0] * valid)
        now = torch.where(valid > 0, (wet & ~speck) | hole, wet) & self.keep  # a lone cell stays
        moved = torch.where(now & ~wet, wet_min, torch.where(now, y, 0.0))
        moved = torch.where(ops.valid, moved, y)
        # a coarse cell with rain that the rule would leave dry keeps its values
        lost = (target > 0) & (ops.means(moved) <= 0)
        moved = torch.where(ops.spread(lost), y, moved)
        have = ops.means(moved)
        ratio = torch.where(have > 0, target / torch.where(have > 0, have, 1.0), 1.0)
        return torch.where(ops.valid, moved * ops.spread(ratio), y)
