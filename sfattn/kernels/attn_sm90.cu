// Hopper (sm_90a) fused multi-block attention forward: wgmma tensor-core path.
//
// Thread block: SM90_NWG warpgroups, each owning 64 Q rows (BM = 64 * SM90_NWG); K/V tiles of
// SM90_BN keys in 128-byte-swizzled shared memory, double-buffered with cp.async (the blocks have
// arbitrary strides and tails, which cp.async's zero-fill handles without tensor maps).
//   S = Q K^T : wgmma m64nBNk16, A (Q) and B (K) from shared memory, both K-major.
//   O += P V  : wgmma m64nDk16, A (P, bf16/fp16) from registers, B (V) MN-major (transposed).
// The fp32 accumulators of both GEMMs have the mma.sync C layout per warp, so the softmax,
// state load/store and epilogue are shared with the portable kernel (attn_common.cuh).
#include "attn_common.cuh"
#include "wgmma_ops.cuh"

#ifndef SM90_NWG
#define SM90_NWG 2
#endif
#ifndef SM90_BN
#define SM90_BN 128
#endif
#define SM90_BM (64 * SM90_NWG)
#define SM90_NT (128 * SM90_NWG)

#define SF_CAT_(a, b) a##b
#define SF_CAT(a, b) SF_CAT_(a, b)
#define WGMMA_S SF_CAT(sf_wgmma_ss_n, SM90_BN)
#define WGMMA_O SF_CAT(sf_wgmma_rs_n, SF_D)

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
__device__ __forceinline__ void fence_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

extern "C" __global__ void __launch_bounds__(SM90_NT, 1)
sf_attn_sm90(const __grid_constant__ SfParams p) {
  constexpr int D = SF_D, BM = SM90_BM, BN = SM90_BN, NT = SM90_NT;
  constexpr int NJ = D / 8, NS = BN / 8;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // 1024-byte alignment of every tile (the swizzle pattern repeats every 1024 bytes)
  const uint32_t s0 = (sf_smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sQ = s0;
  const uint32_t sK = sQ + BM * D * 2;
  const uint32_t sV = sK + 2 * BN * D * 2;

  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, t = lane & 3;
  const int h = blockIdx.y, b = blockIdx.z;
  const int qi = sf_find_qblock(p, blockIdx.x);
  const SfQBlk& qb = p.q[qi];
  const int qrow0 = ((int)blockIdx.x - (int)qb.tile0) * BM;
  const int qvalid = min(BM, (int)qb.len - qrow0);

  const sf_elem* qptr = reinterpret_cast<const sf_elem*>(qb.q) + b * qb.qsb + h * qb.qsh +
                        (long long)qrow0 * qb.qss;
  sf_load_tile<BM, NT>(sQ, qptr, qb.qss, qvalid, tid);

  auto issue_kv = [&](int kbi, int n0, int stage) {
    const SfKVBlk& kv = p.kv[kbi];
    const int nvalid = min(BN, (int)kv.len - n0);
    const sf_elem* kp = reinterpret_cast<const sf_elem*>(kv.k) + b * kv.ksb + h * kv.ksh +
                        (long long)n0 * kv.kss;
    const sf_elem* vp = reinterpret_cast<const sf_elem*>(kv.v) + b * kv.vsb + h * kv.vsh +
                        (long long)n0 * kv.vss;
    sf_load_tile<BN, NT>(sK + stage * BN * D * 2, kp, kv.kss, nvalid, tid);
    sf_load_tile<BN, NT>(sV + stage * BN * D * 2, vp, kv.vss, nvalid, tid);
  };

  bool has = p.nkv > 0;
  if (has) issue_kv(0, 0, 0);
  sf_cp_async_commit();

  const int lr0 = qrow0 + wg * 64 + warp * 16 + (lane >> 2);
  const long long srow = qb.row0 + lr0;
  const int nrow_ok = min(2, max(0, ((int)qb.len - lr0 + 7) / 8));
  float o[NJ][4], mr[2], lr[2];
  sf_load_state<NJ>(p, b, h, srow, nrow_ok, t, o, mr, lr);

  // descriptor bases: Q rows of this warpgroup; K/V per stage
  const uint32_t qdesc_base = sQ + wg * 64 * 128;
  const float sl2 = (float)p.scale_log2;
  int cur_kb = 0, cur_n0 = 0, stage = 0;
  while (has) {
    int nkb = cur_kb, nn0 = cur_n0 + BN;
    if (nn0 >= (int)p.kv[nkb].len) { ++nkb; nn0 = 0; }
    const bool has_next = nkb < (int)p.nkv;
    if (has_next) issue_kv(nkb, nn0, stage ^ 1);
    sf_cp_async_commit();
    sf_cp_async_wait<1>();
    fence_async_smem();  // cp.async (generic proxy) writes -> wgmma (async proxy) reads
    __syncthreads();

    const uint32_t kbase = sK + stage * BN * D * 2, vbase = sV + stage * BN * D * 2;
    float s[NS][4];
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint64_t da = sf_desc(qdesc_base + (kk >> 2) * (BM * 128) + (kk & 3) * 32, 16, 1024);
      const uint64_t db = sf_desc(kbase + (kk >> 2) * (BN * 128) + (kk & 3) * 32, 16, 1024);
      WGMMA_S(s, da, db, kk > 0);
    }
    wg_commit();
    wg_wait<0>();
    reg_fence<NS>(s);

    const int nvalid = min(BN, (int)p.kv[cur_kb].len - cur_n0);
    sf_scale_mask<NS>(s, sl2, nvalid, t);
    sf_softmax_update<NS, NJ>(s, o, mr, lr);

    uint32_t pa[BN / 16][4];  // P as the A operand (mma A-fragment layout), packed first so
#pragma unroll                // no register is written between the wgmma issues
    for (int kk = 0; kk < BN / 16; ++kk) {
      pa[kk][0] = sf_pack2(s[2 * kk][0], s[2 * kk][1]);
      pa[kk][1] = sf_pack2(s[2 * kk][2], s[2 * kk][3]);
      pa[kk][2] = sf_pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[kk][3] = sf_pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
      WGMMA_O(o, pa[kk], sf_desc(vbase + kk * 16 * 128, BN * 128, 1024), 1);
    wg_commit();
    wg_wait<0>();
    reg_fence<NJ>(o);
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
    stage ^= 1;
    cur_kb = nkb;
    cur_n0 = nn0;
    has = has_next;
  }
  sf_cp_async_wait<0>();  // no copy may outlive the block (nkv == 0: the Q tile)
  sf_store<NJ>(p, qb, b, h, srow, lr0, nrow_ok, t, o, mr, lr);
}
