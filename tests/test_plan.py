"""``xdownscale.plan``: a downscaling resolved once (model, QDM fit, scale) and applied to any period."""

from __future__ import annotations

import json

import dask
import numpy as np
import pytest
import xarray as xr
from _dask_helpers import CountingScheduler

import xdownscale
from xdownscale.errors import InputError


def _coarse(fine: xr.DataArray, factor: int = 4) -> xr.DataArray:
    """An ESM-like coarse field in flux units: block means of the fine synthetic field."""
    coarse = fine.fillna(float(fine.mean())).coarsen(lat=factor, lon=factor, boundary="trim").mean()
    coarse = coarse / 86400.0
    coarse.attrs = {"units": "kg m-2 s-1", "standard_name": "precipitation_flux"}
    coarse.name = "pr"
    for c in ("lat", "lon"):
        coarse[c].attrs = dict(fine[c].attrs)
    return coarse.astype("float32")


@pytest.fixture(scope="module")
def coarse(fine_data: xr.DataArray) -> xr.DataArray:
    return _coarse(fine_data)


def _future(hist: xr.DataArray, factor: float, years: int = 50) -> xr.DataArray:
    """``hist`` moved ``years`` later and scaled by ``factor`` (a wetter future)."""
    out = (hist * factor).assign_attrs(hist.attrs)
    out.name = hist.name
    return out.assign_coords(time=hist.time.values + np.timedelta64(365 * years, "D"))


def test_downscale_is_plan_then_apply(cm_model, coarse):
    x = coarse.isel(time=slice(0, 6))
    kw = dict(model=cm_model.path, scale="auto", qdm=True, members=2, seed=3, progress=False)
    direct = x.downscale.cm(**kw)
    p = xdownscale.plan(x, method="cm", **kw)
    assert isinstance(p, xdownscale.Plan) and p.scale_resolved
    via = p.apply(x)
    np.testing.assert_array_equal(direct.values, via.values)
    assert direct.attrs["downscale_scale_sigma"] == pytest.approx(float(p.scale.sigma))


def test_auto_scale_and_qdm_come_from_the_historical_period_for_every_period(cm_model, coarse):
    """The issue-11 failure: 'auto' picked another scale for a later period of the same ESM. With a hist,
    'auto' is resolved on the hist period, so every period gets its scale and QDM."""
    hist = coarse.isel(time=slice(0, 24))
    kw = dict(model=cm_model.path, qdm=True, hist=hist, scale="auto", progress=False)
    wet = _future(coarse.isel(time=slice(24, 48)), 3.0)
    dry = _future(coarse.isel(time=slice(24, 48)), 0.3, years=80)
    a, b = wet.downscale.cm(**kw), dry.downscale.cm(**kw)
    assert a.attrs["downscale_scale_sigma"] == b.attrs["downscale_scale_sigma"]
    on_hist = hist.downscale.select_scale(model=cm_model.path, qdm=True, hist=hist)
    assert a.attrs["downscale_scale_sigma"] == pytest.approx(on_hist.sigma)
    # select_scale answers what downscale uses, for any period
    assert wet.downscale.select_scale(model=cm_model.path, qdm=True, hist=hist) == on_hist
    # without a hist the scale is the input's own (and QDM is fitted on the input itself)
    own = wet.downscale.select_scale(model=cm_model.path, qdm=True)
    assert isinstance(own, xdownscale.Scale)


def test_a_future_period_keeps_its_climate_signal_through_the_plan(cm_model, coarse):
    """QDM's delta and preserve='mean' pass a +20% signal: plan on hist, apply to hist and to 1.2 x hist."""
    hist = coarse.isel(time=slice(0, 24))
    p = hist.downscale.plan(cm_model.path, qdm=True, scale="auto", progress=False)
    now = p.apply(hist)
    later = p.apply(_future(hist, 1.2))
    assert float(later.mean()) / float(now.mean()) == pytest.approx(1.2, rel=0.02)


def test_to_dict_is_a_stable_json_fingerprint(cm_model, coarse):
    x = coarse.isel(time=slice(0, 12))
    kw = dict(model=cm_model.path, method="cm", qdm=True, scale="auto", seed=1)
    d1 = xdownscale.plan(x, **kw).to_dict()
    d2 = xdownscale.plan(x.copy(deep=True), **kw).to_dict()
    assert d1 == d2
    assert json.loads(json.dumps(d1)) == d1
    assert d1["model"]["sha256"] == cm_model.sha256
    assert d1["qdm"]["kind"] == "*" and len(d1["qdm"]["sha256"]) == 64
    assert d1["scale"]["sigma"] > 0 and d1["preserve"] == "smooth-mean"  # the default with QDM
    assert xdownscale.plan(x, **{**kw, "seed": 2}).to_dict() != d1
    other = (x * 2.0).assign_attrs(x.attrs)
    assert xdownscale.plan(other, **kw).to_dict()["qdm"]["sha256"] != d1["qdm"]["sha256"]
    no_qdm = xdownscale.plan(x, **{**kw, "qdm": False}).to_dict()
    assert no_qdm["qdm"] is None


@pytest.mark.filterwarnings("ignore::xdownscale.errors.PerformanceWarning")
def test_lazy_plan_stays_lazy_until_computed(cm_model, coarse):
    x = coarse.isel(time=slice(0, 12))
    kw = dict(model=cm_model.path, method="cm", qdm=True, scale="auto", seed=0)
    eager = xdownscale.plan(x, **kw)
    counting = CountingScheduler()
    with dask.config.set(scheduler=counting):
        lazy = xdownscale.plan(x.chunk({"time": 4}), **kw)
        out = lazy.apply(x.chunk({"time": 4}))
        assert not counting.calls and not lazy.scale_resolved and out.chunks is not None
        assert "selected lazily" in out.attrs["downscale_scale"]
    done = lazy.compute()
    assert done.scale_resolved
    assert float(done.scale.sigma) == pytest.approx(float(eager.scale.sigma), rel=1e-5)
    assert lazy.to_dict()["scale"]["sigma"] == pytest.approx(eager.to_dict()["scale"]["sigma"], rel=1e-5)


def test_plan_refuses_an_ensemble_and_a_wrong_kind(cm_model, sde_model, coarse):
    ens = xr.concat([coarse, coarse], dim="realization")
    with pytest.raises(InputError, match="a plan belongs to one"):
        xdownscale.plan(ens, model=cm_model.path)
    p = xdownscale.plan(coarse.isel(time=slice(0, 4)), model=cm_model.path, scale="200 km")
    with pytest.raises(InputError, match="a plan belongs to one"):
        p.apply(ens)
    with pytest.raises(InputError, match="is a 'sde' model; method 'cm'"):
        xdownscale.plan(coarse, model=sde_model.path, method="cm")
    # the accessor picks the method from the model
    assert coarse.downscale.plan(sde_model.path, scale="200 km").method == "sde"


def test_select_scale_names_unknown_arguments(cm_model, coarse):
    with pytest.raises(InputError, match=r"unexpected arguments \['members'\]"):
        coarse.downscale.select_scale(model=cm_model.path, members=2)
