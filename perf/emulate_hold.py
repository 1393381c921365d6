"""The emulated link's hold (``ONESIDE_EMULATE_LINK``), measured on one GPU: how long a hold of
``t`` lasts, and whether it overlaps a kernel that occupies every SM (the persistent attention
kernel) running on another stream. Both hold modes in one process (``hold_mode`` is switched in
place; the host mode needs ``$ONESIDE_EMULATE_LINK`` set at init):

    ONESIDE_EMULATE_LINK=40,10 python -m oneside.launch -n 2 --machines 2 --backend nvshmem \\
        perf/emulate_hold.py --json /tmp/hold.json

Rank 0 only reports (every rank runs the same). Times: CUDA events, medians over ``--reps``.
* ``hold_<t>ms``: one hold of t ms alone on a stream (ideal: t);
* ``hold_0_x20``: 20 zero-length holds back to back (the per-hold overhead);
* ``overlap``: the attention kernel (alone: ``kernel`` ms) on stream C and, issued right after it,
  a hold of the same length on stream B; the time until both are done (ideal: max of the two,
  serialised: their sum).
"""
from __future__ import annotations

import argparse
import json
import statistics


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    import torch

    import oneside
    from sfattn.kernels import attn_blocks

    rt = oneside.init(backend="nvshmem", heap_size="1GiB")
    be = rt.backend
    if be.link is None or be.hold_mode != "host":
        raise SystemExit("run with ONESIDE_EMULATE_LINK set and ONESIDE_EMULATE_HOLD unset (host)")
    dev = torch.device("cuda", be.device)
    q, k, v = (torch.randn(1, a.tokens, 24, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
    o = torch.empty_like(q)
    C, B = torch.cuda.Stream(dev), torch.cuda.Stream(dev)

    def attn() -> None:
        attn_blocks([q], [k], [v], None, 128 ** -0.5, init=True, finalize=True, out=[o], stream=C.cuda_stream)

    def timed(fn) -> float:
        out = []
        for _ in range(a.reps):
            torch.cuda.synchronize()
            e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            torch.cuda._sleep(200_000)  # the host issues everything before the GPU starts
            e0.record(torch.cuda.current_stream())
            C.wait_event(e0)
            B.wait_event(e0)
            fn()
            e1.record(C)
            e2.record(B)
            torch.cuda.synchronize()
            out.append(max(e0.elapsed_time(e1), e0.elapsed_time(e2)))
        return statistics.median(out)

    attn()
    torch.cuda.synchronize()
    res: dict = {"tokens": a.tokens, "card": torch.cuda.get_device_name(dev)}
    kernel_ms = timed(attn)
    res["kernel"] = kernel_ms
    ns = int(kernel_ms * 1e6)
    for mode in ("kernel", "host"):
        be.hold_mode = mode
        be._hold(1000, B.cuda_stream)  # warm-up (first use of the word, module load)
        torch.cuda.synchronize()
        r = res[mode] = {}
        for t in (0.1, 1.0, 5.0):
            r[f"hold_{t}ms"] = timed(lambda t=t: be._hold(int(t * 1e6), B.cuda_stream))
        r["hold_0_x20"] = timed(lambda: [be._hold(0, B.cuda_stream) for _ in range(20)])
        r["overlap"] = timed(lambda: (attn(), be._hold(ns, B.cuda_stream)))
    be.hold_mode = "host"
    if rt.rank == 0:
        print(json.dumps(res, indent=1))
        print(f"attention kernel alone {kernel_ms:.2f} ms; kernel + an equal hold on another stream: "
              f"kernel-mode hold {res['kernel']['overlap']:.2f} ms, host-mode hold {res['host']['overlap']:.2f} ms")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
    rt.barrier_all()
    oneside.finalize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
