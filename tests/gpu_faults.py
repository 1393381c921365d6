"""Failure handling on GPUs: run under ``python -m oneside.launch -n 2 --backend nvshmem``.

A barrier reached from different call sites on the two ranks: the GPU-side waits record the
mismatch instead of matching the wrong rounds, ``sync()`` raises it on both ranks, a buffer
passed to ``poison_if_failed`` is NaN, and the failure is sticky (``check()`` raises again). A
barrier's ``poison=`` leaves its buffer alone while no wait failed and sets every byte after one
(an odd length at an odd address: the kernel's unaligned head and tail).
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
