"""Does an emulated link's transfer overlap compute on one GPU? Two ranks on two virtual machines
sharing the GPU (``ONESIDE_EMULATE_LINK`` set); each rank runs the attention kernel on stream C
and, issued right after it, a get of ``--mbytes`` from the other rank on stream B:

    ONESIDE_EMULATE_LINK=40,10 python -m oneside.launch -n 2 --machines 2 --backend nvshmem \\
        perf/emulate_link.py --json /tmp/link.json

Reported (rank 0; CUDA events from a common start, medians over ``--reps``), in ms:
* ``kernel``: the attention kernel alone (both ranks' at once);
* ``copy``: the get's copy alone, no link time; ``copy_beside``: the same beside the kernel (the copy
  is a kernel between two processes' buffers: does it start before the compute ends?);
* ``hold``: the link time alone (a one-thread timer kernel); ``hold_beside``: beside the kernel;
* ``copy_then_hold_beside``: the emulated transfer as oneside issues it (copy, then timer) beside
  the kernel, and ``hold_then_copy_beside``: the opposite order. On a real link the transfer
  ends at its link time from the start, whatever compute does.
"""
from __future__ import annotations

import argparse
import json
import statistics


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--mbytes", type=int, default=128)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    import torch

    import oneside
    from sfattn.kernels import attn_blocks

    rt = oneside.init(backend="nvshmem", heap_size=f"{2 * a.mbytes + 64}MiB")
    be = rt.backend
    if be.link is None or rt.world_size != 2:
        raise SystemExit("run on 2 ranks with --machines 2 and ONESIDE_EMULATE_LINK set")
    dev = torch.device("cuda", be.device)
    q, k, v = (torch.randn(1, a.tokens, 24, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
    o = torch.empty_like(q)
    src = rt.alloc(a.mbytes << 20, "uint8")
    dst = torch.empty(a.mbytes << 20, dtype=torch.uint8, device=dev)
    peer = 1 - rt.rank
    nbytes = a.mbytes << 20
    delay = be._link_delay([nbytes], [peer])
    raw = be._prepare("get", [dst.data_ptr()], [src.offset], [nbytes], [peer], None, "ce")
    C, B = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
    Bh = B.cuda_stream

    def attn() -> None:
        attn_blocks([q], [k], [v], None, 128 ** -0.5, init=True, finalize=True, out=[o], stream=C.cuda_stream)

    def timed(fn, with_kernel: bool) -> float:
        """ms from the common start until stream B's work (and the kernel, if any) is done;
        returns B's end."""
        out = []
        for _ in range(a.reps):
            rt.barrier_all()
            torch.cuda.synchronize()
            e0, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            torch.cuda._sleep(300_000)  # the host issues everything before the GPU starts
            e0.record(torch.cuda.current_stream())
            C.wait_event(e0)
            B.wait_event(e0)
            if with_kernel:
                attn()
            fn()
            e2.record(B)
            torch.cuda.synchronize()
            out.append(e0.elapsed_time(e2))
        return statistics.median(out)

    attn()
    be.issue(raw, Bh)
    torch.cuda.synchronize()
    res: dict = {"tokens": a.tokens, "mbytes": a.mbytes, "link": list(be.link), "hold_ms": delay / 1e6,
                 "card": torch.cuda.get_device_name(dev)}
    res["kernel"] = timed(lambda: B.wait_stream(C), True)
    res["copy"] = timed(lambda: be.issue(raw, Bh), False)
    res["copy_beside"] = timed(lambda: be.issue(raw, Bh), True)
    res["hold"] = timed(lambda: be._hold(delay, Bh), False)
    res["hold_beside"] = timed(lambda: be._hold(delay, Bh), True)
    res["copy_then_hold_beside"] = timed(lambda: rt.get(dst, src, peer, stream=Bh), True)
    res["hold_then_copy_beside"] = timed(lambda: (be._hold(delay, Bh), be.issue(raw, Bh)), True)
    if rt.rank == 0:
        print(json.dumps(res, indent=1))
        print(f"kernel {res['kernel']:.2f} ms, hold {res['hold']:.2f}; transfer beside the kernel ends at: "
              f"copy then timer {res['copy_then_hold_beside']:.2f} ms, timer then copy {res['hold_then_copy_beside']:.2f} ms "
              f"(copy alone {res['copy']:.2f}, beside the kernel {res['copy_beside']:.2f})")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
    rt.barrier_all()
    oneside.finalize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
