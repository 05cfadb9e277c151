"""`python -m nsa_cuda`: run NSA once, check it against the reference, time it.

Runs ``nsa_cuda.sparse_attn`` forward and backward on the best device present
(CUDA, else CPU) with the paper's NSA settings, compares the output and the
gradients with ``nsa_cuda.reference`` in float64, and prints a table: NSA time
against dense causal attention (torch SDPA) at the same size, and the errors.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import nsa_cuda
from nsa_cuda import reference


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m nsa_cuda", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"), default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=None, help="default: 1024 on CPU, 8192 on CUDA")
    p.add_argument("--q-heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim-qk", type=int, default=None, help="default: 64 on CPU, 192 on CUDA")
    p.add_argument("--head-dim-v", type=int, default=None, help="default: 64 on CPU, 128 on CUDA")
    p.add_argument("--cmp-block-size", type=int, default=32)
    p.add_argument("--cmp-stride", type=int, default=16)
    p.add_argument("--slc-block-size", type=int, default=64)
    p.add_argument("--slc-num-blocks", type=int, default=16)
    p.add_argument("--window-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    p.add_argument("--no-check", action="store_true", help="skip the reference check")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _say(step, total, msg):
    print(f"[{step}/{total}] {msg}", flush=True)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats):
    fn()  # warm-up (and, on CUDA, lazy initialisation)
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    args = _parse(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is available")
    on_cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_cuda else "float32"))
    T = args.seqlen or (8192 if on_cuda else 1024)
    dk = args.head_dim_qk or (192 if on_cuda else 64)
    dv = args.head_dim_v or (128 if on_cuda else 64)
    B, hq, hkv = args.batch, args.q_heads, args.kv_heads
    settings = dict(cmp_block_size=args.cmp_block_size, cmp_stride=args.cmp_stride,
                    slc_block_size=args.slc_block_size, slc_num_blocks=args.slc_num_blocks,
                    slc_init_blocks=1, slc_local_blocks=2, window_size=args.window_size)
    steps = 4 if args.no_check else 5  # (the decode timing is part of step 3)

    print(f"nsa_cuda {nsa_cuda.__version__} | torch {torch.__version__} | device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if on_cuda else
             f" ({torch.get_num_threads()} threads)"))
    print(f"B={B} T={T} Hq={hq} Hkv={hkv} Dk={dk} Dv={dv} dtype={str(dtype)[6:]} "
          + " ".join(f"{k}={v}" for k, v in settings.items()), flush=True)

    _say(1, steps, "making random inputs")
    gen = torch.Generator(device="cpu").manual_seed(args.seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device, dtype)

    q, k, v = rand(B, T, hq, dk), rand(B, T, hkv, dk), rand(B, T, hkv, dv)
    gates = [torch.rand(B, T, hq, generator=gen).to(device, dtype) for _ in range(3)]
    leaves = [x.requires_grad_() for x in (q, k, v, *gates)]
    dout = rand(B, T, hq, dv)

    _say(2, steps, f"timing NSA forward and forward+backward ({args.repeats} runs each)")
    nsa_fwd = _time(lambda: nsa_cuda.sparse_attn(q, k, v, *gates, **settings), device,
                    args.repeats)

    def nsa_fwd_bwd():
        o = nsa_cuda.sparse_attn(q, k, v, *gates, **settings)
        torch.autograd.grad(o, leaves, dout)

    nsa_total = _time(nsa_fwd_bwd, device, args.repeats)

    _say(3, steps, "timing dense causal attention (torch SDPA, GQA) and one decoding step")
    qs, ks, vs = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    gqa = dict(enable_gqa=True) if hq != hkv else {}

    def dense():
        return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, **gqa)

    dense_fwd = _time(dense, device, args.repeats)

    def dense_fwd_bwd():
        o = dense()
        torch.autograd.grad(o, (qs, ks, vs), torch.ones_like(o))

    dense_total = _time(dense_fwd_bwd, device, args.repeats)

    # Decoding one token at position T-1 from a KV cache holding the sequence.
    kc, vc = k.detach(), v.detach()
    k_cmp = nsa_cuda.mean_compress(kc, args.cmp_block_size, args.cmp_stride)
    v_cmp = nsa_cuda.mean_compress(vc, args.cmp_block_size, args.cmp_stride)
    lens = torch.full((B,), T, dtype=torch.int32, device=device)
    q1 = q.detach()[:, -1:]
    g1 = [g.detach()[:, -1:] for g in gates]
    nsa_dec = _time(lambda: nsa_cuda.sparse_attn_with_kvcache(
        q1, kc, vc, k_cmp, v_cmp, lens, g_cmp=g1[0], g_slc=g1[1], g_win=g1[2],
        max_cache_seqlen=T, **settings),
        device, args.repeats)
    q1s = q1.transpose(1, 2)
    dense_dec = _time(lambda: F.scaled_dot_product_attention(q1s, ks.detach(), vs.detach(),
                                                             **gqa), device, args.repeats)

    rows = [("NSA forward", nsa_fwd, dense_fwd), ("NSA forward+backward", nsa_total, dense_total),
            ("NSA decode (1 token)", nsa_dec, dense_dec)]
    errors = []
    if not args.no_check:
        _say(4, steps, "checking against nsa_cuda.reference (float64, same block_indices)")
        o, aux = nsa_cuda.sparse_attn(q, k, v, *gates, **settings, return_aux=True)
        grads = torch.autograd.grad(o, leaves, dout)
        ref_in = [x.detach().double().cpu().requires_grad_() for x in leaves]
        bi = aux["block_indices"].cpu()
        ref_settings = {k_: v_ for k_, v_ in settings.items()}
        o_ref = reference.sparse_attn(*ref_in, block_indices=bi, **ref_settings)
        ref_grads = torch.autograd.grad(o_ref, ref_in, dout.double().cpu())
        errors.append(("output o", (o.double().cpu() - o_ref).abs().max().item()))
        for name, g, r in zip(("dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_win"), grads, ref_grads):
            errors.append((name, (g.double().cpu() - r).abs().max().item()))
        # Selection: the reference's choice, within the spec's tie tolerance.
        ref_bi, _ = reference.select_blocks(
            ref_in[0].detach(), reference.mean_compress(ref_in[1].detach(), args.cmp_block_size,
                                                        args.cmp_stride),
            args.cmp_block_size, args.cmp_stride, args.slc_block_size, args.slc_num_blocks, 1, 2)
        same = (ref_bi == bi).all(-1).float().mean().item()
        errors.append(("rows with identical selection", same))
        # Decoding the last 8 tokens, 4 per call, from a cache: the prefill's output.
        S, n_dec = 4, min(8, T)
        cache = [x.detach()[:, :T - n_dec].clone() for x in (k, v)]
        k_cache = torch.cat([cache[0], torch.zeros_like(k[:, T - n_dec:])], 1)
        v_cache = torch.cat([cache[1], torch.zeros_like(v[:, T - n_dec:])], 1)
        rows_c = nsa_cuda.cmp_cache_rows(T, args.cmp_block_size, args.cmp_stride)
        kc_cache = k.new_zeros(B, rows_c, hkv, dk).detach()
        vc_cache = v.new_zeros(B, rows_c, hkv, dv).detach()
        done = nsa_cuda.cmp_cache_rows(T - n_dec, args.cmp_block_size, args.cmp_stride)
        kc_cache[:, :done] = k_cmp[:, :done]
        vc_cache[:, :done] = v_cmp[:, :done]
        lens = torch.full((B,), T - n_dec, dtype=torch.int32, device=device)
        dec = []
        for t in range(T - n_dec, T, S):
            sl = slice(t, min(t + S, T))
            dec.append(nsa_cuda.sparse_attn_with_kvcache(
                q.detach()[:, sl], k_cache, v_cache, kc_cache, vc_cache, lens,
                k.detach()[:, sl], v.detach()[:, sl], g_cmp=gates[0].detach()[:, sl],
                g_slc=gates[1].detach()[:, sl], g_win=gates[2].detach()[:, sl],
                block_indices=aux["block_indices"][:, sl], **settings))
            lens += sl.stop - sl.start
        dec_err = (torch.cat(dec, 1).double() - o.detach()[:, T - n_dec:].double()).abs().max()
        errors.append((f"decode vs prefill ({n_dec} tokens)", dec_err.item()))

    _say(steps, steps, "done")
    print()
    print(f"{'':24s} {'NSA (s)':>10s} {'dense SDPA (s)':>15s} {'speedup':>8s}")
    for name, t_nsa, t_dense in rows:
        print(f"{name:24s} {t_nsa:10.4f} {t_dense:15.4f} {t_dense / t_nsa:7.2f}x")
    if errors:
        print()
        print(f"{'check vs reference (fp64)':32s} {'value':>12s}")
        for name, err in errors:
            print(f"{name:32s} {err:12.3e}")
        tol = {torch.float64: 1e-9, torch.float32: 1e-3}.get(dtype, 5e-2)
        worst = max(e for n, e in errors if n != "rows with identical selection")
        ok = worst <= tol
        print(f"\nresult: {'PASS' if ok else 'FAIL'} (max error {worst:.3e}, tolerance {tol:g} "
              f"for {str(dtype)[6:]})")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
