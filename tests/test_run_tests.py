"""bench/run_tests.py, the rounds driver of gpu_check.sh's test steps, on the CPU:
a fault (a lost CUDA context, simulated), a hang and a crash each end a round, are
reported under their test's name, and the tests after them still run."""
import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest
from conftest import load_bench_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "bench", "run_tests.py")

DEMO = textwrap.dedent("""
    import os, time
    import pytest
    import cuda_health

    def test_a(): pass
    def test_b(): assert 1 == 2
    def test_c(): pytest.skip("not here")
    def test_fault():
        cuda_health.simulate_lost_context()
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    def test_after_fault(): pass
    def test_hang(): time.sleep(600)
    def test_crash(): os._exit(9)
    @pytest.mark.parametrize("x", [1, 2])
    def test_last(x): pass
    @pytest.mark.slow
    def test_slow_one(): pass
""")


def _drive(tmp_path, *extra, pytest_args=("-m", "not slow")):
    (tmp_path / "test_demo.py").write_text(DEMO)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: longer cases\n")
    cmd = [sys.executable, DRIVER, "--state", str(tmp_path / "state"), "--junit", str(tmp_path / "j.xml"),
           "--summary", str(tmp_path / "s.json"), "--stall-s", "3", *extra,
           "--", "test_demo.py", "-q", "-p", "no:cacheprovider", *pytest_args]
    env = {k: v for k, v in os.environ.items() if k != "NSA_STEP_CAP"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    summary = json.loads((tmp_path / "s.json").read_text())
    cases = {c.get("name"): c for c in ET.parse(tmp_path / "j.xml").getroot().iter("testcase")}
    return proc, summary, cases


def test_rounds_go_on_after_fault_hang_and_crash(tmp_path):
    proc, summary, cases = _drive(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # failures are reported
    kinds = {f["nodeid"].split("::")[-1]: f["kind"] for f in summary["faults"]}
    assert kinds == {"test_fault": "fault", "test_hang": "hang", "test_crash": "crash"}
    # Every selected test ran exactly once: the ones after each fault included, the
    # slow one deselected by -m.
    assert set(cases) == {"test_a", "test_b", "test_c", "test_fault", "test_after_fault", "test_hang",
                          "test_crash", "test_last[1]", "test_last[2]"}
    assert summary["rounds"] == 4 and summary["stop"] is None and summary["not_run"] == 0
    assert (summary["passed"], summary["failed"], summary["skipped"]) == (4, 4, 1)
    assert cases["test_b"].find("failure") is not None
    assert "illegal memory access" in cases["test_fault"].find("error").text
    assert cases["test_hang"].find("error") is not None and cases["test_crash"].find("error") is not None
    assert cases["test_c"].find("skipped") is not None
    assert all(len(c) == 0 for n, c in cases.items() if n in ("test_a", "test_after_fault", "test_last[1]"))
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == \
        ("9", "1", "3", "1")


def test_stops_after_max_faults(tmp_path):
    proc, summary, cases = _drive(tmp_path, "--max-faults", "1")
    assert proc.returncode == 1
    assert [f["kind"] for f in summary["faults"]] == ["fault"]
    assert "max-faults" in summary["stop"]
    assert "test_after_fault" not in cases
    assert summary["not_run"] == 5  # after_fault, hang, crash, last[1], last[2]


@pytest.mark.parametrize("selected", ["test_a or test_last", "test_a or test_b"])
def test_no_fault_is_one_round(tmp_path, selected):
    proc, summary, cases = _drive(tmp_path, pytest_args=("-k", selected))
    assert summary["rounds"] == 1 and summary["faults"] == [] and summary["not_run"] == 0
    assert proc.returncode == (1 if "test_b" in selected else 0)


@pytest.fixture
def sanitize_case(monkeypatch):
    return load_bench_script("sanitize_case", monkeypatch)


def test_sanitize_case_goes_on_after_a_lost_context(sanitize_case, tmp_path, monkeypatch):
    ran = []

    def fault():
        ran.append("fault")
        raise RuntimeError("CUDA error: unspecified launch failure")

    cases = [("a", lambda: ran.append("a")), ("fault", fault), ("b", lambda: ran.append("b")),
             ("other", lambda: 1 / 0), ("c", lambda: ran.append("c"))]
    monkeypatch.setattr(sanitize_case, "cases", lambda: cases)
    monkeypatch.setattr(sanitize_case.torch.cuda, "synchronize", lambda: None)
    resume = str(tmp_path / "next")
    with monkeypatch.context() as m:
        m.setattr(sanitize_case, "cuda_context_lost", lambda *a: "lost")
        assert sanitize_case.run_cases(0, resume) == sanitize_case.LOST_CONTEXT_RC
    assert ran == ["a", "fault"] and open(resume).read() == "2"
    # A failure that keeps the context (a Python error) is counted, and the run goes on.
    assert sanitize_case.run_cases(2, None) == 1 and ran == ["a", "fault", "b", "c"]

    # --tool: rounds of compute-sanitizer, each from the case after the last fault.
    calls = []

    def fake_call(cmd):
        calls.append(cmd)
        if len(calls) == 1:
            with open(cmd[cmd.index("--resume-file") + 1], "w") as f:
                f.write("2")
            return sanitize_case.LOST_CONTEXT_RC
        return 0

    monkeypatch.setattr(sanitize_case.subprocess, "call", fake_call)
    monkeypatch.setattr(sys, "argv", ["sanitize_case.py", "--tool", "memcheck"])
    assert sanitize_case.main() == 1  # the first round found an error
    assert [c[:3] for c in calls] == [["compute-sanitizer", "--tool", "memcheck"]] * 2
    assert [c[c.index("--start") + 1] for c in calls] == ["0", "2"]


def test_breadth_first_order(tmp_path):
    (tmp_path / "test_order.py").write_text(textwrap.dedent("""
        import pytest
        @pytest.mark.parametrize("x", [1, 2, 3])
        def test_one(x): pass
        def test_two(): pass
        @pytest.mark.parametrize("x", [1, 2])
        def test_three(x): pass
    """))
    state = tmp_path / "state"
    subprocess.run([sys.executable, DRIVER, "--state", str(state), "--junit", str(tmp_path / "j.xml"),
                    "--summary", str(tmp_path / "s.json"), "--breadth-first", "--", "test_order.py", "-q",
                    "-p", "no:cacheprovider"], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    order = [json.loads(line)["nodeid"].split("::")[1] for line in (state / "results.jsonl").open()]
    assert order == ["test_one[1]", "test_two", "test_three[1]", "test_one[2]", "test_three[2]", "test_one[3]"]


@pytest.fixture
def prebuilt(monkeypatch, tmp_path):
    mod = load_bench_script("prebuilt", monkeypatch)
    monkeypatch.setattr(mod, "OUT_DIR", str(tmp_path / "prebuilt"))
    return mod


def test_prebuilt_source_hash_covers_csrc_and_setup(prebuilt, tmp_path):
    root = tmp_path / "tree"
    (root / "csrc" / "cuda").mkdir(parents=True)
    (root / "setup.py").write_text("setup()")
    (root / "csrc" / "cuda" / "a.cu").write_text("kernel")
    first = prebuilt.source_hash(str(root))
    assert prebuilt.source_hash(str(root)) == first
    (root / "csrc" / "cuda" / "a.cu").write_text("kernel 2")
    second = prebuilt.source_hash(str(root))
    (root / "setup.py").write_text("setup(x)")
    assert len({first, second, prebuilt.source_hash(str(root))}) == 3
    third = prebuilt.source_hash(str(root))
    (root / "csrc" / "NOTES.md").write_text("notes")  # not a source
    assert prebuilt.source_hash(str(root)) == third
    (root / "csrc" / "b.h").write_text("")  # a new source counts
    assert prebuilt.source_hash(str(root)) != third


def test_prebuilt_install_refuses_a_mismatch(prebuilt, capsys):
    """Without a stamp, or with one for another tree (or no Hopper GPU), install puts
    nothing in place and says why: gpu_check.sh then builds from source."""
    assert prebuilt.install() == 1 and "none carried" in capsys.readouterr().out
    os.makedirs(prebuilt.OUT_DIR)
    with open(os.path.join(prebuilt.OUT_DIR, "stamp.json"), "w") as f:
        json.dump({"source_hash": "0" * 64, "torch": "2.11.0", "torch_cuda": "13.0",
                   "ext_suffix": ".cpython-312-x86_64-linux-gnu.so", "arch": "90a", "commit": "x"}, f)
    before = set(os.listdir(os.path.join(ROOT, "nsa_cuda")))
    assert prebuilt.install() == 1
    out = capsys.readouterr().out
    assert "not used" in out and "source_hash" in out
    assert set(os.listdir(os.path.join(ROOT, "nsa_cuda"))) == before
