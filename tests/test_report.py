"""``maskprop report``: rows equal to the summaries, the written files and plots, the summary schema, and bad input."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_RUN, with_overrides

import maskprop
from maskprop.cli import _final_table, main
from maskprop.report import (
    _NOTES,
    COLUMNS,
    REPORT_PLOTS,
    _csv,
    build_report,
    find_runs,
    format_table,
    make_plots,
    write_report,
)
from maskprop.train.summary import SCHEMA_VERSION, RunSummary, data_identity, read_summary

pytestmark = pytest.mark.usefixtures("one_thread")

# Runs of a second or two: ResNet-20 on 8x8 shapes, 2 steps per epoch.
TINY = with_overrides(TINY_RUN, **{"data.train_size": 32, "data.val_size": 16, "data.image_size": 8,
                                   "data.batch_size": 16, "sparsity.fix_examples": 16, "sparsity.fix_samples": 2})
PNG = b"\x89PNG\r\n\x1a\n"


def tiny(**overrides) -> dict:
    return with_overrides(TINY, **overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A folder with a real dense run (search + finetune epochs) and a real VR-PGE run of the same model and data."""
    root = tmp_path_factory.mktemp("runs")
    maskprop.fit(tiny(method="dense", **{"optim.epochs": 3}), out=root / "dense")
    maskprop.fit(tiny(), out=root / "vrpge")
    return root


def copy_runs(runs: Path, tmp_path: Path, names=("dense", "vrpge")) -> Path:
    folder = tmp_path / "runs"
    for name in names:
        shutil.copytree(runs / name, folder / name, ignore=shutil.ignore_patterns("*.pt", "events.*"))
    return folder


def summary_of(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


def edit_config(path: Path, **overrides) -> None:
    """Change a run directory's config.yaml (dotted keys, as :func:`with_overrides`)."""
    config = yaml.safe_load((path / "config.yaml").read_text())
    (path / "config.yaml").write_text(yaml.safe_dump(with_overrides(config, **overrides)))


def many_runs(runs: Path, tmp_path: Path, count: int) -> Path:
    """A folder of ``count`` copies of the two runs, alternately, under names as long as default run names."""
    folder = tmp_path / "many"
    for i in range(count):
        name = ("dense", "vrpge")[i % 2]
        shutil.copytree(runs / name, folder / f"{i:02d}-{name}-resnet20-shapes-keep0.5-20261205-220000",
                        ignore=shutil.ignore_patterns("*.pt", "events.*"))
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# The table


def test_rows_equal_the_summaries(runs):
    report = build_report([runs])
    rows = {row["run"]: row for row in report.rows}
    assert set(rows) == {"dense", "vrpge"}
    dense, sparse = summary_of(runs / "dense"), summary_of(runs / "vrpge")
    row = rows["vrpge"]
    assert row["accuracy"] == sparse["accuracy"] and row["dense_accuracy"] == dense["accuracy"]
    assert row["accuracy_gap"] == pytest.approx(sparse["accuracy"] - dense["accuracy"])
    assert row["params_kept"] == pytest.approx(100 * sparse["subnet_params"] / sparse["dense_params"])
    assert row["flops_kept"] == pytest.approx(100 * sparse["subnet_flops"] / sparse["dense_flops"])
    assert row["train_cost_saving"] == sparse["train_cost_saving"] > 1
    assert row["measured_speedup"] == sparse["measured_speedup"]
    assert [row["measured_speedup_low"], row["measured_speedup_high"]] == sparse["measured_speedup_iqr"]
    assert row["run_time_s"] == sparse["run_time_s"] and row["status"] == "finished"
    assert (row["method"], row["model"], row["dataset"], row["keep"], row["epochs"]) == ("vrpge", "resnet20",
                                                                                         "shapes", "0.5", "2+1")
    assert row["baseline"] == "dense" and report.baselines == {"vrpge": "dense"}
    summaries = {r.name: r.summary for r in report.runs}
    assert (summaries["vrpge"].dense_accuracy, summaries["vrpge"].dense_baseline) == (dense["accuracy"],
                                                                                     str(runs / "dense"))
    assert rows["dense"]["epochs"] == "3" and rows["dense"]["accuracy_gap"] is None
    assert rows["dense"]["measured_speedup"] == 1.0


def test_a_run_of_several_processes_says_how_many(runs, tmp_path):
    folder = copy_runs(runs, tmp_path)
    summary = summary_of(folder / "vrpge")
    (folder / "vrpge" / "summary.json").write_text(json.dumps({**summary, "world_size": 2}))
    report = build_report([folder])
    rows = {row["run"]: row for row in report.rows}
    assert (rows["vrpge"]["ranks"], rows["dense"]["ranks"]) == (2, 1)
    table = {line.split("|")[1].strip(): line for line in format_table(report.rows).splitlines()[2:]}
    assert " on 2 ranks |" in table["vrpge"] and "ranks" not in table["dense"]
    assert "ranks" in next(csv.reader(io.StringIO(_csv(report.rows))))


def test_a_run_is_compared_with_the_dense_run_of_its_seed_and_settings(runs, tmp_path, caplog):
    folder = copy_runs(runs, tmp_path)
    shutil.copytree(folder / "dense", folder / "a_dense")  # listed first
    edit_config(folder / "a_dense", seed=1)
    (folder / "a_dense" / "summary.json").write_text(json.dumps(dict(summary_of(folder / "a_dense"), accuracy=1.5)))

    def report():
        caplog.clear()
        with caplog.at_level("INFO", logger="maskprop.report"):
            rows = {row["run"]: row for row in build_report([folder]).rows}
        return rows["vrpge"], [(r.levelname, r.getMessage()) for r in caplog.records]

    row, logged = report()  # the seed decides
    assert row["baseline"] == "dense" and row["dense_accuracy"] == summary_of(folder / "dense")["accuracy"]
    assert logged == [("INFO", "vrpge: dense baseline 'dense', the closest of 2 dense runs of resnet20 on shapes (the "
                               "same seed 0; no other setting differs)")]
    lr = yaml.safe_load((folder / "a_dense" / "config.yaml").read_text())["optim"]["lr"]
    edit_config(folder / "a_dense", seed=0, **{"optim.lr": lr * 5})  # the same seed: the settings decide
    row, logged = report()
    assert row["baseline"] == "dense" and [level for level, _ in logged] == ["INFO"]
    edit_config(folder / "dense", seed=2)
    row, logged = report()
    assert row["baseline"] == "a_dense" and row["dense_accuracy"] == 1.5
    assert logged == [("INFO", "vrpge: dense baseline 'a_dense', the closest of 2 dense runs of resnet20 on shapes "
                               "(the same seed 0; 1 other setting differs: optim.lr)")]
    edit_config(folder / "a_dense", seed=1, **{"optim.lr": lr})
    row, logged = report()  # neither of its seed, the same settings: a warning names the one chosen
    assert row["baseline"] == "a_dense"
    assert logged == [("WARNING", "vrpge: the dense runs 'a_dense', 'dense' of resnet20 on shapes are equally close "
                                  "to it (seed 1, the run has 0; no other setting differs); compared with 'a_dense', "
                                  "the first listed (pass --baseline to choose)")]


def test_a_dense_run_of_another_class_count_is_no_baseline(runs, tmp_path):
    """Runs name a dataset read from disk, not its content: a dense run whose network has other parameters (a subset
    of ImageNet's classes, a stand-in) is not the dense twin of a run on the whole, whatever the data's name."""
    folder = copy_runs(runs, tmp_path)
    summary = summary_of(folder / "dense")
    (folder / "dense" / "summary.json").write_text(json.dumps(dict(summary, dense_params=summary["dense_params"] - 65)))
    row = {row["run"]: row for row in build_report([folder]).rows}["vrpge"]
    assert row["baseline"] is None and row["dense_accuracy"] is None


def test_a_dense_runs_own_method_settings_do_not_count_against_it(runs, tmp_path):
    """The sparsity, sbp and finetune sections are the sparse methods' own: a dense run that left other values there
    differs from the run in no setting, and is closer than one of another learning rate."""
    folder = copy_runs(runs, tmp_path)
    shutil.copytree(folder / "dense", folder / "a_dense")  # listed first
    lr = yaml.safe_load((folder / "a_dense" / "config.yaml").read_text())["optim"]["lr"]
    edit_config(folder / "a_dense", **{"optim.lr": lr * 5})
    edit_config(folder / "dense", **{"sparsity.keep_ratio": 0.9, "sparsity.fix_samples": 7, "finetune.epochs": 5,
                                     "sbp.ratio": 0.3})
    row = {row["run"]: row for row in build_report([folder]).rows}["vrpge"]
    assert row["baseline"] == "dense"


def test_a_refused_baseline_names_the_nearest_run_and_counts_what_it_does_not_show(runs, tmp_path):
    folder = copy_runs(runs, tmp_path)
    summary = summary_of(folder / "dense")
    (folder / "dense" / "summary.json").write_text(json.dumps(dict(summary, model="vgg11_bn")))
    shutil.copytree(folder / "vrpge", folder / "vrpge2")  # 6 settings from the baseline; vrpge 1 (the model)
    far = summary_of(folder / "vrpge2")
    data = dict(far["data"], train_size=64, val_size=8, image_size=16, seed=3)
    (folder / "vrpge2" / "summary.json").write_text(json.dumps(dict(far, data=data, model_kwargs={"width": 2})))
    with pytest.raises(ValueError, match=r"it differs from the nearest, 'vrpge', in model vgg11_bn vs resnet20 "
                                         r"\(baseline vs run\)"):
        build_report([folder / "vrpge", folder / "vrpge2"], baseline=folder / "dense")
    with pytest.raises(ValueError) as err:
        build_report([folder / "vrpge2"], baseline=folder / "dense")
    message = str(err.value)
    assert "it differs from the nearest, 'vrpge2', in " in message
    assert message.count(" vs ") == 4 + 1 and "and 2 more (baseline vs run)" in message  # 4 shown of 6


def test_sparse_backward_runs_keep_their_ratio_in_the_backward(runs, tmp_path):
    """The keep column of a sparse-backward run, finished or not, is its sbp.ratio, marked ``backward``."""
    folder = copy_runs(runs, tmp_path, names=("vrpge",))
    finished, stopped = folder / "sbp", folder / "stopped"
    for run in (finished, stopped):
        shutil.copytree(folder / "vrpge", run)
        edit_config(run, method="sbp", **{"sbp.ratio": 0.25})  # sparsity.keep_ratio stays 0.5
    summary = summary_of(finished)
    units = {"conv1": 16, "layer1.0.conv1": 16, "fc": 10}
    kept = {"conv1": 4, "layer1.0.conv1": 4, "fc": 3}
    (finished / "summary.json").write_text(json.dumps(dict(
        summary, method="sbp", keep_ratio=0.25, epochs={"train": 2}, widths={}, group_sizes={},
        sbp={"ratio": 0.25, "units": units, "kept_units": kept})))
    (stopped / "summary.json").unlink()
    report = build_report([folder])
    rows = {row["run"]: row for row in report.rows}
    assert (rows["sbp"]["keep"], rows["sbp"]["epochs"]) == ("0.25 backward", "2")
    assert (rows["stopped"]["keep"], rows["stopped"]["epochs"]) == ("0.25 backward", "2")
    assert rows["vrpge"]["keep"] == "0.5"
    (ax,) = [ax for ax in make_plots(report)["widths.png"].axes if ax.get_title().startswith("sbp ")]
    full, propagated = ax.containers
    assert [bar.get_height() for bar in full] == [16, 16, 10]
    assert [bar.get_height() for bar in propagated] == [4, 4, 3]


def test_the_table_shows_each_number_as_the_notes_say():
    """Hand-made rows: a gap with its sign, the interquartile range low-high and ``!`` for a wide one (not for dense
    runs), ``-`` for what is not a finite number, wall time with a decimal under 10 s."""
    blank = {key: None for key, _, _ in COLUMNS} | {"measured_speedup_low": None, "measured_speedup_high": None,
                                                     "speedup_warning": None, "ranks": 1}
    sparse = dict(blank, run="s", method="vrpge", accuracy=float("nan"), dense_accuracy=90.0, accuracy_gap=1.5,
                  params_kept=25.0, flops_kept=float("inf"), train_cost_saving=2.5, measured_speedup=1.5,
                  measured_speedup_low=1.25, measured_speedup_high=1.75, speedup_warning="wide", run_time_s=9.94)
    dense = dict(blank, run="d", method="dense", accuracy=90.0, accuracy_gap=-2.0, train_cost_saving=1.0,
                 measured_speedup=1.0, measured_speedup_low=0.875, measured_speedup_high=1.125, run_time_s=12.6)
    lines = format_table([sparse, dense]).splitlines()
    headings = [cell.strip() for cell in lines[0].split("|")[1:-1]]
    cells = [dict(zip(headings, (cell.strip() for cell in line.split("|")[1:-1]))) for line in lines[2:]]
    assert {k: cells[0][k] for k in ("top-1 (%)", "dense (%)", "vs dense (pp)", "params kept (%)", "FLOPs kept (%)",
                                     "saving (formula)", "measured speedup", "wall time (s)")} == {
        "top-1 (%)": "-", "dense (%)": "90.00", "vs dense (pp)": "+1.50", "params kept (%)": "25.0",
        "FLOPs kept (%)": "-", "saving (formula)": "2.50x", "measured speedup": "1.50x (1.25-1.75) !",
        "wall time (s)": "9.9"}
    assert (cells[1]["vs dense (pp)"], cells[1]["measured speedup"], cells[1]["wall time (s)"]) == (
        "-2.00", "1.00x", "13")


def test_an_unfinished_run_in_its_finetune_counts_the_finetune_epochs(runs, tmp_path):
    folder = copy_runs(runs, tmp_path, names=("vrpge",))
    (folder / "vrpge" / "summary.json").unlink()
    edit_config(folder / "vrpge", **{"finetune.epochs": 4})  # search: 2
    (row,) = build_report([folder]).rows
    assert row["status"] == "unfinished: finetune epoch 1/4" and row["epochs"] == "2+4"


def test_the_notes_are_true_of_every_kind_of_row():
    notes = {line.split("**")[1]: line for line in _NOTES.replace("\n  ", " ").splitlines()}
    top1, kept = notes["top-1"], notes["params kept"]
    assert "for `vrpge` and `random` the fixed subnetwork after finetuning" in top1
    assert "for `dense` and the sparse-backward methods the full network they trained" in top1
    assert "the fixed subnetwork's for `vrpge` and `random`; 100 for `dense` and the sparse-backward methods" in kept
    assert "the dense reference steps timed for the measured speedup" in notes["keep"].split("**wall time**")[1]


def test_the_command_prints_the_table_and_writes_every_file(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(runs / "dense"), str(runs / "vrpge"), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    sparse = summary_of(runs / "vrpge")
    assert "| vrpge " in stdout and f"{sparse['accuracy']:.2f}" in stdout and f"wrote {out}/" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.md", "report.csv", "report.json",
                                                            *REPORT_PLOTS])
    for name in REPORT_PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG), name
        import matplotlib.image

        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 200 and image.shape[1] > 300, name
    with open(out / "report.csv", newline="") as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    assert float(rows["vrpge"]["measured_speedup"]) == pytest.approx(sparse["measured_speedup"])
    assert float(rows["vrpge"]["accuracy"]) == pytest.approx(sparse["accuracy"])
    payload = json.loads((out / "report.json").read_text())
    assert payload["schema_version"] == SCHEMA_VERSION and len(payload["runs"]) == 2
    assert {r["name"]: r["summary"]["train_cost_saving"] for r in payload["runs"]}["vrpge"] == \
        sparse["train_cost_saving"]
    markdown = (out / "report.md").read_text()
    assert "| vrpge" in markdown and "![accuracy](accuracy.png)" in markdown
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp directory left


def test_the_csv_and_markdown_hold_every_value(runs, tmp_path):
    folder = copy_runs(runs, tmp_path)
    summary = summary_of(folder / "vrpge")
    (folder / "vrpge" / "summary.json").write_text(json.dumps(dict(summary, speedup_warning="a wide spread")))
    report = build_report([folder])
    write_report(report, tmp_path / "out", plots=False)
    with open(tmp_path / "out" / "report.csv", newline="") as f:
        reader = csv.DictReader(f)
        written = {row["run"]: row for row in reader}
    expected = [key for key, _, _ in COLUMNS] + ["measured_speedup_low", "measured_speedup_high", "baseline",
                                                 "speedup_warning", "ranks", "schema_version", "path"]
    assert set(expected) <= set(reader.fieldnames)
    for row in report.rows:
        assert {k: written[row["run"]][k] for k in expected} == {k: "" if row[k] is None else str(row[k])
                                                                 for k in expected}
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "Dense baselines: vrpge vs dense" in markdown.splitlines()
    assert "- vrpge: a wide spread" in markdown.splitlines()


def _marks(figure) -> dict[str, int]:
    """Panels showing each run (an artist with ``gid`` ``run:<name>``), by run name."""
    counts: dict[str, int] = {}
    seen = set()
    for ax in figure.axes:
        for artist in [*ax.lines, *ax.collections, *ax.patches]:
            gid = artist.get_gid()
            if gid and gid.startswith("run:") and (id(ax), gid) not in seen:
                seen.add((id(ax), gid))
                counts[gid[4:]] = counts.get(gid[4:], 0) + 1
    return counts


def test_each_plot_has_one_mark_per_run(runs, tmp_path):
    folder = copy_runs(runs, tmp_path)
    stopped = folder / "stopped"
    shutil.copytree(folder / "vrpge", stopped)
    (stopped / "summary.json").unlink()
    figures = make_plots(build_report([folder]))
    # accuracy: a point per sparse run and the dense run's line, in each of the two panels
    assert _marks(figures["accuracy.png"]) == {"dense": 2, "vrpge": 2}
    assert _marks(figures["speedup.png"]) == {"vrpge": 1}  # dense runs have nothing to compare
    assert _marks(figures["curves.png"]) == {"dense": 2, "vrpge": 3, "stopped": 3}  # loss, accuracy; kept ratio
    assert _marks(figures["widths.png"]) == {"vrpge": 1}  # the pruned runs
    points = [line for ax in figures["accuracy.png"].axes for line in ax.lines if line.get_gid() == "run:vrpge"]
    sparse = summary_of(runs / "vrpge")
    assert points[0].get_xydata().tolist() == [[pytest.approx(100 * sparse["subnet_flops"] / sparse["dense_flops"]),
                                               sparse["accuracy"]]]


def test_the_curves_plot_each_record_at_its_epoch(runs, tmp_path):
    folder = copy_runs(runs, tmp_path)

    def loss_panel():
        figure = make_plots(build_report([folder]))["curves.png"]
        ax = figure.axes[0]
        lines = {line.get_gid(): line for line in ax.lines if line.get_gid()}
        dotted = [line.get_xdata()[0] for line in ax.lines if not line.get_gid()]
        return lines["run:vrpge"].get_xdata().tolist() if "run:vrpge" in lines else None, dotted, ax.get_xlabel()

    assert loss_panel() == ([1, 2, 3], [2.5], "epoch (VR-PGE: search, then finetune after the dotted line)")
    path = folder / "vrpge" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(['{"phase": "search", "epo', *lines[1:]]) + "\n")  # the first epoch's line damaged
    assert loss_panel()[:2] == ([2, 3], [2.5])  # search epoch 2, finetune epoch 1 after the 2 search epochs
    shutil.rmtree(folder / "vrpge")  # no run with a finetune phase: no dotted line to speak of
    assert loss_panel()[1:] == ([], "epoch")


def test_the_plots_draw_each_runs_values(runs, tmp_path):
    """Accuracy against FLOPs and params kept, dense runs as lines at their accuracy; formula saving against measured
    speedup with its interquartile range; bars of the full and the kept widths."""
    figures = make_plots(build_report([runs]))
    sparse, dense = summary_of(runs / "vrpge"), summary_of(runs / "dense")
    flops_ax, params_ax = figures["accuracy.png"].axes[:2]
    for ax, kept in ((flops_ax, 100 * sparse["subnet_flops"] / sparse["dense_flops"]),
                     (params_ax, 100 * sparse["subnet_params"] / sparse["dense_params"])):
        lines = {line.get_gid(): line for line in ax.lines}
        assert lines["run:vrpge"].get_xydata().tolist() == [[pytest.approx(kept), sparse["accuracy"]]]
        assert list(lines["run:dense"].get_ydata()) == [dense["accuracy"]] * 2
    (ax,) = figures["speedup.png"].axes
    (bars,) = ax.containers
    point, _, (segments,) = bars
    saving, measured = sparse["train_cost_saving"], sparse["measured_speedup"]
    assert point.get_xydata().tolist() == [[saving, measured]]
    low, high = sparse["measured_speedup_iqr"]
    assert [s.tolist() for s in segments.get_segments()] == [[[saving, pytest.approx(low)],
                                                              [saving, pytest.approx(high)]]]
    (ax,) = figures["widths.png"].axes
    full, kept = ax.containers
    assert [bar.get_height() for bar in full] == list(sparse["group_sizes"].values())
    assert [bar.get_height() for bar in kept] == list(sparse["widths"].values())


def test_the_widths_of_a_network_of_many_groups_are_a_row_each(runs, tmp_path):
    """A run of 120 groups (DenseNet-121's) gets a bar across per group, top to bottom in network order, each named,
    instead of 120 bars side by side in a strip too wide to read."""
    folder = copy_runs(runs, tmp_path, names=("vrpge",))
    summary = summary_of(folder / "vrpge")
    sizes = {f"block.layer{i}": 32 + i for i in range(120)}
    kept = {g: n // 2 for g, n in sizes.items()}
    (folder / "vrpge" / "summary.json").write_text(json.dumps(dict(summary, group_sizes=sizes, widths=kept)))
    figure = make_plots(build_report([folder]))["widths.png"]
    (ax,) = figure.axes
    full, kept_bars = ax.containers
    assert [bar.get_width() for bar in full] == list(sizes.values())
    assert [bar.get_width() for bar in kept_bars] == list(kept.values())
    assert [t.get_text() for t in ax.get_yticklabels()] == list(sizes)
    assert ax.get_ylim() == (119.5, -0.5)  # the first group at the top
    width, height = figure.get_size_inches()
    assert height > 2 * width


def test_the_curves_plot_every_epochs_value(runs, tmp_path):
    """Validation accuracy at every epoch; the expected kept ratio at each search epoch with the budget line; a run
    whose config no longer says its search epochs counts those recorded."""
    folder = copy_runs(runs, tmp_path)
    stopped = folder / "stopped"
    shutil.copytree(folder / "vrpge", stopped)
    (stopped / "summary.json").unlink()
    config = yaml.safe_load((stopped / "config.yaml").read_text())
    del config["optim"]["epochs"]
    (stopped / "config.yaml").write_text(yaml.safe_dump(config))
    axes = make_plots(build_report([folder]))["curves.png"].axes
    metrics = {name: [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("dense", "vrpge")}
    val = {line.get_gid(): line.get_xydata().tolist() for line in axes[1].lines if line.get_gid()}
    assert val["run:dense"] == [[m["epoch"], m["val_accuracy"]] for m in metrics["dense"]]
    assert val["run:vrpge"] == val["run:stopped"] == [[x, m["val_accuracy"]] for x, m in
                                                      zip([1, 2, 3], metrics["vrpge"])]
    kept = {line.get_gid(): line.get_xydata().tolist() for line in axes[2].lines if line.get_gid()}
    assert kept["run:vrpge"] == [[m["epoch"], m["kept_ratio_expected"]] for m in metrics["vrpge"]
                                 if m["phase"] == "search"]
    budgets = [line.get_ydata()[0] for line in axes[2].lines if not line.get_gid()]
    assert budgets == [0.5, 0.5]  # vrpge's and stopped's keep ratio


def test_runs_0_and_10_look_different_in_every_plot(runs, tmp_path):
    folder = many_runs(runs, tmp_path, 11)
    figures = make_plots(build_report([folder]))
    names = sorted(p.name for p in folder.iterdir())
    first, eleventh = f"run:{names[0]}", f"run:{names[10]}"
    for ax in figures["curves.png"].axes[:2]:
        lines = {line.get_gid(): line for line in ax.lines}
        looks = [(lines[gid].get_color(), lines[gid].get_linestyle(), lines[gid].get_marker())
                 for gid in (first, eleventh)]
        assert looks[0] != looks[1] and looks[0][0] == looks[1][0]  # the colours repeat, the rest does not
        assert looks[0][2] not in ("None", "", None)  # markers in the loss panel too
    for ax in figures["accuracy.png"].axes:  # both dense: reference lines of different styles
        lines = {line.get_gid(): line for line in ax.lines}
        assert lines[first].get_linestyle() != lines[eleventh].get_linestyle()


def test_every_legend_entry_shows_in_full(runs, tmp_path):
    """Many runs with names as long as the default ones: the legends lie within their figures."""
    figures = make_plots(build_report([many_runs(runs, tmp_path, 12)]))
    for name in ("accuracy.png", "speedup.png", "curves.png"):
        figure = figures[name]
        figure.draw_without_rendering()
        (legend,) = figure.legends
        assert len(legend.get_texts()) >= 6, name
        bounds = figure.bbox
        for artist in [legend, *legend.get_texts()]:
            box = artist.get_window_extent()
            assert bounds.x0 - 1 <= box.x0 and box.x1 <= bounds.x1 + 1, (name, artist)
            assert bounds.y0 - 1 <= box.y0 and box.y1 <= bounds.y1 + 1, (name, artist)


# ---------------------------------------------------------------------------------------------------------------------
# The summary schema


def test_the_summary_documents_every_field_and_round_trips(runs):
    import dataclasses

    for f in dataclasses.fields(RunSummary):
        assert f.metadata["doc"], f.name
        assert "unit" in f.metadata, f.name
    summary = read_summary(runs / "vrpge" / "summary.json")
    assert summary.schema_version == SCHEMA_VERSION and summary.dataset == "shapes"
    assert summary.to_dict() == summary_of(runs / "vrpge")
    assert summary.dense_accuracy is None  # never made up without a dense run
    dense = read_summary(runs / "dense" / "summary.json")
    assert dense.dense_accuracy == dense.accuracy


def test_the_data_identity_of_generated_shapes_holds_their_sizes_and_seed():
    """Shapes runs of another seed or size trained on other data: they are no baseline of each other."""
    data = {"dataset": "shapes", "train_size": 128, "val_size": 64, "image_size": 16, "seed": 3, "root": "/x",
            "batch_size": 64}
    assert data_identity(data) == {"dataset": "shapes", "train_size": 128, "val_size": 64, "image_size": 16, "seed": 3}
    assert data_identity({"dataset": "imagenet", "crop_size": 224, "seed": 3}) == {"dataset": "imagenet",
                                                                                    "crop_size": 224}
    assert data_identity({"dataset": "cifar10", "seed": 3}) == {"dataset": "cifar10"}


def test_an_unversioned_summary_is_read_with_what_the_config_says(runs, tmp_path):
    folder = copy_runs(runs, tmp_path)
    old = {k: v for k, v in summary_of(folder / "vrpge").items()
           if k not in ("schema_version", "dataset", "data", "model_kwargs", "epochs", "measured_speedup_iqr",
                        "measured_speedup_phases", "speedup_warning", "dense_reference_s", "dense_reference_share",
                        "dense_accuracy", "dense_baseline")}
    (folder / "vrpge" / "summary.json").write_text(json.dumps(old))
    row = {r["run"]: r for r in build_report([folder]).rows}["vrpge"]
    assert row["schema_version"] == 0 and row["dataset"] == "shapes" and row["epochs"] == "2+1"
    assert row["measured_speedup"] == old["measured_speedup"] and row["measured_speedup_low"] is None
    assert row["baseline"] == "dense"  # the data identity comes from config.yaml


def test_a_newer_summary_is_refused(runs, tmp_path, capsys):
    folder = copy_runs(runs, tmp_path)
    summary = summary_of(folder / "vrpge")
    summary["schema_version"] = SCHEMA_VERSION + 1
    (folder / "vrpge" / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "out"
    assert main(["report", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("maskprop report: error: ")
    assert f"summary schema version {SCHEMA_VERSION + 1}, newer than this maskprop reads" in err[0]
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Edge cases and bad input


def test_an_unfinished_run_is_listed_with_its_phase_and_epoch(runs, tmp_path):
    folder = copy_runs(runs, tmp_path, names=("vrpge",))
    (folder / "vrpge" / "summary.json").unlink()
    lines = (folder / "vrpge" / "metrics.jsonl").read_text().splitlines()
    (folder / "vrpge" / "metrics.jsonl").write_text(lines[0] + "\n")
    (row,) = build_report([folder]).rows
    assert row["status"] == "unfinished: search epoch 1/2" and row["accuracy"] is None
    assert (row["method"], row["model"], row["epochs"], row["keep"]) == ("vrpge", "resnet20", "2+1", "0.5")
    (folder / "vrpge" / "metrics.jsonl").write_text("")  # killed in its first epoch: config.yaml was written
    assert build_report([folder]).rows[0]["status"] == "unfinished: no epoch completed"
    out = tmp_path / "out"
    write_report(build_report([folder]), out)  # the plots cope with a run that has nothing to show
    assert (out / "widths.png").read_bytes().startswith(PNG)


def test_a_damaged_metrics_line_is_skipped_and_named(runs, tmp_path, caplog):
    folder = copy_runs(runs, tmp_path, names=("vrpge",))
    path = folder / "vrpge" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines.insert(1, '{"phase": "search", "epo')
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING", logger="maskprop.report"):
        report = build_report([folder])
    assert len(report.runs[0].metrics) == len(lines) - 1
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"skipped line 2 of '{path}': not a json epoch record")


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "is not a run directory (it has no config.yaml or summary.json) and holds none in its "
                       "subdirectories"),
    (lambda p: p.write_text("x"), "is a file, not a run directory"),
    (lambda p: None, "does not exist; expected a run directory or a folder of them"),
])
def test_a_path_that_is_not_a_run_says_what_it_lacks(tmp_path, capsys, make, message):
    path = tmp_path / "thing"
    make(path)
    out = tmp_path / "out"
    assert main(["report", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"maskprop report: error: '{path}' {message}")
    assert not out.exists()


def test_a_run_directory_holding_runs_reports_them_all(tmp_path):
    outer = tmp_path / "outer"
    for run in (outer, outer / "a", outer / "b"):
        run.mkdir(parents=True)
        (run / "config.yaml").write_text("seed: 0\n")
    (outer / "plain").mkdir()
    assert find_runs([outer]) == [outer, outer / "a", outer / "b"]
    assert find_runs([outer / "a"]) == [outer / "a"]


def test_no_runs_at_all_is_refused():
    with pytest.raises(ValueError, match="no runs given"):
        find_runs([])


def test_an_existing_output_directory_is_refused(runs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["report", str(runs), "--out", str(out)]) == 2
    assert f"output directory '{out}' already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_baseline_must_be_a_finished_dense_run(runs, tmp_path, capsys):
    assert main(["report", str(runs / "vrpge"), "--baseline", str(runs / "vrpge"), "--out",
                 str(tmp_path / "out")]) == 2
    assert "the baseline '" in capsys.readouterr().err and not (tmp_path / "out").exists()
    report = build_report([runs / "vrpge"], baseline=runs / "dense")  # listed too
    rows = {row["run"]: row for row in report.rows}
    assert rows["vrpge"]["dense_accuracy"] == summary_of(runs / "dense")["accuracy"] and "dense" in rows
    # a dense run of another model compares with none of the runs: refused, not listed silently
    folder = copy_runs(runs, tmp_path)
    summary = summary_of(folder / "dense")
    (folder / "dense" / "summary.json").write_text(json.dumps(dict(summary, model="vgg11_bn")))
    assert main(["report", str(folder / "vrpge"), "--baseline", str(folder / "dense"), "--out",
                 str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(vgg11_bn on shapes) has the model and data of none of the runs (resnet20 on shapes): " \
        "it differs from the nearest, 'vrpge', in model vgg11_bn vs resnet20 (baseline vs run)" in err[0]
    assert not (tmp_path / "other").exists()
    # only the data differs: the error names the setting, not just "resnet20 on shapes" twice
    data = dict(summary["data"], train_size=64)
    (folder / "dense" / "summary.json").write_text(json.dumps(dict(summary, data=data)))
    assert main(["report", str(folder / "vrpge"), "--baseline", str(folder / "dense"), "--out",
                 str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("(resnet20 on shapes) has the model and data of none of the runs "
                                             "(resnet20 on shapes): it differs from the nearest, 'vrpge', in "
                                             "data.train_size 64 vs 32 (baseline vs run); expected a dense run of the "
                                             "same model and data")


def test_without_matplotlib_the_table_still_prints_and_the_error_names_the_extra(runs, tmp_path, capsys,
                                                                                monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "out"
    assert main(["report", str(runs), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "| vrpge " in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "pip install 'maskprop[report]'" in err[0] and "nothing written" in err[0]
    assert not out.exists() and not list(tmp_path.iterdir())
    assert main(["report", str(runs), "--out", str(out), "--no-plots"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.csv", "report.json", "report.md"]


def test_a_failure_while_writing_leaves_nothing(runs, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        write_report(build_report([runs]), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_an_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    from maskprop._files import atomic_directory

    target = tmp_path / "nested" / "out"
    with pytest.raises(OSError, match="disk full"), atomic_directory(target) as folder:
        (folder / "a.txt").write_text("half")
        raise OSError("disk full")
    assert not target.exists() and list(target.parent.iterdir()) == []  # the temp directory is gone too
    with atomic_directory(target) as folder:
        assert folder.parent == target.parent and not target.exists()
        (folder / "a.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["a.txt"] and [p.name for p in target.parent.iterdir()] == ["out"]
    assert target.stat().st_mode & 0o777 == (tmp_path / "nested").stat().st_mode & 0o777  # not a private temp dir


def test_an_atomic_directory_refuses_an_existing_target_unless_forced(tmp_path):
    from maskprop._files import atomic_directory

    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"), atomic_directory(target):
        pass
    with pytest.raises(ValueError, match="already exists"), atomic_directory(tmp_path / "late") as folder:
        (tmp_path / "late").mkdir()  # appeared while the directory was being filled
        (folder / "a.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late", "out"] and not list((tmp_path / "late").iterdir())
    with pytest.raises(OSError, match="disk full"), atomic_directory(target, force=True) as folder:
        raise OSError("disk full")
    assert [p.name for p in target.iterdir()] == ["keep.txt"]  # an error keeps the old one
    with atomic_directory(target, force=True) as folder:
        (folder / "a.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["a.txt"] and [p.name for p in tmp_path.iterdir()] == ["late", "out"]


def test_written_files_get_ordinary_permissions(tmp_path):
    """Files written atomically, and files a writer made private inside an atomic directory (safetensors' do), get
    the mode of an ordinary ``open`` under the process's umask, as the files beside them in a run directory."""
    from maskprop._files import atomic_directory, atomic_write

    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "summary.json", "w") as f:
            f.write("{}")
        with atomic_directory(tmp_path / "export") as folder:
            private = folder / "model.safetensors"
            private.write_bytes(b"x")
            private.chmod(0o600)
        (tmp_path / "plain.txt").write_text("x")
        assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "summary.json", tmp_path / "export" /
                                                            "model.safetensors", tmp_path / "plain.txt")} == {
            "summary.json": 0o644, "model.safetensors": 0o644, "plain.txt": 0o644}
    finally:
        os.umask(old)


def test_the_file_helpers_import_without_the_trainer(tmp_path):
    # export (the core) uses them: importing them must not import pydantic, timm or torchvision.
    code = ("import sys; import maskprop._files; "
            "print(sorted(m for m in ('pydantic', 'timm', 'torchvision', 'maskprop.train') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------------------
# The train command's final lines


def test_the_final_table_says_faster_or_slower_correctly(runs):
    summary = summary_of(runs / "vrpge")
    slower = _final_table(dict(summary, step_speedup=0.9, measured_speedup=0.8))
    assert "a search step is 1.11x slower than a dense step" in slower and "faster" not in slower
    faster = _final_table(dict(summary, step_speedup=1.5))
    assert "a search step is 1.50x faster than a dense step" in faster
    low, high = summary["measured_speedup_iqr"]
    assert f"(interquartile range {low:.2f}-{high:.2f}x)" in faster
    warned = _final_table(dict(summary, speedup_warning="the measured speedup 1.00x has a wide spread"))
    assert warned.splitlines()[-1] == "warning: the measured speedup 1.00x has a wide spread"


def test_the_final_table_gives_the_dense_accuracy_where_known_and_else_says_how_to_get_it(runs):
    hint = "(the dense accuracy: train the dense twin, method=dense, and compare: maskprop report RUN DENSE_RUN)"
    summary = summary_of(runs / "vrpge")
    unknown = _final_table(dict(summary, dense_accuracy=None)).splitlines()
    assert unknown[3].split("|")[2:4] == [f" {summary['accuracy']:10.2f} ", f" {'-':>10} "] and hint in unknown
    known = _final_table(dict(summary, accuracy=72.8, dense_accuracy=75.0)).splitlines()
    assert known[3] == "| top-1 accuracy (%)   |      72.80 |      75.00 | -2.2pp |" and hint not in known
    dense = _final_table(summary_of(runs / "dense")).splitlines()
    assert hint not in dense and dense[3].endswith(f"| {'-':>10} |        |")  # the baseline itself


@pytest.mark.parametrize(("threads", "said"), [
    ({"setting": "auto", "used": [1, 1]}, "; 1 CPU thread (auto: the cores other processes left free)"),
    ({"setting": "auto", "used": [2, 2]}, "; 2 CPU threads (auto: the cores other processes left free)"),
    ({"setting": "auto", "used": [1, 2]}, "; 1-2 CPU threads (auto: the cores other processes left free)"),
    ({"setting": 2, "used": [2, 2]}, None), (None, None),  # a fixed count, or a summary of an older maskprop
])
def test_the_final_table_says_what_threads_auto_chose(runs, threads, said):
    measured = next(line for line in _final_table(dict(summary_of(runs / "vrpge"), threads=threads)).splitlines()
                    if line.startswith("measured speedup"))
    assert measured.endswith(said) if said else "CPU thread" not in measured


def test_the_final_table_gives_the_time_of_graph_captures_beside_the_speedup(runs):
    """A graphed run's windows cost eager warm-up steps and a capture each, which the measured speedup (paired
    replayed steps) leaves out: the final lines say how long they took and what share of the run."""
    summary = dict(summary_of(runs / "vrpge"), run_time_s=40.0)
    static = {"captured": True, "graph_captures": 5, "search_windows": 3, "warmup_capture_s": 6.0}
    lines = _final_table(dict(summary, static_steps=static)).splitlines()
    assert lines[-1] == ("CUDA graphs: 5 captures, 3 search windows; their eager warm-up steps and captures took "
                         "6.0 s (15% of the run), which the measured speedup (replayed steps) leaves out")
    eager = _final_table(dict(summary, static_steps=dict(static, captured=False)))
    assert "CUDA graphs" not in eager and "CUDA graphs" not in _final_table(summary)
    reason = "sync_bn=true all-gathers BatchNorm statistics between ranks inside the forward"
    lines = _final_table(dict(summary, static_steps=dict(static, captured=False, not_captured_because=reason)))
    assert lines.splitlines()[-1] == f"static-shape steps, not captured as CUDA graphs since {reason}: 3 search windows"


def test_the_random_baseline_is_named_random_in_tables_and_plots():
    from maskprop.report import _method
    from maskprop.train.summary import RunSummary

    assert _method(RunSummary(method="vrpge", search={"subnetwork": "random"})) == "random"
    assert _method(RunSummary(method="vrpge", search={"subnetwork": "searched"})) == "vrpge"
    assert _method(RunSummary(method="dense")) == "dense"


def test_an_unfinished_random_subnetwork_is_named_random(runs, tmp_path):
    folder = copy_runs(runs, tmp_path, names=("vrpge",))
    edit_config(folder / "vrpge", **{"sparsity.fix": "random"})
    (folder / "vrpge" / "summary.json").unlink()
    report = build_report([folder])
    assert report.rows[0]["method"] == "random"
    _, labels = make_plots(report)["curves.png"].axes[0].get_legend_handles_labels()
    assert labels == ["vrpge (random)"]


def test_the_header_counts_one_run_in_the_singular(runs, tmp_path, capsys):
    assert main(["report", str(runs / "vrpge"), "--no-plots", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.md").read_text().splitlines()[2].startswith("1 run, ")


def test_a_forced_atomic_directory_puts_the_old_one_back_when_its_rename_fails(tmp_path, monkeypatch):
    """``force``: the old directory is moved aside before the new one is renamed into place; if that rename fails, the
    old one goes back where it was and nothing else is left beside it."""
    from maskprop._files import atomic_directory

    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    replace = os.replace

    def failing(src, dst):
        if str(src).endswith(".tmp") and Path(dst) == target:
            raise OSError("no space left")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="no space left"), atomic_directory(target, force=True) as folder:
        (folder / "a.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in target.iterdir()] == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "mine"


def test_a_dangling_link_in_the_way_is_one_line_naming_it(tmp_path):
    from maskprop._files import atomic_write, make_directory

    link = tmp_path / "runs"
    link.symlink_to(tmp_path / "missing")
    with pytest.raises(ValueError, match="'.*runs' is a file, not a directory"):
        make_directory(link / "a", "the run")
    with atomic_write(tmp_path / "new" / "deeper" / "summary.json", "w") as f:  # missing parents are created
        f.write("{}")
    assert (tmp_path / "new" / "deeper" / "summary.json").read_text() == "{}"
    assert [p.name for p in (tmp_path / "new" / "deeper").iterdir()] == ["summary.json"]


def test_a_refused_temp_file_or_directory_is_reported_under_the_name_the_user_gave(tmp_path, monkeypatch):
    """Where the system refuses the temp directory (or file) written beside an output, the error names the output:
    'maskprop report --out DIR' into a directory it may not write said "Permission denied: '.DIR.k2x9.tmp'"."""
    import tempfile

    from maskprop._files import atomic_directory, atomic_write

    def refuse(*args, dir=None, prefix="", **kwargs):
        raise PermissionError(13, "Permission denied", os.path.join(dir, f"{prefix}k2x9.tmp"))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError) as error, atomic_directory(tmp_path / "out"):
        pass
    assert (error.value.errno, error.value.filename) == (13, str(tmp_path / "out"))
    with pytest.raises(PermissionError) as error, atomic_write(tmp_path / "rows.json"):
        pass
    assert (error.value.errno, error.value.filename) == (13, str(tmp_path / "rows.json"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key, value, expected", [("measured_speedup", "fast", "a number or null"),
                                                  ("accuracy", "high", "a number or null"),
                                                  ("run_time_s", None, "a number"),
                                                  ("epochs", [3, 1], "an object"),
                                                  ("dense_params", True, "a number")])
def test_a_summary_value_of_another_type_is_one_line(runs, tmp_path, capsys, key, value, expected):
    """A summary.json holding a value of another type than its field's (edited by hand, or not maskprop's) was read
    as it was: a text speedup ended the report in a TypeError traceback, a text accuracy went into the table. Now one
    line naming the key, exit status 2, nothing written."""
    folder = copy_runs(runs, tmp_path, names=("vrpge",))
    summary = summary_of(folder / "vrpge")
    summary[key] = value
    (folder / "vrpge" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match=rf"summary.json' has {key}=.*; expected {expected} \(is it a summary"):
        read_summary(folder / "vrpge" / "summary.json")
    out = tmp_path / "out"
    assert main(["report", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"maskprop report: error: '{folder / 'vrpge' / 'summary.json'}' has "
                                               f"{key}=")
    assert not out.exists()


@pytest.mark.parametrize("section", ["sparsity", "data", "model"])
def test_a_config_section_that_is_not_a_mapping_is_one_line(runs, tmp_path, capsys, section):
    """A run's config.yaml whose section is not a mapping (edited by hand) ended the report of an unfinished run in an
    AttributeError traceback from the plots ('int' object has no attribute 'get'). Now one line, exit status 2,
    nothing written."""
    folder = copy_runs(runs, tmp_path, names=("vrpge",))
    (folder / "vrpge" / "summary.json").unlink()
    config = yaml.safe_load((folder / "vrpge" / "config.yaml").read_text())
    config[section] = 5
    (folder / "vrpge" / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["report", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"maskprop report: error: '{folder / 'vrpge' / 'config.yaml'}' has {section}=5; expected a mapping "
                   f"of the {section} settings (the config.yaml that maskprop train writes)"]
    assert not out.exists()


def test_reports_made_in_the_same_second_without_out_get_a_directory_each(runs, tmp_path, monkeypatch, capsys):
    """The default output directory reports/report-<timestamp> is stamped to the second: a second report within it
    (a script reporting several folders) was refused as an existing directory the user had not chosen. Now it takes
    the next free name."""
    import datetime

    import maskprop.report as report_module

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 1, 0, 0, 0)

    monkeypatch.setattr(report_module, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["report", str(runs), "--no-plots"]) == 0
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["report-20260101-000000",
                                                                         "report-20260101-000000-2"]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("wrote reports/report-20260101-000000-2/")
