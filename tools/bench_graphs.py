"""Step times of the eager steps against the static steps captured as CUDA graphs (``maskprop.train.graphs``).

Usage:
    python tools/bench_graphs.py --models resnet32:32:256 vgg19_bn:32:256 resnet50:224:256 --json out/graphs.json \
        --markdown out/graphs.md
    python tools/bench_graphs.py --device cpu --models resnet20:16:8 --steps 2     (a dry run: the same steps, eagerly)
    python tools/bench_graphs.py --models resnet32:32:256 --steps 5 --profile out/profile      (where the time goes)

Per model, bf16 autocast, channels_last, keep 0.5, align 8, the median of CUDA-event times of ``--steps`` steps:

* ``dense_eager``: ``subnet_step`` without a mask (today's dense step);
* ``dense_graphed``: the static dense step, captured;
* ``search_eager``: ``vrpge_step`` with fresh masks every step (the trainer's eager search step, scores on the host;
  cuDNN's benchmark mode off, as the trainer runs it, since every step brings new widths; on for the other kinds, as
  the trainer sets it while graphs are on);
* ``search_graphed``: the static search step (fresh device uniforms every step, capacities from keep 0.5), captured;
* ``search_static``: the same step, not captured (what runs where a setting keeps the step out of a graph:
  ``sync_bn`` under torchrun, Adam on the weights);
* ``search_ranks_graphed``: the same step as torchrun runs it, in a process group of one rank: three graphs (forward,
  backward beside the score update, update) with an ``all_reduce`` of the losses and one of the gradients (NCCL on
  CUDA) between them;
* ``search_one_stream_graphed``: the same on one stream (the default runs the branch of ``m'``, its forward, the
  score update and the next step's ``m``, beside the forward and backward of ``m`` on a second one:
  ``SearchStep(overlap=True)``);
* ``search_m_first_graphed`` (only with ``--kinds``): the same with the forward of ``m'`` after that of ``m``, beside
  the backward only (``SearchStep(m2_first=False)``: the schedule before ``m'`` deferred its BatchNorm statistics;
  ``m2_first_speedup`` is its time over the default's);
* ``search_m_at_start_graphed`` (only with ``--kinds``): the same with each step's ``m`` and ``m'`` drawn at its start,
  on the main stream, instead of by the step before beside its backward (``SearchStep(m_ahead=False)``;
  ``m_ahead_speedup`` is its time over the default's);
* ``settled_graphed``: the same with settled keep probabilities (1 on the fixed mask's channels, 0 elsewhere: a
  search after its anneal, whose capacities are the kept counts), captured;
* ``finetune_eager``: ``subnet_step`` of one fixed sampled mask through the full model (compact);
* ``narrow_eager``: ``subnet_step`` of that mask's narrow model, its widths padded to ``align`` (the trainer's default
  finetune);
* ``finetune_graphed``: the static fixed-mask step at the aligned kept counts, captured;
* ``narrow_graphed``: the narrow model's dense step, captured.

With ``--profile DIR`` every kind also runs ``PROFILE_STEPS`` steps under ``torch.profiler`` (the GPU's kernels, those
replayed from a graph included): ``DIR/<model>.md`` gets each kind's kernels by their own device time (host time on a
CPU), and ``DIR/<model>_search_graphed.json.gz`` the search step's trace (for ``chrome://tracing`` or Perfetto).

The markdown has two tables: the step times with their ratios (step time / dense step time: below 1, the sparse step
is faster), and the GPU targets' rows as speedups (dense step time / step time) beside their targets and the ceiling
measured before (on an H200, the physically narrow model at half width with its whole step in one graph; a search
step adds a forward of ``m'``, a third of a step, so its ceiling is three quarters of that).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import gzip
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import maskprop
from maskprop.bench import describe_machine
from maskprop.cost import CostModel
from maskprop.train.config import load_config
from maskprop.train.distributed import all_reduce_sum
from maskprop.train.graphs import GraphsChoice, StaticSteps, set_capturable
from maskprop.train.narrow import NarrowSubnetwork
from maskprop.train.optim import score_optimizer, weight_optimizer
from maskprop.train.steps import StepContext, subnet_step, vrpge_step
from maskprop.vrpge import ChannelScores

WARMUP = 5  # calls before timing: the graphed steps' eager warm-up and capture, the eager steps' cuDNN plans


def _time(fn: Callable[[], object], device: torch.device, steps: int) -> list[float]:
    """Milliseconds of each of ``steps`` calls (CUDA events on a GPU) after ``WARMUP`` untimed ones."""
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
    return times


KINDS = ["dense_eager", "dense_graphed", "search_eager", "search_graphed", "search_static", "search_one_stream_graphed",
         "settled_graphed", "finetune_eager", "finetune_graphed", "narrow_eager", "narrow_graphed",
         "search_ranks_graphed"]
"""The step kinds, in the order they are timed (``search_ranks_graphed`` in a process group of one rank:
:func:`one_rank_group`)."""
EXTRA_KINDS = ["search_m_first_graphed", "search_m_at_start_graphed"]
"""Kinds timed only when ``--kinds`` names them (the check's time limit has no room for them)."""

PROFILE_STEPS = 3
"""Steps of each kind ``--profile`` records, after the timed ones."""


def profile(fn: Callable[[], object], device: torch.device, trace: Path | None = None) -> str:
    """The operators and kernels of ``PROFILE_STEPS`` calls of ``fn`` as torch.profiler's table, by their own device
    time on CUDA (host time elsewhere); with ``trace``, the chrome trace gzipped there."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(PROFILE_STEPS):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    if trace is not None:
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(raw))
            trace.write_bytes(gzip.compress(raw.read_bytes()))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)


@contextlib.contextmanager
def one_rank_group(device: torch.device) -> Iterator[None]:
    """A process group of this process alone (NCCL on CUDA, gloo elsewhere), for the step as torchrun runs it; gone
    afterwards, so that no collective's watchdog outlives the kind that needs it. A failure to start it fails that
    kind only."""
    with tempfile.TemporaryDirectory() as store:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}/pg",
                                rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def bench(name: str, size: int, batch: int, device: torch.device, steps: int, keep: float, align: int,
          quantile: float = 0.999, save: Callable[[dict], None] = lambda row: None,
          profile_dir: Path | None = None, kinds: list[str] | None = None) -> dict:
    """One model's row: every step kind's median time (``save``d after each kind: a time limit that ends the run
    keeps what was measured) and the ratios; with ``profile_dir``, each kind's profile (module docstring); ``kinds``:
    only these (default all, ``KINDS``)."""
    torch.manual_seed(0)
    capture = device.type == "cuda"
    base = maskprop.create_model(name, num_classes=10).train()
    cost = CostModel(base, (3, size, size))
    base.to(device).to(memory_format=torch.channels_last)
    groups = maskprop.channel_groups(base)
    ctx = StepContext(nn.CrossEntropyLoss(), device, cost, torch.bfloat16, True, align=align)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    cfg = load_config(None, [f"data.batch_size={batch}", "log_every=1000000", f"sparsity.capacity_quantile={quantile}"])
    choice = GraphsChoice(True, capture, strict=True)
    fixed = ChannelScores(groups, keep, keep).sample(torch.Generator().manual_seed(2))
    row: dict = {"model": name, "image": size, "batch": batch, "keep": keep, "align": align, "captured": capture,
                 "capacity_quantile": quantile}

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = copy.deepcopy(base)
        return model, weight_optimizer(model.parameters(), 0.01, 0.9, 5e-4)

    def measure(kind: str, make: Callable[[], Callable[[], object]]) -> None:
        fn = make()
        times = _time(fn, device, steps)
        row[f"{kind}_ms"] = statistics.median(times)
        print(f"{name} {size}px b{batch} {kind:25s} {row[f'{kind}_ms']:9.2f} ms (min {min(times):.2f}, max "
              f"{max(times):.2f})", flush=True)
        if profile_dir is not None:
            trace = profile_dir / f"{name}_{kind}.json.gz" if kind == "search_graphed" else None
            table = profile(fn, device, trace)
            with open(profile_dir / f"{name}.md", "a") as out:
                out.write(f"## {name} {size}px b{batch}: {kind} ({PROFILE_STEPS} steps, median step "
                          f"{row[f'{kind}_ms']:.2f} ms)\n\n```\n{table}\n```\n\n")
        del fn
        gc.collect()  # a step kind's graphs, model and buffers go now, before the next kind is measured
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def dense_eager():
        model, opt = fresh()
        return lambda: subnet_step(model, opt, (x, y), None, ctx)

    def dense_graphed():
        model, opt = fresh()
        static = StaticSteps(cfg, ctx, choice, seed=1)
        return lambda: static.plain(model, opt, (x, y))

    def search_eager():
        model, opt = fresh()
        scores = ChannelScores(groups, keep, keep)
        optimizers = (opt, score_optimizer(scores.scores, 0.0))  # lr 0: the scores stay at the keep ratio
        generator = torch.Generator().manual_seed(1)
        sparsity = cfg.sparsity
        return lambda: vrpge_step(model, scores, optimizers, (x, y), generator, sparsity, ctx)

    def graphed_search(scores: ChannelScores, overlap: bool = True, captured: bool = True,
                       ranks: bool = False, m2_first: bool = True, m_ahead: bool = True) -> Callable[[], object]:
        model, opt = fresh()
        score_opt = score_optimizer(scores.scores, 0.0)  # lr 0: the scores stay as given
        if captured:
            set_capturable(score_opt)
        step_ctx = dataclasses.replace(ctx, reduce_stats=all_reduce_sum) if ranks else ctx
        static = StaticSteps(cfg, step_ctx, choice if captured else GraphsChoice(True, False), seed=1,
                             overlap=overlap, m2_first=m2_first, m_ahead=m_ahead)
        return lambda: static.search(model, scores, (opt, score_opt), (x, y))

    def search_graphed():
        return graphed_search(ChannelScores(groups, keep, keep, device=device))

    def search_static():
        return graphed_search(ChannelScores(groups, keep, keep, device=device), captured=False)

    def search_ranks_graphed():
        return graphed_search(ChannelScores(groups, keep, keep, device=device), ranks=True)

    def search_one_stream_graphed():
        return graphed_search(ChannelScores(groups, keep, keep, device=device), overlap=False)

    def search_m_first_graphed():
        return graphed_search(ChannelScores(groups, keep, keep, device=device), m2_first=False)

    def search_m_at_start_graphed():
        return graphed_search(ChannelScores(groups, keep, keep, device=device), m_ahead=False)

    def settled_graphed():
        scores = ChannelScores(groups, 1.0, device=device)  # budget: every channel, so the 0/1 scores stay as set
        with torch.no_grad():
            scores.scores.copy_(scores.flatten(fixed).to(scores.scores.dtype))
        return graphed_search(scores)

    def finetune_eager():
        model, opt = fresh()
        return lambda: subnet_step(model, opt, (x, y), fixed, ctx)

    def finetune_graphed():
        model, opt = fresh()
        static = StaticSteps(cfg, ctx, choice, seed=1)
        return lambda: static.plain(model, opt, (x, y), fixed)

    def narrow_eager():
        model, opt = fresh()
        narrow = NarrowSubnetwork(model, fixed, opt, align=ctx.align)
        narrow.model.train()
        return lambda: narrow.step((x, y), ctx)

    def narrow_graphed():
        model, opt = fresh()
        narrow = NarrowSubnetwork(model, fixed, opt, align=ctx.align)
        narrow.model.train()
        static = StaticSteps(cfg, ctx, choice, seed=1)
        return lambda: static.plain(narrow.model, narrow.optimizer, (x, y), narrow=narrow)

    makers = {"dense_eager": dense_eager, "dense_graphed": dense_graphed, "search_eager": search_eager,
              "search_graphed": search_graphed, "search_static": search_static,
              "search_one_stream_graphed": search_one_stream_graphed, "settled_graphed": settled_graphed,
              "finetune_eager": finetune_eager, "finetune_graphed": finetune_graphed, "narrow_eager": narrow_eager,
              "narrow_graphed": narrow_graphed, "search_ranks_graphed": search_ranks_graphed,
              "search_m_first_graphed": search_m_first_graphed,
              "search_m_at_start_graphed": search_m_at_start_graphed}
    for kind in kinds or KINDS:
        make = makers[kind]
        if capture:  # as the trainer: on while graphs are; its eager search (new widths every step) runs without it
            torch.backends.cudnn.benchmark = kind != "search_eager"
        try:
            with one_rank_group(device) if kind == "search_ranks_graphed" else contextlib.nullcontext():
                measure(kind, make)
        except Exception as err:  # noqa: BLE001 - one kind failing must not lose the others' numbers
            row[f"{kind}_error"] = f"{type(err).__name__}: {err}"[:500]
            print(f"{name} {kind} FAILED: {row[f'{kind}_error']}", flush=True)
            if device.type == "cuda":
                with contextlib.suppress(Exception):  # a sticky CUDA error raises again here: the next kinds say so
                    torch.cuda.synchronize()
        save(row)
    ratio = _ratio(row)
    row.update({"search_over_dense_eager": ratio("search_eager", "dense_eager"),
                "static_search_over_dense_eager": ratio("search_static", "dense_eager"),
                "search_over_dense_graphed": ratio("search_graphed", "dense_graphed"),
                "settled_over_dense_graphed": ratio("settled_graphed", "dense_graphed"),
                "finetune_over_dense_eager": ratio("finetune_eager", "dense_eager"),
                "finetune_over_dense_graphed": ratio("finetune_graphed", "dense_graphed"),
                "narrow_over_dense_graphed": ratio("narrow_graphed", "dense_graphed"),
                "search_graphed_speedup_over_eager": ratio("search_eager", "search_graphed"),
                "ranks_over_one_process": ratio("search_ranks_graphed", "search_graphed"),
                "overlap_speedup": ratio("search_one_stream_graphed", "search_graphed"),
                "m2_first_speedup": ratio("search_m_first_graphed", "search_graphed"),
                "m_ahead_speedup": ratio("search_m_at_start_graphed", "search_graphed")})
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return row


# The GPU targets (speedups on an H200: bf16, channels_last, batch 256, keep 0.5) and the ceiling measured before
# (the half-width model's whole step as one graph, against the dense eager and graphed steps).
TARGETS = {
    "search / dense eager": ("search_graphed", "dense_eager", {"resnet32": 2.0, "vgg19_bn": 2.0, "resnet50": 1.15}),
    "search / dense graphed": ("search_graphed", "dense_graphed", {"resnet32": 0.9, "vgg19_bn": 1.1, "resnet50": 1.15}),
    "narrow finetune / dense eager": ("narrow_graphed", "dense_eager", {"resnet32": 2.5, "vgg19_bn": 3.0,
                                                                       "resnet50": 1.6}),
    "narrow finetune / dense graphed": ("narrow_graphed", "dense_graphed", {"resnet32": 1.2, "vgg19_bn": 1.5,
                                                                           "resnet50": 1.6}),
}
CEILINGS = {"dense_eager": {"resnet32": 3.3, "vgg19_bn": 4.3, "resnet50": 1.7},
            "dense_graphed": {"resnet32": 1.27, "vgg19_bn": 1.66, "resnet50": 1.65}}


def targets_table(rows: list[dict]) -> str:
    """The GPU targets' rows as speedups (dense step time / step time: maskprop's graphed search and narrow finetune
    steps against the dense step run eagerly, as other tools run it, and graphed, as maskprop runs it) beside their
    targets and ceilings: one column per model."""
    lines = ["| speedup (dense step time / step time) | " + " | ".join(r["model"] for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for label, (step, dense, targets) in TARGETS.items():
        cells = []
        for r in rows:
            x, y = r.get(f"{dense}_ms"), r.get(f"{step}_ms")
            cell = "-" if x is None or y is None or y == 0 else f"{x / y:.2f}x"
            ceiling = CEILINGS[dense].get(r["model"])
            if ceiling is not None and step == "search_graphed":
                ceiling *= 0.75  # a search step adds a forward of m'
            bounds = [f"target {targets[r['model']]:.2f}x"] if r["model"] in targets else []
            bounds += [f"ceiling {ceiling:.2f}x"] if ceiling is not None else []
            cells.append(cell + (f" ({', '.join(bounds)})" if bounds else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ratio(row: dict) -> Callable[[str, str], float | None]:
    def ratio(a: str, b: str) -> float | None:
        x, y = row.get(f"{a}_ms"), row.get(f"{b}_ms")
        return None if x is None or y is None or y == 0 else x / y
    return ratio


def markdown(rows: list[dict]) -> str:
    def cell(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    header = ("| model | dense eager ms | dense graphed ms | search eager ms | search graphed ms | search static ms "
              "| finetune graphed ms | narrow graphed ms | search/dense eager | search/dense graphed | "
              "static search/dense eager | settled search/dense graphed | finetune/dense eager | "
              "finetune/dense graphed | narrow/dense graphed | search one stream / two streams | "
              "search under torchrun (one rank) / one process | search m' after m / m' first | "
              "search m at the step's start / m ahead |")
    lines = [header, "|" + "---|" * 19]
    for r in rows:
        lines.append("| " + " | ".join([
            f"{r['model']} {r['image']}px b{r['batch']}"
            + ("" if r.get("capacity_quantile", 0.999) == 0.999 else f" q{r['capacity_quantile']:g}"),
            *(cell(r.get(f"{k}_ms"), 1) for k in (
                "dense_eager", "dense_graphed", "search_eager", "search_graphed", "search_static", "finetune_graphed",
                "narrow_graphed")),
            *(cell(r.get(k)) for k in ("search_over_dense_eager", "search_over_dense_graphed",
                                       "static_search_over_dense_eager", "settled_over_dense_graphed",
                                       "finetune_over_dense_eager", "finetune_over_dense_graphed",
                                       "narrow_over_dense_graphed", "overlap_speedup",
                                       "ranks_over_one_process", "m2_first_speedup", "m_ahead_speedup"))])
                     + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet32:32:256"], help="name:image_size:batch")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per kind (median reported)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--align", type=int, default=8)
    parser.add_argument("--capacity-quantile", type=float, default=0.999,
                        help="sparsity.capacity_quantile of the graphed search steps (default 0.999)")
    parser.add_argument("--json", help="write the rows as JSON to this path")
    parser.add_argument("--markdown", help="write the table to this path")
    parser.add_argument("--profile", type=Path, help="directory for each kind's profile (module docstring)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS + EXTRA_KINDS,
                        help=f"only these step kinds (default: all but {', '.join(EXTRA_KINDS)})")
    args = parser.parse_args()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type != "cuda":
        torch.set_num_threads(1)
    print(describe_machine(args.device), flush=True)
    rows = []

    def save(row: dict) -> None:  # after every step kind: a run cut short keeps what it measured
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps([*rows, row], indent=2))

    for spec in args.models:
        name, size, batch = spec.split(":")
        row = bench(name, int(size), int(batch), device, args.steps, args.keep, args.align, args.capacity_quantile,
                    save, args.profile, args.kinds)
        save(row)  # with its ratios
        rows.append(row)
        if args.markdown:  # after every model: a run cut short keeps the tables of the models it finished
            Path(args.markdown).write_text(markdown(rows) + "\n" + targets_table(rows))
    print(markdown(rows) + "\n" + targets_table(rows))


if __name__ == "__main__":
    main()
