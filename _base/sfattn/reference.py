"""Reference (numpy, CPU) implementation of the multi-block attention contract.

Layouts follow the kernels exactly:

* q / k / v / out blocks: ``[B, S, H, D]`` (BSHD), arbitrary strides (views of bigger buffers).
* running state (:class:`AttnState`): ``acc [B, S, H, D]`` (unnormalised output accumulator),
  ``m [B, H, S]`` (running row max of the scaled logits, natural-log units) and
  ``l [B, H, S]`` (running row sum of ``exp(logit - m)``).  State rows are the concatenation of
  the q blocks, in order.

Everything here computes in float64; it is the ground truth that the CUDA kernels in
:mod:`sfattn.kernels` are tested against, and it runs anywhere numpy does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["AttnState", "attn_blocks", "merge", "attention_ref", "check_blocks"]


@dataclass
class AttnState:
    """Running online-softmax state for a set of Q rows, chained across calls.

    acc: ``[B, S, H, D]`` unnormalised output accumulator (float32; float64 allowed here).
    m:   ``[B, H, S]`` running row max of the scaled logits (natural-log units).
    l:   ``[B, H, S]`` running row sum of ``exp(logit - m)``.
    """

    acc: Any
    m: Any
    l: Any

    @staticmethod
    def empty(B: int, S: int, H: int, D: int, xp: Any = np, dtype: Any = np.float32) -> "AttnState":
        """Allocate an uninitialised state (use ``init=True`` on the first call)."""
        return AttnState(xp.empty((B, S, H, D), dtype=dtype), xp.empty((B, H, S), dtype=dtype),
                         xp.empty((B, H, S), dtype=dtype))

    @property
    def shape(self) -> tuple:
        """``(B, S, H, D)`` of the accumulator."""
        return tuple(self.acc.shape)


def _shape(x: Any) -> tuple:
    return tuple(int(s) for s in x.shape)


def check_blocks(q_blocks: Sequence[Any], k_blocks: Sequence[Any], v_blocks: Sequence[Any],
                 state: AttnState | None, *, init: bool, finalize: bool,
                 out: Sequence[Any] | None, lse: Any | None) -> tuple[int, int, int, int]:
    """Validate the arguments of ``attn_blocks``; return ``(B, S_total, H, D)``.

    Raises ``TypeError``/``ValueError`` naming the offending argument.
    """
    if isinstance(q_blocks, (str, bytes)) or not isinstance(q_blocks, (list, tuple)):
        raise TypeError("q_blocks must be a list of [B, S, H, D] arrays")
    for name, blocks in (("k_blocks", k_blocks), ("v_blocks", v_blocks)):
        if not isinstance(blocks, (list, tuple)):
            raise TypeError(f"{name} must be a list of [B, S, H, D] arrays")
    if len(k_blocks) != len(v_blocks):
        raise ValueError(f"k_blocks and v_blocks must have the same length "
                         f"(got {len(k_blocks)} and {len(v_blocks)})")
    if len(q_blocks) == 0:
        raise ValueError("q_blocks must hold at least one block")
    ref = None
    for name, blocks in (("q_blocks", q_blocks), ("k_blocks", k_blocks), ("v_blocks", v_blocks)):
        for i, x in enumerate(blocks):
            if not hasattr(x, "shape") or len(x.shape) != 4:
                raise ValueError(f"{name}[{i}] must be a 4-D [B, S, H, D] array, got "
                                 f"{getattr(x, 'shape', type(x))}")
            B, S, H, D = _shape(x)
            if ref is None:
                ref = (B, H, D, name, i)
            elif (B, H, D) != ref[:3]:
                raise ValueError(f"{name}[{i}] has B, H, D = {(B, H, D)} but {ref[3]}[{ref[4]}] "
                                 f"has {ref[:3]}")
    B, H, D = ref[:3]
    for i, (k, v) in enumerate(zip(k_blocks, v_blocks)):
        if _shape(k)[1] != _shape(v)[1]:
            raise ValueError(f"k_blocks[{i}] and v_blocks[{i}] have different lengths "
                             f"({_shape(k)[1]} and {_shape(v)[1]})")
    S = sum(_shape(q)[1] for q in q_blocks)
    if state is None:
        if not (init and finalize):
            raise ValueError("state may be None only with init=True and finalize=True")
    else:
        if _shape(state.acc) != (B, S, H, D):
            raise ValueError(f"state.acc has shape {_shape(state.acc)}, expected {(B, S, H, D)} "
                             f"(B, sum of q block lengths, H, D)")
        for nm in ("m", "l"):
            if _shape(getattr(state, nm)) != (B, H, S):
                raise ValueError(f"state.{nm} has shape {_shape(getattr(state, nm))}, "
                                 f"expected {(B, H, S)}")
    if finalize:
        if out is None:
            raise ValueError("finalize=True needs out (a list of arrays shaped like q_blocks)")
        if not isinstance(out, (list, tuple)) or len(out) != len(q_blocks):
            raise ValueError(f"out must be a list of {len(q_blocks)} arrays, one per q block")
        for i, (o, q) in enumerate(zip(out, q_blocks)):
            if not hasattr(o, "shape") or _shape(o) != _shape(q):
                raise ValueError(f"out[{i}] has shape {getattr(o, 'shape', type(o))}, "
                                 f"expected {_shape(q)}")
        if lse is not None and _shape(lse) != (B, H, S):
            raise ValueError(f"lse has shape {_shape(lse)}, expected {(B, H, S)}")
    return B, S, H, D


def _rescale(m_old: np.ndarray, m_new: np.ndarray) -> np.ndarray:
    """``exp(m_old - m_new)`` with the ``-inf - -inf`` case mapped to 1 (nothing to rescale)."""
    with np.errstate(invalid="ignore", over="ignore"):
        a = np.exp(m_old - m_new)
    return np.where(np.isneginf(m_new), 1.0, a)


def attn_blocks(q_blocks: Sequence[np.ndarray], k_blocks: Sequence[np.ndarray],
                v_blocks: Sequence[np.ndarray], state: AttnState | None, scale: float, *,
                init: bool = False, finalize: bool = False,
                out: Sequence[np.ndarray] | None = None, lse: np.ndarray | None = None) -> None:
    """Attend every q block to every k/v block, updating ``state`` in place (float64 math).

    ``init=True`` starts every row at ``(acc=0, m=-inf, l=0)`` ignoring the state's contents;
    otherwise the state is loaded, so calls chain.  ``finalize=True`` writes ``acc / l`` into
    ``out`` (one array per q block, in its own dtype) and ``m + log(l)`` into ``lse`` if given;
    rows that never saw a key give 0 and ``-inf``.  ``state`` may be None when both ``init``
    and ``finalize`` are set (plain attention).
    """
    B, S, H, D = check_blocks(q_blocks, k_blocks, v_blocks, state, init=init, finalize=finalize,
                              out=out, lse=lse)
    if init or state is None:
        acc = np.zeros((B, S, H, D))
        m = np.full((B, H, S), -np.inf)
        l = np.zeros((B, H, S))
    else:
        acc = np.asarray(state.acc, dtype=np.float64).copy()
        m = np.asarray(state.m, dtype=np.float64).copy()
        l = np.asarray(state.l, dtype=np.float64).copy()
    ks = [np.asarray(k, dtype=np.float64) for k in k_blocks]
    vs = [np.asarray(v, dtype=np.float64) for v in v_blocks]
    r0 = 0
    for q in q_blocks:
        sq = _shape(q)[1]
        rows = slice(r0, r0 + sq)
        r0 += sq
        if sq == 0:
            continue
        qd = np.asarray(q, dtype=np.float64)
        a, mm, ll = acc[:, rows], m[:, :, rows], l[:, :, rows]
        for k, v in zip(ks, vs):
            if k.shape[1] == 0:
                continue
            s = np.einsum("bqhd,bkhd->bhqk", qd, k) * float(scale)
            m_new = np.maximum(mm, s.max(axis=-1))
            alpha = _rescale(mm, m_new)
            p = np.exp(s - m_new[..., None])
            ll = ll * alpha + p.sum(axis=-1)
            a = a * alpha.transpose(0, 2, 1)[..., None] + np.einsum("bhqk,bkhd->bqhd", p, v)
            mm = m_new
        acc[:, rows], m[:, :, rows], l[:, :, rows] = a, mm, ll
    if state is not None:
        state.acc[...] = acc
        state.m[...] = m
        state.l[...] = l
    if finalize:
        empty = l == 0
        inv = np.where(empty, 0.0, 1.0 / np.where(empty, 1.0, l))
        o = acc * inv.transpose(0, 2, 1)[..., None]
        r0 = 0
        for q, ob in zip(q_blocks, out):
            sq = _shape(q)[1]
            ob[...] = o[:, r0:r0 + sq].astype(ob.dtype)
            r0 += sq
        if lse is not None:
            with np.errstate(divide="ignore"):
                lse[...] = np.where(empty, -np.inf, m + np.log(np.where(empty, 1.0, l)))


def merge(o1: np.ndarray, lse1: np.ndarray, o2: np.ndarray, lse2: np.ndarray,
          out: np.ndarray | None = None, lse_out: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """Combine two normalised partial results ``(o [B,S,H,D], lse [B,H,S])`` by log-sum-exp.

    ``lse = log(e^lse1 + e^lse2)``; ``o = o1 e^(lse1-lse) + o2 e^(lse2-lse)``; rows with both
    lse = -inf give 0 and -inf.  Writes into ``out`` / ``lse_out`` if given (may alias inputs).
    """
    for nm, o, ls in (("o1", o1, lse1), ("o2", o2, lse2)):
        if len(o.shape) != 4:
            raise ValueError(f"{nm} must be [B, S, H, D], got shape {tuple(o.shape)}")
        B, S, H, _ = o.shape
        if tuple(ls.shape) != (B, H, S):
            raise ValueError(f"lse of {nm} has shape {tuple(ls.shape)}, expected {(B, H, S)}")
    if tuple(o1.shape) != tuple(o2.shape):
        raise ValueError(f"o1 and o2 shapes differ: {tuple(o1.shape)} vs {tuple(o2.shape)}")
    a1 = np.asarray(lse1, dtype=np.float64)
    a2 = np.asarray(lse2, dtype=np.float64)
    mx = np.maximum(a1, a2)
    w1 = _rescale(a1, mx)
    w2 = _rescale(a2, mx)
    tot = w1 + w2
    dead = np.isneginf(mx)
    with np.errstate(divide="ignore"):
        lse = np.where(dead, -np.inf, mx + np.log(np.where(dead, 1.0, tot)))
    c1 = np.where(dead, 0.0, w1 / np.where(dead, 1.0, tot)).transpose(0, 2, 1)[..., None]
    c2 = np.where(dead, 0.0, w2 / np.where(dead, 1.0, tot)).transpose(0, 2, 1)[..., None]
    o = np.asarray(o1, dtype=np.float64) * c1 + np.asarray(o2, dtype=np.float64) * c2
    if out is None:
        out = np.empty(o1.shape, dtype=o1.dtype)
    if lse_out is None:
        lse_out = np.empty(lse1.shape, dtype=lse1.dtype)
    out[...] = o
    lse_out[...] = lse
    return out, lse_out


def attention_ref(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Plain full (non-causal) attention in float64, BSHD; returns ``(o [B,S,H,D], lse [B,H,S])``.

    Keys of length 0 give o = 0 and lse = -inf.
    """
    qd, kd, vd = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, Sq, H, D = qd.shape
    if kd.shape[1] == 0:
        return np.zeros((B, Sq, H, vd.shape[3])), np.full((B, H, Sq), -np.inf)
    s = np.einsum("bqhd,bkhd->bhqk", qd, kd) * float(scale)
    mx = s.max(axis=-1, keepdims=True)
    p = np.exp(s - mx)
    den = p.sum(axis=-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", p / den, vd)
    lse = (mx + np.log(den))[..., 0]
    return o, lse
