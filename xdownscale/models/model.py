"""The loaded model: network, normalisation, grid, target spectrum and reference quantiles.

:func:`load_model` never runs code from a file: the card is JSON, the weights are safetensors (pickle
files are refused before they are opened), and the sha256 of the weights must match the card.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from ..errors import InputError, ModelCardError, WeightsIntegrityError
from .card import KINDS, MASK_KEY, NETWORK_PREFIX, QUANTILES_KEY, read_card, validate_card
from .io import read_safetensors, sha256_file

__all__ = ["Model", "build_network", "grid_from_card", "load_downscaling_model", "psd_from_card"]

# fields of the card that define what the weights compute; the JSON card and the copy inside the
# safetensors metadata must agree on them (metrics and descriptions may be edited in the JSON)
_BINDING_FIELDS = (
    "name",
    "kind",
    "architecture",
    "variable",
    "variables",
    "grid",
    "sigma",
    "reference_quantiles",
)


#: entries of a joint model's ``variables`` list that are not the variable's description
_PER_VARIABLE = ("transform", "target_psd", "reference_quantiles")


def build_network(kind: str, config: dict[str, Any], sigma: dict[str, Any]) -> torch.nn.Module:
    """The wrapped network of a model kind: ``ConsistencyModel(UNet)`` or ``ScoreModel(UNet)``.

    Parameters
    ----------
    kind
        ``"cm"`` or ``"sde"``.
    config
        ``UNet`` constructor arguments (the card's ``architecture.config``).
    sigma
        ``{"min", "max", "data"}``: noise range and data scale (for ``"sde"`` the scale of the input
        preconditioning ``c_in``; the network's default where null).
    """
    from ..nets.unet import UNet

    net = UNet(**config)
    if kind == "cm":
        from ..core.consistency import ConsistencyModel

        return ConsistencyModel(
            net, sigma_min=float(sigma["min"]), sigma_max=float(sigma["max"]), sigma_data=float(sigma["data"])
        )
    if kind == "sde":
        from ..core.sde import ScoreModel

        data = {} if sigma.get("data") is None else {"sigma_data": float(sigma["data"])}
        return ScoreModel(net, sigma_min=float(sigma["min"]), sigma_max=float(sigma["max"]), **data)
    raise ModelCardError(f"Unknown model kind {kind!r}; expected one of {', '.join(map(repr, KINDS))}.")


def grid_from_card(card: dict[str, Any], mask: np.ndarray | None = None) -> xr.Dataset:
    """The model grid as a Dataset: CF latitude/longitude coordinates and the variable ``mask``
    (True = valid cell); attrs ``periodic`` (0/1) and ``spacing_km``."""
    g = card["grid"]
    ydim, xdim = g["dims"]
    coords = {
        name: (tuple(c["dims"]), np.asarray(c["values"], dtype=np.float64), dict(c.get("attrs") or {}))
        for name, c in g["coords"].items()
    }
    if mask is None:
        mask = np.ones(tuple(g["shape"]), dtype=bool)
    ds = xr.Dataset(
        {
            "mask": (
                (ydim, xdim),
                np.asarray(mask, dtype=bool),
                {"long_name": "valid cells of the model grid"},
            )
        },
        coords=coords,
    )
    ds.attrs = {"periodic": int(bool(g["periodic"]))}
    if g.get("spacing_km") is not None:
        ds.attrs["spacing_km"] = [float(v) for v in g["spacing_km"]]
    return ds


def psd_from_card(card: dict[str, Any]) -> xr.DataArray:
    """The target PSD of the card as a DataArray over ``wavenumber`` (format of
    :func:`xdownscale.xr.spectra.psd`)."""
    p = card["target_psd"]
    k = np.asarray(p["wavenumber"], dtype=np.float64)
    values = np.asarray([np.nan if v is None else v for v in p["psd"]], dtype=np.float64)
    wl = p.get("wavelength_km")
    wavelength = (
        np.asarray([np.nan if v is None else v for v in wl], dtype=np.float64)
        if wl is not None
        else (p.get("spacing_km") or np.nan) / k
    )
    attrs = dict(p.get("attrs") or {})
    attrs["n_cells"] = int(p["n_cells"])
    attrs["spacing_km"] = float("nan") if p.get("spacing_km") is None else float(p["spacing_km"])
    return xr.DataArray(
        values,
        dims=("wavenumber",),
        coords={
            "wavenumber": (
                "wavenumber",
                k,
                {"units": "1", "long_name": "radial wavenumber (cycles per grid cell)"},
            ),
            "wavelength_km": ("wavenumber", wavelength, {"units": "km", "long_name": "wavelength"}),
        },
        name=p.get("name") or f"psd_{card['variable']['name']}",
        attrs=attrs,
    )


@dataclass
class Model:
    """A downscaling model loaded by :func:`load_model`.

    Attributes
    ----------
    name, version, kind
        From the card; ``kind`` is ``"cm"`` or ``"sde"``.
    card
        The full model card (dict).
    network
        ``ConsistencyModel`` (kind ``"cm"``) or ``ScoreModel`` (kind ``"sde"``) wrapping the UNet, in
        eval mode, float32.
    transform
        The fitted :class:`xdownscale.transforms.LogNormalize` (physical units <-> network space).
    grid
        Dataset with the CF latitude/longitude coordinates of the model grid and ``mask``
        (True = valid cell); attrs ``periodic`` (0/1) and ``spacing_km``.
    target_psd
        Mean PSD of the training fields in the transformed space, over ``wavenumber``.
    reference_quantiles
        Per-cell quantiles of the training data in physical units, dims ``(quantiles, y, x)``, or None.
    variable
        ``{"name", "units", "standard_name", "long_name", "kind"}`` of the modelled variable; ``kind`` is
        ``"precipitation"``, ``"temperature"`` or ``"other"``.
    sigma_min, sigma_max, sigma_data
        Noise range and data scale of the network.
    sha256, path
        Digest and path of the weights file.
    parts
        A joint model's variables (one network channel each, in order) as one-variable views of this
        model (see :meth:`for_variable`); empty for a model of one variable.
    """

    name: str
    version: str
    kind: str
    card: dict[str, Any]
    network: torch.nn.Module
    transform: Any
    grid: xr.Dataset
    target_psd: xr.DataArray
    reference_quantiles: xr.DataArray | None
    variable: dict[str, Any]
    sigma_min: float
    sigma_max: float
    sigma_data: float | None
    sha256: str
    path: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    parts: tuple[Model, ...] = ()

    @property
    def variables(self) -> list[str]:
        """Names of the modelled variables, one per network channel."""
        return [p.variable["name"] for p in self.parts] or [self.variable["name"]]

    @property
    def joint(self) -> bool:
        """True for a joint model of several variables."""
        return len(self.parts) > 1

    def for_variable(self, name: str) -> Model:
        """The one-variable view of a joint model: that variable's transform, target spectrum, reference
        quantiles and names, sharing the network (whose channel ``variables.index(name)`` it is)."""
        for part in self.parts or (self,):
            if part.variable["name"] == name:
                return part
        raise InputError(f"Model '{self.name}' has no variable {name!r}; its variables are {self.variables}.")

    @property
    def mask(self) -> np.ndarray:
        """Boolean array (ny, nx), True = valid cell."""
        return np.asarray(self.grid["mask"].values, dtype=bool)

    @property
    def frequency(self) -> str | None:
        """Time step of the training data (``"1D"`` for daily), or None."""
        return self.card.get("frequency")

    @property
    def periodic(self) -> bool:
        """True when the grid is global in longitude."""
        return bool(self.card["grid"]["periodic"])

    @property
    def shape(self) -> tuple[int, int]:
        """Grid shape ``(ny, nx)``."""
        ny, nx = self.card["grid"]["shape"]
        return int(ny), int(nx)

    def to(self, device: str | torch.device) -> Model:
        """Move the network to ``device``; returns ``self``."""
        self.device = torch.device(device)
        self.network.to(self.device)
        for part in self.parts:
            part.device = self.device
        return self

    def _variables_text(self) -> str:
        if not self.joint:
            return f"variable={self.variable['name']!r} [{self.variable['units']}]"
        return "variables=" + ", ".join(f"{p.variable['name']!r} [{p.variable['units']}]" for p in self.parts)

    def __repr__(self) -> str:
        ny, nx = self.shape
        return (
            f"<xdownscale.Model {self.name!r} v{self.version} kind={self.kind!r} "
            f"{self._variables_text()} grid={ny}x{nx} "
            f"periodic={self.periodic} sigma=[{self.sigma_min:g}, {self.sigma_max:g}] device={self.device}>"
        )


def _quantiles(
    tensors: dict[str, torch.Tensor],
    info: dict[str, Any] | None,
    key: str,
    units: str,
    grid: xr.Dataset,
    name: str,
    weights: Path,
    dims: list[str],
) -> xr.DataArray | None:
    """The reference quantiles stored under ``key`` as (quantiles, y, x), or None when the card has none."""
    if info is None:
        return None
    if key not in tensors:
        raise ModelCardError(f"{weights} has no tensor '{key}' named in the card.")
    ydim, xdim = dims
    return xr.DataArray(
        tensors[key].float().numpy(),
        dims=("quantiles", ydim, xdim),
        coords={
            "quantiles": np.asarray(info["quantiles"], dtype=np.float64),
            **grid.drop_vars("mask").coords,
        },
        name=name,
        attrs={"units": info.get("units", units), "long_name": "per-cell quantiles of the training data"},
    )


def _check_embedded(card: dict[str, Any], meta: dict[str, str], weights: Path) -> None:
    if "card" not in meta:
        raise ModelCardError(
            f"{weights} carries no model card in its safetensors metadata; it was not written by "
            "xdownscale.models.save_model."
        )
    try:
        embedded = json.loads(meta["card"])
    except json.JSONDecodeError as err:
        raise ModelCardError(
            f"{weights}: the card in the safetensors metadata is not valid JSON ({err})."
        ) from err
    validate_card(embedded, source=f"{weights} (metadata)", require_sha256=False)
    for key in _BINDING_FIELDS:
        if embedded.get(key) != card.get(key):
            raise ModelCardError(
                f"Field '{key}' of the model card {weights.with_suffix('.json')} differs from the card "
                f"stored inside {weights.name}. The card must describe these weights: restore it or "
                "re-save the model with xdownscale.models.save_model."
            )


def load_downscaling_model(card_path: Path, *, device: str | torch.device = "cpu") -> Model:
    """The downscaling model (``cm`` or ``sde``) whose card is ``card_path``; see
    :func:`xdownscale.models.load_model`."""
    from ..transforms import LogNormalize

    card = read_card(card_path)
    weights = card_path.with_suffix(".safetensors")
    if not weights.is_file():
        raise ModelCardError(f"The model card {card_path} has no weights file {weights.name} beside it.")
    tensors, meta = read_safetensors(weights)  # refuses pickles before anything else
    digest = sha256_file(weights)
    if digest != card["sha256"]:
        raise WeightsIntegrityError(
            f"The weights {weights} do not match their model card: sha256 {digest}, card says "
            f"{card['sha256']}. The file is corrupt or was replaced; download or copy it again."
        )
    _check_embedded(card, meta, weights)

    network = build_network(card["kind"], card["architecture"]["config"], card["sigma"])
    state = {k[len(NETWORK_PREFIX) :]: v for k, v in tensors.items() if k.startswith(NETWORK_PREFIX)}
    expected = network.state_dict()
    for key, value in state.items():
        if key in expected and value.is_floating_point():
            state[key] = value.to(expected[key].dtype)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelCardError(
            f"The weights in {weights} do not fit the architecture in the card "
            f"({card['architecture']['config']}): {err}"
        ) from err
    network.eval().requires_grad_(False)

    if MASK_KEY not in tensors:
        raise ModelCardError(f"{weights} has no tensor '{MASK_KEY}' (the grid mask) named in the card.")
    mask = tensors[MASK_KEY].numpy().astype(bool)
    if list(mask.shape) != list(card["grid"]["shape"]):
        raise ModelCardError(
            f"The mask in {weights} has shape {list(mask.shape)}; the card's grid.shape is "
            f"{card['grid']['shape']}."
        )
    grid = grid_from_card(card, mask)

    dims = card["grid"]["dims"]
    ref = _quantiles(
        tensors,
        card["reference_quantiles"],
        QUANTILES_KEY,
        card["variable"]["units"],
        grid,
        card["variable"]["name"],
        weights,
        dims,
    )
    sigma = card["sigma"]
    model = Model(
        name=card["name"],
        version=card["version"],
        kind=card["kind"],
        card=card,
        network=network,
        transform=LogNormalize.from_dict(card["variable"]["transform"]),
        grid=grid,
        target_psd=psd_from_card(card),
        reference_quantiles=ref,
        variable={k: v for k, v in card["variable"].items() if k != "transform"},
        sigma_min=float(sigma["min"]),
        sigma_max=float(sigma["max"]),
        sigma_data=None if sigma["data"] is None else float(sigma["data"]),
        sha256=digest,
        path=weights,
    )
    if "variables" in card:
        parts = []
        for entry in card["variables"]:
            info = entry["reference_quantiles"]
            parts.append(
                replace(
                    model,
                    transform=LogNormalize.from_dict(entry["transform"]),
                    target_psd=psd_from_card({"target_psd": entry["target_psd"], "variable": entry}),
                    reference_quantiles=_quantiles(
                        tensors,
                        info,
                        (info or {}).get("key", ""),
                        entry["units"],
                        grid,
                        entry["name"],
                        weights,
                        dims,
                    ),
                    variable={k: v for k, v in entry.items() if k not in _PER_VARIABLE},
                )
            )
        model.parts = tuple(parts)
    return model.to(device)
