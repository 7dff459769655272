#!/usr/bin/env bash
# Every GPU check of the project in one command, for whoever has an NVIDIA GPU (an H100 is the target):
#
#   bash scripts/gpu_checks.sh                 # all steps below, in order
#   bash scripts/gpu_checks.sh tests sanitizer # only some (each step fits in a 10-minute call)
#
# steps:
#   tests      the GPU tests (pytest -m gpu): every backend's outputs and gradients against the float64
#              oracle in fp32 (TF32 off) / bf16 / fp16 on NYUDv2 stage shapes and odd shapes
#   sanitizer  compute-sanitizer memcheck over a subset of the CUDA backend's GPU tests (memcheck is slow),
#              racecheck and synccheck over one small bf16 case each of the fused and wide forward and
#              backward kernels and one float32 case of the packed stage kernels (lane groups of 2 to 16)
#   bench      the benchmark harness, NYUDv2 stages, bf16, batch 8 and 32 (appends to bench/RESULTS.md);
#              bench8 / bench32: one batch size each, where one call may run 10 minutes at most
#   model      MiT-B3 480x640 batch 8 bf16 training step / inference: fused vs no fusion vs published loop
#   quick      the kernel issues' checks in about 6 minutes, most important first: the Triton backend's GPU
#              tests against the float64 oracle, the benchmark at bf16, batch 32, NYUDv2 stages 1-4 (triton,
#              cuda and torch.compile side by side, forward and forward + backward, peak memory), the cuda
#              backend's GPU tests (its fused forward's and backward's among them), a memcheck pass over a few of them and a
#              racecheck / synccheck pass over one, then the ledger and the host time per call of each
#              backend (bench/call_overhead.py: the Python around the kernels); between them the
#              Triton forward + backward at stages 2-4 with the wide and the split backward forced (GK_TRITON_BACKWARD)
#
# The CUDA extension is built for the present GPU only (TORCH_CUDA_ARCH_LIST from nvidia-smi unless set).
# Test steps run in several processes (scripts/pytest_parallel.py: Triton compiles each configuration on
# first use, on one core per process; the processes share its cache and the GPU).
#
# Logs, bench/RESULTS.md and the JSON/PNG outputs go to $OUT when set (the device tool), else to
# bench/out/gpu_checks/. summary.txt gives each step's exit code; the script's exit code is non-zero
# when any step failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda/include ]; then export CUDA_HOME=/usr/local/cuda; fi
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
  TORCH_CUDA_ARCH_LIST="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)"
  export TORCH_CUDA_ARCH_LIST
fi
source scripts/setup_env.sh || exit 1
set +e
OUTDIR="${OUT:-bench/out/gpu_checks}"
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_checks.log"
export PYTHONUNBUFFERED=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print(torch.cuda.get_device_name())" \
  || { echo "gpu_checks: no CUDA device; nothing to do" >&2; exit 1; }

JOBS=$(( $(nproc) < 8 ? $(nproc) : 8 ))
ptest() { "$PY" scripts/pytest_parallel.py -j "$JOBS" --log-dir "$OUTDIR/pytest" "$@"; }
failed=0
step() {
  local name=$1; shift
  echo "== $name: $*" | tee -a "$LOG"
  local start=$SECONDS
  "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc ($((SECONDS - start)) s)" | tee -a "$OUTDIR/summary.txt"
  [ "$rc" = 0 ] || failed=1
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tests sanitizer bench8 bench32 model)
for s in "${steps[@]}"; do
  case "$s" in
    tests) step tests ptest -m gpu tests ;;
    sanitizer)
      step sanitizer compute-sanitizer --tool memcheck --error-exitcode 9 \
        "$PY" -m pytest tests/test_cuda_host.py tests/test_fused_forward.py tests/test_fused_backward.py \
        tests/test_wide_forward.py tests/test_wide_backward.py tests/test_stage_packs.py -m gpu -x -q \
        -k "gpu_stage_kernels or (gpu_matches_oracle and (300 or 33 or 1536)) or gpu_saved_activations or (gpu_fused_forward and (37 or 65 or 63)) or (gpu_fused_backward and (333 or 65)) or (gpu_wide_forward and (130 or 63 or 128)) or (gpu_wide_backward and (130 or 63))"
      for tool in racecheck synccheck; do
        step "$tool" compute-sanitizer --tool "$tool" --error-exitcode 9 \
          "$PY" -m pytest tests/test_fused_forward.py tests/test_fused_backward.py tests/test_wide_forward.py \
          tests/test_wide_backward.py tests/test_stage_packs.py -m gpu -x -q \
          -k "(gpu_stage_kernels and 64 and vectors and float32) or (gpu_fused_forward and 37 and bfloat16) or (gpu_fused_backward and 65 and bfloat16) or (gpu_engine_agrees and bfloat16 and test_fused_backward) or (gpu_wide_forward and 130 and bfloat16) or (gpu_wide_backward and 130 and bfloat16)"
      done ;;
    bench) step bench "$PY" bench/run.py --batch 8,32 --out-dir "$OUTDIR" --append-results ;;
    bench8|bench32) step "$s" "$PY" bench/run.py --batch "${s#bench}" --out-dir "$OUTDIR" --append-results ;;
    model) step model "$PY" bench/model_speed.py --json "$OUTDIR/model_speed.json" ;;
    quick)
      step triton-tests ptest -m gpu tests/test_triton.py
      step triton-bench "$PY" bench/run.py --batch 32 --dtypes bf16 --stages 1,2,3,4 --variants triton,cuda,compile \
        --runs 30 --warmup 5 --out-dir "$OUTDIR" --append-results
      # The wide and the split backward forced at stages 2-4, beside the table's (tiled at stage 2,
      # wide at 3-4) above: the choice rests on the ledger's model (configs.TILED_BWD_MAX_WIDTH).
      for bwd in wide split; do
        step "$bwd-bwd-bench" env GK_TRITON_BACKWARD=$bwd "$PY" bench/run.py --batch 32 --dtypes bf16 --stages 2,3,4 \
          --variants triton --passes fwd+bwd --runs 10 --warmup 2 --out-dir "$OUTDIR/${bwd}_bwd"
      done
      # tests/test_backend_contract.py: the GPU promises of every fused backend (bitwise reruns at stage shapes)
      step cuda-tests ptest -m gpu tests/test_cuda_host.py tests/test_fused_forward.py tests/test_fused_backward.py \
        tests/test_wide_forward.py tests/test_wide_backward.py tests/test_backend_contract.py tests/test_stage_packs.py
      step sanitizer compute-sanitizer --tool memcheck --error-exitcode 9 \
        "$PY" -m pytest tests/test_cuda_host.py tests/test_fused_forward.py tests/test_fused_backward.py \
        tests/test_wide_forward.py tests/test_wide_backward.py tests/test_stage_packs.py -m gpu -x -q \
        -k "(gpu_stage_kernels and 64 and float32) or (gpu_matches_oracle and (300 or 33)) or (gpu_fused_forward and (37 or 65 or 63)) or (gpu_fused_backward and (333 or 65)) or (gpu_wide_forward and (130 or 63)) or (gpu_wide_backward and (130 or 63))"
      for tool in racecheck synccheck; do  # the fused kernels' barriers, on one small case each
        step "$tool" compute-sanitizer --tool "$tool" --error-exitcode 9 \
          "$PY" -m pytest tests/test_fused_forward.py tests/test_fused_backward.py tests/test_wide_forward.py \
          tests/test_wide_backward.py tests/test_stage_packs.py -m gpu -x -q \
          -k "(gpu_stage_kernels and 64 and vectors and float32) or (gpu_fused_forward and 37 and bfloat16) or (gpu_fused_backward and 65 and bfloat16) or (gpu_engine_agrees and bfloat16 and test_fused_backward) or (gpu_wide_forward and 130 and bfloat16) or (gpu_wide_backward and 130 and bfloat16)"
      done
      step ledger "$PY" -m gemini_kernels.ledger
      step call-overhead "$PY" bench/call_overhead.py --device cuda --calls 200 --repeats 5 ;;
    *) echo "gpu_checks: unknown step '$s' (tests, sanitizer, bench, bench8, bench32, model, quick)" >&2; failed=1 ;;
  esac
done
cp bench/RESULTS.md "$OUTDIR/RESULTS.md" 2>/dev/null
exit $failed
