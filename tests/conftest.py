"""Shared test helpers: a small input size per model, deterministic generators, and the scripts of tools/."""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import maskprop
from maskprop import check
from maskprop.check import edge_mask
from maskprop.threads import allowed_cores

IMAGENET_MODELS = {"resnet18", "resnet34", "resnet50"}
# Heavy models run in the default suite at the smallest input that keeps every stage non-degenerate: 48 leaves the
# ImageNet ResNets' last stage at 2x2 (at 1x1 its BatchNorm sees 3 values per channel and the float64 gradients reach
# 1e4, too ill-conditioned for the exactness tests' tolerances).
INPUT_SIZES = {name: (3, 32, 32) for name in maskprop.list_models()}
INPUT_SIZES.update({name: (3, 48, 48) for name in IMAGENET_MODELS})
INPUT_SIZES.update({f"resnet{d}": (3, 16, 16) for d in (20, 32, 56)})
INPUT_SIZES.update({"wrn16_8": (3, 16, 16), "wrn28_10": (3, 8, 8)})
TOOLS = Path(__file__).resolve().parents[1] / "tools"

# Under pytest-xdist (``-n auto``) each worker takes its share of the cores: N workers at torch's default, every
# core, would run N times the threads the machine has (on 2 cores: 5:50 with a thread a worker against 7:05 with two).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, allowed_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` as a fresh module (tools/ is no package), registered in ``sys.modules`` under its name (its
    dataclasses need that) and run with tools/ on the path (one tool imports another)."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(TOOLS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(TOOLS))
    return module


def input_size(name: str) -> tuple[int, int, int]:
    return INPUT_SIZES[name]


# Half of every group at random; the first group keeps one channel, the second keeps all of its channels: the mask
# maskprop.check_model runs a network's subnetworks with first.
edge_case_mask = edge_mask


# A training run of a few seconds: ResNet-20 on 16x16 shapes, 2 steps per epoch. Test modules derive their runs from it
# with :func:`with_overrides`.
TINY_RUN = {
    "seed": 0,
    "log_every": 2,
    "model": {"name": "resnet20"},
    "data": {"dataset": "shapes", "train_size": 128, "val_size": 64, "image_size": 16, "batch_size": 64,
             "workers": 0},
    "optim": {"epochs": 2},
    "sparsity": {"keep_ratio": 0.5, "fix_examples": 64, "fix_samples": 3},
    "finetune": {"epochs": 1},
}


WALL_TIME_KEYS = ("epoch_time_s", "data_wait_s")
"""The keys of an epoch's record that hold wall times: the only ones that differ between two runs of one seed."""


def metric_records(run: Path) -> list[dict]:
    """A run's ``metrics.jsonl``, its wall times left out (what two runs of one seed, or a resumed run and a straight
    one, must have the same of)."""
    import json

    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_TIME_KEYS} for line in lines]


def signal_after_step(patch: pytest.MonkeyPatch, step: int) -> None:
    """Make the trainer receive SIGUSR1 (a scheduler's warning) in this process as its optimizer step ``step`` ends,
    through ``patch`` (a ``monkeypatch.context()``, so that the trainer is itself again after it)."""
    import signal

    from maskprop.train import loop

    count_step = loop._count_step

    def signalled(state, phase, result):
        count_step(state, phase, result)
        if state.step == step:
            signal.raise_signal(signal.SIGUSR1)

    patch.setattr(loop, "_count_step", signalled)


# BatchNorm parameters and running statistics drawn from torch's global generator, away from 1 and 0, so that a leak
# through a dropped or padded channel, or a wrong channel, shows: check_model's own.
nontrivial_batch_norms = check.nontrivial_batch_norms


def attention_by_hand(attn: torch.nn.Module, x: torch.Tensor, kept: torch.Tensor,
                      added: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A maskprop attention module (full width) on tokens ``x`` ``(N, L, C)`` with only the head features ``kept``,
    written out: the full projections' outputs sliced, the softmax at the full head width's scale (of the scores plus
    ``added``, broadcast to ``(N, heads, L, L)``), the output projection on the kept columns. Returns the output and
    the attention weights averaged over the heads."""
    batch, tokens, _ = x.shape
    heads, width = attn.num_heads, attn.head_dim
    qkv = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(batch, tokens, 3, heads, width)[..., kept]
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (batch, heads, tokens, kept)
    weights = torch.softmax(q @ k.transpose(-2, -1) / width ** 0.5 + added, dim=-1)
    out = (weights @ v).transpose(1, 2)  # (batch, tokens, heads, kept)
    columns = attn.proj.weight.reshape(-1, heads, width)[..., kept].flatten(1)
    return out.flatten(2) @ columns.T + attn.proj.bias, weights.mean(1)


def compact_equals_masked(model: torch.nn.Module, mask: dict, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Assert that the loss ``model(images).square().sum()`` and every gradient are the same in compact and masked
    execution of ``mask`` (float64 tolerances); return the compact gradients by parameter name."""
    grads = {}
    for mode in ("compact", "masked"):
        model.zero_grad()
        with maskprop.use_mask(model, mask, mode):
            loss = model(images).square().sum()
        loss.backward()
        grads[mode] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads["compact"][0] == pytest.approx(grads["masked"][0], rel=1e-12)
    assert grads["compact"][1].keys() == grads["masked"][1].keys()
    for name, grad in grads["compact"][1].items():
        torch.testing.assert_close(grad, grads["masked"][1][name], rtol=1e-10, atol=1e-12, msg=name)
    return grads["compact"][1]


def dropout_draws_alike(model: torch.nn.Module, mask: dict, x: torch.Tensor) -> None:
    """Assert that a training forward of ``model`` draws its dropout alike in compact and masked execution of
    ``mask`` (the same outputs from the same seed), and that it does drop (another seed, another output)."""
    outputs = []
    for mode in ("compact", "masked"):
        torch.manual_seed(7)
        with maskprop.use_mask(model, mask, mode):
            outputs.append(model(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    torch.manual_seed(8)
    with maskprop.use_mask(model, mask):
        assert not torch.allclose(model(x), outputs[0])


def converted_keeps_whole(plain: torch.nn.Module, name: str, cls: type, other: str, images: torch.Tensor) -> None:
    """Assert that ``make_prunable`` leaves the module ``name`` of ``plain`` (an attention of a class it does not
    convert) as it is, of class ``cls``, with its heads whole, converts the attention ``other``, and that the
    converted model computes what ``plain`` does."""
    converted = maskprop.make_prunable(copy.deepcopy(plain), tuple(images.shape[1:]))
    assert type(converted.get_submodule(name)) is cls
    assert name not in maskprop.channel_groups(converted)
    assert other in maskprop.channel_groups(converted)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(images), plain.eval()(images), rtol=1e-12, atol=1e-12)


def with_overrides(config: dict, **overrides) -> dict:
    """A deep copy of ``config`` with dotted-key overrides (``**{"optim.epochs": 4}``), as a plain dict."""
    config = copy.deepcopy(config)
    for dotted, value in overrides.items():
        node = config
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return config


@pytest.fixture(autouse=True)
def _threads_kept():
    """torch's thread count as each test found it, whatever the test (an in-process ``maskprop bench --threads``,
    ``export --threads``) set: a test that depends on it (the oneDNN route takes batches the threads do not divide)
    must not depend on the tests before it."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the rest of the module: its models are small, and on a shared 2-core machine a second
    thread mostly waits for a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def single_process_group(tmp_path):
    """A gloo process group of one rank (this process): the collectives of a torchrun run, summing over one rank."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run where CUDA is available and are skipped elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
