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

Build: tests/_cuda_emu.py (torch JIT, g++ -O1, about 4 minutes for the default
instance on two cores, reused afterwards from build/emu-*/). Switches:
  NSA_SKIP_EMULATION=1      skip this module
  NSA_EMU_INSTANCES=64:bf16,64:fp16   instances to build (default 64:bf16)
  NSA_EMULATION_FULL=1      all six instances and the larger cases
  NSA_EMU_SEED=n            the fiber schedule / cp.async landing seed (default 1)
  NSA_EMU_THREADS=n         OS threads running CTAs (default min(4, cores))
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

FULL = os.environ.get("NSA_EMULATION_FULL", "0") not in ("", "0")
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


# --------------------------------------------------------------------------- forward

def _qkv(F, B, T, Hkv, G, dims):
    dk, dv, dtype = dims
    return (F.rand(B, T, Hkv * G, dk, dtype=dtype), F.rand(B, T, Hkv, dk, dtype=dtype),
            F.rand(B, T, Hkv, dv, dtype=dtype))


@pytest.mark.parametrize("dims", DIMS, ids=_id)
@pytest.mark.parametrize("T,G", [(1, 4), (17, 16), (70, 1), (200, 2), (130, 8)])
def test_compressed_fwd(F, dims, T, G):
    q, k, v = _qkv(F, 2, T, 2, G, dims)
    kc = F.ref.mean_compress(k, 32, 16)
    vc = F.ref.mean_compress(v, 32, 16)
    F.check_compressed(q, kc, vc, 32, 16)


def test_compressed_fwd_varlen(F):
    lengths = [1, 17, 150, 64, 40]
    cu = F.make_cu(lengths)
    q, k, v = _qkv(F, 1, sum(lengths), 2, 4, DIMS[0])
    kc = F.ref.mean_compress(k, 32, 16, cu_seqlens=cu)
    vc = F.ref.mean_compress(v, 32, 16, cu_seqlens=cu)
    F.check_compressed(q, kc, vc, 32, 16, cu=cu, max_seqlen=max(lengths))


def test_compressed_fwd_fewer_rows(F, emu):
    dk, dv, dtype = DIMS[0]
    q, k, v = _qkv(F, 1, 120, 1, 2, DIMS[0])
    kc = F.ref.mean_compress(k, 32, 16)[:, :3].contiguous()
    vc = F.ref.mean_compress(v, 32, 16)[:, :3].contiguous()
    o, lse = emu.compressed_attn_fwd(q, kc, vc, None, 120, 32, 16, dk ** -0.5)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert torch.isinf(lse[:, :, :31]).all() and (o[:, :31] == 0).all()


@pytest.mark.parametrize("dims", DIMS, ids=_id)
@pytest.mark.parametrize("T,G,lp,n", [(1, 4, 64, 4), (70, 16, 32, 3), (200, 2, 16, 5),
                                      (130, 1, 64, 2), (90, 8, 128, 3)])
def test_selected_fwd(F, dims, T, G, lp, n):
    q, k, v = _qkv(F, 2, T, 2, G, dims)
    bi = F.random_block_indices(2, T, 2, n, lp, seed=T + G)
    F.check_selected(q, k, v, bi, lp)


def test_selected_fwd_varlen(F):
    lengths = [1, 17, 150, 64, 33]
    cu = F.make_cu(lengths)
    q, k, v = _qkv(F, 1, sum(lengths), 2, 4, DIMS[0])
    bi = F.random_block_indices(1, sum(lengths), 2, 3, 32, lengths=lengths, seed=5)
    F.check_selected(q, k, v, bi, 32, cu=cu, max_seqlen=max(lengths))


def test_selected_fwd_int64_indices(F):
    q, k, v = _qkv(F, 1, 100, 1, 4, DIMS[0])
    bi = F.random_block_indices(1, 100, 1, 4, 16, garbage=False, seed=3).long()
    bi[0, -1, 0, -1] = 2 ** 33
    F.check_selected(q, k, v, bi, 16)


@pytest.mark.parametrize("dims", DIMS, ids=_id)
@pytest.mark.parametrize("T,G,w", [(1, 2, 512), (17, 16, 8), (70, 1, 64), (200, 4, 65),
                                   (130, 8, 129)])
def test_window_fwd(F, dims, T, G, w):
    q, k, v = _qkv(F, 2, T, 2, G, dims)
    F.check_window(q, k, v, w)


def test_window_fwd_varlen(F):
    lengths = [1, 17, 200, 64, 5]
    cu = F.make_cu(lengths)
    q, k, v = _qkv(F, 1, sum(lengths), 2, 8, DIMS[0])
    F.check_window(q, k, v, 50, cu=cu, max_seqlen=max(lengths))


def test_window_fwd_non_contiguous(F):
    dk, dv, dtype = DIMS[0]
    big = F.rand(1, 90, 6, dk, dtype=dtype)
    F.check_window(big[:, :, :4], big[:, :, 4:5], big[:, :, 5:6], 30)
