"""Benchmark: ``preserve`` (the large-scale correction after denoising) on small and large model grids.

``preserve=True`` is the default of ``.downscale.cm`` and ``.sde``: for precipitation every output field
gets the solved smooth multiplier, the exact per-cell pass and the drizzle rule
(:func:`xdownscale.core.preserve.preserve_means`), and for a model of coherent rain the grid's rules (the
rain receding from dry input cells, specks and holes removed), timed as their own column. This script
times it per field against the exact per-cell pass alone (``smooth=None``: the baseline, a few scatters
per field), with the smooth field solved both ways (banded Cholesky solves, the CPU's default, and
conjugate gradients, the accelerators' default) on ``--device``, and measures the peak of traced memory on
the CPU (numpy and scipy allocations, ``tracemalloc``; torch's own allocations are not traced) and the
set-up of the operators (:func:`xdownscale.xr.preserve.coarse_cell_operators`), on

* the Iberia grid of the shipped models (41 x 61 fine cells at 0.25 deg, input 4x coarser), and
* the paper's grid size (240 x 384 fine cells, input 4x coarser: 60 x 96 cells),

with ``synthetic_precipitation`` fields (a land mask, dry and wet areas) standing in for the network's
output and their 4 x 4 block means for the input. Before the operators were sparse, the second case held
dense (coarse x fine cells) matrices of 4.2 GB each and did not fit in 24 GB.

Usage::

    python benchmarks/bench_preserve.py              # about a minute on 2 cores
    python benchmarks/bench_preserve.py --fields 8   # fewer fields at 240 x 384
    python benchmarks/bench_preserve.py --json out.json
    python benchmarks/bench_preserve.py --device cuda   # on a GPU (the banded solve runs on the CPU)
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from xdownscale.core.preserve import preserve_means
from xdownscale.datasets import synthetic_precipitation
from xdownscale.xr.preserve import coarse_cell_operators

#: (name, fine rows, fine columns, fields timed)
CASES = (("Iberia 41 x 61", 41, 61, 256), ("paper 240 x 384", 240, 384, 32))
FACTOR = 4
WET_MIN = 0.1


def case(ny: int, nx: int, nfields: int) -> dict[str, Any]:
    """Fields (F, N) with NaN over the sea, their block means (F, M), ``cell`` and ``smooth``."""
    res = 0.25 if ny * 0.25 < 50 else 0.125  # the larger grid at 0.125 deg stays within [-90, 90]
    fine = synthetic_precipitation(ny, nx, nfields, seed=1, mask=True, res=res)
    cy, cx = -(-ny // FACTOR), -(-nx // FACTOR)
    lat, lon = fine.lat.values, fine.lon.values

    clat = lat[0] - res / 2 + FACTOR * res * (np.arange(cy) + 0.5)
    clon = lon[0] - res / 2 + FACTOR * res * (np.arange(cx) + 0.5)
    coarse = xr.DataArray(np.zeros((cy, cx)), dims=("lat", "lon"), coords={"lat": clat, "lon": clon})
    for name in ("lat", "lon"):
        coarse[name].attrs = dict(fine[name].attrs)
    start = time.perf_counter()
    cell, smooth = coarse_cell_operators(fine.isel(time=0), coarse)
    setup = time.perf_counter() - start
    y = fine.transpose("time", "lat", "lon").values.reshape(nfields, -1).astype(np.float64)
    # the input: block means of a perturbed copy, so the correction has work to do everywhere
    rng = np.random.default_rng(2)
    truth = np.where(np.isfinite(y), y * rng.lognormal(0.0, 0.5, y.shape), np.nan)
    values = _cell_means(truth, cell, cy * cx)
    return dict(y=y, p=np.nan_to_num(y), values=values, cell=cell, smooth=smooth, setup=setup)


def _cell_means(x: np.ndarray, cell: np.ndarray, cells: int) -> np.ndarray:
    """Means (F, M) of ``x`` (F, N) over the finite values of each coarse cell."""
    valid = np.isfinite(x[0]) & (cell >= 0)
    counts = np.bincount(cell[valid], minlength=cells)
    sums = np.stack([np.bincount(cell[valid], weights=row[valid], minlength=cells) for row in x])
    return np.divide(sums, counts, out=np.full(sums.shape, np.nan), where=counts > 0)


def measure(fn: Any, repeat: int = 2) -> tuple[float, float]:
    """Best wall time of ``repeat`` runs (s) and the peak traced memory of one more (MiB)."""
    fn()  # warm-up
    best = min(_timed(fn) for _ in range(repeat))
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return best, peak


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(cases: tuple[tuple[str, int, int, int], ...], device: str = "cpu") -> list[dict[str, Any]]:
    import torch

    def sync() -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    rows = []
    for name, ny, nx, nfields in cases:
        c = case(ny, nx, nfields)
        kw = dict(wet_min=WET_MIN, coarse=c["values"], device=device)
        y, ref, cell = c["y"], c["p"], c["cell"]

        def solved(solver: str, smooth: Any = c["smooth"], grid: Any = None) -> np.ndarray:
            out = preserve_means(y, ref, cell, smooth, solver=solver, grid_shape=grid, **kw)  # noqa: B023
            sync()
            return out

        banded, peak = measure(lambda: solved("banded"))
        cg, cg_peak = measure(lambda: solved("cg"))
        exact, exact_peak = measure(lambda: solved("auto", None))
        rules, _ = measure(lambda: solved("banded", grid=(ny, nx)))  # noqa: B023
        out = solved("banded")
        means = _cell_means(out, c["cell"], c["values"].shape[1])
        known = np.isfinite(c["values"])
        error = np.abs(means - c["values"])[known].max() / np.nanmax(c["values"])
        out_cg = solved("cg")
        error_cg = np.abs(_cell_means(out_cg, c["cell"], c["values"].shape[1]) - c["values"])[known].max()
        gap = np.nanmax(np.abs(out_cg - out)) / np.nanmax(out)
        rows.append(
            {
                "case": name,
                "fine_cells": ny * nx,
                "coarse_cells": int(c["values"].shape[1]),
                "fields": nfields,
                "setup_s": c["setup"],
                "device": device,
                "banded_ms_per_field": 1e3 * banded / nfields,
                "cg_ms_per_field": 1e3 * cg / nfields,
                "exact_only_ms_per_field": 1e3 * exact / nfields,
                "grid_rules_ms_per_field": 1e3 * rules / nfields,
                "ratio": banded / exact,
                "peak_mib": peak,
                "cg_peak_mib": cg_peak,
                "exact_only_peak_mib": exact_peak,
                "largest_mean_error": float(error),
                "largest_mean_error_cg": float(error_cg / np.nanmax(c["values"])),
                "cg_vs_banded": float(gap),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fields", type=int, default=None, help="fields timed at 240 x 384 (default 32)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--device", default="cpu", help="where the correction runs (default cpu; e.g. cuda)")
    args = p.parse_args(argv)
    cases = tuple((name, ny, nx, args.fields if args.fields and ny > 100 else n) for name, ny, nx, n in CASES)
    rows = run(cases, args.device)
    print(f"device: {args.device}; ms per field")
    print(
        "| grid | fine / coarse cells | set-up, s | banded solve | conjugate gradients | exact pass only "
        "| banded with the grid's rules | banded / exact only | peak MiB: banded, CG (exact only) "
        "| largest error of a cell mean / max "
        "(CG) | CG vs banded / max |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['fine_cells']} / {r['coarse_cells']} | {r['setup_s']:.2f} | "
            f"{r['banded_ms_per_field']:.2f} | {r['cg_ms_per_field']:.2f} | "
            f"{r['exact_only_ms_per_field']:.2f} | {r['grid_rules_ms_per_field']:.2f} | {r['ratio']:.2f} | "
            f"{r['peak_mib']:.0f}, {r['cg_peak_mib']:.0f} ({r['exact_only_peak_mib']:.0f}) | "
            f"{r['largest_mean_error']:.1e} ({r['largest_mean_error_cg']:.1e}) | {r['cg_vs_banded']:.1e} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
