"""Model registry and the channel-sparse model family."""

from . import mlp, resnet, vgg, wide_resnet  # noqa: F401  (register the entry points)
from ._registry import (
                        converted_source,
                        create_model,
                        import_models,
                        is_model,
                        list_models,
                        model_entrypoint,
                        register_model,
)
from .mlp import MLP
from .resnet import BasicBlock, Bottleneck, ResNet
from .vgg import VGG
from .wide_resnet import WideBasic, WideResNet

__all__ = [
    "MLP", "VGG", "BasicBlock", "Bottleneck", "ResNet", "WideBasic", "WideResNet",
    "converted_source", "create_model", "import_models", "is_model", "list_models", "model_entrypoint",
    "register_model",
]
