"""One attention forward for Nsight Compute: our kernel (``--impl``, bf16 or ``sm90fp8[:knobs]`` on
quantised operands) or FlashAttention-3 (``fa3``, ``fa3fp8``: e4m3 casts).

Three warm-up calls, then the profiled call inside a CUDA profiler range, so that
``ncu --profile-from-start off`` sees exactly one launch of the kernel of interest::

    ncu --profile-from-start off --section SpeedOfLight --section WarpStateStats \\
        python perf/ncu_kernel.py --impl sm90ws --shape 1,16384,24,128
    ncu --profile-from-start off ... python perf/ncu_kernel.py --impl fa3 --shape 1,16384,24,64

``scripts/gpu_kernel.sh`` (NCU=1) runs the comparison and keeps the reports.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--impl", default="sm90ws", help="an sfattn kernel impl, or 'fa3'")
    ap.add_argument("--shape", default="1,16384,24,128", help="B,S,H,D")
    args = ap.parse_args()
    import torch
    sys.path.insert(0, str(ROOT))
    B, S, H, D = (int(x) for x in args.shape.split(","))
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn((B, S, H, D), generator=g, device="cuda").to(torch.bfloat16)
               for _ in range(3))
    scale = 1 / math.sqrt(D)
    if args.impl in ("fa3", "fa3fp8"):
        from fa3_fwd_interface import flash_attn_func
        if args.impl == "fa3fp8":
            q, k, v = (x.to(torch.float8_e4m3fn) for x in (q, k, v))

        def call():
            with torch.no_grad():
                flash_attn_func(q, k, v, softmax_scale=scale)
    elif args.impl.startswith("sm90fp8"):
        from sfattn.kernels.flash_fp8 import Fp8Launch
        from sfattn.quant import quantize_kv, quantize_q
        out = torch.empty_like(q)
        launch = Fp8Launch([quantize_q(q)], [quantize_kv(k, v)], None, scale, out=[out], impl=args.impl,
                           init=True, finalize=True)

        def call():
            launch(init=True, finalize=True)
    else:
        from sfattn import kernels as K
        out = torch.empty_like(q)
        launch = K.AttnLaunch([q], [k], [v], None, scale, out=[out], impl=args.impl, init=True,
                              finalize=True)

        def call():
            launch(init=True, finalize=True)
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
