"""The ``maskprop`` command: ``maskprop bench`` (and ``train`` once the trainer lands)."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from collections.abc import Sequence
from datetime import date


def _machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _bench(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from .bench import bench_model, format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    with tqdm(total=len(args.models) * (args.warmup + args.repeats), desc="bench", file=sys.stderr) as bar:
        for name in args.models:
            results += bench_model(
                name, batch_size=args.batch_size, keep_ratios=args.keep_ratios, repeats=args.repeats,
                warmup=args.warmup, image_size=args.image_size, channels_last=args.channels_last, amp=args.amp,
                device=args.device, seed=args.seed, progress=lambda msg: bar.update(1),
            )
    print(f"{date.today()} | {_machine(args.device)} | channels_last={args.channels_last} amp={args.amp}")
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in results], f, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskprop", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser(
        "bench", help="time dense vs official-style masked vs compact VR-PGE training steps",
        description="Median step times of a dense step, the official-style VR-PGE step (two masked-dense forwards "
        "and backwards) and maskprop's compact VR-PGE step, interleaved in one process, with the ideal speedup "
        "3 f_D / (4 f_S) from the analytic FLOPs.",
    )
    bench.add_argument("--models", nargs="+", default=["resnet32"], help="registered model names")
    bench.add_argument("--batch-size", type=int, default=128)
    bench.add_argument("--keep-ratios", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    bench.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument("--image-size", type=int, default=32)
    bench.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--amp", choices=["none", "bf16"], default="none")
    bench.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", help="also write the results as JSON to this path")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"maskprop {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
