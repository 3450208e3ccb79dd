"""Benchmark: what a subnetwork's LayerNorms (or RMSNorms) cost, a ViT with its heads and MLP units normalised against
the plain one.

Usage:
    python tools/bench_layernorm.py --image-size 224 --batch-size 8 --keep-ratios 1 0.5 0.25 --threads 2 --repeats 5
    python tools/bench_layernorm.py --norm rmsnorm ...

Two ViT-Tinys of timm's (the same architecture and seed): ``plain``, and ``normed`` built with ``qk_norm=True``,
``scale_attn_norm=True`` and ``scale_mlp_norm=True`` (a LayerNorm over each head's query and key features, one over
all heads' outputs before ``proj``, one over the MLP's hidden units before ``fc2``: BEiT-3's norms and a qk-norm
ViT's; with ``--norm rmsnorm`` every norm of the model is timm's ``RmsNorm``, the residual stream's too), both made
prunable, so their heads' features and MLP units are the same groups. Each repetition times the
dense step (forward and backward) and maskprop's compact VR-PGE step (:func:`maskprop.bench.training_steps`) of each
model on the same masks, in turn; the table gives the medians, each model's compact speedup over its own dense step,
and the normalised model's steps over the plain one's (what the LayerNorms add, whole in the dense step and on the
kept channels in the compact one), with the interquartile range of the paired ratios.
"""

from __future__ import annotations

import argparse
import statistics

import timm
import torch

import maskprop
from maskprop.bench import interleaved_times, mask_pair, quartiles, random_batch, training_steps

NORMS = {"qk_norm": True, "scale_attn_norm": True, "scale_mlp_norm": True}


def _model(image_size: int, normed: bool, norm: str = "layernorm") -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {**NORMS, **({"norm_layer": "rmsnorm"} if norm == "rmsnorm" else {})} if normed else {}
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=image_size, **kwargs)
    return maskprop.make_prunable(model, (3, image_size, image_size)).train()


def _ratio(a: list[float], b: list[float]) -> str:
    low, mid, high = quartiles([x / y for x, y in zip(a, b)])
    return f"{mid:.2f}x ({low:.2f}-{high:.2f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--keep-ratios", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--norm", choices=["layernorm", "rmsnorm"], default="layernorm",
                        help="the normed model's norms: timm's LayerNorm (the plain model's kind) or RmsNorm")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = {"plain": _model(args.image_size, False), "normed": _model(args.image_size, True, args.norm)}
    groups = maskprop.channel_groups(models["plain"])
    assert groups == maskprop.channel_groups(models["normed"])
    x, y = random_batch(args.batch_size, args.image_size)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {args.threads} threads, batch {args.batch_size}, "
          f"{args.image_size} x {args.image_size}, {args.repeats} repeats, normed by {args.norm}")
    print("| keep | plain dense (ms) | plain compact (ms) | normed dense (ms) | normed compact (ms) | plain compact vs "
          "dense | normed compact vs dense | normed / plain, dense | normed / plain, compact |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for keep in args.keep_ratios:
        masks = mask_pair(groups, keep, torch.Generator().manual_seed(0))
        steps = {(name, kind): step for name, model in models.items()
                 for kind, step in training_steps(model, x, y, masks).items() if kind != "masked"}
        times = interleaved_times(steps, args.repeats, args.warmup)
        ms = {key: 1e3 * statistics.median(values) for key, values in times.items()}
        print(f"| {keep:.2f} | {ms['plain', 'dense']:.0f} | {ms['plain', 'compact']:.0f} | "
              f"{ms['normed', 'dense']:.0f} | {ms['normed', 'compact']:.0f} | "
              f"{_ratio(times['plain', 'dense'], times['plain', 'compact'])} | "
              f"{_ratio(times['normed', 'dense'], times['normed', 'compact'])} | "
              f"{_ratio(times['normed', 'dense'], times['plain', 'dense'])} | "
              f"{_ratio(times['normed', 'compact'], times['plain', 'compact'])} |", flush=True)


if __name__ == "__main__":
    main()
