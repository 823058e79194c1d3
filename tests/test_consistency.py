"""Consistency model: preconditioning, curricula, losses, masks and CM samplers."""

from __future__ import annotations

import copy
import importlib.util
import math

import numpy as np
import pytest
import torch

from xdownscale.core.consistency import (
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    ConsistencyModel,
    cm_scalings,
    ct_loss,
    ect_loss,
    ict_loss,
)
from xdownscale.core.losses import l1_distance, l2_distance, pseudo_huber
from xdownscale.core.rng import KeyedNoise
from xdownscale.core.samplers import generate_cm, sample_cm, sdedit_cm
from xdownscale.core.schedules import (
    ct_ema_decay,
    ct_num_scales,
    ect_gap_ratio,
    ict_index_probs,
    ict_num_scales,
    ict_total_steps_per_stage,
    karras_sigmas,
)
from xdownscale.errors import InputError
from xdownscale.nets.unet import UNet

torch.set_num_threads(2)

TINY = {"channels": (8, 16), "num_res_blocks": 1, "groups": 4, "num_heads": 2}


def randomise(net: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Give the zero-initialised layers random weights, so that the network output is not 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def tiny_cm(**kw: object) -> ConsistencyModel:
    return ConsistencyModel(randomise(UNet(**{**TINY, **kw})).eval())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- preconditioning


def test_scalings_boundary_values_exact() -> None:
    for dtype in (torch.float32, torch.float64):
        c_skip, c_out, c_in, c_noise = cm_scalings(torch.tensor([SIGMA_MIN], dtype=dtype))
        assert c_skip.item() == 1.0
        assert c_out.item() == 0.0
        assert c_in.item() == pytest.approx(1 / math.sqrt(SIGMA_MIN**2 + SIGMA_DATA**2))
        assert c_noise.item() == pytest.approx(math.log(SIGMA_MIN) / 4)


def test_scalings_identities() -> None:
    s = karras_sigmas(50)  # exact endpoints
    c_skip, c_out, c_in, c_noise = cm_scalings(s)
    torch.testing.assert_close(c_in * torch.sqrt(s**2 + SIGMA_DATA**2), torch.ones_like(s))
    torch.testing.assert_close(c_noise, torch.log(s) / 4)
    torch.testing.assert_close(c_out, (s - SIGMA_MIN) * SIGMA_DATA / torch.sqrt(s**2 + SIGMA_DATA**2))
    # c_out uses (sigma - sigma_min): it differs from the paper's eq. 5 (sigma) at small sigma
    assert c_out[0] == 0 and (c_out[1:] > 0).all()
    # large sigma: the skip vanishes and the network output carries sigma_data
    assert c_skip[-1] < 1e-4
    assert c_out[-1] == pytest.approx(SIGMA_DATA, rel=1e-3)
    assert (c_skip.diff() < 0).all() and (c_out.diff() > 0).all()
    # with sigma_min = 0 the EDM unit-variance identity c_skip + c_out^2 / sigma_data^2 = 1 holds
    c_skip0, c_out0, _, _ = cm_scalings(s, sigma_min=0.0)
    torch.testing.assert_close(c_skip0 + c_out0**2 / SIGMA_DATA**2, torch.ones_like(s))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_boundary_condition_exact(dtype: torch.dtype) -> None:
    cm = tiny_cm(in_channels=2).to(dtype)
    x = torch.randn(3, 1, 10, 14, dtype=dtype)
    cond = torch.randn(3, 1, 10, 14, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(cm(x, SIGMA_MIN, cond), x)
        assert torch.equal(cm(x, torch.full((3,), SIGMA_MIN, dtype=dtype), cond), x)
        # not the identity elsewhere
        assert not torch.allclose(cm(x, 0.5, cond), x, atol=1e-3)


def test_boundary_condition_exact_under_bf16_autocast() -> None:
    cm = tiny_cm()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = cm(x, SIGMA_MIN)
    assert out.dtype == torch.float32
    assert torch.equal(out, x)


def test_per_sample_sigma() -> None:
    cm = tiny_cm()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        both = cm(x, torch.tensor([0.1, 5.0]))
        torch.testing.assert_close(both[0:1], cm(x[0:1], 0.1), atol=1e-5, rtol=0)
        torch.testing.assert_close(both[1:2], cm(x[1:2], 5.0), atol=1e-5, rtol=0)


def test_model_errors() -> None:
    cm = tiny_cm()
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(InputError, match=r"sigma must be a float, a tensor of shape \(2,\)"):
        cm(x, torch.ones(3))
    with pytest.raises(InputError, match=r"cond must have shape \(B, Cc, H, W\) = \(2, Cc, 8, 8\)"):
        cm(x, 1.0, torch.randn(2, 1, 4, 4))
    with pytest.raises(InputError, match=r"x_t must have shape \(B, C, H, W\)"):
        cm(x[0], 1.0)
    with pytest.raises(InputError, match="out_channels must equal the data channels"):
        ConsistencyModel(UNet(out_channels=2, **TINY))(torch.randn(1, 1, 8, 8), 1.0)
    with pytest.raises(InputError, match="0 < sigma_min < sigma_max"):
        ConsistencyModel(UNet(**TINY), sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(InputError, match="sigma_data must be > 0"):
        ConsistencyModel(UNet(**TINY), sigma_data=0.0)


# --------------------------------------------------------------------------- schedules


def test_karras_sigmas() -> None:
    s = karras_sigmas(11)
    assert s.shape == (11,) and s.dtype == torch.float64
    assert s[0].item() == SIGMA_MIN and s[-1].item() == SIGMA_MAX
    assert (s.diff() > 0).all()
    # rho = 1 is a linear grid
    torch.testing.assert_close(
        karras_sigmas(5, 1.0, 5.0, rho=1.0), torch.linspace(1.0, 5.0, 5, dtype=torch.float64)
    )
    assert karras_sigmas(1).tolist() == [SIGMA_MAX]
    assert karras_sigmas(4, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(InputError, match="n >= 1"):
        karras_sigmas(0)
    with pytest.raises(InputError, match="0 < sigma_min < sigma_max"):
        karras_sigmas(5, 1.0, 1.0)


def test_ict_curriculum() -> None:
    K = 800
    assert ict_total_steps_per_stage(K) == 100  # floor(800 / (log2(128) + 1))
    assert ict_num_scales(0, K) == 11
    assert ict_num_scales(99, K) == 11
    assert ict_num_scales(100, K) == 21
    assert ict_num_scales(250, K) == 41
    assert ict_num_scales(600, K) == 641
    assert ict_num_scales(700, K) == 1281
    assert ict_num_scales(K, K) == 1281
    assert ict_num_scales(10 * K, K) == 1281
    assert ict_num_scales(0, 3) == 11  # K' is at least 1
    with pytest.raises(InputError, match="total_steps must be >= 1"):
        ict_num_scales(0, 0)
    with pytest.raises(InputError, match="step must be >= 0"):
        ict_num_scales(-1, 10)
    with pytest.raises(InputError, match="0 < s0 <= s1"):
        ict_num_scales(0, 10, s0=20, s1=10)


def test_ct_curriculum_and_ema() -> None:
    K = 1000
    assert ct_num_scales(0, K) == 2
    assert ct_num_scales(K, K) == 151
    n = [ct_num_scales(k, K) for k in range(0, K + 1, 50)]
    assert n == sorted(n)
    assert ct_ema_decay(0, K) == pytest.approx(0.95)  # exp(2 ln 0.95 / 2)
    assert ct_ema_decay(K, K, mu0=0.9) == pytest.approx(math.exp(2 * math.log(0.9) / 151))
    with pytest.raises(InputError, match=r"mu0 must be in \(0, 1\)"):
        ct_ema_decay(0, K, mu0=1.0)


def test_lognormal_index_probabilities() -> None:
    for n in (11, 161, 1281):
        s = karras_sigmas(n)
        p = ict_index_probs(s)
        assert p.shape == (n - 1,)
        assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)
        assert (p >= 0).all()
        # the most likely interval is near exp(P_mean) = 0.33
        i = int(p.argmax())
        assert s[i] <= 1.0 and s[i + 1] >= 0.1
    with pytest.raises(InputError, match="1-d grid of >= 2 sigmas"):
        ict_index_probs(torch.ones(1))
    with pytest.raises(InputError, match="p_std must be > 0"):
        ict_index_probs(karras_sigmas(5), p_std=0.0)


# --------------------------------------------------------------------------- distances and masks


def test_pseudo_huber_value() -> None:
    x = torch.zeros(2, 1, 4, 4)
    y = torch.full((2, 1, 4, 4), 0.5)
    c = 0.00054 * math.sqrt(16)
    expected = math.sqrt(16 * 0.25 + c**2) - c
    torch.testing.assert_close(pseudo_huber(x, y), torch.full((2,), expected))
    # d counts the valid values only
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., :2, :] = True
    c8 = 0.00054 * math.sqrt(8)
    torch.testing.assert_close(pseudo_huber(x, y, mask), torch.full((2,), math.sqrt(8 * 0.25 + c8**2) - c8))
    torch.testing.assert_close(l1_distance(x, y, mask), torch.full((2,), 0.5))
    torch.testing.assert_close(l2_distance(x, y, mask), torch.full((2,), 0.25))
    # an all-masked sample gives 0 with a finite gradient
    xg = x.clone().requires_grad_()
    none = torch.zeros(2, 1, 1, 1, dtype=torch.bool)
    pseudo_huber(xg, y, none).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_distances_ignore_masked_cells() -> None:
    x, y = torch.randn(3, 2, 6, 7), torch.randn(3, 2, 6, 7)
    mask = torch.rand(1, 1, 6, 7) > 0.4
    x2 = torch.where(mask, x, torch.full_like(x, float("nan")))
    for dist in (pseudo_huber, l1_distance, l2_distance):
        torch.testing.assert_close(dist(x, y, mask), dist(x2, y, mask))


def test_distance_errors() -> None:
    with pytest.raises(InputError, match="same shape"):
        pseudo_huber(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3))
    with pytest.raises(InputError, match="mask must be a bool tensor"):
        l1_distance(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    with pytest.raises(InputError, match=r"does not broadcast to the data shape \(1, 1, 2, 2\)"):
        l2_distance(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(InputError, match="pseudo-Huber constant c must be > 0"):
        pseudo_huber(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), c=0.0)


def test_losses_ignore_masked_cells() -> None:
    """Perturbing x0 in masked cells (even to NaN) changes neither the iCT, the CT nor the DSM loss."""
    from xdownscale.core.sde import ScoreModel, dsm_loss

    cm = tiny_cm()
    x0 = torch.randn(4, 1, 8, 12)
    mask = torch.rand(1, 1, 8, 12) > 0.3
    x0 = torch.where(mask, x0, 0.0)
    x0_bad = torch.where(mask, x0, torch.full_like(x0, float("nan")))
    x0_other = torch.where(mask, x0, torch.randn_like(x0) * 10)

    def ict(x: torch.Tensor) -> torch.Tensor:
        return ict_loss(cm, x, step=3, total_steps=10, generator=torch.Generator().manual_seed(1), mask=mask)

    def ct(x: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        return ct_loss(cm, cm, x, step=3, total_steps=10, generator=g, mask=mask, distance="l1")

    score = ScoreModel(randomise(UNet(**TINY)))

    def dsm(x: torch.Tensor) -> torch.Tensor:
        return dsm_loss(score, x, generator=torch.Generator().manual_seed(1), mask=mask)

    def ect(x: torch.Tensor) -> torch.Tensor:
        return ect_loss(cm, x, step=7, total_steps=10, generator=torch.Generator().manual_seed(1), mask=mask)

    for loss in (ict, ct, dsm, ect):
        ref = loss(x0)
        assert torch.isfinite(ref)
        assert torch.equal(loss(x0_bad), ref)
        assert torch.equal(loss(x0_other), ref)
    # without the mask the perturbation does change the loss
    g = torch.Generator().manual_seed(1)
    assert not torch.equal(ict_loss(cm, x0_other, step=3, total_steps=10, generator=g), ict(x0))


def test_ict_loss_gradient_and_teacher_stopgrad() -> None:
    cm = ConsistencyModel(randomise(UNet(**TINY)))
    x0 = torch.randn(4, 1, 8, 8) * 0.5
    loss = ict_loss(cm, x0, step=0, total_steps=100, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = [p.grad for p in cm.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # same generator state, same loss (deterministic given the generator)
    a = ict_loss(cm, x0, step=5, total_steps=100, generator=torch.Generator().manual_seed(3))
    b = ict_loss(cm, x0, step=5, total_steps=100, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_ect_gap_curriculum() -> None:
    """Stage 0 gives a relative gap >= 1 (r clipped to sigma_min: denoising score matching); each of the
    six stages divides the gap by q = 2; the gap shrinks with t as 1 + 8 sigmoid(-t)."""
    t = torch.tensor([0.01, 0.5, 2.0, 80.0], dtype=torch.float64)
    first = ect_gap_ratio(t, 0, 600)
    assert torch.all(first >= 1.0) and torch.all(first[:-1] > first[1:])
    assert torch.allclose(first, 1.0 + 8.0 * torch.sigmoid(-t))
    for stage in range(6):
        ratio = ect_gap_ratio(t, stage * 100, 600)
        assert torch.allclose(ratio, first / 2.0**stage)
    assert torch.equal(ect_gap_ratio(t, 600, 600), ect_gap_ratio(t, 599, 600))  # last stage holds
    assert torch.equal(ect_gap_ratio(t, 99, 600), first)
    with pytest.raises(InputError, match="stages >= 1 and q > 1"):
        ect_gap_ratio(t, 0, 10, q=1.0)


def test_ect_loss_starts_as_denoising_and_has_gradients() -> None:
    """In stage 0 the teacher is the model at sigma_min, which the boundary condition makes the noisy
    input itself: the loss is then exactly a weighted pseudo-Huber denoising loss."""
    cm = ConsistencyModel(randomise(UNet(**TINY)))
    x0 = torch.randn(4, 1, 8, 8) * 0.5
    loss = ect_loss(cm, x0, step=0, total_steps=600, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = [p.grad for p in cm.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)

    # the oracle of stage 0, drawn with the same generator sequence
    g = torch.Generator().manual_seed(0)
    u = torch.randn((4,), generator=g, dtype=torch.float64)
    t = torch.exp(-1.1 + 2.0 * u).clamp(cm.sigma_min * 1.5, cm.sigma_max)
    z = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        student = cm(x0 + t.float()[:, None, None, None] * z, t.float())
        teacher = x0 + cm.sigma_min * z
        weight = (1.0 / (t - cm.sigma_min)).float()
        expected = (weight * pseudo_huber(student, teacher)).mean()
        got = ect_loss(cm, x0, step=0, total_steps=600, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(got, expected, rtol=1e-5)
    # a later stage has a smaller gap and a different (consistency) target
    later = ect_loss(cm, x0, step=599, total_steps=600, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(later) and not torch.allclose(later, got)


def test_ct_loss_distances() -> None:
    cm = ConsistencyModel(randomise(UNet(**TINY)))
    teacher = copy.deepcopy(cm).requires_grad_(False)
    x0 = torch.randn(2, 1, 8, 8) * 0.5
    for distance in ("l2", "l1"):
        loss = ct_loss(
            cm, teacher, x0, step=10, total_steps=100, generator=torch.Generator(), distance=distance
        )
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(InputError, match="distance must be one of"):
        ct_loss(cm, teacher, x0, step=0, total_steps=10, generator=torch.Generator(), distance="l3")


@pytest.mark.skipif(importlib.util.find_spec("lpips") is not None, reason="lpips is installed")
def test_lpips_unavailable_says_how_to_fix() -> None:
    cm = ConsistencyModel(UNet(**TINY))
    with pytest.raises(InputError, match=r"pip install 'xarray-downscale\[lpips\]'.*distance='l2'"):
        ct_loss(
            cm,
            cm,
            torch.zeros(1, 1, 8, 8),
            step=0,
            total_steps=10,
            generator=torch.Generator(),
            distance="lpips+l1",
        )


# --------------------------------------------------------------------------- samplers


def test_sdedit_at_sigma_min_returns_input() -> None:
    cm = tiny_cm()
    x = torch.randn(2, 1, 9, 13)
    noise = KeyedNoise([1, 2], seed=0, shape=(1, 9, 13))
    out = sdedit_cm(cm, x, SIGMA_MIN, noise=noise)
    assert torch.equal(out, x) and out is not x
    # a one-step sdedit at sigma_min + tiny noise stays close
    assert torch.allclose(sdedit_cm(cm, x, SIGMA_MIN * 1.001, noise=noise), x, atol=1e-3)


def test_same_samples_for_any_batch_composition() -> None:
    cm = tiny_cm()
    keys = [11, 22, 33, 44]
    shape = (1, 12, 16)
    x = torch.randn(4, *shape)
    full = generate_cm(cm, (4, *shape), steps=2, noise=KeyedNoise(keys, seed=5, shape=shape))
    edit = sdedit_cm(cm, x, 1.5, steps=3, noise=KeyedNoise(keys, seed=5, shape=shape))
    for b in (0, 2):
        one = generate_cm(cm, (1, *shape), steps=2, noise=KeyedNoise([keys[b]], seed=5, shape=shape))
        torch.testing.assert_close(one[0], full[b], atol=1e-5, rtol=0)
        e1 = sdedit_cm(cm, x[b : b + 1], 1.5, steps=3, noise=KeyedNoise([keys[b]], seed=5, shape=shape))
        torch.testing.assert_close(e1[0], edit[b], atol=1e-5, rtol=0)
    other_seed = generate_cm(cm, (4, *shape), steps=2, noise=KeyedNoise(keys, seed=6, shape=shape))
    assert not torch.allclose(other_seed, full)


def test_sample_cm_uses_the_given_levels() -> None:
    """A model that records its calls: levels and re-noising follow algorithm 1 of Song et al. (2023)."""

    class Recorder(torch.nn.Module):
        sigma_min, sigma_max = SIGMA_MIN, SIGMA_MAX

        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[float, torch.Tensor]] = []

        def forward(self, x: torch.Tensor, sigma: float, cond: torch.Tensor | None = None) -> torch.Tensor:
            self.calls.append((sigma, x.clone()))
            return torch.zeros_like(x)  # "denoised" = 0

    rec = Recorder()
    z = torch.randn(1, 1, 4, 4)
    out = sample_cm(rec, torch.ones(1, 1, 4, 4), [80.0, 2.0, 0.5], noise=lambda i: z * i)
    assert [c[0] for c in rec.calls] == [80.0, 2.0, 0.5]
    torch.testing.assert_close(rec.calls[1][1], math.sqrt(4.0 - SIGMA_MIN**2) * z * 1)
    torch.testing.assert_close(rec.calls[2][1], math.sqrt(0.25 - SIGMA_MIN**2) * z * 2)
    assert torch.equal(out, torch.zeros(1, 1, 4, 4))
    rec.calls.clear()
    generate_cm(rec, (1, 1, 4, 4), steps=3, noise=lambda i: z)
    levels = [c[0] for c in rec.calls]
    assert levels[0] == SIGMA_MAX and len(levels) == 3 and levels == sorted(levels, reverse=True)
    torch.testing.assert_close(rec.calls[0][1], SIGMA_MAX * z)


def test_sampler_errors() -> None:
    cm = tiny_cm()
    x = torch.randn(1, 1, 8, 8)
    noise = KeyedNoise([1], seed=0, shape=(1, 8, 8))
    with pytest.raises(InputError, match=r"sigma=100.0 is outside the model's noise range \[0.002, 80.0\]"):
        sdedit_cm(cm, x, 100.0, noise=noise)
    with pytest.raises(InputError, match="strictly decreasing sigmas"):
        sample_cm(cm, x, [1.0, 2.0], noise=noise)
    with pytest.raises(InputError, match="at least one noise level"):
        sample_cm(cm, x, [], noise=noise)
    with pytest.raises(InputError, match="steps must be >= 1"):
        sdedit_cm(cm, x, 1.0, steps=0, noise=noise)
    with pytest.raises(
        InputError, match=r"returned shape \(1, 1, 8, 8\) for draw 0, expected \(2, 1, 8, 8\)"
    ):
        generate_cm(cm, (2, 1, 8, 8), noise=noise)
    with pytest.raises(InputError, match=r"for draw 0, expected \(1, 1, 9, 9\)"):
        sdedit_cm(cm, torch.randn(1, 1, 9, 9), 1.0, noise=noise)


# --------------------------------------------------------------------------- training oracle


def gaussian_random_fields(n: int, size: int, slope: float, seed: int) -> torch.Tensor:
    """Periodic Gaussian random fields with power spectrum ~ k^-slope, scaled to std 0.5."""
    rng = np.random.default_rng(seed)
    k = np.hypot(np.fft.fftfreq(size)[:, None], np.fft.fftfreq(size)[None, :])
    amp = np.where(k > 0, k, np.inf) ** (-slope / 2)
    f = np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, size, size))) * amp).real
    return torch.tensor(f / f.std() * 0.5, dtype=torch.float32)[:, None]


def radial_psd(x: torch.Tensor) -> np.ndarray:
    """Radially averaged power spectrum (wavenumbers 1 .. size/2 - 1), averaged over samples."""
    a = x.double().numpy()[:, 0]
    size = a.shape[-1]
    p = (np.abs(np.fft.fft2(a - a.mean(axis=(1, 2), keepdims=True))) ** 2).mean(0)
    kbin = np.rint(np.hypot(np.fft.fftfreq(size)[:, None], np.fft.fftfreq(size)[None, :]) * size).astype(int)
    return np.array([p[kbin == i].mean() for i in range(1, size // 2)])


@pytest.fixture(scope="module")
def trained_cm() -> dict[str, float]:
    """Train a tiny CM with ict_loss on 16x16 power-law fields: 100 steps at the first curriculum stage
    (N = 11), then 100 steps through the whole curriculum (N = 11 -> 1281). One thread: the tensors are
    too small for a second one to help, and on a busy machine thread hand-offs cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_tiny_cm()
    finally:
        torch.set_num_threads(threads)


def _train_tiny_cm() -> dict[str, float]:
    torch.manual_seed(0)
    data = gaussian_random_fields(1024, 16, 3.0, seed=0)
    target = radial_psd(data)
    cm = ConsistencyModel(UNet(channels=(16, 16), num_res_blocks=1, attention=False, groups=8, periodic=True))

    def spectrum_error() -> float:
        cm.eval()
        s = generate_cm(cm, (64, 1, 16, 16), noise=KeyedNoise(list(range(64)), seed=1, shape=(1, 16, 16)))
        cm.train()
        return float(np.mean(np.abs(np.log(radial_psd(s)) - np.log(target))))

    def eval_loss() -> float:
        with torch.no_grad():
            losses = [
                ict_loss(cm, data[:64], step=0, total_steps=1, generator=torch.Generator().manual_seed(s))
                for s in range(4)
            ]
        return float(sum(losses)) / len(losses)

    out = {"spec0": spectrum_error(), "loss0": eval_loss()}
    opt = torch.optim.Adam(cm.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    steps = 100
    for phase in ("fixed", "curriculum"):
        for k in range(steps):
            x0 = data[torch.randint(0, len(data), (8,), generator=g)]
            step, total = (0, 1) if phase == "fixed" else (k, steps)
            loss = ict_loss(cm, x0, step=step, total_steps=total, generator=g)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if phase == "fixed":
            out["loss1"] = eval_loss()
    out["spec1"] = spectrum_error()
    return out


def test_training_lowers_the_ict_loss(trained_cm: dict[str, float]) -> None:
    # same N = 11 grid, same batch and generators before and after
    assert trained_cm["loss1"] < 0.9 * trained_cm["loss0"]


def test_training_moves_one_step_spectrum_to_target(trained_cm: dict[str, float]) -> None:
    # mean |log PSD(samples) - log PSD(data)|: untrained one-step samples are ~0 (error ~10)
    assert trained_cm["spec0"] > 5
    assert trained_cm["spec1"] < 0.3 * trained_cm["spec0"]
    assert trained_cm["spec1"] < 2.0


def test_a_noise_level_per_channel_for_joint_models() -> None:
    from xdownscale.core.samplers import sdedit_cm
    from xdownscale.nets.unet import UNet

    net = UNet(in_channels=2, out_channels=2, channels=(8, 16), num_res_blocks=1, groups=4, noise_channels=2)
    cm = ConsistencyModel(net)
    x = torch.randn(3, 2, 8, 8)
    # the boundary condition holds channel by channel: a channel at sigma_min comes back exactly
    levels = torch.tensor([[cm.sigma_min, 1.0]] * 3)
    out = cm(x, levels)
    assert torch.equal(out[:, 0], x[:, 0]) and not torch.allclose(out[:, 1], x[:, 1])
    # one level per sample is used for every channel
    assert torch.allclose(cm(x, 0.5), cm(x, torch.full((3, 2), 0.5)))
    # the embedding sees each channel's level: swapping the levels changes the output
    assert not torch.allclose(cm(x, torch.tensor([[0.2, 2.0]] * 3)), cm(x, torch.tensor([[2.0, 0.2]] * 3)))
    gen = torch.Generator().manual_seed(0)
    loss = ect_loss(
        cm, x, step=0, total_steps=10, generator=gen, mask=torch.ones(3, 2, 8, 8, dtype=torch.bool)
    )
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.raises(InputError, match="loss 'ict' trains one noise level"):
        ict_loss(cm, x, step=0, total_steps=10, generator=gen)
    z = torch.randn_like(x)
    assert sdedit_cm(cm, x, [0.5, 0.1], noise=lambda i: z).shape == x.shape
    with pytest.raises(InputError, match="steps=2 with a different noise level per variable"):
        sdedit_cm(cm, x, [0.5, 0.1], steps=2, noise=lambda i: z)
    one = ConsistencyModel(UNet(channels=(8, 16), num_res_blocks=1, groups=4))
    with pytest.raises(InputError, match="a level per channel needs a joint model"):
        one(x[:, :1].repeat(1, 2, 1, 1)[:, :2], torch.tensor([[0.5, 0.1]] * 3))
    with pytest.raises(InputError, match="noise_channels must be 1"):
        UNet(out_channels=2, channels=(8,), noise_channels=3)
