"""GPU checks of the execution engine (skipped without CUDA).

Each test runs in a pytest process of its own (:func:`isolated`): a CUDA error such as a misaligned or illegal
address leaves the CUDA context of its process unusable, and every later test there would fail with it. Run this
way they go one after the other; ``python tools/isolated_tests.py tests/test_gpu.py --jobs 8`` (what
``tools/gpu_check.sh`` does) starts the same processes eight at a time.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_operand_alignment import compact_step_operands_are_aligned

import maskprop
from maskprop.bench import bench_model
from maskprop.sparse import random_mask, use_mask

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]
_IN_CHILD = "MASKPROP_ISOLATED_TEST"
CHILD_TIMEOUT_S = 900


def isolated(test: Callable) -> Callable:
    """Run ``test`` (with its parameters) in a pytest process of its own and report that process's outcome."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        if os.environ.get(_IN_CHILD):
            return test(*args, **kwargs)
        node = os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0]  # "tests/test_gpu.py::name[params] (call)"
        command = [sys.executable, "-m", "pytest", node, "-q", "-rs", "-p", "no:cacheprovider"]
        try:
            child = subprocess.run(command, cwd=REPO, env={**os.environ, _IN_CHILD: "1"}, capture_output=True,
                                   text=True, timeout=CHILD_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{node} did not finish in {CHILD_TIMEOUT_S} s in its own process", pytrace=False)
        output = (child.stdout + child.stderr)[-6000:]
        if child.returncode == 0 and " passed" not in child.stdout and " skipped" in child.stdout:
            pytest.skip(f"skipped in its own process:\n{output}")
        if child.returncode != 0 or " passed" not in child.stdout:
            pytest.fail(f"{node} failed in its own process (exit {child.returncode}):\n{output}", pytrace=False)

    return run


@isolated
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


@isolated
def test_bench_runs_on_cuda_with_bf16_and_channels_last():
    results = bench_model("resnet20", batch_size=32, keep_ratios=(1.0, 0.5), repeats=2, warmup=1,
                          device="cuda", amp="bf16", channels_last=True)
    assert all(r.compact_s > 0 and r.compact_peak_mb is not None for r in results)


@isolated
@pytest.mark.parametrize(("method", "graphs"), [("vrpge", False), ("vrpge", True), ("msbp", False)])
def test_tiny_runs_train_on_cuda_with_bf16_and_channels_last(tmp_path, method, graphs):
    """The whole trainer on CUDA, eager (masks sampled on the CPU drive a CUDA model; the sparse backward runs there
    too) and with its steps captured as CUDA graphs. Graphed search steps compute the static capacities: at keep
    probabilities of 0.5 the 0.999 quantile of the kept count, rounded up to 8, is all of resnet20's 16- and
    32-channel groups and 48 of 64, so with the second forward a search step costs more than a dense one and the
    train-cost saving of this 2+1-epoch run falls below 1 (counted, as everything computed is). The graphed run loads
    its batches in worker processes (``data.on_device: false``), whose pinned copies a thread of this process makes
    while the steps are captured (a capture that other threads' CUDA calls break would fail here); the eager runs hold
    their data on the GPU (``data.on_device: auto``), and make their batches there."""
    config = {"method": method, "device": "cuda", "amp": "bf16", "channels_last": True, "log_every": 2,
              "cuda_graphs": graphs,
              "model": {"name": "resnet20"},
              "data": {"dataset": "shapes", "train_size": 128, "val_size": 64, "image_size": 16, "batch_size": 64,
                       "workers": 2 if graphs else 0, "on_device": False if graphs else "auto"},
              "optim": {"epochs": 2}, "sparsity": {"fix_examples": 64, "fix_samples": 2}, "finetune": {"epochs": 1},
              "sbp": {"ratio": 0.25, "angle_every": 1}}
    summary = maskprop.fit(config, out=tmp_path / "run")
    assert summary["accuracy"] is not None and summary["measured_speedup"] > 0
    assert summary["train_cost_saving"] == pytest.approx(summary["dense_train_flops"] / summary["train_flops"])
    assert summary["train_cost_saving"] > (0.5 if graphs else 1.5)
    if graphs:
        static = summary["static_steps"]
        assert static["captured"] and static["graph_captures"] >= 1
        assert 0 < static["warmup_capture_s"] < summary["run_time_s"]  # the windows' eager steps and captures
    resumed = maskprop.fit(config, out=tmp_path / "run", resume=True)  # a finished run only rewrites its summary
    assert resumed["accuracy"] == summary["accuracy"]


@isolated
def test_torchrun_on_cuda_captures_the_static_steps(tmp_path):
    """``torchrun --nproc_per_node=1`` (how a one-GPU job is often launched) is a one-process run: ``WORLD_SIZE=1``
    joins no process group, and ``cuda_graphs: auto`` captures the static-shape steps (the search, the dense warm-up
    and the narrow finetune) as one graph each. The step in pieces with the NCCL all-reduces between them is tested
    at the step level (``test_graphed_search_under_torchrun_equals_one_process``); the trainer with several
    NCCL ranks needs several GPUs."""
    import json

    import yaml

    config = {"device": "cuda", "amp": "bf16", "channels_last": True, "log_every": 2, "model": {"name": "resnet20"},
              "data": {"dataset": "shapes", "train_size": 384, "val_size": 64, "image_size": 16, "batch_size": 64,
                       "workers": 2, "on_device": False},  # a pin-memory thread and NCCL's watchdog beside the captures
              "optim": {"epochs": 3}, "sparsity": {"warmup_epochs": 1, "fix_examples": 64, "fix_samples": 2},
              "finetune": {"epochs": 1}}  # 6 steps an epoch: each step kind warms up 3, is captured, replays
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", _IN_CHILD)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))  # the GPU check's wheels
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           "-m", "maskprop", "train", str(recipe), "--out", str(tmp_path / "run")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    static = summary["static_steps"]
    assert static["captured"] is True and static["graph_captures"] >= 3 and static["search_windows"] >= 1
    assert summary["accuracy"] is not None and summary["measured_speedup"] > 0


@isolated
def test_batches_made_on_the_gpu_equal_the_cpus_and_never_wait_for_it():
    """``data.on_device`` on CUDA: the same batches as on the CPU (without augmentation, to float rounding; with it,
    the same crops and flips of the same draws, exactly), channels_last float32 and int64 on the GPU, no host
    synchronisation in a whole epoch after the first, and a generator state that replays its draws."""
    import warnings

    from maskprop.train.data import shapes_datasets
    from maskprop.train.device_data import DeviceLoader, crop_flip_batch, draw_crops_and_flips, image_tensors

    train_set, _ = shapes_datasets(600, 10, image_size=32)
    data = image_tensors("shapes", train_set, augment=True)
    cuda = torch.device("cuda")

    def loader(device: torch.device, augment: bool, seed: int = 0) -> DeviceLoader:
        return DeviceLoader(data.to(device, torch.channels_last), 128, train=True,
                            generator=torch.Generator().manual_seed(seed), augment=augment,
                            augment_generator=torch.Generator(device=device).manual_seed(seed),
                            memory_format=torch.channels_last)

    for (x_cpu, y_cpu), (x_gpu, y_gpu) in zip(loader(torch.device("cpu"), False), loader(cuda, False)):
        assert x_gpu.is_cuda and x_gpu.dtype == torch.float32 and y_gpu.dtype == torch.int64
        assert x_gpu.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y_gpu.cpu(), y_cpu)
        torch.testing.assert_close(x_gpu.cpu(), x_cpu, rtol=1e-6, atol=1e-6)
    images = data.images[:256].to(cuda).contiguous(memory_format=torch.channels_last)
    offsets, flips = draw_crops_and_flips(256, 4, True, torch.Generator(device=cuda).manual_seed(1))
    assert offsets.is_cuda and int(offsets.max()) == 8 and 0 < int(flips.sum()) < 256
    assert torch.equal(crop_flip_batch(images, offsets, flips, 4).cpu(),
                       crop_flip_batch(images.cpu(), offsets.cpu(), flips.cpu(), 4))
    augmented = loader(cuda, True)
    list(augmented)  # the first epoch: pinned memory allocated, kernels loaded
    states = augmented.generator.get_state(), augmented.augment_generator.get_state()  # what a checkpoint holds
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            epoch = [x for x, _ in augmented]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()] == []
    assert len(epoch) == 4
    replay = loader(cuda, True, seed=5)  # another run, restored from those states: the same epoch again
    replay.generator.set_state(states[0])
    replay.augment_generator.set_state(states[1])
    again = [x for x, _ in replay]
    assert len(again) == 4 and all(torch.equal(a, b) for a, b in zip(epoch, again))


@isolated
def test_sync_batch_norm_on_cuda_runs_torchs_function_and_matches_batch_norm(tmp_path):
    """``sync_bn``'s CUDA branch (torch's ``SyncBatchNorm`` function over NCCL, on the gathered kept channels) against
    ``F.batch_norm``: ``tests/test_distributed.py``'s test, run here because the GPU check runs this file alone."""
    import test_distributed

    test_distributed.test_sync_batch_norm_on_cuda_runs_torchs_function_and_matches_batch_norm(tmp_path)


@isolated
def test_cuda_projection_and_sampling():
    """The projection onto the budget and the sampling with a CUDA generator, on CUDA: ``tests/test_vrpge.py``'s
    test, run here because the GPU check runs this file alone."""
    import test_vrpge

    test_vrpge.test_cuda_projection_and_sampling()


@isolated
def test_on_cuda_the_batches_are_the_cpus_within_a_few_grey_levels(tmp_path):
    """ImageNet decoded on the GPU (``data.decode: device``: nvjpeg's batch decode, the CUDA resize and colour
    adjustments) against the CPU's: ``tests/test_decode.py``'s test, run here because the GPU check runs this file
    alone."""
    import test_decode

    test_decode.test_on_cuda_the_batches_are_the_cpus_within_a_few_grey_levels(tmp_path)


@isolated
def test_on_cuda_a_cut_jpeg_in_the_batch_is_named(tmp_path):
    """A truncated JPEG in a batch nvjpeg decodes is named in one line: ``tests/test_decode.py``'s test."""
    import test_decode

    test_decode.test_on_cuda_a_cut_jpeg_in_the_batch_is_named(tmp_path)


def _sampled_mask(model, keep: float, seed: int) -> dict:
    """A mask drawn per channel (odd widths, as a search step draws them), every group keeping at least one."""
    from maskprop.vrpge import ChannelScores

    return ChannelScores(model.channel_groups(), keep, keep).sample(torch.Generator().manual_seed(seed))


@isolated
@pytest.mark.parametrize("align", [1, 8])
@pytest.mark.parametrize("name", ["resnet32", "vgg19_bn", "resnet50"])
def test_compact_equals_masked_in_float32_channels_last_with_sampled_widths(name, align):
    """Wrong numbers, not only crashes: cuDNN kernels on gathered (and padded) widths against dense kernels with the
    mask, in float32 and channels_last, including the running statistics."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = maskprop.create_model(name).cuda().to(memory_format=torch.channels_last)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    reference = copy.deepcopy(model)
    mask = _sampled_mask(model, 0.5, 1)
    size = 64 if name == "resnet50" else 32
    x = torch.randn(32, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.arange(32, device="cuda") % 10
    losses = []
    for m, mode, a in ((model, "compact", align), (reference, "masked", 1)):
        with use_mask(m, mask, mode, align=a):
            loss = F.cross_entropy(m(x), y)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    # float32 through a deep network: compare each gradient as a whole (a wrong index errs by O(1); rounding
    # measured up to 7e-3 relative for a BatchNorm bias of ResNet-32 on the CPU, float64 agreeing to 1e-14)
    for (k, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.linalg.vector_norm(p.grad - q.grad) <= 2e-2 * torch.linalg.vector_norm(q.grad) + 1e-7, k
    for (k, b), c in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-3, atol=1e-4, msg=k)
    for m in model.modules():  # dropped and padded channels: no gradient at all
        if isinstance(m, torch.nn.BatchNorm2d) and m.group is not None:
            assert m.bias.grad[~mask[m.group].cuda()].count_nonzero() == 0


@isolated
def test_compact_bf16_stays_within_bf16_tolerance_of_float32():
    """Under bf16 autocast (and checked to have run in bf16) the compact loss and gradients stay near float32's."""
    torch.manual_seed(0)
    model = maskprop.create_model("resnet32").cuda().to(memory_format=torch.channels_last)
    mask = _sampled_mask(model, 0.5, 2)
    x = torch.randn(32, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.arange(32, device="cuda") % 10
    results = []
    for amp in (False, True):
        model.zero_grad(set_to_none=True)
        with use_mask(model, mask, align=8), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        assert logits.dtype == (torch.bfloat16 if amp else torch.float32)
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (loss32, grad32), (loss16, grad16) = results
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=2e-2)
    # bf16 rounding through 32 layers turns the gradient by ~30 degrees (cosine 0.85 under CPU autocast); a wrong
    # index or a padded channel leaking would decorrelate it entirely
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.7


def _search_runs(overlaps: tuple[bool, ...], captures: tuple[bool, ...], windows: int, steps: int = 7,
                 ranks: tuple[bool, ...] | None = None, ahead: tuple[bool, ...] | None = None) -> list:
    """resnet32 search steps on CUDA (float32, channels_last, batch 64) from the same weights, scores and uniforms, for
    each ``(overlap, capture)`` pair: ``windows`` capacity windows (each later one 8 channels narrower per group) of
    ``steps`` steps each; ``ranks``: per run, as under torchrun (the gradient average between the step's halves, in the
    process group the caller started); ``ahead``: per run, whether each step draws the next one's masks
    (``SearchStep.m_ahead``, the default). Returns, per run, the window's losses, the scores, the weights and the graph
    captures."""
    from torch import nn

    from maskprop.cost import CostModel
    from maskprop.train.config import load_config
    from maskprop.train.distributed import all_reduce_sum
    from maskprop.train.graphs import GraphsChoice, StaticSteps, set_capturable
    from maskprop.train.optim import score_optimizer, weight_optimizer
    from maskprop.train.steps import StepContext
    from maskprop.vrpge import ChannelScores

    # plain float32 in every run: TF32's rounding would widen what differs between kernels and between replays
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    base = maskprop.create_model("resnet32").train()
    cost = CostModel(base, (3, 32, 32))
    base.cuda().to(memory_format=torch.channels_last)
    ctx = StepContext(nn.CrossEntropyLoss(), torch.device("cuda"), cost, None, True, align=8)
    cfg = load_config(None, ["data.batch_size=64", "log_every=1000"])
    x = torch.randn(64, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.arange(64, device="cuda") % 10
    runs = []
    for overlap, capture, ranked, m_ahead in zip(overlaps, captures, ranks or (False,) * len(captures),
                                                 ahead or (True,) * len(captures)):
        model = copy.deepcopy(base)
        scores = ChannelScores(model.channel_groups(), 0.5, 0.5, device="cuda")
        weights = weight_optimizer(model.parameters(), 0.05, 0.9, 5e-4)
        score_opt = score_optimizer(scores.scores, 0.05)
        set_capturable(score_opt)
        step_ctx = dataclasses.replace(ctx, reduce_stats=all_reduce_sum) if ranked else ctx
        static = StaticSteps(cfg, step_ctx, GraphsChoice(True, capture, strict=True), seed=1, overlap=overlap,
                             m_ahead=m_ahead)
        loss = loss2 = 0.0
        for window in range(windows):
            if window:  # narrower capacities: the next step builds a new window
                static.capacities = {g: max(8, c - 8) for g, c in static.capacities.items()}
                static.end_search()
            for _ in range(steps):
                static.search(model, scores, (weights, score_opt), (x, y))
            assert (static._search[0].side_stream is not None) == overlap
            assert (static._search[0].average is not None) == ranked
            assert static._search[0].m_ahead == m_ahead
            read = static.read()
            assert read.steps == steps
            loss, loss2 = loss + read.loss, loss2 + read.loss2
        runs.append((loss, loss2, scores.scores.detach().clone(),
                     {k: v.detach().clone() for k, v in model.state_dict().items()},
                     static.report()["graph_captures"]))
    return runs


def _assert_same_runs(a: tuple, b: tuple, rtol: float, atol: float) -> None:
    (loss_a, loss2_a, s_a, state_a, _), (loss_b, loss2_b, s_b, state_b, _) = a, b
    assert loss_a == pytest.approx(loss_b, rel=rtol) and loss2_a == pytest.approx(loss2_b, rel=rtol)
    torch.testing.assert_close(s_a, s_b, rtol=rtol, atol=atol)
    for k in state_a:
        torch.testing.assert_close(state_a[k], state_b[k], rtol=rtol, atol=atol, msg=k)


@isolated
def test_graphed_search_with_m2_on_a_side_stream_equals_one_stream():
    """A captured search step that runs the forward of m' on a side stream beside the backward of m (the default)
    gives the losses, weights, scores and BatchNorm statistics of the same step on one stream, replay after replay
    (7 steps: 3 eager warm-up steps, the capture, 3 replays)."""
    two, one = _search_runs((True, False), (True, True), windows=1)
    assert two[-1] == one[-1] == 1
    _assert_same_runs(two, one, rtol=1e-4, atol=1e-5)


@isolated
def test_graphed_search_drawing_the_masks_ahead_equals_drawing_them_at_each_start():
    """A captured search step that draws the next step's ``m`` and ``m'`` beside its backward (the default) gives the
    losses, weights, scores and BatchNorm statistics of one that draws them at its start: each mask has its own draw
    from the CUDA generator, so the masks are the same, replay after replay and across a new window (whose first
    masks are prepared again from the uniforms carried over)."""
    ahead, at_start = _search_runs((True, True), (True, True), windows=2, steps=5, ahead=(True, False))
    assert ahead[-1] == at_start[-1] == 2
    _assert_same_runs(ahead, at_start, rtol=1e-4, atol=1e-5)


@isolated
def test_masks_updated_together_on_cuda_equal_one_update_each_and_the_cpu():
    """Two masks written with one update on CUDA (``StaticStates``: a two-row sort of resnet50's 11,456 channels takes
    another algorithm than one row's) hold what one update of each writes, on CUDA and on the CPU, overflow counts
    included."""
    from maskprop.sparse.static import StaticExecutionState, StaticLayout, StaticStates, choose_capacities
    from maskprop.vrpge import ChannelScores

    results = []
    for device in ("cuda", "cpu"):
        model = maskprop.create_model("resnet50").to(device)
        scores = ChannelScores(model.channel_groups(), 0.5, device=device)
        with torch.no_grad():
            scores.scores.copy_(torch.rand(scores.num_channels, generator=torch.Generator().manual_seed(0)))
        layout = StaticLayout(model, {g: max(8, c - 16) for g, c in choose_capacities(scores, 8).items()}, align=8)
        u = torch.rand(2, scores.num_channels, generator=torch.Generator().manual_seed(1)).to(device)
        together = StaticStates(layout, 2)
        together.update(scores.mask_from_uniforms(u), u)
        alone = [StaticExecutionState(layout) for _ in range(2)]
        for state, row in zip(alone, u):
            state.update(scores.mask_from_uniforms(row), row)
        for a, b in zip(together, alone):
            for (key, x), y in zip(a.buffers().items(), b.buffers().values()):
                assert torch.equal(x, y), (device, key)
        assert sum(int(s.overflow_steps) for s in together) > 0
        results.append([{k: t.cpu() for k, t in s.buffers().items()} for s in together])
    for on_cuda, on_cpu in zip(*results):
        for key in on_cpu:
            assert torch.equal(on_cuda[key], on_cpu[key]), key


@isolated
def test_graphed_search_under_torchrun_equals_one_process(tmp_path):
    """Under torchrun (a process group of one rank, NCCL) a search step is captured as three graphs (forward, backward
    beside the score update, update) with the losses' and the gradients' all-reduces between them, collectives the host
    issues: replay after replay it gives the losses, weights, scores and
    BatchNorm statistics of the one-process graphed step and of its eager twin."""
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ranked, one, eager = _search_runs((True, True, True), (True, True, False), windows=1, ranks=(True, False, True))
    finally:
        dist.destroy_process_group()
    assert ranked[-1] == one[-1] == 1 and eager[-1] == 0
    _assert_same_runs(ranked, one, rtol=1e-4, atol=1e-5)
    _assert_same_runs(ranked, eager, rtol=1e-4, atol=1e-5)


@isolated
def test_a_later_window_captured_after_one_eager_step_equals_eager_steps():
    """The search's second capacity window warms up one eager step (``NEW_WINDOW_WARMUP_STEPS``) before its capture,
    with cuDNN's benchmark mode on as in a run (it must pick the new widths' kernels in that step, not during the
    capture): over two windows the graphed steps give the eager steps' losses, weights and scores."""
    from maskprop.train.graphs import NEW_WINDOW_WARMUP_STEPS, WARMUP_STEPS

    assert NEW_WINDOW_WARMUP_STEPS < WARMUP_STEPS
    torch.backends.cudnn.benchmark = True
    graphed, eager = _search_runs((True, True), (True, False), windows=2, steps=5)
    assert graphed[-1] == 2 and eager[-1] == 0
    # the two may run different cuDNN kernels (chosen by timing): equal to float32 accumulation order
    _assert_same_runs(graphed, eager, rtol=1e-3, atol=1e-4)


@isolated
def test_one_host_sync_per_search_step():
    """A VR-PGE step on CUDA synchronises once (reading L(m), L(m') and the correct count); the index sets go over
    from pinned memory without blocking."""
    import warnings

    from torch import nn

    from maskprop.cost import CostModel
    from maskprop.train.config import SparsityConfig
    from maskprop.train.optim import score_optimizer, weight_optimizer
    from maskprop.train.steps import StepContext, vrpge_step
    from maskprop.vrpge import ChannelScores

    torch.manual_seed(0)
    model = maskprop.create_model("resnet32").train()
    cost = CostModel(model, (3, 32, 32))
    model.cuda().to(memory_format=torch.channels_last)
    scores = ChannelScores(model.channel_groups(), 0.5, 0.5)
    optimizers = (weight_optimizer(model.parameters(), 0.01, 0.9, 5e-4), score_optimizer(scores.scores, 1e-3))
    ctx = StepContext(nn.CrossEntropyLoss(), torch.device("cuda"), cost, torch.bfloat16, True, align=8)
    x = torch.randn(64, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.arange(64, device="cuda") % 10
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):  # warm-up: first allocations of pinned memory and of cuDNN plans may synchronise
        vrpge_step(model, scores, optimizers, (x, y), generator, SparsityConfig(), ctx)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            vrpge_step(model, scores, optimizers, (x, y), generator, SparsityConfig(), ctx)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == 1, syncs


@isolated
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["resnet32", "vgg11_bn", "mlp", "resnet50"])
def test_odd_widths_run_on_cuda_with_aligned_operands(name, dtype):
    """What crashed: compact steps with widths such as 61, 7 and 13 ("misaligned address" in ``F.linear``, no cuDNN
    engine for a backward). Every gathered operand starts at a 16-byte boundary, and compact equals masked."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    compact_step_operands_are_aligned(name, dtype, device="cuda", batch=8)


@isolated
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("module,name", [("examples.my_nets", "small_mobilenet"), ("examples.my_nets", "small_vgg"),
                                         ("examples.converted_nets", "timm_efficientnet_b0"),
                                         ("examples.converted_nets", "timm_resnet18_gn"),
                                         ("examples.converted_nets", "timm_vit_tiny"),
                                         ("examples.converted_nets", "timm_vit_tiny_normed"),
                                         ("examples.converted_nets", "tv_vit_tiny"),
                                         ("examples.converted_nets", "timm:convnext_atto"),
                                         ("examples.my_nets", "small_densenet"),
                                         ("examples.my_nets", "small_ghostnet")])
def test_own_networks_run_on_cuda_with_aligned_operands(module, name, dtype, monkeypatch):
    """examples/my_nets.py's MobileNet (cuDNN's depthwise kernels at the gathered width) and VGG (a flattened map into
    a pruned hidden layer), timm's EfficientNet-B0, ResNet-18 with GroupNorms (their statistics under CUDA's
    autocast), ViT (also with RMSNorms over each head's queries and keys, the heads' outputs and the MLP's hidden
    units: their weights in the packed gather, their statistics under CUDA's autocast) and ConvNeXt converted by
    make_prunable (cuBLAS on 3-D inputs at odd widths; the ViT's attention at odd head widths), and the small
    DenseNet and GhostNet (concatenated groups read, and written), with odd widths: operands aligned, compact equal to
    masked."""
    from maskprop.models import import_models

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    monkeypatch.chdir(REPO)
    import_models(module)
    compact_step_operands_are_aligned(name, dtype, device="cuda", batch=8, size=(3, 32, 32))
