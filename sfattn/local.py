"""Local attention for the algorithms: the same multi-block contract on CPU and GPU.

``prepare(...)`` packs one ``attn_blocks`` call at plan time and returns a function of the
stream that launches it, so the per-chunk hot path does no Python work beyond the call.
On the host backend this is the numpy reference (float64 math); on GPUs the fused kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from oneside.heap import join as oneside_join

from . import reference
from .reference import AttnState

# heap dtype -> the kernels' (uint8 buffers hold the FP8 layers' e4m3 bytes)
_KERNEL_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "int8": "int8", "uint8": "e4m3"}


@dataclass(frozen=True)
class PeerBlock:
    """Heads ``h0 : h0 + heads`` of the first ``rows`` rows of member ``pe``'s copy of the
    ``[B, S, H, D]`` symmetric array ``buf``, read (or written) in place where ``pe`` is mapped."""

    buf: Any
    pe: int
    h0: int
    heads: int
    rows: int

    def host_view(self) -> np.ndarray:
        return self.buf.peer(self.pe)[:, :self.rows, self.h0:self.h0 + self.heads]


def _rows(block: Any) -> tuple[Any, int | None]:
    """A block is a SymArray ``[B, S, H, D]`` or ``(SymArray, n)``: its first n rows."""
    return block if isinstance(block, tuple) else (block, None)


def _bf16_to_f64(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values stored as uint16 (how the heap keeps them) -> float64."""
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _f64_to_bf16(x: np.ndarray) -> np.ndarray:
    """float64 -> bfloat16 bits (uint16), rounding to nearest even like torch."""
    f = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((f + 0x7FFF + ((f >> 16) & 1)) >> 16).astype(np.uint16)


def as_torch(x: Any, device: int | None) -> Any:
    """A torch view of a caller's array (torch as is; numpy, and CuPy on CUDA ``device``, without a copy)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    return torch.as_tensor(x, device=f"cuda:{device}")


def strides_of(shape: Sequence[int]) -> tuple:
    """Element strides of a contiguous array of ``shape``."""
    strides, acc = [], 1
    for n in reversed(shape):
        strides.insert(0, acc)
        acc *= n
    return tuple(strides)


def is_fp8(block: Any) -> bool:
    """Whether a block is an FP8 block of the layer: ``(parts, rows)`` with ``parts`` a dict of
    symmetric arrays (``q``/``qs``, ``k``/``ks``/``mu`` or ``vt``/``vs``; see ``SPAttention``)."""
    return isinstance(_rows(block)[0], dict)


def fp8_blocks(q: Sequence[Any], k: Sequence[Any], v: Sequence[Any], cut: Callable[[Any, tuple], Any]
               ) -> tuple[list, list]:
    """The layer's FP8 blocks as :class:`~sfattn.quant.Fp8Q` / :class:`~sfattn.quant.Fp8KV` of
    ``cut(symmetric array, shape)`` views (each part cut to the block's rows: data ``[B, n, Ht, D]``,
    scales ``[B, Ht, ceil(n / 128)]``, V transposed ``[B, Ht, D, ceil(n / 32) * 32]``)."""
    from .quant import BLOCK, Fp8KV, Fp8Q

    def rows(block: Any, name: str) -> tuple[dict, int]:
        parts, n = _rows(block)
        return parts, parts[name].shape[1] if n is None else n

    def data(a: Any, n: int) -> Any:
        return cut(a, (a.shape[0], n, *a.shape[2:]))

    def scales(a: Any, n: int) -> Any:
        return cut(a, (*a.shape[:2], -(-n // BLOCK)))

    qs = []
    for b in q:
        parts, n = rows(b, "q")
        qs.append(Fp8Q(data(parts["q"], n), scales(parts["qs"], n)))
    kvs = []
    for kb, vb in zip(k, v):
        kp, n = rows(kb, "k")
        vp = _rows(vb)[0]
        if "v" in vp:  # a 16-bit V (precision='fp8-accurate')
            kvs.append(Fp8KV(data(kp["k"], n), scales(kp["ks"], n), cut(kp["mu"], kp["mu"].shape), None, None,
                             v=data(vp["v"], n)))
            continue
        vt = vp["vt"]
        kvs.append(Fp8KV(data(kp["k"], n), scales(kp["ks"], n), cut(kp["mu"], kp["mu"].shape),
                         cut(vt, (*vt.shape[:3], -(-n // 32) * 32)), cut(vp["vs"], vp["vs"].shape)))
    return qs, kvs


class HostAttention:
    """numpy reference kernels (CPU, float64 math; bfloat16 heaps converted on the way)."""

    xp = np

    @staticmethod
    def view(block: Any):
        """The block as numpy: a heap block's arena, or a caller's array (a CPU torch tensor's memory,
        bfloat16 as its bits, as the heap holds it), without a copy."""
        if isinstance(block, PeerBlock):
            return block.host_view()
        a, n = _rows(block)
        if hasattr(a, "rt"):
            a = a.local
        elif hasattr(a, "numpy"):
            import torch

            a = (a.view(torch.uint16) if a.dtype == torch.bfloat16 else a).numpy()
        return a if n is None else a[:, :n]

    @staticmethod
    def _bf16(block: Any) -> bool:
        a = block.buf if isinstance(block, PeerBlock) else _rows(block)[0]
        return str(getattr(a, "dtype", None)) in ("bfloat16", "torch.bfloat16")

    def state(self, B: int, S: int, H: int, D: int) -> AttnState:
        return AttnState.empty(B, S, H, D, xp=np, dtype=np.float64)

    def prepare(self, q: Sequence[Any], k: Sequence[Any], v: Sequence[Any], state: AttnState, scale: float,
                init: bool, finalize: bool, out: Sequence[Any] | None = None) -> Callable[[Any], None]:
        if is_fp8(q[0]):
            return self._prepare_fp8(q, k, v, state, scale, init, finalize, out)
        bf16 = self._bf16(q[0])
        q, k, v = ([self.view(b) for b in x] for x in (q, k, v))
        out = None if out is None else [self.view(b) for b in out]
        if not bf16:
            def run(stream: Any = None) -> None:
                reference.attn_blocks(q, k, v, state, scale, init=init, finalize=finalize, out=out)
            return run

        def run_bf16(stream: Any = None) -> None:  # numpy has no bfloat16: the heap holds its bits
            qf, kf, vf = ([_bf16_to_f64(b) for b in x] for x in (q, k, v))
            of = None if out is None else [np.empty(b.shape) for b in out]
            reference.attn_blocks(qf, kf, vf, state, scale, init=init, finalize=finalize, out=of)
            for b, o in zip(out or (), of or ()):
                b[...] = _f64_to_bf16(o)
        return run_bf16

    def _prepare_fp8(self, q, k, v, state, scale, init, finalize, out):
        """FP8 blocks: the float64 emulation of the FP8 kernel (:mod:`sfattn.quant`), per launch."""
        from .kernels.flash_fp8 import fp8_tile
        from .quant import attn_blocks_fp8_emulated

        qs, kvs = fp8_blocks(q, k, v, lambda a, shape: a.local[tuple(slice(0, n) for n in shape)])
        tile = fp8_tile(kvs)  # the GPU kernel's tiles for these blocks
        bf16 = None if out is None else self._bf16(out[0])
        outs = None if out is None else [self.view(b) for b in out]

        def run(stream: Any = None) -> None:
            o = attn_blocks_fp8_emulated(qs, kvs, state, scale, init=init, finalize=finalize, tile=tile)
            r0 = 0
            for x, ob in zip(qs, outs if finalize else ()):
                n = x.data.shape[1]
                ob[...] = _f64_to_bf16(o[:, r0:r0 + n]) if bf16 else o[:, r0:r0 + n]
                r0 += n
        return run


class GpuAttention:
    """The fused CUDA kernel (:mod:`sfattn.kernels`) on symmetric-heap views."""

    def __init__(self, device: int):
        import cupy

        self.xp = cupy
        self.device = device

    def state(self, B: int, S: int, H: int, D: int) -> AttnState:
        return AttnState.empty(B, S, H, D, xp=self.xp, dtype=self.xp.float32)

    def desc(self, block: Any):
        """A kernel descriptor of a (SymArray, rows) block (bf16 included) or a GPU array."""
        from .kernels import TensorDesc, as_desc

        if isinstance(block, PeerBlock):
            a = block.buf
            B, _, H, D = a.shape
            at = block.buf.peer_ptr(block.pe) + block.h0 * D * a.itemsize
            return TensorDesc(at, (B, block.rows, block.heads, D), strides_of(a.shape), _KERNEL_DTYPES[a.dtype],
                              self.device)
        a, n = _rows(block)
        if not hasattr(a, "rt"):
            return as_desc(a)
        return self._cut(a, tuple(a.shape) if n is None else (a.shape[0], n, *a.shape[2:]))

    def _cut(self, a: Any, shape: tuple) -> Any:
        """A kernel descriptor of the first ``shape`` elements of symmetric array ``a``."""
        from .kernels import TensorDesc

        return TensorDesc(a.ptr, tuple(shape), strides_of(a.shape), _KERNEL_DTYPES[a.dtype], self.device)

    def prepare(self, q, k, v, state, scale, init, finalize, out=None, dependent: bool = False):
        """As :meth:`HostAttention.prepare`; ``dependent``: launch as a programmatic dependent launch
        where the kernel allows it (:meth:`sfattn.kernels.AttnLaunch.__call__`)."""
        from .kernels import AttnLaunch

        if is_fp8(q[0]):
            from .kernels.flash_fp8 import Fp8Launch

            qs, kvs = fp8_blocks(q, k, v, self._cut)
            launch = Fp8Launch(qs, kvs, state, scale, out=None if out is None else [self.desc(x) for x in out],
                               init=init, finalize=finalize)
        else:
            launch = AttnLaunch([self.desc(x) for x in q], [self.desc(x) for x in k], [self.desc(x) for x in v],
                                state, scale, out=None if out is None else [self.desc(x) for x in out],
                                init=init, finalize=finalize)

        def run(stream: Any = None) -> None:
            launch(init=init, finalize=finalize, stream=stream, dependent=dependent)
        return run

    def direct(self, q: Any, k: Any, v: Any, out: Any, scale: float, stream: Any, fp8: bool = False,
               pv: str = "e4m3") -> None:
        """Plain attention of the caller's BSHD tensors into ``out`` (one rank: no heap, no state;
        ``fp8``: quantised first, the FP8 kernel, ``pv`` as for :func:`sfattn.quant.quantize_kv`).
        Raises ValueError where the kernel cannot read them (head dim, alignment, strides)."""
        from .kernels import attn_blocks

        if fp8:
            from .kernels.flash_fp8 import attn_blocks_fp8
            from .quant import quantize_kv, quantize_q

            q, k, v, out = (as_torch(x, self.device) for x in (q, k, v, out))
            attn_blocks_fp8([quantize_q(q)], [quantize_kv(k, v, pv=pv)], None, scale, init=True, finalize=True,
                            out=[out], stream=stream)
            return
        attn_blocks([q], [k], [v], None, scale, init=True, finalize=True, out=[out], stream=stream)


class TorchAttention:
    """torch's own attention as the local kernel: SDPA returning the log-sum-exp (cuDNN on GPUs,
    the flash CPU kernel on CPUs), merged into the running state with torch ops.

    The peer comparisons use it to run sfattn with the same local kernel as torch-based
    baselines; it is slower than the fused kernel (one SDPA call per group of adjacent blocks,
    merges in torch ops between them).
    """

    def __init__(self, device: Any):
        import torch

        self.torch, self.device = torch, torch.device(device)
        self.xp = torch
        self._streams: dict[int, Any] = {}

    def state(self, B: int, S: int, H: int, D: int) -> AttnState:
        t = self.torch
        dt = t.float32 if self.device.type == "cuda" else t.float64
        return AttnState(t.empty(B, S, H, D, dtype=dt, device=self.device), t.empty(B, H, S, dtype=dt, device=self.device),
                         t.empty(B, H, S, dtype=dt, device=self.device))

    @staticmethod
    def view(block: Any):
        a, n = _rows(block)
        a = a.torch() if hasattr(a, "rt") else a
        return a if n is None else a[:, :n]

    def _on(self, stream: Any):
        """Context that makes the raw stream handle ``stream`` torch's current stream.

        Handle 0 is the legacy default stream: torch's own default stream, *not*
        ``ExternalStream(0)`` (torch turns that into a different stream, so the ops would race
        the communication enqueued on stream 0).  Stream objects are made once per handle.
        """
        t = self.torch
        if stream is None or self.device.type != "cuda" or \
                stream == t.cuda.current_stream(self.device).cuda_stream:
            return _nullcontext()
        s = self._streams.get(stream)
        if s is None:
            s = t.cuda.default_stream(self.device) if stream == 0 else \
                t.cuda.ExternalStream(stream, device=self.device)
            self._streams[stream] = s
        return t.cuda.stream(s)

    def direct(self, q: Any, k: Any, v: Any, out: Any, scale: float, stream: Any) -> None:
        """Plain attention of the caller's BSHD tensors into ``out`` (one rank: no heap, no state)."""
        with self._on(stream):
            o, _ = self._sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, lse=False)
            out.copy_(o.transpose(1, 2))

    def _sdpa(self, q, k, v, scale: float, lse: bool = True):
        """(o [B, H, Sq, D], lse [B, H, Sq] or None) of BHSD inputs."""
        aten = self.torch.ops.aten
        if q.device.type == "cuda":
            o, l = aten._scaled_dot_product_cudnn_attention(q, k, v, None, lse, 0.0, False, False, scale=scale)[:2]
        else:
            o, l = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return o, (l.reshape(q.shape[:3]) if lse else None)

    @staticmethod
    def _join(blocks: Sequence[Any]) -> Any:
        """One torch view over heap blocks that lie back to back along the sequence (the U blocks
        of a Ulysses buffer when B == 1 and all but the last are whole), else None: one SDPA call
        instead of one per block, and no merges between them."""
        views = []
        for b in blocks:
            a, n = _rows(b)
            if not hasattr(a, "rt") or a.ndim != 4:
                return None
            if n is not None and n != a.shape[1]:
                if a.shape[0] != 1:
                    return None
                a = a[:, :n]
            views.append(a)
        j = oneside_join(views, axis=1) if len(views) > 1 else None
        return None if j is None else j.torch()

    def prepare(self, q, k, v, state, scale, init, finalize, out=None):
        """One call: every Q block against every K/V block, chained through ``state``.

        Adjacent blocks are joined into one view (one SDPA call). With ``init`` and ``finalize``
        and a single (joined) K/V block the output is written straight from SDPA and the state
        is left untouched (the layer never reads it after a finalizing call); otherwise the first
        block of an ``init`` call sets the state and later blocks merge into it.
        """
        t = self.torch
        qs = [self.view(b) for b in q]
        nonempty = [(a, b) for a, b in zip(k, v) if (_rows(a)[1] is None or _rows(a)[1] > 0)]
        kvs = [(self.view(a), self.view(b)) for a, b in nonempty]
        outs = None if out is None else [self.view(b) for b in out]
        qj = self._join(q)
        oj = None if out is None else self._join(out)
        if qj is not None and (out is None or oj is not None):
            qs, outs = [qj], (None if out is None else [oj])
        kj, vj = self._join([a for a, _ in nonempty]), self._join([b for _, b in nonempty])
        if kj is not None and vj is not None:
            kvs = [(kj, vj)]
        kvh = [(a.transpose(1, 2), b.transpose(1, 2)) for a, b in kvs]
        rows, r0 = [], 0
        for x in qs:
            rows.append(slice(r0, r0 + x.shape[1]))
            r0 += x.shape[1]
        direct = init and finalize and len(kvh) == 1

        def run(stream: Any = None) -> None:
            with self._on(stream):
                for i, (x, rs) in enumerate(zip(qs, rows)):
                    qh = x.transpose(1, 2)
                    if direct:  # the whole attention of these rows in one SDPA call
                        if x.shape[1]:
                            o, _ = self._sdpa(qh, *kvh[0], scale, lse=False)
                            outs[i].copy_(o.transpose(1, 2))
                        continue
                    acc, m, l = state.acc[:, rs], state.m[:, :, rs], state.l[:, :, rs]
                    if init and (not kvh or x.shape[1] == 0):
                        acc.zero_()
                        m.fill_(-float("inf"))
                        l.zero_()
                    if x.shape[1] == 0:
                        continue
                    for j, (kb, vb) in enumerate(kvh):
                        o, lse = self._sdpa(qh, kb, vb, scale)
                        o = o.transpose(1, 2)
                        if init and j == 0:  # the first block sets the state
                            acc.copy_(o)
                            m.copy_(lse)
                            l.fill_(1.0)
                            continue
                        lse = lse.to(m.dtype)
                        new = t.maximum(m, lse)
                        a1 = t.where(t.isinf(new) & (new < 0), t.ones_like(m), t.exp(m - new))
                        a2 = t.exp(lse - new)
                        l.mul_(a1).add_(a2)
                        acc.mul_(a1.transpose(1, 2)[..., None]).addcmul_(o, a2.transpose(1, 2)[..., None])
                        m.copy_(new)
                if finalize and not direct:
                    for rs, ob in zip(rows, outs):
                        l = state.l[:, :, rs]
                        inv = t.where(l > 0, 1.0 / t.where(l > 0, l, t.ones_like(l)), t.zeros_like(l))
                        ob.copy_(state.acc[:, rs] * inv.transpose(1, 2)[..., None])
        return run


def fa3_forward() -> Callable[..., Any] | None:
    """FlashAttention-3's forward ``(q, k, v, softmax_scale=, causal=) -> (o, lse, ...)`` on BSHD
    tensors (the ``fa3_fwd`` package), or None where it does not import."""
    try:
        from fa3_fwd_interface import _flash_attn_forward
    except Exception:  # noqa: BLE001 - absent, or built for another torch/CUDA
        return None
    return _flash_attn_forward


class FA3Attention(TorchAttention):
    """FlashAttention-3 (Hopper, bf16) as the local kernel, returning its log-sum-exp, merged into
    the running state like the torch path: the local kernel xDiT/yunchang users run on Hopper,
    for side-by-side comparisons and for users who have it."""

    def __init__(self, device: Any, dtype: str):
        fwd = fa3_forward()
        if fwd is None:
            raise ValueError("local='fa3' needs FlashAttention-3's forward (the fa3_fwd package, "
                             "'from fa3_fwd_interface import flash_attn_func') on a Hopper GPU; it "
                             "does not import here")
        super().__init__(device)
        if self.device.type != "cuda" or self.torch.cuda.get_device_capability(self.device)[0] != 9:
            raise ValueError(f"local='fa3' runs on Hopper GPUs (sm_90); the layer's device is "
                             f"{self.device}")
        if dtype != "bfloat16":
            raise ValueError(f"local='fa3' takes bfloat16 layers (the fa3_fwd build has no fp16), "
                             f"got dtype {dtype!r}")
        self._fwd = fwd

    def _sdpa(self, q, k, v, scale: float, lse: bool = True):
        """(o [B, H, Sq, D], lse [B, H, Sq]) of BHSD views (FA3 takes the BSHD tensors beneath)."""
        o, l = self._fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                         softmax_scale=scale, causal=False)[:2]
        return o.transpose(1, 2), (l if lse else None)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
