# Sourced by the one-GPU scripts (gpu_reliability.sh, gpu_fixed.sh), from the repo root: results
# directory, the offline install of .whl, the shim build, MPS on, and `step` (a timed, logged run
# whose summary line shows the lines of its log that match $STEP_SHOW).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m oneside.native > "$OUT/shim-build.log" 2>&1 || { tail -30 "$OUT/shim-build.log"; exit 1; }
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
nvidia-cuda-mps-control -d 2>/dev/null || true
status=0
STEP_SHOW=${STEP_SHOW:-PASSED|passed|ok:|Error|error|us\"}
step() {  # name timeout command...
  local name=$1 t=$2; shift 2
  local t0=$SECONDS
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  [ $rc = 0 ] || status=1
  printf '%-14s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$(grep -v '^WARN' "$OUT/$name.log" | grep -E "$STEP_SHOW" | tail -2 | tr '\n' ' ' | cut -c1-220)"
}
