"""``NativeSparseAttention``: the NSA attention layer as a drop-in ``nn.Module``.

    layer = nsa_cuda.NativeSparseAttention(hidden_size=512, num_heads=8, num_kv_heads=2)
    y = layer(x)                                   # x [B, T, hidden]
    y = layer(x_packed, cu_seqlens, max_seqlen)    # varlen: x_packed [1, total, hidden]

What the layer adds to the functional API (``nsa_cuda.sparse_attn`` and its branches):

* projections: q ``[Hq, Dk]``, k ``[Hkv, Dk]``, v ``[Hkv, Dv]`` (GQA), output
  ``Hq * Dv -> hidden``; with ``independent_kv=True`` each branch (compressed,
  selected, window) gets its own k/v projection (paper §3.3.3);
* RoPE on q and on every k, applied before compression (positions restart at 0 in
  each sequence of a varlen batch);
* the compression phi: ``"mean"`` (``nsa_cuda.mean_compress``) or ``"mlp"``: per KV
  head, separately for keys and values, a learnable intra-block position embedding is
  added to the block's ``l`` tokens, which are flattened (``l * D``) and fed to a
  two-layer MLP; ``phi(x) = mean(x) + MLP(flatten(x + pos))``. The MLP's output layer
  starts small, so phi starts close to mean pooling (which keeps the compressed scores,
  and so the block selection, meaningful from the first step) and learns from there;
* gates ``sigmoid(Linear(hidden -> 3 * Hq))`` for (cmp, slc, win).

Everything is computed for all blocks at once with tensor ops and no host sync (pass
``max_seqlen`` in varlen mode), so the layer compiles with
``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import api, decode

__all__ = ["NativeSparseAttention", "NSAInputs", "NSACache"]

_BRANCHES = ("cmp", "slc", "win")


class NSAInputs(NamedTuple):
    """The projected inputs of the attention, as the functional API takes them.

    ``k_slc``/``v_slc`` and ``k_win``/``v_win`` are the same tensors unless
    ``independent_kv``. Gates are already activated (sigmoid); a disabled branch's
    gate is ``None``. In varlen mode ``k_cmp``/``v_cmp`` have ``total // cmp_stride``
    rows, packed as the spec describes (rows past the packed blocks are zero).
    """

    q: Tensor
    k_slc: Tensor
    v_slc: Tensor
    k_win: Tensor
    v_win: Tensor
    k_cmp: Tensor
    v_cmp: Tensor
    g_cmp: Optional[Tensor]
    g_slc: Optional[Tensor]
    g_win: Optional[Tensor]


class NSACache:
    """The KV cache of one ``NativeSparseAttention`` layer, for generation.

        cache = layer.new_cache(batch_size=2, capacity=4096)
        y = layer(prompt, cache=cache)      # prefill: any length, fills the cache
        y = layer(next_tokens, cache=cache) # decode: 1 to 8 new tokens per sequence

    Holds the (RoPE'd) keys and values of every token so far: one set, or three
    with ``independent_kv`` (compressed-branch source, selected, window); the
    compressed keys and values, each written once when its block completes; and
    ``seqlens`` (int32 ``[B]``), the tokens held per sequence.
    """

    def __init__(self, layer: "NativeSparseAttention", batch_size: int, capacity: int,
                 device=None, dtype=None):
        p = next(layer.parameters())
        device = p.device if device is None else torch.device(device)
        dtype = p.dtype if dtype is None else dtype
        hkv, dk, dv = layer.num_kv_heads, layer.head_dim, layer.v_head_dim
        n_sets = 3 if layer.independent_kv else 1
        self.capacity = capacity
        self.k = [torch.zeros(batch_size, capacity, hkv, dk, device=device, dtype=dtype)
                  for _ in range(n_sets)]
        self.v = [torch.zeros(batch_size, capacity, hkv, dv, device=device, dtype=dtype)
                  for _ in range(n_sets)]
        # Spare rows past Tc(capacity): a decode step compresses a fixed number of
        # candidate blocks (no host sync) and the ones not complete yet land there or
        # on rows that a later step overwrites.
        rows = decode.cmp_cache_rows(capacity, layer.cmp_block_size, layer.cmp_stride)
        rows += layer._max_new_cmp_blocks()
        self.k_cmp = torch.zeros(batch_size, rows, hkv, dk, device=device, dtype=dtype)
        self.v_cmp = torch.zeros(batch_size, rows, hkv, dv, device=device, dtype=dtype)
        self.seqlens = torch.zeros(batch_size, device=device, dtype=torch.int32)
        self.empty = True  # host-side: the next call may prefill
        self.max_len = 0   # host-side bound on seqlens: capacity checks without a sync

    @property
    def batch_size(self) -> int:
        return self.seqlens.shape[0]

    def reset(self) -> None:
        """Empties the cache (keeps its memory)."""
        self.seqlens.zero_()
        self.empty = True
        self.max_len = 0


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _BlockMLP(nn.Module):
    """phi for one of k / v: ``[..., Tc, H, l, D] -> [..., Tc, H, D]``, weights per head."""

    def __init__(self, num_heads: int, block: int, dim: int, hidden: int, **factory):
        super().__init__()
        self.pos = nn.Parameter(torch.empty(num_heads, block, dim, **factory))
        self.w1 = nn.Parameter(torch.empty(num_heads, block * dim, hidden, **factory))
        self.b1 = nn.Parameter(torch.empty(num_heads, hidden, **factory))
        self.w2 = nn.Parameter(torch.empty(num_heads, hidden, dim, **factory))
        self.b2 = nn.Parameter(torch.empty(num_heads, dim, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.w1, std=self.w1.shape[1] ** -0.5)
        nn.init.zeros_(self.b1)
        # a small output layer: phi starts close to the mean (and gradients reach
        # w1 and pos from the first step, which a zero w2 would block)
        nn.init.normal_(self.w2, std=0.1 * self.w2.shape[1] ** -0.5)
        nn.init.zeros_(self.b2)

    def forward(self, blocks: Tensor) -> Tensor:
        # blocks [N, C, H, l, D]
        n, c, h, l, d = blocks.shape
        x = (blocks + self.pos.to(blocks.dtype)).reshape(n, c, h, l * d)
        hid = F.gelu(torch.einsum("nchi,hio->ncho", x, self.w1.to(x.dtype)) + self.b1.to(x.dtype))
        out = torch.einsum("ncho,hod->nchd", hid, self.w2.to(x.dtype)) + self.b2.to(x.dtype)
        return blocks.mean(dim=3) + out


class NativeSparseAttention(nn.Module):
    """DeepSeek's Native Sparse Attention layer (Yuan et al. 2025), see the module doc.

    Args:
        hidden_size: model width.
        num_heads: query heads ``Hq``.
        num_kv_heads: KV heads ``Hkv`` (GQA; ``Hq % Hkv == 0``). Default ``num_heads``.
        head_dim: q/k head dim ``Dk`` (even, for RoPE). Default ``hidden_size // num_heads``.
        v_head_dim: v head dim ``Dv``. Default ``head_dim``.
        cmp_block_size, cmp_stride, slc_block_size, slc_num_blocks, slc_init_blocks,
        slc_local_blocks, window_size: NSA settings (NSA_SPEC.md; paper defaults).
        rope_theta: RoPE base; ``None`` disables RoPE.
        compression: ``"mlp"`` (learned phi) or ``"mean"``.
        cmp_mlp_hidden: hidden width of the phi MLP. Default: twice the compressed
            vector's dim (``2 * Dk`` for keys, ``2 * Dv`` for values).
        independent_kv: separate k/v projections for the three branches.
        branches: the branches that contribute to the output, a subset of
            ``("cmp", "slc", "win")``; e.g. ``("win",)`` is sliding-window attention.
            The compressed branch still runs to drive the selection when ``"slc"`` is on.
        bias: bias in the q/k/v/o projections (the gate projection always has one).
        scale: softmax scale, default ``head_dim ** -0.5``.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, v_head_dim: Optional[int] = None, *,
                 cmp_block_size: int = 32, cmp_stride: int = 16, slc_block_size: int = 64,
                 slc_num_blocks: int = 16, slc_init_blocks: int = 1, slc_local_blocks: int = 2,
                 window_size: int = 512, rope_theta: Optional[float] = 10000.0,
                 compression: str = "mlp", cmp_mlp_hidden: Optional[int] = None,
                 independent_kv: bool = False, branches: Sequence[str] = _BRANCHES,
                 bias: bool = False, scale: Optional[float] = None,
                 device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        if rope_theta is not None and head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        if compression not in ("mlp", "mean"):
            raise ValueError(f"compression must be 'mlp' or 'mean', got {compression!r}")
        branches = tuple(branches)
        if not branches or any(b not in _BRANCHES for b in branches):
            raise ValueError(f"branches must be a non-empty subset of {_BRANCHES}, got {branches}")
        # the same constraint checks the functional API applies
        from . import _validate
        _validate.nsa_sizes(cmp_block_size, cmp_stride, slc_block_size, slc_num_blocks,
                            slc_init_blocks, slc_local_blocks, window_size)

        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.v_head_dim = head_dim, v_head_dim
        self.cmp_block_size, self.cmp_stride = cmp_block_size, cmp_stride
        self.slc_block_size, self.slc_num_blocks = slc_block_size, slc_num_blocks
        self.slc_init_blocks, self.slc_local_blocks = slc_init_blocks, slc_local_blocks
        self.window_size = window_size
        self.rope_theta, self.compression = rope_theta, compression
        self.independent_kv, self.branches = independent_kv, branches
        self.scale = head_dim ** -0.5 if scale is None else float(scale)

        n_kv = 3 if independent_kv else 1  # k/v sets: (cmp, slc, win) or one shared
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(hidden_size, n_kv * num_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(hidden_size, n_kv * num_kv_heads * v_head_dim, bias=bias,
                                **factory)
        self.g_proj = nn.Linear(hidden_size, 3 * num_heads, bias=True, **factory)
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=bias, **factory)
        if compression == "mlp":
            self.k_phi = _BlockMLP(num_kv_heads, cmp_block_size, head_dim,
                                   cmp_mlp_hidden or 2 * head_dim, **factory)
            self.v_phi = _BlockMLP(num_kv_heads, cmp_block_size, v_head_dim,
                                   cmp_mlp_hidden or 2 * v_head_dim, **factory)
        else:
            self.k_phi = self.v_phi = None
        if rope_theta is not None:
            inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                                          device=device) / head_dim))
            self.register_buffer("inv_freq", inv_freq, persistent=False)
        else:
            self.inv_freq = None

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"dk={self.head_dim}, dv={self.v_head_dim}, l={self.cmp_block_size}, "
                f"d={self.cmp_stride}, l'={self.slc_block_size}, n={self.slc_num_blocks}, "
                f"w={self.window_size}, phi={self.compression}, "
                f"independent_kv={self.independent_kv}, branches={self.branches}")

    # --- pieces ---------------------------------------------------------------------------

    @staticmethod
    def positions(num_tokens: int, device, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """Token positions: ``arange(T)``, or restarting at 0 at every ``cu_seqlens`` entry."""
        pos = torch.arange(num_tokens, device=device)
        if cu_seqlens is None:
            return pos
        cu = cu_seqlens.to(torch.long)
        seq = torch.searchsorted(cu[1:], pos, right=True).clamp(max=cu.numel() - 2)
        return pos - cu[seq]

    def _rope(self, x: Tensor, pos: Tensor) -> Tensor:
        """x [B, T, ..., D]; pos [T], or [B, T] (decoding: per-sequence positions)."""
        if self.inv_freq is None:
            return x
        freqs = pos.to(torch.float32)[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D] or [B, T, D]
        lead = (1, emb.shape[0]) if emb.dim() == 2 else tuple(emb.shape[:2])
        shape = lead + (1,) * (x.dim() - 3) + (emb.shape[-1],)
        cos, sin = emb.cos().view(shape), emb.sin().view(shape)
        xf = x.to(torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x
        out = xf * cos.to(xf.dtype) + _rotate_half(xf) * sin.to(xf.dtype)
        return out.to(x.dtype)

    def _packed_block_starts(self, total: int, cu_seqlens: Tensor):
        """For each of the ``total // d`` packed compressed rows: its first token, and
        whether the row is a real block (False for the padding rows at the end)."""
        l, d = self.cmp_block_size, self.cmp_stride
        cu = cu_seqlens.to(torch.long)
        lens = cu[1:] - cu[:-1]
        tc = torch.where(lens >= l, (lens - l) // d + 1, torch.zeros_like(lens))
        ends = torch.cumsum(tc, 0)  # packed row where each sequence's blocks end
        rows = torch.arange(total // d, device=cu.device)
        seq = torch.searchsorted(ends, rows, right=True)
        valid = seq < lens.numel()
        seq = seq.clamp(max=lens.numel() - 1)
        block = rows - (ends[seq] - tc[seq])
        starts = torch.where(valid, cu[seq] + block * d, torch.zeros_like(rows))
        return starts, valid

    def _max_new_cmp_blocks(self) -> int:
        """A bound on the compressed blocks that up to MAX_DECODE_TOKENS new tokens complete."""
        return decode.MAX_DECODE_TOKENS // self.cmp_stride + 1

    def compress(self, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor] = None):
        """phi over all blocks: ``k [B, T, Hkv, Dk] -> k_cmp [B, R, Hkv, Dk]`` (same for v).

        ``R = Tc(T)`` in batch mode, ``total // cmp_stride`` in varlen mode.
        """
        l, d = self.cmp_block_size, self.cmp_stride
        if self.compression == "mean":
            return (api.mean_compress(k, l, d, cu_seqlens),
                    api.mean_compress(v, l, d, cu_seqlens))
        out = []
        for x, phi in ((k, self.k_phi), (v, self.v_phi)):
            if cu_seqlens is None:
                if x.shape[1] < l:  # no complete block
                    blocks = x.new_zeros(x.shape[0], 0, x.shape[2], l, x.shape[3])
                else:  # strided view [B, Tc, H, D, l] -> [B, Tc, H, l, D]
                    blocks = x.unfold(1, l, d).transpose(-1, -2)
                out.append(phi(blocks))
            else:
                starts, valid = self._packed_block_starts(x.shape[1], cu_seqlens)
                idx = (starts[:, None] + torch.arange(l, device=x.device)).clamp(
                    max=max(x.shape[1] - 1, 0))
                blocks = x[0][idx].transpose(1, 2).unsqueeze(0)  # [1, R, H, l, D]
                xc = phi(blocks)
                out.append(torch.where(valid[None, :, None, None], xc, torch.zeros_like(xc)))
        return out[0].contiguous(), out[1].contiguous()

    def project(self, hidden_states: Tensor, cu_seqlens: Optional[Tensor] = None) -> NSAInputs:
        """Everything before the attention: projections, RoPE, compression, gates.

        The returned tensors are what ``forward`` hands to the NSA ops, so a test can
        call ``nsa_cuda.reference`` on them.
        """
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be [B, T, hidden], got {tuple(hidden_states.shape)}")
        if cu_seqlens is not None and hidden_states.shape[0] != 1:
            raise ValueError("with cu_seqlens, hidden_states must be packed as [1, total, hidden]")
        B, T, _ = hidden_states.shape
        hq, dk = self.num_heads, self.head_dim
        n_kv = 3 if self.independent_kv else 1
        pos = self.positions(T, hidden_states.device, cu_seqlens)
        q = self._rope(self.q_proj(hidden_states).view(B, T, hq, dk), pos)
        ks, vs = self._kv_sets(hidden_states, pos, q.dtype)
        k_cmp, v_cmp = self.compress(ks[0], vs[0], cu_seqlens)
        k_slc, v_slc = ks[-2] if n_kv == 3 else ks[0], vs[-2] if n_kv == 3 else vs[0]
        gates = torch.sigmoid(self.g_proj(hidden_states)).view(B, T, 3, hq).to(q.dtype)
        g = [gates[:, :, i] if name in self.branches else None
             for i, name in enumerate(_BRANCHES)]
        return NSAInputs(q.contiguous(), k_slc, v_slc, ks[-1], vs[-1], k_cmp.to(q.dtype),
                         v_cmp.to(q.dtype), g[0], g[1], g[2])

    def attend(self, x: NSAInputs, cu_seqlens: Optional[Tensor] = None,
               max_seqlen: Optional[int] = None, return_block_indices: bool = False):
        """The NSA ops on projected inputs: ``o [B, T, Hq, Dv]``; with
        ``return_block_indices``, ``(o, block_indices)`` (``None`` without "slc")."""
        sizes = dict(cmp_block_size=self.cmp_block_size, cmp_stride=self.cmp_stride)
        slc = dict(slc_block_size=self.slc_block_size, slc_num_blocks=self.slc_num_blocks,
                   slc_init_blocks=self.slc_init_blocks, slc_local_blocks=self.slc_local_blocks)
        varlen = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=self.scale)
        if not self.independent_kv:
            o, aux = api.sparse_attn(x.q, x.k_slc, x.v_slc, x.g_cmp, x.g_slc, x.g_win,
                                     x.k_cmp, x.v_cmp, window_size=self.window_size,
                                     **sizes, **slc, **varlen, return_aux=True)
            return (o, aux["block_indices"]) if return_block_indices else o
        outputs, gates, bi = [], [], None
        if x.g_cmp is not None or x.g_slc is not None:
            o_cmp, lse_cmp = api.compressed_attn(x.q, x.k_cmp, x.v_cmp, **sizes, **varlen)
            if x.g_cmp is not None:
                outputs.append(o_cmp), gates.append(x.g_cmp)
            if x.g_slc is not None:
                bi = api.select_blocks(x.q, x.k_cmp, lse_cmp, **sizes, **slc, **varlen)
                o_slc, _ = api.selected_attn(x.q, x.k_slc, x.v_slc, bi,
                                             slc_block_size=self.slc_block_size, **varlen)
                outputs.append(o_slc), gates.append(x.g_slc)
        if x.g_win is not None:
            o_win, _ = api.window_attn(x.q, x.k_win, x.v_win, window_size=self.window_size,
                                       **varlen)
            outputs.append(o_win), gates.append(x.g_win)
        o = api.gate_combine(outputs, gates)
        return (o, bi) if return_block_indices else o

    def forward(self, hidden_states: Tensor, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None, *, cache: Optional[NSACache] = None) -> Tensor:
        """``hidden_states [B, T, hidden]`` (varlen: ``[1, total, hidden]`` with int32
        ``cu_seqlens [N+1]``; pass ``max_seqlen`` to avoid a device sync, and always under
        torch.compile). Returns ``[B, T, hidden]``.

        With ``cache`` (``new_cache``): an empty cache takes a prompt of any length
        (prefill, written into the cache; prompts of different lengths go packed, with
        ``cu_seqlens``, one sequence per cache entry); after that each call takes 1 to 8
        new tokens per sequence (decoding), which continue the sequences in the cache."""
        if cache is not None:
            if cache.empty:
                return self._prefill(hidden_states, cache, cu_seqlens, max_seqlen)
            if cu_seqlens is not None:
                raise ValueError("decoding steps take batched [B, S, hidden] inputs; cu_seqlens "
                                 "is for the prefill (the first call, on an empty cache)")
            return self._decode_step(hidden_states, cache)
        x = self.project(hidden_states, cu_seqlens)
        o = self.attend(x, cu_seqlens, max_seqlen)
        return self._output(o, hidden_states)

    def _output(self, o: Tensor, hidden_states: Tensor) -> Tensor:
        B, T = hidden_states.shape[:2]
        return self.o_proj(o.reshape(B, T, self.num_heads * self.v_head_dim).to(hidden_states.dtype))

    # --- generation with a KV cache -------------------------------------------------------

    def new_cache(self, batch_size: int, capacity: int, device=None, dtype=None) -> NSACache:
        """An empty ``NSACache`` for ``batch_size`` sequences of up to ``capacity`` tokens
        (device and dtype default to the layer's parameters')."""
        return NSACache(self, batch_size, capacity, device, dtype)

    def _check_cache(self, hidden_states: Tensor, cache: NSACache,
                     cu_seqlens: Optional[Tensor] = None) -> None:
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be [B, T, hidden], got {tuple(hidden_states.shape)}")
        if cu_seqlens is not None:
            if hidden_states.shape[0] != 1:
                raise ValueError("with cu_seqlens, hidden_states must be packed as [1, total, hidden]")
            if cu_seqlens.numel() - 1 != cache.batch_size:
                raise ValueError(f"the cache holds {cache.batch_size} sequences but cu_seqlens has "
                                 f"{cu_seqlens.numel() - 1}")
        elif hidden_states.shape[0] != cache.batch_size:
            raise ValueError(f"the cache holds {cache.batch_size} sequences but hidden_states has "
                             f"batch {hidden_states.shape[0]}")
        if cache.k_cmp.shape[2] != self.num_kv_heads or len(cache.k) != (
                3 if self.independent_kv else 1):
            raise ValueError("this cache was made for another layer configuration; "
                             "use layer.new_cache(...)")

    def _prefill(self, hidden_states: Tensor, cache: NSACache,
                 cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None) -> Tensor:
        """The prompt through the prefill kernels, then its k/v and compressed blocks into
        the (empty) cache. Eager only: the packed case reads cu_seqlens on the host."""
        self._check_cache(hidden_states, cache, cu_seqlens)
        T, dev = hidden_states.shape[1], hidden_states.device
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]) if cu_seqlens is not None else None
        longest = T if lens is None else int(lens.max().item())
        if longest > cache.capacity:
            raise ValueError(f"KV cache full: the prompt has {longest} tokens but the cache "
                             f"holds {cache.capacity}")
        x = self.project(hidden_states, cu_seqlens)
        o = self.attend(x, cu_seqlens, max_seqlen)
        sets = [(x.k_slc, x.v_slc)] if not self.independent_kv else None
        if sets is None:  # the compression source is not in NSAInputs: recompute it
            sets = self._kv_sets(hidden_states, self.positions(T, dev, cu_seqlens), x.q.dtype)
            sets = list(zip(*sets))
        if cu_seqlens is None:
            for i, (k, v) in enumerate(sets):
                cache.k[i][:, :T] = k
                cache.v[i][:, :T] = v
            tc = x.k_cmp.shape[1]
            cache.k_cmp[:, :tc] = x.k_cmp
            cache.v_cmp[:, :tc] = x.v_cmp
            cache.seqlens.fill_(T)
        else:  # token r of the packed prompt -> (its sequence, its position in it)
            cu = cu_seqlens.to(torch.long)
            pos = self.positions(T, dev, cu_seqlens)
            seq = torch.searchsorted(cu[1:], torch.arange(T, device=dev), right=True)
            for i, (k, v) in enumerate(sets):
                cache.k[i][seq, pos] = k[0]
                cache.v[i][seq, pos] = v[0]
            starts, valid = self._packed_block_starts(T, cu_seqlens)  # per packed cmp row
            cmp_seq = torch.searchsorted(cu[1:], starts, right=True)[valid]
            block = (starts[valid] - cu[cmp_seq]) // self.cmp_stride
            cache.k_cmp[cmp_seq, block] = x.k_cmp[0][valid]
            cache.v_cmp[cmp_seq, block] = x.v_cmp[0][valid]
            cache.seqlens.copy_(lens)
        cache.empty = False
        cache.max_len = longest
        return self._output(o, hidden_states)

    def _kv_sets(self, hidden_states: Tensor, pos: Tensor, dtype: torch.dtype):
        """RoPE'd k and v of every set in ``dtype``: lists of [B, T, Hkv, D] (one shared
        set, or the compressed-branch source, selected and window sets)."""
        B, T, _ = hidden_states.shape
        n_kv = 3 if self.independent_kv else 1
        k = self._rope(self.k_proj(hidden_states).view(B, T, n_kv, self.num_kv_heads,
                                                       self.head_dim), pos)
        v = self.v_proj(hidden_states).view(B, T, n_kv, self.num_kv_heads, self.v_head_dim)
        return ([k[:, :, i].to(dtype).contiguous() for i in range(n_kv)],
                [v[:, :, i].to(dtype).contiguous() for i in range(n_kv)])

    def _compress_new_blocks(self, cache: NSACache, old_lens: Tensor) -> None:
        """Writes the learned phi of the blocks the new tokens complete into the
        compressed cache (mean compression is done by the append's kernel).

        A fixed number of candidate blocks per sequence (no host sync): candidates
        that are not complete yet are written to rows no query reads before a later
        step overwrites them with the complete block."""
        l, d = self.cmp_block_size, self.cmp_stride
        B, dev = old_lens.shape[0], old_lens.device
        lens = old_lens.to(torch.long)
        first = torch.where(lens >= l, (lens - l) // d + 1, torch.zeros_like(lens))
        blocks = first[:, None] + torch.arange(self._max_new_cmp_blocks(), device=dev)  # [B, A]
        rows = (blocks[..., None] * d + torch.arange(l, device=dev)).clamp(max=cache.capacity - 1)
        batch = torch.arange(B, device=dev)[:, None]
        for src, dst, phi in ((cache.k[0], cache.k_cmp, self.k_phi),
                              (cache.v[0], cache.v_cmp, self.v_phi)):
            tokens = src[batch[..., None], rows]            # [B, A, l, Hkv, D]
            dst[batch, blocks] = phi(tokens.transpose(2, 3)).to(dst.dtype)

    def _decode_step(self, hidden_states: Tensor, cache: NSACache) -> Tensor:
        self._check_cache(hidden_states, cache)
        B, S, _ = hidden_states.shape
        if not 1 <= S <= decode.MAX_DECODE_TOKENS:
            raise ValueError(f"a decoding step takes 1 to {decode.MAX_DECODE_TOKENS} new tokens "
                             f"per sequence, got {S}; prompts go in the first call, on an empty "
                             "cache (cache.reset() empties it)")
        decode.check_cache_room(cache.seqlens, S, cache.capacity, cache.max_len)
        old_lens = cache.seqlens
        pos = old_lens.to(torch.long)[:, None] + torch.arange(S, device=hidden_states.device)
        q = self._rope(self.q_proj(hidden_states).view(B, S, self.num_heads, self.head_dim), pos)
        ks, vs = self._kv_sets(hidden_states, pos, cache.k_cmp.dtype)
        mean = self.compression == "mean"
        for i in range(len(ks)):
            if i == 0 and mean:  # the compression source: its new blocks in the same launch
                decode.append_to_cache(cache.k[0], cache.v[0], ks[0], vs[0], old_lens, cache.k_cmp,
                                       cache.v_cmp, self.cmp_block_size, self.cmp_stride)
            else:
                decode.append_to_cache(cache.k[i], cache.v[i], ks[i], vs[i], old_lens)
        if not mean:
            self._compress_new_blocks(cache, old_lens)
        # The lengths advance in place (one launch): everything above read the old ones.
        new_lens = cache.seqlens.add_(S)
        gates = torch.sigmoid(self.g_proj(hidden_states)).view(B, S, 3, self.num_heads)
        gates = gates.to(cache.k_cmp.dtype)
        g = [gates[:, :, i] if name in self.branches else None
             for i, name in enumerate(_BRANCHES)]
        slc, win = (1, 2) if self.independent_kv else (0, 0)
        o, _ = decode.decode_branches(
            q.to(cache.k_cmp.dtype).contiguous(), cache.k[slc], cache.v[slc], cache.k[win],
            cache.v[win], cache.k_cmp, cache.v_cmp, new_lens, g[0], g[1], g[2],
            cmp_block_size=self.cmp_block_size, cmp_stride=self.cmp_stride,
            slc_block_size=self.slc_block_size, slc_num_blocks=self.slc_num_blocks,
            slc_init_blocks=self.slc_init_blocks, slc_local_blocks=self.slc_local_blocks,
            window_size=self.window_size, scale=self.scale, return_aux=False)
        cache.max_len += S
        return self._output(o, hidden_states)
