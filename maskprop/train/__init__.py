"""Training: configuration, data, and the trainer (``fit``: VR-PGE search, fix, finetune; or dense).

``config`` and ``data`` import torch (and pyyaml) only; the trainer's names (``fit``, ``train_one_epoch``, ...) are
imported on first use because they need timm, tqdm and tensorboard.
"""

from __future__ import annotations

from typing import Any

from .config import Config, config_to_dict, load_config, save_config
from .data import build_datasets, build_loader

__all__ = [
    "Config",
    "FitResult",
    "RunStopped",
    "StepContext",
    "StepResult",
    "build_datasets",
    "build_loader",
    "config_to_dict",
    "evaluate",
    "fit",
    "fix_subnetwork",
    "load_checkpoint",
    "load_config",
    "plan_run",
    "save_checkpoint",
    "save_config",
    "subnet_step",
    "train_one_epoch",
    "vrpge_step",
]

_LAZY = {
    "fit": "loop", "FitResult": "loop", "train_one_epoch": "loop", "evaluate": "loop", "fix_subnetwork": "loop",
    "plan_run": "loop",
    "vrpge_step": "steps", "subnet_step": "steps", "StepContext": "steps", "StepResult": "steps",
    "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint", "RunStopped": "stopping",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
