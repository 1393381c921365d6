"""Attention kernels: fused multi-block flash-attention forward (CuPy raw CUDA)."""
