"""NVSHMEM backend: GPUs, one symmetric arena from nvshmem4py, transfers through the native shim.

Bootstrap: NVSHMEM's unique-id init, the id handed from rank 0 to the others through a
``torch.distributed.TCPStore`` (:func:`store_endpoint`: torchrun's agent store, or one rank 0
hosts on a free port ``oneside.launch`` picked) or mpi4py's broadcast when no master address is set. The arena is one ``nvshmem.core.buffer``; views of it are CuPy
arrays and torch tensors with no copy. Two copy engines are available for batches:

* ``ce`` - one ``nvshmemx_{put,get}mem[_nbi]_on_stream`` per transfer, all issued by one
  native call (NVLink peers: DMA copy engines; other peers: NVSHMEM's proxy/network);
* ``sm`` - one CUDA kernel that copies every transfer of the batch through the peers'
  mapped addresses (``nvshmem_ptr``), for many small transfers between NVLink peers.

``auto`` (default, or ``$ONESIDE_ENGINE``) picks ``sm`` for batches of several small
transfers when every peer of the batch is NVLink-mapped, else ``ce``.

Emulated slow links (``$ONESIDE_EMULATE_LINK="GBPS[,LATENCY_US]"``): every transfer between
ranks of different (virtual) machines is held in its stream until it would have finished on
a link of that bandwidth and latency: after the real copy, a one-thread timer kernel waits the
difference ``n/GBPS + latency - n/base`` (base ``$ONESIDE_EMULATE_BASE_GBPS``, default 395,
the measured NVLink copy speed); signals that follow such data wait for it, and barrier or
signal messages across machines pay the latency. Caveat on one GPU (virtual machines sharing
it): the copy between two processes' buffers runs on SMs, so a copy that becomes ready while a
compute kernel holds every SM waits for that kernel (the timer kernel fits beside it); whether a
transfer then overlaps compute depends on which starts first (``perf/emulate_link.py``,
docs/model.md section 4c). A real link needs no SM. Intra-machine traffic is untouched. What
is not emulated: link sharing between concurrent transfers and NIC/PCIe contention.
"""
from __future__ import annotations

import ctypes
import os
import time
from typing import Any, Sequence

import numpy as np

from .. import pdl
from ..bootstrap import Placement
from ..errors import CollectiveMismatchError, CommTimeoutError, OnesideError, PeerDeadError

_OPS = {"set": 0, "add": 1}
_CMPS = {"eq": 0, "ne": 1, "gt": 2, "ge": 3, "lt": 4, "le": 5}
SM_MAX_AVG_BYTES = 1 << 20  # auto engine: sm when the average transfer is at most this
SM_MIN_COUNT = 4
SM_MAX_BLOCKS = 1024  # sm engine: thread blocks per transfer, at most
POISON_THREADS = 256  # a wait kernel that also poisons: one block of this many threads

_COPY_KERNEL = r"""
extern "C" __global__ void oneside_copy_batch(const unsigned long long *dst, const unsigned long long *src,
                                              const unsigned long long *nbytes) {
    const int i = blockIdx.y;
    char *d = reinterpret_cast<char *>(dst[i]);
    const char *s = reinterpret_cast<const char *>(src[i]);
    const unsigned long long n = nbytes[i];
    const unsigned long long start = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long step = (unsigned long long)gridDim.x * blockDim.x;
    if (((reinterpret_cast<unsigned long long>(d) | reinterpret_cast<unsigned long long>(s) | n) & 15ull) == 0) {
        uint4 *d4 = reinterpret_cast<uint4 *>(d);
        const uint4 *s4 = reinterpret_cast<const uint4 *>(s);
        for (unsigned long long k = start; k < n / 16; k += step) d4[k] = s4[k];
    } else {
        for (unsigned long long k = start; k < n; k += step) d[k] = s[k];
    }
}
"""


# Stream-ordered waits are a one-thread kernel spinning on local words, not NVSHMEM's
# signal_wait_until_on_stream, which NVSHMEM refuses when several PEs share a GPU. Every wait
# gives up when its words do not arrive within `timeout_ns`, when a peer wrote its rank + 1
# into this rank's abort word, or when another wait already failed (then the stream drains at
# once). The first failure wins `flag` (device memory: a compare-and-swap, which PCIe may not
# offer on host memory) and writes why into `rec` (pinned, mapped host memory the host reads
# without a sync): rec[1] the words' address, rec[2] the member index, rec[3]/rec[4] what was
# expected and seen, then rec[0] the code (1 mismatch, 2 timeout, 3 peer aborted), rec[5] = 1.
_WAIT_KERNEL = r"""
typedef unsigned long long u64;

__device__ __forceinline__ u64 now_ns() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ void record(u64 *flag, u64 *rec, u64 code, u64 where, u64 idx, u64 expect, u64 seen) {
    if (atomicCAS(flag, 0ull, code) == 0ull) {
        volatile u64 *r = rec;
        r[1] = where; r[2] = idx; r[3] = expect; r[4] = seen;
        __threadfence_system();
        r[0] = code;
        __threadfence_system();
        r[5] = 1;
        __threadfence_system();
    }
}

__device__ void wait_next(const u64 *words, int n, int skip, u64 *gen, u64 inc,
                          u64 *flag, u64 *rec, const u64 *abort_word, u64 timeout_ns);

// Wait until every word (but `skip`) completes round `gen + inc`: its low half reaches the
// round count, and where it equals it its high half (sum of call-site tags) must match.
__device__ void poison_block(unsigned char *dst, u64 n, const u64 *flag);

// `poison_n` > 0 (a launch of one block): after the wait, the block fills [poison, poison + n) if
// a wait of this rank failed (what oneside_poison does, without a launch of its own).
extern "C" __global__ void oneside_wait_next(const u64 *words, int n, int skip, u64 *gen, u64 inc,
                                             u64 *flag, u64 *rec, const u64 *abort_word, u64 timeout_ns,
                                             unsigned char *poison, u64 poison_n) {
    if (threadIdx.x == 0) wait_next(words, n, skip, gen, inc, flag, rec, abort_word, timeout_ns);
    if (poison_n) {
        __syncthreads();
        poison_block(poison, poison_n, flag);
    }
}

// A barrier over members whose heaps are all mapped into this GPU, as one launch: raise my word
// (index `me`) in every member's row by `inc` through the mapped addresses `rows`, then the
// tagged wait of oneside_wait_next on my own row. Only I write word `me` of any row, so the
// arrival is a plain store of my running sum (kept in word `me` of my own row, which no one
// else touches), not an atomic: peer atomics need NVLink, plain stores work over PCIe P2P too.
extern "C" __global__ void oneside_barrier_mapped(const u64 *rows, u64 *words, int n, int me,
                                                  u64 *gen, u64 inc, u64 *flag, u64 *rec,
                                                  const u64 *abort_word, u64 timeout_ns,
                                                  unsigned char *poison, u64 poison_n) {
#if __CUDA_ARCH__ >= 900
    // launched as a programmatic dependent launch (oneside.pdl): the previous grid on the stream
    // is complete and its writes visible past this point (a no-op otherwise)
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    if (threadIdx.x == 0) {
        const u64 sent = words[me] + inc;
        words[me] = sent;
        __threadfence_system();  // this stream's earlier writes before the arrivals
        for (int j = 0; j < n; ++j)
            if (j != me) *(reinterpret_cast<volatile u64 *>(rows[j]) + me) = sent;
        // pushes the arrivals out now: without it the peers saw them ~10 us later (20 barriers
        // back to back, 2 ranks on one H200: 4.4 us each with it, 15 us without)
        __threadfence_system();
        wait_next(words, n, me, gen, inc, flag, rec, abort_word, timeout_ns);
    }
    if (poison_n) {
        __syncthreads();
        poison_block(poison, poison_n, flag);
    }
}

// One block fills [dst, dst + n) with 0xFF bytes if a wait of this rank failed.
__device__ void poison_block(unsigned char *dst, u64 n, const u64 *flag) {
    if (!*(const volatile u64 *)flag) return;
    u64 head = (16 - ((u64)dst & 15)) & 15;
    if (head > n) head = n;
    for (u64 k = threadIdx.x; k < head; k += blockDim.x) dst[k] = 0xFF;
    uint4 *d4 = reinterpret_cast<uint4 *>(dst + head);
    const u64 n4 = (n - head) / 16;
    for (u64 k = threadIdx.x; k < n4; k += blockDim.x) d4[k] = make_uint4(~0u, ~0u, ~0u, ~0u);
    for (u64 k = head + 16 * n4 + threadIdx.x; k < n; k += blockDim.x) dst[k] = 0xFF;
}

__device__ void wait_next(const u64 *words, int n, int skip, u64 *gen, u64 inc,
                          u64 *flag, u64 *rec, const u64 *abort_word, u64 timeout_ns) {
    const u64 g = *gen + inc;  // the round to wait for lives on the GPU (graph-safe)
    *gen = g;
    const volatile u64 *e = flag;
    if (*e) return;
    const unsigned lo = (unsigned)g, hi = (unsigned)(g >> 32);
    const u64 t0 = now_ns();
    for (int i = 0; i < n; ++i) {
        if (i == skip) continue;
        const volatile u64 *w = words + i;
        for (;;) {
            const u64 v = *w;
            if ((int)((unsigned)v - lo) >= 0) {
                if ((unsigned)v == lo && (unsigned)(v >> 32) != hi) {
                    record(flag, rec, 1, (u64)words, i, g, v);
                    return;
                }
                break;
            }
            const u64 a = *(const volatile u64 *)abort_word;
            if (a) { record(flag, rec, 3, (u64)words, i, g, a); return; }
            if (*e) return;
            if (now_ns() - t0 > timeout_ns) { record(flag, rec, 2, (u64)words, i, g, v); return; }
            __nanosleep(128);
        }
    }
    __threadfence_system();
}

extern "C" __global__ void oneside_delay(u64 ns) {
    const u64 t0 = now_ns();
    do __nanosleep(500); while (now_ns() - t0 < ns);
}

extern "C" __global__ void oneside_wait(const u64 *words, int n, int skip, int cmp, u64 value,
                                        u64 *flag, u64 *rec, const u64 *abort_word, u64 timeout_ns) {
    const volatile u64 *e = flag;
    if (*e) return;
    const u64 t0 = now_ns();
    for (int i = 0; i < n; ++i) {
        if (i == skip) continue;
        const volatile u64 *w = words + i;
        for (;;) {
            const u64 v = *w;
            const bool ok = cmp == 0 ? v == value : cmp == 1 ? v != value : cmp == 2 ? v > value
                          : cmp == 3 ? v >= value : cmp == 4 ? v < value : v <= value;
            if (ok) break;
            const u64 a = *(const volatile u64 *)abort_word;
            if (a) { record(flag, rec, 3, (u64)words, i, value, a); return; }
            if (*e) return;
            if (now_ns() - t0 > timeout_ns) { record(flag, rec, 2, (u64)words, i, value, v); return; }
            __nanosleep(128);
        }
    }
    __threadfence_system();
}

// If a wait of this rank failed, set every byte of [dst, dst + n) (NaN in any float dtype).
extern "C" __global__ void oneside_poison(unsigned char *dst, u64 n, const u64 *flag) {
    if (!*(const volatile u64 *)flag) return;
    const u64 start = (u64)blockIdx.x * blockDim.x + threadIdx.x, step = (u64)gridDim.x * blockDim.x;
    for (u64 k = start; k < n; k += step) dst[k] = 0xFF;
}
"""


def store_endpoint(env: dict, rank: int) -> tuple[str, int, bool]:
    """Where the ranks meet to share NVSHMEM's id: ``(address, port, whether this rank hosts the
    store)``. Under torchrun its agent's store at MASTER_PORT (every rank a client); else
    ONESIDE_STORE_PORT (``oneside.launch`` sets a free one) or MASTER_PORT + ONESIDE_PORT_OFFSET
    (default 1), hosted by rank 0."""
    addr = env["MASTER_ADDR"]
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return addr, int(env["MASTER_PORT"]), False
    if env.get("ONESIDE_STORE_PORT"):
        return addr, int(env["ONESIDE_STORE_PORT"]), rank == 0
    return addr, int(env["MASTER_PORT"]) + int(env.get("ONESIDE_PORT_OFFSET", "1")), rank == 0


def _parse_link(spec: str | None) -> tuple[float, float, float] | None:
    """``"GBPS[,LATENCY_US]"`` -> (bytes/s, seconds, base bytes/s), or None."""
    if not spec:
        return None
    try:
        parts = [float(x) for x in spec.split(",")]
        bw, lat = parts[0] * 1e9, (parts[1] if len(parts) > 1 else 0.0) * 1e-6
        base = float(os.environ.get("ONESIDE_EMULATE_BASE_GBPS", "395")) * 1e9
    except ValueError:
        raise ValueError(f"ONESIDE_EMULATE_LINK={spec!r}: expected 'GBPS[,LATENCY_US]', e.g. '40,10'") from None
    if bw <= 0 or lat < 0 or len(parts) > 2:
        raise ValueError(f"ONESIDE_EMULATE_LINK={spec!r}: expected a positive bandwidth and latency >= 0")
    return bw, lat, base


def _device_of(place: Placement, device: int | None, ndev: int) -> int:
    if device is None:
        device = int(os.environ.get("ONESIDE_DEVICE", os.environ.get("ONESIDE_HOST_RANK", place.local_rank)))
    return device % ndev


class NvshmemBackend:
    name = "nvshmem"
    is_gpu = True

    def __init__(self, place: Placement, heap_size: int, timeout: float, device: int | None = None):
        import cupy

        try:
            import nvshmem.core as nv
        except ImportError as e:
            raise OnesideError("backend='nvshmem' needs nvshmem4py (pip install nvshmem4py-cu13)") from e
        try:
            from cuda.core import Device
        except ImportError:  # older cuda-core
            from cuda.core.experimental import Device
        from .. import native

        for k, v in (("NVSHMEM_DISABLE_NVLS", "1"), ("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")):
            os.environ.setdefault(k, v)
        self.cp, self.nv = cupy, nv
        self.rank, self.world_size, self.heap_size, self.timeout = place.rank, place.world_size, heap_size, timeout
        self.device = _device_of(place, device, cupy.cuda.runtime.getDeviceCount())
        cupy.cuda.Device(self.device).use()
        self._torch_set_device()
        self._dev = Device(self.device)
        self._dev.set_current()
        self._store = None
        self.mod = native.load()  # build before init: a failed build must not leave NVSHMEM half up
        self.lib, self.ffi = self.mod.lib, self.mod.ffi
        try:
            uid = self._exchange_uid(place)
        except OnesideError:
            raise
        except Exception as e:  # rank 0's store never came up, or a rank never published
            raise CommTimeoutError(f"oneside.init: rank {place.rank} could not get NVSHMEM's id from rank 0 "
                                   f"(timeout {timeout:.0f} s; {type(e).__name__}: {e})") from e
        self._store_barrier("joined")  # NVSHMEM's own init waits for every rank without a timeout
        nv.init(device=self._dev, uid=uid, rank=place.rank, nranks=place.world_size, initializer_method="uid")
        if self.lib.os_my_pe() != place.rank or self.lib.os_n_pes() != place.world_size:
            raise OnesideError("native shim and nvshmem4py see different NVSHMEM instances "
                               f"(pe {self.lib.os_my_pe()}/{self.lib.os_n_pes()} vs rank {place.rank}/{place.world_size})")
        self._buf = nv.buffer(heap_size)
        self.heap_base = int(self._buf.handle)
        cupy.cuda.runtime.memset(self.heap_base, 0, heap_size)
        cupy.cuda.runtime.deviceSynchronize()
        self.peer_base = [int(self.lib.os_ptr(self.heap_base, pe)) for pe in range(self.world_size)]
        self._internal = cupy.cuda.Stream(non_blocking=True)
        self._ext_streams: dict[int, Any] = {}
        self._members: dict[tuple, tuple[np.ndarray, bool, Any]] = {}  # (team, row) -> ranks, crosses, mapped rows
        self._copy = cupy.RawKernel(_COPY_KERNEL, "oneside_copy_batch")
        waits = cupy.RawModule(code=_WAIT_KERNEL)
        self._wait = waits.get_function("oneside_wait")
        self._wait_gen = waits.get_function("oneside_wait_next")
        self._barrier_mapped = waits.get_function("oneside_barrier_mapped")
        fn = self._barrier_mapped
        self._barrier_mapped_fn = int(fn.kernel.ptr if hasattr(fn, "kernel") else fn.ptr)  # CUfunction
        # programmatic dependent launches (barrier(dependent=True)): Hopper and later
        self.pdl = int(cupy.cuda.Device(self.device).compute_capability) >= 90
        # barriers over teams mapped into this GPU: one kernel of plain stores and the wait
        # (ONESIDE_MAPPED_BARRIER=0: NVSHMEM signals + the wait kernel, as across machines)
        self.mapped_barrier = os.environ.get("ONESIDE_MAPPED_BARRIER", "1") != "0"
        self._delay = waits.get_function("oneside_delay")
        self._poison = waits.get_function("oneside_poison")
        # the waits' error record: pinned, mapped host memory (read by the host without a sync)
        rtm = cupy.cuda.runtime
        self._rec_host = rtm.hostAlloc(64, 1 | 2)  # cudaHostAllocPortable | cudaHostAllocMapped
        self._rec = np.ctypeslib.as_array((ctypes.c_uint64 * 8).from_address(self._rec_host))
        self._rec[:] = 0
        # with unified addressing (every 64-bit CUDA platform) the device sees the same address
        self._rec_ptr = cupy.uint64(self._rec_host)
        self._flag = cupy.zeros(1, cupy.uint64)  # device word: the first failure's compare-and-swap
        self._flag_ptr = cupy.uint64(self._flag.data.ptr)
        cupy.cuda.runtime.deviceSynchronize()  # zeroed before any wait on another stream reads it
        self._failed: Exception | None = None
        self._abort_off = 0
        self._timeout_ns = cupy.uint64(int(timeout * 1e9))
        self.per_machine = place.world_size // place.machines
        self.link = _parse_link(os.environ.get("ONESIDE_EMULATE_LINK"))
        self.engine = os.environ.get("ONESIDE_ENGINE", "auto")
        self._one = self.ffi.new("uint64_t[3]")  # single-transfer fast path
        self._one_pe = self.ffi.new("int32_t[1]")
        self.hosts = self._exchange_hosts(place)
        self._store_barrier("heap-ready")  # every arena is zeroed before anyone signals into it

    # -- bootstrap --------------------------------------------------------------------
    def _torch_set_device(self) -> None:
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.set_device(self.device)
        except ImportError:
            pass

    def _exchange_uid(self, place: Placement):
        nv = self.nv
        if place.world_size == 1:
            return nv.get_unique_id()
        if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
            from datetime import timedelta

            from torch.distributed import TCPStore

            addr, port, host = store_endpoint(os.environ, place.rank)
            # this job's keys (torchrun's store outlives a restart of the workers: a new attempt
            # must not read the last one's id or counters)
            self._keys = f"oneside/{place.job}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
            try:
                self._store = TCPStore(addr, port, place.world_size, host, timedelta(seconds=self.timeout))
            except Exception as e:
                if host and "EADDRINUSE" in str(e):
                    raise OnesideError(f"oneside.init: rank 0 cannot host the rendezvous store at {addr}:{port}: "
                                       f"the port is in use; set ONESIDE_STORE_PORT to a free port "
                                       f"(oneside.launch picks one)") from e
                raise
            key = f"{self._keys}/uid"
            if place.rank == 0:
                uid = nv.get_unique_id()
                self._store.set(key, uid._data.view(np.uint8).tobytes())
            else:
                uid = nv.get_unique_id(empty=True)
                uid._data.view(np.uint8)[:] = np.frombuffer(self._store.get(key), np.uint8)
            return uid
        from mpi4py import MPI

        uid = nv.get_unique_id(empty=place.rank != 0)
        if place.rank == 0:
            uid = nv.get_unique_id()
        MPI.COMM_WORLD.Bcast(uid._data.view(np.int8), root=0)
        return uid

    def _exchange_hosts(self, place: Placement) -> tuple[str, ...]:
        """Every rank's host name (where the machine boundary really is)."""
        import socket

        name = socket.gethostname()
        if place.world_size == 1:
            return (name,)
        if self._store is not None:
            self._store.set(f"{self._keys}/host/{place.rank}", name)
            return tuple(self._store.get(f"{self._keys}/host/{r}").decode() for r in range(place.world_size))
        from mpi4py import MPI

        return tuple(MPI.COMM_WORLD.allgather(name))

    def _store_barrier(self, name: str) -> None:
        if self._store is None:
            if self.world_size > 1:
                from mpi4py import MPI

                MPI.COMM_WORLD.Barrier()
            return
        key = f"{self._keys}/{name}"
        self._store.add(key, 1)
        deadline = time.monotonic() + self.timeout
        while self._store.add(key, 0) < self.world_size:
            if time.monotonic() > deadline:
                raise CommTimeoutError(f"oneside.init: not every rank reached '{name}' within {self.timeout:.0f} s")
            time.sleep(0.001)

    # -- memory -----------------------------------------------------------------------
    def _array(self, addr: int, shape: tuple[int, ...], dtype: np.dtype):
        """A CuPy array over device memory at ``addr`` (no copy; this backend keeps it alive)."""
        cp = self.cp
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return cp.ndarray(shape, dtype, cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(addr, max(n, 1), self, self.device), 0))

    def local_array(self, offset: int, shape: tuple[int, ...], dtype: np.dtype):
        return self._array(self.heap_base + offset, shape, dtype)

    @property
    def failure_word(self) -> int:
        """Device address of the word that is non-zero once a stream-ordered wait of this rank
        failed (kernels that must not pass on results of a broken collective read it)."""
        return int(self._flag.data.ptr)

    def peer_address(self, offset: int, pe: int) -> int:
        """Address of ``offset`` in rank ``pe``'s heap as this GPU addresses it (``nvshmem_ptr``:
        same GPU or an NVLink/P2P peer), or 0 where it can only be reached by put/get."""
        base = self.peer_base[pe]
        return base + offset if base else 0

    def peer_array(self, offset: int, shape: tuple[int, ...], dtype: np.dtype, pe: int):
        return self._array(self.peer_address(offset, pe), shape, dtype)

    @staticmethod
    def torch_tensor(local):
        import torch

        return torch.from_dlpack(local)

    @staticmethod
    def upload(local, values: np.ndarray) -> None:
        local.set(values)

    @staticmethod
    def download(local) -> np.ndarray:
        return local.get()

    def buffer_info(self, obj: Any, what: str) -> tuple[int, int]:
        cp = self.cp
        if isinstance(obj, cp.ndarray):
            if not obj.flags.c_contiguous:
                raise ValueError(f"{what}: expected a C-contiguous array, got strides {obj.strides}")
            return obj.data.ptr, obj.nbytes
        if type(obj).__module__.startswith("torch"):
            if obj.device.type != "cuda":
                raise ValueError(f"{what}: the nvshmem backend needs GPU memory, got a tensor on {obj.device}")
            if not obj.is_contiguous():
                raise ValueError(f"{what}: expected a contiguous tensor, got strides {obj.stride()}")
            return obj.data_ptr(), obj.numel() * obj.element_size()
        if isinstance(obj, np.ndarray):
            raise TypeError(f"{what}: the nvshmem backend needs GPU memory, got a numpy array")
        raise TypeError(f"{what}: expected a CuPy array, torch tensor or SymArray, got {type(obj).__name__}")

    # -- streams ----------------------------------------------------------------------
    def stream_handle(self, stream: Any) -> int:
        if stream is None:
            return self._current_stream()
        if isinstance(stream, int):
            return stream
        for attr in ("cuda_stream", "ptr", "handle"):
            h = getattr(stream, attr, None)
            if h is not None:
                return int(h)
        raise TypeError(f"stream: expected a torch/CuPy/cuda.core stream or a cudaStream_t int, got {type(stream).__name__}")

    def _current_stream(self) -> int:
        import sys

        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            return int(torch.cuda.current_stream().cuda_stream)
        return int(self.cp.cuda.get_current_stream().ptr)

    def _cupy_stream(self, handle: int):
        s = self._ext_streams.get(handle)
        if s is None:
            s = self._ext_streams[handle] = self.cp.cuda.ExternalStream(handle, self.device)
        return s

    def _wait_host(self, handle: int, what: str, timeout: float | None) -> None:
        ev = self.cp.cuda.Event(disable_timing=True)
        ev.record(self._cupy_stream(handle))
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        n = 0
        while not ev.done:
            if self._rec[0]:
                break  # a wait failed: the stream drains on its own; raise what it recorded
            if time.monotonic() > deadline:  # sticky: the stream holds a wait that may never end
                self._failed = CommTimeoutError(f"{what}: GPU stream still blocked after {timeout:.1f} s "
                                                "(a peer never signalled); this runtime cannot be used further")
                raise self._failed
            n += 1
            if n > 100:
                time.sleep(min(1e-3, 1e-5 * n))
        self.raise_device_error()

    # -- transfers --------------------------------------------------------------------
    def prepare(self, kind: str, local: Sequence[int], offsets: Sequence[int], nbytes: Sequence[int],
                pes: Sequence[int], signal: tuple[int, int, str] | None, engine: str | None = None):
        delay = self._link_delay(nbytes, pes)
        if not delay:
            return self._prepare(kind, local, offsets, nbytes, pes, signal, engine or self.engine)
        # emulated slow link: the copy (copy engines), then the hold, then the signals
        tail = [] if signal is None else [(self.heap_base + signal[0], signal[1], _OPS[signal[2]], p) for p in pes]
        return ("slow", self._prepare(kind, local, offsets, nbytes, pes, None, "ce"), delay, tail)

    def _prepare(self, kind: str, local: Sequence[int], offsets: Sequence[int], nbytes: Sequence[int],
                 pes: Sequence[int], signal: tuple[int, int, str] | None, engine: str):
        n = len(local)
        if engine not in ("auto", "ce", "sm"):
            raise ValueError(f"engine={engine!r}: expected 'auto', 'ce' or 'sm'")
        mapped = all(self.peer_base[p] for p in pes)
        if engine == "sm" and not mapped:
            raise OnesideError(f"engine='sm': some of ranks {sorted(set(pes))} are not mapped into this GPU (no NVLink/P2P)")
        if engine == "auto":
            engine = "sm" if (mapped and signal is None and n >= SM_MIN_COUNT
                              and sum(nbytes) <= SM_MAX_AVG_BYTES * n) else "ce"
        if engine == "sm" and signal is not None:
            raise ValueError("engine='sm' does not carry signals; use engine='ce' or signal after the batch")
        if engine == "sm":
            loc, size = np.asarray(local, np.uint64), np.asarray(nbytes, np.uint64)
            remote = np.asarray([self.peer_base[p] + o for p, o in zip(pes, offsets)], np.uint64)
            dst, src = (remote, loc) if kind == "put" else (loc, remote)
            desc = self.cp.asarray(np.stack([dst, src, size]))
            per = int(size.max()) if n else 0
            blocks = max(1, min(SM_MAX_BLOCKS, -(-per // (16 * 256 * 4))))
            return ("sm", desc, (blocks, n, 1), n)
        sym = [self.heap_base + o for o in offsets]
        dst, src = (sym, list(local)) if kind == "put" else (list(local), sym)
        sizes, pes = list(nbytes), list(pes)
        if signal is not None:
            off, value, op = signal
            return ("ce", self._ce_call(self.lib.os_put_signal_batch, dst, src, sizes, pes,
                                        (self.heap_base + off, value, _OPS[op])))
        fn = self.lib.os_put_batch if kind == "put" else self.lib.os_get_batch
        return ("ce", self._ce_call(fn, dst, src, sizes, pes))

    def _ce_call(self, fn, dst, src, sizes, pes, signal=()):
        arrays = (np.asarray(dst, np.uint64), np.asarray(src, np.uint64), np.asarray(sizes, np.uint64),
                  np.asarray(pes, np.int32))
        c = self.ffi.cast
        ptrs = (c("uint64_t *", arrays[0].ctypes.data), c("uint64_t *", arrays[1].ctypes.data),
                c("uint64_t *", arrays[2].ctypes.data), c("int32_t *", arrays[3].ctypes.data))
        return (fn, len(dst), ptrs, tuple(signal), arrays)

    def _link_delay(self, nbytes: Sequence[int], pes: Sequence[int]) -> int:
        """Nanoseconds to hold a batch so its cross-machine transfers run at the emulated link's pace."""
        if self.link is None:
            return 0
        bw, lat, base = self.link
        me = self.rank // self.per_machine
        t = sum(max(0.0, n / bw + lat - n / base) for n, p in zip(nbytes, pes) if p // self.per_machine != me)
        return int(t * 1e9)

    def _hold(self, ns: int, handle: int) -> None:
        self._delay((1,), (1,), (self.cp.uint64(ns),), stream=self._cupy_stream(handle))

    def issue(self, handle, stream: Any = None, nbi: bool = False) -> None:
        s = self.stream_handle(stream)
        if handle[0] == "slow":
            _, inner, delay, tail = handle
            self.issue(inner, s, False)
            self._hold(delay, s)
            for sig, value, op, pe in tail:
                self.lib.os_signal_op(sig, value, op, pe, s)
            return
        if handle[0] == "sm":
            _, desc, grid, n = handle
            if n:
                self._copy(grid, (256,), (desc[0], desc[1], desc[2]), stream=self._cupy_stream(s))
            return
        _, (fn, n, ptrs, sig, _) = handle
        fn(n, *ptrs, *sig, s, int(nbi))

    def transfer(self, kind: str, local: int, offset: int, nbytes: int, pe: int,
                 signal: tuple[int, int, str] | None, stream: Any = None, nbi: bool = False) -> None:
        """One transfer without building a batch (the rt.put / rt.get fast path)."""
        if self.link is not None:
            self.issue(self.prepare(kind, [local], [offset], [nbytes], [pe], signal), stream, nbi)
            return
        one, sym = self._one, self.heap_base + offset
        one[0], one[1], one[2] = (sym, local, nbytes) if kind == "put" else (local, sym, nbytes)
        self._one_pe[0] = pe
        s = self.stream_handle(stream)
        if signal is not None:
            off, value, op = signal
            self.lib.os_put_signal_batch(1, one, one + 1, one + 2, self._one_pe, self.heap_base + off, value,
                                         _OPS[op], s, int(nbi))
        else:
            fn = self.lib.os_put_batch if kind == "put" else self.lib.os_get_batch
            fn(1, one, one + 1, one + 2, self._one_pe, s, int(nbi))

    def signal_op(self, offset: int, value: int, op: str, pe: int, stream: Any = None) -> None:
        h = self.stream_handle(stream)
        delay = self._link_delay([0], [pe])
        if delay:
            self._hold(delay, h)
        self.lib.os_signal_op(self.heap_base + offset, value, _OPS[op], pe, h)

    # -- failure: recorded by the waits, raised by the host, told to the peers -----------
    def set_abort_word(self, offset: int) -> None:
        """Heap offset of the word peers set (to their rank + 1) when they fail."""
        self._abort_off = offset
        self._abort_ptr = self.cp.uint64(self.heap_base + offset)

    def _timeout(self, timeout: float | None):
        return self._timeout_ns if timeout is None else self.cp.uint64(int(timeout * 1e9))

    def raise_device_error(self) -> None:
        """Raise (sticky) the failure a wait kernel recorded, if any."""
        if self._failed is not None:
            raise self._failed
        if not self._rec[0]:
            return
        end = time.monotonic() + 1.0
        while not self._rec[5] and time.monotonic() < end:  # the kernel is writing the details
            time.sleep(1e-4)
        code, where, idx, expect, seen = (int(x) for x in self._rec[:5])
        where -= self.heap_base
        if code == 1:
            exc: Exception = CollectiveMismatchError(
                f"barrier at heap offset {where} (round {expect & 0xFFFFFFFF}): member {idx} arrived from a "
                f"different call site than rank {self.rank} (its sequence of collective calls differs: one of "
                f"the two skipped or added one); every rank must make the same collective calls in order")
        elif code == 3:
            exc = PeerDeadError(f"rank {seen - 1} failed and aborted the job while rank {self.rank} waited "
                                f"(words at heap offset {where}, member {idx})")
        else:
            exc = CommTimeoutError(
                f"a GPU-side wait of rank {self.rank} timed out (words at heap offset {where}, member {idx}: "
                f"saw {seen:#x}, waited for {expect:#x}); a peer never signalled (dead, hung, or it skipped a "
                f"collective); this runtime cannot be used further")
        self._failed = exc
        raise exc

    def poison_if_failed(self, ptr: int, nbytes: int, stream: Any = None) -> None:
        cp = self.cp
        blocks = int(min(1024, max(1, nbytes // (256 * 64))))
        self._poison((blocks,), (256,), (cp.uint64(ptr), cp.uint64(nbytes), self._flag_ptr),
                     stream=self._cupy_stream(self.stream_handle(stream)))

    def _abort_peers(self) -> None:
        """Best effort: set every peer's abort word so its waits fail now, not at their timeout."""
        if not self._abort_off:
            return
        h = int(self._internal.ptr)
        for pe in range(self.world_size):
            if pe != self.rank:
                self.lib.os_signal_op(self.heap_base + self._abort_off, self.rank + 1, _OPS["set"], pe, h)
        self.lib.os_quiet(h)
        try:
            self._wait_host(h, "abort", 2.0)
        except Exception:
            pass

    def _wait_words(self, addr: int, n: int, skip: int, cmp: int, value: int, handle: int,
                    timeout: float | None = None) -> None:
        cp = self.cp
        self._wait((1,), (1,), (cp.uint64(addr), cp.int32(n), cp.int32(skip), cp.int32(cmp), cp.uint64(value),
                                self._flag_ptr, self._rec_ptr, self._abort_ptr, self._timeout(timeout)),
                   stream=self._cupy_stream(handle))

    def signal_wait(self, offset: int, cmp: str, value: int, stream: Any = None,
                    timeout: float | None = None) -> None:
        h = int(self._internal.ptr) if stream is None else self.stream_handle(stream)
        self._wait_words(self.heap_base + offset, 1, -1, _CMPS[cmp], value, h, timeout)
        if stream is None:
            self._wait_host(h, f"signal_wait(heap offset {offset}, {cmp} {value})", timeout)

    def quiet(self, stream: Any = None) -> None:
        self.lib.os_quiet(self.stream_handle(stream))

    def wait_next(self, offset: int, n: int, skip: int, gen_offset: int, count: int, stream: Any = None,
                  timeout: float | None = None) -> None:
        h = int(self._internal.ptr) if stream is None else self.stream_handle(stream)
        self._launch_wait_next(self.heap_base + offset, n, skip, self.heap_base + gen_offset, 1, h, timeout)
        if stream is None:
            self._wait_host(h, f"signal_wait_next(heap offset {offset})", timeout)

    def _launch_wait_next(self, words: int, n: int, skip: int, gen: int, inc: int, handle: int,
                          timeout: float | None, poison: tuple[int, int] = (0, 0)) -> None:
        cp = self.cp
        self._wait_gen((1,), (POISON_THREADS if poison[1] else 1,),
                       (cp.uint64(words), cp.int32(n), cp.int32(skip), cp.uint64(gen), cp.uint64(inc),
                        self._flag_ptr, self._rec_ptr, self._abort_ptr, self._timeout(timeout),
                        cp.uint64(poison[0]), cp.uint64(poison[1])),
                       stream=self._cupy_stream(handle))

    def reset_words(self, offsets: Sequence[int]) -> None:
        """Zero these uint64 words of my heap once every queued GPU work (waits that advance
        them, on any stream) has finished."""
        rtm = self.cp.cuda.runtime
        rtm.deviceSynchronize()
        for off in offsets:
            rtm.memset(self.heap_base + off, 0, 8)
        rtm.deviceSynchronize()

    def barrier(self, row_offset: int, members: Sequence[int], my_index: int, epoch: int, gen_offset: int,
                stream: Any = None, timeout: float | None = None, tag: int = 0,
                poison: tuple[int, int] = (0, 0), dependent: bool = False) -> None:
        """Quiet, add ``1 + tag << 32`` to my word at every member (native call), wait for the next
        round of every member's word (kernel; the round count and the sum of call-site tags live
        on the GPU, so graphs replay it; a member with another sum at this round is a mismatch).
        ``poison`` (address, bytes): the wait kernel then does :meth:`poison_if_failed` on it.
        ``dependent``: the mapped barrier's kernel as a programmatic dependent launch (Hopper+)."""
        key = (tuple(members), row_offset)
        if key not in self._members:
            mine = self.rank // self.per_machine
            crosses = any(p // self.per_machine != mine for p in members)
            mapped = self.mapped_barrier and not crosses and all(self.peer_base[p] for p in members)
            rows = self.cp.asarray([self.peer_base[p] + row_offset for p in members], self.cp.uint64) \
                if mapped else None
            self._members[key] = (np.asarray(members, np.int32), crosses, rows)
        m, crosses, rows = self._members[key]
        h = self.stream_handle(stream)
        row = self.heap_base + row_offset
        inc = 1 + (tag << 32)
        if rows is not None:  # every member mapped, on this machine: quiet, then one kernel
            cp = self.cp
            self.lib.os_quiet(h)
            threads = POISON_THREADS if poison[1] else 1
            if dependent and self.pdl:
                u64, i32 = ctypes.c_uint64, ctypes.c_int32
                vals = (u64(rows.data.ptr), u64(row), i32(len(m)), i32(my_index), u64(self.heap_base + gen_offset),
                        u64(inc), u64(int(self._flag_ptr)), u64(int(self._rec_ptr)), u64(int(self._abort_ptr)),
                        u64(int(self._timeout(timeout))), u64(poison[0]), u64(poison[1]))
                argv = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
                pdl.launch(self._barrier_mapped_fn, (1, 1, 1), (threads, 1, 1), 0, h, ctypes.addressof(argv))
                return
            self._barrier_mapped((1,), (threads,),
                                 (rows, cp.uint64(row), cp.int32(len(m)), cp.int32(my_index),
                                  cp.uint64(self.heap_base + gen_offset), cp.uint64(inc), self._flag_ptr,
                                  self._rec_ptr, self._abort_ptr, self._timeout(timeout),
                                  cp.uint64(poison[0]), cp.uint64(poison[1])),
                                 stream=self._cupy_stream(h))
            return
        if crosses and self.link is not None:  # the barrier's messages cross an emulated link
            self._hold(int(self.link[1] * 1e9), h)
        self.lib.os_barrier_signal(row, self.ffi.cast("int32_t *", m.ctypes.data), len(m), my_index, inc, h)
        self._launch_wait_next(row, len(m), my_index, self.heap_base + gen_offset, inc, h, timeout, poison)

    def sync(self, stream: Any = None, timeout: float | None = None) -> None:
        self._wait_host(self.stream_handle(stream), "sync", timeout)

    def close(self, failed: bool = False) -> None:
        if failed:  # peers may be gone: NVSHMEM's collective teardown could wait forever
            try:
                self._abort_peers()
            except Exception:
                pass
            return
        try:
            self.cp.cuda.runtime.deviceSynchronize()
            self.nv.free(self._buf)
            self.cp.cuda.runtime.freeHost(self._rec_host)
        finally:
            self.nv.finalize()
