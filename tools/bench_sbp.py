"""Benchmark: backward time of sparse-backward (unified top-k) layers and MLPs against dense, side by side.

For every (batch, width, k) it times, in one process with the configurations interleaved, warm-up first and
medians reported:

* the backward of one ``width x width`` linear layer (dL/dW, dL/db and dL/dx, as for a hidden layer): dense
  ``nn.Linear``, SBP (``maskprop.sbp.SparseBackwardLinear``, unified top-k) and MSBP (the same with memory);
* the shares of the SBP layer backward spent in the top-k selection (scores, top-k, gathering g_k:
  ``SparseBackwardLinear.select``) and in the gradient scatter into the persistent buffer
  (``maskprop.sbp.RowGradBuffer.accumulate``);
* the whole backward of an MLP ``width -> width -> width -> 10`` (ReLU; two sparse hidden layers, output layer
  dense), dense against ``maskprop.sbp.convert(mlp, k=k)``;

and checks that the sparse gradients equal the masked-dense reference (dense backward with dL/dh multiplied by
the 0/1 mask of the kept units, chosen independently of maskprop).

Example::

    OMP_WAIT_POLICY=PASSIVE python tools/bench_sbp.py --threads 2 --out sbp_cpu.md

On a machine shared with other busy processes, OpenMP's default spin-waiting makes every parallel region wait for
a worker thread that the OS has parked behind another process; backward passes made of many small operations then
run 5-10x slower with 2 threads. ``OMP_WAIT_POLICY=PASSIVE`` (set before Python starts) avoids that; the report
records the policy and the load average.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from maskprop import enlarge_onednn_primitive_cache, keep_freed_host_memory
from maskprop.bench import describe_machine
from maskprop.sbp import RowGradBuffer, SparseBackwardLinear, convert, sparse_layer

DEFAULT_CONFIGS = "64x500:10,20,50;64x5000:5,50,250;1024x8192:8,64,512"


def parse_configs(text: str) -> list[tuple[int, int, list[int]]]:
    """``"64x500:10,20;1024x8192:64"`` -> ``[(64, 500, [10, 20]), (1024, 8192, [64])]``."""
    configs = []
    for part in text.split(";"):
        shape, ks = part.split(":")
        batch, width = (int(v) for v in shape.split("x"))
        configs.append((batch, width, [int(k) for k in ks.split(",")]))
    return configs


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def clear_grads(*tensors: torch.Tensor) -> None:
    for t in tensors:
        t.grad = None


def reference_mask(grad: torch.Tensor, k: int) -> torch.Tensor:
    """Unified top-k mask computed without maskprop: stable sort of the batch-summed magnitudes."""
    kept = torch.sort(grad.abs().sum(0), descending=True, stable=True).indices[:k]
    mask = torch.zeros_like(grad)
    mask[:, kept] = 1.0
    return mask


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = max(b.abs().max().item(), 1e-12)
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


class LayerCase:
    """One (batch, width): a dense layer and sparse layers sharing its parameters, with a retained graph each."""

    def __init__(self, batch: int, width: int, ks: list[int], memory: float) -> None:
        self.batch, self.width, self.ks = batch, width, ks
        self.dense = nn.Linear(width, width)
        self.x = torch.randn(batch, width, requires_grad=True)
        self.grad_out = torch.randn(batch, width)
        self.layers: dict[str, nn.Module] = {"dense": self.dense}
        for k in ks:
            self.layers[f"sbp{k}"] = sparse_layer(self.dense, k=k)  # shares the parameters, nothing copied
            self.layers[f"msbp{k}"] = sparse_layer(self.dense, k=k, memory=memory)
        self.outputs = {name: layer(self.x) for name, layer in self.layers.items()}
        self.scatter = {k: RowGradBuffer() for k in ks}  # one per k, as each layer has its own
        self.scatter_target = nn.Parameter(torch.empty_like(self.dense.weight))

    def backward(self, name: str) -> float:
        clear_grads(self.dense.weight, self.dense.bias, self.x)
        return timed(lambda: self.outputs[name].backward(self.grad_out, retain_graph=True))

    def select(self, k: int) -> float:
        layer: SparseBackwardLinear = self.layers[f"sbp{k}"]
        return timed(lambda: layer.select(self.grad_out))

    def scatter_time(self, k: int) -> float:
        layer: SparseBackwardLinear = self.layers[f"sbp{k}"]
        kept, kept_grad = layer.select(self.grad_out)
        rows_grad = kept_grad.t() @ self.x.detach()
        self.scatter_target.grad = None
        return timed(lambda: self.scatter[k].accumulate(self.scatter_target, kept, rows_grad))

    def check(self, k: int) -> bool:
        """Sparse gradients (weight, bias, input) equal the masked-dense reference."""
        self.backward(f"sbp{k}")
        got = [t.grad.clone() for t in (self.dense.weight, self.dense.bias, self.x)]
        clear_grads(self.dense.weight, self.dense.bias, self.x)
        self.outputs["dense"].backward(self.grad_out * reference_mask(self.grad_out, k), retain_graph=True)
        want = [t.grad for t in (self.dense.weight, self.dense.bias, self.x)]
        clear_grads(self.dense.weight, self.dense.bias, self.x)
        return all(close(a, b) for a, b in zip(got, want))


class MlpCase:
    """A dense MLP and its converted copies (one per k), each with a retained graph of one mini-batch."""

    def __init__(self, batch: int, width: int, ks: list[int]) -> None:
        self.dense = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                   nn.Linear(width, 10))
        self.models = {"dense": self.dense}
        for k in ks:
            self.models[f"sbp{k}"] = convert(copy.deepcopy(self.dense), k=k)  # output layer stays dense
        x = torch.randn(batch, width)
        y = torch.randint(0, 10, (batch,))
        self.losses = {name: F.cross_entropy(model(x), y) for name, model in self.models.items()}

    def backward(self, name: str) -> float:
        self.models[name].zero_grad(set_to_none=True)
        return timed(lambda: self.losses[name].backward(retain_graph=True))


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    configs = parse_configs(args.configs)
    layer_cases = [LayerCase(b, w, ks, args.memory) for b, w, ks in configs]
    mlp_cases = [MlpCase(b, w, ks) for b, w, ks in configs] if not args.no_mlp else []
    times: dict[tuple, list[float]] = {}

    def record(key: tuple, seconds: float, rep: int) -> None:
        if rep >= args.warmup:
            times.setdefault(key, []).append(seconds)

    for rep in range(args.warmup + args.reps):
        for i, case in enumerate(layer_cases):
            names = list(case.layers)
            shift = rep % len(names)  # rotate the order so that no method always runs first
            for name in names[shift:] + names[:shift]:
                record((i, "layer", name), case.backward(name), rep)
            for k in case.ks:
                record((i, "select", k), case.select(k), rep)
                record((i, "scatter", k), case.scatter_time(k), rep)
            if mlp_cases:
                mlp = mlp_cases[i]
                names = list(mlp.models)
                for name in names[shift % len(names):] + names[: shift % len(names)]:
                    record((i, "mlp", name), mlp.backward(name), rep)
        print(f"repetition {rep + 1}/{args.warmup + args.reps} done", file=sys.stderr, flush=True)

    def ms(key: tuple) -> float:
        return statistics.median(times[key]) * 1e3

    header = ("| batch | width | k | dense layer (ms) | SBP layer (ms) | layer speedup | top-k share | scatter share "
              f"| MSBP (gamma={args.memory}) speedup | dense MLP (ms) | SBP MLP (ms) | MLP speedup "
              "| grads = reference |")
    lines = [header, "|" + "|".join(["---"] * 13) + "|"]
    for i, case in enumerate(layer_cases):
        dense_ms = ms((i, "layer", "dense"))
        for k in case.ks:
            sparse_ms = ms((i, "layer", f"sbp{k}"))
            row = [
                str(case.batch), str(case.width), str(k), f"{dense_ms:.2f}", f"{sparse_ms:.3f}",
                f"{dense_ms / sparse_ms:.1f}x", f"{ms((i, 'select', k)) / sparse_ms:.0%}",
                f"{ms((i, 'scatter', k)) / sparse_ms:.0%}", f"{dense_ms / ms((i, 'layer', f'msbp{k}')):.1f}x",
            ]
            if mlp_cases:
                mlp_dense, mlp_sparse = ms((i, "mlp", "dense")), ms((i, "mlp", f"sbp{k}"))
                row += [f"{mlp_dense:.2f}", f"{mlp_sparse:.3f}", f"{mlp_dense / mlp_sparse:.1f}x"]
            else:
                row += ["-", "-", "-"]
            row.append("yes" if case.check(k) else "NO")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (medians are reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="'BATCHxWIDTH:k1,k2;...'")
    parser.add_argument("--memory", type=float, default=0.8, help="MSBP memory ratio gamma of the MSBP column")
    parser.add_argument("--no-mlp", action="store_true", help="time single layers only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the report (markdown) to this file")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    host_memory = keep_freed_host_memory()  # as maskprop bench does: no page faults penalising the larger steps
    enlarge_onednn_primitive_cache()  # oneDNN keeps the kernels of the widths it meets
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    table = run(args)
    policy = os.environ.get("OMP_WAIT_POLICY")
    command = (f"OMP_WAIT_POLICY={policy} " if policy else "") + "python tools/bench_sbp.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    report = "\n".join([
        "# Sparse backward (unified top-k) against dense, CPU",
        "",
        f"- command: `{command.strip()}`",
        (f"- machine: {describe_machine()} ({args.threads} asked for), Python {sys.version.split()[0]}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, glibc malloc keeps freed memory: "
        f"{host_memory}, load average before the run "
        f"{load_before}"),
        f"- date: {datetime.date.today().isoformat()}",
        f"- medians of {args.reps} repetitions after {args.warmup} warm-up, configurations interleaved in one process",
        ("- layer: backward of one width x width nn.Linear (dL/dW, dL/db, dL/dx); MLP: whole backward of "
        "width-width-width-10 (ReLU), hidden layers sparse, output layer dense"),
        ("- top-k share: scores + top-k + gather of g_k (`SparseBackwardLinear.select`); scatter share: writing "
        "dW rows into the persistent buffer (`RowGradBuffer.accumulate`), both relative to the SBP layer backward"),
        ("- grads = reference: the SBP layer's dL/dW, dL/db and dL/dx equal a dense backward of dL/dh times the 0/1 "
        "mask of the top-k units (chosen by a stable sort, not by maskprop)"),
        "",
        table,
        "",
    ])
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
