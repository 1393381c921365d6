#!/usr/bin/env bash
# On a 1-GPU Hopper host (from the repo root): the kernel GPU tests, then the kernel benchmark.
#   KERNEL_TESTS=0    skip the tests
#   KERNEL_BENCH="--seqs 16384 65536 --head-dims 128 --blocks 1 4 --impls sm90ws sm90ws:TMA=0"
#                     arguments of perf/bench_kernel.py (default: the full table); "" skips it
#   KERNEL_IMPLS="sm90ws:BN=192 ..."  extra configurations to precompile (those the bench names)
# Logs stay in /tmp; kernel.json (+ table/plot) go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
# compile the kernels the tests and the benchmark use, in parallel, into the disk cache
python3 - <<'PY' || exit 1
import os
from concurrent.futures import ThreadPoolExecutor
from sfattn.kernels import _build
from sfattn.kernels.flash import _parse_impl
cfgs = [c for c in _build.all_configs(("sm_90a",))]
for impl in ("sm90ws128", "sm90ws:TMA=0", *os.environ.get("KERNEL_IMPLS", "").split()):
    base, bn, opts = _parse_impl(impl)
    cfgs += [_build.KernelConfig(base, d, t, "sm_90a", bn, opts) for d in (64, 128) for t in ("bf16", "fp16")]
with ThreadPoolExecutor(16) as ex:
    list(ex.map(_build.compile_kernel, cfgs))
print(f"compiled {len(cfgs)} kernel configurations")
PY
status=0
if [ "${KERNEL_TESTS:-1}" = 1 ]; then
  timeout 500 python3 -m pytest -q -x tests/test_kernels_gpu.py > /tmp/kernel_tests.log 2>&1 || status=1
  tail -5 /tmp/kernel_tests.log
fi
if [ -n "${KERNEL_BENCH-x}" ]; then
  args=${KERNEL_BENCH-}
  [ "$args" = x ] && args=""
  timeout 560 python3 perf/bench_kernel.py --out-dir "$OUT" $args > /tmp/bench_kernel.log 2>&1 || status=1
  tail -40 /tmp/bench_kernel.log
fi
exit $status
