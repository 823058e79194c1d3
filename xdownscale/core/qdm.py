"""Quantile delta mapping (QDM, Cannon et al. 2015) on plain numpy arrays.

QDM corrects a simulated series ``sim`` with the quantile-wise difference (``kind="+"``) or ratio
(``kind="*"``) between a reference ``ref`` and the model over the historical period ``hist``, at the
quantile that each ``sim`` value has *within sim's own distribution*. It therefore keeps the model's
change of every quantile between ``hist`` and ``sim`` (the defining property of QDM), while mapping
``hist`` onto ``ref``'s distribution.

Every function here works on arrays with **time as the last axis** and any number of leading cell axes,
shape ``(..., T)``; all cells are processed with vectorised numpy, in blocks of :data:`BLOCK_CELLS` cells
(the whole time series of each) to keep temporaries small and in cache, optionally on several threads
(numpy's sort and ufuncs release the GIL). No Python loop runs over cells. No xarray, dask or pint here.

Speed: quantiles sort each cell's values (numpy's SIMD sort). Ranks need the time order as well: sim's
values are not sorted themselves, their order-preserving 32-bit keys are argsorted in two stable passes of
numpy's 16-bit radix sort (low half, then high half), about half the time of sorting 64-bit
(value, time index) keys. tau, and so the node, only depends on the rank, so one table of nodes per
number of valid values serves every cell, and only tied values are looked up again with their average
rank.

Conventions (chosen to agree with ``xsdba.QuantileDeltaMapping``, its defaults ``interp="nearest"``,
``extrapolation="constant"``, and ``xsdba.Grouper`` without window)
------------------------------------------------------------------------------------------------------
Quantile nodes
    ``q_k = (k + 0.5) / n`` for ``k = 0 .. n-1`` (:func:`equally_spaced_nodes`, as
    ``xsdba.utils.equally_spaced_nodes(n)``): the mid points of ``n`` equal bins of ``[0, 1]``.
Quantile estimator
    Hyndman & Fan type 7, the default of ``numpy.quantile`` and of ``xsdba.nbutils.quantile``: in the
    sorted valid values ``x_(0) <= ... <= x_(N-1)`` of one cell, the virtual index is ``v = (N - 1) q``,
    the quantile ``x_(floor v) + (v - floor v) (x_(floor v + 1) - x_(floor v))`` (same two-sided lerp as
    numpy). NaN values are skipped (``N`` counts the valid values of each cell and group), so scattered
    gaps are ignored; a cell without any valid value has NaN quantiles.
Adjustment factors
    ``af(q) = ref_q(q) / hist_q(q)`` (``"*"``) or ``ref_q(q) - hist_q(q)`` (``"+"``), per cell and group.
Rank of each sim value (tau)
    Within sim's own distribution of that cell and group (xsdba's ``rank(..., pct=True)``): average
    ranks ``r`` of tied values (1-based, NaN skipped), ``p = r / N`` and
    ``tau = p_max (p - p_min) / (p_max - p_min)``, which without ties is ``(r - 1) / (N - 1)``: ``0`` for
    the smallest value, ``1`` for the largest.
    Where a cell has fewer than two distinct valid values, ``tau = 0.5`` (xsdba gives NaN there).
Interpolation of af onto tau
    Nearest node, ties to the lower node (``scipy.interpolate.interp1d(kind="nearest")``): node
    ``k = clip(ceil(n tau) - 1, 0, n - 1)``.
Extrapolation
    Constant: ``tau`` below the first node (``0.5 / n``) takes ``af(q_0)``, above the last node
    ``af(q_{n-1})`` (with nearest interpolation this is the same as clipping).
Adjustment
    ``out = sim * af(tau)`` or ``sim + af(tau)``; NaN in sim stays NaN.
Groups
    An integer label per time step (``groups``, values ``0 .. G-1``): quantiles, ranks and factors are
    all computed within each group separately (e.g. each calendar month over all years).
Dry days (``thresh``)
    :func:`jitter_under` replaces values below ``thresh`` (NaN excluded) by uniform random values in
    ``(0, thresh)`` (like ``xsdba.processing.jitter_under_thresh``), drawn from a counter-based hash of
    ``(seed, stream, cell id, time index)``: the same numbers whatever the chunking or block size.
    After a multiplicative adjustment, outputs below ``thresh`` are set to 0.

References
----------
Cannon, A. J., Sobie, S. R. and Murdock, T. Q. (2015): Bias correction of GCM precipitation by quantile
mapping: how well do methods preserve changes in quantiles and extremes? J. Climate 28, 6938-6959.
Hyndman, R. J. and Fan, Y. (1996): Sample quantiles in statistical packages. Am. Stat. 50, 361-365.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import InputError

__all__ = [
    "ADDITIVE",
    "KINDS",
    "MULTIPLICATIVE",
    "adjust_quantile_delta",
    "adjustment_factors",
    "check_positive_quantiles",
    "empirical_quantiles",
    "equally_spaced_nodes",
    "jitter_under",
    "rank_fractions",
]

ADDITIVE = "+"
MULTIPLICATIVE = "*"
KINDS = (ADDITIVE, MULTIPLICATIVE)

#: Cells processed together: big enough to amortise numpy's per-call cost, small enough that the
#: (cells, time) temporaries of one block (a few of them, 8 bytes a value) stay in cache.
BLOCK_CELLS = 64

#: Threads used when a function gets ``threads=None`` (the xarray layer does so for numpy inputs; dask
#: inputs run one thread per chunk). None: one per CPU available to the process. Set it to 1 to stay on
#: one core.
DEFAULT_THREADS: int | None = None

#: Time steps copied at once when a block is transposed to cells-first.
_TILE = 256

_SHIFT32 = np.uint64(32)


def equally_spaced_nodes(n: int) -> np.ndarray:
    """Quantile nodes ``(arange(n) + 0.5) / n``, shape (n,), float64 (as xsdba's ``equally_spaced_nodes``).

    Raises
    ------
    InputError
        ``n`` is not an integer of at least 2.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 2:
        raise InputError(f"nquantiles must be an integer >= 2; got {n!r}. QDM needs at least two quantiles.")
    return (np.arange(n, dtype=np.float64) + 0.5) / n


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InputError(
            f"Unknown QDM kind {kind!r}; expected '*' (multiplicative, for precipitation and other "
            "quantities bounded at zero) or '+' (additive, for temperature)."
        )


# --------------------------------------------------------------------------------------------------
# block machinery
# --------------------------------------------------------------------------------------------------


def _as_cells(x: np.ndarray) -> np.ndarray:
    """View ``(..., T)`` as ``(C, T)`` (a copy only where the layout does not allow a view)."""
    return x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x


def _contiguous_rows(x: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
    """C-contiguous copy of a block ``x`` (B, T) that may be a transposed view of time-first data.

    Copied in tiles of time steps: several times faster than ``np.ascontiguousarray`` on such views,
    whose rows are strided through memory.
    """
    dtype = x.dtype if dtype is None else np.dtype(dtype)
    out = np.empty(x.shape, dtype=dtype)
    step = _TILE if x.ndim == 2 and not x.flags.c_contiguous else max(x.shape[-1], 1)
    for t in range(0, x.shape[-1], step):
        out[:, t : t + step] = x[:, t : t + step]
    return out


def _copy_transposed(src: np.ndarray, dst: np.ndarray) -> None:
    """``dst[...] = src.T`` for a block ``src`` (B, T) and a time-first view ``dst`` (T, B), in tiles."""
    for t in range(0, src.shape[-1], _TILE):
        dst[t : t + _TILE] = src[:, t : t + _TILE].T


def _n_threads(threads: int | None, ncells: int) -> int:
    nblocks = -(-ncells // BLOCK_CELLS)
    if threads is None:
        threads = DEFAULT_THREADS
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(int(threads), nblocks))


def _map_blocks(func: Callable[[slice], None], ncells: int, threads: int | None) -> None:
    """Call ``func(cell_slice)`` for consecutive blocks of cells, on ``threads`` threads."""
    blocks = [slice(c, min(c + BLOCK_CELLS, ncells)) for c in range(0, ncells, BLOCK_CELLS)]
    nthreads = _n_threads(threads, ncells)
    if nthreads == 1:
        for b in blocks:
            func(b)
        return
    with ThreadPoolExecutor(nthreads) as pool:
        for _ in pool.map(func, blocks):
            pass


def _group_index(groups: np.ndarray | None, ngroups: int, ntime: int) -> list[np.ndarray | None]:
    """Time indices of each group (None: all time steps, no copy needed)."""
    if groups is None:
        return [None]
    groups = np.asarray(groups)
    if groups.shape != (ntime,):
        raise InputError(f"groups must have one label per time step ({ntime}); got shape {groups.shape}.")
    return [np.flatnonzero(groups == g) for g in range(ngroups)]


# --------------------------------------------------------------------------------------------------
# jitter
# --------------------------------------------------------------------------------------------------


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic), in place where possible."""
    z = z ^ (z >> np.uint64(30))
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def _hash_uniform(seed: int, stream: int, cells: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Uniform numbers in (0, 1), a pure function of (seed, stream, cell id, time index)."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([(int(seed) % 2**61) * 8 + int(stream) % 8], dtype=np.uint64))[0]
        ctr = (cells.astype(np.uint64) << _SHIFT32) | times.astype(np.uint64)
        z = _splitmix64(_splitmix64(ctr ^ key) + np.uint64(0x9E3779B97F4A7C15))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _jitter_block(x: np.ndarray, thresh: float, seed: int, stream: int, cell_ids: np.ndarray) -> np.ndarray:
    """Copy of block ``x`` (B, T) with values below ``thresh`` replaced by noise in (0, thresh)."""
    out = _contiguous_rows(x)
    rows, cols = np.nonzero(out < thresh)  # NaN compares False: stays NaN
    if rows.size:
        u = _hash_uniform(seed, stream, cell_ids[rows], cols)
        noise = (u * thresh).astype(out.dtype)
        hi = np.nextafter(out.dtype.type(thresh), out.dtype.type(0))
        out[rows, cols] = np.clip(noise, np.finfo(out.dtype).tiny, hi)
    return out


def jitter_under(
    x: np.ndarray,
    thresh: float,
    *,
    seed: int = 0,
    stream: int = 0,
    cell_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Replace values below ``thresh`` by uniform random values in ``(0, thresh)``.

    Parameters
    ----------
    x
        Data, shape (..., T). NaN values are left alone.
    thresh
        Positive threshold in the units of ``x``.
    seed, stream
        The random numbers are a hash of ``(seed, stream, cell id, time index)``; use a different stream
        for each input (xdownscale uses 0 for ref, 1 for hist, 2 for sim).
    cell_ids
        Integer id of each cell, shape ``x.shape[:-1]`` (default: ``arange`` over the cells). Give the
        global ids when ``x`` is one block of a larger grid, so that blocks draw what the whole would.

    Returns
    -------
    numpy.ndarray
        A new array, same shape and dtype as ``x``.
    """
    x = np.asarray(x)
    if not np.isfinite(thresh) or thresh <= 0:
        raise InputError(f"jitter_under must be a positive threshold; got {thresh!r}.")
    flat = _as_cells(x)
    ids = np.arange(flat.shape[0]) if cell_ids is None else np.asarray(cell_ids).reshape(-1)
    return _jitter_block(flat, thresh, seed, stream, ids).reshape(x.shape)


# --------------------------------------------------------------------------------------------------
# quantiles
# --------------------------------------------------------------------------------------------------


def _quantile_positions(nvalid: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, ...]:
    """Type-7 positions of ``nodes`` (Q,) in rows of ``nvalid`` (B,) sorted valid values.

    Returns ``prev``, ``nxt`` (integer positions, (B, Q)) and ``gamma`` (float64, (B, Q)): the quantile is
    the lerp from ``x[prev]`` to ``x[nxt]`` by ``gamma``.
    """
    v = (nvalid[:, None] - 1).astype(np.float64) * nodes[None, :]
    v = np.maximum(v, 0.0)
    prev = np.floor(v).astype(np.intp)
    nxt = np.minimum(prev + 1, np.maximum(nvalid[:, None] - 1, 0))
    return prev, nxt, v - prev


@functools.lru_cache(maxsize=16)
def _shared_quantile_positions(nvalid: int, nodes: bytes) -> tuple[np.ndarray, ...]:
    """:func:`_quantile_positions` of one row (each (Q,)), for all rows with ``nvalid`` valid values."""
    arrays = tuple(a[0] for a in _quantile_positions(np.array([nvalid]), np.frombuffer(nodes)))
    for a in arrays:
        a.flags.writeable = False
    return arrays


def _sorted_quantiles(s: np.ndarray, nodes: np.ndarray, out_dtype: np.dtype) -> np.ndarray:
    """Type-7 quantiles of each row of ``s`` (B, T), sorted along time with NaN last. -> (B, Q)."""
    t = s.shape[-1]
    if not np.isnan(s[:, -1]).any():  # no NaN (they sort last): the same positions in every row
        prev, nxt, gamma = _shared_quantile_positions(t, nodes.tobytes())
        left = np.take(s, prev, axis=-1).astype(np.float64)
        right = np.take(s, nxt, axis=-1).astype(np.float64)
        nvalid = None
    else:
        nvalid = t - np.isnan(s).sum(axis=-1)
        prev, nxt, gamma = _quantile_positions(nvalid, nodes)
        left = np.take_along_axis(s, prev, axis=-1).astype(np.float64)
        right = np.take_along_axis(s, nxt, axis=-1).astype(np.float64)
    diff = right - left
    q = np.where(gamma >= 0.5, right - diff * (1.0 - gamma), left + diff * gamma)
    if nvalid is not None:
        q[nvalid == 0] = np.nan
    return q.astype(out_dtype)


def empirical_quantiles(
    x: np.ndarray,
    nodes: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    ngroups: int = 1,
    thresh: float | None = None,
    seed: int = 0,
    stream: int = 0,
    cell_ids: np.ndarray | None = None,
    threads: int | None = 1,
) -> np.ndarray:
    """Per-cell (and per-group) quantiles of ``x`` at ``nodes``, skipping NaN.

    Parameters
    ----------
    x
        Data, shape (..., T), time last.
    nodes
        Quantile nodes in [0, 1], shape (Q,).
    groups
        Optional group label (0 .. ngroups-1) of each time step, shape (T,).
    ngroups
        Number of groups.
    thresh, seed, stream, cell_ids
        When ``thresh`` is given, values below it are jittered first (see :func:`jitter_under`).
    threads
        Threads over blocks of cells (None: one per CPU).

    Returns
    -------
    numpy.ndarray
        Shape (..., G, Q) with ``G = ngroups``, dtype of ``x`` (float). Cells or groups without any valid
        value give NaN.
    """
    x = np.asarray(x)
    nodes = np.asarray(nodes, dtype=np.float64)
    flat = _as_cells(x)
    ncells, ntime = flat.shape
    index = _group_index(groups, ngroups, ntime)
    ids = np.arange(ncells) if cell_ids is None else np.asarray(cell_ids).reshape(-1)
    out = np.empty((ncells, len(index), nodes.size), dtype=x.dtype)

    def block(b: slice) -> None:
        xb = flat[b]
        xb = _contiguous_rows(xb) if thresh is None else _jitter_block(xb, thresh, seed, stream, ids[b])
        for g, tsel in enumerate(index):
            s = xb if tsel is None else xb[:, tsel]
            s.sort(axis=-1)
            out[b, g] = _sorted_quantiles(s, nodes, x.dtype)

    if ncells and ntime:
        _map_blocks(block, ncells, threads)
    else:
        out[...] = np.nan
    return out.reshape(*x.shape[:-1], len(index), nodes.size)


def adjustment_factors(ref_q: np.ndarray, hist_q: np.ndarray, kind: str) -> np.ndarray:
    """``ref_q / hist_q`` (``"*"``) or ``ref_q - hist_q`` (``"+"``), elementwise."""
    _check_kind(kind)
    with np.errstate(divide="ignore", invalid="ignore"):
        return ref_q / hist_q if kind == MULTIPLICATIVE else ref_q - hist_q


def check_positive_quantiles(q: np.ndarray, name: str, *, strict: bool) -> None:
    """Multiplicative QDM: raise :class:`InputError` where quantiles are <= 0 (``strict``) or < 0.

    ``q`` has shape (..., Q); NaN (empty cells) is ignored.
    """
    q = np.asarray(q)
    bad = (q <= 0) if strict else (q < 0)
    nbad = int(bad.reshape(-1, q.shape[-1]).any(axis=-1).sum()) if q.size else 0
    if nbad:
        ncells = int(np.prod(q.shape[:-1])) if q.ndim > 1 else 1
        what = "zeros or negative values" if strict else "negative values"
        raise InputError(
            f"'{name}' has {what} (in {nbad} of {ncells} cells/groups its lowest quantile is "
            f"{'<= 0' if strict else '< 0'}), but multiplicative QDM (kind='*') divides by hist's quantiles"
            " and needs positive data. Pass jitter_under (a float in the data's units, or a string such "
            "as '0.01 mm/d') to replace dry-day values by small random values, or use kind='+'."
        )


# --------------------------------------------------------------------------------------------------
# ranks and adjustment
# --------------------------------------------------------------------------------------------------


def _argsort_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact sort of each row of a block ``x`` (B, T) along time by a stable argsort, NaN last.

    The general path of :func:`_sort_with_order` (any float dtype and length). Returns the sorted values
    (B, T), the time index of each sorted value (B, T; ties in time order) and the number of valid values
    of each row (B,).
    """
    x = np.ascontiguousarray(x)
    nvalid = x.shape[-1] - np.count_nonzero(np.isnan(x), axis=-1)
    index = np.argsort(x, axis=-1, kind="stable")
    return np.take_along_axis(x, index, axis=-1), index, nvalid


#: Rounds of neighbour swaps that :func:`_repair_order` spends on values that share a key before it sorts
#: the rows that still have values out of order with :func:`_argsort_rows`.
_MAX_REPAIR_ROUNDS = 16


def _order_keys(x: np.ndarray) -> np.ndarray:
    """Order-preserving unsigned integer keys of a C-contiguous float32 or float64 block ``x``.

    ``a < b`` (as floats) exactly when ``key(a) < key(b)``; -0.0 gets the key of +0.0 (they compare equal);
    NaN (any sign or payload) gets a key above that of +inf or below that of -inf. uint32 for float32,
    uint64 for float64.
    """
    canonical = x + x.dtype.type(0)  # -0.0 + 0.0 = +0.0; a new array, reused for the keys
    signed = np.int32 if x.dtype == np.float32 else np.int64
    bits = canonical.view(signed)
    mask = bits >> (8 * bits.itemsize - 1)  # all ones for negatives, zero for positives
    mask |= signed(np.iinfo(signed).min)
    bits ^= mask  # negatives: all bits flipped; positives: the sign bit flipped
    return bits.view(np.uint32 if x.dtype == np.float32 else np.uint64)


@functools.lru_cache(maxsize=4)
def _infinity_keys(dtype: str) -> tuple[int, int]:
    """Keys (:func:`_order_keys`) of -inf and +inf for ``dtype``: those of NaN lie outside them."""
    keys = _order_keys(np.array([-np.inf, np.inf], dtype=dtype))
    return int(keys[0]), int(keys[1])


def _sort_keys(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """32-bit sort keys of a C-contiguous float32 or float64 block ``x`` (B, T), and the number of valid
    values of each row (B,).

    ``x[i, a] < x[i, b]`` implies ``key[i, a] <= key[i, b]``, and NaN get ``2**32 - 1``, above every valid
    value. For float32 the keys are the order-preserving keys (:func:`_order_keys`): equal keys mean equal
    values. float64 keys are shifted to 32 bits over the range of each row's keys, so values very close
    to each other may share a key.
    """
    b, t = x.shape
    nan_field = 2**32 - 1
    u = _order_keys(x)
    kmin, kmax = u.min(axis=-1), u.max(axis=-1)
    neg_inf, pos_inf = _infinity_keys(x.dtype.name)
    nvalid = np.full(b, t, dtype=np.intp)
    nan_rows = np.flatnonzero((kmin < neg_inf) | (kmax > pos_inf))
    nan = np.isnan(x[nan_rows])
    if nan_rows.size:
        nvalid[nan_rows] = t - np.count_nonzero(nan, axis=-1)
    if u.dtype == np.uint32:  # every valid float32 key is below 2**32 - 1 already
        keys = u
    else:
        if nan_rows.size:
            sub = u[nan_rows]
            lo = np.where(nan, np.iinfo(u.dtype).max, sub).min(axis=-1)
            hi = np.where(nan, 0, sub).max(axis=-1)
            empty = nvalid[nan_rows] == 0
            kmin[nan_rows] = np.where(empty, 0, lo)
            kmax[nan_rows] = np.where(empty, 0, hi)
        shifts = []
        for span in (kmax - kmin).tolist():
            shift = max(0, int(span).bit_length() - 32)
            shifts.append(shift + int((span >> shift) >= nan_field))
        u -= kmin[:, None]
        u >>= np.array(shifts, dtype=u.dtype)[:, None]
        keys = u.astype(np.uint32)
    if nan_rows.size:
        sub = keys[nan_rows]
        sub[nan] = nan_field
        keys[nan_rows] = sub
    return keys, nvalid


def _repair_order(x: np.ndarray, s: np.ndarray, index: np.ndarray) -> None:
    """Finish sorting rows ``s`` (B, T) that are in order except among neighbours that shared a key.

    ``s`` holds values in key order, ``index`` (B, T) their flat indices into ``x`` (B, T); both are
    updated in place. Values out of order can only sit within a run of equal keys: an odd-even
    transposition sort of the inverted neighbours puts them in order (stable: ties keep their order; NaN
    never compares greater). Rows still out of order after :data:`_MAX_REPAIR_ROUNDS` rounds are sorted
    again with :func:`_argsort_rows`.
    """
    t = s.shape[1]
    cand = np.flatnonzero(s[:, :-1] > s[:, 1:])
    if not cand.size:
        return
    cand += cand // (t - 1)  # flat position of the first of each pair
    flat_s, flat_i = s.reshape(-1), index.reshape(-1)
    for half in range(2 * _MAX_REPAIR_ROUNDS):
        odd = (cand % t) % 2 == half % 2
        p, cand = cand[odd], cand[~odd]
        p = p[flat_s[p] > flat_s[p + 1]]
        if half:  # a pair can be the neighbour of two swapped ones (the first half's pairs are unique)
            p = np.unique(p)
        if p.size:
            flat_s[p], flat_s[p + 1] = flat_s[p + 1], flat_s[p].copy()
            flat_i[p], flat_i[p + 1] = flat_i[p + 1], flat_i[p].copy()
            col = p % t
            near = np.concatenate([p[col > 0] - 1, p[col < t - 2] + 1])
            cand = np.concatenate([cand, near[flat_s[near] > flat_s[near + 1]]])
        if not cand.size:
            return
    left = np.unique(cand[flat_s[cand] > flat_s[cand + 1]] // t)
    if left.size:
        ls, lorder, _ = _argsort_rows(x[left])
        s[left] = ls
        index[left] = lorder + (left * t)[:, None]


def _sort_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_sort_with_order`, with the time order as flat indices into the C-contiguous block ``x``."""
    b, t = x.shape
    offset = (np.arange(b) * t)[:, None]
    if t < 2 or b == 0 or x.dtype not in (np.float32, np.float64):
        s, order, nvalid = _argsort_rows(x)
        index = order.astype(np.intp)
        index += offset
        return s, index, nvalid
    keys, nvalid = _sort_keys(x)
    low = keys.astype(np.uint16)
    keys >>= np.uint32(16)
    high = keys.astype(np.uint16)
    first = np.argsort(low, axis=-1, kind="stable")  # 16-bit keys: radix sort
    first += offset
    index = np.argsort(high.reshape(-1)[first], axis=-1, kind="stable")
    index += offset
    index = first.reshape(-1)[index]
    s = x.reshape(-1)[index]
    if x.dtype != np.float32:
        _repair_order(x, s, index)
    return s, index, nvalid


def _sort_with_order(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort each row of a block ``x`` (B, T) along time, NaN last, keeping the time order of the values.

    Returns the sorted values (B, T), the time index of each sorted value (B, T, integers) and the number of
    valid values of each row (B,). Tied values come in time order.

    For float32 and float64 the values are not sorted themselves: their order-preserving 32-bit keys
    (:func:`_sort_keys`: exact for float32, float64 keys shifted to 32 bits over each row's range)
    are argsorted in two stable passes of numpy's 16-bit radix sort, low half first (an LSD radix sort):
    about half the time of one sort of 64-bit (value, time index) keys, and as fast as sorting the float32
    values alone. float64 values that share a shifted key come out in time order and are put into exact
    order by :func:`_repair_order`. The result is exactly that of :func:`_argsort_rows`.
    """
    x = np.ascontiguousarray(x)
    s, index, nvalid = _sort_rows(x)
    index -= (np.arange(x.shape[0]) * x.shape[1])[:, None]
    return s, index, nvalid


def _tau(rank: np.ndarray, nvalid: np.ndarray, rank_first: np.ndarray, rank_last: np.ndarray) -> np.ndarray:
    """xsdba's rescaled percentage ranks. -> float64, shape of ``rank`` (B, T).

    ``p = rank / N`` and ``tau = p_max (p - p_min) / (p_max - p_min)``, with ``p_min``, ``p_max`` the ``p`` of
    the smallest and largest valid value of each row (their ranks ``rank_first``, ``rank_last``, (B,));
    0.5 where they are equal (fewer than two distinct values).
    """
    n = np.maximum(nvalid, 1)[:, None].astype(np.float64)
    pmin = rank_first[:, None] / n
    pmax = rank_last[:, None] / n
    with np.errstate(divide="ignore", invalid="ignore"):
        tau = pmax * (rank / n - pmin) / (pmax - pmin)
    return np.where(pmax > pmin, tau, 0.5)


def _average_ranks(s: np.ndarray, ties: np.ndarray) -> np.ndarray:
    """1-based ranks (float64) of sorted rows ``s`` (B, T), tied values getting the mean of their ranks.

    ``ties`` is ``s[:, 1:] == s[:, :-1]``.
    """
    b, t = s.shape
    pos = np.arange(t, dtype=np.int32)
    new_run = np.ones((b, t), dtype=bool)
    new_run[:, 1:] = ~ties
    last_of_run = np.ones((b, t), dtype=bool)
    last_of_run[:, :-1] = ~ties
    start = np.maximum.accumulate(np.where(new_run, pos, 0), axis=-1)
    end = np.minimum.accumulate(np.where(last_of_run, pos, t - 1)[:, ::-1], axis=-1)[:, ::-1]
    return (start + end) * 0.5 + 1.0


def _row_tau(rank: np.ndarray, nvalid: np.ndarray) -> np.ndarray:
    """tau from the ranks (B, T) of sorted rows with ``nvalid`` valid values each (NaN ranks past them)."""
    rows = np.arange(rank.shape[0])
    return _tau(rank, nvalid, rank[:, 0], rank[rows, np.maximum(nvalid - 1, 0)])


def rank_fractions(x: np.ndarray) -> np.ndarray:
    """Quantile (rank fraction ``tau`` in [0, 1]) of each value within its own cell, time last.

    The convention of xsdba's ``rank(..., pct=True)`` (see the module docstring): average ranks for
    ties, NaN skipped (and returned as NaN), ``0.5`` where a cell has fewer than two distinct values.

    Parameters
    ----------
    x
        Shape (..., T).

    Returns
    -------
    numpy.ndarray
        Shape (..., T), float64.
    """
    x = np.asarray(x)
    flat = _as_cells(x)
    if flat.size == 0:
        return np.full(x.shape, np.nan)
    s, order, nvalid = _sort_with_order(flat)
    tau = _row_tau(_average_ranks(s, s[:, 1:] == s[:, :-1]), nvalid)
    tau[np.arange(s.shape[1]) >= nvalid[:, None]] = np.nan
    out = np.empty(flat.shape, dtype=np.float64)
    np.put_along_axis(out, order.astype(np.intp), tau, axis=-1)
    return out.reshape(x.shape)


def _node_of_tau(tau: np.ndarray, nq: int) -> np.ndarray:
    """Nearest node (ties to the lower one) of each tau; 0 for NaN."""
    node = np.ceil(tau * nq)
    node -= 1.0
    np.nan_to_num(node, copy=False, nan=0.0)
    return np.clip(node, 0, nq - 1).astype(np.intp)


@functools.lru_cache(maxsize=64)
def _node_table(nvalid: int, nq: int) -> np.ndarray:
    """Node index for each doubled rank ``k = 2 r`` (k = 0 .. 2 N) in a row of N = ``nvalid`` valid values
    whose smallest and largest values are not tied (ranks 1 and N).

    Uses the same floating-point operations as :func:`_row_tau`, so the nodes are identical.
    """
    rank = np.arange(2 * nvalid + 1)[None, :] * 0.5
    one = np.ones(1)
    table = _node_of_tau(_tau(rank, np.array([nvalid]), one, one * nvalid), nq)[0]
    table.flags.writeable = False
    return table


@functools.lru_cache(maxsize=64)
def _position_nodes(nvalid: int, ntime: int, nq: int) -> np.ndarray:
    """Node of each of the ``ntime`` sorted positions of a row with ``nvalid`` valid values whose
    smallest and largest values are not tied, ignoring other ties (positions past ``nvalid``: the last
    node). Shape (ntime,)."""
    doubled = np.minimum(np.arange(2, 2 * ntime + 1, 2), 2 * nvalid)  # 2 x rank of each position
    nodes = _node_table(nvalid, nq)[doubled]
    nodes.flags.writeable = False
    return nodes


def _sorted_factors(s: np.ndarray, nvalid: np.ndarray, af: np.ndarray) -> np.ndarray:
    """Adjustment factor (from ``af``, (B, Q)) at the tau of every value of sorted rows ``s`` (B, T).

    tau only depends on the (average) rank and the number of valid values N, as long as the smallest and
    the largest value of a row are not tied: the node then comes from a table over doubled ranks (one
    gather for the whole block) and only tied values - few, in continuous data - are looked up again with
    their average rank. Rows whose extreme values are tied take the general path (:func:`_row_tau`).
    Values past N (NaN) get some factor: NaN times anything stays NaN.
    """
    b, t = s.shape
    nq = af.shape[-1]
    eq = s[:, 1:] == s[:, :-1]  # NaN never ties
    rows = np.arange(b)
    general = nvalid < 2
    if t > 1:
        general |= eq[:, 0] | eq[rows, np.maximum(nvalid - 2, 0)]
    out = np.empty((b, t), dtype=af.dtype)
    if not general.any() and nvalid.min() == nvalid.max():  # the usual case: one table for all rows
        np.take(af, _position_nodes(int(nvalid[0]), t, nq), axis=-1, out=out)
    else:
        for n in np.unique(nvalid[~general]):
            sel = np.flatnonzero((nvalid == n) & ~general)
            out[sel] = np.take(af[sel], _position_nodes(int(n), t, nq), axis=-1)
    # tied values in those rows: a run of equal values at positions a..e has doubled rank a + e + 2
    r, i = np.nonzero(eq & ~general[:, None] if general.any() else eq)
    if r.size:
        new = np.ones(r.size, dtype=bool)
        new[1:] = (r[1:] != r[:-1]) | (i[1:] != i[:-1] + 1)
        starts = np.flatnonzero(new)
        ends = np.r_[starts[1:] - 1, r.size - 1]  # last tied pair of each run
        k = i[starts] + (i[ends] + 1) + 2
        rr = r[starts]
        node = np.empty(starts.size, dtype=np.intp)
        for n in np.unique(nvalid[rr]):
            m = nvalid[rr] == n
            node[m] = _node_table(int(n), nq)[k[m]]
        run = np.cumsum(new) - 1
        out[r, i] = af[r, node[run]]
        out[rr, i[ends] + 1] = af[rr, node]
    g = np.flatnonzero(general)
    if g.size:
        node2 = _node_of_tau(_row_tau(_average_ranks(s[g], eq[g]), nvalid[g]), nq)
        out[g] = np.take_along_axis(af[g], node2, axis=-1)
    return out


def adjust_quantile_delta(
    sim: np.ndarray,
    hist_q: np.ndarray,
    ref_q: np.ndarray,
    kind: str,
    *,
    groups: np.ndarray | None = None,
    thresh: float | None = None,
    seed: int = 0,
    stream: int = 2,
    cell_ids: np.ndarray | None = None,
    threads: int | None = 1,
) -> np.ndarray:
    """Quantile delta mapping of ``sim`` with fitted quantiles (Cannon et al. 2015, eq. 2-6).

    ``out[t] = sim[t] * ref_q(tau_t) / hist_q(tau_t)`` (``"*"``) or ``sim[t] + ref_q(tau_t) - hist_q(tau_t)``
    (``"+"``), where ``tau_t`` is the quantile of ``sim[t]`` within sim's own distribution (same cell and
    group), and the factors are taken at the nearest of the equally spaced nodes (module docstring).

    Parameters
    ----------
    sim
        Data to adjust, shape (..., T).
    hist_q, ref_q
        Quantiles of hist and ref at the nodes ``(arange(Q) + 0.5) / Q``, shape (..., G, Q).
    kind
        ``"*"`` or ``"+"``.
    groups
        Group label (0 .. G-1) of each time step of ``sim``, shape (T,); None when G == 1.
    thresh, seed, stream, cell_ids
        Dry-day threshold: sim values below it are jittered first (:func:`jitter_under`) and, for
        ``"*"``, adjusted values below it are set to 0.
    threads
        Threads over blocks of cells (None: one per CPU).

    Returns
    -------
    numpy.ndarray
        Shape and dtype of ``sim`` (float64 for integer input). It is a view of an array laid out
        time-first, ``(T, ...)``, in C order: transposed back, the result is contiguous.

    Raises
    ------
    InputError
        Unknown kind, shapes that do not fit, or (``"*"``) non-positive hist or negative ref quantiles.
    """
    _check_kind(kind)
    sim = np.asarray(sim)
    hist_q = np.asarray(hist_q)
    ref_q = np.asarray(ref_q)
    flat = _as_cells(sim)
    ncells, ntime = flat.shape
    ngroups, nq = hist_q.shape[-2:]
    if hist_q.shape != ref_q.shape or int(np.prod(hist_q.shape[:-2])) != ncells:
        raise InputError(
            f"Quantiles of shape {hist_q.shape} (hist) and {ref_q.shape} (ref) do not fit sim of shape "
            f"{sim.shape}: expected (*cells, groups, quantiles) with the cells of sim."
        )
    if kind == MULTIPLICATIVE:
        check_positive_quantiles(hist_q, "hist", strict=True)
        check_positive_quantiles(ref_q, "ref", strict=False)
    dtype = sim.dtype if np.issubdtype(sim.dtype, np.floating) else np.dtype(np.float64)
    af = adjustment_factors(ref_q, hist_q, kind).reshape(ncells, ngroups, nq).astype(dtype, copy=False)
    if groups is None and ngroups != 1:
        raise InputError(f"sim needs a group label per time step: the quantiles have {ngroups} groups.")
    index = _group_index(groups, ngroups, ntime)
    ids = np.arange(ncells) if cell_ids is None else np.asarray(cell_ids).reshape(-1)
    out = np.empty((ntime, ncells), dtype=dtype)  # time first: the caller's usual layout

    def block(b: slice) -> None:
        xb = flat[b]
        if thresh is not None:
            xb = _jitter_block(xb, thresh, seed, stream, ids[b])
        xb = _contiguous_rows(xb, dtype) if thresh is None else xb.astype(dtype, copy=False)
        for g, tsel in enumerate(index):
            part = xb if tsel is None else xb[:, tsel]
            if part.shape[-1] == 0:
                continue
            s, where, nvalid = _sort_rows(np.ascontiguousarray(part))
            f = _sorted_factors(s, nvalid, af[b, g])
            if kind == MULTIPLICATIVE:
                f *= s
                if thresh is not None:
                    f[f < thresh] = 0
            else:
                f += s
            # back to time order: scatter within the block (cache-friendly), then copy time-first
            res = np.empty_like(f)
            res.reshape(-1)[where] = f
            if tsel is None:
                _copy_transposed(res, out[:, b])
            else:
                out[tsel, b] = res.T

    if ncells and ntime:
        with np.errstate(invalid="ignore", over="ignore"):
            _map_blocks(block, ncells, threads)
    return out.T.reshape(sim.shape)
