"""Evaluate the shipped Iberia models on real data and regenerate ``docs/evaluation.md``.

    python benchmarks/evaluate_iberia.py            # full report (tens of minutes on a 2-core CPU)
    python benchmarks/evaluate_iberia.py --quick    # fewer days and members, for a smoke test
    python benchmarks/evaluate_iberia.py --report   # rewrite the page from the last run's stored scores

Truth: E-OBS 0.25 deg daily precipitation, test winters DJF 1997/98-1999/2000 (never used for training
or tuning). Coarse inputs: the CNRM-CM5 historical run (a free-running ESM) and the NCEP/NCAR reanalysis 1.
The ESM shares dates but not weather with the observations, so everything is compared as climatologies,
distributions and spectra, never day by day. QDM is fitted on each input over the training winters
1990/91-1996/97 against the model's stored training quantiles.

Methods: the input regridded bilinearly without QDM, QDM only, the consistency model (1 and 2 steps,
scale "auto"), and the SDE bridge with 500 steps (on a subset of days in the paired tests: it costs 500
network calls per field; on all test days in the unpaired ones, whose scores are climatologies).
Metrics follow Table 1 of Hess et al. (2024); see docs/evaluation.md for definitions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

import xdownscale
from xdownscale import metrics
from xdownscale.core.spectra import log_spectral_distance
from xdownscale.errors import XDownscaleWarning
from xdownscale.preserve import preserve_large_scales
from xdownscale.xr.spectra import Scale
from xdownscale.xr.units import convert_units

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "iberia"
DOCS = ROOT / "docs"
FIGURES = DOCS / "figures" / "evaluation"
TEST = slice("1997-12-01", "2000-02-29")
HIST = slice("1990-12-01", "1997-02-28")
CM_NAME = "cm-eobs-iberia-0.25deg-pr"
SDE_NAME = "sde-eobs-iberia-0.25deg-pr"
# the bilinear field with the input's cell values restored (preserve="mean", no noise): what the CM's
# default correction alone does, the bar the network must beat in the perfect-model tests
CONSERVING = "bilinear, preserve='mean'"
# every test resolves scale="auto" once on the reference period and reuses it for the test days, as a
# user's plan does: with QDM on the input's training winters after QDM, in the perfect-model tests on
# the E-OBS training winters coarse-grained like the test days
RESOLVED = "on the training winters 1990/91-1996/97 (the reference period), reused for the test days"
SWEEP_FACTORS = (0.125, 0.25, 0.5, 1.0, 2.0)  # noise levels of the paired sweep, x the auto scale's
# log(x + 0.1 mm/day) for scores in log space: 0.1 mm is the resolution of E-OBS's daily totals
LOG_OFFSET = 0.1
SUMMARY = FIGURES / "summary.json"  # the scores of the last full run, for --report
RUN_ARGS = ("members", "sde_days", "sde_steps", "sweep_days", "paired_days", "machine")


def other_rule(qdm: bool) -> tuple[str, str]:
    """The row name and rule of the CM with the mean rule of ``preserve=`` that is not the default: the
    default is 'smooth-mean' (the regridded input's cell means) with QDM, 'mean' (its values) without."""
    rule = "mean" if qdm else "smooth-mean"
    return f"CM 1 step, preserve='{rule}'", rule


INPUTS = {
    "CNRM-CM5": ("cmip5_cnrm-cm5_pr_historical_djf1983-2002.nc", "pr"),
    "NCEP R1": ("ncep_r1_pr_djf1983-2002.nc", "pr"),
}


def _mm(da: xr.DataArray) -> xr.DataArray:
    return convert_units(da, "mm/day")


def _per_member(fn: Any, field: xr.DataArray, *args: Any, **kwargs: Any) -> float:
    if "member" in field.dims:
        return float(
            np.mean([float(fn(field.isel(member=m), *args, **kwargs)) for m in range(field.sizes["member"])])
        )
    return float(fn(field, *args, **kwargs))


def _blocks(n: int, days: int, block: int = 10) -> np.ndarray:
    """About ``days`` indices out of ``n`` (all of them for ``days`` 0): blocks of ``block`` consecutive
    days spread evenly (the models are daily models, so a subset keeps daily steps)."""
    if days <= 0 or days >= n:
        return np.arange(n)
    nblocks = max(1, days // block)
    starts = np.linspace(0, n - block, nblocks).round().astype(int)
    return np.unique(np.concatenate([np.arange(s, min(s + block, n)) for s in starts]))


def run_methods(coarse: xr.DataArray, cm: Any, sde: Any, args: argparse.Namespace) -> tuple[dict, dict, Any]:
    """Downscale the test winters of ``coarse`` with every method; fields in mm/day."""
    test = coarse.sel(time=TEST)
    hist = coarse.sel(time=HIST)
    fields: dict[str, xr.DataArray] = {}
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    fields["ESM bilinear (no QDM)"] = _mm(test.downscale.prepare(model=cm, transform=False)).load()
    seconds["ESM bilinear (no QDM)"] = (time.perf_counter() - t0) / test.sizes["time"]
    t0 = time.perf_counter()
    fields["QDM only"] = _mm(test.downscale.prepare(model=cm, transform=False, qdm=True, hist=hist)).load()
    seconds["QDM only"] = (time.perf_counter() - t0) / test.sizes["time"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", XDownscaleWarning)
        scale = test.downscale.select_scale(model=cm, qdm=True, hist=hist)
    notes = [str(w.message) for w in caught]
    for name, preserve, steps in (
        ("CM 1 step", True, 1),
        ("CM 1 step, preserve=False", False, 1),
        (*other_rule(True), 1),
        ("CM 2 steps", True, 2),
    ):
        t0 = time.perf_counter()
        out = test.downscale.cm(
            model=cm,
            scale=scale,
            steps=steps,
            members=args.members,
            seed=0,
            qdm=True,
            hist=hist,
            progress=False,
            preserve=preserve,
        )
        fields[name] = _mm(out).load()
        seconds[name] = (time.perf_counter() - t0) / (test.sizes["time"] * args.members)
    # all test days: the unpaired scores are climatologies, and a few days' mean against the whole
    # period's is a sampling error, not a model error (10 days gave a "mean abs err" of 2.6 mm/day)
    subset = test
    sde_scale = _same_scale(scale, sde)
    t0 = time.perf_counter()
    out = subset.downscale.sde(
        model=sde,
        scale=sde_scale,
        steps=args.sde_steps,
        members=1,
        seed=0,
        qdm=True,
        hist=hist,
        progress=False,
    )
    fields[f"SDE bridge {args.sde_steps} steps"] = _mm(out).load()
    seconds[f"SDE bridge {args.sde_steps} steps"] = (time.perf_counter() - t0) / subset.sizes["time"]
    return fields, seconds, (scale, notes)


def score(fields: dict, seconds: dict, coarse: xr.DataArray, truth: xr.DataArray, scale: Any) -> list[dict]:
    native = _mm(coarse.sel(time=TEST)).load()
    reference = fields["QDM only"]
    base = fields["ESM bilinear (no QDM)"]
    base_mae = float(metrics.mean_abs_error(base, truth))
    base_p95 = float(metrics.quantile_abs_error(base, truth, q=0.95))
    rows = []
    for name, field in fields.items():
        times = field["time"]
        mae = _per_member(metrics.mean_abs_error, field, truth)
        p95 = _per_member(metrics.quantile_abs_error, field, truth, q=0.95)
        row = {
            "method": name,
            "pooled_corr": _per_member(
                metrics.pooled_correlation, field, native.sel(time=times), factor=None
            ),
            "lowpass_corr": _per_member(
                metrics.lowpass_correlation, field, reference.sel(time=times), scale.wavenumber
            ),
            "mae": mae,
            "mae_reduction": 1 - mae / base_mae,
            "p95": p95,
            "p95_reduction": 1 - p95 / base_p95,
            "seconds_per_field": seconds[name],
            "days": int(field.sizes["time"]),
            "spread": float(field.std("member").mean()) if "member" in field.dims else float("nan"),
            "wasserstein": metrics.wasserstein(field, truth),
            # Wasserstein-1 of all values is at least the difference of their means
            "mean_shift": float(field.mean()) - float(truth.mean()),
            # the domain mean against that of the bias-corrected input, on the same days
            "mean_vs_qdm": float(field.mean()) / float(reference.sel(time=times).mean()),
        }
        rows.append(row)
    return rows


def _same_scale(scale: Any, model: Any) -> Any:
    """``scale`` (the CM's pick) for another model: the same wavenumber, the noise level from that
    model's own target spectrum (the SDE's transform may differ from the CM's, and sigma lives in it)."""
    return xdownscale.Scale.from_wavenumber(scale.wavenumber, psd=model.target_psd)


def _psd(field: xr.DataArray, cm: Any) -> xr.DataArray:
    """Mean spectrum of ``field`` over the model's land cells in log(x + 0.1 mm/day), one space for every
    model whatever its own transform (the CM's offset may differ from the SDE's)."""
    mask = cm.grid["mask"]
    logged = np.log(_mm(field).where(mask) + LOG_OFFSET)
    dims = [d for d in logged.dims if d in ("time", "member")]
    return xdownscale.psd(logged).mean(dims)


def figures(
    label: str, fields: dict, truth: xr.DataArray, cm: Any, scale: Any, sweep: list[dict]
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    slug = label.lower().replace(" ", "-")
    written = []
    styles = {"ESM bilinear (no QDM)": "C1:", "QDM only": "C1-", "CM 1 step": "C3-", "CM 2 steps": "C4-"}

    fig, ax = plt.subplots(figsize=(6, 4.2), constrained_layout=True)
    ax.loglog(*_xy(_psd(truth, cm)), "k-", lw=2, label="E-OBS (truth)")
    for name, field in fields.items():
        ax.loglog(*_xy(_psd(field, cm)), styles.get(name, "C0--"), label=name)
    ax.axvline(scale.wavenumber, color="0.5", ls=":", label=f"scale k*={scale.wavenumber:.3f}")
    ax.set_xlabel("wavenumber (cycles per 0.25 deg cell)")
    ax.set_ylabel("PSD of log(x + 0.1 mm/day)")
    ax.set_title(f"Mean power spectra, {label} input, test winters")
    ax.legend(fontsize=7)
    written.append(_save(fig, f"{slug}-spectra.png"))

    edges = np.geomspace(0.1, 200, 41)
    fig, ax = plt.subplots(figsize=(6, 4.2), constrained_layout=True)
    h = metrics.histogram(truth, bins=edges)
    ax.loglog(h["bin"], h, "k-", lw=2, label="E-OBS (truth)")
    for name, field in fields.items():
        h = metrics.histogram(field, bins=edges)
        ax.loglog(h["bin"], h, styles.get(name, "C0--"), label=name)
    ax.set_xlabel("daily precipitation (mm/day)")
    ax.set_ylabel("density")
    ax.set_title(f"Distribution of daily values (wet tail), {label} input")
    ax.legend(fontsize=7)
    written.append(_save(fig, f"{slug}-histogram.png"))

    fig, ax = plt.subplots(figsize=(6, 4.2), constrained_layout=True)
    p = metrics.latitude_profile(truth)
    ax.plot(p, p[p.dims[0]], "k-", lw=2, label="E-OBS (truth)")
    for name, field in fields.items():
        p = metrics.latitude_profile(field)
        ax.plot(p, p[p.dims[0]], styles.get(name, "C0--"), label=name)
    ax.set_xlabel("mean precipitation (mm/day)")
    ax.set_ylabel("latitude")
    ax.set_title(f"Latitude profile of the mean, {label} input")
    ax.legend(fontsize=7)
    written.append(_save(fig, f"{slug}-latitude.png"))

    cm1 = fields["CM 1 step"]
    wettest = int(np.argmax(fields["QDM only"].mean(("lat", "lon")).values))
    day = str(cm1["time"].values[wettest])[:10]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4), constrained_layout=True)
    vmax = float(np.nanpercentile(cm1.isel(time=wettest).values, 99))
    for ax, (field, title, cmap) in zip(
        axes,
        (
            (fields["QDM only"].isel(time=wettest), "input after QDM", "Blues"),
            (cm1.isel(time=wettest, member=0), "CM member 1", "Blues"),
            (cm1.isel(time=wettest).mean("member"), f"CM ensemble mean ({cm1.sizes['member']})", "Blues"),
            (cm1.isel(time=wettest).std("member"), "CM ensemble spread (std)", "magma"),
        ),
        strict=True,
    ):
        field.plot(
            ax=ax, cmap=cmap, vmin=0, vmax=vmax if cmap == "Blues" else None, cbar_kwargs={"label": "mm/day"}
        )
        ax.set_title(f"{title}, {day}")
    written.append(_save(fig, f"{slug}-day.png"))

    if sweep:
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.6), constrained_layout=True)
        qdm, cms = sweep[0], sweep[1:]
        sig = [r["sigma"] for r in cms]
        panels = (
            (
                axes[0],
                (("pooled_corr", "o-", "pooled corr"), ("lowpass_corr", "s-", "low-pass corr")),
                "correlation",
            ),
            (axes[1], (("mae", "o-", "mean abs error"), ("p95", "s-", "p95 abs error")), "mm/day"),
            (axes[2], (("log_spectral_distance", "o-", "log-spectral distance"),), "distance"),
        )
        for ax, series, ylabel in panels:
            for key, style, name in series:
                (line,) = ax.semilogx(sig, [r[key] for r in cms], style, label=name)
                ax.axhline(qdm[key], color=line.get_color(), ls="--", lw=1, label=f"{name}, QDM only")
            ax.set_ylabel(ylabel)
        for ax in axes:
            ax.axvline(scale.sigma, color="0.5", ls=":", label="auto")
            ax.set_xlabel("noise level sigma(t*) (CM time t*)")
            ax.legend(fontsize=7)
        fig.suptitle(f"Scale sweep, CM 1 step, {label} input")
        written.append(_save(fig, f"{slug}-sweep.png"))
    return written


def _xy(spectrum: xr.DataArray) -> tuple[np.ndarray, np.ndarray]:
    return spectrum["wavenumber"].values, spectrum.values


def _save(fig: Any, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(FIGURES / name, dpi=100)
    plt.close(fig)
    return f"figures/evaluation/{name}"


def scale_sweep(
    coarse: xr.DataArray, cm: Any, truth: xr.DataArray, sigmas: list[float], scale: Any, days: int
) -> list[dict]:
    """CM 1 step at each noise level, and QDM only (sigma 0, the network's input), on the same test days
    (all of them unless ``days``), scored against E-OBS on those days."""
    test = coarse.sel(time=TEST)
    if test.sizes["time"] != truth.sizes["time"]:
        raise SystemExit(f"{coarse.name}: {test.sizes['time']} test days, E-OBS has {truth.sizes['time']}")
    pick = _blocks(test.sizes["time"], days) if days else np.arange(test.sizes["time"])
    test, truth = test.isel(time=pick), truth.isel(time=pick)
    hist = coarse.sel(time=HIST)
    native = _mm(test).load()
    reference = _mm(test.downscale.prepare(model=cm, transform=False, qdm=True, hist=hist)).load()
    truth_spectrum = _psd(truth, cm).values

    def row(sigma: float, out: xr.DataArray) -> dict:
        return {
            "sigma": sigma,
            "pooled_corr": float(metrics.pooled_correlation(out, native, factor=None)),
            "lowpass_corr": float(metrics.lowpass_correlation(out, reference, scale.wavenumber)),
            "mae": float(metrics.mean_abs_error(out, truth)),
            "p95": float(metrics.quantile_abs_error(out, truth, q=0.95)),
            "log_spectral_distance": log_spectral_distance(_psd(out, cm).values, truth_spectrum)[0],
            "days": int(test.sizes["time"]),
        }

    rows = [row(0.0, reference.where(cm.grid["mask"]))]
    for sigma in sigmas:
        out = _mm(
            test.downscale.cm(model=cm, scale=f"sigma={sigma}", qdm=True, hist=hist, seed=1, progress=False)
        ).load()
        rows.append(row(sigma, out))
    return rows


def _sweep_reading(sweep: list[dict], scale: Any) -> list[str]:
    """What the sweep says about where the CM's losses against QDM only come from, from its numbers."""
    qdm, rest = sweep[0], sweep[1:]
    low = rest[0]
    auto = min(rest, key=lambda r: abs(r["sigma"] - float(scale.sigma)))
    text = (
        f"At the smallest noise level (sigma {low['sigma']:.3g}) the CM returns its input: mean abs err "
        f"{low['mae']:.3f} vs {qdm['mae']:.3f} for QDM only, low-pass corr {low['lowpass_corr']:.3f} vs "
        f"{qdm['lowpass_corr']:.3f}. The errors grow with the noise level, to {auto['mae']:.3f} and "
        f"{auto['lowpass_corr']:.3f} at the auto scale (sigma {auto['sigma']:.3g}), while the spectrum "
        f"moves from {qdm['log_spectral_distance']:.3f} (QDM only) to {auto['log_spectral_distance']:.3f} "
        "(log-spectral distance). QDM fitted per fine cell already gives each cell E-OBS's climatology; "
        "the small scales the network regenerates are drawn from its prior for the whole domain and carry "
        "no place-specific climatology, so on these climatological metrics QDM only is a bar the CM can "
        "at best tie. The CM's gain is the daily structure (paired tests above), which climatologies do "
        "not see."
    )
    degrades = auto["mae"] > qdm["mae"] and abs(low["mae"] - qdm["mae"]) <= 0.02 * qdm["mae"]
    return [text] if degrades else []


# ----------------------------------------------------------------------------------- paired (model)
def coarse_grained(truth: xr.DataArray, factor: int) -> xr.DataArray:
    """``truth`` averaged over ``factor`` x ``factor`` blocks (sea ignored), padded with NaN (no data) to
    whole blocks first so that the coarse grid covers the whole domain."""
    from xdownscale.datasets import coarsen_like_esm

    pad = {d: (-truth.sizes[d]) % factor for d in ("lat", "lon")}
    padded = truth.pad({d: (0, n) for d, n in pad.items()})
    for d, n in pad.items():
        c = truth[d].values
        padded = padded.assign_coords(
            {d: (d, np.r_[c, c[-1] + (c[1] - c[0]) * np.arange(1, n + 1)], truth[d].attrs)}
        )
    return coarsen_like_esm(padded, factor=factor)


def _paired_inputs(truth: xr.DataArray, factor: int, days: int) -> tuple[xr.DataArray, xr.DataArray]:
    """A perfect-model input: E-OBS test days averaged over ``factor`` x ``factor`` blocks (sea ignored)."""
    sub = truth.isel(time=_blocks(truth.sizes["time"], days))
    return sub, coarse_grained(sub, factor).assign_attrs(units="mm/day")


def spread_skill(
    ens: xr.DataArray, truth: xr.DataArray, select: np.ndarray | None = None
) -> tuple[float, float, float, int]:
    """(spread/skill, spread, RMSE of the ensemble mean, cells) of :func:`xdownscale.metrics.spread_skill`
    over the finite cells (and ``select``); NaN ratio and spread for a single member."""
    if ens.sizes["member"] == 1:
        err = (ens.isel(member=0, drop=True) - truth).values
        ok = np.isfinite(err) if select is None else np.isfinite(err) & select
        return float("nan"), float("nan"), float(np.sqrt((err[ok] ** 2).mean())), int(ok.sum())
    r = metrics.spread_skill(ens, truth, where=select)
    return float(r), r.attrs["spread"], r.attrs["rmse"], r.attrs["n_points"]


def _paired_scores(
    field: xr.DataArray, truth: xr.DataArray, cm: Any, coarse: xr.DataArray
) -> dict[str, float]:
    """Day-by-day scores against the truth (mm/day; land cells), and the output averaged back onto the
    grid of its ``coarse`` input (pooled corr)."""
    mask = cm.grid["mask"]
    truth = truth.where(mask)
    ens = field if "member" in field.dims else field.expand_dims(member=[0])
    ens = ens.where(mask)
    mean = ens.mean("member")
    err = mean - truth
    crps = float(metrics.crps_ensemble(ens, truth, mean=...))
    rmse = float(np.sqrt((err**2).mean()))
    m = ens.sizes["member"]
    tv = truth.values[np.isfinite(truth.values)]
    ev = ens.values[np.isfinite(ens.values)]
    truth_spectrum = _psd(truth, cm)
    # the largest factor between the output's and the truth's power over all resolved wavenumbers
    distance, factor, worst = log_spectral_distance(_psd(ens, cm).values, truth_spectrum.values)
    return {
        "crps": crps,
        "mae_mean": float(np.abs(err).mean()),
        "rmse_mean": rmse,
        "spread_skill": spread_skill(ens, truth)[0],
        "spread_skill_log": spread_skill(np.log(ens + LOG_OFFSET), np.log(truth + LOG_OFFSET))[0],
        "mean_ratio": float(ev.mean()) / float(tv.mean()),
        "wet_freq": float((ev >= 1.0).mean()),
        "wet_freq_truth": float((tv >= 1.0).mean()),
        "p99": float(np.quantile(ev, 0.99)),
        "p99_truth": float(np.quantile(tv, 0.99)),
        "log_spectral_distance": distance,
        "psd_factor_max": factor,
        "psd_factor_wavenumber": float(truth_spectrum["wavenumber"].values[worst]),
        "pooled_corr": _per_member(
            metrics.pooled_correlation, ens.where(mask), _mm(coarse).sel(time=ens["time"]), factor=None
        ),
        "members": m,
    }


def paired(
    label: str,
    truth: xr.DataArray,
    coarse: xr.DataArray,
    cm: Any,
    sde: Any,
    args: argparse.Namespace,
    *,
    qdm: bool = False,
    hist: xr.DataArray | None = None,
    reference: xr.DataArray | None = None,
) -> tuple[list[dict], Any, dict, list[str]]:
    """Downscale ``coarse`` (which shares its days with ``truth``) and score every method day by day.

    ``scale="auto"`` is resolved once on the training winters, as a user's plan resolves it on the
    reference period: with QDM on ``hist`` (after QDM), otherwise on ``reference`` (the training winters
    coarse-grained like ``coarse``)."""
    source = scale_source(coarse, reference, qdm)
    kwargs: dict[str, Any] = {"qdm": qdm, "hist": hist} if qdm else {}
    fields: dict[str, xr.DataArray] = {}
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    fields["bilinear" + (" + QDM" if qdm else "")] = _mm(
        coarse.downscale.prepare(model=cm, transform=False, **kwargs)
    ).load()
    seconds[next(iter(fields))] = (time.perf_counter() - t0) / coarse.sizes["time"]
    if not qdm:  # the deterministic bar of the default preserve: the input's cell values, interpolated
        t0 = time.perf_counter()
        bilinear = fields["bilinear"]
        fields[CONSERVING] = preserve_large_scales(
            bilinear, bilinear, rule="mean", coarse=coarse, wet_min=cm.transform.wet_min
        ).load()
        seconds[CONSERVING] = seconds["bilinear"] + (time.perf_counter() - t0) / coarse.sizes["time"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", XDownscaleWarning)
        scale = source.downscale.select_scale(model=cm, **kwargs)
    for name, extra in (
        ("CM 1 step", {}),
        ("CM 1 step, preserve=False", {"preserve": False}),
        (other_rule(qdm)[0], {"preserve": other_rule(qdm)[1]}),
        ("CM 2 steps", {"steps": 2}),
    ):
        t0 = time.perf_counter()
        out = coarse.downscale.cm(
            model=cm, scale=scale, members=args.members, seed=0, progress=False, **kwargs, **extra
        )
        fields[name] = _mm(out).load()
        seconds[name] = (time.perf_counter() - t0) / (coarse.sizes["time"] * args.members)
    sub = _blocks(coarse.sizes["time"], args.sde_days)
    t0 = time.perf_counter()
    sde_scale = _same_scale(scale, sde)
    name = f"SDE bridge {args.sde_steps} steps"
    out = coarse.isel(time=sub).downscale.sde(
        model=sde, scale=sde_scale, steps=args.sde_steps, members=2, seed=0, progress=False, **kwargs
    )
    fields[name] = _mm(out).load()
    seconds[name] = (time.perf_counter() - t0) / (len(sub) * 2)
    # the SDE runs on fewer days and members: the CM on the same input is the fair comparison (run on
    # the subset itself, since QDM maps each value through the distribution of the series it is given)
    same = f"CM 1 step on the SDE's {len(sub)} days, 2 members"
    out = coarse.isel(time=sub).downscale.cm(
        model=cm, scale=scale, members=2, seed=0, progress=False, **kwargs
    )
    fields[same] = _mm(out).load()
    seconds[same] = seconds["CM 1 step"]
    rows = []
    for name, field in fields.items():
        row = {"method": name, **_paired_scores(field, truth.sel(time=field["time"]), cm, coarse)}
        row["km_per_cell"] = scale.wavelength_km * scale.wavenumber
        row["seconds_per_field"] = seconds[name]
        row["days"] = int(field.sizes["time"])
        rows.append(row)
    fields.pop(same)
    fields.pop(other_rule(qdm)[0])  # a variant of the CM's default: in the table only
    fields.pop(CONSERVING, None)  # a bar in the table; its spectrum is the bilinear field's, rescaled
    figs = _paired_figures(label, fields, truth, cm, scale)
    return rows, scale, fields, figs


def scale_source(coarse: Any, reference: Any, qdm: bool) -> Any:
    """What a test resolves ``scale="auto"`` on, never the days it scores: with QDM the input itself
    (whose ``select_scale(..., hist=)`` resolves on the QDM's training winters), otherwise ``reference``
    (the training winters coarse-grained like ``coarse``), which must then be given."""
    if qdm:
        return coarse
    if reference is None:
        raise ValueError("a test without QDM needs reference= (the training winters, coarse-grained)")
    return reference


def paired_sweep(
    truth: xr.DataArray,
    coarse: xr.DataArray,
    cm: Any,
    scale: Any,
    members: int,
    factors: tuple[float, ...] = SWEEP_FACTORS,
    **kwargs: Any,
) -> list[dict]:
    """CM 1 step (default preserve) at multiples of the auto scale's noise level, scored day by day:
    the trade-off between the error of each day (CRPS) and a realistic spectrum."""
    rows = []
    for factor in factors:
        sigma = float(scale.sigma) * factor
        out = coarse.downscale.cm(
            model=cm, scale=f"sigma={sigma}", members=members, seed=0, progress=False, **kwargs
        )
        row = _paired_scores(_mm(out).load(), truth, cm, coarse)
        rows.append({"factor": factor, "sigma": sigma, "days": int(truth.sizes["time"]), **row})
    return rows


def _paired_sweep_table(sweep: list[dict], bar: dict) -> list[str]:
    lines = [
        "| sigma(t*) | x auto | CRPS, mm/day | RMSE of mean | spread/skill (in log space) | "
        "log-spectral dist | largest PSD factor |",
        "|---|---|---|---|---|---|---|",
        f"| 0 ({bar['method']}) | 0 | {bar['crps']:.3f} | {bar['rmse_mean']:.3f} | - | "
        f"{bar['log_spectral_distance']:.3f} | {bar['psd_factor_max']:.2f} |",
    ]
    for r in sweep:
        lines.append(
            f"| {r['sigma']:.3g} | {r['factor']:g} | {r['crps']:.3f} | {r['rmse_mean']:.3f} | "
            f"{r['spread_skill']:.2f} ({r['spread_skill_log']:.2f}) | "
            f"{r['log_spectral_distance']:.3f} | {r['psd_factor_max']:.2f} |"
        )
    return lines


def _paired_sweep_reading(sweep: list[dict], bar: dict) -> str:
    """Where the auto scale lands on the sweep, from its numbers."""
    auto = min(sweep, key=lambda r: abs(r["factor"] - 1.0))
    best = min(sweep, key=lambda r: r["crps"])
    real = min(sweep, key=lambda r: r["log_spectral_distance"])
    calibrated = [r for r in sweep if 0.8 <= r["spread_skill"] <= 1.2]
    text = (
        f"At the auto scale (sigma {auto['sigma']:.3g}) the CRPS is {auto['crps']:.3f} mm/day against "
        f"{bar['crps']:.3f} for the {bar['method']} field (no noise). The lowest CRPS of the sweep is "
        f"{best['crps']:.3f}, at {best['factor']:g} x the auto sigma, where the log-spectral distance is "
        f"{best['log_spectral_distance']:.3f} (auto {auto['log_spectral_distance']:.3f}, lowest "
        f"{real['log_spectral_distance']:.3f} at {real['factor']:g} x). "
    )
    if best["factor"] < auto["factor"]:
        text += (
            "Less noise keeps more of the input's interpolated detail, which is nearer the truth on average "
            "than a regenerated one, but it is smooth"
        )
        text += (
            ": the sweep trades the error of each day against a realistic spectrum, and the auto scale sits "
            "on the spectrum's side. "
            if real["factor"] >= auto["factor"]
            else f"; here the spectrum is also closest to the truth's below the auto scale (at "
            f"{real['factor']:g} x), so the auto pick is too large for this network and input. "
        )
    if real["factor"] > auto["factor"]:
        text += (
            f"Here the spectrum is closest to the truth's with more noise than the auto pick (at "
            f"{real['factor']:g} x): for this input the pick, resolved on the training winters, is too small "
            "for a realistic spectrum. "
        )
    calibrated_log = [r for r in sweep if 0.8 <= r["spread_skill_log"] <= 1.2]

    def where(rows: list[dict]) -> str:
        return ", ".join(f"{r['factor']:g} x" for r in rows) or "no noise level of the sweep"

    text += (
        f"Spread/skill within 0.8-1.2 in mm/day at {where(calibrated)}; in log space at "
        f"{where(calibrated_log)}."
    )
    if (
        calibrated
        and calibrated_log
        and not {r["factor"] for r in calibrated} & {r["factor"] for r in calibrated_log}
    ):
        text += (
            " No noise level calibrates both: the levels that narrow the ensemble enough where it rains "
            "hard (which weighs on the ratio in mm/day) leave it too narrow where it is dry or light (which "
            "weighs in log space)."
        )
    return text


def _paired_figures(label: str, fields: dict, truth: xr.DataArray, cm: Any, scale: Any) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    slug = "paired-" + "".join(c for c in label.lower().replace(" ", "-") if c.isalnum() or c in "-.")
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    ax = axes[0]
    ax.loglog(*_xy(_psd(truth, cm)), "k-", lw=2, label="E-OBS (truth)")
    for i, (name, field) in enumerate(fields.items()):
        ax.loglog(*_xy(_psd(field, cm)), color=f"C{i}", ls="-" if "CM" in name else "--", label=name)
    ax.axvline(scale.wavenumber, color="0.5", ls=":", label=f"scale k*={scale.wavenumber:.3f}")
    ax.set_xlabel("wavenumber (cycles per 0.25 deg cell)")
    ax.set_ylabel("PSD of log(x + 0.1 mm/day)")
    ax.set_title(f"Mean power spectra, {label}")
    ax.legend(fontsize=7)
    ax = axes[1]
    mask = cm.grid["mask"]
    for i, (name, field) in enumerate(fields.items()):
        if "member" not in field.dims or field.sizes["member"] < 2:
            continue
        h = metrics.rank_histogram(field.where(mask), truth.sel(time=field["time"]).where(mask))
        ax.plot(h["rank"], h, "o-", color=f"C{i}", label=name)
        ax.axhline(1 / h.sizes["rank"], color=f"C{i}", lw=0.5, ls=":")
    ax.set_xlabel("rank of the truth among the members")
    ax.set_ylabel("relative frequency")
    ax.set_title("Rank histograms (flat = calibrated)")
    ax.legend(fontsize=7)
    written.append(_save(fig, f"{slug}-spectra-ranks.png"))

    cm1 = fields["CM 1 step"]
    day_index = int(np.argmax(truth.sel(time=cm1["time"]).mean(("lat", "lon")).values))
    day = cm1["time"].values[day_index]
    first = next(iter(fields))
    panels = [
        (truth.sel(time=day).where(mask), "E-OBS (truth)"),
        (fields[first].sel(time=day).where(mask), first),
        (cm1.sel(time=day).isel(member=0), "CM member 1"),
        (cm1.sel(time=day).isel(member=1), "CM member 2"),
        (cm1.sel(time=day).mean("member"), f"CM mean of {cm1.sizes['member']}"),
    ]
    vmax = float(np.nanpercentile(truth.sel(time=day).values, 99))
    fig, axes = plt.subplots(1, len(panels), figsize=(19, 3.3), constrained_layout=True)
    for ax, (field, title) in zip(axes, panels, strict=True):
        field.plot(ax=ax, cmap="Blues", vmin=0, vmax=vmax, cbar_kwargs={"label": "mm/day"})
        ax.set_title(f"{title}, {str(day)[:10]}", fontsize=9)
    written.append(_save(fig, f"{slug}-day.png"))
    return written


def _paired_table(rows: list[dict]) -> str:
    lines = [
        "| method | CRPS, mm/day | MAE of mean | RMSE of mean | spread/skill (in log space) | mean ratio | "
        "wet-day freq (truth) | p99, mm/day (truth) | log-spectral dist | largest PSD factor | pooled corr | "
        "s / field | days |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ss = "-" if np.isnan(r["spread_skill"]) else f"{r['spread_skill']:.2f} ({r['spread_skill_log']:.2f})"
        lines.append(
            f"| {r['method']} | {r['crps']:.3f} | {r['mae_mean']:.3f} | {r['rmse_mean']:.3f} | {ss} | "
            f"{r['mean_ratio']:.3f} | {r['wet_freq']:.3f} ({r['wet_freq_truth']:.3f}) | {r['p99']:.1f} "
            f"({r['p99_truth']:.1f}) | {r['log_spectral_distance']:.3f} | {r['psd_factor_max']:.2f} | "
            f"{r['pooled_corr']:.3f} | {r['seconds_per_field']:.4f} | {r['days']} |"
        )
    return "\n".join(lines)


def losses(rows: list[dict]) -> list[str]:
    """Plain statements of where the CM loses."""
    by = {r["method"]: r for r in rows}
    cm = by["CM 1 step"]
    out = []
    names = {
        "pooled_corr": ("pooled correlation", True),
        "lowpass_corr": ("low-pass correlation", True),
        "mae": ("mean absolute error of the long-term mean", False),
        "p95": ("p95 absolute error", False),
        "wasserstein": ("Wasserstein distance to E-OBS", False),
    }
    for other in ("QDM only", *[m for m in by if m.startswith("SDE")], "CM 2 steps"):
        if other not in by:
            continue
        for key, (label, higher_better) in names.items():
            a, b = cm[key], by[other][key]
            if (higher_better and a < b - 1e-3) or (not higher_better and a > b + 1e-3):
                out.append(f"CM 1 step is worse than {other} on {label}: {a:.3f} vs {b:.3f}.")
    qdm = by.get("QDM only")
    if qdm is not None and abs(qdm["mean_shift"]) >= 0.5 * qdm["wasserstein"]:
        unpreserved = by.get("CM 1 step, preserve=False", cm)
        out.append(
            "On the Wasserstein distance no method that keeps the bias-corrected input's mean can beat QDM "
            "only: the distance is at least the difference of the means, and QDM only's mean is "
            f"{qdm['mean_shift']:+.3f} mm/day from E-OBS's on these test days "
            f"({abs(qdm['mean_shift']):.3f} of its {qdm['wasserstein']:.3f}), a difference between the "
            "test winters and the training winters QDM was fitted on. The CM keeps that mean by design "
            f"(shift {cm['mean_shift']:+.3f}); without preserve the shift is "
            f"{unpreserved['mean_shift']:+.3f}."
        )
    return out


def _mean_change(rows: list[dict]) -> str:
    """How far the CM step moves the domain mean of its bias-corrected input (goal: 3%)."""
    by = {r["method"]: r for r in rows}
    parts = [
        f"{name} {100 * (by[name]['mean_vs_qdm'] - 1):+.1f}%"
        for name in ("CM 1 step", "CM 1 step, preserve=False", "CM 2 steps")
        if name in by
    ]
    cm = by["CM 1 step"]["mean_vs_qdm"] - 1
    return (
        "The CM step's change of the domain mean of its bias-corrected input (QDM only): "
        f"{'; '.join(parts)} (goal: at most 3% with the default settings, {_met(abs(cm) <= 0.03)})."
    )


def _table(rows: list[dict]) -> str:
    head = (
        "| method | pooled corr | low-pass corr | mean abs err, mm/day (reduction) | p95 abs err, mm/day "
        "(reduction) | Wasserstein | mean / QDM only's | ensemble spread | s / field | days "
        "|\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        spread = "-" if np.isnan(r["spread"]) else f"{r['spread']:.3f}"
        lines.append(
            f"| {r['method']} | {r['pooled_corr']:.3f} | {r['lowpass_corr']:.3f} | {r['mae']:.3f} "
            f"({100 * r['mae_reduction']:.1f}%) | {r['p95']:.3f} ({100 * r['p95_reduction']:.1f}%) | "
            f"{r['wasserstein']:.3f} | {r['mean_vs_qdm']:.3f} | {spread} | {r['seconds_per_field']:.4f} "
            f"| {r['days']} |"
        )
    return "\n".join(lines)


def main() -> None:
    global DOCS, FIGURES, SUMMARY  # --quick writes to a scratch folder
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few days, members and steps (smoke test)")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--sde-days", type=int, default=60, help="test days of the SDE in paired tests")
    parser.add_argument("--sde-steps", type=int, default=500)
    parser.add_argument("--sweep-days", type=int, default=0, help="test days in the scale sweep (0: all)")
    parser.add_argument(
        "--paired-days",
        type=int,
        default=0,
        help="test days per paired test (0: all; a subset is a poor sample of the winters: the 90 days "
        "once used here had half their mean precipitation)",
    )
    parser.add_argument(
        "--write-card-metrics",
        action="store_true",
        help="store the CNRM-CM5 scores in the model cards' metrics (does not change the weights)",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="only rewrite the page (and, with --write-card-metrics, the cards) from the scores the last "
        "full run stored in docs/figures/evaluation/summary.json, in seconds",
    )
    args = parser.parse_args()
    if args.report:
        if not SUMMARY.exists():
            raise SystemExit(f"{SUMMARY} not found: run the full evaluation once to store the scores.")
        paired_sections, sections, card_metrics = load_summary(args)
        write_report(paired_sections, sections, args)
        if args.write_card_metrics:
            for name in (CM_NAME, SDE_NAME):
                write_card_metrics(ROOT / "weights" / f"{name}.safetensors", card_metrics)
        return
    if args.quick:
        args.members, args.sde_days, args.sde_steps, args.sweep_days, args.paired_days = 2, 10, 20, 10, 10
        # a smoke test: the report and its figures go to a scratch folder, never over the published ones
        DOCS = Path(tempfile.mkdtemp(prefix="xdownscale-quick-"))
        FIGURES = DOCS / "figures" / "evaluation"
        SUMMARY = FIGURES / SUMMARY.name
        print(f"--quick: writing the report under {DOCS}")
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: the shared data must sit beside the repository.")
    cm = xdownscale.load_model(CM_NAME)
    sde = xdownscale.load_model(SDE_NAME)
    eobs = _mm(xr.open_dataset(DATA / "eobs_0.25deg_tp_djf1991-2000.nc")["tp"])
    truth = eobs.sel(time=TEST).load()
    training = eobs.sel(time=HIST).load()  # coarse-grained: the perfect-model tests' reference period
    sections = []
    card_metrics: dict[str, Any] = {}
    paired_sections = []
    for factor in (4, 6):
        started = time.perf_counter()
        label = f"E-OBS coarse-grained {factor}x ({0.25 * factor:g} deg)"
        days, coarse = _paired_inputs(truth, factor, args.paired_days)
        reference = coarse_grained(training, factor).assign_attrs(units="mm/day")
        rows, scale, _, figs = paired(label, days, coarse, cm, sde, args, reference=reference)
        sweep = paired_sweep(days, coarse, cm, scale, args.members)
        print(f"{label}: {(time.perf_counter() - started) / 60:.1f} min")
        print(_paired_table(rows))
        paired_sections.append((label, scale, rows, figs, sweep))
        card_metrics[f"paired: {label}"] = {r["method"]: _rounded(r) for r in rows}
    ncep = xr.open_dataset(DATA / INPUTS["NCEP R1"][0])[INPUTS["NCEP R1"][1]].load()
    started = time.perf_counter()
    days = truth.isel(time=_blocks(truth.sizes["time"], args.paired_days))
    label = "NCEP R1 with QDM, same days as E-OBS"
    qdm = {"qdm": True, "hist": ncep.sel(time=HIST)}
    rows, scale, _, figs = paired(label, days, ncep.sel(time=days["time"]), cm, sde, args, **qdm)
    sweep = paired_sweep(days, ncep.sel(time=days["time"]), cm, scale, args.members, **qdm)
    print(f"{label}: {(time.perf_counter() - started) / 60:.1f} min")
    print(_paired_table(rows))
    paired_sections.append((label, scale, rows, figs, sweep))
    card_metrics[f"paired: {label}"] = {r["method"]: _rounded(r) for r in rows}
    for label, (filename, var) in INPUTS.items():
        coarse = xr.open_dataset(DATA / filename)[var].load()
        started = time.perf_counter()
        fields, seconds, (scale, notes) = run_methods(coarse, cm, sde, args)
        rows = score(fields, seconds, coarse, truth, scale)
        sigmas = [0.05, 0.2, 0.5, scale.sigma, 1.5, 3.0, 10.0]
        sweep = scale_sweep(coarse, cm, truth, sorted(set(sigmas)), scale, args.sweep_days)
        shown = {k: v for k, v in fields.items() if k != other_rule(True)[0]}  # the variant: table only
        figs = figures(label, shown, truth, cm, scale, sweep)
        lost = losses(rows)
        minutes = (time.perf_counter() - started) / 60
        print(f"{label}: {minutes:.1f} min")
        print(_table(rows))
        sections.append((label, scale, notes, rows, figs, lost, sweep))
        card_metrics[label] = {r["method"]: _rounded(r) for r in rows}
    card_metrics = {
        "evaluation": "docs/evaluation.md (python benchmarks/evaluate_iberia.py)",
        "test_period": "DJF 1997/98-1999/2000",
        "truth": "E-OBS 0.25 deg",
        **card_metrics,
    }
    args.machine = _machine()
    store_summary(paired_sections, sections, card_metrics, args)
    write_report(paired_sections, sections, args)
    if args.write_card_metrics:
        for model in (cm, sde):
            write_card_metrics(Path(model.path), card_metrics)


def write_card_metrics(weights: Path, metrics: dict[str, Any]) -> None:
    """Store ``metrics`` in the JSON model card beside the weights file ``weights``; the weights are not
    touched."""
    path = weights.with_suffix(".json")
    card = json.loads(path.read_text())
    card["metrics"] = metrics
    path.write_text(json.dumps(card, indent=1))


def _machine() -> str:
    import platform

    return f"{platform.processor() or 'CPU'} ({platform.machine()})"


def _plain(x: Any) -> Any:
    """JSON for numpy scalars and scales (json.dumps' ``default``)."""
    if isinstance(x, Scale):
        return {"scale": dataclasses.asdict(x)}
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"cannot store {type(x).__name__} in {SUMMARY.name}")


def _scales(x: Any) -> Any:
    """``json.loads`` hook: the stored scales back as :class:`Scale`."""
    return Scale(**x["scale"]) if set(x) == {"scale"} else x


def store_summary(
    paired_sections: list, sections: list, card_metrics: dict, args: argparse.Namespace
) -> None:
    """Everything the page says, so that ``--report`` rewrites it without recomputing."""
    run = {k: getattr(args, k) for k in RUN_ARGS}
    summary = {"run": run, "paired": paired_sections, "unpaired": sections, "card_metrics": card_metrics}
    SUMMARY.write_text(json.dumps(summary, indent=1, default=_plain))


def load_summary(args: argparse.Namespace) -> tuple[list, list, dict]:
    """The stored sections and card metrics; ``args`` takes the stored run's settings."""
    summary = json.loads(SUMMARY.read_text(), object_hook=_scales)
    for k, v in summary["run"].items():
        setattr(args, k, v)
    return summary["paired"], summary["unpaired"], summary["card_metrics"]


def _rounded(row: dict) -> dict:
    """A row for the card: 6 significant digits (so the model page, which formats them again, shows what
    the report shows), NaN as null (JSON has no NaN)."""
    return {
        k: (None if v != v else float(f"{v:.6g}")) if isinstance(v, float) else v
        for k, v in row.items()
        if k != "method"
    }


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _paired_verdict(rows: list[dict]) -> list[str]:
    """Plain statements: does the CM beat the bilinear bar, and what does preserve do."""
    by = {r["method"]: r for r in rows}
    bar = rows[0]
    cm = by["CM 1 step"]
    raw = by["CM 1 step, preserve=False"]
    verdict = "beats" if cm["crps"] < bar["crps"] else "does NOT beat"
    lines = [
        f"* CM 1 step {verdict} the {bar['method']} field: CRPS {cm['crps']:.3f} vs {bar['crps']:.3f} mm/day "
        f"({100 * abs(1 - cm['crps'] / bar['crps']):.1f}% {'lower' if verdict == 'beats' else 'higher'}); "
        f"without preserve {raw['crps']:.3f}"
        + "".join(
            f"; {k[len('CM 1 step, ') :]} {by[k]['crps']:.3f}"
            for k in by
            if k.startswith("CM 1 step, preserve='")
        )
        + ".",
        f"* Mean ratio {cm['mean_ratio']:.3f} (without preserve {raw['mean_ratio']:.3f}); spread/skill "
        f"{cm['spread_skill']:.2f}; log-spectral distance {cm['log_spectral_distance']:.3f} vs "
        f"{bar['log_spectral_distance']:.3f} for the {bar['method']} field.",
    ]
    if CONSERVING in by:
        c = by[CONSERVING]
        beats = cm["crps"] < c["crps"]
        lines.append(
            f"* Against the bilinear field with the input's cell values restored ({CONSERVING}, no network): "
            f"CRPS {cm['crps']:.3f} vs {c['crps']:.3f} mm/day, the network "
            + ("beats it" if beats else "does NOT beat it")
            + f"; log-spectral distance {cm['log_spectral_distance']:.3f} vs "
            f"{c['log_spectral_distance']:.3f}, "
            f"largest PSD factor {cm['psd_factor_max']:.2f} vs {c['psd_factor_max']:.2f}."
        )
        if beats and cm["crps"] < c["crps"] < bar["crps"]:  # both steps help: say how much each gives
            share = (bar["crps"] - c["crps"]) / (bar["crps"] - cm["crps"])
            lines[-1] += (
                f" Of the CM's gain over the bilinear field in CRPS, {100 * share:.0f}% is the correction "
                f"of `preserve` alone; the network lowers the corrected field's CRPS by a further "
                f"{100 * (1 - cm['crps'] / c['crps']):.0f}% and adds realistic small scales and an ensemble."
            )
    if bar["method"] == "bilinear":  # a perfect-model test: the goals of the skill issue
        lines.append(
            f"* Goals of the perfect-model test (pooled corr >= 0.98, PSD within a factor 1.5 of the "
            f"truth's at every resolved wavenumber, spread/skill 0.8-1.2): pooled corr "
            f"{cm['pooled_corr']:.3f} ({_met(cm['pooled_corr'] >= 0.98)}; bilinear {bar['pooled_corr']:.3f}, "
            f"without preserve {raw['pooled_corr']:.3f}); largest PSD factor {cm['psd_factor_max']:.2f} at "
            f"{cm['km_per_cell'] / cm['psd_factor_wavenumber']:.0f} km "
            f"({_met(cm['psd_factor_max'] <= 1.5)}); "
            f"spread/skill {cm['spread_skill']:.2f} ({_met(0.8 <= cm['spread_skill'] <= 1.2)}; in log "
            f"space {cm['spread_skill_log']:.2f}: the pooled ratio in mm/day is dominated by heavy rain, the "
            "one in log space by the dry and light-rain cells)."
        )
    sde = [r for r in rows if r["method"].startswith("SDE")]
    same = [r for r in rows if r["method"].startswith("CM 1 step on the SDE")]
    if sde and same:
        s, c = sde[0], same[0]
        worse = [
            f"{label} {s[key]:.3f} vs {c[key]:.3f}"
            for key, label in (
                ("crps", "CRPS"),
                ("mae_mean", "MAE of the mean"),
                ("rmse_mean", "RMSE of the mean"),
                ("log_spectral_distance", "log-spectral distance"),
            )
            if s[key] > 1.05 * c[key]
        ]
        lines.append(
            f"* {s['method']} against the CM on the same {s['days']} days and 2 members: CRPS "
            f"{s['crps']:.3f} vs {c['crps']:.3f}, at {s['seconds_per_field']:.2f} s per field vs "
            f"{c['seconds_per_field']:.4f} s; "
            + (f"more than 5% worse on {', '.join(worse)}." if worse else "within 5% of the CM or better.")
        )
    return [*lines, ""]


def _training_section() -> list[str]:
    """The shipped CM's training record: the perfect-model validation curve stored in its card."""
    card = _read_card(CM_NAME)
    record = card.get("training", {}).get("validation")
    if not record or not record.get("curve"):
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # step, crps, spread/skill, mean ratio (, spectral distance in the model's space: newer cards)
    curve = np.asarray(record["curve"], dtype=float)
    spectral = curve.shape[1] > 4 and bool(np.isfinite(curve[:, 4]).any())
    fig, axes = plt.subplots(
        1, 4 if spectral else 3, figsize=(18 if spectral else 14, 3.4), constrained_layout=True
    )
    axes[0].plot(curve[:, 0], curve[:, 1], "o-", label="CM (EMA weights)")
    axes[0].axhline(record["bilinear_mae"], color="C1", ls="--", label="bilinear (MAE)")
    axes[0].set_ylabel("CRPS, mm/day")
    axes[1].plot(curve[:, 0], curve[:, 2], "o-")
    axes[1].axhline(1.0, color="0.5", ls=":")
    axes[1].set_ylabel("spread / skill")
    axes[2].plot(curve[:, 0], curve[:, 3], "o-")
    axes[2].axhline(1.0, color="0.5", ls=":")
    axes[2].set_ylabel("mean ratio")
    if spectral:
        axes[3].plot(curve[:, 0], curve[:, 4], "o-")
        axes[3].set_ylabel("log-spectral distance (model space)")
    for ax in axes:
        ax.axvline(record["step"], color="0.5", ls="--", lw=0.8)
        ax.set_xlabel("training step")
    axes[0].legend(fontsize=7)
    fig.suptitle("Perfect-model validation during training (validation winter 1996/97; shipped step: dashed)")
    path = _save(fig, "training-validation.png")
    return [
        "### Training record of the shipped CM",
        "",
        f"Validation while training: {record['metric']}. The shipped weights are those of step "
        f"{record['step']}, {record.get('rule', 'the lowest CRPS')} (CRPS {record['crps']:.3f} mm/day vs "
        "bilinear MAE "
        f"{record['bilinear_mae']:.3f}; spread/skill {record['spread_skill']:.2f}; mean ratio "
        f"{record['mean_ratio']:.3f}"
        + (
            f"; log-spectral distance {record['spectral_distance']:.3f}, largest PSD factor "
            f"{record['psd_factor']:.2f}, both in the model's transformed space"
            if record.get("spectral_distance") is not None
            else ""
        )
        + f"). Training: {card['training'].get('steps')} steps, loss "
        f"`{card['training'].get('loss')}`, {card['training'].get('wall_time_s', 0) / 60:.0f} min on "
        f"{card['training'].get('device')}.",
        "",
        f"![{path}]({path})",
        "",
    ]


def _read_card(name: str) -> dict[str, Any]:
    """The JSON card of shipped model ``name``."""
    return json.loads((ROOT / "weights" / f"{name}.json").read_text())


def _model_sizes() -> str:
    """The two shipped networks and their training, from the cards (the SDE baseline is only the CM's
    equal if they match)."""
    cards = {n: _read_card(n) for n in (CM_NAME, SDE_NAME)}
    channels = {n: c["architecture"]["config"]["channels"] for n, c in cards.items()}

    def size(name: str) -> str:
        t = cards[name]["training"]
        static = cards[name]["architecture"]["config"].get("static_channels", 0)
        eps = cards[name]["variable"]["transform"]["eps"]
        return (
            f"channels {','.join(map(str, channels[name]))}, {t['steps']} steps of batch {t['batch_size']}, "
            f"{t['wall_time_s'] / 60:.0f} min, log(x + {eps:g} mm/day) transform, "
            + ("with static inputs (per-cell climatology and mask)" if static else "no static inputs")
        )

    smaller = sum(channels[SDE_NAME]) < sum(channels[CM_NAME])
    return f"The networks: CM {size(CM_NAME)}; SDE {size(SDE_NAME)}" + (
        " (the SDE baseline is the smaller network)." if smaller else "."
    )


def _wet_min() -> float:
    """The shipped CM's dry threshold, in mm/day (from its card)."""
    card = _read_card(CM_NAME)
    return float(card["variable"]["transform"]["wet_min"])


def write_report(paired_sections: list, sections: list, args: argparse.Namespace) -> None:
    parts = [
        "# Evaluation on real data: Iberia, winter precipitation",
        "",
        "*Generated by `python benchmarks/evaluate_iberia.py`; do not edit by hand.*",
        "",
        "**Truth:** E-OBS v12 daily precipitation at 0.25 deg, test winters DJF 1997/98-1999/2000 (never "
        "used for training or tuning). **Models:** "
        f"`{CM_NAME}` and `{SDE_NAME}` (see the model pages). Two kinds of test answer two questions:",
        "",
        "* **Paired tests: is the model good?** E-OBS test days averaged to a coarse grid (or the NCEP "
        "reanalysis of the same days) are downscaled back and scored day by day against the E-OBS field "
        "they came from. The bar is the bilinear field: a downscaling model must beat it.",
        "* **Unpaired tests: does the whole chain help an ESM?** The CNRM-CM5 historical run shares dates "
        "but not weather with the observations, so it is compared as climatologies, distributions and "
        "spectra, never day by day.",
        "",
        f"Run: {args.members} CM members per day, {args.paired_days or 'all test'} days per paired test; "
        "SDE bridge "
        f"with {args.sde_steps} steps at the CM's scale (its wavenumber; the noise level from the SDE's own "
        f"target spectrum): 2 members on {args.sde_days} days in paired tests, 1 member on all "
        f"test days in unpaired ones (their scores are climatologies); scale sweep on "
        f"{args.sweep_days or 'all test'} days; subsets in blocks of 10 "
        "consecutive days spread over the test winters. " + _model_sizes() + f" Machine: {args.machine}, "
        "seconds per field measured on it for the whole pipeline.",
        "",
        "## Paired tests: is the model good?",
        "",
        "Metrics, over land cells and all scored days, in mm/day: *CRPS* of the ensemble against the true "
        "field (for a single field it is the mean absolute error, so the bilinear row is the bar); *MAE* and "
        "*RMSE of the ensemble mean*; *spread/skill* - the ensemble's spread (with the finite-ensemble "
        "factor) over the RMSE of its mean (1 = calibrated, < 1 = over-confident); *mean ratio* - mean of "
        "the output over the truth's; *wet-day frequency* - share of values >= 1 mm/day; *p99* - 99th "
        "percentile of all daily values; *log-spectral distance* - RMS difference of the log mean spectra "
        "(of log(x + 0.1 mm/day)) from the truth's. `preserve=False` is the network's output as it is; the "
        "default `preserve=True` makes its mean over each of the input's cells the input's value there "
        "(`preserve='mean'`), or with QDM the regridded, corrected input's mean over the cell "
        "(`preserve='smooth-mean'`, QDM being fitted on that field); the row of the other rule shows "
        "what the choice does. Generated "
        f"amounts below {_wet_min():g} mm/day, the smallest positive value of the training data (E-OBS "
        "reports to 0.1 mm), are drizzle (`wet_min` in the model card): without `preserve` they are set "
        "to 0; with it, each input cell's rain is put on its values of at least that amount (or on its "
        "largest values, as many as its total holds such amounts), its mean kept, and then single wet "
        "cells among dry ones and dry holes inside rain go (the model's training data have coherent rain "
        "areas: its card's `specks`). 82% of the true test "
        "values are 0, and members left at 1e-4 mm/day (the near-zero tail of the inverse log transform) "
        "would rank above every dry truth and tilt the rank histograms.",
        "",
    ]
    for label, scale, rows, figs, sweep in paired_sections:
        parts += [
            f"### {label}",
            "",
            f'Scale chosen by `scale="auto"` {RESOLVED}: {scale}.',
            "",
            _paired_table(rows),
            "",
        ]
        parts += _paired_verdict(rows)
        for f in figs:
            parts += [f"![{f}]({f})", ""]
        bar = next((r for r in rows if r["method"] == CONSERVING), rows[0])
        parts += [
            f"Noise-level sweep (CM 1 step, default preserve, {sweep[0]['days']} days, "
            f"{args.members} members; sigma 0 is the {bar['method']} field):",
            "",
            *_paired_sweep_table(sweep, bar),
            "",
            _paired_sweep_reading(sweep, bar),
            "",
        ]
    parts += _training_section()
    parts += [
        "## Unpaired tests: does the chain help an ESM?",
        "",
        "QDM is fitted per cell on each input over the training winters 1990/91-1996/97 against the per-cell "
        "quantiles the model stores from its training data. Metrics (Hess et al. 2024, Table 1): *pooled "
        "corr* - the downscaled field averaged back onto the input's native grid (conservatively) and "
        "correlated with the input per day, then averaged: do the input's large scales survive? *low-pass "
        "corr* - the downscaled field low-passed at the scale k* and correlated with the input after "
        "regridding and QDM (the network's input). *mean abs err* - |long-term mean of the method - "
        "long-term mean of E-OBS| per cell, averaged over land cells; the reduction is relative to the "
        "bilinear input without QDM. *p95 abs err* - the same for each cell's 95th percentile of daily "
        "values. *Wasserstein* - distance between the distributions of all daily values (mm/day). *mean / "
        "QDM only's* - the domain mean (land cells, all days and members) over that of QDM only. Ensemble "
        "scores are averaged over members; with unpaired data there is no observation of a given day to "
        "score an ensemble against, so the ensemble spread is given instead of a CRPS.",
        "",
    ]
    for label, scale, notes, rows, figs, lost, sweep in sections:
        parts += [
            f"### {label} as the coarse input",
            "",
            f'Scale chosen by `scale="auto"` {RESOLVED}: {scale}.',
            "",
        ]
        parts += [f"> {n}" for n in notes] + ([""] if notes else [])
        parts += [_table(rows), "", _mean_change(rows), ""]
        parts += ["Where the CM (1 step, default settings) loses:", ""]
        parts += [f"* {x}" for x in lost] if lost else ["* Nowhere in this table."]
        parts += [""]
        for f in figs:
            parts += [f"![{f}]({f})", ""]
        if sweep:
            parts += [
                f"Scale sweep (CM 1 step, one member, {sweep[0]['days']} test days; sigma 0 is QDM only, the "
                "network's input):",
                "",
                "| sigma(t*) | pooled corr | low-pass corr | mean abs err | p95 abs err | "
                "log-spectral distance |",
                "|---|---|---|---|---|---|",
            ]
            parts += [
                f"| {r['sigma']:.3g} | {r['pooled_corr']:.3f} | {r['lowpass_corr']:.3f} | {r['mae']:.3f} | "
                f"{r['p95']:.3f} | {r['log_spectral_distance']:.3f} |"
                for r in sweep
            ]
            parts += [""] + [f"{x}" for x in _sweep_reading(sweep, scale)] + [""]
    parts += [
        "## Reading these numbers",
        "",
        "The shipped models are small and were trained on a 2-core CPU for a limited number of steps on six "
        "winters; the paper trained a 27 M parameter network on 40 years of global ERA5 on a GPU. The "
        "comparison shows how the method behaves on real data with such a model, not the paper's skill.",
        "",
    ]
    (DOCS / "evaluation.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
