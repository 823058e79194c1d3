"""Run an assimilation model on arrays: numpy in, numpy out.

This is the only place where data assimilation touches torch, as :mod:`xdownscale.models.inference` is
for downscaling. :mod:`xdownscale.assimilate` turns DataArrays into :class:`Observed` modalities on the
model grid and the analysis back into a DataArray; here the modalities become observation operators and
likelihood terms of the posterior score, and the reverse SDE is sampled with noise keyed by
(window start, window length, member), so a member's analysis does not depend on the batch it ran in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.observations import AreaAverage, BilinearPoints
from ..core.rng import KeyedNoise, sample_key
from ..core.vpsde import ETA, VPSDE, Modality, PosteriorEps, WindowedEps, sample_vp
from ..errors import InputError
from .assimilation import AssimilationModel

__all__ = ["OPERATORS", "Observed", "analyse", "points_at", "points_usable"]

#: how an observation sees the state: the state itself cell by cell, area means, or points
OPERATORS = ("cells", "area", "points")


@dataclass(frozen=True)
class Observed:
    """One observed modality on the model grid, as arrays.

    ``operator`` is one of :data:`OPERATORS`: ``"cells"`` compares the state cell by cell in the model
    space; ``"area"`` takes area means with ``weights`` (a (M, ny * nx) matrix whose rows sum to 1, sparse
    or dense); ``"points"`` interpolates bilinearly at fractional grid indices ``iy``, ``ix`` (masked cells
    left out). ``y`` and ``std`` have the shape (time, 1, M), padded to the analysis length with NaN
    (values) and 1 (std). ``physical``: ``y`` and ``std`` are in the variable's units and the likelihood
    compares there; otherwise both are in the model space. Area and point operators act on the state in
    physical units when the model's transform is nonlinear (area means of precipitation, not of its
    logarithm).
    """

    name: str
    operator: str
    y: np.ndarray
    std: np.ndarray
    physical: bool = False
    weights: Any = None
    iy: np.ndarray | None = None
    ix: np.ndarray | None = None


def points_usable(model: AssimilationModel, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """True for the points (fractional grid indices) with at least one unmasked cell around them."""
    op = BilinearPoints(iy, ix, shape=model.shape, periodic=model.periodic, mask=model.mask)
    return np.asarray(op.valid, dtype=bool)


def points_at(
    values: np.ndarray, iy: np.ndarray, ix: np.ndarray, *, valid: np.ndarray, periodic: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Fields ``values`` (time, ny, nx) interpolated bilinearly at fractional grid indices ``iy``, ``ix``
    from the ``valid`` cells only: (time, N) values, and True for the points with a valid cell around."""
    op = BilinearPoints(iy, ix, shape=valid.shape, periodic=periodic, mask=valid)
    at = op(torch.as_tensor(np.nan_to_num(np.asarray(values, dtype=np.float64)))).numpy()
    return at, np.asarray(op.valid, dtype=bool)


def _operator(model: AssimilationModel, obs: Observed) -> Callable[[torch.Tensor], torch.Tensor]:
    if obs.operator == "cells":
        return lambda x: x.flatten(-2)
    op: Any
    if obs.operator == "area":
        op = AreaAverage(obs.weights, shape=model.shape)
    elif obs.operator == "points" and obs.iy is not None and obs.ix is not None:
        op = BilinearPoints(obs.iy, obs.ix, shape=model.shape, periodic=model.periodic, mask=model.mask)
    else:
        raise InputError(
            f"Observed {obs.name!r}: operator={obs.operator!r} (points need iy and ix), expected one of "
            f"{OPERATORS}."
        )
    if not model.nonlinear:
        return op
    if obs.physical:
        return lambda x: op(model.from_model_space_torch(x))
    return lambda x: model.to_model_space_torch(op(model.from_model_space_torch(x)))


def _modality(model: AssimilationModel, obs: Observed) -> Modality:
    return Modality(
        _operator(model, obs),
        torch.as_tensor(obs.y, dtype=torch.float32, device=model.device),
        torch.as_tensor(obs.std, dtype=torch.float32, device=model.device),
        obs.name,
        linearize=obs.physical,
    )


def analyse(
    model: AssimilationModel,
    kind: str,
    backgrounds: Sequence[Observed],
    observed: Sequence[Observed],
    *,
    n_time: int,
    length: int,
    start: int,
    members: int,
    steps: int,
    corrections: int,
    tau: float,
    gamma: float,
    seed: int,
    batch_size: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Analysis ensemble (member, time, ny, nx) in the model space.

    ``backgrounds``: one modality per background member (analysis member k starts from background
    member k mod their number); ``observed``: the modalities every member sees. ``n_time`` time steps,
    padded to ``length`` (at least the model's window); ``start`` (an integer time stamp) and ``n_time``
    key the noise with ``seed`` and the member.
    """
    if kind not in ("slams", "sda"):
        raise InputError(f"kind={kind!r}: expected 'slams' or 'sda'.")
    ny, nx = model.shape
    sde = VPSDE(float(model.card["assimilation"].get("eta", ETA)))
    prior = WindowedEps(model.score_net, model.window, sde)
    ae: Any = model.autoencoder  # an Autoencoder (nets.autoencoder) or None
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None
    if kind == "slams":
        if ae is None:
            raise InputError(f"Model '{model.name}' has no autoencoder; it cannot be used for SLAMS.")
        lh, lw = ae.latent_size((ny, nx))
        sample_shape: tuple[int, ...] = (length, ae.latent_channels, lh, lw)

        def decoder(z: torch.Tensor) -> torch.Tensor:
            b = z.shape[0]
            return ae.decode(z.reshape(b * length, *z.shape[2:]), size=(ny, nx)).reshape(b, length, 1, ny, nx)
    else:
        sample_shape = (length, 1, ny, nx)

    shared = [_modality(model, obs) for obs in observed]
    keys = [sample_key("assimilate", kind, int(start), int(n_time), member) for member in range(members)]
    n_bg = len(backgrounds)
    bsz = int(batch_size or members)
    groups = [[k for k in range(members) if k % n_bg == b] for b in range(n_bg)]
    batches = [(b, g[i : i + bsz]) for b, g in enumerate(groups) for i in range(0, len(g), bsz)]
    outs: dict[int, np.ndarray] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps * len(batches), desc=f"{kind} analysis", leave=False)
    posteriors: dict[int, PosteriorEps] = {}
    for b, idx in batches:
        if b not in posteriors:
            posteriors[b] = PosteriorEps(
                prior,
                [_modality(model, backgrounds[b]), *shared],
                sde,
                gamma=gamma,
                decoder=decoder,
                steps=steps,
            )
        noise = KeyedNoise([keys[k] for k in idx], seed=int(seed), shape=sample_shape, device=model.device)
        x = sample_vp(
            posteriors[b],
            (len(noise), *sample_shape),
            noise=noise,
            sde=sde,
            steps=steps,
            corrections=corrections,
            tau=tau,
            callback=(lambda _: bar.update(1)) if bar else None,
        )
        with torch.no_grad():
            state = decoder(x) if decoder is not None else x
        for member_k, field_k in zip(idx, state[:, :n_time, 0].cpu().numpy(), strict=True):
            outs[member_k] = field_k
    if bar is not None:
        bar.close()
    return np.stack([outs[j] for j in range(members)])
