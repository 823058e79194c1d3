"""Where is the precipitation CM's ensemble over- or under-dispersed? A perfect-model diagnosis.

E-OBS days of the validation winter 1996/97 (inside the training period, never the test winters) are
averaged over 4 x 4 blocks (1 deg), downscaled back with 8 members at the auto scale, with and without
``preserve``, and the spread/skill ratio is computed per bin of the ensemble mean's intensity, in mm/day
and in log space (log(x + 0.1 mm/day)): the spread (with the finite-ensemble factor) against the RMSE of
the ensemble mean; 1 is calibrated. The numbers back the "over-dispersed ensembles" entry of
docs/limitations.md.

    python benchmarks/diagnose_dispersion.py            # under a minute on 2 cores
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import xarray as xr
from evaluate_iberia import CM_NAME, DATA, LOG_OFFSET, _mm, _paired_inputs, spread_skill

import xdownscale
from xdownscale.errors import XDownscaleWarning

VALIDATION = slice("1996-12-01", "1997-02-28")
BINS = ((0.0, 1.0), (1.0, 5.0), (5.0, 15.0), (15.0, np.inf))  # ensemble mean, mm/day


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--days", type=int, default=90)
    args = parser.parse_args()
    cm = xdownscale.load_model(CM_NAME)
    path = DATA / "eobs_0.25deg_tp_djf1991-2000.nc"
    if not path.exists():
        raise SystemExit(f"{path} not found: the shared data must sit beside the repository.")
    days = _mm(xr.open_dataset(path)["tp"].sel(time=VALIDATION)).load()
    truth, coarse = _paired_inputs(days, 4, args.days)
    mask = cm.grid["mask"]
    truth = truth.where(mask)
    print(
        f"{CM_NAME}, validation winter, 1 deg perfect model, {args.members} members, "
        f"{truth.sizes['time']} days"
    )
    print(
        "| preserve | ensemble mean, mm/day | cells | spread/skill (mm/day) | spread | RMSE of mean | "
        "spread/skill (log) | spread | RMSE of mean |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for preserve in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", XDownscaleWarning)
            out = coarse.downscale.cm(
                model=cm, members=args.members, seed=0, progress=False, preserve=preserve
            )
        ens = _mm(out).load().where(mask)
        logs = (np.log(ens + LOG_OFFSET), np.log(truth + LOG_OFFSET))
        mean = ens.mean("member").values
        for lo, hi in ((0.0, np.inf), *BINS):
            select = (mean >= lo) & (mean < hi)
            r, s, k, n = spread_skill(ens, truth, select)
            rl, sl, kl, _ = spread_skill(*logs, select)
            print(
                f"| {preserve} | {lo:g}-{hi:g} | {n} | {r:.2f} | {s:.3f} | {k:.3f} | {rl:.2f} | {sl:.3f} | "
                f"{kl:.3f} |"
            )


if __name__ == "__main__":
    main()
