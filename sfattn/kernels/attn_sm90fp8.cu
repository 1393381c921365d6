// Hopper (sm_90a) FP8 fused multi-block attention forward: the contract of sfattn/fp8.py
// (precision="fp8"), same structure as attn_sm90ws.cu (a TMA producer warpgroup, WS_NC
// ping-ponging consumer warpgroups of 64 Q rows, K and V rings, O rescaled under the S GEMM).
//
// Operands, quantised by the rank that owns the tokens (sfattn/kernels/fp8_ops.py):
//   Q  int8 [B, S, H, D], one scale per (batch, head, 128-row block of its Q block)
//   K  int8 [B, S, H, D] of K - mu, one scale per (batch, head, 128-key block); mu fp32 [B, H, D]
//      per K/V block (the block's mean key). The kernel adds q . mu (fp32, once per Q tile and
//      K/V block) to every logit of the block, so softmax sees q . k exactly as quantised.
//   V  e4m3, transposed: [B, H, D, Sp] (Sp = keys rounded up to 32, zeros past the end), keys
//      permuted inside every 32-key group so that the e4m3 P fragment, built straight from the S
//      accumulator registers, meets its keys (fp8_ops.V_PERM); one scale per (batch, head, block).
// S = Q.K^T is an s8 wgmma into int32 (m64nBNk32); its values (|x| < 2^22 for D <= 128) become
// floats by the integer 0x4B400000 (x + 0x4B400000 is the float 1.5 * 2^23 + x): with F8_MI (the
// default) the accumulator starts there and the wgmma adds onto it, else one add each; the scale, the
// q . mu term and the running max fold into the one FMA in front of exp2. P in [0, 1] times
// 448 * vscale_block / vscale_max goes to e4m3 in registers; O += P.V is an e4m3 wgmma with fp32
// accumulation, N = D + 8: eight rows of ones (e4m3 1.0) under each V^T panel make the last eight
// columns P's row sums, so the softmax adds no P values (F8_LS; the sum of P as rounded); O is
// rescaled to true units (vscale_max / 448) only at the end (and on state load/store), so
// chaining, the running state and the log-sum-exp are those of the bf16 kernels.
// The running max is raised whenever a tile exceeds it (no slack: P must stay <= 1 for its e4m3
// scale). Head dim 128 (128-byte swizzled Q/K rows) and 64 (64-byte swizzle).
// F8_PV16=1 (precision="fp8-accurate"): V stays bf16/fp16 [B, S, H, D] and loads like the bf16
// kernels' V (64-channel panels, 128-byte swizzle); P goes to 16-bit in registers, unscaled (in
// [0, 1]), and O += P.V is a 16-bit wgmma (k16 steps): O is in true units throughout.
#define SF_TMA 1
#ifndef SF_RESCALE_THR
#define SF_RESCALE_THR 0
#endif
#include "sm90_common.cuh"
#include "wgmma_fp8_ops.cuh"
#ifndef F8_PV16
#define F8_PV16 0  // (the 16-bit wgmma wrappers come with sm90_common.cuh)
#endif
#include <stddef.h>

#ifndef WS_BN
#define WS_BN 128  // keys per K/V tile: 128 or 192 (64-key groups, each inside one K scale block)
#endif
#ifndef WS_KST
#define WS_KST 3
#endif
#ifndef WS_VST
#define WS_VST 3
#endif
#ifndef WS_PRODUCER_REGS
#define WS_PRODUCER_REGS 24
#endif
#ifndef WS_CONSUMER_REGS
#define WS_CONSUMER_REGS 240
#endif
#ifndef WS_NC
#define WS_NC 2
#endif
#ifndef F8_RP
#define F8_RP 0  // the softmax pipelined over the thread's two rows (row 1's max under row 0's exp2s)
#endif
#ifndef F8_SX
#define F8_SX 0  // the consumers' softmaxes take turns (named barriers 1 + NC + c), as their GEMMs do
#endif
#ifndef F8_MX
#define F8_MX 0  // a group's max of S with the 3-input integer max (VIMNMX3) on the magic floats' bits
#endif
#ifndef F8_QV
#define F8_QV 1  // q.mu at a K/V block switch: Q's bytes converted to float by their bits, not by I2F
#endif
#ifndef F8_QL
#define F8_QL 0  // 1: a K/V block's constants (V scale, K scales, Q rows, mu) loaded together, then used:
                 // one L2 round trip per block switch and Q tile (0: three; 1 schedules the hot loop worse)
#endif
#ifndef F8_QP
#define F8_QP 0  // 1: q.mu of every K/V block computed at a Q tile's start into a table in shared memory
                 // (Q's bytes loaded once, each block's mu a tile ahead): a block switch reads two floats
#endif
#if F8_QP && F8_QL
#error "F8_QP and F8_QL are two ways to load a block switch's q.mu: take one"
#endif
#ifndef F8_DG
#define F8_DG 0  // diagnostic (timeline builds only, wrong output): 1 no P.V wgmma, 2 no S wgmma either
#endif
#ifndef F8_MI
#define F8_MI 0  // the S accumulator starts at F8_MAGIC (the wgmma adds onto it): no add per logit
#endif
#if WS_BN != 128 && WS_BN != 192
#error "the FP8 kernel's K/V tiles are 128 or 192 keys (64-key groups)"
#endif
#define F8_NG (WS_BN / 64)  // 64-key groups per tile: each lies in one 128-key K scale block
#define F8_KBLK 128         // keys per K scale block
// V^T tiles (e4m3) load as panels of F8_VP keys x D channels: 128-byte rows (128-byte swizzle)
// when the tile is a multiple of 128 keys, else 64-byte rows (64-byte swizzle)
#define F8_VP (WS_BN % 128 == 0 ? 128 : 64)
#if SF_RESCALE_THR != 0
#error "the FP8 kernel quantises P in [0, 1]: no rescale slack"
#endif
#ifndef WS_DB
#define WS_DB 1  // 1: P fragments alternate between two register sets, so P_t is packed while
                 // P_{t-1} V_{t-1} still reads the other (softmax and pack overlap the P.V GEMM)
#endif
#ifndef WS_OV
#define WS_OV 0  // 1: the softmax of S_t (and with WS_DB the pack) overlaps P_{t-1} V_{t-1} inside a
                 // warpgroup (sf_sched_fence keeps ptxas from hoisting the wait above them)
#endif
#define WS_BM (64 * WS_NC)
#define WS_NT (128 * (WS_NC + 1))
#define F8_QROW SF_D  // bytes per Q/K row in shared memory (= the swizzle span)
#define F8_LAYOUT (SF_D == 128 ? 1 : 2)  // descriptor layout: 128- or 64-byte swizzle (leading
                                          // byte offset 16: unused by swizzled K-major operands)
#define F8_QBLK 128  // rows per Q scale block
#define WGMMA_S SF_CAT(sf_wgmma_s8_n, WS_BN)
#if F8_PV16
#define WGMMA_O SF_CAT(sf_wgmma_rs_n, SF_D)
#define F8_PK 16  // keys per P fragment (k16 16-bit wgmma)
#else
#if F8_LS
#define WGMMA_O(o, a, db, acc) SF_CAT(SF_CAT(sf_wgmma_e4m3_rs_n, SF_D), _ls)(o, ol[0], a, db, acc)
#else
#define WGMMA_O SF_CAT(sf_wgmma_e4m3_rs_n, SF_D)
#endif
#define F8_PK 32  // keys per P fragment (k32 8-bit wgmma)
#endif

struct F8Side {  // a per-block side array: pointer and (batch, head) strides in elements
  long long ptr, sb, sh;
};
// SfParams (q/k/v pointers and strides in bytes; v is the transposed, permuted V of each block)
// followed by the side arrays of every block
struct F8Params {
  SfParams base;
  F8Side qs[SF_MAXQ];   // fp32 [.., nblocks]: Q scale of 128-row block i at ptr + b sb + h sh + i
  F8Side ks[SF_MAXKV];  // fp32 [.., nblocks]: K scale per 128-key block
  F8Side mu[SF_MAXKV];  // fp32 [.., D]: the block's key mean
  F8Side vs[SF_MAXKV];  // fp32: V scale of the block
};

#ifndef F8_LS
#define F8_LS 0  // 1: P's row sums on the tensor cores - V^T tiles carry eight extra rows of ones
                 // (e4m3 1.0), the P.V wgmma is N = D + 8 and its last chunk is sum(P) per row;
                 // the softmax adds no P values (e4m3 P.V only)
#endif
#if F8_LS && F8_PV16
#error "F8_LS needs the e4m3 P.V (V^T tiles)"
#endif
#define F8_VROWS (SF_D + 8 * F8_LS)  // rows (channels) of a V^T panel in shared memory
#ifndef F8_TR
#define F8_TR 0  // 1: a timeline - the first thread of each consumer warpgroup of block (0, 0, 0)
                 // stores clock64() at F8_TR_EVENTS points of each of its first F8_TR_STEPS tile
                 // steps into f8_trace (perf/trace_fp8.py reads and prints it); a diagnostic build
#endif
#define F8_TR_STEPS 64
#define F8_TR_EVENTS 10
#if F8_TR
__device__ long long f8_trace[4 * F8_TR_STEPS * F8_TR_EVENTS];  // [consumer][step][event]
#endif
#ifndef WS_PP
#define WS_PP 1  // consumer ping-pong through named barriers (0: consumers issue independently)
#endif
// named barrier id between two consumer warpgroups (256 threads): wait for it, or only arrive
__device__ __forceinline__ void pair_sync(int id) { asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory"); }
__device__ __forceinline__ void pair_arrive(int id) { asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory"); }
// the GEMM ping-pong's turns (none with WS_PP=0)
__device__ __forceinline__ void named_sync(int id) {
  if (WS_PP) pair_sync(id);
}
__device__ __forceinline__ void named_arrive(int id) {
  if (WS_PP) pair_arrive(id);
}
// four floats -> four e4m3 bytes (a in the lowest), round to nearest even, saturating
__device__ __forceinline__ uint32_t f8_pack4(float a, float b, float c, float d) {
  uint32_t r;
  asm("{\n.reg .b16 lo, hi;\ncvt.rn.satfinite.e4m3x2.f32 lo, %2, %1;\n"
      "cvt.rn.satfinite.e4m3x2.f32 hi, %4, %3;\nmov.b32 %0, {lo, hi};\n}\n"
      : "=r"(r) : "f"(a), "f"(b), "f"(c), "f"(d));
  return r;
}
#define F8_MAGIC 0x4B400000u      // bits of 1.5 * 2^23
#define F8_MAGIC_F 12582912.0f    // 1.5 * 2^23

// the quad thread's D / 4 channels of K/V block kb's mu
__device__ __forceinline__ const float* f8_mu_ptr(const F8Params& p, int kb, int b, int h, int t) {
  return reinterpret_cast<const float*>(p.mu[kb].ptr) + b * p.mu[kb].sb + h * p.mu[kb].sh + t * (SF_D / 4);
}

// q . mu of the thread's rows (r, r + 8) for K/V block kb, in log2 units of the logits: the quad's
// four threads each take D / 4 channels of the int8 Q row (from global memory: the tile was just
// loaded, so these hit L2) and mu, then add across the quad.
__device__ __forceinline__ void f8_qmu(const F8Params& p, const SfQBlk& qb, int kb, int b, int h,
                                       int lr0, int nrow_ok, int t, float c_q, float (&bq)[2]) {
  constexpr int CH = SF_D / 4;
  const float* mu = f8_mu_ptr(p, kb, b, h, t);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float acc = 0.f;
    if (i < nrow_ok) {
      const int8_t* q = reinterpret_cast<const int8_t*>(qb.q) + b * qb.qsb +
                        (long long)(lr0 + 8 * i) * qb.qss + h * qb.qsh + t * CH;
#pragma unroll
      for (int c = 0; c < CH; c += 16) {
        const int4 w = *reinterpret_cast<const int4*>(q + c);
        const int ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int e4 = 0; e4 < 4; ++e4) {
#if F8_QV  // a byte to float by its bits (2^23 + x + 128, less 2^23 + 128), not I2F (16 per clock per SM)
          const uint32_t u = (uint32_t)ws[e4] ^ 0x80808080u;
#pragma unroll
          for (int e = 0; e < 4; ++e)
            acc = fmaf(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540u + e)) - 8388736.f,
                       __ldg(mu + c + 4 * e4 + e), acc);
#else
#pragma unroll
          for (int e = 0; e < 4; ++e)
            acc = fmaf((float)(int8_t)(ws[e4] >> (8 * e)), __ldg(mu + c + 4 * e4 + e), acc);
#endif
        }
      }
    }
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    acc += __shfl_xor_sync(0xffffffffu, acc, 2);
    bq[i] = acc * c_q;
  }
}

// F8_QL: what entering K/V block kb reads from global memory, loaded with no use in between (the
// loads of f8_qmu's rows, the V scale and the K scales then share one round trip to L2)
struct F8BlockLoads {
  float vsb;                // V scale of the block
  float ks[F8_NG];          // K scale of each 64-key group of the block's first tile
  int4 q[2][SF_D / 64];     // the quad thread's D / 4 bytes of rows r, r + 8 (0 past Q's end)
  float mu[SF_D / 4];       // and the same channels of the block's mu
};
// the quad thread's D / 4 bytes of Q rows r = lr0 and r + 8 (0 for the rows past Q's end)
__device__ __forceinline__ void f8_load_qrows(const SfQBlk& qb, int b, int h, int lr0, int nrow_ok, int t,
                                              int4 (&q4)[2][SF_D / 64]) {
  constexpr int CH = SF_D / 4;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int8_t* q = reinterpret_cast<const int8_t*>(qb.q) + b * qb.qsb +
                      (long long)(lr0 + 8 * i) * qb.qss + h * qb.qsh + t * CH;
#pragma unroll
    for (int c = 0; c < CH / 16; ++c) {
      q4[i][c] = make_int4(0, 0, 0, 0);
      if (i < nrow_ok) q4[i][c] = *reinterpret_cast<const int4*>(q + 16 * c);
    }
  }
}
__device__ __forceinline__ void f8_block_load(const F8Params& p, const SfQBlk& qb, int kb, int b, int h,
                                              int lr0, int nrow_ok, int t, F8BlockLoads& L) {
  constexpr int CH = SF_D / 4;
  L.vsb = reinterpret_cast<const float*>(p.vs[kb].ptr)[b * p.vs[kb].sb + h * p.vs[kb].sh];
  const float* ks = reinterpret_cast<const float*>(p.ks[kb].ptr) + b * p.ks[kb].sb + h * p.ks[kb].sh;
  const int last = (int)p.base.kv[kb].len - 1;
#pragma unroll
  for (int g = 0; g < F8_NG; ++g) L.ks[g] = ks[min(64 * g, last) / F8_KBLK];
  const float* mu = f8_mu_ptr(p, kb, b, h, t);
#pragma unroll
  for (int c = 0; c < CH; ++c) L.mu[c] = __ldg(mu + c);
  f8_load_qrows(qb, b, h, lr0, nrow_ok, t, L.q);
}
// q . mu from F8BlockLoads, the same products in the same order as f8_qmu (bitwise its result)
__device__ __forceinline__ void f8_qmu_loaded(const F8BlockLoads& L, float c_q, float (&bq)[2]) {
  constexpr int CH = SF_D / 4;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float acc = 0.f;
#pragma unroll
    for (int c = 0; c < CH; c += 16) {
      const int4 w = L.q[i][c / 16];
      const int ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int e4 = 0; e4 < 4; ++e4) {
#if F8_QV
        const uint32_t u = (uint32_t)ws[e4] ^ 0x80808080u;
#pragma unroll
        for (int e = 0; e < 4; ++e)
          acc = fmaf(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540u + e)) - 8388736.f,
                     L.mu[c + 4 * e4 + e], acc);
#else
#pragma unroll
        for (int e = 0; e < 4; ++e)
          acc = fmaf((float)(int8_t)(ws[e4] >> (8 * e)), L.mu[c + 4 * e4 + e], acc);
#endif
      }
    }
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    acc += __shfl_xor_sync(0xffffffffu, acc, 2);
    bq[i] = acc * c_q;
  }
}

// F8_QP: q.mu of rows (r, r + 8) for each of the nkv K/V blocks into tab[kb * WS_BM + row] (row: the
// tile's row of r), bitwise f8_qmu's values (f8_qmu_loaded: the same products in the same order).
// Q's bytes load once, and the next block's mu loads while this block's products run.
__device__ __forceinline__ void f8_qmu_table(const F8Params& p, const SfQBlk& qb, int nkv, int b, int h,
                                             int lr0, int nrow_ok, int t, float c_q, float* tab, int row) {
  constexpr int CH = SF_D / 4;
  F8BlockLoads L;
  __syncwarp();  // the previous Q tile's reads of the table are done
  f8_load_qrows(qb, b, h, lr0, nrow_ok, t, L.q);
  float nxt[CH];
  const float* mu0 = f8_mu_ptr(p, 0, b, h, t);
#pragma unroll
  for (int c = 0; c < CH; ++c) nxt[c] = __ldg(mu0 + c);
  for (int kb = 0; kb < nkv; ++kb) {
#pragma unroll
    for (int c = 0; c < CH; ++c) L.mu[c] = nxt[c];
    if (kb + 1 < nkv) {
      const float* mu1 = f8_mu_ptr(p, kb + 1, b, h, t);
#pragma unroll
      for (int c = 0; c < CH; ++c) nxt[c] = __ldg(mu1 + c);
    }
    float bq[2];
    f8_qmu_loaded(L, c_q, bq);
    if (t == 0) {
      tab[kb * WS_BM + row] = bq[0];
      tab[kb * WS_BM + row + 8] = bq[1];
    }
  }
  __syncwarp();  // the quad's other threads read what its first wrote
}

#ifndef WS_PX
#define WS_PX 0  // n8 column chunks (of NS per tile) whose exp2 runs on the FMA pipes, not MUFU
#endif
// 2^x on the FMA pipes (for x <= ~9): x = n + f with n = round(x) (the magic-number add), 2^f by
// a cubic on [-1/2, 1/2] (relative error < 1e-4, far below e4m3's 2^-4 step of P), n added to
// the exponent bits. Spreads the softmax's exponentials over MUFU and FMA when MUFU is the limit.
__device__ __forceinline__ float f8_exp2_fma(float x) {
  x = fmaxf(x, -125.f);
  const float t = x + F8_MAGIC_F;  // low bits of t hold round(x)
  const float f = x - (t - F8_MAGIC_F);
  const float p = fmaf(fmaf(fmaf(0.05592204f, f, 0.24264008f), f, 0.69312103f), f, 0.99992448f);
  return __int_as_float(__float_as_int(p) + (__float_as_int(t) << 23));
}

// Softmax of one int32 S tile in place (the C layout of sf_softmax): logits in log2 units are
// x * c[g] + bq[i] for the accumulator value x of a key in 64-key group g (c[g] >= 0: the group's
// K scale times Q's); returns in s the e4m3-ready P * pscale (as float bits), updates the running
// max / sum (in P units) and alpha.
template <int NS, class Mark>
__device__ __forceinline__ void f8_softmax(uint32_t (&s)[NS][4], int nvalid, int t, const float (&c)[NS / 8],
                                           const float (&bq)[2], float log2_pscale, float inv_pscale,
                                           float (&mr)[2], float (&lr)[2], float (&alpha)[2],
                                           long long flags, Mark mark) {
  constexpr int NG = NS / 8;
#if !F8_MI  // (with F8_MI the S GEMM accumulated onto F8_MAGIC)
#pragma unroll
  for (int j = 0; j < NS; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] += F8_MAGIC;  // the float 1.5 * 2^23 + x, exactly
#endif
  if (nvalid < WS_BN) {  // the last tile of a block: keys past its end
#pragma unroll
    for (int j = 0; j < NS; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (8 * j + 2 * t + (e & 1) >= nvalid) s[j][e] = __float_as_uint(-INFINITY);
  }
  float add[2][NG];
  auto prep = [&](int i) {  // row i's max, alpha and the per-group terms of its exp2 arguments
    float bias[NG], m_tile = -INFINITY;
#pragma unroll
    for (int g = 0; g < NG; ++g) {  // the group's max, then in logit units (c[g] >= 0: monotone)
#if F8_MX  // as signed ints: the magic floats are positive (bits ordered as values), -inf negative
      auto v = [&](int k) { return (int)s[8 * g + k / 2][2 * i + (k & 1)]; };
      int a = __vimax3_s32(v(0), v(1), v(2)), b = __vimax3_s32(v(3), v(4), v(5));
#pragma unroll
      for (int k = 6; k < 14; k += 4) {
        a = __vimax3_s32(a, v(k), v(k + 1));
        b = __vimax3_s32(b, v(k + 2), v(k + 3));
      }
      const float mx = __int_as_float(max(__vimax3_s32(a, b, v(14)), v(15)));
#else
      float mx0 = fmaxf(__uint_as_float(s[8 * g][2 * i]), __uint_as_float(s[8 * g][2 * i + 1]));
      float mx1 = fmaxf(__uint_as_float(s[8 * g + 1][2 * i]), __uint_as_float(s[8 * g + 1][2 * i + 1]));
#pragma unroll
      for (int j = 8 * g + 2; j < 8 * g + 8; j += 2) {  // seeded by the first pair: no -inf to fold
        mx0 = fmaxf(mx0, fmaxf(__uint_as_float(s[j][2 * i]), __uint_as_float(s[j][2 * i + 1])));
        mx1 = fmaxf(mx1, fmaxf(__uint_as_float(s[j + 1][2 * i]), __uint_as_float(s[j + 1][2 * i + 1])));
      }
      const float mx = fmaxf(mx0, mx1);
#endif
      bias[g] = bq[i] - F8_MAGIC_F * c[g];       // logit = f * c[g] + bias[g]
      const float mg = fmaf(mx, c[g], bias[g]);  // -inf for all-masked keys
      m_tile = (g == 0) ? mg : fmaxf(m_tile, mg);
    }
    m_tile = fmaxf(m_tile, __shfl_xor_sync(0xffffffffu, m_tile, 1));
    m_tile = fmaxf(m_tile, __shfl_xor_sync(0xffffffffu, m_tile, 2));
    const float m_new = fmaxf(mr[i], m_tile);
    const float m_use = (m_new == -INFINITY) ? 0.f : m_new;
    alpha[i] = (m_new == mr[i]) ? 1.f : sf_exp2(mr[i] - m_use);
    mr[i] = m_new;
#pragma unroll
    for (int g = 0; g < NG; ++g) add[i][g] = bias[g] - m_use + log2_pscale;
  };
  auto exps = [&](int i) {  // row i's P * pscale into s (and without LS its sum into lr)
#if !F8_LS
    float sum0 = 0.f, sum1 = 0.f;
#endif
#pragma unroll
    for (int j = 0; j < NS; ++j) {
      const float a0 = fmaf(__uint_as_float(s[j][2 * i]), c[j / 8], add[i][j / 8]);
      const float a1 = fmaf(__uint_as_float(s[j][2 * i + 1]), c[j / 8], add[i][j / 8]);
      const bool fma_pipe = j % 8 >= 8 - WS_PX * 8 / NS;  // spread over the tile
      const float p0 = fma_pipe ? f8_exp2_fma(a0) : sf_exp2(a0);
      const float p1 = fma_pipe ? f8_exp2_fma(a1) : sf_exp2(a1);
      s[j][2 * i] = __float_as_uint(p0);
      s[j][2 * i + 1] = __float_as_uint(p1);
#if !F8_LS
      sum0 += p0;
      sum1 += p1;
#endif
    }
#if F8_LS  // lr stays in O's running-max reference: the caller rescales it with O and adds P.V's sums
    (void)inv_pscale;
#else
    lr[i] = lr[i] * alpha[i] + (sum0 + sum1) * inv_pscale;
#endif
  };
#if F8_RP  // block boundaries: row 1's max can only fill row 0's exp2 stream, not run ahead of it
  prep(0);
  sf_sched_fence(flags);
  mark(8);  // (the timeline build: row 0's max done)
  prep(1);
  exps(0);
  sf_sched_fence(flags);
  mark(9);  // row 0's exp2s and row 1's max done
  exps(1);
#else
  (void)flags;
  (void)mark;
  prep(0);
  exps(0);
  prep(1);
  exps(1);
#endif
}

// P (C layout, floats in s) of keys 32kk..32kk+31 as the e4m3 A fragment of a k32 wgmma: the
// thread's row-g values of n8 chunks 4kk, 4kk+1 fill A columns 4t..4t+3 and those of 4kk+2, 4kk+3
// columns 16+4t..19+4t (row g + 8 likewise): A column a holds key V_PERM(a) of the group, which
// is where the quantiser put that key's V.
template <int NS>
__device__ __forceinline__ void f8_pack_a(const uint32_t (&s)[NS][4], int kk, uint32_t (&a)[4]) {
  const int j = 4 * kk;
#define F_(jj, e) __uint_as_float(s[jj][e])
  a[0] = f8_pack4(F_(j, 0), F_(j, 1), F_(j + 1, 0), F_(j + 1, 1));
  a[1] = f8_pack4(F_(j, 2), F_(j, 3), F_(j + 1, 2), F_(j + 1, 3));
  a[2] = f8_pack4(F_(j + 2, 0), F_(j + 2, 1), F_(j + 3, 0), F_(j + 3, 1));
  a[3] = f8_pack4(F_(j + 2, 2), F_(j + 2, 3), F_(j + 3, 2), F_(j + 3, 3));
#undef F_
}

// P (C layout, floats in s) of keys 16kk..16kk+15 as the A fragment of a k16 16-bit wgmma: the C
// layout of n8 chunks 2kk, 2kk+1 is the A layout (as sf_pack_a of the bf16 kernels)
template <int NS>
__device__ __forceinline__ void f8_pack_a16(const uint32_t (&s)[NS][4], int kk, uint32_t (&a)[4]) {
#define F_(jj, e) __uint_as_float(s[jj][e])
  a[0] = sf_pack2(F_(2 * kk, 0), F_(2 * kk, 1));
  a[1] = sf_pack2(F_(2 * kk, 2), F_(2 * kk, 3));
  a[2] = sf_pack2(F_(2 * kk + 1, 0), F_(2 * kk + 1, 1));
  a[3] = sf_pack2(F_(2 * kk + 1, 2), F_(2 * kk + 1, 3));
#undef F_
}

extern "C" __global__ void __launch_bounds__(WS_NT, 1) sf_attn_sm90fp8(const __grid_constant__ F8Params pp) {
  constexpr int D = SF_D, BM = WS_BM, BN = WS_BN, KST = WS_KST, VST = WS_VST;
  constexpr int NJ = D / 8, NS = BN / 8;
  constexpr uint32_t KTILE = BN * D, VBYTES = D * BN * (F8_PV16 ? 2 : 1);  // bytes loaded per tile
  constexpr uint32_t VTILE = F8_VROWS * BN * (F8_PV16 ? 2 : 1);  // a V slot (with F8_LS: ones rows)
  constexpr uint32_t SBO_QK = 8 * F8_QROW;
  const SfParams& p = pp.base;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  __shared__ __align__(8) uint64_t bars[2 * KST + 2 * VST + 2];
  const uint32_t s0 = (sf_smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sQ = s0;
  const uint32_t sK = sQ + BM * F8_QROW;
  const uint32_t sV = sK + KST * KTILE;
#if F8_QP  // q.mu table: SF_MAXKV blocks x BM rows of floats, after the V slots
  float* const qmu_tab = reinterpret_cast<float*>(smem_raw + (sV + VST * VTILE - sf_smem_u32(smem_raw)));
#endif
  const uint32_t bar0 = sf_smem_u32(bars);
  auto kfull = [&](int i) { return bar0 + 8 * i; };
  auto kempty = [&](int i) { return bar0 + 8 * (KST + i); };
  auto vfull = [&](int i) { return bar0 + 8 * (2 * KST + i); };
  auto vempty = [&](int i) { return bar0 + 8 * (2 * KST + VST + i); };
  const uint32_t qfull = bar0 + 8 * (2 * KST + 2 * VST);
  const uint32_t qempty = qfull + 8;

  const int tid = threadIdx.x, wg = tid >> 7;
  const int b = blockIdx.z;
  const int nkv = (int)p.nkv;
  const SfQBlk& qlast = p.q[p.nq - 1];
  const int tiles_x = (int)qlast.tile0 + (int)((qlast.len + BM - 1) / BM);
  const int ntiles = tiles_x * (int)p.H;
  constexpr uint32_t EMPTY_COUNT = 4 * WS_NC;  // one arrival per consumer warp

  if (tid == 0) {
    for (int i = 0; i < KST; ++i) { mbar_init(kfull(i), 1); mbar_init(kempty(i), EMPTY_COUNT); }
    for (int i = 0; i < VST; ++i) { mbar_init(vfull(i), 1); mbar_init(vempty(i), EMPTY_COUNT); }
    mbar_init(qfull, 1);
    mbar_init(qempty, EMPTY_COUNT);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
#if F8_LS  // the ones rows of every V^T panel (never written by TMA; a row of equal bytes is the
           // same under any swizzle), made visible to the async proxy that wgmma reads through
  for (int w = tid; w < VST * (BN / F8_VP) * 2 * F8_VP; w += WS_NT) {
    const int panel = w / (2 * F8_VP), word = w % (2 * F8_VP);  // 8 rows x F8_VP bytes = 2 F8_VP words
    asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(sV + panel * F8_VROWS * F8_VP + D * F8_VP + 4 * word),
                 "r"(0x38383838u) : "memory");
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
  __syncthreads();

  if (wg == 0) {
    // ------------------------------ producer ------------------------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(WS_PRODUCER_REGS));
    if (tid == 0 && nkv > 0) {
      for (int kb = 0; kb < nkv; ++kb) { tma_prefetch_map(&p.tk[kb]); tma_prefetch_map(&p.tv[kb]); }
      int lt = 0, it = 0;
      for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x, ++it) {
        const int x = tile % tiles_x, h = tile / tiles_x;
        const int qi = sf_find_qblock(p, x);
        const int qrow0 = (x - (int)p.q[qi].tile0) * BM;
        if (it > 0) mbar_wait(qempty, (it - 1) & 1);
        mbar_expect_tx(qfull, BM * F8_QROW);
        tma_load_4d(sQ, &p.tq[qi], 0, qrow0, h, b, qfull);
        for (int kb = 0; kb < nkv; ++kb) {
          const int len = (int)p.kv[kb].len;
          for (int n0 = 0; n0 < len; n0 += BN, ++lt) {
            const int ks = lt % KST, vs = lt % VST;
            if (lt >= KST) mbar_wait(kempty(ks), ((lt / KST) - 1) & 1);
            mbar_expect_tx(kfull(ks), KTILE);
            tma_load_4d(sK + ks * KTILE, &p.tk[kb], 0, n0, h, b, kfull(ks));
            if (lt >= VST) mbar_wait(vempty(vs), ((lt / VST) - 1) & 1);
            mbar_expect_tx(vfull(vs), VBYTES);
#if F8_PV16
#pragma unroll
            for (int pn = 0; pn < D / 64; ++pn)  // 64-channel panels of BN rows
              tma_load_4d(sV + vs * VTILE + pn * BN * 128, &p.tv[kb], pn * 64, n0, h, b, vfull(vs));
#else
#pragma unroll
            for (int pn = 0; pn < BN / F8_VP; ++pn)  // V^T panels of F8_VP keys x D channels
              tma_load_4d(sV + vs * VTILE + pn * F8_VROWS * F8_VP, &p.tv[kb], n0 + pn * F8_VP, 0, h, b, vfull(vs));
#endif
          }
        }
      }
    }
  } else {
    // ------------------------------ consumers ------------------------------
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(WS_CONSUMER_REGS));
    const int c = wg - 1, ctid = tid - 128;
    const int warp = (ctid >> 5) & 3, lane = ctid & 31, t = lane & 3;
    const float sl2 = (float)p.scale_log2;
    const uint32_t qdesc_base = sQ + c * 64 * F8_QROW;
    const int my_bar = 1 + c, next_bar = 1 + (c + 1) % WS_NC;
    const int sx_my = 1 + WS_NC + c, sx_next = 1 + WS_NC + (c + 1) % WS_NC;  // F8_SX
    const bool arrives = lane == 0;
    uint32_t pa0[BN / F8_PK][4], pa1[BN / F8_PK][4];
#if F8_DG  // what a left-out GEMM would read goes into a sink that decides a store, so that ptxas
           // keeps the softmax (an empty asm fence does not reach ptxas); S of DG=2 is opaque
    uint32_t dg_sink = 0;
    const uint32_t dg_zero = (uint32_t)(p.flags >> 48);  // 0 at run time, unknown to ptxas
#endif
    uint32_t s[NS][4];
    float o[NJ][4], mr[2], lr[2], alpha[2], bq[2];
#if F8_LS
    float ol[1][4];    // the ones columns of O: P's row sums (rows g, g + 8) since the last fold
    float inv_ps_pv;  // 1 / P's scale in the P.V in flight (its tile's K/V block); 0 but in the
                      // quad's first thread: each thread's ones columns hold the whole row's sum,
                      // while lr is a per-thread partial that sf_store sums over the quad
#endif
    // ring slot and phase of the current tile (K, V) and of the previous one (V), advanced per tile
    // (no % or / per tile); wgmma descriptors made once, advanced by adds
    int k_slot = 0, k_ph = 0, v_slot = 0, v_ph = 0, vp_slot = 0, vp_ph = 0;
#if F8_TR
    const bool tr_on = blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 && ctid % 128 == 0;
    int tr_n = 0;  // tile steps recorded
#define F8_MARK(e)                                                                          \
  do {                                                                                       \
    if (tr_on && tr_n < F8_TR_STEPS) f8_trace[(c * F8_TR_STEPS + tr_n) * F8_TR_EVENTS + (e)] = clock64(); \
  } while (0)
#else
#define F8_MARK(e) \
  do {             \
  } while (0)
#endif
    const uint64_t q_desc = sf_desc(qdesc_base, 16, SBO_QK, F8_LAYOUT);  // descriptors of slot 0;
    const uint64_t k_desc = sf_desc(sK, 16, SBO_QK, F8_LAYOUT);          // their address field is
#if F8_PV16                                                               // bits 0-13 in 16-byte units
    const uint64_t v_desc = sf_desc(sV, BN * 128, 1024);
#else
    const uint64_t v_desc = sf_desc(sV, 16, 8 * F8_VP, F8_VP == 128 ? 1 : 2);
#endif

    int it = 0;
    for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x, ++it) {
      const int x = tile % tiles_x, h = tile / tiles_x;
      const int qi = sf_find_qblock(p, x);
      const SfQBlk& qb = p.q[qi];
      const int qrow0 = (x - (int)qb.tile0) * BM;
      const int lr0 = qrow0 + c * 64 + warp * 16 + (lane >> 2);
      const long long srow = qb.row0 + lr0;
      const int nrow_ok = min(2, max(0, ((int)qb.len - lr0 + 7) / 8));
      const int qr = qrow0 + c * 64;  // a 64-row group lies inside one 128-row scale block
      auto load_qscale = [&]() {
        return qr < (int)qb.len ? reinterpret_cast<const float*>(pp.qs[qi].ptr)[
            b * pp.qs[qi].sb + h * pp.qs[qi].sh + qr / F8_QBLK] : 0.f;
      };
#if F8_QL
      const float qscale = load_qscale();  // with the V scales
#endif
#if F8_PV16
      const float o_unit = 1.f;  // P unscaled, V in true units
#else
      // V scales of this (batch, head): P is scaled by 448 * vs[kb] / vmax, O is in vmax / 448 units
      float vmax = 0.f;
      for (int kb = 0; kb < nkv; ++kb)
        vmax = fmaxf(vmax, reinterpret_cast<const float*>(pp.vs[kb].ptr)[b * pp.vs[kb].sb + h * pp.vs[kb].sh]);
      if (!(vmax > 0.f)) vmax = 1.f;
      const float o_unit = vmax * (1.f / 448.f);
#endif
      sf_load_state<NJ>(p, b, h, srow, nrow_ok, t, o, mr, lr);
      if (!(p.flags & SF_INIT)) {
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) o[j][e] *= 1.f / o_unit;
      }
#if !F8_QL
      const float qscale = load_qscale();
#endif
      const float cq = qscale * sl2;
      int ckb = 0, cn0 = 0;
      float log2_ps = 0.f, inv_ps = 1.f, ks_next[F8_NG];
      const float* kscale = nullptr;
      auto load_kscales = [&]() {  // the K scale of each 64-key group of the tile at cn0 (a group
        const int last = (int)p.kv[ckb].len - 1;  // past the block's end reads the last block's)
#pragma unroll
        for (int g = 0; g < F8_NG; ++g) ks_next[g] = kscale[min(cn0 + 64 * g, last) / F8_KBLK];
      };
#if F8_QP
      const int tab_row = c * 64 + warp * 16 + (lane >> 2);  // r's row in the Q tile
#endif
#if F8_QL
      auto enter_block = [&]() {  // per-block constants of K/V block ckb
        F8BlockLoads L;
        f8_block_load(pp, qb, ckb, b, h, lr0, nrow_ok, t, L);
#if !F8_PV16
        const float ps = L.vsb > 0.f ? 448.f * L.vsb / vmax : 448.f;  // scales are > 0 (quant.py)
        log2_ps = __log2f(ps);
        inv_ps = 1.f / ps;
#endif
        kscale = reinterpret_cast<const float*>(pp.ks[ckb].ptr) + b * pp.ks[ckb].sb + h * pp.ks[ckb].sh;
#pragma unroll
        for (int g = 0; g < F8_NG; ++g) ks_next[g] = L.ks[g];
        f8_qmu_loaded(L, cq, bq);
      };
#else
      auto enter_block = [&]() {  // per-block constants of K/V block ckb
#if !F8_PV16
        const float vsb = reinterpret_cast<const float*>(pp.vs[ckb].ptr)[b * pp.vs[ckb].sb + h * pp.vs[ckb].sh];
        const float ps = vsb > 0.f ? 448.f * vsb / vmax : 448.f;  // scales are > 0 (quant.py)
        log2_ps = __log2f(ps);
        inv_ps = 1.f / ps;
#endif
        kscale = reinterpret_cast<const float*>(pp.ks[ckb].ptr) + b * pp.ks[ckb].sb + h * pp.ks[ckb].sh;
        load_kscales();
#if F8_QP
        bq[0] = qmu_tab[ckb * BM + tab_row];
        bq[1] = qmu_tab[ckb * BM + tab_row + 8];
#else
        f8_qmu(pp, qb, ckb, b, h, lr0, nrow_ok, t, cq, bq);
#endif
      };
#endif

      auto wait_k = [&]() { mbar_wait(kfull(k_slot), k_ph); };
      auto wait_v_prev = [&]() { mbar_wait(vfull(vp_slot), vp_ph); };
      auto seed_s = [&]() {  // F8_MI: S accumulates onto F8_MAGIC (before the turn's wait)
#if F8_MI
#pragma unroll
        for (int j = 0; j < NS; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[j][e] = F8_MAGIC;
#endif
      };
      auto issue_s = [&]() {
        const uint64_t kd = k_desc + (uint64_t)(k_slot * (KTILE >> 4));
#pragma unroll
        for (int kk = 0; kk < D / 32 * (F8_DG < 2); ++kk) WGMMA_S(s, q_desc + 2 * kk, kd + 2 * kk, F8_MI || kk > 0);
        wg_commit();
#if F8_DG >= 2
#pragma unroll
        for (int j = 0; j < NS; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[j][e] += dg_zero;
#endif
      };
      auto issue_pv = [&](const uint32_t (&pa)[BN / F8_PK][4]) {  // O += P V of the previous tile
        const uint64_t vd = v_desc + (uint64_t)(vp_slot * (VTILE >> 4));
#pragma unroll
        for (int kk = 0; kk < BN / F8_PK * (F8_DG < 1); ++kk)
#if F8_PV16
          WGMMA_O(o, pa[kk], vd + kk * 16 * 128 / 16, 1);
#else
          WGMMA_O(o, pa[kk], vd + ((kk * 32 / F8_VP) * F8_VROWS * F8_VP + kk * 32 % F8_VP) / 16, 1);
#endif
        wg_commit();
#if F8_DG
#pragma unroll
        for (int kk = 0; kk < BN / F8_PK; ++kk) dg_sink ^= pa[kk][0] ^ pa[kk][1] ^ pa[kk][2] ^ pa[kk][3];
#endif
      };
      auto release_k = [&]() {
        if (arrives) {
          mbar_arrive(kempty(k_slot));
          if (ckb == nkv - 1 && cn0 + BN >= (int)p.kv[ckb].len) mbar_arrive(qempty);
        }
      };
      auto softmax = [&]() {
        reg_fence_u<NS>(s);
        const int nvalid = (int)p.kv[ckb].len - cn0;
        float ck[F8_NG];  // loaded a tile ahead: no global load in front of exp2
#pragma unroll
        for (int g = 0; g < F8_NG; ++g) ck[g] = cq * ks_next[g];
        if (F8_SX) pair_sync(sx_my);  // my turn on the exp2 units
        if (F8_SX && !F8_RP) F8_MARK(8);
        f8_softmax<NS>(s, nvalid, t, ck, bq, log2_ps, inv_ps, mr, lr, alpha, p.flags, [&](int e) { F8_MARK(e); });
        if (F8_SX) pair_arrive(sx_next);
        reg_fence_u<NS>(s);  // P complete here, before the wait for P_{t-1} V_{t-1}: they overlap
      };
      auto rescale_o = [&]() {
        reg_fence<NJ>(o);
#if F8_LS
        reg_fence<1>(ol);
        if (sf_needs_rescale(alpha)) {
          sf_rescale<NJ>(o, alpha);
          sf_rescale<1>(ol, alpha);
          lr[0] *= alpha[0];
          lr[1] *= alpha[1];
        }
        reg_fence<1>(ol);
#else
        if (sf_needs_rescale(alpha)) sf_rescale<NJ>(o, alpha);
#endif
        reg_fence<NJ>(o);
      };
      auto fold_sums = [&]() {  // after a P.V completes: its row sums (in P's scale) into lr
#if F8_LS
        reg_fence<1>(ol);
        lr[0] = fmaf(ol[0][0], inv_ps_pv, lr[0]);
        lr[1] = fmaf(ol[0][2], inv_ps_pv, lr[1]);
#pragma unroll
        for (int e = 0; e < 4; ++e) ol[0][e] = 0.f;
        reg_fence<1>(ol);
#endif
      };
      auto pack = [&](uint32_t (&pa)[BN / F8_PK][4]) {
#pragma unroll
        for (int kk = 0; kk < BN / F8_PK; ++kk)
#if F8_PV16
          f8_pack_a16<NS>(s, kk, pa[kk]);
#else
          f8_pack_a<NS>(s, kk, pa[kk]);
#endif
        reg_fence_u<BN / F8_PK>(pa);
      };
      auto advance = [&]() {
        reg_fence<NJ>(o);
#if F8_LS
        inv_ps_pv = t == 0 ? inv_ps : 0.f;  // the tile just softmaxed is the next P.V's
#endif
        cn0 += BN;
        if (cn0 >= (int)p.kv[ckb].len) {
          ++ckb;
          cn0 = 0;
          if (ckb < nkv) enter_block();
        } else {
          load_kscales();
        }
        vp_slot = v_slot;
        vp_ph = v_ph;
        if (++v_slot == VST) { v_slot = 0; v_ph ^= 1; }
        if (++k_slot == KST) { k_slot = 0; k_ph ^= 1; }
      };
      // one K/V tile after the first: S_t, then P_{t-1} V_{t-1} from pin, P_t packed into pout
      // F8_MARK events: 0 step start, 1 K tile ready, 2 my turn (ping-pong), 3 both GEMMs issued,
      // 4 S ready, 5 softmax done, 6 P.V done, 7 step end
      auto step = [&](const uint32_t (&pin)[BN / F8_PK][4], uint32_t (&pout)[BN / F8_PK][4]) {
        F8_MARK(0);
        seed_s();
        wait_k();
        F8_MARK(1);
        named_sync(my_bar);
        F8_MARK(2);
        wg_fence();
        issue_s();
        rescale_o();  // under the S GEMM, then V_{t-1}
        wait_v_prev();
        wg_fence();
        issue_pv(pin);
        named_arrive(next_bar);
        F8_MARK(3);
        wg_wait<1>();
        F8_MARK(4);
        release_k();
        softmax();
        if (WS_DB) pack(pout);
        F8_MARK(5);
        if (WS_OV) sf_sched_fence(p.flags);  // keep the wait below softmax and pack
        wg_wait<0>();
        F8_MARK(6);
        if (arrives) mbar_arrive(vempty(vp_slot));
        fold_sums();
        if (!WS_DB) pack(pout);
        advance();
        F8_MARK(7);
#if F8_TR
        ++tr_n;
#endif
      };

      if (nkv > 0) {
#if F8_LS
#pragma unroll
        for (int e = 0; e < 4; ++e) ol[0][e] = 0.f;
#endif
#if F8_QP
        f8_qmu_table(pp, qb, nkv, b, h, lr0, nrow_ok, t, cq, qmu_tab, tab_row);
#endif
        enter_block();
        seed_s();
        mbar_wait(qfull, it & 1);
        if (c == WS_NC - 1) named_arrive(1);  // consumer 0 issues first
        if (F8_SX && c == WS_NC - 1) pair_arrive(1 + WS_NC);  // and takes the first softmax turn
        wait_k();
        named_sync(my_bar);
        wg_fence();
        issue_s();
        named_arrive(next_bar);
        wg_wait<0>();
        release_k();
        softmax();
        pack(pa0);
        advance();
        bool in1 = false;  // the last P is in pa1
        while (ckb < nkv) {
          if (WS_DB) {
            step(pa0, pa1);
            in1 = true;
            if (ckb >= nkv) break;
            step(pa1, pa0);
            in1 = false;
          } else {
            step(pa0, pa0);
          }
        }
        wait_v_prev();
        rescale_o();
        named_sync(my_bar);
        wg_fence();
        if (in1) {  // the last P to pa0: one wgmma site (no compiler-injected warpgroup.arrive)
#pragma unroll
          for (int kk = 0; kk < BN / F8_PK; ++kk)
#pragma unroll
            for (int e = 0; e < 4; ++e) pa0[kk][e] = pa1[kk][e];
        }
        reg_fence_u<BN / F8_PK>(pa0);
        issue_pv(pa0);
        named_arrive(next_bar);
        wg_wait<0>();
        if (arrives) mbar_arrive(vempty(vp_slot));
        fold_sums();
        reg_fence<NJ>(o);
        if (c == 0) named_sync(my_bar);  // consume the last consumer's final arrive
        if (F8_SX && c == 0) pair_sync(sx_my);  // (and its last softmax's)
      }
#pragma unroll
      for (int j = 0; j < NJ; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[j][e] *= o_unit;
#if F8_DG
      if (dg_sink == 0x7F3C1D5Bu + dg_zero) f8_trace[0] = dg_sink;  // (almost) never taken
#endif
      sf_store<NJ>(p, qb, b, h, srow, lr0, nrow_ok, t, o, mr, lr);
    }
  }
}
#undef F8_MARK
