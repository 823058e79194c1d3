"""UNet backbone: shapes for any size, periodic boundaries, helpers, bf16 + channels_last."""

from __future__ import annotations

import json

import pytest
import torch

from xdownscale.errors import InputError
from xdownscale.nets.unet import UNet, count_parameters, forward_gflops, pad_xy

torch.set_num_threads(2)

TINY = {"channels": (8, 16, 16), "num_res_blocks": 1, "groups": 4, "num_heads": 2}


def randomise(net: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Give the zero-initialised layers random weights, so that the output is not identically 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


@pytest.mark.parametrize(
    "periodic,padding", [(True, "zeros"), (False, "zeros"), (False, "reflect"), (True, "reflect")]
)
def test_output_shape_any_size(periodic: bool, padding: str) -> None:
    net = randomise(UNet(**TINY, periodic=periodic, padding=padding)).eval()
    with torch.no_grad():
        for size in [(19, 29), (41, 61), (8, 11), (1, 1), (16, 16)]:
            y = net(torch.randn(2, 1, *size), torch.zeros(2))
            assert y.shape == (2, 1, *size)
            assert torch.isfinite(y).all()


def test_extra_input_and_several_output_channels() -> None:
    net = randomise(UNet(in_channels=3, out_channels=2, **TINY))
    y = net(torch.randn(4, 3, 12, 20), torch.linspace(-1, 1, 4))
    assert y.shape == (4, 2, 12, 20)
    # a scalar noise label is used for every sample
    assert net(torch.randn(2, 3, 12, 20), torch.tensor(0.3)).shape == (2, 2, 12, 20)


def test_zero_init_output() -> None:
    net = UNet(**TINY)
    assert torch.equal(net(torch.randn(1, 1, 8, 8), torch.zeros(1)), torch.zeros(1, 1, 8, 8))


def test_noise_label_changes_output() -> None:
    net = randomise(UNet(**TINY)).eval()
    x = torch.randn(1, 1, 8, 8)
    assert not torch.allclose(net(x, torch.tensor([-1.0])), net(x, torch.tensor([1.0])))


def test_periodic_roll_equivariance() -> None:
    """With circular padding in x and H, W multiples of 2**(levels-1), rolling x by a multiple of it commutes.

    (A network with stride-2 downsampling can only commute with shifts by multiples of its total stride;
    for sizes that need the internal pad-and-crop it does not commute at all.)
    """
    net = randomise(UNet(**TINY, periodic=True)).eval()
    factor = net.size_multiple
    assert factor == 4
    x = torch.randn(2, 1, 12, 24)
    labels = torch.tensor([0.1, -0.5])
    with torch.no_grad():
        y = net(x, labels)
        for k in (factor, 3 * factor, -2 * factor):
            y_rolled = net(torch.roll(x, k, dims=-1), labels)
            torch.testing.assert_close(y_rolled, torch.roll(y, k, dims=-1), atol=1e-5, rtol=0)
    # zero padding at the x boundary breaks it (the test above is not trivially true)
    flat = randomise(UNet(**TINY, periodic=False)).eval()
    with torch.no_grad():
        diff = flat(torch.roll(x, factor, dims=-1), labels) - torch.roll(flat(x, labels), factor, dims=-1)
    assert diff.abs().max() > 1e-3


def test_pad_xy_modes() -> None:
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    p = pad_xy(x, 1, 1, 2, 2, periodic=True, mode="zeros")
    assert p.shape == (1, 1, 5, 8)
    torch.testing.assert_close(p[0, 0, 1], torch.tensor([2.0, 3, 0, 1, 2, 3, 0, 1]))
    assert p[0, 0, 0].abs().sum() == 0 and p[0, 0, -1].abs().sum() == 0
    r = pad_xy(x, 1, 1, 1, 1, periodic=False, mode="reflect")
    torch.testing.assert_close(r[0, 0, 0, 1:-1], x[0, 0, 1])
    # circular padding wider than the axis wraps more than once
    w = pad_xy(torch.tensor([[[[1.0, 2.0]]]]), 0, 0, 3, 3, periodic=True)
    torch.testing.assert_close(w[0, 0, 0], torch.tensor([2.0, 1, 2, 1, 2, 1, 2, 1]))
    # reflect on an axis too short to reflect falls back to edge replication
    one = pad_xy(torch.ones(1, 1, 1, 1), 2, 2, 2, 2, periodic=False, mode="reflect")
    assert torch.equal(one, torch.ones(1, 1, 5, 5))


def test_config_round_trip() -> None:
    net = UNet(in_channels=2, out_channels=3, periodic=True, padding="reflect", dropout=0.1, **TINY)
    cfg = json.loads(json.dumps(net.config))
    again = UNet(**cfg)
    assert again.config == net.config
    again.load_state_dict(net.state_dict())  # same architecture, same parameter names


def test_parameter_and_gflop_helpers() -> None:
    net = UNet(**TINY)
    n = count_parameters(net)
    assert n == sum(p.numel() for p in net.parameters()) > 0
    g16 = forward_gflops(net, (1, 1, 16, 16))
    g32 = forward_gflops(net, (2, 1, 32, 32))  # per sample
    assert g16 > 0
    assert 3.5 < g32 / g16 < 4.5  # convolutions scale with the number of cells


def test_paper_size_network() -> None:
    """The paper's (128, 128, 256, 256) UNet: about 27 M parameters (counted without running it)."""
    net = UNet()
    assert 26e6 < count_parameters(net) < 28.5e6


def test_bf16_autocast_channels_last_close_to_fp32() -> None:
    """bf16 autocast + channels_last vs fp32: relative L2 error below 5e-2 (bf16 has an 8-bit mantissa;
    errors of ~1e-2 are typical for a few stacked convolutions)."""
    net = randomise(UNet(**TINY, periodic=True), std=0.05).eval()
    x = torch.randn(2, 1, 24, 40)
    labels = torch.tensor([0.2, -0.7])
    with torch.no_grad():
        ref = net(x, labels)
        net_cl = net.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net_cl(x.to(memory_format=torch.channels_last), labels)
    assert out.shape == ref.shape
    assert out.dtype == torch.bfloat16
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 5e-2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"channels": ()}, "non-empty sequence"),
        ({"padding": "circular"}, "padding must be one of"),
        ({"channels": (8, 12), "num_heads": 5}, "must be >= 1 and divide the bottleneck width 12"),
        ({"num_res_blocks": 0}, "num_res_blocks >= 1"),
        ({"in_channels": 0}, "in_channels >= 1"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"emb_dim": 0}, "emb_dim must be >= 1"),
    ],
)
def test_constructor_errors(kwargs: dict[str, object], match: str) -> None:
    args = {**TINY, **kwargs}
    with pytest.raises(InputError, match=match):
        UNet(**args)  # type: ignore[arg-type]


def test_forward_errors() -> None:
    net = UNet(in_channels=2, **TINY)
    with pytest.raises(InputError, match=r"expects input of shape \(B, 2, H, W\), got \(1, 1, 8, 8\)"):
        net(torch.zeros(1, 1, 8, 8), torch.zeros(1))
    with pytest.raises(InputError, match=r"noise_labels of shape \(2,\)"):
        net(torch.zeros(2, 2, 8, 8), torch.zeros(3))
    with pytest.raises(InputError, match=r"input shape \(B, C, H, W\)"):
        forward_gflops(net, (1, 8, 8))


def _padded_copy_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The 3x3 convolution as it was before the wrapped-column form: pad a copy, then convolve (the
    reference the current forward must agree with to float rounding)."""
    import torch.nn.functional as F

    from xdownscale.nets import unet

    conv = self.conv  # type: ignore[attr-defined]
    if self.periodic:  # type: ignore[attr-defined]
        x = unet._circular_x(x, 1, 1)
        if self.padding == "reflect":  # type: ignore[attr-defined]
            x = unet._pad_dim(x, 1, 1, -2, "reflect")
            return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0)
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, (1, 0))
    if self.padding == "reflect":  # type: ignore[attr-defined]
        x = unet._pad_dim(unet._pad_dim(x, 1, 1, -1, "reflect"), 1, 1, -2, "reflect")
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0)
    return conv(x)


@pytest.mark.parametrize(
    "periodic,padding", [(True, "zeros"), (True, "reflect"), (False, "zeros"), (False, "reflect")]
)
@pytest.mark.parametrize("size", [(12, 24), (9, 13), (1, 1), (16, 2)])
def test_forward_and_gradients_match_the_padded_copy_reference(
    periodic: bool, padding: str, size: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from xdownscale.nets import unet

    net = randomise(UNet(**TINY, periodic=periodic, padding=padding), std=0.2)
    x = torch.randn(3, 1, *size)
    labels = torch.tensor([0.1, -0.4, 1.3])

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        net.zero_grad()
        y = net(x, labels)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        return y.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]

    got, grads = run()
    monkeypatch.setattr(unet._Conv3x3, "forward", _padded_copy_forward)
    expected, expected_grads = run()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(expected_grads)
    for g, e in zip(grads, expected_grads, strict=True):
        assert float((g - e).norm()) <= 1e-4 * float(e.norm()) + 1e-7  # float rounding only


def test_wrapped_columns_of_a_strided_convolution() -> None:
    """Odd and even widths: the stride-2 convolution reads past the right edge only for odd widths."""
    from xdownscale.nets.unet import _Conv3x3

    conv = randomise(_Conv3x3(2, 3, stride=2, periodic=True, padding="zeros"))
    for width in (7, 8, 1, 2):
        x = torch.randn(2, 2, 6, width)
        padded = torch.cat([x[..., -1:], x, x[..., :1]], dim=-1)
        expected = torch.nn.functional.conv2d(padded, conv.conv.weight, conv.conv.bias, 2, (1, 0))
        torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-6)


def test_shipped_weights_load_into_the_network_unchanged() -> None:
    """State-dict keys and shapes are those of the shipped weights (strict load of every shipped model)."""
    import xdownscale

    for name in ("cm-eobs-iberia-0.25deg-pr", "sde-eobs-iberia-0.25deg-pr"):
        model = xdownscale.load_model(name)
        net = UNet(**model.card["architecture"]["config"])
        net.load_state_dict(model.network.net.state_dict(), strict=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_periodic_network_on_cuda_in_bf16_agrees_with_the_cpu() -> None:
    """The wrapped-column convolution on CUDA (NCHW, bf16 autocast) against the fp32 CPU forward."""
    net = randomise(UNet(**TINY, periodic=True), std=0.05).eval()
    x = torch.randn(4, 1, 24, 40)
    labels = torch.tensor([0.2, -0.7, 1.0, 0.0])
    with torch.no_grad():
        ref = net(x, labels)
        gpu = net.to("cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = gpu(x.to("cuda"), labels.to("cuda")).float().cpu()
    assert ((out - ref).norm() / ref.norm()).item() < 5e-2


def test_static_inputs_are_extra_input_channels_saved_with_the_weights() -> None:
    """A network with fixed per-cell inputs equals a plain network whose input carries them as channels,
    and they travel in the state dict (a rebuilt network from the config computes the same)."""
    static = torch.randn(3, 12, 20, generator=torch.Generator().manual_seed(1))
    net = randomise(UNet(static_channels=3, static_shape=(12, 20), **TINY), std=0.05).eval()
    net.set_static(static)
    plain = UNet(in_channels=4, **TINY).eval()
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if k != "static"})
    x, labels = torch.randn(2, 1, 12, 20), torch.tensor([0.3, -0.4])
    with torch.no_grad():
        out = net(x, labels)
        torch.testing.assert_close(out, plain(torch.cat([x, static.expand(2, -1, -1, -1)], 1), labels))
        again = UNet(**json.loads(json.dumps(net.config))).eval()
        assert not again.static.any()  # zeros until the weights are loaded
        again.load_state_dict(net.state_dict())
        torch.testing.assert_close(again(x, labels), out)
        net.set_static(static.flip(-1))  # where the network is matters
        assert not torch.allclose(net(x, labels), out)
    assert net.config["static_channels"] == 3 and net.config["static_shape"] == [12, 20]
    assert "static_channels" not in UNet(**TINY).config  # plain networks keep their old configuration


def test_static_input_errors() -> None:
    with pytest.raises(InputError, match=r"static_channels=2 needs static_shape=\(H, W\)"):
        UNet(static_channels=2, **TINY)
    net = UNet(static_channels=2, static_shape=(8, 8), **TINY)
    with pytest.raises(InputError, match=r"fixed per-cell inputs for a 8 x 8 grid .* 8 x 16 field"):
        net(torch.zeros(1, 1, 8, 16), torch.zeros(1))
    with pytest.raises(
        InputError, match=r"must have shape \(2, 8, 8\) \(static_channels, H, W\), got \(1, 8, 8\)"
    ):
        net.set_static(torch.zeros(1, 8, 8))
    with pytest.raises(InputError, match="must be finite"):
        net.set_static(torch.full((2, 8, 8), float("nan")))
    with pytest.raises(InputError, match="has no static inputs"):
        UNet(**TINY).set_static(torch.zeros(1, 8, 8))
