// Shared pieces of the fused multi-block attention kernels (sfattn.kernels).
//
// Compile-time configuration (set by sfattn/kernels/_build.py):
//   SF_D      head dim (64 or 128)
//   SF_FP16   1 for fp16 inputs, 0 for bf16
//   SF_MAXQ / SF_MAXKV  capacity of the block tables in the parameter struct
//
// One launch attends every Q block to every K/V block.  All block pointers, lengths and
// strides travel by value in SfParams (a __grid_constant__ kernel parameter: no device
// descriptor upload per call).  Every field is 8 bytes so the host side can fill a flat
// int64 buffer (see _launch.py: the field order here and there must match).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#ifndef SF_D
#define SF_D 128
#endif
#ifndef SF_FP16
#define SF_FP16 0
#endif
#ifndef SF_MAXQ
#define SF_MAXQ 16
#endif
#ifndef SF_MAXKV
#define SF_MAXKV 16
#endif
#ifndef SF_TMA
#define SF_TMA 0  // 1: SfParams also carries TMA tensor maps of the K and V blocks (sm90ws)
#endif

#if SF_FP16
typedef __half sf_elem;
#else
typedef __nv_bfloat16 sf_elem;
#endif

struct SfQBlk {
  long long q, o;              // device pointers (q block, output block)
  long long qsb, qss, qsh;     // q strides in elements (batch, seq, head); head-dim stride is 1
  long long osb, oss, osh;     // output strides
  long long len;               // rows in this block (> 0)
  long long tile0;             // exclusive prefix sum of Q tiles over the blocks before it
  long long row0;              // first state row of this block
};

struct SfKVBlk {
  long long k, v;
  long long ksb, kss, ksh;
  long long vsb, vss, vsh;
  long long len;               // keys in this block (> 0)
};

// An opaque CUtensorMap (cuTensorMapEncodeTiled on the host), 64-byte aligned as the copy
// engine requires; it lives in the __grid_constant__ parameter space.
struct __align__(64) SfTmap {
  unsigned long long w[16];
};

struct SfParams {
  long long nq, nkv, H, flags;
  double scale_log2;           // softmax scale * log2(e)
  long long acc, m, l, lse;    // state (float32) and optional lse (float32) pointers
  long long acc_sb, acc_ss, acc_sh;
  long long ml_sb, ml_sh;      // m and l strides (batch, head); row stride 1
  long long lse_sb, lse_sh;    // lse strides (batch, head); row stride 1
  SfQBlk q[SF_MAXQ];
  SfKVBlk kv[SF_MAXKV];
#if SF_TMA
  // tk[i] / tv[i]: 4-D maps (head dim, seq, head, batch) of kv[i].k / kv[i].v; box 64 x WS_BN
  // x 1 x 1 with the 128-byte swizzle; rows past the block's length read as zeros.
  SfTmap tk[SF_MAXKV], tv[SF_MAXKV];
  // tq[i]: the same for q[i].q, box 64 x 128 rows (one Q tile panel)
  SfTmap tq[SF_MAXQ];
#endif
};

enum { SF_INIT = 1, SF_FINALIZE = 2, SF_STATE = 4, SF_LSE = 8 };

#define SF_LOG2E 1.4426950408889634f
#define SF_LN2 0.6931471805599453f

__device__ __forceinline__ uint32_t sf_smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; zero-fills when !pred (no global read then).
__device__ __forceinline__ void sf_cp_async16(uint32_t dst, const void* src, bool pred) {
  const int sz = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(sz)
               : "memory");
}
__device__ __forceinline__ void sf_cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void sf_cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ uint32_t sf_pack2(float a, float b) {
#if SF_FP16
  __half2 h = __floats2half2_rn(a, b);
#else
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
#endif
  return *reinterpret_cast<uint32_t*>(&h);
}

// Shared-memory tile layout used by both kernels: a [ROWS, D] tile is stored as D/64 panels of
// [ROWS, 64] elements (128-byte rows); inside a panel, the 16-byte chunk c of row r sits at chunk
// c ^ (r % 8) (the 128-byte swizzle of wgmma/TMA).  Tiles must start 1024-byte aligned.
template <int ROWS>
__device__ __forceinline__ uint32_t sf_tile_off(int r, int chunk) {
  return (uint32_t)((chunk >> 3) * (ROWS * 128) + r * 128 + (((chunk & 7) ^ (r & 7)) << 4));
}

// Asynchronously load rows [0, nvalid) of a [ROWS, SF_D] tile (row stride rs elements) into
// shared memory at sbase; rows >= nvalid are zero-filled.
template <int ROWS, int NT>
__device__ __forceinline__ void sf_load_tile(uint32_t sbase, const sf_elem* g, long long rs,
                                             int nvalid, int tid) {
  constexpr int CPR = SF_D / 8;
  constexpr int TOTAL = ROWS * CPR;
  static_assert(TOTAL % NT == 0, "tile chunks must divide evenly among the threads");
#pragma unroll
  for (int i = 0; i < TOTAL / NT; ++i) {
    const int idx = tid + i * NT;
    const int r = idx / CPR, c = idx % CPR;
    const bool ok = r < nvalid;
    const sf_elem* src = ok ? g + (long long)r * rs + c * 8 : g;
    sf_cp_async16(sbase + sf_tile_off<ROWS>(r, c), src, ok);
  }
}

// Binary search of the Q block that owns Q tile `tile` (last block whose tile0 <= tile).
__device__ __forceinline__ int sf_find_qblock(const SfParams& p, int tile) {
  int lo = 0, hi = (int)p.nq - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (p.q[mid].tile0 <= tile) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Load the running state of the two rows (r, r+8) a thread owns in the mma C layout.
// o[j][0..3]: (row r, col 8j+2t), (r, 8j+2t+1), (r+8, 8j+2t), (r+8, 8j+2t+1); t = lane % 4.
// Only lane t == 0 of each quad loads l (the quad's partial sums are added at the end).
template <int NJ>
__device__ __forceinline__ void sf_load_state(const SfParams& p, int b, int h, long long srow,
                                              int nrow_ok, int t, float (&o)[NJ][4],
                                              float (&mr)[2], float (&lr)[2]) {
  const bool init = p.flags & SF_INIT;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const bool ok = !init && i < nrow_ok;
    const long long row = srow + 8 * i;
    if (ok) {
      const long long mi = b * p.ml_sb + h * p.ml_sh + row;
      mr[i] = reinterpret_cast<const float*>(p.m)[mi] * SF_LOG2E;
      lr[i] = (t == 0) ? reinterpret_cast<const float*>(p.l)[mi] : 0.f;
      const float* a = reinterpret_cast<const float*>(p.acc) + b * p.acc_sb + row * p.acc_ss +
                       h * p.acc_sh + 2 * t;
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        const float2 v = *reinterpret_cast<const float2*>(a + 8 * j);
        o[j][2 * i] = v.x;
        o[j][2 * i + 1] = v.y;
      }
    } else {
      mr[i] = -INFINITY;
      lr[i] = 0.f;
#pragma unroll
      for (int j = 0; j < NJ; ++j) { o[j][2 * i] = 0.f; o[j][2 * i + 1] = 0.f; }
    }
  }
}

// Quad-reduce l, then store the state and/or the normalised output and lse.
template <int NJ>
__device__ __forceinline__ void sf_store(const SfParams& p, const SfQBlk& qb, int b, int h,
                                         long long srow, long long lrow, int nrow_ok, int t,
                                         float (&o)[NJ][4], const float (&mr)[2], float (&lr)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    lr[i] += __shfl_xor_sync(0xffffffffu, lr[i], 1);
    lr[i] += __shfl_xor_sync(0xffffffffu, lr[i], 2);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (i >= nrow_ok) continue;
    const long long row = srow + 8 * i;
    const float m_nat = mr[i] * SF_LN2;  // -inf stays -inf
    if (p.flags & SF_STATE) {
      float* a = reinterpret_cast<float*>(p.acc) + b * p.acc_sb + row * p.acc_ss + h * p.acc_sh +
                 2 * t;
#pragma unroll
      for (int j = 0; j < NJ; ++j)
        *reinterpret_cast<float2*>(a + 8 * j) = make_float2(o[j][2 * i], o[j][2 * i + 1]);
      if (t == 0) {
        const long long mi = b * p.ml_sb + h * p.ml_sh + row;
        reinterpret_cast<float*>(p.m)[mi] = m_nat;
        reinterpret_cast<float*>(p.l)[mi] = lr[i];
      }
    }
    if (p.flags & SF_FINALIZE) {
      const bool empty = !(lr[i] > 0.f);
      const float inv = empty ? 0.f : 1.f / lr[i];
      sf_elem* out = reinterpret_cast<sf_elem*>(qb.o) + b * qb.osb + (lrow + 8 * i) * qb.oss +
                     h * qb.osh + 2 * t;
#pragma unroll
      for (int j = 0; j < NJ; ++j)
        *reinterpret_cast<uint32_t*>(out + 8 * j) = sf_pack2(o[j][2 * i] * inv, o[j][2 * i + 1] * inv);
      if ((p.flags & SF_LSE) && t == 0) {
        reinterpret_cast<float*>(p.lse)[b * p.lse_sb + h * p.lse_sh + row] =
            empty ? -INFINITY : m_nat + logf(lr[i]);
      }
    }
  }
}

// Mask key columns >= nvalid of an S tile in the mma C layout (column of s[j][e] is 8j+2t+(e&1)).
template <int NS>
__device__ __forceinline__ void sf_mask_cols(float (&s)[NS][4], int nvalid, int t) {
#pragma unroll
  for (int j = 0; j < NS; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (8 * j + 2 * t + (e & 1) >= nvalid) s[j][e] = -INFINITY;
}

#ifndef SF_EX2_FTZ
#define SF_EX2_FTZ 1  // 1: exp2 is one MUFU.EX2 (results below 2^-126 flush to 0); 0: exp2f
#endif
#ifndef SF_RESCALE_THR
#define SF_RESCALE_THR 8  // > 0: keep a row's max until a tile exceeds it by this much (log2 units)
#endif

// 2^x.  exp2f without -ftz wraps MUFU.EX2 in a range check and two predicated multiplies (for
// denormal results), which nearly doubled the softmax's ALU instructions; the flushed results are
// < 2^-126 of the row's largest term, far below the bf16/fp16 rounding of P.
__device__ __forceinline__ float sf_exp2(float x) {
#if SF_EX2_FTZ
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

// Softmax statistics of one S tile (raw logits, masked entries -inf) in the mma C layout (rows r
// and r+8 of a quad): new running max (log2 units, the scale folded into the exponent),
// p = exp2(s * sl2 - m) in place, alpha = rescale factor of the previous state, l updated.
// O is rescaled separately (sf_rescale), so the caller can do it while O is still in flight.
// With SF_RESCALE_THR > 0 the running max is only raised when the tile's max exceeds it by more
// than SF_RESCALE_THR: otherwise alpha is exactly 1 (the caller skips the O rescale) and p may
// reach 2^SF_RESCALE_THR, which fp32 accumulators and bf16/fp16 P hold without loss.  Any max
// that is >= the true one up to that slack gives the same normalised result.
template <int NS>
__device__ __forceinline__ void sf_softmax(float (&s)[NS][4], float sl2, float (&mr)[2],
                                           float (&lr)[2], float (&alpha)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float mx0 = -INFINITY, mx1 = -INFINITY;  // two chains: the max is latency-, not issue-bound
#pragma unroll
    for (int j = 0; j < NS; j += 2) {
      mx0 = fmaxf(mx0, fmaxf(s[j][2 * i], s[j][2 * i + 1]));
      if (j + 1 < NS) mx1 = fmaxf(mx1, fmaxf(s[j + 1][2 * i], s[j + 1][2 * i + 1]));
    }
    float mx = fmaxf(mx0, mx1);
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_tile = mx * sl2;
#if SF_RESCALE_THR > 0
    const float m_new = (m_tile > mr[i] + (float)SF_RESCALE_THR) ? m_tile : mr[i];
#else
    const float m_new = fmaxf(mr[i], m_tile);
#endif
    const float m_use = (m_new == -INFINITY) ? 0.f : m_new;  // guards -inf - -inf
    alpha[i] = (m_new == mr[i]) ? 1.f : sf_exp2(mr[i] - m_use);
    mr[i] = m_new;
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int j = 0; j < NS; ++j) {
      s[j][2 * i] = sf_exp2(fmaf(s[j][2 * i], sl2, -m_use));
      s[j][2 * i + 1] = sf_exp2(fmaf(s[j][2 * i + 1], sl2, -m_use));
      sum0 += s[j][2 * i];
      sum1 += s[j][2 * i + 1];
    }
    lr[i] = lr[i] * alpha[i] + (sum0 + sum1);
  }
}

// True if any row of the warp needs its O rescaled (some alpha != 1); warp-uniform.
__device__ __forceinline__ bool sf_needs_rescale(const float (&alpha)[2]) {
  return __any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f);
}

template <int NJ>
__device__ __forceinline__ void sf_rescale(float (&o)[NJ][4], const float (&alpha)[2]) {
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
    o[j][0] *= alpha[0]; o[j][1] *= alpha[0];
    o[j][2] *= alpha[1]; o[j][3] *= alpha[1];
  }
}

// P (fp32, C layout) of key columns 16kk..16kk+15 as the A fragment of a k16 MMA (the same
// register layout for mma.sync m16n8k16 and for wgmma with A from registers).
template <int NS>
__device__ __forceinline__ void sf_pack_a(const float (&s)[NS][4], int kk, uint32_t (&a)[4]) {
  a[0] = sf_pack2(s[2 * kk][0], s[2 * kk][1]);
  a[1] = sf_pack2(s[2 * kk][2], s[2 * kk][3]);
  a[2] = sf_pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  a[3] = sf_pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}
