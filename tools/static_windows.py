"""The capacity windows a run's static-shape steps meet (``cuda_graphs`` on a GPU), measured on the CPU.

With ``cuda_graphs`` on, every search step computes each channel group at a fixed capacity that is re-chosen at the end
of an epoch; every change starts a new *window* (a new shape, a new graph capture and its eager warm-up steps;
docs/methods.md, "How a step runs on a GPU"). How many windows a run meets depends only on how its keep probabilities
move, so this tool runs a recipe through ``maskprop.fit`` with the same static steps, eagerly on the CPU, and prints
the summary's ``static_steps`` report and the capacities of each window.

Usage:
    python tools/static_windows.py recipes/quickstart.yaml model.name=resnet32 sparsity.align=8

Overrides are ``key=value`` as for ``maskprop train``; ``sparsity.align`` defaults to 8, the alignment CUDA runs use.
A search re-chooses its capacities at most once an epoch after its warm-up, so a run meets at most
``optim.epochs - sparsity.warmup_epochs`` search windows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

import maskprop
from maskprop.train import setup, static_steps
from maskprop.train.config import load_config
from maskprop.train.graphs import GraphsChoice


@contextlib.contextmanager
def static_steps_on_the_cpu() -> Iterator[list[dict[str, int]]]:
    """Within: runs take the static-shape steps eagerly (what ``cuda_graphs`` selects on CUDA), and the list yielded
    receives the capacities of every search window as it is built."""
    windows: list[dict[str, int]] = []
    build, resolve = static_steps.SearchStep.__init__, setup.resolve_cuda_graphs

    def recording(self, model, scores, optimizers, sparsity, ctx, capacities, *args, **kwargs):
        windows.append({g: int(c) for g, c in capacities.items()})
        build(self, model, scores, optimizers, sparsity, ctx, capacities, *args, **kwargs)

    static_steps.SearchStep.__init__ = recording
    setup.resolve_cuda_graphs = lambda cfg, device, world, model=None: GraphsChoice(True, False)
    try:
        yield windows
    finally:
        static_steps.SearchStep.__init__, setup.resolve_cuda_graphs = build, resolve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="a recipe (yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value, as for maskprop train")
    parser.add_argument("--json", type=Path, help="also write the report and the windows' capacities here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = list(args.overrides)
    if not any(o.startswith("sparsity.align=") for o in overrides):
        overrides.append("sparsity.align=8")
    overrides += ["device=cpu", "cuda_graphs=false", "out=null"]  # static steps switched on below; nothing written
    try:
        cfg = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    with static_steps_on_the_cpu() as windows:
        summary = maskprop.fit(cfg, out=None)
    report = dict(summary["static_steps"])
    channels = sum(summary["widths"].values()) if summary.get("widths") else None
    print(f"{cfg.model.name}, {cfg.optim.epochs} epochs ({cfg.sparsity.warmup_epochs} warm-up, "
          f"{cfg.sparsity.anneal_epochs} anneal), align {cfg.sparsity.align}: {report['search_windows']} search "
          f"windows, {report['search_shapes']} distinct search shapes, {report['overflow_steps']} masks cut "
          f"({report['overflow_channels']} channels); accuracy {summary['accuracy']:.1f}%")
    print("window  capacity (channels computed per step)  groups")
    for i, capacities in enumerate(windows, 1):
        print(f"{i:>6}  {sum(capacities.values()):>38}  " + " ".join(str(c) for c in capacities.values()))
    if channels is not None:
        print(f"the fixed subnetwork keeps {channels} channels")
    if args.json:
        args.json.write_text(json.dumps({"config": cfg.model_dump(mode="json"), "static_steps": report,
                                         "windows": windows, "accuracy": summary["accuracy"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
