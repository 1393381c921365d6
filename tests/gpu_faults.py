"""Failure handling on GPUs: run under ``python -m oneside.launch -n 2 --backend nvshmem``.

A barrier reached from different call sites on the two ranks: the GPU-side waits record the
mismatch instead of matching the wrong rounds, ``sync()`` raises it on both ranks, a buffer
passed to ``poison_if_failed`` is NaN, and the failure is sticky (``check()`` raises again). A
barrier's ``poison=`` leaves its buffer alone while no wait failed and sets every byte after one
(an odd length at an odd address: the kernel's unaligned head and tail). A barrier launched as a
programmatic dependent launch (``dependent=True``) right behind a long kernel that writes a
buffer: the peer reads that buffer after the barrier and finds every value written.
"""
from __future__ import annotations

import cupy as cp

import oneside


def main() -> None:
    rt = oneside.init(timeout=20)
    x = rt.alloc((1000,), "float32")
    x.local[...] = 1.0
    s = cp.cuda.Stream(non_blocking=True)
    b = rt.alloc((4099,), "uint8")
    y = b[3:4000]  # odd address and length
    b.local[...] = 7
    rt.barrier_all(s, poison=y)  # matched barriers first: nothing poisoned
    rt.barrier_all(s)
    rt.sync(s)
    assert (b.local == 7).all(), "a barrier's poison= marked a buffer while no wait had failed"
    big = rt.alloc((1 << 24,), "float32")  # 64 MiB: its fill takes ~30 us
    got = cp.empty((1 << 24,), cp.float32)
    for it in range(3):
        with s:
            big.local.fill(float(10 * it + rt.rank + 1))
        rt.barrier_all(s, dependent=True, poison=y)
        rt.get(got, big, 1 - rt.rank, stream=s)
        rt.sync(s)
        want = float(10 * it + (1 - rt.rank) + 1)
        assert bool((got == want).all()), f"a dependent barrier let the peer read before the fill ended ({it})"
        rt.barrier_all(s)
    rt.sync(s)
    assert (b.local == 7).all(), "a dependent barrier's poison= marked a buffer while no wait had failed"
    if rt.rank == 0:  # mismatched: the wait records it, then poisons y in the same launch
        rt.barrier_all(s, poison=y)
    else:
        rt.barrier_all(s, poison=y)
    rt.poison_if_failed(x, s)
    try:
        rt.sync(s)
    except oneside.CollectiveMismatchError as e:
        assert "different call site" in str(e), e
    else:
        raise AssertionError("a barrier from another call site was not detected")
    assert cp.isnan(x.local).all(), "poison_if_failed did not mark the buffer"
    got = b.local.get()
    assert (got[3:4000] == 0xFF).all() and (got[:3] == 7).all() and (got[4000:] == 7).all(), \
        "a barrier's poison= did not mark exactly its buffer after a failure"
    try:
        rt.check()
    except oneside.CollectiveMismatchError:
        pass
    else:
        raise AssertionError("the failure is not sticky")
    print(f"rank {rt.rank}: GPU FAULT CHECKS PASSED", flush=True)
    oneside.finalize(failed=True)


if __name__ == "__main__":
    main()
