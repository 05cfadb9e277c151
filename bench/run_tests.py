"""Runs pytest so that one broken CUDA kernel cannot hide the others: the driver of
the test steps of bench/gpu_check.sh.

A kernel that faults (an illegal or misaligned address, a trap) leaves the process's
CUDA context unusable: every later CUDA test in that process fails with the same
error, and a record would blame all of them. A kernel that never finishes (a barrier
some warps never reach) stalls the whole step, and the step's timeout then loses the
results of every test. So pytest runs in rounds:

- a plugin (this module, loaded as ``-p run_tests``) appends each test's outcome to a
  state folder as the test finishes, and after each test checks that the CUDA context
  still works. When it does not, that test is named as the fault and the round ends;
- the driver watches the test in progress. One that runs longer than --stall-s is
  named as a hang and its process is killed. A process that dies in a test (a
  segfault, an abort) names that test as a crash;
- the next round deselects every test already finished, faulted or hung, and goes on
  from there. Rounds stop when every test has run, when --max-faults tests have
  faulted, hung or crashed, or when --budget-s is spent.

At the end it writes one junit XML over all rounds (faults, hangs and crashes as
errors; tests never run are left out) and a JSON summary: passed, failed, skipped,
faults [{nodeid, kind, message}], not_run, rounds, stop (why it stopped early, or
null).

    python bench/run_tests.py --state DIR --junit OUT.xml --summary OUT.json \\
        [--stall-s 90] [--budget-s 240] [--max-faults 8] [--breadth-first] \\
        -- tests/test_cuda_fwd.py -m "not slow"

--budget-s defaults to what the caller's step allows (NSA_STEP_CAP, set by
gpu_check.sh, minus 10 s for the XML), else unlimited.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from cuda_health import LOST_CONTEXT_RC, cuda_context_lost, simulate_lost_context  # noqa: F401

STATE_ENV = "NSA_TEST_ROUNDS_STATE"
BREADTH_ENV = "NSA_TEST_ROUNDS_BREADTH_FIRST"
RESULTS, CURRENT, COLLECTED = "results.jsonl", "current.txt", "collected.txt"
_MESSAGE_CHARS = 4000

# --------------------------------------------------------------------------------------
# The plugin: runs inside each pytest round.
# --------------------------------------------------------------------------------------

_reports: dict = {}


def _state_dir():
    return os.environ.get(STATE_ENV)


def _append_json(path, obj):
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def _read_results(state):
    path = os.path.join(state, RESULTS)
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut short by a kill
                pass
    return out


# After the other plugins' selection (-m, -k, --deselect), so that collected.txt
# lists only the tests the caller asked for.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    state = _state_dir()
    if not state:
        return
    done = {r["nodeid"] for r in _read_results(state)}
    if os.environ.get(BREADTH_ENV) == "1":
        items[:] = breadth_first(items)
    keep = [it for it in items if it.nodeid not in done]
    dropped = [it for it in items if it.nodeid in done]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
    collected = os.path.join(state, COLLECTED)
    if not os.path.exists(collected):  # the first round: every test there is
        with open(collected, "w") as f:
            f.write("".join(it.nodeid + "\n" for it in keep))


def breadth_first(items):
    """The first case of every test function, then the second of each, and so on: a
    step that runs out of time has still tried every kernel's tests once."""
    groups = {}
    for it in items:
        groups.setdefault(it.nodeid.split("[", 1)[0], []).append(it)
    out = []
    for k in range(max((len(g) for g in groups.values()), default=0)):
        out += [g[k] for g in groups.values() if k < len(g)]
    return out


def pytest_runtest_logstart(nodeid, location):
    state = _state_dir()
    if state:
        with open(os.path.join(state, CURRENT), "w") as f:
            f.write(f"{time.time()}\t{nodeid}\n")


def pytest_runtest_logreport(report):
    if _state_dir():
        _reports.setdefault(report.nodeid, []).append(report)


def _outcome(reports):
    """junit's view of a test: passed, skipped, failure (the call) or error (setup, teardown)."""
    for r in reports:
        if r.failed:
            return ("failure" if r.when == "call" else "error"), r.longreprtext[-_MESSAGE_CHARS:]
    for r in reports:
        if r.skipped:
            return "skipped", r.longreprtext[-_MESSAGE_CHARS:]
    return "passed", ""


def pytest_runtest_logfinish(nodeid, location):
    state = _state_dir()
    if not state:
        return
    reports = _reports.pop(nodeid, [])
    outcome, message = _outcome(reports)
    lost = cuda_context_lost(_MESSAGE_CHARS)
    result = {"nodeid": nodeid, "outcome": outcome, "message": message,
              "time": sum(r.duration for r in reports)}
    if lost:
        # The test that broke the context is an error whatever it asserted: its
        # kernel faulted, and every test after it in this process would fail too.
        result.update(outcome="error", kind="fault",
                      message=f"the CUDA context was lost during this test: {lost}\n{message}"[:_MESSAGE_CHARS])
    _append_json(os.path.join(state, RESULTS), result)
    if lost:
        pytest.exit(f"run_tests: the CUDA context was lost in {nodeid}; a new round goes on after it",
                    returncode=LOST_CONTEXT_RC)


# --------------------------------------------------------------------------------------
# The driver.
# --------------------------------------------------------------------------------------


def _current_test(state):
    """(start time, nodeid) of the test the round is in, or None."""
    try:
        with open(os.path.join(state, CURRENT)) as f:
            t0, nodeid = f.read().rstrip("\n").split("\t", 1)
        return float(t0), nodeid
    except (OSError, ValueError):
        return None


def _kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _watch(proc, state, stall_s, deadline):
    """Waits for the round: ("exit", rc), ("hang", nodeid) or ("budget", None)."""
    while True:
        try:
            return "exit", proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        now = time.time()
        if deadline is not None and now > deadline:
            _kill(proc)
            return "budget", None
        cur = _current_test(state)
        if cur is not None and now - cur[0] > stall_s:
            finished = {r["nodeid"] for r in _read_results(state)}
            if cur[1] not in finished:
                _kill(proc)
                return "hang", cur[1]


def _split_nodeid(nodeid):
    """junit's classname and name, as pytest's own junitxml writes them."""
    parts = nodeid.split("::")
    path = parts[0][:-3] if parts[0].endswith(".py") else parts[0]
    return ".".join([path.replace("/", ".")] + parts[1:-1]), parts[-1]


def write_junit(results, path):
    counts = {"failure": 0, "error": 0, "skipped": 0}
    suite = ET.Element("testsuite", name="pytest")
    for r in results:
        classname, name = _split_nodeid(r["nodeid"])
        case = ET.SubElement(suite, "testcase", classname=classname, name=name, time=f"{r['time']:.3f}")
        if r["outcome"] in counts:
            counts[r["outcome"]] += 1
            text = r.get("message", "")
            child = ET.SubElement(case, r["outcome"], message=(text.strip().splitlines() or [""])[-1][:200])
            child.text = text
    suite.set("tests", str(len(results)))
    suite.set("failures", str(counts["failure"]))
    suite.set("errors", str(counts["error"]))
    suite.set("skipped", str(counts["skipped"]))
    suite.set("time", f"{sum(r['time'] for r in results):.3f}")
    root = ET.Element("testsuites")
    root.append(suite)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def run(pytest_args, state, stall_s=90.0, budget_s=None, max_faults=8, breadth_first=False, log=print):
    os.makedirs(state, exist_ok=True)
    for name in (RESULTS, CURRENT, COLLECTED):
        if os.path.exists(os.path.join(state, name)):
            os.remove(os.path.join(state, name))
    deadline = time.time() + budget_s if budget_s is not None else None
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, **{STATE_ENV: state, BREADTH_ENV: "1" if breadth_first else "0"})
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "pytest", "-p", "run_tests", *pytest_args]
    rounds, stop = 0, None
    while True:
        rounds += 1
        before = len(_read_results(state))
        log(f"run_tests: round {rounds} ({before} tests done): {' '.join(cmd)}")
        sys.stdout.flush()
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        how, what = _watch(proc, state, stall_s, deadline)
        results = _read_results(state)
        finished = {r["nodeid"] for r in results}
        cur = _current_test(state)
        unfinished = cur[1] if cur is not None and cur[1] not in finished else None
        if how == "hang":
            _append_json(os.path.join(state, RESULTS), {
                "nodeid": what, "outcome": "error", "kind": "hang", "time": stall_s,
                "message": f"no result after {stall_s:.0f} s (a kernel that never finishes?): killed"})
            log(f"run_tests: HANG in {what}: killed after {stall_s:.0f} s")
        elif how == "budget":
            stop = f"the time budget ({budget_s:.0f} s) ran out"
            break
        elif what == LOST_CONTEXT_RC:
            log(f"run_tests: FAULT in {results[-1]['nodeid']}: the CUDA context was lost")
        elif unfinished is not None:
            _append_json(os.path.join(state, RESULTS), {
                "nodeid": unfinished, "outcome": "error", "kind": "crash", "time": 0.0,
                "message": f"the test process died during this test (exit status {what})"})
            log(f"run_tests: CRASH in {unfinished} (exit status {what})")
        elif what in (0, 1, 5):  # every test ran (5: none was left to run)
            break
        else:
            stop = f"pytest exited with status {what}"
            break
        results = _read_results(state)
        faults = [r for r in results if r.get("kind")]
        if len(faults) >= max_faults:
            stop = f"{len(faults)} tests faulted, hung or crashed (--max-faults {max_faults})"
            break
        if len(results) == before:
            stop = "a round made no progress"
            break
    results = _read_results(state)
    collected = []
    if os.path.exists(os.path.join(state, COLLECTED)):
        with open(os.path.join(state, COLLECTED)) as f:
            collected = [line.rstrip("\n") for line in f if line.strip()]
    finished = {r["nodeid"] for r in results}
    summary = {
        "passed": sum(r["outcome"] == "passed" for r in results),
        "failed": sum(r["outcome"] in ("failure", "error") for r in results),
        "skipped": sum(r["outcome"] == "skipped" for r in results),
        "faults": [{"nodeid": r["nodeid"], "kind": r["kind"], "message": r["message"][:500]}
                   for r in results if r.get("kind")],
        "not_run": sum(n not in finished for n in collected),
        "rounds": rounds,
        "stop": stop,
    }
    return results, summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", required=True, help="a folder for the rounds' state (cleared first)")
    ap.add_argument("--junit", required=True, help="the junit XML over all rounds")
    ap.add_argument("--summary", required=True, help="the JSON summary")
    ap.add_argument("--stall-s", type=float, default=90.0, help="seconds one test may run (default 90)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for all rounds (default: NSA_STEP_CAP - 10, else unlimited)")
    ap.add_argument("--max-faults", type=int, default=8,
                    help="stop after this many faults, hangs and crashes (default 8)")
    ap.add_argument("--breadth-first", action="store_true",
                    help="run the first case of every test function, then the second of each, ...")
    ap.add_argument("pytest_args", nargs=argparse.REMAINDER, help="-- then pytest's arguments")
    args = ap.parse_args(argv)
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    budget = args.budget_s
    if budget is None and os.environ.get("NSA_STEP_CAP"):
        budget = max(float(os.environ["NSA_STEP_CAP"]) - 10.0, 5.0)
    results, summary = run(pytest_args, args.state, args.stall_s, budget, args.max_faults, args.breadth_first)
    write_junit(results, args.junit)
    with open(args.summary, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"run_tests: {summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped, "
          f"{len(summary['faults'])} faulted/hung/crashed, {summary['not_run']} not run, "
          f"{summary['rounds']} round(s)" + (f"; stopped: {summary['stop']}" if summary["stop"] else ""))
    for r in summary["faults"]:
        print(f"run_tests:   {r['kind'].upper():5s} {r['nodeid']}")
    return 0 if summary["failed"] == 0 and summary["not_run"] == 0 and not summary["stop"] else 1


if __name__ == "__main__":
    sys.exit(main())
