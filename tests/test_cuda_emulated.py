"""The CUDA kernels, run by the CPU emulator, against the fp64 reference.

No GPU needed: csrc/emu compiles the kernels' own source (csrc/cuda/*.cuh,
mean_compress.cu, attn_bwd_index.cu) as host code. Each CTA's threads run as
fibers that switch at __syncthreads, shuffles, ballots, mma.sync and ldmatrix
(warp collectives computed from every lane's registers per the PTX ISA), in a
seeded random order; cp.async lands either at once or at the issuing thread's
wait. So the index math, CuTe partitions, swizzled smem views, masks, online
softmax and barriers are the GPU's code paths; what is not modelled: timing,
the memory model beyond that, fast-math intrinsics, tensor-core accumulation order.

The emulated ops are `torch.ops.nsa_cuda_emu.*` (nsa_cuda's schemas, CPU fp16/
bf16 tensors, outputs NaN-poisoned before every launch). The checks are the
CUDA tests' own helpers and tolerance rule (test_cuda_fwd.assert_close: max
|x - ref| <= 2 max|ref_lp - ref| + 1e-5, -inf exactly where the reference has
it, no NaN), loaded as private copies pointed at the emulator and the CPU.

Build: tests/_cuda_emu.py (torch JIT, g++ -O1; reused afterwards from
build/emu-*/). On a 2-core machine the default instance (64x64 bf16) builds in
about 1.5 minutes and this module then runs in about 35 s; all six instances
(NSA_EMULATION_FULL=1) take about 9 minutes to build and 6 minutes to run.
A deliberate off-by-one in the window mask (kv_schedule.cuh) fails 6 of the
window tests; a removed __syncthreads in the forward mainloop fails the launches
with the race detector's message; the backward's and the decode's next-step copies
aimed at the stage being read fail the backward and the fixed-split decode tests.
Switches:
  NSA_SKIP_EMULATION=1      skip this module
  NSA_EMU_INSTANCES=64:bf16,64:fp16   instances to build (default 64:bf16)
  NSA_EMULATION_FULL=1      all six instances
  NSA_EMU_SEED=n            the fiber schedule / cp.async landing seed (default 1)
  NSA_EMU_THREADS=n         OS threads running CTAs (default min(4, cores))
  NSA_EMU_SMS=n             the SM count the emulated device reports (default 132)
  NSA_DECODE_SPLITS=k       the decode's KV split count (the library's switch, CPU
                            emulator and GPU alike; test_decode fixes 1 or 2)
"""
import importlib.util
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _cuda_emu  # noqa: E402

if os.environ.get("NSA_SKIP_EMULATION", "0") not in ("", "0"):
    pytest.skip("NSA_SKIP_EMULATION is set", allow_module_level=True)

INSTANCES = _cuda_emu.instances()
DV = {64: 64, 128: 128, 192: 128}
DT = {"bf16": torch.bfloat16, "fp16": torch.float16}
# (dk, dv, dtype) of every built instance; the first one is the default for single cases.
DIMS = [(int(h), DV[int(h)], DT[t]) for h, t in INSTANCES]


def _id(x):
    if isinstance(x, tuple):
        return "x".join(str(e).replace("torch.", "") for e in x)
    return str(x)


@pytest.fixture(scope="module")
def emu():
    try:
        return _cuda_emu.build()
    except Exception as e:  # a build failure is a failure, not a skip
        pytest.fail(f"building the CUDA emulator failed: {e}")


def _private_copy(name, alias):
    """A private instance of tests/<name>.py whose globals can be pointed at the
    emulator and the CPU without touching the real module (which the CUDA tests use)."""
    spec = importlib.util.spec_from_file_location(alias, os.path.join(HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def F(emu):
    """test_cuda_fwd's helpers on the emulator (ops) and the CPU (tensors, reference)."""
    from nsa_cuda import reference
    m = _private_copy("test_cuda_fwd", "_emu_test_cuda_fwd")
    m.OPS, m.DEV, m.ref = emu, "cpu", reference
    return m


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- atoms

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_id)
def test_atoms_gemm(emu, dtype):
    """mma.sync m16n8k16 + ldmatrix (.x4 and .x4.trans) + cp.async through the
    forward's TiledMma and swizzled layouts: a b^T and a b of 64x64 tiles. The
    emulated atoms follow the PTX ISA's fragment definitions; CuTe's MMA_Traits /
    Copy_Traits layouts must agree with them for the product to come out right."""
    a = torch.randn(64, 64).to(dtype)
    b = torch.randn(64, 64).to(dtype)
    nt, nn = emu.gemm_selftest(a, b)
    a64, b64 = a.double(), b.double()
    # fp32 accumulation of exact products: tight bounds
    torch.testing.assert_close(nt.double(), a64 @ b64.T, rtol=0, atol=1e-4)
    torch.testing.assert_close(nn.double(), a64 @ b64, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulator_wgmma_gemm(emu, dtype):
    """The wgmma path's atoms, descriptors and fragment layouts: a b^T with both
    operands in smem (K-major), then P b with P in registers and b as the MN-major
    V^T view. The emulated wgmma reads smem through the descriptor and register
    layouts written from the PTX ISA; CuTe builds the descriptors and partitions."""
    g = torch.Generator().manual_seed(5)
    a = torch.randint(-3, 4, (64, 64), generator=g).to(dtype) / 4
    b = torch.randint(-3, 4, (64, 64), generator=g).to(dtype) / 4
    nt, pv = emu.gemm_selftest_sm90(a, b)
    a64, b64 = a.double(), b.double()
    s = a64 @ b64.T
    torch.testing.assert_close(nt.double(), s, rtol=0, atol=1e-4)
    p = s.to(dtype).double()  # the kernel rounds P to the element type
    torch.testing.assert_close(pv.double(), p @ b64, rtol=0, atol=1e-3)


def test_emulator_catches_hazards(emu):
    """The emulator's checks on a tiny kernel: correct, a missing __syncthreads
    (shared-memory race), a warp split between __syncwarp and __syncthreads."""
    emu.hazard_selftest(0)
    with pytest.raises(RuntimeError, match="shared-memory race"):
        emu.hazard_selftest(1)
    with pytest.raises(RuntimeError, match="deadlock"):
        emu.hazard_selftest(2)
    emu.hazard_selftest(0)  # a failed launch leaves nothing behind


# --------------------------------------------------------------------------- forward

@pytest.fixture(params=["sm90", "sm80"])
def mainloop(request, monkeypatch):
    """The wgmma kernels (the emulated device is an H100, so "auto" picks them: the
    compressed and window forward and dq, every branch's dk/dv, and the selection for
    G <= 128) and mma.sync."""
    monkeypatch.setenv("NSA_MAINLOOP", request.param)
    return request.param


@pytest.fixture(params=["2", "1"])
def slc_stages(request, monkeypatch):
    """The selected forward's K/V pipeline: two stages (the default on an H100) and one."""
    monkeypatch.setenv("NSA_SLC_FWD_STAGES", request.param)
    return request.param


def test_slc_fwd_stages_setting(emu, monkeypatch):
    dk, dv, dtype = DIMS[0]
    q = torch.rand(1, 8, 2, dk).to(dtype)
    kv = torch.rand(1, 8, 1, dk).to(dtype)
    bi = torch.zeros(1, 8, 1, 1, dtype=torch.int32)
    monkeypatch.setenv("NSA_SLC_FWD_STAGES", "3")
    with pytest.raises(RuntimeError, match="NSA_SLC_FWD_STAGES must be auto, 1 or 2, got '3'"):
        emu.selected_attn_fwd(q, kv, kv[..., :dv].contiguous(), bi, None, 8, 16, 0.125)


@pytest.mark.parametrize("dims", DIMS, ids=_id)
def test_slc_fwd_stages_small_smem(F, emu, dims, monkeypatch):
    """On a device with 99 KB of shared memory per block (sm_86/89), the two-stage
    selected forward at Dk = 192 does not fit: the default takes one stage and is
    right; forcing two raises a clear error."""
    dk, dv, dtype = dims
    if dk < 192:
        pytest.skip("at Dk <= 128 both pipelines fit in 99 KB")
    monkeypatch.setenv("NSA_EMU_SMEM_OPTIN", str(99 * 1024))
    monkeypatch.setenv("NSA_EMU_SMEM_PER_SM", str(100 * 1024))
    q, k, v = _qkv(F, 1, 130, 1, 4, dims)
    bi = F.random_block_indices(1, 130, 1, 3, 32, seed=4)
    monkeypatch.delenv("NSA_SLC_FWD_STAGES", raising=False)
    F.check_selected(q, k, v, bi, 32)
    monkeypatch.setenv("NSA_SLC_FWD_STAGES", "2")
    with pytest.raises(RuntimeError, match="shared memory per block but this device allows 101376"):
        emu.selected_attn_fwd(q, k, v, bi, None, 130, 32, dk ** -0.5)


def test_fwd_mainloop_setting(emu, monkeypatch):
    """NSA_MAINLOOP: a bad value and sm90 for the selected branch (no wgmma
    kernel: it stays on mma.sync) are answered clearly or ignored as documented."""
    dk, dv, dtype = DIMS[0]
    q = torch.rand(1, 8, 2, dk).to(dtype)
    kv = torch.rand(1, 8, 1, dk).to(dtype)
    monkeypatch.setenv("NSA_MAINLOOP", "wgmma")
    with pytest.raises(RuntimeError, match="NSA_MAINLOOP must be auto, sm80 or sm90"):
        emu.window_attn_fwd(q, kv, kv[..., :dv].contiguous(), None, 8, 4, 0.125)
    monkeypatch.setenv("NSA_MAINLOOP", "sm90")
    bi = torch.zeros(1, 8, 1, 1, dtype=torch.int32)
    o, _ = emu.selected_attn_fwd(q, kv, kv[..., :dv].contiguous(), bi, None, 8, 16, 0.125)
    assert not torch.isnan(o).any()


def _qkv(F, B, T, Hkv, G, dims):
    dk, dv, dtype = dims
    return (F.rand(B, T, Hkv * G, dk, dtype=dtype), F.rand(B, T, Hkv, dk, dtype=dtype),
            F.rand(B, T, Hkv, dv, dtype=dtype))


@pytest.mark.parametrize("dims", DIMS, ids=_id)
@pytest.mark.parametrize("T,G", [(1, 4), (17, 16), (70, 1), (200, 2), (130, 8)])
def test_compressed_fwd(F, dims, T, G, mainloop):
    q, k, v = _qkv(F, 2, T, 2, G, dims)
    kc = F.ref.mean_compress(k, 32, 16)
    vc = F.ref.mean_compress(v, 32, 16)
    F.check_compressed(q, kc, vc, 32, 16)


def test_compressed_fwd_varlen(F, mainloop):
    lengths = [1, 17, 150, 64, 40]
    cu = F.make_cu(lengths)
    q, k, v = _qkv(F, 1, sum(lengths), 2, 4, DIMS[0])
    kc = F.ref.mean_compress(k, 32, 16, cu_seqlens=cu)
    vc = F.ref.mean_compress(v, 32, 16, cu_seqlens=cu)
    F.check_compressed(q, kc, vc, 32, 16, cu=cu, max_seqlen=max(lengths))


def test_compressed_fwd_fewer_rows(F, emu, mainloop):
    dk, dv, dtype = DIMS[0]
    q, k, v = _qkv(F, 1, 120, 1, 2, DIMS[0])
    kc = F.ref.mean_compress(k, 32, 16)[:, :3].contiguous()
    vc = F.ref.mean_compress(v, 32, 16)[:, :3].contiguous()
    o, lse = emu.compressed_attn_fwd(q, kc, vc, None, 120, 32, 16, dk ** -0.5)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert torch.isinf(lse[:, :, :31]).all() and (o[:, :31] == 0).all()


@pytest.mark.parametrize("dims", DIMS, ids=_id)
@pytest.mark.parametrize("T,G,lp,n", [(1, 4, 64, 4), (70, 16, 32, 3), (200, 2, 16, 5),
                                      (130, 1, 64, 2), (90, 8, 128, 3), (700, 1, 16, 6),
                                      (300, 4, 32, 8), (160, 16, 16, 4)])
def test_selected_fwd(F, dims, T, G, lp, n, slc_stages):
    """(700, 1, 16, 6): 44 blocks, so the union bitmap of a CTA spans two words. n = 8
    and 4: the lists read 16 bytes at a time; G = 4 and 16: warps skipping the union
    tiles none of their tokens chose."""
    q, k, v = _qkv(F, 2, T, 2, G, dims)
    bi = F.random_block_indices(2, T, 2, n, lp, seed=T + G)
    F.check_selected(q, k, v, bi, lp)


def test_selected_fwd_varlen(F, slc_stages):
    lengths = [1, 17, 150, 64, 33]
    cu = F.make_cu(lengths)
    q, k, v = _qkv(F, 1, sum(lengths), 2, 4, DIMS[0])
    bi = F.random_block_indices(1, sum(lengths), 2, 3, 32, lengths=lengths, seed=5)
    F.check_selected(q, k, v, bi, 32, cu=cu, max_seqlen=max(lengths))


def test_selected_fwd_int64_indices(F, slc_stages):
    q, k, v = _qkv(F, 1, 100, 1, 4, DIMS[0])
    bi = F.random_block_indices(1, 100, 1, 4, 16, garbage=False, seed=3).long()
    bi[0, -1, 0, -1] = 2 ** 33
    F.check_selected(q, k, v, bi, 16)


@pytest.mark.parametrize("dims", DIMS, ids=_id)
@pytest.mark.parametrize("T,G,w", [(1, 2, 512), (17, 16, 8), (70, 1, 64), (200, 4, 65),
                                   (130, 8, 129)])
def test_window_fwd(F, dims, T, G, w, mainloop):
    q, k, v = _qkv(F, 2, T, 2, G, dims)
    F.check_window(q, k, v, w)


def test_window_fwd_varlen(F, mainloop):
    lengths = [1, 17, 200, 64, 5]
    cu = F.make_cu(lengths)
    q, k, v = _qkv(F, 1, sum(lengths), 2, 8, DIMS[0])
    F.check_window(q, k, v, 50, cu=cu, max_seqlen=max(lengths))


def test_window_fwd_non_contiguous(F, mainloop):
    dk, dv, dtype = DIMS[0]
    big = F.rand(1, 90, 5, dk, dtype=dtype)
    big_v = F.rand(1, 90, 2, dv, dtype=dtype)  # dv differs from dk on the 192 instances
    F.check_window(big[:, :, :4], big[:, :, 4:5], big_v[:, :, 1:2], 30)


# --------------------------------------------------------------------------- selection

@pytest.mark.parametrize("dims", DIMS, ids=_id)
@pytest.mark.parametrize("T,G,n", [(1, 4, 4), (70, 16, 3), (130, 1, 16), (260, 1, 5), (260, 2, 5),
                                   (260, 4, 5), (260, 8, 5), (260, 16, 5), (260, 32, 5), (260, 3, 5),
                                   (260, 12, 5), (260, 24, 5)])
def test_select_blocks(F, dims, T, G, n, mainloop):
    """l' = 32: up to 9 candidates at T = 260, so that with n = 5 (3 forced) the
    scores decide two blocks of a row (and, for the wgmma kernel, its head sums at every
    segment size: G = 1, 2, 4, 8, 16, two segments per token at 32, three of 1, 4
    and 8 rows at G = 3, 12, 24)."""
    dk, dv, dtype = dims
    q, kc, _ = F.compressed_case(2, T, 2, G, dk, dv, dtype, 32, 16)
    bi, rbi, rsc = F.run_selection(q, kc, 32, 16, 32, n, 1, 2)
    F.check_selection(bi, rbi, rsc, n, 32, 1, 2)


@pytest.mark.parametrize("G", [1, 3, 4, 16])
def test_select_blocks_many_tiles(F, G, mainloop):
    """More than one 64-row tile of compressed keys per row chunk (Tc = 67, then
    133 with l = 16, d = 8): the double-buffered K tiles and the scores summed
    across tiles."""
    dk, dv, dtype = DIMS[0]
    for T, l, d in ((1100, 32, 16), (1080, 16, 8)):
        q, kc, _ = F.compressed_case(1, T, 1, G, dk, dv, dtype, l, d)
        bi, rbi, rsc = F.run_selection(q, kc, l, d, 64, 6, 1, 2)
        F.check_selection(bi, rbi, rsc, 6, 64, 1, 2)


def test_select_blocks_repeatable(F, monkeypatch, mainloop):
    """The same selection, bitwise, under different fiber schedules: the block
    scores are summed in a fixed order. Every k_cmp row is equal, so many blocks
    tie in exact arithmetic and the rounding of the sums decides; shared-memory
    atomics (the kernel's first version) summed in schedule order and fail this."""
    dk, dv, dtype = DIMS[0]
    T, G, l, d, lp, n = 1100, 16, 32, 16, 64, 4  # two K tiles per row chunk
    q = F.rand(1, T, G, dk, dtype=dtype)
    tc = (T - l) // d + 1
    kc = F.rand(1, 1, 1, dk, dtype=dtype).expand(1, tc, 1, dk).contiguous()
    scale = dk ** -0.5
    _, lse = F.OPS.compressed_attn_fwd(q, kc, kc[..., :dv].contiguous(), None, T, l, d, scale)
    runs = []
    for seed in (1, 2, 3):
        monkeypatch.setenv("NSA_EMU_SEED", str(seed))
        runs.append(F.OPS.select_blocks(q, kc, lse, None, T, l, d, lp, n, 1, 1, scale))
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_select_blocks_one_lane(F, mainloop):
    """A lane of the top-n warp wins more rounds than it caches candidates (it
    rescans): test_cuda_fwd.one_lane_selection_case."""
    dk, dv, dtype = DIMS[0]
    q, kc = F.one_lane_selection_case(dk, dtype)
    bi, rbi, rsc = F.run_selection(q, kc, 16, 8, 16, 10, 1, 1)
    F.check_selection(bi, rbi, rsc, 10, 16, 1, 1)
    assert (bi[0, -1, 0] % 32 == 0).sum().item() >= 6, "the case no longer takes five blocks from one lane"


def test_select_blocks_fewer_tokens(F, mainloop):
    """l' = 16 at T = 6000: 375 score columns per token, so 128 tokens of G = 1 do not
    fit in the 227 KB of shared memory and the wgmma kernel takes fewer tokens per CTA
    (its last rows padding; the launcher's fit loop), over 12 K tiles."""
    dk, dv, dtype = DIMS[0]
    q, kc, _ = F.compressed_case(1, 6000, 1, 1, dk, dv, dtype, 16, 8)
    bi, rbi, rsc = F.run_selection(q, kc, 16, 8, 16, 6, 1, 1)
    F.check_selection(bi, rbi, rsc, 6, 16, 1, 1)


def test_select_blocks_small_lp(F, mainloop):
    """l' = 32 < 64 (several selection blocks per score tile), l = d = 32."""
    dk, dv, dtype = DIMS[0]
    q, kc, _ = F.compressed_case(1, 180, 2, 4, dk, dv, dtype, 32, 32)
    bi, rbi, rsc = F.run_selection(q, kc, 32, 32, 32, 3, 1, 1)
    F.check_selection(bi, rbi, rsc, 3, 32, 1, 1)


def test_select_blocks_varlen(F, mainloop):
    lengths = [1, 17, 200, 64, 90]
    cu = F.make_cu(lengths)
    dk, dv, dtype = DIMS[0]
    q, kc, _ = F.compressed_case(1, sum(lengths), 2, 4, dk, dv, dtype, 32, 16, cu=cu)
    bi, rbi, rsc = F.run_selection(q, kc, 32, 16, 64, 4, 1, 2, cu=cu, max_seqlen=max(lengths))
    for m in range(len(lengths)):
        a, b = cu[m].item(), cu[m + 1].item()
        F.check_selection(bi[:, a:b], rbi[:, a:b], rsc[:, a:b], 4, 64, 1, 2, name=f"seq {m}")


def test_selected_from_selection(F):
    dk, dv, dtype = DIMS[0]
    q, kc, _ = F.compressed_case(1, 150, 2, 4, dk, dv, dtype, 32, 16)
    k, v = F.rand(1, 150, 2, dk, dtype=dtype), F.rand(1, 150, 2, dv, dtype=dtype)
    bi, _, _ = F.run_selection(q, kc, 32, 16, 32, 4, 1, 2)
    F.check_selected(q, k, v, bi, 32)


# --------------------------------------------------------------------------- mean_compress

@pytest.mark.parametrize("dtype", sorted({d for _, _, d in DIMS}, key=str), ids=_id)
def test_mean_compress(F, emu, dtype):
    for cu, shape in ((None, (2, 100, 3, 64)), (F.make_cu([1, 17, 70, 33]), (1, 121, 2, 128))):
        x = F.rand(*shape, dtype=dtype)
        out = emu.mean_compress(x, cu, 32, 16)
        r64, r_lp = F.run_ref(F.ref.mean_compress, (x, 32, 16), {"cu_seqlens": cu}, dtype)
        F.assert_close(out, r64, r_lp, "mean_compress")


# --------------------------------------------------------------------------- backward

@pytest.fixture(scope="module")
def B(F):
    """test_cuda_bwd's helpers, pointed at the emulator like F."""
    m = _private_copy("test_cuda_bwd", "_emu_test_cuda_bwd")
    for name in ("OPS", "DEV", "ref", "rand", "assert_close", "random_block_indices", "make_cu"):
        setattr(m, name, getattr(F, name))
    return m


@pytest.mark.parametrize("dims", DIMS, ids=_id)
@pytest.mark.parametrize("T,G", [(1, 4), (17, 16), (70, 1), (150, 2)])
def test_compressed_bwd(B, dims, T, G, mainloop):
    q, k, v = B.qkv(2, T, 2, G, *dims)
    B.check_compressed_bwd(q, *B.cmp_kv(k, v, 32, 16), 32, 16)


@pytest.mark.parametrize("chunk_rows", ["40", "7", "3"])
def test_bwd_split(B, chunk_rows, mainloop, monkeypatch):
    """NSA_DKV_CHUNK_ROWS small: the compressed and selected dk/dv split each key
    tile's queries into chunks (fp32 partial sums, then the reduce kernel; the
    selected branch's chunk counts from the device-side plan), batch and varlen,
    duplicate block ids straddling chunk boundaries, block 0 chosen by every token,
    gradients to add."""
    monkeypatch.setenv("NSA_DKV_CHUNK_ROWS", chunk_rows)
    q, k, v = B.qkv(2, 150, 2, 2, *DIMS[0])
    B.check_compressed_bwd(q, *B.cmp_kv(k, v, 32, 16), 32, 16)
    B.check_selected_bwd(q, k, v, B.random_block_indices(2, 150, 2, 5, 16, seed=7), 16)
    _check_varlen_bwd(B, G=3)
    args, kw = B.varlen_inputs(*DIMS[0], padding=7)
    B.check_added_grads(*args, 32, 16, **kw)


def test_bwd_split_setting(B, emu, monkeypatch):
    q, k, v = B.qkv(1, 100, 1, 2, *DIMS[0])
    kc, vc = B.cmp_kv(k, v, 32, 16)
    o, lse = B._cmp_fwd(q, kc, vc, None, 100, (32, 16), 0.125)
    for bad in ("0", "-3", "many"):
        monkeypatch.setenv("NSA_DKV_CHUNK_ROWS", bad)
        with pytest.raises(RuntimeError, match="NSA_DKV_CHUNK_ROWS must be a positive integer"):
            emu.compressed_attn_bwd(torch.rand_like(o), None, q, kc, vc, o, lse, None, 100, 32, 16, 0.125)


@pytest.mark.parametrize("dims", DIMS, ids=_id)
@pytest.mark.parametrize("T,G,lp,n", [(1, 4, 64, 4), (70, 16, 32, 3), (150, 2, 16, 5),
                                      (130, 1, 64, 2), (90, 8, 128, 3), (700, 1, 16, 6),
                                      (300, 4, 32, 8), (160, 16, 16, 4)])
def test_selected_bwd(B, dims, T, G, lp, n, mainloop):
    q, k, v = B.qkv(2, T, 2, G, *dims)
    B.check_selected_bwd(q, k, v, B.random_block_indices(2, T, 2, n, lp, seed=T + G), lp)


@pytest.mark.parametrize("dims", DIMS, ids=_id)
@pytest.mark.parametrize("T,G,w", [(1, 2, 512), (17, 16, 8), (70, 1, 64), (150, 4, 65)])
def test_window_bwd(B, dims, T, G, w, mainloop):
    q, k, v = B.qkv(2, T, 2, G, *dims)
    B.check_window_bwd(q, k, v, w)


def _check_varlen_bwd(B, G, w=None):
    """Five packed sequences: the compressed, selected and (with w) window backward."""
    lengths = [1, 17, 150, 64, 33]
    cu, total, ms = B.make_cu(lengths), sum(lengths), max(lengths)
    q, k, v = B.qkv(1, total, 2, G, *DIMS[0])
    B.check_compressed_bwd(q, *B.cmp_kv(k, v, 32, 16, cu), 32, 16, cu=cu, max_seqlen=ms)
    bi = B.random_block_indices(1, total, 2, 3, 32, lengths=lengths, seed=5)
    B.check_selected_bwd(q, k, v, bi, 32, cu=cu, max_seqlen=ms)
    if w is not None:
        B.check_window_bwd(q, k, v, w, cu=cu, max_seqlen=ms)


def test_bwd_varlen(B, mainloop):
    _check_varlen_bwd(B, G=2, w=40)


@pytest.mark.parametrize("dims", DIMS, ids=_id)
def test_bwd_added_grads(B, dims, mainloop):
    """The backward kernels add dq_in, dk_in, dv_in in their epilogue (and copy them
    on varlen padding rows): bitwise the gradients plus the inputs."""
    q, k, v = B.qkv(2, 150, 2, 4, *dims)
    bi = B.random_block_indices(2, 150, 2, 3, 32, seed=3)
    B.check_added_grads(q, k, v, *B.cmp_kv(k, v, 32, 16), bi, 32, 40)


@pytest.mark.parametrize("dims", DIMS, ids=_id)
def test_bwd_given_delta(B, dims, mainloop):
    """Given delta (what sparse_attn's gate kernel hands over), the backward kernels
    skip their delta pass and use it, dlse subtracted: against the CPU op."""
    q, k, v = B.qkv(1, 130, 2, 2, *dims)
    bi = B.random_block_indices(1, 130, 2, 3, 32, seed=4)
    B.check_given_delta(q, k, v, *B.cmp_kv(k, v, 32, 16), bi, 32, 40)


def test_bwd_given_delta_varlen(B):
    args, kw = B.varlen_inputs(*DIMS[0])
    B.check_given_delta(*args, 32, 16, **kw)


@pytest.mark.parametrize("dims", DIMS, ids=_id)
@pytest.mark.parametrize("given", [True, False], ids=["given_delta", "own_delta"])
def test_bwd_dout_scale(B, dims, given, mainloop):
    """dout_scale (sparse_attn's backward: one d o, scaled by each branch's gate in the
    kernels): with the delta given and with the kernels' own delta pass."""
    q, k, v = B.qkv(1, 130, 2, 2, *dims)
    bi = B.random_block_indices(1, 130, 2, 3, 32, seed=5)
    B.check_given_delta(q, k, v, *B.cmp_kv(k, v, 32, 16), bi, 32, 40, scaled=True, given=given)


def test_bwd_dout_scale_varlen(B):
    args, kw = B.varlen_inputs(*DIMS[0], padding=5)
    B.check_given_delta(*args, 32, 16, **kw, scaled=True)


def test_bwd_added_grads_varlen_padding(B, mainloop):
    args, kw = B.varlen_inputs(*DIMS[0], padding=7)
    B.check_added_grads(*args, 32, 16, **kw)


def test_bwd_padding_rows_written(B, emu, mainloop):
    """Varlen with padding rows past cu_seqlens[-1]: every gradient element is
    written (the outputs are NaN-poisoned before each launch)."""
    lengths = [5, 70, 40]
    cu, total = B.make_cu(lengths), sum(lengths)
    dk, dv, dtype = DIMS[0]
    q, k, v = B.qkv(1, total + 7, 1, 3, dk, dv, dtype)
    kc, vc = B.cmp_kv(k, v, 32, 16, cu)
    bi = torch.full((1, total + 7, 1, 2), -1, dtype=torch.int32)
    bi[..., 0] = 0
    for fwd, bwd, kk, vv, extra, size in (
            (B._cmp_fwd, B._cmp_bwd, kc, vc, (), (32, 16)),
            (emu.selected_attn_fwd, emu.selected_attn_bwd, k, v, (bi,), 32),
            (emu.window_attn_fwd, emu.window_attn_bwd, k, v, (), 16)):
        o, lse = fwd(q, kk, vv, *extra, cu, max(lengths), size, 0.125)
        # NaN (padding rows) -> -inf; neginf too: nan_to_num would turn the -inf of a row
        # without keys into -FLT_MAX, which the backward does not read as "no key".
        o = torch.nan_to_num(o)
        lse = torch.nan_to_num(lse, nan=float("-inf"), neginf=float("-inf"))
        grads = bwd(B.rand(*o.shape, dtype=dtype), None, q, kk, vv, *extra, o, lse, cu,
                    max(lengths), size, 0.125)
        for g in grads:
            assert torch.isfinite(g).all()
    dx = emu.mean_compress_bwd(B.rand(*kc.shape, dtype=dtype), k, cu, 32, 16)
    assert torch.isfinite(dx).all()


@pytest.mark.parametrize("dtype", sorted({d for _, _, d in DIMS}, key=str), ids=_id)
def test_mean_compress_bwd(B, F, emu, dtype):
    for cu, shape in ((None, (2, 100, 3, 64)), (F.make_cu([1, 17, 70, 33]), (1, 121, 2, 128))):
        x = F.rand(*shape, dtype=dtype)
        g = F.rand(*emu.mean_compress(x, cu, 32, 16).shape, dtype=dtype)
        dx = emu.mean_compress_bwd(g, x, cu, 32, 16)

        def grad(dt):
            xx = x.detach().to(dt).requires_grad_(True)
            (F.ref.mean_compress(xx, 32, 16, cu_seqlens=cu) * g.to(dt)).sum().backward()
            return xx.grad

        F.assert_close(dx, grad(torch.float64), grad(dtype), "dx mean_compress")


@pytest.mark.parametrize("dtype", sorted({d for _, _, d in DIMS}, key=str), ids=_id)
@pytest.mark.parametrize("num_branches", [1, 2, 3])
@pytest.mark.parametrize("dv", [64, 136])
def test_gate_combine(F, dtype, num_branches, dv):
    """The gate kernels (every output poisoned first) by test_cuda_fwd's check; Dv = 136
    takes a second 128-column step with half the lanes idle."""
    F.check_gate_combine(dtype, num_branches, dv)


def test_gate_combine_needs_dv_multiple_of_8(F, emu):
    x = torch.zeros(1, 2, 3, 12, dtype=torch.bfloat16)
    g = torch.zeros(1, 2, 3)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        emu.gate_combine([x], [g])


# --------------------------------------------------------------------------- decode

def _cpu_ops():
    import nsa_cuda  # noqa: F401  (registers torch.ops.nsa_cuda's CPU kernels)
    return torch.ops.nsa_cuda


def _vs_cpu(F, name, got, op, args, dtype):
    """An emulated op's outputs against the CPU op in fp64 (ref) and in the input
    dtype (ref_lp), by the spec's rule."""
    def cast(dt):
        return [a.to(dt) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in args]
    for i, (x, a, b) in enumerate(zip(got, op(*cast(torch.float64)), op(*cast(dtype)))):
        F.assert_close(x, a, b, f"{name}[{i}]")


def _check_compressed_select(F, emu, args, o_lse, picks):
    """compressed_select_decode (the compressed attention keeps its scores, the
    selection reads them instead of k_cmp): o and lse bitwise those of
    compressed_attn_decode, the selection right by fp64 scores (near-ties aside)."""
    q, kc, vc, lens, l, d, lp, n, n_init, n_local, scale = args
    o, lse, bi = emu.compressed_select_decode(*args)
    assert torch.equal(o, o_lse[0]) and torch.equal(lse, o_lse[1])
    F.check_selection_rows(q, kc, bi, picks, l, d, lp, n, n_init, n_local, scale)


def _decode_inputs(F, dims, Bsz, S, Hkv, G, cap, l, d):
    """q [Bsz, S, Hkv*G, dk], token caches k, v of `cap` rows and their mean-compressed
    caches kc, vc, random in the instance's dtype."""
    dk, dv, dtype = dims
    q = F.rand(Bsz, S, Hkv * G, dk, dtype=dtype)
    k = F.rand(Bsz, cap, Hkv, dk, dtype=dtype)
    v = F.rand(Bsz, cap, Hkv, dv, dtype=dtype)
    return q, k, v, F.ref.mean_compress(k, l, d), F.ref.mean_compress(v, l, d)


# Batch entries, KV heads, cache capacity, l, d, l', n, w of the decode tests.
DECODE_SIZES = (3, 2, 180, 32, 16, 32, 3, 40)


def _decode_case(F, dims, S, G, splits, monkeypatch):
    """Lengths (full, mid, shorter than a compressed block) and random caches of the
    decode tests; the KV split count fixed to `splits` unless it is None."""
    if splits is not None:
        monkeypatch.setenv("NSA_DECODE_SPLITS", str(splits))
    Bsz, Hkv, cap, l, d = DECODE_SIZES[:5]
    lens = torch.tensor([cap, 97, max(S, 20)], dtype=torch.int32)
    return (lens, *_decode_inputs(F, dims, Bsz, S, Hkv, G, cap, l, d))


@pytest.mark.parametrize("dims", DIMS, ids=_id)
@pytest.mark.parametrize("S,G,splits", [(1, 1, None), (1, 16, None), (3, 4, None), (8, 2, None),
                                        (1, 16, 1), (3, 4, 1), (8, 2, 2), (3, 16, 1), (5, 5, None)])
def test_decode(F, emu, dims, S, G, splits, monkeypatch):
    """The decode kernels (split-KV attention + combine for the three branches,
    selection scores + top-n) on three batch entries at different cache lengths,
    one shorter than a compressed block (no compressed keys: lse = -inf, o = 0).
    With the H100's SM count every split gets about one 32-key chunk; with the
    split count fixed (NSA_DECODE_SPLITS=1 or 2) a split walks several chunks,
    through the double-buffered chunk pipeline. One split (fixed, or chosen by the
    heuristic for a short branch) writes o and lse itself, with no combine. S * G > 16
    takes several 16-row tiles: whole tokens (3 x 16) or a token cut by a tile
    boundary (5 x 5: rows 15 and 16 are heads of token 3)."""
    cpu = _cpu_ops()
    dk, dv, dtype = dims
    Bsz, Hkv, cap, l, d, lp, n, w = DECODE_SIZES
    lens, q, k, v, kc, vc = _decode_case(F, dims, S, G, splits, monkeypatch)
    scale = dk ** -0.5

    o, lse = emu.compressed_attn_decode(q, kc, vc, lens, l, d, scale)
    _vs_cpu(F, "cmp_decode", (o, lse), cpu.compressed_attn_decode, (q, kc, vc, lens, l, d, scale), dtype)
    assert torch.isinf(lse[2]).all() and (o[2] == 0).all()

    # Selection: the emulated kernel from its own lse, against fp64 scores of each
    # row (equal sets up to near-ties).
    bi = emu.select_blocks_decode(q, kc, lse, lens, l, d, lp, n, 1, 1, scale)
    picks = [(b, i, int(lens[b]) - S + i) for b in range(Bsz) for i in range(S)]
    F.check_selection_rows(q, kc, bi, picks, l, d, lp, n, 1, 1, scale)
    _check_compressed_select(F, emu, (q, kc, vc, lens, l, d, lp, n, 1, 1, scale), (o, lse), picks)

    o, lse = emu.selected_attn_decode(q, k, v, bi, lens, lp, scale)
    _vs_cpu(F, "slc_decode", (o, lse), cpu.selected_attn_decode, (q, k, v, bi, lens, lp, scale), dtype)
    o, lse = emu.window_attn_decode(q, k, v, lens, w, scale)
    _vs_cpu(F, "win_decode", (o, lse), cpu.window_attn_decode, (q, k, v, lens, w, scale), dtype)


@pytest.mark.parametrize("dims", DIMS, ids=_id)
@pytest.mark.parametrize("S,G,splits", [(1, 16, None), (3, 4, 1), (5, 5, None), (2, 2, 3)])
def test_sparse_attn_decode(F, emu, dims, S, G, splits, monkeypatch):
    """The whole decode step in one op: every branch leaves its KV splits unmerged
    (one split included, NSA_DECODE_SPLITS=1) and decode_gate_combine merges them
    and sums the gated branches. Against the CPU op by the spec's rule with the
    emulator's block choice; gates as the layer passes them (strided views of one
    [B, S, 3, Hq] tensor, in q's dtype or in fp32, converted first). The selecting form
    (no block_indices) picks compressed_select_decode's blocks; with g_cmp off it
    is bitwise the form given those blocks. Separate window caches, a branch off,
    and every gate off (zeros)."""
    cpu = _cpu_ops()
    dk, dv, dtype = dims
    Bsz, Hkv, cap, l, d, lp, n, w = DECODE_SIZES
    lens, q, k, v, kc, vc = _decode_case(F, dims, S, G, splits, monkeypatch)
    k_win, v_win = F.rand(*k.shape, dtype=dtype), F.rand(*v.shape, dtype=dtype)
    scale = dk ** -0.5
    # q's dtype: the kernel reads the strided views; fp32: converted (contiguous) first
    gates = torch.rand(Bsz, S, 3, Hkv * G).to(dtype if splits is None else torch.float32)
    g_cmp, g_slc, g_win = (gates[:, :, j] for j in range(3))
    sizes = (l, d, lp, n, 1, 1, w, scale)
    _, _, bi = emu.compressed_select_decode(q, kc, vc, lens, l, d, lp, n, 1, 1, scale)

    def check(name, args, cpu_args=None):
        got = emu.sparse_attn_decode(*args)
        _vs_cpu(F, name, (got,), lambda *a: (cpu.sparse_attn_decode(*a),), cpu_args or args,
                dtype)
        return got

    caches = (q, k, v, k_win, v_win, kc, vc, lens)
    check("step", (*caches, g_cmp, g_slc, g_win, bi, *sizes))
    check("no window", (*caches, g_cmp, g_slc, None, bi, *sizes))
    check("compressed only", (*caches, g_cmp, None, None, None, *sizes))
    given = check("no cmp", (*caches, None, g_slc, g_win, bi, *sizes))
    assert torch.equal(emu.sparse_attn_decode(*caches, None, g_slc, g_win, None, *sizes), given)
    # Selecting with the compressed branch on: its o is merged (for the selection's
    # lse) before the gated sum.
    check("selecting", (*caches, g_cmp, g_slc, g_win, None, *sizes),
          (*caches, g_cmp, g_slc, g_win, bi, *sizes))
    off = emu.sparse_attn_decode(*caches, None, None, None, None, *sizes)
    assert torch.equal(off, torch.zeros_like(off))


@pytest.mark.parametrize("dims", DIMS, ids=_id)
def test_decode_selection_many_rows_and_heads(F, emu, dims):
    """The decode selection's score kernel past one MMA tile each way: G = 20 query
    heads (a 16-head pass, then 4 with 12 zero rows) and score CTAs whose
    compressed rows span three 32-row passes (16 blocks of l' = 40 cover 640
    tokens: 81 compressed rows at d = 8, the third pass 17 of them); the
    test_decode caches have at most 10 compressed rows."""
    dk, dv, dtype = dims
    Bsz, Hkv, G, S, cap, l, d, lp, n = 2, 1, 20, 2, 1200, 16, 8, 40, 8
    lens = torch.tensor([cap, 700], dtype=torch.int32)
    q, k, v, kc, vc = _decode_inputs(F, dims, Bsz, S, Hkv, G, cap, l, d)
    scale = dk ** -0.5
    o, lse = emu.compressed_attn_decode(q, kc, vc, lens, l, d, scale)
    bi = emu.select_blocks_decode(q, kc, lse, lens, l, d, lp, n, 1, 1, scale)
    picks = [(b, i, int(lens[b]) - S + i) for b in range(Bsz) for i in range(S)]
    F.check_selection_rows(q, kc, bi, picks, l, d, lp, n, 1, 1, scale)
    _check_compressed_select(F, emu, (q, kc, vc, lens, l, d, lp, n, 1, 1, scale), (o, lse), picks)


@pytest.mark.parametrize("dtype", sorted({d for _, _, d in DIMS}, key=str), ids=_id)
def test_append_kv_to_cache(F, emu, dtype):
    """The append kernel writes each new k and v row (strided source, all heads, the
    two head dims) where the CPU op does and leaves the rest of the (poisoned)
    caches as they were."""
    cpu = _cpu_ops()
    caches = [torch.full((3, 50, 2, D), float("nan"), dtype=dtype) for D in (192, 128)]
    k_new = F.rand(3, 8, 4, 192, dtype=dtype)[:, :, ::2]
    v_new = F.rand(3, 8, 2, 128, dtype=dtype)
    lens = torch.tensor([0, 17, 42], dtype=torch.int32)
    got, want = [c.clone() for c in caches], [c.clone() for c in caches]
    emu.append_kv_to_cache(*got, lens, k_new, v_new)
    cpu.append_kv_to_cache(*want, lens, k_new, v_new)
    for g, w, new in zip(got, want, (k_new, v_new)):
        assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.nan_to_num(), w.nan_to_num())
        assert (~g.isnan()).sum() == new.numel()


@pytest.mark.parametrize("dtype", sorted({d for _, _, d in DIMS}, key=str), ids=_id)
@pytest.mark.parametrize("num_new", [1, 5, 8])
def test_append_kv_to_cache_with_cmp_caches(F, emu, dtype, num_new):
    """The fused append + compressed-cache update (one launch; the blocks that complete
    read the new rows from k_new / v_new, not from the cache other CTAs are writing)
    is bitwise the append kernel followed by update_cmp_cache on each side, and close
    to the CPU op in fp64; rows it must not write stay poisoned."""
    cpu = _cpu_ops()
    Bsz, cap, l, d = 5, 64, 16, 8
    rows = (cap - l) // d + 1
    lens = torch.tensor([0, 10, 15, 23, cap - num_new], dtype=torch.int32)  # blocks complete or not
    token = [F.rand(Bsz, cap, 2, D, dtype=dtype) for D in (192, 128)]
    cmp = []
    for x in token:  # valid blocks of the old lengths, NaN past them
        c = torch.full((Bsz, rows, 2, x.shape[3]), float("nan"), dtype=dtype)
        for b, n in enumerate(lens.tolist()):
            nb = max(0, (n - l) // d + 1) if n >= l else 0
            c[b, :nb] = F.ref.mean_compress(x[b:b + 1, :n], l, d)[0, :nb].to(dtype)
        cmp.append(c)
    k_new = F.rand(Bsz, num_new, 4, 192, dtype=dtype)[:, :, ::2]  # strided heads
    v_new = F.rand(Bsz, num_new, 2, 128, dtype=dtype)

    fused = [t.clone() for t in token + cmp]
    emu.append_kv_to_cache(fused[0], fused[1], lens, k_new, v_new, fused[2], fused[3], l, d)
    separate = [t.clone() for t in token + cmp]
    emu.append_kv_to_cache(separate[0], separate[1], lens, k_new, v_new)
    for x, x_cmp in ((separate[0], separate[2]), (separate[1], separate[3])):
        emu.update_cmp_cache(x, x_cmp, lens, num_new, l, d)
    for a, b in zip(fused, separate):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    want64 = [t.double() for t in token + cmp]
    cpu.append_kv_to_cache(want64[0], want64[1], lens, k_new.double(), v_new.double(), want64[2],
                           want64[3], l, d)
    want_lp = [t.clone() for t in token + cmp]
    cpu.append_kv_to_cache(want_lp[0], want_lp[1], lens, k_new, v_new, want_lp[2], want_lp[3], l, d)
    for i, (g, w64, wlp) in enumerate(zip(fused, want64, want_lp)):
        assert torch.equal(g.isnan(), w64.isnan()), f"cache {i}: written rows differ"
        F.assert_close(g.nan_to_num(), w64.nan_to_num(), wlp.nan_to_num(), f"cache {i}")
    written = ~fused[2].isnan().all(-1).all(-1)
    assert written.sum() > (~cmp[0].isnan().all(-1).all(-1)).sum()  # some block completed


@pytest.mark.parametrize("dtype", sorted({d for _, _, d in DIMS}, key=str), ids=_id)
@pytest.mark.parametrize("num_new", [1, 5, 40])
def test_update_cmp_cache(F, emu, dtype, num_new):
    cpu = _cpu_ops()
    dk = 64
    l, d, cap = 32, 16, 160
    prefix = torch.tensor([0, 31, 100, cap - num_new], dtype=torch.int32)
    x = F.rand(4, cap, 2, dk, dtype=dtype)
    rows = (cap - l) // d + 1
    base = F.rand(4, rows, 2, dk, dtype=dtype)
    got = base.clone()
    emu.update_cmp_cache(x, got, prefix, num_new, l, d)
    want64, want_lp = base.double(), base.clone()
    cpu.update_cmp_cache(x.double(), want64, prefix, num_new, l, d)
    cpu.update_cmp_cache(x, want_lp, prefix, num_new, l, d)
    F.assert_close(got, want64, want_lp, "update_cmp_cache")
