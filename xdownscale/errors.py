"""Exceptions and warnings raised by xdownscale.

Every error says what is wrong, for which variable, what was expected and how to fix it.
Errors on user input derive from :class:`InputError`, which is also a :class:`ValueError`, so
code that already catches ``ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "ChunkingError",
    "GridMismatchError",
    "InputError",
    "MissingCoordinateError",
    "ModelCardError",
    "ModelNotFoundError",
    "PerformanceWarning",
    "UnitError",
    "WeightsIntegrityError",
    "XDownscaleError",
    "XDownscaleWarning",
]


class XDownscaleError(Exception):
    """Root of every exception raised by xdownscale."""


class InputError(XDownscaleError, ValueError):
    """The data or arguments given by the caller cannot be used as they are."""


class UnitError(InputError):
    """Units are missing, unknown, or not convertible to what is needed."""


class MissingCoordinateError(InputError):
    """A required coordinate (latitude, longitude, time) cannot be found."""


class GridMismatchError(InputError):
    """Two grids do not fit together (no overlap, domain not covered, wrong shape)."""


class ChunkingError(InputError):
    """The dask chunking of an input cannot be used and cannot be fixed automatically."""


class ModelCardError(XDownscaleError, ValueError):
    """A model card is missing fields, has wrong values, or does not match its weights."""


class WeightsIntegrityError(XDownscaleError):
    """A weights file does not match the sha256 recorded in its model card."""


class ModelNotFoundError(XDownscaleError, KeyError):
    """No model of that name or path exists."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class XDownscaleWarning(UserWarning):
    """Root of every warning issued by xdownscale."""


class PerformanceWarning(XDownscaleWarning):
    """The call works but will be slower or use more memory than it could."""
