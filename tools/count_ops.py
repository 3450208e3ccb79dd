"""Host-side cost of a training step: operator calls of a dense step and a compact VR-PGE step, on the CPU and on the
``meta`` device, and step times where the arithmetic is negligible.

Usage:
    python tools/count_ops.py --models resnet32 resnet50 vgg19_bn --devices cpu meta
    python tools/count_ops.py --models resnet32 vgg19_bn --devices cpu --steps dense masked compact --repeats 30
    python tools/count_ops.py --models timm:vit_tiny_patch16_224 --devices meta --image-size 224 \
        --model-kwargs '{"qk_norm": true, "scale_attn_norm": true, "scale_mlp_norm": true}'

A GPU step is bounded by the host when its kernels are short: every operator call is paid for on the host (Python,
dispatcher, launch), and every call that computes launches a kernel. This counts, for the steps of ``maskprop bench``
(``maskprop.bench.training_steps``: dense, forward and backward; maskprop's compact VR-PGE step, forward and backward
with ``m`` and forward without autograd with ``m'``; with ``--steps``, also the official-style masked VR-PGE step):

* ``top-level calls``: ATen operator calls not made from inside another operator, from ``torch.profiler``, views and
  metadata calls included (CPU only: on ``meta`` the profiler also sees the calls of the Python meta kernels);
* ``operators``: every operator reaching the kernels below autograd (``TorchDispatchMode``), views included;
* ``compute``: operators that produce data on the model's device, seen below autograd (``TorchDispatchMode``), view
  and metadata operators left out: on CUDA, the kernel launches.

With the model on ``meta`` the code takes the paths it takes on CUDA (index sets copied to the device, flat indices
built there) without running any arithmetic, so the counts are those of a CUDA step on a machine without a GPU.
Calls on host tensors (the index arithmetic of ``use_mask`` before its copy) are reported apart as ``host``.

``--repeats N`` also times the steps, interleaved, on the CPU or CUDA: on a batch of 2 at the smallest input each
model takes and one CPU thread, the step time is almost all host overhead, the bound on a GPU step whose kernels are
short.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import maskprop
from maskprop.bench import interleaved_times, mask_pair, random_batch, training_steps

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


def smallest_input(name: str) -> int:
    """The smallest image side ``name`` takes: 32 for VGGs (five poolings) and the ImageNet ResNet-50, else 4."""
    return 32 if name.startswith("vgg") or name == "resnet50" else 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet32", "resnet50", "vgg19_bn"])
    parser.add_argument("--devices", nargs="+", default=["cpu", "meta"], choices=["cpu", "meta", "cuda"])
    parser.add_argument("--steps", nargs="+", default=["dense", "compact"], choices=["dense", "masked", "compact"],
                        help="steps counted (dense always: the ratios are against it)")
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=0, help="0: the smallest each model takes")
    parser.add_argument("--align", type=int, default=1)
    parser.add_argument("--model-kwargs", type=json.loads, default={},
                        help="keywords every model is built with, as a JSON object (e.g. a timm ViT's "
                             "'{\"qk_norm\": true}')")
    parser.add_argument("--repeats", type=int, default=0, help="also time the steps: medians of this many (not meta)")
    parser.add_argument("--top", type=int, default=5, help="most frequent compute operators listed per step")
    parser.add_argument("--json", help="also write the counts as JSON to this path")
    args = parser.parse_args()
    if not isinstance(args.model_kwargs, dict):
        raise SystemExit(f"--model-kwargs {json.dumps(args.model_kwargs)}: expected a JSON object of keywords")
    if args.batch_size < 2:
        raise SystemExit(f"--batch-size {args.batch_size}: BatchNorm in training needs a batch of at least 2")
    if args.image_size and args.image_size < 32 and any(name.startswith("vgg") for name in args.models):
        raise SystemExit(f"--image-size {args.image_size}: the VGGs' five poolings need at least 32 (0 picks it)")
    torch.set_num_threads(1)  # the host's own work, not parallel arithmetic
    kinds = ["dense", *(step for step in args.steps if step != "dense")]
    rows = []
    print(f"keep {args.keep_ratio:g}, batch {args.batch_size}, align {args.align}, 1 thread"
          + (f", models built with {json.dumps(args.model_kwargs)}" if args.model_kwargs else "")
          + (f", times: medians of {args.repeats}" if args.repeats else ""))
    print("| model | image | device | step | top-level calls | / dense | operators | / dense | compute | / dense "
          "| host | time (ms) | / dense | most frequent compute |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name in args.models:
        size = args.image_size or smallest_input(name)
        for device in args.devices:
            torch.manual_seed(0)
            model = maskprop.create_model(name, **args.model_kwargs).to(device).train()
            x, y = random_batch(args.batch_size, size, device=device)
            masks = mask_pair(maskprop.channel_groups(model), args.keep_ratio, torch.Generator().manual_seed(0))
            fns = {kind: fn for kind, fn in training_steps(model, x, y, masks, align=args.align).items()
                   if kind in kinds}
            counted = {}
            for step, fn in fns.items():
                fn()  # warm-up
                # The profiler's top-level calls on meta include the Python meta kernels' own calls: CPU only.
                calls = sum(top_level_calls(fn).values()) if device != "meta" else None
                ops, compute, host = device_ops(fn, device)
                counted[step] = {"calls": calls, "operators": ops, "compute": sum(compute.values()),
                                 "host": sum(host.values()), "compute_ops": dict(compute), "time_ms": None}
            if args.repeats and device != "meta":
                times = interleaved_times(fns, args.repeats, device=torch.device(device))
                for step in fns:
                    counted[step]["time_ms"] = 1e3 * statistics.median(times[step])
            dense = counted["dense"]
            for step, row in counted.items():
                ratio = {k: None if row[k] is None else row[k] / dense[k]
                         for k in ("calls", "operators", "compute", "time_ms")}
                frequent = ", ".join(f"{op} {n}" for op, n in Counter(row["compute_ops"]).most_common(args.top))
                shown = [("-", "-") if row[k] is None else (row[k], f"{ratio[k]:.2f}")
                         for k in ("calls", "operators", "compute")]
                timed = "- | -" if row["time_ms"] is None else f"{row['time_ms']:.1f} | {ratio['time_ms']:.2f}"
                print(f"| {name} | {size} | {device} | {step} | {' | '.join(f'{a} | {b}' for a, b in shown)} "
                      f"| {row['host']} | {timed} | {frequent} |", flush=True)
                rows.append({"model": name, "image": size, "device": device, "step": step, **row,
                             **{f"{k}_ratio": v for k, v in ratio.items()}})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
