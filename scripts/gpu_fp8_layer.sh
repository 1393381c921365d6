#!/usr/bin/env bash
# On a 1-GPU Hopper host (from the repo root, wheels in .whl): precision="fp8" layers, ranks
# sharing the GPU under MPS.
#   tests   tests/test_fp8_gpu.py (the FP8 kernel and quantisers) and, with FP8L_KERNEL_TESTS=1,
#           tests/test_kernels_gpu.py
#   layers  tests/gpu_sfattn.py's FP8 part (GPU_SFATTN_ONLY=fp8) on 1 rank, 1x2 and 2x2
#   study   perf/bench_layer.py on 2 emulated machines (--machines 2, one rank each) at the links of
#           $FP8L_LINKS (GB/s,us; default "40,10 20,10 10,10"), precisions $FP8L_PRECISIONS (default
#           "bf16 fp8"; fp8-accurate too), shapes $FP8L_SHAPES
#           (default flux3072), algorithms usp, tas, torus, on $FP8L_MACHINES machines (default 2; 4 runs
#           $FP8L_SHAPES4, default flux3072); then perf/report_layer.py
#   e2e     examples/dit_sp.py --precision fp8, 2 ranks sharing the GPU: Flux 2048^2 and Wan (33
#           frames of 480x832; FP8L_E2E picks: "flux wan"), sfattn in bf16 and in FP8 against the
#           1-rank reference; FP8L_E2E_PRECISIONS (default "fp8"; "fp8 fp8-accurate") for Flux
# FP8L_STEPS picks steps (default all). Results: $OUT/*.json, $OUT/report.md, logs.
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
STEP_SHOW='PASSED|passed|ok:|Error|error|ms  \('
source scripts/gpu_common.sh
want() { [[ " ${FP8L_STEPS:-tests layers study e2e} " == *" $1 "* ]]; }
python3 - <<'PY' || exit 1
from concurrent.futures import ThreadPoolExecutor
from sfattn.kernels import _build
cfgs = [_build.KernelConfig(i, d, "bf16", "sm_90a", 0, ()) for i in ("sm90fp8", "sm90ws") for d in (64, 128)]
cfgs.append(_build.KernelConfig("quant", 0, "bf16", "sm_90a", 0, ()))
with ThreadPoolExecutor(8) as ex:
    list(ex.map(_build.compile_kernel, cfgs))
print(f"compiled {len(cfgs)} kernel configurations")
PY
if want tests; then
  step fp8_tests 300 python3 -m pytest -q -x tests/test_fp8_gpu.py
  [ "${FP8L_KERNEL_TESTS:-0}" = 1 ] && step kernel_tests 400 python3 -m pytest -q -x tests/test_kernels_gpu.py
fi
if want layers; then
  for nm in ${FP8L_MESHES:-1:1 2:1 4:2}; do
    n=${nm%:*}; m=${nm#*:}
    GPU_SFATTN_ONLY=fp8 step fp8_layers_${n}_$m 200 python3 -m oneside.launch -n $n --machines $m --backend nvshmem tests/gpu_sfattn.py
  done
fi
if want study; then
  for m in ${FP8L_MACHINES:-2}; do  # virtual machines of one rank each, all on this GPU
    shapes=${FP8L_SHAPES:-flux3072}
    [ "$m" -gt 2 ] && shapes=${FP8L_SHAPES4:-flux3072}
    for link in ${FP8L_LINKS:-40,10 20,10 10,10}; do
      for prec in ${FP8L_PRECISIONS:-bf16 fp8}; do
        ONESIDE_EMULATE_LINK=$link step study_${m}m_${link/,/_}_$prec 200 python3 -m oneside.launch -n $m --machines $m \
          --backend nvshmem perf/bench_layer.py --out "$OUT" --shapes $shapes --algos usp,tas,torus \
          --precision $prec --heap $((48 / m))GiB
      done
    done
  done
  cp docs/perf/summary.json /tmp/summary_before.json
  python3 perf/report_layer.py "$OUT"/layer_*link*.json --summary > "$OUT/report.md" 2>&1 || status=1
  python3 - <<'PY' > "$OUT/summary_gpu.json"
import json
a, b = json.load(open("/tmp/summary_before.json")), json.load(open("docs/perf/summary.json"))
print(json.dumps({k: v for k, v in b.items() if a.get(k) != v}, indent=1))
PY
fi
if want e2e; then
  cp docs/perf/summary.json "$OUT/summary_e2e.json"
  if [[ " ${FP8L_E2E:-flux wan} " == *" flux "* ]]; then
    for prec in ${FP8L_E2E_PRECISIONS:-fp8}; do
      step e2e_flux2048_$prec 400 python3 -m oneside.launch -n 2 --backend nvshmem \
        examples/dit_sp.py --model flux --size 2048 --ranks-per-gpu 2 --peers --precision $prec --steps ${FP8L_E2E_STEPS:-8} \
        --json "$OUT/e2e_${prec/-/_}_flux2048.json" --summary "$OUT/summary_e2e.json"
    done
  fi
  [[ " ${FP8L_E2E:-flux wan} " == *" wan "* ]] && step e2e_wan 400 python3 -m oneside.launch -n 2 --backend nvshmem \
    examples/dit_sp.py --model wan --ranks-per-gpu 2 --peers --precision fp8 --steps ${FP8L_E2E_STEPS:-8} \
    --json "$OUT/e2e_fp8_wan.json"
  grep -h -A6 "^flux\|^wan" "$OUT"/e2e_*.log | grep -v "^WARN" | cut -c1-260
fi
echo quit | nvidia-cuda-mps-control 2>/dev/null || true
grep -h "ok: fp8" "$OUT"/fp8_layers_*.log 2>/dev/null | cut -c1-150
cat "$OUT/report.md" 2>/dev/null | tail -30
exit $status
