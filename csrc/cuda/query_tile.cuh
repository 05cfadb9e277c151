// The query side of the query-tiled kernels (the forward and dq of both kernel
// families, attn_fwd*.cuh and attn_bwd*.cuh): which rows a CTA owns, where they
// live in q-like tensors, which token each of a thread's accumulator rows is, and
// the K/V tile copies every mainloop makes.
//
// Group-centric tiling: a CTA owns one (sequence, kv head) and kBlockM rows of the
// flattened index f = t * G + g over the sequence's tokens t and the G query heads g
// of the group, so the G heads of a token (and, for G < kBlockM, several consecutive
// tokens) share every K/V tile loaded into shared memory.
#pragma once

#include "cuda/kv_schedule.cuh"

namespace nsa::cuda {

struct QueryTile {
  SeqInfo si;
  int64_t group;        // G
  int64_t f0, f_last;   // flattened rows [f0, f_last] of the sequence
  int64_t t_lo, t_hi;   // their tokens
  int hkv;

  // Row r of the tile in a [tokens, heads, D] tensor (q, o, dO, dq; `base` already
  // at the batch entry); nullptr past the sequence.
  template <class T>
  __device__ __forceinline__ T* row(T* base, int64_t row_stride, int64_t head_stride, int r) const {
    const int64_t f = f0 + r;
    if (f > f_last) return nullptr;
    return base + (si.row0 + f / group) * row_stride + (hkv * group + f % group) * head_stride;
  }
};

// The tile of CTA (blockIdx.x, hkv = blockIdx.y, sequence blockIdx.z); false when
// the sequence is shorter than the grid's longest (varlen), so the CTA has no rows.
template <class Schedule, class Params>
__device__ __forceinline__ bool query_tile(const Params& p, int block_m, QueryTile& qt) {
  qt.si = Schedule::seq(p, blockIdx.z);
  qt.group = p.group;
  qt.hkv = blockIdx.y;
  const int64_t rows_total = qt.si.len * qt.group;
  qt.f0 = int64_t(blockIdx.x) * block_m;
  if (qt.f0 >= rows_total) return false;
  qt.f_last = min(qt.f0 + block_m, rows_total) - 1;
  qt.t_lo = qt.f0 / qt.group;
  qt.t_hi = qt.f_last / qt.group;
  return true;
}

// Token of each of a thread's accumulator rows (coords: the rows x cols view of the
// S tile's identity partition), and whether the row exists.
template <int kRows, class Coords>
__device__ __forceinline__ void tile_row_tokens(const QueryTile& qt, const Coords& coords,
                                                int64_t (&row_t)[kRows], bool (&row_ok)[kRows]) {
  using namespace cute;
#pragma unroll
  for (int mi = 0; mi < kRows; ++mi) {
    const int64_t f = qt.f0 + get<0>(coords(mi, 0));
    row_ok[mi] = f <= qt.f_last;
    row_t[mi] = f / qt.group;
  }
}

// One thread of each quad writes the lse of its rows ([B, Hq, T] with p's strides).
template <int kRows, class Coords>
__device__ __forceinline__ void store_lse_rows(const AttnFwdParams& p, const QueryTile& qt,
                                               const Coords& coords, const bool (&row_ok)[kRows],
                                               const int64_t (&row_t)[kRows],
                                               const float (&lse)[kRows], int tid) {
  using namespace cute;
  float* out = static_cast<float*>(p.lse) + qt.si.batch * p.lse_batch_stride;
#pragma unroll
  for (int mi = 0; mi < kRows; ++mi) {
    if (row_ok[mi] && tid % 4 == 0) {
      const int64_t f = qt.f0 + get<0>(coords(mi, 0));
      out[(qt.hkv * qt.group + f % qt.group) * p.lse_head_stride + qt.si.row0 + row_t[mi]] = lse[mi];
    }
  }
}

// Copies the keys [tile.begin, tile.end) of a K or V tensor (`base` at the batch
// entry and kv head; key row = key_row0 + key) into the kRows-row smem tile `s`;
// rows past the tile's end are zero.
template <int kRows, int kCols, int kThreads, class SmemTensor, class Element>
__device__ __forceinline__ void load_kv_tile(SmemTensor& s, const Element* base, int64_t row_stride,
                                             int64_t key_row0, const KvTile& tile, int tid) {
  load_rows_async<kRows, kCols, kThreads>(
      s,
      [&](int r) -> const Element* {
        const int64_t key = tile.begin + r;
        return key < tile.end ? base + (key_row0 + key) * row_stride : nullptr;
      },
      base, tid);
}

}  // namespace nsa::cuda
