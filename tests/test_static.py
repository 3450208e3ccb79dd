"""Static-shape compact execution (``maskprop.sparse.static``): capacities, exactness against the masked reference of
the mask actually used, buffers reused across masks, and no data-dependent operation or host read in a step."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import edge_case_mask, input_size, nontrivial_batch_norms
from test_sparse import run_step
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import maskprop
from maskprop.sparse import SparseBatchNorm2d, random_mask
from maskprop.sparse.static import (
    KeptCount,
    StaticExecutionState,
    StaticLayout,
    StaticStates,
    check_capacities,
    choose_capacities,
    kept_count_moments,
    mask_capacities,
    rechoose_capacities,
    use_static,
)
from maskprop.vrpge import ChannelScores

MODELS = maskprop.list_models()


def _capacities_and_masks(groups: dict[str, int], generator: torch.Generator, align: int = 8):
    """Capacities (multiples of ``align``) and two masks that meet every case at these capacities.

    Mask A (conftest's edge cases): the first group keeps one channel (capacity ``min(align, n)``: padding), the
    second keeps all (capacity ``n``), the others half. Mask B: the first group keeps all its channels (an overflow of
    ``n - align``), the second half (capacity ``n`` with dropped channels), the others half; with three groups or more
    the last one's capacity is a step below half, so it overflows in both masks.
    """
    names = list(groups)
    mask_a = edge_case_mask(groups, generator)
    mask_b = random_mask(groups, 0.5, generator)
    mask_b[names[0]] = torch.ones(groups[names[0]], dtype=torch.bool)
    capacities = mask_capacities(random_mask(groups, 0.5, generator), align)
    capacities[names[0]] = min(align, groups[names[0]])
    capacities[names[1]] = groups[names[1]]
    if len(names) >= 3:
        last = names[-1]
        capacities[last] = max(min(align, groups[last]), capacities[last] - align)
    return capacities, mask_a, mask_b


def static_step(model, state, x, y):
    """One training forward/backward under ``state``; returns loss, gradients and buffers (as ``run_step``)."""
    model.zero_grad(set_to_none=True)
    with use_static(state):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    return loss.detach(), grads, buffers


def _assert_step_equals_masked(model, state, mask, u, x, y):
    """Update ``state`` to ``mask``, run a step, and compare it with the masked reference of the mask actually used
    on a copy of the model. Returns the mask actually used."""
    reference = copy.deepcopy(model)
    state.update(mask, u)
    used = {g: m.clone() for g, m in state.mask_used_by_group().items()}
    loss_s, grads_s, buffers_s = static_step(model, state, x, y)
    loss_m, grads_m, buffers_m = run_step(reference, used, "masked", x, y)
    torch.testing.assert_close(loss_s, loss_m, rtol=1e-10, atol=1e-12)
    for k in grads_m:
        torch.testing.assert_close(grads_s[k], grads_m[k], rtol=1e-8, atol=1e-10, msg=f"gradient of {k}")
    for k in buffers_m:
        torch.testing.assert_close(buffers_s[k], buffers_m[k], rtol=1e-10, atol=1e-12, msg=f"buffer {k}")
    return used


def _exactness(name: str, generator: torch.Generator, concatenate: bool | None, channels_last: bool = False,
               align: int = 8) -> StaticExecutionState:
    torch.manual_seed(0)
    model = nontrivial_batch_norms(maskprop.create_model(name).double())
    groups = model.channel_groups()
    capacities, mask_a, mask_b = _capacities_and_masks(groups, generator, align)
    state = StaticExecutionState(StaticLayout(model, capacities, align=align, concatenate=concatenate))
    addresses = {k: t.data_ptr() for k, t in state.buffers().items()}
    x = torch.randn(3, *input_size(name), dtype=torch.double)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2])
    used_a = _assert_step_equals_masked(model, state, mask_a, None, x, y)
    last = list(groups)[-1] if len(groups) >= 3 else None  # the one group that overflows in mask A
    assert all(torch.equal(used_a[g], mask_a[g]) for g in groups if g != last)
    if last is not None:  # without u: the lowest-numbered kept channels
        kept = mask_a[last].nonzero().view(-1)
        assert torch.equal(used_a[last].nonzero().view(-1), kept[:capacities[last]])
    assert state.read_overflow().steps == (last is not None)
    u = torch.rand(sum(groups.values()), generator=generator, dtype=torch.double)
    used_b = _assert_step_equals_masked(model, state, mask_b, u, x, y)
    first = next(iter(groups))
    u_first = u[:groups[first]]
    # The overflowing first group keeps its `capacity` channels with the smallest u.
    expected = torch.zeros(groups[first], dtype=torch.bool)
    expected[u_first.argsort()[:capacities[first]]] = True
    assert torch.equal(used_b[first], expected)
    report = state.read_overflow()
    assert report.steps == 1 and report.channels[first] == groups[first] - capacities[first]
    cut = {g: int(mask_b[g].sum()) - int(used_b[g].sum()) for g in groups}
    assert report.channels == cut
    # The same buffers, at the same addresses, served both masks: what lets a captured graph replay.
    assert {k: t.data_ptr() for k, t in state.buffers().items()} == addresses
    return state


@pytest.mark.parametrize("name", MODELS)
def test_static_compact_equals_masked_reference_of_the_mask_used_in_float64(name, generator, one_thread):
    """Loss, every gradient and every buffer equal the masked reference of the mask actually used, for two
    consecutive masks at the same capacities (one channel kept, a group kept whole, a full-capacity group with
    dropped channels, padding, overflows), with the same buffers."""
    _exactness(name, generator, None)


@pytest.mark.parametrize("align", [8, 1])
@pytest.mark.parametrize("name", ["resnet20", "wrn16_8", "mlp", "vgg11_bn", "resnet50"])
def test_concatenated_gathers_as_off_the_cpu_are_exact(name, align, generator, one_thread):
    """The gathers off the CPU (one per kernel area from the concatenated weights, pieces padded to aligned starts
    that read a zero row) run here on the CPU: exact as well. With ``align=1`` odd capacities make padded pieces."""
    state = _exactness(name, generator, True, align=align)
    tables = [*state.layout.tables, state.layout.norm_table]
    padded = any(t.entries > sum(p.entries for p in t.pieces) for t in tables if t is not None)
    assert padded or align == 8


@pytest.mark.parametrize("name", ["resnet20", "wrn16_8"])
def test_static_compact_in_channels_last_is_exact(name, generator, one_thread):
    """In channels_last, BatchNorm of the capacities off the multiples of 16 runs ``maskprop.sparse.batchnorm``."""
    _exactness(name, generator, None, channels_last=True)


def test_padding_outputs_zero_at_the_capacities_and_eval_matches(generator):
    """Every unit computes its capacity; padding slots output exactly zero; an eval-mode forward without autograd
    equals the masked reference."""
    torch.manual_seed(0)
    model = nontrivial_batch_norms(maskprop.create_model("resnet20").double()).eval()
    groups = model.channel_groups()
    mask = random_mask(groups, 0.3, generator)
    capacities = mask_capacities(mask, 8)
    state = StaticExecutionState.create(model, capacities, align=8)
    state.update(mask)
    outputs = {}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: outputs.__setitem__(n, (mod.group, o.detach())))
               for n, m in model.named_modules() if isinstance(m, SparseBatchNorm2d)]
    x = torch.randn(2, 3, 16, 16, dtype=torch.double)
    with torch.no_grad(), use_static(state):
        out = model(x)
    for h in handles:
        h.remove()
    for name, (group, y) in outputs.items():
        real = state.real(group).bool()
        assert y.shape[1] == capacities[group], name
        assert torch.equal(mask[group][state.index(group)], real), name
        assert y[:, ~real].abs().max() == 0 if (~real).any() else True, name
    with torch.no_grad(), maskprop.use_mask(model, mask, "masked"):
        expected = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_the_end_of_a_forward_drops_the_step_s_gathered_tensors(generator):
    """A state lives for a window: once the model's forward returns it must not keep the pass's gathered tensors (and
    with them the autograd graph, whose gradient accumulators a graph captured on another stream must not meet)."""
    model = maskprop.create_model("resnet20")
    groups = model.channel_groups()
    state = StaticExecutionState.create(model, mask_capacities(random_mask(groups, 0.5, generator), 1))
    during = []
    hook = model.fc.register_forward_pre_hook(lambda *_: during.append((state._weight_pass, state._norm_pass)))
    with use_static(state):
        loss = model(torch.randn(2, 3, 16, 16)).sum()
        assert state._weight_pass is None and state._norm_pass is None
    hook.remove()
    assert during[0][0] is not None and during[0][1] is not None  # the pass lives while the forward runs
    assert state._weight_pass is None and state._norm_pass is None
    loss.backward()
    assert model.fc.weight.grad is not None


def test_weights_skip_the_zero_factor_where_the_batch_norm_after_them_zeroes_padding(generator):
    """The gathered weights of layers whose grouped BatchNorm masks their output need no multiply by the 0/1 factors
    (exact all the same: ``test_static_compact_equals_masked_reference_of_the_mask_used_in_float64``, whose MLP case
    fails without the factor); layers that mask their own output (an MLP, a WideResNet's residual writers) and the
    BatchNorm table keep it."""
    def factors(name: str) -> list[bool]:
        model = maskprop.create_model(name)
        layout = StaticLayout(model, mask_capacities(random_mask(model.channel_groups(), 0.5, generator), 8), 8,
                              concatenate=True)
        norms = [] if layout.norm_table is None else [layout.norm_table.needs_factor]
        return [t.needs_factor for t in layout.tables] + norms

    assert factors("resnet20") == factors("vgg11_bn") == [False, False, True]  # 3x3; 1x1 and linear; BatchNorm
    assert factors("mlp") == [True]  # no BatchNorm
    assert factors("wrn16_8") == [True, True, True]  # each weight table holds a layer masking its own output


def test_layouts_are_shared_by_the_states_of_a_window(generator):
    """A search step's two masks: two states of one layout, each with its own buffers."""
    model = maskprop.create_model("resnet20")
    groups = model.channel_groups()
    layout = StaticLayout(model, mask_capacities(random_mask(groups, 0.5, generator), 1))
    first, second = StaticExecutionState(layout), StaticExecutionState(layout)
    assert first.layout is second.layout and first.widths == layout.capacities
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(first.buffers().values(), second.buffers().values()))


def test_a_state_takes_a_mask_written_into_another_as_if_updated_with_it(generator):
    """``take`` gives a state the buffers ``update`` would have written there, and moves the other state's overflow
    counts over (added, then zeroed there): a mask is counted once, by the state that runs it. States of another layout
    are refused."""
    model = maskprop.create_model("resnet20")
    groups = model.channel_groups()
    capacities = {g: max(1, n // 4) for g, n in groups.items()}  # narrow: a keep-0.5 mask overflows
    layout = StaticLayout(model, capacities)
    running, prepared, direct = (StaticExecutionState(layout) for _ in range(3))
    for _ in range(3):
        mask = torch.cat(list(random_mask(groups, 0.5, generator).values()))
        u = torch.rand(mask.shape, generator=generator)
        prepared.update(mask, u)
        running.take(prepared)
        direct.update(mask, u)
        for (name, a), b in zip(running.buffers().items(), direct.buffers().values()):  # the counters included
            assert torch.equal(a, b), name
        assert not prepared.overflow_channels.any() and not prepared.overflow_steps
    assert int(running.overflow_steps) == 3 and running.overflow_channels.sum() > 0
    other = StaticExecutionState(StaticLayout(model, capacities))
    with pytest.raises(ValueError, match="same layout"):
        running.take(other)


@pytest.mark.parametrize("name,concatenate", [("resnet20", False), ("vgg11_bn", True), ("mlp", True)])
@pytest.mark.parametrize("ties", [True, False])
def test_states_updated_together_hold_what_one_update_each_writes(name, concatenate, ties, generator):
    """``StaticStates``: one update of ``k`` masks (the launches of one) writes into each state exactly what its own
    ``update`` would (every buffer, the overflow counters included, with and without tie-breaking uniforms, masks that
    overflow), the states' buffers are rows of shared tensors at fixed addresses, and a ``take`` of ``k`` states equals
    ``k`` takes. The masks come from ``mask_from_uniforms`` of ``(k, channels)`` uniforms, which equals a call per
    row."""
    model = maskprop.create_model(name)
    groups = model.channel_groups()
    capacities = {g: max(1, n // 4) for g, n in groups.items()}  # narrow: a keep-0.5 mask overflows
    layout = StaticLayout(model, capacities, concatenate=concatenate)
    scores = ChannelScores(groups, 0.5)
    with torch.no_grad():
        scores.scores.uniform_(0.0, 1.0, generator=generator)
        scores.scores[: next(iter(groups.values()))] = 0.01  # the first group's channels all likely dropped
    together, prepared, alone = StaticStates(layout, 3), StaticStates(layout, 3), [StaticExecutionState(layout)
                                                                                   for _ in range(3)]
    row_by_row = StaticStates(layout, 3)  # each member's own update writes its row alone
    addresses = [{k: t.data_ptr() for k, t in s.buffers().items()} for s in together]
    for _ in range(2):
        u = torch.rand(3, scores.num_channels, generator=generator)
        u[2] = u[2] * 1e-3 + (1 - 1e-3)  # the third mask keeps almost nothing: no overflow there, unlike the others
        masks = scores.mask_from_uniforms(u)
        for row, mask in zip(u, masks):
            assert torch.equal(scores.mask_from_uniforms(row), mask)  # the empty-group rule row by row
        prepared.update(masks, u if ties else None)
        together.take(prepared)
        for state, mask, row in zip(alone, masks, u):
            state.update(mask, row if ties else None)
        for a, b in zip(together, alone):
            for (key, x), y in zip(a.buffers().items(), b.buffers().values()):
                assert torch.equal(x, y), key
        for state, mask, row in zip(row_by_row, masks, u):
            state.update(mask, row if ties else None)
        for a, b in zip(row_by_row, alone):
            for (key, x), y in zip(a.buffers().items(), b.buffers().values()):
                assert torch.equal(x, y), key
        assert not prepared._rows.overflow_channels.any()
    assert [int(s.overflow_steps) for s in together] == [2, 2, 0]
    assert [{k: t.data_ptr() for k, t in s.buffers().items()} for s in together] == addresses
    assert together[1].mask_used.data_ptr() == together[0].mask_used.data_ptr() + scores.num_channels


def test_bad_masks_for_states_updated_together_are_one_clear_error(generator):
    model = maskprop.create_model("resnet20")
    groups = model.channel_groups()
    layout = StaticLayout(model, dict(groups))
    states = StaticStates(layout, 2)
    n = layout.num_channels
    with pytest.raises(ValueError, match=rf"masks is \({n},\) torch.bool; expected a bool tensor of shape \(2, {n}\)"):
        states.update(torch.ones(n, dtype=torch.bool))
    with pytest.raises(ValueError, match=rf"u is \(1, {n}\) torch.float32 on cpu; expected a float tensor of shape"):
        states.update(torch.ones(2, n, dtype=torch.bool), torch.rand(1, n))
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        StaticStates(layout, 0)
    with pytest.raises(ValueError, match="a state takes one row of buffers, got 2; build states of several rows"):
        StaticExecutionState(layout, states._rows)
    with pytest.raises(ValueError, match="same layout"):
        states.take(StaticStates(layout, 3))


# --- deferred statistics: a pass that can run beside another one ----------------------------------------------------


def _norm_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: b for k, b in model.named_buffers() if k.rsplit(".", 1)[-1] in ("running_mean", "running_var",
                                                                               "num_batches_tracked")}


@pytest.mark.parametrize("name,concatenate", [("resnet20", False), ("vgg11_bn", True), ("mlp", True)])
def test_a_deferred_pass_touches_no_statistics_until_committed_then_as_if_run_in_turn(name, concatenate, generator,
                                                                                       one_thread):
    """Pass B defers its statistics: run before pass A, it neither reads the model's running statistics (NaN while it
    runs) nor writes them or the batch counts; committed after A, they equal those of A then B run in turn (float64),
    and so do B's loss and gradients."""
    torch.manual_seed(0)
    model = nontrivial_batch_norms(maskprop.create_model(name).double()).train()
    groups = model.channel_groups()
    capacities, mask_a, mask_b = _capacities_and_masks(groups, generator)
    layout = StaticLayout(model, capacities, align=8, concatenate=concatenate)
    a, b = StaticExecutionState(layout), StaticExecutionState(layout)
    b.defers_statistics = True
    a.update(mask_a)
    b.update(mask_b)
    x, y = torch.randn(3, *input_size(name), dtype=torch.double), torch.tensor([0, 1, 2])
    reference = copy.deepcopy(model)
    ref_a, ref_b = StaticExecutionState(StaticLayout(reference, capacities, align=8)), None
    ref_a.update(mask_a)
    ref_b = StaticExecutionState(ref_a.layout)
    ref_b.update(mask_b)
    static_step(reference, ref_a, x, y)
    expected_loss, expected_grads, expected = static_step(reference, ref_b, x, y)

    buffers = _norm_buffers(model)
    saved = {k: t.clone() for k, t in buffers.items()}
    versions = {k: t._version for k, t in buffers.items()}
    with torch.no_grad():
        for k, t in buffers.items():
            if t.is_floating_point():
                t.fill_(float("nan"))
    loss_b, grads_b, _ = static_step(model, b, x, y)  # B first
    assert {k: t._version for k, t in buffers.items()} == {k: v + t.is_floating_point() for (k, v), t in
                                                           zip(versions.items(), buffers.values())}  # only the fill
    assert all(torch.equal(t, saved[k]) for k, t in buffers.items() if not t.is_floating_point())  # counts unmoved
    with torch.no_grad():
        for k, t in buffers.items():
            t.copy_(saved[k])
    static_step(model, a, x, y)  # then A, which moves the statistics as usual
    b.commit_statistics()
    torch.testing.assert_close(loss_b, expected_loss, rtol=1e-12, atol=1e-14)
    for k in expected_grads:
        torch.testing.assert_close(grads_b[k], expected_grads[k], rtol=1e-10, atol=1e-12, msg=f"gradient of {k}")
    for k, t in _norm_buffers(model).items():
        torch.testing.assert_close(t, expected[k], rtol=1e-12, atol=1e-14, msg=k)
    b.commit_statistics()  # nothing pending any more: a second commit changes nothing
    for k, t in _norm_buffers(model).items():
        torch.testing.assert_close(t, expected[k], rtol=1e-12, atol=1e-14, msg=k)


@pytest.mark.parametrize("concatenate", [True, False])
def test_a_layout_makes_its_zero_rows_before_any_pass(concatenate, generator):
    """No pass creates a zero row: made inside a step they could be filled on one CUDA stream and read on another."""
    model = maskprop.create_model("resnet20").train()
    capacities, mask, _ = _capacities_and_masks(model.channel_groups(), generator)
    layout = StaticLayout(model, capacities, align=8, concatenate=concatenate)
    rows = dict(layout.plan._zero_rows)
    assert rows
    state = StaticExecutionState(layout)
    state.update(mask)
    static_step(model, state, torch.randn(2, *input_size("resnet20")), torch.tensor([0, 1]))
    assert layout.plan._zero_rows == rows


def test_a_deferring_state_evaluates_with_the_running_statistics(generator):
    """In eval mode nothing is deferred: the layers normalise with the model's running statistics."""
    model = nontrivial_batch_norms(maskprop.create_model("resnet20").double()).eval()
    capacities, mask, _ = _capacities_and_masks(model.channel_groups(), generator)
    plain, deferring = (StaticExecutionState(StaticLayout(model, capacities, align=8)) for _ in range(2))
    deferring.defers_statistics = True
    x = torch.randn(2, *input_size("resnet20"), dtype=torch.double)
    outputs = []
    for state in (plain, deferring):
        state.update(mask)
        with torch.no_grad(), use_static(state):
            outputs.append(model(x))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)


def test_statistics_defer_only_with_one_momentum_for_every_batch_norm(generator):
    model = maskprop.create_model("resnet20")
    capacities, _, _ = _capacities_and_masks(model.channel_groups(), generator)
    assert StaticLayout(model, capacities, align=8).norm_momentum == 0.1
    mlp = maskprop.create_model("mlp")  # no BatchNorm: nothing to defer
    mlp_capacities = mask_capacities(random_mask(mlp.channel_groups(), 0.5, generator), 8)
    assert StaticLayout(mlp, mlp_capacities, 8).can_defer_statistics
    for momentum in (None, 0.2):  # the cumulative average, and two momenta in one model
        changed = copy.deepcopy(model)
        next(m for m in changed.modules() if isinstance(m, SparseBatchNorm2d)).momentum = momentum
        state = StaticExecutionState(StaticLayout(changed, capacities, align=8))
        assert state.layout.norm_momentum is None and not state.layout.can_defer_statistics
        with pytest.raises(ValueError, match="cannot defer their statistics: they need one momentum"):
            state.defers_statistics = True


def test_statistics_do_not_defer_with_a_batch_norm_outside_the_pruned_groups(generator):
    """A BatchNorm of no group (a residual stream kept whole) runs as ``nn.BatchNorm2d`` and updates its statistics
    in the pass itself: a layout with one cannot defer a pass's statistics, though every BatchNorm has momentum 0.1."""
    model = maskprop.create_model("resnet20", prune_residual=False)
    norms = [m for m in model.modules() if isinstance(m, SparseBatchNorm2d)]
    assert any(m.group is None for m in norms) and {m.momentum for m in norms} == {0.1}
    capacities = mask_capacities(random_mask(model.channel_groups(), 0.5, generator), 8)
    state = StaticExecutionState(StaticLayout(model, capacities, align=8))
    assert state.layout.norm_momentum is None and not state.layout.can_defer_statistics and state.layers_count_batches
    with pytest.raises(ValueError, match="cannot defer their statistics"):
        state.defers_statistics = True


# --- no data-dependent operation and no host read inside a step -----------------------------------------------------


class _DataDependentOps(TorchDispatchMode):
    """Records the operators below autograd that read device data on the host or whose output shape depends on the
    data (the backward's included)."""

    HOST_OR_DATA_DEPENDENT = frozenset({"nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
                                        "_local_scalar_dense", "is_nonzero", "equal", "allclose"})

    def __init__(self, found: list[str]) -> None:
        super().__init__()
        self.found = found
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.calls += 1
        if name in self.HOST_OR_DATA_DEPENDENT:
            self.found.append(name)
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
                self.found.append(f"{name} with a boolean mask")
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and (len(args) < 3 or args[-1] is None):
            self.found.append("repeat_interleave without output_size")
        return func(*args, **kwargs)


class _HostReads(TorchFunctionMode):
    """Records the tensor methods that read data to the host without an operator below autograd (``tolist``,
    ``numpy``, Python number conversions)."""

    HOST_READS = frozenset({"tolist", "numpy", "item", "__bool__", "__int__", "__float__", "__index__", "__complex__"})

    def __init__(self, found: list[str]) -> None:
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in self.HOST_READS:
            self.found.append(func.__name__)
        return func(*args, **(kwargs or {}))


class _Recorder:
    """Both recorders at once: ``found`` lists every offending call, ``calls`` the operators seen."""

    def __init__(self) -> None:
        self.found: list[str] = []
        self._stack = contextlib.ExitStack()
        self._ops = _DataDependentOps(self.found)

    @property
    def calls(self) -> int:
        return self._ops.calls

    def __enter__(self) -> _Recorder:
        self._stack.enter_context(_HostReads(self.found))
        self._stack.enter_context(self._ops)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_tie_uniforms_of_any_float_dtype_order_each_group_s_channels_within_its_own_slots(dtype):
    """The kept channels take a group's first slots by increasing ``u`` in every float dtype (``u x 2^32`` overflows
    half precision: the ties are taken in float32), and a draw of 1 (half and bfloat16 round some up) stays in its
    group."""
    model = maskprop.create_model("resnet20")
    groups = model.channel_groups()
    names = list(groups)
    state = StaticExecutionState(StaticLayout(model, {g: n for g, n in groups.items()}, align=1))
    mask = {g: torch.arange(n) % 2 == 0 for g, n in groups.items()}  # even channels kept: no overflow
    u = {g: torch.linspace(0.9, 0, n, dtype=torch.float64).to(dtype) for g, n in groups.items()}  # decreasing
    u[names[0]][1] = 1.0  # a dropped channel of the first group at u = 1
    state.update(torch.cat(list(mask.values())), torch.cat(list(u.values())))
    used = state.mask_used_by_group()
    assert all(torch.equal(used[g], mask[g]) for g in groups)
    assert state.read_overflow().steps == 0
    first = state.index(names[0])  # its slots: kept channels by increasing u, then the dropped ones
    kept = int(mask[names[0]].sum())
    assert torch.equal(first[:kept], torch.arange(0, groups[names[0]], 2).flip(0))
    assert sorted(first.tolist()) == list(range(groups[names[0]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_kept_channel_whose_half_precision_u_is_one_still_comes_before_every_dropped_channel(dtype):
    """A kept channel's ``u`` that half precision rounds up to 1 still sorts before the dropped channels of its
    group, even one at ``u = 0`` with a lower channel number: at a capacity of exactly the kept count nothing is cut."""
    model = maskprop.create_model("resnet20")
    groups = model.channel_groups()
    first = next(iter(groups))
    n = groups[first]
    state = StaticExecutionState(StaticLayout(model, {**groups, first: n // 2}, align=1))
    mask = {g: torch.arange(k) % 2 == 0 for g, k in groups.items()}  # even channels kept: n // 2 in the first group
    u = {g: torch.full((k,), 0.5, dtype=dtype) for g, k in groups.items()}
    u[first][2] = 1.0  # kept, rounded up to 1
    u[first][1] = 0.0  # dropped, before it in channel order
    state.update(torch.cat(list(mask.values())), torch.cat(list(u.values())))
    used = state.mask_used_by_group()
    assert all(torch.equal(used[g], mask[g]) for g in groups)
    assert state.read_overflow().steps == 0
    assert torch.equal(state.index(first).sort().values, torch.arange(0, n, 2))


def test_the_recorder_catches_host_reads_and_data_dependent_shapes():
    t = torch.tensor([1.0, 0.0, 2.0])
    for bad in (lambda: t.sum().item(), lambda: t[t > 0], lambda: t.nonzero(), lambda: bool(t.any()),
                lambda: torch.repeat_interleave(torch.tensor([1, 2])), lambda: t.tolist(), lambda: torch.unique(t)):
        with _Recorder() as recorder:
            bad()
        assert recorder.found, bad


@pytest.mark.parametrize("name,concatenate", [("resnet20", False), ("resnet20", True), ("mlp", True),
                                              ("wrn16_8", False), ("vgg11_bn", True)])
def test_a_static_step_has_no_host_read_and_no_data_dependent_shape(name, concatenate, generator):
    """``update`` (with tie-breaking uniforms, and with an overflow), a training forward and backward, another
    ``update`` and a forward without autograd: none of ``nonzero``, ``masked_select``, ``unique``, ``.item()``,
    boolean-mask indexing or ``repeat_interleave`` without ``output_size``."""
    torch.manual_seed(0)
    model = maskprop.create_model(name).train()
    groups = model.channel_groups()
    capacities, mask_a, mask_b = _capacities_and_masks(groups, generator)
    state = StaticExecutionState(StaticLayout(model, capacities, align=8, concatenate=concatenate))
    flat_a, flat_b = torch.cat(list(mask_a.values())), torch.cat(list(mask_b.values()))
    u = torch.rand(flat_a.shape, generator=generator)
    x, y = torch.randn(4, *input_size(name)), torch.tensor([0, 1, 2, 3])
    with _Recorder() as recorder:
        state.update(flat_b, u)
        with use_static(state):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        state.update(flat_a)
        with torch.no_grad(), use_static(state):
            model(x)
    assert recorder.calls > 100
    assert not recorder.found, recorder.found
    assert state.read_overflow().steps == (2 if len(groups) >= 3 else 1)  # the last group overflows in both


def test_a_step_runs_on_the_meta_device():
    """On ``meta`` (the CUDA code paths, no arithmetic) an update, forward and backward run: nothing needs data."""
    model = maskprop.create_model("resnet20").to("meta").train()
    groups = model.channel_groups()
    state = StaticExecutionState.create(model, mask_capacities(random_mask(groups, 0.5), 8), align=8)
    assert state.layout.concatenate
    mask = torch.empty(sum(groups.values()), dtype=torch.bool, device="meta")
    state.update(mask, torch.empty(mask.shape, device="meta"))
    with use_static(state):
        loss = F.cross_entropy(model(torch.empty(2, 3, 16, 16, device="meta")),
                               torch.zeros(2, dtype=torch.long, device="meta"))
    loss.backward()
    assert model.fc.weight.grad.device.type == "meta"


# --- capacities ------------------------------------------------------------------------------------------------------


def _exact_tail(p: torch.Tensor, capacity: int) -> float:
    """``P(K > capacity)`` of a Poisson-binomial count, by the exact recursion over channels."""
    dist = torch.zeros(p.numel() + 1, dtype=torch.float64)
    dist[0] = 1.0
    for s in p.double():
        dist[1:] = dist[1:] * (1 - s) + dist[:-1] * s
        dist[0] *= 1 - s
    return float(dist[capacity + 1:].sum())


def test_the_normal_quantile_is_close_to_the_exact_poisson_binomial_one():
    generator = torch.Generator().manual_seed(0)
    for n in (16, 64, 512):
        p = torch.rand(n, generator=generator, dtype=torch.float64)
        count = kept_count_moments({"g": p})["g"]
        q = count.quantile(0.999)
        assert _exact_tail(p, q) <= 2e-3 and _exact_tail(p, q - 1) > 4e-4
        assert abs(count.overflow_probability(q) - _exact_tail(p, q)) < 1e-3


def test_choose_capacities_from_channel_scores_and_edge_probabilities():
    model = maskprop.create_model("resnet32")
    groups = model.channel_groups()
    scores = ChannelScores(groups, 0.5)
    capacities = choose_capacities(scores, align=8)
    counts = kept_count_moments(scores)
    for g, n in groups.items():
        c = capacities[g]
        assert c % 8 == 0 or c == n
        assert counts[g].overflow_probability(c) <= 1.5e-3
    assert capacities == choose_capacities(scores.split(scores.scores.detach()), align=8)
    probabilities = {"ones": torch.ones(20), "zeros": torch.zeros(20), "small": torch.zeros(5), "half": torch.full(
        (64,), 0.5)}
    assert choose_capacities(probabilities, align=8) == {"ones": 20, "zeros": 8, "small": 5, "half": 48}
    assert choose_capacities(probabilities, align=1)["zeros"] == 1
    assert KeptCount(20, 20.0, 0.0).overflow_probability(19) == 1.0


def test_mask_capacities_are_aligned_kept_counts():
    mask = {"a": torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool),
            "b": torch.ones(3, dtype=torch.bool)}
    assert mask_capacities(mask, 8) == {"a": 8, "b": 3}
    assert mask_capacities(mask, 1) == {"a": 5, "b": 3}


def test_mask_capacities_of_a_group_that_keeps_nothing_are_its_smallest_valid_capacity():
    """A group the mask empties still gets a capacity a layout accepts: ``min(align, n)``, not 0."""
    mask = {"a": torch.zeros(11, dtype=torch.bool), "b": torch.zeros(3, dtype=torch.bool)}
    assert mask_capacities(mask, 8) == {"a": 8, "b": 3}
    assert mask_capacities(mask, 1) == {"a": 1, "b": 1}
    assert check_capacities(mask_capacities(mask, 8), {"a": 11, "b": 3}, align=8) == {"a": 8, "b": 3}


def test_rechoose_has_hysteresis():
    n = 256

    def at(p: float) -> dict[str, torch.Tensor]:
        return {"g": torch.full((n,), p)}

    capacities = choose_capacities(at(0.5), align=8)  # quantile: 128 + 3.09 x 8 - 1/2 -> 153 -> 160
    assert capacities == {"g": 160}
    same = rechoose_capacities(capacities, at(0.5), align=8)
    assert not same.changed and same.capacities == capacities and same.rechosen == ()
    # A rise that moves the quantile past the capacity (165 -> 168) while it overflows rarely (0.7%): no new shapes.
    assert choose_capacities(at(0.55), align=8) == {"g": 168}
    assert not rechoose_capacities(capacities, at(0.55), align=8).changed
    grown = rechoose_capacities(capacities, at(0.57), align=8)  # overflows 3% of the masks
    assert grown.changed and grown.rechosen == ("g",) and grown.capacities == {"g": 176}
    # A fall that leaves no more than an alignment step of slack keeps the capacity; more shrinks it.
    assert not rechoose_capacities(capacities, at(0.497), align=8).changed  # quantile 152
    shrunk = rechoose_capacities(capacities, at(0.45), align=8)  # quantile 140
    assert shrunk.changed and shrunk.capacities == {"g": 144}
    # Once shrunk, the scores coming back to where they were do not grow it again (it overflows 0.1%).
    assert not rechoose_capacities({"g": 152}, at(0.5), align=8).changed


def test_rechoose_shrinks_only_for_a_saving_worth_a_new_window():
    """Shrinking alone needs ``min_shrink`` of the channels computed per step; a group that must grow takes every
    pending change with it."""
    n = 256
    big = {"a": torch.full((n,), 0.5), "b": torch.full((n,), 0.5), "c": torch.full((n,), 0.5)}
    capacities = choose_capacities(big, align=8)
    assert capacities == {"a": 160, "b": 160, "c": 160}  # 480 channels computed per step
    one_falls = dict(big, a=torch.full((n,), 0.45))  # a's quantile 140 -> 144: 16 channels, 3.3% of 480
    assert choose_capacities(one_falls, align=8)["a"] == 144
    assert not rechoose_capacities(capacities, one_falls, align=8).changed  # default: 5%
    assert rechoose_capacities(capacities, one_falls, align=8, min_shrink=0.03).capacities == dict(capacities, a=144)
    assert rechoose_capacities(capacities, one_falls, align=8, min_shrink=0.0).rechosen == ("a",)
    two_fall = dict(one_falls, b=torch.full((n,), 0.45))  # 32 channels, 6.7%
    assert rechoose_capacities(capacities, two_fall, align=8).capacities == {"a": 144, "b": 144, "c": 160}
    # c overflows 3% of the masks: it grows, and a's pending shrink comes along in the same new window.
    grow_and_fall = dict(one_falls, c=torch.full((n,), 0.57))
    update = rechoose_capacities(capacities, grow_and_fall, align=8)
    assert update.capacities == {"a": 144, "b": 160, "c": 176} and update.rechosen == ("a", "c")
    for bad in (-0.1, 1.0, True, "0.1"):
        with pytest.raises(ValueError, match=r"min_shrink=.* is not in \[0, 1\)"):
            rechoose_capacities(capacities, big, align=8, min_shrink=bad)


@pytest.mark.parametrize("capacities,message", [
    ({"a": 4, "b": 3}, r"capacity 4 of group 'a' is below the alignment 8; expected at least 8"),
    ({"a": 33, "b": 3}, r"capacity 33 of group 'a' is not an integer in \[1, 32\]"),
    ({"a": 8.0, "b": 3}, r"capacity 8.0 of group 'a' is not an integer"),
    ({"a": 8}, r"missing \['b'\]"),
    ({"a": 8, "b": 2}, r"capacity 2 of group 'b' is below the alignment 8; expected at least 3"),
])
def test_bad_capacities_are_one_clear_error(capacities, message):
    with pytest.raises(ValueError, match=message):
        check_capacities(capacities, {"a": 32, "b": 3}, align=8)


def test_bad_capacities_and_masks_for_a_model_are_one_clear_error():
    model = maskprop.create_model("resnet20")
    capacities = dict(model.channel_groups())
    capacities["layer1"] = 4
    with pytest.raises(ValueError, match=r"capacity 4 of group 'layer1' is below the alignment 8"):
        StaticLayout(model, capacities, align=8)
    state = StaticExecutionState.create(model, dict(model.channel_groups()))
    with pytest.raises(ValueError, match=r"expected a flat bool tensor of shape \(\d+,\)"):
        state.update(torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"not all in \[0, 1\]"):
        choose_capacities({"g": torch.tensor([0.5, 1.5])})


# --- batch counts: one per training call of each BatchNorm, as torch's layers count ----------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
def test_layers_that_count_their_own_batches_are_not_counted_again(momentum, generator, one_thread):
    """With a BatchNorm outside the pruned groups (or ``momentum=None``) the layers count their batches themselves
    (:attr:`StaticExecutionState.layers_count_batches`): the write-back must not count them a second time."""
    torch.manual_seed(0)
    model = nontrivial_batch_norms(maskprop.create_model("resnet20", prune_residual=False).double())
    for m in model.modules():
        if isinstance(m, SparseBatchNorm2d):
            m.momentum = momentum
    groups = model.channel_groups()
    capacities, mask, _ = _capacities_and_masks(groups, generator)
    state = StaticExecutionState(StaticLayout(model, capacities, align=8))
    assert state.layers_count_batches
    x, y = torch.randn(3, *input_size("resnet20"), dtype=torch.double), torch.tensor([0, 1, 2])
    _assert_step_equals_masked(model, state, mask, None, x, y)
    assert {int(m.num_batches_tracked) for m in model.modules() if isinstance(m, SparseBatchNorm2d)} == {1}


def test_a_batch_norm_in_eval_mode_counts_no_batch_in_a_training_step(generator, one_thread):
    """A frozen BatchNorm (eval mode) in a training pass neither moves its statistics nor counts a batch, as torch's
    layer; the others count theirs."""
    torch.manual_seed(0)
    model = nontrivial_batch_norms(maskprop.create_model("resnet20").double()).train()
    norms = [m for m in model.modules() if isinstance(m, SparseBatchNorm2d)]
    frozen = norms[1]
    frozen.eval()
    capacities, mask, _ = _capacities_and_masks(model.channel_groups(), generator)
    state = StaticExecutionState(StaticLayout(model, capacities, align=8))
    x, y = torch.randn(3, *input_size("resnet20"), dtype=torch.double), torch.tensor([0, 1, 2])
    _assert_step_equals_masked(model, state, mask, None, x, y)
    assert [int(m.num_batches_tracked) for m in norms] == [0 if m is frozen else 1 for m in norms]


class _SharedUnit(torch.nn.Module):
    """A conv-BN unit applied twice (its BatchNorm counts two batches a pass) and one that never runs (none)."""

    def __init__(self):
        super().__init__()
        from maskprop.models.layers import ConvBNAct
        from maskprop.sparse import SparseLinear

        self.a = ConvBNAct(3, 8, 3, out_group="a")
        self.twice = ConvBNAct(8, 8, 3, in_group="a", out_group="a")
        self.unused = ConvBNAct(8, 8, 3, in_group="a", out_group="b")
        self.fc = SparseLinear(8, 4, in_group="a")

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.twice(self.twice(self.a(x))), 1).flatten(1))


def _deferred_against_in_turn(generator):
    """A deferred pass of ``_SharedUnit`` committed, and the masked reference of its mask: both models."""
    torch.manual_seed(0)
    model = nontrivial_batch_norms(_SharedUnit().double()).train()
    groups = maskprop.channel_groups(model)
    mask = random_mask(groups, 0.5, generator)
    x, y = torch.randn(3, 3, 8, 8, dtype=torch.double), torch.tensor([0, 1, 2])
    reference = copy.deepcopy(model)
    with maskprop.use_mask(reference, mask, "masked"):  # the reference, run in turn
        F.cross_entropy(reference(x), y).backward()
    deferring = StaticExecutionState(StaticLayout(model, dict(groups), align=1))  # capacities: every channel
    deferring.defers_statistics = True
    deferring.update(mask)
    with use_static(deferring):  # the unit never run has no gradient: no static_step
        F.cross_entropy(model(x), y).backward()
    assert {int(m.num_batches_tracked) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0}
    deferring.commit_statistics()
    return model, reference


def test_a_deferred_pass_counts_each_layer_s_calls_when_committed(generator):
    """Committed, a deferred pass counts what its layers ran: two batches for the unit applied twice, none for the
    unit that never ran, as the masked reference (and torch's layers) count them."""
    model, reference = _deferred_against_in_turn(generator)
    counts = {k: int(b) for k, b in model.named_buffers() if k.endswith("num_batches_tracked")}
    assert counts == {"a.1.num_batches_tracked": 1, "twice.1.num_batches_tracked": 2,
                      "unused.1.num_batches_tracked": 0}
    assert counts == {k: int(b) for k, b in reference.named_buffers() if k.endswith("num_batches_tracked")}


def test_a_deferred_pass_moves_the_statistics_of_a_layer_applied_twice_or_never_as_run_in_turn(generator):
    """A unit that ran k times in a deferred pass decays by (1 - momentum)^k at the commit (it decayed once, whatever
    k, before a review found it)."""
    model, reference = _deferred_against_in_turn(generator)
    for (k, b), (_, r) in zip(_norm_buffers(model).items(), _norm_buffers(reference).items()):
        torch.testing.assert_close(b, r, rtol=1e-12, atol=1e-14, msg=k)
