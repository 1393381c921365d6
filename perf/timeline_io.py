"""Where an io-buffer layer call's GPU time goes: device timestamps (``%globaltimer``, one clock for
every process on a GPU) between its parts, on every rank (GPU; N ranks sharing one GPU under MPS).

    python -m oneside.launch -n 2 --backend nvshmem perf/timeline_io.py --json /tmp/timeline_io.json

Sequences, each started together on every rank behind a device-side sleep (as in bench_fixed.py),
medians over ``--reps``; times are microseconds from the earliest rank's first stamp:

* ``parts``: barrier | kernel | barrier (poisoning the output on a failure), the io call's parts
  issued one by one;
* ``kernel``: the in-place kernel alone; ``aligned``: a barrier, then the kernel alone;
* ``layer``: the whole io call (its CUDA graph); ``layer_xN`` / ``kernel_xN``: N of them back to
  back (the per-layer cost in a model, where the start skew of one call is paid once);
* ``stamp_x20`` / ``pdl_x20`` / ``quiet_x20`` / ``barrier_x20``: 20 launches, programmatic dependent
  launches, NVSHMEM quiets and barriers back to back (the cost of each).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STAMP_SRC = r"""
extern "C" __global__ void stamp(unsigned long long* t, int i) {
    unsigned long long now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    t[i] = now;
}
// The same as a programmatic dependent launch: wait for the previous grid, stamp, let the next start.
extern "C" __global__ void stamp_pdl(unsigned long long* t, int i) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    unsigned long long now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    t[i] = now;
    asm volatile("griddepcontrol.launch_dependents;");
}
"""


def pdl_launcher():
    """``launch(function pointer, stream, stamps address, index)`` of a stamp kernel: a 1x1
    programmatic dependent launch (:mod:`oneside.pdl`: it may start before the previous kernel ends)."""
    import ctypes as c

    from oneside import pdl

    def launch(fn: int, stream: int, stamps: int, i: int) -> None:
        vals = (c.c_uint64(stamps), c.c_int32(i))
        argv = (c.c_void_p * len(vals))(*[c.addressof(v) for v in vals])
        pdl.launch(fn, (1, 1, 1), (1, 1, 1), 0, stream, c.addressof(argv))
    return launch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096 + 512)
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--burst", type=int, default=10)
    p.add_argument("--heap", default="2GiB")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    import cupy
    import numpy as np
    import torch

    import oneside
    import sfattn
    from sfattn.op import release

    rt = oneside.init(backend="nvshmem", heap_size=a.heap)
    H, D, N = 24, 128, a.burst
    dev = torch.device("cuda", rt.backend.device)
    plan = sfattn.make_plan(rt.mesh, H, a.tokens, D)
    io = sfattn.SPAttention(rt, plan, 1, "bfloat16", io_buffers=True)
    if not io.io_in_place:
        raise SystemExit(f"the io call is not in place here (plan {plan.algorithm} U={plan.U})")
    g = torch.Generator(device=dev).manual_seed(rt.rank)
    for x in "qkv":
        io.io[x].copy_(torch.randn(io.io[x].shape, device=dev, dtype=torch.bfloat16, generator=g))
    mod = cupy.RawModule(code=STAMP_SRC)
    fn, fn_pdl = mod.get_function("stamp"), mod.get_function("stamp_pdl")
    pdl = pdl_launcher()
    T = cupy.zeros(64, dtype=cupy.uint64)
    C = lambda: rt.backend.stream_handle(None)  # noqa: E731

    def st(i: int) -> None:
        with cupy.cuda.ExternalStream(C()):
            fn((1,), (1,), (T, np.int32(i)))

    def st_pdl(i: int) -> None:
        pdl(fn_pdl.kernel.ptr, C(), T.data.ptr, i)

    def call() -> None:
        io(io.io["q"], io.io["k"], io.io["v"], out=io.io["o"])

    def parts() -> None:  # the io call's parts (SPAttention._compute_io), a stamp between each
        st(0); rt.barrier_all(C()); st(1); io._io_run(C()); st(2)  # noqa: E702
        rt.barrier_all(C(), poison=io.IO["o"]); st(3)  # noqa: E702

    seqs = {
        "parts": (parts, ["barrier", "kernel", "barrier+poison"]),
        "kernel": (lambda: (st(0), io._io_run(C()), st(1)), ["kernel"]),
        "aligned": (lambda: (rt.barrier_all(C()), st(0), io._io_run(C()), st(1)), ["kernel"]),
        "layer": (lambda: (st(0), call(), st(1)), ["layer"]),
        f"layer_x{N}": (lambda: (st(0), [call() for _ in range(N)], st(1)), [f"{N} layers"]),
        f"kernel_x{N}": (lambda: (st(0), [io._io_run(C()) for _ in range(N)], st(1)), [f"{N} kernels"]),
        # the launch and barrier costs: 20 of each back to back (after an aligning barrier)
        "stamp_x20": (lambda: (rt.barrier_all(C()), st(0), [st(1) for _ in range(20)]), ["20 launches"]),
        "pdl_x20": (lambda: (rt.barrier_all(C()), st(0), [st_pdl(1) for _ in range(20)]), ["20 PDL launches"]),
        "quiet_x20": (lambda: (rt.barrier_all(C()), st(0), [rt.backend.lib.os_quiet(C()) for _ in range(20)],
                               st(1)), ["20 quiets"]),
        "barrier_x20": (lambda: (rt.barrier_all(C()), st(0), [rt.barrier_all(C()) for _ in range(20)], st(1)),
                        ["20 barriers"]),
    }
    for f, _ in seqs.values():
        for _ in range(3):
            f()
    torch.cuda.synchronize()
    raw: dict = {k: [] for k in seqs}
    for rep in range(a.reps):
        for k, (f, names) in seqs.items():
            rt.barrier_all()
            torch.cuda.synchronize()
            torch.cuda._sleep(1_000_000)
            f()
            torch.cuda.synchronize()
            raw[k].append(T[:len(names) + 1].get().astype(np.int64))
    res: dict = {"ranks": rt.world_size, "device": torch.cuda.get_device_name(dev), "tokens": a.tokens,
                 "plan": f"{plan.algorithm} U={plan.U}", "seqs": {}}
    for k, (_, names) in seqs.items():
        stamps = np.stack(raw[k])  # [reps, n+1] ns, this rank
        # per rep: every rank's stamps relative to the earliest first stamp (exchanged rep by rep)
        rel = []
        for r in range(a.reps):
            t = rt.exchange("timeline", [int(x) for x in stamps[r]])  # [world, n]
            rel.append((t - t[:, :1].min()) / 1e3)
        rel = np.stack(rel)  # [reps, world, n] us
        med = np.median(rel, axis=0)
        seg = np.median(np.diff(rel, axis=2), axis=0)  # [world, n-1] per-part durations
        res["seqs"][k] = {"parts": names, "start_us": med[:, 0].round(2).tolist(),
                          "end_us": med[:, -1].round(2).tolist(),
                          "span_us": round(float(np.median(rel[:, :, -1].max(axis=1))), 2),
                          "part_us": seg.round(2).tolist()}
    if rt.rank == 0:
        print(f"{rt.world_size} ranks on {res['device']}, {a.tokens} tokens, {res['plan']}: us (median over "
              f"{a.reps}), per rank: start, part durations, end; span = last end - first start")
        for k, s in res["seqs"].items():
            print(f"{k:<12} span {s['span_us']:8.1f}  parts {s['parts']}")
            for r in range(rt.world_size):
                print(f"   rank {r}: start {s['start_us'][r]:7.1f}  parts "
                      + " ".join(f"{x:8.1f}" for x in s["part_us"][r]) + f"  end {s['end_us'][r]:8.1f}")
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
    release(io)
    io.close()
    oneside.finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
