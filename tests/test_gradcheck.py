"""torch.autograd.gradcheck (fp64, small sizes) of every differentiable op, batch and
varlen. lse outputs are checked too (their -inf rows replaced by 0)."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import nsa_cuda
from nsa_cuda import reference as R

from conftest import lse_for_loss, make_cu_seqlens

F64 = torch.float64
L, D, LP, N, W = 4, 2, 4, 2, 3  # l, d, l', n, w
SEQLENS = [6, 1, 9, 3]  # varlen: one shorter than l, one of length 1


def _mode(varlen):
    if varlen:
        return 1, sum(SEQLENS), make_cu_seqlens(SEQLENS)
    return 2, 11, None


def _t(*shape):
    return torch.randn(*shape, dtype=F64, requires_grad=True)


def _gc(fn, inputs):
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, check_undefined_grad=True)


MODES = pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])


@MODES
def test_gradcheck_mean_compress(varlen):
    B, T, cu = _mode(varlen)
    x = _t(B, T, 2, 3)
    _gc(lambda x: nsa_cuda.mean_compress(x, L, D, cu_seqlens=cu), (x,))


@MODES
def test_gradcheck_compressed_attn(varlen):
    B, T, cu = _mode(varlen)
    rows = T // D if varlen else R.num_cmp_blocks(T, L, D)
    q, kc, vc = _t(B, T, 4, 3), _t(B, rows, 2, 3), _t(B, rows, 2, 2)

    def fn(q, kc, vc):
        o, lse = nsa_cuda.compressed_attn(q, kc, vc, cmp_block_size=L, cmp_stride=D,
                                          cu_seqlens=cu)
        return o, lse_for_loss(lse)
    _gc(fn, (q, kc, vc))


def _block_indices(B, T, hkv, cu):
    """Fixed indices: random blocks (some out of range, some in the future), unsorted."""
    gen = torch.Generator().manual_seed(41)
    nb = (T + LP - 1) // LP
    bi = torch.randint(-1, nb + 1, (B, T, hkv, N), generator=gen, dtype=torch.int32)
    pos = torch.arange(T) if cu is None else torch.cat(
        [torch.arange(b - a) for a, b in zip(cu.tolist(), cu.tolist()[1:])])
    bi[..., 0] = (pos // LP).view(1, T, 1).to(torch.int32)  # the current block
    return bi


@MODES
def test_gradcheck_selected_attn(varlen):
    B, T, cu = _mode(varlen)
    q, k, v = _t(B, T, 4, 3), _t(B, T, 2, 3), _t(B, T, 2, 2)
    bi = _block_indices(B, T, 2, cu)

    def fn(q, k, v):
        o, lse = nsa_cuda.selected_attn(q, k, v, bi, slc_block_size=LP, cu_seqlens=cu)
        return o, lse_for_loss(lse)
    _gc(fn, (q, k, v))


@MODES
def test_gradcheck_window_attn(varlen):
    B, T, cu = _mode(varlen)
    q, k, v = _t(B, T, 2, 3), _t(B, T, 1, 3), _t(B, T, 1, 4)

    def fn(q, k, v):
        o, lse = nsa_cuda.window_attn(q, k, v, window_size=W, cu_seqlens=cu, scale=0.7)
        return o, lse_for_loss(lse)
    _gc(fn, (q, k, v))


@pytest.mark.parametrize("num_branches", [1, 2, 3])
def test_gradcheck_gate_combine(num_branches):
    """The gated sum's own backward (gate_combine_bwd), one to three branches, the
    outputs read through a strided head dim."""
    outputs = [torch.randn(2, 5, 6, 4, dtype=F64)[:, :, ::2].requires_grad_()
               for _ in range(num_branches)]
    gates = [torch.rand(2, 5, 3, dtype=F64, requires_grad=True) for _ in range(num_branches)]
    _gc(lambda *a: nsa_cuda.gate_combine(a[:num_branches], a[num_branches:]),
        (*outputs, *gates))


@MODES
@pytest.mark.parametrize("kv_cmp", ["mean", "given"])
def test_gradcheck_sparse_attn(varlen, kv_cmp):
    """End to end with fixed block indices. kv_cmp='mean': k_cmp None, so the gradient
    also flows through mean_compress into k and v."""
    B, T, cu = _mode(varlen)
    q, k, v = _t(B, T, 4, 3), _t(B, T, 2, 3), _t(B, T, 2, 2)
    gates = [_t(B, T, 4) for _ in range(3)]
    bi = _block_indices(B, T, 2, cu)
    inputs = [q, k, v, *gates]
    if kv_cmp == "given":
        rows = T // D if varlen else R.num_cmp_blocks(T, L, D) + 1  # one extra row
        inputs += [_t(B, rows, 2, 3), _t(B, rows, 2, 2)]
    kw = dict(cmp_block_size=L, cmp_stride=D, slc_block_size=LP, slc_num_blocks=N,
              slc_init_blocks=0, slc_local_blocks=1, window_size=W, block_indices=bi,
              cu_seqlens=cu, return_aux=True)

    def fn(q, k, v, gc, gs, gw, kc=None, vc=None):
        o, aux = nsa_cuda.sparse_attn(q, k, v, gc, gs, gw, kc, vc, **kw)
        return (o, lse_for_loss(aux["lse_cmp"]), lse_for_loss(aux["lse_slc"]),
                lse_for_loss(aux["lse_win"]))
    _gc(fn, tuple(inputs))


def test_gradcheck_sparse_attn_with_selection():
    """Selection inside the op (no gradient through it): the gradient is that of the
    fixed selection, so gradcheck passes as long as no perturbation flips a choice."""
    B, T = 1, 16
    q, k, v = _t(B, T, 2, 3), _t(B, T, 1, 3), _t(B, T, 1, 2)
    gates = [_t(B, T, 2) for _ in range(3)]
    kw = dict(cmp_block_size=L, cmp_stride=D, slc_block_size=LP, slc_num_blocks=2,
              slc_init_blocks=0, slc_local_blocks=1, window_size=W)
    _gc(lambda *a: nsa_cuda.sparse_attn(*a, **kw), (q, k, v, *gates))
