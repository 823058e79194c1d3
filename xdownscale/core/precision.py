"""The numeric precisions a network runs in (for inference and training), without importing torch.

``"auto"`` resolves to bfloat16 autocast where it is fast (CUDA, CPUs with native bf16) and float32
elsewhere; :func:`xdownscale.models.inference.resolve_precision` decides on the device.
"""

from __future__ import annotations

from ..errors import InputError

__all__ = ["PRECISIONS", "check_precision"]

PRECISIONS = ("auto", "fp32", "bf16")


def check_precision(precision: object) -> None:
    """Raise :class:`~xdownscale.errors.InputError` unless ``precision`` is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise InputError(
            f"precision={precision!r}: expected one of {', '.join(map(repr, PRECISIONS))} "
            "('auto' picks bf16 where it is fast)."
        )
