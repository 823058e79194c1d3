"""Model cards, safetensors weights, the registry and load_model (no training: cards are built by hand)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr

from xdownscale.errors import ModelCardError, ModelNotFoundError, WeightsIntegrityError
from xdownscale.models import Model, list_models, load_model, save_model, sha256_file, validate_card
from xdownscale.models.card import CARD_FORMAT
from xdownscale.models.io import check_safetensors_format, write_safetensors
from xdownscale.models.model import build_network
from xdownscale.transforms import LogNormalize

NY, NX = 16, 24
ARCH = {
    "in_channels": 1,
    "out_channels": 1,
    "channels": [8, 16],
    "num_res_blocks": 1,
    "attention": True,
    "num_heads": 2,
}
SIGMA = {"cm": {"min": 0.002, "max": 80.0, "data": 0.5}, "sde": {"min": 0.01, "max": 500.0, "data": 0.5}}


def _card(name: str, kind: str = "cm") -> dict[str, Any]:
    lat = 34.125 + 0.25 * np.arange(NY)
    lon = -9.875 + 0.25 * np.arange(NX)
    k = np.arange(1, NY // 2 + 1) / NY
    transform = LogNormalize(eps=1e-4, log=True).fit(np.array([0.0, 3.0, 40.0]), units="mm d-1")
    return {
        "format": CARD_FORMAT,
        "name": name,
        "version": "0.0.1",
        "kind": kind,
        "architecture": {"class": "UNet", "config": json.loads(json.dumps(ARCH))},
        "variable": {
            "name": "pr",
            "units": "mm d-1",
            "standard_name": "lwe_precipitation_rate",
            "long_name": "precipitation",
            "kind": "precipitation",
            "transform": transform.to_dict(),
        },
        "frequency": "1D",
        "grid": {
            "dims": ["lat", "lon"],
            "shape": [NY, NX],
            "lat": "lat",
            "lon": "lon",
            "coords": {
                "lat": {
                    "dims": ["lat"],
                    "values": lat.tolist(),
                    "attrs": {"standard_name": "latitude", "units": "degrees_north"},
                },
                "lon": {
                    "dims": ["lon"],
                    "values": lon.tolist(),
                    "attrs": {"standard_name": "longitude", "units": "degrees_east"},
                },
            },
            "periodic": False,
            "curvilinear": False,
            "spacing_km": [27.8, 22.5],
            "mask": {"key": "aux.mask", "valid_cells": NY * (NX - 3)},
        },
        "sigma": dict(SIGMA[kind]),
        "training": {"data": "synthetic", "period": ["1991-12-01", "1992-01-09"], "licence": "CC0-1.0"},
        "target_psd": {
            "wavenumber": k.tolist(),
            "psd": (1e-3 * k**-2).tolist(),
            "wavelength_km": (25.0 / k).tolist(),
            "n_cells": NY * NX,
            "spacing_km": 25.0,
            "space": "transformed",
            "attrs": {"units": "1"},
        },
        "reference_quantiles": {
            "key": "aux.reference_quantiles",
            "quantiles": ((np.arange(5) + 0.5) / 5).tolist(),
            "units": "mm d-1",
        },
        "metrics": {},
    }


def _mask() -> np.ndarray:
    mask = np.ones((NY, NX), dtype=bool)
    mask[:, :3] = False
    return mask


def _quantiles() -> np.ndarray:
    return np.cumsum(np.random.default_rng(0).gamma(1.0, 1.0, size=(5, NY, NX)), axis=0).astype(np.float32)


def _network(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_network(kind, dict(ARCH), SIGMA[kind])
    with torch.no_grad():  # the UNet starts as the zero function: give it non-trivial weights
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def _save(directory: Path, name: str = "tiny", kind: str = "cm", **kwargs: Any) -> Path:
    return save_model(
        directory, _network(kind), _card(name, kind), mask=_mask(), reference_quantiles=_quantiles(), **kwargs
    )


def _outputs(net: torch.nn.Module, kind: str) -> torch.Tensor:
    x = torch.randn(2, 1, NY, NX, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return net(x, torch.tensor([0.5, 3.0]) if kind == "cm" else torch.tensor([0.3, 0.7]))


@pytest.mark.parametrize("kind", ["cm", "sde"])
def test_save_load_round_trip(tmp_path: Path, kind: str) -> None:
    path = _save(tmp_path, kind=kind)
    assert path == tmp_path / "tiny.safetensors"
    card = json.loads((tmp_path / "tiny.json").read_text())
    assert card["sha256"] == sha256_file(path)
    model = load_model(path)
    assert isinstance(model, Model)
    assert (model.name, model.kind, model.version, model.sha256) == ("tiny", kind, "0.0.1", card["sha256"])
    assert not model.network.training
    assert torch.equal(_outputs(model.network, kind), _outputs(_network(kind), kind))
    # everything the pipeline needs comes back
    assert model.transform == LogNormalize.from_dict(card["variable"]["transform"])
    assert model.variable["units"] == "mm d-1" and model.variable["kind"] == "precipitation"
    assert "transform" not in model.variable
    assert (model.sigma_min, model.sigma_max) == (SIGMA[kind]["min"], SIGMA[kind]["max"])
    assert model.sigma_data == SIGMA[kind]["data"]
    assert model.frequency == "1D" and model.shape == (NY, NX) and not model.periodic
    assert isinstance(model.grid, xr.Dataset) and model.grid["mask"].dtype == bool
    np.testing.assert_array_equal(model.mask, _mask())
    assert model.grid["lat"].attrs["standard_name"] == "latitude"
    from xdownscale.xr.cf import find_grid

    assert find_grid(model.grid).shape(model.grid) == (NY, NX)
    assert model.target_psd.dims == ("wavenumber",)
    assert model.target_psd.attrs["n_cells"] == NY * NX
    assert "wavelength_km" in model.target_psd.coords
    rq = model.reference_quantiles
    assert rq is not None and rq.dims == ("quantiles", "lat", "lon")
    np.testing.assert_array_equal(rq.values, _quantiles())
    np.testing.assert_allclose(rq["quantiles"].values, (np.arange(5) + 0.5) / 5)
    assert rq.attrs["units"] == "mm d-1"
    assert model.to("cpu") is model
    assert "tiny" in repr(model)


def test_card_is_in_the_safetensors_metadata(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = _save(tmp_path)
    with safe_open(str(path), framework="pt") as fh:
        embedded = json.loads(fh.metadata()["card"])
        keys = set(fh.keys())
    assert "sha256" not in embedded
    assert embedded["architecture"] == json.loads(path.with_suffix(".json").read_text())["architecture"]
    assert {"aux.mask", "aux.reference_quantiles"} <= keys
    assert all(k.startswith(("network.", "aux.")) for k in keys)


def test_fp16_storage_loads_as_float32(tmp_path: Path) -> None:
    full = _save(tmp_path / "a")
    half = _save(tmp_path / "b", dtype=torch.float16)
    assert half.stat().st_size < 0.7 * full.stat().st_size
    model = load_model(half)
    assert model.card["storage_dtype"] == "float16"
    assert all(p.dtype == torch.float32 for p in model.network.parameters())
    torch.testing.assert_close(
        _outputs(model.network, "cm"), _outputs(_network("cm"), "cm"), atol=2e-2, rtol=2e-2
    )


def test_sha256_mismatch_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path)
    data = bytearray(path.read_bytes())  # still valid safetensors, one weight changed
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match=r"do not match their model card: sha256"):
        load_model(path)


def test_card_and_embedded_card_must_agree(tmp_path: Path) -> None:
    path = _save(tmp_path)
    card_path = path.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["metrics"] = {"pooled_corr": 0.9}  # editable without touching the weights
    card_path.write_text(json.dumps(card))
    assert load_model(path).card["metrics"] == {"pooled_corr": 0.9}
    card["sigma"]["max"] = 40.0
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match=r"Field 'sigma' of the model card .* differs"):
        load_model(path)


class _Payload:
    """Unpickling this writes a file: the code a malicious checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_pickle_checkpoint_is_refused_and_runs_no_code(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "pwned.txt"
    weights = tmp_path / f"evil{suffix}"
    torch.save({"network.x": _Payload(marker)}, weights)
    card = _card("evil")
    card["sha256"] = sha256_file(weights)  # the card even vouches for the file: the format check must stop it
    (tmp_path / "evil.json").write_text(json.dumps(card))
    for target in (weights, tmp_path / "evil.json") if suffix == ".safetensors" else (weights,):
        with pytest.raises(WeightsIntegrityError, match=r"not a safetensors file.*never unpickles"):
            load_model(target)
    assert not marker.exists()
    # ... and the plant is live: unpickling it would have run the payload
    with open(
        weights, "rb"
    ) as fh:  # (a file object: torch.load would route a .safetensors path to safetensors)
        torch.load(fh, weights_only=False)
    assert marker.read_text() == "pwned"


def test_pickle_only_model_by_name_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned.txt"
    torch.save(_Payload(marker), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    monkeypatch.setenv("XDOWNSCALE_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsIntegrityError, match=r"only as the pickle checkpoint .*legacy\.pt"):
        load_model("legacy")
    with pytest.raises(WeightsIntegrityError, match=r"pickle"):
        check_safetensors_format(tmp_path / "legacy.pt")
    assert not marker.exists()


def test_format_sniffing_accepts_any_header_length(tmp_path: Path) -> None:
    # a header length whose low byte is 0x80 (the pickle opcode PROTO) is still safetensors
    for n in range(1, 400):
        path = write_safetensors(tmp_path / "x.safetensors", {"a": torch.zeros(1)}, {"pad": "p" * n})
        if path.read_bytes()[0] == 0x80:
            check_safetensors_format(path)
            return
    pytest.fail("no header length with low byte 0x80 was produced")


def test_list_models_via_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _save(a, name="alpha")
    _save(b, name="beta", kind="sde")
    (b / "stray.json").write_text("{}")  # a JSON without weights is not a model
    monkeypatch.setenv("XDOWNSCALE_WEIGHTS", f"{a}{__import__('os').pathsep}{b}")
    models = {m["name"]: m for m in list_models()}
    assert {"alpha", "beta"} <= set(models) and "stray" not in models
    assert models["beta"] == {
        "name": "beta",
        "kind": "sde",
        "variable": "pr",
        "units": "mm d-1",
        "grid": (NY, NX),
        "version": "0.0.1",
        "path": b / "beta.safetensors",
    }
    assert load_model("alpha").kind == "cm"
    assert load_model("beta.safetensors").kind == "sde"


def test_list_models_skips_broken_cards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path, name="good")
    _save(tmp_path, name="broken")
    card = json.loads((tmp_path / "broken.json").read_text())
    del card["kind"]
    (tmp_path / "broken.json").write_text(json.dumps(card))
    monkeypatch.setenv("XDOWNSCALE_WEIGHTS", str(tmp_path))
    with pytest.warns(UserWarning, match=r"Skipping model 'broken'.*'kind' is missing"):
        names = [m["name"] for m in list_models()]
    assert "good" in names and "broken" not in names


def test_model_not_found_lists_available_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path, name="alpha")
    monkeypatch.setenv("XDOWNSCALE_WEIGHTS", str(tmp_path))
    with pytest.raises(
        ModelNotFoundError, match=r"No model 'nope'\. Available models: .*'alpha'.*XDOWNSCALE_WEIGHTS"
    ):
        load_model("nope")
    with pytest.raises(KeyError):  # ModelNotFoundError is also a KeyError
        load_model("nope")


def test_weights_without_card_are_refused(tmp_path: Path) -> None:
    path = _save(tmp_path)
    path.with_suffix(".json").unlink()
    with pytest.raises(ModelCardError, match=r"No model card tiny\.json beside"):
        load_model(path)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda c: c.pop("kind"), "kind"),
        (lambda c: c["grid"].pop("shape"), "grid.shape"),
        (lambda c: c["variable"].pop("units"), "variable.units"),
        (lambda c: c.pop("target_psd"), "target_psd"),
        (lambda c: c.pop("sha256"), "sha256"),
        (lambda c: c["training"].pop("licence"), "training.licence"),
    ],
)
def test_card_missing_field(tmp_path: Path, edit: Any, field: str) -> None:
    path = _save(tmp_path)
    card_path = path.with_suffix(".json")
    card = json.loads(card_path.read_text())
    edit(card)
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match=rf"field '{field}' is missing"):
        load_model(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c.update(kind="gan"),
            r"field 'kind' has the wrong value 'gan'; expected one of 'cm', 'sde'",
        ),
        (lambda c: c["grid"].update(shape=[16]), r"field 'grid.shape' has the wrong value \[16\]"),
        (lambda c: c["sigma"].update(max=0.001), r"'sigma.max' \(0.001\) must be larger than 'sigma.min'"),
        (lambda c: c["target_psd"].update(psd=[1.0]), r"must have the same length"),
        (lambda c: c.update(sha256="abc"), r"field 'sha256' has the wrong value 'abc'"),
    ],
)
def test_card_wrong_value(edit: Any, message: str) -> None:
    card = _card("x")
    card["sha256"] = "0" * 64
    edit(card)
    with pytest.raises(ModelCardError, match=message):
        validate_card(card)


def test_card_not_json(tmp_path: Path) -> None:
    path = _save(tmp_path)
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(ModelCardError, match="not valid JSON"):
        load_model(path)


def test_save_model_checks_aux_shapes(tmp_path: Path) -> None:
    with pytest.raises(ModelCardError, match=r"mask has shape \(3, 3\)"):
        save_model(tmp_path, _network("cm"), _card("x"), mask=np.ones((3, 3), bool))
    with pytest.raises(ModelCardError, match=r"reference_quantiles has shape"):
        save_model(tmp_path, _network("cm"), _card("x"), reference_quantiles=np.zeros((5, 3, 3)))
    assert not list(tmp_path.iterdir())


def test_pickle_module_never_imported_by_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(tmp_path)
    calls: list[Any] = []
    monkeypatch.setattr(pickle, "load", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    load_model(path)
    assert calls == []


def test_weights_dirs_include_the_repository_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import xdownscale
    from xdownscale.models import weights_dirs

    monkeypatch.setenv("XDOWNSCALE_WEIGHTS", str(tmp_path))
    dirs = [d.resolve() for d in weights_dirs()]
    assert dirs[0] == tmp_path.resolve()  # the environment variable comes first
    repo_weights = Path(xdownscale.__file__).resolve().parents[1] / "weights"
    assert (repo_weights.resolve() in dirs) == repo_weights.is_dir()
