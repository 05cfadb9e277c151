"""The public functions: validate, then call the registered ops.

Each function checks its arguments (``_validate``), fills defaults and calls a
custom op of the ``nsa_cuda`` library, so it runs on whatever backend the tensors
live on and composes with autograd and torch.compile.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _validate as check
from .ops import ops

Tensor = torch.Tensor


def mean_compress(x: Tensor, cmp_block_size: int, cmp_stride: int,
                  cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """Mean of each compressed block's ``l`` rows: ``[B, T, H, D] -> [B, Tc(T), H, D]``.

    Block ``i`` covers rows ``[i*d, i*d + l)``. In varlen mode (``cu_seqlens``,
    ``x`` is ``[1, total, H, D]``) sequence ``m``'s blocks start at row
    ``sum_{m'<m} Tc(len_m')`` and the output has ``total // cmp_stride`` rows, a
    bound known without a device sync; rows past the last block are zero.
    """
    check.tensor("x", x, 4)
    check.dtype("x", x)
    check.last_dim_contiguous("x", x)
    check.nsa_sizes(cmp_block_size=cmp_block_size, cmp_stride=cmp_stride)
    if cmp_block_size % cmp_stride:
        raise ValueError(f"cmp_stride={cmp_stride} must divide cmp_block_size={cmp_block_size}")
    check.cu_seqlens(cu_seqlens, x, None if cu_seqlens is None else x.shape[1])
    return ops.mean_compress(x, cu_seqlens, cmp_block_size, cmp_stride)


def compressed_attn(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, *, cmp_block_size: int = 32,
                    cmp_stride: int = 16, scale: Optional[float] = None,
                    cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None):
    """Branch 1: query ``t`` attends to the compressed blocks that ended at or before ``t``.

    Returns ``(o [B, T, Hq, Dv], lse [B, Hq, T])``; rows with no visible block give
    ``o = 0`` and ``lse = -inf``.
    """
    check.nsa_sizes(cmp_block_size=cmp_block_size, cmp_stride=cmp_stride)
    check.compressed_kv(q, k_cmp, v_cmp, cmp_block_size, cmp_stride, cu_seqlens is not None)
    max_seqlen = check.cu_seqlens(cu_seqlens, q, max_seqlen)
    return ops.compressed_attn_fwd(q, k_cmp, v_cmp, cu_seqlens, max_seqlen, cmp_block_size,
                                   cmp_stride, check.scale(scale, q.shape[3]))


def select_blocks(q: Tensor, k_cmp: Tensor, lse_cmp: Tensor, *, cmp_block_size: int = 32,
                  cmp_stride: int = 16, slc_block_size: int = 64, slc_num_blocks: int = 16,
                  slc_init_blocks: int = 1, slc_local_blocks: int = 2,
                  scale: Optional[float] = None, cu_seqlens: Optional[Tensor] = None,
                  max_seqlen: Optional[int] = None) -> Tensor:
    """Top-n selection blocks per token and KV head, from the compressed scores.

    ``lse_cmp`` is the compressed branch's log-sum-exp (``compressed_attn``'s second
    output). Returns ``block_indices [B, T, Hkv, slc_num_blocks]`` int32: ascending,
    padded with -1. Not differentiable (a discrete choice).
    """
    check.nsa_sizes(cmp_block_size=cmp_block_size, cmp_stride=cmp_stride,
                    slc_block_size=slc_block_size, slc_num_blocks=slc_num_blocks,
                    slc_init_blocks=slc_init_blocks, slc_local_blocks=slc_local_blocks)
    check.compressed_kv(q, k_cmp, None, cmp_block_size, cmp_stride, cu_seqlens is not None)
    check.tensor("lse_cmp", lse_cmp, 3)
    expected = (q.shape[0], q.shape[2], q.shape[1])
    if tuple(lse_cmp.shape) != expected:
        raise ValueError(f"lse_cmp must have shape [B, Hq, T] = {list(expected)}, "
                         f"got {tuple(lse_cmp.shape)}")
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if lse_cmp.dtype != lse_dtype:
        raise TypeError(f"lse_cmp must be {lse_dtype} for {q.dtype} inputs, got {lse_cmp.dtype}")
    check.same_device(q=q, lse_cmp=lse_cmp)
    max_seqlen = check.cu_seqlens(cu_seqlens, q, max_seqlen)
    return ops.select_blocks(q, k_cmp, lse_cmp.contiguous(), cu_seqlens, max_seqlen,
                             cmp_block_size, cmp_stride, slc_block_size, slc_num_blocks,
                             slc_init_blocks, slc_local_blocks, check.scale(scale, q.shape[3]))


def selected_attn(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, *,
                  slc_block_size: int = 64, scale: Optional[float] = None,
                  cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None):
    """Branch 2: query ``t`` of head ``h`` attends to keys ``s <= t`` in the blocks
    listed in ``block_indices[t, h // G]`` (any order; -1 or out-of-range = unused).

    Returns ``(o [B, T, Hq, Dv], lse [B, Hq, T])``.
    """
    check.nsa_sizes(slc_block_size=slc_block_size)
    check.qkv(q, k, v)
    check.same_rows(q, k)
    block_indices = check.block_indices(block_indices, q, k.shape[2])
    max_seqlen = check.cu_seqlens(cu_seqlens, q, max_seqlen)
    return ops.selected_attn_fwd(q, k, v, block_indices, cu_seqlens, max_seqlen, slc_block_size,
                                 check.scale(scale, q.shape[3]))


def window_attn(q: Tensor, k: Tensor, v: Tensor, *, window_size: int = 512,
                scale: Optional[float] = None, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None):
    """Branch 3: query ``t`` attends to keys ``max(0, t - w + 1) <= s <= t``.

    Returns ``(o [B, T, Hq, Dv], lse [B, Hq, T])``.
    """
    check.nsa_sizes(window_size=window_size)
    check.qkv(q, k, v)
    check.same_rows(q, k)
    max_seqlen = check.cu_seqlens(cu_seqlens, q, max_seqlen)
    return ops.window_attn_fwd(q, k, v, cu_seqlens, max_seqlen, window_size,
                               check.scale(scale, q.shape[3]))


def gate_combine(outputs, gates) -> Tensor:
    """``sum_j gates[j] * outputs[j]``: the gated sum that ends ``sparse_attn``.

    ``outputs``: 1 to 3 branch outputs ``[B, T, Hq, Dv]`` of one shape and dtype;
    ``gates``: one ``[B, T, Hq]`` floating-point tensor per output, read in float32
    (float64 for float64 outputs). One kernel forward and one backward (the
    outputs' and the gates' gradients), each a single pass over memory, with one
    rounding per element. Differentiable.
    """
    outputs, gates = list(outputs), list(gates)
    if not 1 <= len(outputs) <= 3 or len(gates) != len(outputs):
        raise ValueError(f"gate_combine takes 1 to 3 outputs and one gate per output, got "
                         f"{len(outputs)} outputs and {len(gates)} gates")
    for j, (o, g) in enumerate(zip(outputs, gates)):
        check.tensor(f"outputs[{j}]", o, 4)
        check.tensor(f"gates[{j}]", g)
        if g.device != o.device:
            raise RuntimeError(f"gates[{j}] is on {g.device} but outputs[{j}] is on {o.device}")
        check.gate(f"gates[{j}]", g, o)
    return ops.gate_combine(outputs, gates)


def _combine_branches(q: Tensor, dv: int, aux: dict, g_cmp, g_slc, g_win) -> Tensor:
    """``g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`` over the branches that are on."""
    on = [(aux[name], gate) for name, gate in
          (("o_cmp", g_cmp), ("o_slc", g_slc), ("o_win", g_win)) if gate is not None]
    if not on:
        return q.new_zeros((*q.shape[:3], dv))
    return ops.gate_combine([o for o, _ in on], [g for _, g in on])


def sparse_attn(q: Tensor, k: Tensor, v: Tensor, g_cmp: Optional[Tensor],
                g_slc: Optional[Tensor], g_win: Optional[Tensor],
                k_cmp: Optional[Tensor] = None, v_cmp: Optional[Tensor] = None, *,
                cmp_block_size: int = 32, cmp_stride: int = 16, slc_block_size: int = 64,
                slc_num_blocks: int = 16, slc_init_blocks: int = 1, slc_local_blocks: int = 2,
                window_size: int = 512, scale: Optional[float] = None,
                block_indices: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None, return_aux: bool = False):
    """Native Sparse Attention: ``o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win``.

    q ``[B, T, Hq, Dk]``, k ``[B, T, Hkv, Dk]``, v ``[B, T, Hkv, Dv]``; gates
    ``[B, T, Hq]`` (already activated; ``None`` turns a branch off). ``k_cmp``/``v_cmp``
    default to ``mean_compress`` of ``k``/``v``. ``block_indices`` skips selection.
    Varlen: ``cu_seqlens`` int32 ``[N+1]`` with q, k, v packed as ``[1, total, ...]``;
    pass ``max_seqlen`` to avoid a device sync. ``return_aux=True`` returns
    ``(o, aux)`` with the branch outputs, their lse and the block indices.
    """
    g, dk, dv = check.qkv(q, k, v)
    check.same_rows(q, k)
    check.nsa_sizes(cmp_block_size, cmp_stride, slc_block_size, slc_num_blocks,
                    slc_init_blocks, slc_local_blocks, window_size)
    g_cmp, g_slc, g_win = (check.gate(n, x, q) for n, x in
                           (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_win", g_win)))
    max_seqlen = check.cu_seqlens(cu_seqlens, q, max_seqlen)
    scale = check.scale(scale, dk)
    if (k_cmp is None) != (v_cmp is None):
        raise ValueError("pass both k_cmp and v_cmp, or neither (mean compression)")
    if block_indices is not None:
        block_indices = check.block_indices(block_indices, q, k.shape[2])

    need_cmp = g_cmp is not None or (g_slc is not None and block_indices is None)
    if need_cmp:
        if k_cmp is None:
            k_cmp = ops.mean_compress(k, cu_seqlens, cmp_block_size, cmp_stride)
            v_cmp = ops.mean_compress(v, cu_seqlens, cmp_block_size, cmp_stride)
        check.compressed_kv(q, k_cmp, v_cmp, cmp_block_size, cmp_stride, cu_seqlens is not None)
    else:
        k_cmp = v_cmp = None
    if g_cmp is None and g_slc is None and g_win is None:
        o = q.new_zeros((*q.shape[:3], dv))
        return (o, dict.fromkeys(_AUX_NAMES)) if return_aux else o

    # Which aux tensors the node returns: known before the call, from the arguments.
    aux_names = [n for n, on in (("o_cmp", g_cmp is not None), ("lse_cmp", g_cmp is not None),
                                 ("o_slc", g_slc is not None), ("lse_slc", g_slc is not None),
                                 ("o_win", g_win is not None), ("lse_win", g_win is not None),
                                 ("block_indices", g_slc is not None and block_indices is None))
                 if on] if return_aux else []
    sizes = _Sizes(cmp_block_size, cmp_stride, slc_block_size, slc_num_blocks, slc_init_blocks,
                   slc_local_blocks, window_size, max_seqlen, scale)
    o, *outs = _SparseAttn.apply(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, block_indices,
                                 cu_seqlens, sizes, tuple(aux_names))
    if not return_aux:
        return o
    aux = dict.fromkeys(_AUX_NAMES) | dict(zip(aux_names, outs))
    if g_slc is not None and block_indices is not None:
        aux["block_indices"] = block_indices
    return o, aux


_AUX_NAMES = ("block_indices", "o_cmp", "o_slc", "o_win", "lse_cmp", "lse_slc", "lse_win")


class _Sizes(NamedTuple):
    l: int
    d: int
    lp: int
    n: int
    n_init: int
    n_local: int
    w: int
    max_seqlen: int
    scale: float


class _SparseAttn(torch.autograd.Function):
    """sparse_attn as one autograd node, so that its backward runs the gated sum's
    gradient once and hands each branch's backward the dq, dk, dv that the branches
    before it left: the kernels add them (``dq_in`` ...), and no pass over memory sums
    the branches. Returns o, then the aux tensors named in ``aux_names``."""

    @staticmethod
    def forward(ctx, q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, block_indices, cu_seqlens,
                sizes: _Sizes, aux_names):
        z = sizes
        o_cmp = lse_cmp = o_slc = lse_slc = o_win = lse_win = None
        if k_cmp is not None:
            o_cmp, lse_cmp = ops.compressed_attn_fwd(q, k_cmp, v_cmp, cu_seqlens, z.max_seqlen,
                                                     z.l, z.d, z.scale)
        if g_slc is not None:
            if block_indices is None:
                block_indices = ops.select_blocks(q, k_cmp, lse_cmp, cu_seqlens, z.max_seqlen,
                                                  z.l, z.d, z.lp, z.n, z.n_init, z.n_local,
                                                  z.scale)
            o_slc, lse_slc = ops.selected_attn_fwd(q, k, v, block_indices, cu_seqlens,
                                                   z.max_seqlen, z.lp, z.scale)
        if g_win is not None:
            o_win, lse_win = ops.window_attn_fwd(q, k, v, cu_seqlens, z.max_seqlen, z.w, z.scale)
        if g_cmp is None:  # computed only to drive selection
            o_cmp = lse_cmp = None
        on = [(x, g) for x, g in ((o_cmp, g_cmp), (o_slc, g_slc), (o_win, g_win))
              if g is not None]
        o = ops.gate_combine([x for x, _ in on], [g for _, g in on])
        ctx.save_for_backward(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, block_indices,
                              cu_seqlens, o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win)
        ctx.sizes, ctx.aux_names = sizes, aux_names
        found = dict(o_cmp=o_cmp, lse_cmp=lse_cmp, o_slc=o_slc, lse_slc=lse_slc, o_win=o_win,
                     lse_win=lse_win, block_indices=block_indices)
        outs = [found[n] for n in aux_names]
        if "block_indices" in aux_names:
            ctx.mark_non_differentiable(found["block_indices"])
        return (o, *outs)

    @staticmethod
    def backward(ctx, d_o, *aux_grads):
        (q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, block_indices, cu, o_cmp, lse_cmp, o_slc,
         lse_slc, o_win, lse_win) = ctx.saved_tensors
        z = ctx.sizes
        extra = dict(zip(ctx.aux_names, aux_grads))  # gradients of the returned aux tensors
        names = [n for n, g in (("cmp", g_cmp), ("slc", g_slc), ("win", g_win)) if g is not None]
        outputs = {"cmp": o_cmp, "slc": o_slc, "win": o_win}
        gates = {"cmp": g_cmp, "slc": g_slc, "win": g_win}
        # The gradient of o_b is g_b * d o. Unless returned branch outputs add gradients
        # of their own, every branch backward takes the one d o and its gate
        # (dout_scale), so no g_b * d o is written, and the gate kernel gives each
        # branch its delta = rowsum(o_b * g_b d o), sparing the branch that pass.
        shared = all(extra.get(f"o_{n}") is None for n in names)
        branch_grads = any(ctx.needs_input_grad[:5])  # q, k, v, k_cmp, v_cmp
        write_d_o = branch_grads and not shared
        grads = ops.gate_combine_bwd(d_o, [outputs[n] for n in names],
                                     [gates[n] for n in names], branch_grads and shared,
                                     write_d_o)
        nb, nd = len(names), len(names) if write_d_o else 0
        d_gate = dict(zip(names, grads[nd:nd + nb]))
        gate_grads = (d_gate.get("cmp"), d_gate.get("slc"), d_gate.get("win"))
        if not branch_grads:  # only the gates train
            return (None,) * 5 + gate_grads + (None,) * 4
        if shared:
            d_out = dict.fromkeys(names, d_o.contiguous())  # once, not per branch
            delta = dict(zip(names, grads[nb:]))
            d_scale = {n: gates[n] for n in names}
        else:
            d_out = {n: d + extra[f"o_{n}"] if extra.get(f"o_{n}") is not None else d
                     for n, d in zip(names, grads[:nb])}
            delta, d_scale = {}, {}
        dq = dk = dv = dk_cmp = dv_cmp = None
        if "win" in names:
            dq, dk, dv = ops.window_attn_bwd(d_out["win"], extra.get("lse_win"), q, k, v, o_win,
                                             lse_win, cu, z.max_seqlen, z.w, z.scale,
                                             delta=delta.get("win"), dout_scale=d_scale.get("win"))
        if "slc" in names:
            dq, dk, dv = ops.selected_attn_bwd(d_out["slc"], extra.get("lse_slc"), q, k, v,
                                               block_indices, o_slc, lse_slc, cu, z.max_seqlen,
                                               z.lp, z.scale, dq, dk, dv, delta=delta.get("slc"),
                                               dout_scale=d_scale.get("slc"))
        if "cmp" in names:
            dq, dk_cmp, dv_cmp = ops.compressed_attn_bwd(
                d_out["cmp"], extra.get("lse_cmp"), q, k_cmp, v_cmp, o_cmp, lse_cmp, cu,
                z.max_seqlen, z.l, z.d, z.scale, dq, delta=delta.get("cmp"),
                dout_scale=d_scale.get("cmp"))
        return (dq, dk, dv, dk_cmp, dv_cmp) + gate_grads + (None,) * 4
