"""How many search steps the VR-PGE score estimator needs before it can tell an important channel from another:
the estimator's signal-to-noise ratio per channel, measured on a network at several points of its dense training.

For independent masks ``m, m' ~ Bernoulli(s)`` and ``h_j = s_j (1 - s_j)``, the estimator of channel ``j`` is
``g_j = (L(m) - L(m')) (m_j - s_j) h_j^(alpha - 1)`` (docs/methods.md, "The score gradient"). With the channel's
importance ``D_j = E[L | m_j = 0] - E[L | m_j = 1]`` (the loss the channel saves when it is kept, the others drawn
from ``s``):

    E[g_j] = -h_j^alpha D_j,      Var[g_j] ~= h_j^(2 alpha - 1) E[(L(m) - L(m'))^2]

(the second because ``(m_j - s_j)^2``, of mean ``h_j``, is nearly independent of the loss gap when the network has
many channels). The mean of ``n`` steps' estimates has a signal-to-noise ratio of 1 after

    n_j = E[(L(m) - L(m'))^2] / (h_j D_j^2)

steps, whatever ``alpha``. ``E[gap^2]`` grows with every channel's importance (about ``2 sum_k h_k D_k^2`` when the
channels act additively), so ``n_j`` is about twice the number of channels for a channel of typical importance: the
estimator needs steps in proportion to the width of the network before it says anything about one channel.

The tool trains the study's setting densely (a cosine schedule over the last epoch of ``--at``)
(``tools/search_study.py``: ``shapes`` 32x32, 1,024 images in batches of 64, ResNet-32 at widths 16-32-64) and, after
the epochs named by ``--at``, measures on fixed training batches:

* ``E[gap^2]`` from ``--pairs`` independent mask pairs at ``s = --keep`` (compact forwards in train mode, as a search
  step runs them), and
* the importance ``D_j`` of ``--channels`` channels drawn at random, each toggled in ``--toggles`` masks drawn from
  ``s`` (the others kept as drawn: a paired difference, far less noisy than the estimator), with its standard error,

then reports ``n_j`` for a channel of root-mean-square importance and for the quantiles of ``|D_j|``, beside the
steps a search of the setting has (its anneal, where the probabilities settle, and its whole search). BatchNorm
statistics and every random state are restored after each measurement, so the training is the one it would be.

Usage:
    python tools/estimator_snr.py --at 2 5 15 --json snr.json          # the study's setting, about 10 minutes
    python tools/estimator_snr.py --quick                                # a smoke run, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_study  # tools/ is no package: found through the path above

from maskprop.bench import describe_machine
from maskprop.sparse import use_mask
from maskprop.train import fit, load_config
from maskprop.vrpge import ChannelScores


def steps_to_resolve(gap2: float | Tensor, importance: Tensor, s: Tensor | float) -> Tensor:
    """``n_j = E[(L(m) - L(m'))^2] / (s_j (1 - s_j) D_j^2)``: the steps after which the mean of channel ``j``'s
    VR-PGE estimates has a signal-to-noise ratio of 1 (see the module docstring); ``inf`` where ``D_j = 0``."""
    s = torch.as_tensor(s, dtype=importance.dtype)
    return torch.as_tensor(gap2, dtype=importance.dtype) / (s * (1 - s) * importance.square())


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Restore the model's buffers (BatchNorm statistics) and torch's global random state afterwards."""
    buffers = copy.deepcopy({k: v for k, v in model.state_dict().items() if k not in dict(model.named_parameters())})
    rng = torch.get_rng_state()
    try:
        yield
    finally:
        model.load_state_dict(buffers, strict=False)
        torch.set_rng_state(rng)


@torch.no_grad()
def measure(model: nn.Module, groups: Mapping[str, int], batches: Sequence[tuple[Tensor, Tensor]],
            criterion: nn.Module, keep: float, pairs: int, toggles: int, channels: int | None = None,
            seed: int = 0) -> dict[str, Any]:
    """``E[gap^2]`` over ``pairs`` mask pairs and the importance ``D_j`` over ``toggles`` toggles of ``channels``
    channels drawn at random (None: all), at keep probabilities ``keep`` (train-mode compact forwards, as a search
    step runs them); see the module docstring."""
    scores = ChannelScores(groups, keep_ratio=keep, init=keep)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(scores.num_channels, generator=generator)[:channels].sort().values

    def loss(flat: Tensor, batch: tuple[Tensor, Tensor]) -> float:
        with use_mask(model, scores.split(flat), "compact"):
            return float(criterion(model(batch[0]).float(), batch[1]))

    model.train()
    with _untouched(model):
        gaps = torch.tensor([loss(scores.sample_flat(generator), batches[i % len(batches)])
                             - loss(scores.sample_flat(generator), batches[i % len(batches)]) for i in range(pairs)],
                            dtype=torch.float64)
        diffs = torch.zeros(toggles, len(chosen), dtype=torch.float64)
        for t in range(toggles):
            base, batch = scores.sample_flat(generator), batches[t % len(batches)]
            for i, j in enumerate(chosen.tolist()):
                dropped, kept = base.clone(), base.clone()
                dropped[j], kept[j] = False, True
                if not dropped[scores.group_index == scores.group_index[j]].any():
                    dropped[j] = True  # the last channel of a group is never dropped: no importance measured
                diffs[t, i] = loss(dropped, batch) - loss(kept, batch)
    importance = diffs.mean(0)
    error = diffs.std(0, unbiased=True) / math.sqrt(toggles) if toggles > 1 else torch.full_like(importance, math.nan)
    gap2 = float(gaps.square().mean())
    # mean D_j^2 without the toggles' own noise (E[mean^2] = D^2 + SE^2)
    rms = math.sqrt(max(float((importance.square() - error.nan_to_num().square()).mean()), 0.0))
    magnitude = importance.abs()
    quantiles = {f"q{int(q * 100)}": float(torch.quantile(magnitude, q)) for q in (0.5, 0.9, 0.99)}
    steps = {name: float(steps_to_resolve(gap2, torch.tensor([value], dtype=torch.float64), keep))
             for name, value in dict(rms=rms, **quantiles).items()}
    h = keep * (1 - keep)
    return {"keep": keep, "pairs": pairs, "toggles": toggles, "channels": scores.num_channels,
            "gap2_additive": 2 * scores.num_channels * h * rms**2,
            "measured_channels": chosen.tolist(), "gap2": gap2,
            "gap_abs": float(gaps.abs().mean()), "importance_rms": rms, "importance_quantiles": quantiles,
            "importance_se_mean": float(error.mean()), "significant_share": float((magnitude > 2 * error).double()
                                                                                   .mean()),
            "steps_to_resolve": steps, "importance": importance.tolist()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train the setting densely, measuring after the epochs in ``args.at``."""
    from maskprop.train import loop

    setting = dict(search_study.QUICK_SETTING if args.quick else search_study.SETTING)
    search_epochs, finetune_epochs = search_study.QUICK_EPOCHS if args.quick else (search_study.SEARCH_EPOCHS,
                                                                                  search_study.FINETUNE_EPOCHS)
    overrides = search_study.run_overrides(args.model, args.keep, {"method": "dense"}, args.seed, setting,
                                           search_epochs, finetune_epochs, {})
    overrides["optim.epochs"] = max(args.at)
    cfg = load_config(None, [f"{k}={search_study._yaml(v)}" for k, v in overrides.items()])
    torch.set_num_threads(args.threads)
    steps_per_epoch = setting["data.train_size"] // setting["data.batch_size"]
    anneal = search_study.DEFAULT_SEARCH["sparsity.anneal_epochs"] * steps_per_epoch
    result: dict[str, Any] = {"machine": describe_machine(), "model": args.model, "setting": overrides,
                              "search_steps": search_epochs * steps_per_epoch, "anneal_steps": anneal,
                              "measurements": []}
    log_epoch = loop._log_epoch

    def log(run: Any, logger: Any, record: dict[str, Any], *a: Any, **k: Any) -> None:
        log_epoch(run, logger, record, *a, **k)
        if record.get("epoch") in args.at:
            start = time.perf_counter()
            batches = [run.ctx.inputs(*batch) for batch in _first_batches(run, args.batches)]
            found = measure(run.state.model, run.groups, batches, run.ctx.criterion, args.keep, args.pairs,
                            args.toggles, args.channels, seed=args.seed)
            found.update(epoch=record["epoch"], val_accuracy=record.get("val_accuracy"),
                         seconds=time.perf_counter() - start)
            result["measurements"].append(found)
            _print_row(found)

    loop._log_epoch = log
    try:
        fit(cfg, out=None)
    finally:
        loop._log_epoch = log_epoch
    return result


def _first_batches(run: Any, count: int) -> list[tuple[Tensor, Tensor]]:
    """The first ``count`` batches of the training set in order (the dataset's own transform), global RNG untouched."""
    rng = torch.get_rng_state()
    loader = torch.utils.data.DataLoader(run.train_set, batch_size=run.cfg.data.batch_size, shuffle=False)
    batches = [batch for _, batch in zip(range(count), loader)]
    torch.set_rng_state(rng)
    return batches


HEADER = ("| after epoch | val accuracy % | E[gap^2] | its additive part 2 sum h D^2 | RMS importance | "
          "median / 90% / 99% importance | channels significant | steps for SNR 1: RMS / median / 90% / 99% channel |")


def _print_row(m: dict[str, Any]) -> None:
    q, n = m["importance_quantiles"], m["steps_to_resolve"]
    print(f"| {m['epoch']} | {m['val_accuracy']:.1f} | {m['gap2']:.2e} | {m['gap2_additive']:.2e} | "
          f"{m['importance_rms']:.1e} | "
          f"{q['q50']:.1e} / {q['q90']:.1e} / {q['q99']:.1e} | {100 * m['significant_share']:.0f}% | "
          f"{n['rms']:,.0f} / {n['q50']:,.0f} / {n['q90']:,.0f} / {n['q99']:,.0f} |", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--keep", type=float, default=0.5, help="keep probability of every channel (default 0.5)")
    parser.add_argument("--at", type=int, nargs="+", default=[2, 5, 15], help="measure after these dense epochs")
    parser.add_argument("--pairs", type=int, default=256, help="mask pairs for E[gap^2]")
    parser.add_argument("--toggles", type=int, default=4, help="masks in which each channel is toggled")
    parser.add_argument("--channels", type=int, default=168,
                        help="channels whose importance is measured, drawn at random (default 168: a quarter of "
                             "ResNet-32's at widths 16-32-64)")
    parser.add_argument("--batches", type=int, default=4, help="fixed training batches the losses are taken on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="the tool's smoke setting (numbers mean nothing)")
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args(argv)
    if args.quick:
        args.at, args.pairs, args.toggles, args.batches, args.channels = [1], 8, 2, 1, 16
    print(describe_machine())
    print(HEADER)
    print("|---:|---:|---:|---:|---:|---|---:|---|")
    result = run(args)
    print(f"a search of this setting: {result['search_steps']} steps, {result['anneal_steps']} of them in the "
          f"default search's anneal")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
