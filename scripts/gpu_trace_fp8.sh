#!/usr/bin/env bash
# On a 1-GPU Hopper host (repo root, wheels in .whl): the FP8 kernel's clock64 timeline
# (perf/trace_fp8.py) for the variants in TRACE_KNOBS at head dim 128, the defaults at 64, then
# gpu_fp8.sh (FP8_BENCH as there; FP8_TESTS=1 runs the GPU tests too, default 0). TRACE_ARGS: more
# arguments of the head-dim-128 trace (e.g. "--blocks 4"). Logs and JSON go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
read -r -a KNOBS <<< "${TRACE_KNOBS:-_ OV=0 BN=128}"   # "_" = the defaults
KN=(); for k in "${KNOBS[@]}"; do [ "$k" = _ ] && KN+=("") || KN+=("$k"); done
python3 - "${KN[@]}" <<'PY' || exit 1
import sys
from concurrent.futures import ThreadPoolExecutor
from sfattn.kernels import _build
from sfattn.kernels.flash import _parse_impl
cfgs = []
for d, knobs in [(128, k) for k in sys.argv[1:]] + [(64, "")]:
    impl = "sm90fp8:TR=1" + (f",{knobs}" if knobs else "")
    if "BN=" not in impl:  # as Fp8Launch adds it for these 16k-key blocks
        impl += f",BN={_build.FP8_BN_DEFAULT[d]}"
    base, bn, opts = _parse_impl(impl)
    cfgs.append(_build.KernelConfig(base, d, "bf16", "sm_90a", bn, opts))
with ThreadPoolExecutor(16) as ex:
    list(ex.map(_build.compile_kernel, cfgs))
print(f"compiled {len(cfgs)} TR builds")
PY
timeout 200 python3 perf/trace_fp8.py ${TRACE_ARGS:-} --knobs "${KN[@]}" --json "$OUT/trace_fp8_d128.json" 2>&1 | tee "$OUT/trace128.log"
timeout 100 python3 perf/trace_fp8.py --head-dim 64 --json "$OUT/trace_fp8_d64.json" 2>&1 | tee "$OUT/trace64.log"
FP8_TESTS=${FP8_TESTS:-0} bash scripts/gpu_fp8.sh
