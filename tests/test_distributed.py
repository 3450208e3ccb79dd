"""DDP on the CPU with gloo: two processes under torchrun against each other and against one process.

One torchrun launch of ``tests/ddp_worker.py`` fits every job below in the same two processes (start-up costs more
than these tiny runs); the CLI tests launch ``torchrun -m maskprop train`` itself (kill and resume, one-line errors).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from conftest import TINY_RUN, with_overrides

import maskprop
from maskprop.sparse import sync_batchnorm
from maskprop.train import device_data, distributed
from maskprop.train.checkpoint import load_checkpoint
from maskprop.train.data import GlobalBatchSampler, build_loader
from maskprop.train.graphs import GraphsChoice, StaticSteps

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

# ResNet-20 on 16x16 shapes: 2 global batches of 64 per epoch (32 per rank), 4 search epochs, 1 finetune epoch.
TINY = with_overrides(TINY_RUN, log_every=1, **{"optim.epochs": 4})


def tiny(**overrides) -> dict:
    return with_overrides(TINY, **overrides)


# 2 search steps, the fix, 2 finetune steps: short, because float rounding differs between one process and two (sums
# in another order) and a ReLU input within ~1e-6 of zero then flips sign, which moves that example's gradient by a
# whole term (measured: about one such flip per step in this network, each moving the next losses by ~1e-5).
SYNC = tiny(sync_bn=True, **{"data.augment": False, "optim.epochs": 2})
# The static-shape steps (what cuda_graphs selects on CUDA under torchrun, run eagerly): an MLP has no BatchNorm, so
# 2 processes compute what 1 process computes on the global batch, to float rounding.
STATIC = tiny(**{"model.name": "mlp", "data.augment": False, "optim.epochs": 2})


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def _results(prefix: Path, ranks: int = 2) -> list[dict]:
    return [json.loads(Path(f"{prefix}.rank{r}.json").read_text()) for r in range(ranks)]


def _states(prefix: Path, ranks: int = 2) -> list[dict]:
    return [torch.load(f"{prefix}.rank{r}.pt", weights_only=False) for r in range(ranks)]


def _one_process(config: dict, out: Path, static: bool = False) -> dict:
    """What ``ddp_worker`` dumps, from a fit in this process."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from ddp_worker import fit_and_dump
    finally:
        sys.path.pop(0)
    return fit_and_dump(config, out=str(out), static=static)[1]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """One torchrun launch (2 ranks) of every job; returns the directory and the 1-process run of the sync_bn job."""
    root = tmp_path_factory.mktemp("ddp")
    single = root / "single"
    maskprop.fit(tiny(**{"optim.epochs": 1, "finetune.epochs": 0}), out=single)  # a 1-process checkpoint
    jobs = [
        {"config": tiny(), "out": str(root / "plain"), "dump": str(root / "plain"), "perturb": True},
        {"config": SYNC, "out": str(root / "sync_run"),
         "dump": str(root / "sync")},
        {"config": tiny(**{"sparsity.weight_grad": "both", "optim.epochs": 1, "finetune.epochs": 0}), "out": None,
         "dump": str(root / "both")},
        {"config": tiny(**{"data.batch_size": 63}), "out": None, "dump": str(root / "odd_batch")},
        {"config": tiny(), "out": None, "dump": str(root / "other_config"),
         "rank_config": {"1": {"optim.lr": 0.2}}},
        {"config": tiny(), "out": None, "dump": str(root / "one_rank_fails"),
         "rank_config": {"1": {"data.dataset": "cifar10", "data.root": str(root / "nowhere")}}},
        {"config": tiny(**{"optim.epochs": 1, "finetune.epochs": 0}), "out": str(single), "resume": True,
         "dump": str(root / "other_world")},
        {"config": tiny(method="msbp", **{"model.name": "mlp"}), "out": None, "dump": str(root / "msbp")},
        {"config": STATIC, "out": str(root / "static_run"), "dump": str(root / "static"), "static": True,
         "perturb": True},
        {"config": STATIC, "out": None, "dump": str(root / "static_other_model"), "static": True, "perturb": "shape"},
        {"config": SYNC, "out": str(root / "static_sync_run"), "dump": str(root / "static_sync"), "static": True},
        {"config": with_overrides(STATIC, **{"sparsity.weight_grad": "both", "optim.clip_grad_norm": 1.0}),
         "out": None, "dump": str(root / "static_both"), "static": True},
        {"config": with_overrides(STATIC, **{"data.on_device": True}), "out": str(root / "static_on_device_run"),
         "dump": str(root / "static_on_device"), "static": True},
        {"config": tiny(**{"data.on_device": True, "optim.epochs": 1}), "out": str(root / "on_device_run"),
         "dump": str(root / "on_device")},
    ]
    spec = root / "jobs.json"
    spec.write_text(json.dumps(jobs))
    done = subprocess.run(_torchrun(str(REPO / "tests" / "ddp_worker.py"), str(spec)), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = _one_process(SYNC, root / "sync_single")
    static_reference = _one_process(STATIC, root / "static_single", static=True)
    static_sync_reference = _one_process(SYNC, root / "static_sync_single", static=True)
    return root, reference, static_reference, static_sync_reference


def _assert_equal_states(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["scores"], b["scores"])
    assert a["fixed_mask"].keys() == b["fixed_mask"].keys()
    assert all(torch.equal(a["fixed_mask"][g], b["fixed_mask"][g]) for g in a["fixed_mask"])
    assert a["fix_info"] == b["fix_info"]
    for which in ("weight_optimizer", "score_optimizer"):
        for index, fields in a[which]["state"].items():
            for name, value in fields.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(b[which]["state"][index][name]))
    assert torch.equal(a["mask_generator"], b["mask_generator"])


@pytest.mark.parametrize("job", ["plain", "sync", "both", "static", "static_sync", "static_both", "on_device"])
def test_every_rank_holds_the_same_weights_scores_masks_and_batchnorm_statistics(ddp, job):
    root, *_ = ddp
    assert [r["error"] for r in _results(root / job)] == [None, None]
    rank0, rank1 = _states(root / job)
    assert rank0["step"] == rank1["step"] > 0
    _assert_equal_states(rank0, rank1)  # "plain" and "static": rank 1 started from other weights, replaced by rank 0's
    assert rank0["ddp"] == rank1["ddp"] == (not job.startswith("static"))  # the static steps need no DDP wrapper
    if job not in ("static", "static_both"):  # the runs trained: BatchNorm statistics moved (the MLP has none)
        assert not torch.equal(rank0["model"]["bn1.running_mean"], torch.zeros_like(rank0["model"]["bn1.running_mean"]))


@pytest.mark.parametrize(("job", "rtol", "atol"), [("static", 1e-4, 1e-5), ("static_sync", 1e-3, 1e-4),
                                                    ("static_on_device", 1e-4, 1e-5)])
def test_static_steps_two_processes_match_one_process(ddp, job, rtol, atol):
    """The static-shape steps under torchrun (eagerly: the steps CUDA runs there) average the ranks' gradients between
    their pieces, and their score update reads L(m) and L(m') of the global batch: 2 processes compute what 1
    process computes, to float rounding.
    ``static``: an MLP (no BatchNorm, whose statistics would be each rank's own); ``static_sync``: ResNet-20 with
    ``sync_bn`` (the tolerances of the ReLU sign flips described at SYNC); ``static_on_device``: the MLP with its data
    on the device (``data.on_device``; without augmentation), against the one process of ``static`` (the DataLoader):
    each rank's slice of the same global batches."""
    root, _, *references = ddp
    single = references[1 if job == "static_sync" else 0]
    two, _ = _states(root / job)
    assert two["step"] == single["step"] and two["counters"] == single["counters"]
    assert two["fix_info"]["chosen"] == single["fix_info"]["chosen"]
    assert all(torch.equal(two["fixed_mask"][g], single["fixed_mask"][g]) for g in single["fixed_mask"])
    torch.testing.assert_close(two["scores"], single["scores"], rtol=0, atol=atol)
    assert not torch.equal(two["scores"], torch.full_like(two["scores"], 0.5))  # the scores moved
    for key, value in single["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(two["model"][key], value, rtol=rtol, atol=atol, msg=key)
        else:
            assert torch.equal(two["model"][key], value), key
    records = [[json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
               for name in (f"{job}_run", f"{job.removesuffix('_on_device')}_single")]
    assert [(r["phase"], r["epoch"]) for r in records[0]] == [(r["phase"], r["epoch"]) for r in records[1]]
    for a, b in zip(*records):  # the logged means are those of the global batches, not of rank 0's share
        for key in ("train_loss", "train_loss2", "train_accuracy", "kept_ratio_sampled", "val_loss", "val_accuracy"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), (a["phase"], a["epoch"], key)


def test_every_rank_draws_its_own_crops_and_flips_on_the_device_and_saves_them(ddp):
    root, *_ = ddp
    checkpoint = load_checkpoint(root / "on_device_run" / "last.pt")
    ranks = checkpoint["rng"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["augment"], ranks[1]["augment"])
    fresh = [torch.Generator().manual_seed(device_data.augment_seed(TINY["seed"], rank)).get_state() for rank in (0, 1)]
    assert not any(torch.equal(ranks[rank]["augment"], fresh[rank]) for rank in (0, 1))  # both drew


def test_sync_bn_two_processes_match_one_process(ddp):
    root, single, *_ = ddp
    two, _ = _states(root / "sync")
    assert two["step"] == single["step"]
    # The same masks were sampled at every step: the mask generator advanced alike, and the fix chose alike.
    assert torch.equal(two["mask_generator"], single["mask_generator"])
    assert two["fix_info"]["chosen"] == single["fix_info"]["chosen"]
    assert two["fix_info"]["train_accuracies"] == single["fix_info"]["train_accuracies"]
    assert all(torch.equal(two["fixed_mask"][g], single["fixed_mask"][g]) for g in single["fixed_mask"])
    # Train FLOPs count the global batch (every rank's examples), so the cost counters do not depend on the world size.
    assert two["counters"] == single["counters"]
    # Scores (each update from L(m) and L(m') of the global batch: a step of Adam moves a score by up to 12e-3) and
    # weights agree to float tolerance, widened by the ReLU sign flips described at SYNC.
    torch.testing.assert_close(two["scores"], single["scores"], rtol=0, atol=1e-4)
    for key, value in single["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(two["model"][key], value, rtol=1e-3, atol=1e-4, msg=key)
        else:
            assert torch.equal(two["model"][key], value), key


def test_the_summary_records_the_processes_a_run_trained_in(ddp):
    root, *_ = ddp
    for run, processes in (("sync_run", 2), ("sync_single", 1)):
        assert json.loads((root / run / "summary.json").read_text())["world_size"] == processes, run


def test_sync_bn_losses_per_epoch_match_one_process(ddp):
    root, *_ = ddp
    two = [json.loads(line) for line in (root / "sync_run" / "metrics.jsonl").read_text().splitlines()]
    single = [json.loads(line) for line in (root / "sync_single" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in two] == [(r["phase"], r["epoch"]) for r in single]
    for a, b in zip(two, single):  # L(m), L(m') and accuracy of the global batches; validation over all examples
        for key in ("train_loss", "train_loss2", "train_accuracy", "kept_ratio_sampled", "val_loss", "val_accuracy"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), (a["phase"], a["epoch"], key)
    plain = [json.loads(line) for line in (root / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in plain] == [("search", e) for e in range(1, 5)] + [("finetune", 1)]


@pytest.mark.parametrize(("job", "message"), [
    ("odd_batch", r"data.batch_size=63 is not divisible by the world size 2; expected a multiple of 2"),
    ("other_config", r"ranks started with different configurations: rank 1 differs from rank 0 in optim.lr"),
    ("one_rank_fails", r"rank 1: cifar10 root directory '.*nowhere' does not exist"),
    ("other_world", r"was written by a run of 1 process\(es\), this run has 2; resume with the same number"),
    ("msbp", r"method='msbp' does not run under torch.distributed \(world size 2\)"),
    ("static_other_model", r"rank 1 built another model than rank 0 \(extra \[3\] float32 against .*\); expected the "
                           r"same model on every rank"),
])
def test_bad_input_stops_every_rank_with_one_line(ddp, job, message):
    import re

    root, *_ = ddp
    results = _results(root / job)
    assert all(r["error"] is not None and "\n" not in r["error"] for r in results), results
    assert re.search(message, results[0]["error"]), results[0]["error"]  # what rank 0 prints


@pytest.mark.slow  # about 30 s: two more torchrun launches
def test_killed_two_process_run_resumes_to_the_same_end(ddp, tmp_path):
    root, *_ = ddp
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny()))
    killed = tmp_path / "killed"
    child = subprocess.Popen(_torchrun("-m", "maskprop", "train", str(recipe), "--out", str(killed)), cwd=REPO,
                             env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (killed / "last.pt").exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(child.pid, signal.SIGKILL)  # torchrun and both ranks at once
    finally:
        child.wait()
    interrupted = load_checkpoint(killed / "last.pt")
    assert interrupted["world_size"] == 2 and len(interrupted["rng"]["ranks"]) == 2
    assert (interrupted["phase"], interrupted["step"]) != ("done", 10), "the run finished before it was killed"
    done = subprocess.run(_torchrun("-m", "maskprop", "train", "--resume", str(killed)), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory:") == 1  # rank 0 reports, alone
    a, b = load_checkpoint(root / "plain" / "last.pt"), load_checkpoint(killed / "last.pt")
    assert (a["phase"], a["step"]) == (b["phase"], b["step"]) == ("done", 10)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["scores"]["scores"], b["scores"]["scores"])
    assert all(torch.equal(a["fixed_mask"][g], b["fixed_mask"][g]) for g in a["fixed_mask"])
    for rank in range(2):
        assert torch.equal(a["rng"]["ranks"][rank]["torch"], b["rng"]["ranks"][rank]["torch"])
    records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in records] == [("search", e) for e in range(1, 5)] + [("finetune", 1)]


@pytest.mark.slow  # about 30 s: two more torchrun launches
def test_sigterm_stops_both_ranks_at_one_step_and_the_resume_ends_the_same(ddp, tmp_path):
    """SIGTERM to torchrun and its ranks at once (as a scheduler signals a job; torchrun passes it on too): both ranks
    stop after the same step, rank 0 says so in one line, the checkpoint within the epoch holds each rank's BatchNorm
    statistics, and the resumed run ends where the uninterrupted one did."""
    root, *_ = ddp
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny()))
    stopped = tmp_path / "stopped"
    child = subprocess.Popen(_torchrun("-m", "maskprop", "train", str(recipe), "--out", str(stopped)), cwd=REPO,
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (stopped / "last.pt").exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(child.pid, signal.SIGTERM)
        _, err = child.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
    lines = [line for line in err.splitlines() if "maskprop train: stopped by SIGTERM" in line]
    assert len(lines) == 1 and lines[0].endswith("continues from it"), err[-3000:]
    assert f"torchrun --nproc_per_node 2 -m maskprop train --resume {stopped}" in lines[0]
    interrupted = load_checkpoint(stopped / "last.pt")
    assert interrupted["phase"] != "done" and interrupted["batch"] > 0, err[-3000:]
    assert f"after step {interrupted['step']} " in lines[0]
    assert len(interrupted["rank_buffers"]) == 2 and len(interrupted["rng"]["ranks"]) == 2
    done = subprocess.run(_torchrun("-m", "maskprop", "train", "--resume", str(stopped)), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_checkpoint(root / "plain" / "last.pt"), load_checkpoint(stopped / "last.pt")
    assert (a["phase"], a["step"]) == (b["phase"], b["step"]) == ("done", 10)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["scores"]["scores"], b["scores"]["scores"])
    for rank in range(2):
        assert torch.equal(a["rng"]["ranks"][rank]["torch"], b["rng"]["ranks"][rank]["torch"])


@pytest.mark.slow  # about 20 s: a torchrun launch (the fixture checks every rank's message)
def test_cli_error_under_torchrun_is_one_line_from_rank_zero(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny(**{"data.batch_size": 63})))
    done = subprocess.run(_torchrun("-m", "maskprop", "train", str(recipe), "--out", str(tmp_path / "run")),
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "maskprop train: error:" in line]
    assert lines == ["maskprop train: error: data.batch_size=63 is not divisible by the world size 2; expected a "
                     "multiple of 2 (the global batch is split evenly over the ranks)"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # plan_run agrees as fit does, which the default suite tests under torchrun
def test_dry_run_under_torchrun_prints_the_plan_once_and_writes_nothing(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny()))
    done = subprocess.run(_torchrun("-m", "maskprop", "train", str(recipe), "--out", str(tmp_path / "run"),
                                    "--dry-run"), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [line for line in done.stdout.splitlines() if line.startswith("dry run of")] == [
        "dry run of resnet20 (vrpge, keep_ratio 0.5): checked; nothing trained, nothing written"]
    assert f"out     '{tmp_path / 'run'}' (a new run)" in done.stdout
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------------
# In this process


@pytest.mark.parametrize("agreed", [False, True])
def test_an_error_of_one_rank_alone_is_printed_by_that_rank(monkeypatch, tmp_path, capsys, agreed):
    """An error a rank did not share through ``agree`` is printed by that rank,
    named (no other rank knows it); one it shared is printed by rank 0 alone."""
    from maskprop.cli import main

    for name, value in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    missing = tmp_path / "nowhere"
    if agreed:
        def fail(path):
            error = FileNotFoundError(f"the path '{path}' does not exist")
            error.agreed = True
            raise error

        monkeypatch.setattr("maskprop.report.find_runs", lambda paths: fail(paths[0]))
    assert main(["report", str(missing)]) == 2
    lines = capsys.readouterr().err.splitlines()
    if agreed:
        assert lines == [], lines
    else:  # (``assert a == b if c else [...]`` would assert the non-empty list itself)
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"maskprop report: error: [rank 1] '{missing}' does not exist"), lines


def test_nccl_without_cuda_is_one_line(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"^distributed backend 'nccl' needs CUDA, which is not available"):
        distributed.init_from_env("nccl")
    assert not dist.is_initialized()


def test_device_for_gives_each_rank_its_gpu_and_refuses_what_cannot_run(monkeypatch):
    two = distributed.Distributed(1, 2, 1)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 2)
    assert distributed.device_for(torch.device("cuda"), two) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"^device='cuda:0' names one GPU, but under torchrun each rank"):
        distributed.device_for(torch.device("cuda", 0), two)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 1)  # two ranks, one GPU on this node
    with pytest.raises(ValueError, match=r"^LOCAL_RANK=1 but this node has 1 GPU\(s\); expected --nproc_per_node <= 1"):
        distributed.device_for(torch.device("cuda"), two)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: "gloo")
    assert distributed.device_for(torch.device("cpu"), two) == torch.device("cpu")  # CPU ranks need no GPU each
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: "nccl")
    with pytest.raises(ValueError, match=r"^device='cpu' but the process group runs NCCL alone, which carries no CPU "):
        distributed.device_for(torch.device("cpu"), two)
    assert distributed.device_for(torch.device("cpu"), distributed.Distributed()) == torch.device("cpu")


def test_one_process_needs_no_process_group(monkeypatch, caplog):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with caplog.at_level("WARNING"):
        assert distributed.init_from_env() == distributed.Distributed(0, 1, 0)
        assert not caplog.records
        assert distributed.init_from_env("nccl") == distributed.Distributed(0, 1, 0)  # asked for, not used: said
    assert [r.getMessage() for r in caplog.records] == [
        "distributed backend 'nccl' is not used: this is one process (torchrun starts several)"]
    assert not dist.is_initialized()


@pytest.mark.parametrize("world", [1, 2, 4])
def test_global_batches_do_not_depend_on_the_world_size(world):
    def batches(w):
        generator = torch.Generator().manual_seed(3)
        samplers = [GlobalBatchSampler(50, 8, shuffle=True, drop_last=True, generator=generator, rank=r,
                                       world_size=w) for r in range(w)]
        epochs = []
        for _ in range(2):  # every rank draws the same permutation from the same generator state
            state = generator.get_state()
            per_rank = []
            for sampler in samplers:
                generator.set_state(state)
                per_rank.append(list(sampler))
            epochs.append([sum((per_rank[r][i] for r in range(w)), []) for i in range(len(per_rank[0]))])
        return epochs

    expected = batches(1)
    assert batches(world) == expected
    assert all(len(batch) == 8 for epoch in expected for batch in epoch) and expected[0] != expected[1]


def test_one_process_sampler_draws_as_torchs_random_sampler():
    dataset = list(range(50))
    ours = build_loader(dataset, batch_size=8, train=True, seed=5, world=(0, 1))
    theirs = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(5))
    for _ in range(2):
        assert [b.tolist() for b in ours] == [b.tolist() for b in theirs]
    assert torch.equal(ours.generator.get_state(), theirs.generator.get_state())


def test_evaluation_shares_cover_every_example_once():
    shares = [list(build_loader(list(range(11)), batch_size=4, train=False, world=(r, 2))) for r in range(2)]
    seen = [int(i) for share in shares for batch in share for i in batch]
    assert seen == list(range(11))
    assert [len(b) for b in shares[0]] == [2, 2, 2] and [len(b) for b in shares[1]] == [2, 2, 1]


def test_a_last_global_batch_that_ranks_cannot_share_is_refused():
    """Several ranks cannot split a partial last global batch evenly: kept (drop_last=False), it is refused."""
    with pytest.raises(ValueError, match=r"50 examples leave a last global batch of 2 that 2 ranks cannot share"):
        GlobalBatchSampler(50, 8, shuffle=False, drop_last=False, rank=1, world_size=2)
    assert [len(b) for b in GlobalBatchSampler(50, 8, shuffle=False, drop_last=False)][-1] == 2  # one process keeps it


def test_training_batch_not_divisible_by_world_size_is_refused():
    with pytest.raises(ValueError, match=r"data.batch_size=10 is not divisible by the world size 4"):
        build_loader(list(range(40)), batch_size=10, train=True, world=(1, 4))


@pytest.mark.parametrize("weight_grad", ["first", "both"])
def test_static_steps_with_the_gradient_average_on_one_rank_equal_static_steps_in_float64(single_process_group,
                                                                                        weight_grad):
    """The static steps as torchrun runs them (each step in pieces, L(m) and L(m') and the gradients summed over the
    ranks between them, the logged sums summed at each read) on one rank give bit for bit what they give in one
    process: the average over one rank and the global losses change nothing. The search steps, a fixed-mask step and
    a dense step, on ResNet-20 (BatchNorm, gathered weights)."""
    from test_graphs import _config, _parts

    model, scores, optimizers, ctx, batch = _parts()
    mask = maskprop.random_mask(model.channel_groups(), 0.5, torch.Generator().manual_seed(5))
    cfg = _config(**{"sparsity.weight_grad": weight_grad})
    runs = []
    for ranks in (False, True):
        model_, scores_, optimizers_ = copy.deepcopy((model, scores, optimizers))
        step_ctx = dataclasses.replace(ctx, reduce_stats=distributed.all_reduce_sum) if ranks else ctx
        static = StaticSteps(cfg, step_ctx, GraphsChoice(True, False), seed=0)
        windows = []
        for _ in range(2):
            static.search(model_, scores_, optimizers_, batch)
        assert (static._search[0].average is not None) == ranks
        windows.append(static.read())
        static.plain(model_, optimizers_[0], batch, mask)
        static.plain(model_, optimizers_[0], batch)
        windows.append(static.read())
        runs.append((model_, scores_, windows))
    (plain, plain_scores, plain_windows), (ranked, ranked_scores, ranked_windows) = runs
    assert plain_windows == ranked_windows
    assert plain_windows[0].pairs == 2 and plain_windows[1].steps == 2
    assert torch.equal(plain_scores.scores, ranked_scores.scores)
    for (name, a), b in zip(plain.state_dict().items(), ranked.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(TypeError, match=r"pass the model, not its DDP wrapper"):
        static.plain(distributed.wrap_model(copy.deepcopy(model), torch.device("cpu")), optimizers_[0], batch)


def test_the_logged_loss_gap_of_the_global_batch_is_absolute(single_process_group, monkeypatch):
    """Under torchrun a search step logs ``|L(m) - L(m')|`` of the losses summed over the ranks (one here): the gap of
    the two subnetworks' losses by hand, whichever is larger (both orders of two masks)."""
    from test_graphs import _forced_search_window, _uneven_masks

    small, large = _uneven_masks()
    signs = set()
    for masks in ((small, large), (large, small)):
        window, (loss_m, loss_m2) = _forced_search_window(monkeypatch, list(masks), distributed.all_reduce_sum)
        assert window.loss / 4 == pytest.approx(loss_m, rel=1e-6)
        assert window.loss_gap == pytest.approx(abs(loss_m - loss_m2), rel=1e-4)
        signs.add(loss_m < loss_m2)
    assert signs == {True, False}

@pytest.mark.parametrize("where", ["end", "backward"])
def test_a_failed_capture_of_the_backward_piece_runs_it_again_eagerly(single_process_group, monkeypatch, where,
                                                                       caplog):
    """Under torchrun a search step's backward is a piece of its own, captured after the forward's graph; when its
    capture fails (``cuda_graphs: auto``), its host-side code has run (the pending statistics of ``m'`` taken, the
    backward's ``.grad`` made) and none of its kernels: the piece runs again eagerly, from the forward's graph kept for
    it, the statistics of ``m'`` pending again, the gradients new. CUDA's graphs are played by stand-ins whose capture
    runs the piece on the CPU and then fails (at its end, or in the backward): the weights end as one eager step's
    (the gradients are not added twice), the commit of ``m'`` runs again with its statistics pending, and the next
    steps run eagerly."""
    import contextlib
    from types import SimpleNamespace

    from test_graphs import _config, _parts

    from maskprop.sparse.static import StaticExecutionState
    from maskprop.train import static_steps

    model, scores, optimizers, ctx, batch = _parts()
    ctx = dataclasses.replace(ctx, reduce_stats=distributed.all_reduce_sum)
    runs = []
    for captured in (False, True):
        model_, scores_, optimizers_ = copy.deepcopy((model, scores, optimizers))
        static = StaticSteps(_config(), ctx, GraphsChoice(True, False), seed=0)
        static.search(model_, scores_, optimizers_, batch)  # the first step, eager: builds the step
        body, step = static._search
        assert len(body.pieces(*batch)) == 3
        if captured:
            captures, commits = [], []
            stream = SimpleNamespace(wait_stream=lambda other: None)

            capturing = [False]

            @contextlib.contextmanager
            def graph(g, pool=None, stream=None, capture_error_mode="global"):
                captures.append(len(captures))
                capturing[0] = True
                try:
                    yield
                finally:
                    capturing[0] = False
                if where == "end" and len(captures) == 2:
                    raise RuntimeError("operation failed due to a previous error during capture")

            def commit(state, original=StaticExecutionState.commit_statistics):
                if state is body.state_m2:
                    commits.append(state.deferred is not None)
                return original(state)

            def backward(tensor, *args, original=torch.Tensor.backward, **kwargs):
                if where == "backward" and len(captures) == 2 and len(commits) == 1:
                    raise RuntimeError("operation not permitted when stream is capturing")
                return original(tensor, *args, **kwargs)

            for name, value in (("synchronize", lambda device=None: None), ("Stream", lambda device=None: stream),
                                ("current_stream", lambda device=None: stream), ("set_stream", lambda s: None),
                                ("CUDAGraph", lambda: SimpleNamespace(pool=lambda: None, replay=lambda: None)),
                                ("graph", graph)):
                monkeypatch.setattr(torch.cuda, name, value)
            monkeypatch.setattr(StaticExecutionState, "commit_statistics", commit)
            monkeypatch.setattr(static_steps, "_capturing", lambda device: capturing[0])
            monkeypatch.setattr(torch.Tensor, "backward", backward)
            step.capture, step.warmup, step._warm, step.batch_size = True, 0, 0, batch[1].shape[0]
            step._learning_rates = SimpleNamespace(refresh=lambda: None, installed=contextlib.nullcontext)
        body.prepare(static.generator)
        step(*batch)
        runs.append((model_, captured and (captures, commits, step.capture)))
        monkeypatch.undo()
    (eager, _), (recovered, (captures, commits, still_capturing)) = runs
    assert captures == [0, 1] and commits == [True, True] and not still_capturing
    assert "could not be captured" in caplog.text or "runs eagerly" in caplog.text
    for (name, a), b in zip(recovered.named_parameters(), eager.parameters()):
        assert torch.equal(a, b), name


def _sync_batch_norm_matches_batch_norm(layer, x: torch.Tensor, index: torch.Tensor) -> None:
    """``sync_batch_norm`` of the kept channels ``index`` (one rank) against ``F.batch_norm`` on a copy of ``layer``:
    output, input and affine gradients, and the gathered running statistics it moves for the caller to write back."""
    reference = copy.deepcopy(layer)
    gathered = [t.index_select(0, index) for t in (layer.running_mean, layer.running_var, layer.weight, layer.bias)]
    y = sync_batchnorm.sync_batch_norm(layer, x, gathered, dist.group.WORLD)
    mean, var = reference.running_mean[index].clone(), reference.running_var[index].clone()
    expected = F.batch_norm(x, mean, var, reference.weight[index], reference.bias[index], True, reference.momentum,
                            reference.eps)
    torch.testing.assert_close(y, expected)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.weight, layer.bias), grad)
    want = torch.autograd.grad(expected, (x, reference.weight, reference.bias), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(gathered[0], mean)  # the gathered statistics moved, for the caller to write back
    torch.testing.assert_close(gathered[1], var)


def test_sync_batch_norm_matches_batch_norm_on_the_kept_channels(single_process_group):
    torch.manual_seed(0)
    layer = maskprop.sparse.SparseBatchNorm2d(6, group="g").double().train()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
        layer.running_var.uniform_(0.5, 2.0)
    reference = copy.deepcopy(layer)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    _sync_batch_norm_matches_batch_norm(layer, x, torch.tensor([0, 2, 5]))
    assert layer.process_group is None  # only enable() makes a layer synchronise
    assert int(layer.num_batches_tracked) == 1
    # All channels (dense): the layer's own statistics move as nn.BatchNorm2d's.
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    y = sync_batchnorm.sync_batch_norm(layer, x, None, dist.group.WORLD)
    torch.testing.assert_close(y, F.batch_norm(x, reference.running_mean, reference.running_var, reference.weight,
                                               reference.bias, True, reference.momentum, reference.eps))
    torch.testing.assert_close(layer.running_mean, reference.running_mean)
    torch.testing.assert_close(layer.running_var, reference.running_var)


def test_a_static_pass_with_sync_bn_counts_one_batch_per_layer(single_process_group):
    """A static state counts a training pass's batch for all BatchNorm layers at once; synchronised layers leave it
    to the state too (each counted once, not twice), as plain ones, and move their statistics as without sync_bn."""
    from maskprop.sparse.static import StaticExecutionState, StaticLayout, mask_capacities

    torch.manual_seed(0)
    model = maskprop.create_model("resnet20").double().train()
    mask = maskprop.random_mask(model.channel_groups(), 0.5, torch.Generator().manual_seed(1))
    plain = copy.deepcopy(model)
    sync_batchnorm.enable(model)
    x, y = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1])
    for net in (model, plain):
        state = StaticExecutionState(StaticLayout(net, mask_capacities(mask, 1), align=1))
        state.update(mask)
        with maskprop.sparse.static.use_static(state):
            F.cross_entropy(net(x), y).backward()
    counts = {k: int(b) for k, b in model.named_buffers() if k.endswith("num_batches_tracked")}
    assert counts and set(counts.values()) == {1}
    for (name, a), b in zip(model.named_buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)


def test_enable_sets_the_process_group_on_one_models_layers_and_copies_come_without_it(single_process_group,
                                                                                       monkeypatch):
    """The process group is each layer's own: ``enable`` reaches every BatchNorm layer of its model and no other,
    a deep copy (the timing's dense reference) makes no collective call, and ``disable`` clears it."""
    model = maskprop.create_model("resnet20").train()
    other = maskprop.create_model("resnet20").train()
    norms = [m for m in model.modules() if isinstance(m, maskprop.sparse.SparseBatchNorm2d)]
    assert sync_batchnorm.enable(model) is model
    assert all(m.process_group is dist.group.WORLD for m in norms)
    copied = copy.deepcopy(model)
    synchronised = []
    original = sync_batchnorm.sync_batch_norm
    monkeypatch.setattr(sync_batchnorm, "sync_batch_norm", lambda layer, *args: synchronised.append(layer)
                        or original(layer, *args))
    x = torch.randn(2, 3, 16, 16)
    model(x)
    assert sorted(map(id, synchronised)) == sorted(map(id, norms))
    copied(x)
    other(x)
    model.eval()(x)  # running statistics: nothing to synchronise
    assert len(synchronised) == len(norms)
    assert sync_batchnorm.disable(model) is model
    model.train()(x)
    assert len(synchronised) == len(norms) and all(m.process_group is None for m in norms)


def test_wrap_model_with_sync_bn_gives_the_wrapped_models_layers_the_process_group(single_process_group):
    model = maskprop.create_model("resnet20")
    norms = [m for m in model.modules() if isinstance(m, maskprop.sparse.SparseBatchNorm2d)]
    wrapped = distributed.wrap_model(model, torch.device("cpu"))
    assert wrapped.module is model and all(m.process_group is None for m in norms)
    distributed.wrap_model(model, torch.device("cpu"), sync_bn=True)
    assert all(m.process_group is dist.group.WORLD for m in norms)


@pytest.mark.gpu
def test_sync_batch_norm_on_cuda_runs_torchs_function_and_matches_batch_norm(tmp_path):
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        torch.manual_seed(0)
        layer = maskprop.sparse.SparseBatchNorm2d(6, group="g").cuda().train()
        x = torch.randn(8, 3, 5, 5, device="cuda").contiguous(memory_format=torch.channels_last).requires_grad_()
        _sync_batch_norm_matches_batch_norm(layer, x, torch.tensor([0, 2, 5], device="cuda"))
    finally:
        dist.destroy_process_group()


def test_the_gradient_average_keeps_each_gradient_in_its_parameters_layout(single_process_group):
    """The flat buffer of :class:`GradientAverage` hands each parameter a gradient with the parameter's strides (a
    channels_last conv weight gets a channels_last gradient, as autograd gives it and as CUDA's fused optimizers
    require), holding what the backward computed (one rank: nothing to divide), and the summed values beside them."""
    from maskprop.train.static_steps import GradientAverage

    torch.manual_seed(0)
    model = maskprop.create_model("resnet20", num_classes=10).double().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    average = GradientAverage(model.parameters(), 2, world_size=1)
    F.cross_entropy(model(x), torch.arange(4)).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert any(p.dim() == 4 and not p.is_contiguous() for p in model.parameters())  # channels_last weights
    average.pack([torch.tensor(1.5), torch.tensor(4.0)])
    average.all_reduce()
    for p in model.parameters():
        p.grad = None
    average.unpack()
    for name, p in model.named_parameters():
        assert p.grad.stride() == p.stride(), name
        assert torch.equal(p.grad, grads[name]), name
    assert average.values.tolist() == [1.5, 4.0]
    assert average.flat.data_ptr() == next(model.parameters()).grad.data_ptr()  # views of the one buffer
    for p in model.parameters():
        p.grad = None
    with pytest.raises(RuntimeError, match=r"got no gradient in the step"):
        average.pack()


def test_the_gradient_average_divides_the_ranks_sum_by_the_world_size(single_process_group):
    """:meth:`GradientAverage.unpack` installs the sum over the ranks divided by the world size: declared for two ranks
    in a group of one (whose sum is this rank's gradient), every gradient comes back halved, the values summed only."""
    from maskprop.train.static_steps import GradientAverage

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)).double()
    average = GradientAverage(model.parameters(), 1, world_size=2)
    F.cross_entropy(model(torch.randn(6, 5, dtype=torch.float64)), torch.arange(6) % 3).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    average.pack([torch.tensor(3.0)])
    average.all_reduce()
    average.unpack()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name] / 2, rtol=0, atol=0, msg=name)
    assert average.values.tolist() == [3.0]


# ---------------------------------------------------------------------------------------------------------------------
# Rank arithmetic as another rank sees it (the collectives' other ranks supplied by hand)


def test_world_size_one_is_one_process_without_the_rest_of_torchruns_environment(monkeypatch):
    """``WORLD_SIZE=1`` without RANK, MASTER_ADDR or MASTER_PORT (a scheduler that exports it for every job) is one
    process, as no WORLD_SIZE is: nothing is asked of torchrun's other variables, no process group is joined."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_from_env() == distributed.Distributed(0, 1, 0)
    assert not dist.is_initialized()


def test_device_for_takes_the_local_rank_not_the_global_rank(monkeypatch):
    """On the second node of two (4 ranks, 2 GPUs a node) rank 3 is local rank 1: it runs on cuda:1, may name cuda:1,
    and is refused cuda:0 (another rank's GPU)."""
    third = distributed.Distributed(3, 4, 1)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 2)
    assert distributed.device_for(torch.device("cuda"), third) == torch.device("cuda", 1)
    assert distributed.device_for(torch.device("cuda", 1), third) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"\(this one: cuda:1\)"):
        distributed.device_for(torch.device("cuda", 0), third)


def test_agree_gives_every_rank_the_first_failing_ranks_message(monkeypatch):
    """Rank 0 of 4, which did not fail, while ranks 2 and 3 did: it raises PeerError with rank 2's message (the lowest
    failing rank, so that every rank that did not fail says the same line), marked agreed; a rank that failed raises
    its own error, marked agreed too."""
    messages = [None, None, "disk full", "no such file"]

    def all_gather_object(out, mine):
        out[:] = [mine, *messages[1:]]

    monkeypatch.setattr(distributed, "current", lambda: distributed.Distributed(0, 4, 0))
    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)
    with pytest.raises(distributed.PeerError, match=r"^rank 2: disk full$") as raised:
        distributed.agree(None)
    assert raised.value.agreed is True
    own = ValueError("bad recipe")
    with pytest.raises(ValueError, match=r"^bad recipe$") as raised:
        distributed.agree(own)
    assert raised.value is own and own.agreed is True
    messages[2:] = [None, None]
    distributed.agree(None)  # nobody failed: nothing raised


def test_a_checkpoint_without_a_world_size_is_one_of_one_process(tmp_path):
    """Checkpoints written before the world size was saved came from one process: they resume in one process and are
    refused under torchrun, as a checkpoint that says 1."""
    for checkpoint in ({}, {"world_size": 1}):
        distributed.check_world_size(checkpoint, tmp_path / "last.pt", distributed.Distributed())
        with pytest.raises(ValueError, match=r"written by a run of 1 process\(es\), this run has 2"):
            distributed.check_world_size(checkpoint, tmp_path / "last.pt", distributed.Distributed(0, 2, 0))


def test_rank_local_steps_make_no_collective():
    """``rank_local`` gives a copy of the step context without ``reduce_stats`` (steps that each rank schedules by its
    own clock must not meet the others in a collective), and leaves the run's context as it was."""
    from maskprop.train.steps import StepContext

    ctx = StepContext(criterion=torch.nn.CrossEntropyLoss(), device=torch.device("cpu"), cost=None,
                      reduce_stats=distributed.all_reduce_sum)
    local = distributed.rank_local(ctx)
    assert local.reduce_stats is None and ctx.reduce_stats is distributed.all_reduce_sum
    assert dataclasses.replace(local, reduce_stats=distributed.all_reduce_sum) == ctx
    plain = dataclasses.replace(ctx, reduce_stats=None)
    assert distributed.rank_local(plain) is plain


def test_average_buffers_gives_every_rank_the_mean_of_the_ranks_statistics(monkeypatch):
    """Without sync_bn each rank's running statistics saw its own share; at an epoch's end every rank takes their
    mean (rank 0 of 2 here, the other rank's buffers added to the sum by hand), in the buffers' own dtype; the integer
    batch counts, the same on every rank, stay as they are."""
    torch.manual_seed(0)
    model = maskprop.create_model("resnet20")
    other = copy.deepcopy(model)
    with torch.no_grad():
        for mine, theirs in zip(model.buffers(), other.buffers()):
            if mine.is_floating_point():
                mine.uniform_(0.5, 2.0)
                theirs.uniform_(-1.0, 3.0)
            else:
                mine.fill_(7)
                theirs.fill_(7)
    before = {name: b.clone() for name, b in model.named_buffers()}
    theirs = dict(other.named_buffers())
    summand = torch.cat([b.reshape(-1).double() for b in other.buffers() if b.is_floating_point()])
    monkeypatch.setattr(distributed, "current", lambda: distributed.Distributed(0, 2, 0))
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda tensor, *args, **kwargs: tensor.add_(summand))
    distributed.average_buffers(model)
    floats = 0
    for name, b in model.named_buffers():
        if b.is_floating_point():
            floats += 1
            want = ((before[name].double() + theirs[name].double()) / 2).to(b.dtype)
            torch.testing.assert_close(b, want, rtol=0, atol=0, msg=name)
        else:
            assert torch.equal(b, before[name]), name
    assert floats > 0


def test_sync_batch_norm_over_two_uneven_shares_equals_batch_norm_of_the_global_batch(monkeypatch):
    """Rank 0's share (3 examples) of a global batch whose other share (5 examples, another mean) the collectives
    supply by hand, in float64: the output and the input gradient are those of ``F.batch_norm`` over the whole global
    batch, the running statistics move by the global mean and unbiased global variance (eps and momentum of the
    layer's own), and the affine gradients are the sums over rank 0's share alone (DDP averages them)."""
    torch.manual_seed(0)
    layer = maskprop.sparse.SparseBatchNorm2d(4, group="g", eps=0.01, momentum=0.3).double().train()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
        layer.running_var.uniform_(0.5, 2.0)
    reference = copy.deepcopy(layer)
    x = torch.randn(8, 4, 3, 3, dtype=torch.float64) + 3.0 * (torch.arange(8) >= 3).double().view(8, 1, 1, 1)
    grad = torch.randn_like(x)
    dims, shape = [0, 2, 3], (1, 4, 1, 1)
    xhat = (x - x.mean(dims).view(shape)) / (x.var(dims, unbiased=False) + layer.eps).sqrt().view(shape)
    theirs = x[3:]
    their_mean = theirs.mean(dims)
    their_stats = torch.cat([torch.tensor([theirs.numel() / 4], dtype=torch.float64), their_mean,
                             (theirs - their_mean.view(shape)).square().sum(dims)])
    their_sums = torch.cat([grad[3:].sum(dims), (grad[3:] * xhat[3:]).sum(dims)])

    def all_gather(out, stats, group=None):
        out[0].copy_(stats)
        out[1].copy_(their_stats)

    monkeypatch.setattr(sync_batchnorm.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(sync_batchnorm.dist, "all_gather", all_gather)
    monkeypatch.setattr(sync_batchnorm.dist, "all_reduce", lambda tensor, group=None: tensor.add_(their_sums))
    share = x[:3].clone().requires_grad_()
    y = sync_batchnorm.sync_batch_norm(layer, share, None, None)
    whole = x.clone().requires_grad_()
    expected = F.batch_norm(whole, reference.running_mean, reference.running_var, reference.weight, reference.bias,
                            True, reference.momentum, reference.eps)
    torch.testing.assert_close(y, expected[:3])
    torch.testing.assert_close(layer.running_mean, reference.running_mean)
    torch.testing.assert_close(layer.running_var, reference.running_var)
    grad_x, grad_w, grad_b = torch.autograd.grad(y, (share, layer.weight, layer.bias), grad[:3])
    (want_x,) = torch.autograd.grad(expected, whole, grad)
    torch.testing.assert_close(grad_x, want_x[:3])
    torch.testing.assert_close(grad_w, (grad[:3] * xhat[:3]).sum(dims))
    torch.testing.assert_close(grad_b, grad[:3].sum(dims))


def test_enable_sets_the_process_group_it_is_given(single_process_group):
    """``enable(model, group)`` synchronises over ``group`` (not the default group it takes when given none)."""
    group = dist.new_group([0])
    model = maskprop.create_model("resnet20")
    norms = [m for m in model.modules() if isinstance(m, maskprop.sparse.SparseBatchNorm2d)]
    sync_batchnorm.enable(model, group)
    assert norms and all(m.process_group is group for m in norms) and group is not dist.group.WORLD


@pytest.mark.parametrize("kwargs", [
    {"size": 11, "batch_size": 4, "shuffle": False, "drop_last": False, "rank": 0, "world_size": 2, "shard": True},
    {"size": 11, "batch_size": 4, "shuffle": False, "drop_last": False, "rank": 1, "world_size": 2, "shard": True},
    {"size": 50, "batch_size": 8, "shuffle": False, "drop_last": False},
    {"size": 50, "batch_size": 8, "shuffle": False, "drop_last": True, "rank": 1, "world_size": 2},
])
def test_a_samplers_length_is_the_number_of_batches_it_gives(kwargs):
    """``len`` of a loader (the progress bar's total, the steps a phase schedules) counts its sampler's batches: an
    evaluation share with a partial last batch, a kept partial last global batch, a dropped one."""
    sampler = GlobalBatchSampler(**kwargs)
    assert len(sampler) == len(list(sampler)) > 0


def _nominal_only(model: torch.nn.Module) -> list[str]:
    """The parameters whose gradient's strides differ from theirs where it matters (a dimension of size > 1)."""
    return [name for name, p in model.named_parameters() if p.grad is not None
            and any(size > 1 and a != b for size, a, b in zip(p.shape, p.grad.stride(), p.stride()))]


@pytest.mark.parametrize("name", ["resnet50", "torchvision:mobilenet_v2"])
def test_gradients_differ_from_their_parameters_strides_in_size_one_dimensions_at_most(name):
    """What makes silencing DDP's stride warning safe (``distributed.NOMINAL_STRIDES_WARNING``): dense, compact and
    narrow steps on channels_last activations give every gradient its parameter's layout, the strides of size-1
    dimensions aside (which dense 1x1 and depthwise convs do set otherwise: the case the warning is about)."""
    torch.manual_seed(0)
    model = maskprop.create_model(name, num_classes=10)
    images = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([1, 2])
    mask = maskprop.random_mask(maskprop.channel_groups(model), 0.5, generator=torch.Generator().manual_seed(0))
    narrow = maskprop.materialize(model, mask)
    nominal = 0
    for net, mode in [(model, None), (model, "compact"), (model, "masked"), (narrow, None)]:
        net.zero_grad(set_to_none=True)
        with maskprop.use_mask(net, mask, mode=mode) if mode else contextlib.nullcontext():
            F.cross_entropy(net(images), labels).backward()
        assert _nominal_only(net) == [], mode
        nominal += sum(p.grad.stride() != p.stride() for p in net.parameters() if p.grad is not None)
    if nominal == 0:  # another torch's kernels may lay these gradients out as their parameters: nothing to silence
        pytest.skip("no gradient with nominally different strides in this torch build")


_DDP_BACKWARD = """
import sys, warnings, torch, torch.distributed as dist
from maskprop.train import device_data, distributed
torch.set_num_threads(2)  # oneDNN's multi-threaded 1x1 conv gives the weight channels_last strides (one thread: not)
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
model = torch.nn.Sequential(torch.nn.Conv2d(64, 128, 1), torch.nn.ReLU(), torch.nn.Conv2d(128, 64, 1))
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    ddp = distributed.wrap_model(model, torch.device("cpu"))
    if sys.argv[2] == "unfiltered":
        warnings.simplefilter("always")
    ddp(torch.randn(4, 64, 8, 8).contiguous(memory_format=torch.channels_last)).sum().backward()
print(sum(p.grad.stride() != p.stride() for p in model.parameters()),
      sum(distributed.NOMINAL_STRIDES_WARNING in str(w.message) for w in seen), flush=True)
dist.destroy_process_group()
import os
os._exit(0)  # past gloo's thread teardown at exit, which now and then ends in std::terminate (SIGABRT): not tested here
"""


def test_wrap_model_silences_ddps_warning_about_nominal_gradient_strides(tmp_path):
    """DDP on a 1x1 conv of channels_last activations warns about strides unless :func:`wrap_model` silenced it
    (each in a fresh process: the warning is given once a process)."""
    counts = {}
    for how in ("filtered", "unfiltered"):
        done = subprocess.run([sys.executable, "-c", _DDP_BACKWARD, str(tmp_path / f"store-{how}"), how], cwd=REPO,
                              env=dict(_env(), OMP_NUM_THREADS="2"), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        nominal, counts[how] = map(int, done.stdout.split()[-2:])
        if nominal == 0:  # the case (a gradient whose strides differ in a size-1 dimension) needs oneDNN's layout
            pytest.skip("this torch build lays the 1x1 conv's gradient out as its parameter: DDP does not warn")
    assert counts == {"filtered": 0, "unfiltered": 1}


def test_wrap_model_silences_the_nominal_strides_warning_alone(monkeypatch):
    """The filter :func:`wrap_model` adds matches DDP's stride warning (its first sentence) and nothing else: another
    UserWarning, or one that names strides otherwise, is still shown."""
    monkeypatch.setattr(distributed, "_DistributedDataParallel", lambda model, **kwargs: model)
    with warnings.catch_warnings(record=True) as seen:  # the filters are as they were after the block
        warnings.simplefilter("always")
        distributed.wrap_model(torch.nn.Linear(2, 2), torch.device("cpu"))
        warnings.warn(f"{distributed.NOMINAL_STRIDES_WARNING}. This may indicate grad was not created according to "
                      f"the gradient layout contract", UserWarning)
        warnings.warn("Grad strides of another kind", UserWarning)
        warnings.warn("an unrelated warning", UserWarning)
    assert [str(w.message) for w in seen] == ["Grad strides of another kind", "an unrelated warning"]
