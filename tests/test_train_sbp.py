"""The sparse-backward baselines in the trainer: methods meprop / sbp / msbp through ``maskprop.fit`` and
``maskprop train`` (config defaults, the step and its FLOPs, angle logging, budgets, exact resume, recipes, bad
input)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_data import make_mnist
from torch.overrides import TorchFunctionMode
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode

import maskprop
from maskprop.cli import main
from maskprop.cost import CostModel, sbp_step_flops
from maskprop.sbp import convert, sparse_layers
from maskprop.train import loop
from maskprop.train.checkpoint import load_checkpoint
from maskprop.train.config import Config, load_config
from maskprop.train.setup import sparse_backward
from maskprop.train.steps import StepContext, sbp_step
from maskprop.train.summary import read_summary

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs (conftest.py)


class Bars(Dataset):
    """An easy 4-class problem: class c is a bright horizontal bar at rows 2c..2c+1 of an 8x8 noise image."""

    num_classes = 4

    def __init__(self, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(0, 4, (size,), generator=generator)
        self.images = 0.5 * torch.randn(size, 1, 8, 8, generator=generator)
        for image, label in zip(self.images, self.targets):
            image[0, 2 * label: 2 * label + 2] += 2.0

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])


def mlp_config(**overrides) -> Config:
    """An MLP (64-32-32-4) with MSBP on ``Bars``, 8 steps per epoch."""
    base = {"method": "msbp", "seed": 0, "log_every": 2, "save_every": 1,
            "model": {"name": "mlp", "kwargs": {"hidden": [32, 32]}},
            "data": {"batch_size": 32, "workers": 0},
            "optim": {"epochs": 3, "schedule": "constant", "lr": 1e-2},
            "sbp": {"ratio": 0.25, "memory": 0.8, "angle_every": 4}}
    return load_config(base, [f"{key}={value}" for key, value in overrides.items()])


@pytest.fixture(scope="module")
def bars():
    return Bars(256, seed=0), Bars(128, seed=1)


# ---------------------------------------------------------------------------------------------------------------------
# Configuration


def test_sparse_backward_methods_default_to_adam_at_the_papers_rate():
    for method in ("meprop", "sbp", "msbp"):
        optim = Config(method=method).optim
        assert (optim.optimizer, optim.lr, optim.weight_decay) == ("adam", 1e-3, 0.0)
    optim = Config().optim
    assert (optim.optimizer, optim.lr, optim.weight_decay) == ("sgd", 0.1, 5e-4)
    optim = load_config({"method": "msbp", "optim": {"optimizer": "sgd", "lr": 0.05}}).optim
    assert (optim.optimizer, optim.lr, optim.weight_decay) == ("sgd", 0.05, 5e-4)  # what is written wins


# ---------------------------------------------------------------------------------------------------------------------
# The step


def test_step_flops_formula_matches_the_flop_counter():
    """f_D + sum_l 2 f_l k_l / n_l, against what torch counts, less the input gradient the first layer never makes."""
    torch.manual_seed(0)
    model = maskprop.create_model("mlp", num_classes=10, in_features=48, hidden=(40, 30))
    cost = CostModel(model, (3, 4, 4))
    convert(model, ratio=0.25, sparsifier="topk_unified", output_k=5)
    fractions = {name: layer.k / layer.num_units for name, layer in sparse_layers(model)}
    assert fractions == {"hidden.1": 10 / 40, "hidden.3": 8 / 30, "fc": 5 / 10}
    x, y = torch.randn(16, 3, 4, 4), torch.randint(0, 10, (16,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    per_layer = {name: 16 * f for name, f in cost.by_layer().items()}
    first_input_grad = fractions["hidden.1"] * per_layer["hidden.1"]
    assert counter.get_total_flops() == sbp_step_flops(per_layer, fractions) - first_input_grad
    assert sbp_step_flops(per_layer, {}) == 3 * sum(per_layer.values())
    with pytest.raises(ValueError, match="have no FLOPs entry"):
        sbp_step_flops(per_layer, {"hidden.9": 0.5})


@pytest.mark.parametrize("source", ["timm", "torchvision"])
def test_a_transformers_sparse_backward_step_counts_attention_as_dense(source):
    """With every gradient kept a sparse-backward step costs what a dense one does, attention's products included
    (``CostModel.other_flops``, a dense forward and backward); torchvision's ``nn.MultiheadAttention`` keeps its output
    projection, whose weight it reads without calling the layer."""
    torch.manual_seed(0)
    if source == "timm":
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=10)
    else:
        from torchvision.models.vision_transformer import VisionTransformer

        model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                                  num_classes=10)
    cost = CostModel(model, (3, 32, 32))
    convert(model, ratio=1.0)
    assert cost.other_flops > 0 and not any("out_proj" in name for name, _ in sparse_layers(model))
    ctx = StepContext(criterion=torch.nn.CrossEntropyLoss(), device=torch.device("cpu"), cost=cost)
    batch = (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    result = sbp_step(model, torch.optim.SGD(model.parameters(), lr=0.1), batch, ctx)
    assert result.flops == result.dense_flops == 3 * cost.flops(None, 4)


def _converted(seed: int = 0):
    torch.manual_seed(seed)
    model = convert(maskprop.create_model("mlp", num_classes=4, in_features=64, hidden=(32, 32)), ratio=0.25,
                    memory=0.8)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def test_measuring_angles_changes_nothing_of_the_step(bars):
    ctx = StepContext(criterion=torch.nn.CrossEntropyLoss(), device=torch.device("cpu"),
                      cost=CostModel(maskprop.create_model("mlp", num_classes=4, in_features=64, hidden=(32, 32)),
                                     (1, 8, 8)))
    batches = [(bars[0].images[i:i + 32], bars[0].targets[i:i + 32]) for i in range(0, 96, 32)]
    (a, opt_a), (b, opt_b) = _converted(), _converted()
    for batch in batches:
        plain = sbp_step(a, opt_a, batch, ctx)
        measured = sbp_step(b, opt_b, batch, ctx, measure_angles=True)
        assert plain.diagnostics is None and 0.0 < measured.diagnostics["angle/overall"] < 90.0
        assert set(measured.diagnostics) == {"angle/overall", "angle/hidden.1", "angle/hidden.3"}
        assert (plain.loss, plain.flops) == (measured.loss, measured.flops)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    for (name, layer), other in zip(sparse_layers(a), (layer for _, layer in sparse_layers(b))):
        assert torch.equal(layer.msbp_memory, other.msbp_memory), name


def test_steps_that_measure_angles_are_left_out_of_the_step_times(bars, monkeypatch):
    """A step that measures its gradient angles runs a second backward: it is neither timed nor paired with a dense
    step (the measured speedup would count the diagnostic); the other steps are timed as usual."""
    from maskprop.train import steps as steps_module
    from maskprop.train import timing

    events = []
    angles, timed_step = steps_module.gradient_angles, timing.timed_step
    monkeypatch.setattr(steps_module, "gradient_angles", lambda *a, **k: events.append("angles") or angles(*a, **k))

    def recording(step, *args, timed=True, **kwargs):
        events.append(timed)
        return timed_step(step, *args, timed=timed, **kwargs)

    monkeypatch.setattr(loop, "timed_step", recording)
    summary = maskprop.fit(mlp_config(**{"sbp.angle_every": 3}), train_set=bars[0], val_set=bars[1])
    steps = [e for e in events if e != "angles"]
    assert len(steps) == 24 and steps.count(False) == 8  # 3 epochs of 8 steps; every third measures its angles
    measured = [events[i + 1] == "angles" for i, e in enumerate(events) if e != "angles"]
    assert [not t for t in steps] == measured  # exactly the steps that measured angles ran untimed
    assert summary["measured_speedup"] is not None


def test_the_step_reports_what_it_computed_in_one_host_read(bars):
    """Loss, correct count and gradient norm (before clipping) against their computation apart on a twin model; the
    step reads them to the host in one ``tolist`` and nothing else (no budget: its update reads scores by design)."""
    ctx = StepContext(criterion=torch.nn.CrossEntropyLoss(), device=torch.device("cpu"), clip_grad_norm=1e-3,
                      cost=CostModel(maskprop.create_model("mlp", num_classes=4, in_features=64, hidden=(32, 32)),
                                     (1, 8, 8)))
    images, labels = bars[0].images[:32], bars[0].targets[:32]
    (model, _), (twin, _) = _converted(), _converted()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # Adam reads its step count on the host on the CPU
    logits = twin(images)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    norm = torch.cat([p.grad.reshape(-1) for p in twin.parameters()]).norm()

    class HostReads(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", None) in ("tolist", "item", "__int__", "__float__", "__bool__", "numpy"):
                self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with HostReads() as reads:
        result = sbp_step(model, optimizer, (images, labels), ctx)
    assert reads.names == ["tolist"]
    assert result.loss == pytest.approx(loss.item(), rel=1e-6)
    assert result.grad_norm == pytest.approx(norm.item(), rel=1e-5) and norm.item() > 100 * 1e-3  # clipping ran after
    assert (result.correct, result.count) == (int((logits.argmax(1) == labels).sum()), 32)


# ---------------------------------------------------------------------------------------------------------------------
# Whole runs


@pytest.fixture(scope="module")
def msbp_run(bars, tmp_path_factory):
    out = tmp_path_factory.mktemp("msbp") / "run"
    return out, maskprop.fit(mlp_config(), *bars, out=out)


def test_msbp_run_learns_and_reports_its_costs(msbp_run, bars):
    out, summary = msbp_run
    assert summary["method"] == "msbp" and summary["accuracy"] > 90.0
    from maskprop.cli import _final_table  # the closing table names the ratio a sparse-backward run used

    assert _final_table(summary).splitlines()[0] == "mlp (msbp, sbp.ratio 0.25)"
    # the datasets given to fit, not the config's: such runs pair only with runs of the same kind and sizes
    assert summary["dataset"] == "custom" and summary["data"] == {
        "dataset": "custom", "train": "Bars", "train_size": len(bars[0]), "val": "Bars", "val_size": len(bars[1])}
    assert read_summary(out / "summary.json").data == summary["data"]
    steps = summary["steps"]["train"]
    assert steps == 3 * 8
    # every hidden layer keeps 8 of 32 units; the output layer is dense
    assert summary["sbp"]["kept_units"] == {"hidden.1": 8, "hidden.3": 8}
    cost = CostModel(maskprop.create_model("mlp", num_classes=4, in_features=64, hidden=(32, 32)), (1, 8, 8))
    per_step = sbp_step_flops({n: 32 * f for n, f in cost.by_layer().items()}, {"hidden.1": 0.25, "hidden.3": 0.25})
    assert summary["train_flops"] == steps * per_step
    assert summary["train_cost_saving"] == pytest.approx(3 * cost.flops(None, 32) / per_step)
    assert summary["measured_speedup"] > 0 and summary["dense_step_ms"] > 0 and summary["train_step_ms"] > 0
    assert summary["subnet_params"] == summary["dense_params"]  # nothing is pruned
    assert 0.0 < summary["sbp"]["last_angles"]["angle/overall"] < 90.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] and all(0 < r["angle_overall"] < 90 for r in records)


def test_angles_and_losses_reach_tensorboard(msbp_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(msbp_run[0]))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"angle/overall", "angle/hidden.1", "angle/hidden.3", "train/loss", "train/epoch_angle_overall",
            "cost/train_cost_saving", "val/train_accuracy"} <= scalars
    assert [e.step for e in events.Scalars("angle/overall")] == [4, 8, 12, 16, 20, 24]  # every sbp.angle_every steps


def test_the_epoch_angle_is_the_mean_of_the_angles_measured_in_the_epoch(msbp_run):
    """angle_overall of an epoch's record (and train/epoch_angle_overall at its step) is the mean over the steps that
    measured angles (every sbp.angle_every = 4 of the epoch's 8 steps), not over all of its steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = msbp_run[0]
    events = EventAccumulator(str(out), size_guidance={"scalars": 0})
    events.Reload()
    measured = {e.step: e.value for e in events.Scalars("angle/overall")}
    epoch_angles = {e.step: e.value for e in events.Scalars("train/epoch_angle_overall")}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for epoch, record in enumerate(records, start=1):
        mine = [a for step, a in measured.items() if (epoch - 1) * 8 < step <= epoch * 8]
        assert len(mine) == 2
        assert record["angle_overall"] == pytest.approx(sum(mine) / 2, rel=1e-6)
        assert epoch_angles[record["step"]] == pytest.approx(record["angle_overall"], rel=1e-6)



def test_the_logged_ks_are_each_layers_own_by_name():
    """_budget_ks (the sbp_k record and the sbp_k/<layer> scalars): the units each layer of a global budget keeps,
    under that layer's name, for layers keeping different numbers of units."""
    from types import SimpleNamespace

    model, _ = _converted()
    layers = dict(sparse_layers(model))
    assert list(layers) == ["hidden.1", "hidden.3"]
    state = SimpleNamespace(model=model, budget=SimpleNamespace(layers=[layers["hidden.1"], layers["hidden.3"]],
                                                                ks=[3, 11]))
    assert loop._budget_ks(state) == {"hidden.1": 3, "hidden.3": 11}


def test_sparse_and_dense_runs_of_the_same_recipe_both_learn(bars):
    for method in ("meprop", "sbp", "dense"):
        summary = maskprop.fit(mlp_config(method=method, **{"sbp.angle_every": 0}), *bars)
        assert summary["accuracy"] > 90.0, method
        assert (summary["train_cost_saving"] > 1.5) == (method != "dense"), method
        if method != "dense":  # the config's sbp.memory (0.8) is MSBP's: these run, and report, none
            assert summary["sbp"]["memory"] == 0.0, method


def test_balanced_budget_keeps_the_total_and_moves_it_between_layers(bars):
    summary = maskprop.fit(mlp_config(**{"sbp.budget": "balanced", "sbp.ratio": 0.25, "sbp.angle_every": 0}), *bars)
    kept = summary["sbp"]["kept_units"]
    assert sum(kept.values()) == 16 and summary["accuracy"] > 90.0


def stopped_in_epoch(epoch: int, monkeypatch, run) -> None:
    """``run()`` interrupted (Ctrl-C) as epoch ``epoch`` starts, after the epoch before was checkpointed."""
    real, calls = loop.train_one_epoch, []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", dies)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(loop, "train_one_epoch", real)


def test_resume_continues_exactly(bars, tmp_path, monkeypatch):
    config = mlp_config(**{"sbp.budget": "balanced", "sbp.sparsifier": "randomk", "sbp.angle_every": 3})
    maskprop.fit(config, *bars, out=tmp_path / "straight")
    stopped_in_epoch(2, monkeypatch, lambda: maskprop.fit(config, *bars, out=tmp_path / "resumed"))
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    maskprop.fit(config, *bars, out=tmp_path / "resumed", resume=True)

    a, b = (load_checkpoint(tmp_path / name / "last.pt") for name in ("straight", "resumed"))
    assert (a["step"], a["counters"]) == (b["step"], b["counters"])
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for index, state in a["optimizers"]["weights"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizers"]["weights"]["state"][index][key]))
    assert a["sbp"]["budget"] == b["sbp"]["budget"] and a["sbp"]["diagnostics"] == b["sbp"]["diagnostics"]
    for name, layer in a["sbp"]["layers"].items():
        assert torch.equal(layer["memory"], b["sbp"]["layers"][name]["memory"]), name


def test_a_cnn_trains_with_a_sparse_backward_through_the_cli(tmp_path, capsys):
    """ResNet-20 with SBP (bf16 autocast, channels_last): every convolution propagates whole channel maps; the
    classifier stays dense."""
    recipe = tmp_path / "cnn.yaml"
    recipe.write_text(json.dumps({"method": "sbp", "model": {"name": "resnet20"},
                                  "data": {"dataset": "shapes", "train_size": 64, "val_size": 32, "image_size": 16,
                                           "batch_size": 32, "workers": 0},
                                  "optim": {"epochs": 1}, "sbp": {"ratio": 0.25, "angle_every": 1},
                                  "amp": "bf16", "channels_last": True}))
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 0
    table = capsys.readouterr().out
    assert "resnet20 (sbp, sbp.ratio 0.25)" in table and "sparse backward:" in table
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    layers = summary["sbp"]["kept_units"]
    assert len(layers) == 21 and "fc" not in layers  # the stem, 18 block convs, 2 projections; fc dense
    assert layers["conv1"] == 4 and layers["layer3.0.conv1"] == 16
    assert summary["train_cost_saving"] > 1.5 and summary["sbp"]["last_angles"]["angle/overall"] > 0


def test_mnist_recipe_runs_on_a_stand_in(tmp_path, capsys):
    make_mnist(tmp_path / "data", train_size=200, test_size=50, learnable=True)
    recipe = REPO / "recipes" / "mnist_mlp500_meprop.yaml"
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), f"data.root={tmp_path / 'data'}",
                 "data.workers=0", "data.batch_size=20", "optim.epochs=3", "log_every=5",
                 "model.kwargs.hidden=[64, 64]"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model"] == "mlp" and summary["dense_flops"] == 2 * (784 * 64 + 64 * 64 + 64 * 10)
    assert summary["sbp"]["kept_units"] == {"hidden.1": 3, "hidden.3": 3} and summary["sbp"]["sparsifier"] == "topk"
    assert summary["accuracy"] > 50.0


def test_a_model_that_does_not_fit_the_input_is_a_one_line_error(tmp_path, capsys):
    make_mnist(tmp_path / "data")
    recipe = REPO / "recipes" / "cifar10_resnet32_msbp.yaml"
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(out), "data.dataset=mnist", f"data.root={tmp_path / 'data'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model 'resnet32' does not take mnist inputs of size (1, 28, 28)" in err and not out.exists()


@pytest.mark.parametrize("budget", ["layer", "balanced"])
def test_a_model_with_no_hidden_layer_is_refused_rather_than_trained_dense(budget, bars, tmp_path):
    """An MLP without hidden layers has only its output layer, which stays dense: the run would be dense training
    labelled ``meprop``. One line, nothing written; ``sbp.output_k`` sparsifies that layer (with a per-layer budget)."""
    config = mlp_config(**{"method": "meprop", "model.kwargs.hidden": "[]", "sbp.budget": budget})
    with pytest.raises(ValueError, match=r"^method=meprop: the model has no linear or conv layer besides its output"):
        maskprop.fit(config, train_set=bars[0], val_set=bars[1], out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    if budget == "layer":
        summary = maskprop.fit(mlp_config(**{"method": "meprop", "model.kwargs.hidden": "[]", "sbp.output_k": 2,
                                             "optim.epochs": 1}), train_set=bars[0], val_set=bars[1])
        assert summary["sbp"]["kept_units"] == {"fc": 2}


def test_an_output_k_the_output_layer_cannot_keep_names_the_config_key(bars, tmp_path):
    config = mlp_config(**{"method": "meprop", "sbp.output_k": 5})  # Bars has 4 classes
    with pytest.raises(ValueError, match=r"^sbp.output_k=5 does not fit the output layer \(.*expected 1 <= k <= 4"):
        maskprop.fit(config, train_set=bars[0], val_set=bars[1], out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_sparse_backward_hands_each_sbp_setting_to_the_layers_and_the_budget():
    """sbp.sparsifier reaches every layer, sbp.memory MSBP's layers only (meprop and sbp run none), sbp.scale the
    balanced budget; with sbp.output_k the output layer keeps that k and the budget shares round(ratio x units) of the
    hidden layers alone (6 + 10 units: 8, proportionally 3 and 5)."""
    for method, memory in (("msbp", 0.7), ("sbp", 0.0), ("meprop", 0.0)):
        sbp = load_config(None, [f"method={method}", "sbp.sparsifier=topk", "sbp.memory=0.7", "sbp.ratio=0.5",
                                 "sbp.budget=balanced", "sbp.scale=variance", "sbp.output_k=3"]).sbp
        model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 10), torch.nn.ReLU(),
                                    torch.nn.Linear(10, 4))
        budget = sparse_backward(model, method, sbp)
        layers = dict(sparse_layers(model))
        assert {name: (layer.sparsifier, layer.memory_ratio) for name, layer in layers.items()} == {
            name: ("topk", memory) for name in ("0", "2", "4")}, method
        assert budget.scale == "variance" and budget.total == 8 and budget.ks == [3, 5]
        assert [id(layer) for layer in budget.layers] == [id(layers["0"]), id(layers["2"])]
        assert [layers[name].keep_k for name in ("0", "2", "4")] == [3, 5, 3]


def test_an_output_k_alone_with_a_balanced_budget_is_refused():
    """A model whose only layer is the output layer: sbp.output_k sparsifies it with a per-layer budget, but a
    balanced budget would have no layer to share out; one line naming the way out."""
    def single() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))

    balanced = load_config(None, ["method=meprop", "sbp.output_k=2", "sbp.budget=balanced"]).sbp
    with pytest.raises(ValueError, match=r"^method=meprop: the model has no linear or conv layer besides its output "
                                         r"layer, .*\(or sbp.output_k for the output layer, with sbp.budget: layer\)$"):
        sparse_backward(single(), "meprop", balanced)
    model = single()
    assert sparse_backward(model, "meprop", load_config(None, ["method=meprop", "sbp.output_k=2"]).sbp) is None
    assert [layer.keep_k for _, layer in sparse_layers(model)] == [2]


def test_adam_by_default_at_a_recipe_s_sgd_rate_is_warned_of(caplog):
    """A sparse-backward method on a recipe written for SGD (the quickstart's lr 0.02, weight decay 5e-4) trains Adam
    at that rate: a warning names both settings and the two ways out; none where the optimizer is chosen."""
    recipe = REPO / "recipes" / "quickstart.yaml"
    with caplog.at_level("WARNING", logger="maskprop.train.config"):
        load_config(str(recipe), ["method=sbp"])
    assert ("method=sbp trains with Adam (its papers' optimizer: optim.optimizer is unset) at optim.lr=0.02 and "
            "optim.weight_decay=0.0005 from the config") in caplog.text
    for overrides in (["method=sbp", "optim.optimizer=adam"], ["method=sbp", "optim.optimizer=sgd"], []):
        caplog.clear()
        with caplog.at_level("WARNING", logger="maskprop.train.config"):
            load_config(str(recipe), overrides)
        assert "trains with Adam" not in caplog.text, overrides


def test_a_resume_keeps_the_angles_measured_before_the_stop(bars, tmp_path, monkeypatch):
    """Angles measured every 16 steps (8 an epoch): at the end of epoch 2 only. A run stopped in epoch 3 and resumed
    measures none again, so its summary's last angles are the checkpoint's, as the run's that did not stop."""
    config = mlp_config(**{"sbp.angle_every": 16})
    straight = maskprop.fit(config, *bars, out=tmp_path / "straight")
    stopped_in_epoch(3, monkeypatch, lambda: maskprop.fit(config, *bars, out=tmp_path / "resumed"))
    resumed = maskprop.fit(config, *bars, out=tmp_path / "resumed", resume=True)
    assert straight["sbp"]["last_angles"] and resumed["sbp"]["last_angles"] == straight["sbp"]["last_angles"]
