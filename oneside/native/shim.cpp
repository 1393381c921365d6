// oneside native shim: each entry point issues a whole batch of NVSHMEM host-API calls, so
// Python pays one foreign call per batch. Addresses are raw: any byte range of the
// symmetric heap can be a target, which nvshmem4py's high-level put/get do not allow.
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

extern "C" {
#include "shim.h"
}

namespace {
inline cudaStream_t S(uint64_t s) { return reinterpret_cast<cudaStream_t>(s); }
inline void *P(uint64_t p) { return reinterpret_cast<void *>(p); }
// oneside's order of signal ops: (set, add).
const int kOps[2] = {NVSHMEM_SIGNAL_SET, NVSHMEM_SIGNAL_ADD};
}  // namespace

extern "C" {

int os_my_pe(void) { return nvshmem_my_pe(); }
int os_n_pes(void) { return nvshmem_n_pes(); }
uint64_t os_ptr(uint64_t addr, int pe) { return reinterpret_cast<uint64_t>(nvshmem_ptr(P(addr), pe)); }

void os_put_batch(int n, const uint64_t *dst, const uint64_t *src, const uint64_t *nbytes,
                  const int32_t *pe, uint64_t stream, int nbi) {
    cudaStream_t s = S(stream);
    for (int i = 0; i < n; ++i) {
        if (nbi)
            nvshmemx_putmem_nbi_on_stream(P(dst[i]), P(src[i]), nbytes[i], pe[i], s);
        else
            nvshmemx_putmem_on_stream(P(dst[i]), P(src[i]), nbytes[i], pe[i], s);
    }
}

void os_get_batch(int n, const uint64_t *dst, const uint64_t *src, const uint64_t *nbytes,
                  const int32_t *pe, uint64_t stream, int nbi) {
    cudaStream_t s = S(stream);
    for (int i = 0; i < n; ++i) {
        if (nbi)
            nvshmemx_getmem_nbi_on_stream(P(dst[i]), P(src[i]), nbytes[i], pe[i], s);
        else
            nvshmemx_getmem_on_stream(P(dst[i]), P(src[i]), nbytes[i], pe[i], s);
    }
}

void os_put_signal_batch(int n, const uint64_t *dst, const uint64_t *src, const uint64_t *nbytes,
                         const int32_t *pe, uint64_t sig, uint64_t value, int op, uint64_t stream,
                         int nbi) {
    cudaStream_t s = S(stream);
    uint64_t *sa = reinterpret_cast<uint64_t *>(sig);
    for (int i = 0; i < n; ++i) {
        if (nbi)
            nvshmemx_putmem_signal_nbi_on_stream(P(dst[i]), P(src[i]), nbytes[i], sa, value, kOps[op], pe[i], s);
        else
            nvshmemx_putmem_signal_on_stream(P(dst[i]), P(src[i]), nbytes[i], sa, value, kOps[op], pe[i], s);
    }
}

void os_signal_op(uint64_t sig, uint64_t value, int op, int pe, uint64_t stream) {
    nvshmemx_signal_op_on_stream(reinterpret_cast<uint64_t *>(sig), value, kOps[op], pe, S(stream));
}

void os_quiet(uint64_t stream) { nvshmemx_quiet_on_stream(S(stream)); }

// First half of oneside's flat barrier (works with several PEs per GPU, unlike NVSHMEM's team
// barriers): complete my transfers, then add 1 to my word in every member's row. The second
// half, waiting for every member's word, is a kernel launched by the Python side.
// Adding (not setting an epoch) keeps the barrier correct when a CUDA graph replays it:
// value = 1 + (call-site tag << 32), so a word's low half counts rounds and its high half
// sums the call sites, which the waiting kernel compares with its own.
void os_barrier_signal(uint64_t row, const int32_t *members, int n, int me, uint64_t value,
                       uint64_t stream) {
    cudaStream_t s = S(stream);
    uint64_t *words = reinterpret_cast<uint64_t *>(row);
    nvshmemx_quiet_on_stream(s);
    for (int j = 0; j < n; ++j)
        if (j != me) nvshmemx_signal_op_on_stream(words + me, value, NVSHMEM_SIGNAL_ADD, members[j], s);
}

}  // extern "C"
