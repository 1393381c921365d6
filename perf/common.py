"""Shared helpers of the benchmarks: medians of CUDA-event timings, the shared summary JSON."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Callable

DOCS = Path(__file__).resolve().parent.parent / "docs"


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
