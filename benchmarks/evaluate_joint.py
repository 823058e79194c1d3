"""Skill of the joint precipitation + temperature model on real data: writes ``docs/evaluation-joint.md``.

    python benchmarks/evaluate_joint.py            # the report (a few minutes on 2 cores)
    python benchmarks/evaluate_joint.py --quick    # few days and members (smoke test)

Truth: E-OBS v14 daily precipitation (``rr``) and mean temperature (``tg``), 0.5 deg, sea masked, over
Iberia, test winters 1997/98-2001/02 (the joint model trained on 1982/83-1995/96 and validated on
1996/97). The joint model downscales both variables of a Dataset in one call (each at its own ``"auto"``
scale); it is compared with bilinear interpolation and with the two one-variable models run separately
(``cm-eobs-iberia-0.5deg-tas``, and ``cm-eobs-iberia-0.25deg-pr`` averaged conservatively onto the
0.5 deg grid), which regenerate the small scales of each variable with independent noise.

* Paired (perfect model, and NCEP R1 with QDM): CRPS per variable against the truth day by day, and the
  *coupling* of the regenerated small scales: the correlation, over land cells and days, between the
  small-scale parts of precipitation and temperature (each field minus the bilinear interpolation of its
  coarse input; for the truth, the truth minus the same bilinear field). Independent models give about 0.
* Unpaired (CNRM-CM5 with QDM on the training winters): climatology and distribution per variable, and
  the per-cell correlation between daily precipitation and temperature against E-OBS's.

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
from evaluate_iberia import CONSERVING, DATA, DOCS, coarse_grained, scale_source, write_card_metrics
from evaluate_tas import _days, _table

from xdownscale import metrics
from xdownscale.errors import XDownscaleWarning
from xdownscale.preserve import preserve_large_scales
from xdownscale.xr.domain import allow_partial_coverage
from xdownscale.xr.units import convert_units

FIGURES = DOCS / "figures" / "evaluation-joint"
MAP_FIGURE = "figures/evaluation-joint/correlation-maps.png"
TEST = slice("1997-12-01", "2002-02-28")
HIST = slice("1982-12-01", "1997-02-28")
JOINT = "cm-eobs-iberia-0.5deg-pr-tas"
SEPARATE = {"tas": "cm-eobs-iberia-0.5deg-tas", "pr": "cm-eobs-iberia-0.25deg-pr"}
UNITS = {"pr": "mm/day", "tas": "degC"}


def _physical(ds: xr.Dataset) -> xr.Dataset:
    """mm/day and degC whatever the source units."""
    return xr.Dataset({v: convert_units(ds[v], UNITS[v]) for v in ("pr", "tas")})


def _truth(period: slice = TEST) -> xr.Dataset:
    rr = xr.open_dataset(DATA / "eobs_0.5deg_rr_djf1983-2002.nc")["rr"].assign_attrs(units="mm/day")
    tg = xr.open_dataset(DATA / "eobs_0.5deg_tg_djf1983-2002.nc")["tg"]
    return _physical(xr.Dataset({"pr": rr, "tas": tg}).sel(time=period)).load()


def _coarse(truth: xr.Dataset) -> xr.Dataset:
    """A perfect-model input: ``truth`` averaged over 3 x 3 blocks (1.5 deg, sea ignored)."""
    return xr.Dataset({v: coarse_grained(truth[v], 3).assign_attrs(units=UNITS[v]) for v in ("pr", "tas")})


def _bilinear(coarse: xr.Dataset, joint: Any, **kwargs: Any) -> xr.Dataset:
    return _physical(
        xr.Dataset(
            {
                v: coarse[v].downscale.prepare(
                    model=joint.for_variable(v), transform=False, **kwargs.get(v, {})
                )
                for v in ("pr", "tas")
            }
        )
    ).load()


def _conserving(bilinear: xr.Dataset, coarse: xr.Dataset, joint: Any) -> xr.Dataset:
    """``bilinear`` with precipitation's means over the coarse cells set to ``coarse``'s values (the
    CM's ``preserve="mean"`` without the network); temperature's low-pass is the bilinear field's own."""
    pr = preserve_large_scales(
        bilinear["pr"],
        bilinear["pr"],
        rule="mean",
        coarse=coarse["pr"],
        wet_min=joint.for_variable("pr").transform.wet_min,
    )
    return bilinear.assign(pr=pr.load())


def _methods(
    coarse: xr.Dataset,
    joint: Any,
    members: int,
    qdm: dict[str, Any] | None = None,
    reference: xr.Dataset | None = None,
) -> tuple[dict[str, xr.Dataset], dict[str, float], dict[str, str]]:
    """Bilinear (+ QDM), the joint CM and the two one-variable CMs, in mm/day and degC, with timings.

    ``scale="auto"`` is resolved once on the training winters, as a user's plan resolves it on the
    reference period: with QDM on each variable's ``hist`` (inside the calls), otherwise on
    ``reference`` (the training winters coarse-grained like ``coarse``)."""
    from xdownscale.models import resolve_model

    source = scale_source(coarse, reference, bool(qdm))
    qdm = qdm or {}

    def auto(v: str, model: Any) -> Any:  # with QDM each call resolves on its own hist=
        return "auto" if qdm else source[v].downscale.select_scale(model=model)

    label = "bilinear" + (" + QDM" if qdm else "")
    fields, seconds = {label: _bilinear(coarse, joint, **{v: qdm.get(v, {}) for v in ("pr", "tas")})}, {}
    n = coarse.sizes["time"] * members
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", XDownscaleWarning)
        t0 = time.perf_counter()
        hist = {v: qdm[v]["hist"] for v in qdm}
        scale = {v: auto(v, joint.for_variable(v)) for v in ("pr", "tas")}
        out = coarse.downscale.cm(
            model=joint,
            scale=scale,
            members=members,
            seed=0,
            progress=False,
            qdm=bool(qdm),
            hist=hist or None,
        )
        seconds["joint CM"] = (time.perf_counter() - t0) / n
        fields["joint CM"] = _physical(out).load()
        scales = {v: out[v].attrs.get("downscale_scale", "") for v in ("pr", "tas")}
        separate = {}
        t0 = time.perf_counter()
        for v, name in SEPARATE.items():
            model = resolve_model(name)
            # the 0.25 deg model's domain reaches half a cell beyond the 0.5 deg data: those cells are NaN
            with allow_partial_coverage():
                one = coarse[v].downscale.cm(
                    model=model,
                    scale=auto(v, model),
                    members=members,
                    seed=1,
                    progress=False,
                    **qdm.get(v, {}),
                )
            if v == "pr":  # the 0.25 deg model: its output averaged onto the joint model's 0.5 deg grid
                one = one.downscale.regrid(joint.grid, method="conservative")
            separate[v] = one
        seconds["separate CMs"] = (time.perf_counter() - t0) / n
    fields["separate CMs"] = _physical(xr.Dataset(separate)).load()
    return fields, seconds, scales


def _coupling(field: xr.Dataset, base: xr.Dataset, mask: xr.DataArray) -> float:
    """Correlation over land cells and days between the small-scale parts (field - base) of pr and tas."""
    parts = []
    for v in ("pr", "tas"):
        f = field[v].isel(member=0) if "member" in field[v].dims else field[v]
        parts.append((f - base[v]).where(mask).values.ravel())
    ok = np.isfinite(parts[0]) & np.isfinite(parts[1])
    return float(np.corrcoef(parts[0][ok], parts[1][ok])[0, 1])


def paired(
    label: str,
    coarse: xr.Dataset,
    truth: xr.Dataset,
    joint: Any,
    members: int,
    reference: xr.Dataset | None = None,
    **qdm: Any,
) -> dict:
    fields, seconds, scales = _methods(coarse, joint, members, qdm or None, reference)
    mask = joint.grid["mask"]
    base_name = next(iter(fields))
    base = fields[base_name]
    if not qdm:  # exact coarse values: the deterministic bar of the default preserve, beside bilinear
        fields = {base_name: base, CONSERVING: _conserving(base, coarse, joint), **fields}
    truth = truth.sel(time=coarse["time"])
    rows = []
    for name, field in fields.items():
        row: dict[str, Any] = {"method": name}
        for v in ("pr", "tas"):
            ens = field[v] if "member" in field[v].dims else field[v].expand_dims(member=[0])
            ens = ens.where(mask)
            row[f"crps_{v}"] = float(metrics.crps_ensemble(ens, truth[v].where(mask), mean=...))
            row[f"spread_skill_{v}"] = (
                float(metrics.spread_skill(ens, truth[v].where(mask))) if ens.sizes["member"] > 1 else np.nan
            )
        bare = name in (base_name, CONSERVING)  # no regenerated details (its tas is the bilinear field)
        row["coupling"] = float("nan") if bare else _coupling(field, base, mask)
        row["seconds_per_field"] = seconds.get(name, float("nan"))
        rows.append(row)
    rows.append({"method": "E-OBS (truth)", "coupling": _coupling(truth, base, mask)})
    return {"label": label, "rows": rows, "scales": scales}


def _cell_correlation(field: xr.Dataset, mask: xr.DataArray) -> xr.DataArray:
    pr = field["pr"].isel(member=0) if "member" in field["pr"].dims else field["pr"]
    tas = field["tas"].isel(member=0) if "member" in field["tas"].dims else field["tas"]
    return xr.corr(pr, tas, dim="time").where(mask)


def unpaired(cnrm: xr.Dataset, truth: xr.Dataset, joint: Any, members: int) -> dict:
    test = cnrm.sel(time=TEST)
    hist = {v: {"qdm": True, "hist": cnrm[v].sel(time=HIST)} for v in ("pr", "tas")}
    fields, _, scales = _methods(test, joint, members, hist)
    mask = joint.grid["mask"]
    reference = _cell_correlation(truth, mask)
    rows, maps = [], {"E-OBS (truth)": reference}
    for name, field in fields.items():
        row: dict[str, Any] = {"method": name}
        for v in ("pr", "tas"):
            first = field[v].isel(member=0) if "member" in field[v].dims else field[v]
            row[f"mean_abs_error_{v}"] = float(
                metrics.mean_abs_error(first.where(mask), truth[v].where(mask))
            )
            row[f"wasserstein_{v}"] = metrics.wasserstein(field[v].where(mask), truth[v].where(mask))
        maps[name] = _cell_correlation(field, mask)
        row["corr_pr_tas"] = float(maps[name].mean())
        row["corr_map_error"] = float(np.abs(maps[name] - reference).mean())
        rows.append(row)
    rows.append({"method": "E-OBS (truth)", "corr_pr_tas": float(reference.mean())})
    return {"rows": rows, "scales": scales, "maps": maps}


def map_figure(maps: dict[str, xr.DataArray]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(maps), figsize=(3.6 * len(maps), 3.2), constrained_layout=True)
    for ax, (name, field) in zip(axes, maps.items(), strict=True):
        im = field.plot(ax=ax, cmap="RdBu_r", vmin=-0.6, vmax=0.6, add_colorbar=False)
        ax.set_title(f"{name}\nmean {float(field.mean()):.2f}", fontsize=9)
        ax.set_xlabel("")
        ax.set_ylabel("")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="corr(pr, tas) over the test days")
    FIGURES.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURES / "correlation-maps.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return MAP_FIGURE


def write(results: list[dict], climate: dict, figure: str, joint: Any, args: argparse.Namespace) -> None:
    import datetime

    training = joint.card["training"]
    paired_keys = [
        "crps_pr",
        "crps_tas",
        "spread_skill_pr",
        "spread_skill_tas",
        "coupling",
        "seconds_per_field",
    ]
    lines = [
        "# Evaluation: precipitation and temperature together",
        "",
        "<!-- written by benchmarks/evaluate_joint.py; do not edit by hand -->",
        "",
        f"Model `{joint.name}` (sha256 `{joint.sha256[:12]}`; {training['steps']} steps, "
        f"{training.get('hours', '?')} h on {training.get('hardware', training.get('device'))}), E-OBS v14 "
        "`rr` and `tg` 0.5 deg truth, test winters 1997/98-2001/02 (never used for training or tuning); "
        f"{args.members} members; generated {datetime.date.today()} by "
        "`python benchmarks/evaluate_joint.py`. "
        "Precipitation in mm/day, temperature in degC, land cells only. *Separate CMs* are the one-variable "
        "models `cm-eobs-iberia-0.5deg-tas` and `cm-eobs-iberia-0.25deg-pr` (its output averaged "
        "conservatively onto 0.5 deg), each with its own noise.",
        "",
        _validation(joint),
        "",
        "*Coupling* is the correlation, over land cells and days, between the small-scale parts of "
        "precipitation and temperature: each field minus the bilinear interpolation of its coarse input "
        "(for E-OBS, the truth minus the same bilinear field). It asks whether the regenerated details of "
        "the two variables belong together as in the observations.",
        "",
        "## Paired tests",
        "",
    ]
    for result in results:
        lines += [
            f"### {result['label']}",
            "",
            f'Scales chosen by `"auto"` on the training winters (the reference period): {result["scales"]}.',
            "",
        ]
        lines += [_table(result["rows"], paired_keys), ""]
    lines += [
        "## Climate model (unpaired): CNRM-CM5",
        "",
        "CNRM-CM5 `pr` and `tas` share dates, not weather, with E-OBS. QDM (multiplicative for "
        "precipitation, additive for temperature) is fitted on the training winters. *corr_pr_tas* is the "
        "per-cell correlation between daily precipitation and temperature over the test days, averaged "
        "over land; *corr_map_error* the mean absolute difference of that map from E-OBS's.",
        "",
        f'Scales chosen by `"auto"` on the training winters (the reference period): {climate["scales"]}.',
        "",
        _table(
            climate["rows"],
            [
                "mean_abs_error_pr",
                "mean_abs_error_tas",
                "wasserstein_pr",
                "wasserstein_tas",
                "corr_pr_tas",
                "corr_map_error",
            ],
        ),
        "",
        f"![Per-cell correlation of daily precipitation and temperature]({figure})",
        "",
        _reading(results, climate),
        "",
    ]
    (DOCS / "evaluation-joint.md").write_text("\n".join(lines))
    FIGURES.mkdir(parents=True, exist_ok=True)
    summary = {
        "paired": results,
        "climate": {k: v for k, v in climate.items() if k != "maps"},
        "members": args.members,
    }
    (FIGURES / "summary.json").write_text(json.dumps(summary, indent=1, default=str))


def _validation(joint: Any) -> str:
    """The training's stopping rule and what it chose, from the card."""
    v = joint.card["training"].get("validation")
    if not v:
        return "The card holds no perfect-model validation (the last EMA weights are shipped)."
    parts = ", ".join(
        f"{name} CRPS {s['crps']:.3f} against {s['bilinear_mae']:.3f} for bilinear"
        for name, s in v.get("per_variable", {}).items()
    )
    return (
        f"Validation (perfect model on the validation winter 1996/97, in the card): the EMA weights of step "
        f"{v['step']} have the lowest mean relative CRPS ({v['crps']:.3f}; 1 = bilinear) and are shipped; "
        f"{parts}."
    )


def _reading(results: list[dict], climate: dict) -> str:
    """What the numbers say, computed from them."""
    out = []
    for result in results:
        rows = {r["method"]: r for r in result["rows"]}
        j, s, t, b = rows["joint CM"], rows["separate CMs"], rows["E-OBS (truth)"], result["rows"][0]
        c = f"; {CONSERVING}: {rows[CONSERVING]['crps_pr']:.3f} mm/day" if CONSERVING in rows else ""
        out.append(
            f"* {result['label']}: joint CRPS {j['crps_pr']:.3f} mm/day and {j['crps_tas']:.3f} degC "
            f"({b['method']}: {b['crps_pr']:.3f} and {b['crps_tas']:.3f}{c}; separate CMs: "
            f"{s['crps_pr']:.3f} and {s['crps_tas']:.3f}); coupling {j['coupling']:.2f} for the joint model, "
            f"{s['coupling']:.2f} for separate models, {t['coupling']:.2f} in E-OBS."
        )
    rows = {r["method"]: r for r in climate["rows"]}
    j, s, q = rows["joint CM"], rows["separate CMs"], climate["rows"][0]
    out.append(
        f"* CNRM-CM5: the per-cell pr-tas correlation map is {j['corr_map_error']:.3f} from E-OBS's for "
        f"the joint model, {s['corr_map_error']:.3f} for separate models and {q['corr_map_error']:.3f} for "
        f"QDM only; climatology errors {j['mean_abs_error_pr']:.3f} mm/day and {j['mean_abs_error_tas']:.3f} "
        f"degC (QDM only: {q['mean_abs_error_pr']:.3f} and {q['mean_abs_error_tas']:.3f})."
    )
    truth = rows["E-OBS (truth)"]["corr_pr_tas"]
    out.append(
        f"* On CNRM-CM5 every method's pr-tas correlation (about {q['corr_pr_tas']:.2f} on average) is far "
        f"from E-OBS's ({truth:.2f}): it comes with the climate model's large scales, which downscaling "
        "keeps by design (the per-cell QDM of each variable does not touch the relation between them). "
        "The joint model changes it little, because it regenerates only the scales below a few hundred km."
    )
    paired_rows = {r["method"]: r for r in results[0]["rows"]}
    sk = paired_rows["joint CM"]

    def reading(ratio: float) -> str:
        return "under-dispersed" if ratio < 0.8 else "over-dispersed" if ratio > 1.2 else "about calibrated"

    out.append(
        f"* Spread/skill of the joint model in the perfect-model test (1 is calibrated): "
        f"{sk['spread_skill_pr']:.2f} for precipitation ({reading(sk['spread_skill_pr'])}) and "
        f"{sk['spread_skill_tas']:.2f} for temperature ({reading(sk['spread_skill_tas'])})."
    )
    return "What the numbers say:\n\n" + "\n".join(out)


def rows_of(results: list[dict]) -> dict[str, dict]:
    """Each paired section's scores by method (finite values, rounded), for the card."""
    return {
        f"paired: {r['label']}": {
            row["method"]: {k: round(v, 4) for k, v in row.items() if isinstance(v, float) and np.isfinite(v)}
            for row in r["rows"]
        }
        for r in results
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few days and members (smoke test)")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--days", type=int, default=451, help="test days of the paired tests")
    parser.add_argument("--model", default=JOINT, help="joint model: name or path")
    parser.add_argument(
        "--write-card-metrics",
        action="store_true",
        help="store the scores in the joint model's card (metrics; does not change the weights)",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="only rewrite the page from the stored scores (figures/evaluation-joint/summary.json)",
    )
    args = parser.parse_args()
    if args.quick:
        args.members, args.days = 2, 10
        # a smoke test: the report and its figures go to a scratch folder, never over the published ones
        global DOCS, FIGURES
        DOCS = Path(tempfile.mkdtemp(prefix="xdownscale-quick-"))
        FIGURES = DOCS / "figures" / "evaluation-joint"
        print(f"--quick: writing the report under {DOCS}")
    if args.report:
        from xdownscale.models import resolve_model

        stored = json.loads((FIGURES / "summary.json").read_text())
        args.members = stored.get("members", args.members)
        joint = resolve_model(args.model)
        write(stored["paired"], stored["climate"], MAP_FIGURE, joint, args)
        if args.write_card_metrics:
            store_card_metrics(joint, stored["paired"])
        return
    if not DATA.exists():
        raise SystemExit(f"{DATA} not found: the shared data must sit beside the repository.")
    from xdownscale.models import resolve_model

    joint = resolve_model(args.model)
    truth_all = _truth()
    truth = truth_all.isel(time=_days(truth_all.sizes["time"], args.days))
    reference = _coarse(_truth(HIST))  # the training winters: where the perfect model resolves "auto"
    results = [
        paired("E-OBS coarse-grained 3x (1.5 deg)", _coarse(truth), truth, joint, args.members, reference)
    ]
    ncep = xr.Dataset(
        {
            v: xr.open_dataset(DATA / f"ncep_r1_{v}_djf1983-2002.nc")[v].clip(min=0.0 if v == "pr" else None)
            for v in ("pr", "tas")
        }
    )
    qdm = {v: {"qdm": True, "hist": ncep[v].sel(time=HIST)} for v in ("pr", "tas")}
    results.append(
        paired("NCEP R1 + QDM (same days)", ncep.sel(time=truth["time"]), truth, joint, args.members, **qdm)
    )
    cnrm = xr.Dataset(
        {
            v: xr.open_dataset(DATA / f"cmip5_cnrm-cm5_{v}_historical_djf1983-2002.nc")[v]
            for v in ("pr", "tas")
        }
    )
    climate = unpaired(cnrm, truth_all, joint, args.members)
    figure = map_figure(climate["maps"])
    write(results, climate, figure, joint, args)
    if args.write_card_metrics:
        store_card_metrics(joint, results)
    print((DOCS / "evaluation-joint.md").read_text())


def store_card_metrics(joint: Any, results: list[dict]) -> None:
    """The paired scores into the joint model's card (the JSON beside its weights)."""
    write_card_metrics(
        Path(joint.path),
        {
            "evaluation": "docs/evaluation-joint.md (python benchmarks/evaluate_joint.py)",
            "test_period": "DJF 1997/98-2001/02",
            "truth": "E-OBS v14 rr and tg, 0.5 deg",
            **rows_of(results),
        },
    )


if __name__ == "__main__":
    main()
