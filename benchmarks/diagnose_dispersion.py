"""Where is the precipitation CM's ensemble over- or under-dispersed? A perfect-model diagnosis.

E-OBS days of the validation winter 1996/97 (inside the training period, never the test winters) are
averaged over 4 x 4 blocks (1 deg), downscaled back with 8 members at the auto scale, with and without
``preserve``, and the spread/skill ratio is computed per bin of the ensemble mean's intensity, in mm/day
and in log space (log(x + 0.1 mm/day)): the spread (with the finite-ensemble factor) against the RMSE of
the ensemble mean; 1 is calibrated. The CRPS per bin says what the dispersion costs. The numbers back
the "over-dispersed ensembles" entry of docs/limitations.md. The same ratio per wavelength says at
which scales the members vary too much or too little (power spectra of the members' departures from
their mean against that of the ensemble mean's error), beside the members' power against the truth's.

Then, on the network alone (the training validation's inputs: the same days coarse-grained, bilinear,
low-passed, in the transformed space), how much of the members' spread is the injected noise passing
straight through: the correlation, cell by cell, of each member's departure from the ensemble mean with
its noise's departure from the mean noise, and the share of the departures' variance that this linear
part explains (the square of the correlation). A perfect consistency model maps the noise to new
structure; noise that passes through is spread that follows nothing in the data.

    python benchmarks/diagnose_dispersion.py            # under a minute on 2 cores
    python benchmarks/diagnose_dispersion.py --model runs/NAME/NAME.safetensors   # a candidate model
    python benchmarks/diagnose_dispersion.py --test-winters   # all 271 test days at the report's scale
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import xarray as xr
from evaluate_iberia import (
    CM_NAME,
    DATA,
    HIST,
    LOG_OFFSET,
    TEST,
    _mm,
    _paired_inputs,
    coarse_grained,
    spread_skill,
)

import xdownscale
from xdownscale import metrics
from xdownscale.errors import XDownscaleWarning

VALIDATION = slice("1996-12-01", "1997-02-28")
BINS = ((0.0, 1.0), (1.0, 5.0), (5.0, 15.0), (15.0, np.inf))  # ensemble mean, mm/day


def validation_case(
    doc: str, members: int, options: Callable[[argparse.ArgumentParser], None] | None = None
) -> tuple[argparse.Namespace, Any, xr.DataArray, xr.DataArray, Any]:
    """The command line of a diagnosis (``--members``, ``--days``, ``--model``, ``--test-winters`` and
    what ``options`` adds; ``doc`` its help) and its case: (arguments, the model, the validation winter's
    or the test winters' true days, the same days averaged over 4 x 4 blocks, the ``"auto"`` scale: of
    those coarse days on the validation winter, of the training winters on the test winters, as the
    report's)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=members)
    parser.add_argument(
        "--days",
        type=int,
        default=None,
        help="days to score (0: all; default: 90, the validation winter's, or all test days, as the report)",
    )
    parser.add_argument(
        "--model", default=CM_NAME, help="shipped model name or weights path (default: %(default)s)"
    )
    parser.add_argument(
        "--test-winters",
        action="store_true",
        help="diagnose the test winters 1997/98-1999/2000 instead (to explain the report, not to choose)",
    )
    if options is not None:
        options(parser)
    args = parser.parse_args()
    cm = xdownscale.load_model(args.model)
    path = DATA / "eobs_0.25deg_tp_djf1991-2000.nc"
    if not path.exists():
        raise SystemExit(f"{path} not found: the shared data must sit beside the repository.")
    # a diagnosis may look at the test winters (to explain the report); a choice never does
    period = TEST if args.test_winters else VALIDATION
    if args.days is None:
        args.days = 0 if args.test_winters else 90
    eobs = _mm(xr.open_dataset(path)["tp"])
    truth, coarse = _paired_inputs(eobs.sel(time=period).load(), 4, args.days)
    # scale="auto" as each judge of the model resolves it: the training validation on the validation
    # winter's own coarse input, the evaluation once on the training winters coarse-grained alike
    source = coarse_grained(eobs.sel(time=HIST).load(), 4) if args.test_winters else coarse
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", XDownscaleWarning)
        scale = source.assign_attrs(units="mm/day").downscale.select_scale(model=cm)
    return args, cm, truth, coarse, scale


def period_name(args: argparse.Namespace) -> str:
    return "test winters" if args.test_winters else "validation winter"


def main() -> None:
    args, cm, truth, coarse, scale = validation_case(__doc__, members=8)
    mask = cm.grid["mask"]
    truth = truth.where(mask)
    print(
        f"{args.model}, {period_name(args)}, 1 deg perfect model, {args.members} members, "
        f"{truth.sizes['time']} days; scale {scale}"
    )
    print(
        "| preserve | ensemble mean, mm/day | cells | CRPS, mm/day | spread/skill (mm/day) | spread | "
        "RMSE of mean | spread/skill (log) | spread | RMSE of mean |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for preserve in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", XDownscaleWarning)
            out = coarse.downscale.cm(
                model=cm, scale=scale, members=args.members, seed=0, progress=False, preserve=preserve
            )
        ens = _mm(out).load().where(mask)
        logs = (np.log(ens + LOG_OFFSET), np.log(truth + LOG_OFFSET))
        mean = ens.mean("member").values
        crps = metrics.crps_ensemble(ens, truth).transpose(*ens.mean("member").dims).values
        for lo, hi in ((0.0, np.inf), *BINS):
            select = (mean >= lo) & (mean < hi)
            r, s, k, n = spread_skill(ens, truth, select)
            rl, sl, kl, _ = spread_skill(*logs, select)
            print(
                f"| {preserve} | {lo:g}-{hi:g} | {n} | {np.nanmean(crps[select]):.3f} | {r:.2f} | {s:.3f} | "
                f"{k:.3f} | {rl:.2f} | {sl:.3f} | {kl:.3f} |"
            )
        if preserve:
            by_scale = spectral_spread_skill(ens, truth)
    print(
        "Per wavelength (default preserve; spectra on the largest all-land windows): spread/skill from the "
        "members' departures' power against the ensemble mean error's, and the members' power against "
        "the truth's"
    )
    print(
        "| wavelength, km | spread/skill (mm/day) | power ratio (mm/day) | spread/skill (log) | "
        "power ratio (log) |"
    )
    print("|---|---|---|---|---|")
    for row in by_scale:
        print("| " + " | ".join(f"{v:.0f}" if i == 0 else f"{v:.2f}" for i, v in enumerate(row)) + " |")
    corr, share, sigma = noise_passing_through(cm, truth, args.members, float(scale.sigma))
    print(
        f"Network alone (sigma {sigma:.3f}, transformed space): members' departures correlate {corr:.2f} "
        f"with their noise's; the noise passing through explains {share:.0%} of their variance."
    )


def spectral_spread_skill(ens: xr.DataArray, truth: xr.DataArray) -> list[tuple[float, ...]]:
    """Rows (wavelength km, spread/skill in mm/day, member/truth power ratio in mm/day, the same two in
    log space) per wavenumber bin: spread/skill from the power spectra of the members' departures from
    their mean (with the finite-ensemble factor) and of the ensemble mean's error."""
    m = ens.sizes["member"]
    columns = []
    for f in (lambda a: a, lambda a: np.log(a + LOG_OFFSET)):
        e, t = f(ens), f(truth)
        mean = e.mean("member")
        spread = xdownscale.psd(e - mean).mean(["member", "time"]) * (m + 1) / (m - 1)
        error = xdownscale.psd(mean - t).mean("time")
        power = xdownscale.psd(e).mean(["member", "time"]) / xdownscale.psd(t).mean("time")
        columns += [np.sqrt(spread / error).values, power.values]
    wavelength = spread["wavelength_km"].values
    ok = np.isfinite(np.stack(columns)).all(axis=0)
    return [tuple(float(c[i]) for c in (wavelength, *columns)) for i in np.flatnonzero(ok)]


def noise_passing_through(
    cm: Any, days: xr.DataArray, members: int, sigma: float | None = None
) -> tuple[float, float, float]:
    """(correlation of member departures with noise departures, explained share, sigma) of the network
    on the perfect-model validation inputs of ``days``, at noise level ``sigma`` (default: the one the
    training validation resolves on ``days``)."""
    import torch

    from xdownscale.models.validation import PerfectModelValidation

    check = PerfectModelValidation(days, cm.transform, cm.target_psd, cm.mask, max_fields=days.sizes["time"])
    sigma = check.sigma if sigma is None else sigma
    x = torch.from_numpy(check.inputs[:, None])
    gen = torch.Generator().manual_seed(0)
    outs, noises = [], []
    with torch.no_grad():
        for _ in range(members):
            z = torch.randn(x.shape, generator=gen)
            outs.append(cm.network(x + sigma * z, sigma).numpy())
            noises.append(z.numpy())
    out, noise = np.stack(outs), np.stack(noises)
    d_out = (out - out.mean(axis=0))[..., cm.mask].ravel()
    d_noise = (noise - noise.mean(axis=0))[..., cm.mask].ravel()
    corr = float(np.corrcoef(d_out, d_noise)[0, 1])
    return corr, corr**2, sigma


if __name__ == "__main__":
    main()
