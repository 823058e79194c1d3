"""``benchmarks/bench_gpu.py`` runs on the CPU (tiny grid and network, no compilation) and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def test_bench_gpu_quick_on_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu.json"
    assert bench.main(["--quick", "--device", "cpu", "--json", str(out)]) == 0
    assert "XDOWNSCALE_COMPILE" not in os.environ  # restored
    res = json.loads(out.read_text())
    assert res["quick"] and res["grid"] == [16, 24]
    assert res["network"]["eager"]["fields_per_s"] > 0
    assert res["network"]["gflop_per_forward"] > 0
    assert "compiled" not in res["network"]  # no compilation on the CPU unless asked
    assert res["e2e"]["eager"]["fields_per_s"] > 0 and res["e2e"]["eager"]["ratio_to_bare"] > 0
    assert res["e2e"]["eager"]["route"] == "device"  # both routes, on the CPU too
    assert res["e2e"]["eager, xarray preparation"]["route"] == "host"
    assert "ms_per_field_beside_network" in res["e2e"]["eager, xarray preparation"]
    assert res["sde"]["ratio"] > 1
    assert res["training"][0]["steps_per_s"] > 0
    assert res["preserve"]["ms_per_field"] > 0
    text = capsys.readouterr().out
    assert "bare network, eager" in text and ".downscale.cm eager" in text and "SDE-500 / CM" in text
    assert "preserve on the device" in text and "eager, xarray preparation" in text


def test_bench_gpu_e2e_only_skips_the_rest(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu.json"
    argv = [
        "--quick",
        "--device",
        "cpu",
        "--e2e-only",
        "--grid",
        "8x16",
        "--channels",
        "8",
        "--json",
        str(out),
    ]
    assert bench.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["grid"] == [8, 16] and "e2e" in res
    assert not {"sde", "preserve", "training"} & set(res)


def test_bench_gpu_makes_the_paper_grid() -> None:
    """The full run's inputs: a global 240 x 384 field (0.75 deg) and its 60 x 96 block means."""
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    fine = bench.global_field(240, 384, ntime=2)
    assert fine.shape == (2, 240, 384)
    assert float(fine["lat"][0]) == pytest.approx(-89.625) and float(fine["lon"][-1]) == pytest.approx(
        359.0625
    )
    coarse = bench.coarse_input(fine, 3)
    assert coarse.shape == (3, 60, 96)
    assert float(coarse["lat"][0]) == pytest.approx(-88.5)  # 3 deg cells


def test_the_gpu_check_script_parses_and_names_its_steps() -> None:
    import subprocess

    script = SCRIPT.parent / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    text = script.read_text()
    assert "-m gpu" in text and "bench_gpu.py --json" in text and "gpu-wheels.sh" in text
