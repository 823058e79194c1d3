"""``xdownscale demo``: downscale a coarse sample with a shipped model and show what came out.

Without ``--input``, the sample is the one shipped with the package (``xdownscale/data``): coarse
fields made by the project itself - drawn from the shipped consistency model and block-averaged to a
coarse, ESM-like grid (see ``weights/make_demo_sample.py``); no observation data is shipped.

Because the sample is a block average of the model's own fields, its spectrum follows the model's down
to the sample's resolution and falls below it after that: the two spectra do not cross, and
``scale="auto"`` would fall back to the sample's own resolution with a warning. On the shipped sample
the demo therefore uses that scale directly and says so in the summary.

Output: ``OUT/xdownscale-demo.nc`` and ``.png`` when ``OUT`` is an existing directory or ends with
``/`` (the default, ``xdownscale-demo/``, is created in the current directory); otherwise ``OUT`` is a
prefix (``OUT.nc``, ``OUT.png``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .errors import InputError, XDownscaleWarning

__all__ = ["DEFAULT_MODEL", "DEFAULT_OUT", "SAMPLE", "DemoResult", "demo_paths", "run_demo"]

DEFAULT_MODEL = "cm-eobs-iberia-0.25deg-pr"
SAMPLE = Path(__file__).parent / "data" / "demo_coarse_pr.nc"
#: the default output: a directory (created) in the current directory
DEFAULT_OUT = "xdownscale-demo/"
PLOT_UNITS = "mm/day"
_STEM = "xdownscale-demo"


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


def demo_paths(out: str | Path) -> tuple[Path, Path]:
    """The netCDF and PNG paths for ``--out``: inside ``out`` when it is an existing directory or ends
    with a path separator (created), else ``out`` is a prefix.

    Examples
    --------
    >>> demo_paths("runs/demo")
    (PosixPath('runs/demo.nc'), PosixPath('runs/demo.png'))
    >>> demo_paths("runs/")[1].name
    'xdownscale-demo.png'
    """
    text = str(out)
    path = Path(out)
    if path.is_dir() or text.endswith(("/", "\\")):
        stem = path / _STEM
    else:
        stem = path
    return stem.parent / f"{stem.name}.nc", stem.parent / f"{stem.name}.png"


def _load_input(path: str | Path | None, variable: str | None) -> xr.DataArray:
    if path is None:
        with xr.open_dataset(SAMPLE) as ds:
            return ds["pr"].load()
    path = Path(path)
    if not path.exists():
        raise InputError(f"--input {path}: file not found. Pass a netCDF file or a zarr store.")
    if path.suffix == ".zarr" or path.is_dir():
        from .batch import check_complete

        check_complete(path)
        ds = xr.open_zarr(path)
    else:
        ds = xr.open_dataset(path)
    names = sorted(map(str, ds.data_vars))
    if variable is None:
        if len(names) != 1:
            raise InputError(f"--input {path} holds the variables {names}; pass --variable with one of them.")
        variable = names[0]
    if variable not in ds.data_vars:
        raise InputError(f"--variable '{variable}' is not in {path}; it holds {names}. Pass one of those.")
    return ds[variable]


def _mm_day(da: xr.DataArray, units: str | None = None) -> xr.DataArray:
    from .xr.units import convert_units

    return convert_units(da, PLOT_UNITS, units=units)


def run_demo(
    input: str | Path | None = None,
    variable: str | None = None,
    *,
    model: str | Path = DEFAULT_MODEL,
    out: str | Path = DEFAULT_OUT,
    members: int = 4,
    days: int = 8,
    seed: int = 0,
    scale: Any = "auto",
    log: Callable[[str], None] | None = None,
) -> DemoResult:
    """Downscale the first ``days`` fields of the input into a ``members``-member ensemble, write a
    netCDF and a PNG (see :func:`demo_paths`) and return a summary.

    Parameters
    ----------
    input, variable
        A coarse file (netCDF or zarr) and its variable; None: the shipped sample.
    model
        Model name or path.
    out
        Directory (existing, or ending in ``/``) to write ``xdownscale-demo.nc``/``.png`` into, or a
        prefix.
    members, days, seed, scale
        Ensemble size, number of fields (from the start of the input), noise seed and scale.
    log
        Called with a line saying what will be downscaled before the (slow) work starts.

    Returns
    -------
    DemoResult
        Paths, counts, timing, the scale used and the summary text (model, input and output means in
        mm/day over the model's cells, scale, speed, files, notes).

    Raises
    ------
    InputError
        The input file or variable is missing, or an incomplete xdownscale store was given.
    """
    import matplotlib

    matplotlib.use("Agg")

    from .api import prepare
    from .models import resolve_model
    from .xr.cf import find_time

    loaded = resolve_model(model)
    source = _load_input(input, variable)
    time_dim = str(find_time(source))
    total = source.sizes[time_dim]
    coarse = source.isel({time_dim: slice(0, days)}).load()
    used = coarse.sizes[time_dim]
    what = "the shipped sample" if input is None else str(input)
    if used == total:
        days_line = f"all {total} days of {what}"
    else:
        days_line = f"the first {used} of {total} days of {what} (--days {total} for all)"
    if log is not None:
        log(f"Downscaling {days_line} into {members} members with {loaded.name} ...")

    prepared_in = prepare(coarse, model=loaded)
    scale_note = ""
    if input is None and isinstance(scale, str) and scale.strip().lower() == "auto":
        from .api import INPUT_WAVENUMBER_ATTR

        scale = float(prepared_in.attrs[INPUT_WAVENUMBER_ATTR])
        scale_note = (
            "the sample's own resolution (the sample is a block average of the model's fields, so its "
            "spectrum meets the model's only there)"
        )
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", XDownscaleWarning)
        fine = coarse.downscale.cm(
            model=loaded, scale=scale, members=members, seed=seed, member_dim=True, progress=False
        )
        fine = fine.compute()
    seconds = time.perf_counter() - started
    notes = list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, XDownscaleWarning)))
    for w in caught:  # warnings of other libraries reach the user unchanged
        if not issubclass(w.category, XDownscaleWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    netcdf, png = demo_paths(out)
    netcdf.parent.mkdir(parents=True, exist_ok=True)
    fine.to_dataset(name=str(fine.name or "downscaled")).to_netcdf(netcdf)

    mask = loaded.grid["mask"].astype(bool)
    fine_mm = _mm_day(fine)
    coarse_mm = _mm_day(coarse)
    on_grid_mm = _mm_day(prepare(coarse, model=loaded, transform=False), loaded.variable["units"])
    mean_in = float(on_grid_mm.where(mask).mean())
    mean_out = float(fine_mm.where(mask).mean())
    scale_text = str(fine.attrs.get("downscale_scale", scale))
    _figure(
        png,
        loaded,
        coarse_mm,
        fine_mm,
        prepared_in,
        time_dim=time_dim,
        members=members,
        scale_text=scale_text,
        wavenumber=fine.attrs.get("downscale_scale_wavenumber"),
    )

    nfields = fine.sizes[time_dim] * members
    change = f" ({(mean_out / mean_in - 1):+.0%})" if mean_in > 0 else ""
    summary = "\n".join(
        [
            f"model      {loaded.name} v{loaded.version} (sha256 {loaded.sha256[:12]}...)",
            f"input      {days_line}; {coarse.shape[-2]}x{coarse.shape[-1]} grid",
            f"output     {fine.sizes[time_dim]} days x {members} members on "
            f"{fine.shape[-2]}x{fine.shape[-1]}",
            f"mean       input {mean_in:.3g} -> output {mean_out:.3g} mm/day{change} "
            "(over the model's cells, input regridded to them)",
            f"scale      {scale_text}{': ' + scale_note if scale_note else ''}",
            f"speed      {nfields} fields in {seconds:.1f} s ({seconds / nfields * 1000:.0f} ms per field, "
            "whole pipeline, this machine)",
            f"written    {netcdf} and {png}",
            *[f"note       {n}" for n in notes],
        ]
    )
    return DemoResult(netcdf, png, fine.sizes[time_dim], members, seconds, scale_text, summary)


def _figure(
    png: Path,
    model: Any,
    coarse: xr.DataArray,
    fine: xr.DataArray,
    prepared_in: xr.DataArray,
    *,
    time_dim: str,
    members: int,
    scale_text: str,
    wavenumber: float | None,
) -> None:
    """Six panels: coarse input, two members, ensemble mean and spread (mm/day, land outline, sea grey),
    and the mean power spectra with the scale."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    from .xr.cf import find_grid
    from .xr.spectra import psd

    day = 0
    date = str(coarse[time_dim].values[day])[:10]
    mask = model.grid["mask"].astype(bool)
    grid = find_grid(model.grid)
    today = fine.isel({time_dim: day})
    vmax = float(np.nanpercentile(today.values, 99)) or 1.0
    spread = today.std("member").where(mask)
    smax = float(np.nanpercentile(spread.values, 99)) or 1.0
    panels = [
        (coarse.isel({time_dim: day}), "coarse input", "Blues", vmax, "precipitation (mm/day)"),
        (today.isel(member=0), "member 1", "Blues", vmax, "precipitation (mm/day)"),
        (today.isel(member=min(1, members - 1)), "member 2", "Blues", vmax, "precipitation (mm/day)"),
        (today.mean("member"), f"ensemble mean ({members} members)", "Blues", vmax, "precipitation (mm/day)"),
        (spread, "ensemble spread (standard deviation)", "YlOrRd", smax, "spread (mm/day)"),
    ]
    lat = np.asarray(model.grid[grid.lat].values, dtype=float)
    lon = np.asarray(model.grid[grid.lon].values, dtype=float)
    half_y = 0.5 * float(np.median(np.diff(lat))) if lat.size > 1 else 0.0
    half_x = 0.5 * float(np.median(np.diff(lon))) if lon.size > 1 else 0.0
    lat_mid = float(np.mean(lat))
    fig, axes = plt.subplots(2, 3, figsize=(14, 8.2), constrained_layout=True)
    for ax, (field, title, cmap, top, label) in zip(axes.flat[:5], panels, strict=True):
        mesh = field.plot.pcolormesh(ax=ax, cmap=cmap, vmin=0, vmax=top, add_colorbar=False)
        fig.colorbar(mesh, ax=ax, shrink=0.85, label=label, extend="max")
        ax.contour(
            model.grid[grid.lon].values,
            model.grid[grid.lat].values,
            mask.values.astype(float),
            levels=[0.5],
            colors="0.35",
            linewidths=0.7,
        )
        ax.set_facecolor("0.88")  # sea / no data: grey; dry land: white
        ax.set_xlim(lon.min() - half_x, lon.max() + half_x)  # the model's domain, also for a larger input
        ax.set_ylim(lat.min() - half_y, lat.max() + half_y)
        ax.set_aspect(1.0 / np.cos(np.deg2rad(lat_mid)))
        ax.set_title(title)
        ax.set_xlabel("longitude (degrees east)")
        ax.set_ylabel("latitude (degrees north)")

    ax = axes.flat[5]
    spec_in = psd(prepared_in).mean(time_dim)
    member_t = model.transform.forward(_in_model_units(fine, model))
    spec_members = psd(member_t.where(mask)).mean((time_dim, "member"))
    for spectrum, label, style in (
        (spec_in, "input on the model grid", "C1-"),
        (spec_members, "downscaled members", "C3-"),
        (model.target_psd, "training data, mean of all days (a climatology)", "k--"),
    ):
        ax.loglog(spectrum["wavenumber"], spectrum, style, label=label)
    if wavenumber is not None:
        ax.axvline(float(wavenumber), color="0.5", ls=":", label="scale k*")
    ticks = [0.02, 0.05, 0.1, 0.2, 0.5]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("wavenumber (cycles per grid cell)")
    ax.set_ylabel("power (transformed space)")
    spacing = model.target_psd.attrs.get("spacing_km")
    if spacing:

        def flip(x: Any) -> Any:  # wavenumber <-> wavelength in km; both directions are the same map
            return spacing / np.maximum(x, 1e-9)

        top = ax.secondary_xaxis("top", functions=(flip, flip))
        km_ticks = [1000, 500, 200, 100, 50]
        top.xaxis.set_major_locator(FixedLocator(km_ticks))
        top.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        top.xaxis.set_minor_locator(NullLocator())
        top.set_xlabel("wavelength (km)")
    ax.set_title("mean power spectra")
    ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(f"xdownscale demo: {model.name}, {date}, scale {scale_text}", fontsize=12)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _in_model_units(fine: xr.DataArray, model: Any) -> xr.DataArray:
    from .xr.units import convert_units

    return convert_units(fine, model.variable["units"])
