"""Block selection: against the reference with the tie rule, and hand-derived cases
(exact ties, forced blocks, J + 1 <= n, layout)."""
from __future__ import annotations

import pytest
import torch

import nsa_cuda
from nsa_cuda import reference as R

from conftest import (Cfg, assert_selection_close, check_selection_layout, make_inputs,
                      make_varlen_inputs, op_select, positions_of, ref_select)

F64 = torch.float64

SEL_CFGS = [
    # paper ratios (weights 1,2,2,2,1), more init/local blocks, G = 3
    Cfg(B=2, T=230, Hq=6, Hkv=2, Dk=8, Dv=8, l=32, d=16, lp=64, n=5, n_init=2, n_local=2),
    # l = d < l': each compressed block lies inside one selection block
    Cfg(B=1, T=200, Hq=2, Hkv=1, Dk=8, Dv=8, l=16, d=16, lp=32, n=3, n_init=1, n_local=1),
    # l > l': a compressed block spans several selection blocks
    Cfg(B=1, T=150, Hq=4, Hkv=4, Dk=8, Dv=8, l=32, d=8, lp=16, n=4, n_init=0, n_local=3),
    # n = n_init + n_local: only forced blocks
    Cfg(B=1, T=120, Hq=4, Hkv=2, Dk=8, Dv=8, l=16, d=8, lp=16, n=3, n_init=1, n_local=2),
]


@pytest.mark.parametrize("cfg", SEL_CFGS, ids=str)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
def test_selection_matches_reference(cfg, dtype):
    inp = make_inputs(cfg, seed=21)
    q = inp["q"].to(dtype)
    k_cmp = R.mean_compress(inp["k"], cfg.l, cfg.d).to(dtype)
    bi = op_select(cfg, q, k_cmp)
    ref_bi, scores = ref_select(cfg, q, k_cmp)
    assert_selection_close(bi, ref_bi, scores, positions_of(cfg.T, cfg.B), cfg.lp, cfg.n,
                           cfg.n_init, cfg.n_local)
    if dtype == F64:  # no ties in fp64 on random inputs: identical
        assert torch.equal(bi, ref_bi)


def test_selection_uses_given_lse():
    """select_blocks takes P from lse_cmp: a wrong lse_cmp (shifted per head) reweights the
    heads of a group, so the selection differs from the one with the true lse."""
    cfg = Cfg(B=1, T=256, Hq=4, Hkv=1, Dk=8, Dv=8, l=16, d=16, lp=16, n=3, n_init=0,
              n_local=1)
    inp = make_inputs(cfg, seed=22)
    k_cmp = R.mean_compress(inp["k"], cfg.l, cfg.d)
    _, lse = nsa_cuda.compressed_attn(inp["q"], k_cmp, k_cmp, **cfg.cmp_kw())
    good = op_select(cfg, inp["q"], k_cmp, lse_cmp=lse)
    shift = torch.tensor([0.0, 5.0, 5.0, 5.0], dtype=F64).view(1, 4, 1)
    bad = op_select(cfg, inp["q"], k_cmp, lse_cmp=lse + shift)
    assert not torch.equal(good, bad)


def _hand_uniform_selection(T, lp, n, n_init, n_local):
    """Expected selection when every candidate scores the same (or the visible ones the
    same and the others 0, with the visible ones first): forced blocks, then the smallest
    remaining j."""
    out = torch.full((T, n), -1, dtype=torch.int32)
    for t in range(T):
        J = t // lp
        cand = list(range(J + 1))
        forced = [j for j in cand if j < n_init or j > J - n_local]
        rest = [j for j in cand if j not in forced][:max(0, n - len(forced))]
        chosen = sorted(forced + rest)
        out[t, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16], ids=str)
def test_exact_ties_smallest_j_wins(dtype):
    """k_cmp all zeros and l = d = l': the visible blocks all score 1/nc(t), the others 0,
    so the free slots go to the smallest j."""
    B, T, H, D, b, n = 2, 200, 2, 8, 16, 4
    cfg = Cfg(B=B, T=T, Hq=2 * H, Hkv=H, Dk=D, Dv=D, l=b, d=b, lp=b, n=n, n_init=1, n_local=1)
    q = torch.randn(B, T, 2 * H, D, dtype=F64).to(dtype)
    k_cmp = torch.zeros(B, R.num_cmp_blocks(T, b, b), H, D, dtype=dtype)
    bi = op_select(cfg, q, k_cmp)
    expected = _hand_uniform_selection(T, b, n, 1, 1)
    assert torch.equal(bi, expected.view(1, T, 1, n).expand(B, T, H, n))


def test_exact_ties_paper_weights():
    """q = 0 and k_cmp = 0 with the paper's ratios: P is uniform, the interior selection
    blocks all have overlap weight 1+2+2+2+1 and tie exactly; equals the reference."""
    cfg = Cfg(B=1, T=520, Hq=2, Hkv=1, Dk=8, Dv=8, l=32, d=16, lp=64, n=4, n_init=1, n_local=2)
    q = torch.zeros(1, cfg.T, cfg.Hq, cfg.Dk, dtype=F64)
    k_cmp = torch.zeros(1, R.num_cmp_blocks(cfg.T, cfg.l, cfg.d), 1, cfg.Dk, dtype=F64)
    bi = op_select(cfg, q, k_cmp)
    ref_bi, _ = ref_select(cfg, q, k_cmp)
    assert torch.equal(bi, ref_bi)
    # hand check at t = 519 (J = 8, nc = 31): forced 0, 7, 8; block 1..6 fully covered by
    # visible compressed blocks (weight 8 each), so the free slot goes to j = 1
    assert bi[0, 519, 0].tolist() == [0, 1, 7, 8]


def test_exact_tie_between_two_blocks():
    """Two identical compressed rows (2 and 5) score highest and tie for the single free
    slot: the smaller j (2) wins."""
    b, T, D = 16, 128, 4
    cfg = Cfg(B=1, T=T, Hq=1, Hkv=1, Dk=D, Dv=D, l=b, d=b, lp=b, n=3, n_init=1, n_local=1)
    tc = R.num_cmp_blocks(T, b, b)
    k_cmp = 0.01 * torch.randn(1, tc, 1, D, dtype=F64)
    u = torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=F64)
    k_cmp[0, 2, 0] = u
    k_cmp[0, 5, 0] = u
    q = 3.0 * u.view(1, 1, 1, D).expand(1, T, 1, D).contiguous()
    bi = op_select(cfg, q, k_cmp)
    for t in range(112, 128):  # J = 7: candidates 0..7, forced 0 and 7, visible i < 7
        assert bi[0, t, 0].tolist() == [0, 2, 7], t
    for t in range(96, 112):  # J = 6: forced 0 and 6; visible i < 6 -> 2 and 5 tie
        assert bi[0, t, 0].tolist() == [0, 2, 6], t


def test_forced_blocks_always_present():
    """Init and local blocks are selected even when their scores are the lowest."""
    cfg = Cfg(B=1, T=256, Hq=1, Hkv=1, Dk=4, Dv=4, l=16, d=16, lp=16, n=5, n_init=2,
              n_local=2)
    tc = R.num_cmp_blocks(cfg.T, cfg.l, cfg.d)
    k_cmp = torch.zeros(1, tc, 1, 4, dtype=F64)
    k_cmp[0, 5:9, 0, 0] = 10.0  # blocks 5..8 dominate
    k_cmp[0, [0, 1], 0, 0] = -10.0  # init blocks score lowest
    q = torch.zeros(1, cfg.T, 1, 4, dtype=F64)
    q[..., 0] = 1.0
    bi = op_select(cfg, q, k_cmp)
    check_selection_layout(bi, positions_of(cfg.T, 1), cfg.lp, cfg.n)
    for t in (200, 255):
        J = t // cfg.lp
        row = bi[0, t, 0].tolist()
        assert {0, 1, J - 1, J} <= set(row), (t, row)
        assert row[2] == 5  # the free slot: the highest score, smaller j among 5..8
    ref_bi, _ = ref_select(cfg, q, k_cmp)
    assert torch.equal(bi, ref_bi)


@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_few_candidates_select_all(varlen):
    """With J + 1 <= n every candidate is selected: [0, 1, ..., J, -1, ...]."""
    cfg = Cfg(B=2, T=4 * 32, Hq=4, Hkv=2, Dk=8, Dv=8, l=32, d=16, lp=32, n=4, n_init=1,
              n_local=1)
    if varlen:
        seqlens = [128, 5, 70]
        inp = make_varlen_inputs(cfg, seqlens, seed=23)
        cu = inp["cu_seqlens"]
    else:
        inp, cu = make_inputs(cfg, seed=23), None
    q = inp["q"]
    k_cmp = nsa_cuda.mean_compress(inp["k"], cfg.l, cfg.d, cu_seqlens=cu)
    bi = op_select(cfg, q, k_cmp, cu)
    pos = positions_of(q.shape[1], q.shape[0], cu)
    J = pos // cfg.lp
    slots = torch.arange(cfg.n)
    expected = torch.where(slots <= J.unsqueeze(-1), slots, -1).to(torch.int32)
    assert torch.equal(bi, expected.unsqueeze(2).expand_as(bi))


def test_layout_ascending_padded():
    """Ascending, distinct, -1 only at the end, the right number of entries, int32."""
    cfg = Cfg(B=2, T=300, Hq=2, Hkv=1, Dk=8, Dv=8, l=32, d=16, lp=32, n=6, n_init=2,
              n_local=1)
    inp = make_inputs(cfg, seed=24)
    k_cmp = nsa_cuda.mean_compress(inp["k"], cfg.l, cfg.d)
    bi = op_select(cfg, inp["q"], k_cmp)
    check_selection_layout(bi, positions_of(cfg.T, cfg.B), cfg.lp, cfg.n)
    # the early rows are padded
    assert bi[0, 0, 0].tolist() == [0, -1, -1, -1, -1, -1]
    assert bi[0, 40, 0].tolist() == [0, 1, -1, -1, -1, -1]
