"""Attention kernels: fused multi-block flash-attention forward (CUDA C++ compiled with nvcc).

Same contract as :mod:`sfattn.reference` for GPU arrays (CuPy arrays, CUDA torch tensors incl.
bf16, or :class:`TensorDesc` raw pointers)::

    attn_blocks(q_blocks, k_blocks, v_blocks, state, scale, *, init=False, finalize=False,
                out=None, lse=None, stream=None, impl=None)
    merge(o1, lse1, o2, lse2, out=None, lse_out=None, *, stream=None)
    AttnState.empty(B, S, H, D, xp=cupy)   or   empty_state(B, S, H, D, like=tensor)
    AttnLaunch(...)  # a prepared call for the hot path: descriptors packed once

Importing this package needs neither CuPy nor a GPU; CuPy is imported at the first launch.
Implementations: 'sm90ws' (Hopper: warp-specialised wgmma, K/V through TMA; the default on
sm_90) and 'fa2' (mma.sync, sm_80+, the default elsewhere); $SFATTN_IMPL overrides.  Design and measurements: docs/kernel-notes.md.
"""
from ..reference import AttnState
from ._desc import TensorDesc, as_desc
from .flash import AttnLaunch, attn_blocks, default_impl, empty_state, merge

__all__ = ["AttnState", "AttnLaunch", "TensorDesc", "as_desc", "attn_blocks", "merge",
           "empty_state", "default_impl"]
