"""The planner: which sequence-parallel algorithm, with which degrees, over which teams.

Every algorithm is one schedule with three levels, any of which may have size 1:

* **Ulysses** over a team of ``U`` ranks: all-to-all of Q, K, V (heads split by ``U``) by one
  ScatterPush, and of O back.
* **Torus** over a team of ``T`` ranks, one per machine: the inter-machine all-to-all broken
  into stages overlapped with compute (Pull Q, Pull KV, Push O; design.md section 3).
* **Ring** over a team of ``R`` ranks: every rank attends its queries to the K/V of all ring
  peers, pulled directly from them (no ring pass).

Ranks have coordinates ``(t, u, r)``; the algorithms differ only in the degrees and in how
coordinates map to the ``machines x gpus_per_machine`` mesh:

==========  =======================  ==========================================
algorithm   degrees                  placement
==========  =======================  ==========================================
ulysses     U = world                one all-to-all over every rank
ring        R = world                one ring over every rank
usp         U inside a machine,      Ulysses on consecutive ranks of a machine,
            R = world / U            Ring across (xDiT/yunchang's USP)
tas         U spans machines first,  Ulysses over (machines x part of a machine),
            R = the rest             Ring inside the machine (the paper's TAS)
torus       T = machines, U and R    Torus across machines; inside a machine
            inside the machine       Ulysses then Ring (full StreamFusion)
==========  =======================  ==========================================
"""
from __future__ import annotations

from dataclasses import dataclass, field

from oneside import Mesh, Team

ALGORITHMS = ("ulysses", "ring", "usp", "tas", "torus")


class PlanError(ValueError):
    """The requested plan cannot run on this mesh / head count."""


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


@dataclass(frozen=True)
class Plan:
    """A chosen schedule: degrees, the mesh, and the coordinate -> rank map.

    ``order`` names the axes from slowest- to fastest-varying in the rank number, each axis
    ``(level, size)``; a level may own two axes (TAS's Ulysses spans machines and part of a
    machine). ``rank(t, u, r)`` gives the global rank of coordinates; the teams of a rank
    vary one level and fix the others.
    """

    algorithm: str
    mesh: Mesh
    heads: int
    seq_len: int
    head_dim: int
    T: int
    U: int
    R: int
    order: tuple[tuple[str, int], ...]
    reason: str = ""
    _strides: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        # stride of each (level, axis position in that level) in the rank number
        stride, strides = 1, {}
        for level, size in reversed(self.order):
            strides.setdefault(level, []).insert(0, (size, stride))
            stride *= size
        self._strides.update(strides)

    @property
    def world_size(self) -> int:
        return self.mesh.world_size

    def _level_coord(self, level: str, rank: int) -> int:
        c = 0
        for size, stride in self._strides.get(level, []):
            c = c * size + (rank // stride) % size
        return c

    def _level_offset(self, level: str, c: int) -> int:
        off = 0
        for size, stride in reversed(self._strides.get(level, [])):
            off += (c % size) * stride
            c //= size
        return off

    def coords(self, rank: int) -> tuple[int, int, int]:
        return tuple(self._level_coord(lv, rank) for lv in ("t", "u", "r"))  # type: ignore[return-value]

    def rank(self, t: int, u: int, r: int) -> int:
        return self._level_offset("t", t) + self._level_offset("u", u) + self._level_offset("r", r)

    def team(self, level: str, rank: int) -> Team:
        t, u, r = self.coords(rank)
        size = {"t": self.T, "u": self.U, "r": self.R}[level]
        return Team(tuple(self.rank(*((i, u, r) if level == "t" else (t, i, r) if level == "u" else (t, u, i)))
                          for i in range(size)))

    def comm_volume(self, batch: int = 1, itemsize: int = 2) -> dict[str, float]:
        """Bytes each rank sends per layer, by level (Q, K, V in, O out)."""
        local = batch * -(-self.seq_len // self.world_size) * self.heads * self.head_dim * itemsize
        u = 4 * local * (self.U - 1) / self.U
        # after Ulysses a rank holds U shards for H/U heads: the same bytes as `local`
        t = 4 * local * (self.T - 1) / self.T
        r = 2 * local * (self.R - 1)  # K and V of each ring peer are pulled once
        return {"ulysses": u, "torus": t, "ring": r}

    def explain(self, batch: int = 1, itemsize: int = 2) -> str:
        m, g = self.mesh.machines, self.mesh.gpus_per_machine
        lines = [f"plan: {self.algorithm} on {m} machine(s) x {g} GPU(s), {self.heads} heads, "
                 f"seq {self.seq_len}, head_dim {self.head_dim}",
                 f"  degrees: Torus T={self.T} (across machines), Ulysses U={self.U}, Ring R={self.R}",
                 "  axes (slow -> fast): " + " x ".join(f"{lv}{s}" for lv, s in self.order)]
        if self.reason:
            lines.append(f"  why: {self.reason}")
        for level, name in (("t", "torus"), ("u", "ulysses"), ("r", "ring")):
            size = {"t": self.T, "u": self.U, "r": self.R}[level]
            if size > 1:
                groups = sorted({self.team(level, rk).ranks for rk in range(self.world_size)})
                shown = ", ".join(str(list(gp)) for gp in groups[:4]) + (" ..." if len(groups) > 4 else "")
                lines.append(f"  {name} groups: {shown}")
        vol = self.comm_volume(batch, itemsize)
        lines.append("  per-rank bytes sent per layer: " + ", ".join(
            f"{k} {v / 2**20:.2f} MiB" for k, v in vol.items() if v) + (" (none)" if not any(vol.values()) else ""))
        return "\n".join(lines)


def make_plan(mesh: Mesh, heads: int, seq_len: int, head_dim: int, algorithm: str | None = None,
              ulysses_degree: int | None = None) -> Plan:
    """Choose (or check a forced) algorithm and its degrees; raise :class:`PlanError` if impossible.

    With ``algorithm=None``: ``torus`` on several machines when the head count allows it,
    else ``usp``/``tas``'s best split on one machine (plain Ulysses when it covers the world),
    else ``ring``. ``ulysses_degree`` forces U for ``usp``/``tas``/``torus`` (U inside the
    machine for torus).
    """
    for name, v in (("heads", heads), ("seq_len", seq_len), ("head_dim", head_dim)):
        if not isinstance(v, int) or v < 1:
            raise PlanError(f"{name}={v!r}: expected a positive int")
    M, G, W = mesh.machines, mesh.gpus_per_machine, mesh.world_size
    if seq_len < W:
        raise PlanError(f"seq_len={seq_len}: fewer tokens than the {W} ranks")
    if algorithm is None:
        if M > 1 and heads % M == 0:
            return make_plan(mesh, heads, seq_len, head_dim, "torus", ulysses_degree)
        if heads % W == 0:
            return make_plan(mesh, heads, seq_len, head_dim, "ulysses")
        for algo in ("tas", "usp", "ring"):
            try:
                return make_plan(mesh, heads, seq_len, head_dim, algo, ulysses_degree)
            except PlanError:
                continue
    if algorithm not in ALGORITHMS:
        raise PlanError(f"algorithm={algorithm!r}: expected one of {ALGORITHMS}")

    def plan(T: int, U: int, R: int, order, reason: str) -> Plan:
        return Plan(algorithm, mesh, heads, seq_len, head_dim, T, U, R, tuple(order), reason)

    def check_u(u: int, limit: int, what: str) -> None:
        if u < 1 or limit % u or heads % u:
            raise PlanError(f"ulysses_degree={u}: must divide {what} ({limit}) and heads ({heads})")

    if algorithm == "ulysses":
        if heads % W:
            raise PlanError(f"algorithm='ulysses': heads={heads} is not divisible by the {W} ranks; "
                            f"use 'usp', 'tas', 'torus' or 'ring'")
        return plan(1, W, 1, [("u", W)], "all-to-all over every rank")
    if algorithm == "ring":
        return plan(1, 1, W, [("r", W)], "every rank pulls every peer's K/V")
    if algorithm == "usp":
        if ulysses_degree is not None:
            check_u(ulysses_degree, G, "gpus_per_machine")
            U = ulysses_degree
        else:
            U = next(d for d in _divisors_desc(G) if heads % d == 0)
        return plan(1, U, W // U, [("r", W // U), ("u", U)],
                    f"Ulysses inside the machine ({U} of {G} GPUs divide {heads} heads), Ring across")
    if algorithm == "tas":
        # Ulysses spans machines first, then as much of the machine as the heads allow
        if ulysses_degree is not None:
            U = ulysses_degree
            if U % M or G % (U // M) or heads % U:
                raise PlanError(f"ulysses_degree={U}: for tas it must be machines ({M}) x a divisor of "
                                f"gpus_per_machine ({G}) and divide heads ({heads})")
        else:
            if heads % M:
                raise PlanError(f"algorithm='tas': heads={heads} not divisible by machines={M}; "
                                f"use 'usp' or 'ring'")
            U = M * next(d for d in _divisors_desc(G) if heads % (M * d) == 0)
        ui, R = U // M, G // (U // M)
        return plan(1, U, R, [("u", M), ("u", ui), ("r", R)] if M > 1 else [("u", ui), ("r", R)],
                    f"Ulysses across the {M} machines x {ui} GPUs ({U} divides {heads} heads), Ring inside")
    # torus
    if heads % M:
        raise PlanError(f"algorithm='torus': heads={heads} not divisible by machines={M} (one head group "
                        f"per torus stage); use 'usp' or 'ring'")
    if ulysses_degree is not None:
        check_u(ulysses_degree, G, "gpus_per_machine")
        if heads % (ulysses_degree * M):
            raise PlanError(f"ulysses_degree={ulysses_degree}: x machines={M} must divide heads={heads}")
        U = ulysses_degree
    else:
        U = next(d for d in _divisors_desc(G) if heads % (M * d) == 0)
    R = G // U
    return plan(M, U, R, [("t", M), ("u", U), ("r", R)],
                f"Torus over the {M} machines, Ulysses over {U} and Ring over {R} GPUs inside each")
