// Query schedules of the KV-side backward (dk, dv): the transpose of the KV
// schedules of kv_schedule.cuh. A CTA owns the keys [kb, ke) of one (sequence,
// kv head) and visits the queries that see any of them, as a list of query
// positions pos in [0, n_pos); position pos is token token(pos) (-1: skip) and
// expands to the G query heads of the group (flattened row pos * G + g, like the
// forward's rows). key_range(t, lo, hi): the keys [lo, hi) token t sees (the
// branch's mask, like the forward schedules' row_range).
//   key_tiles(p)     host: CTAs per (sequence, kv head) along grid x
//   init(...)        false when the CTA owns no key row
//   tail_begin(p)    varlen: first key row owned by no sequence (zeroed)
#pragma once

#include "cuda/common.cuh"

namespace nsa::cuda {

// Branch 1: query t sees compressed key i iff t >= i*d + l - 1, i.e. the tokens
// [kb*d + l - 1, len) see some key of the tile. At batch 1 that is few CTAs with a
// triangular load (64k tokens, d = 16, 64 keys per CTA: 64 tiles per kv head, the
// first visiting every token), so a tile's queries are split into chunks of
// ws.dkv_chunk_pos positions, one CTA each (kSplits; plan_dkv_split): CTA x is
// chunk c of tile j, in tile order. A tile of several chunks writes partial sums
// to its slots (slot >= 0), which the reduce kernel adds up in chunk order.
template <int kBlockN>
struct CompressedQuerySchedule {
  static constexpr bool kSplits = true;
  int64_t kb, ke, key_row0, t_first, n_pos, l, d;
  int64_t slot = -1;  // this CTA's partial slot; -1: it writes dk, dv itself

  __host__ __device__ static int64_t key_tiles(const AttnBwdParams& p) {
    // Batch mode: every k_cmp row (rows past Tc(T) get zero gradients);
    // varlen: the longest sequence's blocks (padding rows: the tail CTAs).
    const int64_t rows = p.cu_seqlens == nullptr
                             ? p.k_rows
                             : num_cmp_blocks(p.seqlen, p.cmp_block_size, p.cmp_stride);
    return (rows + kBlockN - 1) / kBlockN;
  }
  // Chunks of key tile j: its query positions in the longest sequence, split.
  __host__ __device__ static int64_t chunks(const AttnBwdParams& p, int64_t chunk_pos, int64_t j) {
    const int64_t pos = p.seqlen - (j * kBlockN * p.cmp_stride + p.cmp_block_size - 1);
    return chunk_pos <= 0 || pos <= chunk_pos ? 1 : (pos + chunk_pos - 1) / chunk_pos;
  }
  // CTA x -> (tile j, chunk c) and the slot of (j, 0) (-1: a one-chunk tile); with
  // x = -1, the same for chunk 0 of tile `j` (the reduce kernel). Host: x = total
  // CTAs gives the CTA and slot counts (j = tiles, slot0 = slots).
  __host__ __device__ static void locate(const AttnBwdParams& p, int64_t chunk_pos, int64_t x,
                                         int64_t& j, int64_t& c, int64_t& slot0) {
    const int64_t tiles = key_tiles(p);
    const int64_t want_j = j;
    int64_t first = 0, slots = 0;
    for (j = 0; j < tiles; ++j) {
      const int64_t n = chunks(p, chunk_pos, j);
      if (x >= 0 ? x < first + n : j == want_j) break;
      first += n;
      if (n > 1) slots += n;
    }
    c = x >= 0 ? x - first : 0;
    slot0 = j < tiles && chunks(p, chunk_pos, j) == 1 ? -1 : slots;
    if (j == tiles) c = first;  // the totals
  }
  __device__ static SeqInfo seq(const AttnBwdParams& p, int64_t s) {
    return nsa::seq_info(p.cu_seqlens, s, p.seqlen, p.cmp_block_size, p.cmp_stride);
  }
  __device__ static int64_t tail_begin(const AttnBwdParams& p) {
    return packed_cmp_row_begin(p.cu_seqlens, p.num_seqs, p.cmp_block_size, p.cmp_stride);
  }

  // CTA x, or with x < 0 chunk 0 of tile `tile`.
  __device__ bool init(const AttnBwdParams& p, const AttnBwdWorkspace& ws, const SeqInfo& si,
                       int64_t x, int, int64_t tile = 0) {
    l = p.cmp_block_size, d = p.cmp_stride;
    int64_t j = tile, c, slot0;
    locate(p, ws.dkv_chunk_pos, x, j, c, slot0);
    slot = slot0 < 0 ? -1 : slot0 + c;
    int64_t own = p.k_rows - si.cmp_row0;  // rows of k_cmp from the sequence's first
    if (p.cu_seqlens != nullptr) own = min(own, num_cmp_blocks(si.len, l, d));
    kb = j * kBlockN;
    if (kb >= own) return false;
    ke = min(kb + kBlockN, own);
    key_row0 = si.cmp_row0;
    const int64_t first = kb * d + l - 1;  // the tile's first query token
    const int64_t total = max(si.len - first, int64_t(0));
    const int64_t step = ws.dkv_chunk_pos > 0 ? ws.dkv_chunk_pos : total;
    t_first = first + c * step;
    n_pos = max(min(total - c * step, step), int64_t(0));
    return true;
  }
  __device__ int64_t token(int64_t pos) const { return t_first + pos; }
  __device__ void key_range(int64_t t, int64_t& lo, int64_t& hi) const {
    lo = 0;
    hi = num_visible_cmp_blocks(t, l, d);
  }
};

// Branch 3: query t sees key s iff t - w + 1 <= s <= t: the tokens
// [kb, ke - 1 + w - 1] (clipped to the sequence).
template <int kBlockN>
struct WindowQuerySchedule {
  static constexpr bool kSplits = false;
  int64_t kb, ke, key_row0, t_first, n_pos, w;

  static int64_t key_tiles(const AttnBwdParams& p) { return (p.seqlen + kBlockN - 1) / kBlockN; }
  __device__ static SeqInfo seq(const AttnBwdParams& p, int64_t s) {
    return token_seq_info(p.cu_seqlens, s, p.seqlen);
  }
  __device__ static int64_t tail_begin(const AttnBwdParams& p) { return p.cu_seqlens[p.num_seqs]; }

  __device__ bool init(const AttnBwdParams& p, const AttnBwdWorkspace&, const SeqInfo& si,
                       int64_t x, int) {
    w = p.window_size;
    kb = x * kBlockN;
    if (kb >= si.len) return false;
    ke = min(kb + kBlockN, si.len);
    key_row0 = si.row0;
    t_first = kb;
    n_pos = min(ke - 1 + w - 1, si.len - 1) - t_first + 1;
    return true;
  }
  __device__ int64_t token(int64_t pos) const { return t_first + pos; }
  __device__ void key_range(int64_t t, int64_t& lo, int64_t& hi) const {
    lo = window_begin(t, w);
    hi = t + 1;
  }
};

// Branch 2: the tokens that selected block j, read from the sorted inverse-index
// keys (launch.h, run_slc_inverse_keys): the run of keys in
// [base, base + R) with base = ((b * Hkv + h) * R + row0 + j*l') * R. A block of
// l' > kBlockN keys is split over ceil(l' / kBlockN) CTAs. A token that listed
// the block twice appears twice in a row: the second copy is skipped, as the
// forward counts the block once.
template <int kBlockN>
struct SelectedQuerySchedule {
  static constexpr bool kSplits = false;
  int64_t kb, ke, key_row0, n_pos, lo, rows, row0;
  const int64_t* keys;

  static int64_t chunks(const AttnBwdParams& p) { return (p.slc_block_size + kBlockN - 1) / kBlockN; }
  static int64_t key_tiles(const AttnBwdParams& p) {
    return num_slc_blocks(p.seqlen, p.slc_block_size) * chunks(p);
  }
  __device__ static SeqInfo seq(const AttnBwdParams& p, int64_t s) {
    return token_seq_info(p.cu_seqlens, s, p.seqlen);
  }
  __device__ static int64_t tail_begin(const AttnBwdParams& p) { return p.cu_seqlens[p.num_seqs]; }

  __device__ static int64_t lower_bound(const int64_t* a, int64_t n, int64_t value) {
    int64_t first = 0;
    while (n > 0) {
      const int64_t half = n / 2;
      if (a[first + half] < value) {
        first += half + 1;
        n -= half + 1;
      } else {
        n = half;
      }
    }
    return first;
  }

  __device__ bool init(const AttnBwdParams& p, const AttnBwdWorkspace& ws, const SeqInfo& si,
                       int64_t x, int hkv) {
    const int64_t lp = p.slc_block_size;
    const int64_t nchunks = (lp + kBlockN - 1) / kBlockN;
    const int64_t j = x / nchunks, c = x % nchunks;
    kb = j * lp + c * kBlockN;
    if (kb >= si.len) return false;
    ke = min(min(kb + kBlockN, (j + 1) * lp), si.len);
    key_row0 = row0 = si.row0;
    rows = p.k_rows;
    keys = ws.slc_keys;
    const int64_t base = ((si.batch * p.num_heads_kv + hkv) * rows + si.row0 + j * lp) * rows;
    lo = lower_bound(keys, ws.slc_key_count, base);
    n_pos = lower_bound(keys, ws.slc_key_count, base + rows) - lo;
    return true;
  }
  __device__ int64_t token(int64_t pos) const {
    const int64_t key = keys[lo + pos];
    if (pos > 0 && keys[lo + pos - 1] == key) return -1;
    return key % rows - row0;
  }
  __device__ void key_range(int64_t t, int64_t& lo, int64_t& hi) const {
    lo = 0;  // the CTA's keys all lie in the listed block
    hi = t + 1;
  }
};

}  // namespace nsa::cuda
