"""Tests of the pure-PyTorch oracle nsa_cuda/reference.py against NSA_SPEC.md.

Independent checks: hand-computed index rules, per-token loop implementations,
causal SDPA, constructed selections, varlen vs per-sequence calls, fp64 gradcheck,
and flash-linear-attention's naive_nsa as a second opinion (l = d = l' = 64).

Conventions of fla's naive NSA (fla-core 0.6.0, fla/ops/nsa/naive.py), read from the
source and confirmed by the fla tests below:

* Layout ``[B, T, H, D]`` like ours; its compressed ``lse`` is ``[B, T, HQ]`` (ours ``[B, Hq, T]``).
* One size ``block_size`` is l = d = l'. ``block_counts`` is n, the total number of
  slots. Forced blocks are block 0, the current block t // 64 and the previous one:
  our ``n_init = 1``, ``n_local = 2``. Block c of the compression is visible once
  ``(c + 1) * 64 - 1 <= t``, our nc(t).
* Its score is the group *mean* of P (ours: the sum; same ranking), forced blocks get
  score 1.0, ties go wherever ``torch.topk`` puts them, and ``block_indices`` come in
  top-k order (not ascending) with -1 for unused slots. We compare them as sets.
* ``mean_pooling`` makes ceil(T / 64) blocks, the last one the mean of a partial block;
  that block is never visible, so outputs agree, but in varlen mode its packed k_cmp
  has ceil(len / 64) rows per sequence where ours has Tc(len) = floor(len / 64).
* Gates come in the same order (g_cmp, g_slc, g_swa). Differences: with ``g_slc=None``
  fla still adds the *ungated* selected branch (ours turns the branch off); with
  ``g_cmp=None`` it skips selection and needs ``block_indices``; its window is off
  with ``window_size=0`` and otherwise flash-attn's ``window_size=(w-1, 0)``, the same
  w keys as ours, but it needs flash_attn (CUDA), so the window is checked here
  against SDPA only. Duplicated entries in ``block_indices`` count twice in fla's
  naive_nsa_selection (a gather), once in ours; our selection never makes duplicates.
* Default scale ``K ** -0.5``; it computes in fp32 and casts ``o`` to the input dtype.
* ``naive_nsa`` asserts ``HQ / H`` is a power of two >= 16, so its test uses Hq=16, Hkv=1.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import pathlib
import warnings

import pytest
import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


try:
    from nsa_cuda import reference as ref
except Exception:  # package absent, or its __init__ needs an extension not built yet
    ref = _load("nsa_cuda_reference", ROOT / "nsa_cuda" / "reference.py")

F64 = torch.float64


def rnd(*shape, dtype=F64, seed=None, requires_grad=False):
    if seed is not None:
        torch.manual_seed(seed)
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


def make_qkv(B=2, T=70, Hq=4, Hkv=2, Dk=8, Dv=6, dtype=F64, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(B, T, Hq, Dk, dtype=dtype)
    k = torch.randn(B, T, Hkv, Dk, dtype=dtype)
    v = torch.randn(B, T, Hkv, Dv, dtype=dtype)
    return q, k, v


def causal_sdpa(q, k, v, scale=None):
    """[B,T,H,D] causal attention through torch's SDPA with GQA expansion."""
    g = q.shape[2] // k.shape[2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)))
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale).transpose(1, 2)


def assert_close(a, b, **kw):
    """fp64 results must agree to rounding: a kernel computing in fp32 would be off by ~1e-8."""
    if a.dtype == F64 and b.dtype == F64:
        kw = {"atol": 1e-12, "rtol": 1e-12, **kw}
    torch.testing.assert_close(a, b, **kw)


def cu(lens):
    return torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)


# ----------------------------------------------------------------------------------
# Index rules
# ----------------------------------------------------------------------------------


def test_num_cmp_blocks_hand_computed():
    cases = {(0, 32, 16): 0, (31, 32, 16): 0, (32, 32, 16): 1, (47, 32, 16): 1, (48, 32, 16): 2,
             (64, 32, 16): 3, (63, 64, 64): 0, (64, 64, 64): 1, (127, 64, 64): 1, (128, 64, 64): 2}
    for args, want in cases.items():
        assert ref.num_cmp_blocks(*args) == want, args


def test_num_visible_cmp_blocks_hand_computed_and_brute_force():
    cases = {(0, 32, 16): 0, (30, 32, 16): 0, (31, 32, 16): 1, (46, 32, 16): 1, (47, 32, 16): 2,
             (63, 32, 16): 3, (62, 64, 64): 0, (63, 64, 64): 1, (127, 64, 64): 2}
    for args, want in cases.items():
        assert ref.num_visible_cmp_blocks(*args) == want, args
    for l, d in [(32, 16), (64, 64), (8, 4), (12, 4), (4, 1)]:
        for t in range(200):
            brute = sum(1 for i in range(300) if i * d + l - 1 <= t)
            assert ref.num_visible_cmp_blocks(t, l, d) == brute, (l, d, t)
            # the last query of a sequence of length t+1 sees every complete block
            assert ref.num_visible_cmp_blocks(t, l, d) == ref.num_cmp_blocks(t + 1, l, d)


def test_window_and_slc_rules_hand_computed():
    assert [ref.window_begin(t, 512) for t in (0, 511, 512, 600)] == [0, 0, 1, 89]
    assert [ref.window_begin(t, 1) for t in (0, 5)] == [0, 5]
    assert [ref.num_slc_blocks(T, 64) for T in (0, 1, 64, 65, 128, 129)] == [0, 1, 1, 2, 2, 3]
    assert [ref.last_candidate_slc_block(t, 64) for t in (0, 63, 64, 200)] == [0, 0, 1, 3]
    assert [ref.selected_block_end(j, 100, 64) for j in (0, 1, 2)] == [64, 101, 101]
    forced = lambda J, ni, nl: [j for j in range(J + 3) if ref.is_forced_slc_block(j, J, ni, nl)]
    assert forced(5, 1, 2) == [0, 4, 5]
    assert forced(0, 1, 2) == [0]
    assert forced(1, 1, 2) == [0, 1]
    assert forced(7, 0, 1) == [7]
    assert forced(7, 3, 3) == [0, 1, 2, 5, 6, 7]
    # the tensor form agrees with the int form
    j = torch.arange(10)
    for J in range(8):
        want = [bool(ref.is_forced_slc_block(int(x), J, 2, 2)) for x in j]
        assert ref.is_forced_slc_block(j, J, 2, 2).tolist() == want


def test_overlap_weights_paper_settings():
    w = ref.cmp_slc_overlap_weights(20, 5, 32, 16, 64)
    # selection block 2 = tokens [128, 192): compressed blocks 7..11 overlap it
    assert torch.nonzero(w[:, 2]).flatten().tolist() == [7, 8, 9, 10, 11]
    assert w[7:12, 2].tolist() == [1, 2, 2, 2, 1]
    # every compressed block that lies inside the sequence spreads l/d = 2 over the blocks
    assert torch.all(w[:17].sum(dim=1) == 2)
    assert torch.equal(ref.cmp_slc_overlap_weights(5, 5, 64, 64, 64), torch.eye(5))


@pytest.mark.parametrize("l,d,lp", [(32, 16, 64), (16, 8, 32), (64, 64, 64), (32, 16, 16), (12, 4, 8)])
def test_overlap_weights_brute_force(l, d, lp):
    Tc, nb = 15, 12
    w = ref.cmp_slc_overlap_weights(Tc, nb, l, d, lp, dtype=F64)
    for i in range(Tc):
        for j in range(nb):
            inter = set(range(i * d, i * d + l)) & set(range(j * lp, (j + 1) * lp))
            assert w[i, j].item() == len(inter) / d, (i, j)


def test_packed_cmp_rows():
    lens = [40, 10, 70]  # Tc = 1, 0, 3 with l=32, d=16
    assert [ref.packed_cmp_row_begin(lens, i, 32, 16) for i in range(4)] == [0, 1, 1, 4]
    assert ref.packed_cmp_rows_bound(120, 16) == 7


# ----------------------------------------------------------------------------------
# Compression
# ----------------------------------------------------------------------------------


def test_mean_compress_batch_vs_loop():
    x = rnd(2, 70, 3, 5, seed=1)
    y = ref.mean_compress(x, 32, 16)
    assert y.shape == (2, 3, 3, 5)
    for i in range(3):
        assert_close(y[:, i], x[:, i * 16:i * 16 + 32].mean(dim=1))
    assert ref.mean_compress(x[:, :31], 32, 16).shape == (2, 0, 3, 5)


def test_mean_compress_varlen_layout():
    lens = [40, 10, 70]
    x = rnd(1, 120, 2, 3, seed=2, requires_grad=True)
    y = ref.mean_compress(x, 32, 16, cu(lens))
    assert y.shape == (1, 120 // 16, 2, 3)
    assert_close(y[0, 0], x[0, 0:32].mean(0))
    for i in range(3):  # third sequence starts at token 50 and at compressed row 1
        assert_close(y[0, 1 + i], x[0, 50 + 16 * i:50 + 16 * i + 32].mean(0))
    assert torch.all(y[0, 4:] == 0)
    y.sum().backward()
    assert torch.all(x.grad[0, 40:50] == 0)  # the short sequence has no block
    assert torch.all(x.grad[0, 50:66] == 1 / 32)  # covered by one block of 32 rows


# ----------------------------------------------------------------------------------
# Branch 1
# ----------------------------------------------------------------------------------


def loop_compressed(q, k_cmp, v_cmp, l, d, scale):
    B, T, Hq, _ = q.shape
    G = Hq // k_cmp.shape[2]
    o = torch.zeros(B, T, Hq, v_cmp.shape[-1], dtype=q.dtype)
    lse = torch.full((B, Hq, T), -math.inf, dtype=q.dtype)
    for b in range(B):
        for t in range(T):
            nc = sum(1 for i in range(k_cmp.shape[1]) if i * d + l - 1 <= t)
            if nc == 0:
                continue
            for h in range(Hq):
                s = torch.stack([scale * q[b, t, h] @ k_cmp[b, i, h // G] for i in range(nc)])
                lse[b, h, t] = torch.logsumexp(s, 0)
                o[b, t, h] = sum(torch.exp(s[i] - lse[b, h, t]) * v_cmp[b, i, h // G] for i in range(nc))
    return o, lse


def test_compressed_vs_loop_and_extra_rows_ignored():
    q, k, v = make_qkv(T=40, seed=3)
    l, d = 8, 4
    kc, vc = rnd(2, 9, 2, 8, seed=4), rnd(2, 9, 2, 6)  # Tc(40) = 9
    o, lse = ref.compressed_attn(q, kc, vc, l, d, scale=0.3)
    o2, lse2 = loop_compressed(q, kc, vc, l, d, 0.3)
    assert_close(o, o2)
    assert_close(lse, lse2)
    assert lse.dtype == F64 and o.dtype == F64
    assert torch.all(o[:, :l - 1] == 0) and torch.all(lse[:, :, :l - 1] == -math.inf)
    assert torch.isfinite(lse[:, :, l - 1:]).all()
    # rows past Tc(T) are never visible
    kc_big = torch.cat([kc, rnd(2, 5, 2, 8) * 100], dim=1)
    vc_big = torch.cat([vc, rnd(2, 5, 2, 6) * 100], dim=1)
    o3, lse3 = ref.compressed_attn(q, kc_big, vc_big, l, d, scale=0.3)
    assert_close(o3, o)
    assert_close(lse3, lse)
    with pytest.raises(ValueError):
        ref.compressed_attn(q, kc[:, :8], vc[:, :8], l, d)


def test_compressed_empty_rows_have_zero_grads_not_nan():
    q, k, v = make_qkv(T=40, dtype=torch.float32, seed=5)
    q.requires_grad_(True)
    kc = ref.mean_compress(k, 16, 8).requires_grad_(True)
    vc = ref.mean_compress(v, 16, 8).requires_grad_(True)
    o, lse = ref.compressed_attn(q, kc, vc, 16, 8)
    (o.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    for t in (q.grad, kc.grad, vc.grad):
        assert torch.isfinite(t).all()
    assert torch.all(q.grad[:, :15] == 0) and q.grad[:, 15:].abs().sum() > 0


# ----------------------------------------------------------------------------------
# Branch 3
# ----------------------------------------------------------------------------------


def test_window_covering_everything_is_causal_sdpa():
    q, k, v = make_qkv(T=50, seed=6)
    for w in (50, 1000):
        o, lse = ref.window_attn(q, k, v, w)
        assert_close(o, causal_sdpa(q, k, v))
        assert torch.isfinite(lse).all()


def test_window_vs_loop_and_w1():
    q, k, v = make_qkv(T=30, seed=7)
    w, scale, G = 5, 0.7, 2
    o, lse = ref.window_attn(q, k, v, w, scale=scale)
    for t in range(30):
        lo = max(0, t - w + 1)
        for h in range(4):
            s = scale * k[:, lo:t + 1, h // G] @ q[:, t, h].unsqueeze(-1)  # [B, n, 1]
            p = torch.softmax(s, dim=1)
            assert_close(o[:, t, h], (p * v[:, lo:t + 1, h // G]).sum(1))
            assert_close(lse[:, h, t], torch.logsumexp(s[..., 0], dim=1))
    o1, lse1 = ref.window_attn(q, k, v, 1, scale=scale)
    assert_close(o1, v.repeat_interleave(G, 2))
    assert_close(lse1, scale * (q * k.repeat_interleave(G, 2)).sum(-1).transpose(1, 2))


# ----------------------------------------------------------------------------------
# Branch 2
# ----------------------------------------------------------------------------------


def test_selected_all_blocks_is_causal_sdpa():
    q, k, v = make_qkv(T=70, seed=8)
    lp = 16
    nb = ref.num_slc_blocks(70, lp)
    bi = torch.arange(nb, dtype=torch.int32).expand(2, 70, 2, nb).contiguous()
    o, lse = ref.selected_attn(q, k, v, bi, lp)
    assert_close(o, causal_sdpa(q, k, v))
    assert_close(lse, ref.window_attn(q, k, v, 10 ** 6)[1])


def random_block_indices(B, T, Hkv, n, lp, seed, ascending=True):
    """Valid selections: forced current block plus random earlier ones, -1 padded."""
    g = torch.Generator().manual_seed(seed)
    bi = torch.full((B, T, Hkv, n), -1, dtype=torch.int32)
    for b, t, h in itertools.product(range(B), range(T), range(Hkv)):
        J = t // lp
        others = torch.randperm(J, generator=g)[:n - 1].tolist() if J else []
        sel = sorted(others + [J])
        bi[b, t, h, :len(sel)] = torch.tensor(sel if ascending else sel[::-1], dtype=torch.int32)
    return bi


def test_selected_vs_loop():
    q, k, v = make_qkv(T=60, seed=9)
    lp, G = 8, 2
    bi = random_block_indices(2, 60, 2, 3, lp, seed=0)
    o, lse = ref.selected_attn(q, k, v, bi, lp)
    scale = 8 ** -0.5
    for b, t, h in itertools.product(range(2), range(60), range(4)):
        keys = [s for s in range(t + 1) if s // lp in bi[b, t, h // G].tolist()]
        s = scale * k[b, keys, h // G] @ q[b, t, h]
        assert_close(o[b, t, h], torch.softmax(s, 0) @ v[b, keys, h // G])
        assert_close(lse[b, h, t], torch.logsumexp(s, 0))


def test_selected_slot_conventions():
    q, k, v = make_qkv(T=60, seed=10)
    lp = 8  # 8 valid blocks
    bi = random_block_indices(2, 60, 2, 3, lp, seed=1)
    o, lse = ref.selected_attn(q, k, v, bi, lp)
    # any order, int64, duplicates, negative and out-of-range entries as unused slots
    messy = torch.cat([bi.flip(-1), bi[..., :1], torch.full_like(bi[..., :1], -5),
                       torch.full_like(bi[..., :1], 8), torch.full_like(bi[..., :1], 10 ** 6)], -1)
    o2, lse2 = ref.selected_attn(q, k, v, messy.long(), lp)
    assert_close(o2, o)
    assert_close(lse2, lse)
    # unused slots never alias a real block, even one the query did not list
    only0 = torch.zeros_like(bi[..., :1])
    junk = torch.cat([only0, torch.full_like(only0, -1), torch.full_like(only0, 8),
                      torch.full_like(only0, 2 ** 31 - 1), torch.full_like(only0, -(2 ** 31))], -1)
    assert_close(ref.selected_attn(q, k, v, junk, lp)[0],
                               ref.selected_attn(q, k, v, only0, lp)[0])
    assert_close(ref.selected_attn(q, k, v, only0, lp)[0][:, :lp],
                               causal_sdpa(q, k, v)[:, :lp])
    # a block in the query's future contributes nothing
    future = bi.clone()
    future[..., -1] = torch.where(future[..., -1] < 0, 7, future[..., -1])
    assert_close(ref.selected_attn(q, k, v, future, lp)[0], o)


# ----------------------------------------------------------------------------------
# Block selection
# ----------------------------------------------------------------------------------


def brute_select(q, k_cmp, l, d, lp, n, n_init, n_local, scale):
    """Per (b, t, g) selection straight from the spec's words, with Python sorting."""
    B, T, Hq, _ = q.shape
    Hkv = k_cmp.shape[2]
    G = Hq // Hkv
    out, scores = {}, {}
    for b, t, g in itertools.product(range(B), range(T), range(Hkv)):
        nc = ref.num_visible_cmp_blocks(t, l, d)
        J = t // lp
        S = [0.0] * (J + 1)
        for h in range(g * G, (g + 1) * G):
            if nc == 0:
                continue
            p = torch.softmax(scale * k_cmp[b, :nc, g] @ q[b, t, h], 0).tolist()
            for i in range(nc):
                for j in range(J + 1):
                    inter = len(set(range(i * d, i * d + l)) & set(range(j * lp, (j + 1) * lp)))
                    S[j] += inter / d * p[i]
        forced = [j for j in range(J + 1) if j < n_init or j > J - n_local]
        rest = sorted((j for j in range(J + 1) if j not in forced), key=lambda j: (-S[j], j))
        out[b, t, g] = sorted(forced + rest[:n - len(forced)])
        scores[b, t, g] = S
    return out, scores


def assert_same_selection(bi, want, scores, n_forced_of, rtol=1e-3):
    """Sets must match, except blocks whose scores are within rtol of the n-th selected score."""
    for key, sel_w in want.items():
        sel = [j for j in bi[key].tolist() if j >= 0]
        if sel == sorted(sel_w):
            continue
        S = scores[key]
        free = [j for j in sel if j not in n_forced_of(key)]
        assert free, (key, sel, sel_w)
        nth = min(S[j] for j in free)
        for j in set(sel) ^ set(sel_w):
            assert abs(S[j] - nth) <= rtol * abs(nth), (key, sel, sel_w, S)


@pytest.mark.parametrize("l,d,lp,n,n_init,n_local", [(8, 4, 16, 4, 1, 2), (4, 4, 4, 5, 2, 1),
                                                     (8, 4, 8, 3, 0, 1)])
def test_select_blocks_vs_brute_force(l, d, lp, n, n_init, n_local):
    q, k, v = make_qkv(B=1, T=90, seed=11)
    q = q * 3  # sharper softmax, fewer near-ties
    kc = ref.mean_compress(k, l, d)
    bi, scores = ref.select_blocks(q, kc, l, d, lp, n, n_init, n_local, scale=0.5)
    assert bi.dtype == torch.int32 and bi.shape == (1, 90, 2, n)
    assert scores.shape == (1, 90, 2, ref.num_slc_blocks(90, lp))
    want, S = brute_select(q, kc, l, d, lp, n, n_init, n_local, 0.5)
    for key, s in S.items():
        assert_close(scores[key][:len(s)], torch.tensor(s, dtype=F64))
        assert torch.all(scores[key][len(s):] == -math.inf)
    forced_of = lambda key: {j for j in range(key[1] // lp + 1)
                             if ref.is_forced_slc_block(j, key[1] // lp, n_init, n_local)}
    assert_same_selection(bi, want, S, forced_of, rtol=1e-9)


def test_selection_structure_and_forced_blocks():
    l, d, lp, n, n_init, n_local = 16, 8, 16, 5, 1, 2
    q, k, v = make_qkv(B=2, T=200, dtype=torch.float32, seed=12)
    bi, scores = ref.select_blocks(q, ref.mean_compress(k, l, d), l, d, lp, n, n_init, n_local)
    assert scores.dtype == torch.float32
    for b, t, g in itertools.product(range(2), range(200), range(2)):
        row = bi[b, t, g].tolist()
        sel = [j for j in row if j >= 0]
        J = t // lp
        assert row == sel + [-1] * (n - len(sel)), row  # ascending, then -1
        assert sel == sorted(set(sel)) and len(sel) == min(n, J + 1) and sel[-1] <= J
        forced = {j for j in range(J + 1) if ref.is_forced_slc_block(j, J, n_init, n_local)}
        assert forced <= set(sel)
        S = scores[b, t, g]
        free = set(sel) - forced
        unselected = set(range(J + 1)) - set(sel)
        if free and unselected:
            assert min(S[j] for j in free) >= max(S[j] for j in unselected)


def test_selection_weights_through_select_blocks():
    """P one-hot on a compressed block gives S = G * w(i, :) (paper settings)."""
    l, d, lp, G = 32, 16, 64, 2
    T, D = 256, 4
    q = torch.zeros(1, T, 2 * G, D, dtype=F64)
    q[..., 0] = 1.0
    for i, want in [(9, {2: 2.0}), (7, {1: 1.0, 2: 1.0}), (11, {2: 1.0, 3: 1.0}), (0, {0: 2.0})]:
        kc = torch.zeros(1, ref.num_cmp_blocks(T, l, d), 2, D, dtype=F64)
        kc[0, i, :, 0] = 2000.0  # exp(-1000) underflows: P is one-hot on block i
        _, scores = ref.select_blocks(q, kc, l, d, lp, 16, 1, 2, scale=0.5)
        s = scores[0, T - 1, 0].tolist()
        assert s == [G * want.get(j, 0.0) for j in range(4)], (i, s)


def test_tie_rule_smaller_j_wins():
    # q = 0: uniform P over the visible blocks; with l = d = l' all visible blocks tie
    l = d = lp = 16
    n, n_init, n_local = 4, 1, 1
    T = 160
    q = torch.zeros(1, T, 4, 8, dtype=F64)
    kc = rnd(1, 10, 2, 8, seed=13)
    bi, scores = ref.select_blocks(q, kc, l, d, lp, n, n_init, n_local)
    for t in range(T):
        J = t // lp
        want = sorted({0, 1, 2, J}) if J >= 3 else list(range(J + 1))
        assert [j for j in bi[0, t, 0].tolist() if j >= 0] == want, t
        if t >= lp:
            nc = (t + 1) // lp
            assert torch.allclose(scores[0, t, 0, :nc], torch.full((nc,), 2.0 / nc, dtype=F64))


def test_selection_nc_zero_scores_and_fp16():
    l, d, lp = 32, 16, 16  # l' < l: queries t < 31 have candidates but no compressed block
    q, k, v = make_qkv(B=1, T=100, dtype=torch.float16, seed=14)
    bi, scores = ref.select_blocks(q, ref.mean_compress(k, l, d), l, d, lp, 2, 0, 1)
    assert scores.dtype == torch.float32
    assert torch.all(scores[0, 20, :, :2] == 0) and torch.all(scores[0, 20, :, 2:] == -math.inf)
    # nothing to rank: the tie rule takes the smallest j after the forced local block
    assert bi[0, 20, 0].tolist() == [0, 1]
    assert not torch.isnan(scores).any()


# ----------------------------------------------------------------------------------
# Varlen
# ----------------------------------------------------------------------------------

CFG = dict(cmp_block_size=16, cmp_stride=8, slc_block_size=16, slc_num_blocks=3,
           slc_init_blocks=1, slc_local_blocks=1, window_size=20)


def test_varlen_equals_per_sequence_batch_calls():
    lens = [37, 0, 100, 64, 5]
    total = sum(lens)
    q, k, v = make_qkv(B=1, T=total, seed=15)
    gates = [rnd(1, total, 4) for _ in range(3)]
    c = cu(lens)
    l, d, lp = 16, 8, 16
    kc, vc = ref.mean_compress(k, l, d, c), ref.mean_compress(v, l, d, c)
    o, aux = ref.sparse_attn(q, k, v, *gates, **CFG, cu_seqlens=c, max_seqlen=100, return_aux=True)
    bi, scores = ref.select_blocks(q, kc, l, d, lp, 3, 1, 1, cu_seqlens=c)
    assert scores.shape == (1, total, 2, ref.num_slc_blocks(100, lp))
    o_cmp, _ = ref.compressed_attn(q, kc, vc, l, d, cu_seqlens=c)
    o_slc, _ = ref.selected_attn(q, k, v, bi, lp, cu_seqlens=c)
    o_win, _ = ref.window_attn(q, k, v, 20, cu_seqlens=c)
    assert_close(o_cmp, aux["o_cmp"])
    start, row = 0, 0
    for n in lens:
        sl = slice(start, start + n)
        one = lambda x: x[:, sl]
        kc1 = ref.mean_compress(one(k), l, d)
        tc = kc1.shape[1]
        assert_close(kc[:, row:row + tc], kc1)
        o1, aux1 = ref.sparse_attn(one(q), one(k), one(v), *map(one, gates), **CFG, return_aux=True)
        assert_close(o[:, sl], o1)
        for key in ("o_cmp", "o_slc", "o_win", "block_indices"):
            assert_close(aux[key][:, sl], aux1[key])
        for key in ("lse_cmp", "lse_slc", "lse_win"):
            assert_close(aux[key][:, :, sl], aux1[key])
        b1, s1 = ref.select_blocks(one(q), kc1, l, d, lp, 3, 1, 1)
        assert torch.equal(bi[:, sl], b1)
        assert_close(scores[:, sl, :, :s1.shape[-1]], s1)
        assert torch.all(scores[:, sl, :, s1.shape[-1]:] == -math.inf)
        assert_close(o_slc[:, sl], ref.selected_attn(one(q), one(k), one(v), b1, lp)[0])
        assert_close(o_win[:, sl], ref.window_attn(one(q), one(k), one(v), 20)[0])
        start, row = start + n, row + tc


# ----------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------


def finite(x):
    return torch.where(torch.isfinite(x), x, 0)


def test_gradcheck_branches():
    B, T, Hq, Hkv, Dk, Dv = 1, 13, 2, 1, 3, 2
    l, d, lp, w = 4, 2, 4, 5
    q = rnd(B, T, Hq, Dk, seed=16, requires_grad=True)
    k = rnd(B, T, Hkv, Dk, requires_grad=True)
    v = rnd(B, T, Hkv, Dv, requires_grad=True)
    kc = rnd(B, ref.num_cmp_blocks(T, l, d), Hkv, Dk, requires_grad=True)
    vc = rnd(B, kc.shape[1], Hkv, Dv, requires_grad=True)
    bi = random_block_indices(B, T, Hkv, 2, lp, seed=2)
    torch.autograd.gradcheck(lambda q, kc, vc: tuple(map(finite, ref.compressed_attn(q, kc, vc, l, d))),
                             (q, kc, vc))
    torch.autograd.gradcheck(lambda q, k, v: ref.selected_attn(q, k, v, bi, lp), (q, k, v))
    torch.autograd.gradcheck(lambda q, k, v: ref.window_attn(q, k, v, w), (q, k, v))
    torch.autograd.gradcheck(lambda x: ref.mean_compress(x, l, d, cu([5, 8])), (k,))


def test_gradcheck_sparse_attn():
    B, T, Hq, Hkv, D = 1, 12, 2, 1, 3
    cfg = dict(cmp_block_size=4, cmp_stride=2, slc_block_size=4, slc_num_blocks=2,
               slc_init_blocks=1, slc_local_blocks=1, window_size=3)
    q = rnd(B, T, Hq, D, seed=17, requires_grad=True)
    k, v = rnd(B, T, Hkv, D, requires_grad=True), rnd(B, T, Hkv, D, requires_grad=True)
    gates = [rnd(B, T, Hq, requires_grad=True) for _ in range(3)]
    # selection is piecewise constant: gradcheck within one piece
    torch.autograd.gradcheck(lambda q, k, v, a, b, c: ref.sparse_attn(q, k, v, a, b, c, **cfg),
                             (q, k, v, *gates), fast_mode=True)
    c = cu([5, 7])
    torch.autograd.gradcheck(lambda q, k, v, a: ref.sparse_attn(q, k, v, a, None, None, **cfg,
                                                                cu_seqlens=c), (q, k, v, gates[0]),
                             fast_mode=True)


# ----------------------------------------------------------------------------------
# The whole layer
# ----------------------------------------------------------------------------------


def test_sparse_attn_composition_and_gates():
    q, k, v = make_qkv(B=2, T=80, seed=18)
    gates = [rnd(2, 80, 4) for _ in range(3)]
    o, aux = ref.sparse_attn(q, k, v, *gates, **CFG, return_aux=True)
    want = sum(g.unsqueeze(-1) * aux[f"o_{n}"] for g, n in zip(gates, ("cmp", "slc", "win")))
    assert_close(o, want)
    assert aux["block_indices"].dtype == torch.int32 and aux["block_indices"].shape == (2, 80, 2, 3)
    # k_cmp None is mean compression
    kc, vc = ref.mean_compress(k, 16, 8), ref.mean_compress(v, 16, 8)
    assert_close(ref.sparse_attn(q, k, v, *gates, kc, vc, **CFG), o)
    # different k_cmp changes the result
    assert not torch.allclose(ref.sparse_attn(q, k, v, *gates, kc * 2, vc, **CFG), o)
    # a None gate turns its branch off; the compressed branch still feeds the selection
    o2, aux2 = ref.sparse_attn(q, k, v, None, gates[1], None, **CFG, return_aux=True)
    assert all(aux2[x] is None for x in ("o_cmp", "lse_cmp", "o_win", "lse_win"))
    assert torch.equal(aux2["block_indices"], aux["block_indices"])
    assert_close(o2, gates[1].unsqueeze(-1) * aux["o_slc"])
    o3, aux3 = ref.sparse_attn(q, k, v, gates[0], None, gates[2], **CFG, return_aux=True)
    assert aux3["block_indices"] is None and aux3["o_slc"] is None and aux3["lse_slc"] is None
    assert_close(o3, o - gates[1].unsqueeze(-1) * aux["o_slc"])
    o4 = ref.sparse_attn(q, k, v, None, None, None, **CFG)
    assert o4.shape == (2, 80, 4, 6) and torch.all(o4 == 0)
    # caller's block_indices are used as given
    bi = random_block_indices(2, 80, 2, 3, 16, seed=3, ascending=False)
    o5, aux5 = ref.sparse_attn(q, k, v, *gates, **CFG, block_indices=bi.long(), return_aux=True)
    assert torch.equal(aux5["block_indices"], bi)
    assert_close(aux5["o_slc"], ref.selected_attn(q, k, v, bi, 16)[0])


def test_paper_defaults_run_and_grads_reach_everything():
    q, k, v = make_qkv(B=1, T=300, Hq=4, Hkv=1, Dk=16, Dv=8, dtype=torch.float32, seed=19)
    kc = ref.mean_compress(k, 32, 16)
    vc = ref.mean_compress(v, 32, 16)
    leaves = [x.requires_grad_(True) for x in (q, k, v, kc, vc)]
    gates = [torch.rand(1, 300, 4, requires_grad=True) for _ in range(3)]
    o, aux = ref.sparse_attn(q, k, v, *gates, kc, vc, window_size=100, return_aux=True)
    o.square().sum().backward()
    for x in leaves + gates:
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    bi = aux["block_indices"]
    # T = 300 has 5 selection blocks <= 16: every candidate is selected
    for t in (0, 63, 64, 299):
        assert [j for j in bi[0, t, 0].tolist() if j >= 0] == list(range(t // 64 + 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_is_close_to_fp64(dtype):
    q, k, v = make_qkv(B=1, T=100, seed=20)
    gates = [torch.rand(1, 100, 4, dtype=F64) for _ in range(3)]
    o, aux = ref.sparse_attn(q, k, v, *gates, **CFG, return_aux=True)
    lp_in = [x.to(dtype) for x in (q, k, v, *gates)]
    o_lp, aux_lp = ref.sparse_attn(*lp_in, **CFG, block_indices=aux["block_indices"], return_aux=True)
    assert o_lp.dtype == dtype and aux_lp["o_cmp"].dtype == dtype
    tol = {torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float32: 1e-5}[dtype]
    assert (o_lp.double() - o).abs().max() < tol
    for key in ("lse_cmp", "lse_slc", "lse_win"):
        assert aux_lp[key].dtype == torch.float32
        assert torch.equal(torch.isinf(aux_lp[key]), torch.isinf(aux[key]))
        assert (finite(aux_lp[key]).double() - finite(aux[key])).abs().max() < 10 * tol


def test_bad_input_raises():
    q, k, v = make_qkv(B=1, T=40, seed=21)
    g = rnd(1, 40, 4)
    with pytest.raises(ValueError):
        ref.sparse_attn(q, k, v[:, :, :1].expand(1, 40, 3, 6), g, g, g, **CFG)  # Hq % Hkv
    with pytest.raises(ValueError):
        ref.sparse_attn(q[0], k, v, g, g, g, **CFG)  # rank
    with pytest.raises(ValueError):
        ref.sparse_attn(q, k, v, g, g, g, **{**CFG, "cmp_stride": 5})  # d does not divide l
    with pytest.raises(ValueError):
        ref.sparse_attn(q, k, v, g, g, g, **{**CFG, "slc_init_blocks": 3})  # n_init + n_local > n
    with pytest.raises(ValueError):
        ref.sparse_attn(q, k, v, g, g, g[:, :3], **CFG)  # gate shape
    with pytest.raises(TypeError):
        ref.sparse_attn(q, k, v, g, g, g, **CFG, cu_seqlens=cu([40]).long())
    with pytest.raises(ValueError):
        ref.sparse_attn(q, k, v, g, g, g, **CFG, cu_seqlens=cu([30]))  # does not end at total
    with pytest.raises(ValueError):
        ref.sparse_attn(q, k, v, g, g, g, **CFG, cu_seqlens=torch.tensor([0, 30, 20, 40], dtype=torch.int32))
    with pytest.raises(ValueError):
        ref.selected_attn(q, k, v, torch.zeros(1, 40, 2, dtype=torch.int32), 16)
    with pytest.raises(TypeError):
        ref.selected_attn(q, k, v, torch.zeros(1, 40, 2, 3), 16)
    with pytest.raises(TypeError):
        ref.window_attn(q, k.float(), v, 8)


# ----------------------------------------------------------------------------------
# Second opinion: flash-linear-attention's naive_nsa (l = d = l' = 64)
# ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fla():
    helper = _load("_fla_naive", pathlib.Path(__file__).with_name("_fla_naive.py"))
    mod = helper.load_fla_naive()
    if mod is None:
        pytest.skip("needs fla-core and einops (pip install --no-deps fla-core einops)")
    return mod


BS = 64


def fla_selection_check(ours, theirs, scores, lp, n_init=1, n_local=2):
    """Compare as sets with the spec's tie tolerance; ``scores`` are our group scores."""
    B, T, H, _ = ours.shape
    want, S = {}, {}
    for b, t, g in itertools.product(range(B), range(T), range(H)):
        want[b, t, g] = sorted(j for j in theirs[b, t, g].tolist() if j >= 0)
        S[b, t, g] = scores[b, t, g].tolist()
    forced_of = lambda key: {j for j in range(key[1] // lp + 1)
                             if ref.is_forced_slc_block(j, key[1] // lp, n_init, n_local)}
    assert_same_selection(ours, want, S, forced_of)


def test_fla_compression(fla):
    q, k, v = make_qkv(B=2, T=300, Hq=4, Hkv=2, Dk=32, Dv=16, seed=30)
    kc, vc = fla.mean_pooling(k, BS), fla.mean_pooling(v, BS)  # 5 rows, the last partial
    o_f, lse_f = fla.naive_nsa_compression(q, kc, vc, BS, scale=0.2)
    o, lse = ref.compressed_attn(q, kc, vc, BS, BS, scale=0.2)
    assert_close(o, o_f, atol=1e-5, rtol=1e-5)
    assert_close(lse, lse_f.transpose(1, 2).double(), atol=1e-5, rtol=1e-5)
    # our mean compression is theirs on the complete blocks
    assert_close(ref.mean_compress(k, BS, BS), kc[:, :4])


@pytest.mark.parametrize("T,n", [(700, 5), (700, 3), (300, 16)])
def test_fla_topk(fla, T, n):
    q, k, v = make_qkv(B=2, T=T, Hq=4, Hkv=2, Dk=16, Dv=16, seed=31 + n)
    kc = fla.mean_pooling(k, BS)
    theirs = fla.naive_nsa_topk(q, kc, n, BS, scale=16 ** -0.5)
    ours, scores = ref.select_blocks(q, kc, BS, BS, BS, n, 1, 2)
    fla_selection_check(ours, theirs, scores, BS)


def test_fla_selected_attn(fla):
    q, k, v = make_qkv(B=1, T=300, Hq=4, Hkv=2, Dk=16, Dv=8, seed=32)
    ours_bi, _ = ref.select_blocks(q, ref.mean_compress(k, BS, BS), BS, BS, BS, 3, 1, 2)
    o_f = fla.naive_nsa_selection(q, k, v, ours_bi.long(), BS)
    o, _ = ref.selected_attn(q, k, v, ours_bi, BS)
    assert_close(o, o_f, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("varlen", [False, True])
def test_fla_naive_nsa_end_to_end(fla, varlen):
    n, Hq, Hkv = 4, 16, 1  # fla's naive_nsa needs Hq / Hkv a power of two >= 16
    lens = [130, 64, 260, 7] if varlen else [400]
    B, T = 1, sum(lens)
    q, k, v = make_qkv(B=B, T=T, Hq=Hq, Hkv=Hkv, Dk=16, Dv=8, seed=33)
    g_cmp, g_slc = torch.rand(B, T, Hq, dtype=F64), torch.rand(B, T, Hq, dtype=F64)
    c = cu(lens) if varlen else None
    cfg = dict(cmp_block_size=BS, cmp_stride=BS, slc_block_size=BS, slc_num_blocks=n,
               slc_init_blocks=1, slc_local_blocks=2)
    o, aux = ref.sparse_attn(q, k, v, g_cmp, g_slc, None, **cfg, cu_seqlens=c, return_aux=True)
    fla_cu = c.long() if varlen else None
    o_f, bi_f = fla.naive_nsa(q, k, v, g_cmp, g_slc, None, block_counts=n, block_size=BS,
                              cu_seqlens=fla_cu, return_block_indices=True)
    kc = ref.mean_compress(k, BS, BS, c)
    _, scores = ref.select_blocks(q, kc, BS, BS, BS, n, 1, 2, cu_seqlens=c)
    if varlen:  # selection is per sequence; compare each sequence's rows
        start = 0
        for L in lens:
            sl = slice(start, start + L)
            fla_selection_check(aux["block_indices"][:, sl], bi_f[:, sl], scores[:, sl], BS)
            start += L
    else:
        fla_selection_check(aux["block_indices"], bi_f, scores, BS)
    if not torch.equal(aux["block_indices"].sort(-1).values, bi_f.to(torch.int32).sort(-1).values):
        with warnings.catch_warnings():  # a near-tie went the other way: rerun with ours
            warnings.simplefilter("ignore")  # "block_indices is provided, overriding ..."
            o_f = fla.naive_nsa(q, k, v, g_cmp, g_slc, None, block_indices=aux["block_indices"].long(),
                                block_counts=n, block_size=BS, cu_seqlens=fla_cu)
    assert_close(o, o_f, atol=1e-5, rtol=1e-5)
