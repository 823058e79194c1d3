"""Benchmark: latent (SLAMS) against pixel-space (SDA) score-based assimilation, background only against
multimodal (Qu et al. 2024, section 4.2 ablation).

Synthetic part (always). A truth trajectory (``xdownscale.datasets.synthetic_temperature``, a held-out seed)
and observations made from it with the paper's ablation operators:

* background: ``coarsen(factor)`` of the truth plus ``noise(sigma^2)``, on its own coarse grid (it enters the
  analysis as area averages of the state);
* stations: ``subsample(gap)`` of the truth plus noise, as point observations (half of the cells of a
  ``gap/2`` lattice are withheld for evaluation);
* satellite: ``coarsen(2 * factor)`` of the truth plus noise on its own grid (the multimodal runs only).

The models are trained here, briefly, on other years of the same synthetic climate. Reported per
configuration: RMSE of the ensemble mean against the truth (all cells) and at the withheld stations,
Wasserstein-1 distance between the pooled analysis and truth values, the spread-skill ratio (mean ensemble
standard deviation / RMSE of the ensemble mean, 1 is calibrated) and seconds per analysed time step. The
baseline is the background itself (bilinearly interpolated to the fine grid: "background" rows).

Real stations (when ``../shared/data/iberia/value_86stations_pr_djf1991-2000.nc`` exists, else skipped): an
SDA model trained on E-OBS 0.25 deg daily precipitation; background = E-OBS averaged over 4 x 4 cells
(noisy); the 12 VALUE stations inside the domain, every second one assimilated and the others withheld;
RMSE at the withheld stations for the background and the analysis. (No real satellite field overlaps the
region, so the satellite modality is synthetic, as the data README asks.)

Usage::

    python benchmarks/bench_assimilate.py --quick   # ~1-2 minutes on 2 CPU cores
    python benchmarks/bench_assimilate.py           # larger grid, more training, 512 steps
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

HERE = Path(__file__).resolve().parent
STATIONS = HERE.parents[1] / "shared" / "data" / "iberia" / "value_86stations_pr_djf1991-2000.nc"
EOBS = HERE.parents[1] / "shared" / "data" / "iberia" / "eobs_0.25deg_tp_djf1991-2000.nc"


def _noisy(da: xr.DataArray, std: float, rng: np.random.Generator) -> xr.DataArray:
    out = da + std * rng.standard_normal(da.shape)
    out.attrs = dict(da.attrs)
    return out


def _points(field: xr.DataArray, iy: np.ndarray, ix: np.ndarray, names: list[str]) -> xr.DataArray:
    ydim, xdim = field.dims[-2:]
    pts = field.isel({ydim: xr.DataArray(iy, dims="station"), xdim: xr.DataArray(ix, dims="station")})
    pts = pts.assign_coords(station=names)
    pts.attrs = dict(field.attrs)
    return pts


def _metrics(an: xr.DataArray | None, field: xr.DataArray, truth: xr.DataArray, held: tuple) -> dict:
    from scipy.stats import wasserstein_distance

    iy, ix = held
    mean = field
    t = truth.values
    ok = np.isfinite(t) & np.isfinite(mean.values)
    out = {
        "rmse": float(np.sqrt(np.nanmean((mean.values - t) ** 2))),
        "wasserstein": float(wasserstein_distance(mean.values[ok].ravel(), t[ok].ravel())),
        "rmse_withheld": float(np.sqrt(np.nanmean((mean.values[:, iy, ix] - t[:, iy, ix]) ** 2))),
    }
    if an is not None:
        a = an.values  # (time, member, y, x)
        out["wasserstein"] = float(wasserstein_distance(a[np.isfinite(a)].ravel(), t[np.isfinite(t)].ravel()))
        spread = float(np.sqrt(np.nanmean(a.var(axis=1, ddof=1)[:, iy, ix])))
        out["spread_skill_withheld"] = spread / max(out["rmse_withheld"], 1e-12)
    return out


def synthetic(args: argparse.Namespace, workdir: Path) -> list[dict]:
    from xdownscale.assimilate import sda, slams
    from xdownscale.datasets import synthetic_temperature
    from xdownscale.models.assimilation import load_assimilation_model, train_assimilation
    from xdownscale.xr.regrid import regrid

    n, factor, gap = args.size, args.factor, args.gap
    train = synthetic_temperature(n, n, args.train_days, seed=0)
    truth = synthetic_temperature(n, n, args.days, seed=11, start="2001-12-01")
    rng = np.random.default_rng(0)
    coarse = truth.coarsen(lat=factor, lon=factor).mean()
    coarse.attrs = dict(truth.attrs)
    background = _noisy(coarse, args.noise, rng)
    sat = truth.coarsen(lat=2 * factor, lon=2 * factor).mean()
    sat.attrs = dict(truth.attrs)
    satellite = _noisy(sat, args.noise, rng)
    yy, xx = np.meshgrid(np.arange(0, n, gap), np.arange(0, n, gap), indexing="ij")
    used = (yy.ravel(), xx.ravel())
    hy, hx = np.meshgrid(np.arange(gap // 2, n, gap), np.arange(gap // 2, n, gap), indexing="ij")
    held = (hy.ravel(), hx.ravel())
    stations = _noisy(_points(truth, *used, [f"s{i}" for i in range(used[0].size)]), args.noise, rng)

    bg_fine = regrid(background, truth, method="bilinear").transpose(*truth.dims)
    rows = [{"case": "background (bilinear)", **_metrics(None, bg_fine, truth, held)}]
    cfg = dict(
        channels=[16, 32],
        hidden=16,
        latent_channels=4,
        factor=2,
        num_res_blocks=1,
        batch_size=8,
        lr=2e-3,
        window=args.window,
    )
    for kind in ("sda", "slams"):
        t0 = time.time()
        path = train_assimilation(
            kind,
            state=train,
            out=workdir / kind,
            steps=args.train_steps,
            ae_steps=args.ae_steps if kind == "slams" else 0,
            progress=False,
            resume=False,
            **cfg,
        )
        model = load_assimilation_model(path)
        train_s = time.time() - t0
        print(f"  trained {kind} in {train_s:.0f} s", flush=True)
        fn = sda if kind == "sda" else slams
        for label, extra in (
            ("background only", {}),
            ("multimodal", {"stations": stations, "satellite": satellite}),
        ):
            t0 = time.time()
            an = fn(
                background,
                model=model,
                **extra,
                stations_std=args.noise,
                satellite_std=args.noise,
                background_std=args.noise,
                members=args.members,
                steps=args.steps,
                seed=0,
            )
            seconds = time.time() - t0
            print(f"  {kind} {label}: {seconds:.0f} s", flush=True)
            rows.append(
                {
                    "case": f"{kind} {label}",
                    **_metrics(an, an.mean("member"), truth, held),
                    "seconds_per_step": seconds / truth.sizes["time"],
                    "train_seconds": train_s,
                }
            )
    return rows


def real_stations(args: argparse.Namespace, workdir: Path) -> list[dict]:
    from xdownscale.assimilate import sda
    from xdownscale.models.assimilation import load_assimilation_model, train_assimilation
    from xdownscale.xr.observations import station_indices
    from xdownscale.xr.regrid import regrid

    if not (STATIONS.is_file() and EOBS.is_file()):
        print(f"[skip] real stations: {STATIONS} not found")
        return []
    eobs = xr.open_dataset(EOBS).tp.load()
    eobs.attrs["units"] = "mm/day"
    train = eobs.isel(time=slice(0, args.real_train_days))
    days = eobs.isel(time=slice(-args.days, None))
    st = xr.open_dataset(STATIONS).precip.load()
    st.attrs["units"] = "mm/day"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, inside = station_indices(st, eobs)
    st_in = st.isel(station=np.flatnonzero(inside)).sel(time=days.time)
    used, held = st_in.isel(station=slice(0, None, 2)), st_in.isel(station=slice(1, None, 2))
    rng = np.random.default_rng(0)
    coarse = days.coarsen(lat=4, lon=4, boundary="trim").mean()
    coarse.attrs = dict(days.attrs)
    background = (coarse * np.exp(0.3 * rng.standard_normal(coarse.shape))).clip(min=0.0)
    background.attrs = dict(days.attrs)
    t0 = time.time()
    path = train_assimilation(
        "sda",
        state=train,
        out=workdir / "real",
        steps=args.train_steps,
        progress=False,
        resume=False,
        channels=[16, 32],
        num_res_blocks=1,
        batch_size=8,
        lr=2e-3,
        window=args.window,
    )
    model = load_assimilation_model(path)
    print(f"  trained real-data sda in {time.time() - t0:.0f} s", flush=True)
    t0 = time.time()
    an = sda(
        background,
        model=model,
        stations=used,
        # a point against a 0.25 deg cell: the representativeness error of daily precipitation is several
        # mm/day (estimate_observation_error gives 1.5-17 on the training winters); 1 mm/day over-fits
        stations_std=3.0,
        background_std=1.0,
        members=args.members,
        steps=args.steps,
        seed=0,
    )
    seconds = time.time() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hy, hx, _ = station_indices(held, eobs)
    bg_fine = regrid(background, days, method="bilinear").transpose(*days.dims)

    def at_held(field: xr.DataArray) -> np.ndarray:
        import torch

        from xdownscale.core.observations import BilinearPoints

        # from land cells only: sea cells are NaN in E-OBS, not zero precipitation
        land = np.isfinite(eobs.values).all(axis=0) if eobs.ndim == 3 else np.isfinite(eobs.values)
        op = BilinearPoints(hy, hx, shape=field.shape[-2:], mask=land)
        return op(torch.as_tensor(np.nan_to_num(field.values), dtype=torch.float64)).numpy()

    obs = held.transpose("time", "station").values
    rmse = lambda f: float(np.sqrt(np.nanmean((at_held(f) - obs) ** 2)))  # noqa: E731
    return [
        {"case": "real: background (4x4 E-OBS means, noisy)", "rmse_withheld_stations": rmse(bg_fine)},
        {
            "case": f"real: sda + {used.sizes['station']} VALUE stations",
            "rmse_withheld_stations": rmse(an.mean("member")),
            "seconds_per_step": seconds / days.sizes["time"],
        },
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small grid, short training, 64 steps (~1-2 min)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = p.parse_args(argv)
    quick = dict(
        size=16,
        factor=4,
        gap=4,
        noise=0.3,
        days=3,
        train_days=90,
        train_steps=120,
        ae_steps=150,
        members=4,
        steps=40,
        window=3,
        real_train_days=90,
    )
    full = dict(
        size=32,
        factor=4,
        gap=4,
        noise=0.3,
        days=10,
        train_days=365,
        train_steps=3000,
        ae_steps=2000,
        members=16,
        steps=512,
        window=5,
        real_train_days=600,
    )
    for k, v in (quick if args.quick else full).items():
        setattr(args, k, v)
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = synthetic(args, Path(tmp)) + real_stations(args, Path(tmp))
    keys = [
        "rmse",
        "rmse_withheld",
        "wasserstein",
        "spread_skill_withheld",
        "rmse_withheld_stations",
        "seconds_per_step",
    ]
    print(f"{'case':44s}" + "".join(f"{k:>24s}" for k in keys))
    for r in rows:
        print(f"{r['case']:44s}" + "".join(f"{r[k]:24.3f}" if k in r else f"{'-':>24s}" for k in keys))
    print(
        f"total {time.time() - t0:.0f} s ({'quick' if args.quick else 'full'}; noise std {args.noise} K, "
        f"coarsen {args.factor}, station gap {args.gap}, {args.members} members, {args.steps} steps)"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
