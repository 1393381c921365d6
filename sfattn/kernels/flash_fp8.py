"""Launcher of the FP8 fused multi-block attention kernel (attn_sm90fp8.cu, Hopper).

Operands are the quantised blocks of :mod:`sfattn.quant` (:class:`~sfattn.quant.Fp8Q`,
:class:`~sfattn.quant.Fp8KV`, CUDA torch tensors); the running state, ``out`` and ``lse`` are those
of :func:`sfattn.kernels.attn_blocks`, so FP8 calls chain with each other exactly like bf16 ones::

    attn_blocks_fp8([quantize_q(q)], [quantize_kv(k, v)], None, scale, init=True, finalize=True,
                    out=[o])
"""
from __future__ import annotations

import ctypes
from typing import Any, Sequence

import numpy as np

from ..quant import BLOCK, Fp8KV, Fp8Q
from ..reference import AttnState
from . import _build, _tma
from ._desc import TensorDesc, as_desc
from .flash import HEAD_DIMS, AttnLaunch, _check_io, _cupy, _state_descs, get_kernel

__all__ = ["Fp8Launch", "attn_blocks_fp8", "fp8_tile", "quantize_q_cuda", "quantize_kv_cuda", "quantize_grouped", "GroupedDst"]

_SIDE0 = _build.TABLE_SLOTS + _build.MAPS_SLOTS


def _side(x: Any, name: str, shape: tuple, dev: int) -> TensorDesc:
    d = as_desc(x, name)
    if d.dtype != "fp32":
        raise TypeError(f"{name} has dtype {d.dtype}, expected float32")
    if d.shape != shape:
        raise ValueError(f"{name} has shape {d.shape}, expected {shape}")
    if d.shape[-1] > 1 and d.strides[-1] != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, strides are {d.strides}")
    if d.device != dev:
        raise ValueError(f"{name} is on device {d.device}, the blocks on device {dev}")
    return d


FP8_PAD_MAX = 1.05  # most keys (over 128-key tiles) that the default 192-key tiles may pad to


def fp8_tile(kv_blocks: Sequence[Fp8KV], impl: str | None = None) -> int:
    """Keys per K/V tile the FP8 kernel ``impl`` (default ``'sm90fp8'``) takes for these K/V blocks:
    the ``tile`` of its float64 emulation (:func:`sfattn.quant.attn_blocks_fp8_emulated`). Needs no
    GPU. A ``BN`` knob decides; else 128 at head dim 64, and at 128 the 192-key tiles unless they
    pad the blocks' keys by more than 5 % over 128-key tiles (then 128: e.g. blocks of 1000 keys;
    192-key tiles run ~11 % faster, so 4096-key blocks, padded by 3 %, still gain 6 % on an H200,
    docs/fp8.md); 128 at head dims the kernel does not take (the host backend's emulation there)."""
    from .flash import _parse_impl
    base, _bn, opts = _parse_impl(impl or "sm90fp8")
    if base != "sm90fp8":
        raise ValueError(f"impl={impl!r} is not the FP8 kernel ('sm90fp8[:knobs]')")
    lens = [int(kv.k.shape[1]) for kv in kv_blocks]
    d = int(kv_blocks[0].k.shape[3]) if kv_blocks else 0
    if "BN" in dict(opts):
        return int(dict(opts)["BN"])
    bn = _build.FP8_BN_DEFAULT.get(d, BLOCK)
    if bn != BLOCK and sum(-(-n // bn) * bn for n in lens) > FP8_PAD_MAX * sum(-(-n // BLOCK) * BLOCK for n in lens):
        bn = BLOCK
    return bn


class Fp8Launch(AttnLaunch):
    """A prepared FP8 attention call (see :class:`~sfattn.kernels.AttnLaunch`): ``q_blocks`` a list
    of :class:`Fp8Q`, ``kv_blocks`` a list of :class:`Fp8KV`; ``out`` bf16 or fp16. K/V blocks with
    a 16-bit ``v`` (all of them or none) run P.V in that dtype (the kernel's ``PV=16`` build; ``v``
    must have ``out``'s dtype)."""

    def __init__(self, q_blocks: Sequence[Fp8Q], kv_blocks: Sequence[Fp8KV], state: AttnState | None,
                 scale: float, *, out: Sequence[Any] | None = None, lse: Any | None = None,
                 impl: str | None = None, finalize: bool = False, init: bool = False):
        if not isinstance(q_blocks, (list, tuple)) or not q_blocks or \
                not all(isinstance(x, Fp8Q) for x in q_blocks):
            raise TypeError("q_blocks must be a non-empty list of sfattn.quant.Fp8Q")
        if not isinstance(kv_blocks, (list, tuple)) or not all(isinstance(x, Fp8KV) for x in kv_blocks):
            raise TypeError("kv_blocks must be a list of sfattn.quant.Fp8KV")
        if not (isinstance(scale, (int, float, np.floating)) and np.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        qd = [as_desc(x.data, f"q_blocks[{i}].data") for i, x in enumerate(q_blocks)]
        B, _, H, D = qd[0].shape
        if D not in HEAD_DIMS:
            raise ValueError(f"head_dim {D} is not supported by the FP8 kernel (supported: {HEAD_DIMS})")
        dev = qd[0].device
        for i, d in enumerate(qd):
            if d.ndim != 4 or (d.shape[0], d.shape[2], d.shape[3]) != (B, H, D):
                raise ValueError(f"q_blocks[{i}].data has shape {d.shape}, expected [B={B}, S, H={H}, D={D}]")
            _check_io(d, f"q_blocks[{i}].data", "int8", 16)
        self.pv16 = bool(kv_blocks) and kv_blocks[0].v is not None
        if any((kv.v is not None) != self.pv16 for kv in kv_blocks):
            raise ValueError("kv_blocks: every block has V in e4m3 (vt) or every one a 16-bit v, not a mix")
        kd, vd = [], []
        for i, kv in enumerate(kv_blocks):
            k = as_desc(kv.k, f"kv_blocks[{i}].k")
            if k.ndim != 4 or (k.shape[0], k.shape[2], k.shape[3]) != (B, H, D):
                raise ValueError(f"kv_blocks[{i}].k has shape {k.shape}, expected [B={B}, S, H={H}, D={D}]")
            _check_io(k, f"kv_blocks[{i}].k", "int8", 16)
            if self.pv16:
                vt = as_desc(kv.v, f"kv_blocks[{i}].v")
                if vt.shape != k.shape:
                    raise ValueError(f"kv_blocks[{i}].v has shape {vt.shape}, expected {k.shape} (as k)")
                if vt.dtype not in ("bf16", "fp16"):
                    raise TypeError(f"kv_blocks[{i}].v has dtype {vt.dtype}, expected bf16 or fp16")
                _check_io(vt, f"kv_blocks[{i}].v", vt.dtype, 16)
            else:
                vt = as_desc(kv.vt, f"kv_blocks[{i}].vt")
                sp = -(-k.shape[1] // 32) * 32
                if vt.ndim != 4 or vt.shape[:3] != (B, H, D) or vt.shape[3] < sp or vt.shape[3] % 32:
                    raise ValueError(f"kv_blocks[{i}].vt has shape {vt.shape}, expected [B={B}, H={H}, D={D}, "
                                     f"Sp] with Sp >= {sp} a multiple of 32")
                _check_io(vt, f"kv_blocks[{i}].vt", "e4m3", 16)
            kd.append(k)
            vd.append(vt)
        devs = {d.device for d in [*qd, *kd, *vd]}
        if len(devs) > 1:
            raise ValueError(f"all blocks must be on one device, got devices {sorted(devs)}")
        self._qs = [_side(x.scale, f"q_blocks[{i}].scale", (B, H, -(-qd[i].shape[1] // BLOCK)), dev)
                    for i, x in enumerate(q_blocks)]
        self._ks = [_side(x.kscale, f"kv_blocks[{i}].kscale", (B, H, -(-kd[i].shape[1] // BLOCK)), dev)
                    for i, x in enumerate(kv_blocks)]
        self._mu = [_side(x.mu, f"kv_blocks[{i}].mu", (B, H, D), dev) for i, x in enumerate(kv_blocks)]
        self._vs = [None if self.pv16 else _side(x.vscale, f"kv_blocks[{i}].vscale", (B, H), dev)
                    for i, x in enumerate(kv_blocks)]
        S = sum(d.shape[1] for d in qd)
        st = _state_descs(state)
        if st is not None:
            if st.acc.shape != (B, S, H, D) or st.m.shape != (B, H, S) or st.l.shape != (B, H, S):
                raise ValueError(f"state must be acc [B, S, H, D] = {(B, S, H, D)} and m, l [B, H, S]; got "
                                 f"{st.acc.shape}, {st.m.shape}, {st.l.shape}")
        elif not (init and finalize):
            raise ValueError("state may be None only with init=True and finalize=True")
        od = None
        if out is not None:
            if len(out) != len(qd):
                raise ValueError(f"out must hold one array per q block ({len(qd)}), got {len(out)}")
            od = [as_desc(x, f"out[{i}]") for i, x in enumerate(out)]
            for i, (o, q) in enumerate(zip(od, qd)):
                if o.shape != q.shape:
                    raise ValueError(f"out[{i}] has shape {o.shape}, expected {q.shape}")
                if o.dtype not in ("bf16", "fp16"):
                    raise TypeError(f"out[{i}] has dtype {o.dtype}, expected bf16 or fp16")
                _check_io(o, f"out[{i}]", od[0].dtype, 2)
        elif finalize:
            raise ValueError("finalize=True needs out")
        ld = None if lse is None else as_desc(lse, "lse")
        if ld is not None:
            if ld.shape != (B, H, S):
                raise ValueError(f"lse has shape {ld.shape}, expected {(B, H, S)}")
            _check_io(ld, "lse", "fp32", 1)
        self.device, self.torch_inputs = dev, True
        self.B, self.S, self.H, self.D = B, S, H, D
        self.dtype = od[0].dtype if od else (vd[0].dtype if self.pv16 and vd else "bf16")
        if self.pv16 and any(v.dtype != self.dtype for v in vd):
            raise TypeError(f"kv_blocks: a 16-bit v must have the output's dtype {self.dtype}, got "
                            f"{sorted({v.dtype for v in vd})}")
        self.impl = impl or "sm90fp8"
        add = (["PV=16"] if self.pv16 and "PV=" not in self.impl else []) + \
            ([] if "BN=" in self.impl else [f"BN={fp8_tile(kv_blocks, impl)}"])
        if add:  # the PV=16 build; the tile length for these blocks
            self.impl += (":" if ":" not in self.impl else ",") + ",".join(add)
        self.kernel = get_kernel(self.impl, D, self.dtype, dev)
        if self.kernel.cfg.impl != "sm90fp8":
            raise ValueError(f"impl={self.impl!r} is not the FP8 kernel ('sm90fp8[:knobs]')")
        if (self.kernel.cfg.fp8_pv_bytes == 2) != self.pv16:
            raise ValueError(f"impl={self.impl!r} takes {'e4m3' if self.pv16 else '16-bit'} V but "
                             f"kv_blocks hold {'16-bit' if self.pv16 else 'e4m3'} V "
                             "(quantize_kv(..., pv='16') makes 16-bit V; leave PV= out of impl)")
        self.has_state = st is not None
        self._build(qd, kd, vd, st, od, ld, float(scale))

    def _kv_maps(self, j, k, v, rows):
        B, S, H, D = k.shape
        tk = _tma.byte_map(k.ptr, [D, S, H, B], [k.strides[1], k.strides[2], k.strides[0]], [D, rows, 1, 1])
        if self.pv16:  # V rows in 16-bit, as the bf16 kernels load them
            return tk, _tma.tensor_map(v, rows)
        _, _, _, sp = v.shape  # V^T panels of 128 keys (128-byte swizzle), or of 64 for 192-key tiles
        panel = 128 if rows % 128 == 0 else 64
        tv = _tma.byte_map(v.ptr, [sp, D, H, B], [v.strides[2], v.strides[1], v.strides[0]], [panel, D, 1, 1])
        return tk, tv

    def _q_map(self, i, q, rows):
        B, S, H, D = q.shape
        return _tma.byte_map(q.ptr, [D, S, H, B], [q.strides[1], q.strides[2], q.strides[0]], [D, rows, 1, 1])

    def _pack_side(self, p, qidx, kvidx):
        mq, mkv = _build.MAXQ, _build.MAXKV
        for arrays, base, idx in ((self._qs, _SIDE0, qidx), (self._ks, _SIDE0 + 3 * mq, kvidx),
                                  (self._mu, _SIDE0 + 3 * (mq + mkv), kvidx),
                                  (self._vs, _SIDE0 + 3 * (mq + 2 * mkv), kvidx)):
            for j, i in enumerate(idx):
                d = arrays[i]
                if d is not None:  # (no V scales with a 16-bit V)
                    p[base + 3 * j:base + 3 * j + 3] = (d.ptr, d.strides[0], d.strides[1])


_cache: dict = {}
_CACHE_MAX = 256


def attn_blocks_fp8(q_blocks: Sequence[Fp8Q], kv_blocks: Sequence[Fp8KV], state: AttnState | None,
                    scale: float, *, init: bool = False, finalize: bool = False,
                    out: Sequence[Any] | None = None, lse: Any | None = None, stream: Any = None,
                    impl: str | None = None) -> None:
    """FP8 version of :func:`sfattn.kernels.attn_blocks` (same state, flags and outputs)."""
    if not finalize:
        out = lse = None
    ptr = lambda t: None if t is None else (t.data_ptr(), tuple(t.shape), tuple(t.stride()))  # noqa: E731
    try:
        key = (tuple((ptr(x.data), ptr(x.scale)) for x in q_blocks),
               tuple((ptr(x.k), ptr(x.kscale), ptr(x.mu), ptr(x.vt), ptr(x.vscale), ptr(x.v)) for x in kv_blocks),
               None if state is None else (ptr(state.acc), ptr(state.m), ptr(state.l)),
               None if out is None else tuple(map(ptr, out)), ptr(lse), float(scale), impl, init, finalize)
    except (TypeError, AttributeError):
        key = None
    launch = _cache.get(key) if key is not None else None
    if launch is None:
        launch = Fp8Launch(q_blocks, kv_blocks, state, scale, out=out, lse=lse, impl=impl,
                           finalize=finalize, init=init)
        if key is not None:
            if len(_cache) >= _CACHE_MAX:
                _cache.pop(next(iter(_cache)))
            _cache[key] = launch
    launch(init=init, finalize=finalize, stream=stream)


# ------------------------------------------------------------------ quantisers (quant.cu)
_SPLIT_ROWS = 256  # rows per partial sum / maximum (fixed: the results do not depend on timing)
_QDT = {"torch.bfloat16": "bf16", "torch.float16": "fp16"}


def cuda_quantizable(*xs: Any) -> bool:
    """True when the fused quantisers take these tensors: CUDA bf16/fp16, contiguous head dim, a
    head dim that is a multiple of 4 and at most 256."""
    return all(getattr(x, "is_cuda", False) and str(x.dtype) in _QDT and x.dim() == 4 and
               x.stride(-1) == 1 and x.shape[-1] % 4 == 0 and x.shape[-1] <= 256 for x in xs)


_functions: dict = {}


def _function(name: str, dtype: str, dev: int) -> Any:
    """Handle of kernel ``name`` in quant.cu, looked up once per (name, dtype, device)."""
    key = (name, dtype, dev)
    fn = _functions.get(key)
    if fn is None:
        fn = _functions[key] = _cupy().cuda.driver.moduleGetFunction(
            get_kernel("quant", 0, dtype, dev).module, name)
    return fn


def _run(name: str, x: Any, grid: tuple, block: int, *args: Any) -> None:
    """Launch kernel ``name`` of quant.cu for input ``x`` (its first argument, a QIn) and ``args``
    (ctypes values), on torch's current stream."""
    import torch
    fn = _function(name, _QDT[str(x.dtype)], x.device.index or 0)
    B, S, H, D = x.shape
    qin = (ctypes.c_int64 * 8)(x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), B, S, H, D)
    vals = [qin, *args]
    argv = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
    stream = torch.cuda.current_stream(x.device).cuda_stream
    _cupy().cuda.driver.launchKernel(fn, *grid, block, 1, 1, 0, stream, ctypes.addressof(argv), 0)


_QTHREADS = 256  # quant.cu's QTHREADS


def _ptr(t: Any) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


QMAXG = 64  # quant.cu's QMAXG: head groups per output


class GroupedDst:
    """Where a quantiser output goes: the address of each head group's slab and the element
    strides inside one (batch first; see quant.cu), e.g. one group per member of a Ulysses team."""

    def __init__(self, bases: Sequence[int], strides: Sequence[int]):
        if not 0 < len(bases) <= QMAXG:
            raise ValueError(f"bases: expected 1..{QMAXG} head groups, got {len(bases)}")
        self.bases, self.strides = [int(b) for b in bases], tuple(int(x) for x in strides)
        self._args: dict = {}  # axes -> the packed parameter: made once, reused by every call

    @staticmethod
    def of(t: Any) -> "GroupedDst":
        """A torch tensor ``[G, B, ...]``: group g at ``t[g]``."""
        es = t.element_size()
        return GroupedDst([t.data_ptr() + g * t.stride(0) * es for g in range(t.shape[0])], t.stride()[1:])

    def arg(self, *axes: int) -> Any:
        """The QDst parameter: group bases, then the strides of ``axes`` (of the group's slab)."""
        got = self._args.get(axes)
        if got is None:
            st = [self.strides[a] for a in axes] + [0] * (3 - len(axes))
            got = self._args[axes] = (ctypes.c_int64 * (QMAXG + 3))(
                *(self.bases + [0] * (QMAXG - len(self.bases))), *st)
        return got


def _check_parts(parts: dict, shapes: dict) -> None:
    for name, shape in shapes.items():
        t = parts[name]
        if isinstance(t, GroupedDst):
            if len(t.bases) != shape[0] or len(t.strides) != len(shape) - 1:
                raise ValueError(f"parts[{name!r}]: expected {shape[0]} groups of {len(shape) - 1}-d slabs, got "
                                 f"{len(t.bases)} groups with strides {t.strides}")
            continue
        if t.dim() != len(shape) or t.shape[:2] != shape[:2] or any(a < b for a, b in zip(t.shape, shape)) \
                or (t.shape[-1] > 1 and t.stride(-1) != 1):
            raise ValueError(f"parts[{name!r}]: expected at least {shape} with a contiguous last dim, got "
                             f"{tuple(t.shape)} strides {t.stride()}")


def _dst(t: Any) -> GroupedDst:
    return t if isinstance(t, GroupedDst) else GroupedDst.of(t)


_NO_DST = GroupedDst([0], ())


def _q_into(q: Any, data: Any, scale: Any, ght: int) -> None:
    """Q to int8 ``data`` ``[G, B, >= S, Ht, D]`` and its scales ``scale`` ``[G, B, Ht, >= nb]``."""
    B, S, H, D = q.shape
    if S:
        _run("sf_quant_i8", q, (-(-S // BLOCK), H, B), _QTHREADS, _ptr(None), ctypes.c_int(0), _NO_DST.arg(),
             _dst(data).arg(0, 1, 2), _dst(scale).arg(0, 1), ctypes.c_int(ght))


def _kv_into(k: Any, v: Any, parts: dict, ght: int) -> None:
    """K - mu to int8 (``parts['k']``, ``['ks']``, ``['mu']``) and V to transposed e4m3 (``['vt']``,
    ``['vs']``) or, with a ``parts['v']``, V copied as it is, grouped as in :func:`quantize_grouped`."""
    import torch

    B, S, H, D = k.shape
    if not S:
        return
    splits = max(1, -(-S // _SPLIT_ROWS))
    part = torch.empty((splits, B, H, D), dtype=torch.float32, device=k.device)
    _run("sf_colsum", k, (splits, H, B), D, _ptr(part), ctypes.c_int(_SPLIT_ROWS))
    _run("sf_quant_i8", k, (-(-S // BLOCK), H, B), _QTHREADS, _ptr(part), ctypes.c_int(splits),
         _dst(parts["mu"]).arg(0, 1), _dst(parts["k"]).arg(0, 1, 2), _dst(parts["ks"]).arg(0, 1), ctypes.c_int(ght))
    if "v" in parts:  # fp8-accurate: V stays 16-bit; one strided copy per head group (None: none)
        for g, dst in enumerate(() if parts["v"] is None else parts["v"]):
            dst[:, :S].copy_(v[:, :, g * ght:(g + 1) * ght])
        return
    vpart = torch.empty((splits, B, H), dtype=torch.float32, device=k.device)
    _run("sf_absmax_v", v, (splits, H, B), _QTHREADS, _ptr(vpart), ctypes.c_int(_SPLIT_ROWS))
    _run("sf_quant_vt", v, (-(-S // 32), H, B), D, _ptr(vpart), ctypes.c_int(splits), _dst(parts["vt"]).arg(0, 1, 2),
         _dst(parts["vs"]).arg(0, 1), ctypes.c_int(ght))


def quantize_grouped(q: Any, k: Any, v: Any, parts: dict) -> None:
    """Quantise ``q``, ``k``, ``v`` ``[B, S, H, D]`` (CUDA bf16/fp16, head dim contiguous) into
    caller-owned buffers whose heads are split into G groups of Ht (``H = G * Ht``; group ``h // Ht``
    gets head ``h % Ht``) - a sequence-parallel layer's send buffers, one group per destination:
    ``parts['q']``, ``['k']`` int8 ``[G, B, >= S, Ht, D]``; ``['qs']``, ``['ks']`` fp32 ``[G, B, Ht,
    >= ceil(S / 128)]``; ``['mu']`` fp32 ``[G, B, Ht, D]``; ``['vt']`` uint8 (e4m3 bytes) ``[G, B, Ht, D,
    >= ceil(S / 32) * 32]``; ``['vs']`` fp32 ``[G, B, Ht]`` - or, for a 16-bit P.V, ``['v']`` in
    v's dtype ``[G, B, >= S, Ht, D]`` instead of ``vt`` and ``vs`` (``None``: V is left to the caller,
    e.g. a copy kernel into mapped peers); last dims contiguous. A part may instead
    be a :class:`GroupedDst` (groups anywhere in the address space, e.g. mapped peers' buffers; not
    checked beyond its group count). Values as :func:`sfattn.quant.quantize_q` / ``quantize_kv``;
    entries past S are left as they are."""
    if not cuda_quantizable(q, k, v) or q.shape != k.shape or k.shape != v.shape:
        raise ValueError("q, k, v: expected CUDA bf16/fp16 [B, S, H, D] tensors of one shape with a contiguous "
                         "head dim (a multiple of 4, <= 256)")
    B, S, H, D = q.shape
    q0 = parts["q"]
    G = len(q0.bases) if isinstance(q0, GroupedDst) else q0.shape[0]
    if not 0 < G <= QMAXG or H % G:
        raise ValueError(f"parts: {G} head groups do not split {H} heads (at most {QMAXG} groups)")
    ght = H // G
    nb, sp = -(-S // BLOCK), -(-S // 32) * 32
    vparts = {} if "v" in parts and parts["v"] is None else \
        {"v": (G, B, S, ght, D)} if "v" in parts else {"vt": (G, B, ght, D, sp), "vs": (G, B, ght)}
    if "v" in parts and isinstance(parts["v"], GroupedDst):
        raise ValueError("parts['v']: a 16-bit V is copied by torch: pass a tensor (or None), not a GroupedDst")
    _check_parts(parts, {"q": (G, B, S, ght, D), "k": (G, B, S, ght, D), "qs": (G, B, ght, nb),
                         "ks": (G, B, ght, nb), "mu": (G, B, ght, D), **vparts})
    _q_into(q, parts["q"], parts["qs"], ght)
    _kv_into(k, v, parts, ght)


def quantize_q_cuda(q: Any) -> Fp8Q:
    """:func:`sfattn.quant.quantize_q` for CUDA bf16/fp16 tensors: one kernel."""
    import torch

    B, S, H, D = q.shape
    data = torch.empty((B, S, H, D), dtype=torch.int8, device=q.device)
    scale = torch.empty((B, H, -(-S // BLOCK)), dtype=torch.float32, device=q.device)
    _q_into(q, data[None], scale[None], H)
    return Fp8Q(data, scale)


def quantize_kv_cuda(k: Any, v: Any, pv: str = "e4m3") -> Fp8KV:
    """:func:`sfattn.quant.quantize_kv` for CUDA bf16/fp16 tensors: four kernels (partial sums of
    K, partial maxima of V, K - mu to int8, V to transposed e4m3); ``pv='16'``: the first and third,
    V kept as it is."""
    import torch

    B, S, H, D = k.shape
    dev = k.device
    k8 = torch.empty((B, S, H, D), dtype=torch.int8, device=dev)
    kscale = torch.empty((B, H, -(-S // BLOCK)), dtype=torch.float32, device=dev)
    mu = torch.zeros((B, H, D), dtype=torch.float32, device=dev)
    if pv == "16":
        _kv_into(k, v, {"k": k8[None], "ks": kscale[None], "mu": mu[None], "v": None}, H)  # v is used in place
        return Fp8KV(k8, kscale, mu, None, None, v=v)
    vt = torch.empty((B, H, D, -(-S // 32) * 32), dtype=torch.uint8, device=dev)
    vscale = torch.ones((B, H), dtype=torch.float32, device=dev)
    _kv_into(k, v, {"k": k8[None], "ks": kscale[None], "mu": mu[None], "vt": vt[None], "vs": vscale[None]}, H)
    return Fp8KV(k8, kscale, mu, vt.view(torch.float8_e4m3fn), vscale)
