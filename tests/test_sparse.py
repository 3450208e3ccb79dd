"""Compact execution equals the masked reference; dropped channels do not exist for the step."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import edge_case_mask, input_size

import maskprop
from maskprop.sparse import SparseBatchNorm2d, SparseConv2d, SparseLinear, full_mask, random_mask, use_mask
from maskprop.sparse.gather import gather_rows, gather_side, split_padded

MODELS = maskprop.list_models()


def run_step(model, mask, mode, x, y):
    """One training forward/backward; returns loss, gradients and buffers."""
    model.zero_grad(set_to_none=True)
    with use_mask(model, mask, mode):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    return loss.detach(), grads, buffers


def compact_step_equals_masked(model, compact, mask, x, y):
    """A training step of ``model`` under ``compact`` (a mask or a prepared state) against the masked reference of
    ``mask`` on a copy: the same loss, gradients and buffers in float64. Returns the compact step's gradients and
    buffers for further checks."""
    reference = copy.deepcopy(model)
    loss_c, grads_c, buffers_c = run_step(model, compact, "compact", x, y)
    loss_m, grads_m, buffers_m = run_step(reference, mask, "masked", x, y)
    torch.testing.assert_close(loss_c, loss_m, rtol=1e-10, atol=1e-12)
    for k in grads_m:
        torch.testing.assert_close(grads_c[k], grads_m[k], rtol=1e-8, atol=1e-10, msg=f"gradient of {k}")
    for k in buffers_m:
        torch.testing.assert_close(buffers_c[k], buffers_m[k], rtol=1e-10, atol=1e-12, msg=f"buffer {k}")
    return grads_c, buffers_c


# channels_last on a network of each CIFAR kind and the ImageNet stem (widths sending compact BatchNorm to
# maskprop.sparse.batchnorm, and but for ResNet-20's to the native kernel too): the others add time, not paths.
CHANNELS_LAST_MODELS = ["resnet20", "resnet18", "vgg11_bn", "wrn16_8"]


@pytest.mark.parametrize(("name", "channels_last"), [(name, False) for name in MODELS]
                         + [(name, True) for name in CHANNELS_LAST_MODELS],
                         ids=[f"{name}-nchw" for name in MODELS] + [f"{name}-channels_last" for name in
                                                                    CHANNELS_LAST_MODELS])
def test_compact_equals_masked(name, channels_last, generator, monkeypatch):
    """Also in channels_last, where compact BatchNorm with kept counts off the multiples of 16 (below 64) runs
    ``maskprop.sparse.batchnorm`` instead of the native kernel: there a third of each group (the edge-case mask's
    single channel of the stem would make every later map as contiguous as channels_last, so torch's convolutions
    would give back contiguous maps)."""
    from maskprop.sparse import batchnorm

    torch.manual_seed(0)
    model = maskprop.create_model(name).double()
    # Non-trivial BN statistics and affine parameters so that leaks would show.
    for m in model.modules():
        if isinstance(m, SparseBatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    groups = model.channel_groups()
    mask = random_mask(groups, 0.3, generator) if channels_last else edge_case_mask(groups, generator)
    x = torch.randn(3, *input_size(name), dtype=torch.double)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    served = []
    monkeypatch.setattr(batchnorm, "eligible", lambda t, eligible=batchnorm.eligible: served.append(eligible(t))
                        or served[-1])
    y = torch.tensor([0, 1, 2])
    before = {k: b.clone() for k, b in model.named_buffers()}
    grads_c, buffers_c = compact_step_equals_masked(model, mask, mask, x, y)
    assert (True in served) == channels_last  # maskprop's BatchNorm kernel where channels_last, only there

    # Dropped channels: no gradient, and BatchNorm statistics untouched.
    for mod_name, m in model.named_modules():
        if isinstance(m, (SparseConv2d, SparseLinear)):
            if m.out_group is not None:
                dropped = ~mask[m.out_group]
                assert grads_c[f"{mod_name}.weight"][dropped].count_nonzero() == 0
            if m.in_group is not None:
                dropped = ~mask[m.in_group]
                assert grads_c[f"{mod_name}.weight"][:, dropped].count_nonzero() == 0
        if isinstance(m, SparseBatchNorm2d) and m.group is not None:
            dropped = ~mask[m.group]
            assert grads_c[f"{mod_name}.weight"][dropped].count_nonzero() == 0
            assert grads_c[f"{mod_name}.bias"][dropped].count_nonzero() == 0
            for stat in ("running_mean", "running_var"):
                key = f"{mod_name}.{stat}"
                assert torch.equal(buffers_c[key][dropped], before[key][dropped])
            if mask[m.group].any():
                kept, key = mask[m.group], f"{mod_name}.running_mean"
                assert not torch.equal(buffers_c[key][kept], before[key][kept])


@pytest.mark.parametrize("name", ["resnet20", "vgg11_bn", "wrn16_8", "resnet50", "mlp"])
@pytest.mark.parametrize("mode", ["compact", "masked"])
def test_all_true_mask_is_dense(name, mode):
    torch.manual_seed(0)
    model = maskprop.create_model(name)
    dense_model = copy.deepcopy(model)
    x = torch.randn(2, *input_size(name))
    y = torch.tensor([0, 1])
    loss, grads, buffers = run_step(model, full_mask(model.channel_groups()), mode, x, y)
    loss_d, grads_d, buffers_d = run_step(dense_model, None, mode, x, y)
    assert torch.equal(loss, loss_d)
    assert all(torch.equal(grads[k], grads_d[k]) for k in grads)
    assert all(torch.equal(buffers[k], buffers_d[k]) for k in buffers)


@pytest.mark.parametrize("name", ["resnet32", "vgg11_bn", "wrn16_8", "resnet50", "mlp"])
def test_dropped_channels_output_exactly_zero_and_compact_widths(name, generator):
    """Masked mode: every unit output is zero on dropped channels. Compact mode: it has only the kept channels."""
    model = maskprop.create_model(name).train()
    mask = random_mask(model.channel_groups(), 0.5, generator)
    outputs: dict[str, tuple[str, torch.Tensor]] = {}

    def record(module_name, group):
        def hook(module, inputs, output):
            outputs[module_name] = (group, output.detach())
        return hook

    handles = []
    for module_name, m in model.named_modules():
        if isinstance(m, SparseBatchNorm2d) and m.group is not None:
            handles.append(m.register_forward_hook(record(module_name, m.group)))
        elif isinstance(m, (SparseConv2d, SparseLinear)) and m.mask_output and m.out_group is not None:
            handles.append(m.register_forward_hook(record(module_name, m.out_group)))
    assert handles
    x = torch.randn(2, *input_size(name))
    with use_mask(model, mask, "masked"):
        model(x)
    for module_name, (group, out) in outputs.items():
        assert out[:, ~mask[group]].abs().max() == 0, module_name
        assert out[:, mask[group]].abs().max() > 0, module_name
    outputs.clear()
    with use_mask(model, mask, "compact"):
        model(x)
    for module_name, (group, out) in outputs.items():
        assert out.shape[1] == int(mask[group].sum()), module_name
    for h in handles:
        h.remove()


def test_eval_mode_uses_kept_running_statistics(generator):
    torch.manual_seed(0)
    model = maskprop.create_model("resnet20").double()
    x = torch.randn(4, 3, 16, 16, dtype=torch.double)
    for _ in range(3):  # give the running statistics non-trivial values
        model(x)
    model.eval()
    mask = random_mask(model.channel_groups(), 0.4, generator)
    with torch.no_grad(), use_mask(model, mask, "compact"):
        compact = model(x)
    with torch.no_grad(), use_mask(model, mask, "masked"):
        masked = model(x)
    torch.testing.assert_close(compact, masked, rtol=1e-10, atol=1e-12)


def test_use_mask_restores_dense_and_nests(generator):
    model = maskprop.create_model("resnet20")
    groups = model.channel_groups()
    outer, inner = random_mask(groups, 0.5, generator), random_mask(groups, 0.25, generator)
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        dense = model(x)
        with use_mask(model, outer):
            out_outer = model(x)
            with use_mask(model, inner):
                model(x)
            torch.testing.assert_close(model(x), out_outer)
        torch.testing.assert_close(model(x), dense)


class _Twice(torch.nn.Module):
    """Runs one network twice in its forward: each of its layers is called twice in one forward of the model."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x) + self.net(x.flip(-1))


def test_a_forward_of_the_model_is_one_pass_that_gathers_once(generator):
    """The pass starts and ends with the model's forward, whatever its layers do in between: layers called twice in one
    forward read the tensors gathered once (exact against the masked reference, running statistics updated twice), the
    statistics go back once per forward, and the next forward (after an optimizer step) gathers the new weights."""
    torch.manual_seed(0)
    model = _Twice(maskprop.create_model("resnet20")).double()
    reference = copy.deepcopy(model)
    mask = random_mask(model.net.channel_groups(), 0.5, generator)
    state = maskprop.sparse.prepare_mask(model, mask)
    calls = {"weights": 0, "norms": 0, "flush": 0}
    for name in ("_gather_weights", "_gather_norms"):
        original = getattr(state, name)
        key = "weights" if "weights" in name else "norms"

        def counted(original=original, key=key):
            calls[key] += 1
            return original()
        setattr(state, name, counted)
    flush = state.flush

    def counted_flush():
        calls["flush"] += state._norm_pass is not None and state._norm_pass.updated
        flush()
    state.flush = counted_flush
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.double), torch.randint(0, 10, (4,))
    sgd, sgd_ref = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(reference.parameters(), lr=0.1)
    with use_mask(model, state):
        for step in range(2):
            loss = F.cross_entropy(model(x), y)
            sgd.zero_grad()
            loss.backward()
            sgd.step()
            assert calls == {"weights": step + 1, "norms": step + 1, "flush": step + 1}
    with use_mask(reference, mask, "masked"):
        for _ in range(2):
            loss_ref = F.cross_entropy(reference(x), y)
            sgd_ref.zero_grad()
            loss_ref.backward()
            sgd_ref.step()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=1e-12)
    for (k, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=k)


def test_a_layer_run_outside_the_models_forward_gathers_and_writes_back_at_the_end_of_the_block(generator):
    torch.manual_seed(0)
    model = maskprop.create_model("resnet20").double()
    reference = copy.deepcopy(model)
    mask = random_mask(model.channel_groups(), 0.5, generator)
    x = torch.randn(4, 3, 16, 16, dtype=torch.double)

    def start(net):  # the stem and first stage, called one by one (not through the model's forward)
        return net.layer1(net.maxpool(net.act1(net.bn1(net.conv1(x)))))
    with use_mask(model, mask):
        out = start(model)
    with use_mask(reference, mask, "masked"):
        expected = start(reference)
    group = model.layer1[-1].bn2.group
    kept = mask[group] if out.shape[1] < expected.shape[1] else torch.ones(expected.shape[1], dtype=torch.bool)
    torch.testing.assert_close(out, expected[:, kept], rtol=1e-10, atol=1e-12)
    for (k, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=k)


def test_gather_rows_matches_indexing_and_its_gradient():
    torch.manual_seed(0)
    source = torch.randn(30, 9, dtype=torch.double, requires_grad=True)
    index = torch.tensor([0, 2, 5, 17, 29])
    torch.testing.assert_close(gather_rows(source, index), source[index])
    assert torch.autograd.gradcheck(lambda s: gather_rows(s, index), (source,))
    with torch.no_grad():
        assert not gather_rows(source, index).requires_grad


@pytest.mark.parametrize("dim", [0, 1, None], ids=["rows", "columns", "flat rows"])
def test_gather_side_reads_a_weight_on_its_pruned_sides_with_its_gradient(dim):
    """A 6 x 5 x 3 x 3 weight's kept outputs, inputs or both: W[out][:, in], and torch's gradient of it."""
    torch.manual_seed(0)
    weight = torch.randn(6, 5, 3, 3, dtype=torch.double, requires_grad=True)
    out_index, in_index = torch.tensor([0, 2, 5]), torch.tensor([1, 4])
    index = {0: out_index, 1: in_index, None: (out_index[:, None] * 5 + in_index).view(-1)}[dim]
    rows, columns = (out_index if dim != 1 else torch.arange(6)), (in_index if dim != 0 else torch.arange(5))
    expected = weight[rows][:, columns]
    torch.testing.assert_close(gather_side(weight, dim, index, 9, 5).view_as(expected), expected, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda w: gather_side(w, dim, index, 9, 5), (weight,))
    with torch.no_grad():  # without autograd (an evaluation): index_select along the same side
        torch.testing.assert_close(gather_side(weight, dim, index, 9, 5).view_as(expected), expected, rtol=0, atol=0)


def test_on_the_cpu_a_tensor_pruned_on_one_side_is_read_by_its_groups_index_alone(generator):
    """The CPU path reads a tensor whose input side is whole (the first conv) by its output channels, one
    whose output side is whole (the classifier) by its input channels, and only one pruned on both by flat rows: an
    index per kept entry, which for a transformer's linear layers would outweigh the weights it gathers."""
    from maskprop.sparse.execution import ExecutionState

    model = maskprop.create_model("resnet20")
    mask = random_mask(model.channel_groups(), 0.5, generator)
    state = ExecutionState(mask, model, "compact")
    dims = {(state.plan.name_of(g.piece.layer), g.piece.kind): g.dim for g in state._layer_gathers}
    assert dims[("conv1", "weight")] == 0 and dims[("fc", "weight")] == 1 and dims[("layer1.0.conv1", "weight")] is None
    for g in state._layer_gathers:
        side = {0: g.piece.shape[0], 1: g.piece.shape[1]}
        assert g.index.numel() == side.get(g.dim, g.piece.shape[0] * g.piece.shape[1])
    assert not state._weights  # nothing gathered by tables on the CPU without padding


def test_split_padded_leaves_the_padding_out_and_its_gradient_zero():
    """Pieces of 3, 2 and 4 rows followed by 1, 2 and 0 padding rows; the middle piece gets no gradient."""
    torch.manual_seed(0)
    rows = torch.randn(12, 3, dtype=torch.double, requires_grad=True)
    pieces = split_padded(rows, [3, 2, 4], [1, 2, 0])
    for piece, start in zip(pieces, (0, 4, 8)):
        assert torch.equal(piece, rows[start:start + piece.shape[0]])
    (2 * pieces[0].sum() + pieces[2].square().sum()).backward()
    expected = torch.zeros_like(rows)
    expected[0:3] = 2
    expected[8:12] = 2 * rows[8:12].detach()
    assert torch.equal(rows.grad, expected)
    assert torch.autograd.gradcheck(lambda r: split_padded(r, [3, 2, 4], [1, 2, 0]), (rows,))
    with torch.no_grad():
        assert [p.shape[0] for p in split_padded(rows, [3, 2, 4], [1, 2, 0])] == [3, 2, 4]
    unpadded = torch.randn(9, 3, dtype=torch.double, requires_grad=True)  # no padding at all: the backward makes none
    assert torch.autograd.gradcheck(lambda r: split_padded(r, [3, 2, 4], [0, 0, 0]), (unpadded,))
    assert torch.autograd.gradcheck(lambda r: split_padded(r, [3, 2, 4], [0, 0, 0])[1], (unpadded,))


# --- bad input: one clear error each -------------------------------------------------------------------------------


@pytest.fixture
def small_model():
    return maskprop.create_model("resnet20")


def test_mask_with_unknown_group(small_model):
    mask = full_mask(small_model.channel_groups())
    mask["layer9"] = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"unknown group\(s\) 'layer9'"):
        with use_mask(small_model, mask):
            pass


def test_mask_with_wrong_size(small_model):
    mask = full_mask(small_model.channel_groups())
    mask["layer2"] = torch.ones(31, dtype=torch.bool)
    expected = r"group 'layer2' is \(31,\) torch.bool; expected a bool tensor of shape \(32,\)"
    with pytest.raises(ValueError, match=expected):
        with use_mask(small_model, mask):
            pass


def test_mask_not_bool(small_model):
    mask = full_mask(small_model.channel_groups())
    mask["layer2"] = torch.ones(32)
    with pytest.raises(ValueError, match="expected a bool tensor"):
        with use_mask(small_model, mask):
            pass


def test_mask_on_the_meta_device(small_model):
    mask = full_mask(small_model.channel_groups())
    mask["layer2"] = torch.ones(32, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="^mask for group 'layer2' is on the meta device; expected a tensor with "
                                         "values"):
        with use_mask(small_model, mask):
            pass


def test_mask_for_another_model(small_model):
    other = full_mask(maskprop.create_model("resnet32", width=1).channel_groups())
    with pytest.raises(ValueError, match="another model"):
        with use_mask(small_model, other):
            pass
    fewer = full_mask(small_model.channel_groups())
    with pytest.raises(ValueError, match="missing group"):
        with use_mask(maskprop.create_model("resnet32", width=1), fewer):
            pass


def test_empty_group_is_an_error(small_model):
    mask = full_mask(small_model.channel_groups())
    mask["layer1.0.conv1"][:] = False
    with pytest.raises(ValueError, match=r"keeps no channel of group\(s\) 'layer1.0.conv1'"):
        with use_mask(small_model, mask):
            pass


def test_unknown_mode(small_model):
    with pytest.raises(ValueError, match=r"unknown execution mode 'sparse'; expected one of \('compact', 'masked'\)"):
        with use_mask(small_model, full_mask(small_model.channel_groups()), mode="sparse"):
            pass


def test_random_mask_ratio_is_validated():
    with pytest.raises(ValueError, match=r"keep_ratio must be a number in \(0, 1\], got 1.5"):
        random_mask({"a": 4}, 1.5)


@pytest.mark.parametrize("layer", ["maskprop.sparse.SparseConv2d(10, 19, 1, stride=2)",
                                   "maskprop.sbp.SparseBackwardConv2d(10, 19, 1, stride=2, k=19)"])
@pytest.mark.parametrize(("threads", "batch", "side"), [(2, 9, 32), (3, 16, 32), (1, 8, 112)])
def test_strided_1x1_conv_with_an_odd_batch_trains_without_the_onednn_crash(layer, threads, batch, side):
    """oneDNN's CPU weight gradient of a strided 1x1 conv corrupts the heap for some channel counts when the thread
    count does not divide the batch (9 on two threads, 16 on three), and for fewer than 16 channels on maps of 56 x 56
    or more on any threads (10 channels on 112 x 112); maskprop's convolutions route those inputs around it
    (``maskprop._workarounds``). In a child process, since a crash would take pytest down with it; the float32 output
    and gradients must equal those of the plain strided convolution in float64 (which oneDNN does not run)."""
    script = f"""
import torch, torch.nn.functional as F
import maskprop, maskprop.sbp, maskprop.sparse
torch.manual_seed(0)
conv = {layer}
x = torch.randn({batch}, 10, {side}, {side}).contiguous(memory_format=torch.channels_last)
torch.set_num_threads({threads})
grads = []
for module in (conv, None):
    xi = x.clone().requires_grad_() if module is not None else x.double().requires_grad_()
    w = conv.weight if module is not None else conv.weight.detach().double().requires_grad_()
    bias = conv.bias.detach().double() if conv.bias is not None else None
    for _ in range(3):  # the heap's corruption shows at a later allocation
        xi.grad = w.grad = None
        out = module(xi) if module is not None else F.conv2d(xi, w, bias, stride=2)
        out.square().sum().backward()
    grads.append((out.detach().double(), xi.grad.double(), w.grad.double()))
for got, want in zip(*grads):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-500:]


@pytest.mark.parametrize("channels", [3, 8, 12, 17, 24])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_channels_last_batch_norm_matches_native_in_float64(channels, affine):
    """``maskprop.sparse.batchnorm`` against torch's own BatchNorm on a contiguous copy: output, batch statistics,
    and the gradients of the input and the affine parameters."""
    from maskprop.sparse import batchnorm

    torch.manual_seed(channels)
    x = (torch.randn(4, channels, 4, 4, dtype=torch.double) * 3 + 2).contiguous(memory_format=torch.channels_last)
    assert batchnorm.eligible(x)
    weight = torch.rand(channels, dtype=torch.double) + 0.5 if affine in ("both", "weight") else None
    bias = torch.randn(channels, dtype=torch.double) if affine in ("both", "bias") else None
    leaves = [t.requires_grad_() for t in (x, weight, bias) if t is not None]
    y, mean, var = batchnorm.batch_norm_nhwc(x, weight, bias, 1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    reference = F.batch_norm(x.contiguous(), None, None, weight, bias, True, 0.0, 1e-5)
    torch.testing.assert_close(y, reference)
    torch.testing.assert_close(mean, x.detach().mean(dim=(0, 2, 3)))
    torch.testing.assert_close(var, x.detach().var(dim=(0, 2, 3), correction=0))
    grad = torch.randn_like(reference)
    got = torch.autograd.grad(y, leaves, grad)
    want = torch.autograd.grad(reference, leaves, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    small = x.detach()[:2, :, :2, :].contiguous(memory_format=torch.channels_last)  # 16 positions
    assert batchnorm.eligible(small)
    assert torch.autograd.gradcheck(lambda *t: batchnorm.batch_norm_nhwc(*t, 1e-5)[0],
                                    tuple(t.detach().requires_grad_() if t is not None else None
                                          for t in (small, weight, bias)))


def test_channels_last_batch_norm_serves_only_where_the_native_kernel_is_slow():
    from maskprop.sparse import batchnorm

    def cl(*shape, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last)

    assert batchnorm.eligible(cl(8, 12, 4, 4))
    assert not batchnorm.eligible(cl(8, 16, 4, 4))  # a multiple of 16: the native kernel is fast
    assert not batchnorm.eligible(cl(8, 100, 4, 4))  # 64 channels or more: the native kernel is about as fast
    assert not batchnorm.eligible(torch.randn(8, 12, 4, 4))  # contiguous: the native kernel
    assert not batchnorm.eligible(cl(3, 12, 3, 3))  # 27 positions do not fold into rows of 48
    assert not batchnorm.eligible(cl(8, 12, 4, 4, dtype=torch.bfloat16))
    assert not batchnorm.eligible(cl(8, 12, 1, 1))


def test_compact_batch_norm_in_channels_last_updates_running_statistics_like_native():
    """A compact step in channels_last with a kept count off the multiples of 16 moves the kept channels' running
    statistics exactly as the native path (the same step in contiguous memory) does."""
    torch.manual_seed(0)
    bn = SparseBatchNorm2d(32, group="g").double()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    other = copy.deepcopy(bn)
    conv = SparseConv2d(3, 32, 3, padding=1, out_group="g").double()
    mask = {"g": torch.rand(32) < 0.4}
    x = torch.randn(4, 3, 8, 8, dtype=torch.double)
    for layer, inputs in ((bn, x.contiguous(memory_format=torch.channels_last)), (other, x)):
        with use_mask(conv, mask), use_mask(layer, mask):
            layer(conv(inputs))
    torch.testing.assert_close(bn.running_mean, other.running_mean)
    torch.testing.assert_close(bn.running_var, other.running_var)
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("mode,channels_last", [("compact", False), ("compact", True), ("masked", False)],
                         ids=["compact", "compact-channels_last", "masked"])
def test_cumulative_average_batch_norm_of_a_subnetwork_averages_its_batches(mode, channels_last):
    """``momentum=None`` (the cumulative average): after ``k`` steps the kept channels' running mean and variance are
    the plain averages of the ``k`` batch means and unbiased batch variances (computed here from the conv output);
    dropped channels keep their initial statistics, and every step is counted. Compact and masked mode share the
    momentum bookkeeping, so only a closed form tells a wrong averaging factor."""
    torch.manual_seed(0)
    conv = SparseConv2d(3, 12, 3, padding=1, out_group="g").double()
    bn = SparseBatchNorm2d(12, group="g", momentum=None).double()
    model = torch.nn.Sequential(conv, bn)
    kept = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 0], dtype=torch.bool)  # 6: off the multiples of 16
    means, variances = [], []
    for step in range(3):
        x = torch.randn(4, 3, 4, 4, dtype=torch.double) * (step + 1) + step
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            h = F.conv2d(x, conv.weight, conv.bias, padding=1)
        means.append(h.mean(dim=(0, 2, 3)))
        variances.append(h.var(dim=(0, 2, 3)))  # unbiased, as running_var takes it
        with use_mask(model, {"g": kept}, mode):
            model(x)
    if channels_last:
        from maskprop.sparse import batchnorm
        assert batchnorm.eligible(h[:, kept].contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(bn.running_mean[kept], torch.stack(means).mean(0)[kept], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(bn.running_var[kept], torch.stack(variances).mean(0)[kept], rtol=1e-12, atol=1e-14)
    assert torch.equal(bn.running_mean[~kept], torch.zeros(6, dtype=torch.double))
    assert torch.equal(bn.running_var[~kept], torch.ones(6, dtype=torch.double))
    assert int(bn.num_batches_tracked) == 3


def test_kept_counts_and_index_sets_match_per_mask_nonzero():
    """The batched host-side index sets (one cumsum, one nonzero for all groups) against a per-group brute force,
    padded or not."""
    from maskprop.sparse.execution import _padded_index_sets
    from maskprop.sparse.groups import aligned_width, count_kept

    g = torch.Generator().manual_seed(0)
    for trial in range(100):
        sizes = torch.randint(1, 40, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
        masks = [torch.rand(n, generator=g) < torch.rand(1, generator=g) for n in sizes]
        counts = count_kept(masks)
        assert counts == [int(m.sum()) for m in masks]
        align = (1, 4, 8)[trial % 3]
        widths = [aligned_width(c, n, align) if c < n else 0 for c, n in zip(counts, sizes)]
        index, real = _padded_index_sets(torch.cat(masks), sizes, counts, widths)
        expected, flags = [], []
        for m, w in zip(masks, widths):
            if w:
                padding = (~m).nonzero().squeeze(1)[: w - int(m.sum())]
                chosen = torch.cat([m.nonzero().squeeze(1), padding]).sort().values
                expected.append(chosen)
                flags.append(m[chosen])
        assert torch.equal(index, torch.cat(expected) if expected else index.new_zeros(0))
        assert torch.equal(real, torch.cat(flags) if flags else real.new_zeros(0))
    assert count_kept([]) == []
    groups = {"b": 3, "a": 5}
    mask = {"a": torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool), "b": torch.tensor([0, 1, 0], dtype=torch.bool)}
    assert maskprop.sparse.check_mask(mask, groups) == [1, 3]  # in the order of the groups
    assert maskprop.sparse.kept_counts({**mask, "c": 7}) == {"a": 3, "b": 1, "c": 7}


def test_execution_state_puts_every_index_on_the_models_device():
    """The non-CPU branch (one copy of the index sets, flat indices built there), run on the meta device."""
    from maskprop.sparse.execution import ExecutionState

    model = maskprop.create_model("resnet20")
    groups = model.channel_groups()
    mask = random_mask(groups, 0.5, torch.Generator().manual_seed(0))
    mask["layer1"][:] = True  # a fully kept group has no index anywhere
    host = ExecutionState(mask, model, "compact", torch.device("cpu"), concatenate=True)
    meta = ExecutionState(mask, model, "compact", torch.device("meta"))
    assert host.index("layer1") is None and meta.index("layer1") is None
    for g in groups:
        if g != "layer1":
            assert meta.index(g).device.type == "meta" and meta.index(g).shape == host.index(g).shape
    assert len(host._weights) == len(meta._weights) > 0
    for a, b in zip(host._weights, meta._weights):
        assert b.flat.device.type == "meta" and b.flat.shape == a.flat.shape
    assert meta._norm.flat.device.type == "meta" and meta._norm.flat.shape == host._norm.flat.shape


def test_model_plan_is_computed_once_per_model_and_lives_on_it(generator):
    """One plan per model, kept on the model (no state_dict entry); a deep copy plans its own layers, and replacing a
    layer makes a new plan."""
    from maskprop.sparse import model_plan, prepare_mask

    model = maskprop.create_model("resnet20")
    keys = list(model.state_dict())
    plan = model_plan(model)
    assert model_plan(model) is plan and list(model.state_dict()) == keys
    assert prepare_mask(model, random_mask(model.channel_groups(), 0.5, generator)).plan is plan
    copied = copy.deepcopy(model)
    copied_layers = [m for m in copied.modules() if isinstance(m, (SparseConv2d, SparseBatchNorm2d, SparseLinear))]
    assert model_plan(copied) is not plan and all(a is b for a, b in zip(model_plan(copied).layers, copied_layers))
    model.fc = SparseLinear(model.fc.in_features, model.fc.out_features, in_group=model.fc.in_group)
    replanned = model_plan(model)
    assert replanned is not plan and model.fc in replanned.layers and model_plan(model) is replanned


@pytest.mark.parametrize(("threads", "crashing", "safe"), [(2, 3, 2), (3, 16, 15), (4, 18, 16), (1, None, 3)])
def test_the_strided_pointwise_route_is_taken_only_where_the_crash_can_happen(threads, crashing, safe, monkeypatch):
    """subsampled_pointwise_input: a CPU input into a strided 1x1 conv without padding, with gradients, of a batch the
    thread count does not divide or of fewer than 16 channels, gives the input subsampled by each dimension's own
    stride (a stride-1 conv of it equals the strided conv); a padded, a larger-kernel, an unstrided conv, 16 channels
    or more in a batch the threads divide (any batch on one thread) or no gradients keep the native kernel
    (``None``)."""
    from maskprop._workarounds import subsampled_pointwise_input

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    w = torch.randn(4, 16, 1, 1, dtype=torch.float64)
    assert subsampled_pointwise_input(torch.randn(safe, 16, 7, 9), (1, 1), (2, 2), (0, 0)) is None
    narrow = torch.randn(safe, 15, 7, 9)
    assert torch.equal(subsampled_pointwise_input(narrow, (1, 1), (2, 2), (0, 0)), narrow[:, :, ::2, ::2])
    if crashing is None:
        return
    x = torch.randn(crashing, 16, 7, 9, dtype=torch.float64)
    sub = subsampled_pointwise_input(x, (1, 1), (2, 3), (0, 0))
    assert torch.equal(sub, x[:, :, ::2, ::3])
    torch.testing.assert_close(F.conv2d(sub, w), F.conv2d(x, w, stride=(2, 3)), rtol=1e-12, atol=1e-12)
    for kernel, stride, padding in [((1, 1), (2, 2), (1, 1)), ((3, 3), (2, 2), (0, 0)), ((1, 1), (1, 1), (0, 0))]:
        assert subsampled_pointwise_input(x, kernel, stride, padding) is None, (kernel, stride, padding)
    with torch.no_grad():
        assert subsampled_pointwise_input(x, (1, 1), (2, 2), (0, 0)) is None


def test_a_grouped_conv_is_pruned_on_one_group_if_depthwise_else_on_the_features_of_its_groups():
    conv = SparseConv2d(8, 8, 3, padding=1, groups=8, in_group="g", out_group="g")
    assert conv.depthwise and conv.weight_in_group is None
    assert SparseConv2d(8, 8, 3, groups=8).depthwise  # never pruned, and still depthwise
    plain = SparseConv2d(8, 8, 3, in_group="a", out_group="b")
    assert not plain.depthwise and plain.weight_in_group == "a"
    grouped = SparseConv2d(8, 8, 3, groups=2, in_group="a:2", out_group="b:2", weight_in_group="a")
    assert not grouped.depthwise and grouped.weight_in_group == "a" and "weight_in_group='a'" in repr(grouped)
    for kwargs in ({"groups": 8, "in_group": "a", "out_group": "b"}, {"groups": 2, "in_group": "g", "out_group": "g"},
                   {"groups": 1, "in_group": "a", "weight_in_group": "a"}, {"groups": 2, "weight_in_group": "a"}):
        with pytest.raises(ValueError, match=r"^a grouped convolution \(groups=\d, 8 -> 8 channels, .* expected "
                                             r"in_group = out_group for a depthwise one \(groups = in_channels = "
                                             r"out_channels\), weight_in_group \(the features each of the groups "
                                             r"reads\) exactly where another grouped one reads a group$"):
            SparseConv2d(8, 8, 3, **kwargs)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_a_depthwise_conv_runs_on_its_kept_channels(padding_mode, generator):
    """Compact against masked in float64 (weights, bias, gradients), and the narrow conv's groups its width."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        SparseConv2d(3, 10, 1, out_group="g", mask_output=True),
        SparseConv2d(10, 10, 3, padding=1, groups=10, bias=True, in_group="g", out_group="g", mask_output=True,
                     padding_mode=padding_mode),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), SparseLinear(10, 3, in_group="g"),
    ).double()
    mask = random_mask({"g": 10}, 0.5, generator)
    x, y = torch.randn(2, 3, 6, 6, dtype=torch.double), torch.tensor([0, 2])
    compact_step_equals_masked(model, mask, mask, x, y)
    narrow = maskprop.materialize(model, mask)
    kept = int(mask["g"].sum())
    assert narrow[1].groups == kept and tuple(narrow[1].weight.shape) == (kept, 1, 3, 3)
    with torch.no_grad(), use_mask(model, mask, "compact"):
        torch.testing.assert_close(narrow(x), model(x), rtol=1e-12, atol=1e-12)


def test_a_grouped_conv_of_more_outputs_than_inputs_is_not_depthwise(generator):
    """A channel multiplier (groups = in_channels < out_channels) is refused on a group and, never pruned, keeps its
    own groups in the narrow model."""
    assert not SparseConv2d(4, 8, 3, groups=4).depthwise
    with pytest.raises(ValueError, match=r"a grouped convolution \(groups=4, 4 -> 8 channels"):
        SparseConv2d(4, 8, 3, groups=4, in_group="g", out_group="g")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        SparseConv2d(3, 6, 3, padding=1, groups=3), SparseConv2d(6, 8, 1, out_group="g", mask_output=True),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), SparseLinear(8, 3, in_group="g"),
    ).double()
    mask = random_mask({"g": 8}, 0.5, generator)
    narrow = maskprop.materialize(model, mask)
    assert (narrow[0].in_channels, narrow[0].out_channels, narrow[0].groups) == (3, 6, 3)
    x = torch.randn(2, 3, 6, 6, dtype=torch.double)
    with torch.no_grad(), use_mask(model, mask, "compact"):
        torch.testing.assert_close(narrow(x), model(x), rtol=1e-12, atol=1e-12)


def test_a_linear_layer_on_a_flattened_map_keeps_every_position_of_each_kept_channel(generator):
    """``in_positions``: compact against masked in float64, the narrow layer's columns by hand, and bad values."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        SparseConv2d(3, 6, 3, padding=1, out_group="g", mask_output=True), torch.nn.Flatten(),
        SparseLinear(6 * 4 * 4, 7, in_group="g", out_group="h", mask_output=True, in_positions=16), torch.nn.ReLU(),
        SparseLinear(7, 3, in_group="h"),
    ).double()
    assert maskprop.channel_groups(model) == {"g": 6, "h": 7} and model[2].in_channels == 6
    mask = random_mask({"g": 6, "h": 7}, 0.5, generator)
    x, y = torch.randn(2, 3, 4, 4, dtype=torch.double), torch.tensor([0, 2])
    compact_step_equals_masked(model, mask, mask, x, y)
    narrow = maskprop.materialize(model, mask)
    kept, hidden = mask["g"].nonzero().flatten(), mask["h"].nonzero().flatten()
    columns = torch.cat([torch.arange(16) + 16 * int(c) for c in kept])  # flatten's order: channel, then position
    torch.testing.assert_close(narrow[2].weight, model[2].weight[hidden][:, columns], rtol=0, atol=0)
    with torch.no_grad(), use_mask(model, mask, "compact"):
        torch.testing.assert_close(narrow(x), model(x), rtol=1e-12, atol=1e-12)
    for positions in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match=rf"in_positions={positions!r} must be a positive integer dividing "
                                             r"in_features=96"):
            SparseLinear(96, 3, in_group="g", in_positions=positions)
    with pytest.raises(ValueError, match=r"layer '1' gives group 'g' 96 channels, but it has 6"):
        maskprop.channel_groups(torch.nn.Sequential(SparseConv2d(3, 6, 3, out_group="g"),
                                                    SparseLinear(96, 3, in_group="g")))  # in_positions forgotten


@pytest.mark.parametrize("size", [-3, 0, 2.5, "8", True])
def test_a_group_of_no_positive_channel_count_is_one_line(size):
    for make in (full_mask, lambda groups: random_mask(groups, 0.5)):
        with pytest.raises(ValueError, match=rf"^group 'a' has {size!r} channels; expected a positive integer"):
            make({"b": 4, "a": size})
