"""The measured speedup: paired dense reference steps, the estimator against a hand computation, its schedule, load
bursts that move it by less than 10%, and that timing changes nothing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import maskprop
import maskprop.train.loop as loop
import maskprop.train.timing as timing
from maskprop.train.checkpoint import load_checkpoint
from maskprop.train.steps import StepContext
from maskprop.train.timing import DenseReference, StepTimes, timed_step

pytestmark = pytest.mark.usefixtures("one_thread")

# 8 steps per epoch: 4 search epochs (32 steps), 2 finetune epochs (16 steps).
CONFIG = {
    "seed": 0, "log_every": 8,
    "model": {"name": "resnet20"},
    "data": {"dataset": "shapes", "train_size": 64, "val_size": 16, "image_size": 8, "batch_size": 8, "workers": 0},
    "optim": {"epochs": 4},
    "sparsity": {"keep_ratio": 0.5, "fix_examples": 16, "fix_samples": 2},
    "finetune": {"epochs": 2},
}
STEPS_PER_EPOCH, SEARCH_STEPS, FINETUNE_STEPS = 8, 32, 16
# Fake step costs on a quiet machine (seconds): a dense step 3, a search step 1.5, a finetune step 1.
DENSE_S, SEARCH_S, FINETUNE_S = 3.0, 1.5, 1.0


def config(**overrides) -> dict:
    cfg = copy.deepcopy(CONFIG)
    for dotted, value in overrides.items():
        node = cfg
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return cfg


# ---------------------------------------------------------------------------------------------------------------------
# The estimator


def test_measured_speedup_matches_a_hand_computation():
    times = StepTimes()
    search = [(1.0, 2.0), (1.0, 2.4), (2.0, 3.0), (0.5, 1.5), (1.0, 1.0)]  # ratios 2, 2.4, 1.5, 3, 1
    finetune = [(1.0, 4.0), (2.0, 5.0), (1.0, 3.5)]  # ratios 4, 2.5, 3.5
    for run, dense in search:
        times.add_pair("search", run, dense)
    for run, dense in finetune:
        times.add_pair("finetune", run, dense)
    steps = {"search": 100, "finetune": 40, "train": 0}
    estimate = times.measured_speedup(steps)

    # medians 2 and 3.5; quartiles by numpy's linear interpolation (the inclusive method)
    ratios_s, ratios_f = [2, 2.4, 1.5, 3, 1], [4, 2.5, 3.5]
    assert estimate.phases["search"]["median"] == pytest.approx(2.0)
    assert estimate.phases["finetune"]["median"] == pytest.approx(3.5)
    assert estimate.speedup == pytest.approx(100 / (100 / 2.0 + 40 / 3.5))
    low = 100 / (100 / np.percentile(ratios_s, 25) + 40 / np.percentile(ratios_f, 25))
    high = 100 / (100 / np.percentile(ratios_s, 75) + 40 / np.percentile(ratios_f, 75))
    assert (estimate.low, estimate.high) == pytest.approx((low, high))
    assert estimate.phases["search"]["pairs"] == 5 and estimate.warning is not None  # 1.5-2.4: a wide spread


def test_sparse_backward_runs_compare_train_steps_and_a_narrow_spread_gives_no_warning():
    times = StepTimes()
    for run, dense in [(1.0, 1.5), (1.0, 1.52), (1.0, 1.48)]:
        times.add_pair("train", run, dense)
    estimate = times.measured_speedup({"search": 0, "finetune": 0, "train": 50})
    assert estimate.speedup == pytest.approx(1.5) and estimate.warning is None
    # a phase with steps but no pair, or no dense baseline steps: no estimate rather than a made-up one
    assert times.measured_speedup({"search": 10, "finetune": 0, "train": 50}) is None
    assert StepTimes().measured_speedup({"finetune": 5}) is None


def test_times_survive_a_checkpoint_round_trip_and_old_checkpoints_load():
    times = StepTimes()
    times.add("search", 1.0)
    times.add_pair("search", 1.0, 2.0)
    times.overhead_s = 4.0
    restored = StepTimes()
    restored.load_state_dict(times.state_dict())
    assert restored.pairs == times.pairs and restored.times == times.times and restored.overhead_s == 4.0
    old = StepTimes()
    old.load_state_dict({"search": [1.0], "finetune": [], "train": [], "dense_ref": [2.0, 2.5]})
    assert old.pairs["search"] == [] and old.overhead_s == 4.5


# ---------------------------------------------------------------------------------------------------------------------
# A fake clock: steps cost known times, multiplied by the machine's load at the run step in progress


class FakeMachine:
    """Replaces the clock of the step times; every step advances it by its cost times the load."""

    def __init__(self, load=lambda step: 1.0) -> None:
        self.now = 0.0
        self.run_steps = 0  # run steps started so far
        self.load = load

    def clock(self) -> float:
        return self.now

    def run_step(self, cost: float) -> None:
        self.now += cost * self.load(self.run_steps)
        self.run_steps += 1

    def dense_step(self) -> None:
        """A dense step before run step i has i's load, one after it the next step's (at a burst's edge: another)."""
        self.now += DENSE_S * self.load(self.run_steps)


def _install(monkeypatch, machine: FakeMachine) -> None:
    """Every run step (whatever the loop runs for its phase) and every dense reference step costs fake time."""
    real_timed, real_subnet = timing.timed_step, timing.subnet_step

    def timed(step, phase, *args, **kwargs):
        def costly():
            result = step()
            machine.run_step(SEARCH_S if phase == "search" else FINETUNE_S)
            return result

        return real_timed(costly, phase, *args, **kwargs)

    def dense_step(*args, **kwargs):
        result = real_subnet(*args, **kwargs)
        machine.dense_step()
        return result

    monkeypatch.setattr(timing, "perf_counter", machine.clock)
    monkeypatch.setattr(loop, "timed_step", timed)
    monkeypatch.setattr(timing, "subnet_step", dense_step)


BURSTS = {
    # the machine is 8x slower from the last search steps through the finetuning
    "a stretch over the finetuning": lambda step: 8.0 if 28 <= step < 48 else 1.0,
    # and over the last two steps of every search epoch: a quarter of the search runs slow, in short stretches
    "stretches at the search epochs' ends":
        lambda step: 8.0 if step < SEARCH_STEPS and step % STEPS_PER_EPOCH >= STEPS_PER_EPOCH - 2 else 1.0,
}


# What the estimator reports on a quiet machine: D / (n_search / 2 + n_finetune / 3) = 1.5.
QUIET = SEARCH_STEPS / (SEARCH_STEPS / (DENSE_S / SEARCH_S) + FINETUNE_STEPS / (DENSE_S / FINETUNE_S))


def test_on_a_quiet_machine_the_estimate_is_the_step_costs_ratio(monkeypatch, tmp_path):
    machine = FakeMachine()
    _install(monkeypatch, machine)
    quiet = maskprop.fit(config(), out=tmp_path / "quiet")
    assert quiet["steps"] == {"search": SEARCH_STEPS, "finetune": FINETUNE_STEPS, "train": 0}
    assert quiet["measured_speedup"] == pytest.approx(QUIET)
    assert quiet["measured_speedup_iqr"] == pytest.approx([QUIET, QUIET]) and quiet["speedup_warning"] is None


@pytest.mark.parametrize("burst", list(BURSTS))
def test_a_load_burst_moves_the_paired_speedup_by_less_than_10_percent(monkeypatch, tmp_path, burst):
    machine = FakeMachine(BURSTS[burst])
    _install(monkeypatch, machine)
    busy = maskprop.fit(config(), out=tmp_path / "busy")
    assert all(p["pairs"] >= loop.DENSE_REFERENCE_MIN_PAIRS for p in busy["measured_speedup_phases"].values())

    speedup = busy["measured_speedup"]
    assert abs(speedup / QUIET - 1) < 0.10, speedup


def test_the_schedule_spends_about_the_share_on_a_long_phase_and_pairs_a_short_one_enough(monkeypatch):
    machine = FakeMachine()
    monkeypatch.setattr(timing, "perf_counter", machine.clock)
    monkeypatch.setattr(timing, "subnet_step", lambda *args, **kwargs: machine.dense_step())
    model = torch.nn.Linear(2, 2)
    ctx = StepContext(torch.nn.CrossEntropyLoss(), torch.device("cpu"), None)
    reference = DenseReference(model, lambda params: torch.optim.SGD(params, lr=0.1), ctx, share=0.01, min_pairs=5)
    times = StepTimes()
    for phase, total in (("search", 20_000), ("finetune", 30)):
        for index in range(total):
            timed_step(lambda: machine.run_step(SEARCH_S if phase == "search" else FINETUNE_S), phase, times,
                       ctx.device, reference, batch=None, index=index, total=total)
    search_pairs, finetune_pairs = len(times.pairs["search"]), len(times.pairs["finetune"])
    share = times.overhead_s / times.run_seconds()
    assert 0.009 < share < 0.012, share
    assert search_pairs > 90 and finetune_pairs >= 5
    estimate = times.measured_speedup({"search": 20_000, "finetune": 30})
    assert estimate.phases["search"]["median"] == pytest.approx(DENSE_S / SEARCH_S)


def test_pairs_alternate_sides_and_the_dense_reference_cost_is_its_overhead_not_run_time(monkeypatch):
    """The dense step of the first pair runs after its run step, of the second before it, and so on; the dense step's
    time (its warm-up left out) is recorded as a ``dense_ref`` time and in the pair; the whole dense cost, warm-up
    included, is ``overhead_s``; ``run_seconds`` counts the run's own steps alone, also after a checkpoint."""
    machine, events = FakeMachine(), []

    def dense(*args, **kwargs):
        events.append("dense")
        machine.dense_step()

    def run():
        events.append("run")
        machine.run_step(SEARCH_S)

    monkeypatch.setattr(timing, "perf_counter", machine.clock)
    monkeypatch.setattr(timing, "subnet_step", dense)
    ctx = StepContext(torch.nn.CrossEntropyLoss(), torch.device("cpu"), None)
    reference = DenseReference(torch.nn.Linear(2, 2), lambda params: torch.optim.SGD(params, lr=0.1), ctx, share=0.0,
                               min_pairs=4, warmup=1)
    times = StepTimes()
    for index in range(4):
        timed_step(run, "search", times, ctx.device, reference, batch=None, index=index, total=4)
    assert events == ["run", "dense", "dense",  # the first dense call warms up first
                      "dense", "run", "run", "dense", "dense", "run"]
    assert times.pairs["search"] == [(SEARCH_S, DENSE_S)] * 4 and times.times["dense_ref"] == [DENSE_S] * 4
    assert times.overhead_s == pytest.approx(5 * DENSE_S)  # four timed dense steps and the warm-up
    assert times.run_seconds() == pytest.approx(4 * SEARCH_S)
    restored = StepTimes()
    restored.load_state_dict(times.state_dict())
    assert restored.run_seconds() == pytest.approx(4 * SEARCH_S) and restored.overhead_s == pytest.approx(5 * DENSE_S)
    for seconds in (1.0, 2.0, 9.0):
        times.add("finetune", seconds)
    assert times.median("finetune") == 2.0 and times.run_seconds() == pytest.approx(4 * SEARCH_S + 12.0)


# ---------------------------------------------------------------------------------------------------------------------
# Timing changes nothing


def test_the_dense_reference_does_not_change_the_training(monkeypatch, tmp_path):
    small = config(**{"optim.epochs": 2, "finetune.epochs": 1})
    maskprop.fit(small, out=tmp_path / "timed")
    monkeypatch.setattr(loop, "DENSE_REFERENCE_MIN_PAIRS", 0)
    monkeypatch.setattr(loop, "DENSE_REFERENCE_SHARE", 0.0)
    untimed = maskprop.fit(small, out=tmp_path / "untimed")
    assert untimed["measured_speedup"] is None and untimed["dense_step_ms"] is None
    a, b = load_checkpoint(tmp_path / "timed" / "last.pt"), load_checkpoint(tmp_path / "untimed" / "last.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert torch.equal(a["scores"]["scores"], b["scores"]["scores"])
    for name in ("mask", "loader", "torch"):
        assert torch.equal(a["rng"][name], b["rng"][name]), name
    # the timing state is in the checkpoint and gives the summary's estimate back
    times = StepTimes()
    times.load_state_dict(a["times"])
    summary = maskprop.train.summary.read_summary(tmp_path / "timed" / "summary.json")
    assert times.measured_speedup(summary.steps).speedup == pytest.approx(summary.measured_speedup)
    assert summary.dense_reference_s == pytest.approx(times.overhead_s) and summary.dense_reference_share > 0


def test_a_short_phase_gets_its_minimum_of_pairs_spread_over_it():
    ctx = StepContext(torch.nn.CrossEntropyLoss(), torch.device("cpu"), None)
    reference = DenseReference(torch.nn.Linear(2, 2), lambda params: torch.optim.SGD(params, lr=0.1), ctx, share=0.0,
                               min_pairs=5)
    times, due = StepTimes(), []
    for index in range(30):
        times.add("finetune", 1.0)
        if reference.due(times, "finetune", index, 30):
            due.append(index)
            times.add_pair("finetune", 1.0, 2.0)
    assert due == [3, 9, 15, 21, 27]
