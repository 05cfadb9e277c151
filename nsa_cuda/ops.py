"""Fake (meta) kernels and autograd for the ops that csrc/api/ops.cpp defines.

The ops live in the TORCH_LIBRARY namespace ``nsa_cuda``; the C++ backends
(CPU, CUDA) implement them. Here each op gets a fake kernel (shapes only, so
torch.compile and meta tensors work) and, where it has one, a backward built
from the matching ``*_bwd`` op.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library and its registrations)

ops = torch.ops.nsa_cuda


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fwd_outputs(q: torch.Tensor, v: torch.Tensor):
    o = q.new_empty((*q.shape[:3], v.shape[3]))
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=_lse_dtype(q))
    return o, lse


# --- fake kernels -----------------------------------------------------------------------

@torch.library.register_fake("nsa_cuda::mean_compress")
def _(x, cu_seqlens, cmp_block_size, cmp_stride):
    t = x.shape[1]
    if cu_seqlens is not None:
        rows = t // cmp_stride
    else:
        rows = 0 if t < cmp_block_size else (t - cmp_block_size) // cmp_stride + 1
    return x.new_empty((x.shape[0], rows, x.shape[2], x.shape[3]))


@torch.library.register_fake("nsa_cuda::mean_compress_bwd")
def _(grad_cmp, x, cu_seqlens, cmp_block_size, cmp_stride):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("nsa_cuda::compressed_attn_fwd")
def _(q, k_cmp, v_cmp, cu_seqlens, max_seqlen, cmp_block_size, cmp_stride, scale):
    return _fwd_outputs(q, v_cmp)


@torch.library.register_fake("nsa_cuda::selected_attn_fwd")
def _(q, k, v, block_indices, cu_seqlens, max_seqlen, slc_block_size, scale):
    return _fwd_outputs(q, v)


@torch.library.register_fake("nsa_cuda::window_attn_fwd")
def _(q, k, v, cu_seqlens, max_seqlen, window_size, scale):
    return _fwd_outputs(q, v)


def _bwd_fake(q, k, v):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.register_fake("nsa_cuda::compressed_attn_bwd")
def _(dout, dlse, q, k_cmp, v_cmp, o, lse, cu_seqlens, max_seqlen, cmp_block_size, cmp_stride,
      scale, dq_in=None, dk_in=None, dv_in=None, delta=None, dout_scale=None):
    return _bwd_fake(q, k_cmp, v_cmp)


@torch.library.register_fake("nsa_cuda::selected_attn_bwd")
def _(dout, dlse, q, k, v, block_indices, o, lse, cu_seqlens, max_seqlen, slc_block_size, scale,
      dq_in=None, dk_in=None, dv_in=None, delta=None, dout_scale=None):
    return _bwd_fake(q, k, v)


@torch.library.register_fake("nsa_cuda::window_attn_bwd")
def _(dout, dlse, q, k, v, o, lse, cu_seqlens, max_seqlen, window_size, scale, dq_in=None,
      dk_in=None, dv_in=None, delta=None, dout_scale=None):
    return _bwd_fake(q, k, v)


@torch.library.register_fake("nsa_cuda::select_blocks")
def _(q, k_cmp, lse_cmp, cu_seqlens, max_seqlen, cmp_block_size, cmp_stride, slc_block_size,
      slc_num_blocks, slc_init_blocks, slc_local_blocks, scale):
    return q.new_empty((q.shape[0], q.shape[1], k_cmp.shape[2], slc_num_blocks), dtype=torch.int32)


# Decode (KV cache): forward only, shapes follow q's S new tokens.
@torch.library.register_fake("nsa_cuda::compressed_attn_decode")
def _(q, k_cmp, v_cmp, seqlens_k, cmp_block_size, cmp_stride, scale):
    return _fwd_outputs(q, v_cmp)


@torch.library.register_fake("nsa_cuda::selected_attn_decode")
def _(q, k, v, block_indices, seqlens_k, slc_block_size, scale):
    return _fwd_outputs(q, v)


@torch.library.register_fake("nsa_cuda::window_attn_decode")
def _(q, k, v, seqlens_k, window_size, scale):
    return _fwd_outputs(q, v)


@torch.library.register_fake("nsa_cuda::select_blocks_decode")
def _(q, k_cmp, lse_cmp, seqlens_k, cmp_block_size, cmp_stride, slc_block_size,
      slc_num_blocks, slc_init_blocks, slc_local_blocks, scale):
    return q.new_empty((q.shape[0], q.shape[1], k_cmp.shape[2], slc_num_blocks), dtype=torch.int32)


@torch.library.register_fake("nsa_cuda::compressed_select_decode")
def _(q, k_cmp, v_cmp, seqlens_k, cmp_block_size, cmp_stride, slc_block_size, slc_num_blocks,
      slc_init_blocks, slc_local_blocks, scale):
    o, lse = _fwd_outputs(q, v_cmp)
    bi = q.new_empty((q.shape[0], q.shape[1], k_cmp.shape[2], slc_num_blocks), dtype=torch.int32)
    return o, lse, bi


@torch.library.register_fake("nsa_cuda::sparse_attn_decode")
def _(q, k_slc, v_slc, k_win, v_win, k_cmp, v_cmp, seqlens_k, g_cmp, g_slc, g_win,
      block_indices, cmp_block_size, cmp_stride, slc_block_size, slc_num_blocks,
      slc_init_blocks, slc_local_blocks, window_size, scale):
    return q.new_empty((*q.shape[:3], v_slc.shape[3]))


@torch.library.register_fake("nsa_cuda::append_kv_to_cache")
def _(k_cache, v_cache, cache_seqlens, k_new, v_new, k_cmp_cache=None, v_cmp_cache=None,
      cmp_block_size=0, cmp_stride=0):
    return None


@torch.library.register_fake("nsa_cuda::gate_combine")
def _(outputs, gates):
    return outputs[0].new_empty(outputs[0].shape)


@torch.library.register_fake("nsa_cuda::gate_combine_bwd")
def _(grad, outputs, gates, row_dots=False, output_grads=True):
    dots = [o.new_empty((o.shape[0], o.shape[2], o.shape[1]), dtype=_lse_dtype(o))
            for o in outputs] if row_dots else []
    d_outputs = [o.new_empty(o.shape) for o in outputs] if output_grads else []
    return d_outputs + [g.new_empty(g.shape) for g in gates] + dots


@torch.library.register_fake("nsa_cuda::update_cmp_cache")
def _(x, x_cmp, cache_seqlens, num_new, cmp_block_size, cmp_stride):
    return None


# --- autograd ---------------------------------------------------------------------------

def _register_attention_autograd(name: str, num_index_inputs: int) -> None:
    """Backward of ``nsa_cuda::{name}_fwd`` through ``nsa_cuda::{name}_bwd``.

    The forward's inputs are ``(q, k, v, *index_tensors, cu_seqlens, *sizes)`` and the
    backward's ``(dout, dlse, q, k, v, *index_tensors, o, lse, cu_seqlens, *sizes)``.
    """
    bwd_name = f"{name}_bwd"
    num_saved = 3 + num_index_inputs

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:num_saved], *output)
        ctx.cu_seqlens = inputs[num_saved]
        ctx.sizes = inputs[num_saved + 1:]
        ctx.num_inputs = len(inputs)

    def backward(ctx, grad_o, grad_lse):
        *inputs, o, lse = ctx.saved_tensors
        dq, dk, dv = getattr(ops, bwd_name)(grad_o, grad_lse, *inputs, o, lse, ctx.cu_seqlens,
                                            *ctx.sizes)
        return (dq, dk, dv) + (None,) * (ctx.num_inputs - 3)

    torch.library.register_autograd(f"nsa_cuda::{name}_fwd", backward,
                                    setup_context=setup_context)


_register_attention_autograd("compressed_attn", num_index_inputs=0)
_register_attention_autograd("selected_attn", num_index_inputs=1)  # block_indices
_register_attention_autograd("window_attn", num_index_inputs=0)


def _mean_compress_setup(ctx, inputs, output):
    x, cu_seqlens, cmp_block_size, cmp_stride = inputs
    ctx.save_for_backward(x)
    ctx.args = (cu_seqlens, cmp_block_size, cmp_stride)


def _mean_compress_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return ops.mean_compress_bwd(grad, x, *ctx.args), None, None, None


torch.library.register_autograd("nsa_cuda::mean_compress", _mean_compress_backward,
                                setup_context=_mean_compress_setup)


def _select_setup(ctx, inputs, output):
    pass


def _select_backward(ctx, grad):
    # Selection is a discrete choice: no gradient flows through it (spec).
    return (None,) * 12


torch.library.register_autograd("nsa_cuda::select_blocks", _select_backward,
                                setup_context=_select_setup)


def _gate_combine_setup(ctx, inputs, output):
    outputs, gates = inputs
    ctx.save_for_backward(*outputs, *gates)
    ctx.num_branches = len(outputs)


def _gate_combine_backward(ctx, grad):
    saved, n = ctx.saved_tensors, ctx.num_branches
    grads = ops.gate_combine_bwd(grad, list(saved[:n]), list(saved[n:]))
    return list(grads[:n]), list(grads[n:])


torch.library.register_autograd("nsa_cuda::gate_combine", _gate_combine_backward,
                                setup_context=_gate_combine_setup)
