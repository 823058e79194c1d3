"""Long downscaling jobs that write incrementally and resume: the engine behind
``xdownscale downscale ... --out OUT.zarr``.

The output store is laid out once (all metadata, no data); then the input is streamed over blocks of
time steps, each block is computed (on a ``dask.distributed`` cluster when one is given) and written into
its zarr region, and the block's index is recorded in the store's attributes *after* its data is written.
``resume=True`` skips recorded blocks. Since every field's noise is keyed by (seed, time stamp, member),
a job that is killed and resumed produces exactly the store an uninterrupted job would.

A store is marked complete only when its last block is written: the attribute ``xdownscale_complete``
is False (and ``xdownscale_status`` says how many blocks are written and how to resume) until then.
:func:`check_complete` and :func:`open_input` refuse an incomplete store with a message that suggests
``--resume``, so a half-written (killed) job is never read as if it were finished.

The input is opened with each field in one chunk and ``block`` time steps per chunk; this is the
tool's own choice, so the job does not warn about it.

Before streaming, everything that needs the whole input is fixed once in a :class:`xdownscale.Plan`: a
QDM requested with ``qdm_hist`` is fitted on that period, and ``scale="auto"`` is resolved from a sample
of that period (of the whole input without ``qdm_hist``). The plan's fingerprint
(:meth:`xdownscale.Plan.to_dict`) is recorded in the store's attributes; a resumed job must match it.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import xarray as xr

from .errors import InputError, PerformanceWarning

__all__ = ["COMPLETE_ATTR", "STATUS_ATTR", "check_complete", "downscale_to_store", "open_input"]

PROGRESS_ATTR = "xdownscale_done_blocks"
JOB_ATTR = "xdownscale_job"
#: False while a store is being written, True once its last block is in
COMPLETE_ATTR = "xdownscale_complete"
#: a sentence for people who open the store: complete, or how many blocks are written and how to resume
STATUS_ATTR = "xdownscale_status"


def check_complete(path: str | Path) -> None:
    """Raise when ``path`` is a zarr store written by xdownscale that is not finished.

    Stores from other tools (no ``xdownscale_complete`` attribute) pass.

    Raises
    ------
    InputError
        The store's ``xdownscale_complete`` attribute is False: a job was stopped before its last block.
    """
    import zarr

    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:  # not a zarr group we can read: leave the error to the reader
        return
    if attrs.get(COMPLETE_ATTR, True) is False:
        progress = attrs.get(PROGRESS_ATTR)
        done = len(progress) if isinstance(progress, list) else 0
        raise InputError(
            f"{path} is an incomplete xdownscale output: {attrs.get(STATUS_ATTR, f'{done} blocks written')}. "
            "Finish it first: run the same 'xdownscale downscale ... --out' command again with --resume."
        )


def open_inputs(paths: Sequence[str | Path], variables: Sequence[str], *, chunks: int = 32) -> xr.Dataset:
    """Several variables (for a joint model) from the same files, each as :func:`open_input` gives it."""
    return xr.Dataset({v: open_input(paths, v, chunks=chunks) for v in variables})


def open_input(paths: Sequence[str | Path], variable: str, *, chunks: int = 32) -> xr.DataArray:
    """Open one or many netCDF/zarr files lazily and return ``variable`` chunked along time."""
    from .xr.cf import find_time

    files = [Path(p) for p in paths]
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise InputError(f"Input file(s) not found: {', '.join(missing)}.")
    if len(files) == 1 and (files[0].suffix == ".zarr" or files[0].is_dir()):
        check_complete(files[0])
        ds = xr.open_zarr(files[0])
    elif len(files) == 1:
        ds = xr.open_dataset(files[0], chunks={})
    else:
        ds = xr.open_mfdataset([str(p) for p in files], combine="by_coords", chunks={})
    if variable not in ds.data_vars:
        raise InputError(
            f"Variable '{variable}' is not in {', '.join(map(str, files))}; "
            f"it holds {sorted(map(str, ds.data_vars))}. "
            "Pass --variable with one of those."
        )
    da = ds[variable]
    time = find_time(da)
    from .xr.cf import find_grid

    grid = find_grid(da)
    # each field in one chunk, `chunks` time steps per chunk: what the pipeline needs
    return da.chunk({time: chunks, grid.ydim: -1, grid.xdim: -1})


def _first_variable(da: xr.DataArray | xr.Dataset) -> xr.DataArray:
    """The input itself, or a joint job's first variable (they share time and grid)."""
    return da[next(iter(da.data_vars))] if isinstance(da, xr.Dataset) else da


def _fingerprint(da: xr.DataArray | xr.Dataset, **config: Any) -> str:
    from .xr.cf import find_time

    first = _first_variable(da)
    time = find_time(first)
    t = first[time].values
    return json.dumps(
        {
            "shape": list(first.shape),
            "dims": list(map(str, first.dims)),
            "variables": sorted(map(str, da.data_vars)) if isinstance(da, xr.Dataset) else None,
            "first": str(t[0]),
            "last": str(t[-1]),
            **config,
        },
        sort_keys=True,
        default=str,
    )


def downscale_to_store(
    da: xr.DataArray | xr.Dataset,
    out: str | Path,
    *,
    model: Any,
    method: str = "cm",
    scale: Any = "auto",
    members: int = 1,
    seed: int = 0,
    steps: int | None = None,
    qdm_hist: slice | None = None,
    block: int = 32,
    resume: bool = False,
    scheduler: str | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> Path:
    """Downscale ``da`` into ``out`` (``.zarr``: incremental and resumable; ``.nc``: written at the end).

    Parameters
    ----------
    da
        Coarse input, lazily opened (see :func:`open_input`); for a joint model a Dataset of its
        variables (:func:`open_inputs`), downscaled together (:func:`xdownscale.downscale_dataset`).
    out
        Output path ending in ``.zarr`` or ``.nc``.
    scale, members, seed, steps, method
        As in :func:`xdownscale.downscale`.
    qdm_hist
        Period of ``da`` to fit quantile delta mapping on (against the model's training quantiles);
        None: no bias correction.
    block
        Time steps computed and written together.
    resume
        Continue a job whose store exists, skipping finished blocks. Without it an existing store is an
        error.
    scheduler
        Address of a ``dask.distributed`` scheduler (e.g. ``tcp://host:8786``); blocks are computed on
        the cluster, where each worker loads the model once from its file.

    Returns
    -------
    Path
        The output path.
    """
    from .api import plan
    from .xr.cf import find_time

    out = Path(out)
    if out.suffix not in (".zarr", ".nc"):
        raise InputError(f"--out {out}: expected a path ending in .zarr (resumable) or .nc (small jobs).")
    with warnings.catch_warnings():
        # the job chose time chunks of `block` steps itself; QDM's advice to rechunk does not apply
        warnings.filterwarnings(
            "ignore", message=".*QDM needs the whole time series", category=PerformanceWarning
        )
        time = str(find_time(_first_variable(da)))
        if qdm_hist is not None and da.sel({time: qdm_hist}).sizes[time] == 0:
            raise InputError(
                f"--qdm-hist {qdm_hist.start}/{qdm_hist.stop} selects no time step of the input."
            )
        if isinstance(da, xr.Dataset):
            joint_result, fingerprint = _joint_job(
                da,
                model=model,
                method=method,
                scale=scale,
                members=members,
                seed=seed,
                steps=steps,
                qdm_hist=qdm_hist,
                block=block,
                **kwargs,
            )
            return _write(joint_result, out, fingerprint, time, block, resume, scheduler, progress)
        # everything that needs the whole input, resolved once and computed: the QDM fit and the scale
        job = plan(
            da,
            model=model,
            method=method,
            scale=scale,
            members=members,
            seed=seed,
            steps=steps,
            qdm=qdm_hist is not None,
            hist=qdm_hist,
            progress=False,
            **kwargs,
        ).compute()
        fingerprint = _fingerprint(da, **job.to_dict(), qdm_hist=str(qdm_hist), block=block)
        result = job.apply(da)
    result.attrs["history"] = result.attrs.get("history", "").split("\n")[-1]
    return _write(result, out, fingerprint, time, block, resume, scheduler, progress)


def _joint_job(
    ds: xr.Dataset, *, model: Any, method: str, scale: Any, qdm_hist: slice | None, block: int, **kwargs: Any
) -> tuple[xr.Dataset, str]:
    """A joint model's job: each variable's QDM and scale resolved once (on the whole input), then the
    variables downscaled together; the fingerprint names every variable's plan."""
    from .api import plan
    from .joint import downscale_dataset, match_variables
    from .preparation import resolved_model

    joint = resolved_model(model)
    if method != "cm":
        raise InputError(
            f"--method {method}: a joint model of several variables is a consistency model (cm)."
        )
    if not joint.joint:
        raise InputError(
            f"Model '{joint.name}' downscales one variable; pass one --variable, or a joint model for "
            "several."
        )
    matched = match_variables(ds, joint)
    plans = {
        v: plan(
            ds[name],
            model=joint.for_variable(v),
            method="cm",
            scale=scale,
            qdm=qdm_hist is not None,
            hist=qdm_hist,
            progress=False,
            **kwargs,
        ).compute()
        for v, name in matched.items()
    }
    fingerprint = _fingerprint(
        ds, **{v: p.to_dict() for v, p in plans.items()}, qdm_hist=str(qdm_hist), block=block
    )
    result = downscale_dataset(
        ds,
        model=joint,
        variables=matched,
        scale={v: p.scale for v, p in plans.items()},
        qdm={v: (p.qdm if p.qdm is not None else False) for v, p in plans.items()},
        progress=False,
        **kwargs,
    )
    for var in result.data_vars.values():
        var.attrs["history"] = var.attrs.get("history", "").split("\n")[-1]
    return result, fingerprint


def _write(
    result: xr.DataArray | xr.Dataset,
    out: Path,
    fingerprint: str,
    time: str,
    block: int,
    resume: bool,
    scheduler: str | None,
    progress: bool,
) -> Path:
    if out.suffix == ".nc":
        if out.exists() and not resume:
            raise InputError(f"{out} exists. Remove it or pass --resume to keep it.")
        if out.exists():
            return out
        return _write_netcdf(result, out, scheduler, progress)
    return _write_zarr(
        result,
        out,
        fingerprint=fingerprint,
        time=time,
        block=block,
        resume=resume,
        scheduler=scheduler,
        progress=progress,
    )


def _client(scheduler: str | None) -> Any:
    if scheduler is None:
        return None
    from distributed import Client

    return Client(scheduler)


def _as_dataset(result: xr.DataArray | xr.Dataset) -> xr.Dataset:
    return (
        result if isinstance(result, xr.Dataset) else result.to_dataset(name=str(result.name or "downscaled"))
    )


def _write_netcdf(
    result: xr.DataArray | xr.Dataset, out: Path, scheduler: str | None, progress: bool
) -> Path:
    client = _client(scheduler)
    try:
        computed = client.compute(result).result() if client is not None else result.compute()
    finally:
        if client is not None:
            client.close()
    tmp = out.with_name(out.name + ".part")
    _as_dataset(computed).to_netcdf(tmp)
    os.replace(tmp, out)
    return out


def _write_zarr(
    result: xr.DataArray | xr.Dataset,
    out: Path,
    *,
    fingerprint: str,
    time: str,
    block: int,
    resume: bool,
    scheduler: str | None,
    progress: bool,
) -> Path:
    import zarr
    from tqdm.auto import tqdm

    ntime = result.sizes[time]
    starts = list(range(0, ntime, block))
    ds = _as_dataset(result.chunk({time: block}))
    for var in ds.variables.values():
        var.encoding.pop("chunks", None)
    done: set[int] = set()
    if out.exists():
        if not resume:
            raise InputError(
                f"{out} exists. Pass --resume to continue that job, or remove it to start again."
            )
        attrs = dict(zarr.open_group(str(out), mode="r").attrs)
        if attrs.get(JOB_ATTR) != fingerprint:
            raise InputError(
                f"{out} was written by a different job (other input, model or settings); "
                "--resume only continues "
                "the same job. Remove the store or choose another --out."
            )
        recorded = attrs.get(PROGRESS_ATTR)
        done = {int(i) for i in recorded} if isinstance(recorded, list) else set()
    else:
        tmp = out.with_name(out.name + ".part")
        if tmp.exists():
            shutil.rmtree(tmp)
        ds.attrs[JOB_ATTR] = fingerprint
        ds.attrs[PROGRESS_ATTR] = []
        ds.attrs[COMPLETE_ATTR] = False
        ds.attrs[STATUS_ATTR] = _status(0, len(starts))
        with warnings.catch_warnings():  # zarr v3 warns that consolidated metadata is not in its spec
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            ds.to_zarr(tmp, compute=False, mode="w")
        os.replace(tmp, out)
    todo = [i for i, _ in enumerate(starts) if i not in done]
    client = _client(scheduler)
    group = zarr.open_group(str(out), mode="r+")
    window = max(1, sum(client.nthreads().values())) if client is not None else 1
    try:
        with tqdm(
            total=len(starts),
            initial=len(starts) - len(todo),
            disable=not progress,
            desc="blocks",
            unit="block",
        ) as bar:
            for first in range(0, len(todo), window):
                batch = todo[first : first + window]
                pieces = [ds.isel({time: slice(starts[i], min(starts[i] + block, ntime))}) for i in batch]
                if client is not None:
                    computed = client.gather(client.compute(pieces))
                else:
                    computed = [p.compute() for p in pieces]
                for i, piece in zip(batch, computed, strict=False):
                    region = {time: slice(starts[i], min(starts[i] + block, ntime))}
                    piece = piece.drop_vars([v for v in piece.coords if time not in piece[v].dims])
                    piece.attrs = {}
                    piece.to_zarr(out, region=region, mode="r+")
                    done.add(i)
                    status: dict[str, Any] = {
                        PROGRESS_ATTR: sorted(done),
                        STATUS_ATTR: _status(len(done), len(starts)),
                    }
                    if len(done) == len(starts):
                        status[COMPLETE_ATTR] = True
                    _update_attrs(group, out, status)
                    bar.update(1)
    finally:
        if client is not None:
            client.close()
    if not todo:  # resumed a finished job: make sure it says so
        _update_attrs(group, out, {COMPLETE_ATTR: True, STATUS_ATTR: _status(len(starts), len(starts))})
    return out


def _update_attrs(group: Any, out: Path, attrs: dict[str, Any]) -> None:
    """Set store attributes and refresh the consolidated metadata that xr.open_zarr reads."""
    import zarr

    group.attrs.update(attrs)
    with warnings.catch_warnings():  # zarr v3 warns that consolidated metadata is not in its spec
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(out))


def _status(done: int, total: int) -> str:
    if done == total:
        return "complete"
    return (
        f"INCOMPLETE: {done} of {total} blocks written; run the same 'xdownscale downscale' command with "
        "--resume to finish"
    )


def parse_period(text: str | None) -> slice | None:
    """``"1983/2002"`` -> ``slice("1983", "2002")``; None stays None."""
    if text is None:
        return None
    parts = text.split("/")
    if len(parts) != 2 or not all(parts):
        raise InputError(f"Period {text!r}: expected START/END, e.g. 1983/2002 or 1983-12/2002-02.")
    return slice(parts[0], parts[1])
