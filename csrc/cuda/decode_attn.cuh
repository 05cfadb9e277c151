// decode_attn: one memory-bound split-KV kernel for the three branches of the
// decode step (KV cache). A CTA owns (KV split, row tile, KV head, batch entry);
// its kDecodeRows rows are r = i * G + g (new token i, head g of the KV head's
// group), so the G heads x S tokens share every K/V chunk, loaded once into shared
// memory by cp.async. The branch gives the tile's key schedule (the union over its
// tokens) as chunks of kDecodeKeys keys and a per-row mask:
//   compressed  keys [0, nc(t_last)), row mask key < nc(t)         (nc clamped to k_cmp rows)
//   window      keys [window_begin(t_first), t_last], row mask [window_begin(t), t]
//   selected    chunks of the union of the blocks the tile's tokens selected (-1,
//               out-of-range and duplicate entries dropped); row mask: block in
//               that token's set and key <= t
// The chunks are split evenly over the branch's ws.num_splits CTAs (grid z; one
// launch may hold several branches, DecodeAttnBatch); each writes its rows' partial
// result (normalised o in fp32 and lse, -inf when it saw no key) to the workspace
// and decode_combine.cuh merges the splits (with one split the CTA writes the
// final o and lse, and no combine runs). K/V chunks are double-buffered: the
// next chunk's cp.async copies run under this chunk's math.
// Math on tensor cores (mma.sync, fp32 accumulation): S = Q K^T with the warps
// splitting the chunk's keys, the scores through smem to an exact per-row online
// softmax (one lane per key), then O += P V with the warps splitting Dv. At
// G = 16 a chunk costs each warp about 20 MMAs, so the kernel is bound by the
// K/V bytes, where fp32 FMAs on CUDA cores were not.
#pragma once

#include "cuda/decode_traits.cuh"

namespace nsa::cuda {

__device__ __forceinline__ int64_t decode_part_row(const AttnFwdParams& p, int64_t split,
                                                   int64_t b, int64_t i, int64_t h) {
  return ((split * p.num_seqs + b) * p.seqlen + i) * p.num_heads_q + h;
}

// Tokens of batch entry b on CUDA: seqlens_k clamped to what the caches hold
// (token rows: the capacity; compressed: the count is clamped per row instead).
__device__ __forceinline__ int64_t decode_len(const AttnFwdParams& p, int64_t b) {
  int64_t len = p.seqlens_k[b];
  len = len > 0 ? len : 0;
  if (p.branch != Branch::kCompressed && len > p.k_rows) len = p.k_rows;
  return len;
}

// One CTA's work: KV split `split` of branch p, row tile blockIdx.y, (batch entry,
// KV head) blockIdx.x.
template <class Traits>
__device__ __forceinline__ void decode_attn_tile(const AttnFwdParams& p, const DecodeWorkspace& ws,
                                                 const int split) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kDk = Traits::kDk, kDv = Traits::kDv;
  constexpr int kRows = Traits::kRows, kKeys = Traits::kKeys, kThreads = Traits::kThreads;
  constexpr int kKS = Traits::kKStride, kVS = Traits::kVStride;
  constexpr int kSS = Traits::kSStride, kPS = Traits::kPStride;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t b = int64_t(blockIdx.x) / p.num_heads_kv;
  const int64_t kvh = int64_t(blockIdx.x) % p.num_heads_kv;
  const int64_t r0 = int64_t(blockIdx.y) * kRows;  // first row of the tile
  const int64_t G = p.group, S = p.seqlen;
  const int64_t rows_total = S * G;
  const int rows_here = int(min(int64_t(kRows), rows_total - r0));  // >= 1 (grid)

  // Positions: query row i of entry b is at t = len - S + i.
  const int64_t len = decode_len(p, b);
  const int64_t i_first = r0 / G;
  const int64_t i_last = (r0 + rows_here - 1) / G;
  const int64_t t_first = len - S + i_first;
  const int64_t t_last = len - S + i_last;
  const int tile_tokens = int(i_last - i_first + 1);

  extern __shared__ __align__(16) char smem[];
  const DecodeAttnSmem at = decode_attn_smem_layout(p, tile_tokens, kDk, kDv);
  Element* sQ = reinterpret_cast<Element*>(smem + at.q);
  Element* sK = reinterpret_cast<Element*>(smem + at.k);
  Element* sV = reinterpret_cast<Element*>(smem + at.v);
  float* sS = reinterpret_cast<float*>(smem + at.s);
  Element* sP = reinterpret_cast<Element*>(smem + at.p);
  float* sScale = reinterpret_cast<float*>(smem + at.scale);
  int* sLo = reinterpret_cast<int*>(smem + at.lo);
  int* sHi = reinterpret_cast<int*>(smem + at.hi);
  int* sTok = reinterpret_cast<int*>(smem + at.tok);
  int* sCount = reinterpret_cast<int*>(smem + at.count);
  const int64_t n_slots = p.slc_num_blocks;
  int* sCand = reinterpret_cast<int*>(smem + at.cand);  // kSelected: [tile_tokens * n] each
  int* sKeep = sCand + tile_tokens * n_slots;
  int* sUnion = sKeep + tile_tokens * n_slots;
  int* sMember = sUnion + tile_tokens * n_slots;  // bit a: token i_first + a selected it

  // Per-row visible key interval [lo, hi) (membership of selected blocks aside).
  if (tid < kRows) {
    int lo = 0, hi = 0, tok = 0;
    if (tid < rows_here) {
      const int64_t i = (r0 + tid) / G;
      const int64_t t = len - S + i;
      tok = int(i - i_first);
      if (t >= 0) {
        switch (p.branch) {
          case Branch::kCompressed: {
            const int64_t nc = num_visible_cmp_blocks(t, p.cmp_block_size, p.cmp_stride);
            hi = int(nc < p.k_rows ? nc : p.k_rows);
            break;
          }
          case Branch::kWindow:
            lo = int(window_begin(t, p.window_size));
            hi = int(t + 1);
            break;
          case Branch::kSelected:
            hi = int(t + 1);
            break;
        }
      }
    }
    sLo[tid] = lo, sHi[tid] = hi, sTok[tid] = tok;
  }

  // Q rows (token i, head kvh * G + g) into sQ as stored; rows past the tile are
  // zero. The scale is applied to the fp32 scores.
  const Element* q = static_cast<const Element*>(p.q) + b * p.q_batch_stride;
  for (int e = tid; e < kRows * (kDk / 8); e += kThreads) {
    const int r = e / (kDk / 8), c8 = e % (kDk / 8);
    const int64_t row = r0 + r, i = row / G, h = kvh * G + row % G;
    const bool pred = r < rows_here;
    cp_async_16(sQ + r * Traits::kQStride + c8 * 8,
                pred ? q + i * p.q_row_stride + h * p.q_head_stride + c8 * 8 : q, pred);
  }
  cute::cp_async_fence();

  // The tile's key schedule: num_chunks chunks, chunk c = keys [begin(c), end(c)).
  int64_t key_begin = 0, key_end = 0;  // compressed / window: one contiguous range
  int num_union = 0, chunks_per_block = 1;
  const int64_t lp = p.slc_block_size;
  if (p.branch == Branch::kCompressed) {
    if (t_last >= 0) {
      const int64_t nc = num_visible_cmp_blocks(t_last, p.cmp_block_size, p.cmp_stride);
      key_end = nc < p.k_rows ? nc : p.k_rows;
    }
  } else if (p.branch == Branch::kWindow) {
    if (t_last >= 0) {
      key_begin = window_begin(t_first > 0 ? t_first : 0, p.window_size);
      key_end = t_last + 1;
    }
  } else {
    // Candidates: slot s of token i_first + a; -1 when unusable (t < 0, j < 0, j >= blocks).
    const int64_t num_blocks = num_slc_blocks(len, lp);
    const int total = tile_tokens * int(n_slots);
    for (int e = tid; e < total; e += kThreads) {
      const int64_t a = e / n_slots, slot = e % n_slots;
      const int64_t i = i_first + a;
      int j = -1;
      if (len - S + i >= 0) {
        const int64_t v = p.block_indices[b * p.bi_batch_stride + i * p.bi_row_stride +
                                          kvh * p.bi_head_stride + slot];
        if (v >= 0 && v < num_blocks) j = int(v);
      }
      sCand[e] = j;
    }
    __syncthreads();
    // Keep the first occurrence of each block.
    for (int e = tid; e < total; e += kThreads) {
      const int j = sCand[e];
      bool keep = j >= 0;
      for (int e2 = 0; e2 < e && keep; ++e2) keep = sCand[e2] != j;
      sKeep[e] = keep;
    }
    __syncthreads();
    // Compact the kept blocks in candidate order (warp 0, ballot prefix sums).
    if (warp == 0) {
      int base = 0;
      for (int e0 = 0; e0 < total; e0 += 32) {
        const int e = e0 + lane;
        const bool keep = e < total && sKeep[e] != 0;
        const unsigned bal = __ballot_sync(0xffffffffu, keep);
        if (keep) sUnion[base + __popc(bal & ((1u << lane) - 1u))] = sCand[e];
        base += __popc(bal);
      }
      if (lane == 0) sCount[0] = base;
    }
    __syncthreads();
    num_union = sCount[0];
    for (int u = tid; u < num_union; u += kThreads) {
      const int j = sUnion[u];
      int bits = 0;
      for (int a = 0; a < tile_tokens; ++a)
        for (int64_t s = 0; s < n_slots; ++s)
          if (sCand[a * n_slots + s] == j) bits |= 1 << a;
      sMember[u] = bits;
    }
    chunks_per_block = int(ceil_div64(lp, kKeys));
  }
  const int64_t num_chunks = p.branch == Branch::kSelected
                                 ? int64_t(num_union) * chunks_per_block
                                 : ceil_div64(key_end - key_begin, kKeys);
  const int64_t per_split = ceil_div64(num_chunks, ws.num_splits);
  const int64_t c_begin = int64_t(split) * per_split;
  const int64_t c_end = min(c_begin + per_split, num_chunks);
  __syncthreads();  // sLo/sHi/sTok, sMember ready

  const Element* k = static_cast<const Element*>(p.k) + b * p.k_batch_stride + kvh * p.k_head_stride;
  const Element* v = static_cast<const Element*>(p.v) + b * p.v_batch_stride + kvh * p.v_head_stride;

  // Tensor-core GEMMs on the smem tiles, stage 0 of K and V^T (the offset of a
  // call moves them to stage 1): S = Q K^T and O += P V.
  using Mma = typename Traits::TiledMma;
  Tensor tQ = make_tensor(make_smem_ptr(sQ), typename Traits::SmemLayoutQ{});
  Tensor tK = make_tensor(make_smem_ptr(sK), typename Traits::SmemLayoutK{});
  Tensor tVt = make_tensor(make_smem_ptr(sV), typename Traits::SmemLayoutVt{});
  Tensor tP = make_tensor(make_smem_ptr(sP), typename Traits::SmemLayoutP{});
  auto gemm_qk = make_smem_gemm<Mma, typename Traits::CopyAtomA, typename Traits::CopyAtomK>(tQ, tK, tid);
  auto gemm_pv = make_smem_gemm<Mma, typename Traits::CopyAtomA, typename Traits::CopyAtomVt>(tP, tVt, tid);
  Mma mma;
  auto thr_mma = mma.get_thread_slice(tid);

  Tensor acc_o = partition_fragment_C(mma, Shape<Int<kRows>, Int<kDv>>{});
  clear(acc_o);
  Tensor acc_o_rc = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
  // (row, col) of each element of an S tile and of the O accumulator.
  Tensor cS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kKeys>>{}));
  Tensor cO = thr_mma.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kDv>>{}));
  Tensor cO_rc = make_tensor(cO.data(), acc_rowcol(cO.layout()));

  // Online softmax state of this warp's rows r = warp + kWarps * m (all lanes hold it).
  float row_max[Traits::kRowsPerWarp], row_sum[Traits::kRowsPerWarp];
#pragma unroll
  for (int m = 0; m < Traits::kRowsPerWarp; ++m) row_max[m] = -INFINITY, row_sum[m] = 0.f;
  const float scale_log2 = float(p.scale) * kLog2e;

  // Keys [kb, ke) of chunk c and, for the selected branch, its union entry's
  // membership bits. Uniform: every thread computes the same bounds.
  struct Chunk {
    int64_t kb = 0, ke = 0;
    int member = 0;
  };
  auto chunk_at = [&](int64_t c) {
    Chunk ch;
    if (p.branch == Branch::kSelected) {
      const int u = int(c / chunks_per_block), sub = int(c % chunks_per_block);
      const int64_t j = sUnion[u];
      ch.member = sMember[u];
      ch.kb = j * lp + int64_t(sub) * kKeys;
      const int64_t sub_end = j * lp + min(int64_t(sub + 1) * kKeys, lp);
      ch.ke = min(sub_end, len);  // keys past the cache's tokens are never visible
    } else {
      ch.kb = key_begin + c * kKeys;
      ch.ke = min(ch.kb + kKeys, key_end);
    }
    return ch;
  };
  // K and V rows [kb, ke) into stage `stage`; missing rows are zero-filled (so
  // that P V never multiplies stale smem, even by a zero probability).
  auto load_chunk = [&](const Chunk& ch, int stage) {
    constexpr int kKChunks = kDk / 8, kVChunks = kDv / 8;
    Element* sKs = sK + stage * kKeys * kKS;
    Element* sVs = sV + stage * kKeys * kVS;
    const int n_keys = int(ch.ke - ch.kb);
    for (int e = tid; e < kKeys * kKChunks; e += kThreads) {
      const int r = e / kKChunks, c8 = e % kKChunks;
      const bool pred = r < n_keys;
      cp_async_16(sKs + r * kKS + c8 * 8, pred ? k + (ch.kb + r) * p.k_row_stride + c8 * 8 : k, pred);
    }
    for (int e = tid; e < kKeys * kVChunks; e += kThreads) {
      const int r = e / kVChunks, c8 = e % kVChunks;
      const bool pred = r < n_keys;
      cp_async_16(sVs + r * kVS + c8 * 8, pred ? v + (ch.kb + r) * p.v_row_stride + c8 * 8 : v, pred);
    }
  };

  Chunk ch;
  if (c_begin < c_end) {
    ch = chunk_at(c_begin);
    if (ch.kb < ch.ke) load_chunk(ch, 0);
  }
  cute::cp_async_fence();
  int stage = 0;
  for (int64_t c = c_begin; c < c_end; ++c, stage ^= 1) {
    Chunk next;
    if (c + 1 < c_end) next = chunk_at(c + 1);
    cute::cp_async_wait<0>();
    // This chunk's K, V (and Q) landed; everyone is done with the previous chunk
    // (the other stage, sS, sP, sScale).
    __syncthreads();
    if (next.kb < next.ke) load_chunk(next, stage ^ 1);
    cute::cp_async_fence();
    const Chunk cur = ch;
    ch = next;
    if (cur.kb >= cur.ke) continue;  // uniform
    const int n_keys = int(cur.ke - cur.kb);

    // S = Q K^T (this warp: 8 of the chunk's keys), masked and scaled into sS.
    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kRows>, Int<kKeys>>{});
    clear(acc_s);
    gemm_qk(acc_s, stage * kKeys * kKS);
    for_each_element(acc_s, cS, [&](int r, int col, float s) {
      const int64_t key = cur.kb + col;
      bool visible = r < rows_here && col < n_keys && key >= sLo[r] && key < sHi[r];
      if (p.branch == Branch::kSelected) visible = visible && ((cur.member >> sTok[r]) & 1);
      // Scaled after the mask test: with scale <= 0 a masked -inf must stay -inf.
      sS[r * kSS + col] = visible ? s * scale_log2 : -INFINITY;
    });
    __syncthreads();
    if (p.cmp_scores != nullptr) {
      // compressed_select_decode: the selection reads these scores instead of
      // reading k_cmp again (keys < key_end <= k_rows; each row's 32 in one run).
      float* keep = p.cmp_scores + ((b * p.num_heads_kv + kvh) * rows_total + r0) * p.k_rows + cur.kb;
      for (int e = tid; e < rows_here * kKeys; e += kThreads) {
        const int r = e / kKeys, c = e % kKeys;
        if (c < n_keys) keep[int64_t(r) * p.k_rows + c] = sS[r * kSS + c];
      }
    }

    // Online softmax, exact per row: warp w takes rows w, w + kWarps, ...; lane n
    // takes key kb + n (exp2 domain; -inf guarded).
#pragma unroll
    for (int m = 0; m < Traits::kRowsPerWarp; ++m) {
      const int r = warp + Traits::kWarps * m;
      const float s = sS[r * kSS + lane];
      float mx = s;
#pragma unroll
      for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_new = fmaxf(row_max[m], mx);
      const float base = m_new == -INFINITY ? 0.f : m_new;
      const float pr = exp2f(s - base);  // 0 for a masked key
      const float rescale = exp2f(row_max[m] - base);  // 0 while nothing was visible
      float sum = pr;
#pragma unroll
      for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      row_max[m] = m_new;
      row_sum[m] = row_sum[m] * rescale + sum;
      sP[r * kPS + lane] = Element(pr);
      if (lane == 0) sScale[r] = rescale;
    }
    __syncthreads();

    // O = O * rescale + P V (this warp: 8 of every 32 output columns).
#pragma unroll
    for (int mi = 0; mi < size<0>(acc_o_rc); ++mi) {
      const float rescale = sScale[get<0>(cO_rc(mi, 0))];
#pragma unroll
      for (int ni = 0; ni < size<1>(acc_o_rc); ++ni) acc_o_rc(mi, ni) *= rescale;
    }
    gemm_pv(acc_o, stage * kKeys * kVS);
  }
  cute::cp_async_wait<0>();  // Q's copies when the CTA had no chunk
  __syncthreads();  // the last chunk's readers of sS are done (the epilogue reuses it)

  // Epilogue: row stats to smem, then o / sum and lse (natural log) per row.
  float* sSum = sS;          // [kRows]
  float* sMax = sS + kRows;  // [kRows]
#pragma unroll
  for (int m = 0; m < Traits::kRowsPerWarp; ++m) {
    const int r = warp + Traits::kWarps * m;
    if (lane == 0) sSum[r] = row_sum[m], sMax[r] = row_max[m];
  }
  __syncthreads();
  // One split that nothing merges afterwards: this CTA saw all of its rows' keys,
  // so it writes the final o (in the input dtype) and lse, as decode_combine would
  // have (a single split's weight is exactly 1), and no combine runs.
  const bool final_out = ws.final_out;
#pragma unroll
  for (int mi = 0; mi < size<0>(acc_o_rc); ++mi) {
    const int r = get<0>(cO_rc(mi, 0));
    if (r >= rows_here) continue;
    const float sum = sSum[r];
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const int64_t row = r0 + r, i = row / G, h = kvh * G + row % G;
    if (final_out) {
      Element* out = static_cast<Element*>(p.o) + b * p.o_batch_stride + i * p.o_row_stride +
                     h * p.o_head_stride;
#pragma unroll
      for (int ni = 0; ni < size<1>(acc_o_rc); ++ni)
        out[get<1>(cO_rc(mi, ni))] = Element(acc_o_rc(mi, ni) * inv);
    } else {
      float* out = ws.o_part + decode_part_row(p, split, b, i, h) * kDv;
#pragma unroll
      for (int ni = 0; ni < size<1>(acc_o_rc); ++ni) out[get<1>(cO_rc(mi, ni))] = acc_o_rc(mi, ni) * inv;
    }
  }
  if (tid < rows_here) {
    const int r = tid;
    const float sum = sSum[r];
    const int64_t row = r0 + r, i = row / G, h = kvh * G + row % G;
    // lse = ln(sum * 2^max) = (max + log2(sum)) * ln 2
    const float lse = sum > 0.f ? (sMax[r] + log2f(sum)) * 0.6931471805599453f : -INFINITY;
    if (final_out)
      static_cast<float*>(p.lse)[b * p.lse_batch_stride + h * p.lse_head_stride + i] = lse;
    else
      ws.lse_part[decode_part_row(p, split, b, i, h)] = lse;
  }
}

// __grid_constant__: the CTA picks its branch at run time, and reads that branch's
// params where they lie (no copy of the batch to local memory).
template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads)
    decode_attn_kernel(const __grid_constant__ DecodeAttnBatch batch) {
  int j = 0, split = int(blockIdx.z);
  while (j + 1 < batch.count && split >= batch.ws[j].num_splits) split -= batch.ws[j++].num_splits;
  decode_attn_tile<Traits>(batch.p[j], batch.ws[j], split);
}

}  // namespace nsa::cuda
