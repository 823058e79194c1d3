"""Quantile delta mapping: numerics against a brute-force reference and xsdba, the QDM property, the
xarray plumbing (dims, dask, NaN, dry days, netCDF round trip) and every error."""

from __future__ import annotations

import math
import warnings

import dask
import dask.array as dsa
import numpy as np
import pandas as pd
import pytest
import scipy.stats
import xarray as xr
from _dask_helpers import no_compute
from hypothesis import given, settings
from hypothesis import strategies as st

from xdownscale.core import qdm as core
from xdownscale.errors import (
    ChunkingError,
    GridMismatchError,
    InputError,
    MissingCoordinateError,
    PerformanceWarning,
    UnitError,
)
from xdownscale.xr.qdm import QDM, apply_qdm, reference_quantiles

# ------------------------------------------------------------------------------------------------ helpers


def field(
    data: np.ndarray,
    *,
    start: str = "1981-01-01",
    units: str | None = "mm d-1",
    name: str = "pr",
    dims: tuple[str, ...] = ("time", "lat", "lon"),
) -> xr.DataArray:
    """A (time, lat, lon) DataArray around ``data``."""
    coords: dict = {dims[0]: pd.date_range(start, periods=data.shape[0], freq="D")}
    for d, n in zip(dims[1:], data.shape[1:], strict=True):
        coords[d] = np.arange(n, dtype=float) + (40.0 if d == "lat" else 0.0)
    attrs = {} if units is None else {"units": units}
    return xr.DataArray(data, dims=dims, coords=coords, attrs=attrs, name=name)


def gamma_field(
    rng: np.random.Generator, scale: float, shape=(2000, 2, 3), dtype="float32", **kw
) -> xr.DataArray:
    return field(rng.gamma(0.8, scale, shape).astype(dtype), **kw)


def brute_qdm(sim: np.ndarray, hist: np.ndarray, ref: np.ndarray, nq: int, kind: str) -> np.ndarray:
    """QDM of one cell, written as plainly as possible (numpy quantiles, scipy ranks, loops)."""
    nodes = (np.arange(nq) + 0.5) / nq
    hq = np.nanquantile(hist.astype(np.float64), nodes).astype(sim.dtype)
    rq = np.nanquantile(ref.astype(np.float64), nodes).astype(sim.dtype)
    af = rq / hq if kind == "*" else rq - hq
    out = np.full(sim.shape, np.nan, dtype=sim.dtype)
    valid = ~np.isnan(sim)
    if not valid.any():
        return out
    p = scipy.stats.rankdata(sim[valid]) / valid.sum()
    pmin, pmax = p.min(), p.max()
    tau = pmax * (p - pmin) / (pmax - pmin) if pmax > pmin else np.full(p.shape, 0.5)
    node = np.clip(np.ceil(tau * nq) - 1, 0, nq - 1).astype(int)
    out[valid] = sim[valid] * af[node] if kind == "*" else sim[valid] + af[node]
    return out


# ------------------------------------------------------------------------------------------------ core


def test_nodes_are_xsdba_equally_spaced_nodes() -> None:
    xsdba_utils = pytest.importorskip("xsdba.utils")
    np.testing.assert_allclose(
        core.equally_spaced_nodes(500), xsdba_utils.equally_spaced_nodes(500), atol=1e-15
    )


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5, True, "10"])
def test_nquantiles_below_two_is_refused(bad) -> None:
    with pytest.raises(InputError, match="nquantiles must be an integer >= 2"):
        core.equally_spaced_nodes(bad)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    ntime=st.integers(1, 80),
    ncells=st.integers(1, 5),
    nq=st.integers(2, 40),
    nan_frac=st.sampled_from([0.0, 0.2, 0.9]),
    dtype=st.sampled_from(["float32", "float64"]),
)
def test_quantiles_equal_numpy_nanquantile(seed, ntime, ncells, nq, nan_frac, dtype) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(ncells, ntime)).astype(dtype)
    x[rng.random(x.shape) < nan_frac] = np.nan
    nodes = core.equally_spaced_nodes(nq)
    got = core.empirical_quantiles(x, nodes)[:, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows
        expected = np.nanquantile(x.astype(np.float64), nodes, axis=-1).T
    np.testing.assert_allclose(got, expected.astype(dtype), rtol=1e-6, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    ntime=st.integers(1, 70),
    ncells=st.integers(1, 4),
    nq=st.integers(2, 30),
    decimals=st.sampled_from([0, 1, 6]),
    nan_frac=st.sampled_from([0.0, 0.3]),
    kind=st.sampled_from(["*", "+"]),
    dtype=st.sampled_from(["float32", "float64"]),
)
def test_adjust_equals_brute_force_qdm(seed, ntime, ncells, nq, decimals, nan_frac, kind, dtype) -> None:
    """Vectorised QDM (sort keys, node tables, tie handling) == a per-cell loop, ties and NaN included."""
    rng = np.random.default_rng(seed)

    def sample(scale: float) -> np.ndarray:
        x = np.round(rng.gamma(1.5, scale, (ncells, ntime)), decimals).astype(dtype) + dtype_type(0.5)
        x[rng.random(x.shape) < nan_frac] = np.nan
        return x

    dtype_type = np.dtype(dtype).type
    ref, hist, sim = sample(3.0), sample(2.0), sample(2.5)
    hq = core.empirical_quantiles(hist, core.equally_spaced_nodes(nq))
    rq = core.empirical_quantiles(ref, core.equally_spaced_nodes(nq))
    if np.isnan(hq).any() or np.isnan(rq).any():
        return  # a cell without any valid value: covered elsewhere
    got = core.adjust_quantile_delta(sim, hq, rq, kind)
    expected = np.stack([brute_qdm(sim[c], hist[c], ref[c], nq, kind) for c in range(ncells)])
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-6)
    assert got.dtype == sim.dtype


def test_rank_fractions_follow_xsdba_percentage_ranks() -> None:
    x = np.array([[3.0, 1.0, 2.0, 2.0, np.nan, 5.0], [4.0, 4.0, 4.0, 4.0, 4.0, 4.0]])
    tau = core.rank_fractions(x)
    # ranks 4, 1, 2.5, 2.5, -, 5 of 5 values: p = r/5, tau = (p - 0.2) / 0.8
    np.testing.assert_allclose(tau[0], [0.75, 0.0, 0.375, 0.375, np.nan, 1.0])
    np.testing.assert_allclose(tau[1], 0.5)  # a constant cell: the median (xsdba gives NaN)


def test_jitter_is_deterministic_positive_and_below_threshold() -> None:
    x = np.zeros((4, 1000), dtype="float32")
    x[:, ::2] = 5.0
    x[0, 1] = np.nan
    a = core.jitter_under(x, 0.1, seed=3)
    b = core.jitter_under(x, 0.1, seed=3)
    c = core.jitter_under(x, 0.1, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    dry = (x < 0.1) & ~np.isnan(x)
    assert (a[dry] > 0).all() and (a[dry] < 0.1).all()
    np.testing.assert_array_equal(a[~dry & ~np.isnan(x)], 5.0)
    assert np.isnan(a[0, 1])
    assert abs(float(a[dry].mean()) - 0.05) < 0.003  # uniform on (0, 0.1)
    # a block of cells with its global ids draws what the whole grid draws
    np.testing.assert_array_equal(core.jitter_under(x[2:], 0.1, seed=3, cell_ids=np.array([2, 3])), a[2:])


def test_jitter_refuses_non_positive_threshold() -> None:
    with pytest.raises(InputError, match="positive threshold"):
        core.jitter_under(np.zeros((1, 3)), 0.0)


def test_core_refuses_unknown_kind_and_misfit_shapes() -> None:
    q = np.ones((2, 1, 5))
    with pytest.raises(InputError, match="Unknown QDM kind 'x'"):
        core.adjust_quantile_delta(np.ones((2, 10)), q, q, "x")
    with pytest.raises(InputError, match="do not fit sim of shape"):
        core.adjust_quantile_delta(np.ones((3, 10)), q, q, "*")
    with pytest.raises(InputError, match="one label per time step"):
        core.empirical_quantiles(
            np.ones((2, 10)), core.equally_spaced_nodes(5), groups=np.zeros(3), ngroups=1
        )
    with pytest.raises(InputError, match="needs a group label per time step"):
        core.adjust_quantile_delta(np.ones((2, 10)), np.ones((2, 2, 5)), np.ones((2, 2, 5)), "+")


def test_threads_and_blocks_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    sim = rng.gamma(0.8, 2, (37, 300)).astype("float32")
    q = np.sort(rng.gamma(0.8, 2, (37, 1, 20)), axis=-1).astype("float32") + 0.01
    one = core.adjust_quantile_delta(sim, q, q * 1.3, "*", threads=1)
    monkeypatch.setattr(core, "BLOCK_CELLS", 5)
    np.testing.assert_array_equal(core.adjust_quantile_delta(sim, q, q * 1.3, "*", threads=3), one)


def _awkward_rows(rng: np.random.Generator, dtype: str, ntime: int) -> np.ndarray:
    """Rows that exercise every corner of the radix sort: ties, -0.0 next to +0.0, NaN of both signs,
    infinities, values closer than a 32-bit key can tell apart (float64), an all-NaN row."""
    x = rng.gamma(0.6, 3.0, (7, ntime)).astype(dtype)
    x[1] = np.round(x[1], 1)  # many ties
    x[2, ::3] = -0.0
    x[2, 1::3] = 0.0
    x[3, ::5] = np.nan
    x[3, 1::7] = -np.nan
    x[4, :3] = (-np.inf, np.inf, -5.0)[:ntime]
    x[5] = rng.normal(0.0, 1.0, ntime).astype(dtype)
    x[5, :2] = ((-1e300, 1e300) if dtype == "float64" else (-3e38, 3e38))[:ntime]  # coarse float64 keys
    x[5, 2:10] = 1.0 + rng.random(x[5, 2:10].size) * 1e-12  # ... that these values share
    x[6] = np.nan
    return x


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("ntime", [1, 2, 97, 5000])
def test_sort_with_order_is_a_stable_sort(dtype: str, ntime: int) -> None:
    """The 16-bit radix passes (and, for float64, the repair of values sharing a key) give exactly a
    stable argsort: values, time order of ties and NaN last."""
    x = _awkward_rows(np.random.default_rng(ntime), dtype, ntime)
    s, order, nvalid = core._sort_with_order(x)
    expected = np.argsort(x, axis=-1, kind="stable")
    np.testing.assert_array_equal(order, expected)
    np.testing.assert_array_equal(s, np.take_along_axis(x, expected, axis=-1))
    np.testing.assert_array_equal(nvalid, (~np.isnan(x)).sum(axis=-1))


def test_sort_with_order_falls_back_where_the_repair_runs_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """float64 rows whose values share 32-bit keys and stay out of order after the allowed rounds of
    neighbour swaps are sorted again exactly."""
    x = _awkward_rows(np.random.default_rng(3), "float64", 3000)
    x[0, :2] = (1e-300, 1e300)
    x[0, 2:50] = 1.0 + np.random.default_rng(4).random(48) * 1e-12
    monkeypatch.setattr(core, "_MAX_REPAIR_ROUNDS", 1)
    s, order, _ = core._sort_with_order(x)
    expected = np.argsort(x, axis=-1, kind="stable")
    np.testing.assert_array_equal(order, expected)
    np.testing.assert_array_equal(s, np.take_along_axis(x, expected, axis=-1))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adjust_equals_brute_force_on_awkward_rows(dtype: str) -> None:
    x = _awkward_rows(np.random.default_rng(11), dtype, 600)
    nq = 50
    hq = np.sort(np.random.default_rng(1).normal(0, 2, (7, 1, nq)), axis=-1).astype(dtype)
    rq = hq + np.linspace(0.5, 1.5, nq).astype(dtype)
    got = core.adjust_quantile_delta(x, hq, rq, "+")
    expected = np.full(x.shape, np.nan, dtype=dtype)
    for c in range(x.shape[0]):  # brute_qdm's rank and node rules, with these factors
        valid = ~np.isnan(x[c])
        if not valid.any():
            continue
        p = scipy.stats.rankdata(x[c, valid]) / valid.sum()
        pmin, pmax = p.min(), p.max()
        tau = pmax * (p - pmin) / (pmax - pmin) if pmax > pmin else np.full(p.shape, 0.5)
        node = np.clip(np.ceil(tau * nq) - 1, 0, nq - 1).astype(int)
        expected[c, valid] = x[c, valid] + (rq - hq)[c, 0, node]
    np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------------------------------------ oracle


def _xsdba_adjust(ref, hist, sim, **kw) -> xr.DataArray:
    xsdba = pytest.importorskip("xsdba")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return xsdba.QuantileDeltaMapping.train(ref, hist, **kw).adjust(sim).transpose(*sim.dims)


@pytest.mark.parametrize(
    ("kind", "group", "dtype"),
    [
        ("*", "time", "float64"),
        ("*", "time", "float32"),
        ("+", "time", "float64"),
        ("*", "time.month", "float64"),
    ],
)
def test_agrees_with_xsdba(kind: str, group: str, dtype: str) -> None:
    rng = np.random.default_rng(42)
    shape = (2400, 2, 3)
    if kind == "*":
        ref, hist, sim = (gamma_field(rng, s, shape, dtype) for s in (3.0, 2.0, 2.6))
    else:
        ref, hist, sim = (
            field(rng.normal(m, s, shape).astype(dtype), units="K") for m, s in ((280, 3), (278, 4), (281, 4))
        )
    # prime: no sim value sits exactly between two nodes (there xsdba's grouped lookup may go either way)
    nq = 97
    if group == "time.month":
        sizes = sim.groupby("time.month").count("time").isel(lat=0, lon=0).values
        assert all(math.gcd(nq, int(n) - 1) == 1 for n in sizes)
    got = QDM.fit(ref, hist, kind=kind, nquantiles=nq, group=group).adjust(sim)
    expected = _xsdba_adjust(ref, hist, sim, nquantiles=nq, kind=kind, group=group)
    value_range = float(sim.max() - sim.min())
    assert float(np.abs(got - expected).max()) <= 1e-3 * value_range
    # in fact they agree to rounding
    assert float(np.abs(got - expected).max()) <= 1e-5 * value_range


def test_agrees_with_xsdba_on_the_same_prejittered_dry_days() -> None:
    rng = np.random.default_rng(5)
    ref, hist, sim = (gamma_field(rng, s, (1500, 2, 2), "float64") for s in (3.0, 2.0, 2.5))
    for da in (ref, hist, sim):
        da.values[rng.random(da.shape) < 0.5] = 0.0
    ref, hist, sim = (
        da.copy(data=core.jitter_under(da.values.T, 0.05, seed=i).T) for i, da in enumerate((ref, hist, sim))
    )
    got = QDM.fit(ref, hist, kind="*", nquantiles=50).adjust(sim)
    expected = _xsdba_adjust(ref, hist, sim, nquantiles=50, kind="*", group="time")
    assert float(np.abs(got - expected).max()) <= 1e-5 * float(sim.max())


# ------------------------------------------------------------------------------------------------ properties


def _quantiles(da: xr.DataArray, p: np.ndarray) -> np.ndarray:
    return np.quantile(da.values, p, axis=0)


def _at_sim_quantiles(out: xr.DataArray, sim: xr.DataArray, p: np.ndarray) -> np.ndarray:
    """``out`` at the time steps where ``sim`` takes its p-quantiles (the values QDM maps there)."""
    order = np.argsort(sim.values, axis=0, kind="stable")
    pos = np.round(p * (sim.sizes["time"] - 1)).astype(int)
    return np.take_along_axis(out.values, order[pos], axis=0)


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    shape_hist=st.floats(0.5, 2.0),
    shape_sim=st.floats(0.5, 2.0),
    scale_sim=st.floats(0.5, 4.0),
)
def test_multiplicative_qdm_keeps_relative_quantile_changes(seed, shape_hist, shape_sim, scale_sim) -> None:
    """Cannon et al. (2015): at every quantile tau of sim, out / ref_q(tau) = sim_q(tau) / hist_q(tau)."""
    rng = np.random.default_rng(seed)
    ntime = 20000
    ref = field(rng.gamma(1.0, 3.0, (ntime, 2)), dims=("time", "cell"))
    hist = field(rng.gamma(shape_hist, 2.0, (ntime, 2)), dims=("time", "cell"))
    sim = field(rng.gamma(shape_sim, scale_sim, (ntime, 2)), dims=("time", "cell"))
    qdm = QDM.fit(ref, hist, kind="*")
    p = np.linspace(0.1, 0.9, 17)
    change_model = _quantiles(sim, p) / _quantiles(hist, p)
    change_out = _at_sim_quantiles(qdm.adjust(sim), sim, p) / _quantiles(ref, p)
    np.testing.assert_allclose(change_out, change_model, rtol=0.03)
    # and hist is mapped onto ref's distribution
    np.testing.assert_allclose(_quantiles(qdm.adjust(hist), p), _quantiles(ref, p), rtol=0.03)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), shift=st.floats(-5, 5), spread=st.floats(0.5, 3.0))
def test_additive_qdm_keeps_absolute_quantile_changes(seed, shift, spread) -> None:
    """At every quantile tau of sim, out - ref_q(tau) = sim_q(tau) - hist_q(tau)."""
    rng = np.random.default_rng(seed)
    ntime = 20000
    ref = field(rng.normal(283.0, 3.0, (ntime, 2)), dims=("time", "cell"), units="K")
    hist = field(rng.normal(281.0, 4.0, (ntime, 2)), dims=("time", "cell"), units="K")
    sim = field(rng.normal(281.0 + shift, 4.0 * spread, (ntime, 2)), dims=("time", "cell"), units="K")
    qdm = QDM.fit(ref, hist, kind="+")
    p = np.linspace(0.05, 0.95, 19)
    change_model = _quantiles(sim, p) - _quantiles(hist, p)
    change_out = _at_sim_quantiles(qdm.adjust(sim), sim, p) - _quantiles(ref, p)
    np.testing.assert_allclose(change_out, change_model, atol=0.1)
    np.testing.assert_allclose(_quantiles(qdm.adjust(hist), p), _quantiles(ref, p), atol=0.1)


def test_grouped_qdm_is_qdm_of_each_group() -> None:
    rng = np.random.default_rng(3)
    ref, hist, sim = (gamma_field(rng, s, (1500, 2, 2)) for s in (3.0, 2.0, 2.5))
    out = QDM.fit(ref, hist, kind="*", nquantiles=40, group="time.season").adjust(sim)
    for season in ("DJF", "MAM", "JJA", "SON"):
        pick = {"time": (ref.time.dt.season == season).values}  # same dates in ref, hist and sim
        alone = QDM.fit(ref.isel(pick), hist.isel(pick), kind="*", nquantiles=40).adjust(sim.isel(pick))
        xr.testing.assert_identical(out.isel(pick), alone)


# ------------------------------------------------------------------------------------------------ plumbing


def test_output_keeps_dims_coords_attrs_name_and_dtype() -> None:
    rng = np.random.default_rng(0)
    ref, hist = gamma_field(rng, 3.0), gamma_field(rng, 2.0)
    sim = gamma_field(rng, 2.5, start="2050-01-01").transpose("lat", "time", "lon")
    sim = sim.assign_coords(height=2.0).assign_attrs(long_name="precipitation")
    out = QDM.fit(ref, hist, nquantiles=50).adjust(sim)
    assert out.dims == sim.dims and out.dtype == np.float32 and out.name == "pr"
    assert out.attrs == sim.attrs
    xr.testing.assert_identical(out.coords.to_dataset(), sim.coords.to_dataset())
    # time-first input gives time-first, C-contiguous output
    out2 = QDM.fit(ref, hist, nquantiles=50).adjust(sim.transpose("time", ...))
    assert out2.data.flags.c_contiguous


def test_time_found_the_cf_way_and_any_cell_dims() -> None:
    rng = np.random.default_rng(0)
    ref = field(rng.gamma(0.8, 3.0, (800, 5)), dims=("t", "station"))
    hist = field(rng.gamma(0.8, 2.0, (800, 5)), dims=("t", "station"))
    series = field(rng.gamma(0.8, 2.0, (800,)), dims=("t",))  # no cell dims at all
    assert QDM.fit(ref, hist, nquantiles=20).adjust(hist).dims == ("t", "station")
    assert QDM.fit(series, series, nquantiles=20).adjust(series).dims == ("t",)


def test_from_quantiles_equals_fit_and_drops_unused_groups() -> None:
    rng = np.random.default_rng(9)
    ref, hist, sim = (gamma_field(rng, s, (1200, 2, 2)) for s in (3.0, 2.0, 2.5))
    for group in ("time", "time.month"):
        kw = {"nquantiles": 30, "group": group, "jitter_under": 0.05}
        fitted = QDM.fit(ref, hist, kind="*", **kw).adjust(sim)
        rq = reference_quantiles(ref, **kw)
        assert rq.dims[-3:] == ("quantiles", "lat", "lon") and rq.attrs["units"] == "mm d-1"
        shipped = QDM.from_quantiles(rq, hist, kind="*", jitter_under=0.05).adjust(sim)
        xr.testing.assert_identical(fitted, shipped)
    winter = {"time": hist.time.dt.season == "DJF"}
    rq = reference_quantiles(ref, 30, "time.month")
    qdm = QDM.from_quantiles(rq, hist.sel(winter), kind="+")
    assert qdm.hist_quantiles["month"].values.tolist() == [1, 2, 12]


def test_apply_qdm_fits_or_uses_a_fitted_qdm() -> None:
    rng = np.random.default_rng(2)
    ref, hist, sim = (gamma_field(rng, s) for s in (3.0, 2.0, 2.5))
    qdm = QDM.fit(ref, hist, kind="*", nquantiles=50)
    xr.testing.assert_identical(apply_qdm(sim, ref, hist, nquantiles=50), qdm.adjust(sim))
    xr.testing.assert_identical(apply_qdm(sim, qdm=qdm), qdm.adjust(sim))
    with pytest.raises(InputError, match="apply_qdm needs hist"):
        apply_qdm(sim, ref)
    with pytest.raises(InputError, match="not both"):
        apply_qdm(sim, ref, hist, qdm=qdm)
    with pytest.raises(InputError, match="fitted xdownscale QDM"):
        apply_qdm(sim, qdm="qdm")  # type: ignore[arg-type]


@pytest.mark.parametrize("engine", ["netcdf4", "h5netcdf"])
@pytest.mark.parametrize("group", ["time", "time.season"])
def test_netcdf_round_trip_gives_identical_adjustment(tmp_path, engine: str, group: str) -> None:
    rng = np.random.default_rng(4)
    ref, hist, sim = (gamma_field(rng, s) for s in (3.0, 2.0, 2.5))
    for da in (ref, hist, sim):
        da.values[rng.random(da.shape) < 0.4] = 0.0
    qdm = QDM.fit(ref, hist, kind="*", nquantiles=60, group=group, jitter_under="0.1 mm/d", seed=7)
    path = tmp_path / "qdm.nc"
    qdm.to_dataset().to_netcdf(path, engine=engine)
    with xr.open_dataset(path, engine=engine) as ds:
        assert ds.attrs["kind"] == "*" and ds.attrs["group"] == group and ds.attrs["nquantiles"] == 60
        assert ds.attrs["jitter_under"] == pytest.approx(0.1)
        loaded = QDM.from_dataset(ds)
    xr.testing.assert_identical(loaded.adjust(sim), qdm.adjust(sim))  # also after the file is closed
    assert repr(loaded).startswith("QDM(kind='*'")
    with xr.open_dataset(path, engine=engine, chunks={}) as ds:
        lazy = QDM.from_dataset(ds)
        assert lazy.hist_quantiles.chunks is not None
        xr.testing.assert_identical(lazy.adjust(sim).compute(), qdm.adjust(sim))


# ------------------------------------------------------------------------------------------------ dask


def test_dask_stays_lazy_and_matches_numpy_for_any_chunking() -> None:
    rng = np.random.default_rng(6)
    ref, hist, sim = (gamma_field(rng, s, (900, 4, 5)) for s in (3.0, 2.0, 2.5))
    for da in (ref, hist, sim):
        da.values[rng.random(da.shape) < 0.5] = 0.0
        da.values[:, 0, 0] = np.nan
    kw = {"kind": "*", "nquantiles": 40, "group": "time.month", "jitter_under": 0.1, "seed": 1}
    expected = QDM.fit(ref, hist, **kw).adjust(sim)
    for chunks in ({"lat": 1}, {"lat": 3, "lon": 2}):
        with dask.config.set(scheduler=no_compute):
            qdm = QDM.fit(ref.chunk(chunks), hist.chunk({"lon": 1}), **kw)
            out = qdm.adjust(sim.chunk(chunks))
        assert isinstance(out.data, dsa.Array)
        with dask.config.set(scheduler="threads"):
            xr.testing.assert_identical(out.compute(), expected)
    with dask.config.set(scheduler="processes"):
        xr.testing.assert_identical(qdm.adjust(sim).compute(), expected)


def test_time_split_over_chunks_is_rechunked_with_a_warning() -> None:
    rng = np.random.default_rng(6)
    ref, hist, sim = (gamma_field(rng, s, (600, 2, 2)) for s in (3.0, 2.0, 2.5))
    expected = QDM.fit(ref, hist, nquantiles=20).adjust(sim)
    with pytest.warns(PerformanceWarning, match=r"'sim' is split into 3 dask chunks along 'time'.*rechunked"):
        out = QDM.fit(ref, hist, nquantiles=20).adjust(sim.chunk({"time": 200}))
    xr.testing.assert_identical(out.compute(), expected)
    with pytest.warns(PerformanceWarning, match=r"'ref' is split into 2 dask chunks"):
        QDM.fit(ref.chunk({"time": 300}), hist, nquantiles=20)


def test_time_rechunk_makes_big_spatial_chunks_smaller() -> None:
    rng = np.random.default_rng(6)
    sim = gamma_field(rng, 2.0, (400, 4, 4)).chunk({"time": 100})
    qdm = QDM.fit(gamma_field(rng, 3.0, (400, 4, 4)), gamma_field(rng, 2.0, (400, 4, 4)), nquantiles=20)
    with dask.config.set({"array.chunk-size": "1kB"}):
        with pytest.warns(PerformanceWarning, match="spatial chunks made smaller"):
            out = qdm.adjust(sim)
    assert max(out.chunksizes["lat"]) * max(out.chunksizes["lon"]) < 16


def test_unknown_chunk_sizes_are_a_chunking_error() -> None:
    x = dsa.from_array(np.random.default_rng(0).gamma(1, 1, (10, 6)) + 0.1, chunks=(10, 2))
    unknown = x[:, x[0] > -1]  # boolean selection: dask no longer knows the chunk sizes
    da = xr.DataArray(unknown, dims=("time", "cell"), coords={"time": pd.date_range("2000", periods=10)})
    with pytest.raises(ChunkingError, match=r"'ref' has unknown dask chunk sizes.*compute_chunk_sizes"):
        QDM.fit(da, da)


# ------------------------------------------------------------------------------------ NaN and dry days


def test_all_nan_cells_give_nan_without_warnings_and_scattered_nan_are_skipped() -> None:
    rng = np.random.default_rng(8)
    ref, hist, sim = (gamma_field(rng, s, (1000, 3, 3), "float64") for s in (3.0, 2.0, 2.5))
    for da in (ref, hist, sim):
        da.values[:, 0, :] = np.nan  # sea
    holes = rng.random(sim.shape) < 0.1
    gappy = hist.where(~holes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qdm = QDM.fit(ref, gappy, kind="*", nquantiles=30)
        out = qdm.adjust(sim.where(~holes))
    assert out.isel(lat=0).isnull().all()
    assert out.isel(lat=slice(1, None)).where(~holes[:, 1:]).notnull().sum() == (~holes[:, 1:]).sum()
    # scattered NaN are ignored in the quantiles: same as estimating them on the valid values only
    cell = gappy.isel(lat=1, lon=2).values
    expected = np.quantile(cell[~np.isnan(cell)], qdm.nodes)
    np.testing.assert_allclose(qdm.hist_quantiles.isel(lat=1, lon=2), expected, rtol=1e-12)


def test_zero_heavy_precipitation_with_jitter_is_finite_and_keeps_dry_days() -> None:
    rng = np.random.default_rng(10)
    ref, hist, sim = (gamma_field(rng, s, (3000, 3, 3)) for s in (3.0, 2.0, 2.5))
    for da, dry in ((ref, 0.5), (hist, 0.85), (sim, 0.9)):
        da.values[rng.random(da.shape) < dry] = 0.0
    hist.values[:, 2, 2] = 0.0  # a desert cell: never any rain in the model
    out = QDM.fit(ref, hist, kind="*", nquantiles=500, jitter_under=0.05).adjust(sim)
    assert np.isfinite(out).all()
    assert (out >= 0).all()
    frac_dry = float((out == 0).mean())
    assert 0.4 < frac_dry < 0.95
    assert float(out.where(out > 0).min()) >= 0.05  # nothing left below the dry-day threshold


def test_multiplicative_without_jitter_on_zeros_asks_for_jitter_under() -> None:
    rng = np.random.default_rng(11)
    ref, hist = gamma_field(rng, 3.0), gamma_field(rng, 2.0)
    hist.values[rng.random(hist.shape) < 0.3] = 0.0
    with pytest.raises(InputError, match=r"'hist' has zeros or negative values.*Pass jitter_under"):
        QDM.fit(ref, hist, kind="*")
    neg = -gamma_field(rng, 3.0)
    with pytest.raises(InputError, match=r"'ref_quantiles' has negative values"):
        QDM.fit(neg, gamma_field(rng, 2.0), kind="*")
    # additive QDM has no such restriction
    QDM.fit(ref, hist, kind="+", nquantiles=20)


def test_jitter_threshold_string_is_converted_to_the_data_units() -> None:
    rng = np.random.default_rng(12)
    ref, hist = (gamma_field(rng, s / 86400, units="kg m-2 s-1") for s in (3.0, 2.0))
    qdm = QDM.fit(ref, hist, kind="*", nquantiles=20, jitter_under="0.1 mm/d")
    assert qdm.jitter_under == pytest.approx(0.1 / 86400)
    # E-OBS writes daily totals as "mm": that is mm per day on daily steps
    eobs = gamma_field(rng, 3.0, units="mm")
    assert QDM.fit(eobs, eobs, nquantiles=20, jitter_under="0.1 mm/d").jitter_under == pytest.approx(0.1)
    same = QDM.fit(ref, hist, kind="*", nquantiles=20, jitter_under="0.1 mm/d").adjust(hist)
    xr.testing.assert_identical(same, qdm.adjust(hist))


def test_jitter_threshold_errors() -> None:
    rng = np.random.default_rng(13)
    ref, hist = gamma_field(rng, 3.0), gamma_field(rng, 2.0)
    with pytest.raises(UnitError, match="cannot be read as a quantity"):
        QDM.fit(ref, hist, jitter_under="0.1 furlongs per snark")
    with pytest.raises(UnitError, match="has no units attribute"):
        QDM.fit(ref.drop_attrs(), hist.drop_attrs(), jitter_under="0.1 mm/d")
    with pytest.raises(UnitError, match="Cannot convert"):
        QDM.fit(ref, hist, jitter_under="1 K")
    with pytest.raises(InputError, match="positive threshold"):
        QDM.fit(ref, hist, jitter_under=-1.0)
    with pytest.raises(InputError, match="must be a number, a string with units or None"):
        QDM.fit(ref, hist, jitter_under=[0.1])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ errors


def test_inputs_without_time_are_refused() -> None:
    rng = np.random.default_rng(14)
    hist = gamma_field(rng, 2.0)
    no_time = xr.DataArray(rng.random((3, 4)), dims=("lat", "lon"), name="pr")
    with pytest.raises(MissingCoordinateError, match="Cannot find a time dimension in 'pr'"):
        QDM.fit(no_time, hist)
    with pytest.raises(MissingCoordinateError, match="Cannot find a time dimension in 'hist'"):
        QDM.fit(hist, no_time.rename(None))
    with pytest.raises(InputError, match=r"must be an xarray\.DataArray"):
        QDM.fit(hist.values, hist)  # type: ignore[arg-type]


def test_grid_mismatch_names_both_shapes_and_says_to_regrid() -> None:
    rng = np.random.default_rng(15)
    ref, hist = gamma_field(rng, 3.0, (500, 2, 3)), gamma_field(rng, 2.0, (500, 4, 6))
    with pytest.raises(
        GridMismatchError,
        match=r"'ref' has cells .*\(shape \(2, 3\)\).*\(shape \(4, 6\)\).*xdownscale\.regrid",
    ):
        QDM.fit(ref, hist)
    qdm = QDM.fit(ref, ref, nquantiles=10)
    with pytest.raises(GridMismatchError, match=r"'the fitted QDM' has cells .*'sim' has .*Regrid"):
        qdm.adjust(hist)
    shifted = ref.assign_coords(lon=ref.lon + 0.5)
    with pytest.raises(GridMismatchError, match="different 'lon' coordinates"):
        qdm.adjust(shifted)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "x"}, "Unknown QDM kind 'x'"),
        ({"group": "time.dayofyear"}, "Unknown group 'time.dayofyear'"),
        ({"nquantiles": 1}, "nquantiles must be an integer >= 2"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    rng = np.random.default_rng(16)
    ref, hist = gamma_field(rng, 3.0), gamma_field(rng, 2.0)
    with pytest.raises(InputError, match=match):
        QDM.fit(ref, hist, **kwargs)


def test_unit_mismatch_is_refused() -> None:
    rng = np.random.default_rng(17)
    ref, hist = gamma_field(rng, 3.0), gamma_field(rng, 2.0, units="kg m-2 s-1")
    with pytest.raises(
        UnitError, match=r"'ref' has units 'mm d-1' but 'hist' has units 'kg m-2 s-1'.*convert_units"
    ):
        QDM.fit(ref, hist)
    same = gamma_field(rng, 2.0, units="mm/day")  # same units, other spelling
    qdm = QDM.fit(ref, same, nquantiles=10)
    with pytest.raises(UnitError, match="'the fitted QDM' has units"):
        qdm.adjust(hist)


def test_groups_that_do_not_fit() -> None:
    rng = np.random.default_rng(18)
    ref, hist = gamma_field(rng, 3.0, (120, 2, 2)), gamma_field(rng, 2.0, (120, 2, 2))  # January to April
    qdm = QDM.fit(ref, hist, nquantiles=10, group="time.month")
    summer = gamma_field(rng, 2.0, (60, 2, 2), start="2000-06-15")
    with pytest.raises(InputError, match=r"'sim' has months \[6, 7, 8\] for which the QDM has no quantiles"):
        qdm.adjust(summer)
    with pytest.raises(InputError, match=r"'ref' covers the months .* but 'hist' covers"):
        QDM.fit(ref, summer, group="time.month")
    numeric_time = ref.assign_coords(time=np.arange(120.0))
    numeric_time["time"].attrs["axis"] = "T"
    with pytest.raises(InputError, match="not dates"):
        QDM.fit(numeric_time, numeric_time, group="time.season")
    rq = reference_quantiles(ref, 10, "time.season")
    with pytest.raises(InputError, match="'hist' covers the seasons"):
        QDM.from_quantiles(rq.sel(season=["DJF"]), hist)


def test_from_quantiles_refuses_what_is_not_reference_quantiles() -> None:
    rng = np.random.default_rng(19)
    ref, hist = gamma_field(rng, 3.0), gamma_field(rng, 2.0)
    rq = reference_quantiles(ref, 20)
    with pytest.raises(InputError, match="with a 'quantiles' dimension"):
        QDM.from_quantiles(rq.rename(quantiles="q"), hist)
    with pytest.raises(InputError, match=r"expected the 20 equally spaced nodes"):
        QDM.from_quantiles(rq.assign_coords(quantiles=np.linspace(0, 1, 20)), hist)
    with pytest.raises(InputError, match="need a 'month' dimension"):
        QDM.from_quantiles(rq, hist, group="time.month")
    with pytest.raises(GridMismatchError, match="'ref_quantiles' has cells"):
        QDM.from_quantiles(rq.isel(lat=[0]), hist)


def test_from_dataset_refuses_other_datasets() -> None:
    with pytest.raises(InputError, match=r"not a QDM dataset written by QDM\.to_dataset"):
        QDM.from_dataset(xr.Dataset({"x": ("a", [1.0])}))
    with pytest.raises(InputError, match=r"needs an xarray\.Dataset"):
        QDM.from_dataset(xr.DataArray([1.0]))  # type: ignore[arg-type]
    rng = np.random.default_rng(20)
    ds = QDM.fit(gamma_field(rng, 3.0), gamma_field(rng, 2.0), nquantiles=10).to_dataset()
    with pytest.raises(InputError, match=r"lacks 'ref_quantiles'"):
        QDM.from_dataset(ds.drop_vars("ref_quantiles"))
    with pytest.raises(InputError, match="says nquantiles=11"):
        QDM.from_dataset(ds.assign_attrs(nquantiles=11))
    with pytest.raises(InputError, match="expected 'quantiles' and 'season'"):
        QDM.from_dataset(ds.assign_attrs(group="time.season"))


# ------------------------------------------------------------------------------------------------ real data


@pytest.mark.data
def test_eobs_precipitation_two_decades(iberia_dir) -> None:
    """E-OBS daily precipitation (sea = NaN, units "mm"): first decade as ref, second as hist and sim."""
    with xr.open_dataset(iberia_dir / "eobs_0.5deg_rr_djf1983-2002.nc") as ds:
        rr = ds["rr"].load()
    time = rr.dims[0] if "time" not in rr.dims else "time"
    ref, hist = rr.isel({time: slice(0, 900)}), rr.isel({time: slice(900, None)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = QDM.fit(ref, hist, kind="*", group="time.month", jitter_under="0.1 mm/d").adjust(hist)
    sea = rr.isnull().all(time)
    assert out.where(sea).isnull().all()
    land = out.where(~sea)
    assert np.isfinite(land.where(hist.notnull())).sum() == hist.where(~sea).notnull().sum()
    np.testing.assert_allclose(
        float(land.mean()), float(ref.where(~sea).mean()), rtol=0.05
    )  # hist mapped onto ref's climate
