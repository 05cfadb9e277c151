"""Decoding with a KV cache (nsa_cuda.sparse_attn_with_kvcache, NSACache): every
decoded position reproduces the prefill output of that position.

On the CPU the decode ops run the prefill kernels' loops with the queries placed
at the end of each cached sequence, so fp64 decoding matches fp64 prefill to
rounding (EXACT_TOL). The CUDA checks (skipped without a GPU) compare the CUDA
decode kernels with the fp64 CPU prefill by the spec's tolerance rule.
"""
from __future__ import annotations

import pytest
import torch

import nsa_cuda
from nsa_cuda import reference as R
from nsa_cuda.decode import MAX_DECODE_TOKENS

from conftest import Cfg, assert_close_exact, assert_close_spec, make_inputs

F64 = torch.float64
ops = torch.ops.nsa_cuda

# Small NSA settings so that every branch, the selection and the compression
# matter within ~60 tokens; and the default test configuration.
SMALL = Cfg(B=2, T=61, Hq=6, Hkv=2, Dk=8, Dv=4, l=8, d=4, lp=8, n=3, n_init=1, n_local=1, w=6)
WIDE = Cfg(B=2, T=97, Hq=4, Hkv=2, Dk=16, Dv=8, l=32, d=16, lp=64, n=4, n_init=1, n_local=2,
           w=40)
CFGS = [pytest.param(SMALL, id="small"), pytest.param(WIDE, id="wide")]
GATES = ("g_cmp", "g_slc", "g_win")


def tc(t: int, cfg: Cfg) -> int:
    return nsa_cuda.cmp_cache_rows(t, cfg.l, cfg.d)


def empty_caches(cfg: Cfg, capacity: int, dtype=F64, device="cpu"):
    z = dict(dtype=dtype, device=device)
    return dict(
        k_cache=torch.zeros(cfg.B, capacity, cfg.Hkv, cfg.Dk, **z),
        v_cache=torch.zeros(cfg.B, capacity, cfg.Hkv, cfg.Dv, **z),
        k_cmp_cache=torch.zeros(cfg.B, tc(capacity, cfg), cfg.Hkv, cfg.Dk, **z),
        v_cmp_cache=torch.zeros(cfg.B, tc(capacity, cfg), cfg.Hkv, cfg.Dv, **z),
    )


def prefill(cfg: Cfg, inp):
    return nsa_cuda.sparse_attn(inp["q"], inp["k"], inp["v"], inp["g_cmp"], inp["g_slc"],
                                inp["g_win"], **cfg.all_kw(), return_aux=True)


def decode_step(cfg: Cfg, caches, lens, inp, t, s, **kw):
    """Decodes tokens [t, t + s) of every sequence (equal lengths)."""
    sl = slice(t, t + s)
    return nsa_cuda.sparse_attn_with_kvcache(
        inp["q"][:, sl], caches["k_cache"], caches["v_cache"], caches["k_cmp_cache"],
        caches["v_cmp_cache"], lens, inp["k"][:, sl], inp["v"][:, sl],
        **{g: inp[g][:, sl] for g in GATES}, **cfg.all_kw(), return_aux=True, **kw)


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("step", [1, 4, 3])
def test_token_by_token_matches_prefill(cfg, step):
    inp = make_inputs(cfg, seed=3)
    o_ref, aux_ref = prefill(cfg, inp)
    caches = empty_caches(cfg, capacity=cfg.T + 5)
    lens = torch.zeros(cfg.B, dtype=torch.int32)
    for t in range(0, cfg.T, step):
        s = min(step, cfg.T - t)
        o, aux = decode_step(cfg, caches, lens, inp, t, s)
        assert_close_exact(o, o_ref[:, t:t + s], f"o at tokens [{t}, {t + s})")
        assert torch.equal(aux["block_indices"], aux_ref["block_indices"][:, t:t + s]), t
        for name in ("o_cmp", "o_slc", "o_win", "lse_cmp", "lse_slc", "lse_win"):
            ref = aux_ref[name][:, t:t + s] if name.startswith("o") else aux_ref[name][..., t:t + s]
            assert_close_exact(aux[name], ref, f"{name} at [{t}, {t + s})")
        lens += s
    # the caches hold the tokens and, written block by block, the mean compression
    assert torch.equal(caches["k_cache"][:, :cfg.T], inp["k"])
    n = tc(cfg.T, cfg)
    assert_close_exact(caches["k_cmp_cache"][:, :n], nsa_cuda.mean_compress(inp["k"], cfg.l, cfg.d))
    assert_close_exact(caches["v_cmp_cache"][:, :n], nsa_cuda.mean_compress(inp["v"], cfg.l, cfg.d))
    assert lens.tolist() == [cfg.T] * cfg.B  # the caller advances cache_seqlens


@pytest.mark.parametrize("cfg", CFGS)
def test_varying_lengths_in_one_batch(cfg):
    """Each batch entry continues from its own prefix length (one shorter than l)."""
    cfg = cfg.with_(B=3)
    prefix = [cfg.T - 9, 5, cfg.l + 3]
    S = 4
    inp = make_inputs(cfg, seed=5)
    caches = empty_caches(cfg, capacity=cfg.T)
    for b, p in enumerate(prefix):  # a prefill of each entry's prefix
        caches["k_cache"][b, :p] = inp["k"][b, :p]
        caches["v_cache"][b, :p] = inp["v"][b, :p]
        n = tc(p, cfg)
        caches["k_cmp_cache"][b, :n] = nsa_cuda.mean_compress(inp["k"][b:b + 1, :p], cfg.l, cfg.d)[0]
        caches["v_cmp_cache"][b, :n] = nsa_cuda.mean_compress(inp["v"][b:b + 1, :p], cfg.l, cfg.d)[0]
    lens = torch.tensor(prefix, dtype=torch.int32)
    rows = torch.tensor(prefix)[:, None] + torch.arange(S)
    batch = torch.arange(cfg.B)[:, None]
    new = {name: inp[name][batch, rows] for name in ("q", "k", "v", *GATES)}
    o = nsa_cuda.sparse_attn_with_kvcache(
        new["q"], caches["k_cache"], caches["v_cache"], caches["k_cmp_cache"],
        caches["v_cmp_cache"], lens, new["k"], new["v"], **{g: new[g] for g in GATES},
        **cfg.all_kw())
    for b, p in enumerate(prefix):
        one = {name: t[b:b + 1, :p + S] for name, t in inp.items()}
        o_ref, _ = prefill(cfg, one)
        assert_close_exact(o[b:b + 1], o_ref[:, p:p + S], f"batch entry {b}")


def test_host_bound_on_lengths():
    """max_cache_seqlen replaces the read of cache_seqlens; the result is the same."""
    cfg = SMALL
    inp = make_inputs(cfg, seed=19)
    outs = []
    for bound in (None, 6):
        caches = empty_caches(cfg, capacity=cfg.T)
        lens = torch.tensor([6, 2], dtype=torch.int32)
        for b, n in enumerate(lens.tolist()):
            caches["k_cache"][b, :n] = inp["k"][b, :n]
            caches["v_cache"][b, :n] = inp["v"][b, :n]
        outs.append(decode_step(cfg, caches, lens, inp, 6, 2, max_cache_seqlen=bound)[0])
    assert torch.equal(outs[0], outs[1])


def test_caches_already_hold_the_new_tokens():
    """Without k_new/v_new the caches are read as they are: cache_seqlens counts the
    new tokens, and nothing is written."""
    cfg = SMALL
    inp = make_inputs(cfg, seed=7)
    o_ref, _ = prefill(cfg, inp)
    caches = empty_caches(cfg, capacity=cfg.T)
    caches["k_cache"].copy_(inp["k"])
    caches["v_cache"].copy_(inp["v"])
    n = tc(cfg.T, cfg)
    caches["k_cmp_cache"][:, :n] = nsa_cuda.mean_compress(inp["k"], cfg.l, cfg.d)
    caches["v_cmp_cache"][:, :n] = nsa_cuda.mean_compress(inp["v"], cfg.l, cfg.d)
    before = {name: t.clone() for name, t in caches.items()}
    S = 2
    o = nsa_cuda.sparse_attn_with_kvcache(
        inp["q"][:, -S:], *caches.values(), torch.full((cfg.B,), cfg.T, dtype=torch.int32),
        **{g: inp[g][:, -S:] for g in GATES}, **cfg.all_kw())
    assert_close_exact(o, o_ref[:, -S:])
    for name, t in caches.items():
        assert torch.equal(t, before[name]), name


def test_branch_subsets_and_given_block_indices():
    cfg = SMALL
    inp = make_inputs(cfg, seed=9)
    bi = torch.randint(-1, cfg.T // cfg.lp + 1, (cfg.B, cfg.T, cfg.Hkv, cfg.n), dtype=torch.int32)
    o_ref = nsa_cuda.sparse_attn(inp["q"], inp["k"], inp["v"], None, inp["g_slc"], None,
                                 **cfg.all_kw(), block_indices=bi)
    caches = empty_caches(cfg, capacity=cfg.T)
    lens = torch.zeros(cfg.B, dtype=torch.int32)
    for t in range(0, cfg.T, 4):
        s = min(4, cfg.T - t)
        sl = slice(t, t + s)
        o = nsa_cuda.sparse_attn_with_kvcache(
            inp["q"][:, sl], *caches.values(), lens, inp["k"][:, sl], inp["v"][:, sl],
            g_cmp=None, g_slc=inp["g_slc"][:, sl], g_win=None, block_indices=bi[:, sl],
            **cfg.all_kw())
        assert_close_exact(o, o_ref[:, sl], f"tokens [{t}, {t + s})")
        lens += s


def test_full_cache_raises():
    cfg = SMALL
    inp = make_inputs(cfg, seed=11)
    caches = empty_caches(cfg, capacity=10)
    lens = torch.tensor([8, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="KV cache full: batch entry 0 holds 8 tokens"):
        decode_step(cfg, caches, lens, inp, 0, 4)
    assert caches["k_cache"].abs().sum() == 0  # nothing was written
    # a host-side bound checks the same without reading cache_seqlens
    with pytest.raises(ValueError, match="KV cache full: the longest sequence holds up to 8"):
        decode_step(cfg, caches, lens, inp, 0, 4, max_cache_seqlen=8)
    with pytest.raises(TypeError, match="max_cache_seqlen must be an int"):
        decode_step(cfg, caches, lens, inp, 0, 1, max_cache_seqlen=8.0)
    assert caches["k_cache"].abs().sum() == 0
    # the ops' own guard, for callers that skip the Python checks
    with pytest.raises(RuntimeError, match="more than its cache holds"):
        ops.window_attn_decode(inp["q"][:, :1], caches["k_cache"], caches["v_cache"],
                               torch.tensor([11, 3], dtype=torch.int32), cfg.w, 1.0)
    with pytest.raises(RuntimeError, match="more than its cache holds"):
        ops.update_cmp_cache(caches["k_cache"], caches["k_cmp_cache"], lens, 3, cfg.l, cfg.d)



def test_append_to_cache():
    """The new k and v rows land at cache_seqlens[b] + i of each batch entry (v with
    its own head dim, k from strided rows), every other row untouched; an append past
    the capacity raises on the CPU (CUDA drops such rows instead:
    test_cuda_append_past_capacity_stays_in_bounds)."""
    from nsa_cuda.decode import append_to_cache
    k_cache, v_cache = torch.zeros(3, 6, 2, 4), torch.zeros(3, 6, 2, 3)
    k_new = torch.randn(3, 2, 4, 4)[:, :, 1:3]  # strided rows
    v_new = torch.randn(3, 2, 2, 3)
    lens = torch.tensor([0, 3, 4], dtype=torch.int32)
    append_to_cache(k_cache, v_cache, k_new, v_new, lens)
    for cache, new in ((k_cache, k_new), (v_cache, v_new)):
        want = torch.zeros_like(cache)
        for b, n in enumerate(lens.tolist()):
            want[b, n:n + 2] = new[b]
        assert torch.equal(cache, want)
    with pytest.raises(RuntimeError, match="more than its cache holds"):
        append_to_cache(k_cache, v_cache, k_new, v_new, torch.tensor([0, 3, 5], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="does not fit v_cache"):
        ops.append_kv_to_cache(k_cache, v_cache, lens, k_new, v_new[..., :2])


def test_append_with_cmp_caches():
    """append_kv_to_cache with the compressed caches: the tokens land as without them,
    and exactly the blocks the new tokens complete hold the mean of their tokens."""
    from nsa_cuda.decode import append_to_cache
    l, d, cap, S = 8, 4, 40, 5
    rows = (cap - l) // d + 1
    lens = torch.tensor([0, 4, 7, cap - S], dtype=torch.int32)
    k_cache, v_cache = torch.randn(4, cap, 2, 6, dtype=torch.float64), torch.randn(4, cap, 2, 3, dtype=torch.float64)
    k_cmp = torch.full((4, rows, 2, 6), 7.0, dtype=torch.float64)
    v_cmp = torch.full((4, rows, 2, 3), 7.0, dtype=torch.float64)
    k_new = torch.randn(4, S, 4, 6, dtype=torch.float64)[:, :, ::2]
    v_new = torch.randn(4, S, 2, 3, dtype=torch.float64)
    plain = [k_cache.clone(), v_cache.clone()]
    append_to_cache(*plain, k_new, v_new, lens)
    append_to_cache(k_cache, v_cache, k_new, v_new, lens, k_cmp, v_cmp, l, d)
    assert torch.equal(k_cache, plain[0]) and torch.equal(v_cache, plain[1])
    for cache, cmp in ((k_cache, k_cmp), (v_cache, v_cmp)):
        for b, n in enumerate(lens.tolist()):
            done_before = (n - l) // d + 1 if n >= l else 0
            done_after = (n + S - l) // d + 1 if n + S >= l else 0
            for i in range(rows):
                if done_before <= i < done_after:
                    torch.testing.assert_close(cmp[b, i], cache[b, i * d:i * d + l].mean(0), rtol=0, atol=1e-12)
                else:
                    assert (cmp[b, i] == 7.0).all(), (b, i)
    with pytest.raises(RuntimeError, match="pass both k_cmp_cache and v_cmp_cache"):
        ops.append_kv_to_cache(k_cache, v_cache, lens * 0, k_new, v_new, k_cmp, None, l, d)
    with pytest.raises(RuntimeError, match="compressed cache v_cmp_cache .* does not match the token cache"):
        ops.append_kv_to_cache(k_cache, v_cache, lens * 0, k_new, v_new, k_cmp, k_cmp, l, d)
    with pytest.raises(RuntimeError, match="cmp_stride dividing cmp_block_size"):
        ops.append_kv_to_cache(k_cache, v_cache, lens * 0, k_new, v_new, k_cmp, v_cmp, l, 3)


def test_argument_errors():
    cfg = SMALL
    inp = make_inputs(cfg, T=MAX_DECODE_TOKENS + 1, seed=13)
    caches = empty_caches(cfg, capacity=32)
    lens = torch.zeros(cfg.B, dtype=torch.int32)
    gates = {g: inp[g][:, :1] for g in GATES}

    def call(q=inp["q"][:, :1], lens=lens, k_new=inp["k"][:, :1], v_new=inp["v"][:, :1],
             caches=caches, gates=gates):
        return nsa_cuda.sparse_attn_with_kvcache(q, *caches.values(), lens, k_new, v_new,
                                                 **gates, **cfg.all_kw())

    with pytest.raises(ValueError, match="decoding takes 1 to 8"):
        call(q=inp["q"], gates={g: inp[g] for g in GATES})
    with pytest.raises(TypeError, match="cache_seqlens must be int32"):
        call(lens=lens.long())
    with pytest.raises(ValueError, match="pass both k_new and v_new"):
        call(v_new=None)
    with pytest.raises(ValueError, match=r"k_new must have shape \[B, S, Hkv, D\]"):
        call(k_new=inp["k"][:, :2])
    small = dict(caches, k_cmp_cache=caches["k_cmp_cache"][:, :3],
                 v_cmp_cache=caches["v_cmp_cache"][:, :3])
    with pytest.raises(ValueError, match="needs Tc"):
        call(caches=small)
    with pytest.raises(ValueError, match="g_slc must have shape"):
        call(gates=dict(gates, g_slc=inp["g_slc"][:, :2]))
    with pytest.raises(TypeError):  # the gates are keyword-only and required
        nsa_cuda.sparse_attn_with_kvcache(inp["q"][:, :1], *caches.values(), lens)


def test_compiles_fullgraph():
    """One decode step under torch.compile(fullgraph=True) writes the same caches and
    returns the same output as eager."""
    cfg = SMALL
    inp = make_inputs(cfg, seed=17)
    lens = torch.full((cfg.B,), 20, dtype=torch.int32)

    def step(caches, lens, kw):
        return nsa_cuda.sparse_attn_with_kvcache(
            inp["q"][:, 20:22], *caches.values(), lens, inp["k"][:, 20:22], inp["v"][:, 20:22],
            **{g: inp[g][:, 20:22] for g in GATES}, **kw)

    eager_caches = empty_caches(cfg, capacity=cfg.T)
    for c in (eager_caches,):
        c["k_cache"][:, :20] = inp["k"][:, :20]
        c["v_cache"][:, :20] = inp["v"][:, :20]
    compiled_caches = {n: t.clone() for n, t in eager_caches.items()}
    o_eager = step(eager_caches, lens, cfg.all_kw())
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    o_comp = compiled(compiled_caches, lens, cfg.all_kw())
    assert_close_exact(o_comp, o_eager)
    for name in eager_caches:
        assert_close_exact(compiled_caches[name], eager_caches[name], name)


# --------------------------------------------------------------------------------------
# The layer: generation with NSACache
# --------------------------------------------------------------------------------------

LAYER_NSA = dict(cmp_block_size=8, cmp_stride=4, slc_block_size=8, slc_num_blocks=3,
                 slc_init_blocks=1, slc_local_blocks=1, window_size=6)


def make_layer(compression, independent_kv, seed=0):
    torch.manual_seed(seed)
    layer = nsa_cuda.NativeSparseAttention(32, 4, 2, 8, 8, compression=compression,
                                           independent_kv=independent_kv, **LAYER_NSA).to(F64)
    with torch.no_grad():  # non-trivial gates and phi
        layer.g_proj.bias.uniform_(-2, 2)
        if compression == "mlp":
            for phi in (layer.k_phi, layer.v_phi):
                phi.w2.normal_(0, 0.3)
                phi.pos.normal_(0, 0.5)
    return layer


@pytest.mark.parametrize("compression", ["mlp", "mean"])
@pytest.mark.parametrize("independent_kv", [False, True], ids=["shared", "indep"])
@pytest.mark.parametrize("prompt,step", [(0, 1), (13, 3), (24, 8)])
def test_layer_generation_matches_full_forward(compression, independent_kv, prompt, step):
    layer = make_layer(compression, independent_kv)
    T = 45
    x = torch.randn(2, T, 32, dtype=F64)
    with torch.no_grad():
        y_full = layer(x)
        cache = layer.new_cache(batch_size=2, capacity=T + 3)
        outs = []
        if prompt:
            outs.append(layer(x[:, :prompt], cache=cache))
        for t in range(prompt, T, step):
            outs.append(layer(x[:, t:min(t + step, T)], cache=cache))
    assert cache.seqlens.tolist() == [T, T]
    assert_close_exact(torch.cat(outs, dim=1), y_full, "layer output")


@pytest.mark.parametrize("compression", ["mlp", "mean"])
@pytest.mark.parametrize("independent_kv", [False, True], ids=["shared", "indep"])
def test_layer_packed_prompts_then_decoding(compression, independent_kv):
    """Prompts of different lengths go in packed (cu_seqlens) and each cache entry then
    continues its own sequence: every output equals the full forward of that sequence."""
    layer = make_layer(compression, independent_kv)
    prompts, extra = [13, 30, 5], 6
    xs = [torch.randn(1, n + extra, 32, dtype=F64) for n in prompts]
    cu = torch.tensor([0, 13, 43, 48], dtype=torch.int32)
    with torch.no_grad():
        want = [layer(x) for x in xs]
        cache = layer.new_cache(batch_size=3, capacity=40)
        y = layer(torch.cat([x[:, :n] for x, n in zip(xs, prompts)], 1), cu_seqlens=cu,
                  max_seqlen=30, cache=cache)
        for b, n in enumerate(prompts):
            assert_close_exact(y[:, cu[b]:cu[b + 1]], want[b][:, :n], f"prompt {b}")
        assert cache.seqlens.tolist() == prompts
        for t in range(0, extra, 2):
            step = torch.cat([x[:, n + t:n + t + 2] for x, n in zip(xs, prompts)], 0)
            y = layer(step, cache=cache)
            for b, n in enumerate(prompts):
                assert_close_exact(y[b:b + 1], want[b][:, n + t:n + t + 2], f"seq {b} step {t}")


def test_layer_cache_errors():
    layer = make_layer("mean", False)
    cache = layer.new_cache(batch_size=2, capacity=12)
    x = torch.randn(2, 10, 32, dtype=F64)
    with torch.no_grad():
        layer(x, cache=cache)  # prefill of 10 tokens
        with pytest.raises(ValueError, match="1 to 8 new tokens"):
            layer(torch.randn(2, 9, 32, dtype=F64), cache=cache)
        with pytest.raises(ValueError, match="KV cache full"):
            layer(torch.randn(2, 3, 32, dtype=F64), cache=cache)
        with pytest.raises(ValueError, match="holds 2 sequences"):
            layer(torch.randn(3, 1, 32, dtype=F64), cache=cache)
        cache.reset()
        with pytest.raises(ValueError, match="KV cache full: the prompt has 13"):
            layer(torch.randn(2, 13, 32, dtype=F64), cache=cache)


# --------------------------------------------------------------------------------------
# CUDA: the decode kernels against the fp64 CPU prefill (spec's tolerance rule)
# --------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA_CFGS = [
    Cfg(B=2, T=300, Hq=16, Hkv=1, Dk=128, Dv=128, l=32, d=16, lp=64, n=4, n_init=1, n_local=2,
        w=128),
    Cfg(B=3, T=200, Hq=8, Hkv=2, Dk=64, Dv=64, l=32, d=16, lp=32, n=3, n_init=1, n_local=1, w=48),
    Cfg(B=1, T=150, Hq=5, Hkv=5, Dk=192, Dv=128, l=16, d=8, lp=16, n=5, n_init=1, n_local=2,
        w=40),
]


@cuda
@pytest.mark.parametrize("cfg", CUDA_CFGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("S", [1, 4, 8])
@pytest.mark.parametrize("splits", [None, 1], ids=["auto-splits", "one-split"])
def test_cuda_decode_matches_prefill(cfg, dtype, S, splits, monkeypatch):
    """Batch entries at different lengths decode S tokens on CUDA; each is compared with
    the reference over its whole sequence, fp64 (ref) and the input dtype on the GPU
    (ref_lp), all with the block_indices the CUDA selection chose; both the branch ops
    (return_aux) and the one-op step (sparse_attn_decode). At these sizes the
    split heuristic gives each split about one KV chunk; one split
    (NSA_DECODE_SPLITS=1) walks a tile's chunks through the double-buffered path and
    writes o and lse without the combine kernel."""
    if splits is not None:
        monkeypatch.setenv("NSA_DECODE_SPLITS", str(splits))
    dev = "cuda"
    # inputs rounded to the low-precision dtype once: every side sees the same values
    inp = {n: t.to(dtype).to(F64) for n, t in make_inputs(cfg, seed=21).items()}
    prefix = [cfg.T - S - 7 * b for b in range(cfg.B)]
    caches = empty_caches(cfg, capacity=cfg.T, dtype=dtype, device=dev)
    for b, p in enumerate(prefix):
        caches["k_cache"][b, :p] = inp["k"][b, :p].to(dev, dtype)
        caches["v_cache"][b, :p] = inp["v"][b, :p].to(dev, dtype)
        n = tc(p, cfg)
        for x, name in (("k", "k_cmp_cache"), ("v", "v_cmp_cache")):
            caches[name][b, :n] = nsa_cuda.mean_compress(
                inp[x][b:b + 1, :p].to(dev, dtype), cfg.l, cfg.d)[0]
    rows = torch.tensor(prefix)[:, None] + torch.arange(S)
    batch = torch.arange(cfg.B)[:, None]
    new = {n: inp[n][batch, rows].to(dev, dtype) for n in ("q", "k", "v", *GATES)}
    lens = torch.tensor(prefix, dtype=torch.int32, device=dev)
    o, aux = nsa_cuda.sparse_attn_with_kvcache(
        new["q"], *caches.values(), lens, new["k"], new["v"], **{g: new[g] for g in GATES},
        **cfg.all_kw(), return_aux=True)
    # The same step again without aux: one op (sparse_attn_decode), whose gated sum
    # merges the branches' KV splits. Appending the same rows again changes nothing.
    o_step = nsa_cuda.sparse_attn_with_kvcache(
        new["q"], *caches.values(), lens, new["k"], new["v"], **{g: new[g] for g in GATES},
        **cfg.all_kw())
    torch.cuda.synchronize()
    assert not torch.isnan(o).any() and not torch.isnan(o_step).any()
    # every decoded selection is valid: the current block is always selected
    cur = rows // cfg.lp
    assert (aux["block_indices"].cpu() == cur[:, :, None, None]).any(-1).all()
    for b, p in enumerate(prefix):
        one = [inp[n][b:b + 1, :p + S] for n in ("q", "k", "v", *GATES)]
        full_bi = torch.full((1, p + S, cfg.Hkv, cfg.n), -1, dtype=torch.int32)
        full_bi[:, p:] = aux["block_indices"][b:b + 1].cpu()
        o64 = R.sparse_attn(*one, **cfg.all_kw(), block_indices=full_bi)
        o_lp = R.sparse_attn(*(t.to(dev, dtype) for t in one), **cfg.all_kw(),
                             block_indices=full_bi.to(dev))
        for name, x in (("branch ops", o), ("sparse_attn_decode", o_step)):
            assert_close_spec(x[b:b + 1].cpu().double(), o64[:, p:], o_lp[:, p:].cpu().double(),
                              f"{name}, batch entry {b}")


@cuda
@pytest.mark.parametrize("cfg", CUDA_CFGS, ids=str)
def test_cuda_compressed_select_decode_matches_separate_ops(cfg):
    """The fused compressed attention + selection (the selection reads the scores the
    attention kept, not k_cmp): o and lse bitwise those of compressed_attn_decode, the
    blocks right by fp64 scores per row (near-ties aside), at lengths that differ."""
    from test_cuda_fwd import check_selection_rows
    dev, dtype, S = "cuda", torch.bfloat16, 4
    inp = {n: t.to(dev, dtype) for n, t in make_inputs(cfg, seed=29).items()}
    ops = torch.ops.nsa_cuda
    lens = torch.tensor([cfg.T - 7 * b for b in range(cfg.B)], dtype=torch.int32, device=dev)
    q = inp["q"][:, -S:].contiguous()
    kc = nsa_cuda.mean_compress(inp["k"], cfg.l, cfg.d)
    vc = nsa_cuda.mean_compress(inp["v"], cfg.l, cfg.d)
    scale = cfg.Dk ** -0.5
    o, lse, bi = ops.compressed_select_decode(q, kc, vc, lens, cfg.l, cfg.d, cfg.lp, cfg.n,
                                              cfg.n_init, cfg.n_local, scale)
    o1, lse1 = ops.compressed_attn_decode(q, kc, vc, lens, cfg.l, cfg.d, scale)
    assert torch.equal(o, o1) and torch.equal(lse, lse1)
    picks = [(b, i, int(lens[b]) - S + i) for b in range(cfg.B) for i in range(S)]
    check_selection_rows(q, kc, bi, picks, cfg.l, cfg.d, cfg.lp, cfg.n, cfg.n_init, cfg.n_local,
                         scale)


@cuda
def test_cuda_append_past_capacity_stays_in_bounds():
    """With the room check skipped (graph capture, torch.compile), a full cache must not
    be written past its capacity: rows in range are written, the overflow is dropped,
    every other row is untouched (no device-side assert, no stray write)."""
    from nsa_cuda.decode import append_to_cache
    caches = [torch.zeros(3, 5, 2, D, device="cuda", dtype=torch.bfloat16) for D in (4, 3)]
    news = [torch.randn(3, 3, 2, D, device="cuda").to(torch.bfloat16) for D in (4, 3)]
    lens = torch.tensor([1, 3, 5], dtype=torch.int32, device="cuda")
    append_to_cache(*caches, *news, lens)
    torch.cuda.synchronize()
    for cache, new in zip(caches, news):
        want = torch.zeros_like(cache)
        want[0, 1:4] = new[0]
        want[1, 3:5] = new[1, :2]
        assert torch.equal(cache, want)


@cuda
@pytest.mark.parametrize("num_new", [1, 4, 8])
def test_cuda_append_with_cmp_caches(num_new):
    """The fused append (the blocks it completes pooled in the same launch, from k_new
    / v_new) is bitwise the append followed by update_cmp_cache on each cache, also at
    a full cache, where the rows past the capacity are dropped."""
    from nsa_cuda.decode import append_to_cache
    l, d, cap, dtype = 32, 16, 96, torch.bfloat16
    rows = nsa_cuda.cmp_cache_rows(cap, l, d)
    lens = torch.tensor([0, 20, 31, 47, cap - num_new, cap - 2], dtype=torch.int32, device="cuda")
    tokens = [torch.randn(6, cap, 2, D, device="cuda").to(dtype) for D in (192, 128)]
    cmps = [torch.full((6, rows, 2, D), float("nan"), device="cuda", dtype=dtype) for D in (192, 128)]
    news = [torch.randn(6, num_new, 2, D, device="cuda").to(dtype) for D in (192, 128)]
    fused = [t.clone() for t in tokens + cmps]
    append_to_cache(fused[0], fused[1], *news, lens, fused[2], fused[3], l, d)
    separate = [t.clone() for t in tokens + cmps]
    append_to_cache(separate[0], separate[1], *news, lens)
    for x, x_cmp in ((separate[0], separate[2]), (separate[1], separate[3])):
        ops.update_cmp_cache(x, x_cmp, lens, num_new, l, d)
    torch.cuda.synchronize()
    for a, b in zip(fused, separate):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    assert (~fused[2].isnan()).any()  # some block completed


@cuda
def test_cuda_graph_capture_and_replay():
    """A decode step (append, compression, the three branches) captured in a CUDA graph
    replays to the same output as the eager step, with no host sync inside."""
    cfg = CUDA_CFGS[0].with_(B=2)
    dev, dtype, S = "cuda", torch.bfloat16, 1
    inp = {n: t.to(dev, dtype) for n, t in make_inputs(cfg, seed=23).items()}
    p = cfg.T - 40

    def fresh_caches():
        c = empty_caches(cfg, capacity=cfg.T, dtype=dtype, device=dev)
        c["k_cache"][:, :p] = inp["k"][:, :p]
        c["v_cache"][:, :p] = inp["v"][:, :p]
        n = tc(p, cfg)
        c["k_cmp_cache"][:, :n] = nsa_cuda.mean_compress(inp["k"][:, :p], cfg.l, cfg.d)
        c["v_cmp_cache"][:, :n] = nsa_cuda.mean_compress(inp["v"][:, :p], cfg.l, cfg.d)
        return c

    def step(c, lens, t):
        sl = slice(t, t + S)
        return nsa_cuda.sparse_attn_with_kvcache(
            inp["q"][:, sl], *c.values(), lens, inp["k"][:, sl], inp["v"][:, sl],
            **{g: inp[g][:, sl] for g in GATES}, **cfg.all_kw())

    eager_c = fresh_caches()
    want = step(eager_c, torch.full((cfg.B,), p, dtype=torch.int32, device=dev), p)

    lens = torch.full((cfg.B,), p, dtype=torch.int32, device=dev)
    step(fresh_caches(), lens.clone(), p)  # warm-up (allocations, smem attributes)
    graph_c = fresh_caches()
    g = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(g, stream=stream):
            out = step(graph_c, lens, p)
    torch.cuda.current_stream().wait_stream(stream)
    for name, t in graph_c.items():  # capture ran nothing
        assert torch.equal(t, fresh_caches()[name]), name
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    for name, t in graph_c.items():  # the append and the compression ran in the replay
        assert torch.equal(t, eager_c[name]), name
