// Mean compression on the CPU: compressed row i of a sequence is the mean of
// its rows [i*d, i*d + l).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <vector>

#include "cpu/kernels.h"
#include "nsa/rules.h"

namespace nsa::cpu {

// (sequence, head) tasks per parallel chunk: small problems stay on one thread.
inline int64_t grain(const CompressParams& p) {
  return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, p.seqlen * p.head_dim));
}

template <typename scalar_t>
void mean_compress(const CompressParams& p) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t l = p.cmp_block_size, d = p.cmp_stride;
  at::parallel_for(0, p.num_seqs * p.num_heads, grain(p), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(p.head_dim);
    for (int64_t x = begin; x < end; ++x) {
      const int64_t seq = x / p.num_heads, h = x % p.num_heads;
      const SeqInfo s = seq_info(p.cu_seqlens, seq, p.seqlen, l, d);
      const int64_t blocks = num_cmp_blocks(s.len, l, d);
      for (int64_t i = 0; i < blocks; ++i) {
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t r = i * d; r < i * d + l; ++r) {
          const scalar_t* src = static_cast<const scalar_t*>(p.x) + s.batch * p.x_batch_stride +
                                (s.row0 + r) * p.x_row_stride + h * p.x_head_stride;
          for (int64_t c = 0; c < p.head_dim; ++c) sum[c] += static_cast<acc_t>(src[c]);
        }
        scalar_t* dst = static_cast<scalar_t*>(p.out) + s.batch * p.out_batch_stride +
                        (s.cmp_row0 + i) * p.out_row_stride + h * p.out_head_stride;
        for (int64_t c = 0; c < p.head_dim; ++c) dst[c] = static_cast<scalar_t>(sum[c] / acc_t(l));
      }
    }
  });
}

template void mean_compress<float>(const CompressParams&);
template void mean_compress<double>(const CompressParams&);
template void mean_compress<c10::Half>(const CompressParams&);
template void mean_compress<c10::BFloat16>(const CompressParams&);

}  // namespace nsa::cpu

namespace nsa::cpu {

// Gradient of mean_compress: each row receives dout / l from every block that
// covers it. One task per (sequence, head) owns its rows.
template <typename scalar_t>
void mean_compress_bwd(const CompressParams& p) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t l = p.cmp_block_size, d = p.cmp_stride;
  at::parallel_for(0, p.num_seqs * p.num_heads, grain(p), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(p.head_dim);
    for (int64_t x = begin; x < end; ++x) {
      const int64_t seq = x / p.num_heads, h = x % p.num_heads;
      const SeqInfo s = seq_info(p.cu_seqlens, seq, p.seqlen, l, d);
      const int64_t blocks = num_cmp_blocks(s.len, l, d);
      for (int64_t r = 0; r < s.len; ++r) {
        std::fill(sum.begin(), sum.end(), acc_t(0));
        const int64_t first = r - l + 1 > 0 ? (r - l + 1 + d - 1) / d : 0;
        const int64_t last = std::min(r / d, blocks - 1);
        for (int64_t i = first; i <= last; ++i) {
          const scalar_t* src = static_cast<const scalar_t*>(p.out) + s.batch * p.out_batch_stride +
                                (s.cmp_row0 + i) * p.out_row_stride + h * p.out_head_stride;
          for (int64_t c = 0; c < p.head_dim; ++c) sum[c] += static_cast<acc_t>(src[c]);
        }
        scalar_t* dst = const_cast<scalar_t*>(static_cast<const scalar_t*>(p.x)) +
                        s.batch * p.x_batch_stride + (s.row0 + r) * p.x_row_stride +
                        h * p.x_head_stride;
        for (int64_t c = 0; c < p.head_dim; ++c) dst[c] = static_cast<scalar_t>(sum[c] / acc_t(l));
      }
    }
  });
}

template void mean_compress_bwd<float>(const CompressParams&);
template void mean_compress_bwd<double>(const CompressParams&);
template void mean_compress_bwd<c10::Half>(const CompressParams&);
template void mean_compress_bwd<c10::BFloat16>(const CompressParams&);

}  // namespace nsa::cpu
