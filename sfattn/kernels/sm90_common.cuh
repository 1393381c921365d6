// Hopper helpers shared by the sm_90a attention kernels (wgmma descriptors, fences, softmax).
#pragma once
#include "attn_common.cuh"
#include "wgmma_ops.cuh"

#define SF_CAT_(a, b) a##b
#define SF_CAT(a, b) SF_CAT_(a, b)

__device__ __forceinline__ uint64_t sf_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
  uint64_t d = (uint64_t)((saddr & 0x3FFFF) >> 4);
  d |= (uint64_t)((lbo >> 4) & 0x3FFF) << 16;
  d |= (uint64_t)((sbo >> 4) & 0x3FFF) << 32;
  d |= (uint64_t)1 << 62;  // 128-byte swizzle
  return d;
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
template <int NJ>
__device__ __forceinline__ void reg_fence(float (&r)[NJ][4]) {
#pragma unroll
  for (int j = 0; j < NJ; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(r[j][e])::"memory");
}
template <int N>
__device__ __forceinline__ void reg_fence_u(uint32_t (&r)[N][4]) {
#pragma unroll
  for (int j = 0; j < N; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(r[j][e])::"memory");
}
__device__ __forceinline__ void fence_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Softmax statistics of one S tile (raw logits, masked entries -inf): new running max (log2
// units, scale folded into the exponent), p = exp2(s * sl2 - m) in place, alpha = rescale factor
// of the previous state, l updated.  O is rescaled separately (it may still be in flight).
template <int NS>
__device__ __forceinline__ void sm90_softmax(float (&s)[NS][4], float sl2, float (&mr)[2],
                                             float (&lr)[2], float (&alpha)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < NS; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * i], s[j][2 * i + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(mr[i], mx * sl2);
    const float m_use = (m_new == -INFINITY) ? 0.f : m_new;  // guards -inf - -inf
    alpha[i] = exp2f(mr[i] - m_use);
    mr[i] = m_new;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < NS; ++j) {
      s[j][2 * i] = exp2f(fmaf(s[j][2 * i], sl2, -m_use));
      s[j][2 * i + 1] = exp2f(fmaf(s[j][2 * i + 1], sl2, -m_use));
      sum += s[j][2 * i] + s[j][2 * i + 1];
    }
    lr[i] = lr[i] * alpha[i] + sum;
  }
}

