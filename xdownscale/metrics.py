"""Skill of downscaled fields: the evaluation of Hess et al. (2024), Table 1, and ensemble scores.

Grid-based scores find the horizontal dimensions with :func:`xdownscale.xr.cf.find_grid` and the time
dimension with :func:`xdownscale.xr.cf.find_time`; any other dimension (``member``, ...) is kept in the
result.

Spatial means and correlations
    On a global grid (periodic in longitude) cells are weighted by ``cos(latitude)``, their area; on a
    regional grid every cell counts the same (over a few degrees the area changes little, and regional
    products are usually compared cell by cell). Pass ``weights=`` (a DataArray over the horizontal
    dimensions) to choose. NaN cells (masked sea, missing values) are left out of every mean and
    correlation, in either field.

Two grids are compared cell by cell by position: they must have the same shape, but their
coordinates may differ by rounding (:class:`~xdownscale.errors.GridMismatchError` otherwise).

* :func:`pooled_correlation`, :func:`lowpass_correlation` - do the large scales of the ESM survive?
* :func:`mean_abs_error`, :func:`quantile_abs_error`, :func:`error_reduction` - climatological bias;
* :func:`histogram`, :func:`latitude_profile`, :func:`wasserstein` - distributions;
* :func:`crps_ensemble`, :func:`rank_histogram`, :func:`spread_skill` - ensembles.

Examples
--------
>>> from xdownscale.datasets import coarsen_like_esm, synthetic_precipitation
>>> from xdownscale.metrics import mean_abs_error, pooled_correlation
>>> fine = synthetic_precipitation(ny=16, nx=16, ntime=5)
>>> float(pooled_correlation(fine, coarsen_like_esm(fine, 4), factor=4))
1.0
>>> float(mean_abs_error(fine + 1.0, fine))
1.0

References
----------
Hess, P., Aich, M., Pan, B., Boers, N. (2024): Fast, scale-adaptive and uncertainty-aware downscaling of
Earth system model fields with generative machine learning. Section 4.6 and Table 1.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from types import EllipsisType
from typing import Any

import numpy as np
import xarray as xr

from .errors import GridMismatchError, InputError, MissingCoordinateError
from .xr.cf import Grid, find_grid, find_time

__all__ = [
    "area_weights",
    "crps_ensemble",
    "error_reduction",
    "histogram",
    "latitude_profile",
    "lowpass_correlation",
    "mean_abs_error",
    "pooled_correlation",
    "quantile_abs_error",
    "rank_histogram",
    "spread_skill",
    "wasserstein",
]

_Y, _X = "__y__", "__x__"  # temporary names while renaming horizontal dims


def _label(da: Any) -> str:
    name = getattr(da, "name", None)
    return f"'{name}'" if name is not None else "the input"


# ---------------------------------------------------------------- grids and weights
def area_weights(obj: xr.DataArray | xr.Dataset, grid: Grid | None = None) -> xr.DataArray | None:
    """``cos(latitude)`` weights on a global (periodic) grid; None (equal weights) on a regional one.

    Examples
    --------
    >>> from xdownscale.datasets import global_grid, regional_grid
    >>> area_weights(global_grid(30.0)).round(3).values[:3]
    array([0.259, 0.707, 0.966])
    >>> area_weights(regional_grid(4, 4)) is None
    True
    """
    grid = grid or find_grid(obj)
    if not grid.periodic:
        return None
    lat = obj[grid.lat].reset_coords(drop=True)
    weights = np.clip(np.cos(np.deg2rad(np.asarray(lat.values, dtype=np.float64))), 0.0, None)
    return lat.copy(data=weights).rename("area_weights")


def _weights(obj: xr.DataArray, grid: Grid, weights: xr.DataArray | None) -> xr.DataArray | None:
    if weights is None:
        return area_weights(obj, grid)
    if not isinstance(weights, xr.DataArray) or not set(weights.dims) <= set(obj.dims):
        dims = getattr(weights, "dims", None)
        raise InputError(
            f"weights must be a DataArray over dimensions of {_label(obj)} {tuple(map(str, obj.dims))}, "
            f"e.g. over ('{grid.ydim}', '{grid.xdim}'); got {type(weights).__name__} with dims {dims}."
        )
    return weights.astype(np.float64)


def _weighted_mean(x: xr.DataArray, dims: Sequence[Hashable], weights: xr.DataArray | None) -> xr.DataArray:
    """NaN-aware (weighted) mean of ``x`` over ``dims``; NaN where no valid cell is left."""
    if weights is None:
        return x.mean(dims, skipna=True)
    w = weights.where(x.notnull(), 0.0)
    total = w.sum(dims)
    return (x.fillna(0.0) * w).sum(dims) / total.where(total > 0)


def _correlation(
    a: xr.DataArray, b: xr.DataArray, dims: Sequence[Hashable], weights: xr.DataArray | None
) -> xr.DataArray:
    """(Weighted) Pearson correlation over ``dims``, on the cells valid in both; NaN for constant fields."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    valid = a.notnull() & b.notnull()
    w = valid.astype(np.float64) if weights is None else weights.where(valid, 0.0)
    total = w.sum(dims)
    total = total.where(total > 0)
    da_ = (a - (a.fillna(0.0) * w).sum(dims) / total).fillna(0.0)
    db_ = (b - (b.fillna(0.0) * w).sum(dims) / total).fillna(0.0)
    var = (w * da_**2).sum(dims) * (w * db_**2).sum(dims)
    return (w * da_ * db_).sum(dims) / np.sqrt(var.where(var > 0))


def _same_grid(
    a: xr.DataArray, b: xr.DataArray, what: str, fix: str | None = None
) -> tuple[xr.DataArray, xr.DataArray, Grid]:
    """Put ``b`` on the horizontal dims of ``a`` (by position: same shape required)."""
    ga, gb = find_grid(a), find_grid(b)
    if ga.shape(a) != gb.shape(b):
        (ya, xa), (yb, xb) = ga.shape(a), gb.shape(b)
        raise GridMismatchError(
            f"{what}: {_label(a)} is on a {ya} x {xa} grid ('{ga.ydim}', '{ga.xdim}') but {_label(b)} on a "
            f"{yb} x {xb} grid ('{gb.ydim}', '{gb.xdim}'); "
            + (fix or "regrid one onto the other first (xdownscale.regrid).")
        )
    b = b.drop_vars([c for c in b.coords if {gb.ydim, gb.xdim} & set(b[c].dims)])
    b = b.rename({gb.ydim: _Y, gb.xdim: _X}).rename({_Y: ga.ydim, _X: ga.xdim})
    return a, b, ga


def _align(a: xr.DataArray, b: xr.DataArray, what: str) -> tuple[xr.DataArray, xr.DataArray]:
    """Exact alignment of the remaining dims (time, member, ...), with a clear error."""
    for dim in set(a.dims) & set(b.dims):
        if a.sizes[dim] != b.sizes[dim]:
            raise GridMismatchError(
                f"{what}: {_label(a)} has {a.sizes[dim]} steps along '{dim}' but {_label(b)} has "
                f"{b.sizes[dim]}; select the same '{dim}' values in both (e.g. b.sel({dim}=a['{dim}']))."
            )
    try:
        a, b = xr.align(a, b, join="exact")
    except ValueError as err:
        raise GridMismatchError(
            f"{what}: the coordinates of {_label(a)} and {_label(b)} differ ({err}). Give both the same "
            "coordinates, e.g. b = b.assign_coords(time=a['time'])."
        ) from None
    return a, b


def _time_mean(x: xr.DataArray, name: str | None) -> xr.DataArray:
    return x.mean(name, skipna=True) if name is not None else x


# ---------------------------------------------------------------- correlations
def _pattern_correlation(
    a: xr.DataArray, b: xr.DataArray, grid: Grid, weights: xr.DataArray | None, per_time: bool, name: str
) -> xr.DataArray:
    a, b = _align(a, b, name)
    r = _correlation(a, b, grid.dims, _weights(a, grid, weights))
    tname = find_time(a, required=False)
    out = r if per_time else _time_mean(r, tname)
    return out.rename(name).assign_attrs(units="1")


def pooled_correlation(
    fine: xr.DataArray,
    coarse: xr.DataArray,
    factor: int | None = 4,
    *,
    per_time: bool = False,
    weights: xr.DataArray | None = None,
) -> xr.DataArray:
    """Correlation of the block-averaged fine field with the native coarse field ("pooled corr").

    With ``factor=None`` the fine field is averaged onto the coarse grid by conservative regridding
    instead of whole blocks, for grids whose resolutions are not an integer ratio apart (e.g. a
    0.25 deg target and a 1.4 deg ESM).

    ``fine`` is averaged over ``factor x factor`` blocks (NaN-aware, :func:`xdownscale.xr.spectra.upscale`)
    onto the coarse grid, correlated with ``coarse`` over the cells of each time step, and the
    correlations are averaged over time.

    Parameters
    ----------
    fine
        Downscaled field(s), on a grid exactly ``factor`` times finer than ``coarse`` in both directions.
    coarse
        The native ESM field(s), same time steps.
    factor
        Block size in fine cells.
    per_time
        Return the correlation of each time step instead of their mean.
    weights
        Weights over the coarse grid's horizontal dims; default cos(lat) on global grids, equal otherwise.

    Returns
    -------
    xarray.DataArray
        0-d (or over the remaining dims, e.g. ``member``); over time when ``per_time``.

    Raises
    ------
    GridMismatchError
        The fine grid is not exactly ``factor`` times the coarse grid (crop the fine field to whole
        blocks first), or the time steps differ.
    InputError
        ``factor`` is not an integer >= 1.
    """
    from .xr.spectra import upscale

    if factor is None:
        from .xr.regrid import regrid

        pooled = regrid(fine, coarse, method="conservative")
        pooled, coarse, grid = _same_grid(pooled, coarse, "pooled_correlation")
        return _pattern_correlation(pooled, coarse, grid, weights, per_time, "pooled_correlation")
    gf, gc = find_grid(fine), find_grid(coarse)
    (yf, xf), (yc, xc) = gf.shape(fine), gc.shape(coarse)
    if isinstance(factor, (int, np.integer)) and factor >= 1 and (yf, xf) != (factor * yc, factor * xc):
        raise GridMismatchError(
            f"pooled_correlation: the fine grid of {_label(fine)} ({yf} x {xf} cells) is not "
            f"factor={factor} times the coarse grid of {_label(coarse)} ({yc} x {xc}): expected "
            f"{factor * yc} x {factor * xc}. "
            "Crop the fine field to whole blocks of the coarse grid, or pass the factor that relates the two."
        )
    pooled = upscale(fine, factor=factor)
    pooled, coarse, grid = _same_grid(pooled, coarse, "pooled_correlation")
    return _pattern_correlation(pooled, coarse, grid, weights, per_time, "pooled_correlation")


def lowpass_correlation(
    fine: xr.DataArray,
    coarse_on_fine: xr.DataArray,
    wavenumber: Any,
    *,
    per_time: bool = False,
    weights: xr.DataArray | None = None,
) -> xr.DataArray:
    """Correlation of the low-pass filtered fine field with the coarse field regridded to it.

    ``fine`` is filtered at ``wavenumber`` with :func:`xdownscale.xr.spectra.lowpass` (scales with
    ``k <= wavenumber`` cycles per grid cell are kept), correlated with ``coarse_on_fine`` over the cells
    of each time step, and the correlations are averaged over time.

    Parameters
    ----------
    fine
        Downscaled field(s).
    coarse_on_fine
        The ESM field(s) regridded to the grid of ``fine``.
    wavenumber
        Cut-off as accepted by :func:`~xdownscale.xr.spectra.lowpass` (e.g. ``0.0667`` or ``"500 km"``).
    per_time, weights
        As for :func:`pooled_correlation`.

    Raises
    ------
    GridMismatchError
        The two grids or time axes differ.
    """
    from .xr.spectra import lowpass

    fine, coarse_on_fine, grid = _same_grid(fine, coarse_on_fine, "lowpass_correlation")
    smooth = lowpass(fine, wavenumber)
    return _pattern_correlation(smooth, coarse_on_fine, grid, weights, per_time, "lowpass_correlation")


# ---------------------------------------------------------------- climatological errors
def _climate_error(
    pred: xr.DataArray,
    target: xr.DataArray,
    reduce: Any,
    weights: xr.DataArray | None,
    what: str,
) -> xr.DataArray:
    pred, target, grid = _same_grid(pred, target, what)
    error = abs(reduce(pred) - reduce(target))
    out = _weighted_mean(error, grid.dims, _weights(pred, grid, weights))
    units = pred.attrs.get("units")
    return out.rename(what).assign_attrs({"units": units} if units is not None else {})


def mean_abs_error(
    pred: xr.DataArray, target: xr.DataArray, *, weights: xr.DataArray | None = None
) -> xr.DataArray:
    """Mean absolute error of the long-term mean: ``|mean_t(pred) - mean_t(target)|`` averaged over cells.

    The two fields may cover different time steps (e.g. a noleap ESM calendar against observations);
    only their grids must match. Cells NaN in either field are left out.

    Parameters
    ----------
    pred, target
        Fields on the same grid (with or without a time dimension).
    weights
        Cell weights; default cos(lat) on global grids, equal on regional ones.

    Returns
    -------
    xarray.DataArray
        0-d (or over the remaining dims), in the units of ``pred``.

    Raises
    ------
    GridMismatchError
        The grids have different shapes.
    """

    def reduce(x: xr.DataArray) -> xr.DataArray:
        return _time_mean(x, find_time(x, required=False))

    return _climate_error(pred, target, reduce, weights, "mean_abs_error")


def quantile_abs_error(
    pred: xr.DataArray, target: xr.DataArray, q: float = 0.95, *, weights: xr.DataArray | None = None
) -> xr.DataArray:
    """Mean absolute error of a quantile of the daily values of each cell (p95 by default).

    Parameters
    ----------
    pred, target
        Fields on the same grid, each with a time dimension.
    q
        Quantile in [0, 1].
    weights
        As for :func:`mean_abs_error`.

    Raises
    ------
    InputError
        ``q`` is outside [0, 1].
    MissingCoordinateError
        A field has no time dimension.
    GridMismatchError
        The grids have different shapes.
    """
    if not 0.0 <= float(q) <= 1.0:
        raise InputError(
            f"quantile_abs_error: q must be in [0, 1] (0.95 for the 95th percentile); got {q!r}."
        )

    def reduce(x: xr.DataArray) -> xr.DataArray:
        tname = find_time(x)
        if x.chunks is not None:
            x = x.chunk({tname: -1})  # quantiles need the whole time series of a cell in one chunk
        return x.quantile(float(q), dim=tname, skipna=True).drop_vars("quantile")

    return _climate_error(pred, target, reduce, weights, "quantile_abs_error")


def error_reduction(err_method: Any, err_baseline: Any) -> Any:
    """Relative error reduction ``1 - err_method / err_baseline`` (0.72 means 72% smaller than the baseline).

    Works on floats and DataArrays. A baseline error of 0 gives -inf (or NaN when both are 0).

    Examples
    --------
    >>> round(error_reduction(0.217, 0.7768), 4)
    0.7206
    """
    if isinstance(err_method, xr.DataArray) or isinstance(err_baseline, xr.DataArray):
        with np.errstate(divide="ignore", invalid="ignore"):
            out = 1.0 - err_method / err_baseline
        return out.rename("error_reduction") if isinstance(out, xr.DataArray) else out
    with np.errstate(divide="ignore", invalid="ignore"):
        value = 1.0 - np.divide(np.float64(err_method), np.float64(err_baseline))
    return float(value) if np.ndim(value) == 0 else value


# ---------------------------------------------------------------- distributions
def _values(da: Any) -> np.ndarray:
    """All finite values, flattened."""
    x = np.asarray(da.values if isinstance(da, xr.DataArray) else da, dtype=np.float64).ravel()
    return x[np.isfinite(x)]


def histogram(
    da: xr.DataArray,
    bins: int | Sequence[float] | np.ndarray | None = None,
    *,
    log: bool = False,
    value_range: tuple[float, float] | None = None,
) -> xr.DataArray:
    """Density of the values of ``da``, pooled over all its dimensions (NaN left out).

    Parameters
    ----------
    da
        Any field (loaded into memory).
    bins
        Number of bins (default 50) or the bin edges. Pass the same edges to compare two fields.
    log
        Log-spaced bins, for the tails of precipitation: from the smallest positive value (or
        ``value_range[0]``) to the largest. Values <= 0 (dry days) fall outside them.
    value_range
        ``(lower, upper)`` of the bins when ``bins`` is a number.

    Returns
    -------
    xarray.DataArray
        ``density`` over dim ``bin`` (coordinate: bin centres, geometric for log bins), with coordinates
        ``bin_lower`` and ``bin_upper`` (the edges). Densities are counts / (number of finite values x
        bin width), so their integral is the fraction of values inside the bins (1 for linear bins
        over the whole range; the wet fraction for log bins).

    Raises
    ------
    InputError
        No finite values (or no positive ones with ``log``), or edges that are not increasing.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> h = histogram(xr.DataArray(np.array([0.0, 1.0, 1.0, 3.0])), bins=[0.0, 2.0, 4.0])
    >>> h.values.tolist(), h.bin.values.tolist()
    ([0.375, 0.125], [1.0, 3.0])
    """
    x = _values(da)
    if x.size == 0:
        raise InputError(f"histogram: {_label(da)} has no finite values.")
    if bins is None or np.ndim(bins) == 0:
        n = 50 if bins is None else int(bins)  # type: ignore[arg-type]
        if n < 1:
            raise InputError(f"histogram: bins must be a number >= 1 or increasing edges; got {bins!r}.")
        if value_range is not None:
            lo, hi = (float(v) for v in value_range)
        elif log:
            positive = x[x > 0]
            if positive.size == 0:
                raise InputError(f"histogram: {_label(da)} has no positive values for log-spaced bins.")
            lo, hi = float(positive.min()), float(positive.max())
        else:
            lo, hi = float(x.min()), float(x.max())
        if hi <= lo:
            hi = lo * (1 + 1e-6) if log else lo + max(abs(lo), 1.0) * 1e-6
        if log and lo <= 0:
            raise InputError(
                f"histogram: log-spaced bins need a lower edge > 0; got value_range={value_range!r}."
            )
        edges = np.geomspace(lo, hi, n + 1) if log else np.linspace(lo, hi, n + 1)
    else:
        edges = np.asarray(bins, dtype=np.float64)
        if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
            raise InputError(f"histogram: bin edges must be increasing, at least 2 of them; got {bins!r}.")
    counts, _ = np.histogram(x, bins=edges)
    width = np.diff(edges)
    density = counts / (x.size * width)
    centres = np.sqrt(edges[:-1] * edges[1:]) if log and edges[0] > 0 else 0.5 * (edges[:-1] + edges[1:])
    units = getattr(da, "attrs", {}).get("units")
    return xr.DataArray(
        density,
        dims="bin",
        coords={"bin": centres, "bin_lower": ("bin", edges[:-1]), "bin_upper": ("bin", edges[1:])},
        name="density",
        attrs={
            "units": f"({units})-1" if units else "1",
            "n_values": int(x.size),
            "log_bins": int(bool(log)),
        },
    )


def latitude_profile(da: xr.DataArray) -> xr.DataArray:
    """Mean over time and longitude at each latitude (NaN-aware), e.g. the zonal-mean climatology.

    Returns
    -------
    xarray.DataArray
        Over the latitude dimension (and any other dims such as ``member``), attributes kept. On
        curvilinear grids the mean is along the grid's x dimension and the latitude coordinate is the
        mean latitude of each row.
    """
    grid = find_grid(da)
    tname = find_time(da, required=False)
    dims = [grid.xdim] + ([tname] if tname is not None else [])
    out = da.mean(dims, skipna=True, keep_attrs=True)
    if grid.curvilinear:
        out = out.assign_coords({grid.lat: da[grid.lat].mean(grid.xdim)})
    return out


def wasserstein(a: Any, b: Any) -> float:
    """Wasserstein-1 distance between the distributions of the values of ``a`` and ``b``.

    All values are pooled over every dimension; NaN is left out. For two samples shifted by a
    constant the distance is that constant.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=1000)
    >>> round(wasserstein(x, x + 2.5), 6)
    2.5
    """
    from scipy.stats import wasserstein_distance

    va, vb = _values(a), _values(b)
    if va.size == 0 or vb.size == 0:
        raise InputError(f"wasserstein: {_label(a if va.size == 0 else b)} has no finite values to compare.")
    return float(wasserstein_distance(va, vb))


# ---------------------------------------------------------------- ensembles
def _check_ensemble(
    ensemble: xr.DataArray, obs: xr.DataArray, member_dim: str, what: str
) -> tuple[xr.DataArray, xr.DataArray]:
    if member_dim not in ensemble.dims:
        raise InputError(
            f"{what}: {_label(ensemble)} has no member dimension '{member_dim}' (dims "
            f"{tuple(map(str, ensemble.dims))}). Pass member_dim= with the name of the ensemble dimension, "
            f"or stack the members with xr.concat(members, dim='{member_dim}')."
        )
    if member_dim in obs.dims:
        raise InputError(
            f"{what}: the observations {_label(obs)} have the member dimension '{member_dim}'; pass a "
            f"single field (e.g. obs.isel({member_dim}=0)) or the ensemble as the first argument."
        )
    other = [str(d) for d in ensemble.dims if d != member_dim]
    if set(map(str, obs.dims)) != set(other) or any(obs.sizes[d] != ensemble.sizes[d] for d in other):
        raise GridMismatchError(
            f"{what}: the observations {_label(obs)} have sizes {dict(obs.sizes)} but the ensemble "
            f"{_label(ensemble)} has {dict((d, ensemble.sizes[d]) for d in other)} besides '{member_dim}'; "
            "give the observations the same dimensions and sizes (regrid or select the same times)."
        )
    if ensemble.chunks is not None:
        ensemble = ensemble.chunk({member_dim: -1})
    return _align(ensemble, obs, what)


def _crps_numpy(x: np.ndarray, y: np.ndarray, fair: bool) -> np.ndarray:
    """CRPS of ensembles ``x`` (..., m) against ``y`` (...): E|X - y| - 0.5 E|X - X'|."""
    m = x.shape[-1]
    skill = np.mean(np.abs(x - y[..., None]), axis=-1)
    ranks = 2.0 * np.arange(1, m + 1) - m - 1.0
    pair_sum = 2.0 * np.sum(np.sort(x, axis=-1) * ranks, axis=-1)  # sum over all ordered pairs |xi - xj|
    spread = pair_sum / (m * (m - 1) if fair else m * m)
    return skill - 0.5 * spread


def crps_ensemble(
    ensemble: xr.DataArray,
    obs: xr.DataArray,
    member_dim: str = "member",
    *,
    fair: bool = False,
    mean: str | Sequence[str] | EllipsisType | None = None,
    weights: xr.DataArray | None = None,
) -> xr.DataArray:
    """Continuous ranked probability score of an ensemble, ``E|X - y| - 0.5 E|X - X'|``.

    With ``fair=False`` (the default) the expectations run over the ensemble as given (the CRPS of the
    empirical distribution of the members: a one-member ensemble scores the absolute error); with
    ``fair=True`` the spread term uses the ``m (m - 1)`` pairs of distinct members, which is unbiased for
    the CRPS of the distribution the members are drawn from (Ferro 2014; needs 2 members or more).
    A point where the observation or any member is NaN scores NaN.

    Parameters
    ----------
    ensemble
        Members along ``member_dim``.
    obs
        Observations with the other dims of ``ensemble``.
    member_dim
        Name of the ensemble dimension.
    fair
        Use the fair (unbiased) estimator.
    mean
        Dimension(s) to average the score over (NaN-aware); None keeps every point, ``...`` averages
        over all. Cells are weighted by cos(lat) when ``mean`` covers both horizontal dims of a global
        grid (or by ``weights``).
    weights
        Weights for the mean over the dims in ``mean``.

    Returns
    -------
    xarray.DataArray
        The score, in the units of ``obs``.

    Raises
    ------
    InputError
        ``ensemble`` has no ``member_dim``, ``obs`` has one, or ``fair`` with a single member.
    GridMismatchError
        ``obs`` and ``ensemble`` differ in dimensions, sizes or coordinates.

    Examples
    --------
    >>> import xarray as xr
    >>> ens = xr.DataArray([[0.0, 2.0]], dims=("x", "member"))
    >>> float(crps_ensemble(ens, xr.DataArray([1.0], dims="x"), mean=...))
    0.5

    References
    ----------
    Gneiting, T., Raftery, A. E. (2007): Strictly proper scoring rules, prediction, and estimation.
    Ferro, C. A. T. (2014): Fair scores for ensemble forecasts.
    """
    ensemble, obs = _check_ensemble(ensemble, obs, member_dim, "crps_ensemble")
    if fair and ensemble.sizes[member_dim] < 2:
        raise InputError(
            f"crps_ensemble: the fair CRPS needs at least 2 members; {_label(ensemble)} has "
            f"{ensemble.sizes[member_dim]}. Use fair=False."
        )
    score = xr.apply_ufunc(
        _crps_numpy,
        ensemble.astype(np.float64),
        obs.astype(np.float64),
        input_core_dims=[[member_dim], []],
        kwargs={"fair": fair},
        dask="parallelized",
        output_dtypes=[np.float64],
    ).rename("crps")
    units = obs.attrs.get("units", ensemble.attrs.get("units"))
    if units is not None:
        score.attrs["units"] = units
    if mean is None:
        return score
    dims = list(score.dims) if mean is ... else [mean] if isinstance(mean, str) else list(mean)
    missing = [d for d in dims if d not in score.dims]
    if missing:
        raise InputError(
            f"crps_ensemble: cannot average over {missing}: the score has dims {tuple(map(str, score.dims))}."
        )
    w = weights
    if w is None:
        try:
            grid = find_grid(obs)
        except MissingCoordinateError:
            grid = None
        if grid is not None and {grid.ydim, grid.xdim} <= set(dims):
            w = area_weights(obs, grid)
    return _weighted_mean(score, dims, w).assign_attrs(score.attrs)


def rank_histogram(
    ensemble: xr.DataArray, obs: xr.DataArray, member_dim: str = "member", *, seed: int = 0
) -> xr.DataArray:
    """Rank histogram (Talagrand diagram): how often the observation falls at each rank in the ensemble.

    The rank of an observation is the number of members below it, 0 .. m; ties (e.g. many dry members
    and a dry observation) are broken at random (``seed``), so a calibrated ensemble has a flat
    histogram at ``1 / (m + 1)``. Points where the observation or any member is NaN are left out.

    Returns
    -------
    xarray.DataArray
        Relative frequencies over dim ``rank`` (0 .. m), summing to 1; ``attrs["n_points"]`` is the
        number of points counted.

    Raises
    ------
    InputError, GridMismatchError
        As for :func:`crps_ensemble`.
    """
    ensemble, obs = _check_ensemble(ensemble, obs, member_dim, "rank_histogram")
    m = ensemble.sizes[member_dim]
    x = np.asarray(ensemble.transpose(..., member_dim).values, dtype=np.float64)
    y = np.asarray(obs.transpose(*[d for d in ensemble.dims if d != member_dim]).values, dtype=np.float64)
    x, y = x.reshape(-1, m), y.reshape(-1)
    ok = np.isfinite(y) & np.isfinite(x).all(axis=1)
    x, y = x[ok], y[ok]
    below = (x < y[:, None]).sum(axis=1)
    ties = (x == y[:, None]).sum(axis=1)
    rank = below + np.floor(np.random.default_rng(seed).random(y.size) * (ties + 1)).astype(int)
    counts = np.bincount(rank, minlength=m + 1).astype(np.float64)
    freq = counts / counts.sum() if counts.sum() > 0 else np.full(m + 1, np.nan)
    return xr.DataArray(
        freq,
        dims="rank",
        coords={"rank": np.arange(m + 1)},
        name="rank_histogram",
        attrs={"n_points": int(y.size)},
    )


def spread_skill(
    ensemble: xr.DataArray,
    obs: xr.DataArray,
    member_dim: str = "member",
    *,
    where: xr.DataArray | np.ndarray | None = None,
) -> xr.DataArray:
    """Spread/skill ratio of an ensemble: its spread over the RMSE of its mean; 1 is calibrated.

    ``sqrt((m + 1) / m * mean(var)) / sqrt(mean((mean_member - obs) ** 2))`` with the members' variance
    ``var`` (ddof=1) and the means over all points: the factor ``(m + 1) / m`` makes a calibrated ensemble
    of ``m`` members score 1 (Fortin et al. 2014). Above 1 the ensemble is over-dispersed (too wide),
    below 1 under-dispersed. Points where the observation or any member is NaN are left out.

    Parameters
    ----------
    ensemble
        Members along ``member_dim`` (at least 2).
    obs
        Observations with the other dims of ``ensemble``.
    member_dim
        Name of the ensemble dimension.
    where
        Optional boolean selection of the points to score: a DataArray over the dims of ``obs``, or an
        array over the ensemble's other dims in their order (``ensemble.mean(member_dim).values > 15``:
        only the cells where the ensemble mean exceeds 15 mm/day).

    Returns
    -------
    xarray.DataArray
        The ratio (0-d); ``attrs`` ``spread`` and ``rmse`` (in the units of ``obs``) and ``n_points``.

    Raises
    ------
    InputError
        ``ensemble`` has no ``member_dim`` or a single member, ``obs`` has one, or ``where`` has another
        shape.
    GridMismatchError
        ``obs`` and ``ensemble`` differ in dimensions, sizes or coordinates.

    Examples
    --------
    >>> import xarray as xr
    >>> ens = xr.DataArray([[0.0, 2.0], [1.0, 3.0]], dims=("x", "member"))
    >>> round(float(spread_skill(ens, xr.DataArray([0.0, 4.0], dims="x"))), 4)
    1.0954

    References
    ----------
    Fortin, V., Abaza, M., Anctil, F., Turcotte, R. (2014): Why should ensemble spread match the RMSE of
    the ensemble mean? J. Hydrometeorology 15, 1708-1713.
    """
    ensemble, obs = _check_ensemble(ensemble, obs, member_dim, "spread_skill")
    m = ensemble.sizes[member_dim]
    if m < 2:
        raise InputError(
            f"spread_skill: {_label(ensemble)} has {m} member along '{member_dim}'; a spread needs at "
            "least 2."
        )
    dims = [d for d in ensemble.dims if d != member_dim]
    x = np.asarray(ensemble.transpose(*dims, member_dim).values, dtype=np.float64)
    y = np.asarray(obs.transpose(*dims).values, dtype=np.float64)
    ok = np.isfinite(y) & np.isfinite(x).all(axis=-1)
    if where is not None:
        select = np.asarray(where.transpose(*dims).values if isinstance(where, xr.DataArray) else where)
        if select.shape != y.shape:
            raise InputError(
                f"spread_skill: where= has shape {select.shape}; expected that of the observations {y.shape} "
                f"(dims {tuple(map(str, dims))})."
            )
        ok &= select.astype(bool)
    x, y = x[ok], y[ok]
    rmse = float(np.sqrt(np.mean((x.mean(axis=-1) - y) ** 2))) if y.size else float("nan")
    spread = float(np.sqrt(np.mean(x.var(axis=-1, ddof=1)) * (m + 1) / m)) if y.size else float("nan")
    ratio = spread / rmse if rmse > 0 else float("nan")
    return xr.DataArray(
        ratio, name="spread_skill", attrs={"spread": spread, "rmse": rmse, "n_points": int(y.size)}
    )
