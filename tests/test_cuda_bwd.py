"""CUDA backward kernels against the fp64 reference (NSA_SPEC "Precision and
tolerances"): every gradient (q, k, v, k_cmp, v_cmp, and the gates through the
public sparse_attn) satisfies max|x - ref| <= 2 * max|ref_lp - ref| + 1e-5, where
ref is the gradient of nsa_cuda.reference in fp64 and ref_lp the same in the
input dtype on the GPU. Also: two backward runs are bitwise equal, gradients are
NaN-poisoned before the launch (NSA_POISON_OUTPUTS, set by test_cuda_fwd's
import), and 50 optimizer steps of NativeSparseAttention lower the loss.

The loss of a branch is sum(o * do) + sum(lse * dlse) over the rows with a finite
lse, so dlse reaches the kernels too.
"""
import pytest
import torch

from test_cuda_fwd import (  # noqa: F401  (sets NSA_POISON_OUTPUTS=1 first)
    DEV, DTYPES, GROUPS, HEAD_DIMS, OPS, PAPER, _id, assert_close, mainloop, make_cu, rand,
    random_block_indices)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

if torch.cuda.is_available():
    import nsa_cuda
    from nsa_cuda import reference as ref


# --------------------------------------------------------------------------- helpers

def _loss_grads(fn, inputs, dtype, do, dlse):
    """Gradients of sum(o*do) + sum(lse*dlse) (finite lse) of fn(*inputs) in `dtype`."""
    leaves = [x.detach().to(dtype).requires_grad_(True) for x in inputs]
    o, lse = fn(*leaves)
    fin = torch.isfinite(lse)
    loss = (o * do.to(o.dtype)).sum() + torch.where(fin, lse, 0).mul(dlse.to(lse.dtype)).sum()
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def check_branch_bwd(name, fwd_op, bwd_op, ref_fn, q, k, v, extra, size, cu=None,
                     max_seqlen=None, names=("q", "k", "v"), scale=None):
    """CUDA forward + backward of one branch against the reference's gradients."""
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ms = max_seqlen if max_seqlen is not None else q.shape[1]
    o, lse = fwd_op(q, k, v, *extra, cu, ms, size, scale)
    do = rand(*o.shape, dtype=dtype)
    dlse = torch.randn(lse.shape, device=lse.device) * torch.isfinite(lse)
    grads = bwd_op(do, dlse, q, k, v, *extra, o, lse, cu, ms, size, scale)

    def f(q_, k_, v_):
        return ref_fn(q_, k_, v_, *extra, size, scale=scale, cu_seqlens=cu)

    g64 = _loss_grads(f, (q, k, v), torch.float64, do, dlse)
    g_lp = _loss_grads(f, (q, k, v), dtype, do, dlse)
    for n, x, r64, r_lp in zip(names, grads, g64, g_lp):
        r64 = torch.zeros_like(x, dtype=torch.float64) if r64 is None else r64
        r_lp = torch.zeros_like(x) if r_lp is None else r_lp
        assert_close(x, r64, r_lp, f"d{n}_{name}")
    return grads


# The compressed ops take two sizes (l, d): adapt them to check_branch_bwd's one `size`.
def _cmp_fwd(q, k, v, cu, ms, size, scale):
    return OPS.compressed_attn_fwd(q, k, v, cu, ms, *size, scale)


def _cmp_bwd(do, dlse, q, k, v, o, lse, cu, ms, size, scale):
    return OPS.compressed_attn_bwd(do, dlse, q, k, v, o, lse, cu, ms, *size, scale)


def _cmp_ref(q, k, v, size, scale, cu_seqlens):
    return ref.compressed_attn(q, k, v, *size, scale=scale, cu_seqlens=cu_seqlens)


def check_compressed_bwd(q, kc, vc, l, d, cu=None, max_seqlen=None, scale=None):
    return check_branch_bwd("cmp", _cmp_fwd, _cmp_bwd, _cmp_ref, q, kc, vc, (), (l, d), cu,
                            max_seqlen, names=("q", "k_cmp", "v_cmp"), scale=scale)


def check_selected_bwd(q, k, v, bi, lp, cu=None, max_seqlen=None, scale=None):
    return check_branch_bwd("slc", OPS.selected_attn_fwd, OPS.selected_attn_bwd, ref.selected_attn,
                            q, k, v, (bi,), lp, cu, max_seqlen, scale=scale)


def check_window_bwd(q, k, v, w, cu=None, max_seqlen=None, scale=None):
    return check_branch_bwd("win", OPS.window_attn_fwd, OPS.window_attn_bwd, ref.window_attn,
                            q, k, v, (), w, cu, max_seqlen, scale=scale)


def qkv(B, T, Hkv, G, dk, dv, dtype):
    return (rand(B, T, Hkv * G, dk, dtype=dtype), rand(B, T, Hkv, dk, dtype=dtype),
            rand(B, T, Hkv, dv, dtype=dtype))


def cmp_kv(k, v, l, d, cu=None):
    return OPS.mean_compress(k, cu, l, d), OPS.mean_compress(v, cu, l, d)


def check_added_grads(q, k, v, kc, vc, bi, lp, w, cu=None, max_seqlen=None):
    """Each backward op with dq_in, dk_in, dv_in returns its own gradients plus them,
    summed in fp32 and rounded once, bitwise: every row, varlen padding rows (where
    the branch sends nothing) included. sparse_attn's backward sums its branches so."""
    ms = max_seqlen if max_seqlen is not None else q.shape[1]
    s = q.shape[-1] ** -0.5
    l, d = 32, 16
    for name, fwd, bwd, kk, vv, extra, size in (
            ("cmp", _cmp_fwd, _cmp_bwd_added, kc, vc, (), (l, d)),
            ("slc", OPS.selected_attn_fwd, OPS.selected_attn_bwd, k, v, (bi,), lp),
            ("win", OPS.window_attn_fwd, OPS.window_attn_bwd, k, v, (), w)):
        o, lse = fwd(q, kk, vv, *extra, cu, ms, size, s)
        o = torch.nan_to_num(o)  # varlen padding rows (poisoned, never written)
        lse = torch.nan_to_num(lse, nan=float("-inf"), neginf=float("-inf"))
        do = rand(*o.shape, dtype=q.dtype)
        args = (do, None, q, kk, vv, *extra, o, lse, cu, ms, size, s)
        base = bwd(*args)
        added = [rand(*x.shape, dtype=x.dtype) for x in (q, kk, vv)]
        got = bwd(*args, *added)
        for n, g, b, a in zip(("dq", "dk", "dv"), got, base, added):
            want = (b.float() + a.float()).to(b.dtype)
            assert torch.equal(g, want), f"{name} {n}: the added gradient differs"


def _cmp_bwd_added(do, dlse, q, k, v, o, lse, cu, ms, size, scale, *added):
    return OPS.compressed_attn_bwd(do, dlse, q, k, v, o, lse, cu, ms, *size, scale, *added)


def _bwd_given_delta(ops, name, do, dlse, q, k, v, extra, o, lse, cu, ms, size, scale, delta,
                     dout_scale=None):
    sizes = size if name == "cmp" else (size,)
    op = {"cmp": ops.compressed_attn_bwd, "slc": ops.selected_attn_bwd,
          "win": ops.window_attn_bwd}[name]
    return op(do, dlse, q, k, v, *extra, o, lse, cu, ms, *sizes, scale, delta=delta,
              dout_scale=dout_scale)


def check_given_delta(q, k, v, kc, vc, bi, lp, w, cu=None, max_seqlen=None, scaled=False,
                      given=True):
    """A backward op given delta (sparse_attn hands it the gate kernel's row dots) uses
    it, with dlse subtracted and 0 where lse = -inf: against the CPU op given the same
    delta, in fp64 and in the input dtype. The delta has noise added, so an op that
    recomputed its own would fail. `scaled`: the output gradient is g * do through
    dout_scale (a strided float32 gate with negative entries and zeros), as in
    sparse_attn's backward; `given=False`: the op computes its delta (of g * do)."""
    ms = max_seqlen if max_seqlen is not None else q.shape[1]
    s = q.shape[-1] ** -0.5
    cpu = torch.ops.nsa_cuda
    for name, fwd, kk, vv, extra, size in (("cmp", _cmp_fwd, kc, vc, (), (32, 16)),
                                           ("slc", OPS.selected_attn_fwd, k, v, (bi,), lp),
                                           ("win", OPS.window_attn_fwd, k, v, (), w)):
        o, lse = fwd(q, kk, vv, *extra, cu, ms, size, s)
        o = torch.nan_to_num(o)
        lse = torch.nan_to_num(lse, nan=float("-inf"), neginf=float("-inf"))
        do = rand(*o.shape, dtype=q.dtype)
        dlse = torch.randn(lse.shape, device=lse.device) * torch.isfinite(lse)
        g = None
        if scaled:  # [B, T, Hq] seen through a [B, Hq, T] tensor; every 5th row 0
            g = torch.randn(lse.shape, device=lse.device).transpose(1, 2)
            g[:, ::5] = 0
        delta = None
        if given:
            delta = (o.float() * do.float()).sum(-1).transpose(1, 2) + torch.randn(
                lse.shape, device=lse.device)
        tensors = (do, dlse, q, kk, vv, *extra, o, lse, cu, delta, g)
        got = _bwd_given_delta(OPS, name, do, dlse, q, kk, vv, extra, o, lse, cu, ms, size, s,
                               delta, g)

        def on_cpu(dt):
            lse_dtype = torch.float64 if dt == torch.float64 else torch.float32

            def cast(t):  # q's dtype -> dt, the float32 lse-like tensors -> lse_dtype
                if t is None or not t.is_floating_point():
                    return None if t is None else t.cpu()
                return t.cpu().to(dt if t.dtype == q.dtype else lse_dtype)
            c = [cast(t) for t in tensors]
            c_do, c_dlse, c_q, c_k, c_v = c[:5]
            c_extra = tuple(c[5:5 + len(extra)])
            c_o, c_lse, c_cu, c_delta, c_g = c[5 + len(extra):]
            return _bwd_given_delta(cpu, name, c_do, c_dlse, c_q, c_k, c_v, c_extra, c_o, c_lse,
                                    c_cu, ms, size, s, c_delta, c_g)

        # The spec's rule, with 4x instead of 2x: r_lp is the CPU op (fp32 inside), whose
        # error is smaller than the reference's in the input dtype that the other tests
        # use, while the kernels round P to 16 bits. A delta used wrongly (ignored, dlse
        # not subtracted) is off by the noise, errors near 1e-1.
        r64, r_lp = on_cpu(torch.float64), on_cpu(q.dtype)
        for n, x, a, b in zip(("dq", "dk", "dv"), got, r64, r_lp):
            x, a, b = x.detach().double().cpu(), a.double(), b.double()
            assert not torch.isnan(x).any(), f"{n}_{name}: NaN"
            err, lp = (x - a).abs().max().item(), (b - a).abs().max().item()
            assert err <= 4 * lp + 1e-5, (f"{n}_{name} (given delta {given}, scaled {scaled}): "
                                          f"{err:.3e} > 4 * {lp:.3e}")


def test_given_delta():
    q, k, v = qkv(1, 130, 2, 2, 64, 64, torch.bfloat16)
    bi = random_block_indices(1, 130, 2, 3, 32, seed=4)
    check_given_delta(q, k, v, *cmp_kv(k, v, 32, 16), bi, 32, 40)


def varlen_inputs(dk, dv, dtype, padding=0):
    """Three packed sequences (5, 70 and 40 tokens) and `padding` rows past them, G = 3
    on one kv head, block 0 selected for every token: ((q, k, v, k_cmp, v_cmp,
    block_indices), dict(cu_seqlens, max_seqlen)) for the check_* helpers."""
    lengths = [5, 70, 40]
    cu, total = make_cu(lengths), sum(lengths)
    q, k, v = qkv(1, total + padding, 1, 3, dk, dv, dtype)
    bi = torch.full((1, total + padding, 1, 2), -1, dtype=torch.int32, device=DEV)
    bi[..., 0] = 0
    return (q, k, v, *cmp_kv(k, v, 32, 16, cu), bi), dict(cu=cu, max_seqlen=max(lengths))


def test_given_delta_varlen():
    args, kw = varlen_inputs(64, 64, torch.float16)
    check_given_delta(*args, 32, 16, **kw)


@pytest.mark.parametrize("given", [True, False], ids=["given_delta", "own_delta"])
def test_dout_scale(given, mainloop):
    """The branch backward scaling one d o by the branch's gate (sparse_attn's backward)."""
    q, k, v = qkv(1, 130, 2, 2, 64, 64, torch.bfloat16)
    bi = random_block_indices(1, 130, 2, 3, 32, seed=5)
    check_given_delta(q, k, v, *cmp_kv(k, v, 32, 16), bi, 32, 40, scaled=True, given=given)


def test_dout_scale_varlen():
    args, kw = varlen_inputs(64, 64, torch.float16, padding=5)
    check_given_delta(*args, 32, 16, **kw, scaled=True)


def test_added_grads(mainloop):
    q, k, v = qkv(2, 150, 2, 4, 128, 128, torch.bfloat16)
    bi = random_block_indices(2, 150, 2, 3, 32, seed=3)
    check_added_grads(q, k, v, *cmp_kv(k, v, 32, 16), bi, 32, 40)


def test_added_grads_varlen_padding(mainloop):
    args, kw = varlen_inputs(64, 64, torch.float16, padding=7)
    check_added_grads(*args, 32, 16, **kw)


# --------------------------------------------------------------------------- the grid

@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("dims", HEAD_DIMS, ids=_id)
@pytest.mark.parametrize("G", GROUPS)
def test_compressed_bwd(dims, dtype, G, mainloop):
    q, k, v = qkv(2, 300, 2, G, *dims, dtype)
    check_compressed_bwd(q, *cmp_kv(k, v, 32, 16), 32, 16)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("dims", HEAD_DIMS, ids=_id)
@pytest.mark.parametrize("G", GROUPS)
def test_selected_bwd(dims, dtype, G, mainloop):
    q, k, v = qkv(2, 300, 2, G, *dims, dtype)
    check_selected_bwd(q, k, v, random_block_indices(2, 300, 2, 3, 32, seed=G), 32)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("dims", HEAD_DIMS, ids=_id)
@pytest.mark.parametrize("G", GROUPS)
def test_window_bwd(dims, dtype, G, mainloop):
    q, k, v = qkv(2, 300, 2, G, *dims, dtype)
    check_window_bwd(q, k, v, 100)


@pytest.mark.parametrize("T", [1, 20, 31, 32, 33, 47, 129, 1000])
def test_compressed_bwd_lengths(T, mainloop):
    q, k, v = qkv(1, T, 1, 4, 64, 64, torch.bfloat16)
    check_compressed_bwd(q, *cmp_kv(k, v, 32, 16), 32, 16)


@pytest.mark.parametrize("T,lp,n", [(1, 64, 16), (20, 64, 4), (130, 64, 2), (333, 16, 5),
                                    (257, 128, 3), (300, 32, 8)])
def test_selected_bwd_lengths(T, lp, n, mainloop):
    q, k, v = qkv(1, T, 1, 4, 64, 64, torch.float16)
    check_selected_bwd(q, k, v, random_block_indices(1, T, 1, n, lp, seed=T), lp)


@pytest.mark.parametrize("chunk_rows", ["64", "1000"])
def test_bwd_split(chunk_rows, mainloop, monkeypatch):
    """NSA_DKV_CHUNK_ROWS small: the compressed and selected dk/dv split each key
    tile's queries into chunks (fp32 partial sums, then the reduce kernel; the
    selected branch's chunk counts from the device-side plan), batch and varlen,
    with duplicate block ids, block 0 chosen by every token and gradients to add
    (test_bwd_bitwise_repeatable runs the split twice)."""
    monkeypatch.setenv("NSA_DKV_CHUNK_ROWS", chunk_rows)
    q, k, v = qkv(2, 1500, 2, 4, 128, 128, torch.bfloat16)
    check_compressed_bwd(q, *cmp_kv(k, v, 32, 16), 32, 16)
    check_selected_bwd(q, k, v, random_block_indices(2, 1500, 2, 6, 64, seed=11), 64)
    lengths = [1, 17, 1200, 64, 333]
    cu, total, ms = make_cu(lengths), sum(lengths), max(lengths)
    q, k, v = qkv(1, total, 2, 3, 192, 128, torch.float16)
    check_compressed_bwd(q, *cmp_kv(k, v, 32, 16, cu), 32, 16, cu=cu, max_seqlen=ms)
    bi = random_block_indices(1, total, 2, 4, 64, lengths=lengths, seed=12)
    check_selected_bwd(q, k, v, bi, 64, cu=cu, max_seqlen=ms)
    args, kw = varlen_inputs(64, 64, torch.bfloat16, padding=7)
    check_added_grads(*args, 32, 16, **kw)


@pytest.mark.parametrize("T,w", [(1, 512), (20, 512), (300, 1), (300, 64), (300, 65),
                                 (1000, 512), (130, 129)])
def test_window_bwd_lengths(T, w, mainloop):
    q, k, v = qkv(1, T, 1, 2, 64, 64, torch.bfloat16)
    check_window_bwd(q, k, v, w)


@pytest.mark.parametrize("dims", HEAD_DIMS, ids=_id)
def test_bwd_varlen(dims, mainloop):
    lengths = [1, 17, 300, 64, 129]
    cu, total, ms = make_cu(lengths), sum(lengths), max(lengths)
    q, k, v = qkv(1, total, 2, 2, *dims, torch.float16)
    check_compressed_bwd(q, *cmp_kv(k, v, 32, 16, cu), 32, 16, cu=cu, max_seqlen=ms)
    bi = random_block_indices(1, total, 2, 3, 32, lengths=lengths, seed=5)
    check_selected_bwd(q, k, v, bi, 32, cu=cu, max_seqlen=ms)
    check_window_bwd(q, k, v, 100, cu=cu, max_seqlen=ms)


@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_bwd_nonpositive_scale(scale):
    """The dq kernel masks scores with -inf; with scale <= 0, scaling a masked entry
    gives +inf or NaN, so masked entries must get probability 0 for any scale."""
    q, k, v = qkv(1, 200, 1, 2, 64, 64, torch.bfloat16)
    check_compressed_bwd(q, *cmp_kv(k, v, 32, 16), 32, 16, scale=scale)
    check_selected_bwd(q, k, v, random_block_indices(1, 200, 1, 3, 32, seed=3), 32, scale=scale)
    check_window_bwd(q, k, v, 50, scale=scale)


def test_bwd_empty_rows_ignore_dlse():
    """Rows with lse = -inf (no visible key) get no gradient whatever dlse holds there:
    an infinite dlse must not turn P * (dP - delta) = 0 * inf into NaN."""
    q, k, v = qkv(1, 100, 1, 2, 64, 64, torch.bfloat16)
    kc, vc = cmp_kv(k, v, 32, 16)
    scale = 64 ** -0.5
    o, lse = OPS.compressed_attn_fwd(q, kc, vc, None, 100, 32, 16, scale)
    empty = lse == float("-inf")
    assert empty.any() and not empty.all()
    do = rand(*o.shape, dtype=o.dtype)
    dlse = torch.randn(lse.shape, device=lse.device) * ~empty
    g0 = OPS.compressed_attn_bwd(do, dlse, q, kc, vc, o, lse, None, 100, 32, 16, scale)
    g1 = OPS.compressed_attn_bwd(do, torch.where(empty, float("inf"), dlse), q, kc, vc, o, lse,
                                 None, 100, 32, 16, scale)
    for name, a, b in zip(("q", "k_cmp", "v_cmp"), g0, g1):
        assert torch.equal(a, b), f"d{name}: an infinite dlse on an empty row changed it"


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_mean_compress_bwd(dtype):
    for cu, shape in ((None, (2, 300, 3, 64)), (make_cu([1, 17, 200, 64, 333]), (1, 615, 2, 128))):
        x = rand(*shape, dtype=dtype)
        g = rand(*OPS.mean_compress(x, cu, 32, 16).shape, dtype=dtype)
        dx = OPS.mean_compress_bwd(g, x, cu, 32, 16)

        def grad(dt):
            xx = x.detach().to(dt).requires_grad_(True)
            (ref.mean_compress(xx, 32, 16, cu_seqlens=cu) * g.to(dt)).sum().backward()
            return xx.grad

        assert_close(dx, grad(torch.float64), grad(dtype), "dx mean_compress")


@pytest.mark.parametrize("G", [1, 4])
def test_sparse_attn_all_grads(G):
    """The whole layer function: q, k, v and the three gates, through autograd."""
    P = dict(cmp_block_size=32, cmp_stride=16, slc_block_size=32, slc_num_blocks=4,
             slc_init_blocks=1, slc_local_blocks=2, window_size=64)
    B, T, Hkv, dk, dv, dtype = 2, 256, 2, 128, 128, torch.bfloat16
    q, k, v = qkv(B, T, Hkv, G, dk, dv, dtype)
    gates = [torch.rand(B, T, Hkv * G, device=DEV).to(dtype) for _ in range(3)]
    do = rand(B, T, Hkv * G, dv, dtype=dtype)
    # Fix the selection (it is not differentiable) so all three runs use the same blocks.
    _, aux = nsa_cuda.sparse_attn(q, k, v, *gates, return_aux=True, **P)
    bi = aux["block_indices"] if isinstance(aux, dict) else aux.block_indices

    def grads(fn, dt, dev):
        leaves = [x.detach().to(dev, dt).requires_grad_(True) for x in (q, k, v, *gates)]
        o = fn(*leaves[:3], *leaves[3:], block_indices=bi.to(dev), **P)
        return torch.autograd.grad((o * do.to(dev, dt)).sum(), leaves)

    got = grads(nsa_cuda.sparse_attn, dtype, DEV)
    r64 = grads(ref.sparse_attn, torch.float64, DEV)
    r_lp = grads(ref.sparse_attn, dtype, DEV)
    for n, x, a, b in zip(("q", "k", "v", "g_cmp", "g_slc", "g_win"), got, r64, r_lp):
        assert_close(x, a, b, f"d{n}")


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_sparse_attn_compiled(backend):
    """torch.compile(fullgraph=True) of sparse_attn's forward and backward (one autograd
    node over the CUDA ops) gives eager's output and gradients, bitwise."""
    P = dict(cmp_block_size=32, cmp_stride=16, slc_block_size=32, slc_num_blocks=4,
             slc_init_blocks=1, slc_local_blocks=2, window_size=64)
    B, T, Hkv, G = 2, 200, 2, 4
    q, k, v = qkv(B, T, Hkv, G, 64, 64, torch.bfloat16)
    gates = [torch.rand(B, T, Hkv * G, device=DEV) for _ in range(3)]
    do = rand(B, T, Hkv * G, 64, dtype=torch.bfloat16)

    def fn(*x):
        return nsa_cuda.sparse_attn(*x, **P)

    def run(f):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, *gates)]
        o = f(*leaves)
        return (o, *torch.autograd.grad((o * do).sum(), leaves))

    torch._dynamo.reset()
    eager, compiled = run(fn), run(torch.compile(fn, backend=backend, fullgraph=True))
    for n, a, b in zip(("o", "dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_win"), compiled, eager):
        assert torch.equal(a, b), f"{backend}: {n} differs from eager"


# --------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("chunk_rows", ["", "256"], ids=["default", "split256"])
def test_bwd_bitwise_repeatable(chunk_rows, mainloop, monkeypatch):
    monkeypatch.setenv("NSA_DKV_CHUNK_ROWS", chunk_rows)  # 256: the compressed dk/dv split
    B, T, Hkv, G, lp = 2, 700, 2, 4, 64
    q, k, v = qkv(B, T, Hkv, G, 128, 128, torch.bfloat16)
    kc, vc = cmp_kv(k, v, 32, 16)
    bi = random_block_indices(B, T, Hkv, 4, lp, seed=1)
    s = 128 ** -0.5
    o, lse = OPS.compressed_attn_fwd(q, kc, vc, None, T, 32, 16, s)
    os_, lses = OPS.selected_attn_fwd(q, k, v, bi, None, T, lp, s)
    ow, lsew = OPS.window_attn_fwd(q, k, v, None, T, 100, s)
    do = rand(*o.shape, dtype=q.dtype)
    dl = torch.randn(lse.shape, device=DEV) * torch.isfinite(lse)
    gates = [torch.rand(o.shape[:3], device=DEV) for _ in range(3)]
    runs = []
    for _ in range(2):
        runs.append(OPS.compressed_attn_bwd(do, dl, q, kc, vc, o, lse, None, T, 32, 16, s)
                    + OPS.selected_attn_bwd(do, None, q, k, v, bi, os_, lses, None, T, lp, s)
                    + OPS.window_attn_bwd(do, None, q, k, v, ow, lsew, None, T, 100, s)
                    + tuple(OPS.gate_combine_bwd(do, [o, os_, ow], gates)))
    for a, b in zip(*runs):
        assert torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                           b.view(torch.int16 if b.element_size() == 2 else torch.int32))


def test_gradients_poisoned_before_launch(mainloop):
    """The poison switch is on for this process: a gradient element a kernel did not
    write would be NaN; every element must be finite (zeros where nothing flows)."""
    import os
    assert os.environ.get("NSA_POISON_OUTPUTS") == "1"
    lengths = [5, 100, 40]
    cu, total = make_cu(lengths), sum(lengths)
    q, k, v = qkv(1, total + 7, 1, 3, 64, 64, torch.float16)  # 7 padding rows
    kc, vc = cmp_kv(k, v, 32, 16, cu)
    s = 0.125
    bi = torch.full((1, total + 7, 1, 2), -1, dtype=torch.int32, device=DEV)
    bi[..., 0] = 0
    for fwd, bwd, kk, vv, extra, size in (
            (_cmp_fwd, _cmp_bwd, kc, vc, (), (32, 16)),
            (OPS.selected_attn_fwd, OPS.selected_attn_bwd, k, v, (bi,), 32),
            (OPS.window_attn_fwd, OPS.window_attn_bwd, k, v, (), 16)):
        o, lse = fwd(q, kk, vv, *extra, cu, max(lengths), size, s)
        # NaN (padding rows) -> -inf; neginf too: nan_to_num would turn the -inf of a row
        # without keys into -FLT_MAX, which the backward does not read as "no key".
        o = torch.nan_to_num(o)
        lse = torch.nan_to_num(lse, nan=float("-inf"), neginf=float("-inf"))
        grads = bwd(rand(*o.shape, dtype=q.dtype), None, q, kk, vv, *extra, o, lse, cu,
                    max(lengths), size, s)
        for g in grads:
            assert torch.isfinite(g).all()
    dx = OPS.mean_compress_bwd(rand(*kc.shape, dtype=q.dtype), k, cu, 32, 16)
    assert torch.isfinite(dx).all()


# --------------------------------------------------------------------------- training

def test_training_smoke():
    torch.manual_seed(0)
    layer = nsa_cuda.NativeSparseAttention(256, 4, 2, 64, window_size=64, slc_block_size=32,
                                           slc_num_blocks=4).to(DEV).to(torch.bfloat16)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    x = torch.randn(2, 512, 256, device=DEV, dtype=torch.bfloat16)
    y = torch.randn(2, 512, 256, device=DEV, dtype=torch.bfloat16)
    losses = []
    for _ in range(50):
        opt.zero_grad(set_to_none=True)
        loss = (layer(x).float() - y.float()).pow(2).mean()
        assert torch.isfinite(loss)
        loss.backward()
        for p in layer.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------------- long (paper settings)

@pytest.mark.slow
@pytest.mark.parametrize("T", [8192, 32768])
def test_long_paper_settings_bwd(T):
    P = PAPER
    q, k, v = qkv(1, T, 1, 2, 192, 128, torch.bfloat16)
    kc, vc = cmp_kv(k, v, P["l"], P["d"])
    check_compressed_bwd(q, kc, vc, P["l"], P["d"])
    scale = 192 ** -0.5
    _, lse = OPS.compressed_attn_fwd(q, kc, vc, None, T, P["l"], P["d"], scale)
    bi = OPS.select_blocks(q, kc, lse, None, T, P["l"], P["d"], P["lp"], P["n"], P["n_init"],
                           P["n_local"], scale)
    check_selected_bwd(q, k, v, bi, P["lp"])
    check_window_bwd(q, k, v, P["w"])
