"""Host-side check of the CUDA backward's plan (no GPU needed): emulates, CTA by CTA
and tile by tile, what attn_bwd.cuh / q_schedule.cuh / attn_bwd_index.cu do, in
float64, and compares the gradients with the CPU ops':
  - delta = rowsum(o * do) - dlse (0 for an lse = -inf row) per (token, head);
  - dq kernel: 64-row tiles of flattened (token, head) rows, the forward's KV
    schedules at the dq kernel's KV tile width (32 keys for Dk >= 128, else 64),
    zero-filled rows past a tile's end, need_mask tiles left unmasked, the
    -inf masking, P = exp2(s * scale * log2e - lse * log2e) and dS = P (dP - delta);
  - dk/dv kernel: 64-key CTAs, their query schedules (compressed, window, and the
    selected branch's inverse index: keys built as slc_inverse_keys_kernel does,
    sorted, binary-searched, duplicate slots skipped), query steps of 32 or 64 rows,
    the per-row visible key ranges;
  - the varlen extra grid z-slice that zeroes rows owned by no sequence;
  - mean_compress_bwd's per-row block range.
Every gradient row must be written exactly once (a row written twice or never is a
failure). It checks index math, not CUDA behaviour (smem, syncs, MMA layouts:
bench/bwd_layout_check.cu does those).

    PYTHONPATH=. python bench/bwd_plan_emulator.py
"""
import bisect
import math
import random
import sys

import torch

import nsa_cuda  # noqa: F401  (registers the ops)

ops = torch.ops.nsa_cuda
torch.set_num_threads(1)  # tiny matrices: threads only add overhead
KBM = 64          # kBlockM (dq row tile) == kBlockN (keys per dk/dv CTA)
LOG2E = 1.4426950408889634
INT64_MAX = 2 ** 63 - 1


def kblock_s(dk):  # AttnBwdTraits::kBlockS
    return 32 if dk >= 128 else 64


def ceil_div(a, b): return (a + b - 1) // b
def ncmp(T, l, d): return 0 if T < l else (T - l) // d + 1
def nvis(t, l, d): return 0 if t + 1 < l else (t + 1 - l) // d + 1
def wbegin(t, w): return max(0, t - w + 1)
def nslc(T, lp): return (T + lp - 1) // lp
def exp2(x): return torch.exp2(x)


class Plan:
    """AttnBwdParams + workspace as the kernels see them."""

    def __init__(self, branch, q, k, cu, max_seqlen, scale, l=1, d=1, lp=1, w=1, bi=None):
        self.branch, self.cu, self.scale = branch, cu, scale
        self.l, self.d, self.lp, self.w, self.bi = l, d, lp, w, bi
        self.B, self.T, self.Hq, self.Dk = q.shape
        self.Hkv, self.k_rows = k.shape[2], k.shape[1]
        self.G = self.Hq // self.Hkv
        self.num_seqs = len(cu) - 1 if cu is not None else self.B
        self.seqlen = min(max_seqlen, self.T) if cu is not None and max_seqlen > 0 else self.T
        self.q_rows = self.T  # lse_head_stride
        self.n = bi.shape[3] if bi is not None else 0

    def cmp_row_begin(self, seq):
        return sum(ncmp(self.cu[m + 1] - self.cu[m], self.l, self.d) for m in range(seq))

    def seq(self, z):  # (batch, row0, len, cmp_row0)
        if self.cu is None:
            return z, 0, self.seqlen, 0
        return 0, self.cu[z], self.cu[z + 1] - self.cu[z], (
            self.cmp_row0(z) if self.branch == "cmp" else 0)

    def cmp_row0(self, z):
        return self.cmp_row_begin(z)


# --------------------------------------------------------------------------- dq
def kv_schedule(P, kbn, si, t_lo, t_hi, hkv):
    """The forward's KV schedules (kv_schedule.cuh): (tiles, row_range)."""
    b, row0, L, cmp_row0 = si
    tiles = []  # (begin, end, block, need_mask)
    if P.branch == "cmp":
        avail = max(P.k_rows - cmp_row0, 0)
        n_end = min(nvis(t_hi, P.l, P.d), avail)
        unmasked_end = min(nvis(t_lo, P.l, P.d), avail)
        cur = 0
        while cur < n_end:
            tiles.append((cur, min(cur + kbn, n_end), -1, cur + kbn > unmasked_end))
            cur += kbn

        def row_range(t, tile):
            return 0, min(nvis(t, P.l, P.d), avail)
    elif P.branch == "win":
        cur = wbegin(t_lo, P.w) // kbn * kbn
        n_end, full_lo, full_hi = t_hi + 1, wbegin(t_hi, P.w), t_lo + 1
        while cur < n_end:
            tiles.append((cur, min(cur + kbn, n_end), -1,
                          not (cur >= full_lo and cur + kbn <= full_hi)))
            cur += kbn

        def row_range(t, tile):
            return wbegin(t, P.w), t + 1
    else:
        nblk = nslc(L, P.lp)
        lists = {}
        for t in range(t_lo, t_hi + 1):
            row = []
            for s in range(P.n):
                j = int(P.bi[b, row0 + t, hkv, s])
                row.append(j if (0 <= j < nblk and j * P.lp <= t) else -1)
            lists[t] = row
        union = sorted({j for row in lists.values() for j in row if j >= 0})
        for j in union:
            begin, block_end = j * P.lp, min((j + 1) * P.lp, t_hi + 1)
            assert block_end > begin
            while True:
                tiles.append((begin, min(begin + kbn, block_end), j, True))
                if begin + kbn < block_end:
                    begin += kbn
                else:
                    break

        def row_range(t, tile):
            j = tile[2]
            lo = j * P.lp
            return lo, (min((j + 1) * P.lp, t + 1) if j in lists[t] else lo)
    return tiles, row_range


def dq_kernel(P, X, dq, written):
    q, k, v, do, lse, delta = X["q"], X["k"], X["v"], X["do"], X["lse"], X["delta"]
    kbn = kblock_s(P.Dk)
    G = P.G
    scale_log2 = P.scale * LOG2E
    m_blocks = ceil_div(P.seqlen * G, KBM)
    for z in range(P.num_seqs + (1 if P.cu is not None else 0)):
        for hkv in range(P.Hkv):
            if z == P.num_seqs:  # varlen: rows past the last sequence
                r0 = P.cu[P.num_seqs]
                dq[0, r0:P.q_rows, hkv * G:(hkv + 1) * G] = 0
                written["dq"][0, r0:P.q_rows, hkv * G:(hkv + 1) * G] += 1
                continue
            si = P.seq(z)
            b, row0, L, cmp_row0 = si
            key_row0 = cmp_row0 if P.branch == "cmp" else row0
            rows_total = L * G
            for x in range(m_blocks):
                f0 = x * KBM
                if f0 >= rows_total:
                    continue
                f_last = min(f0 + KBM, rows_total) - 1
                t_lo, t_hi = f0 // G, f_last // G
                tiles, row_range = kv_schedule(P, kbn, si, t_lo, t_hi, hkv)
                f = torch.arange(f0, f0 + KBM)
                ok = f <= f_last
                t = f // G
                h = hkv * G + f % G
                Q = torch.zeros(KBM, P.Dk, dtype=torch.float64)
                dO = torch.zeros(KBM, v.shape[3], dtype=torch.float64)
                lse2 = torch.full((KBM,), math.inf, dtype=torch.float64)
                dl = torch.zeros(KBM, dtype=torch.float64)
                for r in range(KBM):
                    if ok[r]:
                        Q[r] = q[b, row0 + t[r], h[r]]
                        dO[r] = do[b, row0 + t[r], h[r]]
                        ls = float(lse[b, h[r], row0 + t[r]])
                        lse2[r] = math.inf if ls == -math.inf else ls * LOG2E
                        dl[r] = delta[b, h[r], row0 + t[r]]
                acc = torch.zeros(KBM, P.Dk, dtype=torch.float64)
                for tile in tiles:
                    begin, end, _, need_mask = tile
                    assert 0 < end - begin <= kbn
                    Kt = torch.zeros(kbn, P.Dk, dtype=torch.float64)
                    Vt = torch.zeros(kbn, v.shape[3], dtype=torch.float64)
                    Kt[:end - begin] = k[b, key_row0 + begin:key_row0 + end, hkv]
                    Vt[:end - begin] = v[b, key_row0 + begin:key_row0 + end, hkv]
                    S = (Q @ Kt.T) * scale_log2  # scaled before the mask
                    dP = dO @ Vt.T
                    if need_mask:  # mask_scores
                        for r in range(KBM):
                            lo, hi = row_range(int(t[r]), tile) if ok[r] else (0, 0)
                            col_lo, col_hi = max(lo - begin, 0), min(hi, end) - begin
                            cols = torch.arange(kbn)
                            S[r, (cols < col_lo) | (cols >= col_hi)] = -math.inf
                    prob = exp2(S - lse2[:, None])  # probs_and_dscores, everything visible
                    dS = prob * (dP - dl[:, None])
                    acc += dS @ Kt
                acc *= P.scale
                for r in range(KBM):
                    if ok[r]:
                        dq[b, row0 + t[r], h[r]] = acc[r]
                        written["dq"][b, row0 + t[r], h[r]] += 1


# --------------------------------------------------------------------------- dk/dv
def inverse_keys(P):
    """slc_inverse_keys_kernel + at::sort."""
    R, n, Hkv = P.k_rows, P.n, P.Hkv
    total = (P.num_seqs if P.cu is None else 1) * R * Hkv * n
    keys = []
    for idx in range(total):
        slot = idx % n
        h = (idx // n) % Hkv
        row = (idx // (n * Hkv)) % R
        b = idx // (n * Hkv * R)
        row0, ok = 0, True
        if P.cu is not None:
            ok = row < P.cu[P.num_seqs]
            lo, hi = 0, P.num_seqs
            while ok and hi - lo > 1:
                mid = (lo + hi) // 2
                if P.cu[mid] <= row:
                    lo = mid
                else:
                    hi = mid
            row0 = P.cu[lo]
        else:
            ok = row < P.seqlen
        key = INT64_MAX
        if ok:
            t = row - row0
            j = int(P.bi[b, row, h, slot])
            if j >= 0 and j * P.lp <= t:
                key = ((b * Hkv + h) * R + row0 + j * P.lp) * R + row
                assert key < INT64_MAX
        keys.append(key)
    return sorted(keys)


class QSched:
    pass


def q_schedule(P, si, x, hkv, keys):
    """q_schedule.cuh: None when the CTA owns no key row."""
    b, row0, L, cmp_row0 = si
    s = QSched()
    if P.branch == "cmp":
        own = P.k_rows - cmp_row0
        if P.cu is not None:
            own = min(own, ncmp(L, P.l, P.d))
        s.kb = x * KBM
        if s.kb >= own:
            return None
        s.ke = min(s.kb + KBM, own)
        s.key_row0 = cmp_row0
        t_first = s.kb * P.d + P.l - 1
        s.n_pos = max(L - t_first, 0)
        s.token = lambda pos: t_first + pos
        s.key_range = lambda t: (0, nvis(t, P.l, P.d))
    elif P.branch == "win":
        s.kb = x * KBM
        if s.kb >= L:
            return None
        s.ke = min(s.kb + KBM, L)
        s.key_row0 = row0
        s.n_pos = min(s.ke - 1 + P.w - 1, L - 1) - s.kb + 1
        s.token = lambda pos: s.kb + pos
        s.key_range = lambda t: (wbegin(t, P.w), t + 1)
    else:
        nchunks = ceil_div(P.lp, KBM)
        j, c = x // nchunks, x % nchunks
        s.kb = j * P.lp + c * KBM
        if s.kb >= L:
            return None
        s.ke = min(s.kb + KBM, (j + 1) * P.lp, L)
        s.key_row0 = row0
        R = P.k_rows
        base = ((b * P.Hkv + hkv) * R + row0 + j * P.lp) * R
        lo = bisect.bisect_left(keys, base)
        s.n_pos = bisect.bisect_left(keys, base + R) - lo

        def token(pos):
            key = keys[lo + pos]
            if pos > 0 and keys[lo + pos - 1] == key:
                return -1
            return key % R - row0
        s.token = token
        s.key_range = lambda t: (0, t + 1)
    return s


def key_tiles(P):
    if P.branch == "cmp":
        rows = P.k_rows if P.cu is None else ncmp(P.seqlen, P.l, P.d)
        return ceil_div(rows, KBM)
    if P.branch == "win":
        return ceil_div(P.seqlen, KBM)
    return nslc(P.seqlen, P.lp) * ceil_div(P.lp, KBM)


def dkdv_kernel(P, X, dk, dv, written):
    q, k, v, do, lse, delta = X["q"], X["k"], X["v"], X["do"], X["lse"], X["delta"]
    kbm = kblock_s(P.Dk)
    G = P.G
    scale_log2 = P.scale * LOG2E
    keys = inverse_keys(P) if P.branch == "slc" else None
    n_blocks = key_tiles(P)
    if n_blocks == 0 and P.cu is not None and P.k_rows > 0:
        n_blocks = 1
    if n_blocks == 0:
        return
    for z in range(P.num_seqs + (1 if P.cu is not None else 0)):
        for hkv in range(P.Hkv):
            if z == P.num_seqs:
                r0 = P.cmp_row_begin(P.num_seqs) if P.branch == "cmp" else P.cu[P.num_seqs]
                if r0 < P.k_rows:
                    dk[0, r0:, hkv] = 0
                    dv[0, r0:, hkv] = 0
                    written["dk"][0, r0:, hkv] += 1
                continue
            si = P.seq(z)
            b, row0, L, _ = si
            for x in range(n_blocks):
                s = q_schedule(P, si, x, hkv, keys)
                if s is None:
                    continue
                kb, ke = s.kb, s.ke
                Kt = torch.zeros(KBM, P.Dk, dtype=torch.float64)
                Vt = torch.zeros(KBM, v.shape[3], dtype=torch.float64)
                Kt[:ke - kb] = k[b, s.key_row0 + kb:s.key_row0 + ke, hkv]
                Vt[:ke - kb] = v[b, s.key_row0 + kb:s.key_row0 + ke, hkv]
                acc_dk = torch.zeros(KBM, P.Dk, dtype=torch.float64)
                acc_dv = torch.zeros(KBM, v.shape[3], dtype=torch.float64)
                total = s.n_pos * G
                for f0 in range(0, total, kbm):
                    Q = torch.zeros(kbm, P.Dk, dtype=torch.float64)
                    dO = torch.zeros(kbm, v.shape[3], dtype=torch.float64)
                    lo = torch.zeros(kbm, dtype=torch.long)
                    hi = torch.zeros(kbm, dtype=torch.long)
                    l2 = torch.full((kbm,), math.inf, dtype=torch.float64)
                    dl = torch.zeros(kbm, dtype=torch.float64)
                    for r in range(kbm):
                        f = f0 + r
                        if f >= total:
                            continue
                        t = s.token(f // G)
                        if t < 0:
                            continue
                        assert t < L
                        h = hkv * G + f % G
                        ls = float(lse[b, h, row0 + t])
                        l2[r] = math.inf if ls == -math.inf else ls * LOG2E
                        dl[r] = delta[b, h, row0 + t]
                        klo, khi = s.key_range(t)
                        lo[r] = max(klo - kb, 0)
                        hi[r] = max(min(khi, ke) - kb, 0)
                        Q[r] = q[b, row0 + t, h]
                        dO[r] = do[b, row0 + t, h]
                    ST = Kt @ Q.T                 # (keys, rows)
                    dPT = Vt @ dO.T
                    keyi = torch.arange(KBM)[:, None]
                    vis = (keyi >= lo[None, :]) & (keyi < hi[None, :])
                    PT = torch.where(vis, exp2(ST * scale_log2 - l2[None, :]), 0.0)
                    dST = PT * (dPT - dl[None, :])
                    acc_dv += PT @ dO
                    acc_dk += dST @ Q
                acc_dk *= P.scale
                dk[b, s.key_row0 + kb:s.key_row0 + ke, hkv] = acc_dk[:ke - kb]
                dv[b, s.key_row0 + kb:s.key_row0 + ke, hkv] = acc_dv[:ke - kb]
                written["dk"][b, s.key_row0 + kb:s.key_row0 + ke, hkv] += 1


def delta_kernel(P, X):
    o, do, lse = X["o"], X["do"], X["lse"]
    delta = torch.full_like(lse, math.nan)
    for z in range(P.num_seqs):
        b, row0, L, _ = P.seq(z)
        for t in range(L):
            for h in range(P.Hq):
                s = float((o[b, row0 + t, h] * do[b, row0 + t, h]).sum())
                if X["dlse"] is not None:
                    s -= float(X["dlse"][b, h, row0 + t])
                # an lse = -inf row has P = 0: its delta must not reach dS (0 * inf = NaN)
                if float(lse[b, h, row0 + t]) == -math.inf:
                    s = 0.0
                delta[b, h, row0 + t] = s
    return delta


# --------------------------------------------------------------------------- driver
def run_branch(branch, q, k, v, cu, max_seqlen, scale, l=1, d=1, lp=1, w=1, bi=None):
    cu_t = torch.tensor(cu, dtype=torch.int32) if cu is not None else None
    if branch == "cmp":
        o, lse = ops.compressed_attn_fwd(q, k, v, cu_t, max_seqlen, l, d, scale)
    elif branch == "slc":
        o, lse = ops.selected_attn_fwd(q, k, v, bi, cu_t, max_seqlen, lp, scale)
    else:
        o, lse = ops.window_attn_fwd(q, k, v, cu_t, max_seqlen, w, scale)
    do = torch.randn_like(o)
    # lse = -inf rows (no key) must get no gradient whatever dlse holds there (the
    # CPU op skips them): an infinite dlse there would turn a missed 0 * inf into NaN.
    dlse = torch.where(lse == -math.inf, math.inf, torch.randn_like(lse))
    if branch == "cmp":
        want = ops.compressed_attn_bwd(do, dlse, q, k, v, o, lse, cu_t, max_seqlen, l, d, scale)
    elif branch == "slc":
        want = ops.selected_attn_bwd(do, dlse, q, k, v, bi, o, lse, cu_t, max_seqlen, lp, scale)
    else:
        want = ops.window_attn_bwd(do, dlse, q, k, v, o, lse, cu_t, max_seqlen, w, scale)
    P = Plan(branch, q, k, cu, max_seqlen, scale, l, d, lp, w, bi)
    X = dict(q=q, k=k, v=v, o=o, do=do, lse=lse, dlse=dlse)
    X["delta"] = delta_kernel(P, X)
    nan = math.nan
    dq, dk, dv = (torch.full_like(x, nan) for x in (q, k, v))  # NSA_POISON_OUTPUTS
    written = {"dq": torch.zeros(q.shape[:3], dtype=torch.long),
               "dk": torch.zeros(k.shape[:3], dtype=torch.long)}
    dq_kernel(P, X, dq, written)
    dkdv_kernel(P, X, dk, dv, written)
    errs = []
    for name in ("dq", "dk"):
        wr = written[name]
        if not bool((wr == 1).all()):
            errs.append(f"{name}: rows written {int((wr == 0).sum())} never / "
                        f"{int((wr > 1).sum())} twice")
    for name, got, ref in (("dq", dq, want[0]), ("dk", dk, want[1]), ("dv", dv, want[2])):
        if not torch.allclose(got, ref, atol=1e-9, rtol=1e-9):
            bad = (got - ref).abs().nan_to_num(math.inf).max()
            errs.append(f"{name} differs (max err {float(bad):.3g})")
    return errs


def mean_compress_bwd_emu(g, x_shape, cu, l, d):
    """mean_compress_bwd_kernel: one CTA per token row."""
    B, T, H, D = x_shape
    dx = torch.full(x_shape, math.nan, dtype=torch.float64)
    for b in range(B):
        for r in range(T):
            t, L, cmp_row0 = r, T, 0
            if cu is not None:
                L = 0
                for m in range(len(cu) - 1):
                    if cu[m] <= r < cu[m + 1]:
                        t, L = r - cu[m], cu[m + 1] - cu[m]
                        break
                    cmp_row0 += ncmp(cu[m + 1] - cu[m], l, d)
            first = last = 0
            if t < L:
                first = (t - l + 1 + d - 1) // d if t - l + 1 > 0 else 0
                last = min(t // d + 1, ncmp(L, l, d))
            acc = torch.zeros(H, D, dtype=torch.float64)
            for i in range(first, last):
                acc += g[b, cmp_row0 + i]
            dx[b, r] = acc / l
    return dx


def check_mean_compress_bwd(seed):
    torch.manual_seed(seed)
    errs = []
    for (B, T, cu, l, d) in ((2, 70, None, 16, 8), (1, 75, [0, 5, 40, 41, 70], 16, 4),
                             (1, 33, [0, 33], 32, 32), (3, 7, None, 8, 8)):
        x = torch.randn(B, T, 2, 8, dtype=torch.float64)
        cu_t = torch.tensor(cu, dtype=torch.int32) if cu is not None else None
        g = torch.randn_like(ops.mean_compress(x, cu_t, l, d))
        want = ops.mean_compress_bwd(g, x, cu_t, l, d)
        got = mean_compress_bwd_emu(g, x.shape, cu, l, d)
        if not torch.allclose(got, want, atol=1e-12):
            errs.append(f"mean_compress_bwd B={B} T={T} cu={cu} l={l} d={d}")
    return errs


def random_bi(B, T, Hkv, n, lp, L_of_row, rng):
    """block_indices with unused (-1), out-of-range, future, and duplicate slots."""
    bi = torch.full((B, T, Hkv, n), -1, dtype=torch.int32)
    for b in range(B):
        for r in range(T):
            L, t = L_of_row(r)
            for h in range(Hkv):
                for s in range(n):
                    u = rng.random()
                    if u < 0.15:
                        j = -1
                    elif u < 0.2:
                        j = nslc(max(L, 1), lp) + rng.randint(0, 3)       # out of range
                    elif u < 0.3 and s > 0:
                        j = int(bi[b, r, h, s - 1])                       # duplicate
                    elif u < 0.4:
                        j = t // lp + rng.randint(1, 2)                   # future block
                    else:
                        j = rng.randint(0, max(t // lp, 0))
                    bi[b, r, h, s] = j
    return bi


def make_case(seed, branch, B, lens, Hq, Hkv, Dk, Dv, varlen, scale=None, l=16, d=8, lp=16,
              n=3, w=20, extra_cmp_rows=0):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    if varlen:
        cu = [0]
        for x in lens:
            cu.append(cu[-1] + x)
        T, Bm = cu[-1] + 3, 1   # 3 padding rows past the last sequence
        max_seqlen = max(lens)
    else:
        cu, T, Bm, max_seqlen = None, lens[0], B, lens[0]
    q = torch.randn(Bm, T, Hq, Dk, dtype=torch.float64)
    scale = Dk ** -0.5 if scale is None else scale
    if branch == "cmp":
        rows = T // d if varlen else max(ncmp(T, l, d) + extra_cmp_rows, 0)
        k = torch.randn(Bm, rows, Hkv, Dk, dtype=torch.float64)
        v = torch.randn(Bm, rows, Hkv, Dv, dtype=torch.float64)
        return run_branch("cmp", q, k, v, cu, max_seqlen, scale, l=l, d=d)
    k = torch.randn(Bm, T, Hkv, Dk, dtype=torch.float64)
    v = torch.randn(Bm, T, Hkv, Dv, dtype=torch.float64)
    if branch == "win":
        return run_branch("win", q, k, v, cu, max_seqlen, scale, w=w)

    def L_of_row(r):
        if cu is None:
            return T, r
        for m in range(len(cu) - 1):
            if cu[m] <= r < cu[m + 1]:
                return cu[m + 1] - cu[m], r - cu[m]
        return 0, 0
    bi = random_bi(Bm, T, Hkv, n, lp, L_of_row, rng)
    return run_branch("slc", q, k, v, cu, max_seqlen, scale, lp=lp, bi=bi)


CASES = [
    # name, kwargs
    ("cmp batch G=1 Dk=64", dict(branch="cmp", B=2, lens=[150], Hq=1, Hkv=1, Dk=64, Dv=64, varlen=False)),
    ("cmp batch G=4 Dk=128 +rows", dict(branch="cmp", B=1, lens=[300], Hq=8, Hkv=2, Dk=128, Dv=128,
                                        varlen=False, l=8, d=4, extra_cmp_rows=3)),
    ("cmp batch short k_cmp", dict(branch="cmp", B=2, lens=[90], Hq=2, Hkv=1, Dk=64, Dv=64,
                                   varlen=False, extra_cmp_rows=-3)),
    ("cmp batch T<l (no block)", dict(branch="cmp", B=2, lens=[10], Hq=2, Hkv=1, Dk=64, Dv=64, varlen=False)),
    ("cmp varlen G=16 Dk=192", dict(branch="cmp", B=4, lens=[40, 3, 0, 150, 16], Hq=16, Hkv=1, Dk=192,
                                    Dv=128, varlen=True)),
    ("cmp varlen neg scale", dict(branch="cmp", B=3, lens=[70, 20, 33], Hq=2, Hkv=1, Dk=64, Dv=64,
                                  varlen=True, scale=-0.3)),
    ("cmp varlen scale 0", dict(branch="cmp", B=2, lens=[70, 33], Hq=2, Hkv=2, Dk=64, Dv=64,
                                varlen=True, scale=0.0)),
    ("win batch G=2 Dk=64", dict(branch="win", B=2, lens=[130], Hq=4, Hkv=2, Dk=64, Dv=64, varlen=False, w=70)),
    ("win batch G=1 Dk=128 w=1", dict(branch="win", B=1, lens=[100], Hq=1, Hkv=1, Dk=128, Dv=128,
                                      varlen=False, w=1)),
    ("win varlen G=16 Dk=192", dict(branch="win", B=3, lens=[1, 70, 0, 33], Hq=16, Hkv=1, Dk=192, Dv=128,
                                    varlen=True, w=40)),
    ("win varlen neg scale", dict(branch="win", B=2, lens=[90, 5], Hq=2, Hkv=1, Dk=64, Dv=64,
                                  varlen=True, scale=-0.2, w=33)),
    ("slc batch l'=16 G=4", dict(branch="slc", B=2, lens=[100], Hq=4, Hkv=1, Dk=64, Dv=64, varlen=False,
                                 lp=16, n=4)),
    ("slc batch l'=64 G=1 Dk=128", dict(branch="slc", B=1, lens=[200], Hq=2, Hkv=2, Dk=128, Dv=128,
                                        varlen=False, lp=64, n=3)),
    ("slc batch l'=96 (2 CTAs/block)", dict(branch="slc", B=1, lens=[250], Hq=2, Hkv=1, Dk=64, Dv=64,
                                            varlen=False, lp=96, n=2)),
    ("slc varlen l'=32 G=16 Dk=192", dict(branch="slc", B=3, lens=[45, 0, 2, 80], Hq=16, Hkv=1, Dk=192,
                                          Dv=128, varlen=True, lp=32, n=3)),
    ("slc varlen l'=64 G=2 neg scale", dict(branch="slc", B=2, lens=[130, 64], Hq=4, Hkv=2, Dk=64, Dv=64,
                                            varlen=True, lp=64, n=2, scale=-0.25)),
]


def main():
    only = sys.argv[1:]
    failed = 0
    for i, (name, kw) in enumerate(CASES):
        if only and not any(o in name for o in only):
            continue
        errs = make_case(100 + i, **kw)
        print(("PASS " if not errs else "FAIL ") + name + ("" if not errs else ": " + "; ".join(errs)))
        failed += bool(errs)
    errs = check_mean_compress_bwd(7)
    print(("PASS " if not errs else "FAIL ") + "mean_compress_bwd" + ("" if not errs else ": " + "; ".join(errs)))
    failed += bool(errs)
    print("bwd plan emulation:", "OK" if failed == 0 else f"{failed} FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
