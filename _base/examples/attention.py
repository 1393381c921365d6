"""The main job: sequence-parallel attention with every algorithm, checked and timed.

    python -m oneside.launch -n 4 --machines 2 examples/attention.py [--seq 515] [--heads 24] [--dim 64]

Each rank holds its slice of the sequence; every algorithm the mesh allows (Ulysses, Ring,
USP, TAS, Torus) computes the layer, and rank 0 prints a table of the plan, the error vs a
float64 reference of the whole attention, and the median time. GPUs (NVSHMEM, bf16) where
usable, else the CPU host backend (float64, numpy reference kernels).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import oneside
import sfattn
from sfattn.reference import attention_ref


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=515)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    a = ap.parse_args()
    rt = oneside.init()
    gpu = rt.backend.is_gpu
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, a.seq, a.heads, a.dim)) for _ in range(3))
    if gpu:
        import torch

        dev = torch.device("cuda", rt.backend.device)
        q, k, v = (torch.from_numpy(x).to(dev, torch.bfloat16) for x in (q, k, v))
        ref = attention_ref(*(x.float().cpu().numpy() for x in (q, k, v)), a.dim ** -0.5)[0]
    else:
        ref = attention_ref(q, k, v, a.dim ** -0.5)[0]
    rows = []
    for algo in sfattn.ALGORITHMS:
        try:
            plan = sfattn.make_plan(rt.mesh, a.heads, a.seq, a.dim, algo)
        except sfattn.PlanError as e:
            rows.append((algo, "-", str(e).split(":")[0], "", ""))
            continue
        layer = sfattn.SPAttention(rt, plan, 1, "bfloat16" if gpu else "float64")
        lo, L = rt.rank * layer.Sl, layer.shard_len()
        shard = [x[:, lo:lo + L] for x in (q, k, v)]
        if gpu:
            shard = [x.contiguous() for x in shard]
        times = []
        for _ in range(a.iters):
            rt.barrier_all()
            rt.sync()
            t0 = time.perf_counter()
            o = sfattn.attention(*shard, layer)
            rt.sync()
            times.append(time.perf_counter() - t0)
        o = o.float().cpu().numpy() if gpu else o
        err = float(np.abs(o - ref[:, lo:lo + L]).max() / np.abs(ref).max()) if L else 0.0
        # the worst error and time over the ranks, gathered through the heap
        stats = rt.alloc((rt.world_size, 2), "float64")
        mine = np.array([err, float(np.median(times))])
        if gpu:
            import cupy

            mine = cupy.asarray(mine)
        rt.put(stats[rt.rank], mine, 0)
        rt.barrier_all()
        rt.sync()
        allstats = stats.local.get() if gpu else np.array(stats.local)
        rows.append((algo, f"T={plan.T} U={plan.U} R={plan.R}", f"{allstats[:, 0].max():.1e}",
                     f"{allstats[:, 1].max() * 1e3:.2f}", "ok" if allstats[:, 0].max() < (2e-2 if gpu else 1e-9) else "WRONG"))
        rt.free(stats)
        sfattn.release(layer)
        layer.close()
    if rt.rank == 0:
        print(f"sfattn: backend={rt.backend_name}, mesh {rt.mesh.machines}x{rt.mesh.gpus_per_machine}, "
              f"seq {a.seq}, {a.heads} heads x {a.dim}, {'bf16' if gpu else 'float64'}")
        print(f"{'algorithm':>9} {'degrees':>14} {'rel err':>9} {'ms':>8} check")
        for r in rows:
            print(f"{r[0]:>9} {r[1]:>14} {r[2]:>9} {r[3]:>8} {r[4]}")
        if any(r[4] == "WRONG" for r in rows):
            raise SystemExit("sfattn: an algorithm disagrees with the reference")
    oneside.finalize()


if __name__ == "__main__":
    main()
