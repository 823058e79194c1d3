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
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .errors import ChunkingError, GridMismatchError, InputError, PerformanceWarning, XDownscaleWarning
from .xr.cf import Grid, find_grid, find_time, grid_extent, grid_spacing_km, standard_layout

__all__ = ["METHODS", "downscale", "prepare", "resolve_scale", "select_scale"]

METHODS = ("cm", "sde")
DEFAULT_STEPS = {"cm": 1, "sde": 500}
#: attribute of prepared fields: the input grid's Nyquist wavenumber in cycles per model grid cell
INPUT_WAVENUMBER_ATTR = "xdownscale_input_wavenumber"
#: precipitation below this (in the model's units, mm/day) counts as a dry day in QDM: such values are
#: jittered before fitting/adjusting and set back to 0 afterwards
DRY_DAY_THRESHOLD = 0.05
MAX_FIELD_BYTES = 2**31  # one horizontal field larger than this cannot be made a single chunk


# --------------------------------------------------------------------------------------------------
# model and input checks
# --------------------------------------------------------------------------------------------------
def _load(model: Any, device: str | None = None) -> Any:
    from .models import Model, load_model

    if isinstance(model, Model):
        return model
    if isinstance(model, (str, Path)):
        return load_model(model, device="cpu")
    raise InputError(
        f"model={model!r} is not a model name, a path to a model, or a loaded xdownscale model. "
        "See xdownscale.list_models() for the shipped models."
    )


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
    from .xr.units import check_units_kind, time_step_seconds

    check_units_kind(da, model.variable["kind"], units=units, model=model.name)
    frequency = str(getattr(model, "frequency", "") or "")
    seconds = time_step_seconds(da)
    step = None if seconds is None else seconds / 86400.0
    if frequency.upper() in ("1D", "D", "DAY", "DAILY") and step is not None and abs(step - 1.0) > 0.01:
        raise InputError(
            f"{_label(da)} has a time step of {step:g} days; model '{model.name}' was trained on daily "
            f"data. Resample first, e.g. da.resample({time}='1D').mean()."
        )
    if da.chunks is not None:
        da = _rechunk_horizontal(da, grid)
    return da, grid, time


def _rechunk_horizontal(da: xr.DataArray, grid: Grid) -> xr.DataArray:
    chunks = dict(zip(da.dims, da.chunks or (), strict=False))
    if all(len(chunks[d]) == 1 for d in grid.dims):
        return da
    field_bytes = da.sizes[grid.ydim] * da.sizes[grid.xdim] * da.dtype.itemsize
    if field_bytes > MAX_FIELD_BYTES:
        raise ChunkingError(
            f"{_label(da)} is chunked along {grid.dims} and one field ({field_bytes / 2**30:.1f} GiB) is too "
            "large to become one chunk. Cut the domain first (e.g. with .sel) or chunk only along time."
        )
    warnings.warn(
        f"{_label(da)} is chunked along its horizontal dims {grid.dims}; rechunking them to one chunk "
        "each (chunk along time instead: da.chunk({'time': 32, ...: -1})).",
        PerformanceWarning,
        stacklevel=3,
    )
    return da.chunk({grid.ydim: -1, grid.xdim: -1})


# --------------------------------------------------------------------------------------------------
# pipeline steps 1-5
# --------------------------------------------------------------------------------------------------
def _cut_and_pad(da: xr.DataArray, grid: Grid, target: xr.Dataset) -> xr.DataArray:
    """Cut ``da`` to the target domain plus a margin, checking that it covers the domain.

    A rectilinear input covers the domain when the target's cell centres lie within one input cell
    of the input's own centres; the outermost input cells are then repeated one cell outwards so
    bilinear interpolation has values up to the target's edge.
    """
    tgrid = find_grid(target)
    text = grid_extent(target, tgrid)
    sext = grid_extent(da, grid)
    dy, dx = _degree_spacing(da, grid)
    if not grid.curvilinear and not grid.periodic:
        tlon = (text["lon_min"], text["lon_max"])
        slon = (sext["lon_min"], sext["lon_max"])
        # compare longitudes in the input's convention
        shift = 0.0
        if tlon[0] < slon[0] - 180:
            shift = 360.0
        elif tlon[1] > slon[1] + 180:
            shift = -360.0
        tlon = (tlon[0] + shift, tlon[1] + shift)
        covered = (
            text["lat_min"] >= sext["lat_min"] - dy - 1e-6
            and text["lat_max"] <= sext["lat_max"] + dy + 1e-6
            and tlon[0] >= slon[0] - dx - 1e-6
            and tlon[1] <= slon[1] + dx + 1e-6
        )
    else:
        covered = (
            text["lat_min"] >= sext["lat_min"] - dy - 1e-6 and text["lat_max"] <= sext["lat_max"] + dy + 1e-6
        )
        tlon = (text["lon_min"], text["lon_max"])
    if not covered:
        raise GridMismatchError(
            f"{_label(da)} covers lat {sext['lat_min']:.2f}..{sext['lat_max']:.2f}, lon "
            f"{sext['lon_min']:.2f}..{sext['lon_max']:.2f}; the model grid needs lat {text['lat_min']:.2f}.."
            f"{text['lat_max']:.2f}, lon {text['lon_min']:.2f}..{text['lon_max']:.2f} "
            "(within one input cell). "
            "Pass an input that covers the model's domain."
        )
    if grid.curvilinear or grid.periodic:
        return da
    da = standard_layout(da, grid)
    lat = da[grid.lat].values
    lon = da[grid.lon].values
    ysel = (lat >= text["lat_min"] - 2 * dy) & (lat <= text["lat_max"] + 2 * dy)
    xsel = (lon >= tlon[0] - 2 * dx) & (lon <= tlon[1] + 2 * dx)
    da = da.isel({grid.ydim: np.flatnonzero(ysel), grid.xdim: np.flatnonzero(xsel)})
    return _pad_edges(da, grid)


def _pad_edges(da: xr.DataArray, grid: Grid) -> xr.DataArray:
    padded = da.pad({grid.ydim: 1, grid.xdim: 1}, mode="edge")
    coords = {}
    for name, dim in ((grid.lat, grid.ydim), (grid.lon, grid.xdim)):
        values = np.asarray(da[name].values, dtype=float)
        step = values[1] - values[0] if values.size > 1 else 1.0
        ext = np.concatenate([[values[0] - step], values, [values[-1] + step]])
        if name == grid.lat:
            ext = np.clip(ext, -90.0, 90.0)
        coords[name] = (dim, ext, da[name].attrs)
    padded = padded.assign_coords(coords)
    if padded.chunks is not None:  # dask puts the padding into chunks of its own
        padded = padded.chunk({grid.ydim: -1, grid.xdim: -1})
    return padded


def _degree_spacing(da: xr.DataArray, grid: Grid) -> tuple[float, float]:
    if grid.curvilinear:
        dy_km, dx_km = grid_spacing_km(da, grid)
        return dy_km / 111.2, dx_km / 111.2
    lat = np.asarray(da[grid.lat].values, dtype=float)
    lon = np.unwrap(np.asarray(da[grid.lon].values, dtype=float), period=360.0)
    dy = float(np.abs(np.diff(lat)).mean()) if lat.size > 1 else 180.0
    dx = float(np.abs(np.diff(lon)).mean()) if lon.size > 1 else 360.0
    return dy, dx


def _to_model_grid(
    da: xr.DataArray, grid: Grid, model: Any, *, regrid: str, lowpass: bool, units: str | None
) -> xr.DataArray:
    """Steps 1-3: model units, cut, regrid, low-pass. Returns (time, lat, lon) on the model grid."""
    from .xr.regrid import regrid as regrid_to
    from .xr.spectra import lowpass as lowpass_filter
    from .xr.units import convert_units

    coarse_km = float(np.sqrt(np.prod(grid_spacing_km(da, grid))))
    # float64 inside the pipeline: matrix products of different shapes (chunk sizes) then round to the
    # same float32 values, so results do not depend on chunking
    da = convert_units(da.astype(np.float64), model.variable["units"], units=units)
    da = _cut_and_pad(da, grid, model.grid)
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
    time = find_time(fine)
    if hist is None:
        hist_fine = fine
    elif isinstance(hist, slice):
        hist_fine = fine.sel({time: hist})
        if hist_fine.sizes[time] == 0:
            raise InputError(
                f"hist={hist!r} selects no time step of the input, which spans "
                f"{fine[time].values[0]} .. {fine[time].values[-1]}. Pass a period inside it."
            )
    elif isinstance(hist, xr.DataArray):
        hist_checked, hist_grid, _ = _check_input(hist, model, units)
        hist_fine = _to_model_grid(
            hist_checked, hist_grid, model, regrid=regrid, lowpass=lowpass, units=units
        )
    else:
        raise InputError(f"hist={hist!r}: expected a time slice (e.g. slice('1983', '2002')) or a DataArray.")
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
    return fitted.adjust(fine)


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
    input_wavenumber = fine.attrs[INPUT_WAVENUMBER_ATTR]
    if qdm is not False and qdm is not None:
        chunks = fine.chunksizes.get(find_time(fine)) if fine.chunks is not None else None
        fine = _apply_qdm(
            fine,
            model,
            qdm=qdm,
            hist=hist,
            regrid=regrid,
            lowpass=lowpass,
            units=units,
            qdm_kwargs=dict(qdm_kwargs or {}),
        )
        if chunks is not None:  # QDM needs time in one chunk; give the caller's time chunks back
            fine = fine.chunk({find_time(fine): chunks})
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


def _input_psd(transformed: xr.DataArray, sample: int) -> xr.DataArray:
    from .xr.spectra import psd

    time = find_time(transformed)
    subset = transformed.isel({time: _sample_times(transformed.sizes[time], sample)})
    return psd(subset).mean(time)


def resolve_scale(
    scale: Any, model: Any, transformed: xr.DataArray | None = None, *, sample: int = 365
) -> Any:
    """Turn ``scale`` ("auto", "150 km", a wavenumber, or a :class:`xdownscale.Scale`) into a Scale with
    sigma, using the model's target spectrum. "auto" needs ``transformed`` (the prepared input)."""
    from .xr.spectra import Scale

    if isinstance(scale, str) and scale.strip().lower() == "auto":
        if transformed is None:
            raise InputError("scale='auto' needs the prepared input to compare spectra.")
        spectrum = _input_psd(transformed, sample).compute()
        return _auto_scale(model, spectrum, transformed.attrs.get(INPUT_WAVENUMBER_ATTR))
    if isinstance(scale, Scale):
        return scale if scale.sigma is not None else scale.with_psd(model.target_psd)
    try:
        return Scale.parse(scale, psd=model.target_psd)
    except InputError:
        # a noise level beyond the target spectrum's range is still a valid noise level for the
        # network (sigma_min..sigma_max is checked by the caller); it just has no wavenumber
        bare = Scale.parse(scale)
        if bare.sigma is not None and bare.wavenumber is None:
            return bare
        raise


def _auto_scale(model: Any, spectrum: xr.DataArray, input_wavenumber: float | None) -> Any:
    """The crossing of the input's and the model's spectra; where they do not cross (e.g. the input's
    spectrum lies below the target's at every scale), the input's own resolution, with a warning."""
    from .xr.spectra import Scale
    from .xr.spectra import select_scale as select_crossing

    try:
        return select_crossing(model.target_psd, spectrum)
    except InputError as err:
        if input_wavenumber is None:
            raise
        fallback = Scale.from_wavenumber(float(input_wavenumber), psd=model.target_psd)
        warnings.warn(
            f"scale='auto': the spectra of the input and of model '{model.name}' do not cross ({err}) "
            f"Using the input's own resolution instead: {fallback}. Pass scale= to choose another.",
            XDownscaleWarning,
            stacklevel=3,
        )
        return fallback


def select_scale(da: xr.DataArray, *, model: Any, sample: int = 365, **kwargs: Any) -> Any:
    """The :class:`xdownscale.Scale` that ``scale="auto"`` picks for ``da``.

    That is the wavenumber where the mean spectrum of the prepared input (at most ``sample`` evenly
    spaced time steps, after QDM when ``qdm=True``) falls below the model's target spectrum, with the
    noise level sigma(t*) for it (Hess et al. 2024, Eq. 8). Where the two spectra do not cross, it is
    the input's own resolution (its grid's Nyquist wavenumber on the model grid), with a warning."""
    model = _load(model)
    transformed = prepare(da, model=model, **kwargs)
    return resolve_scale("auto", model, transformed, sample=sample)


def _lazy_sigma(transformed: xr.DataArray, model: Any, sample: int) -> Any:
    import dask
    import dask.array as dsa

    spectrum = _input_psd(transformed, sample)

    cutoff = transformed.attrs.get(INPUT_WAVENUMBER_ATTR)

    def sigma_of(values: np.ndarray) -> np.ndarray:
        fitted = _auto_scale(model, spectrum.copy(data=values), cutoff)
        return np.asarray(fitted.sigma, dtype=np.float64)

    delayed = dask.delayed(sigma_of, pure=True)(spectrum.data)
    return dsa.from_delayed(delayed, shape=(), dtype=np.float64)


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
        Spatial scale below which the input's patterns are replaced: ``"auto"`` (where the input's
        spectrum falls below the model's target spectrum), a length such as ``"150 km"``, a wavenumber in
        cycles per grid cell, or an :class:`xdownscale.Scale`.
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
        ``"cuda"``, ``"cpu"``, ... Default: CUDA when available, else the CPU.
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
    if method not in METHODS:
        raise InputError(f"method={method!r}: expected one of {METHODS}.")
    if not isinstance(members, (int, np.integer)) or members < 1:
        raise InputError(f"members={members!r}: expected a whole number >= 1.")
    if precision not in ("auto", "fp32", "bf16"):
        raise InputError(f"precision={precision!r}: expected 'auto', 'fp32' or 'bf16'.")
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

    dev = choose_device(device)
    if batch_size is None:
        batch_size = 64 if dev.type == "cuda" else 8
    source_units = units if units is not None else getattr(da, "attrs", {}).get("units")
    transformed = prepare(
        da,
        model=model,
        regrid=regrid,
        lowpass=lowpass,
        qdm=qdm,
        hist=hist,
        units=units,
        qdm_kwargs=qdm_kwargs,
    )
    time = find_time(transformed)
    lazy = transformed.chunks is not None
    if lazy and isinstance(scale, str) and scale.strip().lower() == "auto":
        chosen = None
        sigma: Any = _lazy_sigma(transformed, model, scale_sample)
    else:
        chosen = resolve_scale(scale, model, transformed, sample=scale_sample)
        sigma = float(chosen.sigma)
        if not model.sigma_min <= sigma <= model.sigma_max:
            raise InputError(
                f"scale {chosen} needs noise sigma={sigma:.4g}, outside the model's range "
                f"[{model.sigma_min}, {model.sigma_max}]. Pick a larger or smaller scale."
            )
    values = _denoise(
        transformed,
        model,
        method=method,
        sigma=sigma,
        steps=steps,
        seed=seed,
        members=members,
        device=str(dev),
        batch_size=batch_size,
        precision=precision,
        progress=progress,
        time=time,
    )
    out = model.transform.inverse(values)
    out = out.where(_mask(model))
    out.attrs = {}
    out.attrs["units"] = model.variable["units"]
    if source_units is not None:
        from .xr.units import convert_units

        out = convert_units(out, str(source_units))
    if members == 1 and not member_dim:
        out = out.isel(member=0, drop=True)
    out.name = da.name
    out.attrs.update(
        _output_attrs(
            da,
            model,
            method=method,
            scale=chosen,
            scale_arg=scale,
            steps=steps,
            seed=seed,
            members=members,
            qdm=qdm,
        )
    )
    return out


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

        x = transformed.data.astype(np.float32)
        key_arr = dsa.from_array(keys, chunks=(x.chunks[0],))
        sigma_arr = (
            sigma if isinstance(sigma, dsa.Array) else dsa.from_array(np.asarray(sigma, dtype=np.float64))
        )

        def block(xb: np.ndarray, kb: np.ndarray, sb: np.ndarray) -> np.ndarray:
            return denoise_block(xb, kb.reshape(-1), sigma=float(sb), **kwargs)

        data = dsa.map_blocks(
            block,
            x,
            key_arr[:, None, None],
            sigma_arr,
            new_axis=1,
            chunks=(x.chunks[0], (members,), x.chunks[1], x.chunks[2]),
            dtype=np.float32,
            meta=np.empty((0, 0, 0, 0), dtype=np.float32),
            name=f"xdownscale-{method}",
        )
    dims = (time, "member", fgrid.ydim, fgrid.xdim)
    coords = {k: v for k, v in transformed.coords.items() if set(v.dims) <= set(dims)}
    coords["member"] = ("member", np.arange(members))
    return xr.DataArray(data, dims=dims, coords=coords)


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
) -> dict[str, Any]:
    from . import __version__

    attrs: dict[str, Any] = {}
    for key in ("standard_name", "long_name"):
        value = da.attrs.get(key) or model.variable.get(key)
        if value:
            attrs[key] = value
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
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    entry = (
        f"{now}: xdownscale {__version__} {method} downscaling with model '{model.name}' v{model.version} "
        f"(sha256 {model.sha256}), scale {scale_text}, steps {steps}, members {members}, seed {seed}"
        f"{', QDM' if qdm is not False and qdm is not None else ''}"
    )
    previous = da.attrs.get("history")
    attrs["history"] = f"{previous}\n{entry}" if previous else entry
    attrs["downscale_config"] = json.dumps(
        {"method": method, "steps": steps, "members": members, "seed": seed}
    )
    return attrs
