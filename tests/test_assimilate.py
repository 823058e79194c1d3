"""Score-based data assimilation: operators, VP SDE sampler against the Kalman analysis, observation
adapters and their errors, tiny SLAMS / SDA models end to end."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import xarray as xr

from xdownscale.core.observations import AreaAverage, BilinearPoints, Coarsen, Compose, Subsample, add_noise
from xdownscale.core.vpsde import VPSDE, GaussianEps, Modality, PosteriorEps, WindowedEps, sample_vp
from xdownscale.datasets import synthetic_temperature
from xdownscale.errors import (
    GridMismatchError,
    InputError,
    MissingCoordinateError,
    UnitError,
    XDownscaleWarning,
)
from xdownscale.xr.observations import satellite_on_grid, satellite_weights, station_indices, stations_on_grid


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one thread is faster than two competing ones (and restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------- operators
def test_bilinear_points_matches_numpy_interpolation():
    x = torch.arange(20.0).reshape(4, 5) ** 1.5
    op = BilinearPoints([0.0, 1.25, 3.0, 2.5], [0.0, 3.5, 4.0, 0.75], shape=(4, 5))
    xn = x.numpy()
    expected = [
        xn[0, 0],
        0.75 * (0.5 * xn[1, 3] + 0.5 * xn[1, 4]) + 0.25 * (0.5 * xn[2, 3] + 0.5 * xn[2, 4]),
        xn[3, 4],
        0.5 * (0.25 * xn[2, 0] + 0.75 * xn[2, 1]) + 0.5 * (0.25 * xn[3, 0] + 0.75 * xn[3, 1]),
    ]
    np.testing.assert_allclose(op(x).numpy(), expected, rtol=1e-6)
    # leading dims and gradient flow
    xb = x.expand(2, 3, 4, 5).clone().requires_grad_(True)
    op(xb).sum().backward()
    assert xb.grad is not None and float(xb.grad.sum()) == pytest.approx(2 * 3 * 4)


def test_bilinear_points_periodic_wraps_and_rejects_outside():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 2)
    op = BilinearPoints([0.0], [3.5], shape=(2, 4), periodic=True)
    assert float(op(x)[0]) == pytest.approx(1.5)  # half way between column 3 (3.0) and column 0 (0.0)
    with pytest.raises(InputError, match="inside the grid"):
        BilinearPoints([2.5], [0.0], shape=(2, 4))


def test_area_average_coarsen_subsample():
    x = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(0))
    rows = []
    for i in range(4):
        for j in range(4):
            blk = np.zeros((8, 8))
            blk[2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = 0.25
            rows.append(blk.ravel())
    aa = AreaAverage(sp.csr_matrix(np.array(rows)), shape=(8, 8))
    np.testing.assert_allclose(aa(x).numpy(), Coarsen(2)(x).reshape(2, 16).numpy(), rtol=1e-5, atol=1e-6)
    assert Subsample(3)(x).shape == (2, 3, 3)
    assert Compose(Coarsen(2), Subsample(2))(x).shape == (2, 2, 2)
    y = add_noise(torch.zeros(10000), 2.0, generator=torch.Generator().manual_seed(1))
    assert float(y.std()) == pytest.approx(2.0, rel=0.05)


def test_windowed_eps_takes_the_centre_of_each_window():
    class Echo(torch.nn.Module):  # F = input, so eps = (sigma + mu) x per window position
        def forward(self, x, labels):
            pos = torch.arange(x.shape[1], dtype=x.dtype).reshape(1, -1, 1, 1)
            return pos.expand_as(x).clone()

    sde = VPSDE()
    we = WindowedEps(Echo(), 3, sde, chunk=2)
    x = torch.zeros(2, 6, 1, 4, 4)
    out = we(x, torch.tensor(0.0))  # mu(0) = 1: eps = F = position inside the window
    pos = out[0, :, 0, 0, 0].tolist()
    assert pos == [0.0, 1.0, 1.0, 1.0, 1.0, 2.0]
    with pytest.raises(InputError, match="shorter than the window"):
        we(torch.zeros(1, 2, 1, 4, 4), torch.tensor(0.5))


# ------------------------------------------------------------------------------- Kalman oracle (exact prior)
def test_posterior_sampler_matches_kalman_analysis():
    """Gaussian prior with exact score, linear observations (3 stations + 1 area average).

    Tolerance (stated): ensemble-mean RMSE < 0.1 prior std; ensemble variance / Kalman variance within
    [0.8, 1.25] on average over cells and [0.55, 1.6] per cell, with 512 members, 64 steps, 1 correction,
    observation error std 0.3 / 0.2 prior std. (The DPS likelihood with the gamma term is approximate:
    for observation errors much smaller than the prior std it under-disperses.)
    """
    torch.manual_seed(0)
    n = 8
    sde = VPSDE()
    yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    pts = np.stack([yy.ravel(), xx.ravel()], 1)
    d2 = ((pts[:, None] - pts[None]) ** 2).sum(-1)
    cov = np.exp(-d2 / (2 * 2.0**2)) + 1e-3 * np.eye(n * n)
    mean = np.linspace(-1.0, 1.0, n * n)
    stations = BilinearPoints([1.5, 4.0, 6.2], [2.5, 6.0, 1.3], shape=(n, n))
    block = np.zeros((n, n))
    block[4:, 4:] = 1.0 / 16
    area = AreaAverage(sp.csr_matrix(block.reshape(1, -1)), shape=(n, n))
    eye = torch.eye(n * n, dtype=torch.float64).reshape(-1, n, n)
    H = np.concatenate([stations(eye).numpy(), area(eye).numpy()], 1).T
    std = np.array([0.3, 0.3, 0.3, 0.2])
    rng = np.random.default_rng(1)
    truth = rng.multivariate_normal(mean, cov)
    y = H @ truth + std * rng.standard_normal(4)
    gain = cov @ H.T @ np.linalg.inv(H @ cov @ H.T + np.diag(std**2))
    mean_a = mean + gain @ (y - H @ mean)
    var_a = np.diag(cov - gain @ H @ cov)

    prior = GaussianEps(torch.tensor(mean).reshape(n, n), torch.tensor(cov), sde)
    post = PosteriorEps(
        prior,
        [
            Modality(stations, torch.tensor(y[:3]), torch.tensor(std[:3]), "stations"),
            Modality(area, torch.tensor(y[3:]), float(std[3]), "satellite"),
        ],
        sde,
        gamma=1e-2,
    )
    members = 512
    gen = torch.Generator().manual_seed(0)

    def noise(i):
        return torch.randn((members, n, n), generator=gen, dtype=torch.float64)

    x = sample_vp(post, (members, n, n), noise=noise, sde=sde, steps=64, corrections=1, tau=0.5)
    x = x.reshape(members, -1).numpy()
    rmse = np.sqrt(((x.mean(0) - mean_a) ** 2).mean())
    ratio = x.var(0) / var_a
    assert rmse < 0.1 * np.sqrt(np.diag(cov).mean())
    assert 0.8 <= ratio.mean() <= 1.25
    assert ratio.min() >= 0.55 and ratio.max() <= 1.6


@pytest.mark.parametrize("corrections, tau, inflation", [(0, 0.5, 1.0), (1, 0.05, 1.0), (1, 0.5, 1.0 / 0.75)])
def test_sampler_without_observations_samples_the_prior(corrections, tau, inflation):
    """Exact score, no observations: the prior comes back. The Langevin corrector with the stable step
    ``delta = tau / mean(eps^2)`` is an unadjusted Langevin step of size ``tau v`` on a Gaussian of variance
    ``v``, whose stationary variance is ``v / (1 - tau / 2)``: with tau = 0.5 it inflates the prior variance
    by up to 4/3 (measured here); small tau or no correction removes that."""
    n = 4
    sde = VPSDE()
    cov = 0.5 * np.eye(n * n)
    prior = GaussianEps(torch.full((n, n), 2.0), torch.tensor(cov), sde)
    gen = torch.Generator().manual_seed(3)
    x = sample_vp(
        PosteriorEps(prior, [], sde),
        (400, n, n),
        steps=32,
        corrections=corrections,
        tau=tau,
        noise=lambda i: torch.randn((400, n, n), generator=gen, dtype=torch.float64),
    )
    assert float(x.mean()) == pytest.approx(2.0, abs=0.06)
    assert float(x.var(0).mean()) == pytest.approx(0.5 * inflation, rel=0.12)


# ------------------------------------------------------------------------------------ xarray adapters
def _state(ny=12, nx=12, ntime=6, seed=0):
    return synthetic_temperature(ny, nx, ntime, seed=seed)


def _stations(state, iy, ix, names=None, units="K"):
    st = state.isel(lat=xr.DataArray(iy, dims="station"), lon=xr.DataArray(ix, dims="station"))
    st = st.assign_coords(station=names if names is not None else [f"s{i}" for i in range(len(iy))])
    st.attrs = {**state.attrs, "units": units}
    return st


def test_station_indices_and_outside_stations_warn():
    state = _state()
    st = _stations(state, [0, 3, 11], [0, 5, 11])
    iy, ix, inside = station_indices(st, state)
    np.testing.assert_allclose(iy, [0, 3, 11], atol=1e-9)
    np.testing.assert_allclose(ix, [0, 5, 11], atol=1e-9)
    assert inside.all()
    far = st.assign_coords(lat=("station", [st.lat.values[0], 80.0, st.lat.values[2]]))
    with pytest.warns(XDownscaleWarning, match=r"1 of 3 stations .* outside the state domain .*: s1"):
        obs = stations_on_grid(far, state, std=0.5)
    assert obs.names == ["s0", "s2"] and obs.values.shape == (6, 2)


def test_station_units_converted_and_std_scaled():
    state = _state()
    st = _stations(state, [2, 4], [3, 7]) - 273.15
    st.attrs = {"units": "degC", "error_std": 0.5}
    obs = stations_on_grid(st, state)
    np.testing.assert_allclose(obs.values[:, 0], state.isel(lat=2, lon=3).values, rtol=1e-5)
    np.testing.assert_allclose(obs.std, [0.5, 0.5])


def test_satellite_weights_rows_sum_to_one_and_average():
    state = _state(8, 8)
    coarse = state.coarsen(lat=2, lon=2).mean()
    coarse.attrs = state.attrs
    w, keep = satellite_weights(coarse, state)
    assert keep.all() and w.shape == (16, 64)
    np.testing.assert_allclose(np.asarray(w.sum(axis=1)).ravel(), 1.0)
    obs = satellite_on_grid(coarse, state, std=0.3)
    field = state.isel(time=0).values.ravel()
    np.testing.assert_allclose(w @ field, obs.values[0], rtol=1e-4)


def test_stations_without_coordinates():
    state = _state()
    st = _stations(state, [1, 2], [1, 2]).drop_vars(["lat", "lon"])
    with pytest.raises(MissingCoordinateError, match="station latitude and longitude"):
        stations_on_grid(st, state, std=1.0)


def test_station_unit_mismatch():
    state = _state()
    st = _stations(state, [1, 2], [1, 2], units="mm/day")
    with pytest.raises(UnitError, match="cannot be used with the state in 'K'"):
        stations_on_grid(st, state, std=1.0)


def test_satellite_grid_without_overlap():
    state = _state(8, 8)
    sat = state.coarsen(lat=2, lon=2).mean()
    sat = sat.assign_coords(lat=sat.lat + 40.0)
    sat.attrs = state.attrs
    with pytest.raises(GridMismatchError, match="does not overlap the state grid"):
        satellite_on_grid(sat, state, std=1.0)


def test_all_nan_observations():
    state = _state()
    st = _stations(state, [1, 2], [1, 2]) * np.nan
    st.attrs = dict(state.attrs)
    with pytest.raises(InputError, match=r"All station values .* are missing"):
        stations_on_grid(st, state, std=1.0)


def test_missing_error_std():
    state = _state()
    with pytest.raises(InputError, match="pass stations_std="):
        stations_on_grid(_stations(state, [1], [1]), state)


# ------------------------------------------------------------------------------------ tiny trained models
TINY = dict(
    channels=[16, 32],
    hidden=16,
    latent_channels=2,
    factor=2,
    num_res_blocks=1,
    batch_size=8,
    window=3,
    lr=2e-3,
    log_every=10,
)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, _one_thread):
    from xdownscale.models.assimilation import load_assimilation_model, train_assimilation

    state = _state(8, 8, 48, seed=0)
    out = {}
    for kind, ae_steps, steps in (("sda", 0, 120), ("slams", 250, 100)):
        path = train_assimilation(
            kind,
            state=state,
            out=tmp_path_factory.mktemp(kind),
            ae_steps=ae_steps,
            steps=steps,
            checkpoint_every=50,
            progress=False,
            **TINY,
        )
        out[kind] = load_assimilation_model(path)
    return out


@pytest.mark.parametrize("kind", ["sda", "slams"])
def test_analysis_error_at_stations_shrinks_with_observation_noise(tiny_models, kind):
    from xdownscale.assimilate import sda, slams

    fn = {"sda": sda, "slams": slams}[kind]
    truth = _state(8, 8, 3, seed=7)
    rng = np.random.default_rng(0)
    background = truth + xr.DataArray(rng.standard_normal(truth.shape), dims=truth.dims)
    background.attrs = truth.attrs
    iy, ix = rng.integers(0, 8, 10), rng.integers(0, 8, 10)
    clean = _stations(truth, iy, ix)

    def err(field):
        at = field.isel(lat=xr.DataArray(iy, dims="station"), lon=xr.DataArray(ix, dims="station"))
        return float(np.sqrt(((at - clean.values) ** 2).mean()))

    errors = []
    for std in (0.3, 0.1):
        obs = clean + std * xr.DataArray(rng.standard_normal(clean.shape), dims=clean.dims)
        obs.attrs = clean.attrs
        an = fn(
            background,
            model=tiny_models[kind],
            stations=obs,
            stations_std=std,
            background_std=1.0,
            members=3,
            steps=128,
            seed=0,
        )
        errors.append(err(an.mean("member")))
    assert an.dims == ("time", "member", "lat", "lon") and an.sizes["member"] == 3
    assert an.attrs["units"] == "K" and "history" in an.attrs and kind.upper() in an.attrs["history"]
    assert errors[0] < err(background)
    assert errors[1] < errors[0]


@pytest.mark.filterwarnings("ignore:steps=8")
def test_members_do_not_depend_on_batch(tiny_models):
    from xdownscale.assimilate import sda

    truth = _state(8, 8, 3, seed=7)
    a = sda(truth, model=tiny_models["sda"], members=3, steps=8, seed=1)
    b = sda(truth, model=tiny_models["sda"], members=3, steps=8, seed=1, batch_size=1)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-4, atol=1e-4)
    c = sda(truth, model=tiny_models["sda"], members=3, steps=8, seed=2)
    assert not np.allclose(a.values, c.values)


@pytest.mark.filterwarnings("ignore:steps=8")
def test_the_torch_door_takes_and_returns_arrays(tiny_models):
    """models.analysis is where assimilation meets torch: modalities as arrays in, members as arrays out."""
    from xdownscale.models.analysis import Observed, analyse, points_usable

    m = tiny_models["sda"]
    ny, nx = m.shape
    n_time = 3
    length = max(n_time, m.window)
    y = np.full((length, 1, ny * nx), np.nan)
    y[:n_time, 0] = 0.0
    background = Observed("background", "cells", y, np.ones_like(y))
    iy, ix = np.array([1.5, 4.0]), np.array([2.0, 5.5])
    assert points_usable(m, iy, ix).all()
    ys = np.full((length, 1, 2), np.nan)
    ys[:n_time, 0] = 1.0
    stations = Observed("stations", "points", ys, np.full_like(ys, 0.1), iy=iy, ix=ix)
    kw = dict(n_time=n_time, length=length, start=0, members=2, steps=4, corrections=0, tau=0.5, gamma=1e-2)
    out = analyse(m, "sda", [background], [stations], seed=1, **kw)
    assert out.shape == (2, n_time, ny, nx) and np.isfinite(out).all()
    alone = analyse(m, "sda", [background], [stations], seed=1, batch_size=1, **kw)  # keyed noise per member
    np.testing.assert_allclose(alone, out, rtol=1e-4, atol=1e-5)
    assert not np.allclose(analyse(m, "sda", [background], [stations], seed=2, **kw), out)
    with pytest.raises(InputError, match="points need iy and ix"):
        analyse(m, "sda", [background], [Observed("x", "points", ys, ys)], seed=1, **kw)
    with pytest.raises(InputError, match="expected 'slams' or 'sda'"):
        analyse(m, "oi", [background], [], seed=1, **kw)


def test_dask_background_is_assimilated_lazily_window_by_window(tiny_models):
    from xdownscale.assimilate import sda

    truth = _state(8, 8, 5, seed=7)
    st = _stations(truth, np.array([1, 4, 6]), np.array([2, 5, 3]))
    st[3:] = np.nan  # the second window has no station value: it is analysed with the background alone
    kw = dict(model=tiny_models["sda"], stations_std=0.3, members=2, steps=8, seed=1)
    lazy = sda(truth.chunk(time=3), stations=st, **kw)
    assert lazy.chunks is not None and lazy.chunks[0] == (3, 2)  # nothing sampled yet: one task per window
    assert lazy.dims == ("time", "member", "lat", "lon") and lazy.attrs["units"] == "K"
    eager = [sda(truth.isel(time=slice(0, 3)), stations=st, **kw), sda(truth.isel(time=slice(3, 5)), **kw)]
    np.testing.assert_allclose(lazy.values, xr.concat(eager, "time").values, rtol=1e-5, atol=1e-5)
    # one window is one joint analysis, the same as in memory
    np.testing.assert_allclose(
        sda(truth.chunk(time=-1), stations=st, **kw).values, sda(truth, stations=st, **kw).values, atol=1e-5
    )
    late = st.assign_coords(time=st.time + np.timedelta64(30, "D"))
    with pytest.raises(InputError, match="No time step of stations"):  # at the call, not at compute
        sda(truth.chunk(time=3), stations=late, **kw)


@pytest.mark.filterwarnings("ignore:steps=2")
def test_api_errors(tiny_models, tmp_path):
    from xdownscale.assimilate import sda, slams
    from xdownscale.models.assimilation import train_assimilation

    truth = _state(8, 8, 3, seed=7)
    with pytest.raises(InputError, match="is a 'sda' model"):
        slams(truth, model=tiny_models["sda"], steps=2, members=1)
    wrong = truth.copy()
    wrong.attrs["units"] = "mm/day"
    with pytest.raises(UnitError, match="works in 'K'"):
        sda(wrong, model=tiny_models["sda"], steps=2, members=1)
    nan_bg = truth * np.nan
    nan_bg.attrs = truth.attrs
    with pytest.raises(InputError, match="All values of the background"):
        sda(nan_bg, model=tiny_models["sda"], steps=2, members=1)
    with pytest.raises(InputError, match="must be a tuple"):
        sda(truth, model=tiny_models["sda"], observations={"x": truth}, steps=2, members=1)
    with pytest.warns(XDownscaleWarning, match="coarse discretisation"):
        sda(truth, model=tiny_models["sda"], steps=2, members=1)
    with pytest.raises(InputError, match="no 3 consecutive"):
        train_assimilation("sda", state=truth.isel(time=[0, 2]), out=tmp_path, progress=False, window=3)


def test_checkpoint_resume_refuses_other_configuration(tmp_path):
    from xdownscale.models.assimilation import load_assimilation_model, train_assimilation

    state = _state(8, 8, 12)
    cfg = dict(channels=[8], hidden=8, num_res_blocks=1, batch_size=2, window=3, steps=4, checkpoint_every=2)
    path = train_assimilation("sda", state=state, out=tmp_path, progress=False, **cfg)
    assert (tmp_path / "checkpoints" / "step-00000002" / "state.json").is_file()
    again = train_assimilation("sda", state=state, out=tmp_path, progress=False, **cfg)  # resumes at step 2
    assert again == path and load_assimilation_model(path).kind == "sda"
    with pytest.raises(InputError, match="another configuration"):
        train_assimilation("sda", state=state, out=tmp_path, progress=False, **{**cfg, "batch_size": 3})


def test_warnings_free_core_import():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AreaAverage(sp.eye(4, format="csr"), shape=(2, 2))


def test_assimilation_cards_are_listed_and_validated(tiny_models, tmp_path, monkeypatch):
    import json
    import shutil

    from xdownscale.errors import ModelCardError
    from xdownscale.models import list_models
    from xdownscale.models.assimilation import load_assimilation_model, validate_assimilation_card

    model = tiny_models["slams"]
    for suffix in (".json", ".safetensors"):
        shutil.copy(model.path.with_suffix(suffix), tmp_path / f"{model.name}{suffix}")
    monkeypatch.setenv("XDOWNSCALE_WEIGHTS", str(tmp_path))
    listed = {m["name"]: m for m in list_models()}
    assert listed[model.name]["kind"] == "slams"
    assert load_assimilation_model(model.name).kind == "slams"
    card = json.loads(model.path.with_suffix(".json").read_text())
    del card["autoencoder"]
    with pytest.raises(ModelCardError, match="needs the field 'autoencoder'"):
        validate_assimilation_card(card)
    card["kind"] = "cm"
    with pytest.raises(ModelCardError, match="assimilation needs a 'slams' or 'sda' model"):
        validate_assimilation_card(card)
