"""Several variables at once: ``xdownscale.downscale_dataset`` (``ds.downscale.cm(...)``) with a joint model.

A joint model (trained with ``xdownscale.train(variable=["tas", "pr"], ...)``) has one network channel
per variable. Each variable of the Dataset goes through steps 1-5 on its own, with its own units,
transform, QDM (multiplicative for precipitation, additive otherwise) and scale (``"auto"`` per variable:
the spectra of precipitation and temperature meet the model's at different wavelengths). The prepared
fields are stacked along ``variable`` and denoised together in one network call per field, each channel
noised to its own level, so the output keeps the structure between the variables that the model learnt
(e.g. wet winter days are colder). Step 7 (inverse transform, large scales, units, attributes) is again
per variable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import xarray as xr

from .errors import InputError
from .generation import VARIABLE_DIM, denoise
from .planning import Plan, make_plan
from .preparation import input_ensemble, resolved_model
from .xr.cf import find_time

if TYPE_CHECKING:
    from .models.loading import ModelLike
    from .models.model import Model

__all__ = ["downscale_dataset", "match_variables"]


def _kind_of(da: xr.DataArray) -> str | None:
    from .xr.units import quantity_kind

    try:
        return str(quantity_kind(da, None))
    except Exception:  # no or unknown units: the variable cannot be matched by what it is
        return None


def match_variables(
    ds: xr.Dataset, model: Model, variables: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Which data variable of ``ds`` feeds each of ``model``'s variables: ``variables`` (model name ->
    Dataset name) first, then the same name, then the only data variable of the same kind
    (precipitation, temperature) by its units."""
    given = dict(variables or {})
    unknown = sorted(set(given) - set(model.variables))
    if unknown:
        raise InputError(
            f"variables= names {unknown}, which model '{model.name}' does not have; its variables are "
            f"{model.variables}. Map each of them to a data variable, e.g. variables={{'tas': 'tg'}}."
        )
    names = [str(n) for n in ds.data_vars]
    out: dict[str, str] = {}
    for v in model.variables:
        if v in given:
            if given[v] not in ds.data_vars:
                raise InputError(
                    f"variables={{{v!r}: {given[v]!r}}}: the Dataset has no '{given[v]}'; it holds {names}."
                )
            out[v] = given[v]
            continue
        if v in ds.data_vars:
            out[v] = v
            continue
        kind = model.for_variable(v).variable["kind"]
        candidates = [
            n for n in names if n not in out.values() and n not in given.values() and _kind_of(ds[n]) == kind
        ]
        if len(candidates) != 1:
            found = (
                f"{len(candidates)} data variables of that kind ({candidates})"
                if candidates
                else "none of that kind"
            )
            raise InputError(
                f"Model '{model.name}' needs '{v}' ({kind}); the Dataset has no '{v}' and {found} among "
                f"{names}. Say which one: variables={{'{v}': NAME}}."
            )
        out[v] = candidates[0]
    return out


def _per_variable(value: Any, model_name: str, data_name: str, keys: set[str]) -> Any:
    """``value[model_name]`` (or ``value[data_name]``) when ``value`` is a mapping by variable, else
    ``value`` itself (the same setting for every variable)."""
    if isinstance(value, Mapping) and value and set(value) <= keys:
        if model_name in value:
            return value[model_name]
        if data_name in value:
            return value[data_name]
        raise InputError(
            f"The per-variable setting {dict(value)!r} has no entry for '{model_name}'; give one for "
            "every variable, or one value for all."
        )
    return value


def downscale_dataset(
    ds: xr.Dataset,
    *,
    model: ModelLike,
    variables: Mapping[str, str] | None = None,
    scale: Any = "auto",
    members: int = 1,
    seed: int = 0,
    steps: int | None = None,
    qdm: Any = False,
    hist: Any = None,
    regrid: str = "bilinear",
    lowpass: bool = True,
    units: Any = None,
    device: str | None = None,
    batch_size: int | None = None,
    precision: str = "auto",
    member_dim: bool | None = None,
    progress: bool | None = None,
    scale_sample: int = 365,
    qdm_kwargs: Any = None,
    preserve: Any = True,
) -> xr.Dataset:
    """Downscale several variables of a Dataset together with a joint consistency model.

    Parameters
    ----------
    ds
        Coarse fields (time, lat, lon) of the model's variables, e.g. ``pr`` and ``tas`` of a CMIP run,
        on one grid and the same time steps.
    model
        A joint model (``xdownscale.list_models()`` shows each model's variables), by name, path or
        loaded.
    variables
        Which data variable feeds each of the model's variables, e.g. ``{"tas": "tg", "pr": "rr"}``;
        by default the same name, else the only data variable of that kind (by its units).
    scale, qdm, hist, units, qdm_kwargs, preserve
        As in :func:`xdownscale.downscale`, either one value for all variables or a dict by variable,
        e.g. ``scale={"pr": "auto", "tas": "300 km"}``. ``"auto"`` is resolved per variable;
        ``hist`` may also be a Dataset of the historical period.
    members, seed, steps, regrid, lowpass, device, batch_size, precision, member_dim, progress, scale_sample
        As in :func:`xdownscale.downscale`. ``steps`` above 1 needs the same noise level for all
        variables.

    Returns
    -------
    Dataset
        One downscaled variable per input variable (the Dataset's names), each with its own attributes
        (scale, QDM, history); lazy where ``ds`` is.
    """
    if not isinstance(ds, xr.Dataset):
        raise InputError(f"downscale_dataset needs an xarray.Dataset, got {type(ds).__name__}.")
    loaded = resolved_model(model)
    if not loaded.joint:
        raise InputError(
            f"Model '{loaded.name}' downscales one variable ('{loaded.variable['name']}'); call it on "
            f"that DataArray, e.g. ds['{loaded.variable['name']}'].downscale.cm(...), or use a joint model "
            "of several variables."
        )
    matched = match_variables(ds, loaded, variables)
    keys = set(matched) | set(matched.values())
    plans: list[Plan] = []
    prepared: list[xr.DataArray] = []
    for v, name in matched.items():
        da = ds[name]
        if input_ensemble(da) is not None:
            raise InputError(
                f"'{name}' has several realizations; a joint downscaling takes one. Select it, e.g. "
                "ds.isel(realization=0)."
            )
        period = _per_variable(hist, v, name, keys)
        plan, fields = make_plan(
            da,
            model=loaded.for_variable(v),
            method="cm",
            scale=_per_variable(scale, v, name, keys),
            members=members,
            seed=seed,
            steps=steps,
            qdm=_per_variable(qdm, v, name, keys),
            hist=period[name] if isinstance(period, xr.Dataset) else period,
            regrid=regrid,
            lowpass=lowpass,
            units=_per_variable(units, v, name, keys),
            device=device,
            batch_size=batch_size,
            precision=precision,
            member_dim=member_dim,
            progress=progress,
            scale_sample=scale_sample,
            qdm_kwargs=_per_variable(qdm_kwargs, v, name, keys),
            preserve=_per_variable(preserve, v, name, keys),
            fields=True,
        )
        assert fields is not None
        plans.append(plan)
        prepared.append(fields)
    sigmas = [p.sigma() for p in plans]
    resolved = [s for s in sigmas if isinstance(s, float)]
    if plans[0].steps > 1 and len(set(resolved)) > 1:
        raise InputError(
            f"steps={plans[0].steps} with a different noise level per variable "
            f"({dict(zip(matched, resolved, strict=False))}): multistep sampling needs one level for all. "
            "Use steps=1, or one scale for all variables."
        )
    time = find_time(prepared[0])
    try:
        stacked = xr.concat(
            [f.drop_attrs() for f in prepared],
            dim=VARIABLE_DIM,
            join="exact",
            coords="minimal",
            compat="override",
        )
    except ValueError as err:
        raise InputError(
            f"The variables {list(matched.values())} must share their time steps and grid to be downscaled "
            f"together: {err}"
        ) from err
    stacked = stacked.assign_coords({VARIABLE_DIM: list(matched)})
    values = denoise(
        stacked,
        loaded,
        method="cm",
        sigma=sigmas,
        steps=plans[0].steps,
        seed=int(seed),
        members=int(members),
        device=plans[0].device,
        batch_size=plans[0].batch_size,
        precision=precision,
        progress=progress,
        time=time,
    )
    out = xr.Dataset(attrs=dict(ds.attrs))
    for i, (plan, fields, name) in enumerate(zip(plans, prepared, matched.values(), strict=True)):
        out[name] = plan.finish(ds[name], fields, values.isel({VARIABLE_DIM: i}, drop=True))
    out.attrs["downscale_model"] = loaded.name
    out.attrs["downscale_variables"] = ", ".join(f"{v} <- {n}" for v, n in matched.items())
    return out
