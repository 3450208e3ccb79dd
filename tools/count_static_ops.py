"""Operator calls of a static-shape compact step (``maskprop.sparse.static``) beside a dense and a ``use_mask`` step,
on the ``meta`` device (the code paths of CUDA, no arithmetic: the counts of a CUDA step on a machine without one).

Usage:
    python tools/count_static_ops.py --models resnet32 vgg19_bn resnet50

Every step is one training forward, loss and backward. The static step also writes a new mask into its buffers
(``update``, with tie-breaking uniforms), at capacities chosen from keep probabilities of 0.5 (``--keep``) with
``--align``; the ``use_mask`` step runs a sampled mask of the same keep ratio with the same alignment. Counted with a
``TorchDispatchMode`` (below autograd, the backward included):

* ``launches``: operators producing data on the model's device, views and metadata calls left out (on CUDA, the
  kernel launches);
* ``host``: operators on host tensors (the index arithmetic ``use_mask`` does before its one copy; none for the static
  step);
* ``all``: every operator call, views included.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import maskprop
from maskprop.sparse import random_mask, use_mask
from maskprop.sparse.static import StaticExecutionState, StaticLayout, choose_capacities, use_static
from maskprop.train.config import SparsityConfig
from maskprop.vrpge import ChannelScores

# Operators that only make views, read metadata or allocate without writing: no kernel on a GPU.
NO_KERNEL = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "detach", "t", "permute", "expand", "slice",
    "select", "split", "split_with_sizes", "unsafe_split_with_sizes", "alias", "unsqueeze", "squeeze", "transpose",
    "unbind", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "set_",
    "unflatten", "narrow", "_has_compatible_shallow_copy_type", "is_same_size", "_local_scalar_dense", "resize_",
    "view_as",
}
IMAGE_SIZES = {"resnet18": 224, "resnet34": 224, "resnet50": 224}


class Ops(TorchDispatchMode):
    """Counts operator calls: on the device that computes (``launches``, views left out), on the host, and all."""

    def __init__(self) -> None:
        super().__init__()
        self.launches = 0
        self.host = 0
        self.all = 0
        self.names: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.all += 1
        tensors = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]
        inputs = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(t, torch.Tensor)]
        on_host = all(t.device.type == "cpu" for t in tensors + inputs) and (tensors or inputs)
        if on_host:
            self.host += 1
        elif name not in NO_KERNEL and (tensors or inputs):  # (dtype arithmetic, promote_types, touches no tensor)
            self.launches += 1
            self.names[name] += 1
        return out


def count(fn: Callable[[], object]) -> Ops:
    """The operator calls of ``fn()``, with the gradient norms taking the multi-tensor route CUDA takes (torch falls
    back to one norm per tensor on ``meta`` only)."""
    with mock.patch.object(torch.nn.utils.clip_grad, "_has_foreach_support", lambda tensors, device: True), \
            Ops() as ops:
        fn()
    return ops


def _on_meta(name: str, keep: float, align: int, batch: int) -> tuple:
    """The model in train mode, a batch, its groups and their capacities at ``keep``, all on ``meta``."""
    torch.manual_seed(0)
    model = maskprop.create_model(name).to("meta").train()
    size = IMAGE_SIZES.get(name, 32)
    x = torch.empty(batch, 3, size, size, device="meta")
    y = torch.zeros(batch, dtype=torch.long, device="meta")
    groups = maskprop.channel_groups(model)
    return model, x, y, groups, choose_capacities(ChannelScores(groups, keep), align=align)


def counts_for(name: str, keep: float, align: int, batch: int) -> dict[str, Ops]:
    model, x, y, groups, capacities = _on_meta(name, keep, align, batch)
    state = StaticExecutionState(StaticLayout(model, capacities, align=align))
    mask = torch.empty(sum(groups.values()), dtype=torch.bool, device="meta")
    u = torch.empty(mask.shape, device="meta")
    sampled = random_mask(groups, keep, torch.Generator().manual_seed(0))

    def dense() -> None:
        F.cross_entropy(model(x), y).backward()

    def compact() -> None:
        with use_mask(model, sampled, align=align):
            loss = F.cross_entropy(model(x), y)
        loss.backward()

    def forward() -> torch.Tensor:
        with use_static(state):
            return F.cross_entropy(model(x), y)

    dense()  # first calls (lazy initialisation) left out of the counts
    results = {"dense": count(dense), "use_mask": count(compact), "update": count(lambda: state.update(mask, u))}
    loss = None

    def run_forward() -> None:
        nonlocal loss
        loss = forward()

    results["static forward"] = count(run_forward)
    results["static backward"] = count(lambda: loss.backward())
    return results


def whole_steps(name: str, keep: float, align: int, batch: int) -> dict[str, Ops]:
    """Launches of the whole steps the trainer captures (``maskprop.train.graphs``) on ``meta``, each without its
    optimizer steps (on CUDA a fused SGD and a capturable Adam: a few launches per tensor group, the same for all). The
    dense step is forward, loss, backward and gradient norm; the search step adds the device sampling of ``m`` and
    ``m'`` from uniforms, their mask update (one for both), the no-grad forward of ``m'``, the score gradient and the
    projection of the scores onto the budget (also counted alone: ``projection``; and one mask's sampling and update:
    ``mask update``, and both masks' in one: ``mask update, m and m' together``); the fixed-mask finetune step is the
    dense step of the full model under a sampled mask at its aligned kept counts (``finetune.narrow: false``); the
    narrow finetune step is the dense step of that mask's narrow model, padded to ``align`` (the default finetune). The
    search step as torchrun runs it (two ranks: its three pieces, the losses packed for an all-reduce after the
    forwards, the score update beside the backward from the losses summed, the gradients packed for an all-reduce after
    the backward and averaged after it) is counted too, each collective as one launch; and the search step that draws
    its ``m`` and ``m'`` at its own start, on the main stream, instead of in the step before beside the backward
    (``SearchStep(m_ahead=False)``)."""
    from maskprop.train.meter import DeviceMeter
    from maskprop.train.narrow import NarrowSubnetwork
    from maskprop.train.static_steps import DenseStep, FixedMaskStep, GradientAverage, SearchStep
    from maskprop.train.steps import StepContext

    model, x, y, groups, capacities = _on_meta(name, keep, align, batch)
    scores = ChannelScores(groups, keep, device="meta")
    # autocast is off; its device type must be a real one (meta has none), and CUDA is what meta stands for here
    ctx = StepContext(torch.nn.CrossEntropyLoss(), torch.device("cuda"), None, align=align)  # type: ignore[arg-type]

    class NoStep:
        """An optimizer whose steps do nothing (they are left out of the counts); ``zero_grad`` as torch's."""

        def __init__(self, params=()) -> None:
            self.params = list(params)

        def step(self) -> None:
            pass

        def zero_grad(self, set_to_none: bool = True) -> None:
            grads = [p.grad for p in self.params if p.grad is not None]
            if set_to_none:
                for p in self.params:
                    p.grad = None
            elif grads:
                torch._foreach_zero_(grads)  # as torch's optimizers zero them on CUDA: one multi-tensor launch

    meter = DeviceMeter(torch.device("meta"))
    search = SearchStep(model, scores, (NoStep(model.parameters()), NoStep()), SparsityConfig(), ctx, capacities, meter)  # type: ignore

    dense_step = DenseStep(model, NoStep(model.parameters()), ctx, meter)  # type: ignore[arg-type]

    # The finetune steps of a sampled subnetwork: through the full model at its aligned kept counts
    # (finetune.narrow: false), and the narrow model (built on the CPU, then moved to meta), padded to ``align``.
    mask = random_mask(groups, keep, torch.Generator().manual_seed(0))
    fixed = FixedMaskStep(model, NoStep(model.parameters()), mask, ctx, meter)  # type: ignore[arg-type]
    cpu_model = maskprop.create_model(name).train()
    narrow_model = NarrowSubnetwork(cpu_model, mask, torch.optim.SGD(cpu_model.parameters(), lr=0.1),
                                    align=align).model.to("meta")
    narrow = DenseStep(narrow_model, NoStep(narrow_model.parameters()), ctx, meter)  # type: ignore[arg-type]

    steps = {"dense step": lambda: dense_step(x, y), "static search step": lambda: search(x, y),
             "fixed-mask step": lambda: fixed(x, y), "narrow step": lambda: narrow(x, y)}
    for step in steps.values():
        step()
    counts = {kind: count(step) for kind, step in steps.items()}
    counts["projection"] = count(lambda: scores.project_(search.budget))
    u = search.uniforms[0]
    counts["mask update"] = count(lambda: search.state_m.update(scores.mask_from_uniforms(u), u))
    counts["mask update, m and m' together"] = count(  # a search step's: two rows, the launches of one
        lambda: search.masks.update(scores.mask_from_uniforms(search.uniforms), search.uniforms))
    counts.update(by_stream("static search step", search, x, y))
    at_start = SearchStep(model, scores, (NoStep(model.parameters()), NoStep()), SparsityConfig(), ctx,  # type: ignore
                          capacities, meter, m_ahead=False)
    at_start(x, y)
    counts.update(by_stream("search step, m drawn at its start", at_start, x, y))

    average = GradientAverage(model.parameters(), 3, world_size=2)
    ranked = SearchStep(model, scores, (NoStep(model.parameters()), NoStep()), SparsityConfig(), ctx,  # type: ignore
                        capacities, meter, average=average)
    with mock.patch.object(GradientAverage, "all_reduce", lambda self, part="all": None):  # no process group on meta
        ranked(x, y)
        counts["torchrun search step"] = count(lambda: ranked(x, y))
        counts.update(by_stream("torchrun search step", ranked, x, y, collectives=2))
    counts["torchrun search step"].launches += 2  # the all-reduces between the pieces
    return counts


class Streams:
    """Launches of a search step by CUDA stream, and its critical path when the streams overlap fully.

    On CUDA the step forks a side stream at its start, after the step's masks are in place among the ``pre`` launches
    (taken from those the step before prepared, or drawn with one mask update); with ``m'`` first
    (``SearchStep.m2_first``) the forward of ``m'`` (``B`` launches) runs there beside the forward of ``m`` (``A``);
    after both, the side stream runs its tail (``T``: the forward of ``m'`` when it did not run first, the commit of its
    statistics, the score update and the next step's masks when they are not tied to the backward) beside the backward
    of ``m`` (``W``); ``post`` follows the join. The critical path is
    ``pre + max(A + W, max(A, B) + T) + post``.

    Under torchrun (``join``: the step's launches when its streams first join) the step is three pieces, the losses'
    all-reduce after the forwards and the gradients' after the backward: the streams join after the forwards of ``m``
    (``A``) and ``m'`` (``B``), ``mid`` launches follow on the main stream, and the tail ``T`` (the score update and
    the next masks) forks beside the backward ``W``: ``pre + max(A, B) + mid + max(W, T) + post``."""

    def __init__(self) -> None:
        self.blocks: list[tuple[int, int]] = []  # (main-stream launches before the block, the block's launches)
        self.backward = 0  # the backward's launches
        self.join: int | None = None  # the launches issued when the streams first join (three pieces)

    def summary(self, total: int) -> dict[str, int]:
        side = sum(n for _, n in self.blocks)
        if self.join is not None:
            (pre, b), (tail_at, tail) = self.blocks
            a = self.join - pre - b
            mid = tail_at - pre - a
            post = total - pre - a - b - mid - tail - self.backward
            critical = pre + max(a, b) + mid + max(self.backward, tail) + post
            return {"main": total - side, "side": side, "critical": critical}
        first, (tail_at, tail) = (self.blocks[0] if len(self.blocks) == 2 else None), self.blocks[-1]
        pre = first[0] if first is not None else tail_at
        b = first[1] if first is not None else 0
        a = tail_at - pre  # main-stream launches from the fork to the tail (m's forward)
        w = self.backward
        post = total - pre - a - b - tail - w
        return {"main": total - side, "side": side, "critical": pre + max(a + w, max(a, b) + tail) + post}


def by_stream(kind: str, step, x: torch.Tensor, y: torch.Tensor, collectives: int = 0) -> dict[str, Ops]:
    """``kind``'s launches on the main and the side stream and its critical path (:class:`Streams`) as ``Ops``
    counts (``collectives`` launches added to the main stream: the all-reduces under torchrun, where the step's
    streams join between its pieces)."""
    import contextlib

    from maskprop.train.static_steps import SearchStep

    streams, outer = Streams(), Ops()

    @contextlib.contextmanager
    def on_side(self):
        start = outer.launches
        with Ops() as inner:
            yield
        streams.blocks.append((start - sum(n for _, n in streams.blocks), inner.launches))

    backward = torch.autograd.backward

    def counted_backward(*args, **kwargs):
        start = outer.launches
        backward(*args, **kwargs)
        streams.backward = outer.launches - start

    class Main:  # the main stream of a step in pieces, which joins the side stream at the end of each
        def wait_stream(self, other) -> None:
            if streams.join is None:
                streams.join = outer.launches

    pieces = len(step.pieces(x, y)) if step.average is not None else 1
    if pieces == 3 and not step.m2_first:
        raise ValueError("the critical path of a step in three pieces is counted with m' first (SearchStep.m2_first)")
    fork = (lambda self, device: Main()) if pieces == 3 else SearchStep._fork
    with mock.patch.object(SearchStep, "_on_side", on_side), mock.patch.object(torch.autograd, "backward",
                                                                                   counted_backward), \
            mock.patch.object(SearchStep, "_fork", fork), \
            mock.patch.object(torch.nn.utils.clip_grad, "_has_foreach_support", lambda tensors, device: True), outer:
        step(x, y)
    result = {}
    for name, value in streams.summary(outer.launches).items():
        ops = Ops()
        ops.launches = value + (collectives if name != "side" else 0)
        result[f"{kind}, {name} {'path' if name == 'critical' else 'stream'}"] = ops
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet32", "vgg19_bn", "resnet50"])
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--align", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--whole", action="store_true",
                        help="whole steps: dense against the static search step and the two finetune steps")
    args = parser.parse_args()
    if args.whole:
        print(f"launches per whole step on meta (optimizer steps left out), keep {args.keep}, align {args.align}")
        print("| model | dense step | static search step | ratio | its critical path (two streams) | ratio | "
              "the path with m and m' drawn at the step's start | fixed-mask finetune step | narrow finetune step | "
              "search step under torchrun (critical path) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name in args.models:
            r = whole_steps(name, args.keep, args.align, args.batch)
            d, s = r["dense step"].launches, r["static search step"].launches
            critical = r["static search step, critical path"].launches
            print(f"| {name} | {d} | {s} | {s / d:.2f} | {critical} | {critical / d:.2f} | "
                  f"{r['search step, m drawn at its start, critical path'].launches} | "
                  f"{r['fixed-mask step'].launches} | {r['narrow step'].launches} | "
                  f"{r['torchrun search step'].launches} ({r['torchrun search step, critical path'].launches}) |")
        return
    print(f"launches (host ops) per training step on meta, keep {args.keep}, align {args.align}; "
          "static = update + forward + backward")
    header = ["model", "dense", "use_mask", "static", "update", "static fwd", "static bwd", "static all ops"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in args.models:
        r = counts_for(name, args.keep, args.align, args.batch)
        static = [r["update"], r["static forward"], r["static backward"]]
        launches = sum(o.launches for o in static)
        host = sum(o.host for o in static)
        cells = [name, f"{r['dense'].launches} ({r['dense'].host})", f"{r['use_mask'].launches} ({r['use_mask'].host})",
                 f"{launches} ({host})", *(str(o.launches) for o in static), str(sum(o.all for o in static))]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
