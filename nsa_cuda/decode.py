"""Decoding with a KV cache: ``sparse_attn_with_kvcache``.

In the style of ``flash_attn_with_kvcache``: the caches are preallocated
``[B, capacity, Hkv, D]`` tensors, ``cache_seqlens`` (int32 ``[B]``) says how many
tokens each batch entry holds, and a call appends ``k_new``/``v_new`` in place and
attends from the ``S`` new queries (1 to 8, e.g. speculative decoding), which sit
at the last ``S`` positions of their sequence. The compressed caches grow with
the token cache: each compressed block is written once, when its last token
arrives (``update_cmp_cache``), and never recomputed.

A query at position ``t`` sees exactly what the same query sees in a prefill
``sparse_attn`` call over the whole sequence, so decoding token by token
reproduces the prefill output (tests/test_decode.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _validate as check
from .api import _combine_branches
from .ops import ops

Tensor = torch.Tensor

# New tokens per call: decoding and speculative decoding. Longer prompts go through
# sparse_attn (prefill) and are written into the cache (see NativeSparseAttention).
MAX_DECODE_TOKENS = 8


def _num_cmp_blocks(t: int, l: int, d: int) -> int:
    return 0 if t < l else (t - l) // d + 1


def _capacity_checkable(t: Tensor) -> bool:
    """Values of a device tensor are read only where that is allowed and cheap enough:
    not under torch.compile, not while a CUDA graph is captured, not on fake tensors."""
    if check._is_tracing() or check._is_fake(t):
        return False
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_cache_room(cache_seqlens: Tensor, num_new: int, capacity: int,
                     max_cache_seqlen: Optional[int] = None) -> None:
    """Raises when a batch entry's cache cannot take ``num_new`` more tokens.

    With ``max_cache_seqlen`` (a host-side bound on ``cache_seqlens``) the check costs
    nothing. Without it, it reads ``cache_seqlens`` (one device sync on CUDA), except
    under torch.compile and during CUDA-graph capture, where it is skipped; the
    kernels then clamp reads to the capacity, so a full cache cannot make them read
    out of bounds."""
    if max_cache_seqlen is not None:
        if isinstance(max_cache_seqlen, bool) or not isinstance(max_cache_seqlen, int):
            raise TypeError(f"max_cache_seqlen must be an int, got {type(max_cache_seqlen).__name__}")
        if max_cache_seqlen + num_new > capacity:
            raise ValueError(
                f"KV cache full: the longest sequence holds up to {max_cache_seqlen} tokens "
                f"(max_cache_seqlen) and {num_new} new ones do not fit in a cache of capacity "
                f"{capacity}; allocate a larger cache or start a new sequence")
        return
    if not _capacity_checkable(cache_seqlens):
        return
    lens = cache_seqlens.tolist()
    for b, n in enumerate(lens):
        if n < 0:
            raise ValueError(f"cache_seqlens[{b}] = {n} is negative")
        if n + num_new > capacity:
            raise ValueError(
                f"KV cache full: batch entry {b} holds {n} tokens and {num_new} new ones do not "
                f"fit in a cache of capacity {capacity} (k_cache.shape[1]); allocate a larger "
                "cache or start a new sequence")


def append_to_cache(k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor,
                    cache_seqlens: Tensor, k_cmp_cache: Optional[Tensor] = None,
                    v_cmp_cache: Optional[Tensor] = None, cmp_block_size: int = 0,
                    cmp_stride: int = 0) -> None:
    """Writes ``k_new``/``v_new [B, S, Hkv, D]`` into ``k_cache``/``v_cache
    [B, capacity, Hkv, D]`` at rows ``cache_seqlens[b] + i``, in place: one kernel for
    both on CUDA, no host sync (CUDA-graph capturable). Rows past the capacity are
    dropped; only graph capture and torch.compile can get there, since eager calls
    check the room first. With ``k_cmp_cache``/``v_cmp_cache``, the same kernel also
    writes the mean of every compressed block the new tokens complete (what
    ``update_cmp_cache`` on each cache would write after the append)."""
    ops.append_kv_to_cache(k_cache, v_cache, cache_seqlens, k_new.to(k_cache.dtype),
                           v_new.to(v_cache.dtype), k_cmp_cache, v_cmp_cache, cmp_block_size,
                           cmp_stride)


def _decode_settings(cmp_block_size, cmp_stride, slc_block_size, slc_num_blocks,
                     slc_init_blocks, slc_local_blocks, window_size):
    check.nsa_sizes(cmp_block_size, cmp_stride, slc_block_size, slc_num_blocks,
                    slc_init_blocks, slc_local_blocks, window_size)


def decode_branches(q: Tensor, k_slc: Tensor, v_slc: Tensor, k_win: Tensor, v_win: Tensor,
                    k_cmp: Tensor, v_cmp: Tensor, seqlens_k: Tensor, g_cmp, g_slc, g_win, *,
                    cmp_block_size: int, cmp_stride: int, slc_block_size: int,
                    slc_num_blocks: int, slc_init_blocks: int, slc_local_blocks: int,
                    window_size: int, scale: float, block_indices: Optional[Tensor] = None,
                    return_aux: bool = True):
    """The three branches from the caches for queries at the end of each sequence
    (``seqlens_k`` tokens, the new ones included). Arguments are already checked.
    Returns ``(o, aux)`` like ``sparse_attn(..., return_aux=True)``; without
    ``return_aux`` ``aux`` is None and one op does the whole step (on CUDA the
    branches' KV splits and the gates are merged by a single kernel)."""
    if not return_aux:
        return ops.sparse_attn_decode(
            q, k_slc, v_slc, k_win, v_win, k_cmp, v_cmp, seqlens_k, g_cmp, g_slc, g_win,
            block_indices, cmp_block_size, cmp_stride, slc_block_size, slc_num_blocks,
            slc_init_blocks, slc_local_blocks, window_size, scale), None
    aux = dict.fromkeys(("block_indices", "o_cmp", "o_slc", "o_win", "lse_cmp", "lse_slc",
                         "lse_win"))
    l, d = cmp_block_size, cmp_stride
    if g_slc is not None and block_indices is None:
        # One op: on CUDA the selection reuses the compressed attention's q.k_cmp scores.
        aux["o_cmp"], aux["lse_cmp"], block_indices = ops.compressed_select_decode(
            q, k_cmp, v_cmp, seqlens_k, l, d, slc_block_size, slc_num_blocks, slc_init_blocks,
            slc_local_blocks, scale)
    elif g_cmp is not None:
        aux["o_cmp"], aux["lse_cmp"] = ops.compressed_attn_decode(q, k_cmp, v_cmp, seqlens_k, l,
                                                                  d, scale)
    if g_slc is not None:
        aux["o_slc"], aux["lse_slc"] = ops.selected_attn_decode(
            q, k_slc, v_slc, block_indices, seqlens_k, slc_block_size, scale)
        aux["block_indices"] = block_indices
    if g_win is not None:
        aux["o_win"], aux["lse_win"] = ops.window_attn_decode(q, k_win, v_win, seqlens_k,
                                                              window_size, scale)
    if g_cmp is None:  # computed only to drive selection
        aux["o_cmp"] = aux["lse_cmp"] = None
    return _combine_branches(q, v_slc.shape[3], aux, g_cmp, g_slc, g_win), aux


def check_decode_queries(q: Tensor) -> None:
    check.tensor("q", q, 4)
    if not 1 <= q.shape[1] <= MAX_DECODE_TOKENS:
        raise ValueError(
            f"q has {q.shape[1]} new tokens per sequence (q.shape[1]); decoding takes 1 to "
            f"{MAX_DECODE_TOKENS}. Run a prompt through sparse_attn (prefill) and write its "
            "k/v into the cache instead")


def check_cache_seqlens(cache_seqlens, q: Tensor) -> None:
    check.tensor("cache_seqlens", cache_seqlens, 1)
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if cache_seqlens.shape[0] != q.shape[0]:
        raise ValueError(f"cache_seqlens must have shape [B] = [{q.shape[0]}], got "
                         f"{tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != q.device:
        raise RuntimeError(f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")


def check_cmp_cache(k_cmp_cache: Tensor, v_cmp_cache: Tensor, q: Tensor, capacity: int,
                    l: int, d: int) -> None:
    check.qkv(q, k_cmp_cache, v_cmp_cache, "k_cmp_cache", "v_cmp_cache")
    needed = _num_cmp_blocks(capacity, l, d)
    if k_cmp_cache.shape[1] < needed:
        raise ValueError(
            f"k_cmp_cache has {k_cmp_cache.shape[1]} rows but a cache of capacity {capacity} "
            f"needs Tc({capacity}) = {needed} compressed rows (l={l}, d={d}); allocate it with "
            f"nsa_cuda.cmp_cache_rows({capacity}, {l}, {d}) rows")


def cmp_cache_rows(capacity: int, cmp_block_size: int = 32, cmp_stride: int = 16) -> int:
    """Rows a compressed cache needs for a token cache of ``capacity`` rows: ``Tc(capacity)``."""
    return _num_cmp_blocks(capacity, cmp_block_size, cmp_stride)


def sparse_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k_cmp_cache: Tensor,
                             v_cmp_cache: Tensor, cache_seqlens: Tensor,
                             k_new: Optional[Tensor] = None, v_new: Optional[Tensor] = None, *,
                             g_cmp: Optional[Tensor], g_slc: Optional[Tensor],
                             g_win: Optional[Tensor], cmp_block_size: int = 32,
                             cmp_stride: int = 16, slc_block_size: int = 64,
                             slc_num_blocks: int = 16, slc_init_blocks: int = 1,
                             slc_local_blocks: int = 2, window_size: int = 512,
                             scale: Optional[float] = None, update_cmp_cache: bool = True,
                             block_indices: Optional[Tensor] = None,
                             max_cache_seqlen: Optional[int] = None, return_aux: bool = False):
    """NSA for new tokens against a KV cache (decoding, speculative decoding).

    Args:
        q: ``[B, S, Hq, Dk]``, the queries of ``S`` new tokens per sequence (1 to 8).
        k_cache, v_cache: ``[B, capacity, Hkv, Dk / Dv]`` token caches, written in place.
        k_cmp_cache, v_cmp_cache: ``[B, rows, Hkv, Dk / Dv]`` compressed caches with
            ``rows >= cmp_cache_rows(capacity, l, d)``, written in place.
        cache_seqlens: int32 ``[B]``, tokens already in each cache. Not modified: add
            ``S`` yourself after the call (as with ``flash_attn_with_kvcache``).
        k_new, v_new: ``[B, S, Hkv, Dk / Dv]``, appended at rows ``cache_seqlens[b] + i``.
            Without them the caches already hold the new tokens and ``cache_seqlens``
            counts them.
        g_cmp, g_slc, g_win: gates ``[B, S, Hq]`` (activated; ``None`` turns a branch off).
        update_cmp_cache: with ``k_new``, write the mean of every compressed block that
            the new tokens complete into the compressed caches. Pass ``False`` when the
            caller maintains them (a learned compression, as NativeSparseAttention does).
        block_indices: ``[B, S, Hkv, n]`` to skip selection.
        max_cache_seqlen: a host-side upper bound on ``cache_seqlens`` (before the
            append). With it the capacity check needs no device sync.
        The NSA settings and ``scale`` are those of ``sparse_attn``.

    Returns ``o [B, S, Hq, Dv]``, or ``(o, aux)`` with ``return_aux=True``. Without
    aux the attention is one op, ``torch.ops.nsa_cuda.sparse_attn_decode``: on CUDA it
    merges the branches' KV splits and the gates in one kernel and rounds once, so
    its ``o`` can differ from the ``return_aux=True`` one (which rounds each branch
    output to q's dtype before the gated sum) in the last bits.

    The query ``i`` of batch entry ``b`` is at position ``L_b - S + i`` where ``L_b`` is
    the length after the append, and sees exactly what that position sees in
    ``sparse_attn`` over the whole sequence. A call that would overflow a cache
    raises ``ValueError``. Without ``max_cache_seqlen`` that check is a device sync on
    CUDA; it is skipped under torch.compile and CUDA-graph capture, where the kernels
    clamp to the capacity instead.
    """
    check_decode_queries(q)
    g, dk, dv = check.qkv(q, k_cache, v_cache, "k_cache", "v_cache")
    _decode_settings(cmp_block_size, cmp_stride, slc_block_size, slc_num_blocks,
                     slc_init_blocks, slc_local_blocks, window_size)
    capacity, S = k_cache.shape[1], q.shape[1]
    check_cmp_cache(k_cmp_cache, v_cmp_cache, q, capacity, cmp_block_size, cmp_stride)
    check_cache_seqlens(cache_seqlens, q)
    g_cmp, g_slc, g_win = (check.gate(n, x, q) for n, x in
                           (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_win", g_win)))
    if block_indices is not None:
        block_indices = check.block_indices(block_indices, q, k_cache.shape[2])
    scale = check.scale(scale, dk)
    if (k_new is None) != (v_new is None):
        raise ValueError("pass both k_new and v_new, or neither")
    if k_new is not None:
        for name, new, cache in (("k_new", k_new, k_cache), ("v_new", v_new, v_cache)):
            check.tensor(name, new, 4)
            expected = (q.shape[0], S, cache.shape[2], cache.shape[3])
            if tuple(new.shape) != expected:
                raise ValueError(f"{name} must have shape [B, S, Hkv, D] = {list(expected)}, "
                                 f"got {tuple(new.shape)}")
            check.dtype(name, new, q)
            check.same_device(q=q, **{name: new})
        check_cache_room(cache_seqlens, S, capacity, max_cache_seqlen)
        if update_cmp_cache:  # one launch: the append and the blocks it completes
            append_to_cache(k_cache, v_cache, k_new, v_new, cache_seqlens, k_cmp_cache,
                            v_cmp_cache, cmp_block_size, cmp_stride)
        else:
            append_to_cache(k_cache, v_cache, k_new, v_new, cache_seqlens)
        seqlens_k = cache_seqlens + S
    else:
        check_cache_room(cache_seqlens, 0, capacity, max_cache_seqlen)
        seqlens_k = cache_seqlens
    o, aux = decode_branches(
        q, k_cache, v_cache, k_cache, v_cache, k_cmp_cache, v_cmp_cache,
        seqlens_k.to(torch.int32).contiguous(), g_cmp, g_slc, g_win,
        cmp_block_size=cmp_block_size, cmp_stride=cmp_stride, slc_block_size=slc_block_size,
        slc_num_blocks=slc_num_blocks, slc_init_blocks=slc_init_blocks,
        slc_local_blocks=slc_local_blocks, window_size=window_size, scale=scale,
        block_indices=block_indices, return_aux=return_aux)
    return (o, aux) if return_aux else o
