"""What does the precipitation CM's noise level trade on the validation winter? A perfect-model sweep.

E-OBS days of the validation winter 1996/97 (inside the training period, never the test winters) are
averaged over 4 x 4 blocks (1 deg) and downscaled back with 8 members at multiples of the noise level
that ``scale="auto"`` picks for them (with ``--test-winters``: for the training winters, as the
evaluation resolves it; default preserve), and each level is scored against the true
fields as the evaluation's sweep scores the test winters (docs/evaluation.md; the same code): ensemble
CRPS, RMSE of the ensemble mean, spread/skill in mm/day and in log space (log(x + 0.1 mm/day)), and the
log-spectral distance and largest power ratio of the members' spectrum to the truth's. The first row is
the bilinear field with the input's cell values restored (no noise, no network). The evaluation's sweep
is on the test winters; this one is the one a choice of the level may be based on.

    python benchmarks/diagnose_noise_level.py              # about a minute on 2 cores
    python benchmarks/diagnose_noise_level.py --model runs/NAME/NAME.safetensors --factors 0.5,1,2
"""

from __future__ import annotations

import argparse
import warnings

from diagnose_dispersion import period_name, validation_case
from evaluate_iberia import CONSERVING, _mm, _paired_scores, _paired_sweep_table, paired_sweep

from xdownscale.errors import XDownscaleWarning
from xdownscale.preserve import preserve_large_scales

FACTORS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def _factors(text: str) -> tuple[float, ...]:
    """``--factors``: positive multiples of the auto level, separated by commas."""
    try:
        factors = tuple(float(f) for f in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected numbers separated by commas, e.g. 0.5,1,2"
        ) from None
    if min(factors) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive multiples of the auto level")
    return factors


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--factors",
        type=_factors,
        default=FACTORS,
        help="multiples of the auto noise level, e.g. 0.5,1,2 (default: 0.25,0.5,0.75,1,1.5,2)",
    )


def main() -> None:
    args, cm, truth, coarse, scale = validation_case(__doc__, 8, _options)
    warnings.simplefilter("ignore", XDownscaleWarning)
    bilinear = _mm(coarse.downscale.prepare(model=cm, transform=False)).load()
    conserving = preserve_large_scales(
        bilinear, bilinear, rule="mean", coarse=coarse, wet_min=cm.transform.wet_min
    ).load()
    bar = {"method": CONSERVING, **_paired_scores(conserving, truth, cm, coarse)}
    print(
        f"{args.model}, {period_name(args)}, 1 deg perfect model, {args.members} members, "
        f"{truth.sizes['time']} days; auto scale {scale}"
    )
    sweep = paired_sweep(truth, coarse, cm, scale, args.members, args.factors)
    print("\n".join(_paired_sweep_table(sweep, bar)))


if __name__ == "__main__":
    main()
