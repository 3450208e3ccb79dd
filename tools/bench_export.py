"""What an exported subnetwork gives: its inference latency and training step against the dense model.

For each model and keep ratio, three networks run interleaved in one process on the same inputs:

* ``dense``: the full model, no mask;
* ``compact``: the full model under ``use_mask(model, mask, "compact")`` (gathered weights every call: how maskprop
  trains a fixed subnetwork);
* ``exported``: ``maskprop.materialize(model, mask)``, the plain narrow model that ``maskprop export`` writes.

Measured: inference latency (eval mode, ``no_grad``) at the given batch sizes, and a training step (forward, cross
entropy, backward, SGD with momentum) at the largest one. A speedup is the median over the repetitions of the ratio of
the two times measured in that repetition, with its interquartile range; the ideal speedup beside it is the FLOPs
ratio (forward FLOPs for inference; forward plus backward FLOPs for the training step, ``maskprop.CostModel``).
Masks keep ``round(keep x channels)`` of every group, chosen at random.

Usage:
    python tools/bench_export.py --threads 1                   # resnet32, vgg19_bn at 32x32; resnet50 at 224
    python tools/bench_export.py --models resnet32 --keep-ratios 0.5 --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date

import torch
import torch.nn.functional as F
from torch import nn

import maskprop
from maskprop.bench import describe_machine, quartiles

# model: (image size, batch sizes); the training step runs at the largest batch.
DEFAULT_SETUPS = {"resnet32": (32, (1, 64)), "vgg19_bn": (32, (1, 64)), "resnet50": (224, (1, 8))}
NETWORKS = ("dense", "compact", "exported")


def _timer(fn: Callable[[], object], budget_s: float) -> Callable[[], float]:
    """A function returning the mean time of ``fn`` over enough calls to last about ``budget_s`` (calibrated once)."""
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    calls = max(1, math.ceil(budget_s / max(once, 1e-6)))

    def measure() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls

    return measure


def _inference(model: nn.Module, x: torch.Tensor, mask: dict | None) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad(), maskprop.use_mask(model, mask, "compact"):
            return model(x)
    return run


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: dict | None) -> Callable[[], object]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def run() -> object:
        optimizer.zero_grad(set_to_none=True)
        with maskprop.use_mask(model, mask, "compact"):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss
    return run


def _compare(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, budget_s: float) -> dict[str, list]:
    """Per-repetition times of every function, interleaved (the order rotates every repetition)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    timers = {name: _timer(fn, budget_s) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for rep in range(repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            times[name].append(timers[name]())
    return times


def _ratios(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    return quartiles([a / b for a, b in zip(numerator, denominator)])


def bench(name: str, image_size: int, batches: tuple[int, ...], keep: float, repeats: int, warmup: int,
          budget_s: float, channels_last: bool, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    model = maskprop.create_model(name)
    size = (3, image_size, image_size)
    mask = maskprop.random_mask(maskprop.channel_groups(model), keep, torch.Generator().manual_seed(seed))
    exported = maskprop.materialize(model, mask)
    cost = maskprop.CostModel(model, size)
    ideal_forward = cost.flops() / cost.flops(mask)
    ideal_train = (cost.flops() + cost.backward_flops()) / (cost.flops(mask) + cost.backward_flops(mask))
    networks = {"dense": (model, None), "compact": (model, mask), "exported": (exported, None)}
    rows = []

    def record(kind: str, batch: int, times: dict[str, list[float]], ideal: float) -> None:
        rows.append({
            "model": name, "input": image_size, "keep": keep, "kind": kind, "batch": batch,
            **{f"{n}_ms": 1e3 * statistics.median(times[n]) for n in NETWORKS},
            "exported_vs_dense": _ratios(times["dense"], times["exported"]),
            "exported_vs_compact": _ratios(times["compact"], times["exported"]),
            "compact_vs_dense": _ratios(times["dense"], times["compact"]),
            "flops_ideal": ideal,
        })

    def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(batch, *size)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, torch.randint(0, 10, (batch,)) % model.fc.out_features

    for net, _ in networks.values():
        net.eval()
    for batch in batches:
        x, _ = inputs(batch)
        fns = {n: _inference(net, x, m) for n, (net, m) in networks.items()}
        record("inference", batch, _compare(fns, repeats, warmup, budget_s), ideal_forward)
    for net, _ in networks.values():
        net.train()
    batch = max(batches)  # even: plain nn.Conv2d has no route around oneDNN's odd-batch strided 1x1 crash
    x, y = inputs(batch)
    fns = {n: _train_step(net, x, y, m) for n, (net, m) in networks.items()}
    record("train step", batch, _compare(fns, repeats, warmup, budget_s), ideal_train)
    return rows


def format_table(rows: list[dict]) -> str:
    def ratio(q: tuple[float, float, float]) -> str:
        return f"{q[1]:.2f}x ({q[0]:.2f}-{q[2]:.2f})"

    lines = [("| model | input | keep | measured | batch | dense ms | compact ms | exported ms | exported vs dense "
             "(IQR) | FLOPs ideal | exported vs compact (IQR) |"),
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['input']} | {r['keep']:g} | {r['kind']} | {r['batch']} | "
                     f"{r['dense_ms']:.2f} | {r['compact_ms']:.2f} | {r['exported_ms']:.2f} | "
                     f"{ratio(r['exported_vs_dense'])} | {r['flops_ideal']:.2f}x | {ratio(r['exported_vs_compact'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_SETUPS),
                        help=f"registered models; sizes and batches default to {DEFAULT_SETUPS}")
    parser.add_argument("--keep-ratios", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--image-size", type=int, help="input side for every model (default: per model)")
    parser.add_argument("--batches", type=int, nargs="+", help="inference batch sizes (default: per model); the "
                        "training step runs at the largest, which should be even")
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions (medians of paired ratios)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget", type=float, default=0.05, help="seconds each timed measurement lasts at least")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="inputs in channels_last, as maskprop train runs them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    maskprop.keep_freed_host_memory()
    maskprop.enlarge_onednn_primitive_cache()
    rows = []
    for name in args.models:
        image_size, batches = DEFAULT_SETUPS.get(name, (32, (1, 64)))
        image_size = args.image_size or image_size
        batches = tuple(args.batches or batches)
        for keep in args.keep_ratios:
            rows += bench(name, image_size, batches, keep, args.repeats, args.warmup, args.budget,
                          args.channels_last, args.seed)
            print(f"done {name} keep {keep}", file=sys.stderr, flush=True)
    print(f"{date.today()} | {describe_machine()} | channels_last={args.channels_last} repeats={args.repeats}")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
