"""Run the CPU benchmark suite and print one table of the key figures.

Runs, each as a subprocess with a time limit:

* ``bench_qdm.py --small`` (QDM vs xsdba: speed-up and peak memory ratio),
* ``bench_model.py --quick`` (paper UNet: parameters, GFLOP per forward, CPU fields/s at 64 x 64),
* ``bench_downscale.py --quick`` (pipeline vs bare network, CM vs SDE, memory with record length, workers),
* ``bench_assimilate.py --quick`` (SLAMS / SDA: RMSE and seconds per analysed step),

then prints one table (benchmark, figure, value, goal, machine). The whole run takes about 6 to 10 minutes
on 2 cores. Exits non-zero when a benchmark crashes, times out or prints none of its figures.
``benchmarks/evaluate_iberia.py`` (the real-data skill report) is not run here.

Usage::

    python benchmarks/run_all.py
    python benchmarks/run_all.py --only downscale,model --json figures.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
Row = tuple[str, str, str, str]  # benchmark, figure, value, goal


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def machine() -> str:
    import torch

    cuda = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (
        f"{_cpu()} ({len(os.sched_getaffinity(0))} cores, {torch.backends.cpu.get_cpu_capability()}), "
        f"torch {torch.__version__}{cuda}"
    )


def _find(pattern: str, text: str) -> re.Match[str]:
    m = re.search(pattern, text)
    if m is None:
        raise ValueError(f"expected output matching {pattern!r} not found")
    return m


def parse_qdm(out: str, _: Path) -> list[Row]:
    m = _find(r"speed-up vs xsdba \(wall clock\): ([\d.]+)x \((\d+) threads\), ([\d.]+)x \(1 thread\)", out)
    mem = _find(r"peak memory ratio xdownscale/xsdba: RSS ([\d.]+), traced ([\d.]+)", out)
    agree = _find(r"value range of sim = ([\d.e+-]+)", out)
    return [
        ("qdm --small", f"speed-up vs xsdba, {m.group(2)} threads", f"{m.group(1)}x", ">= 10x"),
        ("qdm --small", "speed-up vs xsdba, 1 thread", f"{m.group(3)}x", ">= 10x"),
        ("qdm --small", "peak memory xdownscale/xsdba (RSS)", mem.group(1), "<= 1"),
        ("qdm --small", "peak memory xdownscale/xsdba (traced)", mem.group(2), "<= 1"),
        ("qdm --small", "max |difference| / range vs xsdba", agree.group(1), "-"),
    ]


def parse_model(out: str, _: Path) -> list[Row]:
    params = _find(r"parameters: [\d,]+ \(([\d.]+) M\)", out)
    gflop = _find(r"GFLOP per forward at 240x384: ([\d.]+)", out)
    cpu = _find(r"\ncpu\s+(\d+x\d+)\s+([\d.]+)\s+(\S+)", out)
    return [
        ("model --quick", "paper UNet parameters", f"{params.group(1)} M", "~27 M"),
        ("model --quick", "GFLOP per forward at 240x384", gflop.group(1), "~660"),
        ("model --quick", f"CPU fp32 fields/s at {cpu.group(1)}, batch 1", cpu.group(2), "-"),
        ("model --quick", f"CPU bf16 fields/s at {cpu.group(1)}", cpu.group(3), "-"),
        ("model --quick", "GPU fields/s at 240x384 bf16", "not measured (no GPU)", ">= 600"),
    ]


def parse_downscale(_: str, js: Path) -> list[Row]:
    r = json.loads(js.read_text())
    a, b, c, d = r["e2e_vs_bare"], r["cm_vs_sde"], r["memory_20y_vs_1y"], r["workers_2_vs_1"]
    short, long = c["days"]
    return [
        (
            "downscale --quick",
            f".downscale.cm / bare network speed (shipped CM, {a['fields']} fields, CPU fp32)",
            f"{a['ratio']:.2f}",
            ">= 0.9",
        ),
        (
            "downscale --quick",
            f"SDE 500 steps / CM per field, shipped models ({b['steps_measured']} steps scaled)",
            f"{b['ratio']:.0f}x",
            ">= 400x",
        ),
        (
            "downscale --quick",
            f"same, CM on the same {b['fields']} fields in one call",
            f"{b['ratio_one_call']:.0f}x",
            "-",
        ),
        (
            "downscale --quick",
            f"peak RSS {long} d / {short} d (quick for 20 y / 1 y)",
            f"{c['ratio']:.2f}",
            "<= 1.2",
        ),
        (
            "downscale --quick",
            f"LocalCluster 2 workers vs 1 ({d['days']} d)",
            f"{d['ratio']:.2f}x",
            ">= 1.7x",
        ),
    ]


def parse_assimilate(_: str, js: Path) -> list[Row]:
    rows: list[Row] = []
    for r in json.loads(js.read_text()):
        if "rmse" in r:
            goal = "-" if r["case"].startswith("background") else "< background"
            rows.append(("assimilate --quick", f"RMSE {r['case']}", f"{r['rmse']:.3f}", goal))
        if "rmse_withheld_stations" in r:
            rows.append(
                (
                    "assimilate --quick",
                    f"RMSE withheld {r['case']}",
                    f"{r['rmse_withheld_stations']:.3f}",
                    "-",
                )
            )
        if "seconds_per_step" in r:
            rows.append(
                ("assimilate --quick", f"s per step {r['case']}", f"{r['seconds_per_step']:.2f}", "-")
            )
    return rows


SUITE = {
    "qdm": (["bench_qdm.py", "--small"], False, 240, parse_qdm),
    "model": (["bench_model.py", "--quick"], False, 120, parse_model),
    "downscale": (["bench_downscale.py", "--quick"], True, 240, parse_downscale),
    "assimilate": (["bench_assimilate.py", "--quick"], True, 300, parse_assimilate),
}


def run(name: str, tmp: Path) -> tuple[list[Row], str | None, float]:
    """Run one benchmark; its rows, an error message (None when it ran) and its wall time."""
    args, wants_json, timeout, parse = SUITE[name]
    js = tmp / f"{name}.json"
    cmd = [sys.executable, str(HERE / args[0]), *args[1:]] + (["--json", str(js)] if wants_json else [])
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return [], f"timed out after {timeout} s", time.time() - t0
    seconds = time.time() - t0
    if proc.returncode != 0:
        return [], f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}", seconds
    try:
        return parse(proc.stdout, js), None, seconds
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as exc:
        return [], f"could not read its figures ({exc}); output:\n{proc.stdout[-1500:]}", seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(SUITE), help=f"comma-separated subset of {','.join(SUITE)}")
    p.add_argument("--json", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SUITE))
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {list(SUITE)}")
    where = machine()
    print(f"machine: {where}; load average {os.getloadavg()[0]:.1f}", flush=True)
    rows: list[Row] = []
    failed: dict[str, str] = {}
    t_start = time.time()
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            print(f"running {name} ...", flush=True)
            got, error, seconds = run(name, Path(d))
            print(f"  {name}: {'FAILED' if error else 'done'} in {seconds:.0f} s", flush=True)
            if error:
                failed[name] = error
                rows.append((name, "FAILED", error.splitlines()[0][:60], "-"))
            rows.extend(got)
    short = f"{_cpu()} {len(os.sched_getaffinity(0))}c"
    titles = ("benchmark", "figure", "value", "goal", "machine")
    table = [(*r, short) for r in rows]
    widths = [max(len(r[i]) for r in [titles, *table]) for i in range(5)]
    print()
    print(f"machine: {where}")
    header = "  ".join(h.ljust(w) for h, w in zip(titles, widths, strict=True))
    print(header)
    print("-" * len(header))
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    print(f"total {time.time() - t_start:.0f} s")
    for name, error in failed.items():
        print(f"\n{name} failed: {error}", file=sys.stderr)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": where,
                    "date": time.strftime("%Y-%m-%d"),
                    "rows": [
                        dict(zip(("benchmark", "figure", "value", "goal"), r, strict=True)) for r in rows
                    ],
                    "failed": failed,
                },
                indent=1,
            )
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
