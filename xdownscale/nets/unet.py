"""UNet backbone for the consistency and score networks (Hess et al. 2024, section 4.4).

Architecture (DDPM/ADM style, Ho et al. 2020; Dhariwal & Nichol 2021):

- input 3x3 convolution to ``channels[0]``;
- ``len(channels)`` resolution levels, each with ``num_res_blocks`` residual blocks (GroupNorm, SiLU,
  3x3 convolution, noise-level embedding added per block, GroupNorm, SiLU, dropout, 3x3 convolution,
  1x1 skip where the width changes, sum scaled by 1/sqrt(2)); a stride-2 3x3 convolution between levels;
- bottleneck: residual block, multi-head self-attention
  (:func:`torch.nn.functional.scaled_dot_product_attention`), residual block;
- decoder: ``num_res_blocks + 1`` residual blocks per level on the concatenation with the encoder's skip
  activations, nearest-neighbour x2 upsampling followed by a 3x3 convolution between levels;
- GroupNorm, SiLU, output 3x3 convolution. The last convolution of each block, the attention output
  projection and the output convolution start at zero (the network starts as the zero function).

Noise-level embedding: Gaussian Fourier features (fixed frequencies ~ N(0, 16^2), a buffer drawn from a
fixed seed) of ``noise_labels`` (EDM's ``c_noise = ln(sigma)/4``), then a two-layer SiLU MLP to ``emb_dim``.

Boundaries: in x (width, longitude) the padding is circular when ``periodic=True``; otherwise, and always
in y, it is ``padding`` ("zeros" or "reflect"). Zero padding is the convolution's own (no copy); circular
padding in x with zeros in y adds the wrapped-around column to the two boundary columns of the output
instead of padding a copy of the input (:class:`_Conv3x3`); reflect padding pads a copy. Any H x W works:
the input is padded to a multiple of ``2**(len(channels) - 1)`` the same way (circular in x when
periodic) and the output cropped back. With ``periodic=True`` and H, W multiples of that factor, the
network commutes with rolls in x by multiples of the factor (a strided network cannot commute with other
shifts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from ..errors import InputError

__all__ = ["UNet", "count_parameters", "forward_gflops", "pad_xy"]

PADDING_MODES = ("zeros", "reflect")
FOURIER_SCALE = 16.0
_INV_SQRT2 = 1.0 / math.sqrt(2.0)


def _zero_init(conv: nn.Conv2d | nn.Linear) -> None:
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _num_groups(channels: int, groups: int) -> int:
    """Largest group count <= min(groups, channels) that divides ``channels``."""
    g = max(1, min(groups, channels))
    while channels % g:
        g -= 1
    return g


def _circular_x(x: Tensor, left: int, right: int) -> Tensor:
    width = x.shape[-1]
    if left <= width and right <= width:
        return F.pad(x, (left, right, 0, 0), mode="circular")
    idx = torch.arange(-left, width + right, device=x.device) % width  # wraps more than once
    return x.index_select(-1, idx)


def _pad_dim(x: Tensor, before: int, after: int, dim: int, mode: str) -> Tensor:
    """Pad the last (``dim=-1``) or second-to-last (``dim=-2``) axis with zeros or reflection."""
    pad = (before, after, 0, 0) if dim == -1 else (0, 0, before, after)
    if mode == "zeros":
        return F.pad(x, pad)
    size = x.shape[dim]
    # reflect needs pad < size: fall back to edge replication on tiny axes
    return F.pad(x, pad, mode="reflect" if max(before, after) < size else "replicate")


def pad_xy(
    x: Tensor, top: int, bottom: int, left: int, right: int, *, periodic: bool, mode: str = "zeros"
) -> Tensor:
    """Pad a ``(B, C, H, W)`` tensor: circular in x if ``periodic``, else ``mode``; ``mode`` in y.

    ``mode`` is "zeros" or "reflect" ("reflect" falls back to edge replication where an axis is too short
    to reflect).
    """
    if left or right:
        x = _circular_x(x, left, right) if periodic else _pad_dim(x, left, right, -1, mode)
    if top or bottom:
        x = _pad_dim(x, top, bottom, -2, mode)
    return x


def _wrap_columns(x: Tensor, weight: Tensor, stride: int, width_out: int) -> tuple[Tensor, Tensor | None]:
    """What circular padding in x adds to a zero-padded 3x3 convolution (padding 1, ``stride``).

    The first output column reads input column -1 (= W - 1) through the kernel's first column; when
    ``stride * (width_out - 1) + 1 == W`` the last one reads column W (= 0) through the kernel's last
    column. Both are 3x1 convolutions of one input column: shapes ``(B, Cout, Ho, 1)`` (the second None
    when the last output column does not reach past the edge).
    """
    width = x.shape[-1]
    left = F.conv2d(x[..., width - 1 :], weight[..., :1], stride=(stride, 1), padding=(1, 0))
    right = None
    if stride * (width_out - 1) + 1 == width:
        right = F.conv2d(x[..., :1], weight[..., 2:], stride=(stride, 1), padding=(1, 0))
    return left, right


class _Conv3x3(nn.Module):
    """3x3 convolution with the boundary handling of the UNet (see module docstring).

    Circular padding in x with zero padding in y (the global case) never materialises a padded copy of
    the input: the convolution runs with its own zero padding and the two boundary columns get the
    contribution of the wrapped-around column added (:func:`_wrap_columns`), a pair of 3x1 convolutions
    of one column each. That is the same sum as convolving the circularly padded input, up to float
    rounding, without the full copy that ``F.pad`` makes before every convolution.
    """

    def __init__(self, cin: int, cout: int, *, stride: int = 1, periodic: bool, padding: str) -> None:
        super().__init__()
        self.periodic = periodic
        self.padding = padding
        self.stride = stride
        builtin = 1 if padding == "zeros" else 0
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=builtin)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == "reflect":
            x = _circular_x(x, 1, 1) if self.periodic else _pad_dim(x, 1, 1, -1, "reflect")
            return self.conv(_pad_dim(x, 1, 1, -2, "reflect"))
        out = self.conv(x)
        if self.periodic:
            left, right = _wrap_columns(x, self.conv.weight, self.stride, out.shape[-1])
            out[..., :1] += left.to(out.dtype)
            if right is not None:
                out[..., -1:] += right.to(out.dtype)
        return out


class _ResBlock(nn.Module):
    def __init__(
        self, cin: int, cout: int, emb_dim: int, *, groups: int, dropout: float, periodic: bool, padding: str
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_num_groups(cin, groups), cin)
        self.conv1 = _Conv3x3(cin, cout, periodic=periodic, padding=padding)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(_num_groups(cout, groups), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _Conv3x3(cout, cout, periodic=periodic, padding=padding)
        _zero_init(self.conv2.conv)
        self.skip: nn.Module = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.skip(x) + h) * _INV_SQRT2


class _Attention(nn.Module):
    """Multi-head self-attention over all grid cells, with a residual connection."""

    def __init__(self, ch: int, num_heads: int, groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(_num_groups(ch, groups), ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = nn.Linear(ch, ch)
        _zero_init(self.proj)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        qkv = self.qkv(tokens).reshape(b, h * w, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class _Downsample(nn.Module):
    def __init__(self, ch: int, *, periodic: bool, padding: str) -> None:
        super().__init__()
        self.conv = _Conv3x3(ch, ch, stride=2, periodic=periodic, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    def __init__(self, ch: int, *, periodic: bool, padding: str) -> None:
        super().__init__()
        self.conv = _Conv3x3(ch, ch, periodic=periodic, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """UNet ``F(x, noise_labels)`` for images of any size (Hess et al. 2024, section 4.4).

    Parameters
    ----------
    in_channels, out_channels
        Channels of the input (data channels plus any conditioning channels) and of the output.
    channels
        Width of each resolution level; ``len(channels)`` levels, ``len(channels) - 1`` downsamplings.
        Paper: (128, 128, 256, 256).
    num_res_blocks
        Residual blocks per level in the encoder (the decoder has one more per level).
    attention
        Multi-head self-attention at the bottleneck.
    num_heads
        Attention heads; must divide ``channels[-1]``.
    groups
        GroupNorm groups (reduced to the largest divisor of each width not above it).
    periodic
        Circular padding in x (longitude) for global grids.
    padding
        "zeros" or "reflect": padding in y, and in x when not periodic.
    emb_dim
        Width of the noise-level embedding (default ``4 * channels[0]``).
    dropout
        Dropout rate in the residual blocks.
    noise_channels
        1: one noise level per sample; ``out_channels``: one per output channel (a joint model of several
        variables, each noised to its own scale), embedded side by side.
    static_channels, static_shape
        Fixed per-cell inputs (e.g. the training data's climatology and the land mask) appended to every
        input as further channels, so that the network knows where each cell is: ``static_channels``
        maps of shape ``static_shape`` (H, W), held in the buffer ``static`` (saved with the weights;
        zeros until set with :meth:`set_static`). A network with them runs on that grid only.

    Examples
    --------
    >>> net = UNet(channels=(8, 16), num_res_blocks=1, groups=4)
    >>> net(torch.zeros(2, 1, 19, 29), torch.zeros(2)).shape
    torch.Size([2, 1, 19, 29])
    """

    fourier_freqs: Tensor
    static: Tensor

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (128, 128, 256, 256),
        num_res_blocks: int = 2,
        attention: bool = True,
        num_heads: int = 4,
        groups: int = 32,
        periodic: bool = False,
        padding: str = "zeros",
        emb_dim: int | None = None,
        dropout: float = 0.0,
        noise_channels: int = 1,
        static_channels: int = 0,
        static_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels or any(c < 1 for c in channels):
            raise InputError(f"UNet channels must be a non-empty sequence of positive ints, got {channels}.")
        if in_channels < 1 or out_channels < 1:
            raise InputError(
                f"UNet needs in_channels >= 1 and out_channels >= 1, got {in_channels} and {out_channels}."
            )
        if num_res_blocks < 1:
            raise InputError(f"UNet needs num_res_blocks >= 1, got {num_res_blocks}.")
        if padding not in PADDING_MODES:
            raise InputError(f"UNet padding must be one of {PADDING_MODES}, got {padding!r}.")
        if attention and (num_heads < 1 or channels[-1] % num_heads):
            raise InputError(
                f"UNet num_heads={num_heads} must be >= 1 and divide the bottleneck width {channels[-1]}; "
                "choose another num_heads or attention=False."
            )
        if not 0.0 <= dropout < 1.0:
            raise InputError(f"UNet dropout must be in [0, 1), got {dropout}.")
        if noise_channels not in (1, out_channels):
            raise InputError(
                f"UNet noise_channels must be 1 (one noise level per sample) or out_channels={out_channels} "
                f"(one per variable), got {noise_channels}."
            )
        if static_channels < 0 or (
            static_channels > 0
            and (static_shape is None or len(static_shape) != 2 or min(int(n) for n in static_shape) < 1)
        ):
            raise InputError(
                f"UNet static_channels={static_channels} needs static_shape=(H, W) of the grid the fixed "
                f"inputs belong to, got static_shape={static_shape!r}."
            )
        ch0 = channels[0]
        emb_dim = int(emb_dim) if emb_dim is not None else 4 * ch0
        if emb_dim < 1:
            raise InputError(f"UNet emb_dim must be >= 1, got {emb_dim}.")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.channels = channels
        self.num_res_blocks = int(num_res_blocks)
        self.attention = bool(attention)
        self.num_heads = int(num_heads)
        self.groups = int(groups)
        self.periodic = bool(periodic)
        self.padding = padding
        self.emb_dim = emb_dim
        self.dropout = float(dropout)
        self.noise_channels = int(noise_channels)
        self.static_channels = int(static_channels)
        self.static_shape = (
            tuple(int(n) for n in static_shape) if static_channels and static_shape is not None else None
        )
        if self.static_shape is not None:
            self.register_buffer("static", torch.zeros((self.static_channels, *self.static_shape)))
        kw: dict[str, Any] = {"periodic": self.periodic, "padding": padding}
        rkw: dict[str, Any] = {**kw, "groups": self.groups, "dropout": self.dropout}

        n_freq = max(1, ch0 // 2)
        freqs = torch.randn(n_freq, generator=torch.Generator().manual_seed(0)) * FOURIER_SCALE
        self.register_buffer("fourier_freqs", freqs)
        self.emb_mlp = nn.Sequential(
            nn.Linear(2 * n_freq * self.noise_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        self.conv_in = _Conv3x3(in_channels + self.static_channels, ch0, **kw)
        self.down = nn.ModuleList()
        skips = [ch0]
        cur = ch0
        for level, ch in enumerate(channels):
            for _ in range(num_res_blocks):
                self.down.append(_ResBlock(cur, ch, emb_dim, **rkw))
                cur = ch
                skips.append(cur)
            if level < len(channels) - 1:
                self.down.append(_Downsample(cur, **kw))
                skips.append(cur)
        self.mid = nn.ModuleList([_ResBlock(cur, cur, emb_dim, **rkw)])
        if attention:
            self.mid.append(_Attention(cur, num_heads, self.groups))
        self.mid.append(_ResBlock(cur, cur, emb_dim, **rkw))
        self.up = nn.ModuleList()
        for level in reversed(range(len(channels))):
            ch = channels[level]
            for _ in range(num_res_blocks + 1):
                self.up.append(_ResBlock(cur + skips.pop(), ch, emb_dim, **rkw))
                cur = ch
            if level > 0:
                self.up.append(_Upsample(cur, **kw))
        self.norm_out = nn.GroupNorm(_num_groups(cur, self.groups), cur)
        self.conv_out = _Conv3x3(cur, out_channels, **kw)
        _zero_init(self.conv_out.conv)

    @property
    def size_multiple(self) -> int:
        """H and W are padded internally to a multiple of this (``2**(len(channels) - 1)``)."""
        return int(2 ** (len(self.channels) - 1))

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments: ``UNet(**net.config)`` rebuilds the architecture."""
        config = {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "channels": list(self.channels),
            "num_res_blocks": self.num_res_blocks,
            "attention": self.attention,
            "num_heads": self.num_heads,
            "groups": self.groups,
            "periodic": self.periodic,
            "padding": self.padding,
            "emb_dim": self.emb_dim,
            "dropout": self.dropout,
        }
        # models without these options keep the configuration they were saved with
        if self.noise_channels != 1:
            config["noise_channels"] = self.noise_channels
        if self.static_shape is not None:
            config["static_channels"] = self.static_channels
            config["static_shape"] = list(self.static_shape)
        return config

    def set_static(self, values: Tensor | np.ndarray) -> None:
        """Set the fixed per-cell inputs, shape ``(static_channels, H, W)`` (NaN not allowed)."""
        if self.static_shape is None:
            raise InputError("This UNet has no static inputs (static_channels=0); nothing to set.")
        t = torch.as_tensor(np.asarray(values, dtype=np.float32))
        if tuple(t.shape) != tuple(self.static.shape):
            raise InputError(
                f"UNet static inputs must have shape {tuple(self.static.shape)} (static_channels, H, W), "
                f"got {tuple(t.shape)}."
            )
        if not bool(torch.isfinite(t).all()):
            raise InputError("UNet static inputs must be finite: fill masked cells (e.g. with 0) first.")
        self.static.copy_(t.to(self.static.device))

    def embed(self, noise_labels: Tensor) -> Tensor:
        """Noise-level embedding, shape ``(B, emb_dim)`` (after the final SiLU), of labels of shape
        ``(B,)`` or ``(B, noise_channels)`` (the Fourier features of every channel's label, side by side)."""
        labels = noise_labels.float().reshape(noise_labels.shape[0], -1)
        arg = (2.0 * math.pi) * labels[:, :, None] * self.fourier_freqs[None, None, :]
        arg = arg.reshape(labels.shape[0], -1)
        return F.silu(self.emb_mlp(torch.cat([arg.cos(), arg.sin()], dim=1)))

    def forward(self, x: Tensor, noise_labels: Tensor) -> Tensor:
        """Apply the network.

        Parameters
        ----------
        x
            Shape ``(B, in_channels, H, W)``, any H and W.
        noise_labels
            Shape ``(B,)`` (or a scalar, used for every sample); with ``noise_channels > 1`` shape
            ``(B, noise_channels)``: a noise level per output channel (a ``(B,)`` label is used for all).

        Returns
        -------
        Tensor
            Shape ``(B, out_channels, H, W)``.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise InputError(
                f"UNet expects input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}."
            )
        b, _, height, width = x.shape
        if self.static_shape is not None:
            if (height, width) != self.static_shape:
                raise InputError(
                    f"This network has fixed per-cell inputs for a {self.static_shape[0]} x "
                    f"{self.static_shape[1]} grid and cannot run on a {height} x {width} field: give it "
                    "fields on the model's own grid."
                )
            x = torch.cat([x, self.static.to(x.dtype)[None].expand(b, -1, -1, -1)], dim=1)
        noise_labels = torch.as_tensor(noise_labels, device=x.device)
        if noise_labels.ndim == 0:
            noise_labels = noise_labels.expand(b)
        k = self.noise_channels
        if k > 1 and noise_labels.shape == (b,):
            noise_labels = noise_labels[:, None].expand(b, k)
        if noise_labels.shape != ((b,) if k == 1 else (b, k)):
            raise InputError(
                f"UNet expects noise_labels of shape {(b,) if k == 1 else (b, k)} (one per sample"
                f"{'' if k == 1 else ' and noise channel'}), got {tuple(noise_labels.shape)}."
            )
        m = self.size_multiple
        ph, pw = (-height) % m, (-width) % m
        if ph or pw:
            x = pad_xy(
                x, ph // 2, ph - ph // 2, pw // 2, pw - pw // 2, periodic=self.periodic, mode=self.padding
            )

        emb = self.embed(noise_labels)
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            h = block(h, emb) if isinstance(block, _ResBlock) else block(h)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb) if isinstance(block, _ResBlock) else block(h)
        for block in self.up:
            if isinstance(block, _ResBlock):
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = block(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        if ph or pw:
            h = h[:, :, ph // 2 : ph // 2 + height, pw // 2 : pw // 2 + width]
        return h


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``."""
    return sum(p.numel() for p in module.parameters())


def forward_gflops(module: nn.Module, shape: Sequence[int] | None = None, noise_label: float = 0.0) -> float:
    """GFLOP (1e9 floating-point operations, a multiply-add counted as 2) of one forward, per sample.

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode` (convolutions, matrix products and
    attention; elementwise operations and normalisations are not counted) with the module's parameters
    and buffers swapped for ``meta`` tensors: nothing is computed, so it takes about a second even for a
    240 x 384 field, and attention is counted (the fused CPU attention kernel is not in the FLOP
    registry; on meta it is decomposed into matrix products). Modules that cannot run on meta are run for
    real on their own device.

    Parameters
    ----------
    module
        Called as ``module(x, noise_labels)``.
    shape
        Input shape ``(B, C, H, W)``; default ``(1, module.in_channels, 240, 384)``.
    noise_label
        Value of the noise label (or sigma) passed for every sample.
    """
    if shape is None:
        shape = (1, int(getattr(module, "in_channels", 1)), 240, 384)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise InputError(f"forward_gflops needs an input shape (B, C, H, W), got {shape}.")

    def count(device: torch.device, dtype: torch.dtype, meta: bool) -> float:
        x = torch.zeros(shape, device=device, dtype=dtype)
        labels = torch.full((shape[0],), float(noise_label), device=device, dtype=dtype)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            if meta:  # parameters and buffers swapped for meta tensors: no copy, no compute
                tensors = {
                    name: torch.empty_like(t, device="meta")
                    for name, t in [*module.named_parameters(), *module.named_buffers()]
                }
                functional_call(module, tensors, (x, labels))
            else:
                module(x, labels)
        return counter.get_total_flops() / 1e9 / shape[0]

    try:
        param = next(module.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    try:
        return count(torch.device("meta"), dtype, meta=True)
    except (NotImplementedError, RuntimeError):
        return count(device, dtype, meta=False)
