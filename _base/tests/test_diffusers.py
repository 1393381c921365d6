"""sfattn under diffusers' own context parallelism, on host-backend ranks with gloo (float64).

Tiny Flux and Wan transformers with token counts that do not divide by the ranks, 2 and 3
ranks: the parallel output equals one process, eager and compiled (fullgraph), across a change
of resolution; forced algorithms; the fallbacks; where diffusers' own CP runs on gloo (equal
shards), ours equals it; errors. Every family of examples/dit_models.py runs through the
example in tests/test_dit_example.py.
"""
from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from ranks import all_ok, free_port, run_ranks  # noqa: E402


def _dist(rt, port: int) -> None:
    import torch.distributed as dist

    from sfattn.integrations.diffusers import diffusers_workarounds

    diffusers_workarounds()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rt.rank, world_size=rt.world_size)


def _tiny_flux(heads: int = 3, blocks: int = 2):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=blocks, num_single_layers=blocks,
                                  attention_head_dim=16, num_attention_heads=heads, joint_attention_dim=32,
                                  pooled_projection_dim=16, guidance_embeds=False,
                                  axes_dims_rope=(4, 6, 6)).to(torch.float64).eval()


def _flux_inputs(h: int, w: int, n_txt: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)),
                                     indexing="ij"), -1).reshape(-1, 3)
    return dict(hidden_states=torch.randn(1, h * w, 8, generator=g, dtype=torch.float64),
                encoder_hidden_states=torch.randn(1, n_txt, 32, generator=g, dtype=torch.float64),
                pooled_projections=torch.randn(1, 16, generator=g, dtype=torch.float64),
                timestep=torch.tensor([0.5], dtype=torch.float64), img_ids=ids.to(torch.float64),
                txt_ids=torch.zeros(n_txt, 3, dtype=torch.float64), return_dict=False)


def _tiny_wan(heads: int = 3, blocks: int = 2):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=16,
                                 in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=blocks,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32).to(torch.float64).eval()


def _wan_inputs(frames: int, h: int, w: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 4, frames, 2 * h, 2 * w, generator=g, dtype=torch.float64),
                timestep=torch.tensor([500]), return_dict=False,
                encoder_hidden_states=torch.randn(1, 7, 16, generator=g, dtype=torch.float64))


def _rel(x, ref) -> float:
    return float((x - ref).abs().max() / ref.abs().max())


def _cp_config(world: int, mode: str):
    from diffusers import ContextParallelConfig

    if mode == "ulysses_anything":
        return ContextParallelConfig(ulysses_degree=world, ulysses_anything=True)
    if mode == "ring_anything":
        return ContextParallelConfig(ring_degree=world, ring_anything=True)
    return ContextParallelConfig(ulysses_degree=world)


def _same_as_one_process(rt, port, family, mode, algorithm, compiled, heads=3, regional=False):
    """Two resolutions, each twice (layers reused), eager or compiled; errors vs one process."""
    from sfattn.integrations import diffusers as sfd

    _dist(rt, port)
    tiny, inputs = (_tiny_flux, _flux_inputs) if family == "flux" else (_tiny_wan, _wan_inputs)

    def make():
        return tiny(heads, 4) if regional else tiny(heads)
    shapes = [(5, 5, 7), (7, 3, 9)] if family == "flux" else [(3, 3, 3), (2, 5, 3)]  # tokens: 25+7, 21+9 / 27, 30
    with torch.no_grad():
        refs = [make()(**inputs(*s))[0] for s in shapes]
        model = make()
        model.enable_parallelism(config=_cp_config(rt.world_size, mode))
        inst = sfd.enable(model, rt, algorithm=algorithm)
        run = model
        if regional:  # diffusers' regional compilation: each block class compiled once, any size
            from torch._dynamo.utils import counters

            torch._dynamo.reset()
            counters.clear()
            model.compile_repeated_blocks(backend="aot_eager", fullgraph=True, dynamic=True)
        elif compiled:
            from torch._dynamo.utils import counters

            torch._dynamo.reset()
            counters.clear()
            # Wan: diffusers' split hook on blocks.0 looks its argument up with inspect.signature,
            # which dynamo cannot trace (a graph break, with or without sfattn): no fullgraph there
            run = torch.compile(model, backend="aot_eager", fullgraph=family == "flux", dynamic=False)
        errs = []
        for s, ref in zip(shapes + shapes, refs + refs):
            out = run(**inputs(*s))[0]
            assert out.shape == ref.shape
            errs.append(_rel(out, ref))
        plans = inst.plans()
        graphs = counters["stats"]["unique_graphs"] if compiled or regional else None
        sfd.disable(model)
    import torch.distributed as dist

    dist.destroy_process_group()
    return errs, plans, graphs


@pytest.mark.parametrize("family,world,algorithm,compiled", [
    ("flux", 2, None, False), ("flux", 3, None, True), ("flux", 2, "ring", True),
    ("wan", 2, None, True), ("wan", 3, "ring", False)])
def test_uneven_tokens_match_one_process(family, world, algorithm, compiled):
    res = all_ok(run_ranks(_same_as_one_process, world, heap="16MiB", deadline=180, timeout=60, port=free_port(),
                           family=family, mode="ulysses_anything", algorithm=algorithm, compiled=compiled))
    for errs, plans, graphs in res:
        assert max(errs) < 1e-12, errs
        assert len(plans) == 2, plans  # one layer per resolution, shared by every block
        assert all(("ring" if algorithm == "ring" else "") in p for p in plans), plans
        if compiled and family == "flux":
            # per resolution: one graph of the forward, one of sfattn's pre-hook (its own frame under
            # torch.compile(module)): no break, no recompilation between calls
            assert graphs == 4, graphs
    # shard lengths as diffusers' tensor_split made them, text and image split separately
    if family == "flux" and world == 2:
        assert "32 tokens [17, 15]" in res[0][1][0], res[0][1]


def test_regional_compilation_any_size():
    res = all_ok(run_ranks(_same_as_one_process, 2, heap="16MiB", deadline=180, timeout=60, port=free_port(),
                           family="flux", mode="ulysses_anything", algorithm=None, compiled=False, regional=True))
    for errs, plans, graphs in res:
        assert max(errs) < 1e-12, errs
        assert graphs <= 4, graphs  # 2 block classes (x static, dynamic): not a graph per block (8 blocks)


def test_torus_on_two_machines_and_ring_anything():
    res = all_ok(run_ranks(_same_as_one_process, 4, machines=2, heap="16MiB", deadline=180, timeout=60,
                           port=free_port(), family="flux", mode="ring_anything", algorithm="torus",
                           compiled=False, heads=4))
    for errs, plans, _ in res:
        assert max(errs) < 1e-12, errs
        assert all("torus" in p for p in plans), plans


def _versus_diffusers(rt, port):
    """Equal shards, plain Ulysses: diffusers' own CP (native backend over gloo) and sfattn."""
    from sfattn.integrations import diffusers as sfd

    _dist(rt, port)
    x = _flux_inputs(4, 4, 8)
    with torch.no_grad():
        ref = _tiny_flux(4)(**x)[0]
        model = _tiny_flux(4)
        model.enable_parallelism(config=_cp_config(rt.world_size, "ulysses"))
        theirs = model(**x)[0]
        sfd.enable(model, rt)
        ours = model(**x)[0]
        sfd.disable(model)
        again = model(**x)[0]  # diffusers' path once more after disable
    import torch.distributed as dist

    dist.destroy_process_group()
    return _rel(ours, ref), _rel(theirs, ref), _rel(ours, theirs), _rel(again, theirs)


def test_equals_diffusers_own_context_parallelism_where_it_runs_on_gloo():
    for ours, theirs, between, again in all_ok(run_ranks(_versus_diffusers, 2, heap="16MiB", deadline=120,
                                                         timeout=60, port=free_port())):
        assert ours < 1e-12 and theirs < 1e-12 and between < 1e-12, (ours, theirs, between)
        assert again == 0.0


def _fallbacks(rt, port):
    """A mask with a query axis goes to diffusers' own path (one log line); a key mask and keys of
    another length are gathered and attended exactly; a float64 layer stays on sfattn."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    from sfattn.integrations import diffusers as sfd

    _dist(rt, port)
    model = _tiny_flux(4)
    model.enable_parallelism(config=_cp_config(rt.world_size, "ulysses"))
    inst = sfd.enable(model, rt)
    pc = model._parallel_config

    def shard(p, n=6):
        g = torch.Generator().manual_seed(p)
        q, k, v = (torch.randn(1, n, 4, 16, generator=g, dtype=torch.float64) for _ in range(3))
        keep = torch.rand(1, 1, 1, n, generator=g) > 0.3
        return q, k, v, keep
    q, k, v, keep = shard(rt.rank)
    _, K, V, KEEP = (torch.cat(x, dim=1 if x[0].ndim == 4 and x[0].shape[1] != 1 else -1)
                     for x in zip(*[shard(p) for p in range(rt.world_size)]))
    exact = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2),
                                                             attn_mask=KEEP).transpose(1, 2)
    short_k, short_v = k[:, :4 + rt.rank], v[:, :4 + rt.rank]  # keys of another length (and uneven)
    SK = torch.cat([shard(p)[1][:, :4 + p] for p in range(rt.world_size)], 1)
    SV = torch.cat([shard(p)[2][:, :4 + p] for p in range(rt.world_size)], 1)
    exact_short = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), SK.transpose(1, 2), SV.transpose(1, 2)).transpose(1, 2)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("sfattn").addHandler(handler)
    try:
        from diffusers.models.transformers import transformer_flux

        routed = transformer_flux.dispatch_attention_fn
        inst._shapes, inst._call = 99, 0
        plain = routed(q, k, v, parallel_config=pc)
        mask = torch.ones(1, 1, 6 * rt.world_size, 6 * rt.world_size, dtype=torch.bool)
        masked = routed(q, k, v, attn_mask=mask, parallel_config=pc)
        masked2 = routed(q, k, v, attn_mask=mask, parallel_config=pc)
        keyed = routed(q, k, v, attn_mask=keep, parallel_config=pc)
        short = routed(q, short_k, short_v, parallel_config=pc)
        theirs = dispatch_attention_fn(q, k, v, parallel_config=pc)  # diffusers' module is never routed
    finally:
        logging.getLogger("sfattn").removeHandler(handler)
    sfd.disable(model)
    restored = transformer_flux.dispatch_attention_fn is dispatch_attention_fn
    import torch.distributed as dist

    dist.destroy_process_group()
    said = [r.getMessage() for r in records]
    return (_rel(plain, theirs), _rel(masked, theirs), bool(torch.equal(masked, masked2)), _rel(keyed, exact),
            _rel(short, exact_short), said, restored)


def test_masks_and_other_key_lengths_fall_back_with_one_log_line():
    for plain, masked, same, keyed, short, said, restored in all_ok(run_ranks(_fallbacks, 2, heap="16MiB",
                                                                              deadline=120, timeout=60,
                                                                              port=free_port())):
        assert plain < 1e-12 and masked < 1e-12 and same
        assert keyed < 1e-12 and short < 1e-12, (keyed, short)
        assert said == [
            "sfattn: an attention mask with a query axis ((1, 1, 12, 12)): this attention runs on diffusers' own "
            "context-parallel path",
            "sfattn: an attention mask: sfattn all-gathers K/V (and the mask's key axis) and runs torch SDPA on "
            "its queries (exact)",
            "sfattn: keys of another length: sfattn all-gathers K/V (and the mask's key axis) and runs torch SDPA "
            "on its queries (exact)"], said
        assert restored


def _heap_pressure(rt, port):
    """A heap for one resolution at a time: switching resolution frees the old layers; a heap too
    small for one forward says how to size it."""
    import oneside
    from sfattn.integrations import diffusers as sfd

    _dist(rt, port)
    model = _tiny_flux(4)
    model.enable_parallelism(config=_cp_config(rt.world_size, "ulysses_anything"))
    inst = sfd.enable(model, rt)
    ballast = rt.alloc((rt.heap_largest_free - 400_000,), "uint8")  # 400 kB left: one resolution's layer
    errs = []
    with torch.no_grad():
        for s in ((5, 5, 7), (9, 9, 7), (5, 5, 7)):
            x = _flux_inputs(*s)
            errs.append(_rel(model(**x)[0], _tiny_flux(4)(**x)[0]))
        layers = len(inst._layers)
        with pytest.raises(oneside.HeapExhaustedError, match=r"size oneside.init\(heap_size=...\) with "
                                                            r"sfattn.integrations.diffusers.heap_size"):
            model(**_flux_inputs(40, 40, 7))
    rt.free(ballast)
    import torch.distributed as dist

    dist.destroy_process_group()
    return errs, layers


def _sites_made_once(rt, port):
    """Forwards after the first at a resolution find every site made: no exchange, no new site
    (each would synchronise the host with the GPU once per attention call, and break graph capture)."""
    from sfattn.integrations import diffusers as sfd

    _dist(rt, port)
    model = _tiny_flux(4)
    model.enable_parallelism(config=_cp_config(rt.world_size, "ulysses_anything"))
    inst = sfd.enable(model, rt)
    exchange, calls = rt.exchange, []

    def counted(*args, **kwargs):
        calls.append(args[0])
        return exchange(*args, **kwargs)
    rt.exchange = counted
    made = []
    with torch.no_grad():
        for s in ((5, 5, 7), (5, 5, 7), (5, 5, 7), (7, 3, 9), (5, 5, 7), (7, 3, 9)):
            n = len(calls)
            model(**_flux_inputs(*s))
            made.append((len(calls) - n, len(inst._sites)))
    sfd.disable(model)
    import torch.distributed as dist

    dist.destroy_process_group()
    return made


def test_sites_are_made_once_per_resolution():
    for made in all_ok(run_ranks(_sites_made_once, 2, heap="16MiB", deadline=120, timeout=60, port=free_port())):
        first, again = made[0], made[1:3]
        assert first[0] > 0 and all(m == (0, first[1]) for m in again), made
        assert made[3][0] > 0 and made[4] == (0, made[3][1]) and made[5] == (0, made[3][1]), made


def test_heap_holds_one_resolution_at_a_time():
    for errs, layers in all_ok(run_ranks(_heap_pressure, 2, heap="4MiB", deadline=120, timeout=60,
                                         port=free_port())):
        assert max(errs) < 1e-12, errs
        assert layers == 1


def _bad_setup(rt, port):
    from sfattn.integrations import diffusers as sfd

    _dist(rt, port)
    model = _tiny_flux()
    with pytest.raises(ValueError, match=r"context parallelism is not enabled; call transformer.enable_parallelism"):
        sfd.enable(model, rt)
    model.enable_parallelism(config=_cp_config(rt.world_size, "ulysses_anything"))
    with pytest.raises(ValueError, match="local='cudnn'"):
        sfd.enable(model, rt, local="cudnn")
    sfd.enable(model, rt)
    with pytest.raises(ValueError, match="already enabled"):
        sfd.enable(model, rt)
    sfd.disable(model)
    sfd.disable(model)  # twice: a no-op
    import torch.distributed as dist

    dist.destroy_process_group()
    return True


def test_bad_setup_raises_clear_errors():
    all_ok(run_ranks(_bad_setup, 2, heap="16MiB", deadline=120, timeout=60, port=free_port()))


def test_heap_size_covers_the_layers():
    from sfattn.integrations.diffusers import heap_size
    from sfattn.layer import SPAttention
    from sfattn.plan import make_plan
    from oneside import Mesh

    cfg = dict(num_attention_heads=24, attention_head_dim=16)
    for world, tokens in ((2, 4225 + 512), (3, 1000), (8, 16896)):
        need = max(SPAttention.heap_bytes(make_plan(Mesh(1, world), 24, tokens, 16, a), 1, "float64",
                                          [len(c) for c in torch.arange(tokens).tensor_split(world)])
                   for a in ("ulysses", "ring", "usp"))
        assert need < heap_size(cfg, tokens, world, dtype=torch.float64) < need + (20 << 20)
    assert heap_size(_tiny_flux(24), 1000, 3) == heap_size(cfg, 1000, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_attention_heads / attention_head_dim"):
        heap_size(torch.nn.Linear(2, 2), 10, 2)
