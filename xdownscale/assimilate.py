"""Score-based data assimilation on DataArrays: SLAMS (latent) and SDA (pixel space).

``slams(background, model=..., stations=..., satellite=...)`` returns an ensemble of analyses of the
state trajectory ``background`` given observations: every modality enters as a Gaussian likelihood
through its differentiable observation operator (Qu et al. 2024, eq. 9; :mod:`xdownscale.core.vpsde`):

* the background itself (error std ``background_std``, default from the model card): the identity on
  the model grid, or area averages when the background lies on its own (coarser) grid;
* stations: bilinear interpolation of the state at the stations (:class:`BilinearPoints`);
* satellite pixels: area averages of the state cells (:class:`AreaAverage`);
* ``observations={"name": (DataArray, std)}``: more of either kind (point data are told from gridded
  data by their coordinates).

Observations and their error std are converted to the model's units, then into the model space with
the model's transform (std by a centred difference, exact for temperature; for log-transformed
precipitation the operators average in the log space: an approximation). NaN is a missing value.
SLAMS samples the latent of the model's autoencoder and differentiates the likelihoods through the
decoder; SDA samples the state directly. A trajectory is covered by windows of ``K`` states (the model's
window); a trajectory shorter than ``K`` is padded with unobserved states, which are dropped afterwards.
Member ``m`` draws its noise from ``(seed, first time stamp, m)``, so members do not depend on how many
are sampled at once.
"""

from __future__ import annotations

import datetime as _dt
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .errors import InputError, MissingCoordinateError, UnitError, XDownscaleWarning
from .xr.cf import find_grid, find_time, standard_layout

__all__ = ["sda", "slams"]

#: fewer predictor steps than this give a warning
MIN_STEPS = 32


def _load(model: Any, kind: str, device: str | None) -> Any:
    from .models.assimilation import AssimilationModel, load_assimilation_model

    if isinstance(model, AssimilationModel):
        m = model
    elif isinstance(model, (str, Path)):
        m = load_assimilation_model(model)
    else:
        raise InputError(
            f"model={model!r} is not the name or path of an assimilation model, nor a loaded one; train one "
            "with xdownscale.models.assimilation.train_assimilation(kind='slams', ...)."
        )
    if m.kind != kind:
        raise InputError(
            f"Model '{m.name}' is a '{m.kind}' model; {kind}() needs a '{kind}' model. Call "
            f"xdownscale.assimilate.{m.kind}(...) instead, or pass a '{kind}' model."
        )
    return m.to(device) if device is not None else m


def _same_grid(da: xr.DataArray, grid_ds: xr.Dataset) -> bool:
    g, t = find_grid(da), find_grid(grid_ds)
    if g.shape(da) != t.shape(grid_ds):
        return False
    return bool(
        np.allclose(da[g.lat].values, grid_ds[t.lat].values, atol=1e-6)
        and np.allclose(np.mod(da[g.lon].values, 360.0), np.mod(grid_ds[t.lon].values, 360.0), atol=1e-6)
    )


def _to_model_space(model: Any, values: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Observations and error std in the model space; the std maps through the transform's secant over
    ``[value - std, value + std]`` (exact for affine transforms, as for temperature)."""
    values = np.asarray(values, dtype=np.float64)
    std = np.broadcast_to(np.asarray(std, dtype=np.float64), values.shape)
    finite = np.isfinite(values)
    v = np.where(finite, values, 0.0)
    log = bool(model.transform.log)
    if log:
        v = np.maximum(v, 0.0)
    lower = np.maximum(v - std, 0.0) if log else v - std
    slope = (model.to_model_space(v + std) - model.to_model_space(lower)) / (v + std - lower)
    return np.where(finite, model.to_model_space(v), np.nan), slope * std


def _template(model: Any, times: xr.DataArray, units: str) -> xr.DataArray:
    grid = model.grid
    ny, nx = model.shape
    ydim, xdim = model.card["grid"]["dims"]
    tname = str(times.dims[0])
    return xr.DataArray(
        np.broadcast_to(np.float32(0.0), (times.size, ny, nx)),
        dims=(tname, ydim, xdim),
        coords={tname: times, **{k: v for k, v in grid.coords.items()}},
        attrs={"units": units},
    )


def _classify(da: xr.DataArray) -> str:
    from .xr.observations import find_points

    try:
        find_points(da)
        return "stations"
    except MissingCoordinateError:
        pass
    try:
        find_grid(da)
        return "satellite"
    except MissingCoordinateError:
        raise MissingCoordinateError(
            f"Observations {da.name!r} have neither station latitude/longitude along a station dimension nor "
            "a latitude/longitude grid. Set the CF attributes (standard_name 'latitude'/'longitude') "
            "on their "
            "coordinates."
        ) from None


def _assimilate(
    kind: str,
    background: xr.DataArray,
    *,
    model: Any,
    stations: xr.DataArray | None,
    satellite: xr.DataArray | None,
    observations: Mapping[str, tuple[xr.DataArray, Any]] | None,
    stations_std: Any,
    satellite_std: Any,
    background_std: float | None,
    members: int,
    steps: int,
    corrections: int,
    tau: float,
    gamma: float,
    seed: int,
    device: str | None,
    batch_size: int | None,
    progress: bool,
) -> xr.DataArray:
    import torch

    from .core.observations import AreaAverage, BilinearPoints
    from .core.rng import KeyedNoise, sample_key
    from .core.vpsde import ETA, VPSDE, Modality, PosteriorEps, WindowedEps, sample_vp
    from .xr.observations import satellite_on_grid, stations_on_grid
    from .xr.units import convert_units

    if not isinstance(background, xr.DataArray):
        raise InputError(f"background must be an xarray.DataArray, got {type(background).__name__}.")
    if int(members) < 1:
        raise InputError(f"members must be >= 1, got {members}.")
    if steps < MIN_STEPS:
        warnings.warn(
            f"steps={steps} is a coarse discretisation of the reverse SDE (below {MIN_STEPS}); the analysis "
            "can be inaccurate, and unstable for very precise observations. The paper uses 512.",
            XDownscaleWarning,
            stacklevel=3,
        )
    m = _load(model, kind, device)
    units = m.variable["units"]
    label = f"'{background.name}'" if background.name is not None else "the background"
    tname = find_time(background)
    bgrid = find_grid(background)
    extra = [d for d in background.dims if d not in (tname, bgrid.ydim, bgrid.xdim)]
    if extra:
        raise InputError(
            f"{label} has the dimensions {extra} besides time and the grid; model '{m.name}' assimilates one "
            f"variable on one level. Select one, e.g. background.isel({extra[0]}=0)."
        )
    try:
        bg = convert_units(background, units)
    except UnitError as err:
        raise UnitError(f"{err} Model '{m.name}' works in '{units}' ({m.variable.get('kind')}).") from None
    bg = standard_layout(bg, bgrid).transpose(tname, bgrid.ydim, bgrid.xdim)
    times = bg[tname]
    n_time = times.size
    template = _template(m, times, bg.attrs["units"])
    ny, nx = m.shape
    K = m.window
    length = max(n_time, K)
    dev = m.device

    # (name, operator, y (length, 1, M), std (length, 1, M)) in the model space
    mods: list[tuple[str, Any, np.ndarray, np.ndarray]] = []

    def pad(values: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        y, s = _to_model_space(m, values, std)
        yp = np.full((length, *y.shape[1:]), np.nan)
        sp_ = np.ones((length, *y.shape[1:]))
        yp[:n_time], sp_[:n_time] = y, s
        return yp[:, None], sp_[:, None]

    bstd = float(background_std if background_std is not None else m.background_std)
    if not np.isfinite(bstd) or bstd <= 0:
        raise InputError(f"background_std must be a positive number (in '{units}'), got {background_std!r}.")
    if _same_grid(bg, m.grid):
        vals = np.asarray(bg.values, dtype=np.float64)
        vals = np.where(m.mask[None], vals, np.nan)
        if not np.isfinite(vals).any():
            raise InputError(
                f"All values of the background {label} are missing (NaN); nothing to assimilate."
            )
        y, s = pad(vals.reshape(n_time, -1), np.full(ny * nx, bstd))
        mods.append(("background", lambda x: x.flatten(-2), y, s))
    else:
        sat = satellite_on_grid(bg, template, std=bstd)
        y, s = pad(sat.values, sat.std)
        mods.append(("background", AreaAverage(sat.weights, shape=(ny, nx)), y, s))

    extra_obs: list[tuple[str, xr.DataArray, Any, str]] = []
    if stations is not None:
        extra_obs.append(("stations", stations, stations_std, "stations"))
    if satellite is not None:
        extra_obs.append(("satellite", satellite, satellite_std, "satellite"))
    for name, value in (observations or {}).items():
        if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], xr.DataArray)):
            raise InputError(
                f"observations['{name}'] must be a tuple (DataArray, error std), got {type(value).__name__}."
            )
        extra_obs.append((str(name), value[0], value[1], _classify(value[0])))
    for name, da, std, what in extra_obs:
        if not isinstance(da, xr.DataArray):
            raise InputError(f"{name} must be an xarray.DataArray, got {type(da).__name__}.")
        if what == "stations":
            so = stations_on_grid(da, template, std=std)
            op: Any = BilinearPoints(so.iy, so.ix, shape=(ny, nx), periodic=m.periodic)
            y, s = pad(so.values, so.std)
        else:
            sa = satellite_on_grid(da, template, std=std)
            op = AreaAverage(sa.weights, shape=(ny, nx))
            y, s = pad(sa.values, sa.std)
        mods.append((name, op, y, s))

    sde = VPSDE(float(m.card["assimilation"].get("eta", ETA)))
    prior = WindowedEps(m.score_net, K, sde)
    ae = m.autoencoder
    if kind == "slams":
        if ae is None:
            raise InputError(f"Model '{m.name}' has no autoencoder; it cannot be used for SLAMS.")
        lh, lw = ae.latent_size((ny, nx))
        sample_shape = (length, ae.latent_channels, lh, lw)

        def decoder(z: torch.Tensor) -> torch.Tensor:
            b = z.shape[0]
            return ae.decode(z.reshape(b * length, *z.shape[2:]), size=(ny, nx)).reshape(b, length, 1, ny, nx)
    else:
        sample_shape = (length, 1, ny, nx)
        decoder = None  # type: ignore[assignment]

    def operator(op: Any) -> Any:
        return lambda x: op(x)

    modalities = [
        Modality(
            operator(op),
            torch.as_tensor(y, dtype=torch.float32, device=dev),
            torch.as_tensor(s, dtype=torch.float32, device=dev),
            name,
        )
        for name, op, y, s in mods
    ]
    posterior = PosteriorEps(prior, modalities, sde, gamma=gamma, decoder=decoder, steps=steps)
    t0 = np.asarray(times.values[:1]).astype("datetime64[ns]").astype(np.int64)[0] if n_time else 0
    keys = [sample_key("assimilate", kind, int(t0), int(n_time), member) for member in range(members)]
    bsz = int(batch_size or members)
    outs = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps * -(-members // bsz), desc=f"{kind} analysis", leave=False)
    for i in range(0, members, bsz):
        noise = KeyedNoise(keys[i : i + bsz], seed=int(seed), shape=sample_shape, device=dev)
        x = sample_vp(
            posterior,
            (len(noise), *sample_shape),
            noise=noise,
            sde=sde,
            steps=steps,
            corrections=corrections,
            tau=tau,
            callback=(lambda _: bar.update(1)) if bar else None,
        )
        with torch.no_grad():
            state = decoder(x) if decoder is not None else x
        outs.append(state[:, :n_time, 0].cpu().numpy())
    if bar is not None:
        bar.close()
    analysis = np.concatenate(outs)  # (member, time, ny, nx) in the model space
    phys = np.asarray(m.from_model_space(analysis), dtype=np.float32)
    phys = np.where(m.mask[None, None], phys, np.nan).transpose(1, 0, 2, 3)
    ydim, xdim = m.card["grid"]["dims"]
    out = xr.DataArray(
        phys,
        dims=(tname, "member", ydim, xdim),
        coords={tname: times, "member": np.arange(members), **dict(m.grid.coords.items())},
        name=background.name if background.name is not None else m.variable["name"],
        attrs=_attrs(
            background,
            m,
            kind=kind,
            names=[n for n, *_ in mods],
            members=members,
            steps=steps,
            corrections=corrections,
            tau=tau,
            gamma=gamma,
            seed=seed,
            units=units,
        ),
    )
    return out


def _attrs(
    background: xr.DataArray,
    m: Any,
    *,
    kind: str,
    names: list[str],
    members: int,
    steps: int,
    corrections: int,
    tau: float,
    gamma: float,
    seed: int,
    units: str,
) -> dict[str, Any]:
    from . import __version__

    attrs: dict[str, Any] = {"units": units}
    for key in ("standard_name", "long_name"):
        value = background.attrs.get(key) or m.variable.get(key)
        if value:
            attrs[key] = value
    config = {
        "method": kind,
        "modalities": names,
        "members": members,
        "steps": steps,
        "corrections": corrections,
        "tau": tau,
        "gamma": gamma,
        "seed": seed,
    }
    attrs["assimilation_model"] = m.name
    attrs["assimilation_model_version"] = str(m.version)
    attrs["assimilation_model_sha256"] = m.sha256
    attrs["assimilation_config"] = json.dumps(config)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    entry = (
        f"{now}: xdownscale {__version__} {kind.upper()} data assimilation of {', '.join(names)} with model "
        f"'{m.name}' v{m.version} (sha256 {m.sha256}), members {members}, steps {steps}, corrections "
        f"{corrections}, tau {tau}, gamma {gamma}, seed {seed}"
    )
    previous = background.attrs.get("history")
    attrs["history"] = f"{previous}\n{entry}" if previous else entry
    return attrs


_DOC = """Analysis ensemble of ``background`` given observations, by {what}.

    Parameters
    ----------
    background
        The model state trajectory ``(time, lat, lon)`` with units (on the model grid, or on its own grid:
        then its cells enter as area averages).
    model
        A ``"{kind}"`` model: name, path, or :class:`~xdownscale.models.assimilation.AssimilationModel`.
    stations
        ``(time, station)`` observations with latitude/longitude along ``station``; stations outside the
        domain are dropped with a warning.
    satellite
        Gridded observations on their own grid (area averages of the state).
    observations
        More modalities: ``{{name: (DataArray, error std)}}``.
    stations_std, satellite_std
        Observation error std in the observations' units (a number or per station); default: the
        coordinate or attribute ``error_std``.
    background_std
        Background error std in the model's units; default: the model card's.
    members
        Ensemble size.
    steps, corrections, tau, gamma
        Predictor steps (paper: 512), Langevin corrections per step (1), Langevin amplitude (0.5) and
        likelihood stability weight (1e-2).
    seed
        Same seed, same ensemble (member ``m`` never depends on the batch).
    device
        Torch device for the networks (default: where the model is).
    batch_size
        Members sampled at once (default: all).
    progress
        Show a progress bar.

    Returns
    -------
    xarray.DataArray
        ``(time, member, lat, lon)`` in the model's units, with CF attributes and a history entry.

    Raises
    ------
    MissingCoordinateError
        Stations without latitude/longitude, data without time or grid.
    UnitError
        Units missing or not convertible to the model's.
    GridMismatchError
        A satellite (or background) grid that does not overlap the model grid; no station inside it.
    InputError
        All observations missing, no common time steps, no error std, bad arguments, wrong model kind.
    """


def slams(
    background: xr.DataArray,
    *,
    model: Any,
    stations: xr.DataArray | None = None,
    satellite: xr.DataArray | None = None,
    observations: Mapping[str, tuple[xr.DataArray, Any]] | None = None,
    stations_std: Any = None,
    satellite_std: Any = None,
    background_std: float | None = None,
    members: int = 16,
    steps: int = 512,
    corrections: int = 1,
    tau: float = 0.5,
    gamma: float = 1e-2,
    seed: int = 0,
    device: str | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> xr.DataArray:
    # every argument is passed on as it is: the two methods differ only in the model kind
    return _assimilate("slams", **locals())


def sda(
    background: xr.DataArray,
    *,
    model: Any,
    stations: xr.DataArray | None = None,
    satellite: xr.DataArray | None = None,
    observations: Mapping[str, tuple[xr.DataArray, Any]] | None = None,
    stations_std: Any = None,
    satellite_std: Any = None,
    background_std: float | None = None,
    members: int = 16,
    steps: int = 512,
    corrections: int = 1,
    tau: float = 0.5,
    gamma: float = 1e-2,
    seed: int = 0,
    device: str | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> xr.DataArray:
    # every argument is passed on as it is: the two methods differ only in the model kind
    return _assimilate("sda", **locals())


slams.__doc__ = _DOC.format(what="latent score-based data assimilation (SLAMS, Qu et al. 2024)", kind="slams")
sda.__doc__ = _DOC.format(
    what="pixel-space score-based data assimilation (SDA, Rozet & Louppe 2023)", kind="sda"
)
