#!/usr/bin/env bash
# The one script to run on a machine with a GPU, in at most 6 minutes; every result goes as JSON into the directory
# given (and a log beside it). Run from the repository root:
#
#     tools/gpu_check.sh results/gpu-$(date +%F)
#
# 1. the GPU tests (compact == masked in float32 channels_last with sampled and aligned widths, bf16 tolerance,
#    one host sync per search step, the trainer on CUDA);
# 2. `maskprop bench --device cuda --amp bf16 --batch-size 256` at keep 0.5, align 8, sampled masks, for resnet32 and
#    vgg19_bn (32x32) (resnet50's eager steps are timed in part 5);
# 3-4. (the eager per-step probe, tools/gpu_probe.py, and the operator counts, tools/count_ops.py, were measured on
#    2026-12-04 and are in BENCHMARKS.md; run them by hand when the eager steps change)
# 5. issue 18: eager steps against static steps captured as CUDA graphs (tools/bench_graphs.py: dense, search and
#    finetune steps and a search step at settled probabilities, bf16, channels_last, batch 256, keep 0.5, for
#    resnet32, vgg19_bn and resnet50; JSON and a markdown table of the ratios), the same for the CIFAR models at
#    sparsity.capacity_quantile 0.9 (narrower static widths, more masks cut), then a short `maskprop train` of the quickstart (shapes) recipe with
#    cuda_graphs=true against its dense twin (accuracy, measured speedup, the static steps' report) in e2e.json.
# Limits: tests 80 s, bench 30 s, graph benches 130 + 45 s, the two runs 35 s each (355 s).
# Each part has its own time limit, so one that hangs cannot take the others' time; its status is in summary.json.
# Wheels carried in .whl/ (a newer torch, say) are installed first, into /tmp/site.
set -u
OUT=${1:?usage: tools/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
PY=${PYTHON:-python}
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
LOG="$OUT/gpu_check.log"
: > "$LOG"
declare -A STATUS

run() {  # run NAME SECONDS COMMAND...: the command's status recorded under NAME, its output appended to the log
    local name=$1 seconds=$2
    shift 2
    echo "== $name: $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" >> "$LOG" 2>&1
    STATUS[$name]="$? $((SECONDS - start))"
    echo "   status ${STATUS[$name]% *}, ${STATUS[$name]#* } s" | tee -a "$LOG"
}

$PY - "$OUT/machine.json" <<'PY' >> "$LOG" 2>&1
import json, sys, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None}
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(info)
PY

run tests 80 $PY -m pytest tests/test_gpu.py -q -x -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"

BENCH=(-m maskprop.cli bench --device cuda --amp bf16 --batch-size 256 --keep-ratios 0.5 --repeats 5 --warmup 2)
run bench_cifar_sampled_align8 30 $PY "${BENCH[@]}" --models resnet32 vgg19_bn --masks sampled --align 8 \
    --json "$OUT/bench_cifar_sampled_align8.json"

run graphs 130 $PY tools/bench_graphs.py --models resnet32:32:256 vgg19_bn:32:256 resnet50:224:256 --steps 15 \
    --json "$OUT/graphs.json" --markdown "$OUT/graphs.md"
run graphs_q90 45 $PY tools/bench_graphs.py --models resnet32:32:256 vgg19_bn:32:256 --steps 15 \
    --capacity-quantile 0.9 --json "$OUT/graphs_q90.json" --markdown "$OUT/graphs_q90.md"
SHORT=(device=cuda amp=bf16 cuda_graphs=true log_every=20 save_every=0 eval_every=0)
run e2e_search 35 $PY -m maskprop.cli train recipes/quickstart.yaml "${SHORT[@]}" optim.epochs=6 \
    sparsity.warmup_epochs=1 sparsity.anneal_epochs=2 finetune.epochs=1 --out "$OUT/e2e_search"
run e2e_dense 35 $PY -m maskprop.cli train recipes/quickstart.yaml "${SHORT[@]}" method=dense optim.epochs=7 \
    --out "$OUT/e2e_dense"
$PY - "$OUT" <<'PY' >> "$LOG" 2>&1
import json, sys
from pathlib import Path
out, rows = Path(sys.argv[1]), {}
for name in ("e2e_search", "e2e_dense"):
    path = out / name / "summary.json"
    if path.is_file():
        s = json.loads(path.read_text())
        rows[name] = {k: s.get(k) for k in ("accuracy", "measured_speedup", "measured_speedup_iqr", "train_cost_saving",
                                           "run_time_s", "static_steps")}
(out / "e2e.json").write_text(json.dumps(rows, indent=2))
print(json.dumps(rows, indent=2))
PY
for table in graphs graphs_q90; do [ -f "$OUT/$table.md" ] && tee -a "$LOG" < "$OUT/$table.md"; done

{
    echo "{"
    first=1
    for name in "${!STATUS[@]}"; do
        [ $first = 1 ] || echo ","
        first=0
        printf '  "%s": {"exit_status": %s, "seconds": %s}' "$name" "${STATUS[$name]% *}" "${STATUS[$name]#* }"
    done
    echo
    echo "}"
} > "$OUT/summary.json"
cat "$OUT/summary.json"
