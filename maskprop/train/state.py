"""The mutable state of a run, and its conversion to and from one checkpoint dict; the search's starting scores and
budget schedule, built from the config."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.scheduler.scheduler import Scheduler
from torch import Tensor, nn

from ..cost import CostModel
from ..sbp import GlobalBudget, load_sbp_state_dict, sbp_state_dict, sparse_layers
from ..vrpge import BudgetSchedule, ChannelScores
from .config import Config, SparsityConfig, config_to_dict
from .distributed import current, gather_objects
from .timing import StepTimes

__all__ = ["PHASES", "TrainState", "initial_keep_probability", "new_counters", "search_schedule",
           "search_scores", "seed_host_generators"]

logger = logging.getLogger(__name__)

# Phases in run order: a dense run trains then is done; a VR-PGE run searches, fixes a subnetwork, finetunes it.
PHASES = {"train": 0, "search": 0, "finetune": 1, "done": 2}


def seed_host_generators(seed: int) -> None:
    """Seed python's ``random`` and numpy's global generator (where numpy is installed), as torch's is seeded: the
    transforms of the main process draw from them (timm's ImageNet crops from ``random``) when ``data.workers`` is 0
    (worker processes seed them for each batch: ``loaders.SeededBatches``). The checkpoint holds their states."""
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed % 2**32)


def _host_states() -> dict[str, Any]:
    """The states of python's and numpy's global generators, in a form ``torch.load(weights_only=True)`` reads."""
    states: dict[str, Any] = {"python": random.getstate()}
    try:
        import numpy as np
    except ImportError:
        return states
    name, keys, position, has_gauss, gauss = np.random.get_state()
    states["numpy"] = (name, torch.from_numpy(keys.astype("int64")), int(position), int(has_gauss), float(gauss))
    return states


def _set_host_states(own: Mapping[str, Any]) -> None:
    if "python" in own:
        random.setstate(own["python"])
    if "numpy" in own:
        import numpy as np

        name, keys, position, has_gauss, gauss = own["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), position, has_gauss, gauss))


def new_counters() -> dict[str, int]:
    """Cost counters of a run: train FLOPs (supplement C.1), the dense baseline's, and optimizer steps per phase."""
    return {"train_flops": 0, "dense_train_flops": 0, "search_steps": 0, "finetune_steps": 0, "train_steps": 0}


def initial_keep_probability(sparsity: SparsityConfig) -> float:
    """The keep probability every channel starts at, before the projection: ``sparsity.init``, or when it is null 1
    with an anneal (probabilities that started at or below the final budget, 0.5 at keep ratio 0.5, would never feel
    it: docs/methods.md, "Warm-up and budget anneal") and the official code's 0.5 without."""
    if sparsity.init is not None:
        return sparsity.init
    return 1.0 if sparsity.anneal_epochs else 0.5


def search_scores(groups: Mapping[str, int], sparsity: SparsityConfig, cost: CostModel | None = None) -> ChannelScores:
    """The keep probabilities a search starts from: :func:`initial_keep_probability` projected onto the budget of the
    first sampling step (all channels with an anneal, ``keep_ratio`` of them without); with ``budget_unit: flops``
    the budget prices each channel at ``cost.channel_prices(keep_ratio)``.

    Raises:
        ValueError: ``budget_unit: flops`` without a cost model.
    """
    prices = None
    if sparsity.budget_unit == "flops":
        if cost is None:
            raise ValueError("sparsity.budget_unit='flops' prices the channels from a cost model; expected one")
        prices = cost.channel_prices(sparsity.keep_ratio)
    return ChannelScores(groups, sparsity.keep_ratio, initial_keep_probability(sparsity),
                         budget=float(sum(groups.values())) if sparsity.anneal_epochs else None, prices=prices)


def search_schedule(sparsity: SparsityConfig, num_channels: int, steps_per_epoch: int) -> BudgetSchedule:
    """The budget of every search step: ``warmup_epochs`` dense epochs, ``anneal_epochs`` of anneal along
    ``budget_schedule``, then ``keep_ratio`` (:mod:`maskprop.vrpge.budget`). The random baseline (``fix: random``)
    has no keep probabilities to anneal: its schedule has none."""
    anneal = 0 if sparsity.fix == "random" else sparsity.anneal_epochs
    if sparsity.fix == "random" and sparsity.anneal_epochs:
        logger.info("sparsity.fix=random trains a fixed random subnetwork: sparsity.anneal_epochs=%d is ignored",
                    sparsity.anneal_epochs)
    return BudgetSchedule(num_channels, sparsity.keep_ratio, sparsity.warmup_epochs * steps_per_epoch,
                          anneal * steps_per_epoch, sparsity.budget_schedule)


@dataclass
class TrainState:
    """Everything that changes while a run trains, i.e. everything a checkpoint must hold.

    Attributes:
        model: The network (full size; subnetworks run through ``use_mask``).
        weight_optimizer: SGD of the current phase (a new one is made for the finetune phase).
        weight_schedule: Its per-step learning-rate schedule.
        scores: Keep probabilities (VR-PGE runs), on the CPU.
        score_optimizer: Adam on the scores (VR-PGE runs).
        mask_generator: Source of every sampled mask (CPU).
        loader_generator: Source of the training data order (and of worker seeds).
        phase: ``train`` (dense), ``search``, ``finetune`` or ``done``.
        epoch: Epochs completed in ``phase``.
        batch: Batches of the current epoch trained (0 between epochs; a checkpoint saved within an epoch holds
            more: ``save_every_steps``, a stop signal).
        epoch_start: Within an epoch, what it needs to be finished after a resume: ``loader``, the loader generator's
            state as the epoch started (a resumed epoch draws its order again from it and starts at ``batch``), and
            in a checkpoint ``meter``, the sums of the epoch's metrics so far; ``None`` between epochs.
        step: Optimizer steps over the whole run.
        fixed_mask: The subnetwork chosen after the search, ``{group: bool tensor}`` on the CPU.
        fix_info: How it was chosen (rule, per-sample accuracies).
        counters: Cost counters (:func:`new_counters`).
        best_accuracy: Best validation accuracy seen, in percent (-1 before the first evaluation).
        final_accuracy: Validation accuracy of the final network, once the run is done.
        last_accuracy: Validation accuracy of the current weights with the subnetwork the last epoch evaluated (the
            top scores while searching, the fixed one after), when that epoch evaluated; else ``None``.
        times: Step wall times.
        elapsed_s: Wall time of the run so far, over all its processes.
        budget: The global budget of a sparse-backward run with ``sbp.budget: balanced``.
        diagnostics: The gradient estimation angles last measured (sparse-backward runs), in degrees.
        schedule: The search's budget schedule (warm-up, anneal; VR-PGE runs): which kind each search step is and its
            budget. Not saved: it follows from the config and the step count.
        augment_generator: Source of the crops and flips of a run whose data is on the device (``data.on_device``:
            ``device_data.py``), on that device, this rank's own; ``None`` on the DataLoader path, whose augmentation
            draws from torch's global RNG (in the workers: from seeds of the loader generator).
        ddp: The ``DistributedDataParallel`` wrapper of ``model`` that the eager steps run through under torchrun
            (not saved: the checkpoint holds ``model`` itself); ``None`` with the static steps, which average the
            gradients themselves.
        own_buffers: This rank's BatchNorm statistics from a checkpoint saved within an epoch under torchrun, until
            :meth:`restore_own_buffers` puts them back after the model is shared.
    """

    model: nn.Module
    weight_optimizer: torch.optim.Optimizer
    weight_schedule: Scheduler
    scores: ChannelScores | None
    score_optimizer: torch.optim.Optimizer | None
    mask_generator: torch.Generator
    loader_generator: torch.Generator
    phase: str
    epoch: int = 0
    batch: int = 0
    epoch_start: dict[str, Any] | None = None
    step: int = 0
    fixed_mask: dict[str, Tensor] | None = None
    fix_info: dict[str, Any] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=new_counters)
    best_accuracy: float = -1.0
    final_accuracy: float | None = None
    last_accuracy: float | None = None
    times: StepTimes = field(default_factory=StepTimes)
    elapsed_s: float = 0.0
    budget: GlobalBudget | None = None
    diagnostics: dict[str, float] = field(default_factory=dict)
    schedule: BudgetSchedule | None = None
    augment_generator: torch.Generator | None = None
    ddp: nn.Module | None = None
    own_buffers: dict[str, Tensor] | None = None

    def restore_own_buffers(self) -> None:
        """Under torchrun, after the model is shared from rank 0: this rank's own BatchNorm statistics as a checkpoint
        saved within an epoch held them (each rank's are its own until the epoch's end averages them)."""
        if self.own_buffers is not None:
            self.model.load_state_dict(self.own_buffers, strict=False)
            self.own_buffers = None

    @property
    def step_model(self) -> nn.Module:
        """The module the eager training steps run: the DDP wrapper under torchrun, else the model (the static steps of
        a GPU run take the model and average its gradients themselves)."""
        return self.model if self.ddp is None else self.ddp

    def checkpoint(self, cfg: Config, groups: Mapping[str, int]) -> dict[str, Any]:
        """The state as one checkpoint dict (tensors and plain Python values only; see ``checkpoint.py``).

        Under torchrun this is a collective (every rank calls it): the dict holds every rank's global random state
        (``rng["ranks"]``, by rank); the rest is the same on every rank.
        """
        own = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized()
               else [],
               **_host_states()}  # timm's ImageNet crops draw from python's (in the main process: workers 0)
        if self.augment_generator is not None:  # the crops and flips of data on the device: each rank's own
            own["augment"] = self.augment_generator.get_state()
            own["augment_device"] = self.augment_generator.device.type  # a CUDA state does not fit a CPU generator
        ranks = gather_objects(own)
        rng = {"mask": self.mask_generator.get_state(), "loader": self.loader_generator.get_state(), **ranks[0]}
        if len(ranks) > 1:
            rng["ranks"] = ranks
        return {
            "model_name": cfg.model.name,
            "model_kwargs": dict(cfg.model.kwargs),
            "groups": [[name, size] for name, size in groups.items()],
            "method": cfg.method,
            "phase": self.phase,
            "epoch": self.epoch,
            "batch": self.batch,
            "epoch_start": self.epoch_start,
            "step": self.step,
            "model": self.model.state_dict(),
            "scores": None if self.scores is None else self.scores.state_dict(),
            "optimizers": {"weights": self.weight_optimizer.state_dict(),
                           "scores": None if self.score_optimizer is None else self.score_optimizer.state_dict()},
            "schedulers": {"weights": self.weight_schedule.state_dict()},
            "fixed_mask": self.fixed_mask,
            "fix_info": self.fix_info,
            "rng": rng,
            "counters": dict(self.counters),
            "best_accuracy": self.best_accuracy,
            "final_accuracy": self.final_accuracy,
            "last_accuracy": self.last_accuracy,
            "times": self.times.state_dict(),
            "elapsed_s": self.elapsed_s,
            "sbp": self._sbp_state(),
            "config": config_to_dict(cfg),
            "world_size": len(ranks),
        }

    def _sbp_state(self) -> dict[str, Any] | None:
        """Sparse-backward state that ``model.state_dict()`` leaves out: per-layer k, MSBP memory, the budget."""
        if next(sparse_layers(self.model), None) is None:
            return None
        return {"layers": sbp_state_dict(self.model), "budget": None if self.budget is None else
                self.budget.state_dict(), "diagnostics": dict(self.diagnostics)}

    def load(self, checkpoint: Mapping[str, Any]) -> None:
        """Restore from a checkpoint of the same model (checked beforehand with ``check_compatible``).

        The weight optimizer and schedule must already be those of the checkpoint's phase (see ``loop.py``).
        """
        self.model.load_state_dict(checkpoint["model"])
        buffers = checkpoint.get("rank_buffers")  # saved within an epoch under torchrun: each rank's own
        self.own_buffers = buffers[current().rank] if buffers and current().rank < len(buffers) else None
        if self.scores is not None:
            self.scores.load_state_dict(checkpoint["scores"])
            self.score_optimizer.load_state_dict(checkpoint["optimizers"]["scores"])
        self.weight_optimizer.load_state_dict(checkpoint["optimizers"]["weights"])
        self.weight_schedule.load_state_dict(checkpoint["schedulers"]["weights"])
        self.phase, self.epoch, self.step = checkpoint["phase"], checkpoint["epoch"], checkpoint["step"]
        self.batch = checkpoint.get("batch", 0)  # checkpoints of 2026-12-06 and before: at epoch ends only
        self.epoch_start = checkpoint.get("epoch_start")
        self.fixed_mask = checkpoint["fixed_mask"]
        self.fix_info = dict(checkpoint["fix_info"])
        self.counters = dict(checkpoint["counters"])
        self.best_accuracy = checkpoint["best_accuracy"]
        self.final_accuracy = checkpoint["final_accuracy"]
        self.last_accuracy = checkpoint.get("last_accuracy")  # not in checkpoints of 2026-12-05 and before
        self.times.load_state_dict(checkpoint["times"])
        self.elapsed_s = checkpoint["elapsed_s"]
        sbp = checkpoint.get("sbp")
        if sbp is not None:
            load_sbp_state_dict(self.model, sbp["layers"])
            if self.budget is not None:
                self.budget.load_state_dict(sbp["budget"])
            self.diagnostics = dict(sbp["diagnostics"])
        rng = checkpoint["rng"]
        self.mask_generator.set_state(rng["mask"])
        self.loader_generator.set_state(rng["loader"])
        own = rng["ranks"][current().rank] if "ranks" in rng else rng  # this rank's own streams under torchrun
        torch.set_rng_state(own["torch"])
        _set_host_states(own)
        if self.augment_generator is not None:
            here, saved = self.augment_generator.device.type, own.get("augment_device")
            if "augment" in own and saved not in (None, here):  # another kind of generator: its state does not fit
                logger.warning("the checkpoint's crops and flips on the device were drawn on %s, this run's are on "
                               "%s: they are drawn anew from here on", saved, here)
            elif "augment" in own:
                self.augment_generator.set_state(own["augment"])
            else:
                logger.warning("the checkpoint holds no augmentation generator (its run took its batches from the "
                               "DataLoader, data.on_device off): the crops and flips on the device are drawn anew "
                               "from here on")
        if own["cuda"] and torch.cuda.is_available() and len(own["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(own["cuda"])
