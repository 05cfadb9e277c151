"""Where the time of an NSA call goes, kernel by kernel and op by op (torch.profiler).

The bench suite times whole calls and each public branch function; this script
answers the next question, which kernel inside a call takes the time, for
``sparse_attn`` forward, forward+backward and a decode step, with no guessing from
differences of rows: the profiler's device timestamps of every kernel, summed per
kernel name and per top-level op (``nsa_cuda::selected_attn_fwd``,
``aten::sort``, ...), divided by the iterations. ``busy`` is the summed kernel time
over the CUDA-event wall time of the same iterations: well under 1 means the GPU
waited on the host (launch overhead, a sync).

    python bench/kernel_profile.py --lengths 8192,65536 --json profile.json
    python bench/kernel_profile.py --device cpu      # a tiny case, CPU op times

On the CPU there are no kernels: the op table holds CPU times (the smoke test's
check that the script runs end to end).
"""
import argparse
import json
import os
import sys
import time
from collections import defaultdict
from typing import Dict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import suite  # noqa: E402  (puts the repository root on sys.path, imports nsa_cuda)

nsa_cuda = suite.nsa_cuda


def short_kernel_name(name: str, width: int = 110) -> str:
    """A demangled kernel name without its parameter list, its template arguments cut."""
    name = name.split("(")[0] if not name.startswith("(") else name
    for prefix in ("void ", "nsa::cuda::"):
        name = name.replace(prefix, "")
    return name if len(name) <= width else name[: width - 3] + "..."


def _is_device_event(e) -> bool:
    return getattr(e.device_type, "name", str(e.device_type)).upper() in ("CUDA", "PRIVATEUSE1")


def _outermost_nsa_op(e):
    """The outermost ``nsa_cuda::`` op enclosing CPU event ``e`` (itself included), or None."""
    found = None
    while e is not None:
        if e.name.startswith("nsa_cuda::"):
            found = e
        e = e.cpu_parent
    return found


def summarize(prof, iters: int, cuda: bool) -> Dict:
    """ms per iteration, largest first: per kernel name, and per op. On CUDA an op row holds
    the kernels launched inside the outermost nsa_cuda op around them, or else inside the
    op that launched them (aten::sort, aten::copy_, ...); on the CPU, the CPU time of the
    outermost nsa_cuda ops."""
    events = prof.events()
    kernels = defaultdict(lambda: [0, 0.0])
    ops = defaultdict(lambda: [0, 0.0])
    for e in events:
        if _is_device_event(e):
            k = kernels[short_kernel_name(e.name)]
            k[0] += 1
            k[1] += e.time_range.elapsed_us() / 1e3
        elif getattr(e, "is_async", False):
            continue
        elif cuda and e.kernels:
            outer = _outermost_nsa_op(e)
            o = ops[outer.name if outer is not None else e.name]
            o[0] += len(e.kernels)
            o[1] += sum(k.duration for k in e.kernels) / 1e3
        elif not cuda and _outermost_nsa_op(e) is e:
            o = ops[e.name]
            o[0] += 1
            o[1] += e.cpu_time_total / 1e3
    table = lambda d: sorted(  # noqa: E731
        ({"name": n, "calls": c / iters, "ms": ms / iters} for n, (c, ms) in d.items()),
        key=lambda r: -r["ms"])
    return {"kernels": table(kernels), "ops": table(ops)}


def profile_call(fn, iters: int, device: str) -> Dict:
    """Warm up, then profile ``iters`` calls; the CUDA-event wall time of the same calls."""
    cuda = device == "cuda"
    for _ in range(2):
        fn()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if cuda:
            b.record()
            torch.cuda.synchronize()
        wall = a.elapsed_time(b) if cuda else 1e3 * (time.perf_counter() - t0)
    out = summarize(prof, iters, cuda)
    out["wall_ms"] = wall / iters
    total = sum(k["ms"] for k in out["kernels"]) if cuda else sum(o["ms"] for o in out["ops"])
    out["kernel_ms"] = total
    out["busy"] = total / out["wall_ms"] if out["wall_ms"] > 0 else None
    return out


def prefill_cases(s, T: int, cfg, device, dtype):
    x = suite.make_set(s, T, device, dtype, True)
    kw = cfg.kwargs()

    def fwd():
        g_cmp, g_slc, g_win = x["g"]
        return nsa_cuda.sparse_attn(x["q"], x["k"], x["v"], g_cmp, g_slc, g_win, **kw)

    def fwd_nograd():
        with torch.no_grad():
            return fwd()

    def fwd_bwd():
        torch.autograd.backward(fwd(), x["do"])
        suite._zero_grads(x)

    return [("fwd", fwd_nograd), ("fwd+bwd", fwd_bwd)]


def print_profile(head: str, p: Dict, top: int):
    busy = f"{p['busy']:.2f}" if p["busy"] is not None else "-"
    print(f"\n== {head}: wall {p['wall_ms']:.3f} ms/iter, summed {p['kernel_ms']:.3f} ms, busy {busy}")
    for what in ("ops", "kernels"):
        rows = p[what][:top]
        if rows:
            print(f"  {what}:")
        for r in rows:
            share = r["ms"] / p["kernel_ms"] if p["kernel_ms"] else 0.0
            print(f"    {r['ms']:9.3f} ms {100 * share:5.1f}%  x{r['calls']:<5.3g} {r['name']}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="default: cuda when available")
    ap.add_argument("--shapes", default="paper", help="comma list of " + ",".join(suite.SHAPES))
    ap.add_argument("--lengths", default=None, help="prefill lengths (CUDA default 8192,65536)")
    ap.add_argument("--decode-lengths", default=None, help="decode context lengths (CUDA default 65536)")
    ap.add_argument("--decode-batches", default="1,32")
    ap.add_argument("--iters", type=int, default=None, help="profiled calls per case (CUDA 5, CPU 1)")
    ap.add_argument("--top", type=int, default=12, help="rows per table on stdout")
    ap.add_argument("--json", default=None, help="write the profiles here")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    if cuda:
        shapes = [suite.SHAPES[n] for n in args.shapes.split(",") if n]
        cfg, dtype = suite.PAPER_NSA, torch.bfloat16
        lengths = [int(t) for t in (args.lengths or "8192,65536").split(",") if t]
        dlengths = [int(t) for t in (args.decode_lengths or "65536").split(",") if t]
    else:
        shapes, cfg, dtype = [suite.QUICK_SHAPE], suite.QUICK_NSA, torch.float32
        lengths = [int(t) for t in (args.lengths or "256").split(",") if t]
        dlengths = [int(t) for t in (args.decode_lengths or "256").split(",") if t]
    iters = args.iters or (5 if cuda else 1)
    batches = [int(b) for b in args.decode_batches.split(",") if b]
    records = []

    def add(head: str, base: dict, fn):
        try:
            p = profile_call(fn, iters, device)
            print_profile(head, p, args.top)
            records.append(dict(base, **p))
        except Exception as e:  # noqa: BLE001  one failing case never stops the rest
            print(f"\n== {head}: FAILED {type(e).__name__}: {e}", flush=True)
            records.append(dict(base, error=f"{type(e).__name__}: {e}"[:400]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(records, f, indent=1)
        if cuda:
            torch.cuda.empty_cache()

    for s in shapes:
        for T in lengths:
            for pass_, fn in prefill_cases(s, T, cfg, device, dtype):
                base = {"shape": s.name, "T": T, "B": s.B, "pass": pass_, "iters": iters}
                add(f"{s.name} T={T} sparse_attn {pass_}", base, fn)
        for T in dlengths:
            for B in batches:
                x = suite.make_decode_set(s, T, B, cfg, device, dtype)
                base = {"shape": s.name, "T": T, "B": B, "pass": "decode", "iters": iters}
                add(f"{s.name} T={T} B={B} decode step", base, lambda x=x, T=T: suite.decode_step(x, T, cfg))
                del x
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
