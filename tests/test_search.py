"""A search that can learn: the budget schedule (dense warm-up, anneal), the random-subnetwork baseline,
what their steps cost and how they are timed, resuming them, and the per-epoch diagnostics of a search."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import statistics

import pytest
import torch
from conftest import TINY_RUN, metric_records, with_overrides
from test_graphs import _stopped_in_the_second_epoch
from test_train import _assert_same_state
from torch.utils.data import DataLoader, Subset

import maskprop
from maskprop.cli import main
from maskprop.train import loop
from maskprop.train.checkpoint import load_checkpoint
from maskprop.train.config import SparsityConfig, load_config
from maskprop.train.data import build_datasets
from maskprop.train.state import search_schedule, search_scores
from maskprop.train.steps import StepContext, vrpge_step
from maskprop.vrpge import BudgetSchedule, ChannelScores, budget_at, score_grad, score_statistics

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs (conftest.py)

STEPS_PER_EPOCH = 2  # TINY_RUN: 128 training examples, batch 64
BATCH = 64


def tiny(**overrides) -> dict:
    return with_overrides(TINY_RUN, **overrides)


# ---------------------------------------------------------------------------------------------------------------------
# The budget schedule


@pytest.mark.parametrize("schedule, power", [("cubic", 3), ("linear", 1)])
def test_budget_at_every_step_of_a_small_schedule_is_the_closed_form(schedule, power):
    n, keep, warmup, anneal = 10, 0.3, 3, 5
    k = keep * n
    expected = [10.0] * 3 + [k + (n - k) * (1 - u / 5) ** power for u in range(5)] + [k] * 4
    got = [budget_at(t, n, keep, warmup, anneal, schedule) for t in range(12)]
    assert got == pytest.approx(expected, rel=0, abs=1e-12)
    assert got[3] == 10.0 and got[8] == k  # continuous at the start of the anneal, exactly K after it
    plan = BudgetSchedule(n, keep, warmup, anneal, schedule)
    assert [plan.at(t) for t in range(12)] == got
    assert [plan.kind(t) for t in range(12)] == ["warmup"] * 3 + ["anneal"] * 5 + ["search"] * 4
    assert [plan.sampling_budget(t) for t in range(5)] == [10.0, 10.0, 10.0, 10.0, got[4]]
    assert plan.final == k and plan.counts(6) == {"warmup": 3, "anneal": 3, "search": 0}
    assert plan.counts(12) == {"warmup": 3, "anneal": 5, "search": 4}


def test_without_an_anneal_the_budget_is_the_scores_own_from_the_first_sampling_step():
    groups = {"a": 16, "b": 48}
    scores = ChannelScores(groups, keep_ratio=0.37)
    plan = BudgetSchedule(64, 0.37, warmup_steps=4)
    assert [plan.at(t) for t in range(6)] == [64.0] * 4 + [scores.budget] * 2
    assert plan.sampling_budget(0) == scores.budget  # the same float: nothing is projected again


@pytest.mark.parametrize("kwargs, message", [
    ({"step": -1}, "step must be an integer >= 0, got -1"),
    ({"anneal_steps": 1.5}, "anneal_steps must be an integer >= 0, got 1.5"),
    ({"num_channels": 0}, "num_channels must be >= 1, got 0"),
    ({"keep_ratio": 0.0}, r"keep_ratio must be in \(0, 1\], got 0.0"),
    ({"schedule": "exponential"}, "unknown budget schedule 'exponential'; expected one of cubic, linear"),
])
def test_budget_at_refuses_bad_arguments_in_one_line(kwargs, message):
    arguments = {"step": 0, "num_channels": 8, "keep_ratio": 0.5, "warmup_steps": 0, "anneal_steps": 2,
                 "schedule": "cubic", **kwargs}
    with pytest.raises(ValueError, match=f"^{message}$"):
        budget_at(**arguments)


def test_an_anneal_starts_every_keep_probability_at_one():
    groups = {"a": 8, "b": 24}
    annealed = search_scores(groups, SparsityConfig(anneal_epochs=2, keep_ratio=0.25))
    assert annealed.budget == 32.0
    assert torch.equal(annealed.scores.detach(), torch.ones(32))
    plain = search_scores(groups, SparsityConfig(keep_ratio=0.25))  # the paper's start: 0.5, projected
    assert plain.budget == 8.0 and torch.allclose(plain.scores.detach(), torch.full((32,), 0.25))
    chosen = search_scores(groups, SparsityConfig(anneal_epochs=2, keep_ratio=0.25, init=0.75))  # as set
    assert torch.equal(chosen.scores.detach(), torch.full((32,), 0.75))
    with pytest.raises(ValueError, match=r"^budget must be a number in \[0, 32\] \(the channels\), got 33$"):
        annealed.set_budget(33)


def test_a_full_budget_samples_the_full_mask_and_costs_what_it_computes():
    """Every probability 1 (an anneal's first step): both masks keep every channel, the estimator is finite (zero),
    and the step costs two full forwards and one full backward, 4 f_D."""
    torch.manual_seed(0)
    model = maskprop.create_model("resnet20", num_classes=4).train()
    groups = model.channel_groups()
    scores = ChannelScores(groups, keep_ratio=0.5, init=1.0, budget=float(sum(groups.values())))
    weights = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    adam = torch.optim.Adam([scores.scores], lr=0.1)
    ctx = StepContext(torch.nn.CrossEntropyLoss(), torch.device("cpu"), maskprop.CostModel(model, (3, 8, 8)))
    batch = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    n = scores.num_channels
    for estimator in ("vrpge", "vrpge_sym"):
        grad = score_grad(estimator, 2.0, 1.0, torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool),
                          torch.ones(n), alpha=0.5)
        assert torch.equal(grad, torch.zeros(n))
    scores.set_budget(0.75 * n)  # the next step's budget: the step's projection meets it
    result = vrpge_step(model, scores, (weights, adam), batch, torch.Generator().manual_seed(0), SparsityConfig(),
                        ctx)
    assert all(bool(m.all()) for m in result.mask.values()) and all(bool(m.all()) for m in result.mask2.values())
    assert result.kept_ratio == 1.0 and result.loss == result.loss2  # the same network twice: no loss gap
    assert result.flops == 4 * ctx.cost.flops(None, 8) and result.dense_flops == 3 * ctx.cost.flops(None, 8)
    assert torch.equal(scores.scores.grad, torch.zeros(n))
    torch.testing.assert_close(scores.scores.detach(), torch.full((n,), 0.75))  # all equal: the shift is common
    assert all(math.isfinite(p.grad.abs().sum().item()) for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------------------------------
# Score statistics


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_score_statistics_on_hand_set_scores(dtype):
    values = [0.0, 0.03, 0.05, 0.06, 0.5, 0.94, 0.95, 0.99, 1.0, 0.2]
    s = torch.tensor(values, dtype=dtype)

    def entropy(p: float) -> float:
        return 0.0 if p in (0.0, 1.0) else -(p * math.log(p) + (1 - p) * math.log(1 - p))

    stats = score_statistics(s, margin=0.05)  # 0.05 and 0.95 count, in the scores' own precision
    assert stats.near_zero == pytest.approx(3 / 10) and stats.near_one == pytest.approx(3 / 10)
    assert stats.entropy == pytest.approx(sum(entropy(p) for p in values) / 10, rel=1e-6)
    assert score_statistics(torch.full((4,), 0.5)).entropy == pytest.approx(math.log(2))
    assert score_statistics(torch.tensor([0.0, 1.0])) == (0.5, 0.5, 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# A tiny annealed run, watched step by step


ANNEALED = {"optim.epochs": 4, "finetune.epochs": 1, "sparsity.warmup_epochs": 1, "sparsity.anneal_epochs": 2,
            "data.augment": False, "sparsity.align": 1}  # align 1 on CUDA too: FLOPs of the kept widths


@pytest.fixture(scope="module")
def annealed_run(tmp_path_factory):
    """One tiny run (1 warm-up epoch, 2 anneal epochs, 1 search epoch at the budget, 1 finetune epoch) with every
    step's result, what each VR-PGE step started from, and after every search epoch an independent measurement of
    what the diagnostics report."""
    out = tmp_path_factory.mktemp("annealed") / "run"
    cfg = load_config(tiny(**ANNEALED))
    train_set, *_ = build_datasets(cfg.data)
    probe = DataLoader(Subset(train_set, range(min(loop.TOP_MASK_EXAMPLES, len(train_set)))), batch_size=BATCH)
    seen: dict = {"steps": [], "vrpge": [], "epochs": [], "timed": [], "cpu_rng": []}

    def watched_timed_step(step, kind, times, *args, **kwargs):
        result = loop_timed_step(step, kind, times, *args, **kwargs)
        seen["steps"].append((kind, result))
        seen["timed"].append((kind, kwargs["index"], kwargs["total"]))
        return result

    def watched_vrpge_step(model, scores, optimizers, batch, generator, sparsity, ctx):
        before = {"budget": scores.budget, "sum": float(scores.scores.detach().sum()),
                  "scores": scores.scores.detach().clone(), "generator": generator.get_state()}
        result = loop_vrpge_step(model, scores, optimizers, batch, generator, sparsity, ctx)
        grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]  # no clipping in TINY_RUN
        seen["vrpge"].append(dict(before, next_budget=scores.budget, result=result,
                                  grad_norm=float(torch.linalg.vector_norm(torch.cat(grads)))))
        return result

    def watched_epoch(state, *args, **kwargs):
        before = torch.get_rng_state()
        metrics = loop_train_one_epoch(state, *args, **kwargs)
        seen["cpu_rng"].append((state.phase, before, torch.get_rng_state()))
        if state.phase == "search":
            mask = state.scores.top_mask()
            model = copy.deepcopy(state.model).eval()
            correct = count = 0
            with torch.random.fork_rng(devices=[]), torch.no_grad(), maskprop.use_mask(model, mask, "masked"):
                for images, labels in probe:
                    logits = model(images.to(next(model.parameters()).device)).cpu()
                    correct += int((logits.argmax(1) == labels).sum())
                    count += labels.numel()
            seen["epochs"].append({"scores": state.scores.scores.detach().clone(), "top": 100.0 * correct / count,
                                   "steps": state.counters["search_steps"]})
        return metrics

    loop_timed_step, loop_vrpge_step, loop_train_one_epoch = loop.timed_step, loop.vrpge_step, loop.train_one_epoch
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "timed_step", watched_timed_step)
        patch.setattr(loop, "vrpge_step", watched_vrpge_step)
        patch.setattr(loop, "train_one_epoch", watched_epoch)
        summary = maskprop.fit(cfg, out=out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"out": out, "summary": summary, "records": records, "cfg": cfg, **seen}


def test_the_warmup_is_dense_and_leaves_scores_and_mask_generator_alone(annealed_run):
    steps, vrpge = annealed_run["steps"], annealed_run["vrpge"]
    warmup = steps[:STEPS_PER_EPOCH]
    assert all(kind == "warmup" and result.loss2 is None and result.kept_ratio == 1.0 for kind, result in warmup)
    first = vrpge[0]
    assert torch.equal(first["scores"], torch.ones_like(first["scores"]))  # untouched by the warm-up
    fresh = torch.Generator().manual_seed(annealed_run["cfg"].seed + 1).get_state()
    assert torch.equal(first["generator"], fresh)  # no mask was drawn in the warm-up
    assert first["result"].kept_ratio == 1.0 and first["result"].loss == first["result"].loss2


def test_every_step_samples_from_scores_within_its_budget_and_projects_onto_the_next(annealed_run):
    n = annealed_run["summary"]["group_sizes"]
    n = sum(n.values())
    plan = BudgetSchedule(n, 0.5, STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH, "cubic")
    vrpge = annealed_run["vrpge"]
    assert len(vrpge) == 3 * STEPS_PER_EPOCH
    for i, step in enumerate(vrpge):
        t = STEPS_PER_EPOCH + i
        assert step["sum"] <= plan.at(t) + 1e-3, t  # sampled from scores within K(t)
        assert step["budget"] == step["next_budget"] == plan.at(t + 1), t  # and projected onto K(t + 1)
    assert vrpge[-1]["next_budget"] == 0.5 * n


def test_train_flops_of_warmup_anneal_search_and_finetune_match_a_hand_count(annealed_run):
    """Warm-up steps 3 f_D, VR-PGE steps (anneal or not) 3 f(m) + f(m'), finetune steps 3 f(fixed), all from
    CostModel's numbers; the dense baseline 3 f_D per search step, warm-up included, so a warm-up lowers the saving."""
    summary, out = annealed_run["summary"], annealed_run["out"]
    model = maskprop.create_model("resnet20", num_classes=10)
    cost = maskprop.CostModel(model, (3, 16, 16))
    fixed = load_checkpoint(out / "last.pt")["fixed_mask"]
    f_dense = BATCH * cost.flops()
    warmup = STEPS_PER_EPOCH * 3 * f_dense
    search = sum(3 * BATCH * cost.flops(s["result"].mask) + BATCH * cost.flops(s["result"].mask2)
                 for s in annealed_run["vrpge"])
    finetune = STEPS_PER_EPOCH * 3 * BATCH * cost.flops(fixed)
    assert summary["train_flops"] == warmup + search + finetune
    assert summary["dense_train_flops"] == 4 * STEPS_PER_EPOCH * 3 * f_dense
    assert summary["train_cost_saving"] == pytest.approx(summary["dense_train_flops"] / summary["train_flops"])
    first = annealed_run["vrpge"][0]["result"]
    assert first.flops == 4 * f_dense  # the anneal's first step keeps every channel: 2 dense forwards + 1 backward
    records = annealed_run["records"]
    assert records[0]["train_flops"] == warmup and records[0]["train_cost_saving"] == 1.0


def test_warmup_and_anneal_steps_are_timed_against_dense_steps_as_kinds_of_their_own(annealed_run):
    summary = annealed_run["summary"]
    times = load_checkpoint(annealed_run["out"] / "last.pt")["times"]
    assert [len(times[k]) for k in ("warmup", "anneal", "search", "train")] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH,
                                                                               STEPS_PER_EPOCH, 0]
    assert [k for k, _ in annealed_run["steps"]] == (["warmup"] * STEPS_PER_EPOCH + ["anneal"] * 2 * STEPS_PER_EPOCH
                                                      + ["search"] * STEPS_PER_EPOCH + ["finetune"] * STEPS_PER_EPOCH)
    phases = summary["measured_speedup_phases"]
    assert set(phases) == {"warmup", "anneal", "search", "finetune"} and all(p["pairs"] >= 1 for p in phases.values())
    steps = {"warmup": STEPS_PER_EPOCH, "anneal": 2 * STEPS_PER_EPOCH, "search": STEPS_PER_EPOCH,
             "finetune": STEPS_PER_EPOCH}
    expected = 4 * STEPS_PER_EPOCH / sum(n / phases[p]["median"] for p, n in steps.items())
    assert summary["measured_speedup"] == pytest.approx(expected)
    assert summary["warmup_step_ms"] == pytest.approx(1000 * statistics.median(times["warmup"]))
    assert summary["anneal_step_ms"] == pytest.approx(1000 * statistics.median(times["anneal"]))
    assert summary["step_speedup"] == phases["search"]["median"]  # the search at its budget, not the warm-up
    assert summary["dense_reference_share"] == pytest.approx(summary["dense_reference_s"] / summary["run_time_s"])
    assert summary["train_step_ms"] is None
    assert summary["search"] == {"subnetwork": "searched", "warmup_epochs": 1, "anneal_epochs": 2,
                                 "budget_schedule": "cubic", "budget_unit": "channels",
                                 "initial_keep_probability": 1.0,
                                 "steps": {"warmup": 2, "anneal": 4, "search": 2}}
    assert summary["steps"] == {"search": 8, "finetune": 2, "train": 0}


def test_warmup_anneal_search_and_finetune_steps_are_paired_by_their_index_among_their_kind(annealed_run):
    """The dense reference pairs are spread over each kind's own steps: every step is timed by its index among the
    steps of its kind and their number (not the phase's), so each kind gets its pairs."""
    timed = annealed_run["timed"]
    kinds = [kind for kind, _, _ in timed]
    assert set(kinds) == {"warmup", "anneal", "search", "finetune"}
    for kind in set(kinds):
        mine = [(index, total) for k, index, total in timed if k == kind]
        assert mine == [(i, kinds.count(kind)) for i in range(len(mine))], kind


def test_the_epoch_records_are_the_means_of_their_steps_at_the_cosine_lr(annealed_run):
    """Each epoch's record: loss, L(m') and accuracy over its examples, the sampled kept ratio over its steps (as the
    steps reported them), and the weights' learning rate after its last step, the cosine of each phase from its peak
    (optim.lr 0.1 over 4 x 2 search steps, finetune.lr 1e-3 over 2) to 0."""
    records, steps = annealed_run["records"], annealed_run["steps"]
    assert [(r["phase"], r["epoch"]) for r in records] == [("search", e) for e in range(1, 5)] + [("finetune", 1)]
    for epoch, record in enumerate(records):
        results = [result for _, result in steps[epoch * STEPS_PER_EPOCH:(epoch + 1) * STEPS_PER_EPOCH]]
        count = sum(r.count for r in results)
        assert record["train_loss"] == pytest.approx(sum(r.loss * r.count for r in results) / count, rel=1e-12)
        assert record["train_accuracy"] == pytest.approx(100.0 * sum(r.correct for r in results) / count)
        assert record["kept_ratio_sampled"] == pytest.approx(statistics.mean(r.kept_ratio for r in results))
        if record.get("step_kind") in ("anneal", "search"):
            assert record["train_loss2"] == pytest.approx(sum(r.loss2 * r.count for r in results) / count, rel=1e-12)
        else:
            assert "train_loss2" not in record
    peaks = {"search": (0.1, 4 * STEPS_PER_EPOCH), "finetune": (1e-3, STEPS_PER_EPOCH)}
    for record in records:
        peak, total = peaks[record["phase"]]
        t = record["epoch"] * STEPS_PER_EPOCH
        assert record["lr"] == pytest.approx(0.5 * peak * (1 + math.cos(math.pi * t / total)), abs=1e-12)


def test_search_diagnostics_match_an_independent_computation(annealed_run):
    records = [r for r in annealed_run["records"] if r["phase"] == "search"]
    assert [r["step_kind"] for r in records] == ["warmup", "anneal", "anneal", "search"]
    n = sum(annealed_run["summary"]["group_sizes"].values())
    plan = BudgetSchedule(n, 0.5, STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH, "cubic")
    steps = annealed_run["steps"]
    for epoch, record in enumerate(records):
        assert record["budget_ratio"] == pytest.approx(plan.at((epoch + 1) * STEPS_PER_EPOCH) / n)
        results = [result for _, result in steps[epoch * STEPS_PER_EPOCH:(epoch + 1) * STEPS_PER_EPOCH]]
        assert record["grad_norm"] == pytest.approx(statistics.mean(r.grad_norm for r in results), rel=1e-12)
    assert "loss_gap" not in records[0] and "train_loss2" not in records[0] and "score_entropy" not in records[0]
    for epoch, (record, watched) in enumerate(zip(records[1:], annealed_run["epochs"][1:]), start=1):
        vrpge = annealed_run["vrpge"][(epoch - 1) * STEPS_PER_EPOCH:epoch * STEPS_PER_EPOCH]
        assert record["loss_gap"] == pytest.approx(statistics.mean(abs(s["result"].loss - s["result"].loss2)
                                                                   for s in vrpge))
        assert record["grad_norm"] == pytest.approx(statistics.mean(s["grad_norm"] for s in vrpge), rel=1e-5)
        s = watched["scores"].double()
        entropy = -(s * s.clamp_min(1e-300).log() + (1 - s) * (1 - s).clamp_min(1e-300).log()).mean()
        assert record["score_entropy"] == pytest.approx(float(entropy), rel=1e-9)
        assert record["scores_near_0"] == pytest.approx(sum(p <= 0.05 for p in s.tolist()) / len(s))
        assert record["scores_near_1"] == pytest.approx(sum(p >= 0.95 for p in s.tolist()) / len(s))
        assert record["train_accuracy_top"] == pytest.approx(watched["top"])


def test_search_diagnostics_of_hand_set_scores():
    """_search_diagnostics after a VR-PGE epoch: the kind of the epoch's last step, the budget K(t) / N of the next
    step, the shares of keep probabilities within 0.05 of 0 and of 1 (0.05 and 0.95 included, 0.051 and 0.949 not)
    and their mean Bernoulli entropy in nats; no probe, no top-mask accuracy. Against a hand computation."""
    from types import SimpleNamespace

    values = [0.0, 0.045, 0.05, 0.051, 0.5, 0.949, 0.95, 0.955, 1.0, 0.3]
    schedule = BudgetSchedule(10, 0.5, 2, 4, "linear")
    state = SimpleNamespace(phase="search", schedule=schedule, counters={"search_steps": 5},
                            scores=SimpleNamespace(scores=torch.tensor(values, dtype=torch.float64)))
    run = SimpleNamespace(state=state, cfg=SimpleNamespace(sparsity=SimpleNamespace(fix="best_of_n"), seed=0))
    entropy = sum(0.0 if p in (0.0, 1.0) else -(p * math.log(p) + (1 - p) * math.log(1 - p)) for p in values) / 10
    got = loop._search_diagnostics(run, None)
    assert got.pop("step_kind") == "anneal"
    assert got == pytest.approx({"budget_ratio": (5 + 5 * (1 - 3 / 4)) / 10,
                                 "scores_near_0": 0.3, "scores_near_1": 0.3, "score_entropy": entropy}, rel=1e-12)


def test_the_diagnostics_between_search_epochs_leave_the_cpu_generator_as_the_epoch_left_it(annealed_run):
    """The probe of the top-score subnetwork after each search epoch seeds torch's CPU generator inside a fork: the next
    epoch draws (augmentation, dropout) on from where the last one stopped, not from the seed again every epoch."""
    search = [(before, after) for phase, before, after in annealed_run["cpu_rng"] if phase == "search"]
    assert len(search) == 4
    for (_, after), (before, _) in itertools.pairwise(search):
        assert torch.equal(before, after)
    fresh = torch.Generator().manual_seed(annealed_run["cfg"].seed).get_state()
    assert not any(torch.equal(before, fresh) for before, _ in search)


def test_tensorboard_holds_the_search_diagnostics(annealed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(annealed_run["out"]))
    events.Reload()
    expected = {"search/budget_ratio", "search/loss_gap", "search/scores_near_0", "search/scores_near_1",
                "search/score_entropy", "search/train_accuracy_top", "search/epoch_grad_norm", "search/grad_norm"}
    assert expected <= set(events.Tags()["scalars"])


def test_tensorboard_epoch_scalars_are_the_records_at_their_steps(annealed_run):
    """Every epoch scalar is the value of its metrics.jsonl record, logged at the record's step (the epoch's last
    step) and at no other step; the score histogram is logged at the same steps, with every keep probability."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(annealed_run["out"]), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    records, expected = annealed_run["records"], {}
    for r in records:
        p = r["phase"]
        values = {f"{p}/epoch_loss": r["train_loss"], f"{p}/epoch_accuracy": r["train_accuracy"],
                  f"{p}/kept_ratio_sampled_mean": r["kept_ratio_sampled"], f"{p}/epoch_grad_norm": r["grad_norm"],
                  "cost/train_flops": r["train_flops"], "cost/train_cost_saving": r["train_cost_saving"],
                  f"val/{p}_accuracy": r["val_accuracy"], f"val/{p}_loss": r["val_loss"],
                  "search/kept_ratio_expected": r["kept_ratio_expected"],
                  **{f"widths/{g}": w for g, w in r["widths_expected"].items()}}
        values.update({f"search/{k}": r[k] for k in ("budget_ratio", "loss_gap", "scores_near_0", "scores_near_1",
                                                      "score_entropy", "train_accuracy_top") if k in r})
        for tag, value in values.items():
            expected.setdefault(tag, {})[r["step"]] = value
    assert set(expected["search/score_entropy"]) == {r["step"] for r in records[1:4]}  # VR-PGE epochs only
    for tag, by_step in expected.items():
        got = {e.step: e.value for e in events.Scalars(tag)}
        assert got == pytest.approx(by_step, rel=1e-6), tag
    histograms = events.Histograms("search/scores")
    assert [h.step for h in histograms] == [r["step"] for r in records]
    n = sum(annealed_run["summary"]["group_sizes"].values())
    assert all(h.histogram_value.num == n for h in histograms)
    for h, watched in zip(histograms, annealed_run["epochs"]):
        assert h.histogram_value.sum == pytest.approx(float(watched["scores"].double().sum()), rel=1e-6)


def test_tensorboard_step_scalars_are_the_results_of_every_log_every_th_step(annealed_run):
    """Every ``log_every`` steps (and only then), the step's own result at its step: the loss (of m and of m' after
    VR-PGE steps), the accuracy in percent, the sampled kept ratio and the gradient norm; and the learning rates after
    the step (the weights' cosine of each phase, the scores' constant Adam rate during VR-PGE steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(annealed_run["out"]), size_guidance={"scalars": 0})
    events.Reload()
    cfg, expected = annealed_run["cfg"], {}
    search_steps = 4 * STEPS_PER_EPOCH
    for i, (kind, result) in enumerate(annealed_run["steps"]):
        step = i + 1
        if step % cfg.log_every:
            continue
        p = "finetune" if kind == "finetune" else "search"
        peak, t, total = (1e-3, step - search_steps, STEPS_PER_EPOCH) if p == "finetune" else (0.1, step, search_steps)
        values = {f"{p}/loss" if result.loss2 is None else f"{p}/loss_m": result.loss,
                  f"{p}/accuracy": 100.0 * result.correct / result.count, f"{p}/kept_ratio_sampled": result.kept_ratio,
                  f"{p}/grad_norm": result.grad_norm, "lr/weights": 0.5 * peak * (1 + math.cos(math.pi * t / total))}
        if result.loss2 is not None:
            values.update({f"{p}/loss_m2": result.loss2, "lr/scores": cfg.sparsity.score_lr})
        for tag, value in values.items():
            expected.setdefault(tag, {})[step] = value
    assert set(expected["search/loss"]) == {2} and set(expected["search/loss_m"]) == {4, 6, 8}
    for tag, by_step in expected.items():
        got = {e.step: e.value for e in events.Scalars(tag)}
        assert got == pytest.approx(by_step, rel=1e-6, abs=1e-9), tag


def test_anneal_epochs_do_not_count_as_the_best_subnetwork(annealed_run):
    """While the budget falls the top scores keep more channels than the budget: their accuracy is not a best."""
    records = annealed_run["records"]
    counted = [r["val_accuracy"] for r in records if r.get("step_kind") not in ("warmup", "anneal")]
    summary = annealed_run["summary"]
    assert summary["best_accuracy"] == max(counted)


def test_each_phase_ends_evaluated_and_only_subnetworks_within_the_budget_are_best(tmp_path, monkeypatch):
    """With eval_every 2 the epochs evaluated are every second one and the last of each phase (search epoch 3, the
    finetune's only one). The validation accuracies are scripted (90 for the anneal's first epoch, whose top scores
    keep more channels than the budget; 20 for its last, projected onto the final budget; 30 for the finetune):
    best_accuracy and best.pt are the finetune's, the accuracy above the budget is no best."""
    evaluate, scripted = loop.evaluate, iter([90.0, 20.0, 30.0])

    def scripted_evaluate(model, loader, mask, ctx):
        result = evaluate(model, loader, mask, ctx)
        return dict(result, accuracy=next(scripted)) if len(loader.dataset) == 64 else result  # the validation set

    monkeypatch.setattr(loop, "evaluate", scripted_evaluate)
    config = tiny(**{"optim.epochs": 3, "sparsity.warmup_epochs": 1, "sparsity.anneal_epochs": 2,
                     "finetune.epochs": 1, "eval_every": 2})
    summary = maskprop.fit(config, out=tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"], r.get("val_accuracy")) for r in records] == [
        ("search", 1, None), ("search", 2, 90.0), ("search", 3, 20.0), ("finetune", 1, 30.0)]
    assert summary["best_accuracy"] == summary["accuracy"] == 30.0
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert (best["phase"], best["epoch"], best["best_accuracy"]) == ("finetune", 1, 30.0)


# ---------------------------------------------------------------------------------------------------------------------
# The random-subnetwork baseline


RANDOM = {"optim.epochs": 3, "finetune.epochs": 1, "sparsity.warmup_epochs": 1, "sparsity.fix": "random",
          "sparsity.keep_ratio": 0.3, "save_every": 1, "sparsity.align": 1}


def test_the_random_baseline_trains_the_subnetwork_its_seed_draws(tmp_path, monkeypatch):
    kinds = []
    loop_timed_step = loop.timed_step

    def watched(step, kind, *args, **kwargs):
        result = loop_timed_step(step, kind, *args, **kwargs)
        kinds.append((kind, result))
        return result

    monkeypatch.setattr(loop, "timed_step", watched)
    summary = maskprop.fit(tiny(**RANDOM), out=tmp_path / "random")
    checkpoint = load_checkpoint(tmp_path / "random" / "last.pt")
    groups = maskprop.create_model("resnet20").channel_groups()
    assert summary["widths"] == {g: max(1, round(0.3 * n)) for g, n in groups.items()}
    drawn = maskprop.random_mask(groups, 0.3, torch.Generator().manual_seed(TINY_RUN["seed"] + 1))
    assert {g: m.tolist() for g, m in checkpoint["fixed_mask"].items()} == {g: m.tolist() for g, m in drawn.items()}
    assert checkpoint["scores"] is None and checkpoint["optimizers"]["scores"] is None
    assert summary["fix"] == {"rule": "random"}
    assert summary["search"]["subnetwork"] == "random" and summary["search"]["steps"] == {"warmup": 2, "random": 4}
    records = [json.loads(line) for line in (tmp_path / "random" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("step_kind") for r in records] == ["warmup", "random", "random", None]
    assert all("kept_ratio_expected" not in r and "loss_gap" not in r for r in records)
    # FLOPs: 3 f_D per warm-up step, then 3 f(mask) per step of the fixed subnetwork, search and finetune alike
    cost = maskprop.CostModel(maskprop.create_model("resnet20", num_classes=10), (3, 16, 16))
    assert [k for k, _ in kinds] == ["warmup"] * 2 + ["search"] * 4 + ["finetune"] * 2
    assert all(r.flops == 3 * BATCH * cost.flops(drawn) for _, r in kinds[2:])
    assert summary["train_flops"] == 2 * 3 * BATCH * cost.flops() + 6 * 3 * BATCH * cost.flops(drawn)
    assert summary["dense_train_flops"] == 6 * 3 * BATCH * cost.flops()


# ---------------------------------------------------------------------------------------------------------------------
# Resume


class _Stop(Exception):
    pass


def _stop_after(monkeypatch, epochs: int) -> None:
    """Make the run raise when it starts search epoch ``epochs + 1`` (its checkpoint holds ``epochs`` epochs)."""
    train_one_epoch = loop.train_one_epoch

    def stop(state, *args, **kwargs):
        if state.phase == "search" and state.epoch == epochs:
            raise _Stop
        return train_one_epoch(state, *args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", stop)


@pytest.mark.parametrize("name, overrides, stops", [
    ("anneal", {"optim.epochs": 5, "sparsity.warmup_epochs": 2, "sparsity.anneal_epochs": 2}, (1, 3)),
    ("random", RANDOM, (2,)),
    ("priced", {"optim.epochs": 4, "sparsity.warmup_epochs": 1, "sparsity.anneal_epochs": 2,
                "sparsity.budget_unit": "flops"}, (2,)),
])
def test_resume_in_the_warmup_the_anneal_and_the_random_baseline_is_exact(tmp_path, monkeypatch, name, overrides,
                                                                        stops):
    config = tiny(**{"finetune.epochs": 1, "save_every": 1, **overrides})
    maskprop.fit(copy.deepcopy(config), out=tmp_path / "straight")
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    train_one_epoch = loop.train_one_epoch
    for epochs in stops:  # 1: in the warm-up; 3 (2 priced): in the anneal; 2: in the random baseline's search
        run = tmp_path / f"stopped{epochs}"
        _stop_after(monkeypatch, epochs)
        with pytest.raises(_Stop):
            maskprop.fit(copy.deepcopy(config), out=run)
        assert (load_checkpoint(run / "last.pt")["phase"], load_checkpoint(run / "last.pt")["epoch"]) == \
            ("search", epochs)
        monkeypatch.setattr(loop, "train_one_epoch", train_one_epoch)
        maskprop.fit(copy.deepcopy(config), out=run, resume=True)
        _assert_same_state(straight, load_checkpoint(run / "last.pt"))
        assert metric_records(run) == metric_records(tmp_path / "straight")


def test_resume_with_loader_workers_is_exact(tmp_path, monkeypatch):
    """With ``data.workers`` > 0 the crops and flips are drawn in the worker processes: they start anew every epoch,
    seeded from the run's loader generator (saved in the checkpoint), so a run resumed after its first epoch draws
    what one that did not stop draws (persistent workers carried their streams over from epoch to epoch, which a
    resumed run's new workers could not)."""
    config = tiny(**{"method": "dense", "data.workers": 2, "optim.epochs": 3, "finetune.epochs": 0, "save_every": 1})
    maskprop.fit(copy.deepcopy(config), out=tmp_path / "straight")
    run = tmp_path / "stopped"
    _stopped_in_the_second_epoch(copy.deepcopy(config), run, monkeypatch)
    maskprop.fit(copy.deepcopy(config), out=run, resume=True)
    _assert_same_state(load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(run / "last.pt"))


def test_a_resume_in_the_finetune_keeps_records_wall_time_best_accuracy_and_step_times(tmp_path, monkeypatch):
    """A resume in the finetune keeps every record of the search before it (phases in run order: the search's are
    earlier than any finetune epoch) and carries on the checkpoint's wall time (run_time_s counts the processes before
    it: a scripted 1e6 s), its best accuracy (a scripted 99%, above any this run reaches) and its step times (those
    timed before the stop stay the first of the final checkpoint's)."""
    from maskprop.train.checkpoint import save_checkpoint

    config, run = tiny(**{"finetune.epochs": 2, "save_every": 1}), tmp_path / "run"
    train_one_epoch = loop.train_one_epoch

    def stop(state, *args, **kwargs):
        if state.phase == "finetune" and state.epoch == 1:
            raise _Stop
        return train_one_epoch(state, *args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", stop)
    with pytest.raises(_Stop):
        maskprop.fit(copy.deepcopy(config), out=run)
    stopped = load_checkpoint(run / "last.pt")
    assert (stopped["phase"], stopped["epoch"]) == ("finetune", 1)
    save_checkpoint(dict(stopped, elapsed_s=1e6, best_accuracy=99.0), run / "last.pt")
    monkeypatch.setattr(loop, "train_one_epoch", train_one_epoch)
    summary = maskprop.fit(copy.deepcopy(config), out=run, resume=True)
    assert [(r["phase"], r["epoch"]) for r in metric_records(run)] == [("search", 1), ("search", 2), ("finetune", 1),
                                                                  ("finetune", 2)]
    assert 1e6 < summary["run_time_s"] < 1e6 + 600 and summary["best_accuracy"] == 99.0
    times = load_checkpoint(run / "last.pt")["times"]
    assert times["search"] == stopped["times"]["search"] and len(times["search"]) == 2 * STEPS_PER_EPOCH
    assert times["finetune"][:STEPS_PER_EPOCH] == stopped["times"]["finetune"]
    assert len(times["finetune"]) == 2 * STEPS_PER_EPOCH


def test_a_budget_in_flops_holds_the_priced_sum_and_narrows_the_expensive_channels(tmp_path):
    """A search with ``budget_unit: flops`` ends at ``sum w s = K`` with the prices of ``CostModel.channel_prices``
    (scaled to a mean of 1), not at ``sum s = K``; its residual streams, the dearest channels, keep less probability
    than the channels inside the blocks (the channel budget's run keeps them about level)."""
    config = tiny(**{"optim.epochs": 3, "finetune.epochs": 0, "sparsity.anneal_epochs": 2,
                     "sparsity.budget_unit": "flops", "save_every": 1})
    maskprop.fit(copy.deepcopy(config), out=tmp_path / "priced")
    cfg = load_config(config)
    model = maskprop.create_model("resnet20", num_classes=10)
    groups = model.channel_groups()
    prices = maskprop.CostModel(model, (3, 16, 16)).channel_prices(0.5)
    w = torch.cat([torch.full((n,), prices[g]) for g, n in groups.items()]).double()
    w = w / w.mean()
    s = load_checkpoint(tmp_path / "priced" / "last.pt")["scores"]["scores"].double()
    assert float((w * s).sum()) == pytest.approx(cfg.sparsity.keep_ratio * w.numel(), rel=1e-5)
    assert abs(float(s.sum()) - cfg.sparsity.keep_ratio * w.numel()) > 1  # a priced sum, not a count
    split = dict(zip(groups, torch.split(s, list(groups.values()))))
    streams = torch.cat([split[g] for g in groups if "conv" not in g]).mean()
    inner = torch.cat([split[g] for g in groups if "conv" in g]).mean()
    assert streams < inner - 0.1, (float(streams), float(inner))
    # Its top-score subnetwork, as the run evaluated it and as an export rebuilds it, is chosen at these prices.
    from maskprop.export import export_run

    info = export_run(tmp_path / "priced", tmp_path / "export", "safetensors", mask="top_scores")
    top = {}
    for rule, kwargs in (("priced", {"prices": prices}), ("count", {})):
        scores = ChannelScores(groups, cfg.sparsity.keep_ratio, **kwargs)
        scores.load_state_dict(load_checkpoint(tmp_path / "priced" / "last.pt")["scores"])
        top[rule] = {g: int(m.sum()) for g, m in scores.top_mask().items()}
    assert info["widths"] == top["priced"] != top["count"]


def test_a_budget_mostly_spent_by_one_channel_per_group_says_so(caplog):
    """ChannelScores.floor: the number of groups, or the sum of one channel's price per group; a search whose floor is
    more than half of its final budget warns once (ResNet-20: 12 groups; at keep 0.05 the budget is 22.4 channels)."""
    groups = maskprop.create_model("resnet20", num_classes=10).channel_groups()
    assert ChannelScores(groups, 0.5).floor == 12.0
    priced = ChannelScores(groups, 0.5, prices={g: 1.0 + i for i, g in enumerate(groups)})
    mean = sum((1.0 + i) * n for i, n in enumerate(groups.values())) / sum(groups.values())
    assert priced.floor == pytest.approx(sum(1.0 + i for i in range(12)) / mean, rel=1e-6)
    config = with_overrides(TINY_RUN, **{"optim.epochs": 1, "finetune.epochs": 0, "sparsity.keep_ratio": 0.05})
    with caplog.at_level(logging.WARNING, logger="maskprop.train.loop"):
        maskprop.fit(config)
    warnings = [r.getMessage() for r in caplog.records if "one channel of every group" in r.getMessage()]
    assert warnings == ["at sparsity.keep_ratio=0.05 one channel of every group (kept even when a sample drops the "
                        "whole group) costs 12.0 of the budget's 22.4 channels (54%): the search chooses among few "
                        "channels, and its subnetwork computes more than the budget (docs/methods.md, \"A budget in "
                        "FLOPs\")"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="maskprop.train.loop"):
        maskprop.fit(with_overrides(config, **{"sparsity.keep_ratio": 0.1}))  # 12 of 44.8
    assert "one channel of every group" not in caplog.text


def test_the_floor_warning_starts_just_above_half_of_the_budget(caplog):
    """_warn_if_floor: a floor of exactly FLOOR_SHARE (half) of the budget says nothing, one just above it warns, in
    the budget's unit."""
    with caplog.at_level(logging.WARNING, logger="maskprop.train.loop"):
        loop._warn_if_floor(11.0, 22.0, SparsityConfig(keep_ratio=0.1))
    assert "one channel of every group" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="maskprop.train.loop"):
        loop._warn_if_floor(11.1, 22.0, SparsityConfig(keep_ratio=0.1, budget_unit="flops"))
    assert [r.getMessage() for r in caplog.records] == [
        "at sparsity.keep_ratio=0.1 one channel of every group (kept even when a sample drops the whole group) costs "
        "11.1 of the budget's 22.0 channel-equivalents of FLOPs (50%): the search chooses among few channels, and its "
        "subnetwork computes more than the budget (docs/methods.md, \"A budget in FLOPs\")"]


def test_the_budget_spent_is_the_priced_sum_of_the_scores():
    """ChannelScores.spent: sum s, or sum w s with prices (normalised to mean 1), against a hand computation."""
    groups = {"a": 3, "b": 2}
    scores = ChannelScores(groups, 0.8)
    with torch.no_grad():
        scores.scores.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]))
    assert scores.spent() == pytest.approx(1.5)
    priced = ChannelScores(groups, 0.8, prices={"a": 1.0, "b": 4.0})
    with torch.no_grad():
        priced.scores.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]))
    w_a, w_b = 5 / 11, 20 / 11  # prices 1 and 4 over channels 3 and 2: mean 11 / 5
    assert priced.spent() == pytest.approx(w_a * 0.6 + w_b * 0.9)


@pytest.mark.usefixtures("one_thread")
def test_a_search_that_ends_below_its_budget_says_so(caplog):
    """The summary's fix records the share of the budget the scores spend at the end of the search; below SPENT_SHARE
    a warning says so. Probabilities held at 0.05 (an init below the budget, a score lr too small to move them) spend
    a tenth of keep 0.5; the default start spends all of it."""
    config = with_overrides(TINY_RUN, **{"optim.epochs": 1, "finetune.epochs": 0, "sparsity.init": 0.05,
                                         "sparsity.score_lr": 1e-12})
    with caplog.at_level(logging.WARNING, logger="maskprop.train.loop"):
        summary = maskprop.fit(config)
    assert summary["fix"]["budget_spent"] == pytest.approx(0.1, rel=1e-4)
    warnings = [r.getMessage() for r in caplog.records if "the search ended spending" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("the search ended spending 10% of its budget "
                                                         "(sparsity.keep_ratio=0.5)")
    assert "anneal steps" not in warnings[0]  # no anneal: nothing to say about the lr's travel in it
    caplog.clear()
    annealed = with_overrides(config, **{"optim.epochs": 2, "sparsity.anneal_epochs": 1})  # 2 steps an epoch
    with caplog.at_level(logging.WARNING, logger="maskprop.train.loop"):
        summary = maskprop.fit(annealed)
    assert summary["fix"]["budget_spent"] == pytest.approx(0.1, rel=1e-4)
    warnings = [r.getMessage() for r in caplog.records if "the search ended spending" in r.getMessage()]
    assert len(warnings) == 1 and "(sparsity.score_lr x anneal steps = 1e-12 x 2 = 2e-12, the most" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="maskprop.train.loop"):
        summary = maskprop.fit(with_overrides(config, **{"sparsity.init": None}))
    assert summary["fix"]["budget_spent"] == pytest.approx(1.0, abs=1e-4)
    assert "the search ended spending" not in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# Bad input


def test_a_random_subnetwork_of_a_dense_run_is_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="sparsity.fix='random'") as caught:
        maskprop.fit(tiny(method="dense", **{"sparsity.fix": "random"}))
    assert "\n" not in str(caught.value)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(json.dumps(TINY_RUN))
    assert main(["train", str(recipe), "--out", str(tmp_path / "out"), "method=dense", "sparsity.fix=random"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sparsity.fix='random'" in err[0] and not (tmp_path / "out").exists()


def test_the_random_baseline_ignores_an_anneal(caplog):
    """A recipe's search and its random baseline differ in sparsity.fix alone: the baseline has no probabilities to
    anneal, so its schedule has none (said in one log line), and its warm-up stays."""
    sparsity = SparsityConfig(fix="random", warmup_epochs=1, anneal_epochs=2)
    with caplog.at_level(logging.INFO, logger="maskprop.train.state"):
        schedule = search_schedule(sparsity, 32, 4)
    assert (schedule.warmup_steps, schedule.anneal_steps) == (4, 0)
    assert "sparsity.anneal_epochs=2 is ignored" in caplog.text
    searched = search_schedule(SparsityConfig(warmup_epochs=1, anneal_epochs=2), 32, 4)
    assert (searched.warmup_steps, searched.anneal_steps) == (4, 8)


@pytest.mark.usefixtures("one_thread")
def test_a_search_too_short_to_choose_says_so_once(caplog):
    """A search of fewer than STEPS_PER_CHANNEL sampled steps per prunable channel warns once at its start (warm-up
    steps sample nothing); the random baseline, dense runs and long enough searches do not."""
    channels = sum(maskprop.create_model("resnet20", num_classes=10).channel_groups().values())
    config = with_overrides(TINY_RUN, **{"optim.epochs": 2, "sparsity.warmup_epochs": 1, "finetune.epochs": 0})
    with caplog.at_level(logging.WARNING, logger="maskprop.train.loop"):
        maskprop.fit(config)
    warnings = [r.getMessage() for r in caplog.records if "score estimator needs" in r.getMessage()]
    assert warnings == [f"the search samples masks for 2 steps over {channels} prunable channels; the score "
                        f"estimator needs {loop.STEPS_PER_CHANNEL * channels} or more ({loop.STEPS_PER_CHANNEL}+ a "
                        "channel) to read a channel of typical importance, so the channels kept will be close to a "
                        "random choice of the same budget (docs/methods.md, \"How the search behaves early\"); "
                        "compare with sparsity.fix=random, a subnetwork of the same budget trained from the first "
                        "step, which ended level with such searches or above them in the short runs measured"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="maskprop.train.loop"):
        maskprop.fit(with_overrides(config, **{"sparsity.fix": "random"}))
        maskprop.fit(with_overrides(config, method="dense"))
        loop._warn_if_short(warmup_steps=10, search_steps=10 + loop.STEPS_PER_CHANNEL * channels, channels=channels)
        loop._warn_if_short(warmup_steps=10, search_steps=10, channels=channels)  # nothing sampled
    assert "score estimator needs" not in caplog.text


def test_the_fix_is_logged_as_a_sentence_with_units():
    """The log line of the fix names the sample chosen, its training accuracy, the others' range and the budget spent
    in percent (it printed the dict of fix_info, unrounded)."""
    info = {"rule": "best_of_n", "train_accuracies": [9.765625, 12.5, 9.0], "chosen": 1, "examples": 256,
            "budget_spent": 0.9987}
    assert loop._fix_line(info) == ("sample 2 of 3, training accuracy 12.5% on 256 examples (the others 9.0-9.8%); "
                                    "100% of the budget spent")
    assert loop._fix_line({"rule": "top_scores", "budget_spent": 0.5}) == "50% of the budget spent"
    one = {"rule": "best_of_n", "train_accuracies": [50.0], "chosen": 0, "examples": 8, "budget_spent": 1.0}
    assert loop._fix_line(one) == "sample 1 of 1, training accuracy 50.0% on 8 examples; 100% of the budget spent"
