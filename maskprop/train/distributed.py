"""Training on several processes with ``torch.distributed``: ``torchrun --nproc_per_node=N -m maskprop train ...``.

What a DDP run keeps identical on every rank, and how:

* **Data.** ``data.batch_size`` is the global batch; every rank takes its slice of the same global batch, drawn
  from the run's loader generator, which every rank seeds alike (``maskprop.train.loaders``): the sequence of global
  batches does not depend on the world size.
* **Masks.** Every rank samples ``m`` and ``m'`` from the same mask generator and the same scores. Each eager step
  passes its statistics ``[L(m) n, L(m') n, |g| n, correct, n]`` through ``StepContext.reduce_stats`` (a sum over the
  ranks, see :func:`all_reduce_sum`) before reading them (a static step packs ``L(m) n``, ``L(m') n`` and ``n`` with its
  gradients), so the score update sees the losses of the global batch and stays identical everywhere; evaluation and the
  fix's ``best_of_n`` sum their counts over the ranks the same way, so every rank fixes the same subnetwork.
* **Weights.** ``DistributedDataParallel`` averages the gradients. A compact step gives dropped channels zero
  gradients, not missing ones, so DDP runs without ``find_unused_parameters``. ``sparsity.weight_grad: both``
  back-propagates twice per step; DDP all-reduces after each backward, and the average of an average that is already
  the same everywhere plus the second one is the average of the sum (exact, at the cost of a second all-reduce).
  On CUDA the ranks run the static-shape steps of ``maskprop.train.graphs`` instead, on the model itself (no DDP
  wrapper: rank 0's weights are broadcast once, :func:`share_model`): each step packs its gradients and losses into
  one buffer, all-reduced between pieces captured as CUDA graphs (the losses after a search step's forwards, the
  gradients after its backward: ``GradientAverage``; uncaptured with ``sync_bn``), with the same sums over the ranks.
* **BatchNorm.** ``sync_bn: false`` (plain DDP): each rank normalises its own share of the batch; the running
  statistics drift apart during an epoch and are averaged over the ranks at its end (:func:`average_buffers`),
  before evaluation, the fix and every checkpoint. ``sync_bn: true``: statistics of the kept channels over the
  whole global batch (``maskprop.sparse.sync_batchnorm``), identical running statistics at every step; the process
  group they use is set on the run's BatchNorm layers (:func:`wrap_model`, :func:`share_model`), not held by
  any module.
* **Files.** Only rank 0 writes (logs, TensorBoard, checkpoints, the summary) and shows a progress bar; a
  checkpoint holds every rank's random state, so ``--resume`` with the same world size continues bit-identically.

What is refused, with one line (printed by rank 0 once the process group is up; every rank stops): a global batch that
the world size does not divide, ranks started with different configurations (:func:`check_same_config`), resuming with
another world size, ``nccl`` without CUDA, and the sparse-backward methods (their per-layer top-k selections, MSBP
memories and balanced budgets follow each rank's share of the batch: they would differ between ranks). A rank that fails
during set-up tells the others (:func:`agree`), so that all stop; a rank that fails later exits, and torchrun then stops
the others.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..sparse import channel_groups, sync_batchnorm
from .config import changed_keys, dotted

__all__ = ["Distributed", "PeerError", "agree", "all_reduce_sum", "average_buffers", "check_same_config",
           "check_world_size", "current", "device_for", "init_from_env", "prints_errors", "rank_local", "wrap_model"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "nccl", "gloo")

# DDP warns once a process when a gradient's strides differ from its bucket's, comparing them exactly, also where a
# dimension has size 1 and its stride means nothing. A dense step gives the weight of a 1x1 or depthwise conv on
# channels_last activations such a gradient (strides (I, 1, I, I) against the parameter's (I, 1, 1, 1)): the same
# memory layout, copied into the bucket as fast, a warning PyTorch's maintainers call spurious (its issue "Spurious
# 'Grad strides do not match bucket view strides' warning for 1x1 convolution"). Every gradient a run makes differs
# from its parameter's strides in size-1 dimensions at most (tested), so the warning says nothing about a run.
NOMINAL_STRIDES_WARNING = "Grad strides do not match bucket view strides"


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: its rank, the world size, and its rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, the one that writes."""
        return self.rank == 0


def current() -> Distributed:
    """This process's place in the initialised process group (one process when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Distributed()
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; start the ranks with torchrun, "
                         f"which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT") from None


def init_from_env(backend: str = "auto") -> Distributed:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1), once per process.

    Args:
        backend: ``auto`` (gloo for CPU tensors, plus NCCL for CUDA tensors where CUDA is available), ``nccl`` or
            ``gloo``.

    Returns:
        This process's place; one process without touching ``torch.distributed`` when ``WORLD_SIZE`` is unset or 1.

    Raises:
        ValueError: An unknown backend, ``nccl`` without CUDA, or a malformed torchrun environment.
    """
    if backend not in BACKENDS:
        raise ValueError(f"distributed backend {backend!r} is unknown; expected one of {', '.join(BACKENDS)}")
    if dist.is_available() and dist.is_initialized():
        return current()
    if "WORLD_SIZE" not in os.environ or _env_int("WORLD_SIZE") <= 1:
        if backend != "auto":
            logger.warning("distributed backend %r is not used: this is one process (torchrun starts several)",
                           backend)
        return Distributed()
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {name} is not set; start the ranks with "
                             f"torchrun (e.g. torchrun --nproc_per_node=4 -m maskprop train RECIPE)")
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("distributed backend 'nccl' needs CUDA, which is not available; use --dist-backend gloo "
                         "(or auto) on CPUs")
    if backend == "auto":
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local_rank < gpus:
        torch.cuda.set_device(local_rank)
    elif backend == "nccl":  # a CPU run may have more ranks than the node has GPUs (device_for checks a CUDA run)
        raise _too_few_gpus(local_rank, gpus)
    dist.init_process_group(backend)
    place = current()
    logger.info("rank %d of %d (local rank %d), backend %s", place.rank, place.world_size, local_rank, backend)
    if place.rank != rank:
        raise ValueError(f"process group rank {place.rank} differs from RANK={rank}")
    return place


def leave(finished: bool = True) -> None:
    """Leave the process group this process joined, if any (a torchrun rank at its end).

    A gloo process group still alive when the interpreter exits can end the rank in ``std::terminate`` (SIGABRT,
    "terminate called without an active exception") while its threads are torn down, turning a finished run into a
    failed one. A rank that finished meets the others at a barrier first, so that none leaves while another still
    talks to it; a rank that failed leaves at once, and the others' next collective fails instead of waiting for it.
    """
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def _too_few_gpus(local_rank: int, gpus: int) -> ValueError:
    return ValueError(f"LOCAL_RANK={local_rank} but this node has {gpus} GPU(s); expected --nproc_per_node <= {gpus} "
                      f"(one GPU per rank)")


def device_for(device: torch.device, place: Distributed) -> torch.device:
    """One device per rank: a run on CUDA takes the GPU of the rank's ``LOCAL_RANK``; NCCL alone carries no CPU
    tensors."""
    if place.enabled and device.type != "cuda" and dist.get_backend() == "nccl":
        raise ValueError(f"device={str(device)!r} but the process group runs NCCL alone, which carries no CPU "
                         f"tensors; use --dist-backend auto (or gloo) on CPUs")
    if not place.enabled or device.type != "cuda":
        return device
    if place.local_rank >= torch.cuda.device_count():
        raise _too_few_gpus(place.local_rank, torch.cuda.device_count())
    if device.index is not None and device.index != place.local_rank:
        raise ValueError(f"device={str(device)!r} names one GPU, but under torchrun each rank runs on the GPU of its "
                         f"LOCAL_RANK (this one: cuda:{place.local_rank}); use device=cuda or device=auto")
    return torch.device("cuda", place.local_rank)


class PeerError(ValueError):
    """Another rank failed; its message, prefixed with its rank."""


def agree(error: BaseException | None) -> None:
    """Tell every rank whether set-up failed anywhere; raise on all of them if it did (a collective).

    Every rank calls this once at the same point, with the exception it caught or ``None``. A failing rank re-raises
    its own error; the others raise :class:`PeerError` with the first failing rank's message. Either way the error
    carries ``agreed = True``: rank 0 says it, the others keep quiet (:func:`prints_errors`).
    """
    place = current()
    if not place.enabled:
        if error is not None:
            raise error
        return
    message = None if error is None else (str(error) if isinstance(error, (ValueError, FileNotFoundError))
                                          else f"{type(error).__name__}: {error}")
    messages: list[str | None] = [None] * place.world_size
    dist.all_gather_object(messages, message)
    failed = [(rank, text) for rank, text in enumerate(messages) if text is not None]
    if not failed:
        return
    if error is not None:
        error.agreed = True  # type: ignore[attr-defined]
        raise error
    rank, text = failed[0]
    peer = PeerError(f"rank {rank}: {text}")
    peer.agreed = True  # type: ignore[attr-defined]
    raise peer


def prints_errors(error: BaseException) -> bool:
    """Whether this process prints ``error``: rank 0 always; another rank only an error it did not share with rank 0
    through :func:`agree` (an error of its own: no other rank would say it)."""
    return os.environ.get("RANK", "0") == "0" or not getattr(error, "agreed", False)


def resume_command(run_dir: os.PathLike | str, world_size: int | None = None) -> str:
    """The command that resumes ``run_dir`` in ``world_size`` processes (default: as many as this one runs in, read
    from torchrun's environment): ``maskprop train --resume DIR`` for one, under ``torchrun`` for more."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    world = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if world <= 1:
        return f"maskprop train --resume {run_dir}"
    if world_size is not None and world != int(os.environ.get("WORLD_SIZE", "1")):
        return f"torchrun --nproc_per_node N --nnodes M -m maskprop train --resume {run_dir} (N x M = {world})"
    nodes = f" --nnodes {world // local}" if world > local else ""
    return f"torchrun --nproc_per_node {local}{nodes} -m maskprop train --resume {run_dir}"


def check_same_config(config: Mapping[str, Any]) -> None:
    """Stop every rank with one line if the ranks were started with different configurations (a collective).

    Rank 0's settings are compared with every other rank's (as json), and the keys that differ are named.
    """
    place = current()
    if not place.enabled:
        return
    text = json.dumps(config, sort_keys=True, default=str)
    texts: list[str | None] = [None] * place.world_size
    dist.all_gather_object(texts, text)
    for rank, other in enumerate(texts):
        if other != texts[0]:
            mine, theirs = dotted(json.loads(texts[0])), dotted(json.loads(other))
            diff = [f"{key} ({mine.get(key)!r} vs {theirs.get(key)!r})" for key in changed_keys(mine, theirs)]
            error = ValueError(f"ranks started with different configurations: rank {rank} differs from rank 0 in "
                               f"{'; '.join(diff[:5]) or 'its settings'}; start every rank with the same recipe and "
                               f"overrides")
            error.agreed = True  # type: ignore[attr-defined]
            raise error


def check_world_size(checkpoint: Mapping[str, Any], path: os.PathLike | str, place: Distributed) -> None:
    """Refuse to resume a checkpoint written by another number of processes.

    Raises:
        ValueError: The world sizes differ (every rank's random streams and, without ``sync_bn``, the BatchNorm
            shares depend on it, so the continuation would not be the run that was started).
    """
    saved = int(checkpoint.get("world_size", 1))
    if saved != place.world_size:
        raise ValueError(f"checkpoint '{path}' was written by a run of {saved} process(es), this run has "
                         f"{place.world_size}; resume with the same number ({resume_command(Path(path).parent, saved)}"
                         f"): each rank's random streams and BatchNorm share depend on it")


def rank_local(ctx: Any) -> Any:
    """A copy of the step context ``ctx`` whose steps stay on this rank (no ``reduce_stats``): for work that ranks do
    not do in step, such as the timing's dense reference steps, which each rank schedules by its own clock."""
    return ctx if ctx.reduce_stats is None else dataclasses.replace(ctx, reduce_stats=None)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over all ranks (a new tensor; the same on every rank). The ``reduce_stats`` of DDP runs."""
    total = tensor.clone()
    dist.all_reduce(total)
    return total


class _DistributedDataParallel(DistributedDataParallel):
    """DDP that answers ``channel_groups()`` for its module, so that ``use_mask`` runs the wrapper as the model."""

    def channel_groups(self) -> dict[str, int]:
        return channel_groups(self.module)


@torch.no_grad()
def share_model(model: nn.Module, sync_bn: bool = False) -> None:
    """Give every rank rank 0's parameters and buffers, as wrapping ``model`` in DistributedDataParallel does (a
    collective: one broadcast per dtype), without the wrapper: for the static steps of ``maskprop.train.graphs``,
    which average the gradients themselves (the wrapper's buckets would hold a second copy of every gradient).

    Args:
        model: The run's model.
        sync_bn: Give its BatchNorm layers the default process group (as :func:`wrap_model`).
    """
    if sync_bn:
        sync_batchnorm.enable(model)
    if not current().enabled:
        return
    named = [*model.named_parameters(), *model.named_buffers()]
    # Every rank checks that all built the same tensors (as DDP does) before a broadcast of mismatched sizes could hang.
    signatures = gather_objects([f"{name} {list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for name, t in named])
    for rank, theirs in enumerate(signatures[1:], start=1):
        if theirs != signatures[0]:
            extra = [signatures[0][len(theirs):] or ["nothing"], theirs[len(signatures[0]):] or ["nothing"]]
            ours, other = next(((a, b) for a, b in zip(signatures[0], theirs) if a != b), (extra[0][0], extra[1][0]))
            raise ValueError(f"rank {rank} built another model than rank 0 ({other} against {ours}); expected the same "
                             f"model on every rank (the same config and data)")
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for _, tensor in named:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for tensors in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        dist.broadcast(flat, src=0)
        torch._foreach_copy_(tensors, [piece.view_as(t) for piece, t in
                                       zip(flat.split([t.numel() for t in tensors]), tensors)])


def wrap_model(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """``model`` under DistributedDataParallel (a collective: rank 0's parameters and buffers are broadcast).

    Buffers are not broadcast at every forward (``broadcast_buffers=False``): BatchNorm statistics are averaged at
    the end of each epoch instead (:func:`average_buffers`), or synchronised at every step with ``sync_bn``. DDP's
    warning about gradient strides is silenced (:data:`NOMINAL_STRIDES_WARNING`: only nominal in maskprop's runs).

    Args:
        model: The run's model.
        device: This rank's device.
        sync_bn: Give ``model``'s BatchNorm layers the default process group, so that they normalise with the
            statistics of the global batch (:func:`maskprop.sparse.sync_batchnorm.enable`). The group stays with
            those layers only: copies of ``model`` made afterwards keep their own statistics.
    """
    if sync_bn:
        sync_batchnorm.enable(model)
    warnings.filterwarnings("ignore", message=NOMINAL_STRIDES_WARNING, category=UserWarning)
    device_ids = [device.index] if device.type == "cuda" else None
    # Newer torch names broadcast_buffers=False forward_sync_buffers=False (buffers still synced once, at init).
    parameters = inspect.signature(DistributedDataParallel.__init__).parameters
    no_forward_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in parameters
                       else {"broadcast_buffers": False})
    return _DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False, **no_forward_sync)


@torch.no_grad()
def average_buffers(model: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over the ranks, in place; integer buffers
    (step counts) are the same on every rank and stay."""
    place = current()
    if not place.enabled:
        return
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1).double() for b in buffers])
    dist.all_reduce(flat)
    flat /= place.world_size
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, by rank (a collective); ``[value]`` in one process."""
    place = current()
    if not place.enabled:
        return [value]
    values: list[Any] = [None] * place.world_size
    dist.all_gather_object(values, value)
    return values
