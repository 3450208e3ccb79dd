"""Aligned widths (``align``): padding kept sets with zeroed channels changes nothing but the computed width; the
compact step's bookkeeping makes a fixed number of calls whatever the depth; index sets reach CUDA without blocking."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import edge_case_mask, input_size, nontrivial_batch_norms
from test_sparse import compact_step_equals_masked

import maskprop
from maskprop.sparse import (
    SparseBatchNorm2d,
    SparseConv2d,
    SparseLinear,
    aligned_width,
    execution,
    prepare_mask,
    random_mask,
    use_mask,
)

MODELS = maskprop.list_models()


@pytest.mark.parametrize("name", MODELS)
def test_aligned_compact_equals_unpadded_masked_in_float64(name, generator):
    """Loss, every gradient (zero on dropped and padded channels) and every buffer (padded channels' statistics
    untouched) equal the masked reference of the unpadded mask."""
    torch.manual_seed(0)
    model = nontrivial_batch_norms(maskprop.create_model(name).double())
    mask = edge_case_mask(model.channel_groups(), generator)
    x = torch.randn(3, *input_size(name), dtype=torch.double)
    state = prepare_mask(model, mask, "compact", align=8)
    assert state.padded and any(state.widths[g] > state.kept[g] for g in mask)
    grads_c, _ = compact_step_equals_masked(model, state, mask, x, torch.tensor([0, 1, 2]))
    for mod_name, m in model.named_modules():  # dropped (padded included): exactly zero gradient
        if isinstance(m, (SparseConv2d, SparseLinear)) and m.out_group is not None:
            assert grads_c[f"{mod_name}.weight"][~mask[m.out_group]].count_nonzero() == 0
        if isinstance(m, SparseBatchNorm2d) and m.group is not None:
            assert grads_c[f"{mod_name}.bias"][~mask[m.group]].count_nonzero() == 0


@pytest.mark.parametrize("align", [1, 8])
@pytest.mark.parametrize("name", ["resnet20", "wrn16_8", "mlp", "vgg11_bn", "resnet50"])
def test_concatenated_gathers_as_on_cuda_equal_the_masked_reference(name, align, generator):
    """The gathers CUDA takes (all weights of one kernel area from their concatenation, one call) run here on the CPU,
    where the default gathers layer by layer: exact in float64 as well."""
    from maskprop.sparse.execution import ExecutionState

    torch.manual_seed(0)
    model = nontrivial_batch_norms(maskprop.create_model(name).double())
    mask = edge_case_mask(model.channel_groups(), generator)
    x = torch.randn(3, *input_size(name), dtype=torch.double)
    groups = model.channel_groups()
    state = ExecutionState({g: mask[g] for g in groups}, model, "compact", align=align, concatenate=True)
    assert state.concatenate and not prepare_mask(model, mask).concatenate
    compact_step_equals_masked(model, state, mask, x, torch.tensor([0, 1, 2]))


def test_padded_widths_are_computed_and_padded_outputs_are_zero(generator):
    model = maskprop.create_model("resnet20").train()
    groups = model.channel_groups()
    mask = random_mask(groups, 0.3, generator)
    outputs = {}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: outputs.__setitem__(n, (mod.group, o.detach())))
               for n, m in model.named_modules() if isinstance(m, SparseBatchNorm2d)]
    state = prepare_mask(model, mask, "compact", align=8)
    with use_mask(model, state):
        model(torch.randn(2, 3, 16, 16))
    for h in handles:
        h.remove()
    for name, (group, out) in outputs.items():
        kept, width = int(mask[group].sum()), state.widths[group]
        assert out.shape[1] == width == aligned_width(kept, groups[group], 8), name
        index = state.index(group)
        real = mask[group][index]
        assert out[:, ~real].abs().max() == 0 if (~real).any() else True, name
        assert int(real.sum()) == kept


def test_padding_stops_at_the_group_size():
    """A group smaller than ``align`` (or one whose rounded-up width would pass its size) runs at most its size."""
    assert aligned_width(5, 12, 8) == 8 and aligned_width(9, 12, 8) == 12 and aligned_width(3, 4, 8) == 4
    assert aligned_width(12, 12, 8) == 12 and aligned_width(1, 100, 1) == 1
    bn = SparseBatchNorm2d(6, group="g").double()
    conv = SparseConv2d(3, 6, 3, padding=1, out_group="g").double()
    model = torch.nn.Sequential(conv, bn)
    mask = {"g": torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.bool)}
    state = prepare_mask(model, mask, "compact", align=8)
    assert state.widths == {"g": 6} and state.kept == {"g": 2}
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 5, 5, dtype=torch.double)
    with use_mask(model, state):
        out = model(x)
    with use_mask(reference, mask, "masked"):
        expected = reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bn.running_mean, reference[1].running_mean, rtol=1e-12, atol=0)


def _two_units(first: dict, second: dict) -> torch.nn.Sequential:
    """conv -> BatchNorm (group g, ``first``'s options) -> conv -> BatchNorm (group h, ``second``'s) -> classifier,
    with random affine parameters and running statistics where the BatchNorms have them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        SparseConv2d(3, 12, 3, padding=1, out_group="g"), SparseBatchNorm2d(12, group="g", **first), torch.nn.ReLU(),
        SparseConv2d(12, 10, 3, padding=1, in_group="g", out_group="h"), SparseBatchNorm2d(10, group="h", **second),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), SparseLinear(10, 4, in_group="h")).double()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            if bn.affine:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
            if bn.running_mean is not None:
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 1.5)
    return model


_TWO_UNIT_MASK = {"g": torch.tensor([0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0], dtype=torch.bool),  # 3 kept: width 4
                  "h": torch.tensor([1, 0, 0, 1, 1, 0, 0, 1, 1, 0], dtype=torch.bool)}  # 5 kept: width 8


def test_a_batch_norm_without_running_statistics_zeroes_its_padded_channels():
    """A BatchNorm outside the packed gather (affine, no running statistics) is gathered on its own; its padded
    channels' weight and bias are multiplied by zero as the packed ones are, so the padded step equals the masked
    reference of the unpadded mask (loss, every gradient, every buffer)."""
    model = _two_units({}, {"track_running_stats": False})
    state = prepare_mask(model, _TWO_UNIT_MASK, "compact", align=4)
    assert state.padded and state.widths == {"g": 4, "h": 8}
    assert id(model[4]) not in state._norm_position  # not in the packed gather
    x = torch.randn(4, 3, 6, 6, dtype=torch.double)
    compact_step_equals_masked(model, state, _TWO_UNIT_MASK, x, torch.tensor([0, 1, 2, 3]))


def test_a_batch_norm_without_affine_parameters_writes_back_only_its_kept_channels_statistics():
    """A BatchNorm outside the packed gather (running statistics, no affine parameters) writes back the statistics of
    its kept channels only: its padded channels' stay as they were, as in the masked reference; its kept channels'
    outputs and statistics equal the reference's."""
    model = _two_units({"affine": False}, {})[:2]
    reference = copy.deepcopy(model)
    mask = {"g": _TWO_UNIT_MASK["g"]}
    state = prepare_mask(model, mask, "compact", align=4)
    assert state.padded and state.widths == {"g": 4} and id(model[1]) not in state._norm_position
    x = torch.randn(4, 3, 6, 6, dtype=torch.double)
    with use_mask(model, state):
        out = model(x)
    with use_mask(reference, mask, "masked"):
        expected = reference(x)
    real = mask["g"][state.index("g")]
    assert int(real.sum()) == 3
    torch.testing.assert_close(out[:, real], expected[:, mask["g"]], rtol=1e-10, atol=1e-12)
    for stat in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(model[1], stat), getattr(reference[1], stat), rtol=1e-12, atol=0, msg=stat)
    assert not torch.equal(model[1].running_mean[mask["g"]], _two_units({"affine": False}, {})[1].running_mean[
        mask["g"]])  # the kept channels did move


@pytest.mark.parametrize("options", [{"affine": False}, {"affine": False, "track_running_stats": False}])
def test_a_batch_norm_without_affine_parameters_zeroes_its_padded_outputs(options):
    """The conv before a grouped BatchNorm leaves its padded outputs to that BatchNorm; one without a weight and
    bias to zero multiplies its padded outputs by zero instead, so that the next layer reads zeros there (they leaked
    through before: 0.63 off the masked reference at align 4): the padded step equals the masked reference of the
    unpadded mask (loss, every gradient, every buffer)."""
    model = _two_units(options, {})
    state = prepare_mask(model, _TWO_UNIT_MASK, "compact", align=4)
    assert state.padded and id(model[1]) not in state._norm_position
    x = torch.randn(4, 3, 6, 6, dtype=torch.double)
    compact_step_equals_masked(model, state, _TWO_UNIT_MASK, x, torch.tensor([0, 1, 2, 3]))


@pytest.mark.parametrize("align", [0, -8, 2.5, "8", True])
def test_bad_align_is_one_clear_error(align):
    model = maskprop.create_model("resnet20")
    mask = random_mask(model.channel_groups(), 0.5)
    with pytest.raises(ValueError, match=r"align=.* is not a positive integer"):
        prepare_mask(model, mask, "compact", align=align)


def test_float32_training_steps_with_several_units_and_repeated_forwards(generator):
    """Two forwards with autograd inside one block (the BatchNorm statistics of all units updated in place between
    them) back-propagate, and match the masked reference."""
    torch.manual_seed(0)
    model = maskprop.create_model("vgg11_bn")
    reference = copy.deepcopy(model)
    mask = random_mask(model.channel_groups(), 0.5, generator)
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    losses = []
    for m, mode in ((model, "compact"), (reference, "masked")):
        with use_mask(m, mask, mode, align=8 if mode == "compact" else 1):
            total = F.cross_entropy(m(x), y) + F.cross_entropy(m(x.flip(0)), y)
        total.backward()
        losses.append(total.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (k, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=k)
    for (k, b), c in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=k)


def test_optimizer_steps_inside_one_block_are_seen_by_the_next_forward(generator):
    """A prepared state reused across steps gathers the weights afresh in every forward pass."""
    torch.manual_seed(0)
    model = maskprop.create_model("resnet20").double()
    mask = random_mask(model.channel_groups(), 0.5, generator)
    x = torch.randn(2, 3, 16, 16, dtype=torch.double)
    state = prepare_mask(model, mask)
    with torch.no_grad(), use_mask(model, state):
        before = model(x)
        for p in model.parameters():
            p.mul_(1.5)
        after = model(x)
    with torch.no_grad(), use_mask(model, mask, "masked"):
        expected = model(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-10, atol=1e-12)


def test_fused_optimizer_steps_are_seen_by_the_next_step(generator):
    """Torch's fused SGD on the CPU updates weights without bumping their version counters: the next compact step
    must still run on the updated weights (as the masked reference does)."""
    torch.manual_seed(0)
    model = maskprop.create_model("resnet20").double()
    reference = copy.deepcopy(model)
    mask = random_mask(model.channel_groups(), 0.5, generator)
    x = torch.randn(4, 3, 16, 16, dtype=torch.double)
    y = torch.tensor([0, 1, 2, 3])
    losses = {}
    for m, mode in ((model, "compact"), (reference, "masked")):
        optimizer = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9, fused=True)
        state = prepare_mask(m, mask, mode)
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            with use_mask(m, state):
                loss = F.cross_entropy(m(x), y)
            loss.backward()
            optimizer.step()
            losses.setdefault(mode, []).append(loss.item())
    assert losses["compact"] == pytest.approx(losses["masked"], rel=1e-10)
    assert losses["compact"][0] != pytest.approx(losses["compact"][2], rel=1e-3)


def _bookkeeping(name: str | torch.nn.Module) -> int:
    """Calls of a compact VR-PGE step on the meta device (the CUDA paths) that only gather and scatter (``name``: a
    registered model, or a model). The forward's own concatenations (``torch.cat`` of a DenseNet) are not counted."""
    from torch.utils._python_dispatch import TorchDispatchMode

    gathers = {"index_select", "index", "cat", "index_copy_", "index_add_", "new_zeros", "zeros", "_foreach_copy_",
               "repeat_interleave", "arange", "mul", "split_with_sizes", "unsafe_split_with_sizes", "_to_copy"}
    torch.manual_seed(0)
    model = maskprop.create_model(name) if isinstance(name, str) else name
    model = model.to("meta").train()
    x = torch.randn(2, 3, 8, 8, device="meta")
    y = torch.zeros(2, dtype=torch.long, device="meta")
    g = torch.Generator().manual_seed(0)
    groups = maskprop.channel_groups(model)
    m, m2 = random_mask(groups, 0.5, g), random_mask(groups, 0.5, g)
    calls = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in gathers and not (name == "cat" and args[1:] == (1,)):
                calls.append(name)
            return func(*args, **(kwargs or {}))

    with Count():
        with use_mask(model, m, align=8):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        with torch.no_grad(), use_mask(model, m2, align=8):
            model(x)
    return len(calls)


def test_gathering_makes_a_fixed_number_of_calls_whatever_the_depth():
    """ResNet-20 and ResNet-56 (3x the units) make the same number of gathering calls per compact step; so do two
    DenseNets of 2 and 6 layers a block, whose concatenated groups have 2-6 parts."""
    assert _bookkeeping("resnet20") == _bookkeeping("resnet56")

    def densenet(layers: int) -> torch.nn.Module:
        model = torchvision.models.DenseNet(growth_rate=8, block_config=(layers, layers), num_init_features=8,
                                            bn_size=2, num_classes=10)
        return maskprop.make_prunable(model, (3, 8, 8))

    assert _bookkeeping(densenet(2)) == _bookkeeping(densenet(6))

    def preparing(model: torch.nn.Module) -> int:  # every tensor call that prepares a mask, on the host or not
        from torch.utils._python_dispatch import TorchDispatchMode

        model = model.to("meta")
        mask = random_mask(maskprop.channel_groups(model), 0.5, torch.Generator().manual_seed(0))
        calls = []

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                calls.append(func)
                return func(*args, **(kwargs or {}))

        with Count():
            maskprop.sparse.prepare_mask(model, mask, align=8)
        return len(calls)

    assert preparing(densenet(2)) == preparing(densenet(6))


def test_index_sets_go_to_cuda_once_from_pinned_memory_without_blocking(monkeypatch):
    """Where CUDA is the target, the one copy of a mask's index sets is pinned and non-blocking (checked here with
    the copy recorded instead of made; the meta device takes the same one-copy route)."""
    calls = []

    def pin_memory(self, *args, **kwargs):
        calls.append("pin")
        return self

    def to(self, *args, **kwargs):
        calls.append(("to", str(args[0]), kwargs.get("non_blocking")))
        return self

    host = torch.arange(10)
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "pin_memory", pin_memory)
        patch.setattr(torch.Tensor, "to", to)
        execution.to_device(host, torch.device("cuda"))
    assert calls == ["pin", ("to", "cuda", True)]
    copies = []
    original = execution.to_device
    monkeypatch.setattr(execution, "to_device", lambda t, d: copies.append(d.type) or original(t, d))
    model = maskprop.create_model("resnet20").to("meta")
    prepare_mask(model, random_mask(model.channel_groups(), 0.5), "compact", align=8)
    assert copies == ["meta"]
