"""Where does the SDE bridge's excess small-scale power on NCEP R1 come from? A reanalysis diagnosis.

NCEP R1 days of one training winter (default 1995/96; never the test winters) are bias-corrected with QDM
fitted on the training winters 1990/91-1996/97, downscaled with the CM and with the 500-step SDE bridge
(each with and without ``preserve``; the SDE at the CM's wavenumber and its own noise level, as in the
evaluation) at the scale ``"auto"`` resolves on those winters, and each field's mean power spectrum is
compared with that of the E-OBS fields of the same days, per wavelength, in the report's space
log(x + 0.1 mm/day) with the report's masked estimator. The first column is the regridded, corrected
input itself (bilinear + QDM): what each model is handed. The numbers back the SDE entry of
docs/limitations.md.

    python benchmarks/diagnose_sde.py                  # 20 days, about 3 minutes on 2 cores
    python benchmarks/diagnose_sde.py --winter 1992 --days 30
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import xarray as xr
from diagnose_spectrum import spectrum
from evaluate_iberia import CM_NAME, DATA, HIST, INPUTS, SDE_NAME, _blocks, _mm, _same_scale

import xdownscale
from xdownscale.core.spectra import log_spectral_distance
from xdownscale.errors import XDownscaleWarning

#: wavelengths shown, km (the estimator's bins nearest to them)
SHOWN = (500, 250, 167, 125, 100, 83, 71, 62, 56, 50)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--winter", type=int, default=1995, help="DJF starting in this December (1990-1996)")
    parser.add_argument("--days", type=int, default=20, help="days of that winter, in blocks of 10")
    parser.add_argument("--steps", type=int, default=500, help="SDE bridge steps")
    args = parser.parse_args()
    if not 1990 <= args.winter <= 1996:
        raise SystemExit(
            f"--winter {args.winter}: a training winter, 1990-1996 (the test winters are not diagnosed)"
        )
    path = DATA / "eobs_0.25deg_tp_djf1991-2000.nc"
    if not path.exists():
        raise SystemExit(f"{path} not found: the shared data must sit beside the repository.")
    cm = xdownscale.load_model(CM_NAME)
    sde = xdownscale.load_model(SDE_NAME)
    winter = slice(f"{args.winter}-12-01", f"{args.winter + 1}-02-29")
    truth = _mm(xr.open_dataset(path)["tp"].sel(time=winter)).load()
    truth = truth.isel(time=_blocks(truth.sizes["time"], args.days))
    ncep = xr.open_dataset(DATA / INPUTS["NCEP R1"][0])[INPUTS["NCEP R1"][1]].load()
    hist = ncep.sel(time=HIST)
    coarse = ncep.sel(time=truth["time"])
    mask = cm.grid["mask"]
    qdm = {"qdm": True, "hist": hist}
    warnings.simplefilter("ignore", XDownscaleWarning)
    scale = hist.downscale.select_scale(model=cm, **qdm)
    kwargs = dict(members=1, seed=0, progress=False, **qdm)
    fields = {"bilinear + QDM": coarse.downscale.prepare(model=cm, transform=False, **qdm)}
    for preserve in (True, False):
        fields[f"CM, preserve={preserve}"] = coarse.downscale.cm(
            model=cm, scale=scale, preserve=preserve, **kwargs
        )
    sde_scale = _same_scale(scale, sde)
    for preserve in (True, False):
        fields[f"SDE {args.steps}, preserve={preserve}"] = coarse.downscale.sde(
            model=sde, scale=sde_scale, steps=args.steps, preserve=preserve, **kwargs
        )
    reference = spectrum(truth, mask, log=True)
    km = scale.wavelength_km * scale.wavenumber / reference["wavenumber"].values
    rows = [int(np.argmin(np.abs(km - w))) for w in SHOWN]
    ratios = {
        name: (spectrum(_mm(f).load(), mask, log=True) / reference).values for name, f in fields.items()
    }
    print(
        f"NCEP R1 + QDM, DJF {args.winter}/{str(args.winter + 1)[2:]}, {truth.sizes['time']} days, 1 member; "
        f"scale {scale}; power / E-OBS's power of the same days, log(x + 0.1 mm/day)"
    )
    print("| wavelength, km | " + " | ".join(ratios) + " |")
    print("|---" * (len(ratios) + 1) + "|")
    for i in rows:
        print(f"| {km[i]:.0f} | " + " | ".join(f"{r[i]:.2f}" for r in ratios.values()) + " |")
    print(
        "| log-spectral distance | "
        + " | ".join(f"{log_spectral_distance(r, np.ones_like(r))[0]:.3f}" for r in ratios.values())
        + " |"
    )


if __name__ == "__main__":
    main()
