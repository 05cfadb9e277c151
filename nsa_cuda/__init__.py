"""nsa_cuda: DeepSeek's Native Sparse Attention as PyTorch custom ops.

    import nsa_cuda
    o = nsa_cuda.sparse_attn(q, k, v, g_cmp, g_slc, g_win)

Branches (each a registered custom op with autograd): ``compressed_attn``,
``select_blocks``, ``selected_attn``, ``window_attn``, ``mean_compress``, and
``gate_combine`` (the gated sum of the branch outputs).
Decoding with a KV cache: ``sparse_attn_with_kvcache`` (and ``NSACache`` for the layer).
``nsa_cuda.reference`` is the readable pure-PyTorch implementation of the spec.
"""
import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

try:
    from . import _C  # noqa: F401  (registers the nsa_cuda ops)
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "nsa_cuda's compiled extension (nsa_cuda._C) could not be loaded. Build it with "
        "`pip install --no-build-isolation .` (or `python setup.py build_ext --inplace` for a "
        f"development checkout). Original error: {e}") from e

from . import ops, reference  # noqa: E402,F401
from .api import (  # noqa: E402
    compressed_attn,
    gate_combine,
    mean_compress,
    select_blocks,
    selected_attn,
    sparse_attn,
    window_attn,
)
from .decode import cmp_cache_rows, sparse_attn_with_kvcache  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "sparse_attn",
    "compressed_attn",
    "select_blocks",
    "selected_attn",
    "window_attn",
    "mean_compress",
    "gate_combine",
    "sparse_attn_with_kvcache",
    "cmp_cache_rows",
    "reference",
    "NativeSparseAttention",
    "NSACache",
]
from .layer import NativeSparseAttention, NSACache  # noqa: E402
