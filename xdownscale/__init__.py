"""xdownscale: zero-shot downscaling of Earth-system-model output with consistency models.

Importing the package registers the ``.downscale`` and ``.assimilate`` accessors on
:class:`xarray.DataArray` and does nothing else: no torch import, no CUDA initialisation, no file
access. The public functions below are imported on first use.

Examples
--------
>>> import xdownscale
>>> from xdownscale.datasets import synthetic_precipitation
>>> pr = synthetic_precipitation(ny=16, nx=24, ntime=4)
>>> pr.downscale.upscale(factor=4).shape
(4, 4, 6)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import accessors as _accessors  # noqa: F401  (registers the accessors)
from . import errors
from ._version import __version__

# public name -> module that defines it
_LAZY = {
    "regrid": "xdownscale.xr.regrid",
    "Regridder": "xdownscale.xr.regrid",
    "QDM": "xdownscale.xr.qdm",
    "apply_qdm": "xdownscale.xr.qdm",
    "psd": "xdownscale.xr.spectra",
    "select_scale": "xdownscale.xr.spectra",
    "Scale": "xdownscale.xr.spectra",
    "lowpass": "xdownscale.xr.spectra",
    "upscale": "xdownscale.xr.spectra",
    "convert_units": "xdownscale.xr.units",
    "train": "xdownscale.models.train",
    "load_model": "xdownscale.models",
    "list_models": "xdownscale.models",
    "downscale": "xdownscale.api",
    "downscale_dataset": "xdownscale.joint",
    "prepare": "xdownscale.api",
    "plan": "xdownscale.api",
    "Plan": "xdownscale.api",
}
_SUBMODULES = {"transforms", "metrics", "datasets", "models", "api", "cli", "assimilate", "demo", "batch"}

__all__ = [
    "QDM",
    "Plan",
    "Regridder",
    "Scale",
    "__version__",
    "api",
    "apply_qdm",
    "assimilate",
    "batch",
    "cli",
    "convert_units",
    "datasets",
    "demo",
    "downscale",
    "downscale_dataset",
    "errors",
    "list_models",
    "load_model",
    "lowpass",
    "metrics",
    "models",
    "plan",
    "prepare",
    "psd",
    "regrid",
    "select_scale",
    "train",
    "transforms",
    "upscale",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from . import api, datasets, metrics, models, transforms
    from .api import Plan, downscale, plan, prepare
    from .joint import downscale_dataset
    from .models import list_models, load_model
    from .models.train import train
    from .xr.qdm import QDM, apply_qdm
    from .xr.regrid import Regridder, regrid
    from .xr.spectra import Scale, lowpass, psd, select_scale, upscale
    from .xr.units import convert_units


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'xdownscale' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
