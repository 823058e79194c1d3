"""Training, saving and loading of assimilation models: SLAMS (latent) and SDA (pixel space).

Kind ``"slams"`` (Qu et al. 2024): first an :class:`~xdownscale.nets.autoencoder.Autoencoder` is trained
to reconstruct the state from the state and its observation modalities on the grid (stations: point
values on the cells of the real stations when given, else on a random ``station_fraction`` of cells;
satellite: block means over ``satellite_factor`` cells; each with noise ``obs_noise`` and dropped with
probability ``modality_dropout``), then a score network (:class:`~xdownscale.nets.unet.UNet` with
``in_channels = window * latent_channels``) on windows of ``window`` consecutive latent states by
denoising score matching of the VP SDE (:func:`xdownscale.core.vpsde.dsm_loss_vp`). Kind ``"sda"``
(Rozet & Louppe 2023, the pixel-space baseline) trains the score network on windows of states directly.

Windows never span a gap in time (e.g. between two winters of DJF data). Training states are in the
space of the fitted :class:`~xdownscale.transforms.LogNormalize` (log for precipitation, with
``transform_eps`` 0.1 mm/day by default: assimilation works on moderate amounts, not on the 1e-4 mm/day
drizzle that the downscaling transform resolves). AdamW with a linearly decaying learning rate (paper:
2e-4, weight decay 1e-3); the score network's EMA is what is shipped.

Files: ``NAME.safetensors`` holds ``score.*`` (EMA score UNet), ``autoencoder.*`` (SLAMS only) and
``aux.mask``; the card (``NAME.json``, kind ``"slams"`` or ``"sda"``) has the usual fields plus
``autoencoder`` and ``assimilation``. Checkpoints in ``out/checkpoints/step-NNNNNNNN/`` (safetensors +
JSON state) let an interrupted run resume where it stopped.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from ..errors import InputError, ModelCardError, WeightsIntegrityError
from .card import ASSIMILATION_KINDS, CARD_FORMAT, MASK_KEY, jsonable, validate_card, write_card
from .io import read_safetensors, sha256_file, write_safetensors

__all__ = [
    "ASSIMILATION_KINDS",
    "AssimilationModel",
    "load_assimilation_model",
    "train_assimilation",
    "validate_assimilation_card",
]

SCORE_PREFIX = "score."
AE_PREFIX = "autoencoder."

DEFAULTS: dict[str, Any] = {
    "window": 5,
    "latent_channels": 4,
    "factor": 2,
    "hidden": 32,
    "channels": None,  # (32, 64, 128) for slams, (64, 128, 256) for sda (paper)
    "num_res_blocks": 2,
    "attention": False,
    "groups": 8,
    "ae_steps": 2000,
    "steps": 5000,
    "batch_size": 16,
    "lr": 2e-4,
    "weight_decay": 1e-3,
    "ema_decay": 0.999,
    "seed": 0,
    "station_fraction": 0.02,
    "satellite_factor": 4,
    "obs_noise": 0.05,
    "modality_dropout": 0.5,
    "transform_eps": 0.1,
    "checkpoint_every": 1000,
    "log_every": 100,
    "name": None,
    "version": "0.1.0",
    "licence": "see the licence of the training data",
    "units": None,
}
#: configuration entries that must agree to resume a run
_IDENTITY = (
    "kind",
    "window",
    "latent_channels",
    "factor",
    "hidden",
    "channels",
    "num_res_blocks",
    "ae_steps",
    "steps",
    "batch_size",
    "seed",
)


@dataclass
class AssimilationModel:
    """A loaded SLAMS or SDA model (:func:`load_assimilation_model`).

    Attributes
    ----------
    name, version, kind
        From the card; ``kind`` is ``"slams"`` or ``"sda"``.
    card
        The model card.
    score_net
        The score UNet on windows (``window * channels`` in and out), eval mode.
    autoencoder
        The :class:`~xdownscale.nets.autoencoder.Autoencoder` (``"slams"``) or None.
    transform
        :class:`~xdownscale.transforms.LogNormalize` between physical units and the model space.
    grid
        Dataset with the model grid's CF latitude/longitude and ``mask`` (True = valid).
    variable
        ``{"name", "units", "standard_name", "long_name", "kind"}``.
    window
        ``K``, states per window of the score network.
    background_std
        Default background error std (physical units).
    """

    name: str
    version: str
    kind: str
    card: dict[str, Any]
    score_net: torch.nn.Module
    autoencoder: torch.nn.Module | None
    transform: Any
    grid: xr.Dataset
    variable: dict[str, Any]
    window: int
    background_std: float
    offset: float = 0.0
    scale: float = 1.0
    sha256: str = ""
    path: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def shape(self) -> tuple[int, int]:
        ny, nx = self.card["grid"]["shape"]
        return int(ny), int(nx)

    @property
    def mask(self) -> np.ndarray:
        return np.asarray(self.grid["mask"].values, dtype=bool)

    @property
    def periodic(self) -> bool:
        return bool(self.card["grid"]["periodic"])

    def to_model_space(self, values: np.ndarray) -> np.ndarray:
        """Physical units -> model space: ``(transform(x) - offset) / scale`` (float64, NaN kept)."""
        return (
            np.asarray(self.transform.forward(np.asarray(values, dtype=np.float64))) - self.offset
        ) / self.scale

    def from_model_space(self, values: np.ndarray) -> np.ndarray:
        """Model space -> physical units (inverse of :meth:`to_model_space`)."""
        return np.asarray(
            self.transform.inverse(np.asarray(values, dtype=np.float64) * self.scale + self.offset)
        )

    @property
    def nonlinear(self) -> bool:
        """True when the model space is a nonlinear (log) function of the physical units (precipitation):
        averages and interpolation must then be taken in physical units (no Jensen bias)."""
        return bool(self.transform.log)

    def _log_affine(self) -> tuple[float, float]:
        """``(a, b)`` with model space ``= a * u + b``, ``u = log1p(x / eps)`` (log) or ``u = x``."""
        lo, hi = float(self.transform.lo), float(self.transform.hi)
        a = 2.0 / (hi - lo) / self.scale
        return a, (-2.0 * lo / (hi - lo) - 1.0 - self.offset) / self.scale

    def model_space_bounds(self, margin: float = 0.5) -> tuple[float, float]:
        """Model-space values of the training minimum and maximum, widened by ``margin`` times their
        distance on each side: the range a state is clamped to before it is taken to physical units
        inside the likelihood (an unclamped exponential of a noisy early estimate overflows)."""
        lo_ms, hi_ms = (
            float(v)
            for v in self.to_model_space(np.array([self.transform.data_min, self.transform.data_max]))
        )
        width = hi_ms - lo_ms
        return lo_ms - margin * width, hi_ms + margin * width

    def to_model_space_torch(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable :meth:`to_model_space` on a tensor in physical units."""
        a, b = self._log_affine()
        u = torch.log1p(x.clamp_min(0.0) / float(self.transform.eps)) if self.transform.log else x
        return a * u + b

    def from_model_space_torch(self, z: torch.Tensor) -> torch.Tensor:
        """Differentiable :meth:`from_model_space` on a tensor; values are first clamped to
        :meth:`model_space_bounds`."""
        lo, hi = self.model_space_bounds()
        a, b = self._log_affine()
        u = (z.clamp(lo, hi) - b) / a
        return float(self.transform.eps) * torch.expm1(u).clamp_min(0.0) if self.transform.log else u

    def to(self, device: str | torch.device) -> AssimilationModel:
        """Move the networks to ``device``; returns ``self``."""
        self.device = torch.device(device)
        self.score_net.to(self.device)
        if self.autoencoder is not None:
            self.autoencoder.to(self.device)
        return self

    def __repr__(self) -> str:
        ny, nx = self.shape
        return (
            f"<xdownscale.AssimilationModel {self.name!r} v{self.version} kind={self.kind!r} "
            f"variable={self.variable['name']!r} [{self.variable['units']}] grid={ny}x{nx} "
            f"window={self.window}>"
        )


# ------------------------------------------------------------------------------------------------ card
def validate_assimilation_card(
    card: Any, *, source: str = "model card", require_sha256: bool = True
) -> dict[str, Any]:
    """Check a ``"slams"`` / ``"sda"`` card: the common fields (:func:`~xdownscale.models.card.validate_card`)
    and the ``autoencoder`` and ``assimilation`` entries.

    Raises
    ------
    ModelCardError
        A field is missing or wrong, or the card is not of an assimilation kind; the message names it.
    """
    if isinstance(card, dict) and card.get("kind") not in ASSIMILATION_KINDS:
        raise ModelCardError(
            f"{source}: model '{card.get('name')}' has kind {card.get('kind')!r}; assimilation needs a "
            "'slams' or 'sda' model (train one with xdownscale.models.assimilation.train_assimilation)."
        )
    validate_card(card, source=source, require_sha256=require_sha256)
    info = card["assimilation"]
    for key in ("window", "eta", "background_std", "offset", "scale"):
        if not isinstance(info.get(key), (int, float)) or isinstance(info.get(key), bool):
            raise ModelCardError(f"{source}: field 'assimilation.{key}' is missing or not a number.")
    ae = card.get("autoencoder")
    if card["kind"] == "slams" and not (isinstance(ae, dict) and isinstance(ae.get("config"), dict)):
        raise ModelCardError(
            f"{source}: kind 'slams' needs the field 'autoencoder' "
            "({'class': 'Autoencoder', 'config': ...})."
        )
    return card


def _save(
    directory: Path,
    card: dict[str, Any],
    score: torch.nn.Module,
    ae: torch.nn.Module | None,
    mask: np.ndarray,
) -> Path:
    card = copy.deepcopy(jsonable(card))
    card.pop("sha256", None)
    card["grid"]["mask"] = {"key": MASK_KEY, "valid_cells": int(mask.sum())}
    validate_assimilation_card(card, source=f"model card '{card['name']}'", require_sha256=False)
    tensors = {MASK_KEY: torch.from_numpy(mask.astype(np.uint8))}
    tensors.update({SCORE_PREFIX + k: v for k, v in score.state_dict().items()})
    if ae is not None:
        tensors.update({AE_PREFIX + k: v for k, v in ae.state_dict().items()})
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{card['name']}.safetensors"
    write_safetensors(weights, tensors, {"card": json.dumps(card, allow_nan=False), "format": "pt"})
    card["sha256"] = sha256_file(weights)
    write_card(directory / f"{card['name']}.json", card)
    return weights


def load_assimilation_model(name_or_path: Any, *, device: str | torch.device = "cpu") -> AssimilationModel:
    """Load a ``"slams"`` or ``"sda"`` model by name (searched like :func:`xdownscale.load_model`) or path.

    Raises
    ------
    ModelNotFoundError
        No such model.
    ModelCardError
        The card is incomplete or not an assimilation model.
    WeightsIntegrityError
        The weights do not match the card's sha256, or are not safetensors.
    """
    from ..nets.autoencoder import Autoencoder
    from ..nets.unet import UNet
    from ..transforms import LogNormalize
    from .model import grid_from_card
    from .registry import find_model

    card_path = find_model(name_or_path)
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelCardError(f"{card_path}: the model card is not valid JSON ({err}).") from err
    validate_assimilation_card(card, source=str(card_path))
    weights = card_path.with_suffix(".safetensors")
    digest = sha256_file(weights)
    if digest != card["sha256"]:
        raise WeightsIntegrityError(
            f"{weights} has sha256 {digest}, but its card {card_path.name} says {card['sha256']}: the "
            "weights "
            "were changed or replaced. Re-download or re-train the model."
        )
    tensors, _ = read_safetensors(weights)
    score = UNet(**card["architecture"]["config"])
    score.load_state_dict(
        {k[len(SCORE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(SCORE_PREFIX)}
    )
    ae = None
    if card["autoencoder"] is not None:
        ae = Autoencoder(**card["autoencoder"]["config"])
        ae.load_state_dict({k[len(AE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(AE_PREFIX)})
        ae.eval().requires_grad_(False)
    score.eval().requires_grad_(False)
    mask = tensors[MASK_KEY].numpy().astype(bool) if MASK_KEY in tensors else None
    variable = {k: v for k, v in card["variable"].items() if k != "transform"}
    model = AssimilationModel(
        name=card["name"],
        version=card["version"],
        kind=card["kind"],
        card=card,
        score_net=score,
        autoencoder=ae,
        transform=LogNormalize.from_dict(card["variable"]["transform"]),
        grid=grid_from_card(card, mask),
        variable=variable,
        window=int(card["assimilation"]["window"]),
        background_std=float(card["assimilation"]["background_std"]),
        offset=float(card["assimilation"].get("offset", 0.0)),
        scale=float(card["assimilation"].get("scale", 1.0)),
        sha256=digest,
        path=weights,
    )
    return model.to(device)


# -------------------------------------------------------------------------------------------- training
def _windows(times: np.ndarray, window: int) -> np.ndarray:
    """Start indices of windows of ``window`` consecutive, evenly spaced time steps."""
    n = len(times)
    if n < window:
        return np.zeros(0, dtype=np.int64)
    t = np.asarray(times).astype("datetime64[s]").astype(np.int64)
    steps = np.diff(t)
    regular = steps == np.median(steps) if steps.size else np.zeros(0, bool)
    starts = [i for i in range(n - window + 1) if regular[i : i + window - 1].all()]
    return np.asarray(starts, dtype=np.int64)


class _ObsSynth:
    """Synthetic observation channels (value, mask per modality) for the encoder, from a state batch."""

    def __init__(
        self, shape: tuple[int, int], cfg: Mapping[str, Any], station_cells: np.ndarray | None
    ) -> None:
        self.shape = shape
        self.cfg = cfg
        self.station_cells = None if station_cells is None else torch.as_tensor(station_cells)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        cfg = self.cfg
        noise = float(cfg["obs_noise"])

        def randn() -> torch.Tensor:
            return torch.randn(x.shape, generator=gen).to(x.device)

        def keep() -> torch.Tensor:
            return (torch.rand(b, 1, 1, 1, generator=gen) >= float(cfg["modality_dropout"])).to(
                x.device, x.dtype
            )

        if self.station_cells is not None:
            smask = torch.zeros(1, 1, h, w)
            smask[0, 0, self.station_cells[:, 0], self.station_cells[:, 1]] = 1.0
            smask = smask.expand(b, 1, h, w)
        else:
            smask = (torch.rand(b, 1, h, w, generator=gen) < float(cfg["station_fraction"])).float()
        smask = smask.to(x.device, x.dtype) * keep()
        f = int(cfg["satellite_factor"])
        coarse = F.avg_pool2d(x, f, ceil_mode=True)
        sat = F.interpolate(coarse, scale_factor=f, mode="nearest")[..., :h, :w]
        smk = keep().expand(b, 1, h, w)
        st_val = (x + noise * randn()) * smask
        sat_val = (sat + noise * randn()) * smk
        return torch.cat([st_val, smask, sat_val, smk], dim=1)


def _lr_lambda(total: int) -> Any:
    return lambda step: max(0.0, 1.0 - step / max(total, 1))


def _progress(total: int, desc: str, enabled: bool, initial: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True, leave=False)


def train_assimilation(
    kind: str = "slams",
    *,
    state: Any,
    out: str | Path,
    stations: xr.DataArray | None = None,
    satellite: xr.DataArray | None = None,
    variable: str | None = None,
    device: str | None = None,
    resume: bool = True,
    progress: bool = True,
    **config: Any,
) -> Path:
    """Train a ``"slams"`` or ``"sda"`` assimilation model on a state trajectory and save it.

    Parameters
    ----------
    kind
        ``"slams"`` (autoencoder + latent score model) or ``"sda"`` (pixel score model).
    state
        The state (analysis/reanalysis) fields ``(time, lat, lon)``: a DataArray, a Dataset (with
        ``variable``) or netCDF/zarr paths.
    out
        Output directory: ``NAME.safetensors``, ``NAME.json`` and ``checkpoints/``.
    stations
        Optional station observations: their locations are where the encoder learns to expect
        station values (else random cells).
    satellite
        Optional satellite field; its spacing over the state's sets ``satellite_factor`` when not given.
    device
        Torch device (default: CUDA when available).
    resume
        Continue from the last checkpoint in ``out`` (its configuration must agree).
    progress
        Show a tqdm progress bar.
    **config
        See ``DEFAULTS`` in this module: window, latent_channels, factor, hidden, channels,
        num_res_blocks, attention, groups, ae_steps, steps, batch_size, lr, weight_decay, ema_decay, seed,
        station_fraction, satellite_factor, obs_noise, modality_dropout, transform_eps,
        checkpoint_every, log_every, name, version, licence, units.

    Returns
    -------
    Path
        The ``NAME.safetensors`` file.

    Raises
    ------
    InputError
        Unknown kind or option, too few time steps for one window.
    """
    from ..core.rng import sample_key
    from ..core.vpsde import ETA, VPSDE, dsm_loss_vp, precondition_eps
    from ..nets.autoencoder import Autoencoder
    from ..nets.unet import UNet
    from ..transforms import LogNormalize
    from ..xr.cf import find_time
    from ..xr.observations import station_indices
    from .checkpoint import latest_checkpoint, unflatten_optimizer
    from .data import STANDARD_NAMES, frequency, grid_card, prepare_field, select_variable

    if kind not in ASSIMILATION_KINDS:
        raise InputError(f"kind={kind!r} is not an assimilation model kind; use 'slams' or 'sda'.")
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise InputError(f"Unknown training options {unknown}; known: {sorted(DEFAULTS)}.")
    cfg = {**DEFAULTS, **config, "kind": kind}
    if cfg["channels"] is None:
        cfg["channels"] = [32, 64, 128] if kind == "slams" else [64, 128, 256]
    cfg["channels"] = [int(c) for c in cfg["channels"]]
    window = int(cfg["window"])
    if window < 1 or window % 2 == 0:
        raise InputError(f"window must be a positive odd number (paper: 5), got {window}.")
    out = Path(out)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    da, _ = select_variable(state, variable)
    da, qkind, grid = prepare_field(da, cfg["units"])
    time_name = find_time(da)
    times = np.asarray(da[time_name].values)
    starts = _windows(times, window)
    if starts.size == 0:
        raise InputError(
            f"The state has no {window} consecutive, evenly spaced time steps (it has {len(times)}); the "
            f"score model learns windows of {window} states. Pass a longer trajectory or a smaller window."
        )
    phys = np.asarray(da.values, dtype=np.float32)
    valid = np.isfinite(phys)
    mask = np.asarray(valid.any(axis=0), dtype=bool)
    transform = LogNormalize(eps=float(cfg["transform_eps"]), log=qkind == "precipitation").fit(da)
    data = np.asarray(transform.forward(phys), dtype=np.float64)
    # standardise the transformed state so that the VP SDE sees unit-variance data
    offset, scale = float(np.nanmean(data)), float(np.nanstd(data)) or 1.0
    data = np.nan_to_num(((data - offset) / scale).astype(np.float32), nan=0.0)
    h, w = data.shape[-2:]
    x_all = torch.from_numpy(data)[:, None]  # (T, 1, H, W)
    m_all = torch.from_numpy(valid)[:, None]
    if satellite is not None and "satellite_factor" not in config:
        from ..xr.cf import grid_spacing_km

        ratio = np.mean(grid_spacing_km(satellite)) / np.mean(grid_spacing_km(da))
        cfg["satellite_factor"] = max(1, round(ratio))
    station_cells = None
    if stations is not None:
        iy, ix, inside = station_indices(stations, da)
        station_cells = np.stack([np.round(iy[inside]), np.round(ix[inside])], axis=1).astype(np.int64)
    f_bg = int(cfg["satellite_factor"])
    coarse = F.interpolate(
        F.avg_pool2d(torch.from_numpy(np.nan_to_num(phys))[:, None], f_bg, ceil_mode=True),
        scale_factor=f_bg,
        mode="nearest",
    )[..., :h, :w]
    diff = (torch.from_numpy(np.nan_to_num(phys))[:, None] - coarse)[m_all]
    background_std = float(diff.square().mean().sqrt()) if diff.numel() else 1.0

    sde = VPSDE(ETA)
    synth = _ObsSynth((h, w), cfg, station_cells)
    torch.manual_seed(sample_key(cfg["seed"], "init"))
    ae = None
    if kind == "slams":
        ae = Autoencoder(
            1,
            modalities=2,
            latent_channels=int(cfg["latent_channels"]),
            factor=int(cfg["factor"]),
            hidden=int(cfg["hidden"]),
            periodic=grid.periodic,
        ).to(dev)
        score_channels = int(cfg["latent_channels"])
    else:
        score_channels = 1
    net = UNet(
        in_channels=window * score_channels,
        out_channels=window * score_channels,
        channels=cfg["channels"],
        num_res_blocks=int(cfg["num_res_blocks"]),
        attention=bool(cfg["attention"]),
        groups=int(cfg["groups"]),
        periodic=grid.periodic,
        num_heads=1,
    ).to(dev)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(sample_key(cfg["seed"], "batches"))
    ae_steps = int(cfg["ae_steps"]) if kind == "slams" else 0
    total = ae_steps + int(cfg["steps"])
    opt_ae = (
        torch.optim.AdamW(ae.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"]) if ae else None
    )
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched_ae = torch.optim.lr_scheduler.LambdaLR(opt_ae, _lr_lambda(ae_steps)) if opt_ae else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(int(cfg["steps"])))
    step = 0
    history: list[dict[str, Any]] = []

    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        state_json = json.loads((ckpt / "state.json").read_text())
        old = state_json["config"]
        diff_keys = [k for k in _IDENTITY if jsonable(old.get(k)) != jsonable(cfg.get(k))]
        if diff_keys:
            raise InputError(
                f"The checkpoint {ckpt} was made with another configuration ({', '.join(diff_keys)} differ); "
                "pass the same options, another out=, or resume=False to start afresh."
            )
        tensors, _ = read_safetensors(ckpt / "weights.safetensors")
        _load_prefixed(net, tensors, "net.")
        _load_prefixed(ema, tensors, "ema.")
        if ae is not None:
            _load_prefixed(ae, tensors, "ae.")

        opt.load_state_dict(unflatten_optimizer(_sub(tensors, "opt."), state_json["opt"]))
        if opt_ae is not None and state_json.get("opt_ae"):
            opt_ae.load_state_dict(unflatten_optimizer(_sub(tensors, "opt_ae."), state_json["opt_ae"]))
        step = int(state_json["step"])
        history = state_json["history"]
        gen.set_state(tensors["rng.batches"])
        if sched_ae is not None:
            sched_ae.last_epoch = min(step, ae_steps)
        sched.last_epoch = max(0, step - ae_steps)

    bar = _progress(total, f"train {kind}", progress, step)
    t_start = time.time()
    bs = int(cfg["batch_size"])
    latents: torch.Tensor | None = None
    running, n_run = 0.0, 0
    while step < total:
        if ae is not None and opt_ae is not None and sched_ae is not None and step < ae_steps:
            ae.train()
            idx = torch.randint(0, x_all.shape[0], (bs,), generator=gen)
            x, m = x_all[idx].to(dev), m_all[idx].to(dev)
            obs = synth(x, gen)
            z = ae.encode(x, obs)
            rec = ae.decode(z, size=(h, w))
            loss = ((rec - x) ** 2 * m).sum() / m.sum().clamp_min(1) + 1e-4 * z.square().mean()
            opt_ae.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
            opt_ae.step()
            sched_ae.step()
        else:
            if ae is not None and latents is None:
                latents = _encode_all(ae, x_all, synth, dev, bs, sample_key(cfg["seed"], "latents"))
            src = latents if latents is not None else x_all
            pick = torch.from_numpy(starts)[torch.randint(0, len(starts), (bs,), generator=gen)]
            idx = pick[:, None] + torch.arange(window)[None, :]
            x0 = src[idx].to(dev)  # (B, K, C, h, w)
            msk = None if latents is not None else m_all[idx].to(dev)

            def eps_fn(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                flat = xt.flatten(1, 2)  # (B, K * C, h, w): the window's states as channels
                return precondition_eps(net, flat, t, sde).reshape(xt.shape)

            net.train()
            loss = dsm_loss_vp(eps_fn, x0, sde, generator=gen, mask=msk)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            s_ = step - ae_steps
            decay = min(float(cfg["ema_decay"]), (1.0 + s_) / (10.0 + s_))
            with torch.no_grad():
                for pa, p in zip(ema.parameters(), net.parameters(), strict=True):
                    pa.lerp_(p, 1.0 - decay)
                for ba, b in zip(ema.buffers(), net.buffers(), strict=True):
                    ba.copy_(b)
        step += 1
        running += float(loss.detach())
        n_run += 1
        if step % int(cfg["log_every"]) == 0 or step == total or step == ae_steps:
            phase = "autoencoder" if step <= ae_steps else "score"
            history.append({"step": step, "phase": phase, "loss": running / max(n_run, 1)})
            running, n_run = 0.0, 0
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if step % int(cfg["checkpoint_every"]) == 0 and step < total:
            _checkpoint(out, step, cfg, history, net, ema, ae, opt, opt_ae, gen)
    if bar is not None:
        bar.close()
    if ae is not None:
        ae.eval()
        if latents is None:  # no score steps: still fit the latent scale
            _encode_all(ae, x_all, synth, dev, bs, sample_key(cfg["seed"], "latents"))

    name = cfg["name"] or f"{kind}-{da.name}-{h}x{w}"
    var_attrs = {
        "name": str(da.name),
        "units": da.attrs.get("units"),
        "standard_name": da.attrs.get("standard_name") or STANDARD_NAMES.get(qkind, str(da.name)),
        "long_name": da.attrs.get("long_name", str(da.name)),
        "kind": qkind,
        "transform": transform.to_dict(),
    }
    card = {
        "format": CARD_FORMAT,
        "name": name,
        "version": str(cfg["version"]),
        "kind": kind,
        "architecture": {"class": "UNet", "config": net.config},
        "autoencoder": None if ae is None else {"class": "Autoencoder", "config": ae.config},
        "variable": var_attrs,
        "grid": grid_card(da, grid),
        "frequency": frequency(times),
        "assimilation": {
            "window": window,
            "eta": ETA,
            "schedule": "cosine",
            "offset": offset,
            "scale": scale,
            "background_std": background_std,
            "background_std_note": f"RMS difference between the state and its {f_bg}x{f_bg} block means",
            "latent": None if ae is None else {"channels": ae.latent_channels, "factor": ae.factor},
            "encoder_modalities": ["stations", "satellite"] if ae is not None else [],
        },
        "training": {
            "data": str(da.name),
            "period": [
                str(np.datetime_as_string(np.datetime64(times[0], "D"))),
                str(np.datetime_as_string(np.datetime64(times[-1], "D"))),
            ],
            "licence": cfg["licence"],
            "config": {k: v for k, v in cfg.items() if k not in ("name",)},
            "history": history[-20:],
            "seconds": time.time() - t_start,
            "torch": torch.__version__,
        },
        "metrics": {},
    }
    path = _save(out, card, ema.cpu(), None if ae is None else ae.cpu(), mask)
    return path


def _sub(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _load_prefixed(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str) -> None:
    module.load_state_dict(_sub(tensors, prefix))


@torch.no_grad()
def _encode_all(
    ae: Any, x_all: torch.Tensor, synth: _ObsSynth, dev: torch.device, bs: int, seed: int
) -> torch.Tensor:
    """Latents of every training state (with one random draw of observation channels each), after fitting
    the autoencoder's latent standardisation on them; shape (T, latent_channels, h, w) on the CPU."""
    ae.eval()
    gen = torch.Generator().manual_seed(seed)
    zs = []
    for i in range(0, x_all.shape[0], bs):
        x = x_all[i : i + bs].to(dev)
        zs.append(ae.encode(x, synth(x, gen)).cpu())
    z = torch.cat(zs)
    raw = z * ae.z_std.cpu()[:, None, None] + ae.z_mean.cpu()[:, None, None]
    ae.fit_latent_scale(z.to(dev))
    return (raw - ae.z_mean.cpu()[:, None, None]) / ae.z_std.cpu()[:, None, None]


def _checkpoint(
    out: Path,
    step: int,
    cfg: Mapping[str, Any],
    history: list[dict[str, Any]],
    net: torch.nn.Module,
    ema: torch.nn.Module,
    ae: torch.nn.Module | None,
    opt: torch.optim.Optimizer,
    opt_ae: torch.optim.Optimizer | None,
    gen: torch.Generator,
) -> Path:
    from .checkpoint import flatten_optimizer

    root = out / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    tensors.update({"net." + k: v for k, v in net.state_dict().items()})
    tensors.update({"ema." + k: v for k, v in ema.state_dict().items()})
    if ae is not None:
        tensors.update({"ae." + k: v for k, v in ae.state_dict().items()})
    opt_t, opt_meta = flatten_optimizer(opt)
    tensors.update({"opt." + k: v for k, v in opt_t.items()})
    meta_ae = None
    if opt_ae is not None:
        t_ae, meta_ae = flatten_optimizer(opt_ae)
        tensors.update({"opt_ae." + k: v for k, v in t_ae.items()})
    tensors["rng.batches"] = gen.get_state()
    write_safetensors(tmp / "weights.safetensors", tensors)
    state = {
        "step": step,
        "config": jsonable(dict(cfg)),
        "history": history,
        "opt": jsonable(opt_meta),
        "opt_ae": jsonable(meta_ae),
    }
    (tmp / "state.json").write_text(json.dumps(state, allow_nan=False))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step-*"))[:-2]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)
    return final
