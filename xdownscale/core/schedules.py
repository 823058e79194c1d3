"""Noise-level grids and training curricula for consistency models.

References
----------
Karras, Aittala, Aila, Laine (2022): Elucidating the design space of diffusion-based generative models
(EDM), eq. 5 (the rho-grid of noise levels).
Song, Dhariwal, Chen, Sutskever (2023): Consistency models, appendix C (CT curricula N(k), mu(k)).
Song, Dhariwal (2024): Improved techniques for training consistency models (iCT), section 3.4
(exponential curriculum) and 3.5 (lognormal noise-level sampling).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import InputError

__all__ = [
    "ct_ema_decay",
    "ct_num_scales",
    "ict_index_probs",
    "ict_num_scales",
    "ict_total_steps_per_stage",
    "karras_sigmas",
]


def karras_sigmas(
    n: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Return ``n`` noise levels on the Karras grid, ascending (EDM eq. 5).

    ``sigma_i = (sigma_min^(1/rho) + i/(n-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho``, i = 0 .. n-1;
    the endpoints are exactly ``sigma_min`` and ``sigma_max``.

    Parameters
    ----------
    n
        Number of levels (>= 2; ``n == 1`` gives ``[sigma_max]``).
    sigma_min, sigma_max, rho
        Grid parameters (``0 < sigma_min < sigma_max``).
    dtype, device
        Of the returned tensor (computed in float64).

    Returns
    -------
    Tensor
        Shape ``(n,)``, ascending.

    Raises
    ------
    InputError
        If ``n < 1`` or the sigma range is not ``0 < sigma_min < sigma_max``.
    """
    if n < 1:
        raise InputError(f"karras_sigmas needs n >= 1 noise levels, got n={n}.")
    if not 0 < sigma_min < sigma_max:
        raise InputError(
            "karras_sigmas needs 0 < sigma_min < sigma_max, got "
            f"sigma_min={sigma_min}, sigma_max={sigma_max}."
        )
    if n == 1:
        return torch.tensor([sigma_max], dtype=dtype, device=device)
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sig = (lo + ramp * (hi - lo)) ** rho
    sig[0], sig[-1] = sigma_min, sigma_max
    return sig.to(dtype=dtype, device=device)


def _check_steps(step: int, total_steps: int) -> None:
    if total_steps < 1:
        raise InputError(f"total_steps must be >= 1, got {total_steps}.")
    if step < 0:
        raise InputError(f"step must be >= 0, got {step}.")


def ict_total_steps_per_stage(total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """Return K' = floor(K / (log2 floor(s1/s0) + 1)) of the iCT curriculum (at least 1)."""
    _check_steps(0, total_steps)
    if not 0 < s0 <= s1:
        raise InputError(f"The iCT curriculum needs 0 < s0 <= s1, got s0={s0}, s1={s1}.")
    return max(1, math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)))


def ict_num_scales(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """Number of noise levels N(k) = min(s0 2^floor(k/K'), s1) + 1 of improved CT (iCT eq. 11).

    ``N(0) = s0 + 1`` (11) and ``N(K) = s1 + 1`` (1281) with the defaults.
    """
    _check_steps(step, total_steps)
    k_prime = ict_total_steps_per_stage(total_steps, s0, s1)
    doublings = step // k_prime
    if doublings >= 64:  # avoid huge ints; the min() caps anyway
        return s1 + 1
    return min(s0 * 2**doublings, s1) + 1


def ct_num_scales(step: int, total_steps: int, s0: int = 2, s1: int = 150) -> int:
    """Number of noise levels N(k) of the paper's CT (Song et al. 2023, appendix C).

    ``N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1``: 2 at k = 0, ``s1 + 1`` (151) at k = K.
    """
    _check_steps(step, total_steps)
    frac = min(step, total_steps) / total_steps
    return math.ceil(math.sqrt(frac * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def ct_ema_decay(step: int, total_steps: int, *, s0: int = 2, s1: int = 150, mu0: float = 0.95) -> float:
    """Teacher EMA decay mu(k) = exp(s0 ln(mu0) / N(k)) of the paper's CT (Song et al. 2023, appendix C)."""
    if not 0 < mu0 < 1:
        raise InputError(f"mu0 must be in (0, 1), got {mu0}.")
    return math.exp(s0 * math.log(mu0) / ct_num_scales(step, total_steps, s0, s1))


def ect_gap_ratio(
    sigma: Tensor,
    step: int,
    total_steps: int,
    *,
    stages: int = 6,
    q: float = 2.0,
    k: float = 8.0,
    b: float = 1.0,
) -> Tensor:
    """Relative gap ``(t - r) / t = q^-a n(t)`` of Easy Consistency Tuning (Geng et al. 2024, eq. 9).

    ``n(t) = 1 + k sigmoid(-b t)`` and ``a = floor(stages k / K)`` is the stage of training step ``k`` of
    ``K``. In stage 0 the ratio is ``n(t) >= 1``: the second noise level ``r = t (1 - ratio)`` is clipped to
    ``sigma_min`` by the caller and the loss is plain denoising; each later stage divides the gap by ``q``,
    so training moves from a diffusion denoiser to a consistency model.

    Parameters
    ----------
    sigma
        Noise levels t, any shape.
    step, total_steps
        Training step k and total K.
    stages, q, k, b
        Number of stages, gap divisor per stage and the shape of ``n(t)`` (ECT: q = 2 .. 4, k = 8, b = 1).

    Returns
    -------
    Tensor
        Same shape and dtype as ``sigma``.
    """
    _check_steps(step, total_steps)
    if stages < 1 or not q > 1:
        raise InputError(f"ECT needs stages >= 1 and q > 1, got stages={stages}, q={q}.")
    stage = min(stages - 1, (min(step, total_steps) * stages) // total_steps)
    return (1.0 + k * torch.sigmoid(-b * sigma)) * float(q) ** (-stage)


def ict_index_probs(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """Lognormal probabilities of the pairs (sigma_i, sigma_{i+1}) of an ascending grid (iCT section 3.5).

    ``p(i) ∝ erf((ln sigma_{i+1} - P_mean) / (sqrt(2) P_std))
    - erf((ln sigma_i - P_mean) / (sqrt(2) P_std))``.

    Parameters
    ----------
    sigmas
        Ascending noise levels, shape ``(N,)``.

    Returns
    -------
    Tensor
        Float64, shape ``(N - 1,)``, summing to 1.
    """
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise InputError(f"ict_index_probs needs a 1-d grid of >= 2 sigmas, got shape {tuple(sigmas.shape)}.")
    if p_std <= 0:
        raise InputError(f"p_std must be > 0, got {p_std}.")
    z = (torch.log(sigmas.to(torch.float64)) - p_mean) / (math.sqrt(2.0) * p_std)
    cdf = torch.special.erf(z)
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()
