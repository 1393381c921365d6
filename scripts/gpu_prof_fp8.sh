#!/usr/bin/env bash
# On a 1-GPU Hopper host (repo root, wheels in .whl): Nsight Compute on one call each of our FP8
# kernel, our bf16 kernel and FA3-FP8 (Flux-like 16k x 24 x 128): stall reasons, pipes, per-SASS stalls.
# Results in $OUT: prof.ncu-rep, prof_details.txt, sass_fp8.csv, sass_fa3.csv.
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
f=Fp8Launch([quantize_q(q)],[quantize_kv(k,v)],None,D**-0.5,out=[out],init=True,finalize=True)
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
timeout 400 $NCU --profile-from-start off --section WarpStateStats --section SchedulerStats --section InstructionStats --section ComputeWorkloadAnalysis --section SpeedOfLight --section SourceCounters --import-source no -o $OUT/prof python3 /tmp/p.py > $OUT/ncu.log 2>&1; tail -5 $OUT/ncu.log
$NCU -i $OUT/prof.ncu-rep --page details > $OUT/prof_details.txt 2>&1
$NCU -i $OUT/prof.ncu-rep --page source --csv --print-source sass --kernel-name sf_attn_sm90fp8 > $OUT/sass_fp8.csv 2>&1
$NCU -i $OUT/prof.ncu-rep --page source --csv --print-source sass --kernel-name regex:"flash|fwd|FlashAttn" > $OUT/sass_fa3.csv 2>&1
ls -la $OUT; grep -E "^  [a-zA-Z_]|Stall|Warp Cycles|Issued|Duration|Executed Ipc|One or More|No Eligible" $OUT/prof_details.txt | head -120
