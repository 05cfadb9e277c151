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

from . import api

__all__ = ["NativeSparseAttention", "NSAInputs"]

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
        """x [B, T, ..., D]; pos [T]."""
        if self.inv_freq is None:
            return x
        freqs = pos.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        shape = (1, emb.shape[0]) + (1,) * (x.dim() - 3) + (emb.shape[1],)
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
        hq, hkv, dk, dv = self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim
        n_kv = 3 if self.independent_kv else 1
        pos = self.positions(T, hidden_states.device, cu_seqlens)
        q = self._rope(self.q_proj(hidden_states).view(B, T, hq, dk), pos)
        k = self._rope(self.k_proj(hidden_states).view(B, T, n_kv, hkv, dk), pos)
        v = self.v_proj(hidden_states).view(B, T, n_kv, hkv, dv).to(q.dtype)
        k = k.to(q.dtype)
        ks = [k[:, :, i].contiguous() for i in range(n_kv)]
        vs = [v[:, :, i].contiguous() for i in range(n_kv)]
        k_cmp, v_cmp = self.compress(ks[0], vs[0], cu_seqlens)
        k_slc, v_slc = ks[-2] if n_kv == 3 else ks[0], vs[-2] if n_kv == 3 else vs[0]
        gates = torch.sigmoid(self.g_proj(hidden_states)).view(B, T, 3, hq).to(q.dtype)
        g = [gates[:, :, i] if name in self.branches else None
             for i, name in enumerate(_BRANCHES)]
        return NSAInputs(q.contiguous(), k_slc, v_slc, ks[-1], vs[-1], k_cmp.to(q.dtype),
                         v_cmp.to(q.dtype), g[0], g[1], g[2])

    def attend(self, x: NSAInputs, cu_seqlens: Optional[Tensor] = None,
               max_seqlen: Optional[int] = None) -> Tensor:
        """The NSA ops on projected inputs: ``o [B, T, Hq, Dv]``."""
        sizes = dict(cmp_block_size=self.cmp_block_size, cmp_stride=self.cmp_stride)
        slc = dict(slc_block_size=self.slc_block_size, slc_num_blocks=self.slc_num_blocks,
                   slc_init_blocks=self.slc_init_blocks, slc_local_blocks=self.slc_local_blocks)
        varlen = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=self.scale)
        if not self.independent_kv:
            return api.sparse_attn(x.q, x.k_slc, x.v_slc, x.g_cmp, x.g_slc, x.g_win,
                                   x.k_cmp, x.v_cmp, window_size=self.window_size,
                                   **sizes, **slc, **varlen)
        o = None
        if x.g_cmp is not None or x.g_slc is not None:
            o_cmp, lse_cmp = api.compressed_attn(x.q, x.k_cmp, x.v_cmp, **sizes, **varlen)
            if x.g_cmp is not None:
                o = x.g_cmp.unsqueeze(-1) * o_cmp
            if x.g_slc is not None:
                bi = api.select_blocks(x.q, x.k_cmp, lse_cmp, **sizes, **slc, **varlen)
                o_slc, _ = api.selected_attn(x.q, x.k_slc, x.v_slc, bi,
                                             slc_block_size=self.slc_block_size, **varlen)
                o_slc = x.g_slc.unsqueeze(-1) * o_slc
                o = o_slc if o is None else o + o_slc
        if x.g_win is not None:
            o_win, _ = api.window_attn(x.q, x.k_win, x.v_win, window_size=self.window_size,
                                       **varlen)
            o_win = x.g_win.unsqueeze(-1) * o_win
            o = o_win if o is None else o + o_win
        return o

    def forward(self, hidden_states: Tensor, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None) -> Tensor:
        """``hidden_states [B, T, hidden]`` (varlen: ``[1, total, hidden]`` with int32
        ``cu_seqlens [N+1]``; pass ``max_seqlen`` to avoid a device sync, and always under
        torch.compile). Returns ``[B, T, hidden]``."""
        x = self.project(hidden_states, cu_seqlens)
        o = self.attend(x, cu_seqlens, max_seqlen)
        B, T = hidden_states.shape[:2]
        return self.o_proj(o.reshape(B, T, self.num_heads * self.v_head_dim).to(hidden_states.dtype))
