"""xdownscale.metrics on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from scipy.stats import norm

from xdownscale.datasets import (
    coarsen_like_esm,
    global_grid,
    regional_grid,
    synthetic_precipitation,
    synthetic_temperature,
)
from xdownscale.errors import GridMismatchError, InputError, MissingCoordinateError
from xdownscale.metrics import (
    area_weights,
    crps_ensemble,
    error_reduction,
    histogram,
    latitude_profile,
    lowpass_correlation,
    mean_abs_error,
    pooled_correlation,
    quantile_abs_error,
    rank_histogram,
    spread_skill,
    wasserstein,
)
from xdownscale.xr.spectra import lowpass


def on_grid(values, grid: xr.Dataset, name="x", ntime=None):
    values = np.asarray(values, dtype=float)
    dims = ("lat", "lon") if ntime is None else ("time", "lat", "lon")
    coords = dict(grid.coords)
    if ntime is not None:
        coords["time"] = xr.date_range("2000-01-01", periods=ntime)
    return xr.DataArray(values, dims=dims, coords=coords, name=name)


@pytest.fixture(scope="module")
def pr():
    return synthetic_precipitation(ny=32, nx=48, ntime=12, seed=2)


# ---------------------------------------------------------------- pooled correlation
def test_pooled_correlation_of_a_field_with_its_block_average_is_one(pr):
    r = pooled_correlation(pr, coarsen_like_esm(pr, 4), factor=4)
    assert r.ndim == 0 and r.name == "pooled_correlation"
    assert float(r) == pytest.approx(1.0, abs=1e-6)
    series = pooled_correlation(pr, coarsen_like_esm(pr, 4), per_time=True)
    assert series.dims == ("time",) and series.sizes["time"] == 12
    np.testing.assert_allclose(series, 1.0, atol=1e-6)


def test_pooled_correlation_sign_and_mean_over_time(pr):
    coarse = coarsen_like_esm(pr, 4)
    assert float(pooled_correlation(pr, -coarse)) == pytest.approx(-1.0, abs=1e-6)
    rng = np.random.default_rng(0)
    noisy = coarse + rng.normal(scale=float(coarse.std()), size=coarse.shape)
    series = pooled_correlation(pr, noisy, per_time=True)
    assert float(pooled_correlation(pr, noisy)) == pytest.approx(float(series.mean()))
    assert 0.2 < float(series.mean()) < 0.95


def test_pooled_correlation_ignores_nan_and_coarse_coordinate_labels():
    pr = synthetic_precipitation(ny=32, nx=48, ntime=4, mask=True)
    coarse = coarsen_like_esm(pr, 4)
    # an ESM grid whose coordinates differ slightly (rounding) and whose dims are named differently
    esm = coarse.rename(lat="y", lon="x").assign_coords(
        y=coarse.lat.values + 1e-4, x=coarse.lon.values - 1e-4
    )
    esm.y.attrs, esm.x.attrs = dict(coarse.lat.attrs), dict(coarse.lon.attrs)
    assert float(pooled_correlation(pr, esm)) == pytest.approx(1.0, abs=1e-6)


def test_pooled_correlation_keeps_member_dim(pr):
    coarse = coarsen_like_esm(pr, 4)
    ens = xr.concat([pr, pr * 2.0], dim="member")
    r = pooled_correlation(ens, coarse)
    assert r.dims == ("member",)
    np.testing.assert_allclose(r, 1.0, atol=1e-6)


def test_pooled_correlation_factor_must_relate_the_grids(pr):
    coarse = coarsen_like_esm(pr, 4)
    with pytest.raises(
        GridMismatchError,
        match=r"the fine grid of 'pr' \(32 x 48 cells\) is not factor=2 times the coarse grid of 'pr' "
        r"\(8 x 12\): expected 16 x 24\. Crop the fine field",
    ):
        pooled_correlation(pr, coarse, factor=2)
    with pytest.raises(GridMismatchError, match=r"\(30 x 48 cells\) is not factor=4"):
        pooled_correlation(pr.isel(lat=slice(0, 30)), coarse)
    with pytest.raises(InputError, match="factor must be an integer >= 1"):
        pooled_correlation(pr, coarse, factor=2.5)  # type: ignore[arg-type]


def test_pooled_correlation_time_mismatch(pr):
    coarse = coarsen_like_esm(pr, 4)
    with pytest.raises(GridMismatchError, match=r"has 12 steps along 'time' but 'pr' has 6"):
        pooled_correlation(pr, coarse.isel(time=slice(0, 6)))
    shifted = coarse.assign_coords(time=coarse.time + np.timedelta64(1, "D"))
    with pytest.raises(GridMismatchError, match=r"coordinates of .* differ"):
        pooled_correlation(pr, shifted)


def test_pooled_correlation_on_dask_matches(pr):
    coarse = coarsen_like_esm(pr, 4)
    lazy = pooled_correlation(pr.chunk({"time": 3}), coarse.chunk({"time": 3}), per_time=True)
    assert lazy.chunks is not None
    np.testing.assert_allclose(lazy.compute(), pooled_correlation(pr, coarse, per_time=True))


# ---------------------------------------------------------------- low-pass correlation
def test_lowpass_correlation_of_the_filtered_field_is_one():
    tas = synthetic_temperature(ny=32, nx=32, ntime=4)
    k = 0.1
    r = lowpass_correlation(tas, lowpass(tas, k), k)
    assert r.name == "lowpass_correlation" and float(r) == pytest.approx(1.0, abs=1e-6)
    # filtering out the small scales of the downscaled field raises its correlation with a smooth coarse field
    coarse_on_fine = lowpass(tas, k)
    noisy = tas + np.random.default_rng(1).normal(scale=3.0, size=tas.shape)
    raw = float(lowpass_correlation(noisy, coarse_on_fine, 0.75))  # >= sqrt(0.5): nothing filtered
    assert float(lowpass_correlation(noisy, coarse_on_fine, k)) > raw + 0.1
    series = lowpass_correlation(tas, coarse_on_fine, k, per_time=True)
    assert series.sizes["time"] == 4


def test_lowpass_correlation_grid_mismatch():
    tas = synthetic_temperature(ny=16, nx=16, ntime=2)
    with pytest.raises(GridMismatchError, match=r"'tas' is on a 16 x 16 grid .* on a 4 x 4 grid .*regrid"):
        lowpass_correlation(tas, coarsen_like_esm(tas, 4), 0.1)


# ---------------------------------------------------------------- area weights
def test_area_weights():
    w = area_weights(global_grid(2.5))
    assert w.dims == ("lat",)
    np.testing.assert_allclose(w, np.cos(np.deg2rad(global_grid(2.5).lat)))
    assert area_weights(regional_grid(4, 4)) is None


def test_global_grid_is_area_weighted_regional_is_not():
    g = global_grid(2.5)
    tropics = xr.where(abs(g.lat) < 30, 1.0, 0.0).broadcast_like(g.lon).transpose("lat", "lon")
    field = on_grid(tropics.values, g, ntime=None)
    zero = xr.zeros_like(field)
    # area fraction of the tropics: sin(30 deg) = 0.5; unweighted it would be 24/72
    assert float(mean_abs_error(field, zero)) == pytest.approx(0.5, abs=1e-3)
    flat = xr.ones_like(field.lat)
    assert float(mean_abs_error(field, zero, weights=flat)) == pytest.approx(24 / 72)
    # the same field on a regional grid of the same shape: plain mean
    r = regional_grid(72, 144, lat0=-10.0, lon0=0.0, res=0.25)
    regional = on_grid(tropics.values, r)
    assert float(mean_abs_error(regional, xr.zeros_like(regional))) == pytest.approx(24 / 72)


def test_weights_must_be_a_dataarray_over_the_grid():
    tas = synthetic_temperature(ny=8, nx=8, ntime=3)
    with pytest.raises(InputError, match=r"weights must be a DataArray over dimensions of 'tas'"):
        mean_abs_error(tas, tas, weights=np.ones(8))  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"got DataArray with dims \('z',\)"):
        mean_abs_error(tas, tas, weights=xr.DataArray(np.ones(8), dims="z"))


# ---------------------------------------------------------------- climatological errors
def test_mean_abs_error_known_answers(pr):
    assert float(mean_abs_error(pr, pr)) == 0.0
    assert float(mean_abs_error(pr + 2.0, pr)) == pytest.approx(2.0, rel=1e-6)
    # errors of opposite sign in different cells do not cancel
    signed = xr.where(pr.lon < pr.lon.mean(), 1.0, -1.0)
    assert float(mean_abs_error(pr + signed, pr)) == pytest.approx(1.0, rel=1e-6)
    # errors that cancel over time do
    alternating = xr.DataArray(np.where(np.arange(12) % 2, 1.0, -1.0), dims="time", coords={"time": pr.time})
    assert float(mean_abs_error(pr + alternating, pr)) == pytest.approx(0.0, abs=1e-6)
    assert mean_abs_error(pr, pr).attrs["units"] == "mm/day"


def test_mean_abs_error_different_calendars_and_masks():
    obs = synthetic_precipitation(ny=8, nx=8, ntime=40, seed=1, mask=True)
    esm = synthetic_precipitation(ny=8, nx=8, ntime=30, seed=1, calendar="noleap")
    expected = np.nanmean(np.abs(esm.values.mean(0) - obs.values.mean(0)))
    assert float(mean_abs_error(esm, obs)) == pytest.approx(expected, rel=1e-5)
    climatology = obs.mean("time")  # no time dim at all
    assert float(mean_abs_error(obs, climatology)) == pytest.approx(0.0, abs=1e-6)


def test_mean_abs_error_grid_mismatch(pr):
    with pytest.raises(
        GridMismatchError,
        match=r"mean_abs_error: 'pr' is on a 32 x 48 grid \('lat', 'lon'\) but 'pr' on a 8 x 12 grid",
    ):
        mean_abs_error(pr, coarsen_like_esm(pr, 4))
    with pytest.raises(MissingCoordinateError):
        mean_abs_error(pr, xr.DataArray(np.zeros((32, 48)), dims=("a", "b")))


def test_quantile_abs_error(pr):
    assert float(quantile_abs_error(pr, pr)) == 0.0
    q95 = np.quantile(pr.values, 0.95, axis=0)
    assert float(quantile_abs_error(pr * 2.0, pr)) == pytest.approx(q95.mean(), rel=1e-5)
    q50 = np.quantile(pr.values, 0.5, axis=0)
    assert float(quantile_abs_error(pr * 3.0, pr, q=0.5)) == pytest.approx(2 * q50.mean(), rel=1e-5)
    # dask, chunked along time
    lazy = quantile_abs_error(pr.chunk({"time": 4}) * 2.0, pr.chunk({"time": 5}))
    assert float(lazy) == pytest.approx(q95.mean(), rel=1e-5)
    with pytest.raises(InputError, match=r"q must be in \[0, 1\] .*got 95"):
        quantile_abs_error(pr, pr, q=95)
    with pytest.raises(MissingCoordinateError, match="Cannot find a time dimension"):
        quantile_abs_error(pr.mean("time"), pr.mean("time"))


def test_error_reduction():
    assert error_reduction(0.2, 0.8) == pytest.approx(0.75)
    assert error_reduction(0.217, 0.217 / (1 - 0.7208)) == pytest.approx(0.7208)
    da = error_reduction(xr.DataArray([0.1, 0.4]), xr.DataArray([0.4, 0.4]))
    np.testing.assert_allclose(da, [0.75, 0.0])
    assert error_reduction(1.0, 0.0) == -np.inf
    assert np.isnan(error_reduction(0.0, 0.0))


# ---------------------------------------------------------------- distributions
def test_histogram_linear_known_values():
    x = xr.DataArray(np.array([0.0, 1.0, 1.0, 3.0, np.nan]), name="pr", attrs={"units": "mm/day"})
    h = histogram(x, bins=[0.0, 2.0, 4.0])
    np.testing.assert_allclose(h, [3 / 8, 1 / 8])
    np.testing.assert_allclose(h.bin_lower, [0.0, 2.0])
    np.testing.assert_allclose(h.bin_upper, [2.0, 4.0])
    assert h.dims == ("bin",) and h.attrs["n_values"] == 4 and h.attrs["units"] == "(mm/day)-1"
    h = histogram(x, bins=3)
    assert float((h * (h.bin_upper - h.bin_lower)).sum()) == pytest.approx(1.0)


def test_histogram_log_bins_and_tails(pr):
    h = histogram(pr, bins=20, log=True)
    edges = np.append(h.bin_lower.values, h.bin_upper.values[-1])
    np.testing.assert_allclose(np.diff(np.log(edges)), np.log(edges[1] / edges[0]))
    wet = float((pr > 0).mean())
    assert float((h * (h.bin_upper - h.bin_lower)).sum()) == pytest.approx(wet, rel=1e-6)
    assert np.all(h.bin > h.bin_lower) and np.all(h.bin < h.bin_upper)
    ranged = histogram(pr, bins=10, log=True, value_range=(0.1, 100.0))
    assert float(ranged.bin_lower[0]) == pytest.approx(0.1)
    # the same edges make two fields comparable
    edges = np.linspace(0, 40, 21)
    assert histogram(pr, edges).bin.size == histogram(pr * 2, edges).bin.size == 20


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((xr.DataArray([np.nan]),), {}, "has no finite values"),
        ((xr.DataArray([0.0, 0.0]),), {"log": True}, "no positive values"),
        ((xr.DataArray([1.0, 2.0]), [0.0, 2.0, 1.0]), {}, "edges must be increasing"),
        ((xr.DataArray([1.0, 2.0]), 0), {}, "bins must be a number >= 1"),
        ((xr.DataArray([1.0, 2.0]), 4), {"log": True, "value_range": (0.0, 2.0)}, "lower edge > 0"),
    ],
)
def test_histogram_errors(args, kwargs, match):
    with pytest.raises(InputError, match=match):
        histogram(*args, **kwargs)


def test_latitude_profile():
    g = regional_grid(6, 5)
    lat = g.lat.values
    values = np.broadcast_to(lat[None, :, None], (3, 6, 5)).copy()
    values[0, 2, :3] = np.nan
    da = on_grid(values, g, name="tas", ntime=3).assign_attrs(units="K")
    prof = latitude_profile(da)
    assert prof.dims == ("lat",) and prof.attrs == {"units": "K"}
    np.testing.assert_allclose(prof, lat)
    ens = xr.concat([da, da + 1.0], dim="member")
    assert latitude_profile(ens).dims == ("member", "lat")


def test_latitude_profile_curvilinear():
    g = regional_grid(4, 5)
    lat2, lon2 = xr.broadcast(g.lat, g.lon)
    da = xr.DataArray(
        lat2.values,
        dims=("j", "i"),
        coords={
            "lat": (("j", "i"), lat2.values, dict(g.lat.attrs)),
            "lon": (("j", "i"), lon2.values, dict(g.lon.attrs)),
        },
    )
    prof = latitude_profile(da)
    assert prof.dims == ("j",)
    np.testing.assert_allclose(prof, g.lat)
    np.testing.assert_allclose(prof.lat, g.lat)


def test_wasserstein():
    rng = np.random.default_rng(3)
    a = rng.gamma(0.5, 4.0, size=5000)
    assert wasserstein(a, a + 1.7) == pytest.approx(1.7)
    assert wasserstein(a, a) == 0.0
    da = xr.DataArray(np.append(a, np.nan))
    assert wasserstein(da, a + 0.5) == pytest.approx(0.5)
    with pytest.raises(InputError, match="has no finite values to compare"):
        wasserstein(xr.DataArray([np.nan], name="pr"), a)


# ---------------------------------------------------------------- ensembles
def brute_crps(x, y, fair=False):
    m = x.size
    pairs = np.abs(x[:, None] - x[None, :]).sum()
    return np.mean(np.abs(x - y)) - 0.5 * pairs / (m * (m - 1) if fair else m * m)


def gaussian_crps(mu, sigma, y):
    z = (y - mu) / sigma
    return sigma * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / np.sqrt(np.pi))


def test_crps_single_member_is_absolute_error(pr):
    obs = pr
    ens = (pr + 1.5).expand_dims(member=1)
    score = crps_ensemble(ens, obs)
    assert score.dims == pr.dims and score.name == "crps" and score.attrs["units"] == "mm/day"
    mae = abs(ens.isel(member=0).astype(float) - obs.astype(float))  # float32 rounding of pr + 1.5
    np.testing.assert_allclose(score, mae, rtol=1e-12)
    np.testing.assert_allclose(score, 1.5, rtol=1e-5)
    assert float(crps_ensemble(ens, obs, mean=...)) == pytest.approx(1.5, rel=1e-5)


def test_crps_matches_brute_force_and_fair():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 7))
    y = rng.normal(size=5)
    ens = xr.DataArray(x, dims=("point", "member"))
    obs = xr.DataArray(y, dims="point")
    np.testing.assert_allclose(crps_ensemble(ens, obs), [brute_crps(x[i], y[i]) for i in range(5)])
    np.testing.assert_allclose(
        crps_ensemble(ens, obs, fair=True), [brute_crps(x[i], y[i], fair=True) for i in range(5)]
    )


def test_crps_gaussian_ensemble_matches_analytic():
    rng = np.random.default_rng(1)
    npoints, m, mu, sigma = 200, 400, 0.3, 1.7
    y = rng.normal(size=npoints) * 2.0
    ens = xr.DataArray(mu + sigma * rng.standard_normal((m, npoints)), dims=("member", "point"))
    obs = xr.DataArray(y, dims="point")
    analytic = gaussian_crps(mu, sigma, y)
    fair = crps_ensemble(ens, obs, fair=True)
    assert float(fair.mean()) == pytest.approx(analytic.mean(), rel=0.01)
    # the plain estimator is biased low by E|X-X'|/(2m) = sigma/(sqrt(pi) m)
    plain = crps_ensemble(ens, obs, mean="point")
    assert float(plain) == pytest.approx(analytic.mean() - sigma / (np.sqrt(np.pi) * m), rel=0.01)


def test_crps_nan_points_and_dims():
    ens = xr.DataArray([[0.0, 2.0], [np.nan, 1.0], [1.0, 1.0]], dims=("x", "member"))
    obs = xr.DataArray([1.0, 1.0, np.nan], dims="x")
    score = crps_ensemble(ens, obs)
    np.testing.assert_allclose(score, [0.5, np.nan, np.nan])
    assert float(crps_ensemble(ens, obs, mean="x")) == pytest.approx(0.5)
    with pytest.raises(InputError, match=r"cannot average over \['time'\]"):
        crps_ensemble(ens, obs, mean="time")


def test_crps_global_mean_is_area_weighted():
    g = global_grid(30.0)
    obs = on_grid(np.zeros((6, 12)), g)
    tropics = xr.where(abs(g.lat) < 30, 1.0, 0.0).broadcast_like(obs)
    ens = (obs + tropics).expand_dims(member=1)
    assert float(crps_ensemble(ens, obs, mean=["lat", "lon"])) == pytest.approx(
        float((np.cos(np.deg2rad(g.lat)) * (abs(g.lat) < 30)).sum() / np.cos(np.deg2rad(g.lat)).sum())
    )
    assert float(crps_ensemble(ens, obs, mean="lat").mean()) == pytest.approx(2 / 6)  # one dim: plain mean


def test_crps_errors(pr):
    with pytest.raises(
        InputError,
        match=r"crps_ensemble: 'pr' has no member dimension 'member' \(dims \('time', 'lat', 'lon'\)\)\. "
        r"Pass member_dim=",
    ):
        crps_ensemble(pr, pr)
    ens = pr.expand_dims(member=3)
    with pytest.raises(InputError, match=r"the observations 'pr' have the member dimension"):
        crps_ensemble(ens, ens)
    with pytest.raises(GridMismatchError, match=r"observations 'pr' have sizes .*'time': 6"):
        crps_ensemble(ens, pr.isel(time=slice(0, 6)))
    with pytest.raises(GridMismatchError, match=r"coordinates of .* differ"):
        crps_ensemble(ens, pr.assign_coords(lat=pr.lat + 0.5))
    with pytest.raises(InputError, match="the fair CRPS needs at least 2 members"):
        crps_ensemble(pr.expand_dims(member=1), pr, fair=True)
    assert crps_ensemble(pr.expand_dims(ens=2), pr, member_dim="ens").dims == pr.dims


def test_crps_dask_member_chunks(pr):
    ens = xr.concat([pr, pr + 1.0, pr - 1.0], dim="member").chunk({"member": 1, "time": 6})
    lazy = crps_ensemble(ens, pr)
    assert lazy.chunks is not None
    np.testing.assert_allclose(lazy.compute(), crps_ensemble(ens.compute(), pr), rtol=1e-12)


def test_rank_histogram_flat_for_a_calibrated_ensemble():
    rng = np.random.default_rng(5)
    m, n = 9, 20000
    ens = xr.DataArray(rng.normal(size=(n, m)), dims=("point", "member"))
    obs = xr.DataArray(rng.normal(size=n), dims="point")
    h = rank_histogram(ens, obs)
    assert h.dims == ("rank",) and h.sizes["rank"] == m + 1 and h.attrs["n_points"] == n
    assert float(h.sum()) == pytest.approx(1.0)
    np.testing.assert_allclose(h, 1 / (m + 1), atol=0.01)
    # an under-dispersed ensemble: U-shaped
    u = rank_histogram(ens * 0.3, obs)
    assert float(u[0]) > 3 / (m + 1) and float(u[-1]) > 3 / (m + 1) and float(u[m // 2]) < 0.5 / (m + 1)
    # a biased one: skewed
    assert float(rank_histogram(ens + 2.0, obs)[0]) > 0.5


def test_rank_histogram_ties_are_spread_and_nan_dropped():
    ens = xr.DataArray(np.zeros((3000, 4)), dims=("point", "member"))
    obs = xr.DataArray(np.zeros(3000), dims="point")
    obs[:10] = np.nan
    h = rank_histogram(ens, obs, seed=1)
    assert h.attrs["n_points"] == 2990
    np.testing.assert_allclose(h, 0.2, atol=0.03)
    xr.testing.assert_identical(h, rank_histogram(ens, obs, seed=1))
    with pytest.raises(InputError, match="has no member dimension 'member'"):
        rank_histogram(obs, obs)


def test_pooled_correlation_by_conservative_regridding_for_any_ratio():
    from xdownscale.datasets import synthetic_precipitation
    from xdownscale.metrics import pooled_correlation
    from xdownscale.xr.regrid import regrid

    fine = synthetic_precipitation(ny=24, nx=30, ntime=4, seed=3)
    coarse_grid = fine.isel(lat=slice(2, 22, 5), lon=slice(2, 28, 5))  # 5x coarser, not whole blocks
    coarse = regrid(fine, coarse_grid, method="conservative")
    assert float(pooled_correlation(fine, coarse, factor=None)) == pytest.approx(1.0, abs=1e-6)
    noisy = fine + 5.0 * np.random.default_rng(0).random(fine.shape)
    assert float(pooled_correlation(noisy, coarse, factor=None)) < 0.99


def test_spread_skill_matches_its_definition_and_leaves_nan_out():
    rng = np.random.default_rng(0)
    truth = xr.DataArray(rng.normal(size=(50, 6)), dims=("y", "x"))
    ens = xr.DataArray(rng.normal(size=(4, 50, 6)), dims=("member", "y", "x"))
    r = spread_skill(ens, truth)
    spread = np.sqrt(ens.values.var(axis=0, ddof=1).mean() * 5 / 4)
    rmse = np.sqrt(((ens.values.mean(0) - truth.values) ** 2).mean())
    assert r.attrs["spread"] == pytest.approx(spread) and r.attrs["rmse"] == pytest.approx(rmse)
    assert float(r) == pytest.approx(spread / rmse) and r.attrs["n_points"] == 300
    # a NaN observation or member drops the point; ``where`` selects points
    holed = ens.copy(data=ens.values.copy())
    holed[1, 0, 0] = np.nan
    assert spread_skill(holed, truth.where(truth.x != 5)).attrs["n_points"] == 300 - 50 - 1
    select = ens.mean("member").values > 0
    picked = spread_skill(ens, truth, where=select)
    assert picked.attrs["n_points"] == select.sum()
    assert float(picked) == pytest.approx(float(spread_skill(ens.where(select), truth.where(select))))
    # members transposed after the other dims: same score
    assert float(spread_skill(ens.transpose("y", "x", "member"), truth)) == pytest.approx(float(r))


def test_spread_skill_of_a_calibrated_ensemble_is_one():
    """Truth and members drawn from the same distribution around a shared signal: the ratio is 1 for any
    ensemble size (the finite-ensemble factor), within sampling error."""
    rng = np.random.default_rng(1)
    signal = rng.normal(size=40_000) * 3.0
    for m in (2, 5, 20):
        truth = xr.DataArray(signal + rng.normal(size=signal.size), dims="x")
        ens = xr.DataArray(signal[:, None] + rng.normal(size=(signal.size, m)), dims=("x", "member"))
        assert float(spread_skill(ens, truth)) == pytest.approx(1.0, abs=0.02)
        # members twice as far from the signal: spread^2 = 4 (m + 1) / m, error^2 = 1 + 4 / m
        wide = ens.copy(data=signal[:, None] + 2.0 * (ens.values - signal[:, None]))
        expected = np.sqrt(4.0 * (m + 1) / (m + 4))
        assert float(spread_skill(wide, truth)) == pytest.approx(expected, abs=0.03)


def test_spread_skill_errors():
    ens = xr.DataArray(np.zeros((3, 2)), dims=("x", "member"))
    obs = xr.DataArray(np.zeros(3), dims="x")
    with pytest.raises(InputError, match="has 1 member along 'member'; a spread needs at least 2"):
        spread_skill(ens.isel(member=[0]), obs)
    with pytest.raises(InputError, match=r"where= has shape \(2,\); expected that of the observations"):
        spread_skill(ens, obs, where=np.ones(2, dtype=bool))
    with pytest.raises(InputError, match=r"spread_skill: .* has no member dimension 'ens'"):
        spread_skill(ens, obs, member_dim="ens")
