"""Power spectra, scale selection, low-pass filtering and block averaging of DataArrays.

The numerics live in :mod:`xdownscale.core.spectra`; this module finds the horizontal grid the CF
way (:func:`xdownscale.xr.cf.find_grid`), maps them over every other dimension (time, member, ...)
with :func:`xarray.apply_ufunc` (lazy on dask: each 2-D field must be one chunk, and is rechunked
with a :class:`~xdownscale.errors.PerformanceWarning` if it is not), and keeps coordinates and
attributes.

PSD normalisation
-----------------
For each field of shape (H, W): demean, optional window, ``P2 = |FFT2(x)|^2 / (H W)^2`` (so that
``sum(P2) = mean(x^2)``), then the mean of P2 over annuli of radial wavenumber
``k = sqrt(kx^2 + ky^2)`` in cycles per grid cell (``np.fft.fftfreq``), bin centres
``i / min(H, W)`` up to 0.5. White noise of variance s^2 gives a flat PSD at ``s^2 / (H W)``, so the
noise level that erases the scales up to wavenumber k is

    sigma^2 = N^2 PSD(k),  N^2 = H W = ``psd.attrs["n_cells"]``

(Hess et al. 2024, Eq. 8). Windows are power-compensated.

Masked domains
--------------
Fields with NaN cells (sea in station-based products, a model's mask) get, by default
(``masked="windows"``), a prewhitened, tapered periodogram on the largest all-valid rectangles of
the grid (see :mod:`xdownscale.core.spectra`): no land-sea edge enters the transform, so the small
scales are seen as they are. It estimates the PSD the field would have on the complete grid:
``n_cells`` stays H W, the cells of the whole grid with the masked ones, and white noise of variance
s^2 on the valid cells still gives ``s^2 / n_cells``, i.e. ``sigma^2 = n_cells PSD(k)`` is the noise
level on the model's full grid. Wavelengths longer than every window are NaN. ``masked="fill"``
gives the former estimator (mean-filled NaN, hard edges). The attribute ``masked`` records the
choice; spectra compared with each other (scale selection) must share it.

Scale selection is meant for fields in the model's *transformed* space (after
:class:`LogNormalize`), where the model's noise level sigma lives; see :func:`select_scale`.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import xarray as xr

from ..core import spectra as _core
from ..errors import GridMismatchError, InputError, PerformanceWarning
from .cf import Grid, find_grid, grid_spacing_km

__all__ = ["Scale", "lowpass", "masked_estimator", "psd", "select_scale", "upscale"]

NORMALISATION = (
    "PSD(k) is the mean over the annulus around k of |FFT2(x - mean(x))|^2 / (H*W)^2 with k = "
    "sqrt(kx^2 + ky^2) in cycles per grid cell; white noise of variance s^2 gives s^2 / (H*W) = "
    "s^2 / n_cells, so sigma^2 = n_cells * PSD(k) (Hess et al. 2024, Eq. 8). Fields with NaN cells: "
    "the estimate of that PSD on the complete grid (n_cells = H*W includes the masked cells), see "
    "the attribute 'masked'."
)
#: Value of the ``masked`` attribute assumed for spectra that lack it (made before it existed).
LEGACY_MASKED = "fill"


def _label(da: xr.DataArray) -> str:
    return f"'{da.name}'" if da.name is not None else "the input"


def _one_field_per_chunk(da: xr.DataArray, grid: Grid, what: str) -> xr.DataArray:
    """Rechunk so that each 2-D field is one dask chunk, with a PerformanceWarning."""
    if da.chunks is None:
        return da
    chunks = dict(zip(da.dims, da.chunks, strict=True))
    if len(chunks[grid.ydim]) > 1 or len(chunks[grid.xdim]) > 1:
        warnings.warn(
            f"{what} needs each 2-D field of {_label(da)} in one dask chunk, but it is chunked along "
            f"'{grid.ydim}' ({len(chunks[grid.ydim])} chunks) and '{grid.xdim}' "
            f"({len(chunks[grid.xdim])} chunks); rechunking to one chunk along both. Chunk along the "
            f"other dimensions instead, e.g. da.chunk({{'{grid.ydim}': -1, '{grid.xdim}': -1}}).",
            PerformanceWarning,
            stacklevel=3,
        )
        da = da.chunk({grid.ydim: -1, grid.xdim: -1})
    return da


def _squared_units(units: Any) -> str:
    if units is None or str(units).strip() in ("", "1", "dimensionless"):
        return "1"
    return f"({str(units).strip()})**2"


def psd(
    da: xr.DataArray,
    *,
    window: Any = None,
    masked: str = "windows",
    min_window: int = _core.MIN_WINDOW,
) -> xr.DataArray:
    """Radially averaged power spectral density of each 2-D field of ``da``.

    Parameters
    ----------
    da
        Field with latitude/longitude found by :func:`xdownscale.xr.cf.find_grid`; any other
        dimensions (time, member, ...) are kept. NaN cells are allowed (land or sea masks).
    window
        None, or a window name for :func:`scipy.signal.get_window` such as ``"hann"`` (useful on
        regional, non-periodic grids); its power loss is compensated. On fields with NaN cells and
        ``masked="windows"`` it is the taper of each all-valid window (None: Hann).
    masked
        Estimator for fields with NaN cells: ``"windows"`` (default; prewhitened, tapered
        periodogram on the largest all-valid rectangles, right at small scales) or ``"fill"`` (the
        mean-filled periodogram, whose land-sea edges overstate the small scales). Fields without
        NaN get the plain periodogram either way.
    min_window
        Smallest side, in cells, of an all-valid window (``masked="windows"``).

    Returns
    -------
    DataArray
        Dims ``(..., "wavenumber")``; coords ``wavenumber`` (cycles per grid cell) and
        ``wavelength_km`` (``spacing_km / wavenumber``); attrs ``n_cells`` (H*W, masked cells
        included), ``spacing_km`` (``sqrt(dy_km * dx_km)``, x spacing scaled by cos(latitude)),
        ``normalisation``, ``window``, ``masked`` (the estimator for fields with NaN cells, or
        ``"none"`` when ``da`` is in memory without NaN) and ``units`` (the squared data units, or "1").
        With ``masked="windows"``, bins of wavelengths longer than every all-valid window are NaN.
        Lazy when ``da`` is.

    Raises
    ------
    InputError
        Fewer than 2 x 2 cells, an unknown ``window`` or ``masked``, or a field with NaN cells that
        has no all-valid window of ``min_window`` x ``min_window`` cells (raised on compute for
        lazy input).

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> rng = np.random.default_rng(0)
    >>> da = xr.DataArray(rng.normal(size=(64, 64)), dims=("lat", "lon"),
    ...                   coords={"lat": np.linspace(-10, 10, 64), "lon": np.linspace(0, 20, 64)})
    >>> p = psd(da)
    >>> p.sizes["wavenumber"], p.attrs["n_cells"]
    (32, 4096)
    """
    grid = find_grid(da)
    h, w = grid.shape(da)
    if h < 2 or w < 2:
        raise InputError(f"The power spectrum of {_label(da)} needs at least 2 x 2 cells; got {h} x {w}.")
    dy, dx = grid_spacing_km(da, grid)
    spacing = float(math.sqrt(dy * dx)) if np.isfinite(dy * dx) and dy * dx > 0 else float("nan")
    if masked not in _core.MASKED_METHODS:
        raise InputError(
            f"masked={masked!r} is not an estimator for masked fields; use 'windows' (tapered windows "
            "on the all-valid cells) or 'fill' (NaN filled with the mean)."
        )
    k = _core.radial_wavenumbers((h, w))
    if window is not None:
        _core.radial_psd(np.zeros((2, 2)), window=window)  # unknown windows fail now, not on compute
    da = _one_field_per_chunk(da, grid, "The power spectrum")

    def _func(x: np.ndarray) -> np.ndarray:
        return _core.radial_psd(x, window=window, masked=masked, min_window=min_window)[1]

    out = xr.apply_ufunc(
        _func,
        da,
        input_core_dims=[[grid.ydim, grid.xdim]],
        output_core_dims=[["wavenumber"]],
        dask="parallelized",
        output_dtypes=[np.float64],
        dask_gufunc_kwargs={"output_sizes": {"wavenumber": k.size}},
        keep_attrs=False,
    )
    out = out.assign_coords(
        wavenumber=("wavenumber", k, {"units": "1", "long_name": "radial wavenumber (cycles per grid cell)"}),
        wavelength_km=("wavenumber", spacing / k, {"units": "km", "long_name": "wavelength"}),
    )
    out.name = f"psd_{da.name}" if da.name is not None else "psd"
    out.attrs = {
        "long_name": "radially averaged power spectral density",
        "units": _squared_units(da.attrs.get("units")),
        "n_cells": int(h * w),
        "spacing_km": spacing,
        "normalisation": NORMALISATION,
        "window": "none" if window is None else str(window),
        "masked": masked if _may_have_nan(da) else "none",
    }
    return out


def _may_have_nan(da: xr.DataArray) -> bool:
    """False only for in-memory data known to have no NaN (lazy data is not computed to find out)."""
    if da.chunks is not None:
        return True
    if not np.issubdtype(da.dtype, np.floating):
        return False
    return bool(np.isnan(da.values).any())


def _reference(psd: Any, what: str = "psd") -> tuple[np.ndarray, np.ndarray, int, float | None]:
    """(k, mean spectrum, n_cells, spacing_km) of a PSD DataArray made by :func:`psd`."""
    if not isinstance(psd, xr.DataArray) or "wavenumber" not in psd.dims:
        raise InputError(
            f"{what} must be a power spectrum as returned by xdownscale.xr.spectra.psd(da) (a DataArray "
            f"with a 'wavenumber' dimension); got {type(psd).__name__}"
            + (f" with dims {tuple(map(str, psd.dims))}" if isinstance(psd, xr.DataArray) else "")
            + "."
        )
    if "n_cells" not in psd.attrs:
        raise InputError(
            f"{what} has no attribute 'n_cells' (the number of grid cells H*W), needed for "
            "sigma^2 = n_cells * PSD(k). Compute it with xdownscale.xr.spectra.psd(da), which sets it."
        )
    other = [d for d in psd.dims if d != "wavenumber"]
    curve = psd.mean(other, skipna=True) if other else psd
    k = np.asarray(psd["wavenumber"].values, dtype=np.float64)
    values = np.asarray(curve.transpose("wavenumber").values, dtype=np.float64)
    spacing = psd.attrs.get("spacing_km")
    spacing_f = float(spacing) if spacing is not None and np.isfinite(float(spacing)) else None
    return k, values, int(psd.attrs["n_cells"]), spacing_f


def _check_within_domain(k: float, kk: np.ndarray, spacing: float | None) -> None:
    """Refuse a wavenumber below the reference spectrum's lowest bin: a wavelength longer than the
    domain, where every larger scale would get the same (largest) noise level."""
    positive = kk[kk > 0]
    if positive.size == 0 or k >= positive[0] * (1 - 1e-9):
        return
    k_min = float(positive[0])
    if spacing is None:
        what, largest = f"wavenumber {k:g} cycles per cell", f"wavenumber {k_min:.4g}"
    else:
        what, largest = f"A scale of {spacing / k:.4g} km", f"{spacing / k_min:.4g} km"
    raise InputError(
        f"{what[0].upper()}{what[1:]} is larger than the domain of the reference spectrum: its longest "
        f"wavelength is {largest} ({1 / k_min:.0f} grid cells). Pass a scale of at most {largest}, or "
        "sigma=... to give the noise level directly."
    )


def _check_wavenumber(k: Any) -> float:
    try:
        kf = float(k)
    except (TypeError, ValueError) as err:
        raise InputError(f"A wavenumber must be a number in cycles per grid cell; got {k!r}.") from err
    if not (np.isfinite(kf) and 0 < kf <= 0.5):
        raise InputError(
            f"Wavenumber {kf!r} is outside the valid range (0, 0.5] cycles per grid cell "
            "(0.5 is the grid's Nyquist wavenumber, a wavelength of two cells). For a scale in km "
            "pass e.g. '150 km'."
        )
    return kf


def _check_spacing(spacing_km: Any) -> float | None:
    if spacing_km is None:
        return None
    s = float(spacing_km)
    if not (np.isfinite(s) and s > 0):
        raise InputError(f"spacing_km must be a positive grid spacing in km; got {spacing_km!r}.")
    return s


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_KM = re.compile(rf"^\s*({_NUMBER})\s*(?:km|kilometers?|kilometres?)\s*$", re.IGNORECASE)
_SIGMA = re.compile(rf"^\s*(?:sigma|σ)\s*=\s*({_NUMBER})\s*$", re.IGNORECASE)
_WAVENUMBER = re.compile(rf"^\s*(?:(?:k|wavenumber)\s*=\s*)?({_NUMBER})\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Scale:
    """The spatial scale up to which a coarse field's patterns are kept when downscaling.

    A scale is a radial wavenumber in cycles per grid cell of the fine (model) grid, its wavelength
    in km, and the noise standard deviation ``sigma`` that erases the patterns below it in the
    model's transformed space, linked by ``sigma^2 = n_cells * PSD(k)`` (Hess et al. 2024, Eq. 8)
    through a reference power spectrum of the fine target data (:func:`psd`).

    Attributes
    ----------
    wavenumber
        Cycles per grid cell in (0, 0.5]; None for a scale given only as a noise level.
    wavelength_km
        ``spacing_km / wavenumber``; None where the grid spacing is not known.
    sigma
        Noise standard deviation in the model's transformed space; None until a reference PSD is
        given (:meth:`with_psd`).

    Examples
    --------
    >>> Scale.parse("0.0667")
    Scale(wavenumber=0.0667, wavelength_km=None, sigma=None)
    >>> Scale.parse("150 km", spacing_km=25.0).wavenumber
    0.16666666666666666
    """

    wavenumber: float | None
    wavelength_km: float | None = None
    sigma: float | None = None

    def __post_init__(self) -> None:
        if self.wavenumber is None and self.sigma is None:
            raise InputError(
                "A Scale needs a wavenumber or a sigma (or both); got neither. Use Scale.parse('150 km'), "
                "Scale.from_wavenumber(0.0667) or Scale.from_sigma(0.47, psd=...)."
            )
        if self.wavenumber is not None:
            object.__setattr__(self, "wavenumber", _check_wavenumber(self.wavenumber))
        if self.wavelength_km is not None:
            km = float(self.wavelength_km)
            if not (np.isfinite(km) and km > 0):
                raise InputError(
                    f"wavelength_km must be a positive number of km; got {self.wavelength_km!r}."
                )
            object.__setattr__(self, "wavelength_km", km)
        if self.sigma is not None:
            s = float(self.sigma)
            if not (np.isfinite(s) and s > 0):
                raise InputError(f"sigma must be a positive noise standard deviation; got {self.sigma!r}.")
            object.__setattr__(self, "sigma", s)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_wavenumber(
        cls, k: float, *, psd: xr.DataArray | None = None, spacing_km: float | None = None
    ) -> Scale:
        """Scale at wavenumber ``k`` (cycles per grid cell, in (0, 0.5]).

        ``sigma`` is filled when ``psd`` is given, ``wavelength_km`` when ``spacing_km`` or ``psd``
        (its ``spacing_km`` attribute) is given.

        Raises
        ------
        InputError
            ``k`` is outside (0, 0.5], or below the lowest wavenumber of ``psd`` (a scale larger
            than the domain the spectrum was computed on).
        """
        kf = _check_wavenumber(k)
        spacing = _check_spacing(spacing_km)
        sigma = None
        if psd is not None:
            kk, curve, n_cells, ref_spacing = _reference(psd)
            spacing = spacing if spacing is not None else ref_spacing
            _check_within_domain(kf, kk, spacing)
            sigma = _core.sigma_at_wavenumber(kf, kk, curve, n_cells)
            if not np.isfinite(sigma) or sigma <= 0:
                raise InputError(
                    f"The reference PSD has no finite positive value near wavenumber {kf}: cannot "
                    "compute sigma. Check that the field it was computed from is not constant or all NaN."
                )
        return cls(kf, None if spacing is None else spacing / kf, sigma)

    @classmethod
    def from_km(cls, km: float, *, psd: xr.DataArray | None = None, spacing_km: float | None = None) -> Scale:
        """Scale with wavelength ``km`` kilometres on a grid of spacing ``spacing_km`` (or the
        ``spacing_km`` attribute of ``psd``): ``wavenumber = spacing_km / km``.

        Raises
        ------
        InputError
            No grid spacing is known, or ``km`` is below two grid cells.
        """
        try:
            kmf = float(km)
        except (TypeError, ValueError) as err:
            raise InputError(f"A wavelength must be a number of km; got {km!r}.") from err
        spacing = _check_spacing(spacing_km)
        if spacing is None and psd is not None:
            spacing = _reference(psd)[3]
        if spacing is None:
            raise InputError(
                f"Cannot turn {kmf:g} km into a wavenumber without the grid spacing: pass spacing_km= or "
                "psd= (a power spectrum from xdownscale.xr.spectra.psd, which records it)."
            )
        if not (np.isfinite(kmf) and kmf >= 2 * spacing * (1 - 1e-9)):
            raise InputError(
                f"A scale of {kmf:g} km is below two grid cells: the grid spacing is {spacing:.4g} km, so "
                f"valid scales are >= {2 * spacing:.4g} km (wavenumber <= 0.5 cycles per cell)."
            )
        kf = min(spacing / kmf, 0.5)
        sigma = None
        if psd is not None:
            kk, curve, n_cells, _ = _reference(psd)
            _check_within_domain(kf, kk, spacing)
            sigma = _core.sigma_at_wavenumber(kf, kk, curve, n_cells)
        return cls(kf, kmf, sigma)

    @classmethod
    def from_sigma(cls, sigma: float, *, psd: xr.DataArray) -> Scale:
        """Scale whose noise level is ``sigma``: the first wavenumber, from large scales to small,
        where ``n_cells * PSD(k)`` of the reference spectrum falls to ``sigma^2``.

        Raises
        ------
        InputError
            ``sigma`` is not positive or outside the range covered by ``psd``.
        """
        try:
            s = float(sigma)
        except (TypeError, ValueError) as err:
            raise InputError(f"sigma must be a number; got {sigma!r}.") from err
        if not (np.isfinite(s) and s > 0):
            raise InputError(f"sigma must be a positive noise standard deviation; got {sigma!r}.")
        kk, curve, n_cells, spacing = _reference(psd)
        kf = _core.wavenumber_at_sigma(s, kk, curve, n_cells)
        if kf is None:
            level = n_cells * curve[np.isfinite(curve) & (curve > 0)]
            if level.size == 0:
                raise InputError("The reference PSD has no finite positive values; cannot locate sigma.")
            raise InputError(
                f"sigma={s:g} is outside the range of the reference PSD: sqrt(n_cells * PSD(k)) goes from "
                f"{math.sqrt(level[0]):.4g} at the largest scale (k={kk[0]:.4g}) down to "
                f"{math.sqrt(level.min()):.4g}, so valid values are in [{math.sqrt(level.min()):.4g}, "
                f"{math.sqrt(level[0]):.4g}]. Pass a sigma in that range, or a scale in km or a wavenumber."
            )
        kf = min(max(kf, 1e-12), 0.5)
        return cls(kf, None if spacing is None else spacing / kf, s)

    @classmethod
    def parse(cls, value: Any, *, psd: xr.DataArray | None = None, spacing_km: float | None = None) -> Scale:
        """Read a scale from a :class:`Scale`, a mapping (:meth:`to_dict`), a float wavenumber, or a
        string: ``"150 km"`` / ``"150km"``, ``"0.0667"`` or ``"k=0.0667"`` (wavenumber), ``"sigma=0.47"``.

        With ``psd``, missing fields (sigma, wavenumber, wavelength) are filled from it. A scale
        given as sigma without ``psd`` keeps ``wavenumber=None``.

        Raises
        ------
        InputError
            The value cannot be read, or is out of range (see the constructors).
        """
        if isinstance(value, Scale):
            scale = value
            if psd is not None and (scale.sigma is None or scale.wavenumber is None):
                scale = scale.with_psd(psd)
            if scale.wavelength_km is None and scale.wavenumber is not None:
                spacing = _check_spacing(spacing_km)
                if spacing is None and psd is not None:
                    spacing = _reference(psd)[3]
                if spacing is not None:
                    scale = cls(scale.wavenumber, spacing / scale.wavenumber, scale.sigma)
            return scale
        if isinstance(value, Mapping):
            return cls.parse(cls.from_dict(value), psd=psd, spacing_km=spacing_km)
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
            value, (bool, np.bool_)
        ):
            return cls.from_wavenumber(float(value), psd=psd, spacing_km=spacing_km)
        if isinstance(value, str):
            if m := _KM.match(value):
                return cls.from_km(float(m.group(1)), psd=psd, spacing_km=spacing_km)
            if m := _SIGMA.match(value):
                s = float(m.group(1))
                if psd is not None:
                    return cls.from_sigma(s, psd=psd)
                return cls(None, None, s)
            if m := _WAVENUMBER.match(value):
                return cls.from_wavenumber(float(m.group(1)), psd=psd, spacing_km=spacing_km)
            hint = ""
            if value.strip().lower() == "auto":
                hint = " 'auto' is resolved from two power spectra with select_scale(psd_fine, psd_coarse)."
            raise InputError(
                f"Cannot read the scale {value!r}. Expected a wavelength like '150 km', a wavenumber in "
                f"cycles per grid cell in (0, 0.5] like '0.0667', or a noise level like 'sigma=0.47'.{hint}"
            )
        raise InputError(
            f"Cannot read a scale from {type(value).__name__} {value!r}; pass a Scale, a float wavenumber "
            "or a string such as '150 km', '0.0667' or 'sigma=0.47'."
        )

    # ------------------------------------------------------------------ conversions
    def with_psd(self, psd: xr.DataArray) -> Scale:
        """The same scale with ``sigma`` (and ``wavelength_km``) computed from the reference ``psd``.

        A scale known only by its sigma gets its wavenumber from the PSD instead.
        """
        if self.wavenumber is None:
            assert self.sigma is not None  # guaranteed by __post_init__
            return Scale.from_sigma(self.sigma, psd=psd)
        scale = Scale.from_wavenumber(self.wavenumber, psd=psd)
        if scale.wavelength_km is None and self.wavelength_km is not None:
            scale = Scale(scale.wavenumber, self.wavelength_km, scale.sigma)
        return scale

    def to_dict(self) -> dict[str, float | None]:
        """JSON-serialisable dict of the three fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Scale:
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        InputError
            Unknown keys or invalid values.
        """
        if not isinstance(d, Mapping):
            raise InputError(f"Scale.from_dict needs a mapping; got {type(d).__name__}.")
        unknown = set(d) - {"wavenumber", "wavelength_km", "sigma"}
        if unknown:
            raise InputError(
                f"Unknown keys {sorted(unknown)} for a Scale; expected 'wavenumber', 'wavelength_km' "
                "and 'sigma'."
            )
        return cls(d.get("wavenumber"), d.get("wavelength_km"), d.get("sigma"))

    def __str__(self) -> str:
        parts = []
        if self.wavenumber is not None:
            parts.append(f"k={self.wavenumber:.4g} cycles/cell")
        if self.wavelength_km is not None:
            parts.append(f"{self.wavelength_km:.4g} km")
        if self.sigma is not None:
            parts.append(f"sigma={self.sigma:.4g}")
        return "Scale(" + ", ".join(parts) + ")"


def _masked_method(psd: xr.DataArray) -> str:
    """How a spectrum treated masked fields: its ``masked`` attribute, ``"fill"`` for older spectra."""
    return str(psd.attrs.get("masked", LEGACY_MASKED))


def masked_estimator(psd: xr.DataArray) -> str:
    """The ``masked=`` argument of :func:`psd` that gives spectra comparable with ``psd``.

    Its ``masked`` attribute; ``"fill"`` for spectra made before the attribute existed (e.g. the
    target spectrum of an older model card); ``"windows"`` where ``psd`` came from fields without NaN
    (``"none"``), for which both estimators coincide.

    Examples
    --------
    >>> masked_estimator(xr.DataArray([1.0], dims="wavenumber", attrs={"masked": "windows"}))
    'windows'
    >>> masked_estimator(xr.DataArray([1.0], dims="wavenumber"))
    'fill'
    """
    method = _masked_method(psd)
    return "windows" if method == "none" else method


def select_scale(
    psd_fine: xr.DataArray,
    psd_coarse: xr.DataArray,
    *,
    input_wavenumber: float | None = None,
    threshold: float = _core.POWER_RATIO,
    max_input_cells: float = _core.MAX_INPUT_CELLS,
) -> Scale:
    """The scale below which the coarse (input) field lacks the fine (target) field's power.

    Rule (the robust form of Hess et al. 2024, section 4.5). Each spectrum is averaged over its
    non-wavenumber dims, and the power ratio ``r(k) = PSD_coarse(k) / PSD_fine(k)`` is interpolated
    log-log between bins.

    * With ``input_wavenumber`` ``k_in`` (the Nyquist wavenumber of the input's own grid, in cycles
      per fine grid cell, i.e. a wavelength of two input cells), k* is sought between
      ``k_lo = 2 k_in / max_input_cells`` (a wavelength of ``max_input_cells`` input cells, 4 by
      default) and ``k_in``: scanning from ``k_lo`` towards small scales, k* is the first
      wavenumber where ``r`` falls below ``threshold`` (0.5, the half-power point). If ``r`` is below
      it already at ``k_lo``, k* = ``k_lo``; if it never falls below it, k* = ``k_in``. A scale
      therefore never lies below two input cells, where the input holds no information, nor above
      ``max_input_cells`` input cells, where an input's spectrum differs from the target's through
      its overall variance (an ESM's, even after quantile mapping) rather than through missing
      detail; the pick cannot swing to the size of the domain.
    * Without it, k* is the first wavenumber, from the largest scale on, where ``r`` falls below
      ``threshold``; there must be one (see Raises).

    The noise level is ``sigma = sqrt(n_cells * PSD_fine(k*))`` (Eq. 8), which erases the input's
    scales below k* (where its power is below ``threshold`` times the target's, hence below
    sigma^2 / n_cells) and keeps the larger ones.

    Parameters
    ----------
    psd_fine, psd_coarse
        Spectra from :func:`psd` of the target data and of the input brought to the same (fine)
        grid, both in the model's transformed space and both with the same ``masked`` estimator.
    input_wavenumber
        Nyquist wavenumber of the input's grid on the fine grid, in (0, 0.5]:
        ``0.5 * fine_spacing / input_spacing``.
    threshold
        Power ratio that marks the scale, > 0.
    max_input_cells
        Largest scale, as a wavelength in input grid cells, >= 2.

    Returns
    -------
    Scale

    Raises
    ------
    GridMismatchError
        The two spectra are not on the same grid (different wavenumber bins or number of cells).
    InputError
        The spectra come from different estimators for masked fields; ``input_wavenumber``,
        ``threshold`` or ``max_input_cells`` is out of range; no bin where both spectra are usable;
        without ``input_wavenumber``: the ratio is below ``threshold`` from the largest scale on or
        never falls below it.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> k = np.arange(1, 33) / 64
    >>> def spectrum(values):
    ...     return xr.DataArray(values, dims="wavenumber", coords={"wavenumber": k},
    ...                         attrs={"n_cells": 4096, "spacing_km": 25.0, "masked": "windows"})
    >>> fine = spectrum(1e-4 * k**-2.0)
    >>> coarse = spectrum(1e-4 * k**-2.0 * np.exp(-((k / 0.1) ** 4)))
    >>> scale = select_scale(fine, coarse, input_wavenumber=0.125)
    >>> round(scale.wavenumber, 2), round(scale.wavelength_km)  # half power at k = 0.091
    (0.09, 276)
    """
    kf, fine, n_fine, spacing = _reference(psd_fine, "psd_fine")
    kc, coarse, n_coarse, _ = _reference(psd_coarse, "psd_coarse")
    if kf.shape != kc.shape or not np.allclose(kf, kc, rtol=1e-9, atol=0) or n_fine != n_coarse:
        raise GridMismatchError(
            f"psd_fine ({kf.size} wavenumber bins, {n_fine} cells) and psd_coarse ({kc.size} bins, "
            f"{n_coarse} cells) are not on the same grid. Bring the coarse field to the fine grid first "
            "(regrid it), then compute both spectra with xdownscale.xr.spectra.psd."
        )
    m_fine, m_coarse = _masked_method(psd_fine), _masked_method(psd_coarse)
    if "none" not in (m_fine, m_coarse) and m_fine != m_coarse:
        raise InputError(
            f"psd_fine was computed with masked={m_fine!r} and psd_coarse with masked={m_coarse!r}; "
            "spectra of masked fields compare only when made the same way. Compute psd_coarse with "
            f"psd(da, masked={m_fine!r})."
        )
    try:
        level = float(threshold)
        cells = float(max_input_cells)
    except (TypeError, ValueError) as err:
        raise InputError(
            f"threshold and max_input_cells must be numbers; got {threshold!r} and {max_input_cells!r}."
        ) from err
    if not (np.isfinite(level) and level > 0):
        raise InputError(
            f"threshold must be a power ratio > 0 (0.5 is the half-power point); got {threshold!r}."
        )
    if not (np.isfinite(cells) and cells >= 2):
        raise InputError(
            f"max_input_cells must be >= 2 (a wavelength in input grid cells; 2 is the input's Nyquist "
            f"scale); got {max_input_cells!r}."
        )
    usable = np.isfinite(fine) & np.isfinite(coarse) & (fine > 0) & (coarse > 0)
    if not usable.any():
        raise InputError(
            "The spectra have no bin where both are finite and positive (constant or all-NaN fields?), "
            "so there is no scale to find. Pass scale= explicitly, e.g. scale='500 km'."
        )
    if input_wavenumber is not None:
        try:
            k_in = float(input_wavenumber)
        except (TypeError, ValueError) as err:
            raise InputError(f"input_wavenumber must be a number; got {input_wavenumber!r}.") from err
        if not (np.isfinite(k_in) and 0 < k_in <= 0.5):
            raise InputError(
                "input_wavenumber must be the input grid's Nyquist wavenumber on the fine grid, in "
                "(0, 0.5] cycles per fine cell (0.5 * fine spacing / input spacing); got "
                f"{input_wavenumber!r}."
            )
        k_lo = 2.0 * k_in / cells
        found = _core.drop_wavenumber(kf, fine, coarse, threshold=level, k_min=k_lo, k_max=k_in)
        k_star = k_in if found is None else found
    else:
        found = _core.drop_wavenumber(kf, fine, coarse, threshold=level)
        ratio = coarse[usable] / fine[usable]
        span = (
            f"(coarse/fine power ratio {ratio[0]:.3g} at the largest scale, between {ratio.min():.3g} "
            f"and {ratio.max():.3g} over k = {kf[usable][0]:.4g} .. {kf[usable][-1]:.4g} cycles per cell)"
        )
        if found is None:
            raise InputError(
                f"The coarse spectrum never falls below {level:g} times the fine one {span}, so the input "
                "lacks no scale. Check that both fields are in the same (transformed) space and units, "
                "pass input_wavenumber= (the input grid's Nyquist wavenumber) to fall back on the input's "
                "resolution, or pass scale= explicitly, e.g. scale='500 km' or scale='sigma=0.5'."
            )
        if ratio[0] < level:
            raise InputError(
                f"The coarse spectrum lies below {level:g} times the fine one from the largest scale on "
                f"{span}: the fields differ in overall variance, not only in small-scale detail. "
                "Bias-correct the coarse field first (quantile delta mapping, qdm=True), check that both "
                "are in the same transformed space and units, pass input_wavenumber= to bound the scale "
                "by the input's resolution, or pass scale= explicitly, e.g. scale='500 km'."
            )
        k_star = found
    sigma = _core.sigma_at_wavenumber(k_star, kf, fine, n_fine)
    k_star = min(k_star, 0.5)
    return Scale(k_star, None if spacing is None else spacing / k_star, sigma)


def lowpass(da: xr.DataArray, wavenumber: float | Scale | str) -> xr.DataArray:
    """Keep the scales of ``da`` with radial wavenumber ``k <= wavenumber`` (cycles per grid cell).

    FFT-based: along a periodic longitude (global grids) with the FFT, along non-periodic axes
    (latitude; both axes of regional grids) with the DCT-II, i.e. the FFT of the field mirrored at
    its edges, which avoids ringing from the jump between opposite edges. NaN cells are filled with
    the nearest valid value before filtering and are NaN again afterwards.

    Parameters
    ----------
    da
        Field(s) on a latitude/longitude grid; other dims are kept.
    wavenumber
        Cut-off in cycles per grid cell (> 0; from ``sqrt(0.5)`` on the field is returned as is),
        a :class:`Scale`, or a string read by :meth:`Scale.parse` (e.g. ``"500 km"``).

    Returns
    -------
    DataArray
        Same dims, coords, attrs and dtype; lazy when ``da`` is.
    """
    grid = find_grid(da)
    if isinstance(wavenumber, (Scale, str)):
        scale = Scale.parse(wavenumber, spacing_km=_spacing(da, grid))
        if scale.wavenumber is None:
            raise InputError(
                f"lowpass needs a wavenumber or a scale in km; {scale} has only a noise level. Give the "
                "reference spectrum: Scale.parse(..., psd=psd(target))."
            )
        k = scale.wavenumber
    else:
        try:
            k = float(wavenumber)
        except (TypeError, ValueError) as err:
            raise InputError(f"lowpass: cannot read the cut-off {wavenumber!r}.") from err
        if not (np.isfinite(k) and k > 0):
            raise InputError(
                f"lowpass: the cut-off wavenumber must be > 0 cycles per grid cell; got {wavenumber!r}."
            )
    dims = da.dims
    src = _one_field_per_chunk(da, grid, "lowpass")
    dtype = src.dtype if np.issubdtype(src.dtype, np.floating) else np.dtype(np.float64)
    out = xr.apply_ufunc(
        _core.lowpass_filter,
        src,
        input_core_dims=[[grid.ydim, grid.xdim]],
        output_core_dims=[[grid.ydim, grid.xdim]],
        kwargs={"wavenumber": k, "periodic": (False, grid.periodic)},
        dask="parallelized",
        output_dtypes=[dtype],
        keep_attrs=True,
    )
    return out.transpose(*dims)


def _spacing(da: xr.DataArray, grid: Grid) -> float | None:
    dy, dx = grid_spacing_km(da, grid)
    s = math.sqrt(dy * dx) if np.isfinite(dy * dx) and dy * dx > 0 else float("nan")
    return s if np.isfinite(s) else None


def _block_mean_along(values: np.ndarray, axes: dict[int, int]) -> np.ndarray:
    """Block mean of a coordinate array along the given {axis: factor}, trimming."""
    v = np.asarray(values, dtype=np.float64)
    for axis, f in axes.items():
        n = v.shape[axis] // f
        v = np.take(v, np.arange(n * f), axis=axis)
        shape = (*v.shape[:axis], n, f, *v.shape[axis + 1 :])
        v = v.reshape(shape).mean(axis=axis + 1)
    return v


def _block_mean_lon(values: np.ndarray, axes: dict[int, int]) -> np.ndarray:
    """Circular block mean of longitudes (degrees), in the convention of the input."""
    r = np.deg2rad(np.asarray(values, dtype=np.float64))
    mean = np.rad2deg(np.arctan2(_block_mean_along(np.sin(r), axes), _block_mean_along(np.cos(r), axes)))
    if np.nanmin(values) >= 0:
        mean = np.where(mean < 0, mean + 360.0, mean)
    return mean


def upscale(da: xr.DataArray, factor: int = 4) -> xr.DataArray:
    """Average ``da`` over ``factor x factor`` blocks of horizontal cells (e.g. back to the ESM grid).

    Parameters
    ----------
    da
        Field(s) on a latitude/longitude grid. NaN cells are ignored (a block is the mean of its
        valid cells, NaN if it has none).
    factor
        Block size in cells, an integer >= 1. Trailing rows and columns that do not fill a whole
        block are dropped.

    Returns
    -------
    DataArray
        Coarse field: same dims and attrs, dtype kept (integers give float64); latitude and other
        numeric coordinates along the horizontal dims are block means, longitude a circular block
        mean; non-numeric coordinates along the horizontal dims are dropped. Lazy when ``da`` is.

    Raises
    ------
    InputError
        ``factor`` is not an integer >= 1 or is larger than the grid.
    """
    if isinstance(factor, (bool, np.bool_)) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise InputError(f"upscale: factor must be an integer >= 1 (a block size in cells); got {factor!r}.")
    factor = int(factor)
    grid = find_grid(da)
    h, w = grid.shape(da)
    if factor > min(h, w):
        raise InputError(
            f"upscale: factor {factor} is larger than the grid of {_label(da)} ({h} x {w} cells along "
            f"'{grid.ydim}', '{grid.xdim}'); use a factor <= {min(h, w)}."
        )
    ho, wo = h // factor, w // factor
    dims = da.dims
    src = _one_field_per_chunk(da, grid, "upscale")
    dtype = src.dtype if np.issubdtype(src.dtype, np.floating) else np.dtype(np.float64)
    out = xr.apply_ufunc(
        _core.block_mean,
        src.drop_vars([c for c in src.coords if {grid.ydim, grid.xdim} & set(src[c].dims)]),
        input_core_dims=[[grid.ydim, grid.xdim]],
        output_core_dims=[[grid.ydim, grid.xdim]],
        exclude_dims={grid.ydim, grid.xdim},
        kwargs={"factor": factor},
        dask="parallelized",
        output_dtypes=[dtype],
        dask_gufunc_kwargs={"output_sizes": {grid.ydim: ho, grid.xdim: wo}},
        keep_attrs=True,
    ).transpose(*dims)
    coords = {}
    for name, coord in da.coords.items():
        cdims = coord.dims
        if not ({grid.ydim, grid.xdim} & set(cdims)):
            continue
        if not np.issubdtype(coord.dtype, np.number):
            continue
        axes = {cdims.index(d): factor for d in (grid.ydim, grid.xdim) if d in cdims}
        fn = _block_mean_lon if name == grid.lon else _block_mean_along
        values = fn(coord.values, axes)
        if np.issubdtype(coord.dtype, np.floating):
            values = values.astype(coord.dtype)
        coords[name] = (cdims, values, coord.attrs)
    return out.assign_coords(coords)
