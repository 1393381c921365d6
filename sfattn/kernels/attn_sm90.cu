// Hopper (sm_90a) fused multi-block attention forward: wgmma tensor-core path.
//
// Thread block: SM90_NWG warpgroups, each owning 64 Q rows (BM = 64 * SM90_NWG); K/V tiles of
// SM90_BN keys in 128-byte-swizzled shared memory, loaded with cp.async two tiles ahead (the blocks
// have arbitrary strides and tails, which cp.async's zero-fill handles without tensor maps);
// 2 K stages, 3 V stages.
// Software pipeline per warpgroup (FlashAttention-3's intra-warpgroup overlap): iteration t issues
// S_t = Q K_t^T and O += P_{t-1} V_{t-1} back to back, waits for S_t only, computes the softmax of
// S_t while the tensor cores run the P V product, then waits for it and rescales O.
//   S = Q K^T : wgmma m64nBNk16, A (Q) and B (K) from shared memory, both K-major.
//   O += P V  : wgmma m64nDk16, A (P, bf16/fp16) from registers, B (V) MN-major (transposed).
// The fp32 accumulators of both GEMMs have the mma.sync C layout per warp, so the softmax,
// state load/store and epilogue are shared with the portable kernel (attn_common.cuh).
#include "sm90_common.cuh"

#ifndef SM90_NWG
#define SM90_NWG 2
#endif
#ifndef SM90_BN
#define SM90_BN 128
#endif
#define SM90_BM (64 * SM90_NWG)
#define SM90_NT (128 * SM90_NWG)

#define WGMMA_S SF_CAT(sf_wgmma_ss_n, SM90_BN)
#define WGMMA_O SF_CAT(sf_wgmma_rs_n, SF_D)

extern "C" __global__ void __launch_bounds__(SM90_NT, 1)
sf_attn_sm90(const __grid_constant__ SfParams p) {
  constexpr int D = SF_D, BM = SM90_BM, BN = SM90_BN, NT = SM90_NT;
  constexpr int NJ = D / 8, NS = BN / 8;
  constexpr uint32_t TILE = BN * D * 2;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // 1024-byte alignment of every tile (the swizzle pattern repeats every 1024 bytes)
  const uint32_t s0 = (sf_smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sQ = s0;
  const uint32_t sK = sQ + BM * D * 2;  // 2 stages
  const uint32_t sV = sK + 2 * TILE;    // 3 stages

  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, t = lane & 3;
  const int h = blockIdx.y, b = blockIdx.z;
  const int qi = sf_find_qblock(p, blockIdx.x);
  const SfQBlk& qb = p.q[qi];
  const int qrow0 = ((int)blockIdx.x - (int)qb.tile0) * BM;
  const int qvalid = min(BM, (int)qb.len - qrow0);

  const sf_elem* qptr = reinterpret_cast<const sf_elem*>(qb.q) + b * qb.qsb + h * qb.qsh +
                        (long long)qrow0 * qb.qss;
  sf_load_tile<BM, NT>(sQ, qptr, qb.qss, qvalid, tid);

  // load cursor: next tile to fetch (block index, first key), tile counter
  int lkb = 0, ln0 = 0, lt = 0;
  const int nkv = (int)p.nkv;
  auto issue_next = [&]() {
    if (lkb < nkv) {
      const SfKVBlk& kv = p.kv[lkb];
      const int nvalid = min(BN, (int)kv.len - ln0);
      const sf_elem* kp = reinterpret_cast<const sf_elem*>(kv.k) + b * kv.ksb + h * kv.ksh +
                          (long long)ln0 * kv.kss;
      const sf_elem* vp = reinterpret_cast<const sf_elem*>(kv.v) + b * kv.vsb + h * kv.vsh +
                          (long long)ln0 * kv.vss;
      sf_load_tile<BN, NT>(sK + (lt & 1) * TILE, kp, kv.kss, nvalid, tid);
      sf_load_tile<BN, NT>(sV + (lt % 3) * TILE, vp, kv.vss, nvalid, tid);
      ln0 += BN;
      if (ln0 >= (int)kv.len) { ++lkb; ln0 = 0; }
      ++lt;
    }
    sf_cp_async_commit();  // always commit: keeps the group count uniform
  };
  issue_next();  // with the Q tile
  issue_next();

  const int lr0 = qrow0 + wg * 64 + warp * 16 + (lane >> 2);
  const long long srow = qb.row0 + lr0;
  const int nrow_ok = min(2, max(0, ((int)qb.len - lr0 + 7) / 8));
  float o[NJ][4], mr[2], lr[2];
  sf_load_state<NJ>(p, b, h, srow, nrow_ok, t, o, mr, lr);

  const uint32_t qdesc_base = sQ + wg * 64 * 128;
  const float sl2 = (float)p.scale_log2;
  uint32_t pa[BN / 16][4];  // P_{t-1} as the A operand (mma A-fragment layout)
  float s[NS][4];
  float alpha[2];
  int ckb = 0, cn0 = 0, ct = 0;  // compute cursor

  auto wait_tile = [&]() {
    sf_cp_async_wait<1>();  // tile ct has landed (this thread's copies)
    fence_async_smem();     // cp.async (generic proxy) writes -> wgmma (async proxy) reads
    __syncthreads();        // ... everybody's copies
  };
  auto issue_s = [&]() {  // S = Q K_ct^T
    const uint32_t kbase = sK + (ct & 1) * TILE;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint64_t da = sf_desc(qdesc_base + (kk >> 2) * (BM * 128) + (kk & 3) * 32, 16, 1024);
      const uint64_t db = sf_desc(kbase + (kk >> 2) * (BN * 128) + (kk & 3) * 32, 16, 1024);
      WGMMA_S(s, da, db, kk > 0);
    }
    wg_commit();
  };
  auto issue_pv = [&]() {  // O += P_{ct-1} V_{ct-1}
    const uint32_t vbase = sV + ((ct + 2) % 3) * TILE;
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
      WGMMA_O(o, pa[kk], sf_desc(vbase + kk * 16 * 128, BN * 128, 1024), 1);
    wg_commit();
  };
  auto softmax = [&]() {
    reg_fence<NS>(s);
    const int nvalid = (int)p.kv[ckb].len - cn0;
    if (nvalid < BN) {
#pragma unroll
      for (int j = 0; j < NS; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (8 * j + 2 * t + (e & 1) >= nvalid) s[j][e] = -INFINITY;
    }
    sm90_softmax<NS>(s, sl2, mr, lr, alpha);
  };
  auto rescale_pack_next = [&]() {
    reg_fence<NJ>(o);
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      o[j][0] *= alpha[0]; o[j][1] *= alpha[0];
      o[j][2] *= alpha[1]; o[j][3] *= alpha[1];
    }
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      pa[kk][0] = sf_pack2(s[2 * kk][0], s[2 * kk][1]);
      pa[kk][1] = sf_pack2(s[2 * kk][2], s[2 * kk][3]);
      pa[kk][2] = sf_pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[kk][3] = sf_pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
    reg_fence<NJ>(o);
    reg_fence_u<BN / 16>(pa);
    __syncthreads();  // K stage ct&1 and V stage (ct-1)%3 are free for tile ct+2
    issue_next();
    cn0 += BN;
    if (cn0 >= (int)p.kv[ckb].len) { ++ckb; cn0 = 0; }
    ++ct;
  };

  if (nkv > 0) {
    // tile 0: nothing to overlap with yet
    wait_tile();
    wg_fence();
    issue_s();
    wg_wait<0>();
    softmax();
    rescale_pack_next();
    while (ckb < nkv) {
      wait_tile();
      wg_fence();
      issue_s();
      issue_pv();
      wg_wait<1>();  // S_t done, P_{t-1} V_{t-1} may still run
      softmax();     // overlaps the P V product on the tensor cores
      wg_wait<0>();  // O and pa are ours again
      rescale_pack_next();
    }
    wg_fence();  // the last P V product
    issue_pv();
    wg_wait<0>();
    reg_fence<NJ>(o);
  }
  sf_cp_async_wait<0>();  // no copy may outlive the block
  sf_store<NJ>(p, qb, b, h, srow, lr0, nrow_ok, t, o, mr, lr);
}
