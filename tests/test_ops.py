"""Every public op against nsa_cuda.reference: outputs and gradients.

fp64 is compared exactly (1e-10); fp32/fp16/bf16 with the spec's rule
``max|x - ref| <= 2 * max|ref_lp - ref| + 1e-5`` (ref: fp64 reference, ref_lp: the
reference in the input dtype). Losses include the lse outputs, so gradients flow
through lse too.
"""
from __future__ import annotations

from typing import Callable, Dict

import pytest
import torch

import nsa_cuda
from nsa_cuda import reference as R

from conftest import (Cfg, assert_close, assert_close_exact, assert_selection_close,
                      detach_clone, grads_of, loss_weights, make_inputs, make_varlen_inputs,
                      op_sparse, op_select, positions_of, randn, ref_select, ref_sparse,
                      weighted_loss, _gen)

F64 = torch.float64

CFGS = {
    # the paper's l, d, l' scaled down in n and w so that T of a few hundred selects; G = 2
    "paper": Cfg(B=2, T=300, Hq=4, Hkv=2, Dk=16, Dv=8, l=32, d=16, lp=64, n=4, n_init=1,
                 n_local=2, w=128),
    # flash-linear-attention's setting l = d = l' = 64; G = 16
    "fla": Cfg(B=2, T=260, Hq=16, Hkv=1, Dk=8, Dv=12, l=64, d=64, lp=64, n=3, n_init=1,
               n_local=1, w=64),
    # T below l: no compressed block at all; G = 1
    "short": Cfg(B=2, T=20, Hq=2, Hkv=2, Dk=8, Dv=16, l=32, d=16, lp=64, n=4, n_init=1,
                 n_local=2, w=128),
    # T not a multiple of any block size, G = 4, a custom scale, n_init = 0
    "odd": Cfg(B=2, T=97, Hq=8, Hkv=2, Dk=12, Dv=20, l=16, d=8, lp=16, n=3, n_init=0,
               n_local=1, w=24, scale=0.3),
}
# (config, dtype): every config in fp64 (exact) and in the low-precision dtypes (spec rule)
CASES = [(c, dt) for c in CFGS for dt in (F64, torch.float32, torch.float16, torch.bfloat16)]
CASE_IDS = [f"{c}-{str(dt).replace('torch.', '')}" for c, dt in CASES]


def run_and_compare(fn: Callable[[str, Dict], Dict], inp64: Dict, dtype, what: str,
                    check_grads: bool = True):
    """Run ``fn('op', ...)`` in ``dtype`` and ``fn('ref', ...)`` in fp64 (and in ``dtype``),
    compare every output and the gradient of a weighted loss over all outputs w.r.t.
    every input that requires grad."""
    x = detach_clone(inp64, dtype)
    out = fn("op", x)
    ref_in = detach_clone(inp64)
    ref = fn("ref", ref_in)
    assert set(out) == set(ref)
    lp = None
    if dtype != F64:
        lp_in = detach_clone(inp64, dtype)
        lp = fn("ref", lp_in)
    for name in ref:
        if ref[name] is None:
            assert out[name] is None, f"{what}: {name} should be None"
            continue
        assert out[name] is not None, f"{what}: {name} is None"
        expected_dtype = ref[name].dtype if dtype == F64 else lp[name].dtype
        assert out[name].dtype == expected_dtype, f"{what}: {name} dtype {out[name].dtype}"
        assert_close(out[name], ref[name], None if lp is None else lp[name], f"{what} {name}")
    if not check_grads or not any(t.requires_grad for t in x.values()
                                  if isinstance(t, torch.Tensor)):
        return out, ref
    weights = loss_weights({n: t.shape for n, t in ref.items()
                            if t is not None and t.is_floating_point()})
    g = grads_of(weighted_loss(out, weights), x)
    g_ref = grads_of(weighted_loss(ref, weights), ref_in)
    g_lp = None if lp is None else grads_of(weighted_loss(lp, weights), lp_in)
    assert set(g) == set(g_ref) and g
    for name in g_ref:
        assert g[name].dtype == x[name].dtype and g[name].shape == x[name].shape
        assert_close(g[name], g_ref[name], None if g_lp is None else g_lp[name],
                     f"{what} d{name}")
    return out, ref


# --------------------------------------------------------------------------------------
# mean_compress
# --------------------------------------------------------------------------------------


def _mean_compress_fn(cfg, cu=None):
    def fn(impl, x):
        if impl == "op":
            y = nsa_cuda.mean_compress(x["x"], cfg.l, cfg.d, cu_seqlens=cu)
        else:
            y = R.mean_compress(x["x"], cfg.l, cfg.d, cu)
        return {"x_cmp": y}
    return fn


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_mean_compress(case):
    name, dtype = case
    cfg = CFGS[name]
    inp = {"x": make_inputs(cfg, seed=1)["k"].requires_grad_()}
    out, _ = run_and_compare(_mean_compress_fn(cfg), inp, dtype, f"mean_compress[{name}]")
    assert out["x_cmp"].shape == (cfg.B, R.num_cmp_blocks(cfg.T, cfg.l, cfg.d), cfg.Hkv, cfg.Dk)


def test_mean_compress_hand_derived():
    """l = 4, d = 2 on T = 9 rows of value t: block i is the mean of t in [2i, 2i+4)."""
    x = torch.arange(9, dtype=F64).view(1, 9, 1, 1).expand(1, 9, 1, 3).contiguous()
    y = nsa_cuda.mean_compress(x, 4, 2)
    assert y.shape == (1, 3, 1, 3)
    assert torch.equal(y[0, :, 0, 0], torch.tensor([1.5, 3.5, 5.5], dtype=F64))
    # backward: each x row gets 1/l per block containing it
    x.requires_grad_()
    nsa_cuda.mean_compress(x, 4, 2).sum().backward()
    expected = torch.tensor([1, 1, 2, 2, 2, 2, 1, 1, 0], dtype=F64) / 4
    assert torch.equal(x.grad[0, :, 0, 0], expected)


# --------------------------------------------------------------------------------------
# compressed_attn
# --------------------------------------------------------------------------------------


def _cmp_inputs(cfg, seed=2, extra_rows=0, B=None):
    gen = _gen(seed)
    B = cfg.B if B is None else B
    tc = R.num_cmp_blocks(cfg.T, cfg.l, cfg.d) + extra_rows
    return dict(q=randn((B, cfg.T, cfg.Hq, cfg.Dk), F64, gen).requires_grad_(),
                k_cmp=randn((B, tc, cfg.Hkv, cfg.Dk), F64, gen).requires_grad_(),
                v_cmp=randn((B, tc, cfg.Hkv, cfg.Dv), F64, gen).requires_grad_())


def _compressed_fn(cfg, cu=None):
    def fn(impl, x):
        if impl == "op":
            o, lse = nsa_cuda.compressed_attn(x["q"], x["k_cmp"], x["v_cmp"], **cfg.cmp_kw(),
                                              scale=cfg.scale, cu_seqlens=cu)
        else:
            o, lse = R.compressed_attn(x["q"], x["k_cmp"], x["v_cmp"], cfg.l, cfg.d, cfg.scale,
                                       cu)
        return {"o": o, "lse": lse}
    return fn


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_compressed_attn(case):
    name, dtype = case
    cfg = CFGS[name]
    out, _ = run_and_compare(_compressed_fn(cfg), _cmp_inputs(cfg), dtype,
                             f"compressed_attn[{name}]")
    # rows with nc(t) = 0: o = 0 and lse = -inf
    empty = min(cfg.l - 1, cfg.T)
    assert (out["o"][:, :empty] == 0).all()
    assert torch.isneginf(out["lse"][:, :, :empty]).all()
    assert out["lse"].dtype == (F64 if dtype == F64 else torch.float32)


def test_compressed_attn_extra_rows():
    """Caller-given k_cmp/v_cmp with more rows than Tc(T): extra rows are ignored and get
    zero gradient."""
    cfg = CFGS["paper"].with_(T=150)
    inp = _cmp_inputs(cfg, seed=5, extra_rows=4)
    x = detach_clone(inp)
    out = _compressed_fn(cfg)("op", x)
    weights = loss_weights({n: t.shape for n, t in out.items()})
    g = grads_of(weighted_loss(out, weights), x)
    tc = R.num_cmp_blocks(cfg.T, cfg.l, cfg.d)
    assert (g["k_cmp"][:, tc:] == 0).all() and (g["v_cmp"][:, tc:] == 0).all()
    # same as with the rows cut off
    cut = {n: (t[:, :tc] if n != "q" else t).detach().clone().requires_grad_()
           for n, t in inp.items()}
    out2 = _compressed_fn(cfg)("op", cut)
    for n in out:
        assert_close_exact(out[n], out2[n], n)
    run_and_compare(_compressed_fn(cfg), inp, F64, "compressed_attn[extra rows]")


# --------------------------------------------------------------------------------------
# select_blocks
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_select_blocks(case):
    name, dtype = case
    cfg = CFGS[name]
    inp = make_inputs(cfg, seed=3)
    q = inp["q"].to(dtype)
    k_cmp = R.mean_compress(inp["k"], cfg.l, cfg.d).to(dtype)
    bi = op_select(cfg, q, k_cmp)
    ref_bi, scores = ref_select(cfg, q, k_cmp)
    assert bi.shape == ref_bi.shape == (cfg.B, cfg.T, cfg.Hkv, cfg.n)
    ties = assert_selection_close(bi, ref_bi, scores, positions_of(cfg.T, cfg.B), cfg.lp, cfg.n,
                                  cfg.n_init, cfg.n_local)
    if dtype == F64:
        assert ties == 0 or ties < 0.01 * cfg.B * cfg.T * cfg.Hkv


# --------------------------------------------------------------------------------------
# selected_attn
# --------------------------------------------------------------------------------------


def _selected_fn(cfg, bi, cu=None):
    def fn(impl, x):
        if impl == "op":
            o, lse = nsa_cuda.selected_attn(x["q"], x["k"], x["v"], bi, slc_block_size=cfg.lp,
                                            scale=cfg.scale, cu_seqlens=cu)
        else:
            o, lse = R.selected_attn(x["q"], x["k"], x["v"], bi, cfg.lp, cfg.scale, cu)
        return {"o": o, "lse": lse}
    return fn


def _qkv(inp):
    return {n: inp[n] for n in ("q", "k", "v")}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_selected_attn(case):
    name, dtype = case
    cfg = CFGS[name]
    inp = make_inputs(cfg, seed=4, requires_grad=True)
    k_cmp = R.mean_compress(inp["k"].detach(), cfg.l, cfg.d)
    bi, _ = ref_select(cfg, inp["q"], k_cmp)
    run_and_compare(_selected_fn(cfg, bi), _qkv(inp), dtype, f"selected_attn[{name}]")


def _random_block_indices(cfg, dtype, seed, T=None, B=None):
    """Unsorted, -1 padded, out-of-range (negative, >= ceil(T/l'), huge) and duplicates."""
    gen = _gen(seed)
    T = cfg.T if T is None else T
    B = cfg.B if B is None else B
    nb = R.num_slc_blocks(T, cfg.lp)
    bi = torch.randint(-2, nb + 2, (B, T, cfg.Hkv, cfg.n), generator=gen, dtype=torch.int64)
    bi[..., 0] = bi[..., 1]  # duplicates
    bi[:, ::3, :, -1] = -1  # -1 padding
    bi[:, 1::5, :, -2] = 10 ** 6  # far out of range
    if dtype == torch.int64:
        bi[:, 2::7, :, -1] = 2 ** 40  # beyond int32
        bi[:, 3::7, :, -1] = -(2 ** 40)
    return bi.to(dtype)


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_selected_attn_caller_block_indices(idx_dtype):
    cfg = CFGS["odd"]
    inp = _qkv(make_inputs(cfg, seed=6, requires_grad=True))
    bi = _random_block_indices(cfg, idx_dtype, seed=7)
    run_and_compare(_selected_fn(cfg, bi), inp, F64, f"selected_attn[caller {idx_dtype}]")
    # rows whose listed blocks all lie in the future: empty (o = 0, lse = -inf), no NaN
    o, lse = nsa_cuda.selected_attn(inp["q"], inp["k"], inp["v"], bi, slc_block_size=cfg.lp,
                                    scale=cfg.scale)
    assert not torch.isnan(o).any()


def test_selected_attn_hand_derived():
    """All-zero q: uniform attention over the listed, causal keys."""
    B, T, H, D, lp = 1, 8, 1, 2, 2
    q = torch.zeros(B, T, H, D, dtype=F64)
    k = torch.randn(B, T, H, D, dtype=F64)
    v = torch.arange(T, dtype=F64).view(1, T, 1, 1).expand(B, T, H, D).contiguous()
    bi = torch.full((B, T, H, 2), -1, dtype=torch.int32)
    bi[0, :, 0, 0] = torch.arange(T) // lp  # the current block
    bi[0, 5, 0, 1] = 0  # t = 5 also sees block 0: keys 0, 1, 4, 5
    o, lse = nsa_cuda.selected_attn(q, k, v, bi, slc_block_size=lp)
    expected = torch.tensor([0, 0.5, 2, 2.5, 4, 2.5, 6, 6.5], dtype=F64)
    assert torch.allclose(o[0, :, 0, 0], expected, atol=1e-12, rtol=0)
    counts = torch.tensor([1, 2, 1, 2, 1, 4, 1, 2], dtype=F64)
    assert torch.allclose(lse[0, 0], counts.log(), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------
# window_attn
# --------------------------------------------------------------------------------------


def _window_fn(cfg, cu=None):
    def fn(impl, x):
        if impl == "op":
            o, lse = nsa_cuda.window_attn(x["q"], x["k"], x["v"], window_size=cfg.w,
                                          scale=cfg.scale, cu_seqlens=cu)
        else:
            o, lse = R.window_attn(x["q"], x["k"], x["v"], cfg.w, cfg.scale, cu)
        return {"o": o, "lse": lse}
    return fn


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_window_attn(case):
    name, dtype = case
    cfg = CFGS[name]
    run_and_compare(_window_fn(cfg), _qkv(make_inputs(cfg, seed=8, requires_grad=True)), dtype,
                    f"window_attn[{name}]")


def test_window_attn_hand_derived():
    """w = 3, q = 0: o[t] is the mean of v over [max(0, t-2), t]; lse = log(count)."""
    T = 6
    q = torch.zeros(1, T, 1, 4, dtype=F64)
    k = torch.randn(1, T, 1, 4, dtype=F64)
    v = torch.arange(T, dtype=F64).view(1, T, 1, 1).expand(1, T, 1, 2).contiguous()
    o, lse = nsa_cuda.window_attn(q, k, v, window_size=3)
    assert torch.allclose(o[0, :, 0, 1], torch.tensor([0, .5, 1, 2, 3, 4], dtype=F64), atol=1e-12)
    assert torch.allclose(lse[0, 0], torch.tensor([1, 2, 3, 3, 3, 3], dtype=F64).log(), atol=1e-12)


# --------------------------------------------------------------------------------------
# sparse_attn (return_aux) end to end
# --------------------------------------------------------------------------------------

AUX_KEYS = ("o_cmp", "o_slc", "o_win", "lse_cmp", "lse_slc", "lse_win")


def _sparse_fn(cfg, state, **kw):
    """sparse_attn as a dict of outputs. The reference runs with the block indices the op
    chose (checked separately with the tie rule), as the spec's end-to-end rule says."""
    def fn(impl, x):
        if impl == "op":
            o, aux = op_sparse(cfg, x, **kw)
            state["bi"] = aux["block_indices"]
        else:
            rkw = dict(kw)
            if state.get("bi") is not None:
                rkw["block_indices"] = state["bi"]
            o, aux = ref_sparse(cfg, x, **rkw)
        out = {"o": o}
        out.update({n: aux[n] for n in AUX_KEYS})
        return out
    return fn


def _check_sparse_selection(cfg, inp64, dtype, bi, cu=None):
    """The op's block indices against the reference's selection (tie rule), computed on the
    inputs in the op's dtype."""
    q = inp64["q"].detach().to(dtype)
    if inp64.get("k_cmp") is not None:
        k_cmp = inp64["k_cmp"].detach().to(dtype)
    else:
        k_cmp = R.mean_compress(inp64["k"].detach().to(dtype), cfg.l, cfg.d, cu)
    ref_bi, scores = ref_select(cfg, q, k_cmp, cu)
    assert_selection_close(bi, ref_bi, scores, positions_of(q.shape[1], q.shape[0], cu), cfg.lp,
                           cfg.n, cfg.n_init, cfg.n_local)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sparse_attn(case):
    name, dtype = case
    cfg = CFGS[name]
    inp = make_inputs(cfg, seed=9, requires_grad=True)
    state = {}
    out, _ = run_and_compare(_sparse_fn(cfg, state), inp, dtype, f"sparse_attn[{name}]")
    assert out["o"].dtype == dtype
    _check_sparse_selection(cfg, inp, dtype, state["bi"])


def test_sparse_attn_caller_kv_cmp_extra_rows():
    cfg = CFGS["paper"].with_(T=200)
    inp = make_inputs(cfg, seed=10, requires_grad=True)
    c = _cmp_inputs(cfg, seed=11, extra_rows=3)
    inp["k_cmp"], inp["v_cmp"] = c["k_cmp"], c["v_cmp"]
    state = {}
    run_and_compare(_sparse_fn(cfg, state), inp, F64, "sparse_attn[k_cmp extra rows]")
    _check_sparse_selection(cfg, inp, F64, state["bi"])


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_sparse_attn_caller_block_indices(idx_dtype):
    cfg = CFGS["paper"].with_(T=150)
    inp = make_inputs(cfg, seed=12, requires_grad=True)
    bi = _random_block_indices(cfg, idx_dtype, seed=13)
    state = {}
    out, _ = run_and_compare(_sparse_fn(cfg, state, block_indices=bi), inp, F64,
                             f"sparse_attn[caller {idx_dtype}]")
    assert state["bi"].dtype == torch.int32
    # aux block_indices are the caller's (int64 converted; out-of-int32 entries unused)
    used = state["bi"].long()
    nb = R.num_slc_blocks(cfg.T, cfg.lp)
    valid = (bi >= 0) & (bi < nb)
    assert torch.equal(torch.where(valid, used, -1), torch.where(valid, bi.long(), -1))


# --------------------------------------------------------------------------------------
# gates None
# --------------------------------------------------------------------------------------

GATE_COMBOS = [(c, s, w) for c in (0, 1) for s in (0, 1) for w in (0, 1) if not (c and s and w)]


@pytest.mark.parametrize("combo", GATE_COMBOS, ids=lambda c: "".join("csw"[i] if on else "-"
                                                                     for i, on in enumerate(c)))
def test_sparse_attn_gates_none(combo):
    cfg = CFGS["odd"].with_(T=60)
    inp = make_inputs(cfg, seed=14, requires_grad=True)
    for on, gname in zip(combo, ("g_cmp", "g_slc", "g_win")):
        if not on:
            inp[gname] = None
    o, aux = op_sparse(cfg, inp)
    branch_on = dict(zip(("cmp", "slc", "win"), combo))
    for br, on in branch_on.items():
        for key in (f"o_{br}", f"lse_{br}"):
            assert (aux[key] is not None) == bool(on), f"aux[{key}] with branch {br} on={on}"
    assert (aux["block_indices"] is not None) == bool(combo[1])
    assert o.shape == (cfg.B, cfg.T, cfg.Hq, cfg.Dv) and o.dtype == F64
    if not any(combo):
        assert (o == 0).all()
        return
    state = {}
    run_and_compare(_sparse_fn(cfg, state), inp, F64, f"sparse_attn[gates {combo}]")


def test_sparse_attn_gates_linear():
    """o = g_cmp o_cmp + g_slc o_slc + g_win o_win: the branch-only calls add up."""
    cfg = CFGS["odd"].with_(T=70)
    inp = make_inputs(cfg, seed=15)
    full, aux = op_sparse(cfg, inp)
    parts = []
    for keep in ("g_cmp", "g_slc", "g_win"):
        x = dict(inp)
        for gname in ("g_cmp", "g_slc", "g_win"):
            if gname != keep:
                x[gname] = None
        parts.append(op_sparse(cfg, x)[0])
    assert_close_exact(parts[0] + parts[1] + parts[2], full, "sum of branches")
    assert_close_exact(inp["g_win"].unsqueeze(-1) * aux["o_win"], parts[2], "gated window")


# --------------------------------------------------------------------------------------
# varlen
# --------------------------------------------------------------------------------------

VCFG = Cfg(B=1, Hq=4, Hkv=1, Dk=16, Dv=8, l=32, d=16, lp=32, n=3, n_init=1, n_local=1, w=40)
SEQLENS = [70, 1, 20, 130, 33]  # one shorter than l, one of length 1


def _varlen_case(seed):
    inp = make_varlen_inputs(VCFG, SEQLENS, seed=seed, requires_grad=True)
    cu = inp.pop("cu_seqlens")
    return inp, cu


@pytest.mark.parametrize("op", ["mean_compress", "compressed_attn", "select_blocks",
                                "selected_attn", "window_attn", "sparse_attn"])
def test_varlen_against_reference(op):
    inp, cu = _varlen_case(seed=16)
    cfg = VCFG
    if op == "mean_compress":
        out, _ = run_and_compare(_mean_compress_fn(cfg, cu), {"x": inp["k"]}, F64, "varlen mc")
        assert out["x_cmp"].shape == (1, sum(SEQLENS) // cfg.d, cfg.Hkv, cfg.Dk)
    elif op == "compressed_attn":
        x = {"q": inp["q"],
             "k_cmp": R.mean_compress(inp["k"].detach(), cfg.l, cfg.d, cu).requires_grad_(),
             "v_cmp": R.mean_compress(inp["v"].detach(), cfg.l, cfg.d, cu).requires_grad_()}
        run_and_compare(_compressed_fn(cfg, cu), x, F64, "varlen compressed_attn")
    elif op == "select_blocks":
        k_cmp = R.mean_compress(inp["k"].detach(), cfg.l, cfg.d, cu)
        bi = op_select(cfg, inp["q"], k_cmp, cu)
        ref_bi, scores = ref_select(cfg, inp["q"], k_cmp, cu)
        assert_selection_close(bi, ref_bi, scores, positions_of(sum(SEQLENS), 1, cu), cfg.lp,
                               cfg.n, cfg.n_init, cfg.n_local)
    elif op == "selected_attn":
        k_cmp = R.mean_compress(inp["k"].detach(), cfg.l, cfg.d, cu)
        bi, _ = ref_select(cfg, inp["q"], k_cmp, cu)
        run_and_compare(_selected_fn(cfg, bi, cu), _qkv(inp), F64, "varlen selected_attn")
    elif op == "window_attn":
        run_and_compare(_window_fn(cfg, cu), _qkv(inp), F64, "varlen window_attn")
    else:
        inp["cu_seqlens"] = cu
        state = {}
        run_and_compare(_sparse_fn(cfg, state), inp, F64, "varlen sparse_attn")
        _check_sparse_selection(cfg, inp, F64, state["bi"], cu)


def test_varlen_sparse_attn_low_precision():
    inp, cu = _varlen_case(seed=17)
    inp["cu_seqlens"] = cu
    state = {}
    run_and_compare(_sparse_fn(VCFG, state, max_seqlen=max(SEQLENS)), inp, torch.bfloat16,
                    "varlen sparse_attn bf16")
    _check_sparse_selection(VCFG, inp, torch.bfloat16, state["bi"], cu)


def test_varlen_equals_separate_calls():
    """Packed varlen == one batch-mode call per sequence (outputs, aux and gradients)."""
    inp, cu = _varlen_case(seed=18)
    cfg = VCFG
    weights = loss_weights({"o": (1, sum(SEQLENS), cfg.Hq, cfg.Dv)}, seed=3)
    x = detach_clone(inp)
    o, aux = op_sparse(cfg, dict(x, cu_seqlens=cu), max_seqlen=max(SEQLENS))
    g = grads_of((o * weights["o"]).sum() + aux["lse_win"].sum(), x)
    bounds = cu.tolist()
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        xs = {n: t.detach()[:, a:b].clone().requires_grad_() for n, t in inp.items()}
        os_, auxs = op_sparse(cfg, xs)
        gs = grads_of((os_ * weights["o"][:, a:b]).sum() + auxs["lse_win"].sum(), xs)
        assert_close_exact(o[:, a:b], os_, f"seq {i} o", tol=1e-12)
        for key in AUX_KEYS:
            ref = auxs[key]
            got = aux[key][:, :, a:b] if key.startswith("lse") else aux[key][:, a:b]
            assert_close_exact(got, ref, f"seq {i} {key}", tol=1e-12)
        assert torch.equal(aux["block_indices"][:, a:b], auxs["block_indices"]), f"seq {i} bi"
        for n in gs:
            assert_close_exact(g[n][:, a:b], gs[n], f"seq {i} d{n}", tol=1e-12)


def test_varlen_mean_compress_layout():
    """Sequence m's blocks start at row sum_{m'<m} Tc(len_m'); rows after them are zero."""
    inp, cu = _varlen_case(seed=19)
    cfg = VCFG
    packed = nsa_cuda.mean_compress(inp["k"].detach(), cfg.l, cfg.d, cu_seqlens=cu)
    bounds = cu.tolist()
    row = 0
    for a, b in zip(bounds, bounds[1:]):
        sep = nsa_cuda.mean_compress(inp["k"].detach()[:, a:b].contiguous(), cfg.l, cfg.d)
        tc = sep.shape[1]
        assert tc == R.num_cmp_blocks(b - a, cfg.l, cfg.d)
        assert_close_exact(packed[:, row:row + tc], sep, "packed block rows", tol=1e-14)
        row += tc
    assert (packed[:, row:] == 0).all()


def test_multithreaded_matches_single_thread():
    """The suite runs with one intra-op thread (conftest); here the kernels' parallel loops
    run with several and must give the same outputs and gradients."""
    cfg = CFGS["paper"].with_(T=260)
    inp = make_inputs(cfg, seed=20, requires_grad=True)
    results = []
    for threads in (1, 4):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            x = detach_clone(inp)
            o, aux = op_sparse(cfg, x)
            loss = (o * o).sum() + aux["lse_cmp"].nan_to_num(0, 0, 0).sum() \
                + aux["lse_slc"].sum()
            results.append((o, aux, grads_of(loss, x)))
        finally:
            torch.set_num_threads(prev)
    # Bitwise: every sum is split by the shape alone (the backward's query slices
    # included), never by the thread count.
    (o1, a1, g1), (o2, a2, g2) = results
    assert torch.equal(o2, o1), "o"
    assert torch.equal(a1["block_indices"], a2["block_indices"])
    for key in AUX_KEYS:
        assert torch.equal(a2[key], a1[key]), key
    for n in g1:
        assert torch.equal(g2[n], g1[n]), f"d{n}"


def test_backward_in_many_waves_matches(monkeypatch):
    """The CPU backward holds its dk/dv slice buffers for a wave of (sequence, KV
    head) tasks at a time (about 64 MB). A one-byte budget (NSA_CPU_BWD_WAVE_BYTES)
    makes every task its own wave, refilling the buffers between waves: the
    gradients must be the same bits."""
    cfg = CFGS["paper"].with_(T=200)  # B = 2, Hkv = 2: four tasks
    inp = make_inputs(cfg, seed=21, requires_grad=True)
    grads = []
    for budget in (None, "1"):
        if budget is None:
            monkeypatch.delenv("NSA_CPU_BWD_WAVE_BYTES", raising=False)
        else:
            monkeypatch.setenv("NSA_CPU_BWD_WAVE_BYTES", budget)
        x = detach_clone(inp)
        o, aux = op_sparse(cfg, x)
        loss = (o * o).sum() + aux["lse_slc"].sum()
        grads.append(grads_of(loss, x))
    for n in grads[0]:
        assert torch.equal(grads[1][n], grads[0][n]), f"d{n}"


@pytest.mark.parametrize("scale", [None, 0.1, 0.3], ids=str)
def test_scale_not_rounded_to_fp32(scale):
    """Regression: the kernels once kept `scale` as a float32 in their params, so fp64
    results were off by ~1e-8 whenever scale (default Dk ** -0.5) is not exact in fp32."""
    cfg = Cfg(B=1, T=40, Hq=2, Hkv=1, Dk=8, Dv=4, l=8, d=4, lp=8, n=2, n_init=0, n_local=1,
              w=16, scale=scale)
    inp = make_inputs(cfg, seed=21)
    o, lse = nsa_cuda.window_attn(inp["q"], inp["k"], inp["v"], window_size=cfg.w, scale=scale)
    ro, rlse = R.window_attn(inp["q"], inp["k"], inp["v"], cfg.w, scale)
    assert_close_exact(o, ro, "o")
    assert_close_exact(lse, rlse, "lse")


def test_fp32_kv_gradient_accumulation():
    """fp32 dk/dv sum over every query of every head of a group (G * T terms). Accumulated
    serially in fp32 they miss the spec's rule as G * T grows (measured: 2-4x over the
    bound at G = 32, T = 512); accumulating dk/dv in double on the CPU meets it."""
    cfg = Cfg(B=1, T=512, Hq=32, Hkv=1, Dk=8, Dv=8, w=512)
    run_and_compare(_window_fn(cfg), _qkv(make_inputs(cfg, seed=0, requires_grad=True)),
                    torch.float32, "window_attn[G=32, T=512] fp32")


_ISA_SCRIPT = r"""
import sys, torch, nsa_cuda
torch.manual_seed(7)
B, T, Hq, Hkv, D = 1, 300, 4, 2, 32
q, k, v = (torch.randn(B, T, h, D, dtype=torch.float64, requires_grad=True) for h in (Hq, Hkv, Hkv))
gates = torch.rand(3, B, T, Hq, dtype=torch.float64).unbind(0)
o = nsa_cuda.sparse_attn(q, k, v, *gates, cmp_block_size=16, cmp_stride=8, slc_block_size=32,
                         slc_num_blocks=4, window_size=64)
o.square().sum().backward()
torch.save([o.detach(), q.grad, k.grad, v.grad], sys.argv[1])
"""


@pytest.mark.parametrize("baseline", ["0", "1"])
def test_cpu_isa_copies_agree(tmp_path, baseline):
    """The CPU loops exist as an AVX2/FMA copy and a baseline copy, picked at run time;
    NSA_CPU_BASELINE=1 forces the baseline. Each copy, in its own process, must give
    the fp64 outputs and gradients of this process's copy to rounding."""
    import os
    import subprocess
    import sys
    path = str(tmp_path / "out.pt")
    env = dict(os.environ, NSA_CPU_BASELINE=baseline)
    run = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, path], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = torch.load(path)
    torch.manual_seed(7)
    B, T, Hq, Hkv, D = 1, 300, 4, 2, 32
    q, k, v = (torch.randn(B, T, h, D, dtype=torch.float64, requires_grad=True)
               for h in (Hq, Hkv, Hkv))
    gates = torch.rand(3, B, T, Hq, dtype=torch.float64).unbind(0)
    o = nsa_cuda.sparse_attn(q, k, v, *gates, cmp_block_size=16, cmp_stride=8,
                             slc_block_size=32, slc_num_blocks=4, window_size=64)
    o.square().sum().backward()
    for name, a, b in zip(("o", "dq", "dk", "dv"), theirs, [o.detach(), q.grad, k.grad, v.grad]):
        assert_close_exact(a, b, name, tol=1e-11)


def _bwd_op_inputs(varlen, seed, lengths, batch_T):
    """Small fp64 inputs for the backward-op tests, G = 2, Dk = 8, Dv = 6, l = 8, d = 4:
    (generator, cu_seqlens, max_seqlen, q, k, v, k_cmp, v_cmp). Batch mode: two entries
    of batch_T tokens; varlen: `lengths` packed, with three padding rows after them."""
    from conftest import make_cu_seqlens
    ops = torch.ops.nsa_cuda
    gen = torch.Generator().manual_seed(seed)
    B, T = (1, sum(lengths) + 3) if varlen else (2, batch_T)
    cu = make_cu_seqlens(lengths) if varlen else None
    ms = max(lengths) if varlen else T
    q = torch.randn(B, T, 4, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, 2, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, 2, 6, generator=gen, dtype=torch.float64)
    return gen, cu, ms, q, k, v, ops.mean_compress(k, cu, 8, 4), ops.mean_compress(v, cu, 8, 4)


@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_bwd_ops_add_given_gradients(varlen):
    """dq_in, dk_in, dv_in are added to a backward op's gradients (the CPU adds after
    its kernel; CUDA in the epilogue), padding rows of varlen included."""
    ops = torch.ops.nsa_cuda
    gen, cu, ms, q, k, v, kc, vc = _bwd_op_inputs(varlen, 7, [9, 30], 33)
    B, T = q.shape[:2]
    bi = torch.zeros(B, T, 2, 2, dtype=torch.int32)
    bi[..., 1] = -1
    for fwd, bwd, kk, vv, extra, sizes in (
            (ops.compressed_attn_fwd, ops.compressed_attn_bwd, kc, vc, (), (8, 4)),
            (ops.selected_attn_fwd, ops.selected_attn_bwd, k, v, (bi,), (8,)),
            (ops.window_attn_fwd, ops.window_attn_bwd, k, v, (), (5,))):
        o, lse = fwd(q, kk, vv, *extra, cu, ms, *sizes, 0.4)
        args = (torch.randn(o.shape, generator=gen, dtype=o.dtype), None, q, kk, vv, *extra,
                o, lse, cu, ms, *sizes, 0.4)
        base = bwd(*args)
        added = [torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in (q, kk, vv)]
        for n, got, b, a in zip(("dq", "dk", "dv"), bwd(*args, *added), base, added):
            torch.testing.assert_close(got, b + a, rtol=0, atol=1e-15, msg=n)
        dq_only = bwd(*args, added[0])
        torch.testing.assert_close(dq_only[0], base[0] + added[0], rtol=0, atol=1e-15)
        assert torch.equal(dq_only[1], base[1]) and torch.equal(dq_only[2], base[2])


def test_given_delta_and_gate_row_dots():
    """gate_combine_bwd's row dots are rowsum(o * d o) in lse's layout, and a backward op
    given them as delta (dlse subtracted inside) matches the op that computes its own."""
    ops = torch.ops.nsa_cuda
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 29, 4, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 29, 2, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 29, 2, 6, generator=gen, dtype=torch.float64)
    g = torch.rand(2, 29, 4, generator=gen, dtype=torch.float64)
    o, lse = ops.window_attn_fwd(q, k, v, None, 29, 5, 0.3)
    do = torch.randn(o.shape, generator=gen, dtype=o.dtype)
    dlse = torch.randn(lse.shape, generator=gen, dtype=lse.dtype)
    d_o, dg, dot = ops.gate_combine_bwd(do, [o], [g], True)
    torch.testing.assert_close(dot, (o * d_o).sum(-1).transpose(1, 2), rtol=0, atol=1e-13)
    torch.testing.assert_close(dg, (o * do).sum(-1), rtol=0, atol=1e-13)
    want = ops.window_attn_bwd(d_o, dlse, q, k, v, o, lse, None, 29, 5, 0.3)
    got = ops.window_attn_bwd(d_o, dlse, q, k, v, o, lse, None, 29, 5, 0.3, delta=dot)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    moved = ops.window_attn_bwd(d_o, dlse, q, k, v, o, lse, None, 29, 5, 0.3, delta=dot + 1)
    assert not torch.allclose(moved[0], want[0])  # the given delta is what the op uses


def test_sparse_attn_gates_only_skip_branch_backward():
    """With only the gates requiring grad, the backward runs the gate kernel alone (no
    branch backward op) and gives the gates the gradients of the full backward."""
    gen = torch.Generator().manual_seed(17)
    q = torch.randn(1, 40, 4, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 40, 2, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 40, 2, 6, generator=gen, dtype=torch.float64)
    gates = [torch.rand(1, 40, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    do = torch.randn(1, 40, 4, 6, generator=gen, dtype=torch.float64)
    kw = dict(cmp_block_size=8, cmp_stride=4, slc_block_size=8, slc_num_blocks=3,
              window_size=6)

    def gate_grads(train_qkv):
        xs = [x.clone().requires_grad_(train_qkv) for x in (q, k, v)]
        gs = [g.clone().requires_grad_(True) for g in gates]
        o = nsa_cuda.sparse_attn(*xs, *gs, **kw)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            grads = torch.autograd.grad((o * do).sum(), gs)
        return grads, {e.name for e in prof.events()}

    full, full_ops = gate_grads(True)
    only, only_ops = gate_grads(False)
    assert "nsa_cuda::window_attn_bwd" in full_ops  # the profiler sees the ops
    assert not {n for n in only_ops if n.startswith("nsa_cuda::") and n.endswith("_attn_bwd")}
    for a, b in zip(only, full):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("varlen", [False, True])
def test_bwd_dout_scale(varlen):
    """dout_scale g makes a backward op's output gradient g * dout (negative and zero
    gates, a strided gate, dlse, a given delta): the same gradients as
    the op given g * dout; and gate_combine_bwd without output gradients gives
    rowsum(o * g do) = g * d_gate as the row dots."""
    ops = torch.ops.nsa_cuda
    gen, cu, ms, q, k, v, kc, vc = _bwd_op_inputs(varlen, 13, [11, 26], 31)
    B, T = q.shape[:2]
    bi = torch.randint(-1, 3, (B, T, 2, 2), generator=gen, dtype=torch.int32)
    # A [B, Hq, T] tensor seen as [B, T, Hq]: strided; one gate 0, some negative.
    g = torch.randn(B, 4, T, generator=gen, dtype=torch.float64).transpose(1, 2)
    g[:, 3, 1] = 0
    for fwd, bwd, kk, vv, extra, sizes in (
            (ops.compressed_attn_fwd, ops.compressed_attn_bwd, kc, vc, (), (8, 4)),
            (ops.selected_attn_fwd, ops.selected_attn_bwd, k, v, (bi,), (8,)),
            (ops.window_attn_fwd, ops.window_attn_bwd, k, v, (), (5,))):
        o, lse = fwd(q, kk, vv, *extra, cu, ms, *sizes, 0.4)
        do = torch.randn(o.shape, generator=gen, dtype=o.dtype)
        dlse = torch.randn(lse.shape, generator=gen, dtype=lse.dtype) * lse.isfinite()
        rest = (q, kk, vv, *extra, o, lse, cu, ms, *sizes, 0.4)
        want = bwd(g.unsqueeze(-1) * do, dlse, *rest)
        got = bwd(do, dlse, *rest, dout_scale=g)
        (dg,) = ops.gate_combine_bwd(do, [o], [g], False, False)
        _, dot = ops.gate_combine_bwd(do, [o], [g], True, False)
        torch.testing.assert_close(dot, (g * dg).transpose(1, 2), rtol=0, atol=0)
        given = bwd(do, dlse, *rest, delta=dot, dout_scale=g)
        for n, a, b, c in zip(("dq", "dk", "dv"), got, want, given):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-13, msg=n)
            torch.testing.assert_close(c, b, rtol=0, atol=1e-13, msg=n + " (given delta)")
        assert not torch.allclose(got[0], bwd(do, dlse, *rest)[0])  # the scale is used
    with pytest.raises(RuntimeError, match="dout_scale must be a floating-point"):
        ops.window_attn_bwd(do, None, q, k, v, o, lse, cu, ms, 5, 0.4, dout_scale=g[:, :-1])


def test_varlen_padding_rows_cleared():
    """Rows past cu_seqlens[-1] belong to no sequence: every forward op gives them
    o = 0 and lse = -inf (an empty row's values), whatever memory it was handed (a NaN left there
    would reach the gate gradients through rowsum(o * do))."""
    ops = torch.ops.nsa_cuda
    gen, cu, ms, q, k, v, kc, vc = _bwd_op_inputs(True, 3, [11, 26], 31)
    T, total = q.shape[1], int(cu[-1])
    bi = torch.randint(-1, 3, (1, T, 2, 2), generator=gen, dtype=torch.int32)
    for fwd, kk, vv, extra, sizes in ((ops.compressed_attn_fwd, kc, vc, (), (8, 4)),
                                      (ops.selected_attn_fwd, k, v, (bi,), (8,)),
                                      (ops.window_attn_fwd, k, v, (), (5,))):
        for _ in range(3):  # freed NaN buffers of the outputs' sizes, for at::empty to reuse
            dirty = [torch.full((1, T, 4, vv.shape[-1]), float("nan"), dtype=q.dtype),
                     torch.full((1, 4, T), float("nan"), dtype=q.dtype)]
            del dirty
            o, lse = fwd(q, kk, vv, *extra, cu, ms, *sizes, 0.4)
            assert bool((o[:, total:] == 0).all()) and bool(torch.isneginf(lse[:, :, total:]).all())
            assert not o[:, :total].isnan().any()
