"""Input checks with messages that name the argument and what was expected.

Every check here reads shapes, dtypes and devices only, except the cu_seqlens
value checks, which run only where they cost no device sync (CPU tensors, eager
mode).
"""
from __future__ import annotations

import torch

CUDA_DTYPES = (torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# (Dk, Dv) pairs the CUDA kernels are instantiated for.
CUDA_HEAD_DIMS = ((64, 64), (128, 128), (192, 128))


def _is_tracing() -> bool:
    return torch.compiler.is_compiling()


def _is_fake(t: torch.Tensor) -> bool:
    return t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor)


def tensor(name: str, t, rank: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D, got shape {tuple(t.shape)}")
    return t


def last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() > 0 and t.stride(-1) != 1 and t.size(-1) > 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides "
                         f"{tuple(t.stride())}; call .contiguous()")


def positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def scale(value, head_dim: int) -> float:
    if value is None:
        return head_dim ** -0.5
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(value).__name__}")
    return float(value)


def same_device(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise RuntimeError(f"{name} is on {t.device} but {first_name} is on {first.device}: "
                               "all tensors must be on the same device")


def dtype(name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> None:
    supported = CUDA_DTYPES if t.device.type == "cuda" else CPU_DTYPES
    if t.dtype not in supported:
        names = ", ".join(str(d).replace("torch.", "") for d in supported)
        raise TypeError(f"{name} has dtype {t.dtype}; on {t.device.type} nsa_cuda supports {names}")
    if like is not None and t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but q has {like.dtype}: they must match")


def head_dims(q: torch.Tensor, dk: int, dv: int | None) -> None:
    """dv None: only Dk matters (the block selection reads no values)."""
    if dv is None:
        dks = sorted({p[0] for p in CUDA_HEAD_DIMS})
        if q.device.type == "cuda" and dk not in dks:
            raise ValueError(f"head dim Dk={dk} is not supported on CUDA; supported Dk: "
                             f"{', '.join(map(str, dks))}. The CPU path takes any head dims.")
        return
    if q.device.type == "cuda" and (dk, dv) not in CUDA_HEAD_DIMS:
        pairs = ", ".join(str(p) for p in CUDA_HEAD_DIMS)
        raise ValueError(f"head dims (Dk={dk}, Dv={dv}) are not supported on CUDA; "
                         f"supported (Dk, Dv): {pairs}. The CPU path takes any head dims.")


def qkv(q, k, v, k_name: str = "k", v_name: str = "v", values: bool = True):
    """q [B, T, Hq, Dk], k [B, Tk, Hkv, Dk], v [B, Tk, Hkv, Dv]; returns (G, Dk, Dv).
    values=False: v is k again (the selection), so only Dk must be a supported one."""
    tensor("q", q, 4), tensor(k_name, k, 4), tensor(v_name, v, 4)
    same_device(q=q, **{k_name: k, v_name: v})
    dtype("q", q)
    dtype(k_name, k, q)
    dtype(v_name, v, q)
    for name, t in (("q", q), (k_name, k), (v_name, v)):
        last_dim_contiguous(name, t)
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, {k_name} {k.shape[0]}, "
                         f"{v_name} {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{k_name} has {k.shape[1]} rows but {v_name} has {v.shape[1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{k_name} has {k.shape[2]} heads but {v_name} has {v.shape[2]}")
    hq, hkv = q.shape[2], k.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"the query heads Hq={hq} must be a multiple of the KV heads "
                         f"Hkv={hkv} ({k_name}.shape[2])")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"{k_name} head dim {k.shape[3]} != q head dim {q.shape[3]}")
    if q.shape[3] == 0:  # the default scale Dk ** -0.5 would raise ZeroDivisionError
        raise ValueError("q head dim Dk must be >= 1, got 0")
    head_dims(q, q.shape[3], v.shape[3] if values else None)
    return hq // hkv, q.shape[3], v.shape[3]


def same_rows(q: torch.Tensor, k: torch.Tensor, k_name: str = "k") -> None:
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"{k_name} has T={k.shape[1]} but q has T={q.shape[1]}: they must match")


def cu_seqlens(cu, q: torch.Tensor, max_seqlen):
    """Checks the varlen arguments; returns max_seqlen as an int (T in batch mode)."""
    if cu is None:
        if max_seqlen is not None and not isinstance(max_seqlen, int):
            raise TypeError("max_seqlen must be an int or None")
        return q.shape[1]
    tensor("cu_seqlens", cu)
    if cu.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with N+1 >= 2 entries, got shape {tuple(cu.shape)}")
    if cu.device != q.device:
        raise RuntimeError(f"cu_seqlens is on {cu.device} but q is on {q.device}")
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, q must be packed as [1, total, Hq, Dk]; got batch {q.shape[0]}")
    total = q.shape[1]
    if max_seqlen is not None:
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
            raise TypeError(f"max_seqlen must be an int, got {type(max_seqlen).__name__}")
        if max_seqlen < 0:
            raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    checkable = cu.device.type == "cpu" and not _is_tracing() and not _is_fake(cu)
    if checkable:
        vals = cu.tolist()
        if vals[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {vals[0]}")
        if any(b < a for a, b in zip(vals, vals[1:])):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {vals}")
        if vals[-1] != total:
            raise ValueError(f"cu_seqlens must end at total={total} (q.shape[1]), got {vals[-1]}")
        longest = max(b - a for a, b in zip(vals, vals[1:]))
        if max_seqlen is not None and max_seqlen < longest:
            raise ValueError(f"max_seqlen={max_seqlen} is less than the longest sequence ({longest})")
        return longest if max_seqlen is None else max_seqlen
    if max_seqlen is None:
        if _is_tracing():
            raise ValueError("pass max_seqlen with cu_seqlens under torch.compile "
                             "(computing it would need a device sync)")
        # One device sync, the cost of not passing max_seqlen.
        max_seqlen = int((cu[1:] - cu[:-1]).max().item())
    if not _is_tracing() and not _is_fake(cu):
        assert_cu_seqlens_async(cu, total, max_seqlen)
    return max_seqlen


def assert_cu_seqlens_async(cu: torch.Tensor, total: int, max_seqlen: int) -> None:
    """The CPU checks above, for a cu_seqlens that lives on a device, without a host
    sync: a device-side assert. The kernels size their grids from max_seqlen and
    trust the offsets, so a bad cu_seqlens would otherwise leave rows unwritten or
    read out of bounds; this way the program stops with a device-side assert at the
    call instead. (On CPU tensors the assert raises RuntimeError at once.)"""
    lengths = cu[1:] - cu[:-1]
    shortest, longest = torch.aminmax(lengths)
    ok = (cu[0] == 0) & (cu[-1] == total) & (shortest >= 0) & (longest <= max_seqlen)
    torch._assert_async(ok, "nsa_cuda: cu_seqlens must start at 0, be non-decreasing and end "
                            "at total (q.shape[1]), and max_seqlen must be at least the longest "
                            "sequence")


def nsa_sizes(cmp_block_size=None, cmp_stride=None, slc_block_size=None, slc_num_blocks=None,
              slc_init_blocks=None, slc_local_blocks=None, window_size=None) -> None:
    """The spec's constraints: d divides l and l'; n_local >= 1; n_init + n_local <= n."""
    if cmp_block_size is not None:
        positive_int("cmp_block_size", cmp_block_size)
    if cmp_stride is not None:
        positive_int("cmp_stride", cmp_stride)
    if slc_block_size is not None:
        positive_int("slc_block_size", slc_block_size)
    if window_size is not None:
        positive_int("window_size", window_size)
    if cmp_block_size is not None and cmp_stride is not None and cmp_block_size % cmp_stride:
        raise ValueError(f"cmp_stride={cmp_stride} must divide cmp_block_size={cmp_block_size}")
    if slc_block_size is not None and cmp_stride is not None and slc_block_size % cmp_stride:
        raise ValueError(f"cmp_stride={cmp_stride} must divide slc_block_size={slc_block_size}")
    if slc_num_blocks is not None:
        positive_int("slc_num_blocks", slc_num_blocks)
        positive_int("slc_init_blocks", slc_init_blocks, minimum=0)
        positive_int("slc_local_blocks", slc_local_blocks, minimum=1)
        if slc_init_blocks + slc_local_blocks > slc_num_blocks:
            raise ValueError(f"slc_init_blocks + slc_local_blocks = {slc_init_blocks} + "
                             f"{slc_local_blocks} must be <= slc_num_blocks={slc_num_blocks}")


def compressed_kv(q, k_cmp, v_cmp, cmp_block_size, cmp_stride, varlen: bool) -> None:
    """v_cmp None: the selection's check (k_cmp only)."""
    if v_cmp is None:
        qkv(q, k_cmp, k_cmp, "k_cmp", "k_cmp", values=False)
    else:
        qkv(q, k_cmp, v_cmp, "k_cmp", "v_cmp")
    if not varlen:
        t = q.shape[1]
        needed = 0 if t < cmp_block_size else (t - cmp_block_size) // cmp_stride + 1
        if k_cmp.shape[1] < needed:
            raise ValueError(f"k_cmp has {k_cmp.shape[1]} rows but T={t} needs at least "
                             f"Tc(T)={needed} compressed blocks (l={cmp_block_size}, d={cmp_stride})")


def block_indices(bi, q: torch.Tensor, hkv: int) -> torch.Tensor:
    """Shape [B, T, Hkv, n], int32 or int64 (converted); returns the int32 tensor."""
    tensor("block_indices", bi, 4)
    if bi.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"block_indices must be int32 (int64 accepted), got {bi.dtype}")
    if bi.device != q.device:
        raise RuntimeError(f"block_indices is on {bi.device} but q is on {q.device}")
    expected = (q.shape[0], q.shape[1], hkv)
    if tuple(bi.shape[:3]) != expected or bi.shape[3] < 1:
        raise ValueError(f"block_indices must have shape [B, T, Hkv, n] = [{expected[0]}, "
                         f"{expected[1]}, {expected[2]}, n>=1], got {tuple(bi.shape)}")
    if bi.dtype == torch.int64:
        # Out-of-int32 entries become -1, an unused slot, as the spec treats them.
        bi = torch.where((bi >= 0) & (bi < 2**31), bi, -1).to(torch.int32)
    return bi.contiguous()


def gate(name: str, g, q: torch.Tensor):
    if g is None:
        return None
    tensor(name, g, 3)
    if not g.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {g.dtype}")
    if g.device != q.device:
        raise RuntimeError(f"{name} is on {g.device} but q is on {q.device}")
    expected = tuple(q.shape[:3])
    if tuple(g.shape) != expected:
        raise ValueError(f"{name} must have shape [B, T, Hq] = {list(expected)}, got {tuple(g.shape)}")
    return g
