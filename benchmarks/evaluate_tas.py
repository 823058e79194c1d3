"""Skill of the temperature model on real data: writes ``docs/evaluation-tas.md`` and its figures.

    python benchmarks/evaluate_tas.py              # the report (about 2 minutes on 2 cores)
    python benchmarks/evaluate_tas.py --quick      # few days and members (smoke test)

Truth: E-OBS v14 daily mean temperature (``tg``, 0.5 deg, sea masked) over Iberia, test winters
1997/98-2001/02, never used for training or tuning (the model trained on 1982/83-1995/96 and validated on
1996/97). Three tests, as for precipitation in ``evaluate_iberia.py``:

* perfect model (paired): the test days block-averaged 3x (1.5 deg) and 4x (2 deg), downscaled back and
  scored day by day against the truth: ensemble CRPS against the MAE of bilinear interpolation, the
  ensemble mean's MAE and RMSE, bias, spread/skill, log-spectral distance;
* reanalysis (paired): NCEP R1 ``tas`` of the same days, bias-corrected with additive QDM fitted on the
  training winters, scored day by day in the same way;
* climate model (unpaired): CNRM-CM5 ``tas`` shares dates but not weather with E-OBS, so only its
  climatology (mean abs error of the test-period mean per cell), the distribution (Wasserstein distance)
  and the pooled correlation of the output's block means with the model's own field are compared.

The data in ``../shared/data`` are not part of the repository.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

# the precipitation report's paths and its perfect-model coarse-graining (run as a script: same folder)
from evaluate_iberia import DATA, DOCS, coarse_grained, scale_source

import xdownscale
from xdownscale import metrics
from xdownscale.errors import XDownscaleWarning
from xdownscale.xr.units import convert_units

FIGURES = DOCS / "figures" / "evaluation-tas"
TEST = slice("1997-12-01", "2002-02-28")
HIST = slice("1982-12-01", "1997-02-28")
CM_NAME = "cm-eobs-iberia-0.5deg-tas"
SDE_NAME = "sde-eobs-iberia-0.5deg-tas"


def _degc(da: xr.DataArray) -> xr.DataArray:
    return convert_units(da, "degC")


def _days(n: int, days: int, block: int = 5) -> np.ndarray:
    """About ``days`` indices of ``n`` in runs of ``block`` consecutive days spread evenly (all when
    ``days >= n``): consecutive days keep the daily time step that the model checks."""
    if days >= n:
        return np.arange(n)
    starts = np.linspace(0, n - block, max(1, days // block)).round().astype(int)
    return np.unique(np.concatenate([np.arange(s, s + block) for s in starts]))


def _coarse_grained(truth: xr.DataArray, factor: int) -> xr.DataArray:
    return coarse_grained(truth, factor).assign_attrs(units="degC")


def _log_psd(field: xr.DataArray, cm: Any) -> np.ndarray:
    """Log of the mean spectrum in the model's transformed space (masked cells as the model's target)."""
    transformed = cm.transform.forward(convert_units(field, cm.variable["units"]).where(cm.grid["mask"]))
    dims = [d for d in transformed.dims if d in ("time", "member")]
    return np.log(xdownscale.psd(transformed).mean(dims).values)


def _scores(field: xr.DataArray, truth: xr.DataArray, cm: Any) -> dict[str, float]:
    """Day-by-day scores of ``field`` (degC, optionally with ``member``) against ``truth`` on land."""
    mask = cm.grid["mask"]
    truth = truth.sel(time=field["time"]).where(mask)
    ens = (field if "member" in field.dims else field.expand_dims(member=[0])).where(mask)
    mean = ens.mean("member")
    err = mean - truth
    rmse = float(np.sqrt((err**2).mean()))
    m = ens.sizes["member"]
    truth_psd, out_psd = _log_psd(truth, cm), _log_psd(ens, cm)
    ok = np.isfinite(truth_psd) & np.isfinite(out_psd)
    return {
        "crps": float(metrics.crps_ensemble(ens, truth, mean=...)),
        "mae_mean": float(np.abs(err).mean()),
        "rmse_mean": rmse,
        "bias": float(err.mean()),
        "spread_skill": float(metrics.spread_skill(ens, truth)) if m > 1 else float("nan"),
        "log_spectral_distance": float(np.sqrt(np.mean((out_psd[ok] - truth_psd[ok]) ** 2))),
        "members": m,
        "days": int(field.sizes["time"]),
    }


def _methods(
    coarse: xr.DataArray,
    cm: Any,
    members: int,
    sde: tuple[Any, int, int] | None = None,
    reference: xr.DataArray | None = None,
    **kwargs: Any,
) -> tuple[dict[str, xr.DataArray], dict[str, float], Any]:
    """Bilinear (+ QDM when asked), the CM with and without ``preserve`` and, with ``sde`` = (model, days,
    steps), the SDE bridge on evenly spread days, in degC, with timings. ``scale="auto"`` is resolved
    once on the training winters, as a user's plan resolves it on the reference period: with QDM on
    ``hist``, otherwise on ``reference`` (the training winters coarse-grained like ``coarse``)."""
    source = scale_source(coarse, reference, bool(kwargs.get("qdm")))
    fields: dict[str, xr.DataArray] = {}
    seconds: dict[str, float] = {}
    label = "bilinear" + (" + QDM" if kwargs.get("qdm") else "")
    t0 = time.perf_counter()
    fields[label] = _degc(coarse.downscale.prepare(model=cm, transform=False, **kwargs)).load()
    seconds[label] = (time.perf_counter() - t0) / coarse.sizes["time"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", XDownscaleWarning)
        scale = source.downscale.select_scale(model=cm, **kwargs)
    for name, extra in (("CM 1 step", {}), ("CM 1 step, preserve=False", {"preserve": False})):
        t0 = time.perf_counter()
        out = coarse.downscale.cm(
            model=cm, scale=scale, members=members, seed=0, progress=False, **kwargs, **extra
        )
        fields[name] = _degc(out).load()
        seconds[name] = (time.perf_counter() - t0) / (coarse.sizes["time"] * members)
    if sde is not None:
        model, days, steps = sde
        sub = coarse.isel(time=_days(coarse.sizes["time"], days))
        name = f"SDE bridge {steps} steps"
        t0 = time.perf_counter()
        same = xdownscale.Scale(scale.wavenumber, scale.wavelength_km, scale.sigma)
        out = sub.downscale.sde(
            model=model, scale=same, steps=steps, members=2, seed=0, progress=False, **kwargs
        )
        fields[name] = _degc(out).load()
        seconds[name] = (time.perf_counter() - t0) / (sub.sizes["time"] * 2)
    return fields, seconds, scale


def paired(
    label: str,
    coarse: xr.DataArray,
    truth: xr.DataArray,
    cm: Any,
    members: int,
    sde: tuple[Any, int, int] | None = None,
    reference: xr.DataArray | None = None,
    **kwargs: Any,
) -> dict:
    fields, seconds, scale = _methods(coarse, cm, members, sde, reference, **kwargs)
    rows = [
        {"method": name, **_scores(field, truth, cm), "seconds_per_field": seconds[name]}
        for name, field in fields.items()
    ]
    return {"label": label, "rows": rows, "scale": str(scale), "fields": fields}


def unpaired(coarse: xr.DataArray, truth: xr.DataArray, cm: Any, hist: xr.DataArray, members: int) -> dict:
    """Climatology, distribution and pooled correlation of a free-running climate model's output."""
    test = coarse.sel(time=TEST)
    fields = {"bilinear": _degc(test.downscale.prepare(model=cm, transform=False)).load()}
    qdm_fields, _, scale = _methods(test, cm, members, qdm=True, hist=hist)
    fields.update(qdm_fields)
    native = _degc(test).load()
    mask = cm.grid["mask"]
    rows = []
    for name, field in fields.items():
        first = field.isel(member=0) if "member" in field.dims else field
        rows.append(
            {
                "method": name,
                "mean_abs_error": float(metrics.mean_abs_error(first.where(mask), truth.where(mask))),
                "wasserstein": metrics.wasserstein(field.where(mask), truth.where(mask)),
                "pooled_corr": float(metrics.pooled_correlation(first, native, factor=None)),
                "mean": float(field.where(mask).mean()),
            }
        )
    rows.append({"method": "E-OBS (truth)", "mean": float(truth.where(mask).mean())})
    return {"rows": rows, "scale": str(scale), "fields": fields}


# ------------------------------------------------------------------------------------------ figures
def _save(fig: Any, name: str) -> str:
    FIGURES.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURES / name, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f"figures/evaluation-tas/{name}"


def day_figure(result: dict, coarse: xr.DataArray, truth: xr.DataArray, cm: Any) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = result["fields"]
    cmf = fields["CM 1 step"]
    day = cmf["time"].values[len(cmf["time"]) // 2]
    mask = cm.grid["mask"]
    panels = [
        ("E-OBS (truth)", truth.sel(time=day).where(mask)),
        ("coarse input", _degc(coarse.sel(time=day))),
        ("bilinear", fields["bilinear"].sel(time=day).where(mask)),
        ("CM member 1", cmf.sel(time=day).isel(member=0)),
        ("CM member 2", cmf.sel(time=day).isel(member=1)),
        ("CM ensemble spread", cmf.sel(time=day).std("member")),
    ]
    vals = np.concatenate([np.ravel(p.values) for _, p in panels[:5]])
    lo, hi = np.nanpercentile(vals, [1, 99])
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.2), constrained_layout=True)
    for ax, (title, field) in zip(axes.ravel(), panels, strict=True):
        spread = title.endswith("spread")
        im = field.plot(
            ax=ax,
            cmap="magma" if spread else "RdYlBu_r",
            vmin=0 if spread else lo,
            vmax=None if spread else hi,
            add_colorbar=False,
        )
        ax.set_title(title)
        ax.set_xlabel("")
        ax.set_ylabel("")
        fig.colorbar(im, ax=ax, shrink=0.8, label="K" if spread else "degC")
    fig.suptitle(f"{result['label']}: {str(day)[:10]}")
    return _save(fig, "paired-day.png")


def spectra_figure(results: list[dict], truth: xr.DataArray, cm: Any) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = xdownscale.psd(cm.transform.forward(convert_units(truth, cm.variable["units"])))["wavenumber"].values
    spacing = float(cm.target_psd.attrs["spacing_km"])
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4), constrained_layout=True)
    for ax, result in zip(np.atleast_1d(axes), results, strict=True):
        ref = _log_psd(truth.sel(time=result["fields"]["CM 1 step"]["time"]), cm)
        for name, field in result["fields"].items():
            ax.plot(spacing / k, np.exp(_log_psd(field, cm) - ref), label=name)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("wavelength (km)")
        ax.set_ylabel("PSD / PSD of E-OBS")
        ax.set_title(result["label"], fontsize=10)
        ax.legend(fontsize=8)
    return _save(fig, "spectra.png")


# ------------------------------------------------------------------------------------------ report
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not np.isfinite(value) else f"{value:.3g}"
    return str(value)


def _table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(["method", *keys]) + " |", "|" + "---|" * (len(keys) + 1)]
    for row in rows:
        lines.append("| " + " | ".join([row["method"], *(_fmt(row.get(k, "")) for k in keys)]) + " |")
    return "\n".join(lines)


def _verdict(rows: list[dict]) -> str:
    base, cm = rows[0], next(r for r in rows if r["method"] == "CM 1 step")
    change = cm["crps"] / base["crps"] - 1
    word = "better" if change < 0 else "worse"
    return (
        f"CM CRPS {cm['crps']:.3f} K against {base['crps']:.3f} K for {base['method']} "
        f"({abs(change):.0%} {word}); spread/skill {cm['spread_skill']:.2f}."
    )


def _training(cm: Any) -> str:
    val = (cm.card.get("training") or {}).get("validation") or {}
    if not val:
        return "The model's card has no validation record."
    return (
        f"Validation (perfect model on the validation winter, in the card): best EMA at step {val['step']}, "
        f"CRPS {val['crps']:.3f} K against {val['bilinear_mae']:.3f} K for bilinear, spread/skill "
        f"{val['spread_skill']:.2f}."
    )


def write(
    paired_results: list[dict], climate: dict, figs: list[str], cm: Any, args: argparse.Namespace
) -> None:
    keys = [
        "crps",
        "mae_mean",
        "rmse_mean",
        "bias",
        "spread_skill",
        "log_spectral_distance",
        "days",
        "seconds_per_field",
    ]
    lines = [
        "# Evaluation: temperature (tas)",
        "",
        "<!-- written by benchmarks/evaluate_tas.py; do not edit by hand -->",
        "",
        f"Model `{cm.name}` (sha256 `{cm.sha256[:12]}`), E-OBS v14 `tg` 0.5 deg truth, test winters "
        f"1997/98-2001/02 (never used for training or tuning); {args.members} members; generated "
        f"{time.strftime('%Y-%m-%d')} by `python benchmarks/evaluate_tas.py"
        + (" --quick" if args.quick else "")
        + "`. Scores in K on land cells; CRPS of a single field is its MAE.",
        "",
        _training(cm),
        "",
        "## Paired tests: does the model add skill?",
        "",
        "The input shares its days with the truth, so the output is scored day by day. Bilinear "
        "interpolation of the same input is the bar to beat. The SDE bridge (500 network calls per field) "
        "runs on fewer days (evenly spread, 2 members): compare its row with the others only roughly. "
        "Seconds per field: whole pipeline, one CPU thread, shared machine.",
        "",
    ]
    for result in paired_results:
        lines += [
            f"### {result['label']}",
            "",
            f'Scale (`"auto"`, resolved on the training winters): {result["scale"]}. '
            f"{_verdict(result['rows'])}",
            "",
            _table(result["rows"], keys),
            "",
        ]
    lines += [
        f"![A test day]({figs[0]})",
        "",
        f"![Spectra relative to E-OBS]({figs[1]})",
        "",
        "## Climate model (unpaired): CNRM-CM5",
        "",
        "CNRM-CM5 shares dates, not weather, with E-OBS: only climatology (mean abs error of the "
        "test-period mean per cell), distribution (Wasserstein distance of all land values) and the pooled "
        "correlation with the climate model's own field are meaningful. QDM (additive) is fitted on the "
        f"training winters. Scale: {climate['scale']}.",
        "",
        _table(climate["rows"], ["mean_abs_error", "wasserstein", "pooled_corr", "mean"]),
        "",
        "Large-scale biases of the climate model are QDM's to correct; the CM only replaces patterns "
        "below the chosen scale, so its climatology follows QDM's.",
        "",
    ]
    (DOCS / "evaluation-tas.md").write_text("\n".join(lines))
    summary = {
        "paired": [{k: v for k, v in r.items() if k != "fields"} for r in paired_results],
        "climate": {k: v for k, v in climate.items() if k != "fields"},
    }
    (FIGURES / "summary.json").write_text(json.dumps(summary, indent=1, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few days and members (smoke test)")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--days", type=int, default=451, help="test days of the paired tests")
    parser.add_argument("--model", default=CM_NAME, help="model name or path")
    parser.add_argument("--sde-model", default=SDE_NAME, help="SDE-bridge baseline: name or path")
    parser.add_argument("--sde-days", type=int, default=20, help="days of the SDE bridge (it is slow)")
    parser.add_argument("--sde-steps", type=int, default=500)
    args = parser.parse_args()
    if args.quick:
        args.members, args.days, args.sde_days, args.sde_steps = 2, 10, 5, 20
        # a smoke test: the report and its figures go to a scratch folder, never over the published ones
        global DOCS, FIGURES
        DOCS = Path(tempfile.mkdtemp(prefix="xdownscale-quick-"))
        FIGURES = DOCS / "figures" / "evaluation-tas"
        print(f"--quick: writing the report under {DOCS}")
    if not DATA.exists():
        raise SystemExit(f"{DATA} not found: the shared data must sit beside the repository.")
    from xdownscale.models import resolve_model

    cm = resolve_model(args.model)
    sde = (resolve_model(args.sde_model), args.sde_days, args.sde_steps)
    eobs = xr.open_dataset(DATA / "eobs_0.5deg_tg_djf1983-2002.nc")["tg"]
    truth_all = _degc(eobs.sel(time=TEST)).load()
    truth = truth_all.isel(time=_days(truth_all.sizes["time"], args.days))
    training = _degc(eobs.sel(time=HIST)).load()  # coarse-grained: the perfect-model tests' reference
    results = [
        paired(
            f"E-OBS coarse-grained {f}x ({f * 0.5:g} deg)",
            _coarse_grained(truth, f),
            truth,
            cm,
            m,
            s,
            reference=_coarse_grained(training, f),
        )
        for f, m, s in ((3, args.members, None), (4, args.members, sde))
    ]
    ncep = xr.open_dataset(DATA / "ncep_r1_tas_djf1983-2002.nc")["tas"]
    results.append(
        paired(
            "NCEP R1 + QDM (same days)",
            ncep.sel(time=truth["time"]),
            truth,
            cm,
            args.members,
            sde,
            qdm=True,
            hist=ncep.sel(time=HIST),
        )
    )
    cnrm = xr.open_dataset(DATA / "cmip5_cnrm-cm5_tas_historical_djf1983-2002.nc")["tas"]
    climate = unpaired(cnrm, truth_all, cm, cnrm.sel(time=HIST), args.members)
    figs = [
        day_figure(results[1], _coarse_grained(truth, 4), truth, cm),
        spectra_figure([results[1], results[2]], truth, cm),
    ]
    write(results, climate, figs, cm, args)
    for result in results:
        print(result["label"], _verdict(result["rows"]))
    print(_table(climate["rows"], ["mean_abs_error", "wasserstein", "pooled_corr", "mean"]))


if __name__ == "__main__":
    main()
