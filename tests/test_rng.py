"""Keyed noise: a sample's noise depends only on (seed, key, draw index)."""

from __future__ import annotations

import pytest
import torch

from xdownscale.core.rng import KeyedNoise, sample_key
from xdownscale.errors import InputError


def test_sample_key_is_stable_and_typed() -> None:
    k = sample_key(1_000_000_000, 3, "pr")
    assert k == sample_key(1_000_000_000, 3, "pr")
    assert 0 <= k < 2**63
    assert sample_key(1) != sample_key(1.0) != sample_key("1")
    assert sample_key(1, 23) != sample_key(12, 3)  # parts are length-delimited
    assert sample_key(True) != sample_key(1)


def test_sample_key_value_is_pinned() -> None:
    # sha256 of the type-tagged, length-prefixed parts: pinned, so that saved ensembles stay reproducible
    assert sample_key(0, "a") == 7102473064043511919
    assert sample_key(20240101, 3) == 432801377530153072


def test_same_key_same_noise_regardless_of_batch() -> None:
    keys = [sample_key(t, m) for t in range(3) for m in range(2)]
    full = KeyedNoise(keys, seed=7, shape=(1, 5, 6))
    alone = KeyedNoise([keys[4]], seed=7, shape=(1, 5, 6))
    reordered = KeyedNoise(keys[::-1], seed=7, shape=(1, 5, 6))
    for i in (0, 1, 5):
        a = full(i)
        assert a.shape == (6, 1, 5, 6)
        assert torch.equal(a[4], alone(i)[0])
        assert torch.equal(a, reordered(i).flip(0))
    # calling again (or after other draws) gives the same values: no hidden state
    assert torch.equal(full(1), KeyedNoise(keys, seed=7, shape=(1, 5, 6))(1))


def test_different_key_draw_or_seed_different_noise() -> None:
    n = KeyedNoise([1, 2], seed=0, shape=(1, 8, 8))
    a = n(0)
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, n(1))
    assert not torch.equal(a, KeyedNoise([1, 2], seed=1, shape=(1, 8, 8))(0))
    # roughly standard normal
    big = KeyedNoise(list(range(64)), seed=3, shape=(1, 32, 32))(0)
    assert abs(big.mean().item()) < 0.02
    assert abs(big.std().item() - 1) < 0.02


def test_dtype_and_device_respected() -> None:
    n32 = KeyedNoise([5], seed=0, shape=(2, 3, 4))(0)
    assert n32.dtype == torch.float32 and n32.device.type == "cpu"
    n64 = KeyedNoise([5], seed=0, shape=(2, 3, 4), dtype=torch.float64)(0)
    assert n64.dtype == torch.float64
    nbf = KeyedNoise([5], seed=0, shape=(2, 3, 4), dtype=torch.bfloat16)(0)
    assert nbf.dtype == torch.bfloat16
    torch.testing.assert_close(nbf.float(), n32, atol=0.02, rtol=0.01)
    meta = KeyedNoise([5], seed=0, shape=(2, 3, 4), device="meta")(0)
    assert meta.device.type == "meta" and meta.shape == (1, 2, 3, 4)


@pytest.mark.gpu
def test_same_noise_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cpu = KeyedNoise([1, 2], seed=0, shape=(1, 4, 4))(3)
    cuda = KeyedNoise([1, 2], seed=0, shape=(1, 4, 4), device="cuda")(3)
    assert torch.equal(cpu, cuda.cpu())


def test_errors() -> None:
    with pytest.raises(InputError, match="at least one key"):
        KeyedNoise([], seed=0, shape=(1, 2, 2))
    with pytest.raises(InputError, match=r"keys must be ints .* got str \('a'\)"):
        KeyedNoise(["a"], seed=0, shape=(1, 2, 2))  # type: ignore[list-item]
    with pytest.raises(InputError, match=r"seed must be an int, got float \(1.5\)"):
        KeyedNoise([1], seed=1.5, shape=(1, 2, 2))  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"shape must have positive sizes, got \(1, 0, 2\)"):
        KeyedNoise([1], seed=0, shape=(1, 0, 2))
    with pytest.raises(InputError, match="floating-point dtype"):
        KeyedNoise([1], seed=0, shape=(1, 2, 2), dtype=torch.int64)
    with pytest.raises(InputError, match="draw index must be a non-negative int"):
        KeyedNoise([1], seed=0, shape=(1, 2, 2))(-1)
    with pytest.raises(InputError, match=r"takes int, float or str parts, got list"):
        sample_key([1, 2])  # type: ignore[arg-type]
