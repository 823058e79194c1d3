"""Make the coarse sample that ``xdownscale demo`` downscales (``xdownscale/data/demo_coarse_pr.nc``).

    python weights/make_demo_sample.py

The sample is made by the project itself, not taken from any dataset: 8 daily fields are drawn from the
shipped consistency model (pure noise, 2 steps), their sea cells are filled with each day's land mean
(as a climate model has values everywhere), and they are block-averaged over 5 x 5 cells onto a coarse,
ESM-like grid (about 1.25 deg) in kg m-2 s-1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import xarray as xr

import xdownscale
from xdownscale.core.rng import KeyedNoise, sample_key
from xdownscale.core.samplers import generate_cm

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "xdownscale" / "data" / "demo_coarse_pr.nc"
MODEL = "cm-eobs-iberia-0.25deg-pr"


def main() -> None:
    model = xdownscale.load_model(MODEL)
    grid = model.grid
    ny, nx = grid["mask"].shape
    days = 8
    times = xr.date_range("2031-12-01", periods=days, freq="D")
    keys = [sample_key("demo-sample", i) for i in range(days)]
    noise = KeyedNoise(keys, seed=2031, shape=(1, ny, nx))
    with torch.no_grad():
        y = generate_cm(model.network, (days, 1, ny, nx), steps=2, noise=noise)[:, 0].numpy()
    fields = xr.DataArray(
        y, dims=("time", "lat", "lon"), coords={"time": times, "lat": grid["lat"], "lon": grid["lon"]}
    )
    fields.attrs["units"] = "1"
    physical = model.transform.inverse(fields)
    physical = physical.where(grid["mask"])
    filled = physical.fillna(physical.mean(("lat", "lon")))
    filled.attrs["units"] = model.variable["units"]
    coarse = xdownscale.upscale(filled, factor=5)
    coarse = xdownscale.convert_units(coarse, "kg m-2 s-1").astype("float32")
    coarse.name = "pr"
    coarse.attrs.update(
        standard_name="precipitation_flux",
        long_name="Precipitation (synthetic, coarse)",
        comment=(
            f"Made by xdownscale's weights/make_demo_sample.py: drawn from the model {MODEL} and "
            "block-averaged "
            "over 5 x 5 cells. Not observations and not the output of any climate model."
        ),
    )
    coarse["lat"].attrs = {"standard_name": "latitude", "units": "degrees_north"}
    coarse["lon"].attrs = {"standard_name": "longitude", "units": "degrees_east"}
    coarse["time"].attrs = {"standard_name": "time", "axis": "T"}
    OUT.parent.mkdir(exist_ok=True)
    coarse.to_dataset().to_netcdf(OUT, encoding={"pr": {"zlib": True, "complevel": 4}})
    print(
        f"{OUT}: {coarse.sizes}, mean {float(coarse.mean()) * 86400:.2f} mm/day, "
        f"{np.isfinite(coarse.values).mean():.0%} finite"
    )


if __name__ == "__main__":
    main()
