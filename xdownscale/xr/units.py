"""Units of precipitation and temperature fields, read and converted with pint.

Units are parsed with the pint registry of cf-xarray, which understands CF/UDUNITS strings such as
``"kg m-2 s-1"`` and ``"mm d-1"`` as well as pint's own (``"mm/day"``). On top of that this module
knows the quirks of real climate files:

* ``"Kg/m^2/s"`` (capital K, as in NCEP reanalysis files) means ``kg m-2 s-1``;
* ``"Celsius"``, ``"degC"``, ``"deg_C"``, ``"degrees_Celsius"`` ... mean degrees Celsius; a bare ``"C"`` is
  refused because in UDUNITS it is the coulomb;
* a depth or amount without a time (``"mm"``, ``"kg m-2"``) on a *daily* time step is a daily total, i.e. a
  rate per day (E-OBS and VALUE files write daily precipitation as ``"mm"``). On any other time step the
  accumulation period is unknown and :class:`~xdownscale.errors.UnitError` asks for it (``units='mm/(6 h)'``);
* a water flux (``kg m-2 s-1``) and a depth rate (``mm s-1``, ``mm/day``) are converted through the density
  of liquid water, 1000 kg m-3: 1 kg m-2 s-1 = 1 mm s-1 = 86400 mm/day.

Every function takes ``units=`` to override a missing or wrong ``units`` attribute.

Examples
--------
>>> from xdownscale.datasets import synthetic_precipitation
>>> from xdownscale.xr.units import convert_units, quantity_kind
>>> pr = synthetic_precipitation(ny=4, nx=4, ntime=3, units="kg m-2 s-1")
>>> quantity_kind(pr)
'precipitation'
>>> convert_units(pr, "mm/day").attrs["units"]
'mm d-1'
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Literal

import cf_xarray.units  # noqa: F401  (teaches the registry CF strings such as "kg m-2 s-1")
import numpy as np
import pint
import xarray as xr
from cf_xarray.units import units as ureg

from ..errors import InputError, UnitError, XDownscaleWarning
from .cf import find_time

__all__ = [
    "WATER_DENSITY",
    "cf_names",
    "check_units_kind",
    "clip_negative",
    "convert_units",
    "format_units",
    "parse_units",
    "quantity_kind",
    "time_step_seconds",
]

Kind = Literal["precipitation", "temperature", "other"]
KINDS: tuple[str, ...] = ("precipitation", "temperature", "other")

#: Density of liquid water used between a water flux and a depth rate: 1000 kg m-3.
WATER_DENSITY = ureg.Quantity(1000.0, "kg m-3")

_EXAMPLE_VARIABLE = {"precipitation": "pr", "temperature": "tas"}
_KIND_WORDS = {
    "precipitation": "a precipitation rate",
    "temperature": "a temperature",
    "other": "neither a precipitation rate nor a temperature",
}

# Spellings of temperature units, compared after lower-casing and removing spaces.
_TEMPERATURE_ALIASES = {
    **dict.fromkeys(
        [
            "celsius",
            "degc",
            "deg_c",
            "degreec",
            "degree_c",
            "degreesc",
            "degrees_c",
            "degree_celsius",
            "degrees_celsius",
            "degcelsius",
            "°c",
        ],
        "degC",
    ),
    **dict.fromkeys(["k", "kelvin", "kelvins", "degk", "deg_k", "degree_k", "degrees_k"], "K"),
    **dict.fromkeys(["degf", "deg_f", "fahrenheit", "degree_fahrenheit", "degrees_fahrenheit", "°f"], "degF"),
}
# "per N <time unit>" written with a number, e.g. "mm/6h", "mm/(6 h)", "mm (6 h)-1", "mm per 6 hours".
_SCALED_TIME = re.compile(
    r"^(?P<amount>.+?)\s*(?:/|\bper\b)\s*\(?\s*(?P<n>\d+(?:\.\d+)?)\s*(?P<t>[A-Za-z]+)\s*\)?\s*$"
    r"|^(?P<amount2>.+?)\s+\(\s*(?P<n2>\d+(?:\.\d+)?)\s*(?P<t2>[A-Za-z]+)\s*\)\s*-1\s*$"
)
_DEPTH_RATE = ureg.Unit("mm/s").dimensionality
_WATER_FLUX = ureg.Unit("kg m-2 s-1").dimensionality
_TEMPERATURE = ureg.Unit("K").dimensionality
_LENGTH = ureg.Unit("mm").dimensionality
_MASS_PER_AREA = ureg.Unit("kg m-2").dimensionality
_DAY_SECONDS = 86400.0
#: lengths that are read as a depth of liquid water (precipitation); any other length (km, furlong,
#: mile, ...) is refused for precipitation
WATER_DEPTH_UNITS = ("millimeter", "centimeter", "meter", "inch")


def _label(da: xr.DataArray) -> str:
    return f"'{da.name}'" if da.name is not None else "the input"


def _scaled_time_unit(n: float, tunit: pint.Unit) -> pint.Unit:
    """A registry unit for ``n`` times a time unit (pint units cannot carry a factor)."""
    number = f"{n:g}".replace(".", "_")
    name = f"every_{number}_{tunit}"
    if name not in ureg:
        ureg.define(f"{name} = {n!r} * {tunit}")
    return ureg.Unit(name)


def _parse_string(text: str) -> pint.Unit:
    """Parse one units string, with the spellings of real files normalised. Raises pint errors."""
    s = text.strip()
    key = s.lower().replace(" ", "")
    if key in _TEMPERATURE_ALIASES:
        return ureg.Unit(_TEMPERATURE_ALIASES[key])
    if key == "c":
        raise ValueError("'C' is the coulomb in UDUNITS; write 'degC' for degrees Celsius")
    s = re.sub(r"\bKg\b", "kg", s)  # NCEP: "Kg/m^2/s"
    match = _SCALED_TIME.match(s)
    if match:
        amount = match.group("amount") or match.group("amount2")
        n = float(match.group("n") or match.group("n2"))
        tunit = ureg.Unit(match.group("t") or match.group("t2"))
        if tunit.dimensionality != ureg.Unit("s").dimensionality:
            raise ValueError(f"'{match.group('t') or match.group('t2')}' is not a time unit")
        per = tunit if n == 1.0 else _scaled_time_unit(n, tunit)
        return ureg.Unit(amount) / per
    unit = ureg.Unit(s)
    if "delta_degree_Celsius" in str(unit) or "delta_degree_Fahrenheit" in str(unit):
        # "deg C" parses as degree (angle) x delta_degC: never what a file means
        raise ValueError("ambiguous temperature spelling; write 'degC' or 'K'")
    return unit


def _is_amount(unit: pint.Unit) -> bool:
    return unit.dimensionality in (_LENGTH, _MASS_PER_AREA)


def time_step_seconds(da: xr.DataArray) -> float | None:
    """Median time step of ``da`` in seconds, or None when it has no time axis (or one step)."""
    tname = find_time(da, required=False)
    if tname is None or da.sizes[tname] < 2 or tname not in da.coords:
        return None
    values = da[tname].values
    if np.issubdtype(values.dtype, np.datetime64):
        steps = np.diff(values).astype("timedelta64[ns]").astype(np.float64) / 1e9
    elif np.issubdtype(values.dtype, np.number):  # not decoded: CF "days since 1950-01-01"
        since = str(da[tname].attrs.get("units", "")).split(" since ")[0].strip()
        try:
            seconds = float(ureg.Quantity(1.0, since).to("s").magnitude)
        except (pint.errors.PintError, ValueError, AttributeError):
            return None
        steps = np.diff(values.astype(np.float64)) * seconds
    else:  # cftime objects: differences are datetime.timedelta
        steps = np.array([d.total_seconds() for d in np.diff(values)], dtype=np.float64)
    return float(np.median(steps))


def _describe_step(seconds: float | None) -> str:
    if seconds is None:
        return "it has no time axis to tell the accumulation period"
    if seconds % 3600 == 0 and seconds < _DAY_SECONDS:
        return f"its time step is {seconds / 3600:g} h, not a day"
    return f"its time step is {seconds / _DAY_SECONDS:g} days, not one day"


def _per_day_if_daily(da: xr.DataArray, unit: pint.Unit, text: str) -> pint.Unit:
    """An amount ("mm", "kg m-2") on daily steps is a rate per day; elsewhere it is an error."""
    if not _is_amount(unit):
        return unit
    step = time_step_seconds(da)
    if step is not None and abs(step - _DAY_SECONDS) <= 60.0:
        return unit / ureg.day
    hours = None if step is None else step / 3600.0
    example = f"'{text}/({hours:g} h)'" if hours is not None and hours < 24 and hours > 0 else f"'{text}/day'"
    raise UnitError(
        f"{_label(da)} has units '{text}', an amount without a time: that is read as a daily total only on "
        f"a daily time step, and {_describe_step(step)}. Pass the accumulation period, e.g. "
        f"units={example} (or units='{text}/day' for daily totals), or convert the data to a rate first."
    )


def parse_units(da: xr.DataArray, units: str | pint.Unit | None = None) -> pint.Unit:
    """The units of ``da`` as a :class:`pint.Unit`.

    Parameters
    ----------
    da
        The data, with a ``units`` attribute unless ``units`` is given.
    units
        Override for a missing or wrong ``units`` attribute (e.g. ``"mm/day"``).

    Returns
    -------
    pint.Unit
        The units, with an amount on daily steps (``"mm"``) turned into a rate (``mm/day``).

    Raises
    ------
    UnitError
        The units are missing, cannot be understood, or are an amount (``"mm"``) that is not on daily
        time steps.

    Examples
    --------
    >>> import xarray as xr
    >>> parse_units(xr.DataArray([1.0], dims="x", name="pr", attrs={"units": "Kg/m^2/s"}))
    <Unit('kilogram / meter ** 2 / second')>
    """
    if isinstance(units, pint.Unit):
        return _per_day_if_daily(da, units, format_units(units))
    if units is None:
        text = da.attrs.get("units")
        if text is None or (isinstance(text, str) and not text.strip()):
            raise UnitError(
                f"{_label(da)} has no units attribute; pass units='mm/day' or set da.attrs['units']."
            )
        source = "has units"
    else:
        text = units
        source = "was given units="
    if not isinstance(text, str):
        raise UnitError(
            f"{_label(da)} {source} {text!r}, which is not a string; pass units='mm/day' (or the right "
            "units) or set da.attrs['units'] to a string."
        )
    try:
        unit = _parse_string(text)
    except (pint.errors.PintError, ValueError, TypeError, AttributeError) as err:
        hint = "pass units= with the right units" if units is None else "pass units= with valid units"
        raise UnitError(
            f"{_label(da)} {source} '{text}', which cannot be understood ({err}). Use a CF/UDUNITS string "
            f"such as 'mm/day', 'kg m-2 s-1', 'K' or 'degC': {hint}, or fix da.attrs['units']."
        ) from None
    return _per_day_if_daily(da, unit, text.strip())


def _lengths(unit: pint.Unit) -> list[str]:
    """Names of the length units in the numerator of ``unit`` ("mm d-1" -> ["millimeter"])."""
    names = []
    for name, power in unit._units.items():
        if isinstance(power, (int, float)) and power > 0 and ureg.Unit(name).dimensionality == _LENGTH:
            names.append(str(name))
    return names


def _is_water_depth(unit: pint.Unit) -> bool:
    """A depth rate or amount whose length is a water depth (mm, cm, m, inch), not e.g. furlongs."""
    if unit.dimensionality not in (_DEPTH_RATE, _LENGTH):
        return True
    names = _lengths(unit)
    return bool(names) and all(n in WATER_DEPTH_UNITS for n in names)


def _kind_of_unit(unit: pint.Unit) -> str:
    dims = unit.dimensionality
    if dims == _TEMPERATURE:
        return "temperature"
    if dims == _WATER_FLUX or (dims == _DEPTH_RATE and _is_water_depth(unit)):
        return "precipitation"
    return "other"


def quantity_kind(da: xr.DataArray, units: str | pint.Unit | None = None) -> Kind:
    """Whether ``da`` is a precipitation rate, a temperature, or something else, from its units.

    A depth or water flux per time (``mm/day``, ``kg m-2 s-1``) and a depth on daily steps (``mm``) are
    precipitation, unless the ``standard_name`` says it is a wind or current speed (``m s-1`` has the same
    dimensions).

    Raises
    ------
    UnitError
        As :func:`parse_units`.
    """
    return _kind_of(da, parse_units(da, units))


def _kind_of(da: xr.DataArray, unit: pint.Unit) -> Kind:
    kind = _kind_of_unit(unit)
    standard_name = str(da.attrs.get("standard_name", "")).lower()
    if kind == "precipitation" and any(w in standard_name for w in ("wind", "velocity", "speed", "current")):
        return "other"
    return kind  # type: ignore[return-value]


def format_units(unit: pint.Unit) -> str:
    """A clean CF/UDUNITS string for ``unit`` (``"mm d-1"``, ``"kg m-2 s-1"``, ``"degC"``, ``"K"``)."""
    text = f"{unit:cf}"
    text = text.replace("°C", "degC").replace("°F", "degF")
    # units defined for "per N hours" print as "every_6_hour-1": write them as "/(6 h)"
    return re.sub(
        r"\s*every_(\d+(?:_\d+)?)_(\w+?)-1",
        lambda m: f"/({m.group(1).replace('_', '.')} {format_units(ureg.Unit(m.group(2)))})",
        text,
    )


def _affine(src: pint.Unit, dst: pint.Unit) -> tuple[float, float]:
    """``(scale, offset)`` with ``dst_value = scale * src_value + offset``; raises DimensionalityError."""
    if src.dimensionality == _WATER_FLUX and dst.dimensionality == _DEPTH_RATE:
        return float((ureg.Quantity(1.0, src) / WATER_DENSITY).to(dst).magnitude), 0.0
    if src.dimensionality == _DEPTH_RATE and dst.dimensionality == _WATER_FLUX:
        return float((ureg.Quantity(1.0, src) * WATER_DENSITY).to(dst).magnitude), 0.0
    zero = float(ureg.Quantity(0.0, src).to(dst).magnitude)
    one = float(ureg.Quantity(1.0, src).to(dst).magnitude)
    return one - zero, zero


def convert_units(
    da: xr.DataArray, to: str | pint.Unit, *, units: str | pint.Unit | None = None
) -> xr.DataArray:
    """Convert ``da`` to the units ``to``.

    Precipitation converts between water fluxes and depth rates with a water density of 1000 kg m-3
    (1 kg m-2 s-1 = 86400 mm/day); temperatures convert with their offsets (273.15 K = 0 degC).

    Parameters
    ----------
    da
        The data. Its dtype is kept (float32 stays float32) and dask arrays stay lazy.
    to
        Target units, e.g. ``"mm/day"``, ``"kg m-2 s-1"``, ``"K"``, ``"degC"``. An amount (``"mm"``) means a
        daily total and needs daily time steps, as for the source units.
    units
        Override for a missing or wrong ``units`` attribute of ``da``.

    Returns
    -------
    xarray.DataArray
        The converted values, with ``attrs["units"]`` set to ``to`` written as a clean CF string
        (``"mm/day"`` becomes ``"mm d-1"``) and the other attributes kept.

    Raises
    ------
    UnitError
        The units of ``da`` are missing or unknown, ``to`` cannot be understood, or the two are not
        convertible (e.g. a temperature into a precipitation rate).

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> tas = xr.DataArray(np.array([273.15], "float32"), dims="x", name="tas", attrs={"units": "K"})
    >>> convert_units(tas, "degC").values
    array([0.], dtype=float32)
    """
    src = parse_units(da, units)
    try:
        dst_raw = to if isinstance(to, pint.Unit) else _parse_string(to)
    except (pint.errors.PintError, ValueError, TypeError, AttributeError) as err:
        raise UnitError(
            f"Cannot convert {_label(da)} to units {to!r}: they cannot be understood ({err}). Pass a "
            "CF/UDUNITS string such as 'mm/day', 'kg m-2 s-1', 'K' or 'degC'."
        ) from None
    dst = _per_day_if_daily(da, dst_raw, format_units(dst_raw)) if _is_amount(dst_raw) else dst_raw
    try:
        scale, offset = _affine(src, dst)
    except pint.errors.DimensionalityError:
        src_kind, dst_kind = _kind_of_unit(src), _kind_of_unit(dst)
        if dst_kind in _EXAMPLE_VARIABLE and src_kind != dst_kind:
            fix = (
                f"Pass the {dst_kind} variable (e.g. '{_EXAMPLE_VARIABLE[dst_kind]}') or convert to units "
                f"of {_KIND_WORDS[src_kind]}"
            )
        else:
            fix = "Convert to units of the same kind, or pass units= if the units attribute is wrong"
        shown = da.attrs.get("units") if units is None else units
        raise UnitError(
            f"Cannot convert {_label(da)} from units '{shown}' ({_KIND_WORDS[src_kind]}) to "
            f"'{to if isinstance(to, str) else format_units(to)}' ({_KIND_WORDS[dst_kind]}). {fix}."
        ) from None
    data: Any = da.data
    if scale != 1.0:
        data = data * scale
    if offset != 0.0:
        data = data + offset
    out = da.copy(data=data)
    out.attrs = {**da.attrs, "units": format_units(dst_raw)}
    return out


def check_units_kind(
    da: xr.DataArray,
    expected_kind: Kind,
    *,
    units: str | pint.Unit | None = None,
    model: str | None = None,
) -> pint.Unit:
    """Check that ``da`` holds the kind of quantity expected (by a model).

    Parameters
    ----------
    da
        The data.
    expected_kind
        ``"precipitation"``, ``"temperature"`` or ``"other"``.
    units
        Override for a missing or wrong ``units`` attribute.
    model
        Name of the model that expects it, for the message.

    Returns
    -------
    pint.Unit
        The parsed units of ``da``.

    Raises
    ------
    UnitError
        ``da`` is of another kind, e.g. "'tas' has units 'K' (a temperature); model 'cm-x' expects
        precipitation. Pass the precipitation variable (e.g. 'pr')."
    InputError
        ``expected_kind`` is not one of the kinds above.
    """
    if expected_kind not in KINDS:
        raise InputError(f"expected_kind={expected_kind!r} is not one of {', '.join(map(repr, KINDS))}.")
    unit = parse_units(da, units)
    if expected_kind == "precipitation" and not _is_water_depth(unit):
        shown = da.attrs.get("units") if units is None else units
        raise UnitError(
            f"{_label(da)} has units '{shown}', a length ({', '.join(_lengths(unit))}) that is not a depth "
            f"of water; {'model ' + repr(model) if model else 'the caller'} expects precipitation as a "
            "water depth per time (mm/day, m s-1) or a water flux (kg m-2 s-1). Pass units='mm/day' (or "
            "the right units) if the attribute is wrong, or convert the data."
        )
    kind = _kind_of(da, unit)
    if kind != expected_kind:
        shown = da.attrs.get("units") if units is None else units
        who = f"model '{model}'" if model else "the caller"
        fix = (
            f"Pass the {expected_kind} variable (e.g. '{_EXAMPLE_VARIABLE[expected_kind]}')"
            if expected_kind in _EXAMPLE_VARIABLE
            else "Pass a variable that is neither precipitation nor temperature"
        )
        article = "a temperature" if kind == "temperature" else _KIND_WORDS[kind]
        raise UnitError(
            f"{_label(da)} has units '{shown}' ({article}); {who} expects {expected_kind}. {fix}, or pass "
            "units= if the units attribute is wrong."
        )
    return unit


def _negative_message(label: str, units: str, count: int, minimum: float, where: str) -> str:
    return (
        f"{label} has {count} negative value{'s' if count != 1 else ''}{where} (lowest {minimum:.3g}"
        f"{' ' + str(units) if units else ''}); precipitation cannot be negative, so they are set to 0. "
        "Negative values usually come from interpolation or packing in the source data; clip them "
        "yourself (da.clip(min=0)) to silence this warning."
    )


def _clip_block(values: np.ndarray, label: str, units: str) -> np.ndarray:
    negative = values < 0
    count = int(negative.sum())
    if count:
        message = _negative_message(label, units, count, float(values[negative].min()), " in one dask chunk")
        warnings.warn(message, XDownscaleWarning, stacklevel=2)
        values = np.where(negative, 0, values).astype(values.dtype, copy=False)
    return values


def clip_negative(da: xr.DataArray) -> xr.DataArray:
    """Set negative precipitation to 0, warning how many values were negative.

    NaN stays NaN. NumPy input is counted at once; dask input stays lazy and warns, per chunk, when it
    is computed.

    Warns
    -----
    XDownscaleWarning
        Some values were negative; the message gives their number and the lowest value.

    Examples
    --------
    >>> import warnings, xarray as xr
    >>> pr = xr.DataArray([-0.5, 0.0, 2.0], dims="x", name="pr", attrs={"units": "mm/day"})
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     clip_negative(pr).values.tolist(), "1 negative value" in str(caught[0].message)
    ([0.0, 0.0, 2.0], True)
    """
    label, units = _label(da), str(da.attrs.get("units", ""))
    if da.chunks is not None:
        import dask.array as dsa

        data = dsa.map_blocks(
            _clip_block, da.data, label, units, dtype=da.dtype, token="xdownscale-clip-negative"
        )
        return da.copy(data=data)
    values = np.asarray(da.values)
    negative = values < 0
    count = int(negative.sum())
    if not count:
        return da
    warnings.warn(
        _negative_message(label, units, count, float(values[negative].min()), ""),
        XDownscaleWarning,
        stacklevel=3,
    )
    return da.copy(data=np.where(negative, 0, values).astype(values.dtype, copy=False))


#: CF standard names of precipitation and temperature, with the units class each one goes with
_STANDARD_NAMES: dict[str, str] = {
    "precipitation_flux": "water_flux",
    "convective_precipitation_flux": "water_flux",
    "stratiform_precipitation_flux": "water_flux",
    "lwe_precipitation_rate": "depth_rate",
    "lwe_convective_precipitation_rate": "depth_rate",
    "lwe_stratiform_precipitation_rate": "depth_rate",
    "precipitation_amount": "mass_amount",
    "lwe_thickness_of_precipitation_amount": "depth_amount",
    "air_temperature": "temperature",
}
_DEFAULT_NAME = {
    "water_flux": "precipitation_flux",
    "depth_rate": "lwe_precipitation_rate",
    "mass_amount": "precipitation_amount",
    "depth_amount": "lwe_thickness_of_precipitation_amount",
    "temperature": "air_temperature",
}


def _units_class(unit: pint.Unit) -> str | None:
    dims = unit.dimensionality
    if dims == _WATER_FLUX:
        return "water_flux"
    if dims == _DEPTH_RATE:
        return "depth_rate"
    if dims == _MASS_PER_AREA:
        return "mass_amount"
    if dims == _LENGTH:
        return "depth_amount"
    if dims == _TEMPERATURE:
        return "temperature"
    return None


def cf_names(da: xr.DataArray, kind: str) -> dict[str, str]:
    """CF ``standard_name`` and ``long_name`` for a field with the units and names of ``da``.

    The ``standard_name`` must go with the units: ``precipitation_flux`` for a water flux
    (kg m-2 s-1), ``lwe_precipitation_rate`` for a depth rate (mm/day, m s-1),
    ``lwe_thickness_of_precipitation_amount`` for a daily depth (mm), ``air_temperature`` for a
    temperature. The input's own ``standard_name`` is kept when it agrees with its units (or is not one
    this module knows); otherwise the one for its units replaces it. The input's ``long_name`` is kept;
    without one, the kind of quantity (``"precipitation"``) is used. Nothing is taken from a model's
    training data.

    Parameters
    ----------
    da
        The input field (its ``units``, ``standard_name`` and ``long_name`` attributes are read).
    kind
        ``"precipitation"``, ``"temperature"`` or ``"other"``.

    Returns
    -------
    dict
        ``standard_name`` (when one can be given) and ``long_name``.

    Examples
    --------
    >>> import xarray as xr
    >>> pr = xr.DataArray([1.0], dims="x", name="pr",
    ...                   attrs={"units": "kg m-2 s-1", "standard_name": "lwe_precipitation_rate"})
    >>> cf_names(pr, "precipitation")
    {'standard_name': 'precipitation_flux', 'long_name': 'precipitation'}
    """
    out: dict[str, str] = {}
    given = str(da.attrs.get("standard_name", "") or "")
    try:
        text = da.attrs.get("units")
        unit = _parse_string(text) if isinstance(text, str) and text.strip() else None
    except (pint.errors.PintError, ValueError, TypeError, AttributeError):
        unit = None
    units_class = _units_class(unit) if unit is not None else None
    if given and (given not in _STANDARD_NAMES or units_class in (None, _STANDARD_NAMES[given])):
        out["standard_name"] = given
    elif units_class is not None and kind in ("precipitation", "temperature"):
        out["standard_name"] = _DEFAULT_NAME[units_class]
    long_name = da.attrs.get("long_name")
    out["long_name"] = str(long_name) if long_name else (kind if kind != "other" else str(da.name or "field"))
    return out
