"""sfattn algorithms on the host backend: every algorithm on every mesh vs a float64 reference."""
from __future__ import annotations

import numpy as np
import pytest

from oneside import Mesh
from ranks import all_ok, run_ranks
from sfattn.layer import SPAttention
from sfattn.plan import ALGORITHMS, PlanError, make_plan
from sfattn.reference import attention_ref

MESHES = [(1, 2), (2, 1), (1, 4), (2, 2), (4, 1), (2, 4), (3, 2)]


def _inputs(seed: int, B: int, S: int, H: int, D: int):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((B, S, H, D)) for _ in range(3)]


def _all_algorithms(rt, H: int, S: int, B: int, D: int, layout: str, local: str = "kernel", lens=None):
    """Run every plan the mesh allows, twice each (buffers reused), on fresh inputs; ``lens``:
    rows per rank (default: SPAttention's ceil split)."""
    errs = {}
    for algo in ALGORITHMS:
        try:
            plan = make_plan(rt.mesh, H, S, D, algo)
        except PlanError:
            continue
        layer = SPAttention(rt, plan, B, "float64", layout=layout, local=local, lens=lens)
        used = rt.heap_used
        worst = 0.0
        for it in range(2):
            q, k, v = _inputs(100 * it + len(errs), B, S, H, D)
            ref, _ = attention_ref(q, k, v, layer.scale)
            lo, L = sum(layer.lens[:rt.rank]), layer.shard_len()
            shard = [x[:, lo:lo + L] for x in (q, k, v)]
            if layout == "bhsd":
                shard = [np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in shard]
            if local == "torch":
                import torch

                shard = [torch.from_numpy(np.ascontiguousarray(x)) for x in shard]
            o = layer(*shard)
            if local == "torch":
                o = o.numpy()
            if layout == "bhsd":
                o = o.transpose(0, 2, 1, 3)
            assert o.shape == (B, L, H, D)
            assert np.isfinite(o).all()
            r = ref[:, lo:lo + L]
            worst = max(worst, float(np.abs(o - r).max() / np.abs(ref).max()) if L else 0.0)
        assert rt.heap_used == used  # a call allocates nothing
        layer.close()
        errs[algo] = worst
    return errs


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_every_algorithm_matches_float64_reference(mesh):
    W = mesh[0] * mesh[1]
    res = all_ok(run_ranks(_all_algorithms, W, machines=mesh[0], heap="24MiB", deadline=120,
                           H=24, S=37, B=2, D=8, layout="bshd"))
    algos = set(res[0])
    expected = {a for a in ALGORITHMS if _allowed(mesh, 24, a)}
    assert algos == expected, (algos, expected)
    for r in res:
        for algo, err in r.items():
            assert err < 1e-6, (mesh, algo, err)


@pytest.mark.parametrize("mesh,H,S,layout", [((2, 2), 6, 23, "bhsd"), ((3, 2), 12, 11, "bshd"),
                                             ((2, 4), 40, 9, "bhsd"), ((1, 4), 5, 30, "bshd")])
def test_odd_heads_lengths_and_layouts(mesh, H, S, layout):
    W = mesh[0] * mesh[1]
    res = all_ok(run_ranks(_all_algorithms, W, machines=mesh[0], heap="24MiB", deadline=120,
                           H=H, S=S, B=1, D=4, layout=layout))
    assert set(res[0]) == {a for a in ALGORITHMS if _allowed(mesh, H, a)}
    for r in res:
        for algo, err in r.items():
            assert err < 1e-6, (mesh, H, S, algo, err)


@pytest.mark.parametrize("mesh,H,lens", [((1, 3), 6, [4, 3, 3]),          # torch.tensor_split of 10
                                         ((2, 2), 4, [1, 6, 0, 3]),       # anything, an empty shard
                                         ((3, 1), 3, [5, 5, 4])])
def test_arbitrary_shard_lengths(mesh, H, lens):
    W = mesh[0] * mesh[1]
    res = all_ok(run_ranks(_all_algorithms, W, machines=mesh[0], heap="24MiB", deadline=120,
                           H=H, S=sum(lens), B=1, D=4, layout="bshd", lens=lens))
    assert set(res[0]) == {a for a in ALGORITHMS if _allowed(mesh, H, a)}
    for r in res:
        for algo, err in r.items():
            assert err < 1e-6, (mesh, lens, algo, err)


def _forced_degrees(rt, cases):
    errs = []
    for algo, ud in cases:
        plan = make_plan(rt.mesh, 12, 29, 8, algo, ulysses_degree=ud)
        layer = SPAttention(rt, plan, 1, "float64")
        q, k, v = _inputs(7, 1, 29, 12, 8)
        ref, _ = attention_ref(q, k, v, layer.scale)
        lo, L = rt.rank * layer.Sl, layer.shard_len()
        for _ in range(3):  # signal rounds advance correctly call after call
            o = layer(*(x[:, lo:lo + L] for x in (q, k, v)))
        errs.append((plan.T, plan.U, plan.R, float(np.abs(o - ref[:, lo:lo + L]).max()) if L else 0.0))
        layer.close()
    return errs


def test_torus_with_ring_inside_and_forced_degrees():
    cases = [("torus", 1), ("torus", 2), ("usp", 1), ("tas", 2)]
    res = all_ok(run_ranks(_forced_degrees, 8, machines=2, heap="24MiB", deadline=120, cases=cases))
    assert [c[:3] for c in res[0]] == [(2, 1, 4), (2, 2, 2), (1, 1, 8), (1, 2, 4)]
    for r in res:
        for *_, err in r:
            assert err < 1e-12


@pytest.mark.parametrize("mesh", [(2, 2), (1, 3)], ids=lambda m: f"{m[0]}x{m[1]}")
def test_torch_local_kernel_matches_reference(mesh):
    pytest.importorskip("torch")
    W = mesh[0] * mesh[1]
    res = all_ok(run_ranks(_all_algorithms, W, machines=mesh[0], heap="24MiB", deadline=120,
                           H=12, S=31, B=1, D=8, layout="bshd", local="torch"))
    assert set(res[0]) == {a for a in ALGORITHMS if _allowed(mesh, 12, a)}
    for r in res:
        for algo, err in r.items():
            assert err < 1e-6, (mesh, algo, err)


def _bf16_layers(rt):
    """bfloat16 layers on the host backend (heap holds bf16 bits): error vs float64 per local kernel."""
    import torch

    q, k, v = (torch.from_numpy(x) for x in _inputs(7, 1, 40, 4, 16))
    ref, _ = attention_ref(q.numpy(), k.numpy(), v.numpy(), 16 ** -0.5)
    errs = {}
    for local in ("kernel", "torch"):
        for algo in ("ulysses", "ring"):
            layer = SPAttention(rt, make_plan(rt.mesh, 4, 40, 16, algo), 1, "bfloat16", local=local)
            lo, L = sum(layer.lens[:rt.rank]), layer.shard_len()
            o = layer(*(x[:, lo:lo + L].to(torch.bfloat16) for x in (q, k, v)))
            assert o.dtype == torch.bfloat16
            errs[local, algo] = float(np.abs(o.double().numpy() - ref[:, lo:lo + L]).max() / np.abs(ref).max())
            layer.close()
    return errs


def test_bfloat16_layers_on_the_host_backend():
    pytest.importorskip("torch")
    for errs in all_ok(run_ranks(_bf16_layers, 2, heap="8MiB", deadline=120)):
        assert len(errs) == 4
        for key, err in errs.items():
            assert err < 1e-2, (key, err)  # bf16 rounding of inputs and output; was ~1 (bits read as ints)


def _p2p_vs_put(rt):
    """Every plan, once with the exchange by stores into the members' mapped arenas (sfattn.p2p)
    and once by puts (U = 1: the copies into and out of the own buffers): the same bits; bf16
    torch inputs, BHSD, a given out."""
    import torch

    H, S, D = 8, 19, 8
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, S, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    ref, _ = attention_ref(*(x.to(torch.bfloat16).double().numpy() for x in (q, k, v)), D ** -0.5)
    seen = {}
    for algo in ALGORITHMS:
        try:
            plan = make_plan(rt.mesh, H, S, D, algo)
        except PlanError:
            continue
        # Ulysses inside a machine (or none, U = 1): p2p by default; a team across machines: puts
        inside = all(rt.mesh.same_machine(rt.rank, p) for p in plan.team("u", rt.rank))
        outs = []
        for p2p in (None, False):
            layer = SPAttention(rt, plan, 2, "bfloat16", layout="bhsd", p2p=p2p)
            assert (layer.p2p is not None) == (inside and p2p is None), (algo, p2p)
            lo, L = sum(layer.lens[:rt.rank]), layer.shard_len()
            sh = [x[:, lo:lo + L].to(torch.bfloat16).transpose(1, 2) for x in (q, k, v)]
            out = torch.full((2, H, L, D), float("nan"), dtype=torch.bfloat16)
            for _ in range(2):  # buffers reused
                assert layer(*sh, out=out) is out
            outs.append(out.clone())
            err = float(np.abs(out.transpose(1, 2).double().numpy() - ref[:, lo:lo + L]).max() / np.abs(ref).max())
            assert err < 1e-2, (algo, p2p, err)
            layer.close()
        assert torch.equal(outs[0], outs[1]), algo
        if not inside:
            used = rt.heap_used
            with pytest.raises(ValueError, match="p2p=True"):
                SPAttention(rt, plan, 2, "bfloat16", p2p=True)
            assert rt.heap_used == used
        seen[algo] = inside
    return seen


@pytest.mark.parametrize("mesh", [(1, 4), (2, 2)], ids=lambda m: f"{m[0]}x{m[1]}")
def test_p2p_exchange_equals_the_put_exchange(mesh):
    pytest.importorskip("torch")
    seen = all_ok(run_ranks(_p2p_vs_put, mesh[0] * mesh[1], machines=mesh[0], heap="8MiB", deadline=120))[0]
    assert any(seen.values())  # some plan took the p2p exchange
    if mesh[0] > 1:
        assert not seen["ulysses"]  # Ulysses over all 4 ranks spans the 2 machines: puts


def _allowed(mesh, H, algo) -> bool:
    try:
        make_plan(Mesh(*mesh), H, 64, 8, algo)
        return True
    except PlanError:
        return False


# -- planner ---------------------------------------------------------------------------
def test_planner_paper_cases():
    p = make_plan(Mesh(4, 8), 24, 66_000, 128)           # the default on 4 machines: torus
    assert (p.algorithm, p.T, p.U, p.R) == ("torus", 4, 2, 4)
    p = make_plan(Mesh(3, 8), 24, 66_000, 128, "tas")    # TAS: Ulysses spans machines first
    assert (p.T, p.U, p.R) == (1, 24, 1)
    p = make_plan(Mesh(4, 8), 24, 66_000, 128, "tas")
    assert (p.U, p.R) == (8, 4) and p.team("u", 0).ranks == (0, 4, 8, 12, 16, 20, 24, 28)
    assert p.team("r", 0).ranks == (0, 1, 2, 3)           # ring inside the machine
    p = make_plan(Mesh(4, 8), 24, 66_000, 128, "usp")    # USP: Ulysses inside the machine
    assert (p.U, p.R) == (8, 4) and p.team("u", 9).ranks == tuple(range(8, 16))
    assert p.team("r", 9).ranks == (1, 9, 17, 25)
    p = make_plan(Mesh(3, 8), 24, 66_000, 128, "torus")
    assert (p.T, p.U, p.R) == (3, 8, 1)
    p = make_plan(Mesh(1, 8), 24, 66_000, 128)
    assert p.algorithm == "ulysses" and p.U == 8
    text = make_plan(Mesh(2, 4), 24, 4096, 128, "torus").explain()
    assert "T=2" in text and "torus groups" in text and "MiB" in text


def test_planner_coordinates_cover_the_world():
    for mesh in [(2, 4), (3, 2), (4, 8)]:
        for algo in ALGORITHMS:
            try:
                p = make_plan(Mesh(*mesh), 24, 1000, 64, algo)
            except PlanError:
                continue
            ranks = {p.rank(*p.coords(r)) for r in range(p.world_size)}
            assert ranks == set(range(p.world_size)), (mesh, algo)
            for r in range(p.world_size):
                assert p.coords(p.rank(*p.coords(r))) == p.coords(r)
                for level in "tur":
                    assert r in p.team(level, r)


def test_planner_refusals():
    with pytest.raises(PlanError, match="heads=24 is not divisible"):
        make_plan(Mesh(1, 16), 24, 4096, 128, "ulysses")
    with pytest.raises(PlanError, match="heads=25 not divisible by machines=2"):
        make_plan(Mesh(2, 4), 25, 4096, 128, "torus")
    with pytest.raises(PlanError, match="algorithm="):
        make_plan(Mesh(2, 4), 24, 4096, 128, "zigzag")
    with pytest.raises(PlanError, match="ulysses_degree=3"):
        make_plan(Mesh(2, 4), 24, 4096, 128, "usp", ulysses_degree=3)
    with pytest.raises(PlanError, match="seq_len=3"):
        make_plan(Mesh(2, 4), 24, 3, 128)
    with pytest.raises(PlanError, match="heads=0"):
        make_plan(Mesh(2, 4), 0, 4096, 128)
    assert make_plan(Mesh(2, 4), 25, 4096, 128).algorithm == "usp"  # U=1: a ring in effect


def _heap_bytes(rt):
    out = []
    for algo in ("ulysses", "usp", "torus"):
        plan = make_plan(rt.mesh, 12, 101, 8, algo)
        before = rt.heap_used
        layer = SPAttention(rt, plan, 2, "float32")
        out.append((rt.heap_used - before, SPAttention.heap_bytes(plan, 2, "float32")))
        layer.close()
    return out


def test_heap_bytes_predicts_the_allocation():
    for used, predicted in all_ok(run_ranks(_heap_bytes, 4, machines=2, heap="8MiB"))[0]:
        assert used == predicted


def _bad_inputs(rt):
    plan = make_plan(rt.mesh, 4, 16, 8, "ulysses")
    layer = SPAttention(rt, plan, 1, "float64")
    L = layer.shard_len()
    with pytest.raises(ValueError, match=r"q: expected this rank's shard of shape \(1, 8, 4, 8\)"):
        layer(np.zeros((1, L + 1, 4, 8)), np.zeros((1, L, 4, 8)), np.zeros((1, L, 4, 8)))
    with pytest.raises(TypeError, match="k: expected dtype float64"):
        layer(np.zeros((1, L, 4, 8)), np.zeros((1, L, 4, 8), np.float32), np.zeros((1, L, 4, 8)))
    with pytest.raises(ValueError, match="layout="):
        SPAttention(rt, plan, 1, "float64", layout="sbhd")
    with pytest.raises(ValueError, match="local="):
        SPAttention(rt, plan, 1, "float64", local="cudnn")
    with pytest.raises(ValueError, match=r"lens=\[9, 8\]: they sum to 17, the plan's seq_len is 16"):
        SPAttention(rt, plan, 1, "float64", lens=[9, 8])
    with pytest.raises(ValueError, match=r"lens=\[16\]: expected 2 ints >= 0"):
        SPAttention(rt, plan, 1, "float64", lens=[16])
    with pytest.raises(ValueError, match="local='fa3' needs GPUs"):
        SPAttention(rt, plan, 1, "float64", local="fa3")
    return True


def test_bad_inputs_raise_clear_errors():
    all_ok(run_ranks(_bad_inputs, 2))
