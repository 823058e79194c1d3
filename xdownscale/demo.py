"""``xdownscale demo``: downscale a coarse sample with a shipped model and show what came out.

Without ``--input``, the sample is the one shipped with the package (``xdownscale/data``): coarse
fields made by the project itself - drawn from the shipped consistency model and block-averaged to a
coarse, ESM-like grid (see ``weights/make_demo_sample.py``); no observation data is shipped.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .errors import InputError, XDownscaleWarning

__all__ = ["DEFAULT_MODEL", "SAMPLE", "DemoResult", "run_demo"]

DEFAULT_MODEL = "cm-eobs-iberia-0.25deg-pr"
SAMPLE = Path(__file__).parent / "data" / "demo_coarse_pr.nc"


@dataclass
class DemoResult:
    """What the demo wrote and measured."""

    netcdf: Path
    png: Path
    fields: int
    members: int
    seconds: float
    scale: str
    summary: str


def _load_input(path: str | Path | None, variable: str | None) -> xr.DataArray:
    if path is None:
        ds = xr.open_dataset(SAMPLE)
        return ds["pr"].load()
    path = Path(path)
    if not path.exists():
        raise InputError(f"--input {path}: file not found.")
    ds = xr.open_zarr(path) if path.suffix == ".zarr" or path.is_dir() else xr.open_dataset(path)
    names = sorted(map(str, ds.data_vars))
    if variable is None:
        if len(names) != 1:
            raise InputError(f"{path} holds the variables {names}; pass --variable with one of them.")
        variable = names[0]
    if variable not in ds.data_vars:
        raise InputError(f"Variable '{variable}' is not in {path}; it holds {names}. Pass --variable.")
    return ds[variable].load()


def run_demo(
    input: str | Path | None = None,
    variable: str | None = None,
    *,
    model: str | Path = DEFAULT_MODEL,
    out: str | Path = "xdownscale-demo",
    members: int = 4,
    days: int = 8,
    seed: int = 0,
    scale: Any = "auto",
) -> DemoResult:
    """Downscale ``days`` fields of the input into a ``members``-member ensemble, write
    ``OUT.nc`` and ``OUT.png`` (coarse input, two members, ensemble mean and spread, spectra) and
    return a summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .api import _load, prepare
    from .xr.cf import find_time
    from .xr.spectra import psd

    loaded = _load(model)
    coarse = _load_input(input, variable)
    time_dim = find_time(coarse)
    coarse = coarse.isel({time_dim: slice(0, days)})
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", XDownscaleWarning)
        fine = coarse.downscale.cm(
            model=loaded, scale=scale, members=members, seed=seed, member_dim=True, progress=False
        )
        fine = fine.compute()
    seconds = time.perf_counter() - started
    notes = [str(w.message) for w in caught if issubclass(w.category, XDownscaleWarning)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    netcdf = out.with_suffix(".nc")
    png = out.with_suffix(".png")
    fine.to_dataset(name=str(fine.name or "downscaled")).to_netcdf(netcdf)

    # spectra in the model's transformed space: input on the model grid, members, model target
    prepared_in = prepare(coarse, model=loaded)
    member_t = loaded.transform.forward(_in_model_units(fine, loaded))
    spec_in = psd(prepared_in).mean(time_dim)
    spec_members = psd(member_t.where(loaded.grid["mask"])).mean((time_dim, "member"))
    target = loaded.target_psd

    units = fine.attrs.get("units", "")
    day = 0
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5), constrained_layout=True)
    vmax = float(np.nanpercentile(fine.isel({time_dim: day}).values, 99)) or 1.0
    panels = [
        (coarse.isel({time_dim: day}), "coarse input"),
        (fine.isel({time_dim: day, "member": 0}), "member 1"),
        (fine.isel({time_dim: day, "member": min(1, members - 1)}), "member 2"),
        (fine.isel({time_dim: day}).mean("member"), f"ensemble mean ({members} members)"),
        (fine.isel({time_dim: day}).std("member"), "ensemble spread (std)"),
    ]
    for ax, (field, title) in zip(axes.flat[:5], panels, strict=True):
        cmap = "magma" if "spread" in title else "Blues"
        mesh = field.plot(
            ax=ax, cmap=cmap, vmin=0, vmax=vmax if "spread" not in title else None, add_colorbar=False
        )
        fig.colorbar(mesh, ax=ax, shrink=0.8, label=units)
        ax.set_title(f"{title}\n{str(coarse[time_dim].values[day])[:10]}")
        ax.set_xlabel("longitude")
        ax.set_ylabel("latitude")
    ax = axes.flat[5]
    for spectrum, label, style in (
        (spec_in, "input on model grid", "C1-"),
        (spec_members, "members", "C3-"),
        (target, "model target (training data)", "k--"),
    ):
        ax.loglog(spectrum["wavenumber"], spectrum, style, label=label)
    if "downscale_scale_wavenumber" in fine.attrs:
        ax.axvline(fine.attrs["downscale_scale_wavenumber"], color="0.5", ls=":", label="scale k*")
    ax.set_xlabel("wavenumber (cycles per grid cell)")
    ax.set_ylabel("PSD (transformed space)")
    ax.set_title("mean power spectra")
    ax.legend(fontsize=8)
    fig.suptitle(f"xdownscale demo: {loaded.name} - scale {fine.attrs.get('downscale_scale', scale)}")
    fig.savefig(png, dpi=110)
    plt.close(fig)

    nfields = fine.sizes[time_dim] * members
    mean_in = float(coarse.mean())
    mean_out = float(fine.mean())
    summary = "\n".join(
        [
            f"model      {loaded.name} v{loaded.version} (sha256 {loaded.sha256[:12]}...)",
            f"input      {coarse.sizes[time_dim]} fields on a {coarse.shape[-2]}x{coarse.shape[-1]} grid, "
            f"mean {mean_in:.4g} {coarse.attrs.get('units', '')}",
            f"output     {fine.sizes[time_dim]} x {members} members on {fine.shape[-2]}x{fine.shape[-1]}, "
            f"mean {mean_out:.4g} {units}",
            f"scale      {fine.attrs.get('downscale_scale', scale)}",
            f"speed      {nfields} fields in {seconds:.1f} s ({seconds / nfields * 1000:.0f} ms per field, "
            "whole pipeline, this machine)",
            f"written    {netcdf} and {png}",
            *[f"note       {n}" for n in notes],
        ]
    )
    return DemoResult(
        netcdf,
        png,
        fine.sizes[time_dim],
        members,
        seconds,
        str(fine.attrs.get("downscale_scale", scale)),
        summary,
    )


def _in_model_units(fine: xr.DataArray, model: Any) -> xr.DataArray:
    from .xr.units import convert_units

    return convert_units(fine, model.variable["units"])
