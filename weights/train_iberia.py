"""Train the shipped E-OBS Iberia models (consistency model, VE-SDE baseline), precipitation or temperature.

    python weights/train_iberia.py --kind cm --steps 4000 --channels 48,96,96 --static-inputs \\
        --crps-tolerance 0.02
    python weights/train_iberia.py --kind sde --steps 5000 --lr-schedule constant --static-inputs \\
        --channels 48,96,96
    python weights/train_iberia.py --kind cm --variable tas --steps 4000 --channels 32,48,48
    python weights/train_iberia.py --kind cm --variable pr+tas --steps 6000 --channels 32,48,48 --eps 0.1

Data (not part of the repository), in ``../shared/data/iberia/``:

* ``pr``: ``eobs_0.25deg_tp_djf1991-2000.nc`` (E-OBS v12 daily precipitation, 0.25 deg, sea masked);
  training winters 1990/91-1995/96, validation winter 1996/97.
* ``tas``: ``eobs_0.5deg_tg_djf1983-2002.nc`` (E-OBS v14 daily mean temperature, 0.5 deg, sea masked);
  training winters 1982/83-1995/96, validation winter 1996/97.

* ``pr+tas``: a joint model of ``tas`` (from ``tg`` above) and ``pr`` (from
  ``eobs_0.5deg_rr_djf1983-2002.nc``, E-OBS v14 daily precipitation on the same 0.5 deg grid); training
  winters 1982/83-1995/96, validation winter 1996/97.

The test winters from 1997/98 on are never used for training or tuning. Writes ``weights/NAME.safetensors``
+ ``weights/NAME.json`` (float16 weights) and the training run (with checkpoints, resumable with
``--resume``) under ``runs/NAME``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import xarray as xr

import xdownscale
from xdownscale.core.precision import PRECISIONS

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "iberia"
VALIDATION = "1996-12-01/1997-02-28"
LICENCE = (
    "E-OBS: free for non-commercial research and education. Acknowledge 'E-OBS dataset from the EU-FP6 "
    "project UERRA and the Copernicus Climate Change Service, and the data providers in the ECA&D project'."
)
COMMON_LIMITATIONS = [
    "Iberian Peninsula only, land cells only (sea is masked as in E-OBS).",
    "Unpaired: corrects patterns below the chosen scale; larger-scale biases of the input are kept "
    "by design.",
    "E-OBS terms: non-commercial research and education only.",
]
#: per variable: data file, its variable, training period, model names, card texts
VARIABLES = {
    "pr": {
        "data": SHARED / "eobs_0.25deg_tp_djf1991-2000.nc",
        "variable": "tp",
        "train": slice("1990-12-01", "1997-02-28"),  # training winters incl. the validation winter
        "names": {"cm": "cm-eobs-iberia-0.25deg-pr", "sde": "sde-eobs-iberia-0.25deg-pr"},
        "description": "E-OBS v12 daily precipitation (tp), 0.25 deg regular grid over Iberia, DJF "
        "1990/91-1995/96 (validation DJF 1996/97)",
        "intended_use": "Downscaling daily winter (DJF) precipitation from coarse climate-model or "
        "reanalysis fields over the Iberian Peninsula (34-44.5N, 10W-5E) onto the E-OBS 0.25 deg land "
        "grid, as an ensemble; demonstrations, teaching and method research.",
        "limitations": [
            "Winter (DJF) daily precipitation only; other seasons are out of distribution.",
            "Trained on 6 winters (about 540 days) on a CPU: a small model far from the paper's compute; "
            "see the measured skill before relying on it.",
        ],
    },
    "tas": {
        "data": SHARED / "eobs_0.5deg_tg_djf1983-2002.nc",
        "variable": "tg",
        "train": slice("1982-12-01", "1997-02-28"),
        "names": {"cm": "cm-eobs-iberia-0.5deg-tas", "sde": "sde-eobs-iberia-0.5deg-tas"},
        "description": "E-OBS v14 daily mean near-surface temperature (tg), 0.5 deg regular grid over "
        "Iberia, DJF 1982/83-1995/96 (validation DJF 1996/97)",
        "intended_use": "Downscaling daily winter (DJF) mean near-surface air temperature (tas) from "
        "coarse climate-model or reanalysis fields over the Iberian Peninsula (34-44.5N, 10W-5E) onto "
        "the E-OBS 0.5 deg land grid, as an ensemble; demonstrations, teaching and method research.",
        "limitations": [
            "Winter (DJF) daily mean temperature only; other seasons are out of distribution.",
            "Trained on 14 winters (about 1260 days) on a CPU: a small model far from the paper's "
            "compute; see the measured skill before relying on it.",
        ],
    },
    "pr+tas": {
        "data": {
            "tas": (SHARED / "eobs_0.5deg_tg_djf1983-2002.nc", "tg"),
            "pr": (SHARED / "eobs_0.5deg_rr_djf1983-2002.nc", "rr"),
        },
        "variable": ["tas", "pr"],
        "train": slice("1982-12-01", "1997-02-28"),
        "names": {"cm": "cm-eobs-iberia-0.5deg-pr-tas"},
        "description": "E-OBS v14 daily mean temperature (tg) and precipitation (rr), 0.5 deg regular grid "
        "over Iberia, DJF 1982/83-1995/96 (validation DJF 1996/97)",
        "intended_use": "Downscaling daily winter (DJF) near-surface air temperature (tas) and "
        "precipitation (pr) together from coarse climate-model or reanalysis fields over the Iberian "
        "Peninsula onto the E-OBS 0.5 deg land grid, each variable at its own scale, keeping their joint "
        "structure; demonstrations, teaching and method research.",
        "limitations": [
            "Winter (DJF) daily fields only; other seasons are out of distribution.",
            "Trained on 14 winters (about 1260 days) on a CPU; 0.5 deg only (precipitation at half the "
            "resolution of cm-eobs-iberia-0.25deg-pr).",
        ],
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", choices=("cm", "sde"), required=True)
    parser.add_argument("--variable", choices=tuple(VARIABLES), default="pr")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--channels", default="32,64,64")
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default="cosine")
    parser.add_argument("--loss", default=None, help="cm: ect (default), ict or ct; sde: dsm")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--val-every", type=int, default=250)
    parser.add_argument("--res-blocks", type=int, default=1)
    parser.add_argument(
        "--static-inputs",
        action="store_true",
        help="give the network the training data's per-cell climatology and the mask as fixed inputs",
    )
    parser.add_argument(
        "--eps",
        type=float,
        default=None,
        help="pr: offset of the log transform, mm/day (default: xdownscale.train's, 1)",
    )
    parser.add_argument(
        "--keep-checkpoints",
        type=int,
        default=2,
        help="checkpoints kept (one per --val-every steps; more lets you compare steps afterwards)",
    )
    parser.add_argument(
        "--crps-tolerance",
        type=float,
        default=None,
        help="cm: the validated step with the nearest spectrum within this CRPS fraction of the lowest "
        "(default: xdownscale.train's, 0: the lowest CRPS)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16 autocast on CUDA and on CPUs with native bf16 (about 1.6x faster here), else fp32",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--run-name", default=None, help="training run directory under runs/ (default: NAME)")
    parser.add_argument("--no-install", action="store_true", help="do not copy the result into weights/")
    args = parser.parse_args()
    spec = VARIABLES[args.variable]
    sources = (
        spec["data"]
        if isinstance(spec["data"], dict)
        else {spec["variable"]: (spec["data"], spec["variable"])}
    )
    for data_path, _ in sources.values():
        if not data_path.exists():
            raise SystemExit(f"{data_path} not found: the shared data must sit beside the repository.")

    import torch

    if args.kind not in spec["names"]:
        raise SystemExit(f"--variable {args.variable} trains --kind {' or '.join(spec['names'])} only.")
    name = spec["names"][args.kind]
    fields = [
        xr.open_dataset(path)[source].sel(time=spec["train"]).rename(target)
        for target, (path, source) in sources.items()
    ]
    field = fields[0] if len(fields) == 1 else fields
    channels = tuple(int(c) for c in args.channels.split(","))
    path = xdownscale.train(
        kind=args.kind,
        data=field,
        variable=spec["variable"],
        out=ROOT / "runs" / (args.run_name or name),
        name=name,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        loss=args.loss,
        ema_decay=args.ema_decay,
        channels=channels,
        net={"num_res_blocks": args.res_blocks},
        static_inputs=args.static_inputs,
        seed=args.seed,
        val_time=VALIDATION,
        checkpoint_every=args.val_every,
        keep_checkpoints=args.keep_checkpoints,
        val_every=args.val_every,
        **({} if args.eps is None else {"eps": args.eps}),
        resume=args.resume,
        device=args.device,
        precision=args.precision,
        **({} if args.crps_tolerance is None else {"crps_tolerance": args.crps_tolerance}),
        licence=LICENCE,
        description=spec["description"],
        dtype=torch.float16,
    )
    card_path = path.with_suffix(".json")
    card = json.loads(card_path.read_text())
    hours = card["training"]["wall_time_s"] / 3600  # all sessions of a resumed run
    card["intended_use"] = spec["intended_use"]
    card["limitations"] = [*spec["limitations"], *COMMON_LIMITATIONS]
    card["training"]["hours"] = round(hours, 3)
    card["training"]["hardware"] = args.device or ("cuda" if torch.cuda.is_available() else "cpu (2 cores)")
    card_path.write_text(json.dumps(card, indent=1))
    if args.no_install:
        print(f"{name}: {hours:.2f} h, written to {path.parent}")
        return
    for suffix in (".safetensors", ".json"):
        shutil.copy(path.with_suffix(suffix), ROOT / "weights" / f"{name}{suffix}")
    print(f"{name}: {hours:.2f} h, written to weights/")


if __name__ == "__main__":
    main()
