"""Where a tile step of the FP8 kernel goes: a clock64 timeline of its consumer warpgroups (one Hopper GPU).

    python perf/trace_fp8.py [--seq 16384 --heads 24 --head-dim 128] [--knobs "" OV=0 BN=128]
                             [--json docs/perf/trace_fp8.json]
    python perf/trace_fp8.py --knobs "" DG=1 DG=2 "SX=1,DG=2"   # the softmax without GEMMs in flight
    python perf/trace_fp8.py --blocks 4 --knobs "" QV=0   # K/V in 4 blocks: the block switches' steps
    python perf/trace_fp8.py --check        # CPU: compile the diagnostic build only

Runs the kernel's diagnostic build (``sm90fp8:TR=1``: the first thread of each consumer warpgroup
of block (0, 0, 0) stores ``clock64()`` at eight points (nine with SX=1, ten with RP=1) of each of its
first 64 tile steps into the module's ``f8_trace``; the default build has none of it) and prints, per
consumer warpgroup, the median SM clocks of each phase of a step over the steady-state steps (the
first four and the last left out):

  wait K (the producer's K tile), turn (the ping-pong barrier: the other warpgroup issued its
  GEMMs), issue (S and P.V GEMMs, O's rescale in between), S wait, softmax (and with DB the pack),
  P.V wait, tail (row sums, pack, next tile's constants), and the step's period;

With ``--blocks N`` the K/V sequence is N blocks (as a Ring or Torus step chain gives the kernel), and
each consumer's steps that take over 1.3x the median period are listed (step, period, tail): the
block switches. (With SX=1 also the wait for the softmax's turn; with RP=1, whose softmax has two block boundaries,
its three parts: row 0's max, row 0's exponentials beside row 1's max, row 1's exponentials) and how
much of one warpgroup's softmax overlaps the other's (both on the MUFU units at once: the ping-pong
intends zero) and the other's GEMMs in flight. The timeline slows the kernel a little (a
few stores per step in one block): its totals are for proportions, not for speed.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVENTS = 64, 10  # F8_TR_STEPS, F8_TR_EVENTS of attn_sm90fp8.cu
PHASES = ["wait K", "turn", "issue", "S wait", "softmax", "P.V wait", "tail"]


def overlap(a: tuple[int, int], spans: list[tuple[int, int]]) -> int:
    """Clocks of interval ``a`` covered by the (disjoint) ``spans``."""
    return sum(max(0, min(a[1], b[1]) - max(a[0], b[0])) for b in spans)


def analyse(tr) -> dict:
    """Phase medians per consumer warpgroup and the cross-warpgroup overlaps of a [consumer, step,
    event] int64 array (zero rows: not recorded)."""
    out: dict = {}
    live = [c for c in range(tr.shape[0]) if tr[c, 0, 0] != 0]
    n = min(int((tr[c, :, 7] != 0).sum()) for c in live) if live else 0
    if n < 6:
        raise SystemExit(f"only {n} tile steps recorded: use a longer sequence (--seq)")
    steady = range(4, n - 1)
    for c in live:
        t = tr[c].astype("int64")
        row = {p: statistics.median(int(t[i, k + 1] - t[i, k]) for i in steady) for k, p in enumerate(PHASES)}
        row["period"] = statistics.median(int(t[i + 1, 0] - t[i, 0]) for i in steady)
        if all(t[i, 8] and not t[i, 9] for i in steady):  # SX=1 builds: the softmax's turn taken
            row["softmax: its turn"] = statistics.median(int(t[i, 8] - t[i, 4]) for i in steady)
            row["softmax: itself"] = statistics.median(int(t[i, 5] - t[i, 8]) for i in steady)
        if all(t[i, 8] and t[i, 9] for i in steady):  # RP=1 builds: the softmax's two block boundaries
            row["softmax: row-0 max"] = statistics.median(int(t[i, 8] - t[i, 4]) for i in steady)
            row["softmax: row-0 exp2, row-1 max"] = statistics.median(int(t[i, 9] - t[i, 8]) for i in steady)
            row["softmax: row-1 exp2"] = statistics.median(int(t[i, 5] - t[i, 9]) for i in steady)
        periods = {i: int(t[i + 1, 0] - t[i, 0]) for i in range(n - 1)}
        row["steps over 1.3x the period (step, period, tail)"] = [
            (i, p, int(t[i, 7] - t[i, 6])) for i, p in periods.items() if i >= 4 and p > 1.3 * row["period"]]
        out[f"consumer {c}"] = row
    if len(live) >= 2:
        a, b = tr[live[0]], tr[live[1]]
        soft_b = [(int(b[i, 4]), int(b[i, 5])) for i in range(n)]
        gemm_b = [(int(b[i, 3]), int(b[i, 6])) for i in range(n)]  # issued .. P.V done
        soft = [int(a[i, 5] - a[i, 4]) for i in steady]
        out["softmax of 0 while 1 is in its softmax, fraction"] = round(
            sum(overlap((int(a[i, 4]), int(a[i, 5])), soft_b) for i in steady) / max(1, sum(soft)), 3)
        out["softmax of 0 while 1's GEMMs are in flight, fraction"] = round(
            sum(overlap((int(a[i, 4]), int(a[i, 5])), gemm_b) for i in steady) / max(1, sum(soft)), 3)
    return out


def check() -> int:
    sys.path.insert(0, str(ROOT))
    from sfattn.kernels import _build
    with tempfile.TemporaryDirectory() as tmp:
        for d in (64, 128):
            _build.compile_kernel(_build.KernelConfig("sm90fp8", d, "bf16", "sm_90a", 0, (("TR", 1),)),
                                  Path(tmp) / f"trace_fp8_{d}.cubin")
    print("the TR=1 builds compile for sm_90a (head dims 64 and 128)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--knobs", nargs="*", default=[""],
                    help="one traced run per entry: knobs added to TR=1 ('' = the defaults)")
    ap.add_argument("--blocks", type=int, default=1, help="K/V blocks (equal lengths) the keys come in")
    ap.add_argument("--json", default=None)
    ap.add_argument("--check", action="store_true", help="only compile the diagnostic build (no GPU)")
    a = ap.parse_args()
    if a.check:
        return check()
    import cupy as cp
    import torch
    sys.path.insert(0, str(ROOT))
    from bench_fp8 import inputs
    from sfattn.kernels.flash_fp8 import Fp8Launch
    from sfattn.quant import quantize_kv, quantize_q

    S, H, D = a.seq, a.heads, a.head_dim
    q, k, v = inputs("gauss", 1, S, H, D, seed=0)
    if a.blocks < 1 or S % a.blocks:
        raise SystemExit(f"--blocks must divide --seq ({S}), got {a.blocks}")
    qq = quantize_q(q)
    kv = [quantize_kv(kb, vb) for kb, vb in zip(k.split(S // a.blocks, dim=1), v.split(S // a.blocks, dim=1))]
    out = torch.empty_like(q)
    nbytes = 4 * STEPS * EVENTS * 8
    results = {}
    for knobs in a.knobs:
        impl = "sm90fp8:TR=1" + (f",{knobs}" if knobs else "")
        launch = Fp8Launch([qq], kv, None, 1 / math.sqrt(D), out=[out], impl=impl, init=True, finalize=True)
        ptr = cp.cuda.driver.moduleGetGlobal(launch.kernel.module, "f8_trace")
        tr = cp.ndarray((4, STEPS, EVENTS), cp.int64,
                        cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(ptr, nbytes, None), 0))
        for _ in range(3):  # warm-up, then the recorded call
            tr.fill(0)
            launch(init=True, finalize=True)
            torch.cuda.synchronize()
        t = tr.get()
        res = results[impl] = analyse(t)
        t0 = int(t[t[:, 0, 0] != 0][:, 0, 0].min())  # raw events of steps 4-11, from the first start
        res["raw clocks, steps 4-11 [consumer][step][event]"] = [
            (t[c, 4:12] - t0).tolist() for c in range(t.shape[0]) if t[c, 0, 0] != 0]
        print(f"{impl}, {S} x {H} x {D} in {a.blocks} K/V block(s), block (0, 0, 0), SM clocks (medians over steady-state steps):")
        for key, row in res.items():
            if key.startswith("raw"):
                continue
            if isinstance(row, dict):
                print(f"  {key}: " + ", ".join(f"{p} {v:.0f}" if isinstance(v, (int, float)) else f"{p} {v}"
                                               for p, v in row.items()))
            else:
                print(f"  {key}: {row}")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "device": torch.cuda.get_device_name(0), "shape": [1, S, H, D], "kv_blocks": a.blocks,
            "command": "python perf/trace_fp8.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "trace": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
