"""Shared helpers for the CPU test suite of nsa_cuda.

* input makers for batch and varlen (``make_inputs``, ``make_varlen_inputs``)
* ``assert_close_spec(x, ref, ref_lp)``: the spec's tolerance rule
  ``max|x - ref| <= 2 * max|ref_lp - ref| + 1e-5`` (NaN never passes; -inf entries,
  e.g. the lse of an empty row, must match exactly)
* ``assert_close_exact``: fp64 comparison (1e-10)
* ``assert_selection_close``: compare block selections with the spec's tie rule
* ``op_kwargs`` / ``ref_kwargs``: split one hyperparameter dict into the argument
  names of the public API and of ``nsa_cuda.reference``
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence

import pytest
import torch

# `python -m pytest` from the repo root puts the root on sys.path; plain `pytest` may not.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import nsa_cuda  # noqa: E402
from nsa_cuda import reference as R  # noqa: E402

# The CUDA backend fills every output with NaN before a launch when this is set (read
# once per process), so an element a kernel forgets to write fails its test.
os.environ.setdefault("NSA_POISON_OUTPUTS", "1")

# One intra-op thread: the test sizes are tiny, and on a small, busy machine waking an
# OpenMP team costs more than the work. test_ops.py checks the multithreaded path
# against this one (test_multithreaded_matches_single_thread).
torch.set_num_threads(1)

LOW_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EXACT_TOL = 1e-10


# --------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cfg:
    """Shapes and NSA hyperparameters of one test case."""

    B: int = 2
    T: int = 97
    Hq: int = 4
    Hkv: int = 2
    Dk: int = 16
    Dv: int = 8
    l: int = 32
    d: int = 16
    lp: int = 64
    n: int = 4
    n_init: int = 1
    n_local: int = 2
    w: int = 128
    scale: Optional[float] = None

    @property
    def G(self) -> int:
        return self.Hq // self.Hkv

    def with_(self, **kw) -> "Cfg":
        return replace(self, **kw)

    def cmp_kw(self) -> Dict:
        return dict(cmp_block_size=self.l, cmp_stride=self.d)

    def sel_kw(self) -> Dict:
        return dict(cmp_block_size=self.l, cmp_stride=self.d, slc_block_size=self.lp,
                    slc_num_blocks=self.n, slc_init_blocks=self.n_init,
                    slc_local_blocks=self.n_local)

    def all_kw(self) -> Dict:
        return dict(self.sel_kw(), window_size=self.w, scale=self.scale)

    def __str__(self) -> str:  # readable pytest ids
        return (f"B{self.B}T{self.T}H{self.Hq}/{self.Hkv}D{self.Dk}/{self.Dv}"
                f"l{self.l}d{self.d}lp{self.lp}n{self.n}i{self.n_init}L{self.n_local}w{self.w}")


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def randn(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def make_inputs(cfg: Cfg, dtype=torch.float64, seed: int = 0, requires_grad: bool = False,
                T: Optional[int] = None, B: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """q, k, v, g_cmp, g_slc, g_win for batch mode (gates: sigmoid of a normal)."""
    gen = _gen(seed)
    B = cfg.B if B is None else B
    T = cfg.T if T is None else T
    out = dict(
        q=randn((B, T, cfg.Hq, cfg.Dk), dtype, gen),
        k=randn((B, T, cfg.Hkv, cfg.Dk), dtype, gen),
        v=randn((B, T, cfg.Hkv, cfg.Dv), dtype, gen),
        g_cmp=torch.sigmoid(randn((B, T, cfg.Hq), torch.float64, gen)).to(dtype),
        g_slc=torch.sigmoid(randn((B, T, cfg.Hq), torch.float64, gen)).to(dtype),
        g_win=torch.sigmoid(randn((B, T, cfg.Hq), torch.float64, gen)).to(dtype),
    )
    if requires_grad:
        for t in out.values():
            t.requires_grad_(True)
    return out


def make_cu_seqlens(seqlens: Sequence[int]) -> torch.Tensor:
    cu = [0]
    for n in seqlens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32)


def make_varlen_inputs(cfg: Cfg, seqlens: Sequence[int], dtype=torch.float64, seed: int = 0,
                       requires_grad: bool = False) -> Dict[str, torch.Tensor]:
    """Packed inputs ``[1, total, ...]`` plus ``cu_seqlens``."""
    out = make_inputs(cfg, dtype, seed, requires_grad, T=sum(seqlens), B=1)
    out["cu_seqlens"] = make_cu_seqlens(seqlens)
    return out


def positions_of(T: int, B: int, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Position of every row inside its sequence, ``[B, T]`` (varlen: restarts at 0)."""
    if cu_seqlens is None:
        return torch.arange(T).expand(B, T)
    cu = cu_seqlens.tolist()
    pos = torch.cat([torch.arange(b - a) for a, b in zip(cu, cu[1:])]) if T else torch.zeros(0)
    return pos.long().view(1, T)


def detach_clone(d: Dict[str, torch.Tensor], dtype=None, requires_grad=None):
    """A copy of the float tensors of ``d`` (optionally cast), as fresh leaves."""
    out = {}
    for name, t in d.items():
        if t is None or not t.is_floating_point():
            out[name] = t
            continue
        c = t.detach().clone() if dtype is None else t.detach().to(dtype)
        rg = t.requires_grad if requires_grad is None else requires_grad
        out[name] = c.requires_grad_(rg)
    return out


# --------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------


def load_bench_script(name: str, monkeypatch):
    """bench/<name>.py as a module, in sys.modules for the test's duration (its
    dataclasses look their module up there)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"nsa_bench_{name}", os.path.join(_ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


def _split_inf(x: torch.Tensor, ref: torch.Tensor, what: str):
    """Check NaN-freeness and that infinite entries agree; return the finite parts (fp64)."""
    assert x.shape == ref.shape, f"{what}: shape {tuple(x.shape)} != reference {tuple(ref.shape)}"
    x = x.detach().double()
    ref = ref.detach().double()
    assert not torch.isnan(x).any(), f"{what}: NaN in the output"
    assert not torch.isnan(ref).any(), f"{what}: NaN in the reference (test bug)"
    inf_x, inf_r = torch.isinf(x), torch.isinf(ref)
    mism = (inf_x != inf_r) | (inf_x & inf_r & (x != ref))
    assert not mism.any(), (f"{what}: infinite entries differ at {mism.nonzero()[:5].tolist()} "
                            f"(x={x[mism][:5].tolist()}, ref={ref[mism][:5].tolist()})")
    fin = ~inf_r
    return torch.where(fin, x, 0.0), torch.where(fin, ref, 0.0)


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    return (x - ref).abs().max().item()


def assert_close_exact(x: torch.Tensor, ref: torch.Tensor, what: str = "value",
                       tol: float = EXACT_TOL) -> None:
    """fp64 against the fp64 reference: max abs error <= tol (1e-10)."""
    xf, rf = _split_inf(x, ref, what)
    err = max_err(xf, rf)
    assert err <= tol, f"{what}: max|x - ref| = {err:.3e} > {tol:.1e}"


def assert_close_spec(x: torch.Tensor, ref: torch.Tensor, ref_lp: torch.Tensor,
                      what: str = "value") -> None:
    """The spec's rule ``max|x - ref| <= 2 * max|ref_lp - ref| + 1e-5``; NaN never passes."""
    xf, rf = _split_inf(x, ref, what)
    lpf, rf2 = _split_inf(ref_lp, ref, what + " (ref_lp)")
    err = max_err(xf, rf)
    bound = 2 * max_err(lpf, rf2) + 1e-5
    assert err <= bound, f"{what}: max|x - ref| = {err:.3e} > 2 * max|ref_lp - ref| + 1e-5 = {bound:.3e}"


def assert_close(x, ref, ref_lp=None, what="value"):
    """Exact comparison for fp64 outputs, the spec's rule otherwise (needs ref_lp)."""
    if x.dtype in (torch.float64,) or ref_lp is None:
        assert_close_exact(x, ref, what)
    else:
        assert_close_spec(x, ref, ref_lp, what)


def lse_for_loss(lse: torch.Tensor) -> torch.Tensor:
    """lse with the -inf rows replaced by 0 (no gradient there), for use in a loss."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def loss_weights(shapes: Dict[str, Sequence[int]], seed: int = 1234) -> Dict[str, torch.Tensor]:
    """Fixed random fp64 weights for a scalar loss sum(w * output)."""
    gen = _gen(seed)
    return {name: torch.randn(tuple(s), generator=gen, dtype=torch.float64)
            for name, s in shapes.items()}


def weighted_loss(outputs: Dict[str, Optional[torch.Tensor]],
                  weights: Dict[str, torch.Tensor]) -> torch.Tensor:
    """sum over outputs of sum(w * out) in fp32/fp64 (lse: -inf rows masked)."""
    total = None
    for name, out in outputs.items():
        if out is None:
            continue
        if name.startswith("lse"):
            out = lse_for_loss(out)
        acc = torch.promote_types(out.dtype, torch.float32)
        term = (out.to(acc) * weights[name].to(acc)).sum()
        total = term if total is None else total + term
    return total


def grads_of(loss: torch.Tensor, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    names = [n for n, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    if not loss.requires_grad:  # e.g. an empty output: no path from the inputs
        return {n: torch.zeros_like(inputs[n]) for n in names}
    gs = torch.autograd.grad(loss, [inputs[n] for n in names], allow_unused=True)
    return {n: (torch.zeros_like(inputs[n]) if g is None else g) for n, g in zip(names, gs)}


# --------------------------------------------------------------------------------------
# Selection with the tie rule
# --------------------------------------------------------------------------------------


def _membership(bi: torch.Tensor, width: int) -> torch.Tensor:
    """[B, T, H, n] indices (-1 = empty) -> [B, T, H, width] bool."""
    idx = bi.long()
    idx = torch.where((idx >= 0) & (idx < width), idx, width)
    m = torch.zeros(*bi.shape[:3], width + 1, dtype=torch.bool)
    m.scatter_(-1, idx, True)
    return m[..., :width]


def check_selection_layout(bi: torch.Tensor, positions: torch.Tensor, lp: int, n: int) -> None:
    """Ascending, no duplicates, -1 padded at the end, exactly min(n, J+1) entries, all
    candidates (0 <= j <= J)."""
    assert bi.dtype == torch.int32, f"block_indices dtype {bi.dtype}, expected int32"
    assert bi.shape[-1] == n
    J = (positions // lp).view(*positions.shape, 1, 1)  # [B, T, 1, 1]
    valid = bi >= 0
    # -1 padding only at the end: once invalid, stays invalid
    assert not (valid[..., 1:] & ~valid[..., :-1]).any(), "a -1 slot precedes a selected block"
    assert ((bi >= -1)).all(), "entries below -1"
    assert not (valid & (bi.long() > J)).any(), "a selected block lies after J = t // l'"
    if n > 1:
        a, b = bi[..., :-1], bi[..., 1:]
        both = valid[..., :-1] & valid[..., 1:]
        assert not (both & (b <= a)).any(), "block_indices not strictly ascending"
    count = valid.sum(-1)
    expected = torch.clamp(J.squeeze(-1) + 1, max=n).expand_as(count)
    bad = count != expected
    assert not bad.any(), (f"{bad.sum().item()} rows select a wrong number of blocks, e.g. "
                           f"{count[bad][:3].tolist()} instead of {expected[bad][:3].tolist()}")


def assert_selection_close(bi: torch.Tensor, ref_bi: torch.Tensor, ref_scores: torch.Tensor,
                           positions: torch.Tensor, lp: int, n: int, n_init: int, n_local: int,
                           rel_tol: float = 1e-3, abs_tol: float = 1e-6) -> int:
    """Compare a selection to the reference's with the spec's tie rule.

    A block selected by one and not the other is accepted only where its reference score
    lies within ``rel_tol`` (relative) of the n-th selected reference score (the lowest
    score among the reference's non-forced selected blocks). Forced blocks must always be
    present. Returns the number of rows that differ (ties).
    """
    check_selection_layout(bi, positions, lp, n)
    check_selection_layout(ref_bi, positions, lp, n)
    width = ref_scores.shape[-1]
    m = _membership(bi, width)
    mr = _membership(ref_bi, width)
    assert not ((bi.long() >= width) & (bi >= 0)).any(), "block index beyond the sequence"
    diff = m ^ mr
    if not diff.any():
        return 0
    j = torch.arange(width)
    J = (positions // lp).view(*positions.shape, 1, 1)
    forced = R.is_forced_slc_block(j, J, n_init, n_local)
    assert not (diff & forced).any(), "a forced block (init or local) is missing or extra"
    s = ref_scores.double()
    nth = torch.where(mr & ~forced, s, torch.full_like(s, float("inf"))).amin(-1, keepdim=True)
    close = (s - nth).abs() <= rel_tol * nth.abs() + abs_tol
    bad = diff & ~close
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"selection differs beyond ties at [b, t, g, j] = {where}: "
            f"scores {s[bad][:5].tolist()} vs n-th selected {nth.expand_as(s)[bad][:5].tolist()}")
    return int(diff.any(-1).sum())


# --------------------------------------------------------------------------------------
# Calling the ops and the reference with one config
# --------------------------------------------------------------------------------------


def ref_select(cfg: Cfg, q, k_cmp, cu_seqlens=None):
    return R.select_blocks(q.detach(), k_cmp.detach(), cfg.l, cfg.d, cfg.lp, cfg.n, cfg.n_init,
                           cfg.n_local, cfg.scale, cu_seqlens)


def op_select(cfg: Cfg, q, k_cmp, cu_seqlens=None, lse_cmp=None):
    """nsa_cuda.select_blocks; computes lse_cmp with nsa_cuda.compressed_attn if not given."""
    if lse_cmp is None:
        _, lse_cmp = nsa_cuda.compressed_attn(q, k_cmp, k_cmp.new_zeros(k_cmp.shape), **cfg.cmp_kw(),
                                              scale=cfg.scale, cu_seqlens=cu_seqlens)
    return nsa_cuda.select_blocks(q.detach(), k_cmp.detach(), lse_cmp.detach(), **cfg.sel_kw(),
                                  scale=cfg.scale, cu_seqlens=cu_seqlens)


def _call_sparse(fn, cfg: Cfg, inp: Dict, **kw):
    args = dict(k_cmp=inp.get("k_cmp"), v_cmp=inp.get("v_cmp"), cu_seqlens=inp.get("cu_seqlens"))
    args.update(cfg.all_kw())
    args.update(kw)
    return fn(inp["q"], inp["k"], inp["v"], inp.get("g_cmp"), inp.get("g_slc"), inp.get("g_win"),
              return_aux=True, **args)


def ref_sparse(cfg: Cfg, inp: Dict, **kw):
    return _call_sparse(R.sparse_attn, cfg, inp, **kw)


def op_sparse(cfg: Cfg, inp: Dict, **kw):
    return _call_sparse(nsa_cuda.sparse_attn, cfg, inp, **kw)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
