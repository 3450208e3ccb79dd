"""examples/own_loop.py: VR-PGE in a loop of your own computes what the trainer's step computes; it runs end to end."""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import maskprop
from maskprop.train.config import SparsityConfig
from maskprop.train.shapes import shapes_datasets
from maskprop.train.steps import StepContext, subnet_step, vrpge_step
from maskprop.vrpge import ChannelScores

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_loop.py"


@pytest.fixture(scope="module")
def own_loop():
    spec = importlib.util.spec_from_file_location("own_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _setup(model: torch.nn.Module, seed: int):
    scores = ChannelScores(maskprop.channel_groups(model), keep_ratio=0.5)
    with torch.no_grad():  # spread the probabilities, so that each channel's factor in the estimator differs
        scores.scores.add_(0.4 * torch.rand(scores.num_channels, generator=torch.Generator().manual_seed(seed)) - 0.2)
    scores.project_()
    weights = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    adam = torch.optim.Adam([scores.scores], lr=0.05)
    return scores, weights, adam


def test_the_examples_search_step_is_the_trainers(own_loop):
    """Three steps of the example's search_step and of the trainer's vrpge_step from the same weights, probabilities
    and mask generator: the same masks, losses, weights, optimizer states and probabilities."""
    torch.manual_seed(0)
    model = own_loop.build_model(num_classes=4).train()
    twin = copy.deepcopy(model)
    scores, weights, adam = _setup(model, 1)
    twin_scores, twin_weights, twin_adam = _setup(twin, 1)
    ctx = StepContext(torch.nn.CrossEntropyLoss(), torch.device("cpu"), maskprop.CostModel(twin, (3, 16, 16)))
    generator, twin_generator = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    batches = [(torch.randn(6, 3, 16, 16), torch.randint(0, 4, (6,))) for _ in range(3)]
    for step, (images, labels) in enumerate(batches):
        scores.set_budget(scores.budget * 0.9)  # a falling budget, as in an anneal
        twin_scores.set_budget(twin_scores.budget * 0.9)
        loss = own_loop.search_step(model, scores, weights, adam, images, labels, generator)
        result = vrpge_step(twin, twin_scores, (twin_weights, twin_adam), (images, labels), twin_generator,
                            SparsityConfig(), ctx)
        assert float(loss) == pytest.approx(result.loss, rel=1e-6), step
        torch.testing.assert_close(scores.scores.detach(), twin_scores.scores.detach(), msg=f"step {step}")
        assert float(scores.scores.detach().sum()) <= scores.budget * (1 + 1e-6)  # float32 sums
        for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p, q, msg=f"step {step}: {name}")
    assert torch.equal(generator.get_state(), twin_generator.get_state())  # the same draws, in the same order
    for (name, b), c in zip(model.named_buffers(), twin.named_buffers(), strict=True):  # BatchNorm statistics of m, m'
        torch.testing.assert_close(b, c[1], msg=name)
    # and the steps changed something: the probabilities moved off their start
    start, *_ = _setup(copy.deepcopy(model), 1)
    assert not torch.allclose(scores.scores.detach(), start.scores.detach())


def test_the_examples_dense_step_is_the_trainers(own_loop):
    torch.manual_seed(0)
    model = own_loop.build_model(num_classes=4).train()
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    ctx = StepContext(torch.nn.CrossEntropyLoss(), torch.device("cpu"), maskprop.CostModel(twin, (3, 16, 16)))
    for _ in range(2):
        images, labels = torch.randn(6, 3, 16, 16), torch.randint(0, 4, (6,))
        loss = own_loop.dense_step(model, optimizer, images, labels)
        result = subnet_step(twin, twin_optimizer, (images, labels), None, ctx)
        assert float(loss) == pytest.approx(result.loss, rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def test_the_example_runs_end_to_end_and_saves_the_narrow_model(own_loop, tmp_path, capsys, monkeypatch):
    ticks = []
    monkeypatch.setattr(own_loop.RunThreads, "tick", lambda self: ticks.append(self.setting))
    result = own_loop.main(["--out", str(tmp_path), "--train-size", "64", "--val-size", "40", "--batch-size", "32",
                            "--warmup-epochs", "1", "--anneal-epochs", "1", "--search-epochs", "1",
                            "--finetune-epochs", "1", "--keep-ratio", "0.25"])
    printed = capsys.readouterr().out
    assert printed.count("search epoch") == 3 and "narrow model:" in printed
    assert ticks == ["auto"] * (3 + 1) * 2  # threads: auto follows the load after every step, the finetune's too
    # the subnetwork keeps about a quarter of the channels (top_mask: round(sum s) of them, at most the budget)
    assert 0.05 < result["kept_ratio"] <= 0.25 + 1e-9 and 0 < result["flops_kept"] < 0.25
    # the saved program is the trained narrow model: torch alone runs it to the accuracy the script measured
    program = torch.export.load(tmp_path / "narrow.pt2").module()
    _, val_set = shapes_datasets(64, 40, seed=0)
    correct = 0
    with torch.no_grad():
        for images, labels in DataLoader(val_set, 7):  # a batch size it was not exported with
            correct += int((program(images).argmax(1) == labels).sum())
    assert math.isclose(100.0 * correct / len(val_set), result["accuracy"])


@pytest.mark.parametrize("argv, message", [
    (["--keep-ratio", "0"], "--keep-ratio 0.0: expected a fraction in (0, 1]"),
    (["--keep-ratio", "1.5"], "--keep-ratio 1.5: expected a fraction in (0, 1]"),
    (["--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
    (["--train-size", "64"], "--train-size 64 is below --batch-size 128: an epoch would have no full batch"),
    (["--warmup-epochs", "-1"], "--warmup-epochs -1: expected an integer >= 0"),
    (["--score-lr", "0"], "--score-lr 0.0: expected a number > 0"),
    (["--device", "foo"], "--device 'foo': expected cpu, cuda or cuda:N"),
])
def test_the_example_refuses_a_bad_setting_in_one_line_before_training(own_loop, capsys, argv, message):
    """A setting the loop cannot run with was a traceback from deep inside (``--train-size`` below the batch: an
    ``UnboundLocalError`` after the search); now one line, exit status 2, before anything is built."""
    with pytest.raises(SystemExit) as exit_:
        own_loop.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"error: {message}") and "Traceback" not in "\n".join(err)


def test_the_example_refuses_an_output_path_that_is_a_file_before_training(own_loop, tmp_path, capsys):
    """``--out FILE`` failed with a ``FileExistsError`` traceback after the whole run; now before it."""
    blocker = tmp_path / "afile"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_:
        own_loop.main(["--out", str(blocker)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"error: --out {blocker} is a file; expected a directory to save narrow.pt2 in")


def test_the_calls_the_scripts_docstring_names_exist(own_loop):
    """Its docstring said a converted network's groups are ``model.channel_groups()``, a method only maskprop's own
    models have (``make_prunable`` leaves the network's class alone): every ``model.X(`` and ``maskprop.X(`` it names
    is one its model, or maskprop, has."""
    import re

    model = own_loop.build_model()
    calls = re.findall(r"``(model|maskprop)\.(\w+)\(", own_loop.__doc__)
    assert calls
    for owner, name in calls:
        assert hasattr(model if owner == "model" else maskprop, name), f"{owner}.{name}"
