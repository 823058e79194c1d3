"""preserve=: the downscaled field keeps the input's large scales (exact coarse-cell means, or low-pass)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from xdownscale.core.preserve import preserve_means
from xdownscale.datasets import regional_grid, synthetic_precipitation
from xdownscale.errors import InputError
from xdownscale.preserve import preserve_large_scales
from xdownscale.xr.preserve import coarse_cell_operators
from xdownscale.xr.spectra import lowpass


def _coarse_grid(res: float = 1.4, lat0: float = 33.3, lon0: float = -10.7) -> xr.DataArray:
    """A coarse grid not aligned with the fine one (like an ESM's 1.4 deg grid over a 0.25 deg domain)."""
    g = regional_grid(5, 6, lat0=lat0, lon0=lon0, res=res)
    return xr.DataArray(np.zeros((5, 6)), dims=("lat", "lon"), coords=g.coords)


@pytest.fixture(scope="module")
def fields() -> tuple[xr.DataArray, xr.DataArray]:
    """A 'downscaled' output (wetter, other pattern) and the reference input, masked sea, dry days."""
    out = synthetic_precipitation(ny=16, nx=24, ntime=6, mask=True, seed=1) * 1.4
    ref = synthetic_precipitation(ny=16, nx=24, ntime=6, mask=True, seed=2)
    ref = lowpass(ref.fillna(0.0), 0.125).clip(min=0.0).where(np.isfinite(out))
    ref[2] = ref[2].where(ref[2].isnull(), 0.0)  # a dry day in the input
    return out, ref


def _coarse_means(da: xr.DataArray, coarse: xr.DataArray) -> np.ndarray:
    """Oracle: the mean of the valid fine cells whose centres lie within each coarse cell's bounds."""
    lat_b = np.r_[coarse.lat.values - 0.7, coarse.lat.values[-1] + 0.7]
    lon_b = np.r_[coarse.lon.values - 0.7, coarse.lon.values[-1] + 0.7]
    iy = np.searchsorted(lat_b, da.lat.values) - 1
    ix = np.searchsorted(lon_b, da.lon.values) - 1
    means = []
    for j in range(coarse.sizes["lat"]):
        for i in range(coarse.sizes["lon"]):
            block = da.values[:, iy == j][:, :, ix == i].reshape(da.shape[0], -1)
            if np.isfinite(block[0]).any():
                means.append(np.nanmean(block, axis=1))
    return np.stack(means, axis=1)


def test_coarse_cell_means_equal_the_inputs_to_round_off(fields: tuple) -> None:
    out, ref = fields
    coarse = _coarse_grid()
    fixed = preserve_large_scales(out, ref, rule="mean", coarse=coarse)
    want, got = _coarse_means(ref, coarse), _coarse_means(fixed, coarse)
    before = _coarse_means(out, coarse)
    assert np.abs(before - want).max() > 0.1  # there was something to correct
    np.testing.assert_allclose(got, want, atol=1e-6 * want.max())
    # signs, the mask and the dry day are kept
    assert float(fixed.min()) >= 0.0
    np.testing.assert_array_equal(np.isnan(fixed.values), np.isnan(out.values))
    assert float(fixed[2].max()) == 0.0
    # the output's own pattern survives: it is still closer to itself than to the input
    corr_self = xr.corr(fixed[0], out[0]).item()
    corr_ref = xr.corr(fixed[0], ref[0]).item()
    assert corr_self > corr_ref


def test_a_field_that_already_meets_the_means_is_unchanged(fields: tuple) -> None:
    _, ref = fields
    fixed = preserve_large_scales(ref, ref, rule="mean", coarse=_coarse_grid())
    np.testing.assert_allclose(fixed.values, ref.values, rtol=1e-9, atol=1e-12)


def test_scaling_the_input_scales_the_output(fields: tuple) -> None:
    """A 20% wetter input gives a 20% wetter output: the climate signal is passed on."""
    out, ref = fields
    coarse = _coarse_grid()
    a = preserve_large_scales(out, ref, rule="mean", coarse=coarse)
    b = preserve_large_scales(out, ref * 1.2, rule="mean", coarse=coarse)
    ratio = float(b.mean()) / float(a.mean())
    assert ratio == pytest.approx(1.2, rel=1e-5)


def _with_values(fields: tuple, seed: int = 3) -> xr.DataArray:
    """The coarse grid with values over time: positive, a dry cell, an unknown (NaN) cell, a dry day."""
    out, _ = fields
    grid = _coarse_grid()
    values = np.random.default_rng(seed).gamma(0.8, 3.0, (out.sizes["time"], *grid.shape))
    values[:, 1, 2] = 0.0
    values[:, 3, 1] = np.nan
    values[2] = 0.0
    return xr.DataArray(values, dims=("time", "lat", "lon"), coords={"time": out["time"], **grid.coords})


def test_with_the_inputs_values_each_cell_means_its_value(fields: tuple) -> None:
    """The input's own coarse values, not the regridded reference's cell means, are the targets (an
    interpolated field's cell means mix in the neighbours'); a NaN value keeps the reference's mean."""
    out, ref = fields
    coarse = _with_values(fields)
    fixed = preserve_large_scales(out, ref, rule="mean", coarse=coarse)
    got = _coarse_means(fixed, coarse)
    flat = coarse.values.reshape(coarse.sizes["time"], -1)
    # _coarse_means lists the cells with land in row-major order
    lat_b = np.r_[coarse.lat.values - 0.7, coarse.lat.values[-1] + 0.7]
    lon_b = np.r_[coarse.lon.values - 0.7, coarse.lon.values[-1] + 0.7]
    iy = np.searchsorted(lat_b, ref.lat.values) - 1
    ix = np.searchsorted(lon_b, ref.lon.values) - 1
    land = np.isfinite(ref.values[0])
    ny, nx = coarse.shape[1:]
    cells = [j * nx + i for j in range(ny) for i in range(nx) if land[iy == j][:, ix == i].any()]
    want = flat[:, cells]
    assert want.shape == got.shape
    unknown = np.isnan(want)
    assert unknown.any() and (want[~unknown] == 0).any()
    np.testing.assert_allclose(got[~unknown], want[~unknown], rtol=1e-6, atol=1e-9 * np.nanmax(want))
    np.testing.assert_allclose(got[unknown], _coarse_means(ref, coarse)[unknown], rtol=1e-6, atol=1e-12)
    assert float(fixed.min()) >= 0.0 and float(fixed[2].max()) == 0.0
    np.testing.assert_array_equal(np.isnan(fixed.values), np.isnan(out.values))
    # a cell the reference leaves dry gets the value evenly
    dry = (_coarse_means(ref, coarse) == 0) & (want > 0)
    assert dry.any()
    # with a bias correction that doubled the input (base: before it), each mean is doubled too, except
    # where the reference is dry (no change to measure)
    doubled = preserve_large_scales(out, ref, rule="mean", coarse=coarse, base=ref / 2)
    got2 = _coarse_means(doubled, coarse)
    known = ~unknown & ~dry
    np.testing.assert_allclose(got2[known], 2 * want[known], rtol=1e-6, atol=1e-9 * np.nanmax(want))
    np.testing.assert_allclose(got2[dry], want[dry], rtol=1e-6)
    # lazy, chunked in time differently from the output: the same
    lazy = preserve_large_scales(
        out.chunk({"time": 4}), ref.chunk({"time": 2}), rule="mean", coarse=coarse.chunk({"time": 3})
    )
    np.testing.assert_allclose(lazy.values, fixed.values, rtol=1e-12, atol=1e-15)


def test_every_fine_cell_belongs_to_the_coarse_cell_holding_its_centre() -> None:
    fine = regional_grid(16, 24)
    cell, smooth = coarse_cell_operators(fine, _coarse_grid())
    lat2, lon2 = np.meshgrid(fine.lat.values, fine.lon.values, indexing="ij")
    coarse = _coarse_grid()
    iy, ix = np.divmod(cell, coarse.sizes["lon"])
    assert (cell >= 0).all()
    assert (np.abs(coarse.lat.values[iy] - lat2.ravel()) <= 0.7).all()
    assert (np.abs(coarse.lon.values[ix] - lon2.ravel()) <= 0.7).all()
    assert smooth is not None and smooth.shape == (16 * 24, 30)
    np.testing.assert_allclose(smooth.toarray().sum(axis=1), 1.0)
    # longitudes in 0..360 on the coarse grid: the same cells
    shifted = coarse.assign_coords(lon=coarse.lon % 360)
    np.testing.assert_array_equal(coarse_cell_operators(fine, shifted)[0], cell)


def test_a_curvilinear_input_grid_uses_the_nearest_centre(fields: tuple) -> None:
    out, ref = fields
    coarse = _coarse_grid()
    lat2d, lon2d = np.meshgrid(coarse.lat.values, coarse.lon.values, indexing="ij")
    curvilinear = xr.DataArray(
        np.zeros(lat2d.shape),
        dims=("y", "x"),
        coords={
            "lat": (("y", "x"), lat2d, {"standard_name": "latitude", "units": "degrees_north"}),
            "lon": (("y", "x"), lon2d, {"standard_name": "longitude", "units": "degrees_east"}),
        },
    )
    cell, smooth = coarse_cell_operators(out, curvilinear)
    assert smooth is None
    same = cell == coarse_cell_operators(out, coarse)[0]
    assert same.mean() > 0.9  # nearest centre ~ containing cell on a regular grid
    fixed = preserve_large_scales(out, ref, rule="mean", coarse=curvilinear)
    assert float(fixed.min()) >= 0.0 and np.isfinite(fixed.values).sum() == np.isfinite(out.values).sum()


def test_lazy_and_chunked_results_equal_the_eager_one(fields: tuple) -> None:
    out, ref = fields
    coarse = _coarse_grid()
    eager = preserve_large_scales(out, ref, rule="mean", coarse=coarse)
    lazy = preserve_large_scales(out.chunk({"time": 4}), ref.chunk({"time": 2}), rule="mean", coarse=coarse)
    assert lazy.chunks is not None
    np.testing.assert_array_equal(lazy.values, eager.values)


def test_member_dimension_is_corrected_member_by_member(fields: tuple) -> None:
    out, ref = fields
    coarse = _coarse_grid()
    ens = xr.concat([out, out * 0.5], dim="member").transpose("time", "member", "lat", "lon")
    fixed = preserve_large_scales(ens, ref, rule="mean", coarse=coarse)
    assert fixed.dims == ens.dims
    for m in range(2):
        np.testing.assert_allclose(
            _coarse_means(fixed.isel(member=m), coarse), _coarse_means(ref, coarse), atol=1e-5
        )


def test_lowpass_rule_restores_the_inputs_large_scales() -> None:
    from xdownscale.datasets import synthetic_temperature

    out = synthetic_temperature(ny=16, nx=24, ntime=3, seed=1) + 2.0
    ref = synthetic_temperature(ny=16, nx=24, ntime=3, seed=2)
    fixed = preserve_large_scales(out, ref, rule="lowpass", wavenumber=0.125)
    np.testing.assert_allclose(lowpass(fixed, 0.125).values, lowpass(ref, 0.125).values, atol=0.05)
    # the small scales are the output's
    small = (fixed - lowpass(fixed, 0.125)) - (out - lowpass(out, 0.125))
    assert float(np.abs(small).mean()) < 0.1 * float(np.abs(out - lowpass(out, 0.125)).mean())


def test_errors_name_the_fix(fields: tuple) -> None:
    out, ref = fields
    with pytest.raises(InputError, match="'mean' or 'lowpass'"):
        preserve_large_scales(out, ref, rule="median")
    with pytest.raises(InputError, match="coarse input's grid"):
        preserve_large_scales(out, ref, rule="mean")
    with pytest.raises(InputError, match="wavenumber"):
        preserve_large_scales(out, ref, rule="lowpass")
    with pytest.raises(InputError, match="at least 2 x 2 cells"):
        preserve_large_scales(out, ref, rule="mean", coarse=_coarse_grid().isel(lat=[0]))
    with pytest.raises(ValueError, match=">= 0"):
        preserve_means(-np.ones((1, 4)), np.ones((1, 4)), np.zeros(4, int))


def test_a_field_missing_in_the_input_does_not_mask_the_others(fields: tuple) -> None:
    out, ref = fields
    ref = ref.copy()
    ref[1] = np.nan  # a missing day
    fixed = preserve_large_scales(out, ref, rule="mean", coarse=_coarse_grid())
    assert np.isnan(fixed.values[1]).all()
    np.testing.assert_array_equal(np.isnan(fixed.values[0]), np.isnan(out.values[0]))


def test_with_wet_min_the_rain_lies_in_recorded_amounts_and_the_means_stay_exact() -> None:
    """Two coarse cells of four fine cells: one with wet values and drizzle, one with drizzle only."""
    cell = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    y = np.array([[2.0, 0.05, 0.02, 0.0, 0.031, 0.03, 0.029, 0.028]])
    p = np.array([[1.0, 1.0, 1.0, 1.0, 0.06, 0.06, 0.06, 0.06]])  # cell 1 holds 0.24: two whole 0.1
    got = preserve_means(y, p, cell, wet_min=0.1)[0]
    # cell 0: the drizzle is gone and its mass is on the wet value; cell 1 (all below 0.1 after the
    # correction): its two largest values carry it
    np.testing.assert_allclose(got[:4], [4.0, 0.0, 0.0, 0.0], rtol=1e-12)
    np.testing.assert_allclose(got[4:], [0.24 * 31 / 61, 0.24 * 30 / 61, 0.0, 0.0], rtol=1e-12)
    np.testing.assert_allclose([got[:4].mean(), got[4:].mean()], [1.0, 0.06], rtol=1e-12)
    # a cell whose total is below one recorded amount puts it on its largest value
    tiny = preserve_means(y, p * 0.1, cell, wet_min=0.1)[0]
    np.testing.assert_allclose(tiny[4:], [0.024, 0.0, 0.0, 0.0], rtol=1e-12)
    # without wet_min: the plain multiplicative correction
    plain = preserve_means(y, p, cell)[0]
    assert (plain[4:7] > 0).all() and plain[4:].mean() == pytest.approx(0.06)


def test_wet_min_keeps_the_means_on_real_looking_fields(fields: tuple) -> None:
    out, ref = fields
    coarse = _coarse_grid()
    wet_min = 0.5
    fixed = preserve_large_scales(out, ref, rule="mean", coarse=coarse, wet_min=wet_min)
    want = _coarse_means(ref, coarse)
    np.testing.assert_allclose(_coarse_means(fixed, coarse), want, atol=1e-6 * want.max())
    np.testing.assert_array_equal(np.isnan(fixed.values), np.isnan(out.values))
    plain = preserve_large_scales(out, ref, rule="mean", coarse=coarse)
    drizzle = lambda a: int(((a > 0) & (a < wet_min * (1 - 1e-5))).sum())  # noqa: E731
    assert drizzle(fixed) < drizzle(plain) / 3  # most drizzle went (what is left: cells under 0.5 in all)
    assert float(fixed.min()) >= 0.0 and float(fixed[2].max()) == 0.0


def _blocks(rows: int, cols: int, size: int) -> np.ndarray:
    """The coarse cell of each fine cell of a rows x cols grid cut into size x size blocks (row-major)."""
    r, c = np.divmod(np.arange(rows * cols), cols)
    return (r // size) * (cols // size) + c // size


def test_with_the_grid_shape_specks_and_holes_go_and_the_means_stay_exact() -> None:
    """An 8 x 8 grid of four 4 x 4 coarse cells: a dry hole inside rain is filled, a lone wet speck
    beside a rain area goes (its rain moves onto the area), a coarse cell whose only rain is a speck
    keeps it, a dry coarse cell stays dry."""
    cell = _blocks(8, 8, 4)
    y = np.zeros((8, 8))
    y[0:4, 0:4] = 2.0
    y[1, 1] = 0.0  # a hole in the rain of cell 0
    y[0:3, 4:7] = 1.0  # rain in cell 1 ...
    y[3, 7] = 0.5  # ... and a speck apart from it
    y[6, 1] = 0.4  # cell 2: its only rain
    p = np.zeros((8, 8))
    for j, v in enumerate([1.5, 0.6, 0.025, 0.0]):
        p[cell.reshape(8, 8) == j] = v
    got = preserve_means(y.ravel()[None], p.ravel()[None], cell, wet_min=0.1, grid_shape=(8, 8))[0]
    got = got.reshape(8, 8)
    means = [got[cell.reshape(8, 8) == j].mean() for j in range(4)]
    np.testing.assert_allclose(means, [1.5, 0.6, 0.025, 0.0], rtol=1e-12, atol=1e-15)
    assert got[1, 1] > 0.05  # the hole rains (0.1, scaled with the cell's other wet values)
    assert got[3, 7] == 0.0 and (got[0:2, 4:6] > 0).all()  # the speck's rain is on the area
    assert got[6, 1] == pytest.approx(0.4) and (np.delete(got[4:8, 0:4].ravel(), 9) == 0).all()
    assert (got[4:8, 4:8] == 0).all() and (got >= 0).all()
    # without the grid's shape the wet area is decided value by value: the hole stays dry
    plain = preserve_means(y.ravel()[None], p.ravel()[None], cell, wet_min=0.1)[0].reshape(8, 8)
    assert plain[1, 1] == 0.0 and plain[3, 7] > 0


def test_coherent_removes_specks_only_when_asked(fields: tuple) -> None:
    """``coherent=True`` (a model whose training data have few specks) removes single wet cells and
    dry holes and keeps the means; the default keeps the drizzle rule's wet area as it is."""
    from xdownscale.core.transforms import speck_counts

    out, ref = fields
    coarse = _coarse_grid()
    plain = preserve_large_scales(out, ref, rule="mean", coarse=coarse, wet_min=0.5)
    tidy = preserve_large_scales(out, ref, rule="mean", coarse=coarse, wet_min=0.5, coherent=True)
    want = _coarse_means(ref, coarse)
    np.testing.assert_allclose(_coarse_means(tidy, coarse), want, atol=1e-6 * want.max())
    np.testing.assert_array_equal(np.isnan(tidy.values), np.isnan(out.values))
    before, after = speck_counts(plain.values, 0.5)[0], speck_counts(tidy.values, 0.5)[0]
    assert before > 10 and after < 0.7 * before  # left: cells whose only rain is a speck


def test_the_shipped_precipitation_models_data_are_coherent() -> None:
    import xdownscale

    for name in ("cm-eobs-iberia-0.25deg-pr", "sde-eobs-iberia-0.25deg-pr"):
        t = xdownscale.load_model(name).transform
        assert t.coherent and 0.0 < t.specks < 0.01
    joint = xdownscale.load_model("cm-eobs-iberia-0.5deg-pr-tas")  # E-OBS at 0.5 deg: 2.1%
    assert (
        joint.for_variable("pr").transform.coherent
        and 0.01 < joint.for_variable("pr").transform.specks < 0.03
    )
    assert not joint.for_variable("tas").transform.coherent


def _specks_oracle(y: np.ndarray, target: np.ndarray, cell: np.ndarray, land: np.ndarray) -> np.ndarray:
    """The specks-and-holes rule with scipy on one field (rows, cols) after the drizzle rule: a wet land
    cell with at most 3/8 of its land neighbours wet becomes dry, a dry one with at least 7/8 of them
    wet becomes 0.1 (a cell without land neighbours stays), then each coarse cell is scaled back to
    ``target`` (cells the rule would leave dry keep their values)."""
    from scipy import ndimage

    wet = (y >= 0.1 * (1 - 1e-6)) & land
    around = np.ones((3, 3))
    around[1, 1] = 0
    count = ndimage.convolve(wet.astype(float), around, mode="constant")
    valid = ndimage.convolve(land.astype(float), around, mode="constant")
    now = np.where(wet, 8 * count > 3 * valid, 8 * count >= 7 * valid)
    now = np.where(valid > 0, now, wet) & land
    moved = np.where(now & ~wet, 0.1, np.where(now, y, 0.0))
    c = cell.reshape(y.shape)
    out = y.copy()
    for j in np.unique(c[land]):
        where = (c == j) & land
        part = moved[where] if moved[where].sum() > 0 or target[j] == 0 else y[where]
        out[where] = part * (target[j] / part.mean() if part.sum() > 0 else 1.0)
    return np.where(land, out, np.nan)


def test_rain_recedes_from_a_dry_coarse_cell_and_not_from_the_sea() -> None:
    """On an 8 x 8 grid of four 4 x 4 input cells (top left dry, bottom left sea, the rest wet) an
    output that rains 2 mm/day everywhere comes back with the cells next to the dry cell's land (its
    column, and one diagonal cell below) at a tenth of their neighbours' value, the cells next to the sea
    untouched, every mean exact; without the grid's shape the rain runs up to the dry cell's edge."""
    from xdownscale.core.preserve import DRY_EDGE

    cell = _blocks(8, 8, 4)
    y = np.full((1, 64), 2.0)
    p = np.ones((1, 64))
    p[0, cell == 0] = 0.0  # the input says the top-left cell is dry
    y[0, cell == 2] = p[0, cell == 2] = np.nan  # sea
    got = preserve_means(y, p, cell, wet_min=0.1, grid_shape=(8, 8))[0].reshape(8, 8)
    assert DRY_EDGE == 0.1
    np.testing.assert_array_equal(got[:4, :4], 0.0)
    assert np.isnan(got[4:, :4]).all()
    np.testing.assert_allclose(got[:4, 4], 0.1 * got[:4, 5], rtol=1e-12)  # next to the dry cell
    np.testing.assert_allclose(got[4, 4], 0.1 * got[4, 5], rtol=1e-12)  # its diagonal neighbour
    np.testing.assert_allclose(got[5:, 4], got[5:, 5], rtol=1e-12)  # next to the sea: unchanged
    for j in (1, 3):
        np.testing.assert_allclose(got.ravel()[cell == j].mean(), 1.0, rtol=1e-12)
    plain = preserve_means(y, p, cell, wet_min=0.1)[0].reshape(8, 8)
    np.testing.assert_allclose(plain[:, 4:], 1.0, rtol=1e-12)


def _dry_edges_oracle(y: np.ndarray, p: np.ndarray, cell: np.ndarray, land: np.ndarray) -> np.ndarray:
    """``y`` (rows, cols) with the land cells next to (8 neighbours) the land cells of a coarse cell
    where ``p`` is dry times 0.1, with scipy."""
    from scipy import ndimage

    c = cell.reshape(y.shape)
    dry = np.zeros(y.shape, bool)
    for j in np.unique(c[land]):
        where = (c == j) & land
        dry |= where & (np.nansum(p[where]) == 0)
    edge = ndimage.binary_dilation(dry, structure=np.ones((3, 3))) & ~dry & land
    return np.where(edge, 0.1 * y, y)


def test_the_specks_and_holes_rule_equals_a_scipy_oracle_on_masked_fields() -> None:
    rng = np.random.default_rng(3)
    rows, cols = 12, 16
    cell = _blocks(rows, cols, 4)
    land = np.ones((rows, cols), bool)
    land[:3, :5] = False  # sea in a corner
    land[7, 9] = False
    land[10, 0:3] = False
    land[11, 1] = False  # a land cell with one land neighbour
    land[9, 14:] = land[10, 13:] = land[11, 13] = land[11, 15] = False  # ... and one with none
    y = np.exp(rng.normal(-1.0, 1.5, (5, rows, cols)))  # wet, drizzle and near-dry values
    y[rng.random(y.shape) < 0.3] = 0.0
    p = np.exp(rng.normal(-1.5, 1.0, y.shape))
    p[:, 4:8, 8:12] = 0.0  # a dry coarse cell
    y = np.where(land, y, np.nan)
    p = np.where(land, p, np.nan)
    flat = lambda a: a.reshape(len(a), -1)  # noqa: E731
    edged = np.stack([_dry_edges_oracle(y[f], p[f], cell, land) for f in range(len(y))])
    assert np.nanmax(np.abs(edged - y)) > 0.1  # the dry coarse cell's neighbours lose rain
    rule = preserve_means(flat(edged), flat(p), cell, wet_min=0.1)  # then the drizzle rule only
    got = preserve_means(flat(y), flat(p), cell, wet_min=0.1, grid_shape=(rows, cols))
    assert np.nanmax(np.abs(got - rule)) > 0.1  # the rule changes these fields
    for f in range(len(y)):
        target = np.array([np.nanmean(flat(p)[f][cell == j]) for j in range(cell.max() + 1)])
        want = _specks_oracle(rule[f].reshape(rows, cols), target, cell, land)
        np.testing.assert_allclose(got[f].reshape(rows, cols), want, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"grid_shape \(12, 15\) must hold the fields' last axis of 192"):
        preserve_means(flat(y), flat(p), cell, wet_min=0.1, grid_shape=(12, 15))


def _ramp_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A uniform 'output' on a 16 x 24 fine grid and coarse targets rising smoothly from west to east
    (4 x 4 fine cells per coarse cell): (y, coarse values, cell, smooth)."""
    fine = xr.DataArray(np.ones((16, 24)), dims=("lat", "lon"), coords=regional_grid(16, 24, res=0.25).coords)
    coarse = regional_grid(4, 6, lat0=float(fine.lat[0]) - 0.125, lon0=float(fine.lon[0]) - 0.125, res=1.0)
    coarse = xr.DataArray(np.zeros((4, 6)), dims=("lat", "lon"), coords=coarse.coords)
    cell, smooth = coarse_cell_operators(fine, coarse)
    values = np.tile(np.linspace(1.0, 3.0, 6), 4)[None, :]
    return np.ones((1, 16 * 24)), values, cell, smooth


def test_the_solved_smooth_field_meets_the_means_without_steps_at_cell_edges() -> None:
    """The multiplier is a bilinear field whose cell means are the targets: a smooth ramp of targets
    gives a smooth output, where a per-cell ratio (no ``smooth``) gives steps at every cell edge."""
    y, values, cell, smooth = _ramp_case()
    solved = preserve_means(y, y, cell, smooth, coarse=values).reshape(16, 24)
    blocks = preserve_means(y, y, cell, None, coarse=values).reshape(16, 24)
    for out in (solved, blocks):
        means = out.reshape(4, 4, 6, 4).mean(axis=(1, 3)).ravel()
        np.testing.assert_allclose(means, values[0], rtol=1e-12)
    # along a row: the piecewise-constant field jumps by a whole step (0.4) at each edge, the solved one
    # changes by about a quarter of it from cell to cell
    assert np.abs(np.diff(blocks[8])).max() == pytest.approx(0.4)
    assert np.abs(np.diff(solved[8])).max() < 0.15
    # the solved field alone met the means: the exact pass changed nothing (no jump in the row's slope)
    assert np.abs(np.diff(solved[8], 2)[2:-2]).max() < 0.05


def test_the_smooth_multiplier_is_floored_and_the_exact_pass_keeps_the_means() -> None:
    """A target far below the output next to one far above pushes the least-norm field below zero; it
    is floored (no negative or zero values appear) and the exact pass still meets every mean."""
    y, values, cell, smooth = _ramp_case()
    values = values.copy()
    values[0, 6:12] = [1e-3, 50.0, 1e-3, 50.0, 1e-3, 50.0]
    out = preserve_means(y, y, cell, smooth, coarse=values)
    assert out.min() > 0.0
    means = out.reshape(4, 4, 6, 4).mean(axis=(1, 3)).ravel()
    np.testing.assert_allclose(means, values[0], rtol=1e-10)


@pytest.mark.parametrize("banded", [True, False], ids=["banded", "cg"])
def test_the_smooth_solve_is_the_dense_least_norm_solution(banded: bool) -> None:
    """Oracle: the smooth multiplier's values at the coarse centres are 1 + A^T (A A^T)^-1 (t - A 1) with
    A built densely, on a random positive field and random targets (no floor reached), by the banded
    Cholesky solve and by conjugate gradients."""
    import torch

    from xdownscale.core.preserve import _Cells

    _, _, cell, smooth = _ramp_case()
    rng = np.random.default_rng(3)
    y = rng.uniform(0.5, 2.0, (2, cell.size))
    mean = np.zeros((24, cell.size))
    mean[cell, np.arange(cell.size)] = 1.0 / 16
    target = (y @ mean.T) * rng.uniform(0.8, 1.25, (2, 24))
    solve = _Cells(np.ones(cell.size, bool), cell, smooth, banded=banded).solve
    assert solve is not None
    live = torch.ones((2, 24), dtype=torch.bool)
    got = solve.multiplier(torch.from_numpy(y), torch.from_numpy(target), live).numpy()
    dense = smooth.toarray()
    for f in range(2):
        a = (mean * y[f]) @ dense
        r = 1.0 + a.T @ np.linalg.solve(a @ a.T, target[f] - a.sum(axis=1))
        np.testing.assert_allclose(got[f], dense @ r, rtol=1e-5)
        np.testing.assert_allclose(mean @ (y[f] * got[f]), target[f], rtol=1e-5)


def _ragged_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, object]:
    """Fields on a 20 x 28 grid with a hole in the mask, dry cells and drizzle, a 1-degree input grid
    with a ragged edge of coarse cells: (y, values, cell, smooth)."""
    fine = xr.DataArray(np.ones((20, 28)), dims=("lat", "lon"), coords=regional_grid(20, 28, res=0.25).coords)
    coarse = regional_grid(5, 7, lat0=float(fine.lat[0]) - 0.125, lon0=float(fine.lon[0]) - 0.125, res=1.0)
    coarse = xr.DataArray(np.zeros((5, 7)), dims=("lat", "lon"), coords=coarse.coords)
    cell, smooth = coarse_cell_operators(fine, coarse)
    rng = np.random.default_rng(5)
    y = rng.gamma(0.6, 2.0, (6, 20 * 28)) * (rng.uniform(size=(6, 20 * 28)) > 0.3)
    y[:, 200:230] = np.nan  # a hole in the mask
    values = rng.gamma(0.8, 2.0, (6, 35)) * (rng.uniform(size=(6, 35)) > 0.2)
    return y, values, cell, smooth


def test_the_correction_is_the_same_in_batches_of_any_size_and_its_operators_are_sparse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Memory does not grow with fine times coarse cells: the interpolation is sparse (at most 4 weights
    per fine cell), and a work budget too small for more than one field per batch gives the same result
    as one batch of all fields (on a grid with a hole in the mask and a ragged edge of coarse cells)."""
    import xdownscale.core.preserve as core_preserve

    y, values, cell, smooth = _ragged_case()
    assert smooth is not None and smooth.nnz <= 4 * cell.size
    whole = preserve_means(y, np.nan_to_num(y), cell, smooth, coarse=values, wet_min=0.1)
    monkeypatch.setattr(core_preserve, "_BUDGET", 1)
    one_by_one = preserve_means(y, np.nan_to_num(y), cell, smooth, coarse=values, wet_min=0.1)
    np.testing.assert_allclose(one_by_one, whole, rtol=1e-12, atol=1e-14)
    means = np.nanmean(whole.reshape(6, 5, 4, 7, 4), axis=(2, 4)).reshape(6, 35)
    np.testing.assert_allclose(means, values, rtol=1e-9, atol=1e-12)


def test_conjugate_gradients_give_the_banded_result() -> None:
    """The accelerator's solver (conjugate gradients, run here on the CPU) corrects the fields as the
    exact banded solve does, to far below any data's precision, with the means met to round-off."""
    y, values, cell, smooth = _ragged_case()
    kw = dict(coarse=values, wet_min=0.1)
    banded = preserve_means(y, np.nan_to_num(y), cell, smooth, solver="banded", **kw)
    cg = preserve_means(y, np.nan_to_num(y), cell, smooth, solver="cg", **kw)
    np.testing.assert_array_equal(np.isnan(cg), np.isnan(banded))
    np.testing.assert_allclose(cg, banded, rtol=1e-8, atol=1e-10)
    means = np.nanmean(cg.reshape(6, 5, 4, 7, 4), axis=(2, 4)).reshape(6, 35)
    np.testing.assert_allclose(means, values, rtol=1e-9, atol=1e-12)


def test_an_unknown_solver_is_named() -> None:
    with pytest.raises(ValueError, match=r"solver='lu'.*'banded'"):
        preserve_means(np.ones((1, 4)), np.ones((1, 4)), np.zeros(4, int), solver="lu")


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_correction_equals_the_cpus() -> None:
    y, values, cell, smooth = _ragged_case()
    kw = dict(coarse=values, wet_min=0.1)
    cpu = preserve_means(y, np.nan_to_num(y), cell, smooth, **kw)
    gpu = preserve_means(y, np.nan_to_num(y), cell, smooth, device="cuda", **kw)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-8, atol=1e-10)
