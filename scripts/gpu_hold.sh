#!/usr/bin/env bash
# On a 1-GPU Hopper host (from the repo root, wheels in .whl): the emulated link's hold with and
# without an SM (ONESIDE_EMULATE_HOLD=kernel|host): perf/emulate_hold.py, then layers on two
# emulated machines at the links of $HOLD_LINKS (default "40,10 10,10") in both modes, plus the
# kernel mode with a non-persistent attention kernel (whose blocks retire and free SMs).
source scripts/gpu_common.sh
STEP_SHOW='attention kernel alone|ms  \(|Error|error'
python3 - <<'PY' || exit 1
from concurrent.futures import ThreadPoolExecutor
from sfattn.kernels import _build
cfgs = [_build.KernelConfig("sm90ws", d, "bf16", "sm_90a", 0, o) for d in (64, 128) for o in ((), (("PERSIST", 0),))]
with ThreadPoolExecutor(8) as ex:
    list(ex.map(_build.compile_kernel, cfgs))
PY
ONESIDE_EMULATE_LINK=40,10 step hold 120 python3 -m oneside.launch -n 2 --machines 2 --backend nvshmem \
  perf/emulate_hold.py --json "$OUT/emulate_hold.json"
for link in ${HOLD_LINKS:-40,10 10,10}; do
  for mode in kernel host; do
    ONESIDE_EMULATE_HOLD=$mode ONESIDE_EMULATE_LINK=$link step layer_${mode}_${link/,/_} 200 python3 -m oneside.launch \
      -n 2 --machines 2 --backend nvshmem perf/bench_layer.py --out "$OUT/$mode" --shapes ${HOLD_SHAPES:-flux3072} \
      --algos usp,tas,torus --heap 24GiB
  done
done
if [ "${HOLD_PERSIST0:-1}" = 1 ]; then
  SFATTN_IMPL=sm90ws:PERSIST=0 ONESIDE_EMULATE_HOLD=kernel ONESIDE_EMULATE_LINK=40,10 step layer_kernel_p0_40 200 \
    python3 -m oneside.launch -n 2 --machines 2 --backend nvshmem perf/bench_layer.py --out "$OUT/p0" \
    --shapes flux3072 --algos usp,tas,torus --heap 24GiB
fi
grep -h "ms  (" "$OUT"/layer_*.log | head -40
exit $status
