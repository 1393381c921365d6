"""sfattn on GPUs: run under ``python -m oneside.launch -n N --machines M --backend nvshmem``.

Every algorithm the mesh allows, bf16, vs a float64 reference (relative error < 1e-2), odd
sequence lengths, both head dims and layouts; bitwise identical results run to run; heap use
unchanged over 1000 calls. Rank 0 prints one line per check; exits non-zero on failure.
GPU_SFATTN_GRAPH=1|0 forces the layers' internal CUDA-graph replay on or off (default: the
layer's own choice); GPU_SFATTN_ONLY="torus/torch ..." runs only these algorithm/local pairs of
the first part (and skips the rest), GPU_SFATTN_ONLY=fp8 only the FP8 part: every algorithm with
``precision="fp8"`` and ``"fp8-accurate"`` (keys with outlier channels) within each contract's
error of float64 attention, one-launch plans (T = R = 1) equal to the emulation of the ranks' quantised shards,
bitwise identical run to run and under the layer's CUDA graph, the p2p push (quantisers writing
into the members' buffers) equal to the put exchange; GPU_SFATTN_ONLY=io only the io-buffer part
(``io_buffers=True``: calls on the io tensors, in place where the plan is Ulysses on one GPU, give
the exchange's bits, eagerly, under the layer's graph and inside the caller's graph).
"""
from __future__ import annotations

import os
import sys

import torch

import oneside
import sfattn
from sfattn.local import fa3_forward
from sfattn.plan import PlanError


def mesh_plans(rt, H, S, D):
    """(algorithm, plan) for every algorithm the mesh allows at these shapes."""
    for algo in sfattn.ALGORITHMS:
        try:
            plan = sfattn.make_plan(rt.mesh, H, S, D, algo)
        except PlanError:
            continue
        yield algo, plan


def reference(q, k, v, scale):
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double())


def fp8_checks(rt, dev, say) -> None:
    from sfattn.kernels.flash_fp8 import fp8_tile
    from sfattn.quant import attention_fp8_emulated, quantize_kv, quantize_q

    for H, S, D, layout, prec in [(24, 1031, 128, "bshd", "fp8"), (6, 517, 64, "bhsd", "fp8"),
                                  (24, 1031, 128, "bshd", "fp8-accurate"), (6, 517, 64, "bhsd", "fp8-accurate")]:
        g = torch.Generator(device=dev).manual_seed(7 * S)
        q, k, v = (torch.randn(2, S, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
        k += 3 * torch.randn(1, 1, H, D, device=dev, dtype=torch.bfloat16, generator=g)  # outlier channels
        for algo, plan in mesh_plans(rt, H, S, D):
            layer = sfattn.SPAttention(rt, plan, 2, "bfloat16", layout=layout, precision=prec)
            ref = reference(q, k, v, layer.scale)
            cuts = [0]
            for n in layer.lens:
                cuts.append(cuts[-1] + n)
            lo, L = cuts[rt.rank], layer.shard_len()
            sh = [x[:, lo:lo + L] for x in (q, k, v)]
            if layout == "bhsd":
                sh = [x.transpose(1, 2) for x in sh]
            outs = [sfattn.attention(*sh, layer) for _ in range(3)]  # eager, captured, replayed
            torch.cuda.synchronize()
            rt.check()
            o = outs[0].transpose(1, 2) if layout == "bhsd" else outs[0]
            assert torch.isfinite(o).all(), (algo, "non-finite FP8 output")
            r = ref[:, lo:lo + L]
            err = ((o.double() - r).norm() / r.norm()).item()
            assert err < (0.06 if prec == "fp8" else 0.025), (algo, prec, H, S, D, err)
            diff = max((outs[0].float() - x.float()).abs().max().item() for x in outs[1:])
            assert diff == 0, (algo, "FP8 layer not bitwise identical run to run", diff)
            via = "put"
            if layer.p2p is not None:  # the quantisers wrote into the members' buffers: as the put exchange
                put = sfattn.SPAttention(rt, plan, 2, "bfloat16", layout=layout, precision=prec, p2p=False)
                o_put = sfattn.attention(*sh, put)
                torch.cuda.synchronize()
                assert torch.equal(o_put, outs[0]), (algo, "FP8 p2p push differs from the put exchange")
                sfattn.release(put)
                put.close()
                via = "p2p (= put)"
            emu = float("nan")
            if plan.T == 1 and plan.R == 1:  # one launch over every rank's block, in rank order
                shards = [[x[:, a:b] for x in (q, k, v)] for a, b in zip(cuts[:-1], cuts[1:])]
                kvs = [quantize_kv(x[1], x[2], pv="16" if layer.pv16 else "e4m3") for x in shards]
                e = attention_fp8_emulated([quantize_q(x[0]) for x in shards], kvs, layer.scale,
                                           tile=fp8_tile(kvs))  # the kernel's tiles for these blocks
                e = torch.from_numpy(e[:, lo:lo + L]).to(dev)
                emu = ((o.double() - e).norm() / e.norm()).item()
                assert emu < 1e-2, (algo, H, S, D, emu)
            say(f"{prec} {algo:>7} T={plan.T} U={plan.U} R={plan.R} H={H} S={S} D={D} {layout} {via}: rel err "
                f"{err:.4f} vs float64, {emu:.1e} vs the emulation, run to run identical")
            sfattn.release(layer)
            layer.close()


def io_checks(rt, dev, say) -> None:
    """Every algorithm with io buffers: the in-place call (or the exchange on the io tensors) equals
    the exchange on copies, bitwise, over calls with fresh inputs and inside a caller's graph."""
    me = rt.rank
    for H, S, D, layout in ((24, 1031, 128, "bshd"), (6, 517, 64, "bhsd")):
        for algo, plan in mesh_plans(rt, H, S, D):
            layer = sfattn.SPAttention(rt, plan, 2, "bfloat16", layout=layout, io_buffers=True)
            io = layer.io
            g = torch.Generator(device=dev).manual_seed(S + me)
            for it in range(4):  # the second call captures the layer's graph, the later ones replay it
                for x in "qkv":
                    io[x].copy_(torch.randn(io[x].shape, device=dev, dtype=torch.bfloat16, generator=g))
                io["o"].fill_(float("nan"))
                got = layer(io["q"], io["k"], io["v"], out=io["o"])
                want = layer(*(io[x].clone() for x in "qkv"))
                torch.cuda.synchronize()
                rt.check()
                assert got is io["o"] and torch.equal(got, want), (algo, it, (got.float() - want.float()).abs().max())
            static = [torch.randn(io[x].shape, device=dev, dtype=torch.bfloat16, generator=g) for x in "qkv"]
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for x, t in zip("qkv", static):
                    io[x].copy_(t)
                layer(io["q"], io["k"], io["v"], out=io["o"])
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # the caller's graph: the inputs' writes, the call, a read of the output
                for x, t in zip("qkv", static):
                    io[x].copy_(t)
                layer(io["q"], io["k"], io["v"], out=io["o"])
                res = io["o"] * 1
            for it in range(3):
                for t in static:
                    t.copy_(torch.randn(t.shape, device=dev, dtype=torch.bfloat16, generator=g))
                graph.replay()
                want = layer(*(t.clone() for t in static))
                torch.cuda.synchronize()
                assert torch.equal(res, want), (algo, "caller's graph", it)
            del graph
            say(f"io buffers {algo:>7} H={H} S={S} D={D} {layout}: "
                f"{'in place' if layer.io_in_place else 'exchange'}, equal to the exchange eagerly, "
                f"under the layer's graph and in the caller's graph")
            sfattn.release(layer)
            layer.close()


def main() -> None:
    rt = oneside.init(heap_size="6GiB", timeout=60)
    me = rt.rank
    dev = torch.device("cuda", rt.backend.device)
    say = (lambda m: print(f"[{rt.mesh.machines}x{rt.mesh.gpus_per_machine}] ok: {m}", flush=True)) \
        if me == 0 else (lambda m: None)
    graph = {"1": True, "0": False}.get(os.environ.get("GPU_SFATTN_GRAPH", ""))
    only = os.environ.get("GPU_SFATTN_ONLY", "").split()
    if only in (["fp8"], ["io"]):
        (fp8_checks if only == ["fp8"] else io_checks)(rt, dev, say)
        oneside.finalize()
        if me == 0:
            print("ALL SFATTN GPU CHECKS PASSED", flush=True)
        return
    cases = [(24, 1031, 128, "bshd"), (6, 517, 64, "bhsd")]
    for H, S, D, layout in cases:
        g = torch.Generator(device=dev).manual_seed(H * S)
        q, k, v = (torch.randn(2, S, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
        locals_ = ("kernel", "torch") + (("fa3",) if fa3_forward() is not None else ())
        for (algo, plan), local in [(ap, lc) for ap in mesh_plans(rt, H, S, D) for lc in locals_]:
            if only and f"{algo}/{local}" not in only:
                continue
            layer = sfattn.SPAttention(rt, plan, 2, "bfloat16", layout=layout, local=local,
                                       cuda_graph=graph)
            ref = reference(q, k, v, layer.scale)
            lo, L = me * layer.Sl, layer.shard_len()
            sh = [x[:, lo:lo + L] for x in (q, k, v)]
            if layout == "bhsd":
                sh = [x.transpose(1, 2) for x in sh]
            o1 = sfattn.attention(*sh, layer)
            o2 = sfattn.attention(*sh, layer)  # with cuda_graph: captured here
            o3 = sfattn.attention(*sh, layer)  # and replayed here
            torch.cuda.synchronize()
            rt.check()  # a failed GPU-side wait (NaN-poisoned output) raises with its reason here
            o = o1.transpose(1, 2) if layout == "bhsd" else o1
            r = ref[:, lo:lo + L]
            err = ((o.double() - r).abs().max() / ref.abs().max()).item()
            err2 = ((o2.transpose(1, 2) if layout == "bhsd" else o2).double() - r).abs().max().item() / \
                ref.abs().max().item()
            for i, oi in enumerate((o1, o2, o3)):
                bad = ~torch.isfinite(oi if layout == "bshd" else oi.transpose(1, 2))
                rows = bad.flatten(2).any(-1).any(0).nonzero().flatten().tolist()
                heads = bad.any(-1).any(0).any(0).nonzero().flatten().tolist()
                assert not rows, (algo, local, f"rank {me}: non-finite output of call {i + 1} in "
                                  f"{int(bad.sum())} elements, rows {rows[:3]}..{rows[-3:]} of {L}, heads {heads}")
            assert err < 1e-2 and err2 < 1e-2, (algo, local, H, S, D, err, err2)
            diff = max((o1.float() - oi.float()).abs().max().item() for oi in (o2, o3))
            if local == "kernel":  # the fused kernel is deterministic; cuDNN and FA3 need not be
                assert diff == 0, (algo, local, "not bitwise identical run to run", diff)
            say(f"{algo:>7} {local:>6} H={H} S={S} D={D} {layout}: rel err {err:.2e}, run-to-run "
                f"max diff {diff:.1e}")
            sfattn.release(layer)
            layer.close()
    if only:
        oneside.finalize()
        return
    # CUDA graphs: capture a layer once, replay it on new inputs (torus with a ring inside too)
    variants = [(a, None) for a in sfattn.ALGORITHMS]
    if rt.mesh.machines > 1 and rt.mesh.gpus_per_machine > 1:
        variants.append(("torus", 1))  # T > 1 and R > 1
    H, S, D = 24, 515, 64
    for algo, ud in variants:
        try:
            plan = sfattn.make_plan(rt.mesh, H, S, D, algo, ulysses_degree=ud)
        except PlanError:
            continue
        layer = sfattn.SPAttention(rt, plan, 1, "bfloat16")
        L = layer.shard_len()
        static = [torch.randn(1, L, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3)]
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            sfattn.attention(*static, layer)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = sfattn.attention(*static, layer)
        for it in range(3):
            fresh = [torch.randn_like(x) for x in static]
            for x, f in zip(static, fresh):
                x.copy_(f)
            graph.replay()
            eager = sfattn.attention(*fresh, layer)
            torch.cuda.synchronize()
            assert torch.equal(out, eager), (algo, ud, it, (out.float() - eager.float()).abs().max().item())
        say(f"CUDA graph of {algo} (T={plan.T} U={plan.U} R={plan.R}): replays equal eager calls")
        del graph
        sfattn.release(layer)
        layer.close()
    # the p2p exchange on inputs and outputs its copy kernel cannot address directly (2-byte
    # offsets): the same bits as on aligned ones, through its contiguous-copy fallback
    plan = sfattn.make_plan(rt.mesh, 24, 515, 128)
    layer = sfattn.SPAttention(rt, plan, 1, "bfloat16")
    if layer.p2p is not None:
        L = layer.shard_len()
        n = L * 24 * 128
        aligned = [torch.randn(1, L, 24, 128, device=dev, dtype=torch.bfloat16) for _ in range(3)]
        odd = []
        for x in aligned:
            flat = torch.empty(n + 1, device=dev, dtype=torch.bfloat16)
            y = flat[1:].view(1, L, 24, 128)
            y.copy_(x)
            odd.append(y)
        want = sfattn.attention(*aligned, layer)
        out = torch.empty(n + 1, device=dev, dtype=torch.bfloat16)[1:].view(1, L, 24, 128)
        got = layer(*odd, out=out)
        torch.cuda.synchronize()
        assert got is out and torch.equal(out, want), "p2p exchange on misaligned tensors"
        say(f"p2p exchange ({plan.algorithm}): misaligned inputs and output give the aligned result")
    sfattn.release(layer)
    layer.close()
    # Ulysses alone (T = R = 1) on the p2p exchange: my own head group stays in the caller's
    # tensors - the receive/result slots the copies used to fill stay as poisoned, the output right
    plan = sfattn.make_plan(rt.mesh, 24, 515, 128, "ulysses")
    layer = sfattn.SPAttention(rt, plan, 1, "bfloat16")
    if layer._own:
        u, L = layer.u, layer.shard_len()
        mine = [layer.RU[x][0, u].torch() for x in "qkv"] + [layer.RO[0, u].torch()]
        full = [torch.randn(1, 515, 24, 128, device=dev, dtype=torch.bfloat16, generator=torch.Generator(
            device=dev).manual_seed(i)) for i in range(3)]
        lo = me * layer.Sl
        ref = reference(*full, layer.scale)[:, lo:lo + L]
        for it in range(3):
            for t in mine:
                t.fill_(float("nan"))
            torch.cuda.synchronize()
            rt.barrier_all()
            got = layer(*(x[:, lo:lo + L] for x in full))
            torch.cuda.synchronize()
            rt.barrier_all()
            assert all(torch.isnan(t.float()).all() for t in mine), "own head group copied or written"
            err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-2, err
        say(f"own head group in place ({plan.algorithm} U={plan.U}): receive/result slots untouched, "
            f"rel err {err:.2e}")
    sfattn.release(layer)
    layer.close()
    fp8_checks(rt, dev, say)
    io_checks(rt, dev, say)
    # 1000 calls leave the heap as it was
    plan = sfattn.make_plan(rt.mesh, 24, 257, 64)
    layer = sfattn.SPAttention(rt, plan, 1, "bfloat16")
    L = layer.shard_len()
    x = torch.randn(1, L, 24, 64, device=dev, dtype=torch.bfloat16)
    used = rt.heap_used
    first = sfattn.attention(x, x, x, layer)
    for _ in range(1000):
        o = sfattn.attention(x, x, x, layer)
    torch.cuda.synchronize()
    assert rt.heap_used == used and torch.equal(o, first)
    say(f"1000 calls of {plan.algorithm}: heap use unchanged ({used} bytes), output unchanged")
    oneside.finalize()
    if me == 0:
        print("ALL SFATTN GPU CHECKS PASSED", flush=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        oneside.finalize(failed=True)
        sys.exit(1)
