"""oneside primitives on GPUs: run under ``python -m oneside.launch -n N --backend nvshmem``.

Exits non-zero on the first failed check; prints one line per check from rank 0.
"""
from __future__ import annotations

import sys

import cupy as cp
import numpy as np

import oneside
from oneside import CommTimeoutError, PeerDeadError


def fill(rank: int, shape, salt: int = 0) -> cp.ndarray:
    rng = np.random.default_rng(1000 * rank + salt)
    return cp.asarray(rng.standard_normal(shape).astype(np.float32))


def main() -> None:
    rt = oneside.init(timeout=30)
    n, me = rt.world_size, rt.rank
    assert rt.backend_name == "nvshmem", rt.backend_name
    stream = cp.cuda.Stream(non_blocking=True)
    say = (lambda m: print(f"[{n} ranks] ok: {m}", flush=True)) if me == 0 else (lambda m: None)

    # put into row `me` of every rank, odd shapes, poisoned destination
    x = rt.alloc((n, 5, 7), "float32")
    x.local[...] = cp.nan
    rt.sync()
    rt.barrier_all()
    for p in range(n):
        rt.put(x[me], fill(me, (5, 7), p), p)
    rt.barrier_all()
    rt.sync()
    for src in range(n):
        cp.testing.assert_array_equal(x.local[src], fill(src, (5, 7), me))
    say("put with offsets, all pairs")

    # get of an odd window
    y = rt.alloc((64,), "float64")
    y.local[...] = cp.arange(64) + 1000 * me
    rt.barrier_all()
    got = cp.empty(13, cp.float64)
    peer = (me + 1) % n
    rt.get(got, y.window(17, 13), peer)
    rt.sync()
    cp.testing.assert_array_equal(got, cp.arange(17, 30) + 1000 * peer)
    say("get of an odd window")

    # all-to-all with both engines, on a side stream, repeated
    blk = 1001
    send = rt.alloc((n, blk), "float32")
    recv = rt.alloc((n, blk), "float32")
    pulled = cp.empty((n, blk), cp.float32)
    for engine in ("ce", "sm"):
        push = rt.batch("put", [(send[p], p, recv[me]) for p in range(n)], engine=engine)
        pull = rt.batch("get", [(pulled[p], p, send[me]) for p in range(n)], engine=engine)
        for it in range(3):
            send.local[...] = cp.stack([fill(me, blk, 100 * it + p) for p in range(n)])
            recv.local[...] = cp.nan
            pulled[...] = cp.nan
            rt.sync()
            rt.barrier_all(stream)
            push.issue(stream)
            pull.issue(stream)
            rt.barrier_all(stream)
            rt.sync(stream)
            for p in range(n):
                cp.testing.assert_array_equal(recv.local[p], fill(p, blk, 100 * it + me))
                cp.testing.assert_array_equal(pulled[p], fill(p, blk, 100 * it + me))
        say(f"scatter_push / gather_pull, engine={engine}")

    # put-with-signal: every peer adds 1 after its data; wait on a stream and on the host
    data = rt.alloc((n, 4), "int64")
    sig = rt.alloc(1, "uint64")
    sig.local[...] = 0
    rt.sync()
    rt.barrier_all()
    with stream:  # sources are written on the stream that reads them
        mine = cp.full(4, me, cp.int64)
        tens = cp.full(4, 10 + me, cp.int64)
    for p in range(n):
        if p != me:
            rt.put_signal(data[me], mine, p, sig, 1, "add", stream=stream)
    rt.signal_wait(sig, n - 1, "ge", stream=stream)
    out = cp.empty((n, 4), cp.int64)
    with stream:
        out[...] = data.local
    rt.sync(stream)
    for p in range(n):
        if p != me:
            assert (out[p] == p).all(), out
    rt.scatter_push([(tens, p, data[me]) for p in range(n) if p != me],
                    stream=stream, signal=sig, signal_value=2)
    rt.signal_wait(sig, 3 * (n - 1), "eq")  # host wait
    say("put_signal + signal_wait on stream and host")

    rt.barrier_all()

    # team barriers (machine and cross teams of the mesh)
    mesh = rt.mesh
    z = rt.alloc((n,), "int64")
    z.local[...] = -1
    rt.sync()
    rt.barrier_all(stream)  # the puts below go on `stream`: order them after this barrier
    for team in (mesh.machine_team(me), mesh.cross_team(me)):
        for it in range(3):
            with stream:
                val = cp.array([100 * it + me], cp.int64)
            for p in team:
                rt.put(z[me:me + 1], val, p, stream=stream)
            rt.barrier(team, stream)
            rt.sync(stream)
            for p in team:
                assert int(z.local[p]) == 100 * it + p, (team, it, z.local)
            rt.barrier(team, stream)
    say(f"barriers on machine and cross teams of {mesh}")

    # torch interop, bf16 view, errors
    import torch

    b = rt.alloc((4, 8), "bfloat16")
    tb = b.torch()
    assert tb.dtype == torch.bfloat16 and tb.is_cuda
    tb.fill_(2.5)
    torch.cuda.synchronize()
    rt.barrier_all()
    tt = torch.empty(4, 8, dtype=torch.bfloat16, device="cuda")
    rt.get(tt, b, (me + 1) % n)
    rt.sync()
    assert (tt == 2.5).all()
    try:
        rt.put(b, np.zeros((4, 8), np.uint16), 0)
        raise AssertionError("numpy source accepted")
    except TypeError as e:
        assert "GPU memory" in str(e)
    say("torch tensors (bf16) and error on host memory")

    # heap use stays flat across repeated batch issue
    used = rt.heap_used
    for _ in range(100):
        push.issue(stream)
    rt.barrier_all(stream)
    rt.sync(stream)
    assert rt.heap_used == used
    say("heap use unchanged by repeated issue")

    # last (it breaks the runtime): a wait that times out is a failure of this runtime - the
    # GPU-side wait gives up too, and every later call raises the same error (sticky). Every rank
    # times out here; one that sees a peer's failure before its own deadline reports the peer
    # (PeerDeadError) instead: both are the failure this checks
    sig = rt.alloc(1, "uint64")
    sig.local[...] = 0
    rt.barrier_all()
    try:
        rt.signal_wait(sig, 1 << 40, "ge", timeout=0.3)
        raise AssertionError("signal_wait did not time out")
    except (CommTimeoutError, PeerDeadError):
        pass
    for call in (rt.sync, rt.check, rt.barrier_all):
        try:
            call()
            raise AssertionError(f"{call.__name__} after a timed-out wait did not raise")
        except (CommTimeoutError, PeerDeadError):
            pass
    say("host signal_wait times out; the failure is sticky")
    oneside.finalize(failed=True)
    if me == 0:
        print("ALL GPU PRIMITIVE CHECKS PASSED", flush=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        oneside.finalize(failed=True)
        sys.exit(1)
