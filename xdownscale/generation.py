"""Steps 6-7 of a downscaling: noise of the chosen scale and denoising (eager, or one dask task per
time chunk), the inverse transform, the input's large scales kept, the range check and the output's
CF attributes and history."""

from __future__ import annotations

import datetime as _dt
import json
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from .errors import InputError, XDownscaleWarning
from .preparation import INPUT_WAVENUMBER_ATTR, check_input, model_mask
from .xr.cf import find_grid

if TYPE_CHECKING:
    from .models.model import Model

__all__ = [
    "RANGE_MARGIN",
    "VARIABLE_DIM",
    "denoise",
    "flag_out_of_range",
    "output_attrs",
    "preserve_rule",
    "preserve_scales",
]


#: dimension of a joint model's stacked input: one entry per variable (network channel)
VARIABLE_DIM = "variable"


#: output beyond the model's training data range by more than this many times the range's span draws a
#: warning (e.g. above twice the training maximum for precipitation)
RANGE_MARGIN = 1.0


def denoise(
    transformed: xr.DataArray,
    model: Model,
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
    """Noise ``transformed`` (time, [variable,] y, x) to ``sigma`` (one level, or for a joint model's
    stacked input one per variable; floats or lazy dask scalars) and denoise it; returns
    (time, member, [variable,] y, x), lazy where the input is."""
    from .models.inference import caller_threads, denoise_block, time_keys

    fgrid = find_grid(transformed)
    # a joint model's input has a 'variable' dimension (one network channel each, in the model's order)
    channel = [VARIABLE_DIM] if VARIABLE_DIM in transformed.dims else []
    transformed = transformed.transpose(time, *channel, fgrid.ydim, fgrid.xdim)
    keys = time_keys(transformed[time].values)
    levels = list(sigma) if channel else [sigma]
    kwargs: dict[str, Any] = dict(
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
                sigma=np.asarray([float(v) for v in levels]),
                progress=bar.update,
                **kwargs,
            )
    else:
        import dask.array as dsa

        x = transformed.data.astype(np.float32)
        if channel:
            x = x.rechunk({1: -1})  # all variables of a field go through the network together
        key_arr = dsa.from_array(keys, chunks=(x.chunks[0],))
        sigma_arrs = [
            v if isinstance(v, dsa.Array) else dsa.from_array(np.asarray(v, dtype=np.float64)) for v in levels
        ]
        # token=, not name=: the key is a prefix plus a hash of the data, the seed and every
        # setting, so two downscalings of the same data in one graph do not share blocks
        data = dsa.map_blocks(
            _denoise_dask_block,
            x,
            key_arr[(slice(None),) + (None,) * (x.ndim - 1)],
            *sigma_arrs,
            new_axis=1,
            chunks=(x.chunks[0], (members,), *x.chunks[1:]),
            dtype=np.float32,
            meta=np.empty((0,) * (x.ndim + 1), dtype=np.float32),
            token=f"xdownscale-{method}",
            threads=caller_threads(),
            **kwargs,
        )
    dims = (time, "member", *channel, fgrid.ydim, fgrid.xdim)
    coords = {k: v for k, v in transformed.coords.items() if set(v.dims) <= set(dims)}
    coords["member"] = ("member", np.arange(members))
    return xr.DataArray(data, dims=dims, coords=coords)


def _denoise_dask_block(
    xb: np.ndarray, kb: np.ndarray, *sbs: np.ndarray, threads: int, **kwargs: Any
) -> np.ndarray:
    from .models.inference import denoise_block, use_threads

    use_threads(threads)
    return denoise_block(xb, kb.reshape(-1), sigma=np.asarray([float(v) for v in sbs]), **kwargs)


#: the multiplicative rules of ``preserve=``: the input's own cell values, or the cell means of the
#: input regridded to the model grid (smoother: interpolation mixes in the neighbouring cells)
MEAN_RULES = ("mean", "smooth-mean")


def preserve_rule(preserve: Any, model: Model, *, bias_corrected: bool = False) -> str | None:
    """The rule of ``preserve=`` (None: none); ``True`` picks the variable's default, which for
    precipitation depends on whether the input is bias-corrected (``bias_corrected``)."""
    from .xr.preserve import default_rule

    if preserve is True:
        return default_rule(model.variable["kind"], bias_corrected)
    if preserve is False or preserve is None:
        return None
    if preserve in (*MEAN_RULES, "lowpass"):
        if preserve in MEAN_RULES and model.variable["kind"] != "precipitation":
            raise InputError(
                f"preserve={preserve!r} scales the output multiplicatively, for non-negative amounts; "
                f"model '{model.name}' is for {model.variable['kind']}. Use preserve='lowpass' (or True)."
            )
        return str(preserve)
    raise InputError(f"preserve={preserve!r}: expected True, False, 'mean', 'smooth-mean' or 'lowpass'.")


def preserve_scales(
    out: xr.DataArray,
    transformed: xr.DataArray,
    da: xr.DataArray,
    model: Model,
    rule: str,
    *,
    units: str | None = None,
    base: xr.DataArray | None = None,
    device: str | None = None,
) -> Any:
    """The output with the input's large scales (``rule``) restored, in the model's units.

    For ``"mean"`` each of the input's cells gets the mean the input ``da`` has there (``units``: its
    units where it has none), times the relative change bias correction made over the cell (``base``:
    the input on the model grid before it; None: no bias correction). For ``"smooth-mean"`` it gets the
    mean of the prepared (regridded, bias-corrected) input over the cell. The multiplicative rules run
    on ``device`` (the network's; None: the CPU)."""
    from .preserve import preserve_large_scales
    from .xr.domain import cut_to_domain
    from .xr.units import convert_units

    reference = model.transform.inverse(transformed).where(model_mask(model))
    if rule in MEAN_RULES:
        with warnings.catch_warnings():  # any warning was given by prepare already
            warnings.simplefilter("ignore")
            checked, grid, time = check_input(da, model, units)
            coarse = cut_to_domain(checked, grid, model.grid, partial=True)
            if rule == "mean":  # the input's values are the targets
                coarse = convert_units(coarse.astype(np.float64), model.variable["units"], units=units)
            else:  # only its grid: the targets are the regridded input's means
                coarse = coarse.isel({time: 0}, drop=True)
        wet_min = getattr(model.transform, "wet_min", None)
        coherent = bool(getattr(model.transform, "coherent", False))
        return preserve_large_scales(
            out, reference, rule="mean", coarse=coarse, base=base, wet_min=wet_min, coherent=coherent,
            device=device,
        )  # fmt: skip
    wavenumber = transformed.attrs.get(INPUT_WAVENUMBER_ATTR)
    if wavenumber is None:  # the input is at least as fine as the model grid
        return out
    return preserve_large_scales(out, reference, rule="lowpass", wavenumber=float(wavenumber))


def flag_out_of_range(out: xr.DataArray, model: Model) -> xr.DataArray:
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


def output_attrs(
    da: xr.DataArray,
    model: Model,
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
