"""Differentiable observation operators on state tensors (torch only).

Every operator maps a state batch of shape (..., H, W) (any leading dims: batch, time, channel) to the
observation space, is linear, and lets gradients flow back to the state (the posterior score of
:mod:`xdownscale.core.vpsde` differentiates through it):

* :class:`BilinearPoints` - in-situ stations: bilinear interpolation at fractional grid indices
  ``(iy, ix)`` (``iy = 2.5`` is half way between rows 2 and 3); output (..., N).
* :class:`AreaAverage` - ex-situ (satellite) pixels: area-weighted averages of state cells, a sparse
  (M, H * W) matrix whose rows sum to one (built by :func:`xdownscale.xr.observations.satellite_weights`);
  output (..., M).
* :class:`Coarsen`, :class:`Subsample` - the ablation operators of Qu et al. (2024, section 4.2):
  block means over ``factor x factor`` cells (output (..., H // factor, W // factor)) and every
  ``gap``-th cell in both directions (output (..., ceil(H / gap), ceil(W / gap))).
* :func:`add_noise` - Gaussian observation noise (not an operator of the likelihood: it makes synthetic
  observations).
* :class:`Compose` - ``Compose(a, b)(x) == b(a(x))``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError

__all__ = ["AreaAverage", "BilinearPoints", "Coarsen", "Compose", "Subsample", "add_noise"]


class BilinearPoints:
    """Bilinear interpolation of (..., H, W) at fractional indices; output (..., N).

    Parameters
    ----------
    iy, ix
        Fractional row and column indices, shape (N,), within ``[0, H - 1]`` and ``[0, W - 1]``
        (``[0, W)`` with ``periodic=True``, where column ``W - 1`` interpolates towards column 0).
    shape
        ``(H, W)`` of the state.
    periodic
        Wrap in x (global grids).
    mask
        Optional bool (H, W), True = valid cell (land for a land-only product). Corners on invalid
        cells get no weight and the others are renormalised, so a coastal station is interpolated
        from the land cells only instead of from the (meaningless) values under the sea mask;
        ``valid`` is False for points whose corners with weight are all invalid.

    Attributes
    ----------
    valid
        Bool (N,): the point has at least one valid corner.

    Examples
    --------
    >>> op = BilinearPoints([0.5], [1.0], shape=(2, 3))
    >>> op(torch.arange(6.0).reshape(2, 3)).tolist()
    [2.5]
    """

    def __init__(
        self,
        iy: Sequence[float] | np.ndarray | Tensor,
        ix: Sequence[float] | np.ndarray | Tensor,
        *,
        shape: tuple[int, int],
        periodic: bool = False,
        mask: np.ndarray | None = None,
    ) -> None:
        iy_t = torch.as_tensor(np.asarray(iy, dtype=np.float64)).reshape(-1)
        ix_t = torch.as_tensor(np.asarray(ix, dtype=np.float64)).reshape(-1)
        h, w = int(shape[0]), int(shape[1])
        if iy_t.shape != ix_t.shape:
            raise InputError(f"iy and ix must have the same length, got {iy_t.numel()} and {ix_t.numel()}.")
        xmax = w if periodic else w - 1
        if bool(((iy_t < 0) | (iy_t > h - 1) | (ix_t < 0) | (ix_t > xmax)).any()):
            raise InputError(
                f"Fractional indices must lie inside the grid (0 <= iy <= {h - 1}, 0 <= ix <= {xmax}); "
                "drop points outside the domain first (xdownscale.xr.observations.station_indices does)."
            )
        y0 = iy_t.floor().clamp(max=max(h - 2, 0)).long()
        x0 = ix_t.floor().clamp(max=w - 1 if periodic else max(w - 2, 0)).long()
        wy = iy_t - y0
        wx = ix_t - x0
        self.y0, self.y1 = y0, (y0 + 1).clamp(max=h - 1)
        self.x0 = x0
        self.x1 = (x0 + 1) % w if periodic else (x0 + 1).clamp(max=w - 1)
        # corner weights (00, 01, 10, 11), shape (4, N)
        weights = torch.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx])
        if mask is not None:
            m = torch.as_tensor(np.asarray(mask, dtype=bool))
            if tuple(m.shape) != (h, w):
                raise InputError(f"mask must have the state's shape ({h}, {w}), got {tuple(m.shape)}.")
            corners = torch.stack(
                [m[self.y0, self.x0], m[self.y0, self.x1], m[self.y1, self.x0], m[self.y1, self.x1]]
            )
            weights = weights * corners
            total = weights.sum(0)
            #: True for points with at least one valid corner of non-zero weight
            self.valid = (total > 1e-9).numpy()
            weights = weights / total.clamp_min(1e-12)
        else:
            self.valid = np.ones(int(iy_t.numel()), dtype=bool)
        self.weights = weights.float()
        self.shape = (h, w)
        self.size = int(iy_t.numel())

    def __call__(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.shape:
            raise InputError(
                f"BilinearPoints expects (..., {self.shape[0]}, {self.shape[1]}), got {tuple(x.shape)}."
            )
        d = x.device
        w = self.weights.to(d, x.dtype)
        y0, y1, x0, x1 = (i.to(d) for i in (self.y0, self.y1, self.x0, self.x1))
        return x[..., y0, x0] * w[0] + x[..., y0, x1] * w[1] + x[..., y1, x0] * w[2] + x[..., y1, x1] * w[3]


class AreaAverage:
    """Area averages ``W x`` of (..., H, W) with a sparse (M, H * W) weight matrix; output (..., M).

    Parameters
    ----------
    weights
        scipy.sparse matrix (or dense array) of shape (M, H * W), rows summing to one, from
        :func:`xdownscale.xr.observations.satellite_weights`.
    shape
        ``(H, W)`` of the state.
    """

    def __init__(self, weights: object, *, shape: tuple[int, int]) -> None:
        import scipy.sparse as sp

        w = sp.coo_matrix(weights)
        h, wd = int(shape[0]), int(shape[1])
        if w.shape[1] != h * wd:
            raise InputError(
                f"AreaAverage weights have {w.shape[1]} columns; the state has {h} x {wd} cells."
            )
        idx = torch.as_tensor(np.vstack([w.row, w.col]).astype(np.int64))
        self.matrix = torch.sparse_coo_tensor(
            idx, torch.as_tensor(w.data, dtype=torch.float32), w.shape, check_invariants=True
        ).coalesce()
        self.shape = (h, wd)
        self.size = int(w.shape[0])

    def __call__(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.shape:
            raise InputError(
                f"AreaAverage expects (..., {self.shape[0]}, {self.shape[1]}), got {tuple(x.shape)}."
            )
        lead = x.shape[:-2]
        flat = x.reshape(-1, self.shape[0] * self.shape[1])
        m = self.matrix.to(device=x.device, dtype=x.dtype)
        return torch.sparse.mm(m, flat.T).T.reshape(*lead, self.size)


class Coarsen:
    """Block means over ``factor x factor`` cells: (..., H, W) -> (..., H // factor, W // factor)."""

    def __init__(self, factor: int) -> None:
        if int(factor) < 1:
            raise InputError(f"coarsen factor must be >= 1, got {factor}.")
        self.factor = int(factor)

    def __call__(self, x: Tensor) -> Tensor:
        lead, (h, w) = x.shape[:-2], x.shape[-2:]
        out = F.avg_pool2d(x.reshape(-1, 1, h, w), self.factor)
        return out.reshape(*lead, *out.shape[-2:])


class Subsample:
    """Every ``gap``-th cell in y and x, starting at ``offset``: (..., H, W) -> (..., ceil(H/gap), ...)."""

    def __init__(self, gap: int, offset: int = 0) -> None:
        if int(gap) < 1 or not 0 <= int(offset) < int(gap):
            raise InputError(
                f"subsample needs gap >= 1 and 0 <= offset < gap, got gap={gap}, offset={offset}."
            )
        self.gap, self.offset = int(gap), int(offset)

    def __call__(self, x: Tensor) -> Tensor:
        return x[..., self.offset :: self.gap, self.offset :: self.gap]


class Compose:
    """Apply operators in order: ``Compose(a, b)(x) == b(a(x))``."""

    def __init__(self, *ops: object) -> None:
        self.ops = ops

    def __call__(self, x: Tensor) -> Tensor:
        for op in self.ops:
            x = op(x)  # type: ignore[operator]
        return x


def add_noise(y: Tensor, std: float | Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """``y + std * N(0, 1)`` (synthetic observations; the ablation's ``noise(sigma^2)``)."""
    z = torch.randn(y.shape, generator=generator, dtype=y.dtype, device="cpu").to(y.device)
    return y + torch.as_tensor(std, dtype=y.dtype, device=y.device) * z
