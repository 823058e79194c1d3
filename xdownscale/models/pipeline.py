"""The steps around the network, on the network's device: a downscaling's whole chain per batch.

On an accelerator the xarray pipeline would prepare every field on the CPU (regridding, low-pass, the
transform), copy it to the device and back, and correct it on the CPU again; at the paper's 240 x 384
grid that is about 10 ms of CPU work per field, several times the network's time on a GPU. A
:class:`FieldPipeline` instead describes those steps once (numpy arrays, built on the host by
:mod:`xdownscale.ondevice`), and :func:`denoise_block` runs them on the device around the network:

``coarse fields -> regrid -> low-pass -> clip -> mask -> transform -> noise, denoise -> inverse -> mask ->
preserve -> fine fields``

Only the coarse fields go to the device (16 times fewer values than the fine ones at a 4x refinement)
and only the finished fine fields come back. With bias correction (QDM, which ranks each cell over the
whole period and so cannot run per batch), the input is the prepared (corrected, masked, transformed)
fine field, as the xarray route makes it, and the chain starts at the network.

The arithmetic is that of the xarray pipeline in float32 (float64 for ``preserve``), so outputs agree
with it to float rounding (bf16 rounding where the network runs in bf16).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.fieldops import Lowpass, Regrid, log_forward, log_inverse
from ..core.preserve import MeanPreserver, float64_device
from ..core.transforms import WET_TOLERANCE

__all__ = ["FieldPipeline"]


@dataclass(eq=False)
class FieldPipeline:
    """What happens to each field before and after the network, described on the host.

    Parameters
    ----------
    fine_shape
        The model grid (H, W).
    mask
        (H, W) bool: the model's valid cells.
    eps, lo, hi, log, wet_min
        The model transform (:class:`xdownscale.transforms.LogNormalize`).
    coherent
        For ``"mean"``: the rain recedes from dry coarse cells and the specks and holes of the wet
        area go too (the transform's ``coherent``).
    regrid
        From the input's grid to the model's; None when the input fields are the prepared fields (on the
        model grid, masked, in the model's transformed space).
    lowpass
        The input's low-pass on the model grid, or None.
    clip
        Clip the regridded, low-passed fields at 0 (precipitation).
    preserve
        None, ``"mean"`` (multiplicative, exact coarse-cell means) or ``"lowpass"`` (additive).
    cell, smooth
        For ``"mean"``: the coarse cell of each fine cell and the interpolation from the coarse-cell
        centres (:func:`xdownscale.xr.preserve.coarse_cell_operators`).
    values
        For ``"mean"``: the number of the input's own coarse values each field carries (the targets are
        those values); 0: the targets are the means of the prepared input.
    preserve_lowpass
        For ``"lowpass"``: the low-pass at the scale kept.
    """

    fine_shape: tuple[int, int]
    mask: np.ndarray
    eps: float
    lo: float
    hi: float
    log: bool
    wet_min: float | None = None
    coherent: bool = False
    regrid: Regrid | None = None
    lowpass: Lowpass | None = None
    clip: bool = False
    preserve: str | None = None
    cell: np.ndarray | None = None
    smooth: Any = None
    values: int = 0
    preserve_lowpass: Lowpass | None = None
    token: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if self.preserve not in (None, "mean", "lowpass"):
            raise ValueError(f"preserve={self.preserve!r}: expected None, 'mean' or 'lowpass'.")
        digest = hashlib.sha256()
        for name in sorted(vars(self)):
            if name != "token":
                digest.update(name.encode())
                _digest(digest, getattr(self, name))
        self.token = digest.hexdigest()

    def __dask_tokenize__(self) -> str:
        return self.token

    @property
    def input_size(self) -> int:
        """Values per field going to the device: the input field, then the coarse values."""
        shape = self.regrid.src_shape if self.regrid is not None else self.fine_shape
        return int(np.prod(shape)) + self.values

    def pack(self, fields: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
        """Fields (T, h, w) and their coarse values (T, M) as the rows (T, :attr:`input_size`) that
        :func:`~xdownscale.models.inference.denoise_block` takes."""
        rows = [np.asarray(fields, dtype=np.float32).reshape(len(fields), -1)]
        if self.values:
            assert values is not None
            rows.append(np.asarray(values, dtype=np.float32).reshape(len(fields), -1))
        return np.concatenate(rows, axis=1) if len(rows) > 1 else rows[0]

    def on(self, device: torch.device) -> BoundPipeline:
        """The pipeline's operators on ``device`` (kept for later calls with the same pipeline)."""
        key = (self.token, str(device))
        with _LOCK:
            bound = _BOUND.get(key)
            if bound is None:
                bound = _BOUND[key] = BoundPipeline(self, device)
                while len(_BOUND) > _KEEP:
                    _BOUND.popitem(last=False)
            _BOUND.move_to_end(key)
            return bound


def _digest(digest: Any, value: Any) -> None:
    """Add ``value`` (arrays, sparse matrices, operators, tuples, scalars) to ``digest``, exactly."""
    if isinstance(value, np.ndarray):
        digest.update(repr((value.dtype.str, value.shape)).encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif hasattr(value, "tocsr"):  # a scipy sparse matrix
        m = value.tocsr()
        digest.update(repr(m.shape).encode())
        for a in (m.indptr, m.indices, m.data):
            _digest(digest, np.asarray(a))
    elif isinstance(value, (Regrid, Lowpass)):
        for name in sorted(vars(value)):
            digest.update(name.encode())
            _digest(digest, getattr(value, name))
    elif isinstance(value, (tuple, list)):
        digest.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            _digest(digest, item)
    else:
        digest.update(repr(value).encode())


_LOCK = threading.Lock()
_BOUND: OrderedDict[tuple[str, str], BoundPipeline] = OrderedDict()
_KEEP = 4


class BoundPipeline:
    """A :class:`FieldPipeline` on a device: :meth:`before` and :meth:`after` the network."""

    def __init__(self, spec: FieldPipeline, device: torch.device) -> None:
        self.spec = spec
        self.device = device
        self.dtype = torch.float32
        self.mask = torch.as_tensor(spec.mask, device=device)
        self.regrid = None if spec.regrid is None else spec.regrid.to(device, self.dtype)
        self.lowpass = None if spec.lowpass is None else spec.lowpass.to(device, self.dtype)
        # preserve's arithmetic is float64: on the device, or on the CPU for one without it (MPS)
        self.f64 = float64_device(device)
        self.preserve_lowpass = (
            None if spec.preserve_lowpass is None else spec.preserve_lowpass.to(self.f64, torch.float64)
        )
        self.preserver = None
        if spec.preserve == "mean":
            common = spec.mask.copy()
            if spec.regrid is not None:
                common &= ~np.asarray(spec.regrid.drop)
            assert spec.cell is not None
            self.preserver = MeanPreserver(
                common.ravel(), spec.cell, spec.smooth, self.f64, wet_min=spec.wet_min,
                banded=self.f64.type == "cpu", grid_shape=spec.fine_shape if spec.coherent else None,
            )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Physical fields -> the model's transformed space."""
        s = self.spec
        xt = log_forward(x, s.eps) if s.log else x
        return 2.0 * (xt - s.lo) / (s.hi - s.lo) - 1.0

    def inverse(self, y: torch.Tensor, *, dry: bool) -> torch.Tensor:
        """The model's transformed space -> physical fields (``dry``: amounts under ``wet_min`` to 0)."""
        s = self.spec
        xt = (y + 1.0) * ((s.hi - s.lo) / 2.0) + s.lo
        if not s.log:
            return xt
        x = log_inverse(xt, s.eps)
        if dry and s.wet_min is not None:
            x = torch.where(x < s.wet_min * (1.0 - WET_TOLERANCE), 0.0, x)
        return x

    def before(self, rows: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Rows (B, input_size) on the device -> the network's input (B, 1, H, W) (0 where masked) and
        what :meth:`after` needs."""
        s = self.spec
        b = rows.shape[0]
        n = rows.shape[1] - s.values
        src = rows[:, :n].to(self.dtype)
        values = rows[:, n:] if s.values else None
        # a missing field: all NaN (the input's gaps were filled on its grid; a fine field is NaN where
        # the model is masked)
        gap = ~torch.isfinite(src).any(dim=1)
        if self.regrid is not None:
            src = torch.where(gap[:, None], 0.0, src)
            f = self.regrid(src.reshape(b, *self.regrid.src_shape))
            if self.lowpass is not None:
                f = self.lowpass(f)
            if s.clip:
                f = f.clamp_min(0.0)
            f = f.masked_fill(~self.mask | gap[:, None, None], float("nan"))
            x = self.forward(f)
        else:  # prepared on the host (bias correction): already masked and transformed
            x = src.reshape(b, *s.fine_shape)
        return torch.nan_to_num(x, nan=0.0)[:, None], (x, values)

    def after(self, result: torch.Tensor, context: Any) -> torch.Tensor:
        """The network's output (B, 1, H, W) -> physical fields (B, 1, H, W), NaN where masked."""
        x, values = context
        s = self.spec
        missing = ~torch.isfinite(x)
        y = self.inverse(result[:, 0].to(self.dtype), dry=s.preserve != "mean")
        y = y.masked_fill(missing, float("nan"))
        if s.preserve is not None:
            b = y.shape[0]
            dev = self.f64
            p = self.inverse(x.to(dev).to(torch.float64), dry=False)  # the prepared input, physical
            y64 = y.to(dev).to(torch.float64)
            if self.preserver is not None:
                yf, pf = torch.nan_to_num(y64).reshape(b, -1), torch.nan_to_num(p).reshape(b, -1)
                v = None if values is None else values.to(dev).to(torch.float64)
                step = self.preserver.batch  # fields per call within its memory budget
                fixed = torch.cat([
                    self.preserver(
                        yf[i : i + step], pf[i : i + step],
                        coarse=None if v is None else v[i : i + step],
                        base=None if v is None else pf[i : i + step],
                    ) for i in range(0, b, step)
                ]).reshape(y64.shape)  # fmt: skip
            else:
                assert self.preserve_lowpass is not None
                fixed = y64 + self.preserve_lowpass(torch.nan_to_num(p - y64))
            y = fixed.to(self.dtype).to(self.device).masked_fill(missing, float("nan"))
        return y[:, None]
