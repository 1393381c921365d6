// Portable fused multi-block attention forward (FlashAttention-2 style), sm_80+.
//
// mma.sync m16n8k16 (bf16/fp16 -> fp32) fed by ldmatrix from swizzled shared memory.
// Thread block: FA2_NW warps, each owning 16 Q rows (BM = 16 * FA2_NW rows per tile); K/V tiles
// of FA2_BN keys, double-buffered with cp.async.  Grid: (Q tiles over all Q blocks, H, B).
#include "attn_common.cuh"

#ifndef FA2_NW
#define FA2_NW 8
#endif
#ifndef FA2_BN
#define FA2_BN 64
#endif
#define FA2_BM (16 * FA2_NW)
#define FA2_NT (32 * FA2_NW)

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
#if SF_FP16
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

extern "C" __global__ void __launch_bounds__(FA2_NT, 1)
sf_attn_fa2(const __grid_constant__ SfParams p) {
  constexpr int D = SF_D, BM = FA2_BM, BN = FA2_BN, NT = FA2_NT;
  constexpr int NJ = D / 8;   // n8 chunks of the output row
  constexpr int NS = BN / 8;  // n8 chunks of an S row
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t sQ = sf_smem_u32(smem);
  const uint32_t sK = sQ + BM * D * 2;
  const uint32_t sV = sK + 2 * BN * D * 2;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, t = lane & 3;
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

  // Running state of this thread's two rows (loaded while the copies fly).
  const int lr0 = qrow0 + warp * 16 + (lane >> 2);  // row inside the q block
  const long long srow = qb.row0 + lr0;              // state row
  const int nrow_ok = min(2, max(0, ((int)qb.len - lr0 + 7) / 8));  // rows r, r+8 valid?
  float o[NJ][4], mr[2], lr[2];
  sf_load_state<NJ>(p, b, h, srow, nrow_ok, t, o, mr, lr);

  sf_cp_async_wait<0>();
  __syncthreads();
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int r = warp * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
    const int c = kk * 2 + (lane >> 4);
    ldsm_x4(qf[kk], sQ + sf_tile_off<BM>(r, c));
  }

  const float sl2 = (float)p.scale_log2;
  int cur_kb = 0, cur_n0 = 0, stage = 0;
  while (has) {
    int nkb = cur_kb, nn0 = cur_n0 + BN;
    if (nn0 >= (int)p.kv[nkb].len) { ++nkb; nn0 = 0; }
    const bool has_next = nkb < (int)p.nkv;
    if (has_next) issue_kv(nkb, nn0, stage ^ 1);
    sf_cp_async_commit();
    sf_cp_async_wait<1>();
    __syncthreads();

    const uint32_t kbase = sK + stage * BN * D * 2, vbase = sV + stage * BN * D * 2;
    float s[NS][4];
#pragma unroll
    for (int j = 0; j < NS; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int nn = 0; nn < BN / 16; ++nn) {
        uint32_t bf[4];
        const int r = nn * 16 + (lane & 7) + 8 * (lane >> 4);
        const int c = kk * 2 + ((lane >> 3) & 1);
        ldsm_x4(bf, kbase + sf_tile_off<BN>(r, c));
        mma16816(s[2 * nn], qf[kk], bf[0], bf[1]);
        mma16816(s[2 * nn + 1], qf[kk], bf[2], bf[3]);
      }
    }
    const int nvalid = min(BN, (int)p.kv[cur_kb].len - cur_n0);
    if (nvalid < BN) sf_mask_cols<NS>(s, nvalid, t);
    float alpha[2];
    sf_softmax<NS>(s, sl2, mr, lr, alpha);
    sf_rescale<NJ>(o, alpha);

#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      sf_pack_a<NS>(s, kk, a);
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t bf[4];
        const int r = kk * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
        const int c = dn * 2 + (lane >> 4);
        ldsm_x4_t(bf, vbase + sf_tile_off<BN>(r, c));
        mma16816(o[2 * dn], a, bf[0], bf[1]);
        mma16816(o[2 * dn + 1], a, bf[2], bf[3]);
      }
    }
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
    stage ^= 1;
    cur_kb = nkb;
    cur_n0 = nn0;
    has = has_next;
  }
  sf_store<NJ>(p, qb, b, h, srow, lr0, nrow_ok, t, o, mr, lr);
}
