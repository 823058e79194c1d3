"""Steps 1-5 of a downscaling and the choice of scale: input checks, the model grid, QDM, the model's
transform, and the scale (its noise level) from the spectra.

Everything here works on DataArrays and a loaded model; :mod:`xdownscale.planning` puts the steps
together into a :class:`xdownscale.Plan`, :mod:`xdownscale.generation` runs the network on the result.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from .core.precision import check_precision
from .errors import InputError, XDownscaleWarning
from .xr.cf import Grid, find_grid, find_time, grid_spacing_km

if TYPE_CHECKING:
    from .models.model import Model

__all__ = [
    "DEFAULT_STEPS",
    "DRY_DAY_THRESHOLD",
    "INPUT_WAVENUMBER_ATTR",
    "MAX_FIELD_BYTES",
    "METHODS",
    "PendingScale",
    "apply_qdm",
    "auto_scale",
    "check_call",
    "check_input",
    "check_sigma",
    "coarse_on_domain",
    "finish",
    "fit_qdm",
    "hist_on_model_grid",
    "input_cutoff",
    "input_ensemble",
    "input_psd",
    "is_auto",
    "keeping_time_chunks",
    "label",
    "lazy_sigma",
    "model_mask",
    "qdm_defaults",
    "resolve_scale",
    "resolved_model",
    "to_model_grid",
]


METHODS = ("cm", "sde")


DEFAULT_STEPS = {"cm": 1, "sde": 500}


#: attribute of prepared fields: the input grid's Nyquist wavenumber in cycles per model grid cell
INPUT_WAVENUMBER_ATTR = "xdownscale_input_wavenumber"


#: precipitation below this (in the model's units, mm/day) counts as a dry day in QDM: such values are
#: jittered before fitting/adjusting and set back to 0 afterwards
DRY_DAY_THRESHOLD = 0.05


MAX_FIELD_BYTES = 2**31  # one horizontal field larger than this cannot be made a single chunk


def resolved_model(model: object) -> Model:
    """The downscaling model that ``model`` (a name, a path or a loaded model) names."""
    from .models import resolve_model
    from .models.model import Model

    resolved = resolve_model(model)
    if not isinstance(resolved, Model):
        raise InputError(
            f"Model '{resolved.name}' is a '{resolved.kind}' (data assimilation) model; downscaling needs a "
            "'cm' or 'sde' model (xdownscale.list_models() shows each model's kind). Use "
            f"da.assimilate.{resolved.kind}(...) for this one."
        )
    return resolved


def label(da: xr.DataArray) -> str:
    return f"'{da.name}'" if da.name is not None else "the input"


def check_call(method: str, members: Any, precision: str) -> None:
    if method not in METHODS:
        raise InputError(f"method={method!r}: expected one of {METHODS}.")
    if not isinstance(members, (int, np.integer)) or members < 1:
        raise InputError(f"members={members!r}: expected a whole number >= 1.")
    check_precision(precision)


def input_ensemble(da: Any) -> str | None:
    """The name of the input's own ensemble dimension when it has more than one realization."""
    from .xr.domain import ENSEMBLE_DIM, MEMBER_DIM

    if not isinstance(da, xr.DataArray):
        return None
    if ENSEMBLE_DIM in da.dims and MEMBER_DIM in da.dims:
        return None  # the domain check names the clash
    for dim in (ENSEMBLE_DIM, MEMBER_DIM):
        if dim in da.dims and da.sizes[dim] > 1:
            return dim
    return None


def check_input(da: Any, model: Model, units: str | None) -> tuple[xr.DataArray, Grid, str]:
    if isinstance(da, xr.Dataset):
        names = list(da.data_vars)
        raise InputError(
            f"downscale needs a DataArray, got a Dataset with variables {names}. "
            f"Select one, e.g. ds['{names[0]}']."
            if names
            else "downscale needs a DataArray, got an empty Dataset."
        )
    if not isinstance(da, xr.DataArray):
        raise InputError(f"downscale needs an xarray.DataArray, got {type(da).__name__}.")
    grid = find_grid(da)
    time = find_time(da)
    from .xr.domain import rechunk_horizontal, squeeze_extra_dims
    from .xr.units import check_units_kind, clip_negative, time_step_seconds

    check_units_kind(da, model.variable["kind"], units=units, model=model.name)
    frequency = str(getattr(model, "frequency", "") or "")
    seconds = time_step_seconds(da)
    step = None if seconds is None else seconds / 86400.0
    if frequency.upper() in ("1D", "D", "DAY", "DAILY") and step is not None and abs(step - 1.0) > 0.01:
        raise InputError(
            f"{label(da)} has a time step of {step:g} days; model '{model.name}' was trained on daily "
            f"data. Resample first, e.g. da.resample({time}='1D').mean()."
        )
    da = squeeze_extra_dims(da, grid, time)
    if da.chunks is not None:
        da = rechunk_horizontal(da, grid, max_field_bytes=MAX_FIELD_BYTES)
    if model.variable["kind"] == "precipitation":
        da = clip_negative(da)
    return da, grid, time


def input_cutoff(da: xr.DataArray, grid: Grid, model: Model) -> float:
    """The low-pass cut-off that the input's resolution sets on the model grid (cycles per model cell;
    0.5 or more: none)."""
    coarse_km = float(np.sqrt(np.prod(grid_spacing_km(da, grid))))
    fine_km = float(np.sqrt(np.prod(grid_spacing_km(model.grid, find_grid(model.grid)))))
    return 0.5 * fine_km / coarse_km


def coarse_on_domain(
    da: xr.DataArray, grid: Grid, model: Model, *, units: str | None
) -> tuple[xr.DataArray, float]:
    """Steps 1-2 on the input's own grid: model units (float64), cut to the model's domain, gaps filled
    from the nearest cell. Returns the fields and :func:`input_cutoff`."""
    from .xr.domain import cut_to_domain, fill_nan_nearest
    from .xr.units import convert_units

    cutoff = input_cutoff(da, grid, model)
    # float64 inside the pipeline: matrix products of different shapes (chunk sizes) then round to the
    # same float32 values, so results do not depend on chunking
    da = convert_units(da.astype(np.float64), model.variable["units"], units=units)
    da = fill_nan_nearest(cut_to_domain(da, grid, model.grid), grid)
    return da, cutoff


def to_model_grid(
    da: xr.DataArray, grid: Grid, model: Model, *, regrid: str, lowpass: bool, units: str | None
) -> xr.DataArray:
    """Steps 1-3: model units, cut, regrid, low-pass. Returns (time, lat, lon) on the model grid."""
    from .xr.regrid import regrid as regrid_to
    from .xr.spectra import lowpass as lowpass_filter

    da, cutoff = coarse_on_domain(da, grid, model, units=units)
    fine = regrid_to(da, model.grid, method=regrid)
    if lowpass and cutoff < 0.5:
        fine = lowpass_filter(fine, cutoff)
        if model.variable["kind"] == "precipitation":
            fine = fine.clip(min=0.0)
    fine.attrs[INPUT_WAVENUMBER_ATTR] = float(min(cutoff, 0.5))
    return fine


def hist_on_model_grid(
    fine: xr.DataArray, model: Model, hist: Any, *, regrid: str, lowpass: bool, units: str | None
) -> xr.DataArray:
    """The QDM's historical period on the model grid: ``hist`` a period (slice) of ``fine`` (the input
    on the model grid), a separate DataArray of the same ESM, or None (all of ``fine``)."""
    time = find_time(fine)
    if hist is None:
        return fine
    if isinstance(hist, slice):
        hist_fine = fine.sel({time: hist})
        if hist_fine.sizes[time] == 0:
            raise InputError(
                f"hist={hist!r} selects no time step of the input, which spans "
                f"{fine[time].values[0]} .. {fine[time].values[-1]}. Pass a period inside it."
            )
        return hist_fine
    if isinstance(hist, xr.DataArray):
        hist_checked, hist_grid, _ = check_input(hist, model, units)
        return to_model_grid(hist_checked, hist_grid, model, regrid=regrid, lowpass=lowpass, units=units)
    raise InputError(f"hist={hist!r}: expected a time slice (e.g. slice('1983', '2002')) or a DataArray.")


def apply_qdm(
    fine: xr.DataArray,
    model: Model,
    *,
    qdm: Any,
    hist: Any,
    regrid: str,
    lowpass: bool,
    units: str | None,
    qdm_kwargs: dict[str, Any],
) -> xr.DataArray:
    from .xr.qdm import QDM

    if isinstance(qdm, QDM):
        return qdm.adjust(fine)
    if qdm is not True:
        raise InputError(f"qdm={qdm!r}: expected True, False or a fitted xdownscale.QDM.")
    hist_fine = hist_on_model_grid(fine, model, hist, regrid=regrid, lowpass=lowpass, units=units)
    return fit_qdm(hist_fine, model, qdm_kwargs).adjust(fine)


def fit_qdm(hist_fine: xr.DataArray, model: Model, qdm_kwargs: dict[str, Any]) -> Any:
    """QDM of the historical period ``hist_fine`` (model grid, model units) against the model's training
    quantiles, or against ``qdm_kwargs['ref']`` when given."""
    from .xr.qdm import QDM

    qdm_kwargs = dict(qdm_kwargs)
    ref = qdm_kwargs.pop("ref", None)
    qdm_kwargs = qdm_defaults(model, qdm_kwargs)
    kind = qdm_kwargs.pop("kind")
    if ref is not None:
        ref_checked, _ref_grid, _ = check_input(ref, model, None)
        from .xr.units import convert_units

        ref_fine = convert_units(ref_checked, model.variable["units"])
        fitted = QDM.fit(ref_fine, hist_fine, kind=kind, **qdm_kwargs)
    else:
        if model.reference_quantiles is None:
            raise InputError(
                f"Model '{model.name}' carries no reference quantiles, so qdm=True needs reference data: "
                "pass qdm_kwargs={'ref': observations} or a fitted xdownscale.QDM as qdm=."
            )
        fitted = QDM.from_quantiles(model.reference_quantiles, hist_fine, kind=kind, **qdm_kwargs)
    return fitted


def qdm_defaults(model: Model, qdm_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """QDM settings for a model's variable: multiplicative with dry days jittered under
    :data:`DRY_DAY_THRESHOLD` (model units) for precipitation, additive otherwise; ``qdm_kwargs`` wins."""
    out = dict(qdm_kwargs or {})
    precipitation = model.variable["kind"] == "precipitation"
    out.setdefault("kind", "*" if precipitation else "+")
    if out["kind"] == "*":
        out.setdefault("jitter_under", DRY_DAY_THRESHOLD)
    return out


def model_mask(model: Model) -> xr.DataArray:
    return model.grid["mask"].astype(bool)


def keeping_time_chunks(fine: xr.DataArray, adjust: Any) -> xr.DataArray:
    """``adjust(fine)`` (a QDM, which needs time in one chunk) with the caller's time chunks given back."""
    chunks = fine.chunksizes.get(find_time(fine)) if fine.chunks is not None else None
    out = adjust(fine)
    out.attrs[INPUT_WAVENUMBER_ATTR] = fine.attrs[INPUT_WAVENUMBER_ATTR]
    return out.chunk({find_time(out): chunks}) if chunks is not None else out


def finish(fine: xr.DataArray, model: Model, transform: bool) -> xr.DataArray:
    """Step 5 of :func:`xdownscale.prepare`: the mask and, with ``transform``, the model's transform
    (float32)."""
    input_wavenumber = fine.attrs[INPUT_WAVENUMBER_ATTR]
    fine = fine.where(model_mask(model))
    if transform:
        attrs = fine.attrs
        fine = model.transform.forward(fine)
        fine.attrs = {
            **attrs,
            "units": "1",
            "long_name": f"{model.variable['name']} in the model's transformed space",
        }
    fine.attrs[INPUT_WAVENUMBER_ATTR] = input_wavenumber
    return fine.astype(np.float32)


def _sample_times(n: int, sample: int) -> np.ndarray:
    if n <= sample:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, sample).round().astype(int))


def input_psd(transformed: xr.DataArray, sample: int, masked: str = "windows") -> xr.DataArray:
    """Mean spectrum of at most ``sample`` evenly spaced time steps of the prepared input, with the
    estimator ``masked`` for masked fields (that of the model's target spectrum: like with like)."""
    from .xr.spectra import psd

    time = find_time(transformed)
    subset = transformed.isel({time: _sample_times(transformed.sizes[time], sample)})
    return psd(subset, masked=masked).mean(time, keep_attrs=True)


def is_auto(scale: Any) -> bool:
    return isinstance(scale, str) and scale.strip().lower() == "auto"


def resolve_scale(
    scale: Any, model: Model, transformed: xr.DataArray | None = None, *, sample: int = 365
) -> Any:
    """Turn ``scale`` ("auto", "150 km", a wavenumber, or a :class:`xdownscale.Scale`) into a Scale with
    sigma, using the model's target spectrum. "auto" needs ``transformed`` (the prepared input) and
    follows the rule of :func:`xdownscale.select_scale`."""
    from .xr.spectra import Scale, masked_estimator

    if isinstance(scale, str) and scale.strip().lower() == "auto":
        if transformed is None:
            raise InputError("scale='auto' needs the prepared input to compare spectra.")
        spectrum = input_psd(transformed, sample, masked_estimator(model.target_psd)).compute()
        return auto_scale(model, spectrum, transformed.attrs.get(INPUT_WAVENUMBER_ATTR))
    if isinstance(scale, Scale):
        return scale if scale.sigma is not None else scale.with_psd(model.target_psd)
    try:
        return Scale.parse(scale, psd=model.target_psd)
    except InputError as err:
        # a noise level beyond the target spectrum's range is still a valid noise level for the
        # network (sigma_min..sigma_max is checked by the caller); it just has no wavenumber.
        # Anything else keeps the first, specific message.
        try:
            bare = Scale.parse(scale)
        except InputError:
            raise err from None
        if bare.sigma is not None and bare.wavenumber is None:
            return bare
        raise


def auto_scale(model: Model, spectrum: xr.DataArray, input_wavenumber: float | None) -> Any:
    """The scale of :func:`xdownscale.xr.spectra.select_scale` for the input's spectrum against the
    model's, bounded by the input's resolution; a warning when the input lacks power even at the
    largest scale allowed (a sign of wrong units or a missing bias correction)."""
    from .core.spectra import MAX_INPUT_CELLS, POWER_RATIO
    from .xr.spectra import select_scale as select_by_spectra

    chosen = select_by_spectra(model.target_psd, spectrum, input_wavenumber=input_wavenumber)
    if input_wavenumber is not None:
        k_lo = 2.0 * float(input_wavenumber) / MAX_INPUT_CELLS
        if chosen.wavenumber is not None and chosen.wavenumber <= k_lo * (1 + 1e-9):
            warnings.warn(
                f"scale='auto': the input has less than {POWER_RATIO:g} times the power of model "
                f"'{model.name}''s training data already at {MAX_INPUT_CELLS:g} input grid cells, the "
                f"largest scale 'auto' picks; using {chosen}. Check the input's units and consider "
                "qdm=True, or pass scale= to choose another.",
                XDownscaleWarning,
                stacklevel=3,
            )
    return chosen


@dataclass(frozen=True)
class PendingScale:
    """``scale="auto"`` on lazy data: the reference's mean spectrum (lazy) against the model's, chosen
    at compute time (:meth:`xdownscale.Plan.compute` or the output's computation)."""

    spectrum: xr.DataArray
    input_wavenumber: float | None

    def sigma(self, model: Model) -> Any:
        """sigma(t*) as a lazy dask scalar."""
        import dask
        import dask.array as dsa

        def sigma_of(values: np.ndarray) -> np.ndarray:
            fitted = auto_scale(model, self.spectrum.copy(data=values), self.input_wavenumber)
            return np.asarray(fitted.sigma, dtype=np.float64)

        delayed = dask.delayed(sigma_of, pure=True)(self.spectrum.data)
        return dsa.from_delayed(delayed, shape=(), dtype=np.float64)

    def resolve(self, model: Model) -> Any:
        return auto_scale(model, self.spectrum.compute(), self.input_wavenumber)


def lazy_sigma(transformed: xr.DataArray, model: Model, sample: int) -> Any:
    """sigma(t*) of ``scale="auto"`` for lazy prepared input, as a lazy dask scalar."""
    from .xr.spectra import masked_estimator

    spectrum = input_psd(transformed, sample, masked_estimator(model.target_psd))
    return PendingScale(spectrum, transformed.attrs.get(INPUT_WAVENUMBER_ATTR)).sigma(model)


def check_sigma(scale: Any, model: Model) -> None:
    sigma = float(scale.sigma)
    if not model.sigma_min <= sigma <= model.sigma_max:
        raise InputError(
            f"scale {scale} needs noise sigma={sigma:.4g}, outside the model's range "
            f"[{model.sigma_min}, {model.sigma_max}]. Pick a larger or smaller scale."
        )
