"""Convolutional autoencoder of SLAMS (Qu et al. 2024, section 2.1 and 3.2).

The encoder ``E`` takes the state and each observation modality put on the state grid (one value
channel and one mask channel per modality: 1 where observed, values 0 elsewhere) and maps them to a
latent ``z``; the decoder ``D`` maps ``z`` back to the state. SLAMS's autoencoder keeps the spatial size
(stride 1); ``factor`` (a power of two) shrinks the latent in space by that much per direction, which is
what makes sampling in the latent space cheaper than in pixel space.

Deviations from the paper, for small grids and batch-independent inference: 3x3 convolutions with
GroupNorm and SiLU instead of 5x5 with BatchNorm and ReLU; a residual block per level.

The latent is standardised per channel with buffers ``z_mean`` / ``z_std`` (fitted after training with
:meth:`Autoencoder.fit_latent_scale`), so the score model's VP SDE sees unit-scale data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from .unet import pad_xy

__all__ = ["Autoencoder"]


def _groups(ch: int) -> int:
    g = min(8, ch)
    while ch % g:
        g -= 1
    return g


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, *, periodic: bool) -> None:
        super().__init__()
        self.periodic = periodic
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def _conv(self, conv: nn.Conv2d, x: Tensor) -> Tensor:
        return conv(pad_xy(x, 1, 1, 1, 1, periodic=self.periodic, mode="reflect"))

    def forward(self, x: Tensor) -> Tensor:
        h = self._conv(self.conv1, F.silu(self.norm1(x)))
        h = self._conv(self.conv2, F.silu(self.norm2(h)))
        return self.skip(x) + h


class Autoencoder(nn.Module):
    """State (+ observation channels) -> latent -> state.

    Parameters
    ----------
    state_channels
        Channels of the state (variables or levels).
    modalities
        Number of observation modalities given to the encoder (each adds a value and a mask channel).
    latent_channels
        Channels of the latent.
    factor
        Spatial downsampling of the latent per direction: 1 (SLAMS) or a power of two.
    hidden
        Width of the convolutional layers.
    periodic
        Circular padding in x (global grids).

    Examples
    --------
    >>> ae = Autoencoder(1, modalities=2, latent_channels=4, factor=2, hidden=8)
    >>> z = ae.encode(torch.zeros(3, 1, 10, 12), torch.zeros(3, 4, 10, 12))
    >>> z.shape, ae.decode(z, size=(10, 12)).shape
    (torch.Size([3, 4, 5, 6]), torch.Size([3, 1, 10, 12]))
    """

    z_mean: Tensor
    z_std: Tensor

    def __init__(
        self,
        state_channels: int = 1,
        *,
        modalities: int = 0,
        latent_channels: int = 4,
        factor: int = 1,
        hidden: int = 32,
        periodic: bool = False,
    ) -> None:
        super().__init__()
        if factor < 1 or factor & (factor - 1):
            raise InputError(f"The latent downsampling factor must be 1 or a power of two, got {factor}.")
        if state_channels < 1 or latent_channels < 1 or modalities < 0 or hidden < 1:
            raise InputError(
                "Autoencoder needs state_channels >= 1, latent_channels >= 1, modalities >= 0 and "
                "hidden >= 1; "
                f"got {state_channels}, {latent_channels}, {modalities}, {hidden}."
            )
        self.state_channels = int(state_channels)
        self.modalities = int(modalities)
        self.latent_channels = int(latent_channels)
        self.factor = int(factor)
        self.hidden = int(hidden)
        self.periodic = bool(periodic)
        levels = int(math.log2(factor))
        cin = state_channels + 2 * modalities
        enc: list[nn.Module] = [nn.Conv2d(cin, hidden, 1), _Block(hidden, hidden, periodic=periodic)]
        for _ in range(levels):
            enc += [nn.Conv2d(hidden, hidden, 2, stride=2), _Block(hidden, hidden, periodic=periodic)]
        enc += [nn.GroupNorm(_groups(hidden), hidden), nn.SiLU(), nn.Conv2d(hidden, latent_channels, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [
            nn.Conv2d(latent_channels, hidden, 1),
            _Block(hidden, hidden, periodic=periodic),
        ]
        for _ in range(levels):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), _Block(hidden, hidden, periodic=periodic)]
        dec += [nn.GroupNorm(_groups(hidden), hidden), nn.SiLU(), nn.Conv2d(hidden, state_channels, 1)]
        self.decoder = nn.Sequential(*dec)
        self.register_buffer("z_mean", torch.zeros(latent_channels))
        self.register_buffer("z_std", torch.ones(latent_channels))

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments: ``Autoencoder(**ae.config)`` rebuilds the architecture."""
        return {
            "state_channels": self.state_channels,
            "modalities": self.modalities,
            "latent_channels": self.latent_channels,
            "factor": self.factor,
            "hidden": self.hidden,
            "periodic": self.periodic,
        }

    def latent_size(self, size: Sequence[int]) -> tuple[int, int]:
        """Latent (h, w) for a state of size (H, W)."""
        f = self.factor
        return (-(-int(size[0]) // f), -(-int(size[1]) // f))

    def _pad(self, x: Tensor) -> Tensor:
        f = self.factor
        h, w = x.shape[-2:]
        ph, pw = (-h) % f, (-w) % f
        if ph or pw:
            x = pad_xy(x, 0, ph, 0, pw, periodic=self.periodic, mode="reflect")
        return x

    def encode(self, state: Tensor, obs: Tensor | None = None) -> Tensor:
        """Standardised latent of ``state`` (B, C, H, W) and observation channels ``obs``
        (B, 2 * modalities, H, W: value, mask per modality; zeros = nothing observed)."""
        if state.ndim != 4 or state.shape[1] != self.state_channels:
            raise InputError(
                f"encode expects a state of shape (B, {self.state_channels}, H, W), got {tuple(state.shape)}."
            )
        if self.modalities:
            if obs is None:
                obs = state.new_zeros(state.shape[0], 2 * self.modalities, *state.shape[-2:])
            state = torch.cat([state, obs], dim=1)
        z = self.encoder(self._pad(state))
        return (z - self.z_mean[:, None, None]) / self.z_std[:, None, None]

    def decode(self, z: Tensor, size: Sequence[int] | None = None) -> Tensor:
        """State (B, C, H, W) from a standardised latent (B, latent_channels, h, w); cropped to ``size``."""
        x = self.decoder(z * self.z_std[:, None, None] + self.z_mean[:, None, None])
        if size is not None:
            x = x[..., : int(size[0]), : int(size[1])]
        return x

    def forward(self, state: Tensor, obs: Tensor | None = None) -> Tensor:
        """Reconstruction ``D(E(state, obs))``."""
        return self.decode(self.encode(state, obs), size=state.shape[-2:])

    @torch.no_grad()
    def fit_latent_scale(self, latents: Tensor) -> None:
        """Set ``z_mean``/``z_std`` so that the given raw-scale latents (N, latent_channels, h, w),
        encoded with the current scaling, become zero mean and unit variance per channel."""
        raw = latents * self.z_std[:, None, None] + self.z_mean[:, None, None]
        self.z_mean.copy_(raw.mean(dim=(0, 2, 3)))
        self.z_std.copy_(raw.std(dim=(0, 2, 3)).clamp_min(1e-6))
