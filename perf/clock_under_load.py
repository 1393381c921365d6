"""SM clock and board power while one attention kernel runs back to back (one GPU).

    python perf/clock_under_load.py [--seconds 3] [--json docs/perf/clock_under_load.json]

For each kernel at 16k x 24 x 128 (our FP8 and bf16 kernels, FlashAttention-3 in bf16 and FP8 when
``fa3_fwd`` imports), launches it back to back for ``--seconds`` while ``nvidia-smi`` samples the SM
clock and the power draw every 50 ms, and prints the medians of the samples taken under load, the
TFLOP/s of the same launches, and the SM clocks one 128-row Q tile spends per K/V tile at that clock
(the figure docs/fp8.md estimates from a clock range). Not a timed test: a benchmark in perf/.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
B, S, H, D = 1, 16384, 24, 128


def sample(t0: float, t1: float, rows: list) -> list[tuple[float, float]]:
    """(clock MHz, power W) of the samples whose arrival time lies in [t0, t1]."""
    return [(c, p) for t, c, p in rows if t0 <= t <= t1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import threading

    import torch
    sys.path.insert(0, str(ROOT))
    from sfattn import kernels as K
    from sfattn.kernels.flash_fp8 import Fp8Launch
    from sfattn.quant import quantize_kv, quantize_q

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn((B, S, H, D), generator=g, device="cuda").to(torch.bfloat16) for _ in range(3))
    scale, out = 1 / math.sqrt(D), torch.empty((B, S, H, D), device="cuda", dtype=torch.bfloat16)
    fp8 = Fp8Launch([quantize_q(q)], [quantize_kv(k, v)], None, scale, out=[out], init=True, finalize=True)
    bf16 = K.AttnLaunch([q], [k], [v], None, scale, out=[out], init=True, finalize=True)
    fns = {"ours fp8": lambda: fp8(init=True, finalize=True), "ours bf16": lambda: bf16(init=True, finalize=True)}
    try:
        from fa3_fwd_interface import flash_attn_func as fa3
        e4 = [x.to(torch.float8_e4m3fn) for x in (q, k, v)]
        fns["FA3 fp8"] = lambda: fa3(*e4, softmax_scale=scale)
        fns["FA3 bf16"] = lambda: fa3(q, k, v, softmax_scale=scale)
    except ImportError:
        print("FA3 (fa3_fwd) not importable: our kernels only")
    rows: list = []
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                            "-i", str(torch.cuda.current_device()), "-lms", "50"], stdout=subprocess.PIPE, text=True)

    def reader() -> None:
        for line in smi.stdout:
            try:
                c, p = (float(x) for x in line.split(","))
            except ValueError:
                continue
            rows.append((time.monotonic(), c, p))

    threading.Thread(target=reader, daemon=True).start()
    flops = 4.0 * B * H * S * S * D
    steps = (S // 128) * H * math.ceil(S / 192)  # (Q tile, K/V tile) pairs of a 128 x 192 tiling
    res = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        n, t_start = 0, time.monotonic()
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ev0.record()
        while time.monotonic() - t_start < a.seconds:
            for _ in range(10):
                fn()
            n += 10
            torch.cuda.synchronize()
        ev1.record()
        torch.cuda.synchronize()
        t_end = time.monotonic()
        ms = ev0.elapsed_time(ev1) / n
        got = sample(t_start + 0.5, t_end, rows)  # skip the first half second (clock ramp)
        clk = statistics.median(c for c, _ in got) if got else float("nan")
        pw = statistics.median(p for _, p in got) if got else float("nan")
        per_tile = ms * 1e-3 * clk * 1e6 / (steps / torch.cuda.get_device_properties(0).multi_processor_count)
        res[name] = {"tflops": round(flops / ms / 1e9, 1), "sm_clock_mhz": clk, "power_w": pw,
                     "samples": len(got), "sm_clocks_per_192key_tile": round(per_tile)}
        print(f"{name:>9}: {res[name]['tflops']:7.1f} TFLOP/s at {clk:.0f} MHz, {pw:.0f} W "
              f"({len(got)} samples): {per_tile:.0f} SM clocks per 128-row x 192-key tile step", flush=True)
        time.sleep(0.5)
    smi.terminate()
    if a.json:
        Path(a.json).write_text(json.dumps({
            "device": torch.cuda.get_device_name(0), "shape": [B, S, H, D],
            "command": "python perf/clock_under_load.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
