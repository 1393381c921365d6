#!/usr/bin/env bash
# On a 1-GPU Hopper host (repo root, wheels in .whl): Nsight Compute on one call each of our FP8
# kernel, our bf16 kernel and FA3-FP8 (Flux-like 16k x 24 x 128): stall reasons, pipes, per-SASS stalls.
# Results in $OUT: prof.ncu-rep, prof_details.txt, sass_fp8.csv, sass_fa3.csv, stalls.txt (every stall
# reason per kernel). PROF_LIGHT=1: warp-state and speed-of-light sections only (no per-SASS
# counters; faster), IMPL=sm90fp8:... profiles that build instead of the default one.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
cat > /tmp/p.py <<'PY'
import torch
from sfattn.quant import quantize_q, quantize_kv
from sfattn.kernels.flash_fp8 import Fp8Launch
from sfattn import kernels as K
from fa3_fwd_interface import flash_attn_func as fa3
S,H,D=16384,24,128
q,k,v=(torch.randn(1,S,H,D,device='cuda',dtype=torch.bfloat16) for _ in range(3))
out=torch.empty_like(q)
import os
f=Fp8Launch([quantize_q(q)],[quantize_kv(k,v)],None,D**-0.5,out=[out],init=True,finalize=True,impl=os.environ.get('IMPL') or None)
b=K.AttnLaunch([q],[k],[v],None,D**-0.5,out=[out],init=True,finalize=True)
q8,k8,v8=(x.to(torch.float8_e4m3fn) for x in (q,k,v))
for _ in range(3): f(init=True,finalize=True); b(init=True,finalize=True); fa3(q8,k8,v8,softmax_scale=D**-0.5)
torch.cuda.synchronize()
torch.cuda.profiler.start()
f(init=True,finalize=True); b(init=True,finalize=True); fa3(q8,k8,v8,softmax_scale=D**-0.5)
torch.cuda.synchronize()
torch.cuda.profiler.stop()
PY
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
SECTIONS="--section WarpStateStats --section SchedulerStats --section SpeedOfLight"
[ "${PROF_LIGHT:-0}" = 1 ] || SECTIONS="$SECTIONS --section InstructionStats --section ComputeWorkloadAnalysis --section SourceCounters"
timeout 400 $NCU --profile-from-start off $SECTIONS --import-source no -o $OUT/prof python3 /tmp/p.py > $OUT/ncu.log 2>&1; tail -5 $OUT/ncu.log
$NCU -i $OUT/prof.ncu-rep --page raw --csv > $OUT/prof_raw.csv 2>&1
python3 - "$OUT/prof_raw.csv" > $OUT/stalls.txt <<'PY2'
import csv, sys  # every warp stall reason (cycles per issued instruction) per kernel, side by side
rows = list(csv.reader(open(sys.argv[1])))
head = rows[0]
kern = [r for r in rows[2:] if len(r) == len(head)]
cols = [i for i, h in enumerate(head) if h.startswith("smsp__average_warps_issue_stalled_") and h.endswith("_per_issue_active.ratio")]
name = head.index("Kernel Name")
print("stall reason".ljust(34) + "".join(r[name][:18].ljust(20) for r in kern))
for i in sorted(cols, key=lambda i: -float(kern[0][i] or 0)):
    print(head[i][len("smsp__average_warps_issue_stalled_"):-len("_per_issue_active.ratio")].ljust(34) + "".join((r[i] or "-").ljust(20) for r in kern))
PY2
cat $OUT/stalls.txt
$NCU -i $OUT/prof.ncu-rep --page details > $OUT/prof_details.txt 2>&1
$NCU -i $OUT/prof.ncu-rep --page source --csv --print-source sass --kernel-name sf_attn_sm90fp8 > $OUT/sass_fp8.csv 2>&1
$NCU -i $OUT/prof.ncu-rep --page source --csv --print-source sass --kernel-name regex:"flash|fwd|FlashAttn" > $OUT/sass_fa3.csv 2>&1
ls -la $OUT; grep -E "^  [a-zA-Z_]|Stall|Warp Cycles|Issued|Duration|Executed Ipc|One or More|No Eligible" $OUT/prof_details.txt | head -120
