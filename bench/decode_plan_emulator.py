"""Host-side check of the CUDA decode kernels' plan (no GPU needed): emulates, CTA by
CTA and split by split, what decode_attn.cuh / decode_combine.cuh / decode_select.cuh
do (row tiles, key schedules, the selected-block union, the chunk split, the combine,
the selection score partition and top-n) in float64 and compares with the CPU ops.
It mirrors the constants of csrc/cuda/decode_plan.h (R, N, MAXS, JB): keep them in
sync. It checks the index math, not CUDA behaviour (smem, syncs), except two
lane-level models: the warp top-n (butterfly argmax) and the padded rows' banks.

    PYTHONPATH=. python bench/decode_plan_emulator.py
"""
import math, random, torch
import nsa_cuda  # noqa
ops = torch.ops.nsa_cuda
R, N, MAXS = 16, 32, 256

def ceil_div(a, b): return (a + b - 1) // b
def ncmp(T, l, d): return 0 if T < l else (T - l) // d + 1
def nvis(t, l, d): return 0 if t + 1 < l else (t + 1 - l) // d + 1
def wbegin(t, w): return max(0, t - w + 1)
def nslc(T, lp): return (T + lp - 1) // lp

def tile_tokens_bound(S, G): return min(S, (R - 1) // G + 2)

def max_chunks(branch, S, G, k_rows, w, n, lp):
    if branch == "cmp": return ceil_div(k_rows, N)
    if branch == "win": return ceil_div(min(w + S - 1, k_rows), N)
    return tile_tokens_bound(S, G) * n * ceil_div(lp, N)

def attn_emu(branch, q, k, v, seqlens, scale, l=1, d=1, lp=1, w=1, bi=None, num_sms=7):
    B, S, Hq, Dk = q.shape
    Hkv, k_rows, Dv = k.shape[2], k.shape[1], v.shape[3]
    G = Hq // Hkv
    row_tiles = ceil_div(S * G, R)
    n = bi.shape[3] if bi is not None else 0
    ctas = B * Hkv * row_tiles
    want = ceil_div(2 * num_sms, ctas)
    splits = max(1, min(min(want, max(1, max_chunks(branch, S, G, k_rows, w, n, lp))), MAXS))
    o_part = torch.zeros(splits, B, S, Hq, Dv, dtype=torch.float64)
    lse_part = torch.full((splits, B, S, Hq), -math.inf, dtype=torch.float64)
    for b in range(B):
        L = max(0, int(seqlens[b]))
        if branch != "cmp": L = min(L, k_rows)
        for kvh in range(Hkv):
            for tile in range(row_tiles):
                r0 = tile * R
                rows_here = min(R, S * G - r0)
                i_first, i_last = r0 // G, (r0 + rows_here - 1) // G
                t_first, t_last = L - S + i_first, L - S + i_last
                lo, hi, tok = [0] * R, [0] * R, [0] * R
                for r in range(rows_here):
                    i = (r0 + r) // G; t = L - S + i; tok[r] = i - i_first
                    if t >= 0:
                        if branch == "cmp": hi[r] = min(nvis(t, l, d), k_rows)
                        elif branch == "win": lo[r], hi[r] = wbegin(t, w), t + 1
                        else: hi[r] = t + 1
                kb0 = ke0 = 0
                union, member, cpb = [], [], 1
                if branch == "cmp":
                    if t_last >= 0: ke0 = min(nvis(t_last, l, d), k_rows)
                elif branch == "win":
                    if t_last >= 0: kb0, ke0 = wbegin(max(t_first, 0), w), t_last + 1
                else:
                    nb = nslc(L, lp); tt = i_last - i_first + 1
                    cand = []
                    for a in range(tt):
                        for s in range(n):
                            i = i_first + a; j = -1
                            if L - S + i >= 0:
                                x = int(bi[b, i, kvh, s])
                                if 0 <= x < nb: j = x
                            cand.append(j)
                    for e, j in enumerate(cand):
                        if j >= 0 and j not in cand[:e]: union.append(j)
                    for j in union:
                        bits = 0
                        for a in range(tt):
                            if j in cand[a * n:(a + 1) * n]: bits |= 1 << a
                        member.append(bits)
                    cpb = ceil_div(lp, N)
                nch = len(union) * cpb if branch == "slc" else ceil_div(ke0 - kb0, N)
                per = ceil_div(nch, splits)
                for sp in range(splits):
                    keys = {r: [] for r in range(rows_here)}
                    for c in range(sp * per, min(sp * per + per, nch)):
                        mem = 0
                        if branch == "slc":
                            u, sub = c // cpb, c % cpb; j = union[u]; mem = member[u]
                            kb = j * lp + sub * N; ke = min(j * lp + min((sub + 1) * N, lp), L)
                        else:
                            kb = kb0 + c * N; ke = min(kb + N, ke0)
                        for key in range(kb, ke):
                            for r in range(rows_here):
                                vis = lo[r] <= key < hi[r]
                                if branch == "slc": vis = vis and (mem >> tok[r]) & 1
                                if vis: keys[r].append(key)
                    for r in range(rows_here):
                        i = (r0 + r) // G; h = kvh * G + (r0 + r) % G
                        ks = keys[r]
                        assert len(ks) == len(set(ks)), "key visited twice"
                        if not ks: continue
                        idx = torch.tensor(ks)
                        s = (k[b, idx, kvh].double() @ q[b, i, h].double()) * scale
                        m = s.max(); p = torch.exp(s - m)
                        o_part[sp, b, i, h] = (p @ v[b, idx, kvh].double()) / p.sum()
                        lse_part[sp, b, i, h] = m + torch.log(p.sum())
    m = lse_part.max(0).values
    empty = m == -math.inf
    wts = torch.where(lse_part == -math.inf, torch.zeros_like(lse_part),
                      torch.exp(lse_part - torch.where(empty, torch.zeros_like(m), m)))
    ws = wts.sum(0)
    o = (wts[..., None] * o_part).sum(0) / torch.where(empty, torch.ones_like(ws), ws)[..., None]
    o[empty] = 0
    lse = torch.where(empty, torch.full_like(m, -math.inf), m + torch.log(ws))
    return o, lse.permute(0, 2, 1), splits

JB, HP = 16, 16
def select_emu(q, kc, lse, seqlens, l, d, lp, n, n_init, n_local, scale):
    B, S, Hq, Dk = q.shape
    Hkv, k_rows = kc.shape[2], kc.shape[1]
    G = Hq // Hkv
    cap = (k_rows - 1) * d + l + d - 1 if k_rows > 0 else l - 1
    W = max(1, nslc(cap, lp))
    max_rows = (JB * lp + l) // d + 3
    scores = torch.full((B, Hkv, S, W), float("nan"), dtype=torch.float64)
    for b in range(B):
        L = min(max(0, int(seqlens[b])), cap)
        for kvh in range(Hkv):
            for cta in range(ceil_div(W, JB)):
                j0 = cta * JB; j1 = min(j0 + JB, W)
                t_last = L - 1
                if t_last < 0 or j0 > t_last // lp: continue
                nc_last = min(nvis(t_last, l, d), k_rows)
                lo = j0 * lp - l
                i_lo = lo // d if lo > 0 else 0
                i_hi = min((j1 * lp) // d, nc_last - 1)
                nrows = i_hi - i_lo + 1 if i_hi >= i_lo else 0
                assert nrows <= max_rows, (nrows, max_rows)
                for i in range(S):
                    t = L - S + i
                    if t < 0: continue
                    J = t // lp
                    if j0 > J: continue
                    nc = min(nvis(t, l, d), k_rows)
                    psum = torch.zeros(nrows, dtype=torch.float64)
                    for g in range(G):
                        h = kvh * G + g
                        lh = float(lse[b, h, i])
                        if lh == -math.inf: continue
                        for r in range(nrows):
                            if i_lo + r < nc:
                                psum[r] += math.exp(scale * float(q[b, i, h].double() @ kc[b, i_lo + r, kvh].double()) - lh)
                    for j in range(j0, min(j1, J + 1)):
                        s = 0.0
                        for r in range(nrows):
                            blk = i_lo + r
                            if blk >= nc: break
                            if j < (blk * d) // lp or j > (blk * d + l - 1) // lp: continue
                            lo2 = max(blk * d, j * lp); hi2 = min(blk * d + l, (j + 1) * lp)
                            s += (hi2 - lo2) / d * float(psum[r]) if hi2 > lo2 else 0.0
                        scores[b, kvh, i, j] = s
    out = torch.full((B, S, Hkv, n), -1, dtype=torch.int32)
    for b in range(B):
        L = min(max(0, int(seqlens[b])), cap)
        for kvh in range(Hkv):
            for i in range(S):
                t = L - S + i
                if t < 0: continue
                J = t // lp
                sc = scores[b, kvh, i, :J + 1]
                assert not torch.isnan(sc).any(), "unwritten score read"
                forced = lambda j: j <= J and (j < n_init or j > J - n_local)
                order = sorted(range(J + 1), key=lambda j: (not forced(j), -float(sc[j]), j))
                take = sorted(order[:min(n, J + 1)])
                out[b, i, kvh, :len(take)] = torch.tensor(take, dtype=torch.int32)
    return out

def check(seed, B, S, Hq, Hkv, Dk, Dv, cap, l, d, lp, n, w, sms):
    torch.manual_seed(seed); random.seed(seed)
    dt = torch.float64
    q = torch.randn(B, S, Hq, Dk, dtype=dt)
    k = torch.randn(B, cap, Hkv, Dk, dtype=dt); v = torch.randn(B, cap, Hkv, Dv, dtype=dt)
    rows = ncmp(cap, l, d)
    kc = torch.randn(B, rows, Hkv, Dk, dtype=dt); vc = torch.randn(B, rows, Hkv, Dv, dtype=dt)
    lens = torch.tensor([random.choice([0, S - 1, random.randint(0, cap), cap]) for _ in range(B)], dtype=torch.int32)
    scale = Dk ** -0.5
    o_ref, lse_ref = ops.compressed_attn_decode(q, kc, vc, lens, l, d, scale)
    o, lse_e, sp = attn_emu("cmp", q, kc, vc, lens, scale, l=l, d=d, num_sms=sms)
    assert torch.allclose(o, o_ref, atol=1e-9) and torch.allclose(lse_e, lse_ref, atol=1e-9), "cmp"
    bi_ref = ops.select_blocks_decode(q, kc, lse_ref, lens, l, d, lp, n, 1, 2, scale)
    bi_e = select_emu(q, kc, lse_ref, lens, l, d, lp, n, 1, 2, scale)
    assert torch.equal(bi_e, bi_ref), ("select", bi_e, bi_ref)
    bi2 = bi_ref.clone()
    if n > 2:
        bi2[..., 0] = 10 ** 6; bi2[..., -1] = bi2[..., 1]
    o_ref, lse_ref = ops.selected_attn_decode(q, k, v, bi2, lens, lp, scale)
    o, lse_e, sp2 = attn_emu("slc", q, k, v, lens, scale, lp=lp, bi=bi2, num_sms=sms)
    assert torch.allclose(o, o_ref, atol=1e-9) and torch.allclose(lse_e, lse_ref, atol=1e-9), "slc"
    o_ref, lse_ref = ops.window_attn_decode(q, k, v, lens, w, scale)
    o, lse_e, sp3 = attn_emu("win", q, k, v, lens, scale, w=w, num_sms=sms)
    assert torch.allclose(o, o_ref, atol=1e-9) and torch.allclose(lse_e, lse_ref, atol=1e-9), "win"
    return sp, sp2, sp3

def check_update(seed):
    """update_cmp_cache: CTA x of entry b writes block ncmp(old) + x; the grid has
    min(ceil(num_new / d) + 1, rows_out) CTAs per entry: enough for every new block."""
    random.seed(seed); torch.manual_seed(seed)
    for _ in range(200):
        l = random.choice([8, 16, 32, 64]); d = random.choice([x for x in (4, 8, 16, 32) if l % x == 0])
        cap = random.randint(1, 300); num_new = random.randint(1, 9)
        old = random.randint(-3, cap)
        L = min(old + num_new, cap); o = min(max(old, 0), L)
        first, end = ncmp(o, l, d), min(ncmp(L, l, d), ncmp(cap, l, d))
        assert max(0, end - first) <= ceil_div(num_new, d) + 1, (l, d, old, num_new)
    for B, cap, l, d, num_new in ((3, 100, 32, 16, 1), (2, 90, 16, 8, 8), (2, 64, 32, 32, 5)):
        x = torch.randn(B, cap, 2, 8, dtype=torch.float64)
        rows = ncmp(cap, l, d)
        lens = torch.tensor([random.randint(0, cap - num_new) for _ in range(B)], dtype=torch.int32)
        out = torch.zeros(B, rows, 2, 8, dtype=torch.float64)
        ops.update_cmp_cache(x, out, lens, num_new, l, d)
        exp = torch.zeros_like(out)
        for b in range(B):
            Lb = min(int(lens[b]) + num_new, cap); ob = min(max(int(lens[b]), 0), Lb)
            first, end = ncmp(ob, l, d), min(ncmp(Lb, l, d), rows)
            for x_ in range(min(ceil_div(num_new, d) + 1, rows)):
                blk = first + x_
                if blk >= end: continue
                exp[b, blk] = x[b, blk * d:blk * d + l].mean(0)
        assert torch.allclose(out, exp, atol=1e-12), "update_cmp_cache"


def warp_topn(score, J, n, n_init, n_local):
    """decode_select_topn_kernel lane by lane: each lane scans j = lane, lane + 32, ...
    for its best untaken candidate, a 5-step xor butterfly picks the warp's, lane 0
    marks it taken; after min(n, J + 1) rounds a ballot compaction writes the taken
    set ascending. Checks that every lane ends a round on the same winner."""
    taken = [0] * ((J + 1 + 31) // 32)
    forced = lambda j: j <= J and (j < n_init or j > J - n_local)
    def better(o, c):  # o ranks before c (a -1 candidate never does)
        return o[0] >= 0 and (c[0] < 0 or (o[1] if o[1] != c[1] else
                                          o[2] > c[2] or (o[2] == c[2] and o[0] < c[0])))
    for _ in range(min(n, J + 1)):
        lanes = []
        for lane in range(32):
            best = (-1, False, 0.0)
            for j in range(lane, J + 1, 32):
                if not (taken[j // 32] >> (j % 32)) & 1 and better((j, forced(j), score[j]), best):
                    best = (j, forced(j), score[j])
            lanes.append(best)
        for off in (16, 8, 4, 2, 1):
            lanes = [lanes[x ^ off] if better(lanes[x ^ off], lanes[x]) else lanes[x] for x in range(32)]
        assert len(set(lanes)) == 1 and lanes[0][0] >= 0, "lanes disagree"
        w = lanes[0][0]
        assert not (taken[w // 32] >> (w % 32)) & 1, "winner taken twice"
        taken[w // 32] |= 1 << (w % 32)
    out = [j for j in range(J + 1) if (taken[j // 32] >> (j % 32)) & 1]
    return out + [-1] * (n - len(out))

def check_topn_warp(seed):
    """The warp top-n against the rule (forced first, higher score, ties to the smaller
    j; ascending, -1 padded) on random, tie-heavy, +-0 and forced-dominant scores, up
    to J = 4095 (W = 2048 blocks is 128k tokens at l' = 64)."""
    import struct
    f32 = lambda x: struct.unpack("f", struct.pack("f", x))[0]
    rng = random.Random(seed)
    for J in (0, 1, 2, 31, 32, 33, 63, 64, 100, 255, 1023, 2047, 4095):
        for kind in ("rand", "ties", "same", "zeros", "forced"):
            for n in ((1, 2, 3, 16, 32, 33) if J < 600 else (16,)):
                n_init = rng.randint(0, n - 1); n_local = rng.randint(1, n - n_init)
                if kind == "rand": sc = [f32(rng.random()) for _ in range(J + 1)]
                elif kind == "ties": sc = [rng.choice([0.0, 0.5, 1.0]) for _ in range(J + 1)]
                elif kind == "same": sc = [1.0] * (J + 1)
                elif kind == "zeros": sc = [rng.choice([0.0, -0.0]) for _ in range(J + 1)]
                else: sc = [10.0 + j if j < n_init or j > J - n_local else f32(rng.random())
                            for j in range(J + 1)]
                forced = lambda j: j <= J and (j < n_init or j > J - n_local)
                order = sorted(range(J + 1), key=lambda j: (not forced(j), -sc[j], j))
                want = sorted(order[:min(n, J + 1)])
                got = warp_topn(sc, J, n, n_init, n_local)
                assert got == want + [-1] * (n - len(want)), ("top-n", J, kind, n, got, want)

def check_bank_conflicts():
    """Padded K rows (Dk + 8 elements): lane x reads 16 bytes of row x (decode_attn
    scores, decode_select p); served per 8-lane phase, so no two lanes of a phase may
    hit one bank at different words."""
    for dk in (64, 128, 192):
        for c8 in range(0, dk, 8):
            for ph in range(4):
                banks = {}
                for lane in range(8 * ph, 8 * ph + 8):
                    a = (lane * (dk + 8) * 2 + c8 * 2) // 4
                    for w in range(a, a + 4): banks.setdefault(w % 32, set()).add(w)
                assert max(len(x) for x in banks.values()) == 1, ("bank conflict", dk, c8)


check_update(0)
print("update_cmp_cache plan OK")
check_topn_warp(0)
print("warp top-n OK")
check_bank_conflicts()
print("padded K rows conflict free")

cases = [
    (1, 2, 1, 16, 1, 16, 8, 300, 32, 16, 64, 4, 128, 132),
    (2, 3, 8, 8, 2, 16, 16, 200, 32, 16, 32, 3, 48, 7),
    (3, 1, 8, 5, 5, 16, 8, 150, 16, 8, 16, 5, 40, 50),
    (4, 2, 4, 12, 2, 8, 8, 500, 32, 16, 64, 16, 100, 132),
    (5, 2, 5, 6, 3, 8, 8, 257, 16, 8, 24, 4, 33, 3),
    (6, 1, 1, 64, 4, 8, 8, 2000, 32, 16, 64, 16, 512, 132),
    # G = 32: two row tiles per token; l' = 48: a block of one full and one partial chunk
    (7, 2, 2, 32, 1, 8, 8, 180, 16, 8, 48, 4, 40, 132),
]
for c in cases:
    print(c, "splits", check(*c))
print("emulation OK")
