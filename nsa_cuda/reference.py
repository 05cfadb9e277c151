"""Readable pure-PyTorch reference of Native Sparse Attention (the project's oracle).

This module states NSA_SPEC.md in plain PyTorch: dense attention scores with a
boolean mask per branch and a masked softmax. It is meant to be read and trusted,
not to be fast. The index rules at the top are the same rules as
``csrc/include/nsa/rules.h``; the masks below are built from them.

Layout (flash-attn "bshd"): ``q [B,T,Hq,Dk]``, ``k [B,T,Hkv,Dk]``, ``v [B,T,Hkv,Dv]``,
``k_cmp/v_cmp [B,Tc,Hkv,D]``, gates ``[B,T,Hq]``, ``block_indices [B,T,Hkv,n]`` int32,
``lse [B,Hq,T]``. Query head ``h`` reads kv head ``h // G`` with ``G = Hq // Hkv``.
Varlen: ``cu_seqlens`` int32 ``[N+1]``, tensors are ``[1, total, ...]``, positions
restart at 0 in every sequence, and sequence ``i``'s compressed rows start at row
``sum_{m<i} Tc(len_m)`` of ``k_cmp``/``v_cmp``.

Precision (our reading of the spec's "ref" and "ref_lp"):

* Every branch computes in the dtype of its inputs, so calling it with fp64 inputs
  gives ``ref`` and calling it with the fp16/bf16 inputs gives ``ref_lp``.
* ``o`` has the dtype of ``q``. ``lse`` is float32 for fp16/bf16/fp32 inputs and
  float64 for fp64 inputs: the spec says float32, but ``torch.autograd.gradcheck``
  needs an fp64 ``lse`` to check anything that depends on it. For low-precision
  inputs ``lse`` is the input-dtype logsumexp cast to float32.
* Block selection is a discrete choice: it runs under ``no_grad`` in the input dtype
  upcast to at least float32.

Empty attention rows (compressed branch with ``nc(t) = 0``) give ``o = 0`` and
``lse = -inf``, and neither the forward nor the backward pass ever produces NaN.
Everything is differentiable with autograd through q, k, v, k_cmp, v_cmp and the gates.
"""

from __future__ import annotations

from typing import Iterator, List, NamedTuple, Optional, Tuple

import torch

__all__ = [
    "num_cmp_blocks",
    "num_visible_cmp_blocks",
    "window_begin",
    "selected_block_end",
    "num_slc_blocks",
    "last_candidate_slc_block",
    "is_forced_slc_block",
    "cmp_slc_overlap_weights",
    "packed_cmp_row_begin",
    "packed_cmp_rows_bound",
    "mean_compress",
    "compressed_attn",
    "select_blocks",
    "selected_attn",
    "window_attn",
    "sparse_attn",
]

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------
# Index rules (same as csrc/include/nsa/rules.h). Positions are 0-based.
# --------------------------------------------------------------------------------------


def num_cmp_blocks(T: int, l: int, d: int) -> int:
    """Tc(T): complete compressed blocks in a sequence of length T; block i is [i*d, i*d+l)."""
    return 0 if T < l else (T - l) // d + 1


def num_visible_cmp_blocks(t: int, l: int, d: int) -> int:
    """nc(t): compressed blocks that have ended at query t, i.e. i*d + l - 1 <= t."""
    return 0 if t + 1 < l else (t + 1 - l) // d + 1


def window_begin(t: int, w: int) -> int:
    """Query t of the sliding window sees keys [window_begin(t, w), t]."""
    return max(t - w + 1, 0)


def selected_block_end(j: int, t: int, lp: int) -> int:
    """Query t sees the part [j*lp, selected_block_end) of selection block j."""
    return min((j + 1) * lp, t + 1)


def num_slc_blocks(T: int, lp: int) -> int:
    """Valid selection block ids are [0, num_slc_blocks(T, lp)); others are unused slots."""
    return (T + lp - 1) // lp


def last_candidate_slc_block(t: int, lp: int) -> int:
    """J = t // lp: the last selection block that starts at or before t."""
    return t // lp


def is_forced_slc_block(j, J, n_init: int, n_local: int):
    """The n_init first and the n_local last candidates are always selected.

    Written with ``&``/``|`` so that it works on ints and on integer tensors alike.
    """
    return (j <= J) & ((j < n_init) | (j > J - n_local))


def cmp_slc_overlap_weights(
    Tc: int,
    num_slc: int,
    l: int,
    d: int,
    lp: int,
    *,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Tensor:
    """w(i, j) = |[i*d, i*d+l) ∩ [j*lp, (j+1)*lp)| / d as a ``[Tc, num_slc]`` tensor."""
    i = torch.arange(Tc, device=device).unsqueeze(1)
    j = torch.arange(num_slc, device=device).unsqueeze(0)
    lo = torch.maximum(i * d, j * lp)
    hi = torch.minimum(i * d + l, (j + 1) * lp)
    return (hi - lo).clamp(min=0).to(dtype) / d


def packed_cmp_row_begin(seqlens: List[int], seq: int, l: int, d: int) -> int:
    """Varlen: first row of sequence ``seq`` in a packed k_cmp (sum of Tc over earlier ones)."""
    return sum(num_cmp_blocks(n, l, d) for n in seqlens[:seq])


def packed_cmp_rows_bound(total: int, d: int) -> int:
    """Rows of a varlen mean_compress output: ``sum Tc(len_m) <= total // d`` since l >= d.

    A bound known from shapes alone, so the CUDA op needs no device sync.
    """
    return total // d


# --------------------------------------------------------------------------------------
# Argument checks. The reference is also the spec's executable statement of what bad
# input gets, so it raises the same kinds of errors the kernels do.
# --------------------------------------------------------------------------------------


def _check_rank4(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have rank 4 [B, T, H, D], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")


def _check_kv(q: Tensor, k: Tensor, v: Tensor, kname: str = "k", vname: str = "v",
              same_len: bool = True) -> None:
    for name, x in (("q", q), (kname, k), (vname, v)):
        _check_rank4(name, x)
    for name, x in ((kname, k), (vname, v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {x.device}")
        if x.shape[0] != q.shape[0]:
            raise ValueError(f"{name} must have batch size {q.shape[0]}, got {x.shape[0]}")
    if same_len and (k.shape[1] != q.shape[1] or v.shape[1] != q.shape[1]):
        raise ValueError(f"{kname}/{vname} must have T = {q.shape[1]}, "
                         f"got {k.shape[1]} and {v.shape[1]}")
    if not same_len and k.shape[1] != v.shape[1]:
        raise ValueError(f"{kname} and {vname} must have the same number of rows, "
                         f"got {k.shape[1]} and {v.shape[1]}")
    hq, hkv = q.shape[2], k.shape[2]
    if v.shape[2] != hkv:
        raise ValueError(f"{vname} must have {hkv} heads like {kname}, got {v.shape[2]}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"Hq ({hq}) must be a multiple of Hkv ({hkv})")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"{kname} must have head dim Dk = {q.shape[3]}, got {k.shape[3]}")


def _check_positive(**kw: int) -> None:
    for name, val in kw.items():
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")


def _check_cmp_sizes(l: int, d: int) -> None:
    _check_positive(cmp_block_size=l, cmp_stride=d)
    if l % d != 0:
        raise ValueError(f"cmp_stride ({d}) must divide cmp_block_size ({l})")


def _check_slc_sizes(d: int, lp: int, n: int, n_init: int, n_local: int) -> None:
    _check_positive(slc_block_size=lp, slc_num_blocks=n, slc_local_blocks=n_local)
    if lp % d != 0:
        raise ValueError(f"cmp_stride ({d}) must divide slc_block_size ({lp})")
    if not isinstance(n_init, int) or n_init < 0:
        raise ValueError(f"slc_init_blocks must be an int >= 0, got {n_init!r}")
    if n_init + n_local > n:
        raise ValueError(f"slc_init_blocks + slc_local_blocks ({n_init} + {n_local}) "
                         f"must be <= slc_num_blocks ({n})")


def _seqlens(q: Tensor, cu_seqlens: Optional[Tensor]) -> Optional[List[int]]:
    """Validate cu_seqlens and return the sequence lengths (None in batch mode)."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32:
        raise TypeError("cu_seqlens must be an int32 tensor")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [N+1], got shape {tuple(cu_seqlens.shape)}")
    if q.shape[0] != 1:
        raise ValueError(f"varlen mode needs batch size 1, got q with B = {q.shape[0]}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")
    if cu[-1] != q.shape[1]:
        raise ValueError(f"cu_seqlens must end at total = {q.shape[1]}, got {cu[-1]}")
    return [b - a for a, b in zip(cu, cu[1:])]


# --------------------------------------------------------------------------------------
# Shared machinery
# --------------------------------------------------------------------------------------


class _Seq(NamedTuple):
    batch: int  # index into dim 0
    start: int  # first row in dim 1
    length: int
    cmp_row0: int  # first compressed row (varlen packing); 0 in batch mode


def _sequences(q: Tensor, cu_seqlens: Optional[Tensor], l: int = 1, d: int = 1) -> Iterator[_Seq]:
    """Batch mode: one sequence per batch entry. Varlen: the packed sequences of cu_seqlens."""
    lens = _seqlens(q, cu_seqlens)
    if lens is None:
        for b in range(q.shape[0]):
            yield _Seq(b, 0, q.shape[1], 0)
        return
    start = 0
    for i, n in enumerate(lens):
        yield _Seq(0, start, n, packed_cmp_row_begin(lens, i, l, d))
        start += n


def _rows(x: Tensor, seq: _Seq) -> Tensor:
    return x[seq.batch, seq.start:seq.start + seq.length]


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 only so that gradcheck can see through lse; the spec's lse is float32
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked_softmax(s: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Softmax of ``s`` over the last dim restricted to ``mask``.

    Returns (p, lse). A row with no visible entry gets p = 0 and lse = -inf. A plain
    masked_fill(-inf) + softmax would give NaN there, and exp(-inf - -inf) would give
    NaN in the backward pass too, so empty rows get finite dummy scores first and
    are zeroed afterwards; the ``where``s route no gradient into masked entries.
    """
    nonempty = mask.any(dim=-1, keepdim=True)
    s = torch.where(mask, s, float("-inf"))
    s = torch.where(nonempty, s, 0.0)
    p = torch.where(mask, torch.softmax(s, dim=-1), 0.0)
    lse = torch.where(nonempty.squeeze(-1), torch.logsumexp(s, dim=-1), float("-inf"))
    return p, lse


def _scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """scale * <q[t,h], k[s, h // G]> as [Hq, T, S]."""
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, dim=1)  # query head h reads kv head h // G
    return torch.einsum("thd,shd->hts", q, k) * scale


def _masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor,
                      scale: float) -> Tuple[Tensor, Tensor]:
    """Dense masked attention of one sequence, shared by the three branches.

    q [T,Hq,Dk], k [S,Hkv,Dk], v [S,Hkv,Dv], mask broadcastable to [Hq,T,S].
    Returns o [T,Hq,Dv] (dtype of q) and lse [Hq,T].
    """
    g = q.shape[1] // k.shape[1]
    p, lse = _masked_softmax(_scores(q, k, scale), mask)
    o = torch.einsum("hts,shd->thd", p, v.repeat_interleave(g, dim=1))
    return o, lse


def _new_outputs(q: Tensor, dv: int) -> Tuple[Tensor, Tensor]:
    B, T, Hq, _ = q.shape
    o = q.new_zeros(B, T, Hq, dv)
    lse = torch.full((B, Hq, T), float("-inf"), dtype=_lse_dtype(q.dtype), device=q.device)
    return o, lse


def _store(o: Tensor, lse: Tensor, seq: _Seq, o_s: Tensor, lse_s: Tensor) -> None:
    # slice assignment into fresh buffers is tracked by autograd (CopySlices)
    o[seq.batch, seq.start:seq.start + seq.length] = o_s
    lse[seq.batch, :, seq.start:seq.start + seq.length] = lse_s.to(lse.dtype)


def _positions(n: int, device) -> Tensor:
    return torch.arange(n, device=device)


def _causal_mask(n: int, device) -> Tensor:
    t = _positions(n, device)
    return t.unsqueeze(0) <= t.unsqueeze(1)  # [t, s]: s <= t


def _default_scale(q: Tensor, scale: Optional[float]) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _cmp_rows(x_cmp: Tensor, seq: _Seq, l: int, d: int, name: str) -> Tensor:
    """Compressed rows sequence ``seq`` may see: its Tc(len) rows (extra rows are ignored)."""
    tc = num_cmp_blocks(seq.length, l, d)
    if x_cmp.shape[1] < seq.cmp_row0 + tc:
        raise ValueError(f"{name} has {x_cmp.shape[1]} rows, sequence needs rows "
                         f"[{seq.cmp_row0}, {seq.cmp_row0 + tc})")
    return x_cmp[seq.batch, seq.cmp_row0:seq.cmp_row0 + tc]


def _cmp_mask(length: int, tc: int, l: int, d: int, device) -> Tensor:
    """[t, i]: i < nc(t)."""
    nc = torch.tensor([num_visible_cmp_blocks(t, l, d) for t in range(length)],
                      dtype=torch.long, device=device)
    return _positions(tc, device).unsqueeze(0) < nc.unsqueeze(1)


# --------------------------------------------------------------------------------------
# Compression
# --------------------------------------------------------------------------------------


def mean_compress(x: Tensor, cmp_block_size: int, cmp_stride: int,
                  cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """The default phi: compressed block i is the mean of rows [i*d, i*d + l).

    Batch mode: ``x [B,T,H,D] -> [B, Tc(T), H, D]``.
    Varlen: ``x [1,total,H,D] -> [1, total // d, H, D]``; sequence m's blocks start at row
    ``sum_{m'<m} Tc(len_m')`` and the rows after the last packed block are zero.
    ``total // d`` is a shape-only upper bound on ``sum Tc(len_m)`` (see
    ``packed_cmp_rows_bound``), so the CUDA op can size its output without a device sync.
    """
    l, d = cmp_block_size, cmp_stride
    _check_cmp_sizes(l, d)
    _check_rank4("x", x)

    def compress(rows: Tensor) -> Tensor:  # [n, H, D] -> [Tc(n), H, D]
        tc = num_cmp_blocks(rows.shape[0], l, d)
        if tc == 0:
            return rows.new_zeros(0, *rows.shape[1:])
        return rows.unfold(0, l, d).mean(dim=-1)  # unfold puts the window last

    if cu_seqlens is None:
        out = [compress(x[b]) for b in range(x.shape[0])]
        return torch.stack(out) if out else x.new_zeros(0, num_cmp_blocks(x.shape[1], l, d),
                                                         *x.shape[2:])
    parts = [compress(_rows(x, seq)) for seq in _sequences(x, cu_seqlens, l, d)]
    bound = packed_cmp_rows_bound(x.shape[1], d)
    used = sum(p.shape[0] for p in parts)
    parts.append(x.new_zeros(bound - used, *x.shape[2:]))
    return torch.cat(parts, dim=0).unsqueeze(0)


# --------------------------------------------------------------------------------------
# Branch 1: compressed attention
# --------------------------------------------------------------------------------------


def compressed_attn(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, cmp_block_size: int,
                    cmp_stride: int, scale: Optional[float] = None,
                    cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Query t attends to compressed rows i < nc(t). Returns (o [B,T,Hq,Dv], lse [B,Hq,T]).

    ``k_cmp``/``v_cmp`` may hold more rows than Tc(T); the extra rows are never visible.
    """
    l, d = cmp_block_size, cmp_stride
    _check_cmp_sizes(l, d)
    _check_kv(q, k_cmp, v_cmp, "k_cmp", "v_cmp", same_len=False)
    scale = _default_scale(q, scale)
    o, lse = _new_outputs(q, v_cmp.shape[-1])
    for seq in _sequences(q, cu_seqlens, l, d):
        kc = _cmp_rows(k_cmp, seq, l, d, "k_cmp")
        vc = _cmp_rows(v_cmp, seq, l, d, "v_cmp")
        mask = _cmp_mask(seq.length, kc.shape[0], l, d, q.device)
        _store(o, lse, seq, *_masked_attention(_rows(q, seq), kc, vc, mask, scale))
    return o, lse


# --------------------------------------------------------------------------------------
# Block selection
# --------------------------------------------------------------------------------------


def select_blocks(q: Tensor, k_cmp: Tensor, cmp_block_size: int, cmp_stride: int,
                  slc_block_size: int, slc_num_blocks: int, slc_init_blocks: int,
                  slc_local_blocks: int, scale: Optional[float] = None,
                  cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Top-n selection blocks per query and kv group, from the compressed attention.

    Returns ``block_indices`` int32 ``[B,T,Hkv,n]`` (ascending, then -1) and ``scores``,
    the group score S as float ``[B,T,Hkv,ceil(T/l')]`` (varlen: ``[1,total,Hkv,
    ceil(max_len/l')]``) with -inf for the non-candidates j > J = t // l'.
    """
    l, d, lp = cmp_block_size, cmp_stride, slc_block_size
    n, n_init, n_local = slc_num_blocks, slc_init_blocks, slc_local_blocks
    _check_cmp_sizes(l, d)
    _check_slc_sizes(d, lp, n, n_init, n_local)
    _check_rank4("q", q)
    _check_rank4("k_cmp", k_cmp)
    if k_cmp.dtype != q.dtype or k_cmp.device != q.device or k_cmp.shape[0] != q.shape[0] \
            or k_cmp.shape[3] != q.shape[3] or k_cmp.shape[2] == 0 or q.shape[2] % k_cmp.shape[2]:
        raise ValueError(f"k_cmp must be [B, Tc, Hkv, Dk] with B = {q.shape[0]}, Dk = {q.shape[3]}, "
                         f"Hkv dividing Hq = {q.shape[2]}, dtype {q.dtype} and device {q.device}; "
                         f"got {tuple(k_cmp.shape)} {k_cmp.dtype} {k_cmp.device}")
    scale = _default_scale(q, scale)
    B, T, Hq, _ = q.shape
    Hkv = k_cmp.shape[2]
    G = Hq // Hkv
    dtype = torch.promote_types(q.dtype, torch.float32)  # a discrete choice: no fp16 scores
    lens = _seqlens(q, cu_seqlens)
    width = num_slc_blocks(T if lens is None else max(lens, default=0), lp)

    indices = torch.full((B, T, Hkv, n), -1, dtype=torch.int32, device=q.device)
    scores = torch.full((B, T, Hkv, width), float("-inf"), dtype=dtype, device=q.device)
    with torch.no_grad():
        for seq in _sequences(q, cu_seqlens, l, d):
            qs = _rows(q, seq).to(dtype)
            kc = _cmp_rows(k_cmp, seq, l, d, "k_cmp").to(dtype)
            nb = num_slc_blocks(seq.length, lp)
            # 1. P from branch 1 (all zero when nc(t) = 0)
            mask = _cmp_mask(seq.length, kc.shape[0], l, d, q.device)
            p, _ = _masked_softmax(_scores(qs, kc, scale), mask)  # [Hq, t, i]
            # 2-3. overlap weights, summed over i and over the G heads of each group
            w = cmp_slc_overlap_weights(kc.shape[0], nb, l, d, lp, dtype=dtype, device=q.device)
            s = (p @ w).view(Hkv, G, seq.length, nb).sum(dim=1).permute(1, 0, 2)  # [t, g, j]
            # 4. candidates j <= J, forced blocks first, then the highest S
            j = _positions(nb, q.device)
            J = torch.tensor([last_candidate_slc_block(t, lp) for t in range(seq.length)],
                             dtype=torch.long, device=q.device).view(-1, 1, 1)
            candidate = (j <= J).expand_as(s)
            forced = is_forced_slc_block(j, J, n_init, n_local).expand_as(s)
            key = torch.where(forced, float("inf"), torch.where(candidate, s, float("-inf")))
            # a stable descending sort keeps equal keys in ascending j: ties go to smaller j
            order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :n]
            chosen = torch.where(candidate.gather(-1, order), order, nb)  # nb: empty slot
            # 5. ascending, the empty slots (nb, the largest value) at the end become -1
            chosen = torch.sort(chosen, dim=-1).values
            chosen = torch.where(chosen == nb, -1, chosen).to(torch.int32)
            rows = slice(seq.start, seq.start + seq.length)
            indices[seq.batch, rows, :, :chosen.shape[-1]] = chosen
            scores[seq.batch, rows, :, :nb] = torch.where(candidate, s, float("-inf"))
    return indices, scores


# --------------------------------------------------------------------------------------
# Branch 2: selected attention
# --------------------------------------------------------------------------------------


def _check_block_indices(block_indices: Tensor, q: Tensor, Hkv: int) -> None:
    if not isinstance(block_indices, Tensor) or block_indices.dtype not in (torch.int32, torch.int64):
        raise TypeError("block_indices must be an int32 (or int64) tensor")
    B, T = q.shape[:2]
    if block_indices.dim() != 4 or tuple(block_indices.shape[:3]) != (B, T, Hkv):
        raise ValueError(f"block_indices must have shape [B, T, Hkv, n] = [{B}, {T}, {Hkv}, n], "
                         f"got {tuple(block_indices.shape)}")
    if block_indices.device != q.device:
        raise ValueError(f"block_indices must be on the device of q ({q.device})")


def _slc_mask(block_indices: Tensor, length: int, lp: int, device) -> Tensor:
    """[g, t, s]: s <= t and block s // lp is listed in block_indices[t, g]."""
    nb = num_slc_blocks(length, lp)
    bi = block_indices.long()
    # unused slots (negative or out of range) are redirected to a spare column nb
    bi = torch.where((bi >= 0) & (bi < nb), bi, nb)
    listed = torch.zeros(*bi.shape[:2], nb + 1, dtype=torch.bool, device=device)
    listed.scatter_(-1, bi, True)  # duplicates just set the same flag again
    key_block = _positions(length, device) // lp
    mask = listed[..., key_block]  # [t, g, s]
    return mask.permute(1, 0, 2) & _causal_mask(length, device)


def selected_attn(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, slc_block_size: int,
                  scale: Optional[float] = None,
                  cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Query t, head h attends to keys s <= t whose block s // l' is in block_indices[t, h//G].

    Entries < 0 or >= ceil(len / l') are unused slots; duplicates count once; any order.
    A query whose listed blocks are all in its future gets o = 0, lse = -inf.
    """
    lp = slc_block_size
    _check_positive(slc_block_size=lp)
    _check_kv(q, k, v)
    Hkv = k.shape[2]
    G = q.shape[2] // Hkv
    _check_block_indices(block_indices, q, Hkv)
    scale = _default_scale(q, scale)
    o, lse = _new_outputs(q, v.shape[-1])
    for seq in _sequences(q, cu_seqlens):
        mask = _slc_mask(_rows(block_indices, seq), seq.length, lp, q.device)
        mask = mask.repeat_interleave(G, dim=0)  # per kv group -> per query head
        _store(o, lse, seq, *_masked_attention(_rows(q, seq), _rows(k, seq), _rows(v, seq),
                                               mask, scale))
    return o, lse


# --------------------------------------------------------------------------------------
# Branch 3: sliding window
# --------------------------------------------------------------------------------------


def window_attn(q: Tensor, k: Tensor, v: Tensor, window_size: int,
                scale: Optional[float] = None,
                cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Query t attends to keys window_begin(t, w) <= s <= t (exactly min(w, t+1) keys)."""
    _check_positive(window_size=window_size)
    _check_kv(q, k, v)
    scale = _default_scale(q, scale)
    o, lse = _new_outputs(q, v.shape[-1])
    for seq in _sequences(q, cu_seqlens):
        begin = torch.tensor([window_begin(t, window_size) for t in range(seq.length)],
                             dtype=torch.long, device=q.device)
        s = _positions(seq.length, q.device)
        mask = (s.unsqueeze(0) >= begin.unsqueeze(1)) & _causal_mask(seq.length, q.device)
        _store(o, lse, seq, *_masked_attention(_rows(q, seq), _rows(k, seq), _rows(v, seq),
                                               mask, scale))
    return o, lse


# --------------------------------------------------------------------------------------
# The whole layer
# --------------------------------------------------------------------------------------


def _check_gate(name: str, g: Optional[Tensor], q: Tensor) -> None:
    if g is None:
        return
    if not isinstance(g, Tensor) or not g.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor or None")
    if tuple(g.shape) != tuple(q.shape[:3]):
        raise ValueError(f"{name} must have shape [B, T, Hq] = {list(q.shape[:3])}, "
                         f"got {list(g.shape)}")
    if g.device != q.device:
        raise ValueError(f"{name} must be on the device of q ({q.device})")


def sparse_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g_cmp: Optional[Tensor],
    g_slc: Optional[Tensor],
    g_win: Optional[Tensor],
    k_cmp: Optional[Tensor] = None,
    v_cmp: Optional[Tensor] = None,
    *,
    cmp_block_size: int = 32,
    cmp_stride: int = 16,
    slc_block_size: int = 64,
    slc_num_blocks: int = 16,
    slc_init_blocks: int = 1,
    slc_local_blocks: int = 2,
    window_size: int = 512,
    scale: Optional[float] = None,
    block_indices: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
    return_aux: bool = False,
):
    """o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win (the spec's public API).

    ``k_cmp``/``v_cmp`` None: mean compression of k, v. A gate None turns its branch off
    (its aux entries are None); the compressed branch still runs, unreported, when the
    selection needs it (g_slc given, block_indices None). With every gate None, o is zeros.
    ``max_seqlen`` only spares the kernels a device sync; the reference ignores it.
    ``aux`` (with ``return_aux=True``): block_indices (int32, the ones the selected
    branch used, None when it is off), o_cmp, o_slc, o_win, lse_cmp, lse_slc, lse_win.
    """
    del max_seqlen
    l, d = cmp_block_size, cmp_stride
    _check_kv(q, k, v)
    _check_cmp_sizes(l, d)
    _check_slc_sizes(d, slc_block_size, slc_num_blocks, slc_init_blocks, slc_local_blocks)
    _check_positive(window_size=window_size)
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_win", g_win)):
        _check_gate(name, g, q)
    if (k_cmp is None) != (v_cmp is None):
        raise ValueError("pass both k_cmp and v_cmp, or neither")
    _seqlens(q, cu_seqlens)  # validate once up front
    if block_indices is not None:
        _check_block_indices(block_indices, q, k.shape[2])

    aux = dict.fromkeys(("block_indices", "o_cmp", "o_slc", "o_win",
                         "lse_cmp", "lse_slc", "lse_win"))
    need_selection = g_slc is not None and block_indices is None
    if (g_cmp is not None or need_selection) and k_cmp is None:
        k_cmp = mean_compress(k, l, d, cu_seqlens)
        v_cmp = mean_compress(v, l, d, cu_seqlens)

    o = q.new_zeros(*q.shape[:3], v.shape[-1])
    if g_cmp is not None:
        aux["o_cmp"], aux["lse_cmp"] = compressed_attn(q, k_cmp, v_cmp, l, d, scale, cu_seqlens)
        o = o + g_cmp.unsqueeze(-1) * aux["o_cmp"]
    if g_slc is not None:
        if block_indices is None:
            block_indices, _ = select_blocks(q, k_cmp, l, d, slc_block_size, slc_num_blocks,
                                             slc_init_blocks, slc_local_blocks, scale, cu_seqlens)
        aux["block_indices"] = block_indices.to(torch.int32)
        aux["o_slc"], aux["lse_slc"] = selected_attn(q, k, v, block_indices, slc_block_size,
                                                     scale, cu_seqlens)
        o = o + g_slc.unsqueeze(-1) * aux["o_slc"]
    if g_win is not None:
        aux["o_win"], aux["lse_win"] = window_attn(q, k, v, window_size, scale, cu_seqlens)
        o = o + g_win.unsqueeze(-1) * aux["o_win"]
    o = o.to(q.dtype)
    return (o, aux) if return_aux else o
