// Batched strided copy of head groups: the data movement of a Ulysses exchange done by loads and
// stores, without the copy into a send buffer and the put.  Piece i copies a [B, L, Hg] grid of
// rows of `row_bytes` (the head dim) from src_i to dst_i, each with its own byte strides (b, s, h);
// either side may be this GPU's memory or a peer's symmetric heap mapped into it (nvshmem_ptr:
// the same GPU, or an NVLink/P2P peer).  Rows are moved as 16-byte vectors (pointers, strides
// and row_bytes multiples of 16).  One launch for every piece: blockIdx.y is the piece.
// If `flag` is set and *flag != 0 (a wait of this rank failed), every destination byte becomes
// 0xFF (NaN in any float dtype) instead: a result of a broken collective is never plausible.
#define HC_MAXP 48

struct HcPiece {
  long long src, dst;       // addresses
  long long sb, ss, sh;     // source strides, bytes
  long long db, ds, dh;     // destination strides, bytes
};
struct HcParams {
  long long B, L, Hg, vecs;  // rows are B x L x Hg; vecs: 16-byte vectors per row
  long long flag;            // address of the failure word, or 0
  long long npieces;
  HcPiece pc[HC_MAXP];
};

extern "C" __global__ void __launch_bounds__(256) sf_heads_copy(const __grid_constant__ HcParams p) {
  const HcPiece& c = p.pc[blockIdx.y];
  const unsigned long long n = (unsigned long long)(p.B * p.L * p.Hg) * p.vecs;
  const bool poison = p.flag && *reinterpret_cast<const volatile unsigned long long*>(p.flag);
  const unsigned long long step = (unsigned long long)gridDim.x * blockDim.x;
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += step) {
    const unsigned long long v = i % p.vecs, r = i / p.vecs;
    const unsigned long long h = r % p.Hg, rs = r / p.Hg;
    const unsigned long long s = rs % p.L, b = rs / p.L;
    uint4* dst = reinterpret_cast<uint4*>(c.dst + b * c.db + s * c.ds + h * c.dh) + v;
    if (poison) {
      *dst = make_uint4(~0u, ~0u, ~0u, ~0u);
    } else {
      *dst = *(reinterpret_cast<const uint4*>(c.src + b * c.sb + s * c.ss + h * c.sh) + v);
    }
  }
}
