"""The extension prebuilt here for the device, so that a lent GPU's minutes go to
tests and timings instead of compiling (about a third of gpu_check.sh's budget).

The device's Python (3.12) and torch (2.11.0, CUDA 13.0) differ from this machine's,
and a torch extension only loads into the torch it was built against. So `make`
builds in a scratch virtual environment with that Python and torch, for sm_90a alone,
from the files that travel to the device (tracked and untracked, not ignored), and
writes bench/prebuilt/ (gitignored; carried next to bench/wheels):
  _C.<python tag>.so.xz  the extension, host debug info stripped, xz-compressed (its
                       cubins keep -lineinfo for compute-sanitizer: 62 MB raw, 4 MB
                       compressed, against a carry limit of 64 MB)
  stamp.json           source hash, torch, CUDA, Python tag, arch, commit, build time

On the device, `install` puts it in place only when everything in the stamp matches
(the hash of csrc/ and setup.py as they are there, torch, CUDA, the Python tag, a
compute capability 9.0 GPU), then runs one kernel in a fresh process to prove it
loads. Otherwise it removes what it placed and exits 1 with the reason, and
gpu_check.sh builds from source as before.

    python bench/prebuilt.py make [--venv DIR] [--jobs N]   # here, before a device session
    python bench/prebuilt.py install                        # there (gpu_check.sh's build step)
    python bench/prebuilt.py hash                           # the source hash of this tree
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "bench", "prebuilt")
DEVICE_PYTHON = "3.12"
DEVICE_TORCH = "2.11.0"
ARCH = "90a"


SOURCE_SUFFIXES = (".cu", ".cuh", ".cpp", ".cc", ".h", ".hpp", ".inl", ".py")


def source_hash(root: str = ROOT) -> str:
    """sha256 over the paths and bytes of what the extension is built from: setup.py
    and the sources under csrc/ (not its notes)."""
    files = [os.path.join(root, "setup.py")]
    for base, dirs, names in os.walk(os.path.join(root, "csrc")):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        files += [os.path.join(base, n) for n in sorted(names) if n.endswith(SOURCE_SUFFIXES)]
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()


def _run(cmd, **kw):
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def _scratch_venv(venv: str) -> str:
    """A Python 3.12 virtual environment holding the device's torch (from the index)."""
    py = os.path.join(venv, "bin", "python")
    if os.path.exists(py):
        return py
    base = shutil.which(f"python{DEVICE_PYTHON}")
    if base is None:
        sys.exit(f"prebuilt: no python{DEVICE_PYTHON} here to build for the device's Python")
    _run([base, "-m", "venv", venv])
    cutlass = subprocess.run([sys.executable, "-m", "pip", "show", "nvidia-cutlass"], capture_output=True,
                             text=True).stdout
    version = next((line.split()[1] for line in cutlass.splitlines() if line.startswith("Version:")), None)
    _run([py, "-m", "pip", "install", "-q", f"torch=={DEVICE_TORCH}", "ninja", "pybind11", "setuptools", "wheel",
          "numpy", f"nvidia-cutlass=={version}" if version else "nvidia-cutlass"])
    return py


def make(venv: str, jobs: int) -> None:
    py = _scratch_venv(venv)
    probe = subprocess.run([py, "-c", "import sysconfig, torch; print(torch.__version__, torch.version.cuda, "
                                      "sysconfig.get_config_var('EXT_SUFFIX'))"],
                           capture_output=True, text=True, check=True).stdout.split()
    torch_version, torch_cuda, suffix = probe
    if torch_version.split("+")[0] != DEVICE_TORCH:
        sys.exit(f"prebuilt: {venv} holds torch {torch_version}, the device has {DEVICE_TORCH}")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "csrc", "setup.py"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    work = tempfile.mkdtemp(prefix="nsa_prebuilt_")
    for rel in filter(None, files):
        if os.path.isfile(os.path.join(ROOT, rel)):
            os.makedirs(os.path.dirname(os.path.join(work, rel)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), os.path.join(work, rel))
    env = dict(os.environ, NSA_BUILD_CUDA="1", NSA_CUDA_ARCHS=ARCH, MAX_JOBS=str(jobs))
    env.setdefault("CUDA_HOME", next((d for d in ("/usr/local/cuda", "/usr/local/cuda-13.0")
                                      if os.path.exists(os.path.join(d, "bin", "nvcc"))), ""))
    t0 = time.time()
    log = os.path.join(work, "build.log")
    with open(log, "w") as f:
        rc = subprocess.run([py, "setup.py", "build_ext", "--inplace"], cwd=work, env=env, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    text = open(log).read()
    if rc != 0:
        print(text[-6000:])
        sys.exit(f"prebuilt: the build failed (log: {log})")
    if "(C75" in text:
        sys.exit(f"prebuilt: ptxas serialized wgmma (C75xx) in the build (log: {log})")
    built = os.path.join(work, "nsa_cuda", "_C" + suffix)
    os.makedirs(OUT_DIR, exist_ok=True)
    for old in os.listdir(OUT_DIR):
        os.remove(os.path.join(OUT_DIR, old))
    raw = os.path.join(work, "_C" + suffix)
    shutil.copy2(built, raw)
    subprocess.run(["strip", "--strip-debug", raw], check=False)
    dest = os.path.join(OUT_DIR, "_C" + suffix + ".xz")
    with open(raw, "rb") as f, lzma.open(dest, "wb", preset=6) as g:
        shutil.copyfileobj(f, g)
    stamp = {"source_hash": source_hash(work), "torch": torch_version.split("+")[0], "torch_cuda": torch_cuda,
             "ext_suffix": suffix, "arch": ARCH, "commit": commit, "dirty": bool(dirty),
             "build_s": round(time.time() - t0), "size_mb": round(os.path.getsize(raw) / 2 ** 20, 1),
             "xz_mb": round(os.path.getsize(dest) / 2 ** 20, 1),
             "spill_warnings": text.count("Registers are spilled")}
    with open(os.path.join(OUT_DIR, "stamp.json"), "w") as f:
        json.dump(stamp, f, indent=1)
    shutil.rmtree(work, ignore_errors=True)
    print(f"prebuilt: {dest} ({stamp['size_mb']} MB, {stamp['xz_mb']} MB compressed, {stamp['build_s']} s)" +
          ("; csrc/ or setup.py has uncommitted changes: the stamp's hash covers them" if dirty else ""))


SMOKE = """
import torch, nsa_cuda
x = torch.randn(1, 64, 1, 64, device="cuda", dtype=torch.bfloat16)
y = torch.ops.nsa_cuda.mean_compress(x, None, 32, 16)
torch.cuda.synchronize()
assert torch.allclose(y[0, 0].float(), x[0, :32].float().mean(0), atol=1e-2), "wrong mean"
print("prebuilt: the extension loads and runs a kernel")
"""


def install() -> int:
    """0 when the prebuilt extension is in place and runs; 1 (with the reason) otherwise."""
    import sysconfig

    import torch
    stamp_path = os.path.join(OUT_DIR, "stamp.json")
    if not os.path.exists(stamp_path):
        print("prebuilt: none carried (bench/prebuilt/stamp.json)")
        return 1
    stamp = json.load(open(stamp_path))
    here = {"source_hash": source_hash(), "torch": torch.__version__.split("+")[0],
            "torch_cuda": torch.version.cuda, "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
            "arch": "90a" if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) else None}
    diff = {k: (stamp.get(k), v) for k, v in here.items() if stamp.get(k) != v}
    if diff:
        print(f"prebuilt: not used, it was built for another setting: { {k: f'{a} != {b}' for k, (a, b) in diff.items()} }")
        return 1
    dest = os.path.join(ROOT, "nsa_cuda", "_C" + here["ext_suffix"])
    with lzma.open(os.path.join(OUT_DIR, "_C" + here["ext_suffix"] + ".xz"), "rb") as f, open(dest, "wb") as g:
        shutil.copyfileobj(f, g)
    r = subprocess.run([sys.executable, "-c", SMOKE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    print(r.stdout + r.stderr[-3000:])
    if r.returncode != 0:
        os.remove(dest)
        print("prebuilt: not used: it did not load or run (above)")
        return 1
    print(f"prebuilt: in place ({stamp['commit'][:10]}, built in {stamp['build_s']} s here)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="build here for the device")
    mk.add_argument("--venv", default="/tmp/nsa_prebuilt_venv", help="the scratch Python 3.12 + torch 2.11 venv")
    mk.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    sub.add_parser("install", help="on the device: put the prebuilt extension in place if it matches")
    sub.add_parser("hash", help="print the source hash")
    args = ap.parse_args()
    if args.cmd == "make":
        make(args.venv, args.jobs)
        return 0
    if args.cmd == "install":
        return install()
    print(source_hash())
    return 0


if __name__ == "__main__":
    sys.exit(main())
