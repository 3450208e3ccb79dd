"""Which of timm's and torchvision's networks ``maskprop.make_prunable`` converts, and whether the result is right.

Usage:
    python tools/prunable_sweep.py                       # every network below, about 6 minutes on two CPU threads
    python tools/prunable_sweep.py --only swin_t deit_tiny_patch16_224 --threads 1

For each network: built with 10 classes (and the keywords below), made prunable at the input size below, then checked
by ``maskprop.check_model`` (dense, compact, static-shape and narrow passes against the masked reference in float64,
and the FLOPs against ``torch.utils.flop_counter``). A row gives the groups, the prunable channels, the concatenated
groups that layers read or write (``torch.cat`` of groups along the channels; an attention's ``qkv`` and ``proj`` one
each), the share of the dense FLOPs in layers that read or write a group (what pruning can reduce; an attention's
products count as one), and the check's result; a network that cannot be converted gives the
first words of the one-line error. A failed check would be a bug of ``make_prunable``.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import timm
import torch
import torchvision

import maskprop

# (library, model, keywords, image size): convolutional networks, MLPs on channels-last maps and vision transformers.
NETWORKS: list[tuple[str, str, dict[str, Any], int]] = [
    ("torchvision", "resnet18", {}, 64),
    ("torchvision", "mobilenet_v2", {}, 64),
    ("torchvision", "efficientnet_b0", {}, 64),
    ("torchvision", "regnet_x_400mf", {}, 64),
    ("torchvision", "regnet_y_400mf", {}, 64),
    ("torchvision", "resnext50_32x4d", {}, 64),
    ("torchvision", "densenet121", {}, 64),
    ("torchvision", "googlenet", {"aux_logits": False, "init_weights": False}, 64),
    ("torchvision", "inception_v3", {"aux_logits": False, "init_weights": False}, 96),
    ("torchvision", "squeezenet1_1", {}, 64),
    ("torchvision", "convnext_tiny", {}, 64),
    ("torchvision", "swin_t", {}, 64),
    ("torchvision", "swin_v2_t", {}, 64),
    ("torchvision", "maxvit_t", {}, 224),
    ("torchvision", "vit_b_16", {"image_size": 32}, 32),
    ("timm", "resnet18", {}, 64),
    ("timm", "resnet50_gn", {}, 64),
    ("timm", "resnetv2_50x1_bit", {}, 64),
    ("timm", "mobilenetv3_small_050", {}, 64),
    ("timm", "repvit_m1", {}, 64),
    ("timm", "regnety_002", {}, 64),
    ("timm", "cspresnet50", {}, 64),
    ("timm", "cspdarknet53", {}, 64),
    ("timm", "dla34", {}, 64),
    ("timm", "dpn68b", {}, 64),
    ("timm", "ese_vovnet19b_dw", {}, 64),
    ("timm", "selecsls42b", {}, 64),
    ("timm", "res2net50_14w_8s", {}, 64),
    ("timm", "ghostnet_100", {}, 64),
    ("timm", "convnext_atto", {}, 64),
    ("timm", "convnextv2_atto", {}, 64),
    ("timm", "edgenext_xx_small", {}, 64),
    ("timm", "fastvit_t8", {}, 64),
    ("timm", "poolformer_s12", {}, 64),
    ("timm", "convmixer_768_32", {}, 64),
    ("timm", "efficientformer_l1", {}, 224),
    ("timm", "levit_128s", {}, 224),
    ("timm", "coat_lite_tiny", {}, 224),
    ("timm", "mobilevit_xxs", {}, 64),
    ("timm", "vit_tiny_patch16_224", {"img_size": 32}, 32),
    ("timm", "deit_tiny_patch16_224", {"img_size": 32}, 32),
    ("timm", "swin_tiny_patch4_window7_224", {}, 224),
    ("timm", "swinv2_tiny_window8_256", {"img_size": 64}, 64),
    ("timm", "beit_base_patch16_224", {"img_size": 32}, 32),
    ("timm", "vit_small_patch16_224", {"img_size": 32, "qk_norm": True}, 32),
    ("timm", "beit3_base_patch16_224", {"img_size": 32}, 32),
    ("timm", "eva02_tiny_patch14_224", {"img_size": 56}, 56),
    ("timm", "eva02_base_patch14_224", {"img_size": 28}, 28),
    ("timm", "maxvit_nano_rw_256", {"img_size": 64}, 64),
    ("timm", "maxvit_rmlp_nano_rw_256", {"img_size": 64}, 64),
    ("timm", "coatnet_nano_rw_224", {"img_size": 64}, 64),
    ("timm", "mixer_s16_224", {"img_size": 64}, 64),
    ("timm", "resmlp_12_224", {"img_size": 32}, 32),
]


def prunable_share(model: torch.nn.Module, size: int) -> float:
    """The share of the dense forward FLOPs in conv and linear layers (and attention's products) that read or write a
    group (or a concatenation of groups)."""
    cost = maskprop.CostModel(model, (3, size, size))
    groups = maskprop.channel_groups(model) | maskprop.sparse.concatenations(model)
    touched = sum(f for layer, f in zip(cost.layers, cost.by_layer().values())
                  if layer.in_group in groups or layer.out_group in groups)
    return touched / cost.flops()


def sweep(library: str, name: str, kwargs: dict[str, Any], size: int) -> str:
    torch.manual_seed(0)
    create = timm.create_model if library == "timm" else torchvision.models.get_model
    model = create(name, num_classes=10, **kwargs)
    started = time.perf_counter()
    try:
        maskprop.make_prunable(model, (3, size, size))
    except ValueError as err:
        return f"| {library} | {name} | {size} | - | - | - | - | not converted: {str(err)[:110]}... | |"
    groups = maskprop.channel_groups(model)
    share = prunable_share(model, size)
    try:
        checked = maskprop.check_model(model, (3, size, size), batch_size=2)
        result = f"check passed ({len(checked.checks)} checks)"
    except ValueError as err:
        result = f"**check failed**: {str(err)[:160]}"
    concatenations = len(maskprop.sparse.concatenations(model))
    return (f"| {library} | {name} | {size} | {len(groups)} | {sum(groups.values())} | {concatenations} | "
            f"{100 * share:.0f}% | {result} | {time.perf_counter() - started:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=None, help="model names to run (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)  # make_prunable's summaries
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
          f"{args.threads} threads, check_model in float64, batch 2")
    print("| library | model | input | groups | prunable channels | concatenations | FLOPs in pruned layers | "
          "result | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|")
    for library, name, kwargs, size in NETWORKS:
        if args.only is None or name in args.only:
            print(sweep(library, name, kwargs, size), flush=True)


if __name__ == "__main__":
    main()
