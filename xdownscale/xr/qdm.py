"""Quantile delta mapping (QDM, Cannon et al. 2015) for DataArrays, per grid cell.

:class:`QDM` is fitted on a reference (``ref``, observations or the downscaling model's training data) and
the climate model over the same historical period (``hist``); :meth:`QDM.adjust` then corrects any run of
that model (``sim``, historical or future) cell by cell:

* multiplicative (``kind="*"``, precipitation): ``out = sim * ref_q(tau) / hist_q(tau)``;
* additive (``kind="+"``, temperature): ``out = sim + ref_q(tau) - hist_q(tau)``;

where ``tau`` is the quantile of each ``sim`` value within sim's own distribution (same cell and group).
The model's relative (or absolute) change of every quantile between ``hist`` and ``sim`` is kept, and
``adjust(hist)`` has ``ref``'s distribution.

Conventions (chosen to agree with ``xsdba.QuantileDeltaMapping`` with its defaults ``interp="nearest"`` and
``extrapolation="constant"``; the numerics are in :mod:`xdownscale.core.qdm`, whose docstring has the
formulas)
---------------------------------------------------------------------------------------------------------
* Quantile nodes ``(arange(n) + 0.5) / n`` (xsdba's ``equally_spaced_nodes(n)``), default ``n = 500``.
* Quantiles estimated with numpy's default (Hyndman & Fan type 7, linear between order statistics), as
  ``xsdba.nbutils.quantile`` does. NaN values are skipped: scattered gaps are ignored, and a cell that is
  all NaN (sea in E-OBS) has NaN quantiles and NaN output, without warnings.
* ``tau`` is xsdba's rescaled percentage rank (average rank for ties): 0 for the smallest value of each
  cell and group, 1 for the largest. Cells with fewer than two distinct values get ``tau = 0.5``.
* The factor at ``tau`` is that of the nearest node (lower node on exact ties); outside the nodes the first
  or last factor is used (constant extrapolation).
* Groups: ``"time"`` (one group), ``"time.season"`` (DJF, MAM, JJA, SON) or ``"time.month"``: quantiles,
  ranks and factors are computed within each group, pooled over all years (like ``xsdba.Grouper`` without
  a window). ``sim`` may only contain groups that the fit saw.
* Dry days: ``jitter_under`` (a float in the data's units, or a string with units such as
  ``"0.01 mm/d"``) replaces values below it in ``ref``, ``hist`` and ``sim`` by uniform random values in
  ``(0, jitter_under)`` (seeded by ``seed``; the same numbers whatever the dask chunking), like
  ``xsdba.processing.jitter_under_thresh``. After a multiplicative adjustment, outputs below the threshold
  are set back to 0.
* Multiplicative QDM divides by ``hist``'s quantiles: if ``hist`` has zeros (or negative values) at the
  lowest quantile and no ``jitter_under`` is given, :class:`~xdownscale.errors.InputError` asks for one -
  a tiny threshold guessed by the library would depend on the units and silently shape the dry-day
  statistics. Negative ``ref`` quantiles are refused for ``"*"`` as well.

Inputs need a time dimension (found with :func:`xdownscale.xr.cf.find_time`, whatever its name); all other
dimensions are grid cells (any names and number, e.g. lat/lon, or station). ``ref``, ``hist`` and ``sim``
must be on the same cells, and in the same units where they carry a ``units`` attribute. With dask, time
must be one chunk (it is rechunked with a :class:`~xdownscale.errors.PerformanceWarning` otherwise) and
spatial chunks are processed independently and lazily; numpy inputs are processed on all CPU cores.

References
----------
Cannon, A. J., Sobie, S. R. and Murdock, T. Q. (2015): Bias correction of GCM precipitation by quantile
mapping: how well do methods preserve changes in quantiles and extremes? J. Climate 28, 6938-6959.

Examples
--------
>>> import numpy as np, pandas as pd, xarray as xr
>>> time = pd.date_range("2000-01-01", periods=3650, freq="D")
>>> rng = np.random.default_rng(0)
>>> def field(scale):
...     data = rng.gamma(0.8, scale, (3650, 2, 3)).astype("float32")
...     return xr.DataArray(data, dims=("time", "y", "x"), coords={"time": time}, attrs={"units": "mm/d"})
>>> ref, hist, sim = field(3.0), field(2.0), field(2.4)
>>> qdm = QDM.fit(ref, hist, kind="*", nquantiles=100)
>>> out = qdm.adjust(sim)
>>> out.dims, out.dtype
(('time', 'y', 'x'), dtype('float32'))
>>> bool(abs(float(out.mean() / sim.mean()) - 1.5) < 0.1)  # ref/hist = 1.5 everywhere
True
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import xarray as xr

from ..core import qdm as core
from ..errors import ChunkingError, GridMismatchError, InputError, PerformanceWarning, UnitError
from .cf import find_time, require_float

__all__ = ["QDM", "apply_qdm", "reference_quantiles"]

#: group string -> name of the group dimension in the fitted quantiles (None: no group dimension)
GROUPS: dict[str, str | None] = {"time": None, "time.season": "season", "time.month": "month"}
SEASONS = ("DJF", "MAM", "JJA", "SON")
QUANTILE_DIM = "quantiles"
_MARKER = ("xdownscale_object", "QDM")
_FORMAT_VERSION = 1
_STREAMS = {"ref": 0, "hist": 1, "sim": 2}


# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------


def _check_group(group: str) -> str | None:
    if not isinstance(group, str) or group not in GROUPS:
        raise InputError(
            f"Unknown group {group!r}; expected one of {', '.join(map(repr, GROUPS))} (quantiles over all "
            "time steps, per season, or per calendar month)."
        )
    return GROUPS[group]


def _check_array(da: Any, name: str) -> tuple[xr.DataArray, str]:
    if not isinstance(da, xr.DataArray):
        raise InputError(f"'{name}' must be an xarray.DataArray; got {type(da).__name__}.")
    time = str(find_time(da.rename(name) if da.name is None else da))
    return require_float(da), time


def _cell_sizes(da: xr.DataArray, exclude: Hashable | tuple[Hashable, ...]) -> dict[Hashable, int]:
    skip = exclude if isinstance(exclude, tuple) else (exclude,)
    return {d: n for d, n in da.sizes.items() if d not in skip}


def _check_same_cells(
    a: xr.DataArray, a_name: str, a_skip: Any, b: xr.DataArray, b_name: str, b_skip: Any
) -> None:
    """Raise GridMismatchError unless ``a`` and ``b`` have the same cell dims, sizes and coordinates."""
    ca, cb = _cell_sizes(a, a_skip), _cell_sizes(b, b_skip)
    if ca != cb:
        raise GridMismatchError(
            f"'{a_name}' has cells {dict(ca)} (shape {tuple(ca.values())}) but '{b_name}' has {dict(cb)} "
            f"(shape {tuple(cb.values())}); QDM works cell by cell and needs both on the same grid. Regrid "
            "one onto the other first, e.g. with xdownscale.regrid."
        )
    for dim in ca:
        if dim in a.indexes and dim in b.indexes:
            va, vb = a.indexes[dim].values, b.indexes[dim].values
            same = (
                np.allclose(va, vb, rtol=0, atol=1e-6)
                if np.issubdtype(va.dtype, np.number) and np.issubdtype(vb.dtype, np.number)
                else np.array_equal(va, vb)
            )
            if not same:
                raise GridMismatchError(
                    f"'{a_name}' and '{b_name}' have the same shape but different '{dim}' coordinates "
                    f"({va[:3]}... vs {vb[:3]}...); QDM needs both on the same grid. Regrid one onto the "
                    "other first, e.g. with xdownscale.regrid."
                )


def _parsed_units(da: xr.DataArray) -> Any:
    """pint units of ``da``, its raw units string when pint cannot read it, or None without units."""
    text = da.attrs.get("units")
    if text is None:
        return None
    from .units import parse_units

    try:
        return parse_units(da)
    except InputError:
        return str(text)


def _check_same_units(a: xr.DataArray, a_name: str, b: xr.DataArray, b_name: str) -> None:
    ua, ub = a.attrs.get("units"), b.attrs.get("units")
    if ua is None or ub is None or ua == ub:
        return
    if _parsed_units(a) != _parsed_units(b):
        raise UnitError(
            f"'{a_name}' has units '{ua}' but '{b_name}' has units '{ub}'; QDM needs {a_name} and {b_name} "
            f"in the same units. Convert one first, e.g. xdownscale.convert_units({b_name}, '{ua}')."
        )


def _threshold(jitter_under: float | str | None, da: xr.DataArray, name: str) -> float | None:
    """The dry-day threshold as a float in the units of ``da``."""
    if jitter_under is None:
        return None
    if isinstance(jitter_under, str):
        from cf_xarray.units import units as ureg

        from .units import convert_units, parse_units

        try:
            q: Any = ureg.Quantity(jitter_under)
        except Exception as err:
            raise UnitError(
                f"jitter_under={jitter_under!r} cannot be read as a quantity ({err}); pass a number in the "
                "data's units or a string such as '0.01 mm/d'."
            ) from None
        if "units" not in da.attrs:
            raise UnitError(
                f"jitter_under={jitter_under!r} has units but '{name}' has no units attribute; set "
                f"{name}.attrs['units'] or pass jitter_under as a number in the data's units."
            )
        tmp = xr.DataArray(float(q.magnitude), attrs={"units": f"{q.units:~}"}, name="jitter_under")
        value = float(convert_units(tmp, parse_units(da)).values)
    elif isinstance(jitter_under, int | float | np.number) and not isinstance(jitter_under, bool):
        value = float(jitter_under)
    else:
        raise InputError(
            f"jitter_under must be a number, a string with units or None; got {type(jitter_under).__name__}."
        )
    if not np.isfinite(value) or value <= 0:
        raise InputError(f"jitter_under must be a positive threshold; got {jitter_under!r}.")
    return value


def _external_stacklevel() -> int:
    """``stacklevel`` that points a warning at the first caller outside xdownscale."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


def _single_time_chunk(da: xr.DataArray, time: str, name: str) -> xr.DataArray:
    """``da`` with its whole time axis in one dask chunk (rechunked with a PerformanceWarning)."""
    if da.chunks is None:
        return da
    if any(np.isnan(c) for chunks in da.chunks for c in chunks):
        raise ChunkingError(
            f"'{name}' has unknown dask chunk sizes (dims {tuple(map(str, da.dims))}), so its time axis "
            f"cannot be put into one chunk as QDM needs. Compute them first: "
            f"{name} = {name}.copy(data={name}.data.compute_chunk_sizes()), or load the data."
        )
    chunks = da.chunksizes[time]
    if len(chunks) == 1:
        return da
    import dask
    from dask.utils import parse_bytes

    out = da.chunk({time: -1})
    cells = _cell_sizes(da, time)
    biggest = da.sizes[time] * da.dtype.itemsize * int(np.prod([max(da.chunksizes[d]) for d in cells]))
    limit = 4 * parse_bytes(dask.config.get("array.chunk-size"))
    spatial = ""
    if biggest > limit:  # whole time series of the current spatial chunks would be too big: split space
        out = da.chunk({time: -1, **dict.fromkeys(cells, "auto")})
        spatial = " and its spatial chunks made smaller"
    warnings.warn(
        f"'{name}' is split into {len(chunks)} dask chunks along '{time}'; QDM needs the whole time series "
        f"of each cell in one chunk, so it is rechunked to {{'{time}': -1}}{spatial} for this step only. "
        "That is expected for data chunked along time, the chunking downscaling asks for (the steps "
        f"after QDM keep the time chunks); data with one chunk along '{time}' skip the rechunk.",
        PerformanceWarning,
        stacklevel=_external_stacklevel(),
    )
    return out


def _cell_ids(da: xr.DataArray, time: str) -> xr.DataArray:
    """Global integer id of every cell, chunked like ``da`` (keys the jitter noise)."""
    sizes = _cell_sizes(da, time)
    ids = xr.DataArray(
        np.arange(int(np.prod(list(sizes.values())))).reshape(tuple(sizes.values())), dims=tuple(sizes)
    )
    if da.chunks is not None:
        ids = ids.chunk({d: da.chunksizes[d] for d in sizes})
    return ids


def _labels(da: xr.DataArray, time: str, gdim: str, name: str) -> np.ndarray:
    if time not in da.coords:
        raise InputError(
            f"'{name}' has no coordinate for its time dimension '{time}'; grouping by {gdim} needs dates. "
            "Assign a datetime coordinate or use group='time'."
        )
    try:
        return np.asarray(getattr(da[time].dt, gdim).values)
    except (AttributeError, TypeError) as err:
        raise InputError(
            f"'{name}' has time values of dtype {da[time].dtype} that are not dates ({err}); grouping by "
            f"{gdim} needs them. Decode the times (xr.open_dataset(..., decode_times=True)) or use "
            "group='time'."
        ) from None


def _sort_groups(values: Any, gdim: str) -> list[Any]:
    uniq = set(np.asarray(values).tolist())
    if gdim == "season":
        return [s for s in SEASONS if s in uniq]
    return sorted(uniq)


def _group_codes(labels: np.ndarray, groups: list[Any], name: str, gdim: str) -> np.ndarray:
    lookup = {g: i for i, g in enumerate(groups)}
    missing = sorted({v for v in labels.tolist() if v not in lookup}, key=str)
    if missing:
        raise InputError(
            f"'{name}' has {gdim}s {missing} for which the QDM has no quantiles (it has {groups}). Fit it on "
            f"data covering these {gdim}s, or select only {groups} from '{name}'."
        )
    return np.array([lookup[v] for v in labels.tolist()], dtype=np.intp)


def _is_dask(*arrays: xr.DataArray) -> bool:
    return any(a.chunks is not None for a in arrays)


# --------------------------------------------------------------------------------------------------
# quantiles
# --------------------------------------------------------------------------------------------------


def _quantile_kernel(x: np.ndarray, *ids: np.ndarray, check: str | None, name: str, **kw: Any) -> np.ndarray:
    q = core.empirical_quantiles(x, cell_ids=ids[0] if ids else None, **kw)
    if check is not None:
        core.check_positive_quantiles(q, name, strict=check == "positive")
    return q


def _quantiles(
    da: xr.DataArray,
    time: str,
    name: str,
    nodes: np.ndarray,
    gdim: str | None,
    groups: list[Any] | None,
    thresh: float | None,
    seed: int,
    check: str | None = None,
) -> xr.DataArray:
    """Quantiles of ``da`` per cell (and group): dims ([gdim], quantiles, *cells)."""
    da = _single_time_chunk(da, time, name)
    codes = None
    if gdim is not None and groups is not None:
        codes = _group_codes(_labels(da, time, gdim, name), groups, name, gdim)
    args = [da]
    if thresh is not None:
        args.append(_cell_ids(da, time))
    kwargs = {
        "nodes": nodes,
        "groups": codes,
        "ngroups": 1 if groups is None else len(groups),
        "thresh": thresh,
        "seed": seed,
        "stream": _STREAMS[name] if name in _STREAMS else 0,
        "threads": 1 if _is_dask(da) else None,
        "check": check,
        "name": name,
    }
    gname = gdim or "_group"
    q = xr.apply_ufunc(
        _quantile_kernel,
        *args,
        input_core_dims=[[time]] + [[]] * (len(args) - 1),
        output_core_dims=[[gname, QUANTILE_DIM]],
        kwargs=kwargs,
        dask="parallelized",
        output_dtypes=[da.dtype],
        dask_gufunc_kwargs={"output_sizes": {gname: kwargs["ngroups"], QUANTILE_DIM: nodes.size}},
    )
    q = q.drop_vars([c for c in q.coords if time in q[c].dims])
    q = q.assign_coords({QUANTILE_DIM: nodes})
    if gdim is None:
        q = q.squeeze(gname, drop=True)
        q = q.transpose(QUANTILE_DIM, ...)
    else:
        q = q.assign_coords({gdim: np.asarray(groups)}).transpose(gdim, QUANTILE_DIM, ...)
    return q


def reference_quantiles(
    ref: xr.DataArray,
    nquantiles: int = 500,
    group: str = "time",
    *,
    jitter_under: float | str | None = None,
    seed: int = 0,
) -> xr.DataArray:
    """Per-cell quantiles of a reference, to fit a :class:`QDM` later without the reference data.

    Parameters
    ----------
    ref
        Reference data with a time dimension (any name) and any cell dimensions.
    nquantiles
        Number of quantile nodes ``(arange(n) + 0.5) / n``.
    group
        ``"time"``, ``"time.season"`` or ``"time.month"``.
    jitter_under, seed
        Dry-day threshold and seed, as in :meth:`QDM.fit` (ref's values below it are jittered).

    Returns
    -------
    xarray.DataArray
        Named ``"ref_quantiles"``, dims ``([season|month], "quantiles", *cells)`` with the nodes as the
        ``quantiles`` coordinate, ref's dtype and cell coordinates, and attributes ``units`` (ref's),
        ``group`` and ``nquantiles``. Pass it to :meth:`QDM.from_quantiles`.

    Raises
    ------
    MissingCoordinateError
        ``ref`` has no time dimension.
    InputError
        Unknown group, ``nquantiles < 2``, or dates needed for grouping are missing.
    """
    gdim = _check_group(group)
    nodes = core.equally_spaced_nodes(nquantiles)
    ref, time = _check_array(ref, "ref")
    groups = None if gdim is None else _sort_groups(_labels(ref, time, gdim, "ref"), gdim)
    thresh = _threshold(jitter_under, ref, "ref")
    q = _quantiles(ref, time, "ref", nodes, gdim, groups, thresh, seed)
    attrs = {"long_name": "quantiles of the reference", "group": group, "nquantiles": int(nquantiles)}
    if "units" in ref.attrs:
        attrs["units"] = ref.attrs["units"]
    return q.rename("ref_quantiles").assign_attrs(attrs)


# --------------------------------------------------------------------------------------------------
# the fitted object
# --------------------------------------------------------------------------------------------------


def _adjust_kernel(
    sim: np.ndarray, hist_q: np.ndarray, ref_q: np.ndarray, *ids: np.ndarray, grouped: bool, **kw: Any
) -> np.ndarray:
    if not grouped:
        hist_q, ref_q = hist_q[..., None, :], ref_q[..., None, :]
    return core.adjust_quantile_delta(sim, hist_q, ref_q, cell_ids=ids[0] if ids else None, **kw)


class QDM:
    """A fitted quantile delta mapping (see the module docstring for the method and conventions).

    Make one with :meth:`fit`, :meth:`from_quantiles` or :meth:`from_dataset`; apply it with
    :meth:`adjust`; save it with :meth:`to_dataset` (plain netCDF, no pickle).

    Attributes
    ----------
    hist_quantiles, ref_quantiles
        Quantiles per cell (and group), dims ``([season|month], "quantiles", *cells)``.
    kind
        ``"*"`` or ``"+"``.
    group
        ``"time"``, ``"time.season"`` or ``"time.month"``.
    jitter_under
        Dry-day threshold in the data's units, or None.
    seed
        Seed of the jitter noise.
    units
        Units of the data it was fitted on (None if unknown).
    """

    def __init__(
        self,
        hist_quantiles: xr.DataArray,
        ref_quantiles: xr.DataArray,
        *,
        kind: str,
        group: str,
        jitter_under: float | None = None,
        seed: int = 0,
        units: str | None = None,
    ) -> None:
        core._check_kind(kind)
        self._gdim = _check_group(group)
        self.hist_quantiles = hist_quantiles
        self.ref_quantiles = ref_quantiles
        self.kind = kind
        self.group = group
        self.jitter_under = jitter_under
        self.seed = int(seed)
        self.units = units

    # ---------------------------------------------------------------- construction

    @classmethod
    def fit(
        cls,
        ref: xr.DataArray,
        hist: xr.DataArray,
        kind: str = "*",
        nquantiles: int = 500,
        group: str = "time",
        *,
        jitter_under: float | str | None = None,
        seed: int = 0,
    ) -> QDM:
        """Fit on a reference and the model over the historical period.

        Parameters
        ----------
        ref
            Reference (observations, or the downscaling model's training data), dims (time, *cells).
        hist
            The climate model over the historical period, on the same cells (its time may differ).
        kind
            ``"*"`` (multiplicative: precipitation) or ``"+"`` (additive: temperature).
        nquantiles
            Number of quantile nodes ``(arange(n) + 0.5) / n``.
        group
            ``"time"``, ``"time.season"`` or ``"time.month"``.
        jitter_under
            Dry-day threshold: a float in the data's units or a string with units (``"0.01 mm/d"``).
            Values below it are replaced by uniform noise in (0, threshold); after a multiplicative
            adjustment, outputs below it are set to 0.
        seed
            Seed of the jitter noise.

        Returns
        -------
        QDM
            Lazy (dask-backed quantiles) when ``ref`` or ``hist`` is.

        Raises
        ------
        MissingCoordinateError
            ``ref`` or ``hist`` has no time dimension.
        GridMismatchError
            ``ref`` and ``hist`` are not on the same cells.
        UnitError
            Different units, or a ``jitter_under`` string that cannot be converted to them.
        InputError
            Unknown kind or group, ``nquantiles < 2``; for ``"*"`` without ``jitter_under``: hist with
            zeros or negative values (raised when computed, for dask inputs).
        """
        core._check_kind(kind)
        gdim = _check_group(group)
        core.equally_spaced_nodes(nquantiles)
        ref, rtime = _check_array(ref, "ref")
        hist, htime = _check_array(hist, "hist")
        _check_same_cells(ref, "ref", rtime, hist, "hist", htime)
        _check_same_units(ref, "ref", hist, "hist")
        if gdim is not None:
            rgroups = _sort_groups(_labels(ref, rtime, gdim, "ref"), gdim)
            hgroups = _sort_groups(_labels(hist, htime, gdim, "hist"), gdim)
            if rgroups != hgroups:
                raise InputError(
                    f"'ref' covers the {gdim}s {rgroups} but 'hist' covers {hgroups}; with group={group!r} "
                    f"both must cover the same {gdim}s. Select the common ones from both first."
                )
        ref_q = reference_quantiles(ref, nquantiles, group, jitter_under=jitter_under, seed=seed)
        return cls.from_quantiles(ref_q, hist, kind, group, jitter_under=jitter_under, seed=seed)

    @classmethod
    def from_quantiles(
        cls,
        ref_quantiles: xr.DataArray,
        hist: xr.DataArray,
        kind: str = "*",
        group: str | None = None,
        *,
        jitter_under: float | str | None = None,
        seed: int = 0,
    ) -> QDM:
        """Fit when the reference is only available as per-cell quantiles.

        Parameters
        ----------
        ref_quantiles
            Quantiles of the reference, e.g. from :func:`reference_quantiles` (or shipped with a model):
            a ``"quantiles"`` dimension with the nodes ``(arange(n) + 0.5) / n`` as its coordinate, a
            ``"season"`` or ``"month"`` dimension when grouped, and the cells of ``hist``.
        hist
            The climate model over the historical period.
        kind
            ``"*"`` or ``"+"``.
        group
            ``"time"``, ``"time.season"`` or ``"time.month"``; by default read from the ``group``
            attribute or the group dimension of ``ref_quantiles``. Groups of ``ref_quantiles`` that
            ``hist`` does not cover are dropped.
        jitter_under, seed
            As in :meth:`fit` (applied to ``hist`` and later ``sim``; the reference quantiles are used
            as given).

        Returns
        -------
        QDM

        Raises
        ------
        InputError
            No ``quantiles`` dimension, nodes that are not ``(arange(n) + 0.5) / n``, a group that does not
            match ``ref_quantiles``, or ``hist`` covering groups that ``ref_quantiles`` lacks.
        GridMismatchError, UnitError, MissingCoordinateError
            As in :meth:`fit`.
        """
        core._check_kind(kind)
        if not isinstance(ref_quantiles, xr.DataArray) or QUANTILE_DIM not in ref_quantiles.dims:
            raise InputError(
                f"ref_quantiles must be a DataArray with a '{QUANTILE_DIM}' dimension holding the quantile "
                "nodes as coordinate, as made by xdownscale.xr.qdm.reference_quantiles(ref)."
            )
        nquantiles = ref_quantiles.sizes[QUANTILE_DIM]
        nodes = core.equally_spaced_nodes(nquantiles)
        given = ref_quantiles[QUANTILE_DIM].values if QUANTILE_DIM in ref_quantiles.coords else None
        if given is None or not np.allclose(given, nodes, rtol=0, atol=1e-9):
            raise InputError(
                f"ref_quantiles has quantile nodes {given if given is None else given[:3]}...; expected the "
                f"{nquantiles} equally spaced nodes (arange(n) + 0.5) / n. Compute them with "
                "xdownscale.xr.qdm.reference_quantiles(ref, nquantiles)."
            )
        inferred = next((g for g, d in GROUPS.items() if d is not None and d in ref_quantiles.dims), "time")
        if group is None:
            group = str(ref_quantiles.attrs.get("group", inferred))
        gdim = _check_group(group)
        if group != inferred:
            raise InputError(
                f"group={group!r} but ref_quantiles has dims {tuple(map(str, ref_quantiles.dims))}; "
                f"quantiles for group={group!r} need a '{gdim}' dimension. Compute them with "
                f"reference_quantiles(ref, group={group!r})."
            )
        hist, htime = _check_array(hist, "hist")
        skip = (QUANTILE_DIM,) if gdim is None else (QUANTILE_DIM, gdim)
        _check_same_cells(ref_quantiles, "ref_quantiles", skip, hist, "hist", htime)
        _check_same_units(ref_quantiles, "ref_quantiles", hist, "hist")
        groups = None
        if gdim is not None:
            groups = _sort_groups(_labels(hist, htime, gdim, "hist"), gdim)
            available = ref_quantiles[gdim].values.tolist()
            lacking = [g for g in groups if g not in available]
            if lacking:
                raise InputError(
                    f"'hist' covers the {gdim}s {lacking} but ref_quantiles has none for them (it has "
                    f"{available}). Select only {available} from 'hist', or provide quantiles for all."
                )
            ref_quantiles = ref_quantiles.sel({gdim: groups})
        ref_q = ref_quantiles.astype(hist.dtype) if ref_quantiles.dtype != hist.dtype else ref_quantiles
        if kind == core.MULTIPLICATIVE and ref_q.chunks is None:
            core.check_positive_quantiles(
                ref_q.transpose(..., QUANTILE_DIM).values, "ref_quantiles", strict=False
            )
        thresh = _threshold(jitter_under, hist, "hist")
        check = "positive" if kind == core.MULTIPLICATIVE else None
        hist_q = _quantiles(hist, htime, "hist", nodes, gdim, groups, thresh, seed, check=check)
        hist_q = hist_q.rename("hist_quantiles").assign_attrs(
            long_name="quantiles of the model over the historical period", **_units_attr(hist)
        )
        ref_q = ref_q.rename("ref_quantiles").transpose(*hist_q.dims)
        return cls(
            hist_q,
            ref_q,
            kind=kind,
            group=group,
            jitter_under=thresh,
            seed=seed,
            units=hist.attrs.get("units", ref_quantiles.attrs.get("units")),
        )

    # ---------------------------------------------------------------- properties

    @property
    def nquantiles(self) -> int:
        """Number of quantile nodes."""
        return int(self.hist_quantiles.sizes[QUANTILE_DIM])

    @property
    def nodes(self) -> np.ndarray:
        """The quantile nodes ``(arange(n) + 0.5) / n``."""
        return core.equally_spaced_nodes(self.nquantiles)

    @property
    def cell_dims(self) -> tuple[Hashable, ...]:
        """Dimensions of the grid cells."""
        skip = {QUANTILE_DIM, self._gdim}
        return tuple(d for d in self.hist_quantiles.dims if d not in skip)

    def __repr__(self) -> str:
        cells = {str(d): self.hist_quantiles.sizes[d] for d in self.cell_dims}
        jitter = "" if self.jitter_under is None else f", jitter_under={self.jitter_under:g}"
        return (
            f"QDM(kind={self.kind!r}, group={self.group!r}, nquantiles={self.nquantiles}, cells={cells}"
            f"{jitter})"
        )

    # ---------------------------------------------------------------- adjustment

    def adjust(self, sim: xr.DataArray) -> xr.DataArray:
        """Adjust ``sim`` (any period of the model, on the fitted cells).

        Parameters
        ----------
        sim
            Model data, dims (time, *cells) in any order; dask arrays stay lazy.

        Returns
        -------
        xarray.DataArray
            Same dims, coords, attrs, name and dtype as ``sim`` (integers become float32).

        Raises
        ------
        MissingCoordinateError
            ``sim`` has no time dimension.
        GridMismatchError
            ``sim`` is not on the fitted cells.
        UnitError
            ``sim`` has other units than the fit.
        InputError
            ``sim`` has groups (seasons, months) the fit has no quantiles for.
        """
        original = sim
        sim, time = _check_array(sim, "sim")
        skip = (QUANTILE_DIM,) if self._gdim is None else (QUANTILE_DIM, self._gdim)
        _check_same_cells(self.hist_quantiles, "the fitted QDM", skip, sim, "sim", time)
        if self.units is not None:
            _check_same_units(xr.DataArray(attrs={"units": self.units}), "the fitted QDM", sim, "sim")
        sim = _single_time_chunk(sim, time, "sim")
        codes = None
        if self._gdim is not None:
            groups = self.hist_quantiles[self._gdim].values.tolist()
            codes = _group_codes(_labels(sim, time, self._gdim, "sim"), groups, "sim", self._gdim)
        core_dims = [QUANTILE_DIM] if self._gdim is None else [self._gdim, QUANTILE_DIM]
        hist_q, ref_q = (self._aligned(q, sim, core_dims) for q in (self.hist_quantiles, self.ref_quantiles))
        args = [sim, hist_q, ref_q]
        if self.jitter_under is not None:
            args.append(_cell_ids(sim, time))
        out = xr.apply_ufunc(
            _adjust_kernel,
            *args,
            input_core_dims=[[time], core_dims, core_dims] + [[]] * (len(args) - 3),
            output_core_dims=[[time]],
            kwargs={
                "grouped": self._gdim is not None,
                "kind": self.kind,
                "groups": codes,
                "thresh": self.jitter_under,
                "seed": self.seed,
                "stream": _STREAMS["sim"],
                "threads": 1 if _is_dask(sim, hist_q) else None,
            },
            dask="parallelized",
            output_dtypes=[sim.dtype],
            keep_attrs=False,
        )
        out = out.transpose(*original.dims)
        out.attrs = dict(original.attrs)
        out.encoding = {}
        out.name = original.name
        return out

    def _aligned(self, q: xr.DataArray, sim: xr.DataArray, core_dims: list[str]) -> xr.DataArray:
        """Quantiles without coordinates of their own (sim's are the ones kept), chunked to fit sim."""
        q = q.drop_vars(list(q.coords))
        if q.chunks is not None:
            q = q.chunk(dict.fromkeys(core_dims, -1))
        if sim.chunks is not None:
            q = q.chunk({**{d: sim.chunksizes[d] for d in self.cell_dims}, **dict.fromkeys(core_dims, -1)})
        return q

    # ---------------------------------------------------------------- persistence

    def to_dataset(self) -> xr.Dataset:
        """The fitted QDM as a Dataset that can be written to netCDF (no pickle).

        Variables ``hist_quantiles`` and ``ref_quantiles`` (dims ``([season|month], "quantiles", *cells)``)
        with the nodes as ``quantiles`` coordinate; attributes ``kind``, ``group``, ``nquantiles``, ``seed``,
        ``jitter_under`` (only when set, in the data's units) and ``units`` (when known).
        """
        attrs: dict[str, Any] = {
            _MARKER[0]: _MARKER[1],
            "qdm_format_version": _FORMAT_VERSION,
            "title": "Quantile delta mapping (Cannon et al. 2015) fitted by xdownscale",
            "kind": self.kind,
            "group": self.group,
            "nquantiles": self.nquantiles,
            "seed": self.seed,
        }
        if self.jitter_under is not None:
            attrs["jitter_under"] = float(self.jitter_under)
        if self.units is not None:
            attrs["units"] = str(self.units)
        ds = xr.Dataset({"hist_quantiles": self.hist_quantiles, "ref_quantiles": self.ref_quantiles})
        return ds.assign_attrs(attrs)

    @classmethod
    def from_dataset(cls, ds: xr.Dataset) -> QDM:
        """Rebuild a QDM from :meth:`to_dataset` (e.g. after ``xr.open_dataset``).

        The quantiles are read into memory, unless the dataset was opened with dask chunks (then they
        stay lazy).

        Raises
        ------
        InputError
            ``ds`` is not a dataset written by :meth:`to_dataset`.
        """
        if not isinstance(ds, xr.Dataset):
            raise InputError(f"QDM.from_dataset needs an xarray.Dataset; got {type(ds).__name__}.")
        attrs: Mapping[str, Any] = ds.attrs
        missing = [v for v in ("hist_quantiles", "ref_quantiles") if v not in ds.data_vars]
        missing += [a for a in ("kind", "group", "nquantiles") if a not in attrs]
        if attrs.get(_MARKER[0]) != _MARKER[1] or missing:
            raise InputError(
                "The dataset is not a QDM dataset written by QDM.to_dataset()"
                + (f" (it lacks {', '.join(map(repr, missing))})" if missing else "")
                + ". Fit one with QDM.fit(ref, hist) and save it with qdm.to_dataset().to_netcdf(path)."
            )
        kind, group = str(attrs["kind"]), str(attrs["group"])
        core._check_kind(kind)
        gdim = _check_group(group)
        hist_q, ref_q = ds["hist_quantiles"], ds["ref_quantiles"]
        for q in (hist_q, ref_q):
            if QUANTILE_DIM not in q.dims or (gdim is not None and gdim not in q.dims):
                raise InputError(
                    f"The QDM dataset's '{q.name}' has dims {tuple(map(str, q.dims))}; expected "
                    f"'{QUANTILE_DIM}'{'' if gdim is None else f' and {gdim!r}'}. The file is damaged or "
                    "was not written by QDM.to_dataset()."
                )
        if hist_q.sizes[QUANTILE_DIM] != int(attrs["nquantiles"]):
            raise InputError(
                f"The QDM dataset says nquantiles={attrs['nquantiles']} but has "
                f"{hist_q.sizes[QUANTILE_DIM]} quantiles; the file is damaged."
            )
        if hist_q.chunks is None:  # small: read now, so the QDM does not depend on the open file
            hist_q, ref_q = hist_q.load(), ref_q.load()
        jitter = attrs.get("jitter_under")
        units = attrs.get("units")
        return cls(
            hist_q,
            ref_q.transpose(*hist_q.dims),
            kind=kind,
            group=group,
            jitter_under=None if jitter is None else float(jitter),
            seed=int(attrs.get("seed", 0)),
            units=None if units is None else str(units),
        )


def _units_attr(da: xr.DataArray) -> dict[str, Any]:
    return {"units": da.attrs["units"]} if "units" in da.attrs else {}


def apply_qdm(
    sim: xr.DataArray,
    ref: xr.DataArray | None = None,
    hist: xr.DataArray | None = None,
    *,
    qdm: QDM | None = None,
    kind: str = "*",
    nquantiles: int = 500,
    group: str = "time",
    jitter_under: float | str | None = None,
    seed: int = 0,
) -> xr.DataArray:
    """Bias-correct ``sim`` with quantile delta mapping: fit on ``ref``/``hist``, or use a fitted ``qdm``.

    Parameters
    ----------
    sim
        Model data to adjust.
    ref, hist
        Reference and model over the historical period (both needed unless ``qdm`` is given).
    qdm
        A fitted :class:`QDM` (then ``ref`` and ``hist`` must not be given).
    kind, nquantiles, group, jitter_under, seed
        As in :meth:`QDM.fit` (ignored when ``qdm`` is given).

    Returns
    -------
    xarray.DataArray
        As :meth:`QDM.adjust`.

    Raises
    ------
    InputError
        Neither ``qdm`` nor both ``ref`` and ``hist`` given, or both ways at once; and as :meth:`QDM.fit`
        and :meth:`QDM.adjust`.
    """
    if qdm is not None:
        if ref is not None or hist is not None:
            raise InputError(
                "apply_qdm got a fitted qdm and also ref/hist; pass either qdm=... or ref= and hist=, "
                "not both."
            )
        if not isinstance(qdm, QDM):
            raise InputError(f"qdm must be a fitted xdownscale QDM; got {type(qdm).__name__}.")
        return qdm.adjust(sim)
    if ref is None or hist is None:
        which = " and ".join(n for n, v in (("ref", ref), ("hist", hist)) if v is None)
        raise InputError(
            f"apply_qdm needs {which}: pass ref= (observations) and hist= (the model over the same "
            "historical period), or a fitted qdm= (QDM.fit(ref, hist) or QDM.from_dataset(ds))."
        )
    fitted = QDM.fit(ref, hist, kind, nquantiles, group, jitter_under=jitter_under, seed=seed)
    return fitted.adjust(sim)
