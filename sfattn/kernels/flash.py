"""Launchers of the fused multi-block attention kernels (CUDA C++ via nvcc, loaded with CuPy).

Same contract as :mod:`sfattn.reference`, for GPU arrays (CuPy arrays, CUDA torch tensors, or
:class:`~sfattn.kernels.TensorDesc` raw pointers), plus ``stream=`` and ``impl=`` keywords.
One launch covers all q blocks x all k/v blocks (up to 16 non-empty blocks of each; more are
split into several chained launches automatically).  All block pointers/lengths/strides travel
by value in a kernel-parameter struct, so a call costs one ``cuLaunchKernel`` and no copies.
"""
from __future__ import annotations

import ctypes
import math
import os
import threading
from typing import Any, Sequence

import numpy as np

from oneside import pdl

from ..reference import AttnState, check_blocks
from . import _build, _tma
from ._build import MAXKV, MAXQ, KernelConfig
from ._desc import TensorDesc, as_desc

LOG2E = 1.4426950408889634
_INIT, _FINALIZE, _STATE, _LSE = 1, 2, 4, 8
# int64 slot layout of SfParams (attn_common.cuh)
_HDR, _QF, _KVF, _NSLOTS = _build.HDR_SLOTS, _build.Q_SLOTS, _build.KV_SLOTS, _build.TABLE_SLOTS
HEAD_DIMS = (64, 128)

_cp = None
_lock = threading.Lock()
_kernels: dict = {}
_cc: dict = {}


def _cupy():
    global _cp
    if _cp is None:
        try:
            import cupy
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise RuntimeError("sfattn.kernels needs CuPy (cupy-cuda13x) and a CUDA GPU to run "
                               "kernels") from e
        _cp = cupy
    return _cp


def _device_cc(dev: int) -> int:
    if dev not in _cc:
        cp = _cupy()
        props = cp.cuda.runtime.getDeviceProperties(dev)
        _cc[dev] = props["major"] * 10 + props["minor"]
    return _cc[dev]


def default_impl(dev: int = 0) -> str:
    """'sm90ws' (warp-specialised wgmma) on Hopper, 'fa2' (mma.sync) elsewhere.

    $SFATTN_IMPL overrides ('fa2', 'sm90ws', or 'sm90ws<BN>' / 'sm90ws:...' for other tiles).
    """
    env = os.environ.get("SFATTN_IMPL")
    if env:
        return env
    return "sm90ws" if _device_cc(dev) == 90 else "fa2"


class _Kernel:
    __slots__ = ("fptr", "threads", "smem", "block_m", "module", "cfg", "sms")

    def __init__(self, cfg: KernelConfig, dev: int):
        cp = _cupy()
        drv = cp.cuda.driver
        path = _build.compile_kernel(cfg)
        with cp.cuda.Device(dev):
            cp.cuda.runtime.free(0)  # make sure the device's primary context exists and is current
            self.module = drv.moduleLoad(str(path))
            self.fptr = drv.moduleGetFunction(self.module, cfg.func_name)
            if cfg.smem_bytes > 48 * 1024:
                attr = getattr(drv, "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES", 8)
                drv.funcSetAttribute(self.fptr, attr, cfg.smem_bytes)
        self.threads, self.smem, self.block_m = cfg.threads, cfg.smem_bytes, cfg.block_m
        self.cfg = cfg
        self.sms = cp.cuda.runtime.getDeviceProperties(dev)["multiProcessorCount"]


def _parse_impl(impl: str) -> tuple[str, int, tuple]:
    """'fa2' | 'sm90ws' | 'sm90ws<BN>' | 'sm90ws:BN=160,PP=0,...' -> (base, bn, opts)."""
    if impl in ("fa2", "sm90ws", "sm90fp8", "merge", "heads", "quant"):
        return impl, 0, ()
    if impl.startswith("sm90fp8:"):
        try:
            kv = dict(item.split("=") for item in impl[8:].split(",") if item)
            if not set(kv) - set(_build.FP8_KNOBS):
                return "sm90fp8", 0, tuple(sorted((k, int(v)) for k, v in kv.items()))
        except ValueError:
            pass
        raise ValueError(f"impl {impl!r}: expected 'sm90fp8' or 'sm90fp8:NAME=int,...' with NAME in "
                         f"{', '.join(_build.FP8_KNOBS)}")
    if impl.startswith("sm90ws") and impl[6:].isdigit():
        return "sm90ws", int(impl[6:]), ()
    if impl.startswith("sm90ws:"):
        try:
            kv = dict(item.split("=") for item in impl[7:].split(",") if item)
            bn = int(kv.pop("BN", 0))
            bad = set(kv) - set(_build.WS_KNOBS)
            if not bad:
                return "sm90ws", bn, tuple(sorted((k, int(v)) for k, v in kv.items()))
        except ValueError:
            pass
    raise ValueError(f"impl must be 'fa2', 'sm90ws', 'sm90ws<BN>' or 'sm90ws:NAME=int,...' with "
                     f"NAME in BN, {', '.join(_build.WS_KNOBS)}; got {impl!r}")


def get_kernel(impl: str, head_dim: int, dtype: str, dev: int) -> _Kernel:
    """Compile (once, disk-cached) and load the kernel for this configuration and device."""
    key = (impl, head_dim, dtype, dev)
    k = _kernels.get(key)
    if k is None:
        with _lock:
            k = _kernels.get(key)
            if k is None:
                cc = _device_cc(dev)
                base, bn, opts = _parse_impl(impl)
                if base in ("sm90ws", "sm90fp8"):
                    if cc != 90:
                        raise ValueError(f"impl={impl!r} needs a Hopper GPU (sm_90), device {dev} is "
                                         f"sm_{cc}")
                    arch = "sm_90a"
                else:
                    if cc < 80:
                        raise ValueError(f"the attention kernels need sm_80 or newer, device {dev} "
                                         f"is sm_{cc}")
                    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
                k = _Kernel(KernelConfig(base, head_dim, dtype, arch, bn, opts), dev)
                _kernels[key] = k
    return k


def _stream_ptr(stream: Any, torch_inputs: bool, dev: int) -> int:
    if stream is None:
        if torch_inputs:
            import torch
            raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
            if raw is not None:
                return int(raw(dev))
            return int(torch.cuda.current_stream(dev).cuda_stream)
        return int(_cupy().cuda.get_current_stream().ptr)
    if isinstance(stream, int):
        return stream
    for attr in ("ptr", "cuda_stream", "handle"):
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    raise TypeError(f"stream must be a cupy/torch stream or a cudaStream_t int, got {type(stream)}")


def _check_io(d: TensorDesc, name: str, dtype: str | None, align: int) -> None:
    if dtype is not None and d.dtype != dtype:
        raise TypeError(f"{name} has dtype {d.dtype}, expected {dtype}")
    if d.strides[-1] != 1 and d.shape[-1] > 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), strides are "
                         f"{d.strides}")
    bad = d.ptr % (align * d.itemsize) != 0 or any(
        s % align for s, n in zip(d.strides[:-1], d.shape[:-1]) if n > 1)
    if bad:
        raise ValueError(f"{name} must be {align * d.itemsize}-byte aligned with strides that are "
                         f"multiples of {align} elements (ptr {d.ptr:#x}, strides {d.strides})")


def _state_descs(state: AttnState | None) -> AttnState | None:
    """The state as descriptors, its dtypes, alignment and row strides checked (shapes: the caller)."""
    if state is None:
        return None
    st = AttnState(as_desc(state.acc, "state.acc"), as_desc(state.m, "state.m"),
                   as_desc(state.l, "state.l"))
    _check_io(st.acc, "state.acc", "fp32", 2)
    for nm in ("m", "l"):
        _check_io(getattr(st, nm), f"state.{nm}", "fp32", 1)
    if st.m.strides != st.l.strides:
        raise ValueError(f"state.m and state.l must have the same strides "
                         f"({st.m.strides} vs {st.l.strides})")
    return st


class AttnLaunch:
    """A prepared ``attn_blocks`` call: descriptors packed once, relaunch with :meth:`__call__`.

    For the hot path where the same buffers are attended chunk after chunk.
    """

    def __init__(self, q_blocks: Sequence[Any], k_blocks: Sequence[Any], v_blocks: Sequence[Any],
                 state: AttnState | None, scale: float, *, out: Sequence[Any] | None = None,
                 lse: Any | None = None, impl: str | None = None, finalize: bool = False,
                 init: bool = False):
        qd = [as_desc(x, f"q_blocks[{i}]") for i, x in enumerate(q_blocks)] \
            if isinstance(q_blocks, (list, tuple)) else q_blocks
        kd = [as_desc(x, f"k_blocks[{i}]") for i, x in enumerate(k_blocks)] \
            if isinstance(k_blocks, (list, tuple)) else k_blocks
        vd = [as_desc(x, f"v_blocks[{i}]") for i, x in enumerate(v_blocks)] \
            if isinstance(v_blocks, (list, tuple)) else v_blocks
        st = _state_descs(state)
        od = None if out is None else [as_desc(x, f"out[{i}]") for i, x in enumerate(out)]
        ld = None if lse is None else as_desc(lse, "lse")
        # finalize/init only matter for the argument check here; every call passes its own flags
        B, S, H, D = check_blocks(qd, kd, vd, st, init=init or st is None,
                                  finalize=finalize or st is None or od is not None,
                                  out=od, lse=ld)
        if not (isinstance(scale, (int, float, np.floating)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        if D not in HEAD_DIMS:
            raise ValueError(f"head_dim {D} is not supported by the kernels (supported: {HEAD_DIMS})")
        dtype = qd[0].dtype
        if dtype not in ("bf16", "fp16"):
            raise TypeError(f"q_blocks[0] has dtype {dtype}; the kernels take bf16 or fp16")
        for name, ds in (("q_blocks", qd), ("k_blocks", kd), ("v_blocks", vd)):
            for i, d in enumerate(ds):
                _check_io(d, f"{name}[{i}]", dtype, 8)
        if od is not None:
            for i, d in enumerate(od):
                _check_io(d, f"out[{i}]", dtype, 2)
        if ld is not None:
            _check_io(ld, "lse", "fp32", 1)
        devs = {d.device for d in [*qd, *kd, *vd] if d.device >= 0}
        if len(devs) > 1:
            raise ValueError(f"all arrays must be on one device, got devices {sorted(devs)}")
        self.device = devs.pop() if devs else 0
        self.torch_inputs = qd[0].is_torch
        self.B, self.S, self.H, self.D, self.dtype = B, S, H, D, dtype
        self.impl = impl or default_impl(self.device)
        if _parse_impl(self.impl)[0] in ("merge", "heads", "quant"):
            raise ValueError(f"impl={self.impl!r} is not an attention kernel")
        self.kernel = get_kernel(self.impl, D, dtype, self.device)
        self.has_state = st is not None
        self._build(qd, kd, vd, st, od, ld, float(scale))

    def _kv_maps(self, j: int, k: TensorDesc, v: TensorDesc, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """TMA maps of K/V block ``j`` (its index in the caller's list)."""
        return _tma.tensor_map(k, rows), _tma.tensor_map(v, rows)

    def _q_map(self, i: int, q: TensorDesc, rows: int) -> np.ndarray:
        return _tma.tensor_map(q, rows)

    def _pack_side(self, p: np.ndarray, qidx: list[int], kvidx: list[int]) -> None:
        """Fill kernel-specific parameters after the block tables (none for the bf16 kernels)."""

    def _build(self, qd, kd, vd, st, od, ld, scale) -> None:
        bm = self.kernel.block_m
        qs = []  # (row0, desc, out desc, index) of non-empty q blocks
        row = 0
        for i, q in enumerate(qd):
            if q.shape[1] > 0:
                qs.append((row, q, od[i] if od is not None else None, i))
            row += q.shape[1]
        kvs = [(k, v, i) for i, (k, v) in enumerate(zip(kd, vd)) if k.shape[1] > 0]
        qgroups = [qs[i:i + MAXQ] for i in range(0, len(qs), MAXQ)]
        kvgroups = [kvs[i:i + MAXKV] for i in range(0, len(kvs), MAXKV)] or [[]]
        self._launches = []  # (params, argv, argv address, grid, first kv group, last kv group)
        cfg = self.kernel.cfg
        rows = (cfg.fp8_bn if cfg.impl == "sm90fp8" else cfg.ws_tiles()[0]) if cfg.tma else 0
        for qg in qgroups:
            for gi, kg in enumerate(kvgroups):
                p = np.zeros(cfg.param_slots, dtype=np.int64)
                p[0], p[1], p[2] = len(qg), len(kg), self.H
                p[4:5].view(np.float64)[0] = scale * LOG2E
                if st is not None:
                    p[5], p[6], p[7] = st.acc.ptr, st.m.ptr, st.l.ptr
                    p[9:12] = (st.acc.strides[0], st.acc.strides[1], st.acc.strides[2])
                    p[12:14] = (st.m.strides[0], st.m.strides[1])
                if ld is not None:
                    p[8] = ld.ptr
                    p[14:16] = (ld.strides[0], ld.strides[1])
                tiles = 0
                for j, (row0, q, o, _i) in enumerate(qg):
                    base = _HDR + j * _QF
                    n = q.shape[1]
                    p[base:base + _QF] = (
                        q.ptr, o.ptr if o is not None else 0, q.strides[0], q.strides[1],
                        q.strides[2], *(o.strides[:3] if o is not None else (0, 0, 0)), n, tiles,
                        row0)
                    tiles += -(-n // bm)
                for j, (k, v, i) in enumerate(kg):
                    base = _HDR + MAXQ * _QF + j * _KVF
                    p[base:base + _KVF] = (k.ptr, v.ptr, k.strides[0], k.strides[1], k.strides[2],
                                           v.strides[0], v.strides[1], v.strides[2], k.shape[1])
                    if rows:  # tensor maps tk[j], tv[j] after the block tables
                        tk = _NSLOTS + j * _build.MAP_SLOTS
                        tv = _NSLOTS + (MAXKV + j) * _build.MAP_SLOTS
                        p[tk:tk + _build.MAP_SLOTS], p[tv:tv + _build.MAP_SLOTS] = self._kv_maps(i, k, v, rows)
                if rows:  # then tq[j]: Q tiles of bm rows
                    for j, (_row0, q, _o, i) in enumerate(qg):
                        tq = _NSLOTS + (2 * MAXKV + j) * _build.MAP_SLOTS
                        p[tq:tq + _build.MAP_SLOTS] = self._q_map(i, q, bm)
                self._pack_side(p, [x[3] for x in qg], [x[2] for x in kg])
                if cfg.impl in ("sm90ws", "sm90fp8"):  # work items (Q tile, head) on grid.x, batch on grid.z
                    cl = cfg.cluster  # clusters take pairs of Q tiles of one head: pad to even
                    work = (-(-tiles // cl) * cl) * self.H
                    gx = min(work, max(1, self.kernel.sms // max(1, self.B))) if cfg.persistent \
                        else work
                    grid = (gx, 1, self.B)
                else:
                    grid = (tiles, self.H, self.B)
                argv = (ctypes.c_void_p * 1)(p.ctypes.data)  # kernelParams[0] -> the struct
                self._launches.append((p, argv, ctypes.addressof(argv), grid, gi == 0,
                                       gi == len(kvgroups) - 1))
        self.has_out = od is not None
        self.has_lse = ld is not None
        if len(kvgroups) > 1 and st is None:
            raise ValueError(f"more than {MAXKV} non-empty k/v blocks need a state (chained "
                             f"launches)")

    def __call__(self, *, init: bool = False, finalize: bool = False, stream: Any = None,
                 dependent: bool = False) -> None:
        """Launch: ``init`` starts from an empty state, ``finalize`` writes out (and lse).
        ``dependent``: the first launch as a programmatic dependent launch (:mod:`oneside.pdl`;
        the sm90ws kernel only, which waits for the previous grid before reading anything)."""
        if finalize and not self.has_out:
            raise ValueError("finalize=True needs out (pass it when preparing the launch)")
        if not self.has_state and not (init and finalize):
            raise ValueError("state may be None only with init=True and finalize=True")
        if self.B == 0 or self.H == 0:
            return
        drv = _cupy().cuda.driver
        sp = _stream_ptr(stream, self.torch_inputs, self.device)
        k = self.kernel
        dependent = dependent and k.cfg.impl == "sm90ws"
        for p, _argv, argp, (gx, gy, gz), first, last in self._launches:
            if gx == 0:
                continue
            flags = (_INIT if (init and first) else 0) | (_FINALIZE if (finalize and last) else 0)
            flags |= (_STATE if self.has_state else 0) | (_LSE if (self.has_lse and finalize and last)
                                                          else 0)
            p[3] = flags  # the driver copies the parameters at launch: reuse is safe
            if dependent and first:
                pdl.launch(k.fptr, (gx, gy, gz), (k.threads, 1, 1), k.smem, sp, argp)
            else:
                drv.launchKernel(k.fptr, gx, gy, gz, k.threads, 1, 1, k.smem, sp, argp, 0)


class HeadsCopy:
    """A prepared launch of the head-group copy (heads_copy.cu): pieces ``(src, src_strides, dst,
    dst_strides)`` of addresses and ``(b, s, h)`` byte strides, each a ``[B, L, Hg]`` grid of
    rows of ``row_bytes``; either side may be a peer's mapped symmetric heap. ``flag``: the
    address of a failure word; when it is non-zero at run time the destinations get 0xFF bytes.
    A piece with ``src`` 0 is poison-only: its destination is written only then.
    Addresses, strides and ``row_bytes`` must be multiples of 16 (ValueError otherwise)."""

    MAXP = 48

    def __init__(self, pieces: Sequence[tuple[int, Sequence[int], int, Sequence[int]]], B: int, L: int,
                 Hg: int, row_bytes: int, device: int, flag: int = 0):
        if not 0 < len(pieces) <= self.MAXP:
            raise ValueError(f"pieces: expected 1..{self.MAXP}, got {len(pieces)}")
        if row_bytes <= 0 or row_bytes % 16:
            raise ValueError(f"row_bytes={row_bytes}: expected a positive multiple of 16")
        vecs = row_bytes // 16
        if B * L >= 1 << 31 or Hg * vecs >= 1 << 31:
            raise ValueError(f"B * L = {B * L} tokens and Hg * row_bytes / 16 = {Hg * vecs} vectors: "
                             f"expected each below 2**31")
        p = np.zeros(7 + 8 * self.MAXP, dtype=np.int64)
        p[:7] = (B, L, Hg, vecs, flag, len(pieces), vecs.bit_length() - 1 if vecs & (vecs - 1) == 0 else -1)
        for i, (src, ss, dst, ds) in enumerate(pieces):
            vals = (src, dst, *ss, *ds)
            if len(vals) != 8 or any(int(x) % 16 for x in vals):
                raise ValueError(f"pieces[{i}]: addresses and (b, s, h) byte strides must be multiples "
                                 f"of 16, got src={src:#x} {tuple(ss)}, dst={dst:#x} {tuple(ds)}")
            p[7 + 8 * i:15 + 8 * i] = vals
        self._p = p
        self._argv = (ctypes.c_void_p * 1)(p.ctypes.data)
        self._argp = ctypes.addressof(self._argv)
        self.kernel = get_kernel("heads", 0, "any", device)
        n = B * L * Hg * (row_bytes // 16)
        self.grid = (min(max(1, -(-n // (256 * 4))), 4096), len(pieces)) if n else (0, 0)

    def __call__(self, stream: int) -> None:
        if self.grid[0]:
            k = self.kernel
            _cupy().cuda.driver.launchKernel(k.fptr, self.grid[0], self.grid[1], 1, k.threads, 1, 1, 0,
                                             stream, self._argp, 0)


def empty_state(B: int, S: int, H: int, D: int, like: Any) -> AttnState:
    """Uninitialised float32 :class:`AttnState` on the device of ``like`` (torch or CuPy)."""
    if hasattr(like, "new_empty"):  # torch
        import torch
        mk = lambda *shape: torch.empty(shape, dtype=torch.float32, device=like.device)  # noqa
        return AttnState(mk(B, S, H, D), mk(B, H, S), mk(B, H, S))
    cp = _cupy()
    with cp.cuda.Device(like.device.id if hasattr(like, "device") else 0):
        return AttnState.empty(B, S, H, D, xp=cp, dtype=np.float32)


def attn_blocks(q_blocks: Sequence[Any], k_blocks: Sequence[Any], v_blocks: Sequence[Any],
                state: AttnState | None, scale: float, *, init: bool = False,
                finalize: bool = False, out: Sequence[Any] | None = None, lse: Any | None = None,
                stream: Any = None, impl: str | None = None) -> None:
    """GPU version of :func:`sfattn.reference.attn_blocks` (same arguments and semantics).

    Arrays: CuPy arrays, CUDA torch tensors or TensorDesc; q/k/v/out bf16 or fp16 with a
    contiguous head dim (64 or 128) and 16-byte aligned rows; state float32.  ``stream``: a
    CuPy/torch stream or a raw cudaStream_t (default: the current stream of the inputs' library).
    ``impl``: 'sm90ws' (Hopper wgmma + TMA) or 'fa2' (portable mma.sync); default by device.
    Asynchronous like any kernel launch.
    """
    if not finalize:
        out = lse = None
    try:
        key = (tuple(map(_key_of, q_blocks)), tuple(map(_key_of, k_blocks)),
               tuple(map(_key_of, v_blocks)),
               None if state is None else (_key_of(state.acc), _key_of(state.m), _key_of(state.l)),
               None if out is None else tuple(map(_key_of, out)),
               None if lse is None else _key_of(lse), float(scale), impl, init, finalize)
    except (TypeError, AttributeError):
        key = None  # unusual inputs: no caching, full checks below raise a clear error
    launch = _cache.get(key) if key is not None else None
    if launch is None:
        launch = AttnLaunch(q_blocks, k_blocks, v_blocks, state, scale, out=out, lse=lse,
                            impl=impl, finalize=finalize, init=init)
        if key is not None:
            if len(_cache) >= _CACHE_MAX:
                _cache.pop(next(iter(_cache)))
            _cache[key] = launch
    launch(init=init, finalize=finalize, stream=stream)


_CACHE_MAX = 1024
_cache: dict = {}


def _key_of(x: Any) -> tuple:
    """Cheap identity of an array for the launch cache: pointer, shape, strides, dtype."""
    if isinstance(x, TensorDesc):
        return (x.ptr, x.shape, x.strides, x.dtype, x.device)
    if hasattr(x, "data_ptr"):
        return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device)
    return (x.data.ptr, x.shape, x.strides, x.dtype.char, x.device.id)


def merge(o1: Any, lse1: Any, o2: Any, lse2: Any, out: Any | None = None,
          lse_out: Any | None = None, *, stream: Any = None) -> tuple[Any, Any]:
    """GPU version of :func:`sfattn.reference.merge`: combine two normalised partial results.

    ``o*``: [B, S, H, D] (bf16/fp16/fp32, head dim contiguous), ``lse*``: [B, H, S] float32 with
    row stride 1.  ``out``/``lse_out`` default to new arrays like ``o1``/``lse1`` (they may alias
    the inputs).  Returns ``(out, lse_out)``.
    """
    if out is None:
        out = o1.new_empty(o1.shape) if hasattr(o1, "new_empty") else _cupy().empty_like(o1)
    if lse_out is None:
        lse_out = lse1.new_empty(lse1.shape) if hasattr(lse1, "new_empty") else \
            _cupy().empty_like(lse1)
    ds = {n: as_desc(x, n) for n, x in (("o1", o1), ("lse1", lse1), ("o2", o2), ("lse2", lse2),
                                        ("out", out), ("lse_out", lse_out))}
    if ds["o1"].ndim != 4:
        raise ValueError(f"o1 must be [B, S, H, D], got shape {ds['o1'].shape}")
    B, S, H, D = ds["o1"].shape
    for n in ("o2", "out"):
        if ds[n].shape != (B, S, H, D):
            raise ValueError(f"{n} has shape {ds[n].shape}, expected {(B, S, H, D)}")
        if ds[n].dtype != ds["o1"].dtype:
            raise TypeError(f"{n} has dtype {ds[n].dtype}, o1 has {ds['o1'].dtype}")
    for n in ("lse1", "lse2", "lse_out"):
        if ds[n].shape != (B, H, S):
            raise ValueError(f"{n} has shape {ds[n].shape}, expected {(B, H, S)}")
        _check_io(ds[n], n, "fp32", 1)
    for n in ("o1", "o2", "out"):
        _check_io(ds[n], n, None, 1)
    dev = ds["o1"].device if ds["o1"].device >= 0 else 0
    k = get_kernel("merge", 0, ds["o1"].dtype, dev)
    p = np.zeros(4 + 3 * 4 + 3 * 3, dtype=np.int64)
    p[0:4] = (B, S, H, D)
    for i, n in enumerate(("o1", "o2", "out")):
        d = ds[n]
        p[4 + 4 * i:8 + 4 * i] = (d.ptr, d.strides[0], d.strides[1], d.strides[2])
    for i, n in enumerate(("lse1", "lse2", "lse_out")):
        d = ds[n]
        p[16 + 3 * i:19 + 3 * i] = (d.ptr, d.strides[0], d.strides[1])
    rows = B * S * H
    if rows == 0:
        return out, lse_out
    grid = min(-(-rows // 8), 65535 * 8)
    sp = _stream_ptr(stream, ds["o1"].is_torch, dev)
    argv = (ctypes.c_void_p * 1)(p.ctypes.data)
    _cupy().cuda.driver.launchKernel(k.fptr, grid, 1, 1, k.threads, 1, 1, 0, sp,
                                     ctypes.addressof(argv), 0)
    return out, lse_out
