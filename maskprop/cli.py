"""The maskprop command: channel-sparse training (VR-PGE) and its baselines.

maskprop train: run a recipe (search, fix, finetune; or dense, or a sparse-backward baseline), or resume a run.
maskprop bench: time dense, masked and compact training steps on this machine.
maskprop export: write a run's subnetwork as a physically smaller model.
maskprop report: compare runs (accuracy, size, train-cost saving, measured speedup), with plots.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .train.config import Config


def _one_line(error: BaseException) -> str:
    """An error's message on one line: a DataLoader worker's error comes back with the worker's traceback as its
    message, whose last line is the error itself; any other message of several lines (a library's, passed on:
    torchvision's MaxViT lists its blocks' sizes on a second line) has its lines joined."""
    text = str(error)
    if "\nOriginal Traceback" in text:
        last = text.strip().splitlines()[-1]
        prefix = f"{type(error).__name__}: "
        text = last[len(prefix):] if last.startswith(prefix) else last
    return " ".join(text.split())


def _thread_count(value: str) -> int:
    """``--threads``: an integer >= 0 (0 leaves torch's default), else a usage error (one line, exit status 2)."""
    try:
        threads = int(value)
    except ValueError:
        threads = -1
    if threads < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 (0: torch's default), got {value!r}")
    return threads


def _train_threads(value: str) -> int | str:
    """``train --threads``: ``auto`` or an integer >= 0, else a usage error (one line, exit status 2)."""
    if value == "auto":
        return value
    try:
        return _thread_count(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto or an integer >= 0 (0: torch's default), "
                                         f"got {value!r}") from None


TRAINER_STEPS_ON_CUDA = (
    "note: these are eager steps with the widths of each mask; on CUDA `maskprop train` runs static-shape steps, "
    "captured as CUDA graphs where it can (cuda_graphs: auto); `python tools/bench_graphs.py` times those")


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch
    from tqdm import tqdm

    from ._files import atomic_write
    from .bench import bench_model, check_settings, default_align, describe_machine, format_table, resolve_device
    from .threads import BUSY_SLACK, allowed_cores, busy_by_others, free_cores, read_cpu

    # Every setting is checked before the first model is built, so a mistake costs no benchmark time.
    device = resolve_device(args.device)
    if args.module is not None:
        from .models import import_models

        import_models(args.module, "--module")
    for name in args.models:
        try:
            check_settings(name, args.batch_size, args.keep_ratios, args.repeats, args.warmup, args.image_size,
                           args.masks, args.align)
        except ValueError as err:  # bench_model's argument names as the command's options: --batch-size 0
            raise ValueError(re.sub(r"^([a-z_]+)=", lambda m: f"--{m.group(1).replace('_', '-')} ", str(err))) \
                from None
    if args.json:  # a path the results cannot be written to would fail only after the whole benchmark
        json_dir = Path(args.json).resolve().parent
        if Path(args.json).is_dir():
            raise ValueError(f"--json {args.json} is a directory; expected the path of a file to write the rows to "
                             f"(e.g. {Path(args.json) / 'bench.json'})")
        if json_dir.exists() and not json_dir.is_dir():
            raise ValueError(f"--json {args.json}: '{Path(args.json).parent}' is a file, not a directory")
        if not json_dir.is_dir():
            raise FileNotFoundError(f"--json {args.json}: directory '{Path(args.json).parent}' does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)
    align = default_align(device) if args.align is None else args.align
    results, start = [], read_cpu()
    with tqdm(total=len(args.models) * (args.warmup + args.repeats), desc="bench", file=sys.stderr,
              disable=None) as bar:  # no bar where stderr is not a terminal (logs, CI)
        for name in args.models:
            results += bench_model(
                name, batch_size=args.batch_size, keep_ratios=args.keep_ratios, repeats=args.repeats,
                warmup=args.warmup, image_size=args.image_size, channels_last=args.channels_last, amp=args.amp,
                device=args.device, seed=args.seed, masks=args.masks, progress=lambda msg: bar.update(1), align=align,
            )
    end, cores = read_cpu(), allowed_cores()
    others = None if start is None or end is None else busy_by_others(start, end, cores)
    load = "" if others is None else f" | other processes kept {others:.1f} of {cores} cores busy"
    print(f"{date.today()} | {describe_machine(args.device)}{load} | channels_last={args.channels_last} "
          f"amp={args.amp} masks={args.masks} align={align}")
    print(format_table(results))
    if device.type == "cuda":
        print(TRAINER_STEPS_ON_CUDA)
    elif others is not None and others > BUSY_SLACK and torch.get_num_threads() > (free := free_cores(cores, others)):
        print(f"note: {torch.get_num_threads()} threads beside other processes wait for each other at every "
              f"operation, the compact steps most, so these ratios understate the saving; measure on a quiet "
              f"machine or with --threads {free}")
    if args.json:
        with atomic_write(args.json, "w", encoding="utf-8") as f:
            json.dump([dict(r.as_dict(), cores_busy_by_others=others) for r in results], f, indent=2)
    return 0


DATA_WAIT_NOTED = 0.1
"""The share of a run's time spent waiting for data from which its final table says so."""


def _count(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _plural(count: int, unit: str) -> str:
    return f"{count} {unit}{'s' * (count != 1)}"


def _plan_text(plan: Mapping[str, Any], new_dir: Path | None = None) -> str:
    """What ``maskprop train --dry-run`` prints: the run :func:`~maskprop.train.loop.plan_run` checked, a line each.

    ``new_dir``: the directory a run without ``--out`` would make (its name has the time it starts)."""
    method = plan["method"] + (f", keep_ratio {plan['keep_ratio']:g}" if plan["keep_ratio"] is not None else "") \
        + (", a random subnetwork: the baseline" if plan["subnetwork"] == "random" else "")
    size = "x".join(str(n) for n in plan["input_size"])
    lines = [f"dry run of {plan['model']} ({method}): checked; nothing trained, nothing written",
             f"model   {plan['model']} of {plan['source']}: {_count(plan['params'])} params, {_count(plan['flops'])} "
             f"FLOPs a forward at {size}, {plan['num_classes']} classes; {plan['channels']} channels in "
             f"{plan['groups']} prunable groups",
             f"data    {plan['data']}: {plan['train_examples']} training examples, {plan['val_examples']} for "
             f"validation; batch {plan['batch_size']}, {plan['steps_per_epoch']} steps an epoch"]
    weights = plan.get("initial_weights")
    if weights is not None:
        kept = weights["kept_initialisation"]
        lines.insert(2, f"weights '{weights['path']}': {weights['tensors']} tensors loaded"
                     + (f"; {', '.join(kept)} left at their initialisation (another shape in the file, or absent)"
                        if kept else ""))
    phases = {p["phase"]: p for p in plan["phases"]}
    parts = []
    for name in ("search", "train", "finetune"):
        if name in phases:
            inner = [f"{phases[k]['epochs']} {what}" for k, what in (("warm-up", "dense warm-up"), ("anneal", "anneal"))
                     if name == "search" and k in phases]
            parts.append(f"{name} {_plural(phases[name]['epochs'], 'epoch')}, {_plural(phases[name]['steps'], 'step')}"
                         + (f" (epochs: {', '.join(inner)})" if inner else ""))
    total = sum(phases[k]["steps"] for k in ("search", "train", "finetune") if k in phases)
    lines.append(f"phases  {', then '.join(parts)}: {total} steps in all")
    if plan["budget"] is not None:
        unit = "channels" if plan["budget_unit"] == "channels" else "channel-equivalents of FLOPs"
        lines.append(f"budget  {plan['budget']:.0f} of {plan['channels']} {unit} kept in expectation")
    precision = "float32" if plan["amp"] == "none" else f"{plan['amp']} autocast"
    layout = ", channels_last" if plan["channels_last"] else ""
    why = f" ({plan['steps_reason']})" if plan["steps_reason"] else ""
    steps = {"CUDA graphs": "steps captured as CUDA graphs", "static shapes": "static-shape steps, not captured",
             "eager": "eager steps"}[plan["steps"]]
    lines.append(f"device  {plan['device']}, {precision}{layout}; {steps}{why}")
    resumed = plan["resume_from"]
    if plan["finished"]:
        lines.append(f"out     '{plan['run_dir']}': the run there has finished; nothing to train")
    elif resumed is not None:
        within = f", batch {resumed['batch']}" if resumed["batch"] else ""
        lines.append(f"out     '{plan['run_dir']}': continues its run from {resumed['phase']} epoch "
                     f"{resumed['epoch'] + 1}{within} (step {resumed['step']})")
    elif plan["run_dir"] is not None:
        lines.append(f"out     '{plan['run_dir']}' (a new run)")
    else:
        lines.append(f"out     a new directory, as '{new_dir}'" if new_dir is not None else "out     none")
    return "\n".join(lines)


def _final_table(summary: dict) -> str:
    """A short table of what the run produced and what it saved."""
    def ratio(sub: float, dense: float) -> str:
        return f"{100.0 * sub / dense:.1f}%" if dense else "-"

    speedup, per_step = summary["measured_speedup"], summary.get("step_speedup")
    sbp = summary.get("sbp")
    measured = "n/a" if speedup is None else f"{speedup:.2f}x"
    iqr = summary.get("measured_speedup_iqr")
    if speedup is not None and iqr is not None and summary["method"] != "dense":
        measured += f" (interquartile range {iqr[0]:.2f}-{iqr[1]:.2f}x)"
    measured += " (a dense run: the baseline itself)" if summary["method"] == "dense" else \
        ", against dense steps timed in this run"
    if summary.get("dense_reference_share") is not None:
        measured += f" ({100.0 * summary['dense_reference_share']:.1f}% of its time)"
    if per_step is not None:
        random = (summary.get("search") or {}).get("subnetwork") == "random"
        kind = "a subnetwork" if random else "a search" if summary["method"] == "vrpge" else "a"
        pace = f"{per_step:.2f}x faster" if per_step >= 1.0 else f"{1.0 / per_step:.2f}x slower"
        measured += f"; {kind} step is {pace} than a dense step"
    kinds = summary.get("measured_speedup_phases") or {}
    if len(kinds) > 1:
        measured += " (per step, " + ", ".join(f"{k} {v['median']:.2f}x" for k, v in kinds.items()) + ")"
    waited = summary.get("data_wait_share")
    if waited is not None and waited >= DATA_WAIT_NOTED:
        measured += (f"; the steps waited for data {100.0 * waited:.0f}% of the run's time, which the sparsity does "
                     f"not save")
    threads = summary.get("threads") or {}
    if threads.get("setting") == "auto" and threads.get("used"):
        low, high = threads["used"]
        count = f"{low} CPU thread{'s' if high > 1 else ''}" if low == high else f"{low}-{high} CPU threads"
        measured += f"; {count} (auto: the cores other processes left free)"
    dense_known = summary.get("dense_accuracy") is not None and summary["method"] != "dense"
    dense_accuracy = f"{summary['dense_accuracy']:10.2f}" if dense_known else f"{'-':>10}"
    accuracy_gap = f"{summary['accuracy'] - summary['dense_accuracy']:+5.1f}pp"[-6:] if dense_known else f"{'':>6}"
    lines = [
        f"{summary['model']} ({summary['method']}, "
        + (f"sbp.ratio {sbp['ratio']:g}" if sbp and "ratio" in sbp else f"keep_ratio {summary['keep_ratio']:g}")
        + (", a random subnetwork: the baseline" if (summary.get("search") or {}).get("subnetwork") == "random"
           else "") + ")",
        f"|                      | {'network' if sbp or summary['method'] == 'dense' else 'subnetwork':<10} "
        f"| dense      | kept   |",
        "|---|---:|---:|---:|",
        f"| top-1 accuracy (%)   | {summary['accuracy']:10.2f} | {dense_accuracy} | {accuracy_gap} |",
        (f"| params               | {_count(summary['subnet_params']):>10} | {_count(summary['dense_params']):>10} "
         f"| {ratio(summary['subnet_params'], summary['dense_params']):>6} |"),
        (f"| FLOPs / example      | {_count(summary['subnet_flops']):>10} | {_count(summary['dense_flops']):>10} "
         f"| {ratio(summary['subnet_flops'], summary['dense_flops']):>6} |"),
        *([] if dense_known or summary["method"] == "dense" else [
            "(the dense accuracy: train the dense twin, method=dense, and compare: maskprop report RUN DENSE_RUN)"]),
        f"train-cost saving {summary['train_cost_saving']:.2f}x ("
        + ("supplement C.1, finetuning included" if summary["method"] == "vrpge" else
           "a dense run: the baseline itself" if summary["method"] == "dense" else
           "train FLOPs against a dense run's") + ")",
        f"measured speedup {measured}",
    ]
    if summary.get("speedup_warning"):
        lines.append(f"warning: {summary['speedup_warning']}")
    static = summary.get("static_steps")
    if static and static.get("captured"):
        overhead = static.get("warmup_capture_s") or 0.0
        share = f" ({100.0 * overhead / summary['run_time_s']:.0f}% of the run)" if summary.get("run_time_s") else ""
        lines.append(f"CUDA graphs: {static['graph_captures']} captures, {static['search_windows']} search windows; "
                     f"their eager warm-up steps and captures took {overhead:.1f} s{share}, which the measured "
                     f"speedup (replayed steps) leaves out")
    elif static and static.get("not_captured_because"):
        lines.append(f"static-shape steps, not captured as CUDA graphs since {static['not_captured_because']}: "
                     f"{static['search_windows']} search windows")
    if sbp:
        kept, units = sum(sbp["kept_units"].values()), sum(sbp["units"].values())
        angle = sbp["last_angles"].get("angle/overall")
        lines.append(f"sparse backward: {kept} of {units} units propagate ({sbp['sparsifier']}, memory "
                     f"{sbp['memory']:g}, budget {sbp['budget']})"
                     + ("" if angle is None else f"; last gradient angle {angle:.1f} deg"))
    return "\n".join(lines)


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ._files import claim_new_directory
    from .train.config import load_config
    from .train.distributed import init_from_env
    from .train.loop import fit, plan_run
    from .train.setup import default_run_dir

    place = init_from_env(args.dist_backend)  # under torchrun: join the process group (DDP); else one process

    def start(cfg: Config, out: str | os.PathLike | None, resume: bool = False, new_dir: Path | None = None
              ) -> dict | None:
        if not args.dry_run:
            return fit(cfg, out=out, resume=resume, threads=args.threads)
        plan = plan_run(cfg, out=out, resume=resume)
        if place.is_main:
            print(_plan_text(plan, new_dir))
        return None

    if args.resume is not None:
        if args.out is not None:
            raise ValueError("--out cannot be combined with --resume (the run continues in its own directory)")
        if args.resume_if_exists:
            raise ValueError("--resume-if-exists goes with a recipe and --out DIR (it starts the run or continues it); "
                             "--resume DIR continues a run without one")
        if args.items and "=" not in args.items[0]:
            raise ValueError(f"--resume takes no recipe, got {args.items[0]!r}: the run continues with its own "
                             f"config.yaml; give only key=value overrides after --resume DIR")
        run_dir = Path(args.resume)
        config_path = run_dir / "config.yaml"
        if run_dir.exists() and not run_dir.is_dir():  # last.pt or config.yaml named instead of its directory
            raise ValueError(f"'{run_dir}' is a file, not a run directory; expected the directory of a maskprop train "
                             f"run (--resume DIR)")
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run directory '{run_dir}' does not exist")
        if not config_path.is_file():
            raise FileNotFoundError(f"run directory '{run_dir}' has no config.yaml; nothing to resume (is it a "
                                    f"maskprop run directory?)")
        # A run killed before its first checkpoint has config.yaml but no last.pt: fit starts it over.
        cfg = load_config(config_path, args.items)
        args.resumable = run_dir  # named if the run is interrupted
        summary = start(cfg, run_dir, resume=True)
    else:
        if not args.items or "=" in args.items[0]:
            raise ValueError("expected a recipe (e.g. recipes/quickstart.yaml) before the key=value overrides, "
                             "or --resume DIR")
        recipe, overrides = args.items[0], args.items[1:]
        cfg = load_config(recipe, overrides)
        out, claimed = args.out or cfg.out, None
        if args.resume_if_exists and _holds_this_run(cfg, out):
            args.resumable = out
            summary = start(cfg, out, resume=True)
            return 0 if summary is None else _reported(summary, Path(out), place.is_main)
        if out is None and args.dry_run:  # the directory a run would make, not made
            return start(cfg, None, new_dir=default_run_dir(Path(recipe).stem)) or 0
        if out is None:
            out = default_run_dir(Path(recipe).stem)
            parent_existed = out.parent.is_dir()
            if not place.enabled:  # made here (-2, -3, ... where taken): runs started in the same second get one each
                out = claimed = claim_new_directory(out)
        args.resumable = out
        try:
            summary = start(cfg, out)
        except BaseException:
            if claimed is not None:  # a run that wrote nothing leaves no directory (one that started keeps it)
                with contextlib.suppress(OSError):
                    claimed.rmdir()
                    if not parent_existed:
                        claimed.parent.rmdir()
            raise
    return 0 if summary is None else _reported(summary, Path(args.resumable), place.is_main)


def _reported(summary: Mapping[str, Any], where: Path, main_rank: bool) -> int:
    """Print a finished run's table, its directory and the command that exports it (under torchrun rank 0 alone)."""
    if main_rank:  # the directory this command ran in: a finished run resumed after it was moved or copied keeps the
        # path it was written to in its summary, where the export command would find another run or none
        print(_final_table(summary))
        print(f"run directory: {where}")
        print(f"export: maskprop export {where}")
    return 0


def _holds_this_run(cfg: Config, out: str | os.PathLike | None) -> bool:
    """For ``--resume-if-exists``: whether the directory ``out`` holds a run (its ``config.yaml``) to continue, which
    must have the settings of ``cfg`` (a one-line error names those that differ); ``False``: start the run there."""
    from .train.config import config_to_dict, load_config
    from .train.setup import changed_settings

    if out is None:
        raise ValueError("--resume-if-exists needs the run's directory: give --out DIR (or 'out' in the recipe), the "
                         "same at every start")
    config_path = Path(out) / "config.yaml"
    if not config_path.is_file():
        return False
    changed = changed_settings(config_to_dict(load_config(config_path)), config_to_dict(cfg))
    if changed:
        shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise ValueError(f"--resume-if-exists: '{out}' holds a run of other settings ({shown}); expected the recipe "
                         f"and overrides it was started with, or another --out")
    return True


def _export(args: argparse.Namespace) -> int:
    import torch

    from .export import export_run

    if args.threads:
        torch.set_num_threads(args.threads)
    input_size = None
    if args.input_size is not None:
        try:
            input_size = tuple(int(s) for s in args.input_size.split(","))
        except ValueError:
            input_size = ()
        if len(input_size) != 3 or min(input_size) < 1:
            raise ValueError(f"--input-size {args.input_size!r} is not C,H,W (three positive integers, e.g. 3,32,32)")
    info = export_run(args.run_dir, args.out, args.format, checkpoint=args.checkpoint, mask=args.mask,
                      force=args.force, input_size=input_size)
    out = Path(args.out) if args.out else Path(args.run_dir) / "export"  # printed without a doubled slash
    accuracy = "not measured" if info["accuracy"] is None else f"{info['accuracy']:.2f}%"
    print(f"{info['model']} from {info['source']['checkpoint']} (phase {info['source']['phase']}, mask "
          f"{info['source']['mask']}): accuracy {accuracy}")
    check = info["check"]
    worst = max([*check["narrow_vs_full_model_under_mask"].values(), *check["files_vs_narrow_model"].values()])
    print(f"params {_count(info['params'])} of {_count(info['dense_params'])}, FLOPs / example "
          f"{_count(info['flops'])} of {_count(info['dense_flops'])}; outputs checked against the full model under "
          f"its mask and in every file written (max relative error {worst:.1e})")
    print(f"wrote {out}/: {', '.join(info['files'])}, export.json")
    return 0


def _report(args: argparse.Namespace) -> int:
    from ._files import check_creatable
    from .report import build_report, check_out_dir, default_report_dir, format_table, write_report

    out = check_out_dir(args.out if args.out is not None else default_report_dir())
    check_creatable(out.parent, out)  # before the runs are read and the table printed
    report = build_report(args.runs, baseline=args.baseline)
    print(format_table(report.rows))
    for row in report.rows:
        if row["speedup_warning"]:
            print(f"warning: {row['run']}: {row['speedup_warning']}")
    try:
        files = write_report(report, out, plots=not args.no_plots)
    except ImportError as error:
        raise ValueError(f"{error}; nothing written") from None
    print(f"wrote {out}/: {', '.join(f.name for f in files)}")
    return 0


class _Parser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose usage errors are one line, as every other error of the CLI: what was wrong
    and where the help is (argparse prints its usage block first), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _CommandParser(_Parser):
    """A subcommand parser whose list positionals and options may interleave: ``train RECIPE --out DIR key=value``.

    Parsers without a list positional (``bench``) parse exactly as ``argparse.ArgumentParser``.
    """

    _interleaving = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        lists = any(action.nargs == "*" for action in self._get_positional_actions())
        if self._interleaving or not lists:
            return super().parse_known_args(args, namespace)
        self._interleaving = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._interleaving = False


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="maskprop", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"maskprop {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

    train = commands.add_parser(
        "train", help="train a recipe (VR-PGE search, fix, finetune; or dense), or resume a run",
        description="Train the recipe with key=value overrides (dotted config keys, e.g. data.root=/path/to/cifar "
        "optim.epochs=10), writing config.yaml, TensorBoard events, metrics.jsonl, last.pt / best.pt and "
        "summary.json to the run directory; or continue a run from its last.pt with --resume DIR.",
    )
    train.add_argument("items", nargs="*", metavar="RECIPE [key=value ...]",
                       help="recipe yaml, then overrides (with --resume: overrides only)")
    train.add_argument("--out", help="run directory (default: config 'out', else a new runs/<recipe>-<timestamp>, "
                       "with -2, -3, ... where that is taken)")
    train.add_argument("--resume", metavar="DIR", help="continue the run in DIR from DIR/last.pt (a run stopped "
                       "before its first checkpoint starts over from DIR/config.yaml)")
    train.add_argument("--resume-if-exists", action="store_true",
                       help="with RECIPE and a run directory (--out, or 'out' in the recipe): continue the run there "
                       "if it holds one of the same settings, else start it (for a job a scheduler requeues, or "
                       "torchrun --max-restarts restarts, with the same command)")
    train.add_argument("--dry-run", action="store_true",
                       help="check the run and say what it would do (the data read, the model built, a resumed run's "
                       "checkpoint checked, the warnings of its start), then stop: nothing trained, nothing written")
    train.add_argument("--threads", type=_train_threads, default="auto", metavar="auto|N",
                       help="torch CPU threads: auto (default: the cores other processes leave free, re-chosen every "
                       "epoch and every 30 s), N, or 0 (torch's default)")
    train.add_argument("--dist-backend", choices=["auto", "nccl", "gloo"], default="auto",
                       help="under torchrun: the torch.distributed backend (auto: NCCL for CUDA tensors where CUDA is "
                       "available, gloo for CPU tensors)")
    train.set_defaults(run=_train)

    bench = commands.add_parser(
        "bench", help="time dense vs official-style masked vs compact VR-PGE training steps",
        description="Median step times of a dense step, the official-style VR-PGE step (two masked-dense forwards "
        "and backwards) and maskprop's compact VR-PGE step, interleaved in one process, with the ideal speedup "
        "3 f_D / (4 f_S) from the analytic FLOPs.",
    )
    bench.add_argument("--models", nargs="+", default=["resnet32"],
                       help="registered model names (default: resnet32)")
    bench.add_argument("--module", default=None,
                       help="a Python module to import first, whose @maskprop.register_model networks --models may "
                       "name (as model.module in a run; README, 'Your own network')")
    bench.add_argument("--batch-size", type=int, default=128, help="examples per step (default: 128)")
    bench.add_argument("--keep-ratios", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25],
                       help="fractions of each group's channels kept, one row each (default: 1 0.75 0.5 0.25)")
    bench.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported; default: 5)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (default: 2)")
    bench.add_argument("--image-size", type=int, default=32, help="square input images of this side (default: 32)")
    bench.add_argument("--threads", type=_thread_count, default=0, help="torch CPU threads (0: torch's default)")
    bench.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    bench.add_argument("--align", type=int, default=None,
                       help="pad the compact step's kept widths to multiples of this (exact; default: 8 on CUDA, 1 "
                       "on the CPU)")
    bench.add_argument("--amp", choices=["none", "bf16"], default="none",
                       help="bf16: the steps under bf16 autocast (default: none, float32)")
    bench.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                       help="the input batch in channels_last memory format, as training runs it (default: on)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the weights, the batch and the masks (default: 0)")
    bench.add_argument("--masks", choices=["exact", "sampled"], default="exact",
                       help="exact: round(keep x channels) of every group; sampled: each channel kept with "
                       "probability keep, as a search step draws them (widths vary)")
    bench.add_argument("--json", help="also write the results as JSON to this path")
    bench.set_defaults(run=_bench)

    export = commands.add_parser(
        "export", help="write a run's subnetwork as a physically smaller model (safetensors + plan, .pt2, ONNX, timm)",
        description="Export the subnetwork of a training run as an ordinary, narrower torch model: model.safetensors "
        "with the width plan plan.json (maskprop.load_exported), model.pt2 (torch.export.load, torch alone), "
        "model.onnx (onnxruntime; needs the onnx extra), for the ImageNet ResNets timm_pruned.txt (timm's "
        "adapt_model_from_string rebuilds the model, which loads model.safetensors), and export.json (source "
        "checkpoint, the accuracy the run measured, params, FLOPs and output checks). Default: last.pt of the run with "
        "its fixed subnetwork.",
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (maskprop train --out)")
    export.add_argument("--out", help="export directory (default: RUN_DIR/export); written whole or not at all")
    export.add_argument("--format", help="comma-separated list of safetensors, pt2, onnx, timm (default: every one "
                        "that applies: onnx with the onnx extra installed, timm for resnet18, resnet34 and resnet50)")
    export.add_argument("--checkpoint", choices=["last", "best"], default="last",
                        help="last.pt (default: the finished run's final network) or best.pt (best validation "
                        "accuracy; may be from the search phase, then use --mask top_scores)")
    export.add_argument("--mask", choices=["fixed", "top_scores"], default="fixed",
                        help="fixed: the subnetwork the run fixed after its search (dense and sparse-backward runs: "
                        "the whole model); top_scores: the highest-probability subnetwork of the current scores "
                        "(for a run stopped during the search)")
    export.add_argument("--input-size", metavar="C,H,W",
                        help="input size (default: from the run's data config; give it for runs on your own data)")
    export.add_argument("--force", action="store_true",
                        help="replace an earlier export in --out (a directory with export.json and only export files)")
    export.add_argument("--threads", type=_thread_count, default=0, help="torch CPU threads (0: torch's default)")
    export.set_defaults(run=_export)

    report = commands.add_parser(
        "report", help="compare runs: a table of accuracy, params and FLOPs kept, train-cost saving and measured "
        "speedup, with plots",
        description="Read run directories (or folders of them) and print one row per run: method, model, data, "
        "keep ratio, epochs, accuracy and its gap to a dense run of the same model and data, params and FLOPs "
        "kept, train-cost saving (formula), measured speedup with its interquartile range, wall time, status "
        "(finished, or where it stopped). Writes report.md, report.csv, report.json and PNG plots (accuracy vs "
        "FLOPs and params kept, saving vs measured speedup, training curves, kept widths) into a new directory.",
    )
    report.add_argument("runs", nargs="+", metavar="RUN", help="a run directory, or a folder of run directories")
    report.add_argument("--out", help="new output directory (default: reports/report-<timestamp>); written whole or "
                        "not at all")
    report.add_argument("--baseline", metavar="RUN", help="a finished dense run (method=dense) of the same model "
                        "and data to compare accuracies with (default: the dense run among RUN of each run's seed, "
                        "then the fewest other settings differing)")
    report.add_argument("--no-plots", action="store_true", help="tables only (the plots need the report extra: "
                        "matplotlib)")
    report.set_defaults(run=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    rank = os.environ.get("RANK", "0")  # under torchrun, ranks other than 0 log errors only (rank 0 the warnings: the
    tag = "" if rank == "0" else f"[rank {rank}] "  # ranks run the same settings and meet the same ones)
    if not logging.getLogger().handlers:  # as basicConfig: where the caller has not set logging up
        # maskprop's progress at INFO; the libraries' warnings only (torch logs at INFO where its own logging setup
        # did not run: a Ctrl-C while it loads)
        logging.basicConfig(level=logging.WARNING if rank == "0" else logging.ERROR,
                            format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s")
        logging.getLogger("maskprop").setLevel(logging.INFO if rank == "0" else logging.ERROR)
    args = build_parser().parse_args(argv)  # before torch is imported: usage errors and --help answer at once
    try:
        from ._workarounds import enlarge_onednn_primitive_cache, keep_freed_host_memory

        # train and bench time dense against sparse steps on the CPU (the other commands lose nothing by it): keep
        # glibc from faulting freed memory back in every step (it penalised dense steps by up to a third), and oneDNN
        # from building its convolution kernels anew every step (sampled widths evicted them); environment variables
        # that set either take precedence.
        logging.getLogger(__name__).debug("glibc malloc keeps freed memory: %s", keep_freed_host_memory())
        logging.getLogger(__name__).debug("oneDNN primitive cache enlarged: %s", enlarge_onednn_primitive_cache())
        status = args.run(args)
    except (ValueError, FileNotFoundError) as error:
        from .train.distributed import prints_errors

        if prints_errors(error):  # under torchrun: one line from rank 0, not one per rank, or from the rank that failed
            print(f"maskprop {args.command}: error: {tag}{_one_line(error)}", file=sys.stderr)
        status = 2
    except OSError as error:  # the system refused (permissions, a full disk): one line, not a traceback
        where = f": '{error.filename}'" if error.filename else ""
        print(f"maskprop {args.command}: error: {tag}{error.strerror or error}{where}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:  # Ctrl-C: one line, not the traceback of wherever the run was (under torchrun: rank 0's)
        run_dir = getattr(args, "resumable", None)
        hint = ""
        if run_dir is not None and (Path(run_dir) / "config.yaml").is_file():  # written once the run has started
            from .train.distributed import resume_command

            saved = (Path(run_dir) / "last.pt").is_file()
            hint = f"; {resume_command(run_dir)} " + ("continues from its last checkpoint" if saved else
                                                      "starts it over (it stopped before its first checkpoint)")
        if rank == "0":
            print(f"maskprop {args.command}: interrupted{hint}", file=sys.stderr)
        status = 130
    except Exception as error:
        stopping = sys.modules.get("maskprop.train.stopping")  # loaded once a run trains
        if stopping is None or not isinstance(error, stopping.RunStopped):
            raise
        from .train.distributed import resume_command  # SIGTERM or SIGUSR1: the run saved its checkpoint

        if rank == "0":
            print(f"maskprop {args.command}: {error}; {resume_command(args.resumable)} continues from it",
                  file=sys.stderr)
        status = 128 + error.signum  # what the signal would have made it
    distributed = sys.modules.get("maskprop.train.distributed")  # loaded whole: not by a Ctrl-C while torch loads
    if distributed is not None:  # a torchrun rank leaves its process group before the interpreter ends
        distributed.leave(finished=status == 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
