"""A small model registry: ``@register_model`` entry points and one ``create_model`` factory."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its own name; a duplicate name is an error."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The function that builds the registered model ``name``.

    Raises:
        ValueError: ``name`` is not registered (the message lists the known models).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
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
