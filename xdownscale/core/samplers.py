"""Samplers for the consistency model and the VE-SDE score model (torch only).

All samplers take the noise as a callable ``noise(i) -> Tensor`` shaped like the state (a
:class:`~xdownscale.core.rng.KeyedNoise`, so that a sample never depends on its batch). Draw 0 is the
initial noise (of :func:`generate_cm`, :func:`sdedit_cm`, :func:`sde_bridge`, :func:`generate_sde`); draws
1, 2, ... are the noise of the later steps (re-noising in :func:`sample_cm`, the Brownian increments in
:func:`sample_em`). Networks run under :func:`torch.no_grad`.

The two step loops share one signature, k-diffusion style: ``sample_cm(model, x, sigmas, *, noise, cond,
callback)`` and ``sample_em(score_model, x, sigmas, *, noise, cond, denoise, callback)``: the model, the
state at ``sigmas[0]`` and the decreasing noise levels to visit (:func:`em_sigmas` gives the paper's SDE
grid, uniform in t).

Masks: the samplers produce values everywhere; setting masked cells to NaN is the caller's job.

References
----------
Song et al. (2023): Consistency models, algorithm 1 (multistep sampling). Meng et al. (2022): SDEdit.
Hess et al. (2024), section 4.1 step 4 and SI section 1.
Song et al. (2021): Euler-Maruyama for the reverse SDE.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from .schedules import karras_sigmas
from .sde import VESDE

__all__ = ["em_sigmas", "generate_cm", "generate_sde", "sample_cm", "sample_em", "sde_bridge", "sdedit_cm"]

Noise = Callable[[int], Tensor]


class NoiseModel(Protocol):
    """What the samplers need of a model: its noise range, and ``model(x, sigma_or_t, cond) -> Tensor``."""

    sigma_min: float
    sigma_max: float

    def __call__(self, x: Tensor, level: Any, cond: Tensor | None = ...) -> Tensor: ...


#: Default end time of the reverse SDE (sigma(T_END) ~ sigma_min): the paper integrates to "0".
T_END = 1e-5


def _draw(noise: Noise, i: int, like: Tensor) -> Tensor:
    z = noise(i)
    if z.shape != like.shape:
        raise InputError(
            f"The noise source returned shape {tuple(z.shape)} for draw {i}, expected {tuple(like.shape)} "
            "(one row per sample: build KeyedNoise with one key per sample and shape (C, H, W))."
        )
    return z.to(device=like.device, dtype=like.dtype)


def _check_sigma_range(model: NoiseModel, sigma: float, name: str) -> None:
    lo, hi = float(model.sigma_min), float(model.sigma_max)
    if not lo <= sigma <= hi:
        raise InputError(f"{name}={sigma} is outside the model's noise range [{lo}, {hi}].")


def sample_cm(
    model: NoiseModel,
    x: Tensor,
    sigmas: Sequence[float],
    *,
    noise: Noise,
    cond: Tensor | None = None,
    callback: Callable[[int], Any] | None = None,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, algorithm 1).

    ``x`` (shape ``(B, C, H, W)``) is at noise level ``sigmas[0]``. It is denoised with ``f(x, sigmas[0])``;
    then for each next level ``s`` (draw ``i`` = 1, 2, ...): ``x = f(x + sqrt(s^2 - sigma_min^2) z_i, s)``.

    Parameters
    ----------
    model
        A :class:`~xdownscale.core.consistency.ConsistencyModel` (``model(x, sigma, cond)``, attributes
        ``sigma_min`` and ``sigma_max``).
    x
        The state at ``sigmas[0]``.
    sigmas
        Non-empty, decreasing, within ``[sigma_min, sigma_max]``.
    noise
        ``noise(i)`` -> Tensor like ``x``.
    cond
        Conditioning channels, shape ``(B, Cc, H, W)``.
    callback
        Called with the step number (1, 2, ...) after each network evaluation.

    Returns
    -------
    Tensor
        Shape of ``x``.
    """
    sig = [float(s) for s in sigmas]
    if not sig:
        raise InputError("sample_cm needs at least one noise level in sigmas.")
    if any(b >= a for a, b in itertools.pairwise(sig)):
        raise InputError(f"sample_cm needs strictly decreasing sigmas, got {sig}.")
    for s in sig:
        _check_sigma_range(model, s, "sigma")
    sigma_min = float(model.sigma_min)
    with torch.no_grad():
        x = model(x, sig[0], cond)
        if callback is not None:
            callback(1)
        for i, s in enumerate(sig[1:], start=1):
            z = _draw(noise, i, x)
            x = model(x + math.sqrt(max(s * s - sigma_min * sigma_min, 0.0)) * z, s, cond)
            if callback is not None:
                callback(i + 1)
    return x


def _cm_levels(model: NoiseModel, sigma_start: float, steps: int) -> list[float]:
    """``steps`` decreasing levels from ``sigma_start`` on the Karras grid down to (excluding) sigma_min."""
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}.")
    if steps == 1 or sigma_start <= float(model.sigma_min):
        return [sigma_start]
    grid = karras_sigmas(steps + 1, float(model.sigma_min), sigma_start).tolist()
    return grid[::-1][:-1]


def generate_cm(
    model: NoiseModel,
    shape: Sequence[int],
    *,
    steps: int = 1,
    noise: Noise,
    cond: Tensor | None = None,
    sigmas: Sequence[float] | None = None,
) -> Tensor:
    """Generate from pure noise: ``x = sigmas[0] z_0``, then :func:`sample_cm` on ``sigmas``.

    The levels are ``sigmas`` if given (normally starting at sigma_max), else ``steps`` points of the
    Karras grid from sigma_max down (one step: ``[sigma_max]``).

    Returns
    -------
    Tensor
        Shape ``shape`` = ``(B, C, H, W)``, on the noise's device and dtype.
    """
    shape = tuple(int(s) for s in shape)
    z = noise(0)
    if tuple(z.shape) != shape:
        raise InputError(f"The noise source returned shape {tuple(z.shape)} for draw 0, expected {shape}.")
    levels = list(sigmas) if sigmas is not None else _cm_levels(model, float(model.sigma_max), steps)
    return sample_cm(model, float(levels[0]) * z, levels, noise=noise, cond=cond)


def sdedit_cm(
    model: NoiseModel,
    x: Tensor,
    sigma: float | Sequence[float],
    *,
    steps: int = 1,
    noise: Noise,
    cond: Tensor | None = None,
) -> Tensor:
    """SDEdit with a consistency model (Hess et al. section 4.1, step 4): noise ``x`` to ``sigma``, denoise.

    ``x_t = x + sqrt(sigma^2 - sigma_min^2) z_0`` (the input is taken as being at level sigma_min; the
    difference to the paper's ``x + sigma z`` is below 1e-5 sigma for sigma >= 0.5), then :func:`sample_cm`
    on ``steps`` Karras levels from ``sigma`` down. ``sigma == sigma_min`` returns a copy of ``x``
    (exactly equal).

    Parameters
    ----------
    model
        The consistency model.
    x
        Input (e.g. the bias-corrected, regridded, transformed ESM field), shape ``(B, C, H, W)``.
    sigma
        Noise level sigma(t*) in ``[sigma_min, sigma_max]``; for a joint model of several variables a
        sequence of one level per channel (then ``steps`` must be 1 unless the levels are equal).
    steps
        Number of network evaluations (1 = the paper's one-step downscaling).
    noise, cond
        As in :func:`sample_cm`.
    """
    levels = [float(v) for v in np.atleast_1d(np.asarray(sigma, dtype=np.float64))]
    if len(levels) > 1 and len(set(levels)) > 1:
        return _sdedit_cm_per_channel(model, x, levels, steps=steps, noise=noise, cond=cond)
    sigma = levels[0]
    _check_sigma_range(model, sigma, "sigma")
    sigma_min = float(model.sigma_min)
    if sigma == sigma_min:
        return x.clone()
    z = _draw(noise, 0, x)
    x_t = x + math.sqrt(sigma * sigma - sigma_min * sigma_min) * z
    return sample_cm(model, x_t, _cm_levels(model, sigma, steps), noise=noise, cond=cond)


def _sdedit_cm_per_channel(
    model: NoiseModel, x: Tensor, levels: list[float], *, steps: int, noise: Noise, cond: Tensor | None
) -> Tensor:
    """:func:`sdedit_cm` of a joint model with a noise level per channel (one network call)."""
    if len(levels) != x.shape[1]:
        raise InputError(
            f"sigma has {len(levels)} noise levels; the input has {x.shape[1]} channels (one level each)."
        )
    if steps != 1:
        raise InputError(
            f"steps={steps} with a different noise level per variable ({levels}): multistep sampling needs "
            "one level for all variables; use steps=1 (the consistency model's one-step downscaling)."
        )
    for s in levels:
        _check_sigma_range(model, s, "sigma")
    sigma_min = float(model.sigma_min)
    z = _draw(noise, 0, x)
    spread = torch.tensor([math.sqrt(max(s * s - sigma_min * sigma_min, 0.0)) for s in levels])
    x_t = x + spread.to(x.device, x.dtype)[None, :, None, None] * z
    per_sample = torch.tensor(levels, dtype=torch.float64).to(x.device)[None, :].expand(x.shape[0], -1)
    with torch.no_grad():
        return model(x_t, per_sample, cond)


def _sde_of(score_model: NoiseModel) -> VESDE:
    sde = getattr(score_model, "sde", None)
    if isinstance(sde, VESDE):
        return sde
    return VESDE(float(score_model.sigma_min), float(score_model.sigma_max))


def em_sigmas(
    score_model: NoiseModel, t_start: float, *, steps: int = 500, t_end: float = T_END
) -> list[float]:
    """The paper's Euler-Maruyama grid for :func:`sample_em`: ``steps`` steps uniform in t from ``t_start``
    down to ``t_end`` (``0 <= t_end < t_start <= 1``), as ``steps + 1`` decreasing noise levels."""
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}.")
    if not 0 <= t_end < t_start <= 1:
        raise InputError(f"sample_em needs 0 <= t_end < t_start <= 1, got t_end={t_end}, t_start={t_start}.")
    ts = torch.linspace(float(t_start), float(t_end), steps + 1, dtype=torch.float64)
    return [float(v) for v in _sde_of(score_model).sigma(ts)]


def sample_em(
    score_model: NoiseModel,
    x: Tensor,
    sigmas: Sequence[float],
    *,
    noise: Noise,
    cond: Tensor | None = None,
    denoise: bool = True,
    callback: Callable[[int], Any] | None = None,
) -> Tensor:
    """Euler-Maruyama for the reverse VE SDE over the noise levels ``sigmas`` (SI eq. 3 with f = 0).

    The same signature as :func:`sample_cm` (model, state, decreasing noise levels, keyword noise source);
    :func:`em_sigmas` gives the paper's grid, uniform in t. Between levels ``sigmas[i]`` and
    ``sigmas[i + 1]`` (times ``t_i > t_i+1``, draw ``i + 1``):
    ``x <- x + g(t_i)^2 s(x, t_i) dt + sqrt(g(t_i)^2 dt) z_i+1`` with
    ``g^2 = 2 sigma(t)^2 ln(sigma_max/sigma_min)``.
    With ``denoise`` a last Tweedie step ``x <- x + sigmas[-1]^2 s(x, t_end)`` removes the noise left at
    the last level (one more network call).

    Parameters
    ----------
    score_model
        A :class:`~xdownscale.core.sde.ScoreModel` (``score_model(x, t, cond)`` returns the score; has ``sde``
        or ``sigma_min``/``sigma_max``).
    x
        State at the level ``sigmas[0]``, shape ``(B, C, H, W)``.
    sigmas
        At least two strictly decreasing levels within the model's noise range.
    noise, cond
        As in :func:`sample_cm`.
    callback
        Called with the step number (1, 2, ...) after each step.
    """
    sde = _sde_of(score_model)
    sig = [float(v) for v in sigmas]
    if len(sig) < 2 or any(b >= a for a, b in itertools.pairwise(sig)):
        raise InputError(f"sample_em needs at least two strictly decreasing noise levels, got {sig}.")
    lo, hi = float(sde.sigma_min), float(sde.sigma_max)
    if not (lo * (1 - 1e-9) <= sig[-1] and sig[0] <= hi * (1 + 1e-9)):
        raise InputError(
            f"sample_em's noise levels {sig[0]} .. {sig[-1]} leave the model's range [{lo}, {hi}]."
        )
    ts = sde.t_of_sigma(torch.tensor(sig, dtype=torch.float64))
    with torch.no_grad():
        for i in range(len(sig) - 1):
            t, dt = float(ts[i]), float(ts[i] - ts[i + 1])
            g2dt = float(sde.g2(torch.tensor(t, dtype=torch.float64))) * dt
            score = score_model(x, t, cond)
            x = x + g2dt * score + math.sqrt(g2dt) * _draw(noise, i + 1, x)
            if callback is not None:
                callback(i + 1)
        if denoise:
            x = x + sig[-1] * sig[-1] * score_model(x, float(ts[-1]), cond)
    return x


def sde_bridge(
    score_model: NoiseModel,
    x: Tensor,
    t_star: float,
    *,
    steps: int = 500,
    noise: Noise,
    cond: Tensor | None = None,
    t_end: float = T_END,
    denoise: bool = True,
) -> Tensor:
    """SDE bridge (Bischoff & Deck 2023; Hess et al. SI): ``x(t*) = x + sigma(t*) z_0``, then reverse EM.

    Parameters
    ----------
    x
        Input field, shape ``(B, C, H, W)``.
    t_star
        Time to noise to, in ``(t_end, 1]`` (paper: 0.355).
    steps
        Euler-Maruyama steps between ``t_star`` and ``t_end``.
    """
    if not t_end < t_star <= 1:
        raise InputError(f"t_star must be in ({t_end}, 1], got {t_star}.")
    sde = _sde_of(score_model)
    sigma = float(sde.sigma(torch.tensor(float(t_star), dtype=torch.float64)))
    x_t = x + sigma * _draw(noise, 0, x)
    levels = em_sigmas(score_model, t_star, steps=steps, t_end=t_end)
    return sample_em(score_model, x_t, levels, noise=noise, cond=cond, denoise=denoise)


def generate_sde(
    score_model: NoiseModel,
    shape: Sequence[int],
    *,
    steps: int = 500,
    noise: Noise,
    cond: Tensor | None = None,
    t_end: float = T_END,
    denoise: bool = True,
) -> Tensor:
    """Generate from pure noise ``x(1) = sigma_max z_0`` with :func:`sample_em` from t = 1."""
    shape = tuple(int(s) for s in shape)
    z = noise(0)
    if tuple(z.shape) != shape:
        raise InputError(f"The noise source returned shape {tuple(z.shape)} for draw 0, expected {shape}.")
    levels = em_sigmas(score_model, 1.0, steps=steps, t_end=t_end)
    return sample_em(score_model, levels[0] * z, levels, noise=noise, cond=cond, denoise=denoise)
