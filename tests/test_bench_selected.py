"""The selected branch's diagnostic rows in bench/suite.py: the byte model of the
query-centric kernel, the shared-selection proxy and the key-range passes with their
lse merge. These decide, on a device, whether the selected forward is bound by its
bytes, by L2's capacity or by its mainloop, so their arithmetic is checked here."""
from __future__ import annotations

import pytest
import torch
from conftest import load_bench_script

import nsa_cuda


@pytest.fixture
def suite(monkeypatch):
    return load_bench_script("suite", monkeypatch)


def _selection(T, Hq, Hkv, Dk, lp, n, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(1, T, Hq, Dk, dtype=torch.float64)
    k = torch.randn(1, T, Hkv, Dk, dtype=torch.float64)
    v = torch.randn(1, T, Hkv, Dk, dtype=torch.float64)
    kc, vc = nsa_cuda.mean_compress(k, 16, 8), nsa_cuda.mean_compress(v, 16, 8)
    _, lse = nsa_cuda.compressed_attn(q, kc, vc, cmp_block_size=16, cmp_stride=8)
    bi = nsa_cuda.select_blocks(q, kc, lse, cmp_block_size=16, cmp_stride=8, slc_block_size=lp,
                                slc_num_blocks=n)
    return q, k, v, bi


def _bytes_by_loops(bi, G, lp, Dk, Dv, elt, rows=64):
    """The kernel's loads, CTA by CTA, the slow way."""
    B, T, Hkv, n = bi.shape
    nblk = -(-T // lp)
    keys = 0
    for b in range(B):
        for h in range(Hkv):
            for f0 in range(0, T * G, rows):
                t_lo, t_hi = f0 // G, min(f0 + rows - 1, T * G - 1) // G
                union = {int(j) for t in range(t_lo, t_hi + 1) for j in bi[b, t, h].tolist()
                         if 0 <= j < nblk and j * lp <= t}
                keys += sum(min((j + 1) * lp, t_hi + 1) - j * lp for j in union)
    return keys * (Dk + Dv) * elt + B * T * G * Hkv * (Dk + Dv) * elt


@pytest.mark.parametrize("Hq,Hkv", [(4, 1), (6, 2), (128, 1), (3, 3)])
def test_selected_tile_bytes_matches_loops(suite, Hq, Hkv):
    # G = 4 (16 tokens per CTA), 3 (a CTA's rows straddle tokens), 128 (a token on two
    # CTAs), 1; T not a multiple of l' (a clipped last block).
    T, lp = 200, 16
    G = Hq // Hkv
    _, _, _, selected = _selection(T, Hq, Hkv, 32, lp, 4)
    # block_indices of a caller's own: any ints, so blocks after their token (never
    # loaded for it), out of range and negative (unused slots) all occur
    torch.manual_seed(1)
    arbitrary = torch.randint(-2, -(-T // lp) + 3, selected.shape, dtype=torch.int32)
    for bi in (selected, arbitrary):
        got = suite.selected_tile_bytes(bi, G, lp, 32, 24, 2)
        assert got == _bytes_by_loops(bi, G, lp, 32, 24, 2)


def test_shared_selection_keeps_validity_and_flops(suite):
    T, lp, n = 300, 16, 4
    q, k, v, bi = _selection(T, 4, 1, 32, lp, n)
    shared = suite.shared_block_indices(bi, lp)
    t = torch.arange(T).view(1, T, 1, 1)
    valid = (shared >= 0) & (shared.long() * lp <= t)
    assert bool(((shared < 0) | valid).all())
    # Each token still visits as many keys (its current block and the same count of
    # full blocks), so the FLOPs are those of the suite's selections.
    def keys(b):
        return sum(min((j + 1) * lp, tt + 1) - j * lp
                   for tt in range(T) for j in set(b[0, tt, 0].tolist()) if 0 <= j and j * lp <= tt)
    assert keys(shared) == keys(bi)
    cur = t.view(T) // lp
    assert bool((shared[0, :, 0] == cur[:, None]).any(dim=1).all())  # current block kept
    # fewer distinct blocks per 64-row CTA (16 tokens at G = 4)
    assert suite.selected_tile_bytes(shared, 4, lp, 32, 32, 2) < suite.selected_tile_bytes(bi, 4, lp, 32, 32, 2)


@pytest.mark.parametrize("parts", [2, 3, 4])
def test_key_split_merge_equals_one_pass(suite, parts):
    T, lp = 300, 16
    q, k, v, bi = _selection(T, 4, 1, 32, lp, 5)
    split = suite.key_split_block_indices(bi, lp, parts)
    # every listed block in exactly one part
    listed = lambda b: (b >= 0).sum()  # noqa: E731
    assert sum(int(listed(b)) for b in split) == int(listed(bi))
    outs = [nsa_cuda.selected_attn(q, k, v, b, slc_block_size=lp) for b in split]
    o, lse = suite.merge_partials([x[0] for x in outs], [x[1] for x in outs])
    o_ref, lse_ref = nsa_cuda.selected_attn(q, k, v, bi, slc_block_size=lp)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, lse_ref, rtol=0, atol=1e-12)
    # a part where early tokens have no block: their partial lse is -inf, merged away
    assert bool(torch.isinf(outs[-1][1]).any())
