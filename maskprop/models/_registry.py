"""A small model registry: ``@register_model`` entry points and one ``create_model`` factory."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterator

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its own name; a duplicate name is an error.

    The same function registered again (the same source file and name: a module imported a second time, say once as
    the script ``__main__`` and once by ``model.module``) replaces its first registration.
    """
    name = fn.__name__
    known = _MODELS.get(name)
    if known is not None and not _same_function(known, fn):
        raise ValueError(f"model {name!r} is already registered (by {known.__module__}.{known.__qualname__})")
    _MODELS[name] = fn
    return fn


def _same_function(a: Callable, b: Callable) -> bool:
    """``a`` and ``b`` are one function of one source file, defined twice (its module imported under two names)."""
    file_a, file_b = (getattr(getattr(f, "__code__", None), "co_filename", None) for f in (a, b))
    return (a.__qualname__ == b.__qualname__ and file_a is not None and file_a == file_b
            and (a.__module__ == b.__module__ or "__main__" in (a.__module__, b.__module__)))


_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def check_module_name(module: object, name: str = "model.module") -> str:
    """``module`` as a dotted Python module name (``my_nets``, ``lab.models``); a one-line ``ValueError`` otherwise."""
    if not isinstance(module, str) or not _MODULE_NAME.fullmatch(module) or module.endswith(".py"):
        stem = module[:-3].replace("/", ".") if isinstance(module, str) and module.endswith(".py") else ""
        hint = f" (a module name, not a file: {stem!r})" if _MODULE_NAME.fullmatch(stem) else ""
        raise ValueError(f"{name}={module!r} is not a Python module name; expected dotted identifiers such as "
                         f"'my_nets' or 'lab.models'{hint}")
    return module


@contextlib.contextmanager
def _current_directory_on_path() -> Iterator[None]:
    """The current directory first on ``sys.path`` inside the block, as ``python -m`` has it (the console script
    ``maskprop`` starts with its own directory there instead)."""
    here = os.getcwd()
    sys.path.insert(0, here)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(here)


def import_models(module: str, name: str = "model.module") -> list[str]:
    """Import ``module`` (from the Python path or the current directory) so that the models it registers with
    :func:`register_model` can be built by name; returns the names it registered (none if it was imported before).

    Raises:
        ValueError: ``module`` is not a module name, is not found, or raises while it is imported (one line with its
            error; ``python -c "import MODULE"`` shows the traceback).
    """
    check_module_name(module, name)
    before = set(_MODELS)
    try:
        with _current_directory_on_path():
            importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name == module or module.startswith(f"{err.name}."):
            raise ValueError(f"{name}={module!r}: no module named {err.name!r} on the Python path or in the current "
                             f"directory ({os.getcwd()}); expected a module that registers its models with "
                             f"@maskprop.register_model") from None
        raise ValueError(f"{name}={module!r} could not be imported: {err}") from None
    except (Exception, SystemExit) as err:  # the user's module failing as it is imported (or exiting): one line
        message = " ".join(str(err).split())[:300]
        raise ValueError(f"{name}={module!r} raised {type(err).__name__} as it was imported: {message} (python -c "
                         f"'import {module}' shows where)") from None
    return sorted(set(_MODELS) - before)


CONVERTED_SOURCES = ("timm", "torchvision")
"""Libraries whose models a name such as ``timm:efficientnet_b0`` builds, made prunable by ``make_prunable``."""

CONVERTED_INPUT_SIZE = (224, 224)
"""The image size ``make_prunable`` traces those models at (convolutional heads pool globally, so they train at any
size), unless their keywords fix one (``img_size`` of timm's, ``image_size`` of torchvision's vision transformers) or
timm's model declares another (``pretrained_cfg["input_size"]``: 256 x 256 of ``swinv2_tiny_window8_256``)."""


def _declared_size(model: nn.Module) -> tuple[int, int] | None:
    """The ``(H, W)`` a timm model declares it takes (its ``pretrained_cfg``), or ``None``."""
    cfg = getattr(model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if isinstance(size, (tuple, list)) and len(size) == 3 and all(isinstance(s, int) and s > 0 for s in size[1:]):
        return int(size[1]), int(size[2])
    return None


def converted_source(name: object) -> str | None:
    """``"timm"`` or ``"torchvision"`` for a name of the form ``SOURCE:ARCH`` (a model of that library, made prunable),
    else ``None``."""
    if not isinstance(name, str):
        return None
    source, colon, arch = name.partition(":")
    return source if colon and arch and source in CONVERTED_SOURCES else None


def _converted_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The entry point of ``timm:ARCH`` or ``torchvision:ARCH``: the library's model built with its own keywords, then
    made prunable (``prune_residual`` is make_prunable's)."""
    source, _, arch = name.partition(":")
    if source == "timm":
        import timm

        if not timm.is_model(arch):
            raise ValueError(f"unknown model {name!r}: timm has no model {arch!r} (timm.list_models() names them)")
        create = timm.create_model
    else:
        import torchvision

        if arch not in torchvision.models.list_models():
            raise ValueError(f"unknown model {name!r}: torchvision has no model {arch!r} "
                             f"(torchvision.models.list_models() names them)")
        create = torchvision.models.get_model

    def build(num_classes: int = 1000, prune_residual: bool = True, **kwargs) -> nn.Module:
        from ..prunable import make_prunable

        if source == "torchvision" and arch in ("googlenet", "inception_v3") and kwargs.get("aux_logits", True):
            raise ValueError(f"{name} returns auxiliary logits in training (a tuple, not one tensor of logits), which "
                             f"maskprop trains without; pass model.kwargs.aux_logits=false (and init_weights=false "
                             f"for GoogLeNet, to skip its slow initialisation)")
        model = create(arch, num_classes=num_classes, **kwargs)
        channels = kwargs.get("in_chans", 3)  # timm's keyword for the input's channels
        size = kwargs.get("img_size", kwargs.get("image_size"))
        if size is None:
            size = (_declared_size(model) if source == "timm" else None) or CONVERTED_INPUT_SIZE
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        return make_prunable(model, (channels, *size), prune_residual=prune_residual)

    build.__name__ = build.__qualname__ = name
    return build


def is_model(name: object) -> bool:
    """``name`` builds a model: registered, or ``timm:ARCH`` / ``torchvision:ARCH`` (not checked against the
    library's list until it is built)."""
    return isinstance(name, str) and (name in _MODELS or converted_source(name) is not None)


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The function that builds the registered model ``name``, or timm's or torchvision's model ``ARCH`` for
    ``timm:ARCH`` or ``torchvision:ARCH``, converted by :func:`maskprop.make_prunable`.

    Raises:
        ValueError: ``name`` is not registered (the message lists the known models), or the library has no such model.
    """
    if converted_source(name) is not None and name not in _MODELS:
        return _converted_entrypoint(name)
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}, or timm:NAME and "
                         f"torchvision:NAME for a model of those libraries made prunable (a network of your own: "
                         f"register it with @maskprop.register_model)")
    return _MODELS[name]


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)


def create_model(name: str, num_classes: int | None = None, **kwargs) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`.
        num_classes: outputs of the classifier (default: the model's own, 10 for CIFAR models, 1000 for ImageNet).
        **kwargs: passed to the model's entry point (e.g. ``width=2``, ``prune_residual=False``).

    Raises:
        ValueError: an unknown name, a ``num_classes`` below 1, or keywords the model does not take.
    """
    entrypoint = model_entrypoint(name)
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        kwargs["num_classes"] = num_classes
    try:
        return entrypoint(**kwargs)
    except TypeError as err:  # an unknown keyword: one line naming it, as the trainer's config says it
        raise ValueError(f"model {name!r} does not take the keywords {kwargs} ({err})") from None
