"""The spec's "What bad input gets": a clear ValueError/TypeError/RuntimeError whose
message names the argument. Plus: out-of-range block indices are unused slots."""
from __future__ import annotations

import pytest
import torch

import nsa_cuda
from nsa_cuda import reference as R

from conftest import (Cfg, assert_close_exact, make_cu_seqlens, make_inputs, make_varlen_inputs)

ERRORS = (ValueError, TypeError, RuntimeError)
F64 = torch.float64

CFG = Cfg(B=2, T=40, Hq=4, Hkv=2, Dk=8, Dv=6, l=16, d=8, lp=16, n=3, n_init=1, n_local=1, w=16)
KW = CFG.all_kw()


def base():
    return make_inputs(CFG, dtype=torch.float32, seed=31)


def call_sparse(inp, **kw):
    args = dict(KW)
    args.update(kw)
    return nsa_cuda.sparse_attn(inp["q"], inp["k"], inp["v"], inp["g_cmp"], inp["g_slc"],
                                inp["g_win"], inp.get("k_cmp"), inp.get("v_cmp"), **args)


def raises(match):
    return pytest.raises(ERRORS, match=match)


def _noncontig(x):
    """Same shape, last dim with stride != 1."""
    y = torch.empty(*x.shape[:-1], x.shape[-1] * 2, dtype=x.dtype)[..., ::2]
    y.copy_(x)
    assert y.stride(-1) == 2
    return y


# --------------------------------------------------------------------------------------
# q, k, v
# --------------------------------------------------------------------------------------

QKV_CASES = {
    # name: (mutation of the inputs, regex the message must contain)
    "q rank 3": (lambda d: d.update(q=d["q"][0]), r"\bq\b"),
    "k rank 5": (lambda d: d.update(k=d["k"].unsqueeze(0)), r"\bk\b"),
    "v rank 3": (lambda d: d.update(v=d["v"][0]), r"\bv\b"),
    "q not a tensor": (lambda d: d.update(q=d["q"].tolist()), r"\bq\b"),
    "k wrong T": (lambda d: d.update(k=d["k"][:, :-1].contiguous()), r"\bk\b"),
    "v wrong T": (lambda d: d.update(v=d["v"][:, :-1].contiguous()), r"\bv\b"),
    "k wrong batch": (lambda d: d.update(k=d["k"][:1].contiguous()), r"batch.*\bk\b"),
    "v wrong batch": (lambda d: d.update(v=d["v"][:1].contiguous()), r"batch.*\bv\b"),
    "v heads != k heads": (lambda d: d.update(v=d["v"][:, :, :1].contiguous()), r"\bv\b"),
    "Hq % Hkv": (lambda d: d.update(k=torch.randn(2, 40, 3, 8), v=torch.randn(2, 40, 3, 6)),
                 r"Hkv|Hq"),
    "q int32": (lambda d: d.update(q=d["q"].to(torch.int32)), r"\bq\b.*int32|int32.*\bq\b"),
    "q complex": (lambda d: d.update(q=d["q"].to(torch.complex64)), r"\bq\b"),
    "k dtype != q": (lambda d: d.update(k=d["k"].double()), r"\bk\b"),
    "v dtype != q": (lambda d: d.update(v=d["v"].half()), r"\bv\b"),
    "k head dim": (lambda d: d.update(k=torch.randn(2, 40, 2, 7)), r"head dim|Dk"),
    "Dk = 0": (lambda d: d.update(q=torch.randn(2, 40, 4, 0), k=torch.randn(2, 40, 2, 0)),
               r"head dim|Dk|\bq\b"),
    "k on meta": (lambda d: d.update(k=d["k"].to("meta")), r"\bk\b"),
    "v on meta": (lambda d: d.update(v=d["v"].to("meta")), r"\bv\b"),
    "q non-contiguous": (lambda d: d.update(q=_noncontig(d["q"])), r"\bq\b.*contiguous"),
    "k non-contiguous": (lambda d: d.update(k=_noncontig(d["k"])), r"\bk\b.*contiguous"),
    "v non-contiguous": (lambda d: d.update(v=_noncontig(d["v"])), r"\bv\b.*contiguous"),
    # gates
    "g_cmp wrong shape": (lambda d: d.update(g_cmp=d["g_cmp"][:, :, :2]), r"g_cmp"),
    "g_slc rank 4": (lambda d: d.update(g_slc=d["g_slc"].unsqueeze(-1)), r"g_slc"),
    "g_win wrong T": (lambda d: d.update(g_win=d["g_win"][:, 1:]), r"g_win"),
    "g_win int": (lambda d: d.update(g_win=d["g_win"].to(torch.int64)), r"g_win"),
    "g_slc on meta": (lambda d: d.update(g_slc=d["g_slc"].to("meta")), r"g_slc"),
    # caller-given k_cmp / v_cmp
    "k_cmp too few rows": (lambda d: d.update(k_cmp=torch.randn(2, 3, 2, 8),
                                              v_cmp=torch.randn(2, 3, 2, 6)), r"k_cmp"),
    "k_cmp without v_cmp": (lambda d: d.update(k_cmp=torch.randn(2, 4, 2, 8)), r"v_cmp"),
    "v_cmp heads": (lambda d: d.update(k_cmp=torch.randn(2, 4, 2, 8),
                                       v_cmp=torch.randn(2, 4, 1, 6)), r"v_cmp"),
    "k_cmp head dim": (lambda d: d.update(k_cmp=torch.randn(2, 4, 2, 5),
                                          v_cmp=torch.randn(2, 4, 2, 6)), r"k_cmp"),
    "k_cmp dtype": (lambda d: d.update(k_cmp=torch.randn(2, 4, 2, 8, dtype=F64),
                                       v_cmp=torch.randn(2, 4, 2, 6)), r"k_cmp"),
    "k_cmp rows != v_cmp rows": (lambda d: d.update(k_cmp=torch.randn(2, 4, 2, 8),
                                                    v_cmp=torch.randn(2, 5, 2, 6)), r"v_cmp"),
    "k_cmp on meta": (lambda d: d.update(k_cmp=torch.randn(2, 4, 2, 8, device="meta"),
                                         v_cmp=torch.randn(2, 4, 2, 6)), r"k_cmp"),
    "k_cmp non-contiguous": (lambda d: d.update(k_cmp=_noncontig(torch.randn(2, 4, 2, 8)),
                                                v_cmp=torch.randn(2, 4, 2, 6)),
                             r"k_cmp.*contiguous"),
}


@pytest.mark.parametrize("case", list(QKV_CASES), ids=list(QKV_CASES))
def test_sparse_attn_bad_tensors(case):
    mutate, match = QKV_CASES[case]
    inp = base()
    mutate(inp)
    with raises(match):
        call_sparse(inp)


SIZE_CASES = {
    "d does not divide l": (dict(cmp_block_size=20, cmp_stride=8), r"cmp_stride|cmp_block_size"),
    "d does not divide l'": (dict(cmp_block_size=16, cmp_stride=8, slc_block_size=20),
                             r"slc_block_size"),
    "n_local = 0": (dict(slc_local_blocks=0), r"slc_local_blocks"),
    "n_init + n_local > n": (dict(slc_num_blocks=3, slc_init_blocks=2, slc_local_blocks=2),
                             r"slc_num_blocks|slc_init_blocks"),
    "n_init < 0": (dict(slc_init_blocks=-1), r"slc_init_blocks"),
    "l = 0": (dict(cmp_block_size=0), r"cmp_block_size"),
    "d = 0": (dict(cmp_stride=0), r"cmp_stride"),
    "d < 0": (dict(cmp_stride=-8), r"cmp_stride"),
    "l' = 0": (dict(slc_block_size=0), r"slc_block_size"),
    "n = 0": (dict(slc_num_blocks=0, slc_init_blocks=0), r"slc_num_blocks|slc_local"),
    "w = 0": (dict(window_size=0), r"window_size"),
    "w < 0": (dict(window_size=-3), r"window_size"),
    "l float": (dict(cmp_block_size=16.0), r"cmp_block_size"),
    "w bool": (dict(window_size=True), r"window_size"),
    "scale string": (dict(scale="0.1"), r"scale"),
    "max_seqlen str": (dict(max_seqlen="40"), r"max_seqlen"),
}


@pytest.mark.parametrize("case", list(SIZE_CASES), ids=list(SIZE_CASES))
def test_sparse_attn_bad_sizes(case):
    kw, match = SIZE_CASES[case]
    with raises(match):
        call_sparse(base(), **kw)


def _bi(shape=(2, 40, 2, 3), dtype=torch.int32):
    return torch.zeros(shape, dtype=dtype)


BI_CASES = {
    "wrong heads": (_bi((2, 40, 3, 3)), r"block_indices"),
    "wrong T": (_bi((2, 39, 2, 3)), r"block_indices"),
    "wrong batch": (_bi((1, 40, 2, 3)), r"block_indices"),
    "rank 3": (_bi((2, 40, 2)), r"block_indices"),
    "n = 0": (_bi((2, 40, 2, 0)), r"block_indices"),
    "float": (_bi(dtype=torch.float32), r"block_indices"),
    "int16": (_bi(dtype=torch.int16), r"block_indices"),
    "bool": (_bi(dtype=torch.bool), r"block_indices"),
    "meta": (_bi().to("meta"), r"block_indices"),
    "list": ([[0]], r"block_indices"),
}


@pytest.mark.parametrize("case", list(BI_CASES), ids=list(BI_CASES))
def test_bad_block_indices(case):
    bi, match = BI_CASES[case]
    inp = base()
    with raises(match):
        call_sparse(inp, block_indices=bi)
    with raises(match):
        nsa_cuda.selected_attn(inp["q"], inp["k"], inp["v"], bi, slc_block_size=16)


# --------------------------------------------------------------------------------------
# cu_seqlens
# --------------------------------------------------------------------------------------

def varlen_base():
    inp = make_varlen_inputs(CFG, [10, 30], dtype=torch.float32, seed=32)
    cu = inp.pop("cu_seqlens")
    return inp, cu


CU_CASES = {
    "int64": (lambda cu: cu.long(), r"cu_seqlens.*int32"),
    "float": (lambda cu: cu.float(), r"cu_seqlens"),
    "2-D": (lambda cu: cu.view(1, -1), r"cu_seqlens"),
    "single entry": (lambda cu: cu[:1], r"cu_seqlens"),
    "not starting at 0": (lambda cu: torch.tensor([2, 10, 40], dtype=torch.int32),
                          r"cu_seqlens.*start"),
    "decreasing": (lambda cu: torch.tensor([0, 30, 20, 40], dtype=torch.int32),
                   r"cu_seqlens.*(decreas|non-decreasing)"),
    "not ending at total": (lambda cu: torch.tensor([0, 10, 39], dtype=torch.int32),
                            r"cu_seqlens.*(end|total)"),
    "past total": (lambda cu: torch.tensor([0, 10, 41], dtype=torch.int32),
                   r"cu_seqlens.*(end|total)"),
    "meta": (lambda cu: cu.to("meta"), r"cu_seqlens"),
    "not a tensor": (lambda cu: cu.tolist(), r"cu_seqlens"),
}


@pytest.mark.parametrize("case", list(CU_CASES), ids=list(CU_CASES))
def test_bad_cu_seqlens(case):
    mutate, match = CU_CASES[case]
    inp, cu = varlen_base()
    bad = mutate(cu)
    with raises(match):
        call_sparse(inp, cu_seqlens=bad)
    with raises(match):
        nsa_cuda.window_attn(inp["q"], inp["k"], inp["v"], window_size=8, cu_seqlens=bad)
    with raises(match):
        nsa_cuda.mean_compress(inp["k"], 16, 8, cu_seqlens=bad)


def test_cu_seqlens_with_batch():
    inp = base()  # B = 2
    cu = make_cu_seqlens([20, 20])
    with raises(r"cu_seqlens"):
        call_sparse(inp, cu_seqlens=cu)


@pytest.mark.parametrize("cu,total,max_seqlen", [
    ([0, 3, 10], 10, 6),      # a sequence longer than max_seqlen
    ([1, 3, 10], 10, 7),      # not starting at 0
    ([0, 5, 3, 10], 10, 7),   # decreasing
    ([0, 3, 10], 11, 7),      # not ending at total
], ids=["max_seqlen", "start", "decreasing", "end"])
def test_cu_seqlens_device_assert(cu, total, max_seqlen):
    """The no-sync check used for device tensors (a device-side assert there; on CPU
    tensors, as here, it raises at once) refuses each kind of bad cu_seqlens."""
    from nsa_cuda import _validate
    cu = torch.tensor(cu, dtype=torch.int32)
    with raises(r"cu_seqlens must start at 0"):
        _validate.assert_cu_seqlens_async(cu, total, max_seqlen)
    _validate.assert_cu_seqlens_async(torch.tensor([0, 3, 10], dtype=torch.int32), 10, 7)


def test_max_seqlen_too_small():
    inp, cu = varlen_base()
    with raises(r"max_seqlen"):
        call_sparse(inp, cu_seqlens=cu, max_seqlen=20)
    with raises(r"max_seqlen"):
        call_sparse(inp, cu_seqlens=cu, max_seqlen=-1)


# --------------------------------------------------------------------------------------
# the branch functions
# --------------------------------------------------------------------------------------


def test_compressed_attn_bad_input():
    inp = base()
    q = inp["q"]
    kc, vc = torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 6)
    with raises(r"k_cmp"):
        nsa_cuda.compressed_attn(q, kc[:, :2], vc[:, :2], cmp_block_size=16, cmp_stride=8)
    with raises(r"k_cmp"):
        nsa_cuda.compressed_attn(q, kc[0], vc, cmp_block_size=16, cmp_stride=8)
    with raises(r"v_cmp"):
        nsa_cuda.compressed_attn(q, kc, vc.double(), cmp_block_size=16, cmp_stride=8)
    with raises(r"cmp_stride|cmp_block_size"):
        nsa_cuda.compressed_attn(q, kc, vc, cmp_block_size=16, cmp_stride=5)
    with raises(r"k_cmp"):
        nsa_cuda.compressed_attn(q, kc.to("meta"), vc, cmp_block_size=16, cmp_stride=8)
    with raises(r"\bq\b"):
        nsa_cuda.compressed_attn(q.to(torch.int32), kc, vc, cmp_block_size=16, cmp_stride=8)


def test_select_blocks_bad_input():
    inp = base()
    q = inp["q"]
    kc = torch.randn(2, 4, 2, 8)
    lse = torch.zeros(2, 4, 40)
    ok = dict(cmp_block_size=16, cmp_stride=8, slc_block_size=16, slc_num_blocks=3,
              slc_init_blocks=1, slc_local_blocks=1)
    nsa_cuda.select_blocks(q, kc, lse, **ok)  # fine
    with raises(r"lse_cmp"):
        nsa_cuda.select_blocks(q, kc, lse[:, :, :-1], **ok)
    with raises(r"lse_cmp"):
        nsa_cuda.select_blocks(q, kc, lse.double(), **ok)
    with raises(r"lse_cmp"):
        nsa_cuda.select_blocks(q, kc, lse[0], **ok)
    with raises(r"lse_cmp"):
        nsa_cuda.select_blocks(q, kc, lse.to("meta"), **ok)
    with raises(r"k_cmp"):
        nsa_cuda.select_blocks(q, kc[:, :, :1].repeat(1, 1, 3, 1), lse, **ok)
    with raises(r"k_cmp"):
        nsa_cuda.select_blocks(q, kc[:, :3], lse, **ok)
    with raises(r"slc_local_blocks"):
        nsa_cuda.select_blocks(q, kc, lse, **dict(ok, slc_local_blocks=0))
    with raises(r"slc_num_blocks|slc_init_blocks"):
        nsa_cuda.select_blocks(q, kc, lse, **dict(ok, slc_init_blocks=3))
    with raises(r"slc_block_size"):
        nsa_cuda.select_blocks(q, kc, lse, **dict(ok, slc_block_size=12))


def test_window_and_selected_bad_input():
    inp = base()
    q, k, v = inp["q"], inp["k"], inp["v"]
    with raises(r"window_size"):
        nsa_cuda.window_attn(q, k, v, window_size=0)
    with raises(r"\bk\b"):
        nsa_cuda.window_attn(q, k[:, :5].contiguous(), v[:, :5].contiguous(), window_size=4)
    with raises(r"slc_block_size"):
        nsa_cuda.selected_attn(q, k, v, _bi(), slc_block_size=0)
    with raises(r"Hkv|Hq"):
        nsa_cuda.selected_attn(q, torch.randn(2, 40, 3, 8), torch.randn(2, 40, 3, 6),
                               _bi((2, 40, 3, 3)), slc_block_size=16)


def test_mean_compress_bad_input():
    x = torch.randn(2, 40, 2, 8)
    with raises(r"\bx\b"):
        nsa_cuda.mean_compress(x[0], 16, 8)
    with raises(r"\bx\b"):
        nsa_cuda.mean_compress(x.to(torch.int32), 16, 8)
    with raises(r"\bx\b.*contiguous"):
        nsa_cuda.mean_compress(_noncontig(x), 16, 8)
    with raises(r"cmp_stride|cmp_block_size"):
        nsa_cuda.mean_compress(x, 16, 6)
    with raises(r"cmp_block_size"):
        nsa_cuda.mean_compress(x, 0, 8)
    with raises(r"cmp_stride"):
        nsa_cuda.mean_compress(x, 16, -8)


def test_gate_combine_bad_input():
    o, g = torch.randn(2, 5, 3, 4), torch.rand(2, 5, 3)
    with raises(r"1 to 3 outputs"):
        nsa_cuda.gate_combine([], [])
    with raises(r"1 to 3 outputs"):
        nsa_cuda.gate_combine([o, o], [g])
    with raises(r"outputs\[0\]"):
        nsa_cuda.gate_combine([o[0]], [g])
    with raises(r"gates\[1\].*\[B, T, Hq\]"):
        nsa_cuda.gate_combine([o, o], [g, g[:, :4]])
    with raises(r"gates\[0\].*floating"):
        nsa_cuda.gate_combine([o], [g.to(torch.int32)])
    with raises(r"share one shape, dtype"):
        nsa_cuda.gate_combine([o, o.double()], [g, g])
    with raises(r"share one shape"):  # the raw op checks too
        torch.ops.nsa_cuda.gate_combine([o, o[:, :4]], [g, g])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64], ids=str)
def test_cpu_dtypes_supported(dtype):
    """On CPU fp16/bf16/fp32/fp64 are supported (no exception, finite output)."""
    inp = make_inputs(CFG, dtype=dtype, seed=33)
    o = call_sparse(inp)
    assert o.dtype == dtype and torch.isfinite(o).all()


# --------------------------------------------------------------------------------------
# out-of-range block indices: unused slots, never read
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=str)
def test_out_of_range_block_index_is_unused(idx_dtype):
    cfg = CFG
    inp = make_inputs(cfg, dtype=F64, seed=34)
    nb = R.num_slc_blocks(cfg.T, cfg.lp)  # 3
    bi = torch.full((cfg.B, cfg.T, cfg.Hkv, cfg.n), -1, dtype=torch.int64)
    bi[..., 0] = (torch.arange(cfg.T) // cfg.lp).view(1, -1, 1)  # the current block
    extreme = [nb, nb + 1, 2 ** 31 - 1, -(2 ** 31), -2, 1000]
    if idx_dtype == torch.int64:
        extreme += [2 ** 31, 2 ** 40, -(2 ** 40), 2 ** 63 - 1]
    for i, val in enumerate(extreme):
        bi[:, i::len(extreme), :, 1] = val
        bi[:, (i + 3)::len(extreme), :, 2] = val
    bi = bi.to(idx_dtype)
    clean = torch.where((bi >= 0) & (bi < nb), bi, -1).to(torch.int32)
    o, aux = call_sparse(inp, block_indices=bi, return_aux=True)
    o2, aux2 = call_sparse(inp, block_indices=clean, return_aux=True)
    ro, raux = R.sparse_attn(inp["q"], inp["k"], inp["v"], inp["g_cmp"], inp["g_slc"],
                             inp["g_win"], block_indices=clean, return_aux=True, **KW)
    for a, b in ((o, ro), (aux["o_slc"], raux["o_slc"]), (aux["lse_slc"], raux["lse_slc"])):
        assert torch.isfinite(a).all()
        assert_close_exact(a, b, "out-of-range block index")
    assert torch.equal(o, o2) and torch.equal(aux["lse_slc"], aux2["lse_slc"])


def test_out_of_range_block_index_varlen_not_read_from_next_sequence():
    """In varlen mode, a block index past the end of a short sequence must not read the keys
    of the next sequence."""
    cfg = CFG
    inp = make_varlen_inputs(cfg, [10, 30], dtype=F64, seed=35)
    cu = inp.pop("cu_seqlens")
    bi = torch.full((1, 40, cfg.Hkv, cfg.n), -1, dtype=torch.int32)
    bi[0, :, :, 0] = 0
    bi[0, :10, :, 1] = 1  # block 1 of sequence 0 does not exist (rows 16..31 = sequence 1)
    bi[0, :10, :, 2] = 2
    o, lse = nsa_cuda.selected_attn(inp["q"], inp["k"], inp["v"], bi, slc_block_size=cfg.lp,
                                    cu_seqlens=cu)
    ro, rlse = R.selected_attn(inp["q"], inp["k"], inp["v"], bi, cfg.lp, None, cu)
    assert_close_exact(o, ro, "o")
    assert_close_exact(lse, rlse, "lse")


def test_cuda_head_dims_of_the_selection_are_dk_only():
    """select_blocks reads no values: on CUDA only Dk must be a built head dim (the first
    device run found nsa_cuda.select_blocks refusing Dk = 192, checked as (192, 192))."""
    from types import SimpleNamespace

    from nsa_cuda import _validate as check
    on_cuda = SimpleNamespace(device=SimpleNamespace(type="cuda"))
    for dk in (64, 128, 192):
        check.head_dims(on_cuda, dk, None)
    with pytest.raises(ValueError, match="Dk=96 is not supported on CUDA"):
        check.head_dims(on_cuda, 96, None)
    with pytest.raises(ValueError, match=r"\(Dk=192, Dv=192\) are not supported"):
        check.head_dims(on_cuda, 192, 192)
