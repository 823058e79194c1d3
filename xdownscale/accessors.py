"""The ``.downscale`` accessor on :class:`xarray.DataArray` (and, on :class:`xarray.Dataset`, a pointer to
the variable to select).

Accessor methods only forward to the functional API (``xdownscale.regrid``, ``xdownscale.downscale``,
...): they validate nothing themselves, cache nothing on the accessor and do no work at construction.
Heavy modules (torch, the regridders) are imported inside the methods, so ``import xdownscale`` stays
cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import xarray as xr

from .assimilate import DEFAULT_LIKELIHOOD, DEFAULT_MEMBERS, DEFAULT_STEPS

if TYPE_CHECKING:  # pragma: no cover
    from .models.loading import ModelLike
    from .planning import Plan
    from .xr.qdm import QDM
    from .xr.spectra import Scale

__all__ = ["AssimilateAccessor", "DatasetDownscaleAccessor", "DownscaleAccessor"]


@xr.register_dataarray_accessor("downscale")
class DownscaleAccessor:
    """Downscale, bias-correct and analyse a coarse climate-model field.

    Examples
    --------
    >>> import xdownscale
    >>> from xdownscale.datasets import synthetic_precipitation
    >>> pr = synthetic_precipitation(ny=16, nx=24, ntime=4)
    >>> pr.downscale.upscale(factor=2).sizes["lat"]
    8
    """

    def __init__(self, da: xr.DataArray) -> None:
        self._da = da

    # -- the call users came for -------------------------------------------------------------------
    def cm(
        self,
        model: ModelLike,
        *,
        scale: Any = "auto",
        members: int = 1,
        seed: int = 0,
        steps: int = 1,
        qdm: bool | QDM = False,
        hist: slice | xr.DataArray | None = None,
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
        """Downscale with a consistency model: noise to ``scale`` and denoise in ``steps`` calls; the
        input's large scales are kept (``preserve``).

        Forwards to :func:`xdownscale.downscale` with ``method="cm"``; see there for every argument.
        """
        keywords = {k: v for k, v in locals().items() if k != "self"}  # forwarded as they are
        from .api import downscale

        return downscale(self._da, method="cm", **keywords)

    def sde(
        self,
        model: ModelLike,
        *,
        scale: Any = "auto",
        members: int = 1,
        seed: int = 0,
        steps: int = 500,
        qdm: bool | QDM = False,
        hist: slice | xr.DataArray | None = None,
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
        """Downscale with the score-based SDE bridge baseline (slow: ``steps`` network calls).

        Forwards to :func:`xdownscale.downscale` with ``method="sde"``; see there for every argument.
        """
        keywords = {k: v for k, v in locals().items() if k != "self"}  # forwarded as they are
        from .api import downscale

        return downscale(self._da, method="sde", **keywords)

    def plan(
        self,
        model: ModelLike,
        *,
        method: str | None = None,
        scale: Any = "auto",
        members: int = 1,
        seed: int = 0,
        steps: int | None = None,
        qdm: bool | QDM = False,
        hist: slice | xr.DataArray | None = None,
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
        """Resolve a downscaling of this field once (model, QDM fit, scale, settings) to apply to any
        period: ``p = hist.downscale.plan(model, qdm=True); p.apply(future)``.

        Forwards to :func:`xdownscale.plan`; ``method`` defaults to the model's kind (``"cm"`` or
        ``"sde"``).
        """
        keywords = {k: v for k, v in locals().items() if k != "self"}  # forwarded as they are
        from .api import plan

        return plan(self._da, **keywords)

    def prepare(
        self,
        model: ModelLike,
        *,
        regrid: str = "bilinear",
        lowpass: bool = True,
        qdm: bool | QDM = False,
        hist: slice | xr.DataArray | None = None,
        units: str | None = None,
        transform: bool = True,
        qdm_kwargs: dict[str, Any] | None = None,
    ) -> xr.DataArray:
        """Everything up to the network input (units, regrid, low-pass, QDM, transform).

        Forwards to :func:`xdownscale.prepare`.
        """
        keywords = {k: v for k, v in locals().items() if k != "self"}  # forwarded as they are
        from .api import prepare

        return prepare(self._da, **keywords)

    def select_scale(
        self, model: ModelLike | None = None, *, psd_fine: xr.DataArray | None = None, **kwargs: Any
    ) -> Scale:
        """The scale ``scale="auto"`` would pick: where this field's spectrum meets the model's.

        With ``model``, forwards to :func:`xdownscale.api.select_scale`; with ``psd_fine`` (a target
        spectrum), to :func:`xdownscale.select_scale` on this field's spectrum.
        """
        from .api import select_scale

        return select_scale(self._da, model=model, psd_fine=psd_fine, **kwargs)

    # -- building blocks -----------------------------------------------------------------------------
    def regrid(
        self, target: xr.DataArray | xr.Dataset, method: str = "bilinear", **kwargs: Any
    ) -> xr.DataArray:
        """Regrid onto the grid of ``target``. Forwards to :func:`xdownscale.regrid`."""
        from .xr.regrid import regrid

        return regrid(self._da, target, method=method, **kwargs)

    def qdm(
        self,
        ref: xr.DataArray | None = None,
        hist: xr.DataArray | None = None,
        *,
        qdm: QDM | None = None,
        **kwargs: Any,
    ) -> xr.DataArray:
        """Bias-correct with quantile delta mapping. Forwards to :func:`xdownscale.apply_qdm`."""
        from .xr.qdm import apply_qdm

        return apply_qdm(self._da, ref=ref, hist=hist, qdm=qdm, **kwargs)

    def psd(self, **kwargs: Any) -> xr.DataArray:
        """Radially averaged power spectral density. Forwards to :func:`xdownscale.psd`."""
        from .xr.spectra import psd

        return psd(self._da, **kwargs)

    def upscale(self, factor: int = 4) -> xr.DataArray:
        """Block-average ``factor`` x ``factor`` cells. Forwards to :func:`xdownscale.upscale`."""
        from .xr.spectra import upscale

        return upscale(self._da, factor=factor)

    def lowpass(self, wavenumber: float) -> xr.DataArray:
        """Keep scales with wavenumber <= ``wavenumber``. Forwards to :func:`xdownscale.lowpass`."""
        from .xr.spectra import lowpass

        return lowpass(self._da, wavenumber)


@xr.register_dataarray_accessor("assimilate")
class AssimilateAccessor:
    """Calibrate a background state with station and gridded (satellite-like) observations.

    ``background.assimilate.slams(model=..., stations=st, satellite=sat, members=16)`` returns an ensemble
    of analyses (latent score-based data assimilation); ``.sda(...)`` is the pixel-space baseline. Both
    forward to :mod:`xdownscale.assimilate`.
    """

    def __init__(self, da: xr.DataArray) -> None:
        self._da = da

    def slams(
        self,
        model: ModelLike,
        *,
        stations: xr.DataArray | None = None,
        satellite: xr.DataArray | None = None,
        observations: Mapping[str, tuple[xr.DataArray, Any]] | None = None,
        stations_std: Any = None,
        satellite_std: Any = None,
        background_std: float | None = None,
        members: int = DEFAULT_MEMBERS,
        steps: int = DEFAULT_STEPS,
        corrections: int | None = None,
        tau: float = 0.5,
        gamma: float = 1e-2,
        likelihood: str = DEFAULT_LIKELIHOOD,
        seed: int = 0,
        device: str | None = None,
        batch_size: int | None = None,
        progress: bool | None = None,
    ) -> xr.DataArray:
        """Latent score-based data assimilation of this background; see :func:`xdownscale.assimilate.slams`
        for every argument."""
        from .assimilate import slams

        kwargs = {k: v for k, v in locals().items() if k not in ("self", "slams")}
        return slams(self._da, **kwargs)

    def sda(
        self,
        model: ModelLike,
        *,
        stations: xr.DataArray | None = None,
        satellite: xr.DataArray | None = None,
        observations: Mapping[str, tuple[xr.DataArray, Any]] | None = None,
        stations_std: Any = None,
        satellite_std: Any = None,
        background_std: float | None = None,
        members: int = DEFAULT_MEMBERS,
        steps: int = DEFAULT_STEPS,
        corrections: int | None = None,
        tau: float = 0.5,
        gamma: float = 1e-2,
        likelihood: str = DEFAULT_LIKELIHOOD,
        seed: int = 0,
        device: str | None = None,
        batch_size: int | None = None,
        progress: bool | None = None,
    ) -> xr.DataArray:
        """Pixel-space score-based data assimilation of this background; see
        :func:`xdownscale.assimilate.sda` for every argument."""
        from .assimilate import sda

        kwargs = {k: v for k, v in locals().items() if k not in ("self", "sda")}
        return sda(self._da, **kwargs)


@xr.register_dataset_accessor("downscale")
class DatasetDownscaleAccessor:
    """``ds.downscale.cm(model=...)`` downscales several variables together with a joint model (see
    :func:`xdownscale.downscale_dataset`).

    A model of one variable downscales a DataArray: every other use raises
    :class:`~xdownscale.errors.InputError` naming the Dataset's data variables, e.g. "use
    ds['pr'].downscale.cm(...)".

    Examples
    --------
    >>> import xdownscale
    >>> from xdownscale.datasets import synthetic_precipitation
    >>> ds = synthetic_precipitation(ny=4, nx=4, ntime=2).to_dataset(name="pr")
    >>> ds.downscale.cm(model="cm-eobs-iberia-0.25deg-pr")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    xdownscale.errors.InputError: ds.downscale.cm works on one variable ... ds['pr'].downscale.cm(...).
    """

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    def cm(
        self,
        model: ModelLike,
        *,
        variables: Mapping[str, str] | None = None,
        scale: Any = "auto",
        members: int = 1,
        seed: int = 0,
        steps: int = 1,
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
        """Downscale the Dataset's variables together with a joint consistency model; settings may be
        given per variable (``scale={"pr": "auto", "tas": "300 km"}``).

        Forwards to :func:`xdownscale.downscale_dataset`; see there for every argument.
        """
        keywords = {k: v for k, v in locals().items() if k != "self"}  # forwarded as they are
        from .models import resolve_model

        resolved = resolve_model(model)
        if not getattr(resolved, "joint", False):
            self._pointer("cm")
        from .joint import downscale_dataset

        return downscale_dataset(self._ds, **{**keywords, "model": resolved})

    def _pointer(self, name: str) -> Any:
        from .errors import InputError

        names = [str(n) for n in self._ds.data_vars]
        if not names:
            raise InputError(
                f"ds.downscale.{name} works on one variable (a DataArray), but this Dataset has no data "
                "variables. Open the file that holds the field to downscale."
            )
        gridded = [n for n in names if self._ds[n].ndim >= 3] or names
        raise InputError(
            f"ds.downscale.{name} works on one variable (a DataArray), but this Dataset holds {names}. "
            f"Select it: ds['{gridded[0]}'].downscale.{name}(...)."
            + (
                " (A joint model of several variables downscales them together: ds.downscale.cm(model=...).)"
                if name == "cm" and len(names) > 1
                else ""
            )
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._pointer(name)
