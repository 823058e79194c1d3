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
    assert res["sde"]["ratio"] > 1
    assert res["training"][0]["steps_per_s"] > 0
    assert res["preserve"]["ms_per_field"] > 0
    text = capsys.readouterr().out
    assert "bare network, eager" in text and ".downscale.cm eager" in text and "SDE-500 / CM" in text
    assert "preserve on the device" in text
