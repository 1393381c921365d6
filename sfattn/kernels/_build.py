"""Compilation of the attention kernels with nvcc, one cubin per configuration, cached on disk.

No CuPy or GPU needed here: this module only runs nvcc (tests/test_kernels_compile.py uses it on
machines without a GPU).  The cache lives in ``$SFATTN_CACHE`` or ``~/.cache/streamfusion/kernels``
and is keyed by a hash of the sources, the options and the nvcc version.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent
SOURCES = ("attn_common.cuh", "wgmma_ops.cuh", "wgmma_fp8_ops.cuh", "sm90_common.cuh", "attn_fa2.cu",
           "attn_sm90ws.cu", "attn_sm90fp8.cu", "attn_merge.cu", "heads_copy.cu", "quant.cu")

# tile shapes (rows of Q per block, keys per K/V tile, threads) of each implementation
FA2_NW, FA2_BN = 8, 64
WS_PRODUCER_REGS = 24
WS_CONSUMER_REGS = {2: 240, 3: 160}  # per consumer warpgroup count: 24 x 128 + CR x 128 NC <= 64K
# sm90ws per head dim: consumer warpgroups (64 Q rows each)
WS_CONSUMERS = {64: 3, 128: 2}
# sm90ws per (head dim, consumer warpgroups): (keys per tile, K ring slots, V ring slots); fits
# 227 KB of shared memory and, with 3 consumers (160 registers each), their registers
WS_TILES = {(64, 2): (192, 3, 3), (128, 2): (192, 2, 2), (64, 3): (128, 3, 3), (128, 3): (128, 2, 2)}
# ... where the cp.async producer (TMA=0) differs: its consumers spill with 192 keys at head dim 128
WS_TILES_CPASYNC = {(128, 2): (176, 2, 2)}
# sm90ws knobs (impl='sm90ws:NAME=value,...'): ring slots, ping-pong, empty arrivals per warp,
# producer/consumer registers, TMA loads, persistent launch, consumer warpgroups, exp2 flavour,
# rescale threshold (log2 units, 0: rescale whenever the max grows), blocks per cluster sharing
# K/V tiles by TMA multicast (CL=2: head dim 128, TMA, not persistent), O rescaled under the S GEMM
# (FO=1)
WS_KNOBS = ("KST", "VST", "PP", "EA", "PR", "CR", "TMA", "PERSIST", "NC", "EX2", "RT", "CL", "FO", "UW", "DA", "OV")
# sm90ws per head dim: blocks per cluster
WS_CLUSTER = {64: 1, 128: 1}
MAXQ, MAXKV = 16, 16
SMEM_MAX = 227 * 1024  # dynamic shared memory per block on sm_90
# sm90fp8 (the FP8 kernel): keys per K/V tile (BN: 128 or 192; every 64-key group lies in one
# 128-key K scale block; 256 would spill), consumer warpgroups and ring slots per head dim; knobs as for sm90ws where
# they exist there
FP8_TILES = {64: (3, 4, 4), 128: (2, 3, 3)}  # head dim -> (consumers, K slots, V slots)
FP8_BN = (128, 192)
# head dim -> default keys per tile (192 at 128: +5 % e4m3 P.V, +8 % 16-bit P.V at 16k on an H200,
# docs/fp8.md; at 64 the three consumers' registers spill with 192)
FP8_BN_DEFAULT = {64: 128, 128: 192}
# PV=16: P.V in 16-bit (fp8-accurate); LS: P's row sums from the P.V GEMM; TR=1: the timeline build
# of perf/trace_fp8.py (a diagnostic); MI: S seeded with the float-magic constant (default);
# RP, SX: the softmax split over the rows / the consumers' softmaxes taking turns (off: no gain);
# DG: GEMMs left out of a TR=1 build (diagnostic); MX: the group maxima of S as 3-input integer maxima
# (default at head dim 64);
# QV=0: q.mu at a block switch with I2F conversions (the former code; 1: by the bytes' bits);
# QL: a block's constants loaded together (one L2 round trip; 0: each where used, three);
# QP: q.mu of every K/V block computed at a Q tile's start into shared memory (a switch reads two floats)
FP8_KNOBS = ("BN", "NC", "KST", "VST", "CR", "PERSIST", "DB", "PX", "PV", "OV", "PP", "LS", "TR", "MI", "RP", "SX", "DG",
             "MX", "QV", "QL", "QP")
# int64 slots of the FP8 kernel's side arrays after SfParams: (ptr, batch, head stride) of
# qs[MAXQ], ks[MAXKV], mu[MAXKV], vs[MAXKV]
# int64 slot layout of SfParams (attn_common.cuh): header, per-Q-block and per-K/V-block fields,
# then (TMA kernels) the tensor maps tk[MAXKV], tv[MAXKV], tq[MAXQ] of MAP_SLOTS each
HDR_SLOTS, Q_SLOTS, KV_SLOTS, MAP_SLOTS = 16, 11, 9, 16
TABLE_SLOTS = HDR_SLOTS + MAXQ * Q_SLOTS + MAXKV * KV_SLOTS
MAPS_SLOTS = (2 * MAXKV + MAXQ) * MAP_SLOTS
SIDE_SLOTS = 3 * (MAXQ + 3 * MAXKV)

MERGE_TYPES = {"fp32": "float", "fp16": "__half", "bf16": "__nv_bfloat16"}


@dataclass(frozen=True)
class KernelConfig:
    """One compiled kernel: ``impl`` in {'fa2', 'sm90ws', 'sm90fp8', 'merge', 'heads'}, head dim,
    dtype, arch ('heads': the head-group copy of sequence-parallel exchanges, any dtype: head_dim 0,
    'any').

    fa2: portable mma.sync; sm90ws: Hopper wgmma, warp-specialised (producer warpgroup + 2
    ping-ponging consumer warpgroups); sm90fp8: the same design for int8 Q.K and e4m3 P.V
    (``dtype`` is the output's).
    """

    impl: str
    head_dim: int
    dtype: str
    arch: str  # e.g. 'sm_90a', 'sm_80'
    bn: int = 0  # sm90ws only: keys per K/V tile (0: WS_TILES default)
    opts: tuple = ()  # sm90ws only: extra (name, value) knobs, see WS_KNOBS

    def __post_init__(self) -> None:
        if self.impl == "sm90fp8" and self.smem_bytes > SMEM_MAX:
            kst, vst = self.fp8_slots()
            raise ValueError(f"sm90fp8 with BN={self.fp8_bn}, KST={kst}, VST={vst} at head dim {self.head_dim} "
                             f"needs {self.smem_bytes} bytes of shared memory, more than {SMEM_MAX}: "
                             f"take fewer ring slots (KST, VST)")

    @property
    def tma(self) -> bool:
        """sm90ws / sm90fp8 load with the TMA copy engine (tensor maps in the parameters)."""
        return self.impl == "sm90fp8" or (self.impl == "sm90ws" and bool(int(dict(self.opts).get("TMA", 1))))

    @property
    def persistent(self) -> bool:
        """TMA kernels launched with one block per SM looping over the tiles (PERSIST=1; the
        default of sm90ws unless clusters are asked for: 0-2 % faster on an H200, most at short
        sequences, docs/kernel-notes.md)."""
        o = dict(self.opts)
        dflt = int(self.impl == "sm90ws" and int(o.get("CL", 1)) == 1)
        return self.tma and bool(int(o.get("PERSIST", dflt)))

    @property
    def param_slots(self) -> int:
        """Size of the kernel's parameter struct in int64 slots (SfParams in attn_common.cuh, then
        for sm90fp8 its side arrays)."""
        return TABLE_SLOTS + (MAPS_SLOTS if self.tma else 0) + (SIDE_SLOTS if self.impl == "sm90fp8" else 0)

    @property
    def cluster(self) -> int:
        """sm90ws: blocks per cluster that share K/V tiles by TMA multicast (1 or 2)."""
        if self.impl != "sm90ws":
            return 1
        dflt = WS_CLUSTER[self.head_dim] if self.tma and not self.persistent else 1
        cl = int(dict(self.opts).get("CL", dflt))
        if cl not in (1, 2):
            raise ValueError(f"sm90ws CL (blocks per cluster) must be 1 or 2, got {cl}")
        if cl == 2 and not (self.tma and self.head_dim == 128 and not self.persistent):
            raise ValueError("sm90ws CL=2 needs TMA loads, head dim 128 and a non-persistent launch")
        return cl

    @property
    def consumers(self) -> int:
        """sm90ws / sm90fp8: consumer warpgroups of 64 Q rows (2 or 3)."""
        if self.impl == "sm90fp8":
            nc = int(dict(self.opts).get("NC", FP8_TILES[self.head_dim][0]))
            if nc not in WS_CONSUMER_REGS:
                raise ValueError(f"sm90fp8 NC (consumer warpgroups) must be 2 or 3, got {nc}")
            return nc
        if self.impl != "sm90ws":
            return 0
        # the cp.async producer (TMA=0) keeps 2: with 3 its consumers spill at 160 registers
        nc = int(dict(self.opts).get("NC", WS_CONSUMERS[self.head_dim] if self.tma else 2))
        if nc not in WS_CONSUMER_REGS:
            raise ValueError(f"sm90ws NC (consumer warpgroups) must be 2 or 3, got {nc}")
        return nc

    def ws_tiles(self) -> tuple[int, int, int]:
        key = (self.head_dim, self.consumers)
        bn, kst, vst = WS_TILES[key] if self.tma else WS_TILES_CPASYNC.get(key, WS_TILES[key])
        o = dict(self.opts)
        if self.bn and self.bn != bn:
            tile = self.bn * self.head_dim * 2
            free = 227 * 1024 - 2048 - self.block_m * self.head_dim * 2
            n = max(2, min(3, free // tile // 2))
            bn, kst, vst = self.bn, n, n
        return bn, int(o.get("KST", kst)), int(o.get("VST", vst))

    @property
    def source(self) -> str:
        return {"fa2": "attn_fa2.cu", "sm90ws": "attn_sm90ws.cu", "sm90fp8": "attn_sm90fp8.cu",
                "merge": "attn_merge.cu", "heads": "heads_copy.cu", "quant": "quant.cu"}[self.impl]

    @property
    def func_name(self) -> str:
        return {"fa2": "sf_attn_fa2", "sm90ws": "sf_attn_sm90ws", "sm90fp8": "sf_attn_sm90fp8",
                "merge": "sf_merge", "heads": "sf_heads_copy", "quant": "sf_quant_i8"}[self.impl]

    @property
    def threads(self) -> int:
        return {"fa2": 32 * FA2_NW, "sm90ws": 128 * (self.consumers + 1),
                "sm90fp8": 128 * (self.consumers + 1), "merge": 256, "heads": 256, "quant": 128}[self.impl]

    @property
    def block_m(self) -> int:
        """Q rows per thread block."""
        return {"fa2": 16 * FA2_NW, "sm90ws": 64 * self.consumers, "sm90fp8": 64 * self.consumers,
                "merge": 0, "heads": 0, "quant": 0}[self.impl]

    @property
    def fp8_pv_bytes(self) -> int:
        """sm90fp8: bytes per V element (1: e4m3, 2: 16-bit V for a 16-bit P.V, knob PV=16)."""
        pv = int(dict(self.opts).get("PV", 8))
        if pv not in (8, 16):
            raise ValueError(f"sm90fp8 PV (the P.V precision) must be 8 or 16, got {pv}")
        return pv // 8

    @property
    def fp8_bn(self) -> int:
        """sm90fp8: keys per K/V tile (knob BN)."""
        bn = int(dict(self.opts).get("BN", FP8_BN_DEFAULT[self.head_dim]))
        if bn not in FP8_BN:
            raise ValueError(f"sm90fp8 BN (keys per K/V tile) must be one of {FP8_BN}, got {bn}")
        return bn

    def fp8_slots(self) -> tuple[int, int]:
        """sm90fp8: (K ring slots, V ring slots)."""
        o = dict(self.opts)
        _, kst, vst = FP8_TILES[self.head_dim]
        kst, vst = int(o.get("KST", kst)), int(o.get("VST", vst))
        if "VST" not in o:  # by default as many V slots (>= 2) as fit (16-bit V at 192 keys: 2)
            while vst > 2 and self._fp8_smem(kst, vst) > SMEM_MAX:
                vst -= 1
        return kst, vst

    def _fp8_smem(self, kst: int, vst: int) -> int:
        vrows = self.head_dim + 8 * self.fp8_ls  # V^T rows per slot (LS: eight rows of ones)
        qmu_table = self.fp8_qp * self.block_m * MAXKV * 4  # QP: q.mu per row and K/V block
        return (self.block_m * self.head_dim + (kst * self.head_dim + vst * self.fp8_pv_bytes * vrows) * self.fp8_bn
                + qmu_table + 1024)

    @property
    def fp8_ls(self) -> int:
        """sm90fp8: 1 when P's row sums come from the P.V wgmma (eight rows of ones in V^T, knob LS):
        by default with e4m3 P.V (the only P.V it takes; +6.5 % at 16k x 24 x 64, +0.3-3 % at head
        dim 128 on an H200, docs/fp8.md)."""
        ls = int(dict(self.opts).get("LS", int(self.fp8_pv_bytes == 1)))
        if ls and self.fp8_pv_bytes != 1:
            raise ValueError("sm90fp8 LS (row sums on the tensor cores) needs the e4m3 P.V (PV=8)")
        return ls

    @property
    def fp8_mi(self) -> int:
        """sm90fp8: 1 when the S GEMM accumulates onto the float-magic constant (knob MI), so the
        softmax needs no int32 -> float add per logit (the seeding moves before the ping-pong's
        wait); on by default: +11 % at 16k x 24 x 128, +5 % at 4k, +0.5 % at head dim 64 on an H100,
        bitwise the same output (docs/fp8.md)."""
        return int(dict(self.opts).get("MI", 1))

    @property
    def fp8_dg(self) -> int:
        """sm90fp8 knob DG, a diagnostic of the timeline build only (its output is wrong): 1 leaves
        out the P.V wgmmas, 2 the S wgmmas too, so perf/trace_fp8.py times the softmax without
        tensor work in flight."""
        o = dict(self.opts)
        dg = int(o.get("DG", 0))
        if dg and not int(o.get("TR", 0)):
            raise ValueError("sm90fp8 DG (GEMMs left out) is a diagnostic of the timeline build: needs TR=1")
        return dg

    @property
    def fp8_ov(self) -> int:
        """sm90fp8: 1 when the softmax of a tile overlaps the previous tile's P.V GEMM inside a
        warpgroup (knob OV); by default with e4m3 P.V on 192-key tiles, the one build it speeds up
        (+6 % at 16k x 24 x 128 on an H200; at 128-key tiles, head dim 64 and 16-bit P.V it is slower,
        docs/fp8.md)."""
        return int(dict(self.opts).get("OV", int(self.fp8_pv_bytes == 1 and self.fp8_bn > 128)))

    @property
    def fp8_pp(self) -> int:
        """sm90fp8: 1 when the consumers take turns issuing their GEMMs (named-barrier ping-pong,
        knob PP); not by default at head dim 64 with e4m3 P.V (+3-4 % without it at 16k x 24 x 64
        on an H200; at 128 it is 3 % slower without, docs/fp8.md)."""
        return int(dict(self.opts).get("PP", int(not (self.head_dim == 64 and self.fp8_pv_bytes == 1))))

    @property
    def fp8_db(self) -> int:
        """sm90fp8: 1 when P fragments alternate between two register sets (knob DB); not by default
        where a 16-bit P would spill (three head-dim-64 consumers, or tiles of more than 128 keys) nor
        with OV=1 or MI=1 on 192-key tiles (two P sets beside the overlapped softmax, or beside the
        seeded S accumulator, spill)."""
        spills = self.fp8_bn > 128 and (self.fp8_pv_bytes == 2 or self.fp8_ov or self.fp8_mi) or \
            (self.fp8_pv_bytes == 2 and self.head_dim == 64)
        return int(dict(self.opts).get("DB", int(not spills)))

    @property
    def fp8_mx(self) -> int:
        """sm90fp8: 1 when a group's max of S is taken as 3-input integer maxima (knob MX); by default
        at head dim 64 (+1-4 % in two H100 runs), not at 128 (within noise)."""
        return int(dict(self.opts).get("MX", int(self.head_dim == 64)))

    @property
    def fp8_ql(self) -> int:
        """sm90fp8: 1 when a K/V block's constants load together at a block switch (knob QL). Off: it
        shortens the switch but ptxas schedules the hot loop worse (-10 % at 16k x 24 x 128 on an
        H100), and three head-dim-64 consumers of 128 registers spill with it."""
        return int(dict(self.opts).get("QL", 0))

    @property
    def fp8_qp(self) -> int:
        """sm90fp8: 1 when q.mu of every K/V block is computed at a Q tile's start into a table in
        shared memory (knob QP), so that a block switch reads two floats instead of Q's row and mu."""
        qp = int(dict(self.opts).get("QP", 0))
        if qp and self.fp8_ql:
            raise ValueError("sm90fp8 QP and QL are two ways to load a block switch's q.mu: take one")
        return qp

    @property
    def smem_bytes(self) -> int:
        d = self.head_dim
        if self.impl == "fa2":
            return (16 * FA2_NW * d + 4 * FA2_BN * d) * 2
        if self.impl == "sm90fp8":  # bytes: Q tile, K and V^T (or 16-bit V) slots of BN keys
            return self._fp8_smem(*self.fp8_slots())
        if self.impl == "sm90ws":
            bn, kst, vst = self.ws_tiles()
            return (self.block_m * d + (kst + vst) * bn * d) * 2 + 1024
        return 0

    def defines(self) -> list[str]:
        if self.impl == "merge":
            return [f"-DMERGE_T={MERGE_TYPES[self.dtype]}"]
        if self.impl == "heads":
            return []
        if self.impl == "quant":  # the FP8 quantisers (quant.cu) of bf16 or fp16 inputs
            return [f"-DQT={MERGE_TYPES[self.dtype]}"]
        o = dict(self.opts)
        common = [f"-DSF_D={self.head_dim}", f"-DSF_FP16={int(self.dtype == 'fp16')}",
                  f"-DSF_MAXQ={MAXQ}", f"-DSF_MAXKV={MAXKV}",
                  f"-DSF_EX2_FTZ={o.get('EX2', 1)}", f"-DSF_RESCALE_THR={o.get('RT', 8)}"]
        if self.impl == "fa2":
            return [*common, f"-DFA2_NW={FA2_NW}", f"-DFA2_BN={FA2_BN}"]
        if self.impl == "sm90fp8":
            kst, vst = self.fp8_slots()
            nc = self.consumers
            common = [c for c in common if not c.startswith("-DSF_RESCALE_THR")]
            return [*common, f"-DWS_NC={nc}", f"-DWS_CONSUMER_REGS={o.get('CR', WS_CONSUMER_REGS[nc])}",
                    f"-DWS_BN={self.fp8_bn}", f"-DWS_KST={kst}", f"-DWS_VST={vst}", f"-DWS_PX={o.get('PX', 0)}",
                    f"-DWS_DB={self.fp8_db}", f"-DWS_OV={self.fp8_ov}", f"-DWS_PP={self.fp8_pp}", f"-DF8_LS={self.fp8_ls}", f"-DF8_TR={o.get('TR', 0)}",
                    f"-DF8_MI={self.fp8_mi}", f"-DF8_RP={o.get('RP', 0)}", f"-DF8_SX={o.get('SX', 0)}",
                    f"-DF8_DG={self.fp8_dg}", f"-DF8_MX={self.fp8_mx}", f"-DF8_QV={o.get('QV', 1)}", f"-DF8_QL={self.fp8_ql}", f"-DF8_QP={self.fp8_qp}",
                    f"-DF8_PV16={int(self.fp8_pv_bytes == 2)}"]
        bn, kst, vst = self.ws_tiles()
        nc = self.consumers
        return [*common, f"-DWS_NC={nc}", f"-DWS_PRODUCER_REGS={o.get('PR', WS_PRODUCER_REGS)}",
                f"-DWS_CONSUMER_REGS={o.get('CR', WS_CONSUMER_REGS[nc])}",
                f"-DWS_PP={o.get('PP', 1)}", f"-DWS_EA={o.get('EA', 1)}", f"-DWS_TMA={int(self.tma)}",
                f"-DWS_CL={self.cluster}", f"-DWS_FO={o.get('FO', 1)}", f"-DWS_UW={o.get('UW', 0)}",
                f"-DWS_DA={o.get('DA', 0)}", f"-DWS_OV={o.get('OV', 0)}",
                f"-DWS_BN={bn}", f"-DWS_KST={kst}", f"-DWS_VST={vst}"]

    def nvcc_args(self, out: Path, fmt: str = "cubin") -> list[str]:
        num = self.arch.split("_", 1)[1]
        gencode = f"-gencode=arch=compute_{num},code={self.arch if fmt == 'cubin' else 'compute_' + num}"
        return ["-std=c++17", "-O3", f"-{fmt}", gencode, "-I", str(KERNEL_DIR), *self.defines(),
                "-o", str(out), str(KERNEL_DIR / self.source)]


def all_configs(archs: tuple[str, ...] = ("sm_90a", "sm_80")) -> list[KernelConfig]:
    """Every configuration the package may compile: sm90 kernels for sm_90a, fa2 for each arch."""
    cfgs = []
    for arch in archs:
        impls = ("sm90ws", "sm90fp8", "fa2") if arch == "sm_90a" else ("fa2",)
        for impl in impls:
            for d in (64, 128):
                for dt in ("bf16", "fp16"):
                    cfgs.append(KernelConfig(impl, d, dt, arch))
        for dt in MERGE_TYPES:
            cfgs.append(KernelConfig("merge", 0, dt, arch))
        cfgs.append(KernelConfig("heads", 0, "any", arch))
        if arch == "sm_90a":
            cfgs += [KernelConfig("quant", 0, dt, arch) for dt in ("bf16", "fp16")]
    return cfgs


def find_nvcc() -> str | None:
    """Path of nvcc: $SFATTN_NVCC, $CUDA_HOME/bin/nvcc, PATH, /usr/local/cuda/bin/nvcc."""
    cands = [os.environ.get("SFATTN_NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "bin", "nvcc"))
    cands += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


_NVCC_VERSION: dict[str, str] = {}


def _nvcc_version(nvcc: str) -> str:
    if nvcc not in _NVCC_VERSION:
        _NVCC_VERSION[nvcc] = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                                             check=True).stdout
    return _NVCC_VERSION[nvcc]


def cache_dir() -> Path:
    d = os.environ.get("SFATTN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                        "streamfusion", "kernels")
    return Path(d)


def _key(cfg: KernelConfig, nvcc: str, fmt: str) -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((KERNEL_DIR / name).read_bytes())
    h.update(repr((cfg, cfg.defines(), fmt, _nvcc_version(nvcc))).encode())  # defaults may change
    return h.hexdigest()[:24]


def compile_kernel(cfg: KernelConfig, out: Path | None = None, *, fmt: str = "cubin",
                   nvcc: str | None = None, extra: tuple[str, ...] = ()) -> Path:
    """Compile ``cfg`` to a cubin (or ptx).  With ``out`` None, use/fill the disk cache.

    Raises RuntimeError with nvcc's output on failure, FileNotFoundError without nvcc.
    """
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set SFATTN_NVCC or CUDA_HOME); it is needed to "
                                "build the sfattn attention kernels")
    if out is None:
        d = cache_dir()
        d.mkdir(parents=True, exist_ok=True)
        out = d / f"{cfg.impl}_d{cfg.head_dim}_{cfg.dtype}_{cfg.arch}_{_key(cfg, nvcc, fmt)}.{fmt}"
        if out.exists():
            return out
        fd, tmp = tempfile.mkstemp(dir=d, suffix="." + fmt)
        os.close(fd)
        target = Path(tmp)
    else:
        target = Path(out)
    res = subprocess.run([nvcc, *cfg.nvcc_args(target, fmt), *extra], capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed for {cfg}:\n{res.stdout}\n{res.stderr}")
    if target != out:
        os.replace(target, out)  # atomic: concurrent builders never see a partial file
    return out
