"""GPU checks of the execution engine (skipped without CUDA)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import maskprop
from maskprop.bench import bench_model
from maskprop.sparse import random_mask, use_mask

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["resnet32", "vgg19_bn", "wrn16_8", "resnet50"])
def test_compact_equals_masked_on_cuda(name):
    torch.manual_seed(0)
    model = maskprop.create_model(name).cuda().double()
    masked_model = copy.deepcopy(model)
    mask = random_mask(model.channel_groups(), 0.5, torch.Generator().manual_seed(0))
    size = 64 if name == "resnet50" else 32
    x = torch.randn(4, 3, size, size, device="cuda", dtype=torch.double)
    y = torch.tensor([0, 1, 2, 3], device="cuda")
    losses = []
    for m, mode in ((model, "compact"), (masked_model, "masked")):
        with use_mask(m, mask, mode):
            loss = F.cross_entropy(m(x), y)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    for (k, p), q in zip(model.named_parameters(), masked_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=k)


def test_bench_runs_on_cuda_with_bf16_and_channels_last():
    results = bench_model("resnet20", batch_size=32, keep_ratios=(1.0, 0.5), repeats=2, warmup=1,
                          device="cuda", amp="bf16", channels_last=True)
    assert all(r.compact_s > 0 and r.compact_peak_mb is not None for r in results)


@pytest.mark.parametrize("method", ["vrpge", "msbp"])
def test_tiny_runs_train_on_cuda_with_bf16_and_channels_last(tmp_path, method):
    """The whole trainer on CUDA: masks sampled on the CPU drive a CUDA model; the sparse backward runs there too."""
    config = {"method": method, "device": "cuda", "amp": "bf16", "channels_last": True, "log_every": 2,
              "model": {"name": "resnet20"},
              "data": {"dataset": "shapes", "train_size": 128, "val_size": 64, "image_size": 16, "batch_size": 64,
                       "workers": 0},
              "optim": {"epochs": 2}, "sparsity": {"fix_examples": 64, "fix_samples": 2}, "finetune": {"epochs": 1},
              "sbp": {"ratio": 0.25, "angle_every": 1}}
    summary = maskprop.fit(config, out=tmp_path / "run")
    assert summary["accuracy"] is not None and summary["measured_speedup"] > 0
    assert summary["train_cost_saving"] > 1.5
    resumed = maskprop.fit(config, out=tmp_path / "run", resume=True)  # a finished run only rewrites its summary
    assert resumed["accuracy"] == summary["accuracy"]
