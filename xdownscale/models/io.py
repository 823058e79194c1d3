"""Reading and writing weights: safetensors only, never pickle.

Loading weights must not be able to run code (STYLE.md rule 3). ``torch.load`` of a checkpoint
unpickles it, and a pickle can call any function while it is read; a safetensors file is a JSON header
plus raw tensor bytes and is parsed without executing anything. Every weights file is therefore sniffed
before it is opened: pickle files and ``torch.save`` ZIP archives are refused with
:class:`~xdownscale.errors.WeightsIntegrityError`, whatever their file name.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import InputError, ModelCardError, WeightsIntegrityError
from .card import (
    MASK_KEY,
    NETWORK_PREFIX,
    QUANTILES_KEY,
    jsonable,
    validate_card,
    variable_quantiles_key,
    write_card,
)

__all__ = [
    "PICKLE_SUFFIXES",
    "check_safetensors_format",
    "read_safetensors",
    "save_model",
    "sha256_file",
    "write_safetensors",
]

#: file endings of pickle-based checkpoints; xdownscale never opens these
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar")

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit on the JSON header


def sha256_file(path: str | Path, *, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 digest of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def _refuse(path: Path, what: str) -> WeightsIntegrityError:
    return WeightsIntegrityError(
        f"{path} is {what}, not a safetensors file. xdownscale never unpickles weights (torch.load of a "
        "pickle can run arbitrary code). Re-save the state dict as safetensors, e.g. "
        "safetensors.torch.save_file(state_dict, 'NAME.safetensors'), or write the model with "
        "xdownscale.models.save_model."
    )


def check_safetensors_format(path: str | Path) -> None:
    """Raise unless ``path`` starts like a safetensors file; reads a few bytes, runs nothing.

    Raises
    ------
    WeightsIntegrityError
        The file is a pickle, a ``torch.save`` ZIP archive, or anything else that is not safetensors.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _refuse(path, f"a '{path.suffix}' checkpoint (pickle format)")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= min(_MAX_HEADER, size - 8) and head[8:9] == b"{":
            return
    if head[:4] == b"PK\x03\x04":
        raise _refuse(path, "a ZIP archive as written by torch.save (pickle inside)")
    if head[:1] == b"\x80":
        raise _refuse(path, "a Python pickle")
    raise _refuse(path, f"a file of unknown format ({size} bytes)")


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, after checking that it is one.

    Raises
    ------
    WeightsIntegrityError
        The file is a pickle / ``torch.save`` archive or not readable as safetensors.
    """
    path = Path(path)
    check_safetensors_format(path)
    try:
        tensors = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except Exception as err:  # safetensors raises its own error types
        raise WeightsIntegrityError(f"{path} cannot be read as safetensors: {err}") from err
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def write_safetensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` (copied to contiguous CPU memory) atomically to ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(plain, str(tmp), metadata=dict(metadata) if metadata else None)
    os.replace(tmp, path)
    return path


def save_model(
    directory: str | Path,
    network: torch.nn.Module,
    card: Mapping[str, Any],
    *,
    mask: np.ndarray | None = None,
    reference_quantiles: np.ndarray | None = None,
    dtype: torch.dtype | None = None,
    variable_quantiles: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write ``NAME.safetensors`` and ``NAME.json`` into ``directory``; NAME is ``card["name"]``.

    Parameters
    ----------
    directory
        Where to write (created if needed).
    network
        The wrapped network (``ConsistencyModel`` or ``ScoreModel``): its state dict is stored under
        the prefix ``network.``.
    card
        The model card without ``sha256`` (see :mod:`xdownscale.models.card`); ``grid.mask``,
        ``reference_quantiles.key`` and ``storage_dtype`` are filled in here.
    mask
        Boolean array (ny, nx), True = valid cell; all valid when omitted.
    reference_quantiles
        Array (nquantiles, ny, nx) of per-cell quantiles of the training data in physical units,
        stored as float32 under ``aux.reference_quantiles``; the card's
        ``reference_quantiles.quantiles`` must list the nodes.
    dtype
        Storage dtype of the floating-point weights, e.g. ``torch.float16`` to halve the file;
        loading always gives float32. The auxiliary tensors stay float32.
    variable_quantiles
        A joint model's per-variable quantiles ``{name: array (nquantiles, ny, nx)}``, stored under
        ``aux.reference_quantiles.NAME`` (the key written into each entry of the card's ``variables``).

    Returns
    -------
    Path
        The path of ``NAME.safetensors``.

    Raises
    ------
    ModelCardError
        The card is incomplete or the auxiliary arrays do not fit the grid.
    """
    directory = Path(directory)
    doc: dict[str, Any] = copy.deepcopy(jsonable(dict(card)))
    doc.pop("sha256", None)
    name = doc.get("name")
    if not isinstance(name, str) or not name or os.sep in name or (os.altsep and os.altsep in name):
        raise ModelCardError(f"model card field 'name' must be a plain file name, got {name!r}.")
    grid: dict[str, Any] = doc["grid"] if isinstance(doc.get("grid"), dict) else {}
    shape = tuple(grid.get("shape") or ())
    if mask is None:
        if len(shape) != 2:
            raise ModelCardError("model card field 'grid.shape' is missing; expected [ny, nx].")
        mask = np.ones(shape, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if len(shape) == 2 and mask.shape != shape:
        raise ModelCardError(f"mask has shape {mask.shape}; the card's grid.shape is {list(shape)}.")
    grid["mask"] = {"key": MASK_KEY, "valid_cells": int(mask.sum())}
    tensors: dict[str, torch.Tensor] = {MASK_KEY: torch.from_numpy(mask.astype(np.uint8))}
    if reference_quantiles is not None:
        rq = np.asarray(reference_quantiles, dtype=np.float32)
        info = doc.get("reference_quantiles")
        if rq.ndim != 3 or rq.shape[1:] != mask.shape:
            raise ModelCardError(
                f"reference_quantiles has shape {rq.shape}; expected (nquantiles, {mask.shape[0]}, "
                f"{mask.shape[1]})."
            )
        if not isinstance(info, dict) or len(info.get("quantiles") or []) != rq.shape[0]:
            raise ModelCardError(
                f"model card field 'reference_quantiles.quantiles' must list the {rq.shape[0]} "
                "quantile nodes of the reference_quantiles array."
            )
        info["key"] = QUANTILES_KEY
        tensors[QUANTILES_KEY] = torch.from_numpy(np.ascontiguousarray(rq))
    elif doc.get("reference_quantiles") is not None:
        raise ModelCardError(
            "model card field 'reference_quantiles' is set but no reference_quantiles array was given."
        )
    for entry in doc.get("variables") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("reference_quantiles"), dict):
            continue  # validate_card names what is wrong with the entry
        values = (variable_quantiles or {}).get(str(entry.get("name")))
        if values is None:
            raise ModelCardError(
                f"The card's variables list {entry.get('name')!r} with reference quantiles; pass them "
                "in variable_quantiles={name: array}."
            )
        values = np.ascontiguousarray(values, dtype=np.float32)
        if values.ndim != 3 or values.shape[1:] != mask.shape:
            raise ModelCardError(
                f"variable_quantiles[{entry['name']!r}] has shape {values.shape}; expected (nquantiles, "
                f"{mask.shape[0]}, {mask.shape[1]})."
            )
        key = variable_quantiles_key(entry["name"])
        entry["reference_quantiles"]["key"] = key
        tensors[key] = torch.from_numpy(values)
    if dtype is not None and not dtype.is_floating_point:
        raise InputError(f"dtype must be a floating-point torch dtype such as torch.float16, got {dtype}.")
    storage = dtype or torch.float32
    doc["storage_dtype"] = str(storage).removeprefix("torch.")
    for key, value in network.state_dict().items():
        value = value.detach()
        if value.is_floating_point():
            value = value.to(storage)
        tensors[NETWORK_PREFIX + key] = value
    validate_card(doc, source=f"model card '{name}'", require_sha256=False)

    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{name}.safetensors"
    meta = {"card": json.dumps(doc, allow_nan=False), "format": "pt"}
    write_safetensors(weights, tensors, meta)
    doc["sha256"] = sha256_file(weights)
    write_card(directory / f"{name}.json", doc)
    return weights
