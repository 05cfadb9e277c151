// Mean compression on the CPU: compressed row i of a sequence is the mean of
// its rows [i*d, i*d + l); the gradient hands each row dout / l from every
// block that covers it. Both are one loop: each destination row is 1/l times the
// sum of a contiguous range of source rows.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "cpu/kernels.h"
#include "nsa/rules.h"

namespace nsa::cpu {
namespace {

struct RowRange {
  int64_t begin, end;  // [begin, end)
};

// Destination rows [first, end) of one (sequence, head) task and the map from a
// destination row to its source rows.
template <typename Sources>
struct RowPlan {
  int64_t first, end;
  Sources sources;
};

// The sequence a task works on: a KV-cache update grows batch entry b from
// cache_seqlens[b] tokens by num_new.
inline SeqInfo compress_seq_info(const CompressParams& p, int64_t seq) {
  if (p.cache_seqlens == nullptr)
    return seq_info(p.cu_seqlens, seq, p.seqlen, p.cmp_block_size, p.cmp_stride);
  SeqInfo s{};
  s.batch = seq;
  s.len = std::min<int64_t>(p.cache_seqlens[seq] + p.num_new, p.seqlen);
  return s;
}

// One task per (sequence, head) owns its destination rows, so the result does not
// depend on the thread count. `plan(seq_info, blocks)` returns the RowPlan.
template <typename scalar_t, bool kToTokens, typename Plan>
void mean_of_row_ranges(const CompressParams& p, Plan plan) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t l = p.cmp_block_size, d = p.cmp_stride;
  // Token rows live in `x`, compressed rows in `out` (roles swapped for the gradient).
  auto token_row = [&](const SeqInfo& s, int64_t r, int64_t h) {
    return static_cast<scalar_t*>(const_cast<void*>(p.x)) + s.batch * p.x_batch_stride +
           (s.row0 + r) * p.x_row_stride + h * p.x_head_stride;
  };
  auto cmp_row = [&](const SeqInfo& s, int64_t i, int64_t h) {
    return static_cast<scalar_t*>(p.out) + s.batch * p.out_batch_stride +
           (s.cmp_row0 + i) * p.out_row_stride + h * p.out_head_stride;
  };
  // Small problems stay on the calling thread: waking a pool costs more.
  const int64_t grain =
      std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, p.seqlen * p.head_dim));
  at::parallel_for(0, p.num_seqs * p.num_heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(p.head_dim);
    for (int64_t x = begin; x < end; ++x) {
      const int64_t h = x % p.num_heads;
      const SeqInfo s = compress_seq_info(p, x / p.num_heads);
      const auto [first, end, sources] = plan(s, num_cmp_blocks(s.len, l, d));
      for (int64_t j = first; j < end; ++j) {
        std::fill(sum.begin(), sum.end(), acc_t(0));
        const RowRange src = sources(j);
        for (int64_t r = src.begin; r < src.end; ++r) {
          const scalar_t* row = kToTokens ? cmp_row(s, r, h) : token_row(s, r, h);
          for (int64_t c = 0; c < p.head_dim; ++c) sum[c] += static_cast<acc_t>(row[c]);
        }
        scalar_t* dst = kToTokens ? token_row(s, j, h) : cmp_row(s, j, h);
        for (int64_t c = 0; c < p.head_dim; ++c) dst[c] = static_cast<scalar_t>(sum[c] / acc_t(l));
      }
    }
  });
}

}  // namespace

template <typename scalar_t>
void mean_compress(const CompressParams& p) {
  const int64_t l = p.cmp_block_size, d = p.cmp_stride;
  mean_of_row_ranges<scalar_t, /*kToTokens=*/false>(p, [=](const SeqInfo&, int64_t blocks) {
    return RowPlan{0, blocks, [=](int64_t i) { return RowRange{i * d, i * d + l}; }};
  });
}

template <typename scalar_t>
void update_cmp_cache(const CompressParams& p) {
  const int64_t l = p.cmp_block_size, d = p.cmp_stride;
  mean_of_row_ranges<scalar_t, /*kToTokens=*/false>(p, [=](const SeqInfo& s, int64_t blocks) {
    const int64_t old_len = std::clamp<int64_t>(p.cache_seqlens[s.batch], 0, s.len);
    return RowPlan{num_cmp_blocks(old_len, l, d), std::min(blocks, p.rows_out),
                   [=](int64_t i) { return RowRange{i * d, i * d + l}; }};
  });
}

template <typename scalar_t>
void mean_compress_bwd(const CompressParams& p) {
  const int64_t l = p.cmp_block_size, d = p.cmp_stride;
  mean_of_row_ranges<scalar_t, /*kToTokens=*/true>(p, [=](const SeqInfo& s, int64_t blocks) {
    // Token r lies in the blocks i with i*d <= r < i*d + l.
    return RowPlan{0, s.len, [=](int64_t r) {
      const int64_t first = r - l + 1 > 0 ? (r - l + 1 + d - 1) / d : 0;
      return RowRange{first, std::min(r / d + 1, blocks)};
    }};
  });
}

template <typename scalar_t>
void append_kv_to_cache(const CacheAppendParams& p) {
  at::parallel_for(0, 2 * p.batch * p.num_new, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const auto& x = p.sides[job / (p.batch * p.num_new)];
      const int64_t b = job / p.num_new % p.batch, i = job % p.num_new;
      const int64_t row = int64_t(p.cache_seqlens[b]) + i;
      if (row < 0 || row >= p.capacity) continue;
      for (int64_t h = 0; h < p.num_heads; ++h) {
        const auto* from = static_cast<const scalar_t*>(x.src) + b * x.src_batch_stride +
                           i * x.src_row_stride + h * x.src_head_stride;
        auto* to = static_cast<scalar_t*>(x.dst) + b * x.dst_batch_stride +
                   row * x.dst_row_stride + h * x.dst_head_stride;
        std::copy(from, from + x.head_dim, to);
      }
    }
  });
  // The CUDA kernel does this in the same launch; here the appended rows are in the
  // token caches already, so the update reads them there.
  if (p.cmp[0].out != nullptr)
    for (const CompressParams& cmp : p.cmp) update_cmp_cache<scalar_t>(cmp);
}

#define NSA_INSTANTIATE_COMPRESS(T)                          \
  template void mean_compress<T>(const CompressParams&);     \
  template void mean_compress_bwd<T>(const CompressParams&); \
  template void update_cmp_cache<T>(const CompressParams&);  \
  template void append_kv_to_cache<T>(const CacheAppendParams&);
NSA_INSTANTIATE_COMPRESS(float)
NSA_INSTANTIATE_COMPRESS(double)
NSA_INSTANTIATE_COMPRESS(c10::Half)
NSA_INSTANTIATE_COMPRESS(c10::BFloat16)

}  // namespace nsa::cpu
