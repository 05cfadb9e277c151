"""The CUDA kernels' plans replayed on the CPU (bench/*_plan_emulator.py): each
script rebuilds a kernel's tiles, schedules, splits and index arithmetic in float64
and compares the result with the CPU ops, exiting non-zero on a mismatch. They
check the indexing, not the GPU's arithmetic; CI has no GPU, so this is the part
of the CUDA code it can check."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATORS = [name for name in sorted(os.listdir(os.path.join(ROOT, "bench")))
             if name.endswith("_plan_emulator.py")]


@pytest.mark.parametrize("script", EMULATORS)
def test_plan_emulator(script):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{script} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert "OK" in run.stdout
