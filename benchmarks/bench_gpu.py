"""Benchmark: the paper-sized network and the downscaling pipeline on a GPU, in one command.

Measures, on one device (CUDA by default when present), for the paper UNet (channels 128, 128, 256, 256; 27 M
parameters; 662.6 GFLOP per forward at 240 x 384) in bf16 autocast, NCHW:

1. the bare network ``model.network(x, sigma)`` in fields/s: eager, ``torch.compile`` (default mode) and
   ``torch.compile`` with CUDA graphs (``mode="reduce-overhead"``, the runner ``.downscale.cm`` uses when it
   compiles), each with its share of the bf16 limit (790 TFLOP/s on an H200: 100% = 1192 fields/s at
   240 x 384);
2. ``.downscale.cm`` end to end (regrid from a 4x coarser global grid, low-pass, transform, keyed noise,
   network, inverse, mask, preserve) on ``--fields`` (default 1024) fields: eager with the whole chain on
   the device (the default route on accelerators, :mod:`xdownscale.ondevice`), eager with xarray preparing
   the fields on the CPU (``XDOWNSCALE_PIPELINE=host``), and on the device with the compiled runner (warm,
   from step 1); each with its ratio to the bare network of the same kind (goal >= 0.9) and what the chain
   costs beside the network in ms per field;
3. the SDE bridge with 500 steps against the one-step CM on the same one batch of fields, both eager
   (``--sde-steps`` timed and scaled to 500; goal >= 400x); the CM per field also from the throughput of 2;
4. ``preserve`` (the default large-scale correction, run on the device: conjugate gradients on CUDA)
   alone, in ms per field on ``bench_preserve.py``'s synthetic case at the same grid, 4x coarser input;
5. training steps/s (the iCT loss, RAdam, gradient clipping, bf16 autocast: the step of
   ``xdownscale.train`` without EMA and checkpoints) for the paper network at 240 x 384 and for the shipped
   Iberia CM network (channels and grid from its card; 48, 96, 96 at 41 x 61), eager and compiled (as
   ``train(compile="auto")`` does on CUDA for long runs);
6. peak GPU memory of each part.

The paper-sized CM and score models are made by ``xdownscale.train`` (one step; the weights do not change
the cost) on synthetic precipitation put on a global 240 x 384 grid (0.75 x 0.9375 degrees, periodic in
longitude), in a temporary directory. It prints one table and writes JSON (``--json``, default
``bench_gpu.json``). About 3-4 minutes on an H200, most of it two compilations (about 45 s each).

CPU check (a tiny grid and network, no compilation unless ``--compile``; a few seconds)::

    python benchmarks/bench_gpu.py --quick --device cpu

What the chain costs beside the network at the paper's grid, on the CPU (a small network; about 2 minutes)::

    python benchmarks/bench_gpu.py --device cpu --e2e-only --channels 8,8,8,8 --fields 64 --batch-size 16

On the GPU machine (python 3.12, torch with CUDA; it lacks dask, cf-xarray, pint, xarray-regrid, zarr, ...):
first, here, with the project venv active, download their wheels into ``.whl/`` (ignored by git)::

    bash ../shared/tools/gpu-wheels.sh

then, there, from the project root (``.whl/`` beside the checkout)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && python3 benchmarks/bench_gpu.py --json $OUT/gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

#: bf16 dense tensor throughput of an H200 (SXM), the 100% of the "% of limit" column.
BF16_LIMIT_TFLOPS = 790.0
PAPER_CHANNELS = (128, 128, 256, 256)
GOALS = {"bare_fields_per_s": 600.0, "e2e_vs_bare": 0.9, "cm_vs_sde": 400.0}


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(fn: Callable[[], Any], device: Any, items: int, iters: int) -> float:
    """Items per second of ``fn`` (best of ``iters`` timed runs after one warm-up)."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return items / best


@contextlib.contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """Set the environment variable ``name`` for a block; restore it after."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def compile_policy(policy: str) -> contextlib.AbstractContextManager[None]:
    """Set ``XDOWNSCALE_COMPILE`` (read by ``.downscale``'s inference) for a block."""
    return environment("XDOWNSCALE_COMPILE", policy)


#: the end-to-end cases: name, compile policy, route (``XDOWNSCALE_PIPELINE``)
E2E_CASES = (
    ("eager", "never", "device"),
    ("eager, xarray preparation", "never", "host"),
    ("graphs", "auto", "device"),
)


def _peak_reset(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: Any) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def global_field(ny: int, nx: int, ntime: int, seed: int = 0) -> Any:
    """Synthetic daily precipitation (mm/day) on a global ``ny`` x ``nx`` grid, periodic in longitude."""
    from xdownscale.datasets import synthetic_precipitation

    # the regional grid's own spacing is replaced below; a small one keeps any ny inside [-90, 90]
    da = synthetic_precipitation(ny=ny, nx=nx, ntime=ntime, seed=seed, res=0.01)
    lat = -90.0 + (np.arange(ny) + 0.5) * 180.0 / ny
    lon = np.arange(nx) * 360.0 / nx
    da = da.assign_coords(lat=lat, lon=lon)
    da["lat"].attrs = {"standard_name": "latitude", "units": "degrees_north", "axis": "Y"}
    da["lon"].attrs = {"standard_name": "longitude", "units": "degrees_east", "axis": "X"}
    da.name = "pr"
    return da


def coarse_input(fine: Any, nfields: int, factor: int = 4, seed: int = 1) -> Any:
    """``nfields`` fields on the ``factor`` times coarser global grid: block means of ``fine``'s fields,
    repeated, each repeat scaled by a random factor."""
    import pandas as pd
    import xarray as xr

    ntime, ny, nx = fine.shape
    blocks = fine.values.reshape(ntime, ny // factor, factor, nx // factor, factor).mean(axis=(2, 4))
    reps = -(-nfields // ntime)
    scale = np.random.default_rng(seed).lognormal(0.0, 0.3, reps).astype(np.float32)
    data = np.concatenate([blocks * s for s in scale])[:nfields].astype(np.float32)
    lat = fine["lat"].values.reshape(-1, factor).mean(axis=1)
    lon = fine["lon"].values.reshape(-1, factor).mean(axis=1)
    out = xr.DataArray(
        data,
        dims=("time", "lat", "lon"),
        coords={"time": pd.date_range("2000-01-01", periods=nfields, freq="D"), "lat": lat, "lon": lon},
        attrs={"units": "mm/day", "standard_name": "lwe_precipitation_rate"},
        name="pr",
    )
    out["lat"].attrs = dict(fine["lat"].attrs)
    out["lon"].attrs = dict(fine["lon"].attrs)
    return out


def make_models(tmp: Path, fine: Any, channels: tuple[int, ...], device: str) -> dict[str, Path]:
    """A CM and a score model of the given size on ``fine``'s grid, trained one step."""
    import xdownscale

    paths = {}
    for kind in ("cm", "sde"):
        paths[kind] = Path(
            xdownscale.train(
                kind=kind,
                data=fine,
                variable="pr",
                out=tmp / kind,
                name=f"bench-gpu-{kind}",
                steps=1,
                batch_size=2,
                channels=channels,
                checkpoint_every=None,
                val_fraction=0.0,
                device=device,
                progress=False,
            )
        )
    return paths


def bench_network(
    model: Any, device: Any, batch: int, iters: int, sigma: float, compile_: bool
) -> dict[str, Any]:
    """Fields/s of the bare network: eager, compiled, compiled with CUDA graphs (the pipeline's runner)."""
    import torch

    from xdownscale.models import inference
    from xdownscale.nets.unet import UNet, forward_gflops

    net = model.network
    ny, nx = model.shape
    # the network's useful work: on periodic grids the wrapped-column corrections add about 0.3% of
    # arithmetic that the paper's count (662.6 GFLOP at 240 x 384) does not include
    gflop = forward_gflops(UNet(**{**net.net.config, "periodic": False}), (1, 1, ny, nx))
    limit = BF16_LIMIT_TFLOPS * 1e3 / gflop
    x = torch.randn(batch, 1, ny, nx, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    rows: dict[str, Any] = {"gflop_per_forward": gflop, "limit_fields_per_s": limit}

    def timed(network: Any, name: str) -> None:
        def run() -> None:
            with torch.no_grad(), autocast:
                network(x, sigma)

        _peak_reset(device)
        t0 = time.perf_counter()
        run()  # the first call compiles
        _sync(device)
        first = time.perf_counter() - t0
        rate = _rate(run, device, batch, iters)
        rows[name] = {
            "fields_per_s": rate,
            "percent_of_bf16_limit": 100.0 * rate / limit if device.type == "cuda" else None,
            "first_call_s": first,
            "peak_gib": _peak_gib(device),
        }
        print(f"  bare network {name}: {rate:.1f} fields/s (first call {first:.1f} s)", flush=True)

    timed(net, "eager")
    if compile_:
        plain = inference._CompiledBackbone(net.net, cuda_graphs=False)
        runner_default = copy.copy(net)  # shares the weights; its own module table
        runner_default._modules = dict(net._modules)
        runner_default.net = plain
        timed(runner_default, "compiled")
        if device.type == "cuda":
            runner, _ = inference.network_runner(model, device, batch, (ny, nx), 0, "always")
            timed(runner, "graphs")
    return rows


def bench_e2e(
    paths: dict[str, Path],
    coarse: Any,
    device: Any,
    batch: int,
    compile_: bool,
    scale: str,
    preserve: bool = True,
) -> dict[str, Any]:
    """``.downscale.cm`` on all fields of ``coarse``: eager with the whole chain on the device and with
    xarray preparing the fields on the CPU, and with the compiled runner when made."""
    out: dict[str, Any] = {"fields": int(coarse.sizes["time"]), "preserve": preserve}
    for name, policy, route in E2E_CASES:
        if policy == "auto" and not (compile_ and device.type == "cuda"):
            continue

        def run(policy: str = policy, route: str = route) -> None:
            with compile_policy(policy), environment("XDOWNSCALE_PIPELINE", route):
                coarse.downscale.cm(
                    model=paths["cm"],
                    scale=scale,
                    device=str(device),
                    batch_size=batch,
                    progress=False,
                    preserve=preserve,
                ).load()

        _peak_reset(device)
        rate = _rate(run, device, out["fields"], 1)
        out[name] = {"fields_per_s": rate, "peak_gib": _peak_gib(device), "route": route}
        print(f"  .downscale.cm {name}: {rate:.1f} fields/s over {out['fields']} fields", flush=True)
    return out


def bench_sde(
    paths: dict[str, Path], coarse: Any, device: Any, batch: int, steps: int, scale: str
) -> dict[str, Any]:
    """SDE bridge (``steps`` timed, scaled to 500) vs one-step CM on the same batch of fields, eager."""
    few = coarse.isel(time=slice(0, batch))

    def cm() -> None:
        few.downscale.cm(
            model=paths["cm"], scale=scale, device=str(device), batch_size=batch, progress=False
        ).load()

    def sde(n: int) -> None:
        few.downscale.sde(
            model=paths["sde"], scale=scale, steps=n, device=str(device), batch_size=batch, progress=False
        ).load()

    with compile_policy("never"):
        cm_rate = _rate(cm, device, batch, 2)
        sde(2)  # warm-up
        _peak_reset(device)
        t0 = time.perf_counter()
        sde(steps)
        _sync(device)
        sde_s = (time.perf_counter() - t0) * 500 / steps / batch
    cm_s = 1.0 / cm_rate
    print(f"  SDE-500 {sde_s:.3f} s/field vs CM {cm_s * 1e3:.1f} ms/field: {sde_s / cm_s:.0f}x", flush=True)
    return {
        "fields": batch,
        "steps_measured": steps,
        "sde_s_per_field": sde_s,
        "cm_s_per_field": cm_s,
        "ratio": sde_s / cm_s,
        "peak_gib": _peak_gib(device),
    }


def bench_preserve_on(device: Any, shape: tuple[int, int], fields: int, iters: int) -> dict[str, Any]:
    """``preserve_means`` (default solver of ``device``) on ``fields`` synthetic fields of ``shape``."""
    import sys

    here = str(Path(__file__).resolve().parent)  # bench_preserve, also when this file is imported
    if here not in sys.path:
        sys.path.insert(0, here)
    from bench_preserve import WET_MIN, case

    from xdownscale.core.preserve import preserve_means

    c = case(*shape, fields)

    def run() -> None:
        preserve_means(
            c["y"], c["p"], c["cell"], c["smooth"], wet_min=WET_MIN, coarse=c["values"], device=str(device)
        )

    rate = _rate(run, device, fields, iters)
    print(f"  preserve on {device.type}: {1e3 / rate:.2f} ms per field", flush=True)
    return {"fields": fields, "ms_per_field": 1e3 / rate}


def bench_training(
    channels: tuple[int, ...],
    shape: tuple[int, int],
    batch: int,
    device: Any,
    iters: int,
    compiled: bool = False,
) -> dict[str, Any]:
    """Steps/s of the iCT training step (loss, backward, clip, RAdam) of a fresh network; ``compiled``:
    with its UNet compiled as ``xdownscale.train(compile=...)`` does (the first step compiles)."""
    import torch

    from xdownscale.core.consistency import ict_loss
    from xdownscale.models.model import build_network

    config = {
        "in_channels": 1,
        "out_channels": 1,
        "channels": list(channels),
        "num_res_blocks": 2 if channels == PAPER_CHANNELS else 1,
        "attention": True,
        "num_heads": 4,
        "periodic": shape == (240, 384),
    }
    model = build_network("cm", config, {"min": 0.002, "max": 80.0, "data": 0.5}).to(device).train()
    if compiled:
        model.net.compile(dynamic=False)
    opt = torch.optim.RAdam(model.parameters(), lr=2e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(batch, 1, *shape, device=device, generator=gen).clamp(-1, 1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    step = [0]

    def one() -> None:
        with autocast:
            loss = ict_loss(model, x0, step=step[0], total_steps=1000, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step[0] += 1

    _peak_reset(device)
    rate = _rate(one, device, 1, iters)
    kind = "compiled" if compiled else "eager"
    print(
        f"  training {list(channels)} at {shape[0]}x{shape[1]}, batch {batch}, {kind}: {rate:.2f} steps/s",
        flush=True,
    )
    return {
        "compiled": compiled,
        "channels": list(channels),
        "grid": f"{shape[0]}x{shape[1]}",
        "batch": batch,
        "steps_per_s": rate,
        "samples_per_s": rate * batch,
        "peak_gib": _peak_gib(device),
    }


def machine(device: Any) -> dict[str, Any]:
    import torch

    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cores": len(os.sched_getaffinity(0)),
        "load_average": round(os.getloadavg()[0], 1),
        "date": time.strftime("%Y-%m-%d"),
    }


def shipped_network(name: str = "cm-eobs-iberia-0.25deg-pr") -> tuple[tuple[int, ...], tuple[int, int]]:
    """The channels and grid shape of shipped model ``name``, read from its card."""
    from xdownscale.models import list_models

    found = [m for m in list_models() if m["name"] == name]
    if not found:
        raise SystemExit(f"shipped model {name!r} not found: install xdownscale with its weights/")
    card = json.loads(Path(found[0]["path"]).with_suffix(".json").read_text())
    return tuple(card["architecture"]["config"]["channels"]), found[0]["grid"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: CUDA when present)")
    p.add_argument("--quick", action="store_true", help="tiny grid and network: a check that it runs")
    p.add_argument("--fields", type=int, default=None, help="fields of the end-to-end run (default 1024)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (quick: 8)")
    p.add_argument("--sde-steps", type=int, default=None, help="SDE steps timed, scaled to 500 (default 50)")
    p.add_argument("--iters", type=int, default=None, help="timed runs of each bare/training case")
    p.add_argument("--compile", dest="compile", action="store_true", default=None, help="compiled cases")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--grid", default=None, help="HxW of the fine grid (default 240x384; quick: 16x24)")
    p.add_argument("--channels", default=None, help="UNet channels, e.g. 8,8,8,8 (default: the paper's)")
    p.add_argument(
        "--e2e-only", action="store_true", help="only the bare network and end to end (e.g. on the CPU)"
    )
    p.add_argument(
        "--no-preserve", action="store_true", help="end to end without preserve (the default keeps it)"
    )
    p.add_argument("--json", type=Path, default=Path("bench_gpu.json"))
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")

    import torch

    from xdownscale.models.inference import choose_device

    device = choose_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.quick:
        shape, channels, fields, batch, sde_steps, iters = (16, 24), (8, 16), 32, 8, 4, 2
        train_cases = [((8, 16), (16, 24), 4)]
    else:
        shape, channels, fields, batch, sde_steps, iters = (240, 384), PAPER_CHANNELS, 1024, 64, 50, 5
        train_cases = [(PAPER_CHANNELS, (240, 384), 8), (*shipped_network(), 32)]
    if args.grid:
        shape = tuple(int(v) for v in args.grid.lower().split("x"))  # type: ignore[assignment]
    if args.channels:
        channels = tuple(int(v) for v in args.channels.split(","))
    fields = args.fields or fields
    batch = args.batch_size or batch
    sde_steps = args.sde_steps or sde_steps
    iters = args.iters or iters
    compile_ = args.compile if args.compile is not None else device.type == "cuda"
    info = machine(device)
    print(
        f"bench_gpu on {info['device']} (torch {info['torch']}, CUDA {info['cuda']}), "
        f"grid {shape[0]}x{shape[1]}, channels {list(channels)}, batch {batch}, {fields} fields, "
        f"compile {compile_}",
        flush=True,
    )
    t_start = time.time()
    results: dict[str, Any] = {
        "machine": info,
        "quick": bool(args.quick),
        "batch": batch,
        "grid": list(shape),
    }
    import xdownscale
    from xdownscale.models.inference import cached_model

    with tempfile.TemporaryDirectory() as d:
        fine = global_field(*shape, ntime=16)
        t0 = time.time()
        paths = make_models(Path(d), fine, channels, str(device))
        print(f"  made the CM and score models in {time.time() - t0:.0f} s", flush=True)
        loaded = xdownscale.load_model(paths["cm"])
        model = cached_model(str(loaded.path), loaded.sha256, str(device))  # the pipeline's instance
        coarse = coarse_input(fine, fields)
        scale = "sigma=1.0"  # the cost does not depend on the noise level
        sigma = float(
            coarse.isel(time=slice(0, 1))
            .downscale.cm(model=paths["cm"], scale=scale, device=str(device), progress=False)
            .attrs["downscale_scale_sigma"]
        )
        results["network"] = bench_network(model, device, batch, iters, sigma, compile_)
        results["e2e"] = bench_e2e(paths, coarse, device, batch, compile_, scale, not args.no_preserve)
        if not args.e2e_only:
            results["sde"] = bench_sde(paths, coarse, device, batch, sde_steps, scale)
    if not args.e2e_only:
        results["preserve"] = bench_preserve_on(device, shape, min(fields, 256), max(1, iters // 2))
        results["training"] = [
            bench_training(c, s, b, device, iters, compiled)
            for c, s, b in train_cases
            for compiled in ((False, True) if compile_ else (False,))
        ]
    results["seconds"] = time.time() - t_start

    net, e2e = results["network"], results["e2e"]
    rows: list[tuple[str, str, str]] = []
    for kind in ("eager", "compiled", "graphs"):
        if kind in net:
            r = net[kind]
            share = r["percent_of_bf16_limit"]
            rows.append(
                (
                    f"bare network, {kind} (fields/s, % of bf16 limit)",
                    f"{r['fields_per_s']:.1f} ({'-' if share is None else f'{share:.1f}%'})",
                    f">= {GOALS['bare_fields_per_s']:.0f}",
                )
            )
    for kind, _, _ in E2E_CASES:
        if kind in e2e:
            bare = net["graphs" if kind == "graphs" else "eager"]["fields_per_s"]
            case = e2e[kind]
            case["ratio_to_bare"] = case["fields_per_s"] / bare
            # what the chain costs beside the network, per field
            case["ms_per_field_beside_network"] = 1e3 * (1.0 / case["fields_per_s"] - 1.0 / bare)
            rows.append(
                (
                    f".downscale.cm {kind}, {e2e['fields']} fields (fields/s; / bare; ms/field beside it)",
                    f"{case['fields_per_s']:.1f}; {case['ratio_to_bare']:.2f}; "
                    f"{case['ms_per_field_beside_network']:.2f}",
                    f">= {GOALS['e2e_vs_bare']}",
                )
            )
    if "sde" in results:
        s = results["sde"]
        rows.append(
            (
                f"SDE-500 / CM per field, same {s['fields']} fields, eager",
                f"{s['ratio']:.0f}x",
                f">= {GOALS['cm_vs_sde']:.0f}x",
            )
        )
    if "preserve" in results:
        rows.append(
            (
                f"preserve on the device, {results['preserve']['fields']} fields (ms per field)",
                f"{results['preserve']['ms_per_field']:.2f}",
                "-",
            )
        )
    for t in results.get("training", []):
        rows.append(
            (
                f"training steps/s {t['channels']} {t['grid']} batch {t['batch']}"
                + (", compiled" if t["compiled"] else ""),
                f"{t['steps_per_s']:.2f}",
                "-",
            )
        )
    peaks = [
        v["peak_gib"]
        for part in (net, e2e)
        for v in part.values()
        if isinstance(v, dict) and v.get("peak_gib") is not None
    ] + [t["peak_gib"] for t in results.get("training", []) if t["peak_gib"] is not None]
    results["peak_gib"] = max(peaks) if peaks else None
    rows.append(("peak GPU memory (GiB)", f"{results['peak_gib']:.1f}" if peaks else "n/a (CPU)", "-"))
    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'figure'.ljust(width)}  {'value':>20}  goal")
    print("-" * (width + 32))
    for label, value, goal in rows:
        print(f"{label.ljust(width)}  {value:>20}  {goal}")
    print(f"{info['device']}, torch {info['torch']}, {info['date']}; total {results['seconds']:.0f} s")
    args.json.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
