"""The step benchmark runs, reports every configuration, and its ideal ratio follows the analytic FLOPs."""

from __future__ import annotations

import json

import pytest

from maskprop.bench import bench_model, format_table
from maskprop.cli import main


def test_bench_model_reports_all_configurations():
    results = bench_model("resnet20", batch_size=4, keep_ratios=(1.0, 0.5), repeats=1, warmup=0, image_size=16)
    assert [r.keep_ratio for r in results] == [1.0, 0.5]
    assert all(r.dense_s > 0 and r.masked_s > 0 and r.compact_s > 0 for r in results)
    # keep 1.0: compact does 3 + 1 forward-equivalents of the dense work against dense's 3.
    assert results[0].ideal == pytest.approx(0.75)
    assert 2.5 < results[1].ideal < 3.5  # 3 f_D / (4 f_S) with f_S ~ f_D / 4
    assert results[1].compact_peak_mb is None  # peak memory is measured on CUDA only
    table = format_table(results)
    assert table.count("\n") == 3 and "| resnet20 | 4 | 0.50 |" in table


def test_bench_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--models", "resnet20", "--batch-size", "2", "--keep-ratios", "0.5", "--repeats", "1",
                 "--warmup", "0", "--image-size", "16", "--json", str(out)])
    assert code == 0
    assert "| resnet20 | 2 | 0.50 |" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert rows[0]["model"] == "resnet20" and rows[0]["speedup_vs_dense"] > 0


def test_bench_cli_unknown_model(capsys):
    assert main(["bench", "--models", "resnet99", "--repeats", "1", "--warmup", "0"]) == 2
    assert "unknown model 'resnet99'" in capsys.readouterr().err
