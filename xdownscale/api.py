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

The steps live in :mod:`xdownscale.preparation` (1-5 and the scale), :mod:`xdownscale.generation` (6-7)
and :mod:`xdownscale.planning` (the resolved :class:`Plan`); this module is the public door.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from .errors import InputError
from .planning import Plan, make_plan
from .preparation import (
    INPUT_WAVENUMBER_ATTR,
    METHODS,
    apply_qdm,
    check_call,
    check_input,
    finish,
    input_ensemble,
    keeping_time_chunks,
    label,
    qdm_defaults,
    resolve_scale,
    resolved_model,
    to_model_grid,
)

if TYPE_CHECKING:
    from .models.loading import ModelLike

__all__ = [
    "INPUT_WAVENUMBER_ATTR",
    "METHODS",
    "Plan",
    "downscale",
    "plan",
    "prepare",
    "qdm_defaults",
    "realization_seed",
    "resolve_scale",
    "select_scale",
]


def prepare(
    da: xr.DataArray,
    *,
    model: ModelLike,
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
    model = resolved_model(model)
    da, grid, _ = check_input(da, model, units)
    fine = to_model_grid(da, grid, model, regrid=regrid, lowpass=lowpass, units=units)
    if qdm is not False and qdm is not None:
        fine = keeping_time_chunks(
            fine,
            lambda f: apply_qdm(
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
    return finish(fine, model, transform)


def select_scale(
    da: xr.DataArray,
    *,
    model: ModelLike | None = None,
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
    model = resolved_model(model)
    chosen, _ = make_plan(
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


def downscale(
    da: xr.DataArray,
    *,
    model: ModelLike,
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
        ``preserve``'s multiplicative correction runs on the same device. On an accelerator the whole
        chain does (regridding, low-pass, transform, network, inverse, mask, ``preserve``), batch by
        batch, from the input's own grid: only the coarse fields go to the device and the finished ones
        come back (bias correction stays on the CPU); the environment variable ``XDOWNSCALE_PIPELINE``
        (``auto``, ``device``, ``host``) chooses otherwise (:mod:`xdownscale.ondevice`).
    batch_size
        Fields per network call (default 64 on CUDA, 8 on CPU); halved on CUDA out-of-memory.
    precision
        ``"auto"``: bfloat16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), float32
        elsewhere (emulated bf16 is slower); ``"fp32"`` or ``"bf16"`` to force one. NCHW memory
        format either way. bf16 output agrees with fp32 to about 1e-2 in the transformed space.
    member_dim
        Keep a ``member`` dimension even when ``members == 1`` (default: only when ``members > 1``).
    progress
        Show a progress bar (default: for eager, NumPy-backed input).
    scale_sample
        Time steps (evenly spaced) used to estimate the input's mean spectrum for ``scale="auto"``.
    preserve
        Keep the input's large scales in the output (after denoising, in the model's units): ``"mean"``
        makes the output's mean over each cell of the input's grid equal to the input's value there
        (times the relative change of the cell's mean under QDM), exactly and multiplicatively (signs,
        dry cells and climate signals of the input are kept); ``"smooth-mean"`` does the same with the
        means of the regridded, bias-corrected input over the cells (smoother: interpolation mixes in
        the neighbouring cells); ``"lowpass"`` makes the output's low-pass at the input's resolution
        equal to the input's (additive). ``True`` (default): for precipitation ``"mean"``, or
        ``"smooth-mean"`` with ``qdm`` (QDM is fitted on the regridded field); ``"lowpass"`` otherwise.
        ``False``: the network's output as it is.

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
    settings = {k: v for k, v in locals().items() if k != "da"}  # the keywords, forwarded as they are
    ensemble = input_ensemble(da)
    if ensemble is not None:
        check_call(method, members, precision)
        # an ESM ensemble: each realization is downscaled on its own (its own QDM fit and 'auto'
        # scale) with its own noise, seeded from (seed, index); the seeds become a coordinate
        return _per_realization(da, ensemble, **settings)
    resolved, prepared = make_plan(da, **settings)
    return resolved._apply(da, prepared)


def plan(
    da: xr.DataArray,
    *,
    model: ModelLike,
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
    settings = {k: v for k, v in locals().items() if k != "da"}  # the keywords, forwarded as they are
    if input_ensemble(da) is not None:
        raise InputError(
            f"{label(da)} has several realizations; a plan belongs to one. Select one, e.g. "
            "da.isel(realization=0), or call da.downscale.cm(...) on the ensemble."
        )
    settings["model"] = resolved_model(model)
    settings["method"] = method or settings["model"].kind
    return make_plan(da, **settings)[0]


def realization_seed(seed: int, index: int) -> int:
    """The noise seed :func:`downscale` gives realization ``index`` of an input ensemble (the
    ``realization`` dimension) for ``seed``: independent streams per realization, reproducible alone
    with ``da.isel(realization=index).downscale.cm(seed=realization_seed(seed, index), ...)``."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint32)[0] >> 1)


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
