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

Missing values (masked domains)
-------------------------------
A field with NaN cells (a land or sea mask) has no periodogram of its own: filling the gaps with
the mean leaves sharp land-sea edges whose power swamps the small scales (on the E-OBS Iberia grid,
41 x 61 cells, 43% sea, a bilinear-interpolated field then seems to have 70-80% of E-OBS's power
below 100 km instead of ~1%). By default (``masked="windows"``) such fields get a **prewhitened, tapered
periodogram on all-valid windows**:

1. The valid cells are tiled greedily by the largest all-valid rectangles whose sides are at least
   ``min_window`` cells (:func:`valid_windows`); the windows do not overlap.
2. In each window the field is differenced along x and along y (``dx = x[i, j+1] - x[i, j]``,
   ``dy = x[i+1, j] - x[i, j]``), which flattens red spectra (first differences multiply the
   spectrum by ``4 sin^2(pi k)``) so that little power leaks from large to small scales. Each
   difference field is multiplied by a separable taper ``w`` (Hann by default, never zero on a
   valid cell), placed at its position in the H x W grid and transformed with the same FFT lattice
   as a complete field.
3. At each wavenumber p the estimate of the spectral density is

       S(p) = sum |FFT2(w d)(p)|^2 / sum E_white(p),

   both sums over windows and the two difference directions, where ``E_white(p)`` is the exact
   expectation of ``|FFT2(w d)(p)|^2`` for unit white noise:
   ``sum(w_other^2) * (2 sum(w_along^2) - 2 cos(2 pi p_along) sum(w_along[i] w_along[i+1]))``.
   White noise of variance s^2 therefore gives ``S = s^2`` at every wavenumber, for any mask.
4. ``PSD = S / (H W)`` with **H W the number of cells of the whole grid, masked cells included**
   (``n_cells``): the masked estimate is the PSD that the field would have on the complete grid,
   so ``sigma^2 = n_cells PSD(k)`` maps a PSD value to the noise level on the model's full grid, as
   for complete fields. A window contributes to the bins with ``k >= 1 / min(h, w)`` only (one full
   wave across its short side); bins below that for every window (wavelengths longer than the
   largest window) are NaN: they cannot be measured on the valid cells.

The estimate is unbiased for white noise. For red spectra (power laws k^-2 .. k^-4, on
coastline-shaped masks of 40-60% land) it is within a factor 1.6 of the truth in the first
resolved bin, within 25% from the second on, and within about 20% at wavelengths below a quarter
of the largest window's short side. Fields without any NaN keep the plain periodogram above, and
fields without any valid cell give NaN. ``masked="fill"`` keeps the former estimator for masked
fields (NaN filled with the field mean, the periodogram divided by the valid fraction
``mean(w^2 m)``), e.g. to compare with spectra computed that way.

References
----------
Hess, P., Aich, M., Pan, B., Boers, N. (2024): Fast, scale-adaptive and uncertainty-aware downscaling
of Earth system model fields with generative machine learning, Eq. 8 and section 4.5.

Percival, D. B., Walden, A. T. (1993): Spectral Analysis for Physical Applications, Cambridge
University Press, sections 6.4 (data tapers) and 6.5 (prewhitening).
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
    "drop_wavenumber",
    "fill_nearest",
    "interp_loglog",
    "log_spectral_distance",
    "lowpass_filter",
    "radial_psd",
    "radial_wavenumbers",
    "sigma_at_wavenumber",
    "valid_windows",
    "wavenumber_at_sigma",
]

#: How :func:`radial_psd` treats fields with NaN cells: tapered windows (default) or mean filling.
MASKED_METHODS = ("windows", "fill")
#: Default smallest side, in cells, of an all-valid window of the masked estimator.
MIN_WINDOW = 8
#: Default power ratio (input / target) below which ``scale="auto"`` replaces the input's scales.
POWER_RATIO = 0.5
#: Default largest scale of ``scale="auto"``, in cells of the input grid (wavelength).
MAX_INPUT_CELLS = 4.0

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


def _get_window(window: Any, n: int, *, fftbins: bool) -> np.ndarray:
    try:
        return np.asarray(scipy.signal.get_window(window, n, fftbins=fftbins), dtype=np.float64)
    except (ValueError, TypeError) as err:
        raise InputError(
            f"Unknown window {window!r} for the power spectrum: {err}. Pass None, a name known to "
            "scipy.signal.get_window such as 'hann' or 'blackman', or a tuple such as ('tukey', 0.25)."
        ) from err


def _window_2d(window: Any, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    return np.outer(_get_window(window, h, fftbins=True), _get_window(window, w, fftbins=True))


def _taper(window: Any, n: int) -> np.ndarray:
    """Symmetric taper of ``n`` points that is positive on every point: the inner ``n`` points of
    the ``n + 2``-point window (e.g. Hann: ``sin^2(pi i / (n + 1))``, i = 1 .. n)."""
    return _get_window(window, n + 2, fftbins=False)[1:-1]


def _largest_rectangle(valid: np.ndarray, min_size: int) -> tuple[int, int, int, int] | None:
    """Largest-area all-True rectangle of ``valid`` (H, W) with both sides >= ``min_size``.

    Row by row, the heights of the columns of True cells ending in that row form a histogram; a
    stack finds every maximal rectangle standing on the row (O(H W) in all). The largest rectangle
    obeying the size limit is maximal, so it is among them. Returns (top, left, height, width).
    """
    h, w = valid.shape
    heights = np.zeros(w, dtype=np.int64)
    best: tuple[int, int, int, int] | None = None
    best_area = 0
    for row in range(h):
        heights = np.where(valid[row], heights + 1, 0)
        col_heights = [int(v) for v in heights] + [0]
        stack: list[tuple[int, int]] = []  # (first column, height), heights increasing
        for col, height in enumerate(col_heights):
            start = col
            while stack and stack[-1][1] >= height:
                first, bar = stack.pop()
                width = col - first
                if bar >= min_size and width >= min_size and bar * width > best_area:
                    best_area = bar * width
                    best = (row - bar + 1, first, bar, width)
                start = first
            if not stack or stack[-1][1] < height:
                stack.append((start, height))
    return best


def _check_min_window(min_window: Any) -> int:
    if isinstance(min_window, (bool, np.bool_)) or not isinstance(min_window, (int, np.integer)):
        raise InputError(
            f"min_window must be an integer number of cells >= 2 (the smallest side of an all-valid "
            f"window); got {min_window!r}."
        )
    if min_window < 2:
        raise InputError(
            f"min_window must be >= 2 cells (a window needs two cells to difference); got {min_window}."
        )
    return int(min_window)


def valid_windows(valid: np.ndarray, min_window: int = MIN_WINDOW) -> list[tuple[int, int, int, int]]:
    """Tile the valid cells of a mask with the largest all-valid rectangles.

    Greedy: the largest-area rectangle of valid cells whose sides are both at least ``min_window``
    cells is taken, its cells are removed, and the search is repeated until no such rectangle is
    left. The windows do not overlap.

    Parameters
    ----------
    valid
        Boolean mask of shape (H, W), True on valid cells.
    min_window
        Smallest side of a window in cells, >= 2.

    Returns
    -------
    list of (top, left, height, width)
        Row and column of the upper-left cell (array order) and the size of each window, largest
        area first; empty when no window fits.

    Raises
    ------
    InputError
        ``valid`` is not 2-D, or ``min_window`` is not an integer >= 2.

    Examples
    --------
    >>> valid = np.ones((10, 12), dtype=bool)
    >>> valid[:, 9:] = False
    >>> valid_windows(valid, 4)
    [(0, 0, 10, 9)]
    """
    m = _check_min_window(min_window)
    left = np.array(valid, dtype=bool, copy=True)
    if left.ndim != 2:
        raise InputError(f"valid_windows needs a 2-D mask of shape (H, W); got shape {left.shape}.")
    out: list[tuple[int, int, int, int]] = []
    while True:
        rect = _largest_rectangle(left, m)
        if rect is None:
            return out
        top, first, height, width = rect
        left[top : top + height, first : first + width] = False
        out.append(rect)


def _periodogram_psd(f: np.ndarray, window: Any) -> np.ndarray:
    """The plain (or mean-filled) periodogram of fields (B, H, W) -> radial PSD (B, K)."""
    h, w = f.shape[-2:]
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
    return psd


def _windowed_psd(f: np.ndarray, windows: list[tuple[int, int, int, int]], taper: Any) -> np.ndarray:
    """Prewhitened, tapered periodogram of fields (B, H, W) that share one mask, on the all-valid
    ``windows`` of that mask -> radial PSD (B, K) (see the module docstring)."""
    b, h, w = f.shape
    idx, weight, nbins = _radial_bins((h, w))
    centres = np.concatenate([[np.inf], radial_wavenumbers((h, w))])[idx].reshape(h, w // 2 + 1)
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.rfftfreq(w)[None, :]
    num = np.zeros((b, h, w // 2 + 1))
    den = np.zeros((h, w // 2 + 1))
    for top, first, height, width in windows:
        # bins with at least one full wave across the window's short side (unused coefficients: inf)
        use = centres >= (1.0 - 1e-9) / min(height, width)
        use &= np.isfinite(centres)
        if not use.any():
            continue
        sub = f[:, top : top + height, first : first + width]
        for axis, k_along in ((-1, kx), (-2, ky)):
            d = np.diff(sub, axis=axis)
            ty, tx = _taper(taper, d.shape[-2]), _taper(taper, d.shape[-1])
            g = np.zeros((b, h, w))
            g[:, top : top + d.shape[-2], first : first + d.shape[-1]] = d * np.outer(ty, tx)
            spec = scipy.fft.rfft2(g, axes=(-2, -1))
            num += np.where(use, spec.real**2 + spec.imag**2, 0.0)
            along, other = (tx, ty) if axis == -1 else (ty, tx)
            lag1 = float((along[:-1] * along[1:]).sum())
            white = (other**2).sum() * (2.0 * (along**2).sum() - 2.0 * np.cos(2.0 * np.pi * k_along) * lag1)
            den += np.where(use, white, 0.0)
    used = (den > 0).ravel()
    density = num.reshape(b, -1)[:, used] / den.ravel()[used]
    sums = np.zeros((b, nbins + 1))
    for i in range(b):
        sums[i] = np.bincount(idx[used], weights=density[i] * weight[used], minlength=nbins + 1)
    counts = np.bincount(idx[used], weights=weight[used], minlength=nbins + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        psd = sums[:, 1:] / counts[None, 1:] / float(h * w)
    psd[:, counts[1:] == 0] = np.nan
    return psd


def radial_psd(
    x: np.ndarray,
    *,
    window: Any = None,
    masked: str = "windows",
    min_window: int = MIN_WINDOW,
) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectral density of one or many 2-D fields.

    Parameters
    ----------
    x
        Fields of shape (..., H, W); leading dimensions (time, member, ...) are batched. NaN marks
        missing cells (see the module docstring).
    window
        Complete fields: None (no window), or a window for :func:`scipy.signal.get_window` (e.g.
        ``"hann"``), applied as the outer product of the 1-D windows along y and x; its power loss
        is compensated. Fields with NaN cells and ``masked="windows"``: the taper of each window,
        Hann when None.
    masked
        Estimator for fields with NaN cells: ``"windows"`` (prewhitened, tapered periodogram on the
        largest all-valid rectangles) or ``"fill"`` (NaN filled with the field mean, compensated by
        the valid fraction; the hard mask edges add power at the small scales).
    min_window
        Smallest side, in cells, of an all-valid window (``masked="windows"``), >= 2.

    Returns
    -------
    k : ndarray, shape (K,)
        Bin centres in cycles per grid cell, ``i / min(H, W)`` for ``i = 1 .. min(H, W) // 2``.
    psd : ndarray, shape (..., K)
        Mean of ``|FFT2(x)|^2 / (H W)^2`` over each annulus (float64), or its masked estimate. White
        noise of variance s^2 gives s^2 / (H W) in every bin, masked or not: ``sigma^2 = H W PSD(k)``
        (Hess et al. 2024, Eq. 8) with H W the cells of the whole grid, masked cells included. NaN
        for fields without valid cells and, with ``masked="windows"``, in the bins of wavelengths
        longer than every window.

    Raises
    ------
    InputError
        ``x`` has fewer than two dimensions or a horizontal size below 2; the window or ``masked``
        is unknown; ``min_window`` is not an integer >= 2; a field with NaN cells has no all-valid
        window of ``min_window`` x ``min_window`` cells.

    Examples
    --------
    >>> x = np.random.default_rng(0).normal(0.0, 2.0, (50, 32, 32))
    >>> x[:, :, 20:] = np.nan  # a "sea" strip: windows of at most 32 x 20 cells
    >>> k, p = radial_psd(x)
    >>> bool(np.isnan(p[0, 0])), round(float(np.nanmean(p) * 32 * 32))  # variance 4
    (True, 4)
    """
    x = np.asarray(x)
    if x.ndim < 2 or x.shape[-1] < 2 or x.shape[-2] < 2:
        raise InputError(
            f"The power spectrum needs fields of shape (..., H, W) with H, W >= 2; got shape {x.shape}."
        )
    if masked not in MASKED_METHODS:
        raise InputError(
            f"masked={masked!r} is not an estimator for masked fields; use 'windows' (tapered windows "
            "on the all-valid cells) or 'fill' (NaN filled with the mean)."
        )
    m = _check_min_window(min_window)
    h, w = x.shape[-2:]
    lead = x.shape[:-2]
    f = np.array(x, dtype=np.float64).reshape(-1, h, w)
    valid = np.isfinite(f)
    partial = valid.any(axis=(-2, -1)) & ~valid.all(axis=(-2, -1))
    nbins = min(h, w) // 2
    if masked == "fill" or not partial.any():
        psd = _periodogram_psd(f, window)
    else:
        psd = np.full((f.shape[0], nbins), np.nan)
        rest = ~partial
        if rest.any():
            psd[rest] = _periodogram_psd(f[rest], window)
        where = np.nonzero(partial)[0]
        keys = np.packbits(valid[where].reshape(where.size, -1), axis=1)
        _, inverse = np.unique(keys, axis=0, return_inverse=True)
        inverse = np.asarray(inverse).ravel()
        taper = "hann" if window is None else window
        for group in range(int(inverse.max()) + 1):
            members = where[inverse == group]
            mask = valid[members[0]]
            windows = valid_windows(mask, m)
            if not windows:
                raise InputError(
                    f"A field of shape ({h}, {w}) has {int(mask.sum())} valid cells but no all-valid "
                    f"rectangle of at least {m} x {m} cells, so its power spectrum cannot be estimated "
                    "on windows. Pass a smaller min_window, masked='fill' (mean-filled mask, which "
                    "overstates small-scale power), or fill the gaps first."
                )
            psd[members] = _windowed_psd(f[members], windows, taper)
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


def log_spectral_distance(psd: np.ndarray, reference: np.ndarray) -> tuple[float, float, int]:
    """How far the power spectrum ``psd`` is from ``reference`` (same wavenumbers), over the wavenumbers
    where both are positive and finite.

    Returns
    -------
    tuple
        (RMS of the log power ratio, the largest factor between the two, ``exp(max |log ratio|)``, and the
        index of its wavenumber); (NaN, NaN, -1) where no wavenumber is usable.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.log(np.asarray(psd, dtype=np.float64)) - np.log(np.asarray(reference, np.float64))
    ok = np.isfinite(log_ratio)
    if not ok.any():
        return float("nan"), float("nan"), -1
    worst = int(np.argmax(np.where(ok, np.abs(log_ratio), -np.inf)))
    return float(np.sqrt(np.mean(log_ratio[ok] ** 2))), float(np.exp(abs(log_ratio[worst]))), worst


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


def drop_wavenumber(
    k: np.ndarray,
    psd_fine: np.ndarray,
    psd_coarse: np.ndarray,
    *,
    threshold: float = POWER_RATIO,
    k_min: float | None = None,
    k_max: float | None = None,
) -> float | None:
    """Wavenumber where the coarse spectrum has dropped below ``threshold`` times the fine one.

    The power ratio ``r(k) = psd_coarse / psd_fine`` is interpolated linearly in log(k) - log(r)
    between the bins where both spectra are finite and positive (and held constant beyond them).
    Scanning from ``k_min`` towards small scales up to ``k_max``, the result is the first ``k`` with
    ``r(k) < threshold``, interpolated between the bins around it.

    Parameters
    ----------
    k
        Bin centres (increasing), cycles per grid cell, shape (K,).
    psd_fine, psd_coarse
        Target and input spectra on the same bins, shape (K,), from the same estimator.
    threshold
        Power ratio, > 0; 0.5 is the half-power point (-3 dB), the usual cut-off of a filter.
    k_min, k_max
        Range scanned; default: the first and the last bin where both spectra are usable.

    Returns
    -------
    float or None
        ``k_min`` when ``r(k_min) < threshold`` already, the crossing inside ``(k_min, k_max]``,
        or None when ``r >= threshold`` all the way to ``k_max``.

    Raises
    ------
    InputError
        ``threshold`` is not a positive number, ``k_min > k_max``, or no bin has both spectra finite
        and positive.
    """
    if not (isinstance(threshold, (int, float, np.integer, np.floating)) and np.isfinite(threshold)):
        raise InputError(f"The power-ratio threshold must be a number > 0; got {threshold!r}.")
    if threshold <= 0:
        raise InputError(
            f"The power-ratio threshold must be > 0 (0.5 is the half-power point); got {threshold}."
        )
    k = np.asarray(k, dtype=np.float64)
    a = np.asarray(psd_coarse, dtype=np.float64)
    b = np.asarray(psd_fine, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0) & (k > 0)
    if not ok.any():
        raise InputError(
            "The spectra have no bin where both are finite and positive (constant or all-NaN fields?), "
            "so their power ratio is unknown."
        )
    kk, lr = np.log(k[ok]), np.log(a[ok]) - np.log(b[ok])
    lo = float(np.exp(kk[0])) if k_min is None else float(k_min)
    hi = float(np.exp(kk[-1])) if k_max is None else float(k_max)
    if not (lo > 0 and hi >= lo):
        raise InputError(f"The scanned range must have 0 < k_min <= k_max; got k_min={lo!r}, k_max={hi!r}.")
    inner = kk[(kk > np.log(lo)) & (kk < np.log(hi))]
    points = np.concatenate([[np.log(lo)], inner, [np.log(hi)]])
    ratio = np.interp(points, kk, lr)
    level = float(np.log(threshold))
    below = np.nonzero(ratio < level)[0]
    if below.size == 0:
        return None
    i = int(below[0])
    if i == 0:
        return lo
    t = (ratio[i - 1] - level) / (ratio[i - 1] - ratio[i])
    return float(np.exp(points[i - 1] + t * (points[i] - points[i - 1])))


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
