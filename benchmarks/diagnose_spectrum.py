"""Where does the precipitation CM's spectrum depart from E-OBS's? A perfect-model diagnosis.

E-OBS days of the validation winter 1996/97 (inside the training period, never the test winters) are
averaged over 4 x 4 blocks (1 deg) and downscaled back at the auto scale without ``preserve``; the
large-scale correction is then applied to the same members in variants (the default: the solved smooth
field, the exact pass, the drizzle rule and, for a model whose training data are coherent, the rain
receding from the dry coarse cells' edges and the removal of single wet cells and dry holes; without the
receding edges; without either; without the drizzle rule; the exact pass alone, piecewise constant), and
the members' power spectrum is compared with the truth's per wavelength, in the report's space log(x + 0.1
mm/day) and in mm/day, with the report's masked estimator. The largest factor and the log-spectral
distance over all wavelengths close each column. Then the same ratio by how wet the day is (the truth's
share of land cells with at least 1 mm): the members' excess power at small scales on dry days, their
deficit on wet ones. The numbers back the spectrum entries of docs/limitations.md.

    python benchmarks/diagnose_spectrum.py            # under a minute on 2 cores
    python benchmarks/diagnose_spectrum.py --test-winters   # all 271 test days: explains the report
    python benchmarks/diagnose_spectrum.py --model runs/NAME/NAME.safetensors   # a candidate model
    python benchmarks/diagnose_spectrum.py --all-winters   # every variant on all seven winters (40 s)
    python benchmarks/diagnose_spectrum.py --all-winters --test-winters   # each test winter alone
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import numpy as np
import xarray as xr
from diagnose_dispersion import period_name, validation_case
from evaluate_iberia import DATA, LOG_OFFSET, _mm, _paired_inputs, spread_skill

import xdownscale
from xdownscale import metrics
from xdownscale.core import preserve
from xdownscale.core.preserve import preserve_means
from xdownscale.core.spectra import log_spectral_distance
from xdownscale.core.transforms import WET_TOLERANCE
from xdownscale.errors import XDownscaleWarning
from xdownscale.preparation import check_input
from xdownscale.xr.domain import cut_to_domain
from xdownscale.xr.preserve import coarse_cell_operators


def variants(
    raw: xr.DataArray, coarse: xr.DataArray, bilinear: xr.DataArray, cm: Any
) -> dict[str, xr.DataArray]:
    """The members ``raw`` (time, member, lat, lon; mm/day) with the cell-mean correction applied in
    each variant: the correction's targets are the coarse values (a perfect-model input needs no bias
    correction)."""
    checked, grid, _ = check_input(coarse, cm, None)
    coarse = cut_to_domain(checked, grid, cm.grid, partial=True)  # as downscaling does: edges padded
    cell, smooth = coarse_cell_operators(raw, coarse)
    wet_min = getattr(cm.transform, "wet_min", None)
    y = raw.transpose("time", "member", "lat", "lon").values
    t, m, h, w = y.shape
    flat = y.reshape(t, m, h * w)
    values = coarse.transpose("time", ...).values.reshape(t, 1, -1)
    # the reference on the fine grid only seeds cells the output left dry
    p = bilinear.transpose("time", "lat", "lon").values.reshape(t, 1, h * w)
    dry = raw.where(raw >= wet_min * (1 - WET_TOLERANCE), 0.0) if wet_min else raw
    out = {"network alone (preserve=False)": dry.where(np.isfinite(raw))}
    shape = (h, w) if cm.transform.coherent else None  # specks and holes go (the model's data allow it)
    options: dict[str, dict[str, Any]] = {
        "default": dict(smooth=smooth, wet_min=wet_min, grid_shape=shape),
        "dry edges kept": dict(smooth=smooth, wet_min=wet_min, grid_shape=shape),
        "edges and specks kept": dict(smooth=smooth, wet_min=wet_min),
        "no drizzle rule": dict(smooth=smooth, wet_min=None),
        "exact pass only": dict(smooth=None, wet_min=wet_min, grid_shape=shape),
    }
    if shape is None:
        del options["dry edges kept"], options["edges and specks kept"]
    edge = preserve.DRY_EDGE
    for name, kw in options.items():
        # "dry edges kept": the grid's rules with the edge rule a no-op (each cell keeps all its rain)
        preserve.DRY_EDGE = 1.0 if name == "dry edges kept" else edge
        try:
            fixed = preserve_means(flat, p, cell, coarse=values, **kw)
        finally:
            preserve.DRY_EDGE = edge
        out[name] = raw.copy(data=fixed.reshape(y.shape)).transpose(*raw.dims)
    return out


def spectrum(field: xr.DataArray, mask: xr.DataArray, log: bool) -> xr.DataArray:
    """Mean power spectrum over the land cells, in log(x + 0.1 mm/day) or mm/day."""
    x = field.where(mask)
    x = np.log(x + LOG_OFFSET) if log else x
    dims = [d for d in x.dims if d in ("time", "member")]
    return xdownscale.psd(x).mean(dims)


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--all-winters",
        action="store_true",
        help="score every variant on each of the seven training and validation winters instead (DJF "
        "1990/91-1996/97): a choice made on one winter must hold on the others; with --test-winters on "
        "each test winter (to explain the report)",
    )


#: the winters the shipped models were trained (1990/91-1995/96) and validated (1996/97) on
WINTERS = tuple(range(1990, 1997))
#: the test winters 1997/98-1999/2000 (``--all-winters --test-winters``: to explain the report one winter
#: at a time, never to choose)
TEST_WINTERS = tuple(range(1997, 2000))


def _members(
    coarse: xr.DataArray, cm: Any, members: int, scale: Any = "auto"
) -> tuple[xr.DataArray, xr.DataArray]:
    """(the members before the drizzle rule, ``preserve=False``; the bilinear field), mm/day."""
    kwargs = dict(model=cm, members=members, seed=0, progress=False, scale=scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", XDownscaleWarning)
        wet_min, cm.transform.wet_min = cm.transform.wet_min, None
        try:
            raw = _mm(coarse.downscale.cm(preserve=False, **kwargs)).load()
        finally:
            cm.transform.wet_min = wet_min
    return raw, _mm(coarse.downscale.prepare(model=cm, transform=False)).load()


def all_winters(cm: Any, members: int, days: int, winters: tuple[int, ...] = WINTERS) -> None:
    """Log-spectral distance, largest factor (log space), CRPS and spread/skill (mm/day) of every variant
    on each of ``winters`` (the year of each December), and on how many winters each variant beats the
    default (lower, or for spread/skill nearer 1)."""
    data = _mm(xr.open_dataset(DATA / "eobs_0.25deg_tp_djf1991-2000.nc")["tp"])
    mask = cm.grid["mask"]
    scores: dict[str, list[tuple[float, float, float, float]]] = {}
    picks, inputs = [], []  # scale="auto" on each winter alone follows the winter's overall variance
    for year in winters:
        truth, coarse = _paired_inputs(
            data.sel(time=slice(f"{year}-12-01", f"{year + 1}-02")).load(), 4, days
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", XDownscaleWarning)
            picks.append(coarse.downscale.select_scale(model=cm))
        inputs.append(coarse)
        raw, bilinear = _members(coarse, cm, members, picks[-1])  # resolved once, above
        ref = spectrum(truth, mask, True)
        truth = truth.where(mask)
        for name, field in variants(raw, coarse, bilinear, cm).items():
            ratio = (spectrum(field, mask, True) / ref).values
            ok = np.isfinite(ratio)
            lsd, factor, _ = log_spectral_distance(ratio[ok], np.ones(int(ok.sum())))
            ens = field.where(mask)
            crps = float(metrics.crps_ensemble(ens, truth, member_dim="member").mean())
            scores.setdefault(name, []).append((lsd, factor, crps, spread_skill(ens, truth)[0]))
    first, last = winters[0], winters[-1] + 1
    span = f"DJF {first}/{(first + 1) % 100:02d}-{last - 1}/{last % 100:02d}"
    print(f"{cm.name}, {span}, 1 deg perfect model, {members} members, {days or 'all'} days a winter")
    print("\nscale='auto' on each winter alone (the members below use it)")
    print("| winter | wavelength, km | sigma |\n|---|---|---|")
    for year, pick in zip(winters, picks, strict=True):
        print(f"| {year}/{(year + 1) % 100:02d} | {pick.wavelength_km:.0f} | {pick.sigma:.3f} |")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", XDownscaleWarning)
        pooled = xr.concat(inputs, "time").downscale.select_scale(model=cm)
    print(f"| all together | {pooled.wavelength_km:.0f} | {pooled.sigma:.3f} |")
    labels = ("log-spectral distance (log space)", "largest factor", "CRPS, mm/day", "spread/skill, mm/day")
    for k, label in enumerate(labels):
        print(f"\n{label}")
        print("| winter | " + " | ".join(scores) + " |")
        print("|---" * (len(scores) + 1) + "|")
        for i, year in enumerate(winters):
            print(
                f"| {year}/{(year + 1) % 100:02d} | "
                + " | ".join(f"{v[i][k]:.3f}" for v in scores.values())
                + " |"
            )
        # better: lower, or for spread/skill nearer 1 (calibrated)
        better = (lambda v, d: abs(v - 1) < abs(d - 1)) if k == 3 else (lambda v, d: v < d)
        default = [v[k] for v in scores["default"]]
        wins = [sum(better(v[i][k], default[i]) for i in range(len(winters))) for v in scores.values()]
        print("| better than the default's | " + " | ".join(str(w) for w in wins) + " |")


def main() -> None:
    args, cm, truth, coarse, scale = validation_case(__doc__, 4, _options)
    if args.all_winters:
        all_winters(cm, args.members, args.days, TEST_WINTERS if args.test_winters else WINTERS)
        return
    winter = period_name(args)
    mask = cm.grid["mask"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", XDownscaleWarning)
        shipped = coarse.downscale.cm(model=cm, scale=scale, members=args.members, seed=0, progress=False)
    raw, bilinear = _members(coarse, cm, args.members, scale)  # the members before the drizzle rule
    fields = variants(raw, coarse, bilinear, cm)
    default = fields["default"]
    gap = float(np.nanmax(np.abs(default.values - _mm(shipped).transpose(*raw.dims).values)))
    fields = {"bilinear": bilinear.expand_dims(member=[0]), **fields}
    print(
        f"{args.model}, {winter}, 1 deg perfect model, {args.members} members, "
        f"{truth.sizes['time']} days, scale {scale}; default variant vs preserve=True: max |difference| "
        f"{gap:.2g} mm/day"
    )
    for log in (True, False):
        space = f"log(x + {LOG_OFFSET} mm/day)" if log else "mm/day"
        ref = spectrum(truth, mask, log)
        ratios = {name: (spectrum(f, mask, log) / ref).values for name, f in fields.items()}
        wavelength = ref["wavelength_km"].values
        ok = np.isfinite(ref.values) & np.all([np.isfinite(r) for r in ratios.values()], axis=0)
        print(f"\nPower / truth's power per wavelength, {space}")
        print("| wavelength, km | " + " | ".join(ratios) + " |")
        print("|---" * (len(ratios) + 1) + "|")
        for i in np.flatnonzero(ok):
            print(f"| {wavelength[i]:.0f} | " + " | ".join(f"{r[i]:.2f}" for r in ratios.values()) + " |")
        scores = [log_spectral_distance(r[ok], np.ones(int(ok.sum()))) for r in ratios.values()]
        print("| largest factor | " + " | ".join(f"{s[1]:.2f}" for s in scores) + " |")
        print("| log-spectral distance | " + " | ".join(f"{s[0]:.3f}" for s in scores) + " |")
    shown = ("network alone (preserve=False)", "no drizzle rule", "edges and specks kept", "dry edges kept")
    for name in (*shown, "default"):
        if name in fields:
            by_regime(fields[name], truth, mask, name)


#: the truth's share of land cells with at least 1 mm/day: dry, scattered, widespread rain days
REGIMES = ((0.0, 0.05), (0.05, 0.15), (0.15, 0.35), (0.35, 1.0))


def by_regime(ens: xr.DataArray, truth: xr.DataArray, mask: xr.DataArray, name: str) -> None:
    """Power ratio per wavelength (log space) of the members against the truth, days grouped by
    :data:`REGIMES`."""
    wet = (truth.where(mask) >= 1.0).sum(["lat", "lon"]) / mask.sum()
    rows = []
    for lo, hi in REGIMES:
        days = ((wet >= lo) & ((wet < hi) | (hi == 1.0))).values
        if days.any():
            ref = spectrum(truth.isel(time=days), mask, True)
            rows.append((lo, hi, int(days.sum()), ref, spectrum(ens.isel(time=days), mask, True) / ref))
    if not rows:
        return
    wavelength = rows[0][3]["wavelength_km"].values
    ok = np.flatnonzero(np.all([np.isfinite(r[4].values) for r in rows], axis=0))
    pick = np.unique(np.r_[ok[:: max(1, len(ok) // 6)], ok[-1]])  # about 7 wavelengths, the smallest last
    print(f"\n{name}: power / truth's power (log space) by the truth's share of land cells >= 1 mm/day")
    print(
        "| wet share | days | truth's power (wettest = 1) | "
        + " | ".join(f"{wavelength[i]:.0f} km" for i in pick)
        + " |"
    )
    print("|---" * (len(pick) + 3) + "|")
    total = np.nanmean(rows[-1][3].values)
    for lo, hi, n, ref, ratio in rows:
        print(
            f"| {lo:g}-{hi:g} | {n} | {np.nanmean(ref.values) / total:.2f} | "
            + " | ".join(f"{ratio.values[i]:.2f}" for i in pick)
            + " |"
        )


if __name__ == "__main__":
    main()
