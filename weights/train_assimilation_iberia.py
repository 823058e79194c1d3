"""Train the shipped E-OBS Iberia assimilation pairs (SLAMS latent and SDA pixel-space).

    python weights/train_assimilation_iberia.py train --kind slams --steps 600 --ae-steps 400   # tp 0.25 deg
    python weights/train_assimilation_iberia.py train --kind sda --steps 550
    python weights/train_assimilation_iberia.py train --kind sda --variable tg --steps 1500     # tg 0.5 deg
    python weights/train_assimilation_iberia.py train --kind slams --variable tg --steps 1500 --ae-steps 600

Data (not part of the repository, beside it under ``../shared/data/iberia/``):

* ``--variable tp`` (default): E-OBS v12 daily precipitation ``tp`` on the 0.25 deg land grid (41 x 61, sea
  NaN), DJF 1990/91-1996/97; the 12 VALUE stations (86-station set) inside the box fix where the SLAMS
  encoder learns to expect station values; coarse modality: E-OBS 4 x 4 block means (about 1 deg);
* ``--variable tg`` / ``rr``: E-OBS v14 daily mean temperature / precipitation on the 0.5 deg land grid
  (19 x 29), DJF 1982/83-1996/97, the 11 VALUE Iberia stations; coarse modality: 2 x 2 block means.

No real satellite field overlaps the region in the shared data: the coarse gridded modality is a
stand-in. Test winters (from 1997-12-01) are never used for training or tuning. ``train`` writes the run
(checkpoints, resumable with ``--resume``) under ``runs/NAME`` and copies ``NAME.safetensors`` +
``NAME.json`` into ``weights/``. Skill is measured by ``benchmarks/evaluate_assimilation.py``, which
writes it into the cards' ``metrics`` (fields outside the weights' sha256) and into
``docs/evaluation-assimilation.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT.parent / "shared" / "data" / "iberia"
EOBS = DATA_DIR / "eobs_0.25deg_tp_djf1991-2000.nc"
STATIONS = DATA_DIR / "value_86stations_pr_djf1991-2000.nc"
TRAIN_END = "1997-02-28"  # training winters 1990/91-1996/97
TEST_START = "1997-12-01"  # test winters 1997/98-1999/2000: evaluation only
UNITS = "mm d-1"
NAMES = {"slams": "slams-eobs-iberia-0.25deg-pr", "sda": "sda-eobs-iberia-0.25deg-pr"}
#: the 0.5 deg pairs (temperature and precipitation) on the E-OBS v14 grid with the 11 VALUE Iberia
#: stations: training winters 1982/83-1996/97, test winters 1997/98-2001/02 (never used for training)
HALF_DEGREE: dict[str, dict[str, Any]] = {
    "tg": {
        "state": ("eobs_0.5deg_tg_djf1983-2002.nc", "tg", "degC"),
        "stations": ("value_iberia_11stations_tas_djf1983-2002.nc", "tmean", "degC"),
        "names": {"slams": "slams-eobs-iberia-0.5deg-tg", "sda": "sda-eobs-iberia-0.5deg-tg"},
        "long": "daily mean temperature (tg)",
    },
    "rr": {
        "state": ("eobs_0.5deg_rr_djf1983-2002.nc", "rr", UNITS),
        "stations": ("value_iberia_11stations_pr_djf1983-2002.nc", "precip", UNITS),
        "names": {"slams": "slams-eobs-iberia-0.5deg-rr", "sda": "sda-eobs-iberia-0.5deg-rr"},
        "long": "daily precipitation (rr)",
    },
}
HALF_TRAIN_END = "1997-02-28"
HALF_TEST_START = "1997-12-01"
LICENCE = (
    "E-OBS: free for non-commercial research and education. Acknowledge 'E-OBS dataset from the EU-FP6 "
    "project UERRA and the Copernicus Climate Change Service, and the data providers in the ECA&D project'. "
    "VALUE station data (station locations only): see the VALUE/ECA&D terms."
)
# small networks: CPU training on 2 shared cores
CONFIG: dict[str, dict[str, Any]] = {
    "slams": {
        "channels": [32, 64],
        "hidden": 16,
        "latent_channels": 4,
        "factor": 2,
        "num_res_blocks": 1,
        "batch_size": 8,
        "lr": 1e-3,
        "window": 5,
    },
    "sda": {
        "channels": [16, 32, 64],
        "num_res_blocks": 1,
        "batch_size": 8,
        "lr": 1e-3,
        "window": 5,
    },
}
SATELLITE_STANDIN = (
    "No real satellite precipitation field overlaps the Iberia domain in the training data, so the coarse "
    "gridded modality is a stand-in: E-OBS block-averaged over 4 x 4 cells (about 1 deg). Real satellite "
    "products (e.g. IMERG) have other errors (retrieval biases, missed light rain, beam blockage) that "
    "this model has never seen."
)
HALF_DEGREE_STANDIN = (
    "No real satellite field overlaps the Iberia domain in the training data, so the coarse gridded modality "
    "is a stand-in: E-OBS block-averaged over 2 x 2 cells (about 1 deg). Real products have other errors "
    "that this model has never seen."
)
INTENDED_USE = {
    "slams": (
        "Score-based data assimilation in a learned latent space (SLAMS, Qu et al. 2024) of daily winter "
        "(DJF) precipitation over the Iberian Peninsula (34-44.5N, 10W-5E) on the E-OBS 0.25 deg land "
        "grid: an ensemble analysis from a coarse background, station observations and a coarse gridded "
        "(satellite-like) field. For demonstrations, teaching and method research."
    ),
    "sda": (
        "Pixel-space score-based data assimilation (SDA, Rozet & Louppe 2023; the baseline of SLAMS) of "
        "daily winter (DJF) precipitation over the Iberian Peninsula (34-44.5N, 10W-5E) on the E-OBS "
        "0.25 deg land grid: an ensemble analysis from a coarse background, station observations and a "
        "coarse gridded (satellite-like) field. For demonstrations, teaching and method research."
    ),
}
LIMITATIONS = [
    "Iberian Peninsula only (the 41 x 61 E-OBS 0.25 deg grid, land cells; sea is masked as in E-OBS).",
    "Winter (DJF) daily precipitation only; other seasons and variables are out of distribution.",
    "Small model trained briefly on a CPU (2 shared cores) on 7 winters (about 630 days): far from the "
    "paper's compute. Read the measured skill before relying on it.",
    "E-OBS terms: free for non-commercial research and education only; acknowledge E-OBS (UERRA, "
    "Copernicus Climate Change Service, ECA&D data providers).",
    SATELLITE_STANDIN,
    "Trained on the E-OBS gridded analysis, which itself smooths station values: station-scale extremes "
    "are underrepresented.",
]


def _eobs() -> xr.DataArray:
    if not EOBS.is_file():
        raise SystemExit(f"{EOBS} not found: the shared data must sit beside the repository.")
    tp = xr.open_dataset(EOBS)["tp"].load()
    tp.attrs["units"] = UNITS  # daily totals in mm = mm per day
    return tp


def _stations() -> xr.DataArray:
    from xdownscale.xr.observations import station_indices

    st = xr.open_dataset(STATIONS)["precip"].load()
    st.attrs["units"] = UNITS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, inside = station_indices(st, _eobs().isel(time=0))
    return st.isel(station=np.flatnonzero(inside))


def _coarse(tp: xr.DataArray, factor: int) -> xr.DataArray:
    out = tp.coarsen(lat=factor, lon=factor, boundary="trim").mean()
    out.attrs = dict(tp.attrs)
    return out


def load_half_degree(variable: str) -> tuple[xr.DataArray, xr.DataArray]:
    """E-OBS 0.5 deg state and the 11 VALUE Iberia stations of ``variable`` ("tg" or "rr"), whole period,
    with units set (daily totals in mm are mm per day)."""
    info = HALF_DEGREE[variable]
    fname, var, units = info["state"]
    if not (DATA_DIR / fname).is_file():
        raise SystemExit(f"{DATA_DIR / fname} not found: the shared data must sit beside the repository.")
    state = xr.open_dataset(DATA_DIR / fname)[var].load()
    state.attrs["units"] = units
    sname, svar, sunits = info["stations"]
    st = xr.open_dataset(DATA_DIR / sname)[svar].load()
    st.attrs["units"] = sunits
    return state, st


def train(args: argparse.Namespace) -> None:
    import torch

    from xdownscale.models.assimilation import train_assimilation

    torch.set_num_threads(args.threads)
    if args.variable == "tp":
        name = NAMES[args.kind]
        tp = _eobs().sel(time=slice(None, TRAIN_END))
        stations = _stations().sel(time=slice(None, TRAIN_END))
        variable, factor = "tp", 4
        description = (
            "E-OBS v12 daily precipitation (tp), 0.25 deg regular grid over Iberia, DJF 1990/91-1996/97; "
            "encoder station cells from the 12 VALUE stations inside the box; coarse modality = E-OBS "
            "4 x 4 block means (satellite stand-in)."
        )
    else:
        info = HALF_DEGREE[args.variable]
        name = info["names"][args.kind]
        full, st = load_half_degree(args.variable)
        tp = full.sel(time=slice(None, HALF_TRAIN_END))
        stations = st.sel(time=slice(None, HALF_TRAIN_END))
        variable, factor = args.variable, 2
        description = (
            f"E-OBS v14 {info['long']}, 0.5 deg regular grid over Iberia (19 x 29), DJF 1982/83-1996/97; "
            "encoder station cells from the 11 VALUE Iberia stations; coarse modality = E-OBS 2 x 2 block "
            "means (about 1 deg, satellite stand-in)."
        )
    started = time.perf_counter()
    path = train_assimilation(
        args.kind,
        state=tp,
        out=ROOT / "runs" / name,
        stations=stations,
        variable=variable,
        device=args.device,
        resume=args.resume,
        progress=not args.quiet,
        name=name,
        steps=args.steps,
        ae_steps=args.ae_steps if args.kind == "slams" else 0,
        satellite_factor=factor,
        seed=args.seed,
        checkpoint_every=max(100, args.steps // 4),
        log_every=50,
        licence=LICENCE,
        **CONFIG[args.kind],
    )
    minutes = (time.perf_counter() - started) / 60
    card_path = path.with_suffix(".json")
    card = json.loads(card_path.read_text())
    if args.variable == "tp":
        card["intended_use"] = INTENDED_USE[args.kind]
        card["limitations"] = LIMITATIONS
    else:
        what = HALF_DEGREE[args.variable]["long"]
        card["intended_use"] = (
            INTENDED_USE[args.kind]
            .replace("daily winter (DJF) precipitation", f"winter (DJF) {what}")
            .replace(
                "(34-44.5N, 10W-5E) on the E-OBS 0.25 deg land grid",
                "(35-44.5N, 10W-4.5E) on the E-OBS 0.5 deg land grid",
            )
        )
        card["limitations"] = [
            "Iberian Peninsula only (the 19 x 29 E-OBS 0.5 deg grid, land cells; sea is masked as in E-OBS).",
            f"Winter (DJF) {what} only; other seasons and variables are out of distribution.",
            "Small model trained briefly on a CPU (2 shared cores) on 15 winters (about 1350 days): far from "
            "the paper's compute. Read the measured skill before relying on it.",
            LIMITATIONS[3],
            HALF_DEGREE_STANDIN,
            LIMITATIONS[5],
        ]
    card["training"]["minutes"] = round(minutes, 2)
    card["training"]["hardware"] = args.device or (
        "cuda" if torch.cuda.is_available() else f"cpu ({args.threads} thread)"
    )
    card["training"]["description"] = description
    card_path.write_text(json.dumps(card, indent=1))
    for suffix in (".safetensors", ".json"):
        shutil.copy(path.with_suffix(suffix), ROOT / "weights" / f"{name}{suffix}")
    print(f"{name}: {minutes:.1f} min, written to weights/")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one model and copy it into weights/")
    p.add_argument("--kind", choices=tuple(NAMES), required=True)
    p.add_argument(
        "--variable", choices=("tp", *HALF_DEGREE), default="tp", help="tp: 0.25 deg pair; tg, rr: 0.5 deg"
    )
    p.add_argument("--steps", type=int, default=600, help="score-network steps")
    p.add_argument("--ae-steps", type=int, default=400, help="autoencoder steps (slams)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    train(args)


if __name__ == "__main__":
    main()
