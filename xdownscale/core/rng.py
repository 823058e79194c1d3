"""Keyed random numbers: the same seed and key give the same noise, whatever the batch.

Every sample draws its noise from its own :class:`torch.Generator`, seeded from a hash of
``(seed, key, draw index)``. A sample therefore never depends on which other samples shared its batch,
on the batch size, on the order of the batch, on the number of workers or on the device: the noise is
always drawn on the CPU and then moved. This is EDM's ``StackedRandomGenerator`` and consistency_models'
``DeterministicIndividualGenerator`` idea, with the key made explicit (for downscaling, a key is typically
``sample_key(time_stamp, member)``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import InputError

__all__ = ["KeyedNoise", "sample_key"]

_MASK63 = (1 << 63) - 1


def _encode(part: object) -> bytes:
    # Type-tagged so that 1, 1.0, True and "1" give different keys.
    if isinstance(part, bool):
        return b"b" + (b"1" if part else b"0")
    if isinstance(part, int):
        return b"i" + str(part).encode()
    if isinstance(part, float):
        return b"f" + float(part).hex().encode()
    if isinstance(part, str):
        return b"s" + part.encode("utf-8")
    raise InputError(
        f"sample_key() takes int, float or str parts, got {type(part).__name__} ({part!r}). "
        "Convert time stamps to int (e.g. nanoseconds since 1970) or str first."
    )


def sample_key(*parts: int | str | float) -> int:
    """Return a stable 63-bit key for the given parts (sha256 of their type-tagged encoding).

    The key does not depend on the Python process (unlike ``hash()``), the platform or the package version.

    Parameters
    ----------
    *parts
        ints, floats or strs, e.g. ``sample_key(time_ns, member)``.

    Returns
    -------
    int
        In ``[0, 2**63)``.

    Raises
    ------
    InputError
        If a part is not an int, float or str.

    Examples
    --------
    >>> sample_key(1, "a") == sample_key(1, "a")
    True
    >>> sample_key(1) != sample_key(1.0)
    True
    """
    h = hashlib.sha256()
    for part in parts:
        enc = _encode(part)
        h.update(len(enc).to_bytes(8, "little"))
        h.update(enc)
    return int.from_bytes(h.digest()[:8], "little") & _MASK63


class KeyedNoise:
    """Standard normal noise whose row ``b`` depends only on ``(seed, keys[b], draw index)``.

    Parameters
    ----------
    keys
        One int key per sample of the batch (e.g. from :func:`sample_key`).
    seed
        The user's seed.
    shape
        Shape of one sample, e.g. ``(C, H, W)``.
    device, dtype
        Where and in which dtype the noise is returned. It is always drawn on the CPU (float64 for a
        float64 request, float32 otherwise) and then moved, so it is the same on every device.

    Examples
    --------
    >>> a = KeyedNoise([1, 2, 3], seed=0, shape=(1, 4, 4))
    >>> b = KeyedNoise([3], seed=0, shape=(1, 4, 4))
    >>> bool((a(0)[2] == b(0)[0]).all())
    True
    """

    def __init__(
        self,
        keys: Sequence[int],
        *,
        seed: int,
        shape: Sequence[int],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        keys = list(keys)
        if not keys:
            raise InputError("KeyedNoise needs at least one key (one per sample); got an empty sequence.")
        for k in keys:
            if isinstance(k, bool) or not isinstance(k, int):
                raise InputError(
                    "KeyedNoise keys must be ints (e.g. from sample_key(...)), got "
                    f"{type(k).__name__} ({k!r})."
                )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError(f"KeyedNoise seed must be an int, got {type(seed).__name__} ({seed!r}).")
        shape = tuple(int(s) for s in shape)
        if any(s <= 0 for s in shape):
            raise InputError(f"KeyedNoise shape must have positive sizes, got {shape}.")
        if not dtype.is_floating_point:
            raise InputError(f"KeyedNoise dtype must be a floating-point dtype, got {dtype}.")
        self.keys: list[int] = keys
        self.seed = seed
        self.shape: tuple[int, ...] = shape
        self.device = torch.device(device)
        self.dtype = dtype

    @property
    def batch_size(self) -> int:
        """Number of samples (keys)."""
        return len(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __call__(self, i: int) -> Tensor:
        """Return the ``i``-th independent draw, shape ``(B, *shape)``."""
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise InputError(f"The draw index must be a non-negative int, got {i!r}.")
        draw_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        out = torch.empty((len(self.keys), *self.shape), dtype=draw_dtype)
        gen = torch.Generator(device="cpu")
        for b, key in enumerate(self.keys):
            gen.manual_seed(sample_key(self.seed, key, i))
            torch.randn(self.shape, generator=gen, dtype=draw_dtype, out=out[b])
        return out.to(device=self.device, dtype=self.dtype)

    def __repr__(self) -> str:
        return (
            f"KeyedNoise(batch_size={len(self.keys)}, seed={self.seed}, shape={self.shape}, "
            f"device={self.device}, dtype={self.dtype})"
        )
