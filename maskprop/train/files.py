"""Writing files so that a killed process never leaves a half-written one behind (:mod:`maskprop._files`, where the
core can import it without the trainer's dependencies)."""

from __future__ import annotations

from .._files import atomic_write

__all__ = ["atomic_write"]
