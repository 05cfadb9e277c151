"""torch.library.opcheck of every op, torch.compile(fullgraph=True) of sparse_attn
(aot_eager and inductor) against eager, and shapes on the meta device."""
from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import nsa_cuda
from nsa_cuda import reference as R

from conftest import (Cfg, assert_close_exact, detach_clone, grads_of, make_cu_seqlens,
                      make_inputs, make_varlen_inputs)

F64 = torch.float64
ops = torch.ops.nsa_cuda

# l, d, l', n, n_init, n_local, w
L, D, LP, N, NI, NL, W = 8, 4, 8, 2, 1, 1, 6
SCALE = 0.5  # exact in fp32 too: keeps these tests about compile, not precision
CFG = Cfg(B=2, T=27, Hq=4, Hkv=2, Dk=4, Dv=3, l=L, d=D, lp=LP, n=N, n_init=NI, n_local=NL,
          w=W, scale=SCALE)
SEQLENS = [11, 1, 5, 17]


def _mode(varlen):
    if varlen:
        inp = make_varlen_inputs(CFG, SEQLENS, seed=51)
        cu = inp.pop("cu_seqlens")
        return inp, cu, max(SEQLENS)
    inp = make_inputs(CFG, seed=51)
    return inp, None, CFG.T


# --------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------


def _op_args(varlen, requires_grad):
    """Arguments of every op, from a consistent forward pass."""
    inp, cu, ms = _mode(varlen)
    q, k, v = (inp[n] for n in ("q", "k", "v"))
    kc = ops.mean_compress(k, cu, L, D)
    vc = ops.mean_compress(v, cu, L, D)
    o_c, lse_c = ops.compressed_attn_fwd(q, kc, vc, cu, ms, L, D, SCALE)
    bi = ops.select_blocks(q, kc, lse_c, cu, ms, L, D, LP, N, NI, NL, SCALE)
    o_s, lse_s = ops.selected_attn_fwd(q, k, v, bi, cu, ms, LP, SCALE)
    o_w, lse_w = ops.window_attn_fwd(q, k, v, cu, ms, W, SCALE)

    def rg(t):
        return t.detach().clone().requires_grad_(requires_grad)

    def dl(lse):
        return torch.randn_like(lse)

    decode = {}
    if not varlen:  # the decode ops read batched caches: the last S=2 positions of each entry
        qd = q[:, -2:].detach().clone()
        lens = torch.tensor([CFG.T, CFG.T - 3], dtype=torch.int32)
        _, lse_d = ops.compressed_attn_decode(qd, kc, vc, lens, L, D, SCALE)
        bi_d = ops.select_blocks_decode(qd, kc, lse_d, lens, L, D, LP, N, NI, NL, SCALE)
        decode = {
            "compressed_attn_decode": (qd, kc, vc, lens, L, D, SCALE),
            "select_blocks_decode": (qd, kc, lse_d, lens, L, D, LP, N, NI, NL, SCALE),
            "compressed_select_decode": (qd, kc, vc, lens, L, D, LP, N, NI, NL, SCALE),
            "selected_attn_decode": (qd, k, v, bi_d, lens, LP, SCALE),
            "window_attn_decode": (qd, k, v, lens, W, SCALE),
            "update_cmp_cache": (k, kc.clone(), lens - 2, 2, L, D),
            "append_kv_to_cache": (k.clone(), v.clone(), lens - 2, k[:, :2].clone(),
                                   v[:, :2].clone()),
        }
        gates = [torch.rand(qd.shape[:3], dtype=qd.dtype) for _ in range(3)]
        step = (qd, k, v, k, v, kc, vc, lens)
        sizes = (L, D, LP, N, NI, NL, W, SCALE)
        decode["sparse_attn_decode"] = (*step, *gates, None, *sizes)
        decode["append_kv_to_cache/cmp caches"] = (k.clone(), v.clone(), lens - 2, k[:, :2].clone(),
                                                   v[:, :2].clone(), kc.clone(), vc.clone(), L, D)
        # No compressed output and given blocks: no selection; separate window caches.
        decode["sparse_attn_decode/given blocks"] = (
            qd, k, v, k.flip(1).contiguous(), v.flip(1).contiguous(), kc, vc, lens, None,
            gates[1], gates[2], bi_d, *sizes)
    gates = [inp[n] for n in ("g_cmp", "g_slc", "g_win")]
    return decode | {
        "gate_combine": ([rg(o_c), rg(o_s), rg(o_w)], [rg(g) for g in gates]),
        # two branches, a float32 gate read through a transposed view
        "gate_combine/strided gate": (
            [rg(o_s), rg(o_w)],
            [rg(gates[1]), rg(gates[2].float().transpose(0, 1).contiguous().transpose(0, 1))]),
        "gate_combine_bwd": (torch.randn_like(o_c), [o_c, o_s, o_w], gates),
        "gate_combine_bwd/row dots": (torch.randn_like(o_c), [o_c, o_w], gates[:2], True),
        "gate_combine_bwd/no output grads": (torch.randn_like(o_c), [o_c, o_w], gates[:2], True,
                                             False),
        "mean_compress": (rg(k), cu, L, D),
        "mean_compress_bwd": (torch.randn_like(kc), k, cu, L, D),
        "compressed_attn_fwd": (rg(q), rg(kc), rg(vc), cu, ms, L, D, SCALE),
        "compressed_attn_bwd": (torch.randn_like(o_c), dl(lse_c), q, kc, vc, o_c, lse_c, cu, ms,
                                L, D, SCALE),
        "compressed_attn_bwd/no dlse": (torch.randn_like(o_c), None, q, kc, vc, o_c, lse_c, cu,
                                        ms, L, D, SCALE),
        "select_blocks": (rg(q), rg(kc), lse_c, cu, ms, L, D, LP, N, NI, NL, SCALE),
        "selected_attn_fwd": (rg(q), rg(k), rg(v), bi, cu, ms, LP, SCALE),
        "selected_attn_bwd": (torch.randn_like(o_s), dl(lse_s), q, k, v, bi, o_s, lse_s, cu, ms,
                              LP, SCALE),
        "selected_attn_bwd/no dlse": (torch.randn_like(o_s), None, q, k, v, bi, o_s, lse_s, cu,
                                      ms, LP, SCALE),
        "window_attn_fwd": (rg(q), rg(k), rg(v), cu, ms, W, SCALE),
        "window_attn_bwd": (torch.randn_like(o_w), dl(lse_w), q, k, v, o_w, lse_w, cu, ms, W,
                            SCALE),
        "window_attn_bwd/no dlse": (torch.randn_like(o_w), None, q, k, v, o_w, lse_w, cu, ms, W,
                                    SCALE),
        # sparse_attn's backward: each branch adds the gradients the others left
        "compressed_attn_bwd/added": (torch.randn_like(o_c), None, q, kc, vc, o_c, lse_c, cu, ms,
                                      L, D, SCALE, torch.randn_like(q), None, None),
        "selected_attn_bwd/added": (torch.randn_like(o_s), None, q, k, v, bi, o_s, lse_s, cu, ms,
                                    LP, SCALE, torch.randn_like(q), torch.randn_like(k),
                                    torch.randn_like(v)),
        "window_attn_bwd/added": (torch.randn_like(o_w), dl(lse_w), q, k, v, o_w, lse_w, cu, ms,
                                  W, SCALE, None, torch.randn_like(k), torch.randn_like(v)),
        "window_attn_bwd/given delta": (torch.randn_like(o_w), dl(lse_w), q, k, v, o_w, lse_w, cu,
                                        ms, W, SCALE, None, None, None, torch.randn_like(lse_w)),
        # sparse_attn's backward: one d o, each branch scaling it by its gate
        "selected_attn_bwd/dout scale": (torch.randn_like(o_s), None, q, k, v, bi, o_s, lse_s,
                                         cu, ms, LP, SCALE, None, None, None, None, gates[1]),
        "compressed_attn_bwd/dout scale, delta": (
            torch.randn_like(o_c), dl(lse_c), q, kc, vc, o_c, lse_c, cu, ms, L, D, SCALE, None,
            None, None, torch.randn_like(lse_c), gates[0]),
    }


OP_NAMES = ["mean_compress", "mean_compress_bwd", "compressed_attn_fwd", "compressed_attn_bwd",
            "compressed_attn_bwd/no dlse", "select_blocks", "selected_attn_fwd",
            "selected_attn_bwd", "selected_attn_bwd/no dlse", "window_attn_fwd",
            "window_attn_bwd", "window_attn_bwd/no dlse", "compressed_attn_bwd/added",
            "selected_attn_bwd/added", "window_attn_bwd/added", "gate_combine",
            "gate_combine/strided gate", "gate_combine_bwd", "gate_combine_bwd/row dots",
            "window_attn_bwd/given delta", "gate_combine_bwd/no output grads",
            "selected_attn_bwd/dout scale", "compressed_attn_bwd/dout scale, delta"]
DECODE_OPS = ["compressed_attn_decode", "select_blocks_decode", "compressed_select_decode",
              "selected_attn_decode", "window_attn_decode", "update_cmp_cache",
              "append_kv_to_cache", "append_kv_to_cache/cmp caches", "sparse_attn_decode",
              "sparse_attn_decode/given blocks"]
FWD_OPS = {"mean_compress", "compressed_attn_fwd", "select_blocks", "selected_attn_fwd",
           "window_attn_fwd", "gate_combine", "gate_combine/strided gate"}


def _opcheck_cases():
    cases = []
    for name in OP_NAMES + DECODE_OPS:
        for varlen in ((False,) if name in DECODE_OPS else (False, True)):
            for rg in ((False, True) if name in FWD_OPS else (False,)):
                cases.append(pytest.param(name, varlen, rg,
                                          id=f"{name}-{'varlen' if varlen else 'batch'}"
                                             f"{'-grad' if rg else ''}"))
    return cases


@pytest.mark.parametrize("name,varlen,requires_grad", _opcheck_cases())
def test_opcheck(name, varlen, requires_grad):
    args = _op_args(varlen, requires_grad)[name]
    op = getattr(ops, name.split("/")[0]).default
    result = opcheck(op, args, raise_exception=True)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_all_ops_covered():
    """Every op of the library is opchecked above."""
    names = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("nsa_cuda::")}
    assert names == {n.split("/")[0] for n in OP_NAMES + DECODE_OPS}


# --------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------

KW = dict(cmp_block_size=L, cmp_stride=D, slc_block_size=LP, slc_num_blocks=N,
          slc_init_blocks=NI, slc_local_blocks=NL, window_size=W, scale=SCALE)


def _sparse_fn(cu=None, max_seqlen=None, **extra):
    def fn(q, k, v, g_cmp, g_slc, g_win):
        o, aux = nsa_cuda.sparse_attn(q, k, v, g_cmp, g_slc, g_win, **KW, cu_seqlens=cu,
                                      max_seqlen=max_seqlen, return_aux=True, **extra)
        lse = sum(torch.where(torch.isfinite(aux[n]), aux[n], 0.0).sum()
                  for n in ("lse_cmp", "lse_slc", "lse_win"))
        return o, aux["block_indices"], lse
    return fn


def _run(fn, inp):
    x = detach_clone(inp, requires_grad=True)
    x.pop("cu_seqlens", None)
    o, bi, lse = fn(*(x[n] for n in ("q", "k", "v", "g_cmp", "g_slc", "g_win")))
    w = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)
    return o, bi, lse, grads_of((o * w).sum() + lse, x)


def _compare_compiled(backend, inp, cu=None, max_seqlen=None, **extra):
    torch._dynamo.reset()
    fn = _sparse_fn(cu, max_seqlen, **extra)
    eager = _run(fn, inp)
    compiled = _run(torch.compile(fn, backend=backend, fullgraph=True), inp)
    o, bi, lse, g = compiled
    o0, bi0, lse0, g0 = eager
    assert_close_exact(o, o0, f"{backend} o", tol=1e-12)
    assert torch.equal(bi, bi0)
    assert_close_exact(lse, lse0, f"{backend} lse", tol=1e-10)
    for n in g0:
        assert_close_exact(g[n], g0[n], f"{backend} d{n}", tol=1e-12)
    # and the eager result is the reference's
    ro, raux = R.sparse_attn(*(inp[n] for n in ("q", "k", "v", "g_cmp", "g_slc", "g_win")),
                             **KW, cu_seqlens=cu, block_indices=bi0, return_aux=True,
                             k_cmp=extra.get("k_cmp"), v_cmp=extra.get("v_cmp"))
    assert_close_exact(o0, ro, "eager o vs reference")


@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_compile_aot_eager(varlen):
    inp, cu, ms = _mode(varlen)
    _compare_compiled("aot_eager", inp, cu, ms if varlen else None)


def test_compile_aot_eager_given_kv_cmp_and_block_indices():
    inp, _, _ = _mode(False)
    kc = nsa_cuda.mean_compress(inp["k"], L, D) * 1.5
    vc = nsa_cuda.mean_compress(inp["v"], L, D) - 0.5
    bi = torch.zeros(CFG.B, CFG.T, CFG.Hkv, N, dtype=torch.int64)
    bi[..., 1] = (torch.arange(CFG.T) // LP).view(1, -1, 1)
    _compare_compiled("aot_eager", inp, k_cmp=kc, v_cmp=vc, block_indices=bi)


def test_compile_aot_eager_dynamic_shapes():
    """One compiled function, two sequence lengths (dynamic=True): both equal eager."""
    torch._dynamo.reset()
    fn = _sparse_fn()
    cfn = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    for T in (21, 34):
        inp = make_inputs(CFG, seed=52, T=T)
        args = [inp[n] for n in ("q", "k", "v", "g_cmp", "g_slc", "g_win")]
        o, bi, lse = cfn(*args)
        o0, bi0, lse0 = fn(*args)
        assert o.shape == o0.shape
        assert_close_exact(o, o0, f"T={T} o", tol=1e-12)
        assert torch.equal(bi, bi0)


@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_compile_inductor(varlen):
    inp, cu, ms = _mode(varlen)
    _compare_compiled("inductor", inp, cu, ms if varlen else None)


def test_compile_varlen_without_max_seqlen_is_refused():
    """Under torch.compile, cu_seqlens without max_seqlen would need a device sync: the
    API raises an error that names max_seqlen."""
    torch._dynamo.reset()
    inp, cu, _ = _mode(True)
    fn = torch.compile(_sparse_fn(cu, None), backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="max_seqlen"):
        fn(*(inp[n] for n in ("q", "k", "v", "g_cmp", "g_slc", "g_win")))


# --------------------------------------------------------------------------------------
# meta tensors
# --------------------------------------------------------------------------------------


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_meta_shapes(dtype, varlen):
    B, T, Hq, Hkv, Dk, Dv = (1, 50, 6, 2, 5, 7) if varlen else (3, 50, 6, 2, 5, 7)
    cu = make_cu_seqlens([20, 30]).to("meta") if varlen else None
    ms = 30 if varlen else None
    lse_dtype = F64 if dtype == F64 else torch.float32
    q, k, v = _meta(B, T, Hq, Dk, dtype=dtype), _meta(B, T, Hkv, Dk, dtype=dtype), \
        _meta(B, T, Hkv, Dv, dtype=dtype)
    gates = [_meta(B, T, Hq, dtype=dtype) for _ in range(3)]
    tc = T // D if varlen else R.num_cmp_blocks(T, L, D)

    kc = nsa_cuda.mean_compress(k, L, D, cu_seqlens=cu)
    assert kc.device.type == "meta" and kc.shape == (B, tc, Hkv, Dk) and kc.dtype == dtype
    vc = nsa_cuda.mean_compress(v, L, D, cu_seqlens=cu)
    assert vc.shape == (B, tc, Hkv, Dv)

    def check(o, lse):
        assert o.device.type == "meta" and lse.device.type == "meta"
        assert o.shape == (B, T, Hq, Dv) and o.dtype == dtype
        assert lse.shape == (B, Hq, T) and lse.dtype == lse_dtype

    o, lse = nsa_cuda.compressed_attn(q, kc, vc, cmp_block_size=L, cmp_stride=D, cu_seqlens=cu,
                                      max_seqlen=ms)
    check(o, lse)
    bi = nsa_cuda.select_blocks(q, kc, lse, cmp_block_size=L, cmp_stride=D, slc_block_size=LP,
                                slc_num_blocks=5, slc_init_blocks=1, slc_local_blocks=2,
                                cu_seqlens=cu, max_seqlen=ms)
    assert bi.shape == (B, T, Hkv, 5) and bi.dtype == torch.int32 and bi.device.type == "meta"
    check(*nsa_cuda.selected_attn(q, k, v, bi, slc_block_size=LP, cu_seqlens=cu, max_seqlen=ms))
    check(*nsa_cuda.window_attn(q, k, v, window_size=W, cu_seqlens=cu, max_seqlen=ms))

    o, aux = nsa_cuda.sparse_attn(q, k, v, *gates, **dict(KW, slc_num_blocks=5), cu_seqlens=cu,
                                  max_seqlen=ms, return_aux=True)
    assert o.shape == (B, T, Hq, Dv) and o.dtype == dtype and o.device.type == "meta"
    assert aux["block_indices"].shape == (B, T, Hkv, 5)
    for br in ("cmp", "slc", "win"):
        check(aux[f"o_{br}"], aux[f"lse_{br}"])
    # a gate None: its aux entries None, shapes unchanged
    o, aux = nsa_cuda.sparse_attn(q, k, v, None, gates[1], None, **KW, cu_seqlens=cu,
                                  max_seqlen=ms, return_aux=True)
    assert o.shape == (B, T, Hq, Dv)
    assert aux["o_cmp"] is None and aux["lse_cmp"] is None and aux["o_win"] is None
    assert aux["block_indices"].shape == (B, T, Hkv, N)


def test_meta_backward_ops():
    B, T, Hq, Hkv, Dk, Dv = 2, 40, 4, 2, 8, 6
    q, k, v = _meta(B, T, Hq, Dk), _meta(B, T, Hkv, Dk), _meta(B, T, Hkv, Dv)
    kc, vc = _meta(B, 9, Hkv, Dk), _meta(B, 9, Hkv, Dv)
    o, lse = _meta(B, T, Hq, Dv), _meta(B, Hq, T)
    bi = _meta(B, T, Hkv, 3, dtype=torch.int32)
    dq, dk, dv = ops.compressed_attn_bwd(o, lse, q, kc, vc, o, lse, None, T, L, D, SCALE)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, kc.shape, vc.shape)
    dq, dk, dv = ops.selected_attn_bwd(o, None, q, k, v, bi, o, lse, None, T, LP, SCALE)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    dq, dk, dv = ops.window_attn_bwd(o, lse, q, k, v, o, lse, None, T, W, SCALE)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    dx = ops.mean_compress_bwd(kc, k, None, L, D)
    assert dx.shape == k.shape and dx.device.type == "meta"


def test_meta_autograd():
    """Backward through sparse_attn on meta tensors gives gradients of the input shapes."""
    B, T = 1, 30
    x = dict(q=_meta(B, T, 4, 8), k=_meta(B, T, 2, 8), v=_meta(B, T, 2, 6),
             g_cmp=_meta(B, T, 4), g_slc=_meta(B, T, 4), g_win=_meta(B, T, 4))
    for t in x.values():
        t.requires_grad_()
    o = nsa_cuda.sparse_attn(*x.values(), **KW)
    o.sum().backward()
    for n, t in x.items():
        assert t.grad is not None and t.grad.shape == t.shape, n
