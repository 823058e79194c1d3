"""Run a loaded model on blocks of prepared fields: numpy in, numpy out.

This is where the downscaling pipeline runs the network (the other torch code after the network is
``preserve``'s correction, :mod:`xdownscale.core.preserve`, on the same device). The xarray side (``api.py``)
maps :func:`denoise_block` over time chunks; each process loads a model once from its file
(:func:`cached_model`), so models are never shipped inside a dask task graph.

Noise is keyed by ``(seed, time stamp, member)`` through :class:`xdownscale.core.rng.KeyedNoise`, so a
field's sample never depends on the chunk, batch or worker it was computed in.

Keeping the device fed (CUDA): the block is staged through two page-locked host buffers per direction
(the copy of batch ``k + 1`` to the device and of batch ``k - 1`` back overlap with batch ``k`` on the
GPU), the keyed noise of the next draw is drawn on the CPU in a background thread while the GPU runs
(:class:`PrefetchedNoise`), results are copied back with one strided copy per batch, and the network runs
in NCHW layout on every device. Measured: on an H200 (bf16, paper UNet at 240 x 384) channels-last ran at
110 fields/s against 154 for NCHW, because GroupNorm on channels-last tensors copies every activation; on
a 2-core AVX-512 CPU (fp32, the shipped 41 x 61 UNet) the two were within noise (9.9 vs 10.3 ms per field
at batch 8), so the CPU keeps the simpler layout too.

The network can be compiled (:func:`compile_policy`): with CUDA graphs on CUDA, with batches padded to a
fixed size so that one graph serves the whole job; by default only where the job is large enough to pay
the compilation.
"""

from __future__ import annotations

import copy
import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..core.precision import PRECISIONS
from ..core.rng import KeyedNoise, sample_key
from ..core.samplers import sde_bridge, sdedit_cm
from ..core.sde import VESDE
from ..errors import InputError

if TYPE_CHECKING:
    from .pipeline import BoundPipeline, FieldPipeline

__all__ = [
    "COMPILE_MIN_EVALUATIONS",
    "COMPILE_POLICIES",
    "PRECISIONS",
    "PrefetchedNoise",
    "cached_model",
    "caller_threads",
    "choose_device",
    "compile_policy",
    "denoise_block",
    "network_runner",
    "set_torch_threads",
    "time_keys",
    "use_threads",
]

_MODELS: dict[tuple[str, str, str], Any] = {}
_LOCK = threading.Lock()
_RUN_LOCKS: dict[str, threading.Lock] = {}


def choose_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else the first CUDA device when one is available, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"device={str(device)!r} was requested but torch sees no CUDA device "
            f"(torch {torch.__version__}). Use device='cpu' or install a CUDA build of torch."
        )
    return dev


def _worker_threads() -> int | None:
    """The thread count of the ``dask.distributed`` worker running this code, or None outside one."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    return int(getattr(worker.state, "nthreads", 0) or getattr(worker, "nthreads", 0) or 1)


def set_torch_threads() -> None:
    """Use the cores a dask worker was given rather than all cores of the node.

    Under ``dask.distributed`` a worker with ``nthreads`` threads shares the node with other workers;
    torch would otherwise start one thread per core in every worker.
    """
    nthreads = _worker_threads()
    if nthreads is not None:
        torch.set_num_threads(max(1, min(nthreads, os.cpu_count() or 1)))


def caller_threads() -> int:
    """torch's thread count on this thread (taken where a dask graph is built, for :func:`use_threads`)."""
    return int(torch.get_num_threads())


def use_threads(threads: int) -> None:
    """Run torch on this thread with ``threads`` threads (the count of the call that built the dask graph).

    OpenMP keeps one thread count per OS thread, fixed when the thread first runs a parallel operation:
    a pooled dask thread would otherwise keep the count of the first job it ran, which changes the last
    bits of a result and the speed. Under ``dask.distributed`` the worker's share decides instead
    (:func:`set_torch_threads`).
    """
    if threads > 0 and _worker_threads() is None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def cached_model(path: str, sha256: str, device: str) -> Any:
    """Load the model at ``path`` once per process and device (verifying ``sha256``)."""
    key = (path, sha256, device)
    with _LOCK:
        model = _MODELS.get(key)
        if model is None:
            from . import load_model
            from .loading import already_read

            set_torch_threads()
            read = already_read(path, sha256)  # the file as resolve_model read it: not read a second time
            if read is None:
                model = load_model(path, device=device)
            elif read.device == torch.device(device):
                model = read
            else:
                model = copy.deepcopy(read).to(device)
            if model.sha256 != sha256:
                from ..errors import WeightsIntegrityError

                raise WeightsIntegrityError(
                    f"The model file {path} changed while the job ran (sha256 {model.sha256} instead of "
                    f"{sha256}). Restart the job so that every worker uses the same weights."
                )
            if torch.device(device).type == "cuda":
                # fixed input shapes per job: let cuDNN pick the fastest convolution algorithms
                torch.backends.cudnn.benchmark = True
            _MODELS[key] = model
            _RUN_LOCKS.setdefault(device, threading.Lock())
        return model


#: How :func:`network_runner` decides whether to compile: ``"auto"`` (compile on CUDA when a call does
#: at least :data:`COMPILE_MIN_EVALUATIONS` field evaluations, or when a compiled network for the same
#: shapes already exists in this process), ``"never"``, or ``"always"`` (any device, any size).
COMPILE_POLICIES = ("auto", "never", "always")

#: Field evaluations (fields x members x network calls per field) from which ``"auto"`` compiles on
#: CUDA. Compiling the paper UNet takes about 45 s (less with torch's warm on-disk cache) and lifts
#: throughput from about 150 to 360+ fields/s at 240 x 384, so it pays off from about 10,000 fields.
COMPILE_MIN_EVALUATIONS = 10_000

_RUNNERS: dict[tuple[Any, ...], torch.nn.Module] = {}


def compile_policy(policy: str | None = None) -> str:
    """The compile policy: ``policy`` if given, else the ``XDOWNSCALE_COMPILE`` environment variable,
    else ``"auto"``.

    Raises
    ------
    InputError
        The policy is not one of :data:`COMPILE_POLICIES`.
    """
    value = policy if policy is not None else os.environ.get("XDOWNSCALE_COMPILE", "auto")
    value = str(value).strip().lower()
    if value not in COMPILE_POLICIES:
        raise InputError(
            f"compile policy {value!r} (from XDOWNSCALE_COMPILE or the compile argument) is not one of "
            f"{COMPILE_POLICIES}; set XDOWNSCALE_COMPILE=auto, never or always."
        )
    return value


class _CompiledBackbone(torch.nn.Module):
    """``torch.compile`` of a backbone ``net(x, noise_labels)``; with CUDA graphs on CUDA.

    Each call marks a new CUDA-graph step: the samplers consume a network output before the next call,
    so the graph may reuse its output memory.
    """

    def __init__(self, net: torch.nn.Module, cuda_graphs: bool) -> None:
        super().__init__()
        self.cuda_graphs = cuda_graphs
        self.compiled = torch.compile(net, mode="reduce-overhead" if cuda_graphs else None, dynamic=False)

    def forward(self, x: Tensor, noise_labels: Tensor) -> Tensor:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(x, noise_labels)


def network_runner(
    model: Any, device: torch.device, batch_size: int, shape: Sequence[int], evaluations: int, policy: str
) -> tuple[torch.nn.Module, bool]:
    """The network to run a job with: ``model.network`` itself, or a copy whose backbone is compiled.

    Parameters
    ----------
    model
        A loaded model (``model.network`` a consistency or score model with a ``net`` backbone).
    device
        Where it runs.
    batch_size, shape
        Fixed batch size and field shape (H, W) of the compiled graph.
    evaluations
        Field evaluations of this call (fields x members x network calls per field), for ``"auto"``.
    policy
        One of :data:`COMPILE_POLICIES`.

    Returns
    -------
    network, compiled
        The network (sharing the model's weights), and whether it is compiled (then every batch must
        have ``batch_size`` samples: pad the last one).
    """
    network = model.network
    key = (id(network), str(device), int(batch_size), tuple(int(s) for s in shape))
    runner = _RUNNERS.get(key)
    if runner is not None and policy != "never":
        return runner, True
    wanted = policy == "always" or (
        policy == "auto" and device.type == "cuda" and evaluations >= COMPILE_MIN_EVALUATIONS
    )
    if not wanted or not hasattr(network, "net"):
        return network, False
    runner = copy.copy(network)  # shares parameters and buffers; its own module table
    runner._modules = dict(network._modules)
    runner.net = _CompiledBackbone(network.net, cuda_graphs=device.type == "cuda")
    _RUNNERS[key] = runner
    return runner, True


def time_keys(times: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Stable 63-bit keys for time stamps (numpy datetime64 or cftime), independent of calendar type
    and chunking: the key of a date is the hash of its ISO string."""
    out = np.empty(len(times), dtype=np.int64)
    for i, t in enumerate(times):
        if isinstance(t, np.datetime64):
            iso = str(np.datetime_as_string(t.astype("datetime64[s]"), unit="s"))
        elif hasattr(t, "isoformat"):
            iso = t.isoformat().replace(" ", "T")[:19]
        else:
            iso = str(t)
        out[i] = sample_key(iso)
    return out


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX). Elsewhere (e.g. AVX2-only
    CPUs) torch emulates bf16 and autocast is several times slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(device: torch.device, precision: str) -> str:
    """``"auto"`` -> ``"bf16"`` on CUDA and on CPUs with native bf16, else ``"fp32"``."""
    if precision != "auto":
        return precision
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
        return "bf16"
    return "fp32"


def _autocast(device: torch.device, precision: str) -> Any:
    """bfloat16 autocast, or nothing for fp32.

    The fastest kernels (oneDNN on the CPU, cuDNN on CUDA) may round the last bit of a sample
    differently for different batch sizes; the noise never depends on the batch, so results agree
    to float rounding for any batching, and bit for bit where batches line up."""
    if resolve_precision(device, precision) == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


class PrefetchedNoise:
    """:class:`~xdownscale.core.rng.KeyedNoise` whose next draw is drawn ahead, in a background thread.

    Draw ``i`` is drawn on the CPU (as :class:`KeyedNoise` always does, so that it is the same on every
    device) into page-locked memory while the device works, and copied with a non-blocking copy when the
    sampler asks for it; asking for draw ``i`` starts draw ``i + 1``. The values are exactly those of
    ``KeyedNoise(keys, seed=seed, shape=shape)``; rows past ``len(keys)`` (padding of a fixed-size batch)
    are zeros.

    Parameters
    ----------
    keys, seed, shape
        As for :class:`KeyedNoise`.
    batch_size
        Rows of every draw (at least ``len(keys)``).
    draws
        Draws the sampler will ask for (draw ``i + 1`` is only drawn ahead while ``i + 1 < draws``).
    device
        Where the draws are returned.
    pool
        Executor for the background draws (None: draw when asked, no thread).
    """

    def __init__(
        self,
        keys: Sequence[int],
        *,
        seed: int,
        shape: Sequence[int],
        batch_size: int,
        draws: int,
        device: torch.device,
        pool: ThreadPoolExecutor | None = None,
    ) -> None:
        self.noise = KeyedNoise(keys, seed=seed, shape=shape)
        self.batch_size = int(batch_size)
        self.draws = int(draws)
        self.device = device
        self.pool = pool
        self._pending: dict[int, Future[Tensor]] = {}

    def _draw(self, i: int) -> Tensor:
        z = self.noise(i)
        if self.batch_size > z.shape[0]:
            z = torch.cat([z, z.new_zeros((self.batch_size - z.shape[0], *z.shape[1:]))])
        return z.pin_memory() if self.device.type == "cuda" else z

    def prefetch(self, i: int) -> None:
        """Start drawing draw ``i`` in the background (no effect without a pool)."""
        if self.pool is not None and i < self.draws and i not in self._pending:
            self._pending[i] = self.pool.submit(self._draw, i)

    def __call__(self, i: int) -> Tensor:
        """Draw ``i``, shape ``(batch_size, *shape)``, on the device."""
        pending = self._pending.pop(i, None)
        z = pending.result() if pending is not None else self._draw(i)
        self.prefetch(i + 1)
        return z.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Wait for draws still running in the background."""
        for pending in self._pending.values():
            pending.result()
        self._pending.clear()


class _Stager:
    """Host <-> device copies of fixed-size batches through two page-locked buffers per direction.

    On the CPU it hands out views and copies synchronously. On CUDA, ``upload`` copies a batch into a
    page-locked buffer and starts a non-blocking copy to the device; ``download`` starts a non-blocking copy
    of a result into a page-locked buffer, whose rows are written to the output array when the buffer is
    needed again (or at :meth:`finish`), after an event says the copy is done.
    """

    def __init__(
        self,
        device: torch.device,
        batch: int,
        shape: tuple[int, ...],
        out: np.ndarray,
        out_shape: tuple[int, ...] | None = None,
    ) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.out = out  # (samples, *out_shape)
        self._turn = 0
        if self.cuda:
            self._up = [torch.empty((batch, *shape), pin_memory=True) for _ in range(2)]
            self._up_done: list[torch.cuda.Event | None] = [None, None]
            down = shape if out_shape is None else out_shape
            self._down = [torch.empty((batch, *down), pin_memory=True) for _ in range(2)]
            self._down_done: list[tuple[torch.cuda.Event, slice] | None] = [None, None]

    def upload(self, fields: Tensor) -> Tensor:
        """Fields (B, *shape) on the host -> on the device."""
        if not self.cuda:
            return fields
        k = self._turn
        event = self._up_done[k]
        if event is not None:
            event.synchronize()  # the buffer's previous copy has reached the device
        buf = self._up[k][: fields.shape[0]]
        buf.copy_(fields)
        on_device = buf.to(self.device, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._up_done[k] = done
        return on_device

    def download(self, result: Tensor, rows: slice) -> None:
        """Write ``result[: rows length]`` (B, *out_shape) to ``out[rows]`` (now, or once copied)."""
        n = rows.stop - rows.start
        if not self.cuda:
            self.out[rows] = result[:n].numpy()
            return
        k = self._turn
        self._flush(k)
        self._down[k][:n].copy_(result[:n], non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._down_done[k] = (done, rows)
        self._turn = 1 - k

    def _flush(self, k: int) -> None:
        pending = self._down_done[k]
        if pending is not None:
            event, rows = pending
            event.synchronize()
            self.out[rows] = self._down[k][: rows.stop - rows.start].numpy()
            self._down_done[k] = None

    def finish(self) -> None:
        """Write the results still in flight."""
        if self.cuda:
            for k in (self._turn, 1 - self._turn):
                self._flush(k)


def _run_batch(
    network: Any,
    method: str,
    x: torch.Tensor,
    sigma: float | tuple[float, ...],
    steps: int,
    noise: Callable[[int], Any],
    precision: str,
) -> torch.Tensor:
    with torch.no_grad(), _autocast(x.device, precision):
        if method == "cm":
            out = sdedit_cm(network, x, sigma, steps=steps, noise=noise)
        else:
            assert isinstance(sigma, float)  # denoise_block refuses several levels for the SDE bridge
            sde = VESDE(sigma_min=network.sigma_min, sigma_max=network.sigma_max)
            t_star = float(sde.t_of_sigma(torch.tensor(sigma, dtype=torch.float64)))
            out = sde_bridge(network, x, t_star, steps=steps, noise=noise)
    return out.float()


_NOISE_POOL: ThreadPoolExecutor | None = None
_STAGERS: dict[tuple[str, int, tuple[int, ...], tuple[int, ...] | None], _Stager] = {}


def _noise_pool() -> ThreadPoolExecutor:
    global _NOISE_POOL
    with _LOCK:
        if _NOISE_POOL is None:
            _NOISE_POOL = ThreadPoolExecutor(1, thread_name_prefix="xdownscale-noise")
        return _NOISE_POOL


def _stager(
    device: torch.device,
    batch: int,
    shape: tuple[int, ...],
    out: np.ndarray,
    out_shape: tuple[int, ...] | None = None,
) -> _Stager:
    """A stager for ``out``; on CUDA its page-locked buffers are kept for the next call of that size."""
    if device.type != "cuda":
        return _Stager(device, batch, shape, out, out_shape)
    key = (str(device), batch, shape, out_shape)
    stager = _STAGERS.get(key)
    if stager is None:
        stager = _STAGERS[key] = _Stager(device, batch, shape, out, out_shape)
    stager.out = out
    return stager


def denoise_block(
    x: np.ndarray,
    keys: np.ndarray,
    *,
    model_path: str,
    sha256: str,
    method: str,
    sigma: Any,
    steps: int,
    seed: int,
    members: int,
    device: str,
    batch_size: int,
    precision: str = "auto",
    progress: Callable[[int], None] | None = None,
    compile: str | None = None,
    pipeline: FieldPipeline | None = None,
) -> np.ndarray:
    """Noise and denoise a block of prepared fields (or, with ``pipeline``, downscale a block of input
    fields with every step on ``device``).

    Parameters
    ----------
    x
        Fields in the model's transformed space, shape (T, H, W), or (T, C, H, W) for a joint model of C
        variables; NaN where the model is masked or the input had gaps (they are filled with 0 for the
        network and come back NaN).
    keys
        One key per field (from :func:`time_keys`), shape (T,).
    sigma
        Noise level sigma(t*) in the transformed space; for a joint model one per variable (shape (C,)).
    members
        Ensemble members per field; member ``m`` uses noise key ``(seed, keys[t], m)``.
    batch_size
        Samples per network call; halved and retried on CUDA out-of-memory.
    compile
        Compile policy (:func:`compile_policy`; default: the ``XDOWNSCALE_COMPILE`` environment variable,
        else ``"auto"``). Compiled or not, a sample agrees to float rounding (bf16 rounding in bf16).
    pipeline
        The steps before and after the network, run on ``device`` for each batch
        (:class:`~xdownscale.models.pipeline.FieldPipeline`); ``x`` is then its packed input rows
        (T, ``pipeline.input_size``) and the result the finished fields in physical units.

    Returns
    -------
    ndarray
        Shape (T, members, H, W) (or (T, members, C, H, W)), float32, NaN where ``x`` was NaN (with
        ``pipeline``: where the model is masked or a field is missing).
    """
    levels = tuple(float(v) for v in np.atleast_1d(np.asarray(sigma, dtype=np.float64)))
    if len(levels) > 1 and method != "cm":
        raise InputError("A noise level per variable needs method 'cm' (a joint consistency model).")
    policy = compile_policy(compile)
    model = cached_model(model_path, sha256, device)
    dev = torch.device(device)
    bound = None
    if pipeline is not None:
        bound = pipeline.on(dev)
        ntime, nchan, (ny, nx) = x.shape[0], 1, pipeline.fine_shape
        nan = None
        host = torch.from_numpy(np.asarray(x, dtype=np.float32))
    else:
        fields = x if x.ndim == 4 else x[:, None]
        ntime, nchan, ny, nx = fields.shape
        nan = ~np.isfinite(fields)
        host = torch.from_numpy(np.where(nan, np.float32(0), fields).astype(np.float32, copy=False))
    job = _Job(
        host=host,
        out=np.empty((ntime * members, nchan, ny, nx), dtype=np.float32),
        shape=(nchan, ny, nx),
        pipeline=bound,
        keys=[sample_key(int(keys[t]), m) for t in range(ntime) for m in range(members)],
        members=members,
        method=method,
        sigma=levels[0] if len(levels) == 1 else levels,
        steps=steps,
        seed=seed,
        precision=precision,
        draws=steps if method == "cm" else steps + 1,
        pool=_noise_pool() if dev.type == "cuda" else None,
        progress=progress,
    )
    size = max(1, int(batch_size))
    evaluations = len(job.keys) * steps
    lock = _RUN_LOCKS.setdefault(device, threading.Lock())
    while job.done < len(job.keys):
        with lock:
            network, fixed = network_runner(model, dev, size, (nchan, ny, nx), evaluations, policy)
            down = None if bound is None else (nchan, ny, nx)
            stager = _stager(dev, size, tuple(host.shape[1:]), job.out, down)
            try:
                job.run(network, size, fixed, stager)
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                torch.cuda.empty_cache()
                size = max(1, size // 2)
            finally:
                stager.finish()
    values = job.out.reshape(ntime, members, nchan, ny, nx)
    if nan is not None:
        values[np.broadcast_to(nan[:, None], values.shape)] = np.nan
    return values if x.ndim == 4 else values[:, :, 0]


class _Job:
    """The samples of one :func:`denoise_block` call and how far they are done.

    Sample ``k`` is field ``k // members``, member ``k % members``, noise key ``keys[k]``. ``shape``:
    the network's fields (C, H, W; default: those of ``host``); ``pipeline``: the steps around the
    network on the device, if any (``host`` then holds its input rows).
    """

    def __init__(
        self,
        *,
        host: Tensor,
        out: np.ndarray,
        keys: list[int],
        members: int,
        method: str,
        sigma: float | tuple[float, ...],
        steps: int,
        seed: int,
        precision: str,
        draws: int,
        pool: ThreadPoolExecutor | None,
        progress: Callable[[int], None] | None,
        shape: tuple[int, ...] | None = None,
        pipeline: BoundPipeline | None = None,
    ) -> None:
        self.host, self.out, self.keys, self.members = host, out, keys, members
        self.shape = tuple(host.shape[1:]) if shape is None else shape
        self.pipeline = pipeline
        self.method, self.sigma, self.steps, self.seed = method, sigma, steps, seed
        self.precision, self.draws, self.pool, self.progress = precision, draws, pool, progress
        self.done = 0

    def _noise(self, start: int, stop: int, rows: int, device: torch.device) -> PrefetchedNoise:
        return PrefetchedNoise(
            self.keys[start:stop],
            seed=self.seed,
            shape=self.shape,
            batch_size=rows,
            draws=self.draws,
            device=device,
            pool=self.pool,
        )

    def run(self, network: Any, size: int, fixed: bool, stager: _Stager) -> None:
        """Run the remaining samples in batches of ``size``; with ``fixed`` every batch has ``size`` rows
        (the last one padded with zero fields and zero noise, whose results are dropped)."""
        total = len(self.keys)
        start = self.done
        following: PrefetchedNoise | None = None
        while start < total:
            stop = min(start + size, total)
            rows = size if fixed else stop - start
            if self.members == 1:
                fields = self.host[start:stop]
            else:
                fields = self.host[torch.arange(start, stop) // self.members]
            if rows > stop - start:
                fields = torch.cat([fields, fields.new_zeros((rows - (stop - start), *fields.shape[1:]))])
            noise = following or self._noise(start, stop, rows, stager.device)
            batch = stager.upload(fields)
            if self.pipeline is not None:
                batch, context = self.pipeline.before(batch)
            result = _run_batch(network, self.method, batch, self.sigma, self.steps, noise, self.precision)
            noise.close()
            if self.pipeline is not None:
                result = self.pipeline.after(result, context)
            stager.download(result, slice(start, stop))
            following = None
            if self.pool is not None and stop < total:  # draw the next batch's noise while this one runs
                nstop = min(stop + size, total)
                following = self._noise(stop, nstop, size if fixed else nstop - stop, stager.device)
                following.prefetch(0)
            if self.progress is not None:
                self.progress(stop - start)
            start = self.done = stop
