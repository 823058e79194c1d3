"""Opt-in: every file of ../shared/data/iberia loads, has its units understood, regrids onto the E-OBS
0.25 deg grid and can be QDM-adjusted against E-OBS (station files: a clear error instead of regridding)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import xdownscale
from xdownscale.errors import MissingCoordinateError
from xdownscale.xr.units import convert_units, quantity_kind

pytestmark = pytest.mark.data

HIST = slice("1990-12-01", "1997-02-28")


def _variable(ds: xr.Dataset) -> xr.DataArray:
    (name,) = list(ds.data_vars)
    return ds[name]


@pytest.fixture(scope="module")
def eobs(iberia_dir):
    tp = xr.open_dataset(iberia_dir / "eobs_0.25deg_tp_djf1991-2000.nc")["tp"].load()
    return convert_units(tp, "mm/day")


@pytest.fixture(scope="module")
def eobs_tg(iberia_dir, eobs):
    tg = xr.open_dataset(iberia_dir / "eobs_0.5deg_tg_djf1983-2002.nc")["tg"].load()
    return xdownscale.regrid(convert_units(tg, "K"), eobs, method="bilinear")


def _files(iberia_dir):
    return sorted(iberia_dir.glob("*.nc"))


def test_every_file_loads_converts_regrids_and_bias_corrects(iberia_dir, eobs, eobs_tg):
    land = eobs.isel(time=0).notnull()
    interior = land.isel(lat=slice(4, -4), lon=slice(4, -4))
    checked = 0
    for path in _files(iberia_dir):
        da = _variable(xr.open_dataset(path)).load()
        kind = quantity_kind(da)
        assert kind in ("precipitation", "temperature"), (path.name, kind)
        physical = convert_units(da, "mm/day" if kind == "precipitation" else "K")
        if "station" in da.dims:
            with pytest.raises(MissingCoordinateError, match="points"):
                xdownscale.regrid(physical, eobs)
            continue
        fine = xdownscale.regrid(physical, eobs, method="bilinear")
        inner = fine.isel(time=0, lat=slice(4, -4), lon=slice(4, -4))
        # inputs with their own sea mask (E-OBS 0.5 deg) leave some coastal cells NaN (the NaN rule)
        assert np.isfinite(inner.where(interior).values[interior.values]).mean() > 0.9, path.name
        # bilinear does not extrapolate: land cells beyond the input's outermost centres are NaN
        valid = land & fine.isel(time=0).notnull()
        ref = eobs if kind == "precipitation" else eobs_tg
        valid = valid & ref.isel(time=0).notnull()
        ref = eobs if kind == "precipitation" else eobs_tg
        ref_hist = ref.sel(time=HIST)
        hist = fine.sel(time=HIST)
        qdm = xdownscale.QDM.fit(
            ref_hist.where(valid),
            hist.where(valid),
            kind="*" if kind == "precipitation" else "+",
            jitter_under=0.05 if kind == "precipitation" else None,
        )
        adjusted = qdm.adjust(fine.where(valid))
        given = np.isfinite(fine.where(valid).values[:, valid.values])
        assert given.mean() > 0.9, path.name
        assert (np.isfinite(adjusted.values[:, valid.values]) == given).all(), path.name
        # QDM maps the historical period onto the reference's climatology
        err_before = abs(float(hist.where(valid).mean()) - float(ref_hist.where(valid).mean()))
        err_after = abs(float(qdm.adjust(hist.where(valid)).mean()) - float(ref_hist.where(valid).mean()))
        assert err_after <= err_before + 1e-3 * abs(float(ref_hist.where(valid).mean())), path.name
        checked += 1
    assert checked >= 7
