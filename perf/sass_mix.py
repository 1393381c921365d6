"""Instruction mix of an attention kernel's inner K/V-tile loop, from its SASS (CPU: nvcc + cuobjdump).

    python perf/sass_mix.py sm90fp8@128 sm90ws@128 sm90fp8:OV=0@128

For each ``impl@head_dim`` (bf16 builds; impl knobs as in ``perf/bench_kernel.py``), compiles the
kernel (or reads a ``.cubin``, e.g. FlashAttention-3's FP8 kernel: ``cuobjdump -xelf all`` on the
fa3_fwd wheel's ``_C.abi3.so``, the cubin whose symbols name ``flash_fwd_hdim128_e4m3_sm90``),
takes the smallest loop of its SASS (a conditional backward branch's span) that holds both a
``MUFU.EX2`` and a warpgroup MMA - the consumer's step over one K/V tile - and prints its opcode
counts. Code on branches inside that span (a block's last-tile mask, a K/V block switch) is
counted too; ``--hot`` leaves out the instructions of any forward branch's skipped range that
holds a global load or an ``I2F``/``SEL`` run, i.e. counts what every tile executes (a heuristic:
check the listing). ``--waits`` also prints the span between the loop's two ``wgmma.wait_group``s
(the softmax) with the sum of its instructions' static stall counts. Needs ``cuobjdump`` on PATH
(the CUDA toolkit, or the nvidia-cuda-cuobjdump wheel).
"""
from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sfattn.kernels import _build  # noqa: E402
from sfattn.kernels.flash import _parse_impl  # noqa: E402

_INS = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRA = re.compile(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)")
_MMA = ("HGMMA", "IGMMA", "QGMMA")


def sass_text(spec: str, tmp: Path) -> str:
    """``cuobjdump -sass`` of the kernel ``impl@head_dim`` (compiled here), or of a ``.cubin`` file."""
    if not spec.endswith(".cubin"):
        impl, d = spec.rsplit("@", 1)
        base, bn, opts = _parse_impl(impl)
        cfg = _build.KernelConfig(base, int(d), "bf16", "sm_90a", bn, opts)
        out = tmp / (re.sub(r"\W", "_", spec) + ".cubin")
        subprocess.run([_build.find_nvcc(), *cfg.nvcc_args(out)], check=True, capture_output=True)
        spec = str(out)
    return subprocess.run(["cuobjdump", "-sass", spec], check=True, capture_output=True, text=True).stdout


def sass(text: str) -> list[tuple[int, str]]:
    """(address, instruction) of every instruction in ``cuobjdump -sass`` output."""
    return [(int(m.group(1), 16), m.group(2)) for m in map(_INS.match, text.splitlines()) if m]


def stall_cycles(text: str) -> dict[int, int]:
    """Address -> the stall count ptxas wrote into the instruction's control bits (bits 41-44 of the
    second 64-bit word: cycles before the warp may issue its next instruction)."""
    lines = text.splitlines()
    out = {}
    for i, ln in enumerate(lines[:-1]):
        m = _INS.match(ln)
        hi = re.search(r"/\*\s*(0x[0-9a-f]+)\s*\*/", lines[i + 1])
        if m and hi:
            out[int(m.group(1), 16)] = (int(hi.group(1), 16) >> 41) & 0xF
    return out


def between_waits(body: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The instructions from the loop's ``wgmma.wait_group 1`` to the next ``wait_group 0``: the
    softmax that overlaps the previous P.V."""
    i1 = next(i for i, (_, t) in enumerate(body) if "WARPGROUP.DEPBAR.LE gsb0, 0x1" in t)
    i0 = next(i for i in range(i1, len(body)) if "WARPGROUP.DEPBAR.LE gsb0, 0x0" in body[i][1])
    return body[i1:i0 + 1]


def tile_loop(ins: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The smallest conditional-backward-branch span holding a MUFU.EX2 and a warpgroup MMA."""
    at = {a: i for i, (a, _) in enumerate(ins)}
    best = None
    for i, (a, t) in enumerate(ins):
        m = _BRA.search(t)
        # a loop's latch is a conditional backward branch (the unconditional ones jump back from
        # out-of-line mbarrier wait stubs at the end of the code)
        if m and t.startswith("@") and ".ANY" not in t and int(m.group(1), 16) < a and int(m.group(1), 16) in at:
            body = ins[at[int(m.group(1), 16)]:i + 1]
            if any("MUFU.EX2" in x for _, x in body) and any(k in x for _, x in body for k in _MMA) \
                    and (best is None or len(body) < len(best)):
                best = body
    if best is None:
        raise SystemExit("no loop with MUFU.EX2 and a warpgroup MMA found")
    return best


def hot(body: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """``body`` without forward-branch skips that hold loads, I2F or SEL runs (per-block / last-tile code)."""
    at = {a: i for i, (a, _) in enumerate(body)}
    drop: set[int] = set()
    for i, (a, t) in enumerate(body):
        m = _BRA.search(t)
        if m and t.startswith("@") and int(m.group(1), 16) > a and int(m.group(1), 16) in at:
            span = range(i + 1, at[int(m.group(1), 16)])
            ops = " ".join(body[j][1] for j in span)
            if "LDG" in ops or "I2F" in ops or ops.count("SEL ") >= 8:
                drop.update(span)
    return [x for j, x in enumerate(body) if j not in drop]


def mix(body: list[tuple[int, str]]) -> collections.Counter:
    cnt: collections.Counter = collections.Counter()
    for _, t in body:
        op = re.sub(r"^@!?U?P\w+\s+", "", t).split()[0]
        keep = 2 if op.startswith(("MUFU", "F2FP", *_MMA)) else 1
        cnt[".".join(op.split(".")[:keep])] += 1
    return cnt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+", help="impl@head_dim, e.g. sm90fp8@128 sm90ws@64, or a .cubin file")
    ap.add_argument("--hot", action="store_true", help="leave out per-block and last-tile branches")
    ap.add_argument("--top", type=int, default=24)
    ap.add_argument("--waits", action="store_true",
                    help="also the span between the two wgmma waits: instructions and the sum of their "
                         "static stall counts (a warp's issue time alone, no scoreboard waits)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for spec in a.specs:
            text = sass_text(spec, Path(tmp))
            body = tile_loop(sass(text))
            if a.hot:
                body = hot(body)
            cnt = mix(body)
            print(f"{spec}: {len(body)} instructions per thread and K/V tile{' (hot path)' if a.hot else ''}")
            print("  " + ", ".join(f"{k} {v}" for k, v in cnt.most_common(a.top)))
            if a.waits:
                span, st = between_waits(body), stall_cycles(text)
                print(f"  between the waits: {len(span)} instructions, {sum(st[x] for x, _ in span)} stall "
                      f"cycles, {sum('MUFU.EX2' in t for _, t in span)} MUFU.EX2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
