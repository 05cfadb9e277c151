"""Times the CUDA forward of each NSA branch (CUDA events, warm-up, median) at a
few sequence lengths with the paper's settings, next to dense causal attention
(torch SDPA) and flash-linear-attention's parallel_nsa when it can be imported.

    python bench/bench_fwd.py [--json out.json] [--lengths 4096,16384,65536]
"""
import argparse
import json
import statistics

import torch

import nsa_cuda  # noqa: F401

OPS = torch.ops.nsa_cuda


def time_ms(fn, warmup=3, reps=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def bench_one(T, B, Hkv, G, dk, dv, dtype, rows):
    l, d, lp, n, w = 32, 16, 64, 16, 512
    dev = "cuda"
    q = torch.randn(B, T, Hkv * G, dk, device=dev, dtype=dtype)
    k = torch.randn(B, T, Hkv, dk, device=dev, dtype=dtype)
    v = torch.randn(B, T, Hkv, dv, device=dev, dtype=dtype)
    scale = dk ** -0.5
    base = dict(T=T, B=B, Hq=Hkv * G, Hkv=Hkv, Dk=dk, Dv=dv, dtype=str(dtype).replace("torch.", ""))

    def add(op, fn):
        try:
            rows.append(dict(op=op, ms=time_ms(fn), **base))
        except Exception as e:  # keep going: one failure still leaves the other rows
            rows.append(dict(op=op, ms=None, error=f"{type(e).__name__}: {e}"[:300], **base))
        print(rows[-1], flush=True)

    kc = OPS.mean_compress(k, None, l, d)
    vc = OPS.mean_compress(v, None, l, d)
    _, lse = OPS.compressed_attn_fwd(q, kc, vc, None, T, l, d, scale)
    bi = OPS.select_blocks(q, kc, lse, None, T, l, d, lp, n, 1, 2, scale)
    add("mean_compress(k,v)", lambda: (OPS.mean_compress(k, None, l, d), OPS.mean_compress(v, None, l, d)))
    add("compressed_attn_fwd", lambda: OPS.compressed_attn_fwd(q, kc, vc, None, T, l, d, scale))
    add("select_blocks", lambda: OPS.select_blocks(q, kc, lse, None, T, l, d, lp, n, 1, 2, scale))
    add("selected_attn_fwd", lambda: OPS.selected_attn_fwd(q, k, v, bi, None, T, lp, scale))
    add("window_attn_fwd", lambda: OPS.window_attn_fwd(q, k, v, None, T, w, scale))

    # Dense causal baseline: SDPA wants Dk == Dv for its fast kernels, so 128/128.
    qs = torch.randn(B, Hkv * G, T, 128, device=dev, dtype=dtype)
    ks = torch.randn(B, Hkv * G, T, 128, device=dev, dtype=dtype)
    vs = torch.randn(B, Hkv * G, T, 128, device=dev, dtype=dtype)
    add("sdpa_dense_causal(d=128)",
        lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
    del qs, ks, vs

    try:
        from fla.ops.nsa import parallel_nsa
    except Exception as e:
        rows.append(dict(op="fla.parallel_nsa", ms=None, error=f"not importable: {e}"[:200], **base))
        return
    # fla's NSA: l = d = l' = 64 mean pooling; block_indices from its own layout.
    bi_fla = bi.long()
    g = torch.ones(B, T, Hkv * G, device=dev, dtype=dtype)
    add("fla.parallel_nsa(slc+win)", lambda: parallel_nsa(q, k, v, g, g, g, bi_fla, block_size=lp,
                                                           window_size=w, scale=scale))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--lengths", default="4096,16384,65536")
    args = ap.parse_args()
    rows = []
    for T in [int(x) for x in args.lengths.split(",")]:
        try:
            bench_one(T, 1, 4, 16, 192, 128, torch.bfloat16, rows)
        except Exception as e:
            rows.append(dict(op="setup", T=T, ms=None, error=f"{type(e).__name__}: {e}"[:300]))
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
