"""Check that a channel-sparse model of your own is wired so that its subnetworks compute what their masks say.

maskprop runs a model as a subnetwork through the channel groups its layers name (``in_group``, ``out_group``,
``group``): every tensor that meets another in an add must carry one group's channels, a layer must read the group that
the layer before it writes, and everything between the grouped layers must act on each channel alone (activations,
pooling, dropout). Python cannot see those rules in a ``forward``; running the model can. :func:`check_model` runs a
float64 copy on the CPU the ways a run does and compares them, the reference being the masked execution (dense
kernels, the mask applied after BatchNorm), which takes no index of a group:

* ``dense``: a training step of the model without a mask runs (a mask that keeps every channel runs the model as it
  is);
* ``compact``: a training step on the gathered channels (the CPU's sparse step) equals the masked one: the loss, every
  parameter's gradient and every buffer (BatchNorm statistics);
* ``static``: the same with the static-shape step of a GPU run (capacities fixed for a window; one group padded with
  zero channels, another cut to its capacity), and again with its BatchNorm statistics deferred and committed after
  the pass, as a search step's second mask runs on CUDA;
* ``narrow``: :func:`maskprop.materialize`'s plain narrow model (what ``maskprop export`` writes) computes the
  subnetwork's outputs in eval mode;
* ``flops``: :class:`maskprop.CostModel` (what the train-cost saving counts) agrees with ``torch.utils.flop_counter``
  on the narrow model, so no FLOPs outside the conv and linear layers go uncounted.

It raises one ``ValueError`` naming the first check that fails and what differed, with a hint at the usual cause. The
builtin models pass it (tests/test_own_model.py); ``maskprop train`` runs it at the start of a run on every model
registered outside maskprop (``model.check: false`` skips it).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .cost import CostModel, counted_flops
from .models.spec import check_input_size
from .sparse import (
    SparseBatchNorm2d,
    SparseConv2d,
    SparseLinear,
    aligned_width,
    channel_groups,
    check_align,
    concatenations,
    random_mask,
    use_mask,
)
from .sparse.execution import _names
from .sparse.modules import WiringError
from .sparse.static import StaticExecutionState, use_static
from .surgery import materialize

__all__ = ["ModelCheck", "check_model"]

CHECKS = ("dense", "compact", "static", "narrow", "flops")

_WIRING = ("check the wiring: every conv, BatchNorm and linear layer on channels that may be pruned must be one of "
           "maskprop.sparse's, naming the group it reads (in_group) and the one it writes, and a conv that no grouped "
           "BatchNorm follows needs mask_output=True; tensors added together must carry one group's channels; and "
           "what runs between those layers must act on each channel alone (no mean over channels, no slice of "
           "channels; a feature map flattened into a linear layer: SparseLinear(in_positions=H*W); a layer reading "
           "torch.cat of groups reads a concatenated group, its parts declared in the cat's order: "
           "maskprop.sparse.concatenate_groups)")


_ORDER = ("check each concatenated group's parts ({}): in the order of the forward's torch.cat, each as wide as its "
          "group; then ")


@dataclass(frozen=True)
class ModelCheck:
    """What :func:`check_model` ran: the model's groups and the checks that passed."""

    groups: int
    channels: int
    checks: tuple[str, ...]
    seconds: float

    def __str__(self) -> str:
        return (f"{self.groups} channel groups ({self.channels} channels): {', '.join(self.checks)} agree in float64 "
                f"({self.seconds:.1f} s)")


def _step(model: nn.Module, run: Callable[[], object], x: Tensor, y: Tensor
          ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """A training forward and backward of ``model`` inside the context ``run()`` makes: loss, gradients, buffers."""
    model.zero_grad(set_to_none=True)
    with run():
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {k: torch.zeros_like(p) if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}
    return loss.detach(), grads, {k: b.clone() for k, b in model.named_buffers()}


def _far(a: Tensor, b: Tensor, rtol: float = 1e-8, atol: float = 1e-10) -> float | None:
    """The largest difference of ``a`` from ``b`` relative to ``b``'s largest entry, where it exceeds ``rtol`` (and
    ``atol``); None where it does not. Relative to the tensor, not to each entry: BatchNorm over a few values per
    channel (a 1x1 map, a batch of 3) amplifies float64's round-off in small entries, while a wiring error moves a
    tensor by a good part of its size."""
    if a.shape != b.shape:
        return float("inf")
    if a.dtype == torch.bool or not a.is_floating_point():
        return None if torch.equal(a, b) else float("inf")
    if a.numel() == 0:
        return None
    odd_a, odd_b = ~torch.isfinite(a), ~torch.isfinite(b)
    if bool(odd_a.any()) or bool(odd_b.any()):  # NaN and infinities: where they are, they must be the same
        same = (torch.equal(odd_a, odd_b) and torch.equal(torch.isnan(a), torch.isnan(b))
                and torch.equal(torch.isposinf(a), torch.isposinf(b)))
        return _far(a.masked_fill(odd_a, 0), b.masked_fill(odd_b, 0), rtol, atol) if same else float("nan")
    scale = float(b.abs().max())
    gap = float((a - b).abs().max())
    return gap / max(scale, 1e-300) if gap > atol + rtol * scale else None


def _compare(check: str, what: str, got: tuple, expected: tuple, hint: str) -> None:
    """One line naming the first quantity of a step that differs from the reference's."""
    loss, grads, buffers = got
    loss_r, grads_r, buffers_r = expected
    pairs = [("the loss", loss, loss_r)]
    pairs += [(f"the gradient of {k}", grads[k], grads_r[k]) for k in grads_r]
    pairs += [(f"the buffer {k}", buffers[k], buffers_r[k]) for k in buffers_r]
    for name, a, b in pairs:
        gap = _far(a, b)
        if gap is not None:
            raise ValueError(f"check {check!r} failed: {what} differs from the masked reference in {name} "
                             f"(relative difference {gap:.3g}); {hint}")


def _guard(check: str, what: str, hint: str, run: Callable[[], object]) -> object:
    running: list[nn.Module] = []  # the modules whose forward has started and not ended: at an error, where it was

    def started(module: nn.Module, _inputs: object) -> None:
        running.append(module)

    def ended(*_: object) -> None:  # returns None: the output stays the module's
        running.pop()

    hooks = (nn.modules.module.register_module_forward_pre_hook(started),
             nn.modules.module.register_module_forward_hook(ended))
    try:
        return run()
    except Exception as err:  # the user's model failing inside a pass: one line, with the error it raised
        message = " ".join(str(err).split())[:300]
        advice = "" if isinstance(err, WiringError) else f"; {hint}"  # it names the layer and what to change
        raise ValueError(f"check {check!r} failed: {what} raised {type(err).__name__}{_where(running, err)}: "
                         f"{message}{advice}") from None
    finally:
        for hook in hooks:
            hook.remove()


def _where(running: list[nn.Module], err: Exception) -> str:
    """`` in 'layer' (Conv2d)`` for the innermost module running when ``err`` was raised (none: ``""``), and where
    it is a plain torch layer that a subnetwork would need to be maskprop's, that too."""
    if not running or len(running) < 2 or isinstance(err, WiringError):
        return ""
    names = {module: name for name, module in running[0].named_modules()}
    layer = running[-1]
    plain = isinstance(layer, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)) and not isinstance(
        layer, (SparseConv2d, SparseLinear, SparseBatchNorm2d))
    kind = f"{type(layer).__name__}, a plain torch layer: on channels that may be pruned it must be maskprop.sparse's" \
        if plain else type(layer).__name__
    return f" in {names.get(layer, '?')!r} ({kind})"


def nontrivial_batch_norms(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """``model`` with BatchNorm affine parameters and running statistics drawn away from 1 and 0 (from ``generator``,
    or torch's global one), so that a leak through a dropped or a padded channel, or a wrong channel, shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for name, low, high in (("weight", 0.5, 1.5), ("bias", -0.5, 0.5), ("running_mean", -0.5, 0.5),
                                        ("running_var", 0.5, 1.5)):
                    t = getattr(m, name)
                    if t is not None:
                        t.uniform_(low, high, generator=generator)
    return model


def nontrivial_parameters(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """``model`` with every floating-point parameter whose entries are all equal drawn apart (from ``generator``, or
    torch's global one), BatchNorm's aside (:func:`nontrivial_batch_norms`): zeros (a zero-initialised bias, the query
    and value biases of BEiT's attention, the last norm of a residual branch that starts as the identity) uniform in
    [-0.5, 0.5], and a constant ``c`` (a norm's weights at 1, a layer scale, a logit scale) ``c`` times uniform in
    [0.5, 1.5], which keeps its sign. A zero branch computes nothing a check could compare, and equal weights hide a
    wrong channel order."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                continue
            for t in m.parameters(recurse=False):
                if not t.is_floating_point() or t.numel() == 0 or not bool((t == t.flatten()[0]).all()):
                    continue
                if bool(t.flatten()[0] == 0):
                    t.uniform_(-0.5, 0.5, generator=generator)
                else:
                    t.mul_(torch.empty_like(t).uniform_(0.5, 1.5, generator=generator))
    return model


def edge_mask(groups: Mapping[str, int], generator: torch.Generator) -> dict[str, Tensor]:
    """Half of each group at random, the first group down to one channel and the second whole."""
    mask = random_mask(groups, 0.5, generator)
    names = list(groups)
    one = torch.zeros(groups[names[0]], dtype=torch.bool)
    one[int(torch.randint(groups[names[0]], (1,), generator=generator))] = True
    mask[names[0]] = one
    if len(names) > 1:
        mask[names[1]] = torch.ones(groups[names[1]], dtype=torch.bool)
    return mask


def check_model(model: nn.Module, input_size: Sequence[int], *, batch_size: int | None = None, align: int = 8,
                seed: int = 0) -> ModelCheck:
    """Check that every way maskprop runs ``model`` as a subnetwork computes the subnetwork its mask names.

    The model is not changed: a float64 copy runs on the CPU, with random BatchNorm parameters and statistics and
    every other parameter whose entries are all equal drawn apart (a zero-initialised branch checks nothing), with
    dropout off (modules and functions) and the random stream seeded alike before each pass (stochastic depth draws
    the same in each), on a mask that keeps one channel of the first group, every channel of the second and a random
    half of the rest, and on another that keeps a random half of every group (the checks are listed in the module's
    docstring).

    Args:
        model: A channel-sparse model (its layers :mod:`maskprop.sparse`'s, naming their groups), in any mode, on any
            device.
        input_size: ``(C, H, W)`` of one example.
        batch_size: Examples per pass (at least 2: BatchNorm needs two values per channel in training). ``None``:
            3, or more where a BatchNorm layer sees fewer than 16 values per channel (up to 16 examples, when the
            last feature maps are 1 x 1, as an ImageNet network's are at 32 x 32): a batch norm over a handful of
            values amplifies float64 rounding past the comparisons' tolerance.
        align: The alignment of the static step's widths (``sparsity.align``; 8 on CUDA).
        seed: Seed of the input, the labels, the masks, the statistics and the passes' random draws.

    Returns:
        A :class:`ModelCheck` (its ``str`` is one line for a log).

    Raises:
        ValueError: The model has no channel groups, a group's layers disagree on its size, or a check fails (one
            line naming the check, what differed and by how much, and the usual cause).
    """
    started = time.perf_counter()
    input_size = check_input_size(input_size)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2):
        raise ValueError(f"batch_size must be an integer >= 2 (BatchNorm trains on two values per channel or more), "
                         f"got {batch_size!r}")
    groups = channel_groups(model)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no channel groups: its convolutions, BatchNorm and linear layers "
                         f"must be maskprop.sparse's SparseConv2d, SparseBatchNorm2d and SparseLinear naming their "
                         f"groups (or maskprop.models.layers.ConvBNAct)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    align = check_align(align)
    _check_normalised_groups(model)
    with torch.random.fork_rng(devices=[]), _NoDropout():  # the caller's random stream untouched
        return _check(model, input_size, groups, batch_size, align, seed, started)


def _check_normalised_groups(model: nn.Module) -> None:
    """A BatchNorm layer's group is one that a conv or linear layer writes (a mistyped one would be a group of its
    own, which no mask of it could mean)."""
    written = {m.out_group for m in model.modules() if isinstance(m, (SparseConv2d, SparseLinear))}
    written |= set(concatenations(model))
    for where, module in model.named_modules():
        group = getattr(module, "group", None) if isinstance(module, SparseBatchNorm2d) else None
        if group is not None and group not in written:
            raise ValueError(f"layer {where!r} normalises group {group!r}, which no conv or linear layer writes; "
                             f"expected the group of the layer before it")


class _NoDropout(TorchFunctionMode):
    """Dropout as the identity (modules and functions alike): each pass would draw its own masks, for tensors of its
    own widths, and differ by its draws alone."""

    DROPOUTS = frozenset({F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                          torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout,
                          torch.dropout_, torch.alpha_dropout_, torch.feature_dropout_, torch.feature_alpha_dropout_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.DROPOUTS:
            return args[0] if args else kwargs["input"]
        return func(*args, **kwargs)


def _static_capacities(groups: Mapping[str, int], mask: Mapping[str, Tensor], align: int) -> dict[str, int]:
    """Capacities at which ``mask`` meets every case of a static step that the groups allow: below the kept count (the
    surplus cut: in the first group that can be cut, and every third group after), above it (padded with zero
    channels), and the kept count rounded up to ``align``. A capacity is never below ``min(align, channels)``."""
    names = list(groups)
    kept = {g: int(mask[g].sum()) for g in names}
    low = {g: min(align, groups[g]) for g in names}

    def capacity(g: str, case: str) -> int:
        if case == "cut" and kept[g] > low[g]:
            return max(low[g], kept[g] - align)
        if case in ("cut", "pad") and kept[g] < groups[g]:
            return min(groups[g], max(low[g], kept[g] + 1))
        return aligned_width(kept[g], groups[g], align)

    capacities = {g: capacity(g, ("cut", "pad", "fit")[i % 3]) for i, g in enumerate(names)}
    first = next((g for g in names if kept[g] > low[g]), None)
    if first is not None:
        capacities[first] = capacity(first, "cut")
    return capacities


_BATCH_NORM_VALUES = 16  # values per channel that the default batch gives every BatchNorm layer, at least


def _batch_size(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """3, or the examples that give every BatchNorm layer :data:`_BATCH_NORM_VALUES` values per channel (a forward of
    one example in eval mode measures the positions each one normalises over)."""
    positions: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda _, args: positions.append(args[0][0].numel() // args[0].shape[1]))
             for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = model.training
    try:
        with torch.no_grad():
            _guard("dense", "the model without a mask", "is it a model of these inputs?",
                   lambda: model.eval()(torch.zeros(1, *input_size, dtype=torch.float64)))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    fewest = min(positions, default=_BATCH_NORM_VALUES)
    return max(3, min(_BATCH_NORM_VALUES, -(-_BATCH_NORM_VALUES // max(fewest, 1))))


def _check(model: nn.Module, input_size: tuple[int, ...], groups: dict[str, int], batch_size: int | None, align: int,
           seed: int, started: float) -> ModelCheck:
    generator = torch.Generator().manual_seed(seed)
    declared = list(concatenations(model))
    wiring = (_ORDER.format(_names(declared, limit=3)) + _WIRING) if declared else _WIRING  # the likelier one first
    base = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).train()
    nontrivial_batch_norms(base, generator)
    nontrivial_parameters(base, generator)
    if batch_size is None:
        batch_size = _batch_size(base, input_size)
    x = torch.randn(batch_size, *input_size, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        out = _guard("dense", "the model without a mask", "is it a model of these inputs?", lambda: base(x))
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[1] < 1:
        raise ValueError(f"{type(model).__name__} returns {type(out).__name__}"
                         f"{tuple(out.shape) if isinstance(out, Tensor) else ''}; expected logits of shape "
                         f"(batch, classes) (a model with auxiliary heads is built without them: torchvision's "
                         f"GoogLeNet and Inception-v3 with aux_logits=False)")
    y = torch.arange(batch_size) % out.shape[1]
    mask = edge_mask(groups, generator)

    def step(check: str, what: str, hint: str, context: Callable[[nn.Module], object],
             model_: nn.Module | None = None) -> tuple:
        model_ = copy.deepcopy(base) if model_ is None else model_
        torch.manual_seed(seed)  # what else draws at random (stochastic depth) draws the same in every pass
        return _guard(check, what, hint, lambda: _step(model_, lambda: context(model_), x, y))

    # A mask that keeps every channel runs the model as it is: the dense check is a training step that runs.
    step("dense", "a training step of the model without a mask", "is it a model of these inputs?",
         lambda m: contextlib.nullcontext())

    half = random_mask(groups, 0.5, generator)  # the edge mask keeps the second group whole: this one does not
    for name, kept in (("one channel, every channel, half", mask), ("half of every group", half)):
        what = f"the compact training step (kept channels gathered; {name})"
        masked = step("compact", "the masked pass", wiring, lambda m, kept=kept: use_mask(m, kept, "masked"))
        got = step("compact", what, wiring, lambda m, kept=kept: use_mask(m, kept, "compact"))
        _compare("compact", what, got, masked, wiring)

    # The static step of a GPU run, at capacities that cut one group's surplus and pad another with zero channels.
    static_model = copy.deepcopy(base)
    capacities = _static_capacities(groups, half, align)
    what = f"the static-shape step (capacities fixed for a window, align {align}: how a run on CUDA computes)"
    runs_static = "a run on CUDA runs its steps this way"
    state = _guard("static", what, runs_static, lambda: StaticExecutionState.create(static_model, capacities, align))
    _guard("static", what, runs_static, lambda: state.update(half))
    used = {g: m.clone() for g, m in state.mask_used_by_group().items()}
    reference = step("static", "the masked pass", wiring, lambda m: use_mask(m, used, "masked"))
    got = step("static", what, wiring, lambda m: use_static(state), static_model)
    _compare("static", what, got, reference, wiring)
    state.release()
    if state.layout.can_defer_statistics:  # m' of a search step on CUDA: its statistics kept, then added as if in turn
        deferred_model = copy.deepcopy(base)
        what = "the static step with its BatchNorm statistics deferred (a search step's second mask on CUDA)"
        deferring = _guard("static", what, runs_static,
                           lambda: StaticExecutionState.create(deferred_model, capacities, align))
        deferring.defers_statistics = True
        _guard("static", what, runs_static, lambda: deferring.update(half))
        loss, grads, _ = step("static", what, wiring, lambda m: use_static(deferring), deferred_model)
        _guard("static", what, wiring, deferring.commit_statistics)
        buffers = {k: b.clone() for k, b in deferred_model.named_buffers()}
        _compare("static", what, (loss, grads, buffers), reference, wiring)
        deferring.release()

    # The narrow model, in eval mode (running statistics), against the compact subnetwork.
    hint = ("materialize() replaces maskprop's layers with plain torch ones of the kept widths and copies everything "
            "else; a forward that reads a layer's full width (e.g. its out_channels) breaks it")
    evaluated = copy.deepcopy(base).eval()

    def compact_eval() -> Tensor:
        with use_mask(evaluated, mask, "compact"):
            return evaluated(x)

    with torch.no_grad():
        expected = _guard("narrow", "the compact subnetwork in eval mode", wiring, compact_eval)
        narrow = _guard("narrow", "materialize()", hint, lambda: materialize(evaluated, mask))
        got = _guard("narrow", "the narrow model", hint, lambda: narrow(x))
    gap = _far(got, expected)
    if gap is not None:
        raise ValueError(f"check 'narrow' failed: the narrow model's outputs differ from the subnetwork's "
                         f"(relative difference {gap:.3g}); {hint}")

    # FLOPs: the cost model against torch's counter on the narrow model (one example).
    counted = _guard("flops", "maskprop.CostModel", wiring,
                     lambda: CostModel(evaluated, input_size).flops(mask, batch_size=1))

    flops = _guard("flops", "the narrow model on one example", hint, lambda: counted_flops(narrow, x[:1]))
    if counted != flops:
        raise ValueError(f"check 'flops' failed: maskprop.CostModel counts {counted} FLOPs of the subnetwork per "
                         f"example, torch.utils.flop_counter {flops}: the model computes FLOPs outside its conv and "
                         f"linear layers that change with the mask (a matmul on pruned channels?), which the "
                         f"train-cost saving would count at their dense value")
    return ModelCheck(len(groups), sum(groups.values()), CHECKS, time.perf_counter() - started)
