"""Benchmark: xdownscale's quantile delta mapping against xsdba's ``QuantileDeltaMapping``.

Same synthetic daily precipitation for both (gamma distributed, float32, dims (time, lat, lon), default
5475 x 60 x 96 = 15 years on a 60 x 96 grid), 500 quantiles, multiplicative, group "time": fit on
(ref, hist), adjust sim. Prints the agreement (max abs difference / value range of sim), the speed ratio
and the peak memory of each.

Every measurement runs in its own subprocess (the data are generated there from the same seed), so the two
libraries cannot share caches, memory or imported state:

* time: wall clock (and CPU time) of fit + adjust, after a warm-up on a few cells (that warm-up keeps
  numba's one-off JIT compilation out of xsdba's time). The three cases (xdownscale on all CPUs,
  xdownscale on one thread, xsdba) run in turn for ``--rounds`` (2) rounds, so that a change of the
  machine's load hits all of them; each xdownscale run is the best of ``--repeat`` (3) fits, each xsdba
  run one fit; the best round of each case is kept. The peak resident memory of that process above its
  level before the first run is reported too ("peak RSS");
* memory: a separate run under ``tracemalloc`` (peak of the numpy/Python allocations during fit + adjust;
  allocations made inside numba-compiled code are not seen by it).

xdownscale runs on all CPUs by default (numpy releases the GIL while sorting); it is also timed on one
thread (``DEFAULT_THREADS = 1``), since xsdba runs on one. When xsdba is estimated to need more than
``--max-xsdba-seconds`` at full size, it is measured on a subset of the cells and its time scaled to the
full grid (the output says so).

Usage::

    python benchmarks/bench_qdm.py            # full size
    python benchmarks/bench_qdm.py --small    # a quick run (1000 x 8 x 12)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np


def make_data(ntime: int, ny: int, nx: int, seed: int = 0):
    """ref, hist, sim: gamma-distributed daily precipitation (mm/d), float32, generated in slices."""
    import pandas as pd
    import xarray as xr

    rng = np.random.default_rng(seed)
    coords = {
        "time": pd.date_range("1981-01-01", periods=ntime, freq="D"),
        "lat": np.linspace(-60.0, 60.0, ny),
        "lon": np.linspace(0.0, 360.0, nx, endpoint=False),
    }
    out = []
    for shape, scale in ((0.9, 3.0), (0.7, 2.0), (0.6, 3.0)):
        data = np.empty((ntime, ny, nx), dtype=np.float32)
        for t in range(0, ntime, 256):
            data[t : t + 256] = rng.gamma(shape, scale, (min(256, ntime - t), ny, nx))
        out.append(
            xr.DataArray(
                data, dims=("time", "lat", "lon"), coords=coords, name="pr", attrs={"units": "mm d-1"}
            )
        )
    return out


def run_ours(ref, hist, sim, nquantiles: int):
    from xdownscale.xr.qdm import QDM

    return QDM.fit(ref, hist, kind="*", nquantiles=nquantiles, group="time").adjust(sim)


def run_xsdba(ref, hist, sim, nquantiles: int):
    import xsdba

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qdm = xsdba.QuantileDeltaMapping.train(ref, hist, nquantiles=nquantiles, kind="*", group="time")
        return qdm.adjust(sim).transpose(*sim.dims).load()


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def worker(args: argparse.Namespace) -> None:
    """One measurement in this process; writes a JSON result (and the output as .npy)."""
    if args.threads:
        import xdownscale.core.qdm as core

        core.DEFAULT_THREADS = args.threads
    ref, hist, sim = make_data(args.ntime, args.ny, args.nx)
    if args.cells < args.ny * args.nx:  # a subset of whole latitude rows
        rows = max(1, args.cells // args.nx)
        ref, hist, sim = (da.isel(lat=slice(0, rows)) for da in (ref, hist, sim))
    func = run_ours if args.worker == "ours" else run_xsdba
    small = {"lat": slice(0, 1), "lon": slice(0, min(4, args.nx))}
    func(ref.isel(small), hist.isel(small), sim.isel(small), args.nquantiles)  # warm-up (numba JIT)
    result: dict = {"cells": int(sim.sizes["lat"] * sim.sizes["lon"])}
    if args.mode == "time":
        base = _rss_kib()
        best, best_cpu = float("inf"), float("inf")
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            out = func(ref, hist, sim, args.nquantiles)
            best = min(best, time.perf_counter() - t0)
            best_cpu = min(best_cpu, time.process_time() - c0)
        result["seconds"] = best
        result["cpu_seconds"] = best_cpu
        result["peak_rss_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        np.save(args.save, np.asarray(out.values))
    else:
        tracemalloc.start()
        tracemalloc.reset_peak()
        func(ref, hist, sim, args.nquantiles)
        result["traced_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    Path(args.result).write_text(json.dumps(result))


def measure(which: str, mode: str, args: argparse.Namespace, tmp: Path, cells: int, threads: int = 0) -> dict:
    tag = f"{which}-{mode}-{cells}-{threads}"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        which,
        "--mode",
        mode,
        "--ntime",
        str(args.ntime),
        "--ny",
        str(args.ny),
        "--nx",
        str(args.nx),
        "--nquantiles",
        str(args.nquantiles),
        "--repeat",
        str(args.repeat),
        "--cells",
        str(cells),
        "--threads",
        str(threads),
        "--result",
        str(tmp / f"{tag}.json"),
        "--save",
        str(tmp / f"{tag}.npy"),
    ]
    subprocess.run(cmd, check=True)
    res = json.loads((tmp / f"{tag}.json").read_text())
    res["output"] = tmp / f"{tag}.npy"
    return res


def _best(old: dict | None, new: dict) -> dict:
    """The faster of two timing results (``old`` may be None)."""
    return new if old is None or new["seconds"] < old["seconds"] else old


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="quick run on 1000 x 8 x 12")
    p.add_argument("--ntime", type=int, default=5475)
    p.add_argument("--ny", type=int, default=60)
    p.add_argument("--nx", type=int, default=96)
    p.add_argument("--nquantiles", type=int, default=500)
    p.add_argument("--repeat", type=int, default=3, help="timed runs of xdownscale (the best is kept)")
    p.add_argument("--max-xsdba-seconds", type=float, default=300.0)
    p.add_argument("--rounds", type=int, default=2, help="rounds of (ours, ours 1 thread, xsdba) in turn")
    # internal: one measurement in a subprocess
    p.add_argument("--worker", choices=["ours", "xsdba"], help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["time", "memory"], default="time", help=argparse.SUPPRESS)
    p.add_argument("--cells", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.small:
        args.ntime, args.ny, args.nx = 1000, 8, 12
    if args.worker:
        worker(args)
        return

    ncells = args.ny * args.nx
    print(
        f"QDM benchmark: time={args.ntime}, lat={args.ny}, lon={args.nx} ({ncells} cells), float32, "
        f"{args.nquantiles} quantiles, kind='*', group='time'; {len(os.sched_getaffinity(0))} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        # xsdba: estimate its full-size time on a few latitude rows first
        probe_rows = max(1, args.ny // 16)
        probe = measure(
            "xsdba", "time", argparse.Namespace(**{**vars(args), "repeat": 1}), tmp, probe_rows * args.nx
        )
        estimate = probe["seconds"] * ncells / probe["cells"]
        xs_cells = ncells
        if estimate > args.max_xsdba_seconds:
            rows = max(1, int(args.ny * args.max_xsdba_seconds / estimate / 2))
            xs_cells = rows * args.nx
        xs_args = argparse.Namespace(**{**vars(args), "repeat": 1})
        # the cases in turn, round after round (ours, ours on 1 thread, xsdba, ours, ...): a change of the
        # machine's load hits all of them; the best round of each is kept
        ours = ours1 = xs = None
        for _ in range(args.rounds):
            ours = _best(ours, measure("ours", "time", args, tmp, ncells))
            ours1 = _best(ours1, measure("ours", "time", args, tmp, ncells, threads=1))
            if xs_cells == probe["cells"] and xs is None:
                xs = probe
            else:
                xs = _best(xs, measure("xsdba", "time", xs_args, tmp, xs_cells))
        assert ours is not None and ours1 is not None and xs is not None
        ours_mem = measure("ours", "memory", args, tmp, ncells)
        xs_mem = measure("xsdba", "memory", args, tmp, xs_cells)
        scale = ncells / xs["cells"]
        xs_seconds = xs["seconds"] * scale

        a = np.load(ours["output"])
        b = np.load(xs["output"])
        a = a[:, : b.shape[1]]
        sim_range = float(np.ptp(make_data(args.ntime, args.ny, args.nx)[2].values[:, : b.shape[1]]))
        agreement = float(np.nanmax(np.abs(a.astype(np.float64) - b))) / sim_range
        same_nan = bool(np.array_equal(np.isnan(a), np.isnan(b)))

    def row(name: str, res: dict, traced: float, factor: float = 1.0, note: str = "") -> None:
        print(
            f"  {name:<30s} {res['seconds'] * factor:8.2f} s wall {res['cpu_seconds'] * factor:8.2f} s CPU"
            f"   peak RSS {res['peak_rss_mib']:6.0f} MiB   traced peak {traced:6.0f} MiB{note}"
        )

    nthreads = len(os.sched_getaffinity(0))
    print("fit + adjust (best of runs; CPU time of all threads; memory above the input data):")
    row(f"xdownscale ({nthreads} threads)", ours, ours_mem["traced_peak_mib"])
    row("xdownscale (1 thread)", ours1, ours_mem["traced_peak_mib"])
    note = ""
    if scale != 1.0:
        note = (
            f"   [measured on {xs['cells']} of {ncells} cells, times scaled x{scale:.1f}; memory not scaled]"
        )
    row("xsdba QuantileDeltaMapping", xs, xs_mem["traced_peak_mib"], scale, note)
    speedup, speedup1 = xs_seconds / ours["seconds"], xs_seconds / ours1["seconds"]
    cpu_ratio = xs["cpu_seconds"] * scale / ours1["cpu_seconds"]
    print(
        f"speed-up vs xsdba (wall clock): {speedup:.1f}x ({nthreads} threads), {speedup1:.1f}x (1 thread); "
        f"CPU time ratio (1 thread): {cpu_ratio:.1f}x"
    )
    rss_ratio = ours["peak_rss_mib"] / max(xs["peak_rss_mib"], 1e-9)
    traced_ratio = ours_mem["traced_peak_mib"] / max(xs_mem["traced_peak_mib"], 1e-9)
    print(f"peak memory ratio xdownscale/xsdba: RSS {rss_ratio:.2f}, traced {traced_ratio:.2f}")
    print(
        f"agreement: max |xdownscale - xsdba| / value range of sim = {agreement:.2e} over {xs['cells']} cells"
        f" (same NaN: {same_nan})"
    )


if __name__ == "__main__":
    main()
