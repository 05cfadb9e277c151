#!/usr/bin/env bash
# The one script a lent GPU runs from the repo root (no network): install the
# carried wheels (bench/wheels/), build the extension for this device's arch only,
# run the CUDA tests (forward and backward), compute-sanitizer memcheck/racecheck on a
# small case of each kernel (backward included), time the forward and backward;
# write ONE JSON record to $OUT/record.json and print a summary table last.
# Every step is guarded: a failure still gives a record.
#
#   OUT=/some/dir bash bench/gpu_check.sh        (OUT defaults to bench/out)
# What $OUT holds (the device tool brings back at most 8 files, at most 2 folders
# down): record.json, summary.txt, logs.tar.gz (every log, junit XML and bench.json,
# repacked after each step so a killed run still returns its finished steps' logs) and
# plots/*.png. The logs themselves are written to NSA_LOG_DIR (default a fresh folder
# under /tmp), outside $OUT.
# Time: the whole script keeps to NSA_BUDGET_S seconds (default 540, so that one
# device call of at most 600 s holds it). Each step gets at most its own cap and what
# is left of the budget minus a reserve for the record; a step with no time left is
# recorded as skipped.
# Order: wheels, build (or the prebuilt extension: bench/prebuilt.py), tests (fast),
# memcheck, racecheck, slow tests (8k/32k), kernel profile, bench:
# what the issues need first. NSA_STEPS picks steps (default
# "wheels,build,tests,sanitizer,slow,profile,bench"), so a second call on the same warm
# machine can run what the first had no time for (the build is then a no-op).
# Environment: NSA_COMMIT (the commit the record names: the device's copy has no .git,
# so call it as `NSA_COMMIT=<hash> bash bench/gpu_check.sh` from a clean tree), NSA_TEST_ARGS (extra pytest args for both test steps),
# NSA_BUDGET_S (total seconds, default 540), NSA_STEP_TIMEOUT (cap per step, default 300),
# NSA_PROFILE_SHAPES / NSA_PROFILE_LENGTHS / NSA_PROFILE_DECODE_LENGTHS (bench/kernel_profile.py;
# default paper, 8192,65536, 65536), NSA_BENCH_SHAPES (bench/suite.py --shapes, default paper),
# NSA_BENCH_LENGTHS (--lengths, in the order measured; default 65536,8192,32768,16384,131072:
# the targets' length first; the decode rows come with each length),
# NSA_BENCH_BUDGET (--budget-s: seconds of measuring before later rows are recorded as
# skipped; default: what is left of the budget, at most the step cap, minus 30), NSA_BENCH_ARGS (extra suite args, e.g. "--skip flex").
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/bench/out}
mkdir -p "$OUT"
LOGS=${NSA_LOG_DIR:-/tmp/nsa_gpu_check_logs}
rm -rf "$LOGS" && mkdir -p "$LOGS"
PY=${PYTHON:-python3}
T_STEP=${NSA_STEP_TIMEOUT:-300}
START=$(date +%s)
DEADLINE=$(( START + ${NSA_BUDGET_S:-540} ))
RESERVE=15  # seconds kept for the record and the summary
STEPS=",${NSA_STEPS:-wheels,build,tests,sanitizer,slow,profile,bench},"
want() { case "$STEPS" in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
export PYTHONUNBUFFERED=1
STATUS="$LOGS/steps.txt"
: > "$STATUS"

left() { echo $(( DEADLINE - RESERVE - $(date +%s) )); }

step() {  # step NAME LOGFILE CAP_SECONDS CMD...
  local name=$1 log=$2 cap=$3; shift 3
  local t0=$(date +%s) budget
  budget=$(left)
  [ "$cap" -gt "$T_STEP" ] && cap=$T_STEP
  [ "$budget" -lt "$cap" ] && cap=$budget
  if [ "$cap" -lt 5 ]; then
    echo "$name rc=skipped (time budget spent)" | tee -a "$STATUS" "$LOGS/gpu_check.log"
    return 0
  fi
  echo "=== $name (at most ${cap}s): $*" | tee -a "$LOGS/gpu_check.log"
  NSA_STEP_CAP=$cap timeout -k 5 "$cap" "$@" > "$LOGS/$log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && rc="124(timeout)"
  echo "$name rc=$rc secs=$(( $(date +%s) - t0 ))" | tee -a "$STATUS" "$LOGS/gpu_check.log"
  pack_logs
  return 0
}

# $OUT/logs.tar.gz from $LOGS. A log over 8 MB (a sanitizer flooding errors, say)
# keeps its first and last 4 MB, so the archive stays under the 16 MB a file may have.
pack_logs() {
  local stage="$LOGS.pack" f
  rm -rf "$stage" && mkdir -p "$stage"
  for f in "$LOGS"/*; do
    [ -f "$f" ] || continue
    if [ "$(stat -c %s "$f")" -gt 8388608 ]; then
      { head -c 4194304 "$f"; printf '\n[... truncated by gpu_check.sh ...]\n'; tail -c 4194304 "$f"; } \
        > "$stage/$(basename "$f")"
    else
      cp "$f" "$stage/"
    fi
  done
  tar -czf "$OUT/logs.tar.gz.tmp" -C "$stage" . && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
  rm -rf "$stage"
}

# 1. Wheels (no network): into a private site dir on PYTHONPATH.
if ! want wheels; then
  echo "wheels rc=not-requested" >> "$STATUS"
elif ls bench/wheels/*.whl > /dev/null 2>&1; then
  step wheels wheels.log 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/nsa_site bench/wheels/*.whl
  export PYTHONPATH=/tmp/nsa_site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "wheels rc=skipped (no bench/wheels/*.whl)" >> "$STATUS"
fi

# 2. Build for this device only, unless bench/prebuilt/ (bench/prebuilt.py make, run
# before the session and carried) holds the extension built from this very source for
# this torch, Python and arch: then it is put in place, checked by one kernel, and the
# build is skipped. Anything amiss and the build runs as before.
ARCH=$("$PY" -c "import torch; ma, mi = torch.cuda.get_device_capability(); print('90a' if (ma, mi) == (9, 0) else f'{ma}{mi}')" 2>/dev/null || echo 90a)
echo "arch=$ARCH" >> "$STATUS"
if want build; then
  step prebuilt prebuilt.log 120 "$PY" bench/prebuilt.py install
  if ! grep -q "^prebuilt rc=0 " "$STATUS"; then
    step build build.log 300 env MAX_JOBS=16 NVCC_THREADS=1 NSA_BUILD_CUDA=1 NSA_CUDA_ARCHS="$ARCH" \
      "$PY" setup.py build_ext --inplace
  fi
fi

# 3. Tests: every test file with CUDA cases (the decode and layer files also run their
# fast CPU cases), through bench/run_tests.py: pytest in rounds, so that a kernel which
# faults (the CUDA context is lost for the rest of the process), hangs (killed after
# NSA_TEST_STALL_S seconds in one test) or crashes is named, and the tests after it
# still run in a fresh process. Breadth first (every test function's first case, then
# the second of each, ...), so a step that runs out of time has tried every kernel.
# Its junit XML and summary (faults, not run) feed the record.
CUDA_TESTS=${NSA_CUDA_TESTS:-"tests/test_cuda_fwd.py tests/test_cuda_bwd.py tests/test_decode.py tests/test_layer.py"}
run_tests_cmd() {  # run_tests_cmd NAME PYTEST_MARK STALL_S: the command line, for sh -c
  echo "\"$PY\" bench/run_tests.py --state \"$LOGS/state_$1\" --junit \"$LOGS/junit_$1.xml\" \
    --summary \"$LOGS/summary_$1.json\" --stall-s ${NSA_TEST_STALL_S:-$3} --max-faults ${NSA_TEST_MAX_FAULTS:-8} --breadth-first \
    -- $CUDA_TESTS -q -rf -p no:cacheprovider -m '$2' ${NSA_TEST_ARGS:-}"
}
want tests && step tests tests.log 300 sh -c "$(run_tests_cmd tests 'not slow' 90)"

# 4. compute-sanitizer on a small case of each kernel.
if ! want sanitizer; then
  echo "sanitizer rc=not-requested" >> "$STATUS"
elif command -v compute-sanitizer > /dev/null 2>&1; then
  # In rounds: a case whose kernel has an error loses the context, and the cases after
  # it go on under a fresh compute-sanitizer (their ERROR SUMMARY lines add up).
  step memcheck memcheck.log 150 "$PY" bench/sanitize_case.py --tool memcheck
  step racecheck racecheck.log 150 "$PY" bench/sanitize_case.py --tool racecheck
else
  echo "sanitizer rc=skipped (no compute-sanitizer)" >> "$STATUS"
fi

# 5. The long cases (8k and 32k tokens, paper shapes).
want slow && step slow slow.log 240 sh -c "$(run_tests_cmd slow slow 220)"

# 6. Where the time goes inside a call: bench/kernel_profile.py (torch.profiler) on
# sparse_attn forward and forward+backward and a decode step, per kernel and per op.
want profile && step profile profile.log 120 "$PY" bench/kernel_profile.py \
  --shapes "${NSA_PROFILE_SHAPES:-paper}" --lengths "${NSA_PROFILE_LENGTHS:-8192,65536}" \
  --decode-lengths "${NSA_PROFILE_DECODE_LENGTHS:-65536}" --json "$LOGS/profile.json"

# 7. Timings: the benchmark suite (NSA fwd/bwd and per branch, dense SDPA backends,
# FlexAttention, fla). It rewrites bench.json after every row, so a timeout still
# leaves the rows measured so far. A row whose kernel faults is recorded as such, and
# the suite goes on in a fresh process (--fault-rounds). Plots go to $OUT/plots.
BENCH_CAP=$(left); [ "$BENCH_CAP" -gt "$T_STEP" ] && BENCH_CAP=$T_STEP
BENCH_BUDGET=${NSA_BENCH_BUDGET:-$(( BENCH_CAP - 30 ))}
want bench && step bench bench.log 600 sh -c "\"$PY\" bench/suite.py --device cuda --shapes \"${NSA_BENCH_SHAPES:-paper}\" \
  --lengths \"${NSA_BENCH_LENGTHS:-65536,8192,32768,16384,131072}\" --budget-s \"$BENCH_BUDGET\" \
  --json \"$LOGS/bench.json\" --plots \"$OUT/plots\" --fault-rounds 4 ${NSA_BENCH_ARGS:-}"

# 8. The record and the summary.
"$PY" - "$OUT" "$LOGS" <<'PYEOF' 2>&1 | tee "$OUT/summary.txt.tmp"
import datetime, json, os, re, subprocess, sys
dest, out = sys.argv[1], sys.argv[2]
rec = {"commit": None, "device": None, "torch": None, "date": datetime.datetime.now().isoformat(timespec="seconds"),
       "tests": {"passed": 0, "failed": 0, "skipped": 0}, "sanitizer": {"errors": None}, "bench": [], "steps": {}}
# The device gets a copy of the working tree without .git: the caller names the commit
# (NSA_COMMIT=$(git rev-parse HEAD), on a clean tree); git is the fallback.
rec["commit"] = os.environ.get("NSA_COMMIT") or None
if rec["commit"] is None:
    try:
        rec["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                       text=True).stdout.strip() or None
    except Exception:
        pass
try:
    import torch
    rec["torch"] = torch.__version__
    rec["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no cuda"
except Exception as e:
    rec["torch"] = f"import failed: {e}"
try:
    for line in open(os.path.join(out, "steps.txt")):
        parts = line.split()
        if parts:
            rec["steps"][parts[0]] = " ".join(parts[1:])
except Exception:
    pass
try:
    import glob
    import xml.etree.ElementTree as ET
    files = sorted(glob.glob(os.path.join(out, "junit*.xml")))
    if not files:
        raise FileNotFoundError("no junit*.xml in " + out)
    suites = []
    for f in files:
        root = ET.parse(f).getroot()
        suites += [root] if root.tag == "testsuite" else list(root)
    tot = sum(int(s.get("tests", 0)) for s in suites)
    fail = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skip = sum(int(s.get("skipped", 0)) for s in suites)
    rec["tests"] = {"passed": tot - fail - skip, "failed": fail, "skipped": skip}
    # Which failed, and how many per kernel family (the mainloop fixture's sm90 / sm80
    # ids: the wgmma and the mma.sync kernels where both exist).
    failed = [f"{c.get('classname', '')}::{c.get('name', '')}" for s in suites for c in s.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    rec["tests"]["failed_sm90"] = sum("sm90" in n for n in failed)
    rec["tests"]["failed_sm80"] = sum("sm80" in n for n in failed)
    rec["tests"]["failed_names"] = failed[:40]
except Exception as e:
    rec["tests"]["error"] = f"no junit xml: {e}"
# bench/run_tests.py's summaries: the tests that lost the CUDA context, hung or crashed
# (each also an error in the junit XML), and the tests never reached.
rec["tests"]["faults"], rec["tests"]["not_run"] = [], 0
for name in ("tests", "slow"):
    try:
        s = json.load(open(os.path.join(out, f"summary_{name}.json")))
        rec["tests"]["faults"] += s["faults"]
        rec["tests"]["not_run"] += s["not_run"]
        if s.get("stop"):
            rec["tests"].setdefault("stopped", {})[name] = s["stop"]
    except FileNotFoundError:
        pass
    except Exception as e:
        rec["tests"].setdefault("summary_errors", []).append(f"{name}: {e}")
# ptxas's wgmma serialization warnings (C75xx) in the build: any is a slow Hopper kernel.
# A prebuilt extension (bench/prebuilt.py) was checked for them where it was built.
try:
    stamp = json.load(open("bench/prebuilt/stamp.json")) if rec["steps"].get("prebuilt", "").startswith("rc=0 ") else None
except Exception:
    stamp = None
try:
    if stamp is not None:
        raise FileNotFoundError("prebuilt")
    text = open(os.path.join(out, "build.log")).read()
    rec["build"] = {"wgmma_serialized": sorted(set(re.findall(r"\(C75\d\d\)[^\n]*?function '([^']+)'", text))),
                    "spill_warnings": len(re.findall(r"Registers are spilled", text))}
except Exception as e:
    rec["build"] = {"prebuilt": stamp} if stamp is not None else {"error": str(e)}
errs, seen = 0, False
for tool in ("memcheck", "racecheck"):
    try:
        text = open(os.path.join(out, f"{tool}.log")).read()
        # memcheck: "ERROR SUMMARY: N errors"; racecheck: "RACECHECK SUMMARY: H hazards
        # displayed (N errors, W warnings)". One line per round.
        m = re.findall(r"(?:ERROR SUMMARY: |RACECHECK SUMMARY: \d+ hazards? displayed \()(\d+) error", text)
        if m:
            seen = True
            errs += sum(int(x) for x in m)
        rec["sanitizer"][tool] = sum(int(x) for x in m) if m else "no summary"  # summed over rounds
    except Exception:
        rec["sanitizer"][tool] = "not run"
rec["sanitizer"]["errors"] = errs if seen else None
try:
    rec["profile"] = json.load(open(os.path.join(out, "profile.json")))
except FileNotFoundError:
    pass
except Exception as e:
    rec["profile_error"] = str(e)
try:
    rec["bench"] = json.load(open(os.path.join(out, "bench.json")))
except Exception as e:
    rec["bench"] = []
    rec["bench_error"] = str(e)
json.dump(rec, open(os.path.join(dest, "record.json"), "w"), indent=1)
print("\n==== summary ====")
print(f"device {rec['device']}  torch {rec['torch']}  commit {rec['commit']}")
for k, v in rec["steps"].items():
    print(f"  step {k:10s} {v}")
print(f"  tests      { {k: v for k, v in rec['tests'].items() if k not in ('failed_names', 'faults')} }")
for f in rec["tests"].get("faults", [])[:10]:
    print(f"    {f['kind'].upper():8s} {f['nodeid']}")
for n in rec["tests"].get("failed_names", [])[:10]:
    print(f"    failed   {n}")
print(f"  sanitizer  {rec['sanitizer']}")
if rec.get("build", {}).get("wgmma_serialized"):
    print(f"  build      wgmma SERIALIZED in {len(rec['build']['wgmma_serialized'])} kernel(s) (build.log, C75xx)")
for p in rec.get("profile", []):
    if "ops" not in p:
        print(f"  profile {p.get('shape')} T={p.get('T')} B={p.get('B')} {p.get('pass')}: {p.get('error')}")
        continue
    top = ", ".join(f"{o['name'].replace('nsa_cuda::', '')} {o['ms']:.2f}" for o in p["ops"][:5])
    print(f"  profile {p['shape']} T={p['T']} B={p['B']} {p['pass']:7s} wall {p['wall_ms']:.2f} ms"
          f" busy {p['busy'] or 0:.2f}: {top}")
if rec["bench"]:
    print(f"  {'shape':6s} {'op':34s} {'T':>7s} {'pass':8s} {'ms':>9s} {'TF/s':>7s}")
    for r in rec["bench"]:
        ms, tf = r.get("ms"), r.get("tflops")
        print(f"  {str(r.get('shape', '')):6s} {r.get('op', '?'):34s} {r.get('T', ''):>7} {r.get('pass', ''):8s} "
              f"{('%.3f' % ms) if isinstance(ms, (int, float)) else '-':>9s} "
              f"{('%.1f' % tf) if isinstance(tf, (int, float)) else '':>7s} "
              f"{('%.0f GB/s ' % r['gbps']) if r.get('gbps') else ''}"
              f"{'' if isinstance(ms, (int, float)) else str(r.get('error'))[:80]}")
PYEOF
mv "$OUT/summary.txt.tmp" "$OUT/summary.txt"
pack_logs
