"""Initial weights of a run (``model.weights``): a state-dict file loaded into the model before the first step.

The file is a safetensors file (told by its content: a download cache links ``model.safetensors`` to a blob without a
suffix) or anything ``torch.save`` wrote (read with ``weights_only=True``: no code runs; a training script's argparse
arguments are allowed beside the tensors). What training scripts commonly save around a state dict is unwrapped: a
dict holding it under ``model``, ``state_dict`` or ``model_state_dict`` (maskprop's own checkpoints hold it under
``model``), private non-tensor entries such as ``_metadata``, and the ``module.`` prefix of keys saved from a DDP
wrapper. maskprop's ImageNet ResNets have torchvision's and timm's module names, so those libraries' ResNet weights
load as they are.

Every tensor must fit: the same keys and shapes, except the classifier (the model's last linear layer), which keeps
its initialisation when its shape differs or the file has none (weights of another number of classes, or of a
feature extractor: the usual start of a transfer), and BatchNorm's ``num_batches_tracked``, which older files lack.
Anything else is a one-line ``ValueError`` naming the first keys that do not fit.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._files import sha256
from .checkpoint import error_reason

logger = logging.getLogger(__name__)

__all__ = ["InitialWeights", "load_initial_weights"]

_WRAPPERS = ("model", "state_dict", "model_state_dict")


@dataclass(frozen=True)
class InitialWeights:
    """What a run started from (the summary's ``initial_weights``).

    Attributes:
        path: The file, as an absolute path (a link keeps its own name).
        sha256: Its digest.
        tensors: Tensors loaded into the model.
        kept_initialisation: Keys of the model left at their initialisation: the classifier's, where the file's is of
            another shape or absent.
    """

    path: str
    sha256: str
    tensors: int
    kept_initialisation: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "tensors": self.tensors,
                "kept_initialisation": list(self.kept_initialisation)}

    @classmethod
    def from_dict(cls, data: Any, source: str) -> InitialWeights:
        """What :meth:`to_dict` wrote (a checkpoint's ``initial_weights``); unknown keys are ignored.

        Raises:
            ValueError: a missing or malformed field (one line naming ``source``).
        """
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in dict(data).items() if k in names})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: initial_weights is {data!r}, not what maskprop writes ({err})") from None


def _is_safetensors(path: Path) -> bool:
    """By content, not name (a download cache links ``model.safetensors`` to a blob without a suffix): a safetensors
    file starts with its header's length in 8 bytes, then the json header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read(path: Path) -> Any:
    where = f"model.weights '{path}'"
    if not path.is_file():
        raise ValueError(f"{where} {'is a directory' if path.is_dir() else 'does not exist'}; expected a state-dict "
                         f"file (.safetensors, or .pt/.pth from torch.save)")
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            return load_file(path)
        # Training scripts (timm's, torchvision's references) save their argparse arguments beside the weights.
        allowed = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.4
        with allowed([argparse.Namespace]) if allowed is not None else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  # pickle, zip, safetensors and torch errors alike: the file is unreadable
        hint = ("; it holds Python objects besides tensors (a whole pickled model?): save the state dict alone, "
                "torch.save(model.state_dict(), path)" if "Unsupported global" in str(err) else "")
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:2] != b"PK" and head[:1] != b"\x80":  # torch.save's zip, or its legacy pickle: pickle's reason
            raise ValueError(f"{where} is not a readable state dict (neither a safetensors nor a torch.save file); "
                             f"expected a state-dict file (.safetensors, or .pt/.pth from torch.save)") from None
        raise ValueError(f"{where} is not a readable state dict ({error_reason(err)}){hint}") from None


def _state_dict(data: Any, where: str) -> dict[str, Tensor]:
    """The state dict inside what was read: the tensors themselves, or under a common wrapper key."""
    if isinstance(data, Mapping):  # private entries beside the tensors (an explicit "_metadata") are not weights
        data = {k: v for k, v in data.items() if not (str(k).startswith("_") and not isinstance(v, Tensor))}
    if isinstance(data, Mapping) and not all(isinstance(v, Tensor) for v in data.values()):
        inner = next((data[k] for k in _WRAPPERS if isinstance(data.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(f"{where} holds a {type(data).__name__} with keys {sorted(map(str, data))[:6]} and no "
                             f"state dict under {', '.join(_WRAPPERS)}; expected parameter names mapped to tensors")
        data = inner
    if not isinstance(data, Mapping) or not data or not all(isinstance(v, Tensor) for v in data.values()):
        raise ValueError(f"{where} holds a {type(data).__name__}; expected parameter names mapped to tensors")
    state = {str(k): v for k, v in data.items()}
    if all(k.startswith("module.") for k in state):  # saved from a DDP (or DataParallel) wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _examples(keys: list[str], shapes: Mapping[str, tuple] | None = None) -> str:
    shown = [f"{k} {list(shapes[k])}" if shapes else k for k in keys[:3]]
    return ", ".join(shown) + (", ..." if len(keys) > 3 else "")


def load_initial_weights(model: nn.Module, path: str | Path, name: str | None = None) -> InitialWeights:
    """Load the state-dict file ``path`` into ``model`` (in place) and say what was loaded; ``name`` (the model's
    registry name) is what the errors call the model.

    Raises:
        ValueError: the file is missing or unreadable, holds no state dict, or does not fit the model (one line).
    """
    path = Path(path).expanduser().absolute()  # as given (a link keeps its name), from the working directory
    where = f"model.weights '{path}'"
    state = _state_dict(_read(path), where)
    own = model.state_dict()
    linears = [key for key, module in model.named_modules() if isinstance(module, nn.Linear)]
    classifier = {f"{linears[-1]}.{p}" for p in ("weight", "bias")} if linears else set()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    resized = [k for k in state if k in own and state[k].shape != own[k].shape]
    kept = sorted(k for k in resized + missing if k in classifier)  # another head, or none (a feature extractor)
    missing, resized = [k for k in missing if k not in classifier], [k for k in resized if k not in classifier]
    if missing or unexpected or resized:
        parts = [f"{len(missing)} of the model's tensors missing ({_examples(missing)})" if missing else "",
                 f"{len(unexpected)} unknown to it ({_examples(unexpected)})" if unexpected else "",
                 f"{len(resized)} of other shapes ({_examples(resized, {k: state[k].shape for k in resized})} "
                 f"against {_examples(resized, {k: own[k].shape for k in resized})})" if resized else ""]
        raise ValueError(f"{where} does not fit {name or type(model).__name__}: {'; '.join(p for p in parts if p)}; "
                         f"expected the state dict of the same architecture")
    if kept:
        theirs = [f"{k} {list(state[k].shape)}" for k in kept if k in state] or ["none"]
        logger.warning("%s: the classifier keeps its initialisation (the model's %s; the file's: %s)", where,
                       _examples(kept, {k: own[k].shape for k in kept}), ", ".join(theirs))
    for key in kept:
        state.pop(key, None)
    result = model.load_state_dict(state, strict=False)
    left = sorted(set(result.missing_keys) - set(kept) - {k for k in own if k.endswith("num_batches_tracked")})
    if left or result.unexpected_keys:  # cannot happen after the checks above
        raise RuntimeError(f"loading {where} left {left} and {result.unexpected_keys}")
    logger.info("initial weights: %d tensors from %s", len(state), path)
    return InitialWeights(str(path), sha256(path), len(state), kept)
