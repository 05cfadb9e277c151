"""Tests of nsa_cuda.NativeSparseAttention (nsa_cuda/layer.py).

Small shapes with the NSA settings scaled down (l=8, d=4, l'=8, n=4, w=16) so that
every branch, the selection and the compression matter at T ~ 70.
"""
import itertools
import os

import pytest
import torch

import nsa_cuda
from nsa_cuda import reference as ref

HIDDEN, HQ, HKV, DK, DV = 32, 4, 2, 16, 8
NSA = dict(cmp_block_size=8, cmp_stride=4, slc_block_size=8, slc_num_blocks=4,
           slc_init_blocks=1, slc_local_blocks=2, window_size=16)
LENS = [70, 37, 5, 64, 8]  # includes a sequence shorter than l (no compressed block)

CASES = list(itertools.product(["mlp", "mean"], [False, True]))
IDS = [f"{phi}-{'indep' if ind else 'shared'}kv" for phi, ind in CASES]


def make_layer(compression="mlp", independent_kv=False, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    layer = nsa_cuda.NativeSparseAttention(HIDDEN, HQ, HKV, DK, DV, compression=compression,
                                           independent_kv=independent_kv, **{**NSA, **kw})
    layer = layer.to(dtype)
    with torch.no_grad():  # non-trivial gates and phi (the defaults start near 0.5 / mean)
        layer.g_proj.bias.uniform_(-2, 2)
        if compression == "mlp":
            for phi in (layer.k_phi, layer.v_phi):
                phi.w2.normal_(0, 0.3)
                phi.b2.normal_(0, 0.3)
                phi.pos.normal_(0, 0.5)
    return layer


def packed(dtype=torch.float64, lens=LENS, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(1, n, HIDDEN, generator=g, dtype=dtype) for n in lens]
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
    return xs, torch.cat(xs, dim=1), cu


def _each_tensor(p, fn):
    """NSAInputs with fn applied once per distinct tensor: a shared KV set stays one
    tensor (reference_attention checks that)."""
    done = {}
    return type(p)(*[None if t is None else done[id(t)] if id(t) in done else done.setdefault(id(t), fn(t))
                     for t in p])


def reference_attention(layer, p, cu_seqlens=None, block_indices=None):
    """The spec's NSA on the layer's projected inputs, with nsa_cuda.reference (and
    these block_indices instead of its own selection, when given)."""
    l, d = layer.cmp_block_size, layer.cmp_stride
    slc = (layer.slc_block_size, layer.slc_num_blocks, layer.slc_init_blocks,
           layer.slc_local_blocks)
    if not layer.independent_kv:
        assert p.k_slc is p.k_win and p.v_slc is p.v_win
        return ref.sparse_attn(p.q, p.k_slc, p.v_slc, p.g_cmp, p.g_slc, p.g_win, p.k_cmp, p.v_cmp,
                               cmp_block_size=l, cmp_stride=d, slc_block_size=slc[0],
                               slc_num_blocks=slc[1], slc_init_blocks=slc[2],
                               slc_local_blocks=slc[3], window_size=layer.window_size,
                               scale=layer.scale, cu_seqlens=cu_seqlens,
                               block_indices=block_indices)
    o_cmp, _ = ref.compressed_attn(p.q, p.k_cmp, p.v_cmp, l, d, layer.scale, cu_seqlens)
    bi = block_indices
    if bi is None:
        bi, _ = ref.select_blocks(p.q, p.k_cmp, l, d, *slc, layer.scale, cu_seqlens)
    o_slc, _ = ref.selected_attn(p.q, p.k_slc, p.v_slc, bi, slc[0], layer.scale, cu_seqlens)
    o_win, _ = ref.window_attn(p.q, p.k_win, p.v_win, layer.window_size, layer.scale, cu_seqlens)
    return (p.g_cmp.unsqueeze(-1) * o_cmp + p.g_slc.unsqueeze(-1) * o_slc
            + p.g_win.unsqueeze(-1) * o_win)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("compression,independent_kv", CASES, ids=IDS)
def test_shapes_and_dtypes(compression, independent_kv, dtype):
    layer = make_layer(compression, independent_kv, dtype)
    x = torch.randn(3, 45, HIDDEN, dtype=dtype)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == dtype and torch.isfinite(y).all()
    p = layer.project(x)
    tc = ref.num_cmp_blocks(45, NSA["cmp_block_size"], NSA["cmp_stride"])
    assert p.q.shape == (3, 45, HQ, DK) and p.k_slc.shape == (3, 45, HKV, DK)
    assert p.v_win.shape == (3, 45, HKV, DV)
    assert p.k_cmp.shape == (3, tc, HKV, DK) and p.v_cmp.shape == (3, tc, HKV, DV)
    assert all(g.shape == (3, 45, HQ) for g in (p.g_cmp, p.g_slc, p.g_win))
    assert (p.k_slc is not p.k_win) == independent_kv
    # shorter than one compressed block: no compressed rows, still a valid output
    y = layer(torch.randn(2, 5, HIDDEN, dtype=dtype))
    assert y.shape == (2, 5, HIDDEN) and torch.isfinite(y).all()


@pytest.mark.parametrize("compression,independent_kv", CASES, ids=IDS)
def test_matches_reference(compression, independent_kv):
    layer = make_layer(compression, independent_kv)
    x = torch.randn(2, 70, HIDDEN, dtype=torch.float64)
    p = layer.project(x)
    torch.testing.assert_close(layer.attend(p), reference_attention(layer, p))
    # varlen
    _, xp, cu = packed()
    p = layer.project(xp, cu)
    torch.testing.assert_close(layer.attend(p, cu, max(LENS)), reference_attention(layer, p, cu))


@pytest.mark.parametrize("compression,independent_kv", CASES, ids=IDS)
def test_varlen_equals_separate_sequences(compression, independent_kv):
    layer = make_layer(compression, independent_kv)
    xs, xp, cu = packed()
    y = layer(xp, cu, max(LENS))
    expected = torch.cat([layer(x) for x in xs], dim=1)
    torch.testing.assert_close(y, expected)
    # and the packed compressed rows: sequence i's blocks start at sum_{m<i} Tc(len_m)
    p = layer.project(xp, cu)
    l, d = NSA["cmp_block_size"], NSA["cmp_stride"]
    assert p.k_cmp.shape[1] == xp.shape[1] // d
    row = 0
    for x in xs:
        kc = layer.project(x).k_cmp[0]
        torch.testing.assert_close(p.k_cmp[0, row:row + kc.shape[0]], kc)
        row += kc.shape[0]
    assert (p.k_cmp[0, row:] == 0).all() and (p.v_cmp[0, row:] == 0).all()
    # the varlen gradient equals the separate sequences' gradient
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(layer.parameters()), gy, allow_unused=True)
    grads_sep = torch.autograd.grad(expected, list(layer.parameters()), gy, allow_unused=True)
    for a, b in zip(grads, grads_sep):
        torch.testing.assert_close(a, b)


def test_mean_compression_is_mean_compress():
    layer = make_layer("mean")
    x = torch.randn(2, 70, HIDDEN, dtype=torch.float64)
    p = layer.project(x)
    l, d = NSA["cmp_block_size"], NSA["cmp_stride"]
    torch.testing.assert_close(p.k_cmp, ref.mean_compress(p.k_slc, l, d))
    torch.testing.assert_close(p.v_cmp, ref.mean_compress(p.v_slc, l, d))


def test_mlp_compression_matches_a_loop():
    """phi(block) = mean + W2 gelu(W1 flatten(block + pos) + b1) + b2, per KV head."""
    layer = make_layer("mlp", independent_kv=True)
    x = torch.randn(2, 40, HIDDEN, dtype=torch.float64)
    p = layer.project(x)
    k_all = layer._rope(layer.k_proj(x).view(2, 40, 3, HKV, DK), torch.arange(40))[:, :, 0]
    l, d = NSA["cmp_block_size"], NSA["cmp_stride"]
    phi = layer.k_phi
    for b, i, h in itertools.product(range(2), range(ref.num_cmp_blocks(40, l, d)), range(HKV)):
        blk = k_all[b, i * d:i * d + l, h]  # [l, DK]
        hid = torch.nn.functional.gelu((blk + phi.pos[h]).reshape(-1) @ phi.w1[h] + phi.b1[h])
        expected = blk.mean(0) + hid @ phi.w2[h] + phi.b2[h]
        torch.testing.assert_close(p.k_cmp[b, i, h], expected)


@pytest.mark.parametrize("compression,independent_kv", CASES, ids=IDS)
def test_gradients_reach_every_parameter(compression, independent_kv):
    layer = make_layer(compression, independent_kv, torch.float32)
    x = torch.randn(2, 70, HIDDEN, requires_grad=True)
    layer(x).square().sum().backward()
    names = dict(layer.named_parameters())
    expected = {"q_proj.weight", "k_proj.weight", "v_proj.weight", "g_proj.weight",
                "g_proj.bias", "o_proj.weight"}
    if compression == "mlp":
        expected |= {f"{kv}_phi.{n}" for kv in "kv" for n in ("pos", "w1", "b1", "w2", "b2")}
    assert set(names) == expected
    for name, prm in names.items():
        assert prm.grad is not None, name
        assert torch.isfinite(prm.grad).all(), name
        assert prm.grad.abs().sum() > 0, name
    if independent_kv:  # each branch's k/v projection rows get a gradient
        for w, dim in ((layer.k_proj.weight, DK), (layer.v_proj.weight, DV)):
            for part in w.grad.view(3, HKV * dim, HIDDEN):
                assert part.abs().sum() > 0
    # gradients of the inputs too
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_gradients_match_reference():
    """Autograd through the layer (nsa_cuda ops) == autograd through the reference."""
    layer = make_layer("mlp", independent_kv=False)
    x = torch.randn(2, 70, HIDDEN, dtype=torch.float64)
    p = layer.project(x)
    gy = torch.randn(2, 70, HQ, DV, dtype=torch.float64)
    params = list(layer.parameters())
    got = torch.autograd.grad(layer.attend(p), params, gy, allow_unused=True, retain_graph=True)
    want = torch.autograd.grad(reference_attention(layer, p), params, gy, allow_unused=True)
    for name, a, b in zip(dict(layer.named_parameters()), got, want):
        torch.testing.assert_close(a, b, msg=name)


def test_branches_window_only():
    """branches=("win",) is sliding-window attention (the demo's baseline)."""
    layer = make_layer("mean", branches=("win",))
    x = torch.randn(2, 50, HIDDEN, dtype=torch.float64)
    p = layer.project(x)
    assert p.g_cmp is None and p.g_slc is None
    o_win, _ = ref.window_attn(p.q, p.k_win, p.v_win, NSA["window_size"], layer.scale)
    torch.testing.assert_close(layer.attend(p), p.g_win.unsqueeze(-1) * o_win)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_kv_heads"):
        nsa_cuda.NativeSparseAttention(32, 4, 3)
    with pytest.raises(ValueError, match="compression"):
        nsa_cuda.NativeSparseAttention(32, 4, compression="max")
    with pytest.raises(ValueError, match="cmp_stride"):
        nsa_cuda.NativeSparseAttention(32, 4, cmp_block_size=30, cmp_stride=16)
    with pytest.raises(ValueError, match="branches"):
        nsa_cuda.NativeSparseAttention(32, 4, branches=("full",))
    layer = make_layer()
    with pytest.raises(ValueError, match="packed"):
        layer(torch.randn(2, 10, HIDDEN, dtype=torch.float64),
              torch.tensor([0, 10], dtype=torch.int32))


# two cases cover both phis and both kv modes (each compile takes ~10-20 s on 2 cores)
@pytest.mark.parametrize("compression,independent_kv", [("mlp", True), ("mean", False)],
                         ids=["mlp-indepkv", "mean-sharedkv"])
def test_compile_fullgraph_aot_eager(compression, independent_kv):
    torch._dynamo.reset()
    layer = make_layer(compression, independent_kv, torch.float32)
    x = torch.randn(2, 70, HIDDEN, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
    gx, = torch.autograd.grad(y.sum(), x)
    gx_eager, = torch.autograd.grad(layer(x).sum(), x)
    torch.testing.assert_close(gx, gx_eager, rtol=1e-4, atol=1e-5)
    # varlen, with max_seqlen (no host sync)
    _, xp, cu = packed(torch.float32)
    fn = torch.compile(lambda h, c: layer(h, c, max(LENS)), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(xp, cu), layer(xp, cu, max(LENS)), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(os.environ.get("NSA_SKIP_INDUCTOR") == "1",
                    reason="NSA_SKIP_INDUCTOR=1 (inductor's C++ compile takes ~25 s on 2 idle cores)")
def test_compile_fullgraph_inductor():
    torch._dynamo.reset()
    layer = make_layer("mlp", independent_kv=True, dtype=torch.float32)
    x = torch.randn(2, 40, HIDDEN, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    y = compiled(x)
    torch.testing.assert_close(y, layer(x), rtol=1e-4, atol=1e-5)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compression,independent_kv", CASES, ids=IDS)
def test_cuda_bf16(compression, independent_kv):
    """bf16 on CUDA (head dims 64/64, one of the kernels' instantiations) against the
    fp64 reference on the same projected inputs and with the block_indices the CUDA
    selection chose (top-n may flip near ties, spec), by the spec's tolerance rule."""
    torch.manual_seed(0)
    layer = nsa_cuda.NativeSparseAttention(256, 4, 2, 64, 64, compression=compression,
                                           independent_kv=independent_kv, cmp_block_size=32,
                                           cmp_stride=16, slc_block_size=64, slc_num_blocks=4,
                                           window_size=128).cuda().bfloat16()
    x = torch.randn(2, 600, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    p = layer.project(x)
    o, bi = layer.attend(p, return_block_indices=True)
    assert o.dtype == torch.bfloat16 and torch.isfinite(o).all()
    want = reference_attention(layer, _each_tensor(p, lambda t: t.detach().double()), block_indices=bi)
    want_lp = reference_attention(layer, _each_tensor(p, lambda t: t.detach()), block_indices=bi)
    tol = 2 * (want_lp.double() - want).abs().max().item() + 1e-5
    err = (o.double() - want).abs().max().item()
    assert err <= tol, f"max error {err:.3e} > tolerance {tol:.3e}"
    y = layer(x)
    y.float().square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
