"""A layer's fixed cost: its time beyond its attention kernels, split by cause (GPU; N ranks).

    # 1, 2 and 4 ranks sharing one GPU under MPS (scripts/gpu_fixed.sh does all three)
    python -m oneside.launch -n 2 --backend nvshmem perf/bench_fixed.py --json /tmp/fixed_2.json

Flux shapes (24 heads x 128, bf16): 1024^2 = 4096 image + 512 text tokens, 2048^2 = 16384 + 512.
Per shape, interleaved rounds on every rank: every rank starts each piece together on an idle GPU,
behind a device-side sleep that hides the host's launch time unless issuing takes longer and a
barrier on the GPU that releases every rank at once (so pieces that share the GPU, the ranks'
kernels among them, are timed from one start to each rank's end, as a layer is); CUDA events; medians:

* ``layer``: ``sfattn.attention`` (the torch op), the planner's algorithm with the layer's
  defaults (its exchange and compute replayed as one CUDA graph; the Ulysses exchange by stores
  into the members' mapped heaps, ``p2p``, where the team is inside one machine);
  ``eager``: the same layer with ``cuda_graph=False``; ``layer_put``: with ``p2p=False`` (send
  buffer, puts; measured where the default is p2p);
* ``kernels``: the layer's attention kernels alone (its compute steps, on the data already in
  its buffers) - ``fixed = layer - kernels`` (``fixed_put_us``: the same for ``layer_put``);
* ``layer_io``: the layer with ``io_buffers=True`` called on its io tensors, where that computes
  in place (Ulysses over ranks sharing one GPU: barrier, one kernel reading the members' inputs
  and writing their outputs, barrier), and ``kernels_io``, that kernel alone:
  ``fixed_io_us = layer_io - kernels_io``;
* the pieces of the fixed cost, each alone: ``push`` / ``pull`` (p2p: Q, K, V into the members'
  receive buffers; the output rows back into the caller's tensor; ``push_own`` / ``pull_own``: the
  same without this rank's own head group, which a Ulysses-only plan's kernel reads and writes in
  the caller's tensors), ``barrier`` (one
  BarrierAll); of the put exchange: ``pack`` (Q, K, V into the send buffers), ``exchange`` (the
  Ulysses ScatterPush and the barrier after it), ``reverse`` (the output's ScatterPush back and
  its barrier), ``unpack``;
* ``host_*``: the host's time to issue each (wall clock, no sync), against which the GPU time
  says whether a layer is host-bound; ``--profile N``: rank 0's cProfile of N layer calls.

Rank 0 prints a table and, with ``--summary``, writes ``layer_fixed_us_2ranks_flux1024`` (the
default call on the caller's tensors) and ``layer_fixed_us_2ranks_flux1024_io`` (io buffers, in
place) from a 2-rank run on one GPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import update_summary  # noqa: E402

SHAPES = {"flux1024": 4096 + 512, "flux2048": 16384 + 512}


def timed(rt, fns: dict, reps: int) -> tuple[dict, dict]:
    """Median GPU seconds (CUDA events) and host issue seconds of each fn, interleaved rounds; every
    rank starts each fn together (idle GPU, a short device-side sleep, then a GPU barrier)."""
    import random

    import torch

    for fn in fns.values():
        for _ in range(5):
            fn()
    gpu: dict = {k: [] for k in fns}
    host: dict = {k: [] for k in fns}
    order = list(fns)
    for rep in range(reps):
        random.Random(rep).shuffle(order)  # the same order on every rank
        for k in order:
            rt.barrier_all()
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(1_000_000)
            rt.barrier_all(rt.backend.stream_handle(None))  # release every rank's piece at once
            a.record()
            t0 = time.perf_counter()
            fns[k]()
            host[k].append(time.perf_counter() - t0)
            b.record()
            torch.cuda.synchronize()
            gpu[k].append(a.elapsed_time(b) / 1e3)
    return ({k: statistics.median(v) for k, v in gpu.items()}, {k: statistics.median(v) for k, v in host.items()})


def measure(rt, name: str, S: int, reps: int, profile: int) -> dict:
    import torch

    import sfattn
    from sfattn.op import release

    H, D = 24, 128
    dev = torch.device("cuda", rt.backend.device)
    plan = sfattn.make_plan(rt.mesh, H, S, D)
    layer = sfattn.SPAttention(rt, plan, 1, "bfloat16")
    eager = sfattn.SPAttention(rt, plan, 1, "bfloat16", cuda_graph=False)  # every launch from the host
    put = sfattn.SPAttention(rt, plan, 1, "bfloat16", p2p=False) if layer.p2p is not None else None
    old = put or layer  # the layer whose put exchange's pieces are timed
    io = sfattn.SPAttention(rt, plan, 1, "bfloat16", io_buffers=True)
    L = layer.shard_len()
    g = torch.Generator(device=dev).manual_seed(rt.rank)
    q, k, v = (torch.randn(1, L, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    out = torch.empty_like(q)
    C = lambda: rt.backend.stream_handle(None)  # noqa: E731  the caller's (torch's current) stream
    steps = [arg for kind, arg, _ in layer.steps if kind == "run"]
    fns = {
        "layer": lambda: sfattn.attention(q, k, v, layer),
        "eager": lambda: sfattn.attention(q, k, v, eager),
        "kernels": lambda: [run(C()) for run in steps],
        "pack": lambda: [old._pack(x, old._send_views[n]) for n, x in zip("qkv", (q, k, v))],
        "barrier": lambda: rt.barrier_all(C()),
        "unpack": lambda: old._unpack(out),
    }
    if plan.U > 1:
        fns["exchange"] = lambda: (old.ulysses.issue(C()), rt.barrier_all(C()))
        fns["reverse"] = lambda: (old.ulysses_back.issue(C()), rt.barrier(old.Ut, C()))
    if put is not None:
        fns["layer_put"] = lambda: sfattn.attention(q, k, v, put)
        fns["push"] = lambda: layer.p2p.push(q, k, v, C())
        fns["pull"] = lambda: layer.p2p.pull(out, C())
    if layer._own:  # what the default call moves: the other members' pieces only
        fns["push_own"] = lambda: layer.p2p.push(q, k, v, C(), own=True)
        fns["pull_own"] = lambda: layer.p2p.pull(out, C(), own=True)
    if io.io_in_place:
        for x, t in zip("qkv", (q, k, v)):
            io.io[x].copy_(t)
        fns["layer_io"] = lambda: io(io.io["q"], io.io["k"], io.io["v"], out=io.io["o"])
        fns["kernels_io"] = lambda: io._io_run(C())
    t, h = timed(rt, fns, reps)
    if profile and rt.rank == 0:  # where the host's time per layer call goes
        import cProfile
        import io
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        for _ in range(profile):
            sfattn.attention(q, k, v, layer)
        pr.disable()
        torch.cuda.synchronize()
        txt = io.StringIO()
        pstats.Stats(pr, stream=txt).sort_stats("tottime").print_stats(25)
        print(f"== host profile, {name}, {profile} layer calls ==\n" + txt.getvalue(), flush=True)
    else:
        for _ in range(profile):
            sfattn.attention(q, k, v, layer)
        torch.cuda.synchronize()
    res = {k: round(x * 1e6, 2) for k, x in t.items()}
    res.update({f"host_{k}": round(x * 1e6, 2) for k, x in h.items()})
    res.update(fixed_us=round((t["layer"] - t["kernels"]) * 1e6, 2),
               plan=f"{plan.algorithm} T={plan.T} U={plan.U} R={plan.R}{' p2p' if layer.p2p else ''}",
               tokens=S, shard=L)
    if put is not None:
        res["fixed_put_us"] = round((t["layer_put"] - t["kernels"]) * 1e6, 2)
    if io.io_in_place:
        res["fixed_io_us"] = round((t["layer_io"] - t["kernels_io"]) * 1e6, 2)
    for x in (layer, eager, io, *([put] if put else [])):
        release(x)
        x.close()
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="*", choices=tuple(SHAPES), default=list(SHAPES))
    p.add_argument("--reps", type=int, default=31)
    p.add_argument("--heap", default="6GiB", help="symmetric heap per rank (two layers of the largest shape)")
    p.add_argument("--profile", type=int, default=0, help="rank 0: cProfile of this many layer calls")
    p.add_argument("--json", default=None)
    p.add_argument("--summary", default=None, help="summary.json to update (2 ranks on one GPU only)")
    a = p.parse_args()
    import torch

    import oneside

    rt = oneside.init(backend="nvshmem", heap_size=a.heap)
    out = {}
    for name in a.shapes:
        mine = measure(rt, name, SHAPES[name], a.reps, a.profile)
        keys = [k for k in mine if isinstance(mine[k], float)]
        vals = [max(0, int(mine[k] * 100)) for k in keys]  # 10 ns units; exchange() takes 29 at a time
        table = np.concatenate([rt.exchange("bench_fixed", vals[i:i + 29]) for i in range(0, len(vals), 29)], axis=1)
        m = mine["max_over_ranks"] = {k: float(table[:, i].max()) / 100 for i, k in enumerate(keys)}
        m["fixed_us"] = round(m["layer"] - m["kernels"], 2)  # the critical path: slowest layer - slowest kernels
        if "layer_put" in m:
            m["fixed_put_us"] = round(m["layer_put"] - m["kernels"], 2)
        if "layer_io" in m:
            m["fixed_io_us"] = round(m["layer_io"] - m["kernels_io"], 2)
        out[name] = mine
    shared = torch.cuda.device_count() < rt.world_size
    res = dict(ranks=rt.world_size, device=torch.cuda.get_device_name(rt.backend.device), shared_gpu=shared,
               shapes=out)
    if rt.rank == 0:
        cols = ["layer", "eager", "kernels", "fixed_us", "layer_io", "kernels_io", "fixed_io_us", "push", "barrier",
                "pull", "push_own", "pull_own", "layer_put", "fixed_put_us",
                "pack", "exchange", "reverse", "unpack", "host_layer", "host_eager", "host_kernels",
                "host_push", "host_pull", "host_barrier", "host_pack", "host_exchange", "host_reverse",
                "host_unpack"]
        print(f"{rt.world_size} ranks on {res['device']}{' (sharing it)' if shared else ''}: us, max over ranks")
        print(f"{'shape':<10} {'plan':<26} " + " ".join(f"{c.replace('host_', 'h.')[:9]:>9}" for c in cols))
        for name, r in out.items():
            m = r["max_over_ranks"]
            print(f"{name:<10} {r['plan']:<26} " + " ".join(f"{m[c]:9.1f}" if c in m else f"{'-':>9}" for c in cols))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
        if a.summary and rt.world_size == 2 and "flux1024" in out:
            m = out["flux1024"]["max_over_ranks"]
            keys = {"layer_fixed_us_2ranks_flux1024": m["fixed_us"], "layer_fixed_card": res["device"]}
            if "fixed_io_us" in m:
                keys["layer_fixed_us_2ranks_flux1024_io"] = m["fixed_io_us"]
            update_summary(keys, Path(a.summary))
    oneside.finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
