"""Where models live and how a name becomes a pair of files.

Search path, first match wins:

1. the directories in the environment variable ``XDOWNSCALE_WEIGHTS`` (separated by ``os.pathsep``),
2. the repository's top-level ``weights/`` directory (editable installs and checkouts),
3. the package data ``xdownscale/_weights`` (wheels copy ``weights/`` there).

A model in a directory is a ``NAME.json`` card with its ``NAME.safetensors`` beside it.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from ..errors import ModelCardError, ModelNotFoundError, WeightsIntegrityError, XDownscaleWarning
from .card import validate_card

__all__ = ["ENV_VAR", "find_model", "list_models", "weights_dirs"]

ENV_VAR = "XDOWNSCALE_WEIGHTS"
_PACKAGE = Path(__file__).resolve().parents[1]


def weights_dirs() -> list[Path]:
    """The directories searched for models, in order (existing ones only)."""
    dirs: list[Path] = []
    for entry in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if entry.strip():
            dirs.append(Path(entry.strip()).expanduser())
    dirs += [_PACKAGE.parent / "weights", _PACKAGE / "_weights"]
    seen: set[Path] = set()
    out = []
    for d in dirs:
        try:
            key = d.resolve()
        except OSError:
            continue
        if key not in seen and d.is_dir():
            seen.add(key)
            out.append(d)
    return out


def _cards_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.json") if p.with_suffix(".safetensors").is_file())


def list_models() -> list[dict[str, Any]]:
    """The models that :func:`~xdownscale.models.load_model` can find by name.

    Returns
    -------
    list of dict
        One dict per model, first match per name: ``name``, ``kind``, ``variable`` (name),
        ``units``, ``grid`` (shape ``(ny, nx)``), ``version`` and ``path`` (the .safetensors file).
        Cards that cannot be read are skipped with a warning.
    """
    found: dict[str, dict[str, Any]] = {}
    for directory in weights_dirs():
        for card_path in _cards_in(directory):
            name = card_path.stem
            if name in found:
                continue
            try:
                card = validate_card(json.loads(card_path.read_text(encoding="utf-8")), source=str(card_path))
            except (ModelCardError, json.JSONDecodeError, OSError) as err:
                warnings.warn(f"Skipping model '{name}': {err}", XDownscaleWarning, stacklevel=2)
                continue
            found[name] = {
                "name": card["name"],
                "kind": card["kind"],
                "variable": "+".join(v["name"] for v in card.get("variables") or [card["variable"]]),
                "units": card["variable"]["units"],
                "grid": tuple(card["grid"]["shape"]),
                "version": card["version"],
                "path": card_path.with_suffix(".safetensors"),
            }
    return list(found.values())


def _available() -> str:
    names = sorted({p.stem for d in weights_dirs() for p in _cards_in(d)})
    where = ", ".join(str(d) for d in weights_dirs()) or "(no weights directory exists)"
    listing = ", ".join(repr(n) for n in names) if names else "none"
    return (
        f"Available models: {listing} (searched {where}). Pass the path of a NAME.json / "
        f"NAME.safetensors file, or add its directory to the environment variable {ENV_VAR}."
    )


def _pair(path: Path) -> Path:
    """The card path for a given weights/card path; refuses pickle files."""
    from .io import PICKLE_SUFFIXES, check_safetensors_format

    if path.suffix.lower() in PICKLE_SUFFIXES:
        check_safetensors_format(path)  # raises WeightsIntegrityError with the explanation
    if path.suffix == ".json":
        return path
    if path.suffix == ".safetensors":
        return path.with_suffix(".json")
    raise ModelNotFoundError(
        f"{path} is neither a model card (.json) nor a weights file (.safetensors). " + _available()
    )


def find_model(name_or_path: str | os.PathLike[str]) -> Path:
    """The card (``NAME.json``) of the model named or pointed to by ``name_or_path``.

    ``name_or_path`` is a model name searched in :func:`weights_dirs`, the path of a ``.json`` card
    or ``.safetensors`` file, or a directory that holds exactly one model.

    Raises
    ------
    ModelNotFoundError
        Nothing of that name or path; the message lists the available names.
    WeightsIntegrityError
        The path is a pickle checkpoint (``.pt``, ``.ckpt``, ...), which is never opened.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        cards = _cards_in(path)
        if len(cards) != 1:
            raise ModelNotFoundError(
                f"Directory {path} holds {len(cards)} models ({', '.join(c.stem for c in cards) or 'none'}); "
                "pass the path of one NAME.json or NAME.safetensors file."
            )
        return cards[0]
    if path.exists():
        card = _pair(path)
        if not card.is_file():
            raise ModelCardError(
                f"No model card {card.name} beside {path}: the card holds the sha256 that the weights "
                "are checked against, so weights are never loaded without it. Write models with "
                "xdownscale.models.save_model."
            )
        return card
    name = str(name_or_path)
    if os.sep not in name and not (os.altsep and os.altsep in name):
        stem = name.removesuffix(".safetensors").removesuffix(".json")
        for directory in weights_dirs():
            card = directory / f"{stem}.json"
            if card.is_file() and card.with_suffix(".safetensors").is_file():
                return card
            for suffix in (".pt", ".pth", ".ckpt", ".pkl"):
                if (directory / f"{stem}{suffix}").is_file():
                    raise WeightsIntegrityError(
                        f"Model '{stem}' exists only as the pickle checkpoint {directory / (stem + suffix)}; "
                        "xdownscale loads safetensors weights with a JSON card only, because unpickling "
                        "can run arbitrary code. Convert it with safetensors.torch.save_file."
                    )
    raise ModelNotFoundError(f"No model '{name}'. " + _available())
