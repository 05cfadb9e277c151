"""Property-based test: random shapes and hyperparameters within the spec's constraints,
every op against the reference in fp64 (outputs, and the gradients of sparse_attn)."""
from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import nsa_cuda  # noqa: E402
from nsa_cuda import reference as R  # noqa: E402

from conftest import (Cfg, assert_close_exact, assert_selection_close, detach_clone,  # noqa: E402
                      grads_of, loss_weights, make_cu_seqlens, make_inputs, op_sparse,
                      positions_of, ref_select, ref_sparse, weighted_loss)

F64 = torch.float64


@st.composite
def problems(draw):
    d = draw(st.sampled_from([1, 2, 4, 8]))
    l = d * draw(st.integers(1, 4))
    lp = d * draw(st.integers(1, 4))
    n = draw(st.integers(1, 5))
    n_local = draw(st.integers(1, n))
    n_init = draw(st.integers(0, n - n_local))
    hkv = draw(st.integers(1, 2))
    g = draw(st.sampled_from([1, 2, 3, 4]))
    cfg = Cfg(B=1, T=0, Hq=hkv * g, Hkv=hkv, Dk=draw(st.integers(1, 9)),
              Dv=draw(st.integers(1, 9)), l=l, d=d, lp=lp, n=n, n_init=n_init, n_local=n_local,
              w=draw(st.integers(1, 40)),
              scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))))
    if draw(st.booleans()):  # varlen, possibly with empty sequences
        seqlens = draw(st.lists(st.integers(0, 60), min_size=1, max_size=4))
        cfg = cfg.with_(T=sum(seqlens))
    else:
        seqlens = None
        cfg = cfg.with_(B=draw(st.integers(1, 2)), T=draw(st.integers(1, 90)))
    return cfg, seqlens, draw(st.integers(0, 2 ** 31 - 1))


def _check(cfg: Cfg, seqlens, seed):
    inp = make_inputs(cfg, seed=seed, requires_grad=True)
    cu = None if seqlens is None else make_cu_seqlens(seqlens)
    inp["cu_seqlens"] = cu
    q, k, v = (inp[n].detach() for n in ("q", "k", "v"))
    pos = positions_of(cfg.T, cfg.B, cu)

    # mean_compress
    k_cmp = nsa_cuda.mean_compress(k, cfg.l, cfg.d, cu_seqlens=cu)
    v_cmp = nsa_cuda.mean_compress(v, cfg.l, cfg.d, cu_seqlens=cu)
    assert_close_exact(k_cmp, R.mean_compress(k, cfg.l, cfg.d, cu), "mean_compress k")
    assert_close_exact(v_cmp, R.mean_compress(v, cfg.l, cfg.d, cu), "mean_compress v")

    # compressed_attn
    o, lse = nsa_cuda.compressed_attn(q, k_cmp, v_cmp, **cfg.cmp_kw(), scale=cfg.scale,
                                      cu_seqlens=cu)
    ro, rlse = R.compressed_attn(q, k_cmp, v_cmp, cfg.l, cfg.d, cfg.scale, cu)
    assert_close_exact(o, ro, "compressed_attn o")
    assert_close_exact(lse, rlse, "compressed_attn lse")

    # select_blocks (tie rule)
    bi = nsa_cuda.select_blocks(q, k_cmp, lse, **cfg.sel_kw(), scale=cfg.scale, cu_seqlens=cu)
    ref_bi, scores = ref_select(cfg, q, k_cmp, cu)
    assert_selection_close(bi, ref_bi, scores, pos, cfg.lp, cfg.n, cfg.n_init, cfg.n_local)

    # selected_attn, window_attn
    o, lse = nsa_cuda.selected_attn(q, k, v, ref_bi, slc_block_size=cfg.lp, scale=cfg.scale,
                                    cu_seqlens=cu)
    ro, rlse = R.selected_attn(q, k, v, ref_bi, cfg.lp, cfg.scale, cu)
    assert_close_exact(o, ro, "selected_attn o")
    assert_close_exact(lse, rlse, "selected_attn lse")
    o, lse = nsa_cuda.window_attn(q, k, v, window_size=cfg.w, scale=cfg.scale, cu_seqlens=cu)
    ro, rlse = R.window_attn(q, k, v, cfg.w, cfg.scale, cu)
    assert_close_exact(o, ro, "window_attn o")
    assert_close_exact(lse, rlse, "window_attn lse")

    # sparse_attn end to end, outputs and gradients (reference with the op's selection)
    x = detach_clone(inp)
    o, aux = op_sparse(cfg, x)
    assert_selection_close(aux["block_indices"], ref_bi, scores, pos, cfg.lp, cfg.n,
                           cfg.n_init, cfg.n_local)
    xr = detach_clone(inp)
    ro, raux = ref_sparse(cfg, xr, block_indices=aux["block_indices"])
    out = dict(o=o, **{key: aux[key] for key in raux if key != "block_indices"})
    ref = dict(o=ro, **{key: raux[key] for key in raux if key != "block_indices"})
    for key in ref:
        assert_close_exact(out[key], ref[key], f"sparse_attn {key}")
    weights = loss_weights({key: t.shape for key, t in ref.items()}, seed=seed % 1000)
    g = grads_of(weighted_loss(out, weights), x)
    g_ref = grads_of(weighted_loss(ref, weights), xr)
    for name in g_ref:
        assert_close_exact(g[name], g_ref[name], f"sparse_attn d{name}")


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(problems())
def test_every_op_matches_reference(problem):
    _check(*problem)


@pytest.mark.parametrize("problem", [
    # fixed corner cases, also run without hypothesis' shrinking
    (Cfg(B=1, T=1, Hq=1, Hkv=1, Dk=1, Dv=1, l=1, d=1, lp=1, n=1, n_init=0, n_local=1, w=1),
     None, 1),
    (Cfg(B=1, T=0, Hq=2, Hkv=1, Dk=3, Dv=2, l=4, d=2, lp=4, n=2, n_init=1, n_local=1, w=3),
     [0, 5, 0, 1], 2),
    (Cfg(B=2, T=33, Hq=3, Hkv=1, Dk=5, Dv=7, l=8, d=8, lp=8, n=2, n_init=1, n_local=1, w=1),
     None, 3),
], ids=["all-ones", "varlen-empty-seqs", "w1"])
def test_corner_cases(problem):
    cfg, seqlens, seed = problem
    if seqlens is not None:
        cfg = cfg.with_(T=sum(seqlens))
    _check(cfg, seqlens, seed)
