"""LogNormalize: the log transform and [-1, 1] scaling of Hess et al. (2024), and its numpy core."""

from __future__ import annotations

import json
import subprocess
import sys

import dask
import dask.array as dsa
import numpy as np
import pytest
import xarray as xr
from _dask_helpers import no_compute
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from xdownscale.core import transforms as core
from xdownscale.errors import InputError, UnitError, XDownscaleWarning
from xdownscale.transforms import LogNormalize


def precip(ntime: int = 4, seed: int = 0, units: str | None = "mm/day") -> xr.DataArray:
    rng = np.random.default_rng(seed)
    values = np.where(rng.random((ntime, 6, 8)) < 0.5, 0.0, rng.gamma(0.7, 5.0, (ntime, 6, 8))).astype(
        "float32"
    )
    values[:, 0, 0] = np.nan
    attrs = {"units": units, "long_name": "precipitation"} if units else {"long_name": "precipitation"}
    return xr.DataArray(
        values,
        dims=("time", "lat", "lon"),
        coords={"time": np.arange(ntime), "lat": np.linspace(35, 40, 6), "lon": np.linspace(-9, -2, 8)},
        name="pr",
        attrs=attrs,
    )


# ---------------------------------------------------------------------------------------------- core
def test_core_log_matches_the_paper_formula_and_is_precise_near_zero():
    x = np.array([0.0, 1e-12, 1e-4, 1.0, 250.0])
    eps = 1e-4
    np.testing.assert_allclose(core.log_forward(x, eps)[2:], np.log(x[2:] + eps) - np.log(eps), rtol=1e-12)
    assert core.log_forward(x, eps)[1] == pytest.approx(1e-8, rel=1e-9)  # log(x+eps)-log(eps) loses this
    np.testing.assert_allclose(core.log_inverse(core.log_forward(x, eps), eps), x, rtol=1e-13, atol=0)
    assert core.log_forward(np.array([-0.5e-4]), eps)[0] == 0.0  # round-off negatives count as dry
    assert np.isnan(core.log_forward(np.array([-1.0]), eps)[0])
    assert core.log_inverse(np.array([-3.0]), eps)[0] == 0.0  # clipped at 0


def test_core_minmax_round_trip():
    x = np.array([-3.0, 0.0, 7.0])
    y = core.minmax_forward(x, -3.0, 7.0)
    np.testing.assert_allclose(y, [-1.0, -0.4, 1.0])
    np.testing.assert_allclose(core.minmax_inverse(y, -3.0, 7.0), x)


@pytest.mark.parametrize("eps", [0.0, -1e-4, float("nan"), float("inf"), "abc", None])
def test_non_positive_eps_is_an_error(eps):
    with pytest.raises(InputError, match="eps must be a positive number in the data's units"):
        LogNormalize(eps=eps)


# ---------------------------------------------------------------------------------------------- numpy
@settings(max_examples=60, deadline=None)
@given(
    x=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
        elements=st.floats(0.0, 1e4, allow_nan=False, allow_subnormal=False),
    ),
    eps=st.sampled_from([1e-4, 1e-2, 1.0]),
)
def test_round_trip_on_random_non_negative_arrays(x, eps):
    t = LogNormalize(eps=eps).fit(np.concatenate([x.ravel(), [0.0, 1.0]]))
    y = t.forward(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert (y >= -1 - 1e-12).all() and (y <= 1 + 1e-12).all()
    np.testing.assert_allclose(t.inverse(y), x, rtol=1e-9, atol=1e-12 * eps)


@settings(max_examples=30, deadline=None)
@given(
    x=hnp.arrays(np.float64, st.integers(2, 20), elements=st.floats(-300.0, 300.0, allow_nan=False)),
)
def test_round_trip_without_log(x):
    t = LogNormalize(log=False).fit(np.concatenate([x, [-300.0, 300.0]]))
    np.testing.assert_allclose(t.inverse(t.forward(x)), x, rtol=1e-12, atol=1e-10)


def test_training_range_maps_to_minus_one_one_and_float32_is_kept():
    x = precip().values
    t = LogNormalize().fit(x)
    y = t.forward(x)
    assert y.dtype == np.float32
    assert np.nanmin(y) == -1.0 and np.nanmax(y) == pytest.approx(1.0, abs=1e-6)
    back = t.inverse(y)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-6)
    assert np.array_equal(np.isnan(back), np.isnan(x))
    assert t.lo == 0.0 and t.hi == pytest.approx(np.log1p(np.nanmax(x) / 1e-4))
    assert t.data_min == 0.0 and t.data_max == pytest.approx(float(np.nanmax(x)))


def test_inverse_clips_precipitation_at_zero_but_not_temperature():
    t = LogNormalize().fit(np.array([0.0, 10.0]))
    assert t.inverse(np.array([-1.5]))[0] == 0.0
    temp = LogNormalize(log=False).fit(np.array([250.0, 300.0]))
    assert temp.inverse(np.array([-1.5]))[0] == pytest.approx(237.5)


def test_wet_min_is_the_smallest_positive_training_value_and_dry_inverse_zeroes_below_it():
    x = np.array([[0.0, 0.3, np.nan], [0.1, 2.0, 0.0]])
    t = LogNormalize(eps=0.1).fit(x)
    assert t.wet_min == 0.1
    # the same from a DataArray and from lazy data
    assert LogNormalize(eps=0.1).fit(xr.DataArray(x)).wet_min == 0.1
    assert LogNormalize(eps=0.1).fit(dsa.from_array(x, chunks=(1, 2))).wet_min == 0.1
    # an exact inverse by default; dry=True sends what falls between 0 and wet_min to 0, keeps the rest
    amounts = np.array([0.0, 0.01, 0.0999, 0.1, 0.5, np.nan])
    y = t.forward(amounts)
    np.testing.assert_allclose(t.inverse(y), amounts, rtol=1e-9, atol=1e-12)
    dry = t.inverse(y, dry=True)
    np.testing.assert_allclose(dry, [0.0, 0.0, 0.0, 0.1, 0.5, np.nan], rtol=1e-9)
    lazy = t.inverse(xr.DataArray(y).chunk(3), dry=True)
    np.testing.assert_allclose(lazy.values, dry)
    # temperatures have none, and dry=True changes nothing for them
    temp = LogNormalize(log=False).fit(np.array([250.0, 300.0]))
    assert temp.wet_min is None
    assert temp.inverse(np.array([-1.0]), dry=True)[0] == 250.0


def test_tiny_negative_values_count_as_zero():
    t = LogNormalize(eps=1e-3).fit(np.array([-5e-4, 0.0, 2.0]))
    assert t.lo == 0.0 and t.data_min == -5e-4
    assert t.forward(np.array([-1e-3, 0.0]))[0] == t.forward(np.array([0.0]))[0]


def test_integer_input_gives_float64():
    t = LogNormalize().fit(np.array([0, 3, 9]))
    assert t.forward(np.array([0, 9])).dtype == np.float64


# ---------------------------------------------------------------------------------------------- xarray / dask
def test_dataarray_keeps_dims_coords_attrs_and_swaps_units():
    da = precip()
    t = LogNormalize().fit(da)
    assert t.units == "mm/day"
    y = t.forward(da)
    assert y.dims == da.dims and y.dtype == da.dtype and y.name == "pr"
    xr.testing.assert_identical(y.coords.to_dataset(), da.coords.to_dataset())
    assert y.attrs == {**da.attrs, "units": "1"}
    back = t.inverse(y)
    assert back.attrs == da.attrs
    xr.testing.assert_allclose(back, da, rtol=1e-5, atol=1e-6)
    # without units anywhere, none appear
    bare = precip(units=None)
    tb = LogNormalize().fit(bare)
    assert "units" not in tb.forward(bare).attrs and "units" not in tb.inverse(tb.forward(bare)).attrs


def test_dask_inputs_stay_lazy_and_match_numpy():
    da = precip(ntime=6)
    lazy = da.chunk({"time": 2})
    t = LogNormalize().fit(lazy)
    assert t == LogNormalize().fit(da)
    with dask.config.set(scheduler=no_compute):
        y = t.forward(lazy)
        back = t.inverse(y)
    assert isinstance(y.data, dsa.Array)
    xr.testing.assert_allclose(back.compute(), t.inverse(t.forward(da)))
    raw = dsa.from_array(da.values, chunks=(2, 6, 8))
    t2 = LogNormalize().fit(raw)
    assert t2.hi == t.hi
    np.testing.assert_allclose(t2.forward(raw).compute(), t.forward(da.values))


def test_units_are_checked_on_dataarrays():
    t = LogNormalize().fit(precip())
    same = precip().assign_attrs(units="mm d-1")
    t.forward(same)  # equivalent spelling is fine
    with pytest.raises(
        UnitError, match=r"'pr' has units 'kg m-2 s-1' but the transform was fitted on data in 'mm/day'"
    ):
        t.forward(precip().assign_attrs(units="kg m-2 s-1"))
    with pytest.warns(XDownscaleWarning, match="Cannot tell whether the units 'furlongs per moon'"):
        t.forward(precip().assign_attrs(units="furlongs per moon"))


# ---------------------------------------------------------------------------------------------- serialisation
def test_to_dict_from_dict_json_round_trip():
    t = LogNormalize(eps=1e-3).fit(precip())
    d = json.loads(json.dumps(t.to_dict()))
    again = LogNormalize.from_dict(d)
    assert again == t and again.units == "mm/day" and again.eps == 1e-3
    assert again.wet_min is not None and again.wet_min == t.wet_min
    np.testing.assert_array_equal(again.forward(precip().values), t.forward(precip().values))
    assert LogNormalize.from_dict(json.dumps(t.to_dict())) == t
    unfitted = LogNormalize.from_dict(LogNormalize(log=False).to_dict())
    assert not unfitted.fitted and unfitted.log is False
    assert "lo=" in repr(t) and "unfitted" in repr(unfitted)


def test_from_dict_errors():
    good = LogNormalize().fit(np.array([0.0, 1.0])).to_dict()
    with pytest.raises(InputError, match=r"Unknown keys \['scale'\] in a LogNormalize description"):
        LogNormalize.from_dict({**good, "scale": 2})
    with pytest.raises(InputError, match="description of transform 'QDM'; expected 'LogNormalize'"):
        LogNormalize.from_dict({**good, "transform": "QDM"})
    with pytest.raises(InputError, match="needs both 'lo' and 'hi' or neither"):
        LogNormalize.from_dict({**good, "hi": None})
    with pytest.raises(InputError, match=r"needs finite lo < hi; got lo=1.0, hi=0.0"):
        LogNormalize.from_dict({**good, "lo": 1.0, "hi": 0.0})
    with pytest.raises(InputError, match="needs at least 'eps' and 'log'"):
        LogNormalize.from_dict({"lo": 0.0, "hi": 1.0})
    with pytest.raises(InputError, match="needs a mapping; got int"):
        LogNormalize.from_dict(3)
    with pytest.raises(InputError, match=r"needs a positive 'wet_min' \(or none\); got -0.1"):
        LogNormalize.from_dict({**good, "wet_min": -0.1})
    # cards written before wet_min was stored load without it
    older = {k: v for k, v in good.items() if k != "wet_min"}
    assert LogNormalize.from_dict(older).wet_min is None
    with pytest.raises(InputError, match=r"needs 'specks' in \[0, 1\] \(or none\); got 1.5"):
        LogNormalize.from_dict({**good, "specks": 1.5})
    assert not LogNormalize.from_dict({k: v for k, v in good.items() if k != "specks"}).coherent


def test_speck_counts_on_a_hand_made_field():
    """A 5 x 5 field: a 3 x 3 rain area with a dry centre and a wet cell touching its corner. Specks:
    wet cells with at most 3/8 of their valid neighbours wet; holes: dry ones with at least 7/8."""
    x = np.zeros((5, 5))
    x[1:4, 1:4] = 2.0
    x[2, 2] = 0.0  # 8 of 8 neighbours wet: a hole
    x[4, 4] = 0.5  # 1 of its 3 neighbours wet: a speck
    x[0, 4] = 0.05  # drizzle: dry
    # the area's corners have 2 of 8 neighbours wet ((3, 3) has 3 with (4, 4)): specks
    assert core.speck_counts(x, 0.1) == (4 + 1 + 1, 9)
    x[2, 2] = 2.0  # no hole; corners now 3 of 8 (specks), (3, 3) 4 of 8 (not)
    assert core.speck_counts(x, 0.1) == (3 + 1, 10)
    x[0, :] = np.nan  # masked: (1, 1) and (1, 3) now have 3 of 5 valid neighbours wet
    assert core.speck_counts(x[None], 0.1) == (1 + 1, 10)


def test_specks_are_measured_at_fit_and_decide_coherent():
    """A smooth rain area (few specks) is coherent; the same area sprinkled with single wet cells is
    not; fewer than 2 dims or log=False: unknown."""
    yy, xx = np.mgrid[0:40, 0:60]
    blob = np.clip(3.0 - np.hypot(yy - 20, xx - 30) / 5.0, 0, None)
    smooth = np.stack([blob, np.roll(blob, 7, axis=1), np.zeros_like(blob)])
    t = LogNormalize(eps=1.0).fit(xr.DataArray(smooth, dims=("time", "lat", "lon")))
    assert t.specks is not None and t.specks < 0.03 and t.coherent
    rng = np.random.default_rng(0)
    speckled = np.where(rng.random(smooth.shape) < 0.05, 1.0, smooth)
    s = LogNormalize(eps=1.0).fit(speckled)
    assert s.specks > 0.1 and not s.coherent
    lazy = LogNormalize(eps=1.0).fit(dsa.from_array(speckled, chunks=(1, 20, 30)))
    assert lazy.specks == pytest.approx(s.specks)
    one = LogNormalize(eps=1.0).fit(speckled[1])  # a single field (rows, columns)
    assert one.specks == pytest.approx(LogNormalize(eps=1.0).fit(speckled[1:2]).specks)
    again = LogNormalize.from_dict(json.loads(json.dumps(t.to_dict())))
    assert again.specks == t.specks and again.coherent
    assert LogNormalize().fit(np.array([0.0, 1.0, 10.0])).specks is None
    assert LogNormalize(log=False).fit(smooth).specks is None and not LogNormalize(log=False).coherent


# ---------------------------------------------------------------------------------------------- errors
def test_forward_and_inverse_before_fit():
    t = LogNormalize()
    with pytest.raises(InputError, match=r"LogNormalize.forward\(\) called before fit\(\)"):
        t.forward(np.zeros(3))
    with pytest.raises(InputError, match=r"LogNormalize.inverse\(\) called before fit\(\)"):
        t.inverse(np.zeros(3))


def test_negative_precipitation_names_the_minimum_and_units():
    da = precip()
    da[1, 2, 3] = -2.5
    with pytest.raises(InputError, match=r"'pr' has negative values down to -2.5 mm/day.*Check the units"):
        LogNormalize().fit(da)
    t = LogNormalize().fit(precip())
    with pytest.raises(InputError, match=r"negative values down to -0.01"):
        t.forward(np.array([0.0, -0.01]))
    lazy = t.forward(da.chunk({"time": 1}))  # lazy data: the check runs at compute time
    with pytest.raises(InputError, match=r"negative values down to -2\.5"):
        lazy.compute()
    LogNormalize(log=False).fit(da)  # fine without the log


def test_fit_errors():
    with pytest.raises(InputError, match="no valid \\(non-NaN\\) values"):
        LogNormalize().fit(np.full(4, np.nan))
    with pytest.raises(InputError, match="contains infinite values"):
        LogNormalize().fit(np.array([0.0, np.inf]))
    with pytest.raises(InputError, match=r"training data are constant \(min = max = 2\)"):
        LogNormalize().fit(np.full(4, 2.0))
    with pytest.raises(InputError, match="expected numbers"):
        LogNormalize().fit(np.array(["a", "b"]))
    with pytest.raises(InputError, match="log must be True or False"):
        LogNormalize(log="yes")


def test_module_does_not_import_torch():
    code = "import sys, xdownscale.transforms; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
