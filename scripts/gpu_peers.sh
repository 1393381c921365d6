#!/usr/bin/env bash
# On the 2-GPU host (from the repo root): issue 5's measurements. Installs the offline wheels, builds
# the shim, then runs the steps of $GPU_PEERS_STEPS in order (default: all; estimates on 2 x H200):
#   peers   perf/attention_vs_peers.py on 2 ranks, every shape ($PEERS_SHAPES)          ~5-6 min
#           (split shapes over calls with PEERS_TAG: peers_TAG.json; report_peers merges them)
#   vm2     bench_layer, 2 virtual machines (-n 2 --machines 2), each link of $VM2_LINKS  ~1 min each
#   vm4     bench_layer, 4 virtual machines on 2 GPUs (-n 4 --machines 4: 2 ranks per GPU),
#           each link of $VM4_LINKS, under MPS (GPU_PEERS_MPS=0: without)              ~1.5 min each
#   report  report_peers.py, report_layer.py, model.py --calibrate over docs/perf's results plus
#           the new ones (CPU, seconds)
# Links: "GBPS,LATENCY_US" for ONESIDE_EMULATE_LINK; the defaults are perf/model.py's VM2_LINKS /
# VM4_LINKS (the model's largest Torus gains at 2 machines; the USP/TAS/Torus ordering changes at 4).
# All steps take ~13-15 min: split over two calls, each under ~9 min:
#   GPU_PEERS_STEPS="peers report" bash scripts/gpu_peers.sh
#   GPU_PEERS_STEPS="vm2 vm4 report" bash scripts/gpu_peers.sh
# Every run is under `timeout`, cut to what is left of $GPU_PEERS_BUDGET_S (default 540 s from the
# start); a run that no longer fits is skipped. Logs: /tmp/gpu_peers/*.log. $OUT gets at most 8 files,
# all to be copied into docs/perf/ as they are: the new result JSONs (peers.json, peers.png,
# layer_*.json), and after "report" summary.json (docs/perf's, updated), model_calibration.json and
# model_predictions.json. A short table comes last.
set -uo pipefail
STEPS=${GPU_PEERS_STEPS-peers vm2 vm4 report}
BUDGET=${GPU_PEERS_BUDGET_S:-540}
VM2_LINKS=${VM2_LINKS-15,10 10,10 8,10}
VM4_LINKS=${VM4_LINKS-40,10 20,10 10,10}
PEERS_SHAPES=${PEERS_SHAPES:-flux1024,flux3072,flux4096,video20s,video40s}
LAYER_SHAPES=${LAYER_SHAPES:-flux3072,flux4096}
for s in $STEPS; do
  case $s in peers|vm2|vm4|report) ;; *) echo "GPU_PEERS_STEPS: unknown step '$s' (peers vm2 vm4 report)"; exit 2 ;; esac
done
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/tmp/gpu_peers; rm -rf "$W"; mkdir -p "$W/res"
export PYTHONUNBUFFERED=1 NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
if [ "${GPU_PEERS_INSTALL:-1}" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
  python3 -m oneside.native > "$W/shim-build.log" 2>&1 || { tail -30 "$W/shim-build.log"; exit 1; }
fi
status=0
declare -a TABLE
# Ranks sharing a GPU (vm4) run under MPS (GPU_PEERS_MPS=1, the default): without it the two
# processes time-slice the GPU and each one's spinning waits and link-timer kernels steal the
# other's slices (measured on one H100, 2 virtual machines, 20 GB/s, flux3072: the link paced at
# 14.8 GB/s and one rank's 1-GPU SDPA took 54.6 ms instead of 27.3; under MPS 20.0 GB/s and 27.3 ms).
mps_on() {
  [ "${GPU_PEERS_MPS:-1}" = 1 ] || return 0
  export CUDA_MPS_PIPE_DIRECTORY=$W/mps CUDA_MPS_LOG_DIRECTORY=$W/mpslog
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d && sleep 2; then
    echo "MPS control daemon started ($CUDA_MPS_PIPE_DIRECTORY)"
  else
    echo "MPS did not start: ranks sharing a GPU time-slice it (timings distorted)"
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
}
mps_off() {
  [ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ] || return 0
  echo quit | nvidia-cuda-mps-control
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
}
trap mps_off EXIT
step() {  # name limit_s command...: run under timeout (cut to the budget left), log, record
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 60 ]; then
    TABLE+=("$(printf '%-22s %-8s %5s  %s' "$name" skipped - "budget spent ($SECONDS s of $BUDGET)")"); status=1; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  echo "== $name (limit $limit s): $*"
  timeout "$limit" "$@" > "$W/$name.log" 2>&1
  local rc=$?
  grep -v "^WARN" "$W/$name.log" | tail -15
  local res=ok; [ "$rc" = 0 ] || { res="exit $rc"; [ "$rc" = 124 ] && res=timeout; status=1; }
  TABLE+=("$(printf '%-22s %-8s %5s  %s' "$name" "$res" "$((SECONDS - t0))" "$W/$name.log")")
}
for s in $STEPS; do
  case $s in
    peers)
      step peers 420 python3 -m oneside.launch -n 2 --backend nvshmem perf/attention_vs_peers.py \
        --shapes "$PEERS_SHAPES" ${PEERS_TAG:+--tag "$PEERS_TAG"} --out "$W/res" ;;
    vm2)
      for link in $VM2_LINKS; do
        step "vm2_link${link/,/_}" 150 env ONESIDE_EMULATE_LINK="$link" python3 -m oneside.launch -n 2 --machines 2 \
          --backend nvshmem perf/bench_layer.py --shapes "$LAYER_SHAPES" --out "$W/res"
      done ;;
    vm4)
      mps_on
      for link in $VM4_LINKS; do
        step "vm4_link${link/,/_}" 200 env ONESIDE_EMULATE_LINK="$link" python3 -m oneside.launch -n 4 --machines 4 \
          --backend nvshmem perf/bench_layer.py --shapes "$LAYER_SHAPES" --out "$W/res"
      done
      mps_off ;;
    report)
      # the reports read docs/perf's committed results plus the new ones (new files win)
      cp "$W"/res/*.json docs/perf/ 2>/dev/null
      python3 - > "$W/report.log" 2>&1 <<'EOF'
import glob, subprocess, sys
def run(*cmd):
    print("$", " ".join(cmd), flush=True)
    r = subprocess.run([sys.executable, *cmd])
    if r.returncode:
        print(f"(exit {r.returncode})", flush=True)
    return r.returncode
rc = 0
peers = sorted(glob.glob("docs/perf/peers*.json"))
if peers:
    rc |= run("perf/report_peers.py", *peers)
layers = sorted(glob.glob("docs/perf/layer_*.json"))
rc |= run("perf/report_layer.py", *layers, "--summary")
rc |= run("perf/model.py", "--calibrate", *layers, "--out", "docs/perf", "--markdown")
sys.exit(rc)
EOF
      rc=$?
      tail -60 "$W/report.log"
      [ "$rc" = 0 ] || status=1
      TABLE+=("$(printf '%-22s %-8s %5s  %s' report "$([ $rc = 0 ] && echo ok || echo "exit $rc")" - "$W/report.log")")
      cp docs/perf/summary.json docs/perf/model_calibration.json docs/perf/model_predictions.json "$W/res/" ;;
  esac
done
# results into $OUT: at most 8 plain files, names of letters, digits and ._- only; the measured
# JSONs first, then what the reports make (all of which a CPU can remake from those JSONs:
# perf/report_peers.py, perf/report_layer.py, perf/model.py --calibrate ... --out docs/perf)
n=0
for f in "$W"/res/peers*.json "$W"/res/layer_*.json "$W"/res/summary.json "$W"/res/peers*.png \
         "$W"/res/model_calibration.json "$W"/res/model_predictions.json; do
  [ -f "$f" ] || continue
  b=$(basename "$f")
  [[ "$b" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "not copied (odd name): $b"; status=1; continue; }
  if [ "$n" -ge 8 ]; then
    case $b in
      peers*.json|layer_*.json) echo "NOT copied (8 files already; split the steps over calls): $b"; status=1 ;;
      *) echo "not copied (8 files already; remake it on a CPU from the JSONs): $b" ;;
    esac
    continue
  fi
  cp "$f" "$OUT/" && n=$((n + 1))
done
echo
python3 - "$W/res" <<'EOF' 2>/dev/null || true
import json, sys
from pathlib import Path
res = Path(sys.argv[1])
for p in sorted(res.glob("layer_*.json")):
    d = json.loads(p.read_text())
    for shape, row in d["ms"].items():
        t = {a: row.get(a) for a in ("usp", "tas", "torus")}
        if None in t.values():
            continue
        order = " < ".join(sorted(t, key=t.get))
        print(f"{p.stem:<28} {shape:<9} usp {t['usp']:7.2f} tas {t['tas']:7.2f} torus {t['torus']:7.2f}  "
              f"usp/torus {t['usp'] / t['torus']:.3f}  {order}")
s = res / "summary.json"
if s.exists():
    d = json.loads(s.read_text())
    for k in ("best_over_yunchang_flux3072_same_kernel", "worst_over_yunchang_any_shape",
              "worst_over_yunchang_any_shape_any_kernel", "torus_over_usp_emulated_best",
              "torus_over_best_baseline_emulated_min", "model_max_rel_error",
              "model_emulated_rpg_order_pairs_matched", "model_emulated_rpg_order_pairs_compared"):
        print(f"{k:<45} {d.get(k, '-')}")
EOF
echo
printf '%-22s %-8s %5s  %s\n' step result s log
for line in "${TABLE[@]}"; do echo "$line"; done
echo "files in \$OUT: $n (copy them into docs/perf/); total $SECONDS s"
exit $status
