"""The downscaling pipeline on DataArrays: ``xdownscale.downscale``, ``prepare`` and ``select_scale``.

One call runs, in order (Hess et al. 2024, section 4.1):

1. CF detection of the horizontal grid and time axis; units checked against the model's variable and
   converted to the model's units (``units=`` overrides a wrong or missing attribute);
2. cut to the model domain and regrid onto the model's fine grid (bilinear by default, ``regrid=``);
3. low-pass at the input's own resolution to remove interpolation artefacts (``lowpass=False`` skips);
4. optional quantile delta mapping against the model's training climatology (``qdm=True``), fitted on
   ``hist`` (a period of the input, or a separate DataArray of the same ESM), or a fitted
   :class:`xdownscale.QDM` passed as ``qdm=``;
5. the model's transform (log-normalisation for precipitation);
6. noise of standard deviation sigma(t*) for the chosen ``scale`` and denoising (one network call for
   the consistency model; ``steps`` Euler-Maruyama steps for the SDE bridge);
7. the inverse transform, the caller's units, CF attributes and a history entry; NaN where the model is
   masked (e.g. sea in station-based products).

NaN in the input: after regridding, cells whose value is NaN are shown to the network as the field's
mean (0 in the transformed space) and come back NaN in the output.

Laziness: dask in -> dask out. Time chunks become batches; noise is keyed by (seed, time stamp,
member), so the result does not depend on chunking, batch size or the number of workers. Under
``dask.distributed`` each worker loads the model once from its file path.
"""

from __future__ import annotations

import datetime as _dt
import json
import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import xarray as xr

from .errors import InputError, XDownscaleWarning
from .xr.cf import Grid, find_grid, find_time, grid_spacing_km

__all__ = ["METHODS", "Plan", "downscale", "plan", "prepare", "resolve_scale", "select_scale"]

METHODS = ("cm", "sde")
DEFAULT_STEPS = {"cm": 1, "sde": 500}
#: attribute of prepared fields: the input grid's Nyquist wavenumber in cycles per model grid cell
INPUT_WAVENUMBER_ATTR = "xdownscale_input_wavenumber"
#: precipitation below this (in the model's units, mm/day) counts as a dry day in QDM: such values are
#: jittered before fitting/adjusting and set back to 0 afterwards
DRY_DAY_THRESHOLD = 0.05
#: output beyond the model's training data range by more than this many times the range's span draws a
#: warning (e.g. above twice the training maximum for precipitation)
RANGE_MARGIN = 1.0
MAX_FIELD_BYTES = 2**31  # one horizontal field larger than this cannot be made a single chunk


# --------------------------------------------------------------------------------------------------
# model and input checks
# --------------------------------------------------------------------------------------------------
def _load(model: Any) -> Any:
    from .models import resolve_model

    return resolve_model(model)


def _label(da: xr.DataArray) -> str:
    return f"'{da.name}'" if da.name is not None else "the input"


def _check_input(da: Any, model: Any, units: str | None) -> tuple[xr.DataArray, Grid, str]:
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
            f"{_label(da)} has a time step of {step:g} days; model '{model.name}' was trained on daily "
            f"data. Resample first, e.g. da.resample({time}='1D').mean()."
        )
    da = squeeze_extra_dims(da, grid, time)
    if da.chunks is not None:
        da = rechunk_horizontal(da, grid, max_field_bytes=MAX_FIELD_BYTES)
    if model.variable["kind"] == "precipitation":
        da = clip_negative(da)
    return da, grid, time


# --------------------------------------------------------------------------------------------------
# pipeline steps 1-5
# --------------------------------------------------------------------------------------------------
def _to_model_grid(
    da: xr.DataArray, grid: Grid, model: Any, *, regrid: str, lowpass: bool, units: str | None
) -> xr.DataArray:
    """Steps 1-3: model units, cut, regrid, low-pass. Returns (time, lat, lon) on the model grid."""
    from .xr.domain import cut_to_domain, fill_nan_nearest
    from .xr.regrid import regrid as regrid_to
    from .xr.spectra import lowpass as lowpass_filter
    from .xr.units import convert_units

    coarse_km = float(np.sqrt(np.prod(grid_spacing_km(da, grid))))
    # float64 inside the pipeline: matrix products of different shapes (chunk sizes) then round to the
    # same float32 values, so results do not depend on chunking
    da = convert_units(da.astype(np.float64), model.variable["units"], units=units)
    da = fill_nan_nearest(cut_to_domain(da, grid, model.grid), grid)
    fine = regrid_to(da, model.grid, method=regrid)
    fine_grid = find_grid(model.grid)
    fine_km = float(np.sqrt(np.prod(grid_spacing_km(model.grid, fine_grid))))
    cutoff = 0.5 * fine_km / coarse_km
    if lowpass and cutoff < 0.5:
        fine = lowpass_filter(fine, cutoff)
        if model.variable["kind"] == "precipitation":
            fine = fine.clip(min=0.0)
    fine.attrs[INPUT_WAVENUMBER_ATTR] = float(min(cutoff, 0.5))
    return fine


def _hist_fine(
    fine: xr.DataArray, model: Any, hist: Any, *, regrid: str, lowpass: bool, units: str | None
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
        hist_checked, hist_grid, _ = _check_input(hist, model, units)
        return _to_model_grid(hist_checked, hist_grid, model, regrid=regrid, lowpass=lowpass, units=units)
    raise InputError(f"hist={hist!r}: expected a time slice (e.g. slice('1983', '2002')) or a DataArray.")


def _apply_qdm(
    fine: xr.DataArray,
    model: Any,
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
    hist_fine = _hist_fine(fine, model, hist, regrid=regrid, lowpass=lowpass, units=units)
    return _fit_qdm(hist_fine, model, qdm_kwargs).adjust(fine)


def _fit_qdm(hist_fine: xr.DataArray, model: Any, qdm_kwargs: dict[str, Any]) -> Any:
    """QDM of the historical period ``hist_fine`` (model grid, model units) against the model's training
    quantiles, or against ``qdm_kwargs['ref']`` when given."""
    from .xr.qdm import QDM

    qdm_kwargs = dict(qdm_kwargs)
    ref = qdm_kwargs.pop("ref", None)
    qdm_kwargs = qdm_defaults(model, qdm_kwargs)
    kind = qdm_kwargs.pop("kind")
    if ref is not None:
        ref_checked, _ref_grid, _ = _check_input(ref, model, None)
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


def qdm_defaults(model: Any, qdm_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """QDM settings for a model's variable: multiplicative with dry days jittered under
    :data:`DRY_DAY_THRESHOLD` (model units) for precipitation, additive otherwise; ``qdm_kwargs`` wins."""
    out = dict(qdm_kwargs or {})
    precipitation = model.variable["kind"] == "precipitation"
    out.setdefault("kind", "*" if precipitation else "+")
    if out["kind"] == "*":
        out.setdefault("jitter_under", DRY_DAY_THRESHOLD)
    return out


def _mask(model: Any) -> xr.DataArray:
    return model.grid["mask"].astype(bool)


def prepare(
    da: xr.DataArray,
    *,
    model: Any,
    regrid: str = "bilinear",
    lowpass: bool = True,
    qdm: Any = False,
    hist: Any = None,
    units: str | None = None,
    transform: bool = True,
    qdm_kwargs: dict[str, Any] | None = None,
) -> xr.DataArray:
    """Everything up to the network input: units, regrid, low-pass, QDM and the model's transform.

    Parameters
    ----------
    da
        Coarse field with a time dimension and CF latitude/longitude (any grid the regridder knows).
    model
        Model name (see :func:`xdownscale.list_models`), path, or loaded model.
    regrid
        ``"bilinear"`` (the paper's choice) or ``"conservative"``.
    lowpass
        Low-pass the regridded field at the input's resolution to remove interpolation artefacts.
    qdm, hist
        Bias correction: ``qdm=True`` fits quantile delta mapping of ``hist`` (a period of ``da`` as a
        ``slice``, or a separate DataArray of the same ESM; default: all of ``da``) against the model's
        training quantiles; ``qdm=`` a fitted :class:`xdownscale.QDM` applies it.
    units
        Units of ``da`` when its ``units`` attribute is missing or wrong.
    transform
        Apply the model's transform (True: the network's input space; False: physical units).

    Returns
    -------
    DataArray
        (time, lat, lon) on the model grid; NaN where the model is masked.
    """
    model = _load(model)
    da, grid, _ = _check_input(da, model, units)
    fine = _to_model_grid(da, grid, model, regrid=regrid, lowpass=lowpass, units=units)
    if qdm is not False and qdm is not None:
        fine = _keeping_time_chunks(
            fine,
            lambda f: _apply_qdm(
                f,
                model,
                qdm=qdm,
                hist=hist,
                regrid=regrid,
                lowpass=lowpass,
                units=units,
                qdm_kwargs=dict(qdm_kwargs or {}),
            ),
        )
    return _finish(fine, model, transform)


def _keeping_time_chunks(fine: xr.DataArray, adjust: Any) -> xr.DataArray:
    """``adjust(fine)`` (a QDM, which needs time in one chunk) with the caller's time chunks given back."""
    chunks = fine.chunksizes.get(find_time(fine)) if fine.chunks is not None else None
    out = adjust(fine)
    out.attrs[INPUT_WAVENUMBER_ATTR] = fine.attrs[INPUT_WAVENUMBER_ATTR]
    return out.chunk({find_time(out): chunks}) if chunks is not None else out


def _finish(fine: xr.DataArray, model: Any, transform: bool) -> xr.DataArray:
    """Step 5 of :func:`prepare`: the mask and, with ``transform``, the model's transform (float32)."""
    input_wavenumber = fine.attrs[INPUT_WAVENUMBER_ATTR]
    fine = fine.where(_mask(model))
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


# --------------------------------------------------------------------------------------------------
# scale
# --------------------------------------------------------------------------------------------------
def _sample_times(n: int, sample: int) -> np.ndarray:
    if n <= sample:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, sample).round().astype(int))


def _input_psd(transformed: xr.DataArray, sample: int, masked: str = "windows") -> xr.DataArray:
    """Mean spectrum of at most ``sample`` evenly spaced time steps of the prepared input, with the
    estimator ``masked`` for masked fields (that of the model's target spectrum: like with like)."""
    from .xr.spectra import psd

    time = find_time(transformed)
    subset = transformed.isel({time: _sample_times(transformed.sizes[time], sample)})
    return psd(subset, masked=masked).mean(time, keep_attrs=True)


def resolve_scale(
    scale: Any, model: Any, transformed: xr.DataArray | None = None, *, sample: int = 365
) -> Any:
    """Turn ``scale`` ("auto", "150 km", a wavenumber, or a :class:`xdownscale.Scale`) into a Scale with
    sigma, using the model's target spectrum. "auto" needs ``transformed`` (the prepared input) and
    follows the rule of :func:`select_scale`."""
    from .xr.spectra import Scale, masked_estimator

    if isinstance(scale, str) and scale.strip().lower() == "auto":
        if transformed is None:
            raise InputError("scale='auto' needs the prepared input to compare spectra.")
        spectrum = _input_psd(transformed, sample, masked_estimator(model.target_psd)).compute()
        return _auto_scale(model, spectrum, transformed.attrs.get(INPUT_WAVENUMBER_ATTR))
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


def _auto_scale(model: Any, spectrum: xr.DataArray, input_wavenumber: float | None) -> Any:
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


def select_scale(
    da: xr.DataArray,
    *,
    model: Any = None,
    psd_fine: xr.DataArray | None = None,
    sample: int = 365,
    **kwargs: Any,
) -> Any:
    """The :class:`xdownscale.Scale` that ``scale="auto"`` picks for ``da`` (``kwargs``: those of
    :func:`prepare`); or, with a target spectrum ``psd_fine`` instead of a model, where ``da``'s
    spectrum (:func:`xdownscale.psd`, ``kwargs`` its arguments) meets it.

    The mean spectrum of the prepared input (at most ``sample`` evenly spaced time steps, after QDM
    when ``qdm=True``, in the model's transformed space, masked cells estimated the way the model's
    target spectrum was) is compared with the model's target spectrum by
    :func:`xdownscale.xr.spectra.select_scale`: between 4 and 2 cells of the input's grid (wavelength),
    the first wavenumber where the input's power drops below half the target's, the input's Nyquist
    scale (2 cells) where it never does; the noise level is sigma(t*) = sqrt(n_cells PSD_target(k*))
    (Hess et al. 2024, Eq. 8). With ``qdm=True`` and a ``hist``, the spectrum is that of the QDM's
    historical period (after QDM), so every period gets the same scale (see :func:`plan`). Warns when
    the input lacks power already at 4 input cells."""
    if model is None:
        if psd_fine is None:
            raise InputError(
                "select_scale needs model= (a model name or path) or psd_fine= (a target spectrum from "
                "xdownscale.psd)."
            )
        from .xr.spectra import psd
        from .xr.spectra import select_scale as crossing

        return crossing(psd_fine, psd(da, **kwargs))
    unknown = set(kwargs) - {"regrid", "lowpass", "qdm", "hist", "units", "qdm_kwargs"}
    if unknown:
        raise InputError(
            f"select_scale got unexpected arguments {sorted(unknown)}; it takes those of prepare: regrid, "
            "lowpass, qdm, hist, units, qdm_kwargs."
        )
    model = _load(model)
    chosen, _ = _make_plan(
        da,
        model=model,
        method=model.kind,
        scale="auto",
        members=1,
        seed=0,
        steps=None,
        qdm=kwargs.get("qdm", False),
        hist=kwargs.get("hist"),
        regrid=kwargs.get("regrid", "bilinear"),
        lowpass=kwargs.get("lowpass", True),
        units=kwargs.get("units"),
        device="cpu",
        batch_size=None,
        precision="auto",
        member_dim=None,
        progress=None,
        scale_sample=sample,
        qdm_kwargs=kwargs.get("qdm_kwargs"),
        preserve=False,
    )
    return chosen.compute().scale


def _lazy_sigma(transformed: xr.DataArray, model: Any, sample: int) -> Any:
    """sigma(t*) of ``scale="auto"`` for lazy prepared input, as a lazy dask scalar."""
    from .xr.spectra import masked_estimator

    spectrum = _input_psd(transformed, sample, masked_estimator(model.target_psd))
    return _PendingScale(spectrum, transformed.attrs.get(INPUT_WAVENUMBER_ATTR)).sigma(model)


# --------------------------------------------------------------------------------------------------
# the whole call
# --------------------------------------------------------------------------------------------------
def downscale(
    da: xr.DataArray,
    *,
    model: Any,
    method: str = "cm",
    scale: Any = "auto",
    members: int = 1,
    seed: int = 0,
    steps: int | None = None,
    qdm: Any = False,
    hist: Any = None,
    regrid: str = "bilinear",
    lowpass: bool = True,
    units: str | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    precision: str = "auto",
    member_dim: bool | None = None,
    progress: bool | None = None,
    scale_sample: int = 365,
    qdm_kwargs: dict[str, Any] | None = None,
    preserve: bool | str = True,
) -> xr.DataArray:
    """Downscale a coarse field with a generative model trained on fine data.

    Parameters
    ----------
    da
        Coarse field (time, lat, lon) on any CF grid, in any units convertible to the model's.
    model
        Model name (see :func:`xdownscale.list_models`), path, or loaded model.
    method
        ``"cm"`` (consistency model, one network call per field) or ``"sde"`` (SDE bridge baseline).
        The model's kind must match.
    scale
        Spatial scale below which the input's patterns are replaced: ``"auto"`` (between 4 and 2 cells
        of the input's grid, where the input's power drops below half the model's target spectrum; see
        :func:`select_scale`; with ``qdm=True`` and a ``hist``, resolved on that historical period, so
        every period gets the same scale: see :func:`plan`), a length such as ``"150 km"``, a
        wavenumber in cycles per grid cell, a noise level ``"sigma=0.5"``, or an
        :class:`xdownscale.Scale`.
    members
        Ensemble members per field, from independent noise.
    seed
        Noise seed. The same seed gives the same output for any chunking, batch size or worker count.
    steps
        Network calls per field: default 1 for ``cm`` (more: multistep consistency sampling), 500 for
        ``sde``.
    qdm, hist, qdm_kwargs
        Bias correction, see :func:`prepare`.
    regrid, lowpass, units
        See :func:`prepare`.
    device
        ``"cuda"``, ``"cpu"``, ... Default: the accelerator of ``model`` when it is a loaded model moved
        to one (``model.to("cuda")``), else CUDA when available, else the CPU. A model runs from its
        file, loaded once per process and device: changes to a loaded network in memory are not used.
    batch_size
        Fields per network call (default 64 on CUDA, 8 on CPU); halved on CUDA out-of-memory.
    precision
        ``"auto"``: bfloat16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), float32
        elsewhere (emulated bf16 is slower); ``"fp32"`` or ``"bf16"`` to force one. Channels-last memory
        either way. bf16 output agrees with fp32 to about 1e-2 in the transformed space.
    member_dim
        Keep a ``member`` dimension even when ``members == 1`` (default: only when ``members > 1``).
    progress
        Show a progress bar (default: for eager, NumPy-backed input).
    scale_sample
        Time steps (evenly spaced) used to estimate the input's mean spectrum for ``scale="auto"``.
    preserve
        Keep the input's large scales in the output (after denoising, in the model's units): ``"mean"``
        makes the output's mean over each cell of the input's grid equal to the (bias-corrected) input's,
        exactly and multiplicatively (signs, dry cells and climate signals of the input are kept);
        ``"lowpass"`` makes the output's low-pass at the input's resolution equal to the input's
        (additive). ``True`` (default): ``"mean"`` for precipitation, ``"lowpass"`` otherwise; ``False``:
        the network's output as it is.

    Returns
    -------
    DataArray
        (time, [member,] lat, lon) on the model grid, in the caller's units, NaN where the model is
        masked, with CF attributes and a history entry naming model, version, sha256 and scale. Lazy
        (dask) when ``da`` is.

    Raises
    ------
    InputError, UnitError, MissingCoordinateError, GridMismatchError, ChunkingError
        Bad input; every message says how to fix it.
    """
    ensemble = _input_ensemble(da)
    if ensemble is not None:
        _check_call(method, members, precision)
        # an ESM ensemble: each realization is downscaled on its own (its own QDM fit and 'auto'
        # scale) with its own noise, seeded from (seed, index); the seeds become a coordinate
        return _per_realization(
            da,
            ensemble,
            model=model,
            method=method,
            scale=scale,
            members=members,
            seed=seed,
            steps=steps,
            qdm=qdm,
            hist=hist,
            regrid=regrid,
            lowpass=lowpass,
            units=units,
            device=device,
            batch_size=batch_size,
            precision=precision,
            member_dim=member_dim,
            progress=progress,
            scale_sample=scale_sample,
            qdm_kwargs=qdm_kwargs,
            preserve=preserve,
        )
    resolved, prepared = _make_plan(
        da,
        model=model,
        method=method,
        scale=scale,
        members=members,
        seed=seed,
        steps=steps,
        qdm=qdm,
        hist=hist,
        regrid=regrid,
        lowpass=lowpass,
        units=units,
        device=device,
        batch_size=batch_size,
        precision=precision,
        member_dim=member_dim,
        progress=progress,
        scale_sample=scale_sample,
        qdm_kwargs=qdm_kwargs,
        preserve=preserve,
    )
    return resolved._apply(da, prepared)


def _check_call(method: str, members: Any, precision: str) -> None:
    if method not in METHODS:
        raise InputError(f"method={method!r}: expected one of {METHODS}.")
    if not isinstance(members, (int, np.integer)) or members < 1:
        raise InputError(f"members={members!r}: expected a whole number >= 1.")
    if precision not in ("auto", "fp32", "bf16"):
        raise InputError(f"precision={precision!r}: expected 'auto', 'fp32' or 'bf16'.")


def _is_auto(scale: Any) -> bool:
    return isinstance(scale, str) and scale.strip().lower() == "auto"


@dataclass(frozen=True)
class _PendingScale:
    """``scale="auto"`` on lazy data: the reference's mean spectrum (lazy) against the model's, chosen
    at compute time (:meth:`Plan.compute` or the output's computation)."""

    spectrum: xr.DataArray
    input_wavenumber: float | None

    def sigma(self, model: Any) -> Any:
        """sigma(t*) as a lazy dask scalar."""
        import dask
        import dask.array as dsa

        def sigma_of(values: np.ndarray) -> np.ndarray:
            fitted = _auto_scale(model, self.spectrum.copy(data=values), self.input_wavenumber)
            return np.asarray(fitted.sigma, dtype=np.float64)

        delayed = dask.delayed(sigma_of, pure=True)(self.spectrum.data)
        return dsa.from_delayed(delayed, shape=(), dtype=np.float64)

    def resolve(self, model: Any) -> Any:
        return _auto_scale(model, self.spectrum.compute(), self.input_wavenumber)


@dataclass(frozen=True)
class Plan:
    """One downscaling with everything resolved once: the model, the fitted QDM, the scale (and its
    noise level) and the settings. :meth:`apply` runs it on any period of the same input (a future
    period with the historical period's QDM and scale); :meth:`to_dict` is its stable fingerprint.

    Made by :func:`plan` (or ``da.downscale.plan(...)``); :func:`downscale` is ``plan(da, ...).apply(da)``.
    """

    model: Any
    method: str
    #: the resolved :class:`xdownscale.Scale`, or a pending ``"auto"`` on lazy data (see :meth:`compute`)
    scale: Any
    #: the fitted :class:`xdownscale.QDM`, or None
    qdm: Any
    steps: int
    members: int
    seed: int
    regrid: str
    lowpass: bool
    units: str | None
    preserve: str | None
    device: str
    batch_size: int
    precision: str
    member_dim: bool | None = None
    progress: bool | None = None
    scale_arg: Any = "auto"

    @property
    def scale_resolved(self) -> bool:
        """False while ``scale="auto"`` waits for lazy data (:meth:`compute` resolves it)."""
        return not isinstance(self.scale, _PendingScale)

    def compute(self) -> Plan:
        """This plan with its lazy parts computed: the QDM's quantiles loaded and a pending ``"auto"``
        scale resolved, so that :meth:`to_dict` and the output's attributes name them."""
        from .xr.qdm import QDM

        qdm = self.qdm
        if qdm is not None:
            qdm = QDM.from_dataset(qdm.to_dataset().compute())
        scale = self.scale if self.scale_resolved else self.scale.resolve(self.model)
        if not self.scale_resolved:
            _check_sigma(scale, self.model)
        return replace(self, qdm=qdm, scale=scale)

    def to_dict(self) -> dict[str, Any]:
        """What determines the output (model identity, method, scale, QDM, settings) as plain JSON types,
        the same for the same plan in any process; computes the plan's lazy parts first if needed."""
        p = self if self.scale_resolved else self.compute()
        scale = p.scale
        qdm = None
        if p.qdm is not None:
            import hashlib

            ds = p.qdm.to_dataset()
            digest = hashlib.sha256()
            for name in ("hist_quantiles", "ref_quantiles"):
                digest.update(np.ascontiguousarray(np.asarray(ds[name].values, dtype=np.float64)).tobytes())
            qdm = {"kind": p.qdm.kind, "group": p.qdm.group, "nquantiles": int(p.qdm.nquantiles)}
            qdm["sha256"] = digest.hexdigest()
        return {
            "model": {"name": p.model.name, "version": str(p.model.version), "sha256": p.model.sha256},
            "method": p.method,
            "scale": {
                "wavenumber": None if scale.wavenumber is None else float(scale.wavenumber),
                "wavelength_km": None if scale.wavelength_km is None else float(scale.wavelength_km),
                "sigma": float(scale.sigma),
            },
            "qdm": qdm,
            "steps": int(p.steps),
            "members": int(p.members),
            "seed": int(p.seed),
            "regrid": p.regrid,
            "lowpass": bool(p.lowpass),
            "units": p.units,
            "preserve": p.preserve,
            "precision": p.precision,
        }

    def prepare(self, da: xr.DataArray) -> xr.DataArray:
        """``da`` as the network sees it under this plan (units, regrid, low-pass, QDM, transform)."""
        checked, grid, _ = _check_input(da, self.model, self.units)
        fine = _to_model_grid(
            checked, grid, self.model, regrid=self.regrid, lowpass=self.lowpass, units=self.units
        )
        if self.qdm is not None:
            fine = _keeping_time_chunks(fine, self.qdm.adjust)
        return _finish(fine, self.model, True)

    def apply(self, da: xr.DataArray) -> xr.DataArray:
        """Downscale ``da`` (any period of the input the plan was made for) with this plan; see
        :func:`downscale` for the output."""
        if _input_ensemble(da) is not None:
            raise InputError(
                f"{_label(da)} has several realizations; a plan belongs to one. Make a plan per "
                "realization, or call da.downscale.cm(...) on the ensemble."
            )
        return self._apply(da, self.prepare(da))

    def _apply(self, da: xr.DataArray, prepared: xr.DataArray) -> xr.DataArray:
        model = self.model
        sigma = self.scale.sigma(model) if not self.scale_resolved else float(self.scale.sigma)
        values = _denoise(
            prepared,
            model,
            method=self.method,
            sigma=sigma,
            steps=self.steps,
            seed=self.seed,
            members=self.members,
            device=self.device,
            batch_size=self.batch_size,
            precision=self.precision,
            progress=self.progress,
            time=find_time(prepared),
        )
        out = model.transform.inverse(values)
        out = out.where(_mask(model))
        if self.preserve is not None:
            out = _preserve(out, prepared, da, model, self.preserve)
        out = _flag_out_of_range(out, model)
        out.attrs = {}
        out.attrs["units"] = model.variable["units"]
        source_units = self.units if self.units is not None else getattr(da, "attrs", {}).get("units")
        if source_units is not None:
            from .xr.units import convert_units

            out = convert_units(out, str(source_units))
        if self.members == 1 and not self.member_dim:
            out = out.isel(member=0, drop=True)
        out.name = da.name
        out.attrs.update(
            _output_attrs(
                da,
                model,
                method=self.method,
                scale=self.scale if self.scale_resolved else None,
                scale_arg=self.scale_arg,
                steps=self.steps,
                seed=self.seed,
                members=self.members,
                qdm=self.qdm if self.qdm is not None else False,
                preserve=self.preserve,
            )
        )
        return out


def _flag_out_of_range(out: xr.DataArray, model: Any) -> xr.DataArray:
    """``out`` (model units) unchanged; warns (when computed, for dask) when values lie beyond the model's
    training data range by more than :data:`RANGE_MARGIN` times its span: an undertrained model, or an
    input far out of distribution."""
    t = model.transform
    if getattr(t, "data_min", None) is None or getattr(t, "data_max", None) is None:
        return out
    span = float(t.data_max) - float(t.data_min)
    lo, hi = float(t.data_min) - RANGE_MARGIN * span, float(t.data_max) + RANGE_MARGIN * span
    units = model.variable["units"]

    def check(block: np.ndarray) -> np.ndarray:
        x = np.asarray(block)
        bad = np.isfinite(x) & ((x < lo) | (x > hi))
        if bad.any():
            warnings.warn(
                f"{int(bad.sum())} of {x.size} output values ({float(np.nanmin(x)):.4g} to "
                f"{float(np.nanmax(x)):.4g} {units}) lie far outside model '{model.name}''s training range "
                f"[{t.data_min:.4g}, {t.data_max:.4g}] {units}: the model may be undertrained (see the "
                "validation in its card) or the input far from its training data (check the units, "
                "try qdm=True or a smaller scale).",
                XDownscaleWarning,
                stacklevel=2,
            )
        return block

    if out.chunks is None:
        check(out.values)
        return out
    return out.copy(data=out.data.map_blocks(check, dtype=out.dtype))


def _check_sigma(scale: Any, model: Any) -> None:
    sigma = float(scale.sigma)
    if not model.sigma_min <= sigma <= model.sigma_max:
        raise InputError(
            f"scale {scale} needs noise sigma={sigma:.4g}, outside the model's range "
            f"[{model.sigma_min}, {model.sigma_max}]. Pick a larger or smaller scale."
        )


def plan(
    da: xr.DataArray,
    *,
    model: Any,
    method: str | None = None,
    scale: Any = "auto",
    members: int = 1,
    seed: int = 0,
    steps: int | None = None,
    qdm: Any = False,
    hist: Any = None,
    regrid: str = "bilinear",
    lowpass: bool = True,
    units: str | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    precision: str = "auto",
    member_dim: bool | None = None,
    progress: bool | None = None,
    scale_sample: int = 365,
    qdm_kwargs: dict[str, Any] | None = None,
    preserve: bool | str = True,
) -> Plan:
    """Resolve a downscaling of ``da`` once: model, units, QDM fit, scale and settings.

    Takes the arguments of :func:`downscale`; ``method`` defaults to the model's kind (``"cm"`` or
    ``"sde"``). ``scale="auto"`` is resolved on the QDM's historical
    period when ``qdm=True`` is given a ``hist``, otherwise on ``da``: so ``plan(hist_period, qdm=True,
    ...).apply(future)`` downscales a future period with the historical period's bias correction and
    scale (a climate-change signal is then not mistaken for a change of scale). On lazy data the
    ``"auto"`` scale stays lazy until :meth:`Plan.compute` or the output's computation.

    Returns
    -------
    Plan
        ``plan.apply(da)`` downscales; ``plan.to_dict()`` names everything that determines the output.
    """
    if _input_ensemble(da) is not None:
        raise InputError(
            f"{_label(da)} has several realizations; a plan belongs to one. Select one, e.g. "
            "da.isel(realization=0), or call da.downscale.cm(...) on the ensemble."
        )
    model = _load(model)
    return _make_plan(
        da,
        model=model,
        method=method or model.kind,
        scale=scale,
        members=members,
        seed=seed,
        steps=steps,
        qdm=qdm,
        hist=hist,
        regrid=regrid,
        lowpass=lowpass,
        units=units,
        device=device,
        batch_size=batch_size,
        precision=precision,
        member_dim=member_dim,
        progress=progress,
        scale_sample=scale_sample,
        qdm_kwargs=qdm_kwargs,
        preserve=preserve,
    )[0]


def _make_plan(
    da: xr.DataArray,
    *,
    model: Any,
    method: str,
    scale: Any,
    members: int,
    seed: int,
    steps: int | None,
    qdm: Any,
    hist: Any,
    regrid: str,
    lowpass: bool,
    units: str | None,
    device: str | None,
    batch_size: int | None,
    precision: str,
    member_dim: bool | None,
    progress: bool | None,
    scale_sample: int,
    qdm_kwargs: dict[str, Any] | None,
    preserve: bool | str,
) -> tuple[Plan, xr.DataArray]:
    """The :class:`Plan` of ``da`` and ``da`` prepared under it (so downscale prepares it once)."""
    from .xr.qdm import QDM

    _check_call(method, members, precision)
    # a loaded model the user moved to an accelerator runs there unless device= says otherwise
    placed = getattr(model, "device", None)
    placed = None if placed is None or str(placed) == "cpu" else str(placed)
    model = _load(model)
    if model.kind != method:
        raise InputError(
            f"Model '{model.name}' is a '{model.kind}' model; method '{method}' needs a '{method}' model. "
            f"Use da.downscale.{model.kind}(...) or another model."
        )
    steps = DEFAULT_STEPS[method] if steps is None else int(steps)
    if steps < 1:
        raise InputError(f"steps={steps}: expected >= 1.")
    from .models.inference import choose_device

    dev = choose_device(device if device is not None else placed)
    if batch_size is None:
        batch_size = 64 if dev.type == "cuda" else 8
    rule = _preserve_rule(preserve, model)
    checked, grid, _ = _check_input(da, model, units)
    fine = _to_model_grid(checked, grid, model, regrid=regrid, lowpass=lowpass, units=units)
    fitted = None
    hist_fine = None
    if isinstance(qdm, QDM):
        fitted = qdm
    elif qdm is True:
        hist_fine = _hist_fine(fine, model, hist, regrid=regrid, lowpass=lowpass, units=units)
        fitted = _fit_qdm(hist_fine, model, dict(qdm_kwargs or {}))
    elif qdm is not False and qdm is not None:
        raise InputError(f"qdm={qdm!r}: expected True, False or a fitted xdownscale.QDM.")
    prepared = _finish(_keeping_time_chunks(fine, fitted.adjust) if fitted else fine, model, True)
    chosen: Any
    if _is_auto(scale):
        # one scale for every period: the QDM's historical period when there is one
        reference = prepared
        if hist is not None and hist_fine is not None and fitted is not None:
            reference = _finish(_keeping_time_chunks(hist_fine, fitted.adjust), model, True)
        if reference.chunks is not None:
            from .xr.spectra import masked_estimator

            spectrum = _input_psd(reference, scale_sample, masked_estimator(model.target_psd))
            chosen = _PendingScale(spectrum, reference.attrs.get(INPUT_WAVENUMBER_ATTR))
        else:
            chosen = resolve_scale("auto", model, reference, sample=scale_sample)
    else:
        chosen = resolve_scale(scale, model, prepared, sample=scale_sample)
    if not isinstance(chosen, _PendingScale):
        _check_sigma(chosen, model)
    resolved = Plan(
        model=model,
        method=method,
        scale=chosen,
        qdm=fitted,
        steps=steps,
        members=int(members),
        seed=int(seed),
        regrid=regrid,
        lowpass=lowpass,
        units=units,
        preserve=rule,
        device=str(dev),
        batch_size=int(batch_size),
        precision=precision,
        member_dim=member_dim,
        progress=progress,
        scale_arg=scale,
    )
    return resolved, prepared


def realization_seed(seed: int, index: int) -> int:
    """The noise seed :func:`downscale` gives realization ``index`` of an input ensemble (the
    ``realization`` dimension) for ``seed``: independent streams per realization, reproducible alone
    with ``da.isel(realization=index).downscale.cm(seed=realization_seed(seed, index), ...)``."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint32)[0] >> 1)


def _input_ensemble(da: Any) -> str | None:
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


def _per_realization(da: xr.DataArray, dim: str, *, seed: int, **kwargs: Any) -> xr.DataArray:
    """:func:`downscale` of each realization along ``dim``, concatenated along ``realization`` (lazy
    where the input is), with the seed each used as the coordinate ``downscale_seed``."""
    from .xr.domain import ENSEMBLE_DIM

    seeds = [realization_seed(seed, i) for i in range(da.sizes[dim])]
    parts = [downscale(da.isel({dim: [i]}), seed=s, **kwargs) for i, s in enumerate(seeds)]
    out = xr.concat(parts, dim=ENSEMBLE_DIM, combine_attrs="drop_conflicts")
    out = out.assign_coords(downscale_seed=(ENSEMBLE_DIM, np.asarray(seeds, dtype=np.int64)))
    out["downscale_seed"].attrs["long_name"] = "noise seed of each realization (realization_seed(seed, i))"
    for key in ("history", "downscale_config"):  # differ only in the seed and the time stamp
        if key in parts[0].attrs and key not in out.attrs:
            out.attrs[key] = parts[0].attrs[key]
    out.attrs["downscale_seed"] = int(seed)
    return out


def _preserve_rule(preserve: Any, model: Any) -> str | None:
    from .xr.preserve import default_rule

    if preserve is True:
        return default_rule(model.variable["kind"])
    if preserve is False or preserve is None:
        return None
    if preserve in ("mean", "lowpass"):
        if preserve == "mean" and model.variable["kind"] != "precipitation":
            raise InputError(
                f"preserve='mean' scales the output multiplicatively, for non-negative amounts; model "
                f"'{model.name}' is for {model.variable['kind']}. Use preserve='lowpass' (or True)."
            )
        return str(preserve)
    raise InputError(f"preserve={preserve!r}: expected True, False, 'mean' or 'lowpass'.")


def _preserve(out: xr.DataArray, transformed: xr.DataArray, da: xr.DataArray, model: Any, rule: str) -> Any:
    """The output with the input's large scales (``rule``) restored, in the model's units."""
    from .xr.domain import cut_to_domain
    from .xr.preserve import preserve_large_scales

    reference = model.transform.inverse(transformed).where(_mask(model))
    if rule == "mean":
        with warnings.catch_warnings():  # any coverage warning was given by prepare already
            warnings.simplefilter("ignore")
            coarse = cut_to_domain(da, find_grid(da), model.grid, partial=True)
        return preserve_large_scales(out, reference, rule="mean", coarse=coarse)
    wavenumber = transformed.attrs.get(INPUT_WAVENUMBER_ATTR)
    if wavenumber is None:  # the input is at least as fine as the model grid
        return out
    return preserve_large_scales(out, reference, rule="lowpass", wavenumber=float(wavenumber))


def _denoise(
    transformed: xr.DataArray,
    model: Any,
    *,
    method: str,
    sigma: Any,
    steps: int,
    seed: int,
    members: int,
    device: str,
    batch_size: int,
    precision: str,
    progress: bool | None,
    time: str,
) -> xr.DataArray:
    from .models.inference import denoise_block, time_keys

    fgrid = find_grid(transformed)
    transformed = transformed.transpose(time, fgrid.ydim, fgrid.xdim)
    keys = time_keys(transformed[time].values)
    kwargs = dict(
        model_path=str(model.path),
        sha256=model.sha256,
        method=method,
        steps=steps,
        seed=seed,
        members=members,
        device=device,
        batch_size=batch_size,
        precision=precision,
    )
    if transformed.chunks is None:
        show = True if progress is None else progress
        from tqdm.auto import tqdm

        with tqdm(
            total=transformed.sizes[time] * members,
            disable=not show,
            desc=f"downscale.{method}",
            unit="field",
        ) as bar:
            data = denoise_block(
                np.asarray(transformed.values, dtype=np.float32),
                keys,
                sigma=float(sigma),
                progress=bar.update,
                **kwargs,
            )
    else:
        import dask.array as dsa
        import torch

        x = transformed.data.astype(np.float32)
        key_arr = dsa.from_array(keys, chunks=(x.chunks[0],))
        sigma_arr = (
            sigma if isinstance(sigma, dsa.Array) else dsa.from_array(np.asarray(sigma, dtype=np.float64))
        )

        # token=, not name=: the key is a prefix plus a hash of the data, the seed and every
        # setting, so two downscalings of the same data in one graph do not share blocks
        data = dsa.map_blocks(
            _denoise_dask_block,
            x,
            key_arr[:, None, None],
            sigma_arr,
            new_axis=1,
            chunks=(x.chunks[0], (members,), x.chunks[1], x.chunks[2]),
            dtype=np.float32,
            meta=np.empty((0, 0, 0, 0), dtype=np.float32),
            token=f"xdownscale-{method}",
            threads=torch.get_num_threads(),
            **kwargs,
        )
    dims = (time, "member", fgrid.ydim, fgrid.xdim)
    coords = {k: v for k, v in transformed.coords.items() if set(v.dims) <= set(dims)}
    coords["member"] = ("member", np.arange(members))
    return xr.DataArray(data, dims=dims, coords=coords)


def _denoise_dask_block(
    xb: np.ndarray, kb: np.ndarray, sb: np.ndarray, threads: int, **kwargs: Any
) -> np.ndarray:
    from .models.inference import denoise_block, use_threads

    use_threads(threads)
    return denoise_block(xb, kb.reshape(-1), sigma=float(sb), **kwargs)


def _output_attrs(
    da: xr.DataArray,
    model: Any,
    *,
    method: str,
    scale: Any,
    scale_arg: Any,
    steps: int,
    seed: int,
    members: int,
    qdm: Any,
    preserve: str | None = None,
) -> dict[str, Any]:
    from ._version import __version__
    from .xr.units import cf_names

    # the input's own names, made consistent with its units: never the training data's long_name
    attrs: dict[str, Any] = dict(cf_names(da, model.variable["kind"]))
    attrs["cell_methods"] = da.attrs.get("cell_methods", "time: mean")
    if scale is not None and scale.wavenumber is not None:
        attrs["downscale_scale_wavenumber"] = float(scale.wavenumber)
        attrs["downscale_scale_km"] = float(scale.wavelength_km)
        attrs["downscale_scale_sigma"] = float(scale.sigma)
        scale_text = (
            f"{scale.wavelength_km:.0f} km (wavenumber {scale.wavenumber:.4f}, sigma {scale.sigma:.4f})"
        )
    elif scale is not None:
        attrs["downscale_scale_sigma"] = float(scale.sigma)
        scale_text = f"sigma {scale.sigma:.4f} (beyond the scales of the model's target spectrum)"
    else:
        scale_text = (
            f"{scale_arg} (selected lazily at compute time; see da.downscale.select_scale(model=...))"
        )
    attrs["downscale_scale"] = scale_text
    attrs["downscale_model"] = model.name
    attrs["downscale_model_version"] = str(model.version)
    attrs["downscale_model_sha256"] = model.sha256
    attrs["downscale_method"] = method
    attrs["downscale_members"] = int(members)
    attrs["downscale_seed"] = int(seed)
    attrs["downscale_preserve"] = preserve or "none"
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    entry = (
        f"{now}: xdownscale {__version__} {method} downscaling with model '{model.name}' v{model.version} "
        f"(sha256 {model.sha256}), scale {scale_text}, steps {steps}, members {members}, seed {seed}"
        f"{', QDM' if qdm is not False and qdm is not None else ''}"
        f"{f', preserve {preserve!r}' if preserve else ''}"
    )
    previous = da.attrs.get("history")
    attrs["history"] = f"{previous}\n{entry}" if previous else entry
    attrs["downscale_config"] = json.dumps(
        {"method": method, "steps": steps, "members": members, "seed": seed, "preserve": preserve}
    )
    return attrs
