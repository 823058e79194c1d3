"""Benchmark: the consistency-model UNet - size, cost and throughput.

Prints the number of parameters, the GFLOP of one forward per field (``forward_gflops``: a multiply-add
counts 2; convolutions, matrix products and attention), and the throughput in fields per second of one
network evaluation (= one-step consistency downscaling of a field, without pre/post-processing) at the
paper's global grid (240 x 384) and at a small grid (64 x 64, or ``--small``), for

* fp32 (contiguous NCHW), and
* bf16 autocast + channels_last (model and input),

on the CPU, and on CUDA when a device is present. Every timing is the best of ``--iters`` runs after one
warm-up run (primitive creation, weight reordering), under ``torch.no_grad``, with random weights in the
zero-initialised layers (zeros would not change the cost, but make the numbers look odd). At 240 x 384 on
the CPU there is no warm-up: one run takes tens of seconds and the one-off set-up is a small part of it.

The default run keeps to about two minutes on a 2-core CPU (one timed run at 240 x 384); ``--quick`` skips
240 x 384 on the CPU. On a CPU without native bf16 (no AVX512-BF16/AMX) oneDNN emulates bf16, which is
several times slower than fp32: bf16 at 240 x 384 on such a CPU is then skipped unless ``--emulated-bf16``
is given, and the small-grid bf16 number is only a check that the path runs.

Usage::

    python benchmarks/bench_model.py                    # paper network, batch 1
    python benchmarks/bench_model.py --quick            # small grid only on the CPU
    python benchmarks/bench_model.py --channels 64,64,128,128 --batch-size 4
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator

import torch

from xdownscale.nets.unet import UNet, count_parameters, forward_gflops


def _randomise(net: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn: Callable[[], object], device: torch.device, iters: int, warmup: bool) -> float:
    if warmup:
        fn()
        _sync(device)
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


@contextlib.contextmanager
def _mode(device: torch.device, precision: str) -> Iterator[None]:
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def measure(
    net: UNet,
    device: torch.device,
    precision: str,
    batch: int,
    height: int,
    width: int,
    iters: int,
    warmup: bool = True,
) -> float:
    """Fields per second of one forward pass."""
    fmt = torch.channels_last if precision == "bf16" else torch.contiguous_format
    model = net.to(device=device, memory_format=fmt).eval()
    x = torch.randn(batch, net.in_channels, height, width, device=device).to(memory_format=fmt)
    labels = torch.full((batch,), 0.2, device=device)

    def run() -> object:
        with torch.no_grad(), _mode(device, precision):
            return model(x, labels)

    return batch / _best_time(run, device, iters, warmup)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--channels", default="128,128,256,256", help="UNet widths per level (default: paper)"
    )
    parser.add_argument("--num-res-blocks", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--iters", type=int, default=0, help="timed runs per case (default: CUDA 10; CPU 3, 1 at 240x384)"
    )
    parser.add_argument("--small", default="64x64", help="the small grid, HxW (default 64x64)")
    parser.add_argument("--quick", action="store_true", help="skip 240x384 on the CPU")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    parser.add_argument(
        "--emulated-bf16", action="store_true", help="time bf16 at 240x384 also on CPUs without native bf16"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    channels = tuple(int(c) for c in args.channels.split(","))
    net = UNet(channels=channels, num_res_blocks=args.num_res_blocks, periodic=True)
    _randomise(net)
    small = tuple(int(v) for v in args.small.lower().split("x"))
    grids = [(240, 384), (small[0], small[1])]

    print(f"UNet channels={list(channels)} num_res_blocks={args.num_res_blocks} attention at the bottleneck")
    print(f"parameters: {count_parameters(net):,} ({count_parameters(net) / 1e6:.2f} M)")
    for h, w in grids:
        print(f"GFLOP per forward at {h}x{w}: {forward_gflops(net, (1, 1, h, w)):.1f}")
    native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    print(
        f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, native CPU bf16 {native_bf16}, "
        f"batch size {args.batch_size}"
    )

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    header = (
        f"{'device':<8}{'grid':>10}{'fp32 fields/s':>16}{'bf16+CL fields/s':>19}{'bf16/fp32':>11}"
        f"{'fp32 GFLOP/s':>14}"
    )
    print()
    print(header)
    print("-" * len(header))
    for device in devices:
        for h, w in grids:
            if device.type == "cpu" and args.quick and (h, w) == (240, 384):
                continue
            big_cpu = device.type == "cpu" and (h, w) == (240, 384)
            iters = args.iters or (10 if device.type == "cuda" else 1 if big_cpu else 3)
            gflop = forward_gflops(net, (1, 1, h, w))
            fp32 = measure(net, device, "fp32", args.batch_size, h, w, iters, warmup=not big_cpu)
            if big_cpu and not native_bf16 and not args.emulated_bf16:
                bf16_txt, ratio_txt = "skipped", "-"
            else:
                bf16 = measure(net, device, "bf16", args.batch_size, h, w, iters, warmup=not big_cpu)
                bf16_txt, ratio_txt = f"{bf16:.3f}", f"{bf16 / fp32:.2f}"
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            grid = f"{h}x{w}"
            print(f"{name[:8]:<8}{grid:>10}{fp32:>16.3f}{bf16_txt:>19}{ratio_txt:>11}{fp32 * gflop:>14.1f}")
        net = net.to("cpu", memory_format=torch.contiguous_format)


if __name__ == "__main__":
    main()
