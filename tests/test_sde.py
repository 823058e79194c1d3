"""VE SDE, score model, denoising score matching and the Euler-Maruyama samplers (analytic oracles)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xdownscale.core.rng import KeyedNoise
from xdownscale.core.samplers import em_sigmas, generate_sde, sample_em, sde_bridge
from xdownscale.core.sde import VESDE, ScoreModel, dsm_loss
from xdownscale.errors import InputError
from xdownscale.nets.unet import UNet

torch.set_num_threads(2)

TINY = {"channels": (8, 16), "num_res_blocks": 1, "groups": 4, "num_heads": 2}


class GaussianScore(torch.nn.Module):
    """Exact score of the noised marginal of data N(mu, s^2 I): -(x - mu) / (s^2 + sigma(t)^2)."""

    def __init__(self, mu: float, s: float, sigma_min: float = 0.01, sigma_max: float = 500.0) -> None:
        super().__init__()
        self.mu, self.s = mu, s
        self.sde = VESDE(sigma_min, sigma_max)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def forward(self, x: torch.Tensor, t: float, cond: torch.Tensor | None = None) -> torch.Tensor:
        sigma = float(self.sde.sigma(torch.tensor(float(t), dtype=torch.float64)))
        return -(x - self.mu) / (self.s**2 + sigma**2)


def torch_noise(shape: tuple[int, ...], seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    return lambda i: torch.randn(shape, generator=g, dtype=torch.float64)


def test_vesde() -> None:
    sde = VESDE()
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    s = sde.sigma(t)
    assert s[0].item() == pytest.approx(0.01) and s[-1].item() == pytest.approx(500.0)
    torch.testing.assert_close(sde.t_of_sigma(s), t)
    # g(t)^2 = d sigma^2 / dt
    h = 1e-6
    numeric = (sde.sigma(t + h) ** 2 - sde.sigma(t - h) ** 2) / (2 * h)
    torch.testing.assert_close(sde.g2(t), numeric, rtol=1e-6, atol=0)
    with pytest.raises(InputError, match="0 < sigma_min < sigma_max"):
        VESDE(1.0, 1.0)


def test_score_parametrisation() -> None:
    """score = F(c_in x, ln(sigma)/4) / sigma(t) (SI eq. 4), c_in = 1/sqrt(sigma^2 + sigma_data^2)."""

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seen: tuple[torch.Tensor, torch.Tensor] | None = None

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            self.seen = (x.clone(), labels.clone())
            return torch.ones_like(x)

    probe = Probe()
    model = ScoreModel(probe)
    x = torch.full((2, 1, 4, 4), 3.0)
    t = torch.tensor([0.0, 0.5])
    sigma = model.sde.sigma(t)
    score = model(x, t)
    torch.testing.assert_close(score, (1 / sigma)[:, None, None, None].expand_as(x))
    assert probe.seen is not None
    torch.testing.assert_close(
        probe.seen[0], 3.0 / torch.sqrt(sigma**2 + 0.25)[:, None, None, None].expand_as(x)
    )
    torch.testing.assert_close(probe.seen[1], torch.log(sigma) / 4)
    with pytest.raises(InputError, match=r"t must be a float or a tensor of shape \(2,\)"):
        model(x, torch.zeros(3))
    with pytest.raises(InputError, match=r"x must have shape \(B, C, H, W\)"):
        model(x[0], 0.5)
    with pytest.raises(InputError, match="sigma_data must be > 0"):
        ScoreModel(probe, sigma_data=0.0)


def test_em_with_exact_score_reproduces_gaussian() -> None:
    mu, s = 0.3, 0.5
    shape = (8000, 1, 2, 2)  # 32000 values: standard error of the mean 0.003
    out = generate_sde(GaussianScore(mu, s), shape, steps=500, noise=torch_noise(shape))
    assert out.shape == shape
    assert abs(out.mean().item() - mu) < 0.03 * s
    assert out.std().item() == pytest.approx(s, rel=0.03)
    # without the final Tweedie step the same holds (sigma(t_end) ~ 0.01 << s)
    raw = generate_sde(GaussianScore(mu, s), shape, steps=500, noise=torch_noise(shape), denoise=False)
    assert raw.std().item() == pytest.approx(s, rel=0.03)


def test_em_from_an_intermediate_time() -> None:
    """Started from the exact marginal at t = 0.5, the reverse SDE ends at the data distribution."""
    mu, s = -0.2, 0.4
    shape = (8000, 1, 2, 2)
    sde = VESDE()
    t0 = 0.5
    sig0 = float(sde.sigma(torch.tensor(t0, dtype=torch.float64)))
    x = mu + math.sqrt(s**2 + sig0**2) * torch.randn(
        shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    model = GaussianScore(mu, s)
    out = sample_em(model, x, em_sigmas(model, t0, steps=250), noise=torch_noise(shape, 2))
    assert abs(out.mean().item() - mu) < 0.03 * s
    assert out.std().item() == pytest.approx(s, rel=0.03)


def test_sde_bridge_at_small_t_star_returns_about_the_input() -> None:
    mu, s = 0.0, 0.5
    x = s * torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model = GaussianScore(mu, s)
    t_star = 0.1  # sigma(t*) ~ 0.03
    out = sde_bridge(model, x, t_star, steps=100, noise=torch_noise(tuple(x.shape)))
    sigma = float(model.sde.sigma(torch.tensor(t_star, dtype=torch.float64)))
    assert (out - x).abs().mean().item() < 2 * sigma
    # and at t* = 1 it forgets the input: a fresh sample of the data distribution
    far = sde_bridge(model, x, 1.0, steps=300, noise=torch_noise(tuple(x.shape)))
    assert torch.corrcoef(torch.stack([far.flatten(), x.flatten()]))[0, 1].abs() < 0.15


def test_sde_samples_do_not_depend_on_the_batch() -> None:
    torch.manual_seed(0)
    net = UNet(**TINY)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    model = ScoreModel(net).eval()
    keys, shape = [7, 8, 9], (1, 8, 8)
    x = torch.randn(3, *shape)
    full = sde_bridge(model, x, 0.4, steps=5, noise=KeyedNoise(keys, seed=0, shape=shape))
    one = sde_bridge(model, x[1:2], 0.4, steps=5, noise=KeyedNoise(keys[1:2], seed=0, shape=shape))
    torch.testing.assert_close(one[0], full[1], atol=1e-5, rtol=0)
    gen = generate_sde(model, (3, *shape), steps=3, noise=KeyedNoise(keys, seed=0, shape=shape))
    assert gen.shape == (3, *shape) and torch.isfinite(gen).all()


def test_dsm_loss_decreases_on_a_tiny_net() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds hand-offs
    try:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        data = 0.5 * torch.randn(512, 1, 8, 8, generator=g) + 0.2
        model = ScoreModel(UNet(channels=(16, 16), num_res_blocks=1, attention=False, groups=8))

        def eval_loss() -> float:
            with torch.no_grad():
                losses = [
                    dsm_loss(model, data[:64], generator=torch.Generator().manual_seed(s)) for s in range(4)
                ]
            return float(sum(losses)) / len(losses)

        before = eval_loss()
        assert before == pytest.approx(1.0, abs=0.05)  # zero-initialised output: E[z^2] = 1
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(60):
            loss = dsm_loss(model, data[torch.randint(0, 512, (16,), generator=g)], generator=g)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert eval_loss() < 0.8 * before
    finally:
        torch.set_num_threads(threads)


def test_sampler_errors() -> None:
    model = GaussianScore(0.0, 1.0)
    x = torch.zeros(1, 1, 2, 2)
    noise = torch_noise((1, 1, 2, 2))
    with pytest.raises(InputError, match="steps must be >= 1"):
        em_sigmas(model, 0.5, steps=0)
    with pytest.raises(InputError, match=r"0 <= t_end < t_start <= 1, got t_end=0.6, t_start=0.5"):
        em_sigmas(model, 0.5, t_end=0.6)
    with pytest.raises(InputError, match="strictly decreasing"):
        sample_em(model, x, [0.5, 1.0], noise=noise)
    with pytest.raises(InputError, match="leave the model's range"):
        sample_em(model, x, [1e6, 1.0], noise=noise)
    with pytest.raises(InputError, match=r"t_star must be in \(1e-05, 1\], got 1.5"):
        sde_bridge(model, x, 1.5, noise=noise)
    with pytest.raises(InputError, match=r"expected \(2, 1, 2, 2\)"):
        generate_sde(model, (2, 1, 2, 2), noise=noise)
    with pytest.raises(InputError, match=r"t_eps must be in \[0, 1\)"):
        dsm_loss(ScoreModel(UNet(**TINY)), torch.zeros(1, 1, 8, 8), generator=torch.Generator(), t_eps=1.0)


def test_em_grid_and_callback_follow_the_levels() -> None:
    """em_sigmas is sigma(t) on a uniform t grid; sample_em calls back once per step, as sample_cm does."""
    model = GaussianScore(0.0, 1.0)
    sde = VESDE()
    levels = em_sigmas(model, 0.5, steps=4, t_end=0.1)
    expected = sde.sigma(torch.linspace(0.5, 0.1, 5, dtype=torch.float64))
    np.testing.assert_allclose(levels, expected.numpy(), rtol=1e-12)
    steps: list[int] = []
    sample_em(model, torch.zeros(1, 1, 2, 2), levels, noise=torch_noise((1, 1, 2, 2)), callback=steps.append)
    assert steps == [1, 2, 3, 4]
