"""Downscaling with the whole chain on the network's device.

On an accelerator, :class:`xdownscale.Plan` does not prepare the fields with xarray on the CPU: it cuts
the input to the model's domain on its own (coarse) grid, sends those fields to the device, and there
regrids, low-passes, transforms, denoises, inverts, masks and corrects them batch by batch
(:mod:`xdownscale.models.pipeline`); only finished fields come back. The result is the xarray
pipeline's to float rounding.

Which route a downscaling takes is set by the ``XDOWNSCALE_PIPELINE`` environment variable:

* ``"auto"`` (default): on the device for accelerators (CUDA, MPS), with xarray on the CPU otherwise
  (where both routes share the same cores; the xarray route, float64 throughout, is the one the
  evaluation was made with);
* ``"device"``: on the network's device wherever it can, the CPU included (tests, benchmarks);
* ``"host"``: always with xarray on the CPU.

Bias correction (QDM) ranks each cell over the whole period, so it runs on the CPU either way; the
device then receives the prepared (corrected, transformed) fine fields. The one combination left to
the xarray route is ``preserve="mean"`` with QDM (its targets need the input before and after
correction).
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from .errors import InputError
from .generation import MEAN_RULES
from .preparation import check_input, coarse_on_domain, input_cutoff, model_mask
from .xr.cf import find_grid

if TYPE_CHECKING:
    from .models.model import Model

__all__ = [
    "POLICIES",
    "POLICY_ENV",
    "downscale_on_device",
    "merged_chunks",
    "pipeline_policy",
    "runs_on_device",
]

POLICY_ENV = "XDOWNSCALE_PIPELINE"
POLICIES = ("auto", "device", "host")

_COARSE = ("_coarse_y", "_coarse_x")
_VALUES = ("_values_y", "_values_x")


def pipeline_policy(policy: str | None = None) -> str:
    """The route policy: ``policy``, else the ``XDOWNSCALE_PIPELINE`` environment variable, else
    ``"auto"``."""
    value = (policy if policy is not None else os.environ.get(POLICY_ENV, "auto")).strip().lower()
    if value not in POLICIES:
        raise InputError(
            f"{POLICY_ENV}={value!r}: expected one of {', '.join(POLICIES)} ('auto': the whole chain on "
            "accelerators, xarray on the CPU)."
        )
    return value


def runs_on_device(device: str, model: Model, rule: str | None, bias_corrected: bool) -> bool:
    """Whether a downscaling with these settings takes the device route (see the module docstring)."""
    policy = pipeline_policy()
    if policy == "host" or (policy == "auto" and str(device).split(":")[0] == "cpu"):
        return False
    if rule == "mean" and bias_corrected:
        return False
    if rule is not None and find_grid(model.grid).curvilinear:
        return False  # preserve refuses it with its own message
    return True


def downscale_on_device(plan: Any, da: xr.DataArray, prepared: xr.DataArray | None = None) -> xr.DataArray:
    """``da`` downscaled under ``plan`` (a :class:`xdownscale.Plan`) on its device: (time, member, y, x)
    in the model's units, NaN where the model is masked; the caller's units, attributes and member
    dimension are the plan's to set. With bias correction the device starts from ``prepared`` (``da``
    prepared under the plan; None: prepared here)."""
    from .core.fieldops import Lowpass, Regrid
    from .models.inference import time_keys
    from .models.pipeline import FieldPipeline
    from .xr.regrid import Regridder

    model = plan.model
    checked, grid, time = check_input(da, model, plan.units)
    fgrid = find_grid(model.grid)
    fine_dims = (fgrid.ydim, fgrid.xdim)
    fine_shape = (model.grid.sizes[fgrid.ydim], model.grid.sizes[fgrid.xdim])
    t = model.transform
    precipitation = model.variable["kind"] == "precipitation"
    regrid = lowpass = None
    clip = False
    if plan.qdm is None:
        coarse, cutoff = coarse_on_domain(checked, grid, model, units=plan.units)
        cgrid = find_grid(coarse)
        inputs = coarse.transpose(time, cgrid.ydim, cgrid.xdim)
        regridder = Regridder(inputs, model.grid, method=plan.regrid)
        order = regridder.target_dims  # the xarray route's order of the output's dims
        regrid = Regrid.from_weights(regridder.weights, regridder.mask_threshold)
        if plan.lowpass and cutoff < 0.5:
            lowpass = Lowpass.build(
                fine_shape, cutoff, periodic_x=fgrid.periodic, nan=np.asarray(regrid.drop)
            )
            clip = precipitation
        inputs = _renamed(inputs, cgrid.ydim, cgrid.xdim, _COARSE)
    else:  # bias-corrected on the CPU: the device starts from the prepared fields
        cutoff = input_cutoff(checked, grid, model)
        if prepared is None:
            prepared = plan.prepare(da)
        order = tuple(d for d in prepared.dims if d in fine_dims)
        inputs = _renamed(prepared.transpose(time, *fine_dims), *fine_dims, _COARSE)
    rule = plan.preserve
    spec: dict[str, Any] = {}
    values = None
    if rule in MEAN_RULES:
        from .xr.domain import cut_to_domain
        from .xr.preserve import coarse_cell_operators
        from .xr.units import convert_units

        with warnings.catch_warnings():  # any warning was given by the preparation already
            warnings.simplefilter("ignore")
            part = cut_to_domain(checked, grid, model.grid, partial=True)
        cell, smooth = coarse_cell_operators(model.grid, part)
        spec.update(preserve="mean", cell=cell, smooth=smooth)
        if rule == "mean":  # the input's own cell values are the targets
            pgrid = find_grid(part)
            part = convert_units(part.astype(np.float64), model.variable["units"], units=plan.units)
            values = _renamed(part.transpose(time, pgrid.ydim, pgrid.xdim), pgrid.ydim, pgrid.xdim, _VALUES)
            spec["values"] = values.sizes[_VALUES[0]] * values.sizes[_VALUES[1]]
    elif rule == "lowpass":
        wavenumber = float(min(cutoff, 0.5))
        spec.update(
            preserve="lowpass",
            preserve_lowpass=Lowpass.build(fine_shape, wavenumber, periodic_x=fgrid.periodic),
        )
    pipeline = FieldPipeline(
        fine_shape=fine_shape,
        mask=model_mask(model).transpose(*fine_dims).values,
        eps=float(t.eps), lo=float(t.lo), hi=float(t.hi), log=bool(t.log), wet_min=t.wet_min,
        coherent=bool(getattr(t, "coherent", False)),
        regrid=regrid, lowpass=lowpass, clip=clip, **spec,
    )  # fmt: skip
    keys = xr.DataArray(time_keys(checked[time].values), dims=(time,))
    chunks = None
    if inputs.chunks is not None:
        chunks = inputs.chunksizes[time]
        # blocks of at least a batch of samples keep the device's batches full; the output gets the
        # caller's chunks back
        fields = merged_chunks(chunks, -(-plan.batch_size // plan.members))
        inputs = inputs.chunk({time: fields})
        values = None if values is None else values.chunk({time: fields})
        keys = keys.chunk({time: fields})
    sigma = plan.sigma()
    args = [inputs, keys] + ([] if values is None else [values])
    core = [list(_COARSE), []] + ([] if values is None else [list(_VALUES)])
    kwargs = dict(pipeline=pipeline, model_path=str(model.path), sha256=model.sha256, **plan.sampling())
    if not isinstance(sigma, float):  # a lazy "auto" noise level: an input of every block
        args.append(xr.DataArray(sigma))
        core.append([])
    else:
        kwargs["sigma"] = sigma
    out_dims = ["member", *fine_dims]
    if inputs.chunks is None:
        data = _eager(args, plan, time, kwargs)
    else:
        from .models.inference import caller_threads

        data = xr.apply_ufunc(
            _block,
            *args,
            input_core_dims=core,
            output_core_dims=[out_dims],
            dask="parallelized",
            output_dtypes=[np.float32],
            dask_gufunc_kwargs={
                "output_sizes": {"member": plan.members, fgrid.ydim: fine_shape[0], fgrid.xdim: fine_shape[1]}
            },
            kwargs={"threads": caller_threads(), "values": values is not None, **kwargs},
        ).data
        if data.chunks[0] != chunks:
            data = data.rechunk({0: chunks})
    dims = (time, *out_dims)
    # the input's time and scalar coordinates (e.g. a squeezed height or realization)
    coords: dict[str, Any] = {k: v.variable for k, v in checked.coords.items() if set(v.dims) <= {time}}
    coords["member"] = ("member", np.arange(plan.members))
    coords.update({k: v.variable for k, v in model.grid.coords.items() if set(v.dims) <= set(fine_dims)})
    out = xr.DataArray(data, dims=dims, coords=coords).transpose(time, "member", *order)
    return out.where(model_mask(model))


def merged_chunks(chunks: tuple[int, ...], least: int) -> tuple[int, ...]:
    """Time chunks ``chunks`` merged, in order, into chunks of at least ``least`` fields; a remainder
    smaller than that joins the last chunk, and chunks already that large are kept.

    >>> merged_chunks((10, 10, 10, 5), 24)
    (35,)
    >>> merged_chunks((64, 64, 20), 32)
    (64, 84)
    >>> merged_chunks((3,), 8)
    (3,)
    """
    out: list[int] = []
    run = 0
    for c in chunks:
        run += c
        if run >= least:
            out.append(run)
            run = 0
    if run:
        if out and run < least:
            out[-1] += run
        else:
            out.append(run)
    return tuple(out)


def _renamed(a: xr.DataArray, ydim: str, xdim: str, names: tuple[str, str]) -> xr.DataArray:
    """``a`` with its horizontal dims renamed apart from the model grid's, and only its time coordinate."""
    a = a.drop_vars([k for k, v in a.coords.items() if set(v.dims) & {ydim, xdim}])
    if a.chunks is not None:
        a = a.chunk({ydim: -1, xdim: -1})
    return a.rename({ydim: names[0], xdim: names[1]})


def _eager(args: list[xr.DataArray], plan: Any, time: str, kwargs: dict[str, Any]) -> np.ndarray:
    from tqdm.auto import tqdm

    from .models.inference import denoise_block

    inputs, keys = args[0], args[1]
    values = args[2] if len(args) > 2 else None
    spec = kwargs["pipeline"]
    rows = spec.pack(inputs.values, None if values is None else values.values)
    show = True if plan.progress is None else plan.progress
    with tqdm(
        total=inputs.sizes[time] * plan.members,
        disable=not show,
        desc=f"downscale.{plan.method}",
        unit="field",
    ) as bar:
        return denoise_block(rows, keys.values, progress=bar.update, **kwargs)


def _block(
    src: np.ndarray, keys: np.ndarray, *rest: np.ndarray, threads: int, values: bool, **kwargs: Any
) -> Any:
    from .models.inference import denoise_block, use_threads

    use_threads(threads)
    coarse_values = rest[0] if values else None
    if len(rest) > int(values):
        kwargs["sigma"] = float(np.asarray(rest[-1]))
    rows = kwargs["pipeline"].pack(src, coarse_values)
    return denoise_block(rows, np.asarray(keys).reshape(-1), **kwargs)
