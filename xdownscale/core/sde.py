"""Score-based baseline: variance-exploding SDE, score model and denoising score matching (torch only).

References
----------
Hess et al. (2024), supplementary information section 1 (eqs. 1-6), following Song et al. (2021):
Score-based generative modeling through stochastic differential equations; Bischoff & Deck (2023).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import InputError
from .consistency import cat_cond, masked_batch, randn_like
from .losses import l2_distance

__all__ = ["SDE_SIGMA_MAX", "SDE_SIGMA_MIN", "VESDE", "ScoreModel", "dsm_loss"]

SDE_SIGMA_MIN = 0.01
SDE_SIGMA_MAX = 500.0


class VESDE:
    """Variance-exploding SDE ``dx = g(t) dw`` on t in [0, 1] (SI eqs. 2 and 5).

    ``sigma(t) = sigma_min (sigma_max / sigma_min)^t`` and
    ``g(t)^2 = d sigma^2 / dt = 2 sigma(t)^2 ln(sigma_max / sigma_min)``. The perturbation kernel used for
    training and for noising an input is ``x(t) = x(0) + sigma(t) z`` (SI, below eq. 6).
    """

    def __init__(self, sigma_min: float = SDE_SIGMA_MIN, sigma_max: float = SDE_SIGMA_MAX) -> None:
        if not 0 < sigma_min < sigma_max:
            raise InputError(f"VESDE needs 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}.")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: Tensor) -> Tensor:
        """sigma(t) = sigma_min (sigma_max/sigma_min)^t."""
        return self.sigma_min * torch.exp(t * self.log_ratio)

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        """Inverse of :meth:`sigma`: t = ln(sigma / sigma_min) / ln(sigma_max / sigma_min)."""
        return torch.log(sigma / self.sigma_min) / self.log_ratio

    def g2(self, t: Tensor) -> Tensor:
        """Squared diffusion coefficient g(t)^2 = 2 sigma(t)^2 ln(sigma_max / sigma_min)."""
        return 2.0 * self.sigma(t) ** 2 * self.log_ratio

    def __repr__(self) -> str:
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


def _t_vector(t: Tensor | float, x: Tensor) -> Tensor:
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    tt = torch.as_tensor(t, device=x.device, dtype=dtype)
    if tt.ndim == 0:
        tt = tt.expand(x.shape[0])
    if tt.shape != (x.shape[0],):
        raise InputError(
            f"t must be a float or a tensor of shape ({x.shape[0]},) (one per sample), got shape "
            f"{tuple(tt.shape)}."
        )
    return tt


class ScoreModel(nn.Module):
    """Score network ``s(x, t) = F(cat(c_in x, cond), c_noise) / sigma(t)`` (SI eq. 4).

    The network output ``S = F`` is divided by sigma(t), as in the paper, so that it predicts ``-z`` (unit
    scale). Beyond the paper (and the reference code, which feeds ``x`` unscaled), the input is scaled by
    ``c_in = 1 / sqrt(sigma^2 + sigma_data^2)`` (EDM) so that it has about unit variance at every noise
    level up to sigma_max = 500, and the noise label is EDM's ``c_noise = ln(sigma) / 4``.

    Parameters
    ----------
    net
        Backbone called as ``net(x, noise_labels)``; takes ``C + Cc`` channels, returns ``C``.
    sigma_min, sigma_max
        Of the VE SDE (paper: 0.01, 500).
    sigma_data
        Data scale for ``c_in``.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        sigma_min: float = SDE_SIGMA_MIN,
        sigma_max: float = SDE_SIGMA_MAX,
        sigma_data: float = 0.5,
    ) -> None:
        super().__init__()
        if not sigma_data > 0:
            raise InputError(f"sigma_data must be > 0, got {sigma_data}.")
        self.net = net
        self.sde = VESDE(sigma_min, sigma_max)
        self.sigma_min = self.sde.sigma_min
        self.sigma_max = self.sde.sigma_max
        self.sigma_data = float(sigma_data)

    def forward(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """Score at ``x`` (shape ``(B, C, H, W)``) and time ``t`` (float or shape ``(B,)``), shaped like x."""
        if x.ndim != 4:
            raise InputError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}.")
        sigma = self.sde.sigma(_t_vector(t, x))
        c_in = (1.0 / torch.sqrt(sigma * sigma + self.sigma_data**2))[:, None, None, None]
        out = self.net(cat_cond(c_in * x, cond), torch.log(sigma) / 4.0)
        if out.shape != x.shape:
            raise InputError(
                f"The network returned shape {tuple(out.shape)} for input {tuple(x.shape)}; its "
                "out_channels must equal the data channels."
            )
        return (out.to(sigma.dtype) / sigma[:, None, None, None]).to(x.dtype)


def dsm_loss(
    model: ScoreModel,
    x0: Tensor,
    *,
    generator: torch.Generator,
    mask: Tensor | None = None,
    cond: Tensor | None = None,
    t_eps: float = 1e-5,
) -> Tensor:
    """Denoising score-matching loss with lambda(t) = sigma(t)^2 (SI eq. 6).

    ``E_{t ~ U(t_eps, 1), z} [ sigma^2 || s(x0 + sigma z, t) + z / sigma ||^2 ] = E || sigma s + z ||^2``,
    averaged over the valid values of each sample and then over the batch.

    Parameters
    ----------
    model
        The score model.
    x0
        Clean data, shape ``(B, C, H, W)`` (0 where masked).
    generator
        Source of t and z.
    mask
        Bool, broadcastable to ``x0``; True = valid. Masked cells never enter the loss.
    cond
        Conditioning channels, shape ``(B, Cc, H, W)``.
    t_eps
        Smallest time drawn.

    Returns
    -------
    Tensor
        Scalar (float32).
    """
    if not 0 <= t_eps < 1:
        raise InputError(f"t_eps must be in [0, 1), got {t_eps}.")
    x0 = masked_batch(x0, mask)
    dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    u = torch.rand((x0.shape[0],), generator=generator, device=generator.device, dtype=torch.float64)
    t = (t_eps + (1.0 - t_eps) * u).to(x0.device, dtype)
    z = randn_like(x0, generator)
    sigma = model.sde.sigma(t)[:, None, None, None]
    score = model(x0 + sigma * z, t, cond)
    return l2_distance(sigma * score, -z, mask).float().mean()
