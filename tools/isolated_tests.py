"""Run every test of a pytest file in a process of its own, several at a time, and report each outcome.

Usage:
    python tools/isolated_tests.py tests/test_gpu.py --jobs 8 --json out/gpu_tests.json
    python tools/isolated_tests.py tests/test_gpu.py --jobs 8 --rerun out/gpu_tests.json --json out/again.json

``tests/test_gpu.py`` isolates its tests already (a CUDA error leaves its process's context unusable, so each test
runs in a child pytest process), but one after the other: 25 tests, each paying an interpreter, torch's import and a
CUDA context, took longer than a GPU check can give them. This tool starts the same children ``--jobs`` at a time,
each with ``MASKPROP_ISOLATED_TEST=1`` so that the test runs inside it directly, and a time limit per test; tests that
share one GPU this way check results, not times. It prints one line per test and a count, writes the outcomes as
JSON (at the start and after every test, replacing the file whole), and exits 1 if any test failed or timed out (0
when all passed or were skipped; 2 for a usage error). Stopped by SIGTERM (the time limit of a GPU check), it writes
the JSON once more, the tests still running or waiting marked ``stopped``, and exits 143. The children load no
third-party pytest plugins (``PYTEST_DISABLE_PLUGIN_AUTOLOAD``): the tests need none, and a GPU image may carry many
that slow every start.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ISOLATED_ENV = "MASKPROP_ISOLATED_TEST"  # tests/test_gpu.py: inside such a child the test runs in the process itself
REPO = Path(__file__).resolve().parents[1]
NO_PLUGINS = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}


def workdir(path: str) -> Path:
    """Where the tests of ``path`` run: the repository for its own tests (its conftest and imports), else the file's
    folder."""
    file = Path(path).resolve()
    return REPO if file.is_relative_to(REPO) else file.parent


def collect(path: str, python: str = sys.executable) -> list[str]:
    """The node ids pytest collects from ``path`` (``file::test[params]``), relative to :func:`workdir`."""
    done = subprocess.run([python, "-m", "pytest", str(Path(path).resolve()), "--collect-only", "-q", "-p",
                           "no:cacheprovider"], cwd=workdir(path), env={**os.environ, **NO_PLUGINS},
                          capture_output=True, text=True, check=False)
    # node ids, each once (a warnings summary may name a node again)
    nodes = list(dict.fromkeys(line.strip() for line in done.stdout.splitlines()
                               if "::" in line and not line.startswith(" ") and " " not in line.strip()))
    if done.returncode not in (0, 5) or (done.returncode == 0 and not nodes):
        raise RuntimeError(f"pytest could not collect {path} (exit {done.returncode}):\n{done.stdout[-2000:]}"
                           f"{done.stderr[-2000:]}")
    return nodes


def run_one(node: str, cwd: Path, timeout: float, threads: int, python: str = sys.executable) -> dict:
    """Run one test in its own pytest process: its outcome (passed, skipped, failed, timeout), seconds, output."""
    env = {**os.environ, **NO_PLUGINS, ISOLATED_ENV: "1", "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    try:
        done = subprocess.run([python, "-m", "pytest", node, "-q", "-rs", "-p", "no:cacheprovider"], cwd=cwd,
                              env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"") + (expired.stderr or b"")
        output = output.decode(errors="replace") if isinstance(output, bytes) else output
        return {"node": node, "outcome": "timeout", "seconds": round(time.perf_counter() - start, 1),
                "output": output[-4000:]}
    output = done.stdout + done.stderr
    tally = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if done.returncode == 0:
        outcome = "passed" if re.search(r"\b\d+ passed\b", tally) else "skipped"
    else:
        outcome = "failed"
    return {"node": node, "outcome": outcome, "seconds": round(time.perf_counter() - start, 1),
            "output": output[-4000:] if outcome == "failed" else ""}


RERUN = ("failed", "timeout", "stopped")
"""The outcomes ``--rerun`` runs again."""


def unfinished(path: str, parser: argparse.ArgumentParser) -> set[str]:
    """The node ids an earlier ``--json`` file records as failed, timed out or stopped (a usage error if it cannot
    be read as one)."""
    try:
        tests = json.loads(Path(path).read_text())["tests"]
        return {test["node"] for test in tests if test["outcome"] in RERUN}
    except (OSError, ValueError, KeyError, TypeError) as error:
        parser.error(f"--rerun {path}: not a file this tool wrote ({type(error).__name__}: {error})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a pytest file, e.g. tests/test_gpu.py")
    parser.add_argument("--jobs", type=int, default=6, help="tests running at once (default 6)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one test may take (default 120)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each test's process (default 2)")
    parser.add_argument("--json", help="write the outcomes to this path")
    parser.add_argument("--rerun", metavar="JSON",
                        help="run only the tests that did not pass or skip in this earlier --json file (failed, "
                             "timed out, or stopped by a check's time limit): a second try that spends no time on "
                             "the rest")
    parser.add_argument("--first", nargs="+", default=[], metavar="WORD",
                        help="start the tests whose node id holds one of these words first (the ones a time limit "
                             "must not cut); the outcomes keep the file's order")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.timeout <= 0 or args.threads < 1:
        parser.error(f"--jobs {args.jobs}, --timeout {args.timeout}, --threads {args.threads}: expected a positive "
                     f"number each")
    if not Path(args.path).is_file():
        parser.error(f"{args.path}: no such test file")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json {args.json}: its directory does not exist")
    again = None if args.rerun is None else unfinished(args.rerun, parser)
    nodes, cwd = collect(args.path), workdir(args.path)
    if again is not None:
        nodes = [node for node in nodes if node in again]  # the file's order
        print(f"rerunning {len(nodes)} tests that did not pass or skip in {args.rerun}", flush=True)
    start = time.perf_counter()
    results: list[dict] = []

    def tally() -> dict[str, int]:
        return {outcome: sum(r["outcome"] == outcome for r in results)
                for outcome in ("passed", "skipped", "failed", "timeout", "stopped")}

    def write(tests: list[dict]) -> None:
        if args.json:  # whole or not at all: a kill while writing leaves the previous file
            path = Path(args.json)
            part = path.with_name(f".{path.name}.part")
            part.write_text(json.dumps({
                "path": args.path, "jobs": args.jobs, "tests_collected": len(nodes),
                "wall_s": round(time.perf_counter() - start, 1), "counts": tally(), "tests": tests}, indent=2))
            os.replace(part, path)

    def stopped(signum: int, frame: object) -> None:  # the check's time limit: keep what finished, say what did not
        finished = {r["node"] for r in results}
        results.extend({"node": n, "outcome": "stopped", "seconds": None, "output": ""} for n in nodes
                       if n not in finished)
        write(sorted(results, key=lambda r: nodes.index(r["node"])))
        print(f"stopped by signal {signum}: {tally()}", flush=True)
        os._exit(128 + signum)  # the children get the same signal from the check's timeout (one process group)

    before = signal.signal(signal.SIGTERM, stopped)
    try:
        write(results)  # at once: a file that collects no test, or a check stopped before the first ends, leaves one
        with ThreadPoolExecutor(args.jobs) as pool:
            order = sorted(nodes, key=lambda n: not any(word in n for word in args.first))  # stable: the file's order
            futures = [pool.submit(run_one, node, cwd, args.timeout, args.threads) for node in order]
            for future in as_completed(futures):  # as each finishes: a slow test does not hold back the others
                result = future.result()
                print(f"{result['outcome']:8s} {result['seconds']:6.1f} s  {result['node']}", flush=True)
                if result["output"]:
                    print(result["output"], flush=True)
                results.append(result)
                results.sort(key=lambda r: nodes.index(r["node"]))  # in the file's order
                write(results)  # after every test: a check stopped from outside keeps what finished
    finally:
        signal.signal(signal.SIGTERM, before)  # called from Python (the tests): the caller's handler back
    counts = tally()
    print(", ".join(f"{n} {outcome}" for outcome, n in counts.items()) + f" in {time.perf_counter() - start:.1f} s "
          f"({len(nodes)} tests, {args.jobs} at a time)", flush=True)
    return 1 if counts["failed"] or counts["timeout"] else 0


if __name__ == "__main__":
    sys.exit(main())
