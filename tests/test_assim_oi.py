"""Optimal interpolation baseline and departure-based error statistics (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from xdownscale.core.oi import fit_departure_covariance, gaussian_covariance, haversine_km, oi_analysis
from xdownscale.errors import InputError, UnitError


def test_oi_single_station_is_the_scalar_kalman_update():
    """One station on a grid point: the analysis there is the Kalman blend, far away the background."""
    glat, glon = np.array([40.0, 40.0, 40.0]), np.array([0.0, 0.1, 10.0])
    xb = np.zeros((1, 3))
    sb, so = 2.0, 1.0
    mean, std, ens = oi_analysis(
        xb,
        np.zeros((1, 1)),
        np.array([[5.0]]),
        np.array([so]),
        glat,
        glon,
        np.array([40.0]),
        np.array([0.0]),
        background_std=sb,
        length_km=100.0,
        members=4000,
        rng=np.random.default_rng(0),
    )
    gain = sb**2 / (sb**2 + so**2)
    assert mean[0, 0] == pytest.approx(5.0 * gain)
    assert std[0, 0] == pytest.approx(np.sqrt(sb**2 * (1 - gain)))
    assert 0 < mean[0, 1] < mean[0, 0] and mean[0, 2] == pytest.approx(0.0, abs=1e-6)
    assert ens[:, 0, 0].std() == pytest.approx(std[0, 0], rel=0.05)
    assert ens[:, 0, 0].mean() == pytest.approx(mean[0, 0], abs=0.05)


def test_fit_departure_covariance_recovers_the_statistics():
    rng = np.random.default_rng(0)
    n, t = 25, 3000
    lat, lon = rng.uniform(36, 44, n), rng.uniform(-9, 3, n)
    sb, length, so = 1.5, 250.0, rng.uniform(0.5, 1.5, n)
    cov = gaussian_covariance(haversine_km(lat, lon, lat, lon), sb, length)
    d = rng.multivariate_normal(np.zeros(n), cov, size=t) + so * rng.standard_normal((t, n)) + 0.7
    stats = fit_departure_covariance(d, lat, lon)
    assert stats.background_std == pytest.approx(sb, rel=0.15)
    assert stats.length_km == pytest.approx(length, rel=0.25)
    np.testing.assert_allclose(stats.obs_std, so, rtol=0.25)
    np.testing.assert_allclose(stats.bias, 0.7, atol=0.15)
    with pytest.raises(InputError, match=r"needs departures \(time, station\) with >= 3 stations"):
        fit_departure_covariance(d[:, :2], lat[:2], lon[:2])
    with pytest.raises(InputError, match="Only 0 station pairs have >= 10 common departures"):
        fit_departure_covariance(d[:5], lat, lon)
    with pytest.raises(InputError, match="background std > 0 and a length scale > 0"):
        gaussian_covariance(np.zeros(2), 1.0, 0.0)


def _background(nt: int = 40, units: str = "degC") -> xr.DataArray:
    lat = xr.DataArray(np.arange(36.0, 44.1, 1.0), dims="lat", attrs={"standard_name": "latitude"})
    lon = xr.DataArray(np.arange(-9.0, 3.1, 1.0), dims="lon", attrs={"standard_name": "longitude"})
    time = np.datetime64("2000-01-01", "ns") + np.arange(nt) * np.timedelta64(1, "D")
    rng = np.random.default_rng(1)
    vals = 10 + rng.standard_normal((nt, lat.size, lon.size))
    return xr.DataArray(
        vals,
        dims=("time", "lat", "lon"),
        coords={"time": time, "lat": lat, "lon": lon},
        name="tas",
        attrs={"units": units},
    )


def _stations(bg: xr.DataArray, n: int = 8, seed: int = 2) -> xr.DataArray:
    rng = np.random.default_rng(seed)
    lat, lon = rng.uniform(36.5, 43.5, n), rng.uniform(-8.5, 2.5, n)
    vals = bg.interp(lat=xr.DataArray(lat, dims="station"), lon=xr.DataArray(lon, dims="station")).values
    vals = vals + 1.0 + 0.5 * rng.standard_normal(vals.shape)
    return xr.DataArray(
        vals,
        dims=("time", "station"),
        coords={
            "time": bg.time,
            "station": [f"s{i}" for i in range(n)],
            "lat": ("station", lat, {"standard_name": "latitude"}),
            "lon": ("station", lon, {"standard_name": "longitude"}),
        },
        attrs={"units": "K"},
    )


def test_optimal_interpolation_on_dataarrays():
    from xdownscale.assimilate import estimate_observation_error, optimal_interpolation

    bg = _background()
    st = _stations(bg) + 273.15  # in K: converted to the background's degC
    st.attrs["units"] = "K"
    an = optimal_interpolation(bg, stations=st, stations_std=0.5, background_std=1.0, length_scale_km=200.0)
    assert an.dims == ("time", "lat", "lon") and an.attrs["units"] == "degC"
    # the stations are 1 K warmer than the background: the analysis moves towards them
    assert 0.3 < float((an - bg).mean()) < 1.0
    ens = optimal_interpolation(
        bg.isel(time=slice(0, 3)),
        stations=st,
        stations_std=0.5,
        background_std=1.0,
        length_scale_km=200.0,
        members=5,
    )
    assert ens.dims == ("time", "member", "lat", "lon") and ens.sizes["member"] == 5
    est = estimate_observation_error(st, bg)
    assert est["stations_std"].dims == ("station",) and est.attrs["units"] == "degC"
    np.testing.assert_allclose(est["bias"].values, 1.0, atol=0.4)
    auto = optimal_interpolation(bg, stations=st)  # statistics estimated from these days
    assert np.isfinite(auto.values).all()


def test_optimal_interpolation_errors():
    from xdownscale.assimilate import estimate_observation_error, optimal_interpolation

    bg = _background()
    st = _stations(bg)
    no_units = bg.copy()
    no_units.attrs = {}
    with pytest.raises(UnitError, match="The background has no units attribute"):
        optimal_interpolation(no_units, stations=st)
    with pytest.raises(UnitError, match="The background has no units attribute"):
        estimate_observation_error(st, no_units)
    with pytest.raises(InputError, match="members must be >= 0, got -1"):
        optimal_interpolation(bg, stations=st, members=-1)
    far = st.assign_coords(lat=("station", np.full(st.sizes["station"], 70.0), {"standard_name": "latitude"}))
    with pytest.raises(InputError, match="No station lies inside the background's domain"):
        optimal_interpolation(bg, stations=far, stations_std=1.0, background_std=1.0, length_scale_km=100.0)
    with pytest.raises(InputError, match="Only 2 stations lie inside the background's domain"):
        estimate_observation_error(st.isel(station=[0, 1]), bg)
