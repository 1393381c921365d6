// Merge of two normalised partial attention results by the log-sum-exp rule.
//   lse = log(e^lse1 + e^lse2);  o = o1 e^(lse1 - lse) + o2 e^(lse2 - lse)
// o*: [B, S, H, D] (strides in elements, head-dim stride 1), lse*: [B, H, S] float32 (row stride 1).
// MERGE_T: element type of o (float, __half or __nv_bfloat16).  One thread per element.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef MERGE_T
#define MERGE_T float
#endif

struct MergeArr { long long ptr, sb, ss, sh; };
struct MergeLse { long long ptr, sb, sh; };
struct MergeParams {
  long long B, S, H, D;
  MergeArr o1, o2, out;
  MergeLse l1, l2, lout;
};

__device__ __forceinline__ float mld(const MergeArr& a, long long b, long long s, long long h,
                                     long long d) {
  return (float)reinterpret_cast<const MERGE_T*>(a.ptr)[b * a.sb + s * a.ss + h * a.sh + d];
}
__device__ __forceinline__ float lld(const MergeLse& a, long long b, long long h, long long s) {
  return reinterpret_cast<const float*>(a.ptr)[b * a.sb + h * a.sh + s];
}

// One warp per (b, s, h) row: lane 0 reads both lse values and broadcasts them, every lane
// handles D/32 elements, lane 0 writes the merged lse last.  Outputs may alias the inputs.
extern "C" __global__ void sf_merge(const __grid_constant__ MergeParams p) {
  const long long rows = p.B * p.S * p.H;
  const int lane = threadIdx.x & 31;
  const long long nwarps = (long long)gridDim.x * (blockDim.x >> 5);
  for (long long r = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5); r < rows;
       r += nwarps) {
    const long long h = r % p.H, s = (r / p.H) % p.S, b = r / (p.H * p.S);
    float a1 = 0.f, a2 = 0.f;
    if (lane == 0) { a1 = lld(p.l1, b, h, s); a2 = lld(p.l2, b, h, s); }
    a1 = __shfl_sync(0xffffffffu, a1, 0);
    a2 = __shfl_sync(0xffffffffu, a2, 0);
    const float mx = fmaxf(a1, a2);
    const bool dead = (mx == -INFINITY);
    const float w1 = dead ? 0.f : __expf(a1 - mx), w2 = dead ? 0.f : __expf(a2 - mx);
    const float tot = w1 + w2;
    const float c1 = dead ? 0.f : w1 / tot, c2 = dead ? 0.f : w2 / tot;
    for (long long d = lane; d < p.D; d += 32) {
      const float o = mld(p.o1, b, s, h, d) * c1 + mld(p.o2, b, s, h, d) * c2;
      reinterpret_cast<MERGE_T*>(p.out.ptr)[b * p.out.sb + s * p.out.ss + h * p.out.sh + d] =
          (MERGE_T)o;
    }
    __syncwarp();
    if (lane == 0)
      reinterpret_cast<float*>(p.lout.ptr)[b * p.lout.sb + h * p.lout.sh + s] =
          dead ? -INFINITY : mx + __logf(tot);
  }
}
