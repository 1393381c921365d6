"""The main job: an all-to-all (the Ulysses exchange) with oneside, checked and timed.

    python -m oneside.launch -n 4 --machines 2 examples/alltoall.py [--mib 8] [--iters 20]

Every rank pushes one block to every rank with one ScatterPush, the ranks meet in a
barrier, and each checks what it received. Runs on GPUs (NVSHMEM) where they are usable,
else on the CPU host backend. Rank 0 prints a table.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import oneside


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=float, default=8.0, help="MiB each rank sends in total")
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    rt = oneside.init(heap_size=int(3 * a.mib * (1 << 20)) + (16 << 20))
    n, me = rt.world_size, rt.rank
    blk = max(1, int(a.mib * (1 << 20)) // 4 // n)
    send = rt.alloc((n, blk), "float32")
    recv = rt.alloc((n, blk), "float32")
    if rt.backend.is_gpu:
        import cupy as xp
    else:
        xp = np
    send.local[...] = xp.arange(n * blk, dtype=xp.float32).reshape(n, blk) + 1e6 * me
    recv.local[...] = xp.nan
    push = rt.batch("put", [(send[p], p, recv[me]) for p in range(n)])
    rt.sync()
    rt.barrier_all()
    push.issue()
    rt.barrier_all()
    rt.sync()
    expect = xp.arange(blk, dtype=xp.float32)[None, :] + me * blk + 1e6 * xp.arange(n, dtype=xp.float32)[:, None]
    ok = bool((recv.local == expect).all())
    times = []
    for _ in range(a.iters):
        rt.barrier_all()
        rt.sync()
        t0 = time.perf_counter()
        push.issue()
        rt.barrier_all()
        rt.sync()
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    # gather every rank's (ok, time) on rank 0 through the heap itself
    stats = rt.alloc((n, 2), "float64")
    mine = xp.asarray([float(ok), t], dtype=xp.float64)
    rt.put(stats[me], mine, 0)
    rt.barrier_all()
    rt.sync()
    if me == 0:
        rows = stats.local.get() if hasattr(stats.local, "get") else np.array(stats.local)
        print(f"oneside all-to-all: backend={rt.backend_name}, mesh={rt.mesh.machines}x{rt.mesh.gpus_per_machine}, "
              f"{blk * 4 * n / 2**20:.2f} MiB sent per rank, median of {a.iters}")
        print(f"{'rank':>4} {'machine':>7} {'correct':>7} {'time ms':>8} {'GB/s':>7}")
        for r in range(n):
            print(f"{r:>4} {rt.mesh.machine_of(r):>7} {str(bool(rows[r, 0])):>7} {rows[r, 1] * 1e3:>8.3f} "
                  f"{blk * 4 * (n - 1) / rows[r, 1] / 1e9:>7.2f}")
        if not rows[:, 0].all():
            raise SystemExit("all-to-all: wrong data received")
    oneside.finalize()


if __name__ == "__main__":
    main()
