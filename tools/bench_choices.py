"""Benchmark: the implementation choices whose reasons the code's docstrings give, each against its alternative.

Usage:
    python tools/bench_choices.py --threads 2
    python tools/bench_choices.py --only layout adam

Every pair runs interleaved in one process on the same inputs (medians of ``--repeats`` after one warm-up), and
each pair's two results are checked to agree before they are timed:

* ``layout``: ``maskprop.sbp.sparsifiers.take_units`` (``torch.gather`` on the rows view) against ``index_select``
  along the channels of a channels_last gradient, and ``batch_sum`` (output laid out like one example) against a
  plain ``sum(dim=0)``; a ResNet-32 first-stage gradient (batch 128, 32 channels, 32 x 32), channels_last.
* ``adam``: one Adam step with ``fused=True`` (what ``maskprop.train.optim`` picks) against the per-tensor loop
  (``foreach=False``) on the parameters of a 784-5000-5000-10 MLP.
* ``rowgrad``: a row-sparse weight gradient (k = 50 of 5000 rows) written through ``maskprop.sbp.RowGradBuffer``
  (re-zeroes only the rows written last step) against a fresh zero-filled full-size tensor per step.
* ``gather``: forward and backward of ``W[out_kept][:, in_kept]`` for a 256 x 256 x 3 x 3 conv weight at keep 0.5 by
  ``maskprop.sparse.gather.gather_rows`` on the flat ``(c_out * c_in, 9)`` view against two chained
  ``index_select`` calls; and a linear weight pruned on one side (a transformer MLP's 3072 x 768 ``fc1``, its
  outputs, and 768 x 3072 ``fc2``, its inputs) read along that side by ``gather_side`` against the flat rows of every
  kept entry (built per mask, as a step would).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from torch import nn

from maskprop import enlarge_onednn_primitive_cache, keep_freed_host_memory
from maskprop.bench import interleaved_times
from maskprop.sbp import RowGradBuffer
from maskprop.sbp.sparsifiers import batch_sum, take_units
from maskprop.sparse.gather import gather_rows, gather_side

Pair = tuple[str, Callable[[], object], str, Callable[[], object]]


def _compare(name: str, pair: Pair, repeats: int) -> str:
    label_a, fn_a, label_b, fn_b = pair
    times = interleaved_times({"a": fn_a, "b": fn_b}, repeats, warmup=1)
    a, b = (1e3 * statistics.median(times[key]) for key in ("a", "b"))
    ratios = [y / x for x, y in zip(times["a"], times["b"])]
    return f"| {name} | {label_a} | {a:.2f} | {label_b} | {b:.2f} | {statistics.median(ratios):.2f}x |"


def layout_pairs() -> list[tuple[str, Pair]]:
    grad = torch.randn(128, 32, 32, 32).contiguous(memory_format=torch.channels_last).view(128, 32, -1)
    pairs = []
    for k in (3, 16):
        index = torch.randperm(32)[:k].sort().values
        assert torch.equal(take_units(grad, index), grad.index_select(1, index))
        pairs.append((f"take {k} of 32 channels", ("take_units", lambda i=index: take_units(grad, i),
                                                   "index_select", lambda i=index: grad.index_select(1, i))))
    assert torch.allclose(batch_sum(grad), grad.sum(dim=0), atol=1e-4)
    pairs.append(("sum over the batch", ("batch_sum", lambda: batch_sum(grad), "sum(dim=0)", lambda: grad.sum(dim=0))))
    return pairs


def adam_pairs() -> list[tuple[str, Pair]]:
    def model() -> nn.Module:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(784, 5000), nn.Linear(5000, 5000), nn.Linear(5000, 10))
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        return net

    fused_net, loop_net = model(), model()
    fused = torch.optim.Adam(fused_net.parameters(), lr=1e-3, fused=True)
    loop = torch.optim.Adam(loop_net.parameters(), lr=1e-3, foreach=False)
    fused.step(), loop.step()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(fused_net.parameters(), loop_net.parameters()))
    return [("Adam step, 784-5000-5000-10", ("fused", fused.step, "per-tensor loop", loop.step))]


def rowgrad_pairs() -> list[tuple[str, Pair]]:
    weight = nn.Parameter(torch.randn(5000, 5000))
    rows_grad = torch.randn(50, 5000)
    buffer = RowGradBuffer()

    def persistent() -> None:
        weight.grad = None  # what optimizer.zero_grad() does between steps
        buffer.accumulate(weight, torch.randperm(5000)[:50], rows_grad)

    def fresh() -> None:
        grad = torch.zeros_like(weight)
        grad.index_copy_(0, torch.randperm(5000)[:50], rows_grad)
        weight.grad = grad

    return [("row-sparse weight gradient, 50 of 5000 rows", ("RowGradBuffer", persistent, "zero-filled tensor", fresh))]


def gather_pairs(channels: int = 256) -> list[tuple[str, Pair]]:
    kept = channels // 2
    weight = nn.Parameter(torch.randn(channels, channels, 3, 3))
    out_index = torch.randperm(channels)[:kept].sort().values
    in_index = torch.randperm(channels)[:kept].sort().values
    flat = (out_index[:, None] * channels + in_index).view(-1)
    upstream = torch.randn(kept, kept, 3, 3)

    def flat_gather() -> None:
        gather_rows(weight.view(channels * channels, 9), flat).view(kept, kept, 3, 3).backward(upstream)
        weight.grad = None

    def chained() -> None:
        weight.index_select(0, out_index).index_select(1, in_index).backward(upstream)
        weight.grad = None

    expected = weight.index_select(0, out_index).index_select(1, in_index)
    assert torch.equal(gather_rows(weight.view(channels * channels, 9), flat).view(kept, kept, 3, 3), expected)
    return [(f"gather W[out][:, in] of a {channels}-channel 3x3 conv at keep 0.5, forward + backward",
             ("gather_rows", flat_gather, "chained index_select", chained)),
            *(one_side_pair(*shape) for shape in ((3072, 768, 0), (768, 3072, 1)))]


def one_side_pair(outputs: int, inputs: int, dim: int) -> tuple[str, Pair]:
    """A linear weight pruned on one side (a transformer MLP's ``fc1``, ``dim`` 0, or ``fc2``, 1) at keep 0.5:
    ``gather_side`` along that side against the flat rows of every kept entry, which the step builds per mask."""
    weight = nn.Parameter(torch.randn(outputs, inputs))
    side = torch.randperm(weight.shape[dim])[:weight.shape[dim] // 2].sort().values
    out_index, in_index = (side, torch.arange(inputs)) if dim == 0 else (torch.arange(outputs), side)
    upstream = torch.randn(len(out_index), len(in_index))

    def by_side() -> None:
        gather_side(weight, dim, side, 1, inputs).view_as(upstream).backward(upstream)
        weight.grad = None

    def by_flat_rows() -> None:
        flat = (out_index[:, None] * inputs + in_index).view(-1)
        gather_rows(weight.view(-1, 1), flat).view_as(upstream).backward(upstream)
        weight.grad = None

    expected = weight[out_index][:, in_index]
    assert torch.equal(gather_side(weight, dim, side, 1, inputs).view_as(expected), expected)
    what = "W[out] (inputs whole)" if dim == 0 else "W[:, in] (outputs whole)"
    return (f"gather {what} of a {outputs} x {inputs} linear at keep 0.5, forward + backward",
            ("gather_side", by_side, "flat rows, built per mask", by_flat_rows))


SECTIONS = {"layout": layout_pairs, "adam": adam_pairs, "rowgrad": rowgrad_pairs, "gather": gather_pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args()
    keep_freed_host_memory()
    enlarge_onednn_primitive_cache()  # oneDNN keeps the kernels of the widths it meets
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{args.threads} threads, float32, medians of {args.repeats}, interleaved; ratio = median of B / A per "
          f"repetition")
    print("| what | A | A (ms) | B | B (ms) | B / A |")
    print("|---|---|---:|---|---:|---:|")
    for section in args.only:
        for name, pair in SECTIONS[section]():
            print(_compare(name, pair, args.repeats), flush=True)


if __name__ == "__main__":
    main()
