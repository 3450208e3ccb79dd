"""Where the time of a training step goes: per-operator self time of a dense step vs maskprop's compact VR-PGE step.

Usage:
    python tools/profile_step.py --model resnet32 --keep-ratio 0.5 --batch-size 128 --threads 2

Each step (``maskprop.bench.training_steps``) is profiled several times, alternating dense and compact, and the
minimum per operator is kept (the machine drifts; minima are the least disturbed). Prints the operators sorted by
their combined time.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import maskprop
from maskprop import enlarge_onednn_primitive_cache, keep_freed_host_memory
from maskprop.bench import mask_pair, random_batch, training_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    keep_freed_host_memory()  # as maskprop train / bench do: no page faults penalising the larger steps
    enlarge_onednn_primitive_cache()  # oneDNN keeps the kernels of the widths it meets
    if args.threads:
        torch.set_num_threads(args.threads)

    model = maskprop.create_model(args.model).train()
    x, y = random_batch(args.batch_size, args.image_size, channels_last=args.channels_last)
    masks = mask_pair(maskprop.channel_groups(model), args.keep_ratio, torch.Generator().manual_seed(0))
    steps = {name: fn for name, fn in training_steps(model, x, y, masks).items() if name in ("dense", "compact")}

    best: dict[str, dict[str, float]] = {name: {} for name in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(args.repeats):
        for name, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            times = best[name]
            for event in prof.key_averages():
                ms = event.self_cpu_time_total / 1e3
                times[event.key] = min(times.get(event.key, ms), ms)

    total = {k: sum(v.values()) for k, v in best.items()}
    print(f"{args.model} batch {args.batch_size} keep {args.keep_ratio} threads {torch.get_num_threads()}: "
          f"dense {total['dense']:.0f} ms, compact VR-PGE step {total['compact']:.0f} ms, "
          f"ratio {total['dense'] / total['compact']:.2f}x")
    keys = sorted(set(best["dense"]) | set(best["compact"]),
                  key=lambda k: -(best["dense"].get(k, 0) + best["compact"].get(k, 0)))
    print("| operator | dense ms | share | compact ms | share | dense / compact |")
    print("|---|---:|---:|---:|---:|---:|")
    for k in keys[: args.rows]:
        d, c = best["dense"].get(k, 0.0), best["compact"].get(k, 0.0)
        ratio = f"{d / c:.1f}x" if c > 0 else "-"
        print(f"| {k} | {d:.1f} | {d / total['dense']:.0%} | {c:.1f} | {c / total['compact']:.0%} | {ratio} |")


if __name__ == "__main__":
    main()
