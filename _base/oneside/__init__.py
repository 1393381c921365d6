"""oneside: one-sided communication on a symmetric heap (NVSHMEM on GPUs, shared memory on CPUs).

    import oneside
    rt = oneside.init()                      # rank/world from torchrun, mpirun or oneside.launch
    x = rt.alloc((1024,), "float32")         # collective, symmetric
    rt.put(x, x.local, pe=(rt.rank + 1) % rt.world_size)
    rt.barrier_all()
    oneside.finalize()
"""
from .errors import (CollectiveMismatchError, CommTimeoutError, HeapExhaustedError, InjectedFault,
                     NotInitializedError, OnesideError, PeerDeadError)
from .heap import SymArray
from .mesh import Mesh, Team
from .runtime import Runtime, TransferBatch, current, finalize, init

__all__ = [
    "init", "finalize", "current", "Runtime", "TransferBatch", "SymArray", "Mesh", "Team",
    "OnesideError", "NotInitializedError", "HeapExhaustedError", "CommTimeoutError", "PeerDeadError",
    "CollectiveMismatchError", "InjectedFault",
]
