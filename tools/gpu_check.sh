#!/usr/bin/env bash
# The one script to run on a machine with a GPU, in at most 6 minutes; every result goes as JSON into the directory
# given (and a log beside it). Run from the repository root:
#
#     tools/gpu_check.sh results/gpu-$(date +%F)
#     tools/gpu_check.sh /tmp/gpu_check "$OUT"     (a lent machine that returns at most 8 files from $OUT)
#
# With a second directory, that one receives gpu_check.tgz (every result file of OUT, the runs' checkpoints left out)
# and, to read at once, summary.json, gpu_tests.json, graphs.md, e2e.md and gpu_check.log: six files.
#
# 1. the GPU tests (compact == masked in float32 channels_last with sampled and aligned widths, bf16 tolerance,
#    aligned operands, one host sync per search step, the trainer on CUDA), each in a process of its own, eight at a
#    time (tools/isolated_tests.py): gpu_tests.json;
# 2. the step times of the GPU targets: eager steps against static steps captured as CUDA graphs (tools/bench_graphs.py:
#    dense, search, settled search, fixed-mask and narrow finetune steps, bf16, channels_last, batch 256, keep 0.5,
#    align 8, for resnet32, vgg19_bn and resnet50@224; last, the search step as torchrun captures it, on one rank):
#    graphs.json (written after every step kind) and graphs.md (the ratios);
# 3. the whole runs of the GPU targets: `maskprop train` of the short search on shapes with cuda_graphs=true for the
#    same three models, one after the other, then their dense twins at once (tools/e2e_runs.py): accuracy, the
#    summary's measured speedup beside its target, the capacity windows: e2e.json and e2e.md.
# By hand when the eager steps change (measured on 2026-12-04, in BENCHMARKS.md): `maskprop bench --device cuda --amp
# bf16 --batch-size 256 --masks sampled --align 8`, the probe tools/gpu_probe.py and the counts of tools/count_ops.py;
# `tools/bench_graphs.py --capacity-quantile 0.9` for narrower static widths; what running m' beside m and drawing m
# in the step before gain, `tools/bench_graphs.py --models resnet32:32:256 vgg19_bn:32:256 --steps 10 --kinds
# dense_graphed search_graphed search_m_first_graphed search_m_at_start_graphed search_one_stream_graphed`; and where
# a step's time goes, `tools/bench_graphs.py --models resnet32:32:256 --steps 5 --kinds dense_graphed search_graphed
# narrow_graphed --profile DIR` (each kind's kernels by device time, and the search step's trace); and CIFAR batches
# made on the GPU against torch's DataLoader, `tools/bench_data.py --cifar --device cuda --workers 0 4 --repeats 5`
# (the whole runs of part 3 already take their data there: data.on_device auto).
# Limits: tests 75 s, step times 105 s, whole runs 175 s (42 s a run): 355 s. Each part has its own time limit, so one
# that hangs cannot take the others' time; its status is in summary.json. Tests the limit stopped (gpu_tests.json
# marks them "stopped"), or that failed, get a second try of their own in a minute or so, the wheels installed as below:
# `PYTHONPATH=/tmp/site:$PWD python3 tools/isolated_tests.py tests/test_gpu.py --jobs 8 --timeout 60 --rerun
# OUT/gpu_tests.json --json OUT/gpu_tests_rerun.json`.
# Wheels carried in .whl/ (what the image lacks, all of it: pydantic 2.14.4, pydantic-core 2.50.5, annotated-types,
# typing-inspection and typing-extensions, for CPython 3.12 on x86-64) are installed first, into /tmp/site; the
# repository and /tmp/site are on PYTHONPATH (the package is not installed there). A torchcodec wheel among them
# (`python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform
# manylinux_2_28_x86_64 -d .whl torchcodec==0.17.0`, 10 MB) puts TorchCodec's nvJPEG under the decoding tests
# (data.decode: device); without it, or where it does not load with the image's torch, they run torchvision's and the
# log says which. With a second directory, the bundle
# below is rewritten after every part, so that a check stopped from outside still returns what finished.
# GPU_CHECK_DRY_RUN=1 runs the same parts on the CPU at toy sizes (eager steps, 1 thread, generous limits): a check of
# the script itself, for a machine without a GPU (tests/test_gpu_check.py).
set -u
OUT=${1:?usage: tools/gpu_check.sh OUT_DIR [BUNDLE_DIR]}
BUNDLE=${2:-}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
: > "$LOG"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >> "$LOG" 2>&1 || echo "installing the carried wheels failed (status $?)" | tee -a "$LOG"
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import pydantic, maskprop; print('maskprop', maskprop.__version__, 'pydantic', pydantic.VERSION)" \
    >> "$LOG" 2>&1 || echo "cannot import maskprop or pydantic: every part below will fail (see $LOG)" | tee -a "$LOG"
$PY -c "from maskprop.train.decode import image_decoders; print('image decoders:', image_decoders().name)" \
    >> "$LOG" 2>&1
df -h /dev/shm >> "$LOG" 2>&1  # the loader workers of the whole runs hand their batches over through it
declare -A STATUS

bundle() {  # the few files a lent machine returns: one archive of everything, and the main tables beside it
    [ -n "$BUNDLE" ] || return 0
    mkdir -p "$BUNDLE"
    tar -czf "$BUNDLE/gpu_check.tgz" --exclude='*.pt' -C "$(dirname "$OUT")" "$(basename "$OUT")" 2>> "$LOG"
    for file in summary.json gpu_tests.json graphs.md e2e/e2e.md gpu_check.log; do
        [ -f "$OUT/$file" ] && cp "$OUT/$file" "$BUNDLE/"
    done
    return 0
}

summary() {  # the parts' exit statuses and seconds, so far
    {
        echo "{"
        local first=1 name
        for name in "${!STATUS[@]}"; do
            [ $first = 1 ] || echo ","
            first=0
            printf '  "%s": {"exit_status": %s, "seconds": %s}' "$name" "${STATUS[$name]% *}" "${STATUS[$name]#* }"
        done
        echo
        echo "}"
    } > "$OUT/summary.json"
}

run() {  # run NAME SECONDS COMMAND...: the command's status recorded under NAME, its output appended to the log
    local name=$1 seconds=$2
    shift 2
    echo "== $name: $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" >> "$LOG" 2>&1
    STATUS[$name]="$? $((SECONDS - start))"
    echo "   status ${STATUS[$name]% *}, ${STATUS[$name]#* } s" | tee -a "$LOG"
    summary
    bundle
}

$PY - "$OUT/machine.json" <<'PY' >> "$LOG" 2>&1
import json, sys, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None}
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(info)
PY

if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
    LIMITS=(480 240 240) JOBS=2  # the tests part: ~57 processes that each import torch and skip, on 2 busy cores
    GRAPHS=(--device cpu --models resnet20:16:8 --steps 2)
    E2E=(--device cpu --timeout 120 --threads 1 --batch-size 32 --epochs 4 --models resnet20:16:64
         --set data.val_size=32 sparsity.fix_examples=32 sparsity.fix_samples=2)
else
    LIMITS=(75 105 175) JOBS=8
    GRAPHS=(--models resnet32:32:256 vgg19_bn:32:256 resnet50:224:256 --steps 10)
    E2E=(--timeout 42 --models resnet32:32:10240:4 vgg19_bn:32:10240:4 resnet50:224:2560:8)
fi
run tests "${LIMITS[0]}" $PY tools/isolated_tests.py tests/test_gpu.py --jobs "$JOBS" --timeout 60 \
    --json "$OUT/gpu_tests.json" --first graphed later_window host_sync  # the graph tests before the limit can cut them
run graphs "${LIMITS[1]}" $PY tools/bench_graphs.py "${GRAPHS[@]}" --json "$OUT/graphs.json" --markdown "$OUT/graphs.md"
rm -rf "$OUT/e2e"  # the runs of an earlier check in the same place (a run directory is never overwritten)
run e2e "${LIMITS[2]}" $PY tools/e2e_runs.py --out "$OUT/e2e" "${E2E[@]}"
for table in graphs.md e2e/e2e.md; do [ -f "$OUT/$table" ] && tee -a "$LOG" < "$OUT/$table"; done
summary
cat "$OUT/summary.json"
bundle
[ -z "$BUNDLE" ] || ls -l "$BUNDLE"
