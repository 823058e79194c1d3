"""Consistency model: preconditioning and consistency-training losses (torch only).

Paper symbols: ``sigma`` is the noise level (the paper's t, since the probability-flow ODE here has
sigma(t) = t), ``x_t`` a sample at noise level sigma, ``F`` the backbone network.

References
----------
Hess, Aich, Pan, Boers (2024): Fast, scale-adaptive and uncertainty-aware downscaling of Earth system
model fields with generative machine learning, section 4.3 (eqs. 4-7).
Song, Dhariwal, Chen, Sutskever (2023): Consistency models (CT, appendix C).
Song, Dhariwal (2024): Improved techniques for training consistency models (iCT).
Karras et al. (2022): EDM, table 1 (c_in, c_noise).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import InputError
from .losses import l1_distance, l2_distance, load_lpips, lpips_distance, pseudo_huber
from .schedules import (
    ct_ema_decay,
    ct_num_scales,
    ect_gap_ratio,
    ict_index_probs,
    ict_num_scales,
    karras_sigmas,
)

__all__ = [
    "SIGMA_DATA",
    "SIGMA_MAX",
    "SIGMA_MIN",
    "ConsistencyModel",
    "cm_scalings",
    "ct_ema_decay",
    "ct_loss",
    "ect_loss",
    "ict_loss",
]

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
SIGMA_DATA = 0.5

DISTANCES = ("l2", "l1", "lpips+l1")


def cm_scalings(
    sigma: Tensor, *, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Preconditioning coefficients of the consistency function (Hess et al. eq. 5 with the fixes below).

    ``c_skip = s_d^2 / ((sigma - sigma_min)^2 + s_d^2)``,
    ``c_out = (sigma - sigma_min) s_d / sqrt(sigma^2 + s_d^2)``,
    ``c_in = 1 / sqrt(sigma^2 + s_d^2)``, ``c_noise = ln(sigma) / 4``.

    The paper's eq. 5 (and the reference code) has ``sigma`` instead of ``sigma - sigma_min`` in ``c_out``,
    which breaks the boundary condition, and no ``c_in``; both are fixed here (Song et al. 2023, appendix C).
    Computed in the dtype of ``sigma`` (at least float32) with ``sigma_min`` as a Python float, so at
    ``sigma == sigma_min`` ``c_out`` is exactly 0 and ``c_skip`` exactly 1.

    Parameters
    ----------
    sigma
        Noise levels, any shape.

    Returns
    -------
    c_skip, c_out, c_in, c_noise
        Same shape as ``sigma``.
    """
    if not sigma.dtype.is_floating_point or sigma.dtype in (torch.float16, torch.bfloat16):
        sigma = sigma.float()
    sd2 = sigma_data * sigma_data
    delta = sigma - sigma_min
    c_skip = sd2 / (delta * delta + sd2)
    norm = torch.sqrt(sigma * sigma + sd2)
    c_out = delta * sigma_data / norm
    c_in = 1.0 / norm
    c_noise = torch.log(sigma) / 4.0
    return c_skip, c_out, c_in, c_noise


def _sigma_vector(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Noise level(s) as a tensor on x's device (float64 for float64 x, else float32): shape (B,) (one per
    sample), or (B, C) (one per sample and channel) when ``sigma`` has that shape."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = torch.as_tensor(sigma, device=x.device, dtype=dtype)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    if s.shape not in ((x.shape[0],), (x.shape[0], x.shape[1])):
        raise InputError(
            f"sigma must be a float, a tensor of shape ({x.shape[0]},) (one per sample) or of shape "
            f"({x.shape[0]}, {x.shape[1]}) (one per sample and channel), got shape {tuple(s.shape)}."
        )
    return s


def per_field(c: Tensor) -> Tensor:
    """Coefficients of shape (B,) or (B, C) shaped to broadcast over (B, C, H, W)."""
    return c[:, None, None, None] if c.ndim == 1 else c[:, :, None, None]


def cat_cond(x: Tensor, cond: Tensor | None) -> Tensor:
    """``x`` with the conditioning channels ``cond`` appended (``x`` itself when there are none)."""
    if cond is None:
        return x
    if cond.ndim != 4 or cond.shape[0] != x.shape[0] or cond.shape[2:] != x.shape[2:]:
        raise InputError(
            f"cond must have shape (B, Cc, H, W) = ({x.shape[0]}, Cc, {x.shape[2]}, {x.shape[3]}), got "
            f"{tuple(cond.shape)}."
        )
    return torch.cat([x, cond.to(x.dtype)], dim=1)


class ConsistencyModel(nn.Module):
    """Consistency function ``f(x, sigma) = c_skip x + c_out F(cat(c_in x, cond), c_noise)`` (Hess eq. 4).

    Parameters
    ----------
    net
        Backbone called as ``net(x, noise_labels)``; takes ``C + Cc`` channels, returns ``C``.
    sigma_min, sigma_max, sigma_data
        Noise range and data scale (paper: 0.002, 80, 0.5).

    Notes
    -----
    ``f(x, sigma_min) == x`` exactly (bit for bit, for finite network output).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        sigma_data: float = SIGMA_DATA,
    ) -> None:
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise InputError(
                f"Need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}."
            )
        if not sigma_data > 0:
            raise InputError(f"sigma_data must be > 0, got {sigma_data}.")
        self.net = net
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.sigma_data = float(sigma_data)

    def forward(self, x_t: Tensor, sigma: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """Denoise ``x_t`` (shape ``(B, C, H, W)``) at noise level ``sigma``: a float, shape ``(B,)``, or
        shape ``(B, C)`` (a level per channel; the backbone needs ``noise_channels == C``)."""
        if x_t.ndim != 4:
            raise InputError(f"x_t must have shape (B, C, H, W), got {tuple(x_t.shape)}.")
        s = _sigma_vector(sigma, x_t)
        if s.ndim == 2 and getattr(self.net, "noise_channels", 1) == 1:
            if not bool((s == s[:, :1]).all()):
                raise InputError(
                    "This network takes one noise level per sample; a level per channel needs a joint "
                    "model (trained on several variables, noise_channels > 1)."
                )
            s = s[:, 0]
        scalings = cm_scalings(s, sigma_data=self.sigma_data, sigma_min=self.sigma_min)
        c_skip, c_out, c_in = (per_field(c) for c in scalings[:3])
        out = self.net(cat_cond(c_in * x_t, cond), scalings[3])
        if out.shape != x_t.shape:
            raise InputError(
                f"The network returned shape {tuple(out.shape)} for input {tuple(x_t.shape)}; its "
                "out_channels must equal the data channels."
            )
        return (c_skip * x_t + c_out * out.to(c_out.dtype)).to(x_t.dtype)


def randn_like(x: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal noise like ``x``, drawn on the generator's device."""
    z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return z.to(device=x.device, dtype=x.dtype)


def masked_batch(x0: Tensor, mask: Tensor | None) -> Tensor:
    """A checked (B, C, H, W) training batch with its masked cells set to 0."""
    if x0.ndim != 4:
        raise InputError(f"x0 must have shape (B, C, H, W), got {tuple(x0.shape)}.")
    if mask is None:
        return x0
    if mask.dtype != torch.bool:
        raise InputError(f"mask must be a bool tensor (True = valid cell), got dtype {mask.dtype}.")
    # masked cells of x0 are 0 by contract; enforcing it also makes NaN there harmless
    return torch.where(mask.to(x0.device), x0, torch.zeros((), dtype=x0.dtype, device=x0.device))


def ict_loss(
    model: ConsistencyModel,
    x0: Tensor,
    *,
    step: int,
    total_steps: int,
    generator: torch.Generator,
    mask: Tensor | None = None,
    cond: Tensor | None = None,
    s0: int = 10,
    s1: int = 1280,
    p_mean: float = -1.1,
    p_std: float = 2.0,
) -> Tensor:
    """Improved consistency-training loss (Song & Dhariwal 2024): the default.

    ``E[ w_i d(f(x0 + sigma_{i+1} z, sigma_{i+1}), stopgrad f(x0 + sigma_i z, sigma_i)) ]`` with the
    pseudo-Huber distance ``d`` (c = 0.00054 sqrt(d_valid)), the Karras grid of ``N(k)`` levels
    (:func:`~xdownscale.core.schedules.ict_num_scales`), i drawn lognormally (P_mean, P_std) and
    ``w_i = 1 / (sigma_{i+1} - sigma_i)``. The teacher is the student itself under ``torch.no_grad``
    (no EMA teacher); both see the same ``z``.

    Parameters
    ----------
    model
        The consistency model being trained.
    x0
        Clean data, shape ``(B, C, H, W)`` (0 where masked).
    step, total_steps
        Training step k and total K (for the curriculum).
    generator
        Source of the noise-level indices and of z.
    mask
        Bool, broadcastable to ``x0``; True = valid cell. Masked cells never enter the loss (x0 is set to
        0 there, so their values - even NaN - change nothing).
    cond
        Conditioning channels, shape ``(B, Cc, H, W)``.

    Returns
    -------
    Tensor
        Scalar (float32).
    """
    _one_level_per_sample(model, "ict")
    x0 = masked_batch(x0, mask)
    n = ict_num_scales(step, total_steps, s0, s1)
    sigmas = karras_sigmas(n, model.sigma_min, model.sigma_max)
    probs = ict_index_probs(sigmas, p_mean, p_std)
    idx = torch.multinomial(probs.to(generator.device), x0.shape[0], replacement=True, generator=generator)
    idx = idx.cpu()
    s_lo, s_hi = sigmas[idx], sigmas[idx + 1]
    z = randn_like(x0, generator)
    return _pair_loss(model, x0, z, s_hi, s_lo, cond, mask)


def _pair_loss(
    model: ConsistencyModel,
    x0: Tensor,
    z: Tensor,
    hi: Tensor,
    lo: Tensor,
    cond: Tensor | None,
    mask: Tensor | None,
) -> Tensor:
    """``mean(d(f(x0 + hi z, hi), stopgrad f(x0 + lo z, lo)) / (hi - lo))`` with the pseudo-Huber ``d``:
    the student/teacher pair of iCT and ECT (noise levels ``hi > lo`` per sample, on the CPU)."""
    dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    hi_d, lo_d = hi.to(x0.device, dtype), lo.to(x0.device, dtype)
    student = model(x0 + per_field(hi_d) * z, hi_d, cond)
    with torch.no_grad():
        teacher = model(x0 + per_field(lo_d) * z, lo_d, cond)
    weight = (1.0 / (hi - lo)).to(x0.device, torch.float32)
    if weight.ndim == 1:
        return (weight * pseudo_huber(student, teacher, mask).float()).mean()
    # a noise level per channel (a joint model): each channel's distance with its own weight
    total = x0.new_zeros((), dtype=torch.float32)
    for c in range(x0.shape[1]):
        m = None if mask is None else (mask[:, c : c + 1] if mask.shape[1] > 1 else mask)
        d = pseudo_huber(student[:, c : c + 1], teacher[:, c : c + 1], m).float()
        total = total + (weight[:, c] * d).mean()
    return total / x0.shape[1]


def noise_channels(model: nn.Module) -> int:
    """Noise levels per sample the backbone of ``model`` takes (1, or one per channel)."""
    return int(getattr(getattr(model, "net", None), "noise_channels", 1))


def _one_level_per_sample(model: nn.Module, loss: str) -> None:
    if noise_channels(model) > 1:
        raise InputError(
            f"loss {loss!r} trains one noise level per sample; a joint model (a noise level per variable) "
            "trains with loss='ect'."
        )


def ect_loss(
    model: ConsistencyModel,
    x0: Tensor,
    *,
    step: int,
    total_steps: int,
    generator: torch.Generator,
    mask: Tensor | None = None,
    cond: Tensor | None = None,
    p_mean: float = -1.1,
    p_std: float = 2.0,
    stages: int = 6,
    q: float = 2.0,
) -> Tensor:
    """Easy Consistency Tuning loss (Geng et al. 2024, "Consistency models made easy").

    ``E[ w d(f(x0 + t z, t), stopgrad f(x0 + r z, r)) ]`` with ``t`` lognormal (P_mean, P_std) in
    ``[sigma_min, sigma_max]``, ``r = max(sigma_min, t (1 - ratio))`` where ``ratio`` is
    :func:`~xdownscale.core.schedules.ect_gap_ratio` (stage 0: ``r = sigma_min``, whose consistency
    target is ``x0 + sigma_min z`` exactly by the boundary condition, i.e. denoising score matching; later
    stages shrink the gap towards the consistency condition), the pseudo-Huber distance ``d`` and
    ``w = 1 / (t - r)`` (as in iCT). Continuous in t, so it needs no discretisation curriculum, and it
    starts as a denoiser, which converges far faster than consistency training from scratch.

    Parameters
    ----------
    model, x0, step, total_steps, generator, mask, cond
        As in :func:`ict_loss`.
    p_mean, p_std
        Lognormal distribution of t. The default puts the median at 0.33 (in units where the data lie in
        about [-1, 1]), 95% of the mass within 0.01 .. 8.5: the noise levels a downscaling call uses.
    stages, q
        Curriculum of the gap (see :func:`~xdownscale.core.schedules.ect_gap_ratio`).

    Returns
    -------
    Tensor
        Scalar (float32).
    """
    x0 = masked_batch(x0, mask)
    k = noise_channels(model)  # a joint model: each variable at its own, independent level
    shape = (x0.shape[0],) if k == 1 else (x0.shape[0], k)
    u = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float64)
    t = torch.exp(p_mean + p_std * u).clamp(model.sigma_min * 1.5, model.sigma_max).cpu()
    r = (t * (1.0 - ect_gap_ratio(t, step, total_steps, stages=stages, q=q))).clamp(min=model.sigma_min)
    z = randn_like(x0, generator)
    return _pair_loss(model, x0, z, t, r, cond, mask)


def ct_loss(
    model: ConsistencyModel,
    teacher: ConsistencyModel,
    x0: Tensor,
    *,
    step: int,
    total_steps: int,
    generator: torch.Generator,
    mask: Tensor | None = None,
    cond: Tensor | None = None,
    distance: str = "l2",
    s0: int = 2,
    s1: int = 150,
) -> Tensor:
    """Consistency-training loss of the paper (Hess et al. eq. 6; Song et al. 2023, algorithm 3).

    ``E[ d(f_theta(x0 + sigma_{n+1} z, sigma_{n+1}), f_teacher(x0 + sigma_n z, sigma_n)) ]`` with n uniform
    on the Karras grid of ``N(k)`` levels (:func:`~xdownscale.core.schedules.ct_num_scales`, 2 -> 151) and
    the teacher an EMA of the student with decay :func:`ct_ema_decay` (the caller keeps the EMA).

    Parameters
    ----------
    model, teacher
        Student and EMA teacher.
    distance
        "l2" (mean squared difference), "l1" (mean absolute difference) or "lpips+l1" (the paper's; needs
        the ``lpips`` package and its backbone weights).
    x0, step, total_steps, generator, mask, cond
        As in :func:`ict_loss`.

    Returns
    -------
    Tensor
        Scalar (float32).

    Raises
    ------
    InputError
        For an unknown distance, or "lpips+l1" where LPIPS is not available.
    """
    _one_level_per_sample(model, "ct")
    if distance not in DISTANCES:
        raise InputError(f"distance must be one of {DISTANCES}, got {distance!r}.")
    if distance == "lpips+l1":
        load_lpips(x0.device)  # fail before any work if LPIPS is not available
    x0 = masked_batch(x0, mask)
    n = ct_num_scales(step, total_steps, s0, s1)
    sigmas = karras_sigmas(n, model.sigma_min, model.sigma_max)
    idx = torch.randint(0, n - 1, (x0.shape[0],), generator=generator, device=generator.device).cpu()
    z = randn_like(x0, generator)
    dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    s_lo, s_hi = sigmas[idx].to(x0.device, dtype), sigmas[idx + 1].to(x0.device, dtype)
    student = model(x0 + s_hi[:, None, None, None] * z, s_hi, cond)
    with torch.no_grad():
        target = teacher(x0 + s_lo[:, None, None, None] * z, s_lo, cond)
    if distance == "l2":
        d = l2_distance(student, target, mask)
    elif distance == "l1":
        d = l1_distance(student, target, mask)
    else:
        d = lpips_distance(student, target, mask) + l1_distance(student, target, mask)
    return d.float().mean()
