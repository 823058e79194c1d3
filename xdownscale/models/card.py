"""The model card: a JSON document that says everything needed to use a set of weights.

A model is two files side by side (STYLE.md rule 3):

``NAME.safetensors``
    the inference (EMA) weights of the network under the prefix ``network.``, the auxiliary tensors
    ``aux.mask`` (uint8, shape (ny, nx), 1 = valid cell) and, when present,
    ``aux.reference_quantiles`` (float32, shape (nquantiles, ny, nx), physical units); the card,
    without its ``sha256``, is repeated in the safetensors metadata under the key ``card`` (as
    k-diffusion does), so a weights file always carries its own description.
``NAME.json``
    the card, with the ``sha256`` of ``NAME.safetensors``; :func:`xdownscale.load_model` refuses
    weights that do not match it.

Card fields (format ``xdownscale-model-card/1``)
------------------------------------------------
``format``        ``"xdownscale-model-card/1"``
``name``          model name, also the stem of both files
``version``       version of the weights (a string)
``kind``          ``"cm"`` (consistency model) or ``"sde"`` (score model of a VE SDE)
``architecture``  ``{"class": "UNet", "config": {...}}``: ``UNet(**config)`` rebuilds the network
``variable``      ``{"name", "units", "standard_name", "long_name", "kind", "transform"}``; ``kind`` is
                  ``"precipitation"``, ``"temperature"`` or ``"other"`` (see ``xdownscale.xr.units``);
                  ``transform`` is :meth:`xdownscale.transforms.LogNormalize.to_dict`
``grid``          ``{"dims": [ydim, xdim], "shape": [ny, nx], "lat": name, "lon": name,
                  "coords": {name: {"dims", "values", "attrs"}}, "periodic", "curvilinear",
                  "spacing_km": [dy, dx], "mask": {"key": "aux.mask", "valid_cells": int}}``
``frequency``     time step of the training data (``"1D"`` for daily), or null
``sigma``         ``{"min", "max", "data"}`` noise range and data scale of the network
``training``      data description, ``period`` and ``validation_period`` ([first, last] ISO dates),
                  ``licence``, steps, batch size, loss, seed, final losses, software versions
``target_psd``    ``{"wavenumber", "psd", "wavelength_km", "n_cells", "spacing_km", "space", "attrs"}``:
                  mean radially averaged PSD of the training fields in the transformed space
``reference_quantiles``  ``{"key": "aux.reference_quantiles", "quantiles": [...], "units"}`` or null
``metrics``       a dict of measured skill (may be empty)
``variables``     only for a joint model of several variables (one network channel each, in order): a
                  list of ``variable`` dicts, each with its own ``target_psd`` and ``reference_quantiles``
                  (key ``aux.reference_quantiles.NAME``); ``variable``, ``target_psd`` and
                  ``reference_quantiles`` at the top repeat the first one's
``sha256``        hex digest of ``NAME.safetensors`` (only in ``NAME.json``)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelCardError

__all__ = [
    "ASSIMILATION_KINDS",
    "CARD_FORMAT",
    "KINDS",
    "MASK_KEY",
    "NETWORK_PREFIX",
    "QUANTILES_KEY",
    "jsonable",
    "read_card",
    "validate_card",
    "write_card",
]

CARD_FORMAT = "xdownscale-model-card/1"
#: downscaling model kinds (xdownscale.train / load_model)
KINDS = ("cm", "sde")
#: data-assimilation model kinds (xdownscale.models.assimilation): no sigma range, target PSD or
#: reference quantiles; an "assimilation" dict instead
ASSIMILATION_KINDS = ("slams", "sda")
_NOT_FOR_ASSIMILATION = ("sigma", "target_psd", "reference_quantiles")
_ALL_KINDS = KINDS + ASSIMILATION_KINDS
#: what a variable is (as told by xdownscale.xr.units.quantity_kind)
QUANTITY_KINDS = ("precipitation", "temperature", "other")
NETWORK_PREFIX = "network."
MASK_KEY = "aux.mask"
QUANTILES_KEY = "aux.reference_quantiles"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _is_str(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_pos_number(v: Any) -> bool:
    return _is_number(v) and v > 0


def _is_dict(v: Any) -> bool:
    return isinstance(v, dict)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_pair_of_pos_ints(v: Any) -> bool:
    return (
        isinstance(v, list)
        and len(v) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in v)
    )


def _is_pair_of_str(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_str(s) for s in v)


def _is_number_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_is_number(x) or x is None for x in v)


# (dotted field, check, what is expected) - checked in this order; the first failure is reported
_FIELDS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("format", lambda v: v == CARD_FORMAT, f"the string {CARD_FORMAT!r}"),
    ("name", _is_str, "a non-empty string"),
    ("version", _is_str, "a non-empty string such as '0.1.0'"),
    ("kind", lambda v: v in _ALL_KINDS, f"one of {', '.join(map(repr, _ALL_KINDS))}"),
    ("architecture", _is_dict, "a dict with 'class' and 'config'"),
    ("architecture.class", lambda v: v == "UNet", "'UNet'"),
    ("architecture.config", _is_dict, "a dict of UNet constructor arguments"),
    ("variable", _is_dict, "a dict with name, units and transform"),
    ("variable.name", _is_str, "the variable name, e.g. 'pr'"),
    ("variable.units", _is_str, "the units of the variable, e.g. 'mm/day'"),
    ("variable.kind", lambda v: v in QUANTITY_KINDS, f"one of {', '.join(map(repr, QUANTITY_KINDS))}"),
    ("variable.transform", _is_dict, "LogNormalize.to_dict() of the fitted normalisation"),
    ("grid", _is_dict, "a dict describing the grid"),
    ("grid.dims", _is_pair_of_str, "[ydim, xdim]"),
    ("grid.shape", _is_pair_of_pos_ints, "[ny, nx], two positive integers"),
    ("grid.lat", _is_str, "the name of the latitude coordinate"),
    ("grid.lon", _is_str, "the name of the longitude coordinate"),
    ("grid.coords", _is_dict, "a dict {name: {dims, values, attrs}} with latitude and longitude"),
    ("grid.periodic", _is_bool, "true or false (global in longitude)"),
    ("grid.mask", _is_dict, f"{{'key': {MASK_KEY!r}, 'valid_cells': int}}"),
    ("grid.mask.key", lambda v: v == MASK_KEY, repr(MASK_KEY)),
    ("sigma", _is_dict, "a dict with min, max and data"),
    ("sigma.min", _is_pos_number, "a positive number"),
    ("sigma.max", _is_pos_number, "a positive number larger than sigma.min"),
    (
        "sigma.data",
        lambda v: v is None or _is_pos_number(v),
        "a positive number (may be null for kind 'sde')",
    ),
    ("training", _is_dict, "a dict describing data, period and licence"),
    ("training.licence", _is_str, "the licence / terms of use of the training data"),
    ("target_psd", _is_dict, "a dict with wavenumber, psd, n_cells and spacing_km"),
    ("target_psd.wavenumber", _is_number_list, "a non-empty list of wavenumbers (cycles per cell)"),
    ("target_psd.psd", _is_number_list, "a non-empty list of PSD values"),
    ("target_psd.n_cells", lambda v: _is_number(v) and v > 0, "the number of grid cells"),
    ("target_psd.spacing_km", lambda v: v is None or _is_number(v), "the grid spacing in km"),
    ("reference_quantiles", lambda v: v is None or _is_dict(v), "null or a dict with key and quantiles"),
    ("metrics", _is_dict, "a dict of measured skill (may be empty)"),
]

_MISSING = object()


def _get(card: Mapping[str, Any], dotted: str) -> Any:
    value: Any = card
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def validate_card(card: Any, *, source: str = "model card", require_sha256: bool = True) -> dict[str, Any]:
    """Check that ``card`` has every field a model needs, with values of the right kind.

    Parameters
    ----------
    card
        The decoded JSON card.
    source
        Where the card came from, for the error message (e.g. the path of the JSON file).
    require_sha256
        The card in ``NAME.json`` must carry the sha256 of the weights; the copy embedded in the
        safetensors metadata cannot (it would have to hash itself) and is checked without it.

    Returns
    -------
    dict
        ``card`` itself.

    Raises
    ------
    ModelCardError
        A field is missing or has a wrong value; the message names the field and what is expected.
    """
    if not isinstance(card, dict):
        raise ModelCardError(f"{source}: a model card must be a JSON object, got {type(card).__name__}.")
    fields = list(_FIELDS)
    assimilation = card.get("kind") in ASSIMILATION_KINDS
    if assimilation:
        fields = [f for f in fields if f[0].split(".")[0] not in _NOT_FOR_ASSIMILATION]
        fields.append(("assimilation", _is_dict, "a dict with window, eta and background_std"))
    if require_sha256:
        fields.append(
            (
                "sha256",
                lambda v: isinstance(v, str) and bool(_SHA256.match(v)),
                "the 64-character lowercase hex sha256 of the .safetensors file",
            )
        )
    for dotted, check, expected in fields:
        value = _get(card, dotted)
        if value is _MISSING:
            raise ModelCardError(
                f"{source}: field '{dotted}' is missing; expected {expected}. "
                "Re-create the card with xdownscale.models.save_model."
            )
        if not check(value):
            raise ModelCardError(
                f"{source}: field '{dotted}' has the wrong value {_short(value)}; expected {expected}."
            )
    if not assimilation and card["sigma"]["max"] <= card["sigma"]["min"]:
        raise ModelCardError(
            f"{source}: field 'sigma.max' ({card['sigma']['max']}) must be larger than "
            f"'sigma.min' ({card['sigma']['min']})."
        )
    if card["kind"] == "cm" and card["sigma"]["data"] is None:
        raise ModelCardError(f"{source}: field 'sigma.data' must be a positive number for kind 'cm'.")
    grid = card["grid"]
    for key in ("lat", "lon"):
        if grid[key] not in grid["coords"]:
            raise ModelCardError(
                f"{source}: field 'grid.coords' has no entry for the {key} coordinate "
                f"'{grid[key]}' named in 'grid.{key}'."
            )
    for name, coord in grid["coords"].items():
        if not (isinstance(coord, dict) and isinstance(coord.get("values"), list) and "dims" in coord):
            raise ModelCardError(
                f"{source}: field 'grid.coords.{name}' must be a dict with 'dims', 'values' and 'attrs'."
            )
    if "variables" in card:
        _check_variables(card, source)
    psd = card.get("target_psd") or {"wavenumber": [], "psd": []}
    if len(psd["wavenumber"]) != len(psd["psd"]):
        raise ModelCardError(
            f"{source}: fields 'target_psd.wavenumber' ({len(psd['wavenumber'])} values) and "
            f"'target_psd.psd' ({len(psd['psd'])} values) must have the same length."
        )
    rq = card.get("reference_quantiles")
    if rq is not None:
        if rq.get("key") != QUANTILES_KEY:
            raise ModelCardError(
                f"{source}: field 'reference_quantiles.key' is {_short(rq.get('key'))}; "
                f"expected {QUANTILES_KEY!r}."
            )
        if not _is_number_list(rq.get("quantiles")):
            raise ModelCardError(
                f"{source}: field 'reference_quantiles.quantiles' must be the list of quantile nodes."
            )
    return card


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars/arrays, tuples and paths turned into plain JSON types."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.datetime64):
        return str(np.datetime_as_string(obj, unit="s"))
    if isinstance(obj, Path):
        return str(obj)
    return obj


def read_card(path: str | Path) -> dict[str, Any]:
    """Read and validate the JSON card at ``path``.

    Raises
    ------
    ModelCardError
        The file is not valid JSON or the card lacks a field.
    """
    path = Path(path)
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelCardError(f"{path}: the model card is not valid JSON ({err}).") from err
    return validate_card(card, source=str(path))


def write_card(path: str | Path, card: Mapping[str, Any]) -> Path:
    """Write ``card`` as indented JSON (strict: no NaN) and return the path."""
    path = Path(path)
    path.write_text(json.dumps(jsonable(card), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


def variable_quantiles_key(name: str) -> str:
    """Tensor key of a joint model's reference quantiles of variable ``name``."""
    return f"{QUANTILES_KEY}.{name}"


def _check_variables(card: Mapping[str, Any], source: str) -> None:
    """The ``variables`` list of a joint model: one complete entry per network output channel."""
    variables = card["variables"]
    channels = card["architecture"]["config"].get("out_channels", 1)
    if not isinstance(variables, list) or len(variables) < 2 or len(variables) != channels:
        raise ModelCardError(
            f"{source}: field 'variables' must list one variable per network output channel "
            f"({channels}), at least 2; got {_short(variables)}."
        )
    checks = [f for f in _FIELDS if f[0].split(".")[0] in ("variable", "target_psd", "reference_quantiles")]
    for i, entry in enumerate(variables):
        if not isinstance(entry, dict):
            raise ModelCardError(f"{source}: field 'variables[{i}]' must be a dict, got {_short(entry)}.")
        for dotted, check, expected in checks:
            head, _, rest = dotted.partition(".")
            value = _get(entry, rest) if head == "variable" else _get(entry, dotted)
            if head == "variable" and not rest:
                continue
            if value is _MISSING or not check(value):
                field = f"variables[{i}].{rest if head == 'variable' else dotted}"
                raise ModelCardError(f"{source}: field '{field}' is missing or wrong; expected {expected}.")
    names = [v["name"] for v in variables]
    if len(set(names)) != len(names):
        raise ModelCardError(f"{source}: field 'variables' names a variable twice: {names}.")
    if names[0] != card["variable"]["name"]:
        raise ModelCardError(f"{source}: field 'variable' must repeat 'variables[0]' ({names[0]!r}).")
