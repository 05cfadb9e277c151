// KV schedules of the three attention branches: the policy types of the one
// attention mainloop (attn_fwd.cuh). A schedule answers, for one CTA (a tile of
// flattened (token, head) rows of one sequence and kv head):
//   - key_row0(): the row of key 0 in k/v (the sequence's first row),
//   - next(tile): the KV tiles to visit, each a key range [begin, end) of at most
//     kBlockN keys (CTA-uniform: every thread walks the same sequence),
//   - row_range(t, tile): the keys [lo, hi) that token t may see (the mask),
//   - tile.need_mask: false where every row sees every key of the tile.
// Rows whose token lies past the sequence never reach row_range (the mainloop
// masks them whole).
#pragma once

#include <climits>

#include "cuda/common.cuh"

namespace nsa::cuda {

struct KvTile {
  int64_t begin = 0, end = 0;  // keys [begin, end), end - begin <= kBlockN
  int64_t block = -1;          // kSelected: the selection block of the tile
  bool need_mask = true;
};

// Branch 1: compressed rows [0, min(nc(t), rows available)).
template <int kBlockN>
struct CompressedSchedule {
  static constexpr Branch kBranch = Branch::kCompressed;
  int64_t l, d, avail, n_end, unmasked_end, cur, row0;

  static int smem_bytes(const AttnFwdParams&) { return 0; }
  static std::string smem_hint(const AttnFwdParams&) { return ""; }

  __device__ static SeqInfo seq(const AttnFwdParams& p, int64_t s) {
    return nsa::seq_info(p.cu_seqlens, s, p.seqlen, p.cmp_block_size, p.cmp_stride);
  }

  __device__ void init(const AttnFwdParams& p, const SeqInfo& si, int64_t t_lo, int64_t t_hi,
                       int /*hkv*/, char* /*smem*/, int /*tid*/) {
    l = p.cmp_block_size, d = p.cmp_stride;
    // Clamp to the k_cmp rows that exist for this sequence, so nothing reads
    // out of bounds when the caller passes fewer rows than Tc(len).
    avail = p.k_rows - si.cmp_row0;
    avail = avail > 0 ? avail : 0;
    n_end = min(num_visible_cmp_blocks(t_hi, l, d), avail);
    unmasked_end = min(num_visible_cmp_blocks(t_lo, l, d), avail);
    cur = 0;
    row0 = si.cmp_row0;
  }
  __device__ int64_t key_row0() const { return row0; }

  __device__ bool next(KvTile& tile) {
    if (cur >= n_end) return false;
    tile.begin = cur;
    tile.end = min(cur + kBlockN, n_end);
    tile.need_mask = cur + kBlockN > unmasked_end;
    cur += kBlockN;
    return true;
  }

  __device__ void row_range(int64_t t, const KvTile&, int64_t& lo, int64_t& hi) const {
    lo = 0;
    hi = min(num_visible_cmp_blocks(t, l, d), avail);
  }
};

// Branch 3: keys [window_begin(t), t]. The tiles are aligned to kBlockN (like
// FlashAttention's get_n_block_min_max); a tile needs no mask when it lies
// inside the window of every row: [window_begin(t_hi), t_lo].
template <int kBlockN>
struct WindowSchedule {
  static constexpr Branch kBranch = Branch::kWindow;
  int64_t w, cur, n_end, full_lo, full_hi, row0;

  static int smem_bytes(const AttnFwdParams&) { return 0; }
  static std::string smem_hint(const AttnFwdParams&) { return ""; }

  __device__ static SeqInfo seq(const AttnFwdParams& p, int64_t s) {
    return token_seq_info(p.cu_seqlens, s, p.seqlen);
  }

  __device__ void init(const AttnFwdParams& p, const SeqInfo& si, int64_t t_lo, int64_t t_hi,
                       int, char*, int) {
    w = p.window_size;
    cur = window_begin(t_lo, w) / kBlockN * kBlockN;
    n_end = t_hi + 1;
    full_lo = window_begin(t_hi, w);
    full_hi = t_lo + 1;
    row0 = si.row0;
  }
  __device__ int64_t key_row0() const { return row0; }

  __device__ bool next(KvTile& tile) {
    if (cur >= n_end) return false;
    tile.begin = cur;
    tile.end = min(cur + kBlockN, n_end);
    tile.need_mask = !(cur >= full_lo && cur + kBlockN <= full_hi);
    cur += kBlockN;
    return true;
  }

  __device__ void row_range(int64_t t, const KvTile&, int64_t& lo, int64_t& hi) const {
    lo = window_begin(t, w);
    hi = t + 1;
  }
};

// Branch 2: the union of the selection blocks of the CTA's tokens, ascending,
// each block in chunks of kBlockN keys, clipped to [j*l', t_hi]. A row sees a
// tile's keys only when block j is in its own token's list (and s <= t). The
// lists live in smem: list[tok * n + slot], -1 for an unused slot (negative,
// >= ceil(len/l'), or starting after the token: never read out of bounds). The
// union is a bitmap over the blocks j <= t_hi / l' (bit j of word j / 32), built
// once in init; next() walks its set bits in each thread's registers, with no
// barrier or reduction per tile.
template <int kBlockM, int kBlockN, int kThreads>
struct SelectedSchedule {
  static constexpr Branch kBranch = Branch::kSelected;
  int64_t lp, t_lo, t_hi, row0;
  int n;                  // slots per token
  int32_t* list;          // smem [tokens][n]
  const uint32_t* bits;   // smem [words]: the union
  int words, word;        // bitmap size; the word being walked
  uint32_t pending;       // its set bits not visited yet
  int64_t cur_j, cur_begin, cur_block_end;

  // Bitmap words for the tokens of any CTA (a tile may reach kBlockM tokens past
  // p.seqlen only when a varlen max_seqlen understates a sequence; init clips to
  // this bound, so smem stays in bounds even then).
  NSA_HOST_DEVICE static int64_t max_words(const AttnFwdParams& p) {
    return num_slc_blocks(p.seqlen + kBlockM, p.slc_block_size) / 32 + 1;
  }
  static int smem_bytes(const AttnFwdParams& p) {
    return int(kBlockM * p.slc_num_blocks + max_words(p)) * int(sizeof(int32_t));
  }
  // The block lists grow with n; say so when they are what overflows.
  static std::string smem_hint(const AttnFwdParams& p) {
    return "the selected branch keeps " + std::to_string(kBlockM) + " tokens' block lists (" +
           std::to_string(p.slc_num_blocks) + " slots each, the slc_num_blocks / block_indices' last "
           "dimension) in shared memory: use fewer selected blocks";
  }

  __device__ static SeqInfo seq(const AttnFwdParams& p, int64_t s) {
    return token_seq_info(p.cu_seqlens, s, p.seqlen);
  }

  __device__ void init(const AttnFwdParams& p, const SeqInfo& si, int64_t t_lo_, int64_t t_hi_,
                       int hkv, char* smem, int tid) {
    lp = p.slc_block_size;
    t_lo = t_lo_, t_hi = t_hi_;
    row0 = si.row0;
    n = int(p.slc_num_blocks);
    const int count = int(t_hi - t_lo + 1) * n;  // tokens <= kBlockM
    list = reinterpret_cast<int32_t*>(smem);
    uint32_t* union_bits = reinterpret_cast<uint32_t*>(list + kBlockM * n);
    // Listed blocks satisfy j * lp <= t <= t_hi.
    words = int(min(t_hi / lp / 32 + 1, max_words(p)));
    for (int w = tid; w < words; w += kThreads) union_bits[w] = 0u;
    __syncthreads();
    const int64_t nblk = num_slc_blocks(si.len, lp);
    const int32_t* bi = p.block_indices + si.batch * p.bi_batch_stride + hkv * p.bi_head_stride;
    for (int idx = tid; idx < count; idx += kThreads) {
      const int64_t t = t_lo + idx / n;
      const int64_t j = bi[(row0 + t) * p.bi_row_stride + idx % n];
      const bool ok = j >= 0 && j < nblk && j * lp <= t && j / 32 < words;
      list[idx] = ok ? int32_t(j) : -1;
      if (ok) atomicOr(union_bits + j / 32, 1u << (j % 32));
    }
    __syncthreads();
    bits = union_bits;
    word = 0;
    pending = bits[0];
    cur_j = -1;
    cur_begin = cur_block_end = 0;
  }
  __device__ int64_t key_row0() const { return row0; }

  __device__ bool next(KvTile& tile) {
    if (cur_j >= 0 && cur_begin + kBlockN < cur_block_end) {
      cur_begin += kBlockN;
    } else {
      while (pending == 0u) {
        if (++word >= words) return false;
        pending = bits[word];
      }
      const int bit = __ffs(int(pending)) - 1;
      pending &= pending - 1u;
      cur_j = int64_t(word) * 32 + bit;
      cur_begin = cur_j * lp;
      cur_block_end = min((cur_j + 1) * lp, t_hi + 1);  // > j*lp: some token t >= j*lp listed it
    }
    tile.begin = cur_begin;
    tile.end = min(cur_begin + kBlockN, cur_block_end);
    tile.block = cur_j;
    tile.need_mask = true;
    return true;
  }

  __device__ void row_range(int64_t t, const KvTile& tile, int64_t& lo, int64_t& hi) const {
    const int32_t* mine = list + (t - t_lo) * n;
    const int32_t j = int32_t(tile.block);
    bool listed = false;
    if (n % 4 == 0) {  // 16-byte rows (the list base is 16-byte aligned): a quarter of the loads
      for (int s = 0; s < n; s += 4) {
        const int4 four = *reinterpret_cast<const int4*>(mine + s);
        listed |= (four.x == j) | (four.y == j) | (four.z == j) | (four.w == j);
      }
    } else {
      for (int s = 0; s < n; ++s) listed |= mine[s] == j;
    }
    lo = tile.block * lp;
    hi = listed ? selected_block_end(tile.block, t, lp) : lo;
  }
};

// Sets the scores a row may not see to -inf: `scores` is the (rows, cols) view of
// an S tile (query rows x keys of `tile`), `coords` its identity partition,
// row_ok/row_t the rows' validity and tokens. Shared by the forward and the
// query-side backward (dq).
template <class Scores, class Coords, class Schedule, int kRows>
__device__ __forceinline__ void mask_scores(Scores& scores, const Coords& coords,
                                            const Schedule& sched, const KvTile& tile,
                                            const bool (&row_ok)[kRows],
                                            const int64_t (&row_t)[kRows]) {
  using namespace cute;
#pragma unroll
  for (int mi = 0; mi < kRows; ++mi) {
    int64_t lo = 0, hi = 0;  // rows past the sequence see nothing
    if (row_ok[mi]) sched.row_range(row_t[mi], tile, lo, hi);
    // Visible columns of the tile: [col_lo, col_hi) within [0, end - begin).
    const int col_lo = int(max(lo - tile.begin, int64_t(0)));
    const int col_hi = int(min(hi, tile.end) - tile.begin);
#pragma unroll
    for (int ni = 0; ni < size<1>(scores); ++ni) {
      const int col = get<1>(coords(mi, ni));
      if (col < col_lo || col >= col_hi) scores(mi, ni) = -INFINITY;
    }
  }
}

// Whether the calling warp has work on `tile`: some lane's row sees one of its keys
// (a warp vote; every lane of the warp calls it, and a tile without a mask is seen
// by all). A warp whose rows see none of the tile skips its tensor-core work there:
// the selected branch visits the union of its tokens' blocks, most of them chosen
// by a few tokens, and with several CTAs per SM the other warps get those cycles.
// Exact: a fully masked tile changes neither the softmax state nor dq. Only the
// selected branch votes: the others' tiles are seen by nearly every row, and the
// vote's registers cost their hdim-192 kernels spills (sass_report).
template <class Schedule, int kRows>
__device__ __forceinline__ bool warp_sees_tile(const Schedule& sched, const KvTile& tile,
                                               const bool (&row_ok)[kRows],
                                               const int64_t (&row_t)[kRows]) {
  if constexpr (Schedule::kBranch != Branch::kSelected) return true;
  if (!tile.need_mask) return true;
  bool sees = false;
#pragma unroll
  for (int mi = 0; mi < kRows; ++mi) {
    if (!row_ok[mi]) continue;
    int64_t lo, hi;
    sched.row_range(row_t[mi], tile, lo, hi);
    sees |= max(lo, tile.begin) < min(hi, tile.end);
  }
  return __any_sync(0xffffffffu, sees);
}

}  // namespace nsa::cuda
