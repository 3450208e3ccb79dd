"""Whole ``maskprop train`` runs of the short search on ``shapes``, per model, against their dense twins.

Usage (what ``tools/gpu_check.sh`` runs on a GPU):
    python tools/e2e_runs.py --out OUT --models resnet32:32:10240:4 vgg19_bn:32:10240:4 resnet50:224:2560:8
    python tools/e2e_runs.py --out OUT --models resnet20:16:128 --device cpu --batch-size 32 \
        --set data.val_size=64 sparsity.fix_examples=64     (a dry run on the CPU: the same runs, eager)

A model is ``NAME:IMAGE:TRAIN_IMAGES[:WORKERS]`` (loader processes: 4 as the CIFAR recipes, 8 at 224 pixels, so that the
loader keeps up with graphed steps of a few milliseconds). Each sparse run is ``recipes/quickstart.yaml`` (VR-PGE, keep
0.5) with the model, batch (256 by default, as the GPU targets), a short schedule (``--epochs`` search epochs: one dense
warm-up, a two-epoch anneal, the rest searching; ``--finetune-epochs``), bf16, channels_last and ``cuda_graphs=true`` on
CUDA. Its dense twin is the same recipe with ``method=dense`` trained for the search plus finetune epochs. The summary's
measured speedup is what the targets' last row is about: dense steps timed inside the run, beside its own steps. So the
sparse runs go one after the other (nothing else on the device while they time), and the dense twins, whose accuracy
alone is read, all at once afterwards. Every run has ``--timeout`` seconds. Writes ``e2e.json`` (each run's summary
fields, exit status and seconds) and ``e2e.md`` (the table, with the targets) into ``--out``, and each run's directory
beside them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "quickstart.yaml"
# The GPU targets for a whole run's measured speedup (bf16, channels_last, batch 256, keep 0.5, on an H200).
TARGETS = {"resnet32": 1.0, "vgg19_bn": 1.2, "resnet50": 1.15}
FIELDS = ("accuracy", "measured_speedup", "measured_speedup_iqr", "train_cost_saving", "run_time_s", "static_steps",
          "speedup_warning")


@dataclass(frozen=True)
class ModelRun:
    """One model's pair of runs: ``NAME:IMAGE:TRAIN_IMAGES[:WORKERS]``."""

    name: str
    image: int
    train_size: int
    workers: int = 0

    @classmethod
    def parse(cls, text: str) -> ModelRun:
        parts = text.split(":")
        try:
            if len(parts) not in (3, 4):
                raise ValueError
            numbers = [int(p) for p in parts[1:]]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:IMAGE:TRAIN_IMAGES[:WORKERS], e.g. "
                                             f"resnet50:224:2560:8") from None
        if min(numbers) < 0 or numbers[0] < 8 or numbers[1] < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: image >= 8, train images >= 1 and workers >= 0 expected")
        return cls(parts[0], *numbers)

    @property
    def tag(self) -> str:
        return f"{self.name}_{self.image}px"


def overrides(model: ModelRun, args: argparse.Namespace, dense: bool) -> list[str]:
    """The ``key=value`` overrides of one run on top of the quickstart recipe."""
    cuda = args.device.startswith("cuda")
    common = [f"device={args.device}", f"amp={'bf16' if cuda else 'none'}", f"cuda_graphs={str(cuda).lower()}",
              "channels_last=true", "log_every=20", "save_every=0", "eval_every=0", f"seed={args.seed}",
              f"model.name={model.name}", f"data.image_size={model.image}", f"data.train_size={model.train_size}",
              f"data.workers={model.workers}", f"data.batch_size={args.batch_size}"]
    if dense:
        run = ["method=dense", f"optim.epochs={args.epochs + args.finetune_epochs}"]
    else:
        run = [f"optim.epochs={args.epochs}", "sparsity.warmup_epochs=1", "sparsity.anneal_epochs=2",
               f"finetune.epochs={args.finetune_epochs}"]
    return common + run + list(args.set)


def launch(model: ModelRun, args: argparse.Namespace, dense: bool) -> tuple[subprocess.Popen, Path, float]:
    out = Path(args.out) / f"{model.tag}_{'dense' if dense else 'vrpge'}"
    command = [sys.executable, "-m", "maskprop.cli", "train", str(RECIPE), *overrides(model, args, dense), "--out",
               str(out), "--threads", args.threads]
    with open(out.with_suffix(".log"), "w") as log:  # the child writes through its own copy of the descriptor
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return process, out, time.perf_counter()


def finish(process: subprocess.Popen, out: Path, start: float, timeout: float) -> dict:
    """Wait for one run (killing it past ``timeout``): its exit status, seconds and summary fields."""
    try:
        status = process.wait(timeout=max(1.0, timeout - (time.perf_counter() - start)))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        status = "timeout"
    row = {"exit_status": status, "seconds": round(time.perf_counter() - start, 1), "run": out.name}
    summary = out / "summary.json"
    if status == 0 and summary.is_file():
        data = json.loads(summary.read_text())
        row.update({k: data.get(k) for k in FIELDS})
    return row


def table(rows: dict[str, dict]) -> str:
    def cell(value, fmt: str = "{:.2f}") -> str:
        return "-" if value is None else fmt.format(value)

    lines = [("| model | sparse top-1 % | dense twin top-1 % | measured speedup (IQR) | target | train-cost saving | "
              "capacity windows | captures | their warm-up and capture s | sparse run s | dense run s (concurrent) |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for tag, pair in rows.items():
        sparse, dense = pair.get("vrpge", {}), pair.get("dense", {})
        iqr = sparse.get("measured_speedup_iqr")
        speedup = cell(sparse.get("measured_speedup"), "{:.2f}x")
        if iqr:
            speedup += f" ({iqr[0]:.2f}-{iqr[1]:.2f})"
        static = sparse.get("static_steps") or {}
        lines.append(f"| {tag} | {cell(sparse.get('accuracy'), '{:.1f}')} | {cell(dense.get('accuracy'), '{:.1f}')} "
                     f"| {speedup} | {cell(TARGETS.get(pair['model']), '>= {:.2f}x')} "
                     f"| {cell(sparse.get('train_cost_saving'), '{:.2f}x')} | {static.get('search_windows', '-')} "
                     f"| {static.get('graph_captures', '-')} | {cell(static.get('warmup_capture_s'), '{:.1f}')} "
                     f"| {sparse.get('seconds', '-')} "
                     f"| {dense.get('seconds', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for the runs, e2e.json and e2e.md (created)")
    parser.add_argument("--models", nargs="+", type=ModelRun.parse,
                        default=[ModelRun.parse(m) for m in ("resnet32:32:10240:4", "vgg19_bn:32:10240:4",
                                                              "resnet50:224:2560:8")])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=6, help="search epochs (1 warm-up + 2 anneal + the rest)")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", default="auto", help="torch CPU threads per run: auto (maskprop train's "
                        "default: the cores the other processes leave free), N, or 0 (torch's default)")
    parser.add_argument("--timeout", type=float, default=45.0, help="seconds each run may take (default 45)")
    parser.add_argument("--set", nargs="*", default=[], help="more key=value overrides for every run")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.epochs < 4 or args.finetune_epochs < 0 or args.timeout <= 0:
        parser.error(f"--batch-size {args.batch_size}, --epochs {args.epochs}, --finetune-epochs "
                     f"{args.finetune_epochs}, --timeout {args.timeout}: expected a batch >= 1, >= 4 search epochs "
                     f"(warm-up, anneal, search), >= 0 finetune epochs and a positive timeout")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {m.tag: {"model": m.name} for m in args.models}

    def record(model: ModelRun, kind: str, row: dict) -> None:
        rows[model.tag][kind] = row
        print(f"{model.tag} {kind}: {json.dumps(row)}", flush=True)
        (Path(args.out) / "e2e.json").write_text(json.dumps(rows, indent=2))  # a check stopped outside keeps it
        (Path(args.out) / "e2e.md").write_text(table(rows))

    for model in args.models:  # one at a time: their measured speedups are timings
        record(model, "vrpge", finish(*launch(model, args, dense=False), args.timeout))
    dense = [(model, launch(model, args, dense=True)) for model in args.models]  # accuracy only: all at once
    for model, started in dense:
        record(model, "dense", finish(*started, args.timeout))
    print(table(rows), flush=True)
    return 0 if all(pair[kind]["exit_status"] == 0 for pair in rows.values() for kind in ("vrpge", "dense")) else 1


if __name__ == "__main__":
    sys.exit(main())
