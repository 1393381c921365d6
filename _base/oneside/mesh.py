"""Teams on a ``machines x gpus_per_machine`` mesh of ranks.

Rank ``r`` sits on machine ``r // gpus_per_machine`` with local index ``r % gpus_per_machine``
(the order torchrun and mpirun use). A :class:`Team` is an ordered tuple of global ranks;
the mesh builds the teams the sequence-parallel algorithms need: the machine team (ranks
of one machine), the cross-machine team (same local index on every machine) and strided
sub-teams of either.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class Team:
    """An ordered set of global ranks. ``team[i]`` is the global rank of member ``i``."""

    ranks: tuple[int, ...]
    slot: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        ranks = tuple(int(r) for r in self.ranks)
        if not ranks:
            raise ValueError("Team(ranks): expected at least one rank, got none")
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"Team(ranks): ranks must be distinct, got {ranks}")
        if min(ranks) < 0:
            raise ValueError(f"Team(ranks): ranks must be >= 0, got {ranks}")
        object.__setattr__(self, "ranks", ranks)
        # Barrier slot: a stable hash of the member list, identical on every rank.
        object.__setattr__(self, "slot", zlib.crc32(repr(ranks).encode()))

    @property
    def size(self) -> int:
        return len(self.ranks)

    def __len__(self) -> int:
        return len(self.ranks)

    def __getitem__(self, i: int) -> int:
        return self.ranks[i]

    def __iter__(self):
        return iter(self.ranks)

    def __contains__(self, rank: object) -> bool:
        return rank in self.ranks

    def index(self, rank: int) -> int:
        """Team-local index of global ``rank`` (ValueError if it is not a member)."""
        try:
            return self.ranks.index(rank)
        except ValueError:
            raise ValueError(f"rank {rank} is not a member of team {self.ranks}") from None

    def translate(self, index: int, other: "Team") -> int | None:
        """Index in ``other`` of this team's member ``index`` (None if not a member there)."""
        rank = self.ranks[index]
        return other.ranks.index(rank) if rank in other.ranks else None

    def strided(self, start: int, stride: int, size: int) -> "Team":
        """Sub-team of members ``start, start+stride, ...`` (``size`` of them)."""
        idx = [start + i * stride for i in range(size)]
        if size < 1 or stride < 1 or start < 0 or idx[-1] >= self.size:
            raise ValueError(
                f"strided(start={start}, stride={stride}, size={size}): out of range for a team of {self.size}")
        return Team(tuple(self.ranks[i] for i in idx))


@dataclass(frozen=True)
class Mesh:
    """``machines x gpus_per_machine`` ranks; rank = machine * gpus_per_machine + local."""

    machines: int
    gpus_per_machine: int

    def __post_init__(self) -> None:
        for name in ("machines", "gpus_per_machine"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Mesh({name}={v!r}): expected a positive int")

    @property
    def world_size(self) -> int:
        return self.machines * self.gpus_per_machine

    @property
    def world(self) -> Team:
        return Team(tuple(range(self.world_size)))

    def _check(self, rank: int) -> int:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} out of range for a {self.machines}x{self.gpus_per_machine} mesh")
        return rank

    def machine_of(self, rank: int) -> int:
        return self._check(rank) // self.gpus_per_machine

    def local_index(self, rank: int) -> int:
        return self._check(rank) % self.gpus_per_machine

    def rank_of(self, machine: int, local: int) -> int:
        if not (0 <= machine < self.machines and 0 <= local < self.gpus_per_machine):
            raise ValueError(f"(machine={machine}, local={local}) outside a {self.machines}x{self.gpus_per_machine} mesh")
        return machine * self.gpus_per_machine + local

    def same_machine(self, a: int, b: int) -> bool:
        return self.machine_of(a) == self.machine_of(b)

    def machine_team(self, rank: int) -> Team:
        """The ranks on ``rank``'s machine (intra-machine team)."""
        m = self.machine_of(rank)
        return Team(tuple(self.rank_of(m, g) for g in range(self.gpus_per_machine)))

    def cross_team(self, rank: int) -> Team:
        """One rank per machine, with ``rank``'s local index (inter-machine team)."""
        g = self.local_index(rank)
        return Team(tuple(self.rank_of(m, g) for m in range(self.machines)))

    def teams(self, sizes: Sequence[int], rank: int) -> list[Team]:
        """Split the world into nested groups; see :meth:`group`."""
        return [self.group(sizes, level, rank) for level in range(len(sizes))]

    def group(self, sizes: Sequence[int], level: int, rank: int) -> Team:
        """Team of ``rank`` at ``level`` of a factorisation of the world.

        ``sizes`` (product = world size) orders the mesh axes from slowest-varying
        (outermost, e.g. the inter-machine axis) to fastest-varying. The team at ``level``
        varies coordinate ``level`` and fixes all the others. For example on a 2x4 mesh,
        ``sizes=(2, 2, 2)`` gives a cross-machine pair (level 0) and two intra-machine pairs
        of different strides (levels 1 and 2).
        """
        sizes = tuple(int(s) for s in sizes)
        prod = 1
        for s in sizes:
            if s < 1:
                raise ValueError(f"group(sizes={sizes}): sizes must be positive")
            prod *= s
        if prod != self.world_size:
            raise ValueError(f"group(sizes={sizes}): product {prod} != world size {self.world_size}")
        if not 0 <= level < len(sizes):
            raise ValueError(f"group(level={level}): expected 0 <= level < {len(sizes)}")
        self._check(rank)
        stride = 1
        for s in sizes[level + 1:]:
            stride *= s
        coord = (rank // stride) % sizes[level]
        base = rank - coord * stride
        return Team(tuple(base + i * stride for i in range(sizes[level])))

