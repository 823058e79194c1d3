"""Spatial power spectra, spectral low-pass filtering and block averaging on plain numpy arrays.

Only numpy and scipy here; the xarray adapters are in :mod:`xdownscale.xr.spectra`.

Normalisation of the power spectral density (PSD)
-------------------------------------------------
For a field ``x`` of shape (H, W) the field is demeaned, optionally multiplied by a window ``w`` and
transformed; the two-dimensional periodogram is

    P2(kx, ky) = |FFT2(w x)|^2 / (H W)^2 / mean(w^2)

with ``kx = np.fft.fftfreq(W)`` and ``ky = np.fft.fftfreq(H)`` in **cycles per grid cell**
(dimensionless, like the paper's k* = 0.0667). Without a window (w = 1), Parseval gives
``sum(P2) = mean(x^2)``, and white noise of variance s^2 has ``E[P2] = s^2 / (H W)`` at every
(kx, ky); the factor ``1 / mean(w^2)`` keeps that level for any window. The radially averaged PSD
is the *mean* of P2 over the annulus of radial wavenumber ``k = sqrt(kx^2 + ky^2)`` around each
bin centre ``k_i = i / min(H, W)``, i = 1 .. min(H, W) // 2, bin width ``1 / min(H, W)``
(``k = 0`` and the corners beyond ``0.5 + width / 2`` are left out). Hence white noise of variance
s^2 gives a flat PSD at s^2 / (H W), and a noise level sigma corresponds to the wavenumber where

    sigma^2 = N^2 PSD(k),   N^2 = H W  (the number of grid cells)

which is Eq. 8 of Hess et al. (2024) with this normalisation.

Missing values
--------------
NaN cells (a land or sea mask) are filled with the mean of the valid cells of the same field, which
is 0 after demeaning, so they add no power; the periodogram is then divided by ``mean(w^2 m)``
instead of ``mean(w^2)``, where ``m`` is 1 on valid cells and 0 elsewhere. White noise on the valid
cells therefore still maps to s^2 / (H W), and large scales keep their level. The sharp mask edge
leaks some power to the smallest scales (like any mask); fields with no valid cell give NaN.

References
----------
Hess, P., Aich, M., Pan, B., Boers, N. (2024): Fast, scale-adaptive and uncertainty-aware downscaling
of Earth system model fields with generative machine learning, Eq. 8 and section 4.5.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.fft
import scipy.ndimage
import scipy.signal

from ..errors import InputError

__all__ = [
    "block_mean",
    "crossing_wavenumber",
    "fill_nearest",
    "interp_loglog",
    "lowpass_filter",
    "radial_psd",
    "radial_wavenumbers",
    "sigma_at_wavenumber",
    "wavenumber_at_sigma",
]

#: Largest radial wavenumber on a grid (the corner of the spectrum), in cycles per grid cell.
MAX_RADIAL_WAVENUMBER = float(np.sqrt(0.5))


def radial_wavenumbers(shape: tuple[int, int]) -> np.ndarray:
    """Centres of the radial wavenumber bins for a grid of ``shape = (H, W)``.

    Returns
    -------
    ndarray, shape (K,)
        ``i / min(H, W)`` for ``i = 1 .. min(H, W) // 2``, in cycles per grid cell.
    """
    h, w = shape
    n = min(h, w)
    return np.arange(1, n // 2 + 1, dtype=np.float64) / n


def _radial_bins(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, int]:
    """Bin index (0 for "not used") and weight of each rfft2 coefficient, and the number of bins."""
    h, w = shape
    n = min(h, w)
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.rfftfreq(w)[None, :]
    k = np.sqrt(kx**2 + ky**2)
    idx = np.rint(k * n).astype(np.int64)
    nbins = n // 2
    idx[idx > nbins] = 0
    # rfft2 keeps only kx >= 0: every column except kx = 0 (and kx = 0.5 for even W) stands for two
    # coefficients of the full spectrum.
    weight = np.full(k.shape, 2.0)
    weight[:, 0] = 1.0
    if w % 2 == 0:
        weight[:, -1] = 1.0
    return idx.ravel(), weight.ravel(), nbins


def _window_2d(window: Any, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    try:
        wy = scipy.signal.get_window(window, h, fftbins=True)
        wx = scipy.signal.get_window(window, w, fftbins=True)
    except (ValueError, TypeError) as err:
        raise InputError(
            f"Unknown window {window!r} for the power spectrum: {err}. Pass None, a name known to "
            "scipy.signal.get_window such as 'hann' or 'blackman', or a tuple such as ('tukey', 0.25)."
        ) from err
    return np.outer(wy, wx)


def radial_psd(x: np.ndarray, *, window: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectral density of one or many 2-D fields.

    Parameters
    ----------
    x
        Fields of shape (..., H, W); leading dimensions (time, member, ...) are batched. NaN marks
        missing cells (see the module docstring).
    window
        None (no window), or a window for :func:`scipy.signal.get_window` (e.g. ``"hann"``), applied
        as the outer product of the 1-D windows along y and x. Its power loss is compensated.

    Returns
    -------
    k : ndarray, shape (K,)
        Bin centres in cycles per grid cell, ``i / min(H, W)`` for ``i = 1 .. min(H, W) // 2``.
    psd : ndarray, shape (..., K)
        Mean of ``|FFT2(x)|^2 / (H W)^2`` over each annulus (float64). White noise of variance
        s^2 gives s^2 / (H W) in every bin; ``sigma^2 = H W PSD(k)`` (Hess et al. 2024, Eq. 8).

    Raises
    ------
    InputError
        ``x`` has fewer than two dimensions, a horizontal size below 2, or the window is unknown.
    """
    x = np.asarray(x)
    if x.ndim < 2 or x.shape[-1] < 2 or x.shape[-2] < 2:
        raise InputError(
            f"The power spectrum needs fields of shape (..., H, W) with H, W >= 2; got shape {x.shape}."
        )
    h, w = x.shape[-2:]
    lead = x.shape[:-2]
    f = np.array(x, dtype=np.float64).reshape(-1, h, w)
    valid = np.isfinite(f)
    wgt = np.ones((h, w)) if window is None else _window_2d(window, (h, w))
    with np.errstate(invalid="ignore", divide="ignore"):
        count = valid.sum(axis=(-2, -1), keepdims=True)
        mean = np.where(valid, f, 0.0).sum(axis=(-2, -1), keepdims=True) / np.maximum(count, 1)
        f = np.where(valid, f - mean, 0.0) * wgt
        # Power of the window restricted to the valid cells: compensates both window and mask.
        norm = (wgt**2 * valid).mean(axis=(-2, -1))
        spec = scipy.fft.rfft2(f, axes=(-2, -1))
        p2 = (spec.real**2 + spec.imag**2) / float(h * w) ** 2
        idx, weight, nbins = _radial_bins((h, w))
        b = p2.shape[0]
        flat = (idx[None, :] + (nbins + 1) * np.arange(b)[:, None]).ravel()
        sums = np.bincount(
            flat, weights=(p2.reshape(b, -1) * weight[None, :]).ravel(), minlength=b * (nbins + 1)
        )
        counts = np.bincount(idx, weights=weight, minlength=nbins + 1)
        psd = sums.reshape(b, nbins + 1)[:, 1:] / counts[None, 1:]
        psd = psd / norm[:, None]
    psd[norm == 0] = np.nan
    return radial_wavenumbers((h, w)), psd.reshape(*lead, nbins)


def interp_loglog(k0: float | np.ndarray, k: np.ndarray, psd: np.ndarray) -> np.ndarray:
    """Interpolate a spectrum linearly in log(k) - log(PSD), clamped at the end bins.

    Parameters
    ----------
    k0
        Wavenumber(s) to evaluate, cycles per grid cell, > 0.
    k, psd
        Bin centres (increasing) and spectrum values, shape (K,). Non-finite or non-positive values
        are ignored.
    """
    k = np.asarray(k, dtype=np.float64)
    psd = np.asarray(psd, dtype=np.float64)
    ok = np.isfinite(psd) & (psd > 0) & (k > 0)
    if not ok.any():
        return np.full(np.shape(k0), np.nan)
    return np.exp(np.interp(np.log(k0), np.log(k[ok]), np.log(psd[ok])))


def sigma_at_wavenumber(k0: float, k: np.ndarray, psd: np.ndarray, n_cells: int) -> float:
    """Noise level whose white-noise PSD equals the spectrum at ``k0``: ``sqrt(n_cells PSD(k0))``.

    This is Eq. 8 of Hess et al. (2024), ``sigma^2 = N^2 PSD(k)`` with ``N^2 = H W``, for the
    normalisation of :func:`radial_psd`; PSD(k0) is interpolated log-log between bins.
    """
    return float(np.sqrt(n_cells * interp_loglog(k0, k, psd)))


def wavenumber_at_sigma(sigma: float, k: np.ndarray, psd: np.ndarray, n_cells: int) -> float | None:
    """Inverse of :func:`sigma_at_wavenumber`: the first wavenumber, scanning from large scales
    (small k) to small scales, where ``n_cells PSD(k)`` falls to ``sigma^2``.

    Returns None when ``sigma^2`` lies above ``n_cells PSD`` at the first bin or the spectrum never
    falls to it. Between bins the crossing is interpolated linearly in log(k) - log(PSD).
    """
    k = np.asarray(k, dtype=np.float64)
    level = n_cells * np.asarray(psd, dtype=np.float64)
    ok = np.isfinite(level) & (level > 0)
    k, level = k[ok], level[ok]
    target = float(sigma) ** 2
    if k.size == 0 or target > level[0]:
        return None
    below = np.nonzero(level <= target)[0]
    if below.size == 0:
        return None
    i = int(below[0])
    if i == 0:
        return float(k[0])
    la, lb = np.log(level[i - 1]), np.log(level[i])
    t = (la - np.log(target)) / (la - lb) if la != lb else 1.0
    return float(np.exp(np.log(k[i - 1]) + t * (np.log(k[i]) - np.log(k[i - 1]))))


def crossing_wavenumber(k: np.ndarray, psd_fine: np.ndarray, psd_coarse: np.ndarray) -> float | None:
    """Wavenumber where the coarse spectrum first drops below the fine one.

    Scans from large scales (small k) to small scales for the first bin ``i`` with
    ``psd_coarse[i] < psd_fine[i]`` after a bin with ``psd_coarse >= psd_fine``, and interpolates
    the zero of ``log(psd_coarse / psd_fine)`` linearly in log(k) between the two bins. If the
    coarse spectrum lies below the fine one from the first bin on, there is no crossing.

    Returns
    -------
    float or None
        k* in cycles per grid cell, or None when there is no downward crossing.
    """
    k = np.asarray(k, dtype=np.float64)
    a = np.asarray(psd_coarse, dtype=np.float64)
    b = np.asarray(psd_fine, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0)
    k, d = k[ok], np.log(a[ok]) - np.log(b[ok])
    for i in range(1, d.size):
        if d[i - 1] >= 0 > d[i]:
            t = d[i - 1] / (d[i - 1] - d[i])
            return float(np.exp(np.log(k[i - 1]) + t * (np.log(k[i]) - np.log(k[i - 1]))))
    return None


def fill_nearest(x: np.ndarray) -> np.ndarray:
    """Replace NaN cells of each 2-D field in ``x`` (shape (..., H, W)) by the nearest valid cell.

    Fields without any valid cell stay NaN. Fields sharing one mask (a land mask over time) share
    one distance transform.
    """
    x = np.array(x, copy=True)
    nan = ~np.isfinite(x)
    if not nan.any():
        return x
    h, w = x.shape[-2:]
    flat = x.reshape(-1, h, w)
    masks = nan.reshape(-1, h, w)
    cache: dict[bytes, tuple[np.ndarray, np.ndarray] | None] = {}
    for i in range(flat.shape[0]):
        m = masks[i]
        if not m.any():
            continue
        key = np.packbits(m).tobytes()
        if key not in cache:
            if m.all():
                cache[key] = None
            else:
                _, ind = scipy.ndimage.distance_transform_edt(m, return_distances=True, return_indices=True)
                cache[key] = (ind[0], ind[1])
        ind = cache[key]
        if ind is not None:
            flat[i] = flat[i][ind[0], ind[1]]
    return flat.reshape(x.shape)


def lowpass_filter(
    x: np.ndarray, wavenumber: float, *, periodic: tuple[bool, bool] = (False, False)
) -> np.ndarray:
    """Keep the scales with radial wavenumber ``k <= wavenumber`` (cycles per grid cell).

    Parameters
    ----------
    x
        Fields of shape (..., H, W), float. NaN cells are filled with the nearest valid value before
        filtering and are NaN again afterwards.
    wavenumber
        Cut-off in cycles per grid cell, > 0. From ``sqrt(0.5)`` on every scale is kept and the
        input is returned unchanged (as a copy).
    periodic
        Whether the field wraps around along (y, x). A periodic axis is transformed with the FFT
        (exact for periodic signals). A non-periodic axis is transformed with the DCT-II, which is
        the FFT of the field's mirror image appended to itself (even extension): no jump at the
        edges, hence no ringing from the edges. Its frequencies are ``m / (2 n)`` cycles per cell,
        so the cut-off means the same scale on both kinds of axis.

    Returns
    -------
    ndarray
        Same shape and dtype as ``x`` (integers give float64).
    """
    x = np.asarray(x)
    if not np.isfinite(wavenumber) or wavenumber <= 0:
        raise InputError(
            f"The low-pass cut-off must be a wavenumber > 0 in cycles per grid cell; got {wavenumber!r}."
        )
    if x.ndim < 2:
        raise InputError(f"lowpass_filter needs fields of shape (..., H, W); got shape {x.shape}.")
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float64)
    if wavenumber >= MAX_RADIAL_WAVENUMBER:
        return np.array(x, dtype=dtype, copy=True)
    h, w = x.shape[-2:]
    nan = ~np.isfinite(x)
    f = np.asarray(x, dtype=np.float64)
    if nan.any():
        f = fill_nearest(f)
        f = np.where(np.isfinite(f), f, 0.0)
    per_y, per_x = periodic
    # forward transforms, axis by axis
    if per_x:
        spec = scipy.fft.rfft(f, axis=-1)
        kx = np.fft.rfftfreq(w)
    else:
        spec = scipy.fft.dct(f, type=2, axis=-1, norm="ortho")
        kx = np.arange(w) / (2.0 * w)
    if per_y:
        spec = scipy.fft.fft(spec, axis=-2)
        ky = np.fft.fftfreq(h)
    else:
        spec = scipy.fft.dct(spec, type=2, axis=-2, norm="ortho")
        ky = np.arange(h) / (2.0 * h)
    keep = np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2) <= wavenumber * (1 + 1e-12)
    spec = spec * keep
    if per_y:
        spec = scipy.fft.ifft(spec, axis=-2)
    else:
        spec = scipy.fft.idct(spec, type=2, axis=-2, norm="ortho")
    if per_x:
        out = scipy.fft.irfft(spec, n=w, axis=-1)
    else:
        out = scipy.fft.idct(spec, type=2, axis=-1, norm="ortho")
    out = np.real(out)
    out[nan] = np.nan
    return out.astype(dtype, copy=False)


def block_mean(x: np.ndarray, factor: int) -> np.ndarray:
    """Average over ``factor x factor`` blocks of the last two axes, ignoring NaN.

    Parameters
    ----------
    x
        Array of shape (..., H, W).
    factor
        Block size, an integer >= 1. Trailing rows and columns that do not fill a whole block are
        dropped: the result has shape (..., H // factor, W // factor).

    Returns
    -------
    ndarray
        Mean of the valid cells in each block (NaN where a block has none). Floating dtypes are
        kept; other dtypes give float64.

    Raises
    ------
    InputError
        ``factor`` is not an integer >= 1, or larger than the grid.
    """
    x = np.asarray(x)
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise InputError(f"The block size must be an integer >= 1; got {factor!r}.")
    factor = int(factor)
    if x.ndim < 2:
        raise InputError(f"block_mean needs an array of shape (..., H, W); got shape {x.shape}.")
    h, w = x.shape[-2:]
    if factor > min(h, w):
        raise InputError(
            f"The block size {factor} is larger than the grid ({h} x {w}); use a factor <= {min(h, w)}."
        )
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float64)
    ho, wo = h // factor, w // factor
    blocks = np.asarray(x[..., : ho * factor, : wo * factor], dtype=np.float64)
    blocks = blocks.reshape(*x.shape[:-2], ho, factor, wo, factor)
    valid = np.isfinite(blocks)
    total = np.where(valid, blocks, 0.0).sum(axis=(-3, -1))
    count = valid.sum(axis=(-3, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return out.astype(dtype, copy=False)
