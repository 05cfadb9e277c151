"""A small case of every CUDA kernel, for compute-sanitizer (memcheck, racecheck):
the forward and backward of each branch and of mean compression (batch and varlen,
on sm_90 both the wgmma and the mma.sync kernels: the compressed and window forward
and dq, every branch's dk/dv and the selection (also at G = 4, 16 and 32),
each head-dim pair that is built, G = 1 and 5), and the decode (KV-cache) kernels:
the three branches, selection, update_cmp_cache and the append that pools the blocks
it completes, with lengths that leave rows
before position 0, a full cache and an empty entry; a selection long enough for
several MMA passes in the score kernel; the fused compressed attention + selection
(compressed_select_decode); a one-split decode (no combine); the one-op decode step
(sparse_attn_decode: unmerged splits and the gated sum); the prefill's gated sum
(gate_combine) and its gradient; the backward ops adding the gradients of another
branch (dq_in, dk_in, dv_in), scaling one output gradient by the gate (dout_scale),
and the dk/dv query split (small chunks).

    python bench/sanitize_case.py                    # every case, in this process
    python bench/sanitize_case.py --tool memcheck    # under compute-sanitizer, in rounds

Under compute-sanitizer a kernel with an error is killed and the CUDA context
destroyed, so every case after it would fail: with --tool, each case that loses the
context ends its process, and the next round goes on from the case after it. Each
round prints its own "ERROR SUMMARY"; gpu_check.sh adds them up."""
import argparse
import itertools
import os
import subprocess
import sys
import tempfile

import torch

# Run as a script from the repo root, sys.path[0] is bench/: the in-place extension
# lives one level up.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]
import nsa_cuda  # noqa: E402,F401
from cuda_health import LOST_CONTEXT_RC, cuda_context_lost  # noqa: E402

OPS = torch.ops.nsa_cuda


def run(dk, dv, G, dtype, lengths=None):
    dev = "cuda"
    Hkv = 2
    if lengths is None:
        B, T, cu, ms = 2, 150, None, 150
    else:
        B, T, ms = 1, sum(lengths), max(lengths)
        cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=dev)
    q = torch.randn(B, T, Hkv * G, dk, device=dev).to(dtype)
    k = torch.randn(B, T, Hkv, dk, device=dev).to(dtype)
    v = torch.randn(B, T, Hkv, dv, device=dev).to(dtype)
    l, d, lp, n = 32, 16, 32, 3
    kc = OPS.mean_compress(k, cu, l, d)
    vc = OPS.mean_compress(v, cu, l, d)
    scale = dk ** -0.5
    _, lse = OPS.compressed_attn_fwd(q, kc, vc, cu, ms, l, d, scale)
    bi = OPS.select_blocks(q, kc, lse, cu, ms, l, d, lp, n, 1, 1, scale)
    bi2 = bi.clone()
    bi2[..., 0] = 10 ** 6  # out-of-range slots must never be read
    o_c, lse_c = OPS.compressed_attn_fwd(q, kc, vc, cu, ms, l, d, scale)
    o_s, lse_s = OPS.selected_attn_fwd(q, k, v, bi2, cu, ms, lp, scale)
    o_w, lse_w = OPS.window_attn_fwd(q, k, v, cu, ms, 40, scale)
    if torch.cuda.get_device_capability() == (9, 0):
        # The calls above (and the backward below) run the wgmma kernels: the compressed
        # and window forward and dq, every branch's dk/dv, and the selection at G = 1.
        # These, the mma.sync ones.
        os.environ["NSA_MAINLOOP"] = "sm80"
        try:
            OPS.compressed_attn_fwd(q, kc, vc, cu, ms, l, d, scale)
            OPS.select_blocks(q, kc, lse, cu, ms, l, d, lp, n, 1, 1, scale)
            OPS.window_attn_fwd(q, k, v, cu, ms, 40, scale)
            do_ = torch.randn_like(o_w)
            OPS.compressed_attn_bwd(do_, None, q, kc, vc, o_c, lse_c, cu, ms, l, d, scale)
            OPS.selected_attn_bwd(do_, None, q, k, v, bi2, o_s, lse_s, cu, ms, lp, scale)
            OPS.window_attn_bwd(do_, None, q, k, v, o_w, lse_w, cu, ms, 40, scale)
        finally:
            del os.environ["NSA_MAINLOOP"]
    # Backward of each branch (dlse given once) and of mean_compress.
    do = torch.randn_like(o_c)
    dlse = torch.randn_like(lse_c) * torch.isfinite(lse_c)
    OPS.compressed_attn_bwd(do, dlse, q, kc, vc, o_c, lse_c, cu, ms, l, d, scale)
    OPS.selected_attn_bwd(do, None, q, k, v, bi2, o_s, lse_s, cu, ms, lp, scale)
    OPS.window_attn_bwd(do, None, q, k, v, o_w, lse_w, cu, ms, 40, scale)
    OPS.mean_compress_bwd(torch.randn_like(kc), k, cu, l, d)
    # The gated sum and its gradient (the varlen case's 151 * Hq rows do not fill
    # the last 8-row CTA).
    gates = [torch.rand(o_c.shape[:3], device=o_c.device) for _ in range(3)]
    OPS.gate_combine([o_c, o_s, o_w], gates)
    gate_grads = OPS.gate_combine_bwd(do, [o_c, o_s, o_w], gates, True)
    # sparse_attn's backward: each branch adds the gradients the one before it left
    # (and copies them on the varlen padding rows); the window branch takes its delta
    # from the gate kernel.
    dq, dk, dv = OPS.window_attn_bwd(gate_grads[2], None, q, k, v, o_w, lse_w, cu, ms, 40,
                                     scale, delta=gate_grads[8])
    dq, dk, dv = OPS.selected_attn_bwd(do, None, q, k, v, bi2, o_s, lse_s, cu, ms, lp, scale,
                                       dq, dk, dv)
    OPS.compressed_attn_bwd(do, dlse, q, kc, vc, o_c, lse_c, cu, ms, l, d, scale, dq)
    # ... and without a written g * d o: every branch scales the one d o by its gate
    # (dout_scale), the window and compressed ones with the gate kernel's delta, the
    # selected one with its own delta pass.
    d_gates_and_dots = OPS.gate_combine_bwd(do, [o_c, o_s, o_w], gates, True, False)
    dq, dk, dv = OPS.window_attn_bwd(do, None, q, k, v, o_w, lse_w, cu, ms, 40, scale,
                                     delta=d_gates_and_dots[5], dout_scale=gates[2])
    dq, dk, dv = OPS.selected_attn_bwd(do, None, q, k, v, bi2, o_s, lse_s, cu, ms, lp, scale,
                                       dq, dk, dv, dout_scale=gates[1])
    OPS.compressed_attn_bwd(do, dlse, q, kc, vc, o_c, lse_c, cu, ms, l, d, scale, dq,
                            delta=d_gates_and_dots[3], dout_scale=gates[0])
    # The dk/dv query split (a few rows per chunk: several chunks per key tile, the
    # selected branch's device-side plan, the reduce kernel adding dk_in / dv_in).
    os.environ["NSA_DKV_CHUNK_ROWS"] = "24"
    try:
        dq, dk, dv = OPS.selected_attn_bwd(do, None, q, k, v, bi2, o_s, lse_s, cu, ms, lp, scale,
                                           dq, dk, dv)
        OPS.compressed_attn_bwd(do, dlse, q, kc, vc, o_c, lse_c, cu, ms, l, d, scale, dq)
    finally:
        del os.environ["NSA_DKV_CHUNK_ROWS"]


def run_long_selection(dk, dv, dtype):
    """Enough compressed rows for two K tiles per select_blocks row chunk (Tc = 67)
    and enough selection blocks (35) for a two-word union bitmap in the selected
    forward and dq: the double-buffered and bitmap paths the small cases miss."""
    dev = "cuda"
    T, G, l, d, lp, n = 1100, 1, 32, 16, 32, 4
    q = torch.randn(1, T, G, dk, device=dev).to(dtype)
    k = torch.randn(1, T, 1, dk, device=dev).to(dtype)
    v = torch.randn(1, T, 1, dv, device=dev).to(dtype)
    kc = OPS.mean_compress(k, None, l, d)
    vc = OPS.mean_compress(v, None, l, d)
    scale = dk ** -0.5
    _, lse = OPS.compressed_attn_fwd(q, kc, vc, None, T, l, d, scale)
    bi = OPS.select_blocks(q, kc, lse, None, T, l, d, lp, n, 1, 1, scale)
    o, lse_s = OPS.selected_attn_fwd(q, k, v, bi, None, T, lp, scale)
    OPS.selected_attn_bwd(torch.randn_like(o), None, q, k, v, bi, o, lse_s, None, T, lp, scale)
    os.environ["NSA_SLC_FWD_STAGES"] = "1"  # the one-stage selected forward (the default: two)
    try:
        OPS.selected_attn_fwd(q, k, v, bi, None, T, lp, scale)
    finally:
        del os.environ["NSA_SLC_FWD_STAGES"]


def run_selection_groups(dk, dtype):
    """The selection's head sums at several segment sizes (on sm_90 the wgmma kernel:
    its shuffle butterfly at G = 4 and 16, two segments per token at G = 32), at
    G = 16 over four K tiles (Tc = 198: a smem stage refilled after its first use),
    and the mma.sync kernel on that case."""
    dev = "cuda"
    l, d, lp, n = 32, 16, 64, 5
    for G, T in ((16, 3200), (4, 400), (32, 400)):
        q = torch.randn(1, T, G, dk, device=dev).to(dtype)
        kc = OPS.mean_compress(torch.randn(1, T, 1, dk, device=dev).to(dtype), None, l, d)
        scale = dk ** -0.5
        _, lse = OPS.compressed_attn_fwd(q, kc, kc[..., :128].contiguous(), None, T, l, d, scale)
        OPS.select_blocks(q, kc, lse, None, T, l, d, lp, n, 1, 2, scale)
        if G == 16:
            os.environ["NSA_MAINLOOP"] = "sm80"
            try:
                OPS.select_blocks(q, kc, lse, None, T, l, d, lp, n, 1, 2, scale)
            finally:
                del os.environ["NSA_MAINLOOP"]


def run_decode(dk, dv, G, dtype, S):
    dev = "cuda"
    Hkv, cap = 2, 200
    l, d, lp, n, w = 32, 16, 32, 3, 40
    B = 4
    lens = torch.tensor([S - 1, 37, 150, cap], dtype=torch.int32, device=dev)[:B]
    q = torch.randn(B, S, Hkv * G, dk, device=dev).to(dtype)
    k = torch.randn(B, cap, Hkv, dk, device=dev).to(dtype)
    v = torch.randn(B, cap, Hkv, dv, device=dev).to(dtype)
    rows = nsa_cuda.cmp_cache_rows(cap, l, d)
    kc = torch.zeros(B, rows, Hkv, dk, device=dev, dtype=dtype)
    vc = torch.zeros(B, rows, Hkv, dv, device=dev, dtype=dtype)
    # Grow the compressed caches from 0 tokens in steps, as decoding does.
    old = torch.zeros_like(lens)
    for step in (S, 64, cap):
        new = torch.minimum(lens, torch.full_like(lens, step))
        num_new = int((new - old).max().item())
        if num_new > 0:
            OPS.update_cmp_cache(k, kc, old, num_new, l, d)
            OPS.update_cmp_cache(v, vc, old, num_new, l, d)
        old = torch.minimum(lens, old + num_new)
    # The append with the compressed blocks it completes, in one launch (the last entry's
    # cache is full: its rows are dropped), on copies of the caches.
    OPS.append_kv_to_cache(k.clone(), v.clone(), lens, torch.randn_like(k[:, :S]), torch.randn_like(v[:, :S]),
                           kc.clone(), vc.clone(), l, d)
    scale = dk ** -0.5
    _, lse = OPS.compressed_attn_decode(q, kc, vc, lens, l, d, scale)
    bi = OPS.select_blocks_decode(q, kc, lse, lens, l, d, lp, n, 1, 1, scale)
    OPS.compressed_select_decode(q, kc, vc, lens, l, d, lp, n, 1, 1, scale)
    bi2 = bi.clone()
    bi2[..., 0] = 10 ** 6  # out-of-range slots must never be read
    bi2[..., -1] = bi2[..., 1]  # duplicates count once
    OPS.selected_attn_decode(q, k, v, bi2, lens, lp, scale)
    OPS.window_attn_decode(q, k, v, lens, w, scale)
    # The one-op step: unmerged splits of every branch and the gated sum (strided
    # gates), selecting and with given blocks, with the split count chosen and with one.
    gates = torch.rand(B, S, 3, Hkv * G, device=dev).to(dtype)
    g = [gates[:, :, j] for j in range(3)]
    for splits in (None, "1"):
        if splits:
            os.environ["NSA_DECODE_SPLITS"] = splits
        try:
            OPS.sparse_attn_decode(q, k, v, k, v, kc, vc, lens, *g, None, l, d, lp, n, 1, 1, w,
                                   scale)
            OPS.sparse_attn_decode(q, k, v, k, v, kc, vc, lens, *g, bi2, l, d, lp, n, 1, 1, w,
                                   scale)
        finally:
            os.environ.pop("NSA_DECODE_SPLITS", None)


def run_long_decode_selection(dk, dv, dtype):
    """The decode selection's score kernel past one MMA tile each way (G = 20 heads:
    a 16-head pass and a 4-head one; score CTAs with up to 81 compressed rows: three
    32-row passes), then the decode attention with one split, which writes o and lse
    itself (no combine)."""
    dev = "cuda"
    B, Hkv, G, S, cap = 2, 1, 20, 2, 1200
    l, d, lp, n, w = 16, 8, 40, 8, 64
    lens = torch.tensor([cap, 700], dtype=torch.int32, device=dev)
    q = torch.randn(B, S, Hkv * G, dk, device=dev).to(dtype)
    k = torch.randn(B, cap, Hkv, dk, device=dev).to(dtype)
    v = torch.randn(B, cap, Hkv, dv, device=dev).to(dtype)
    kc = OPS.mean_compress(k, None, l, d)
    vc = OPS.mean_compress(v, None, l, d)
    scale = dk ** -0.5
    _, lse = OPS.compressed_attn_decode(q, kc, vc, lens, l, d, scale)
    bi = OPS.select_blocks_decode(q, kc, lse, lens, l, d, lp, n, 1, 1, scale)
    OPS.compressed_select_decode(q, kc, vc, lens, l, d, lp, n, 1, 1, scale)
    os.environ["NSA_DECODE_SPLITS"] = "1"
    try:
        OPS.compressed_attn_decode(q, kc, vc, lens, l, d, scale)
        OPS.selected_attn_decode(q, k, v, bi, lens, lp, scale)
        OPS.window_attn_decode(q, k, v, lens, w, scale)
    finally:
        del os.environ["NSA_DECODE_SPLITS"]


def cases():
    """(name, call) for each case, in a fixed order (--start counts in it)."""
    out = []
    for dk, dv in [(64, 64), (128, 128), (192, 128)]:
        for G in (1, 5):
            out.append((f"prefill ({dk},{dv}) G={G} bf16", lambda dk=dk, dv=dv, G=G: run(dk, dv, G, torch.bfloat16)))
            out.append((f"prefill varlen ({dk},{dv}) G={G} fp16",
                        lambda dk=dk, dv=dv, G=G: run(dk, dv, G, torch.float16, lengths=[1, 17, 100, 33])))
            for S in (1, 3):
                out.append((f"decode ({dk},{dv}) G={G} S={S}",
                            lambda dk=dk, dv=dv, G=G, S=S: run_decode(
                                dk, dv, G, torch.bfloat16 if S == 1 else torch.float16, S)))
            if (dk, dv) == (192, 128) and G == 1:
                out.append(("long selection (192,128)", lambda: run_long_selection(192, 128, torch.bfloat16)))
                out.append(("selection groups 192", lambda: run_selection_groups(192, torch.bfloat16)))
                out.append(("long decode selection (192,128)",
                            lambda: run_long_decode_selection(192, 128, torch.bfloat16)))
    return out


def run_cases(start, resume_file):
    """Runs the cases from `start`. A case that loses the CUDA context (under
    compute-sanitizer, a kernel with an error is killed and the context destroyed)
    ends the process with LOST_CONTEXT_RC after writing the next case's index to
    `resume_file`; other failures are reported and the run goes on."""
    failed = 0
    for i, (name, call) in enumerate(cases()):
        if i < start:
            continue
        print(f"sanitize_case: [{i}] {name}", flush=True)
        try:
            call()
            torch.cuda.synchronize()  # an asynchronous error surfaces in its own case
        except Exception as e:  # noqa: BLE001  reported, counted, and the next case runs
            if "compiled without" in str(e):
                print(f"sanitize_case: skip [{i}] {name}: {e}", flush=True)
                continue
            failed += 1
            print(f"sanitize_case: FAILED [{i}] {name}: {type(e).__name__}: {e}", flush=True)
            if cuda_context_lost():
                if resume_file:
                    with open(resume_file, "w") as f:
                        f.write(str(i + 1))
                print(f"sanitize_case: the CUDA context was lost in [{i}]; the cases after it go on in "
                      f"a fresh process", flush=True)
                return LOST_CONTEXT_RC
    print(f"sanitize_case: done ({failed} failed)", flush=True)
    return 1 if failed else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", type=int, default=0, help="the first case to run (an index in cases())")
    ap.add_argument("--resume-file", default=None, help="where a lost context leaves the next case's index")
    ap.add_argument("--tool", default=None,
                    help="memcheck or racecheck: run the cases under compute-sanitizer in rounds, a "
                         "fresh process after each case that loses the CUDA context")
    ap.add_argument("--rounds", type=int, default=4, help="with --tool: at most this many processes")
    args = ap.parse_args()
    if not args.tool:
        return run_cases(args.start, args.resume_file)
    resume = os.path.join(tempfile.mkdtemp(prefix="nsa_sanitize_"), "next")
    start, worst = args.start, 0
    for rnd in range(1, args.rounds + 1):
        print(f"== compute-sanitizer --tool {args.tool}, round {rnd}, from case {start}", flush=True)
        rc = subprocess.call(["compute-sanitizer", "--tool", args.tool, "--error-exitcode", "1", sys.executable,
                              os.path.abspath(__file__), "--start", str(start), "--resume-file", resume])
        if not os.path.exists(resume):
            return rc or worst
        worst = 1
        with open(resume) as f:
            start = int(f.read())
        os.remove(resume)
    print(f"sanitize_case: stopped after {args.rounds} rounds; cases from {start} on not run", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
