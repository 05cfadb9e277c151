"""Benchmark suite for nsa_cuda (issue 5): NSA forward/backward, per branch, against
dense SDPA (each backend), FlexAttention with an NSA-like block mask, and
flash-linear-attention's ``parallel_nsa``.

    python bench/suite.py [--device cuda|cpu] [--lengths 8192,16384,...]
                          [--shapes paper,peer,gqa4] [--json out.json] [--plots DIR]
                          [--quick] [--budget-s SECONDS]

Rows (one per op x shape x T x pass) are dicts with at least
``op, shape, T, pass, ms, tflops, peak_mem_mb, error``; the JSON file is a list of them
(usable as the ``bench`` field of bench/gpu_check.sh's record). A row that fails (no
CUDA backward yet, a backend that does not support the shape, out of memory, fla not
importable, ...) is kept with ``ms = None`` and the message in ``error``; the run goes on.

Timing: on CUDA, CUDA events around each call, a warm-up, then the median of many runs
(adaptive: about ``--target-ms`` of work per row, between ``--min-reps`` and
``--max-reps`` runs); inputs are rotated over several freshly drawn random sets so the
50 MB L2 does not flatter small cases. On CPU, time.perf_counter and few repeats.
Backward rows time only the backward: the forward of each run is enqueued before the
start event.

FLOPs: ``attention_flops`` (one formula, documented there); backward = 2.5 x forward,
the FlashAttention convention. TFLOP/s = FLOPs / time. Peak memory per row is
torch.cuda.max_memory_allocated() after a reset (it includes the resident inputs);
``None`` on CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import nsa_cuda  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_health import LOST_CONTEXT_RC, cuda_context_lost  # noqa: E402

PASSES = ("fwd", "bwd", "fwd+bwd")
BWD_FACTOR = 2.5  # FlashAttention convention: backward = 2.5 x forward FLOPs
BRANCHES = ("mean_compress", "compressed", "selection", "selected", "window", "combine")
DIFFERENTIABLE_BRANCHES = ("mean_compress", "compressed", "selected", "window", "combine")
L2_BYTES = 50 * 2 ** 20  # H100 L2; used to decide how many input sets to rotate
_START = time.time()


def stamp() -> str:
    """Seconds since the suite started, to prefix progress lines (where a run's time goes:
    compiles, autotuning, input setup are between the rows)."""
    return f"[{time.time() - _START:7.1f}s]"


# --- configuration ------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    Hq: int
    Hkv: int
    Dk: int
    Dv: int


@dataclass(frozen=True)
class NSA:
    l: int = 32       # cmp_block_size
    d: int = 16       # cmp_stride
    lp: int = 64      # slc_block_size (l')
    n: int = 16       # slc_num_blocks
    n_init: int = 1
    n_local: int = 2
    w: int = 512      # window_size

    def kwargs(self) -> dict:
        return dict(cmp_block_size=self.l, cmp_stride=self.d, slc_block_size=self.lp,
                    slc_num_blocks=self.n, slc_init_blocks=self.n_init,
                    slc_local_blocks=self.n_local, window_size=self.w)


SHAPES = {
    "paper": Shape("paper", 1, 64, 4, 192, 128),
    "peer": Shape("peer", 1, 64, 4, 128, 128),
    "gqa4": Shape("gqa4", 1, 32, 8, 128, 128),
}
QUICK_SHAPE = Shape("quick", 1, 4, 1, 32, 32)
PAPER_NSA = NSA()
QUICK_NSA = NSA(l=16, d=8, lp=32, n=4, n_init=1, n_local=2, w=64)


@dataclass
class Timing:
    device: str
    warmup: int
    min_reps: int
    max_reps: int
    target_ms: float
    deadline: Optional[float] = None  # time.time() after which rows are skipped


# --- FLOPs --------------------------------------------------------------------------------

def attention_flops(keys_per_row: int, B: int, H: int, Dk: int, Dv: int,
                    pass_: str = "fwd") -> float:
    """FLOPs of one attention branch, counted from the spec (not from what a kernel does).

    Forward: ``2 * B * H * sum over query rows t of keys(t) * (Dk + Dv)``, i.e. one
    multiply-add per element of ``q k^T`` (Dk per key) and of ``P v`` (Dv per key);
    ``keys_per_row`` is that sum over t of the keys query row t visits (the caller
    gives it per branch, see ``visited_keys``). Softmax, masking and gating are not
    counted. Backward: ``2.5 x`` forward (FlashAttention's convention: five matmuls
    against two); forward+backward: ``3.5 x``. Selection scores (``select_blocks``)
    are counted as a branch with ``Dv = 0`` (it recomputes ``q k_cmp^T`` only).
    """
    fwd = 2.0 * B * H * keys_per_row * (Dk + Dv)
    return {"fwd": fwd, "bwd": BWD_FACTOR * fwd, "fwd+bwd": (1 + BWD_FACTOR) * fwd}[pass_]


def visited_keys(T: int, cfg: NSA) -> Dict[str, int]:
    """Sum over query rows t in [0, T) of the keys each branch visits (spec's rules).

    compressed: nc(t) = #blocks i with i*d + l - 1 <= t (0 before the first block ends);
    selected: all t + 1 keys while t // l' + 1 <= n blocks exist, else n - 1 full blocks
    plus the current block's (t % l') + 1 keys (the current block is always selected);
    window: min(t + 1, w); dense: t + 1.
    """
    t = torch.arange(T, dtype=torch.int64)
    nc = torch.where(t >= cfg.l - 1, torch.div(t - cfg.l + 1, cfg.d, rounding_mode="floor") + 1,
                     torch.zeros_like(t))
    nblk = torch.div(t, cfg.lp, rounding_mode="floor") + 1
    slc = torch.where(nblk <= cfg.n, t + 1, (cfg.n - 1) * cfg.lp + t % cfg.lp + 1)
    win = torch.clamp(t + 1, max=cfg.w)
    return dict(compressed=int(nc.sum()), selected=int(slc.sum()), window=int(win.sum()),
                dense=int((t + 1).sum()))


def branch_flops(T: int, s: Shape, cfg: NSA, pass_: str) -> Dict[str, Optional[float]]:
    keys = visited_keys(T, cfg)
    f = dict(
        compressed=attention_flops(keys["compressed"], s.B, s.Hq, s.Dk, s.Dv, pass_),
        selection=attention_flops(keys["compressed"], s.B, s.Hq, s.Dk, 0, "fwd"),
        selected=attention_flops(keys["selected"], s.B, s.Hq, s.Dk, s.Dv, pass_),
        window=attention_flops(keys["window"], s.B, s.Hq, s.Dk, s.Dv, pass_),
        mean_compress=None, combine=None,  # memory-bound elementwise work: no TFLOP/s
    )
    f["sparse_attn"] = (f["compressed"] + f["selected"] + f["window"]
                        + (f["selection"] if pass_ != "bwd" else 0.0))
    f["dense"] = attention_flops(keys["dense"], s.B, s.Hq, s.Dk, s.Dv, pass_)
    return f


# --- timing -------------------------------------------------------------------------------

def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[int], object], timing: Timing, nsets: int,
            setup: Optional[Callable[[int], object]] = None) -> tuple:
    """Median ms of ``fn(i)`` over runs, ``i`` cycling over ``nsets`` input sets.

    ``setup(i)`` (untimed, e.g. the forward before a backward) runs before each timed
    call and its result is passed to ``fn`` as a second argument. Returns (ms, reps).
    """
    dev = timing.device

    def call(i):
        ctx = setup(i % nsets) if setup else None
        if dev == "cuda":
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            fn(i % nsets, ctx) if setup else fn(i % nsets)
            b.record()
            return (a, b)
        t0 = time.perf_counter()
        fn(i % nsets, ctx) if setup else fn(i % nsets)
        return time.perf_counter() - t0

    def elapsed(x):
        return x[0].elapsed_time(x[1]) if dev == "cuda" else 1e3 * x

    i = 0
    for _ in range(max(1, timing.warmup)):
        r = call(i)
        i += 1
    _sync(dev)
    est = elapsed(r)
    reps = int(min(timing.max_reps, max(timing.min_reps, timing.target_ms / max(est, 1e-3))))
    rec = []
    for _ in range(reps):
        rec.append(call(i))
        i += 1
    _sync(dev)
    return statistics.median(elapsed(x) for x in rec), reps


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:400]


def row_key(row: dict) -> tuple:
    return tuple(str(row.get(k)) for k in ("shape", "T", "B", "S", "op", "pass"))


class Runner:
    """Collects rows; every measurement is guarded so one failure never stops the run.

    A kernel that faults leaves the CUDA context unusable for the rest of the process.
    The row that faulted keeps the error (``fault``: true); the rows after it are not
    run in this process (``lost``: true, and ``lost`` is set to that row's name), and a
    later round (``--fault-rounds``) started with ``earlier_rows`` reuses every row
    measured so far and runs the rest."""

    def __init__(self, timing: Timing, json_path: Optional[str], earlier_rows: Optional[List[dict]] = None):
        self.timing = timing
        self.rows: List[dict] = []
        self.json_path = json_path
        self.earlier = {row_key(r): r for r in earlier_rows or [] if not r.get("lost")}
        self.lost: Optional[str] = None

    def flush(self):
        if self.json_path:
            tmp = self.json_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.rows, f, indent=1)
            os.replace(tmp, self.json_path)

    def add(self, base: dict, op: str, pass_: str, fn=None, setup=None, nsets=1,
            flops=None, note=None, error=None, skipped=False, bytes_read=None) -> dict:
        row = dict(op=op, pass_=pass_, ms=None, tflops=None, peak_mem_mb=None, error=error,
                   **base)
        row["pass"] = row.pop("pass_")
        if note:
            row["note"] = note
        if row_key(row) in self.earlier:  # measured by an earlier round
            row = self.earlier[row_key(row)]
            self.rows.append(row)
            self.flush()
            return row
        if self.lost:
            row["error"], row["lost"], skipped = f"not run: the CUDA context was lost in {self.lost}", True, True
            fn = None
        if error is None and fn is not None:
            if self.timing.deadline is not None and time.time() > self.timing.deadline:
                row["error"], skipped = "skipped: --budget-s time budget spent", True
            else:
                cuda = self.timing.device == "cuda"
                try:
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    ms, reps = time_ms(fn, self.timing, nsets, setup)
                    row.update(ms=ms, reps=reps, nsets=nsets)
                    if flops:
                        row["flops"] = flops
                        row["tflops"] = flops / (ms * 1e-3) / 1e12
                    if bytes_read:  # memory-bound rows: the bytes they must read, GB/s
                        row["bytes"] = int(bytes_read)
                        row["gbps"] = bytes_read / (ms * 1e-3) / 1e9
                    if cuda:
                        row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
                except torch.cuda.OutOfMemoryError as e:
                    row["error"], skipped = "skipped: out of memory: " + _err(e), True
                except Exception as e:  # noqa: BLE001  keep going
                    row["error"] = _err(e)
                    lost = cuda_context_lost()
                    if lost:
                        row["error"], row["fault"] = "FAULT (the CUDA context was lost): " + _err(e), True
                        self.lost = f"{row['shape']} T={row['T']} {op} {row['pass']}"
                finally:
                    if cuda and not self.lost:
                        try:
                            torch.cuda.synchronize()
                        except Exception:  # noqa: BLE001
                            pass
                        torch.cuda.empty_cache()
        row["skipped"] = bool(skipped)
        ms = row["ms"]
        tf = row["tflops"]
        print(f"{stamp()} {row['shape']:6s} T={row['T']:<7d} {row['op']:38s} {row['pass']:8s} "
              f"{('%.3f ms' % ms) if ms is not None else '-':>12s} "
              f"{('%.3g TF/s' % tf) if tf is not None else '':>11s} "
              f"{('%.0f MB' % row['peak_mem_mb']) if row['peak_mem_mb'] is not None else '':>9s}"
              f"{'  B=%d' % row['B'] if row['pass'] == 'decode' else ''}"
              f"{'  %.3g GB/s' % row['gbps'] if row.get('gbps') else ''}"
              f"{('  ' + row['error'][:110]) if row['error'] else ''}", flush=True)
        self.rows.append(row)
        self.flush()
        return row


# --- inputs -------------------------------------------------------------------------------

def num_sets(bytes_per_set: int, device: str) -> int:
    """Input sets to rotate: enough that the cycle spans >= 4x L2 (cap 8); 1 when one set
    alone already does, and 2 on CPU (fresh data each run, few runs)."""
    if device != "cuda":
        return 2
    return max(1, min(8, math.ceil(4 * L2_BYTES / max(bytes_per_set, 1))))


def make_set(s: Shape, T: int, device, dtype, grad: bool):
    """Fresh random q, k, v (randn), gates (rand, in (0, 1)) and an output gradient."""
    def r(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)
    q, k, v = r(s.B, T, s.Hq, s.Dk), r(s.B, T, s.Hkv, s.Dk), r(s.B, T, s.Hkv, s.Dv)
    gates = [torch.rand(s.B, T, s.Hq, device=device, dtype=dtype).requires_grad_(grad)
             for _ in range(3)]
    do = torch.randn(s.B, T, s.Hq, s.Dv, device=device, dtype=dtype)
    return dict(q=q, k=k, v=v, g=gates, do=do)


def _bytes(x: dict) -> int:
    n = 0
    for v in x.values():
        for t in (v if isinstance(v, list) else [v]):
            if isinstance(t, torch.Tensor):
                n += t.numel() * t.element_size()
    return n


def _zero_grads(x: dict):
    for v in x.values():
        for t in (v if isinstance(v, list) else [v]):
            if isinstance(t, torch.Tensor):
                t.grad = None


def _backward(out, grad):
    torch.autograd.backward(out, grad)


def add_passes(run: Runner, base, op, fwd, sets, flops_of, note=None, output_grad=None,
               fwd_nograd=None, fwd_bytes=None):
    """fwd, bwd and fwd+bwd rows for ``fwd(i) -> tensor`` (output grad ``sets[i]['do']``,
    or ``output_grad(i, out)``). The fwd row runs ``fwd_nograd(i)`` (default ``fwd``)
    under torch.no_grad(); ``fwd_bytes`` gives it a bytes / GB/s figure."""
    nsets = len(sets)

    def grad_of(i, out):
        return output_grad(i, out) if output_grad else sets[i]["do"]

    def fwd_only(i):
        with torch.no_grad():
            return (fwd_nograd or fwd)(i)

    def bwd(i, out):
        _backward(out, grad_of(i, out))
        _zero_grads(sets[i])

    def fwd_bwd(i):
        out = fwd(i)
        _backward(out, grad_of(i, out))
        _zero_grads(sets[i])

    run.add(base, op, "fwd", fwd_only, nsets=nsets, flops=flops_of("fwd"), note=note,
            bytes_read=fwd_bytes)
    run.add(base, op, "bwd", bwd, setup=fwd, nsets=nsets, flops=flops_of("bwd"), note=note)
    run.add(base, op, "fwd+bwd", fwd_bwd, nsets=nsets, flops=flops_of("fwd+bwd"), note=note)


# --- nsa_cuda -----------------------------------------------------------------------------

# --- the selected branch's bytes ------------------------------------------------------------
# The selected forward is query-centric: a CTA owns SELECTED_CTA_ROWS flattened (token,
# head) rows of one kv head (the mma.sync kernel's tile, csrc/cuda/attn_traits.cuh) and
# loads every block that any of its tokens chose, once. On random inputs the tokens of a
# CTA share few blocks, so its K/V traffic, not its FLOPs, sets the time. The rows below
# (fwd only) say which limit the kernel meets: GB/s against the device's bandwidth, the
# same FLOPs with shared selections (fewer bytes), and the same selections in passes over
# key ranges (the same bytes from a smaller working set, which stays in L2).
SELECTED_CTA_ROWS = 64
KEY_SPLITS = (2, 4)


def selected_tile_bytes(bi: torch.Tensor, G: int, lp: int, Dk: int, Dv: int, elt: int) -> int:
    """Bytes the selected forward kernel moves for ``block_indices`` bi [B, T, Hkv, n]:
    per CTA the keys of the union of its tokens' valid blocks (block j's keys clipped to
    the CTA's last token, as the kernel clips them), K and V, plus q read and o written."""
    B, T, Hkv, n = bi.shape
    nblk = -(-T // lp)
    f0 = torch.arange(0, T * G, SELECTED_CTA_ROWS, device=bi.device)
    t_lo = f0 // G
    t_hi = torch.clamp(f0 + SELECTED_CTA_ROWS - 1, max=T * G - 1) // G
    span = int((t_hi - t_lo).max()) + 1
    j = torch.arange(nblk, device=bi.device)
    keys = torch.clamp(torch.minimum((j + 1) * lp, t_hi[:, None] + 1) - j * lp, min=0)  # [C, nblk]
    kv_keys = 0
    for b in range(B):
        for h in range(Hkv):
            seen = torch.zeros(len(f0), nblk + 1, dtype=torch.bool, device=bi.device)
            for off in range(span):
                t = t_lo + off
                ok_t = t <= t_hi
                rows = bi[b, torch.clamp(t, max=T - 1), h, :].long()  # [C, n]
                ok = ok_t[:, None] & (rows >= 0) & (rows < nblk) & (rows * lp <= t[:, None])
                seen.scatter_(1, torch.where(ok, rows, nblk), True)
            kv_keys += int((seen[:, :nblk] * keys).sum())
    return kv_keys * (Dk + Dv) * elt + B * T * G * Hkv * (Dk + Dv) * elt


def shared_block_indices(bi: torch.Tensor, lp: int) -> torch.Tensor:
    """Every token of an l'-block takes the selection of the block's first token: a
    locality proxy (a trained model's neighbours mostly agree). The blocks stay valid
    (j * l' <= first token <= t), the current block stays selected, and each token
    visits as many keys as before, so the FLOPs are the same."""
    T = bi.shape[1]
    first = torch.arange(T, device=bi.device) // lp * lp
    return bi[:, first].contiguous()


def key_split_block_indices(bi: torch.Tensor, lp: int, parts: int) -> List[torch.Tensor]:
    """The same selections as ``parts`` block lists, each keeping the blocks of one key
    range of ceil(nblk / parts) blocks (the other slots unused, -1)."""
    nblk = -(-bi.shape[1] // lp)
    per = -(-nblk // parts)
    part = torch.where(bi >= 0, bi.long() // per, -1)
    return [torch.where(part == c, bi, torch.full_like(bi, -1)).contiguous() for c in range(parts)]


def merge_partials(outs: List[torch.Tensor], lses: List[torch.Tensor]):
    """(o, lse) of attention over the union of disjoint key sets from each set's (o_c,
    lse_c): lse = logsumexp_c lse_c, o = sum_c exp(lse_c - lse) o_c (o [B, T, H, D],
    lse [B, H, T]; a row empty everywhere keeps o = 0, lse = -inf)."""
    acc = torch.promote_types(outs[0].dtype, torch.float32)  # fp32 (fp64 for fp64 inputs)
    lse_all = torch.stack([x.to(acc) for x in lses])
    lse = torch.logsumexp(lse_all, dim=0)
    w = torch.exp(lse_all - lse).nan_to_num(0.0)  # -inf - -inf: an empty row
    o = torch.zeros(outs[0].shape, dtype=acc, device=outs[0].device)
    for c in range(len(outs)):
        o.addcmul_(w[c].permute(0, 2, 1).unsqueeze(-1), outs[c])
    return o.to(outs[0].dtype), lse.to(lses[0].dtype)


def bench_selected_bytes(run: Runner, base, cfg: NSA, sets, pre, flops, nbytes, op_prefix, bnote):
    """The selected forward with shared selections and as key-range passes (see
    SELECTED_CTA_ROWS); ``nbytes(bi)``: the kernel's bytes for block indices bi."""
    def slc_with(bis):
        def call(i):
            x = sets[i]
            return [nsa_cuda.selected_attn(x["q"], x["k"], x["v"], b, slc_block_size=cfg.lp)
                    for b in bis[i]]
        return call

    with torch.no_grad():
        shared = [[shared_block_indices(p["bi"], cfg.lp)] for p in pre]
        run.add(base, f"{op_prefix}.branch.selected_shared", "fwd", slc_with(shared),
                nsets=len(sets), flops=flops, bytes_read=nbytes(shared[0][0]),
                note=bnote + "; every token of an l'-block uses the block's first token's "
                "selection (a locality proxy: fewer distinct blocks per CTA, the same FLOPs)")
        for parts in KEY_SPLITS:
            split = [key_split_block_indices(p["bi"], cfg.lp, parts) for p in pre]
            merged = merge_partials(*zip(*slc_with(split)(0)))[0]
            whole = slc_with([[p["bi"]] for p in pre])(0)[0][0]
            diff = float((merged.float() - whole.float()).abs().max())
            run.add(base, f"{op_prefix}.branch.selected_keysplit{parts}", "fwd", slc_with(split),
                    nsets=len(sets), flops=flops, bytes_read=sum(nbytes(b) for b in split[0]),
                    note=bnote + f"; the same selections in {parts} passes over key ranges of "
                    f"1/{parts} of the blocks (a working set that fits L2); kernels only, the "
                    f"merge by lse is not timed; merged vs one pass: max |diff| {diff:.3g}")


def bench_nsa(run: Runner, base, s: Shape, T: int, cfg: NSA, sets, op_prefix="nsa_cuda",
              branches=True, win=True, note=None):
    kw = cfg.kwargs()

    def fwd(i):
        x = sets[i]
        g_cmp, g_slc, g_win = x["g"]
        return nsa_cuda.sparse_attn(x["q"], x["k"], x["v"], g_cmp, g_slc,
                                    g_win if win else None, **kw)

    add_passes(run, base, f"{op_prefix}.sparse_attn", fwd, sets,
               lambda p: _sparse_flops(T, s, cfg, p, win), note=note)
    if not branches:
        return

    # Per-branch inputs (computed once per set, untimed): the branch functions' own inputs.
    cmp_kw = dict(cmp_block_size=cfg.l, cmp_stride=cfg.d)
    pre = []
    with torch.no_grad():
        for x in sets:
            kc = nsa_cuda.mean_compress(x["k"], cfg.l, cfg.d)
            vc = nsa_cuda.mean_compress(x["v"], cfg.l, cfg.d)
            oc, lc = nsa_cuda.compressed_attn(x["q"], kc, vc, **cmp_kw)
            bi = nsa_cuda.select_blocks(x["q"], kc, lc, **cmp_kw, slc_block_size=cfg.lp,
                                        slc_num_blocks=cfg.n, slc_init_blocks=cfg.n_init,
                                        slc_local_blocks=cfg.n_local)
            os_, _ = nsa_cuda.selected_attn(x["q"], x["k"], x["v"], bi, slc_block_size=cfg.lp)
            ow, _ = nsa_cuda.window_attn(x["q"], x["k"], x["v"], window_size=cfg.w)
            leaf = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731
            pre.append(dict(kc=leaf(kc), vc=leaf(vc), bi=bi, o=[leaf(oc), leaf(os_), leaf(ow)],
                            dkc=torch.randn_like(kc), dvc=torch.randn_like(vc)))
    fl = {p: branch_flops(T, s, cfg, p) for p in PASSES}
    bnote = "time of the public branch function alone (inputs precomputed)"

    def mc(i):
        return (nsa_cuda.mean_compress(sets[i]["k"], cfg.l, cfg.d),
                nsa_cuda.mean_compress(sets[i]["v"], cfg.l, cfg.d))

    def mc_grad(i, out):
        return (pre[i]["dkc"], pre[i]["dvc"])

    def cmp(i):
        x, p = sets[i], pre[i]
        return nsa_cuda.compressed_attn(x["q"], p["kc"], p["vc"], **cmp_kw)[0]

    def slc(i):
        x, p = sets[i], pre[i]
        return nsa_cuda.selected_attn(x["q"], x["k"], x["v"], p["bi"], slc_block_size=cfg.lp)[0]

    def wnd(i):
        x = sets[i]
        return nsa_cuda.window_attn(x["q"], x["k"], x["v"], window_size=cfg.w)[0]

    def combine(i):
        return nsa_cuda.gate_combine(pre[i]["o"], sets[i]["g"])

    def with_env(name, value, fn):  # an env switch for the call (read by each launch)
        def call(i):
            old = os.environ.get(name)
            os.environ[name] = value
            try:
                return fn(i)
            finally:
                if old is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = old
        return call

    def on_mainloop(mode, fn):
        return with_env("NSA_MAINLOOP", mode, fn)

    def bwd_with_env(name, value):  # the backward of a branch's output under an env switch
        def bwd(i, out):
            def call(j):
                _backward(out, sets[j]["do"])
                _zero_grads(sets[j])
            with_env(name, value, call)(i)
        return bwd

    def combine_torch(i):  # the five elementwise ops it replaces, for comparison
        x, p = sets[i], pre[i]
        o = None
        for g, ob in zip(x["g"], p["o"]):
            t = g.to(ob.dtype).unsqueeze(-1) * ob
            o = t if o is None else o + t
        return o

    add_passes(run, base, f"{op_prefix}.branch.mean_compress", mc, sets,
               lambda p: None, note=bnote + "; k and v", output_grad=mc_grad)
    add_passes(run, base, f"{op_prefix}.branch.compressed", cmp, sets,
               lambda p: fl[p]["compressed"], note=bnote)

    # selection: forward only (a discrete choice, no backward)
    lse_cmp = []
    with torch.no_grad():
        for x, p in zip(sets, pre):
            lse_cmp.append(nsa_cuda.compressed_attn(x["q"], p["kc"], p["vc"], **cmp_kw)[1])

    def select(i):
        with torch.no_grad():
            return nsa_cuda.select_blocks(sets[i]["q"], pre[i]["kc"], lse_cmp[i], **cmp_kw,
                                          slc_block_size=cfg.lp, slc_num_blocks=cfg.n,
                                          slc_init_blocks=cfg.n_init,
                                          slc_local_blocks=cfg.n_local)
    run.add(base, f"{op_prefix}.branch.selection", "fwd", select, nsets=len(sets),
            flops=fl["fwd"]["selection"], note=bnote + "; no backward (discrete choice)")
    def slc_nbytes(bi):
        return selected_tile_bytes(bi, s.Hq // s.Hkv, cfg.lp, s.Dk, s.Dv, sets[0]["k"].element_size())
    slc_bytes = slc_nbytes(pre[0]["bi"])
    add_passes(run, base, f"{op_prefix}.branch.selected", slc, sets,
               lambda p: fl[p]["selected"], note=bnote + "; fwd bytes: the K/V of each CTA's "
               "block union, q and o", fwd_bytes=slc_bytes)
    with torch.no_grad():  # the K/V pipeline of the selected forward: one stage against two
        run.add(base, f"{op_prefix}.branch.selected_1stage", "fwd",
                with_env("NSA_SLC_FWD_STAGES", "1", slc), nsets=len(sets), flops=fl["fwd"]["selected"],
                bytes_read=slc_bytes, note=bnote + "; one K/V stage (NSA_SLC_FWD_STAGES=1; branch.selected: two)")
    bench_selected_bytes(run, base, cfg, sets, pre, fl["fwd"]["selected"], slc_nbytes, op_prefix, bnote)
    add_passes(run, base, f"{op_prefix}.branch.window", wnd, sets,
               lambda p: fl[p]["window"], note=bnote)
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        # The rows above run the wgmma kernels here (NSA_MAINLOOP=auto) where there
        # are some: the compressed and window forward and dq, every branch's dk/dv,
        # and the selection (G <= 128). These rows force the mma.sync kernels
        # (what the sm_80 build runs) on the same inputs.
        snote = bnote + "; forward forced onto the mma.sync kernel (NSA_MAINLOOP=sm80)"
        with torch.no_grad():
            run.add(base, f"{op_prefix}.branch.compressed_sm80", "fwd", on_mainloop("sm80", cmp),
                    nsets=len(sets), flops=fl["fwd"]["compressed"], note=snote)
            run.add(base, f"{op_prefix}.branch.selection_sm80", "fwd", on_mainloop("sm80", select),
                    nsets=len(sets), flops=fl["fwd"]["selection"], note=snote)
            run.add(base, f"{op_prefix}.branch.window_sm80", "fwd", on_mainloop("sm80", wnd),
                    nsets=len(sets), flops=fl["fwd"]["window"], note=snote)

        bnote80 = bnote + "; backward forced onto the mma.sync kernels (NSA_MAINLOOP=sm80)"
        for name, fn in (("compressed", cmp), ("selected", slc), ("window", wnd)):
            run.add(base, f"{op_prefix}.branch.{name}_sm80", "bwd", bwd_with_env("NSA_MAINLOOP", "sm80"),
                    setup=fn, nsets=len(sets), flops=fl["bwd"][name], note=bnote80)
    if torch.cuda.is_available():
        # The dk/dv query split (default on) against one CTA per key tile, which is what
        # a chunk larger than any tile's query list gives.
        nnote = bnote + "; dk/dv without the query split (NSA_DKV_CHUNK_ROWS=2**40)"
        for name, fn in (("compressed", cmp), ("selected", slc)):
            run.add(base, f"{op_prefix}.branch.{name}_nosplit", "bwd",
                    bwd_with_env("NSA_DKV_CHUNK_ROWS", str(2 ** 40)), setup=fn, nsets=len(sets),
                    flops=fl["bwd"][name], note=nnote)
    add_passes(run, base, f"{op_prefix}.branch.combine", combine, sets, lambda p: None,
               note=bnote + "; gate_combine: g_cmp*o_cmp + g_slc*o_slc + g_win*o_win")
    add_passes(run, base, f"{op_prefix}.branch.combine_torch", combine_torch, sets,
               lambda p: None, note=bnote + "; the same sum as torch elementwise ops (eager)")

    def combine_grad_lean(i):  # what sparse_attn's backward runs
        return torch.ops.nsa_cuda.gate_combine_bwd(sets[i]["do"], pre[i]["o"], sets[i]["g"],
                                                   True, False)
    run.add(base, f"{op_prefix}.branch.combine_grad_lean", "bwd", combine_grad_lean,
            nsets=len(sets), note=bnote + "; sparse_attn's gate backward: the gates' gradients "
            "and each branch's delta, no g * do written (the branch kernels scale do)")


def _sparse_flops(T, s, cfg, pass_, win=True):
    f = branch_flops(T, s, cfg, pass_)
    return f["sparse_attn"] - (0.0 if win else f["window"])


# --- dense SDPA ---------------------------------------------------------------------------

def bench_sdpa(run: Runner, base, s: Shape, T: int, sets, device):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    F = torch.nn.functional
    backends = [("cudnn", "CUDNN_ATTENTION"), ("flash", "FLASH_ATTENTION"),
                ("efficient", "EFFICIENT_ATTENTION")]
    tsets = [dict(q=x["q"].transpose(1, 2), k=x["k"].transpose(1, 2), v=x["v"].transpose(1, 2),
                  do=x["do"].transpose(1, 2)) for x in sets]
    flops = {p: branch_flops(T, s, PAPER_NSA, p)["dense"] for p in PASSES}
    by_pass: Dict[str, list] = {p: [] for p in PASSES}
    for name, attr in backends:
        backend = getattr(SDPBackend, attr, None)
        op = f"sdpa.{name}"
        if backend is None:
            for p in PASSES:
                run.add(base, op, p, error=f"SDPBackend.{attr} not in this torch")
            continue

        def fwd(i, backend=backend):
            x = tsets[i]
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True,
                                                      enable_gqa=True)

        before = len(run.rows)
        add_passes(run, base, op, fwd, sets, lambda p: flops[p],
                   note="dense causal, enable_gqa=True",
                   output_grad=lambda i, out: tsets[i]["do"])
        for r in run.rows[before:]:
            if r["ms"] is not None:
                by_pass[r["pass"]].append((r["ms"], name, r))
    for p in PASSES:
        if by_pass[p]:
            ms, name, r = min(by_pass[p], key=lambda z: z[0])
            row = dict(r, op="sdpa.fastest", note=f"fastest dense SDPA backend: {name}")
            run.rows.append(row)
            print(f"  {base['shape']:6s} T={T:<7d} {'sdpa.fastest':38s} {p:8s} {ms:9.3f} ms   ({name})")
        else:
            run.add(base, "sdpa.fastest", p, error="no SDPA backend ran")
    run.flush()


# --- FlexAttention ------------------------------------------------------------------------

_FLEX = {}


def _flex_fn(device):
    if device not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX[device] = torch.compile(flex_attention, dynamic=False)
    return _FLEX[device]


def nsa_block_mask(bi: torch.Tensor, T: int, Hq: int, cfg: NSA, tile: int):
    """BlockMask (tile x tile) approximating NSA's selected + window keys.

    Query tile r visits kv tile c if any query in r selected an l'-block inside c, or c
    overlaps the window of any query in r; causal inside tiles. This is a superset of
    the union of NSA's selected and window keys (per tile, not per token; one softmax,
    no gates, no compressed branch). Returns (block_mask, density over causal tiles).
    """
    from torch.nn.attention.flex_attention import BlockMask
    B, _, Hkv, n = bi.shape
    nt = T // tile
    dev = bi.device
    b = bi.long().view(B, nt, tile, Hkv, n).permute(0, 3, 1, 2, 4).reshape(B, Hkv, nt, tile * n)
    c = torch.where(b >= 0, (b * cfg.lp) // tile, torch.full_like(b, nt))
    dense = torch.zeros(B, Hkv, nt, nt + 1, dtype=torch.bool, device=dev)
    dense.scatter_(3, c, True)
    dense = dense[..., :nt]
    r = torch.arange(nt, device=dev)
    win_tiles = (cfg.w - 1 + tile - 1) // tile  # query tile r's windows reach back to r - win_tiles
    diff = r[:, None] - r[None, :]
    dense |= ((diff >= 0) & (diff <= win_tiles))[None, None]
    dense &= (diff >= 0)[None, None]
    diag = torch.eye(nt, dtype=torch.bool, device=dev)[None, None]
    full = dense & ~diag
    part = dense & diag
    G = Hq // Hkv

    def pack(m):
        num = m.sum(-1).to(torch.int32)
        idx = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return (num.repeat_interleave(G, dim=1).contiguous(),
                idx.repeat_interleave(G, dim=1).contiguous())

    def causal(b_, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    kn, ki = pack(part)
    fn_, fi = pack(full)
    mask = BlockMask.from_kv_blocks(kn, ki, fn_, fi, BLOCK_SIZE=tile, mask_mod=causal,
                                    seq_lengths=(T, T))
    density = float(dense.sum()) / (B * Hkv * nt * (nt + 1) / 2)
    return mask, density


def bench_flex(run: Runner, base, s: Shape, T: int, cfg: NSA, sets, device, compiled=True):
    op = "flex_attention.nsa_blockmask"
    tile = 128 if T % 128 == 0 and T >= 128 else 64
    try:
        flex = _flex_fn(device) if compiled else \
            __import__("torch.nn.attention.flex_attention", fromlist=["x"]).flex_attention
        masks = []
        with torch.no_grad():
            for x in sets:
                kc = nsa_cuda.mean_compress(x["k"], cfg.l, cfg.d)
                lc = nsa_cuda.compressed_attn(x["q"], kc, nsa_cuda.mean_compress(x["v"], cfg.l, cfg.d),
                                              cmp_block_size=cfg.l, cmp_stride=cfg.d)[1]
                bi = nsa_cuda.select_blocks(x["q"], kc, lc, cmp_block_size=cfg.l,
                                            cmp_stride=cfg.d, slc_block_size=cfg.lp,
                                            slc_num_blocks=cfg.n, slc_init_blocks=cfg.n_init,
                                            slc_local_blocks=cfg.n_local)
                masks.append(nsa_block_mask(bi, T, s.Hq, cfg, tile))
    except Exception as e:  # noqa: BLE001
        for p in PASSES:
            run.add(base, op, p, error="block mask: " + _err(e))
        return
    density = statistics.mean(m[1] for m in masks)
    note = (f"APPROXIMATION: one softmax over the union, per {tile}-query tile, of NSA's "
            f"selected blocks and window (causal inside tiles); no compressed branch, no "
            f"gates; visits {100 * density:.1f}% of causal tiles; "
            f"TFLOP/s counted on NSA's selected+window FLOPs; "
            f"{'torch.compile' if compiled else 'eager'}")
    tsets = [dict(q=x["q"].transpose(1, 2), k=x["k"].transpose(1, 2), v=x["v"].transpose(1, 2),
                  do=x["do"].transpose(1, 2)) for x in sets]

    def fwd(i):
        x = tsets[i]
        return flex(x["q"], x["k"], x["v"], block_mask=masks[i][0], enable_gqa=True)

    def fwd_nograd(i):  # flex refuses inputs that require grad where it has no backward
        x = tsets[i]
        return flex(x["q"].detach(), x["k"].detach(), x["v"].detach(), block_mask=masks[i][0],
                    enable_gqa=True)

    def fl(p):
        f = branch_flops(T, s, cfg, p)
        return f["selected"] + f["window"]
    add_passes(run, base, op, fwd, sets, fl, note=note, output_grad=lambda i, out: tsets[i]["do"],
               fwd_nograd=fwd_nograd)


# --- flash-linear-attention ---------------------------------------------------------------

def bench_fla(run: Runner, base, s: Shape, T: int, cfg: NSA, sets):
    """fla's parallel_nsa on its own conventions (l = d = l' = block_size, mean pooling,
    G = Hq/Hkv a power of 2 >= 16) against nsa_cuda.sparse_attn on the same settings."""
    fcfg = replace(cfg, l=cfg.lp, d=cfg.lp)
    op = "fla.parallel_nsa"
    conv = f"fla conventions: l = d = l' = {cfg.lp}, mean pooling, n = {cfg.n}, w = {cfg.w}"
    win = True
    try:
        from fla.ops.nsa import parallel_nsa
        import fla
        ver = getattr(fla, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        for p in PASSES:
            run.add(base, op, p, error="fla not importable: " + _err(e))
        parallel_nsa, ver = None, None
    if parallel_nsa is not None:
        G = s.Hq // s.Hkv
        if G < 16 or G & (G - 1):
            for p in PASSES:
                run.add(base, op, p, error=f"fla needs Hq/Hkv a power of 2 >= 16, got G={G}")
        else:
            def call(i, window):
                x = sets[i]
                g_cmp, g_slc, g_win = x["g"]
                return parallel_nsa(x["q"], x["k"], x["v"], g_cmp=g_cmp, g_slc=g_slc,
                                    g_swa=g_win, block_counts=cfg.n, block_size=cfg.lp,
                                    window_size=window, scale=s.Dk ** -0.5)
            # fla's window branch needs the flash_attn package; without it, run cmp + slc
            # (window_size=0) and compare nsa_cuda without its window branch too.
            try:
                call(0, cfg.w)
                _sync(run.timing.device)
            except Exception as e:  # noqa: BLE001
                win = False
                conv += f"; no window branch (window_size={cfg.w} failed: {_err(e)[:120]})"
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
            window = cfg.w if win else 0
            add_passes(run, base, op, lambda i: call(i, window), sets,
                       lambda p: _sparse_flops(T, s, fcfg, p, win),
                       note=f"fla-core {ver}; " + conv)
    # nsa_cuda on the same conventions
    bench_nsa(run, base, s, T, fcfg, sets, op_prefix="nsa_cuda@fla_conv", branches=False,
              win=win, note=conv)


# --- decode (KV cache) ----------------------------------------------------------------------

def cuda_kernel_count(fn) -> str:
    """Kernels one call of fn launches on the GPU (torch.profiler), or why not known."""
    try:
        from torch.profiler import ProfilerActivity, profile
        fn()  # allocations and first-call work outside the count
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return str(sum(1 for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA and
                       not e.name.lower().startswith(("memcpy", "memset"))))
    except Exception as e:  # noqa: BLE001  a diagnostic, never a failure
        return "unknown (" + _err(e)[:60] + ")"


def make_decode_set(s: Shape, T: int, B: int, cfg: NSA, device, dtype) -> dict:
    """Caches of capacity T holding T - 1 random tokens (and their compressed blocks), the
    new token's q, k, v (k/v equal to the caches' row T - 1) and its gates."""
    k = torch.randn(B, T, s.Hkv, s.Dk, device=device, dtype=dtype)
    v = torch.randn(B, T, s.Hkv, s.Dv, device=device, dtype=dtype)
    return dict(q=torch.randn(B, 1, s.Hq, s.Dk, device=device, dtype=dtype), k=k, v=v,
                kc=nsa_cuda.mean_compress(k, cfg.l, cfg.d),
                vc=nsa_cuda.mean_compress(v, cfg.l, cfg.d),
                k_new=k[:, T - 1:].clone(), v_new=v[:, T - 1:].clone(),
                g=torch.rand(B, 1, s.Hq, device=device, dtype=dtype),
                lens=torch.full((B,), T - 1, dtype=torch.int32, device=device))


def decode_step(x: dict, T: int, cfg: NSA):
    """One decode step on a make_decode_set: append the new token at row T - 1, attend."""
    return nsa_cuda.sparse_attn_with_kvcache(
        x["q"], x["k"], x["v"], x["kc"], x["vc"], x["lens"], x["k_new"], x["v_new"],
        g_cmp=x["g"], g_slc=x["g"], g_win=x["g"], max_cache_seqlen=T - 1, **cfg.kwargs())


def bench_decode(run: Runner, s: Shape, T: int, B: int, cfg: NSA, device, dtype):
    """Latency of one decode step (S = 1) at context length T, batch B: the new token is
    appended at row T - 1 of caches of capacity T (its compressed block, if it completes
    one, is written), then NSA decodes; against dense decoding with torch SDPA over the
    same cache (GQA, all T keys). Rows: nsa_cuda.decode (eager, with a host-side length
    bound: no device sync), nsa_cuda.decode.graph (the same call replayed from a CUDA graph,
    CUDA only), nsa_cuda.decode.kernel.{compressed,selection,compressed_select,selected,
    window} (each decode op alone; compressed_select is the fused pair the step runs),
    sdpa.decode; with the bytes each must move and the GB/s that makes. Caches that do not
    fit in free memory skip their rows."""
    base = dict(shape=s.name, T=T, B=B, S=1, Hq=s.Hq, Hkv=s.Hkv, Dk=s.Dk, Dv=s.Dv,
                dtype=str(dtype).replace("torch.", ""), device=device,
                nsa=dict(l=cfg.l, d=cfg.d, lp=cfg.lp, n=cfg.n, w=cfg.w))
    cuda = device == "cuda"
    kernel_names = ("compressed", "selection", "compressed_select", "selected", "window",
                    "branches")
    ops = ["nsa_cuda.decode"] + (["nsa_cuda.decode.graph"] if cuda else []) + \
        [f"nsa_cuda.decode.kernel.{k}" for k in kernel_names] + ["sdpa.decode"]
    print(f"{stamp()} == decode {s.name} B={B} T={T} {base['dtype']} on {device}", flush=True)
    elt = torch.tensor([], dtype=dtype).element_size()
    rows_cmp = nsa_cuda.cmp_cache_rows(T, cfg.l, cfg.d)
    set_bytes = B * (T + rows_cmp) * s.Hkv * (s.Dk + s.Dv) * elt
    if cuda:
        free, _ = torch.cuda.mem_get_info()
        if 1.3 * set_bytes > free:
            for op in ops:
                run.add(base, op, "decode", skipped=True,
                        error=f"skipped: caches need {set_bytes / 2**30:.1f} GiB, "
                              f"{free / 2**30:.1f} GiB free")
            return
    nsets = num_sets(set_bytes, device) if cuda else 1
    sets = []
    try:
        for _ in range(nsets):
            sets.append(make_decode_set(s, T, B, cfg, device, dtype))
    except torch.cuda.OutOfMemoryError as e:
        for op in ops:
            run.add(base, op, "decode", skipped=True,
                    error="skipped: out of memory making caches: " + _err(e))
        del sets
        torch.cuda.empty_cache()
        return

    def nsa_step(i):
        return decode_step(sets[i], T, cfg)

    # Bytes each decode kernel must read from the caches at t = T - 1 (K and V rows
    # of every KV head): the floor of a memory-bound step, for the GB/s columns.
    kv_row = B * s.Hkv * (s.Dk + s.Dv) * elt
    # compressed_select: the selection reads the fp32 scores the attention kept
    # (written, then read: G rows per KV head) instead of k_cmp.
    kept = 2 * B * s.Hq * rows_cmp * 4
    need = dict(compressed=rows_cmp * kv_row, selection=B * s.Hkv * rows_cmp * s.Dk * elt,
                compressed_select=rows_cmp * kv_row + kept,
                selected=min(cfg.n * cfg.lp, T) * kv_row, window=min(cfg.w, T) * kv_row)
    need["branches"] = need["compressed_select"] + need["selected"] + need["window"]
    note = f"decode step, S=1, {nsets} cache set(s) rotated"
    launches = f"; {cuda_kernel_count(lambda: nsa_step(0))} kernel launches" if cuda else ""
    run.add(base, "nsa_cuda.decode", "decode", nsa_step, nsets=nsets,
            bytes_read=sum(need[k] for k in ("compressed_select", "selected", "window")),
            note=note + "; eager, host-side length bound (no device sync)" + launches)
    if cuda:
        try:
            graph = None
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    nsa_step(0)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                nsa_step(0)
            run.add(base, "nsa_cuda.decode.graph", "decode", lambda i: graph.replay(), nsets=1,
                    note="decode step replayed from a CUDA graph (one cache set)")
        except Exception as e:  # noqa: BLE001
            run.add(base, "nsa_cuda.decode.graph", "decode", error="graph capture: " + _err(e))
        finally:
            graph = None

    # Each decode kernel alone (torch.ops.nsa_cuda, no gates, no cache update) on the
    # caches holding all T tokens: where a step's time goes.
    nsa_ops = torch.ops.nsa_cuda
    scale = s.Dk ** -0.5
    full = torch.full((B,), T, dtype=torch.int32, device=device)
    try:
        for x in sets:
            _, x["lse"] = nsa_ops.compressed_attn_decode(x["q"], x["kc"], x["vc"], full, cfg.l,
                                                         cfg.d, scale)
            x["bi"] = nsa_ops.select_blocks_decode(x["q"], x["kc"], x["lse"], full, cfg.l, cfg.d,
                                                   cfg.lp, cfg.n, cfg.n_init, cfg.n_local, scale)
        kernels = dict(zip(kernel_names, (
            lambda x: nsa_ops.compressed_attn_decode(x["q"], x["kc"], x["vc"], full, cfg.l, cfg.d,
                                                     scale),
            lambda x: nsa_ops.select_blocks_decode(x["q"], x["kc"], x["lse"], full, cfg.l, cfg.d,
                                                   cfg.lp, cfg.n, cfg.n_init, cfg.n_local, scale),
            lambda x: nsa_ops.compressed_select_decode(x["q"], x["kc"], x["vc"], full, cfg.l,
                                                       cfg.d, cfg.lp, cfg.n, cfg.n_init,
                                                       cfg.n_local, scale),
            lambda x: nsa_ops.selected_attn_decode(x["q"], x["k"], x["v"], x["bi"], full, cfg.lp,
                                                   scale),
            lambda x: nsa_ops.window_attn_decode(x["q"], x["k"], x["v"], full, cfg.w, scale),
            # the step's attention as one op: three branches, selection, gated sum
            lambda x: nsa_ops.sparse_attn_decode(
                x["q"], x["k"], x["v"], x["k"], x["v"], x["kc"], x["vc"], full, x["g"], x["g"],
                x["g"], None, cfg.l, cfg.d, cfg.lp, cfg.n, cfg.n_init, cfg.n_local, cfg.w,
                scale))))
        for name, kernel in kernels.items():
            run.add(base, f"nsa_cuda.decode.kernel.{name}", "decode",
                    lambda i, kernel=kernel: kernel(sets[i]), nsets=nsets, bytes_read=need[name],
                    note=note + f"; the {name} kernel(s) alone, all T tokens cached")
    except Exception as e:  # noqa: BLE001  the inputs of the kernel rows failed: record it
        for name in kernel_names:
            run.add(base, f"nsa_cuda.decode.kernel.{name}", "decode", error="inputs: " + _err(e))

    F = torch.nn.functional
    tsets = [dict(q=x["q"].transpose(1, 2), k=x["k"].transpose(1, 2), v=x["v"].transpose(1, 2))
             for x in sets]

    def sdpa_step(i):
        x = tsets[i]
        if cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                              SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], enable_gqa=True)
        return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], enable_gqa=True)

    run.add(base, "sdpa.decode", "decode", sdpa_step, nsets=nsets, bytes_read=T * kv_row,
            note=note + "; dense over all T cached keys, enable_gqa=True")
    del sets, tsets
    if cuda:
        torch.cuda.empty_cache()


# --- driver -------------------------------------------------------------------------------

def bench_point(run: Runner, s: Shape, T: int, cfg: NSA, device, dtype, args):
    base = dict(shape=s.name, T=T, B=s.B, Hq=s.Hq, Hkv=s.Hkv, Dk=s.Dk, Dv=s.Dv,
                dtype=str(dtype).replace("torch.", ""), device=device,
                nsa=dict(l=cfg.l, d=cfg.d, lp=cfg.lp, n=cfg.n, w=cfg.w))
    print(f"{stamp()} == shape {s.name} {s} T={T} {base['dtype']} on {device}", flush=True)
    try:
        one = make_set(s, T, device, dtype, True)
        nsets = num_sets(_bytes(one), device)
        sets = [one] + [make_set(s, T, device, dtype, True) for _ in range(nsets - 1)]
    except torch.cuda.OutOfMemoryError as e:
        run.add(base, "setup", "fwd", error="skipped: out of memory making inputs: " + _err(e),
                skipped=True)
        torch.cuda.empty_cache()
        return
    # The targets' rows first (NSA, dense SDPA, fla); FlexAttention, whose compile takes
    # the longest, last.
    steps = [("nsa", lambda: bench_nsa(run, base, s, T, cfg, sets)),
             ("sdpa", lambda: bench_sdpa(run, base, s, T, sets, device)),
             ("fla", lambda: bench_fla(run, base, s, T, cfg, sets)),
             ("flex", lambda: bench_flex(run, base, s, T, cfg, sets, device,
                                         compiled=not args.flex_eager))]
    for name, f in steps:
        if name in args.skip:
            continue
        try:
            f()
        except torch.cuda.OutOfMemoryError as e:
            run.add(base, name, "fwd", error="skipped: out of memory: " + _err(e), skipped=True)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            run.add(base, name, "fwd", error="suite error: " + _err(e))
        if device == "cuda":
            torch.cuda.empty_cache()
    del sets
    if device == "cuda":
        torch.cuda.empty_cache()


def print_table(rows: List[dict]):
    print("\n==== results ====")
    print(f"{'shape':6s} {'T':>7s} {'op':38s} {'pass':8s} {'ms':>10s} {'TF/s':>8s} "
          f"{'MB':>8s}  error")
    for r in rows:
        ms, tf, mb = r.get("ms"), r.get("tflops"), r.get("peak_mem_mb")
        print(f"{r.get('shape', ''):6s} {r.get('T', 0):>7d} {r.get('op', '?'):38s} "
              f"{r.get('pass', ''):8s} {('%.3f' % ms) if ms is not None else '-':>10s} "
              f"{('%.3g' % tf) if tf is not None else '':>8s} "
              f"{('%.0f' % mb) if mb is not None else '':>8s}  "
              f"{'B=%d ' % r['B'] if r.get('pass') == 'decode' and 'B' in r else ''}"
              f"{(r.get('error') or '')[:90]}")


def make_plots(rows: List[dict], out_dir: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    files = []
    shapes = sorted({r["shape"] for r in rows if "shape" in r})
    ops = ["nsa_cuda.sparse_attn", "flex_attention.nsa_blockmask", "fla.parallel_nsa",
           "nsa_cuda@fla_conv.sparse_attn"]
    for p in ("fwd", "bwd"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        plotted = False
        for sh in shapes:
            base = {r["T"]: r["ms"] for r in rows if r.get("shape") == sh and r["op"] == "sdpa.fastest"
                    and r["pass"] == p and r["ms"]}
            for op in ops:
                pts = sorted((r["T"], base[r["T"]] / r["ms"]) for r in rows
                             if r.get("shape") == sh and r["op"] == op and r["pass"] == p
                             and r["ms"] and r["T"] in base)
                if pts:
                    ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o",
                            label=f"{op} [{sh}]")
                    plotted = True
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("speedup over fastest dense SDPA")
        ax.set_title(f"{p}: speedup over the fastest dense causal SDPA backend")
        if plotted:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no successful rows for this pass", ha="center",
                    transform=ax.transAxes)
        path = os.path.join(out_dir, f"speedup_{p.replace('+', '_')}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    # per-branch time, forward (stacked) and backward, per shape and T
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, p in zip(axes, ("fwd", "bwd")):
        labels, bottoms = [], []
        keys = sorted({(r["shape"], r["T"]) for r in rows if r["op"].startswith("nsa_cuda.branch.")})
        for sh, T in keys:
            labels.append(f"{sh}\n{T}")
        bottom = [0.0] * len(keys)
        for br in BRANCHES:
            vals = []
            for sh, T in keys:
                ms = next((r["ms"] for r in rows if r.get("shape") == sh and r["T"] == T
                           and r["op"] == f"nsa_cuda.branch.{br}" and r["pass"] == p), None)
                vals.append(ms or 0.0)
            if any(vals):
                ax.bar(range(len(keys)), vals, bottom=bottom, label=br,
                       color=f"C{BRANCHES.index(br)}")
                bottom = [a + b for a, b in zip(bottom, vals)]
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("ms")
        ax.set_title(f"nsa_cuda per-branch time ({p})")
        if any(bottom):
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, f"no {p} branch timings", ha="center", transform=ax.transAxes)
    path = os.path.join(out_dir, "branches.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path)
    return files


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="default: cuda when available, else cpu")
    ap.add_argument("--lengths", default=None,
                    help="comma list; default 8192,16384,32768,65536,131072 on CUDA "
                         "(--quick: 256,512)")
    ap.add_argument("--shapes", default="paper,peer,gqa4",
                    help="comma list of " + ",".join(SHAPES) + " (--quick: a tiny shape)")
    ap.add_argument("--json", default=None, help="write the rows here (rewritten after each row)")
    ap.add_argument("--plots", default=None, help="write PNG plots into this folder")
    ap.add_argument("--quick", action="store_true",
                    help="tiny config: T in {256,512}, Hq=4, Hkv=1, D=32, scaled-down NSA, 1-2 reps")
    ap.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) or float32 (CPU default)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--min-reps", type=int, default=None)
    ap.add_argument("--max-reps", type=int, default=None)
    ap.add_argument("--target-ms", type=float, default=None,
                    help="measured time to aim for per row (CUDA default 300)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop measuring after this many seconds (later rows: skipped)")
    ap.add_argument("--skip", default="",
                    help="comma list of nsa,sdpa,flex,fla,decode to leave out")
    ap.add_argument("--decode-batches", default=None,
                    help="batch sizes of the decode rows (default 1,32; --quick: 1,2)")
    ap.add_argument("--decode-shapes", default="paper",
                    help="shapes of the decode rows (--quick: the tiny shape)")
    ap.add_argument("--flex-eager", action="store_true",
                    help="FlexAttention without torch.compile (default on CPU --quick)")
    ap.add_argument("--fault-rounds", type=int, default=1,
                    help="with --json: when a kernel faults (the CUDA context is lost), record it "
                         "and go on in a fresh process, at most this many processes in all "
                         "(default 1: the rows after a fault are recorded as not run)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in --json and measure only the others")
    args = ap.parse_args(argv)
    args.skip = {x for x in args.skip.split(",") if x}
    return args


def lost_context_exit(run: Runner) -> int:
    run.flush()
    print(f"bench: the CUDA context was lost in {run.lost}; the rows after it were not run "
          f"in this process", flush=True)
    return LOST_CONTEXT_RC


def run_rounds(args, argv) -> int:
    """--fault-rounds: this suite in fresh processes, each resuming from --json, until
    one ends without a lost CUDA context (or the rounds or --budget-s run out)."""
    if not args.json:
        print("--fault-rounds needs --json (the rounds share their rows through it)", file=sys.stderr)
        return 2
    if os.path.exists(args.json) and not args.resume:
        os.remove(args.json)
    deadline = time.time() + args.budget_s if args.budget_s else None
    argv = list(sys.argv[1:] if argv is None else argv)
    for rnd in range(1, args.fault_rounds + 1):
        extra = ["--fault-rounds", "1", "--resume"]
        if deadline is not None:
            left = deadline - time.time()
            if left < 5:
                break
            extra += ["--budget-s", f"{left:.0f}"]
        print(f"== bench round {rnd} of at most {args.fault_rounds}", flush=True)
        rc = subprocess.call([sys.executable, os.path.abspath(__file__), *argv, *extra])
        if rc != LOST_CONTEXT_RC:
            return rc
    print(f"bench: stopped with a lost CUDA context after {rnd} round(s); the rows not measured "
          f"are missing from {args.json}", flush=True)
    return LOST_CONTEXT_RC


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.fault_rounds > 1:
        return run_rounds(args, argv)
    t0 = time.time()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    cuda = device == "cuda"
    if args.quick:
        shapes = [QUICK_SHAPE]
        cfg = QUICK_NSA
        lengths = args.lengths or "256,512"
        if device == "cpu":
            args.flex_eager = True  # compiling flex on 2 CPU cores takes minutes
    else:
        shapes = [SHAPES[x] for x in args.shapes.split(",") if x]
        cfg = PAPER_NSA
        lengths = args.lengths or ("8192,16384,32768,65536,131072" if cuda else "1024,2048")
    lengths = [int(x) for x in lengths.split(",") if x]
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    timing = Timing(
        device=device,
        warmup=args.warmup if args.warmup is not None else (3 if cuda else 1),
        min_reps=args.min_reps if args.min_reps is not None else (5 if cuda else 1),
        max_reps=args.max_reps if args.max_reps is not None else (
            100 if cuda else (2 if args.quick else 3)),
        target_ms=args.target_ms if args.target_ms is not None else (300.0 if cuda else 1.0),
        deadline=(t0 + args.budget_s) if args.budget_s else None)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    earlier = []
    if args.resume and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            earlier = json.load(f)
    run = Runner(timing, args.json, earlier)
    print(f"nsa_cuda bench suite: device={device}"
          f"{' (' + torch.cuda.get_device_name(0) + ')' if cuda else ''} torch={torch.__version__} "
          f"dtype={dtype} shapes={[s.name for s in shapes]} lengths={lengths} nsa={cfg}",
          flush=True)
    torch.manual_seed(0)
    batches = [int(x) for x in (args.decode_batches or ("1,2" if args.quick else "1,32")).split(",") if x]
    dshapes = [] if "decode" in args.skip else [QUICK_SHAPE] if args.quick else [
        SHAPES[x] for x in args.decode_shapes.split(",") if x]
    # Length by length, in the order given (gpu_check.sh puts the targets' 64k first):
    # a budget that runs out leaves whole lengths, prefill and decode, not half of each.
    for T in lengths:
        for s in shapes:
            try:
                bench_point(run, s, T, cfg, device, dtype, args)
            except Exception:  # noqa: BLE001  after a lost context, torch calls between rows raise too
                if not run.lost:
                    raise
        for s in dshapes:
            for B in batches:
                if run.lost:
                    break
                try:
                    bench_decode(run, s, T, B, cfg, device, dtype)
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    run.add(dict(shape=s.name, T=T, B=B), "decode", "decode",
                            error="suite error: " + _err(e))
        if run.lost:
            return lost_context_exit(run)
    print_table(run.rows)
    run.flush()
    if args.plots:
        try:
            files = make_plots(run.rows, args.plots)
            print("plots: " + ", ".join(files))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            print(f"plots failed: {_err(e)}")
    n_ok = sum(r["ms"] is not None for r in run.rows)
    print(f"{len(run.rows)} rows, {n_ok} timed, {len(run.rows) - n_ok} errors/skips; "
          f"{time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
