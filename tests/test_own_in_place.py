"""Ulysses-only plans on the p2p exchange keep each rank's own head group in the caller's tensors.

With T = R = 1 the attention kernel reads my rows of my heads straight from the caller's q, k, v
and writes them straight into the output; push and pull move only the other members' pieces. On
the host backend: the slots of my receive and result buffers that the copies used to fill stay
untouched (poisoned before each call, still poisoned after it, so the kernel cannot have read
them), the output equals the same layer on the put exchange bit for bit and a float64 reference
within rounding, over calls with fresh inputs, uneven shard lengths, both layouts and strided
caller tensors.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ranks import all_ok, run_ranks
from sfattn.layer import SPAttention
from sfattn.plan import make_plan
from sfattn.reference import attention_ref


def _poison(buf, dtype: str) -> None:
    a = buf.local
    a[...] = 0xFFFF if dtype == "bfloat16" else np.nan  # bfloat16 heaps hold bits


def _own_calls(rt, H: int, S: int, D: int, lens, layout: str, dtype: str):
    tdt = getattr(torch, dtype)
    plan = make_plan(rt.mesh, H, S, D, "ulysses")
    layer = SPAttention(rt, plan, 2, dtype, lens=lens, layout=layout)
    put = SPAttention(rt, plan, 2, dtype, lens=lens, layout=layout, p2p=False)
    assert layer._own and not put._own
    u, L = layer.u, layer.shard_len()
    lo = int(np.cumsum([0, *layer.lens])[rt.rank])
    mine = [layer.RU[x][0, u] for x in "qkv"] + [layer.RO[0, u]]
    err = 0.0
    for it in range(3):
        rng = np.random.default_rng(7 * it)  # the same global inputs on every rank
        full = [rng.standard_normal((2, S, H + 2, D)) for _ in range(3)]  # two extra heads: strided
        ref, _ = attention_ref(*(torch.from_numpy(x[:, :, 1:H + 1]).to(tdt).double().numpy() for x in full),
                               layer.scale)
        ins = [torch.from_numpy(x[:, lo:lo + L, 1:H + 1]).to(tdt) for x in full]
        if it == 2:  # non-contiguous caller tensors
            ins = [torch.cat([x, x], dim=2)[:, :, :H] for x in ins]
        if layout == "bhsd":
            ins = [x.transpose(1, 2) for x in ins]
        for buf in mine:
            _poison(buf, dtype)
        rt.barrier_all()  # nobody's previous call still reads them
        got = layer(*ins)
        want = put(*ins)
        rt.barrier_all()
        for buf in mine:  # neither copied into nor read from
            a = buf.local
            assert (a == 0xFFFF).all() if dtype == "bfloat16" else np.isnan(a).all()
        assert torch.equal(got, want), (it, (got.double() - want.double()).abs().max().item())
        o = got.transpose(1, 2) if layout == "bhsd" else got
        if L:
            err = max(err, float(np.abs(o.double().numpy() - ref[:, lo:lo + L]).max() / np.abs(ref).max()))
    layer.close()
    put.close()
    return err


@pytest.mark.parametrize("mesh,H,S,lens,layout,dtype", [
    ((1, 2), 4, 37, None, "bshd", "float64"),
    ((1, 3), 6, 40, [17, 0, 23], "bhsd", "float64"),
    ((1, 2), 4, 30, [16, 14], "bshd", "bfloat16"),
], ids=["1x2", "1x3-uneven-bhsd", "1x2-bf16"])
def test_own_head_group_stays_in_the_callers_tensors(mesh, H, S, lens, layout, dtype):
    W = mesh[0] * mesh[1]
    errs = all_ok(run_ranks(_own_calls, W, machines=mesh[0], heap="8MiB", deadline=120,
                            H=H, S=S, D=8, lens=lens, layout=layout, dtype=dtype))
    tol = 1e-12 if dtype == "float64" else 2e-2
    assert max(errs) < tol, errs


def _mixed_paths(rt, H: int, S: int, D: int):
    """One rank's call cannot leave its own head group in place (on GPUs: a view the kernel cannot
    address) and copies it, the others do not: the barriers still pair up and the output is right."""
    plan = make_plan(rt.mesh, H, S, D, "ulysses")
    layer = SPAttention(rt, plan, 1, "float64")
    if rt.rank == 1:
        layer._own_run = lambda *a: None  # this rank takes the copying path on every call
    lo, L = int(np.cumsum([0, *layer.lens])[rt.rank]), layer.shard_len()
    err = 0.0
    for it in range(3):
        full = [np.random.default_rng(11 * it + i).standard_normal((1, S, H, D)) for i in range(3)]
        ref, _ = attention_ref(*full, layer.scale)
        got = layer(*(torch.from_numpy(x[:, lo:lo + L]) for x in full))
        err = max(err, float(np.abs(got.numpy() - ref[:, lo:lo + L]).max() / np.abs(ref).max()))
    layer.close()
    return err


def test_ranks_on_either_path_pair_up():
    errs = all_ok(run_ranks(_mixed_paths, 3, heap="8MiB", deadline=60, H=6, S=29, D=8))
    assert max(errs) < 1e-12, errs
