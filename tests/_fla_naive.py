"""flash-linear-attention's naive NSA (fla/ops/nsa/naive.py) made runnable on CPU.

A second opinion for tests/test_reference.py. naive.py imports two helpers from
``fla.ops.utils``: ``mean_pooling`` is a Triton kernel (no CPU path) and importing
``fla.ops.utils`` needs Triton at all. So the file is executed as a private copy
with those two imports replaced by the torch equivalents below; the installed
``fla`` package is neither imported nor patched. Needs ``fla-core`` (found, not
imported) and ``einops``.
"""

from __future__ import annotations

import importlib.util
import pathlib
import types
import warnings

import torch
import torch.nn.functional as F

_IMPORTS = (
    "from fla.ops.utils import prepare_chunk_offsets\n",
    "from fla.ops.utils.pooling import mean_pooling\n",
)


def prepare_chunk_offsets(cu_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """fla.ops.utils.index.prepare_chunk_offsets: ceil(len / chunk) chunks per sequence."""
    lens = torch.diff(cu_seqlens)
    return F.pad((lens + chunk_size - 1) // chunk_size, (1, 0), value=0).cumsum(-1)


def _chunk_means(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[T, H, D] -> [ceil(T / chunk), H, D]; the last, partial chunk averages its own rows."""
    return torch.stack([c.mean(dim=0) for c in x.split(chunk_size, dim=0)]) if x.shape[0] \
        else x.new_zeros(0, *x.shape[1:])


def mean_pooling(x: torch.Tensor, chunk_size: int, cu_seqlens=None, **kwargs) -> torch.Tensor:
    """Torch version of fla.ops.utils.pooling.mean_pooling (read from its Triton kernel:
    ``sum / min(BT, T - i_t * BT)``, ``cdiv(T, BT)`` chunks, varlen chunks per sequence)."""
    if cu_seqlens is None:
        return torch.stack([_chunk_means(xb, chunk_size) for xb in x])
    cu = cu_seqlens.tolist()
    return torch.cat([_chunk_means(x[0, a:b], chunk_size) for a, b in zip(cu, cu[1:])]).unsqueeze(0)


def load_fla_naive() -> types.ModuleType | None:
    """The private copy of fla's naive NSA module, or None if fla-core/einops are missing."""
    if importlib.util.find_spec("einops") is None:
        return None
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "ops" / "nsa" / "naive.py"
    if not path.is_file():
        return None
    src = path.read_text()
    for line in _IMPORTS:
        if line not in src:
            raise RuntimeError(f"{path} no longer contains {line.strip()!r}; update tests/_fla_naive.py")
        src = src.replace(line, "")
    mod = types.ModuleType("_fla_naive_nsa")
    mod.__file__ = str(path)
    mod.prepare_chunk_offsets = prepare_chunk_offsets
    mod.mean_pooling = mean_pooling
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Flash Attention is not installed"
        exec(compile(src, str(path), "exec"), mod.__dict__)
    return mod
