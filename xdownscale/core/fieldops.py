"""The linear steps of preparing fields, in torch, for batches that stay on the network's device.

The same arithmetic as the numpy versions the xarray pipeline uses (:mod:`xdownscale.core.regrid_weights`,
:func:`xdownscale.core.spectra.lowpass_filter`, :mod:`xdownscale.core.transforms`), written as matrix
products and FFTs over a batch of fields ``(B, H, W)``:

* :class:`Regrid`: a rectilinear regridding as two small dense products (``Wy @ X @ Wx.T`` and the
  pole rows), a curvilinear one as one sparse product; target cells the source covers too little of
  become NaN, as in :meth:`xdownscale.core.regrid_weights.Weights.apply` for fields without NaN.
* :class:`Lowpass`: the radial low-pass, the DCT-II of a non-periodic axis as a product with its
  orthonormal matrix and the FFT of a periodic one; NaN cells are filled from their nearest valid cell
  before filtering (the pattern is fixed, so the fill is one gather) and are NaN again afterwards.
* :func:`log_forward` / :func:`log_inverse`: the model transform's arithmetic.

Every operator is built once on the host (numpy) and moved to a device with ``.to(device, dtype)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from .spectra import MAX_RADIAL_WAVENUMBER

__all__ = ["Lowpass", "Regrid", "dct_matrix", "log_forward", "log_inverse"]


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix ``C`` (n, n): ``C @ x`` is ``scipy.fft.dct(x, type=2, norm="ortho")``
    and ``C.T`` its inverse."""
    k = np.arange(n)[:, None]
    c = np.cos(np.pi * k * (2 * np.arange(n)[None, :] + 1) / (2 * n)) * np.sqrt(2.0 / n)
    c[0] /= np.sqrt(2.0)
    return c


def _put(a: Any, device: torch.device | str | None, dtype: torch.dtype | None) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)


@dataclass
class Regrid:
    """Regridding of fields ``(B, *src_shape)`` to ``(B, *tgt_shape)``: ``wy`` (Ht, Hs) and ``wx``
    (Wt, Ws) for a rectilinear source, or ``matrix`` (Ht * Wt, Hs * Ws) for any other; rows normalised.
    ``drop`` (tgt_shape, bool): target cells set to NaN (too little of them covered by the source)."""

    src_shape: tuple[int, int]
    tgt_shape: tuple[int, int]
    drop: Any
    wy: Any = None
    wx: Any = None
    matrix: Any = None
    #: (target-row weights (Ht,), source row) of the zonal means placed at the poles (bilinear, global)
    poles: tuple[tuple[Any, int], ...] = ()

    @classmethod
    def from_weights(cls, weights: Any, mask_threshold: float) -> Regrid:
        """From a :class:`xdownscale.core.regrid_weights.Weights` object (separable or point weights)."""
        from .regrid_weights import SeparableWeights

        drop = weights.dropped(mask_threshold)
        src, tgt = tuple(weights.src_shape), tuple(weights.tgt_shape)
        if isinstance(weights, SeparableWeights):
            poles = tuple(
                (np.asarray(w, dtype=np.float64), int(row) % src[0])
                for w, row in (
                    (weights.pole_south, weights.south_row),
                    (weights.pole_north, weights.north_row),
                )
                if w is not None
            )
            wy = sp.csr_matrix(weights.wy).toarray()
            wx = sp.csr_matrix(weights.wx).toarray()
            return cls(src, tgt, drop, wy=wy, wx=wx, poles=poles)
        return cls(src, tgt, drop, matrix=sp.csr_matrix(weights.matrix))

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Regrid:
        """This operator with its arrays as tensors on ``device``."""
        if self.matrix is not None:
            m = sp.coo_matrix(self.matrix)
            rows = np.stack([m.row, m.col]).astype(np.int64)
            matrix = torch.sparse_coo_tensor(
                _put(rows, device, None), _put(m.data, device, dtype), size=m.shape, check_invariants=True
            ).coalesce()
            wy = wx = None
        else:
            matrix = None
            wy, wx = _put(self.wy, device, dtype), _put(self.wx, device, dtype)
        poles = tuple((_put(w, device, dtype), row) for w, row in self.poles)
        return Regrid(self.src_shape, self.tgt_shape, _put(self.drop, device, None), wy, wx, matrix, poles)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Hs, Ws) -> (B, Ht, Wt); a field with any NaN comes out all NaN."""
        b = x.shape[0]
        if self.matrix is not None:
            out = torch.sparse.mm(self.matrix, x.reshape(b, -1).T).T.reshape(b, *self.tgt_shape)
        else:
            out = torch.matmul(torch.matmul(self.wy, x), self.wx.T)
            for w, row in self.poles:
                out = out + w[None, :, None] * x[:, row, :].mean(dim=-1)[:, None, None]
        return out.masked_fill(self.drop, float("nan"))


@dataclass
class Lowpass:
    """The radial low-pass of :func:`xdownscale.core.spectra.lowpass_filter` for fields of ``shape``
    with the NaN pattern ``nan`` (None: no NaN), as matrices and FFTs."""

    shape: tuple[int, int]
    wavenumber: float
    periodic_x: bool
    nan: Any = None
    fill: Any = None  # flat index of each cell's nearest valid cell, where ``nan`` has NaN
    cy: Any = None
    cx: Any = None
    keep: Any = None

    @classmethod
    def build(
        cls, shape: tuple[int, int], wavenumber: float, *, periodic_x: bool, nan: np.ndarray | None = None
    ) -> Lowpass:
        """Operators for fields of ``shape`` (H, W) with cut-off ``wavenumber`` (cycles per cell)."""
        import scipy.ndimage

        h, w = shape
        fill = None
        if nan is not None and nan.any() and not nan.all():
            _, ind = scipy.ndimage.distance_transform_edt(nan, return_distances=True, return_indices=True)
            fill = (ind[0] * w + ind[1]).ravel()
        else:
            nan = None
        kx = np.fft.rfftfreq(w) if periodic_x else np.arange(w) / (2.0 * w)
        ky = np.arange(h) / (2.0 * h)
        keep = np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2) <= wavenumber * (1 + 1e-12)
        return cls(
            (h, w), float(wavenumber), bool(periodic_x), nan, fill,
            cy=dct_matrix(h), cx=None if periodic_x else dct_matrix(w), keep=keep,
        )  # fmt: skip

    @property
    def identity(self) -> bool:
        """True when every scale is kept (the cut-off reaches the grid's corner)."""
        return self.wavenumber >= MAX_RADIAL_WAVENUMBER

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Lowpass:
        """This operator with its arrays as tensors on ``device``."""

        def put(a: Any, dt: torch.dtype | None = dtype) -> Any:
            return None if a is None else _put(a, device, dt)

        return Lowpass(
            self.shape, self.wavenumber, self.periodic_x, put(self.nan, None),
            put(None if self.fill is None else self.fill.astype(np.int64), None),
            put(self.cy), put(self.cx), put(self.keep, None),
        )  # fmt: skip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W) -> (B, H, W), filtered."""
        if self.identity:
            return x
        b, h, w = x.shape
        f = x
        if self.fill is not None:
            f = f.reshape(b, -1)[:, self.fill].reshape(b, h, w)
        if self.periodic_x:
            spec = torch.fft.rfft(f, dim=-1)
            spec = torch.complex(self.cy @ spec.real, self.cy @ spec.imag) * self.keep
            spec = torch.complex(self.cy.T @ spec.real, self.cy.T @ spec.imag)
            out = torch.fft.irfft(spec, n=w, dim=-1)
        else:
            spec = (self.cy @ f @ self.cx.T) * self.keep
            out = self.cy.T @ spec @ self.cx
        if self.nan is not None:
            out = out.masked_fill(self.nan, float("nan"))
        return out


def log_forward(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``log1p(x / eps)`` with values in [-eps, 0) taken as 0 and values below -eps NaN
    (:func:`xdownscale.core.transforms.log_forward`)."""
    x = torch.where(x < 0, torch.where(x >= -eps, 0.0, float("nan")), x)
    return torch.log1p(x / eps)


def log_inverse(xt: torch.Tensor, eps: float) -> torch.Tensor:
    """``eps * expm1(x~)`` clipped at 0 (:func:`xdownscale.core.transforms.log_inverse`)."""
    return (eps * torch.expm1(xt)).clamp_min(0.0)
