"""xdownscale.xr.units: parsing the units of real files, conversions with numeric oracles, errors."""

from __future__ import annotations

import numpy as np
import pint
import pytest
import xarray as xr
from _dask_helpers import raise_if_dask_computes

from xdownscale.datasets import synthetic_precipitation
from xdownscale.errors import InputError, MissingCoordinateError, UnitError, XDownscaleWarning
from xdownscale.xr.cf import find_grid, find_time
from xdownscale.xr.units import (
    cf_names,
    check_units_kind,
    clip_negative,
    convert_units,
    format_units,
    parse_units,
    quantity_kind,
)


def daily(values, units, name="pr", freq="D", calendar="standard", **attrs):
    values = np.asarray(values)
    time = xr.date_range("2000-01-01", periods=values.shape[0], freq=freq, calendar=calendar)
    attrs = {"units": units, **attrs} if units is not None else attrs
    return xr.DataArray(values, dims=("time",), coords={"time": time}, name=name, attrs=attrs)


# ---------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kg m-2 s-1", "kg/m^2/s"),
        ("Kg/m^2/s", "kg/m^2/s"),  # NCEP reanalysis spelling
        ("kg m**-2 s**-1", "kg/m^2/s"),
        ("mm/day", "mm/day"),
        ("mm d-1", "mm/day"),
        ("mm day-1", "mm/day"),
        ("mm s-1", "mm/s"),
        ("mm", "mm/day"),  # a daily total on a daily step
        ("K", "K"),
        ("degC", "degC"),
        ("Celsius", "degC"),
        ("deg_C", "degC"),
        ("degrees_Celsius", "degC"),
        ("deg C", "degC"),
        ("Kelvin", "K"),
    ],
)
def test_parse_units_accepts(text, expected):
    da = daily(np.ones(4), text)
    assert parse_units(da) == pint.Unit(expected) or parse_units(da) == parse_units(
        daily(np.ones(4), expected)
    )


def test_parse_units_override_and_pint_unit():
    da = daily(np.ones(4), "furlongs per fortnight (wrong)")
    assert str(parse_units(da, units="mm/day")) == "millimeter / day"
    no_units = daily(np.ones(4), None)
    assert str(parse_units(no_units, units="K")) == "kelvin"
    unit = parse_units(daily(np.ones(4), "kg m-2 s-1"))
    assert parse_units(no_units, units=unit) == unit


def test_parse_units_missing():
    with pytest.raises(
        UnitError, match=r"'pr' has no units attribute; pass units='mm/day' or set da.attrs\['units'\]"
    ):
        parse_units(daily(np.ones(3), None))
    with pytest.raises(UnitError, match="'pr' has no units attribute"):
        parse_units(daily(np.ones(3), "  "))
    # UnitError is an InputError and a ValueError
    with pytest.raises(ValueError, match="no units attribute"):
        parse_units(daily(np.ones(3), None))


def test_parse_units_unknown_names_the_string():
    with pytest.raises(UnitError, match=r"'pr' has units 'bananas/day', which cannot be understood.*units="):
        parse_units(daily(np.ones(3), "bananas/day"))
    with pytest.raises(UnitError, match=r"was given units= 'wibble'"):
        parse_units(daily(np.ones(3), "mm/day"), units="wibble")
    with pytest.raises(UnitError, match=r"has units 3.*not a string"):
        parse_units(daily(np.ones(3), 3))


def test_bare_c_is_refused_as_coulomb():
    with pytest.raises(UnitError, match=r"'tas' has units 'C'.*coulomb.*'degC'"):
        parse_units(daily(np.ones(3), "C", name="tas"))


@pytest.mark.parametrize("calendar", ["standard", "noleap", "360_day"])
def test_depth_on_daily_steps_is_a_daily_rate(calendar):
    da = daily(np.ones(5), "mm", calendar=calendar)
    assert parse_units(da) == parse_units(daily(np.ones(5), "mm/day"))
    assert quantity_kind(da) == "precipitation"
    amount = daily(np.ones(5), "kg m-2", calendar=calendar)
    assert quantity_kind(amount) == "precipitation"


def test_depth_on_daily_steps_with_gaps():
    # DJF-only files: the median step is one day even with the gaps between winters
    time = np.concatenate(
        [
            np.arange("2000-12-01", "2001-03-01", dtype="datetime64[D]"),
            np.arange("2001-12-01", "2002-03-01", dtype="datetime64[D]"),
        ]
    )
    da = xr.DataArray(
        np.ones(time.size), dims="time", coords={"time": time}, name="rr", attrs={"units": "mm"}
    )
    assert parse_units(da) == pint.Unit("mm/day")


def test_depth_on_undecoded_daily_time():
    time = ("time", [0.0, 1.0, 2.0], {"standard_name": "time", "units": "days since 2000-01-01"})
    da = xr.DataArray(np.ones(3), dims="time", coords={"time": time}, name="pr", attrs={"units": "mm"})
    assert parse_units(da) == pint.Unit("mm/day")
    hours = da.assign_coords(
        time=("time", [0.0, 6.0, 12.0], {"axis": "T", "units": "hours since 2000-01-01"})
    )
    with pytest.raises(UnitError, match="time step is 6 h"):
        parse_units(hours)


def test_depth_on_6_hourly_steps_needs_the_period():
    da = daily(np.ones(8), "mm", freq="6h")
    with pytest.raises(
        UnitError,
        match=r"'pr' has units 'mm'.*daily total only on a daily time step.*6 h.*units='mm/\(6 h\)'",
    ):
        parse_units(da)
    with pytest.raises(UnitError, match=r"daily time step"):
        convert_units(da, "mm/day")
    # passing the period fixes it: 6 mm per 6 h = 24 mm/day
    out = convert_units(da * 6.0, "mm/day", units="mm/6h")
    np.testing.assert_allclose(out.values, 24.0)
    np.testing.assert_allclose(convert_units(da, "mm/day", units="mm/(6 h)").values, 4.0)


def test_depth_without_time_axis():
    da = xr.DataArray(np.ones(3), dims="x", name="pr", attrs={"units": "mm"})
    with pytest.raises(UnitError, match=r"no time axis.*units='mm/day'"):
        parse_units(da)
    da_monthly = daily(np.ones(4), "mm", freq="MS")
    with pytest.raises(UnitError, match=r"time step is 3\d days, not one day"):
        parse_units(da_monthly)


@pytest.mark.parametrize(
    ("units", "kind"),
    [
        ("kg m-2 s-1", "precipitation"),
        ("mm/day", "precipitation"),
        ("mm", "precipitation"),
        ("K", "temperature"),
        ("degC", "temperature"),
        ("Pa", "other"),
        ("1", "other"),
    ],
)
def test_quantity_kind(units, kind):
    assert quantity_kind(daily(np.ones(3), units)) == kind


def test_quantity_kind_wind_is_not_precipitation():
    assert quantity_kind(daily(np.ones(3), "m s-1", name="ua", standard_name="eastward_wind")) == "other"
    assert quantity_kind(daily(np.ones(3), "m s-1", name="pr")) == "precipitation"


# ---------------------------------------------------------------- conversions
@pytest.mark.parametrize(
    ("src", "dst", "value", "expected"),
    [
        ("kg m-2 s-1", "mm/day", 1.0, 86400.0),
        ("Kg/m^2/s", "mm d-1", 1.0, 86400.0),
        ("mm/day", "kg m-2 s-1", 86400.0, 1.0),
        ("kg m-2 s-1", "mm s-1", 1.0, 1.0),
        ("mm s-1", "mm/day", 1.0, 86400.0),
        ("mm s-1", "kg m-2 s-1", 2.0, 2.0),
        ("mm", "mm/day", 3.0, 3.0),
        ("mm", "kg m-2 s-1", 86.4, 0.001),
        ("mm/day", "mm", 5.0, 5.0),
        ("m/day", "mm/day", 0.001, 1.0),
        ("K", "degC", 273.15, 0.0),
        ("degC", "K", 0.0, 273.15),
        ("Celsius", "K", -10.0, 263.15),
        ("degF", "degC", 212.0, 100.0),
    ],
)
def test_convert_units_oracles(src, dst, value, expected):
    out = convert_units(daily(np.full(3, value), src), dst)
    np.testing.assert_allclose(out.values, expected, rtol=1e-7, atol=1e-9)


def test_convert_units_attrs_and_clean_cf_strings():
    da = daily(np.ones(3), "Kg/m^2/s", long_name="precipitation", standard_name="precipitation_flux")
    out = convert_units(da, "mm/day")
    assert out.attrs == {
        "units": "mm d-1",
        "long_name": "precipitation",
        "standard_name": "precipitation_flux",
    }
    assert da.attrs["units"] == "Kg/m^2/s"  # input untouched
    assert convert_units(daily(np.ones(3), "K"), "degC").attrs["units"] == "degC"
    assert convert_units(daily(np.ones(3), "degC"), "Kelvin").attrs["units"] == "K"
    assert convert_units(daily(np.ones(3), "mm/day"), "kg/m^2/s").attrs["units"] == "kg m-2 s-1"
    assert convert_units(daily(np.ones(3), "mm/day"), "mm/6h").attrs["units"] == "mm/(6 h)"
    assert format_units(pint.Unit("mm/day")) == "mm d-1"
    xr.testing.assert_identical(out.time, da.time)
    assert out.name == "pr"


def test_convert_units_override_for_wrong_attribute():
    da = daily(np.full(3, 2.0), "mm/day")  # actually a flux
    np.testing.assert_allclose(convert_units(da, "mm/day", units="kg m-2 s-1").values, 2.0 * 86400)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_convert_units_keeps_dtype(dtype):
    da = daily(np.array([1.0, 2.0], dtype=dtype), "kg m-2 s-1")
    assert convert_units(da, "mm/day").dtype == np.dtype(dtype)
    tas = daily(np.array([273.15, 300.0], dtype=dtype), "K", name="tas")
    out = convert_units(tas, "degC")
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_allclose(out.values, [0.0, 26.85], atol=1e-4)


def test_convert_units_stays_lazy_on_dask():
    pr = synthetic_precipitation(ny=8, nx=8, ntime=6, units="kg m-2 s-1").chunk({"time": 2})
    with raise_if_dask_computes():
        out = convert_units(pr, "mm/day")
        check_units_kind(pr, "precipitation")
    assert out.chunks == pr.chunks and out.dtype == np.float32
    np.testing.assert_allclose(out.values, pr.values * 86400, rtol=1e-6)


def test_convert_incompatible_names_variable_units_target_and_fix():
    tas = daily(np.ones(3), "K", name="tas")
    with pytest.raises(
        UnitError,
        match=r"Cannot convert 'tas' from units 'K' \(a temperature\) to 'mm/day' \(a precipitation rate\)\. "
        r"Pass the precipitation variable \(e\.g\. 'pr'\)",
    ):
        convert_units(tas, "mm/day")
    with pytest.raises(UnitError, match=r"'pr' from units 'mm/day'.*to 'K' \(a temperature\).*e\.g\. 'tas'"):
        convert_units(daily(np.ones(3), "mm/day"), "K")
    with pytest.raises(UnitError, match=r"from units 'Pa'.*Convert to units of the same kind"):
        convert_units(daily(np.ones(3), "Pa", name="ps"), "hPa/s")
    with pytest.raises(UnitError, match=r"Cannot convert 'pr' to units 'parsecs/fortnightz'"):
        convert_units(daily(np.ones(3), "mm/day"), "parsecs/fortnightz")


# ---------------------------------------------------------------- check_units_kind
def test_check_units_kind_message():
    tas = daily(np.ones(3), "K", name="tas")
    with pytest.raises(
        UnitError,
        match=r"'tas' has units 'K' \(a temperature\); model 'cm-x' expects precipitation\. "
        r"Pass the precipitation variable \(e\.g\. 'pr'\)",
    ):
        check_units_kind(tas, "precipitation", model="cm-x")
    with pytest.raises(
        UnitError,
        match=r"'pr' has units 'mm/day' \(a precipitation rate\); the caller expects temperature\. "
        r"Pass the temperature variable \(e\.g\. 'tas'\)",
    ):
        check_units_kind(daily(np.ones(3), "mm/day"), "temperature")
    with pytest.raises(
        UnitError, match=r"'ps' has units 'Pa' \(neither a precipitation rate nor a temperature\)"
    ):
        check_units_kind(daily(np.ones(3), "Pa", name="ps"), "precipitation")
    with pytest.raises(InputError, match="expected_kind='rain' is not one of"):
        check_units_kind(tas, "rain")  # type: ignore[arg-type]


def test_check_units_kind_passes_and_returns_units():
    assert check_units_kind(daily(np.ones(3), "mm"), "precipitation") == pint.Unit("mm/day")
    assert check_units_kind(daily(np.ones(3), None), "temperature", units="degC") == pint.Unit("degC")
    with pytest.raises(UnitError, match="no units attribute"):
        check_units_kind(daily(np.ones(3), None), "precipitation")


# ---------------------------------------------------------------- real data
@pytest.mark.data
def test_every_iberia_file(iberia_dir):
    """Every file of ../shared/data/iberia: parse its units and convert to mm/day or K."""
    files = sorted(iberia_dir.glob("*.nc"))
    assert files
    seen = {}
    for path in files:
        with xr.open_dataset(path) as ds:
            (name,) = list(ds.data_vars)
            kind = quantity_kind(ds[name])  # on the full time axis: the step is found from it
            seen[path.name] = (ds[name].attrs["units"], kind)
            assert kind in ("precipitation", "temperature"), path.name
            target = "mm/day" if kind == "precipitation" else "K"
            out = convert_units(ds[name], target).isel(time=slice(0, 40)).load()
            assert out.dtype == np.float32
            assert out.attrs["units"] == ("mm d-1" if kind == "precipitation" else "K")
            values = out.values[np.isfinite(out.values)]
            if kind == "precipitation":
                assert values.min() >= -1e-3 and 0.1 < values.mean() < 30, path.name
            else:
                assert 230 < values.mean() < 300, path.name
            # gridded files have a grid; station files are refused by find_grid with a clear error
            if "station" in ds.dims:
                with pytest.raises(MissingCoordinateError, match="points"):
                    find_grid(ds[name])
            else:
                find_grid(ds[name])
            assert find_time(ds[name]) == "time"
    # the spellings these files use
    units = {u for u, _ in seen.values()}
    assert {"kg m-2 s-1", "Kg/m^2/s", "mm", "K", "Celsius", "degC"} <= units
    # a daily total read on a 6-hourly axis is refused with the fix
    with xr.open_dataset(iberia_dir / "eobs_0.5deg_rr_djf1983-2002.nc") as ds:
        rr = (
            ds["rr"]
            .isel(time=slice(0, 8))
            .assign_coords(time=xr.date_range("2000-01-01", periods=8, freq="6h"))
        )
        with pytest.raises(UnitError, match=r"'rr' has units 'mm'.*units='mm/\(6 h\)'"):
            convert_units(rr, "mm/day")


# -- water depths, negative values and CF names (issue 15) -----------------------------------------
@pytest.mark.parametrize("units", ["mm", "cm", "m", "mm/day", "m s-1", "in/day", "kg m-2", "kg m-2 s-1"])
def test_water_depths_and_fluxes_are_precipitation(units):
    check_units_kind(daily([1.0, 2.0], units), "precipitation", model="cm-x")


@pytest.mark.parametrize(("units", "length"), [("furlongs", "furlong"), ("km/day", "kilometer")])
def test_a_length_that_is_not_a_water_depth_is_refused(units, length):
    with pytest.raises(
        UnitError, match=rf"'pr' has units '{units}', a length \({length}\) that is not a depth of water"
    ):
        check_units_kind(daily([1.0, 2.0], units), "precipitation", model="cm-x")
    assert quantity_kind(daily([1.0, 2.0], units)) == "other"


def test_clip_negative_counts_eager_and_lazy():
    pr = daily([-1.0, 0.5, -2.0, np.nan], "mm/day")
    with pytest.warns(XDownscaleWarning, match=r"'pr' has 2 negative values \(lowest -2 mm/day\)"):
        out = clip_negative(pr)
    np.testing.assert_array_equal(out.values, [0.0, 0.5, 0.0, np.nan])
    assert clip_negative(daily([0.0, 1.0], "mm/day")).identical(daily([0.0, 1.0], "mm/day"))
    lazy = clip_negative(pr.chunk({"time": 2}))
    with pytest.warns(XDownscaleWarning, match="1 negative value in one dask chunk"):
        values = lazy.compute(scheduler="synchronous").values
    np.testing.assert_array_equal(values, [0.0, 0.5, 0.0, np.nan])


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ({"units": "kg m-2 s-1"}, "precipitation_flux"),
        ({"units": "kg m-2 s-1", "standard_name": "lwe_precipitation_rate"}, "precipitation_flux"),
        ({"units": "mm/day", "standard_name": "precipitation_flux"}, "lwe_precipitation_rate"),
        ({"units": "mm"}, "lwe_thickness_of_precipitation_amount"),
        (
            {"units": "Kg/m^2/s", "standard_name": "convective_precipitation_flux"},
            "convective_precipitation_flux",
        ),
        ({"units": "mm d-1", "standard_name": "my_own_name"}, "my_own_name"),
    ],
)
def test_cf_names_follow_the_units(attrs, expected):
    names = cf_names(daily([1.0, 2.0], **{"units": attrs.pop("units")}, **attrs), "precipitation")
    assert names["standard_name"] == expected


def test_cf_names_keep_the_inputs_long_name():
    pr = daily([1.0, 2.0], "mm/day", long_name="CNRM-CM5 precipitation")
    assert cf_names(pr, "precipitation")["long_name"] == "CNRM-CM5 precipitation"
    assert cf_names(daily([1.0, 2.0], "mm/day"), "precipitation") == {
        "standard_name": "lwe_precipitation_rate",
        "long_name": "precipitation",
    }
    assert (
        cf_names(daily([280.0, 281.0], "K", name="tas"), "temperature")["standard_name"] == "air_temperature"
    )
