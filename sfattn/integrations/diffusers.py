"""Sequence parallelism for diffusers' Flux and Wan transformers, with sfattn attention.

    import oneside
    from sfattn.integrations.diffusers import SequenceParallel

    rt = oneside.init()
    sp = SequenceParallel(rt)                 # algorithm=None: the planner's choice
    sp.apply_flux(transformer)                # every attention module uses sfattn
    out = sp.gather(transformer(hidden_states=sp.shard(latents), img_ids=sp.shard(img_ids, dim=0),
                                encoder_hidden_states=text, txt_ids=txt_ids, ...).sample)

For Wan (video), ``sp.apply_wan(transformer)`` is all it takes: the model is called with the
whole latents as usual and returns the whole output; hooks split the video tokens (and their
RoPE frequencies) along the sequence before the first block and all-gather them after the
last. Self-attention runs on sfattn; cross-attention to the text needs no communication (each
rank's video queries against the whole, replicated text).

For Flux, the image tokens are split along the sequence (each rank holds ``N / world`` consecutive
tokens and their position ids, so RoPE stays exact). The text tokens are **replicated**: every
rank keeps the whole prompt, as the model's MLPs and modulation need it. Inside attention the
joint sequence is ``text + image``; each rank contributes its 1/world slice of the text rows
and its image rows to the sequence-parallel attention (so every text key counts once), and
the text outputs are all-gathered afterwards, so every rank again holds the whole text.

``torch.compile`` (``fullgraph=True`` included): the joint attention and the all-gather are
two opaque ``torch.library`` ops (``sfattn::sp_joint_attention``, ``sfattn::sp_gather``) with
fake implementations, so a compiled transformer has no graph break and no rank communication
in traced Python; the layers and heap buffers are made inside them, on first use.
"""
from __future__ import annotations

from typing import Any

import torch

import oneside

from ..layer import SPAttention
from ..op import attention, release
from ..plan import make_plan


_INSTANCES: dict[int, "SequenceParallel"] = {}


def _instance(handle: int) -> "SequenceParallel":
    sp = _INSTANCES.get(handle)
    if sp is None:
        raise ValueError(f"sfattn sequence parallelism: no SequenceParallel with handle {handle} (closed?)")
    return sp


@torch.library.custom_op("sfattn::sp_joint_attention", mutates_args=())
def _joint_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int,
                        text_len: int) -> torch.Tensor:
    return _instance(handle)._joint_attention(q, k, v, text_len)


@_joint_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int, text_len: int) -> torch.Tensor:
    return torch.empty_like(q)


@torch.library.custom_op("sfattn::sp_gather", mutates_args=())
def _gather_op(x: torch.Tensor, handle: int, dim: int) -> torch.Tensor:
    return _instance(handle)._gather(x, dim)


@_gather_op.register_fake
def _(x: torch.Tensor, handle: int, dim: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] *= _instance(handle).world
    return x.new_empty(shape)


class SequenceParallel:
    """Shards tokens over the ranks of a oneside runtime and runs joint attention with sfattn.

    Subclasses may swap the attention and the all-gather (``_attend``, ``_gather``: what the two
    torch ops run) and keep the processors, hooks and text handling.
    """

    def __init__(self, rt: oneside.Runtime, algorithm: str | None = None, ulysses_degree: int | None = None,
                 local: str = "kernel"):
        if local not in ("kernel", "torch"):
            raise ValueError(f"local={local!r}: expected 'kernel' or 'torch' (see sfattn.SPAttention)")
        self.rt, self.algorithm, self.ulysses_degree, self.local = rt, algorithm, ulysses_degree, local
        self.text_len: int | None = None
        self._layers: dict[tuple, SPAttention] = {}
        self._gathers: dict[tuple, Any] = {}
        self.handle = id(self)  # a plain int: what the torch ops carry (a constant to torch.compile)
        _INSTANCES[self.handle] = self

    @property
    def world(self) -> int:
        return self.rt.world_size

    def _slice(self, n: int, what: str) -> slice:
        if n % self.world:
            raise ValueError(f"{what}: {n} tokens do not divide by the {self.world} ranks")
        k = n // self.world
        return slice(self.rt.rank * k, (self.rt.rank + 1) * k)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's consecutive slice of ``x`` along ``dim`` (which must divide by the ranks)."""
        idx = [slice(None)] * x.ndim
        idx[dim] = self._slice(x.shape[dim], f"shard(dim={dim})")
        return x[tuple(idx)].contiguous()

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """All-gather along ``dim`` (collective): every rank gets the whole, in rank order."""
        return torch.ops.sfattn.sp_gather(x, self.handle, dim)

    def _gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The all-gather itself, through the symmetric heap."""
        x = x.contiguous()
        key = (tuple(x.shape), str(x.dtype), dim)
        buf = self._gathers.get(key)
        if buf is None:
            buf = self._gathers[key] = self.rt.alloc((self.world, *x.shape), str(x.dtype).replace("torch.", ""))
        me = self.rt.rank
        self.rt.barrier_all()  # nobody still reads this buffer from the previous gather
        self.rt.scatter_push([(x, p, buf[me]) for p in range(self.world)])
        self.rt.barrier_all()
        parts = buf.torch()
        return torch.cat([parts[i] for i in range(self.world)], dim=dim)

    def _layer(self, B: int, S: int, H: int, D: int, dtype: torch.dtype) -> SPAttention:
        key = (B, S, H, D, dtype)
        layer = self._layers.get(key)
        if layer is None:
            plan = make_plan(self.rt.mesh, H, S, D, self.algorithm, self.ulysses_degree)
            layer = self._layers[key] = SPAttention(self.rt, plan, B, str(dtype).replace("torch.", ""),
                                                    local=self.local)
        return layer

    def joint_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_len: int) -> torch.Tensor:
        """Attention over ``text (replicated, first text_len rows) + image (this rank's rows)``.

        ``q, k, v``: ``[B, text_len + local image rows, H, D]``; returns the same shape, the
        text rows being the full text output on every rank. One opaque torch op.
        """
        return torch.ops.sfattn.sp_joint_attention(q, k, v, self.handle, text_len)

    def _joint_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_len: int) -> torch.Tensor:
        """The body of :meth:`joint_attention`: this rank's text slice and image rows attend, the
        text outputs are gathered."""
        tl = self._slice(text_len, "text_len")
        pieces = [torch.cat([x[:, tl], x[:, text_len:]], dim=1).contiguous() for x in (q, k, v)]
        o = self._attend(*pieces)
        n = tl.stop - tl.start
        text = self._gather(o[:, :n], 1)
        return torch.cat([text, o[:, n:]], dim=1)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Sequence-parallel attention of equal ``[B, L, H, D]`` shards (``L * world`` rows in all)."""
        B, L, H, D = q.shape
        return attention(q, k, v, self._layer(B, L * self.world, H, D, q.dtype))

    def apply_flux(self, transformer: Any) -> None:
        """Route every attention module of a ``FluxTransformer2DModel`` through sfattn."""
        transformer.set_attn_processor(FluxSPAttnProcessor(self))

    def apply_wan(self, transformer: Any) -> list:
        """Make a ``WanTransformer3DModel`` sequence-parallel; returns the hook handles.

        Its blocks run on this rank's slice of the video tokens (self-attention through
        sfattn), the whole output is gathered after the last block.
        """
        blocks = list(transformer.blocks)
        for block in blocks:
            block.attn1.set_processor(WanSPSelfAttnProcessor(self))
        first, last = blocks[0], blocks[-1]

        def split(module: Any, args: tuple) -> tuple:
            hidden, context, tproj, rotary = args
            if module is first:
                hidden = self.shard(hidden)
            if tproj.ndim == 4:  # per-token modulation (Wan 2.2 TI2V): [B, S, 6, C]
                tproj = self.shard(tproj)
            rotary = tuple(self.shard(r) for r in rotary) if rotary is not None else None
            return hidden, context, tproj, rotary

        return [b.register_forward_pre_hook(split) for b in blocks] + \
            [last.register_forward_hook(lambda m, a, out: self.gather(out))]

    def close(self) -> None:
        """Free the heap buffers (collective); the instance's ops stop working."""
        _INSTANCES.pop(self.handle, None)
        for layer in self._layers.values():
            release(layer)
            layer.close()
        for buf in self._gathers.values():
            self.rt.free(buf)
        self._layers.clear()
        self._gathers.clear()


class FluxSPAttnProcessor:
    """Drop-in for diffusers' ``FluxAttnProcessor`` running joint attention with sfattn."""

    def __init__(self, sp: SequenceParallel):
        self.sp = sp

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        if attention_mask is not None:
            raise ValueError("attention_mask: not supported with sequence parallelism (Flux uses none)")
        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:  # double-stream block: text comes separately
            eq, ek, ev = (x.unflatten(-1, (-1, attn.head_dim)) for x in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = (torch.cat([a, b], dim=1) for a, b in ((eq, q), (ek, k), (ev, v)))
            self.sp.text_len = encoder_hidden_states.shape[1]
        elif self.sp.text_len is None:
            raise RuntimeError("FluxSPAttnProcessor: a single-stream block ran before any double-stream "
                               "block, so the text length is unknown")
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = self.sp.joint_attention(q, k, v, self.sp.text_len).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        text, image = out.split_with_sizes([self.sp.text_len, out.shape[1] - self.sp.text_len], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())


class WanSPSelfAttnProcessor:
    """Drop-in for diffusers' ``WanAttnProcessor`` on the self-attention (``attn1``) of Wan blocks."""

    def __init__(self, sp: SequenceParallel):
        self.sp = sp

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb: Any = None) -> torch.Tensor:
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("WanSPSelfAttnProcessor: for self-attention only (no encoder states, no mask)")
        q, k, v = _get_qkv_projections(attn, hidden_states, None)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))
        if rotary_emb is not None:
            q, k = (_wan_rotary(x, *rotary_emb) for x in (q, k))
        out = self.sp.joint_attention(q, k, v, 0).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def _wan_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding (as in diffusers' WanAttnProcessor)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)
