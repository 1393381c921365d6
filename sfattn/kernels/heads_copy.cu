// Batched strided copy of head groups: the data movement of a Ulysses exchange done by loads and
// stores, without the copy into a send buffer and the put.  Piece i copies a [B, L, Hg] grid of
// rows of `row_bytes` (the head dim) from src_i to dst_i, each with its own byte strides (b, s, h);
// either side may be this GPU's memory or a peer's symmetric heap mapped into it (nvshmem_ptr:
// the same GPU, or an NVLink/P2P peer).  Rows are moved as 16-byte vectors (pointers, strides
// and row_bytes multiples of 16).  One launch for every piece: blockIdx.y is the piece.
// If `flag` is set and *flag != 0 (a wait of this rank failed), every destination byte becomes
// 0xFF (NaN in any float dtype) instead: a result of a broken collective is never plausible.
// A piece with src == 0 is poison-only: its destination is written after a failure, else untouched
// (a result the attention kernel wrote in place, which a failed wait must mark like the copied ones).
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
  long long vlog;            // log2(vecs) where vecs is a power of two, else -1
  HcPiece pc[HC_MAXP];
};

// Thread i of the grid moves vectors i, i + step, ... of its piece's [B * L tokens, Hg * vecs]
// grid, HC_ILP at a time (all loads issued before the stores: several 16-byte loads in flight per
// thread, which a grid of one wave needs to approach HBM speed). The (token, vector) position
// advances by a constant step: no 64-bit division per vector (the host keeps B * L and Hg * vecs
// below 2^31), one 32-bit division for the token's batch (none at B = 1) and a shift (or division)
// for the vector's head.
#define HC_ILP 4
extern "C" __global__ void __launch_bounds__(256) sf_heads_copy(const __grid_constant__ HcParams p) {
  const HcPiece& c = p.pc[blockIdx.y];
  const unsigned T = (unsigned)(p.B * p.L), L = (unsigned)p.L, M = (unsigned)(p.Hg * p.vecs);
  const unsigned vecs = (unsigned)p.vecs;
  const int vlog = (int)p.vlog;
  const bool poison = p.flag && *reinterpret_cast<const volatile unsigned long long*>(p.flag);
  if (!poison && c.src == 0) return;  // poison-only piece, no failure
  const unsigned step = gridDim.x * blockDim.x, i0 = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned dt = step / M, dm = step % M;
  unsigned tok = i0 / M, m = i0 % M;
  while (tok < T) {
    uint4 val[HC_ILP];
    uint4* dst[HC_ILP];
    int n = 0;
#pragma unroll
    for (int u = 0; u < HC_ILP; ++u) {
      if (tok < T) {
        const unsigned b = p.B == 1 ? 0u : tok / L, s = tok - b * L;
        const unsigned h = vlog >= 0 ? m >> vlog : m / vecs, v = m - h * vecs;
        dst[u] = reinterpret_cast<uint4*>(c.dst + b * c.db + s * c.ds + h * c.dh) + v;
        val[u] = poison ? make_uint4(~0u, ~0u, ~0u, ~0u)
                        : *(reinterpret_cast<const uint4*>(c.src + b * c.sb + s * c.ss + h * c.sh) + v);
        n = u + 1;
        m += dm;
        tok += dt;
        if (m >= M) {
          m -= M;
          ++tok;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < HC_ILP; ++u)
      if (u < n) *dst[u] = val[u];
  }
}
