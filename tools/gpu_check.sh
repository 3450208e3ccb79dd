#!/usr/bin/env bash
# The one script to run on a machine with a GPU, in at most 6 minutes; every result goes as JSON into the directory
# given (and a log beside it). Run from the repository root:
#
#     tools/gpu_check.sh results/gpu-$(date +%F)
#
# 1. the GPU tests (compact == masked in float32 channels_last with sampled and aligned widths, bf16 tolerance,
#    one host sync per search step, the trainer on CUDA);
# 2. `maskprop bench --device cuda --amp bf16 --batch-size 256` at keep 0.5 for resnet32 and vgg19_bn (32x32) and
#    resnet50 (224x224), with exact and sampled masks, aligned to 8 and not;
# 3. the per-step probe of the trainer's steps (dense, finetune, search with fresh masks, search with repeated masks:
#    wall time, GPU-busy time, kernel launches, syncs);
# 4. operator counts of a dense and a compact step on cuda and meta.
# Limits: tests 90 s, CIFAR benches 4 x 30 s, ResNet-50 benches 2 x 40 s, probe 50 s, counts 15 s (355 s in all).
# Each part has its own time limit, so one that hangs cannot take the others' time; its status is in summary.json.
set -u
OUT=${1:?usage: tools/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
PY=${PYTHON:-python}
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

run tests 90 $PY -m pytest tests/test_gpu.py -q -x -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"

BENCH=(-m maskprop.cli bench --device cuda --amp bf16 --batch-size 256 --keep-ratios 0.5 --repeats 5 --warmup 2)
for masks in sampled exact; do
    for align in 8 1; do
        run "bench_cifar_${masks}_align${align}" 30 $PY "${BENCH[@]}" --models resnet32 vgg19_bn --masks $masks \
            --align $align --json "$OUT/bench_cifar_${masks}_align${align}.json"
    done
done
for align in 8 1; do
    run "bench_resnet50_sampled_align${align}" 40 $PY "${BENCH[@]}" --models resnet50 --image-size 224 \
        --masks sampled --align $align --json "$OUT/bench_resnet50_sampled_align${align}.json"
done

run probe 50 $PY tools/gpu_probe.py --models resnet32:32:256 vgg19_bn:32:256 resnet50:224:256 --steps 20 \
    --align 8 1 --json "$OUT/probe.json"
run count_ops 15 $PY tools/count_ops.py --devices cuda meta --align 8 --json "$OUT/count_ops.json"

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
