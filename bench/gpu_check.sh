#!/usr/bin/env bash
# The GPU checks of issue 12 in one run (<= 8 minutes on one GPU):
#   1. the device-relevant tests on CUDA: the pipeline tests with GUIDELAB_DEVICE=cuda (guidelab's and diffusers'
#      pipelines both on the GPU; float32 with TF32 off, so their 1e-4 equality still holds), the slow PixArt
#      binning test included, and the diffusers adapter / hooks / scheduler / flow tests (CPU-only code paths, run
#      there under the GPU machine's torch);
#   2. bench/pipeline_speed.py (guidelab's guided loop vs the diffusers call) at fp16 and bf16 on the tiny models
#      of every family and on the mid-sized SD / SD3 models.
# Results: $OUT (or bench/gpu_results/ without it): env.txt, tests.log, speed.jsonl, speed.log, summary.txt.
#
#   bash bench/gpu_check.sh prepare   # HERE (pip works here, not there): wheels the GPU image lacks -> .whl/
#   device run: command "bash bench/gpu_check.sh", carry [".whl"], timeout_s 540
#   DEVICE=cpu QUICK=1 bash bench/gpu_check.sh   # the CPU path in seconds: 2 steps, one repeat, a few tests
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [ "${1:-}" = "prepare" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # the GPU image (python 3.12) has torch, transformers, tokenizers, safetensors, huggingface-hub; not these:
    PY=${PYTHON:-.venv/bin/python}
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "diffusers==$("$PY" -c 'import diffusers; print(diffusers.__version__)')" importlib_metadata
    ls -l .whl
    exit 0
fi

DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
R=${OUT:-$ROOT/bench/gpu_results}
mkdir -p "$R"
if [ -x .venv/bin/python ] && [ "$DEVICE" = cpu ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
if ! "$PY" -c "import diffusers" 2>/dev/null; then
    [ -d .whl ] || { echo "diffusers missing and no .whl/: run 'bash bench/gpu_check.sh prepare' here first" | tee "$R/summary.txt"; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export GUIDELAB_DEVICE=$DEVICE NVIDIA_TF32_OVERRIDE=0 CUBLAS_WORKSPACE_CONFIG=:4096:8 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
T0=$(date +%s)
left() { echo $((470 - ($(date +%s) - T0))); }   # seconds left of the 8 minutes, less a margin for the summary

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
} > "$R/env.txt" 2>&1
cat "$R/env.txt"

# -- 1. tests ---------------------------------------------------------------------------------------------
if [ "$QUICK" = 1 ]; then
    TESTS=(tests/integrations/test_diffusers_pipelines_families.py -k "sdxl_equals or flux_true_cfg")
    MARK=(-m "not slow")
else
    TESTS=(tests/integrations/test_diffusers_pipelines.py tests/integrations/test_diffusers_pipelines_families.py
        tests/integrations/test_diffusers_scheduler.py tests/integrations/test_diffusers_flow.py
        tests/integrations/test_diffusers_hooks.py tests/integrations/test_diffusers.py)
    MARK=(-m "slow or not slow")
fi
timeout 200 "$PY" -m pytest -q -p no:cacheprovider -p no:warnings -n 0 "${MARK[@]}" "${TESTS[@]}" > "$R/tests.log" 2>&1
TEST_RC=$?
tail -n 15 "$R/tests.log"

# -- 2. speed ---------------------------------------------------------------------------------------------
: > "$R/speed.jsonl"
if [ "$QUICK" = 1 ]; then
    RUNS=("tiny fp32 sd,flux")
    BENCH=(--steps 2 --repeats 1 --batch 2)
else
    RUNS=("tiny fp16 sd,sd3,sdxl,pixart,flux" "tiny bf16 sd,sd3,sdxl,pixart,flux" "mid fp16 sd,sd3" "mid bf16 sd,sd3")
    BENCH=(--steps 20 --repeats 5 --batch 4)
fi
for run in "${RUNS[@]}"; do
    set -- $run
    t=$(left)
    [ "$t" -gt 20 ] || { echo "skipped (time): $run" >> "$R/speed.log"; continue; }
    echo "== $run" >> "$R/speed.log"
    timeout "$t" "$PY" bench/pipeline_speed.py --device "$DEVICE" --size "$1" --dtype "$2" --families "$3" \
        "${BENCH[@]}" --out "$R/speed.jsonl" >> "$R/speed.log" 2>&1 || echo "failed or timed out: $run" >> "$R/speed.log"
done

{
    echo "tests: exit $TEST_RC; $(grep -E '[0-9]+ (passed|failed)' "$R/tests.log" | tail -n 1)"
    echo "speed (guidelab / diffusers):"
    "$PY" - "$R/speed.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"  {r['family']:<20} {r['size']:<4} {r['dtype']:<4} ratio {r['ratio']:.3f} (median pair {r['median_pair_ratio']:.3f}) "
          f"guidelab {r['guidelab_s']:.4f} s diffusers {r['diffusers_s']:.4f} s max|diff| {r['max_abs_diff']:.2g}")
EOF
    grep -E "skipped|failed" "$R/speed.log"
    echo "wall: $(( $(date +%s) - T0 )) s"
} > "$R/summary.txt" 2>&1
cat "$R/summary.txt"
exit $TEST_RC
