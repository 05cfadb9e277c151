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
      scale):
    return _bwd_fake(q, k_cmp, v_cmp)


@torch.library.register_fake("nsa_cuda::selected_attn_bwd")
def _(dout, dlse, q, k, v, block_indices, o, lse, cu_seqlens, max_seqlen, slc_block_size, scale):
    return _bwd_fake(q, k, v)


@torch.library.register_fake("nsa_cuda::window_attn_bwd")
def _(dout, dlse, q, k, v, o, lse, cu_seqlens, max_seqlen, window_size, scale):
    return _bwd_fake(q, k, v)


@torch.library.register_fake("nsa_cuda::select_blocks")
def _(q, k_cmp, lse_cmp, cu_seqlens, max_seqlen, cmp_block_size, cmp_stride, slc_block_size,
      slc_num_blocks, slc_init_blocks, slc_local_blocks, scale):
    return q.new_empty((q.shape[0], q.shape[1], k_cmp.shape[2], slc_num_blocks), dtype=torch.int32)


# --- autograd ---------------------------------------------------------------------------

def _require_backward_kernel(op_name: str, t: torch.Tensor) -> None:
    key = "CUDA" if t.device.type == "cuda" else "CPU"
    if t.device.type in ("cpu", "cuda") and not torch._C._dispatch_has_kernel_for_dispatch_key(
            f"nsa_cuda::{op_name}", key):
        raise NotImplementedError(
            f"nsa_cuda::{op_name} has no {key} kernel in this build: the {key} backward is not "
            "available (see the README's support matrix)")


def _compressed_setup(ctx, inputs, output):
    q, k_cmp, v_cmp, cu_seqlens, *static = inputs
    ctx.save_for_backward(q, k_cmp, v_cmp, *output)
    ctx.cu_seqlens = cu_seqlens
    ctx.static = static


def _compressed_backward(ctx, grad_o, grad_lse):
    q, k_cmp, v_cmp, o, lse = ctx.saved_tensors
    _require_backward_kernel("compressed_attn_bwd", q)
    dq, dk, dv = ops.compressed_attn_bwd(grad_o, grad_lse, q, k_cmp, v_cmp, o, lse,
                                         ctx.cu_seqlens, *ctx.static)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("nsa_cuda::compressed_attn_fwd", _compressed_backward,
                                setup_context=_compressed_setup)


def _selected_setup(ctx, inputs, output):
    q, k, v, block_indices, cu_seqlens, *static = inputs
    ctx.save_for_backward(q, k, v, block_indices, *output)
    ctx.cu_seqlens = cu_seqlens
    ctx.static = static


def _selected_backward(ctx, grad_o, grad_lse):
    q, k, v, block_indices, o, lse = ctx.saved_tensors
    _require_backward_kernel("selected_attn_bwd", q)
    dq, dk, dv = ops.selected_attn_bwd(grad_o, grad_lse, q, k, v, block_indices, o, lse,
                                       ctx.cu_seqlens, *ctx.static)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("nsa_cuda::selected_attn_fwd", _selected_backward,
                                setup_context=_selected_setup)


def _window_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, *static = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.cu_seqlens = cu_seqlens
    ctx.static = static


def _window_backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse = ctx.saved_tensors
    _require_backward_kernel("window_attn_bwd", q)
    dq, dk, dv = ops.window_attn_bwd(grad_o, grad_lse, q, k, v, o, lse, ctx.cu_seqlens,
                                     *ctx.static)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("nsa_cuda::window_attn_fwd", _window_backward,
                                setup_context=_window_setup)


def _mean_compress_setup(ctx, inputs, output):
    x, cu_seqlens, cmp_block_size, cmp_stride = inputs
    ctx.save_for_backward(x)
    ctx.args = (cu_seqlens, cmp_block_size, cmp_stride)


def _mean_compress_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    _require_backward_kernel("mean_compress_bwd", x)
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
