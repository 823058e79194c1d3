"""The device route (the whole chain around the network in torch, per batch) against the xarray route:
its operators against their numpy versions, and whole downscalings, which must agree to float rounding
(float32 preparation against float64)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import scipy.fft
import torch
import xarray as xr

import xdownscale
from xdownscale.core import regrid_weights as rw
from xdownscale.core.fieldops import Lowpass, Regrid, dct_matrix
from xdownscale.core.spectra import lowpass_filter
from xdownscale.datasets import coarsen_like_esm, global_grid, synthetic_temperature
from xdownscale.errors import InputError
from xdownscale.ondevice import POLICY_ENV, merged_chunks, pipeline_policy

DEMO = Path(xdownscale.__file__).parent / "data" / "demo_coarse_pr.nc"
SHIPPED = "cm-eobs-iberia-0.25deg-pr"
F64 = torch.float64


def _run(da: xr.DataArray, route: str, monkeypatch: pytest.MonkeyPatch, **kw: object) -> xr.DataArray:
    monkeypatch.setenv(POLICY_ENV, route)
    kw = {"scale": "auto", "progress": False, "precision": "fp32", "members": 2, **kw}
    out = da.downscale.cm(**kw)  # type: ignore[arg-type]
    return out.load()


def _agree(host: xr.DataArray, device: xr.DataArray, rtol: float = 2e-5) -> None:
    """Same dims, coords, NaN and attributes (but the time stamp); values to ``rtol`` of the largest."""
    assert host.dims == device.dims
    xr.testing.assert_equal(host.isnull(), device.isnull())
    top = float(np.abs(host).max())
    assert top > 0
    np.testing.assert_allclose(device.values, host.values, rtol=0, atol=rtol * top)
    without = {k: v for k, v in host.attrs.items() if k != "history"}
    assert without == {k: v for k, v in device.attrs.items() if k != "history"}


# -- operators -------------------------------------------------------------------------------------------


def test_the_dct_matrix_is_scipys_orthonormal_dct() -> None:
    x = np.random.default_rng(0).standard_normal((5, 7))
    c = dct_matrix(7)
    np.testing.assert_allclose(x @ c.T, scipy.fft.dct(x, type=2, norm="ortho", axis=-1), atol=1e-12)
    np.testing.assert_allclose(c @ c.T, np.eye(7), atol=1e-12)


@pytest.mark.parametrize("method", ["bilinear", "conservative"])
@pytest.mark.parametrize("periodic", [False, True])
def test_regrid_matches_the_numpy_weights(method: str, periodic: bool) -> None:
    rng = np.random.default_rng(1)
    if periodic:  # global: wrap-around, and for bilinear the pole rows
        src_lat, src_lon = global_grid(10.0).lat.values, global_grid(10.0).lon.values
        tgt_lat, tgt_lon = global_grid(2.5).lat.values, global_grid(2.5).lon.values
    else:  # regional: the target reaches past the source, so edge cells are dropped
        src_lat, src_lon = np.arange(30.0, 46.0, 2.0), np.arange(-10.0, 6.0, 2.0)
        tgt_lat, tgt_lon = np.arange(29.25, 46.5, 0.5), np.arange(-10.75, 6.5, 0.5)
    weights = rw.separable_weights(
        src_lat, src_lon, tgt_lat, tgt_lon, method, src_periodic=periodic, tgt_periodic=periodic
    )
    x = rng.gamma(0.8, 3.0, (3, src_lat.size, src_lon.size))
    expected = weights.apply(x, 0.5)
    op = Regrid.from_weights(weights, 0.5).to("cpu", F64)
    got = op(torch.as_tensor(x)).numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    assert np.isnan(expected).any() != periodic
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    if periodic and method == "bilinear":
        assert op.poles, "the pole rows' zonal means are part of the operator"


def test_regrid_with_point_weights_is_a_sparse_product() -> None:
    rng = np.random.default_rng(2)
    matrix = rng.random((12, 20)) * (rng.random((12, 20)) < 0.3)
    matrix[0] = 0.0  # a target cell nothing covers
    weights = rw.PointWeights.from_matrix(matrix, (4, 5), (3, 4))
    x = rng.standard_normal((2, 4, 5))
    got = Regrid.from_weights(weights, 0.5).to("cpu", F64)(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(got, weights.apply(x, 0.5), rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("periodic_x", [False, True])
@pytest.mark.parametrize("with_nan", [False, True])
def test_lowpass_matches_the_numpy_filter(periodic_x: bool, with_nan: bool) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 20, 32))
    nan = np.zeros((20, 32), dtype=bool)
    if with_nan:
        nan[:4, :5] = nan[-2:, 10:20] = True
        x[:, nan] = np.nan
    expected = lowpass_filter(x, 0.15, periodic=(False, periodic_x))
    op = Lowpass.build((20, 32), 0.15, periodic_x=periodic_x, nan=nan).to("cpu", F64)
    got = op(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10, equal_nan=True)


def test_a_lowpass_past_the_corner_is_the_identity() -> None:
    op = Lowpass.build((4, 6), 0.8, periodic_x=False).to("cpu", F64)
    x = torch.randn(2, 4, 6, dtype=F64)
    assert op.identity and op(x) is x


# -- the route --------------------------------------------------------------------------------------------


def test_the_policy_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(POLICY_ENV, raising=False)
    assert pipeline_policy() == "auto"
    monkeypatch.setenv(POLICY_ENV, " Device ")
    assert pipeline_policy() == "device"
    monkeypatch.setenv(POLICY_ENV, "gpu")
    with pytest.raises(InputError, match=r"XDOWNSCALE_PIPELINE='gpu'.*auto, device, host"):
        pipeline_policy()


def test_auto_keeps_the_cpu_on_the_xarray_route(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(POLICY_ENV, raising=False)
    da = xr.open_dataarray(DEMO)
    plan = da.downscale.plan(model=SHIPPED, scale="300 km", progress=False)
    assert plan.device == "cpu" and not plan.on_device
    monkeypatch.setenv(POLICY_ENV, "device")
    assert plan.on_device
    assert not plan.__class__(**{**plan.__dict__, "preserve": "mean", "qdm": object()}).on_device


@pytest.mark.parametrize("preserve", [False, True, "smooth-mean"])
def test_the_shipped_cm_gives_the_same_fields_on_both_routes(
    preserve: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    da = xr.open_dataarray(DEMO)
    host = _run(da, "host", monkeypatch, model=SHIPPED, preserve=preserve)
    device = _run(da, "device", monkeypatch, model=SHIPPED, preserve=preserve)
    _agree(host, device)
    if preserve is True:  # the input's cell means, exactly, on the device route too
        assert device.attrs["downscale_preserve"] == "mean"


def test_the_sde_bridge_takes_the_device_route_too(monkeypatch: pytest.MonkeyPatch) -> None:
    da = xr.open_dataarray(DEMO).isel(time=slice(0, 3))
    kw = {
        "model": "sde-eobs-iberia-0.25deg-pr",
        "scale": "300 km",
        "steps": 3,
        "members": 2,
        "progress": False,
    }
    monkeypatch.setenv(POLICY_ENV, "host")
    host = da.downscale.sde(precision="fp32", **kw).load()
    monkeypatch.setenv(POLICY_ENV, "device")
    device = da.downscale.sde(precision="fp32", **kw).load()
    _agree(host, device)


def test_the_device_route_prepares_nothing_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager input, a given scale: no field is regridded with numpy (the plan's preparation stays lazy)."""
    calls: list[tuple[int, ...]] = []
    apply = rw.Weights.apply

    def counted(self: rw.Weights, x: np.ndarray, mask_threshold: float = 0.5) -> np.ndarray:
        calls.append(np.shape(x))
        return apply(self, x, mask_threshold)

    monkeypatch.setattr(rw.Weights, "apply", counted)
    da = xr.open_dataarray(DEMO)
    _run(da, "device", monkeypatch, model=SHIPPED, scale="300 km")
    assert calls and all(len(shape) == 2 for shape in calls)  # the domain checks' single grids only
    calls.clear()
    _run(da, "host", monkeypatch, model=SHIPPED, scale="300 km")
    assert (8, 10, 14) in calls  # the xarray route regrids the 8 fields


@pytest.mark.parametrize(
    ("chunks", "least", "merged"),
    [((10, 10, 10, 5), 24, (35,)), ((64, 64, 20), 32, (64, 84)), ((3,), 8, (3,)), ((4, 4), 4, (4, 4))],
)
def test_small_time_chunks_are_merged_into_full_batches(
    chunks: tuple[int, ...], least: int, merged: tuple[int, ...]
) -> None:
    result = merged_chunks(chunks, least)
    assert result == merged and sum(result) == sum(chunks)


def test_lazy_input_and_a_lazy_auto_scale_agree_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 3 days, batches of 8 samples (4 fields of 2 members): the device route computes blocks
    of 4 or more fields and gives the caller's chunks back."""
    da = xr.open_dataarray(DEMO).chunk({"time": 3})
    host = _run(da, "host", monkeypatch, model=SHIPPED)
    monkeypatch.setenv(POLICY_ENV, "device")
    device_lazy = da.downscale.cm(model=SHIPPED, scale="auto", progress=False, precision="fp32", members=2)
    assert device_lazy.chunksizes["time"] == (3, 3, 2)
    graph = dict(device_lazy.data.__dask_graph__())
    assert len([k for k in graph if isinstance(k, tuple) and str(k[0]).startswith("block-")]) == 1
    _agree(host, device_lazy.load())


def test_bias_corrected_input_goes_to_the_device_as_fine_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    da = xr.open_dataarray(DEMO)
    host = _run(da, "host", monkeypatch, model=SHIPPED, qdm=True)
    device = _run(da, "device", monkeypatch, model=SHIPPED, qdm=True)
    assert device.attrs["downscale_preserve"] == "smooth-mean"
    _agree(host, device)


def test_a_missing_day_stays_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    da = xr.open_dataarray(DEMO).copy()
    da[2] = np.nan
    host = _run(da, "host", monkeypatch, model=SHIPPED)
    device = _run(da, "device", monkeypatch, model=SHIPPED)
    assert bool(device.isel(time=2).isnull().all())
    _agree(host, device)


def test_a_temperature_model_keeps_the_lowpass_rule_on_the_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tas = synthetic_temperature(ny=16, nx=24, ntime=24, seed=1, mask=True, units="K")
    tas.name = "tas"
    path = xdownscale.train(
        kind="cm", data=tas, variable="tas", out=tmp_path, name="tiny-tas-route", steps=3, batch_size=4,
        channels=(8, 16), checkpoint_every=None, progress=False, val_fraction=0.0,
    )  # fmt: skip
    coarse = coarsen_like_esm(tas.fillna(float(tas.mean())), factor=4).isel(time=slice(0, 5))
    host = _run(coarse, "host", monkeypatch, model=path, scale="200 km")
    device = _run(coarse, "device", monkeypatch, model=path, scale="200 km")
    assert device.attrs["downscale_preserve"] == "lowpass"
    _agree(host, device, rtol=1e-5)


def test_a_global_periodic_grid_agrees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Wrap-around in longitude, bilinear pole rows and the periodic low-pass, on bench_gpu's fields."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", script)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    fine = bench.global_field(16, 24, ntime=6)
    paths = bench.make_models(tmp_path, fine, (8, 16), "cpu")
    coarse = bench.coarse_input(fine, 5)
    host = _run(coarse, "host", monkeypatch, model=paths["cm"], scale="sigma=1.0")
    device = _run(coarse, "device", monkeypatch, model=paths["cm"], scale="sigma=1.0")
    _agree(host, device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("qdm", [False, True])
def test_on_cuda_the_whole_chain_gives_the_cpus_fields(qdm: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default on CUDA (the device route, preserve by conjugate gradients) against the CPU's xarray
    route; fp32, with cuDNN's TF32 convolutions the only other difference."""
    da = xr.open_dataarray(DEMO)
    host = _run(da, "host", monkeypatch, model=SHIPPED, qdm=qdm, device="cpu")
    monkeypatch.delenv(POLICY_ENV)
    cuda = da.downscale.cm(
        model=SHIPPED, scale="auto", progress=False, precision="fp32", members=2, qdm=qdm, device="cuda"
    )
    _agree(host, cuda, rtol=5e-3)


def test_a_pipelines_token_sees_every_array() -> None:
    """The device keeps operators per token: pipelines that differ anywhere must not share one."""
    from xdownscale.models.pipeline import FieldPipeline

    mask = np.ones((4, 6), dtype=bool)
    op = Lowpass.build((4, 6), 0.2, periodic_x=False)
    base = dict(fine_shape=(4, 6), mask=mask, eps=1.0, lo=0.0, hi=3.0, log=True, lowpass=op)
    token = FieldPipeline(**base).token
    assert FieldPipeline(**base).token == token
    other_mask = mask.copy()
    other_mask[0, 0] = False
    assert FieldPipeline(**{**base, "mask": other_mask}).token != token
    assert FieldPipeline(**{**base, "lowpass": Lowpass.build((4, 6), 0.21, periodic_x=False)}).token != token
    weights = rw.PointWeights.from_matrix(np.eye(24)[::-1].copy(), (4, 6), (4, 6))
    flipped = Regrid.from_weights(weights, 0.5)
    same = Regrid.from_weights(rw.PointWeights.from_matrix(np.eye(24), (4, 6), (4, 6)), 0.5)
    assert FieldPipeline(**base, regrid=flipped).token != FieldPipeline(**base, regrid=same).token
