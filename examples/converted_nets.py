"""torchvision's and timm's networks, written with plain torch layers, made channel-prunable by
``maskprop.make_prunable`` and registered so that a run can build them by name.

Train one with ``model.module: examples.converted_nets`` and ``model.name: tv_resnet18`` (or ``tv_mobilenet_v2``,
``timm_resnet18_gn``, ``timm_efficientnet_b0``, ``timm_vit_tiny``, ``timm_vit_tiny_normed``, ``tv_vit_tiny``), from the
repository root, e.g.
``maskprop train recipes/quickstart.yaml model.module=examples.converted_nets model.name=tv_resnet18``.
``make_prunable`` traces the forward with ``torch.fx`` and swaps each conv, BatchNorm, linear and norm layer on
prunable channels for maskprop's, with the same parameters (a torchvision or timm checkpoint loads as it is); the run
checks the result with ``maskprop.check_model`` before its first step.

The trace reads the shapes at ``INPUT_SIZE``; they decide only how many features per channel a flattened feature map
gives a linear layer, and the convolutional networks pool to one position before theirs, so they train at any input
size; the vision transformers are built for ``INPUT_SIZE``.
"""

from __future__ import annotations

import functools

import timm
import torchvision
from torch import nn

import maskprop

INPUT_SIZE = (3, 32, 32)


@maskprop.register_model
def tv_resnet18(num_classes: int = 1000, prune_residual: bool = True) -> nn.Module:
    """torchvision's ResNet-18: a group per stage stream (the stem's output and ``layer1``'s blocks are one) and one
    per block's inner conv."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    return maskprop.make_prunable(model, INPUT_SIZE, prune_residual=prune_residual)


@maskprop.register_model
def tv_mobilenet_v2(num_classes: int = 1000, prune_residual: bool = True, width_mult: float = 1.0) -> nn.Module:
    """torchvision's MobileNetV2: each inverted residual's expansion is a group its depthwise conv reads and writes;
    blocks that add into one stream share its group."""
    model = torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=width_mult)
    return maskprop.make_prunable(model, INPUT_SIZE, prune_residual=prune_residual)


@maskprop.register_model
def timm_resnet18_gn(num_classes: int = 1000, prune_residual: bool = True, num_groups: int = 8) -> nn.Module:
    """timm's ResNet-18 with a GroupNorm of ``num_groups`` groups for every BatchNorm: maskprop's ``SparseGroupNorm``
    prunes each by the features of its groups (feature ``j`` of every GroupNorm group kept or dropped together; 8 to
    64 features a group at 8 groups)."""
    norm = functools.partial(timm.layers.GroupNorm, num_groups=num_groups)
    model = timm.create_model("resnet18", num_classes=num_classes, norm_layer=norm)
    return maskprop.make_prunable(model, INPUT_SIZE, prune_residual=prune_residual)


@maskprop.register_model
def timm_efficientnet_b0(num_classes: int = 1000, prune_residual: bool = True,
                         drop_path_rate: float = 0.0) -> nn.Module:
    """timm's EfficientNet-B0: its fused BatchNorm-activation layers become maskprop's (``SparseBatchNormAct2d``), and
    each squeeze-and-excitation gate is one group with the channels it scales."""
    model = timm.create_model("efficientnet_b0", num_classes=num_classes, drop_path_rate=drop_path_rate)
    return maskprop.make_prunable(model, INPUT_SIZE, prune_residual=prune_residual)


@maskprop.register_model
def timm_vit_tiny(num_classes: int = 1000, drop_path_rate: float = 0.0) -> nn.Module:
    """timm's ViT-Tiny for 32 x 32 images (patches of 4 x 4: 64 tokens): the hidden units of each block's MLP are a
    group (768 of them, between ``fc1`` and ``fc2``), and so are its attention heads' features (64, shared by the
    3 heads' queries, keys and values); the residual stream stays whole."""
    model = timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, img_size=INPUT_SIZE[1:], patch_size=4,
                              drop_path_rate=drop_path_rate)
    return maskprop.make_prunable(model, INPUT_SIZE)


@maskprop.register_model
def timm_vit_tiny_normed(num_classes: int = 1000, drop_path_rate: float = 0.0) -> nn.Module:
    """:func:`timm_vit_tiny` with RMSNorm for every norm (as newer vision transformers have), among them a query-key
    RMSNorm in each head and one on the attention's output before ``proj`` and on the MLP's hidden units: maskprop's
    ``SparseRMSNorm`` normalises the kept features of each head and of each MLP's hidden units (the residual stream's
    RMSNorms stay whole, with the stream)."""
    model = timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, img_size=INPUT_SIZE[1:], patch_size=4,
                              drop_path_rate=drop_path_rate, qk_norm=True, scale_attn_norm=True, scale_mlp_norm=True,
                              norm_layer=timm.layers.RmsNorm)
    return maskprop.make_prunable(model, INPUT_SIZE)


@maskprop.register_model
def tv_vit_tiny(num_classes: int = 1000) -> nn.Module:
    """torchvision's ``VisionTransformer`` at ViT-Tiny's widths for 32 x 32 images (patches of 4 x 4: 64 tokens, 12
    blocks 192 wide, 3 heads): each block's MLP hidden units are a group, and so are the heads' features of its
    ``nn.MultiheadAttention``, which becomes maskprop's ``SparseMultiheadAttention`` (torch's state-dict keys kept)."""
    model = torchvision.models.VisionTransformer(image_size=INPUT_SIZE[1], patch_size=4, num_layers=12, num_heads=3,
                                                 hidden_dim=192, mlp_dim=768, num_classes=num_classes)
    return maskprop.make_prunable(model, INPUT_SIZE)


if __name__ == "__main__":  # python examples/converted_nets.py: each network checked, and how a run trains one
    for net in ("tv_resnet18", "tv_mobilenet_v2", "timm_efficientnet_b0", "timm_vit_tiny", "timm_vit_tiny_normed",
                "tv_vit_tiny"):
        print(f"{net}: {maskprop.check_model(maskprop.create_model(net, num_classes=10), INPUT_SIZE)}")
    print("train one: maskprop train recipes/quickstart.yaml model.module=examples.converted_nets "
          "model.name=tv_resnet18")
