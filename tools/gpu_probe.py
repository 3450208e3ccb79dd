"""Per-step probe of the trainer's real steps on a GPU: wall time, GPU-busy time, kernel launches and host syncs.

Usage:
    python tools/gpu_probe.py --models resnet32:32:256 resnet50:224:256 --steps 30 --json out/probe.json
    python tools/gpu_probe.py --device cpu --models resnet20:16:8 --steps 2      (a dry run of the script itself)

Steps, each ``maskprop.train.steps`` as training runs it: ``dense`` (``subnet_step`` without a mask), ``finetune``
(``subnet_step`` with one fixed sampled mask), ``search`` (``vrpge_step`` with fresh masks every step, so new widths
and new cuDNN plans keep coming, as in training) and ``search_fixed`` (``vrpge_step`` with the mask generator reset
every step: the same two masks, no new shapes). The score learning rate is 0 so that the scores stay at the keep
ratio (the start of a search) and ``search_fixed`` sees the same masks every step.

Wall time is the median between CUDA events around a step; GPU-busy time is the sum of the kernels' device time in
one profiled step (busy / wall near 1: the GPU bounds the step; far below: the host does); launches are the kernel
launch calls of that step; syncs are the places ``torch.cuda.set_sync_debug_mode`` reports in one more step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import maskprop
from maskprop.bench import describe_machine
from maskprop.cost import CostModel
from maskprop.train.config import SparsityConfig
from maskprop.train.optim import score_optimizer, weight_optimizer
from maskprop.train.steps import StepContext, subnet_step, vrpge_step
from maskprop.vrpge import ChannelScores

_LAUNCHES = {"cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"}


def _wall(fn, device: torch.device) -> float:
    """Milliseconds of one call of ``fn``."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end)


def _profiled(fn, device: torch.device) -> tuple[float, int, int]:
    """``(GPU-busy ms, kernels, launch calls)`` of one step."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time_total for e in kernels) / 1e3
    launches = sum(1 for e in prof.events() if e.name in _LAUNCHES)
    return busy, len(kernels), launches


def _syncs(fn, device: torch.device) -> list[str]:
    """Where one step synchronises the host with the GPU (file:line in maskprop)."""
    if device.type != "cuda":
        return []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename.split('maskprop/')[-1]}:{w.lineno}" for w in caught if "ynchroniz" in str(w.message)]


def probe(name: str, size: int, batch: int, device: torch.device, steps: int, keep: float, align: int,
          amp: bool) -> list[dict]:
    torch.manual_seed(0)
    model = maskprop.create_model(name, num_classes=10).train()
    cost = CostModel(model, (3, size, size))
    model.to(device).to(memory_format=torch.channels_last)
    scores = ChannelScores(maskprop.channel_groups(model), keep, keep)
    optimizers = (weight_optimizer(model.parameters(), 0.01, 0.9, 5e-4), score_optimizer(scores.scores, 0.0))
    ctx = StepContext(nn.CrossEntropyLoss(), device, cost, torch.bfloat16 if amp else None, True, align=align)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    generator = torch.Generator().manual_seed(1)
    fixed = scores.sample(torch.Generator().manual_seed(2))
    sparsity = SparsityConfig()

    def search_fixed():
        generator.manual_seed(1)
        return vrpge_step(model, scores, optimizers, (x, y), generator, sparsity, ctx)

    runs = {
        "dense": lambda: subnet_step(model, optimizers[0], (x, y), None, ctx),
        "finetune": lambda: subnet_step(model, optimizers[0], (x, y), fixed, ctx),
        "search": lambda: vrpge_step(model, scores, optimizers, (x, y), generator, sparsity, ctx),
        "search_fixed": search_fixed,
    }
    rows = []
    for step, fn in runs.items():
        for _ in range(3):
            fn()
        times = [_wall(fn, device) for _ in range(steps)]
        busy, kernels, launches = _profiled(fn, device)
        syncs = _syncs(fn, device)
        wall = statistics.median(times)
        rows.append({"model": name, "image": size, "batch": batch, "keep": keep, "align": align, "amp": amp,
                     "step": step, "wall_ms": wall, "min_ms": min(times), "max_ms": max(times), "gpu_busy_ms": busy,
                     "busy_fraction": busy / wall if wall else None, "kernels": kernels, "launches": launches,
                     "syncs": len(syncs), "sync_sites": sorted(set(syncs))})
        print(f"{name} {size}px b{batch} align {align} {step:13s} wall {wall:8.2f} ms | busy {busy:8.2f} ms "
              f"({busy / wall:.0%}) | kernels {kernels} launches {launches} | syncs {len(syncs)} {sorted(set(syncs))}",
              flush=True)
    dense = rows[0]["wall_ms"]
    for row in rows:
        row["speedup_vs_dense"] = dense / row["wall_ms"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet32:32:256"], help="name:image_size:batch")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per kind (median reported)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--align", type=int, nargs="+", default=[8], help="one probe per alignment")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast")
    parser.add_argument("--json", help="write the rows as JSON to this path")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda":
        torch.set_num_threads(1)
    print(describe_machine(args.device), flush=True)
    rows = []
    for spec in args.models:
        name, size, batch = spec.split(":")
        for align in args.align:
            rows += probe(name, int(size), int(batch), device, args.steps, args.keep, align, args.amp)
        if device.type == "cuda":
            print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
            torch.cuda.reset_peak_memory_stats()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
