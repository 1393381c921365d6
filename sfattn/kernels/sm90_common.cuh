// Hopper helpers shared by the sm_90a attention kernels (wgmma descriptors, fences, softmax).
#pragma once
#include "attn_common.cuh"
#include "wgmma_ops.cuh"

#define SF_CAT_(a, b) a##b
#define SF_CAT(a, b) SF_CAT_(a, b)

// shared-memory matrix descriptor of wgmma; layout 1: 128-byte swizzle, 2: 64-byte swizzle
__device__ __forceinline__ uint64_t sf_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo,
                                            uint32_t layout = 1) {
  uint64_t d = (uint64_t)((saddr & 0x3FFFF) >> 4);
  d |= (uint64_t)((lbo >> 4) & 0x3FFF) << 16;
  d |= (uint64_t)((sbo >> 4) & 0x3FFF) << 32;
  d |= (uint64_t)layout << 62;
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
// Ends a basic block without doing anything: a loop whose trip count (flags >> 48, zero: the host
// sets only low flag bits) ptxas cannot know. Put before wg_wait<0>() of P_{t-1}.V_{t-1}: within a
// block ptxas hoists that wait above the softmax (the P registers then free up early), which
// serialises the softmax behind the P.V GEMM inside a warpgroup; across a block boundary it cannot.
__device__ __forceinline__ void sf_sched_fence(long long flags) {
#pragma unroll 1
  for (int z = 0; z < (int)(flags >> 48); ++z) asm volatile("membar.cta;\n" ::: "memory");
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

// mbarriers and the TMA copy engine (both sm_90a attention kernels)
__device__ __forceinline__ void mbar_init(uint32_t a, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(a), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t a, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done) : "r"(a), "r"(parity) : "memory");
  } while (!done);
}
__device__ __forceinline__ void mbar_arrive(uint32_t a) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(a)
               : "memory");
}
// arrival that also raises the barrier's expected transaction count by `bytes`
__device__ __forceinline__ void mbar_expect_tx(uint32_t a, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(a), "r"(bytes)
               : "memory");
}
// TMA: copy the box at coordinates (c0, c1, c2, c3) of the tensor map into shared memory at dst;
// completion is signalled on the mbarrier as transaction bytes
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const SfTmap* map, int c0, int c1,
                                            int c2, int c3, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void tma_prefetch_map(const SfTmap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
