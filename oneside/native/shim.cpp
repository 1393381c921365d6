// oneside native shim: each entry point issues a whole batch of NVSHMEM host-API calls, so
// Python pays one foreign call per batch. Addresses are raw: any byte range of the
// symmetric heap can be a target, which nvshmem4py's high-level put/get do not allow.
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <queue>
#include <thread>
#include <vector>

extern "C" {
#include "shim.h"
}

namespace {
inline cudaStream_t S(uint64_t s) { return reinterpret_cast<cudaStream_t>(s); }
inline void *P(uint64_t p) { return reinterpret_cast<void *>(p); }
// oneside's order of signal ops: (set, add).
const int kOps[2] = {NVSHMEM_SIGNAL_SET, NVSHMEM_SIGNAL_ADD};

// -- holds without an SM (emulated links) -------------------------------------------------
// A hold of n ns on a stream: a host function (runs when the stream reaches it) clears the
// stream's word in mapped host memory and asks the timer thread to set it n ns later; a stream
// memory operation then waits for the word. Neither needs an SM, so a hold runs beside a kernel
// that occupies every SM (a one-thread timer kernel would queue behind it). Driver entry points
// come from libcuda at first use (the shim does not link the CUDA driver).
typedef int (*HostFnLaunch)(void *stream, void (*fn)(void *), void *data);
typedef int (*WaitValue32)(void *stream, uint64_t addr, uint32_t value, unsigned flags);
HostFnLaunch g_launch_host_fn = nullptr;
WaitValue32 g_wait_value32 = nullptr;

struct Release {
    std::chrono::steady_clock::time_point at;
    volatile uint32_t *word;
    bool operator<(const Release &o) const { return at > o.at; }  // earliest first
};

struct Timer {
    std::mutex mu;
    std::condition_variable cv;
    std::priority_queue<Release> due;
    Timer() {
        std::thread([this] {
            std::unique_lock<std::mutex> lk(mu);
            for (;;) {
                if (due.empty()) { cv.wait(lk); continue; }
                const Release r = due.top();
                if (std::chrono::steady_clock::now() < r.at) { cv.wait_until(lk, r.at); continue; }
                due.pop();
                std::atomic_thread_fence(std::memory_order_seq_cst);
                *r.word = 1u;
            }
        }).detach();  // lives as long as the process
    }
};
Timer *g_timer = nullptr;

struct HoldArg {
    volatile uint32_t *word;
    uint64_t ns;
};

void hold_start(void *p) {  // on the driver's callback thread: no CUDA calls here
    HoldArg *a = static_cast<HoldArg *>(p);
    *a->word = 0u;
    std::atomic_thread_fence(std::memory_order_seq_cst);
    {
        std::lock_guard<std::mutex> lk(g_timer->mu);
        g_timer->due.push({std::chrono::steady_clock::now() + std::chrono::nanoseconds(a->ns), a->word});
    }
    g_timer->cv.notify_one();
}
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

int os_hold_init(void) {
    if (g_timer) return 0;
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!lib) return 1;
    g_launch_host_fn = reinterpret_cast<HostFnLaunch>(dlsym(lib, "cuLaunchHostFunc"));
    g_wait_value32 = reinterpret_cast<WaitValue32>(dlsym(lib, "cuStreamWaitValue32_v2"));
    if (!g_wait_value32) g_wait_value32 = reinterpret_cast<WaitValue32>(dlsym(lib, "cuStreamWaitValue32"));
    if (!g_launch_host_fn || !g_wait_value32) return 2;
    g_timer = new Timer();
    return 0;
}

int os_hold(uint64_t stream, uint64_t word, uint64_t ns) {
    // the host function's argument must outlive every run of it (a CUDA graph replays it): one
    // per (word, ns), kept (a layer uses a handful)
    static std::map<std::pair<uint64_t, uint64_t>, HoldArg *> args;
    HoldArg *&a = args[{word, ns}];
    if (!a) a = new HoldArg{reinterpret_cast<volatile uint32_t *>(word), ns};
    int rc = g_launch_host_fn(P(stream), hold_start, a);
    if (rc) return 100 + rc;
    rc = g_wait_value32(P(stream), word, 1u, 0x0 /* CU_STREAM_WAIT_VALUE_GEQ */);
    return rc ? 200 + rc : 0;
}

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
