"""Do the softmax's exponentials and its packing conversions share one unit? (one Hopper GPU)

    python perf/pipes.py [--json docs/perf/pipes.json]

One wave of blocks (4 x 256 threads per SM) runs a loop of independent operations per thread and
times itself with ``clock64``; each row is operations per clock per SM, per kind:

* ``ex2``: ``ex2.approx.ftz.f32`` (MUFU.EX2, the softmax's exponential);
* ``e4m3``: ``cvt.rn.satfinite.e4m3x2.f32`` (two floats -> two e4m3 bytes: the FP8 kernel's P pack);
* ``bf16``: ``cvt.rn.bf16x2.f32`` (the bf16 kernel's P pack);
* ``ex2h``: ``ex2.approx.f16x2`` (two half exponentials per instruction);
* ``ex2+e4m3``, ``ex2+bf16``: one of each per step. If the pair's clocks per step are the sum of
  the two alone, they share a unit (then the FP8 kernel's tile needs MUFU + F2FP clocks, see
  docs/fp8.md); if they are the larger of the two, they overlap.

Each kind is a chain per step (a conversion's bytes, OR-ed into a float by one full-rate ALU
operation, feed the next conversion), eight chains per thread, and every result is stored, so
ptxas can neither drop nor merge the work (the first version kept the mode a runtime argument and
its results dead: its figures were overheads); ``--check`` compiles the kernel (nvcc) without running it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = r"""
template <int mode>  // a compile-time mode: the loop holds only the operations timed
__global__ void __launch_bounds__(256) pipes(int iters, long long* cycles, float* sink) {
  float a[8], b[8];  // per step i: a chain of exponentials (a) and one of conversions (b)
  unsigned h2[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    a[i] = -1.f - 1e-3f * (threadIdx.x + i);
    b[i] = 0.5f + 1e-3f * (threadIdx.x + i);
    h2[i] = 0xBC00BC00u ^ (threadIdx.x + i);  // two halves near -1
  }
  __syncthreads();
  const long long t0 = clock64();
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if constexpr ((mode & 1) != 0) asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(a[i]));
      if constexpr ((mode & 2) != 0) {  // the packed bytes feed the next conversion (one LOP3)
        unsigned short h;
        asm volatile("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(h) : "f"(b[i]), "f"(b[(i + 1) & 7]));
        b[i] = __uint_as_float(0x3E000000u | h);
      }
      if constexpr ((mode & 4) != 0) {
        unsigned r;
        asm volatile("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b[i]), "f"(b[(i + 1) & 7]));
        b[i] = __uint_as_float(0x3E000000u | (r & 0xFFFFu));
      }
      if constexpr ((mode & 8) != 0) asm volatile("ex2.approx.f16x2 %0, %0;" : "+r"(h2[i]));
    }
  }
  const long long t1 = clock64();
  __syncthreads();
  if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) s += a[i] + b[i] + __uint_as_float(h2[i]);
  sink[blockIdx.x * blockDim.x + threadIdx.x] = s;  // every result is live: nothing is optimised away
}
"""
MODES = {"ex2": (1, 1), "e4m3": (2, 1), "bf16": (4, 1), "ex2h": (8, 1), "ex2+e4m3": (3, 2), "ex2+bf16": (5, 2)}
BLOCKS_PER_SM, THREADS, STEPS = 4, 256, 8


def check() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sfattn.kernels._build import find_nvcc

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "pipes.cu"
        src.write_text(SRC)
        src.write_text(SRC + "".join(f"template __global__ void pipes<{m}>(int, long long*, float*);\n"
                                     for m, _ in MODES.values()))
        subprocess.run([find_nvcc(), "-arch=sm_90a", "-std=c++17", "-cubin", "-o", str(Path(tmp) / "pipes.cubin"),
                        str(src)], check=True)
    print("pipes.cu compiles for sm_90a")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=4096)
    ap.add_argument("--json", default=None)
    ap.add_argument("--check", action="store_true", help="only compile the kernel")
    a = ap.parse_args()
    if a.check:
        return check()
    import cupy as cp

    dev = cp.cuda.Device()
    sms = dev.attributes["MultiProcessorCount"]
    mod = cp.RawModule(code=SRC, options=("-arch=sm_90a", "-std=c++17"),
                       name_expressions=[f"pipes<{m}>" for m, _ in MODES.values()])
    grid = sms * BLOCKS_PER_SM
    cycles = cp.zeros(grid, dtype=cp.int64)
    sink = cp.zeros(grid * THREADS, dtype=cp.float32)
    rows = {}
    for name, (mode, ops) in MODES.items():
        for _ in range(2):  # warm-up, then the timed run
            mod.get_function(f"pipes<{mode}>")((grid,), (THREADS,), (cp.int32(a.iters), cycles, sink))
        cp.cuda.runtime.deviceSynchronize()
        clk = float(cycles.get().max())
        per_sm = BLOCKS_PER_SM * THREADS * a.iters * STEPS  # steps per SM, each with `ops` operations
        rows[name] = {"clocks_per_step": round(clk / (a.iters * STEPS), 2),
                      "instructions_per_clock_per_sm": round(per_sm * ops / clk, 2)}
        print(f"{name:>9}: {rows[name]['instructions_per_clock_per_sm']:7.2f} instructions / clock / SM "
              f"({rows[name]['clocks_per_step']:.2f} clocks per step of {BLOCKS_PER_SM * THREADS} threads)")
    for conv in ("e4m3", "bf16"):
        one, other, both = rows["ex2"]["clocks_per_step"], rows[conv]["clocks_per_step"], rows[f"ex2+{conv}"]["clocks_per_step"]
        verdict = "shared (sum)" if both > 0.8 * (one + other) else "overlapped (max)" if both < 1.2 * max(one, other) \
            else "partly overlapped"
        rows[f"verdict_ex2_{conv}"] = verdict
        print(f"ex2 + {conv}: {both:.2f} clocks per step; alone {one:.2f} and {other:.2f}: {verdict}")
    if a.json:
        out = {"device": dev.attributes.get("Name", "") or cp.cuda.runtime.getDeviceProperties(dev.id)["name"].decode(),
               "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "rows": rows}
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
