"""Benchmark: the downscaling pipeline - overhead, CM vs SDE, memory with record length, Dask scaling.

Each figure is a ratio of two timings (or two peak memories) measured in the same run on the same machine:

a. ``.downscale.cm`` end to end (units, regrid, low-pass, transform, keyed noise, network, inverse transform,
   mask) with the shipped CM (``cm-eobs-iberia-0.25deg-pr``, UNet (48, 96, 96) on the 41 x 61 E-OBS grid)
   against its bare ``model.network(x, sigma)`` forward on the same number of fields with the same batch
   size under ``torch.no_grad`` (goal >= 0.9: the pipeline keeps 90% of the network's speed). The input is
   the shipped demo sample (8 coarse fields) repeated, each repeat scaled by a random factor: 365 fields by
   default (a year of daily fields), 128 in quick mode;
b. the shipped SDE bridge (500 steps) against the shipped one-step CM, same device, same 8 fields, same
   batch (goal >= 400x). The CM time per field is that of the 365-field call of (a) (throughput); the
   CM on the same 8 fields in one call, where its fixed per-call cost weighs 8 fields only, is reported
   beside it;
c. peak resident memory (VmHWM) of writing the downscaled result of 20 years vs 1 year of lazy (dask) daily
   input to zarr, each case in its own subprocess (goal <= 1.2x);
d. ``.compute()`` on a ``distributed.LocalCluster`` with 2 single-threaded worker processes vs 1
   (goal >= 1.7x; bounded by the free cores of the machine).

For c and d, where thousands of fields are downscaled, a tiny CM (channels (8, 16) on a 32 x 48 grid) is
trained here for 5 steps (the weights do not change the cost), on lazy gamma-distributed noise on the 4x
coarser grid (``dask.array.random``, fixed seed, time chunks of 32), so 20 years never sit in memory. Scale
"300 km" for the shipped models, "200 km" for the tiny one (explicit: "auto" would need a spectrum pass).

torch runs on one thread (``--threads``, default 1): on this shared 2-core machine two torch threads were
several times slower than one. Timings are the best of ``--repeat`` runs after one warm-up, the compared
cases run in turn (a, b, a, b, ...), so that a change of load hits both.

Usage::

    python benchmarks/bench_downscale.py --quick   # about 2-3 minutes on 2 cores (shorter cases, scaled)
    python benchmarks/bench_downscale.py           # about 5-6 minutes on 2 cores (7300 days, 500 SDE steps)
    python benchmarks/bench_downscale.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

GOALS = {
    "e2e_vs_bare": (">=", 0.9),
    "cm_vs_sde": (">=", 400.0),
    "memory_20y_vs_1y": ("<=", 1.2),
    "workers_2_vs_1": (">=", 1.7),
}
SCALE = "200 km"


def machine_info() -> dict[str, Any]:
    """CPU model, cores available to this process, torch version and CPU capability."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "load_average": round(os.getloadavg()[0], 1),
        "torch": torch.__version__,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _best(fn: Any, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _coarse(fine: Any, factor: int = 4) -> Any:
    """Block means of the fine field with CF attributes (an ESM-like coarse input)."""
    from xdownscale.datasets import coarsen_like_esm

    coarse = coarsen_like_esm(fine.fillna(0.0), factor).astype("float32")
    coarse.attrs = {"units": "mm/day", "standard_name": "lwe_precipitation_rate"}
    coarse.name = "pr"
    for c in ("lat", "lon"):
        coarse[c].attrs = dict(fine[c].attrs)
    return coarse


def _train(kind: str, data: Any, out: Path, channels: tuple[int, ...], steps: int = 5) -> Path:
    import xdownscale

    return Path(
        xdownscale.train(
            kind=kind,
            data=data,
            variable="pr",
            out=out,
            name=f"bench-{kind}-{data.sizes['lat']}x{data.sizes['lon']}",
            steps=steps,
            channels=channels,
            batch_size=8,
            checkpoint_every=None,
            progress=False,
        )
    )


# -- a. end to end vs bare network ------------------------------------------------------------------------
SHIPPED_CM = "cm-eobs-iberia-0.25deg-pr"
SHIPPED_SDE = "sde-eobs-iberia-0.25deg-pr"
SHIPPED_SCALE = "300 km"


def shipped_input(nfields: int, seed: int = 0) -> Any:
    """``nfields`` coarse daily fields over Iberia: the shipped demo sample (8 fields on an 8 x 12 grid,
    kg m-2 s-1) repeated, each repeat scaled by a lognormal factor so that no two fields are equal."""
    import pandas as pd
    import xarray as xr

    from xdownscale.demo import SAMPLE

    sample = xr.open_dataset(SAMPLE)["pr"].load()
    reps = -(-nfields // sample.sizes["time"])
    factors = np.random.default_rng(seed).lognormal(0.0, 0.3, reps).astype(np.float32)
    data = np.concatenate([sample.values * f for f in factors])[:nfields]
    return xr.DataArray(
        data,
        dims=sample.dims,
        coords={
            "time": pd.date_range("2031-12-01", periods=nfields, freq="D"),
            "lat": sample["lat"],
            "lon": sample["lon"],
        },
        attrs=dict(sample.attrs),
        name="pr",
    )


def _interleaved(fns: dict[str, Any], repeat: int) -> dict[str, float]:
    """Best-of-``repeat`` wall time of each function, the functions run in turn (a, b, a, b, ...) after one
    warm-up each, so that a change of machine load hits all of them alike."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def bench_e2e(nfields: int, batch: int, repeat: int) -> dict[str, Any]:
    """``.downscale.cm`` with the shipped CM on ``nfields`` fields against its bare network on as many."""
    import torch

    import xdownscale

    x_in = shipped_input(nfields)
    model = xdownscale.load_model(SHIPPED_CM)

    def e2e() -> None:
        x_in.downscale.cm(
            model=SHIPPED_CM, scale=SHIPPED_SCALE, progress=False, precision="fp32", batch_size=batch
        ).load()

    first = x_in.isel(time=slice(0, 1)).downscale.cm(model=SHIPPED_CM, scale=SHIPPED_SCALE, progress=False)
    sigma = float(first.attrs["downscale_scale_sigma"])
    ny, nx = model.shape
    x = torch.randn(nfields, 1, ny, nx, generator=torch.Generator().manual_seed(0))

    def bare() -> None:
        with torch.no_grad():
            for start in range(0, nfields, batch):
                model.network(x[start : start + batch], sigma)

    t = _interleaved({"e2e": e2e, "bare": bare}, repeat)
    return {
        "model": SHIPPED_CM,
        "fields": nfields,
        "batch": batch,
        "grid": f"{ny}x{nx}",
        "e2e_s": t["e2e"],
        "bare_s": t["bare"],
        "e2e_fields_per_s": nfields / t["e2e"],
        "bare_fields_per_s": nfields / t["bare"],
        "ratio": t["bare"] / t["e2e"],
    }


# -- b. CM vs SDE ----------------------------------------------------------------------------------------
def bench_sde(
    nfields: int, batch: int, steps: int, full_steps: int, cm_fields: int, repeat: int
) -> dict[str, Any]:
    """SDE bridge (``full_steps`` steps; ``steps`` timed and scaled) against the one-step CM, both shipped
    models, on the same ``nfields`` fields with the same batch size. The CM is timed twice: on these
    fields in one call (its fixed per-call cost shared by ``nfields`` fields) and per field of a
    ``cm_fields``-field call (throughput)."""
    x_in = shipped_input(nfields)
    x_many = shipped_input(cm_fields)

    def cm(x: Any) -> None:
        x.downscale.cm(
            model=SHIPPED_CM, scale=SHIPPED_SCALE, progress=False, precision="fp32", batch_size=batch
        ).load()

    def sde(n: int) -> None:
        x_in.downscale.sde(
            model=SHIPPED_SDE,
            scale=SHIPPED_SCALE,
            steps=n,
            progress=False,
            precision="fp32",
            batch_size=batch,
        ).load()

    t = _interleaved({"few": lambda: cm(x_in), "many": lambda: cm(x_many)}, repeat)
    sde(2)  # warm-up (model load, first calls)
    t0 = time.perf_counter()
    sde(steps)
    t_sde = (time.perf_counter() - t0) * full_steps / steps
    cm_call = t["few"] / nfields
    cm_throughput = t["many"] / cm_fields
    return {
        "fields": nfields,
        "batch": batch,
        "steps_measured": steps,
        "steps": full_steps,
        "cm_s_per_field": cm_throughput,
        "cm_s_per_field_one_call": cm_call,
        "cm_fields_throughput": cm_fields,
        "sde_s_per_field": t_sde / nfields,
        "ratio": t_sde / nfields / cm_throughput,
        "ratio_one_call": t_sde / nfields / cm_call,
    }


# -- c. peak memory, one subprocess per case ------------------------------------------------------------
def lazy_input(model_path: Path, ndays: int, chunk: int = 32, seed: int = 0) -> Any:
    """Lazy gamma-distributed daily input (mm/day) on the 4x coarser grid of the model's domain."""
    import dask.array as dsa
    import pandas as pd
    import xarray as xr

    import xdownscale
    from xdownscale.datasets import synthetic_precipitation

    ny, nx = xdownscale.load_model(model_path).shape
    template = _coarse(synthetic_precipitation(ny=ny, nx=nx, ntime=1))
    data = (
        dsa.random.RandomState(seed)
        .gamma(0.8, 3.0, size=(ndays, template.sizes["lat"], template.sizes["lon"]), chunks=(chunk, -1, -1))
        .astype(np.float32)
    )
    return xr.DataArray(
        data,
        dims=("time", "lat", "lon"),
        coords={
            "time": pd.date_range("1981-01-01", periods=ndays, freq="D"),
            "lat": template["lat"],
            "lon": template["lon"],
        },
        attrs=dict(template.attrs),
        name="pr",
    )


def _peak_rss_mib() -> float:
    """Peak resident memory of this process: VmHWM (reset at exec, unlike ``ru_maxrss``, which a child
    started by ``subprocess`` inherits from its parent's size at fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_worker(model_path: Path, ndays: int, store: Path, threads: int) -> dict[str, Any]:
    """Downscale ``ndays`` of lazy input to a zarr store; peak RSS of this process (MiB)."""
    import psutil
    import torch

    torch.set_num_threads(threads)
    import xdownscale

    xdownscale.load_model(model_path)  # imports and one model load count as the baseline
    base = psutil.Process().memory_info().rss / 2**20
    t0 = time.perf_counter()
    out = lazy_input(model_path, ndays).downscale.cm(model=model_path, scale=SCALE, progress=False)
    out.to_dataset().to_zarr(store, mode="w")
    seconds = time.perf_counter() - t0
    peak = _peak_rss_mib()
    return {"days": ndays, "peak_rss_mib": peak, "baseline_rss_mib": base, "seconds": seconds}


def bench_memory(model_path: Path, tmp: Path, days: tuple[int, int], threads: int) -> dict[str, Any]:
    res = []
    for n in days:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "memory",
            "--model",
            str(model_path),
            "--days",
            str(n),
            "--store",
            str(tmp / f"out-{n}.zarr"),
            "--threads",
            str(threads),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker ({n} days) failed:\n{proc.stderr[-3000:]}")
        res.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    short, long = res
    return {
        "days": days,
        "short": short,
        "long": long,
        "ratio": long["peak_rss_mib"] / short["peak_rss_mib"],
        "growth_mib": long["peak_rss_mib"] - short["peak_rss_mib"],
    }


# -- d. LocalCluster 2 workers vs 1 ---------------------------------------------------------------------
def _load_on_worker(path: str, sha256: str) -> None:
    from xdownscale.models.inference import cached_model

    cached_model(path, sha256, "cpu")


def bench_cluster(model_path: Path, ndays: int) -> dict[str, Any]:
    from distributed import Client, LocalCluster

    import xdownscale

    sha = xdownscale.load_model(model_path).sha256
    times = {}
    for k in (1, 2):
        with (
            LocalCluster(
                n_workers=k, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=50
            ) as cluster,
            Client(cluster) as client,
        ):
            client.run(_load_on_worker, str(model_path), sha)  # imports + model in every worker
            out = lazy_input(model_path, ndays).downscale.cm(model=model_path, scale=SCALE, progress=False)
            out.isel(time=slice(0, 32 * k)).compute()  # warm-up
            t0 = time.perf_counter()
            out.compute()
            times[k] = time.perf_counter() - t0
    return {"days": ndays, "t1_s": times[1], "t2_s": times[2], "ratio": times[1] / times[2]}


# -- driver ---------------------------------------------------------------------------------------------
def _verdict(key: str, value: float) -> str:
    op, goal = GOALS[key]
    ok = value >= goal if op == ">=" else value <= goal
    return "met" if ok else "MISSED"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter cases (about 2 minutes on 2 cores)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--repeat", type=int, default=2, help="timed runs per case, best kept (default 2)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", choices=["memory"], help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--days", type=int, help=argparse.SUPPRESS)
    p.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.worker == "memory":
        print(json.dumps(memory_worker(args.model, args.days, args.store, args.threads)))
        return 0

    import torch

    torch.set_num_threads(args.threads)
    from xdownscale.datasets import synthetic_precipitation

    if args.quick:
        cfg = dict(e2e_fields=128, sde_fields=8, sde_steps=25, mem_days=(31, 730), cluster_days=256)
    else:
        cfg = dict(e2e_fields=365, sde_fields=8, sde_steps=500, mem_days=(365, 7300), cluster_days=730)
    info = machine_info()
    print(
        f"machine: {info['cpu']}, {info['cores']} cores (load average {info['load_average']}), "
        f"torch {info['torch']} ({info['capability']}), CUDA: {info['cuda'] or 'none'}; "
        f"torch threads {args.threads}; {'quick' if args.quick else 'default'} mode",
        flush=True,
    )
    t_start = time.time()
    results: dict[str, Any] = {"machine": info, "mode": "quick" if args.quick else "default"}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        small = synthetic_precipitation(ny=32, nx=48, ntime=40, mask=True)
        small.name = "pr"
        t0 = time.time()
        small_path = _train("cm", small, tmp / "cm-small", (8, 16))
        print(f"  trained a tiny model for c and d (5 steps) in {time.time() - t0:.0f} s", flush=True)

        results["e2e_vs_bare"] = bench_e2e(cfg["e2e_fields"], 8, args.repeat)
        print(f"  a. end to end vs bare: {results['e2e_vs_bare']['ratio']:.2f}", flush=True)
        results["cm_vs_sde"] = bench_sde(
            cfg["sde_fields"], 8, cfg["sde_steps"], 500, cfg["e2e_fields"], args.repeat
        )
        print(f"  b. CM vs SDE: {results['cm_vs_sde']['ratio']:.0f}x", flush=True)
        results["memory_20y_vs_1y"] = bench_memory(small_path, tmp, cfg["mem_days"], args.threads)
        print(f"  c. memory: {results['memory_20y_vs_1y']['ratio']:.2f}", flush=True)
        results["workers_2_vs_1"] = bench_cluster(small_path, cfg["cluster_days"])
        print(f"  d. 2 workers vs 1: {results['workers_2_vs_1']['ratio']:.2f}", flush=True)

    a, b, c, dd = (results[k] for k in GOALS)
    short_d, long_d = c["days"]
    sde_note = (
        f"SDE {b['steps_measured']} steps timed, scaled x{500 / b['steps_measured']:.0f} to 500"
        if b["steps_measured"] != 500
        else "SDE 500 steps timed"
    )
    rows = [
        (
            "e2e_vs_bare",
            ".downscale.cm / bare network (speed)",
            f"{a['ratio']:.2f}",
            f"shipped CM, {a['fields']} fields {a['grid']}, batch {a['batch']}, fp32: "
            f"{a['e2e_fields_per_s']:.1f} vs {a['bare_fields_per_s']:.1f} fields/s",
        ),
        (
            "cm_vs_sde",
            "SDE bridge (500 steps) / CM time per field",
            f"{b['ratio']:.0f}x",
            f"shipped models, {b['fields']} fields 41x61, batch {b['batch']}: SDE "
            f"{b['sde_s_per_field']:.2f} s, CM {b['cm_s_per_field'] * 1e3:.1f} ms per field of a "
            f"{b['cm_fields_throughput']}-field call ({b['cm_s_per_field_one_call'] * 1e3:.1f} ms and "
            f"{b['ratio_one_call']:.0f}x on the same {b['fields']} fields in one call); {sde_note}",
        ),
        (
            "memory_20y_vs_1y",
            f"peak RSS {long_d} d / {short_d} d to zarr",
            f"{c['ratio']:.2f}",
            f"{c['long']['peak_rss_mib']:.0f} vs {c['short']['peak_rss_mib']:.0f} MiB "
            f"(baseline after imports {c['short']['baseline_rss_mib']:.0f} MiB), 8x12 -> 32x48, chunks 32 d",
        ),
        (
            "workers_2_vs_1",
            "LocalCluster 1 worker / 2 workers time",
            f"{dd['ratio']:.2f}",
            f"{dd['days']} d, 8x12 -> 32x48: {dd['t1_s']:.1f} s vs {dd['t2_s']:.1f} s",
        ),
    ]
    print()
    header = f"{'figure':<44}{'value':>8}{'goal':>8}  {'verdict':<8}details"
    print(header)
    print("-" * len(header))
    for key, label, value, details in rows:
        op, goal = GOALS[key]
        verdict = _verdict(key, results[key]["ratio"])
        print(f"{label:<44}{value:>8}{op + format(goal, 'g'):>8}  {verdict:<8}{details}")
    notes = []
    if args.quick:
        notes.append(
            f"quick mode: memory is {long_d} d vs {short_d} d (not 20 y vs 1 y); {sde_note}; "
            f"cluster on {dd['days']} d"
        )
    notes.append(
        f"{info['cores']} cores shared with other jobs (load average {info['load_average']}): "
        "the 2-worker figure is bounded by the free cores"
    )
    for n in notes:
        print(f"note: {n}")
    print(f"total {time.time() - t_start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
