"""The trainer: one VR-PGE step against a hand computation, whole runs and their artifacts, resume, bad input."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TINY_RUN, nontrivial_batch_norms, with_overrides

import maskprop
from maskprop.cli import main
from maskprop.sparse import use_mask
from maskprop.train.checkpoint import load_checkpoint
from maskprop.train.config import SparsityConfig, load_config
from maskprop.train.data import ShapesDataset
from maskprop.train.steps import StepContext, subnet_step, vrpge_step
from maskprop.vrpge import ChannelScores, project_scores, score_grad

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs (conftest.py)

TINY = TINY_RUN
SUMMARY_KEYS = {"accuracy", "dense_params", "subnet_params", "dense_flops", "subnet_flops", "train_cost_saving",
                "measured_speedup", "widths", "run_time_s"}


def tiny(**overrides) -> dict:
    """TINY with dotted-key overrides, as a plain dict."""
    return with_overrides(TINY, **overrides)


def write_recipe(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One tiny VR-PGE run through ``maskprop train``: (run directory, captured stdout)."""
    root = tmp_path_factory.mktemp("cli")
    recipe = write_recipe(root / "tiny.yaml", TINY)
    out = root / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["train", str(recipe), "--out", str(out)]) == 0
    return out, stdout.getvalue()


# ---------------------------------------------------------------------------------------------------------------------
# One step


def _step_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = maskprop.create_model("resnet20", num_classes=4).train()
    scores = ChannelScores(model.channel_groups(), keep_ratio=0.5)
    with torch.no_grad():  # spread the scores so that the estimator's per-channel factors differ
        scores.scores.add_(0.3 * torch.rand(scores.num_channels) - 0.15)
    scores.project_()
    weights = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    adam = torch.optim.Adam([scores.scores], lr=12e-3)
    ctx = StepContext(torch.nn.CrossEntropyLoss(), torch.device("cpu"), maskprop.CostModel(model, (3, 8, 8)))
    images, labels = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    return model, scores, (weights, adam), ctx, (images, labels)


def _loss(model, mask, batch):
    with use_mask(model, mask, "compact"):
        return F.cross_entropy(model(batch[0]), batch[1])


@pytest.mark.parametrize("estimator", ["vrpge", "vrpge_sym"])
def test_vrpge_step_matches_a_hand_computation(estimator):
    model, scores, optimizers, ctx, batch = _step_setup()
    generator = torch.Generator().manual_seed(7)
    before, scores_before = copy.deepcopy(model), copy.deepcopy(scores)
    s0 = scores.scores.detach().clone()
    sparsity = SparsityConfig(estimator=estimator, alpha=0.5)

    result = vrpge_step(model, scores, optimizers, batch, generator, sparsity, ctx)

    # the masks are the generator's next two samples from the scores before the step, m then m'
    replay = torch.Generator().manual_seed(7)
    flat_m, flat_m2 = scores_before.sample_flat(replay), scores_before.sample_flat(replay)
    assert torch.equal(scores.flatten(result.mask), flat_m) and torch.equal(scores.flatten(result.mask2), flat_m2)
    assert not torch.equal(flat_m, flat_m2)
    # the losses are those of the two subnetworks with the weights before the step
    with torch.no_grad():
        loss_m = _loss(copy.deepcopy(before), result.mask, batch)
        loss_m2 = _loss(copy.deepcopy(before), result.mask2, batch)
    assert result.loss == pytest.approx(float(loss_m), rel=1e-6)
    assert result.loss2 == pytest.approx(float(loss_m2), rel=1e-6)
    # scores.grad holds the estimator's value on those losses and masks (supplement eq. (12))
    expected_grad = score_grad(estimator, result.loss, result.loss2, flat_m, flat_m2, s0, alpha=0.5)
    torch.testing.assert_close(scores.scores.grad, expected_grad, rtol=0, atol=0)
    # one Adam step from zero state is s - lr * g / (|g| + eps), then the projection onto the budget
    g = expected_grad
    adam_step = s0 - 12e-3 * g / (g.abs() + 1e-8)
    torch.testing.assert_close(scores.scores.detach(), project_scores(adam_step, scores.budget), rtol=0, atol=1e-7)
    assert float(scores.scores.detach().sum()) <= scores.budget + 1e-4
    # the weights' gradient is that of L(m) alone (weight_grad: first)
    reference = copy.deepcopy(before)
    _loss(reference, result.mask, batch).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    # FLOPs: 3 f(m) + f(m') against the dense 3 f_D (supplement C.1)
    f = ctx.cost.flops
    assert result.flops == 3 * f(result.mask, 8) + f(result.mask2, 8)
    assert result.dense_flops == 3 * f(None, 8)


def test_sgd_decays_dropped_channels_and_leaves_them_otherwise_alone():
    model, scores, optimizers, ctx, batch = _step_setup()
    before = copy.deepcopy(model)
    result = vrpge_step(model, scores, optimizers, batch, torch.Generator().manual_seed(3), SparsityConfig(), ctx)
    dropped = ~result.mask["layer2.0.conv1"]
    assert dropped.any()
    conv = model.layer2[0].conv1.weight
    old = before.layer2[0].conv1.weight
    assert torch.equal(conv.grad[dropped], torch.zeros_like(conv.grad[dropped]))
    # first SGD step: w - lr * (grad + wd * w); a dropped channel has grad 0, so it only decays
    torch.testing.assert_close(conv.detach()[dropped], old.detach()[dropped] * (1 - 0.1 * 5e-4))


def test_weight_grad_both_averages_the_two_subnetworks_gradients():
    model, scores, optimizers, ctx, batch = _step_setup()
    before = copy.deepcopy(model)
    result = vrpge_step(model, scores, optimizers, batch, torch.Generator().manual_seed(5),
                        SparsityConfig(weight_grad="both"), ctx)
    first, second = copy.deepcopy(before), copy.deepcopy(before)
    _loss(first, result.mask, batch).backward()
    _loss(second, result.mask2, batch).backward()
    for (name, p), a, b in zip(model.named_parameters(), first.parameters(), second.parameters()):
        torch.testing.assert_close(p.grad, 0.5 * (a.grad + b.grad), msg=name)
    f = ctx.cost.flops
    assert result.flops == 3 * f(result.mask, 8) + 3 * f(result.mask2, 8)


def test_subnet_step_costs_three_forwards_of_its_mask():
    model, scores, optimizers, ctx, batch = _step_setup()
    mask = scores.top_mask()
    result = subnet_step(model, optimizers[0], batch, mask, ctx)
    assert result.flops == 3 * ctx.cost.flops(mask, 8)
    assert result.loss2 is None and result.kept_ratio < 0.6



def test_vrpge_step_passes_its_alpha_to_the_estimator():
    """The score gradient takes ``sparsity.alpha`` (here 0.9, not the estimator's default 0.5)."""
    model, scores, optimizers, ctx, batch = _step_setup()
    s0, scores_before = scores.scores.detach().clone(), copy.deepcopy(scores)
    result = vrpge_step(model, scores, optimizers, batch, torch.Generator().manual_seed(7),
                        SparsityConfig(alpha=0.9), ctx)
    replay = torch.Generator().manual_seed(7)
    flat_m, flat_m2 = scores_before.sample_flat(replay), scores_before.sample_flat(replay)
    expected = score_grad("vrpge", result.loss, result.loss2, flat_m, flat_m2, s0, alpha=0.9)
    torch.testing.assert_close(scores.scores.grad, expected, rtol=0, atol=0)
    assert not torch.allclose(expected, score_grad("vrpge", result.loss, result.loss2, flat_m, flat_m2, s0, alpha=0.5))


def test_vrpge_step_reports_the_kept_ratio_of_m():
    """``kept_ratio`` is the kept fraction of the back-propagated mask ``m``, counted by hand (not that of ``m'``)."""
    model, scores, optimizers, ctx, batch = _step_setup()
    result = vrpge_step(model, scores, optimizers, batch, torch.Generator().manual_seed(7), SparsityConfig(), ctx)
    kept = [int(result.mask[g].sum()) for g in scores.groups]
    kept2 = [int(result.mask2[g].sum()) for g in scores.groups]
    assert sum(kept) != sum(kept2)
    assert result.kept_ratio == sum(kept) / sum(scores.groups.values())


def test_vrpge_step_projects_the_updated_scores_onto_the_budget():
    """After the Adam step the scores are projected: with a score learning rate large enough to leave the feasible
    set, they equal ``project_scores`` of the Adam step by hand (and differ from it unprojected)."""
    model, scores, (weights, _), ctx, batch = _step_setup()
    s0 = scores.scores.detach().clone()
    adam = torch.optim.Adam([scores.scores], lr=0.5)
    vrpge_step(model, scores, (weights, adam), batch, torch.Generator().manual_seed(7), SparsityConfig(), ctx)
    g = scores.scores.grad
    adam_step = s0 - 0.5 * g / (g.abs() + 1e-8)
    expected = project_scores(adam_step, scores.budget)
    assert not torch.allclose(expected, adam_step)
    torch.testing.assert_close(scores.scores.detach(), expected, rtol=0, atol=1e-6)


def test_steps_read_the_global_batch_through_reduce_stats():
    """Under torchrun ``ctx.reduce_stats`` sums ``[loss * n, ..., correct, n]`` over the ranks: two ranks with the
    same batch (a stand-in doubling the sums) give the one-process losses, twice the examples and correct counts, and
    train FLOPs of the global batch of 16."""
    import dataclasses

    for kind in ("vrpge", "subnet"):
        runs = []
        for reduce in (None, lambda stats: stats * 2):
            model, scores, optimizers, ctx, batch = _step_setup()
            ctx = dataclasses.replace(ctx, reduce_stats=reduce)
            if kind == "vrpge":
                runs.append(vrpge_step(model, scores, optimizers, batch, torch.Generator().manual_seed(7),
                                       SparsityConfig(), ctx))
            else:
                runs.append(subnet_step(model, optimizers[0], batch, scores.top_mask(), ctx))
        one, two = runs
        assert two.loss == pytest.approx(one.loss, rel=1e-12) and two.count == 16 and two.correct == 2 * one.correct
        assert two.grad_norm == pytest.approx(one.grad_norm, rel=1e-12)
        f = ctx.cost.flops
        assert two.dense_flops == 3 * f(None, 16)
        if kind == "vrpge":
            assert two.loss2 == pytest.approx(one.loss2, rel=1e-12)
            assert two.flops == 3 * f(two.mask, 16) + f(two.mask2, 16)
        else:
            assert two.flops == 3 * f(scores.top_mask(), 16)


def test_subnet_step_reports_the_gradient_norm_before_clipping():
    """``grad_norm`` is the L2 norm of all the weight gradients, by hand in float64, before the clipping (which is
    tight here) scales them to ``clip_grad_norm``."""
    import dataclasses

    model, scores, optimizers, ctx, batch = _step_setup()
    mask = scores.top_mask()
    reference = copy.deepcopy(model)
    _loss(reference, mask, batch).backward()
    norm = sum(float(p.grad.double().pow(2).sum()) for p in reference.parameters() if p.grad is not None) ** 0.5
    ctx = dataclasses.replace(ctx, clip_grad_norm=norm / 4)
    result = subnet_step(model, optimizers[0], batch, mask, ctx)
    assert result.grad_norm == pytest.approx(norm, rel=1e-5)
    clipped = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None) ** 0.5
    assert clipped == pytest.approx(norm / 4, rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# One epoch's means, evaluation, the best-of-n fix


def test_the_epoch_means_weigh_each_batch_by_its_examples():
    """EpochMeter: the loss, L(m') and the accuracy are means over the examples (a short last batch weighs less); the
    sampled kept ratio, |L(m) - L(m')| and the gradient norm are means over the steps. Against a hand computation."""
    from maskprop.train.loop import EpochMeter
    from maskprop.train.steps import StepResult

    meter = EpochMeter()
    meter.update(StepResult(loss=1.0, loss2=1.5, correct=6, count=8, kept_ratio=0.5, flops=0, dense_flops=0,
                            grad_norm=2.0))
    meter.update(StepResult(loss=4.0, loss2=3.0, correct=1, count=2, kept_ratio=0.25, flops=0, dense_flops=0,
                            grad_norm=5.0))
    expected = {"train_loss": (8 * 1.0 + 2 * 4.0) / 10, "train_loss2": (8 * 1.5 + 2 * 3.0) / 10,
                "train_accuracy": 100.0 * 7 / 10, "kept_ratio_sampled": (0.5 + 0.25) / 2, "loss_gap": (0.5 + 1.0) / 2,
                "grad_norm": (2.0 + 5.0) / 2}
    assert meter.summary() == pytest.approx(expected, rel=1e-12)


def test_static_windows_give_the_epoch_means_their_steps_would_give():
    """EpochMeter.add_window: the sums of static steps read at once (graphs.py) give the epoch means the steps one by
    one would (a window of plain steps, without pairs, has its gradient-norm mean too); _window_result: a window as one
    step's result for the step logs, its means over its examples and steps. Against a hand computation."""
    from maskprop.train.loop import EpochMeter, _window_result
    from maskprop.train.meter import MeterWindow

    plain = MeterWindow(loss=8 * 1.0 + 2 * 4.0, correct=6.9999, grad_norm=2.0 + 5.0, count=10, steps=2,
                        kept=0.5 + 0.25)  # a float32 sum of correct predictions a little under 7
    meter = EpochMeter()
    meter.add_window(plain)
    assert meter.summary() == pytest.approx({"train_loss": 1.6, "train_accuracy": 70.0, "kept_ratio_sampled": 0.375,
                                             "grad_norm": 3.5}, rel=1e-12)
    read = _window_result(plain)
    assert read.loss2 is None and read.correct == 7 and read.count == 10
    assert (read.loss, read.kept_ratio, read.grad_norm) == pytest.approx((1.6, 0.375, 3.5), rel=1e-12)
    search = MeterWindow(loss=12.0, loss2=18.0, correct=3.0, loss_gap=0.5 + 1.5, grad_norm=3.0, count=6, steps=3,
                         pairs=3, kept=0.9)
    meter = EpochMeter()
    meter.add_window(search)
    assert meter.summary() == pytest.approx({"train_loss": 2.0, "train_loss2": 3.0, "train_accuracy": 50.0,
                                             "kept_ratio_sampled": 0.3, "loss_gap": 2.0 / 3, "grad_norm": 1.0},
                                            rel=1e-12)
    read = _window_result(search)
    assert (read.loss, read.loss2, read.kept_ratio, read.grad_norm) == pytest.approx((2.0, 3.0, 0.3, 1.0), rel=1e-12)


def _classifier_data(n: int = 11, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_evaluate_gives_the_mean_loss_and_accuracy_over_every_example():
    """evaluate: the cross entropy summed over every example over their count (a short last batch weighs less) and the
    top-1 accuracy of the subnetwork in eval mode, against plain torch in float64 on the masked model; the model's
    mode is given back."""
    from torch.utils.data import DataLoader, TensorDataset

    from maskprop.train.loop import evaluate

    torch.manual_seed(0)
    model = nontrivial_batch_norms(maskprop.create_model("resnet20", num_classes=4)).train()
    images, labels = _classifier_data()
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)  # batches of 4, 4 and 3
    ctx = StepContext(torch.nn.CrossEntropyLoss(), torch.device("cpu"), maskprop.CostModel(model, (3, 8, 8)))
    mask = maskprop.random_mask(model.channel_groups(), 0.5, torch.Generator().manual_seed(1))
    for m in (None, mask):
        result = evaluate(model, loader, m, ctx)
        reference = copy.deepcopy(model).double().eval()
        with torch.no_grad(), use_mask(reference, m, "masked"):
            logits = reference(images.double())
        assert result["loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
        assert result["accuracy"] == pytest.approx(100.0 * int((logits.argmax(1) == labels).sum()) / len(labels))
        assert model.training


def test_best_of_n_keeps_the_earliest_sample_of_the_best_training_accuracy():
    """_best_of_n: masks drawn one after another from the run's mask generator, each scored in eval mode on every
    example; the accuracies in percent of all examples, and the first of the best wins. Against the same draws scored
    on the masked model; with a classifier that predicts class 0 whatever the mask, every sample ties and the first
    wins."""
    from torch.utils.data import DataLoader, TensorDataset

    from maskprop.train.loop import _best_of_n

    torch.manual_seed(0)
    model = nontrivial_batch_norms(maskprop.create_model("resnet20", num_classes=4))
    images, labels = _classifier_data(23)
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    ctx = StepContext(torch.nn.CrossEntropyLoss(), torch.device("cpu"), maskprop.CostModel(model, (3, 8, 8)))
    with torch.no_grad():  # a classifier whose predictions vary with the mask
        model.fc.weight.normal_(0.0, 3.0)
    scores = ChannelScores(model.channel_groups(), keep_ratio=0.3)
    for tie in (False, True):
        if tie:
            with torch.no_grad():
                model.fc.weight.zero_()
                model.fc.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        generator = torch.Generator().manual_seed(5)
        drawn = copy.deepcopy(generator)
        masks = [scores.split(scores.sample_flat(drawn)) for _ in range(4)]
        accuracies = []
        for mask in masks:
            with torch.no_grad(), use_mask(model.eval(), mask, "masked"):
                accuracies.append(100.0 * int((model(images).argmax(1) == labels).sum()) / len(labels))
        chosen, info = _best_of_n(scores, model.train(), generator, 4, loader, ctx)
        best = accuracies.index(max(accuracies))
        assert info == {"rule": "best_of_n", "train_accuracies": pytest.approx(accuracies), "chosen": best,
                        "examples": 23}
        assert {g: m.tolist() for g, m in chosen.items()} == {g: m.tolist() for g, m in masks[best].items()}
        assert torch.equal(generator.get_state(), drawn.get_state()) and model.training
        if tie:
            assert len(set(accuracies)) == 1 and best == 0
        else:
            assert len(set(accuracies)) > 1


# ---------------------------------------------------------------------------------------------------------------------
# Whole runs


def test_cli_run_writes_every_artifact(cli_run):
    out, stdout = cli_run
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "summary.json"):
        assert (out / name).is_file(), name
    assert list(out.glob("events.out.tfevents.*"))
    assert not list(out.glob(".*.tmp"))
    assert load_config(out / "config.yaml") == load_config(TINY)

    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["accuracy"] == pytest.approx(_accuracy_of_checkpoint(out / "last.pt"), abs=1e-9)
    assert summary["subnet_flops"] < summary["dense_flops"]
    assert summary["subnet_params"] < summary["dense_params"]
    assert summary["train_cost_saving"] > 1.0
    assert summary["measured_speedup"] is not None and summary["measured_speedup"] > 0
    assert summary["steps"] == {"search": 4, "finetune": 2, "train": 0}
    groups = maskprop.create_model("resnet20").channel_groups()
    assert set(summary["widths"]) == set(groups)
    assert all(1 <= summary["widths"][g] <= n for g, n in groups.items())
    assert summary["run_time_s"] > 0

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in records] == [("search", 1), ("search", 2), ("finetune", 1)]
    assert all("val_accuracy" in r for r in records)
    assert 0.3 < records[-1]["kept_ratio_expected"] <= 0.5 + 1e-6
    assert records[-1]["train_cost_saving"] == pytest.approx(summary["train_cost_saving"])

    checkpoint = load_checkpoint(out / "last.pt")
    assert (checkpoint["phase"], checkpoint["step"], checkpoint["model_name"]) == ("done", 6, "resnet20")
    assert checkpoint["counters"]["train_flops"] == summary["train_flops"]
    assert {g: int(m.sum()) for g, m in checkpoint["fixed_mask"].items()} == summary["widths"]

    assert "accuracy" in stdout and "train-cost saving" in stdout and str(out) in stdout


def _accuracy_of_checkpoint(path: Path, mask: dict | None | str = "fixed") -> float:
    """Top-1 accuracy (%) of a finished run's final subnetwork (or of ``mask``: ``None`` for the whole network) on its
    validation set, recomputed from the checkpoint with plain torch: a forward in eval mode with every dropped
    channel's output zeroed (masked mode)."""
    from torch.utils.data import DataLoader

    from maskprop.train.data import build_datasets

    checkpoint = load_checkpoint(path)
    cfg = load_config(checkpoint["config"])
    _, val_set, num_classes, _ = build_datasets(cfg.data)
    model = maskprop.create_model(checkpoint["model_name"], num_classes=num_classes, **checkpoint["model_kwargs"])
    model.load_state_dict(checkpoint["model"])
    model.eval()
    correct = count = 0
    with torch.no_grad(), use_mask(model, checkpoint["fixed_mask"] if mask == "fixed" else mask, "masked"):
        for images, labels in DataLoader(val_set, batch_size=cfg.data.batch_size):
            correct += int((model(images).argmax(1) == labels).sum())
            count += labels.numel()
    return 100.0 * correct / count


def test_tensorboard_events_hold_the_run_curves(cli_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(cli_run[0]))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {"search/loss_m", "search/loss_m2", "search/accuracy", "val/search_accuracy", "val/finetune_accuracy",
                "search/kept_ratio_expected", "search/kept_ratio_sampled", "widths/layer3", "lr/weights",
                "lr/scores", "cost/train_flops", "cost/train_cost_saving", "finetune/loss"}
    assert expected <= scalars, expected - scalars
    assert events.Tags()["histograms"] == ["search/scores"]


def test_bf16_autocast_and_channels_last_run(tmp_path):
    """amp=bf16 runs every conv of the training steps in bfloat16 on channels_last inputs; float32 without it."""
    seen: dict[str, set] = {"bf16": set(), "none": set()}

    def record(amp: str):
        def hook(module, inputs, output):
            if isinstance(module, torch.nn.Conv2d) and module.training:
                layout = "channels_last" if inputs[0].is_contiguous(memory_format=torch.channels_last) else "nchw"
                seen[amp].add((output.dtype, layout))
        return hook

    for amp in ("bf16", "none"):
        handle = torch.nn.modules.module.register_module_forward_hook(record(amp))
        try:
            summary = maskprop.fit(tiny(amp=amp, channels_last=True, **{"optim.epochs": 1, "finetune.epochs": 1}))
        finally:
            handle.remove()
        assert summary["train_cost_saving"] > 1.0
    assert seen["bf16"] == {(torch.bfloat16, "channels_last")}
    assert seen["none"] == {(torch.float32, "channels_last")}


def test_train_cost_saving_sums_the_masks_actually_used(cli_run):
    out, _ = cli_run
    summary = json.loads((out / "summary.json").read_text())
    checkpoint = load_checkpoint(out / "last.pt")
    model = maskprop.create_model("resnet20")
    f_dense, f_fixed = maskprop.flops(model, (3, 16, 16)), maskprop.flops(model, (3, 16, 16), checkpoint["fixed_mask"])
    # the dense baseline trains as many steps as the search; the finetune adds 3 f(fixed) per step to the sparse cost
    assert summary["dense_train_flops"] == 4 * 64 * 3 * f_dense
    search_flops = summary["train_flops"] - 2 * 64 * 3 * f_fixed
    assert 0.25 * summary["dense_train_flops"] / 3 < search_flops < summary["dense_train_flops"] / 2


def test_the_summary_kept_ratio_is_the_fixed_subnetworks_share_of_all_prunable_channels(cli_run):
    out, _ = cli_run
    summary = json.loads((out / "summary.json").read_text())
    fixed = load_checkpoint(out / "last.pt")["fixed_mask"]
    channels = sum(maskprop.create_model("resnet20").channel_groups().values())
    assert summary["kept_ratio"] == pytest.approx(sum(int(m.sum()) for m in fixed.values()) / channels, rel=1e-12)


def test_dense_method_trains_the_same_model_with_no_mask(tmp_path):
    summary = maskprop.fit(tiny(method="dense", **{"optim.epochs": 1}), out=tmp_path / "dense")
    assert summary["train_cost_saving"] == 1.0 and summary["measured_speedup"] == 1.0 and summary["keep_ratio"] == 1.0
    assert summary["subnet_flops"] == summary["dense_flops"] and summary["subnet_params"] == summary["dense_params"]
    assert summary["steps"] == {"search": 0, "finetune": 0, "train": 2}
    checkpoint = load_checkpoint(tmp_path / "dense" / "last.pt")
    assert checkpoint["scores"] is None and checkpoint["fixed_mask"] is None


def test_top_scores_fix_keeps_the_largest_scores(tmp_path):
    summary = maskprop.fit(tiny(**{"sparsity.fix": "top_scores", "optim.epochs": 1, "finetune.epochs": 0}),
                           out=tmp_path / "top")
    checkpoint = load_checkpoint(tmp_path / "top" / "last.pt")
    scores = ChannelScores({name: size for name, size in checkpoint["groups"]}, keep_ratio=0.5)
    scores.load_state_dict(checkpoint["scores"])
    assert {g: int(m.sum()) for g, m in scores.top_mask().items()} == summary["widths"]
    assert summary["fix"] == {"rule": "top_scores", "budget_spent": pytest.approx(scores.spent() / scores.budget)}
    assert summary["steps"]["finetune"] == 0 and summary["accuracy"] is not None


def test_without_finetune_epochs_the_accuracy_is_the_fixed_subnetworks(tmp_path):
    """finetune.epochs 0: the summary's accuracy is that of the subnetwork best_of_n fixed, measured after the fix (not
    the top scores' that the search's last epoch evaluated, nor the whole network's), recomputed from the checkpoint
    in plain torch; at this seed the three differ."""
    maskprop.fit(tiny(**{"optim.epochs": 1, "finetune.epochs": 0}), out=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert summary["fix"]["rule"] == "best_of_n" and summary["steps"]["finetune"] == 0
    fixed = _accuracy_of_checkpoint(tmp_path / "run" / "last.pt")
    scores = ChannelScores({name: size for name, size in checkpoint["groups"]}, keep_ratio=0.5)
    scores.load_state_dict(checkpoint["scores"])
    others = {rule: _accuracy_of_checkpoint(tmp_path / "run" / "last.pt", mask) for rule, mask in
              (("top_scores", scores.top_mask()), ("dense", None))}
    assert summary["accuracy"] == pytest.approx(fixed, abs=1e-9) == checkpoint["final_accuracy"]
    assert fixed not in others.values(), others


def test_best_of_n_fix_keeps_the_sample_with_the_best_training_accuracy(cli_run):
    out, _ = cli_run
    fix = json.loads((out / "summary.json").read_text())["fix"]
    assert fix["rule"] == "best_of_n" and len(fix["train_accuracies"]) == 3 and fix["examples"] == 64
    assert fix["train_accuracies"][fix["chosen"]] == max(fix["train_accuracies"])


def test_fit_with_user_datasets_and_no_run_directory_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_set = ShapesDataset(128, seed=1, image_size=8, num_classes=4)
    val_set = ShapesDataset(32, seed=1, image_size=8, num_classes=4, train=False)
    summary = maskprop.fit(tiny(**{"optim.epochs": 1, "finetune.epochs": 0, "data.batch_size": 32,
                                   "sparsity.fix_samples": 2}), train_set=train_set, val_set=val_set)
    assert summary["run_dir"] is None and list(tmp_path.iterdir()) == []
    assert summary["dense_flops"] == maskprop.flops(maskprop.create_model("resnet20", num_classes=4), (3, 8, 8))


def _tensor_sets(n: int = 64, channels: int = 3, dtype=torch.float32, top_label: int = 3):
    images = torch.randn(n, channels, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    return torch.utils.data.TensorDataset(images, torch.arange(n) % (top_label + 1))


@pytest.mark.parametrize("train, val, message", [
    (None, lambda: _tensor_sets()[:0], "val_set has no examples; expected a dataset of (image, label) pairs"),
    (lambda: torch.utils.data.TensorDataset(torch.randn(8, 3, 8, 8)), None,
     "train_set[0] is a tuple of 1; expected an (image, label) pair"),
    (lambda: _tensor_sets(dtype=torch.float64), None,
     "train_set[0]'s image is a torch.float64 tensor; expected float32"),
    (None, lambda: _tensor_sets(top_label=7), "val_set has labels from 0 to 7, the model 4 classes; expected labels "
                                              "in [0, 3]"),
    (None, lambda: _tensor_sets(top_label=4), "val_set has labels from 0 to 4, the model 4 classes; expected labels "
                                              "in [0, 3]"),  # one past the last class
    (None, lambda: _tensor_sets(channels=1), "model 'resnet20' does not take val_set inputs of size (1, 8, 8)"),
])
def test_given_datasets_are_checked_before_anything_is_written(tmp_path, train, val, message):
    train_set = _tensor_sets() if train is None else train()
    val_set = _tensor_sets() if val is None else val()
    if isinstance(val_set, tuple):  # a slice of a TensorDataset is a tuple of tensors
        val_set = torch.utils.data.TensorDataset(*val_set)
    with pytest.raises(ValueError) as error:
        maskprop.fit(tiny(**{"optim.epochs": 1, "finetune.epochs": 0}), train_set=train_set, val_set=val_set,
                     out=tmp_path / "out")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_run_on_given_datasets_resumes_only_with_them(tmp_path):
    train_set, val_set = _tensor_sets(), _tensor_sets(32)
    config = tiny(**{"optim.epochs": 1, "finetune.epochs": 0, "data.batch_size": 32, "sparsity.fix_samples": 2})
    maskprop.fit(copy.deepcopy(config), train_set=train_set, val_set=val_set, out=tmp_path / "run")
    with pytest.raises(ValueError, match=r"trained on datasets given to maskprop.fit \(TensorDataset of 64 examples\); "
                                         r"expected the same train_set and val_set to resume it"):
        maskprop.fit(copy.deepcopy(config), out=tmp_path / "run", resume=True)
    with pytest.raises(ValueError, match=r"trained on 64 and validated on 32 examples, the datasets given now have 64 "
                                         r"and 64; expected the same datasets"):
        maskprop.fit(copy.deepcopy(config), train_set=train_set, val_set=train_set, out=tmp_path / "run", resume=True)
    summary = maskprop.fit(copy.deepcopy(config), train_set=train_set, val_set=val_set, out=tmp_path / "run",
                           resume=True)
    assert summary["data"]["dataset"] == "custom"
    maskprop.fit(copy.deepcopy(config), out=tmp_path / "shapes")
    with pytest.raises(ValueError, match=r"trained on config.data's dataset; expected no train_set and val_set"):
        maskprop.fit(copy.deepcopy(config), train_set=train_set, val_set=val_set, out=tmp_path / "shapes",
                     resume=True)


# ---------------------------------------------------------------------------------------------------------------------
# Resume


def _assert_same_state(a: dict, b: dict) -> None:
    """Two checkpoints hold the same run state, bit for bit (scores and their optimizer may both be absent: the random
    baseline of tests/test_search.py; so may the fixed subnetwork: a dense run)."""
    for key in ("phase", "epoch", "step", "counters", "best_accuracy", "final_accuracy", "fix_info"):
        assert a[key] == b[key], key
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert (a["scores"] is None) == (b["scores"] is None)
    if a["scores"] is not None:
        assert torch.equal(a["scores"]["scores"], b["scores"]["scores"])
    fixed = [None if c["fixed_mask"] is None else {g: m.tolist() for g, m in c["fixed_mask"].items()} for c in (a, b)]
    assert fixed[0] == fixed[1]
    for which in ("weights", "scores"):
        if a["optimizers"][which] is None:
            assert b["optimizers"][which] is None, which
            continue
        sa, sb = a["optimizers"][which]["state"], b["optimizers"][which]["state"]
        assert sa.keys() == sb.keys()
        for index in sa:
            for field, value in sa[index].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb[index][field])), (which, index, field)
    for name in ("mask", "loader", "torch"):
        assert torch.equal(a["rng"][name], b["rng"][name]), name


def test_resume_after_sigkill_continues_exactly(tmp_path):
    config = tiny(**{"optim.epochs": 4, "finetune.epochs": 1, "save_every": 1})
    recipe = write_recipe(tmp_path / "resume.yaml", config)
    killed = tmp_path / "killed"
    threads = str(torch.get_num_threads())  # the same kernels as this process (not --threads auto's choice)
    env = dict(os.environ, OMP_NUM_THREADS=threads)
    child = subprocess.Popen([sys.executable, "-m", "maskprop.cli", "train", str(recipe), "--out", str(killed),
                              "--threads", threads],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "last.pt").exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    interrupted = load_checkpoint(killed / "last.pt")
    assert (interrupted["phase"], interrupted["step"]) != ("done", 10), "the run finished before it was killed"

    assert main(["train", "--resume", str(killed), "--threads", threads]) == 0
    maskprop.fit(config, out=tmp_path / "straight")
    _assert_same_state(load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(killed / "last.pt"))
    records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in records] == [("search", e) for e in range(1, 5)] + [("finetune", 1)]


def test_resume_of_a_finished_run_only_rewrites_the_summary(cli_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cli_run[0], run)
    before = load_checkpoint(run / "last.pt")
    assert main(["train", "--resume", str(run)]) == 0
    after = load_checkpoint(run / "last.pt")
    assert after["step"] == before["step"] and torch.equal(after["scores"]["scores"], before["scores"]["scores"])
    assert json.loads((run / "summary.json").read_text())["accuracy"] == before["final_accuracy"]


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


@pytest.mark.parametrize("override, message", [
    ("sparsity.keep_ratio=1.5", "sparsity.keep_ratio=1.5 is out of range; expected a fraction in (0, 1]"),
    ("sparsity.keep_ratio=0", "sparsity.keep_ratio=0.0 is out of range"),
    ("sparsity.alpha=1.0", "sparsity.alpha=1.0 is out of range; expected a number in [0, 1)"),
    ("sparsity.estimator=reinforce", "sparsity.estimator='reinforce' is not a valid choice"),
    ("sparsity.keep_ration=0.5", "unknown config key 'sparsity.keep_ration'; did you mean 'sparsity.keep_ratio'?"),
    ("data.dataset=cifar10", "data.root is required for dataset 'cifar10'"),
    ("method=msbp sbp.memory=0", "sbp.memory=0.0 gives no memory"),
    ("model.kwargs.widht=2", "do not fit model 'resnet20'"),
    ("model.name=resnet99", "model.name='resnet99' is not a registered model; expected one of mlp, "),
    ("model.kwargs.width=0", "width must be a positive number, got 0"),
    ("data.train_size=40", "gives no full batch of 64"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, override, message):
    recipe = write_recipe(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "out"
    assert main(["train", str(recipe), "--out", str(out), *override.split()]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("maskprop train: error: ") and message in err
    assert not out.exists()


def test_ctrl_c_is_one_line_naming_how_to_resume(tmp_path, capsys, monkeypatch):
    import maskprop.export
    import maskprop.train.loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def interrupted_once_started(config, out, **kwargs):  # config.yaml written: --resume can continue the run
        Path(out).mkdir()
        (Path(out) / "config.yaml").write_text("seed: 0\n")
        raise KeyboardInterrupt

    recipe = write_recipe(tmp_path / "tiny.yaml", TINY)
    monkeypatch.setattr(maskprop.train.loop, "fit", interrupted)
    assert main(["train", str(recipe), "--out", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["maskprop train: interrupted"]  # nothing to resume
    monkeypatch.setattr(maskprop.train.loop, "fit", interrupted_once_started)
    assert main(["train", str(recipe), "--out", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"maskprop train: interrupted; maskprop train --resume {tmp_path / 'out'} starts it over (it "
                   f"stopped before its first checkpoint)"]
    (tmp_path / "out" / "last.pt").write_bytes(b"")  # a checkpoint saved: the resume continues from it
    monkeypatch.setattr(maskprop.train.loop, "fit", interrupted)
    assert main(["train", "--resume", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        f"maskprop train: interrupted; maskprop train --resume {tmp_path / 'out'} continues from its last checkpoint"]
    monkeypatch.setattr(maskprop.export, "export_run", interrupted)
    assert main(["export", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["maskprop export: interrupted"]
    # under torchrun (two ranks on one node): rank 0's line alone, with the torchrun command that resumes the run
    import maskprop.train.distributed as distributed

    monkeypatch.setattr(maskprop.train.loop, "fit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr(distributed, "init_from_env", lambda backend: distributed.Distributed())  # no process group
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert main(["train", "--resume", str(tmp_path / "out")]) == 130
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ([] if rank == "1" else [
            f"maskprop train: interrupted; torchrun --nproc_per_node 2 -m maskprop train --resume {tmp_path / 'out'} "
            f"continues from its last checkpoint"])


def test_the_command_that_resumes_a_run_names_torchrun_where_it_ran_under_it(monkeypatch):
    from maskprop.train.distributed import resume_command

    assert resume_command("runs/a") == "maskprop train --resume runs/a"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resume_command("runs/a") == "torchrun --nproc_per_node 2 --nnodes 2 -m maskprop train --resume runs/a"
    assert resume_command("runs/a", 1) == "maskprop train --resume runs/a"  # a checkpoint of one process
    assert resume_command("runs/a", 8) == ("torchrun --nproc_per_node N --nnodes M -m maskprop train --resume runs/a "
                                           "(N x M = 8)")


def test_a_new_run_does_not_overwrite_a_run_that_never_saved_a_checkpoint(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 7\n")  # a run stopped before its first checkpoint
    assert main(["train", str(recipe), "--out", str(out)]) == 2
    assert (f"run directory '{out}' holds another run's files (config.yaml); continue that run with 'maskprop train "
            f"--resume {out}'") in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["config.yaml"] and (out / "config.yaml").read_text() == "seed: 7\n"


@pytest.mark.parametrize("name", ["metrics.jsonl", "summary.json", "best.pt"])
def test_a_new_run_does_not_mix_with_any_file_another_run_left(tmp_path, capsys, name):
    """Each file a run writes (last.pt aside) marks its directory as another run's: a new run there is refused, and
    the file is left as it was."""
    recipe = write_recipe(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"left over")
    assert main(["train", str(recipe), "--out", str(out)]) == 2
    assert f"run directory '{out}' holds another run's files ({name}); continue that run" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == [name] and (out / name).read_bytes() == b"left over"


def test_missing_data_root_says_where_it_looked(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "tiny.yaml", TINY)
    assert main(["train", str(recipe), "--out", str(tmp_path / "out"), "data.dataset=cifar10",
                 f"data.root={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "does not exist" in err and not (tmp_path / "out").exists()


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_resume_from_a_truncated_checkpoint_names_the_file(cli_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(cli_run[0], run)
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    before = _snapshot(run)
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint '{run / 'last.pt'}' is corrupt or truncated" in err
    assert _snapshot(run) == before


@pytest.mark.parametrize("override, message", [
    ("model.name=resnet32", "is from model 'resnet20', the config builds 'resnet32'"),
    ("model.kwargs.prune_residual=false", "the config builds it with {'prune_residual': False"),
    ("method=dense", "is a method='vrpge' run"),
    ("finetune.epochs=3", "finetune.epochs=3, but the run in"),  # the run has finished: nothing would train
])
def test_resume_with_another_model_is_refused(cli_run, tmp_path, capsys, override, message):
    run = tmp_path / "run"
    shutil.copytree(cli_run[0], run)
    before = _snapshot(run)
    assert main(["train", "--resume", str(run), override]) == 2
    assert message in capsys.readouterr().err
    assert _snapshot(run) == before


def test_last_checkpoint_keeps_the_accuracy_of_the_subnetwork_an_export_gives(monkeypatch, tmp_path):
    """last.pt's ``last_accuracy``: that of its epoch's evaluation, but not of the top scores above the final budget
    (a warm-up or anneal evaluates wider subnetworks than an export of the checkpoint rebuilds), nor of an epoch
    that did not evaluate."""
    from maskprop.train import loop

    saved = []
    save = loop._Saver.save

    def recording(self, name="last.pt"):
        state = self.run.state
        if name == "last.pt":
            saved.append((state.phase, state.epoch, state.last_accuracy))
        save(self, name)

    monkeypatch.setattr(loop._Saver, "save", recording)
    maskprop.fit(tiny(**{"optim.epochs": 4, "sparsity.warmup_epochs": 1, "sparsity.anneal_epochs": 2,
                         "finetune.epochs": 2, "eval_every": 1, "save_every": 1}), out=tmp_path / "run")
    measured = {(r["phase"], r["epoch"]): r.get("val_accuracy") for r in
                map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
    by_epoch = {(phase, epoch): accuracy for phase, epoch, accuracy in saved if epoch > 0}
    # the warm-up and the anneal's first epoch evaluate wider subnetworks; the anneal's last one projects onto the
    # final budget already
    assert by_epoch[("search", 1)] is None and by_epoch[("search", 2)] is None
    for key in (("search", 3), ("search", 4), ("finetune", 1), ("finetune", 2)):
        assert by_epoch[key] == measured[key] is not None, key
    assert ("finetune", 0, None) in saved  # after the fix: the top scores' accuracy is not the fixed subnetwork's


def test_resumed_epochs_change_only_where_the_run_has_not_been():
    """A resumed run may lengthen or shorten the phase it is in, not below the epochs it has trained there, and may
    not change a phase it has finished (its summary would report epochs that never ran)."""
    from maskprop.train.config import config_to_dict, load_config
    from maskprop.train.setup import _check_resumed_epochs

    saved = config_to_dict(load_config(copy.deepcopy(TINY)))  # 2 search epochs, 1 finetune epoch

    def check(phase: str, epoch: int, *overrides: str, method: str = "vrpge", batch: int = 0) -> None:
        config = load_config(copy.deepcopy(TINY), [f"method={method}", *overrides])
        _check_resumed_epochs({"phase": phase, "epoch": epoch, "batch": batch, "config": {**saved, "method": method}},
                              config, Path("runs/x"))

    for overrides in ([], ["optim.epochs=1"], ["optim.epochs=9"], ["finetune.epochs=4"]):
        check("search", 1, *overrides)
    check("finetune", 0, "finetune.epochs=3")
    check("train", 1, "optim.epochs=5", method="dense")
    with pytest.raises(ValueError, match=r"optim.epochs=1 is below the 2 search epochs the run in 'runs/x' has "
                                         r"trained; expected at least 2"):
        check("search", 2, "optim.epochs=1")
    with pytest.raises(ValueError, match=r"optim.epochs=1 is below the 2 train epochs"):
        check("train", 2, "optim.epochs=1", method="dense")
    check("search", 1, "optim.epochs=2", batch=1)  # saved within its second epoch: two begun
    with pytest.raises(ValueError, match=r"optim.epochs=1 is below the 1 \(and part of one more\) search epochs the "
                                         r"run in 'runs/x' has trained; expected at least 2"):
        check("search", 1, "optim.epochs=1", batch=1)
    with pytest.raises(ValueError, match=r"optim.epochs=5, but the run in 'runs/x' has finished its search phase "
                                         r"after 2 epochs; expected optim.epochs=2"):
        check("finetune", 0, "optim.epochs=5")
    with pytest.raises(ValueError, match=r"finetune.epochs=3, but .* finished its finetune phase after 1 epoch;"):
        check("done", 1, "finetune.epochs=3")


def test_checkpoint_with_another_group_layout_is_refused(cli_run):
    from maskprop.models.spec import ModelSpec
    from maskprop.train.checkpoint import check_compatible

    checkpoint = load_checkpoint(cli_run[0] / "last.pt")
    groups = dict(maskprop.create_model("resnet20").channel_groups())
    groups["layer3"] = 32
    spec = ModelSpec.from_dict(checkpoint["model_spec"])
    with pytest.raises(ValueError, match=r"another channel-group layout .* group 9 is 'layer3' \(64\) in the "
                                         r"checkpoint but 'layer3' \(32\) here"):
        check_compatible(checkpoint, "last.pt", spec, {}, groups, "vrpge")


def test_resume_needs_a_run_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 2
    assert "has no config.yaml; nothing to resume" in capsys.readouterr().err
    assert list((tmp_path / "empty").iterdir()) == []
    assert main(["train", "--resume", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_new_run_does_not_overwrite_an_existing_one(cli_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(cli_run[0], run)
    before = _snapshot(run)
    recipe = write_recipe(tmp_path / "tiny.yaml", TINY)
    assert main(["train", str(recipe), "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _snapshot(run) == before


# ---------------------------------------------------------------------------------------------------------------------
# Recipes


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_recipes_load_and_say_what_they_reproduce(recipe):
    cfg = load_config(recipe)
    assert recipe.read_text().startswith("#")
    assert cfg.data.root is None or cfg.data.dataset == "shapes"  # the user names where the data lies
    if cfg.method != "vrpge":  # the sparse-backward baselines: Adam lr 1e-3 as in their papers
        assert cfg.method in ("meprop", "sbp", "msbp") and f"method: {cfg.method}" in recipe.read_text()
        assert (cfg.optim.optimizer, cfg.optim.lr) == ("adam", 1e-3)
        if cfg.model.name == "mlp":
            assert cfg.data.dataset == "mnist" and cfg.sbp.ratio in (0.04, 0.001, 0.002)
        return
    if recipe.stem.startswith("cifar"):
        assert (cfg.data.batch_size, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (256, 0.1, 0.9, 5e-4)
        assert (cfg.optim.epochs, cfg.optim.schedule, cfg.sparsity.score_lr) == (300, "cosine", 12e-3)
        assert (cfg.finetune.epochs, cfg.finetune.lr) == (40, 1e-3)
        assert cfg.data.root is None


def test_the_search_epochs_leave_the_cuda_generators_alone(monkeypatch):
    """Only the run's start seeds torch's CUDA generators (``torch.manual_seed`` seeds every device); the probe of the
    top-score subnetwork after each search epoch seeds the CPU's alone, or a CUDA run's dropout draws would restart
    every epoch, and alike on every rank."""
    seeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    summary = maskprop.fit(with_overrides(TINY_RUN, **{"optim.epochs": 3}))
    assert summary["steps"]["search"] == 6 and seeded == [TINY_RUN["seed"]]


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_a_one_step_phase_runs_at_the_peak_lr_without_a_warning(schedule, caplog):
    """A phase of one optimizer update (a shortened run) takes the peak learning rate, and no schedule logs a line the
    user can do nothing about (timm's cosine warns that it would have no effect)."""
    from maskprop.train.optim import build_schedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    with caplog.at_level("WARNING"):
        build_schedule(optimizer, schedule, 1).step_update(0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.3) and not caplog.records



def _learning_rates(schedule: str, peak: float, total: int, warmup: int) -> list[float]:
    from maskprop.train.optim import build_schedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = build_schedule(optimizer, schedule, total, warmup)
    rates = []
    for t in range(total):
        scheduler.step_update(t)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_schedules_follow_their_closed_forms_per_update(schedule):
    """The learning rate at every update of a 16-update phase with 4 warm-up updates, by hand: linear from 0 to the
    peak during the warm-up (counted inside the phase), then cosine to 0 at the end of the phase, or the peak."""
    import math

    peak, total, warmup = 0.3, 16, 4
    want = [peak * t / warmup if t < warmup else
            0.5 * peak * (1 + math.cos(math.pi * t / total)) if schedule == "cosine" else peak for t in range(total)]
    assert _learning_rates(schedule, peak, total, warmup) == pytest.approx(want, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("warmup", [0, 4])
def test_the_step_schedule_decays_tenfold_at_half_and_three_quarters_of_the_phase(warmup):
    """``step``: linear warm-up from 0 (counted inside the phase), the peak, then x0.1 from update 8 of 16 (50%) and
    x0.01 from update 12 (75%), every update by hand. timm's scheduler applies a decay point one update early and, by
    default, counts the decay points after the warm-up: the ten-fold decays came at updates 11 and 15 with a 4-update
    warm-up, and at 7 and 11 without one."""
    peak, total = 0.3, 16
    expected = [peak * t / warmup if t < warmup else peak * 0.1 ** ((t >= 8) + (t >= 12)) for t in range(total)]
    assert _learning_rates("step", peak, total, warmup) == pytest.approx(expected, rel=1e-12)


def test_optimizers_apply_their_weight_decay_and_the_scores_none():
    """At a zero gradient only the weight decay moves a parameter: SGD by ``lr x weight_decay x w``, Adam (the
    sparse-backward methods) by its first step ``lr g / (|g| + eps)`` with ``g = weight_decay x w``, the scores' Adam
    not at all."""
    from maskprop.train.config import OptimConfig
    from maskprop.train.optim import run_optimizer, score_optimizer, weight_optimizer

    def one_step(make):
        p = torch.nn.Parameter(torch.tensor([0.5, -2.0], dtype=torch.float64))
        optimizer = make([p])
        p.grad = torch.zeros_like(p)
        optimizer.step()
        return p.detach()

    w = torch.tensor([0.5, -2.0], dtype=torch.float64)
    torch.testing.assert_close(one_step(lambda ps: weight_optimizer(ps, 0.1, 0.9, 5e-4)), w * (1 - 0.1 * 5e-4))
    sgd = OptimConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    torch.testing.assert_close(one_step(lambda ps: run_optimizer(ps, sgd)), w * (1 - 0.1 * 5e-4))
    adam = OptimConfig(optimizer="adam", lr=1e-2, weight_decay=1e-3)
    g = 1e-3 * w  # L2 decay added to the (zero) gradient; Adam's first step is lr g / (|g| + eps)
    torch.testing.assert_close(one_step(lambda ps: run_optimizer(ps, adam)), w - 1e-2 * g / (g.abs() + 1e-8))
    torch.testing.assert_close(one_step(lambda ps: score_optimizer(ps[0], 12e-3)), w, rtol=0, atol=0)


def test_the_epoch_log_line_says_where_the_run_is_and_the_figures_to_watch():
    """The INFO line of an epoch: the phase's epoch count and kind, loss, accuracies, the expected kept share against
    the budget, the epoch's seconds, the saving so far and the time left in the phase (its last epoch's seconds for
    each epoch to come); every metric at DEBUG level, floats and large counters shortened."""
    import logging

    from maskprop.train.logs import RunLogger

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("maskprop.train.logs")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    search = {"phase": "search", "epoch": 10, "step": 230, "train_loss": 0.255123, "train_loss2": 0.2543,
              "train_accuracy": 90.7634, "epoch_time_s": 27.19, "step_kind": "search", "budget_ratio": 0.5,
              "val_loss": 0.2357, "val_accuracy": 90.8, "kept_ratio_expected": 0.49774, "lr": 0.00134,
              "train_flops": 22765436928, "dense_train_flops": 42765436928, "train_cost_saving": 1.8785,
              "widths_expected": {"g": 3.5}}
    try:
        RunLogger(None).epoch(search, 12)
        RunLogger(None).epoch({**search, "epoch": 2, "step_kind": "anneal"}, 90)  # 88 epochs of 27.19 s left
        RunLogger(None).epoch({"phase": "train", "epoch": 3, "step": 9, "train_loss": 2.0, "train_accuracy": 10.0,
                               "epoch_time_s": 1.0, "train_cost_saving": 1.0}, 3)  # dense, and its last epoch
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    info = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert info == [
        "search epoch 10/12, step 230: loss 0.2551, train 90.76%, val 90.80%, kept 0.498 expected (budget 0.5), "
        "27.2 s; train-cost saving so far 1.88x; about 54 s left in the search",
        "search epoch 2/90 (anneal), step 230: loss 0.2551, train 90.76%, val 90.80%, kept 0.498 expected (budget "
        "0.5), 27.2 s; train-cost saving so far 1.88x; about 40 min left in the search",
        "train epoch 3/3, step 9: loss 2, train 10.00%, 1.0 s"]
    debug = [r.getMessage() for r in records if r.levelno == logging.DEBUG]
    assert debug[0].startswith("phase=search epoch=10 step=230 train_loss=0.2551 train_loss2=0.2543 ")
    assert "train_flops=2.277e+10" in debug[0] and "widths_expected" not in debug[0]


def test_durations_read_as_seconds_minutes_or_hours():
    from maskprop.train.logs import _duration

    assert [_duration(s) for s in (0.4, 89, 90, 5399, 5400, 3 * 3600 + 5 * 60 + 20)] == [
        "0 s", "89 s", "2 min", "90 min", "1 h 30 min", "3 h 05 min"]


def test_a_resumed_logger_keeps_the_checkpoints_lines_and_purges_the_later_events(tmp_path):
    """RunLogger of a resumed run: metrics.jsonl keeps the lines keep_line accepts (a line cut short by the kill is
    dropped; a kept last line missing its newline gets one), and TensorBoard drops the killed run's events after the
    resumed step and keeps those up to it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from maskprop.train.logs import RunLogger

    killed = RunLogger(tmp_path)
    for step in (2, 4, 6):  # the checkpoint covers steps 2 and 4
        killed.scalars({"search/loss": float(step)}, step)
        killed.epoch({"phase": "search", "epoch": step // 2})
    killed.close()
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"phase": "search", "ep')  # cut short by the kill
    # TensorBoard orders event files by name, whose first field is the second they were opened in: a resumed run
    # (a later process) opens its file at least a second after the killed one did. Within one second a process's
    # file counter decides, and 10 sorts before 9 (how this test failed once the suite had opened ten writers).
    time.sleep(1.05)
    resumed = RunLogger(tmp_path, resume_step=4, keep_line=lambda r: r["epoch"] <= 2)
    resumed.scalars({"search/loss": 60.0}, 6)
    resumed.epoch({"phase": "search", "epoch": 3})
    resumed.close()
    assert [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("search/loss")] == [(2, 2.0), (4, 4.0), (6, 60.0)]

    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}', encoding="utf-8")  # no final newline
    again = RunLogger(tmp_path, resume_step=4, keep_line=lambda r: True)
    again.epoch({"epoch": 3})
    again.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3}\n'
    assert RunLogger(tmp_path).close() is None and (tmp_path / "metrics.jsonl").read_text() == ""  # a new run


def test_the_log_line_shortens_counters_from_a_million_on():
    from maskprop.train.logs import _short

    assert (_short(10**6), _short(10**6 - 1), _short(-(10**6)), _short(True)) == ("1e+06", "999999", "-1e+06", "True")


def test_the_wait_for_batches_is_timed_and_the_steps_time_is_not():
    """``_timed_batches``: the seconds spent getting each batch (and the iterator) count, those of the loop's body
    between them do not."""


    from maskprop.train.loop import EpochMeter, _timed_batches

    class Slow:
        def __iter__(self):
            time.sleep(0.05)  # a DataLoader starting its workers
            for i in range(3):
                time.sleep(0.04)
                yield i

    meter = EpochMeter()
    seen = []
    for batch in _timed_batches(Slow(), meter):
        seen.append(batch)
        time.sleep(0.1)  # the step
    assert seen == [0, 1, 2]
    assert 0.17 <= meter.data_s < 0.17 + 0.1  # 0.05 + 3 x 0.04, not the 0.3 s of the steps


def test_a_run_whose_loader_is_slow_says_how_long_it_waited_for_data(tmp_path, capsys, caplog):
    """Examples that take 10 ms each to load: the epochs' lines and the summary count the wait, the run warns once
    that its loader bounds it, and the final table says what share of the run's time it waited."""
    import logging

    from torch.utils.data import Dataset

    from maskprop.cli import _final_table

    class SlowShapes(Dataset):
        def __init__(self, inner):
            self.inner, self.num_classes = inner, 10

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, index):
            time.sleep(0.01)
            return self.inner[index]

    from maskprop.train.data import build_datasets

    cfg = load_config(with_overrides(TINY_RUN, method="dense", **{"optim.epochs": 2, "data.val_size": 16}))
    train, val, _, _ = build_datasets(cfg.data)
    with caplog.at_level(logging.INFO, logger="maskprop.train.logs"):
        summary = maskprop.fit(cfg, SlowShapes(train), val, out=tmp_path / "run", threads=1)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["data_wait_s"] >= 128 * 0.01 * 0.95 for r in records)  # 2 batches of 64 examples an epoch
    assert summary["data_wait_s"] == pytest.approx(sum(r["data_wait_s"] for r in records))
    assert summary["data_wait_share"] == pytest.approx(summary["data_wait_s"] / summary["run_time_s"])
    logged = [r for r in caplog.records if r.name == "maskprop.train.logs"]
    assert sum("the loader bounds this run" in r.getMessage() for r in logged if r.levelno == logging.WARNING) == 1
    epochs = [r.getMessage() for r in logged if r.levelno == logging.INFO]
    assert len(epochs) == 2 and all("% waiting for data)" in line for line in epochs)
    assert f"the steps waited for data {100 * summary['data_wait_share']:.0f}% of the run's time" in \
        _final_table(summary)
