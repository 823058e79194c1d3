"""Pointwise variable transforms on plain numpy arrays: log transform and min-max scaling.

Hess et al. (2024, section 4.1) train and sample in a transformed space:

    x~ = log(x + eps) - log(eps) = log1p(x / eps)          (precipitation; eps = 1e-4 in data units)
    y  = 2 (x~ - lo) / (hi - lo) - 1                          (about [-1, 1])

with ``lo``/``hi`` the minimum and maximum of x~ over the training data. ``log1p``/``expm1`` are used
because they are exact near 0 where ``log(x + eps) - log(eps)`` loses digits. For variables that
are not log-transformed (temperature) x~ = x. The functions here compute in float64; the dtype
handling and the class live in :mod:`xdownscale.transforms`.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

__all__ = [
    "COHERENT_MAX",
    "HOLE",
    "SPECK",
    "WET_TOLERANCE",
    "check_eps",
    "log_forward",
    "log_inverse",
    "minmax_forward",
    "minmax_inverse",
    "speck_counts",
]


#: relative tolerance below a dry threshold ``wet_min`` under which a value counts as dry, so that
#: ``wet_min`` itself survives a float32 round trip through the transform
WET_TOLERANCE = 1e-5

#: a wet cell with at most this share of its valid neighbours (of 8) wet is a *speck* ...
SPECK = (3, 8)
#: ... and a dry cell with at least this share of them wet a *hole*. The pair was chosen on the
#: validation winter 1996/97 and 180 training days of E-OBS (1 degree perfect model, see
#: benchmarks/diagnose_spectrum.py) among (0-3)/8 and (6-8)/8, of those that change an E-OBS field itself
#: by under 0.002 mm/day and 3% of its power: the lowest CRPS, log-spectral distance and largest spectral
#: factor on both. (A 3 x 3 majority vote did better on those days but trims the tips of real rain
#: areas: E-OBS fields changed by 0.011 mm/day, their power at 50 km by 1.4x.)
HOLE = (7, 8)
#: largest share of specks and holes among its wet cells at which a model's training data count as
#: coherent, so that ``preserve`` removes them from its output and lets its rain recede from dry input
#: cells (E-OBS at 0.25 deg: 0.9%; at 0.5 deg: 2.0%; a thresholded random field of spectral slope 3: 15%,
#: where single wet cells are real)
COHERENT_MAX = 0.03


def speck_counts(fields: np.ndarray, wet_min: float) -> tuple[int, int]:
    """(specks and holes, wet cells) of ``fields`` (..., rows, columns; NaN = not valid): wet means at
    least ``wet_min``; a speck is a wet cell with at most :data:`SPECK` of its valid neighbours wet, a
    hole a dry valid cell with at least :data:`HOLE` of them wet (cells without valid neighbours are
    neither)."""
    from scipy import ndimage

    x = np.asarray(fields, dtype=np.float64)
    x = x.reshape(-1, *x.shape[-2:])
    around = np.zeros((1, 3, 3))
    around[0] = 1.0
    around[0, 1, 1] = 0.0
    valid = np.isfinite(x)
    wet = valid & (np.nan_to_num(x) >= wet_min * (1.0 - WET_TOLERANCE))
    count = ndimage.convolve(wet.astype(np.float64), around, mode="constant")
    neighbours = ndimage.convolve(valid.astype(np.float64), around, mode="constant")
    some = valid & (neighbours > 0)
    speck = some & wet & (SPECK[1] * count <= SPECK[0] * neighbours)
    hole = some & ~wet & (HOLE[1] * count >= HOLE[0] * neighbours)
    return int(speck.sum() + hole.sum()), int(wet.sum())


def check_eps(eps: float) -> float:
    """Return ``eps`` as a float after checking it is finite and > 0.

    Raises
    ------
    InputError
        ``eps`` is not a positive finite number.
    """
    try:
        e = float(eps)
    except (TypeError, ValueError) as err:
        raise InputError(f"eps must be a positive number in the data's units; got {eps!r}.") from err
    if not (np.isfinite(e) and e > 0):
        raise InputError(
            f"eps must be a positive number in the data's units (e.g. 1e-4 mm/day); got {eps!r}. "
            "It is the offset in log(x + eps) that keeps zero precipitation finite."
        )
    return e


def log_forward(x: np.ndarray, eps: float) -> np.ndarray:
    """``x~ = log(x + eps) - log(eps)`` computed as ``log1p(x / eps)``, float64.

    Values in [-eps, 0) (round-off of regridding or bias correction) are treated as 0; NaN stays
    NaN. Values below -eps are the caller's to reject (they give NaN here).
    """
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.log1p(np.where(x < 0, np.where(x >= -eps, 0.0, np.nan), x) / eps)


def log_inverse(xt: np.ndarray, eps: float) -> np.ndarray:
    """Inverse of :func:`log_forward`: ``eps * expm1(x~)``, clipped at 0 (float64; NaN stays NaN)."""
    xt = np.asarray(xt, dtype=np.float64)
    with np.errstate(over="ignore"):
        return np.maximum(eps * np.expm1(xt), 0.0)


def minmax_forward(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``2 (x - lo) / (hi - lo) - 1``: maps [lo, hi] onto [-1, 1] (float64)."""
    return 2.0 * (np.asarray(x, dtype=np.float64) - lo) / (hi - lo) - 1.0


def minmax_inverse(y: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Inverse of :func:`minmax_forward`: ``(y + 1) (hi - lo) / 2 + lo`` (float64)."""
    return (np.asarray(y, dtype=np.float64) + 1.0) * ((hi - lo) / 2.0) + lo
