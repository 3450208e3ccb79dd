"""Static-shape training steps (``maskprop.train.graphs``), run eagerly on the CPU: the search step's math against
``vrpge_step``, no host read or data-dependent shape in a whole step, capacity windows, exact resume, and the
``cuda_graphs`` setting's errors. Capturing them as CUDA graphs is checked on a GPU (tools/gpu_check.sh)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
import yaml
from conftest import TINY_RUN, load_tool, with_overrides
from test_static import _Recorder
from test_train import _assert_same_state
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import maskprop
from maskprop.cost import CostModel
from maskprop.models import import_models
from maskprop.sparse import random_mask
from maskprop.sparse.static import StaticExecutionState, choose_capacities, mask_capacities, rechoose_capacities
from maskprop.train import graphs, loop, setup, static_steps
from maskprop.train.checkpoint import load_checkpoint
from maskprop.train.config import SparsityConfig, load_config
from maskprop.train.distributed import all_reduce_sum
from maskprop.train.graphs import GraphsChoice, StaticSteps, resolve_cuda_graphs
from maskprop.train.meter import DeviceMeter
from maskprop.train.optim import score_optimizer, weight_optimizer
from maskprop.train.steps import StepContext, subnet_step, vrpge_step
from maskprop.train.summary import RunSummary
from maskprop.vrpge import ChannelScores

SIZE = (3, 16, 16)


@pytest.fixture
def static_run(monkeypatch):
    """Runs of ``maskprop.fit`` take the static steps, eagerly (what ``cuda_graphs`` selects on CUDA)."""
    monkeypatch.setattr(setup, "resolve_cuda_graphs", lambda cfg, device, model=None: GraphsChoice(True, False))


def _parts(dtype=torch.float64, clip=None, align=8, fused_scores=False, priced=False, name="resnet20"):
    torch.manual_seed(0)
    model = maskprop.create_model(name).to(dtype).train()
    groups = model.channel_groups()
    prices = CostModel(model, SIZE).channel_prices(0.5) if priced else None  # a budget in FLOPs
    scores = ChannelScores(groups, 0.5, dtype=dtype, prices=prices)
    with torch.no_grad():
        scores.scores.uniform_(0.2, 0.8, generator=torch.Generator().manual_seed(3))
    weights = weight_optimizer(model.parameters(), 0.1, 0.9, 5e-4)
    score_opt = (torch.optim.Adam([scores.scores], lr=0.05, fused=True) if fused_scores
                 else score_optimizer(scores.scores, 0.05))
    ctx = StepContext(criterion=nn.CrossEntropyLoss(), device=torch.device("cpu"), cost=CostModel(model, SIZE),
                      clip_grad_norm=clip, align=align)
    x = torch.randn(4, *SIZE, dtype=dtype, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3])
    return model, scores, (weights, score_opt), ctx, (x, y)


def _config(**overrides) -> object:
    return load_config(with_overrides(TINY_RUN, **overrides))


@pytest.mark.parametrize("estimator,weight_grad,clip,m2_first,name", [
    ("vrpge", "first", None, True, "resnet20"),
    ("vrpge", "first", 0.5, True, "resnet20"),
    ("vrpge", "first", None, False, "resnet20"),
    ("vrpge", "first", None, "off", "resnet20"),
    ("vrpge_sym", "both", 0.5, False, "resnet20"),
    ("vrpge", "first", None, True, "small_densenet"),  # examples/my_nets.py: layers reading concatenated groups
    ("vrpge", "first", None, True, "small_ghostnet"),  # and layers writing them
])
def test_static_search_step_equals_vrpge_step_on_the_same_masks_in_float64(estimator, weight_grad, clip, m2_first,
                                                                           name, monkeypatch, one_thread):
    """With both masks forced, one static search step gives the loss, weight and score gradients, updated weights and
    scores, and BatchNorm statistics of ``vrpge_step`` (compact execution) on the same masks: with the forward of
    ``m'`` first and its statistics added after those of ``m`` (``SearchStep.m2_first``), and with ``m`` first (two
    BatchNorm momenta in the model, ``m2_first=False``, or a backward of each mask)."""
    if name.startswith("small_"):
        monkeypatch.chdir(Path(__file__).resolve().parents[1])
        import_models("examples.my_nets")
    model, scores, optimizers, ctx, batch = _parts(clip=clip, name=name)
    if m2_first is False and weight_grad == "first":
        next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).momentum = 0.2
    groups = model.channel_groups()
    generator = torch.Generator().manual_seed(7)
    masks = [torch.cat(list(random_mask(groups, 0.5, generator).values())) for _ in range(2)]
    reference = copy.deepcopy((model, scores, optimizers))
    sparsity = SparsityConfig(estimator=estimator, weight_grad=weight_grad, alpha=0.5)
    cfg = _config(**{"sparsity.estimator": estimator, "sparsity.weight_grad": weight_grad})
    assert cfg.sparsity.alpha == sparsity.alpha

    # m and m' drawn together, from the rows of the step's uniforms (where the step prepares the next step's masks
    # beside the backward, also before the first step: the same masks twice)
    monkeypatch.setattr(ChannelScores, "mask_from_uniforms", lambda self, u: torch.stack(masks))
    static = StaticSteps(cfg, ctx, GraphsChoice(True, False), seed=0, m2_first=m2_first != "off")
    static.capacities = {g: n for g, n in groups.items()}  # no overflow: the masks as given
    result = static.search(model, scores, optimizers, batch)
    window = static.read()
    assert static._search[0].m2_first is (m2_first is True)
    assert static._search[0].m_ahead is (weight_grad == "first" and clip is None)

    ref_model, ref_scores, ref_optimizers = reference
    drawn = iter(masks)
    monkeypatch.setattr(ChannelScores, "sample_flat", lambda self, g: next(drawn).clone())
    expected = vrpge_step(ref_model, ref_scores, ref_optimizers, batch, torch.Generator(), sparsity, ctx)

    assert window.steps == window.pairs == 1 and window.count == 4
    assert window.loss / 4 == pytest.approx(expected.loss, rel=1e-12)
    assert window.loss2 / 4 == pytest.approx(expected.loss2, rel=1e-12)
    assert round(window.correct) == expected.correct
    assert window.grad_norm == pytest.approx(expected.grad_norm, rel=1e-10)
    assert window.kept == pytest.approx(expected.kept_ratio, rel=1e-12)
    assert result.count == 4 and result.dense_flops == expected.dense_flops
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=f"gradient of {name}")
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)
    for (name, b), c in zip(model.named_buffers(), ref_model.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(scores.scores.grad, ref_scores.scores.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(scores.scores, ref_scores.scores, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("per_call", [False, True])
def test_search_steps_drawing_their_masks_in_the_step_before_equal_those_drawing_them_at_their_start(
        one_thread, monkeypatch, per_call):
    """Drawing each step's ``m`` and ``m'`` in the step before, beside the backward (``m_ahead``, the default), changes
    when the masks are drawn, not what is computed: the generator gives every mask the same uniforms, so steps of either
    schedule end bit-identical (weights, scores, statistics, the step sums), a new window on the way included. Also
    where a draw's values depend on how the draws are split into calls, as a CUDA generator's do (``per_call``: each
    call's values from its own number): every mask has a draw of its own, in the same order."""

    def by_call(calls):
        def uniform_(tensor, *args, generator=None, **kwargs):
            values = torch.linspace(0, 1, tensor.numel() + 1, dtype=tensor.dtype)[:-1]
            return tensor.copy_(values.roll(37 * next(calls)).view_as(tensor))
        return uniform_

    runs = []
    for ahead in (True, False):
        model, scores, optimizers, ctx, batch = _parts(align=1)
        with monkeypatch.context() as patch:
            if per_call:
                patch.setattr(torch.Tensor, "uniform_", by_call(itertools.count(1)))
            static = StaticSteps(_config(), ctx, GraphsChoice(True, False), seed=0, m_ahead=ahead)
            static.capacities = {g: n // 2 for g, n in model.channel_groups().items()}  # cuts in some steps
            windows = []
            for step in range(4):
                if step == 2:
                    windows.append(dataclasses.astuple(static.read()))
                    static.end_search()
                    static.capacities = {g: n + 1 for g, n in static.capacities.items()}
                static.search(model, scores, optimizers, batch)
            assert static._search[0].m_ahead is ahead
            windows.append(dataclasses.astuple(static.read()))
        runs.append((model, scores, windows, static.overflow_steps))
    (model, scores, window, cut), (ref_model, ref_scores, ref_window, ref_cut) = runs
    assert window == ref_window and cut == ref_cut > 0
    assert torch.equal(scores.scores, ref_scores.scores)
    for (name, a), b in itertools.chain(zip(model.named_parameters(), ref_model.parameters()),
                                        zip(model.named_buffers(), ref_model.buffers())):
        assert torch.equal(a, b), name


def test_each_search_step_prepares_the_next_masks_from_the_scores_it_projected(one_thread):
    """With ``m_ahead`` (the default) a search step draws the next step's ``m`` and ``m'`` right after its projection,
    with one update: every step runs the masks its own start would have drawn (an ``update`` of each at the start of
    the step, from the scores as they are then and the uniforms drawn for it), across a new capacity window too (the
    uniforms carried over); their overflow cuts are counted when a step runs the masks, never for those prepared for a
    step that has not run."""
    model, scores, optimizers, ctx, batch = _parts(align=1)
    with torch.no_grad():  # above the budget (a keep ratio of 0.5): the first projection moves them down
        scores.scores.uniform_(0.6, 1.0, generator=torch.Generator().manual_seed(3))
    static = StaticSteps(_config(), ctx, GraphsChoice(True, False), seed=0)
    static.capacities = {g: n // 4 for g, n in model.channel_groups().items()}  # narrow: cuts in most steps
    first = scores.scores.new_empty(2, scores.num_channels)  # the uniforms of the first m and m', a draw each
    for row, generator in zip(first, itertools.repeat(torch.Generator().manual_seed(0))):
        row.uniform_(generator=generator)
    cuts = 0
    for step in range(5):
        if step == 3:  # a new window: its first masks are prepared again, from the uniforms drawn for them
            static.end_search()
            static.capacities = {g: n + 1 for g, n in static.capacities.items()}
            cuts = 0
        u = first if step == 0 else static._pending_uniforms()
        s_before = scores.scores.detach().clone()
        static.search(model, scores, optimizers, batch)
        body = static._search[0]
        assert body.m_ahead and not torch.equal(scores.scores.detach(), s_before)  # the scores moved: m follows
        reference = [StaticExecutionState(body.state_m.layout) for _ in range(2)]
        with torch.no_grad():
            moved = scores.scores.clone()
            scores.scores.copy_(s_before)
            for state, row in zip(reference, u):  # one mask at a time
                state.update(scores.mask_from_uniforms(row), row)
            scores.scores.copy_(moved)
        for state, ran in zip(reference, body.masks):
            for name, buffer in state.buffers().items():
                if not name.startswith("overflow"):
                    assert torch.equal(ran.buffers()[name], buffer), (step, name)
            cuts += int(state.overflow_channels.sum())
        assert sum(int(s.overflow_channels.sum()) for s in body.masks) == cuts > 0, step
        assert int(body.next_masks._rows.overflow_channels.sum()) > 0  # the next masks', counted when a step takes them


def test_static_plain_steps_equal_subnet_step_in_float64(one_thread):
    """The dense step and the fixed-mask step equal ``subnet_step`` without and with the mask: weights, BatchNorm
    statistics and batch counts (which the static steps add with one multi-tensor add)."""
    model, _, (weights, _), ctx, batch = _parts()
    mask = random_mask(model.channel_groups(), 0.5, torch.Generator().manual_seed(5))
    cfg = _config()
    for fixed in (None, mask):
        ref_model = copy.deepcopy(model)
        ref_opt = weight_optimizer(ref_model.parameters(), 0.1, 0.9, 5e-4)
        ref_opt.load_state_dict(copy.deepcopy(weights.state_dict()))  # its tensors, not shared ones
        static = StaticSteps(cfg, ctx, GraphsChoice(True, False), seed=0)
        result = static.plain(model, weights, batch, fixed)
        window = static.read()
        expected = subnet_step(ref_model, ref_opt, batch, fixed, ctx)
        assert window.loss / 4 == pytest.approx(expected.loss, rel=1e-12)
        assert window.kept == pytest.approx(expected.kept_ratio)
        if fixed is not None:  # the capacities are the aligned kept counts, as compact's aligned widths
            assert result.flops == expected.flops
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        buffers = dict(ref_model.named_buffers())
        assert any(k.endswith("num_batches_tracked") for k in buffers)
        for k, b in model.named_buffers():
            torch.testing.assert_close(b, buffers[k], rtol=1e-12, atol=1e-14, msg=k)



def test_static_plain_steps_log_the_gradient_norm_before_clipping(one_thread):
    """The dense and the fixed-mask step log the L2 norm of the weight gradients by hand (float64), before a tight
    ``clip_grad_norm`` scales them down."""
    model, _, _, ctx, batch = _parts()
    mask = random_mask(model.channel_groups(), 0.5, torch.Generator().manual_seed(5))
    for fixed in (None, mask):
        reference = copy.deepcopy(model)
        with maskprop.sparse.use_mask(reference, fixed, "masked"):
            nn.functional.cross_entropy(reference(batch[0]).float(), batch[1]).backward()  # the steps' float32 loss
        norm = sum(float(p.grad.pow(2).sum()) for p in reference.parameters() if p.grad is not None) ** 0.5
        static = StaticSteps(_config(), dataclasses.replace(ctx, clip_grad_norm=norm / 4), GraphsChoice(True, False),
                             seed=0)
        model_ = copy.deepcopy(model)
        static.plain(model_, weight_optimizer(model_.parameters(), 0.1, 0.9, 5e-4), batch, fixed)
        assert static.read().grad_norm == pytest.approx(norm, rel=1e-7)


def _forced_search_window(monkeypatch, masks, reduce_stats=None):
    """One static search step whose ``m`` and ``m'`` are ``masks`` (flat, forced through ``mask_from_uniforms``, at
    full capacities: no overflow), read as its window: ``(window, loss of m, loss of m')`` with the losses of the two
    subnetworks by hand (masked execution, the loss in float32 as the steps take it)."""
    model, scores, optimizers, ctx, batch = _parts()
    groups = model.channel_groups()
    losses = []
    for flat in masks:
        mask = dict(zip(groups, flat.split(list(groups.values()))))
        reference = copy.deepcopy(model)
        with torch.no_grad(), maskprop.sparse.use_mask(reference, mask, "masked"):
            losses.append(float(nn.functional.cross_entropy(reference(batch[0]).float(), batch[1])))
    with monkeypatch.context() as patch:
        patch.setattr(ChannelScores, "mask_from_uniforms", lambda self, u: torch.stack(masks))
        static = StaticSteps(_config(), dataclasses.replace(ctx, reduce_stats=reduce_stats), GraphsChoice(True, False),
                             seed=0)
        static.capacities = dict(groups)
        static.search(model, scores, optimizers, batch)
        return static.read(), losses


def _uneven_masks():
    """Two flat masks of ResNet-20 with different kept counts (a quarter and three quarters of each group)."""
    groups = maskprop.create_model("resnet20").channel_groups()
    return [torch.cat(list(random_mask(groups, keep, torch.Generator().manual_seed(seed)).values()))
            for keep, seed in ((0.25, 1), (0.75, 2))]


def test_a_search_window_logs_the_loss_gap_and_the_kept_ratio_of_m(monkeypatch, one_thread):
    """A search step's window holds ``|L(m) - L(m')|`` (whichever loss is larger: both orders of two masks) and the
    kept ratio of ``m``, not of ``m'``, against the losses and kept counts by hand."""
    small, large = _uneven_masks()
    signs = set()
    for masks in ((small, large), (large, small)):
        window, (loss_m, loss_m2) = _forced_search_window(monkeypatch, list(masks))
        assert window.loss / 4 == pytest.approx(loss_m, rel=1e-6)
        assert window.loss2 / 4 == pytest.approx(loss_m2, rel=1e-6)
        assert window.loss_gap == pytest.approx(abs(loss_m - loss_m2), rel=1e-4)
        assert window.kept == pytest.approx(float(masks[0].sum()) / masks[0].numel(), rel=1e-12)
        signs.add(loss_m < loss_m2)
    assert signs == {True, False}


def test_batches_counted_at_once_as_torch_s_layers_count_them():
    """One training forward inside the block counts one batch in every BatchNorm layer (a ``momentum=None`` layer
    counting itself, as it must for its average), with the same statistics as torch's counting; eval forwards and a
    block that raises count nothing, and the layers keep their own counter tensors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.BatchNorm2d(4, momentum=None), nn.BatchNorm2d(4, momentum=0.3))
    reference = copy.deepcopy(model)
    counters = [m.num_batches_tracked for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    x = torch.randn(2, 3, 8, 8)
    for _ in range(2):
        with static_steps.batches_counted_at_once(model):
            model(x)
        reference(x)
    assert [int(c) for c in counters] == [2, 2, 2]
    assert [m.num_batches_tracked for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == counters  # the same
    for (k, b), (_, r) in zip(model.named_buffers(), reference.named_buffers()):
        assert torch.equal(b, r), k
    model.eval()
    with static_steps.batches_counted_at_once(model):
        model(x)
    model.train()
    with pytest.raises(RuntimeError), static_steps.batches_counted_at_once(model):
        model(x[:, :2])  # a wrong input: the forward fails
    assert [int(c) for c in counters] == [2, 2, 2]
    assert all(m.num_batches_tracked is c for m, c in zip(
        (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)), counters))
    assert not any(m._forward_pre_hooks for m in model.modules())  # the counting hooks go with the block, error or not


@pytest.mark.parametrize("priced,ranks,clip", [(False, False, 1.0), (True, False, 1.0), (False, True, 1.0),
                                               (False, False, None), (False, True, None)])
def test_whole_static_steps_have_no_host_read_and_no_data_dependent_shape(one_thread, request, priced, ranks, clip):
    """A search step (sampling, the masks' update, both forwards, backward, clipping, SGD, Adam, projection, onto a
    budget in channels or in FLOPs), a fixed-mask step and a dense step issue none of the operations a captured graph
    cannot hold; nor do their pieces around the gradient average (``ranks``: as under torchrun, in a process group of
    one rank). Without clipping the search step prepares the next step's masks after its projection and takes them
    at its start (``m_ahead``), under torchrun in three pieces. (The score Adam is the fused one here: the CPU's plain
    Adam reads its step count to the host; on CUDA it is ``capturable``.)"""
    model, scores, optimizers, ctx, batch = _parts(dtype=torch.float32, clip=clip, fused_scores=True, priced=priced)
    if ranks:
        request.getfixturevalue("single_process_group")
        ctx = dataclasses.replace(ctx, reduce_stats=all_reduce_sum)
    static = StaticSteps(_config(), ctx, GraphsChoice(True, False), seed=0)
    mask = random_mask(model.channel_groups(), 0.5, torch.Generator().manual_seed(5))
    for _ in range(2):  # the first steps create the optimizers' state
        static.search(model, scores, optimizers, batch)
        static.plain(model, optimizers[0], batch, mask)
        static.plain(model, optimizers[0], batch)
    static.plain(model, optimizers[0], batch, mask)
    for run in (lambda: static.search(model, scores, optimizers, batch),
                lambda: static.plain(model, optimizers[0], batch, mask),
                lambda: static.plain(model, optimizers[0], batch)):
        with _Recorder() as recorder:
            run()
        assert recorder.calls > 100
        assert not recorder.found, recorder.found
    assert static._search[0].m_ahead is (clip is None)
    assert static.read().steps == 10


def test_the_capacity_windows_of_a_run_whose_scores_move(static_run, monkeypatch, one_thread):
    """An annealed budget moves the scores: the capacities are re-chosen at the reads, every change builds a new
    window, and the summary counts them."""
    built: list[dict[str, int]] = []
    original = static_steps.SearchStep.__init__

    def counting(self, model, scores, optimizers, sparsity, ctx, capacities, *args, **kwargs):
        built.append(dict(capacities))
        original(self, model, scores, optimizers, sparsity, ctx, capacities, *args, **kwargs)

    monkeypatch.setattr(static_steps.SearchStep, "__init__", counting)
    config = with_overrides(TINY_RUN, **{"optim.epochs": 3, "sparsity.anneal_epochs": 2, "log_every": 1})
    summary = maskprop.fit(config)
    report = summary["static_steps"]
    assert report["captured"] is False and report["graph_captures"] == 0
    assert len(built) >= 2 and report["search_windows"] == len(built)
    assert report["search_shapes"] == len({tuple(c.values()) for c in built})
    assert all(a != b for a, b in itertools.pairwise(built))  # a new window only for new capacities
    assert sum(built[-1].values()) < sum(built[0].values())  # the budget fell: narrower


def test_static_steps_run_eagerly_with_adam_on_the_weights(static_run, one_thread):
    """What ``cuda_graphs: auto`` runs on CUDA with Adam on the weights, which cannot be captured: the static steps,
    eagerly, through the search and the finetune."""
    summary = maskprop.fit(with_overrides(TINY_RUN, **{"optim.optimizer": "adam", "optim.lr": 1e-3}))
    report = summary["static_steps"]
    assert report["captured"] is False and report["search_windows"] >= 1
    assert summary["steps"]["search"] > 0 and summary["steps"]["finetune"] > 0
    assert RunSummary.from_dict(summary).static_steps == report  # a field of the summary's schema: report reads it


def _stopped_in_the_second_epoch(config: dict, out: Path, monkeypatch) -> None:
    """Run ``config`` into ``out`` and stop it (as a Ctrl-C would) when its second epoch starts."""
    original, calls = loop.train_one_epoch, {"n": 0}

    def stop_at_the_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "train_one_epoch", stop_at_the_second_epoch)
        with pytest.raises(KeyboardInterrupt):
            maskprop.fit(config, out=out)
    assert load_checkpoint(out / "last.pt")["epoch"] == 1


def test_resume_with_static_steps_continues_exactly(static_run, monkeypatch, tmp_path, one_thread):
    config = with_overrides(TINY_RUN, **{"optim.epochs": 3, "sparsity.anneal_epochs": 1, "log_every": 1,
                                         "save_every": 1, "finetune.narrow": False})
    maskprop.fit(config, out=tmp_path / "straight")
    _stopped_in_the_second_epoch(config, tmp_path / "stopped", monkeypatch)
    maskprop.fit(config, out=tmp_path / "stopped", resume=True)
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "stopped" / "last.pt")
    _assert_same_state(a, b)
    tensors = ("generator", "next_uniforms")  # the search's state: its generator, the uniforms of its next masks
    assert a["static"]["next_uniforms"].shape == (2, sum(maskprop.create_model("resnet20").channel_groups().values()))
    for key in tensors:
        assert torch.equal(a["static"][key], b["static"][key]), key
    assert {k: v for k, v in a["static"].items() if k not in tensors} == \
        {k: v for k, v in b["static"].items() if k not in tensors}


def test_a_checkpoint_with_the_uniforms_of_the_next_m_alone_resumes_as_it_would_have(one_thread):
    """Checkpoints of the version that prepared only the next ``m`` ahead kept its uniforms alone, and the generator
    before those of ``m'``: a step resumed from one draws them first and runs the masks that version would have run
    (those of a checkpoint holding both rows, the generator one draw further)."""
    runs = []
    for old in (True, False):
        model, scores, optimizers, ctx, batch = _parts(align=1)
        static = StaticSteps(_config(), ctx, GraphsChoice(True, False), seed=0)
        u_m = torch.rand(scores.num_channels, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        if old:
            static._next_uniforms = u_m
        else:
            u_m2 = torch.empty_like(u_m).uniform_(generator=static.generator)  # m''s, drawn by the generator next
            static._next_uniforms = torch.stack([u_m, u_m2])
        for _ in range(2):
            static.search(model, scores, optimizers, batch)
        runs.append((model, scores, static._search[0].masks))
    (model, scores, masks), (ref_model, ref_scores, ref_masks) = runs
    for a, b in zip(masks, ref_masks):
        assert torch.equal(a.mask_used, b.mask_used)
    assert torch.equal(scores.scores, ref_scores.scores)
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(a, b), name


def test_a_run_captured_on_a_gpu_resumes_where_nothing_is_captured(monkeypatch, tmp_path, one_thread):
    """A captured run saves its score Adam capturable (its step counts on the GPU); resumed on the CPU (or with
    ``cuda_graphs: false``) the flag must go, or torch's Adam refuses the first step."""
    from maskprop.train.checkpoint import save_checkpoint

    config = with_overrides(TINY_RUN, **{"optim.epochs": 3, "save_every": 1})
    _stopped_in_the_second_epoch(config, tmp_path / "run", monkeypatch)
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["phase"] == "search"
    for group in checkpoint["optimizers"]["scores"]["param_groups"]:
        group["capturable"] = group["fused"] = True  # as the captured run saved it
    checkpoint.pop("format")
    save_checkpoint(checkpoint, tmp_path / "run" / "last.pt")
    summary = maskprop.fit(config, out=tmp_path / "run", resume=True)
    assert summary["steps"]["search"] > checkpoint["counters"]["search_steps"]


# --- the setting ------------------------------------------------------------------------------------------------------

CUDA = torch.device("cuda")


def test_evaluating_a_mask_turns_cudnn_benchmark_mode_off_for_its_new_widths(monkeypatch):
    """The static steps turn cuDNN's benchmark mode on (fixed shapes); a mask's compact evaluation, and the fix's
    candidates, bring widths the run has not met, each of whose convolution shapes the mode would time again: off
    there, back on after (also after an error); a dense or narrow evaluation keeps it."""
    model = maskprop.create_model("resnet20").eval()
    seen = []
    model.register_forward_pre_hook(lambda *_: seen.append(torch.backends.cudnn.benchmark))
    model.register_forward_hook(lambda module, args, out: seen.append("grad") if out.requires_grad else None)
    mask = random_mask(model.channel_groups(), 0.5, torch.Generator().manual_seed(0))
    ctx = StepContext(criterion=nn.CrossEntropyLoss(), device=torch.device("cpu"), cost=CostModel(model, SIZE))
    loader = [(torch.randn(2, *SIZE), torch.tensor([0, 1]))]
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    loop.evaluate(model, loader, mask, ctx)
    assert seen and not any(seen)
    seen.clear()
    loop.evaluate(model, loader, None, ctx)
    assert seen == [True] and torch.backends.cudnn.benchmark
    with pytest.raises(RuntimeError):
        loop.evaluate(model, [(torch.randn(2, 1, 16, 16), torch.tensor([0, 1]))], mask, ctx)
    assert torch.backends.cudnn.benchmark


def test_a_failed_capture_names_the_error_that_started_it():
    """torch's end of a capture raises an error of its own when the step raised inside it; the warning (or error)
    names both, the step's first."""
    try:
        try:
            raise RuntimeError("operation not permitted when stream is capturing")
        except RuntimeError:
            raise RuntimeError("operation failed due to a previous error during capture") from None
    except RuntimeError as err:
        reason = graphs._reason(err)
    assert reason == ("RuntimeError: operation failed due to a previous error during capture; first RuntimeError: "
                      "operation not permitted when stream is capturing")
    assert graphs._reason(ValueError("alone")) == "ValueError: alone"


def test_cuda_graphs_true_needs_a_cuda_device():
    with pytest.raises(ValueError, match=r"^cuda_graphs=true needs a CUDA device; device resolves to 'cpu'$"):
        resolve_cuda_graphs(_config(cuda_graphs=True), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"device resolves to 'mps'"):
        resolve_cuda_graphs(_config(cuda_graphs=True), torch.device("mps"))
    assert resolve_cuda_graphs(_config(), torch.device("cpu")) == GraphsChoice(False, False)
    assert resolve_cuda_graphs(_config(cuda_graphs=False), CUDA) == GraphsChoice(False, False)
    assert resolve_cuda_graphs(_config(), CUDA) == GraphsChoice(True, True, strict=False)
    assert resolve_cuda_graphs(_config(cuda_graphs=True), CUDA) == GraphsChoice(True, True, strict=True)


def test_cuda_graphs_true_on_the_cpu_stops_a_run():
    with pytest.raises(ValueError, match=r"cuda_graphs=true needs a CUDA device; device resolves to 'cpu'"):
        maskprop.fit(with_overrides(TINY_RUN, cuda_graphs=True, device="cpu"))


@pytest.mark.parametrize("overrides,reason,static", [
    ({"method": "sbp"}, r"method='sbp' picks its backward's units by top-k", False),
    ({"method": "meprop", "sbp.sparsifier": "topk"}, r"method='meprop'", False),
    ({"method": "msbp", "sbp.memory": 0.5}, r"method='msbp'", False),
    ({"sync_bn": True}, r"sync_bn=true all-gathers BatchNorm statistics between ranks inside the forward", True),
    ({"optim.optimizer": "adam"}, r"optim.optimizer='adam' is not the fused SGD", True),
])
def test_what_cannot_be_captured_is_an_error_with_true_and_eager_with_auto(overrides, reason, static, caplog):
    """With ``auto``, a run that cannot be captured takes the static-shape steps eagerly where they can run (sync_bn,
    Adam on the weights), and the eager steps of ``steps.py`` where they cannot (data-dependent top-k). Torchrun alone
    is captured (the ranks' all-reduces run between its graphs)."""
    with pytest.raises(ValueError, match=rf"^cuda_graphs=true cannot capture this run: {reason}.*; expected "
                                         r"cuda_graphs=auto or false$"):
        resolve_cuda_graphs(_config(cuda_graphs=True, **overrides), CUDA)
    with caplog.at_level(logging.INFO, logger="maskprop.train.graphs"):
        choice = resolve_cuda_graphs(_config(**overrides), CUDA)
    assert choice.static == static and not choice.capture and choice.reason
    said = ("static-shape steps, run eagerly (not captured)" if static else "eager steps")
    assert [r.getMessage() for r in caplog.records] == [f"cuda_graphs=auto: {said}, since {choice.reason}"]


def test_the_report_says_why_static_steps_were_not_captured():
    _, _, _, ctx, _ = _parts()
    choice = resolve_cuda_graphs(_config(sync_bn=True), CUDA)
    assert StaticSteps(_config(), ctx, choice, seed=0).report()["not_captured_because"] == choice.reason
    assert StaticSteps(_config(), ctx, GraphsChoice(True, True), seed=0).report()["not_captured_because"] is None


def test_cumulative_batchnorm_cannot_be_captured():
    model = maskprop.create_model("resnet20")
    model.bn1.momentum = None
    with pytest.raises(ValueError, match=r"BatchNorm 'bn1' has momentum=None"):
        resolve_cuda_graphs(_config(cuda_graphs=True), CUDA, model=model)
    choice = resolve_cuda_graphs(_config(), CUDA, model=model)
    assert choice.static and not choice.capture


def test_maskprop_models_use_a_float_batchnorm_momentum():
    """``SparseBatchNorm2d._momentum`` reads ``num_batches_tracked`` on the host only when momentum is None."""
    for name in maskprop.list_models():
        model = maskprop.create_model(name)
        assert all(m.momentum is not None for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


@pytest.mark.parametrize("value", ["1", "yes please", "null", "Auto"])
def test_bad_cuda_graphs_values_are_one_line(value):
    with pytest.raises(ValueError, match=r"^cuda_graphs=.* is not a valid choice; expected 'auto', true or false$"):
        load_config(None, [f"cuda_graphs={value}"])


def test_a_capacity_below_the_alignment_stays_an_error(one_thread):
    model, _, (weights, _), ctx, batch = _parts(align=8)
    mask = random_mask(model.channel_groups(), 0.5, torch.Generator().manual_seed(5))
    static = StaticSteps(_config(), ctx, GraphsChoice(True, False), seed=0)
    static.capacities = {g: c for g, c in mask_capacities(mask, 8).items()}
    first = next(iter(static.capacities))
    static.capacities[first] = 4
    scores = ChannelScores(model.channel_groups(), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"capacity 4 of group '{first}' is below the alignment 8"):
        static.search(model, scores, (weights, score_optimizer(scores.scores, 0.1)), batch)


def test_a_lower_capacity_quantile_gives_narrower_steps_and_counts_its_cuts(static_run, one_thread):
    """``sparsity.capacity_quantile`` sets the capacities the static steps run at (the quantile of each group's kept
    count, aligned); a lower one is narrower, cuts more masks, and the summary counts the cuts."""
    config = with_overrides(TINY_RUN, **{"optim.epochs": 1, "finetune.epochs": 0, "sparsity.keep_ratio": 0.5,
                                         "sparsity.align": 4, "log_every": 1})
    reports = {}
    for quantile in (0.999, 0.6):
        reports[quantile] = maskprop.fit(with_overrides(config, **{"sparsity.capacity_quantile": quantile})
                                         )["static_steps"]
    groups = maskprop.create_model("resnet20", num_classes=10).channel_groups()
    scores = ChannelScores(groups, 0.5, 0.5)
    for quantile, report in reports.items():
        assert report["capacities"] == choose_capacities(scores, 4, quantile)
    assert sum(reports[0.6]["capacities"].values()) < sum(reports[0.999]["capacities"].values())
    assert reports[0.6]["overflow_steps"] > reports[0.999]["overflow_steps"]
    assert reports[0.6]["overflow_channels"] > 0


def test_capacity_quantile_outside_its_range_is_one_line():
    for value in (0.3, 1.0):
        with pytest.raises(ValueError, match=r"sparsity.capacity_quantile"):
            load_config(None, [f"sparsity.capacity_quantile={value}"])


def test_the_windows_tool_reports_a_run_s_windows_within_its_bound(tmp_path, capsys, one_thread):
    """tools/static_windows.py runs a recipe with the static steps on the CPU: at most one window per search epoch
    after the warm-up, the report's counts equal the windows it lists, and the patches are undone after."""
    original = static_steps.SearchStep.__init__
    tool, recipe = load_tool("static_windows"), _search_recipe(tmp_path, epochs=4, anneal=2)
    assert tool.main([str(recipe), "--json", str(tmp_path / "w.json")]) == 0
    result = json.loads((tmp_path / "w.json").read_text())
    windows, report = result["windows"], result["static_steps"]
    assert 2 <= report["search_windows"] == len(windows) <= 4 - 1
    assert report["search_shapes"] == len({tuple(w.values()) for w in windows})
    assert all(c % 8 == 0 or c < 8 for w in windows for c in w.values())  # align 8, as CUDA runs use
    assert f"{report['search_windows']} search windows" in capsys.readouterr().out
    assert setup.resolve_cuda_graphs is resolve_cuda_graphs and static_steps.SearchStep.__init__ is original
    assert tool.main([str(recipe), "optim.epochs=zero"]) == 2
    assert "optim.epochs" in capsys.readouterr().err


def _search_recipe(folder: Path, epochs: int, anneal: int) -> Path:
    """A tiny recipe of a short search (one warm-up epoch, then an anneal), written into ``folder``."""
    recipe = folder / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(with_overrides(TINY_RUN, **{"optim.epochs": epochs, "sparsity.warmup_epochs": 1,
                                                                  "sparsity.anneal_epochs": anneal})))
    return recipe


def _count_tool():
    return load_tool("count_static_ops")


@pytest.mark.parametrize("blocks,backward,total,critical,join", [
    # m' first: pre 10, m's update and forward A 60 beside m''s B 50; then the tail T 20 beside the backward W 30;
    # post 30. The backward outlasts the tail: 10 + max(60 + 30, max(60, 50) + 20) + 30
    ([(10, 50), (70, 20)], 30, 200, 130, None),
    # the tail outlasts the backward (vgg19_bn's case): 10 + max(60 + 30, 60 + 45) + 30
    ([(10, 50), (70, 45)], 30, 225, 145, None),
    # m' after m's forward: one block (B = 0), its forward and tail T 120 beside the backward W 30: 0 + max(80 + 30,
    # 80 + 120) + 20
    ([(80, 120)], 30, 250, 220, None),
    # torchrun's three pieces, the streams joined after the forwards (at launch 125: pre 5, B 70, A 50), mid 5, then
    # the tail T 40 beside the backward W 60, post 20: 5 + max(50, 70) + 5 + max(60, 40) + 20
    ([(5, 70), (60, 40)], 60, 250, 160, 125),
    # the same, the tail longer than the backward: 5 + 70 + 5 + 80 + 20
    ([(5, 70), (60, 80)], 60, 290, 180, 125),
])
def test_the_count_tool_s_critical_path_by_hand(blocks, backward, total, critical, join):
    """``tools/count_static_ops.py``'s critical path of two streams, against the schedule worked out by hand."""
    streams = _count_tool().Streams()
    streams.blocks, streams.backward, streams.join = blocks, backward, join
    summary = streams.summary(total)
    assert summary == {"main": total - sum(n for _, n in blocks), "side": sum(n for _, n in blocks),
                       "critical": critical}


def test_static_steps_take_their_gradients_fresh_and_norm_them_in_one_go():
    """Counted on ``meta`` as CUDA runs them (``tools/count_static_ops.py``): the backward of every static step writes
    the gradients themselves (set to ``None`` before it) instead of adding into zeroed ones, one launch per parameter
    saved, and the gradient norm takes the multi-tensor route; the search step adds the forward of ``m'``, the two
    mask updates, the score gradient and the projection to a dense step's launches, not a second set of per-parameter
    ones."""
    counts = _count_tool().whole_steps("resnet20", 0.5, 8, 8)
    params = len(list(maskprop.create_model("resnet20").parameters()))
    dense_adds = counts["dense step"].names["add_"]  # in-place adds of the forward (the residual additions)
    assert dense_adds < params // 2  # none per parameter
    for kind in ("dense step", "static search step", "fixed-mask step", "narrow step"):
        ops, forwards = counts[kind], 2 if kind == "static search step" else 1
        updates = 1 if kind == "static search step" else 0  # m and m' together: their ties and overflows in place
        assert ops.names["add_"] <= forwards * dense_adds + 2 * updates, (kind, ops.names["add_"], dense_adds)
        assert ops.names["linalg_vector_norm"] <= 1 and ops.names["_foreach_norm"] == 1, kind
        # every pass counts its batch in all BatchNorm layers with one multi-tensor add, not one add_ per layer as
        # torch's layers do (the search step adds one: the overflow counts of the m it takes from the step before)
        assert ops.names["_foreach_add_"] == forwards + (kind == "static search step"), kind
    fixed = counts["fixed-mask step"].names
    assert fixed["add_"] == dense_adds == counts["narrow step"].names["add_"]
    dense, search = counts["dense step"].launches, counts["static search step"].launches
    projection = counts["projection"].launches  # a fixed sequence of kernels whatever the model (sort, cumsum, ...)
    assert 0 < projection <= 50 and dense < search - projection < 2.5 * dense
    # one mask's sampling (the empty-group policy included) and update: small kernels; a search step's two masks with
    # one update, of the same launches
    assert 0 < counts["mask update"].launches <= 40
    assert counts["mask update, m and m' together"].launches == counts["mask update"].launches
    # on CUDA the forward of m' and the score update run on a side stream: what stays on the main one
    main, side, critical = (counts[f"static search step, {part}"].launches
                            for part in ("main stream", "side stream", "critical path"))
    assert main + side == search and dense < main < 1.5 * dense and side > projection + counts["dense step"].names[
        "convolution"]
    # m' goes first, its forward beside m's; the score update and the next step's masks beside m's backward: the step
    # starts with a copy of those masks' buffers (three copies, one per dtype, and two for their overflow counts)
    # instead of their update, which moved to the side stream
    at_start = [counts[f"search step, m drawn at its start, {stream} stream"].launches for stream in ("main", "side")]
    assert main == at_start[0] - counts["mask update"].launches + 5 and side == at_start[1] + counts[
        "mask update"].launches
    assert critical >= max(main, side) and counts["search step, m drawn at its start, critical path"].launches >= \
        at_start[0]
    # under torchrun: a few launches more (packing, division, global losses, the two collectives); the score update
    # and the next masks still run beside the backward, from the losses summed over the ranks after the forwards, where
    # the streams join: the critical path is the longer forward, then the longer of the backward and the score update
    ranked = counts["torchrun search step"].launches
    ranked_main, ranked_side, ranked_critical = (counts[f"torchrun search step, {part}"].launches
                                                 for part in ("main stream", "side stream", "critical path"))
    assert ranked_main + ranked_side == ranked and search < ranked <= search + 20
    assert ranked_main <= main + 15 and side <= ranked_side <= side + 5
    assert max(ranked_main, ranked_side) < ranked_critical < ranked - counts["projection"].launches


def test_a_failed_capture_tries_the_step_s_simpler_form_first(caplog):
    """The search step's capture with the forward of m' on a side stream has a fallback: if capturing it fails, the
    step drops the side stream and is captured again after a new warm-up; only a failure of that one gives up (an
    error with ``cuda_graphs: true``, eager steps with ``auto``)."""
    calls = []
    graph = graphs.StepGraph(lambda x, y: calls.append("two streams"), "search", torch.device("cpu"), False, 8, [],
                             strict=True, fallback=lambda: lambda x, y: calls.append("one stream"))
    graph._warm = graphs.WARMUP_STEPS
    with caplog.at_level(logging.WARNING, logger="maskprop.train.graphs"):
        graph._give_up(RuntimeError("operation not permitted when stream is capturing"))
    assert "capturing its simpler form instead" in caplog.text and graph.fallback is None and graph._warm == 0
    graph.body(None, None)
    assert calls == ["one stream"]
    with pytest.raises(RuntimeError, match="cannot be captured as a CUDA graph.*cuda_graphs=auto"):
        graph._give_up(RuntimeError("again"))
    lenient = graphs.StepGraph(lambda x, y: None, "search", torch.device("cpu"), False, 8, [], strict=False)
    lenient.capture = True
    lenient._give_up(RuntimeError("no"))
    assert lenient.capture is False


def test_a_search_step_that_failed_before_committing_m2_statistics_leaves_the_next_step_clean(monkeypatch,
                                                                                              one_thread):
    """A step that raises after the forward of ``m'`` and before its statistics are committed (as a failed capture
    does, whose kernels never ran) leaves a deferred pass behind; the next step discards it and runs as a step from
    the same state would, and the layout made its zero rows up front (none is made inside a step)."""
    model, scores, optimizers, ctx, batch = _parts()
    static = StaticSteps(_config(), ctx, GraphsChoice(True, False), seed=0)
    static.search(model, scores, optimizers, batch)
    step = static._search[0]
    plan = step.state_m.layout.plan
    rows = dict(plan._zero_rows)
    assert step.m2_first and rows
    original = static_steps.SearchStep._forward_m

    def failing(self, *args):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(static_steps.SearchStep, "_forward_m", failing)
    with pytest.raises(RuntimeError, match="capture failed"):
        static.search(model, scores, optimizers, batch)
    assert step.state_m2._deferred is not None  # the failed step's pass, never committed
    monkeypatch.setattr(static_steps.SearchStep, "_forward_m", original)
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    static.search(model, scores, optimizers, batch)
    assert step.state_m2._deferred is None and plan._zero_rows == rows
    counts = [k for k in buffers if k.endswith("num_batches_tracked")]
    assert all(int(dict(model.named_buffers())[k]) == int(buffers[k]) + 2 for k in counts)  # m and m', once each


def test_the_static_search_step_offers_its_one_stream_form():
    step = static_steps.SearchStep.__new__(static_steps.SearchStep)
    step.side_stream = object()
    assert step.one_stream() is step and step.side_stream is None


def test_the_first_search_window_lets_the_warm_ups_dense_step_go():
    """A search never returns to its dense warm-up: building its first window drops the warm-up's step (on a GPU its
    graph and memory pool, a dense step's activations), whose captures still count in the report."""
    model, scores, optimizers, ctx, batch = _parts(align=1)
    static = StaticSteps(_config(), ctx, GraphsChoice(True, False), seed=0)
    static.plain(model, optimizers[0], batch)
    assert static._other is not None
    static._other[2].captures = 1  # as a captured warm-up's graph would have counted
    static.search(model, scores, optimizers, batch)
    assert static._other is None and static.report()["graph_captures"] == 1


def test_later_search_windows_warm_up_once_and_keep_a_failed_overlap_off(monkeypatch, one_thread):
    """The first search window (and every other step kind) warms up ``WARMUP_STEPS`` eager steps before its capture;
    a later search window, once a search step was captured in the process, only ``NEW_WINDOW_WARMUP_STEPS`` (new
    widths, the same model, optimizers and streams). A two-stream search step whose capture fell back to one stream
    builds its later windows on one stream."""
    model, scores, optimizers, ctx, batch = _parts(torch.float32)
    static = StaticSteps(_config(), ctx, GraphsChoice(True, False), seed=0)
    made = []
    original = static_steps.SearchStep.__init__

    def with_a_side_stream(self, *args, **kwargs):  # as on CUDA: the step has a side stream while overlap is on
        original(self, *args, **kwargs)
        self.side_stream = object() if args[7] else None  # overlap
        made.append(self)

    monkeypatch.setattr(static_steps.SearchStep, "__init__", with_a_side_stream)
    # no CUDA stream to run on
    monkeypatch.setattr(static_steps.SearchStep, "__call__", lambda self, images, labels: None)
    warmups = []
    for window in range(3):
        static.search(model, scores, optimizers, batch)
        body, graph = static._search
        warmups.append(graph.warmup)
        if window == 0:
            assert graph.fallback is not None
            assert graph.fallback() is body and body.side_stream is None and static.overlap is False
        graph.captures = 1  # as a captured graph on CUDA
        static.end_search()  # new capacities: the next step builds a new window
    assert warmups == [graphs.WARMUP_STEPS, graphs.NEW_WINDOW_WARMUP_STEPS, graphs.NEW_WINDOW_WARMUP_STEPS]
    assert [step.side_stream is None for step in made] == [True, True, True] and static._search is None
    monkeypatch.undo()
    assert static.report()["graph_captures"] == 3
    fresh = StaticSteps(_config(), ctx, GraphsChoice(True, False), seed=0)  # a new process (a resumed run)
    fresh.search(model, scores, optimizers, batch)
    assert fresh._search[1].warmup == graphs.WARMUP_STEPS


def test_the_search_step_projects_onto_the_budget_of_each_step(one_thread):
    """The projection inside the step reads the budget from a device scalar that each step's ``prepare`` rewrites:
    an annealed budget, lowered between steps, binds at every step's own value."""
    model, scores, optimizers, ctx, batch = _parts(torch.float64)
    static = StaticSteps(_config(), ctx, GraphsChoice(True, False), seed=0)
    total = scores.num_channels
    for keep, binds in ((0.9, False), (0.4, True), (0.3, True)):  # the scores start at 0.2-0.8 (sum ~ 0.5 N)
        scores.set_budget(keep * total)
        static.search(model, scores, optimizers, batch)
        assert float(static._search[0].budget) == keep * total
        spent = float(scores.scores.detach().sum())
        assert spent == pytest.approx(keep * total, abs=1e-9) if binds else spent < keep * total


class _Halves(static_steps.StaticStep):
    """A step in two halves whose parts say what ran (``log``); ``fail`` names a part whose capture fails."""

    def __init__(self, log: list[str], fail: str | None = None) -> None:
        self.log, self.fail, self.capturing = log, fail, False
        self.average = self  # its all_reduce stands for the ranks' collective

    def forward_backward(self, images, labels) -> None:
        self._part("A")

    def update(self) -> None:
        self._part("B")

    def all_reduce(self) -> None:
        self.log.append("all_reduce")

    def _part(self, name: str) -> None:
        if self.capturing and name == self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.log.append(f"capture {name}" if self.capturing else name)


class _Thirds(_Halves):
    """A step in three pieces (as a search step under torchrun) with a collective after each of the first two."""

    def pieces(self, images, labels) -> list:
        return [lambda: self._part("A"), lambda: self._part("B"), lambda: self._part("C")]

    def between(self, piece: int) -> None:
        if piece < 2:
            self.log.append(f"all_reduce {piece}")


@pytest.fixture
def fake_capture(monkeypatch):
    """``torch.cuda``'s streams and graphs, as the CPU can play them: a graph records the part run in its capture
    (which runs it, flagged as capturing, instead of recording kernels) and a replay logs that part as run."""
    import contextlib
    from types import SimpleNamespace

    stream = SimpleNamespace(wait_stream=lambda other: None, name="ambient")
    capture_stream = SimpleNamespace(wait_stream=lambda other: None, name="capture")
    current = [stream]  # the current stream, as torch.cuda tracks it
    active: list = []

    class Graph:
        def __init__(self) -> None:
            self.part = None

        def pool(self) -> tuple:
            return ("pool", id(self))

        def replay(self) -> None:
            self.body.log.append(self.part)

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None, capture_error_mode="global"):
        # As torch's: the capture runs on a capture stream of its own, made current; a capture that fails ends
        # with the capture stream still current (the capture's end raises before the stream is restored). Only a
        # capture that leaves other threads' CUDA calls alone (the loader's pin-memory thread) succeeds on CUDA.
        assert capture_error_mode == "thread_local", capture_error_mode
        body, ambient = active[0], current[0]
        body.capturing, before = True, len(body.log)
        current[0] = capture_stream
        try:
            yield
        finally:
            body.capturing = False
        current[0] = ambient
        g.body, g.part = body, body.log[before].removeprefix("capture ") if len(body.log) > before else None

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0])
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: current.__setitem__(0, s))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)

    def make(body: _Halves, **kwargs) -> graphs.StepGraph:
        active.append(body)
        step = graphs.StepGraph(body, "test", torch.device("cpu"), False, 4, [], warmup=1, **kwargs)
        step.capture = True  # as on CUDA
        step._learning_rates = SimpleNamespace(refresh=lambda: None, installed=contextlib.nullcontext)
        step.current_stream = lambda: current[0].name
        return step

    return make


def _logged_steps(step, log: list[str], images, labels, steps: int = 4) -> list[list[str]]:
    """What each of ``steps`` calls of ``step`` logged."""
    logged = []
    for _ in range(steps):
        log.clear()
        step(images, labels)
        logged.append(list(log))
    return logged


@pytest.mark.parametrize("fail", [None, "A", "B"])
def test_a_step_in_two_halves_issues_the_ranks_collective_once_per_step_in_every_path(fake_capture, fail, caplog):
    """Under torchrun a captured step is two graphs with the collective issued between them by the host: warm-up,
    capture and replays each issue it exactly once, after the first half and before the second (ranks whose capture
    failed must issue the same collectives as the others, or they wait on each other for ever). A capture that fails
    in either half runs the rest of that step eagerly, once, and the later steps eagerly."""
    log: list[str] = []
    step = fake_capture(_Halves(log, fail))
    images, labels = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    steps = _logged_steps(step, log, images, labels)
    warm, replay = ["A", "all_reduce", "B"], ["A", "all_reduce", "B"]
    if fail is None:
        assert steps == [warm, ["capture A", "A", "all_reduce", "capture B", "B"], replay, replay]
        assert step.captures == 1 and len(step.graphs) == 2
    elif fail == "A":
        assert steps == [warm, ["A", "all_reduce", "B"], warm, warm]
        assert step.captures == 0 and not step.graphs and not step.capture
    else:  # the first half was captured and run: only the second runs eagerly
        assert steps == [warm, ["capture A", "A", "all_reduce", "B"], warm, warm]
        assert step.captures == 0 and not step.graphs and not step.capture
    assert all(s.count("all_reduce") == 1 and s.index("all_reduce") == s.index("A") + 1 for s in steps)
    assert len(caplog.records) == (fail is not None)
    assert step.current_stream() == "ambient"  # a failed capture gave the stream back
    images = torch.zeros(3, 3)  # another batch size (an epoch's last batch): eagerly, the collective all the same
    log.clear()
    step(images, labels[:3])
    assert log == warm


@pytest.mark.parametrize("fail", [None, "A", "B", "C"])
def test_a_step_in_three_pieces_issues_each_collective_once_per_step_in_every_path(fake_capture, fail):
    """A step in three pieces (the search step under torchrun: forward | backward | update) is three graphs, each
    collective issued by the host after its piece, exactly once, in warm-up, capture and replays; a capture that fails
    runs the rest of that step eagerly and the later steps eagerly."""
    log: list[str] = []
    step = fake_capture(_Thirds(log, fail))
    steps = _logged_steps(step, log, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    run = ["A", "all_reduce 0", "B", "all_reduce 1", "C"]
    captured = ["capture A", "A", "all_reduce 0", "capture B", "B", "all_reduce 1", "capture C", "C"]
    if fail is None:
        assert steps == [run, captured, run, run] and step.captures == 1 and len(step.graphs) == 3
    else:  # the pieces before the failing one were captured and run; the rest of the step runs eagerly
        cut = captured.index(f"capture {fail}")
        assert steps == [run, captured[:cut] + run[run.index(fail):], run, run]
        assert step.captures == 0 and not step.graphs and not step.capture
    assert all(s.count("all_reduce 0") == s.count("all_reduce 1") == 1 for s in steps)


def test_the_graphed_dense_reference_captures_each_ranks_share_of_the_batch(monkeypatch):
    """Under torchrun each rank steps on its share of the global batch: the graphed dense reference is captured for
    that size (captured for the global batch, it would never see a batch it fits, and the run's graphed steps would
    be timed against eager dense steps)."""
    from maskprop.train import loop

    prepare = loop.prepare

    def on_two_ranks(cfg, *args, **kwargs):  # the static steps of rank 0 of 2, captured (as on CUDA)
        run = prepare(cfg, *args, **kwargs)
        run.graphs = graphs.GraphsChoice(static=True, capture=True)
        run.static = graphs.StaticSteps(cfg, run.ctx, run.graphs, 0, world_size=2)
        return run

    class Built(Exception):
        pass

    def reference(*args, batch_size, **kwargs):
        raise Built(batch_size)

    monkeypatch.setattr(loop, "prepare", on_two_ranks)
    monkeypatch.setattr(loop, "GraphedDenseReference", reference)
    with pytest.raises(Built) as built:
        maskprop.fit(TINY_RUN)
    assert built.value.args == (TINY_RUN["data"]["batch_size"] // 2,)


def test_static_steps_count_the_global_batch_of_every_rank(one_thread):
    """Under torchrun (rank 0 of 2, its share of 4 examples) a static step's examples and train FLOPs are those of the
    global batch of 8: ``3 f + f`` at the search step's widths, ``3 f`` at the fixed mask's aligned kept counts, and a
    dense step's ``3 f_D``, by the cost model at 8 examples."""
    model, scores, optimizers, ctx, batch = _parts()
    static = StaticSteps(_config(), ctx, GraphsChoice(True, False), seed=0, world_size=2)
    f = ctx.cost.flops
    result = static.search(model, scores, optimizers, batch)
    widths = static._search[0].widths
    assert (result.count, result.flops, result.dense_flops) == (8, 4 * f(widths, 8), 3 * f(None, 8))
    mask = random_mask(model.channel_groups(), 0.5, torch.Generator().manual_seed(5))
    result = static.plain(model, optimizers[0], batch, mask)
    assert (result.count, result.flops) == (8, 3 * f(mask_capacities(mask, ctx.align), 8))
    assert static.plain(model, optimizers[0], batch).flops == 3 * f(None, 8)


def test_a_resumed_search_keeps_the_capacities_of_its_window(one_thread):
    """The capacities live in the checkpoint (re-choices have hysteresis): a resumed search steps at those of the
    window it stopped in (here the full widths), not at those its scores would choose afresh."""
    model, scores, optimizers, ctx, batch = _parts()
    static = StaticSteps(_config(), ctx, GraphsChoice(True, False), seed=0)
    static.capacities = dict(model.channel_groups())
    assert choose_capacities(scores, ctx.align, _config().sparsity.capacity_quantile) != static.capacities
    static.search(model, scores, optimizers, batch)
    resumed = StaticSteps(_config(), ctx, GraphsChoice(True, False), seed=0)
    resumed.load_state_dict(static.state_dict())
    resumed.search(model, scores, optimizers, batch)
    assert resumed._search[0].widths == static._search[0].widths == model.channel_groups()


def test_static_steps_are_read_and_logged_every_log_every_steps_of_the_run(static_run, monkeypatch, one_thread):
    """A run of static steps reads their statistics and logs them after every ``log_every``-th step of the run (its
    step count over the phases, as the eager steps do), and also at the end of each epoch without logging: each logged
    read holds the examples of the steps since the read before (4 steps of 32 an epoch, log_every 3, 12 steps)."""
    logged = []
    original = loop._step_scalars

    def recording(state, result):
        logged.append((state.step, result.count))
        return original(state, result)

    monkeypatch.setattr(loop, "_step_scalars", recording)
    summary = maskprop.fit(with_overrides(TINY_RUN, log_every=3, **{"data.batch_size": 32}))
    steps = sum(summary["steps"].values())
    assert steps == 12
    reads = sorted({*range(3, steps + 1, 3), *range(4, steps + 1, 4)})  # logged reads, and each epoch's last read
    expected = [(s, 32 * (s - max([0] + [r for r in reads if r < s]))) for s in range(3, steps + 1, 3)]
    assert logged == expected


def test_each_read_counts_the_overflows_since_the_read_before_over_both_masks(one_thread):
    """A read returns the overflow cuts of the steps since the read before, per group the sum of those of ``m`` and of
    ``m'`` (read by hand from the two execution states' counters), adds them to the run's totals, and starts the
    counters again: a second read without a step in between finds none."""
    model, scores, optimizers, ctx, batch = _parts(align=1)
    static = StaticSteps(_config(), ctx, GraphsChoice(True, False), seed=0)
    static.capacities = {g: n // 4 for g, n in model.channel_groups().items()}  # narrow: cuts in most steps
    for _ in range(2):
        static.search(model, scores, optimizers, batch)
    body = static._search[0]
    groups = list(body.state_m.layout.groups)
    steps = sum(int(s.overflow_steps.sum()) for s in (body.state_m, body.state_m2))
    per_mask = [{g: int(s.overflow_channels[..., i].sum()) for i, g in enumerate(groups)}
                for s in (body.state_m, body.state_m2)]
    channels = {g: per_mask[0][g] + per_mask[1][g] for g in groups}
    assert steps > 0 and any(per_mask[0][g] > 0 and per_mask[1][g] > 0 for g in groups)
    window = static.read()
    assert window.overflow_steps == steps and window.overflow_channels == channels
    again = static.read()
    assert again.overflow_steps == 0 and set(again.overflow_channels.values()) == {0}
    assert static.overflow_steps == steps and static.overflow_channels == channels


def test_a_read_whose_capacities_stay_keeps_the_window(one_thread):
    """A read with the scores re-chooses the capacities: where they stay (hysteresis, scores that moved by one step),
    the window and its step are kept; where they change (full widths, which the scores would shrink), the next search
    step builds a new window at the new capacities."""
    model, scores, optimizers, ctx, batch = _parts()
    quantile = _config().sparsity.capacity_quantile
    static = StaticSteps(_config(), ctx, GraphsChoice(True, False), seed=0)
    static.search(model, scores, optimizers, batch)
    body = static._search[0]
    assert not rechoose_capacities(static.capacities, scores, ctx.align, quantile).changed
    static.read(scores)
    static.search(model, scores, optimizers, batch)
    assert static._search[0] is body and static.windows == 1
    static.capacities = dict(model.channel_groups())
    update = rechoose_capacities(static.capacities, scores, ctx.align, quantile)
    assert update.changed
    static.read(scores)
    static.search(model, scores, optimizers, batch)
    assert static._search[0] is not body and static.windows == 2 and static.capacities == update.capacities


def test_windows_never_captured_warm_up_in_full_again(monkeypatch, one_thread):
    """Until a search step was captured in the process (eager static steps, a capture that failed), every new window
    warms up ``WARMUP_STEPS`` eager steps: the shorter warm-up of later windows is for a process with graphs."""
    model, scores, optimizers, ctx, batch = _parts(torch.float32)
    static = StaticSteps(_config(), ctx, GraphsChoice(True, False), seed=0)
    monkeypatch.setattr(static_steps.SearchStep, "__call__", lambda self, images, labels: None)
    for _ in range(2):
        static.search(model, scores, optimizers, batch)
        assert static._search[1].warmup == graphs.WARMUP_STEPS and static._search[1].captures == 0
        static.end_search()


def test_the_graphed_dense_reference_times_a_replay_after_its_warm_up_and_capture(monkeypatch, one_thread):
    """The first timing of the graphed dense reference runs its ``WARMUP_STEPS`` eager steps and the capture's step
    untimed, so that the step timed between the two synchronisations is a replay (not the capture); later timings run
    the timed step alone."""
    from types import SimpleNamespace

    events = []
    monkeypatch.setattr(graphs.StepGraph, "__call__", lambda self, images, labels: events.append("step"))
    monkeypatch.setattr(graphs, "synchronize", lambda device: events.append("sync"))
    model, _, _, ctx, batch = _parts(torch.float32)
    reference = graphs.GraphedDenseReference(model, lambda params: torch.optim.SGD(params, lr=0.1), ctx, batch_size=4)
    times = SimpleNamespace(overhead_s=0.0)
    reference.time_step(batch, times)
    assert events == ["step"] * (graphs.WARMUP_STEPS + 1) + ["sync", "step", "sync"]
    events.clear()
    reference.time_step(batch, times)
    assert events == ["sync", "step", "sync"]


@pytest.mark.parametrize("blocks,backward,total,critical,join", [
    # m''s forward B 70 outlasts m's update and forward A 60: pre 10, then the tail T 40 after both beside the
    # backward W 30, post 30: 10 + max(60 + 30, max(60, 70) + 40) + 30
    ([(10, 70), (70, 40)], 30, 240, 150, None),
    # three pieces, m's forward A 70 outlasting m''s B 40 (joined at launch 115: pre 5, B 40, A 70), mid 5, the tail
    # T 40 beside the backward W 60, post 20: 5 + max(70, 40) + 5 + max(60, 40) + 20
    ([(5, 40), (80, 40)], 60, 240, 160, 115),
])
def test_the_count_tool_s_critical_path_waits_for_the_longer_forward(blocks, backward, total, critical, join):
    streams = _count_tool().Streams()
    streams.blocks, streams.backward, streams.join = blocks, backward, join
    assert streams.summary(total) == {"main": total - sum(n for _, n in blocks), "side": sum(n for _, n in blocks),
                                      "critical": critical}


def test_the_windows_tool_keeps_an_alignment_given_on_its_command_line(tmp_path, one_thread):
    """``sparsity.align`` defaults to 8 only when the command line does not set it."""
    recipe = _search_recipe(tmp_path, epochs=3, anneal=1)
    assert load_tool("static_windows").main([str(recipe), "sparsity.align=3", "--json", str(tmp_path / "w.json")]) == 0
    result = json.loads((tmp_path / "w.json").read_text())
    assert result["config"]["sparsity"]["align"] == 3
    capacities = [c for w in result["windows"] for c in w.values()]
    assert all(c % 3 == 0 or c in (16, 32, 64) for c in capacities)  # aligned to 3, or a group's whole width
    assert any(c % 8 for c in capacities)


def test_the_count_tool_counts_what_touches_the_device_as_launches_and_views_as_none():
    """An operator with any tensor on the device is a launch (a copy from the host to it, a scalar from the host
    combined with a device tensor); one whose tensors are all on the host is host work; views are neither."""
    tool = _count_tool()
    on_meta, on_host, scalar = torch.empty(4, device="meta"), torch.arange(4), torch.tensor(2.0)
    with tool.Ops() as ops:
        on_host.to("meta")
        on_meta * scalar
        on_host + 1
        on_meta.view(2, 2)
        on_meta.copy_(on_meta)
    assert (ops.launches, ops.host, ops.all) == (3, 1, 5)
    assert dict(ops.names) == {"_to_copy": 1, "mul": 1, "copy_": 1}


def test_the_count_tool_records_each_side_block_after_the_main_stream_launches_before_it():
    """``by_stream`` on a step of known launches: 2 before the fork, m''s forward (5) on the side beside m's (3), the
    tail (4) on the side, 1 after; no backward. Critical path: 2 + max(3, 5) + 4 + 1 (the longer forward first)."""
    from maskprop.train.static_steps import SearchStep

    class Known(SearchStep):
        def __init__(self) -> None:
            self.average = None

        def __call__(self, x, y) -> None:
            x + 1, x + 2
            with self._on_side():
                [x * 2 for _ in range(5)]
            [x - 1 for _ in range(3)]
            with self._on_side():
                [x * 3 for _ in range(4)]
            x + 3

    x = torch.empty(3, device="meta")
    counts = _count_tool().by_stream("known", Known(), x, x)
    assert {k: v.launches for k, v in counts.items()} == {"known, main stream": 6, "known, side stream": 9,
                                                          "known, critical path": 12}


def test_the_captured_sgd_reads_its_learning_rate_from_the_device_tensor_the_schedule_refreshes():
    """While a step is captured the fused SGD's learning rate is a device tensor in its param group (a replay reads it
    there), refreshed from the float the schedule writes before each replay; the float is back in the group after the
    capture, and an SGD step with the tensor equals one with the float. Only the SGD param groups take one (the score
    Adam's rate is constant), and an SGD that is not fused cannot (its rate would be read on the host). The tensor is
    float32, on the parameters' device: CUDA's fused SGD reads it through a ``float`` pointer there."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5))
    v = nn.Parameter(w.detach().clone())
    captured, eager = weight_optimizer([w], 0.1, 0.9, 5e-4), weight_optimizer([v], 0.1, 0.9, 5e-4)
    scores = nn.Parameter(torch.rand(4))
    rates = graphs._DeviceLearningRates([captured, score_optimizer(scores, 0.01)], torch.device("cpu"))
    assert rates.groups == captured.param_groups and len(rates.tensors) == 1
    assert rates.tensors[0].dtype == torch.float32 and rates.tensors[0].device == w.device
    for lr in (0.1, 0.05, 0.0):  # the schedule's values, written as floats between steps
        captured.param_groups[0]["lr"] = eager.param_groups[0]["lr"] = lr
        g = torch.randn(5)
        w.grad, v.grad = g.clone(), g.clone()
        rates.refresh()
        assert rates.tensors[0] == torch.tensor(lr, dtype=torch.float32)
        with rates.installed():
            assert captured.param_groups[0]["lr"] is rates.tensors[0]
            captured.step()
        eager.step()
        assert captured.param_groups[0]["lr"] == lr and isinstance(captured.param_groups[0]["lr"], float)
        assert torch.equal(w, v)
    with pytest.raises(RuntimeError, match="not fused"):
        graphs._DeviceLearningRates([torch.optim.SGD([w], lr=0.1, fused=False)], torch.device("cpu"))


class _HostTensors(TorchDispatchMode):
    """Records the operators that take or make a tensor on the host, in a step whose tensors all live on another
    device; ``allowed``: the ids of host tensors that are expected."""

    def __init__(self, allowed: set[int]) -> None:
        super().__init__()
        self.allowed, self.found, self.calls = allowed, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls += 1
        out = func(*args, **kwargs)
        tensors = [t for t in pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        host = [tuple(t.shape) for t in tensors if t.device.type == "cpu" and id(t) not in self.allowed]
        if host:
            self.found.append(f"{func.overloadpacket.__name__} {host}")
        return out


@pytest.mark.parametrize("kind,clip,ranks", [("dense", None, False), ("dense", None, True), ("fixed", None, False),
                                            ("search", None, False), ("search", 0.5, False), ("search", None, True),
                                            ("search", 0.5, True)])
def test_static_steps_take_no_tensor_from_the_host(monkeypatch, one_thread, kind, clip, ranks):
    """On the meta device (the run's tensors all on a device, none with data) a static step's operators take and make
    no tensor on the host: on CUDA such a tensor is a copy from the host inside the captured step (a capture refuses
    one from pageable memory; a replay would not repeat it) or a device mismatch, which the CPU tests, whose tensors
    all live on the host, cannot see. Steps as torchrun runs them (``ranks``: the gradient average, its collective
    left out) and with clipping too. The meta device's Adam keeps its step count on the host (on CUDA
    ``set_capturable`` puts it on the device): the one host tensor allowed."""
    import contextlib

    meta = torch.device("meta")
    monkeypatch.setattr(static_steps, "_autocast", lambda ctx: contextlib.nullcontext())  # no autocast on meta
    monkeypatch.setattr(static_steps.GradientAverage, "all_reduce", lambda self, part="all": None)
    torch.manual_seed(0)
    model = maskprop.create_model("resnet20").train()
    ctx = StepContext(criterion=nn.CrossEntropyLoss(), device=meta, cost=CostModel(model, SIZE), channels_last=True,
                      clip_grad_norm=clip, align=8)
    groups = model.channel_groups()
    capacities = choose_capacities(ChannelScores(groups, 0.5), 8)
    model.to(meta)
    scores = ChannelScores(groups, 0.5, device=meta)
    weights, score_opt = weight_optimizer(model.parameters(), 0.1, 0.9, 5e-4), torch.optim.Adam([scores.scores])
    meter = DeviceMeter(meta)
    x = torch.empty(4, *SIZE, device=meta).contiguous(memory_format=torch.channels_last)
    y = torch.zeros(4, dtype=torch.long, device=meta)
    average = static_steps.GradientAverage(model.parameters(), 3 if kind == "search" else 0, 1) if ranks else None
    if kind == "search":
        body = static_steps.SearchStep(model, scores, (weights, score_opt), SparsityConfig(), ctx, capacities, meter,
                                       average=average)

        def step() -> None:
            for row in body.uniforms:  # prepare() without the generator (none on meta)
                row.uniform_()
            body.budget.fill_(scores.budget)
            if not body._started:
                body._prepare_next()
                body._started = True
            body(x, y)
    else:
        mask = random_mask(groups, 0.5, torch.Generator().manual_seed(5))
        body = (static_steps.FixedMaskStep(model, weights, mask, ctx, meter, average) if kind == "fixed"
                else static_steps.DenseStep(model, weights, ctx, meter, average=average))

        def step() -> None:
            body(x, y)
    for _ in range(2):  # the optimizers' state made
        step()
    counts = {id(state["step"]) for state in score_opt.state.values()}
    with _HostTensors(counts) as recorder:
        step()
    assert recorder.calls > 300 and recorder.found == []
