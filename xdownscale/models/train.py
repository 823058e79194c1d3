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
of the weights, which is what is shipped. Optimiser: RAdam, gradient clipping, bf16 autocast on CUDA.

Checkpoints (``out/checkpoints/step-NNNNNNNN/``) hold the weights, EMA, teacher and optimiser state as
safetensors and the step, configuration, history and random-generator states; resuming from one
continues exactly as if training had not been interrupted (bitwise on the CPU).
"""

from __future__ import annotations

import copy
import glob
import hashlib
import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import xarray as xr

from ..errors import InputError
from .card import CARD_FORMAT, KINDS, jsonable
from .io import read_safetensors, save_model, write_safetensors
from .model import build_network

__all__ = ["LOSSES", "train"]

#: losses per model kind; the first is the default
LOSSES = {"cm": ("ect", "ict", "ct"), "sde": ("dsm",)}
CANONICAL_UNITS = {"precipitation": "mm/day", "temperature": "K"}
STANDARD_NAMES = {"precipitation": "lwe_precipitation_rate", "temperature": "air_temperature"}
CHECKPOINT_FORMAT = "xdownscale-checkpoint/1"
NQUANTILES = 500

# configuration entries that must agree to resume a run
_IDENTITY = (
    "kind",
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


# ---------------------------------------------------------------------------------------------- data
def _expand_paths(data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    paths: list[Path] = []
    for item in items:
        text = os.fspath(item)
        if any(c in text for c in "*?["):
            matches = sorted(glob.glob(text))
            if not matches:
                raise InputError(f"The pattern '{text}' matches no file.")
            paths += [Path(m) for m in matches]
        else:
            path = Path(text).expanduser()
            if not path.exists():
                raise InputError(f"Training data file '{text}' does not exist.")
            paths.append(path)
    if not paths:
        raise InputError("No training data given: pass a DataArray, a Dataset, or netCDF / zarr paths.")
    return paths


def _is_zarr(path: Path) -> bool:
    return path.suffix == ".zarr" or (
        path.is_dir() and any((path / f).exists() for f in (".zgroup", "zarr.json"))
    )


def _open_files(paths: list[Path]) -> xr.Dataset:
    zarr = [_is_zarr(p) for p in paths]
    if all(zarr):
        parts = [xr.open_zarr(p) for p in paths]
        if len(parts) == 1:
            return parts[0]
        return cast(xr.Dataset, xr.combine_by_coords(parts, combine_attrs="drop_conflicts"))
    if any(zarr):
        raise InputError("Pass either netCDF files or zarr stores as training data, not a mix of both.")
    try:
        return xr.open_mfdataset([str(p) for p in paths], combine="by_coords", combine_attrs="drop_conflicts")
    except ValueError as err:
        raise InputError(f"Cannot combine the training files {[p.name for p in paths]}: {err}") from err


def _select_variable(data: Any, variable: str | None) -> tuple[xr.DataArray, str]:
    """The DataArray to train on and a short description of where it came from."""
    if isinstance(data, xr.DataArray):
        name = variable or (str(data.name) if data.name is not None else None)
        if name is None:
            raise InputError("The training DataArray has no name; pass variable='pr' (or its name).")
        return data.rename(name), f"DataArray '{name}'"
    if isinstance(data, xr.Dataset):
        ds, source = data, "Dataset"
    else:
        paths = _expand_paths(data)
        ds, source = _open_files(paths), ", ".join(p.name for p in paths)
    names = [str(v) for v in ds.data_vars]
    if variable is None:
        if len(names) != 1:
            raise InputError(
                f"The training data hold the variables {names}; pass variable= with the one to train on."
            )
        variable = names[0]
    if variable not in ds.data_vars:
        raise InputError(
            f"Variable '{variable}' is not in the training data ({source}); its variables are "
            f"{', '.join(map(repr, names)) or 'none'}. Pass variable= with one of them."
        )
    return ds[variable], source


def _prepare(da: xr.DataArray, units: str | None) -> tuple[xr.DataArray, str, Any]:
    """(time, y, x) layout in canonical units; returns (da, quantity kind, grid)."""
    from ..xr.cf import find_grid, find_time, require_float, standard_layout
    from ..xr.units import convert_units, quantity_kind

    time = find_time(da, required=True)
    grid = find_grid(da)
    extra = [d for d in da.dims if d not in (time, grid.ydim, grid.xdim)]
    for d in extra:
        if da.sizes[d] != 1:
            raise InputError(
                f"'{da.name}' has the dimension '{d}' of size {da.sizes[d]} besides time, "
                f"'{grid.ydim}' and '{grid.xdim}'; select one, e.g. da.isel({d}=0)."
            )
    da = da.isel({d: 0 for d in extra}, drop=True) if extra else da
    da = require_float(da)
    da = standard_layout(da, grid).transpose(time, grid.ydim, grid.xdim)
    if not da.indexes[time].is_monotonic_increasing:
        da = da.sortby(time)
    kind = quantity_kind(da, units)
    if kind in CANONICAL_UNITS:
        da = convert_units(da, CANONICAL_UNITS[kind], units=units)
    elif units is not None:
        da = da.assign_attrs(units=units)
    return da, kind, find_grid(da)


def _parse_period(value: Any) -> slice:
    if isinstance(value, slice):
        return value
    if isinstance(value, str):
        if "/" not in value:
            return slice(value, value)
        start, stop = value.split("/", 1)
        return slice(start.strip() or None, stop.strip() or None)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return slice(*value)
    raise InputError(
        f"val_time={value!r} is not a time period; pass slice('1996-12', '1997-02'), "
        "('1996-12', '1997-02') or the string '1996-12/1997-02'."
    )


def _iso(value: Any) -> str:
    if isinstance(value, np.datetime64):
        return str(np.datetime_as_string(value, unit="D"))
    if hasattr(value, "isoformat"):
        return str(value.isoformat())[:10]
    return str(value)


def _frequency(times: np.ndarray) -> str | None:
    """ "1D" for daily data, "6h" for 6-hourly ... (median time step), None if it cannot be told."""
    if len(times) < 2:
        return None
    try:
        steps = np.diff(xr.DataArray(times, dims="t").astype("datetime64[s]").values).astype(np.int64)
    except (TypeError, ValueError):
        try:
            steps = np.array([(b - a).total_seconds() for a, b in itertools.pairwise(times)])
        except (TypeError, AttributeError):
            return None
    seconds = float(np.median(steps))
    if seconds > 0 and seconds % 86400 == 0:
        return f"{int(seconds // 86400)}D"
    if seconds > 0 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    return None


def _split(da: xr.DataArray, val_time: Any, val_fraction: float) -> tuple[xr.DataArray, xr.DataArray | None]:
    time = da.dims[0]
    n = da.sizes[time]
    val_da: xr.DataArray | None
    if val_time is not None:
        period = _parse_period(val_time)
        try:
            selected = da[time].sel({time: period}).values
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(
                f"val_time={val_time!r} cannot select times of the training data: {err}"
            ) from err
        chosen = np.isin(da[time].values, selected)
        if not chosen.any():
            raise InputError(
                f"val_time={val_time!r} selects no time step; the data span "
                f"{_iso(da[time].values[0])} to {_iso(da[time].values[-1])}."
            )
        train_da, val_da = da.isel({time: np.flatnonzero(~chosen)}), da.isel({time: np.flatnonzero(chosen)})
    else:
        if not (0.0 <= float(val_fraction) < 1.0):
            raise InputError(f"val_fraction must be in [0, 1); got {val_fraction!r}.")
        n_val = math.ceil(n * float(val_fraction)) if val_fraction > 0 else 0
        train_da = da.isel({time: slice(0, n - n_val)})
        val_da = da.isel({time: slice(n - n_val, n)}) if n_val else None
    if train_da.sizes[time] < 2:
        raise InputError(
            f"Too few time steps to train: {n} in the data, {train_da.sizes[time]} left for training after "
            "the validation split. Pass more data, a smaller val_fraction or another val_time."
        )
    return train_da, val_da


def _grid_card(da: xr.DataArray, grid: Any) -> dict[str, Any]:
    from ..xr.cf import grid_spacing_km

    defaults = {
        grid.lat: {"standard_name": "latitude", "units": "degrees_north"},
        grid.lon: {"standard_name": "longitude", "units": "degrees_east"},
    }
    names = [grid.lat, grid.lon] + [
        d for d in (grid.ydim, grid.xdim) if d in da.coords and d not in (grid.lat, grid.lon)
    ]
    coords = {}
    for name in names:
        c = da[name]
        attrs = {
            **defaults.get(name, {}),
            **{k: v for k, v in c.attrs.items() if isinstance(v, (str, int, float))},
        }
        coords[name] = {
            "dims": [str(d) for d in c.dims],
            "values": np.asarray(c.values, dtype=np.float64),
            "attrs": attrs,
        }
    return {
        "dims": [grid.ydim, grid.xdim],
        "shape": [int(da.sizes[grid.ydim]), int(da.sizes[grid.xdim])],
        "lat": grid.lat,
        "lon": grid.lon,
        "coords": coords,
        "periodic": bool(grid.periodic),
        "curvilinear": bool(grid.curvilinear),
        "spacing_km": list(grid_spacing_km(da, grid)),
    }


# ---------------------------------------------------------------------------------------------- state
def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _latest_checkpoint(out: Path) -> Path | None:
    root = out / "checkpoints"
    done = (
        sorted(p for p in root.glob("step-*") if p.is_dir() and (p / "state.json").is_file())
        if root.is_dir()
        else []
    )
    return done[-1] if done else None


def _config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [
        f"{key}={old.get(key)!r} there, {new.get(key)!r} here"
        for key in _IDENTITY
        if jsonable(old.get(key)) != jsonable(new.get(key))
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


class _Trainer:
    """The mutable state of a run (networks, optimiser, generators) and how to save / restore it."""

    def __init__(self, config: dict[str, Any], sigma: dict[str, Any], device: torch.device) -> None:
        self.config = config
        self.device = device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config["seed"])
            self.model = build_network(config["kind"], config["architecture"], sigma).to(device)
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
        opt_tensors, opt_meta = _flatten_optimizer(self.opt)
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
        self.opt.load_state_dict(_unflatten_optimizer(opt_tensors, state["optimizer"]))
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
    variable: str | None = None,
    out: str | os.PathLike[str] = "out",
    *,
    name: str | None = None,
    steps: int = 20000,
    batch_size: int = 32,
    channels: Sequence[int] = (16, 32, 32),
    net: Mapping[str, Any] | None = None,
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
    units: str | None = None,
    eps: float = 0.1,
    nquantiles: int = NQUANTILES,
    version: str = "0.1.0",
    licence: str | None = None,
    description: str | None = None,
    dtype: torch.dtype | None = None,
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
        longitude; cells that are NaN at all times form the mask.
    variable
        The variable to train on; may be left out for a DataArray or a single-variable dataset.
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
        ``checkpoint_every``) and at the end.
    resume
        Continue from the last checkpoint in ``out`` (the configuration must be the same).
    device
        ``"cpu"``, ``"cuda"``, ...; default CUDA when available (with bf16 autocast).
    units
        Override for a missing or wrong ``units`` attribute of the data.
    eps
        Offset of the log transform ``log(x + eps) - log(eps)`` for precipitation, in the model's
        units (mm/day). Hess et al. use 1e-4 on ERA5 precipitation, stored in metres: 0.1 mm/day.
        Much smaller values make dry/wet edges dominate the transformed fields and their spectra.
    nquantiles
        Number of per-cell reference quantiles stored for quantile delta mapping.
    version, licence, description
        Stored in the card; ``licence`` defaults to the data's ``license``/``licence`` attribute.
    dtype
        Storage dtype of the shipped weights (e.g. ``torch.float16``); loading gives float32.
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
    from ..core.rng import sample_key
    from ..transforms import LogNormalize
    from ..xr.qdm import reference_quantiles
    from ..xr.spectra import psd

    started = time.time()
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
    for label, number, low in (
        ("steps", steps, 1),
        ("batch_size", batch_size, 1),
        ("log_every", log_every, 1),
        ("keep_checkpoints", keep_checkpoints, 1),
        ("nquantiles", nquantiles, 1),
    ):
        if not isinstance(number, (int, np.integer)) or isinstance(number, bool) or number < low:
            raise InputError(f"{label} must be an integer >= {low}; got {number!r}.")
    channels = tuple(int(c) for c in channels)
    if not channels or min(channels) < 1:
        raise InputError(f"channels must be positive integers, e.g. (16, 32, 32); got {channels!r}.")
    if data is None:
        raise InputError("No training data given: pass data= (a DataArray or netCDF / zarr paths).")
    out = Path(out)
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )

    # ---- data
    raw, source = _select_variable(data, variable)
    da, quantity, grid = _prepare(raw, units)
    variable = str(da.name)
    ny, nx = grid.shape(da)
    train_da, val_da = _split(da, val_time, val_fraction)
    train_phys = np.ascontiguousarray(train_da.values, dtype=np.float32)
    val_phys = np.ascontiguousarray(val_da.values, dtype=np.float32) if val_da is not None else None
    allnan = np.isnan(train_phys).all(axis=0)
    if val_phys is not None:
        allnan &= np.isnan(val_phys).all(axis=0)
    mask = np.asarray(~allnan, dtype=bool)
    if not mask.any():
        raise InputError(f"'{variable}' is NaN everywhere at all times; nothing to train on.")
    digest = hashlib.sha256(train_phys.tobytes())
    if val_phys is not None:
        digest.update(val_phys.tobytes())
    train_da = train_da.copy(data=train_phys)

    # ---- normalisation, target spectrum, reference quantiles (training period only)
    transform = LogNormalize(eps=eps, log=quantity == "precipitation").fit(train_da)
    train_t = transform.forward(train_da)
    target = psd(train_t).mean(train_t.dims[0])
    ref = reference_quantiles(train_da, nquantiles=nquantiles)

    arch = {
        "in_channels": 1,
        "out_channels": 1,
        "channels": list(channels),
        **dict(net or {}),
        "periodic": bool(grid.periodic),
    }
    config: dict[str, Any] = {
        "kind": kind,
        "variable": variable,
        "units": da.attrs.get("units"),
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
        "n_train": int(train_phys.shape[0]),
        "n_val": 0 if val_phys is None else int(val_phys.shape[0]),
        "grid_shape": [ny, nx],
        "eps": float(eps),
        "data_sha256": digest.hexdigest(),
        "checkpoint_every": checkpoint_every,
        "keep_checkpoints": int(keep_checkpoints),
    }

    # ---- run state
    from ..core import consistency, sde

    if kind == "cm":
        sigma = {"min": consistency.SIGMA_MIN, "max": consistency.SIGMA_MAX, "data": consistency.SIGMA_DATA}
    else:
        sigma = {"min": sde.SDE_SIGMA_MIN, "max": sde.SDE_SIGMA_MAX, "data": consistency.SIGMA_DATA}
    trainer = _Trainer(config, sigma, dev)  # bad `net` arguments fail here, before anything is written
    from ..nets.unet import UNet

    arch = jsonable(next(m for m in trainer.model.modules() if isinstance(m, UNet)).config)
    config["architecture"] = arch
    latest = _latest_checkpoint(out)
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

    # ---- tensors on the device (masked / missing cells: 0 and excluded from the loss)
    def _to_device(phys: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        y = np.asarray(transform.forward(phys), dtype=np.float32)
        valid = np.isfinite(y) & mask
        y = np.where(valid, y, 0.0).astype(np.float32)
        return torch.from_numpy(y[:, None]).to(dev), torch.from_numpy(valid[:, None]).to(dev)

    x_train, m_train = _to_device(train_phys)
    val = _to_device(val_phys) if val_phys is not None else None
    if val is not None and val[0].shape[0] > val_samples:  # an evenly spaced subset of the period
        keep = torch.from_numpy(np.linspace(0, val[0].shape[0] - 1, val_samples).round().astype(np.int64)).to(
            dev
        )
        val = (val[0][keep], val[1][keep])

    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else nullcontext
    perfect_model = None
    if kind == "cm" and val_da is not None and val_phys is not None:
        from .validation import PerfectModelValidation

        perfect_model = PerfectModelValidation(
            val_da.copy(data=val_phys),
            transform,
            target,
            mask,
            seed=sample_key(seed, "perfect-model") % 2**31,
        )
    best_path = out / "best-ema.safetensors"

    def _loss(model: Any, x0: torch.Tensor, m: torch.Tensor, gen: torch.Generator, step: int) -> torch.Tensor:
        with autocast():
            if loss == "ect":
                return consistency.ect_loss(model, x0, step=step, total_steps=steps, generator=gen, mask=m)
            if loss == "ict":
                return consistency.ict_loss(model, x0, step=step, total_steps=steps, generator=gen, mask=m)
            if loss == "ct":
                return consistency.ct_loss(
                    model,
                    cast(Any, trainer.teacher),
                    x0,
                    step=step,
                    total_steps=steps,
                    generator=gen,
                    mask=m,
                    distance=distance,
                )
            return sde.dsm_loss(model, x0, generator=gen, mask=m)

    def _validate(step: int) -> float | None:
        if val is None:
            return None
        x_val, m_val = val
        gen = torch.Generator(device=dev).manual_seed(sample_key(seed, "validation"))
        total, count = 0.0, 0
        trainer.model.eval()
        with torch.no_grad():
            for i in range(0, x_val.shape[0], batch_size):
                xb, mb = x_val[i : i + batch_size], m_val[i : i + batch_size]
                total += float(_loss(trainer.model, xb, mb, gen, step)) * xb.shape[0]
                count += xb.shape[0]
        trainer.model.train()
        return total / count

    def _validate_downscaling(record: dict[str, Any]) -> None:
        """Perfect-model scores of the EMA weights (the ones shipped); keep the best by CRPS."""
        if perfect_model is None:
            return
        scores = perfect_model.score(trainer.ema)
        record.update({f"val_{key}": value for key, value in scores.items() if key != "bilinear_mae"})
        best = min((h["val_crps"] for h in trainer.history if "val_crps" in h), default=float("inf"))
        if scores["crps"] < best or not best_path.exists():
            write_safetensors(best_path, trainer.ema.state_dict())
            record["best"] = True

    val_every = val_every or checkpoint_every or max(1, steps // 10)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=steps,
        initial=trainer.step,
        disable=not progress,
        desc=f"train {kind} {variable}",
        unit="step",
        dynamic_ncols=True,
    )
    trainer.model.train()
    clock = (time.perf_counter(), trainer.step)
    try:
        while trainer.step < steps:
            k = trainer.step
            idx = torch.randint(x_train.shape[0], (batch_size,), generator=trainer.batch_gen).to(dev)
            value = _loss(trainer.model, x_train[idx], m_train[idx], trainer.noise_gen, k)
            if not torch.isfinite(value):
                raise FloatingPointError(
                    f"The training loss became {float(value)} at step {k}; lower lr (now {lr}) "
                    "or check the data."
                )
            trainer.opt.zero_grad(set_to_none=True)
            for group in trainer.opt.param_groups:
                group["lr"] = learning_rate(k, steps, lr, lr_schedule)
            value.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), grad_clip)
            trainer.opt.step()
            trainer.update_averages()
            trainer.step = k + 1
            trainer.running += value.detach().float()
            trainer.n_running += 1
            record: dict[str, Any] = {}
            if trainer.step % log_every == 0 or trainer.step == steps:
                record["loss"] = float(trainer.running) / trainer.n_running
                trainer.running.zero_()
                trainer.n_running = 0
            if trainer.step % val_every == 0 or trainer.step == steps:
                val_loss = _validate(k)
                if val_loss is not None:
                    record["val_loss"] = val_loss
                _validate_downscaling(record)
            if trainer.step == clock[1] + 20 and trainer.step < steps:
                per_step = (time.perf_counter() - clock[0]) / 20
                remaining = (steps - trainer.step) * per_step
                message = (
                    f"train {kind}: {per_step:.2f} s per step on {dev}; about {_duration(remaining)} for "
                    f"the remaining {steps - trainer.step} steps (checkpoints every {checkpoint_every} "
                    "steps; resume=True continues an interrupted run)."
                )
                trainer.history.append({"step": trainer.step, "seconds_per_step": per_step})
                if progress:
                    bar.write(message)
            if record:
                trainer.history.append({"step": trainer.step, **record})
                bar.set_postfix({key: f"{v:.4g}" for key, v in record.items()})
            if (checkpoint_every and trainer.step % checkpoint_every == 0) or trainer.step == steps:
                trainer.save(out)
            bar.update(1)
            if callback is not None:
                callback({"step": trainer.step, "loss": float(value.detach())})
    finally:
        bar.close()
    (out / "history.json").write_text(json.dumps(jsonable(trainer.history), indent=1), encoding="utf-8")

    # ---- the model: the EMA weights with the best perfect-model CRPS (else the last ones) + card
    validation: dict[str, Any] | None = None
    if perfect_model is not None and best_path.exists():
        tensors, _ = read_safetensors(best_path)
        trainer.ema.load_state_dict(tensors, strict=True)
        scored = [h for h in trainer.history if "val_crps" in h]
        chosen = min(scored, key=lambda h: h["val_crps"])
        validation = {
            "metric": (
                f"perfect model: validation fields coarse-grained {perfect_model.factor}x, downscaled back "
                f"at the coarse grid's scale (sigma {perfect_model.sigma:.4g}), {perfect_model.members} "
                f"members, scored against the true fields in {da.attrs.get('units')}"
            ),
            "step": int(chosen["step"]),
            "crps": chosen["val_crps"],
            "bilinear_mae": perfect_model.bilinear_mae,
            "mae_ensemble_mean": chosen["val_mae_mean"],
            "spread_skill": chosen["val_spread_skill"],
            "mean_ratio": chosen["val_mean_ratio"],
            "beats_bilinear": bool(chosen["val_crps"] < perfect_model.bilinear_mae),
            # step, CRPS, spread/skill, mean ratio of every validation
            "curve": [
                [int(h["step"]), h["val_crps"], h["val_spread_skill"], h["val_mean_ratio"]] for h in scored
            ],
        }
    losses = [h["loss"] for h in trainer.history if "loss" in h]
    vals = [h["val_loss"] for h in trainer.history if "val_loss" in h]
    times = train_da[train_da.dims[0]].values
    val_times = val_da[val_da.dims[0]].values if val_da is not None else None
    from .._version import __version__

    card = {
        "format": CARD_FORMAT,
        "name": name or f"{kind}-{variable}-{ny}x{nx}",
        "version": str(version),
        "kind": kind,
        "architecture": {"class": "UNet", "config": arch},
        "variable": {
            "name": variable,
            "units": da.attrs.get("units"),
            # precipitation is stored as a rate whatever the source (an amount, a flux) called it
            "standard_name": STANDARD_NAMES["precipitation"]
            if quantity == "precipitation"
            else da.attrs.get("standard_name", STANDARD_NAMES.get(quantity)),
            "long_name": da.attrs.get("long_name", da.attrs.get("description")),
            "kind": quantity,
            "transform": transform.to_dict(),
        },
        "frequency": _frequency(times),
        "grid": _grid_card(da, grid),
        "sigma": sigma,
        "training": {
            "data": description or source,
            "period": [_iso(times[0]), _iso(times[-1])],
            "validation_period": None if val_times is None else [_iso(val_times[0]), _iso(val_times[-1])],
            "n_train": config["n_train"],
            "n_val": config["n_val"],
            "licence": licence
            or str(
                raw.attrs.get("license")
                or raw.attrs.get("licence")
                or "unknown: see the terms of use of the training data"
            ),
            "steps": int(steps),
            "batch_size": int(batch_size),
            "optimizer": "RAdam",
            "lr": float(lr),
            "lr_schedule": lr_schedule,
            "loss": loss,
            "distance": config["distance"],
            "ema_decay": float(ema_decay),
            "grad_clip": config["grad_clip"],
            "seed": int(seed),
            "final_loss": losses[-1] if losses else None,
            "final_val_loss": vals[-1] if vals else None,
            "validation": validation,
            "device": str(dev),
            "precision": "bf16 autocast" if dev.type == "cuda" else "fp32",
            "wall_time_s": round(time.time() - started, 1),
            "data_sha256": config["data_sha256"],
            "xdownscale_version": __version__,
            "torch_version": torch.__version__,
        },
        "target_psd": {
            "name": str(target.name),
            "wavenumber": target["wavenumber"].values,
            "psd": target.values,
            "wavelength_km": target["wavelength_km"].values,
            "n_cells": int(target.attrs["n_cells"]),
            "spacing_km": target.attrs.get("spacing_km"),
            "space": "transformed",
            "attrs": {k: v for k, v in target.attrs.items() if k not in ("n_cells", "spacing_km")},
        },
        "reference_quantiles": {
            "key": "aux.reference_quantiles",
            "quantiles": ref["quantiles"].values,
            "units": da.attrs.get("units"),
        },
        "metrics": {},
    }
    ydim, xdim = grid.ydim, grid.xdim
    ref_values = ref.transpose("quantiles", ydim, xdim).values
    return save_model(out, trainer.ema.eval(), card, mask=mask, reference_quantiles=ref_values, dtype=dtype)
