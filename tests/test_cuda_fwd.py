"""CUDA forward kernels against the fp64 reference (NSA_SPEC "Precision and
tolerances"): max|x - ref| <= 2 * max|ref_lp - ref| + 1e-5, where ref is
nsa_cuda.reference in fp64 and ref_lp the reference in the input dtype on the GPU.

The ops are called directly through torch.ops.nsa_cuda with the schemas of
csrc/api/ops.cpp. NSA_POISON_OUTPUTS=1 (set below, read once per process by the
CUDA backend) makes every op fill its outputs with NaN before the launch, so an
element a kernel forgets to write shows up as NaN.
"""
import math
import os

os.environ.setdefault("NSA_POISON_OUTPUTS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

if torch.cuda.is_available():
    import nsa_cuda  # noqa: F401  (loads nsa_cuda._C and its op registrations)
    from nsa_cuda import reference as ref

OPS = torch.ops.nsa_cuda
DEV = "cuda"
HEAD_DIMS = [(64, 64), (128, 128), (192, 128)]
DTYPES = [torch.float16, torch.bfloat16]
GROUPS = [1, 2, 4, 8, 16]
PAPER = dict(l=32, d=16, lp=64, n=16, n_init=1, n_local=2, w=512)


def _sm90_forward_unavailable():
    """None when this device and build run the wgmma forward (compressed and window
    branches, NSA_MAINLOOP=sm90), else the library's reason."""
    if not hasattr(_sm90_forward_unavailable, "reason"):
        old = os.environ.get("NSA_MAINLOOP")
        os.environ["NSA_MAINLOOP"] = "sm90"
        try:
            x = torch.rand(1, 4, 1, 64, device=DEV, dtype=torch.float16)
            OPS.window_attn_fwd(x, x, x, None, 4, 4, 0.125)
            _sm90_forward_unavailable.reason = None
        except RuntimeError as e:
            if "NSA_MAINLOOP=sm90" not in str(e):
                raise
            _sm90_forward_unavailable.reason = str(e)
        finally:
            if old is None:
                os.environ.pop("NSA_MAINLOOP")
            else:
                os.environ["NSA_MAINLOOP"] = old
    return _sm90_forward_unavailable.reason


@pytest.fixture(params=["sm90", "sm80"])
def mainloop(request, monkeypatch):
    """The two kernel families: wgmma on an H100/H200 (what "auto" picks there: the
    compressed and window forward and dq, every branch's dk/dv, and the block
    selection for G <= 128), and mma.sync (every GPU; forced on sm_90 with
    NSA_MAINLOOP)."""
    if request.param == "sm90" and _sm90_forward_unavailable():
        pytest.skip(_sm90_forward_unavailable())
    monkeypatch.setenv("NSA_MAINLOOP", request.param)
    return request.param


def _id(x):
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    if isinstance(x, tuple):
        return "x".join(map(str, x))
    return str(x)


def num_cmp(T, l, d):
    return 0 if T < l else (T - l) // d + 1


def rand(*shape, dtype):
    return torch.randn(*shape, device=DEV, dtype=torch.float32).to(dtype)


def assert_close(x, r64, r_lp, name):
    """The spec's rule, plus: no NaN, and -inf exactly where the reference has it."""
    x = x.detach().double()
    r64 = r64.detach().to(x.device).double()
    r_lp = r_lp.detach().to(x.device).double()
    assert x.shape == r64.shape, f"{name}: shape {tuple(x.shape)} vs {tuple(r64.shape)}"
    assert not torch.isnan(x).any(), f"{name}: NaN in the CUDA output"
    fin = torch.isfinite(r64)
    assert torch.equal(torch.isfinite(x), fin), f"{name}: inf positions differ from the reference"
    assert torch.equal(x[~fin], r64[~fin]), f"{name}: infinite values differ from the reference"
    if fin.sum() == 0:
        return
    err = (x - r64)[fin].abs().max().item()
    lp_diff = (r_lp - r64)[fin]
    lp_diff = torch.nan_to_num(lp_diff, nan=0.0, posinf=0.0, neginf=0.0)
    tol = 2 * lp_diff.abs().max().item() + 1e-5
    assert err <= tol, f"{name}: max error {err:.3e} > tolerance {tol:.3e}"


def run_ref(fn, args, kwargs, dtype):
    """(fp64 result, input-dtype result) of a reference function."""
    def cast(a, dt):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.to(dt)
        return a
    r64 = fn(*[cast(a, torch.float64) for a in args], **kwargs)
    r_lp = fn(*[cast(a, dtype) for a in args], **kwargs)
    return r64, r_lp


def make_cu(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=DEV)


# --------------------------------------------------------------------------- varlen guard

_TOO_SHORT_MAX_SEQLEN = """
import torch, nsa_cuda
q = torch.randn(1, 300, 4, 64, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 300, 1, 64, device="cuda", dtype=torch.bfloat16)
g = torch.rand(1, 300, 4, device="cuda")
cu = torch.tensor([0, 100, 300], dtype=torch.int32, device="cuda")  # lengths 100, 200
o = nsa_cuda.sparse_attn(q, k, k, g, g, g, cu_seqlens=cu, max_seqlen=150)
torch.cuda.synchronize()
print("NO ERROR")
"""


def test_varlen_max_seqlen_too_small_stops():
    """max_seqlen below the longest sequence (200 > 150) cannot be seen on the host
    without a sync; the device-side assert stops the program instead of leaving that
    sequence's last rows unwritten. In a subprocess: the assert ends the CUDA context."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    run = subprocess.run([sys.executable, "-c", _TOO_SHORT_MAX_SEQLEN], capture_output=True,
                         text=True, timeout=300, cwd=root, env=env)
    assert run.returncode != 0 and "NO ERROR" not in run.stdout, run.stdout + run.stderr
    assert "assert" in (run.stdout + run.stderr).lower(), run.stderr[-2000:]


# --------------------------------------------------------------------------- gate_combine

def _gated_sum(outputs, gates, dt):
    return sum(g.to(dt).unsqueeze(-1) * o.to(dt) for o, g in zip(outputs, gates))


def check_gate_combine(dtype, num_branches, dv, T=7):
    """gate_combine and gate_combine_bwd against fp64 torch: outputs with a strided
    head dim, a float32 gate read through a transposed view, the others in the input
    dtype, a strided output gradient, and B*T*H rows that do not fill the last CTA."""
    B, H = 2, 3
    outputs = [rand(B, T, 2 * H, dv, dtype=dtype)[:, :, ::2] for _ in range(num_branches)]
    gates = [torch.rand(T, B, H, device=DEV).transpose(0, 1)]
    gates += [torch.rand(B, T, H, device=DEV).to(dtype) for _ in range(num_branches - 1)]
    o = OPS.gate_combine(outputs, gates)
    assert o.dtype == dtype and o.is_contiguous()
    assert_close(o, _gated_sum(outputs, gates, torch.float64), _gated_sum(outputs, gates, dtype),
                 "gate_combine o")

    d_out = rand(B, T, H, 2 * dv, dtype=dtype)[..., dv:]
    grads = OPS.gate_combine_bwd(d_out, outputs, gates, True)
    assert len(grads) == 3 * num_branches
    for j, x in enumerate(outputs):  # row dots: rowsum(o * d o) as the attention's delta
        d_o, dot = grads[j], grads[2 * num_branches + j]
        assert dot.dtype == torch.float32 and dot.shape == (B, H, T)
        assert_close(dot, (x.double() * d_o.double()).sum(-1).transpose(1, 2),
                     (x.float() * d_o.float()).sum(-1).transpose(1, 2), f"row dots[{j}]")
    for j, (x, g) in enumerate(zip(outputs, gates)):
        d_o, d_g = grads[j], grads[num_branches + j]
        assert d_o.dtype == dtype and d_g.dtype == g.dtype and d_g.shape == g.shape
        assert_close(d_o, g.double().unsqueeze(-1) * d_out.double(),
                     g.to(dtype).unsqueeze(-1) * d_out, f"d outputs[{j}]")
        assert_close(d_g, (d_out.double() * x.double()).sum(-1), (d_out * x).sum(-1).to(g.dtype),
                     f"d gates[{j}]")
    # Without the outputs' gradients (sparse_attn's backward: each branch scales d o by
    # its gate): the same gate gradients, and row dots rowsum(o * g d o) = g * d_g.
    lean = OPS.gate_combine_bwd(d_out, outputs, gates, True, False)
    assert len(lean) == 2 * num_branches
    for j, (x, g) in enumerate(zip(outputs, gates)):
        assert torch.equal(lean[j], grads[num_branches + j]), f"d gates[{j}], no output grads"
        dot = (g.double() * (x.double() * d_out.double()).sum(-1)).transpose(1, 2)
        assert_close(lean[num_branches + j], dot, dot.float(), f"row dots[{j}], no output grads")


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("num_branches", [1, 2, 3])
@pytest.mark.parametrize("dv", [64, 128, 136])
def test_gate_combine(dtype, num_branches, dv):
    check_gate_combine(dtype, num_branches, dv)


def test_gate_combine_many_rows():
    check_gate_combine(torch.bfloat16, 3, 128, T=4099)


# --------------------------------------------------------------------------- mean_compress

@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("T,l,d", [(100, 32, 16), (31, 32, 16), (256, 64, 64), (300, 32, 8)])
def test_mean_compress(dtype, T, l, d):
    x = rand(2, T, 3, 64, dtype=dtype)
    out = OPS.mean_compress(x, None, l, d)
    r64, r_lp = run_ref(ref.mean_compress, (x, l, d), {}, dtype)
    assert_close(out, r64, r_lp, "mean_compress")


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_mean_compress_varlen(dtype):
    lengths = [1, 17, 200, 64, 333]
    cu = make_cu(lengths)
    x = rand(1, sum(lengths), 2, 128, dtype=dtype)
    out = OPS.mean_compress(x, cu, 32, 16)
    r64, r_lp = run_ref(ref.mean_compress, (x, 32, 16), {"cu_seqlens": cu}, dtype)
    assert_close(out, r64, r_lp, "mean_compress varlen")


# --------------------------------------------------------------------------- compressed

def compressed_case(B, T, Hkv, G, dk, dv, dtype, l, d, cu=None):
    total = T
    q = rand(B, total, Hkv * G, dk, dtype=dtype)
    k = rand(B, total, Hkv, dk, dtype=dtype)
    v = rand(B, total, Hkv, dv, dtype=dtype)
    k_cmp = ref.mean_compress(k, l, d, cu_seqlens=cu)
    v_cmp = ref.mean_compress(v, l, d, cu_seqlens=cu)
    return q, k_cmp, v_cmp


def check_compressed(q, k_cmp, v_cmp, l, d, cu=None, max_seqlen=None):
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5
    ms = max_seqlen if max_seqlen is not None else q.shape[1]
    o, lse = OPS.compressed_attn_fwd(q, k_cmp, v_cmp, cu, ms, l, d, scale)
    (o64, lse64), (o_lp, lse_lp) = run_ref(ref.compressed_attn, (q, k_cmp, v_cmp, l, d),
                                           {"scale": scale, "cu_seqlens": cu}, dtype)
    assert_close(o, o64, o_lp, "o_cmp")
    assert_close(lse, lse64, lse_lp, "lse_cmp")
    return o, lse


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("dims", HEAD_DIMS, ids=_id)
@pytest.mark.parametrize("G", GROUPS)
def test_compressed(dims, dtype, G, mainloop):
    dk, dv = dims
    q, kc, vc = compressed_case(2, 300, 2, G, dk, dv, dtype, 32, 16)
    check_compressed(q, kc, vc, 32, 16)


@pytest.mark.parametrize("T", [1, 20, 31, 32, 33, 47, 129, 1000])
def test_compressed_lengths(T, mainloop):
    q, kc, vc = compressed_case(2, T, 1, 4, 128, 128, torch.bfloat16, 32, 16)
    check_compressed(q, kc, vc, 32, 16)


def test_compressed_fla_setting(mainloop):
    q, kc, vc = compressed_case(1, 777, 2, 8, 64, 64, torch.float16, 64, 64)
    check_compressed(q, kc, vc, 64, 64)


def test_compressed_fewer_rows(mainloop):
    """k_cmp with fewer rows than Tc(T): rows that do not exist are never read."""
    q, kc, vc = compressed_case(1, 200, 1, 2, 64, 64, torch.float16, 32, 16)
    kc, vc = kc[:, :5].contiguous(), vc[:, :5].contiguous()
    o, lse = OPS.compressed_attn_fwd(q, kc, vc, None, 200, 32, 16, 64 ** -0.5)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()


@pytest.mark.parametrize("dims", HEAD_DIMS, ids=_id)
def test_compressed_varlen(dims, mainloop):
    dk, dv = dims
    lengths = [1, 17, 300, 64, 129]
    cu = make_cu(lengths)
    q, kc, vc = compressed_case(1, sum(lengths), 2, 4, dk, dv, torch.bfloat16, 32, 16, cu=cu)
    check_compressed(q, kc, vc, 32, 16, cu=cu, max_seqlen=max(lengths))


# --------------------------------------------------------------------------- selection

def check_selection(bi, ref_bi, ref_scores, n, lp, n_init, n_local, name="select"):
    """Structure of every row, then equality up to near-ties (within 1e-3 relative
    of the n-th selected score)."""
    bi = bi.cpu().long()
    ref_bi = ref_bi.cpu().long()
    ref_scores = ref_scores.cpu().double()
    B, T, H, nn = bi.shape
    assert nn == n
    t = torch.arange(T).view(1, T, 1)
    J = (t // lp).expand(B, T, H)
    valid = bi >= 0
    # ascending, -1 only at the end, exactly min(n, J+1) entries, all in [0, J]
    count = valid.sum(-1)
    assert torch.equal(count, torch.minimum(J + 1, torch.full_like(J, n))), f"{name}: wrong count"
    assert (bi[valid] >= 0).all()
    assert torch.equal(valid, torch.arange(n).view(1, 1, 1, n) < count.unsqueeze(-1)), f"{name}: -1 not at the end"
    sorted_ok = (bi[..., 1:] > bi[..., :-1]) | ~valid[..., 1:]
    assert sorted_ok.all(), f"{name}: not ascending"
    assert (torch.where(valid, bi, torch.zeros_like(bi)) <= J.unsqueeze(-1)).all(), f"{name}: block after t"
    diff_rows = (bi != ref_bi).any(-1).nonzero().tolist()
    for b, tt, h in diff_rows:
        mine = set(bi[b, tt, h][bi[b, tt, h] >= 0].tolist())
        theirs = set(ref_bi[b, tt, h][ref_bi[b, tt, h] >= 0].tolist())
        Jt = tt // lp
        for j in range(Jt + 1):
            forced = j < n_init or j > Jt - n_local
            if forced:
                assert j in mine, f"{name}: forced block {j} missing at t={tt}"
        sc = ref_scores[b, tt, h]
        free = [j for j in theirs if not (j < n_init or j > Jt - n_local)]
        nth = min(sc[j].item() for j in free) if free else 0.0
        for j in mine ^ theirs:
            assert abs(sc[j].item() - nth) <= 1e-3 * abs(nth) + 1e-12, (
                f"{name}: block {j} at (b={b}, t={tt}, h={h}) differs from the reference and its "
                f"score {sc[j].item():.6g} is not within 1e-3 of the n-th score {nth:.6g}")


def run_selection(q, k_cmp, l, d, lp, n, n_init, n_local, cu=None, max_seqlen=None):
    scale = q.shape[-1] ** -0.5
    ms = max_seqlen if max_seqlen is not None else q.shape[1]
    v_dummy = k_cmp[..., : (128 if q.shape[-1] == 192 else q.shape[-1])].contiguous()
    _, lse = OPS.compressed_attn_fwd(q, k_cmp, v_dummy, cu, ms, l, d, scale)
    bi = OPS.select_blocks(q, k_cmp, lse, cu, ms, l, d, lp, n, n_init, n_local, scale)
    ref_bi, ref_scores = ref.select_blocks(q.double(), k_cmp.double(), l, d, lp, n, n_init, n_local,
                                           scale=scale, cu_seqlens=cu)
    return bi, ref_bi, ref_scores


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("dims", HEAD_DIMS, ids=_id)
@pytest.mark.parametrize("G", GROUPS)
def test_select_blocks(dims, dtype, G, mainloop):
    dk, dv = dims
    q, kc, _ = compressed_case(2, 700, 2, G, dk, dv, dtype, 32, 16)
    bi, rbi, rsc = run_selection(q, kc, 32, 16, 64, 4, 1, 2)
    check_selection(bi, rbi, rsc, 4, 64, 1, 2)


def one_lane_selection_case(dk, dtype):
    """k_cmp rows that make the blocks j = 32, 64, ..., 160 (all one warp lane's in the
    top-n: j % 32 == 0) score highest, then j = 33, 65, 97, with small random rows
    elsewhere: with n = 10 (two forced) a late token takes five blocks from lane 0,
    more than the four a lane caches, so that lane rescans its candidates. l = 16,
    d = 8, l' = 16: compressed row 2j lies inside block j alone."""
    T, l, d = 3000, 16, 8
    tc = (T - l) // d + 1
    g = torch.Generator().manual_seed(11)
    kc = torch.randn(1, tc, 1, dk, generator=g) * 0.1
    for j in range(32, 188, 32):
        kc[0, 2 * j] = 1.0 + 0.01 * j / 32
        kc[0, 2 * j + 2] = 0.6 + 0.01 * j / 32
    q = torch.full((1, T, 1, dk), 0.5) + torch.randn(1, T, 1, dk, generator=g) * 0.01
    return q.to(DEV, dtype), kc.to(DEV, dtype)


def test_select_blocks_one_lane(mainloop):
    q, kc = one_lane_selection_case(64, torch.bfloat16)
    bi, rbi, rsc = run_selection(q, kc, 16, 8, 16, 10, 1, 1)
    check_selection(bi, rbi, rsc, 10, 16, 1, 1)
    assert (bi[0, -1, 0] % 32 == 0).sum().item() >= 6, "the case no longer takes five blocks from one lane"


@pytest.mark.parametrize("G", [3, 12, 32, 128, 160])
def test_select_blocks_group_sizes(G, mainloop):
    """Groups beyond GROUPS: three segments of one or four rows per token (G = 3, 12),
    two and eight warps per token (32, 128), and past the wgmma kernel's 128 rows
    (160: the mma.sync kernel runs)."""
    q, kc, _ = compressed_case(1, 300, 1, G, 64, 64, torch.bfloat16, 32, 16)
    bi, rbi, rsc = run_selection(q, kc, 32, 16, 64, 4, 1, 2)
    check_selection(bi, rbi, rsc, 4, 64, 1, 2)


def test_select_blocks_repeatable(mainloop):
    """The block scores are summed in a fixed order (no atomics): with every k_cmp
    row equal, many blocks tie in exact arithmetic, and repeated runs still select
    bitwise the same blocks."""
    T, G, l, d, lp, n = 4096, 16, 32, 16, 64, 16
    q = rand(1, T, G, 128, dtype=torch.bfloat16)
    tc = (T - l) // d + 1
    kc = rand(1, 1, 1, 128, dtype=torch.bfloat16).expand(1, tc, 1, 128).contiguous()
    scale = 128 ** -0.5
    _, lse = OPS.compressed_attn_fwd(q, kc, kc, None, T, l, d, scale)
    runs = [OPS.select_blocks(q, kc, lse, None, T, l, d, lp, n, 1, 2, scale) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("T", [1, 20, 64, 65, 200, 1000])
def test_select_blocks_lengths(T, mainloop):
    q, kc, _ = compressed_case(1, T, 1, 4, 128, 128, torch.float16, 32, 16)
    bi, rbi, rsc = run_selection(q, kc, 32, 16, 64, 16, 1, 2)
    check_selection(bi, rbi, rsc, 16, 64, 1, 2)


def test_select_blocks_fla_setting(mainloop):
    q, kc, _ = compressed_case(2, 900, 1, 16, 64, 64, torch.bfloat16, 64, 64)
    bi, rbi, rsc = run_selection(q, kc, 64, 64, 64, 4, 1, 1)
    check_selection(bi, rbi, rsc, 4, 64, 1, 1)


def test_select_blocks_varlen(mainloop):
    lengths = [1, 17, 700, 64, 333]
    cu = make_cu(lengths)
    q, kc, _ = compressed_case(1, sum(lengths), 2, 4, 192, 128, torch.bfloat16, 32, 16, cu=cu)
    bi, rbi, rsc = run_selection(q, kc, 32, 16, 64, 4, 1, 2, cu=cu, max_seqlen=max(lengths))
    # Row structure per sequence: check each sequence as its own batch.
    for m, n_tok in enumerate(lengths):
        a, b = cu[m].item(), cu[m + 1].item()
        check_selection(bi[:, a:b], rbi[:, a:b], rsc[:, a:b], 4, 64, 1, 2, name=f"select seq {m}")


# --------------------------------------------------------------------------- selected attention

def random_block_indices(B, T, H, n, lp, lengths=None, garbage=True, seed=0):
    """Per (t, h): the current block, a random subset of earlier blocks, shuffled,
    with -1 slots, an out-of-range id and a duplicate mixed in."""
    g = torch.Generator().manual_seed(seed)
    bi = torch.full((B, T, H, n), -1, dtype=torch.int32)
    pos = torch.arange(T) if lengths is None else torch.cat([torch.arange(L) for L in lengths])
    nblk_of = None if lengths is None else torch.cat([torch.full((L,), (L + lp - 1) // lp) for L in lengths])
    for b in range(B):
        for tt in range(T):
            t = pos[tt].item()
            J = t // lp
            nblk = (T + lp - 1) // lp if nblk_of is None else nblk_of[tt].item()
            for h in range(H):
                cand = torch.randperm(J + 1, generator=g)[: n - 1].tolist()
                if J not in cand:
                    cand = cand[: n - 2] + [J]
                row = cand[:]
                if garbage and len(row) < n:
                    row.append([nblk + 3, -7, 10 ** 6, row[0]][(t + h) % 4])
                row = row[:n]
                perm = torch.randperm(len(row), generator=g).tolist()
                row = [row[i] for i in perm]
                bi[b, tt, h, : len(row)] = torch.tensor(row, dtype=torch.int32)
    return bi.to(DEV)


def check_branch(name, op, ref_fn, q, k, v, extra, size, cu=None, max_seqlen=None):
    """One attention branch on CUDA against the fp64 reference, spec tolerance."""
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5
    ms = max_seqlen if max_seqlen is not None else q.shape[1]
    o, lse = op(q, k, v, *extra, cu, ms, size, scale)
    (o64, lse64), (o_lp, lse_lp) = run_ref(ref_fn, (q, k, v, *extra, size),
                                           {"scale": scale, "cu_seqlens": cu}, dtype)
    assert_close(o, o64, o_lp, f"o_{name}")
    assert_close(lse, lse64, lse_lp, f"lse_{name}")


@pytest.fixture(params=["2", "1"])
def slc_stages(request, monkeypatch):
    """The selected forward's K/V pipeline: two stages (the default where they fit) and one
    (NSA_SLC_FWD_STAGES, read at each call)."""
    monkeypatch.setenv("NSA_SLC_FWD_STAGES", request.param)
    return request.param


def check_selected(q, k, v, bi, lp, cu=None, max_seqlen=None):
    check_branch("slc", OPS.selected_attn_fwd, ref.selected_attn, q, k, v, (bi,), lp, cu,
                 max_seqlen)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("dims", HEAD_DIMS, ids=_id)
@pytest.mark.parametrize("G", GROUPS)
def test_selected(dims, dtype, G, slc_stages):
    dk, dv = dims
    B, T, Hkv = 2, 300, 2
    q = rand(B, T, Hkv * G, dk, dtype=dtype)
    k = rand(B, T, Hkv, dk, dtype=dtype)
    v = rand(B, T, Hkv, dv, dtype=dtype)
    bi = random_block_indices(B, T, Hkv, 3, 32, seed=G)
    check_selected(q, k, v, bi, 32)


@pytest.mark.parametrize("T,lp,n", [(1, 64, 16), (20, 64, 4), (130, 64, 2), (333, 16, 5), (257, 128, 3),
                                    (300, 32, 8)])
def test_selected_lengths(T, lp, n, slc_stages):
    q = rand(1, T, 4, 64, dtype=torch.float16)
    k = rand(1, T, 1, 64, dtype=torch.float16)
    v = rand(1, T, 1, 64, dtype=torch.float16)
    bi = random_block_indices(1, T, 1, n, lp, seed=T)
    check_selected(q, k, v, bi, lp)


def test_selected_int64_and_clean_indices(slc_stages):
    T = 200
    q = rand(2, T, 8, 128, dtype=torch.bfloat16)
    k = rand(2, T, 2, 128, dtype=torch.bfloat16)
    v = rand(2, T, 2, 128, dtype=torch.bfloat16)
    bi = random_block_indices(2, T, 2, 4, 64, garbage=False, seed=3).long()
    bi[0, -1, 0, -1] = 2 ** 33  # must not wrap around to a valid id
    check_selected(q, k, v, bi, 64)


def test_selected_from_selection():
    """End to end: blocks chosen by select_blocks, then selected attention."""
    B, T, Hkv, G = 1, 700, 2, 8
    q, kc, _ = compressed_case(B, T, Hkv, G, 192, 128, torch.bfloat16, 32, 16)
    k = rand(B, T, Hkv, 192, dtype=torch.bfloat16)
    v = rand(B, T, Hkv, 128, dtype=torch.bfloat16)
    bi, _, _ = run_selection(q, kc, 32, 16, 64, 4, 1, 2)
    check_selected(q, k, v, bi, 64)


@pytest.mark.parametrize("dims", HEAD_DIMS, ids=_id)
def test_selected_varlen(dims, slc_stages):
    dk, dv = dims
    lengths = [1, 17, 300, 64, 129]
    cu = make_cu(lengths)
    total = sum(lengths)
    q = rand(1, total, 4, dk, dtype=torch.float16)
    k = rand(1, total, 2, dk, dtype=torch.float16)
    v = rand(1, total, 2, dv, dtype=torch.float16)
    bi = random_block_indices(1, total, 2, 3, 32, lengths=lengths, seed=5)
    check_selected(q, k, v, bi, 32, cu=cu, max_seqlen=max(lengths))


# --------------------------------------------------------------------------- window

def check_window(q, k, v, w, cu=None, max_seqlen=None):
    check_branch("win", OPS.window_attn_fwd, ref.window_attn, q, k, v, (), w, cu, max_seqlen)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("dims", HEAD_DIMS, ids=_id)
@pytest.mark.parametrize("G", GROUPS)
def test_window(dims, dtype, G, mainloop):
    dk, dv = dims
    B, T, Hkv = 2, 300, 2
    q = rand(B, T, Hkv * G, dk, dtype=dtype)
    k = rand(B, T, Hkv, dk, dtype=dtype)
    v = rand(B, T, Hkv, dv, dtype=dtype)
    check_window(q, k, v, 100)


@pytest.mark.parametrize("T,w", [(1, 512), (20, 512), (300, 1), (300, 64), (300, 65), (1000, 512), (130, 129)])
def test_window_lengths(T, w, mainloop):
    q = rand(1, T, 2, 64, dtype=torch.bfloat16)
    k = rand(1, T, 1, 64, dtype=torch.bfloat16)
    v = rand(1, T, 1, 64, dtype=torch.bfloat16)
    check_window(q, k, v, w)


def test_window_varlen(mainloop):
    lengths = [1, 17, 600, 64, 129]
    cu = make_cu(lengths)
    total = sum(lengths)
    q = rand(1, total, 8, 192, dtype=torch.bfloat16)
    k = rand(1, total, 2, 192, dtype=torch.bfloat16)
    v = rand(1, total, 2, 128, dtype=torch.bfloat16)
    check_window(q, k, v, 100, cu=cu, max_seqlen=max(lengths))


def test_non_contiguous_inputs(mainloop):
    """Strided q/k/v (a head slice of a larger tensor) go through the copy path."""
    T = 150
    big = rand(1, T, 6, 64, dtype=torch.float16)
    q = big[:, :, :4]
    k = big[:, :, 4:5]
    v = big[:, :, 5:6]
    check_window(q, k, v, 50)


# --------------------------------------------------------------------------- errors

def test_unsupported_head_dim():
    q = rand(1, 10, 2, 96, dtype=torch.float16)
    k = rand(1, 10, 1, 96, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head dims"):
        OPS.window_attn_fwd(q, k, k, None, 10, 4, 1.0)


def test_unsupported_dtype():
    q = rand(1, 10, 2, 64, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="float16 and bfloat16"):
        OPS.window_attn_fwd(q, q[:, :, :1], q[:, :, :1], None, 10, 4, 1.0)


def test_selected_too_many_slots():
    """Block lists beyond shared memory fail before the launch, naming the cause."""
    T, n = 64, 4096  # 64 tokens' lists of 4096 int32 slots: 1 MiB, more than any GPU offers
    q = rand(1, T, 2, 64, dtype=torch.float16)
    k = rand(1, T, 1, 64, dtype=torch.float16)
    bi = torch.full((1, T, 1, n), -1, dtype=torch.int32, device=DEV)
    with pytest.raises(RuntimeError, match="shared memory.*slc_num_blocks"):
        OPS.selected_attn_fwd(q, k, k, bi, None, T, 16, 1.0)
    # the failure leaves nothing behind for the next launch to trip over
    check_selected(q, k, k, random_block_indices(1, T, 1, 4, 16, seed=1), 16)


# --------------------------------------------------------------------------- long (paper settings)

def check_selection_structure(bi, lp, n):
    """Every row of a [B, T, Hkv, n] selection at positions 0..T-1: exactly
    min(J + 1, n) blocks, ascending, -1 only at the end, none after t."""
    B, T, H, _ = bi.shape
    bi = bi.long()
    J = (torch.arange(T, device=bi.device).view(1, T, 1) // lp).expand(B, T, H)
    valid = bi >= 0
    count = valid.sum(-1)
    assert torch.equal(count, torch.minimum(J + 1, torch.full_like(J, n))), "wrong count"
    assert torch.equal(valid, torch.arange(n, device=bi.device).view(1, 1, 1, n) < count.unsqueeze(-1))
    assert ((bi[..., 1:] > bi[..., :-1]) | ~valid[..., 1:]).all(), "not ascending"
    assert (torch.where(valid, bi, torch.zeros_like(bi)) <= J.unsqueeze(-1)).all(), "block after t"


def check_selection_rows(q, k_cmp, bi, picks, l, d, lp, n, n_init, n_local, scale):
    """Selected sets of the rows `picks` = [(b, r, t)]: row r of q / bi (batch b) at
    position t, against fp64 scores recomputed for those rows alone from q and
    k_cmp's first rows (for lengths where the dense reference does not fit, and
    for decode rows): the forced blocks present, min(J + 1, n) blocks, and the same
    set up to near-ties (within 1e-3 relative of the n-th selected score). A row
    at t < 0 selects nothing."""
    Hkv = k_cmp.shape[2]
    G = q.shape[2] // Hkv
    for b, r, t in picks:
        for h in range(Hkv):
            row = bi[b, r, h].long().tolist()
            if t < 0:
                assert all(j == -1 for j in row), f"row before position 0 selected {row}"
                continue
            Jt = t // lp
            mine = [j for j in row if j >= 0]
            assert mine == sorted(set(mine)) and len(mine) == min(Jt + 1, n), f"t={t}: {row}"
            assert row[len(mine):] == [-1] * (n - len(mine)) and all(j <= Jt for j in mine)
            nc = min(num_cmp(t + 1, l, d), k_cmp.shape[1])
            scores = torch.zeros(Jt + 1, dtype=torch.float64, device=q.device)
            if nc > 0:
                s = scale * q[b, r, h * G:(h + 1) * G].double() @ k_cmp[b, :nc, h].double().T
                i = torch.arange(nc, device=q.device, dtype=torch.float64)[:, None]
                j = torch.arange(Jt + 1, device=q.device, dtype=torch.float64)[None, :]
                # w(i, j) = |[i d, i d + l) & [j l', (j + 1) l')| / d
                w = (torch.minimum(i * d + l, (j + 1) * lp) - torch.maximum(i * d, j * lp)).clamp(min=0) / d
                scores = torch.softmax(s, dim=-1).sum(0) @ w
            forced = {j for j in range(Jt + 1) if j < n_init or j > Jt - n_local}
            assert forced <= set(mine), f"t={t}: forced blocks {sorted(forced - set(mine))} missing"
            order = sorted(set(range(Jt + 1)) - forced, key=lambda j: (-scores[j].item(), j))
            theirs = forced | set(order[: max(0, min(n, Jt + 1) - len(forced))])
            if set(mine) != theirs:
                nth = min(scores[j].item() for j in theirs - forced)
                for j in set(mine) ^ theirs:
                    assert abs(scores[j].item() - nth) <= 1e-3 * abs(nth) + 1e-12, \
                        f"t={t}: block {j} (score {scores[j].item():.6g}) vs the n-th {nth:.6g}"


@pytest.mark.slow
def test_select_blocks_128k(mainloop):
    """The issue's length: T = 128k, 2048 selection blocks, paper settings, G = 16."""
    P = PAPER
    T, G, dk = 131072, 16, 192
    q = rand(1, T, G, dk, dtype=torch.bfloat16)
    k = rand(1, T, 1, dk, dtype=torch.bfloat16)
    k_cmp = OPS.mean_compress(k, None, P["l"], P["d"])
    scale = dk ** -0.5
    v_dummy = k_cmp[..., :128].contiguous()
    _, lse = OPS.compressed_attn_fwd(q, k_cmp, v_dummy, None, T, P["l"], P["d"], scale)
    bi = OPS.select_blocks(q, k_cmp, lse, None, T, P["l"], P["d"], P["lp"], P["n"], P["n_init"],
                           P["n_local"], scale)
    check_selection_structure(bi, P["lp"], P["n"])
    rows = [0, 31, 63, 64, 1023, 1024, 5000, 65535, 65536, 100001, T - 65, T - 1]
    check_selection_rows(q, k_cmp, bi, [(0, t, t) for t in rows], P["l"], P["d"], P["lp"], P["n"],
                         P["n_init"], P["n_local"], scale)


@pytest.mark.slow
@pytest.mark.parametrize("T,fwd_mainloop", [(8192, "auto"), (32768, "auto"), (8192, "sm80")])
def test_long_paper_settings(T, fwd_mainloop, monkeypatch):
    """auto: the wgmma compressed and window kernels on an H100/H200; sm80: mma.sync."""
    monkeypatch.setenv("NSA_MAINLOOP", fwd_mainloop)
    P = PAPER
    B, Hkv, G, dk, dv, dtype = 1, 1, 2, 192, 128, torch.bfloat16
    q = rand(B, T, Hkv * G, dk, dtype=dtype)
    k = rand(B, T, Hkv, dk, dtype=dtype)
    v = rand(B, T, Hkv, dv, dtype=dtype)
    k_cmp = OPS.mean_compress(k, None, P["l"], P["d"])
    v_cmp = OPS.mean_compress(v, None, P["l"], P["d"])
    _, lse = check_compressed(q, k_cmp, v_cmp, P["l"], P["d"])
    scale = dk ** -0.5
    bi = OPS.select_blocks(q, k_cmp, lse, None, T, P["l"], P["d"], P["lp"], P["n"], P["n_init"],
                           P["n_local"], scale)
    ref_bi, ref_scores = ref.select_blocks(q.double(), k_cmp.double(), P["l"], P["d"], P["lp"], P["n"],
                                           P["n_init"], P["n_local"], scale=scale)
    check_selection(bi, ref_bi, ref_scores, P["n"], P["lp"], P["n_init"], P["n_local"])
    del ref_scores
    check_selected(q, k, v, bi, P["lp"])
    check_window(q, k, v, P["w"])


@pytest.mark.parametrize("dk", [64, 128, 192])
def test_select_blocks_public_api(dk):
    """nsa_cuda.select_blocks (the Python API, not the op) at every built Dk: the first
    device run found it refusing Dk = 192, its k_cmp checked as a (192, 192) K/V pair."""
    q = rand(1, 300, 4, dk, dtype=torch.bfloat16)
    k_cmp = nsa_cuda.mean_compress(rand(1, 300, 1, dk, dtype=torch.bfloat16), 32, 16)
    v_cmp = k_cmp[..., :128].contiguous() if dk != 64 else k_cmp
    _, lse = nsa_cuda.compressed_attn(q, k_cmp, v_cmp, cmp_block_size=32, cmp_stride=16)
    got = nsa_cuda.select_blocks(q, k_cmp, lse, cmp_block_size=32, cmp_stride=16, slc_block_size=64,
                                 slc_num_blocks=4)
    want = OPS.select_blocks(q, k_cmp, lse, None, 300, 32, 16, 64, 4, 1, 2, dk ** -0.5)
    assert torch.equal(got, want)
