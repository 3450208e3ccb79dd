"""Operator calls of one dense training step and one compact VR-PGE step, on the CPU and on the ``meta`` device.

Usage:
    python tools/count_ops.py --models resnet32 resnet50 vgg19_bn --devices cpu meta

A GPU step is bounded by the host when its kernels are short: every operator call is paid for on the host, and every
call that computes launches a kernel. This counts, for a dense step (forward and backward) and maskprop's compact
VR-PGE step (forward and backward with ``m``, forward without autograd with ``m'``, the way ``maskprop bench`` runs
them):

* ``top-level calls``: ATen operator calls not made from inside another operator, from ``torch.profiler``, views and
  metadata calls included (CPU only: on ``meta`` the profiler also sees the calls of the Python meta kernels);
* ``operators``: every operator reaching the kernels below autograd (``TorchDispatchMode``), views included;
* ``compute``: operators that produce data on the model's device, seen below autograd (``TorchDispatchMode``), view
  and metadata operators left out: on CUDA, the kernel launches.

With the model on ``meta`` the code takes the paths it takes on CUDA (index sets copied to the device, flat indices
built there) without running any arithmetic, so the counts are those of a CUDA step on a machine without a GPU.
Calls on host tensors (the index arithmetic of ``use_mask`` before its copy) are reported apart as ``host``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import maskprop
from maskprop.sparse import random_mask, use_mask

# Operators that only make views, read metadata or allocate without writing: no kernel on a GPU.
NO_KERNEL = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "detach", "t", "permute", "expand", "slice",
    "select", "split", "split_with_sizes", "alias", "unsqueeze", "squeeze", "transpose", "unbind", "empty",
    "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "set_", "unflatten", "narrow",
    "_has_compatible_shallow_copy_type", "is_same_size", "_local_scalar_dense", "resize_", "view_as",
}


class _DeviceOps(TorchDispatchMode):
    """Counts the operators reaching the kernels, split into those touching ``device`` tensors and host-only ones."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device
        self.compute: Counter = Counter()
        self.host: Counter = Counter()
        self.all = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.all += 1
        if name.rstrip("_") in NO_KERNEL or name in NO_KERNEL:
            return out
        devices = set()
        torch.utils._pytree.tree_map(
            lambda t: devices.add(t.device.type) if isinstance(t, torch.Tensor) else None, (args, kwargs, out))
        (self.compute if self.device in devices else self.host)[name] += 1
        return out


def top_level_calls(fn: Callable[[], object]) -> Counter:
    """Names of the ATen operators ``fn`` calls, counting only calls not made from inside another ATen operator."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    calls: Counter = Counter()
    for event in prof.events():
        parent = event.cpu_parent
        if event.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::")):
            calls[event.name.removeprefix("aten::")] += 1
    return calls


def device_ops(fn: Callable[[], object], device: str) -> tuple[int, Counter, Counter]:
    """``(all, compute, host)`` operator counts of ``fn`` below autograd (see the module docstring)."""
    with _DeviceOps(device) as mode:
        fn()
    return mode.all, mode.compute, mode.host


def steps(name: str, device: str, keep: float, batch: int, size: int, align: int = 1) -> dict[str, Callable[[], None]]:
    """The dense step and the compact VR-PGE step of ``name`` on ``device``."""
    torch.manual_seed(0)
    model = maskprop.create_model(name).to(device).train()
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    generator = torch.Generator().manual_seed(0)
    groups = model.channel_groups()
    m, m2 = random_mask(groups, keep, generator), random_mask(groups, keep, generator)
    kwargs = {"align": align} if align != 1 else {}

    def dense() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def compact() -> None:
        model.zero_grad(set_to_none=True)
        with use_mask(model, m, "compact", **kwargs):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        with torch.no_grad(), use_mask(model, m2, "compact", **kwargs):
            F.cross_entropy(model(x), y)

    return {"dense": dense, "compact": compact}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet32", "resnet50", "vgg19_bn"])
    parser.add_argument("--devices", nargs="+", default=["cpu", "meta"], choices=["cpu", "meta", "cuda"])
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--align", type=int, default=1)
    parser.add_argument("--top", type=int, default=5, help="most frequent compute operators listed per step")
    parser.add_argument("--json", help="also write the counts as JSON to this path")
    args = parser.parse_args()
    if args.batch_size < 2:
        raise SystemExit(f"--batch-size {args.batch_size}: BatchNorm in training needs a batch of at least 2")
    torch.set_num_threads(1)
    rows = []
    print(f"keep {args.keep_ratio:g}, batch {args.batch_size}, align {args.align}")
    print("| model | device | step | top-level calls | / dense | operators | / dense | compute | / dense | host "
          "| most frequent compute |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name in args.models:
        size = 32 if name.startswith("vgg") or name == "resnet50" else 4
        for device in args.devices:
            fns = steps(name, device, args.keep_ratio, args.batch_size, size, args.align)
            counted = {}
            for step, fn in fns.items():
                fn()  # warm-up
                # The profiler's top-level calls on meta include the Python meta kernels' own calls: CPU only.
                calls = sum(top_level_calls(fn).values()) if device != "meta" else None
                ops, compute, host = device_ops(fn, device)
                counted[step] = {"calls": calls, "operators": ops, "compute": sum(compute.values()),
                                 "host": sum(host.values()), "compute_ops": dict(compute)}
            dense = counted["dense"]
            for step, row in counted.items():
                ratio = {k: None if row[k] is None else row[k] / dense[k] for k in ("calls", "operators", "compute")}
                frequent = ", ".join(f"{op} {n}" for op, n in Counter(row["compute_ops"]).most_common(args.top))
                shown = {k: ("-", "-") if row[k] is None else (row[k], f"{ratio[k]:.2f}")
                         for k in ("calls", "operators", "compute")}
                print(f"| {name} | {device} | {step} | {' | '.join(f'{a} | {b}' for a, b in shown.values())} "
                      f"| {row['host']} | {frequent} |", flush=True)
                rows.append({"model": name, "device": device, "step": step, **row,
                             **{f"{k}_ratio": v for k, v in ratio.items()}})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
