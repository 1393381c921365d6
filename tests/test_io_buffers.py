"""``SPAttention(io_buffers=True)`` on the host backend: the caller's Q, K, V and output in the heap.

Where the plan is Ulysses alone over mapped ranks (on the host backend every rank is mapped) a
call on the io tensors computes in place: each rank's kernel reads its heads of every member's
inputs and writes their outputs, between two barriers. It must give the same bits as the same
layer's exchange on copies of those tensors, and attention within rounding of a float64
reference, over repeated calls with fresh inputs (the barriers order the reuse), any shard
lengths and both layouts; other plans take the exchange on the io tensors.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ranks import all_ok, run_ranks
from sfattn.layer import SPAttention
from sfattn.plan import ALGORITHMS, PlanError, make_plan
from sfattn.reference import attention_ref


def _io_layers(rt, H: int, S: int, D: int, lens, layout: str, dtype: str):
    res = {}
    tdt = getattr(torch, dtype)
    for algo in ALGORITHMS:
        try:
            plan = make_plan(rt.mesh, H, S, D, algo)
        except PlanError:
            continue
        before = rt.heap_used
        layer = SPAttention(rt, plan, 2, dtype, lens=lens, layout=layout, io_buffers=True)
        used = rt.heap_used
        assert used - before == SPAttention.heap_bytes(plan, 2, dtype, lens=lens, io_buffers=True)
        cuts = np.cumsum([0, *layer.lens])
        lo, L = cuts[rt.rank], layer.shard_len()
        io = layer.io
        err = 0.0
        for it in range(3):
            rng = np.random.default_rng(100 * it + len(res))
            q, k, v = (rng.standard_normal((2, S, H, D)) for _ in range(3))
            ref, _ = attention_ref(*(torch.from_numpy(x).to(tdt).double().numpy() for x in (q, k, v)), layer.scale)
            for name, x in zip("qkv", (q, k, v)):
                mine = torch.from_numpy(x[:, lo:lo + L]).to(tdt)
                io[name].copy_(mine.transpose(1, 2) if layout == "bhsd" else mine)
            io["o"].fill_(float("nan"))  # poison: every row must be written
            got = layer(io["q"], io["k"], io["v"], out=io["o"])
            assert got is io["o"]
            want = layer(*(io[x].clone() for x in "qkv"))  # the exchange path, on copies
            assert torch.equal(got, want), (algo, it, (got.double() - want.double()).abs().max().item())
            fresh = layer(io["q"], io["k"], io["v"])  # out=None: a copy, not the io buffer
            assert fresh.untyped_storage().data_ptr() != io["o"].untyped_storage().data_ptr()
            assert torch.equal(fresh, want)
            o = got.transpose(1, 2) if layout == "bhsd" else got
            if L:
                err = max(err, float(np.abs(o.double().numpy() - ref[:, lo:lo + L]).max() / np.abs(ref).max()))
        assert rt.heap_used == used  # a call allocates nothing on the heap
        res[f"{algo} T={plan.T} U={plan.U} R={plan.R}"] = (layer.io_in_place, err)
        layer.close()
    return res


@pytest.mark.parametrize("mesh,H,S,lens,layout,dtype", [
    ((1, 2), 4, 37, None, "bshd", "float64"),
    ((1, 3), 6, 40, [17, 0, 23], "bhsd", "float64"),
    ((1, 2), 4, 30, None, "bshd", "bfloat16"),
    ((2, 2), 4, 26, None, "bshd", "float64"),
], ids=["1x2", "1x3-uneven-bhsd", "1x2-bf16", "2x2"])
def test_io_buffers_every_algorithm(mesh, H, S, lens, layout, dtype):
    W = mesh[0] * mesh[1]
    res = all_ok(run_ranks(_io_layers, W, machines=mesh[0], heap="8MiB", deadline=120,
                           H=H, S=S, D=8, lens=lens, layout=layout, dtype=dtype))
    tol = 1e-12 if dtype == "float64" else 2e-2
    for r in res:
        for plan, (in_place, err) in r.items():
            assert err < tol, (plan, err)
            # in place exactly where the plan is Ulysses alone inside one machine
            assert in_place == (plan.endswith("T=1 U=%d R=1" % W) and mesh[0] == 1), (plan, in_place)
    assert any(in_place for in_place, _ in res[0].values()) or mesh[0] > 1


def _mixed(rt):
    """Rank 0 calls on its io tensors, rank 1 on copies: a mismatch every rank reports."""
    plan = make_plan(rt.mesh, 4, 20, 8, "ulysses")
    layer = SPAttention(rt, plan, 1, "float64", io_buffers=True)
    io = layer.io
    args = (io["q"], io["k"], io["v"]) if rt.rank == 0 else tuple(io[x].clone() for x in "qkv")
    layer(*args)


def test_io_buffers_all_ranks_or_none():
    res = run_ranks(_mixed, 2, heap="4MiB", timeout=5.0, deadline=60, grace=20)
    for status, value in res:
        assert status == "err" and value[0] in ("CollectiveMismatchError", "PeerDeadError"), res
