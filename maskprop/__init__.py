"""maskprop: channel-sparse training whose forward and backward run on the kept channels only.

The public API, small and explicit:

* models: :func:`create_model`, :func:`list_models`, ``model.channel_groups()``, :class:`ModelSpec` (the resolved
  build of a model: what checkpoints and exports save and rebuild from); a network of your own:
  :func:`register_model` and :func:`check_model` (is it wired so that its subnetworks compute what their masks say);
  a network of plain torch layers (torchvision's, timm's): :func:`make_prunable`; :func:`channel_groups` of any model;
* execution: :func:`use_mask` (``"compact"`` or ``"masked"``), :func:`random_mask`, :func:`full_mask`;
* cost: :func:`flops`, :class:`CostModel`;
* surgery and export: :func:`materialize` (a mask -> a physically narrow plain torch model), :func:`save_exported`,
  :func:`export_run` (what ``maskprop export`` does), :func:`load_exported`, :class:`WidthPlan`;
* training: :func:`fit` (not in ``__all__``: it needs the training dependencies, the rest torch alone);
* CPU timing: :func:`keep_freed_host_memory`, :func:`enlarge_onednn_primitive_cache` (what ``maskprop train`` and
  ``maskprop bench`` call first).

Each name is imported from its module when first used, so ``import maskprop`` itself is instant and imports no torch.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what the names below are, for type checkers and editors; at run time they load on first use
    from ._workarounds import enlarge_onednn_primitive_cache, keep_freed_host_memory
    from .check import check_model
    from .cost import CostModel, flops
    from .export import WidthPlan, export_run, load_exported, save_exported
    from .models import create_model, list_models, register_model
    from .models.spec import ModelSpec
    from .prunable import make_prunable
    from .sparse import Mask, channel_groups, check_mask, full_mask, random_mask, use_mask
    from .surgery import materialize
    from .train import fit as fit  # not in __all__: it needs the training dependencies

__version__ = "0.1.0"

__all__ = [
    "CostModel",
    "Mask",
    "ModelSpec",
    "WidthPlan",
    "channel_groups",
    "check_mask",
    "check_model",
    "create_model",
    "export_run",
    "flops",
    "full_mask",
    "enlarge_onednn_primitive_cache",
    "keep_freed_host_memory",
    "list_models",
    "load_exported",
    "make_prunable",
    "materialize",
    "random_mask",
    "register_model",
    "save_exported",
    "use_mask",
]


# The public names, each with the module that defines it, imported on first use: ``import maskprop`` loads nothing
# but this file, so that ``maskprop --help`` and a mistyped command answer at once (torch takes seconds to import) and
# Ctrl-C while torch loads interrupts a command, not an import; ``fit`` needs the training dependencies, the rest
# torch alone.
_DEFINED_IN = {
    "CostModel": "cost", "flops": "cost",
    "Mask": "sparse", "channel_groups": "sparse", "check_mask": "sparse", "full_mask": "sparse",
    "random_mask": "sparse", "use_mask": "sparse",
    "ModelSpec": "models.spec",
    "WidthPlan": "export", "export_run": "export", "load_exported": "export", "save_exported": "export",
    "check_model": "check",
    "create_model": "models", "list_models": "models", "register_model": "models",
    "enlarge_onednn_primitive_cache": "_workarounds", "keep_freed_host_memory": "_workarounds",
    "make_prunable": "prunable",
    "materialize": "surgery",
    "fit": "train",
}

# Subpackages reached as attributes (``maskprop.vrpge.ChannelScores`` after ``import maskprop``), imported on first use:
# ``train`` and ``report`` need the training and report dependencies, the rest torch alone.
_SUBPACKAGES = ("bench", "cost", "export", "models", "prunable", "report", "sbp", "sparse", "surgery", "train",
                "vrpge")


def __getattr__(name: str):
    import importlib

    if name in _DEFINED_IN:
        value = getattr(importlib.import_module(f".{_DEFINED_IN[name]}", __name__), name)
        globals()[name] = value  # found directly from now on
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'maskprop' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_DEFINED_IN, *_SUBPACKAGES})
