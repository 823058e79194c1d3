"""Inference on blocks of fields: keyed noise drawn ahead, fixed-size (padded) batches, staging, the compile
policy, and that every path gives the same sample within bf16 tolerance. CUDA-only paths have CPU
equivalents here; the CUDA runs themselves are marked ``gpu``."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import xdownscale
from xdownscale.core.rng import KeyedNoise
from xdownscale.errors import InputError
from xdownscale.models import inference
from xdownscale.models.inference import PrefetchedNoise, compile_policy, denoise_block, network_runner

SHIPPED = "cm-eobs-iberia-0.25deg-pr"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def shipped() -> object:
    return xdownscale.load_model(SHIPPED)


def _fields(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(0.0, 0.5, (n, 41, 61)).astype(np.float32)
    x[:, :3, :4] = np.nan  # masked cells come back NaN
    return x


def _run(model: object, x: np.ndarray, **kw: object) -> np.ndarray:
    args: dict = dict(
        model_path=str(model.path),  # type: ignore[attr-defined]
        sha256=model.sha256,  # type: ignore[attr-defined]
        method="cm",
        sigma=1.0,
        steps=1,
        seed=3,
        members=1,
        device="cpu",
        batch_size=4,
        precision="fp32",
        compile="never",
    )
    args.update(kw)
    keys = np.arange(100, 100 + x.shape[0], dtype=np.int64)
    return denoise_block(x, keys, **args)


def test_prefetched_noise_is_keyed_noise_with_zero_padding() -> None:
    keys = [11, 12, 13]
    expected = KeyedNoise(keys, seed=5, shape=(1, 6, 7))
    with ThreadPoolExecutor(1) as pool:
        noise = PrefetchedNoise(
            keys, seed=5, shape=(1, 6, 7), batch_size=5, draws=3, device=torch.device("cpu"), pool=pool
        )
        noise.prefetch(0)
        for i in range(3):
            z = noise(i)
            assert z.shape == (5, 1, 6, 7)
            torch.testing.assert_close(z[:3], expected(i), rtol=0, atol=0)
            assert not z[3:].any()
        assert not noise._pending  # nothing drawn past the last draw the sampler asks for
        noise.close()


def test_padded_fixed_size_batches_give_the_same_samples(shipped: object) -> None:
    """The compiled path pads the last batch to the graph's batch size: the real samples do not change.
    Run here with the eager network, which is what the padding has to agree with."""
    x = _fields(7)
    net = shipped.network  # type: ignore[attr-defined]
    host = torch.from_numpy(np.nan_to_num(x))[:, None]
    outs = []
    for fixed in (False, True):
        out = np.empty((7, 1, 41, 61), dtype=np.float32)
        job = inference._Job(
            host=host,
            out=out,
            keys=list(range(7)),
            members=1,
            method="cm",
            sigma=1.0,
            steps=1,
            seed=0,
            precision="fp32",
            draws=1,
            pool=None,
            progress=None,
        )
        job.run(net, 4, fixed, inference._Stager(torch.device("cpu"), 4, (1, 41, 61), out))
        assert job.done == 7
        outs.append(out)
    np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-5)


def test_members_batches_and_noise_pool_do_not_change_samples(shipped: object) -> None:
    x = _fields(5)
    a = _run(shipped, x, members=3, batch_size=4)
    b = _run(shipped, x, members=3, batch_size=15)
    assert a.shape == (5, 3, 41, 61)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert np.isnan(a[:, :, :3, :4]).all() and np.isfinite(a[:, :, 3:]).all()
    # member m of field t is the sample keyed (seed, time, m): the one-member run is member 0
    np.testing.assert_allclose(_run(shipped, x, batch_size=2)[:, 0], a[:, 0], rtol=0, atol=1e-5)
    # the CUDA path draws noise ahead in a thread: the same numbers
    with ThreadPoolExecutor(1) as pool:
        job = inference._Job(
            host=torch.from_numpy(np.nan_to_num(x))[:, None],
            out=np.empty((5, 1, 41, 61), dtype=np.float32),
            keys=[xdownscale.core.rng.sample_key(100 + t, 0) for t in range(5)],
            members=1,
            method="cm",
            sigma=1.0,
            steps=1,
            seed=3,
            precision="fp32",
            draws=1,
            pool=pool,
            progress=None,
        )
        stager = inference._Stager(torch.device("cpu"), 2, (1, 41, 61), job.out)
        job.run(shipped.network, 2, False, stager)  # type: ignore[attr-defined]
    np.testing.assert_allclose(np.where(np.isnan(a[:, 0]), np.nan, job.out[:, 0]), a[:, 0], rtol=0, atol=1e-5)


def test_sde_block_runs_with_its_extra_draws(sde_model: object) -> None:
    ny, nx = sde_model.shape  # type: ignore[attr-defined]
    x = np.random.default_rng(1).normal(0, 0.5, (3, ny, nx)).astype(np.float32)
    kw = dict(method="sde", steps=4, sigma=0.5)
    a = _run(sde_model, x, batch_size=2, **kw)
    b = _run(sde_model, x, batch_size=3, **kw)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


def test_a_pooled_thread_follows_the_callers_thread_count() -> None:
    """OpenMP fixes a thread's count at its first parallel op: a pooled (dask) thread kept the count of
    its first job, so a later job ran with other reductions (last bits) and speed than the caller's."""
    before = torch.get_num_threads()

    def run(threads: int | None) -> int:
        if threads is not None:
            inference.use_threads(threads)
        torch.ones(64, 64) @ torch.ones(64, 64)
        return torch.get_num_threads()

    try:
        with ThreadPoolExecutor(1) as pool:
            torch.set_num_threads(1)
            assert pool.submit(run, None).result() == 1
            torch.set_num_threads(2)
            assert pool.submit(run, None).result() == 1  # the stale count
            assert pool.submit(run, 2).result() == 2
    finally:
        torch.set_num_threads(before)


def test_compile_policy_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDOWNSCALE_COMPILE", raising=False)
    assert compile_policy() == "auto"
    monkeypatch.setenv("XDOWNSCALE_COMPILE", " Never ")
    assert compile_policy() == "never"
    assert compile_policy("always") == "always"
    monkeypatch.setenv("XDOWNSCALE_COMPILE", "sometimes")
    with pytest.raises(InputError, match=r"'sometimes' .* is not one of .*XDOWNSCALE_COMPILE=auto"):
        compile_policy()


def test_auto_never_compiles_on_the_cpu_or_a_small_cuda_job(shipped: object) -> None:
    net = shipped.network  # type: ignore[attr-defined]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert network_runner(shipped, cpu, 8, (41, 61), 10**9, "auto") == (net, False)
    assert network_runner(shipped, cuda, 8, (41, 61), 10, "auto") == (net, False)
    assert network_runner(shipped, cpu, 8, (41, 61), 10**9, "never") == (net, False)


def test_compiled_runner_shares_weights_and_leaves_the_model_alone(shipped: object) -> None:
    net = shipped.network  # type: ignore[attr-defined]
    runner, fixed = network_runner(shipped, torch.device("cpu"), 3, (5, 7), 1, "always")
    try:
        assert fixed and runner is not net
        assert isinstance(runner.net, inference._CompiledBackbone)
        assert not isinstance(net.net, inference._CompiledBackbone)
        assert runner.net.compiled._orig_mod is net.net
        assert network_runner(shipped, torch.device("cpu"), 3, (5, 7), 1, "auto")[0] is runner  # warm
    finally:
        inference._RUNNERS.clear()


@pytest.mark.slow
def test_every_path_gives_the_same_sample_within_bf16_tolerance(shipped: object) -> None:
    """fp32 eager, bf16 eager, and compiled (padded fixed-size batches: 5 fields in batches of 3) agree
    within bf16 tolerance (about 1e-2 relative in the transformed space). Compiling on the CPU takes
    about a minute; the compiled bf16 path is checked on CUDA (``gpu`` tests)."""
    x = _fields(5)
    ref = _run(shipped, x)
    finite = np.isfinite(ref)
    scale = float(np.abs(ref[finite]).max())
    try:
        for kw in ({"precision": "bf16"}, {"compile": "always", "batch_size": 3}):
            got = _run(shipped, x, **kw)
            assert np.array_equal(np.isfinite(got), finite)
            err = float(np.abs(got[finite] - ref[finite]).max())
            assert err <= 2e-2 * scale, (kw, err)
    finally:
        inference._RUNNERS.clear()


@pytest.mark.gpu
@needs_cuda
def test_cuda_block_agrees_with_the_cpu_within_bf16_tolerance(shipped: object) -> None:
    x = _fields(70)
    ref = _run(shipped, x)
    finite = np.isfinite(ref)
    scale = float(np.abs(ref[finite]).max())
    for kw in (
        {"precision": "fp32"},
        {"precision": "bf16"},
        {"precision": "bf16", "compile": "always", "batch_size": 32},
        {"precision": "bf16", "members": 2, "batch_size": 64},
    ):
        got = _run(shipped, x, device="cuda", **kw)
        got = got[:, :1] if got.shape[1] > 1 else got
        assert np.array_equal(np.isfinite(got), finite)
        assert float(np.abs(got[finite] - ref[finite]).max()) <= 2e-2 * scale, kw
    inference._RUNNERS.clear()


@pytest.mark.gpu
@needs_cuda
def test_cuda_stager_round_trip() -> None:
    out = np.zeros((5, 1, 3, 4), dtype=np.float32)
    stager = inference._Stager(torch.device("cuda"), 2, (1, 3, 4), out)
    data = torch.arange(60, dtype=torch.float32).reshape(5, 1, 3, 4)
    for start in range(0, 5, 2):
        stop = min(start + 2, 5)
        on_device = stager.upload(data[start:stop])
        assert on_device.is_cuda
        stager.download(on_device * 2, slice(start, stop))
    stager.finish()
    np.testing.assert_array_equal(out, 2 * data.numpy())
