"""Variable transforms between physical units and the space the generative models work in.

:class:`LogNormalize` is the transform of Hess et al. (2024, section 4.1, METHOD.md step 3):

* ``log=True`` (precipitation): ``x~ = log(x + eps) - log(eps)`` with ``eps`` in the data's units
  (default 1e-4), then ``y = 2 (x~ - lo) / (hi - lo) - 1`` with ``lo``/``hi`` the minimum and maximum
  of x~ over the training data, so training data lie in [-1, 1] (new data may fall outside).
* ``log=False`` (temperature and other unbounded variables): plain min-max scaling of x.

The inverse is exact (to float precision) for ``x >= 0``; in log mode its output is clipped at 0
so that no negative precipitation comes out of a sample with ``y < -1``. ``inverse(y, dry=True)``
also sets values below the training data's smallest positive value (``wet_min``; 0.1 mm/day for
E-OBS, which reports to 0.1 mm) to 0: the model never saw amounts between 0 and ``wet_min``, and
generated samples that land there are the near-zero tail of ``exp`` ("drizzle"), not rain.
Values in ``[-eps, 0)`` (round-off from regridding or bias correction) are treated as 0; values
below ``-eps`` are an error, since they usually mean wrong units or sign conventions.

The class works on numpy arrays, dask arrays and DataArrays (dims, coords and attrs kept; the
``units`` attribute becomes "1" in the transformed space and is restored by :meth:`inverse`), keeps
floating dtypes (computing in float64 inside), keeps NaN, never imports torch, and serialises to
JSON with :meth:`LogNormalize.to_dict` for model cards.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .core.transforms import (
    COHERENT_MAX,
    WET_TOLERANCE,
    check_eps,
    log_forward,
    log_inverse,
    minmax_forward,
    minmax_inverse,
    speck_counts,
)
from .errors import InputError, UnitError, XDownscaleWarning

__all__ = ["LogNormalize"]

_DIMENSIONLESS = ("", "1", "dimensionless")


def _is_xarray(x: Any) -> bool:
    return hasattr(x, "dims") and hasattr(x, "attrs") and hasattr(x, "variable")


def _is_dask(x: Any) -> bool:
    return hasattr(x, "dask") and hasattr(x, "map_blocks") and hasattr(x, "chunks")


def _label(x: Any) -> str:
    name = getattr(x, "name", None)
    return f"'{name}'" if isinstance(name, str) else "the data"


def _out_dtype(dtype: Any) -> np.dtype[Any]:
    dt = np.dtype(dtype)
    return dt if np.issubdtype(dt, np.floating) else np.dtype(np.float64)


def _same_units(a: str, b: str) -> bool | None:
    """True/False if pint can tell whether the two unit strings are the same; None if it cannot."""
    if a.strip() == b.strip():
        return True
    try:
        from cf_xarray.units import units as ureg

        one = ureg.Quantity(1.0, a).to(b).magnitude
        zero = ureg.Quantity(0.0, a).to(b).magnitude
    except Exception as err:
        if type(err).__name__ == "DimensionalityError":
            return False
        return None
    return bool(np.isclose(one, 1.0, rtol=1e-9) and np.isclose(zero, 0.0, atol=1e-12))


class LogNormalize:
    """Log transform (optional) and scaling to about [-1, 1], fitted on training data.

    Parameters
    ----------
    eps
        Offset of the log transform, in the data's units (> 0). The paper uses 1e-4 (mm/day).
    log
        True for precipitation-like, non-negative variables; False for plain min-max scaling.

    Attributes
    ----------
    lo, hi
        Minimum and maximum of the (log-transformed) training data; None before :meth:`fit`.
    units
        Units of the training data (``da.attrs["units"]`` or the ``units`` argument of :meth:`fit`).
    data_min, data_max
        Minimum and maximum of the training data in its own units.
    wet_min
        (log mode) Smallest positive value of the training data, its precision; None before
        :meth:`fit`, for ``log=False`` and for cards written before it was stored.
    specks
        (log mode) Share of the training data's wet cells (at least ``wet_min``) that are single wet
        cells among dry ones or single dry cells inside rain (:func:`xdownscale.core.transforms.
        speck_counts`; the last two dims are the grid); None for data of fewer than 2 dims or without
        wet cells, for ``log=False`` and for cards written before it was stored. See :attr:`coherent`.

    Examples
    --------
    >>> import numpy as np
    >>> t = LogNormalize(eps=1e-4).fit(np.array([0.0, 1.0, 10.0]))
    >>> y = t.forward(np.array([0.0, 10.0]))
    >>> y.tolist()
    [-1.0, 1.0]
    >>> t.inverse(y).round(9).tolist()
    [0.0, 10.0]
    """

    def __init__(self, eps: float = 1e-4, log: bool = True) -> None:
        self.eps = check_eps(eps)
        if not isinstance(log, (bool, np.bool_)):
            raise InputError(f"log must be True or False; got {log!r}.")
        self.log = bool(log)
        self.lo: float | None = None
        self.hi: float | None = None
        self.units: str | None = None
        self.data_min: float | None = None
        self.data_max: float | None = None
        self.wet_min: float | None = None
        self.specks: float | None = None

    # ------------------------------------------------------------------ fitting
    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`from_dict` with statistics) has been called."""
        return self.lo is not None and self.hi is not None

    @property
    def coherent(self) -> bool:
        """Whether the training data's rain areas are coherent at the grid's scale (:attr:`specks` at
        most :data:`~xdownscale.core.transforms.COHERENT_MAX`): then ``preserve`` lets a downscaled
        field's rain recede from the input's dry cells and removes single wet cells and dry holes as it
        puts its rain in recorded amounts."""
        return self.wet_min is not None and self.specks is not None and self.specks <= COHERENT_MAX

    def fit(self, data: Any, *, units: str | None = None) -> LogNormalize:
        """Store the statistics of the training ``data`` (NaN ignored) and return ``self``.

        Parameters
        ----------
        data
            numpy array, dask array or DataArray (lazy data is reduced with one dask compute, and
            for :attr:`specks` read once more in blocks of leading-axis slices).
        units
            Units of ``data``; defaults to ``data.attrs["units"]`` for DataArrays.

        Raises
        ------
        InputError
            No finite values, infinite values, constant data, or (log mode) values below ``-eps``.
        """
        if units is None and _is_xarray(data):
            units = data.attrs.get("units")
        mn, mx, wet = self._stats(data)
        if not (np.isfinite(mn) and np.isfinite(mx)):
            if np.isnan(mn) or np.isnan(mx):
                raise InputError(
                    f"Cannot fit the transform on {_label(data)}: it has no valid (non-NaN) values."
                )
            raise InputError(
                f"Cannot fit the transform on {_label(data)}: it contains infinite values (min {mn}, "
                f"max {mx}). Mask them first, e.g. da.where(np.isfinite(da))."
            )
        self._check_min(mn, data, units)
        if self.log:
            lo, hi = float(log_forward(np.array(mn), self.eps)), float(log_forward(np.array(mx), self.eps))
        else:
            lo, hi = float(mn), float(mx)
        if not hi > lo:
            raise InputError(
                f"Cannot fit the transform on {_label(data)}: the training data are constant "
                f"(min = max = {mn:g}), so there is no range to scale to [-1, 1]. Fit on more data."
            )
        self.lo, self.hi = lo, hi
        self.data_min, self.data_max = float(mn), float(mx)
        self.wet_min = float(wet) if self.log and np.isfinite(wet) else None
        self.specks = None if self.wet_min is None else _specks(data, self.wet_min)
        self.units = None if units is None else str(units)
        return self

    @staticmethod
    def _stats(data: Any) -> tuple[float, float, float]:
        """Minimum, maximum and smallest positive value (NaN if none) of ``data``, NaN ignored."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if _is_xarray(data):
                stats = (data.min(skipna=True), data.max(skipna=True), data.where(data > 0).min(skipna=True))
                if data.chunks is not None:
                    import dask

                    stats = dask.compute(*stats)
                mn, mx, wet = (float(s.values) for s in stats)
                return mn, mx, wet
            if _is_dask(data):
                import dask
                import dask.array as dska

                positive = dska.where(data > 0, data, np.nan)
                mn, mx, wet = dask.compute(dska.nanmin(data), dska.nanmax(data), dska.nanmin(positive))
                return float(mn), float(mx), float(wet)
            arr = np.asarray(data)
            if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
                raise InputError(f"Cannot fit the transform on data of dtype {arr.dtype}; expected numbers.")
            if arr.size == 0:
                return float("nan"), float("nan"), float("nan")
            positive = arr[arr > 0]
            wet = float(positive.min()) if positive.size else float("nan")
            return float(np.nanmin(arr)), float(np.nanmax(arr)), wet

    def _check_min(self, mn: float, data: Any, units: str | None = None) -> None:
        if self.log and np.isfinite(mn) and mn < -self.eps:
            units = units if units is not None else self.units
            units = f" {units}" if units else ""
            raise InputError(
                f"{_label(data)} has negative values down to {mn:g}{units}, below -eps = {-self.eps:g}: "
                "the log transform is for non-negative variables such as precipitation. Check the units "
                "and sign convention (e.g. a flux counted positive upwards), or use LogNormalize(log=False)."
            )

    def _require_fitted(self, what: str) -> tuple[float, float]:
        if self.lo is None or self.hi is None:
            raise InputError(
                f"LogNormalize.{what}() called before fit(): fit it on training data first, "
                "e.g. t = LogNormalize(eps=1e-4).fit(train_da), or load it with LogNormalize.from_dict(card)."
            )
        return self.lo, self.hi

    # ------------------------------------------------------------------ applying
    def _forward_array(self, x: np.ndarray) -> np.ndarray:
        lo, hi = self._require_fitted("forward")
        x = np.asarray(x)
        dtype = _out_dtype(x.dtype)
        if self.log:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mn = float(np.nanmin(x)) if x.size else float("nan")
            self._check_min(mn, x)
            xt = log_forward(x, self.eps)
        else:
            xt = np.asarray(x, dtype=np.float64)
        return minmax_forward(xt, lo, hi).astype(dtype, copy=False)

    def _inverse_array(self, y: np.ndarray, dry: bool = False) -> np.ndarray:
        lo, hi = self._require_fitted("inverse")
        y = np.asarray(y)
        dtype = _out_dtype(y.dtype)
        xt = minmax_inverse(y, lo, hi)
        x = log_inverse(xt, self.eps) if self.log else xt
        if dry and self.log and self.wet_min is not None:
            x = np.where(x < self.wet_min * (1.0 - WET_TOLERANCE), 0.0, x)
        return x.astype(dtype, copy=False)

    def _inverse_dry(self, y: np.ndarray) -> np.ndarray:
        return self._inverse_array(y, dry=True)

    def _apply(self, func: Callable[[np.ndarray], np.ndarray], x: Any, units: str | None) -> Any:
        if _is_xarray(x):
            import xarray as xr

            out = xr.apply_ufunc(
                func, x, dask="parallelized", output_dtypes=[_out_dtype(x.dtype)], keep_attrs=True
            )
            attrs = dict(x.attrs)
            if units is not None:
                attrs["units"] = units
            elif attrs.get("units") == "1":
                del attrs["units"]
            out.attrs = attrs
            return out
        if _is_dask(x):
            return x.map_blocks(func, dtype=_out_dtype(x.dtype))
        return func(np.asarray(x))

    def forward(self, x: Any) -> Any:
        """Transform ``x`` from physical units to the model space.

        Parameters
        ----------
        x
            numpy array, dask array (lazy; checks run at compute time) or DataArray (dims, coords
            and attrs kept; ``units`` becomes "1").

        Raises
        ------
        InputError
            Called before :meth:`fit`; (log mode) values below ``-eps``.
        UnitError
            ``x`` is a DataArray whose units differ from those of the training data.
        """
        self._require_fitted("forward")
        if _is_xarray(x):
            self._check_units(x)
            has_units = self.units is not None or "units" in x.attrs
            return self._apply(self._forward_array, x, "1" if has_units else None)
        return self._apply(self._forward_array, x, None)

    def inverse(self, y: Any, *, dry: bool = False) -> Any:
        """Transform ``y`` from the model space back to physical units (exact inverse of
        :meth:`forward` for ``x >= 0``; in log mode the output is clipped at 0).

        DataArrays get the training data's units back in ``attrs["units"]``.

        Parameters
        ----------
        y
            Values in the model space (numpy, dask or DataArray).
        dry
            (log mode) Set values below :attr:`wet_min` (the training data's smallest positive value)
            to 0, as for generated fields; leave False to invert a transformed input exactly. No effect
            for ``log=False`` or when ``wet_min`` is unknown.

        Raises
        ------
        InputError
            Called before :meth:`fit`.
        """
        self._require_fitted("inverse")
        return self._apply(self._inverse_dry if dry else self._inverse_array, y, self.units)

    def _check_units(self, x: Any) -> None:
        have = x.attrs.get("units")
        if self.units is None or have is None:
            return
        same = _same_units(str(have), self.units)
        if same is False:
            raise UnitError(
                f"{_label(x)} has units '{have}' but the transform was fitted on data in '{self.units}'. "
                f"Convert it first (e.g. with pint-xarray: da.pint.quantify().pint.to('{self.units}')) "
                "or set da.attrs['units'] if the attribute is wrong."
            )
        if same is None:
            warnings.warn(
                f"Cannot tell whether the units '{have}' of {_label(x)} are the units '{self.units}' the "
                "transform was fitted on; assuming they are.",
                XDownscaleWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description, for model cards (inverse: :meth:`from_dict`)."""
        return {
            "transform": "LogNormalize",
            "version": 1,
            "eps": self.eps,
            "log": self.log,
            "units": self.units,
            "lo": self.lo,
            "hi": self.hi,
            "data_min": self.data_min,
            "data_max": self.data_max,
            "wet_min": self.wet_min,
            "specks": self.specks,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | str) -> LogNormalize:
        """Rebuild a transform from :meth:`to_dict` output (or its JSON text).

        Raises
        ------
        InputError
            Not a LogNormalize description, unknown keys, or invalid values.
        """
        if isinstance(d, str):
            d = json.loads(d)
        if not isinstance(d, Mapping):
            raise InputError(f"LogNormalize.from_dict needs a mapping; got {type(d).__name__}.")
        if d.get("transform", "LogNormalize") != "LogNormalize":
            raise InputError(
                f"LogNormalize.from_dict got a description of transform {d.get('transform')!r}; "
                "expected 'LogNormalize'."
            )
        known = {
            "transform", "version", "eps", "log", "units", "lo", "hi", "data_min", "data_max", "wet_min",
            "specks",
        }  # fmt: skip
        unknown = set(d) - known
        if unknown:
            raise InputError(
                f"Unknown keys {sorted(unknown)} in a LogNormalize description; expected {sorted(known)}."
            )
        if "eps" not in d or "log" not in d:
            raise InputError("A LogNormalize description needs at least 'eps' and 'log'.")
        t = cls(eps=d["eps"], log=d["log"])
        lo, hi = d.get("lo"), d.get("hi")
        if (lo is None) != (hi is None):
            raise InputError(
                f"A LogNormalize description needs both 'lo' and 'hi' or neither; got lo={lo}, hi={hi}."
            )
        if lo is not None and hi is not None:
            lo, hi = float(lo), float(hi)
            if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
                raise InputError(f"A LogNormalize description needs finite lo < hi; got lo={lo}, hi={hi}.")
            t.lo, t.hi = lo, hi
        t.units = None if d.get("units") is None else str(d["units"])
        t.data_min = None if d.get("data_min") is None else float(d["data_min"])
        t.data_max = None if d.get("data_max") is None else float(d["data_max"])
        wet = d.get("wet_min")
        if wet is not None and not (np.isfinite(float(wet)) and float(wet) > 0):
            raise InputError(f"A LogNormalize description needs a positive 'wet_min' (or none); got {wet!r}.")
        t.wet_min = None if wet is None else float(wet)
        specks = d.get("specks")
        if specks is not None and not (0.0 <= float(specks) <= 1.0):
            raise InputError(
                f"A LogNormalize description needs 'specks' in [0, 1] (or none); got {specks!r}."
            )
        t.specks = None if specks is None else float(specks)
        return t

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LogNormalize) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        stats = f", lo={self.lo:.6g}, hi={self.hi:.6g}" if self.fitted else ", unfitted"
        units = f", units={self.units!r}" if self.units else ""
        return f"LogNormalize(eps={self.eps:g}, log={self.log}{units}{stats})"


#: values per block when counting specks in lazy training data
_SPECK_BLOCK = 20_000_000


def _specks(data: Any, wet_min: float) -> float | None:
    """:attr:`LogNormalize.specks` of ``data`` (None where no cell is wet or below 2 dims), lazy data a
    block of leading-axis slices at a time."""
    shape = getattr(data, "shape", None)
    if shape is None or len(shape) < 2:
        return None
    values = data.data if _is_xarray(data) else data
    if len(shape) == 2:  # one field
        values, shape = values[None], (1, *shape)
    step = max(1, _SPECK_BLOCK // max(1, int(np.prod(shape[1:]))))
    flagged = wet = 0
    for start in range(0, max(1, shape[0]), step):
        block = np.asarray(values[start : start + step])
        if not np.issubdtype(block.dtype, np.number):
            return None
        f, w = speck_counts(block, wet_min)
        flagged, wet = flagged + f, wet + w
    return flagged / wet if wet else None
