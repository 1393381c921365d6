"""Start N ranks of a script on this host: ``python -m oneside.launch -n N [--machines M] script.py args``.

Each rank gets torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) plus ONESIDE_MACHINES (the ranks form ``M`` virtual machines of
``N / M`` ranks), ONESIDE_HOST_RANK (index on this host, which picks the GPU) and a fresh
ONESIDE_JOB id. If a rank fails, the others get a few seconds to notice and raise, then
are terminated; the launcher exits with the first failing rank's code.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

# Never create NVLink multicast objects (shared hosts): keep these set for every rank.
SAFE_ENV = {"NVSHMEM_DISABLE_NVLS": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now (all bound at once, so the system gives distinct ones)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oneside.launch", description=__doc__.splitlines()[0])
    p.add_argument("-n", "--nproc", type=int, required=True, help="number of ranks")
    p.add_argument("--machines", type=int, default=1, help="virtual machines the ranks form (must divide -n)")
    p.add_argument("--backend", choices=("host", "nvshmem"), help="sets ONESIDE_BACKEND for every rank")
    p.add_argument("--grace", type=float, default=10.0, help="seconds the others get after a rank fails")
    p.add_argument("-m", dest="module", help="run a module (like python -m) instead of a script")
    p.add_argument("script", nargs="?", help="script to run")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    if a.nproc < 1:
        p.error(f"-n {a.nproc}: expected at least one rank")
    if a.machines < 1 or a.nproc % a.machines:
        p.error(f"--machines {a.machines}: must divide -n {a.nproc}")
    if (a.module is None) == (a.script is None):
        p.error("give a script or -m module")
    target = ["-m", a.module] if a.module else [a.script]
    if a.module and a.script:
        a.args = [a.script, *a.args]
    per = a.nproc // a.machines
    base = dict(os.environ, **{k: os.environ.get(k, v) for k, v in SAFE_ENV.items()})
    master, dist, store = _free_ports(3)
    base.update(MASTER_ADDR=base.get("MASTER_ADDR", "127.0.0.1"), MASTER_PORT=str(master),
                ONESIDE_DIST_PORT=str(dist),  # for a torch.distributed group beside oneside
                ONESIDE_STORE_PORT=str(store),  # NVSHMEM's rendezvous (the nvshmem backend's rank 0)
                ONESIDE_JOB=uuid.uuid4().hex[:12], ONESIDE_MACHINES=str(a.machines),
                WORLD_SIZE=str(a.nproc), LOCAL_WORLD_SIZE=str(per))
    if a.backend:
        base["ONESIDE_BACKEND"] = a.backend
    procs = []
    for r in range(a.nproc):
        env = dict(base, RANK=str(r), LOCAL_RANK=str(r % per), ONESIDE_HOST_RANK=str(r))
        procs.append(subprocess.Popen([sys.executable, *target, *a.args], env=env))

    def forward(sig, _frame):
        for q in procs:
            if q.poll() is None:
                q.send_signal(sig)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    code, failed_at = 0, None
    reported: set[int] = set()
    killed: set[int] = set()

    def report() -> None:  # every rank that failed, once (several may fail between two polls)
        nonlocal code, failed_at
        for r, q in enumerate(procs):
            rc = q.poll()
            if rc not in (None, 0) and r not in reported and r not in killed:
                reported.add(r)
                if failed_at is None:
                    code, failed_at = rc, time.monotonic()
                print(f"oneside.launch: rank {r} exited with code {rc}", file=sys.stderr, flush=True)

    while any(q.poll() is None for q in procs):
        report()
        if failed_at is not None and time.monotonic() - failed_at > a.grace:
            for r, q in enumerate(procs):
                if q.poll() is None:
                    killed.add(r)
                    q.kill()
        time.sleep(0.05)
    report()
    if code == 0:
        code = next((q.returncode for q in procs if q.returncode), 0)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
