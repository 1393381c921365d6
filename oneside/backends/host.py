"""Host backend: ranks are processes on one machine, each arena a shared-memory file.

Every rank maps every other rank's arena, so a put is a ``memmove`` into the peer's
mapping and a get a ``memmove`` out of it. Operations complete before they return, which
trivially satisfies the stream-ordered semantics of the GPU backend (streams are accepted
and ignored). Atomic signal adds take a byte-range lock on the target's file. Waits poll
with back-off, time out with a message naming the ranks that did not arrive, and raise
:class:`PeerDeadError` as soon as a rank they depend on has died.
"""
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import socket
import struct
import time
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import CollectiveMismatchError, CommTimeoutError, OnesideError, PeerDeadError

HEADER = 4096  # bytes before the arena in each file: magic, pid, state
_MAGIC = 0x0E51DE
_READY, _DONE, _FAILED = 1, 2, 3
_CMP = {
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b, "lt": lambda a, b: a < b, "le": lambda a, b: a <= b,
}


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: fall back to signal 0
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


class _Backoff:
    """Spin briefly, then sleep with growing intervals (at most 2 ms)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1
        if self.n > 50:
            time.sleep(min(2e-3, 1e-5 * (self.n - 50)))


class HostBackend:
    name = "host"
    is_gpu = False

    def __init__(self, rank: int, world_size: int, heap_size: int, job: str, timeout: float,
                 shm_dir: str | None = None):
        self.rank, self.world_size, self.heap_size, self.timeout = rank, world_size, heap_size, timeout
        self.dir = shm_dir or os.environ.get("ONESIDE_SHM_DIR") or (
            "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else "/tmp")
        safe_job = "".join(c if c.isalnum() or c in "-_." else "_" for c in job)
        self._paths = [os.path.join(self.dir, f"oneside-{safe_job}-{r}") for r in range(world_size)]
        self._fds: list[int | None] = [None] * world_size
        self._maps: list[mmap.mmap | None] = [None] * world_size
        self._arrays: list[np.ndarray | None] = [None] * world_size
        self.bases = [0] * world_size
        self._pids = [0] * world_size
        self._last_check = 0.0
        self._site_sums: dict[int, int] = {}  # barrier row -> sum of the call-site tags so far
        self.hosts = (socket.gethostname(),) * world_size  # one host by construction
        self._create_own()
        try:
            self._rendezvous()
        except BaseException:
            self.close(failed=True)
            raise

    # -- setup ------------------------------------------------------------------------
    def _create_own(self) -> None:
        path = self._paths[self.rank]
        try:
            os.unlink(path)  # a stale file of an earlier job with the same id
        except FileNotFoundError:
            pass
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, HEADER + self.heap_size)
        except OSError as e:
            os.close(fd)
            raise OnesideError(f"heap_size={self.heap_size}: cannot create a shared arena in {self.dir}: {e}") from e
        self._attach(self.rank, fd)
        # Publish: pid and sizes first, magic and state last.
        self._maps[self.rank][8:40] = struct.pack("<qqqq", os.getpid(), self.world_size, self.heap_size, 0)
        self._maps[self.rank][0:8] = struct.pack("<q", _MAGIC)
        self._set_state(_READY)

    def _attach(self, r: int, fd: int) -> None:
        m = mmap.mmap(fd, HEADER + self.heap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        arr = np.frombuffer(m, dtype=np.uint8)
        self._fds[r], self._maps[r], self._arrays[r] = fd, m, arr
        self.bases[r] = arr.ctypes.data + HEADER

    def _set_state(self, state: int) -> None:
        m = self._maps[self.rank]
        if m is not None and not m.closed:
            m[40:48] = struct.pack("<q", state)

    def _rendezvous(self) -> None:
        deadline = time.monotonic() + self.timeout
        missing = set(range(self.world_size)) - {self.rank}
        backoff = _Backoff()
        while missing:
            for r in sorted(missing):
                if self._try_attach(r):
                    missing.discard(r)
            if not missing:
                break
            if time.monotonic() > deadline:
                raise CommTimeoutError(
                    f"oneside.init: ranks {sorted(missing)} did not join within {self.timeout:.1f} s "
                    f"(host backend, arenas in {self.dir}); are all {self.world_size} ranks started "
                    f"with the same job id?")
            backoff()
        self.heap_base = self.bases[self.rank]

    def _try_attach(self, r: int) -> bool:
        try:
            fd = os.open(self._paths[r], os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            size = os.fstat(fd).st_size
            if size < HEADER:
                os.close(fd)
                return False
            head = os.pread(fd, 48, 0)
            magic, pid, world, heap, _, state = struct.unpack("<qqqqqq", head)
            if magic != _MAGIC or state != _READY or not _pid_alive(pid):
                os.close(fd)
                return False
            if world != self.world_size or heap != self.heap_size:
                os.close(fd)
                raise OnesideError(
                    f"rank {r} was started with world_size={world}, heap_size={heap}; this rank has "
                    f"world_size={self.world_size}, heap_size={self.heap_size}: every rank must pass the same")
            self._attach(r, fd)
            self._pids[r] = pid
            return True
        except OnesideError:
            raise
        except OSError:
            os.close(fd)
            return False

    def after_rendezvous(self) -> None:
        """All ranks mapped every arena (a barrier has passed): the names can go."""
        try:
            os.unlink(self._paths[self.rank])
        except FileNotFoundError:
            pass

    # -- liveness ---------------------------------------------------------------------
    def check_peers(self, ranks: Iterable[int], force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_check < 0.05:
            return
        self._last_check = now
        for r in ranks:
            if r == self.rank:
                continue
            _, pid, _, _, _, state = struct.unpack("<qqqqqq", self._maps[r][0:48])
            if state == _FAILED:
                raise PeerDeadError(f"rank {r} failed (it raised an error and finalized); this rank waited for it")
            if state == _DONE:
                raise PeerDeadError(f"rank {r} finalized while this rank still waited for it")
            if not _pid_alive(pid):
                raise PeerDeadError(f"rank {r} (pid {pid}) died while this rank waited for it")

    # -- memory -----------------------------------------------------------------------
    def local_array(self, offset: int, shape: tuple[int, ...], dtype: np.dtype):
        return self.peer_array(offset, shape, dtype, self.rank)

    def peer_address(self, offset: int, pe: int) -> int:
        """Address of ``offset`` in rank ``pe``'s arena as this process sees it (every arena is
        mapped here)."""
        return self.bases[pe] + offset

    def peer_array(self, offset: int, shape: tuple[int, ...], dtype: np.dtype, pe: int):
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return self._arrays[pe][HEADER + offset: HEADER + offset + n].view(dtype).reshape(shape)

    @staticmethod
    def upload(local: np.ndarray, values: np.ndarray) -> None:
        local[...] = values

    @staticmethod
    def download(local: np.ndarray) -> np.ndarray:
        return np.array(local)

    @staticmethod
    def torch_tensor(local):
        import torch

        return torch.from_numpy(local)

    @staticmethod
    def buffer_info(obj: Any, what: str) -> tuple[int, int]:
        """(address, nbytes) of a contiguous CPU numpy array or torch tensor."""
        if isinstance(obj, np.ndarray):
            if not obj.flags.c_contiguous:
                raise ValueError(f"{what}: expected a C-contiguous array, got strides {obj.strides}")
            return obj.ctypes.data, obj.nbytes
        if type(obj).__module__.startswith("torch"):
            if obj.device.type != "cpu":
                raise ValueError(f"{what}: the host backend needs CPU memory, got a tensor on {obj.device}")
            if not obj.is_contiguous():
                raise ValueError(f"{what}: expected a contiguous tensor, got strides {obj.stride()}")
            return obj.data_ptr(), obj.numel() * obj.element_size()
        raise TypeError(f"{what}: expected a numpy array, torch tensor or SymArray, got {type(obj).__name__}")

    # -- transfers --------------------------------------------------------------------
    def prepare(self, kind: str, local: Sequence[int], offsets: Sequence[int], nbytes: Sequence[int],
                pes: Sequence[int], signal: tuple[int, int, str] | None, engine: str | None = None):
        remote = [self.bases[p] + o for p, o in zip(pes, offsets)]
        if kind == "put":
            ops = list(zip(remote, local, nbytes))
        else:
            ops = list(zip(local, remote, nbytes))
        sig = None
        if signal is not None:
            off, value, op = signal
            sig = [(p, off, value, op) for p in pes]
        return ops, sig

    def issue(self, handle, stream: Any = None, nbi: bool = False) -> None:
        ops, sig = handle
        mv = ctypes.memmove
        for dst, src, n in ops:
            mv(dst, src, n)
        if sig is not None:
            for p, off, value, op in sig:
                self.signal_op(off, value, op, p)

    def transfer(self, kind: str, local: int, offset: int, nbytes: int, pe: int,
                 signal: tuple[int, int, str] | None, stream: Any = None, nbi: bool = False) -> None:
        """One transfer without building a batch."""
        remote = self.bases[pe] + offset
        if kind == "put":
            ctypes.memmove(remote, local, nbytes)
        else:
            ctypes.memmove(local, remote, nbytes)
        if signal is not None:
            self.signal_op(signal[0], signal[1], signal[2], pe)

    def signal_op(self, offset: int, value: int, op: str, pe: int, stream: Any = None) -> None:
        addr = self.bases[pe] + offset
        if op == "set":
            ctypes.c_uint64.from_address(addr).value = value
            return
        fd, pos = self._fds[pe], HEADER + offset
        fcntl.lockf(fd, fcntl.LOCK_EX, 8, pos)
        try:
            word = ctypes.c_uint64.from_address(addr)
            word.value = (word.value + value) & 0xFFFFFFFFFFFFFFFF
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 8, pos)

    def read_signal(self, offset: int) -> int:
        return ctypes.c_uint64.from_address(self.bases[self.rank] + offset).value

    def _poll(self, pending, timeout: float | None, message) -> None:
        """Wait until ``pending()`` returns no ranks; raise on timeout or when one of them died.

        ``pending()`` lists the ranks still awaited (all peers when unknown); ``message(t)``
        is the timeout error's text. A peer that delivered and then left is not an error.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        backoff = _Backoff()
        while True:
            late = pending()
            if not late:
                return
            if time.monotonic() > deadline:
                raise CommTimeoutError(message(timeout))
            try:
                self.check_peers(late)
            except PeerDeadError:
                if not pending():
                    return
                raise
            backoff()

    def signal_wait(self, offset: int, cmp: str, value: int, stream: Any = None,
                    timeout: float | None = None) -> None:
        test = _CMP[cmp]
        word = ctypes.c_uint64.from_address(self.bases[self.rank] + offset)
        others = [r for r in range(self.world_size) if r != self.rank]
        self._poll(lambda: [] if test(word.value, value) else others, timeout,
                   lambda t: f"signal_wait: signal at heap offset {offset} is {word.value}, waited {t:.1f} s "
                             f"for it to become {cmp} {value}")

    def quiet(self, stream: Any = None) -> None:
        pass  # every transfer is complete when it returns

    def reset_words(self, offsets: Sequence[int]) -> None:
        """Zero these uint64 words of my arena (every call touching them has completed: the host
        backend's calls complete before they return)."""
        for off in offsets:
            ctypes.c_uint64.from_address(self.bases[self.rank] + off).value = 0

    def wait_next(self, offset: int, n: int, skip: int, gen_offset: int, count: int, stream: Any = None,
                  timeout: float | None = None) -> None:
        """Wait until every word at ``offset`` (n of them, but ``skip``) is >= ``count``."""
        words = [ctypes.c_uint64.from_address(self.bases[self.rank] + offset + 8 * i) for i in range(n) if i != skip]
        others = [r for r in range(self.world_size) if r != self.rank]
        self._poll(lambda: others if any(w.value < count for w in words) else [], timeout,
                   lambda t: f"signal_wait_next: words at heap offset {offset} are {[w.value for w in words]}, "
                             f"waited {t:.1f} s for round {count}")

    def barrier(self, row_offset: int, members: Sequence[int], my_index: int, epoch: int, gen_offset: int,
                stream: Any = None, timeout: float | None = None, tag: int = 0,
                poison: tuple[int, int] = (0, 0), dependent: bool = False) -> None:
        """Flat barrier: tell every member, then wait for every member (a failure raises here, so
        ``poison`` has nothing to mark; ``dependent`` means nothing without a GPU).

        A word holds ``epoch | site_sum << 32`` (the sum of this rank's call-site tags on this
        team so far); a member whose word shows this epoch with another sum came from another
        call site (one of us skipped or added a collective). A member already one epoch ahead
        overwrote its word: the next barrier compares its sum.
        """
        sums = (self._site_sums.get(row_offset, 0) + tag) & 0xFFFFFFFF
        self._site_sums[row_offset] = sums
        value = epoch & 0xFFFFFFFF | sums << 32
        for j, r in enumerate(members):
            if j != my_index:
                ctypes.c_uint64.from_address(self.bases[r] + row_offset + 8 * my_index).value = value
        base = self.bases[self.rank] + row_offset
        words = [(r, ctypes.c_uint64.from_address(base + 8 * j)) for j, r in enumerate(members) if j != my_index]
        late = lambda: [r for r, w in words if w.value & 0xFFFFFFFF < epoch]  # noqa: E731
        self._poll(late, timeout, lambda t: f"barrier over ranks {list(members)} timed out after {t:.1f} s: "
                                            f"ranks {late()} did not arrive")
        for r, w in words:
            v = w.value
            if v & 0xFFFFFFFF == epoch and v >> 32 != sums:
                raise CollectiveMismatchError(
                    f"barrier over ranks {list(members)} (round {epoch}): rank {r} arrived from a different "
                    f"call site than rank {self.rank} (its sequence of collective calls differs: one of the two "
                    f"skipped or added one); every rank must make the same collective calls in the same order")

    @staticmethod
    def set_abort_word(offset: int) -> None:
        """Unused: a failed rank's state in its arena header tells the peers (check_peers)."""

    @staticmethod
    def raise_device_error() -> None:
        """No GPU-side waits here: errors are raised where they happen."""

    @staticmethod
    def poison_if_failed(ptr: int, nbytes: int, stream: Any = None) -> None:
        """Nothing to do: a failed wait raised before a result could be returned."""

    def sync(self, stream: Any = None, timeout: float | None = None) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        self._set_state(_FAILED if failed else _DONE)
        self._arrays = [None] * self.world_size
        for r in range(self.world_size):
            m, fd = self._maps[r], self._fds[r]
            if m is not None:
                try:
                    m.close()
                except BufferError:  # a numpy view is still alive; the mapping goes with it
                    pass
            if fd is not None:
                os.close(fd)
        self._maps = [None] * self.world_size
        self._fds = [None] * self.world_size
        try:
            os.unlink(self._paths[self.rank])
        except FileNotFoundError:
            pass
