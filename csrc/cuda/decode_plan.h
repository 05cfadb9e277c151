// Shapes of the decode (KV-cache) kernels, shared by the host (cuda_ops.cpp,
// which sizes the workspaces) and the kernels (decode*.cuh). Plain C++: no CUDA,
// no torch. Every bound here is computed from shapes alone (no device sync).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "nsa/params.h"
#include "nsa/rules.h"

namespace nsa::cuda {

// decode_attn: a CTA owns kDecodeRows rows r = i * G + g (new token i, head g of
// its KV head's group) and walks its branch's keys in chunks of kDecodeKeys.
constexpr int kDecodeRows = 16;
constexpr int kDecodeKeys = 32;
constexpr int kDecodeThreads = 128;
constexpr int kDecodeMaxSplits = 256;
// K/V chunk buffers: the next chunk's copies run under this chunk's math.
constexpr int kDecodeStages = 2;

// select_blocks_decode: a score CTA owns kSelectBlocksPerCta selection blocks and
// works on at most kSelectHeadsPerPass query heads at a time.
constexpr int kSelectBlocksPerCta = 16;
constexpr int kSelectHeadsPerPass = 16;
constexpr int kSelectThreads = 128;

NSA_HOST_DEVICE int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

NSA_HOST_DEVICE int64_t decode_row_tiles(const AttnFwdParams& p) {
  return ceil_div64(p.seqlen * p.group, kDecodeRows);
}

// New tokens a row tile can span: rows [r0, r0 + kDecodeRows) cover at most
// (kDecodeRows - 1) / G + 2 consecutive tokens, never more than S.
NSA_HOST_DEVICE int64_t decode_tile_tokens(const AttnFwdParams& p) {
  const int64_t span = (kDecodeRows - 1) / p.group + 2;
  return span < p.seqlen ? span : p.seqlen;
}

// Upper bound on the key chunks of one row tile, from shapes only.
inline int64_t decode_max_chunks(const AttnFwdParams& p) {
  switch (p.branch) {
    case Branch::kCompressed:
      return ceil_div64(p.k_rows, kDecodeKeys);
    case Branch::kWindow:
      // keys [window_begin(t_first), t_last] of at most w + S - 1 keys, clipped to the capacity
      return ceil_div64(std::min<int64_t>(p.window_size + p.seqlen - 1, p.k_rows), kDecodeKeys);
    case Branch::kSelected:
      return decode_tile_tokens(p) * p.slc_num_blocks * ceil_div64(p.slc_block_size, kDecodeKeys);
  }
  return 1;
}

// KV splits: enough CTAs to fill the GPU about twice (batch 1 included), never
// more splits than chunks. NSA_DECODE_SPLITS=k (read at each call) fixes the count
// instead, clamped to [1, kDecodeMaxSplits]: the tests use 1 so that one CTA walks
// every chunk of its tile (the double-buffered path), which the heuristic rarely
// picks at test sizes.
inline int decode_num_splits(const AttnFwdParams& p, int num_sms) {
  if (const char* env = std::getenv("NSA_DECODE_SPLITS"); env != nullptr && env[0] != '\0') {
    const long long fixed = std::atoll(env);
    if (fixed >= 1) return int(std::min<long long>(fixed, kDecodeMaxSplits));
  }
  const int64_t ctas = p.num_seqs * p.num_heads_kv * decode_row_tiles(p);
  const int64_t chunks = std::max<int64_t>(1, decode_max_chunks(p));
  const int64_t want = ceil_div64(2 * int64_t(std::max(num_sms, 1)), std::max<int64_t>(ctas, 1));
  return int(std::clamp<int64_t>(std::min(want, chunks), 1, kDecodeMaxSplits));
}

// Rows of the split workspace (o_part, lse_part) that decode_attn writes and
// decode_combine (or, with `gated`, the gated sum of sparse_attn_decode) merges:
// none with one split and no gated sum, where decode_attn writes the final o and
// lse itself and no combine runs.
inline int64_t decode_partial_rows(const AttnFwdParams& p, int num_splits, bool gated = false) {
  return num_splits > 1 || gated ? int64_t(num_splits) * p.num_seqs * p.seqlen * p.num_heads_q
                                 : 0;
}

// Row padding of decode_attn's smem tiles, in elements: 16 bytes of 16-bit
// elements, so that ldmatrix's eight 16-byte rows (and a warp's 8-byte score
// stores) fall in different banks.
constexpr int kDecodePad = 8;

// decode_attn's shared memory, byte offsets from the base: the one carve-up the
// kernel, the host's size (decode_attn_smem) and bench/decode_plan_check.cpp use.
struct DecodeAttnSmem {
  int64_t q;      // 16-bit [kDecodeRows][dk + pad]: the tile's queries
  int64_t k, v;   // 16-bit [kDecodeStages][kDecodeKeys][dk + pad] and [..][dv + pad]
  int64_t s;      // fp32 [kDecodeRows][kDecodeKeys + pad]: scaled, masked scores
  int64_t p;      // 16-bit [kDecodeRows][kDecodeKeys + pad]: probabilities (A of P V)
  int64_t scale;  // fp32 [kDecodeRows]: the chunk's rescale of each row's output
  int64_t lo, hi, tok;  // int [kDecodeRows]: visible keys [lo, hi), token - i_first
  int64_t count;  // int [4]: the selected union's size
  int64_t cand;   // kSelected: int [4][tile tokens x n]: candidates, keep, union, membership
  int64_t end;
};

NSA_HOST_DEVICE DecodeAttnSmem decode_attn_smem_layout(const AttnFwdParams& p, int64_t tile_tokens,
                                                       int dk, int dv) {
  DecodeAttnSmem m;
  m.q = 0;
  m.k = m.q + int64_t(kDecodeRows) * (dk + kDecodePad) * 2;
  m.v = m.k + int64_t(kDecodeStages) * kDecodeKeys * (dk + kDecodePad) * 2;
  m.s = m.v + int64_t(kDecodeStages) * kDecodeKeys * (dv + kDecodePad) * 2;
  m.p = m.s + int64_t(kDecodeRows) * (kDecodeKeys + kDecodePad) * 4;
  m.scale = m.p + int64_t(kDecodeRows) * (kDecodeKeys + kDecodePad) * 2;
  m.lo = m.scale + int64_t(kDecodeRows) * 4;
  m.hi = m.lo + int64_t(kDecodeRows) * 4;
  m.tok = m.hi + int64_t(kDecodeRows) * 4;
  m.count = m.tok + int64_t(kDecodeRows) * 4;
  m.cand = m.count + 16;
  m.end = m.cand + (p.branch == Branch::kSelected ? 4 * 4 * tile_tokens * p.slc_num_blocks : 0);
  return m;
}

// Dynamic smem of decode_attn: the carve-up above for the largest row tile.
inline int64_t decode_attn_smem(const AttnFwdParams& p, int dk, int dv) {
  return (decode_attn_smem_layout(p, decode_tile_tokens(p), dk, dv).end + 15) / 16 * 16;
}

// Selection on CUDA: the token positions whose selection blocks the score
// workspace covers. k_cmp holds k_rows compressed rows, so the cache it belongs to
// holds at most select_max_tokens tokens (Tc(T) <= k_rows); the kernels clamp
// seqlens_k to it (a no-op for any valid cache).
NSA_HOST_DEVICE int64_t select_max_tokens(int64_t k_rows, int64_t l, int64_t d) {
  return k_rows > 0 ? (k_rows - 1) * d + l + d - 1 : l - 1;
}

NSA_HOST_DEVICE int64_t select_score_width(const SelectParams& p) {
  const int64_t w = num_slc_blocks(select_max_tokens(p.k_rows, p.cmp_block_size, p.cmp_stride),
                                   p.slc_block_size);
  return w > 0 ? w : 1;
}

// Compressed rows a score CTA reads: those overlapping kSelectBlocksPerCta
// selection blocks, plus slack for the conservative range (decode_select.cuh).
NSA_HOST_DEVICE int64_t select_cta_cmp_rows(const SelectParams& p) {
  return (int64_t(kSelectBlocksPerCta) * p.slc_block_size + p.cmp_block_size) / p.cmp_stride + 3;
}

// Rows the score CTA's smem holds: select_cta_cmp_rows rounded up to whole MMA
// passes of kDecodeKeys rows (the rows past the range are zero-filled).
NSA_HOST_DEVICE int64_t select_cta_cmp_rows_padded(const SelectParams& p) {
  return ceil_div64(select_cta_cmp_rows(p), kDecodeKeys) * kDecodeKeys;
}

// decode_select_scores' shared memory, byte offsets from the base: the one carve-up
// of the kernel, the host's size and bench/decode_plan_check.cpp.
struct SelectScoreSmem {
  int64_t k;     // 16-bit [rows_padded][dk + pad]: the compressed rows (empty with cmp_scores)
  int64_t q;     // 16-bit [kSelectHeadsPerPass][dk + pad]: one pass's heads of a token (empty with cmp_scores)
  int64_t p;     // fp32 [kSelectHeadsPerPass][p_stride]: p(head, row)
  int64_t p_stride;  // rows_padded + pad: a quad's 8-byte stores of 4 heads hit 4 bank groups
  int64_t psum;  // fp32 [rows_padded]: p summed over the group's heads
  int64_t lse;   // fp32 [kSelectHeadsPerPass]
  int64_t end;
};

// With the compressed attention's scores (p.cmp_scores) the kernel reads neither K nor
// q, and their regions are empty: a third of the bytes, more CTAs per SM.
NSA_HOST_DEVICE SelectScoreSmem select_score_smem_layout(const SelectParams& p, int dk) {
  const int64_t rows = select_cta_cmp_rows_padded(p);
  const bool operands = p.cmp_scores == nullptr;
  SelectScoreSmem m;
  m.k = 0;
  m.q = m.k + (operands ? rows * (dk + kDecodePad) * 2 : 0);
  m.p = m.q + (operands ? int64_t(kSelectHeadsPerPass) * (dk + kDecodePad) * 2 : 0);
  m.p_stride = rows + kDecodePad;
  m.psum = m.p + int64_t(kSelectHeadsPerPass) * m.p_stride * 4;
  m.lse = m.psum + rows * 4;
  m.end = m.lse + int64_t(kSelectHeadsPerPass) * 4;
  return m;
}

inline int64_t select_score_smem(const SelectParams& p, int dk) {
  return (select_score_smem_layout(p, dk).end + 15) / 16 * 16;
}

}  // namespace nsa::cuda
