"""The resolved build of a model: registry name, every keyword its factory gets, and the input it reads.

A run resolves its model once (:meth:`ModelSpec.resolve`: the config's ``model.kwargs``, the number of classes of
the data, ``sparsity.prune_residual``, an MLP's ``in_features`` from the input size), saves the spec in every
checkpoint and export, and builds the model only through :meth:`ModelSpec.build`: the trainer, the export of a run,
the width plan and :func:`maskprop.load_exported` all build the same network from the same object.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..sparse.modules import SparseModule
from ._registry import (
    check_module_name,
    converted_source,
    create_model,
    import_models,
    is_model,
    list_models,
    model_entrypoint,
)

__all__ = ["ModelSpec"]

logger = logging.getLogger(__name__)


def _first_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]


def check_input_size(input_size: object, lengths: int | tuple[int, ...] = 3, expected: str = "(C, H, W)",
                     name: str = "input_size") -> tuple[int, ...]:
    """``input_size`` as a tuple of positive ints of one of ``lengths``; a one-line ``ValueError`` otherwise."""
    lengths = (lengths,) if isinstance(lengths, int) else lengths
    if (not isinstance(input_size, Sequence) or isinstance(input_size, str) or len(input_size) not in lengths
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in input_size)):
        raise ValueError(f"{name} must be {expected}, positive integers; got {input_size!r}")
    return tuple(int(s) for s in input_size)


@dataclass(frozen=True)
class ModelSpec:
    """What builds a model: ``create_model(name, **kwargs)``, reading inputs of ``input_size``.

    Attributes:
        name: Registry name (:func:`maskprop.list_models`).
        kwargs: Every keyword argument of the entry point, ``num_classes`` included (and ``prune_residual`` for
            models with residual streams, ``in_features`` for an MLP).
        input_size: ``(C, H, W)`` of one example.
        module: The Python module that registers ``name`` (``model.module``: a network of your own), imported before
            the model is built; None for maskprop's models.
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: tuple[int, int, int] = (3, 32, 32)
    module: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not isinstance(self.kwargs, Mapping):
            raise TypeError(f"ModelSpec takes a name (str) and kwargs (a mapping); got {self.name!r} and "
                            f"{self.kwargs!r}")
        object.__setattr__(self, "input_size", check_input_size(self.input_size, name="ModelSpec input_size"))
        if self.module is None:  # a network of your own registered from a module: the module that registers it, so
            # that a checkpoint or an export of it builds it in another process (a script's own, __main__, cannot)
            object.__setattr__(self, "module", _registering_module(self.name))
        if self.module is not None:
            check_module_name(self.module, "ModelSpec module")

    @classmethod
    def resolve(cls, name: str, kwargs: Mapping[str, Any], *, num_classes: int, input_size: Sequence[int],
                prune_residual: bool = True, module: str | None = None) -> ModelSpec:
        """The spec a run builds: the configured keywords completed by what the data and the settings decide.

        Args:
            name: Registry name.
            kwargs: The configured keywords (``model.kwargs``); a ``num_classes`` there wins over ``num_classes``.
            num_classes: Classes of the data.
            input_size: ``(C, H, W)`` of one example; an MLP reads ``in_features = C*H*W`` unless configured.
            prune_residual: ``sparsity.prune_residual``; false (here or in ``kwargs``) keeps residual streams whole.
            module: The module that registers ``name`` (imported first), or None.

        Raises:
            ValueError: ``name`` is not registered (by ``module``), or the factory rejects the keywords.
        """
        if module is not None:
            import_models(module)
        entrypoint = model_entrypoint(name)
        resolved = dict(kwargs)
        resolved["num_classes"] = int(resolved.get("num_classes") or num_classes)
        if "in_features" in inspect.signature(entrypoint).parameters:
            resolved.setdefault("in_features", math.prod(input_size))
        resolved["prune_residual"] = bool(prune_residual and resolved.get("prune_residual", True))
        spec = cls(name, resolved, tuple(int(s) for s in input_size), module)
        try:
            spec.build("meta")
        except ValueError as err:
            if "keyword argument 'prune_residual'" not in str(err):  # not "the factory does not take it"
                raise
            if not resolved["prune_residual"]:
                logger.warning("model %r has no residual streams; prune_residual=false changes nothing", name)
            spec = cls(name, {k: v for k, v in resolved.items() if k != "prune_residual"}, spec.input_size, module)
            spec.build("meta")
        return spec

    def build(self, device: torch.device | str | None = None) -> nn.Module:
        """The full-size model (``device="meta"``: without allocating or initialising its weights).

        Raises:
            ValueError: The name is not registered or the factory rejects the keywords (one line).
        """
        if self.module is not None and not is_model(self.name):
            import_models(self.module, "the model spec's module")
        try:
            with torch.device(device or "cpu"):
                model = create_model(self.name, **self.kwargs)
        except TypeError as err:
            raise ValueError(f"model {self.name!r} does not take the keywords {self.kwargs} "
                             f"({_first_line(err)})") from None
        if not any(isinstance(m, SparseModule) for m in model.modules()):
            raise ValueError(f"model {self.name!r} has no maskprop layers; expected a model written with them, or "
                             f"one that maskprop.make_prunable converted")
        return model

    def build_unsaved_buffers(self, model: nn.Module, source: nn.Module | None = None) -> None:
        """Give ``model`` (built by :meth:`build` on ``meta``, narrowed or not, its state dict then loaded with
        ``assign=True``) the buffers no state dict holds: the non-persistent ones its constructor computes (a Swin
        Transformer's relative position index and shifted-window mask), where any is left on ``meta``, from
        ``source`` (a model of this spec that has them), else from this spec built on the device of ``model``'s
        parameters (its initialisation drawn from torch's generators forked, so that theirs are left as they were),
        in the floating-point type of ``model``'s parameters, as ``model.to(dtype)`` would have made them. They depend
        on the architecture, not on the widths; one of another shape stays on ``meta``, for the caller to name."""
        unsaved = [(module, name, f"{path}.{name}" if path else name) for path, module in model.named_modules()
                   for name in module._non_persistent_buffers_set
                   if module._buffers.get(name) is not None and module._buffers[name].is_meta]
        parameter = next(model.parameters(), None)
        if not unsaved or parameter is None or parameter.is_meta:
            return
        dtype = None
        if source is None:  # its weights initialised aside: loading a model leaves torch's generators as they were
            with torch.random.fork_rng(devices=[parameter.device] if parameter.device.type == "cuda" else []):
                source = self.build(parameter.device)
            dtype = parameter.dtype if parameter.is_floating_point() else None
        built = dict(source.named_buffers())
        for module, name, key in unsaved:
            tensor = built.get(key)
            if tensor is not None and tensor.shape == module._buffers[name].shape:
                cast = dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype
                module._buffers[name] = tensor.to(dtype) if cast else tensor

    @property
    def num_classes(self) -> int | None:
        return self.kwargs.get("num_classes")

    def to_dict(self) -> dict[str, Any]:
        """Plain values for json and checkpoints (tuples become lists)."""
        plain = {"name": self.name, "kwargs": _plain(self.kwargs), "input_size": list(self.input_size)}
        return plain if self.module is None else {**plain, "module": self.module}

    @classmethod
    def from_dict(cls, data: Any, source: str | os.PathLike | None = None, *,
                  import_module: bool = False) -> ModelSpec:
        """Read a spec written by :meth:`to_dict`, checking every field.

        Args:
            data: The dict.
            source: Where it was read, for the messages.
            import_module: Import the spec's ``module`` where its model is not registered yet. A run's own files
                (its checkpoint, read by ``maskprop train --resume`` and ``maskprop export``) do; an export directory,
                which may come from anyone, does not: importing a module named in a file runs code.

        Raises:
            ValueError: A missing or malformed field, or a model that is not registered (one line naming it, and the
                module to import where the spec names one).
        """
        where = f"the model spec of '{source}'" if source is not None else "model spec"
        if not isinstance(data, Mapping) or not {"name", "kwargs", "input_size"} <= set(data):
            raise ValueError(f"{where} is {data!r}; expected an object with name, kwargs and input_size")
        name, kwargs, size, module = data["name"], data["kwargs"], data["input_size"], data.get("module")
        if module is not None:
            check_module_name(module, f"{where}'s module")
        if isinstance(name, str) and not is_model(name) and module is not None and import_module:
            import_models(module)
        if isinstance(name, str) and not is_model(name):
            if module is not None and import_module:
                raise ValueError(f"{where} names model {name!r} of module {module!r}, which the module no longer "
                                 f"registers (registered: {', '.join(list_models())})")
            if module is not None:
                raise ValueError(f"{where} names model {name!r} of module {module!r}, which is not registered here; "
                                 f"import {module} first (its @maskprop.register_model registers the model)")
            raise ValueError(f"{where} names model {name!r}, which is not registered; known models: "
                             f"{', '.join(list_models())}")
        try:  # the types of name and kwargs and the input size, as every spec is checked
            return cls(name, dict(kwargs) if isinstance(kwargs, Mapping) else kwargs, size, module)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _registering_module(name: str) -> str | None:
    """The module whose ``@register_model`` registered ``name``, where it is neither maskprop's own nor a script's
    ``__main__``; None otherwise (and for names not registered, or timm's and torchvision's)."""
    if not is_model(name) or converted_source(name) is not None:
        return None
    module = model_entrypoint(name).__module__
    return None if module == "__main__" or module.split(".")[0] == "maskprop" else module
