"""sfattn as the attention of diffusers' context parallelism (any model with a ``_cp_plan``).

    import torch.distributed as dist
    from diffusers import ContextParallelConfig
    import oneside
    from sfattn.integrations import diffusers as sfd

    rt = oneside.init(heap_size=sfd.heap_size(transformer, tokens=4096 + 512, world=4))
    dist.init_process_group("nccl")             # diffusers' hooks split and gather with it
    transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=4, ulysses_anything=True))
    sfd.enable(transformer, rt)                  # every CP attention call now runs on sfattn
    image = pipe(prompt, height=1040, width=1040).images[0]   # any resolution

diffusers' hooks keep doing what the model's plan says - split the inputs along the sequence
(image and text tokens, RoPE ids; ``tensor_split`` in the "anything" modes, so shards may
differ by a token), gather the outputs. Each attention call the model makes under context
parallelism (``dispatch_attention_fn(..., parallel_config=...)``) runs through
:class:`~sfattn.SPAttention` on those shards instead of diffusers' templated Ulysses/Ring over
NCCL: the planner's algorithm (or ``algorithm=``) over oneside, with ``local=`` as local
attention. Heads need not divide by the ranks (the planner picks what works). diffusers'
``ulysses_degree``/``ring_degree`` only shape its mesh; use an "anything" mode for token
counts that do not divide by the ranks.

Why a call and not an attention backend name: diffusers 0.42.1 keys its backend registry by
the closed enum ``AttentionBackendName``, so a third-party backend cannot be registered without
editing diffusers. :func:`enable` instead routes ``dispatch_attention_fn`` in the modules of the
model's attention processors: calls that carry this model's parallel config go to sfattn,
every other call (other models, cross-attention, no CP) to diffusers unchanged.

Other attention, with one log line per reason: a key mask (``[..., 1, keys]``) or keys of
another length (LTX's text cross-attention, Qwen-Image's padded prompt) - K, V and the mask's
key axis are all-gathered and torch SDPA attends this rank's queries (exact); a head dim or
dtype the fused kernel lacks - ``local='torch'`` inside sfattn (exact); a mask with a query
axis, causal attention, dropout, grouped-query heads - diffusers' own CP path (with the
model's backend). The output gathers of the plan run over the symmetric heap (gloo cannot
all-gather uneven shards; NCCL is not needed for them).

Layers are built on first use and cached. Shard lengths differ between ranks and between
calls, so each rank learns the others' once per (input shapes, call index within the forward)
- a plan-time exchange on the first forward at new shapes, none after - instead of on every
call. ``torch.compile``: opaque ops, no per-call constants in the graph, so regional
compilation (``compile_repeated_blocks``) reuses each block's graph at any size; a whole-model
compile needs ``dynamic=False`` (the output gather's length is resolved while tracing).
"""
from __future__ import annotations

import functools
import logging
import struct
import sys
from dataclasses import dataclass
from typing import Any, Mapping

import torch

import oneside

from ..layer import PRECISIONS, SPAttention
from ..plan import make_plan

log = logging.getLogger("sfattn")

_INSTANCES: dict[int, "ContextParallelAttention"] = {}
_PATCHED: dict[str, Any] = {}   # module name -> diffusers' dispatch_attention_fn it held
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
_KERNEL_HEAD_DIMS = (64, 128)
_LOCALS = ("kernel", "torch", "fa3")


def _instance(handle: int) -> "ContextParallelAttention":
    inst = _INSTANCES.get(handle)
    if inst is None:
        raise ValueError(f"sfattn context parallelism: no instance with handle {handle} (disabled?)")
    return inst


@torch.library.custom_op("sfattn::cp_begin", mutates_args=("token",))
def _cp_begin_op(token: torch.Tensor, handle: int, shapes: list[int]) -> None:
    """A forward starts at these input shapes (its attention calls count from 0). Mutates
    ``token``, which every attention op reads: a compiled graph keeps them in order."""
    token.add_(1)
    _instance(handle)._start(tuple(shapes))


@_cp_begin_op.register_fake
def _(token: torch.Tensor, handle: int, shapes: list[int]) -> None:
    return None


@torch.library.custom_op("sfattn::cp_attention", mutates_args=())
def _cp_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token: torch.Tensor, handle: int,
                     scale: float, local: str) -> torch.Tensor:
    inst = _instance(handle)
    return inst._attend(q, k, v, inst._attention_site(q, scale, local))


@_cp_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token: torch.Tensor, handle: int, scale: float,
      local: str) -> torch.Tensor:
    return torch.empty_like(q)


@torch.library.custom_op("sfattn::cp_gather", mutates_args=())
def _cp_gather_op(x: torch.Tensor, handle: int, site: int, dim: int, total: int) -> torch.Tensor:
    return _instance(handle)._gather(x, _instance(handle)._sites[site])


@_cp_gather_op.register_fake
def _(x: torch.Tensor, handle: int, site: int, dim: int, total: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = total
    return x.new_empty(shape)


_SHAPE_IDS: dict[tuple, int] = {}


@torch.compiler.assume_constant_result
def _shapes_id(shapes: tuple) -> int:
    """A small int per distinct input-shape signature (evaluated while tracing under compile)."""
    return _SHAPE_IDS.setdefault(shapes, len(_SHAPE_IDS) + 1)


@torch.compiler.assume_constant_result
def _gather_site(handle: int, shapes: int, call: int, dims: tuple, dtype: str, dim: int) -> int:
    """The site (buffers, every rank's length) of gather ``call`` of a forward at input shapes
    ``shapes``; made on first use with one exchange. Runs eagerly or while torch.compile traces
    (on every rank alike): the gathered length is a constant of the graph."""
    inst = _instance(handle)
    key = (shapes, -1 - call, "gather", dtype, dim)
    sid = inst._site_ids.get(key)
    return sid if sid is not None else inst._site(key, -1 - call, "gather", dims, dtype, (dim,))


@torch.compiler.assume_constant_result
def _gather_total(handle: int, site: int) -> int:
    return sum(_instance(handle)._sites[site].lens)


_SAID: set[str] = set()


@torch.compiler.assume_constant_result
def _say_once(why: str) -> int:
    if why not in _SAID:
        _SAID.add(why)
        log.warning("sfattn: %s", why)
    return 0


def _signature(args: tuple, kwargs: dict) -> list:
    """What decides the attention shapes of a forward, as ints: every tensor argument's sizes, every
    int argument (an argument's index and length first). Sizes may be symbolic under compile."""
    out: list = []

    def add(i: int, x: Any) -> None:
        if isinstance(x, torch.Tensor):
            out.extend((i, x.ndim, *x.shape))
        elif isinstance(x, (bool, int)):
            out.extend((i, -1, int(x)))
        elif isinstance(x, (list, tuple)):
            for y in x:
                add(i, y)
    for i, x in enumerate(args):
        add(i, x)
    for i, name in enumerate(sorted(kwargs)):
        add(len(args) + i, kwargs[name])
    return out


def _kernel_fits(q: torch.Tensor, local: str) -> bool:
    ok = q.dtype in _KERNEL_DTYPES and q.shape[-1] in _KERNEL_HEAD_DIMS
    return ok and (local == "kernel" or q.dtype == torch.bfloat16)


_DTYPES = ("float64", "float32", "bfloat16", "float16", "uint8", "int64")


def _bits(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", abs(float(x))))[0]


@dataclass
class _Attn:
    """An attention site: its layer (shared by every site of the same global shape)."""
    layer: SPAttention | None
    key: tuple


@dataclass
class _Gather:
    """A gather site: every rank's rows along ``dim``, the heap buffer and its pushes."""
    lens: list[int]
    dim: int
    buf: oneside.SymArray
    push: Any


class ContextParallelAttention:
    """Runs the context-parallel attention calls of one diffusers transformer on sfattn, and
    the output gathers of its plan over oneside.

    Made by :func:`enable`; ``close()`` (or :func:`disable`) frees its heap buffers and gives the
    calls back to diffusers. Subclasses may replace :meth:`_attend` (a baseline on the same
    shards, e.g. another sequence-parallel library) and keep the routing and the fallbacks.
    """

    def __init__(self, transformer: torch.nn.Module, rt: oneside.Runtime, algorithm: str | None = None,
                 ulysses_degree: int | None = None, local: str = "kernel", precision: str | None = None):
        if local not in _LOCALS:
            raise ValueError(f"local={local!r}: expected one of {_LOCALS} (see sfattn.SPAttention)")
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: expected None (the model's dtype), 'fp8' or 'fp8-accurate'")
        if precision is not None and local != "kernel":
            raise ValueError(f"precision={precision!r} needs local='kernel' (the FP8 kernel), got local={local!r}")
        pc = getattr(transformer, "_parallel_config", None)
        cp = getattr(pc, "context_parallel_config", None)
        if cp is None:
            raise ValueError("transformer: context parallelism is not enabled; call transformer.enable_parallelism("
                             "config=ContextParallelConfig(...)) first, then sfattn's enable()")
        if getattr(pc, "_sfattn", None) is not None:
            raise ValueError("transformer: sfattn is already enabled on it (disable() first)")
        if cp._world_size != rt.world_size:
            raise ValueError(f"ContextParallelConfig: its mesh has {cp._world_size} ranks, the oneside runtime "
                             f"{rt.world_size}; they must be the same ranks")
        import torch.distributed as dist

        cp_rank = dist.get_rank(cp._flattened_mesh.get_group())
        if cp_rank != rt.rank:
            raise ValueError(f"ranks: diffusers' context-parallel rank {cp_rank} (which shard this process gets) "
                             f"differs from oneside's rank {rt.rank}; start both over the same ranks in the "
                             f"same order")
        self.rt, self.algorithm, self.ulysses_degree, self.local = rt, algorithm, ulysses_degree, local
        self.precision = precision
        self.transformer, self.parallel_config = transformer, pc
        self.handle = id(self)  # a plain int: what the ops carry (a constant to torch.compile)
        self._shapes, self._call = 0, 0     # run time: input shapes id, attention calls so far
        self._signature: list = []          # trace time (or eager): the forward's shapes, its gathers so far
        self._gathers_seen = 0
        self._token = torch.zeros(1, dtype=torch.int64)  # orders cp_begin before the attention ops
        self._site_ids: dict[tuple, int] = {}   # (input shapes id, call, kind, ...) -> site id
        self._sites: dict[int, _Attn | _Gather] = {}
        self._layers: dict[tuple, SPAttention] = {}
        self._gathers = self._gather_hooks(transformer)
        self._hook = transformer.register_forward_pre_hook(self._begin, with_kwargs=True)
        _INSTANCES[self.handle] = self
        pc._sfattn = self
        _route(transformer)
        for hook in self._gathers:  # diffusers' all_gather (gloo cannot gather uneven shards) -> oneside
            hook.fn_ref.post_forward = functools.partial(self._gather_outputs, hook.metadata)

    @staticmethod
    def _gather_hooks(transformer: torch.nn.Module) -> list:
        from diffusers.hooks.context_parallel import ContextParallelGatherHook

        return [h for m in transformer.modules() for h in getattr(getattr(m, "_diffusers_hook", None), "hooks",
                                                                   {}).values()
                if isinstance(h, ContextParallelGatherHook)]

    # -- per forward / per call (traced by torch.compile: attribute updates and constants) -----
    def _begin(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook (before diffusers' split): new input shapes, calls counted from 0."""
        self._signature = _signature(args, kwargs)
        self._gathers_seen = 0
        torch.ops.sfattn.cp_begin(self._token, self.handle, self._signature)

    def _start(self, shapes: tuple) -> None:
        """Inside the cp_begin op, at run time."""
        self._shapes = _SHAPE_IDS.setdefault(shapes, len(_SHAPE_IDS) + 1)
        self._call = 0

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any, dropout_p: float,
                 is_causal: bool, scale: float | None, enable_gqa: bool, attention_kwargs: Any, backend: Any,
                 parallel_config: Any) -> torch.Tensor:
        why = self._unsupported(query, key, value, attn_mask, dropout_p, is_causal, attention_kwargs)
        if why is not None:
            _say_once(f"{why}: this attention runs on diffusers' own context-parallel path")
            return _DISPATCH(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                             attention_kwargs, backend=backend, parallel_config=parallel_config)
        if attn_mask is not None or key.shape[1] != query.shape[1]:
            _say_once(f"{'an attention mask' if attn_mask is not None else 'keys of another length'}: sfattn "
                      f"all-gathers K/V (and the mask's key axis) and runs torch SDPA on its queries (exact)")
            return self._gathered(query, key, value, attn_mask, scale)
        local = self.local
        if self.rt.backend.is_gpu and local != "torch" and not _kernel_fits(query, local):
            _say_once(f"head_dim {query.shape[-1]} / {query.dtype}: the fused kernel takes head dims "
                      f"{_KERNEL_HEAD_DIMS} in bf16/fp16 (FA3: bf16); these layers use local='torch' (exact"
                      f"{', not FP8' if self.precision else ''})")
            local = "torch"
        return torch.ops.sfattn.cp_attention(query, key, value, self._token, self.handle,
                                             0.0 if scale is None else float(scale), local)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """All-gather this rank's shard ``x`` along ``dim`` (collective; shards may differ in length
        along ``dim``), in rank order, through the symmetric heap. One opaque op."""
        dim = dim % x.ndim
        # the output's length along dim must be known while tracing: the site is resolved then
        # (static sizes: compile a whole model with dynamic=False; gathers outside compiled
        # regions, as with compile_repeated_blocks, take any sizes)
        call = self._gathers_seen
        self._gathers_seen = call + 1
        site = _gather_site(self.handle, _shapes_id(tuple(int(d) for d in self._signature)), call,
                            tuple(int(d) for d in x.shape), str(x.dtype).replace("torch.", ""), dim)
        return torch.ops.sfattn.cp_gather(x.contiguous(), self.handle, site, dim, _gather_total(self.handle, site))

    def _gathered(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any,
                  scale: float | None) -> torch.Tensor:
        """Exact attention of this rank's queries against every rank's keys: K, V and the mask's
        key axis all-gathered (the order of keys does not matter without a causal mask)."""
        n = k.shape[1]
        k, v = self.gather(k, 1), self.gather(v, 1)
        if mask is not None and mask.shape[-1] == n:
            is_bool = mask.dtype == torch.bool
            mask = self.gather(mask.to(torch.uint8) if is_bool else mask, mask.ndim - 1)
            mask = mask.bool() if is_bool else mask
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                               attn_mask=mask, scale=scale)
        return out.transpose(1, 2)

    def _gather_outputs(self, metadata: list, module: torch.nn.Module, output: Any) -> Any:
        """diffusers' ContextParallelGatherHook.post_forward, gathering over oneside (any sizes)."""
        single = isinstance(output, torch.Tensor)
        outs = [output] if single else list(output)
        if len(outs) != len(metadata):
            raise ValueError(f"context-parallel gather: {len(outs)} outputs, the plan gathers {len(metadata)}")
        for i, cpm in enumerate(metadata):
            if cpm is None:
                continue
            x = outs[i]
            outs[i] = self.gather(x, cpm.gather_dim)
        return outs[0] if single else tuple(outs)

    @staticmethod
    def _unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any, dropout_p: float,
                     is_causal: bool, attention_kwargs: Any) -> str | None:
        if attn_mask is not None and attn_mask.ndim >= 2 and attn_mask.shape[-2] > 1:
            return f"an attention mask with a query axis ({tuple(attn_mask.shape)})"
        if is_causal:
            return "causal attention"
        if dropout_p:
            return f"dropout_p={dropout_p}"
        if attention_kwargs:
            return f"backend-specific attention_kwargs {sorted(attention_kwargs)}"
        if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or (k.shape[0], *k.shape[2:]) != (q.shape[0], *q.shape[2:]):
            return (f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (sfattn takes shards [batch, tokens, "
                    f"heads, head_dim] with as many key as query heads)")
        return None

    # -- plan time: first use of a site ----------------------------------------------------------
    def _attention_site(self, q: torch.Tensor, scale: float, local: str) -> "_Attn":
        """At run time, inside the attention op: this call's site (made on first use)."""
        call = self._call
        self._call = call + 1
        dtype = str(q.dtype).replace("torch.", "")
        key = (self._shapes, call, "attention", q.shape[0], *q.shape[2:], dtype, scale, local)
        sid = self._site_ids.get(key)
        if sid is None:
            sid = self._site(key, call, "attention", tuple(q.shape), dtype, (scale, local))
        return self._sites[sid]

    def _site(self, key: tuple, call: int, kind: str, dims: tuple, dtype: str, extra: tuple) -> int:
        """A new site for ``key`` (its first item the input-shapes id): every rank's length along
        the sequence in one exchange, then the layer (shared by equal global shapes) or buffers."""
        shapes = key[0]
        if dtype not in _DTYPES:
            raise TypeError(f"{kind}: dtype {dtype} not supported (expected one of {_DTYPES})")
        seq = 1 if kind == "attention" else extra[0]
        other = [d for i, d in enumerate(dims) if i != seq]
        mine = [abs(call), len(dims), *other, _DTYPES.index(dtype),
                *((_bits(extra[0]), _LOCALS.index(extra[1])) if kind == "attention" else ())]
        table = self.rt.exchange(f"sfattn context-parallel {kind}", [dims[seq], *mine])
        for p, row in enumerate(table):
            if list(row[1:]) != mine:
                raise oneside.CollectiveMismatchError(
                    f"sfattn context-parallel {kind} (call {call} of the forward): rank {p} has shape/dtype fields "
                    f"{list(row[1:])}, rank {self.rt.rank} {mine} (call, ndim, sizes but the sequence, dtype, ...); "
                    f"every rank must run the same model on the same input shapes")
        lens = [int(n) for n in table[:, 0]]
        if kind == "attention":
            B, _, H, D = dims
            lkey = (tuple(lens), B, H, D, dtype, extra[0], extra[1])  # layers are shared by equal global shapes
            layer = self._layers.get(lkey)
            if layer is None:
                layer = self._make_layer(lkey, shapes)
                if layer is not None:
                    self._layers[lkey] = layer
            site: _Attn | _Gather = _Attn(layer, lkey)
        else:
            site = self._make_gather(lens, extra[0], dims, dtype, shapes)
        sid = len(self._sites) + 1
        while sid in self._sites:
            sid += 1
        self._sites[sid] = site
        self._site_ids[key] = sid
        return sid

    def _make_layer(self, key: tuple, shapes: int) -> SPAttention | None:
        """The layer of a new global shape (subclasses that bring their own attention: None)."""
        lens, B, H, D, dtype, scale, local = key
        plan = make_plan(self.rt.mesh, H, sum(lens), D, self.algorithm, self.ulysses_degree)

        def build() -> SPAttention:
            return SPAttention(self.rt, plan, B, dtype, scale=scale or None, local=local, lens=lens,
                               precision=self.precision if local == "kernel" else None)
        try:
            return build()
        except oneside.HeapExhaustedError:
            if not self._evict(shapes):
                raise
            try:
                return build()
            except oneside.HeapExhaustedError as e:
                need = SPAttention.heap_bytes(plan, B, dtype, lens)
                raise oneside.HeapExhaustedError(
                    f"sfattn: the symmetric heap cannot hold this forward's attention layers ({need} bytes for "
                    f"{sum(lens)} tokens x {H} heads x {D}); size oneside.init(heap_size=...) with "
                    f"sfattn.integrations.diffusers.heap_size(transformer, tokens=..., world=...)") from e

    def _evict(self, shapes: int) -> bool:
        """Free the layers and gather buffers no site of the current input shapes uses (those of an
        earlier resolution); the same on every rank. Whether anything was freed."""
        keep = {sid for k, sid in self._site_ids.items() if k[0] == shapes}
        used = {id(self._sites[sid]) for sid in keep} | {id(self._sites[sid].layer) for sid in keep
                                                            if isinstance(self._sites[sid], _Attn)}
        freed = False
        for k in [k for k, layer in self._layers.items() if id(layer) not in used]:
            self._layers.pop(k).close()
            freed = True
        for sid in [sid for sid in self._sites if sid not in keep]:
            site = self._sites.pop(sid)
            if isinstance(site, _Gather):
                self.rt.free(site.buf)
                freed = True
        self._site_ids = {k: sid for k, sid in self._site_ids.items() if sid in keep}
        return freed

    def _make_gather(self, lens: list[int], dim: int, dims: tuple, dtype: str, shapes: int) -> _Gather:
        shape = list(dims)
        shape[dim] = max(lens)
        try:
            buf = self.rt.alloc((self.rt.world_size, *shape), dtype)
        except oneside.HeapExhaustedError:
            if not self._evict(shapes):
                raise
            buf = self.rt.alloc((self.rt.world_size, *shape), dtype)
        me = self.rt.rank
        push = self.rt.batch("put", [(buf[me], p, buf[me]) for p in range(self.rt.world_size) if p != me])
        return _Gather(lens, dim, buf, push)

    # -- per call, inside the ops --------------------------------------------------------------------
    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: _Attn) -> torch.Tensor:
        """Sequence-parallel attention of this rank's ``[B, L, H, D]`` shards."""
        return site.layer(q, k, v)

    def _gather(self, x: torch.Tensor, site: _Gather) -> torch.Tensor:
        """All-gather along ``site.dim`` through the symmetric heap: every rank gets the whole."""
        rt, me, dim = self.rt, self.rt.rank, site.dim
        parts = site.buf.torch()
        rt.barrier_all()  # nobody still reads this buffer from the previous gather
        parts[me].narrow(dim, 0, site.lens[me]).copy_(x)
        if rt.world_size > 1:
            site.push.issue()
        rt.barrier_all()
        return torch.cat([parts[p].narrow(dim, 0, n) for p, n in enumerate(site.lens)], dim=dim)

    def plans(self) -> list[str]:
        """One line per layer built so far: tokens, shard lengths and the plan."""
        return [f"{sum(k[0])} tokens {list(k[0])} x {k[2]}h x {k[3]}: {layer.plan.algorithm} "
                f"T={layer.plan.T} U={layer.plan.U} R={layer.plan.R} ({k[6]}{', ' + layer.precision if layer.precision else ''})"
                for k, layer in self._layers.items()]

    def close(self) -> None:
        """Free the heap buffers (collective) and give attention and gathers back to diffusers."""
        if _INSTANCES.pop(self.handle, None) is None:
            return
        self._hook.remove()
        for hook in self._gathers:
            hook.fn_ref.post_forward = hook.post_forward
        if getattr(self.parallel_config, "_sfattn", None) is self:
            self.parallel_config._sfattn = None
        for layer in self._layers.values():
            layer.close()
        for site in self._sites.values():
            if isinstance(site, _Gather):
                self.rt.free(site.buf)
        self._layers.clear()
        self._sites.clear()
        self._site_ids.clear()
        if not _INSTANCES:
            _unroute()


# -- routing diffusers' dispatch_attention_fn ---------------------------------------------------
def _diffusers_dispatch() -> Any:
    from diffusers.models import attention_dispatch

    return attention_dispatch.dispatch_attention_fn


_DISPATCH: Any = None  # diffusers' own dispatch_attention_fn, once routed


def _dispatch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
              attention_kwargs: dict[str, Any] | None = None, *, backend: Any = None,
              parallel_config: Any = None) -> torch.Tensor:
    """diffusers' ``dispatch_attention_fn`` with calls under an sfattn-enabled parallel config
    taken by sfattn."""
    inst = getattr(parallel_config, "_sfattn", None) if parallel_config is not None else None
    if inst is None:
        return _DISPATCH(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, attention_kwargs,
                         backend=backend, parallel_config=parallel_config)
    return inst(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, attention_kwargs, backend,
                parallel_config)


def _route(transformer: torch.nn.Module) -> None:
    """Point the processors' modules at :func:`_dispatch` (diffusers' modules import the function
    by name, so the name in each module is what their processors call)."""
    global _DISPATCH
    original = _DISPATCH = _diffusers_dispatch()
    modules = {type(p).__module__ for p in transformer.attn_processors.values()}
    routed = False
    for name in modules:
        mod = sys.modules.get(name)
        held = getattr(mod, "dispatch_attention_fn", None)
        if held is _dispatch:
            routed = True
        elif held is original:
            _PATCHED[name] = held
            mod.dispatch_attention_fn = _dispatch
            routed = True
    if not routed:
        raise ValueError(f"transformer: none of its attention processors ({sorted(modules)}) calls diffusers' "
                         f"dispatch_attention_fn, so context-parallel attention cannot be routed to sfattn")


def _unroute() -> None:
    for name, fn in _PATCHED.items():
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "dispatch_attention_fn", None) is _dispatch:
            mod.dispatch_attention_fn = fn
    _PATCHED.clear()


# -- the public calls ------------------------------------------------------------------------------
def enable(transformer: torch.nn.Module, rt: oneside.Runtime, *, algorithm: str | None = None,
           ulysses_degree: int | None = None, local: str = "kernel",
           precision: str | None = None) -> ContextParallelAttention:
    """Run ``transformer``'s context-parallel attention on sfattn (after ``enable_parallelism``).

    ``algorithm`` / ``ulysses_degree``: force the plan (default: the planner's choice per shape);
    ``local``: ``'kernel'`` (the fused kernel), ``'torch'`` or ``'fa3'``; ``precision='fp8'``
    or ``'fp8-accurate'``: the layers quantise Q/K (and V with ``'fp8'``) and attend with the FP8
    kernel (``SPAttention``'s ``precision``; layers the kernel cannot take stay exact). Returns the
    instance (``.plans()``
    lists the layers built); undo with :func:`disable`.
    """
    return ContextParallelAttention(transformer, rt, algorithm, ulysses_degree, local, precision)


def disable(transformer: torch.nn.Module) -> None:
    """Free sfattn's layers of ``transformer`` (collective); its attention goes back to diffusers."""
    inst = getattr(getattr(transformer, "_parallel_config", None), "_sfattn", None)
    if inst is not None:
        inst.close()


_WARNED: set = set()


def _warning_once(self: logging.Logger, msg: str, *args: Any, **kwargs: Any) -> None:
    if (self.name, msg) not in _WARNED:
        _WARNED.add((self.name, msg))
        self.warning(msg, *args, **kwargs)


def diffusers_workarounds() -> None:
    """Two diffusers 0.42.1 context-parallel bugs met outside its pipelines (tests, examples):

    * its mesh setup takes ``rank % torch.accelerator.device_count()``: a division by zero on a
      machine without GPUs (count 1 there);
    * its hooks warn through ``logger.warning_once``, which exists only once ``transformers`` is
      imported (pipelines import it; Wan's plan hits it with a 1-D timestep): added as a
      warn-once, and told to torch.compile as a logging call (else a fullgraph break).
    """
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1
    if not hasattr(logging.Logger, "warning_once"):
        logging.Logger.warning_once = _warning_once
    torch._dynamo.config.ignore_logging_functions.add(logging.Logger.warning_once)


def heap_size(transformer: torch.nn.Module | Mapping[str, Any], tokens: int, world: int, batch: int = 1,
              dtype: Any = None, shapes: int = 1) -> int:
    """Symmetric-heap bytes per rank for sfattn's layers of ``transformer`` (pass to ``oneside.init``).

    ``transformer``: the model or its config; ``tokens``: the longest attention sequence of a
    forward (image/video + text tokens); ``world``: the ranks; ``dtype``: default the model's;
    ``shapes``: distinct attention shapes alive at once (e.g. 2 to switch resolution without a
    rebuild). Heads and head dim come from the config.
    """
    cfg = transformer if isinstance(transformer, Mapping) else getattr(transformer, "config", {})
    heads, hd = cfg.get("num_attention_heads"), cfg.get("attention_head_dim")
    if not (isinstance(heads, int) and isinstance(hd, int)):
        raise ValueError("transformer: its config has no num_attention_heads / attention_head_dim; size the heap "
                         "with sfattn.SPAttention.heap_bytes(plan, batch, dtype)")
    if dtype is None:
        if isinstance(transformer, Mapping):
            raise ValueError("dtype: required when a config is passed")
        dtype = next(transformer.parameters()).dtype
    from oneside import Mesh

    # the largest layer any plan makes: a ring over every rank holds every peer's K/V
    ring = make_plan(Mesh(1, world), heads, tokens, hd, "ring")
    per_layer = SPAttention.heap_bytes(ring, batch, str(dtype).replace("torch.", ""))
    return shapes * per_layer + (16 << 20)  # + the output gathers and the runtime's reserved area
