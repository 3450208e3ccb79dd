"""A finetune step of the narrow model against the compact finetune step it replaces.

For each model, one fixed mask keeping ``round(keep x channels)`` of every group (chosen at random), and two trainers
on copies of the same weights, run interleaved in one process on the same batch:

* ``compact``: ``subnet_step(model, sgd, batch, mask, ctx)``, the full model under ``use_mask(..., "compact")``
  (gathered weights, BatchNorm parameters and statistics, and scattered gradients at every step);
* ``narrow``: ``NarrowSubnetwork(model, mask, sgd).step(batch, ctx)`` (``maskprop/train/narrow.py``), the physically
  narrow model built once.

Both use the finetune optimizer (fused SGD, momentum 0.9, weight decay 5e-4). Every repetition times ``--steps`` steps
of each, alternating; the speedup is the median over the repetitions of the ratio of the two medians measured in that
repetition, with its interquartile range.

Under torchrun each process takes its share of the batch and both trainers run through DDP wrappers, as the finetune
phase does there (the full model's wrapper for ``compact``; the narrow model's own, its ``step_model``, for
``narrow``); rank 0 prints.

Usage:
    python tools/bench_narrow.py --threads 1                     # resnet32 and vgg19_bn at 32x32, keep 0.5
    python tools/bench_narrow.py --models resnet32 --batch-size 64 --repeats 5 --json out.json
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 tools/bench_narrow.py --threads 1      # 2 processes, gloo
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
from torch import nn

import maskprop
from maskprop.bench import describe_machine, interleaved_times, quartiles
from maskprop.train.distributed import init_from_env, leave, wrap_model
from maskprop.train.narrow import NarrowSubnetwork
from maskprop.train.optim import weight_optimizer
from maskprop.train.steps import StepContext, subnet_step


def bench(name: str, keep: float, batch_size: int, repeats: int, steps: int, warmup: int, world_size: int = 1) -> dict:
    torch.manual_seed(0)
    model = maskprop.create_model(name, num_classes=10).train()
    mask = maskprop.random_mask(maskprop.channel_groups(model), keep, torch.Generator().manual_seed(1))
    ctx = StepContext(nn.CrossEntropyLoss(), torch.device("cpu"), maskprop.CostModel(model, (3, 32, 32)))
    compact_opt = weight_optimizer(model.parameters(), 1e-3, 0.9, 5e-4)
    twin = maskprop.create_model(name, num_classes=10).train()
    twin.load_state_dict(model.state_dict())
    narrow = NarrowSubnetwork(twin, mask, weight_optimizer(twin.parameters(), 1e-3, 0.9, 5e-4))
    share = batch_size // world_size
    x, y = torch.randn(share, 3, 32, 32), torch.randint(0, 10, (share,))
    full = model
    if world_size > 1:  # as the finetune under torchrun: each trainer through a DDP wrapper of its own
        full = wrap_model(model, torch.device("cpu"))
        narrow.step_model = wrap_model(narrow.model, torch.device("cpu"))
    runs = {"compact": lambda: subnet_step(full, compact_opt, (x, y), mask, ctx),
            "narrow": lambda: narrow.step((x, y), ctx)}
    # A repetition is ``steps`` consecutive rounds of the alternation; its median per kind gives one ratio.
    flat = interleaved_times(runs, repeats * steps, warmup)
    reps = {k: [statistics.median(flat[k][r * steps:(r + 1) * steps]) for r in range(repeats)] for k in runs}
    q1, q2, q3 = quartiles([c / n for c, n in zip(reps["compact"], reps["narrow"])])
    return {"model": name, "keep_ratio": keep, "batch_size": batch_size, "processes": world_size,
            "compact_s": statistics.median(reps["compact"]), "narrow_s": statistics.median(reps["narrow"]),
            "speedup": q2, "speedup_iqr": [q1, q3], "repeats": repeats, "steps": steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet32", "vgg19_bn"])
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    place = init_from_env("gloo")
    rows = []
    for name in args.models:
        row = bench(name, args.keep, args.batch_size, args.repeats, args.steps, args.warmup, place.world_size)
        rows.append(row)
        if not place.is_main:
            continue
        print(f"{name:10s} keep {row['keep_ratio']:.2f} batch {row['batch_size']}: "
              f"compact {row['compact_s'] * 1e3:7.1f} ms  narrow {row['narrow_s'] * 1e3:7.1f} ms  "
              f"speedup {row['speedup']:.2f}x "
              f"(IQR {row['speedup_iqr'][0]:.2f}-{row['speedup_iqr'][1]:.2f}), {place.world_size} process(es)",
              flush=True)
    leave()
    if args.json and place.is_main:
        info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": describe_machine(),
                "rows": rows}
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
