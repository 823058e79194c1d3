"""Evaluate the shipped Iberia models on real data and regenerate ``docs/evaluation.md``.

    python benchmarks/evaluate_iberia.py            # full report (tens of minutes on a 2-core CPU)
    python benchmarks/evaluate_iberia.py --quick    # fewer days and members, for a smoke test

Truth: E-OBS 0.25 deg daily precipitation, test winters DJF 1997/98-1999/2000 (never used for training
or tuning). Coarse inputs: the CNRM-CM5 historical run (a free-running ESM) and the NCEP/NCAR reanalysis 1.
The ESM shares dates but not weather with the observations, so everything is compared as climatologies,
distributions and spectra, never day by day. QDM is fitted on each input over the training winters
1990/91-1996/97 against the model's stored training quantiles.

Methods: the input regridded bilinearly without QDM, QDM only, the consistency model (1 and 2 steps,
scale "auto"), and the SDE bridge with 500 steps (on a subset of days: it costs 500 network calls per
field). Metrics follow Table 1 of Hess et al. (2024); see docs/evaluation.md for definitions.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

import xdownscale
from xdownscale import metrics
from xdownscale.errors import XDownscaleWarning
from xdownscale.xr.units import convert_units

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "iberia"
DOCS = ROOT / "docs"
FIGURES = DOCS / "figures" / "evaluation"
TEST = slice("1997-12-01", "2000-02-29")
HIST = slice("1990-12-01", "1997-02-28")
CM_NAME = "cm-eobs-iberia-0.25deg-pr"
SDE_NAME = "sde-eobs-iberia-0.25deg-pr"
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
    """About ``days`` indices out of ``n``: blocks of ``block`` consecutive days spread evenly (the
    models are daily models, so a subset keeps daily steps)."""
    if days >= n:
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
    for steps in (1, 2):
        name = f"CM {steps} step{'s' if steps > 1 else ''}"
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
        )
        fields[name] = _mm(out).load()
        seconds[name] = (time.perf_counter() - t0) / (test.sizes["time"] * args.members)
    subset = test.isel(time=_blocks(test.sizes["time"], args.sde_days))
    sde_scale = xdownscale.Scale(scale.wavenumber, scale.wavelength_km, scale.sigma)
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
        }
        rows.append(row)
    return rows


def _psd(field: xr.DataArray, cm: Any) -> xr.DataArray:
    mask = cm.grid["mask"]
    transformed = cm.transform.forward(convert_units(field, cm.variable["units"]).where(mask))
    dims = [d for d in transformed.dims if d in ("time", "member")]
    return xdownscale.psd(transformed).mean(dims)


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
    ax.set_ylabel("PSD (transformed space)")
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
    wettest = int(fields["QDM only"].mean(("lat", "lon")).argmax())
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
        sig = [r["sigma"] for r in sweep]
        axes[0].semilogx(sig, [r["pooled_corr"] for r in sweep], "o-", label="pooled corr")
        axes[0].semilogx(sig, [r["lowpass_corr"] for r in sweep], "s-", label="low-pass corr")
        axes[0].set_ylabel("correlation")
        axes[1].semilogx(sig, [r["mae"] for r in sweep], "o-", label="mean abs error")
        axes[1].semilogx(sig, [r["p95"] for r in sweep], "s-", label="p95 abs error")
        axes[1].set_ylabel("mm/day")
        axes[2].semilogx(
            sig, [r["log_spectral_distance"] for r in sweep], "o-", label="log-spectral distance"
        )
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
    test = coarse.sel(time=TEST)
    test = test.isel(time=_blocks(test.sizes["time"], days))
    hist = coarse.sel(time=HIST)
    native = _mm(test).load()
    reference = _mm(test.downscale.prepare(model=cm, transform=False, qdm=True, hist=hist)).load()
    truth_psd = np.log(_psd(truth, cm).values)
    rows = []
    for sigma in sigmas:
        out = _mm(
            test.downscale.cm(model=cm, scale=f"sigma={sigma}", qdm=True, hist=hist, seed=1, progress=False)
        ).load()
        rows.append(
            {
                "sigma": sigma,
                "pooled_corr": float(metrics.pooled_correlation(out, native, factor=None)),
                "lowpass_corr": float(metrics.lowpass_correlation(out, reference, scale.wavenumber)),
                "mae": float(metrics.mean_abs_error(out, truth)),
                "p95": float(metrics.quantile_abs_error(out, truth, q=0.95)),
                "log_spectral_distance": float(
                    np.sqrt(np.mean((np.log(_psd(out, cm).values) - truth_psd) ** 2))
                ),
            }
        )
    return rows


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
    return out


def _table(rows: list[dict]) -> str:
    head = (
        "| method | pooled corr | low-pass corr | mean abs err, mm/day (reduction) | p95 abs err, mm/day "
        "(reduction) | Wasserstein | ensemble spread | s / field | days "
        "|\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        spread = "-" if np.isnan(r["spread"]) else f"{r['spread']:.3f}"
        lines.append(
            f"| {r['method']} | {r['pooled_corr']:.3f} | {r['lowpass_corr']:.3f} | {r['mae']:.3f} "
            f"({100 * r['mae_reduction']:.1f}%) | {r['p95']:.3f} ({100 * r['p95_reduction']:.1f}%) | "
            f"{r['wasserstein']:.3f} | {spread} | {r['seconds_per_field']:.4f} | {r['days']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few days, members and steps (smoke test)")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--sde-days", type=int, default=30)
    parser.add_argument("--sde-steps", type=int, default=500)
    parser.add_argument("--sweep-days", type=int, default=90)
    parser.add_argument(
        "--write-card-metrics",
        action="store_true",
        help="store the CNRM-CM5 scores in the model cards' metrics (does not change the weights)",
    )
    args = parser.parse_args()
    if args.quick:
        args.members, args.sde_days, args.sde_steps, args.sweep_days = 2, 10, 20, 10
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: the shared data must sit beside the repository.")
    cm = xdownscale.load_model(CM_NAME)
    sde = xdownscale.load_model(SDE_NAME)
    truth = _mm(xr.open_dataset(DATA / "eobs_0.25deg_tp_djf1991-2000.nc")["tp"].sel(time=TEST)).load()
    sections = []
    card_metrics: dict[str, Any] = {}
    for label, (filename, var) in INPUTS.items():
        coarse = xr.open_dataset(DATA / filename)[var].load()
        started = time.perf_counter()
        fields, seconds, (scale, notes) = run_methods(coarse, cm, sde, args)
        rows = score(fields, seconds, coarse, truth, scale)
        sigmas = [0.05, 0.2, 0.5, scale.sigma, 1.5, 3.0, 10.0]
        sweep = scale_sweep(coarse, cm, truth, sorted(set(sigmas)), scale, args.sweep_days)
        figs = figures(label, fields, truth, cm, scale, sweep)
        lost = losses(rows)
        minutes = (time.perf_counter() - started) / 60
        print(f"{label}: {minutes:.1f} min")
        print(_table(rows))
        sections.append((label, scale, notes, rows, figs, lost, sweep))
        card_metrics[label] = {
            r["method"]: {
                k: round(v, 4) if isinstance(v, float) else v for k, v in r.items() if k != "method"
            }
            for r in rows
        }
    write_report(sections, args)
    if args.write_card_metrics:
        for model in (cm, sde):
            path = Path(model.path).with_suffix(".json")
            card = json.loads(path.read_text())
            card["metrics"] = {
                "evaluation": "docs/evaluation.md (python benchmarks/evaluate_iberia.py)",
                "test_period": "DJF 1997/98-1999/2000",
                "truth": "E-OBS 0.25 deg",
                **card_metrics,
            }
            path.write_text(json.dumps(card, indent=1))


def write_report(sections: list, args: argparse.Namespace) -> None:
    import platform

    parts = [
        "# Evaluation on real data: Iberia, winter precipitation",
        "",
        "*Generated by `python benchmarks/evaluate_iberia.py`; do not edit by hand.*",
        "",
        "**Truth:** E-OBS v12 daily precipitation at 0.25 deg, test winters DJF 1997/98-1999/2000 "
        "(never used "
        "for training or tuning). **Inputs:** the CNRM-CM5 historical run (CMIP5, 1.4 deg; a "
        "free-running ESM "
        "that shares dates but not weather with the observations) and the NCEP/NCAR reanalysis 1 (1.9 deg). "
        "Everything is compared as climatologies, distributions and spectra, never day by day. QDM is fitted "
        "per cell on each input over the training winters 1990/91-1996/97 against the per-cell quantiles the "
        f"model stores from its training data. Models: `{CM_NAME}` and `{SDE_NAME}` (see the model pages).",
        "",
        "Metrics (Hess et al. 2024, Table 1): *pooled corr* - the downscaled field averaged back "
        "onto the input's "
        "native grid (conservatively) and correlated with the input per day, then averaged: do the "
        "input's large "
        "scales survive? *low-pass corr* - the downscaled field low-passed at the scale k* and "
        "correlated with "
        "the input after regridding and QDM (the network's input). *mean abs err* - |long-term mean of the "
        "method - long-term mean of E-OBS| per cell, averaged over land cells; the reduction is "
        "relative to the "
        "bilinear input without QDM. *p95 abs err* - the same for each cell's 95th percentile of "
        "daily values. "
        "*Wasserstein* - distance between the distributions of all daily values (mm/day). Ensemble "
        "scores are "
        "averaged over members. CRPS is not reported: with unpaired data there is no observation for a given "
        "day to score an ensemble against; the ensemble spread is given instead.",
        "",
        f"Run: {args.members} CM members per day; SDE bridge on {args.sde_days} test days (blocks of 10 "
        "consecutive days spread over the test winters) with "
        f"{args.sde_steps} steps; scale sweep on {args.sweep_days} days. Machine: "
        f"{platform.processor() or 'CPU'} "
        f"({platform.machine()}), seconds per field measured on it for the whole pipeline.",
        "",
    ]
    for label, scale, notes, rows, figs, lost, sweep in sections:
        parts += [f"## {label} as the coarse input", "", f'Scale chosen by `scale="auto"`: {scale}.', ""]
        parts += [f"> {n}" for n in notes] + ([""] if notes else [])
        parts += [_table(rows), ""]
        parts += ["### Where the CM loses", ""]
        parts += [f"* {x}" for x in lost] if lost else ["* Nowhere in this table."]
        parts += [""]
        for f in figs:
            parts += [f"![{f}]({f})", ""]
        if sweep:
            parts += [
                "Scale sweep (CM 1 step, one member):",
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
            parts += [""]
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
