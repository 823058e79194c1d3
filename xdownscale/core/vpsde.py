"""Variance-preserving SDE, posterior score and predictor-corrector sampler for score-based data
assimilation (SDA, Rozet & Louppe 2023; SLAMS, Qu et al. 2024, section 2.2-2.3).

Forward process (Qu et al. 2024, eq. 2; cosine schedule of the SDA code)::

    x(t) = mu(t) x + sigma(t) eps,   mu(t) = cos(acos(sqrt(eta)) t)^2,   sigma(t) = sqrt(1 - mu(t)^2 + eta^2)

with ``eta = 1e-3``, ``t`` in [0, 1]. The network predicts the noise ``eps(x(t), t)`` (eq. 5); the score
is ``-eps / sigma``; the Tweedie estimate of the clean state is ``x_hat = (x(t) - sigma eps) / mu`` (eq. 8
written for the VP SDE).

Posterior score (eq. 6, 7, 9): for each observation modality ``m`` with differentiable operator ``A_m``,
observation ``y_m`` and error std ``sigma_m``::

    log p(y_m | x(t)) ~ -1/2 sum (y_m - A_m(x_hat))^2 / (sigma_m^2 + gamma sigma(t)^2 / mu(t)^2)

summed over the finite entries of ``y_m`` (NaN = missing). Its gradient (through the network and the
operator, by :func:`torch.autograd.grad`) is added to the prior score, i.e. ``eps_post = eps - sigma
grad``.

Sampler (eq. 10, 11): exponential-integrator predictor from ``t`` to ``t - dt`` and ``corrections``
Langevin corrector steps in the numerically stable form of the SDA code after its January 2024 fix::

    delta = tau / mean(eps^2);   x <- x - sigma(t - dt) (delta eps + sqrt(2 delta) z)

(SLAMS copied the older form ``x + tau s + sqrt(2 tau) z``, which diverges when the score is large.)

Markov blanket (Rozet & Louppe 2023, section 3.2): a score network trained on windows of ``K = 2k + 1``
consecutive states gives the score of a trajectory of any length ``L >= K``: every window of ``K``
states is scored, and state ``i`` takes its score from the window centred on it (the first and last
``k`` states from the first and last windows). :class:`WindowedEps` does this.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError

__all__ = [
    "ETA",
    "VPSDE",
    "GaussianEps",
    "Modality",
    "NetEps",
    "PosteriorEps",
    "WindowedEps",
    "dsm_loss_vp",
    "noise_label",
    "precondition_eps",
    "sample_vp",
]

#: smallest noise level of the cosine schedule (SDA code)
ETA = 1e-3

EpsFn = Callable[[Tensor, Tensor], Tensor]


class VPSDE:
    """Cosine variance-preserving schedule ``mu(t)``, ``sigma(t)`` (SDA code; Qu et al. 2024, eq. 2).

    Examples
    --------
    >>> sde = VPSDE()
    >>> float(sde.mu(torch.tensor(0.0))), round(float(sde.mu(torch.tensor(1.0))), 6)
    (1.0, 0.001)
    """

    def __init__(self, eta: float = ETA) -> None:
        if not 0.0 < eta < 1.0:
            raise InputError(f"VPSDE eta must be in (0, 1), got {eta}.")
        self.eta = float(eta)
        self._a = math.acos(math.sqrt(self.eta))

    def mu(self, t: Tensor) -> Tensor:
        """``mu(t) = cos(acos(sqrt(eta)) t)^2``; 1 at t = 0, ``eta`` at t = 1."""
        return torch.cos(self._a * t) ** 2

    def sigma(self, t: Tensor) -> Tensor:
        """``sigma(t) = sqrt(1 - mu(t)^2 + eta^2)``; ``eta`` at t = 0, about 1 at t = 1."""
        return (1.0 - self.mu(t) ** 2 + self.eta**2).sqrt()

    def perturb(self, x: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """``x(t) = mu(t) x + sigma(t) eps`` with ``t`` of shape (B,) broadcast over the other dims."""
        tt = t.reshape(t.shape + (1,) * (x.ndim - t.ndim))
        return self.mu(tt) * x + self.sigma(tt) * eps


def noise_label(sde: VPSDE, t: Tensor) -> Tensor:
    """Noise label fed to the network: ``log(sigma(t) / mu(t)) / 4`` (EDM's ``c_noise`` of the equivalent
    VE noise level), which spans about [-1.7, 1.7] over t in [0, 1] and suits the UNet's Fourier embedding."""
    return torch.log(sde.sigma(t) / sde.mu(t)) / 4.0


def precondition_eps(net: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor, sde: VPSDE) -> Tensor:
    """Noise prediction ``eps(x, t) = sigma(t) x + mu(t) F(x, noise_label(t))`` from a network ``F``.

    ``sigma x`` is the exact noise prediction for unit-variance Gaussian data (``x(t) ~ N(0, I)`` then and
    ``E[eps | x(t)] = sigma x(t)``), so ``F`` only learns the departure from it, weighted by ``mu``. At high
    noise (``mu -> 0``) the Tweedie estimate ``x_hat = (x - sigma eps) / mu = mu x - sigma F`` stays
    bounded even for an imperfect network, which keeps the posterior score of an undertrained model finite.
    A reparameterisation in the spirit of EDM's preconditioning (Karras et al. 2022); any noise prediction
    can be written this way.

    Parameters
    ----------
    net
        ``F(x, noise_labels)`` on shape (B, ...) with labels (B,).
    x
        Shape (B, ...).
    t
        Shape (B,) or a scalar.
    """
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(x.shape[0])
    tt = t.reshape(t.shape + (1,) * (x.ndim - 1))
    return sde.sigma(tt) * x + sde.mu(tt) * net(x, noise_label(sde, t))


def dsm_loss_vp(
    eps_fn: EpsFn,
    x0: Tensor,
    sde: VPSDE,
    *,
    generator: torch.Generator,
    mask: Tensor | None = None,
) -> Tensor:
    """Denoising score-matching loss in the noise-prediction form (Qu et al. 2024, eq. 5).

    ``E || eps(mu(t) x + sigma(t) e, t) - e ||^2`` with ``t ~ U(0, 1)`` and ``e ~ N(0, I)``.

    Parameters
    ----------
    eps_fn
        ``eps_fn(x_t, t)`` with ``x_t`` of shape (B, ...) and ``t`` of shape (B,).
    x0
        Clean data, shape (B, ...).
    mask
        Bool tensor broadcastable to ``x0``: only True cells enter the loss.
    """
    b = x0.shape[0]
    t = torch.rand(b, generator=generator, device=generator.device).to(x0.device, x0.dtype)
    e = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device, x0.dtype)
    err = (eps_fn(sde.perturb(x0, t, e), t) - e) ** 2
    if mask is None:
        return err.mean()
    m = mask.expand_as(err).to(err.dtype)
    return (err * m).sum() / m.sum().clamp_min(1.0)


class GaussianEps:
    """Exact noise prediction of a Gaussian prior ``x ~ N(m, S)`` (analytic oracle).

    Under the VP SDE ``x(t) ~ N(mu m, mu^2 S + sigma^2 I)``, so
    ``eps(x, t) = sigma (mu^2 S + sigma^2 I)^{-1} (x - mu m)``. ``S = U diag(lam) U^T`` is diagonalised once.

    Parameters
    ----------
    mean
        Shape ``state_shape``.
    cov
        Shape (N, N) with ``N = mean.numel()``, symmetric positive semi-definite.
    """

    def __init__(self, mean: Tensor, cov: Tensor, sde: VPSDE) -> None:
        n = mean.numel()
        if cov.shape != (n, n):
            raise InputError(f"GaussianEps: cov must have shape ({n}, {n}), got {tuple(cov.shape)}.")
        lam, u = torch.linalg.eigh(cov.double())
        self.shape = tuple(mean.shape)
        self.mean = mean.reshape(-1).double()
        self.lam = lam.clamp_min(0.0)
        self.u = u
        self.sde = sde

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        b = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        mu = self.sde.mu(t).reshape(-1, 1)
        sigma = self.sde.sigma(t).reshape(-1, 1)
        d = x.reshape(b, -1).double() - mu * self.mean
        coef = sigma / (mu**2 * self.lam + sigma**2)  # (B or 1, N)
        eps = ((d @ self.u) * coef) @ self.u.T
        return eps.to(x.dtype).reshape(x.shape)


class WindowedEps(nn.Module):
    """Noise prediction of a trajectory from a network trained on windows of ``K`` states
    (Markov blanket; Rozet & Louppe 2023, section 3.2).

    Parameters
    ----------
    net
        ``F(x, noise_labels)`` on shape (N, K * C, H, W) -> (N, K * C, H, W) (e.g. a UNet with
        ``in_channels = out_channels = K * C``), preconditioned by :func:`precondition_eps`.
    window
        ``K``, odd.
    sde
        For the noise label.
    chunk
        Windows per network call (memory bound; results do not depend on it).

    Notes
    -----
    Input ``x`` has shape (B, L, C, H, W) with ``L >= K``; output the same shape.
    """

    def __init__(self, net: nn.Module, window: int, sde: VPSDE, *, chunk: int = 64) -> None:
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise InputError(f"The window length K must be a positive odd number, got {window}.")
        self.net = net
        self.window = int(window)
        self.sde = sde
        self.chunk = int(chunk)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        b, length, c, h, w = x.shape
        k = self.window
        if length < k:
            raise InputError(
                f"A trajectory of {length} states is shorter than the window of {k} states; pad it with "
                "unobserved states (the assimilation functions do this)."
            )
        order = k // 2
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(b)
        # (B, L - K + 1, K * C, H, W)
        windows = x.unfold(1, k, 1).permute(0, 1, 5, 2, 3, 4).reshape(b, length - k + 1, k * c, h, w)
        n = length - k + 1
        flat = windows.reshape(b * n, k * c, h, w)
        tw = t.repeat_interleave(n)
        out = torch.cat(
            [
                precondition_eps(self.net, flat[i : i + self.chunk], tw[i : i + self.chunk], self.sde)
                for i in range(0, b * n, self.chunk)
            ]
        )
        out = out.reshape(b, n, k, c, h, w)
        return torch.cat([out[:, 0, :order], out[:, :, order], out[:, -1, k - order :]], dim=1)


class NetEps(nn.Module):
    """Noise prediction of single states (no time window), :func:`precondition_eps` of ``net``."""

    def __init__(self, net: nn.Module, sde: VPSDE) -> None:
        super().__init__()
        self.net = net
        self.sde = sde

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return precondition_eps(self.net, x, t, self.sde)


@dataclass
class Modality:
    """One observation modality for :class:`PosteriorEps`.

    Attributes
    ----------
    operator
        Differentiable ``A(x)``: maps the state batch (B, ...) to (B, *y.shape).
    y
        Observations; NaN = missing.
    std
        Observation error std, broadcastable to ``y`` (> 0).
    name
        For messages.
    linearize
        Scale the prior-uncertainty terms of the likelihood variance (stability and step-size terms) by
        the squared local gain of the operator, ``(dA/dx)^2`` along a uniform change of the state (by
        central differences at the current estimate): for operators that are not close to an average
        of the state, e.g. one that takes a log-space state to physical units, whose gain is far from 1.
    """

    operator: Callable[[Tensor], Tensor]
    y: Tensor
    std: Tensor | float
    name: str = "obs"
    linearize: bool = False


#: State step of the central differences of :attr:`Modality.linearize`
LINEARIZE_STEP = 1e-3


class PosteriorEps:
    """Posterior noise prediction ``eps - sigma grad_x log p(y | x(t))`` with the DPS-style Gaussian
    likelihood of each modality and the SDA stability term (Qu et al. 2024, eq. 9).

    Parameters
    ----------
    eps_fn
        Prior noise prediction ``eps_fn(x, t)``.
    modalities
        The observations.
    sde
        The schedule.
    gamma
        Weight of the stability term ``gamma sigma^2 / mu^2`` (paper: 1e-2).
    decoder
        Optional map from the sampled variable to the state the operators act on (SLAMS: the latent
        decoder); the gradient flows through it.
    steps
        Number of predictor steps of the sampler, for the step-size stability term (None: no such term).

    Notes
    -----
    Step-size stability term (not in the paper). One exponential-integrator step moves the Tweedie
    estimate towards the observations by a gradient step of size about ``eta = (r sigma - sigma') sigma
    mu^2 / v`` (``r = mu' / mu``, primes at ``t - 1 / steps``) times the operator's gain, for a prior of
    unit variance. For observation errors much smaller than the prior spread ``eta`` exceeds 2 and the
    explicit step overshoots and diverges (with gamma = 1e-2 and an error of 0.03 prior std even 256
    steps do). With ``steps`` given, ``(r sigma - sigma') sigma mu^2`` is added to the likelihood
    variance, which keeps ``eta <= 1``; the term is O(1 / steps), so the sampler still converges to the
    same posterior as ``steps`` grows.
    """

    def __init__(
        self,
        eps_fn: EpsFn,
        modalities: Sequence[Modality],
        sde: VPSDE,
        *,
        gamma: float = 1e-2,
        decoder: Callable[[Tensor], Tensor] | None = None,
        steps: int | None = None,
    ) -> None:
        if gamma < 0:
            raise InputError(f"gamma must be >= 0, got {gamma}.")
        self.steps = None if steps is None else int(steps)
        self.eps_fn = eps_fn
        self.sde = sde
        self.gamma = float(gamma)
        self.decoder = decoder
        self.terms: list[tuple[Callable[[Tensor], Tensor], Tensor, Tensor, Tensor, str, bool]] = []
        for m in modalities:
            y = torch.as_tensor(m.y)
            valid = torch.isfinite(y)
            std = torch.as_tensor(m.std, dtype=y.dtype, device=y.device).expand_as(y)
            valid = valid & torch.isfinite(std) & (std > 0)
            if not bool(valid.any()):
                continue
            self.terms.append(
                (
                    m.operator,
                    torch.where(valid, y, 0.0),
                    torch.where(valid, std, 1.0),
                    valid,
                    m.name,
                    bool(m.linearize),
                )
            )

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if not self.terms:
            with torch.no_grad():
                return self.eps_fn(x, t)
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        mu, sigma = self.sde.mu(t), self.sde.sigma(t)
        inflation = torch.zeros_like(t)
        if self.steps:
            t_next = (t - 1.0 / self.steps).clamp_min(0.0)
            mu_n, sigma_n = self.sde.mu(t_next), self.sde.sigma(t_next)
            inflation = ((mu_n / mu) * sigma - sigma_n).clamp_min(0.0) * sigma * mu**2
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            eps = self.eps_fn(xg, t)
            x_hat = (xg - sigma * eps) / mu
            state = self.decoder(x_hat) if self.decoder is not None else x_hat
            log_p = xg.new_zeros(())
            for op, y, std, valid, _, linearize in self.terms:
                err = y - op(state)
                prior = self.gamma * (sigma / mu) ** 2 + inflation
                if linearize:
                    with torch.no_grad():
                        base = state.detach()
                        gain = (op(base + LINEARIZE_STEP) - op(base - LINEARIZE_STEP)) / (2 * LINEARIZE_STEP)
                    prior = prior * gain**2
                var = std**2 + prior
                log_p = log_p - 0.5 * torch.where(valid, err**2 / var, 0.0).sum()
            (grad,) = torch.autograd.grad(log_p, xg)
        return (eps.detach() - sigma * grad).detach()


def sample_vp(
    eps_fn: EpsFn,
    shape: Sequence[int],
    *,
    noise: Callable[[int], Tensor],
    sde: VPSDE | None = None,
    steps: int = 512,
    corrections: int = 1,
    tau: float = 0.5,
    callback: Callable[[int], Any] | None = None,
) -> Tensor:
    """Predictor-corrector sampling of the reverse VP SDE from pure noise (Qu et al. 2024, eq. 10-11;
    corrector of the SDA code after its 2024-01 fix).

    Parameters
    ----------
    eps_fn
        Noise prediction (prior or :class:`PosteriorEps`), ``eps_fn(x, t)`` with ``x`` of shape ``shape``
        and ``t`` a scalar tensor.
    shape
        (B, ...) of the samples.
    noise
        ``noise(i)`` -> Tensor of shape ``shape``, the ``i``-th independent standard normal draw (a
        :class:`~xdownscale.core.rng.KeyedNoise`, so a member never depends on its batch). Draw 0 is the
        initial state, draw ``1 + s * corrections + j`` the ``j``-th correction of step ``s``.
    steps
        Number of predictor steps from t = 1 to 0 (paper: 512).
    corrections
        Langevin corrector steps after each predictor step (paper: 1).
    tau
        Langevin amplitude (paper: 0.5).
    callback
        Called with the step index after each step (progress bars).

    Returns
    -------
    Tensor
        Shape ``shape``, the samples at t = 0.
    """
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}.")
    if corrections < 0:
        raise InputError(f"corrections must be >= 0, got {corrections}.")
    if tau <= 0:
        raise InputError(f"tau must be > 0, got {tau}.")
    sde = sde or VPSDE()
    x = noise(0)
    if tuple(x.shape) != tuple(shape):
        raise InputError(f"noise(0) has shape {tuple(x.shape)}, expected {tuple(shape)}.")
    dims = tuple(range(1, x.ndim))
    time = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    for s in range(steps):
        t = time[s].to(x.dtype).to(x.device)
        t_next = time[s + 1].to(x.dtype).to(x.device)
        r = sde.mu(t_next) / sde.mu(t)
        with torch.no_grad():
            eps = eps_fn(x, t)
            x = r * x + (sde.sigma(t_next) - r * sde.sigma(t)) * eps
        for j in range(corrections):
            z = noise(1 + s * corrections + j)
            with torch.no_grad():
                eps = eps_fn(x, t_next)
                delta = tau / eps.square().mean(dim=dims, keepdim=True).clamp_min(1e-12)
                x = x - (delta * eps + torch.sqrt(2.0 * delta) * z) * sde.sigma(t_next)
        if callback is not None:
            callback(s)
    return x
