#!/usr/bin/env bash
# On a GPU host (from the repo root): end-to-end sequence-parallel DiT steps with examples/dit_sp.py.
# Installs the offline wheels, builds the shim, then runs each name of $E2E_RUNS:
#   flux2048, flux4096  Flux full width (2 double + 4 single blocks), $E2E_RANKS ranks on as many GPUs
#   wan20s              Wan 2.1-1.3B width (12 heads), 4 blocks, 321 frames 480x832 (126,360 tokens)
#   wan20s14b           the same at Wan 2.1-14B width (40 heads)
#   check               correctness only, 2 and 3 ranks sharing ONE GPU under diffusers' context
#                       parallelism: Flux 1040^2 (4225 tokens: uneven shards) in bf16 and fp16, Wan 14B
#                       width (40 heads: not divisible by 3), Qwen-Image and LTX at uneven sizes
#   flux1024shared      Flux 1024^2 compiled, 1 rank vs 2 ranks sharing one GPU (the per-layer fixed cost)
# Default E2E_RUNS="check flux2048 flux4096 wan20s". E2E_COMPILE=1 (default) adds --compile,
# E2E_STEPS (default 4) timed steps, E2E_TIMEOUT (default 900) seconds per run, E2E_ARGS extra
# arguments for every run. flux4096 writes e2e_flux4096_2gpu_speedup / e2e_flux4096_over_usp into
# $OUT/summary.json (a copy of docs/perf/summary.json: merge those two keys back). Logs: /tmp/e2e_*.log;
# results: $OUT/e2e.json; a short table last.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/e2e
export PYTHONUNBUFFERED=1 NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
if [ "${E2E_INSTALL:-1}" = 1 ]; then  # E2E_INSTALL=0 E2E_BACKEND=host E2E_ARGS=--tiny: a CPU smoke run
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
  python3 -m oneside.native > /tmp/shim-build.log 2>&1 || { tail -30 /tmp/shim-build.log; exit 1; }
fi
python3 -c "import diffusers" 2>/tmp/e2e/import.log || { tail -5 /tmp/e2e/import.log; echo "diffusers does not import: add the missing wheels (../shared/device/fetch-wheels.sh NAME...)"; exit 1; }
python3 -c "import yunchang" 2>/dev/null || echo "yunchang does not import: the USP rows will be skipped"
cp docs/perf/summary.json "$OUT/summary.json"
if [ "${E2E_MPS:-1}" = 1 ]; then  # ranks sharing a GPU run side by side under MPS, not time-sliced
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  nvidia-cuda-mps-control -d 2>/dev/null || true
  trap 'echo quit | nvidia-cuda-mps-control 2>/dev/null || true' EXIT
fi
N=${E2E_RANKS:-2}
common="--steps ${E2E_STEPS:-4} ${E2E_ARGS:-}"
[ "${E2E_COMPILE:-1}" = 1 ] && common="$common --compile"
status=0
run() {  # name ranks args...
  local name=$1 n=$2; shift 2
  echo "== $name: $n ranks: $*"
  timeout "${E2E_TIMEOUT:-900}" python3 -m oneside.launch -n "$n" --backend "${E2E_BACKEND:-nvshmem}" examples/dit_sp.py "$@" \
    --json "/tmp/e2e/$name.json" 2>&1 | grep -v "^WARN" > "/tmp/e2e_$name.log"
  local rc=${PIPESTATUS[0]}
  tail -12 "/tmp/e2e_$name.log"
  [ "$rc" = 0 ] || { status=1; echo "{\"failed\": $rc}" > "/tmp/e2e/$name.json"; }
}
rm -f /tmp/e2e/*.json
for name in ${E2E_RUNS-check flux2048 flux4096 wan20s}; do
  case $name in
    flux2048) run $name "$N" --model flux --size 2048 $common ;;
    flux4096) run $name "$N" --model flux --size 4096 $common --summary "$OUT/summary.json" ;;
    wan20s) run $name "$N" --model wan --heads 12 --frames 321 $common ;;
    wan20s14b) run $name "$N" --model wan --frames 321 $common ;;
    check)
      export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
      run check_flux_bf16_2 2 --model flux --size 1040 --ranks-per-gpu 2 $common
      run check_flux_fp16_3 3 --model flux --size 1040 --dtype float16 --ranks-per-gpu 3 $common
      run check_flux_bf16_3 3 --model flux --size 1040 --ranks-per-gpu 3 $common
      run check_wan_3 3 --model wan --frames 9 --height 240 --width 416 --ranks-per-gpu 3 $common
      run check_qwen_2 2 --model qwenimage --size 1040 --ranks-per-gpu 2 $common
      run check_ltx_3 3 --model ltx --frames 17 --height 352 --width 608 --ranks-per-gpu 3 $common ;;
    flux1024shared) CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} run $name 2 --model flux --size 1024 --ranks-per-gpu 2 \
      --peers $common ;;
    *) echo "E2E_RUNS: unknown run '$name' (flux2048 flux4096 wan20s wan20s14b check flux1024shared)"; status=1 ;;
  esac
done
python3 - "$OUT/e2e.json" <<'EOF'
import json, sys
from pathlib import Path
runs = {p.stem: json.loads(p.read_text()) for p in sorted(Path("/tmp/e2e").glob("*.json")) if p.stem != "import"}
Path(sys.argv[1]).write_text(json.dumps(runs, indent=1))
print(f"\n{'run':<18} {'tokens':>7} {'ranks':>5} {'1 GPU ms':>9} {'sfattn ms':>9} {'USP ms':>8} {'diff-U ms':>9} "
      f"{'speedup':>7} {'/USP':>6} {'max err':>8} ok")
for name, r in runs.items():
    if "failed" in r:
        print(f"{name:<18} failed (exit {r['failed']}): see /tmp/e2e_{name}.log")
        continue
    ms, err = r["ms"], max((max(e.values()) for e in r["rel_err"].values()), default=float("nan"))
    col = lambda k, w: f"{ms[k]:{w}.1f}" if k in ms else f"{'-':>{w}}"  # noqa: E731
    over = f"{r['over_usp']:6.3f}" if "over_usp" in r else f"{'-':>6}"
    print(f"{name:<18} {r['tokens'] + r['text_tokens']:>7} {r['ranks']:>5} {ms['1gpu']:9.1f} {ms['sfattn']:9.1f} "
          f"{col('usp', 8)} {col('diffusers-ulysses', 9)} {r['speedup']:7.3f} {over} {err:8.1e} "
          f"{'yes' if r['ok'] else 'NO'}" + ("  (shared GPU)" if r["shared_gpu"] else ""))
EOF
exit $status
