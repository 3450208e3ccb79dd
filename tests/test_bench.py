"""The step benchmark runs, reports every configuration, and its ideal ratio follows the analytic FLOPs."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import load_tool

import maskprop
from maskprop.bench import (
    bench_model,
    format_table,
    interleaved_times,
    mask_pair,
    quartiles,
    random_batch,
    saved_for_backward_mb,
    training_steps,
)
from maskprop.cli import main


def test_bench_model_reports_all_configurations():
    results = bench_model("resnet20", batch_size=4, keep_ratios=(1.0, 0.5), repeats=1, warmup=0, image_size=16)
    assert [r.keep_ratio for r in results] == [1.0, 0.5]
    assert all(r.dense_s > 0 and r.masked_s > 0 and r.compact_s > 0 for r in results)
    # keep 1.0: compact does 3 + 1 forward-equivalents of the dense work against dense's 3.
    assert results[0].ideal == pytest.approx(0.75)
    assert 2.5 < results[1].ideal < 3.5  # 3 f_D / (4 f_S) with f_S ~ f_D / 4
    assert results[1].compact_peak_mb is None  # the allocator's peak is measured on CUDA only
    table = format_table(results)
    assert table.count("\n") == 3 and "| resnet20 | 4 | 0.50 |" in table
    assert "saved for backward MB" in table


def test_interleaved_times_runs_every_step_once_per_repetition_in_turn():
    calls = []
    times = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2, warmup=1,
                              after_repetition=lambda done: calls.append(done))
    assert calls == ["a", "b", 1, "a", "b", 2, "a", "b", 3]
    assert [len(v) for v in times.values()] == [2, 2] and all(t >= 0 for v in times.values() for t in v)


def test_quartiles_are_numpys_linear_percentiles():
    rng = np.random.default_rng(0)
    for n in (2, 5, 6, 8):
        values = rng.lognormal(size=n).tolist()
        assert quartiles(values) == pytest.approx(tuple(np.percentile(values, [25, 50, 75])))
    assert quartiles([3.0]) == (3.0, 3.0, 3.0)


def test_speedups_are_medians_of_ratios_paired_within_a_repetition(monkeypatch):
    """Step times set by hand: a repetition's dense time is the median over the keep ratios; the speedup and its
    quartiles are those of dense / compact per repetition, vs masked the median of masked / compact; the ideal is
    3 f_D / (3 f(m) + f(m')) of the step's two masks."""
    import maskprop.bench
    from maskprop.cost import CostModel

    ratios, repeats = (0.75, 0.5, 0.25), 5
    rng = np.random.default_rng(1)
    drawn = {(rho, name): rng.lognormal(size=repeats).tolist() for rho in ratios
             for name in ("dense", "masked", "compact")}
    calls = []

    def fake_times(steps, repeats_, warmup, *args, **kwargs):
        calls.append((sorted(steps, key=str), repeats_, warmup))
        return {key: list(drawn[key]) for key in steps}

    monkeypatch.setattr(maskprop.bench, "interleaved_times", fake_times)
    results = bench_model("resnet20", batch_size=2, keep_ratios=ratios, repeats=repeats, warmup=3, image_size=8,
                          masks="sampled", seed=4)
    assert calls == [(sorted(drawn, key=str), repeats, 3)]
    dense = np.median([drawn[(rho, "dense")] for rho in ratios], axis=0)  # per repetition
    model = maskprop.create_model("resnet20", num_classes=10)
    cost, generator = CostModel(model, (3, 8, 8)), torch.Generator().manual_seed(4)
    table = format_table(results).splitlines()[2:]
    for r, rho, line in zip(results, ratios, table):
        masked, compact = np.array(drawn[(rho, "masked")]), np.array(drawn[(rho, "compact")])
        low, median, high = np.percentile(dense / compact, [25, 50, 75])
        assert r.keep_ratio == rho
        assert (r.dense_s, r.masked_s, r.compact_s) == pytest.approx((np.median(dense), np.median(masked),
                                                                      np.median(compact)))
        assert (r.speedup_vs_dense, *r.speedup_iqr) == pytest.approx((median, low, high))
        assert r.speedup_vs_masked == pytest.approx(np.median(masked / compact))
        pair = mask_pair(model.channel_groups(), rho, generator, "sampled")
        ideal = 3 * cost.flops() / (3 * cost.flops(pair["m"]) + cost.flops(pair["m2"]))
        assert r.ideal == pytest.approx(ideal) and r.efficiency == pytest.approx(median / ideal)
        assert f"| {median:.2f}x ({low:.2f}-{high:.2f}) | {ideal:.2f}x | {median / ideal:.0%} |" in line


def test_sampled_masks_keep_each_channel_with_the_keep_probability():
    groups = maskprop.create_model("resnet20").channel_groups()
    channels = 2 * sum(groups.values())  # two masks
    for keep in (0.25, 0.75):
        pair = mask_pair(groups, keep, torch.Generator().manual_seed(0), "sampled")
        kept = sum(int(m.sum()) for mask in pair.values() for m in mask.values())
        assert kept / channels == pytest.approx(keep, abs=4 * (keep * (1 - keep) / channels) ** 0.5)


def test_the_compact_step_runs_its_second_forward_without_autograd():
    torch.manual_seed(0)
    model = maskprop.create_model("resnet20").train()
    x, y = random_batch(2, 8)
    grad_enabled = []
    model.register_forward_pre_hook(lambda module, inputs: grad_enabled.append(torch.is_grad_enabled()))
    steps = training_steps(model, x, y, mask_pair(model.channel_groups(), 0.5, torch.Generator().manual_seed(0)))
    for name, expected in (("dense", [True]), ("masked", [True, True]), ("compact", [True, False])):
        grad_enabled.clear()
        steps[name]()
        assert grad_enabled == expected, name


def test_cuda_steps_are_timed_in_seconds_between_events(monkeypatch):
    """CUDA events measure milliseconds; the step times are seconds (no GPU needed: the events are stand-ins)."""
    from maskprop.bench import _timed

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return 250.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    assert _timed(lambda: None, torch.device("cuda")) == 0.25


def test_the_training_steps_run_on_meta_for_counting_operators():
    # tools/count_ops.py counts a CUDA step's operators on meta: no arithmetic, and no autocast without amp.
    torch.manual_seed(0)
    model = maskprop.create_model("resnet20").to("meta").train()
    x, y = random_batch(2, 4, device="meta")
    steps = training_steps(model, x, y, mask_pair(model.channel_groups(), 0.5, torch.Generator().manual_seed(0)))
    for step in steps.values():
        step()
    assert all(p.grad is not None and p.grad.is_meta for p in model.parameters() if p.requires_grad)


def test_saved_for_backward_counts_each_storage_once_and_skips_excluded():
    a = torch.randn(64, 32, requires_grad=True)  # 8 KiB
    b = torch.randn(64, 32, requires_grad=True)
    kib = 2.0**-10
    assert saved_for_backward_mb(lambda: (a * b).sum()) == pytest.approx(16 * kib)  # mul saves both operands
    assert saved_for_backward_mb(lambda: (a * b).sum(), exclude=[a]) == pytest.approx(8 * kib)
    assert saved_for_backward_mb(lambda: (a[:32] * a[32:]).sum()) == pytest.approx(8 * kib)  # two views, one storage
    assert saved_for_backward_mb(lambda: (a + b).sum()) == 0.0  # an add saves nothing
    with torch.no_grad():
        assert saved_for_backward_mb(lambda: (a * b).sum()) == 0.0


def test_saved_activations_follow_the_kept_channels():
    """Dense and masked keep full activations for the backward; compact keeps those of the kept channels."""
    results = bench_model("resnet20", batch_size=32, keep_ratios=(1.0, 0.5, 0.25), repeats=1, warmup=0)
    full, half, quarter = results
    assert full.compact_saved_mb == pytest.approx(full.dense_saved_mb)  # an all-kept mask runs the dense kernels
    for r in results:
        assert r.masked_saved_mb >= r.dense_saved_mb * 0.99
    # Activations are linear in the kept channels; what is not (the input image, the logits, the gathered weights
    # the backward needs) is a few percent at batch 32 of 32x32 images.
    assert half.compact_saved_mb / full.dense_saved_mb == pytest.approx(0.5, abs=0.03)
    assert quarter.compact_saved_mb / full.dense_saved_mb == pytest.approx(0.25, abs=0.03)


def test_bench_sampled_masks_vary_widths_and_bad_choice_is_an_error():
    exact = bench_model("resnet20", batch_size=2, keep_ratios=(0.5,), repeats=1, warmup=0, image_size=16)
    sampled = bench_model("resnet20", batch_size=2, keep_ratios=(0.5,), repeats=1, warmup=0, image_size=16,
                          masks="sampled")
    assert 1.5 < sampled[0].ideal < 6.0 and sampled[0].ideal != pytest.approx(exact[0].ideal)
    with pytest.raises(ValueError, match="masks='bernoulli'; expected 'exact' or 'sampled'"):
        bench_model("resnet20", batch_size=2, keep_ratios=(0.5,), repeats=1, warmup=0, masks="bernoulli")


def _machine_load(monkeypatch, others: float, cores: int = 2) -> None:
    """``maskprop bench``'s readings of the load: ``others`` of ``cores`` busy with other processes."""
    import maskprop.threads
    from maskprop.threads import CpuReading

    readings = iter([CpuReading(0.0, 0.0, 0.0), CpuReading(10.0, 10.0 * others + 3.0, 3.0)])
    monkeypatch.setattr(maskprop.threads, "read_cpu", lambda: next(readings))
    monkeypatch.setattr(maskprop.threads, "allowed_cores", lambda: cores)


BENCH_TINY = ["bench", "--models", "resnet20", "--batch-size", "2", "--keep-ratios", "0.5", "--repeats", "1",
              "--warmup", "0", "--image-size", "16"]


def test_bench_cli_writes_json(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench.json"
    _machine_load(monkeypatch, 0.1)
    assert main([*BENCH_TINY, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| resnet20 | 2 | 0.50 |" in printed and "note:" not in printed
    assert " | other processes kept 0.1 of 2 cores busy | " in printed.splitlines()[0]
    rows = json.loads(out.read_text())
    assert rows[0]["model"] == "resnet20" and rows[0]["speedup_vs_dense"] > 0
    assert rows[0]["cores_busy_by_others"] == pytest.approx(0.1)


@pytest.mark.parametrize(("threads", "others", "note"), [
    (2, 1.0, "note: 2 threads beside other processes wait for each other at every operation, the compact steps "
             "most, so these ratios understate the saving; measure on a quiet machine or with --threads 1"),
    (1, 1.0, None),  # one thread beside one busy process: nothing to say
    (2, 0.1, None),  # a quiet machine
])
def test_bench_cli_says_when_the_machine_was_busy(capsys, monkeypatch, threads, others, note):
    before = torch.get_num_threads()
    try:
        _machine_load(monkeypatch, others)
        assert main([*BENCH_TINY, "--threads", str(threads)]) == 0
    finally:
        torch.set_num_threads(before)
    printed = capsys.readouterr().out
    assert f" | other processes kept {others:.1f} of 2 cores busy | " in printed.splitlines()[0]
    assert (printed.splitlines()[-1] == note) if note else "note:" not in printed


@pytest.mark.parametrize(("threads", "note"), [
    (4, "note: 4 threads beside other processes wait for each other at every operation, the compact steps most, so "
        "these ratios understate the saving; measure on a quiet machine or with --threads 3"),
    (3, None),  # what the note would advise: of 4 cores, 1.1 busy leaves 3 free (a core busy at most BUSY_SLACK)
])
def test_bench_cli_notes_only_more_threads_than_it_advises(capsys, monkeypatch, threads, note):
    _machine_load(monkeypatch, 1.1, cores=4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # not set: more threads than cores crash here
    assert main(BENCH_TINY) == 0
    printed = capsys.readouterr().out
    assert (printed.splitlines()[-1] == note) if note else "note:" not in printed


def test_bench_cli_on_cuda_says_the_trainer_runs_other_steps(capsys, monkeypatch):
    """On CUDA the trainer runs static-shape (graphed) steps, not the eager steps ``maskprop bench`` times: the
    output says so and where those are timed."""
    import maskprop.bench
    from maskprop.cli import TRAINER_STEPS_ON_CUDA

    monkeypatch.setattr(maskprop.bench, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(maskprop.bench, "describe_machine", lambda device: "a GPU")
    monkeypatch.setattr(maskprop.bench, "bench_model", lambda *args, **kwargs: [])
    assert main(["bench", "--models", "resnet20", "--device", "cuda", "--repeats", "1", "--warmup", "0"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == TRAINER_STEPS_ON_CUDA
    assert "tools/bench_graphs.py" in TRAINER_STEPS_ON_CUDA


def test_bench_cli_unknown_model(capsys):
    assert main(["bench", "--models", "resnet99", "--repeats", "1", "--warmup", "0"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet99'" in err and err.strip().endswith(
        "(a network of your own: --module names the module that registers it)")  # as train's model.module hint



def test_bench_of_a_vision_transformer_at_another_image_size_says_which_to_give(capsys):
    """timm's ViT-Tiny is built for 224 x 224 and the bench times 32 x 32 by default: the line said only "expected the
    (C, H, W) it was built for"; now it names the option and the way to another size."""
    pytest.importorskip("timm")
    assert main(["bench", "--models", "timm:vit_tiny_patch16_224", "--repeats", "1", "--warmup", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0] == (
        "maskprop bench: error: model 'timm:vit_tiny_patch16_224' does not take 32 x 32 images (Input height (32) "
        "doesn't match model (224).); expected the image size it is built for (--image-size) (timm's and "
        "torchvision's vision transformers are built for one size, 224 unless a module of your own builds them for "
        "another: --module examples.converted_nets --models timm_vit_tiny takes 32)")


@pytest.mark.parametrize("threads, words", [(1, ", 1 thread, torch "), (2, ", 2 threads, torch ")])
def test_the_header_counts_threads_in_words(threads, words):
    """The header said "1 threads"."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert words in maskprop.bench.describe_machine("cpu")
    finally:
        torch.set_num_threads(before)

_FAULTS = """
import resource, sys, torch, torch.nn.functional as F
from maskprop import keep_freed_host_memory
applied = keep_freed_host_memory() if sys.argv[1] == "keep" else None
import maskprop
torch.set_num_threads(2)
torch.manual_seed(0)
model = maskprop.create_model("resnet20", num_classes=10, width=2).train()
x = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (64,))
faults = []
for step in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sum(faults[2:]))
"""


def _child(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    result = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, timeout=300,
                            env={**clean, **env})
    assert result.returncode == 0, result.stderr[-500:]
    applied, faults = result.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc only")
def test_keep_freed_host_memory_stops_the_page_faults_of_later_steps():
    """glibc's defaults return a training step's freed activations to the kernel and fault them back in next step
    (tens of thousands of minor faults a step here); with ``keep_freed_host_memory`` the steps after the first two
    reuse what the heap kept (0-7,000 pages in steps 3-6 against 90,000-130,000). Each run in a fresh process, since
    the setting is process-wide."""
    applied, kept = _child("keep")
    _, default = _child("default")
    assert applied == "True"
    assert default > 8192, f"the control run faulted only {default} pages: this workload no longer tests anything"
    # About zero in most runs; a few thousand pages at times (thread arenas), still an order of magnitude below.
    assert kept * 5 < default, (kept, default)


def test_keep_freed_host_memory_leaves_user_malloc_settings_alone():
    applied, _ = _child("keep", MALLOC_ARENA_MAX="2")
    assert applied == "False"


def test_the_onednn_primitive_cache_is_enlarged_unless_the_user_sized_it(monkeypatch, capsys):
    """``maskprop bench`` (and ``train``) set oneDNN's kernel cache before any convolution runs; a capacity the user
    gave, under either of oneDNN's names, stays."""
    from maskprop import enlarge_onednn_primitive_cache
    from maskprop._workarounds import ONEDNN_PRIMITIVE_CACHE

    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY"):
        monkeypatch.delenv(name, raising=False)
    assert _bench_cli(capsys)[0] == 0
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(ONEDNN_PRIMITIVE_CACHE) == "16384"
    assert not enlarge_onednn_primitive_cache()  # already set: left as it is
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    assert not enlarge_onednn_primitive_cache(4096) and os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    monkeypatch.setenv("DNNL_PRIMITIVE_CACHE_CAPACITY", "128")
    assert not enlarge_onednn_primitive_cache() and "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ
    monkeypatch.delenv("DNNL_PRIMITIVE_CACHE_CAPACITY")
    assert enlarge_onednn_primitive_cache(4096) and os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "4096"


def test_bench_runs_with_bf16_autocast_on_cpu():
    """The autocast path of the bench (what `--device cuda --amp bf16` takes), here on the CPU."""
    results = bench_model("resnet20", batch_size=4, keep_ratios=(0.5,), repeats=1, warmup=0, image_size=16, amp="bf16")
    assert results[0].compact_s > 0 and 0 < results[0].compact_saved_mb < results[0].dense_saved_mb


# --- bad input: one line, exit status 2, before any benchmark runs ---------------------------------------------------


def _bench_cli(capsys, *extra: str) -> tuple[int, str]:
    """Exit status and stderr of a small ``maskprop bench`` run (argparse's usage errors exit through SystemExit)."""
    try:
        code = main(["bench", "--models", "resnet20", "--batch-size", "2", "--keep-ratios", "0.5", "--repeats", "1",
                     "--warmup", "0", "--image-size", "16", *extra])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def test_bench_negative_threads_is_a_usage_error(capsys):
    code, err = _bench_cli(capsys, "--threads", "-1")
    assert code == 2 and "expected an integer >= 0" in err and "Traceback" not in err


def test_bench_cuda_without_a_gpu_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = _bench_cli(capsys, "--device", "cuda")
    assert code == 2 and err.strip().splitlines() == [
        "maskprop bench: error: device='cuda': CUDA is not available on this machine; use --device cpu"]


@pytest.mark.parametrize("option, value, message", [
    ("--batch-size", "0", "--batch-size 0 must be >= 1 (a step needs examples)"),
    ("--repeats", "0", "--repeats 0 must be >= 1"),
    ("--keep-ratios", "1.5", "--keep-ratios [1.5]; expected one or more fractions in (0, 1]"),
])
def test_bench_settings_out_of_range_are_one_line_naming_the_option(capsys, option, value, message):
    code, err = _bench_cli(capsys, option, value)
    assert code == 2 and err.strip().splitlines() == [f"maskprop bench: error: {message}"]


def test_bench_json_into_a_missing_directory_fails_before_running(tmp_path, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr("maskprop.bench.bench_model", lambda *a, **k: ran.append(1) or [])
    code, err = _bench_cli(capsys, "--json", str(tmp_path / "missing" / "bench.json"))
    assert code == 2 and "does not exist" in err and not ran
    assert not (tmp_path / "missing").exists()


def test_bench_align_pads_and_is_recorded():
    results = bench_model("resnet20", batch_size=2, keep_ratios=(0.5,), repeats=1, warmup=0, image_size=16, align=8)
    assert results[0].align == 8 and results[0].compact_s > 0
    with pytest.raises(ValueError, match="align=0 is not a positive integer"):
        bench_model("resnet20", batch_size=2, keep_ratios=(0.5,), repeats=1, warmup=0, align=0)


def test_bench_defaults_are_the_commands():
    """``bench_model`` and ``maskprop bench`` run the same measurement unless told otherwise; on the CPU kept widths
    are not padded."""
    import inspect

    from maskprop.bench import default_align
    from maskprop.cli import build_parser

    args = build_parser().parse_args(["bench"])
    defaults = inspect.signature(bench_model).parameters
    for name in ("repeats", "warmup", "batch_size", "image_size", "seed"):
        assert defaults[name].default == getattr(args, name), name
    assert (default_align(torch.device("cpu")), default_align(torch.device("cuda"))) == (1, 8)


def _count_ops_tool():
    return load_tool("count_ops")


def test_count_ops_splits_device_operators_from_host_ones_and_leaves_views_out():
    tool = _count_ops_tool()
    on_meta, on_host = torch.empty(3, device="meta"), torch.ones(3)
    total, compute, host = tool.device_ops(lambda: ((on_meta + 1).view(3), on_host * 2), "meta")
    assert (total, dict(compute), dict(host)) == (3, {"add": 1}, {"mul": 1})


def test_count_ops_top_level_calls_include_the_backward_s_and_not_the_nested_ones():
    """The calls autograd's backward nodes make are top-level calls too (their parent is the node, not an operator);
    the calls an operator makes from inside (``linear``'s ``matmul``, ``mm``'s ``resolve_conj``) are not."""
    tool = _count_ops_tool()
    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(2, 3)
    calls = tool.top_level_calls(lambda: torch.nn.functional.linear(x, w).sum().backward())
    assert calls["linear"] == 1 and calls["sum"] == 1 and calls["mm"] == 1  # the mm of linear's backward
    assert "matmul" not in calls and "resolve_conj" not in calls and "transpose" not in calls


def test_count_ops_rows_give_median_times_and_ratios_to_the_dense_step(tmp_path, monkeypatch):
    """``tools/count_ops.py``: each step's time is the median of its repetitions in milliseconds, and every ``_ratio``
    is the step's count or time over the dense step's."""
    tool = _count_ops_tool()
    seconds = {"dense": [0.001, 0.002, 0.5], "compact": [0.001, 0.003, 0.9]}  # medians 2 and 3 ms, means far above
    monkeypatch.setattr(tool, "interleaved_times", lambda fns, repeats, device: {k: seconds[k] for k in fns})
    out = tmp_path / "counts.json"
    monkeypatch.setattr(sys, "argv", ["count_ops.py", "--models", "resnet20", "--devices", "cpu", "--repeats", "3",
                                      "--json", str(out)])
    tool.main()
    rows = {r["step"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"dense", "compact"} and rows["dense"]["image"] == 4
    assert rows["dense"]["time_ms"] == pytest.approx(2.0) and rows["compact"]["time_ms"] == pytest.approx(3.0)
    for step, row in rows.items():
        assert row["compute"] == sum(row["compute_ops"].values()) and 0 < row["compute"] < row["operators"]
        for key in ("calls", "operators", "compute", "time_ms"):
            assert row[f"{key}_ratio"] == pytest.approx(row[key] / rows["dense"][key]), (step, key)
    assert rows["compact"]["time_ms_ratio"] == pytest.approx(1.5)
    assert [tool.smallest_input(n) for n in ("resnet32", "vgg19_bn", "resnet50")] == [4, 32, 32]


def test_keep_freed_host_memory_leaves_glibc_malloc_tunables_alone(monkeypatch):
    """A ``glibc.malloc.*`` tunable in GLIBC_TUNABLES is the user's choice as a ``MALLOC_*`` variable is: nothing is
    set (returns before any mallopt call, so safe in this process)."""
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072")
    assert maskprop.keep_freed_host_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="linux only")
def test_keep_freed_host_memory_sets_the_mmap_threshold_first_then_trim_and_top_pad(monkeypatch):
    """The mallopt calls, against glibc's malloc.h (M_TRIM_THRESHOLD -1, M_TOP_PAD -2, M_MMAP_THRESHOLD -3): the mmap
    threshold fixed at 32 MiB first, no trimming, the heap grown in ``top_pad`` steps; recorded by a stand-in libc."""
    import ctypes

    calls = []

    class Libc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1

    for key in [k for k in os.environ if k.startswith("MALLOC_")] + ["GLIBC_TUNABLES"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    assert maskprop.keep_freed_host_memory(top_pad=1 << 20) is True
    assert calls == [(-3, 32 * 2**20), (-1, 2**62), (-2, 2**20)]


def test_bench_json_naming_a_directory_or_below_a_file_fails_before_running(tmp_path, capsys, monkeypatch):
    """``--json DIR`` ran the whole benchmark, then failed on writing (exit status 1, naming a temp file); ``--json
    FILE/x.json`` called the file a directory that does not exist. Both are one line, exit status 2, before any
    model runs."""
    ran = []
    monkeypatch.setattr("maskprop.bench.bench_model", lambda *a, **k: ran.append(1) or [])
    code, err = _bench_cli(capsys, "--json", str(tmp_path))
    assert code == 2 and err.strip().splitlines() == [
        f"maskprop bench: error: --json {tmp_path} is a directory; expected the path of a file to write the rows to "
        f"(e.g. {tmp_path / 'bench.json'})"]
    blocker = tmp_path / "afile"
    blocker.write_text("")
    code, err = _bench_cli(capsys, "--json", str(blocker / "bench.json"))
    assert code == 2 and err.strip().splitlines() == [
        f"maskprop bench: error: --json {blocker / 'bench.json'}: '{blocker}' is a file, not a directory"]
    assert not ran and [p.name for p in tmp_path.iterdir()] == ["afile"]
