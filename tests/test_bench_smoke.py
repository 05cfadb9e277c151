"""Smoke test of bench/suite.py: the CPU --quick configuration runs end to end and
writes its JSON rows and PNG plots. It checks that the suite runs, not how fast."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import load_bench_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "bench", "suite.py")

BRANCHES = ("mean_compress", "compressed", "selection", "selected", "window", "combine")
DIFFERENTIABLE = ("mean_compress", "compressed", "selected", "window", "combine")
PASSES = ("fwd", "bwd", "fwd+bwd")
KEYS = ("op", "shape", "T", "pass", "ms", "tflops", "peak_mem_mb", "error")
QUICK_W = 64  # the --quick configuration's window (bench/suite.py QUICK_NSA)


def test_bench_suite_cpu_quick(tmp_path):
    out_json = tmp_path / "bench.json"
    plots = tmp_path / "plots"
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, SUITE, "--device", "cpu", "--quick", "--json", str(out_json),
         "--plots", str(plots)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "==== results ====" in proc.stdout

    rows = json.loads(out_json.read_text())
    assert isinstance(rows, list) and rows
    for r in rows:
        assert all(k in r for k in KEYS), r
        assert r["peak_mem_mb"] is None  # CPU
        assert (r["ms"] is None) == (r["error"] is not None), r
    lengths = sorted({r["T"] for r in rows})
    assert lengths == [256, 512]

    def row(op, T, p):
        found = [r for r in rows if r["op"] == op and r["T"] == T and r["pass"] == p]
        assert found, f"no row for {op} T={T} {p}"
        return found[0]

    for T in lengths:
        for p in PASSES:
            r = row("nsa_cuda.sparse_attn", T, p)
            assert r["ms"] is not None and r["ms"] > 0 and r["tflops"] > 0, r  # CPU backward exists
            assert row("sdpa.fastest", T, p)["ms"] is not None
            for op in ("sdpa.cudnn", "sdpa.flash", "sdpa.efficient",
                       "flex_attention.nsa_blockmask", "fla.parallel_nsa",
                       "nsa_cuda@fla_conv.sparse_attn"):
                row(op, T, p)  # present, timed or with its error
        for b in BRANCHES:
            r = row(f"nsa_cuda.branch.{b}", T, "fwd")
            assert r["ms"] is not None, r
        for b in DIFFERENTIABLE:
            for p in ("bwd", "fwd+bwd"):
                assert row(f"nsa_cuda.branch.{b}", T, p)["ms"] is not None
        assert "APPROXIMATION" in row("flex_attention.nsa_blockmask", T, "fwd")["note"]
        # the selected forward against its bytes: timed, with GB/s; the key-range passes
        # merge to the one-pass output (CPU fp32: to rounding)
        for op in ("selected", "selected_1stage", "selected_shared", "selected_keysplit2",
                   "selected_keysplit4"):
            r = row(f"nsa_cuda.branch.{op}", T, "fwd")
            assert r["ms"] > 0 and r["bytes"] > 0 and r["gbps"] > 0, r
        for parts in (2, 4):
            note = row(f"nsa_cuda.branch.selected_keysplit{parts}", T, "fwd")["note"]
            assert float(note.rsplit("max |diff| ", 1)[1]) < 1e-5, note

    # Decode rows (batches 1 and 2 in --quick): the step, each decode kernel alone and
    # dense SDPA, timed, with the cache bytes each must read and the GB/s that makes.
    dec = [r for r in rows if r["pass"] == "decode"]
    assert sorted({r["B"] for r in dec}) == [1, 2]
    for r0 in dec:
        if r0["op"] != "sdpa.decode":
            continue
        for op in ("nsa_cuda.decode", "nsa_cuda.decode.kernel.compressed",
                   "nsa_cuda.decode.kernel.selection", "nsa_cuda.decode.kernel.compressed_select",
                   "nsa_cuda.decode.kernel.selected",
                   "nsa_cuda.decode.kernel.window", "nsa_cuda.decode.kernel.branches",
                   "sdpa.decode"):
            found = [r for r in dec if r["op"] == op and r["T"] == r0["T"] and r["B"] == r0["B"]]
            assert len(found) == 1, (op, r0["T"], r0["B"])
            r = found[0]
            assert r["ms"] is not None and r["ms"] > 0 and r["bytes"] > 0 and r["gbps"] > 0, r
    steps = [r for r in dec if r["op"] == "nsa_cuda.decode"]
    assert all(r["bytes"] < r2["bytes"] for r in steps for r2 in dec
               if r2["op"] == "sdpa.decode" and (r2["T"], r2["B"]) == (r["T"], r["B"])
               and r["T"] > 2 * QUICK_W)  # NSA reads fewer bytes than dense past its window

    for name in ("speedup_fwd.png", "speedup_bwd.png", "branches.png"):
        path = plots / name
        assert path.exists() and path.stat().st_size > 1000, path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def suite(monkeypatch):
    return load_bench_script("suite", monkeypatch)


def test_rows_after_a_lost_context(suite, tmp_path, monkeypatch):
    """A row whose kernel faults keeps the error; the rows after it in that process are
    recorded as not run, and the next round reuses the measured ones and runs the rest."""
    timing = suite.Timing(device="cpu", warmup=0, min_reps=1, max_reps=1, target_ms=0.0)
    out = str(tmp_path / "bench.json")
    base = dict(shape="tiny", T=64, B=1)

    def fault(i):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def must_not_run(i):
        raise AssertionError("an earlier round measured this row")

    run = suite.Runner(timing, out)
    assert run.add(base, "first", "fwd", fn=lambda i: None)["ms"] is not None
    with monkeypatch.context() as m:
        m.setattr(suite, "cuda_context_lost", lambda *a: "RuntimeError: illegal memory access")
        bad = run.add(base, "faulting", "fwd", fn=fault)
    assert bad["fault"] and bad["error"].startswith("FAULT") and run.lost == "tiny T=64 faulting fwd"
    after = run.add(base, "after", "fwd", fn=must_not_run)
    assert after["lost"] and after["ms"] is None and "faulting" in after["error"]

    earlier = json.loads(open(out).read())
    assert [r["op"] for r in earlier] == ["first", "faulting", "after"]
    run2 = suite.Runner(timing, out, earlier)
    assert run2.add(base, "first", "fwd", fn=must_not_run)["ms"] == earlier[0]["ms"]
    assert run2.add(base, "faulting", "fwd", fn=must_not_run)["fault"]  # not retried
    again = run2.add(base, "after", "fwd", fn=lambda i: None)
    assert again["ms"] is not None and not again.get("lost") and run2.lost is None


def test_fault_rounds_resume_until_no_fault(suite, tmp_path, monkeypatch):
    calls = []
    codes = iter([suite.LOST_CONTEXT_RC, suite.LOST_CONTEXT_RC, 0])
    monkeypatch.setattr(suite.subprocess, "call", lambda cmd: calls.append(cmd) or next(codes))
    out = tmp_path / "bench.json"
    out.write_text("[]")  # a previous run's rows: removed, not resumed
    argv = ["--device", "cuda", "--json", str(out), "--fault-rounds", "5"]
    assert suite.main(argv) == 0
    assert len(calls) == 3 and not out.exists()
    for cmd in calls:
        assert cmd[2:2 + len(argv)] == argv and cmd[-3:] == ["--fault-rounds", "1", "--resume"]
    codes = iter([suite.LOST_CONTEXT_RC] * 2)
    assert suite.main(argv[:-1] + ["2"]) == suite.LOST_CONTEXT_RC


def test_kernel_profile_cpu(tmp_path, monkeypatch):
    """bench/kernel_profile.py end to end on the CPU: every case profiled, and each op
    table names the ops the call runs (attributed to the outermost nsa_cuda op), within
    the call's wall time."""
    prof = load_bench_script("kernel_profile", monkeypatch)
    out = tmp_path / "profile.json"
    assert prof.main(["--device", "cpu", "--json", str(out)]) == 0
    records = {(r["pass"], r["B"]): r for r in json.loads(out.read_text())}
    assert set(records) == {("fwd", 1), ("fwd+bwd", 1), ("decode", 1), ("decode", 32)}
    fwd_ops = {"nsa_cuda::compressed_attn_fwd", "nsa_cuda::select_blocks", "nsa_cuda::selected_attn_fwd",
               "nsa_cuda::window_attn_fwd", "nsa_cuda::gate_combine", "nsa_cuda::mean_compress"}
    bwd_ops = {"nsa_cuda::compressed_attn_bwd", "nsa_cuda::selected_attn_bwd", "nsa_cuda::window_attn_bwd",
               "nsa_cuda::gate_combine_bwd", "nsa_cuda::mean_compress_bwd"}
    names = {p: {o["name"] for o in r["ops"]} for p, r in records.items()}
    assert names[("fwd", 1)] == fwd_ops
    assert names[("fwd+bwd", 1)] == fwd_ops | bwd_ops
    assert "nsa_cuda::sparse_attn_decode" in names[("decode", 32)]
    for r in records.values():
        assert all(o["ms"] > 0 and o["calls"] >= 1 for o in r["ops"])
        assert 0 < r["kernel_ms"] <= r["wall_ms"] * 1.001
