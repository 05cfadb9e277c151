// Block selection on the CPU: the compressed-branch probabilities are recomputed
// from q·k_cmp and lse_cmp, mapped onto selection blocks by overlap, summed over
// the group's heads, and the top-n blocks (forced ones first) are written
// ascending and padded with -1.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "cpu/kernels.h"
#include "nsa/rules.h"

namespace nsa::cpu {

template <typename scalar_t>
void select_blocks(const SelectParams& p) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t l = p.cmp_block_size, d = p.cmp_stride, lp = p.slc_block_size;
  std::vector<SeqInfo> seqs;
  std::vector<int64_t> first_token;
  int64_t total = 0;
  for (int64_t b = 0; b < p.num_seqs; ++b) {
    seqs.push_back(seq_info(p.cu_seqlens, p.seqlens_k, b, p.seqlen, l, d));
    first_token.push_back(total);
    total += seqs.back().q_len;
  }
  const auto* q_base = static_cast<const scalar_t*>(p.q);
  const auto* k_base = static_cast<const scalar_t*>(p.k_cmp);
  const auto* lse_base = static_cast<const acc_t*>(p.lse_cmp);

  // Small problems run on the calling thread (a thread pool wake-up costs more).
  const int64_t cmp_keys = p.seqlens_k != nullptr ? p.k_rows : p.seqlen / d + 1;
  const int64_t work = std::max<int64_t>(1, p.group * cmp_keys * p.head_dim_qk);
  at::parallel_for(0, total * p.num_heads_kv, std::max<int64_t>(1, (int64_t(1) << 18) / work),
                   [&](int64_t begin, int64_t end) {
    std::vector<acc_t> score;
    std::vector<int64_t> order;
    for (int64_t x = begin; x < end; ++x) {
      const int64_t token = x / p.num_heads_kv, kvh = x % p.num_heads_kv;
      const int64_t b = (std::upper_bound(first_token.begin(), first_token.end(), token) -
                         first_token.begin()) - 1;
      const SeqInfo& s = seqs[b];
      const int64_t i = token - first_token[b];  // query row; its position is t
      const int64_t t = s.q_pos0 + i;
      int32_t* out = p.block_indices + s.batch * p.bi_batch_stride +
                     (s.q_row0 + i) * p.bi_row_stride + kvh * p.bi_head_stride;
      if (t < 0) {  // decode: a query row before position 0 selects nothing
        std::fill(out, out + p.slc_num_blocks, int32_t(-1));
        continue;
      }
      const int64_t last = last_candidate_slc_block(t, lp);  // J
      const int64_t avail = std::max<int64_t>(0, p.k_rows - s.cmp_row0);
      const int64_t nc = std::min(num_visible_cmp_blocks(t, l, d), avail);
      score.assign(last + 1, acc_t(0));

      for (int64_t h = kvh * p.group; h < (kvh + 1) * p.group; ++h) {
        const acc_t lse = lse_base[s.batch * p.lse_batch_stride + h * p.lse_head_stride + s.q_row0 + i];
        if (lse == -std::numeric_limits<acc_t>::infinity()) continue;
        const scalar_t* q = q_base + s.batch * p.q_batch_stride + (s.q_row0 + i) * p.q_row_stride +
                            h * p.q_head_stride;
        for (int64_t blk = 0; blk < nc; ++blk) {  // compressed block
          const scalar_t* k = k_base + s.batch * p.k_batch_stride +
                              (s.cmp_row0 + blk) * p.k_row_stride + kvh * p.k_head_stride;
          acc_t qk = 0;
          for (int64_t c = 0; c < p.head_dim_qk; ++c)
            qk += static_cast<acc_t>(q[c]) * static_cast<acc_t>(k[c]);
          const acc_t prob = std::exp(acc_t(p.scale) * qk - lse);
          for (int64_t j = first_overlapped_slc_block(blk, d, lp);
               j <= last_overlapped_slc_block(blk, l, d, lp) && j <= last; ++j)
            score[j] += acc_t(cmp_slc_overlap_weight(blk, j, l, d, lp)) * prob;
        }
      }

      // Forced blocks rank above every scored one; then by score, ties to smaller j.
      order.resize(last + 1);
      std::iota(order.begin(), order.end(), int64_t(0));
      auto forced = [&](int64_t j) {
        return is_forced_slc_block(j, last, p.slc_init_blocks, p.slc_local_blocks);
      };
      const int64_t take = std::min<int64_t>(p.slc_num_blocks, last + 1);
      std::partial_sort(order.begin(), order.begin() + take, order.end(), [&](int64_t a, int64_t c) {
        if (forced(a) != forced(c)) return forced(a);
        return slc_ranks_before(score[a], a, score[c], c);
      });
      std::sort(order.begin(), order.begin() + take);

      for (int64_t a = 0; a < p.slc_num_blocks; ++a) out[a] = a < take ? int32_t(order[a]) : -1;
    }
  });
}

template void select_blocks<float>(const SelectParams&);
template void select_blocks<double>(const SelectParams&);
template void select_blocks<c10::Half>(const SelectParams&);
template void select_blocks<c10::BFloat16>(const SelectParams&);

}  // namespace nsa::cpu
