"""FP8 operands of ``precision="fp8"``: quantisers (torch, any device) and the float64 emulation
of what the FP8 kernel computes from them.

The rank that owns a block of tokens quantises it once (the module docstring of
:mod:`sfattn.fp8` gives the contract and its accuracy):

* :class:`Fp8Q` -- Q as int8, one scale per (batch, head, 128-row block).
* :class:`Fp8KV` -- K - mu as int8 (``mu``: the block's mean key per batch and head, fp32), one
  scale per (batch, head, 128-key block); V as e4m3, transposed to ``[B, H, D, Sp]`` (``Sp``: the
  keys rounded up to 32, zeros after them) with the keys of every 32-key group in the order
  :data:`V_PERM` (the order in which the kernel's P fragment meets them), one scale per (batch,
  head) - or, for ``precision="fp8-accurate"`` (``quantize_kv(..., pv="16")``), V as it is (bf16 or
  fp16 ``[B, S, H, D]``): P.V then runs in 16-bit, ~0.01 from exact attention instead of ~0.04.

These are plain tensors, so every transfer of the algorithms can move them as bytes.
:func:`attention_fp8_emulated` is the float64 ground truth of the kernel for given operands (the
same 128-key tiles, running max, P rounding and scales), used by the GPU tests and by the host
backend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .reference import AttnState

__all__ = ["BLOCK", "V_PERM", "Fp8Q", "Fp8KV", "quantize_q", "quantize_kv", "attention_fp8_emulated",
           "attn_blocks_fp8_emulated"]

BLOCK = 128          # rows / keys per scale block (the kernel's K/V tile)
E4M3_MAX = 448.0


def _v_perm() -> np.ndarray:
    """Key of a 32-key group held by column ``a`` of the P fragment: a k32 wgmma A fragment gives
    thread t columns 4t..4t+3 (and 16 + those) of a row, which the S accumulator holds as keys
    2t, 2t+1, 8+2t, 9+2t (and 16 + those)."""
    a = np.arange(32)
    return (a & 16) + 2 * ((a >> 2) & 3) + (a & 1) + 8 * ((a >> 1) & 1)


V_PERM = _v_perm()


@dataclass
class Fp8Q:
    """A quantised Q block: ``data`` int8 ``[B, S, H, D]``, ``scale`` fp32 ``[B, H, ceil(S / 128)]``."""
    data: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.data.shape)


@dataclass
class Fp8KV:
    """A quantised K/V block of ``len`` keys: ``k`` int8 ``[B, S, H, D]`` (K - mu), ``kscale`` fp32
    ``[B, H, ceil(S / 128)]``, ``mu`` fp32 ``[B, H, D]``, ``vt`` float8_e4m3fn ``[B, H, D, Sp]``
    (V transposed, keys permuted per 32-key group by :data:`V_PERM`), ``vscale`` fp32 ``[B, H]`` -
    or ``vt`` and ``vscale`` None and ``v`` V itself, 16-bit ``[B, S, H, D]`` (P.V in 16-bit)."""
    k: torch.Tensor
    kscale: torch.Tensor
    mu: torch.Tensor
    vt: torch.Tensor | None
    vscale: torch.Tensor | None
    v: torch.Tensor | None = None

    @property
    def len(self) -> int:
        return int(self.k.shape[1])


def _check(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D [B, S, H, D] torch tensor, got "
                         f"{getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")


def _block_scales(x: torch.Tensor, top: float) -> torch.Tensor:
    """fp32 ``[B, H, nblocks]``: per 128-token block absmax / top (1 where the block is zero)."""
    B, S, H, D = x.shape
    nb = -(-S // BLOCK)
    xp = torch.nn.functional.pad(x.float().abs(), (0, 0, 0, 0, 0, nb * BLOCK - S))
    amax = xp.view(B, nb, BLOCK, H, D).amax(dim=(2, 4)).transpose(1, 2)
    return torch.where(amax > 0, amax / top, torch.ones_like(amax)).contiguous()


def _int8_blocks(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    s = scale.transpose(1, 2).repeat_interleave(BLOCK, dim=1)[:, :x.shape[1], :, None]
    return torch.round(x.float() / s).clamp_(-127, 127).to(torch.int8)


def _fused(fused: bool | None, *xs: torch.Tensor) -> bool:
    """Whether the fused quantisers (sfattn/kernels/quant.cu) run: by default for CUDA bf16/fp16
    inputs; ``fused=True`` for other inputs is an error."""
    able = xs[0].is_cuda
    if able:
        from .kernels.flash_fp8 import cuda_quantizable
        able = cuda_quantizable(*xs)
    if fused and not able:
        raise ValueError("fused=True: the fused quantisers take CUDA bf16/fp16 [B, S, H, D] tensors with a "
                         f"contiguous head dim (a multiple of 4, <= 256); got {xs[0].dtype} on {xs[0].device}")
    return able if fused is None else bool(fused)


def quantize_q(q: torch.Tensor, *, fused: bool | None = None) -> Fp8Q:
    """``q`` ``[B, S, H, D]`` (any float dtype, any device) -> :class:`Fp8Q`. ``fused``: the CUDA
    kernels (default where they apply: CUDA bf16/fp16) or these torch operations."""
    _check(q, "q")
    if _fused(fused, q):
        from .kernels.flash_fp8 import quantize_q_cuda
        return quantize_q_cuda(q)
    scale = _block_scales(q, 127.0)
    return Fp8Q(_int8_blocks(q, scale), scale)


def quantize_kv(k: torch.Tensor, v: torch.Tensor, *, fused: bool | None = None, pv: str = "e4m3") -> Fp8KV:
    """``k``, ``v`` ``[B, S, H, D]`` of one block -> :class:`Fp8KV` (smoothed K; ``pv='e4m3'``: V
    transposed to e4m3, ``pv='16'``: V kept as it is, for a 16-bit P.V). ``fused`` as for
    :func:`quantize_q`."""
    _check(k, "k")
    _check(v, "v")
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if pv not in ("e4m3", "16"):
        raise ValueError(f"pv={pv!r}: expected 'e4m3' (P.V in FP8) or '16' (P.V in V's 16-bit dtype)")
    if _fused(fused, k, v):
        from .kernels.flash_fp8 import quantize_kv_cuda
        return quantize_kv_cuda(k, v, pv)
    B, S, H, D = k.shape
    mu = k.float().mean(dim=1) if S else k.new_zeros((B, H, D), dtype=torch.float32)   # [B, H, D]
    kc = k.float() - mu[:, None]
    kscale = _block_scales(kc, 127.0)
    if pv == "16":
        return Fp8KV(_int8_blocks(kc, kscale), kscale, mu.contiguous(), None, None, v=v)
    sp = -(-S // 32) * 32
    vp = torch.nn.functional.pad(v.float(), (0, 0, 0, 0, 0, sp - S))
    perm = torch.as_tensor(V_PERM, device=v.device)
    vp = vp.view(B, sp // 32, 32, H, D)[:, :, perm]              # group g, column a <- key 32g + perm[a]
    vt = vp.permute(0, 3, 4, 1, 2).reshape(B, H, D, sp)
    amax = vt.abs().amax(dim=(2, 3)) if sp else vt.new_zeros((B, H))
    vscale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)).contiguous()
    vt8 = (vt / vscale[:, :, None, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return Fp8KV(_int8_blocks(kc, kscale), kscale, mu.contiguous(), vt8.contiguous(), vscale)


def _e4m3(x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.clip(x, -E4M3_MAX, E4M3_MAX).astype(np.float32))
    return t.to(torch.float8_e4m3fn).to(torch.float64).numpy()


_TORCH_OF_NP = {"u2": torch.bfloat16, "f2": torch.float16, "f4": torch.float32, "f8": torch.float64}
_E4M3_OF_BYTE = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float64).numpy()


def _f64(x: Any) -> np.ndarray:
    """float64 numpy copy of an operand: a torch tensor (any device; float8 e4m3 decoded) or a numpy
    array (``uint8`` holds e4m3 bytes, as the host backend's heap stores them)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    x = np.asarray(x)
    if x.dtype == np.uint16:  # bfloat16 bits (numpy has no bfloat16)
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).to(torch.float64).numpy()
    return _E4M3_OF_BYTE[x] if x.dtype == np.uint8 else x.astype(np.float64)


def attn_blocks_fp8_emulated(qs: Sequence[Fp8Q], kvs: Sequence[Fp8KV], state: AttnState | None,
                             scale: float, *, init: bool = False, finalize: bool = False,
                             out: Sequence[Any] | None = None, tile: int = BLOCK,
                             rounded_sum: bool = True) -> np.ndarray | None:
    """What one FP8 kernel launch computes, in float64 (the state is float64 numpy): Q blocks ``qs``
    (concatenated rows) against K/V blocks ``kvs`` in order, ``tile``-key tiles (the kernel's BN), logits
    ``q_d . (k_d + mu)``, the running max raised every tile, P rounded to e4m3 after scaling by
    ``448 vscale / max(vscale over this launch's blocks)``, the row sum of P as rounded (the kernel
    sums P in the P.V GEMM, its default; ``rounded_sum=False``: of unrounded P, knob ``LS=0``), P.V
    with the dequantised V (blocks with a 16-bit ``v``: P rounded to V's dtype, P.V with V as it is,
    the sum of unrounded P; a launch holds one kind). ``init``/``finalize``/``state``/``out`` as for
    :func:`sfattn.reference.attn_blocks` (operands may be torch tensors or numpy arrays; ``out`` arrays get ``acc / l``, 0 for rows that saw
    no key); returns the normalised float64 output ``[B, S_q, H, D]`` when ``finalize``."""
    q = np.concatenate([_f64(x.data) * _rows(x.scale, x.data.shape[1]) for x in qs], axis=1)
    B, S, H, D = q.shape
    qh = q.transpose(0, 2, 1, 3)                                  # [B, H, S, D]
    if init or state is None:
        m, lsum, acc = np.full((B, H, S), -np.inf), np.zeros((B, H, S)), np.zeros((B, H, S, D))
    else:
        m, lsum = _f64(state.m), _f64(state.l)
        acc = _f64(state.acc).transpose(0, 2, 1, 3)
    live = [kv for kv in kvs if kv.k.shape[1] > 0]
    if len({kv.v is None for kv in live}) > 1:
        raise ValueError("kvs: every K/V block of a launch has V in e4m3 (vt) or every one a 16-bit v")
    vmax = np.max([_f64(kv.vscale) for kv in live], axis=0) if live and live[0].v is None else None  # [B, H]
    inv = np.argsort(V_PERM)
    for kv in live:
        n = kv.k.shape[1]
        kd = (_f64(kv.k) * _rows(kv.kscale, n)).transpose(0, 2, 1, 3) + _f64(kv.mu)[:, :, None, :]
        if kv.v is not None:  # P rounded to V's dtype (the kernel packs it so), V as it is
            vd = _f64(kv.v).transpose(0, 2, 1, 3)[:, :, :n]
            vdt = kv.v.dtype if isinstance(kv.v, torch.Tensor) else _TORCH_OF_NP[np.asarray(kv.v).dtype.str[1:]]

            def rnd(p: np.ndarray, vdt=vdt) -> np.ndarray:
                return torch.from_numpy(p).to(vdt).to(torch.float64).numpy()
        else:
            vs = _f64(kv.vscale)
            vt = _f64(kv.vt)                                          # [B, H, D, Sp]
            sp = vt.shape[-1]
            vt = vt.reshape(B, H, D, sp // 32, 32)[..., inv].reshape(B, H, D, sp)   # keys in order
            vd = vt.transpose(0, 1, 3, 2)[:, :, :n] * vs[:, :, None, None]
            ps = (E4M3_MAX * vs / vmax)[:, :, None, None]

            def rnd(p: np.ndarray, ps=ps) -> np.ndarray:
                return _e4m3(p * ps) / ps
        for a in range(0, n, tile):
            b = min(a + tile, n)
            s = qh @ kd[:, :, a:b].transpose(0, 1, 3, 2) * scale
            m_new = np.maximum(m, s.max(axis=3))
            alpha = np.where(np.isneginf(m_new), 1.0, np.exp(m - np.where(np.isneginf(m_new), 0.0, m_new)))
            p = np.exp(s - m_new[..., None])
            pr = rnd(p)
            lsum = lsum * alpha + (pr if rounded_sum and kv.v is None else p).sum(axis=3)
            acc = acc * alpha[..., None] + pr @ vd[:, :, a:b]
            m = m_new
    if state is not None:
        state.acc[...] = acc.transpose(0, 2, 1, 3)
        state.m[...] = m
        state.l[...] = lsum
    if not finalize:
        return None
    empty = lsum == 0
    o = (acc * np.where(empty, 0.0, 1.0 / np.where(empty, 1.0, lsum))[..., None]).transpose(0, 2, 1, 3)
    r0 = 0
    for x, ob in zip(qs, out or ()):
        n = x.data.shape[1]
        ob[...] = o[:, r0:r0 + n]
        r0 += n
    return o


def attention_fp8_emulated(qs: Sequence[Fp8Q], kvs: Sequence[Fp8KV], scale: float | None = None,
                           tile: int = BLOCK, rounded_sum: bool = True) -> np.ndarray:
    """float64 ``[B, S_q, H, D]``: what the FP8 kernel with ``tile``-key tiles computes for Q blocks
    ``qs`` (concatenated) against K/V blocks ``kvs`` in one launch (:func:`attn_blocks_fp8_emulated`)."""
    scale = 1.0 / math.sqrt(qs[0].data.shape[3]) if scale is None else scale
    return attn_blocks_fp8_emulated(qs, kvs, None, scale, init=True, finalize=True, tile=tile,
                                    rounded_sum=rounded_sum)


def _rows(scale: Any, n: int) -> np.ndarray:
    """``[B, n, H, 1]`` per-row scales from per-block ``[B, H, nblocks]``."""
    s = _f64(scale).transpose(0, 2, 1)                            # [B, nb, H]
    return np.repeat(s, BLOCK, axis=1)[:, :n, :, None]
