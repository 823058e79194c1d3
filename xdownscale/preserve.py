"""Keep the input's large scales in downscaled DataArrays (the ``preserve=`` option of ``.downscale``).

The rules and the grids' side are in :mod:`xdownscale.xr.preserve`; the multiplicative rule's numerics
(torch, on the CPU or the network's accelerator) in :mod:`xdownscale.core.preserve`.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .core.preserve import preserve_means
from .errors import InputError
from .xr.cf import find_grid
from .xr.preserve import coarse_cell_operators

__all__ = ["preserve_large_scales"]


def preserve_large_scales(
    out: xr.DataArray,
    reference: xr.DataArray,
    *,
    rule: str,
    coarse: xr.DataArray | None = None,
    base: xr.DataArray | None = None,
    wavenumber: float | None = None,
    wet_min: float | None = None,
    coherent: bool = False,
    device: str | None = None,
) -> xr.DataArray:
    """Correct downscaled fields so that their large scales are those of ``reference``.

    Parameters
    ----------
    out
        Downscaled fields on the model grid, (time, [member,] lat, lon), physical units.
    reference
        The input on the model grid after regridding, low-pass and bias correction, (time, lat, lon),
        the same units.
    rule
        ``"mean"`` (multiplicative, exact means over ``coarse``'s cells) or ``"lowpass"`` (additive,
        low-pass at ``wavenumber``).
    coarse
        The input on its own grid, cut to the model's domain; needed for ``"mean"``. With the time
        dimension of ``out`` (the input's values, in ``out``'s units) each cell's mean becomes its value
        times the bias correction's relative change over the cell; without it only its grid is used and
        the means are ``reference``'s.
    base
        For ``"mean"`` with ``coarse`` values: ``reference`` before bias correction (None: no correction).
    wavenumber
        Cut-off in cycles per model grid cell; needed for ``"lowpass"``.
    wet_min
        For ``"mean"``: the dry threshold (see :func:`xdownscale.core.preserve.preserve_means`); values
        below it move onto the wet values of their coarse cell.
    coherent
        For ``"mean"`` with ``wet_min``: also let the rain recede from dry coarse cells and remove
        single wet cells among dry ones and single dry cells inside rain (for a model whose training
        data have few, :attr:`xdownscale.LogNormalize.coherent`; see
        :func:`xdownscale.core.preserve.preserve_means`).
    device
        For ``"mean"``: where the correction's arithmetic runs (``"cuda"``: on the GPU, the smooth field
        solved by conjugate gradients; None or ``"cpu"``: on the CPU, by banded solves).

    Returns
    -------
    DataArray
        Like ``out``, lazy when it is.
    """
    grid = find_grid(out)
    core = [grid.ydim, grid.xdim]
    reference = reference.transpose(..., *core)
    if rule == "mean":
        if coarse is None:
            raise InputError("preserve='mean' needs the coarse input's grid.")
        cell, smooth = coarse_cell_operators(out, coarse)
        values = _coarse_values(coarse, out)
        base = reference if base is None or values is None else base.transpose(..., *core)

        def flat(a: np.ndarray) -> np.ndarray:
            return a.reshape(*a.shape[:-2], -1)

        def apply(y: np.ndarray, p: np.ndarray, b: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
            fixed = preserve_means(
                flat(y), flat(p), cell, smooth, wet_min=wet_min,
                grid_shape=y.shape[-2:] if coherent else None,
                coarse=None if c is None else flat(c), base=flat(b), device=device,
            )  # fmt: skip
            return fixed.reshape(y.shape).astype(y.dtype)

        args = [out, reference, base] + ([] if values is None else [values])
        result = xr.apply_ufunc(
            apply,
            *args,
            input_core_dims=[core, core, core] + ([] if values is None else [list(_COARSE_DIMS)]),
            output_core_dims=[core],
            dask="parallelized",
            output_dtypes=[out.dtype],
            keep_attrs=True,
        )
        return result.transpose(*out.dims)
    if rule == "lowpass":
        if wavenumber is None:
            raise InputError("preserve='lowpass' needs the scale's wavenumber.")
        from .xr.spectra import lowpass

        diff = reference - out
        corrected = out + lowpass(diff.where(np.isfinite(diff), 0.0), float(wavenumber))
        return corrected.where(np.isfinite(out)).transpose(*out.dims)
    raise InputError(f"preserve rule {rule!r}: expected 'mean' or 'lowpass'.")


_COARSE_DIMS = ("_coarse_y", "_coarse_x")


def _coarse_values(coarse: xr.DataArray, out: xr.DataArray) -> xr.DataArray | None:
    """``coarse``'s values with its horizontal dims renamed apart from the model grid's and only its time
    coordinate (so that it lines up with ``out`` by time alone); None when it has no time dimension of
    ``out``'s."""
    from .xr.cf import find_time

    time = find_time(out, required=False)
    if time is None or time not in coarse.dims:
        return None
    grid = find_grid(coarse)
    data = coarse.transpose(time, grid.ydim, grid.xdim)
    if data.chunks is not None:
        data = data.chunk({grid.ydim: -1, grid.xdim: -1})
    return xr.DataArray(data.data, dims=(time, *_COARSE_DIMS), coords={time: coarse[time].variable}).astype(
        np.float64
    )
