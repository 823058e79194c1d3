"""What does the precipitation CM's noise level trade on the validation winter? A perfect-model sweep.

E-OBS days of the validation winter 1996/97 (inside the training period, never the test winters) are
averaged over 4 x 4 blocks (1 deg) and downscaled back with 8 members at multiples of the noise level
that ``scale="auto"`` picks for them (default preserve), and each level is scored against the true
fields: ensemble CRPS, spread/skill in mm/day and in log space (log(x + 0.1 mm/day)), and the
log-spectral distance and largest power ratio of the members' mean spectrum (log space, the report's
masked estimator) to the truth's. The evaluation sweeps the same levels on the test winters
(docs/evaluation.md); this sweep is the one a choice of the level may be based on.

    python benchmarks/diagnose_noise_level.py              # under a minute on 2 cores
    python benchmarks/diagnose_noise_level.py --model runs/NAME/NAME.safetensors --factors 0.5,1,2
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
from diagnose_dispersion import validation_case
from diagnose_spectrum import spectrum
from evaluate_iberia import LOG_OFFSET, _mm, spread_skill

from xdownscale import metrics
from xdownscale.core.spectra import log_spectral_distance
from xdownscale.errors import XDownscaleWarning

FACTORS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def _factors(argv: list[str]) -> tuple[tuple[float, ...], list[str]]:
    """``--factors a,b,...`` taken out of ``argv`` (the rest goes to the shared command line)."""
    if "--factors" not in argv:
        return FACTORS, argv
    i = argv.index("--factors")
    if i + 1 >= len(argv):
        raise SystemExit("--factors needs a value, e.g. --factors 0.5,1,2 (multiples of the auto level)")
    try:
        factors = tuple(float(f) for f in argv[i + 1].split(","))
    except ValueError:
        raise SystemExit(
            f"--factors {argv[i + 1]!r}: expected numbers separated by commas, e.g. 0.5,1,2"
        ) from None
    if not factors or min(factors) <= 0:
        raise SystemExit(f"--factors {argv[i + 1]!r}: expected positive multiples of the auto level")
    return factors, argv[:i] + argv[i + 2 :]


def main() -> None:
    factors, sys.argv = _factors(sys.argv)
    args, cm, truth, coarse = validation_case(__doc__ + "\n    --factors LIST  (default 0.25,...,2)", 8)
    mask = cm.grid["mask"]
    truth = truth.where(mask)
    reference = spectrum(truth, mask, True).values
    warnings.simplefilter("ignore", XDownscaleWarning)
    auto = coarse.downscale.cm(model=cm, members=1, seed=0, progress=False).attrs
    sigma = float(auto["downscale_scale_sigma"])
    print(
        f"{args.model}, validation winter, 1 deg perfect model, {args.members} members, "
        f"{truth.sizes['time']} days; auto scale {auto['downscale_scale']}"
    )
    print(
        "| x auto | sigma | CRPS, mm/day | spread/skill, mm/day (log) | log-spectral distance | "
        "largest PSD factor |"
    )
    print("|---|---|---|---|---|---|")
    for factor in factors:
        out = coarse.downscale.cm(
            model=cm, members=args.members, seed=0, progress=False, scale=f"sigma={factor * sigma:.6g}"
        )
        ens = _mm(out).load().where(mask)
        crps = float(metrics.crps_ensemble(ens, truth).mean())
        select = np.isfinite(ens.mean("member").values)
        ratio = spread_skill(ens, truth, select)[0]
        ratio_log = spread_skill(np.log(ens + LOG_OFFSET), np.log(truth + LOG_OFFSET), select)[0]
        distance, largest, _ = log_spectral_distance(spectrum(ens, mask, True).values, reference)
        print(
            f"| {factor:g} | {factor * sigma:.3f} | {crps:.3f} | {ratio:.2f} ({ratio_log:.2f}) | "
            f"{distance:.3f} | {largest:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
