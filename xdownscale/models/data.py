"""Training data as xarray: files opened lazily, the variable selected, canonical units and layout,
periods, the validation split and the grid as a model card stores it.

Public helpers shared by the trainers (:mod:`~xdownscale.models.train`,
:mod:`~xdownscale.models.assimilation`) and usable on their own to check what a training run will see.
"""

from __future__ import annotations

import glob
import itertools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import xarray as xr

from ..errors import InputError

__all__ = [
    "CANONICAL_UNITS",
    "STANDARD_NAMES",
    "expand_paths",
    "frequency",
    "grid_card",
    "iso_date",
    "open_files",
    "parse_period",
    "prepare_field",
    "select_variable",
    "split_validation",
    "training_fields",
]

#: canonical units of the training fields per quantity kind
CANONICAL_UNITS = {"precipitation": "mm/day", "temperature": "K"}
#: CF standard names written to the cards per quantity kind
STANDARD_NAMES = {"precipitation": "lwe_precipitation_rate", "temperature": "air_temperature"}


def expand_paths(data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Paths of netCDF files or zarr stores from a path, a glob pattern or a list of them."""
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    paths: list[Path] = []
    for item in items:
        text = os.fspath(item)
        if any(c in text for c in "*?["):
            matches = sorted(glob.glob(text))
            if not matches:
                raise InputError(f"The pattern '{text}' matches no file.")
            paths += [Path(m) for m in matches]
        else:
            path = Path(text).expanduser()
            if not path.exists():
                raise InputError(f"Training data file '{text}' does not exist.")
            paths.append(path)
    if not paths:
        raise InputError("No training data given: pass a DataArray, a Dataset, or netCDF / zarr paths.")
    return paths


def _is_zarr(path: Path) -> bool:
    return path.suffix == ".zarr" or (
        path.is_dir() and any((path / f).exists() for f in (".zgroup", "zarr.json"))
    )


def open_files(paths: list[Path]) -> xr.Dataset:
    """One lazily opened Dataset from netCDF files or zarr stores (combined by their coordinates)."""
    zarr = [_is_zarr(p) for p in paths]
    if all(zarr):
        parts = [xr.open_zarr(p) for p in paths]
        if len(parts) == 1:
            return parts[0]
        return cast(xr.Dataset, xr.combine_by_coords(parts, combine_attrs="drop_conflicts"))
    if any(zarr):
        raise InputError("Pass either netCDF files or zarr stores as training data, not a mix of both.")
    try:
        return xr.open_mfdataset([str(p) for p in paths], combine="by_coords", combine_attrs="drop_conflicts")
    except ValueError as err:
        raise InputError(f"Cannot combine the training files {[p.name for p in paths]}: {err}") from err


def select_variable(data: Any, variable: str | None) -> tuple[xr.DataArray, str]:
    """The DataArray to train on and a short description of where it came from."""
    if isinstance(data, xr.DataArray):
        name = variable or (str(data.name) if data.name is not None else None)
        if name is None:
            raise InputError("The training DataArray has no name; pass variable='pr' (or its name).")
        return data.rename(name), f"DataArray '{name}'"
    if isinstance(data, xr.Dataset):
        ds, source = data, "Dataset"
    else:
        paths = expand_paths(data)
        ds, source = open_files(paths), ", ".join(p.name for p in paths)
    names = [str(v) for v in ds.data_vars]
    if variable is None:
        if len(names) != 1:
            raise InputError(
                f"The training data hold the variables {names}; pass variable= with the one to train on."
            )
        variable = names[0]
    if variable not in ds.data_vars:
        raise InputError(
            f"Variable '{variable}' is not in the training data ({source}); its variables are "
            f"{', '.join(map(repr, names)) or 'none'}. Pass variable= with one of them."
        )
    return ds[variable], source


def _sources(data: Any, names: list[str]) -> dict[str, tuple[Any, str]]:
    """Where each of several variables is read from: files are grouped by the variables they hold (so
    variables on different grids are never merged into one Dataset)."""
    if isinstance(data, (xr.DataArray, xr.Dataset)):
        return {name: (data, "DataArray" if isinstance(data, xr.DataArray) else "Dataset") for name in names}
    if (
        isinstance(data, (list, tuple))
        and data
        and all(isinstance(d, (xr.DataArray, xr.Dataset)) for d in data)
    ):
        # one xarray object per grid: each variable from the one that holds it
        held = {
            str(d.name) if isinstance(d, xr.DataArray) else str(v): d
            for d in data
            for v in ([d.name] if isinstance(d, xr.DataArray) else d.data_vars)
        }
        missing = [n for n in names if n not in held]
        if missing:
            raise InputError(
                f"Variable(s) {missing} are in none of the training data given; they hold {sorted(held)}."
            )
        return {name: (held[name], type(held[name]).__name__) for name in names}
    groups: dict[tuple[str, ...], list[Path]] = {}
    for path in expand_paths(data):
        opened = open_files([path])
        groups.setdefault(tuple(sorted(map(str, opened.data_vars))), []).append(path)
    found: dict[str, tuple[Any, str]] = {}
    for group, paths in groups.items():
        for name in set(group) & set(names):
            found[name] = (open_files(paths), ", ".join(p.name for p in paths))
    missing = [n for n in names if n not in found]
    if missing:
        every = sorted({v for group in groups for v in group})
        raise InputError(
            f"Variable(s) {missing} are in none of the training files; they hold {every}. Pass --variable "
            "(variable=) with names from these."
        )
    return found


def training_fields(
    data: Any, variable: str | Sequence[str] | None, units: str | Mapping[str, str] | None
) -> tuple[list[xr.DataArray], list[str], Any, str, xr.DataArray]:
    """The fields to train on, in canonical units and (time, y, x) layout: one variable, or several (a
    joint model) on the grid of the first, at the time steps they share.

    Returns (fields, their quantity kinds, the grid, a description of the source, the first raw field).
    A variable on another grid is regridded onto the first's: conservatively from a finer grid, bilinearly
    from a coarser one; a cell is kept where every variable has data.
    """
    from ..xr.cf import find_grid, grid_spacing_km
    from ..xr.regrid import regrid

    names = [variable] if variable is None or isinstance(variable, str) else [str(v) for v in variable]
    if len(set(names)) != len(names):
        raise InputError(f"variable={names}: each variable may be named once.")
    if len(names) == 1:
        raw, source = select_variable(data, names[0])
        u = units.get(str(raw.name)) if isinstance(units, Mapping) else units
        da, kind, grid = prepare_field(raw, u)
        return [da], [kind], grid, source, raw
    sources = _sources(data, [str(n) for n in names])
    fields, kinds, raws = [], [], []
    for name in names:
        raw, _ = select_variable(sources[str(name)][0], str(name))
        da, kind, grid = prepare_field(raw, units.get(str(name)) if isinstance(units, Mapping) else units)
        fields.append(da)
        kinds.append(kind)
        raws.append(raw)
    first, grid = fields[0], find_grid(fields[0])
    target = first.isel({first.dims[0]: 0}, drop=True).to_dataset(name="target")
    km = float(np.sqrt(np.prod(grid_spacing_km(first, grid))))
    for i, da in enumerate(fields[1:], start=1):
        g = find_grid(da)
        same = da.sizes[g.ydim] == first.sizes[grid.ydim] and da.sizes[g.xdim] == first.sizes[grid.xdim]
        same = same and all(
            np.allclose(da[a].values, first[b].values) for a, b in ((g.lat, grid.lat), (g.lon, grid.lon))
        )
        if not same:
            finer = float(np.sqrt(np.prod(grid_spacing_km(da, g)))) < km
            regridded = regrid(da, target, method="conservative" if finer else "bilinear")
            fields[i] = regridded.assign_attrs(da.attrs).rename(da.name)
    time = first.dims[0]
    fields = [f.rename({f.dims[0]: time}) for f in fields]
    aligned = xr.align(*fields, join="inner", exclude=[d for d in first.dims if d != time])
    if aligned[0].sizes[time] < 2:
        raise InputError(
            f"The variables {names} share {aligned[0].sizes[time]} time step(s); a joint model needs their "
            "common period. Pass data covering the same days."
        )
    shared = [f.copy(data=f.values) for f in aligned]
    source = "; ".join(dict.fromkeys(sources[str(n)][1] for n in names))
    return shared, kinds, grid, source, raws[0]


def prepare_field(da: xr.DataArray, units: str | None) -> tuple[xr.DataArray, str, Any]:
    """(time, y, x) layout in canonical units; returns (da, quantity kind, grid)."""
    from ..xr.cf import find_grid, find_time, require_float, standard_layout
    from ..xr.units import convert_units, quantity_kind

    time = find_time(da, required=True)
    grid = find_grid(da)
    extra = [d for d in da.dims if d not in (time, grid.ydim, grid.xdim)]
    for d in extra:
        if da.sizes[d] != 1:
            raise InputError(
                f"'{da.name}' has the dimension '{d}' of size {da.sizes[d]} besides time, "
                f"'{grid.ydim}' and '{grid.xdim}'; select one, e.g. da.isel({d}=0)."
            )
    da = da.isel({d: 0 for d in extra}, drop=True) if extra else da
    da = require_float(da)
    da = standard_layout(da, grid).transpose(time, grid.ydim, grid.xdim)
    if not da.indexes[time].is_monotonic_increasing:
        da = da.sortby(time)
    kind = quantity_kind(da, units)
    if kind in CANONICAL_UNITS:
        da = convert_units(da, CANONICAL_UNITS[kind], units=units)
    elif units is not None:
        da = da.assign_attrs(units=units)
    return da, kind, find_grid(da)


def parse_period(value: Any) -> slice:
    """A time period from a slice, a (start, stop) pair or a 'start/stop' string."""
    if isinstance(value, slice):
        return value
    if isinstance(value, str):
        if "/" not in value:
            return slice(value, value)
        start, stop = value.split("/", 1)
        return slice(start.strip() or None, stop.strip() or None)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return slice(*value)
    raise InputError(
        f"val_time={value!r} is not a time period; pass slice('1996-12', '1997-02'), "
        "('1996-12', '1997-02') or the string '1996-12/1997-02'."
    )


def iso_date(value: Any) -> str:
    """YYYY-MM-DD of a numpy or cftime date."""
    if isinstance(value, np.datetime64):
        return str(np.datetime_as_string(value, unit="D"))
    if hasattr(value, "isoformat"):
        return str(value.isoformat())[:10]
    return str(value)


def frequency(times: np.ndarray) -> str | None:
    """ "1D" for daily data, "6h" for 6-hourly ... (median time step), None if it cannot be told."""
    if len(times) < 2:
        return None
    try:
        steps = np.diff(xr.DataArray(times, dims="t").astype("datetime64[s]").values).astype(np.int64)
    except (TypeError, ValueError):
        try:
            steps = np.array([(b - a).total_seconds() for a, b in itertools.pairwise(times)])
        except (TypeError, AttributeError):
            return None
    seconds = float(np.median(steps))
    if seconds > 0 and seconds % 86400 == 0:
        return f"{int(seconds // 86400)}D"
    if seconds > 0 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    return None


def split_validation(
    da: xr.DataArray, val_time: Any, val_fraction: float
) -> tuple[xr.DataArray, xr.DataArray | None]:
    time = da.dims[0]
    n = da.sizes[time]
    val_da: xr.DataArray | None
    if val_time is not None:
        period = parse_period(val_time)
        try:
            selected = da[time].sel({time: period}).values
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(
                f"val_time={val_time!r} cannot select times of the training data: {err}"
            ) from err
        chosen = np.isin(da[time].values, selected)
        if not chosen.any():
            raise InputError(
                f"val_time={val_time!r} selects no time step; the data span "
                f"{iso_date(da[time].values[0])} to {iso_date(da[time].values[-1])}."
            )
        train_da, val_da = da.isel({time: np.flatnonzero(~chosen)}), da.isel({time: np.flatnonzero(chosen)})
    else:
        if not (0.0 <= float(val_fraction) < 1.0):
            raise InputError(f"val_fraction must be in [0, 1); got {val_fraction!r}.")
        n_val = math.ceil(n * float(val_fraction)) if val_fraction > 0 else 0
        train_da = da.isel({time: slice(0, n - n_val)})
        val_da = da.isel({time: slice(n - n_val, n)}) if n_val else None
    if train_da.sizes[time] < 2:
        raise InputError(
            f"Too few time steps to train: {n} in the data, {train_da.sizes[time]} left for training after "
            "the validation split. Pass more data, a smaller val_fraction or another val_time."
        )
    return train_da, val_da


def grid_card(da: xr.DataArray, grid: Any) -> dict[str, Any]:
    """The ``grid`` section of a model card: dims, shape, coordinates with attributes, spacing."""
    from ..xr.cf import grid_spacing_km

    defaults = {
        grid.lat: {"standard_name": "latitude", "units": "degrees_north"},
        grid.lon: {"standard_name": "longitude", "units": "degrees_east"},
    }
    names = [grid.lat, grid.lon] + [
        d for d in (grid.ydim, grid.xdim) if d in da.coords and d not in (grid.lat, grid.lon)
    ]
    coords = {}
    for name in names:
        c = da[name]
        attrs = {
            **defaults.get(name, {}),
            **{k: v for k, v in c.attrs.items() if isinstance(v, (str, int, float))},
        }
        coords[name] = {
            "dims": [str(d) for d in c.dims],
            "values": np.asarray(c.values, dtype=np.float64),
            "attrs": attrs,
        }
    return {
        "dims": [grid.ydim, grid.xdim],
        "shape": [int(da.sizes[grid.ydim]), int(da.sizes[grid.xdim])],
        "lat": grid.lat,
        "lon": grid.lon,
        "coords": coords,
        "periodic": bool(grid.periodic),
        "curvilinear": bool(grid.curvilinear),
        "spacing_km": list(grid_spacing_km(da, grid)),
    }
