#!/usr/bin/env bash
# On a 1-GPU Hopper host (from the repo root, wheels in .whl): the FP8 kernel's GPU tests and its
# benchmark against our bf16 kernel and FlashAttention-3 (bf16 and FP8).
#   FP8_TESTS=0      skip tests/test_fp8_gpu.py
#   FP8_BENCH="--shapes 16k --impls sm90fp8 sm90fp8:PERSIST=1"   arguments of perf/bench_fp8.py
#                    (default: all shapes); "" skips it
# Logs and fp8.json go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
python3 - <<'PY' || exit 1
import os, re
from concurrent.futures import ThreadPoolExecutor
from sfattn.kernels import _build
from sfattn.kernels.flash import _parse_impl
impls = {"sm90fp8", "sm90fp8:PERSIST=1", "sm90fp8:KST=2,VST=2", "sm90ws",
         *re.findall(r"sm90\S*", os.environ.get("FP8_BENCH", ""))}
cfgs = []
for impl in impls:
    base, bn, opts = _parse_impl(impl)
    for d in (64, 128):
        cfgs.append(_build.KernelConfig(base, d, "bf16", "sm_90a", bn, opts))
with ThreadPoolExecutor(16) as ex:
    list(ex.map(_build.compile_kernel, cfgs))
print(f"compiled {len(cfgs)} kernel configurations")
PY
status=0
if [ "${FP8_TESTS:-1}" = 1 ]; then
  timeout 300 python3 -m pytest -q -x tests/test_fp8_gpu.py > "$OUT/fp8_tests.log" 2>&1 || status=1
  tail -15 "$OUT/fp8_tests.log" | grep -v "^$"
fi
if [ -n "${FP8_BENCH-x}" ]; then
  args=${FP8_BENCH-}
  [ "$args" = x ] && args=""
  timeout ${BENCH_TIMEOUT:-300} python3 perf/bench_fp8.py --out-dir "$OUT" $args > "$OUT/bench_fp8.log" 2>&1 || status=1
  tail -8 "$OUT/bench_fp8.log"
fi
exit $status
