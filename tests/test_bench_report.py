"""bench/report.py: the README performance table and the benchmark issue's targets
computed from a device record (here a synthetic one with known values)."""
from __future__ import annotations

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("bench_report", os.path.join(ROOT, "bench", "report.py"))
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)

T = 65536


def row(shape, op, p, ms, T=T, flops=None, tflops=None, **kw):
    return dict(shape=shape, T=T, op=op, **{"pass": p}, ms=ms, flops=flops, tflops=tflops,
                error=None if ms is not None else "failed", **kw)


def synthetic_rows():
    rows = []
    for p, nsa, dense in (("fwd", 10.0, 80.0), ("bwd", 20.0, 100.0), ("fwd+bwd", 30.0, 180.0)):
        rows += [row("paper", "nsa_cuda.sparse_attn", p, nsa),
                 row("paper", "sdpa.fastest", p, dense)]
    rows += [row("paper", "fla.parallel_nsa", "fwd+bwd", 120.0),
             row("paper", "nsa_cuda@fla_conv.sparse_attn", "fwd+bwd", 30.0),
             row("paper", "nsa_cuda.branch.selected", "fwd", 4.0, tflops=300.0),
             row("paper", "nsa_cuda.branch.selected", "fwd", 4.0, T=8192, tflops=200.0),
             row("peer", "nsa_cuda.branch.compressed", "fwd", 12.0),
             row("peer", "nsa_cuda.branch.selection", "fwd", 9.0),
             row("peer", "nsa_cuda.branch.selected", "fwd", 2.0, flops=1e12),
             row("gqa4", "nsa_cuda.branch.selected", "fwd", 1.2, flops=0.5e12),
             row("paper", "nsa_cuda.sparse_attn", "fwd+bwd", 5.0, T=4096),
             row("paper", "sdpa.fastest", "fwd+bwd", 4.0, T=4096),
             row("paper", "nsa_cuda.decode", "decode", 0.06, B=1),
             row("paper", "nsa_cuda.decode.graph", "decode", 0.05, B=1),
             row("paper", "sdpa.decode", "decode", 0.4, B=1),
             row("paper", "sdpa.decode", "decode", 0.1, B=32),  # another batch: not the target
             row("paper", "sdpa.fastest", "bwd", None, T=4096)]
    return rows


def test_targets_from_known_values():
    got = {name: (measured, met) for name, measured, met in
           report.targets(report.Rows(synthetic_rows()))}
    by_start = lambda s: next(v for k, v in got.items() if k.startswith(s))  # noqa: E731
    assert by_start("forward at 64k") == ("8.00x", "yes")
    assert by_start("backward at 64k") == ("5.00x", "no")
    assert by_start("fwd+bwd at 64k >= 3x fla") == ("4.00x", "yes")
    assert by_start("selected branch at G=16") == ("300 TFLOP/s", "yes")
    assert by_start("compressed branch + selection") == ("21.00 ms", "no")
    assert by_start("selected branch G=4") == ("1.20x", "yes")  # (1.2/0.5) / (2/1)
    measured, met = by_start("fwd+bwd faster than dense from 4k")
    assert measured == "4096: 0.80x, 65536: 6.00x" and met == "no"
    assert by_start("decode step at 64k") == ("8.00x", "no")


def test_render_and_readme_section(tmp_path):
    record = dict(device="NVIDIA H100 80GB HBM3", torch="2.11.0", commit="0123456789abcdef",
                  date="2026-11-28T10:00:00", tests=dict(passed=10, failed=0, skipped=1),
                  sanitizer=dict(errors=0), bench=synthetic_rows(),
                  profile=[dict(shape="paper", T=T, B=1, **{"pass": "fwd"}, wall_ms=50.0, kernel_ms=40.0,
                                busy=0.8, kernels=[],
                                ops=[dict(name="nsa_cuda::selected_attn_fwd", calls=1, ms=30.0),
                                     dict(name="nsa_cuda::window_attn_fwd", calls=1, ms=10.0)]),
                           dict(shape="paper", T=8192, B=1, **{"pass": "fwd"}, error="RuntimeError: x")])
    path = tmp_path / "record.json"
    path.write_text(json.dumps(record))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Performance\n{report.BEGIN}\nold\n{report.END}\n\n## Next\n")
    assert report.main([str(path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.endswith("## Next\n")
    assert "NVIDIA H100 80GB HBM3" in text and "`0123456789`" in text
    # the paper table's 64k row: fwd 10 vs 80 ms -> 8.00x; the failed 4k bwd row shows "-"
    assert "| 65536 | 10.00 | 80.00 | 8.00x | 20.00 | 100 | 5.00x |" in text
    assert "| 4096 | - | - | - | - | - | - | 5.00 | 4.00 | 0.80x |" in text
    assert "| paper | 1 | 65536 | 0.06 | 0.05 | 0.40 | 8.00x |" in text  # decode table
    # the kernel profile: shares of the kernel time; a failed case is left out
    assert "| paper | 65536 | 1 | fwd | 50.00 | 0.80 | selected_attn_fwd 30.00 (75%), window_attn_fwd 10.00 (25%) |" in text
    assert "| paper | 8192 |" not in text
    # a target whose rows are missing says so (no gqa4 rows: the G=4 target)
    rows = [r for r in synthetic_rows() if r["shape"] != "gqa4"]
    g4 = next(t for t in report.targets(report.Rows(rows)) if t[0].startswith("selected branch G=4"))
    assert g4[1:] == ("not measured", "-")


def test_selected_bytes_table():
    rows = [row("paper", "nsa_cuda.branch.selected", "fwd", 60.0, tflops=46.0, gbps=2400.0),
            row("paper", "nsa_cuda.branch.selected_shared", "fwd", 20.0, tflops=138.0, gbps=2100.0),
            row("paper", "nsa_cuda.branch.selected_keysplit4", "fwd", 30.0, tflops=92.0, gbps=4900.0),
            row("paper", "nsa_cuda.branch.selected_keysplit2", "fwd", None)]  # failed: "-"
    text = "\n".join(report.selected_table(report.Rows(rows)))
    assert ("| paper | 65536 | 60.00 (46 TF/s, 2400 GB/s) | - | 20.00 (138 TF/s, 2100 GB/s) | - "
            "| 30.00 (92 TF/s, 4900 GB/s) |") in text
    # no shared-selection row (a record from before these rows): no table
    assert report.selected_table(report.Rows(rows[:1])) == []
