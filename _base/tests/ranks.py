"""Run a test function on N host-backend ranks (forked processes) and collect the results."""
from __future__ import annotations

import multiprocessing as mp
import socket
import traceback
import uuid
from typing import Any, Callable

import oneside


def _child(fn, rank, n, machines, job, heap, timeout, q, kwargs):
    try:
        rt = oneside.init(backend="host", heap_size=heap, rank=rank, world_size=n, machines=machines,
                          job=job, timeout=timeout)
        try:
            out = fn(rt, **kwargs)
        except BaseException:
            oneside.finalize(failed=True)
            raise
        oneside.finalize()
        q.put((rank, "ok", out))
    except BaseException as e:  # report, never hang the parent
        q.put((rank, "err", (type(e).__name__, str(e), traceback.format_exc())))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a torch.distributed group beside the ranks)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(fn: Callable[..., Any], n: int, machines: int = 1, heap: str = "4MiB", timeout: float = 20.0,
              deadline: float = 60.0, grace: float | None = None, **kwargs) -> list[tuple[str, Any]]:
    """Run ``fn(rt, **kwargs)`` on ``n`` ranks; returns ``[(status, value)]`` by rank.

    status is ``'ok'`` (value: fn's return) or ``'err'`` (value: (type name, message, traceback)).
    A rank that neither reports nor exits within ``deadline`` seconds fails the test; with
    ``grace``, the others get that many seconds after the first error (they may wait on it).
    """
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    job = "t" + uuid.uuid4().hex[:10]
    procs = [ctx.Process(target=_child, args=(fn, r, n, machines, job, heap, timeout, q, kwargs), daemon=True)
             for r in range(n)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    import queue
    import time

    end = time.monotonic() + deadline
    while len(results) < n and time.monotonic() < end:
        try:
            r, status, value = q.get(timeout=0.2)
            results[r] = (status, value)
            if status == "err" and grace is not None:
                end = min(end, time.monotonic() + grace)
        except queue.Empty:
            if all(not p.is_alive() for p in procs) and q.empty():
                break
    for p in procs:
        p.join(timeout=max(0.1, end - time.monotonic()))
        if p.is_alive():
            p.kill()
    for r in range(n):
        results.setdefault(r, ("dead", procs[r].exitcode))
    return [results[r] for r in range(n)]


def all_ok(results: list[tuple[str, Any]]) -> list[Any]:
    """Assert every rank succeeded; return their values."""
    bad = [(r, s, v) for r, (s, v) in enumerate(results) if s != "ok"]
    assert not bad, "ranks failed:\n" + "\n".join(
        f"rank {r} {s}: {v[2] if s == 'err' else v}" for r, s, v in bad)
    return [v for _, v in results]
