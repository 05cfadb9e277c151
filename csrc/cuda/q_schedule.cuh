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
// [kb*d + l - 1, len) see some key of the tile.
template <int kBlockN>
struct CompressedQuerySchedule {
  int64_t kb, ke, key_row0, t_first, n_pos, l, d;

  static int64_t key_tiles(const AttnBwdParams& p) {
    // Batch mode: every k_cmp row (rows past Tc(T) get zero gradients);
    // varlen: the longest sequence's blocks (padding rows: the tail CTAs).
    const int64_t rows = p.cu_seqlens == nullptr
                             ? p.k_rows
                             : num_cmp_blocks(p.seqlen, p.cmp_block_size, p.cmp_stride);
    return (rows + kBlockN - 1) / kBlockN;
  }
  __device__ static SeqInfo seq(const AttnBwdParams& p, int64_t s) {
    return nsa::seq_info(p.cu_seqlens, s, p.seqlen, p.cmp_block_size, p.cmp_stride);
  }
  __device__ static int64_t tail_begin(const AttnBwdParams& p) {
    return packed_cmp_row_begin(p.cu_seqlens, p.num_seqs, p.cmp_block_size, p.cmp_stride);
  }

  __device__ bool init(const AttnBwdParams& p, const AttnBwdWorkspace&, const SeqInfo& si,
                       int64_t x, int) {
    l = p.cmp_block_size, d = p.cmp_stride;
    int64_t own = p.k_rows - si.cmp_row0;  // rows of k_cmp from the sequence's first
    if (p.cu_seqlens != nullptr) own = min(own, num_cmp_blocks(si.len, l, d));
    kb = x * kBlockN;
    if (kb >= own) return false;
    ke = min(kb + kBlockN, own);
    key_row0 = si.cmp_row0;
    t_first = kb * d + l - 1;
    n_pos = max(si.len - t_first, int64_t(0));
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
