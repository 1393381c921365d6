"""The Ulysses exchange by loads and stores into the team's mapped heaps (inside one machine).

When every member of a layer's Ulysses team is on this rank's machine and its heap is mapped
here (the same GPU or NVLink/P2P peers on GPUs; always on the host backend), a call needs neither
the copy into the send buffer nor the put, nor the reverse put and the copy out of the result
buffer:

* ``push``: one kernel reads this rank's Q/K/V head groups where the caller keeps them (any
  strides) and stores each straight into the receive buffer of the member that computes it;
* ``pull``: after the layer's last barrier, one kernel reads this rank's output rows from each
  member's result buffer straight into the caller's output (NaN if a wait of this rank failed).

``own=True`` (plans that are Ulysses alone, T = R = 1; see ``SPAttention``): my own head group of
my rows stays where the caller keeps it - the attention kernel reads it there and writes its
output rows there - so push and pull move only the other members' pieces (the pull still marks
my own piece NaN if a wait failed).

Without Ulysses (U = 1: Ring, or Torus over one GPU per machine) the team is this rank alone:
push and pull are then the copies into and out of its own buffers, one launch each.

``precision="fp8"``: the push is the quantisation itself - the CUDA quantisers write each member's
head group of the int8/e4m3 data and its scales straight into that member's receive buffers
(:func:`sfattn.kernels.flash_fp8.quantize_grouped` with one group per member); the pull is the
same as in bf16 (outputs keep the layer's dtype). ``"fp8-accurate"``: Q and K the same way, the
16-bit V by the bf16 push's copy kernel.

The layer's two barriers order them: a member's receive buffer is rewritten by the next call's
push only after the member's computation passed this call's last barrier, and its result buffer
only after every rank's pull (the next call's first barrier).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from oneside.heap import storage_dtype


def addr_of(x: Any) -> tuple[int, tuple[int, ...], int]:
    """(address, byte strides, itemsize) of a torch tensor or CuPy array."""
    if hasattr(x, "data_ptr"):
        es = x.element_size()
        return x.data_ptr(), tuple(s * es for s in x.stride()), es
    return x.data.ptr, tuple(x.strides), x.itemsize


def addressable(ptr: int, strides: tuple[int, ...], itemsize: int) -> bool:
    """Whether the kernels can address a BSHD array where it is: 16-byte aligned rows and byte
    strides, the head dim contiguous."""
    return ptr % 16 == 0 and strides[3] == itemsize and all(s % 16 == 0 for s in strides[:3])


class UlyssesP2P:
    """Push and pull of one :class:`~sfattn.layer.SPAttention`'s Ulysses pieces (see the module)."""

    def __init__(self, layer: Any):
        rt, plan = layer.rt, layer.plan
        self.layer, self.gpu = layer, rt.backend.is_gpu
        U, T, u = plan.U, plan.T, layer.u
        self.L = layer.shard_len()
        members = [layer.Ut[j] for j in range(U)]
        # (piece (j, g) of the caller's heads) <-> member j's buffer slot [g, u]
        self._slots = [(j, g, members[j]) for j in range(U) for g in range(T)]
        self._own = [j == u and T == 1 for j, g, _ in self._slots]  # my own piece (``own=True``)
        names = [n for x in "qkv" for n in layer.parts[x]]  # Q, K, V (FP8: and their scales)
        self._recv = {n: [layer.RU[n][g, u] for j, g, _ in self._slots] for n in names}
        self._res = [layer.RO[g, u] for j, g, _ in self._slots]
        if self.gpu:
            D, Ht, Sl, B = plan.head_dim, layer.Ht, layer.Sl, layer.batch
            es = np.dtype(storage_dtype(layer.dtype)).itemsize
            self._heap_strides = (Sl * Ht * D * es, Ht * D * es, D * es)  # [B, Sl, Ht, D] contiguous
            self._recv_addr = {n: [b.peer_ptr(pe) for b, (_, _, pe) in zip(self._recv[n], self._slots)]
                               for n in names}
            if layer.fp8:  # each part's slab in every member's receive buffer, contiguous (a 16-bit V
                from .kernels.flash_fp8 import GroupedDst  # goes by the copy kernel instead)
                from .local import strides_of

                self._fp8_dst = {n: GroupedDst(self._recv_addr[n], strides_of(self._recv[n][0].shape))
                                 for n in names if n != "v"}
            self._res_addr = [b.peer_ptr(pe) for b, (_, _, pe) in zip(self._res, self._slots)]
            self._flag = rt.backend.failure_word
            self._grid = (B, self.L, Ht, D * es)
            self._launches: dict = {}
        else:
            self._views: dict = {}

    @staticmethod
    def possible(layer: Any) -> bool:
        """This rank's side of the condition: every Ulysses member on my machine and mapped, rows
        the copy kernel can move (16-byte multiples)."""
        rt, plan = layer.rt, layer.plan
        me = rt.rank
        ok = all(rt.mesh.same_machine(me, p) and rt.mapped(p) for p in layer.Ut)
        if rt.backend.is_gpu:
            ok = ok and plan.head_dim * np.dtype(storage_dtype(layer.dtype)).itemsize % 16 == 0
        return ok

    # -- GPU: one copy kernel per direction, prepared per set of caller buffers ---------------
    def _prepared(self, key: tuple, build: Any) -> list:
        got = self._launches.get(key)
        if got is None:
            if len(self._launches) >= 16:  # callers cycle through a few buffers: keep the latest
                self._launches.clear()
            got = self._launches[key] = build()
        return got

    def _launch(self, pieces: list, poison: bool) -> list:
        from .kernels.flash import HeadsCopy

        B, L, Ht, row = self._grid
        dev, step = self.layer.rt.backend.device, HeadsCopy.MAXP
        return [HeadsCopy(pieces[i:i + step], B, L, Ht, row, dev, flag=self._flag if poison else 0)
                for i in range(0, len(pieces), step)]

    @staticmethod
    def _readable(x: Any) -> tuple[Any, int, tuple[int, ...], bool]:
        """``(array, address, byte strides, is x)``: x itself where the copy kernel can address
        it (16-byte aligned rows, head dim contiguous), else a contiguous copy (rare: odd offsets)."""
        ptr, st, es = addr_of(x)
        if addressable(ptr, st, es):
            return x, ptr, st, True
        c = x.clone() if hasattr(x, "clone") else x.copy()
        return (c, *addr_of(c)[:2], False)

    def push(self, q: Any, k: Any, v: Any, stream: Any, own: bool = False) -> None:
        """Every member's receive buffer gets its head groups of my rows (BSHD views in);
        ``own``: but mine (see the module)."""
        if not self.gpu:
            return self._push_host(q, k, v, own)
        names, srcs = "qkv", (q, k, v)  # what the copy kernel moves
        if self.layer.fp8:
            from .kernels.flash_fp8 import quantize_grouped

            qt, kt, vt = self.layer._quantizable(q, k, v)
            if not self.layer.pv16:
                return quantize_grouped(qt, kt, vt, self._fp8_dst)
            quantize_grouped(qt, kt, vt, {**self._fp8_dst, "v": None})  # Q and K; V as it is, below
            names, srcs = "v", (vt,)
        readable = [self._readable(x) for x in srcs]  # copies stay referenced past the launch
        addrs = [(a, st) for _, a, st, _ in readable]

        def build() -> list:
            Ht, T = self.layer.Ht, self.layer.plan.T
            return self._launch([(a + (j * T + g) * Ht * st[2], st[:3], dst, self._heap_strides)
                                 for name, (a, st) in zip(names, addrs)
                                 for (j, g, _), dst, mine in zip(self._slots, self._recv_addr[name], self._own)
                                 if not (own and mine)], poison=False)
        for launch in self._prepared(("push", names, own, *addrs), build):
            launch(stream)

    def pull(self, out: Any, stream: Any, own: bool = False) -> None:
        """My output rows of every member's head groups into ``out`` (a BSHD view); ``own``: my
        own head group is there already (only marked NaN if a wait failed)."""
        if not self.gpu:
            return self._pull_host(out, own)
        dst, a, st, direct = self._readable(out)

        def build() -> list:
            Ht, T = self.layer.Ht, self.layer.plan.T
            return self._launch([(0 if own and mine else src, self._heap_strides,
                                  a + (j * T + g) * Ht * st[2], st[:3])
                                 for (j, g, _), src, mine in zip(self._slots, self._res_addr, self._own)],
                                poison=True)
        for launch in self._prepared(("pull", own, a, st), build):
            launch(stream)
        if not direct:
            if hasattr(out, "copy_"):
                out.copy_(dst)
            else:
                out[...] = dst

    # -- host backend: the same moves as array copies into the peers' mapped arenas -----------
    def _peer_view(self, buf: Any, pe: int, like: Any) -> Any:
        key = (id(buf), pe, hasattr(like, "permute"))
        view = self._views.get(key)
        if view is None:
            view = buf.peer(pe)
            if hasattr(like, "permute"):
                import torch

                view = torch.from_numpy(view)
                if self.layer.dtype == "bfloat16":
                    view = view.view(torch.bfloat16)
            view = self._views[key] = view[:, :self.L]
        return view

    def _push_host(self, q: Any, k: Any, v: Any, own: bool) -> None:
        if self.layer.fp8:
            return self._push_host_fp8(q, k, v)
        for name, x in zip("qkv", (q, k, v)):
            pieces = self.layer._by_piece(x)
            for (j, g, pe), buf, mine in zip(self._slots, self._recv[name], self._own):
                if own and mine:
                    continue
                dst = self._peer_view(buf, pe, x)
                if hasattr(dst, "copy_"):
                    dst.copy_(pieces[j, g])
                else:
                    dst[...] = pieces[j, g]

    def _push_host_fp8(self, q: Any, k: Any, v: Any) -> None:
        import torch

        for name, pieces in self.layer._fp8_pieces(q, k, v):
            for (j, g, pe), buf in zip(self._slots, self._recv[name]):
                key = (id(buf), pe, "fp8")
                dst = self._views.get(key)
                if dst is None:
                    dst = torch.from_numpy(buf.peer(pe))
                    if name == "v" and self.layer.dtype == "bfloat16":  # a 16-bit V in bf16's storage
                        dst = dst.view(torch.bfloat16)
                    self._views[key] = dst
                src = pieces[j, g]
                dst[tuple(slice(0, n) for n in src.shape)].copy_(src)

    def _pull_host(self, out: Any, own: bool) -> None:
        Ht, T = self.layer.Ht, self.layer.plan.T
        for (j, g, pe), buf, mine in zip(self._slots, self._res, self._own):
            if own and mine:  # the host backend's waits raise: nothing to poison
                continue
            h0 = (j * T + g) * Ht
            src = self._peer_view(buf, pe, out)
            if hasattr(out, "copy_"):
                out[:, :, h0:h0 + Ht].copy_(src)
            else:
                out[:, :, h0:h0 + Ht] = src

