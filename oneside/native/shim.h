/* oneside native shim: batched NVSHMEM host-API calls on raw pointers (C ABI for cffi). */
#include <stdint.h>
int os_my_pe(void);
int os_n_pes(void);
uint64_t os_ptr(uint64_t addr, int pe);
void os_put_batch(int n, const uint64_t *dst, const uint64_t *src, const uint64_t *nbytes,
                  const int32_t *pe, uint64_t stream, int nbi);
void os_get_batch(int n, const uint64_t *dst, const uint64_t *src, const uint64_t *nbytes,
                  const int32_t *pe, uint64_t stream, int nbi);
void os_put_signal_batch(int n, const uint64_t *dst, const uint64_t *src, const uint64_t *nbytes,
                         const int32_t *pe, uint64_t sig, uint64_t value, int op, uint64_t stream, int nbi);
void os_signal_op(uint64_t sig, uint64_t value, int op, int pe, uint64_t stream);
void os_quiet(uint64_t stream);
void os_barrier_signal(uint64_t row, const int32_t *members, int n, int me, uint64_t value,
                       uint64_t stream);
