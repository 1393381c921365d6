"""What the reliability checks add to a layer call on a GPU, and a layer's fixed cost at one rank.

    python perf/bench_checks.py [--summary docs/perf/summary.json]

Per call the layer adds ``rt.check()`` (a read of the mapped error record), call-site tags
(integer arithmetic; the barrier words carry them at no extra traffic) and one
``poison_if_failed`` kernel (it returns at once while no wait failed). Measured: host time
of ``check()``, host time of a poison launch, and the poison kernel's GPU time (CUDA events
around 1000 launches, median of 5). Then at one rank (Flux 1024x1024: 4608 tokens, 24 heads,
head dim 128, bf16): ``sfattn.attention`` vs the fused kernel alone vs cuDNN SDPA, interleaved.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCS, update_summary  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--summary", default=str(DOCS / "perf" / "summary.json"))
    a = p.parse_args()
    import cupy

    import oneside

    rt = oneside.init(backend="nvshmem", heap_size="1GiB")
    buf = rt.alloc((4096, 24, 128), "bfloat16")  # a Flux-1024 shard's output, 24 MiB
    s = cupy.cuda.Stream(non_blocking=True)

    def host_us(fn, n):
        fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n * 1e6

    check_us = host_us(rt.check, 20000)
    launch_us = host_us(lambda: rt.poison_if_failed(buf, s.ptr), 2000)
    s.synchronize()
    gpu = []
    for _ in range(5):
        a0, b0 = cupy.cuda.Event(), cupy.cuda.Event()
        a0.record(s)
        for _ in range(1000):
            rt.poison_if_failed(buf, s.ptr)
        b0.record(s)
        b0.synchronize()
        gpu.append(cupy.cuda.get_elapsed_time(a0, b0) * 1e3 / 1000)
    res = {"check_host_us": round(check_us, 3), "poison_launch_host_us": round(launch_us, 2),
           "poison_gpu_us": round(statistics.median(gpu), 2)}
    print(json.dumps(res))
    import torch

    import sfattn
    from sfattn import kernels as K
    from common import interleaved_medians

    dev = torch.device("cuda", rt.backend.device)
    S, H, D = 4608, 24, 128
    q, k, v = (torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    layer = sfattn.SPAttention(rt, sfattn.make_plan(rt.mesh, H, S, D), 1, "bfloat16")
    o = torch.empty_like(q)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    t = interleaved_medians({
        "layer": lambda: sfattn.attention(q, k, v, layer),
        "kernel": lambda: K.attn_blocks([q], [k], [v], None, layer.scale, init=True, finalize=True, out=[o]),
        "cudnn": lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh),
    }, warmup=5, reps=41)
    ref = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2)
    err = ((sfattn.attention(q, k, v, layer).float() - ref.float()).norm() / ref.float().norm()).item()
    res.update(layer_ms=round(t["layer"] * 1e3, 4), kernel_ms=round(t["kernel"] * 1e3, 4),
               cudnn_ms=round(t["cudnn"] * 1e3, 4), layer_vs_cudnn_relerr=round(err, 5))
    print(json.dumps(res))
    update_summary({"layer_1rank_over_kernel_s4608": round(t["layer"] / t["kernel"], 4),
                    "kernel_over_cudnn_s4608": round(t["cudnn"] / t["kernel"], 4),
                    "fixed_cost_card": torch.cuda.get_device_name(dev)}, Path(a.summary))
    update_summary({"reliability_check_host_us": res["check_host_us"],
                    "reliability_poison_host_us": res["poison_launch_host_us"],
                    "reliability_poison_gpu_us": res["poison_gpu_us"]}, Path(a.summary))
    oneside.finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
