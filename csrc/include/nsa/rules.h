// The index rules of NSA, written once. Every kernel (CPU and CUDA) and the
// C++ tests use these; nsa_cuda/reference.py states the same rules in PyTorch.
// See NSA_SPEC.md for the definitions. Positions are 0-based, all branches causal.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define NSA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NSA_HOST_DEVICE inline
#endif

namespace nsa {

// Number of complete compressed blocks in a sequence of length T:
// block i covers tokens [i*d, i*d + l).
NSA_HOST_DEVICE int64_t num_cmp_blocks(int64_t T, int64_t l, int64_t d) {
  return T < l ? 0 : (T - l) / d + 1;
}

// Compressed blocks visible to query t: those that have ended, i*d + l - 1 <= t.
NSA_HOST_DEVICE int64_t num_visible_cmp_blocks(int64_t t, int64_t l, int64_t d) {
  return t + 1 < l ? 0 : (t + 1 - l) / d + 1;
}

// Sliding window: query t sees keys [window_begin(t, w), t].
NSA_HOST_DEVICE int64_t window_begin(int64_t t, int64_t w) {
  return t - w + 1 > 0 ? t - w + 1 : 0;
}

// Selection block j covers tokens [j*lp, (j+1)*lp); query t sees its part
// [j*lp, selected_block_end(j, t, lp)). Empty (begin >= end) when j*lp > t.
NSA_HOST_DEVICE int64_t selected_block_end(int64_t j, int64_t t, int64_t lp) {
  const int64_t end = (j + 1) * lp;
  return end < t + 1 ? end : t + 1;
}

// Number of selection blocks in a sequence of length T (valid block ids are
// [0, num_slc_blocks)); entries outside are unused slots.
NSA_HOST_DEVICE int64_t num_slc_blocks(int64_t T, int64_t lp) {
  return (T + lp - 1) / lp;
}

// Selection blocks overlapped by compressed block i: [first, last].
NSA_HOST_DEVICE int64_t first_overlapped_slc_block(int64_t i, int64_t d, int64_t lp) {
  return (i * d) / lp;
}
NSA_HOST_DEVICE int64_t last_overlapped_slc_block(int64_t i, int64_t l, int64_t d, int64_t lp) {
  return (i * d + l - 1) / lp;
}

// The inverse: the compressed rows i overlapping selection block j (w(i, j) > 0)
// are [first_overlapping_cmp_row, last_overlapping_cmp_row]: i*d + l > j*lp and
// i*d < (j+1)*lp. (The first may be negative: callers clip to their rows.)
NSA_HOST_DEVICE int64_t first_overlapping_cmp_row(int64_t j, int64_t l, int64_t d, int64_t lp) {
  const int64_t num = j * lp - l;  // i > num / d, floor division for a negative num
  return (num >= 0 ? num / d : -((-num + d - 1) / d)) + 1;
}
NSA_HOST_DEVICE int64_t last_overlapping_cmp_row(int64_t j, int64_t d, int64_t lp) {
  return ((j + 1) * lp + d - 1) / d - 1;
}

// w(i, j) = |[i*d, i*d+l) ∩ [j*lp, (j+1)*lp)| / d.
NSA_HOST_DEVICE float cmp_slc_overlap_weight(int64_t i, int64_t j, int64_t l, int64_t d,
                                             int64_t lp) {
  const int64_t lo = i * d > j * lp ? i * d : j * lp;
  const int64_t hi = i * d + l < (j + 1) * lp ? i * d + l : (j + 1) * lp;
  return hi > lo ? float(hi - lo) / float(d) : 0.f;
}

// Last candidate selection block for query t: J = t // lp.
NSA_HOST_DEVICE int64_t last_candidate_slc_block(int64_t t, int64_t lp) { return t / lp; }

// Blocks always selected: the n_init first and the n_local last candidates.
NSA_HOST_DEVICE bool is_forced_slc_block(int64_t j, int64_t J, int64_t n_init, int64_t n_local) {
  return j <= J && (j < n_init || j > J - n_local);
}

// Ranking of selection candidates: a higher score wins, ties go to the smaller j.
template <typename Score>
NSA_HOST_DEVICE bool slc_ranks_before(Score score_a, int64_t j_a, Score score_b, int64_t j_b) {
  return score_a > score_b || (score_a == score_b && j_a < j_b);
}

// Varlen: the first compressed row of sequence `seq` in a packed k_cmp is the sum
// of Tc(len_m) over the earlier sequences.
NSA_HOST_DEVICE int64_t packed_cmp_row_begin(const int32_t* cu_seqlens, int64_t seq, int64_t l,
                                             int64_t d) {
  int64_t row = 0;
  for (int64_t m = 0; m < seq; ++m) row += num_cmp_blocks(cu_seqlens[m + 1] - cu_seqlens[m], l, d);
  return row;
}

// Varlen mean_compress output rows: an upper bound on sum Tc(len_m) known from
// shapes alone (Tc(len) <= len // d because d divides l), so no device sync.
NSA_HOST_DEVICE int64_t packed_cmp_rows_bound(int64_t total, int64_t d) { return total / d; }

}  // namespace nsa

#include "params.h"

namespace nsa {

// Offsets of sequence `seq`: batch mode indexes the batch dimension; varlen mode
// reads cu_seqlens and packs compressed rows per packed_cmp_row_begin; decode
// (seqlens_k) reads the cache length and puts the `seqlen` queries at its end.
NSA_HOST_DEVICE SeqInfo seq_info(const int32_t* cu_seqlens, const int32_t* seqlens_k,
                                 int64_t seq, int64_t seqlen, int64_t l, int64_t d) {
  SeqInfo s;
  if (seqlens_k != nullptr) {
    s.batch = seq;
    s.row0 = 0;
    s.len = seqlens_k[seq];
    s.cmp_row0 = 0;
    s.q_row0 = 0;
    s.q_len = seqlen;
    s.q_pos0 = s.len - seqlen;
    return s;
  }
  if (cu_seqlens == nullptr) {
    s.batch = seq;
    s.row0 = 0;
    s.len = seqlen;
    s.cmp_row0 = 0;
  } else {
    s.batch = 0;
    s.row0 = cu_seqlens[seq];
    s.len = cu_seqlens[seq + 1] - cu_seqlens[seq];
    s.cmp_row0 = packed_cmp_row_begin(cu_seqlens, seq, l, d);
  }
  s.q_row0 = s.row0;
  s.q_len = s.len;
  s.q_pos0 = 0;
  return s;
}

NSA_HOST_DEVICE SeqInfo seq_info(const int32_t* cu_seqlens, int64_t seq, int64_t seqlen,
                                 int64_t l, int64_t d) {
  return seq_info(cu_seqlens, nullptr, seq, seqlen, l, d);
}

// Compressed blocks that complete when a sequence grows from `old_len` to
// `new_len` tokens: [num_cmp_blocks(old_len), num_cmp_blocks(new_len)). The
// KV-cache update compresses exactly these.
NSA_HOST_DEVICE int64_t num_new_cmp_blocks(int64_t old_len, int64_t new_len, int64_t l,
                                           int64_t d) {
  return num_cmp_blocks(new_len, l, d) - num_cmp_blocks(old_len, l, d);
}

}  // namespace nsa
