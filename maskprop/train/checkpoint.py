"""Checkpoints: one dict per file, written atomically, read back with one-line errors.

A checkpoint holds everything a run needs to continue exactly as if it had not stopped (same seed, same run): model
and score parameters, optimizer and scheduler states, phase / epoch / step, the fixed subnetwork once there is one,
the generator states (mask sampling, data order, torch's global CPU RNG, the CUDA RNGs, the crops and flips of data
on the device), the cost counters and step timings, the resolved config, the model's spec (``model_spec``: how it
was built, what export rebuilds; absent from checkpoints written before it existed) and its channel-group layout (to
refuse a checkpoint of another model before anything is loaded).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._files import atomic_write
from ..models.spec import ModelSpec

__all__ = ["CHECKPOINT_KEYS", "check_compatible", "error_reason", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_KEYS = ("format", "model_name", "model_kwargs", "groups", "method", "phase", "epoch", "step", "model",
                   "optimizers", "schedulers", "rng", "counters", "config")
_FORMAT = 1
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")
_PARAGRAPH = re.compile(r"\n\s*\n")


def error_reason(err: BaseException, limit: int = 160) -> str:
    """The gist of a library's error as a clause for a one-line message: its first sentence, never cut mid-word.

    Torch's errors run to paragraphs of advice (``torch.load``'s weights-only refusal names its actual reason last,
    after "WeightsUnpickler error:"). This keeps the reason itself: the first sentence of its first paragraph, without
    terminal colour codes, line breaks or the full stop; should that still exceed ``limit`` characters, its whole
    words up to the limit followed by "...". An error without a message gives its type name.
    """
    text = _ANSI.sub("", str(err))
    text = text.split("WeightsUnpickler error:", 1)[-1]
    text = " ".join(next((p for p in _PARAGRAPH.split(text) if p.strip()), "").split())
    text = _SENTENCE_END.split(text, 1)[0].rstrip(".") if text else ""
    if len(text) > limit:
        cut = text.rfind(" ", 0, limit + 1)
        text = text[: cut if cut > 0 else limit].rstrip(" ,;:") + " ..."
    return text or type(err).__name__


def save_checkpoint(checkpoint: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``checkpoint`` with ``torch.save`` to a temp file in the same directory, then rename it over ``path``.

    A process killed while saving leaves the previous file intact (and at most a stray ``.tmp`` file).
    """
    with atomic_write(path, "wb") as f:
        torch.save(dict(checkpoint, format=_FORMAT), f)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` onto the CPU (tensors only, no arbitrary pickles).

    Raises:
        FileNotFoundError: There is no file at ``path``.
        ValueError: The file is corrupt or truncated, or is not a maskprop checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for damaged files
        raise ValueError(f"checkpoint '{path}' is corrupt or truncated ({error_reason(err)}); expected a complete "
                         f"checkpoint written by maskprop train") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint '{path}' is not a maskprop checkpoint (a {type(checkpoint).__name__}, "
                         f"expected a dict)")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint '{path}' is not a maskprop training checkpoint (missing {', '.join(missing)})")
    if checkpoint["format"] != _FORMAT:
        raise ValueError(f"checkpoint '{path}' has format {checkpoint['format']!r}; this maskprop reads {_FORMAT}")
    return checkpoint


def check_compatible(checkpoint: Mapping[str, Any], path: str | os.PathLike, spec: ModelSpec,
                     model_kwargs: Mapping[str, Any], groups: Mapping[str, int], method: str) -> None:
    """Raise a one-line ``ValueError`` unless ``checkpoint`` was saved from this model and method.

    Args:
        checkpoint: A loaded checkpoint.
        path: Where it came from (for the message).
        spec: The model spec the config resolves to.
        model_kwargs: The config's ``model.kwargs`` (what a checkpoint written before the spec existed is compared
            by).
        groups: Its channel-group layout ``{group: channels}``, in order.
        method: The config's training method.
    """
    where = f"checkpoint '{path}'"
    if checkpoint["model_name"] != spec.name:
        raise ValueError(f"{where} is from model {checkpoint['model_name']!r}, the config builds {spec.name!r}; "
                         f"resume with the run's own model (model.name={checkpoint['model_name']})")
    saved = checkpoint.get("model_spec")
    if saved is not None and dict(saved.get("kwargs") or {}) != spec.to_dict()["kwargs"]:
        raise ValueError(f"{where} is from {spec.name} built with {dict(saved.get('kwargs') or {})}, the config "
                         f"builds it with {spec.to_dict()['kwargs']}; resume with the run's own model settings")
    if saved is None and dict(checkpoint["model_kwargs"]) != dict(model_kwargs):
        raise ValueError(f"{where} is from {spec.name} with model.kwargs={dict(checkpoint['model_kwargs'])}, the "
                         f"config has model.kwargs={dict(model_kwargs)}; resume with the run's own model")
    theirs = [(str(name), int(size)) for name, size in checkpoint["groups"]]
    ours = list(groups.items())
    if theirs != ours:
        first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
        theirs_at = f"{theirs[first][0]!r} ({theirs[first][1]})" if first < len(theirs) else "nothing"
        ours_at = f"{ours[first][0]!r} ({ours[first][1]})" if first < len(ours) else "nothing"
        raise ValueError(f"{where} has another channel-group layout than the config's model ({len(theirs)} vs "
                         f"{len(ours)} groups; group {first} is {theirs_at} in the checkpoint but {ours_at} here)")
    if checkpoint["method"] != method:
        raise ValueError(f"{where} is a method={checkpoint['method']!r} run, the config says method={method!r}")
