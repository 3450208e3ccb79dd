"""How the VR-PGE search behaves early, and whether it beats a random subnetwork: a grid of runs through
``maskprop.fit`` (arms x models x keep ratios x seeds), one JSON of results, a markdown table.

Every run is ``maskprop.fit`` on the built-in ``shapes`` dataset with config overrides (``SETTING`` below, or
``QUICK_SETTING`` with ``--quick``), one arm's overrides and ``--set`` overrides. The arms:

* ``dense``: the same model trained densely for the search plus finetune epochs (the bar to hold).
* ``paper``: the paper's search as written: every keep probability starts at 0.5, score lr 12e-3, no warm-up, no
  anneal, at the budget from the first step.
* ``random``: a random subnetwork of the same per-group budget fixed at the first step and trained for the search and
  finetune epochs (``sparsity.fix=random``): what the search has to beat.
* ``default``: the search maskprop recommends (``DEFAULT_SEARCH``): a dense warm-up, probabilities that start at 1
  while the budget falls to the keep ratio along a cubic anneal, a score lr sized to the run (docs/methods.md, "How
  the search behaves early").
* ``official``: a test harness, not a user mode: the paper's search under the authors' code's semantics (each conv
  output masked BEFORE its BatchNorm, so a dropped channel emits BatchNorm's bias; residual streams never masked; the
  symmetric estimator; both masks back-propagated; the joint gradient clipped at 3). See ``official_semantics``.
* candidates (``warmup``, ``anneal``, ``lr``, ...): the pieces of the default one at a time; ``--arm NAME:k=v,k=v``
  adds one on the command line.
* ``random@ARM``: the random subnetwork at the FLOPs of ``ARM``'s run (same model, keep ratio and seed, run before it):
  the keep ratio whose per-group widths come closest to those FLOPs (``flops_matched_keep``; kept as ``run_keep``).
* ``chosen@ARM``: the subnetwork ``ARM``'s run chose (same model, keep ratio and seed, run before it; the JSON keeps
  every run's fixed mask), trained exactly as ``random`` trains its own draw: fixed from the first step, trained for
  the search and finetune epochs. Against ``random`` it compares the choices alone, apart from what the search's
  training (its warm-up, anneal and changing masks) does to the weights.
* ``random@ARM+LABEL:k=v,...`` and ``chosen@ARM+LABEL:k=v,...``: the same with more overrides (a dense warm-up first:
  ``chosen@default+w2:sparsity.warmup_epochs=2``), told apart by the label.

For each run the JSON keeps the final accuracy, FLOPs and params kept, the train-cost saving and the measured speedup
(from the run summary), the run time, and every epoch's record (validation accuracy, training accuracy under the
sampled masks, and the loop's search diagnostics where the loop writes them: shares of keep probabilities within
0.05 of 0 and of 1, their mean Bernoulli entropy, mean |L(m) - L(m')|, the weight-gradient norm, the training accuracy
of the top-score subnetwork). Where the loop does not write the score shares, entropy or loss gap, the tool measures
them itself (``probe_*`` keys). The file is rewritten after every run and a run already in it is skipped, so an
interrupted grid continues where it stopped.

Usage:
    python tools/search_study.py --quick --json /tmp/quick.json                     # a smoke grid, a minute or two
    python tools/search_study.py --models resnet32 --keeps 0.5 --arms dense paper random default --json study.json
    python tools/search_study.py --models resnet32 --keeps 0.5 --arms paper official --search-epochs 4 \\
        --finetune-epochs 0 --json early.json --curves                              # the early-search study
    python tools/search_study.py --json study.json --table-only --curves            # print a results file again
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import maskprop
from maskprop.bench import describe_machine
from maskprop.sparse.modules import SparseBatchNorm2d
from maskprop.train import fit, load_config

# The study's setting, sized for 2 shared CPU cores (a run costs a few minutes with one thread): shapes at
# 32x32, 1024 training images in batches of 64 (16 steps an epoch), 12 search + 3 finetune epochs. At 16x16 the
# ResNet-32 did not learn densely in 15 epochs (21.8%); at 32x32 the paper's doubled widths cost 3x the time of He et
# al.'s 16-32-64, which also learned faster in the first 48 steps (22.8% against 16.6%), hence MODEL_KWARGS. The
# weight lr is the paper's 0.1 at batch 256 scaled by sqrt(64/256); the finetune lr is the quickstart's (3 epochs at
# the paper's 1e-3 barely move the weights). best_of_n scores 5 masks on 256 images: a polarised search samples one
# mask, so more samples buy nothing but time.
SETTING = {
    "data.dataset": "shapes", "data.train_size": 1024, "data.val_size": 500, "data.batch_size": 64,
    "data.image_size": 32, "data.workers": 0, "optim.lr": 0.05, "optim.schedule": "cosine", "finetune.lr": 0.01,
    "sparsity.fix_samples": 5, "sparsity.fix_examples": 256,
    "eval_every": 1, "save_every": 0, "log_every": 1000, "device": "cpu",
}
SEARCH_EPOCHS, FINETUNE_EPOCHS = 12, 3
# VGG-19 at a quarter of its widths (16-128 channels, 50 MFLOPs at 32x32 against ResNet-32's 138 here and full
# VGG-19's 796): the same 16 conv layers without a residual stream, at a cost these cores can run in a grid.
MODEL_KWARGS = {"resnet32": {"width": 1}, "vgg19_bn": {"width": 0.25}}
"""Model arguments per model (see SETTING); a run's table label shows them."""

# --quick: the whole pipeline in seconds per run, for a smoke test of the tool (numbers mean nothing).
QUICK_SETTING = dict(SETTING, **{"data.train_size": 128, "data.val_size": 64, "sparsity.fix_examples": 64})
QUICK_EPOCHS = (3, 1)

# The search maskprop recommends (docs/methods.md, "How the search behaves early"), written for a 12-epoch search:
# 2 dense warm-up epochs, then every probability starts at 1 while the budget falls to the keep ratio along a cubic
# anneal of 3 epochs, at a score lr that polarises the probabilities within the anneal (Adam moves a score by at most
# the lr per step; 0.2 x 48 anneal steps ~ 10). At 0.05 half of them were still between 0.05 and 0.95 four epochs
# after the anneal, and the masks that kept changing trained nothing well (29% against 57%).
DEFAULT_SEARCH = {"sparsity.warmup_epochs": 2, "sparsity.anneal_epochs": 3, "sparsity.budget_schedule": "cubic",
                  "sparsity.score_lr": 0.2}

PAPER = {"sparsity.init": 0.5, "sparsity.score_lr": 12e-3, "sparsity.warmup_epochs": 0, "sparsity.anneal_epochs": 0}
"""With an anneal every probability starts at 1 whatever ``sparsity.init`` says, so arms with one drop the init."""

ARMS: dict[str, dict[str, Any]] = {
    "dense": {"method": "dense"},
    "paper": dict(PAPER),
    "random": {"sparsity.fix": "random"},
    "default": dict(DEFAULT_SEARCH),
    # The official code's semantics (see official_semantics); finetune.narrow=false keeps the finetune on the full
    # model, where the harness's masking applies (a narrow model has no dropped channels to emit a bias).
    "official": dict(PAPER, **{"sparsity.prune_residual": False, "sparsity.estimator": "vrpge_sym",
                               "sparsity.weight_grad": "both", "optim.clip_grad_norm": 3.0, "finetune.narrow": False}),
    "paper_noresidual": dict(PAPER, **{"sparsity.prune_residual": False}),
    # Score lr 1.0: Adam's first step sets every keep probability to about 0 or 1, so the search trains the subnetwork
    # its first step drew (a random one, drawn from the global budget rather than per group as ``random``).
    "polarised": dict(PAPER, **{"sparsity.score_lr": 1.0}),
    # Candidates: one piece of the default search at a time, and two combinations.
    "warmup": dict(PAPER, **{"sparsity.warmup_epochs": 2}),
    "anneal": dict(PAPER, **{"sparsity.anneal_epochs": 3}),
    "lr": dict(PAPER, **{"sparsity.score_lr": 0.2}),
    "warmup_lr": dict(PAPER, **{"sparsity.warmup_epochs": 2, "sparsity.score_lr": 0.2}),
    "anneal_lr": dict(PAPER, **{"sparsity.anneal_epochs": 3, "sparsity.score_lr": 0.2}),
}
for _arm in ARMS.values():
    if _arm.get("sparsity.anneal_epochs"):
        _arm.pop("sparsity.init", None)
HARNESS_ARMS = {"official"}
"""Arms run under ``official_semantics``."""

# Keys of an epoch record worth keeping (the rest, e.g. per-group widths, stays in the run's own metrics).
EPOCH_KEYS = ("phase", "epoch", "step", "step_kind", "budget_ratio", "val_accuracy", "train_accuracy",
              "train_accuracy_top", "train_loss", "loss_gap", "grad_norm", "scores_near_0", "scores_near_1",
              "score_entropy", "kept_ratio_expected", "kept_ratio_sampled", "epoch_time_s", "train_cost_saving")
POLARISED_MARGIN = 0.05
PROBE_EXAMPLES = 256
"""Training examples of the loop's top-score accuracy after each search epoch: its 512 would cost a ResNet-32 search
epoch of 16 steps about a sixth more; 256 resolve the 10-point differences this study reads."""


# ---------------------------------------------------------------------------------------------------------------------
# The official code's semantics, as a harness


def _official_batch_norm(self: SparseBatchNorm2d, x: torch.Tensor, state: Any) -> torch.Tensor:
    """Masked-mode BatchNorm under the official semantics: the mask multiplies the BatchNorm's INPUT (the authors mask
    the conv weights), and BatchNorm runs as ``nn.BatchNorm2d`` over every channel. A dropped channel's input is zero,
    so it normalises to zero and emits ``beta``; its running statistics move towards mean 0 and variance 0."""
    return nn.BatchNorm2d.forward(self, state.apply_mask(self.group, x))


def _forced_masked(function: Any) -> Any:
    def masked(model: nn.Module, mask: Any, mode: str = "compact", align: int = 1, *args: Any, **kwargs: Any) -> Any:
        return function(model, mask, "masked", 1, *args, **kwargs)  # masked mode has no padding: align is moot

    masked.__wrapped__ = function
    return masked


@contextlib.contextmanager
def official_semantics() -> Iterator[None]:
    """Inside the block every subnetwork runs as the authors' VR-PGE code runs it: masked mode (dense kernels) in
    every step, evaluation and fix, with each conv output masked before its BatchNorm instead of after it.

    maskprop's masked mode multiplies a unit's output AFTER BatchNorm (a dropped channel is zero) and keeps dropped
    channels' running statistics; this replaces ``SparseBatchNorm2d._masked_forward`` so that the mask multiplies
    the BatchNorm input and BatchNorm runs over all channels, and makes every ``prepare_mask``/``use_mask`` that the
    training code imported ask for masked mode. Conv layers that mask their own output (``mask_output``, no
    BatchNorm after them) are left as they are. For a test harness only: it patches classes and modules of the
    process, and undoes it on exit.
    """
    from maskprop.sparse import execution

    patched: list[tuple[Any, str, Any]] = []
    originals = {"prepare_mask": execution.prepare_mask, "use_mask": execution.use_mask}
    for name, module in list(sys.modules.items()):
        if name.startswith("maskprop") and module is not None and module is not execution:
            for attr, original in originals.items():
                if getattr(module, attr, None) is original:
                    patched.append((module, attr, original))
                    setattr(module, attr, _forced_masked(original))
    patched.append((SparseBatchNorm2d, "_masked_forward", SparseBatchNorm2d._masked_forward))
    SparseBatchNorm2d._masked_forward = _official_batch_norm
    try:
        yield
    finally:
        for owner, attr, original in reversed(patched):
            setattr(owner, attr, original)


# ---------------------------------------------------------------------------------------------------------------------
# Running one configuration and recording its epochs


def _score_probe(scores: Any) -> dict[str, float]:
    """Shares of keep probabilities within ``POLARISED_MARGIN`` of 0 and of 1, and their mean Bernoulli entropy
    (nats): what the loop records as ``scores_near_0/1`` and ``score_entropy``, for a loop that does not."""
    s = scores.scores.detach().double()
    p = s.clamp(1e-12, 1 - 1e-12)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log())
    return {"probe_scores_near_0": float((s <= POLARISED_MARGIN).double().mean()),
            "probe_scores_near_1": float((s >= 1 - POLARISED_MARGIN).double().mean()),
            "probe_score_entropy": float(entropy.mean())}


@contextlib.contextmanager
def recording(epochs: list[dict[str, Any]], fixed: dict[str, list[int]]) -> Iterator[None]:
    """Capture every epoch record the loop logs (``loop._log_epoch``) into ``epochs``, adding the score shares,
    entropy and mean |L(m) - L(m')| where the loop does not write them, and the subnetwork the run fixed into
    ``fixed`` (``{group: kept channel indices}``)."""
    from maskprop.train import loop

    log_epoch, vrpge_step, fix_subnetwork = loop._log_epoch, loop.vrpge_step, loop.fix_subnetwork

    def fix(*args: Any, **kwargs: Any) -> Any:
        mask, info = fix_subnetwork(*args, **kwargs)
        fixed.update({name: torch.nonzero(kept).flatten().tolist() for name, kept in mask.items()})
        return mask, info
    gaps: list[float] = []

    def step(*args: Any, **kwargs: Any) -> Any:
        result = vrpge_step(*args, **kwargs)
        gaps.append(abs(result.loss - result.loss2))
        return result

    def log(run: Any, logger: Any, record: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        kept = {k: record[k] for k in EPOCH_KEYS if k in record}
        scores = getattr(run.state, "scores", None)
        if record.get("phase") == "search" and scores is not None and "scores_near_0" not in record:
            kept.update(_score_probe(scores))
        if gaps and "loss_gap" not in record:
            kept["probe_loss_gap"] = sum(gaps) / len(gaps)
        gaps.clear()
        epochs.append(kept)
        log_epoch(run, logger, record, *args, **kwargs)

    loop._log_epoch, loop.vrpge_step, loop.fix_subnetwork = log, step, fix
    try:
        yield
    finally:
        loop._log_epoch, loop.vrpge_step, loop.fix_subnetwork = log_epoch, vrpge_step, fix_subnetwork


@contextlib.contextmanager
def fixing(kept: dict[str, list[int]] | None) -> Iterator[None]:
    """The random baseline's draw (``loop.random_mask``) replaced by the subnetwork ``kept`` (``{group: kept channel
    indices}``, another run's choice); ``None``: nothing replaced."""
    if kept is None:
        yield
        return
    from maskprop.train import loop

    def chosen(groups: dict[str, int], keep_ratio: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if set(groups) != set(kept):
            raise SystemExit(f"the chosen subnetwork's groups {sorted(kept)} are not the model's {sorted(groups)}")
        mask = {name: torch.zeros(size, dtype=torch.bool) for name, size in groups.items()}
        for name, indices in kept.items():
            mask[name][indices] = True
        return mask

    random_mask, loop.random_mask = loop.random_mask, chosen
    try:
        yield
    finally:
        loop.random_mask = random_mask


def run_config(overrides: dict[str, Any], harness: bool = False, threads: int = 1,
               probe_examples: int | None = PROBE_EXAMPLES, kept: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """One ``maskprop.fit`` of the default config with ``overrides`` (dotted keys), optionally under the official
    semantics; returns the summary's numbers, the epoch records and the fixed subnetwork (``mask``: ``{group: kept
    channel indices}``). ``probe_examples``: training examples the loop measures the top-score subnetwork's accuracy
    on after each search epoch (None: the loop's own number). ``kept``: the subnetwork a random baseline
    (``sparsity.fix: random``) trains instead of its own draw (:func:`fixing`)."""
    from maskprop.train import loop

    torch.set_num_threads(threads)
    if probe_examples is not None and hasattr(loop, "TOP_MASK_EXAMPLES"):
        loop.TOP_MASK_EXAMPLES = probe_examples
    cfg = load_config(None, [f"{k}={_yaml(v)}" for k, v in overrides.items()])
    epochs: list[dict[str, Any]] = []
    start = time.perf_counter()
    fixed: dict[str, list[int]] = {}
    with recording(epochs, fixed), fixing(kept), (official_semantics() if harness else contextlib.nullcontext()):
        summary = fit(cfg, out=None)
    wall = time.perf_counter() - start
    keys = ("accuracy", "train_cost_saving", "measured_speedup", "search_step_ms", "finetune_step_ms",
            "dense_step_ms", "warmup_step_ms", "train_step_ms")
    result = {k: summary.get(k) for k in keys}
    result["flops_kept"] = summary["subnet_flops"] / summary["dense_flops"]
    result["params_kept"] = summary["subnet_params"] / summary["dense_params"]
    result["widths"] = summary.get("widths")
    result["budget_spent"] = (summary.get("fix") or {}).get("budget_spent")  # a search's; None for the others
    result["wall_s"] = wall
    result["epochs"] = epochs
    result["mask"] = fixed or None  # a dense run fixes none
    return result


def _yaml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


# ---------------------------------------------------------------------------------------------------------------------
# The grid


def run_overrides(model: str, keep: float, arm: dict[str, Any], seed: int, setting: dict[str, Any],
                  search_epochs: int, finetune_epochs: int, extra: dict[str, Any]) -> dict[str, Any]:
    overrides = dict(setting)
    overrides.update({f"model.kwargs.{k}": v for k, v in MODEL_KWARGS.get(model, {}).items()})
    overrides.update({"model.name": model, "seed": seed, "sparsity.keep_ratio": keep, "optim.epochs": search_epochs,
                      "finetune.epochs": finetune_epochs})
    overrides.update(_scaled(arm, search_epochs))
    if overrides.get("method") == "dense":  # the same total epochs, no sparsity keys (dense runs ignore them)
        overrides["optim.epochs"] = search_epochs + finetune_epochs
        overrides = {k: v for k, v in overrides.items() if not k.startswith(("sparsity.", "finetune."))}
    overrides.update(extra)
    return overrides


def _scaled(arm: dict[str, Any], search_epochs: int) -> dict[str, Any]:
    """``arm`` with its warm-up and anneal epochs (written for a search of ``SEARCH_EPOCHS``) scaled to a search of
    ``search_epochs``, each at least 1 where it was set, so a shorter run keeps the schedule's shape."""
    arm = dict(arm)
    if search_epochs != SEARCH_EPOCHS:
        for key in ("sparsity.warmup_epochs", "sparsity.anneal_epochs"):
            if arm.get(key):
                arm[key] = max(1, round(arm[key] * search_epochs / SEARCH_EPOCHS))
        while arm.get("sparsity.warmup_epochs", 0) + arm.get("sparsity.anneal_epochs", 0) > search_epochs:
            key = max(("sparsity.warmup_epochs", "sparsity.anneal_epochs"), key=lambda k: arm.get(k, 0))
            arm[key] -= 1
    return arm


def run_key(model: str, keep: float, arm: str, seed: int, tag: str) -> str:
    return f"{model}|keep={keep:g}|{arm}|seed={seed}|{tag}"


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


MATCHED = "random@"
"""Arm prefix: ``random@ARM`` is the random subnetwork whose FLOPs come closest to those of ``ARM``'s run of the same
model, keep ratio and seed (already in the results file): a channel budget lets a search keep channels that cost more
FLOPs than a uniform draw's, so "same budget" also needs "same FLOPs"."""


CHOSEN = "chosen@"
"""Arm prefix: ``chosen@ARM`` trains the subnetwork ``ARM``'s run of the same model, keep ratio and seed chose (already
in the results file) as the random baseline trains its own (``fixing``): the choice compared apart from the search."""


def flops_matched_keep(model: str, model_kwargs: dict[str, Any], image_size: int, flops_kept: float) -> float:
    """The keep ratio (in steps of 0.001) whose random subnetwork (``max(1, round(keep x channels))`` per group, as
    ``random_mask`` draws it) computes the FLOPs closest to ``flops_kept`` x dense; the smallest on ties."""
    net = maskprop.create_model(model, num_classes=10, **model_kwargs)
    groups, cost = maskprop.channel_groups(net), maskprop.CostModel(net, (3, image_size, image_size))
    dense = cost.flops(None, 1)
    best = min(range(1, 1001), key=lambda k: (abs(cost.flops(
        {g: max(1, round(k / 1000 * c)) for g, c in groups.items()}, 1) / dense - flops_kept), k))
    return best / 1000


def _parse_arm(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:key=value,key=value`` (values as yaml) -> an arm; ``NAME`` alone names a built-in arm; ``random@ARM``
    the random subnetwork at the FLOPs of ``ARM`` (see ``MATCHED``), ``chosen@ARM`` the subnetwork ``ARM`` chose
    (``CHOSEN``), both the random baseline's overrides with any given after ``+LABEL:``."""
    name, _, body = text.partition(":")
    if name.startswith((MATCHED, CHOSEN)):  # the random baseline, with the overrides given (a label after "+")
        return name, dict(ARMS["random"], **_overrides(body))
    if not body:
        if name not in ARMS:
            raise SystemExit(f"unknown arm {name!r}; built in: {', '.join(ARMS)} (or NAME:key=value,...)")
        return name, ARMS[name]
    return name, _overrides(body)


def _overrides(body: str) -> dict[str, Any]:
    """``key=value,key=value`` (values as yaml) -> ``{key: value}``; empty: ``{}``."""
    import yaml

    arm = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        arm[key.strip()] = yaml.safe_load(value)
    return arm


def _source_arm(arm_name: str, prefix: str) -> str:
    """The arm whose run ``random@ARM`` / ``chosen@ARM`` (``+LABEL`` told apart) takes its FLOPs or subnetwork from."""
    return arm_name[len(prefix):].partition("+")[0]


def grid(args: argparse.Namespace) -> dict[str, Any]:
    path = Path(args.json)
    data = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    setting = QUICK_SETTING if args.quick else SETTING
    search_epochs, finetune_epochs = QUICK_EPOCHS if args.quick else (args.search_epochs, args.finetune_epochs)
    extra = dict(_parse_arm(f"set:{','.join(args.set)}")[1]) if args.set else {}
    tag = args.tag or ("quick" if args.quick else f"{search_epochs}+{finetune_epochs}")
    arms = [_parse_arm(a) for a in args.arms]
    todo = [(m, k, a, s) for m in args.models for k in args.keeps for a in arms for s in args.seeds]
    machine = describe_machine("cpu").replace(f"{torch.get_num_threads()} threads",
                                                              f"{args.threads} threads")
    for n, (model, keep, (arm_name, arm), seed) in enumerate(todo, 1):
        key = run_key(model, keep, arm_name, seed, tag)
        if key in data["runs"] and not args.rerun:
            continue
        run_keep = keep
        if arm_name.startswith(MATCHED):  # the random subnetwork at the FLOPs of another arm's run
            other = data["runs"].get(run_key(model, keep, _source_arm(arm_name, MATCHED), seed, tag))
            if other is None:
                print(f"[{n}/{len(todo)}] {key}: skipped, no run of {_source_arm(arm_name, MATCHED)!r} to match",
                      flush=True)
                continue
            size = int(extra.get("data.image_size") or setting["data.image_size"])
            run_keep = flops_matched_keep(model, MODEL_KWARGS.get(model, {}), size, other["flops_kept"])
        kept = None
        if arm_name.startswith(CHOSEN):  # another arm's subnetwork, trained as the random baseline trains its own
            source = _source_arm(arm_name, CHOSEN)
            other = data["runs"].get(run_key(model, keep, source, seed, tag))
            if other is None or not other.get("mask"):
                print(f"[{n}/{len(todo)}] {key}: skipped, no run of {source!r} with its subnetwork (runs before this "
                      "tool kept it have none)", flush=True)
                continue
            kept = other["mask"]
        overrides = run_overrides(model, run_keep, arm, seed, setting, search_epochs, finetune_epochs, extra)
        print(f"[{n}/{len(todo)}] {key}", flush=True)
        result = run_config(overrides, harness=arm_name in HARNESS_ARMS, threads=args.threads,
                            probe_examples=args.probe_examples, kept=kept)
        result.update(model=model, keep=keep, run_keep=run_keep, arm=arm_name, seed=seed, tag=tag, overrides=overrides,
                      harness=arm_name in HARNESS_ARMS, machine=machine,
                      date=datetime.datetime.now().isoformat(timespec="minutes"),
                      load_average=os.getloadavg() if hasattr(os, "getloadavg") else None)
        data["runs"][key] = result
        _write(path, data)
        first = next((e.get("val_accuracy") for e in result["epochs"] if e.get("val_accuracy") is not None), None)
        print(f"    accuracy {result['accuracy']:.1f}% (epoch 1: {first}), {result['wall_s']:.0f} s", flush=True)
    return data


# ---------------------------------------------------------------------------------------------------------------------
# Tables


def _mean_spread(values: Sequence[float], digits: int = 1) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _first_val(run: dict[str, Any]) -> float | None:
    return next((e["val_accuracy"] for e in run["epochs"] if e.get("val_accuracy") is not None), None)


def _model_label(run: dict[str, Any]) -> str:
    """The model's name with the arguments the run gave it, e.g. ``resnet32 (width=1)``."""
    kwargs = [f"{k.rsplit('.', 1)[1]}={v}" for k, v in run["overrides"].items() if k.startswith("model.kwargs.")]
    return f"{run['model']} ({', '.join(kwargs)})" if kwargs else run["model"]


def table(data: dict[str, Any], tag: str | None = None) -> str:
    """One row per (tag, model, keep, arm): mean ± sample standard deviation over seeds."""
    rows: dict[tuple, list[dict[str, Any]]] = {}
    for run in data["runs"].values():
        if tag is None or run["tag"] == tag:
            rows.setdefault((run["tag"], _model_label(run), run["keep"], run["arm"]), []).append(run)
    lines = [("| setting | model | keep | arm | seeds | accuracy % | after epoch 1 % | FLOPs kept | budget spent "
              "| train-cost saving | measured speedup | minutes/run |"),
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (tag_, model, keep, arm), runs in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2],
                                                                                 list(ARMS).index(kv[0][3])
                                                                                 if kv[0][3] in ARMS else 99)):
        dense = arm == "dense"
        lines.append(
            f"| {tag_} | {model} | {1.0 if dense else keep:g} | {arm} | {len(runs)} "
            f"| {_mean_spread([r['accuracy'] for r in runs])} | {_mean_spread([_first_val(r) for r in runs])} "
            f"| {_mean_spread([r['flops_kept'] for r in runs], 3)} "
            f"| {_mean_spread([r.get('budget_spent') for r in runs], 2)} "
            f"| {'-' if dense else _mean_spread([r['train_cost_saving'] for r in runs], 2) + 'x'} "
            f"| {'-' if dense else _mean_spread([r['measured_speedup'] for r in runs], 2) + 'x'} "
            f"| {statistics.mean(r['wall_s'] for r in runs) / 60:.1f} |")
    return "\n".join(lines)


def curves(data: dict[str, Any], tag: str | None = None) -> str:
    """Per-epoch table of every run: validation accuracy and the search diagnostics."""
    out = []
    for key, run in data["runs"].items():
        if tag is not None and run["tag"] != tag:
            continue
        out += [f"\n{key}\n",
                ("| phase | epoch | kind | budget | val % | train % (sampled) | train % (top) | near 0 | near 1 "
                 "| entropy | mean abs(L(m)-L(m')) | grad norm |"),
                "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for e in run["epochs"]:
            def get(name: str, fmt: str = "{:.1f}", e: dict[str, Any] = e) -> str:
                value = e.get(name, e.get(f"probe_{name}"))
                return "-" if value is None else fmt.format(value)

            out.append(f"| {e.get('phase')} | {e.get('epoch')} | {e.get('step_kind', '-')} "
                       f"| {get('budget_ratio', '{:.2f}')} | {get('val_accuracy')} | {get('train_accuracy')} "
                       f"| {get('train_accuracy_top')} | {get('scores_near_0', '{:.3f}')} "
                       f"| {get('scores_near_1', '{:.3f}')} | {get('score_entropy', '{:.3f}')} "
                       f"| {get('loss_gap', '{:.4f}')} | {get('grad_norm', '{:.2f}')} |")
    return "\n".join(out)


def plot(data: dict[str, Any], path: str, tag: str | None = None) -> None:
    """Validation accuracy and the share of polarised keep probabilities per epoch, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_pol) = plt.subplots(1, 2, figsize=(11, 4))
    runs = [run for run in data["runs"].values() if tag is None or run["tag"] == tag]
    for i, run in enumerate(runs):
        label = f"{_model_label(run)} {run['arm']} keep {run['keep']:g} seed {run['seed']} ({run['tag']})"
        xs = list(range(1, len(run["epochs"]) + 1))
        color = f"C{i % 10}"  # one colour per run in both panels
        ax_acc.plot(xs, [e.get("val_accuracy", math.nan) for e in run["epochs"]], marker="o", label=label,
                    color=color)
        polarised = [e.get("scores_near_0", e.get("probe_scores_near_0", math.nan))
                     + e.get("scores_near_1", e.get("probe_scores_near_1", math.nan)) for e in run["epochs"]]
        if not all(math.isnan(p) for p in polarised):
            ax_pol.plot(xs, polarised, marker="o", label=label, color=color)
    ax_acc.set(xlabel="epoch (search, then finetune)", ylabel="validation accuracy %", ylim=(0, 100))
    ax_pol.set(xlabel="epoch (search; a warm-up leaves them all at 1)",
               ylabel="share of keep probabilities within 0.05 of 0 or 1", ylim=(-0.02, 1.02))
    ax_acc.axhline(10, color="grey", lw=0.5, ls="--")
    ax_acc.legend(fontsize=7)
    ax_pol.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="results file: read, extended and rewritten after every run")
    parser.add_argument("--models", nargs="+", default=["resnet32"])
    parser.add_argument("--keeps", nargs="+", type=float, default=[0.5])
    parser.add_argument("--arms", nargs="+", default=["dense", "paper", "random", "default"],
                        help=f"built in: {', '.join(ARMS)}; or NAME:key=value,key=value")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--search-epochs", type=int, default=SEARCH_EPOCHS)
    parser.add_argument("--finetune-epochs", type=int, default=FINETUNE_EPOCHS)
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every run, key=value")
    parser.add_argument("--tag", help="name of the setting in the results (default: the epochs, or 'quick'); with "
                        "--table-only, the settings to show, separated by commas")
    parser.add_argument("--quick", action="store_true", help="a tiny setting that smoke-tests the pipeline")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--probe-examples", type=int, default=PROBE_EXAMPLES,
                        help="training examples of the top-score accuracy after each search epoch")
    parser.add_argument("--rerun", action="store_true", help="run again the runs already in the file")
    parser.add_argument("--table-only", action="store_true", help="print the file's tables, run nothing")
    parser.add_argument("--select", action="store_true",
                        help="with --table-only: only the runs of --arms, --models, --keeps and --seeds")
    parser.add_argument("--curves", action="store_true", help="also print every run's per-epoch table")
    parser.add_argument("--plot", help="also write a PNG of the per-epoch curves (matplotlib)")
    args = parser.parse_args(argv)
    maskprop.keep_freed_host_memory()
    maskprop.enlarge_onednn_primitive_cache()
    if args.table_only:
        data = json.loads(Path(args.json).read_text())
        if args.tag:  # one setting, or several separated by commas
            data["runs"] = {k: r for k, r in data["runs"].items() if r["tag"] in args.tag.split(",")}
        if args.select:  # only the runs of the arms, models, keep ratios and seeds named
            data["runs"] = {k: r for k, r in data["runs"].items()
                            if r["arm"] in args.arms and r["model"] in args.models and r["keep"] in args.keeps
                            and r["seed"] in args.seeds}
    else:
        data = grid(args)
    print(table(data))
    if args.curves:
        print(curves(data))
    if args.plot:
        plot(data, args.plot)


if __name__ == "__main__":
    main()
