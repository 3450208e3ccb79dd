"""Concatenated channel groups (``maskprop.sparse.concatenate_groups``): a layer reading the channels of several groups
side by side, as ``torch.cat(..., dim=1)`` lays them out (a DenseNet's dense block), run by every engine.

The model is a tiny DenseNet: a stem unit writing group ``stem``, three dense layers each reading the concatenation
``cat{i}`` of everything before it (BatchNorm, 1x1 conv into a bottleneck group ``b{i}``, BatchNorm, 3x3 conv writing
the growth group ``g{i}``), and a BatchNorm and classifier reading ``final``: every group and the raw image (a part of
no group). The dense layers past the first read the image too, in front: a part of no group before the parts of
groups (their channels shifted by it), in a reader that writes a group (whose price counts the image whole).

Compact, static and narrow execution are checked against the masked reference in float64, and the masked reference
itself against a forward written here on the kept channels alone (``hand_forward``).
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import edge_case_mask, nontrivial_batch_norms
from test_sparse import compact_step_equals_masked
from test_static import _assert_step_equals_masked
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import maskprop
from maskprop.cost import CostModel
from maskprop.sparse import (
    SparseBatchNorm2d,
    SparseConv2d,
    SparseLinear,
    channel_groups,
    concatenate_groups,
    concatenations,
    prepare_mask,
    random_mask,
    use_mask,
)
from maskprop.sparse.execution import ExecutionState, model_plan
from maskprop.sparse.groups import concatenated_counts, concatenated_masks, drop_concatenations
from maskprop.sparse.static import StaticExecutionState, StaticLayout, StaticStates
from maskprop.surgery import index_sets, materialize

pytestmark = pytest.mark.usefixtures("one_thread")

STEM, BOTTLENECK, GROWTH, LAYERS, IMAGE = 8, 10, 6, 3, 3
SIZE = (IMAGE, 8, 8)


class DenseTiny(nn.Module):
    """A DenseNet of ``LAYERS`` dense layers (the image in front of the inputs of all but the first).
    ``positions > 1``: the classifier reads the final concatenation flattened at 2x2 (``in_positions=4``) instead of
    pooled to 1x1."""

    def __init__(self, positions: int = 1) -> None:
        super().__init__()
        self.positions = positions
        self.stem = SparseConv2d(IMAGE, STEM, 3, padding=1, out_group="stem")
        self.stem_bn = SparseBatchNorm2d(STEM, group="stem")
        parts = [("stem", STEM)]
        self.layers = nn.ModuleList()
        for i in range(LAYERS):
            read = parts if i == 0 else [(None, IMAGE), *parts]
            width = sum(n for _, n in read)
            cat = concatenate_groups(self, f"cat{i}", read)
            layer = nn.Module()
            layer.norm1 = SparseBatchNorm2d(width, group=cat)
            layer.conv1 = SparseConv2d(width, BOTTLENECK, 1, in_group=cat, out_group=f"b{i}")
            layer.norm2 = SparseBatchNorm2d(BOTTLENECK, group=f"b{i}")
            layer.conv2 = SparseConv2d(BOTTLENECK, GROWTH, 3, padding=1, in_group=f"b{i}", out_group=f"g{i}",
                                       mask_output=True)
            self.layers.append(layer)
            parts.append((f"g{i}", GROWTH))
        width = sum(n for _, n in parts) + IMAGE
        cat = concatenate_groups(self, "final", [*parts, (None, IMAGE)])
        self.norm = SparseBatchNorm2d(width, group=cat)
        self.fc = SparseLinear(width * positions, 5, in_group=cat, in_positions=positions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [F.relu(self.stem_bn(self.stem(x)))]
        for i, layer in enumerate(self.layers):
            h = layer.conv1(F.relu(layer.norm1(torch.cat(feats if i == 0 else [x, *feats], 1))))
            feats.append(layer.conv2(F.relu(layer.norm2(h))))
        h = F.relu(self.norm(torch.cat([*feats, x], 1)))
        side = math.isqrt(self.positions)
        return self.fc(F.adaptive_avg_pool2d(h, side).flatten(1))


GROUPS = {"stem": STEM, **{k: v for i in range(LAYERS) for k, v in ((f"b{i}", BOTTLENECK), (f"g{i}", GROWTH))}}
PARTS = {f"cat{i}": [(None, IMAGE)] * (i > 0) + [("stem", STEM)] + [(f"g{j}", GROWTH) for j in range(i)]
         for i in range(LAYERS)}
PARTS["final"] = [("stem", STEM)] + [(f"g{j}", GROWTH) for j in range(LAYERS)] + [(None, IMAGE)]


def dense_model(seed: int = 0, positions: int = 1) -> DenseTiny:
    torch.manual_seed(seed)
    return nontrivial_batch_norms(DenseTiny(positions).double()).train()


def batch(n: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SIZE, generator=g, dtype=torch.double), torch.randint(0, 5, (n,), generator=g)


def mixed_mask(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``stem`` and ``g0`` kept whole (``cat0`` and ``cat1`` keep every channel, ``cat1`` all its parts), ``g1``
    down to one channel, the rest half: concatenations of whole and pruned parts side by side."""
    mask = random_mask(GROUPS, 0.5, generator)
    mask["stem"][:] = True
    mask["g0"][:] = True
    mask["g1"] = torch.zeros(GROWTH, dtype=torch.bool)
    mask["g1"][4] = True
    return mask


def masks(generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """Two random masks at keep 0.5 and 0.3, the edge-case mask (one channel of ``stem``, ``b0`` whole), and
    :func:`mixed_mask`."""
    return [random_mask(GROUPS, 0.5, generator), random_mask(GROUPS, 0.3, generator),
            edge_case_mask(GROUPS, generator), mixed_mask(generator)]


def concatenated_index(mask: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The kept channels of the concatenated group ``name`` by hand: each part's kept channels (all of a part of no
    group) shifted by the channels of the parts before it."""
    pieces, first = [], 0
    for group, n in PARTS[name]:
        kept = torch.arange(n) if group is None else mask[group].nonzero().view(-1)
        pieces.append(kept + first)
        first += n
    return torch.cat(pieces)


def test_the_model_declares_what_it_reads():
    model = DenseTiny()
    assert channel_groups(model) == GROUPS  # real groups only, in the order they are written
    assert concatenations(model) == {name: tuple(parts) for name, parts in PARTS.items()}
    assert concatenated_counts({"stem": 2, "g0": 5}, {"cat1": PARTS["cat1"], "final": PARTS["final"]}) == {
        "stem": 2, "g0": 5, "cat1": IMAGE + 2 + 5, "final": 2 + 5 + 2 * GROWTH + IMAGE}  # uncounted: whole
    mask = random_mask(GROUPS, 0.5, torch.Generator().manual_seed(0))
    extended = concatenated_masks(mask, concatenations(model))
    for name, parts in PARTS.items():
        assert extended[name].shape == (sum(n for _, n in parts),)
        assert torch.equal(extended[name].nonzero().view(-1), concatenated_index(mask, name))


@pytest.mark.parametrize("positions", [1, 4], ids=["pooled", "flattened"])
def test_check_model_passes(positions):
    """maskprop's own check of every engine (dense, compact, static, narrow, FLOPs) at align 8 and 1."""
    model = DenseTiny(positions)
    assert maskprop.check_model(model, SIZE).checks == ("dense", "compact", "static", "narrow", "flops")
    maskprop.check_model(model, SIZE, align=1)


# --- 1. compact == masked -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("concatenate", [False, True], ids=["layer_by_layer", "concatenated_gathers"])
@pytest.mark.parametrize("align", [1, 4])
def test_compact_equals_masked_in_float64(align, concatenate, generator):
    """Loss, every gradient and every buffer of a training step equal the masked reference for random masks, the
    edge-case mask and a mask of whole and pruned parts; the concatenated groups' BatchNorm keeps the statistics of
    the channels its parts drop, and moves those they keep. With ``concatenate`` the gathers CUDA takes (one per
    kernel area from the concatenated weights) run here."""
    x, y = batch()
    for i, mask in enumerate(masks(generator)):
        model = dense_model(i)
        before = {k: b.clone() for k, b in model.named_buffers()}
        state = ExecutionState(mask, model, "compact", align=align, concatenate=concatenate)
        assert state.concatenate == concatenate
        if align == 4:
            assert state.padded
        for name, parts in PARTS.items():  # a concatenation's readers compute its parts' computed channels in turn
            pieces, first = [], 0
            for group, n in parts:
                index = None if group is None else state.index(group)
                pieces.append(torch.arange(n) + first if index is None else index + first)
                first += n
            expected = torch.cat(pieces)
            index = state.index(name)
            if index is None:  # read whole: no part loses a channel
                assert all(g is None or bool(mask[g].all()) for g, _ in parts), name
            else:
                assert torch.equal(index, expected), name
                real = concatenated_masks(mask, concatenations(model))[name][index]
                assert int(real.sum()) == sum(int(mask[g].sum()) if g else n for g, n in parts)
        grads, buffers = compact_step_equals_masked(model, state, mask, x, y)
        for name, norm, reader in [*((f"cat{j}", layer.norm1, f"layers.{j}.conv1")
                                     for j, layer in enumerate(model.layers)), ("final", model.norm, "fc")]:
            prefix = next(n for n, m in model.named_modules() if m is norm)
            kept = concatenated_masks(mask, concatenations(model))[name]
            for stat in ("running_mean", "running_var"):
                key = f"{prefix}.{stat}"
                assert torch.equal(buffers[key][~kept], before[key][~kept]), key
                assert not torch.equal(buffers[key][kept], before[key][kept]), key
            assert grads[f"{prefix}.weight"][~kept].count_nonzero() == 0
            columns = grads[f"{reader}.weight"].view(grads[f"{reader}.weight"].shape[0], kept.numel(), -1)
            assert columns[:, ~kept].count_nonzero() == 0 and columns[:, kept].count_nonzero() > 0


def test_compact_equals_masked_through_a_wrapper_and_a_deep_copy(generator):
    """``use_mask`` on a wrapper module (as DDP wraps the model) and on a deep copy finds the declarations."""
    x, y = batch()
    mask = random_mask(GROUPS, 0.5, generator)
    model = dense_model()
    wrapper = nn.Sequential(model)
    assert concatenations(wrapper) == concatenations(model) and channel_groups(wrapper) == GROUPS
    compact_step_equals_masked(wrapper, mask, mask, x, y)
    copied = copy.deepcopy(model)
    assert concatenations(copied) == concatenations(model)
    compact_step_equals_masked(copied, mask, mask, x, y)


@pytest.mark.parametrize("align", [1, 4])
def test_compact_eval_equals_masked_eval(align, generator):
    """Eval mode (running statistics, nothing written): the compact output equals the masked one."""
    x, _ = batch()
    model = dense_model().eval()
    for mask in masks(generator):
        with torch.no_grad(), use_mask(model, mask, "compact", align=align):
            compact = model(x)
        with torch.no_grad(), use_mask(model, mask, "masked"):
            masked = model(x)
        torch.testing.assert_close(compact, masked, rtol=1e-10, atol=1e-12)


# --- 2. the masked reference on its own -----------------------------------------------------------------------------


def hand_forward(model: DenseTiny, mask: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The subnetwork ``mask`` written out: plain functional ops on the kept channels alone (each parameter and running
    statistic indexed by them, the concatenations' by :func:`concatenated_index`), running statistics of the kept
    channels written back as ``nn.BatchNorm2d`` would."""

    def kept(group: str) -> torch.Tensor:
        return mask[group].nonzero().view(-1)

    def conv(layer: SparseConv2d, h: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor | None):
        weight = layer.weight.index_select(0, rows)
        weight = weight if columns is None else weight.index_select(1, columns)
        return F.conv2d(h, weight, None, layer.stride, layer.padding)

    def norm(layer: SparseBatchNorm2d, h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        mean, var = layer.running_mean[index].clone(), layer.running_var[index].clone()
        out = F.batch_norm(h, mean, var, layer.weight[index], layer.bias[index], layer.training, layer.momentum,
                           layer.eps)
        if layer.training:
            with torch.no_grad():
                layer.running_mean[index], layer.running_var[index] = mean, var
                layer.num_batches_tracked += 1
        return out

    feats = [F.relu(norm(model.stem_bn, conv(model.stem, x, kept("stem"), None), kept("stem")))]
    for i, layer in enumerate(model.layers):
        cat = concatenated_index(mask, f"cat{i}")
        inputs = torch.cat(feats if i == 0 else [x, *feats], 1)
        h = conv(layer.conv1, F.relu(norm(layer.norm1, inputs, cat)), kept(f"b{i}"), cat)
        feats.append(conv(layer.conv2, F.relu(norm(layer.norm2, h, kept(f"b{i}"))), kept(f"g{i}"), kept(f"b{i}")))
    final = concatenated_index(mask, "final")
    h = F.relu(norm(model.norm, torch.cat([*feats, x], 1), final))
    side = math.isqrt(model.positions)
    columns = (final[:, None] * model.positions + torch.arange(model.positions)).view(-1)
    return F.linear(F.adaptive_avg_pool2d(h, side).flatten(1), model.fc.weight[:, columns], model.fc.bias)


@pytest.mark.parametrize("positions", [1, 4], ids=["pooled", "flattened"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_masked_reference_is_the_subnetwork_written_out(training, positions, generator):
    """The masked model's logits, loss, every gradient and every buffer equal those of :func:`hand_forward` (which
    never sees a dropped channel) on a copy, for every mask of :func:`masks`."""
    x, y = batch()
    for i, mask in enumerate(masks(generator)):
        model = dense_model(i, positions).train(training)
        hand = copy.deepcopy(model)
        with use_mask(model, mask, "masked"):
            logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        expected = hand_forward(hand, mask, x)
        F.cross_entropy(expected, y).backward()
        torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-12)
        for (k, p), q in zip(model.named_parameters(), hand.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=f"gradient of {k}")
        for (k, b), c in zip(model.named_buffers(), hand.buffers()):
            torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-14, msg=k)


# --- 3. static shapes -----------------------------------------------------------------------------------------------

# Mask A: stem keeps 1 (padded to 4), g0 keeps 3 of capacity 6 (padding), g1 keeps 3 of capacity 2 (cut), g2 keeps
# 3 of capacity 3 (fits). Mask B: stem keeps all 8 (cut to 4), g0 all 6 (fits, whole), g1 keeps 1 (padded to 2),
# g2 keeps 2 (padded to 3). The bottlenecks: capacity 6, keeping 5 (A) and 7 (B: cut).
CAPACITIES = {"stem": 4, "b0": 6, "g0": 6, "b1": 6, "g1": 2, "b2": 6, "g2": 3}


def _static_masks(generator: torch.Generator) -> tuple[dict, dict]:
    def keep(n: int, k: int) -> torch.Tensor:
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.randperm(n, generator=generator)[:k]] = True
        return m

    a = {"stem": keep(STEM, 1), "g0": keep(GROWTH, 3), "g1": keep(GROWTH, 3), "g2": keep(GROWTH, 3),
         **{f"b{i}": keep(BOTTLENECK, 5) for i in range(LAYERS)}}
    b = {"stem": keep(STEM, 8), "g0": keep(GROWTH, 6), "g1": keep(GROWTH, 1), "g2": keep(GROWTH, 2),
         **{f"b{i}": keep(BOTTLENECK, 7) for i in range(LAYERS)}}
    return {g: a[g] for g in GROUPS}, {g: b[g] for g in GROUPS}


def test_static_layout_gives_each_concatenation_its_parts_slots():
    layout = StaticLayout(DenseTiny(), CAPACITIES)
    for name, parts in PARTS.items():
        slots = layout.concatenated_slots[name]
        assert slots.capacity == sum(n if g is None else CAPACITIES[g] for g, n in parts), name
        assert slots.channels == sum(n for _, n in parts), name
    assert layout.concatenated_slots["final"].capacity == 4 + 6 + 2 + 3 + IMAGE
    # The concatenations' slots lie between the groups' and the identity segment, one after another.
    first = layout.num_slots
    for slots in layout.concatenated_slots.values():
        assert slots.first_slot == first
        first += slots.capacity
    assert first == layout.identity_slot


@pytest.mark.parametrize("concatenate", [False, True], ids=["layer_by_layer", "concatenated_gathers"])
def test_static_step_equals_masked_reference_of_the_mask_used(concatenate, generator):
    """Two successive masks in the same buffers (the concatenated slots rewritten by each update): loss, gradients and
    buffers equal the masked reference of the mask actually used (padded, fitting and cut parts); the concatenations'
    index is their parts' slots side by side."""
    model = dense_model()
    state = StaticExecutionState(StaticLayout(model, CAPACITIES, concatenate=concatenate))
    addresses = {k: t.data_ptr() for k, t in state.buffers().items()}
    x, y = batch()
    mask_a, mask_b = _static_masks(generator)
    u = torch.rand(sum(GROUPS.values()), generator=generator, dtype=torch.double)
    for mask, ties, cut in ((mask_a, None, {"g1": 1}), (mask_b, u, {"stem": 4, "b0": 1, "b1": 1, "b2": 1})):
        used = _assert_step_equals_masked(model, state, mask, ties, x, y)
        assert state.read_overflow().channels == {g: cut.get(g, 0) for g in GROUPS}
        for g in GROUPS:  # the mask used keeps what fits of the mask
            assert int(used[g].sum()) == min(int(mask[g].sum()), CAPACITIES[g]) and not (used[g] & ~mask[g]).any()
        for name, parts in PARTS.items():
            pieces, first = [], 0
            for g, n in parts:
                pieces.append(torch.arange(n) + first if g is None else state.index(g) + first)
                first += n
            index, kept = state.index(name), concatenated_masks(used, concatenations(model))[name]
            assert torch.equal(index, torch.cat(pieces)), name
            assert int(kept[index].sum()) == int(kept.sum()), name  # every channel used is computed
    assert {k: t.data_ptr() for k, t in state.buffers().items()} == addresses


def test_static_states_updated_together_write_the_concatenated_slots_as_one_update_each(generator):
    """``StaticStates`` (a search step's two masks written with the launches of one): each row's concatenated slots
    equal what a state's own update writes."""
    layout = StaticLayout(DenseTiny(), CAPACITIES)
    together, alone = StaticStates(layout, 2), [StaticExecutionState(layout) for _ in range(2)]
    flat = [torch.cat([m[g] for g in GROUPS]) for m in _static_masks(generator)]
    u = torch.rand(2, layout.num_channels, generator=generator)
    together.update(torch.stack(flat), u)
    for state, mask, row in zip(alone, flat, u):
        state.update(mask, row)
    for a, b in zip(together, alone):
        for (key, t), s in zip(a.buffers().items(), b.buffers().values()):
            assert torch.equal(t, s), key
        for name in PARTS:
            assert torch.equal(a.index(name), b.index(name))


# --- 4. the narrow model --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", [1, 4], ids=["pooled", "flattened"])
def test_narrow_model_computes_what_the_compact_model_computes(positions, generator):
    """In train mode (output and the running statistics it moves) and eval mode, for every mask of :func:`masks`; its
    layers have the kept parts' widths, it declares no concatenation, and the full model keeps its own."""
    x, _ = batch()
    for i, mask in enumerate(masks(generator)):
        model = dense_model(i, positions)
        narrow = materialize(model, mask)
        assert concatenations(narrow) == {} and concatenations(model) == {n: tuple(p) for n, p in PARTS.items()}
        for layer, full in zip(narrow.layers, model.layers):
            width = int(concatenated_masks(mask, concatenations(model))[full.norm1.group].sum())
            assert type(layer.conv1) is nn.Conv2d and type(layer.norm1) is nn.BatchNorm2d
            assert layer.norm1.num_features == layer.conv1.in_channels == width
            assert layer.conv1.out_channels == int(mask[full.conv1.out_group].sum())
        final = sum(int(mask[g].sum()) if g else n for g, n in PARTS["final"])
        assert narrow.norm.num_features == final and narrow.fc.in_features == final * positions
        for training in (True, False):
            model.train(training)
            narrow.train(training)
            with torch.no_grad(), use_mask(model, mask, "compact"):
                expected = model(x)
            with torch.no_grad():
                got = narrow(x)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        sets = index_sets(model, mask)
        for name, full in (*((f"layers.{i}.norm1", layer.norm1) for i, layer in enumerate(model.layers)),
                           ("norm", model.norm)):
            rows = sets[f"{name}.running_mean"][0]  # None: the concatenation keeps every channel
            for stat in ("running_mean", "running_var"):  # moved alike by the train-mode forwards
                kept = getattr(full, stat) if rows is None else getattr(full, stat)[rows]
                torch.testing.assert_close(getattr(narrow.get_submodule(name), stat), kept, rtol=1e-12, atol=1e-14)


def test_index_sets_slice_the_readers_of_a_concatenation_by_its_parts(generator):
    """The columns of ``layers.2.conv1`` (reading the image, stem, g0, g1) and of the classifier by hand: each part's
    kept channels shifted by the channels before it; the narrow weights are those columns of the full ones."""
    model = dense_model()
    mask = random_mask(GROUPS, 0.5, generator)
    sets = index_sets(model, mask)
    rows, columns = sets["layers.2.conv1.weight"]
    stem, g0, g1 = (mask[g].nonzero().view(-1) for g in ("stem", "g0", "g1"))
    by_hand = torch.cat([torch.arange(IMAGE), stem + IMAGE, g0 + IMAGE + STEM, g1 + IMAGE + STEM + GROWTH])
    assert torch.equal(columns, by_hand) and torch.equal(rows, mask["b2"].nonzero().view(-1))
    assert torch.equal(sets["layers.2.norm1.weight"][0], by_hand)
    fc_rows, fc_columns = sets["fc.weight"]
    assert fc_rows is None
    assert torch.equal(fc_columns[-IMAGE:], torch.arange(IMAGE) + STEM + LAYERS * GROWTH)  # the image, all of it
    narrow = materialize(model, mask)
    assert torch.equal(narrow.layers[2].conv1.weight, model.layers[2].conv1.weight[rows][:, by_hand])
    assert torch.equal(narrow.fc.weight, model.fc.weight[:, fc_columns])


@pytest.mark.parametrize("align", [1, 4])
def test_narrow_finetune_steps_equal_compact_steps_on_the_kept_entries(align):
    """The trainer's narrow finetune (``NarrowSubnetwork``, padded to ``align`` by channels that stay zero): three SGD
    steps with momentum, written back, equal three compact steps of the full model on the kept entries (weights,
    statistics and momentum), and count the FLOPs of the widths it computes."""
    from maskprop.train.narrow import NarrowSubnetwork
    from maskprop.train.steps import StepContext, subnet_step

    for i, mask in enumerate(masks(torch.Generator().manual_seed(2))):
        model = dense_model(i)
        ctx = StepContext(nn.CrossEntropyLoss(), torch.device("cpu"), CostModel(model, SIZE))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        batches = [batch(4, seed) for seed in range(4)]
        subnet_step(model, optimizer, batches[0], mask, ctx)  # momentum to gather
        copied = copy.deepcopy(model)
        copied_optimizer = torch.optim.SGD(copied.parameters(), lr=0.05, momentum=0.9)
        copied_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        for b in batches[1:]:
            compact = subnet_step(model, optimizer, b, mask, ctx)
        narrow = NarrowSubnetwork(copied, mask, copied_optimizer, align=align)
        assert concatenations(narrow.model) == {}
        for b in batches[1:]:
            result = narrow.step(b, ctx)
        narrow.write_back()
        assert result.loss == pytest.approx(compact.loss, rel=1e-12)
        assert result.flops == 3 * ctx.cost.flops(narrow.computed, 4)
        sets = index_sets(model, mask)
        params = dict(model.named_parameters())
        for key, tensor in (*model.state_dict().items(),
                            *((f"{k}:momentum", optimizer.state[p]["momentum_buffer"]) for k, p in params.items())):
            name, _, extra = key.partition(":")
            other = copied.state_dict()[name] if not extra else copied_optimizer.state[
                dict(copied.named_parameters())[name]]["momentum_buffer"]
            rows, columns = sets[name]
            want, got = tensor, other
            if rows is not None:
                want, got = want.index_select(0, rows), got.index_select(0, rows)
            if columns is not None:
                want, got = want.index_select(1, columns), got.index_select(1, columns)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=key)


# --- 5. cost --------------------------------------------------------------------------------------------------------


def test_cost_model_counts_the_narrow_model(generator):
    """Forward FLOPs against torch's counter on the narrow model, parameters against its tensors, for every mask of
    :func:`masks` and the dense model; the kept counts as ints count as the mask does."""
    model = DenseTiny()
    cost = CostModel(model, SIZE)
    x = torch.randn(2, *SIZE)
    for mask in [None, *masks(generator)]:
        narrow = materialize(model, mask)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            narrow(x)
        assert cost.flops(mask, batch_size=2) == counter.get_total_flops()
        assert cost.params(mask) == sum(p.numel() for p in narrow.parameters())
        if mask is not None:
            assert cost.flops({g: int(m.sum()) for g, m in mask.items()}) == cost.flops(mask)


@pytest.mark.parametrize("positions", [1, 4], ids=["pooled", "flattened"])
def test_cost_model_counts_a_compact_step(positions, generator):
    """The forward and backward FLOPs torch counts in a compact step (the readers of a concatenation at the sum of its
    parts' kept channels; none reads the image alone, so each computes an input gradient)."""
    from test_cost import counted_flops

    model = DenseTiny(positions)
    cost = CostModel(model, SIZE)
    for mask in masks(generator):
        forward, backward = counted_flops(model, mask, torch.randn(2, *SIZE), torch.tensor([0, 1]))
        assert (forward, backward) == (cost.flops(mask, batch_size=2), cost.backward_flops(mask, batch_size=2))


def test_channel_prices_are_the_flops_of_one_more_channel_of_each_part():
    """dF/dn_g at keep 0.5 against the forward difference of the FLOPs of int counts at exactly half of every group
    (exact: F is bilinear in each layer's kept input and output counts, and no layer reads and writes one group). A
    part of ``stem`` costs what every reader of a concatenation holding it pays."""
    cost = CostModel(DenseTiny(), SIZE)
    half = {g: n // 2 for g, n in GROUPS.items()}
    assert all(2 * k == GROUPS[g] for g, k in half.items())
    prices = cost.channel_prices(0.5)
    assert set(prices) == set(GROUPS)  # the parts, never a concatenation
    for group in GROUPS:
        assert prices[group] == cost.flops(dict(half, **{group: half[group] + 1})) - cost.flops(half), group
    # By hand: the stem conv (3 image channels in, 3x3 over 8x8), and each dense layer's 1x1 conv1 (5 bottleneck
    # channels kept, 8x8), and the classifier (5 outputs).
    assert prices["stem"] == 2 * IMAGE * 9 * 64 + LAYERS * 2 * 5 * 64 + 2 * 5


# --- 6. validation --------------------------------------------------------------------------------------------------


class _Reader(nn.Module):
    """Two groups ``a`` (4) and ``b`` (3) and a BatchNorm and 1x1 conv reading their concatenation ``ab``."""

    def __init__(self, parts=(("a", 4), ("b", 3)), conv_width=7, norm_width=7, writer=None):
        super().__init__()
        self.a = SparseConv2d(3, 4, 1, out_group="a")
        self.b = SparseConv2d(3, 3, 1, out_group="b")
        concatenate_groups(self, "ab", list(parts))
        self.norm = SparseBatchNorm2d(norm_width, group="ab")
        self.conv = SparseConv2d(conv_width, 5, 1, in_group="ab", out_group=writer)


def test_a_reader_of_an_undeclared_concatenation_is_told_how_to_declare_it():
    model = _Reader()
    model.conv.in_group = "abc"
    with pytest.raises(ValueError, match=r"^layer 'conv' reads group 'abc' that no layer writes \(if it reads a "
                                         r"torch.cat of groups, declare it: maskprop.sparse.concatenate_groups\(model, "
                                         r"'abc', \[\(part, channels\), ...\]\)\)$"):
        channel_groups(model)


def test_a_valid_reader_has_its_parts_groups_only():
    assert channel_groups(_Reader()) == {"a": 4, "b": 3}


@pytest.mark.parametrize("kwargs,message", [
    ({"writer": "ab"}, "layer 'conv' writes concatenated group 'ab' as 5 channels, but its parts have 7"),
    ({"conv_width": 8}, "layer 'conv' reads concatenated group 'ab' as 8 channels, but its parts have 7"),
    ({"norm_width": 6}, "layer 'norm' reads concatenated group 'ab' as 6 channels, but its parts have 7"),
    ({"parts": (("a", 4), ("c", 3))}, "concatenated group 'ab' takes 3 channels of group 'c', but no layer writes it"),
    ({"parts": (("a", 4), ("b", 2), (None, 1))},
     "concatenated group 'ab' takes 2 channels of group 'b', but it has 3"),
    ({"parts": (("a", 4), ("b", 2))},  # the readers' width differs too: the part is named first
     "concatenated group 'ab' takes 2 channels of group 'b', but it has 3"),
    ({"parts": (("a", 4), ("b", 3), ("ghost", 4))},
     "concatenated group 'ab' takes 4 channels of group 'ghost', but no layer writes it"),
], ids=["written", "conv_width", "norm_width", "unknown_part", "part_size", "part_before_readers", "extra_part"])
def test_a_bad_declaration_is_one_clear_error(kwargs, message):
    model = _Reader(**kwargs)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        channel_groups(model)
    with pytest.raises(ValueError, match=re.escape(message)):  # what every engine validates with
        maskprop.CostModel(model, (3, 4, 4))


def test_a_concatenation_is_no_part_of_another_and_no_group_of_a_mask():
    """A part names a group some layer writes (a concatenation is not one); a mask names the parts only."""
    model = _Reader()
    concatenate_groups(model, "nested", [("ab", 7)])
    with pytest.raises(ValueError, match="concatenated group 'nested' takes 7 channels of group 'ab', but no layer"):
        channel_groups(model)
    model = DenseTiny()
    mask = random_mask(GROUPS, 0.5, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"mask has unknown group\(s\) 'cat0'"):
        prepare_mask(model, {**mask, "cat0": torch.ones(STEM, dtype=torch.bool)})


@pytest.mark.parametrize("name", ["", 3, None])
def test_concatenate_groups_refuses_a_bad_name(name):
    with pytest.raises(ValueError, match=r"^a concatenated group's name is a non-empty string, got "):
        concatenate_groups(nn.Module(), name, [("a", 4)])


@pytest.mark.parametrize("parts", [[("a", 0)], [("a", -2)], [("a", True)], [("a", 4.0)], [("a",)], [(3, 4)],
                                   [("a", 4, 1)], "a4"],
                         ids=["zero", "negative", "bool", "float", "one", "int_name", "three", "string"])
def test_concatenate_groups_refuses_bad_parts(parts):
    module = nn.Module()
    with pytest.raises(ValueError, match=r"^part .* of 'c' is not a \(group name or None, channels > 0\) pair$"):
        concatenate_groups(module, "c", parts)
    assert concatenations(module) == {}  # nothing declared


def test_concatenate_groups_takes_any_pair_of_a_name_and_an_integer():
    """Lists and integers of other types (numpy's, a 0-d tensor's item) are parts as tuples of ints are."""
    import numpy as np

    module = nn.Module()
    concatenate_groups(module, "c", [["a", np.int64(4)], (None, torch.tensor(3).item())])
    assert concatenations(module) == {"c": (("a", 4), (None, 3))}
    assert all(type(n) is int for _, n in concatenations(module)["c"])


@pytest.mark.parametrize("parts", [[(None, 4)], [(None, 4), (None, 2)], []], ids=["one", "two", "none"])
def test_concatenate_groups_refuses_parts_of_no_group(parts):
    with pytest.raises(ValueError, match=r"^concatenated group 'c' has no part that names a group; expected at "
                                         r"least one \(a layer reading channels that are never pruned reads "
                                         r"in_group=None\)$"):
        concatenate_groups(nn.Module(), "c", parts)


def test_declarations_are_found_on_wrappers_kept_by_copies_and_dropped_on_request():
    model = DenseTiny()
    declared = concatenations(model)
    assert concatenate_groups(model, "extra", [("g0", GROWTH)]) == "extra"  # a second call adds to the first
    assert set(concatenations(model)) == {*declared, "extra"}
    wrapper = nn.Sequential(nn.Identity(), nn.Sequential(model))
    assert concatenations(wrapper) == concatenations(model)
    copied = copy.deepcopy(wrapper)
    assert concatenations(copied) == concatenations(model)
    drop_concatenations(copied)
    assert concatenations(copied) == {} and concatenations(wrapper) == concatenations(model)  # the original keeps its



def test_one_name_declared_twice_with_other_parts_is_one_clear_error():
    model = DenseTiny()
    concatenate_groups(model, "cat1", PARTS["cat1"])  # the same parts again: one declaration
    with pytest.raises(ValueError, match=r"^concatenated group 'cat1' is declared twice on DenseTiny, as .* and as "
                                         r"\(\('stem', 8\),\); expected one name per concatenation$"):
        concatenate_groups(model, "cat1", [("stem", STEM)])
    assert concatenations(model)["cat1"] == tuple(PARTS["cat1"])
    model = nn.Sequential(DenseTiny(), DenseTiny())
    concatenate_groups(model[1].layers, "cat1", [("stem", STEM)])  # on another module: seen when they are read
    with pytest.raises(ValueError, match="concatenated group 'cat1' is declared twice"):
        concatenations(model)


def test_the_plan_follows_declarations_made_after_it():
    """A declaration made after the model's plan was computed (its layers unchanged) is seen by the next mask."""
    model = DenseTiny()
    readers = {m.group for m in model.modules() if isinstance(m, SparseBatchNorm2d)} - set(GROUPS)
    plan = model_plan(model)
    assert set(plan.concatenations) == readers
    concatenate_groups(model, "extra", [("g0", GROWTH)])
    assert "extra" in model_plan(model).concatenations and model_plan(model) is not plan
    drop_concatenations(model)
    assert model_plan(model).concatenations == {}


def test_a_static_state_reads_a_concatenations_kept_flags(generator):
    model = DenseTiny()
    mask, _ = _static_masks(generator)
    state = StaticExecutionState.create(model, CAPACITIES)
    state.update(mask)
    for name, parts in PARTS.items():
        expected = torch.cat([torch.ones(n) if g is None else state.real(g) for g, n in parts])
        assert torch.equal(state.real(name), expected.to(state.real(name).dtype)), name


# --- 7. a search step -----------------------------------------------------------------------------------------------


def test_a_vrpge_search_step_runs_on_scores_of_the_real_groups():
    from maskprop.train.config import SparsityConfig
    from maskprop.train.steps import StepContext, vrpge_step
    from maskprop.vrpge import ChannelScores

    torch.manual_seed(0)
    model = DenseTiny().train()
    groups = channel_groups(model)
    scores = ChannelScores(groups, keep_ratio=0.5)
    assert scores.num_channels == sum(GROUPS.values())
    weights = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    adam = torch.optim.Adam([scores.scores], lr=0.1)
    ctx = StepContext(nn.CrossEntropyLoss(), torch.device("cpu"), CostModel(model, SIZE))
    images, labels = torch.randn(8, *SIZE), torch.randint(0, 5, (8,))
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    result = vrpge_step(model, scores, (weights, adam), (images, labels), torch.Generator().manual_seed(0),
                        SparsityConfig(), ctx)
    assert math.isfinite(result.loss) and math.isfinite(result.loss2)
    assert set(result.mask) == set(result.mask2) == set(GROUPS) and set(scores.split(scores.scores)) == set(GROUPS)
    assert result.flops == 3 * ctx.cost.flops(result.mask, 8) + ctx.cost.flops(result.mask2, 8)
    assert torch.isfinite(scores.scores).all() and scores.scores.grad is not None
    assert not torch.equal(model.layers[1].conv1.weight, before["layers.1.conv1.weight"])  # a reader was trained


def test_a_sparse_backward_conversion_drops_the_declarations():
    """``maskprop.sbp.convert`` makes the layers name no group: the concatenations go with them (a part naming a
    group no layer writes any more would be an error), and the converted model trains."""
    from maskprop.sbp import convert

    model = convert(DenseTiny(), ratio=0.5)
    assert concatenations(model) == {} and channel_groups(model) == {}
    model(torch.randn(2, *SIZE)).sum().backward()
