"""Loading a model from its files: one entry point for downscaling and assimilation models.

The card (``NAME.json``) says which kind of model a file is; this module reads it and hands the file to
the loader of that kind, so that neither kind's module needs the other.
"""

from __future__ import annotations

import copy
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch

from .card import ASSIMILATION_KINDS, read_card
from .model import Model, load_downscaling_model
from .registry import find_model

if TYPE_CHECKING:
    from .assimilation import AssimilationModel

#: what every ``model=`` argument takes: a model name (:func:`list_models`), the path of its card or
#: weights, or a loaded model
ModelLike = Union[str, "os.PathLike[str]", Model, "AssimilationModel"]


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


#: models :func:`resolve_model` read from their files in this process, on the CPU: a file is read and
#: hashed once, again only when it changes (size or modification time)
_READ: dict[tuple[str, int, int], Model | AssimilationModel] = {}
_READ_LOCK = threading.Lock()


def _file_stamp(card_path: Path) -> tuple[str, int, int]:
    weights = card_path.with_suffix(".safetensors")
    stat = (weights if weights.is_file() else card_path).stat()
    return str(card_path.resolve()), stat.st_size, stat.st_mtime_ns


def read_once(name_or_path: str | os.PathLike[str]) -> Model | AssimilationModel:
    """The model at ``name_or_path`` as read by this process (on the CPU): the first call reads and hashes
    the file (:func:`load_model`), later calls return the same object until the file changes. Shared:
    use :func:`load_model` for a copy of your own to change or move."""
    card_path = find_model(name_or_path)
    key = _file_stamp(card_path)
    with _READ_LOCK:
        model = _READ.get(key)
        if model is None:
            model = load_model(card_path)
            _READ[key] = model
        return model


def already_read(weights: str | os.PathLike[str], sha256: str) -> Model | AssimilationModel | None:
    """The model :func:`read_once` read from the weights file ``weights`` with this sha256, or None."""
    want = Path(weights).resolve()
    with _READ_LOCK:
        for model in _READ.values():
            if model.sha256 == sha256 and model.path is not None and Path(model.path).resolve() == want:
                return model
    return None


def resolve_model(model: object, *, device: str | torch.device | None = None) -> Model | AssimilationModel:
    """A loaded model from a model name, a path, or a model already loaded (returned as it is).

    A name or path is read and hashed once per process (:func:`read_once`: the same object for the same
    file until it changes, on the CPU unless ``device`` asks for another; :func:`load_model` gives a copy
    of your own).

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
        shared = read_once(model)
        if device is None or torch.device(device) == shared.device:
            return shared
        return copy.deepcopy(shared).to(device)
    from ..errors import InputError

    raise InputError(
        f"model={model!r} is not a model name, a path to a model, or a loaded xdownscale model. "
        "See xdownscale.list_models() for the shipped models."
    )
