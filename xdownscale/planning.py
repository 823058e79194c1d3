"""A downscaling resolved once: :class:`Plan` (model, QDM fit, scale, settings) and :func:`make_plan`,
which resolves it from the arguments of :func:`xdownscale.downscale`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from .errors import InputError
from .generation import (
    MEAN_RULES,
    denoise,
    flag_out_of_range,
    output_attrs,
    preserve_rule,
    preserve_scales,
)
from .preparation import (
    DEFAULT_STEPS,
    INPUT_WAVENUMBER_ATTR,
    PendingScale,
    check_call,
    check_input,
    check_sigma,
    finish,
    fit_qdm,
    hist_on_model_grid,
    input_ensemble,
    input_psd,
    is_auto,
    keeping_time_chunks,
    label,
    model_mask,
    resolve_scale,
    resolved_model,
    to_model_grid,
)
from .xr.cf import find_time

if TYPE_CHECKING:
    from .models.model import Model

__all__ = ["Plan", "make_plan"]


def _downscale_on_device(plan: Plan, da: xr.DataArray, prepared: xr.DataArray | None) -> xr.DataArray:
    from .ondevice import downscale_on_device

    return downscale_on_device(plan, da, prepared)


@dataclass(frozen=True)
class Plan:
    """One downscaling with everything resolved once: the model, the fitted QDM, the scale (and its
    noise level) and the settings. :meth:`apply` runs it on any period of the same input (a future
    period with the historical period's QDM and scale); :meth:`to_dict` is its stable fingerprint.

    Made by :func:`xdownscale.plan` (or ``da.downscale.plan(...)``); :func:`xdownscale.downscale` is
    ``plan(da, ...).apply(da)``.
    """

    model: Model
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
        return not isinstance(self.scale, PendingScale)

    def compute(self) -> Plan:
        """This plan with its lazy parts computed: the QDM's quantiles loaded and a pending ``"auto"``
        scale resolved, so that :meth:`to_dict` and the output's attributes name them."""
        from .xr.qdm import QDM

        qdm = self.qdm
        if qdm is not None:
            qdm = QDM.from_dataset(qdm.to_dataset().compute())
        scale = self.scale if self.scale_resolved else self.scale.resolve(self.model)
        if not self.scale_resolved:
            check_sigma(scale, self.model)
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

    def regridded(self, da: xr.DataArray) -> xr.DataArray:
        """``da`` on the model grid under this plan, before bias correction (model units)."""
        checked, grid, _ = check_input(da, self.model, self.units)
        return to_model_grid(
            checked, grid, self.model, regrid=self.regrid, lowpass=self.lowpass, units=self.units
        )

    def prepare(self, da: xr.DataArray) -> xr.DataArray:
        """``da`` as the network sees it under this plan (units, regrid, low-pass, QDM, transform)."""
        fine = self.regridded(da)
        if self.qdm is not None:
            fine = keeping_time_chunks(fine, self.qdm.adjust)
        return finish(fine, self.model, True)

    def apply(self, da: xr.DataArray) -> xr.DataArray:
        """Downscale ``da`` (any period of the input the plan was made for) with this plan; see
        :func:`xdownscale.downscale` for the output."""
        if input_ensemble(da) is not None:
            raise InputError(
                f"{label(da)} has several realizations; a plan belongs to one. Make a plan per "
                "realization, or call da.downscale.cm(...) on the ensemble."
            )
        if self.on_device:
            prepared = self.prepare(da) if self.qdm is not None else None
            return self._label(da, _downscale_on_device(self, da, prepared))
        return self._apply(da, self.prepare(da))

    @property
    def on_device(self) -> bool:
        """Whether this plan runs its whole chain on its device (:mod:`xdownscale.ondevice`) instead of
        preparing the fields with xarray on the CPU."""
        from .ondevice import runs_on_device

        return runs_on_device(self.device, self.model, self.preserve, self.qdm is not None)

    def sampling(self) -> dict[str, Any]:
        """The settings of the noising and denoising (method, steps, seed, members, device, batch size,
        precision) as keyword arguments."""
        return {
            "method": self.method,
            "steps": self.steps,
            "seed": self.seed,
            "members": self.members,
            "device": self.device,
            "batch_size": self.batch_size,
            "precision": self.precision,
        }

    def sigma(self) -> Any:
        """sigma(t*) of the scale: a float, or a lazy dask scalar while ``"auto"`` waits for lazy data."""
        return self.scale.sigma(self.model) if not self.scale_resolved else float(self.scale.sigma)

    def _apply(self, da: xr.DataArray, prepared: xr.DataArray | None) -> xr.DataArray:
        if self.on_device:
            return self._label(da, _downscale_on_device(self, da, prepared))
        if prepared is None:
            prepared = self.prepare(da)
        values = denoise(
            prepared,
            self.model,
            sigma=self.sigma(),
            progress=self.progress,
            time=find_time(prepared),
            **self.sampling(),
        )
        return self.finish(da, prepared, values)

    def finish(self, da: xr.DataArray, prepared: xr.DataArray, values: xr.DataArray) -> xr.DataArray:
        """Step 7 for the denoised ``values`` (time, member, y, x) of ``prepared`` (``da`` prepared under
        this plan): the inverse transform, the mask, the large scales kept, the range check, the caller's
        units, the member dimension and the attributes."""
        model = self.model
        # generated drizzle is dry; with a mean rule it moves onto the wet cells of its coarse cell
        out = model.transform.inverse(values, dry=self.preserve not in MEAN_RULES)
        out = out.where(model_mask(model))
        if self.preserve is not None:
            # bias correction's change over each input cell, from the input before it
            base = None
            if self.preserve in MEAN_RULES and self.qdm is not None:
                base = self.regridded(da).where(model_mask(model))
            out = preserve_scales(
                out, prepared, da, model, self.preserve, units=self.units, base=base, device=self.device
            )
        return self._label(da, out)

    def _label(self, da: xr.DataArray, out: xr.DataArray) -> xr.DataArray:
        """The range check, the caller's units, the member dimension, the name and the attributes of
        the output ``out`` (time, member, y, x; the model's units) of ``da``."""
        model = self.model
        out = flag_out_of_range(out, model)
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
            output_attrs(
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


def make_plan(
    da: xr.DataArray,
    *,
    model: object,
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
    fields: bool = False,
) -> tuple[Plan, xr.DataArray | None]:
    """The :class:`Plan` of ``da`` and ``da`` prepared under it (so downscale prepares it once).

    On the device route (:mod:`xdownscale.ondevice`) the prepared fields are lazy, and None for a given
    scale without bias correction: the plan does not use them. ``fields=True`` asks for them anyway
    (eager input stays eager)."""
    from .xr.qdm import QDM

    check_call(method, members, precision)
    # a loaded model the user moved to an accelerator runs there unless device= says otherwise
    placed = getattr(model, "device", None)
    placed = None if placed is None or str(placed) == "cpu" else str(placed)
    loaded = resolved_model(model)
    if loaded.kind != method:
        raise InputError(
            f"Model '{loaded.name}' is a '{loaded.kind}' model; method '{method}' needs a '{method}' "
            f"model. Use da.downscale.{loaded.kind}(...) or another model."
        )
    steps = DEFAULT_STEPS[method] if steps is None else int(steps)
    if steps < 1:
        raise InputError(f"steps={steps}: expected >= 1.")
    from .models.inference import choose_device

    dev = choose_device(device if device is not None else placed)
    if batch_size is None:
        batch_size = 64 if dev.type == "cuda" else 8
    rule = preserve_rule(preserve, loaded, bias_corrected=qdm is not False and qdm is not None)
    checked, grid, _ = check_input(da, loaded, units)
    from .ondevice import runs_on_device

    def _plan(chosen: Any, fitted: Any) -> Plan:
        return Plan(
            model=loaded,
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

    # on the device route the fields are prepared on the device: here only what the plan needs (the
    # sample of "auto"), lazily, and nothing for a given scale
    device_route = not fields and qdm in (False, None) and runs_on_device(str(dev), loaded, rule, False)
    lazy = device_route and checked.chunks is None
    fitted = None
    hist_fine = None
    if device_route and not is_auto(scale):
        chosen = resolve_scale(scale, loaded, None, sample=scale_sample)
        check_sigma(chosen, loaded)
        return _plan(chosen, None), None
    fine = to_model_grid(
        checked.chunk() if lazy else checked, grid, loaded, regrid=regrid, lowpass=lowpass, units=units
    )
    if isinstance(qdm, QDM):
        fitted = qdm
    elif qdm is True:
        hist_fine = hist_on_model_grid(fine, loaded, hist, regrid=regrid, lowpass=lowpass, units=units)
        fitted = fit_qdm(hist_fine, loaded, dict(qdm_kwargs or {}))
    elif qdm is not False and qdm is not None:
        raise InputError(f"qdm={qdm!r}: expected True, False or a fitted xdownscale.QDM.")
    prepared = finish(keeping_time_chunks(fine, fitted.adjust) if fitted else fine, loaded, True)
    chosen: Any
    if is_auto(scale):
        # one scale for every period: the QDM's historical period when there is one
        reference = prepared
        if hist is not None and hist_fine is not None and fitted is not None:
            reference = finish(keeping_time_chunks(hist_fine, fitted.adjust), loaded, True)
        if reference.chunks is not None and not lazy:
            from .xr.spectra import masked_estimator

            spectrum = input_psd(reference, scale_sample, masked_estimator(loaded.target_psd))
            chosen = PendingScale(spectrum, reference.attrs.get(INPUT_WAVENUMBER_ATTR))
        else:
            chosen = resolve_scale("auto", loaded, reference, sample=scale_sample)
    else:
        chosen = resolve_scale(scale, loaded, prepared, sample=scale_sample)
    if not isinstance(chosen, PendingScale):
        check_sigma(chosen, loaded)
    return _plan(chosen, fitted), prepared
