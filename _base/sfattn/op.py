"""The torch-interoperable op: ``sfattn.attention(q, k, v, layer)``.

Registered with ``torch.library`` as ``sfattn::attention`` so that ``torch.compile`` sees one
opaque op (no graph break inside attention) with a fake implementation for tracing; CuPy and
numpy arrays go straight to the layer.
"""
from __future__ import annotations

from typing import Any

from .layer import SPAttention

_LAYERS: dict[int, SPAttention] = {}


def _handle(layer: SPAttention) -> int:
    h = id(layer)
    _LAYERS.setdefault(h, layer)
    return h


try:
    import torch

    # torch.compile runs this while tracing (the registration is real before the graph runs),
    # rather than replaying the registry update after the graph, which calls the op first
    _handle = torch.compiler.assume_constant_result(_handle)

    @torch.library.custom_op("sfattn::attention", mutates_args=())
    def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int) -> torch.Tensor:
        layer = _LAYERS.get(handle)
        if layer is None:
            raise ValueError(f"sfattn::attention: no layer with handle {handle} (closed?)")
        return layer(q, k, v)

    @_attention_op.register_fake
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int) -> torch.Tensor:
        return torch.empty_like(q)
except ImportError:  # torch is optional
    torch = None


def attention(q: Any, k: Any, v: Any, layer: SPAttention) -> Any:
    """Sequence-parallel attention of this rank's shards; returns this rank's output shard.

    ``q, k, v``: torch tensors, CuPy arrays (GPU) or numpy arrays (host backend), in the
    layer's layout, sharded along the sequence as ``layer.shard_len()`` says.
    """
    if not isinstance(layer, SPAttention):
        raise TypeError(f"layer: expected an sfattn.SPAttention, got {type(layer).__name__}")
    if torch is not None and isinstance(q, torch.Tensor):
        return torch.ops.sfattn.attention(q, k, v, _handle(layer))
    return layer(q, k, v)


def release(layer: SPAttention) -> None:
    """Forget the op's handle of ``layer`` (call before ``layer.close()``)."""
    _LAYERS.pop(id(layer), None)
