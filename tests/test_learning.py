"""Whether the search learns: the official-semantics harness of tools/search_study.py (fast), and the default search
of the quickstart recipe against its dense twin (slow: ``-m slow``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_tool

import maskprop
from maskprop.sparse.modules import SparseBatchNorm2d
from maskprop.train import load_config

REPO = Path(__file__).resolve().parents[1]


def _study():
    """tools/search_study.py as a module (tools/ is no package)."""
    return _tool("search_study")


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


def _tool(name):
    """A module of tools/ (no package) by file name."""
    return sys.modules[name] if name in sys.modules else load_tool(name)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_estimator_steps_to_resolve_match_monte_carlo(alpha):
    """tools/estimator_snr.py's n_j = E[gap^2] / (h_j D_j^2) against the estimator itself, drawn 200,000 times on an
    additive loss L(m) = -sum_j D_j m_j: its mean is the closed form -h_j^alpha D_j, its variance
    h_j^(2 alpha - 1) E[gap^2] up to the channel's own share of the gap (1/channels here), so n_j = Var / mean^2."""
    snr = _tool("estimator_snr")
    from maskprop.vrpge.estimators import score_grad

    g = torch.Generator().manual_seed(0)
    channels, draws = 200, 200_000
    s = torch.rand(channels, generator=g, dtype=torch.float64) * 0.6 + 0.2
    importance = torch.rand(channels, generator=g, dtype=torch.float64) + 0.1
    m = (torch.rand(draws, channels, generator=g, dtype=torch.float64) < s).double()
    m2 = (torch.rand(draws, channels, generator=g, dtype=torch.float64) < s).double()
    loss_m, loss_m2 = -(m @ importance)[:, None], -(m2 @ importance)[:, None]
    estimates = score_grad("vrpge", loss_m, loss_m2, m, m2, s, alpha=alpha)
    h = s * (1 - s)
    mean, var = estimates.mean(0), estimates.var(0)
    torch.testing.assert_close(mean, -h.pow(alpha) * importance, rtol=0, atol=4 * (var / draws).sqrt().max())
    gap2 = float((loss_m - loss_m2).square().mean())
    torch.testing.assert_close(var, h.pow(2 * alpha - 1) * gap2, rtol=0.03, atol=0)
    predicted = snr.steps_to_resolve(gap2, importance, s)
    torch.testing.assert_close(predicted, var / (h.pow(alpha) * importance).square(), rtol=0.03, atol=0)
    # in this additive case E[gap^2] = 2 sum_k h_k D_k^2: n_j is twice the channels for equal importances
    assert gap2 == pytest.approx(float(2 * (h * importance.square()).sum()), rel=0.01)


def test_estimator_snr_measures_importance_by_toggling():
    """The tool's D_j is the loss with channel j dropped minus the loss with it kept, in the masks it draws; the model's
    BatchNorm statistics and torch's random state are as they were."""
    snr = _tool("estimator_snr")
    torch.manual_seed(0)
    model = maskprop.create_model("resnet20", num_classes=4)
    groups = model.channel_groups()
    batch = (torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,)))
    criterion = torch.nn.CrossEntropyLoss()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    found = snr.measure(model, groups, [batch], criterion, keep=0.5, pairs=4, toggles=1, channels=3, seed=0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # redo the first toggle by hand: the same generator draws the pairs, then the channels, then the base mask
    scores = maskprop.vrpge.ChannelScores(groups, keep_ratio=0.5, init=0.5)
    generator = torch.Generator().manual_seed(0)
    chosen = torch.randperm(scores.num_channels, generator=generator)[:3].sort().values
    assert chosen.tolist() == found["measured_channels"]
    for _ in range(8):
        scores.sample_flat(generator)
    base = scores.sample_flat(generator)
    model.train()
    with torch.no_grad():
        for i, j in enumerate(chosen.tolist()):
            losses = []
            for keep_j in (False, True):
                flat = base.clone()
                flat[j] = keep_j
                with maskprop.use_mask(model, scores.split(flat), "compact"):
                    losses.append(float(criterion(model(batch[0]), batch[1])))
            model.load_state_dict(before)
            assert found["importance"][i] == pytest.approx(losses[0] - losses[1], rel=1e-6, abs=1e-9)
    assert found["gap2"] > 0 and found["channels"] == scores.num_channels


def test_the_flops_matched_random_arm_finds_the_widths_of_equal_flops():
    """``flops_matched_keep`` returns the smallest keep ratio whose per-group widths compute the FLOPs asked for, when a
    keep ratio computes them exactly; otherwise the closest."""
    study = _study()
    net = maskprop.create_model("resnet20", num_classes=10)
    groups, cost = net.channel_groups(), maskprop.CostModel(net, (3, 16, 16))

    def flops(keep):
        return cost.flops({g: max(1, round(keep * c)) for g, c in groups.items()}, 1) / cost.flops(None, 1)

    for keep in (0.25, 0.5):
        found = study.flops_matched_keep("resnet20", {}, 16, flops(keep))
        assert flops(found) == flops(keep) and found <= keep
        assert found == 0.001 or flops(found - 0.001) != flops(keep)  # the smallest such keep ratio
    nearby = flops(0.5) * 1.001  # no keep ratio computes these; keep 0.5's widths come closest
    assert flops(study.flops_matched_keep("resnet20", {}, 16, nearby)) == flops(0.5)
    assert study._parse_arm("random@default") == ("random@default", study.ARMS["random"])


def test_the_chosen_arm_trains_another_run_s_subnetwork_as_the_random_baseline_trains_its_own(tmp_path, capsys):
    """``chosen@ARM``: the search's run keeps the subnetwork it fixed (``mask``: kept channel indices per group), and
    the ``chosen@`` run trains exactly that one, fixed from the first step after the warm-up as ``random`` fixes its
    own draw; a grid skips it where the arm's run has no subnetwork to give."""
    study = _study()
    assert study._parse_arm("chosen@default") == ("chosen@default", study.ARMS["random"])
    assert study._parse_arm("chosen@default+w2:sparsity.warmup_epochs=2") == (
        "chosen@default+w2", {**study.ARMS["random"], "sparsity.warmup_epochs": 2})
    assert study._source_arm("chosen@default+w2", study.CHOSEN) == "default"
    out = tmp_path / "study.json"
    grid = ["--quick", "--models", "resnet20", "--keeps", "0.5", "--seeds", "0", "--json", str(out)]
    study.main([*grid, "--arms", "chosen@default", "default", "chosen@default", "random",
                "chosen@default+w1:sparsity.warmup_epochs=1"])
    assert "chosen@default|seed=0|quick: skipped, no run of 'default' with its subnetwork" in capsys.readouterr().out
    runs = json.loads(out.read_text())["runs"]
    search, chosen, drawn = (runs[study.run_key("resnet20", 0.5, arm, 0, "quick")]
                             for arm in ("default", "chosen@default", "random"))
    groups = maskprop.create_model("resnet20", num_classes=10).channel_groups()
    assert set(search["mask"]) == set(groups) and all(len(kept) >= 1 for kept in search["mask"].values())
    # the search's choice is not the random draw (its widths differ from the uniform per-group keep ratio) ...
    assert search["mask"] != drawn["mask"] and search["widths"] != drawn["widths"]
    # ... and the chosen run trained it: the same subnetwork, fixed as the random baseline fixes its own
    assert chosen["mask"] == search["mask"] and chosen["widths"] == search["widths"]
    assert chosen["overrides"]["sparsity.fix"] == "random" and chosen["epochs"][0]["phase"] == "search"
    assert chosen["train_cost_saving"] > search["train_cost_saving"]  # one forward a step, no anneal
    warmed = runs[study.run_key("resnet20", 0.5, "chosen@default+w1", 0, "quick")]  # after a dense warm-up epoch
    assert warmed["mask"] == search["mask"] and warmed["epochs"][0]["step_kind"] == "warmup"
    assert chosen["epochs"][0]["step_kind"] == "random"
