"""Side-by-side timing of a dense step, the official-style masked VR-PGE step and maskprop's compact VR-PGE step.

All configurations of one model run interleaved in one process (the machine drifts 15-30% between runs), after
warm-up. Times are medians; a speedup is the median over the repetitions of the ratio measured within one repetition
(against the median of that repetition's dense steps), with its interquartile range, so that drift between
repetitions cancels. The ideal speedup comes from the analytic FLOPs: 3 f_D / (3 f(m) + f(m')).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cost import CostModel, InputSizeError, dense_step_flops, vrpge_step_flops
from .models import converted_source, create_model
from .sparse import Mask, channel_groups, check_align, random_mask, use_mask
from .vrpge import ChannelScores

logger = logging.getLogger(__name__)

K = TypeVar("K")


@dataclass
class StepTiming:
    """Step times (seconds, medians) of one model at one keep ratio, and the speedups measured between them.

    ``speedup_vs_dense`` and ``speedup_vs_masked`` are medians of per-repetition ratios; ``speedup_iqr`` is the
    interquartile range of the per-repetition speedups over dense (equal to the median with one repetition).
    ``*_saved_mb`` is what one forward with autograd of that step keeps for its backward (the masked step holds one
    sample's at a time; the compact step's second forward keeps nothing); ``*_peak_mb`` is CUDA's allocator peak.
    """

    model: str
    batch_size: int
    keep_ratio: float
    dense_s: float
    masked_s: float
    compact_s: float
    ideal: float
    speedup_vs_dense: float
    speedup_iqr: tuple[float, float]
    speedup_vs_masked: float
    dense_peak_mb: float | None = None
    masked_peak_mb: float | None = None
    compact_peak_mb: float | None = None
    dense_saved_mb: float | None = None
    masked_saved_mb: float | None = None
    compact_saved_mb: float | None = None
    align: int = 1

    @property
    def efficiency(self) -> float:
        return self.speedup_vs_dense / self.ideal

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(speedup_iqr=list(self.speedup_iqr), efficiency=self.efficiency)
        return d


def describe_machine(device: str = "cpu") -> str:
    """What a benchmark ran on, for its header line: the GPU's name, or the CPU model and torch's thread count."""
    import platform

    if device.startswith("cuda"):
        return (f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
                f"cuDNN {torch.backends.cudnn.version()}")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"{cpu}, {threads} thread{'s' if threads != 1 else ''}, torch {torch.__version__}"


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """First quartile, median and third quartile (the inclusive method: a single value is all three)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def saved_for_backward_mb(forward: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> float:
    """MiB of the distinct tensors autograd saves for the backward while ``forward`` runs.

    This is the memory a training step holds from the end of its forward to its backward, above the model: every
    saved tensor's storage counted once (views and in-place results share one), the storages of ``exclude`` (the
    model's parameters, which exist anyway) not at all. It is measurable on any device, CPU included, where the
    allocator keeps no peak statistics. Saved tensors stay alive while the graph does, so no address is reused
    during the count; the graph is dropped before returning.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    sizes: dict[tuple[torch.device, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            sizes[(t.device, storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(sizes.values()) / 2**20


def resolve_device(device: str) -> torch.device:
    """``device`` as a ``torch.device`` that this machine has, else a one-line ``ValueError``."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a device; expected 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: the benchmark runs on 'cpu' or 'cuda'")
    return dev


def default_align(device: torch.device) -> int:
    """Kept widths padded to multiples of 8 on CUDA (tensor cores, cuDNN's plan cache), not at all on the CPU (where
    a width costs more the more channels it has: BENCHMARKS.md, ``tools/conv_blocking.py``)."""
    return 8 if device.type == "cuda" else 1


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes: between two CUDA events on CUDA (one sync, after the step), on the host clock
    elsewhere."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    torch.cuda.synchronize(device)  # nothing earlier in the timed window
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def interleaved_times(steps: Mapping[K, Callable[[], object]], repeats: int, warmup: int = 0,
                      device: torch.device = torch.device("cpu"), peak_mb: dict[K, float | None] | None = None,
                      after_repetition: Callable[[int], None] | None = None) -> dict[K, list[float]]:
    """Seconds of every step in each of ``repeats`` repetitions, after ``warmup`` untimed ones.

    Every repetition runs each step once, in the order given, so that drift of the machine hits all of them alike.

    Args:
        steps: Closures that run one step each, by name.
        repeats: Timed repetitions.
        warmup: Untimed repetitions first.
        device: Where the steps run (CUDA steps are timed with events).
        peak_mb: Filled on CUDA with each step's allocator peak (MiB) in its last repetition.
        after_repetition: Called with the number of repetitions done (warm-up included) after each.
    """
    times: dict[K, list[float]] = {key: [] for key in steps}
    for rep in range(warmup + repeats):
        for key, fn in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            elapsed = _timed(fn, device)
            if rep >= warmup:
                times[key].append(elapsed)
                if device.type == "cuda" and peak_mb is not None:
                    peak_mb[key] = torch.cuda.max_memory_allocated(device) / 2**20
        if after_repetition is not None:
            after_repetition(rep + 1)
    return times


def random_batch(batch_size: int, image_size: int, num_classes: int = 10, device: torch.device | str = "cpu",
                 channels_last: bool = True) -> tuple[Tensor, Tensor]:
    """Standard normal images (channels_last, as training runs them, unless told otherwise) and uniform labels, from
    torch's global generator."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=memory_format)
    return x, torch.randint(0, num_classes, (batch_size,), device=device)


def mask_pair(groups: dict[str, int], keep_ratio: float, generator: torch.Generator,
              masks: str = "exact") -> dict[str, Mask]:
    """The two masks of one VR-PGE step, ``{"m": ..., "m2": ...}`` (see :func:`bench_model` for ``masks``)."""
    if masks == "exact":
        return {"m": random_mask(groups, keep_ratio, generator), "m2": random_mask(groups, keep_ratio, generator)}
    scores = ChannelScores(groups, keep_ratio=keep_ratio, init=keep_ratio)
    return {"m": scores.sample(generator), "m2": scores.sample(generator)}


def _loss(model: nn.Module, x: Tensor, y: Tensor, mask: Mask | None, mode: str, amp: torch.dtype | None,
          align: int = 1) -> Tensor:
    """The loss of one forward of ``model`` as the subnetwork ``mask`` (``None``: dense)."""
    # No autocast context without amp: its disabled form is not accepted on every device (meta, for counting ops).
    autocast = torch.autocast(x.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with use_mask(model, mask, mode, align if mode == "compact" else 1), autocast:
        return F.cross_entropy(model(x), y)


def training_steps(model: nn.Module, x: Tensor, y: Tensor, masks: Mapping[str, Mask | None],
                   amp: torch.dtype | None = None, align: int = 1) -> dict[str, Callable[[], None]]:
    """The three training steps being compared, each a closure that runs one step on ``(x, y)``.

    ``dense``: forward and backward of the full model. ``masked``: the official code's VR-PGE step, forward and
    backward with ``masks["m"]`` and with ``masks["m2"]`` through dense kernels. ``compact``: maskprop's VR-PGE
    step, a compact forward and backward with ``m`` and a compact forward without autograd with ``m2`` (with masks of
    ``None``, the same step of the dense model: a physically narrow model's VR-PGE step). No optimizer step.

    Args:
        model: A maskprop model in training mode.
        x: The inputs.
        y: The labels.
        masks: ``{"m": ..., "m2": ...}`` (:func:`mask_pair`).
        amp: Autocast to this dtype (``None``: none).
        align: The compact step pads kept widths to multiples of this.
    """

    def loss_of(mask: Mask | None, mode: str) -> Tensor:
        return _loss(model, x, y, mask, mode, amp, align)

    def dense() -> None:
        model.zero_grad(set_to_none=True)
        loss_of(None, "compact").backward()

    def masked() -> None:  # the official code: both samples forward and backward through dense kernels
        model.zero_grad(set_to_none=True)
        loss_of(masks["m"], "masked").backward()
        loss_of(masks["m2"], "masked").backward()

    def compact() -> None:  # maskprop: forward+backward with m, forward without autograd with m'
        model.zero_grad(set_to_none=True)
        loss_of(masks["m"], "compact").backward()
        with torch.no_grad():
            loss_of(masks["m2"], "compact")

    return {"dense": dense, "masked": masked, "compact": compact}


def check_settings(model_name: str, batch_size: int, keep_ratios: Sequence[float], repeats: int, warmup: int,
                   image_size: int, masks: str, align: int | None) -> None:
    """Raise a one-line ``ValueError`` for a setting :func:`bench_model` cannot run (checked before anything runs)."""
    from .models import is_model, list_models

    if not is_model(model_name):
        raise ValueError(f"unknown model {model_name!r}; expected one of {', '.join(list_models())}, or timm:NAME or "
                         f"torchvision:NAME (a network of your own: --module names the module that registers it)")
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    if warmup < 0:
        raise ValueError(f"warmup={warmup} must be >= 0")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1 (a step needs examples)")
    if image_size < 1:
        raise ValueError(f"image_size={image_size} must be >= 1")
    if not keep_ratios or any(not 0.0 < rho <= 1.0 for rho in keep_ratios):
        raise ValueError(f"keep_ratios={list(keep_ratios)}; expected one or more fractions in (0, 1]")
    if masks not in ("exact", "sampled"):
        raise ValueError(f"masks={masks!r}; expected 'exact' or 'sampled'")
    if align is not None:
        check_align(align)


def bench_model(
    model_name: str,
    batch_size: int = 128,
    keep_ratios: Sequence[float] = (1.0, 0.75, 0.5, 0.25),
    repeats: int = 5,
    warmup: int = 2,
    image_size: int = 32,
    num_classes: int = 10,
    channels_last: bool = True,
    amp: str = "none",
    device: str = "cpu",
    seed: int = 0,
    masks: str = "exact",
    progress: Callable[[str], None] | None = None,
    align: int | None = None,
) -> list[StepTiming]:
    """Times of the dense, masked (official-style) and compact VR-PGE steps for each keep ratio, and their ratios.

    Every repetition runs every (keep ratio, step) configuration once, in turn, so drift hits all of them alike; the
    dense step (the same for every keep ratio) is timed once per keep ratio and a repetition's dense time is the
    median of those.

    ``masks``: ``"exact"`` keeps ``round(keep x channels)`` random channels of every group (widths are multiples of
    8 or 16 where the model's are); ``"sampled"`` draws every channel with probability ``keep`` as a VR-PGE search
    step does at the start of training (:class:`maskprop.vrpge.ChannelScores` at ``init = keep``), so widths vary.

    ``align``: the compact step pads kept widths to multiples of this (exact; ``None``: 8 on CUDA, 1 on the CPU).

    Raises:
        ValueError: a bad argument (one line, before anything runs).
    """
    check_settings(model_name, batch_size, keep_ratios, repeats, warmup, image_size, masks, align)
    dev = resolve_device(device)
    align = default_align(dev) if align is None else check_align(align)
    torch.manual_seed(seed)
    model = create_model(model_name, num_classes=num_classes).to(dev).train()
    x, y = random_batch(batch_size, image_size, num_classes, dev, channels_last)
    amp_dtype = {"none": None, "bf16": torch.bfloat16}[amp]
    groups = channel_groups(model)
    try:
        cost = CostModel(model, (3, image_size, image_size))
    except InputSizeError as err:  # a vision transformer built for 224 x 224, timed at the default 32
        hint = (" (timm's and torchvision's vision transformers are built for one size, 224 unless a module of your "
                "own builds them for another: --module examples.converted_nets --models timm_vit_tiny takes 32)"
                if converted_source(model_name) else "")
        raise ValueError(f"model {model_name!r} does not take {image_size} x {image_size} images ({err.reason}); "
                         f"expected the image size it is built for (--image-size){hint}") from None
    generator = torch.Generator().manual_seed(seed)

    configs = {}
    ideal = {}
    params = list(model.parameters())
    dense_saved = saved_for_backward_mb(partial(_loss, model, x, y, None, "compact", amp_dtype), params)
    saved = {}
    for rho in keep_ratios:
        pair = mask_pair(groups, rho, generator, masks)
        ideal[rho] = dense_step_flops(cost.flops()) / vrpge_step_flops(cost.flops(pair["m"]), cost.flops(pair["m2"]))
        for name, fn in training_steps(model, x, y, pair, amp_dtype, align).items():
            configs[(rho, name)] = fn
        saved[(rho, "dense")] = dense_saved  # the same dense step for every keep ratio
        for mode in ("masked", "compact"):
            saved[(rho, mode)] = saved_for_backward_mb(partial(_loss, model, x, y, pair["m"], mode, amp_dtype, align),
                                                       params)

    peak: dict[tuple, float | None] = {k: None for k in configs}
    times = interleaved_times(configs, repeats, warmup, dev, peak, None if progress is None else
                              lambda done: progress(f"{model_name}: repetition {done}/{warmup + repeats}"))
    model.zero_grad(set_to_none=True)

    dense_by_rep = [statistics.median(times[(rho, "dense")][r] for rho in keep_ratios) for r in range(repeats)]
    results = []
    for rho in keep_ratios:
        med = {name: statistics.median(times[(rho, name)]) for name in ("masked", "compact")}
        compact = times[(rho, "compact")]
        q1, speedup, q3 = quartiles([d / c for d, c in zip(dense_by_rep, compact)])
        vs_masked = statistics.median(m / c for m, c in zip(times[(rho, "masked")], compact))
        results.append(StepTiming(
            model_name, batch_size, rho, statistics.median(dense_by_rep), med["masked"], med["compact"], ideal[rho],
            speedup, (q1, q3), vs_masked, peak[(rho, "dense")], peak[(rho, "masked")], peak[(rho, "compact")],
            saved[(rho, "dense")], saved[(rho, "masked")], saved[(rho, "compact")], align,
        ))
    return results


def format_table(results: Sequence[StepTiming]) -> str:
    """A markdown table of the timings."""
    has_memory = any(r.compact_peak_mb is not None for r in results)
    has_saved = any(r.compact_saved_mb is not None for r in results)
    head = ("| model | batch | keep | dense step (ms) | masked VR-PGE step (ms) | compact VR-PGE step (ms) "
            "| speedup vs dense (IQR) | ideal | efficiency | speedup vs masked |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if has_saved:
        head += " saved for backward MB dense / masked / compact |"
        rule += "---|"
    if has_memory:
        head += " peak MB dense / masked / compact |"
        rule += "---|"
    lines = [head, rule]
    for r in results:
        low, high = r.speedup_iqr
        line = (f"| {r.model} | {r.batch_size} | {r.keep_ratio:.2f} | {1e3 * r.dense_s:.0f} | {1e3 * r.masked_s:.0f} "
                f"| {1e3 * r.compact_s:.0f} | {r.speedup_vs_dense:.2f}x ({low:.2f}-{high:.2f}) | {r.ideal:.2f}x "
                f"| {r.efficiency:.0%} | {r.speedup_vs_masked:.2f}x |")
        if has_saved:
            line += f" {r.dense_saved_mb:.0f} / {r.masked_saved_mb:.0f} / {r.compact_saved_mb:.0f} |"
        if has_memory:
            line += f" {r.dense_peak_mb:.0f} / {r.masked_peak_mb:.0f} / {r.compact_peak_mb:.0f} |"
        lines.append(line)
    return "\n".join(lines)
