"""Registers, spills and where the spills sit, per kernel, without a GPU.

ptxas -v says how many bytes a kernel spills; it does not say whether the spill
code runs once per CTA or once per KV tile. This compiles CUDA translation units
to cubins for one arch, disassembles them (cuobjdump: the CUDA toolkit's, or the
copy that ships with triton), and reports per kernel: registers, spill bytes, and
the local-memory loads/stores (LDL/STL) inside the innermost loop that holds the
tensor-core instructions (HMMA; HGMMA for wgmma), next to that loop's count of them,
and whether ptxas serialized the kernel's wgmmas (its C7510-C7520 "Potential
Performance Loss" warnings: a wgmma group in flight where control flow joins, or its
registers touched before the wait, makes ptxas wait after every wgmma of the kernel).

    python bench/sass_report.py                       # attn_fwd/attn_bwd/attn_sm90/select, 192x128 bf16, sm_90a
    python bench/sass_report.py csrc/cuda/instantiations/attn_bwd_hdim64x64_fp16.cu --arch sm_80

Needs nvcc (CUDA_HOME or /usr/local/cuda) and the CUTLASS headers (the
nvidia-cutlass package). About a minute per unit on two cores.
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_UNITS = ["attn_fwd_hdim192x128_bf16.cu", "attn_bwd_hdim192x128_bf16.cu",
                 "attn_sm90_hdim192x128_bf16.cu", "select_hdim192_bf16.cu", "select_sm90_hdim192_bf16.cu"]
INSTANCE_MACROS = ["-DNSA_HDIM_64", "-DNSA_HDIM_128", "-DNSA_HDIM_192", "-DNSA_DTYPE_BF16",
                   "-DNSA_DTYPE_FP16"]


def find_tool(name):
    cuda = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for cand in [os.path.join(cuda, "bin", name), shutil.which(name)]:
        if cand and os.path.exists(cand):
            return cand
    try:
        import triton
        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(cand):
            return cand
    except ImportError:
        pass
    sys.exit(f"sass_report: {name} not found (CUDA_HOME/bin, PATH, or triton's bundled copy)")


def cutlass_include():
    import cutlass_library
    return os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")


def compile_unit(nvcc, unit, arch, out):
    cmd = [nvcc, "-std=c++20", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "--use_fast_math",
           f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-I", os.path.join(ROOT, "csrc/include"),
           "-I", os.path.join(ROOT, "csrc"), "-I", cutlass_include(), "-DNSA_WITH_CUDA",
           *INSTANCE_MACROS, unit, "-o", out]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"sass_report: nvcc failed on {unit}:\n{r.stderr[-4000:]}")
    # ptxas -v: "Compiling entry function 'X'", then "... N bytes spill stores, M bytes spill loads",
    # then "Used R registers".
    info, name = {}, None
    for line in r.stderr.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            name = m.group(1)
            info[name] = {}
        elif name and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            info[name]["spill"] = (int(m.group(1)), int(m.group(2)))
        elif name and (m := re.search(r"Used (\d+) registers", line)):
            info[name]["regs"] = int(m.group(1))
    # "(C7518) Potential Performance Loss: wgmma.mma_async instructions are serialized
    # due to ... in the function 'X'" and "(C7517) warpgroup.wait is injected ... in
    # function 'X'": ptxas names the function at the end.
    for m in re.finditer(r"\((C75\d\d)\)[^\n]*?function '([^']+)'", r.stderr):
        info.setdefault(m.group(2), {}).setdefault("wgmma_warnings", []).append(m.group(1))
    return info


def loop_stats(sass):
    """Per function: (HMMA, LDL, STL) in all of it and in its largest HMMA loop."""
    out, name, ins = {}, None, []

    def flush():
        if name is None:
            return
        hmma = [a for a, t in ins if re.search(r"\bHG?MMA", t)]  # mma.sync and wgmma
        ldl = [a for a, t in ins if re.search(r"\bLDL", t)]
        stl = [a for a, t in ins if re.search(r"\bSTL", t)]
        loops = []
        for a, t in ins:
            m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", t)
            if m and int(m.group(1), 16) < a:
                loops.append((int(m.group(1), 16), a))
        loops = [lp for lp in loops if any(lp[0] <= h <= lp[1] for h in hmma)]
        count = lambda xs, lp: sum(lp[0] <= x <= lp[1] for x in xs)  # noqa: E731
        best = max(loops, key=lambda lp: (count(hmma, lp), -(lp[1] - lp[0])), default=None)
        out[name] = {"all": (len(hmma), len(ldl), len(stl)),
                     "hgmma": any(re.search(r"\bHGMMA", t) for _, t in ins),
                     "loop": None if best is None else (count(hmma, best), count(ldl, best), count(stl, best))}

    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            flush()
            name, ins = m.group(1), []
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
    flush()
    return out


def short(name):
    """attn_bwd_dkdv_kernel<..., WindowQuerySchedule<64>> from a mangled name, roughly."""
    kernel = re.search(r"\d+((?:[a-z_]|sm\d+)+_kernel)", name)
    sched = re.search(r"\d+([A-Za-z]+Schedule)", name)
    return (kernel.group(1) if kernel else name[:40]) + (f" [{sched.group(1)}]" if sched else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("units", nargs="*", help="CUDA translation units (default: the 192x128 bf16 ones)")
    ap.add_argument("--arch", default="sm_90a")
    args = ap.parse_args()
    units = args.units or [os.path.join(ROOT, "csrc/cuda/instantiations", u) for u in DEFAULT_UNITS]
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for unit in units:
            for path in glob.glob(unit):
                print(f"compiling {os.path.relpath(path, ROOT)} for {args.arch} ...", file=sys.stderr, flush=True)
                cubin = os.path.join(tmp, os.path.basename(path) + ".cubin")
                info = compile_unit(nvcc, path, args.arch, cubin)
                sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True,
                                      check=True).stdout
                for name, st in loop_stats(sass).items():
                    rows.append((os.path.basename(path), short(name), info.get(name, {}), st))
    print(f"{'unit':34} {'kernel':48} {'regs':>4} {'spill st/ld':>12} {'loop HMMA':>9} {'loop LDL':>8} "
          f"{'loop STL':>8}  wgmma")
    serialized = 0
    for unit, name, info, st in rows:
        spill = "%d/%d" % info["spill"] if "spill" in info else "?"
        loop = st["loop"] or (0, 0, 0)
        warn = info.get("wgmma_warnings")
        serialized += bool(warn)
        wgmma = "SERIALIZED (" + ",".join(sorted(set(warn))) + ")" if warn else ("ok" if st["hgmma"] else "-")
        print(f"{unit:34} {name:48} {info.get('regs', '?'):>4} {spill:>12} {loop[0]:>9} {loop[1]:>8} "
              f"{loop[2]:>8}  {wgmma}")
    if serialized:
        print(f"\n{serialized} kernel(s) with serialized wgmma: see ptxas's C75xx warnings", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
