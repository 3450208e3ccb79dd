"""Whether the search learns: the official-semantics harness of tools/search_study.py (fast), and the default search
of the quickstart recipe against its dense twin (slow: ``-m slow``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import maskprop
from maskprop.sparse.modules import SparseBatchNorm2d
from maskprop.train import load_config

REPO = Path(__file__).resolve().parents[1]


def _study():
    """tools/search_study.py as a module (tools/ is no package)."""
    name = "search_study"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tools" / "search_study.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _first_norm_outputs(model, mask, mode):
    """The output of the first BatchNorm of a pruned group, run as ``mask`` in ``mode``; and that BatchNorm."""
    norm = next(m for m in model.modules() if isinstance(m, SparseBatchNorm2d) and m.group is not None)
    seen = {}
    handle = norm.register_forward_hook(lambda module, args, output: seen.setdefault("y", output.detach().clone()))
    try:
        with maskprop.use_mask(model, mask, mode):
            model(torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    finally:
        handle.remove()
    return seen["y"], norm


@pytest.mark.parametrize("training", [True, False])
def test_official_harness_dropped_channel_emits_batchnorm_bias(training):
    study = _study()
    torch.manual_seed(0)
    model = maskprop.create_model("resnet20", num_classes=10, prune_residual=False)
    model.train(training)
    with torch.no_grad():  # a bias no channel has by chance, and running statistics away from 0 and 1
        for m in model.modules():
            if isinstance(m, SparseBatchNorm2d):
                m.bias.copy_(torch.linspace(0.5, 1.5, m.num_features))
                m.running_mean.fill_(0.3)
                m.running_var.fill_(2.0)
    groups = model.channel_groups()
    mask = maskprop.random_mask(groups, 0.5, torch.Generator().manual_seed(0))
    with study.official_semantics():
        y, norm = _first_norm_outputs(model, mask, "compact")  # the harness runs masked mode whatever is asked
        state = {k: v.clone() for k, v in norm.state_dict().items()}
    keep = mask[norm.group]
    dropped = (~keep).nonzero().flatten()
    assert y.shape[1] == norm.num_features and len(dropped) > 0
    if training:  # the dropped channel's batch is all zeros: it normalises to 0 and emits beta exactly
        expected = norm.bias[dropped].view(1, -1, 1, 1).expand(y.shape[0], -1, *y.shape[2:])
    else:  # eval: (0 - running mean) / sqrt(running var + eps) * gamma + beta, a constant per channel
        scale = norm.weight[dropped] / torch.sqrt(norm.running_var[dropped] + norm.eps)
        expected = ((0 - norm.running_mean[dropped]) * scale + norm.bias[dropped]).view(1, -1, 1, 1).expand(
            y.shape[0], -1, *y.shape[2:])
    torch.testing.assert_close(y[:, dropped], expected.detach(), rtol=1e-5, atol=1e-5)
    assert y[:, keep].abs().sum() > 0
    if training:  # as nn.BatchNorm2d: every channel's running statistics move, the dropped ones' towards 0
        assert (state["running_mean"][dropped] < 0.3).all() and (state["running_var"][dropped] < 2.0).all()

    # Outside the harness maskprop's own semantics are back: the dropped channel is exactly zero.
    y_maskprop, _ = _first_norm_outputs(model, mask, "masked")
    assert y_maskprop[:, dropped].abs().max() == 0
    y_compact, _ = _first_norm_outputs(model, mask, "compact")
    assert y_compact.shape[1] == int(keep.sum())


def test_official_harness_restores_everything():
    study = _study()
    from maskprop.sparse import execution
    from maskprop.train import loop, steps

    before = (SparseBatchNorm2d._masked_forward, steps.prepare_mask, steps.use_mask, loop.use_mask, maskprop.use_mask)
    with study.official_semantics():
        assert steps.prepare_mask is not execution.prepare_mask and loop.use_mask is not execution.use_mask
    assert (SparseBatchNorm2d._masked_forward, steps.prepare_mask, steps.use_mask, loop.use_mask,
            maskprop.use_mask) == before


@pytest.mark.slow
def test_default_search_learns_from_its_first_epoch_and_ends_near_dense(tmp_path, one_thread):
    """The quickstart recipe runs the default search (docs/methods.md, "How the search behaves early"): its dense
    warm-up learns as the dense twin does, its probabilities settle at 0 or 1 within the anneal, and it ends within 3
    points of the dense twin (the same recipe trained densely for the search plus finetune epochs). Measured on seed 0:
    44.0% after the second epoch, 94% of the probabilities settled after the anneal, 94.0% against 95.6%. Some
    minutes on one thread."""
    recipe = load_config(REPO / "recipes" / "quickstart.yaml")
    assert (recipe.sparsity.warmup_epochs, recipe.sparsity.anneal_epochs) == (2, 3)  # what the numbers above are for
    sparse = maskprop.fit(recipe, out=tmp_path / "sparse")
    epochs = recipe.optim.epochs + recipe.finetune.epochs
    dense = maskprop.fit(load_config(REPO / "recipes" / "quickstart.yaml", ["method=dense", f"optim.epochs={epochs}"]),
                         out=tmp_path / "dense")
    records = [json.loads(line) for line in (tmp_path / "sparse" / "metrics.jsonl").read_text().splitlines()]
    search = [r for r in records if r["phase"] == "search"]
    assert search[1]["step_kind"] == "warmup" and search[1]["val_accuracy"] > 30.0
    after_anneal = search[recipe.sparsity.warmup_epochs + recipe.sparsity.anneal_epochs - 1]
    assert after_anneal["scores_near_0"] + after_anneal["scores_near_1"] > 0.8
    assert sparse["accuracy"] >= dense["accuracy"] - 3.0, (sparse["accuracy"], dense["accuracy"])
