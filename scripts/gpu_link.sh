#!/usr/bin/env bash
# On a 1-GPU Hopper host (from the repo root, wheels in .whl): does an emulated link's transfer
# overlap compute (perf/emulate_link.py), and layers on two emulated machines at $LINK_LINKS
# (default "40,10 10,10"), bf16, Flux 3072^2; with LINK_BASE=<dir> (an older tree, e.g. from
# `git archive`) the same layers from that tree too, in the same run.
source scripts/gpu_common.sh
STEP_SHOW='transfer beside|ms  \(|Error|error'
ONESIDE_EMULATE_LINK=40,10 step link 120 python3 -m oneside.launch -n 2 --machines 2 --backend nvshmem \
  perf/emulate_link.py --json "$OUT/emulate_link.json"
for link in ${LINK_LINKS:-40,10 10,10}; do
  ONESIDE_EMULATE_LINK=$link step layer_${link/,/_} 200 python3 -m oneside.launch -n 2 --machines 2 --backend nvshmem \
    perf/bench_layer.py --out "$OUT/now" --shapes flux3072 --algos usp,tas,torus --heap 24GiB
  if [ -n "${LINK_BASE:-}" ]; then
    (cd "$LINK_BASE" && PYTHONPATH=/tmp/site:$PWD ONESIDE_EMULATE_LINK=$link step base_${link/,/_} 200 python3 -m oneside.launch \
      -n 2 --machines 2 --backend nvshmem perf/bench_layer.py --out "$OUT/base" --shapes flux3072 --algos usp,tas,torus --heap 24GiB)
  fi
done
grep -h "ms  (" "$OUT"/layer_*.log "$OUT"/base_*.log 2>/dev/null
exit $status
