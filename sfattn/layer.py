"""One sequence-parallel attention layer: a :class:`~sfattn.plan.Plan` bound to a runtime.

Per call (design.md section 3, one-sided throughout):

1. pack Q, K, V into the Ulysses send buffer; one ScatterPush of all U x T pieces; BarrierAll;
2. all GatherPulls issued at once on two high-priority communication streams: the Torus's
   (Q chunks first, then K/V chunks) on one, the Ring's (every ring peer's K/V of every
   chunk, one batch per peer, each chunk once the peer signals it holds it) on the other;
3. compute, a flat list of steps built at construction, waiting per chunk and per ring peer:
   Pull Q stages (stationary chunk first, my own K/V before the ring peers'), Pull KV stages
   (each received K/V chunk against all gathered Q); on the last stage the rows of other
   machines first, each pushed to its owner (Push O) while the stationary rows finish;
4. BarrierAll; one ScatterPush of O back (reverse Ulysses); barrier; unpack.

Buffers come from the symmetric heap once, at construction; a call allocates nothing.
Sequences that do not divide by the ranks are padded per rank and the padded keys masked
(each K/V block is attended with its true length).
"""
from __future__ import annotations

import math
import operator
from typing import Any, Sequence


import oneside

from .local import FA3Attention, GpuAttention, HostAttention, PeerBlock, TorchAttention, as_torch
from .p2p import UlyssesP2P, addr_of, addressable
from .plan import Plan
from .reference import AttnState


PRECISIONS = (None, "fp8", "fp8-accurate")


def _swap12(x: Any) -> Any:
    """BHSD <-> BSHD view (numpy, CuPy or torch; no copy)."""
    return x.transpose(1, 2) if hasattr(x, "permute") else x.transpose(0, 2, 1, 3)


def _same_view(x: Any, t: Any) -> bool:
    """Whether ``x`` is the torch tensor ``t`` as a view: same memory, offset, shape and strides
    (empty views included, whose data_ptr is 0)."""
    return (hasattr(x, "untyped_storage") and x.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
            and x.storage_offset() == t.storage_offset() and x.shape == t.shape and x.stride() == t.stride())


class SPAttention:
    """Sequence-parallel attention for fixed shapes: ``layer(q, k, v) -> o`` (local shards).

    ``q, k, v``: this rank's shard ``[batch, L, heads, head_dim]`` (``layout='bshd'``, the
    default; ``'bhsd'``: ``[batch, heads, L, head_dim]``, any strides) where L is
    :meth:`shard_len` of this rank: ranks hold consecutive slices of the sequence, of
    ``lens[rank]`` rows when ``lens`` is given (any split: ``torch.tensor_split``'s, diffusers'
    "anything" modes', ...; they sum to the plan's ``seq_len``), else ``ceil(seq_len / world)``
    rows each, the last ones shorter when it does not divide; numpy arrays on the host backend, CuPy arrays or
    torch tensors on GPUs. Returns the attention output for the same rows. ``local``:
    ``'kernel'`` (the fused multi-block kernel; the numpy reference on the host backend) or
    ``'torch'`` (torch SDPA with log-sum-exp, merged; the same local kernel as torch baselines) or
    ``'fa3'`` (FlashAttention-3 with log-sum-exp, merged; Hopper GPUs, bf16, needs ``fa3_fwd``).
    ``cuda_graph`` (GPUs, ``local='kernel'``): from the second call, replay the call's exchange +
    compute as one CUDA graph (halves the host's issue time); default: for plans inside one
    machine (T == 1), except Ulysses-only plans on the p2p exchange, whose calls run eagerly (below).
    ``p2p``: the Ulysses exchange by loads and stores into the team's mapped heaps
    (:mod:`sfattn.p2p`: no send buffer, no puts; without Ulysses one copy kernel each way into
    and out of this rank's buffers); default: where every rank's Ulysses team is on its machine
    and mapped (the same GPU or NVLink/P2P peers); ``True`` raises where it is not. With
    ``local='kernel'`` and a plan that is Ulysses alone (T = R = 1, bf16/fp16), the kernel reads
    this rank's own head group straight from ``q, k, v`` and writes it straight into the output
    (no copy of it in or out), with a launch prepared per set of caller buffers.
    ``precision``: None (compute in ``dtype``) or ``'fp8'``: each rank quantises its own rows once
    per call, before the exchange (:mod:`sfattn.quant`: Q and smoothed K as int8 with a scale per
    128-row block, V as e4m3 transposed), every transfer moves those bytes and their scales, and
    the FP8 kernel computes (the float64 emulation of that kernel on the host backend); the
    output keeps ``dtype``. With ``p2p`` the quantisers write straight into the members' receive
    buffers. Needs ``local='kernel'``; on GPUs bf16/fp16 layers, head dim 64 or 128, Hopper.
    ``'fp8-accurate'``: Q and K as with ``'fp8'``, V kept in ``dtype`` and P.V computed in 16-bit:
    ~0.014 from exact attention instead of ~0.04, Q and K's bytes halved (V's not); with ``p2p``
    V goes to the members by the bf16 push's copy kernel. docs/fp8.md gives their accuracy.
    ``io_buffers``: also allocate this rank's Q, K, V and output in the symmetric heap, in the
    caller's layout: :attr:`io` holds them (``{'q', 'k', 'v', 'o'}``, torch tensors of this
    rank's shard). A caller that writes its projections into ``io['q'|'k'|'v']`` and calls
    ``layer(io['q'], io['k'], io['v'], out=io['o'])`` on every rank moves no data where the whole
    plan is Ulysses over ranks that share one GPU (T = R = 1, p2p, bf16/fp16): each rank's kernel
    reads its heads of every member's inputs and writes their outputs in place, between two
    barriers (``io_in_place``). Elsewhere the same call takes the p2p/put exchange. ``out=None``
    returns a copy of ``io['o']``; ``io['o']`` itself holds the result until the layer's next call.
    """

    def __init__(self, rt: oneside.Runtime, plan: Plan, batch: int, dtype: Any = "bfloat16",
                 scale: float | None = None, layout: str = "bshd", local: str = "kernel",
                 lens: Sequence[int] | None = None, cuda_graph: bool | None = None,
                 p2p: bool | None = None, precision: str | None = None, io_buffers: bool = False):
        if plan.world_size != rt.world_size:
            raise ValueError(f"plan: made for {plan.world_size} ranks, the runtime has {rt.world_size}")
        if (plan.mesh.machines, plan.mesh.gpus_per_machine) != (rt.mesh.machines, rt.mesh.gpus_per_machine):
            raise ValueError(f"plan: made for mesh {plan.mesh}, the runtime's is {rt.mesh}")
        if batch < 1:
            raise ValueError(f"batch={batch}: expected >= 1")
        if layout not in ("bshd", "bhsd"):
            raise ValueError(f"layout={layout!r}: expected 'bshd' or 'bhsd'")
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: expected None (the layer's dtype), 'fp8' or 'fp8-accurate'")
        self.precision = precision
        self.fp8 = precision in ("fp8", "fp8-accurate")  # Q.K in int8, everything that goes with it
        self.pv16 = precision == "fp8-accurate"        # P.V in 16-bit, V in the layer's dtype
        W, S = rt.world_size, plan.seq_len
        self.lens = self.split(S, W) if lens is None else self._check_lens(lens, S, W)
        self.layout = layout
        self.rt, self.plan, self.batch = rt, plan, batch
        self.dtype = oneside.heap.dtype_name(dtype)
        self.scale = 1.0 / math.sqrt(plan.head_dim) if scale is None else float(scale)
        # every rank must build the same layer: compare before allocating, name what differs
        sig = {"algorithm": plan.algorithm, "seq_len": plan.seq_len, "heads": plan.heads,
               "head_dim": plan.head_dim, "T": plan.T, "U": plan.U, "R": plan.R,
               "order": ",".join(f"{lv}{n}" for lv, n in plan.order), "batch": batch,
               "dtype": self.dtype, "scale": self.scale, "layout": layout, "local": local,
               "precision": precision or self.dtype, "io_buffers": bool(io_buffers),
               "lens": ",".join(map(str, self.lens))}
        rt.agree("SPAttention", sig)
        # call-site tags of the per-call barriers: this layer's identity, advanced per call, so a
        # barrier is never met by another layer's, or by this layer's from another call
        self._tag0 = oneside.runtime.tag(repr(sorted(sig.items())))
        self._calls = 0
        # one rank on a GPU: nothing to exchange, the local kernel reads the caller's tensors and
        # writes the output (no heap round trip); off after the first call the kernel refuses
        self._direct = rt.world_size == 1 and rt.backend.is_gpu
        if self.fp8:
            self._check_fp8(local)
        # GPUs: the exchange + compute part of a call (every transfer, barrier, wait and kernel
        # between pack and unpack: ~20 launches) is captured once, on the second call, and
        # replayed as one graph launch (not while the caller captures a graph itself)
        # (default: plans inside one machine, T == 1; multi-machine plans stay eager until a 2 x 2
        # run with graphs forced on passes - the non-finite output once blamed on graphs was a
        # stale signal round count in oneside, fixed, see docs/perf.md).
        # Only the fused kernel: the torch/FA3 paths allocate temporaries through torch's caching
        # allocator, which would hand their memory out again while the graph still writes it.
        if cuda_graph is None:
            cuda_graph = plan.T == 1
        self._graphable = bool(cuda_graph) and rt.backend.is_gpu and rt.chaos is None and local == "kernel"
        self._graphs: dict = {}  # part (method name) -> its CUDA graph
        self._ext: dict = {}
        self._row_views: dict = {}
        W, S, H, D = rt.world_size, plan.seq_len, plan.heads, plan.head_dim
        T, U, R = plan.T, plan.U, plan.R
        self.Sl = Sl = max(self.lens)  # every shard padded to the longest; padded keys masked
        self.Ht = Ht = H // (U * T)
        me = rt.rank
        self.t, self.u, self.r = t, u, r = plan.coords(me)
        self.Ut, self.Tt, self.Rt = plan.team("u", me), plan.team("t", me), plan.team("r", me)
        if local == "torch":
            self.local = TorchAttention(f"cuda:{rt.backend.device}" if rt.backend.is_gpu else "cpu")
        elif local == "kernel":
            self.local = GpuAttention(rt.backend.device) if rt.backend.is_gpu else HostAttention()
        elif local == "fa3":
            if not rt.backend.is_gpu:
                raise ValueError("local='fa3' needs GPUs (FlashAttention-3 on Hopper); this runtime "
                                 f"uses the {rt.backend.name!r} backend")
            self.local = FA3Attention(f"cuda:{rt.backend.device}", self.dtype)
        else:
            raise ValueError(f"local={local!r}: expected 'kernel' (sfattn's fused kernel; numpy on the host "
                             f"backend), 'torch' (torch SDPA with log-sum-exp, merged) or 'fa3' "
                             f"(FlashAttention-3 with log-sum-exp, merged; Hopper, bf16)")
        # every rank takes the same exchange: p2p only where it is possible on every rank
        able = bool(rt.exchange("SPAttention.p2p", [int(UlyssesP2P.possible(self))])[:, 0].all())
        if p2p and not able:
            raise ValueError("p2p=True: some rank's Ulysses team is not on its machine or not mapped "
                             "into it (or the head dim's rows are not 16-byte multiples)")
        use_p2p = able if p2p is None else bool(p2p)
        B = batch
        piece = (B, Sl, Ht, D)
        self._bufs: list[oneside.SymArray] = []
        # each of Q, K, V travels as one or more parts (FP8: data and its scales), every part
        # with the same leading axes in every buffer; part names: "q", "k", "v" or (FP8) "q", "qs",
        # "k", "ks", "mu", "vt", "vs" ("v" instead of "vt", "vs" for fp8-accurate)
        parts = self._parts(B, Sl, Ht, D, self.dtype, self.fp8, self.pv16)
        self.parts = {x: [n for n, _, _ in parts[x]] for x in "qkv"}
        every = [spec for x in "qkv" for spec in parts[x]]

        def a(shape: tuple, dtype: str = self.dtype) -> oneside.SymArray:
            self._bufs.append(rt.alloc(shape, dtype))
            return self._bufs[-1]

        try:
            # Ulysses send [dest u, torus group g]; after Ulysses [g, source u]
            self.SU = {n: a((U, T, *sh), dt) for n, sh, dt in every}
            self.RU = {n: a((T, U, *sh), dt) for n, sh, dt in every}
            self.TP = {n: a((T, U, *sh), dt) for n, sh, dt in every}  # Q/K/V chunks pulled from torus peers
            self.RP = {n: a((R, T, U, *sh), dt) for n, sh, dt in parts["k"] + parts["v"]}  # ring peers' K/V
            self.TO = a((T, U, *piece))            # outputs of other machines' rows, before Push O
            self.RO = a((T, U, *piece))            # my chunk's outputs, by torus group
            self.FO = a((U, T, *piece))            # after reverse Ulysses: [ulysses group, torus group]
            self.ready = a((T, R), "uint64")       # ring peers' "chunk p pulled" counters
            # the caller's Q, K, V and output in the heap (io_buffers), [B, Sl, H, D] each
            self.IO = {x: a((B, Sl, H, D)) for x in "qkvo"} if io_buffers else {}
        except oneside.HeapExhaustedError:  # every rank fails at the same allocation: give back, symmetric
            self.close()
            raise
        self.ready.local[...] = 0
        for buf in self.IO.values():  # rows past a shard's length are read as Q/K rows: zeros
            buf.local[...] = 0
        if self.fp8:  # scales of blocks past a shard's rows stay 0: padded Q rows read as zeros
            for bufs in (self.SU, self.RU, self.TP, self.RP):
                for buf in bufs.values():
                    buf.local[...] = 0
            rt.sync()
        self.states = [self.local.state(B, U * Sl, Ht, D) for _ in range(T)]
        self.gpu = rt.backend.is_gpu
        if self.gpu:  # two communication streams beside the caller's compute stream
            import cupy

            # highest priority: their small kernels (waits, link holds) get an SM as soon as a
            # block of the attention kernel retires, instead of after the whole kernel
            # (CUDA clamps a priority beyond its range to the highest one)
            self._streams = [cupy.cuda.Stream(non_blocking=True, priority=-1000) for _ in range(2)]
            # a second compute stream: with T > 1, alternate Q chunks' chains run on it, so one
            # chunk's kernel fills the part-empty last wave of the other's (perf/bench_schedule.py)
            self._compute2 = cupy.cuda.Stream(non_blocking=True)
            self._events: dict = {}
        self._build()
        self.p2p = UlyssesP2P(self) if use_p2p else None
        # plans that are Ulysses alone (T = R = 1) on the p2p exchange: my own head group of my rows
        # stays in the caller's tensors (the kernel reads and writes it there), so push and pull
        # move only the other members' pieces; per call, where the kernel can address them. Such
        # calls run eagerly (their kernel is prepared per set of caller buffers), and so do the
        # calls that cannot: every rank's barriers then carry the same per-call tags.
        self._own = (use_p2p and T == 1 and R == 1 and U > 1 and not self.fp8
                     and isinstance(self.local, (GpuAttention, HostAttention)))
        self._own_runs: dict = {}
        self._build_io(use_p2p and local == "kernel")
        rt.sync()
        rt.barrier_all()
        rt.sync()

    @staticmethod
    def split(seq_len: int, world: int) -> list[int]:
        """The default shard lengths: ``ceil(seq_len / world)`` rows per rank, the last ones shorter."""
        n = -(-seq_len // world)
        return [max(0, min(n, seq_len - r * n)) for r in range(world)]

    @staticmethod
    def _check_lens(lens: Sequence[int], seq_len: int, world: int) -> list[int]:
        try:
            lens = [operator.index(n) for n in lens]
        except TypeError:
            raise ValueError(f"lens={lens}: expected {world} ints >= 0 (rows per rank)") from None
        if len(lens) != world or any(n < 0 for n in lens):
            raise ValueError(f"lens={lens}: expected {world} ints >= 0 (rows per rank)")
        if sum(lens) != seq_len:
            raise ValueError(f"lens={lens}: they sum to {sum(lens)}, the plan's seq_len is {seq_len}")
        return lens

    @staticmethod
    def heap_bytes(plan: Plan, batch: int, dtype: Any = "bfloat16", lens: Sequence[int] | None = None,
                   precision: str | None = None, io_buffers: bool = False) -> int:
        """Symmetric-heap bytes an SPAttention of these shapes allocates: size ``oneside.init``'s
        ``heap_size`` with it (plus room for anything else on the heap and ~1 MiB reserved)."""
        from oneside.heap import ALIGN, itemsize

        dtype = oneside.heap.dtype_name(dtype)
        rows = max(lens) if lens is not None else -(-plan.seq_len // plan.world_size)
        T, U, R = plan.T, plan.U, plan.R
        Ht = plan.heads // (U * T)
        parts = SPAttention._parts(batch, rows, Ht, plan.head_dim, dtype, precision in ("fp8", "fp8-accurate"),
                                   precision == "fp8-accurate")

        def al(shape: tuple, dt: str) -> int:
            return -(-math.prod(shape) * itemsize(dt) // ALIGN) * ALIGN

        n = sum(3 * al((T, U, *sh), dt) for x in "qkv" for _, sh, dt in parts[x])     # SU, RU, TP
        n += sum(al((R, T, U, *sh), dt) for x in "kv" for _, sh, dt in parts[x])      # RP
        n += 3 * al((T, U, batch, rows, Ht, plan.head_dim), dtype)                    # TO, RO, FO
        n += 4 * al((batch, rows, plan.heads, plan.head_dim), dtype) if io_buffers else 0  # IO q, k, v, o
        return n + ALIGN  # signals

    @staticmethod
    def _parts(B: int, Sl: int, Ht: int, D: int, dtype: str, fp8: bool, pv16: bool = False
               ) -> dict[str, list[tuple]]:
        """``(name, shape, dtype)`` of the parts of one piece of Q, K and V (module docstring of
        :mod:`sfattn.quant` for the FP8 ones: per 128-row block scales, K's mean, V transposed with
        its keys rounded up to 32 - or, ``pv16``, V as it is)."""
        piece = (B, Sl, Ht, D)
        if not fp8:
            return {x: [(x, piece, dtype)] for x in "qkv"}
        nb = -(-Sl // 128)
        v = [("v", piece, dtype)] if pv16 else \
            [("vt", (B, Ht, D, -(-Sl // 32) * 32), "uint8"), ("vs", (B, Ht), "float32")]
        return {"q": [("q", piece, "int8"), ("qs", (B, Ht, nb), "float32")],
                "k": [("k", piece, "int8"), ("ks", (B, Ht, nb), "float32"), ("mu", (B, Ht, D), "float32")],
                "v": v}

    def _check_fp8(self, local: str) -> None:
        pr = repr(self.precision)
        if local != "kernel":
            raise ValueError(f"precision={pr} needs local='kernel' (the FP8 kernel), got local={local!r}")
        if self.rt.backend.is_gpu:
            from .kernels.flash import HEAD_DIMS, _device_cc

            cc = _device_cc(self.rt.backend.device)
            if cc // 10 != 9:
                raise ValueError(f"precision={pr}: the FP8 kernel runs on Hopper GPUs (sm_90), this one is "
                                 f"sm_{cc}")
            if self.dtype not in ("bfloat16", "float16"):
                raise ValueError(f"precision={pr}: the FP8 kernel writes bfloat16 or float16 outputs, the "
                                 f"layer's dtype is {self.dtype!r}")
            if self.plan.head_dim not in HEAD_DIMS:
                raise ValueError(f"precision={pr}: head_dim {self.plan.head_dim} is not supported by the FP8 "
                                 f"kernel (supported: {HEAD_DIMS})")
        elif not self.dtype.startswith(("float", "bfloat")):
            raise ValueError(f"precision={pr} quantises floating-point inputs, the layer's dtype is {self.dtype!r}")

    # -- plan-time preparation ----------------------------------------------------------
    def shard_len(self, rank: int | None = None) -> int:
        return self.lens[self.rt.rank if rank is None else rank]

    def _kv_len(self, p: int, i: int, rr: int) -> int:
        """Valid rows of the K/V block from torus chunk p, ring member rr, ulysses index i."""
        return self.lens[self.plan.rank(p, i, rr)]

    def _build(self) -> None:
        rt, plan = self.rt, self.plan
        T, U, R = plan.T, plan.U, plan.R
        t, u, r = self.t, self.u, self.r
        # 1. Ulysses: piece (j, g) of my send buffer -> member j's RU[g, u]
        P = self.parts
        names, kv_names = P["q"] + P["k"] + P["v"], P["k"] + P["v"]
        if U > 1:
            self.ulysses = rt.batch("put", [(self.SU[n][j, g], self.Ut[j], self.RU[n][g, u])
                                            for n in names for j in range(U) for g in range(T)])
            self.ulysses_back = rt.batch("put", [(self.RO[g, i], self.Ut[i], self.FO[u, g])
                                                 for i in range(U) for g in range(T)])
        # 2. Torus pulls, in schedule order: Q chunks (stages 1..T-1), then K/V chunks
        src = [(t - i) % T for i in range(T)]
        self.q_pulls = [rt.batch("get", [(self.TP[n][p], self.Tt[p], self.RU[n][t]) for n in P["q"]])
                        for p in src[1:]]
        self.kv_pulls = [rt.batch("get", [(self.TP[n][p], self.Tt[p], self.RU[n][t]) for n in kv_names])
                         for p in src[1:]]
        # Ring: each peer's stationary chunk, and its copies of the other chunks (one batch per
        # peer, so compute can start on the first peer's K/V while the others still arrive)
        peers = [(r + j) % R for j in range(1, R)]
        self.ring_peers = peers
        self.ring_pulls = {(p, rr): rt.batch("get", [(self.RP[n][rr, p], self.Rt[rr],
                                                      self.RU[n][t] if p == t else self.TP[n][p])
                                                     for n in kv_names])
                           for p in src for rr in peers}
        # 3. Push O: my finished rows of chunk p -> member p's RO[t]
        self.push_o = {p: rt.batch("put", [(self.TO[p], self.Tt[p], self.RO[t])]) for p in src[1:]}
        # 4. The compute schedule as a flat list of (kind, arg, compute stream) steps:
        #    ("wait", event, s) | ("run", launch, s) | ("push", chunk, s); s = 0: the caller's
        #    stream, 1: the second compute stream. Each Q chunk's chain of calls (one running
        #    state) stays on one stream; with T > 1 every other chunk goes to stream 1.
        L = self.local
        lane = {p: (i % 2 if T > 1 else 0) for i, p in enumerate(src)}

        def block(x: str, bufs: dict, at: tuple, n: int | None = None) -> Any:
            """Tensor x's piece ``bufs[part][at]`` (first n rows): the array, or (FP8) its parts."""
            def get(buf: oneside.SymArray) -> oneside.SymArray:
                for i in at:
                    buf = buf[i]
                return buf
            if self.fp8:
                return {nm: get(bufs[nm]) for nm in P[x]}, n
            return get(bufs[x]) if n is None else (get(bufs[x]), n)

        def q_blocks(p: int):
            bufs = self.RU if p == t else self.TP
            return [block("q", bufs, (t if p == t else p, i)) for i in range(U)]

        def kv_blocks(p: int, rr: int):
            """K/V blocks of chunk p as held by ring member rr, and the event that brings them."""
            if rr == r:
                bufs, at, ev = (self.RU, (t,), None) if p == t else (self.TP, (p,), ("kv", p))
            else:
                bufs, at, ev = self.RP, (rr, p), ("ring", p, rr)
            ns = [self._kv_len(p, i, rr) for i in range(U)]
            return ([block("k", bufs, (*at, i), n) for i, n in enumerate(ns)],
                    [block("v", bufs, (*at, i), n) for i, n in enumerate(ns)], ev)

        def out_blocks(p: int):
            buf = self.RO[t] if p == t else self.TO[p]
            return [buf[i] for i in range(U)]

        steps, waited = [], set()

        def wait(ev, s: int) -> None:
            if ev is not None and (ev, s) not in waited:
                waited.add((ev, s))
                steps.append(("wait", ev, s))

        holders = [r, *peers]  # ring members in compute order: my own K/V first
        # one kernel between the call's two barriers (T = R = 1): it and the last barrier are
        # programmatic dependent launches, as in the io call
        self._dependent = T == 1 and R == 1 and isinstance(L, GpuAttention)
        dep = {"dependent": True} if self._dependent else {}
        for p in src:  # Pull Q stages: chunk p against the stationary chunk t
            wait(("q", p) if p != t else None, lane[p])
            for n_rr, rr in enumerate(holders):
                ks, vs, ev = kv_blocks(t, rr)
                wait(ev, lane[p])
                fin = T == 1 and n_rr == R - 1
                steps.append(("run", L.prepare(q_blocks(p), ks, vs, self.states[p], self.scale, init=n_rr == 0,
                                               finalize=fin, out=out_blocks(p) if fin else None, **dep), lane[p]))
        for j, pk in enumerate(src[1:], start=1):  # Pull KV stages: every Q chunk against chunk pk
            last = j == T - 1
            order = [p for p in src if p != t] + [t] if last else src
            for n_rr, rr in enumerate(holders):
                ks, vs, ev = kv_blocks(pk, rr)
                fin = last and n_rr == R - 1
                for p in order:
                    wait(ev, lane[p])
                    steps.append(("run", L.prepare(q_blocks(p), ks, vs, self.states[p], self.scale, init=False,
                                                   finalize=fin, out=out_blocks(p) if fin else None), lane[p]))
                    if fin and p != t:  # Push O while the remaining rows finish
                        steps.append(("push", p, lane[p]))
        if rt.chaos is not None:  # chaos testing: a delay/fault point before every kernel launch
            steps = [(k, rt.chaos.wrap(a) if k == "run" else a, s) for k, a, s in steps]
        self.steps = steps
        # the SymArray views used per call
        self._send_views = {n: self.SU[n] if U > 1 else self.RU[n] for n in names}
        self._src = src

    def _build_io(self, mapped: bool) -> None:
        """The caller-facing io tensors and, where every rank can, the in-place compute: member
        ``Ut[i]``'s rows of my heads, read from its io inputs and written to its io output."""
        rt, plan = self.rt, self.plan
        self.io: dict = {}
        self._io_bshd: dict = {}
        self._io_run: Any = None
        self.io_in_place = False
        if not self.IO:
            return
        L = self.shard_len()
        for x, buf in self.IO.items():
            t = self._io_bshd[x] = buf.torch()[:, :L]
            self.io[x] = _swap12(t) if self.layout == "bhsd" else t
        # every member on this GPU (the host backend: one memory): over NVLink every Q tile would
        # re-read the peers' K/V; ``mapped``: the p2p exchange's condition held on every rank
        gpu_id = 0
        if self.gpu:
            import cupy

            bus = cupy.cuda.Device(rt.backend.device).pci_bus_id
            gpu_id = int("".join(c for c in bus if c in "0123456789abcdefABCDEF"), 16) & 0x7FFFFFFFFFFF
        able = mapped and plan.T == 1 and plan.R == 1 and plan.U > 1 and not self.fp8
        rows = rt.exchange("SPAttention.io", [int(able), gpu_id])
        self.io_in_place = bool(rows[:, 0].all() and (rows[:, 1] == gpu_id).all())
        if not self.io_in_place:
            return
        Ht, Sl, h0 = self.Ht, self.Sl, self.u * self.Ht
        members = [self.Ut[i] for i in range(plan.U)]
        q, k, v, o = ([PeerBlock(self.IO[x], p, h0, Ht, Sl if x in "qo" else self.lens[p]) for p in members]
                      for x in "qkvo")
        # the kernel and the barrier after it as programmatic dependent launches: each may be
        # scheduled while the grid before it finishes (~1 us per boundary)
        dep = {"dependent": True} if isinstance(self.local, GpuAttention) else {}
        run = self.local.prepare(q, k, v, self.states[0], self.scale, init=True, finalize=True, out=o, **dep)
        self._io_run = rt.chaos.wrap(run) if rt.chaos is not None else run

    def _is_io(self, q: Any, k: Any, v: Any) -> bool:
        """Whether q, k, v (BSHD) are this layer's io inputs themselves."""
        return all(_same_view(x, self._io_bshd[n]) for n, x in (("q", q), ("k", k), ("v", v)))

    # -- per call ------------------------------------------------------------------------
    @staticmethod
    def _view(buf: oneside.SymArray, like: Any) -> Any:
        """The heap buffer as the caller's array type (torch tensor or numpy/CuPy array)."""
        return buf.torch() if hasattr(like, "permute") else buf.local

    def _by_piece(self, x: Any, view: bool = False) -> Any:
        """[B, L, H, D] (any strides) as [U, T, B, L, Ht, D]: head group (j, g) of the plan is
        heads ``(j * T + g) * Ht ...``. ``view``: None where numpy/CuPy would have to copy."""
        U, T, Ht, D = self.plan.U, self.plan.T, self.Ht, self.plan.head_dim
        if hasattr(x, "unflatten"):  # torch: splitting one axis is always a view
            return x.unflatten(2, (U, T, Ht)).permute(2, 3, 0, 1, 4, 5)
        v = x.reshape(x.shape[0], x.shape[1], U, T, Ht, D)
        return None if view and v.base is None else v.transpose(2, 3, 0, 1, 4, 5)

    def _rows(self, buf: oneside.SymArray, like: Any) -> Any:
        """``buf`` as ``[U, T, B, L, Ht, D]``: this rank's rows of each piece, as the caller's array
        type; made once per buffer and type (no view work per call)."""
        key = (id(buf), hasattr(like, "permute"))
        rows = self._row_views.get(key)
        if rows is None:
            plan = self.plan
            rows = self._view(buf, like).reshape(plan.U, plan.T, self.batch, self.Sl, self.Ht, plan.head_dim)
            rows = self._row_views[key] = rows[:, :, :, :self.shard_len()]
        return rows

    def _pack(self, x: Any, buf: oneside.SymArray) -> None:
        """x [B, L, H, D] -> buf [U, T, B, Sl, Ht, D] (or [T, 1, ...] without Ulysses): one
        strided copy per tensor."""
        dst = self._rows(buf, x)
        if hasattr(dst, "copy_"):
            dst.copy_(self._by_piece(x))
        else:
            dst[...] = self._by_piece(x)

    def _pack_fp8(self, q: Any, k: Any, v: Any) -> None:
        """FP8: quantise this rank's rows (:mod:`sfattn.quant`) into the send buffers: on GPUs the CUDA
        quantisers write each destination's head group in place; else torch operations, then one
        strided copy per part."""
        U, T = self.plan.U, self.plan.T
        if self.gpu:
            from .kernels.flash_fp8 import GroupedDst, quantize_grouped

            groups = self._row_views.get("fp8 groups")
            if groups is None:  # one head group per destination, made once (a 16-bit V: the tensor)
                views = {n: self._send_views[n].torch().reshape(U * T, *self._send_views[n].shape[2:])
                         for x in "qkv" for n in self.parts[x]}
                groups = self._row_views["fp8 groups"] = {
                    n: t if n == "v" else GroupedDst.of(t) for n, t in views.items()}
            quantize_grouped(*self._quantizable(q, k, v), groups)
            return
        for name, src in self._fp8_pieces(q, k, v):
            key = ("fp8", name)
            dst = self._row_views.get(key)
            if dst is None:  # the send buffer as [U, T, *part]: made once
                buf = self._send_views[name]
                dst = self._row_views[key] = buf.torch().reshape(U, T, *buf.shape[2:])
            dst[tuple(slice(0, n) for n in src.shape)].copy_(src)

    def _quantizable(self, q: Any, k: Any, v: Any) -> tuple:
        """The caller's arrays as torch tensors the CUDA quantisers take (a contiguous copy where not)."""
        from .kernels.flash_fp8 import cuda_quantizable

        xs = [as_torch(x, self.rt.backend.device) for x in (q, k, v)]
        return tuple(x if cuda_quantizable(x) else x.contiguous() for x in xs)

    def _fp8_pieces(self, q: Any, k: Any, v: Any) -> list[tuple[str, Any]]:
        """Torch quantisation of this rank's rows (CPUs): each part as ``[U, T, ...]`` head groups."""
        import torch

        from .quant import quantize_kv, quantize_q

        U, T, Ht = self.plan.U, self.plan.T, self.Ht
        qt, kt, vt = (as_torch(x, self.rt.backend.device if self.gpu else None) for x in (q, k, v))
        fq, fkv = quantize_q(qt), quantize_kv(kt, vt, pv="16" if self.pv16 else "e4m3")
        vparts = (("v", fkv.v, 2),) if self.pv16 else (("vt", fkv.vt.view(torch.uint8), 1), ("vs", fkv.vscale, 1))
        return [(name, x.unflatten(h, (U, T, Ht)).movedim((h, h + 1), (0, 1)))
                for name, x, h in (("q", fq.data, 2), ("qs", fq.scale, 1), ("k", fkv.k, 2), ("ks", fkv.kscale, 1),
                                   ("mu", fkv.mu, 1), *vparts)]

    def _unpack(self, out: Any) -> None:
        """The reverse: [U, T, B, Sl, Ht, D] (FO after the reverse Ulysses, or RO when there is
        none) -> out [B, L, H, D], one strided copy."""
        U, T, Ht = self.plan.U, self.plan.T, self.Ht
        src = self._rows(self.FO if U > 1 else self.RO, out)
        dst = self._by_piece(out, view=True)
        if dst is None:  # an array numpy/CuPy cannot split without a copy: per head group
            for j in range(U):
                for g in range(T):
                    h0 = (j * T + g) * Ht
                    out[:, :, h0:h0 + Ht] = src[j, g]
        elif hasattr(dst, "copy_"):
            dst.copy_(src)
        else:
            dst[...] = src

    def __call__(self, q: Any, k: Any, v: Any, out: Any = None) -> Any:
        rt, plan = self.rt, self.plan
        expect = (self.batch, self.shard_len(), plan.heads, plan.head_dim)
        if self.layout == "bhsd":
            expect = (expect[0], expect[2], expect[1], expect[3])
        for name, x in (("q", q), ("k", k), ("v", v)):
            if tuple(x.shape) != expect:
                raise ValueError(f"{name}: expected this rank's shard of shape {expect} "
                                 f"({self.layout.upper()}), got {tuple(x.shape)}")
            if str(x.dtype).replace("torch.", "") != self.dtype:
                raise TypeError(f"{name}: expected dtype {self.dtype}, got {x.dtype}")
        if self.layout == "bhsd":
            q, k, v = (_swap12(x) for x in (q, k, v))
        if self._direct:
            o = self._call_direct(q, k, v, out)
            if o is not None:
                return o
        rt.check()  # a failure an earlier call's GPU-side waits recorded: raise it now
        self._calls += 1
        C = rt.backend.stream_handle(None) if self.gpu else None
        if self._io_run is not None and self._is_io(q, k, v):
            return self._call_io(out, C)
        ret = out
        if out is None:
            shape = (self.batch, self.shard_len(), plan.heads, plan.head_dim)
            out = q.new_empty(shape) if hasattr(q, "new_empty") else self.local.xp.empty(shape, dtype=q.dtype)
            ret = _swap12(out) if self.layout == "bhsd" else out
        elif self.layout == "bhsd":
            out = _swap12(out)
        own = self._own_run(q, k, v, out) if self._own else None
        if self.p2p is not None:
            self.p2p.push(q, k, v, C, own=own is not None)
        elif self.fp8:
            self._pack_fp8(q, k, v)
        else:
            for x, a in (("q", q), ("k", k), ("v", v)):
                self._pack(a, self._send_views[x])
        if own is not None:
            self._compute_own(own, C)
        elif self._own:
            self._exchange_compute(C)
        else:
            self._issue(self._exchange_compute, C)
        if self.p2p is not None:
            self.p2p.pull(out, C, own=own is not None)
        else:
            self._unpack(out)
        return ret

    def _own_run(self, q: Any, k: Any, v: Any, out: Any) -> Any:
        """The kernel launch of a call that leaves my own head group in the caller's tensors
        (``self._own``; BSHD views in): my rows of my heads read from q, k, v and written to out
        in place, the other members' rows from my receive buffers into my result buffers as
        usual. None where the kernel cannot address those views (the call then copies them)."""
        h0, Ht = self.u * self.Ht, self.Ht
        views = [x[:, :, h0:h0 + Ht] for x in (q, k, v, out)]
        if not self.gpu:
            return self._prepare_own(views)
        addrs = [addr_of(x) for x in views]
        if not all(addressable(*x) for x in addrs):
            return None
        key = tuple((a, st) for a, st, _ in addrs)
        run = self._own_runs.pop(key, None)  # most recently used last
        if run is None:
            if len(self._own_runs) >= 64:  # callers cycle through a few buffers: drop the oldest
                self._own_runs.pop(next(iter(self._own_runs)))
            try:
                run = self._prepare_own(views)
            except (ValueError, TypeError):  # strides the kernel does not take
                return None
        self._own_runs[key] = run
        return run

    def _prepare_own(self, views: list) -> Any:
        """The call's one kernel over every member's rows of my heads: block ``u`` (mine) is the
        caller's q, k, v, out views, the others my receive and result buffers."""
        qv, kv, vv, ov = views
        u, U = self.u, self.plan.U
        q = [qv if i == u else self.RU["q"][0, i] for i in range(U)]
        k = [kv if i == u else (self.RU["k"][0, i], self._kv_len(0, i, 0)) for i in range(U)]
        v = [vv if i == u else (self.RU["v"][0, i], self._kv_len(0, i, 0)) for i in range(U)]
        o = [ov if i == u else self.RO[0][i] for i in range(U)]
        st, n = self.states[0], (U - 1) * self.Sl + self.shard_len()  # the rows of these Q blocks
        state = AttnState(st.acc[:, :n], st.m[:, :, :n], st.l[:, :, :n])
        dep = {"dependent": True} if self._dependent else {}
        run = self.local.prepare(q, k, v, state, self.scale, init=True, finalize=True, out=o, **dep)
        return self.rt.chaos.wrap(run) if self.rt.chaos is not None else run

    def _compute_own(self, run: Any, C: Any) -> None:
        """A call's compute with my own head group in place: what :meth:`_exchange_compute` issues
        for T = R = 1 on the p2p exchange (the same barriers and tags), with this call's kernel."""
        tag = self._call_tag()
        self.rt.barrier_all(C, tag=tag)  # every member's pieces of its rows in my receive buffer
        run(C)
        self.rt.barrier_all(C, tag=tag + 1, dependent=self._dependent)  # every result complete

    def _call_io(self, out: Any, C: Any) -> Any:
        """A call on the io inputs, in place (see ``io_buffers``): barrier, one kernel, barrier."""
        self._issue(self._compute_io, C)
        o = self.io["o"]
        if out is None:
            return o.clone()
        if not hasattr(out, "data_ptr"):
            out[...] = o.numpy()
        elif not _same_view(out, o):
            out.copy_(o)
        return out

    def _call_tag(self, io: bool = False) -> int:
        """This call's first barrier tag (the next is + 1), the same on every rank: the exchange's
        (also the own-in-place compute's, so ranks on either path pair up) or, with ``io``, the io
        buffers' call's, never an exchange call's."""
        return ((~self._tag0 if io else self._tag0) + 0x9E3779B1 * self._calls) & 0xFFFFFFFF

    def _compute_io(self, C: Any) -> None:
        rt = self.rt
        tag = self._call_tag(io=True)
        rt.barrier_all(C, tag=tag)  # every member's inputs written, its last call's output read
        self._io_run(C)
        # every member's output complete, nobody reads my inputs; NaN output if a wait failed
        rt.barrier_all(C, tag=tag + 1, poison=self.IO["o"], dependent=True)

    def _exchange_compute(self, C: Any) -> None:
        """Everything between pack and unpack, issued on the caller's stream ``C``."""
        rt, plan = self.rt, self.plan
        T, U, R = plan.T, plan.U, plan.R
        tag = self._call_tag()
        # Compute on the caller's stream C; Torus traffic on stream A, Ring traffic on stream B
        # (GPU). On the host backend every call completes in program order, which this order
        # keeps valid: pulls and signals are issued before the waits and computes needing them.
        A, Bs = (self._streams[0].ptr, self._streams[1].ptr) if self.gpu else (None, None)
        if U > 1 and self.p2p is None:
            self.ulysses.issue(C)
        rt.barrier_all(C, tag=tag)
        self._record("start", C)
        if T > 1:
            self._wait(A, "start")
        for p, b in zip(self._src[1:], self.q_pulls):      # Pull Q chunks, then K/V chunks
            b.issue(A)
            self._record(("q", p), A)
        for p, b in zip(self._src[1:], self.kv_pulls):
            b.issue(A)
            self._record(("kv", p), A)
            for rr in self.ring_peers:  # tell ring peers my copy of chunk p is there
                rt.signal_op(self.ready[p, self.r], 1, self.Rt[rr], "add", A)
        if R > 1:
            self._wait(Bs, "start")
            for p in self._src:
                if p != self.t:  # the peers pulled their copy of chunk p from its machine
                    rt.signal_wait_next(self.ready[p], skip=self.r, stream=Bs)
                for rr in self.ring_peers:
                    self.ring_pulls[p, rr].issue(Bs)
                    self._record(("ring", p, rr), Bs)
        Cs = (C, self._compute2.ptr if self.gpu else None)
        if T > 1:  # fork the second compute stream off the caller's
            self._wait(Cs[1], "start")
        for kind, arg, s in self.steps:  # compute, waiting per chunk
            if kind == "run":
                arg(Cs[s])
            elif kind == "wait":
                self._wait(Cs[s], arg)
            else:  # push O of chunk `arg` on the Torus stream once its rows are final
                self._record(("o", arg), Cs[s])
                self._wait(A, ("o", arg))
                self.push_o[arg].issue(A)
        if T > 1:  # join: the second compute stream and the Torus pushes
            self._record("computed2", Cs[1])
            self._wait(C, "computed2")
            self._record("pushed", A)
            self._wait(C, "pushed")
        # results of a call whose waits failed are NaN, never plausible numbers: the last barrier
        # poisons them in its launch
        dep = self._dependent
        if self.p2p is not None:  # the pull reads the members' results (and poisons itself)
            rt.barrier_all(C, tag=tag + 1, dependent=dep)
        elif U > 1:
            rt.barrier_all(C, tag=tag + 1, dependent=dep)
            self.ulysses_back.issue(C)
            rt.barrier(self.Ut, C, tag=tag + 2, poison=self.FO)
        else:
            rt.barrier_all(C, tag=tag + 1, poison=self.RO, dependent=dep)

    def _issue(self, part: Any, C: Any) -> None:
        """``part(C)``: eagerly, or with graphs on from the second call, as its CUDA graph
        (captured once; not while the caller captures a graph itself)."""
        if not (self._graphable and self._calls >= 2) or self._capturing(C):
            return part(C)
        graph = self._graphs.get(part.__name__)
        if graph is None:
            graph = self._graphs[part.__name__] = self._capture(C, part)
        graph.launch(self._ext_stream(C))

    def _capturing(self, C: Any) -> bool:
        import cupy

        return cupy.cuda.runtime.streamIsCapturing(C) != 0

    def _ext_stream(self, C: int) -> Any:
        import cupy

        st = self._ext.get(C)
        if st is None:
            st = self._ext[C] = cupy.cuda.ExternalStream(C, self.rt.backend.device)
        return st

    def _capture(self, C: int, part: Any) -> Any:
        """``part(stream)`` (the exchange + compute) as a CUDA graph (captured, not run; every rank
        captures at the same call). Its barriers' rounds and tags live on the GPU, so replays stay exact."""
        import cupy

        s = cupy.cuda.Stream(non_blocking=True)
        s.begin_capture(getattr(cupy.cuda.runtime, "streamCaptureModeRelaxed", 2))  # NVSHMEM's own threads
        try:
            part(s.ptr)
        finally:
            graph = s.end_capture()
        graph.upload(self._ext_stream(C))
        return graph

    def _call_direct(self, q: Any, k: Any, v: Any, out: Any) -> Any:
        """The whole call at world size 1 on a GPU (BSHD views in); None if the kernel cannot
        read these tensors (the heap path takes over for good)."""
        if out is None:
            o = q.new_empty(q.shape) if hasattr(q, "new_empty") else self.local.xp.empty(q.shape, dtype=q.dtype)
        else:
            o = _swap12(out) if self.layout == "bhsd" else out
        try:
            self.local.direct(q, k, v, o, self.scale, self.rt.backend.stream_handle(None), fp8=self.fp8,
                              pv="16" if self.pv16 else "e4m3")
        except ValueError:
            self._direct = False
            return None
        if out is not None:
            return out
        return _swap12(o) if self.layout == "bhsd" else o

    def _record(self, name: Any, stream: Any) -> None:
        if self.gpu:
            import cupy

            ev = self._events.get(name)
            if ev is None:
                ev = self._events[name] = cupy.cuda.Event(disable_timing=True)
            cupy.cuda.runtime.eventRecord(ev.ptr, stream)

    def _wait(self, stream: Any, name: Any) -> None:
        if self.gpu:
            import cupy

            cupy.cuda.runtime.streamWaitEvent(stream, self._events[name].ptr, 0)

    def close(self) -> None:
        """Return every buffer to the heap (collective)."""
        while self._bufs:
            self.rt.free(self._bufs.pop())
