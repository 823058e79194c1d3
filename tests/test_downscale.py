"""The call users came for: ``da.downscale.cm`` / ``.sde`` end to end on tiny trained models."""

from __future__ import annotations

import warnings

import dask
import numpy as np
import pytest
import xarray as xr
from _dask_helpers import CountingScheduler

import xdownscale
from xdownscale.errors import (
    GridMismatchError,
    InputError,
    MissingCoordinateError,
    PerformanceWarning,
    UnitError,
)


def _coarse(fine: xr.DataArray, factor: int = 4, units: str = "kg m-2 s-1") -> xr.DataArray:
    """An ESM-like coarse field: block means of the fine synthetic field, in flux units."""
    coarse = fine.fillna(float(fine.mean())).coarsen(lat=factor, lon=factor, boundary="trim").mean()
    coarse = coarse / 86400.0 if units == "kg m-2 s-1" else coarse
    coarse.attrs = {"units": units, "standard_name": "precipitation_flux"}
    coarse.name = "pr"
    for c in ("lat", "lon"):
        coarse[c].attrs = dict(fine[c].attrs)
    return coarse.astype("float32")


@pytest.fixture(scope="module")
def coarse(fine_data: xr.DataArray) -> xr.DataArray:
    return _coarse(fine_data)


def test_cm_output_dims_units_attrs(cm_model, coarse):
    out = coarse.downscale.cm(model=cm_model.path, scale="200 km", members=2, seed=0, progress=False)
    grid = cm_model.grid
    assert out.dims == ("time", "member", "lat", "lon")
    assert out.sizes["member"] == 2
    np.testing.assert_allclose(out["lat"].values, grid["lat"].values)
    np.testing.assert_allclose(out["lon"].values, grid["lon"].values)
    assert out.attrs["units"] == "kg m-2 s-1"
    assert out.name == "pr"
    assert cm_model.sha256 in out.attrs["history"] and cm_model.name in out.attrs["history"]
    assert out.attrs["downscale_scale_km"] > 0
    assert out.attrs["cell_methods"]
    mask = grid["mask"].values
    values = out.values
    assert np.isnan(values[..., ~mask]).all()
    assert np.isfinite(values[..., mask]).all()
    assert (values[..., mask] >= 0).all()
    # members differ, fields are not constant
    assert not np.array_equal(values[:, 0], values[:, 1])


def test_single_member_has_no_member_dim_unless_asked(cm_model, coarse):
    out = coarse.isel(time=slice(0, 2)).downscale.cm(model=cm_model.path, scale="200 km", progress=False)
    assert "member" not in out.dims
    kept = coarse.isel(time=slice(0, 2)).downscale.cm(
        model=cm_model.path, scale="200 km", member_dim=True, progress=False
    )
    assert kept.dims == ("time", "member", "lat", "lon")
    np.testing.assert_array_equal(kept.isel(member=0).values, out.values)


def test_same_seed_same_output_for_any_chunking_and_batch(cm_model, coarse):
    """The noise of a field depends only on (seed, time stamp, member). Where the network batches
    line up the output is bit-identical; otherwise BLAS may round the last bit differently."""
    x = coarse.isel(time=slice(0, 6))
    kwargs = dict(model=cm_model.path, scale="200 km", members=2, seed=3, precision="fp32")
    ref = x.downscale.cm(batch_size=4, progress=False, **kwargs).values
    aligned = x.chunk({"time": 2}).downscale.cm(batch_size=4, **kwargs).values
    np.testing.assert_array_equal(aligned, ref)
    for chunks, batch in ((1, 1), (4, 3), (6, 12)):
        lazy = x.chunk({"time": chunks}).downscale.cm(batch_size=batch, **kwargs)
        np.testing.assert_allclose(lazy.values, ref, rtol=2e-6, atol=0)
    other = x.downscale.cm(
        model=cm_model.path, scale="200 km", members=2, seed=4, precision="fp32", progress=False
    ).values
    assert not np.allclose(other, ref, equal_nan=True)


def test_a_field_does_not_depend_on_its_neighbours_in_time(cm_model, coarse):
    whole = coarse.isel(time=slice(0, 5)).downscale.cm(
        model=cm_model.path, scale="200 km", seed=1, precision="fp32", progress=False
    )
    alone = coarse.isel(time=[3]).downscale.cm(
        model=cm_model.path, scale="200 km", seed=1, precision="fp32", progress=False
    )
    np.testing.assert_allclose(whole.isel(time=[3]).values, alone.values, rtol=2e-6, atol=0)


def test_dask_in_dask_out_nothing_computed_before_compute(cm_model, coarse):
    lazy_in = coarse.chunk({"time": 3})
    counter = CountingScheduler()
    with dask.config.set(scheduler=counter):
        out = lazy_in.downscale.cm(model=cm_model.path, scale="auto", qdm=True, members=2, seed=0)
        assert counter.calls == 0
        assert out.chunks is not None
        assert out.chunks[0] == lazy_in.chunks[0]
        values = out.compute()
        assert counter.calls >= 1
    eager = coarse.downscale.cm(
        model=cm_model.path, scale="auto", qdm=True, members=2, seed=0, progress=False
    )
    np.testing.assert_allclose(values.values, eager.values, rtol=1e-5, atol=1e-9)


def test_scale_auto_is_what_select_scale_picks(cm_model, coarse):
    picked = coarse.downscale.select_scale(model=cm_model.path, qdm=True)
    assert isinstance(picked, xdownscale.Scale)
    assert 0 < picked.wavenumber <= 0.5 and picked.sigma > 0
    out = coarse.downscale.cm(model=cm_model.path, scale=picked, qdm=True, progress=False)
    auto = coarse.downscale.cm(model=cm_model.path, scale="auto", qdm=True, progress=False)
    assert auto.attrs["downscale_scale_sigma"] == pytest.approx(picked.sigma)
    assert out.attrs["downscale_scale_sigma"] == pytest.approx(picked.sigma)


def test_larger_scale_means_more_noise(cm_model, coarse):
    small = xdownscale.api.resolve_scale("100 km", cm_model)
    large = xdownscale.api.resolve_scale("400 km", cm_model)
    assert large.sigma > small.sigma


def test_scales_outside_the_grid_say_which_bound(cm_model):
    spacing = cm_model.target_psd.attrs["spacing_km"]
    with pytest.raises(InputError, match=r"^A scale of 10 km is below two grid cells") as below:
        xdownscale.api.resolve_scale("10 km", cm_model)
    assert below.value.__cause__ is None and below.value.__suppress_context__
    with pytest.raises(InputError, match=r"1e\+09 km is larger than the domain .* at most \d+ km"):
        xdownscale.api.resolve_scale("1e9 km", cm_model)
    k_min = float(cm_model.target_psd["wavenumber"][0])
    largest = xdownscale.api.resolve_scale(f"{spacing / k_min * 0.999} km", cm_model)
    assert largest.wavenumber == pytest.approx(k_min, rel=1e-2) and largest.sigma > 0


def test_prepare_is_the_network_input(cm_model, coarse):
    prepared = coarse.downscale.prepare(model=cm_model.path)
    assert prepared.dims == ("time", "lat", "lon")
    mask = cm_model.grid["mask"].values
    assert np.isnan(prepared.values[:, ~mask]).all()
    assert np.nanmax(np.abs(prepared.values)) < 5
    physical = coarse.downscale.prepare(model=cm_model.path, transform=False)
    assert physical.attrs["units"] == cm_model.variable["units"]


def test_qdm_with_model_quantiles_hist_period_and_fitted(cm_model, coarse):
    wet = coarse * 3.0
    wet.attrs = coarse.attrs
    times = wet["time"].values
    period = slice(str(times[0])[:10], str(times[-1])[:10])
    plain = wet.downscale.prepare(model=cm_model.path, transform=False)
    corrected = wet.downscale.prepare(model=cm_model.path, transform=False, qdm=True, hist=period)
    ref_mean = float(cm_model.reference_quantiles.mean())
    # the 3x too wet input is pulled back toward the training climatology
    assert abs(float(corrected.mean()) - ref_mean) < abs(float(plain.mean()) - ref_mean)
    fitted = xdownscale.QDM.from_quantiles(
        cm_model.reference_quantiles, plain, **xdownscale.api.qdm_defaults(cm_model)
    )
    again = wet.downscale.prepare(model=cm_model.path, transform=False, qdm=fitted)
    np.testing.assert_allclose(again.values, corrected.values, rtol=1e-5, equal_nan=True)
    out = wet.isel(time=slice(0, 2)).downscale.cm(
        model=cm_model.path, scale="200 km", qdm=True, hist=period, progress=False
    )
    assert "QDM" in out.attrs["history"]


def test_sde_bridge_runs(sde_model, coarse):
    out = coarse.isel(time=slice(0, 2)).downscale.sde(
        model=sde_model.path, scale="200 km", steps=8, members=2, seed=0, progress=False
    )
    assert out.dims == ("time", "member", "lat", "lon")
    mask = sde_model.grid["mask"].values
    assert np.isfinite(out.values[..., mask]).all()


def test_cftime_calendars(cm_model, coarse):
    for calendar in ("noleap", "360_day"):
        times = xr.date_range("2001-01-01", periods=3, freq="D", calendar=calendar, use_cftime=True)
        x = coarse.isel(time=slice(0, 3)).assign_coords(time=times)
        out = x.downscale.cm(model=cm_model.path, scale="200 km", progress=False)
        assert out.sizes["time"] == 3
        assert np.isfinite(out.values[:, cm_model.grid["mask"].values]).all()


def test_nan_in_input_comes_back_nan(cm_model, coarse):
    x = coarse.isel(time=slice(0, 2)).copy()
    x[0] = np.nan
    out = x.downscale.cm(model=cm_model.path, scale="200 km", progress=False)
    assert np.isnan(out.values[0]).all()
    assert np.isfinite(out.values[1][cm_model.grid["mask"].values]).all()


def test_bigger_input_is_cut_to_the_domain(cm_model, coarse):
    lat = coarse["lat"].values
    lon = coarse["lon"].values
    dlat, dlon = lat[1] - lat[0], lon[1] - lon[0]
    big = coarse.pad(lat=2, lon=2, mode="edge")
    big = big.assign_coords(
        lat=(
            "lat",
            np.concatenate([lat[0] - dlat * np.arange(2, 0, -1), lat, lat[-1] + dlat * np.arange(1, 3)]),
            coarse["lat"].attrs,
        ),
        lon=(
            "lon",
            np.concatenate([lon[0] - dlon * np.arange(2, 0, -1), lon, lon[-1] + dlon * np.arange(1, 3)]),
            coarse["lon"].attrs,
        ),
    )
    out = big.isel(time=slice(0, 2)).downscale.cm(model=cm_model.path, scale="200 km", progress=False)
    assert out.sizes["lat"] == cm_model.grid.sizes["lat"]
    assert np.isfinite(out.values[:, cm_model.grid["mask"].values]).all()


# -- bad input -------------------------------------------------------------------------------------
def test_error_no_lat_lon(cm_model, coarse):
    bare = xr.DataArray(
        coarse.values, dims=("time", "a", "b"), coords={"time": coarse["time"]}, attrs=coarse.attrs, name="pr"
    )
    with pytest.raises(MissingCoordinateError, match="latitude"):
        bare.downscale.cm(model=cm_model.path)


def test_error_units_missing_or_unknown(cm_model, coarse):
    x = coarse.copy()
    x.attrs = {}
    with pytest.raises(UnitError, match="units="):
        x.downscale.cm(model=cm_model.path)
    x.attrs = {"units": "furlongs per fortnight squared"}
    with pytest.raises(UnitError, match="furlongs"):
        x.downscale.cm(model=cm_model.path)


def test_units_override_works(cm_model, coarse):
    x = coarse.isel(time=slice(0, 2)).copy()
    x.attrs = {}
    out = x.downscale.cm(model=cm_model.path, units="kg m-2 s-1", scale="200 km", progress=False)
    assert out.attrs["units"] == "kg m-2 s-1"


def test_error_temperature_into_precipitation_model(cm_model, coarse):
    tas = coarse * 0 + 280.0
    tas.attrs = {"units": "K", "standard_name": "air_temperature"}
    tas.name = "tas"
    with pytest.raises(UnitError, match="tas"):
        tas.downscale.cm(model=cm_model.path)


def test_error_domain_not_covered(cm_model, coarse):
    part = coarse.isel(lat=slice(0, 2))
    with pytest.raises(GridMismatchError, match="covers lat"):
        part.downscale.cm(model=cm_model.path)


def test_error_non_daily_input(cm_model, coarse):
    six_hourly = coarse.assign_coords(
        time=xr.date_range("2001-01-01", periods=coarse.sizes["time"], freq="6h")
    )
    with pytest.raises(InputError, match="daily"):
        six_hourly.downscale.cm(model=cm_model.path)


def test_error_wrong_method_for_model_and_bad_arguments(cm_model, coarse):
    with pytest.raises(InputError, match="'cm' model"):
        coarse.downscale.sde(model=cm_model.path)
    with pytest.raises(InputError, match="members"):
        coarse.downscale.cm(model=cm_model.path, members=0)
    with pytest.raises(InputError, match="Dataset"):
        xdownscale.downscale(coarse.to_dataset(), model=cm_model.path)
    with pytest.raises(InputError, match="hist="):
        coarse.downscale.cm(model=cm_model.path, qdm=True, hist=slice("1800", "1801"))


def test_spatially_chunked_input_is_rechunked_with_a_warning(cm_model, coarse):
    x = coarse.isel(time=slice(0, 2)).chunk({"lat": 2})
    with pytest.warns(PerformanceWarning, match="horizontal"):
        out = x.downscale.cm(model=cm_model.path, scale="200 km")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isfinite(out.values[:, cm_model.grid["mask"].values]).all()


def test_local_cluster_gives_the_same_result(cm_model, coarse):
    """Two worker processes, each loading the model from its path: the same fields as in-process, to
    float rounding (the workers run torch on one thread, the test process on two)."""
    distributed = pytest.importorskip("distributed")
    x = coarse.isel(time=slice(0, 6))
    kwargs = dict(model=cm_model.path, scale="200 km", members=2, seed=5, precision="fp32", batch_size=4)
    ref = x.downscale.cm(progress=False, **kwargs).values
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.wait_for_workers(2)
        out = x.chunk({"time": 2}).downscale.cm(**kwargs).compute()
        # nthreads() asks the scheduler and raises if it cannot; scheduler_info() can return a stale
        # cache with no workers when the scheduler is slow to answer (distributed 2026.8).
        assert sorted(client.nthreads().values()) == [1, 1]
    np.testing.assert_allclose(out.values, ref, rtol=2e-6, atol=0)
    other_seed = x.chunk({"time": 2}).downscale.cm(**{**kwargs, "seed": 6}).compute()
    assert not np.allclose(other_seed.values, ref, equal_nan=True)


def test_an_unknown_precision_is_refused_before_any_work(cm_model, coarse):
    with pytest.raises(InputError, match=r"precision='fp16': expected one of 'auto', 'fp32', 'bf16'"):
        coarse.isel(time=slice(0, 1)).downscale.cm(model=cm_model.path, precision="fp16", progress=False)


def test_explicit_noise_level_beyond_the_target_spectrum(cm_model, coarse):
    out = coarse.isel(time=slice(0, 1)).downscale.cm(model=cm_model.path, scale="sigma=20", progress=False)
    assert out.attrs["downscale_scale_sigma"] == pytest.approx(20.0)
    assert "beyond" in out.attrs["downscale_scale"]
    with pytest.raises(InputError, match="outside the model's range"):
        coarse.isel(time=slice(0, 1)).downscale.cm(model=cm_model.path, scale="sigma=500", progress=False)


def test_bf16_fast_path_agrees_with_fp32(cm_model, coarse):
    """The bf16 autocast path (the default on CUDA and on CPUs with native bf16) agrees with fp32 to
    the documented tolerance: 2e-2 in the model's transformed space."""
    x = coarse.isel(time=slice(0, 2))
    kwargs = dict(model=cm_model.path, scale="200 km", members=2, seed=0, progress=False)
    fp32 = x.downscale.cm(precision="fp32", **kwargs)
    bf16 = x.downscale.cm(precision="bf16", **kwargs)
    t32 = cm_model.transform.forward(xdownscale.convert_units(fp32, cm_model.variable["units"]))
    t16 = cm_model.transform.forward(xdownscale.convert_units(bf16, cm_model.variable["units"]))
    assert float(abs(t32 - t16).max()) < 2e-2


def test_a_model_file_is_read_and_hashed_once_per_process(cm_model, coarse, tmp_path, monkeypatch):
    import os
    import shutil

    import xdownscale.models.model as model_module
    from xdownscale.models import load_model, resolve_model

    for suffix in (".json", ".safetensors"):
        shutil.copy(cm_model.path.with_suffix(suffix), tmp_path / f"{cm_model.name}{suffix}")
    path = tmp_path / f"{cm_model.name}.json"
    reads = []
    real = model_module.read_safetensors

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        reads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module, "read_safetensors", counting)
    x = coarse.isel(time=slice(0, 2))
    first = x.downscale.cm(model=path, scale="200 km", seed=1, progress=False)
    second = x.chunk({"time": 1}).downscale.cm(model=str(path), scale="200 km", seed=1).compute()
    np.testing.assert_allclose(second.values, first.values, rtol=2e-6)
    assert len(reads) == 1  # resolving the name, every call, the network that runs: one read
    assert resolve_model(path) is resolve_model(str(path))
    assert load_model(path) is not resolve_model(path)  # load_model: a copy of one's own
    assert len(reads) == 2
    weights = path.with_suffix(".safetensors")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    resolve_model(path)  # a changed file is read again
    assert len(reads) == 3


def test_error_an_assimilation_model_cannot_downscale(coarse):
    with pytest.raises(
        InputError, match="'slams' \\(data assimilation\\) model; downscaling needs a 'cm' or 'sde'"
    ):
        coarse.downscale.cm(model="slams-eobs-iberia-0.25deg-pr", scale="200 km")


def test_error_spatial_chunks_that_cannot_be_merged(cm_model, coarse, monkeypatch):
    import xdownscale.preparation as preparation
    from xdownscale.errors import ChunkingError

    monkeypatch.setattr(preparation, "MAX_FIELD_BYTES", 16)
    with pytest.raises(ChunkingError, match="too large to become one chunk"):
        coarse.chunk({"lat": 2}).downscale.cm(model=cm_model.path, scale="200 km")


def _block_means(da: xr.DataArray, factor: int = 4) -> np.ndarray:
    return da.coarsen(lat=factor, lon=factor, boundary="trim").mean().values


def test_preserve_keeps_the_inputs_means_over_its_cells(cm_model, coarse):
    """Default for precipitation: over every input cell the output's mean (over the cell's land) is the
    input's value there, to round-off; neither the network's own output nor the bilinear regridding
    (whose cell means mix in the neighbours') meets them."""
    x = coarse.isel(time=slice(0, 6))
    out = x.downscale.cm(model=cm_model.path, scale="200 km", members=2, progress=False)
    raw = x.downscale.cm(model=cm_model.path, scale="200 km", members=2, progress=False, preserve=False)
    bilinear = x.downscale.prepare(model=cm_model.path, transform=False) / 86400.0  # to kg m-2 s-1
    land = _block_means(xr.ones_like(out.isel(member=0)).where(cm_model.grid["mask"]))
    want = np.where(np.isfinite(land), x.values[:, : land.shape[1], : land.shape[2]], np.nan)
    for m in range(2):
        got = _block_means(out.isel(member=m))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
    for other in (raw.isel(member=0), bilinear.where(cm_model.grid["mask"])):
        assert np.nanmax(np.abs(_block_means(other) - want)) > 1e-3 * np.nanmax(want)
    assert out.attrs["downscale_preserve"] == "mean" and "preserve 'mean'" in out.attrs["history"]
    assert raw.attrs["downscale_preserve"] == "none"
    assert (out.values[np.isfinite(out.values)] >= 0).all()
    np.testing.assert_array_equal(np.isnan(out.values), np.isnan(raw.values))


def test_smooth_mean_keeps_the_regridded_inputs_means(cm_model, coarse):
    """preserve='smooth-mean': over every input cell the output's mean is the regridded input's there."""
    x = coarse.isel(time=slice(0, 6))
    out = x.downscale.cm(model=cm_model.path, scale="200 km", progress=False, preserve="smooth-mean")
    bilinear = x.downscale.prepare(model=cm_model.path, transform=False) / 86400.0  # to kg m-2 s-1
    want = _block_means(bilinear.where(cm_model.grid["mask"]))
    np.testing.assert_allclose(_block_means(out), want, rtol=1e-5, atol=1e-12)
    assert out.attrs["downscale_preserve"] == "smooth-mean"
    assert (out.values[np.isfinite(out.values)] >= 0).all()


def test_preserve_with_qdm_keeps_the_inputs_means_times_the_corrections_change(cm_model, coarse):
    """preserve='mean' with QDM: each input cell's mean is its value times the relative change QDM made
    over the cell. The default with QDM is 'smooth-mean' (QDM is fitted on the regridded field)."""
    x = coarse.isel(time=slice(0, 12))
    hist = (x * 0.8).assign_attrs(x.attrs)  # a dry-biased historical run: QDM scales values up
    kwargs = {"model": cm_model.path, "qdm": True, "hist": hist}
    out = x.downscale.cm(scale="200 km", progress=False, seed=0, preserve="mean", **kwargs)
    default = x.downscale.cm(scale="200 km", progress=False, seed=0, **kwargs)
    assert default.attrs["downscale_preserve"] == "smooth-mean"
    assert out.attrs["downscale_preserve"] == "mean"
    mask = cm_model.grid["mask"]
    before = x.downscale.prepare(model=cm_model.path, transform=False).where(mask)
    after = x.downscale.prepare(transform=False, **kwargs).where(mask)
    change = _block_means(after) / _block_means(before)
    want = x.values[:, : change.shape[1], : change.shape[2]] * change
    ok = np.isfinite(want) & (_block_means(before) > 0)
    np.testing.assert_allclose(_block_means(out)[ok], want[ok], rtol=2e-4)
    assert np.nanmean(change) > 1.1  # the correction did change the means


def test_a_wetter_input_gives_an_equally_wetter_output(cm_model, coarse):
    """The climate signal passes through: +20% input, +20% output (domain mean), with preserve."""
    x = coarse.isel(time=slice(0, 4))
    a = x.downscale.cm(model=cm_model.path, scale="200 km", progress=False)
    b = (x * 1.2).assign_attrs(x.attrs).downscale.cm(model=cm_model.path, scale="200 km", progress=False)
    assert float(b.mean()) / float(a.mean()) == pytest.approx(1.2, rel=1e-4)


def test_a_wetter_input_gives_an_equally_wetter_output_with_qdm(cm_model, coarse):
    """With QDM the signal passes through its multiplicative delta: a future 20% wetter than the
    historical run comes out 20% wetter than the historical run downscaled, within 2%."""
    hist = coarse.isel(time=slice(0, 12))
    kwargs = {"model": cm_model.path, "scale": "200 km", "qdm": True, "hist": hist, "progress": False}
    a = hist.downscale.cm(**kwargs)
    b = (hist * 1.2).assign_attrs(hist.attrs).downscale.cm(**kwargs)
    assert float(b.mean()) / float(a.mean()) == pytest.approx(1.2, rel=0.02)


def test_preserve_lazy_equals_eager(cm_model, coarse):
    x = coarse.isel(time=slice(0, 6))
    eager = x.downscale.cm(model=cm_model.path, scale="200 km", progress=False)
    lazy = x.chunk({"time": 4}).downscale.cm(model=cm_model.path, scale="200 km")
    assert lazy.chunks is not None
    np.testing.assert_allclose(lazy.values, eager.values, rtol=1e-6, atol=1e-12)


def test_error_bad_preserve(cm_model, coarse):
    with pytest.raises(InputError, match=r"preserve='median'.*True, False, 'mean', 'smooth-mean' or"):
        coarse.downscale.cm(model=cm_model.path, scale="200 km", preserve="median", progress=False)


def test_a_loaded_model_moved_to_an_accelerator_runs_there(cm_model, coarse):
    import torch

    loaded = xdownscale.load_model(cm_model.path)
    assert xdownscale.models.resolve_model(loaded) is loaded
    # where the user put it; there is no CUDA here, so the refusal shows that the placement is used
    loaded.device = torch.device("cuda")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match=r"device='cuda' was requested but torch sees no CUDA device"):
            coarse.downscale.cm(model=loaded, scale="200 km", progress=False)
    out = coarse.isel(time=[0]).downscale.cm(model=loaded, scale="200 km", progress=False, device="cpu")
    assert out.sizes["time"] == 1
    with pytest.raises(InputError, match=r"model=3 is not a model name, a path to a model"):
        xdownscale.models.resolve_model(3)


def test_output_far_outside_the_training_range_is_flagged(cm_model, coarse):
    """An undertrained model or an out-of-distribution input: values beyond twice the training maximum."""
    x = coarse.isel(time=slice(0, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", xdownscale.errors.XDownscaleWarning)
        x.downscale.cm(model=cm_model.path, scale="200 km", progress=False)  # in range: silent
    huge = (x * 500.0).assign_attrs(x.attrs)  # the synthetic training data reach 1300 mm/day
    top = cm_model.transform.data_max
    with pytest.warns(
        xdownscale.errors.XDownscaleWarning, match=r"far outside model 'tiny-cm''s training range"
    ):
        huge.downscale.cm(model=cm_model.path, scale="200 km", progress=False)
    lazy = huge.chunk({"time": 1}).downscale.cm(model=cm_model.path, scale="200 km")
    with pytest.warns(xdownscale.errors.XDownscaleWarning, match=rf"training range \[0, {top:.4g}\]"):
        lazy.compute()


def test_generated_amounts_below_the_training_datas_smallest_positive_value_are_dry(
    cm_model, coarse, fine_data
):
    """The network never saw amounts between 0 and ``wet_min``; what lands there is drizzle from ``exp``."""
    import copy

    x = coarse.isel(time=slice(0, 4))
    kwargs = {"scale": "200 km", "members": 2, "seed": 0, "progress": False, "preserve": False}
    model = copy.deepcopy(xdownscale.load_model(cm_model.path))
    model.transform.wet_min = None  # as a card written before wet_min was stored: the plain inverse
    plain = x.downscale.cm(model=model, **kwargs) * 86400.0
    model.transform.wet_min = 0.5  # mm/day, the units of the model
    dried = x.downscale.cm(model=model, **kwargs) * 86400.0
    p, d = plain.values, dried.values
    assert ((p > 0) & (p < 0.5)).sum() > 0  # there was drizzle to remove
    assert np.array_equal(np.isnan(p), np.isnan(d))
    wet, dry = p >= 0.5, p < 0.5 * (1 - 1e-4)
    np.testing.assert_allclose(d[wet], p[wet], rtol=1e-5)
    assert (d[dry] < 1e-9).all()
    # with preserve (the default) the drizzle moves onto the wet cells: the coarse means do not change
    kwargs["preserve"] = True
    kept = x.downscale.cm(model=model, **kwargs).values * 86400.0
    model.transform.wet_min = None
    plain = x.downscale.cm(model=model, **kwargs).values * 86400.0
    assert ((kept > 1e-9) & (kept < 0.5 * (1 - 1e-4))).sum() < ((plain > 0) & (plain < 0.5)).sum() / 3
    factor = 4  # the coarse field is the fine one averaged over 4 x 4 blocks
    blocks = [np.nanmean(a.reshape(*a.shape[:2], 4, factor, 6, factor), axis=(3, 5)) for a in (kept, plain)]
    np.testing.assert_allclose(blocks[0], blocks[1], rtol=1e-4, atol=1e-6)
    # training stores it: the smallest positive amount of the training days (a subset of fine_data)
    assert cm_model.transform.wet_min >= float(fine_data.where(fine_data > 0).min()) > 0
