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
import itertools
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from .errors import GridMismatchError, InputError, MissingCoordinateError, UnitError, XDownscaleWarning
from .xr.cf import find_grid, find_time, standard_layout

if TYPE_CHECKING:
    from .models.assimilation import AssimilationModel
    from .models.loading import ModelLike

__all__ = [
    "PhysicalRangeWarning",
    "at_stations",
    "estimate_observation_error",
    "optimal_interpolation",
    "sda",
    "slams",
]

#: fewer predictor steps than this give a warning
MIN_STEPS = 32
#: default predictor steps and members (the best-scoring settings of docs/evaluation-assimilation.md)
DEFAULT_STEPS = 64
DEFAULT_MEMBERS = 16
#: Where the likelihood compares observations with the state (see slams/sda ``likelihood``)
LIKELIHOODS = ("model", "physical")
#: the default: it scored better on every precipitation case of docs/evaluation-assimilation.md
DEFAULT_LIKELIHOOD = "physical"
#: default Langevin corrections per step: the corrector helps SLAMS's latent prior but over-disperses the
#: pixel-space (SDA) prior of the shipped models (twin sweep in docs/evaluation-assimilation.md)
DEFAULT_CORRECTIONS = {"slams": 1, "sda": 0}
#: with ``progress=None`` a progress bar is shown from this many network calls on
PROGRESS_WORK = 2000


class PhysicalRangeWarning(XDownscaleWarning):
    """The analysis has values outside the physically plausible range of the model's variable."""


def _load(model: object, kind: str, device: str | None) -> AssimilationModel:
    from .models import resolve_model
    from .models.assimilation import AssimilationModel

    if isinstance(model, AssimilationModel):
        return _check_kind(model, kind).to(device) if device is not None else _check_kind(model, kind)
    if not isinstance(model, (str, Path)):
        raise InputError(
            f"model={model!r} is not the name or path of an assimilation model, nor a loaded one; train one "
            "with xdownscale.models.assimilation.train_assimilation(kind='slams', ...)."
        )
    m = resolve_model(model, device=device)  # read and hashed once per process
    if not isinstance(m, AssimilationModel):
        raise InputError(
            f"Model '{m.name}' is a '{m.kind}' (downscaling) model; {kind}() needs a '{kind}' model: train "
            "one with xdownscale.models.assimilation.train_assimilation(kind='slams', ...)."
        )
    return _check_kind(m, kind)


def _check_kind(m: AssimilationModel, kind: str) -> AssimilationModel:
    if m.kind != kind:
        raise InputError(
            f"Model '{m.name}' is a '{m.kind}' model; {kind}() needs a '{kind}' model. Call "
            f"xdownscale.assimilate.{m.kind}(...) instead, or pass a '{kind}' model."
        )
    return m


def _same_grid(da: xr.DataArray, grid_ds: xr.Dataset) -> bool:
    g, t = find_grid(da), find_grid(grid_ds)
    if g.shape(da) != t.shape(grid_ds):
        return False
    return bool(
        np.allclose(da[g.lat].values, grid_ds[t.lat].values, atol=1e-6)
        and np.allclose(np.mod(da[g.lon].values, 360.0), np.mod(grid_ds[t.lon].values, 360.0), atol=1e-6)
    )


def _to_model_space(
    model: AssimilationModel, values: np.ndarray, std: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
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


def _template(model: AssimilationModel, times: xr.DataArray, units: str) -> xr.DataArray:
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


def _masked_area_weights(weights: Any, mask: np.ndarray) -> tuple[Any, np.ndarray]:
    """Area-averaging weights restricted to the valid cells of ``mask`` (rows renormalised); rows with no
    valid cell are dropped. Returns (weights, kept rows)."""
    import scipy.sparse as sp

    w = sp.csr_matrix(weights) @ sp.diags(mask.ravel().astype(np.float64))
    rows = np.asarray(w.sum(axis=1)).ravel()
    keep = rows > 1e-9
    w = sp.diags(1.0 / rows[keep]) @ w[np.flatnonzero(keep)]
    return sp.csr_matrix(w), keep


def _auto_progress(progress: bool | None, work: int) -> bool:
    """``progress=None``: a bar when the sampling makes at least :data:`PROGRESS_WORK` network calls."""
    return bool(work >= PROGRESS_WORK) if progress is None else bool(progress)


def _check_plausible(phys: np.ndarray, m: AssimilationModel, label: str) -> None:
    """Warn about analysis values outside the model's training range widened by half its width
    (and below zero for precipitation): physically implausible values."""
    lo, hi = float(m.transform.data_min), float(m.transform.data_max)
    width = hi - lo
    upper = hi + 0.5 * width
    lower = 0.0 if m.transform.log else lo - 0.5 * width
    finite = phys[np.isfinite(phys)]
    if finite.size == 0:
        return
    bad = (finite > upper) | (finite < lower)
    if bad.any():
        units = m.variable["units"]
        warnings.warn(
            f"The analysis of {label} has {int(bad.sum())} values outside the plausible range "
            f"[{lower:.4g}, {upper:.4g}] {units} (the training range of model '{m.name}' widened by half its "
            f"width), from {finite.min():.4g} to {finite.max():.4g} {units}: the sampler has left the "
            "model's distribution. Check the observation errors (too small ones over-fit) and the units of "
            "the observations, or use more steps.",
            PhysicalRangeWarning,
            stacklevel=4,
        )


def _time_windows(background: xr.DataArray) -> list[slice] | None:
    """The background's dask chunks along time as slices (None for a background in memory)."""
    if not isinstance(background, xr.DataArray) or background.chunks is None:
        return None
    sizes = background.chunks[background.dims.index(find_time(background))]
    bounds = np.cumsum((0, *sizes))
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def _during(obs: xr.DataArray, times: np.ndarray) -> xr.DataArray | None:
    """``obs`` on the time steps from ``times[0]`` to ``times[-1]`` (None when it has none)."""
    t = np.asarray(obs[find_time(obs)].values)
    keep = np.nonzero((t >= times[0]) & (t <= times[-1]))[0]
    return obs.isel({find_time(obs): keep}) if keep.size else None


def _observed(da: xr.DataArray | None) -> xr.DataArray | None:
    """``da`` when it has any value (a window may have no observation of a modality), else None."""
    return da if da is not None and bool(np.isfinite(np.asarray(da.values)).any()) else None


def _window(
    kind: str,
    background: xr.DataArray,
    stations: xr.DataArray | None,
    satellite: xr.DataArray | None,
    observations: dict[str, tuple[xr.DataArray | None, Any]],
    options: dict[str, Any],
    dry: bool = False,
    threads: int = 0,
) -> xr.DataArray:
    """The analysis of one window (a dask task: its inputs arrive in memory); modalities without a value
    in the window are left out of it. ``threads``: the torch thread count of the call that built the graph."""
    if threads:
        from .models.inference import use_threads

        use_threads(threads)
    others = {k: (v, std) for k, (da, std) in observations.items() if (v := _observed(da)) is not None}
    return _assimilate_eager(
        kind,
        background,
        stations=_observed(stations),
        satellite=_observed(satellite),
        observations=others,
        _dry=dry,
        **options,
    )


def _assimilate(
    kind: str,
    background: xr.DataArray,
    *,
    stations: xr.DataArray | None,
    satellite: xr.DataArray | None,
    observations: Mapping[str, tuple[xr.DataArray, Any]] | None,
    **options: Any,
) -> xr.DataArray:
    """In memory for a background in memory; lazily, one analysis per time chunk, for a dask one."""
    windows = _time_windows(background)
    if windows is None:
        return _assimilate_eager(
            kind, background, stations=stations, satellite=satellite, observations=observations, **options
        )
    import dask
    import dask.array as dsa

    tname = find_time(background)
    given = {"stations": stations, "satellite": satellite}
    for name, value in (observations or {}).items():
        if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], xr.DataArray)):
            raise InputError(
                f"observations['{name}'] must be a tuple (DataArray, error std), got {type(value).__name__}."
            )
        given[str(name)] = value[0]
    for name, da in given.items():
        if da is not None and not isinstance(da, xr.DataArray):
            raise InputError(f"{name} must be an xarray.DataArray, got {type(da).__name__}.")
    all_times = np.asarray(background[tname].values)
    for name, da in given.items():
        if da is not None and all_times.size and _during(da, all_times) is None:
            raise InputError(
                f"No time step of {name} ({da.name!r}) lies within the background's "
                f"({all_times[0]} .. {all_times[-1]}). Select overlapping dates."
            )

    def inputs(window: slice) -> tuple[Any, ...]:
        bg = background.isel({tname: window})
        times = np.asarray(bg[tname].values)

        def pick(da: xr.DataArray | None) -> xr.DataArray | None:
            return None if da is None else _during(da, times)

        obs = {str(k): (pick(v[0]), v[1]) for k, v in (observations or {}).items()}
        return bg, pick(stations), pick(satellite), obs

    # the first window is checked at once (and gives the metadata): errors come at the call, not at compute
    bg0, st0, sa0, obs0 = dask.compute(*inputs(windows[0]))
    meta = _window(kind, bg0, st0, sa0, obs0, options, dry=True)
    from .models.inference import caller_threads

    parts = []
    for window in windows:
        task = dask.delayed(_window, pure=False)(kind, *inputs(window), options, threads=caller_threads())
        values = dask.delayed(lambda a: a.transpose(*meta.dims).values, pure=False)(task)
        shape = (window.stop - window.start, *meta.shape[1:])
        parts.append(dsa.from_delayed(values, shape=shape, dtype=meta.dtype))
    coords = {k: v for k, v in meta.coords.items() if tname not in v.dims}
    return xr.DataArray(
        dsa.concatenate(parts, axis=0),
        dims=meta.dims,
        coords={tname: background[tname], **coords},
        name=meta.name,
        attrs=meta.attrs,
    )


def _assimilate_eager(
    kind: str,
    background: xr.DataArray,
    *,
    model: ModelLike,
    stations: xr.DataArray | None,
    satellite: xr.DataArray | None,
    observations: Mapping[str, tuple[xr.DataArray, Any]] | None,
    stations_std: Any,
    satellite_std: Any,
    background_std: float | None,
    members: int,
    steps: int,
    corrections: int | None,
    tau: float,
    gamma: float,
    likelihood: str,
    seed: int,
    device: str | None,
    batch_size: int | None,
    progress: bool | None,
    _dry: bool = False,
) -> xr.DataArray:
    from .models.analysis import Observed, analyse, points_usable
    from .xr.observations import satellite_on_grid, stations_on_grid
    from .xr.units import convert_units

    if not isinstance(background, xr.DataArray):
        raise InputError(f"background must be an xarray.DataArray, got {type(background).__name__}.")
    if int(members) < 1:
        raise InputError(f"members must be >= 1, got {members}.")
    corrections = DEFAULT_CORRECTIONS[kind] if corrections is None else int(corrections)
    if steps < MIN_STEPS:
        warnings.warn(
            f"steps={steps} is a coarse discretisation of the reverse SDE (below {MIN_STEPS}); the analysis "
            f"can be inaccurate, and unstable for very precise observations. The default is {DEFAULT_STEPS}.",
            XDownscaleWarning,
            stacklevel=3,
        )
    if likelihood not in LIKELIHOODS:
        raise InputError(f"likelihood={likelihood!r}: expected one of {', '.join(map(repr, LIKELIHOODS))}.")
    m = _load(model, kind, device)
    units = m.variable["units"]
    in_physical_units = likelihood == "physical" and m.nonlinear
    label = f"'{background.name}'" if background.name is not None else "the background"
    tname = find_time(background)
    bgrid = find_grid(background)
    ens_dim = "member" if "member" in background.dims else None
    extra = [d for d in background.dims if d not in (tname, bgrid.ydim, bgrid.xdim, ens_dim)]
    if extra:
        raise InputError(
            f"{label} has the dimensions {extra} besides time, 'member' and the grid; model '{m.name}' "
            f"assimilates one variable on one level. Select one, e.g. background.isel({extra[0]}=0)."
        )
    source_units = background.attrs.get("units")
    try:
        bg = convert_units(background, units)
    except UnitError as err:
        raise UnitError(f"{err} Model '{m.name}' works in '{units}' ({m.variable.get('kind')}).") from None
    bg = standard_layout(bg, bgrid)
    # a background ensemble (e.g. the members of .downscale): analysis member k starts from background
    # member k mod M, so the background's spread is carried into the analysis ensemble
    bg_members = (
        [bg.isel(member=b).transpose(tname, bgrid.ydim, bgrid.xdim) for b in range(bg.sizes["member"])]
        if ens_dim
        else [bg.transpose(tname, bgrid.ydim, bgrid.xdim)]
    )
    bg = bg_members[0]
    times = bg[tname]
    n_time = times.size
    template = _template(m, times, bg.attrs["units"])
    ny, nx = m.shape
    K = m.window
    length = max(n_time, K)
    mask = m.mask
    if kind == "slams" and m.autoencoder is None:
        raise InputError(f"Model '{m.name}' has no autoencoder; it cannot be used for SLAMS.")

    # the modalities on the model grid: y and std in the model space, or in physical units with
    # likelihood='physical'; area means and points act on the state in physical units (no Jensen bias)
    mods: list[Observed] = []

    def pad(
        values: np.ndarray, std: np.ndarray, physical_units: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        if in_physical_units and physical_units:
            y = np.asarray(values, dtype=np.float64)
            s = np.broadcast_to(np.asarray(std, dtype=np.float64), y.shape)
        else:
            y, s = _to_model_space(m, values, std)
        yp = np.full((length, *y.shape[1:]), np.nan)
        sp_ = np.ones((length, *y.shape[1:]))
        yp[:n_time], sp_[:n_time] = y, s
        return yp[:, None], sp_[:, None]

    def area(name: str, weights: Any, values: np.ndarray, std: np.ndarray) -> None:
        w, keep = _masked_area_weights(weights, mask)
        if not keep.any():
            raise GridMismatchError(
                f"No pixel of {name} overlaps a valid cell of model '{m.name}' (its grid has "
                f"{int(mask.sum())} valid cells); pass data over the model's land cells."
            )
        y, s = pad(values[:, keep], np.broadcast_to(std, keep.shape)[keep])
        mods.append(Observed(name, "area", y, s, physical=in_physical_units, weights=w))

    bstd = float(background_std if background_std is not None else m.background_std)
    if not np.isfinite(bstd) or bstd <= 0:
        raise InputError(f"background_std must be a positive number (in '{units}'), got {background_std!r}.")
    on_model_grid = _same_grid(bg, m.grid)
    for bgb in bg_members:
        if on_model_grid:
            vals = np.asarray(bgb.values, dtype=np.float64)
            vals = np.where(mask[None], vals, np.nan)
            if not np.isfinite(vals).any():
                raise InputError(
                    f"All values of the background {label} are missing (NaN); nothing to assimilate."
                )
            # a background on the model grid stays in the model space: compared cell by cell it anchors
            # the state everywhere, also where the clamped map to physical units has no gradient
            y, s = pad(vals.reshape(n_time, -1), np.full(ny * nx, bstd), physical_units=False)
            mods.append(Observed("background", "cells", y, s))
        else:
            sat = satellite_on_grid(bgb, template, std=bstd)
            area("the background", sat.weights, sat.values, sat.std)
    n_bg = len(bg_members)
    bg_mods, mods = mods[:n_bg], mods[n_bg:]

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
            usable = points_usable(m, so.iy, so.ix)
            if not usable.any():
                raise GridMismatchError(
                    f"All {len(so.names)} stations of {name} lie on cells that model '{m.name}' masks "
                    "(e.g. sea in a land-only product); none can be assimilated."
                )
            if not usable.all():
                dropped = [n for n, v in zip(so.names, usable, strict=True) if not v]
                warnings.warn(
                    f"{len(dropped)} of {len(so.names)} stations of {name} have only masked cells (e.g. sea) "
                    f"of model '{m.name}' around them and are dropped: {', '.join(dropped)}.",
                    XDownscaleWarning,
                    stacklevel=3,
                )
                so.iy, so.ix = so.iy[usable], so.ix[usable]
                so.values, so.std = so.values[:, usable], so.std[usable]
            y, s = pad(so.values, so.std)
            mods.append(Observed(name, "points", y, s, physical=in_physical_units, iy=so.iy, ix=so.ix))
        else:
            sa = satellite_on_grid(da, template, std=std)
            area(name, sa.weights, sa.values, sa.std)

    def sample() -> np.ndarray:
        """(member, time, ny, nx) in the model space."""
        t0 = np.asarray(times.values[:1]).astype("datetime64[ns]").astype(np.int64)[0] if n_time else 0
        work = steps * (1 + corrections) * members * max(length - K + 1, 1)
        return analyse(
            m,
            kind,
            bg_mods,
            mods,
            n_time=n_time,
            length=length,
            start=int(t0),
            members=members,
            steps=steps,
            corrections=corrections,
            tau=tau,
            gamma=gamma,
            seed=seed,
            batch_size=batch_size,
            progress=_auto_progress(progress, work),
        )

    # a dry run (the first window of a lazy analysis) checks the inputs and builds the metadata only
    analysis = np.zeros((members, n_time, ny, nx), np.float32) if _dry else sample()
    phys = np.asarray(m.from_model_space(analysis), dtype=np.float32)
    phys = np.where(mask[None, None], phys, np.nan).transpose(1, 0, 2, 3)
    if not _dry:
        _check_plausible(phys, m, label)
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
            names=[bg_mods[0].name, *(o.name for o in mods)],
            members=members,
            steps=steps,
            corrections=corrections,
            tau=tau,
            gamma=gamma,
            likelihood="physical" if in_physical_units else "model",
            seed=seed,
            units=units,
        ),
    )
    if source_units is not None:
        out = convert_units(out, str(source_units))
    return out


def _attrs(
    background: xr.DataArray,
    m: AssimilationModel,
    *,
    kind: str,
    names: list[str],
    members: int,
    steps: int,
    corrections: int,
    tau: float,
    gamma: float,
    likelihood: str,
    seed: int,
    units: str,
) -> dict[str, Any]:
    from ._version import __version__

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
        "likelihood": likelihood,
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


def at_stations(field: xr.DataArray, stations: xr.DataArray) -> tuple[np.ndarray, np.ndarray]:
    """``field`` (time, lat, lon) bilinearly at the stations, from its valid (finite) cells only:
    (time, station) values (NaN for stations outside or among missing cells) and the inside mask."""
    from .models.analysis import points_at
    from .xr.observations import station_indices

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", XDownscaleWarning)
        iy, ix, inside = station_indices(stations, field)
    g = find_grid(field)
    vals = np.asarray(field.transpose(find_time(field), g.ydim, g.xdim).values, dtype=np.float64)
    valid = np.asarray(np.isfinite(vals).all(axis=0), dtype=bool)
    out = np.full((vals.shape[0], iy.size), np.nan)
    if inside.any():
        at, usable = points_at(vals, iy[inside], ix[inside], valid=valid, periodic=g.periodic)
        at[:, ~usable] = np.nan
        out[:, inside] = at
    return out, inside


def _station_frame(stations: xr.DataArray, background: xr.DataArray, units: str) -> tuple[np.ndarray, str]:
    """Station values (time, station) in ``units`` on the background's time steps."""
    from .xr.observations import find_points, on_state_times
    from .xr.units import convert_units

    _, _, dim = find_points(stations)
    conv = on_state_times(convert_units(stations, units), background, "stations")
    return np.asarray(conv.transpose(find_time(background), dim).values, dtype=np.float64), dim


def estimate_observation_error(
    stations: xr.DataArray, background: xr.DataArray, *, floor: float = 0.1
) -> xr.Dataset:
    """Estimate station and background error statistics from the background's departures at the stations.

    The departures ``d = y - H(x_b)`` (the background bilinearly at the stations) have covariance
    ``B(r) + R``: the part that is correlated between stations at distance ``r`` is background error,
    the rest observation error (Hollingsworth & Lönnberg 1986). A Gaussian ``s_b^2 exp(-r^2 / (2 L^2))``
    is fitted to the pair covariances; each station's error std is ``sqrt(var(d) - s_b^2)``
    (at least ``floor`` times its departure std).

    Parameters
    ----------
    stations
        ``(time, station)`` observations with latitude/longitude along ``station`` and units; at least 3
        stations and a long period (a season or more) of common days.
    background
        ``(time, lat, lon)`` background with units, on any grid covering the stations.
    floor
        Smallest error std as a fraction of each station's departure std.

    Returns
    -------
    xarray.Dataset
        ``stations_std`` (station; pass it as ``stations_std=``), ``bias`` (station: mean departure),
        attributes ``background_std`` and ``length_scale_km`` (the fitted ``s_b`` and ``L``, for
        :func:`optimal_interpolation`), ``pairs`` and ``units`` (the background's).

    Raises
    ------
    InputError
        Fewer than 3 stations inside the background's domain, or too few common days.
    UnitError
        Station units not convertible to the background's.

    Notes
    -----
    Caveats: the estimate holds for the period and the background it was made with (a better background
    leaves larger relative station errors); with stations farther apart than the background's error
    correlation, background error correlated below the station spacing is counted as observation
    error; biases are not errors of this model (remove them first, or read ``bias``). Estimate on a
    training period and apply the numbers to another: estimating on the days being analysed uses the
    observations twice.

    Examples
    --------
    >>> import xdownscale.assimilate as xa  # doctest: +SKIP
    >>> err = xa.estimate_observation_error(stations_train, background_train)  # doctest: +SKIP
    >>> std = err["stations_std"]  # doctest: +SKIP
    >>> an = background.assimilate.slams(model=..., stations=st, stations_std=std)  # doctest: +SKIP
    """
    from .core.oi import fit_departure_covariance
    from .xr.observations import find_points

    units = background.attrs.get("units")
    if units is None:
        raise UnitError("The background has no units attribute; set background.attrs['units'].")
    la, lo, _ = find_points(stations)
    y, dim = _station_frame(stations, background, str(units))
    hb, inside = at_stations(background, stations)
    if int(inside.sum()) < 3:
        raise InputError(
            f"Only {int(inside.sum())} stations lie inside the background's domain; estimating error "
            "statistics needs at least 3."
        )
    d = (y - hb)[:, inside]
    stats = fit_departure_covariance(
        d, np.asarray(stations[la].values)[inside], np.asarray(stations[lo].values)[inside], floor=floor
    )
    coord = stations[dim].isel({dim: np.flatnonzero(inside)}) if dim in stations.coords else None
    data = {
        "stations_std": xr.DataArray(stats.obs_std, dims=dim, attrs={"units": str(units)}),
        "bias": xr.DataArray(stats.bias, dims=dim, attrs={"units": str(units)}),
    }
    ds = xr.Dataset(data, coords={dim: coord} if coord is not None else None)
    ds.attrs.update(
        background_std=stats.background_std,
        length_scale_km=stats.length_km,
        pairs=stats.pairs,
        units=str(units),
        method="Hollingsworth-Lonnberg fit of a Gaussian covariance to background departures",
    )
    return ds


def optimal_interpolation(
    background: xr.DataArray,
    *,
    stations: xr.DataArray,
    stations_std: Any = None,
    background_std: float | None = None,
    length_scale_km: float | None = None,
    grid: xr.DataArray | xr.Dataset | None = None,
    members: int = 0,
    seed: int = 0,
) -> xr.DataArray:
    """Optimal interpolation (Gaussian-covariance kriging) of station increments onto a grid.

    The classic baseline of station assimilation (:mod:`xdownscale.core.oi`): the background (bilinearly
    regridded to ``grid``) plus ``B_go (B_oo + R)^-1 (y - H x_b)`` with a Gaussian background error
    covariance of std ``background_std`` and length ``length_scale_km``, and station error std
    ``stations_std``.

    Parameters
    ----------
    background
        ``(time, lat, lon)`` with units, on any rectilinear grid.
    stations
        ``(time, station)`` with latitude/longitude along ``station`` and units.
    stations_std, background_std, length_scale_km
        Error statistics in the background's units (``stations_std`` in the stations' units: a number,
        or a DataArray along ``station``). Any left None is estimated with
        :func:`estimate_observation_error` from these same days (see its caveats; better estimate on a
        training period and pass the numbers).
    grid
        Analysis grid (DataArray or Dataset with latitude/longitude; cells that are NaN in a DataArray's
        first time step stay NaN); default: the background's grid.
    members
        Members drawn from the analysis error covariance (0: the analysis alone).
    seed
        For the members.

    Returns
    -------
    xarray.DataArray
        ``(time, lat, lon)`` or with ``members``: ``(time, member, lat, lon)``, in the background's units.
        Precipitation (non-negative background) is clipped at 0.

    Raises
    ------
    InputError
        Bad error statistics, no station inside the domain, no common time step.
    UnitError
        Missing or inconvertible units.
    """
    from .core.oi import oi_analysis
    from .xr.observations import error_std_values, find_points
    from .xr.regrid import regrid

    units = background.attrs.get("units")
    if units is None:
        raise UnitError("The background has no units attribute; set background.attrs['units'].")
    if int(members) < 0:
        raise InputError(f"members must be >= 0, got {members}.")
    tname = find_time(background)
    target = background if grid is None else grid
    fine = background if grid is None else regrid(background, target, method="bilinear")
    g = find_grid(fine)
    fine = fine.transpose(tname, g.ydim, g.xdim)
    if isinstance(target, xr.DataArray) and grid is not None:
        tg = find_grid(target)
        first = target.isel({d: 0 for d in target.dims if d not in (tg.ydim, tg.xdim)})
        land = np.isfinite(np.asarray(first.transpose(tg.ydim, tg.xdim).values))
        fine = fine.where(xr.DataArray(land, dims=(g.ydim, g.xdim)))
    la, lo, dim = find_points(stations)
    y, _ = _station_frame(stations, fine, str(units))
    hb, inside = at_stations(fine, stations)
    if not inside.any():
        raise InputError("No station lies inside the background's domain; nothing to interpolate.")
    if stations_std is None or background_std is None or length_scale_km is None:
        est = estimate_observation_error(stations, fine)
        background_std = est.attrs["background_std"] if background_std is None else background_std
        length_scale_km = est.attrs["length_scale_km"] if length_scale_km is None else length_scale_km
        so = np.full(stations.sizes[dim], np.nan)
        so[inside] = est["stations_std"].values
    else:
        so = np.broadcast_to(
            error_std_values(stations, stations_std, dim, "stations", "stations_std"), (stations.sizes[dim],)
        )
    glat = np.asarray(fine[g.lat].values, dtype=float)
    glon = np.asarray(fine[g.lon].values, dtype=float)
    lat2, lon2 = np.meshgrid(glat, glon, indexing="ij")
    xb = np.asarray(fine.values, dtype=np.float64).reshape(fine.shape[0], -1)
    ok = inside & np.isfinite(so)
    mean, _, ens = oi_analysis(
        xb,
        hb[:, ok],
        y[:, ok],
        so[ok],
        lat2.ravel(),
        lon2.ravel(),
        np.asarray(stations[la].values, dtype=float)[ok],
        np.asarray(stations[lo].values, dtype=float)[ok],
        background_std=float(background_std),
        length_km=float(length_scale_km),
        members=int(members),
        rng=np.random.default_rng(seed),
    )
    nonneg = bool(np.nanmin(xb) >= 0) if np.isfinite(xb).any() else False
    shape = fine.shape
    attrs = {k: v for k, v in background.attrs.items() if k in ("units", "standard_name", "long_name")}
    attrs["assimilation_config"] = json.dumps(
        {
            "method": "optimal_interpolation",
            "background_std": float(background_std),
            "length_scale_km": float(length_scale_km),
            "members": int(members),
            "seed": int(seed),
        }
    )
    coords = {tname: fine[tname], g.lat: fine[g.lat], g.lon: fine[g.lon]}
    if members:
        data = ens.reshape(members, *shape).transpose(1, 0, 2, 3)
        if nonneg:
            data = np.maximum(data, 0.0)
        return xr.DataArray(
            data,
            dims=(tname, "member", g.ydim, g.xdim),
            coords={**coords, "member": np.arange(members)},
            name=background.name,
            attrs=attrs,
        )
    data = mean.reshape(shape)
    if nonneg:
        data = np.maximum(data, 0.0)
    return xr.DataArray(data, dims=(tname, g.ydim, g.xdim), coords=coords, name=background.name, attrs=attrs)


_DOC = """Analysis ensemble of ``background`` given observations, by {what}.

    Parameters
    ----------
    background
        The model state trajectory ``(time, [member,] lat, lon)`` with units, on the model grid or on its own
        (e.g. coarser) grid: then its cells enter as area averages of the state, so a coarse reanalysis
        or model field needs no regridding first. With a ``member`` dimension (e.g. the output of
        ``.downscale`` with ``members=``) it is a background ensemble: analysis member ``k`` uses
        background member ``k mod M``.
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
        coordinate or attribute ``error_std``. Include the representativeness error (a station is a
        point, the state a cell average): :func:`estimate_observation_error` estimates it from the
        background's departures at the stations.
    background_std
        Background error std in the model's units; default: the model card's.
    members
        Ensemble size (default {members}).
    steps, corrections, tau, gamma
        Predictor steps (default {steps}: the best-scoring setting of the twin sweep in
        ``docs/evaluation-assimilation.md``; the paper uses 512), Langevin corrections per step (default
        {corrections}; the paper uses 1), Langevin amplitude (0.5) and likelihood stability weight (1e-2).
    likelihood
        Where observations are compared with the state: ``"physical"`` (default), in the variable's
        units with the errors as given (a dry observation penalises rain in proportion to its amount),
        or ``"model"``, in the model's transformed space (log space for precipitation, errors mapped
        through the transform; the earlier default, which scored worse on every precipitation case of
        ``docs/evaluation-assimilation.md``). The same for temperature, whose transform is linear.
    seed
        Same seed, same ensemble (member ``m`` never depends on the batch).
    device
        Torch device for the networks (default: where the model is).
    batch_size
        Members sampled at once (default: all).
    progress
        Show a progress bar; default (None): shown for long runs (from {work} network calls on).

    Returns
    -------
    xarray.DataArray
        ``(time, member, lat, lon)`` on the model grid, in the background's units (the model's when the
        background has none), with CF attributes and a history entry. For a dask-backed background the
        result is lazy: each time chunk is one analysis window, sampled when computed with only its own
        data in memory (the first window's inputs are checked at the call). Windows are analysed
        independently, so the result depends on the time chunks (the same chunks give the same result;
        one chunk gives the in-memory analysis); choose chunks of at least the model's window. Observation
        operators act on the state in physical units (precipitation is averaged and interpolated as
        amounts, not as logarithms); the likelihood compares them as ``likelihood`` says.

    Warns
    -----
    PhysicalRangeWarning
        Analysis values outside the model's training range widened by half its width.
    XDownscaleWarning
        Stations outside the domain or surrounded by masked (sea) cells, which are dropped; fewer
        than {min_steps} steps.

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
    model: ModelLike,
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
    # every argument is passed on as it is: the two methods differ only in the model kind
    return _assimilate("slams", **locals())


def sda(
    background: xr.DataArray,
    *,
    model: ModelLike,
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
    # every argument is passed on as it is: the two methods differ only in the model kind
    return _assimilate("sda", **locals())


_FMT = {"members": DEFAULT_MEMBERS, "steps": DEFAULT_STEPS, "work": PROGRESS_WORK, "min_steps": MIN_STEPS}
slams.__doc__ = _DOC.format(
    what="latent score-based data assimilation (SLAMS, Qu et al. 2024)",
    kind="slams",
    corrections=DEFAULT_CORRECTIONS["slams"],
    **_FMT,
)
sda.__doc__ = _DOC.format(
    what="pixel-space score-based data assimilation (SDA, Rozet & Louppe 2023)",
    kind="sda",
    corrections=DEFAULT_CORRECTIONS["sda"],
    **_FMT,
)
