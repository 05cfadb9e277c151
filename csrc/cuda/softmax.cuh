// Online softmax over KV tiles (FlashAttention-2 style): running row max and
// row sum in fp32, exp2 with scale*log2(e) folded in, -inf rows guarded so an
// empty row gives o = 0 and lse = -inf, never NaN. The max is taken over the
// scaled scores, so any scale works (zero or negative too, like the CPU path).
#pragma once

#include "cuda/common.cuh"

namespace nsa::cuda {

template <int kRows>
struct OnlineSoftmax {
  float row_max[kRows];  // max of scale*log2(e)*score, -inf while nothing is visible
  float row_sum[kRows];  // this thread's partial sum; summed over the quad at the end

  __device__ __forceinline__ OnlineSoftmax() {
#pragma unroll
    for (int i = 0; i < kRows; ++i) row_max[i] = -INFINITY, row_sum[i] = 0.f;
  }

  // scores: this tile's (rows, cols) view of the S accumulator, masked entries
  // already -inf; replaced by the unnormalised probabilities. acc_o: (rows, cols)
  // view of the output accumulator, rescaled to the new max.
  template <class Scores, class AccO>
  __device__ __forceinline__ void update(Scores& scores, AccO& acc_o, float scale_log2) {
    float rescale[kRows];
    update_scores(scores, scale_log2, rescale);
    rescale_o(acc_o, rescale);
  }

  // update() without the output: the factor each row of acc_o must be multiplied by,
  // for a caller whose P V of the previous tile is still accumulating into acc_o
  // (the Hopper kernel applies it once that wgmma has retired).
  template <class Scores>
  __device__ __forceinline__ void update_scores(Scores& scores, float scale_log2,
                                                float (&rescale)[kRows]) {
    using namespace cute;
    static_assert(decltype(size<0>(scores))::value == kRows);
#pragma unroll
    for (int mi = 0; mi < kRows; ++mi) {
      float m = row_max[mi];
#pragma unroll
      for (int ni = 0; ni < size<1>(scores); ++ni) {
        // Scale before the max: with scale <= 0 the raw max is not the scaled max
        // (and -inf * scale would turn a masked entry into +inf or NaN).
        const float s = scores(mi, ni);
        const float x = s == -INFINITY ? -INFINITY : s * scale_log2;
        scores(mi, ni) = x;
        m = fmaxf(m, x);
      }
      m = quad_allreduce<4>(m, MaxOp{});
      // With everything masked so far, m == -inf: subtract 0 instead so that
      // exp2(-inf - -inf) never appears; every p is then exp2(-inf) = 0.
      const float base = m == -INFINITY ? 0.f : m;
      rescale[mi] = exp2f(row_max[mi] - base);  // 0 when old max is -inf
      row_max[mi] = m;
      row_sum[mi] *= rescale[mi];
      float sum = 0.f;
#pragma unroll
      for (int ni = 0; ni < size<1>(scores); ++ni) {
        const float p = exp2f(scores(mi, ni) - base);
        scores(mi, ni) = p;
        sum += p;
      }
      row_sum[mi] += sum;
    }
  }

  template <class AccO>
  __device__ __forceinline__ static void rescale_o(AccO& acc_o, const float (&rescale)[kRows]) {
    using namespace cute;
#pragma unroll
    for (int mi = 0; mi < kRows; ++mi) {
#pragma unroll
      for (int ni = 0; ni < size<1>(acc_o); ++ni) acc_o(mi, ni) *= rescale[mi];
    }
  }

  // Normalises acc_o and returns the natural-log lse of each row (-inf, with
  // o = 0, for a row that saw no key).
  template <class AccO>
  __device__ __forceinline__ void finalize(AccO& acc_o, float /*scale: folded into row_max*/,
                                           float (&lse)[kRows]) {
    using namespace cute;
    constexpr float kLn2 = 0.6931471805599453f;
#pragma unroll
    for (int mi = 0; mi < kRows; ++mi) {
      const float sum = quad_allreduce<4>(row_sum[mi], SumOp{});
      const bool empty = !(sum > 0.f);  // also catches NaN
      const float inv = empty ? 0.f : 1.f / sum;
      lse[mi] = empty ? -INFINITY : row_max[mi] * kLn2 + logf(sum);
#pragma unroll
      for (int ni = 0; ni < size<1>(acc_o); ++ni) acc_o(mi, ni) *= inv;
    }
  }
};

}  // namespace nsa::cuda
