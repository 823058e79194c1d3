"""Skill of the assimilation methods on real data and in an observing-system twin, written to
``docs/evaluation-assimilation.md`` with figures under ``docs/figures/assimilation/``.

    python benchmarks/evaluate_assimilation.py                 # everything (about 10-15 minutes on 2 CPUs)
    python benchmarks/evaluate_assimilation.py --quick         # fewer blocks and members (a smoke run)
    python benchmarks/evaluate_assimilation.py --sweep         # also the steps / members sweep of the twin

Two variables, each with its shipped SLAMS / SDA pair (``weights/``):

* temperature: E-OBS v14 ``tg`` on the 0.5 deg grid (19 x 29), the 11 VALUE Iberia ``tas`` stations, NCEP R1
  ``tas`` (about 1.9 deg) as the background; test winters 1997/98-2001/02;
* precipitation: E-OBS v12 ``tp`` on the 0.25 deg grid (41 x 61), the 12 VALUE stations inside it, NCEP R1
  ``pr``; test winters 1997/98-1999/2000.

Test winters were never used for training. Each analysis covers a block of 5 consecutive days.

**Real (section 2 of issue 13).** Background = NCEP R1 on its own grid (SDA/SLAMS take it as area
averages; the "background" row is its bilinear interpolation to the E-OBS grid). Stations are split into
``folds`` leave-k-out folds: each fold's stations are withheld and the rest assimilated. Error statistics
(station error std with representativeness, background std and length scale) come from
:func:`xdownscale.assimilate.estimate_observation_error` on the *training* winters, never on the test days.
Scores at the withheld stations (against the station values; the ensemble is perturbed with the station
error std for the rank histogram and the spread/skill ratio, Hamill 2001) and on the E-OBS grid
(E-OBS is built from station data including these, so it is a reference, not an independent truth).

**Twin (section 1).** Truth = E-OBS test-winter days; stations = truth at the VALUE coordinates plus
Gaussian noise of known std; a gridded modality = truth block-averaged (a satellite stand-in, SDA/SLAMS
only); background = truth block-averaged to about 2 deg and perturbed. Scored against the truth, at the
withheld stations and on the grid.

Metrics: RMSE of the ensemble mean, CRPS (ensemble CRPS; the mean absolute error for a deterministic
field), spread/skill ``sqrt((M + 1) / M * mean variance) / RMSE`` (1 = calibrated; Fortin et al. 2014) and
rank histograms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from xdownscale.assimilate import DEFAULT_LIKELIHOOD

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "weights"))
DATA = ROOT.parent / "shared" / "data" / "iberia"
DOC = ROOT / "docs" / "evaluation-assimilation.md"
FIGS = ROOT / "docs" / "figures" / "assimilation"
WINDOW = 5
METHODS = ("background", "OI", "SDA", "SLAMS")
#: the downscale -> assimilate chain: the CM ensemble alone and as the background of SLAMS (real data)
CHAIN = ("CM", "CM + SLAMS")
#: the order of rows in tables and panels
ROWS = METHODS + CHAIN


@dataclass
class Case:
    """One variable: data, models and twin settings."""

    name: str
    label: str
    units: str
    state: xr.DataArray
    stations: xr.DataArray
    ncep: xr.DataArray
    models: dict[str, str]
    cm: str
    train_end: str
    test_start: str
    twin_bg_factor: int
    twin_sat_factor: int
    twin_station_std: float
    twin_sat_std: float
    twin_bg_noise: Callable[[np.ndarray, np.random.Generator], np.ndarray]
    folds: int = 3
    nonneg: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _load(path: Path, var: str, units: str | None = None) -> xr.DataArray:
    if not path.is_file():
        raise SystemExit(f"{path} not found: the shared data must sit beside the repository.")
    da = xr.open_dataset(path)[var].load()
    if units is not None:
        da.attrs["units"] = units
    return da


def load_cases() -> dict[str, Case]:
    from xdownscale.xr.observations import station_indices

    tg = _load(DATA / "eobs_0.5deg_tg_djf1983-2002.nc", "tg", "degC")
    tas = _load(DATA / "value_iberia_11stations_tas_djf1983-2002.nc", "tmean", "degC")
    tp = _load(DATA / "eobs_0.25deg_tp_djf1991-2000.nc", "tp", "mm d-1")
    pr = _load(DATA / "value_86stations_pr_djf1991-2000.nc", "precip", "mm d-1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, inside = station_indices(pr, tp.isel(time=0))
    pr = pr.isel(station=np.flatnonzero(inside))
    return {
        "tg": Case(
            name="tg",
            label="temperature (tg, degC)",
            units="degC",
            state=tg,
            stations=tas,
            ncep=_load(DATA / "ncep_r1_tas_djf1983-2002.nc", "tas"),
            models={"SDA": "sda-eobs-iberia-0.5deg-tg", "SLAMS": "slams-eobs-iberia-0.5deg-tg"},
            cm="cm-eobs-iberia-0.5deg-tas",
            train_end="1997-02-28",
            test_start="1997-12-01",
            twin_bg_factor=4,
            twin_sat_factor=2,
            twin_station_std=0.5,
            twin_sat_std=0.5,
            twin_bg_noise=lambda x, rng: x + 1.5 * rng.standard_normal(x.shape),
            folds=4,
        ),
        "tp": Case(
            name="tp",
            label="precipitation (tp, mm/day)",
            units="mm d-1",
            state=tp,
            stations=pr,
            ncep=_load(DATA / "ncep_r1_pr_djf1983-2002.nc", "pr"),
            models={"SDA": "sda-eobs-iberia-0.25deg-pr", "SLAMS": "slams-eobs-iberia-0.25deg-pr"},
            cm="cm-eobs-iberia-0.25deg-pr",
            train_end="1997-02-28",
            test_start="1997-12-01",
            twin_bg_factor=8,
            twin_sat_factor=4,
            twin_station_std=1.0,
            twin_sat_std=1.0,
            twin_bg_noise=lambda x, rng: x * np.exp(0.5 * rng.standard_normal(x.shape) - 0.125),
            folds=3,
            nonneg=True,
        ),
    }


def pick_blocks(times: np.ndarray, n: int) -> list[np.ndarray]:
    """``n`` blocks of WINDOW consecutive days spread evenly over ``times``."""
    day = np.timedelta64(1, "D")
    starts = [
        i for i in range(len(times) - WINDOW + 1) if times[i + WINDOW - 1] - times[i] == (WINDOW - 1) * day
    ]
    picks = np.linspace(0, len(starts) - 1, n).round().astype(int)
    return [times[starts[j] : starts[j] + WINDOW] for j in picks]


def at_points(field: xr.DataArray, stations: xr.DataArray) -> np.ndarray:
    """``field`` (time, [member,] lat, lon) at the stations: bilinear from the finite cells only;
    returns (time, member, station) (member 1 for a deterministic field)."""
    from xdownscale.assimilate import at_stations

    if "member" not in field.dims:
        field = field.expand_dims(member=[0], axis=1)
    out = [at_stations(field.isel(member=k), stations)[0] for k in range(field.sizes["member"])]
    return np.stack(out, axis=1)


def coarse(da: xr.DataArray, factor: int) -> xr.DataArray:
    out = da.coarsen(lat=factor, lon=factor, boundary="trim").mean()
    out.attrs = dict(da.attrs)
    return out


@contextlib.contextmanager
def ablation(log_space: bool = False, no_mask: bool = False) -> Iterator[None]:
    """Undo fixes of issue 13 for the twin's cause analysis: operators in the log space (the Jensen
    effect) and station / area operators that ignore the land mask."""
    import xdownscale.assimilate as xa
    from xdownscale.core import observations as obs
    from xdownscale.models.assimilation import AssimilationModel

    saved = (AssimilationModel.nonlinear, xa._masked_area_weights, obs.BilinearPoints.__init__)
    try:
        if log_space:
            AssimilationModel.nonlinear = property(lambda self: False)  # type: ignore[assignment]
        if no_mask:
            xa._masked_area_weights = lambda w, mask: (w, np.ones(w.shape[0], bool))  # type: ignore[assignment]
            init = saved[2]

            def unmasked(self: Any, *a: Any, mask: Any = None, **k: Any) -> None:
                init(self, *a, **k)

            obs.BilinearPoints.__init__ = unmasked  # type: ignore[method-assign]
        yield
    finally:
        AssimilationModel.nonlinear, xa._masked_area_weights, obs.BilinearPoints.__init__ = saved  # type: ignore[method-assign]


@contextlib.contextmanager
def fixed_corrections(corrections: int) -> Iterator[None]:
    """Run SDA and SLAMS with ``corrections`` Langevin corrections per step (the sweep)."""
    import xdownscale.assimilate as xa

    orig = xa._assimilate

    def patched(kind: str, background: Any, **kw: Any) -> Any:
        kw["corrections"] = corrections
        return orig(kind, background, **kw)

    xa._assimilate = patched
    try:
        yield
    finally:
        xa._assimilate = orig


class Scores:
    """Accumulates errors per method: at withheld stations and on the grid."""

    def __init__(self) -> None:
        self.points: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        self.grid: dict[str, list[np.ndarray]] = {}
        self.seconds: dict[str, list[float]] = {}

    def add_points(self, method: str, ens: np.ndarray, obs: np.ndarray, obs_std: np.ndarray) -> None:
        """ens (time, member, station), obs (time, station), obs_std (station,)."""
        self.points.setdefault(method, []).append((ens, obs, np.broadcast_to(obs_std, obs.shape[-1:])))

    def add_grid(self, method: str, ens: np.ndarray, truth: np.ndarray) -> None:
        """ens (time, member, y, x), truth (time, y, x): stores per-cell stats (sq err, crps, var, M)."""
        ok = np.isfinite(truth) & np.isfinite(ens).all(axis=1)
        e = np.moveaxis(ens, 1, -1)[ok]  # (n, m)
        t = truth[ok]
        m = e.shape[1]
        var = e.var(1, ddof=1) if m > 1 else np.zeros_like(t)
        stats = np.stack([(e.mean(1) - t) ** 2, _crps(e, t), var, np.full(t.shape, float(m))])
        self.grid.setdefault(method, []).append(stats)

    def table(self, rng: np.random.Generator) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for method, parts in self.points.items():
            ens = np.concatenate([p[0].transpose(0, 2, 1).reshape(-1, p[0].shape[1]) for p in parts])
            obs = np.concatenate([p[1].ravel() for p in parts])
            so = np.concatenate([np.broadcast_to(p[2], p[1].shape).ravel() for p in parts])
            ok = np.isfinite(obs) & np.isfinite(ens).all(1)
            ens, obs, so = ens[ok], obs[ok], so[ok]
            m = ens.shape[1]
            mean = ens.mean(1)
            rmse = float(np.sqrt(np.mean((mean - obs) ** 2)))
            row: dict[str, Any] = {
                "n": int(ok.sum()),
                "rmse": rmse,
                "crps": float(np.mean(_crps(ens, obs))),
                "bias": float(np.mean(mean - obs)),
            }
            if m > 1:
                var = float(np.mean(ens.var(1, ddof=1)))
                row["spread_skill"] = float(np.sqrt((m + 1) / m * var + np.mean(so**2)) / rmse)
                pert = ens + so[:, None] * rng.standard_normal(ens.shape)
                ranks = (pert < obs[:, None]).sum(1) + rng.integers(0, (pert == obs[:, None]).sum(1) + 1)
                row["rank_hist"] = (np.bincount(ranks, minlength=m + 1) / ranks.size).tolist()
            if method in self.seconds:
                row["seconds"] = float(np.mean(self.seconds[method]))
            out[method] = row
        for method, grid_parts in self.grid.items():
            a = np.concatenate(grid_parts, axis=1)
            rmse = float(np.sqrt(a[0].mean()))
            row = out.setdefault(method, {})
            row["grid_rmse"] = rmse
            row["grid_crps"] = float(a[1].mean())
            m = int(a[3][0]) if a.shape[1] else 1
            if m > 1:
                row["grid_spread_skill"] = float(np.sqrt((m + 1) / m * a[2].mean()) / rmse)
        return out


def _crps(ens: np.ndarray, obs: np.ndarray) -> np.ndarray:
    """Ensemble CRPS of ens (..., m) against obs (...): E|X - y| - 0.5 E|X - X'| (MAE when m = 1)."""
    m = ens.shape[-1]
    skill = np.mean(np.abs(ens - obs[..., None]), axis=-1)
    if m == 1:
        return skill
    ranks = 2.0 * np.arange(1, m + 1) - m - 1.0
    pair = 2.0 * np.sum(np.sort(ens, axis=-1) * ranks, axis=-1) / (m * m)
    return skill - 0.5 * pair


def run_block(
    case: Case,
    models: dict[str, Any],
    truth: xr.DataArray,
    background: xr.DataArray,
    used: xr.DataArray,
    used_std: np.ndarray,
    held: xr.DataArray,
    held_obs: np.ndarray,
    held_std: np.ndarray,
    stats: dict[str, float],
    scores: Scores,
    *,
    members: int,
    steps: int,
    satellite: xr.DataArray | None = None,
    methods: tuple[str, ...] = METHODS,
    keep: dict[str, xr.DataArray] | None = None,
    likelihood: str = DEFAULT_LIKELIHOOD,
    downscaled: xr.DataArray | None = None,
) -> None:
    """All methods on one block; scores at the withheld stations and on the grid. ``downscaled``: the CM
    ensemble of the background (the chain's first step), for the methods "CM" and "CM + SLAMS"."""
    import xdownscale.assimilate as xa
    from xdownscale.xr.regrid import regrid
    from xdownscale.xr.units import convert_units

    bg = convert_units(background, case.units)
    land = np.isfinite(truth.isel(time=0).values)
    fields: dict[str, xr.DataArray] = {}
    if "background" in methods:
        fine = regrid(bg, truth, method="bilinear").transpose(*truth.dims)
        fine = fine.where(xr.DataArray(land, dims=("lat", "lon")))
        fields["background"] = fine
    if "OI" in methods:
        t0 = time.perf_counter()
        fields["OI"] = xa.optimal_interpolation(
            bg,
            stations=used,
            stations_std=used_std,
            background_std=stats["background_std"],
            length_scale_km=stats["length_scale_km"],
            grid=truth,
            members=members,
            seed=0,
        )
        scores.seconds.setdefault("OI", []).append(time.perf_counter() - t0)
    for method in ("SDA", "SLAMS"):
        if method not in methods:
            continue
        fn = xa.sda if method == "SDA" else xa.slams
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            an = fn(
                bg,
                model=models[method],
                stations=used,
                stations_std=used_std,
                satellite=satellite,
                satellite_std=case.twin_sat_std if satellite is not None else None,
                background_std=stats["area_background_std"],
                members=members,
                steps=steps,
                likelihood=likelihood,
                seed=0,
                progress=False,
            )
        scores.seconds.setdefault(method, []).append(time.perf_counter() - t0)
        fields[method] = an.transpose("time", "member", "lat", "lon")
    if "CM" in methods and downscaled is not None:
        fields["CM"] = convert_units(downscaled, case.units).transpose("time", "member", "lat", "lon")
    if "CM + SLAMS" in methods and downscaled is not None:
        # the chain: the downscaled ensemble is the background ensemble, on the model grid, in its own units
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            an = xa.slams(
                downscaled,
                model=models["SLAMS"],
                stations=used,
                stations_std=used_std,
                background_std=stats["background_std"],
                members=members,
                steps=steps,
                likelihood=likelihood,
                seed=0,
                progress=False,
            )
        scores.seconds.setdefault("CM + SLAMS", []).append(time.perf_counter() - t0)
        fields["CM + SLAMS"] = convert_units(an, case.units).transpose("time", "member", "lat", "lon")
    tv = truth.transpose("time", "lat", "lon").values
    for method, f in fields.items():
        f = f.astype(np.float64)
        scores.add_points(method, at_points(f, held), held_obs, held_std)
        ens = f.values if "member" in f.dims else f.values[:, None]
        scores.add_grid(method, ens, tv)
        if keep is not None:
            keep[method] = f


def fold_split(n: int, folds: int) -> list[np.ndarray]:
    """Withheld station indices per fold (interleaved, so each fold spans the domain)."""
    return [np.arange(k, n, folds) for k in range(folds)]


def error_statistics(case: Case, twin: bool, rng: np.random.Generator) -> dict[str, Any]:
    """Station error std, background std and length from the training winters' departures; for the
    twin from the training winters' synthetic observations and background."""
    import xdownscale.assimilate as xa
    from xdownscale.xr.units import convert_units

    train = slice(None, case.train_end)
    if twin:
        truth = case.state.sel(time=train)
        bg = twin_background(case, truth, rng)
        st = twin_stations(case, truth, rng)
    else:
        bg = convert_units(case.ncep.sel(time=train), case.units)
        st = case.stations.sel(time=train)
    est = xa.estimate_observation_error(st, bg)
    std = np.full(case.stations.sizes["station"], np.nan)
    std[np.isin(case.stations.station.values, est.station.values)] = est["stations_std"].values
    if twin:
        std = np.full_like(std, case.twin_station_std)
    # the background enters SDA / SLAMS as area averages of cells of about 2 deg: their error is the
    # point error reduced by the averaging over the correlation length (at most the point error)
    sb, length = float(est.attrs["background_std"]), float(est.attrs["length_scale_km"])
    cell_km = 200.0
    area = sb / np.sqrt(1.0 + (cell_km / (2.0 * length)) ** 2)
    return {
        "stations_std": std,
        "background_std": sb,
        "length_scale_km": length,
        "area_background_std": float(area),
        "bias": est["bias"].values.tolist(),
        "station_names": [str(s) for s in est.station.values],
    }


def twin_background(case: Case, truth: xr.DataArray, rng: np.random.Generator) -> xr.DataArray:
    bg = coarse(truth, case.twin_bg_factor)
    out = bg.copy(data=case.twin_bg_noise(bg.values, rng))
    if case.nonneg:
        out = out.clip(min=0.0)
    out.attrs = dict(truth.attrs)
    return out


def twin_stations(case: Case, truth: xr.DataArray, rng: np.random.Generator) -> xr.DataArray:
    vals = at_points(truth, case.stations)[:, 0]
    noisy = vals + case.twin_station_std * rng.standard_normal(vals.shape)
    if case.nonneg:
        noisy = np.maximum(noisy, 0.0)
    st = case.stations.sel(time=truth.time).copy(data=noisy)
    st.attrs["units"] = case.units
    return st


def twin_satellite(case: Case, truth: xr.DataArray, rng: np.random.Generator) -> xr.DataArray:
    sat = coarse(truth, case.twin_sat_factor)
    sat = sat + case.twin_sat_std * rng.standard_normal(sat.shape)
    if case.nonneg:
        sat = sat.clip(min=0.0)
    sat.attrs = {"units": case.units}
    sat.name = case.name
    return sat


def downscale_background(case: Case, background: xr.DataArray, members: int) -> xr.DataArray:
    """The chain's first step: ``background`` (NCEP R1 days) downscaled by the case's CM with QDM fitted on
    NCEP's training winters and the scale that ``scale="auto"`` picks on those winters (resolved once per
    case, as a user resolves it once on the historical period), as an ensemble of ``members``."""
    import xdownscale  # noqa: F401  (registers the accessors)

    hist = case.ncep.sel(time=slice(None, case.train_end))
    if "scale" not in case.extra:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            case.extra["scale"] = hist.downscale.select_scale(model=case.cm, qdm=True, hist=hist)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = background.downscale.cm(
            model=case.cm,
            scale=case.extra["scale"],
            qdm=True,
            hist=hist,
            members=members,
            seed=0,
            progress=False,
        )
    return out.load()


def evaluate(
    case: Case,
    *,
    twin: bool,
    blocks: int,
    members: int,
    steps: int,
    methods: tuple[str, ...] = METHODS,
    folds: int | None = None,
    ablate: dict[str, bool] | None = None,
    keep: dict[str, xr.DataArray] | None = None,
    likelihood: str = DEFAULT_LIKELIHOOD,
) -> dict[str, Any]:
    """Leave-k-out evaluation of all methods on the test winters of ``case``."""
    from xdownscale.models.assimilation import load_assimilation_model
    from xdownscale.xr.units import convert_units

    rng = np.random.default_rng(0)
    stats = error_statistics(case, twin, rng)
    models = {k: load_assimilation_model(ROOT / "weights" / f"{v}.json") for k, v in case.models.items()}
    test = case.state.sel(time=slice(case.test_start, None))
    chosen = pick_blocks(test.time.values, blocks)
    n_st = case.stations.sizes["station"]
    splits = fold_split(n_st, folds or case.folds)
    scores = Scores()
    with ablation(**(ablate or {})):
        for b, days in enumerate(chosen):
            truth = test.sel(time=days)
            if twin:
                brng = np.random.default_rng(1000 + b)
                background = twin_background(case, truth, brng)
                st_all = twin_stations(case, truth, brng)
                satellite = twin_satellite(case, truth, brng)
                reference = at_points(truth, case.stations)[:, 0]  # noise-free truth at the stations
            else:
                background = case.ncep.sel(time=days)
                st_all = case.stations.sel(time=days)
                satellite = None
                reference = convert_units(st_all, case.units).transpose("time", "station").values
            downscaled = None
            if set(CHAIN) & set(methods):
                if twin:
                    raise ValueError("the downscale -> assimilate chain is evaluated on real data only")
                downscaled = downscale_background(case, background, members)
            for k, held_idx in enumerate(splits):
                used_idx = np.setdiff1d(np.arange(n_st), held_idx)
                used_ok = used_idx[np.isfinite(stats["stations_std"][used_idx])]
                run_block(
                    case,
                    models,
                    truth,
                    background,
                    st_all.isel(station=used_ok),
                    stats["stations_std"][used_ok],
                    case.stations.isel(station=held_idx),
                    reference[:, held_idx],
                    np.zeros(held_idx.size) if twin else np.nan_to_num(stats["stations_std"][held_idx]),
                    stats,
                    scores,
                    members=members,
                    steps=steps,
                    satellite=satellite,
                    methods=methods,
                    keep=keep if (b == 0 and k == 0) else None,
                    likelihood=likelihood,
                    downscaled=downscaled,
                )
            print(f"  {case.name} {'twin' if twin else 'real'} block {b + 1}/{len(chosen)} done", flush=True)
    return {
        "table": scores.table(np.random.default_rng(1)),
        "stats": {k: v for k, v in stats.items() if k != "stations_std"}
        | {"stations_std": [None if not np.isfinite(s) else float(s) for s in stats["stations_std"]]},
        "blocks": [str(d[0])[:10] for d in chosen],
        "days": len(chosen) * WINDOW,
        "folds": len(splits),
        "members": members,
        "steps": steps,
        "likelihood": likelihood,
        **({"scale": str(case.extra["scale"])} if set(CHAIN) & set(methods) else {}),
    }


# ---------------------------------------------------------------------------------------------- report
def _fmt(v: Any, nd: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{nd}f}"


def table_md(res: dict[str, Any], units: str, methods: tuple[str, ...] = METHODS) -> str:
    rows = [
        f"| method | RMSE ({units}) | CRPS ({units}) | spread/skill | bias | grid RMSE | grid CRPS | "
        "grid spread/skill | s / analysis |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        r = res["table"].get(method)
        if r is None:
            continue
        rows.append(
            f"| {method} | {_fmt(r.get('rmse'))} | {_fmt(r.get('crps'))} | {_fmt(r.get('spread_skill'))} | "
            f"{_fmt(r.get('bias'))} | {_fmt(r.get('grid_rmse'))} | {_fmt(r.get('grid_crps'))} | "
            f"{_fmt(r.get('grid_spread_skill'))} | {_fmt(r.get('seconds'), 1)} |"
        )
    return "\n".join(rows)


def figure_bars(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
    colours = {"background": "0.6", "OI": "tab:blue", "SDA": "tab:orange", "SLAMS": "tab:green"}
    for ax, key in zip(axes[0], keys, strict=True):
        tab = results[key]["table"]
        ms = [m for m in METHODS if m in tab]
        ax.bar(ms, [tab[m]["crps"] for m in ms], color=[colours[m] for m in ms])
        ax.set_title(key, fontsize=9)
        ax.set_ylabel("CRPS at withheld stations")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_ranks(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results)
    ms = ["OI", "SDA", "SLAMS"]
    fig, axes = plt.subplots(len(keys), len(ms), figsize=(9, 2.4 * len(keys)), squeeze=False)
    for i, key in enumerate(keys):
        for j, m in enumerate(ms):
            ax = axes[i, j]
            h = results[key]["table"].get(m, {}).get("rank_hist")
            if h is None:
                ax.axis("off")
                continue
            ax.bar(np.arange(len(h)), h, color="0.4", width=1.0)
            ax.axhline(1.0 / len(h), color="r", lw=1)
            ax.set_title(f"{key}: {m}", fontsize=9)
            ax.set_xticks([])
    fig.suptitle(
        "Rank histograms at withheld stations (members perturbed with the station error)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_maps(
    fields: dict[str, xr.DataArray], truth: xr.DataArray, path: Path, title: str, cmap: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("E-OBS", truth.isel(time=2))]
    for m in ROWS:
        if m in fields:
            f = fields[m].isel(time=2)
            panels.append(
                (f"{m} (mean)" if "member" in f.dims else m, f.mean("member") if "member" in f.dims else f)
            )
    last = next((m for m in ("CM + SLAMS", "SLAMS") if m in fields), None)
    if last is not None:
        panels.append((f"{last} member 0", fields[last].isel(time=2, member=0)))
        panels.append((f"{last} spread", fields[last].isel(time=2).std("member")))
    vals = np.concatenate([np.asarray(p[1].values).ravel() for p in panels[:-1]])
    lo, hi = np.nanpercentile(vals, [1, 99])
    if cmap == "Blues":
        lo = 0.0
    ncol = len(panels) if len(panels) <= 5 else -(-len(panels) // 2)  # one row, or two full-ish ones
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.5 * nrow), squeeze=False)
    for ax, (name, f) in zip(axes.ravel(), panels, strict=False):
        spread = name.endswith("spread")
        im = ax.pcolormesh(
            f["lon"],
            f["lat"],
            f.values,
            cmap="magma" if spread else cmap,
            vmin=None if spread else lo,
            vmax=None if spread else hi,
            shading="auto",
        )
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, shrink=0.8)
    for ax in axes.ravel()[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pair(a: float, b: float) -> str:
    """'a vs b' with two decimals, or three when two would show a tie that is not one."""
    nd = 3 if f"{a:.2f}" == f"{b:.2f}" and a != b else 2
    return f"{a:.{nd}f} vs {b:.{nd}f}"


def _verdict(res: dict[str, Any], units: str) -> str:
    """Plain statements: does SLAMS (and SDA) beat the background and OI on CRPS at withheld stations, and is
    the spread calibrated?"""
    tab = res["table"]
    lines = []
    for method in ("SLAMS", "SDA"):
        if method not in tab:
            continue
        r = tab[method]
        parts = []
        for base in ("background", "OI"):
            if base in tab:
                better = r["crps"] < tab[base]["crps"]
                parts.append(
                    f"{'beats' if better else 'does not beat'} the {base} "
                    f"({_pair(r['crps'], tab[base]['crps'])} {units})"
                )
        ss = r.get("spread_skill")
        cal = (
            ""
            if ss is None
            else (f"; spread/skill {ss:.2f} ({'inside' if 0.7 <= ss <= 1.3 else 'outside'} the 0.7-1.3 goal)")
        )
        lines.append(f"* {method}: CRPS at the withheld stations {' and '.join(parts)}{cal}.")
    return "\n".join(lines)


def write_report(results: dict[str, Any]) -> None:
    """docs/evaluation-assimilation.md from the stored results (and the figures)."""
    cases = {"tg": ("Temperature", "degC"), "tp": ("Precipitation", "mm/day")}
    main = {k: v for k, v in results.items() if k.endswith(" twin") or k.endswith(" real")}
    if main:
        figure_bars(main, FIGS / "crps-withheld.png")
        figure_ranks({k: v for k, v in main.items() if k.endswith("real")}, FIGS / "rank-histograms.png")
    out = [
        "# Evaluation: data assimilation",
        "",
        "*Generated by `benchmarks/evaluate_assimilation.py` (issue 13); numbers from the last run.*",
        "",
        "Background alone, optimal interpolation (OI, a Gaussian-covariance kriging of station increments: "
        "`xdownscale.assimilate.optimal_interpolation`), SDA in pixel space and SLAMS, on the test winters "
        "of "
        "the shipped pairs (never used for training): temperature (E-OBS v14 `tg`, 0.5 deg, the 11 VALUE "
        "Iberia `tas` stations, test winters 1997/98-2001/02, pair `*-eobs-iberia-0.5deg-tg`) and "
        "precipitation (E-OBS v12 `tp`, 0.25 deg, the 12 VALUE stations inside it, test winters "
        "1997/98-1999/2000, pair `*-eobs-iberia-0.25deg-pr`). One analysis covers a block of 5 consecutive "
        "days.",
        "",
        "* **Real**: background = NCEP R1 on its own ~1.9 deg grid (SDA and SLAMS take its cells as area "
        "averages; the *background* row is its bilinear interpolation to the E-OBS grid). Leave-k-out: the "
        "stations are split into interleaved folds; each fold is withheld while the others are assimilated. "
        "Error statistics (station error std with representativeness, background std, length scale) come "
        "from `estimate_observation_error` on the *training* winters only. Scores at the withheld stations "
        "are against the station values: the spread/skill ratio and the rank histograms include the "
        "estimated station error (members perturbed with it, Hamill 2001). On the grid the reference is "
        "E-OBS, which is itself interpolated from station data including these: a reference, not an "
        "independent truth.",
        "* **Twin**: truth = E-OBS test days; stations = the truth at the VALUE coordinates plus Gaussian "
        "noise (0.5 degC, 1 mm/day); a gridded modality = truth block-averaged to ~1 deg with the same "
        "noise (SDA and SLAMS only); background = truth block-averaged to ~2 deg and perturbed (+N(0, 1.5 "
        "degC) per cell; x lognormal with 50% spread for precipitation). Scored against the noise-free "
        "truth.",
        "",
        "Metrics: RMSE and bias of the ensemble mean, CRPS (ensemble CRPS; for the deterministic background "
        "the mean absolute error), spread/skill = sqrt((M+1)/M mean variance [+ station error variance]) / "
        "RMSE (1 = calibrated), seconds per analysis (one 5-day block, CPU, 1 thread, shared machine).",
        "",
    ]
    summary = []
    tg_bias = results.get("tg real", {}).get("stats", {}).get("bias") or [np.nan]
    bias_range = f"{min(tg_bias):+.1f} to {max(tg_bias):+.1f}"
    sda_twin_text = ""
    if "SDA" in results.get("tp twin", {}).get("table", {}):
        tw = results["tp twin"]["table"]
        sda_twin_text = (
            f"In the precipitation twin SDA (pixel space) has bias {tw['SDA']['bias']:+.2f} mm/day and CRPS "
            f"{tw['SDA']['crps']:.2f} against {tw['SLAMS']['crps']:.2f} for SLAMS: its small, briefly "
            "trained pixel prior is the weaker of the two. "
        )
    tp_real_text = ""
    if "tp real" in results:
        t = results["tp real"]["table"]
        so = [v for v in results["tp real"]["stats"]["stations_std"] if v is not None]
        logspace = results.get("tp real, likelihood=model", {}).get("table", {})
        before = (
            f" With the likelihood in the log space (the earlier default) SLAMS had CRPS "
            f"{logspace['SLAMS']['crps']:.2f}, RMSE {logspace['SLAMS']['rmse']:.2f} and bias "
            f"{logspace['SLAMS']['bias']:+.2f}: there a dry observation with an error of a few mm/day hardly "
            "penalises 20 mm/day (about two standard deviations in log space), so SLAMS members drew wet "
            "structures that neither background nor stations supported; comparing in mm/day "
            "(`likelihood='physical'`, now the default) removed most of that (table below)."
            if "SLAMS" in logspace
            else ""
        )
        verdict = "beats" if t["SLAMS"]["crps"] < t["background"]["crps"] else "is still worse than"
        tp_real_text = (
            f"On real precipitation SLAMS {verdict} the background (CRPS "
            f"{t['SLAMS']['crps']:.2f} vs {t['background']['crps']:.2f} mm/day, "
            f"RMSE {t['SLAMS']['rmse']:.2f} vs {t['background']['rmse']:.2f}, bias "
            f"{t['SLAMS']['bias']:+.2f}), SDA CRPS {t['SDA']['crps']:.2f}, OI {t['OI']['crps']:.2f}."
            + before
            + " The spread/skill ratios at the stations include the "
            f"estimated station errors ({min(so):.1f}-{max(so):.1f} mm/day: daily precipitation at a point "
            "against a 0.25 deg cell); on the grid, against E-OBS, spread/skill is "
            + ", ".join(
                f"{_fmt(t[name].get('grid_spread_skill'))} for {name}"
                for name in ("OI", "SDA", "SLAMS")
                if name in t
            )
            + ". "
        )
    for key, (title, units) in cases.items():
        for kind in ("real", "twin"):
            res = results.get(f"{key} {kind}")
            if res is not None:
                summary.append(f"**{title}, {kind}** ({res['days']} days x {res['folds']} folds):")
                summary += [_verdict(res, units), ""]
    for key, (title, units) in cases.items():
        chain, real = results.get(f"{key} chain"), results.get(f"{key} real")
        if chain is None or real is None or "CM + SLAMS" not in chain["table"]:
            continue
        c, cm, bg = chain["table"]["CM + SLAMS"], chain["table"]["CM"], real["table"]["background"]
        sl = real["table"].get("SLAMS", {}).get("crps", float("nan"))
        summary += [
            f"**{title}, downscale then assimilate** (the real case's days and folds): CRPS at the withheld "
            f"stations {bg['crps']:.2f} (background), {sl:.2f} (SLAMS on NCEP R1), {cm['crps']:.2f} (CM "
            f"ensemble of NCEP R1 with QDM), {c['crps']:.2f} (CM + SLAMS) {units}; on the E-OBS grid "
            f"{bg['grid_crps']:.2f}, {real['table'].get('SLAMS', {}).get('grid_crps', float('nan')):.2f}, "
            f"{cm['grid_crps']:.2f}, {c['grid_crps']:.2f}.",
            "",
        ]
    out += [
        "## Summary",
        "",
        "Goal (issue 13): SLAMS beats the background and OI on CRPS at withheld stations for temperature, "
        "beats the background for precipitation, with spread/skill between 0.7 and 1.3.",
        "",
        *summary,
        "Where the score-based analyses fall short: on real temperature the ensembles are under-dispersed "
        "(U-shaped rank histograms for every method, OI included): the withheld-station errors are dominated "
        "by station biases against the cell average (e.g. mountain and coastal stations: mean "
        f"departures of {bias_range} degC from NCEP on the training winters) that no method sees from "
        "the other stations. "
        f"{sda_twin_text}"
        f"{tp_real_text}"
        "The samples are small "
        "(15 days per variable on real data, 5 in the precipitation twin and its ablation): differences of a "
        "few per cent are within the noise.",
        "",
    ]
    for key, (title, units) in cases.items():
        for kind in ("real", "twin"):
            res = results.get(f"{key} {kind}")
            if res is None:
                continue
            st = res["stats"]
            out += [
                f"## {title}, {kind}",
                "",
                f"{res['days']} days ({len(res['blocks'])} blocks starting {', '.join(res['blocks'])}), "
                f"{res['folds']} folds, {res['members']} members, {res['steps']} steps. Error statistics "
                f"({'training winters, synthetic' if kind == 'twin' else 'training winters'}): background "
                f"std "
                f"{st['background_std']:.2f} {units} at a point ({st['area_background_std']:.2f} for a ~2 "
                f"deg "
                f"cell), length scale {st['length_scale_km']:.0f} km, station error std "
                f"{', '.join(_fmt(v) for v in st['stations_std'])} {units}.",
                "",
                table_md(res, units),
                "",
                _verdict(res, units),
                "",
            ]
            if (FIGS / f"maps-{key}-{kind}.png").is_file():
                out += [
                    f"![{title}, {kind}: one day of each method](figures/assimilation/maps-{key}-{kind}.png)",
                    "",
                ]
    out += chain_section(results, cases)
    abl = {k: v for k, v in results.items() if k.startswith("tp twin, ")}
    if abl and "tp twin" in results:
        abl = {"tp twin, all fixes": results["tp twin"], **abl}
    if abl:
        out += [
            "## Causes found (issue 13)",
            "",
            "The shipped precipitation pair made its background worse at withheld stations (SLAMS RMSE 5.55 "
            "and SDA 12.5 mm/day against 3.34 for the background), with domain means of 3.5-32 mm/day where "
            "E-OBS has 1.2-2.6 and maxima above 1000 mm/day. The causes, each pinned by a test:",
            "",
            "1. **Jensen effect of the log space** (`test_log_space_operators_bias_the_analysis_wet`): the "
            "area-average and station operators acted on the log-transformed state, so the mean of the "
            "logarithm over a coarse cell was matched to the logarithm of the cell's mean amount; the mean "
            "of a "
            "logarithm is smaller than the logarithm of the mean, so every cell was pushed wet. The "
            "operators "
            "now act on amounts (the state is taken to mm/day inside the differentiable likelihood) and only "
            "their output is compared in the log space.",
            "2. **Station operator reading masked cells** "
            "(`test_coastal_station_reads_land_cells_only_and_sea"
            "_stations_are_dropped`): most VALUE stations are coastal; their bilinear stencil included sea "
            "cells, which the land-only model leaves unconstrained. Stencils now use valid cells only "
            "(renormalised), stations with none are dropped with a warning, and area averages skip masked "
            "cells.",
            "3. **Langevin corrector on an imperfect pixel prior**: with one correction per step the shipped "
            "SDA prior is over-dispersed (model-space std 1.27 instead of about 1; unconditional mean 8 "
            "mm/day "
            "against 1.9 in E-OBS, maxima above 2000 mm/day), without it close (std 0.86, mean 1.4, 99th "
            "percentile 24.2 mm/day as in E-OBS). SLAMS's latent prior is the other way round (the corrector "
            "brings its mean from 0.9 to 1.9 mm/day). The defaults are now one correction for SLAMS and "
            "none for SDA (`--sweep` adds the table of steps x corrections behind this choice).",
            "4. **Observation errors too small for a point against a cell**: the earlier evaluation used 1 "
            "mm/day for every station. Errors are now estimated from background departures on the training "
            "winters (`estimate_observation_error`); on real precipitation they come out at several mm/day.",
            "5. **Analysis in the model's units, no warning for impossible values, no progress for long "
            "runs**: "
            "fixed (`test_analysis_comes_back_in_the_background_units`, "
            "`test_implausible_values_are_flagged`, "
            "`test_progress_defaults_to_on_for_long_work`).",
            "",
            "Checked and not a cause: time alignment (all files stamp days at 00:00 and the windows are "
            "consecutive days), units of the station files (daily `mm` totals convert to mm/day).",
            "",
            "Twin ablation (precipitation, the blocks and folds of the precipitation twin above): each fix "
            "undone on its own.",
            "",
            "| variant | method | RMSE | CRPS | spread/skill | bias | grid RMSE | grid CRPS |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for k, v in abl.items():
            for m in ("SDA", "SLAMS"):
                r = v["table"].get(m)
                if r:
                    out.append(
                        f"| {k.split(', ', 1)[1]} | {m} | {_fmt(r['rmse'])} | {_fmt(r['crps'])} | "
                        f"{_fmt(r.get('spread_skill'))} | {_fmt(r['bias'])} | {_fmt(r.get('grid_rmse'))} | "
                        f"{_fmt(r.get('grid_crps'))} |"
                    )
        out.append("")
    logspace = results.get("tp real, likelihood=model")
    if logspace and "tp real" in results:
        out += [
            "Real precipitation (the blocks and folds of the real case above) with the likelihood in "
            "physical units (`likelihood='physical'`, the default: stations and background compared in "
            "mm/day with their errors as estimated, so a dry station penalises rain in proportion to its "
            "amount) and in the model's log space (`likelihood='model'`, the earlier default).",
            "",
            "| likelihood | method | RMSE | CRPS | spread/skill | bias | grid RMSE | grid CRPS |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label, res in (("physical (mm/day)", results["tp real"]), ("model (log space)", logspace)):
            for m in ("background", "SDA", "SLAMS"):
                r = res["table"].get(m)
                if r and not (m == "background" and label.startswith("model")):
                    out.append(
                        f"| {'-' if m == 'background' else label} | {m} | {_fmt(r['rmse'])} | "
                        f"{_fmt(r['crps'])} | {_fmt(r.get('spread_skill'))} | {_fmt(r['bias'])} | "
                        f"{_fmt(r.get('grid_rmse'))} | {_fmt(r.get('grid_crps'))} |"
                    )
        out.append("")
    sweep = results.get("sweep")
    if sweep:
        out += [
            "## Steps and corrections (defaults)",
            "",
            "Temperature twin, first test block, 2 folds, 4 members: CRPS at the withheld stations / on the "
            "grid (degC).",
            "",
            "| corrections | steps | SDA | SLAMS |",
            "|---|---|---|---|",
        ]
        for k, v in sweep.items():
            c, st_ = k.replace("corr", "").split(" steps")
            out.append(
                f"| {c} | {st_} | {v['SDA']['crps']:.3f} / {v['SDA']['grid_crps']:.3f} | "
                f"{v['SLAMS']['crps']:.3f} / {v['SLAMS']['grid_crps']:.3f} |"
            )
        out += [
            "",
            "More steps help SLAMS with the corrector and SDA without it; SDA with the corrector gets "
            "worse as steps grow (its prior drifts). 64 steps is the default; the paper's 512 (8x the cost) "
            "were not "
            "measured here. Members: the CRPS of an ensemble improves with its size (16 by default; the "
            "evaluation uses 8 to fit its time budget).",
            "",
        ]
    if main:
        out += [
            "## Figures",
            "",
            "![CRPS at withheld stations](figures/assimilation/crps-withheld.png)",
            "",
            "![Rank histograms, real backgrounds](figures/assimilation/rank-histograms.png)",
            "",
        ]
    DOC.write_text("\n".join(out))


def chain_section(results: dict[str, Any], cases: dict[str, tuple[str, str]]) -> list[str]:
    """The downscale -> assimilate chain against each step alone (same blocks, folds and members)."""
    keys = [k for k in cases if f"{k} chain" in results and f"{k} real" in results]
    if not keys:
        return []
    out = [
        "## Downscale, then assimilate",
        "",
        "The chain a user writes: `ncep.downscale.cm(model=..., qdm=True, hist=..., members=8)` followed by "
        "`.assimilate.slams(stations=..., ...)`, the downscaled ensemble being the background ensemble "
        "(analysis member *k* starts from downscaled member *k*; the background enters cell by cell on the "
        "model grid with the point background std). QDM is fitted on NCEP R1's training winters; the "
        'scale is the one `scale="auto"` picks on those winters, resolved once. Same blocks, folds, '
        "stations and members as the real case above, whose *background* (NCEP R1 bilinear) and *SLAMS* "
        "(NCEP R1 cells as area averages) rows are repeated here as the single steps.",
        "",
    ]
    for key in keys:
        title, units = cases[key]
        real, chain = results[f"{key} real"], results[f"{key} chain"]
        rows = {m: real["table"][m] for m in ("background", "SLAMS") if m in real["table"]}
        rows |= {m: chain["table"][m] for m in CHAIN if m in chain["table"]}
        out += [
            f"**{title}** (scale {chain.get('scale', '?')}):",
            "",
            table_md({"table": rows}, units, ROWS),
            "",
        ]
        c, cm = rows.get("CM + SLAMS"), rows.get("CM")
        if c is None or cm is None:
            continue
        for base in ("background", "SLAMS", "CM"):
            b = rows.get(base)
            if b is None:
                continue
            name = {"SLAMS": "SLAMS on NCEP R1", "CM": "the CM alone"}.get(base, "the background")
            out.append(
                f"* CM + SLAMS vs {name}: CRPS at the withheld stations {c['crps']:.2f} vs {b['crps']:.2f} "
                f"{units} ({'better' if c['crps'] < b['crps'] else 'not better'}), on the E-OBS grid "
                f"{c['grid_crps']:.2f} vs {b['grid_crps']:.2f} "
                f"({'better' if c['grid_crps'] < b['grid_crps'] else 'not better'})."
            )
        out.append("")
        if (FIGS / f"maps-{key}-chain.png").is_file():
            out += [f"![{title}, the chain: one day](figures/assimilation/maps-{key}-chain.png)", ""]
    return out


KEEP = ("rmse", "crps", "spread_skill", "bias", "grid_rmse", "grid_crps", "grid_spread_skill", "seconds")


def update_cards(results: dict[str, Any], cases: dict[str, Case]) -> None:
    """Measured skill into the cards of the shipped pairs (``metrics``, outside the weights' sha256)."""
    for key, case in cases.items():
        real, twin = results.get(f"{key} real"), results.get(f"{key} twin")
        if real is None:
            continue
        suffix = "mm_per_day" if case.units == "mm d-1" else case.units
        for method, name in case.models.items():
            path = ROOT / "weights" / f"{name}.json"
            card = json.loads(path.read_text())

            def rows(res: dict[str, Any]) -> dict[str, Any]:
                return {
                    m: {k: round(v, 3) for k, v in r.items() if k in KEEP} for m, r in res["table"].items()
                }

            card["metrics"] = {
                "evaluation": "docs/evaluation-assimilation.md (benchmarks/evaluate_assimilation.py)",
                "units": case.units,
                "real_ncep_background_withheld_value_stations": rows(real),
                "twin": rows(twin) if twin else None,
                "setup": {k: real[k] for k in ("days", "folds", "members", "steps", "blocks")},
                "note": _verdict(real, case.units).replace("* ", "").replace("\n", " "),
                # compact form: RMSE at the withheld stations, real NCEP background
                "skill": {
                    row.lower(): {f"rmse_withheld_stations_{suffix}": round(real["table"][row]["rmse"], 3)}
                    for row in ("background", "OI", method)
                    if row in real["table"]
                },
            }
            path.write_text(json.dumps(card, indent=1))


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 blocks, 4 members (smoke run)")
    parser.add_argument("--sweep", action="store_true", help="steps and members sweep of the twin")
    parser.add_argument("--cases", nargs="+", default=["tg", "tp"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fresh", action="store_true", help="ignore stored results (default: resume)")
    parser.add_argument("--report", action="store_true", help="only write the page from the stored results")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "evaluate-assimilation.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from xdownscale.assimilate import DEFAULT_STEPS

    cases = load_cases()
    if args.report:
        stored: dict[str, Any] = json.loads(args.out.read_text())
        write_report(stored)
        update_cards(stored, cases)
        return
    blocks = {"tg": 1 if args.quick else 3, "tp": 1 if args.quick else 3}
    folds = 2
    members = 4 if args.quick else 8
    steps = DEFAULT_STEPS
    started = time.perf_counter()
    results: dict[str, Any] = {}
    if args.out.is_file() and not args.fresh:
        results = json.loads(args.out.read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    FIGS.mkdir(parents=True, exist_ok=True)

    def run(key: str, case: Case, **kw: Any) -> None:
        """Evaluate unless stored (resumable), then store."""
        if key in results:
            return
        results[key] = evaluate(case, **kw)
        args.out.write_text(json.dumps(results, indent=1))
        print(json.dumps({key: results[key]["table"]}, indent=1), flush=True)

    for twin in (False, True):
        for name in args.cases:
            case = cases[name]
            keep: dict[str, xr.DataArray] = {}
            key = f"{name} {'twin' if twin else 'real'}"
            nb = 1 if (twin and name == "tp") else blocks[name]  # the tp twin and its ablations: 1 block
            run(
                key,
                case,
                twin=twin,
                blocks=nb,
                members=members,
                steps=steps,
                folds=folds,
                keep=keep,
            )
            if keep:
                test = case.state.sel(time=slice(case.test_start, None))
                day0 = pick_blocks(test.time.values, nb)[0]
                figure_maps(
                    keep,
                    test.sel(time=day0),
                    FIGS / f"maps-{name}-{'twin' if twin else 'real'}.png",
                    f"{case.label}, {str(day0[2])[:10]}: "
                    f"{'twin' if twin else 'NCEP R1 background'}, stations of fold 1 assimilated",
                    "Blues" if case.nonneg else "RdYlBu_r",
                )
    for name in args.cases:
        # downscale -> assimilate: the CM ensemble of NCEP R1 as the background of SLAMS (same blocks and
        # folds as the real case, so its background and SLAMS rows are the baselines)
        case = cases[name]
        keep = {}
        run(
            f"{name} chain",
            case,
            twin=False,
            blocks=blocks[name],
            members=members,
            steps=steps,
            folds=folds,
            methods=CHAIN,
            keep=keep,
        )
        if keep:
            test = case.state.sel(time=slice(case.test_start, None))
            day0 = pick_blocks(test.time.values, blocks[name])[0]
            figure_maps(
                keep,
                test.sel(time=day0),
                FIGS / f"maps-{name}-chain.png",
                f"{case.label}, {str(day0[2])[:10]}: NCEP R1 downscaled by the CM, then SLAMS with the "
                "stations of fold 1",
                "Blues" if case.nonneg else "RdYlBu_r",
            )
    if "tp" in args.cases:
        # cause analysis in the twin: the fixes of issue 13 undone one at a time (same block as "tp twin")
        for label, abl in (("log-space operators", {"log_space": True}), ("no land mask", {"no_mask": True})):
            run(
                f"tp twin, {label}",
                cases["tp"],
                twin=True,
                blocks=1,
                members=members,
                steps=steps,
                folds=folds,
                methods=("SDA", "SLAMS"),
                ablate=abl,
            )
    if "tp" in args.cases:
        # the likelihood in the log space (the earlier default) beside the default in physical units (mm/day)
        for twin in (False, True):
            run(
                f"tp {'twin' if twin else 'real'}, likelihood=model",
                cases["tp"],
                twin=twin,
                blocks=1 if twin else blocks["tp"],
                members=members,
                steps=steps,
                folds=folds,
                methods=("SDA", "SLAMS"),
                likelihood="model",
            )
    if args.sweep:
        # steps x corrections in the temperature twin (1 block, 2 folds, 4 members): picks the defaults
        for corrections in (0, 1):
            for s in (16, 32, 64):
                key = f"corr{corrections} steps{s}"
                if key in results.get("sweep", {}):
                    continue
                with fixed_corrections(corrections):
                    res = evaluate(
                        cases["tg"],
                        twin=True,
                        blocks=1,
                        members=4,
                        steps=s,
                        methods=("SDA", "SLAMS"),
                        folds=2,
                    )
                results.setdefault("sweep", {})[key] = res["table"]
                args.out.write_text(json.dumps(results, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    write_report(results)
    update_cards(results, cases)
    minutes = (time.perf_counter() - started) / 60
    print(f"done in {minutes:.1f} min; results in {args.out}")


if __name__ == "__main__":
    main()
