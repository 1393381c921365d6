"""oneside microbenchmarks on 2 GPUs, side by side with the peer copy, NCCL and nvshmem4py.

    python -m oneside.launch -n 2 --backend nvshmem perf/bench_oneside.py [--out DIR]

Rank 0 drives every transfer towards rank 1 (rank 1 waits in barriers). Each point is the
median over 5 repetitions of the CUDA-event time of a loop of transfers after warm-up.
Rows: put / get (copy engines), put with the copy kernel (``sm``), scatter_push and
gather_pull of 8 equal chunks, a plain device-to-device peer copy (cudaMemcpyPeerAsync
through torch), NCCL send/recv and all_to_all_single (torch.distributed), and nvshmem4py's
own put. Also: barrier latency and host-side issue cost per transfer in a batch of 64.
Writes ``oneside.json`` into --out; ``perf/report_oneside.py`` turns it into the plot, the
table in docs/perf.md and the keys of docs/perf/summary.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import cupy as cp
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import oneside  # noqa: E402
from common import human, time_cuda  # noqa: E402

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20]


def iters_for(size: int) -> int:
    return max(10, min(500, (512 << 20) // size // 4))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "docs/perf"))
    args = ap.parse_args()
    rt = oneside.init(heap_size=2 * SIZES[-1] + (64 << 20), timeout=120)
    me, n = rt.rank, rt.world_size
    assert n == 2, "run with 2 ranks"
    dev = torch.device("cuda", rt.backend.device)
    stream = torch.cuda.Stream(dev)
    port = os.environ.get("ONESIDE_DIST_PORT") or int(os.environ["MASTER_PORT"]) + 7
    dist.init_process_group("nccl", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{port}", rank=me,
                            world_size=n, device_id=dev)
    big_src = rt.alloc(SIZES[-1], "uint8")
    big_dst = rt.alloc(SIZES[-1], "uint8")
    local = torch.empty(SIZES[-1], dtype=torch.uint8, device=dev)
    results: dict[str, dict[int, float]] = {}
    peer_dst = None
    if me == 0 and torch.cuda.device_count() > 1:
        with cp.cuda.Device(1 - dev.index):
            peer_dst = cp.empty(SIZES[-1], cp.uint8)
        try:
            cp.cuda.runtime.deviceEnablePeerAccess(1 - dev.index)
        except cp.cuda.runtime.CUDARuntimeError:
            pass  # already enabled

    def record(name: str, size: int, seconds: float) -> None:
        results.setdefault(name, {})[size] = seconds
        if me == 0:
            print(f"{name:>22} {human(size):>8}: {seconds * 1e6:10.1f} us  {size / seconds / 1e9:8.1f} GB/s", flush=True)

    def on_rank0(name: str, size: int, fn) -> None:
        """Time fn on rank 0 while rank 1 waits; both then meet in a barrier."""
        rt.barrier_all(stream)
        if me == 0:
            with torch.cuda.stream(stream):
                record(name, size, time_cuda(fn, stream, iters_for(size)))
        rt.barrier_all(stream)
        rt.sync(stream)

    import nvshmem.core as nv

    for size in SIZES:
        dst, src, loc = big_dst[:size], big_src[:size], local[:size]
        put = rt.batch("put", [(src, 1, dst)], engine="ce")
        get = rt.batch("get", [(loc, 1, src)], engine="ce")
        put_sm = rt.batch("put", [(src, 1, dst)], engine="sm")
        k = 8
        chunks = size // k
        push8 = rt.batch("put", [(src.window(i * chunks, chunks), 1, dst.window(i * chunks, chunks)) for i in range(k)],
                         engine="ce")
        pull8 = rt.batch("get", [(loc[i * chunks:(i + 1) * chunks], 1, src.window(i * chunks, chunks)) for i in range(k)],
                         engine="ce")
        on_rank0("put", size, lambda: put.issue(stream))
        on_rank0("get", size, lambda: get.issue(stream))
        on_rank0("put (sm kernel)", size, lambda: put_sm.issue(stream))
        on_rank0("scatter_push x8", size, lambda: push8.issue(stream))
        on_rank0("gather_pull x8", size, lambda: pull8.issue(stream))
        # plain peer copy, GPU 0 -> GPU 1 (cudaMemcpyPeerAsync), from rank 0's process
        if me == 0 and peer_dst is not None:
            srcp, s_ptr = big_src.ptr, stream.cuda_stream
            with torch.cuda.stream(stream):
                record("peer copy (memcpyPeer)", size, time_cuda(
                    lambda: cp.cuda.runtime.memcpyPeerAsync(peer_dst.data.ptr, 1 - dev.index, srcp, dev.index,
                                                            size, s_ptr), stream, iters_for(size)))
        # NCCL send/recv: both ranks loop, rank 0 times its sends
        t = local[:size]
        iters = iters_for(size)
        dist.barrier()
        with torch.cuda.stream(stream):
            if me == 0:
                record("nccl send/recv", size, time_cuda(lambda: dist.send(t, 1), stream, iters))
            else:
                for _ in range(3 + 5 * iters):
                    dist.recv(t, 0)
        torch.cuda.synchronize()
        # NCCL all_to_all_single: algbw = size / time (each rank sends size/2 to the other)
        out = torch.empty_like(t)
        with torch.cuda.stream(stream):
            sec = time_cuda(lambda: dist.all_to_all_single(out, t), stream, iters)
        if me == 0:
            record("nccl all_to_all", size, sec)
        torch.cuda.synchronize()
        # nvshmem4py's own put (moves the whole allocation; ~20 us host time per call)
        a = nv.array((size,), dtype="uint8")
        b = nv.array((size,), dtype="uint8")
        torch.cuda.synchronize()
        rt.barrier_all(stream)
        rt.sync(stream)
        if me == 0:
            with torch.cuda.stream(stream):
                record("nvshmem4py put", size, time_cuda(lambda: nv.put(b, a, 1, stream=stream), stream,
                                                         min(iters, 100)))
        torch.cuda.synchronize()
        rt.barrier_all(stream)
        rt.sync(stream)
        nv.free_array(a)
        nv.free_array(b)

    # barrier latency (GPU time per barrier_all on a stream, 2 ranks)
    with torch.cuda.stream(stream):
        bar = time_cuda(lambda: rt.barrier_all(stream), stream, 200)
    results["barrier_all"] = {0: bar}
    # host-side issue cost per transfer, batch of 64 x 4 KiB (prebuilt batch), both engines
    issue = {}
    for engine in ("auto", "ce", "sm"):
        batch = rt.batch("put", [(big_src.window(i * 4096, 4096), 1, big_dst.window(i * 4096, 4096))
                                 for i in range(64)], engine=engine)
        samples = []
        for _ in range(7):
            rt.sync(stream)
            t0 = time.perf_counter()
            for _ in range(50):
                batch.issue(stream)
            samples.append((time.perf_counter() - t0) / 50 / 64)
        issue[engine] = statistics.median(samples)
    rt.sync(stream)
    # single rt.put call (builds a batch each time), and nvshmem4py put host cost
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(50):
            rt.put(big_dst.window(0, 4096), big_src.window(0, 4096), 1, stream)
        samples.append((time.perf_counter() - t0) / 50)
    issue["rt.put call"] = statistics.median(samples)
    a = nv.array((4096,), dtype="uint8")
    b = nv.array((4096,), dtype="uint8")
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(20):
            nv.put(b, a, 1 - me, stream=stream)
        samples.append((time.perf_counter() - t0) / 20)
    issue["nvshmem4py put call"] = statistics.median(samples)
    torch.cuda.synchronize()
    rt.barrier_all(stream)
    rt.sync(stream)
    nv.free_array(a)
    nv.free_array(b)
    if me == 0:
        print(f"barrier_all: {bar * 1e6:.1f} us; host issue us/transfer: "
              + ", ".join(f"{k} {v * 1e6:.2f}" for k, v in issue.items()), flush=True)
        meta = {"device": torch.cuda.get_device_name(dev), "ranks": n, "torch": torch.__version__,
                "nccl": ".".join(map(str, torch.cuda.nccl.version())), "cupy": cp.__version__,
                "command": "python -m oneside.launch -n 2 --backend nvshmem perf/bench_oneside.py"}
        out = {"meta": meta, "seconds": {k: {str(s): v for s, v in d.items()} for k, d in results.items()},
               "host_issue_seconds_per_transfer": issue}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "oneside.json").write_text(json.dumps(out, indent=1))
    dist.destroy_process_group()
    oneside.finalize()


if __name__ == "__main__":
    main()
