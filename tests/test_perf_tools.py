"""The CPU-side parsers of the perf/ tools (no GPU, no nvcc)."""
import importlib.util
from pathlib import Path


def test_sass_mix_reads_the_stall_counts_between_the_waits():
    """perf/sass_mix.py --waits: the span from the loop's wgmma.wait_group 1 to its wait_group 0, and
    the stall count of each instruction's control bits (bits 41-44 of its second 64-bit word), on a
    hand-written cuobjdump listing."""
    spec = importlib.util.spec_from_file_location(
        "sass_mix", Path(__file__).resolve().parents[1] / "perf" / "sass_mix.py")
    sm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sm)

    def ins(addr, text, stall):
        return (f"        /*{addr:04x}*/                   {text} ;   /* 0x000000000000000000 */\n"
                f"                                                   /* 0x{stall << 41:016x} */\n")
    text = (ins(0x10, "IGMMA.64x192x32.S8.S8 R24, gdesc[UR20], R24, gsb0", 1)
            + ins(0x20, "WARPGROUP.DEPBAR.LE gsb0, 0x1", 2)
            + ins(0x30, "FMNMX R6, R25, R24, !PT", 2)
            + ins(0x40, "MUFU.EX2 R24, R24", 8)
            + ins(0x50, "WARPGROUP.DEPBAR.LE gsb0, 0x0", 3)
            + ins(0x60, "F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C R25, R28, R25, RZ", 1))
    body = sm.sass(text)
    assert [a for a, _ in body] == [0x10, 0x20, 0x30, 0x40, 0x50, 0x60]
    span = sm.between_waits(body)
    assert [a for a, _ in span] == [0x20, 0x30, 0x40, 0x50]
    st = sm.stall_cycles(text)
    assert st == {0x10: 1, 0x20: 2, 0x30: 2, 0x40: 8, 0x50: 3, 0x60: 1}
    assert sum(st[a] for a, _ in span) == 15
