"""Shared helpers of the benchmarks: medians of CUDA-event timings, the shared summary JSON."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Callable

DOCS = Path(__file__).resolve().parent.parent / "docs"
# result-file suffix of a layer benchmark's precision (bench_layer.py, report_layer.py)
PRECISION_TAGS = {"bf16": "", "fp8": "_fp8", "fp8-accurate": "_fp8acc"}


def time_cuda(fn: Callable[[], Any], stream, iters: int, reps: int = 5, warmup: int = 3) -> float:
    """Median over ``reps`` of the GPU time (seconds) of ``iters`` calls of ``fn`` on ``stream``.

    ``stream`` is a torch CUDA stream; ``fn`` must enqueue its work on it.
    """
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(stream)
        for _ in range(iters):
            fn()
        b.record(stream)
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / iters)
    return statistics.median(times)


def median_ms(fn: Callable[[], Any]) -> float:
    """Milliseconds: median of 10 single calls on the current stream, after 3 warm-up calls."""
    import torch

    return 1e3 * time_cuda(fn, torch.cuda.current_stream(), iters=1, reps=10, warmup=3)


def update_summary(values: dict[str, Any], path: Path | None = None) -> Path:
    """Read-modify-write the flat JSON object shared by every benchmark (only ``values``' keys)."""
    path = path or DOCS / "perf" / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(values)
    path.write_text(json.dumps(dict(sorted(data.items())), indent=2) + "\n")
    return path


def human(n: int) -> str:
    for unit, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << k:
            return f"{n >> k} {unit}"
    return f"{n} B"


def interleaved_medians(fns: dict[str, Callable[[], Any]], warmup: int, reps: int) -> dict[str, float]:
    """Median seconds of each fn over ``reps`` rounds; each round times every fn once, in turn.

    Interleaving puts all variants under the same clock and temperature drift, so their ratios
    are steadier than those of back-to-back series; the order is shuffled every round because a
    kernel that follows a low-power one starts at a higher clock; the host's launch cost is kept
    out of the GPU time by a short device-side sleep enqueued before the start event.
    """
    import random

    import torch

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    ts = {k: [] for k in fns}
    order = list(fns)
    for rep in range(reps):
        random.Random(rep).shuffle(order)  # no variant always follows a cooler (slower) one
        for k in order:
            fn = fns[k]
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(200_000)  # GPU busy ~0.1 ms while the host enqueues: no launch gap
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts[k].append(a.elapsed_time(b) / 1e3)
    return {k: statistics.median(v) for k, v in ts.items()}
