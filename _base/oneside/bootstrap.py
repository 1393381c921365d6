"""Where a rank learns who it is: explicit arguments, torchrun, mpirun or ``oneside.launch``."""
from __future__ import annotations

import os
from dataclasses import dataclass

# (rank, world size, local rank, local world size) variables by launcher, first match wins.
_LAUNCHERS = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),  # torchrun, oneside.launch
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),  # MPICH / Hydra
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
)

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def parse_size(value: int | str, what: str = "heap_size") -> int:
    """Bytes from an int or a string such as ``'256MiB'`` or ``'1G'``."""
    if isinstance(value, int):
        n = value
    else:
        s = str(value).strip().upper().replace(" ", "")
        num = s.rstrip("KMGIB")
        unit = s[len(num):]
        try:
            n = int(float(num) * _UNITS[unit])
        except (KeyError, ValueError):
            raise ValueError(f"{what}={value!r}: expected bytes or a size like '256MiB'") from None
    if n <= 0:
        raise ValueError(f"{what}={value!r}: expected a positive size")
    return n


@dataclass(frozen=True)
class Placement:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    machines: int
    job: str


def placement(rank: int | None = None, world_size: int | None = None, local_rank: int | None = None,
              machines: int | None = None, job: str | None = None) -> Placement:
    """Resolve this process's place from the arguments, then the environment."""
    env = os.environ
    found = next((names for names in _LAUNCHERS if names[0] in env and names[1] in env), None)
    if rank is None:
        rank = int(env[found[0]]) if found else 0
    if world_size is None:
        world_size = int(env[found[1]]) if found else 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}: expected 0 <= rank < world_size={world_size}")
    local_world = int(env[found[3]]) if found and found[3] in env else None
    if local_rank is None:
        local_rank = int(env[found[2]]) if found and found[2] in env else rank
    if machines is None:
        if "ONESIDE_MACHINES" in env:
            machines = int(env["ONESIDE_MACHINES"])
        elif local_world:
            machines = max(1, world_size // local_world)
        else:
            machines = 1
    if machines < 1 or world_size % machines:
        raise ValueError(f"machines={machines}: must divide world_size={world_size}")
    if job is None:
        job = env.get("ONESIDE_JOB") or env.get("TORCHELASTIC_RUN_ID") or ""
        if not job or job == "none":
            job = f"{env.get('MASTER_ADDR', 'local')}-{env.get('MASTER_PORT', '0')}"
    return Placement(rank, world_size, local_rank, local_world or world_size // machines, machines, job)
