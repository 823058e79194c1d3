"""Optimal interpolation (statistical interpolation, Gandin 1963) of station increments, numpy only.

The classic baseline of station data assimilation and of station-gridding products: the analysis is the
background plus a Gaussian-covariance kriging of the station departures from it (Kalnay 2003, section 5.4)::

    x_a = x_b + B_go (B_oo + R)^{-1} (y - H x_b)
    P_a = B_gg - B_go (B_oo + R)^{-1} B_og

with background error covariance ``B(r) = s_b^2 exp(-r^2 / (2 L^2))`` as a function of the great-circle
distance ``r`` (km), observation error covariance ``R = diag(s_o^2)``, grid cells ``g`` and stations ``o``.
Members are ``x_a + chol(P_a) z``. :func:`fit_departure_covariance` estimates ``s_b``, ``L`` and ``s_o``
from the background's departures at the stations (Hollingsworth & Lönnberg 1986): the part of the
departure covariance that is correlated in space belongs to the background, the rest (the zero-distance
jump) to the observations, representativeness included.

References
----------
Gandin, L. S. (1963). Objective analysis of meteorological fields. Gidrometeoizdat.
Hollingsworth, A. and Lönnberg, P. (1986). The statistical structure of short-range forecast errors as
determined from radiosonde data. Tellus A 38, 111-136.
Kalnay, E. (2003). Atmospheric modeling, data assimilation and predictability. Cambridge University Press.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

__all__ = [
    "DepartureStatistics",
    "fit_departure_covariance",
    "gaussian_covariance",
    "haversine_km",
    "oi_analysis",
]

EARTH_RADIUS_KM = 6371.0


def haversine_km(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    """Great-circle distances (km) between points 1, shape (N,), and points 2, shape (M,): (N, M).

    Examples
    --------
    >>> zero = np.array([0.0])
    >>> round(float(haversine_km(zero, zero, zero, np.array([1.0]))[0, 0]), 1)
    111.2
    """
    p1, l1 = np.radians(np.asarray(lat1, float))[:, None], np.radians(np.asarray(lon1, float))[:, None]
    p2, l2 = np.radians(np.asarray(lat2, float))[None], np.radians(np.asarray(lon2, float))[None]
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin((l2 - l1) / 2) ** 2
    return np.asarray(2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0))))


def gaussian_covariance(dist_km: np.ndarray, std: float, length_km: float) -> np.ndarray:
    """``std^2 exp(-r^2 / (2 L^2))`` for distances ``r`` (km)."""
    if not (std > 0 and length_km > 0):
        raise InputError(f"OI needs a background std > 0 and a length scale > 0, got {std} and {length_km}.")
    return np.asarray(std**2 * np.exp(-0.5 * (np.asarray(dist_km) / length_km) ** 2))


@dataclass
class DepartureStatistics:
    """Error statistics fitted to background departures at stations.

    Attributes
    ----------
    background_std
        ``s_b``, the spatially correlated part of the departures (background error at a point).
    length_km
        ``L`` of the Gaussian correlation ``exp(-r^2 / (2 L^2))``.
    obs_std
        (N,) ``s_o`` per station: ``sqrt(var(departure) - s_b^2)``, floored at ``floor`` times the
        departure std (observation plus representativeness error).
    bias
        (N,) mean departure per station (not removed by the analysis; reported for diagnosis).
    pairs
        Number of station pairs the fit used.
    """

    background_std: float
    length_km: float
    obs_std: np.ndarray
    bias: np.ndarray
    pairs: int


def fit_departure_covariance(
    departures: np.ndarray,
    lat: np.ndarray,
    lon: np.ndarray,
    *,
    lengths_km: np.ndarray | None = None,
    floor: float = 0.1,
) -> DepartureStatistics:
    """Fit ``s_b`` and ``L`` to the covariances of station departures, and ``s_o`` per station.

    Parameters
    ----------
    departures
        (T, N) ``y - H x_b`` (NaN = missing), N >= 3 stations.
    lat, lon
        (N,) station coordinates (degrees).
    lengths_km
        Candidate length scales (default 50 .. 2000 km); for each, ``s_b^2`` is the least-squares fit
        of ``s_b^2 exp(-r^2 / (2 L^2))`` to the pair covariances, and the best pair is kept.
    floor
        Smallest ``s_o`` as a fraction of each station's departure std.

    Returns
    -------
    DepartureStatistics

    Raises
    ------
    InputError
        Fewer than 3 stations or fewer than 10 common time steps per pair.

    Notes
    -----
    With few stations (the 11 VALUE Iberia stations give 55 pairs, none closer than about 100 km) the
    fit cannot see correlations at shorter range: ``s_o`` then also holds background error that is
    correlated below the station spacing, which errs on the side of trusting the stations less.
    """
    d = np.asarray(departures, dtype=float)
    if d.ndim != 2 or d.shape[1] < 3:
        raise InputError(
            f"fit_departure_covariance needs departures (time, station) with >= 3 stations, got {d.shape}."
        )
    n = d.shape[1]
    bias = np.nanmean(d, axis=0)
    a = d - bias
    var = np.nanmean(a**2, axis=0)
    dist = haversine_km(lat, lon, lat, lon)
    iu = np.triu_indices(n, 1)
    cov, r = [], []
    for i, j in zip(*iu, strict=True):
        ok = np.isfinite(a[:, i]) & np.isfinite(a[:, j])
        if ok.sum() >= 10:
            cov.append(float(np.mean(a[ok, i] * a[ok, j])))
            r.append(float(dist[i, j]))
    if len(cov) < 3:
        raise InputError(
            f"Only {len(cov)} station pairs have >= 10 common departures; pass a longer period to estimate "
            "the error statistics."
        )
    c, rr = np.asarray(cov), np.asarray(r)
    cands = np.geomspace(50.0, 2000.0, 40) if lengths_km is None else np.asarray(lengths_km, float)
    best = (np.inf, 0.0, float(cands[0]))
    for length in cands:
        g = np.exp(-0.5 * (rr / length) ** 2)
        s2 = max(float(g @ c / max(g @ g, 1e-12)), 0.0)
        s2 = min(s2, float(np.nanmin(var)))  # the correlated part cannot exceed any station's variance
        sse = float(((c - s2 * g) ** 2).sum())
        if sse < best[0]:
            best = (sse, s2, float(length))
    _, s2, length = best
    sb = float(np.sqrt(max(s2, 1e-12)))
    so = np.sqrt(np.maximum(var - s2, (floor**2) * var))
    return DepartureStatistics(background_std=sb, length_km=length, obs_std=so, bias=bias, pairs=len(cov))


def oi_analysis(
    background: np.ndarray,
    background_at_obs: np.ndarray,
    obs: np.ndarray,
    obs_std: np.ndarray,
    grid_lat: np.ndarray,
    grid_lon: np.ndarray,
    obs_lat: np.ndarray,
    obs_lon: np.ndarray,
    *,
    background_std: float,
    length_km: float,
    members: int = 0,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Optimal interpolation of station increments, time step by time step.

    Parameters
    ----------
    background
        (T, G) background on the G analysis points (NaN points are left NaN).
    background_at_obs
        (T, N) background at the stations (``H x_b``).
    obs
        (T, N) observations, NaN = missing.
    obs_std
        (N,) or scalar observation error std.
    grid_lat, grid_lon
        (G,) coordinates of the analysis points; ``obs_lat``, ``obs_lon`` (N,) of the stations.
    background_std, length_km
        ``s_b`` and ``L`` of the Gaussian background error covariance.
    members
        Number of members drawn from the analysis error covariance (0: none).
    rng
        For the members.

    Returns
    -------
    mean, std, ensemble
        (T, G) analysis, (T, G) analysis error std, (members, T, G) members (empty when ``members=0``).
    """
    xb = np.asarray(background, float)
    hb = np.asarray(background_at_obs, float)
    y = np.asarray(obs, float)
    t_n, g_n = xb.shape
    so = np.broadcast_to(np.asarray(obs_std, float), (y.shape[1],))
    b_go = gaussian_covariance(haversine_km(grid_lat, grid_lon, obs_lat, obs_lon), background_std, length_km)
    b_oo = gaussian_covariance(haversine_km(obs_lat, obs_lon, obs_lat, obs_lon), background_std, length_km)
    b_gg = (
        gaussian_covariance(haversine_km(grid_lat, grid_lon, grid_lat, grid_lon), background_std, length_km)
        if members
        else None
    )
    rng = rng or np.random.default_rng(0)
    mean = xb.copy()
    std = np.full((t_n, g_n), float(background_std))
    ens = np.empty((members, t_n, g_n)) if members else np.empty((0, t_n, g_n))
    for t in range(t_n):
        ok = np.isfinite(y[t]) & np.isfinite(hb[t])
        pa_chol = None
        if ok.any():
            s = b_oo[np.ix_(ok, ok)] + np.diag(so[ok] ** 2)
            k = np.linalg.solve(s, b_go[:, ok].T).T  # (G, n_ok) gain
            mean[t] = xb[t] + k @ (y[t, ok] - hb[t, ok])
            std[t] = np.sqrt(np.maximum(background_std**2 - np.einsum("gi,gi->g", k, b_go[:, ok]), 0.0))
            if members and b_gg is not None:
                pa = b_gg - k @ b_go[:, ok].T
                pa_chol = _psd_sqrt(pa)
        elif members and b_gg is not None:
            pa_chol = _psd_sqrt(b_gg)
        if members and pa_chol is not None:
            z = rng.standard_normal((members, g_n))
            ens[:, t] = mean[t][None] + z @ pa_chol.T
    ens = np.where(np.isfinite(xb)[None], ens, np.nan) if members else ens
    return mean, std, ens


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """A square root ``L`` with ``L L^T = cov`` of a symmetric positive semi-definite matrix."""
    lam, u = np.linalg.eigh(0.5 * (cov + cov.T))
    return np.asarray(u * np.sqrt(np.clip(lam, 0.0, None)))
