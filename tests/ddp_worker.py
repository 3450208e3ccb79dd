"""Run by tests/test_distributed.py under torchrun: fit each job of a json list and keep what every rank ends with.

Each job is ``{"config": {...}, "out": dir or null, "resume": bool, "dump": path prefix, "rank_config": {rank: {dotted
key: value}}, "static": bool, "perturb": bool}`` (``static``: the static-shape steps, run eagerly, as ``cuda_graphs``
selects them on CUDA under torchrun; ``perturb``: rank 1 builds its model with other weights, which the run must replace
by rank 0's, or ``"shape"``: with a buffer more, which the run must refuse). For every job this rank writes
``<dump>.rank<r>.json`` (the error message, if any) and, when the run finished, ``<dump>.rank<r>.pt``: its model state
(weights and BatchNorm statistics), scores, fixed mask, fix description, optimizer states and per-epoch records. Errors
do not stop the worker: the next job starts on every rank.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch

import maskprop.train.loop as loop
from maskprop.models.spec import ModelSpec
from maskprop.train import setup
from maskprop.train.distributed import leave
from maskprop.train.graphs import GraphsChoice


def _set(config: dict, dotted: str, value) -> None:
    node = config
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _dump(run) -> dict:
    state = run.state
    return {
        "model": {k: v.clone() for k, v in state.model.state_dict().items()},
        "scores": None if state.scores is None else state.scores.scores.detach().clone(),
        "fixed_mask": state.fixed_mask,
        "fix_info": state.fix_info,
        "weight_optimizer": state.weight_optimizer.state_dict(),
        "score_optimizer": None if state.score_optimizer is None else state.score_optimizer.state_dict(),
        "mask_generator": state.mask_generator.get_state(),
        "step": state.step,
        "counters": dict(state.counters),
        "ddp": state.ddp is not None,
    }


def fit_and_dump(config: dict, out: str | None = None, resume: bool = False, static: bool = False,
                 perturb: bool | str = False) -> tuple[dict, dict]:
    """``maskprop.train.loop.fit`` of ``config``, and :func:`_dump` of the run it trained (caught at its summary);
    ``static``: with the static-shape steps, eagerly; ``perturb``: the model built with every weight plus 1
    (``"shape"``: with one buffer more)."""
    captured = {}
    summarize, resolve, build = loop.summarize, setup.resolve_cuda_graphs, ModelSpec.build

    def perturbed(spec, *args, **kwargs):
        model = build(spec, *args, **kwargs)
        if perturb == "shape":
            model.register_buffer("extra", torch.zeros(3))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        return model

    def capture(run, elapsed):
        captured["run"] = run
        return summarize(run, elapsed)

    loop.summarize = capture
    if static:
        setup.resolve_cuda_graphs = lambda cfg, device, model=None: GraphsChoice(True, False)
    if perturb:
        ModelSpec.build = perturbed
    try:
        summary = loop.fit(config, out=out, resume=resume)
    finally:
        loop.summarize, setup.resolve_cuda_graphs, ModelSpec.build = summarize, resolve, build
    return summary, _dump(captured["run"])


def main() -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    for job in json.loads(Path(sys.argv[1]).read_text()):
        config = copy.deepcopy(job["config"])
        for dotted, value in job.get("rank_config", {}).get(str(rank), {}).items():
            _set(config, dotted, value)
        try:
            summary, dump = fit_and_dump(config, out=job.get("out"), resume=job.get("resume", False),
                                         static=job.get("static", False),
                                         perturb=rank == 1 and job.get("perturb", False))
            result = {"error": None, "accuracy": summary["accuracy"]}
            torch.save(dump, f"{job['dump']}.rank{rank}.pt")
        except (ValueError, FileNotFoundError) as err:
            result = {"error": str(err), "type": type(err).__name__}
        Path(f"{job['dump']}.rank{rank}.json").write_text(json.dumps(result))
    leave()

if __name__ == "__main__":
    main()
