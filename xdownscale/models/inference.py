"""Run a loaded model on blocks of prepared fields: numpy in, numpy out.

This is the only place where the downscaling pipeline touches torch. The xarray side (``api.py``)
maps :func:`denoise_block` over time chunks; each process loads a model once from its file
(:func:`cached_model`), so models are never shipped inside a dask task graph.

Noise is keyed by ``(seed, time stamp, member)`` through :class:`xdownscale.core.rng.KeyedNoise`, so a
field's sample never depends on the chunk, batch or worker it was computed in.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.rng import KeyedNoise, sample_key
from ..core.samplers import sde_bridge, sdedit_cm
from ..core.sde import VESDE
from ..errors import InputError

__all__ = [
    "PRECISIONS",
    "cached_model",
    "choose_device",
    "denoise_block",
    "set_torch_threads",
    "time_keys",
]

PRECISIONS = ("auto", "fp32", "bf16")

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


def set_torch_threads() -> None:
    """Use the cores a dask worker was given rather than all cores of the node.

    Under ``dask.distributed`` a worker with ``nthreads`` threads shares the node with other workers;
    torch would otherwise start one thread per core in every worker.
    """
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return
    nthreads = int(getattr(worker.state, "nthreads", 0) or getattr(worker, "nthreads", 0) or 1)
    torch.set_num_threads(max(1, min(nthreads, os.cpu_count() or 1)))


def cached_model(path: str, sha256: str, device: str) -> Any:
    """Load the model at ``path`` once per process and device (verifying ``sha256``)."""
    key = (path, sha256, device)
    with _LOCK:
        model = _MODELS.get(key)
        if model is None:
            from . import load_model

            set_torch_threads()
            model = load_model(path, device=device)
            if model.sha256 != sha256:
                from ..errors import WeightsIntegrityError

                raise WeightsIntegrityError(
                    f"The model file {path} changed while the job ran (sha256 {model.sha256} instead of "
                    f"{sha256}). Restart the job so that every worker uses the same weights."
                )
            if torch.device(device).type == "cuda":
                # fixed input shapes per job: let cuDNN pick the fastest convolution algorithms
                torch.backends.cudnn.benchmark = True
                model.network.to(memory_format=torch.channels_last)
            _MODELS[key] = model
            _RUN_LOCKS.setdefault(device, threading.Lock())
        return model


def time_keys(times: Sequence[Any]) -> np.ndarray:
    """Stable 63-bit keys for time stamps (numpy datetime64 or cftime), independent of calendar type
    and chunking: the key of a date is the hash of its ISO string."""
    out = np.empty(len(times), dtype=np.int64)
    for i, t in enumerate(times):
        if isinstance(t, np.datetime64):
            iso = np.datetime_as_string(t.astype("datetime64[s]"), unit="s")
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


def _run_batch(
    model: Any,
    method: str,
    x: torch.Tensor,
    sigma: float,
    steps: int,
    noise: Callable[[int], Any],
    precision: str,
) -> torch.Tensor:
    network = model.network
    with torch.no_grad(), _autocast(x.device, precision):
        if method == "cm":
            out = sdedit_cm(network, x, sigma, steps=steps, noise=noise)
        else:
            sde = VESDE(sigma_min=network.sigma_min, sigma_max=network.sigma_max)
            t_star = float(sde.t_of_sigma(torch.tensor(sigma, dtype=torch.float64)))
            out = sde_bridge(network, x, t_star, steps=steps, noise=noise)
    return out.float()


def denoise_block(
    x: np.ndarray,
    keys: np.ndarray,
    *,
    model_path: str,
    sha256: str,
    method: str,
    sigma: float,
    steps: int,
    seed: int,
    members: int,
    device: str,
    batch_size: int,
    precision: str = "auto",
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Noise and denoise a block of prepared fields.

    Parameters
    ----------
    x
        Fields in the model's transformed space, shape (T, H, W), NaN where the model is masked or
        the input had gaps (they are filled with 0 for the network and come back NaN).
    keys
        One key per field (from :func:`time_keys`), shape (T,).
    sigma
        Noise level sigma(t*) in the transformed space.
    members
        Ensemble members per field; member ``m`` uses noise key ``(seed, keys[t], m)``.
    batch_size
        Fields per network call; halved and retried on CUDA out-of-memory.

    Returns
    -------
    ndarray
        Shape (T, members, H, W), float32, NaN where ``x`` was NaN.
    """
    sigma = float(np.asarray(sigma))
    model = cached_model(model_path, sha256, device)
    dev = torch.device(device)
    ntime, ny, nx = x.shape
    nan = ~np.isfinite(x)
    filled = np.where(nan, 0.0, x).astype(np.float32)
    out = np.empty((ntime, members, ny, nx), dtype=np.float32)
    flat = [(t, m) for t in range(ntime) for m in range(members)]
    sample_keys = [sample_key(int(keys[t]), m) for t, m in flat]
    start, size = 0, max(1, int(batch_size))
    lock = _RUN_LOCKS.setdefault(device, threading.Lock())
    while start < len(flat):
        stop = min(start + size, len(flat))
        index = flat[start:stop]
        host = torch.from_numpy(np.stack([filled[t] for t, _ in index])[:, None])
        if dev.type == "cuda":  # page-locked host memory: the copy overlaps with queued GPU work
            batch = host.pin_memory().to(dev, non_blocking=True)
        else:
            batch = host
        batch = batch.contiguous(memory_format=torch.channels_last)
        noise = KeyedNoise(sample_keys[start:stop], seed=seed, shape=(1, ny, nx), device=dev)
        try:
            with lock:
                result = _run_batch(model, method, batch, sigma, steps, noise, precision)
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
            torch.cuda.empty_cache()
            size = max(1, size // 2)
            continue
        values = result[:, 0].cpu().numpy()
        for j, (t, m) in enumerate(index):
            out[t, m] = values[j]
        if progress is not None:
            progress(stop - start)
        start = stop
    out[np.broadcast_to(nan[:, None], out.shape)] = np.nan
    return out
