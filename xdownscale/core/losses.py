"""Per-sample distances for consistency training, with masks.

All distances take ``x, y`` of shape ``(B, C, H, W)`` (any ``(B, ...)`` works for the elementwise ones) and an
optional boolean ``mask`` broadcastable to ``x`` (True = valid cell). Masked cells never enter a distance:
their difference is replaced by 0 (so NaN there is harmless) and ``d``, the number of values of a sample,
counts the valid values only. Each returns shape ``(B,)`` in float32 (float64 for float64 input).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import InputError

__all__ = ["PSEUDO_HUBER_C", "l1_distance", "l2_distance", "load_lpips", "lpips_distance", "pseudo_huber"]

#: c = PSEUDO_HUBER_C sqrt(d) (Song & Dhariwal 2024, section 3.3)
PSEUDO_HUBER_C = 0.00054


def _masked_diff(x: Tensor, y: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Return (difference with masked cells set to 0, number of valid values per sample as float)."""
    if x.shape != y.shape:
        raise InputError(
            f"Distances need x and y of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    diff = x.to(dtype) - y.to(dtype)
    if mask is None:
        n = torch.full((x.shape[0],), float(x[0].numel()), dtype=dtype, device=x.device)
        return diff, n
    if mask.dtype != torch.bool:
        raise InputError(f"mask must be a bool tensor (True = valid cell), got dtype {mask.dtype}.")
    try:
        m = torch.broadcast_to(mask.to(x.device), x.shape)
    except RuntimeError as err:
        raise InputError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the data shape {tuple(x.shape)}."
        ) from err
    diff = torch.where(m, diff, torch.zeros((), dtype=dtype, device=x.device))
    n = m.reshape(x.shape[0], -1).sum(dim=1).to(dtype)
    return diff, n


def pseudo_huber(x: Tensor, y: Tensor, mask: Tensor | None = None, *, c: float | None = None) -> Tensor:
    """Pseudo-Huber distance ``sqrt(||x - y||^2 + c^2) - c`` per sample (iCT, Song & Dhariwal 2024, eq. 10).

    Parameters
    ----------
    x, y
        Shape ``(B, ...)``.
    mask
        Bool, broadcastable to ``x``; True = valid.
    c
        Fixed c; by default ``0.00054 sqrt(d)`` with ``d`` the number of valid values of each sample
        (at least 1, so an all-masked sample gives 0 with a finite gradient).

    Returns
    -------
    Tensor
        Shape ``(B,)``.
    """
    if c is not None and not c > 0:
        raise InputError(f"The pseudo-Huber constant c must be > 0, got {c}.")
    diff, n = _masked_diff(x, y, mask)
    cc = PSEUDO_HUBER_C * torch.sqrt(n.clamp(min=1.0)) if c is None else torch.full_like(n, float(c))
    sq = diff.reshape(diff.shape[0], -1).square().sum(dim=1)
    return torch.sqrt(sq + cc.square()) - cc


def l1_distance(x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean absolute difference over the valid values of each sample, shape ``(B,)``."""
    diff, n = _masked_diff(x, y, mask)
    return diff.reshape(diff.shape[0], -1).abs().sum(dim=1) / n.clamp(min=1.0)


def l2_distance(x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared difference over the valid values of each sample, shape ``(B,)``."""
    diff, n = _masked_diff(x, y, mask)
    return diff.reshape(diff.shape[0], -1).square().sum(dim=1) / n.clamp(min=1.0)


_LPIPS_CACHE: dict[str, Any] = {}

_LPIPS_HELP = (
    "distance='lpips+l1' needs the `lpips` package with torchvision and the pretrained ImageNet VGG backbone "
    "weights in the torch hub cache (no download is possible at run time). Install it with "
    "`pip install 'xarray-downscale[lpips]'` and place the weights in the cache, or use distance='l2' or "
    "'l1' (or the improved-CT loss, whose pseudo-Huber distance needs no pretrained network)."
)


def load_lpips(device: torch.device | str = "cpu") -> Any:
    """Return the LPIPS (VGG) network on ``device`` (cached), or raise InputError saying how to get it."""
    key = str(torch.device(device))
    if key not in _LPIPS_CACHE:
        try:
            import lpips
        except ImportError as err:
            raise InputError(_LPIPS_HELP + f" (import failed: {err})") from err
        try:
            net = lpips.LPIPS(net="vgg", verbose=False)
        except Exception as err:  # weights missing: lpips/torchvision try to download them
            raise InputError(_LPIPS_HELP + f" (loading the LPIPS network failed: {err})") from err
        net.eval().requires_grad_(False)
        _LPIPS_CACHE[key] = net.to(torch.device(device))
    return _LPIPS_CACHE[key]


def lpips_distance(x: Tensor, y: Tensor, mask: Tensor | None = None, *, size: int = 224) -> Tensor:
    """LPIPS (VGG) distance per sample (Zhang et al. 2018), as used by Song et al. (2023) and Hess et al.

    Each channel is copied to 3 channels and resized bilinearly to ``size x size`` (what the ImageNet
    backbone expects); the values should be scaled to about [-1, 1]. Masked cells are set to 0 in both
    inputs first. With several channels the per-channel distances are averaged.

    Raises
    ------
    InputError
        If the ``lpips`` package or its backbone weights are not available.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise InputError(
            f"lpips_distance needs x and y of the same shape (B, C, H, W), got {tuple(x.shape)} and "
            f"{tuple(y.shape)}."
        )
    net = load_lpips(x.device)
    x32, y32 = x.float(), y.float()
    if mask is not None:
        m = torch.broadcast_to(mask.to(x.device), x.shape)
        x32 = torch.where(m, x32, torch.zeros_like(x32))
        y32 = torch.where(m, y32, torch.zeros_like(y32))
    total = torch.zeros(x.shape[0], device=x.device)
    for ch in range(x.shape[1]):
        a = torch.nn.functional.interpolate(x32[:, ch : ch + 1], size=(size, size), mode="bilinear")
        b = torch.nn.functional.interpolate(y32[:, ch : ch + 1], size=(size, size), mode="bilinear")
        total = total + net(a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)).reshape(-1)
    return total / x.shape[1]
