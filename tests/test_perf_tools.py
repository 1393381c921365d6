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


def test_trace_fp8_phases_and_the_slow_steps():
    """perf/trace_fp8.py's analysis of a [consumer, step, event] clock array: each phase's median over
    the steady steps, the period, and the steps over 1.3x the period (a K/V block switch) listed with
    their tails; steps never recorded (zeros) are left out."""
    import numpy as np
    spec = importlib.util.spec_from_file_location(
        "trace_fp8", Path(__file__).resolve().parents[1] / "perf" / "trace_fp8.py")
    tf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tf)
    tr = np.zeros((4, tf.STEPS, tf.EVENTS), dtype=np.int64)
    phases = [10, 20, 30, 40, 500, 60, 100]  # wait K, turn, issue, S wait, softmax, P.V wait, tail
    for c in range(2):
        t = 1000 + 7 * c
        for i in range(20):
            tail = 2000 if i == 12 else phases[-1]  # step 12 switches blocks
            marks = np.cumsum([0] + phases[:-1] + [tail])
            tr[c, i, :8] = t + marks
            t += int(marks[-1])
    res = tf.analyse(tr)
    row = res["consumer 0"]
    assert [row[p] for p in tf.PHASES] == phases and row["period"] == sum(phases)
    assert row["steps over 1.3x the period (step, period, tail)"] == [(12, sum(phases) - 100 + 2000, 2000)]
    assert "consumer 2" not in res
    assert res["softmax of 0 while 1 is in its softmax, fraction"] > 0.9
