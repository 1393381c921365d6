#!/usr/bin/env bash
# On a 1-GPU Hopper host (from the repo root, wheels in .whl): the FP8 kernel's GPU tests and its
# benchmark against our bf16 kernel and FlashAttention-3 (bf16 and FP8).
#   FP8_PIPES=1      first perf/pipes.py (do MUFU.EX2 and the F2FP packs share a unit), pipes.json
#   FP8_TESTS=0      skip tests/test_fp8_gpu.py; FP8_TESTS_K="LS or PP" selects tests (pytest -k)
#   FP8_BENCH="--shapes 16k --impls sm90fp8 sm90fp8:PERSIST=1"   arguments of perf/bench_fp8.py
#                    (default: all shapes); "" skips it
# Logs and fp8.json go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
if [ "${FP8_PIPES:-0}" = 1 ]; then
  timeout 120 python3 perf/pipes.py --json "$OUT/pipes.json" > "$OUT/pipes.log" 2>&1; cat "$OUT/pipes.log"
fi
python3 - <<'PY' || exit 1
import os, re
from concurrent.futures import ThreadPoolExecutor
from sfattn.kernels import _build
from sfattn.kernels.flash import _parse_impl
impls = {"sm90fp8", "sm90fp8:PERSIST=1", "sm90fp8:KST=2,VST=2", "sm90ws",
         *re.findall(r"sm90\S*", os.environ.get("FP8_BENCH", ""))}
if os.environ.get("FP8_TESTS", "1") == "1":  # the tests' knob builds too, compiled in parallel here
    impls |= set(re.findall(r'"(sm90fp8[^"]*)"', open("tests/test_fp8_gpu.py").read()))
PV16 = {"sm90fp8", "sm90fp8:BN=128", "sm90fp8:BN=192", "sm90fp8:OV=1"}  # fp8-accurate tests
cfgs = []
for impl in impls:
    base, bn, opts = _parse_impl(impl)
    for d in (64, 128):
        for pv in ((None, 16) if impl in PV16 else (None,)):
            o = tuple(sorted(opts + ((("PV", pv),) if pv else ())))  # as the launcher adds PV=16
            try:
                cfgs.append(_build.KernelConfig(base, d, "bf16", "sm_90a", bn, o))
            except ValueError:  # a knob that this head dim or V precision does not take
                pass
with ThreadPoolExecutor(16) as ex:
    list(ex.map(_build.compile_kernel, cfgs))
print(f"compiled {len(cfgs)} kernel configurations")
PY
status=0
if [ "${FP8_TESTS:-1}" = 1 ]; then
  timeout 300 python3 -m pytest -q -x tests/test_fp8_gpu.py ${FP8_TESTS_K:+-k "$FP8_TESTS_K"} > "$OUT/fp8_tests.log" 2>&1 || status=1
  tail -15 "$OUT/fp8_tests.log" | grep -v "^$"
fi
if [ -n "${FP8_BENCH-x}" ]; then
  args=${FP8_BENCH-}
  [ "$args" = x ] && args=""
  timeout ${BENCH_TIMEOUT:-300} python3 perf/bench_fp8.py --out-dir "$OUT" $args > "$OUT/bench_fp8.log" 2>&1 || status=1
  tail -8 "$OUT/bench_fp8.log"
fi
exit $status
