"""sfattn: sequence-parallel attention for Diffusion Transformer inference, over oneside.

    import oneside, sfattn
    rt = oneside.init()
    plan = sfattn.make_plan(rt.mesh, heads=24, seq_len=37_376, head_dim=128)   # or algorithm="usp"
    print(plan.explain())
    layer = sfattn.SPAttention(rt, plan, batch=1, dtype="bfloat16")
    o = sfattn.attention(q, k, v, layer)     # this rank's shards, [B, L, H, D]
"""
from .layer import SPAttention
from .op import attention, release
from .plan import ALGORITHMS, Plan, PlanError, make_plan

__all__ = ["SPAttention", "attention", "release", "make_plan", "Plan", "PlanError", "ALGORITHMS"]
