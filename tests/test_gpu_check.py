"""The tools ``tools/gpu_check.sh`` runs, checked on the CPU: a GPU check has one try, so its parts must work as they
are when a GPU is lent (``tools/isolated_tests.py``: the GPU tests in processes of their own, several at a time;
``tools/e2e_runs.py``: whole runs against their dense twins)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


SAMPLE_TESTS = '''
import os, time, pytest

def test_runs_inside_its_child():
    assert os.environ.get("MASKPROP_ISOLATED_TEST") == "1"

@pytest.mark.parametrize("x", [1, 2])
def test_param(x):
    assert x in (1, 2)

def test_fails():
    assert False, "the failure's own message"

def test_skips():
    pytest.skip("no GPU")

def test_hangs():
    time.sleep(60)
'''


def test_isolated_tests_reports_each_outcome_and_fails_on_a_failure_or_a_timeout(tmp_path, capsys):
    tool = _tool("isolated_tests")
    (tmp_path / "test_sample.py").write_text(SAMPLE_TESTS)
    out = tmp_path / "out.json"
    status = tool.main([str(tmp_path / "test_sample.py"), "--jobs", "3", "--timeout", "4", "--json", str(out)])
    assert status == 1
    result = json.loads(out.read_text())
    outcomes = {r["node"].split("::")[1]: r["outcome"] for r in result["tests"]}
    assert outcomes == {"test_runs_inside_its_child": "passed", "test_param[1]": "passed", "test_param[2]": "passed",
                        "test_fails": "failed", "test_skips": "skipped", "test_hangs": "timeout"}
    assert result["counts"] == {"passed": 3, "skipped": 1, "failed": 1, "timeout": 1, "stopped": 0}
    assert result["tests_collected"] == 6
    printed = capsys.readouterr().out
    assert "the failure's own message" in printed and "3 passed, 1 skipped, 1 failed, 1 timeout" in printed


def test_isolated_tests_passes_when_every_test_passes_or_skips(tmp_path):
    tool = _tool("isolated_tests")
    (tmp_path / "test_fine.py").write_text("import pytest\ndef test_a():\n    pass\n"
                                           "def test_b():\n    pytest.skip('no GPU')\n")
    assert tool.main([str(tmp_path / "test_fine.py"), "--jobs", "2", "--timeout", "30"]) == 0


def test_isolated_tests_records_each_test_as_it_finishes(tmp_path, capsys):
    """A slow test does not hold back the outcomes of the tests after it (a check stopped from outside keeps every
    test that finished); the JSON lists them in the file's order."""
    tool = _tool("isolated_tests")
    (tmp_path / "test_order.py").write_text("import time\ndef test_slow():\n    time.sleep(3)\n"
                                            "def test_quick():\n    pass\n")
    out = tmp_path / "out.json"
    assert tool.main([str(tmp_path / "test_order.py"), "--jobs", "2", "--timeout", "60", "--json", str(out)]) == 0
    printed = [line.split()[-1].split("::")[1] for line in capsys.readouterr().out.splitlines() if "::" in line]
    assert printed == ["test_quick", "test_slow"]
    assert [r["node"].split("::")[1] for r in json.loads(out.read_text())["tests"]] == ["test_slow", "test_quick"]


def test_isolated_tests_start_the_tests_named_first_first(tmp_path, capsys):
    """``--first WORD``: the tests whose node id holds the word start before the others (one at a time here, so they
    also finish first); the outcomes keep the file's order."""
    tool = _tool("isolated_tests")
    (tmp_path / "test_first.py").write_text("def test_a():\n    pass\ndef test_b_graphed():\n    pass\n"
                                            "def test_c():\n    pass\ndef test_d_graphed():\n    pass\n")
    out = tmp_path / "out.json"
    assert tool.main([str(tmp_path / "test_first.py"), "--jobs", "1", "--timeout", "60", "--json", str(out),
                      "--first", "graphed"]) == 0
    printed = [line.split()[-1].split("::")[1] for line in capsys.readouterr().out.splitlines() if "::" in line]
    assert printed == ["test_b_graphed", "test_d_graphed", "test_a", "test_c"]
    assert [r["node"].split("::")[1] for r in json.loads(out.read_text())["tests"]] == [
        "test_a", "test_b_graphed", "test_c", "test_d_graphed"]


def test_isolated_tests_stopped_by_sigterm_keeps_what_finished(tmp_path):
    """The GPU check's time limit ends the tool with SIGTERM: the JSON keeps the finished tests and names those that
    did not finish."""
    import signal

    (tmp_path / "test_stop.py").write_text("import time\ndef test_quick():\n    pass\n"
                                          "def test_slow():\n    time.sleep(8)\n")
    out = tmp_path / "out.json"
    child = subprocess.Popen([sys.executable, str(REPO / "tools" / "isolated_tests.py"), str(tmp_path / "test_stop.py"),
                              "--jobs", "2", "--json", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 60
    while not (out.exists() and json.loads(out.read_text())["counts"]["passed"] == 1):
        assert time.monotonic() < deadline and child.poll() is None, child.communicate()
        time.sleep(0.1)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == 128 + signal.SIGTERM
    result = json.loads(out.read_text())
    assert {r["node"].split("::")[1]: r["outcome"] for r in result["tests"]} == {"test_quick": "passed",
                                                                                "test_slow": "stopped"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial file left


@pytest.mark.parametrize("args", [["--jobs", "0"], ["--json", "/no/such/dir/out.json"]])
def test_isolated_tests_usage_errors_are_one_line(tmp_path, args):
    (tmp_path / "test_fine.py").write_text("def test_a():\n    pass\n")
    done = subprocess.run([sys.executable, str(REPO / "tools" / "isolated_tests.py"), str(tmp_path / "test_fine.py"),
                           *args], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("isolated_tests.py: error: ")
    assert "Traceback" not in done.stderr


def test_isolated_tests_collects_the_gpu_tests_of_this_repository():
    nodes = _tool("isolated_tests").collect("tests/test_gpu.py")
    assert len(nodes) >= 20 and all(n.startswith("tests/test_gpu.py::test_") for n in nodes)


def test_e2e_runs_pairs_a_sparse_run_with_its_dense_twin(tmp_path, capsys):
    """The dry run on the CPU: both runs finish, the sparse one's summary fields are read, the twin trains for the
    search plus finetune epochs, and the table has the row."""
    tool = _tool("e2e_runs")
    out = tmp_path / "e2e"
    status = tool.main(["--out", str(out), "--models", "resnet20:16:64", "--device", "cpu", "--batch-size", "32",
                        "--epochs", "4", "--finetune-epochs", "1", "--threads", "1", "--timeout", "300", "--set",
                        "data.val_size=32", "sparsity.fix_examples=32", "sparsity.fix_samples=2"])
    assert status == 0
    rows = json.loads((out / "e2e.json").read_text())["resnet20_16px"]
    sparse, dense = rows["vrpge"], rows["dense"]
    assert sparse["exit_status"] == 0 and dense["exit_status"] == 0
    assert sparse["measured_speedup"] > 0 and sparse["accuracy"] is not None and dense["accuracy"] is not None
    config = (out / "resnet20_16px_dense" / "config.yaml").read_text()
    assert "method: dense" in config and "epochs: 5" in config
    table = (out / "e2e.md").read_text()
    assert "| resnet20_16px |" in table and f"{sparse['measured_speedup']:.2f}x" in table


@pytest.mark.parametrize("spec", ["resnet32", "resnet32:32", "resnet32:x:100", "resnet32:4:100", "resnet32:32:0"])
def test_e2e_runs_bad_model_specs_are_one_line(tmp_path, spec):
    done = subprocess.run([sys.executable, str(REPO / "tools" / "e2e_runs.py"), "--out", str(tmp_path / "o"),
                           "--models", spec], capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert "NAME:IMAGE:TRAIN_IMAGES" in done.stderr or "image >= 8" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_gpu_check_runs_through_on_the_cpu_as_a_dry_run(tmp_path):
    """``GPU_CHECK_DRY_RUN=1 tools/gpu_check.sh OUT`` runs every part at toy sizes on the CPU (about a minute): each
    part exits 0 and writes what the GPU run would, and summary.json names them all; with a second directory, the
    archive and tables a lent machine can return."""
    import os
    import tarfile

    out, bundle = tmp_path / "check", tmp_path / "back"
    done = subprocess.run(["bash", "tools/gpu_check.sh", str(out), str(bundle)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable},
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"tests", "graphs", "e2e"} and all(s["exit_status"] == 0 for s in summary.values())
    for name in ("machine.json", "gpu_tests.json", "graphs.json", "graphs.md", "e2e/e2e.json", "e2e/e2e.md"):
        assert (out / name).is_file(), name
    assert json.loads((out / "gpu_tests.json").read_text())["counts"]["failed"] == 0
    # what a lent machine returns (at most 8 files): the archive of every result, checkpoints left out, and the tables
    assert sorted(p.name for p in bundle.iterdir()) == ["e2e.md", "gpu_check.log", "gpu_check.tgz", "gpu_tests.json",
                                                        "graphs.md", "summary.json"]
    with tarfile.open(bundle / "gpu_check.tgz") as archive:
        names = archive.getnames()
    assert {"check/graphs.json", "check/e2e/e2e.json", "check/machine.json"} <= set(names)
    assert not [n for n in names if n.endswith(".pt")] and any(n.endswith("summary.json") and "/e2e/" in n
                                                                for n in names)


def test_the_step_times_table_gives_the_targets_rows_as_speedups():
    """``tools/bench_graphs.py`` writes the targets' rows as dense time / step time beside the target and the ceiling
    (a search step's ceiling three quarters of the narrow model's: it adds a forward of m')."""
    tool = _tool("bench_graphs")
    try:
        row = {"model": "resnet32", "dense_eager_ms": 14.0, "dense_graphed_ms": 6.0, "search_graphed_ms": 7.5,
               "narrow_graphed_ms": 5.0}
        lines = tool.targets_table([row, {"model": "resnet20", "dense_eager_ms": 1.0}]).splitlines()
    finally:
        sys.modules.pop("bench_graphs", None)
    assert lines[0] == "| speedup (dense step time / step time) | resnet32 | resnet20 |"
    assert lines[2:] == [
        "| search / dense eager | 1.87x (target 2.00x, ceiling 2.47x) | - |",
        "| search / dense graphed | 0.80x (target 0.90x, ceiling 0.95x) | - |",
        "| narrow finetune / dense eager | 2.80x (target 2.50x, ceiling 3.30x) | - |",
        "| narrow finetune / dense graphed | 1.20x (target 1.20x, ceiling 1.27x) | - |",
    ]


def test_bench_graphs_times_the_search_s_earlier_schedules_on_request():
    """``--kinds search_m_first_graphed search_m_at_start_graphed`` time the search step with the forward of ``m'``
    after that of ``m`` (the schedule before deferred statistics) and with each step's ``m`` drawn at its start (before
    the step before drew it beside its backward), and report the default's speedup over each; the default kinds leave
    them out."""
    tool = _tool("bench_graphs")
    extra = ["search_m_first_graphed", "search_m_at_start_graphed"]
    try:
        assert not set(extra) & set(tool.KINDS) and set(extra) <= set(tool.EXTRA_KINDS)
        row = tool.bench("resnet20", 16, 4, torch.device("cpu"), 1, 0.5, 8, kinds=["search_graphed", *extra])
        table = tool.markdown([row])
    finally:
        sys.modules.pop("bench_graphs", None)
    for kind, speedup in zip(extra, ("m2_first_speedup", "m_ahead_speedup")):
        assert row[f"{kind}_ms"] > 0 and row[speedup] == pytest.approx(row[f"{kind}_ms"] / row["search_graphed_ms"])
    header = table.splitlines()[0]
    assert "search m' after m / m' first" in header and "search m at the step's start / m ahead" in header
    assert table.splitlines()[1].count("---") == 19


def test_bench_graphs_profiles_every_kind_on_request(tmp_path):
    """``--profile DIR``: each step kind's operators by their own time in ``DIR/<model>.md`` (kernels by device time
    on a GPU) and the graphed search step's trace, gzipped JSON (here on the CPU, eagerly, at a toy size, two kinds:
    ``--kinds``)."""
    import gzip

    tool = _tool("bench_graphs")
    try:
        tool.PROFILE_STEPS = 1
        row = tool.bench("resnet20", 16, 4, torch.device("cpu"), 1, 0.5, 8, profile_dir=tmp_path,
                         kinds=["dense_eager", "search_graphed"])
    finally:
        sys.modules.pop("bench_graphs", None)
    assert [k for k in row if k.endswith("_ms")] == ["dense_eager_ms", "search_graphed_ms"]
    text = (tmp_path / "resnet20.md").read_text()
    assert text.count("## resnet20 16px b4: ") == 2 and ": search_graphed (1 steps" in text
    assert "aten::convolution" in text and "Self CPU" in text
    trace = json.loads(gzip.decompress((tmp_path / "resnet20_search_graphed.json.gz").read_bytes()))
    assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])
