"""bench/sass_report.py's SASS reading (the compile step needs nvcc and runs by hand):
spill loads and stores are counted inside the loop that holds the HMMAs, not outside."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("sass_report", os.path.join(ROOT, "bench", "sass_report.py"))
sass_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sass_report)

SASS = """
        Function : _ZN3nsa4cuda20attn_bwd_dkdv_kernelINS0_19WindowQueryScheduleILi64EEEEEv
        /*0000*/                   STL [R1], R2 ;
        /*0010*/                   MOV R3, R4 ;
        /*0020*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0030*/                   LDL R5, [R1] ;
        /*0040*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0050*/              @P0  BRA 0x20 ;
        /*0060*/                   LDL R6, [R1+0x4] ;
        /*0070*/                   EXIT ;
        Function : _ZN3nsa4cuda21attn_bwd_delta_kernelIfEEv
        /*0000*/                   LDL R5, [R1] ;
        /*0010*/                   EXIT ;
"""


def test_loop_stats_counts_spills_inside_the_hmma_loop():
    stats = sass_report.loop_stats(SASS)
    dkdv = next(v for k, v in stats.items() if "dkdv" in k)
    assert dkdv["all"] == (2, 2, 1)
    assert dkdv["loop"] == (2, 1, 0)  # the LDL at 0x30 only; the STL and the LDL at 0x60 are outside
    delta = next(v for k, v in stats.items() if "delta" in k)
    assert delta["loop"] is None and delta["all"] == (0, 1, 0)
    assert sass_report.short(next(iter(stats))) == "attn_bwd_dkdv_kernel [WindowQuerySchedule]"
