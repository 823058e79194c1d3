"""Model cards, weights (safetensors only), the model registry and training.

A model is ``NAME.safetensors`` (inference weights + auxiliary tensors, card in the metadata) plus
``NAME.json`` (the card with the sha256 of the weights); see :mod:`xdownscale.models.card`.
Training lives in :mod:`xdownscale.models.train` (``xdownscale.train``).
"""

from __future__ import annotations

from .card import read_card, validate_card, write_card
from .io import save_model, sha256_file
from .loading import load_model, resolve_model
from .model import Model
from .registry import find_model, list_models, weights_dirs

__all__ = [
    "Model",
    "find_model",
    "list_models",
    "load_model",
    "read_card",
    "resolve_model",
    "save_model",
    "sha256_file",
    "validate_card",
    "weights_dirs",
    "write_card",
]
