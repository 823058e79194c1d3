"""Training of the generative models: one loop for consistency models and score models.

:func:`train` reads fine-grid fields (a DataArray, or netCDF / zarr files opened lazily), converts them
to canonical units (precipitation mm/day, temperature K), fits the normalisation
(:class:`~xdownscale.transforms.LogNormalize`, log for precipitation) on the training period, and
computes what the downscaling pipeline needs later and stores it with the weights: the grid and its
mask (cells that are NaN at all times), the mean target power spectrum in the transformed space and
the per-cell reference quantiles in physical units (for quantile delta mapping).

The training fields are loaded into memory once, as float32 (fine-grid fields of one variable are
small), and batches are drawn with a seeded :class:`torch.Generator`. No augmentation that would move
geography (no flips or rotations). Masked cells are 0 in the network input and never enter the loss.

Losses (from :mod:`xdownscale.core`): kind ``"cm"`` trains a consistency model with easy consistency
tuning (``loss="ect"``, the default; Geng et al. 2024: denoising score matching first, then a gap between
the two noise levels that halves per stage), improved consistency training (``loss="ict"``, Song &
Dhariwal 2024: no teacher network) or the paper's consistency training (``loss="ct"``, Song et al. 2023:
an EMA teacher with decay ``ct_ema_decay``);
kind ``"sde"`` trains a score model of a VE SDE by denoising score matching. Both keep a separate EMA
of the weights, which is what is shipped. Optimiser: RAdam, gradient clipping, bf16 autocast on CUDA
and on CPUs with native bf16 (``precision="auto"``).

Checkpoints (``out/checkpoints/step-NNNNNNNN/``) hold the weights, EMA, teacher and optimiser state as
safetensors and the step, configuration, history and random-generator states; resuming from one
continues exactly as if training had not been interrupted (bitwise on the CPU).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import xarray as xr

from ..core.precision import check_precision
from ..errors import InputError
from .card import CARD_FORMAT, KINDS, jsonable
from .checkpoint import CHECKPOINT_FORMAT, flatten_optimizer, latest_checkpoint, unflatten_optimizer
from .data import (
    STANDARD_NAMES,
    frequency,
    grid_card,
    iso_date,
    split_validation,
    training_fields,
)
from .inference import compile_policy, resolve_precision
from .io import read_safetensors, save_model, write_safetensors
from .model import build_network

__all__ = [
    "COMPILE_MIN_STEPS",
    "LOSSES",
    "candidate_steps",
    "choose_step",
    "compiles_training",
    "static_fields",
    "train",
]

#: losses per model kind; the first is the default
LOSSES = {"cm": ("ect", "ict", "ct"), "sde": ("dsm",)}
NQUANTILES = 500

# configuration entries that must agree to resume a run
_IDENTITY = (
    "kind",
    "precision",
    "variable",
    "units",
    "steps",
    "batch_size",
    "architecture",
    "lr",
    "lr_schedule",
    "seed",
    "loss",
    "distance",
    "ema_decay",
    "grad_clip",
    "val_time",
    "val_fraction",
    "n_train",
    "n_val",
    "grid_shape",
    "eps",
    "data_sha256",
)


def _config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [
        f"{key}={old.get(key)!r} there, {new.get(key)!r} here"
        for key in _IDENTITY
        # runs written before training had a precision option are not compared on it
        if (key != "precision" or key in old) and jsonable(old.get(key)) != jsonable(new.get(key))
    ]


#: Learning rates of the schedules (:func:`learning_rate`)
LR_SCHEDULES = ("constant", "cosine")
#: Final learning rate of the cosine schedule, as a fraction of the initial one
LR_FLOOR = 0.1


def learning_rate(step: int, steps: int, lr: float, schedule: str) -> float:
    """The learning rate at ``step`` of ``steps``: ``lr``, or for ``"cosine"`` a half cosine from ``lr`` at
    step 0 to ``LR_FLOOR * lr`` at the last step."""
    if schedule == "constant":
        return float(lr)
    if schedule == "cosine":
        frac = min(max(step / max(steps - 1, 1), 0.0), 1.0)
        return float(lr) * (LR_FLOOR + (1.0 - LR_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * frac)))
    raise InputError(f"lr_schedule={schedule!r}: expected one of {LR_SCHEDULES}.")


#: steps left from which ``compile="auto"`` compiles the training network on CUDA: compiling its forward
#: and backward passes takes about a minute, which a long run repays
COMPILE_MIN_STEPS = 2000


def compiles_training(policy: str | None, device: torch.device, steps_left: int) -> bool:
    """Whether :func:`train` compiles the network under the compile ``policy`` (see
    :func:`xdownscale.models.inference.compile_policy`) for ``steps_left`` steps on ``device``."""
    value = compile_policy(policy)
    if value != "auto":
        return value == "always"
    return device.type == "cuda" and steps_left >= COMPILE_MIN_STEPS


class _Trainer:
    """The mutable state of a run (networks, optimiser, generators) and how to save / restore it."""

    def __init__(
        self,
        config: dict[str, Any],
        sigma: dict[str, Any],
        device: torch.device,
        static: np.ndarray | None = None,
    ) -> None:
        self.config = config
        self.device = device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config["seed"])
            self.model = build_network(config["kind"], config["architecture"], sigma).to(device)
        if static is not None:
            self.backbone.set_static(static)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.teacher = (
            copy.deepcopy(self.model).eval().requires_grad_(False) if config["loss"] == "ct" else None
        )
        self.opt = torch.optim.RAdam(self.model.parameters(), lr=config["lr"])
        from ..core.rng import sample_key

        self.batch_gen = torch.Generator().manual_seed(sample_key(config["seed"], "batches"))
        self.noise_gen = torch.Generator(device=device).manual_seed(sample_key(config["seed"], "noise"))
        self.step = 0
        self.history: list[dict[str, Any]] = []
        # training loss summed since it was last logged (kept in checkpoints so logs resume exactly)
        self.running = torch.zeros((), device=device)
        self.n_running = 0
        # wall time of the sessions before the last checkpoint loaded, and when this one started
        self.earlier_seconds = 0.0
        self.session_started = time.time()

    @property
    def backbone(self) -> Any:
        """The UNet inside the trained model's wrapper (whose ``config`` the card stores)."""
        from ..nets.unet import UNet

        return next(m for m in self.model.modules() if isinstance(m, UNet))

    def loss(
        self, x0: torch.Tensor, mask: torch.Tensor, generator: torch.Generator, step: int
    ) -> torch.Tensor:
        """The training loss of the run's kind on the batch ``x0`` (cells where ``mask`` is False are
        left out)."""
        from ..core import consistency, sde

        c, model = self.config, cast(Any, self.model)
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if c.get("precision") == "bf16"
            else nullcontext()
        )
        common = {"step": step, "total_steps": c["steps"], "generator": generator, "mask": mask}
        with autocast:
            if c["loss"] == "ect":
                return consistency.ect_loss(model, x0, **common)
            if c["loss"] == "ict":
                return consistency.ict_loss(model, x0, **common)
            if c["loss"] == "ct":
                teacher = cast(Any, self.teacher)
                return consistency.ct_loss(model, teacher, x0, **common, distance=c["distance"])
            return sde.dsm_loss(model, x0, generator=generator, mask=mask)

    def validation_loss(self, x_val: torch.Tensor, m_val: torch.Tensor) -> float:
        """The loss on the held-out fields at the last step, with noise fixed by the seed (comparable
        between validations)."""
        from ..core.rng import sample_key

        gen = torch.Generator(device=self.device).manual_seed(sample_key(self.config["seed"], "validation"))
        total, size = 0.0, self.config["batch_size"]
        self.model.eval()
        with torch.no_grad():
            for i in range(0, x_val.shape[0], size):
                xb, mb = x_val[i : i + size], m_val[i : i + size]
                total += float(self.loss(xb, mb, gen, self.step - 1)) * xb.shape[0]
        self.model.train()
        return total / x_val.shape[0]

    def run(
        self,
        x_train: torch.Tensor,
        m_train: torch.Tensor,
        out: Path,
        *,
        validate: Callable[[dict[str, Any]], None],
        log_every: int,
        val_every: int,
        progress: bool,
        callback: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        """Optimise from the current step to the last: log, ``validate`` (which fills the step's record),
        estimate the time left after 20 steps, and checkpoint into ``out``."""
        from tqdm.auto import tqdm

        c = self.config
        steps, every = c["steps"], c["checkpoint_every"]
        bar = tqdm(
            total=steps,
            initial=self.step,
            disable=not progress,
            desc=f"train {c['kind']} {c['variable']}",
            unit="step",
            dynamic_ncols=True,
        )
        self.model.train()
        clock = (time.perf_counter(), self.step)
        try:
            while self.step < steps:
                k = self.step
                idx = torch.randint(x_train.shape[0], (c["batch_size"],), generator=self.batch_gen)
                idx = idx.to(self.device)
                value = self.loss(x_train[idx], m_train[idx], self.noise_gen, k)
                if not torch.isfinite(value):
                    raise FloatingPointError(
                        f"The training loss became {float(value)} at step {k}; lower lr (now {c['lr']}) "
                        "or check the data."
                    )
                self.opt.zero_grad(set_to_none=True)
                for group in self.opt.param_groups:
                    group["lr"] = learning_rate(k, steps, c["lr"], c["lr_schedule"])
                value.backward()
                if c["grad_clip"] is not None:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), c["grad_clip"])
                self.opt.step()
                self.update_averages()
                self.step = k + 1
                self.running += value.detach().float()
                self.n_running += 1
                record: dict[str, Any] = {}
                if self.step % log_every == 0 or self.step == steps:
                    record["loss"] = float(self.running) / self.n_running
                    self.running.zero_()
                    self.n_running = 0
                if self.step % val_every == 0 or self.step == steps:
                    validate(record)
                if self.step == clock[1] + 20 and self.step < steps:
                    per_step = (time.perf_counter() - clock[0]) / 20
                    self.history.append({"step": self.step, "seconds_per_step": per_step})
                    if progress:
                        bar.write(
                            f"train {c['kind']}: {per_step:.2f} s per step on {self.device}; about "
                            f"{_duration((steps - self.step) * per_step)} for the remaining "
                            f"{steps - self.step} steps (checkpoints every {every} steps; resume=True "
                            "continues an interrupted run)."
                        )
                if record:
                    self.history.append({"step": self.step, **record})
                    bar.set_postfix({key: f"{v:.4g}" for key, v in record.items()})
                if (every and self.step % every == 0) or self.step == steps:
                    self.save(out)
                bar.update(1)
                if callback is not None:
                    callback({"step": self.step, "loss": float(value.detach())})
        finally:
            bar.close()

    def networks(self) -> dict[str, torch.nn.Module]:
        nets = {"model": self.model, "ema": self.ema}
        if self.teacher is not None:
            nets["teacher"] = self.teacher
        return nets

    @torch.no_grad()
    def update_averages(self) -> None:
        from ..core.consistency import ct_ema_decay

        # EMA warm-up (as in EDM / diffusers) so that short runs do not ship their initial weights
        decay = min(self.config["ema_decay"], (1.0 + self.step) / (10.0 + self.step))
        pairs = [(self.ema, 1.0 - decay)]
        if self.teacher is not None:
            mu = ct_ema_decay(self.step, self.config["steps"])
            pairs.append((self.teacher, 1.0 - float(mu)))
        for avg, weight in pairs:
            for p_avg, p in zip(avg.parameters(), self.model.parameters(), strict=True):
                p_avg.lerp_(p, weight)
            for b_avg, b in zip(avg.buffers(), self.model.buffers(), strict=True):
                b_avg.copy_(b)

    def save(self, out: Path) -> Path:
        root = out / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:08d}"
        tmp = root / f".tmp-step-{self.step:08d}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for name, net in self.networks().items():
            write_safetensors(tmp / f"{name}.safetensors", net.state_dict())
        opt_tensors, opt_meta = flatten_optimizer(self.opt)
        write_safetensors(tmp / "optimizer.safetensors", opt_tensors)
        rng = {
            "batches": self.batch_gen.get_state(),
            "noise": self.noise_gen.get_state(),
            "torch": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        write_safetensors(tmp / "rng.safetensors", rng)
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "config": self.config,
            "optimizer": opt_meta,
            "history": self.history,
            "running_loss": [float(self.running), self.n_running],
            "elapsed_s": self.elapsed_seconds,
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (tmp / "state.json").write_text(
            json.dumps(jsonable(state), indent=1, allow_nan=False), encoding="utf-8"
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[: -self.config["keep_checkpoints"]]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, path: Path) -> None:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        for name, net in self.networks().items():
            tensors, _ = read_safetensors(path / f"{name}.safetensors")
            net.load_state_dict(tensors, strict=True)
        opt_tensors, _ = read_safetensors(path / "optimizer.safetensors")
        self.opt.load_state_dict(unflatten_optimizer(opt_tensors, state["optimizer"]))
        rng, _ = read_safetensors(path / "rng.safetensors")
        self.batch_gen.set_state(rng["batches"])
        self.noise_gen.set_state(rng["noise"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.step = int(state["step"])
        self.history = list(state["history"])
        total, count = state["running_loss"]
        self.running.fill_(float(total))
        self.n_running = int(count)
        self.earlier_seconds = float(state.get("elapsed_s", 0.0))  # checkpoints of older versions: 0

    @property
    def elapsed_seconds(self) -> float:
        """Wall time of the run so far, over all its sessions (up to the last checkpoint of earlier ones)."""
        return self.earlier_seconds + time.time() - self.session_started


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------------------------- train
def train(
    kind: str = "cm",
    data: Any = None,
    variable: str | Sequence[str] | None = None,
    out: str | os.PathLike[str] = "out",
    *,
    name: str | None = None,
    steps: int = 20000,
    batch_size: int = 32,
    channels: Sequence[int] = (16, 32, 32),
    net: Mapping[str, Any] | None = None,
    static_inputs: bool = False,
    lr: float = 2e-4,
    lr_schedule: str = "constant",
    seed: int = 0,
    val_time: Any = None,
    val_fraction: float = 0.1,
    loss: str | None = None,
    distance: str = "l2",
    ema_decay: float = 0.999,
    grad_clip: float | None = 1.0,
    checkpoint_every: int | None = 1000,
    keep_checkpoints: int = 2,
    log_every: int = 50,
    val_every: int | None = None,
    val_samples: int = 64,
    resume: bool = False,
    device: str | torch.device | None = None,
    units: str | Mapping[str, str] | None = None,
    eps: float = 1.0,
    nquantiles: int = NQUANTILES,
    version: str = "0.1.0",
    licence: str | None = None,
    description: str | None = None,
    dtype: torch.dtype | None = None,
    precision: str = "auto",
    crps_tolerance: float = 0.0,
    compile: str | None = None,
    progress: bool = True,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Train a consistency model (``kind="cm"``) or a score model (``kind="sde"``) on fine-grid fields.

    Parameters
    ----------
    kind
        ``"cm"`` or ``"sde"``.
    data
        A DataArray, a Dataset, or the path / glob pattern / list of paths of netCDF files (opened with
        :func:`xarray.open_mfdataset`) or zarr stores. Needs a time dimension and CF latitude /
        longitude; cells that are NaN at all times form the mask. For several variables on different
        grids: a list of DataArrays / Datasets, or files (grouped by the variables they hold).
    variable
        The variable to train on; may be left out for a DataArray or a single-variable dataset. A list
        of several (``["pr", "tas"]``) trains a joint consistency model: one network channel per
        variable, each with its own transform, noise level and reference quantiles, on the grid of the
        first variable (the others regridded onto it: conservatively from a finer grid, bilinearly from a
        coarser one) at the time steps they share, on the cells where all have data. Joint models train
        with ``loss="ect"``; their card validates the loss on held-out fields (no perfect-model score).
    out
        Output directory: ``NAME.safetensors`` + ``NAME.json`` (the model), ``checkpoints/``,
        ``config.json`` and ``history.json`` (training and validation losses).
    name
        Model name; default ``f"{kind}-{variable}-{ny}x{nx}"``.
    steps, batch_size, lr, seed
        Optimisation steps, fields per batch, RAdam learning rate, random seed (network initialisation,
        batches and noise).
    lr_schedule
        ``"constant"``, or ``"cosine"``: the learning rate decays from ``lr`` to
        ``LR_FLOOR * lr`` over ``steps`` on a half cosine (a function of the step alone, so resumed runs
        follow it exactly).
    channels
        UNet channels per resolution level.
    net
        Further ``UNet`` arguments (``num_res_blocks``, ``attention``, ``num_heads``, ``groups``,
        ``padding``, ``dropout``, ...); ``periodic`` is set from the grid.
    static_inputs
        Give the network fixed per-cell inputs beside the noisy field, so that it knows where it is: the
        training period's mean and standard deviation of each variable in the transformed space, and the
        mask (see :func:`static_fields`). Stored with the weights; the model then runs on its own grid only.
    val_time, val_fraction
        Held-out validation period: a time slice (``slice("1996-12", "1997-02")``, a pair or the string
        ``"1996-12/1997-02"``), or else the last ``val_fraction`` of the time steps (0: none).
    loss
        ``"ect"`` (default for ``cm``: easy consistency tuning, which starts as a denoiser), ``"ict"`` or
        ``"ct"``; ``"dsm"`` for ``sde``.
    distance
        Distance of the paper's CT loss (``"l2"``, ``"l1"`` or ``"lpips+l1"``).
    ema_decay
        Decay of the EMA of the weights that is shipped (with a warm-up ``(1 + k) / (10 + k)``).
    grad_clip
        Maximum gradient norm (None: no clipping).
    checkpoint_every, keep_checkpoints
        Write a checkpoint every N steps (and at the end); keep the last few.
    log_every, val_every, val_samples
        Training loss averaged and logged every N steps; validation loss on at most ``val_samples``
        held-out fields (fixed noise, so values are comparable) every ``val_every`` steps (default:
        ``checkpoint_every``) and at the end. A consistency model is also scored there as users will
        call it (:class:`~xdownscale.models.validation.PerfectModelValidation`: held-out fields
        coarse-grained 4x, downscaled back at ``scale="auto"`` with ``preserve=True``, ensemble CRPS
        against the truth, and the log-spectral distance of the members' mean power spectrum to the
        truth's); the EMA weights of the step chosen by ``crps_tolerance`` are the model's.
    crps_tolerance
        Which validated step is shipped: among those whose CRPS is within this fraction of the lowest,
        the one with the most realistic spectrum (:func:`choose_step`); 0 (default): the lowest CRPS.
        On E-OBS Iberia (4000 steps, channels 32, 64, 64) 0.02 chose the last step over the lowest
        CRPS's (step 2000): on the validation winter its log-spectral distance was 0.45 against 0.66 for
        a CRPS 1.9% higher, but on the test winters the two spectra were alike (0.44 and 0.46) and its
        ensemble was over-dispersed (spread/skill 1.27 against 1.02): one validation winter is few days
        to choose by the spectrum. The shipped model (channels 48, 96, 96) was chosen with 0.02; see
        docs/user-guide/training.md for what it gave. Not part of the run's identity: resuming a
        finished run with another value chooses again among the steps whose weights were kept (all
        steps with a checkpoint left, and the candidates of the value the run was trained with).
    resume
        Continue from the last checkpoint in ``out`` (the configuration must be the same).
    device
        ``"cpu"``, ``"cuda"``, ...; default CUDA when available (with bf16 autocast).
    units
        Override for a missing or wrong ``units`` attribute of the data (for several variables a dict
        ``{name: units}``).
    eps
        Offset of the log transform ``log(x + eps) - log(eps)`` for precipitation, in the model's
        units (mm/day). Hess et al. use 1e-4 on ERA5 precipitation, stored in metres: 0.1 mm/day.
        Smaller values make dry/wet edges and drizzle dominate the transformed fields, the loss and the
        spectra; 1 mm/day (the default) gives wet days more of the network: on E-OBS Iberia its
        validation CRPS was 16-19% lower than with 0.1 at every validation step from 500 to 2000
        (same recipe, 2000 steps, scored without ``preserve``).
    nquantiles
        Number of per-cell reference quantiles stored for quantile delta mapping.
    version, licence, description
        Stored in the card; ``licence`` defaults to the data's ``license``/``licence`` attribute.
    dtype
        Storage dtype of the shipped weights (e.g. ``torch.float16``); loading gives float32.
    precision
        ``"auto"`` (bfloat16 autocast on CUDA and on CPUs with native bf16, AVX512-BF16 or AMX, where a
        training step of the shipped Iberia network takes 0.30 s instead of 0.50 s; float32 elsewhere,
        as emulated bf16 is slower), ``"fp32"`` or ``"bf16"``. The weights and the optimiser stay float32;
        a run resumes in the precision it started with.
    compile
        ``torch.compile`` of the network for the run's steps: ``"auto"`` (on CUDA, for runs with at least
        :data:`COMPILE_MIN_STEPS` steps left: compiling the forward and backward passes takes about a
        minute), ``"always"`` or ``"never"``; default: the ``XDOWNSCALE_COMPILE`` environment variable,
        else ``"auto"``. The weights, checkpoints and resume are the same either way; a compiled step
        agrees with an eager one to float rounding.
    progress
        Show a progress bar with the loss.
    callback
        Called after every step with ``{"step", "loss"}`` (e.g. to stop early by raising).

    Returns
    -------
    Path
        The written ``out/NAME.safetensors``.

    Raises
    ------
    InputError
        Unknown kind or loss, variable not in the data, no time dimension, too few time steps, or
        ``out`` holding another run (with ``resume=True``: a different configuration).
    UnitError
        The units are missing or unknown (pass ``units=``).
    """
    started = time.time()
    loss = _checked_arguments(
        kind, data, loss, lr_schedule, channels, steps, batch_size, log_every, keep_checkpoints, nquantiles
    )
    if not (isinstance(crps_tolerance, (int, float)) and 0.0 <= crps_tolerance < 1.0):
        raise InputError(
            f"crps_tolerance={crps_tolerance!r}: expected a fraction in [0, 1), e.g. 0.02 (2%); 0 ships "
            "the weights of the lowest validation CRPS."
        )
    check_precision(precision)
    compile_policy(compile)  # an unknown policy fails before anything is read or written
    out = Path(out)
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )

    # ---- data, normalisation, target spectra, reference quantiles (training period only), per variable
    ts = _training_set(data, variable, units, val_time, val_fraction, eps, nquantiles, kind, loss)
    joint = len(ts.fields) > 1
    arch = {
        "in_channels": len(ts.fields),
        "out_channels": len(ts.fields),
        "channels": [int(c) for c in channels],
        **dict(net or {}),
        "periodic": bool(ts.grid.periodic),
        **({"noise_channels": len(ts.fields)} if joint else {}),
    }
    static = static_fields(ts.train_phys, ts.transforms, ts.mask) if static_inputs else None
    if static is not None:
        arch |= {"static_channels": static.shape[0], "static_shape": list(static.shape[1:])}
    config: dict[str, Any] = {
        "kind": kind,
        "variable": ts.variable,
        "units": [f.attrs.get("units") for f in ts.fields] if joint else ts.fields[0].attrs.get("units"),
        "steps": int(steps),
        "batch_size": int(batch_size),
        "architecture": arch,
        "lr": float(lr),
        "lr_schedule": lr_schedule,
        "seed": int(seed),
        "loss": loss,
        "distance": distance if loss == "ct" else None,
        "ema_decay": float(ema_decay),
        "grad_clip": None if grad_clip is None else float(grad_clip),
        "val_time": None if val_time is None else str(val_time),
        "val_fraction": float(val_fraction),
        "n_train": int(ts.train_phys.shape[0]),
        "n_val": 0 if ts.val_phys is None else int(ts.val_phys.shape[0]),
        "grid_shape": list(ts.grid.shape(ts.fields[0])),
        "eps": float(eps),
        "data_sha256": ts.digest,
        "checkpoint_every": checkpoint_every,
        "keep_checkpoints": int(keep_checkpoints),
        "precision": resolve_precision(dev, precision),
    }

    # ---- run state: a new run, or the last checkpoint of the same one
    sigma = _sigma(kind)
    # bad `net` arguments fail here, before anything is written
    trainer = _Trainer(config, sigma, dev, static)
    trainer.session_started = started  # the wall time includes reading the data
    config["architecture"] = jsonable(trainer.backbone.config)
    _start_or_resume(trainer, out, config, resume)
    if compiles_training(compile, dev, steps - trainer.step):
        trainer.backbone.compile(dynamic=False)  # the module's own call; its weights and state unchanged

    # ---- tensors on the device (masked / missing cells: 0 and excluded from the loss)
    x_train, m_train = _device_tensors(ts.train_phys, ts, dev)
    val = _device_tensors(ts.val_phys, ts, dev, limit=val_samples) if ts.val_phys is not None else None
    perfect_model = _perfect_model(ts, seed) if kind == "cm" else None
    validated = out / "validated"

    def _validate(record: dict[str, Any]) -> None:
        """The loss on held-out fields, and the perfect-model scores of the EMA weights (the ones
        shipped); the EMA weights of the steps that can still be chosen are kept in ``validated/``."""
        if val is not None:
            record["val_loss"] = trainer.validation_loss(*val)
        if perfect_model is None:
            return
        scores = perfect_model.score(trainer.ema)
        record.update({f"val_{key}": value for key, value in scores.items() if key != "bilinear_mae"})
        best = min((h["val_crps"] for h in trainer.history if "val_crps" in h), default=float("inf"))
        if scores["crps"] < best:
            record["best"] = True
        step = trainer.step  # the record gets its step once it joins the history
        keep = candidate_steps([*trainer.history, {**record, "step": step}], crps_tolerance)
        if step in keep:
            validated.mkdir(parents=True, exist_ok=True)
            write_safetensors(validated / f"step-{step:08d}.safetensors", trainer.ema.state_dict())
        for stale in validated.glob("step-*.safetensors"):
            if int(stale.stem.removeprefix("step-")) not in keep:
                stale.unlink()

    trainer.run(
        x_train,
        m_train,
        out,
        validate=_validate,
        log_every=log_every,
        val_every=val_every or checkpoint_every or max(1, steps // 10),
        progress=progress,
        callback=callback,
    )
    (out / "history.json").write_text(json.dumps(jsonable(trainer.history), indent=1), encoding="utf-8")

    # ---- the model: the EMA weights of the chosen validation step (else the last ones) + card
    validation: dict[str, Any] | None = None
    if perfect_model is not None:
        available = {
            step: path
            for step in candidate_steps(trainer.history, crps_tolerance)
            if (path := _validated_weights(out, step)) is not None
        }
        chosen = choose_step(trainer.history, crps_tolerance, available=set(available))
        if chosen is not None:
            tensors, _ = read_safetensors(available[chosen])
            trainer.ema.load_state_dict(tensors, strict=True)
            validation = _validation_summary(perfect_model, trainer.history, ts, chosen, crps_tolerance)
    card = _card(
        ts,
        config,
        trainer.history,
        sigma=sigma,
        validation=validation,
        name=name,
        version=version,
        licence=licence,
        description=description,
        device=dev,
        seconds=trainer.elapsed_seconds,
    )
    ref_values = [r.transpose("quantiles", ts.grid.ydim, ts.grid.xdim).values for r in ts.refs]
    return save_model(
        out,
        trainer.ema.eval(),
        card,
        mask=ts.mask,
        reference_quantiles=ref_values[0],
        dtype=dtype,
        variable_quantiles=dict(zip(ts.names, ref_values, strict=True)) if joint else None,
    )


def static_fields(phys: np.ndarray, transforms: Sequence[Any], mask: np.ndarray) -> np.ndarray:
    """The fixed per-cell inputs of a network trained with ``static_inputs=True``.

    Parameters
    ----------
    phys
        Training fields in physical units, shape (time, variable, y, x); NaN = missing.
    transforms
        Each variable's fitted transform (its ``forward`` maps physical units to the model space).
    mask
        Bool (y, x): the model's valid cells.

    Returns
    -------
    numpy.ndarray
        Shape (2 * variables + 1, y, x), float32: per variable the time mean and the standard deviation
        of the transformed fields, then the mask as 1 / 0; 0 outside the mask.
    """
    maps = []
    for c, tr in enumerate(transforms):
        y = np.asarray(tr.forward(phys[:, c]), dtype=np.float64)
        valid = np.isfinite(y)
        count = np.maximum(valid.sum(axis=0), 1)
        mean = np.where(valid, y, 0.0).sum(axis=0) / count
        var = np.where(valid, (y - mean) ** 2, 0.0).sum(axis=0) / count
        maps += [mean, np.sqrt(var)]
    out = np.stack([*maps, np.ones(mask.shape)]).astype(np.float32)
    out[:, ~np.asarray(mask, dtype=bool)] = 0.0
    return out


def _checked_arguments(
    kind: str,
    data: Any,
    loss: str | None,
    lr_schedule: str,
    channels: Sequence[int],
    *integers: int,
) -> str:
    """The loss to train with, after checking the arguments that need no data."""
    if kind not in KINDS:
        raise InputError(f"Unknown model kind {kind!r}; expected one of {', '.join(map(repr, KINDS))}.")
    loss = loss or LOSSES[kind][0]
    if loss not in LOSSES[kind]:
        raise InputError(
            f"loss={loss!r} does not train kind {kind!r}; use one of {', '.join(map(repr, LOSSES[kind]))}."
        )
    if lr_schedule not in LR_SCHEDULES:
        raise InputError(
            f"lr_schedule={lr_schedule!r}: expected one of {', '.join(map(repr, LR_SCHEDULES))}."
        )
    labels = ("steps", "batch_size", "log_every", "keep_checkpoints", "nquantiles")
    for label, number in zip(labels, integers, strict=True):
        if not isinstance(number, (int, np.integer)) or isinstance(number, bool) or number < 1:
            raise InputError(f"{label} must be an integer >= 1; got {number!r}.")
    if not channels or min(int(c) for c in channels) < 1:
        raise InputError(f"channels must be positive integers, e.g. (16, 32, 32); got {tuple(channels)!r}.")
    if data is None:
        raise InputError("No training data given: pass data= (a DataArray or netCDF / zarr paths).")
    return loss


def _sigma(kind: str) -> dict[str, float]:
    """The noise range of a model kind, stored in its card."""
    from ..core import consistency, sde

    if kind == "cm":
        return {"min": consistency.SIGMA_MIN, "max": consistency.SIGMA_MAX, "data": consistency.SIGMA_DATA}
    return {"min": sde.SDE_SIGMA_MIN, "max": sde.SDE_SIGMA_MAX, "data": consistency.SIGMA_DATA}


def _start_or_resume(trainer: _Trainer, out: Path, config: dict[str, Any], resume: bool) -> None:
    """Load the last checkpoint of the run in ``out`` (``resume``, same configuration), or start one;
    writes ``out/config.json``."""
    latest = latest_checkpoint(out)
    if latest is not None:
        old = json.loads((latest / "state.json").read_text(encoding="utf-8"))["config"]
        if not resume:
            raise InputError(
                f"{out} already holds a training run (checkpoint {latest.name}). Pass resume=True "
                "(--resume) to continue it, or choose another out directory."
            )
        diff = _config_diff(old, config)
        if diff:
            raise InputError(
                f"Cannot resume: {out} holds a training run with a different configuration ("
                + "; ".join(diff)
                + "). Pass the same arguments and data to continue it, or choose another out "
                "directory to start a new run."
            )
        trainer.load(latest)
    elif resume and (out / "config.json").is_file():
        diff = _config_diff(json.loads((out / "config.json").read_text(encoding="utf-8")), config)
        if diff:
            raise InputError(
                f"Cannot resume: {out} was started with a different configuration ("
                + "; ".join(diff)
                + "). Pass the same arguments, or choose another out directory."
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(
        json.dumps(jsonable(config), indent=1, allow_nan=False), encoding="utf-8"
    )


def _device_tensors(
    phys: np.ndarray, ts: _TrainingSet, device: torch.device, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fields (time, variable, y, x) in the model space on ``device`` (invalid cells 0) and their validity
    mask; with ``limit``, at most that many fields, evenly spaced over the period."""
    y = np.stack(
        [np.asarray(tr.forward(phys[:, c]), dtype=np.float32) for c, tr in enumerate(ts.transforms)], axis=1
    )
    if limit is not None and y.shape[0] > limit:
        y = y[np.linspace(0, y.shape[0] - 1, limit).round().astype(np.int64)]
    valid = np.isfinite(y) & ts.mask
    y = np.where(valid, y, 0.0).astype(np.float32)
    return torch.from_numpy(y).to(device), torch.from_numpy(valid).to(device)


def _perfect_model(ts: _TrainingSet, seed: int) -> Any:
    """The perfect-model validation of a consistency model on the held-out fields (None without them)."""
    if ts.val is None or ts.val_phys is None:
        return None
    from ..core.rng import sample_key
    from .validation import JointPerfectModelValidation, PerfectModelValidation

    parts = [
        PerfectModelValidation(
            v.copy(data=ts.val_phys[:, c]),
            ts.transforms[c],
            ts.targets[c],
            ts.mask,
            seed=sample_key(seed, "perfect-model") % 2**31,
        )
        for c, v in enumerate(ts.val)
    ]
    return parts[0] if len(parts) == 1 else JointPerfectModelValidation(parts, ts.names)


def _spectral(record: Mapping[str, Any]) -> float:
    """A validation record's spectral distance; +inf where it was not measured."""
    value = record.get("val_spectral_distance")
    return float(value) if value is not None and np.isfinite(value) else float("inf")


def _pareto(records: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The records no other beats on both CRPS and spectral distance (ties: the earlier step)."""
    ordered = sorted(records, key=lambda h: (h["val_crps"], _spectral(h), h["step"]))
    front: list[Mapping[str, Any]] = []
    lowest = float("inf")
    for h in ordered:
        if _spectral(h) < lowest or not front:
            front.append(h)
            lowest = min(lowest, _spectral(h))
    return front


def candidate_steps(history: Sequence[Mapping[str, Any]], crps_tolerance: float) -> set[int]:
    """The validation steps that :func:`choose_step` may still pick, now or after later validations.

    A step drops out for good once its CRPS exceeds the lowest so far by more than ``crps_tolerance``
    (the lowest can only fall), or when another step within the tolerance has a CRPS and a spectral
    distance no larger. What is left is the Pareto front of (CRPS, spectral distance) within the band:
    a few steps, whose EMA weights training keeps.
    """
    scored = [h for h in history if "val_crps" in h and np.isfinite(h["val_crps"])]
    if not scored:
        return set()
    best = min(h["val_crps"] for h in scored)
    band = [h for h in scored if h["val_crps"] <= best * (1.0 + crps_tolerance)]
    return {int(h["step"]) for h in _pareto(band)}


def choose_step(
    history: Sequence[Mapping[str, Any]], crps_tolerance: float, *, available: set[int] | None = None
) -> int | None:
    """The validation step whose EMA weights a training run ships.

    Among the steps whose perfect-model CRPS is within ``crps_tolerance`` (a fraction) of the lowest,
    the one with the most realistic spectrum (lowest ``val_spectral_distance``; ties and records
    without it: the lower CRPS). ``crps_tolerance=0`` is the lowest CRPS. Steps not in ``available``
    (their weights are gone) are not chosen; None when no step can be.
    """
    steps = candidate_steps(history, crps_tolerance)
    if available is not None:
        steps &= available
    records = [h for h in history if "val_crps" in h and int(h["step"]) in steps]
    if not records:
        return None
    return int(min(records, key=lambda h: (_spectral(h), h["val_crps"], h["step"]))["step"])


def _validated_weights(out: Path, step: int) -> Path | None:
    """The EMA weights of validation step ``step``: kept in ``validated/``, else in a checkpoint."""
    for path in (
        out / "validated" / f"step-{step:08d}.safetensors",
        out / "checkpoints" / f"step-{step:08d}" / "ema.safetensors",
    ):
        if path.is_file():
            return path
    return None


def _validation_summary(
    perfect_model: Any,
    history: list[dict[str, Any]],
    ts: _TrainingSet,
    step: int,
    crps_tolerance: float,
) -> dict[str, Any]:
    """The card's record of the perfect-model validation: the chosen step, the rule and the curve."""
    scored = [h for h in history if "val_crps" in h]
    chosen = next(h for h in scored if h["step"] == step)
    lowest = min(scored, key=lambda h: h["val_crps"])
    joint = len(ts.fields) > 1
    validation = {
        "metric": perfect_model.metric + ("" if joint else f" in {ts.fields[0].attrs.get('units')}"),
        "rule": (
            f"the lowest spectral distance among the validations whose CRPS is within "
            f"{crps_tolerance:.1%} of the lowest ({lowest['val_crps']:.4g} at step {lowest['step']})"
            if crps_tolerance > 0
            else "the lowest CRPS"
        ),
        "crps_tolerance": float(crps_tolerance),
        "lowest_crps_step": int(lowest["step"]),
        "step": int(chosen["step"]),
        "crps": chosen["val_crps"],
        "bilinear_mae": perfect_model.bilinear_mae,
        "mae_ensemble_mean": chosen["val_mae_mean"],
        "spread_skill": chosen["val_spread_skill"],
        "mean_ratio": chosen["val_mean_ratio"],
        "spectral_distance": chosen.get("val_spectral_distance"),
        "psd_factor": chosen.get("val_psd_factor"),
        "beats_bilinear": bool(chosen["val_crps"] < perfect_model.bilinear_mae),
        # step, CRPS, spread/skill, mean ratio, spectral distance of every validation
        "curve": [
            [
                int(h["step"]),
                h["val_crps"],
                h["val_spread_skill"],
                h["val_mean_ratio"],
                h.get("val_spectral_distance"),
            ]
            for h in scored
        ],
    }
    if joint:
        validation["per_variable"] = perfect_model.per_variable(chosen)
    return validation


def _card(
    ts: _TrainingSet,
    config: dict[str, Any],
    history: list[dict[str, Any]],
    *,
    sigma: dict[str, float],
    validation: dict[str, Any] | None,
    name: str | None,
    version: str,
    licence: str | None,
    description: str | None,
    device: torch.device,
    seconds: float,
) -> dict[str, Any]:
    """The model card of a finished run (without the sha256, which :func:`save_model` adds)."""
    from .._version import __version__

    losses = [h["loss"] for h in history if "loss" in h]
    vals = [h["val_loss"] for h in history if "val_loss" in h]
    train_da, val_da = ts.train[0], ts.val[0] if ts.val else None
    times = train_da[train_da.dims[0]].values
    val_times = val_da[val_da.dims[0]].values if val_da is not None else None
    ny, nx = config["grid_shape"]
    variable_entries, psd_entries, quantile_entries = _variable_sections(ts)
    card: dict[str, Any] = {
        "format": CARD_FORMAT,
        "name": name or f"{config['kind']}-{ts.variable}-{ny}x{nx}",
        "version": str(version),
        "kind": config["kind"],
        "architecture": {"class": "UNet", "config": config["architecture"]},
        "variable": variable_entries[0],
        "frequency": frequency(times),
        "grid": grid_card(ts.fields[0], ts.grid),
        "sigma": sigma,
        "training": {
            "data": description or ts.source,
            "period": [iso_date(times[0]), iso_date(times[-1])],
            "validation_period": None
            if val_times is None
            else [iso_date(val_times[0]), iso_date(val_times[-1])],
            "n_train": config["n_train"],
            "n_val": config["n_val"],
            "licence": licence
            or str(
                ts.raw.attrs.get("license")
                or ts.raw.attrs.get("licence")
                or "unknown: see the terms of use of the training data"
            ),
            **{key: config[key] for key in ("steps", "batch_size")},
            "optimizer": "RAdam",
            **{
                key: config[key]
                for key in ("lr", "lr_schedule", "loss", "distance", "ema_decay", "grad_clip")
            },
            "seed": config["seed"],
            "final_loss": losses[-1] if losses else None,
            "final_val_loss": vals[-1] if vals else None,
            "validation": validation,
            "device": str(device),
            "precision": "bf16 autocast" if config["precision"] == "bf16" else "fp32",
            "wall_time_s": round(seconds, 1),
            "data_sha256": config["data_sha256"],
            "xdownscale_version": __version__,
            "torch_version": torch.__version__,
        },
        "target_psd": psd_entries[0],
        "reference_quantiles": quantile_entries[0],
        "metrics": {},
    }
    if len(ts.fields) > 1:
        card["variables"] = [
            {**v, "target_psd": p, "reference_quantiles": q}
            for v, p, q in zip(variable_entries, psd_entries, quantile_entries, strict=True)
        ]
    return card


@dataclass
class _TrainingSet:
    """The fields to train on, split, as arrays, with what is fitted on them (one entry per variable)."""

    fields: list[xr.DataArray]
    quantities: list[str]
    grid: Any
    source: str
    raw: xr.DataArray
    names: list[str]
    variable: str
    train: list[xr.DataArray]
    val: list[xr.DataArray] | None
    train_phys: np.ndarray  # (time, variable, y, x)
    val_phys: np.ndarray | None
    mask: np.ndarray
    digest: str
    transforms: list[Any]
    targets: list[xr.DataArray]
    refs: list[xr.DataArray]


def _training_set(
    data: Any,
    variable: Any,
    units: Any,
    val_time: Any,
    val_fraction: float,
    eps: float,
    nquantiles: int,
    kind: str,
    loss: str,
) -> _TrainingSet:
    """Read, split and stack the training fields; fit each variable's transform, target spectrum and
    reference quantiles on the training period."""
    from ..transforms import LogNormalize
    from ..xr.qdm import reference_quantiles
    from ..xr.spectra import psd

    fields, quantities, grid, source, raw = training_fields(data, variable, units)
    if len(fields) > 1 and (kind != "cm" or loss != "ect"):
        raise InputError(
            f"A joint model of several variables is a consistency model trained with loss='ect'; got "
            f"kind={kind!r}, loss={loss!r}."
        )
    names = [str(f.name) for f in fields]
    variable = "+".join(names)
    splits = [split_validation(f, val_time, val_fraction) for f in fields]
    train_phys = np.ascontiguousarray(np.stack([t.values for t, _ in splits], axis=1), dtype=np.float32)
    has_val = splits[0][1] is not None
    val_phys = (
        np.ascontiguousarray(np.stack([cast(Any, v).values for _, v in splits], axis=1), dtype=np.float32)
        if has_val
        else None
    )
    allnan = np.isnan(train_phys).all(axis=0)
    if val_phys is not None:
        allnan &= np.isnan(val_phys).all(axis=0)
    mask = np.asarray(~allnan.any(axis=0), dtype=bool)  # cells where every variable has data
    if not mask.any():
        raise InputError(f"'{variable}' is NaN everywhere at all times; nothing to train on.")
    digest = hashlib.sha256(train_phys.tobytes())
    if val_phys is not None:
        digest.update(val_phys.tobytes())
    train = [t.copy(data=train_phys[:, c]) for c, (t, _) in enumerate(splits)]
    transforms = [
        LogNormalize(eps=eps, log=q == "precipitation").fit(t) for t, q in zip(train, quantities, strict=True)
    ]
    return _TrainingSet(
        fields=fields,
        quantities=quantities,
        grid=grid,
        source=source,
        raw=raw,
        names=names,
        variable=variable,
        train=train,
        val=[cast(xr.DataArray, v) for _, v in splits] if has_val else None,
        train_phys=train_phys,
        val_phys=val_phys,
        mask=mask,
        digest=digest.hexdigest(),
        transforms=transforms,
        targets=[psd(tr.forward(t)).mean(str(t.dims[0])) for tr, t in zip(transforms, train, strict=True)],
        refs=[reference_quantiles(t, nquantiles=nquantiles) for t in train],
    )


def _variable_sections(ts: _TrainingSet) -> tuple[list[dict], list[dict], list[dict]]:
    """The card's description, target spectrum and reference-quantile entry of each variable."""
    variable_entries = [
        {
            "name": str(f.name),
            "units": f.attrs.get("units"),
            # precipitation is stored as a rate whatever the source (an amount, a flux) called it
            "standard_name": STANDARD_NAMES["precipitation"]
            if q == "precipitation"
            else f.attrs.get("standard_name", STANDARD_NAMES.get(q)),
            "long_name": f.attrs.get("long_name", f.attrs.get("description")),
            "kind": q,
            "transform": tr.to_dict(),
        }
        for f, q, tr in zip(ts.fields, ts.quantities, ts.transforms, strict=True)
    ]
    psd_entries = [
        {
            "name": str(t.name),
            "wavenumber": t["wavenumber"].values,
            "psd": t.values,
            "wavelength_km": t["wavelength_km"].values,
            "n_cells": int(t.attrs["n_cells"]),
            "spacing_km": t.attrs.get("spacing_km"),
            "space": "transformed",
            "attrs": {k: v for k, v in t.attrs.items() if k not in ("n_cells", "spacing_km")},
        }
        for t in ts.targets
    ]
    quantile_entries = [
        {"key": "aux.reference_quantiles", "quantiles": r["quantiles"].values, "units": f.attrs.get("units")}
        for r, f in zip(ts.refs, ts.fields, strict=True)
    ]
    return variable_entries, psd_entries, quantile_entries
