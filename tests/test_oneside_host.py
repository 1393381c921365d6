"""oneside primitives on the host backend with 2, 3, 4 and 8 ranks (forked processes)."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

import oneside
from oneside import CommTimeoutError, HeapExhaustedError, Mesh, OnesideError, Team
from ranks import all_ok, run_ranks

MESHES = [(2, 1), (1, 3), (2, 2), (2, 4)]  # (machines, gpus per machine): 2, 3, 4 and 8 ranks


def _fill(rank: int, shape, salt: int = 0) -> np.ndarray:
    rng = np.random.default_rng(1000 * rank + salt)
    return rng.standard_normal(shape).astype(np.float32)


# -- put / get with offsets ---------------------------------------------------------------
def _put_get(rt):
    n, me = rt.world_size, rt.rank
    x = rt.alloc((n, 5, 7), "float32")
    x.local[...] = np.nan  # poison: every row must be overwritten
    rt.barrier_all()
    for p in range(n):  # row `me` of every rank gets my block
        rt.put(x[me], _fill(me, (5, 7), p), p)
    rt.barrier_all()
    for src in range(n):
        np.testing.assert_array_equal(x.local[src], _fill(src, (5, 7), me))
    # get: an odd byte window in the middle of a peer's array
    y = rt.alloc((64,), "float64")
    y.local[...] = np.arange(64) + 1000 * me
    rt.barrier_all()
    got = np.empty(13, np.float64)
    peer = (me + 1) % n
    rt.get(got, y.window(17, 13), peer)
    np.testing.assert_array_equal(got, np.arange(17, 30) + 1000 * peer)
    rt.barrier_all()
    return True


@pytest.mark.parametrize("mesh", MESHES)
def test_put_get_offsets(mesh):
    all_ok(run_ranks(_put_get, mesh[0] * mesh[1], machines=mesh[0]))


# -- peer views: load/store into mapped peers' heaps -----------------------------------------
def _peer_views(rt):
    n, me = rt.world_size, rt.rank
    x = rt.alloc((n, 3, 5), "float32")
    b = rt.alloc((4, 6), "bfloat16")
    x.local[...] = np.nan
    rt.barrier_all()
    for p in range(n):
        assert rt.mapped(p)
        x[me].peer(p)[...] = _fill(me, (3, 5), p)  # a store into rank p's row `me`
        assert x[me].peer_ptr(p) == rt.backend.peer_address(x[me].offset, p)
    b.local[...] = me + 1  # bfloat16 windows are their bits (uint16) in numpy, as .local
    rt.barrier_all()
    for src in range(n):
        np.testing.assert_array_equal(x.local[src], _fill(src, (3, 5), me))
    peer = (me + 1) % n
    assert b.peer(peer).dtype == b.local.dtype and (b.peer(peer) == peer + 1).all()
    for bad in (-1, n):
        with pytest.raises(ValueError, match="out of range"):
            x.peer(bad)
    rt.barrier_all()
    return True


@pytest.mark.parametrize("mesh", [(1, 3), (2, 2)])
def test_peer_views(mesh):
    all_ok(run_ranks(_peer_views, mesh[0] * mesh[1], machines=mesh[0]))


# -- scatter_push / gather_pull (all-to-all) -------------------------------------------------
def _alltoall(rt, rounds):
    n, me = rt.world_size, rt.rank
    blk = 11  # odd element count
    send = rt.alloc((n, blk), "float32")
    recv = rt.alloc((n, blk), "float32")
    pulled = np.empty((n, blk), np.float32)
    push = rt.batch("put", [(send[p], p, recv[me]) for p in range(n)])
    pull = rt.batch("get", [(pulled[p], p, send[me]) for p in range(n)])
    assert push.count == n and push.nbytes == n * blk * 4
    for it in range(rounds):
        send.local[...] = [_fill(me, blk, 100 * it + p) for p in range(n)]
        recv.local[...] = np.nan
        pulled[...] = np.nan
        rt.barrier_all()
        push.issue()
        pull.issue()
        rt.barrier_all()
        for p in range(n):
            np.testing.assert_array_equal(recv.local[p], _fill(p, blk, 100 * it + me))
            np.testing.assert_array_equal(pulled[p], _fill(p, blk, 100 * it + me))
    # the one-shot forms
    rt.scatter_push([(send[p], p, recv[me]) for p in range(n)])
    rt.gather_pull([(pulled[p], p, send[me]) for p in range(n)])
    rt.barrier_all()
    np.testing.assert_array_equal(recv.local, pulled)
    return True


@pytest.mark.parametrize("mesh", MESHES)
def test_scatter_push_gather_pull(mesh):
    all_ok(run_ranks(_alltoall, mesh[0] * mesh[1], machines=mesh[0], rounds=3))


# -- signals -------------------------------------------------------------------------------
def _signals(rt):
    n, me = rt.world_size, rt.rank
    data = rt.alloc((n, 4), "int64")
    sig = rt.alloc(1, "uint64")
    flag = rt.alloc(1, "uint64")
    sig.local[...] = 0
    flag.local[...] = 0
    rt.barrier_all()
    # every peer pushes its row with an atomic +1 on my counter
    for p in range(n):
        if p != me:
            rt.put_signal(data[me], np.full(4, me, np.int64), p, sig, 1, "add")
    rt.signal_wait(sig, n - 1, "ge")
    assert int(sig.local[0]) == n - 1
    for p in range(n):
        if p != me:
            assert (data.local[p] == p).all()
    # batched push with a signal, then set / compare variants
    rt.barrier_all()
    rt.scatter_push([(np.full(4, 10 + me, np.int64), p, data[me]) for p in range(n) if p != me],
                    signal=sig, signal_value=2, signal_op="add")
    rt.signal_wait(sig, 3 * (n - 1), "eq")
    rt.signal_op(flag, 7, (me + 1) % n, "set")
    rt.signal_wait(flag, 7, "eq")
    rt.signal_wait(flag, 6, "gt")
    rt.signal_wait(flag, 8, "lt")
    rt.signal_wait(flag, 0, "ne")
    with pytest.raises(CommTimeoutError, match="signal_wait"):
        rt.signal_wait(flag, 8, "ge", timeout=0.2)
    rt.barrier_all()
    return [int(v) for v in data.local[:, 0]]


def _wait_next(rt):
    n, me = rt.world_size, rt.rank
    ready = rt.alloc(n, "uint64")
    ready.local[...] = 0
    rt.barrier_all()
    for rnd in range(1, 4):
        for p in range(n):
            if p != me:
                rt.signal_op(ready[me], 1, p, "add")
        rt.signal_wait_next(ready, skip=me)
        assert all(int(ready.local[p]) >= rnd for p in range(n) if p != me)
    with pytest.raises(CommTimeoutError, match="round 4"):
        rt.signal_wait_next(ready, skip=me, timeout=0.2)
    with pytest.raises(ValueError, match="skip=9"):
        rt.signal_wait_next(ready, skip=9)
    rt.barrier_all()
    return True


def test_signal_wait_next_rounds():
    all_ok(run_ranks(_wait_next, 3))


def _wait_next_after_free(rt):
    """A signal array freed after some rounds and a new one at the same offset: the new one
    starts from round 1 (a stale round count made a 2x2 torus layer wait for ever on GPUs)."""
    n, me = rt.world_size, rt.rank
    offsets = []
    for life in range(2):
        ready = rt.alloc((n,), "uint64")
        offsets.append(ready.offset)
        ready.local[...] = 0
        rt.barrier_all()
        for _ in range(3 - life):
            for p in range(n):
                if p != me:
                    rt.signal_op(ready[me:me + 1], 1, p, "add")
            rt.signal_wait_next(ready, skip=me, timeout=5)
        rt.barrier_all()
        rt.free(ready)
    assert offsets[0] == offsets[1]  # the case that matters: the same words again
    return True


def test_signal_wait_next_after_free():
    all_ok(run_ranks(_wait_next_after_free, 3, deadline=60))


@pytest.mark.parametrize("n", [2, 3, 8])
def test_signals(n):
    vals = all_ok(run_ranks(_signals, n))
    for me, row in enumerate(vals):
        assert row == [10 + p if p != me else row[me] for p in range(n)]


# -- barriers on sub-teams ---------------------------------------------------------------
def _team_barriers(rt):
    mesh, me = rt.mesh, rt.rank
    x = rt.alloc((rt.world_size,), "int64")
    x.local[...] = -1
    rt.barrier_all()
    for team in (mesh.machine_team(me), mesh.cross_team(me)):
        for it in range(5):
            for p in team:
                rt.put(x[me:me + 1], np.array([100 * it + me], np.int64), p)
            rt.barrier(team)
            for p in team:
                assert x.local[p] == 100 * it + p, (team, it, p, x.local)
            rt.barrier(team)  # nobody overwrites before everyone checked
    # a strided sub-team of the machine team
    sub = mesh.machine_team(me).strided(me % 2, 2, mesh.gpus_per_machine // 2)
    if me in sub:
        rt.barrier(sub)
    rt.barrier_all()
    # two virtual machines, one physical host
    assert rt.same_host(0, rt.world_size - 1) and not mesh.same_machine(0, rt.world_size - 1)
    assert len(rt.hosts) == rt.world_size
    return (mesh.machine_team(me).ranks, mesh.cross_team(me).ranks)


def test_barriers_on_subteams():
    vals = all_ok(run_ranks(_team_barriers, 8, machines=2))
    assert vals[5] == ((4, 5, 6, 7), (1, 5))


# -- errors ---------------------------------------------------------------------------------
def _errors(rt):
    n, me = rt.world_size, rt.rank
    x = rt.alloc((4, 4), "float32")
    with pytest.raises(ValueError, match="pe=5"):
        rt.put(x, x.local, 5)
    with pytest.raises(ValueError, match="pe=-1"):
        rt.get(x.local, x, -1)
    with pytest.raises(TypeError, match="symmetric"):
        rt.put(np.zeros(16, np.float32), x.local, 0)
    with pytest.raises(TypeError, match="poison: expected a SymArray"):
        rt.barrier_all(poison=np.zeros(4, np.float32))  # checked before any signal: no rank waits
    x.local[...] = 3.0
    rt.barrier_all(poison=x)  # a symmetric buffer: nothing failed, nothing marked
    assert (x.local == 3.0).all()
    x.local[...] = me + 1.0
    rt.barrier_all(dependent=True)  # no GPU: an ordinary barrier (the peers' writes are visible)
    y = np.empty((4, 4), np.float32)
    rt.get(y, x, (me + 1) % n)
    assert (y == (me + 1) % n + 1.0).all()
    rt.barrier_all()
    with pytest.raises(ValueError, match="size mismatch"):
        rt.put(x, np.zeros(3, np.float32), 0)
    with pytest.raises(ValueError, match="C-contiguous"):
        rt.put(x[0], np.zeros((4, 8), np.float32)[:, ::2], 0)
    with pytest.raises(ValueError, match="signal"):
        rt.signal_wait(x, 1)
    with pytest.raises(ValueError, match="op="):
        rt.signal_op(rt.alloc(1, "uint64"), 1, 0, "mul")
    with pytest.raises(ValueError, match="cmp="):
        rt.signal_wait(rt.alloc(1, "uint64"), 1, "gte")
    with pytest.raises(HeapExhaustedError, match="asked for"):
        rt.alloc((1 << 30,), "uint8")
    with pytest.raises(IndexError, match="contiguous"):
        x[:, 1]
    y = rt.alloc(8, "float32")
    rt.free(y)
    with pytest.raises(OnesideError, match="freed"):
        rt.put(y, np.zeros(8, np.float32), 0)
    with pytest.raises(ValueError, match="not a member"):
        rt.barrier(Team(tuple(p for p in range(n) if p != me)))
    # non-symmetric allocation: ranks ask for different sizes
    with pytest.raises(OnesideError, match="not symmetric"):
        rt.alloc((16 + 16 * me,), "uint8")
    rt.barrier_all()
    return True


def test_errors():
    all_ok(run_ranks(_errors, 3))


def test_use_before_init_and_after_finalize():
    with pytest.raises(oneside.NotInitializedError):
        oneside.current()
    rt = oneside.init(backend="host", heap_size="1MiB", rank=0, world_size=1, job="solo" + str(os.getpid()))
    x = rt.alloc(4, "float32")
    rt.put(x, np.ones(4, np.float32), 0)
    assert (x.local == 1).all()
    oneside.finalize()
    with pytest.raises(oneside.NotInitializedError):
        rt.put(x, np.ones(4, np.float32), 0)
    with pytest.raises(oneside.NotInitializedError):
        oneside.current()


def test_heap_too_small_for_the_reserved_area():
    with pytest.raises(OnesideError, match="heap_size=4096: too small"):
        oneside.init(backend="host", heap_size=4096, rank=0, world_size=1, job="tiny" + str(os.getpid()))
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
    assert not [f for f in os.listdir(shm) if f.startswith(f"oneside-tiny{os.getpid()}")]


def test_bad_init_arguments():
    with pytest.raises(ValueError, match="heap_size"):
        oneside.init(backend="host", heap_size="lots", rank=0, world_size=1)
    with pytest.raises(ValueError, match="rank=3"):
        oneside.init(backend="host", rank=3, world_size=2)
    with pytest.raises(ValueError, match="machines=3"):
        oneside.init(backend="host", rank=0, world_size=4, machines=3)
    with pytest.raises(ValueError, match="backend="):
        oneside.init(backend="mpi", rank=0, world_size=1)


def test_join_timeout_names_missing_ranks():
    t0 = time.monotonic()
    with pytest.raises(CommTimeoutError, match=r"ranks \[1\] did not join"):
        oneside.init(backend="host", heap_size="1MiB", rank=0, world_size=2, job="lonely" + str(os.getpid()),
                     timeout=0.5)
    assert time.monotonic() - t0 < 5


# -- a late rank and a dead rank ---------------------------------------------------------
def _late(rt):
    if rt.rank == 1:
        time.sleep(2.0)
    rt.barrier_all(timeout=0.5)


def test_barrier_timeout_names_missing_rank():
    res = run_ranks(_late, 3, timeout=5, deadline=30)
    for r in (0, 2):
        status, (name, msg, _) = res[r]
        assert status == "err" and name == "CommTimeoutError", res[r]
        assert "ranks [1] did not arrive" in msg
    # the late rank finds its peers gone instead of waiting forever
    assert res[1][0] == "err" and res[1][1][0] in ("PeerDeadError", "CommTimeoutError"), res[1]


def _dies(rt):
    rt.alloc(4, "float32")  # a collective between the ranks before one dies
    rt.barrier_all()
    if rt.rank == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    try:
        rt.barrier_all()
    finally:
        assert time.monotonic() - t0 < 5  # noticed quickly, well before the 30 s timeout


def test_killed_rank_makes_others_raise():
    res = run_ranks(_dies, 4, timeout=30, deadline=40)
    assert res[2][0] == "dead"
    for r in (0, 1, 3):
        status, (name, msg, _) = res[r]
        assert status == "err" and name == "PeerDeadError", res[r]
        assert "rank 2" in msg


# -- mesh and heap units ----------------------------------------------------------------
def test_mesh_teams():
    m = Mesh(3, 4)
    assert m.world_size == 12 and m.machine_of(7) == 1 and m.local_index(7) == 3
    assert m.machine_team(7).ranks == (4, 5, 6, 7)
    assert m.cross_team(7).ranks == (3, 7, 11)
    assert m.group((3, 2, 2), 0, 5).ranks == (1, 5, 9)
    assert m.group((3, 2, 2), 1, 5).ranks == (5, 7)
    assert m.group((3, 2, 2), 2, 5).ranks == (4, 5)
    t = m.machine_team(5)
    assert t.index(6) == 2 and t.translate(1, m.cross_team(5)) == 1 and t.translate(0, m.cross_team(5)) is None
    assert t.strided(1, 2, 2).ranks == (5, 7)
    with pytest.raises(ValueError, match="gpus_per_machine"):
        Mesh(2, 0)
    with pytest.raises(ValueError, match="rank 12"):
        m.machine_of(12)
    with pytest.raises(ValueError, match="product"):
        m.group((2, 2), 0, 0)
    with pytest.raises(ValueError, match="distinct"):
        Team((1, 1))


def test_symarray_views_and_torch():
    rt = oneside.init(backend="host", heap_size="1MiB", rank=0, world_size=1, job="views" + str(os.getpid()))
    try:
        a = rt.alloc((3, 4, 5), "float32")
        a.local[...] = np.arange(60).reshape(3, 4, 5)
        assert a[1].offset == a.offset + 80 and a[1].shape == (4, 5)
        np.testing.assert_array_equal(a[1, 2:4].local, np.arange(60).reshape(3, 4, 5)[1, 2:4])
        np.testing.assert_array_equal(a.window(7, (2, 3)).local.ravel(), np.arange(7, 13))
        assert a.reshape(12, -1).shape == (12, 5)
        assert a.view("uint8").shape == (3, 4, 20)
        with pytest.raises(IndexError, match="step"):
            a[::2]
        torch = pytest.importorskip("torch")
        t = a.torch()
        t[0, 0, 0] = -1
        assert a.local[0, 0, 0] == -1  # same memory
        b = rt.alloc((2, 8), "bfloat16")
        tb = b.torch()
        assert tb.dtype == torch.bfloat16 and tb.shape == (2, 8)
        tb.fill_(1.5)
        assert (b.torch() == 1.5).all()
        used = rt.heap_used
        rt.free(b)
        assert rt.heap_used < used
    finally:
        oneside.finalize()


def _heap_join(rt):
    from oneside.heap import join

    buf = rt.alloc((3, 1, 8, 2, 4), "float32")
    other = rt.alloc((1, 8, 2, 4), "float32")
    b2 = rt.alloc((2, 8, 2, 4), "float32")
    j = join([buf[0], buf[1], buf[2][:, :5]], axis=1)  # whole, whole, first rows: one window
    out = [j.shape, j.offset == buf[0].offset]
    j.local[...] = np.arange(j.size, dtype=np.float32).reshape(j.shape)
    out.append(bool((buf[1].local == j.local[:, 8:16]).all()))
    out += [join([buf[0][:, :3], buf[1]], axis=1),   # a gap between them
            join([buf[1], buf[0]], axis=1),           # out of order
            join([buf[2], other], axis=1),            # another allocation
            join([b2, b2], axis=1)]                   # batch > 1: not one slab
    for a in (buf, other, b2):
        rt.free(a)
    return out


def test_heap_join_of_back_to_back_windows():
    (shape, same_start, aliased, *rest), = all_ok(run_ranks(_heap_join, 1, heap="1MiB"))
    assert shape == (1, 21, 2, 4) and same_start and aliased
    assert rest == [None, None, None, None]
