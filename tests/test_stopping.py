"""Checkpoints within an epoch (``save_every_steps``) and stop signals (SIGTERM, SIGUSR1): a run saved in the middle of
an epoch resumes from its batch to the end an uninterrupted run reaches, bit for bit."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, metric_records, signal_after_step, with_overrides
from test_graphs import static_run  # noqa: F401  (a fixture)
from test_train import _assert_same_state

import maskprop
from maskprop.cli import main
from maskprop.train import loop
from maskprop.train.checkpoint import load_checkpoint
from maskprop.train.stopping import RunStopped, StopSignals

REPO = Path(__file__).resolve().parents[1]
STEPS = 4  # batches an epoch: 256 training examples, batch 64
TINY = with_overrides(TINY_RUN, **{"data.train_size": 256, "optim.epochs": 3, "sparsity.warmup_epochs": 1,
                                   "sparsity.anneal_epochs": 1, "finetune.epochs": 2, "log_every": 1})


class _Stop(Exception):
    pass


def _stop_after_checkpoint(monkeypatch, phase: str, epoch: int, batch: int) -> None:
    """Make the run raise right after it saves ``last.pt`` at ``batch`` of epoch ``epoch + 1`` of ``phase`` (as a
    run killed then would)."""
    save = loop._Saver.save

    def save_then_stop(self, name="last.pt"):
        save(self, name)
        state = self.run.state
        if name == "last.pt" and (state.phase, state.epoch, state.batch) == (phase, epoch, batch):
            raise _Stop

    monkeypatch.setattr(loop._Saver, "save", save_then_stop)


def _stopped_and_resumed(config: dict, run: Path, monkeypatch, phase: str, epoch: int, batch: int) -> dict:
    with monkeypatch.context() as patch:
        _stop_after_checkpoint(patch, phase, epoch, batch)
        with pytest.raises(_Stop):
            maskprop.fit(copy.deepcopy(config), out=run)
    saved = load_checkpoint(run / "last.pt")
    assert (saved["phase"], saved["epoch"], saved["batch"]) == (phase, epoch, batch)
    assert saved["epoch_start"]["meter"]["steps"] == batch
    maskprop.fit(copy.deepcopy(config), out=run, resume=True)
    return saved


@pytest.mark.parametrize("name, overrides, phase, epoch, batch", [
    ("search", {}, "search", 1, 2),  # in the anneal (epoch 2), eager VR-PGE steps
    pytest.param("warmup", {"save_every_steps": 3}, "search", 0, 3, marks=pytest.mark.slow),  # every 3 steps
    ("finetune", {}, "finetune", 1, 1),  # the narrow model's steps: written back before the checkpoint
    ("workers", {"data.workers": 2, "method": "dense", "optim.epochs": 2}, "train", 1, 2),
    pytest.param("sbp", {"method": "msbp", "optim.epochs": 2}, "train", 0, 3, marks=pytest.mark.slow),
])
def test_a_run_resumed_within_an_epoch_ends_as_an_uninterrupted_one(tmp_path, monkeypatch, one_thread, name,
                                                                   overrides, phase, epoch, batch):
    config = with_overrides(TINY, **{"save_every_steps": 1, **overrides})
    maskprop.fit(with_overrides(config, save_every_steps=0), out=tmp_path / "straight")  # saving changes nothing
    saved = _stopped_and_resumed(config, tmp_path / "stopped", monkeypatch, phase, epoch, batch)
    straight, resumed = (load_checkpoint(tmp_path / run / "last.pt") for run in ("straight", "stopped"))
    _assert_same_state(straight, resumed)
    assert resumed["batch"] == 0 and resumed["epoch_start"] is None  # saved at the end: between epochs
    assert metric_records(tmp_path / "stopped") == metric_records(tmp_path / "straight")  # the resumed epoch's sums too
    lines = [json.loads(line) for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    stopped_epoch = next(r for r in lines if (r["phase"], r["epoch"]) == (phase, epoch + 1))
    assert stopped_epoch["epoch_time_s"] > saved["epoch_start"]["meter"]["seconds"] > 0  # both parts' time


@pytest.mark.parametrize("narrow, phase, epoch, batch", [(False, "search", 2, 1), (True, "finetune", 0, 3)])
def test_a_static_run_resumed_within_an_epoch_ends_as_an_uninterrupted_one(static_run, tmp_path, monkeypatch,  # noqa: F811
                                                                           one_thread, narrow, phase, epoch, batch):
    """The static steps (a GPU run's) read their statistics before the checkpoint (and write the narrow model back);
    the search resumes with the capacities and the uniforms of its window."""
    config = with_overrides(TINY, **{"save_every_steps": 1, "log_every": 2, "finetune.narrow": narrow})
    maskprop.fit(with_overrides(config, save_every_steps=0), out=tmp_path / "straight")
    _stopped_and_resumed(config, tmp_path / "stopped", monkeypatch, phase, epoch, batch)
    straight, resumed = (load_checkpoint(tmp_path / run / "last.pt") for run in ("straight", "stopped"))
    _assert_same_state(straight, resumed)
    for key in ("generator", "next_uniforms"):
        assert torch.equal(straight["static"][key], resumed["static"][key]), key


def test_a_run_on_device_data_resumed_within_an_epoch_ends_as_an_uninterrupted_one(tmp_path, monkeypatch,
                                                                                  one_thread):
    config = with_overrides(TINY, **{"save_every_steps": 1, "data.on_device": True, "finetune.epochs": 0})
    maskprop.fit(with_overrides(config, save_every_steps=0), out=tmp_path / "straight")
    _stopped_and_resumed(config, tmp_path / "stopped", monkeypatch, "search", 2, 3)
    straight, resumed = (load_checkpoint(tmp_path / run / "last.pt") for run in ("straight", "stopped"))
    _assert_same_state(straight, resumed)
    assert torch.equal(straight["rng"]["augment"], resumed["rng"]["augment"])


@pytest.mark.parametrize("workers, decode", [(0, "cpu"), (2, "cpu"), (0, "device"), (2, "device")])
def test_an_imagenet_run_resumed_within_an_epoch_ends_as_an_uninterrupted_one(tmp_path, monkeypatch, one_thread,
                                                                             workers, decode):
    """timm's ImageNet crops draw from python's ``random``: in the main process its state is saved with the
    checkpoint (a resumed run drew other crops before), in workers each batch seeds it. ``data.decode: device``
    draws from torch's generator (saved alike, seeded alike) and decodes on the device without drawing."""
    from test_data import make_image_folder

    make_image_folder(tmp_path / "imagenet", per_class=8)  # 16 images: 4 batches of 4
    config = with_overrides(TINY, **{"data.dataset": "imagenet", "data.root": str(tmp_path / "imagenet"),
                                     "data.decode": decode,
                                     "data.crop_size": 16, "data.batch_size": 4, "data.workers": workers,
                                     "data.train_size": 10000, "data.val_size": 2000, "data.image_size": 32,
                                     "model.kwargs": {"num_classes": 2}, "method": "dense", "optim.epochs": 2,
                                     "save_every_steps": 1})
    for key in ("train_size", "val_size", "image_size"):  # the shapes settings, at their defaults
        config["data"].pop(key)
    maskprop.fit(with_overrides(config, save_every_steps=0), out=tmp_path / "straight")
    _stopped_and_resumed(config, tmp_path / "stopped", monkeypatch, "train", 1, 2)
    _assert_same_state(load_checkpoint(tmp_path / "straight" / "last.pt"),
                       load_checkpoint(tmp_path / "stopped" / "last.pt"))


def test_save_every_steps_saves_within_epochs_only(tmp_path, monkeypatch, one_thread):
    """Every 3rd step saves within its epoch; at an epoch's last batch the epoch's own checkpoint serves."""
    saved = []
    save = loop._Saver.save

    def noting(self, name="last.pt"):
        save(self, name)
        state = self.run.state
        saved.append((name, state.phase, state.epoch, state.batch, state.step))

    monkeypatch.setattr(loop._Saver, "save", noting)
    maskprop.fit(with_overrides(TINY, **{"save_every_steps": 3, "method": "dense", "optim.epochs": 2}),
                 out=tmp_path / "run")
    within = [(epoch, batch, step) for name, _, epoch, batch, step in saved if batch]
    assert within == [(0, 3, 3), (1, 2, 6)]  # step 9 would be after the last of 8
    assert [s for s in saved if s[0] == "last.pt" and not s[3]][:2] == [("last.pt", "train", 1, 0, 4),
                                                                       ("last.pt", "train", 2, 0, 8)]


def test_a_stop_signal_saves_after_the_step_and_stops(tmp_path, monkeypatch, one_thread):
    """SIGUSR1 while a step runs: the step finishes, the checkpoint is saved within the epoch, RunStopped is raised;
    the handler from before the run is back after it; the resumed run ends as one that was not stopped."""
    config = with_overrides(TINY, **{"method": "dense", "optim.epochs": 2})
    maskprop.fit(copy.deepcopy(config), out=tmp_path / "straight")
    before = signal.getsignal(signal.SIGUSR1)
    with monkeypatch.context() as patch:
        signal_after_step(patch, 6)  # as the run's 6th step ends (epoch 2, batch 2)
        with pytest.raises(RunStopped, match=r"^stopped by SIGUSR1 after step 6 \(train epoch 2, batch 2 of 4\), "
                                             r"its checkpoint saved$"):
            maskprop.fit(copy.deepcopy(config), out=tmp_path / "stopped")
    assert signal.getsignal(signal.SIGUSR1) == before
    saved = load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert (saved["epoch"], saved["batch"], saved["step"]) == (1, 2, 6)
    maskprop.fit(copy.deepcopy(config), out=tmp_path / "stopped", resume=True)
    _assert_same_state(load_checkpoint(tmp_path / "straight" / "last.pt"),
                       load_checkpoint(tmp_path / "stopped" / "last.pt"))


def test_a_second_signal_changes_nothing_and_ctrl_c_still_stops_at_once(tmp_path):
    """A scheduler's signal and torchrun's copy of it reach a rank twice: the second changes nothing (the process
    lives on to save); Ctrl-C is not caught."""
    code = ("import os, signal, time\n"
            "from maskprop.train.stopping import StopSignals\n"
            "with StopSignals() as s:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    os.kill(os.getpid(), signal.SIGUSR1)\n"
            "    print(signal.Signals(s.received).name, flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "print('not reached')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout == "SIGTERM\n" and "KeyboardInterrupt" in done.stderr and done.returncode == -signal.SIGINT
    assert done.stderr.count("received SIGTERM: the run stops after this step") <= 1  # logged once, if at all


def test_signals_are_not_caught_where_there_is_nothing_to_save():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(enabled=False) as stop:
        assert signal.getsignal(signal.SIGTERM) is before and stop.pending(torch.device("cpu")) is None


def test_sigterm_to_maskprop_train_saves_says_how_to_resume_and_exits_143(tmp_path):
    """The command a cluster's scheduler ends: it finishes its step, saves, says so in one line and exits with
    128 + 15; ``--resume`` ends where the uninterrupted run ends."""
    config = with_overrides(TINY, **{"optim.epochs": 6, "finetune.epochs": 0})
    recipe = tmp_path / "run.yaml"
    recipe.write_text(json.dumps(config))
    threads = str(torch.get_num_threads())
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS=threads)
    child = subprocess.Popen([sys.executable, "-m", "maskprop.cli", "train", str(recipe), "--out", str(run),
                              "--threads", threads], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "last.pt").exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("maskprop train: stopped by SIGTERM after step ") and \
        last.endswith(f"its checkpoint saved; maskprop train --resume {run} continues from it")
    assert "Traceback" not in err and "run directory" not in out
    saved = load_checkpoint(run / "last.pt")
    assert saved["phase"] == "search" and saved["batch"] > 0 and f"after step {saved['step']} " in last
    assert main(["train", "--resume", str(run), "--threads", threads]) == 0
    maskprop.fit(config, out=tmp_path / "straight")
    _assert_same_state(load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(run / "last.pt"))


def test_resume_if_exists_starts_a_run_continues_it_and_refuses_other_settings(tmp_path, monkeypatch, capsys,
                                                                              one_thread):
    """One command for a job a scheduler requeues: it starts the run, continues it after a stop (here SIGUSR1 within
    the second epoch), rewrites the summary of a finished one, and refuses a directory of other settings."""
    config = with_overrides(TINY, **{"method": "dense", "optim.epochs": 2})
    recipe = tmp_path / "run.yaml"
    recipe.write_text(json.dumps(config))
    run = tmp_path / "run"
    command = ["train", str(recipe), "--out", str(run), "--resume-if-exists", "--threads", "1"]
    with monkeypatch.context() as patch:
        signal_after_step(patch, 6)
        assert main(command) == 128 + signal.SIGUSR1
    assert load_checkpoint(run / "last.pt")["batch"] == 2
    assert main(command) == 0  # continued from batch 2 of epoch 2
    maskprop.fit(copy.deepcopy(config), out=tmp_path / "straight")
    _assert_same_state(load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(run / "last.pt"))
    capsys.readouterr()
    assert main(command) == 0 and f"run directory: {run}" in capsys.readouterr().out  # finished: its summary
    assert main([*command, "optim.lr=0.5", "data.workers=1"]) == 2  # the workers may change, the lr may not
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"maskprop train: error: --resume-if-exists: '{run}' holds a run of other settings (optim.lr: 0.1 -> 0.5); "
        f"expected the recipe and overrides it was started with, or another --out")
    assert main(["train", str(recipe), "--resume-if-exists"]) == 2
    assert "--resume-if-exists needs the run's directory: give --out DIR" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--resume-if-exists"]) == 2
    assert "--resume DIR continues a run without one" in capsys.readouterr().err


def test_under_torchrun_the_ranks_agree_on_a_signal_every_log_every_steps(monkeypatch):
    """The agreement is a collective and a host read: under torchrun it runs where the step statistics are read
    (every ``log_every`` steps), not after every step; one process looks at its flag after every step."""
    from types import SimpleNamespace

    class Counted:
        def __init__(self):
            self.steps = []

        def pending(self, device):
            self.steps.append(state.step)
            return None

    saved = []
    state = SimpleNamespace(step=0, batch=0, phase="train", epoch=0, epoch_start={})
    for enabled, expected in ((True, [3, 6, 9]), (False, list(range(1, 11)))):
        monkeypatch.setattr(loop, "current", lambda enabled=enabled: SimpleNamespace(enabled=enabled))
        signals = Counted()
        checkpoints = loop.StepCheckpoints(lambda: saved.append(1), 0, signals, torch.device("cpu"), agree_every=3)
        for step in range(1, 11):
            state.step, state.batch = step, step
            checkpoints.after_step(state, loop.EpochMeter(), batches=100)
        assert signals.steps == expected and not saved
