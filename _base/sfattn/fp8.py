"""The FP8 format study, in float64 (numpy): which operand formats and scales give which accuracy.

The kernel that was built from it (``sfattn/kernels/attn_sm90fp8.cu``) and the float64 emulation
of exactly what that kernel computes live in :mod:`sfattn.quant` (docs/fp8.md lists where the two
differ: one ``mu`` per K/V block, one V scale per block). This module keeps the study's
configurable reference (``qk=``, ``pv=``, ``smooth=``) and the benchmark's input generator.

Per layer call, on the rank that owns the tokens, before the Ulysses ScatterPush (every
quantity below travels with its data, so Ulysses, Torus and Ring move FP8 bytes):

* **blocks**: each rank's shard is cut into blocks of ``block`` tokens (the last one shorter);
  a block never spans two ranks, so a rank quantises only its own tokens.
* **Q**: e4m3 with one scale per (batch, head, block): ``absmax / 448``.
* **K**: smoothed per block - ``mu`` = the block's mean key (per batch, head) is subtracted
  before quantising (e4m3, one scale per batch, head, block) and travels with the block. The
  logits of a block are ``q . (k - mu) + q . mu``: the kernel adds the second term (a dot
  product per row and block, in fp32), so the result is exact for any ``mu``, and no rank has
  to agree on a global mean (subtracting one vector from every key leaves softmax unchanged
  only when every key of a row sees the same vector: per block it needs this correction).
  DiT keys carry large per-channel biases; without smoothing those set the scale and drown
  the per-token signal.
* **V**: e4m3 with one scale per (batch, head, block, channel): the P.V product of a block is
  scaled per output channel before it joins the accumulator.
* **P**: ``exp(s - m)`` lies in [0, 1] against the running row max ``m``: quantised as
  ``e4m3(448 p) / 448`` in registers; the row sum ``l`` adds the quantised values, so
  numerator and denominator see the same P.
* accumulation, running max, chaining and log-sum-exp: float32 on GPUs, as in bf16.

:func:`attention_fp8_ref` computes this; :func:`e4m3` is round-to-nearest-even onto the
float8 e4m3fn grid (448 max, saturating, subnormals to 2**-9), equal to torch's
``float8_e4m3fn`` conversion.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["E4M3_MAX", "FORMATS", "e4m3", "blocks_of", "attention_fp8_ref", "attention_fp8_unit_scale",
           "fp8_inputs", "relerr"]

E4M3_MAX = 448.0


def e4m3(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to the nearest float8 e4m3fn value (ties to even), saturating at +-448."""
    x = np.asarray(x, dtype=np.float64)
    a = np.minimum(np.abs(x), E4M3_MAX)
    e = np.floor(np.log2(np.maximum(a, 2.0 ** -6)))     # normals from 2**-6; below: the subnormal step
    step = 2.0 ** (e - 3)                                 # 3 mantissa bits
    r = np.round(a / step) * step                         # numpy rounds half to even
    return np.copysign(np.minimum(r, E4M3_MAX), x)


def blocks_of(lens: Sequence[int], block: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of every quantisation block: each shard cut into ``block`` tokens."""
    out, start = [], 0
    for n in lens:
        for b in range(start, start + n, block):
            out.append((b, min(b + block, start + n)))
        start += n
    return out


def _quant(x: np.ndarray, axes: tuple[int, ...], fmt: str) -> np.ndarray:
    """Dequantised ``x`` in ``fmt`` ('e4m3' or 'int8') with one absmax scale per slice reduced
    over ``axes``; 'bf16': rounded to bfloat16."""
    if fmt == "bf16":
        return _bf16(x)
    amax = np.abs(x).max(axis=axes, keepdims=True)
    top = E4M3_MAX if fmt == "e4m3" else 127.0
    scale = np.where(amax > 0, amax / top, 1.0)
    return (e4m3(x / scale) if fmt == "e4m3" else np.round(x / scale)) * scale


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest bfloat16 (ties to even), as float64."""
    b = np.asarray(x, np.float64).astype(np.float32).view(np.uint32)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.view(np.float32).astype(np.float64)


FORMATS = {"qk": ("e4m3", "int8"), "pv": ("e4m3", "bf16")}


def attention_fp8_ref(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float | None = None,
                      lens: Sequence[int] | None = None, block: int = 128, smooth: bool = True,
                      qk: str = "e4m3", pv: str = "e4m3") -> np.ndarray:
    """The FP8 contract (module docstring) for ``[B, S, H, D]`` inputs, in float64.

    ``lens``: the ranks' shard lengths (default: one shard); ``smooth=False`` drops the K
    smoothing (to show what it buys). ``qk``: Q and K in 'e4m3' or 'int8' (same bytes, same
    Hopper GEMM rate, 7 magnitude bits instead of 3 mantissa bits). ``pv``: 'e4m3' (P and V in
    e4m3, an FP8 P.V GEMM) or 'bf16' (V travels as int8 with per-channel scales, P and the
    dequantised V meet in a bf16 GEMM)."""
    if qk not in FORMATS["qk"] or pv not in FORMATS["pv"]:
        raise ValueError(f"qk={qk!r}, pv={pv!r}: expected qk in {FORMATS['qk']}, pv in {FORMATS['pv']}")
    B, S, H, D = q.shape
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    blocks = blocks_of([S] if lens is None else lens, block)
    qh, kh, vh = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (q, k, v))   # [B, H, S, D]
    qd = np.empty_like(qh)
    for a, b in blocks:
        qd[:, :, a:b] = _quant(qh[:, :, a:b], (2, 3), qk)
    m = np.full((B, H, S), -np.inf)
    lsum = np.zeros((B, H, S))
    acc = np.zeros((B, H, S, D))
    for a, b in blocks:                                   # the kernel's K/V loop, one block at a time
        kb, vb = kh[:, :, a:b], vh[:, :, a:b]
        mu = kb.mean(axis=2, keepdims=True) if smooth else np.zeros((B, H, 1, D))
        kd = _quant(kb - mu, (2, 3), qk)
        vd = _quant(vb, (2,), "e4m3" if pv == "e4m3" else "int8")   # per (batch, head, block, channel)
        if pv == "bf16":
            vd = _bf16(vd)
        s = (qd @ kd.transpose(0, 1, 3, 2) + qd @ mu.transpose(0, 1, 3, 2)) * scale   # [B, H, S, n]
        m_new = np.maximum(m, s.max(axis=3))
        alpha = np.exp(m - m_new)
        p = np.exp(s - m_new[..., None])
        p = e4m3(p * E4M3_MAX) / E4M3_MAX if pv == "e4m3" else _bf16(p)
        lsum = lsum * alpha + p.sum(axis=3)
        acc = acc * alpha[..., None] + p @ vd
        m = m_new
    return (acc / lsum[..., None]).transpose(0, 2, 1, 3)


def attention_fp8_unit_scale(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float | None = None) -> np.ndarray:
    """FP8 used plainly: Q, K, V cast to e4m3 with unit scales, P as in the contract (what a
    unit-scale FP8 kernel computes; the baseline the contract must beat)."""
    D = q.shape[-1]
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    qh, kh, vh = (e4m3(np.asarray(x, np.float64)).transpose(0, 2, 1, 3) for x in (q, k, v))
    s = qh @ kh.transpose(0, 1, 3, 2) * scale
    p = e4m3(np.exp(s - s.max(axis=3, keepdims=True)) * E4M3_MAX) / E4M3_MAX
    return ((p @ vh) / p.sum(axis=3)[..., None]).transpose(0, 2, 1, 3)


def fp8_inputs(kind: str, B: int, S: int, H: int, D: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Benchmark inputs: ``'gauss'`` (standard normal Q, K, V) or ``'outlier'`` (K with a
    per-channel bias of standard deviation 4 per head, as DiT keys have)."""
    if kind not in ("gauss", "outlier"):
        raise ValueError(f"kind={kind!r}: expected 'gauss' or 'outlier'")
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, S, H, D)) for _ in range(3))
    if kind == "outlier":
        k = k + 4.0 * rng.standard_normal((1, 1, H, D))
    return q, k, v


def relerr(x: np.ndarray, ref: np.ndarray) -> float:
    """``||x - ref|| / ||ref||`` (Frobenius)."""
    return float(np.linalg.norm(np.asarray(x, np.float64) - ref) / np.linalg.norm(ref))
