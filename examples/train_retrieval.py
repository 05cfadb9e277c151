"""Long-range retrieval: NSA vs. sliding-window vs. full attention, trained from scratch.

The task. A sequence of random filler tokens hides key-value pairs (a key token
followed by its value token) anywhere in the first part of the sequence. The
sequence ends with a query section: a marker, then ``key value`` for a few of the
planted keys. The model must predict each queried value, which it can only do by
finding the key's earlier occurrence (an induction-head job: layer 1 copies "my
previous token is key K" into the value position, layer 2's query for K retrieves
it). Most keys lie farther back than the attention window, so window-only attention
is at chance (1 / #values) on them, while full attention can find them. NSA must
find them through its compressed branch (the queried key token matches the block
holding the planted pair) and the blocks it selects from those scores.

Three small causal LMs, identical but for the attention: embedding, a few blocks of
[RMSNorm, attention, RMSNorm, MLP], RMSNorm, LM head.

    python examples/train_retrieval.py --quick          # CPU, < 10 minutes, all three
    python examples/train_retrieval.py --device cuda    # longer sequences, larger model

Writes examples/out/retrieval_<tag>.{png,json} (and, for --quick, copies them to
examples/results/) and prints a table of the final accuracies. Needs matplotlib for
the plot (the JSON and the table are written without it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nsa_cuda  # noqa: E402


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Config:
    # task
    seq_len: int = 256
    num_filler: int = 16        # filler token ids [0, num_filler)
    num_keys: int = 16          # key tokens
    num_values: int = 8         # value tokens (chance = 1 / num_values)
    num_pairs: int = 16         # planted pair tokens per sequence (distinct keys)
    num_queries: int = 16       # queried keys at the end (distinct)
    # model
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    head_dim: int = 32
    mlp_ratio: int = 4
    # NSA (window also for the window-only baseline)
    # (--quick: T=256 in 16 selection blocks of 16 tokens; n=6 = the first block, the 2
    # local ones and 3 chosen from the compressed scores; keys up to ~250 tokens back,
    # 93% of them beyond the 32-token window)
    cmp_block_size: int = 8
    cmp_stride: int = 4
    slc_block_size: int = 16
    slc_num_blocks: int = 6
    slc_init_blocks: int = 1
    slc_local_blocks: int = 2
    window_size: int = 32
    compression: str = "mlp"    # learned phi; "mean" learns this task much more slowly
    # training
    steps: int = 400
    warm_steps: int = 150       # curriculum: the first steps use short sequences, where
    warm_seq_len: int = 128     # the keys are still mostly beyond the window but n covers
                                # 6 of the 8 selection blocks: the model first learns the
                                # retrieval (induction) through nearly dense selection, then
                                # to pick the right blocks at the full length
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 20
    eval_every: int = 25
    eval_batches: int = 2       # x batch_size sequences for each curve point
    final_eval_batches: int = 8
    log_every: int = 20
    seed: int = 0
    dtype: str = "float32"

    @property
    def key0(self) -> int:
        return self.num_filler

    @property
    def val0(self) -> int:
        return self.key0 + self.num_keys

    @property
    def vocab_size(self) -> int:  # + the query marker
        return self.val0 + self.num_values + 1

    @property
    def marker(self) -> int:
        return self.vocab_size - 1


QUICK = Config()
CUDA = Config(seq_len=2048, num_pairs=16, num_queries=8, d_model=256, num_layers=2,
              num_heads=4, num_kv_heads=1, head_dim=64, cmp_block_size=32, cmp_stride=16,
              slc_block_size=64, slc_num_blocks=8, window_size=128, steps=2000,
              warm_steps=600, warm_seq_len=256,
              batch_size=32, lr=1e-3, warmup=100, eval_every=100, eval_batches=4,
              final_eval_batches=16, log_every=50, dtype="bfloat16")


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------

def make_batch(cfg: Config, batch: int, gen: torch.Generator):
    """Returns tokens [B, T], targets [B, T] (-100 where not scored) and dist [B, T]:
    for each scored position, how far back its planted pair is (-1 where not scored),
    for the within/beyond-window split.

    The body is filler with ``num_pairs`` planted pairs ``K_k V_v`` (distinct keys); the
    tail is the marker and ``num_queries`` distinct planted keys, each followed by its
    value: ``[M, K_a, V_a, K_b, V_b, ...]``. The value after each queried key is scored:
    the model must find the earlier ``K_a``, wherever it is, and read the value after it.
    """
    T, P, Q = cfg.seq_len, cfg.num_pairs, cfg.num_queries
    tail = 1 + 2 * Q
    body = T - tail
    key0, val0 = cfg.key0, cfg.val0
    tokens = torch.randint(0, cfg.num_filler, (batch, T), generator=gen)
    keys = torch.rand(batch, cfg.num_keys, generator=gen).argsort(-1)[:, :P] + key0  # distinct
    vals = torch.randint(0, cfg.num_values, (batch, P), generator=gen) + val0
    # P non-overlapping 2-token slots: sorted distinct offsets, spread apart
    slots = torch.rand(batch, body // 2 - P, generator=gen).argsort(-1)[:, :P].sort(-1).values
    pos = 2 * (slots + torch.arange(P)) + (body % 2)  # [B, P], gaps >= 2
    tokens.scatter_(1, pos, keys)
    tokens.scatter_(1, pos + 1, vals)
    tokens[:, body] = cfg.marker
    which = torch.rand(batch, P, generator=gen).argsort(-1)[:, :Q]  # queried pairs
    qpos = body + 1 + 2 * torch.arange(Q)
    tokens[:, qpos] = keys.gather(1, which)
    tokens[:, qpos + 1] = vals.gather(1, which)
    targets = torch.full((batch, T), -100, dtype=torch.long)
    targets[:, qpos] = vals.gather(1, which)
    dist = torch.full((batch, T), -1, dtype=torch.long)
    dist[:, qpos] = qpos - (pos.gather(1, which) + 1)  # back to the value token
    return tokens, targets, dist


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


def rope(x, theta: float = 10000.0):
    """x [B, T, H, D], positions arange(T); the same RoPE the NSA layer applies."""
    T, D = x.shape[1], x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D))
    f = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * inv
    emb = torch.cat((f, f), -1)[None, :, None, :]
    x1, x2 = x.float().chunk(2, -1)
    return (x.float() * emb.cos() + torch.cat((-x2, x1), -1) * emb.sin()).to(x.dtype)


class FullAttention(nn.Module):
    """Causal softmax attention (torch SDPA) with the NSA layer's projections and RoPE."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.h, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, self.h * self.d, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.hkv * self.d, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.hkv * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, cfg.d_model, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        q = rope(self.q_proj(x).view(B, T, self.h, self.d)).transpose(1, 2)
        k = rope(self.k_proj(x).view(B, T, self.hkv, self.d)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.hkv, self.d).transpose(1, 2)
        g = self.h // self.hkv
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.h * self.d))


def make_attention(kind: str, cfg: Config) -> nn.Module:
    if kind == "full":
        return FullAttention(cfg)
    branches = {"nsa": ("cmp", "slc", "win"), "window": ("win",)}[kind]
    return nsa_cuda.NativeSparseAttention(
        cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
        cmp_block_size=cfg.cmp_block_size, cmp_stride=cfg.cmp_stride,
        slc_block_size=cfg.slc_block_size, slc_num_blocks=cfg.slc_num_blocks,
        slc_init_blocks=cfg.slc_init_blocks, slc_local_blocks=cfg.slc_local_blocks,
        window_size=cfg.window_size, compression=cfg.compression, branches=branches)


class Block(nn.Module):
    def __init__(self, kind: str, cfg: Config):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.d_model), RMSNorm(cfg.d_model)
        self.attn = make_attention(kind, cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model),
                                 nn.GELU(), nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model))

    def forward(self, x, cache=None):
        h = self.norm1(x)
        x = x + (self.attn(h) if cache is None else self.attn(h, cache=cache))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, kind: str, cfg: Config):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # token shift: each position also sees its previous token (a width-2 causal
        # conv over the one-hot input, as in RWKV / the short convs of H3 and Mamba)
        self.embed_prev = nn.Embedding(cfg.vocab_size + 1, cfg.d_model)
        self.blocks = nn.ModuleList(Block(kind, cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.5)
        nn.init.normal_(self.embed_prev.weight, std=0.5)
        self.bos = cfg.vocab_size  # the "previous token" of position 0

    def forward(self, tokens, prev=None, caches=None):
        """Logits [B, T, vocab]. With ``caches`` (one NSACache per block), ``tokens``
        continue the cached sequences and ``prev`` is the token before ``tokens[:, 0]``."""
        if prev is None:
            prev = torch.full_like(tokens[:, :1], self.bos)
        prev = torch.cat([prev, tokens[:, :-1]], dim=1)
        x = self.embed(tokens) + self.embed_prev(prev)
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if caches is None else caches[i])
        return self.head(self.norm(x))

    def new_caches(self, batch: int, capacity: int):
        return [blk.attn.new_cache(batch, capacity) for blk in self.blocks]


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------

def evaluate(model, batches, cfg, device, dtype):
    model.eval()
    stats = dict(correct_beyond=0, n_beyond=0, correct_within=0, n_within=0, loss=0.0, n=0)
    with torch.no_grad(), autocast(device, dtype):
        for tokens, targets, dist in batches:
            logits = model(tokens.to(device)).float()
            mask = targets >= 0
            lg, tg, ds = logits[mask.to(device)].cpu(), targets[mask], dist[mask]
            stats["loss"] += F.cross_entropy(lg, tg, reduction="sum").item()
            stats["n"] += tg.numel()
            ok = lg.argmax(-1) == tg
            beyond = ds >= cfg.window_size  # the value token is outside the window
            stats["correct_beyond"] += int(ok[beyond].sum())
            stats["n_beyond"] += int(beyond.sum())
            stats["correct_within"] += int(ok[~beyond].sum())
            stats["n_within"] += int((~beyond).sum())
    model.train()
    return dict(loss=stats["loss"] / max(stats["n"], 1),
                acc_beyond=stats["correct_beyond"] / max(stats["n_beyond"], 1),
                acc_within=stats["correct_within"] / max(stats["n_within"], 1),
                n_beyond=stats["n_beyond"], n_within=stats["n_within"])


def generate_answers(model, cfg, device, dtype, batch=16, seed=30_000):
    """Answers the queries by generation through the NSA layers' KV caches.

    The prompt (up to the first queried key) goes in one prefill call; each decoding
    step then feeds two tokens, the value the model just generated and the next
    queried key, and reads the next value off the last position. Also decodes the
    ground-truth sequence the same way and returns the largest difference to the
    full-sequence logits (the cache must reproduce them)."""
    gen = torch.Generator().manual_seed(seed)
    tokens, targets, dist = make_batch(cfg, batch, gen)
    tokens = tokens.to(device)
    body = cfg.seq_len - (1 + 2 * cfg.num_queries)
    qpos = body + 1 + 2 * torch.arange(cfg.num_queries)
    model.eval()
    with torch.no_grad(), autocast(device, dtype):
        full = model(tokens).float()
        # teacher-forced decoding: prompt, then 2 tokens a step
        caches = model.new_caches(batch, cfg.seq_len)
        outs = [model(tokens[:, :body + 2], caches=caches)]
        for t in range(body + 2, cfg.seq_len, 2):
            outs.append(model(tokens[:, t:t + 2], prev=tokens[:, t - 1:t], caches=caches))
        diff = (torch.cat(outs, 1).float() - full).abs().max().item()
        # greedy generation
        caches = model.new_caches(batch, cfg.seq_len)
        logits = model(tokens[:, :body + 2], caches=caches)
        answers = []
        for i in range(cfg.num_queries):
            answers.append(logits[:, -1].argmax(-1))
            if i + 1 < cfg.num_queries:
                step = torch.stack([answers[-1], tokens[:, qpos[i + 1]]], dim=1)
                logits = model(step, prev=tokens[:, qpos[i]:qpos[i] + 1], caches=caches)
    model.train()
    answers = torch.stack(answers, 1).cpu()
    truth = targets[:, qpos]
    beyond = dist[:, qpos] >= cfg.window_size
    ok = answers == truth
    return dict(gen_acc_beyond=ok[beyond].float().mean().item(),
                gen_acc=ok.float().mean().item(), cache_max_logit_diff=diff)


def autocast(device, dtype):
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def train(kind: str, cfg: Config, device, log):
    torch.manual_seed(cfg.seed)
    dtype = getattr(torch, cfg.dtype)
    model = TinyLM(kind, cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay),
                             dict(params=no_decay, weight_decay=0.0)], lr=cfg.lr,
                            betas=(0.9, 0.98))

    def lr_at(step):
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(cfg.seed)
    warm_cfg = dataclasses.replace(cfg, seq_len=cfg.warm_seq_len)
    eval_gen = torch.Generator().manual_seed(10_000 + cfg.seed)  # same eval set for all
    eval_set = [make_batch(cfg, cfg.batch_size, eval_gen) for _ in range(cfg.eval_batches)]
    hist = dict(step=[], train_loss=[], eval_step=[], eval_loss=[], acc_beyond=[],
                acc_within=[], time=[])
    log(f"[{kind}] {n_params / 1e3:.1f}k parameters")
    t0 = time.time()
    running = None
    for step in range(cfg.steps):
        if step % cfg.eval_every == 0:
            ev = evaluate(model, eval_set, cfg, device, dtype)
            for k in ("loss", "acc_beyond", "acc_within"):
                hist["eval_" + k if k == "loss" else k].append(ev[k])
            hist["eval_step"].append(step)
            hist["time"].append(time.time() - t0)
            log(f"[{kind}] step {step:5d} eval loss {ev['loss']:.3f}  acc beyond-window "
                f"{ev['acc_beyond']:.3f}  within-window {ev['acc_within']:.3f}  "
                f"({time.time() - t0:.0f}s)")
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        if step < cfg.warm_steps:
            tokens, targets, _ = make_batch(warm_cfg, cfg.batch_size, gen)
        else:
            tokens, targets, _ = make_batch(cfg, cfg.batch_size, gen)
        tokens, targets = tokens.to(device), targets.to(device)
        with autocast(device, dtype):
            logits = model(tokens)
        loss = F.cross_entropy(logits.float().view(-1, cfg.vocab_size), targets.view(-1),
                               ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        hist["step"].append(step)
        hist["train_loss"].append(loss.item())
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if (step + 1) % cfg.log_every == 0:
            log(f"[{kind}] step {step + 1:5d} train loss {running:.3f}  lr {lr_at(step):.2e}  "
                f"{(time.time() - t0) / (step + 1):.2f}s/step")
    train_time = time.time() - t0
    final_gen = torch.Generator().manual_seed(20_000 + cfg.seed)
    final_set = [make_batch(cfg, cfg.batch_size, final_gen) for _ in range(cfg.final_eval_batches)]
    ev = evaluate(model, final_set, cfg, device, dtype)
    hist["eval_step"].append(cfg.steps)
    hist["eval_loss"].append(ev["loss"])
    hist["acc_beyond"].append(ev["acc_beyond"])
    hist["acc_within"].append(ev["acc_within"])
    hist["time"].append(time.time() - t0)
    log(f"[{kind}] final: acc beyond-window {ev['acc_beyond']:.3f} (n={ev['n_beyond']}), "
        f"within-window {ev['acc_within']:.3f} (n={ev['n_within']}), {train_time:.0f}s")
    if kind != "full":  # the NSA layers decode with their KV caches
        t1 = time.time()
        ev.update(generate_answers(model, cfg, device, dtype))
        log(f"[{kind}] generation with the KV cache: acc beyond-window "
            f"{ev['gen_acc_beyond']:.3f}, all queries {ev['gen_acc']:.3f}; teacher-forced "
            f"decoding vs full forward: max |logit diff| {ev['cache_max_logit_diff']:.1e} "
            f"({time.time() - t1:.1f}s)")
    return dict(kind=kind, params=n_params, train_time_s=train_time, final=ev, history=hist)


def plot(results, cfg, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return False
    colors = dict(nsa="tab:blue", window="tab:orange", full="tab:green")
    labels = dict(nsa="NSA", window=f"window-only (w={cfg.window_size})", full="full attention")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        h, k = r["history"], r["kind"]
        w = max(1, len(h["train_loss"]) // 50)
        smooth = [sum(h["train_loss"][max(0, i - w + 1):i + 1]) / len(h["train_loss"][max(0, i - w + 1):i + 1])
                  for i in range(len(h["train_loss"]))]
        ax1.plot(h["step"], smooth, color=colors[k], label=labels[k])
        ax2.plot(h["eval_step"], h["acc_beyond"], color=colors[k], marker="o", ms=3,
                 label=labels[k] + " (beyond window)")
        ax2.plot(h["eval_step"], h["acc_within"], color=colors[k], ls=":", alpha=0.6,
                 label=labels[k] + " (within window)")
    ax1.set(xlabel="step", ylabel="train loss (queried values)", title="training loss")
    ax1.set_yscale("log")
    ax1.legend()
    ax2.axhline(1 / cfg.num_values, color="gray", ls="--", lw=1, label="chance")
    ax2.set(xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02),
            title=f"retrieval accuracy (T={cfg.seq_len}, keys beyond w={cfg.window_size})")
    ax2.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small CPU run (< 10 minutes)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if --quick is "
                   "not given and CUDA is available, else cpu)")
    p.add_argument("--models", default="nsa,window,full", help="comma-separated subset")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override Config fields, e.g. --set lr=1e-3 seq_len=1024")
    args = p.parse_args(argv)

    if args.device is None:
        args.device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    device = torch.device(args.device)
    cfg = dataclasses.replace(QUICK if args.quick or device.type == "cpu" else CUDA)
    if args.steps is not None:
        cfg.steps = args.steps
    for kv in args.set:
        key, val = kv.split("=", 1)
        typ = type(getattr(cfg, key))
        setattr(cfg, key, typ(val))
    if device.type == "cpu":
        cfg.dtype = "float32"
    tag = "quick" if args.quick else device.type

    os.makedirs(args.out, exist_ok=True)
    print(f"config: {json.dumps(dataclasses.asdict(cfg))}", flush=True)
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}",
          flush=True)
    t_all = time.time()
    results = []
    for kind in args.models.split(","):
        results.append(train(kind, cfg, device, lambda s: print(s, flush=True)))
    total = time.time() - t_all

    out = dict(config=dataclasses.asdict(cfg), device=str(device), torch=torch.__version__,
               total_time_s=total, chance=1 / cfg.num_values, results=results)
    json_path = os.path.join(args.out, f"retrieval_{tag}.json")
    png_path = os.path.join(args.out, f"retrieval_{tag}.png")
    with open(json_path, "w") as f:
        json.dump(out, f, indent=1)
    have_png = plot(results, cfg, png_path)

    print()
    print(f"| model | params | acc beyond window | acc within window | final eval loss "
          f"| generated (KV cache), beyond window | train time |")
    print(f"| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        ev = r["final"]
        gen = f"{ev['gen_acc_beyond']:.3f}" if "gen_acc_beyond" in ev else "n/a"
        print(f"| {r['kind']} | {r['params'] / 1e3:.0f}k | {ev['acc_beyond']:.3f} | "
              f"{ev['acc_within']:.3f} | {ev['loss']:.3f} | {gen} | {r['train_time_s']:.0f} s |")
    print(f"chance = {1 / cfg.num_values:.3f}; total wall time {total:.0f} s")
    print(f"wrote {json_path}" + (f" and {png_path}" if have_png else ""))
    if args.quick:
        res_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        os.makedirs(res_dir, exist_ok=True)
        shutil.copy(json_path, res_dir)
        if have_png:
            shutil.copy(png_path, res_dir)
        print(f"copied to {res_dir}")


if __name__ == "__main__":
    main()
