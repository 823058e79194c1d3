"""``benchmarks/evaluate_iberia.py --report``: the stored scores round-trip, scales and missing values
included, and the page written from them states the spread/skill ratios it was given."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import xarray as xr

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def evaluate() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("evaluate_iberia", BENCHMARKS / "evaluate_iberia.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def _row(method: str, **values: float) -> dict:
    row = {
        "method": method,
        "crps": 0.2,
        "mae_mean": 0.2,
        "rmse_mean": 0.5,
        "spread_skill": float("nan"),
        "spread_skill_log": float("nan"),
        "mean_ratio": np.float32(1.0),
        "wet_freq": 0.15,
        "wet_freq_truth": 0.14,
        "p99": 14.0,
        "p99_truth": 14.6,
        "log_spectral_distance": 2.0,
        "psd_factor_max": 20.0,
        "psd_factor_wavenumber": 0.1,
        "pooled_corr": 0.97,
        "members": np.int64(1),
        "km_per_cell": 24.5,
        "seconds_per_field": 0.001,
        "days": 90,
    }
    row.update(values)
    return row


def test_summary_round_trip_and_report(
    evaluate: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(evaluate, "DOCS", tmp_path)
    monkeypatch.setattr(evaluate, "SUMMARY", tmp_path / "summary.json")
    scale = evaluate.Scale(0.0627, 390.4, 0.807)
    rows = [
        _row("bilinear"),
        _row(
            evaluate.CONSERVING, crps=0.108, log_spectral_distance=0.86, psd_factor_max=3.5, pooled_corr=1.0
        ),
        _row(
            "CM 1 step",
            crps=0.095,
            spread_skill=1.49,
            spread_skill_log=0.8,
            log_spectral_distance=0.27,
            psd_factor_max=1.47,
            pooled_corr=1.0,
            members=8,
        ),
        _row("CM 1 step, preserve=False", crps=0.207, spread_skill=1.31, spread_skill_log=0.86, members=8),
    ]
    sweep = [
        {**_row("", spread_skill=s, spread_skill_log=g), "factor": f, "sigma": 0.807 * f}
        for f, s, g in ((0.25, 1.08, 0.38), (1.0, 1.49, 0.80))
    ]
    paired = [("E-OBS coarse-grained 4x (1 deg)", scale, rows, ["a.png"], sweep)]
    args = argparse.Namespace(
        members=8, sde_days=30, sde_steps=500, sweep_days=0, paired_days=90, machine="cpu"
    )
    evaluate.store_summary(paired, [], {"truth": "E-OBS"}, args)

    loaded = argparse.Namespace()
    got_paired, got_unpaired, card = evaluate.load_summary(loaded)
    assert vars(loaded) == vars(args) and got_unpaired == [] and card == {"truth": "E-OBS"}
    label, got_scale, got_rows, figs, got_sweep = got_paired[0]
    assert label == "E-OBS coarse-grained 4x (1 deg)"
    assert isinstance(got_scale, evaluate.Scale) and got_scale == scale
    assert figs == ["a.png"] and got_sweep[1]["factor"] == 1.0
    assert math.isnan(got_rows[0]["spread_skill"]) and got_rows[2]["members"] == 8

    monkeypatch.setattr(evaluate, "_training_section", lambda: [])
    monkeypatch.setattr(evaluate, "_model_sizes", lambda: "")
    monkeypatch.setattr(evaluate, "_wet_min", lambda: 0.1)
    evaluate.write_report(got_paired, got_unpaired, loaded)
    page = (tmp_path / "evaluation.md").read_text()
    assert "| CM 1 step | 0.095 |" in page and "1.49 (0.80)" in page
    assert "spread/skill 1.49 (NOT met; in log space 0.80" in page
    # 88% of the gain from the bilinear field's 0.2 to 0.095 is the correction's (0.2 to 0.108)
    assert "88% is the correction of `preserve` alone" in page
    assert "in mm/day at 0.25 x; in log space at 1 x. No noise level calibrates both" in page


def test_spread_skill_of_the_report_is_the_library_score(evaluate: ModuleType) -> None:
    from xdownscale.metrics import spread_skill

    rng = np.random.default_rng(0)
    truth = xr.DataArray(rng.normal(size=(50, 6)), dims=("y", "x"))
    ens = xr.DataArray(rng.normal(size=(4, 50, 6)), dims=("member", "y", "x"))
    ratio, spread, skill, cells = evaluate.spread_skill(ens, truth)
    library = spread_skill(ens, truth)
    assert (ratio, spread, skill, cells) == (
        float(library),
        library.attrs["spread"],
        library.attrs["rmse"],
        library.attrs["n_points"],
    )
    single = evaluate.spread_skill(ens.isel(member=[0]), truth)  # a deterministic row: no spread
    assert math.isnan(single[0]) and single[3] == 300
    assert single[2] == pytest.approx(np.sqrt(((ens.values[0] - truth.values) ** 2).mean()))


def test_paired_days_are_all_test_days_unless_a_subset_is_asked_for(evaluate: ModuleType) -> None:
    assert np.array_equal(evaluate._blocks(271, 0), np.arange(271))  # --paired-days 0, the default
    assert np.array_equal(evaluate._blocks(271, 400), np.arange(271))
    sub = evaluate._blocks(271, 60)  # the SDE's days: 6 blocks of 10 consecutive days, first to last
    assert sub.size == 60 and sub[0] == 0 and sub[-1] == 270
    assert np.count_nonzero(np.diff(sub) > 1) == 5


def test_the_page_says_which_network_sees_static_inputs(evaluate: ModuleType, monkeypatch: Any) -> None:
    """... and each network's log offset (the CM's and the SDE's may differ)."""
    cards = {
        evaluate.CM_NAME: ({"static_channels": 3, "static_shape": [41, 61]}, 1.0),
        evaluate.SDE_NAME: ({}, 0.1),
    }

    def card(name: str) -> dict[str, Any]:
        return {
            "architecture": {"config": {"channels": [32, 64, 64], **cards[name][0]}},
            "training": {"steps": 2000, "batch_size": 16, "wall_time_s": 1560.0},
            "variable": {"transform": {"eps": cards[name][1]}},
        }

    monkeypatch.setattr(evaluate, "_read_card", card)
    line = evaluate._model_sizes()
    assert (
        "CM channels 32,64,64, 2000 steps of batch 16, 26 min, log(x + 1 mm/day) transform, with static "
        "inputs" in line
    )
    assert (
        "SDE channels 32,64,64, 2000 steps of batch 16, 26 min, log(x + 0.1 mm/day) transform, no static "
        "inputs." in line
    )


def test_the_sde_gets_the_cms_wavenumber_and_its_own_noise_level(evaluate: ModuleType) -> None:
    """The two models' transforms may differ, and sigma lives in each one's transformed space."""
    import xdownscale

    cm = xdownscale.load_model(evaluate.CM_NAME)
    sde = xdownscale.load_model(evaluate.SDE_NAME)
    scale = xdownscale.Scale.from_wavenumber(0.0627, psd=cm.target_psd)
    same = evaluate._same_scale(scale, sde)
    assert same.wavenumber == scale.wavenumber
    assert same.sigma == xdownscale.Scale.from_wavenumber(0.0627, psd=sde.target_psd).sigma
    # a model whose transformed fields carry 4 times the power (another log offset, say): same
    # wavenumber, twice the noise level
    other = types.SimpleNamespace(target_psd=cm.target_psd * 4.0)
    louder = evaluate._same_scale(scale, other)
    assert louder.wavenumber == scale.wavenumber
    assert louder.sigma == pytest.approx(2.0 * scale.sigma, rel=1e-6)


def test_a_perfect_model_test_needs_its_reference_period(evaluate: ModuleType) -> None:
    """Without QDM the scale comes from the coarse-grained training winters, never from the test days:
    a paired test given no reference period refuses to run instead of resolving on the days it scores."""
    days = xr.DataArray(np.zeros((2, 4, 4)), dims=("time", "lat", "lon"))
    with pytest.raises(ValueError, match="reference="):
        evaluate.paired("perfect model", days, days, None, None, argparse.Namespace())


def test_the_sweep_reading_says_when_the_auto_pick_is_too_small_for_the_spectrum(
    evaluate: ModuleType,
) -> None:
    def level(factor: float, crps: float, lsd: float) -> dict:
        return {
            "factor": factor,
            "sigma": 0.4 * factor,
            "crps": crps,
            "log_spectral_distance": lsd,
            "spread_skill": 0.9,
            "spread_skill_log": 0.7,
        }

    bar = {"method": "bilinear, preserve='mean'", "crps": 0.30}
    sweep = [level(0.5, 0.22, 0.58), level(1.0, 0.21, 0.32), level(2.0, 0.214, 0.115)]
    text = evaluate._paired_sweep_reading(sweep, bar)
    assert "closest to the truth's with more noise than the auto pick (at 2 x)" in text
    assert "too large" not in text
    # the spectrum nearest at the auto pick: no such remark
    sweep[2]["log_spectral_distance"] = 0.4
    assert "more noise than the auto pick" not in evaluate._paired_sweep_reading(sweep, bar)


def test_the_joint_reports_scores_go_into_the_card_beside_the_weights(
    evaluate: ModuleType, tmp_path: Path
) -> None:
    """``evaluate_joint.py --write-card-metrics`` writes the JSON card next to the model's weights file
    (it was once handed the model object and failed), keeps the card's other fields and drops NaNs."""
    import json

    spec = importlib.util.spec_from_file_location("evaluate_joint", BENCHMARKS / "evaluate_joint.py")
    assert spec is not None and spec.loader is not None
    joint_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(joint_report)  # the benchmarks folder is on the path while `evaluate` is
    (tmp_path / "joint.json").write_text(json.dumps({"name": "joint", "metrics": {"old": 1}}))
    model = types.SimpleNamespace(path=tmp_path / "joint.safetensors")
    rows = [{"method": "joint CM", "crps_pr": 0.24516, "coupling": float("nan")}]
    joint_report.store_card_metrics(model, [{"label": "perfect model", "rows": rows}])
    card = json.loads((tmp_path / "joint.json").read_text())
    assert card["name"] == "joint"
    assert card["metrics"]["paired: perfect model"] == {"joint CM": {"crps_pr": 0.2452}}
    assert "old" not in card["metrics"]
