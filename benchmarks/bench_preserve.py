"""Benchmark: ``preserve`` (the large-scale correction after denoising) on small and large model grids.

``preserve=True`` is the default of ``.downscale.cm`` and ``.sde``: for precipitation every output field
gets the solved smooth multiplier, the exact per-cell pass and the drizzle rule
(:func:`xdownscale.core.preserve.preserve_means`). This script times it per field against the exact
per-cell pass alone (``smooth=None``: the baseline, a few sparse products per field), and measures the
peak of traced memory (numpy and scipy allocations, ``tracemalloc``) and the set-up of the operators
(:func:`xdownscale.xr.preserve.coarse_cell_operators`), on

* the Iberia grid of the shipped models (41 x 61 fine cells at 0.25 deg, input 4x coarser), and
* the paper's grid size (240 x 384 fine cells, input 4x coarser: 60 x 96 cells),

with ``synthetic_precipitation`` fields (a land mask, dry and wet areas) standing in for the network's
output and their 4 x 4 block means for the input. Before the operators were sparse, the second case held
dense (coarse x fine cells) matrices of 4.2 GB each and did not fit in 24 GB.

Usage::

    python benchmarks/bench_preserve.py              # about a minute on 2 cores
    python benchmarks/bench_preserve.py --fields 8   # fewer fields at 240 x 384
    python benchmarks/bench_preserve.py --json out.json
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


def run(cases: tuple[tuple[str, int, int, int], ...]) -> list[dict[str, Any]]:
    rows = []
    for name, ny, nx, nfields in cases:
        c = case(ny, nx, nfields)
        kw = dict(wet_min=WET_MIN, coarse=c["values"])
        y, ref, cell = c["y"], c["p"], c["cell"]
        default, peak = measure(lambda: preserve_means(y, ref, cell, c["smooth"], **kw))  # noqa: B023
        exact, exact_peak = measure(lambda: preserve_means(y, ref, cell, None, **kw))  # noqa: B023
        out = preserve_means(c["y"], c["p"], c["cell"], c["smooth"], **kw)
        means = _cell_means(out, c["cell"], c["values"].shape[1])
        known = np.isfinite(c["values"])
        error = np.abs(means - c["values"])[known].max() / np.nanmax(c["values"])
        rows.append(
            {
                "case": name,
                "fine_cells": ny * nx,
                "coarse_cells": int(c["values"].shape[1]),
                "fields": nfields,
                "setup_s": c["setup"],
                "default_ms_per_field": 1e3 * default / nfields,
                "exact_only_ms_per_field": 1e3 * exact / nfields,
                "ratio": default / exact,
                "peak_mib": peak,
                "exact_only_peak_mib": exact_peak,
                "largest_mean_error": float(error),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fields", type=int, default=None, help="fields timed at 240 x 384 (default 32)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    cases = tuple((name, ny, nx, args.fields if args.fields and ny > 100 else n) for name, ny, nx, n in CASES)
    rows = run(cases)
    print(
        "| grid | fine / coarse cells | set-up, s | default, ms/field | exact pass only | ratio "
        "| peak MiB (exact only) | largest error of a cell mean / max |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['fine_cells']} / {r['coarse_cells']} | {r['setup_s']:.2f} | "
            f"{r['default_ms_per_field']:.2f} | {r['exact_only_ms_per_field']:.2f} | {r['ratio']:.2f} | "
            f"{r['peak_mib']:.0f} ({r['exact_only_peak_mib']:.0f}) | {r['largest_mean_error']:.1e} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
