"""SM clock and board power while one attention kernel runs back to back (one GPU).

    python perf/clock_under_load.py [--seconds 3] [--rounds 2] [--json docs/perf/clock_under_load.json]

For each kernel at 16k x 24 x 128 and 16k x 24 x 64 (our FP8 and bf16 kernels, FlashAttention-3 in
bf16 and FP8 when ``fa3_fwd`` imports), launches it back to back for ``--seconds`` while
``nvidia-smi`` samples the SM clock and the power draw every 50 ms; ``--rounds`` passes over the
kernels, every other one in reverse order. Prints per kernel the medians over rounds of: TFLOP/s,
the samples' SM clock and power under load, and the SM clocks per (128-row Q tile, 192-key tile)
step at that clock (the figure docs/fp8.md estimates from a clock range). Sustained figures, each
kernel alone: unlike perf/bench_fp8.py's interleaved timing, no kernel inherits another's clock.
Not a timed test: a benchmark in perf/. ``--from-json FILE`` (no GPU) writes the ``*_sustained`` ratio
keys of docs/perf/summary.json from a saved run.
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
SHAPES = [(1, 16384, 24, 128), (1, 16384, 24, 64)]


def sample(t0: float, t1: float, rows: list) -> list[tuple[float, float]]:
    """(clock MHz, power W) of the samples whose arrival time lies in [t0, t1]."""
    return [(c, p) for t, c, p in rows if t0 <= t <= t1]


def summarize(data: dict) -> int:
    """The sustained ratio keys (our FP8 kernel over our bf16 kernel and over FA3-FP8) of a saved run."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import update_summary

    keys = {}
    for shape, rows in data["rows"].items():
        s, d = shape.split("_")  # e.g. 16k, d128
        fp8 = rows["ours fp8"]["tflops"]
        keys[f"fp8_over_bf16_{d}_s{s}_sustained"] = round(fp8 / rows["ours bf16"]["tflops"], 3)
        if "FA3 fp8" in rows:
            keys[f"fp8_over_fa3fp8_{d}_s{s}_sustained"] = round(fp8 / rows["FA3 fp8"]["tflops"], 3)
    keys["fp8_sustained_note"] = (f"{data['device']}, {data['date']}: each kernel alone back to back (perf/"
                                  "clock_under_load.py, docs/perf/clock_under_load.json); our bf16 and FA3 run "
                                  "power-capped at lower SM clocks than our FP8 kernel, so these ratios exceed "
                                  "the interleaved ones of perf/bench_fp8.py (the fp8_over_* keys)")
    print(json.dumps(keys, indent=1))
    update_summary(keys)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--from-json", default=None, help="write the summary keys of a saved run (no GPU)")
    a = ap.parse_args()
    if a.from_json:
        return summarize(json.loads(Path(a.from_json).read_text()))
    import threading

    import torch
    sys.path.insert(0, str(ROOT))
    from bench_fp8 import _fa3, inputs
    from sfattn import kernels as K
    from sfattn.kernels.flash_fp8 import Fp8Launch
    from sfattn.quant import quantize_kv, quantize_q

    def kernels(B: int, S: int, H: int, D: int) -> dict:
        q, k, v = inputs("gauss", B, S, H, D, seed=0)
        scale, out = 1 / math.sqrt(D), torch.empty((B, S, H, D), device="cuda", dtype=torch.bfloat16)
        fp8 = Fp8Launch([quantize_q(q)], [quantize_kv(k, v)], None, scale, out=[out], init=True, finalize=True)
        bf16 = K.AttnLaunch([q], [k], [v], None, scale, out=[out], init=True, finalize=True)
        fns = {"ours fp8": lambda: fp8(init=True, finalize=True), "ours bf16": lambda: bf16(init=True, finalize=True)}
        if fa3 is not None:
            e4 = [x.to(torch.float8_e4m3fn) for x in (q, k, v)]
            fns["FA3 fp8"] = lambda: fa3(*e4, softmax_scale=scale)
            fns["FA3 bf16"] = lambda: fa3(q, k, v, softmax_scale=scale)
        return fns

    fa3 = _fa3()
    if fa3 is None:
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
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    res: dict = {}
    for B, S, H, D in SHAPES:
        fns = kernels(B, S, H, D)
        flops = 4.0 * B * H * S * S * D
        steps = (S // 128) * H * math.ceil(S / 192)  # (Q tile, K/V tile) pairs of a 128 x 192 tiling
        runs: dict = {name: [] for name in fns}
        for r in range(a.rounds):
            for name, fn in (list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]):
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
                got = sample(t_start + 0.5, time.monotonic(), rows)  # skip the first half second (clock ramp)
                runs[name].append((ev0.elapsed_time(ev1) / n, statistics.median(c for c, _ in got) if got else
                                   float("nan"), statistics.median(p for _, p in got) if got else float("nan")))
                time.sleep(0.5)
        key = f"{S // 1024}k_d{D}"
        res[key] = {}
        for name, rs in runs.items():
            ms, clk, pw = (statistics.median(x[i] for x in rs) for i in range(3))
            per_tile = ms * 1e-3 * clk * 1e6 / (steps / sms)
            res[key][name] = {"tflops": round(flops / ms / 1e9, 1), "sm_clock_mhz": clk, "power_w": pw,
                              "sm_clocks_per_tile_step": round(per_tile), "rounds": len(rs)}
            print(f"{key} {name:>9}: {flops / ms / 1e9:7.1f} TFLOP/s at {clk:.0f} MHz, {pw:.0f} W: "
                  f"{per_tile:.0f} SM clocks per 128-row x 192-key tile step", flush=True)
    smi.terminate()
    if a.json:
        Path(a.json).write_text(json.dumps({
            "device": torch.cuda.get_device_name(0), "shapes": SHAPES,
            "command": "python perf/clock_under_load.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
