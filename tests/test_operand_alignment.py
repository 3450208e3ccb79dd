"""Every tensor the compact path hands to a kernel starts at a 16-byte-aligned address, with contiguous strides.

cuBLASLt and cuDNN pick vectorised kernels from the alignment of their operands; a gathered weight, bias or BatchNorm
tensor that is a view into the middle of a gathered buffer made float32 steps with odd kept widths fail on a GPU
("misaligned address" in ``F.linear``, no cuDNN engine for a backward). The CUDA code path (all weights of one
kernel area gathered from their concatenation, ``concatenate=True``) runs here on the CPU with widths such as 61, 7
and 13, and every operand of ``F.conv2d``, ``F.linear`` and ``F.batch_norm`` is checked; the compact step still
equals the masked reference.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from conftest import input_size, nontrivial_batch_norms

import maskprop
from maskprop.sparse import batchnorm
from maskprop.sparse.execution import ExecutionState

ALIGNMENT = 16  # bytes: what vectorised GPU kernels load at once
ODD_WIDTHS = (61, 7, 13)


def odd_width_mask(groups: dict[str, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every group keeps an odd number of channels, in turn 61, 7 and 13 where the group is larger than that (an odd
    number near half of it where it is not), chosen at random."""
    mask = {}
    for i, (name, size) in enumerate(groups.items()):
        kept = ODD_WIDTHS[i % len(ODD_WIDTHS)]
        kept = kept if kept < size else max(1, (size // 2) | 1)
        m = torch.zeros(size, dtype=torch.bool)
        m[torch.randperm(size, generator=generator)[:kept]] = True
        mask[name] = m
    return mask


@contextmanager
def recorded_operands() -> Iterator[list[tuple[str, str, torch.Tensor]]]:
    """Record ``(kernel, operand, tensor)`` for every tensor passed to ``F.conv2d``, ``F.linear``, ``F.batch_norm``
    and maskprop's channels_last BatchNorm inside the block."""
    operands: list[tuple[str, str, torch.Tensor]] = []
    names = {"conv2d": ("input", "weight", "bias"), "linear": ("input", "weight", "bias"),
             "batch_norm": ("input", "running_mean", "running_var", "weight", "bias"),
             "batch_norm_nhwc": ("input", "weight", "bias")}
    originals = {"conv2d": F.conv2d, "linear": F.linear, "batch_norm": F.batch_norm,
                 "batch_norm_nhwc": batchnorm.batch_norm_nhwc}

    def recording(kernel: str):
        def call(*args, **kwargs):
            for name, value in zip(names[kernel], args):
                if isinstance(value, torch.Tensor):
                    operands.append((kernel, name, value))
            for name, value in kwargs.items():
                if name in names[kernel] and isinstance(value, torch.Tensor):
                    operands.append((kernel, name, value))
            return originals[kernel](*args, **kwargs)
        return call

    with pytest.MonkeyPatch.context() as patch:
        for kernel in ("conv2d", "linear", "batch_norm"):
            patch.setattr(F, kernel, recording(kernel))
        patch.setattr(batchnorm, "batch_norm_nhwc", recording("batch_norm_nhwc"))
        yield operands


def misaligned(operands: list[tuple[str, str, torch.Tensor]]) -> list[str]:
    """The operands that do not start at a 16-byte boundary or are not laid out as the kernel expects (contiguous;
    activations may be channels_last, and a linear layer's input rows of a larger tensor, as a transformer's class
    token ``x[:, 0]``, where each row starts at a 16-byte boundary)."""
    bad = []
    for kernel, name, t in operands:
        rows = kernel == "linear" and name == "input" and t.stride(-1) == 1 and all(
            stride * t.element_size() % ALIGNMENT == 0 for stride in t.stride()[:-1])
        layout_ok = t.is_contiguous() or rows or (name == "input" and t.is_contiguous(
            memory_format=torch.channels_last))
        if t.data_ptr() % ALIGNMENT or not layout_ok:
            bad.append(f"{kernel} {name} {tuple(t.shape)} {t.dtype} at {t.data_ptr() % ALIGNMENT} mod {ALIGNMENT}, "
                       f"strides {t.stride()}")
    return bad


def compact_step_operands_are_aligned(name: str, dtype: torch.dtype, device: str = "cpu", align: int = 1,
                                      batch: int = 2, concatenate: bool = True,
                                      size: tuple[int, int, int] | None = None) -> None:
    """A compact training step of ``name`` with odd kept widths on the CUDA code path (``concatenate``): every kernel
    operand aligned, and loss, gradients and running statistics equal to the masked reference within ``dtype``'s
    rounding."""
    torch.manual_seed(0)
    model = nontrivial_batch_norms(maskprop.create_model(name).to(device)).to(dtype)
    reference, exact = copy.deepcopy(model), copy.deepcopy(model).double()  # exact: the same weights in float64
    groups = maskprop.channel_groups(model)
    mask = odd_width_mask(groups, torch.Generator().manual_seed(0))
    assert any(int(m.sum()) in ODD_WIDTHS for m in mask.values())
    x = torch.randn(batch, *(size or input_size(name)), device=device, dtype=dtype)
    y = torch.arange(batch, device=device) % 10
    state = ExecutionState(mask, model, "compact", align=align, concatenate=concatenate)
    with recorded_operands() as operands:
        with maskprop.use_mask(model, state):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
    assert operands and not misaligned(operands), "\n".join(misaligned(operands))
    for net, inputs in ((reference, x), (exact, x.double())):
        with maskprop.use_mask(net, mask, "masked"):
            expected = F.cross_entropy(net(inputs).float() if net is reference else net(inputs), y)
        expected.backward()
        if net is reference:
            masked_loss = expected
    # Rounding differs between gathered and dense kernels; a wrong or leaking channel errs by O(1). Where a gradient
    # is a sum that cancels (bf16 BatchNorm biases before another BatchNorm), the masked reference's own rounding
    # error is as large: the compact step may then err by up to twice that, both against float64.
    tolerances = {torch.float64: (1e-9, 1e-8), torch.float32: (1e-4, 1e-3), torch.bfloat16: (5e-2, 5e-2)}
    tolerance, gradients = tolerances[dtype]
    torch.testing.assert_close(loss, masked_loss, rtol=tolerance, atol=tolerance)
    for (key, p), q, e in zip(model.named_parameters(), reference.parameters(), exact.parameters()):
        error = torch.linalg.vector_norm((p.grad - q.grad).double())
        if error > gradients * torch.linalg.vector_norm(q.grad.double()) + 1e-7:
            own, dense = (torch.linalg.vector_norm(g.grad.double() - e.grad) for g in (p, q))
            assert own <= 2 * dense + 1e-7, f"{key}: {own:.3g} from float64, the masked step {dense:.3g}"
    for (key, b), c in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, rtol=tolerance, atol=tolerance, msg=key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", ["resnet20", "vgg11_bn", "mlp", "resnet50"])
def test_gathered_operands_are_aligned_with_odd_widths(name, dtype):
    compact_step_operands_are_aligned(name, dtype)


def test_gathered_operands_are_aligned_with_padded_widths():
    """Widths padded to a multiple of 8 (``align=8``) multiply the gathered rows by their 0/1 factors first."""
    compact_step_operands_are_aligned("resnet20", torch.float32, align=8)


def test_gathered_operands_are_aligned_on_the_cpu_path():
    """The CPU's own path (weights gathered layer by layer, BatchNorm tensors from one buffer) as well."""
    compact_step_operands_are_aligned("resnet20", torch.float32, concatenate=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("module,name", [("examples.my_nets", "small_mobilenet"), ("examples.my_nets", "small_vgg"),
                                         ("examples.converted_nets", "timm_efficientnet_b0"),
                                         ("examples.converted_nets", "timm_resnet18_gn"),
                                         ("examples.converted_nets", "timm_vit_tiny"),
                                         ("examples.converted_nets", "tv_vit_tiny"),
                                         ("examples.converted_nets", "timm:convnext_atto"),
                                         ("examples.my_nets", "small_densenet"),
                                         ("examples.my_nets", "small_ghostnet")])
def test_gathered_operands_of_depthwise_convolutions_and_flattened_maps_are_aligned(module, name, dtype, monkeypatch):
    """examples/my_nets.py's MobileNet (a depthwise weight gathers rows of 9 elements, one input channel each) and VGG
    (its hidden layer rows of 16 positions per channel of a flattened 4x4 map); timm's EfficientNet-B0 converted by
    make_prunable (depthwise convs, squeeze-and-excitation gates, fused BatchNorm-activation layers); timm's ResNet-18
    with GroupNorms (their weights and biases in the packed gather, each group's features kept alike); timm's ViT and
    ConvNeXt (linear layers on tokens and on a channels-last map, their outputs' last dimension pruned); the small
    DenseNet (BatchNorm and convs reading concatenated groups)."""
    from pathlib import Path

    from maskprop.models import import_models

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    import_models(module)
    compact_step_operands_are_aligned(name, dtype, size=(3, 32, 32))  # small_vgg's default: a 4x4 map flattened
