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

(Hess et al. 2024, Eq. 8). Windows are power-compensated; NaN cells (masks) are filled with the
field mean and compensated by the valid fraction (see :mod:`xdownscale.core.spectra`). Scale
selection is meant for fields in the model's *transformed* space (after :class:`LogNormalize`),
where the model's noise level sigma lives.
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

__all__ = ["Scale", "lowpass", "psd", "select_scale", "upscale"]

NORMALISATION = (
    "PSD(k) is the mean over the annulus around k of |FFT2(x - mean(x))|^2 / (H*W)^2 with k = "
    "sqrt(kx^2 + ky^2) in cycles per grid cell; white noise of variance s^2 gives s^2 / (H*W) = "
    "s^2 / n_cells, so sigma^2 = n_cells * PSD(k) (Hess et al. 2024, Eq. 8)."
)


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


def psd(da: xr.DataArray, *, window: Any = None) -> xr.DataArray:
    """Radially averaged power spectral density of each 2-D field of ``da``.

    Parameters
    ----------
    da
        Field with latitude/longitude found by :func:`xdownscale.xr.cf.find_grid`; any other
        dimensions (time, member, ...) are kept. NaN cells are allowed (land or sea masks).
    window
        None, or a window name for :func:`scipy.signal.get_window` such as ``"hann"`` (useful on
        regional, non-periodic grids); its power loss is compensated.

    Returns
    -------
    DataArray
        Dims ``(..., "wavenumber")``; coords ``wavenumber`` (cycles per grid cell) and
        ``wavelength_km`` (``spacing_km / wavenumber``); attrs ``n_cells`` (H*W), ``spacing_km``
        (``sqrt(dy_km * dx_km)``, x spacing scaled by cos(latitude)), ``normalisation`` and
        ``units`` (the squared data units, or "1"). Lazy when ``da`` is.

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
    k = _core.radial_wavenumbers((h, w))
    da = _one_field_per_chunk(da, grid, "The power spectrum")

    def _func(x: np.ndarray) -> np.ndarray:
        return _core.radial_psd(x, window=window)[1]

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
    }
    return out


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
            ``k`` is outside (0, 0.5].
        """
        kf = _check_wavenumber(k)
        spacing = _check_spacing(spacing_km)
        sigma = None
        if psd is not None:
            kk, curve, n_cells, ref_spacing = _reference(psd)
            spacing = spacing if spacing is not None else ref_spacing
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


def select_scale(psd_fine: xr.DataArray, psd_coarse: xr.DataArray) -> Scale:
    """The scale where the coarse (ESM) spectrum drops below the fine (target) one.

    Each spectrum is averaged over its non-wavenumber dims; scanning from large scales (small k)
    to small scales, k* is the first downward crossing of the coarse spectrum through the fine
    one, interpolated log-log between bins (Hess et al. 2024, section 4.5). The noise level is
    ``sigma = sqrt(n_cells * PSD_fine(k*))`` (Eq. 8).

    Parameters
    ----------
    psd_fine, psd_coarse
        Spectra from :func:`psd` of the target data and of the ESM field brought to the same
        (fine) grid, both in the model's transformed space.

    Returns
    -------
    Scale

    Raises
    ------
    GridMismatchError
        The two spectra are not on the same grid (different wavenumber bins or number of cells).
    InputError
        No crossing: the coarse spectrum never falls below the fine one.
    """
    kf, fine, n_fine, spacing = _reference(psd_fine, "psd_fine")
    kc, coarse, n_coarse, _ = _reference(psd_coarse, "psd_coarse")
    if kf.shape != kc.shape or not np.allclose(kf, kc, rtol=1e-9, atol=0) or n_fine != n_coarse:
        raise GridMismatchError(
            f"psd_fine ({kf.size} wavenumber bins, {n_fine} cells) and psd_coarse ({kc.size} bins, "
            f"{n_coarse} cells) are not on the same grid. Bring the coarse field to the fine grid first "
            "(regrid it), then compute both spectra with xdownscale.xr.spectra.psd."
        )
    k_star = _core.crossing_wavenumber(kf, fine, coarse)
    if k_star is None:
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = coarse / fine
        ok = np.isfinite(ratio) & (coarse > 0) & (fine > 0)
        if not ok.any():
            raise InputError(
                "The spectra have no bin where both are finite and positive (constant or all-NaN fields?), "
                "so there is no crossing to find. Pass scale= explicitly, e.g. scale='500 km'."
            )
        span = (
            f"(coarse/fine power ratio {ratio[ok][0]:.3g} at the largest scale, between "
            f"{ratio[ok].min():.3g} and {ratio[ok].max():.3g} over k = {kf[0]:.4g} .. {kf[-1]:.4g} cycles "
            "per cell)"
        )
        if (ratio[ok] < 1).all():
            problem = (
                f"The coarse spectrum lies below the fine one at every scale {span}: the fields differ "
                "in overall variance, not only in small-scale detail. Bias-correct the coarse field first "
                "(quantile delta mapping, qdm=True), check that both are in the same transformed space "
                "and units,"
            )
        else:
            problem = (
                f"The coarse spectrum never falls below the fine one from large to small scales {span}, "
                "so there is no natural scale to keep. Check that both fields are in the same "
                "(transformed) space and units,"
            )
        raise InputError(f"{problem} or pass scale= explicitly, e.g. scale='500 km' or scale='sigma=0.5'.")
    sigma = _core.sigma_at_wavenumber(k_star, kf, fine, n_fine)
    return Scale(min(k_star, 0.5), None if spacing is None else spacing / k_star, sigma)


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
