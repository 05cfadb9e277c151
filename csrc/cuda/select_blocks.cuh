// Block selection (NSA_SPEC "Block selection"), one kernel, no T x Tc matrix in
// global memory:
//   1. A CTA owns (sequence, kv head, `tokens` consecutive tokens). Their
//      tokens*G (token, head) rows go through the tensor cores in chunks of
//      kBlockM rows: S = Q K_cmp^T per tile of kBlockN compressed rows (the
//      attention traits and gemm), p = exp(scale*s - lse_cmp) for the visible
//      rows i < nc(t) (clamped to the k_cmp rows that exist).
//   2. p is summed over the group's heads (a column sum per token of the chunk)
//      and spread over the selection blocks with weight w(i, j) into the token's
//      score row, scores[token][j], j <= J = t // l' (at T = 128k, l' = 64: 2048
//      floats per token; the launcher sizes `tokens` to fit). One thread owns
//      each (token, j) of a tile and sums its rows i in ascending order: no
//      atomics, so the scores, and the selection, are bitwise repeatable.
//   3. One warp per token: forced blocks, then top-n by repeated warp argmax over
//      the lanes' cached best candidates (ties to the smaller j), then the selected
//      set written ascending by a ballot compaction, -1 padded.
// Steps 2 (the spread, add_tile_block_scores) and 3 (select_top_n) are shared with
// the Hopper kernel (select_blocks_sm90.cuh), which run_select_blocks takes on an
// H100/H200 for G <= 128; it differs in step 1 and in the head sum.
#pragma once

#include "cuda/attn_traits.cuh"
#include "cuda/select_topn.cuh"

namespace nsa::cuda {

// Phase B2 of a K tile (compressed rows [n0, n_hi)): for each of the chunk's
// `tokens` tokens a and each selection block j overlapped by the tile,
//   scores[a][j] += sum over the tile's rows i overlapping j of w(i, j) * colsum(a, i - n0),
// i ascending. One thread per (token, j): no atomics, a fixed order, so the scores
// are bitwise repeatable. colsum(a, c) is the sum over token a's heads of p at
// column c (the kernels keep it in shared memory).
//
// The index rules (which blocks a tile overlaps, which rows a block takes, their
// weights) do not depend on the token: SpreadTable evaluates them once per (tile,
// block, row) into shared memory before the barrier that precedes B2, so that a task
// is a few loads and FMAs (two int64 divisions per task before, 8 tasks per thread
// per tile at G = 1).
struct SpreadTable {
  int2* span;  // [n_j_max]: the block's first and last tile column (inclusive; empty if last < first)
  float* w;    // [n_j_max][r_max]: w(i, j) of the block's rows, i ascending from its first column
  int r_max = 0;
  int64_t j_lo = 0;
  int n_j = 0;

  // Upper bounds for a tile of kBlockN rows: the blocks it overlaps, and the rows
  // overlapping one block (i d + l > j lp and i d < (j + 1) lp).
  static NSA_HOST_DEVICE int64_t blocks_max(int64_t block_n, int64_t l, int64_t d, int64_t lp) {
    return ((block_n - 1) * d + l - 1) / lp + 2;
  }
  static NSA_HOST_DEVICE int64_t rows_max(int64_t l, int64_t d, int64_t lp) { return (lp + l) / d + 1; }
  static NSA_HOST_DEVICE int64_t bytes(int64_t block_n, int64_t l, int64_t d, int64_t lp) {
    return blocks_max(block_n, l, d, lp) * (int64_t(sizeof(int2)) + rows_max(l, d, lp) * 4);
  }

  // Carves the table from smem (16-byte aligned) for a tile of kBlockN rows.
  template <int kBlockN>
  __device__ __forceinline__ void carve(char* smem, int64_t l, int64_t d, int64_t lp) {
    span = reinterpret_cast<int2*>(smem);
    w = reinterpret_cast<float*>(span + blocks_max(kBlockN, l, d, lp));
    r_max = int(rows_max(l, d, lp));
  }

  // Fills the table for the tile [n0, n_hi), blocks clipped to j <= j_cap. Every
  // thread computes n_j; the table is read after the next barrier.
  template <int kThreads>
  __device__ __forceinline__ void fill(int64_t n0, int64_t n_hi, int64_t l, int64_t d, int64_t lp, int64_t j_cap,
                                       int tid) {
    j_lo = first_overlapped_slc_block(n0, d, lp);
    const int64_t j_hi = min(last_overlapped_slc_block(n_hi - 1, l, d, lp), j_cap);
    n_j = int(max(j_hi - j_lo + 1, int64_t(0)));
    for (int e = tid; e < n_j * r_max; e += kThreads) {
      const int jj = e / r_max, r = e % r_max;
      const int64_t j = j_lo + jj;
      const int64_t i_lo = max(first_overlapping_cmp_row(j, l, d, lp), n0);
      const int64_t i_hi = min(last_overlapping_cmp_row(j, d, lp), n_hi - 1);
      if (r == 0) span[jj] = int2{int(i_lo - n0), int(i_hi - n0)};
      if (i_lo + r <= i_hi) w[jj * r_max + r] = cmp_slc_overlap_weight(i_lo + r, j, l, d, lp);
    }
  }
};

template <int kThreads, class ColSum>
__device__ __forceinline__ void add_tile_block_scores(float* scores, int score_stride, int tokens,
                                                      const SpreadTable& table, int tid, const ColSum& colsum) {
  const int n_j = table.n_j;
  for (int task = tid; task < tokens * n_j; task += kThreads) {
    const int a = task / n_j, jj = task % n_j;
    const int2 cols = table.span[jj];
    const float* w = table.w + jj * table.r_max;
    float acc = 0.f;
    for (int c = cols.x; c <= cols.y; ++c) acc += w[c - cols.x] * colsum(a, c);
    scores[int64_t(a) * score_stride + table.j_lo + jj] += acc;
  }
}

// Step 3, after the last tile (scores complete and visible to the CTA): one warp
// per token of the CTA (tokens t_begin .. t_begin + ntok - 1), each through
// select_top_n_row (select_topn.cuh). `taken` holds score_stride / 32 words per
// token.
__device__ __forceinline__ void select_top_n(const SelectParams& p, const SeqInfo& si, int hkv, int64_t t_begin,
                                             int ntok, const float* scores, uint32_t* taken, int score_stride,
                                             int64_t j_cap, int warp, int lane, int num_warps) {
  const int words = score_stride / 32;
  for (int tok = warp; tok < ntok; tok += num_warps) {
    const int64_t t = t_begin + tok;
    int32_t* out = p.block_indices + si.batch * p.bi_batch_stride + (si.row0 + t) * p.bi_row_stride +
                   hkv * p.bi_head_stride;
    select_top_n_row(p, min(last_candidate_slc_block(t, p.slc_block_size), j_cap), scores + tok * score_stride,
                     taken + tok * words, out, lane);
  }
}

// The CTA's tokens (t_begin .. t_begin + ntok - 1 of its sequence) and the operand
// rows of both selection kernels; f is a flattened (token, head of the group) row of
// the CTA, f / G its token and f % G its head.
template <class Element>
struct SelectCta {
  SeqInfo si;
  int64_t t_begin = 0;
  int ntok = 0;
  int64_t avail = 0;  // k_cmp rows of the sequence that exist
  const Element* q = nullptr;
  const Element* k = nullptr;
  const float* lse = nullptr;

  // false: no token of the sequence falls in this CTA.
  __device__ __forceinline__ bool init(const SelectParams& p, int tokens) {
    si = nsa::seq_info(p.cu_seqlens, blockIdx.z, p.seqlen, p.cmp_block_size, p.cmp_stride);
    t_begin = int64_t(blockIdx.x) * tokens;
    if (t_begin >= si.len) return false;
    ntok = int(min(int64_t(tokens), si.len - t_begin));
    q = static_cast<const Element*>(p.q) + si.batch * p.q_batch_stride;
    k = static_cast<const Element*>(p.k_cmp) + si.batch * p.k_batch_stride + blockIdx.y * p.k_head_stride;
    lse = static_cast<const float*>(p.lse_cmp) + si.batch * p.lse_batch_stride;
    avail = p.k_rows - si.cmp_row0;
    avail = avail > 0 ? avail : 0;
    return true;
  }
  // Compressed rows visible to token t of the CTA's sequence, clamped to those that exist.
  __device__ __forceinline__ int64_t visible(const SelectParams& p, int64_t t) const {
    return min(num_visible_cmp_blocks(t, p.cmp_block_size, p.cmp_stride), avail);
  }
  __device__ __forceinline__ const Element* q_row(const SelectParams& p, int64_t f) const {
    return q + (si.row0 + t_begin + f / p.group) * p.q_row_stride +
           (blockIdx.y * p.group + f % p.group) * p.q_head_stride;
  }
  // Row f's visible compressed rows (0 where its lse is -inf) and lse in log2 units.
  __device__ __forceinline__ void row_bounds(const SelectParams& p, int64_t f, int64_t& hi, float& lse2) const {
    const int64_t t = t_begin + f / p.group;
    const float lse_v = lse[(blockIdx.y * p.group + f % p.group) * p.lse_head_stride + si.row0 + t];
    hi = lse_v == -INFINITY ? 0 : visible(p, t);
    lse2 = lse_v * kLog2e;
  }
  // Loads compressed rows [n0, min(n0 + kRows, n_end)) into sK (zeros past them).
  template <int kRows, int kDk, int kThreads, class SmemTensor>
  __device__ __forceinline__ void load_k_rows(const SelectParams& p, SmemTensor& sK, int64_t n0, int64_t n_end,
                                              int tid) const {
    const int64_t n_hi = min(n0 + kRows, n_end);
    load_rows_async<kRows, kDk, kThreads>(
        sK,
        [&](int r) -> const Element* {
          const int64_t i = n0 + r;
          return i < n_hi ? k + (si.cmp_row0 + i) * p.k_row_stride : nullptr;
        },
        k, tid);
  }
};

// Row stride (floats) of the probability / segment-sum tiles in smem: 8 floats of
// padding so that the float2 stores of a half-warp (4 rows x 4 column pairs) fall in
// distinct banks.
template <int kBlockN>
constexpr int kSelectPStride = kBlockN + 8;

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads)
    select_blocks_kernel(const SelectParams p, int tokens, int score_stride) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kDk = Traits::kDk;
  constexpr int kThreads = Traits::kThreads;
  extern __shared__ __align__(1024) char smem[];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, hkv = blockIdx.y;
  const int64_t G = p.group;
  const int64_t l = p.cmp_block_size, d = p.cmp_stride, lp = p.slc_block_size;

  SelectCta<Element> cta;
  if (!cta.init(p, tokens)) return;
  const SeqInfo& si = cta.si;
  const int64_t t_begin = cta.t_begin;
  const int ntok = cta.ntok;
  // Score rows: j < score_stride = ceil(seqlen / l') rounded up to 32 (the launcher's bound).
  const int64_t j_cap = score_stride - 1;

  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutK{});
  // sK has two stages (the next K tile's copies run under this tile's work);
  // stage 1 is sK moved by kBlockN * kDk elements.
  constexpr int kPStride = kSelectPStride<kBlockN>;
  float* sP = reinterpret_cast<float*>(smem + Traits::kSmemQ + 2 * Traits::kSmemK);  // [kBlockM][kPStride]
  SpreadTable table;
  table.carve<kBlockN>(reinterpret_cast<char*>(sP + kBlockM * kPStride), l, d, lp);
  float* scores = reinterpret_cast<float*>(
      reinterpret_cast<char*>(sP + kBlockM * kPStride) + SpreadTable::bytes(kBlockN, l, d, lp));  // [tokens][stride]
  uint32_t* taken = reinterpret_cast<uint32_t*>(scores + tokens * score_stride);  // [tokens][stride/32]

  for (int i = tid; i < ntok * score_stride; i += kThreads) scores[i] = 0.f;

  typename Traits::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma.partition_fragment_B(sK);
  auto copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma);
  auto thr_copy_q = copy_q.get_thread_slice(tid);
  Tensor tSsQ = thr_copy_q.partition_S(sQ);
  auto copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma);
  auto thr_copy_k = copy_k.get_thread_slice(tid);
  Tensor tSsK = thr_copy_k.partition_S(sK);
  Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tScS = thr_mma.partition_C(cS);
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
  constexpr int kRows = decltype(size<0>(tScS_rc))::value;

  const float scale_log2 = float(p.scale) * kLog2e;
  const int64_t rows_total = int64_t(ntok) * G;
  for (int64_t m0 = 0; m0 < rows_total; m0 += kBlockM) {
    const int64_t f_last = min(m0 + kBlockM, rows_total) - 1;
    // Everyone is done with the previous chunk's sQ / sK, and no copy into sQ is still
    // in flight (a chunk that visited no K tile never waited for its Q load).
    cute::cp_async_wait<0>();
    __syncthreads();
    load_rows_async<kBlockM, kDk, kThreads>(
        sQ,
        [&](int r) -> const Element* { return m0 + r > f_last ? nullptr : cta.q_row(p, m0 + r); },
        static_cast<const Element*>(p.q), tid);
    cute::cp_async_fence();

    // This thread's rows: visible compressed rows, lse in log2 units.
    int64_t row_hi[kRows];
    float row_lse2[kRows];
#pragma unroll
    for (int mi = 0; mi < kRows; ++mi) {
      const int64_t f = m0 + get<0>(tScS_rc(mi, 0));
      row_hi[mi] = 0;
      row_lse2[mi] = 0.f;
      if (f <= f_last) cta.row_bounds(p, f, row_hi[mi], row_lse2[mi]);
    }
    const int64_t n_end = cta.visible(p, t_begin + f_last / G);
    // The chunk's tokens (CTA-relative): tok0 .. tok0 + chunk_tokens - 1.
    const int64_t tok0 = m0 / G;
    const int chunk_tokens = int(f_last / G - tok0 + 1);

    auto load_k_tile = [&](int64_t n0, int stage) {
      auto sK_st = shifted(sK, stage * kBlockN * kDk);
      cta.template load_k_rows<kBlockN, kDk, kThreads>(p, sK_st, n0, n_end, tid);
    };
    if (n_end > 0) load_k_tile(0, 0);
    cute::cp_async_fence();
    int stage = 0;
    for (int64_t n0 = 0; n0 < n_end; n0 += kBlockN, stage ^= 1) {
      const int64_t n_hi = min(n0 + kBlockN, n_end);
      cute::cp_async_wait<0>();
      __syncthreads();  // this tile's K (and the chunk's Q) landed; the previous tile is done
      if (n0 + kBlockN < n_end) load_k_tile(n0 + kBlockN, stage ^ 1);
      cute::cp_async_fence();

      Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
      clear(acc_s);
      gemm_ss(acc_s, tSrQ, tSrK, tSsQ, shifted(tSsK, stage * kBlockN * kDk), mma, copy_q, copy_k,
              thr_copy_q, thr_copy_k);
      Tensor s_rc = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
      // Phase A (registers, fixed shape): probabilities of the visible entries to sP,
      // a column pair (values ni, ni + 1 of the accumulator) per float2 store.
#pragma unroll
      for (int mi = 0; mi < kRows; ++mi) {
        const int col_hi = int(min(row_hi[mi], n_hi) - n0);  // visible columns [0, col_hi)
        const int row = get<0>(tScS_rc(mi, 0));
#pragma unroll
        for (int ni = 0; ni < size<1>(s_rc); ni += 2) {
          const int col = get<1>(tScS_rc(mi, ni));
          auto prob = [&](int c, int i) {
            return c < col_hi ? exp2f(s_rc(mi, i) * scale_log2 - row_lse2[mi]) : 0.f;
          };
          *reinterpret_cast<float2*>(&sP[row * kPStride + col]) = float2{prob(col, ni), prob(col + 1, ni + 1)};
        }
      }
      table.fill<kThreads>(n0, n_hi, l, d, lp, j_cap, tid);
      __syncthreads();
      // Phase B1: per token of the chunk, the sum over its heads' rows (in row
      // order) of each column, written over the token's first row of sP.
      for (int task = tid; task < chunk_tokens * kBlockN; task += kThreads) {
        const int a = task / kBlockN, col = task % kBlockN;
        const int64_t tok = tok0 + a;
        const int r_lo = int(max(tok * G, m0) - m0), r_hi = int(min((tok + 1) * G - 1, f_last) - m0);
        float sum = 0.f;
        for (int r = r_lo; r <= r_hi; ++r) sum += sP[r * kPStride + col];
        sP[r_lo * kPStride + col] = sum;
      }
      __syncthreads();
      // Phase B2: the token sums spread over the selection blocks.
      add_tile_block_scores<kThreads>(
          scores + tok0 * score_stride, score_stride, chunk_tokens, table, tid,
          [&](int a, int col) { return sP[(max((tok0 + a) * G, m0) - m0) * kPStride + col]; });
      // The next tile's barrier orders this tile's sP and score accesses before the
      // next Phase A, and this stage's K reads before the copies into it.
    }
  }
  cute::cp_async_wait<0>();
  __syncthreads();

  select_top_n(p, si, hkv, t_begin, ntok, scores, taken, score_stride, j_cap, warp, lane, kThreads / 32);
}

// Shared memory of one CTA for `tokens` tokens.
template <class Traits>
inline int64_t select_smem_bytes(const SelectParams& p, int64_t tokens, int64_t score_stride) {
  return Traits::kSmemQ + 2 * Traits::kSmemK + Traits::kBlockM * kSelectPStride<Traits::kBlockN> * 4 +
         SpreadTable::bytes(Traits::kBlockN, p.cmp_block_size, p.cmp_stride, p.slc_block_size) +
         tokens * score_stride * 4 + tokens * (score_stride / 32) * 4;
}

template <int kDk, DType kDType>
void run_select_blocks(const SelectParams& p, cudaStream_t stream) {
  using Traits = AttnTraits<kDk, kDk, typename ElementOf<kDType>::type>;
  const char* what = "select_blocks";
  if (p.seqlen == 0 || p.num_heads_kv == 0 || p.num_seqs == 0) return;
#ifdef NSA_SM90A_BUILT
  if (use_sm90_kernels() && run_select_blocks_sm90<kDk, kDType>(p, stream)) return;
#endif
  const int64_t score_stride = (num_slc_blocks(p.seqlen, p.slc_block_size) + 31) / 32 * 32;
  int device = 0, optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  // Tokens per CTA: enough for the G heads to fill the kBlockM rows, no more than
  // fits in ~100 KB (two CTAs per SM) or, for very long rows, the device limit.
  const int64_t want = std::max<int64_t>(1, Traits::kBlockM / p.group);
  const int64_t budget = std::min<int64_t>(optin, 100 * 1024);
  int64_t tokens = want;
  while (tokens > 1 && select_smem_bytes<Traits>(p, tokens, score_stride) > budget) --tokens;
  const int64_t smem = select_smem_bytes<Traits>(p, tokens, score_stride);
  if (smem > optin)
    throw std::runtime_error(std::string("nsa_cuda: select_blocks: sequences of ") +
                             std::to_string(p.seqlen) + " tokens need " + std::to_string(smem) +
                             " bytes of shared memory per CTA for the block scores; the device has " +
                             std::to_string(optin));
  const int64_t t_blocks = (p.seqlen + tokens - 1) / tokens;
  if (t_blocks > INT32_MAX || p.num_heads_kv > 65535 || p.num_seqs > 65535)
    throw std::runtime_error("nsa_cuda: select_blocks: problem too large for the grid");
  auto kernel = select_blocks_kernel<Traits>;
  set_smem_limit(kernel, int(smem), what);
  dim3 grid(unsigned(t_blocks), unsigned(p.num_heads_kv), unsigned(p.num_seqs));
  NSA_LAUNCH(grid, Traits::kThreads, int(smem), stream, kernel)(p, int(tokens), int(score_stride));
  check_launch(what);
}

}  // namespace nsa::cuda
