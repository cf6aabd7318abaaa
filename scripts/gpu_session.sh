#!/usr/bin/env bash
# One GPU session's checks, most important first, each stage under its own time limit (about 9 minutes
# in all), results in $OUT (default ./gpu_out), at most 6 files:
#   bench_fast.json      the fast path (bf16, torch.compile + CUDA graphs, closed-form gradient), the
#                        ffhq_10m architecture with random weights, 256x256: the rows of ROWS below
#                        (phase retrieval and nonlinear deblur timed on a few of their K = 200 rounds
#                        and scaled to K)
#   parity.json          quality parity of `dcdp.py --fast` against the reference path (fp32, eager,
#                        batch 1, autograd) on the demo prior and the demo images (3 of the 5 demo tasks)
#   bench_official.json  the official code's structure and our reference path, super-resolution, batch 1
#   log.txt              the environment and everything printed, the CUDA-only tests included
# Usage on the device: bash scripts/gpu_session.sh
# Rehearsal on a CPU (tiny sizes, same stages):  SMOKE=1 OUT=/tmp/gpu_out bash scripts/gpu_session.sh
set -u
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
: > "$LOG"

# batch 1 first, then 8: the two network compilations (static batch 1, then a dynamic batch size that
# serves 8 and 32) happen up front, and the rows the budget may cut are the least important ones
ROWS=(super_resolution:1 super_resolution:8 inpainting:8 gaussian_deblur:8 motion_deblur:8 phase_retrieval:8:10
      nonlinear_deblur:8:2 inpainting:1 gaussian_deblur:1 motion_deblur:1 super_resolution:32 inpainting:32)
if [ "${SMOKE:-0}" = 1 ]; then
    SIZE=(--image_size 32 --max_rounds 1)
    ROWS=(super_resolution:2 phase_retrieval:2:1 super_resolution:1)
    PARITY=(--max_rounds 1 --max_images 1 --parity_tasks super_resolution)
    SCALE=4
else
    SIZE=()
    PARITY=(--parity_tasks super_resolution gaussian_deblur inpainting)
    SCALE=1
fi

stage() {  # stage NAME SECONDS COMMAND...: run under a time limit, append to the log, never abort the script
    local name=$1 seconds=$(( $2 * SCALE )); shift 2
    echo "=== $name $(date -u +%H:%M:%S) (limit ${seconds} s)" | tee -a "$LOG"
    timeout --kill-after=10 "$seconds" "$@" >> "$LOG" 2>&1
    echo "=== $name exit $? $(date -u +%H:%M:%S)" | tee -a "$LOG"
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    $PY -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', \
torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
    git log -1 --format='commit %H %s' 2>/dev/null
    $PY -c "import torch, numpy, scipy, skimage, PIL, yaml, tqdm, matplotlib, pytest; print('imports ok')"
} >> "$LOG" 2>&1

stage bench_fast 300 $PY scripts/benchmark.py --random_weights --paths fast --rows "${ROWS[@]}" --images 1 \
    --budget_s 260 --json "$OUT/bench_fast.json" "${SIZE[@]}"
stage parity 100 $PY scripts/benchmark.py --parity --json "$OUT/parity.json" "${PARITY[@]}"
stage tests_cuda 80 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
stage bench_official 35 $PY scripts/benchmark.py --random_weights --paths official reference --rows super_resolution:1 \
    --images 1 --json "$OUT/bench_official.json" "${SIZE[@]}"

echo "=== summary" | tee -a "$LOG"
for f in bench_fast bench_official; do
    [ -f "$OUT/$f.json" ] && $PY - "$OUT/$f.json" <<'EOF' | tee -a "$LOG"
import json, sys
for r in json.load(open(sys.argv[1])):
    res = r.get("error") or (f"{r['seconds_per_image']:.3f} s/img  warm-up {r['warmup_s']:.0f} s  "
                             f"peak {r['peak_mem_mb'] or 0:.0f} MB  rounds {r['rounds_timed']}/{r['rounds_full']}  "
                             f"compiled {r['compiled']}  DC graphs {r['dc_cuda_graphs']}")
    print(f"{r['task']:18} {r['path']:9} b{r['batch']:<3} {res}")
EOF
done
[ -f "$OUT/parity.json" ] && $PY - "$OUT/parity.json" <<'EOF' | tee -a "$LOG"
import json, sys
for r in json.load(open(sys.argv[1])):
    print(f"parity {r['task']:18} reference {r['reference_psnr']:.3f}  fast {r['fast_psnr']:.3f}  gap {r['gap_db']:+.3f} dB")
EOF
grep -E "^[0-9]+ (passed|failed|skipped)|^FAILED|^ERROR" "$LOG" | tail -12
