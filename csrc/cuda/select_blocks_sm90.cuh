// Block selection on Hopper (sm_90a): the selection scores of select_blocks.cuh
// with warpgroup MMAs and the sum over the group's heads done in registers.
//
// A CTA is two warpgroups owning kBlockM = 128 rows: the floor(128 / G) tokens of the
// CTA (fewer where their score rows would not fit in smem) times the G heads of the
// group (G at most 128; rows past them are padding). Q stays in registers for the
// whole kernel (the A operand of an RS wgmma), so the m64n64 S = Q K^T of a tile
// reads only K from shared memory: with both operands in smem an m64n64k16 wgmma
// needs the full shared-memory bandwidth of the SM.
//
// Per compressed K tile j (64 rows, three smem stages):
//   1. S_{j+1} is issued to the tensor cores before tile j is processed, and waited
//      for at the end of the step, so nothing is in flight across the loop's back
//      edge (ptxas serializes wgmmas that may be in flight where control flow joins).
//   2. p = exp2(s * scale * log2e - lse * log2e) on the visible columns, then summed
//      over each segment of kSegRows rows of a warp (the largest power of two that
//      divides G, at most 16: a token is G / kSegRows whole segments, and a segment
//      never straddles two warps) by a butterfly that halves the values each thread
//      carries at every shuffle stage (14 shuffles per thread at G = 16, where a
//      plain all-reduce needs 48), and written to smem as part[segment][column].
//      Rows r and r + 8 of a warp are one thread's, so at G = 16 they are added
//      before any shuffle.
//   3. The tile's SpreadTable (block spans and weights), a barrier, then phase B2 of
//      the SM80 kernel (add_tile_block_scores): a token's column sums (its segments
//      added in order) spread over the selection blocks with weight w(i, j), one
//      thread per (token, j).
// The sums run in a fixed order: the scores, and the selection, are bitwise
// repeatable. The top-n is the SM80 kernel's (select_top_n).
#pragma once

#include <utility>

#include "cuda/attn_fwd_sm90.cuh"  // AttnTraitsSm90, gemm_wgmma_issue, fence_smem_for_wgmma
#include "cuda/select_blocks.cuh"

namespace nsa::cuda {

template <int kDk_, class Element_>
struct SelectTraitsSm90 {
  using Base = AttnTraitsSm90<kDk_, 64, Element_>;  // Dv unused: only the Q K^T half
  using Element = Element_;
  static constexpr int kDk = kDk_;
  static constexpr int kThreads = Base::kThreads;  // two warpgroups
  static constexpr int kBlockM = Base::kBlockM;    // 128 rows
  static constexpr int kBlockN = Base::kBlockN;    // 64 compressed rows per K tile
  static constexpr int kStages = 3;                // K tile j + 2 lands while j and j + 1 are used
  using TiledMmaS = typename Base::TiledMmaSrs;  // Q from registers, K from smem
  using SmemLayoutQ = typename Base::SmemLayoutQ;
  using SmemLayoutK = typename Base::SmemLayoutK;
  static constexpr int kSmemQ = Base::kSmemQ;
  static constexpr int kSmemK = Base::kSmemK;
  static constexpr int kPartStride = kSelectPStride<kBlockN>;  // part[segment][column]
};

// Rows per head-sum segment: the largest power of two dividing G, at most 16.
inline int64_t select_segment_rows(int64_t group) {
  const int64_t low = group & -group;
  return low < 16 ? low : 16;
}

// Shared memory of a CTA of `tokens` tokens: Q (read into registers once), the K
// stages, the segment sums of the tokens' rows, the token scores and the top-n bit
// sets.
template <class Traits>
inline int64_t select_sm90_smem_bytes(const SelectParams& p, int64_t tokens, int64_t score_stride) {
  const int64_t segments = tokens * p.group / select_segment_rows(p.group);
  return Traits::kSmemQ + Traits::kStages * Traits::kSmemK + segments * Traits::kPartStride * 4 +
         SpreadTable::bytes(Traits::kBlockN, p.cmp_block_size, p.cmp_stride, p.slc_block_size) +
         tokens * score_stride * 4 + tokens * (score_stride / 32) * 4;
}

// Sums this thread's p values over the rows of each segment of kSegRows = 2^kR
// consecutive rows of its warp (kSegRows <= 16) and stores the sums to
// part[segment][column]. v holds one m64nN wgmma accumulator tile of the thread:
// v[ni + (N / 4) * mi] at row 16 * warp + lane / 4 + 8 * mi and column
// 8 * (ni / 2) + 2 * (lane % 4) + ni % 2 (gmma_acc_rowcol's order).
//
// Each shuffle stage pairs lanes whose rows differ in one bit: a lane keeps half of
// its values, sends the other half and adds what its partner sent, so the values
// per thread halve at every stage and a pair (e = 0, 1) of adjacent columns stays
// together to the end (one float2 store).
// Segments from `segments` on (padding rows) are not stored.
template <int kSegRows, int kN, int kPartStride, int kVals>
__device__ __forceinline__ void store_segment_sums(const float (&v)[kVals], float* part, int segments, int warp,
                                                   int lane) {
  static_assert(kSegRows == 1 || kSegRows == 2 || kSegRows == 4 || kSegRows == 8 || kSegRows == 16);
  static_assert(kVals == kN / 2, "two rows of N / 4 values");
  constexpr int kR = kSegRows == 1 ? 0 : kSegRows == 2 ? 1 : kSegRows == 4 ? 2 : kSegRows == 8 ? 3 : 4;
  constexpr int kVals0 = kR == 4 ? kN / 4 : kN / 2;  // at G = 16 rows r and r + 8 are added first
  constexpr int kStages = kR < 3 ? kR : 3;         // over lane bits 2 .. 2 + kStages - 1 (row bits)
  float x[kVals0];
#pragma unroll
  for (int i = 0; i < kVals0; ++i) x[i] = kR == 4 ? v[i] + v[i + kN / 4] : v[i];
  int base = 0;  // value i of this lane is the original value i + base
  auto stage = [&]<int S>() __attribute__((always_inline)) {
    constexpr int kHalf = kVals0 >> (S + 1);
    constexpr int kOff = 4 << (kStages - 1 - S);
    const bool upper = (lane & kOff) != 0;
#pragma unroll
    for (int i = 0; i < kHalf; ++i) {
      const float keep = upper ? x[i + kHalf] : x[i];
      const float send = upper ? x[i] : x[i + kHalf];
      x[i] = keep + __shfl_xor_sync(0xffffffffu, send, kOff);
    }
    base += upper ? kHalf : 0;
  };
  [&]<int... S>(std::integer_sequence<int, S...>) __attribute__((always_inline)) {
    (stage.template operator()<S>(), ...);
  }(std::make_integer_sequence<int, kStages>{});

  constexpr int kValsF = kVals0 >> kStages;
  static_assert(kValsF % 2 == 0);
#pragma unroll
  for (int i = 0; i < kValsF; i += 2) {
    const int o = i + base;             // even: the e = 0 column of a pair
    const int ni = o % (kN / 4), mi = o / (kN / 4);
    const int row_in_warp = lane / 4 + 8 * mi;
    const int segment = warp * (16 / kSegRows) + row_in_warp / kSegRows;
    const int col = 8 * (ni / 2) + 2 * (lane % 4);
    if (segment < segments)
      *reinterpret_cast<float2*>(part + segment * kPartStride + col) = float2{x[i], x[i + 1]};
  }
}

template <class Traits, int kSegRows>
__global__ void __launch_bounds__(Traits::kThreads)
    select_blocks_sm90_kernel(const SelectParams p, int tokens, int score_stride) {
#if NSA_SM90_KERNEL_BODY
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kDk = Traits::kDk;
  constexpr int kThreads = Traits::kThreads, kStages = Traits::kStages, kPartStride = Traits::kPartStride;
  extern __shared__ __align__(1024) char smem[];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, hkv = blockIdx.y;
  const int64_t G = p.group;  // kSegRows divides G
  const int64_t l = p.cmp_block_size, d = p.cmp_stride, lp = p.slc_block_size;

  SelectCta<Element> cta;
  if (!cta.init(p, tokens)) return;
  const int ntok = cta.ntok;
  const int rows = ntok * int(G);  // rows [rows, kBlockM) are padding (zero Q, no visible column)
  const int64_t j_cap = score_stride - 1;

  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem + Traits::kSmemQ)),
                          typename Traits::SmemLayoutK{});
  float* part = reinterpret_cast<float*>(smem + Traits::kSmemQ + kStages * Traits::kSmemK);
  SpreadTable table;
  const int segments = tokens * int(G) / kSegRows;  // those of the CTA's token rows
  char* table_smem = reinterpret_cast<char*>(part + segments * kPartStride);
  table.carve<kBlockN>(table_smem, l, d, lp);
  float* scores = reinterpret_cast<float*>(table_smem + SpreadTable::bytes(kBlockN, l, d, lp));  // [tokens][stride]
  uint32_t* taken = reinterpret_cast<uint32_t*>(scores + tokens * score_stride);  // [tokens][stride/32]

  for (int i = tid; i < ntok * score_stride; i += kThreads) scores[i] = 0.f;

  const int64_t n_end = cta.visible(p, cta.t_begin + ntok - 1);
  const int num_tiles = int((n_end + kBlockN - 1) / kBlockN);

  load_rows_async<kBlockM, kDk, kThreads>(
      sQ, [&](int r) -> const Element* { return r < rows ? cta.q_row(p, r) : nullptr; },
      static_cast<const Element*>(p.q), tid);
  auto load_k_tile = [&](int j) {
    auto sK_st = shifted(sK, (j % kStages) * kBlockN * kDk);
    cta.template load_k_rows<kBlockN, kDk, kThreads>(p, sK_st, int64_t(j) * kBlockN, n_end, tid);
  };
  if (num_tiles > 0) load_k_tile(0);
  cute::cp_async_fence();  // group 0: Q and K_0
  if (num_tiles > 1) load_k_tile(1);
  cute::cp_async_fence();  // group 1: K_1

  typename Traits::TiledMmaS mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor tSrQ = thr.partition_fragment_A(sQ);  // registers
  Tensor tSsQ = thr.partition_A(sQ);
  Tensor acc = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor acc_next = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor acc_rc = make_tensor(acc.data(), gmma_acc_rowcol(acc.layout()));
  static_assert(decltype(size(acc))::value == kBlockN / 2, "one m64nN tile per thread");

  // This thread's two rows (16 * warp + lane / 4 + 8 * mi): visible compressed rows,
  // lse in log2 units.
  int64_t row_hi[2];
  float row_lse2[2];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
    const int r = 16 * warp + lane / 4 + 8 * mi;
    row_hi[mi] = 0;
    row_lse2[mi] = 0.f;
    if (r < rows) cta.row_bounds(p, r, row_hi[mi], row_lse2[mi]);
  }
  const float scale_log2 = float(p.scale) * kLog2e;
  auto k_operand = [&](int j) {  // the descriptors of K_j's stage (built from its address)
    Tensor sK_st = make_tensor(make_smem_ptr(sK.data().get() + (j % kStages) * kBlockN * kDk),
                               typename Traits::SmemLayoutK{});
    return thr.partition_fragment_B(sK_st);
  };

  if (num_tiles > 0) {
    cute::cp_async_wait<1>();
    fence_smem_for_wgmma();
    __syncthreads();  // Q and K_0 landed
    cute::copy(tSsQ, tSrQ);
    {
      auto tSrK0 = k_operand(0);
      gemm_wgmma</*kZeroInit=*/true>(mma, tSrQ, tSrK0, acc);
    }

    // Tile j: S_j is in acc (retired). With kIssueNext, S_{j+1} goes out first and
    // is waited for at the end of the step.
    auto step = [&](int j, auto issue_next) __attribute__((always_inline)) {
      constexpr bool kIssueNext = decltype(issue_next)::value;
      if (j + 2 < num_tiles) load_k_tile(j + 2);  // its stage held K_{j-1}: retired everywhere
      cute::cp_async_fence();
      cute::cp_async_wait<1>();
      fence_smem_for_wgmma();
      __syncthreads();  // K_{j+1} landed; every thread is done with the last tile's part
      if constexpr (kIssueNext) {
        auto tSrK1 = k_operand(j + 1);
        gemm_wgmma_issue</*kZeroInit=*/true>(mma, tSrQ, tSrK1, acc_next);
      }
      const int64_t n0 = int64_t(j) * kBlockN, n_hi = min(n0 + kBlockN, n_end);
      float pv[kBlockN / 2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const int64_t col_hi = min(row_hi[mi] - n0, int64_t(kBlockN));  // visible columns [0, col_hi)
#pragma unroll
        for (int ni = 0; ni < kBlockN / 4; ++ni) {
          const int col = 8 * (ni / 2) + 2 * (lane % 4) + ni % 2;
          pv[ni + (kBlockN / 4) * mi] = col < col_hi ? exp2f(acc_rc(mi, ni) * scale_log2 - row_lse2[mi]) : 0.f;
        }
      }
      store_segment_sums<kSegRows, kBlockN, kPartStride>(pv, part, segments, warp, lane);
      table.fill<kThreads>(n0, n_hi, l, d, lp, j_cap, tid);
      __syncthreads();  // part and table complete
      add_tile_block_scores<kThreads>(scores, score_stride, ntok, table, tid,
                                      [&](int a, int col) {
                                        // token a's G / kSegRows segments, added in order
                                        const int per_token = int(G) / kSegRows;
                                        const float* seg = part + a * per_token * kPartStride + col;
                                        float sum = seg[0];
                                        for (int s = 1; s < per_token; ++s) sum += seg[s * kPartStride];
                                        return sum;
                                      });
      if constexpr (kIssueNext) {
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc_next);
#pragma unroll
        for (int i = 0; i < size(acc); ++i) acc(i) = acc_next(i);
      }
    };
    for (int j = 0; j + 1 < num_tiles; ++j) step(j, cute::true_type{});
    step(num_tiles - 1, cute::false_type{});
  }
  cute::cp_async_wait<0>();
  __syncthreads();  // the last tile's scores (and, with no tile, the zeroed scores)

  select_top_n(p, cta.si, hkv, cta.t_begin, ntok, scores, taken, score_stride, j_cap, warp, lane, kThreads / 32);
#endif  // NSA_SM90_KERNEL_BODY
}

// Takes the selection when G <= 128 and at least one token's scores fit in shared
// memory; returns false (nothing launched) otherwise, and run_select_blocks runs the
// SM80 kernel. A CTA takes floor(128 / G) tokens, or as many as fit (long sequences
// at small G: the score rows, 4 bytes per selection block per token, fill the smem;
// the rows past the tokens are padding, which still beats the SM80 kernel's 100 KB
// budget of a few tokens).
template <int kDk, DType kDType>
bool run_select_blocks_sm90(const SelectParams& p, cudaStream_t stream) {
  using Traits = SelectTraitsSm90<kDk, typename ElementOf<kDType>::type>;
  const char* what = "select_blocks (sm90)";
  const int64_t G = p.group;
  if (G < 1 || G > Traits::kBlockM) return false;
  const int64_t score_stride = (num_slc_blocks(p.seqlen, p.slc_block_size) + 31) / 32 * 32;
  int device = 0, optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  int64_t tokens = Traits::kBlockM / G;
  while (tokens > 1 && select_sm90_smem_bytes<Traits>(p, tokens, score_stride) > optin) --tokens;
  const int64_t smem = select_sm90_smem_bytes<Traits>(p, tokens, score_stride);
  if (smem > optin) return false;
  const int64_t t_blocks = (p.seqlen + tokens - 1) / tokens;
  if (t_blocks > INT32_MAX || p.num_heads_kv > 65535 || p.num_seqs > 65535)
    throw std::runtime_error("nsa_cuda: select_blocks: problem too large for the grid");
  auto launch = [&](auto kernel) {
    set_smem_limit(kernel, int(smem), what);
    dim3 grid(unsigned(t_blocks), unsigned(p.num_heads_kv), unsigned(p.num_seqs));
    NSA_LAUNCH(grid, Traits::kThreads, int(smem), stream, kernel)(p, int(tokens), int(score_stride));
    check_launch(what);
  };
  switch (select_segment_rows(G)) {  // a token is G / kSegRows segments
    case 1: launch(select_blocks_sm90_kernel<Traits, 1>); break;
    case 2: launch(select_blocks_sm90_kernel<Traits, 2>); break;
    case 4: launch(select_blocks_sm90_kernel<Traits, 4>); break;
    case 8: launch(select_blocks_sm90_kernel<Traits, 8>); break;
    default: launch(select_blocks_sm90_kernel<Traits, 16>); break;
  }
  return true;
}

}  // namespace nsa::cuda
