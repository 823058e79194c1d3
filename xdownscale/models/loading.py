"""Loading a model from its files: one entry point for downscaling and assimilation models.

The card (``NAME.json``) says which kind of model a file is; this module reads it and hands the file to
the loader of that kind, so that neither kind's module needs the other.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from .card import ASSIMILATION_KINDS, read_card
from .model import Model, load_downscaling_model
from .registry import find_model

if TYPE_CHECKING:
    from .assimilation import AssimilationModel


def load_model(
    name_or_path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> Model | AssimilationModel:
    """Load a model by name (see :func:`~xdownscale.models.list_models`) or by path.

    Parameters
    ----------
    name_or_path
        A model name found in the weights directories, the path of ``NAME.json`` or
        ``NAME.safetensors``, or a directory holding one model.
    device
        Where to put the network.

    Returns
    -------
    Model or AssimilationModel
        By the kind in the card.

    Raises
    ------
    ModelNotFoundError
        No such model; the message lists the available names.
    ModelCardError
        The card is missing fields or does not match the weights.
    WeightsIntegrityError
        The weights file's sha256 differs from the card, or it is a pickle checkpoint (never opened).

    Examples
    --------
    >>> import xdownscale
    >>> [m["name"] for m in xdownscale.list_models()]  # doctest: +SKIP
    >>> model = xdownscale.load_model("cm-pr-41x61")  # doctest: +SKIP
    """
    card_path = find_model(name_or_path)
    if read_card(card_path)["kind"] in ASSIMILATION_KINDS:
        from .assimilation import load_assimilation_model

        return load_assimilation_model(card_path, device=device)
    return load_downscaling_model(card_path, device=device)


def resolve_model(model: object, *, device: str | torch.device | None = None) -> Model | AssimilationModel:
    """A loaded model from a model name, a path, or a model already loaded (returned as it is).

    This is how every surface of the package (functions, accessors, command line, batch jobs) reads its
    ``model=`` argument. Jobs identify a model by its file (path and sha256): the network that runs is
    loaded from that file once per process and device, so changes made to a loaded model's network in
    memory are not used; its device is (the default ``device`` of :func:`xdownscale.api.downscale`).

    Raises
    ------
    InputError
        ``model`` is none of these.
    ModelNotFoundError, ModelCardError, WeightsIntegrityError
        As for :func:`load_model`.
    """
    from .assimilation import AssimilationModel

    if isinstance(model, (Model, AssimilationModel)):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, device="cpu" if device is None else device)
    from ..errors import InputError

    raise InputError(
        f"model={model!r} is not a model name, a path to a model, or a loaded xdownscale model. "
        "See xdownscale.list_models() for the shipped models."
    )
