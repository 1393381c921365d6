"""Failure handling on GPUs: run under ``python -m oneside.launch -n 2 --backend nvshmem``.

A barrier reached from different call sites on the two ranks: the GPU-side waits record the
mismatch instead of matching the wrong rounds, ``sync()`` raises it on both ranks, a buffer
passed to ``poison_if_failed`` is NaN, and the failure is sticky (``check()`` raises again).
"""
from __future__ import annotations

import cupy as cp

import oneside


def main() -> None:
    rt = oneside.init(timeout=20)
    x = rt.alloc((1000,), "float32")
    x.local[...] = 1.0
    s = cp.cuda.Stream(non_blocking=True)
    rt.barrier_all(s)  # one matched barrier first
    if rt.rank == 0:
        rt.barrier_all(s)
    else:
        rt.barrier_all(s)
    rt.poison_if_failed(x, s)
    try:
        rt.sync(s)
    except oneside.CollectiveMismatchError as e:
        assert "different call site" in str(e), e
    else:
        raise AssertionError("a barrier from another call site was not detected")
    assert cp.isnan(x.local).all(), "poison_if_failed did not mark the buffer"
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
