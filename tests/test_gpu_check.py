"""The tools ``tools/gpu_check.sh`` runs, checked on the CPU: a GPU check has one try, so its parts must work as they
are when a GPU is lent (``tools/isolated_tests.py``: the GPU tests in processes of their own, several at a time;
``tools/e2e_runs.py``: whole runs against their dense twins)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import load_tool

REPO = Path(__file__).resolve().parents[1]


_tool = load_tool


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


def test_isolated_tests_rerun_runs_only_what_did_not_pass_or_skip(tmp_path, capsys):
    """``--rerun JSON``: a second try of the tests an earlier run records as failed, timed out or stopped (a check's
    time limit), and of no other."""
    tool = _tool("isolated_tests")
    (tmp_path / "test_again.py").write_text("import pytest\ndef test_a():\n    pass\ndef test_b():\n    pass\n"
                                            "def test_c():\n    assert False\ndef test_d():\n    pytest.skip()\n"
                                            "def test_e():\n    pass\n")
    earlier = tmp_path / "earlier.json"
    nodes = dict(zip("abcde", tool.collect(str(tmp_path / "test_again.py")), strict=True))
    assert all(n.endswith(f"::test_{name}") for name, n in nodes.items())
    earlier.write_text(json.dumps({"tests": [{"node": nodes["a"], "outcome": "passed"},
                                             {"node": nodes["b"], "outcome": "stopped"},
                                             {"node": nodes["c"], "outcome": "failed"},
                                             {"node": nodes["d"], "outcome": "timeout"},
                                             {"node": nodes["e"], "outcome": "skipped"}]}))
    out = tmp_path / "again.json"
    status = tool.main([str(tmp_path / "test_again.py"), "--jobs", "2", "--timeout", "60", "--rerun", str(earlier),
                        "--json", str(out)])
    assert status == 1  # test_c fails again
    result = json.loads(out.read_text())
    assert {r["node"].split("::")[1]: r["outcome"] for r in result["tests"]} == {
        "test_b": "passed", "test_c": "failed", "test_d": "skipped"}
    assert "rerunning 3 tests" in capsys.readouterr().out
    earlier.write_text(json.dumps({"tests": [{"node": nodes["a"], "outcome": "passed"}]}))  # nothing left to rerun
    assert tool.main([str(tmp_path / "test_again.py"), "--rerun", str(earlier), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["tests"] == []


@pytest.mark.parametrize("args", [["--jobs", "0"], ["--json", "/no/such/dir/out.json"], ["--rerun", "/no/such.json"]])
def test_isolated_tests_usage_errors_are_one_line(tmp_path, args):
    (tmp_path / "test_fine.py").write_text("def test_a():\n    pass\n")
    done = subprocess.run([sys.executable, str(REPO / "tools" / "isolated_tests.py"), str(tmp_path / "test_fine.py"),
                           *args], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("isolated_tests.py: error: ")
    assert "Traceback" not in done.stderr


def test_isolated_tests_collects_the_gpu_tests_of_this_repository():
    nodes = _tool("isolated_tests").collect("tests/test_gpu.py")
    assert len(nodes) >= 20 and all(n.startswith("tests/test_gpu.py::test_") for n in nodes)


def _needs_cuda(decorator) -> bool:
    """Whether a test decorator marks a test as one that needs CUDA (``pytest.mark.gpu``, or a ``skipif`` on CUDA's
    absence)."""
    import ast

    text = ast.unparse(decorator)
    return "mark.gpu" in text or ("skipif" in text and "cuda.is_available" in text)


def test_every_test_that_needs_cuda_runs_in_the_gpu_check():
    """``tools/gpu_check.sh`` runs ``tests/test_gpu.py`` alone: a test in another file that needs CUDA (marked ``gpu``,
    or skipped without CUDA) has a test of its name there, or the one GPU run there is skips it (as it skipped the
    CUDA branch of the ``sync_bn`` layers, tested in ``tests/test_distributed.py`` only)."""
    import ast

    gpu_file = ast.parse((REPO / "tests" / "test_gpu.py").read_text())
    in_check = {node.name for node in gpu_file.body if isinstance(node, ast.FunctionDef)}
    missing = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        if path.name == "test_gpu.py":
            continue
        tree = ast.parse(path.read_text())
        whole = any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets)
                    and _needs_cuda(node.value) for node in tree.body)  # a module marked gpu: all its tests
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and (
                    whole or any(_needs_cuda(d) for d in node.decorator_list)):
                if node.name not in in_check:
                    missing.append(f"{path.name}::{node.name}")
    assert missing == [], f"tests that need CUDA but that the GPU check does not run: {missing}"


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


def test_bench_graphs_reports_medians_and_each_ratio_of_the_named_step_times():
    """Each kind's time is the median of its steps (not the mean: one slow step must not move it), the row is saved
    after every kind (a time limit keeps what was measured), and every ratio is the step time its name says over the
    one it says (``_speedup``: the other schedule's time over the default's), in the markdown column of that name."""
    tool = _tool("bench_graphs")
    kinds = tool.KINDS + tool.EXTRA_KINDS
    medians = {kind: float(3 + i) for i, kind in enumerate(kinds)}  # distinct, known medians
    timed, saved = [], []

    def fake_time(fn, device, steps):
        kind = kinds[len(timed)]
        timed.append(kind)
        return [medians[kind] / 2, medians[kind], 100 * medians[kind]]  # median m, mean far above it

    try:
        tool._time = fake_time
        row = tool.bench("resnet20", 16, 4, torch.device("cpu"), 3, 0.5, 8, kinds=kinds,
                         save=lambda r: saved.append({k for k in r if k.endswith("_ms")}))
        table = tool.markdown([row])
    finally:
        sys.modules.pop("bench_graphs", None)
    assert timed == kinds and not [k for k in row if k.endswith("_error")]
    assert {k: row[f"{k}_ms"] for k in kinds} == medians
    assert saved == [{f"{k}_ms" for k in kinds[:i + 1]} for i in range(len(kinds))]
    expected = {"search_over_dense_eager": ("search_eager", "dense_eager"),
                "static_search_over_dense_eager": ("search_static", "dense_eager"),
                "search_over_dense_graphed": ("search_graphed", "dense_graphed"),
                "settled_over_dense_graphed": ("settled_graphed", "dense_graphed"),
                "finetune_over_dense_eager": ("finetune_eager", "dense_eager"),
                "finetune_over_dense_graphed": ("finetune_graphed", "dense_graphed"),
                "narrow_over_dense_graphed": ("narrow_graphed", "dense_graphed"),
                "search_graphed_speedup_over_eager": ("search_eager", "search_graphed"),
                "ranks_over_one_process": ("search_ranks_graphed", "search_graphed"),
                "overlap_speedup": ("search_one_stream_graphed", "search_graphed"),
                "m2_first_speedup": ("search_m_first_graphed", "search_graphed"),
                "m_ahead_speedup": ("search_m_at_start_graphed", "search_graphed")}
    for name, (top, bottom) in expected.items():
        assert row[name] == pytest.approx(medians[top] / medians[bottom]), name
    header, _, line = table.splitlines()
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")],
                     [c.strip() for c in line.strip("|").split("|")]))
    for column, kind in [("dense eager ms", "dense_eager"), ("dense graphed ms", "dense_graphed"),
                         ("search eager ms", "search_eager"), ("search graphed ms", "search_graphed"),
                         ("search static ms", "search_static"), ("finetune graphed ms", "finetune_graphed"),
                         ("narrow graphed ms", "narrow_graphed")]:
        assert cells[column] == f"{medians[kind]:.1f}", column
    for column, name in [("search/dense eager", "search_over_dense_eager"),
                         ("search/dense graphed", "search_over_dense_graphed"),
                         ("static search/dense eager", "static_search_over_dense_eager"),
                         ("settled search/dense graphed", "settled_over_dense_graphed"),
                         ("finetune/dense eager", "finetune_over_dense_eager"),
                         ("finetune/dense graphed", "finetune_over_dense_graphed"),
                         ("narrow/dense graphed", "narrow_over_dense_graphed"),
                         ("search one stream / two streams", "overlap_speedup"),
                         ("search under torchrun (one rank) / one process", "ranks_over_one_process"),
                         ("search m' after m / m' first", "m2_first_speedup"),
                         ("search m at the step's start / m ahead", "m_ahead_speedup")]:
        top, bottom = expected[name]
        assert cells[column] == f"{medians[top] / medians[bottom]:.2f}", column


def test_bench_graphs_times_each_step_in_milliseconds_after_its_warm_up():
    import time as clock

    tool = _tool("bench_graphs")
    calls = []
    try:
        times = tool._time(lambda: (calls.append(1), clock.sleep(0.02)), torch.device("cpu"), 3)
        warmup = tool.WARMUP
    finally:
        sys.modules.pop("bench_graphs", None)
    assert len(calls) == warmup + 3 and len(times) == 3
    assert all(19.0 <= t < 1000.0 for t in times)  # 20 ms sleeps, in milliseconds


def test_the_targets_table_binds_each_target_and_ceiling_to_its_model():
    """The GPU targets and the ceilings measured before (BENCHMARKS.md: resnet32 >= 2.0x / 0.9x / 2.5x / 1.2x,
    vgg19_bn >= 2.0x / 1.1x / 3.0x / 1.5x against the dense eager / graphed step, ceilings 3.3x and 1.27x, 4.3x and
    1.66x; resnet50 1.15x / 1.15x / 1.6x / 1.6x, ceilings 1.7x and 1.65x), each in its own model's column; the step
    times of vgg19_bn are those BENCHMARKS.md records."""
    tool = _tool("bench_graphs")
    try:
        rows = [{"model": "resnet32", "dense_eager_ms": 12.0, "dense_graphed_ms": 6.0, "search_graphed_ms": 8.0,
                 "narrow_graphed_ms": 4.0},
                {"model": "vgg19_bn", "dense_eager_ms": 7.25, "dense_graphed_ms": 3.55, "search_graphed_ms": 5.92,
                 "narrow_graphed_ms": 3.47},
                {"model": "resnet50", "dense_eager_ms": 10.0, "dense_graphed_ms": 8.0, "search_graphed_ms": 8.0,
                 "narrow_graphed_ms": 5.0}]
        lines = tool.targets_table(rows).splitlines()
    finally:
        sys.modules.pop("bench_graphs", None)
    assert lines[0] == "| speedup (dense step time / step time) | resnet32 | vgg19_bn | resnet50 |"
    assert lines[2:] == [
        ("| search / dense eager | 1.50x (target 2.00x, ceiling 2.47x) | 1.22x (target 2.00x, ceiling 3.22x) "
         "| 1.25x (target 1.15x, ceiling 1.27x) |"),
        ("| search / dense graphed | 0.75x (target 0.90x, ceiling 0.95x) | 0.60x (target 1.10x, ceiling 1.24x) "
         "| 1.00x (target 1.15x, ceiling 1.24x) |"),
        ("| narrow finetune / dense eager | 3.00x (target 2.50x, ceiling 3.30x) | 2.09x (target 3.00x, ceiling 4.30x) "
         "| 2.00x (target 1.60x, ceiling 1.70x) |"),
        ("| narrow finetune / dense graphed | 1.50x (target 1.20x, ceiling 1.27x) "
         "| 1.02x (target 1.50x, ceiling 1.66x) | 1.60x (target 1.60x, ceiling 1.65x) |"),
    ]


def test_e2e_runs_overrides_give_the_short_search_and_its_dense_twin():
    """A sparse run: one warm-up epoch, a two-epoch anneal, ``--finetune-epochs``; its twin: ``method=dense`` for the
    search plus finetune epochs; bf16 and graphs on CUDA only; ``--set`` last, so that it wins."""
    import argparse

    tool = _tool("e2e_runs")
    model = tool.ModelRun.parse("vgg19_bn:32:512:4")
    for device, amp, graphs in (("cuda", "bf16", "true"), ("cpu", "none", "false")):
        args = argparse.Namespace(device=device, seed=3, batch_size=64, epochs=6, finetune_epochs=2,
                                  set=["optim.lr=0.3"])
        sparse, dense = tool.overrides(model, args, dense=False), tool.overrides(model, args, dense=True)
        for run in (sparse, dense):
            assert {f"device={device}", f"amp={amp}", f"cuda_graphs={graphs}", "channels_last=true", "seed=3",
                    "model.name=vgg19_bn", "data.image_size=32", "data.train_size=512", "data.workers=4",
                    "data.batch_size=64"} <= set(run)
            assert run[-1] == "optim.lr=0.3"
        assert {"optim.epochs=6", "sparsity.warmup_epochs=1", "sparsity.anneal_epochs=2",
                "finetune.epochs=2"} <= set(sparse) and not any(o.startswith("method=") for o in sparse)
        assert {"method=dense", "optim.epochs=8"} <= set(dense)
        assert not any(o.startswith(("sparsity.", "finetune.")) for o in dense)
    assert tool.ModelRun.parse("resnet20:16:128") == tool.ModelRun("resnet20", 16, 128, 0)  # no loader processes


def test_e2e_runs_finish_kills_a_run_past_its_timeout_counted_from_its_start(tmp_path):
    """``--timeout`` counts from the run's launch (not from the wait): a run that has had 10 of its 11 seconds gets
    about one more, is killed and recorded as ``timeout``; a run that fails keeps its summary's fields out."""
    tool = _tool("e2e_runs")
    began = time.perf_counter()
    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    row = tool.finish(slow, tmp_path / "slow", time.perf_counter() - 10.0, 11.0)
    assert row["exit_status"] == "timeout" and slow.returncode is not None
    assert time.perf_counter() - began < 8.0 and 10.0 < row["seconds"] < 18.0
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"accuracy": 61.5, "measured_speedup": 1.3, "other": 1}))
    done = tool.finish(subprocess.Popen([sys.executable, "-c", "pass"]), out, time.perf_counter(), 30.0)
    assert done["exit_status"] == 0 and done["accuracy"] == 61.5 and done["measured_speedup"] == 1.3
    assert set(done) == {"exit_status", "seconds", "run", *tool.FIELDS}
    failed = tool.finish(subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]), out, time.perf_counter(),
                         30.0)
    assert failed["exit_status"] == 3 and "accuracy" not in failed


def test_e2e_runs_table_puts_each_value_in_its_column_beside_its_model_s_target():
    tool = _tool("e2e_runs")
    rows = {"resnet32_32px": {"model": "resnet32",
                              "vrpge": {"accuracy": 71.25, "measured_speedup": 1.234,
                                        "measured_speedup_iqr": [1.1, 1.4],
                                        "train_cost_saving": 1.9, "seconds": 40.0,
                                        "static_steps": {"search_windows": 3, "graph_captures": 5,
                                                         "warmup_capture_s": 2.25}},
                              "dense": {"accuracy": 80.0, "seconds": 30.5}},
            "vgg19_bn_32px": {"model": "vgg19_bn", "vrpge": {"exit_status": "timeout"}, "dense": {}},
            "resnet50_224px": {"model": "resnet50", "vrpge": {}},
            "resnet20_16px": {"model": "resnet20", "vrpge": {}}}
    lines = tool.table(rows).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = {line.split("|")[1].strip(): dict(zip(header, [c.strip() for c in line.strip("|").split("|")]))
             for line in lines[2:]}
    assert cells["resnet32_32px"] == {
        "model": "resnet32_32px", "sparse top-1 %": "71.2", "dense twin top-1 %": "80.0",
        "measured speedup (IQR)": "1.23x (1.10-1.40)", "target": ">= 1.00x", "train-cost saving": "1.90x",
        "capacity windows": "3", "captures": "5", "their warm-up and capture s": "2.2", "sparse run s": "40.0",
        "dense run s (concurrent)": "30.5"}
    assert [cells[tag]["target"] for tag in ("vgg19_bn_32px", "resnet50_224px", "resnet20_16px")] == [
        ">= 1.20x", ">= 1.15x", "-"]
    assert cells["vgg19_bn_32px"]["sparse top-1 %"] == "-" and cells["vgg19_bn_32px"]["measured speedup (IQR)"] == "-"


def test_e2e_runs_time_the_sparse_runs_alone_and_fail_when_any_run_fails(tmp_path, monkeypatch):
    """The sparse runs go one after the other (each finished before the next starts: their speedups are timings),
    then the dense twins all at once; the exit status is 1 when any run of either kind did not exit 0."""
    tool = _tool("e2e_runs")
    events = []
    for failing in (None, ("resnet20_16px", "dense"), ("resnet32_16px", "vrpge")):
        events.clear()

        def launch(model, args, dense):
            kind = "dense" if dense else "vrpge"
            events.append(("launch", model.tag, kind))
            return (model.tag, kind), tmp_path / f"{model.tag}_{kind}", 0.0

        def finish(started, out, start, timeout, failing=failing):
            events.append(("finish", *started))
            return {"exit_status": 1 if started == failing else 0, "seconds": 1.0, "run": out.name}

        monkeypatch.setattr(tool, "launch", launch)
        monkeypatch.setattr(tool, "finish", finish)
        status = tool.main(["--out", str(tmp_path / "o"), "--models", "resnet20:16:64", "resnet32:16:64"])
        assert status == (0 if failing is None else 1), failing
        assert events == [("launch", "resnet20_16px", "vrpge"), ("finish", "resnet20_16px", "vrpge"),
                          ("launch", "resnet32_16px", "vrpge"), ("finish", "resnet32_16px", "vrpge"),
                          ("launch", "resnet20_16px", "dense"), ("launch", "resnet32_16px", "dense"),
                          ("finish", "resnet20_16px", "dense"), ("finish", "resnet32_16px", "dense")]
        saved = json.loads((tmp_path / "o" / "e2e.json").read_text())
        assert {tag: {kind: r["exit_status"] for kind, r in pair.items() if kind != "model"}
                for tag, pair in saved.items()} == {
            tag: {kind: 1 if (tag, kind) == failing else 0 for kind in ("vrpge", "dense")}
            for tag in ("resnet20_16px", "resnet32_16px")}


def test_isolated_tests_fail_on_a_timeout_alone_and_give_each_child_its_threads(tmp_path):
    """A test past ``--timeout`` fails the run even when nothing else fails; each child gets ``--threads`` as its
    OMP_NUM_THREADS."""
    tool = _tool("isolated_tests")
    (tmp_path / "test_slow.py").write_text("import os, time\ndef test_threads():\n"
                                           "    assert os.environ['OMP_NUM_THREADS'] == '3'\n"
                                           "def test_hangs():\n    time.sleep(60)\n")
    out = tmp_path / "out.json"
    began = time.perf_counter()
    # 6 s: a child pytest that starts slowly on a busy machine must still finish test_threads in time
    assert tool.main([str(tmp_path / "test_slow.py"), "--jobs", "2", "--timeout", "6", "--threads", "3", "--json",
                      str(out)]) == 1
    assert time.perf_counter() - began < 40
    result = json.loads(out.read_text())
    assert {r["node"].split("::")[1]: r["outcome"] for r in result["tests"]} == {"test_threads": "passed",
                                                                                "test_hangs": "timeout"}
    assert result["counts"] == {"passed": 1, "skipped": 0, "failed": 0, "timeout": 1, "stopped": 0}


def test_isolated_tests_collect_nothing_from_a_file_without_tests(tmp_path):
    tool = _tool("isolated_tests")
    (tmp_path / "test_none.py").write_text("x = 1\n")
    assert tool.collect(str(tmp_path / "test_none.py")) == []
    assert tool.main([str(tmp_path / "test_none.py"), "--json", str(tmp_path / "out.json")]) == 0
    written = json.loads((tmp_path / "out.json").read_text())  # the GPU check reads it: written even so
    assert (written["tests_collected"], written["tests"]) == (0, [])
