"""The training loop: tiny synthetic runs (16x24 fields, channels (8, 16), a few steps) on the CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr

from xdownscale.datasets import synthetic_precipitation, synthetic_temperature
from xdownscale.errors import InputError, MissingCoordinateError, UnitError
from xdownscale.models import load_model
from xdownscale.models.io import read_safetensors
from xdownscale.models.train import candidate_steps, choose_step, train

NY, NX = 16, 24
TINY: dict[str, Any] = dict(
    channels=(8, 16),
    net={"num_res_blocks": 1, "num_heads": 2},
    batch_size=4,
    device="cpu",
    progress=False,
    nquantiles=50,
)


@pytest.fixture(scope="module")
def pr() -> xr.DataArray:
    """40 days of synthetic precipitation with a NaN 'sea' and one cell missing on a single day."""
    da = synthetic_precipitation(ny=NY, nx=NX, ntime=40, mask=True, seed=3)
    da = da.copy(deep=True)
    da[5, 8, 12] = np.nan
    return da


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path)[0]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bitwise equal tensors (NaN where NaN)."""
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].numpy().tobytes() == b[key].numpy().tobytes(), key


def _checkpoint(out: Path) -> Path:
    return sorted((out / "checkpoints").glob("step-*"))[-1]


@pytest.mark.parametrize(("kind", "loss"), [("cm", "ect"), ("cm", "ict"), ("cm", "ct"), ("sde", "dsm")])
def test_train_writes_a_loadable_model(tmp_path: Path, pr: xr.DataArray, kind: str, loss: str) -> None:
    out = tmp_path / "run"
    path = train(kind, pr, "pr", out, steps=6, loss=loss, checkpoint_every=3, log_every=2, **TINY)
    assert path == out / f"{kind}-pr-{NY}x{NX}.safetensors"
    model = load_model(path)
    assert (
        model.kind == kind
        and model.variable["units"] == "mm d-1"
        and model.variable["kind"] == "precipitation"
    )
    assert model.frequency == "1D" and model.variable["standard_name"] == "lwe_precipitation_rate"
    card = model.card
    # normalisation fitted on the training period (the last 10% = 4 days are validation)
    assert card["training"]["n_train"] == 36 and card["training"]["n_val"] == 4
    train_part = pr.isel(time=slice(0, 36))
    assert model.transform.log is True
    assert model.transform.data_max == pytest.approx(float(train_part.max()), rel=1e-6)
    assert card["training"]["period"] == ["1991-12-01", "1992-01-05"]
    assert card["training"]["validation_period"] == ["1992-01-06", "1992-01-09"]
    # mask: the sea (NaN at all times), not the cell missing on one day
    expected = ~np.isnan(pr.values).all(axis=0)
    assert not expected.all() and expected[8, 12]
    np.testing.assert_array_equal(model.mask, expected)
    # target PSD in the transformed space, reference quantiles in mm/day
    assert model.target_psd.attrs["n_cells"] == NY * NX
    assert np.isfinite(model.target_psd.values).all() and (model.target_psd.values > 0).all()
    rq = model.reference_quantiles
    assert rq is not None and rq.shape == (50, NY, NX) and rq.attrs["units"] == "mm d-1"
    np.testing.assert_allclose(rq["quantiles"].values, (np.arange(50) + 0.5) / 50)
    assert np.isnan(rq.values[:, ~expected]).all()
    assert float(rq.max()) <= float(train_part.max()) + 1e-4
    # network
    arch = card["architecture"]["config"]
    assert arch["channels"] == [8, 16] and arch["periodic"] is False and arch["num_res_blocks"] == 1
    assert model.sigma_data == 0.5
    assert (model.sigma_min, model.sigma_max) == ((0.002, 80.0) if kind == "cm" else (0.01, 500.0))
    # training record
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [2, 4, 6]
    assert [h["step"] for h in history if "val_loss" in h] == [3, 6]
    assert all(np.isfinite(h["loss"]) for h in history if "loss" in h)
    assert card["training"]["final_val_loss"] == history[-1]["val_loss"]
    # consistency models are also scored as downscalers (perfect model) and the best EMA is shipped
    validation = card["training"]["validation"]
    if kind == "cm":
        scored = [h for h in history if "val_crps" in h]
        assert [h["step"] for h in scored] == [3, 6]
        assert all(np.isfinite(h["val_spectral_distance"]) for h in scored)
        chosen = min(scored, key=lambda h: h["val_crps"])
        assert validation["step"] == chosen["step"] and validation["crps"] == chosen["val_crps"]
        assert validation["spectral_distance"] == chosen["val_spectral_distance"]
        assert validation["crps_tolerance"] == 0.0 and validation["rule"] == "the lowest CRPS"
        assert validation["bilinear_mae"] > 0 and np.isfinite(validation["spread_skill"])
        assert validation["beats_bilinear"] == (validation["crps"] < validation["bilinear_mae"])
        assert "4x" in validation["metric"]
        kept = {int(p.stem.removeprefix("step-")) for p in (out / "validated").glob("step-*.safetensors")}
        assert kept == candidate_steps(history, 0.0) == {chosen["step"]}
        assert [row[:2] for row in validation["curve"]] == [[h["step"], h["val_crps"]] for h in scored]
        assert [row[4] for row in validation["curve"]] == [h["val_spectral_distance"] for h in scored]
    else:
        assert validation is None
    ckpt = _checkpoint(out)
    assert ckpt.name == "step-00000006"
    files = {p.name for p in ckpt.iterdir()}
    assert {
        "model.safetensors",
        "ema.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "state.json",
    } <= files
    assert ("teacher.safetensors" in files) == (loss == "ct")
    # the shipped weights are the EMA of the chosen validation step (of the last checkpoint for an SDE)
    shipped = {k.removeprefix("network."): v for k, v in _weights(path).items() if k.startswith("network.")}
    step = validation["step"] if kind == "cm" else 6
    _assert_same(shipped, _weights(out / "checkpoints" / f"step-{step:08d}" / "ema.safetensors"))


def test_masked_cells_are_zero_and_excluded(
    tmp_path: Path, pr: xr.DataArray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss gets x0 = 0 and mask = False on the sea and on cells missing on a given day."""
    from xdownscale.core import consistency

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = consistency.ect_loss

    def spy(model: Any, x0: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        seen.append((x0.clone(), kwargs["mask"].clone()))
        return real(model, x0, **kwargs)

    monkeypatch.setattr(consistency, "ect_loss", spy)
    train(
        "cm",
        pr,
        "pr",
        tmp_path,
        steps=10,
        val_fraction=0.0,
        checkpoint_every=10,
        batch_size=16,
        **{k: v for k, v in TINY.items() if k != "batch_size"},
    )
    sea = torch.from_numpy(np.isnan(pr.values).all(axis=0))
    for x0, mask in seen:
        assert x0.shape == mask.shape == (16, 1, NY, NX) and mask.dtype == torch.bool
        assert not mask[:, :, sea].any() and (x0[:, :, sea] == 0).all()
        assert torch.isfinite(x0).all()
    # the cell missing on one day only is masked in the samples of that day only
    missing = [not bool(m[b, 0, 8, 12]) for _, m in seen for b in range(m.shape[0])]
    assert any(missing) and not all(missing)


class _Stop(Exception):
    pass


def _stop_at(step: int) -> Any:
    def callback(info: dict[str, Any]) -> None:
        if info["step"] == step:
            raise _Stop

    return callback


@pytest.mark.parametrize(
    ("kind", "loss", "static"),
    [
        ("cm", "ect", False),
        ("cm", "ict", False),
        ("cm", "ct", False),
        ("sde", "dsm", False),
        ("cm", "ect", True),
    ],
)
def test_resume_after_interruption_is_exact(
    tmp_path: Path, pr: xr.DataArray, kind: str, loss: str, static: bool
) -> None:
    n = 5
    common = dict(
        steps=2 * n,
        loss=loss,
        checkpoint_every=n,
        log_every=2,
        seed=7,
        lr_schedule="cosine",
        static_inputs=static,
        **TINY,
    )
    straight = train(kind, pr, "pr", tmp_path / "straight", **common)
    with pytest.raises(_Stop):
        train(
            kind, pr, "pr", tmp_path / "resumed", callback=_stop_at(n + 2), **common
        )  # killed after a checkpoint
    assert _checkpoint(tmp_path / "resumed").name == f"step-{n:08d}"
    resumed = train(kind, pr, "pr", tmp_path / "resumed", resume=True, **common)
    _assert_same(_weights(straight), _weights(resumed))
    for name in ("model", "ema", "optimizer", "rng") + (("teacher",) if loss == "ct" else ()):
        _assert_same(
            _weights(_checkpoint(tmp_path / "straight") / f"{name}.safetensors"),
            _weights(_checkpoint(tmp_path / "resumed") / f"{name}.safetensors"),
        )
    history = [json.loads((tmp_path / d / "history.json").read_text()) for d in ("straight", "resumed")]
    assert history[0] == history[1]
    # the card's wall time counts the session before the interruption too
    first = json.loads((tmp_path / "resumed" / "checkpoints" / f"step-{n:08d}" / "state.json").read_text())
    card = json.loads(resumed.with_suffix(".json").read_text())
    assert 0 < first["elapsed_s"] <= card["training"]["wall_time_s"]


def _record(step: int, crps: float, spectral: float | None) -> dict[str, Any]:
    return {"step": step, "val_crps": crps} | (
        {} if spectral is None else {"val_spectral_distance": spectral}
    )


def test_choose_step_trades_crps_for_a_realistic_spectrum() -> None:
    """Within the CRPS band the nearest spectrum wins; outside it, never; 0 tolerance = lowest CRPS."""
    history = [
        {"step": 1, "loss": 3.0},  # a training-loss record: ignored
        _record(2, 0.330, 0.9),
        _record(4, 0.300, 0.7),  # lowest CRPS
        _record(6, 0.305, 0.5),  # within 2%, better spectrum
        _record(8, 0.306, 0.6),  # within 2% but dominated by step 6
        _record(10, 0.320, 0.1),  # best spectrum, outside the band
    ]
    assert choose_step(history, 0.02) == 6
    assert choose_step(history, 0.0) == 4
    assert choose_step(history, 0.10) == 10
    assert candidate_steps(history, 0.02) == {4, 6}  # step 8 can never be chosen: 6 beats it on both
    assert choose_step(history, 0.02, available={4, 8}) == 4  # step 6's weights are gone
    assert choose_step(history, 0.02, available=set()) is None
    assert choose_step([{"step": 1, "loss": 1.0}], 0.02) is None
    # records without a spectral distance (runs of older versions): the lowest CRPS
    assert choose_step([_record(2, 0.31, None), _record(4, 0.30, None)], 0.05) == 4


def test_kept_weights_follow_the_band(tmp_path: Path, pr: xr.DataArray) -> None:
    """Training keeps the EMA weights of the steps that may still be chosen, and no others; resuming a
    finished run with another tolerance chooses again among them."""
    out = tmp_path / "run"
    common = dict(steps=6, checkpoint_every=1, val_every=1, val_samples=8, keep_checkpoints=1, **TINY)
    path = train("cm", pr, "pr", out, crps_tolerance=0.5, **common)
    history = json.loads((out / "history.json").read_text())
    kept = {int(p.stem.removeprefix("step-")) for p in (out / "validated").glob("step-*.safetensors")}
    assert kept == candidate_steps(history, 0.5) and kept <= set(range(1, 7))
    card = json.loads(path.with_suffix(".json").read_text())["training"]["validation"]
    assert card["step"] == choose_step(history, 0.5)
    path = train("cm", pr, "pr", out, crps_tolerance=0.0, resume=True, **common)
    card = json.loads(path.with_suffix(".json").read_text())["training"]["validation"]
    lowest = min((h for h in history if "val_crps" in h), key=lambda h: h["val_crps"])
    assert card["step"] == lowest["step"] and card["rule"] == "the lowest CRPS"
    shipped = {k.removeprefix("network."): v for k, v in _weights(path).items() if k.startswith("network.")}
    _assert_same(shipped, _weights(out / "validated" / f"step-{lowest['step']:08d}.safetensors"))
    with pytest.raises(InputError, match=r"crps_tolerance=1.5: expected a fraction in \[0, 1\)"):
        train("cm", pr, "pr", tmp_path / "x", crps_tolerance=1.5, **common)


def test_learning_rate_schedules(tmp_path: Path, pr: xr.DataArray) -> None:
    from xdownscale.models.train import LR_FLOOR, learning_rate

    assert learning_rate(7, 100, 1e-3, "constant") == 1e-3
    cosine = [learning_rate(k, 101, 1e-3, "cosine") for k in range(101)]
    assert cosine[0] == pytest.approx(1e-3) and cosine[-1] == pytest.approx(LR_FLOOR * 1e-3)
    assert cosine[50] == pytest.approx(1e-3 * (1 + LR_FLOOR) / 2)
    assert all(np.diff(cosine) <= 0)
    with pytest.raises(InputError, match=r"lr_schedule='linear': expected one of 'constant', 'cosine'"):
        train("cm", pr, "pr", tmp_path / "bad", steps=2, lr_schedule="linear", **TINY)
    path = train("cm", pr, "pr", tmp_path / "cos", steps=2, lr_schedule="cosine", **TINY)
    assert json.loads(path.with_suffix(".json").read_text())["training"]["lr_schedule"] == "cosine"


def test_same_seed_same_weights(tmp_path: Path, pr: xr.DataArray) -> None:
    a = train("cm", pr, "pr", tmp_path / "a", steps=4, seed=1, checkpoint_every=4, **TINY)
    b = train("cm", pr, "pr", tmp_path / "b", steps=4, seed=1, checkpoint_every=4, **TINY)
    c = train("cm", pr, "pr", tmp_path / "c", steps=4, seed=2, checkpoint_every=4, **TINY)
    _assert_same(_weights(a), _weights(b))
    wa, wc = _weights(a), _weights(c)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa if k.startswith("network."))


@pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")  # zarr 3 writing a v3 store
def test_files_units_and_val_time(tmp_path: Path) -> None:
    """netCDF files in kg m-2 s-1, opened lazily as many files; a validation period by dates."""
    da = synthetic_precipitation(ny=NY, nx=NX, ntime=30, units="kg m-2 s-1", seed=4)
    paths = []
    for i, part in enumerate((da.isel(time=slice(0, 15)), da.isel(time=slice(15, 30)))):
        paths.append(tmp_path / f"pr_{i}.nc")
        part.to_dataset().to_netcdf(paths[-1])
    path = train(
        "cm",
        [str(p) for p in paths],
        "pr",
        tmp_path / "out",
        name="files",
        steps=2,
        val_time="1991-12-10/1991-12-14",
        checkpoint_every=2,
        **TINY,
    )
    model = load_model(path)
    assert model.name == "files" and model.variable["units"] == "mm d-1"
    assert model.card["training"]["validation_period"] == ["1991-12-10", "1991-12-14"]
    assert model.card["training"]["n_val"] == 5 and model.card["training"]["n_train"] == 25
    assert model.transform.data_max == pytest.approx(float(da.max()) * 86400, rel=1e-5)
    assert "pr_0.nc" in model.card["training"]["data"]
    # the same from a glob and from a zarr store
    train("cm", str(tmp_path / "pr_*.nc"), "pr", tmp_path / "glob", steps=1, checkpoint_every=1, **TINY)
    da.to_dataset().to_zarr(tmp_path / "pr.zarr")
    train("cm", tmp_path / "pr.zarr", None, tmp_path / "zarr", steps=1, checkpoint_every=1, **TINY)


def test_temperature_is_not_log_transformed(tmp_path: Path) -> None:
    tas = synthetic_temperature(ny=NY, nx=NX, ntime=12, seed=0)
    tas = xr.apply_ufunc(lambda v: v - 273.15, tas, keep_attrs=True).assign_attrs(units="degC")
    path = train("sde", tas, None, tmp_path, steps=1, checkpoint_every=1, **TINY)
    model = load_model(path)
    assert model.transform.log is False and model.variable["units"] == "K"
    assert model.variable["kind"] == "temperature"
    assert model.transform.data_min > 200  # converted to kelvin before fitting


def test_input_errors(tmp_path: Path, pr: xr.DataArray) -> None:
    ds = pr.to_dataset().assign(other=pr * 0)
    with pytest.raises(InputError, match=r"Variable 'tas' is not in the training data .*'pr', 'other'"):
        train("cm", ds, "tas", tmp_path / "x", steps=1, **TINY)
    with pytest.raises(InputError, match=r"hold the variables \['pr', 'other'\]; pass variable="):
        train("cm", ds, None, tmp_path / "x", steps=1, **TINY)
    with pytest.raises(MissingCoordinateError, match=r"Cannot find a time dimension"):
        train("cm", pr.isel(time=0), "pr", tmp_path / "x", steps=1, **TINY)
    with pytest.raises(InputError, match=r"Too few time steps to train: 2 in the data, 1 left"):
        train("cm", pr.isel(time=slice(0, 2)), "pr", tmp_path / "x", steps=1, val_fraction=0.5, **TINY)
    with pytest.raises(
        InputError, match=r"val_time='2030-01/2030-02' selects no time step; the data span 1991-12-01"
    ):
        train("cm", pr, "pr", tmp_path / "x", steps=1, val_time="2030-01/2030-02", **TINY)
    with pytest.raises(InputError, match=r"Unknown model kind 'gan'; expected one of 'cm', 'sde'"):
        train("gan", pr, "pr", tmp_path / "x", steps=1, **TINY)
    with pytest.raises(InputError, match=r"loss='dsm' does not train kind 'cm'"):
        train("cm", pr, "pr", tmp_path / "x", steps=1, loss="dsm", **TINY)
    with pytest.raises(UnitError, match=r"no units attribute"):
        train("cm", pr.assign_attrs(units=""), "pr", tmp_path / "x", steps=1, **TINY)
    with pytest.raises(InputError, match=r"Training data file '.*missing.nc' does not exist"):
        train("cm", str(tmp_path / "missing.nc"), "pr", tmp_path / "x", steps=1, **TINY)
    assert not (tmp_path / "x").exists()


def test_units_override(tmp_path: Path, pr: xr.DataArray) -> None:
    path = train(
        "cm",
        pr.assign_attrs(units="furlongs"),
        "pr",
        tmp_path,
        steps=1,
        units="mm/day",
        checkpoint_every=1,
        **TINY,
    )
    assert load_model(path).variable["units"] == "mm d-1"


def test_out_dir_guard(tmp_path: Path, pr: xr.DataArray) -> None:
    out = tmp_path / "run"
    train("cm", pr, "pr", out, steps=2, checkpoint_every=1, **TINY)
    with pytest.raises(
        InputError, match=r"already holds a training run \(checkpoint step-00000002\)\. Pass resume=True"
    ):
        train("cm", pr, "pr", out, steps=2, checkpoint_every=1, **TINY)
    with pytest.raises(
        InputError, match=r"different configuration \(steps=2 there, 4 here; lr=0.0002 there, 0.001 here\)"
    ):
        train("cm", pr, "pr", out, steps=4, lr=1e-3, resume=True, checkpoint_every=1, **TINY)
    with pytest.raises(InputError, match=r"different configuration \(.*data_sha256="):
        train("cm", pr * 2, "pr", out, steps=2, resume=True, checkpoint_every=1, **TINY)
    # resuming a finished run with the same configuration just writes the model again
    path = train("cm", pr, "pr", out, steps=2, resume=True, checkpoint_every=1, **TINY)
    assert path.is_file()
    assert len(list((out / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints


def test_precision_bf16_on_the_cpu(tmp_path: Path, pr: xr.DataArray) -> None:
    """bf16 autocast is an option on the CPU (the default where it is native): float32 weights, the card
    says how it was trained, and a run resumes only in the precision it started with."""
    from xdownscale.models.inference import cpu_has_fast_bf16

    common = dict(steps=4, checkpoint_every=2, seed=5, **TINY)
    fp32 = train("cm", pr, "pr", tmp_path / "fp32", precision="fp32", **common)
    bf16 = train("cm", pr, "pr", tmp_path / "bf16", precision="bf16", **common)
    auto = train("cm", pr, "pr", tmp_path / "auto", **common)
    assert load_model(fp32).card["training"]["precision"] == "fp32"
    assert load_model(bf16).card["training"]["precision"] == "bf16 autocast"
    _assert_same(_weights(auto), _weights(bf16 if cpu_has_fast_bf16() else fp32))
    w32, w16 = _weights(fp32), _weights(bf16)
    assert all(w.dtype == torch.float32 for k, w in w16.items() if k.startswith("network."))
    assert any(not torch.equal(w32[k], w16[k]) for k in w32 if k.startswith("network."))
    with pytest.raises(InputError, match=r"different configuration \(precision='bf16' there, 'fp32' here\)"):
        train("cm", pr, "pr", tmp_path / "bf16", precision="fp32", resume=True, **common)
    with pytest.raises(InputError, match=r"precision='fp16': expected one of 'auto', 'fp32', 'bf16'"):
        train("cm", pr, "pr", tmp_path / "x", precision="fp16", **common)


def test_the_compile_policy_of_training() -> None:
    from xdownscale.models.train import COMPILE_MIN_STEPS, compiles_training

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not compiles_training("auto", cpu, 10**6)  # never a surprise minute on the CPU
    assert compiles_training("auto", cuda, COMPILE_MIN_STEPS)
    assert not compiles_training("auto", cuda, COMPILE_MIN_STEPS - 1)  # a short run does not pay
    assert compiles_training("always", cpu, 1) and not compiles_training("never", cuda, 10**6)


def test_an_unknown_compile_policy_is_refused_before_training(tmp_path: Path, pr: xr.DataArray) -> None:
    with pytest.raises(InputError, match=r"compile policy 'fast'.*auto, never or always"):
        train("cm", pr, "pr", tmp_path / "x", steps=2, compile="fast", **TINY)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_compiled_run_trains_the_same_network(tmp_path: Path, pr: xr.DataArray) -> None:
    """compile='always' on the CPU (about a minute of compilation): the weights follow the eager run's
    to float rounding, and the checkpoints resume in an eager session."""
    common = dict(steps=4, checkpoint_every=2, seed=5, precision="fp32", **TINY)
    eager = _weights(train("cm", pr, "pr", tmp_path / "eager", compile="never", **common))
    compiled = _weights(train("cm", pr, "pr", tmp_path / "compiled", compile="always", **common))
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-3, atol=1e-4, equal_nan=True)
    again = _weights(train("cm", pr, "pr", tmp_path / "compiled", compile="never", resume=True, **common))
    _assert_same(again, compiled)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_on_cuda_with_bf16(tmp_path: Path, pr: xr.DataArray) -> None:
    options = {**TINY, "device": "cuda"}
    for kind in ("cm", "sde"):
        path = train(kind, pr, "pr", tmp_path / kind, steps=4, checkpoint_every=2, **options)
        model = load_model(path, device="cuda")
        assert next(model.network.parameters()).device.type == "cuda"
        assert model.card["training"]["precision"] == "bf16 autocast"
    # resuming on the GPU restores the CUDA generator state as well
    with pytest.raises(_Stop):
        train("cm", pr, "pr", tmp_path / "r", steps=4, checkpoint_every=2, callback=_stop_at(3), **options)
    train("cm", pr, "pr", tmp_path / "r", steps=4, checkpoint_every=2, resume=True, **options)


def test_public_entry_points() -> None:
    import xdownscale

    assert xdownscale.train is train
    assert xdownscale.load_model is load_model


@pytest.mark.data
def test_train_on_eobs(tmp_path: Path, iberia_dir: Path) -> None:
    """Real E-OBS files: units "mm" on daily steps, the sea NaN at all times, a winter held out."""
    path = train(
        "cm",
        iberia_dir / "eobs_0.5deg_rr_djf1983-2002.nc",
        "rr",
        tmp_path,
        steps=2,
        val_time="2000-12/2002-02",
        checkpoint_every=2,
        **TINY,
    )
    model = load_model(path)
    assert model.name == "cm-rr-19x29" and model.variable["units"] == "mm d-1"
    assert model.card["training"]["validation_period"] == ["2000-12-01", "2002-02-28"]
    assert 0.3 < float(model.mask.mean()) < 0.95
    assert float(model.reference_quantiles.max()) > 20  # mm/day: wet tail of Iberian winters


def test_static_inputs_are_the_training_climatology_and_travel_with_the_model(
    tmp_path: Path, pr: xr.DataArray
) -> None:
    from xdownscale.models.train import static_fields
    from xdownscale.nets.unet import UNet
    from xdownscale.transforms import LogNormalize

    path = train("cm", pr, "pr", tmp_path / "run", steps=2, static_inputs=True, **TINY)
    model = load_model(path)
    config = model.card["architecture"]["config"]
    assert config["static_channels"] == 3 and config["static_shape"] == [NY, NX]
    # the per-cell time mean and standard deviation of the transformed training days (the first 36)
    part = pr.values[:36]
    assert model.transform.eps == 1.0  # the default log offset, mm/day
    tr = LogNormalize(eps=1.0, log=True).fit(pr.isel(time=slice(0, 36)))
    y = np.asarray(tr.forward(part), dtype=np.float64)
    expected = static_fields(part[:, None], [tr], model.mask)
    land = model.mask
    np.testing.assert_allclose(expected[0][land], np.nanmean(y[:, land], axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(expected[1][land], np.nanstd(y[:, land], axis=0), rtol=1e-5, atol=1e-6)
    assert (expected[:, ~land] == 0).all() and (expected[2][land] == 1).all()
    net = next(m for m in model.network.modules() if isinstance(m, UNet))
    # stored as float16 like every weight
    np.testing.assert_allclose(net.static.numpy(), expected, atol=2e-3, rtol=2e-3)
