// Hopper (sm_90a) fused multi-block attention forward, warp-specialised (FlashAttention-3 ideas,
// own code): 1 + WS_NC warpgroups per block.
//   WG0 (producer, few registers): loads the Q tile and the K and V tiles into two separate
//       rings (WS_KST and WS_VST slots), each fill completing on a "full" mbarrier of its slot.
//   WG1..WS_NC (consumers, 64 Q rows each, many registers; 2 at head dim 128, 3 at 64, where the
//       smaller O and S leave room for a third): per K/V tile of WS_BN keys, S = Q K^T
//       and O += P V with wgmma; the softmax of S_t overlaps P_{t-1} V_{t-1} on the tensor cores.
//       K_t's slot is released ("empty" mbarrier) as soon as S_t is done, V_t's after P_t V_t, so
//       the producer refills K early and the larger WS_BN tiles fit two slots per ring.
// The consumers take turns issuing their GEMMs (named barriers passed round a ring, "ping-pong"),
// so one's softmax runs while the others' GEMMs occupy the tensor cores.  A row's O is rescaled
// only when its running max grew by more than SF_RESCALE_THR (attn_common.cuh): after the first
// tiles that is rare, and the warp skips the O multiplies.
// WS_CL=2 (head dim 128): blocks run in clusters of two that take adjacent Q tiles of one head and
// share each K/V tile: each block's producer loads one 64-column panel and the copy engine
// multicasts it into both blocks' shared memory, halving the L2 -> SM traffic; a slot is refilled
// only when the consumers of both blocks released it (their "empty" arrivals go to both blocks).
// Per head the Q tiles are padded to an even count (a padding block loads and computes, stores
// nothing).
// Loads: WS_TMA=1 (default) has one producer thread drive the bulk tensor copy engine (TMA):
// one instruction per 64-column panel of a Q, K or V tile, completing on the "full" mbarrier by
// transaction bytes; the host encodes one tensor map per Q, K and V block (strided views, tails
// zero-filled by the engine).  WS_TMA=0 keeps the portable path: all 128 producer threads
// issue 16-byte cp.async copies (cp.async.mbarrier.arrive), one tile per block.
#ifndef WS_TMA
#define WS_TMA 1
#endif
#define SF_TMA WS_TMA
#include "sm90_common.cuh"
#include <stddef.h>

#ifndef WS_BN
#define WS_BN 128
#endif
#ifndef WS_KST
#define WS_KST 2
#endif
#ifndef WS_VST
#define WS_VST 2
#endif
#ifndef WS_PRODUCER_REGS
#define WS_PRODUCER_REGS 24
#endif
#ifndef WS_CONSUMER_REGS
#define WS_CONSUMER_REGS 240
#endif
#ifndef WS_NC
#define WS_NC 2  // consumer warpgroups (64 Q rows each)
#endif
#ifndef WS_FO
#define WS_FO 1  // 1: rescale O between issuing S_t and P_{t-1} V_{t-1} (under the S GEMM) and
                 // wait for V_{t-1} only then; 0: rescale after P_{t-1} V_{t-1} completes
#endif
#ifndef WS_UW
#define WS_UW 0  // 1: warpgroup index made provably warp-uniform (uniform-register descriptors;
                 // 3-4 % slower at head dim 128 on an H200, docs/kernel-notes.md)
#endif
#ifndef WS_DA
#define WS_DA 0  // 1: wgmma descriptors as slot-0 descriptor + offset (one add each)
#endif
#ifndef WS_CL
#define WS_CL 1  // blocks per cluster sharing K/V tiles by TMA multicast (1 or 2)
#endif
#if WS_CL == 2 && (!WS_TMA || SF_D != 128)
#error "WS_CL=2 multicasts one 64-column panel per block: it needs TMA and head dim 128"
#endif
#define WS_BM (64 * WS_NC)
#define WS_NT (128 * (WS_NC + 1))

#define WGMMA_S SF_CAT(sf_wgmma_ss_n, WS_BN)
#define WGMMA_O SF_CAT(sf_wgmma_rs_n, SF_D)

// the same, multicast: the box lands at offset dst of every block in cta_mask (of the cluster),
// each completing transaction bytes on its own mbarrier at offset bar
__device__ __forceinline__ void tma_load_4d_mc(uint32_t dst, const SfTmap* map, int c0, int c1,
                                               int c2, int c3, uint32_t bar, uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%2, %3, %4, %5}], [%6], %7;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar),
      "h"(cta_mask)
      : "memory");
}
// arrival on the mbarrier at shared offset a of block `cta` of this cluster (release at CTA
// scope, as for a local arrival: the slot's readers, wgmma, have completed; a cluster-scope release
// would fence every arrival)
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t a, uint32_t cta) {
  asm volatile(
      "{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [ra];\n}\n" ::"r"(a), "r"(cta)
      : "memory");
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n"
               ::: "memory");
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
// a K/V slot's "empty" arrival: on this block's barrier, and with WS_CL=2 on the peer's as well
__device__ __forceinline__ void release_slot(uint32_t a) {
  mbar_arrive(a);
#if WS_CL == 2
  mbar_arrive_cluster(a, cluster_rank() ^ 1);
#endif
}
// arrives on the mbarrier once all prior cp.async of this thread have completed
__device__ __forceinline__ void cp_async_arrive(uint32_t a) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(a) : "memory");
}
#ifndef WS_OV
#define WS_OV 0  // 1: keep the wait for P_{t-1} V_{t-1} below the softmax of S_t (sf_sched_fence)
#endif
#ifndef WS_PP
#define WS_PP 1  // consumer ping-pong through named barriers
#endif
#ifndef WS_EA
#define WS_EA 1  // 1: one "empty" arrival per consumer warp (lane 0); 0: every consumer thread
#endif
#define WS_EMPTY_COUNT (WS_EA ? 4 * WS_NC : 128 * WS_NC)  // per block of consumers
__device__ __forceinline__ void named_sync(int id) {
  if (WS_PP) asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory");
}
__device__ __forceinline__ void named_arrive(int id) {
  if (WS_PP) asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory");
}

// Register-lean tile load for the 128 producer threads: each thread keeps one 16-byte column
// chunk and walks down the rows with incremental pointers (r & 7, hence the swizzle, is fixed).
template <int ROWS>
__device__ __forceinline__ void ws_load_tile(uint32_t sbase, const sf_elem* g, long long rs,
                                             int nvalid, int tid) {
  constexpr int CPR = SF_D / 8, RPP = 128 / CPR;  // chunks per row, rows per pass
  const int c = tid % CPR;
  int r = tid / CPR;
  uint32_t dst = sbase + sf_tile_off<ROWS>(r, c);
  const sf_elem* src = g + (long long)r * rs + c * 8;
  const long long step = (long long)RPP * rs;
#pragma unroll 4
  for (int i = 0; i < ROWS / RPP; ++i) {
    const bool ok = r < nvalid;
    sf_cp_async16(dst, ok ? src : g, ok);
    r += RPP;
    dst += RPP * 128;
    src += step;
  }
}

// Work items ("tiles") are (Q tile x, head h) pairs, x fastest, over grid.x; the batch is grid.z.
// A block takes tiles blockIdx.x, blockIdx.x + gridDim.x, ...: with a grid of one block per tile
// (the default) each block runs one tile; with a grid of one block per SM (persistent, TMA only)
// the K/V ring and its barrier phases run on across tiles, so the next tile's Q and first K/V
// tiles load while the consumers finish the current one (last P V product and the epilogue).
#if WS_CL == 2
#define WS_CLUSTER_ATTR __cluster_dims__(2, 1, 1)
#else
#define WS_CLUSTER_ATTR
#endif
extern "C" __global__ void __launch_bounds__(WS_NT, 1) WS_CLUSTER_ATTR
sf_attn_sm90ws(const __grid_constant__ SfParams p) {
  // a programmatic dependent launch (AttnLaunch(dependent=True)): the previous grid on the stream
  // is complete and its writes are visible past this point (a no-op for an ordinary launch)
  asm volatile("griddepcontrol.wait;" ::: "memory");
  constexpr int D = SF_D, BM = WS_BM, BN = WS_BN, KST = WS_KST, VST = WS_VST;
  constexpr int NJ = D / 8, NS = BN / 8;
  constexpr uint32_t TILE = BN * D * 2;
  static_assert(BN % 16 == 0 && (BN * 128) % 1024 == 0, "BN must be a multiple of 16");
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // kfull[KST], kempty[KST], vfull[VST], vempty[VST], qfull, qempty
  __shared__ __align__(8) uint64_t bars[2 * KST + 2 * VST + 2];
  const uint32_t s0 = (sf_smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sQ = s0;
  const uint32_t sK = sQ + BM * D * 2;  // K slot i at sK + i * TILE
  const uint32_t sV = sK + KST * TILE;  // V slot i at sV + i * TILE
  const uint32_t bar0 = sf_smem_u32(bars);
  auto kfull = [&](int i) { return bar0 + 8 * i; };
  auto kempty = [&](int i) { return bar0 + 8 * (KST + i); };
  auto vfull = [&](int i) { return bar0 + 8 * (2 * KST + i); };
  auto vempty = [&](int i) { return bar0 + 8 * (2 * KST + VST + i); };
  const uint32_t qfull = bar0 + 8 * (2 * KST + 2 * VST);
  const uint32_t qempty = qfull + 8;

  // WS_UW=1: the warpgroup index through a shuffle, so the compiler knows it is warp-uniform and
  // keeps what derives from it (the consumer index, the Q descriptors) in uniform registers: no
  // R2UR moves in front of every S wgmma (16 per K/V tile at head dim 128)
  const int tid = threadIdx.x, wg = WS_UW ? __shfl_sync(0xffffffffu, tid >> 7, 0) : tid >> 7;
  const int b = blockIdx.z;
  const int nkv = (int)p.nkv;
  const SfQBlk& qlast = p.q[p.nq - 1];
  const int tiles_q = (int)qlast.tile0 + (int)((qlast.len + BM - 1) / BM);  // real Q tiles
  const int tiles_x = WS_CL == 2 ? (tiles_q + 1) & ~1 : tiles_q;  // per head, cluster-padded
  const int ntiles = tiles_x * (int)p.H;

  // FULL: TMA fills arrive once (expect_tx); cp.async fills once per producer thread
  constexpr uint32_t FULL_COUNT = WS_TMA ? 1 : 128;
  if (tid == 0) {
    for (int i = 0; i < KST; ++i) { mbar_init(kfull(i), FULL_COUNT); mbar_init(kempty(i), WS_CL * WS_EMPTY_COUNT); }
    for (int i = 0; i < VST; ++i) { mbar_init(vfull(i), FULL_COUNT); mbar_init(vempty(i), WS_CL * WS_EMPTY_COUNT); }
    mbar_init(qfull, FULL_COUNT);
    mbar_init(qempty, WS_EMPTY_COUNT);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  if (WS_CL == 2) cluster_sync();  // the peer's barriers exist before any multicast or arrival
  else __syncthreads();

  if (wg == 0) {
    // ------------------------------ producer ------------------------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(WS_PRODUCER_REGS));
    const int ptid = tid;
#if WS_TMA
    static_assert(offsetof(SfParams, tk) == 8 * (16 + 11 * SF_MAXQ + 9 * SF_MAXKV),
                  "SfParams layout must match the host's int64 slots");
    [[maybe_unused]] const uint32_t crank = WS_CL == 2 ? cluster_rank() : 0;  // its K/V panel
    if (ptid == 0 && nkv > 0) {
      for (int kb = 0; kb < nkv; ++kb) { tma_prefetch_map(&p.tk[kb]); tma_prefetch_map(&p.tv[kb]); }
      int lt = 0, it = 0;
      for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x, ++it) {
        const int x = tile % tiles_x, h = tile / tiles_x;
        const int qi = sf_find_qblock(p, x);
        const int qrow0 = (x - (int)p.q[qi].tile0) * BM;
        if (it > 0) mbar_wait(qempty, (it - 1) & 1);  // the previous tile's S GEMMs are done
        mbar_expect_tx(qfull, BM * D * 2);
#pragma unroll
        for (int pn = 0; pn < D / 64; ++pn)
          tma_load_4d(sQ + pn * BM * 128, &p.tq[qi], pn * 64, qrow0, h, b, qfull);
        for (int kb = 0; kb < nkv; ++kb) {
          const int len = (int)p.kv[kb].len;
          for (int n0 = 0; n0 < len; n0 += BN, ++lt) {
            const int ks = lt % KST, vs = lt % VST;
            if (lt >= KST) mbar_wait(kempty(ks), ((lt / KST) - 1) & 1);
            mbar_expect_tx(kfull(ks), TILE);
#if WS_CL == 2
            tma_load_4d_mc(sK + ks * TILE + crank * BN * 128, &p.tk[kb], crank * 64, n0, h, b,
                           kfull(ks), 3);
#else
#pragma unroll
            for (int pn = 0; pn < D / 64; ++pn)
              tma_load_4d(sK + ks * TILE + pn * BN * 128, &p.tk[kb], pn * 64, n0, h, b, kfull(ks));
#endif
            if (lt >= VST) mbar_wait(vempty(vs), ((lt / VST) - 1) & 1);
            mbar_expect_tx(vfull(vs), TILE);
#if WS_CL == 2
            tma_load_4d_mc(sV + vs * TILE + crank * BN * 128, &p.tv[kb], crank * 64, n0, h, b,
                           vfull(vs), 3);
#else
#pragma unroll
            for (int pn = 0; pn < D / 64; ++pn)
              tma_load_4d(sV + vs * TILE + pn * BN * 128, &p.tv[kb], pn * 64, n0, h, b, vfull(vs));
#endif
          }
        }
      }
    }
#else
    // cp.async: one tile per block (the host never launches this variant persistent)
    if (nkv > 0 && (int)blockIdx.x < ntiles) {
      const int x = (int)blockIdx.x % tiles_x, h = (int)blockIdx.x / tiles_x;
      const SfQBlk& qb = p.q[sf_find_qblock(p, x)];
      const int qrow0 = (x - (int)qb.tile0) * BM;
      const int qvalid = min(BM, (int)qb.len - qrow0);
      const sf_elem* qptr = reinterpret_cast<const sf_elem*>(qb.q) + b * qb.qsb + h * qb.qsh +
                            (long long)qrow0 * qb.qss;
      ws_load_tile<BM>(sQ, qptr, qb.qss, qvalid, ptid);
      cp_async_arrive(qfull);
      int lt = 0;
      for (int kb = 0; kb < nkv; ++kb) {
        const SfKVBlk& kv = p.kv[kb];
        const int len = (int)kv.len;
        const sf_elem* kp = reinterpret_cast<const sf_elem*>(kv.k) + b * kv.ksb + h * kv.ksh;
        const sf_elem* vp = reinterpret_cast<const sf_elem*>(kv.v) + b * kv.vsb + h * kv.vsh;
        for (int n0 = 0; n0 < len; n0 += BN, ++lt) {
          const int nvalid = min(BN, len - n0);
          const int ks = lt % KST, vs = lt % VST;
          if (lt >= KST) mbar_wait(kempty(ks), ((lt / KST) - 1) & 1);
          ws_load_tile<BN>(sK + ks * TILE, kp + (long long)n0 * kv.kss, kv.kss, nvalid, ptid);
          cp_async_arrive(kfull(ks));
          if (lt >= VST) mbar_wait(vempty(vs), ((lt / VST) - 1) & 1);
          ws_load_tile<BN>(sV + vs * TILE, vp + (long long)n0 * kv.vss, kv.vss, nvalid, ptid);
          cp_async_arrive(vfull(vs));
        }
      }
    }
    sf_cp_async_wait<0>();
#endif
  } else {
    // ------------------------------ consumers ------------------------------
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(WS_CONSUMER_REGS));
    const int c = wg - 1, ctid = tid - 128;
    const int warp = (ctid >> 5) & 3, lane = ctid & 31, t = lane & 3;
    const float sl2 = (float)p.scale_log2;
    const uint32_t qdesc_base = sQ + c * 64 * 128;
    // WS_DA=1: descriptors of slot 0 built once; a GEMM's descriptor is that plus its offset in
    // 16-byte units (the 14-bit address field cannot carry: shared memory is < 256 KB)
    const uint64_t qd0 = sf_desc(qdesc_base, 16, 1024), kd0 = sf_desc(sK, 16, 1024),
                   vd0 = sf_desc(sV, BN * 128, 1024);
    const int my_bar = 1 + c, next_bar = 1 + (c + 1) % WS_NC;  // GEMM-issue token ring
    const bool arrives = !WS_EA || lane == 0;  // "empty" arrivals: one per warp (or per thread)
    uint32_t pa[BN / 16][4];
    float s[NS][4];
    float o[NJ][4], mr[2], lr[2];
    float alpha[2];
    int ct = 0;  // K/V tiles consumed since the kernel started: ring slot and phase

    int it = 0;
    for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x, ++it) {
      const int x = tile % tiles_x, h = tile / tiles_x;
      const SfQBlk& qb = p.q[sf_find_qblock(p, x)];
      const int qrow0 = (x - (int)qb.tile0) * BM;
      const int lr0 = qrow0 + c * 64 + warp * 16 + (lane >> 2);
      const long long srow = qb.row0 + lr0;
      const int nrow_ok = min(2, max(0, ((int)qb.len - lr0 + 7) / 8));
      sf_load_state<NJ>(p, b, h, srow, nrow_ok, t, o, mr, lr);
      int ckb = 0, cn0 = 0;

      auto wait_k = [&]() { mbar_wait(kfull(ct % KST), (ct / KST) & 1); };
      auto wait_v_prev = [&]() {  // V_{ct-1}
        mbar_wait(vfull((ct - 1) % VST), ((ct - 1) / VST) & 1);
      };
      auto issue_s = [&]() {
        const uint32_t kbase = sK + (ct % KST) * TILE;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          const uint32_t qo = (kk >> 2) * (BM * 128) + (kk & 3) * 32;
          const uint32_t ko = (kk >> 2) * (BN * 128) + (kk & 3) * 32;
          const uint64_t da = WS_DA ? qd0 + (qo >> 4) : sf_desc(qdesc_base + qo, 16, 1024);
          const uint64_t db = WS_DA ? kd0 + ((kbase - sK + ko) >> 4) : sf_desc(kbase + ko, 16, 1024);
          WGMMA_S(s, da, db, kk > 0);
        }
        wg_commit();
      };
      auto issue_pv = [&]() {  // O += P_{ct-1} V_{ct-1}
        const uint32_t vbase = sV + ((ct - 1) % VST) * TILE;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk)
          WGMMA_O(o, pa[kk], WS_DA ? vd0 + ((vbase - sV + kk * 16 * 128) >> 4)
                                   : sf_desc(vbase + kk * 16 * 128, BN * 128, 1024), 1);
        wg_commit();
      };
      auto release_k = [&]() {  // after this warp's wait for S_ct: K slot (and Q after the last S)
        if (arrives) {
          release_slot(kempty(ct % KST));
          if (ckb == nkv - 1 && cn0 + BN >= (int)p.kv[ckb].len) mbar_arrive(qempty);
        }
      };
      auto softmax = [&]() {
        reg_fence<NS>(s);
        const int nvalid = (int)p.kv[ckb].len - cn0;
        if (nvalid < BN) sf_mask_cols<NS>(s, nvalid, t);
        sf_softmax<NS>(s, sl2, mr, lr, alpha);
      };
      auto rescale_o = [&]() {
        reg_fence<NJ>(o);
        if (sf_needs_rescale(alpha)) sf_rescale<NJ>(o, alpha);
        reg_fence<NJ>(o);
      };
      auto rescale_pack_next = [&]() {
        if (!WS_FO) rescale_o();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) sf_pack_a<NS>(s, kk, pa[kk]);
        reg_fence<NJ>(o);
        reg_fence_u<BN / 16>(pa);
        cn0 += BN;
        if (cn0 >= (int)p.kv[ckb].len) { ++ckb; cn0 = 0; }
        ++ct;
      };

      if (nkv > 0) {
        mbar_wait(qfull, it & 1);
        if (c == WS_NC - 1) named_arrive(1);  // consumer 0 issues first
        wait_k();
        if (!WS_TMA) fence_async_smem();  // cp.async (generic proxy) writes -> wgmma reads
        named_sync(my_bar);
        wg_fence();
        issue_s();
        named_arrive(next_bar);
        wg_wait<0>();
        release_k();
        softmax();
        rescale_pack_next();
        while (ckb < nkv) {
          wait_k();
          if (!WS_FO) wait_v_prev();
          if (!WS_TMA) fence_async_smem();
          named_sync(my_bar);
          wg_fence();
          issue_s();
          if (WS_FO) {  // O's rescale under the S GEMM, then V_{t-1}
            rescale_o();
            wait_v_prev();
            if (!WS_TMA) fence_async_smem();
            wg_fence();
          }
          issue_pv();
          named_arrive(next_bar);
          wg_wait<1>();  // S_t done, P_{t-1} V_{t-1} may still run
          release_k();
          softmax();     // overlaps the P V products on the tensor cores
          if (WS_OV) sf_sched_fence(p.flags);  // (else ptxas hoists the wait above the softmax)
          wg_wait<0>();
          if (arrives) release_slot(vempty((ct - 1) % VST));
          rescale_pack_next();
        }
        wait_v_prev();
        if (!WS_TMA) fence_async_smem();
        if (WS_FO) rescale_o();
        named_sync(my_bar);
        wg_fence();  // the last P V product
        issue_pv();
        named_arrive(next_bar);
        wg_wait<0>();
        if (arrives) release_slot(vempty((ct - 1) % VST));
        reg_fence<NJ>(o);
        if (c == 0) named_sync(my_bar);  // consume the last consumer's final arrive
      }
      if (x < tiles_q) sf_store<NJ>(p, qb, b, h, srow, lr0, nrow_ok, t, o, mr, lr);
    }
  }
  // a block must not exit while its cluster peer may still arrive on its barriers
  if (WS_CL == 2) cluster_sync();
}
