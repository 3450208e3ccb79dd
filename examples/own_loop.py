"""VR-PGE in a training loop of your own: a torchvision ResNet-18 searched, fixed, finetuned narrow and exported.

Run it from the repository root (about two minutes on two CPU cores; ``--device cuda`` on a GPU):

    python examples/own_loop.py --out own_loop

``maskprop train`` runs this method with everything around it (schedules, logging, checkpoints and exact resume,
timing against dense, DDP, CUDA graphs). This script is the method alone, in the few library calls a loop of your
own needs, so that it can go into a training script you already have:

1. ``maskprop.make_prunable`` turns a network of plain torch layers into one whose channels can be dropped
   (``maskprop.channel_groups(model)``: the groups whose channels are kept or dropped together; a converted network
   has no ``channel_groups`` method, maskprop's own models do);
2. ``maskprop.vrpge.ChannelScores`` holds one keep probability per channel and the budget on their sum;
3. each search step (:func:`search_step`) draws two subnetworks ``m`` and ``m'`` from the probabilities, trains the
   weights of ``m`` (its forward and backward run on its kept channels only, under ``maskprop.use_mask``), runs a
   second forward of ``m'`` without gradients, and moves the probabilities by the variance-reduced estimator
   ``(L(m) - L(m')) H^alpha(s) grad_s ln p(m|s)``, then projects them back under the budget;
4. the search starts with dense warm-up steps and an anneal of the budget from every channel down to the keep ratio
   (``maskprop.vrpge.BudgetSchedule``), as ``recipes/quickstart.yaml`` does;
5. the subnetwork is fixed (``ChannelScores.top_mask``), cut out as a plain narrow model (``maskprop.materialize``),
   finetuned like any torch module and saved with ``torch.export``.

``tests/test_own_loop.py`` checks that :func:`search_step` computes what the trainer's step computes (float64, the
same masks, weights and probabilities after several steps) and runs this script end to end.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.utils.data import DataLoader

import maskprop
from maskprop.threads import RunThreads, check_threads
from maskprop.train.shapes import shapes_datasets
from maskprop.vrpge import BudgetSchedule, ChannelScores, vrpge


def build_model(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 for 32 x 32 images, made prunable.

    Any network of plain torch layers will do: ``make_prunable`` traces it at one input size (``torch.fx``) and swaps
    its conv, BatchNorm and linear layers on channels that can be dropped for maskprop's (same parameters, same
    forward code). Its groups: each stage's residual stream and each block's inner conv.
    """
    network = torchvision.models.resnet18(num_classes=num_classes)
    network.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)  # a 3 x 3 stride-1 stem for small images
    return maskprop.make_prunable(network, (3, 32, 32))


def search_step(model: nn.Module, scores: ChannelScores, weight_opt: torch.optim.Optimizer,
                score_opt: torch.optim.Optimizer, images: Tensor, labels: Tensor, generator: torch.Generator,
                alpha: float = 0.5, align: int = 1) -> Tensor:
    """One VR-PGE step; returns ``L(m)`` (a tensor: reading it is the caller's choice of host sync).

    Args:
        model: A model with channel groups (``make_prunable``, or ``maskprop.create_model``), in train mode.
        scores: Its keep probabilities.
        weight_opt: The weights' optimizer (SGD in the paper).
        score_opt: The probabilities' optimizer (Adam in the paper).
        images, labels: One batch, on the model's device.
        generator: The masks' random stream, on the scores' device.
        alpha: The preconditioner's exponent, ``H^alpha(s) = (s (1 - s))^alpha`` (0.5 in the paper).
        align: Pad every kept width to a multiple of this (8 on a GPU: tensor cores; exact either way).
    """
    flat_m, flat_m2 = scores.sample_flat(generator), scores.sample_flat(generator)  # m, m' ~ Bernoulli(s)
    # use_mask takes {group: mask}; split on the host, the masks cross from the GPU in one copy each, not one a group
    weight_opt.zero_grad(set_to_none=True)
    score_opt.zero_grad(set_to_none=True)
    with maskprop.use_mask(model, scores.split(flat_m.cpu()), align=align):  # forward + backward on m's channels
        loss_m = F.cross_entropy(model(images), labels)
    loss_m.backward()
    with torch.no_grad(), maskprop.use_mask(model, scores.split(flat_m2.cpu()), align=align):  # L(m'): no backward
        loss_m2 = F.cross_entropy(model(images), labels)
    scores.scores.grad = vrpge(loss_m.detach(), loss_m2, flat_m, scores.scores.detach(), alpha=alpha)
    weight_opt.step()
    score_opt.step()
    scores.project_()  # back onto {0 <= s <= 1, sum s <= K}
    return loss_m.detach()


def dense_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor) -> Tensor:
    """One plain SGD step of ``model`` (every channel): the warm-up, and the narrow model's finetune."""
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, device: torch.device, mask: dict[str, Tensor] | None = None
             ) -> float:
    """Top-1 accuracy (%) of ``model`` in eval mode, of its subnetwork ``mask`` when one is given."""
    model.eval()
    correct = total = 0
    with maskprop.use_mask(model, mask):
        for images, labels in loader:
            correct += int((model(images.to(device)).argmax(1) == labels.to(device)).sum())
            total += len(labels)
    model.train()
    return 100.0 * correct / total


def threads(value: str) -> int | str:
    """``--threads``: ``auto`` or a count (``maskprop.threads``)."""
    return check_threads(value if value == "auto" else int(value))


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """Refuse a setting the loop cannot run with, in one line (exit status 2), before anything is trained: the
    device it names."""
    if not 0 < args.keep_ratio <= 1:
        parser.error(f"--keep-ratio {args.keep_ratio}: expected a fraction in (0, 1]")
    for name in ("train_size", "val_size", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an integer >= 1")
    if args.train_size < args.batch_size:  # an epoch drops its partial last batch: it would have no step
        parser.error(f"--train-size {args.train_size} is below --batch-size {args.batch_size}: an epoch would have "
                     f"no full batch")
    for name in ("warmup_epochs", "anneal_epochs", "search_epochs", "finetune_epochs"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an integer >= 0")
    for name in ("lr", "score_lr"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a number > 0")
    if args.out.exists() and not args.out.is_dir():  # found before the training, not after it
        parser.error(f"--out {args.out} is a file; expected a directory to save narrow.pt2 in")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    return device


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("own_loop"), help="where the narrow model is saved")
    parser.add_argument("--keep-ratio", type=float, default=0.5, help="channels kept on average (default 0.5)")
    parser.add_argument("--train-size", type=int, default=3000, help="shapes training images (default 3000)")
    parser.add_argument("--val-size", type=int, default=500, help="shapes validation images (default 500)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.02, help="SGD's lr for the weights, cosine (default 0.02)")
    parser.add_argument("--warmup-epochs", type=int, default=2, help="dense epochs first (default 2)")
    parser.add_argument("--anneal-epochs", type=int, default=3, help="epochs of the budget's anneal (default 3)")
    parser.add_argument("--search-epochs", type=int, default=5, help="epochs at the budget after it (default 5)")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="epochs of the narrow model (default 3)")
    parser.add_argument("--score-lr", type=float, default=0.2,
                        help="Adam's lr for the probabilities: about 14 / anneal steps settles them within the anneal "
                             "(Adam moves each by at most the lr a step; default 0.2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=threads, default="auto",
                        metavar="auto|N", help="torch CPU threads: auto (default: the cores other processes leave "
                        "free, re-chosen every epoch and every 30 s) or N")
    args = parser.parse_args(argv)
    device = check_args(parser, args)
    torch.manual_seed(args.seed)
    align = 8 if device.type == "cuda" else 1
    if device.type == "cpu":  # before the first convolution, as maskprop train does (README, "From Python")
        maskprop.keep_freed_host_memory()
        maskprop.enlarge_onednn_primitive_cache()
    cpu_threads = RunThreads(args.threads)  # set before each epoch, re-chosen every 30 s within one

    train_set, val_set = shapes_datasets(args.train_size, args.val_size, seed=args.seed)
    train_loader = DataLoader(train_set, args.batch_size, shuffle=True, drop_last=True)
    val_loader = DataLoader(val_set, 250)

    model = build_model().to(device)
    groups = maskprop.channel_groups(model)  # {group: channels}: the stage streams and each block's inner conv
    # 2. One keep probability per channel. With an anneal they start at 1 under a budget of every channel.
    steps = len(train_loader)
    schedule = BudgetSchedule(sum(groups.values()), args.keep_ratio, warmup_steps=args.warmup_epochs * steps,
                              anneal_steps=args.anneal_epochs * steps)
    scores = ChannelScores(groups, args.keep_ratio, init=1.0 if args.anneal_epochs else 0.5,
                           budget=schedule.sampling_budget(0), device=device)
    search_steps = (args.warmup_epochs + args.anneal_epochs + args.search_epochs) * steps
    weight_opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    weight_lr = torch.optim.lr_scheduler.CosineAnnealingLR(weight_opt, search_steps)
    score_opt = torch.optim.Adam(scores.parameters(), lr=args.score_lr)
    generator = torch.Generator(device).manual_seed(args.seed)

    # 3-4. The search: dense warm-up steps, then VR-PGE steps while the budget falls to the keep ratio and after.
    start, step = time.perf_counter(), 0
    for epoch in range(1, args.warmup_epochs + args.anneal_epochs + args.search_epochs + 1):
        cpu_threads.update()
        kind = schedule.kind(step)  # of the epoch's first step: warmup, anneal or search
        for images, labels in train_loader:
            images, labels = images.to(device), labels.to(device)
            if schedule.kind(step) == "warmup":
                loss = dense_step(model, weight_opt, images, labels)
            else:
                scores.set_budget(schedule.at(step + 1))  # the projection meets the next step's budget
                loss = search_step(model, scores, weight_opt, score_opt, images, labels, generator, align=align)
            weight_lr.step()
            step += 1
            cpu_threads.tick()  # a long epoch follows the load within it
        kept = scores.expected_kept().ratio
        top1 = accuracy(model, val_loader, device, scores.top_mask())
        print(f"search epoch {epoch} ({kind}): loss {float(loss):.3f}, expected kept {kept:.3f}, top-score "
              f"subnetwork {top1:.1f}%")

    # 5. Fix the subnetwork, cut it out, finetune it as the plain narrow model it is.
    mask = scores.top_mask()
    narrow = maskprop.materialize(model, mask)
    finetune_opt = torch.optim.SGD(narrow.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)
    for _ in range(args.finetune_epochs):
        cpu_threads.update()
        for images, labels in train_loader:
            dense_step(narrow, finetune_opt, images.to(device), labels.to(device))
            cpu_threads.tick()
    minutes = (time.perf_counter() - start) / 60
    result = {"accuracy": accuracy(narrow, val_loader, device), "minutes": minutes,
              "kept_ratio": sum(int(m.sum()) for m in mask.values()) / sum(groups.values()),
              "flops_kept": maskprop.flops(model, (3, 32, 32), mask) / maskprop.flops(model, (3, 32, 32))}
    print(f"narrow model: {result['accuracy']:.1f}%, {100 * result['kept_ratio']:.0f}% of the channels, "
          f"{100 * result['flops_kept']:.0f}% of the FLOPs; {minutes:.1f} minutes")

    # The narrow model is a plain torch module: torch.export (or torch.save, ONNX, ...) takes it with you.
    args.out.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1)  # any batch size
    program = torch.export.export(narrow.eval(), (torch.zeros(2, 3, 32, 32, device=device),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, args.out / "narrow.pt2")
    print(f"saved {args.out / 'narrow.pt2'} (torch.export.load(path).module() runs it, without maskprop)")
    return result


if __name__ == "__main__":
    main()
