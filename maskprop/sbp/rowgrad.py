"""A persistent full-size gradient buffer for weights whose gradient is non-zero on a few rows only.

With unified top-k the weight gradient of a sparse-backward layer has ``k`` non-zero rows out of ``n``. Handing
autograd a fresh dense ``(n, m)`` tensor every step means allocating and zero-filling it, most of the whole sparse
backward (BENCHMARKS.md, "Implementation choices": row-sparse weight gradients). Instead each layer keeps one buffer
and writes it into ``param.grad`` itself; before the next write it re-zeroes only the rows it wrote last time.

Contract (what an optimizer or a training loop sees):

* ``param.grad`` is a correct, dense, full-size tensor, exactly as autograd would have produced it; gradients
  accumulate over several backward calls when ``param.grad`` is not cleared in between, as usual.
* The buffer is reused: after ``optimizer.zero_grad()`` (``set_to_none=True``, the torch default) the next backward
  puts the same tensor back into ``param.grad`` with new contents. Copy ``param.grad`` if you keep it beyond the
  next backward.
* Modifying ``param.grad`` in place (clipping, unscaling, ``zero_grad(set_to_none=False)``) is allowed: the
  buffer's version counter shows it, and the next write then zeroes the whole buffer once instead of the rows.
"""

from __future__ import annotations

import torch
from torch import Tensor


class RowGradBuffer:
    """Owns the gradient buffer of one parameter and the rows written into it since it was last cleared."""

    def __init__(self) -> None:
        self.buffer: Tensor | None = None
        self.rows: Tensor | None = None  # rows that may be non-zero; None: unknown, zero everything
        self.version: int | None = None  # buffer._version right after our last write

    def reset(self) -> None:
        """Forget the buffer (it is re-allocated at the next write)."""
        self.buffer, self.rows, self.version = None, None, None

    def _fresh_buffer(self, param: Tensor) -> Tensor:
        buf = self.buffer
        if buf is None or buf.shape != param.shape or buf.dtype != param.dtype or buf.device != param.device:
            self.buffer = torch.zeros_like(param, memory_format=torch.contiguous_format)
        elif self.rows is None or buf._version != self.version:
            buf.zero_()
        else:
            buf.index_fill_(0, self.rows, 0)
        return self.buffer

    @torch.no_grad()
    def accumulate(self, param: Tensor, rows: Tensor, rows_grad: Tensor) -> None:
        """Add a row-sparse gradient to ``param.grad``: ``param.grad[rows] += rows_grad``.

        Args:
            param: a leaf parameter; its ``.grad`` is set or accumulated into.
            rows: 1-D long tensor of distinct row indices (dimension 0 of ``param``).
            rows_grad: gradient of those rows, shape ``(len(rows), *param.shape[1:])``.
        """
        grad = param.grad
        if grad is None:
            buf = self._fresh_buffer(param)
            buf.index_copy_(0, rows, rows_grad)
            param.grad = buf
            self.rows = rows
        elif grad is self.buffer and grad._version == self.version:
            grad.index_add_(0, rows, rows_grad)
            self.rows = torch.cat((self.rows, rows)).unique() if self.rows is not None else None
        else:
            # Someone else's tensor, or ours modified in place: accumulate like autograd and stop trusting the rows.
            grad.index_add_(0, rows, rows_grad)
            if grad is self.buffer:
                self.rows = None
        if self.buffer is not None:
            self.version = self.buffer._version
