"""Benchmark: dense step vs official-style masked VR-PGE step vs maskprop's compact VR-PGE step.

Usage:
    python tools/bench_step.py --models resnet32 vgg19_bn --batch-size 128 --threads 2
    python tools/bench_step.py --models resnet32 --device cuda --batch-size 256 --amp bf16

Same as ``maskprop bench``. Prints a markdown table (and writes JSON with --json).
"""

from __future__ import annotations

import sys

from maskprop.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
