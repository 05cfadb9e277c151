// The CPU attention mainloop, shared by the compressed, selected and window
// branches: each query row walks its branch's key ranges (schedule.h) with the
// online softmax the CUDA kernels use (running max, rescaled sum and output).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/schedule.h"

namespace nsa::cpu {
namespace {

// The innermost loops are built twice, for x86-64's baseline (SSE2) and for AVX2
// with FMA, and run_fastest picks by what the CPU reports at run time: twice the
// vector width where it exists, no illegal instruction where it does not. (GCC's
// target_clones would pick by CPU model for arch=, and left this AVX2 machine on
// the baseline.) `flatten` inlines the whole call tree into each copy, so the
// loops themselves are compiled for the copy's target.
#if defined(__x86_64__) && defined(__GNUC__)
inline bool cpu_has_avx2_fma() {
  // NSA_CPU_BASELINE=1 keeps the baseline copy, so the tests can run both.
  static const bool has = [] {
    const char* baseline = std::getenv("NSA_CPU_BASELINE");
    if (baseline != nullptr && baseline[0] == '1') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
template <class F>
__attribute__((target("avx2,fma"), flatten)) void run_avx2(const F& f) { f(); }
template <class F>
__attribute__((flatten)) void run_baseline(const F& f) { f(); }
template <class F>
inline void run_fastest(const F& f) {
  if (cpu_has_avx2_fma())
    run_avx2(f);
  else
    run_baseline(f);
}
#else
template <class F>
inline void run_fastest(const F& f) { f(); }
#endif

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Eight independent partial sums: a single running sum makes every multiply-add
// wait for the previous one (and `omp simd reduction` was left scalar in some of
// the inlined copies), which made the selected branch several times slower.
template <typename acc_t, typename scalar_t>
inline acc_t dot(const acc_t* a, const scalar_t* b, int64_t n) {
  constexpr int kLanes = 8;
  acc_t part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) part[j] += a[i + j] * static_cast<acc_t>(b[i + j]);
  }
  acc_t s = 0;
  for (; i < n; ++i) s += a[i] * static_cast<acc_t>(b[i]);
  for (int j = 0; j < kLanes; ++j) s += part[j];
  return s;
}

template <typename acc_t, typename scalar_t>
inline void axpy(acc_t alpha, const scalar_t* x, acc_t* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * static_cast<acc_t>(x[i]);
}

// acc[c] += sum_r w[r] * x[r * stride + c]: the P.V product of one chunk. The output
// columns stay in registers across the chunk's rows, where an axpy per row would
// load and store all of acc once per key.
template <typename acc_t, typename scalar_t>
inline void accumulate_rows(const acc_t* w, const scalar_t* x, int64_t stride, int64_t rows,
                            acc_t* acc, int64_t n) {
  constexpr int kCols = 16;
  int64_t c = 0;
  for (; c + kCols <= n; c += kCols) {
    acc_t blk[kCols];
    for (int j = 0; j < kCols; ++j) blk[j] = acc[c + j];
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t wr = w[r];
      const scalar_t* xr = x + r * stride + c;
#pragma omp simd
      for (int j = 0; j < kCols; ++j) blk[j] += wr * static_cast<acc_t>(xr[j]);
    }
    for (int j = 0; j < kCols; ++j) acc[c + j] = blk[j];
  }
  for (int64_t r = 0; r < rows; ++r) axpy(w[r], x + r * stride + c, acc + c, n - c);
}

// The j-th of n work items in an order that alternates between the two ends:
// at::parallel_for hands each thread a contiguous range, and under a causal mask
// later tokens cost more, so ranges of this order carry early and late tokens alike.
inline int64_t zigzag(int64_t j, int64_t n) { return j % 2 == 0 ? j / 2 : n - 1 - j / 2; }

// Maps a flat token index to its sequence, for parallel loops over all tokens.
struct TokenMap {
  std::vector<SeqInfo> seqs;
  std::vector<int64_t> first_token;  // flat index of each sequence's first token
  int64_t total = 0;

  TokenMap(const int32_t* cu_seqlens, const int32_t* seqlens_k, int64_t num_seqs, int64_t seqlen,
           int64_t l, int64_t d) {
    for (int64_t b = 0; b < num_seqs; ++b) {
      seqs.push_back(seq_info(cu_seqlens, seqlens_k, b, seqlen, l, d));
      first_token.push_back(total);
      total += seqs.back().q_len;
    }
  }
  // The sequence holding flat query row `x` and the query row index in it.
  std::pair<const SeqInfo*, int64_t> locate(int64_t x) const {
    const auto it = std::upper_bound(first_token.begin(), first_token.end(), x);
    const int64_t b = (it - first_token.begin()) - 1;
    return {&seqs[b], x - first_token[b]};
  }
};

// Rows per parallel chunk: small problems run on the calling thread, since waking
// a thread pool costs more than they do.
inline int64_t rows_per_chunk(const AttnFwdParams& p) {
  // an upper bound on the keys one row visits
  int64_t keys = p.seqlens_k != nullptr ? p.k_rows : p.seqlen;
  if (p.branch == Branch::kCompressed) keys = keys / p.cmp_stride + 1;
  if (p.branch == Branch::kWindow) keys = std::min(keys, p.window_size);
  if (p.branch == Branch::kSelected) keys = std::min(keys, p.slc_num_blocks * p.slc_block_size);
  const int64_t work_per_row = std::max<int64_t>(1, keys * (p.head_dim_qk + p.head_dim_v));
  return std::max<int64_t>(1, (int64_t(1) << 18) / work_per_row);
}

inline TokenMap token_map(const AttnFwdParams& p) {
  return TokenMap(p.cu_seqlens, p.seqlens_k, p.num_seqs, p.seqlen, p.cmp_block_size,
                  p.cmp_stride);
}

template <typename T>
inline T* row_ptr(T* base, int64_t batch_stride, int64_t row_stride, int64_t head_stride,
                  int64_t b, int64_t row, int64_t h) {
  return base + b * batch_stride + row * row_stride + h * head_stride;
}

template <typename scalar_t>
struct Views {
  using acc_t = acc_type<scalar_t>;
  const AttnFwdParams& p;
  // Query-side rows are indexed by the query row i (position q_pos0 + i).
  const scalar_t* q_row(const SeqInfo& s, int64_t i, int64_t h) const {
    return row_ptr(static_cast<const scalar_t*>(p.q), p.q_batch_stride, p.q_row_stride,
                   p.q_head_stride, s.batch, s.q_row0 + i, h);
  }
  const scalar_t* k_row(const SeqInfo& s, int64_t r, int64_t kvh) const {
    return row_ptr(static_cast<const scalar_t*>(p.k), p.k_batch_stride, p.k_row_stride,
                   p.k_head_stride, s.batch, key_row0(p, s) + r, kvh);
  }
  const scalar_t* v_row(const SeqInfo& s, int64_t r, int64_t kvh) const {
    return row_ptr(static_cast<const scalar_t*>(p.v), p.v_batch_stride, p.v_row_stride,
                   p.v_head_stride, s.batch, key_row0(p, s) + r, kvh);
  }
  scalar_t* o_row(const SeqInfo& s, int64_t i, int64_t h) const {
    return row_ptr(static_cast<scalar_t*>(p.o), p.o_batch_stride, p.o_row_stride,
                   p.o_head_stride, s.batch, s.q_row0 + i, h);
  }
  acc_t& lse(const SeqInfo& s, int64_t i, int64_t h) const {
    return static_cast<acc_t*>(p.lse)[s.batch * p.lse_batch_stride + h * p.lse_head_stride +
                                      s.q_row0 + i];
  }
};

// Online softmax over one query row: scores arrive in chunks; the running max
// `m`, the sum `l` of exp(score - m) and the output accumulator are rescaled
// whenever the max grows.
template <typename acc_t>
struct OnlineSoftmax {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  acc_t l = 0;

  // Returns the factor that rescales what was accumulated before this chunk.
  acc_t absorb_chunk(acc_t* scores, int64_t n) {
    acc_t m_new = m;
    for (int64_t i = 0; i < n; ++i) m_new = std::max(m_new, scores[i]);
    const acc_t rescale = m == -std::numeric_limits<acc_t>::infinity() ? 0 : std::exp(m - m_new);
    l *= rescale;
    for (int64_t i = 0; i < n; ++i) {
      scores[i] = std::exp(scores[i] - m_new);
      l += scores[i];
    }
    m = m_new;
    return rescale;
  }
  bool empty() const { return l == 0; }
  acc_t lse() const {
    return empty() ? -std::numeric_limits<acc_t>::infinity() : m + std::log(l);
  }
};

constexpr int64_t kChunk = 64;

// The innermost loops, one run_fastest call per chunk or key range.

// scores[r] = q . k_r for the n keys k_r = k + r * stride.
template <typename acc_t, typename scalar_t>
inline void chunk_scores(const acc_t* q, const scalar_t* k, int64_t stride, int64_t n,
                                 int64_t dk, acc_t* scores) {
  for (int64_t r = 0; r < n; ++r) scores[r] = dot(q, k + r * stride, dk);
}

// One query row's backward state: its q, dout and dq rows, lse and delta.
template <typename acc_t>
struct BwdRow {
  const acc_t* q;
  const acc_t* dout;
  acc_t* dq;
  acc_t scale, lse, delta;
  int64_t dk, dv;
};

// The row's terms for n consecutive keys: dq += ds k, dk_acc += ds q, dv_acc += p dout.
template <typename acc_t, typename scalar_t>
inline void bwd_keys(const BwdRow<acc_t>& row, const scalar_t* k, int64_t k_stride,
                             const scalar_t* v, int64_t v_stride, int64_t n, double* dk_acc,
                             double* dv_acc) {
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* k_src = k + r * k_stride;
    const acc_t prob = std::exp(row.scale * dot(row.q, k_src, row.dk) - row.lse);
    const acc_t dp = dot(row.dout, v + r * v_stride, row.dv);
    const acc_t ds = prob * (dp - row.delta);
    axpy(double(prob), row.dout, dv_acc + r * row.dv, row.dv);
    axpy(ds, k_src, row.dq, row.dk);
    axpy(double(ds), row.q, dk_acc + r * row.dk, row.dk);
  }
}

template <typename scalar_t>
void fwd_row(const AttnFwdParams& p, const Views<scalar_t>& view, const SeqInfo& s, int64_t i,
             int64_t h, std::vector<acc_type<scalar_t>>& scratch) {
  using acc_t = acc_type<scalar_t>;
  const int64_t dk = p.head_dim_qk, dv = p.head_dim_v, kvh = h / p.group;
  scratch.assign(dk + dv + kChunk, acc_t(0));
  acc_t* q = scratch.data();
  acc_t* acc = q + dk;
  acc_t* scores = acc + dv;
  const scalar_t* q_src = view.q_row(s, i, h);
  for (int64_t c = 0; c < dk; ++c) q[c] = static_cast<acc_t>(q_src[c]) * acc_t(p.scale);

  OnlineSoftmax<acc_t> softmax;
  for_each_key_range(p, s, i, h, [&](KeyRange range) {
    for (int64_t r0 = range.begin; r0 < range.end; r0 += kChunk) {
      const int64_t n = std::min(kChunk, range.end - r0);
      run_fastest([&] {
        chunk_scores(q, view.k_row(s, r0, kvh), p.k_row_stride, n, dk, scores);
        const acc_t rescale = softmax.absorb_chunk(scores, n);
        for (int64_t c = 0; c < dv; ++c) acc[c] *= rescale;
        accumulate_rows(scores, view.v_row(s, r0, kvh), p.v_row_stride, n, acc, dv);
      });
    }
  });

  scalar_t* o = view.o_row(s, i, h);
  const acc_t inv_l = softmax.empty() ? acc_t(0) : acc_t(1) / softmax.l;
  for (int64_t c = 0; c < dv; ++c) o[c] = static_cast<scalar_t>(acc[c] * inv_l);
  view.lse(s, i, h) = softmax.lse();
}

}  // namespace

template <typename scalar_t>
void attn_fwd(const AttnFwdParams& p) {
  const TokenMap tokens = token_map(p);
  const Views<scalar_t> view{p};
  const int64_t rows = tokens.total * p.num_heads_q;
  const int64_t chunk = rows_per_chunk(p), chunks = (rows + chunk - 1) / chunk;
  // One chunk: the calling thread, no pool wake-up (see rows_per_chunk).
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_type<scalar_t>> scratch;
    for (int64_t j = begin; j < end; ++j) {
      const int64_t c = zigzag(j, chunks);
      for (int64_t x = c * chunk; x < std::min(rows, (c + 1) * chunk); ++x) {
        const auto [seq, i] = tokens.locate(x / p.num_heads_q);
        fwd_row(p, view, *seq, i, x % p.num_heads_q, scratch);
      }
    }
  });
}

// One query row's share of the backward: its dq row (written here) and its terms
// of dk/dv, added to dk_acc/dv_acc (rows local to the sequence's keys).
template <typename scalar_t>
void bwd_row(const AttnBwdParams& p, const Views<scalar_t>& view, const SeqInfo& s, int64_t t,
             int64_t h, std::vector<acc_type<scalar_t>>& scratch, double* dk_acc, double* dv_acc) {
  using acc_t = acc_type<scalar_t>;
  const int64_t dk = p.head_dim_qk, dv = p.head_dim_v, kvh = h / p.group;
  scratch.assign(2 * dk + dv, acc_t(0));
  acc_t* q = scratch.data();
  acc_t* dq = q + dk;
  acc_t* dout = dq + dk;
  const acc_t lse = view.lse(s, t, h);
  const scalar_t* do_src = row_ptr(static_cast<const scalar_t*>(p.dout), p.do_batch_stride,
                                   p.do_row_stride, p.do_head_stride, s.batch, s.q_row0 + t, h);
  const scalar_t* o_src = view.o_row(s, t, h);
  // The gradient of o is g * do (g: dout_scale, or 1).
  const acc_t g = p.dout_scale == nullptr
                      ? acc_t(1)
                      : static_cast<const acc_t*>(p.dout_scale)[s.batch * p.ds_batch_stride +
                                                                (s.q_row0 + t) * p.ds_row_stride +
                                                                h * p.ds_head_stride];
  // delta = d(loss)/d(lse) folded in: ds = p * (dp - (rowsum(o * do) - dlse)).
  acc_t delta = 0;
  for (int64_t c = 0; c < dv; ++c) {
    dout[c] = g * static_cast<acc_t>(do_src[c]);
    delta += dout[c] * static_cast<acc_t>(o_src[c]);
  }
  const int64_t lse_idx = s.batch * p.lse_batch_stride + h * p.lse_head_stride + s.q_row0 + t;
  if (p.delta_in != nullptr)  // the caller's, dlse already in
    delta = static_cast<const acc_t*>(p.delta_in)[lse_idx];
  else if (p.dlse != nullptr)
    delta -= static_cast<const acc_t*>(p.dlse)[lse_idx];
  const scalar_t* q_src = view.q_row(s, t, h);
  for (int64_t i = 0; i < dk; ++i) q[i] = static_cast<acc_t>(q_src[i]);

  if (lse != -std::numeric_limits<acc_t>::infinity()) {
    const BwdRow<acc_t> row{q, dout, dq, acc_t(p.scale), lse, delta, dk, dv};
    for_each_key_range(p, s, t, h, [&](KeyRange range) {
      run_fastest([&] {
        bwd_keys(row, view.k_row(s, range.begin, kvh), p.k_row_stride,
                 view.v_row(s, range.begin, kvh), p.v_row_stride, range.end - range.begin,
                 dk_acc + range.begin * dk, dv_acc + range.begin * dv);
      });
    });
  }
  scalar_t* dq_dst = row_ptr(static_cast<scalar_t*>(p.dq), p.dq_batch_stride, p.dq_row_stride,
                             p.dq_head_stride, s.batch, s.q_row0 + t, h);
  for (int64_t i = 0; i < dk; ++i) dq_dst[i] = static_cast<scalar_t>(dq[i] * acc_t(p.scale));
}

// Backward by (sequence, KV head) task, each task's query rows cut into a fixed
// number of slices. A slice writes the dq rows of its tokens (all G heads) and
// sums its dk/dv terms into a buffer of its own; the buffers are then added in
// slice order. The slice count comes from the shape alone, never from the thread
// count, so the result is the same bits however many threads run, while a single
// KV head (B = 1, MQA) still keeps every core busy.
template <typename scalar_t>
void attn_bwd(const AttnBwdParams& p) {
  using acc_t = acc_type<scalar_t>;
  const TokenMap tokens = token_map(p);
  const Views<scalar_t> view{p};
  const int64_t dk = p.head_dim_qk, dv = p.head_dim_v;
  const int64_t tasks = p.num_seqs * p.num_heads_kv;
  if (tasks == 0) return;

  auto task_keys = [&](const SeqInfo& s) {
    return p.branch == Branch::kCompressed
               ? std::min(available_key_rows(p, s),
                          num_cmp_blocks(s.len, p.cmp_block_size, p.cmp_stride))
               : s.len;
  };
  int64_t max_keys = 0, max_rows = 0;
  for (const SeqInfo& s : tokens.seqs) {
    max_keys = std::max(max_keys, task_keys(s));
    max_rows = std::max(max_rows, s.q_len);
  }
  // Slices of at least kMinSliceRows query rows (tokens x heads), at most kMaxSlices.
  constexpr int64_t kMaxSlices = 8, kMinSliceRows = 64;
  const int64_t slices = std::clamp<int64_t>(max_rows * p.group / kMinSliceRows, 1, kMaxSlices);
  // dk/dv sum G * T terms per row: double keeps fp32 inputs within the spec's tolerance.
  const int64_t part_elems = std::max<int64_t>(1, max_keys * (dk + dv));
  // Tasks per wave: the wave's slice buffers stay within ~64 MB (or
  // NSA_CPU_BWD_WAVE_BYTES, read per call: the tests force many waves with it).
  const char* budget_env = std::getenv("NSA_CPU_BWD_WAVE_BYTES");
  const int64_t budget = budget_env != nullptr && budget_env[0] != '\0'
                             ? std::max<int64_t>(1, std::atoll(budget_env))
                             : int64_t(64) << 20;
  const int64_t wave = std::clamp<int64_t>(budget / (8 * slices * part_elems), 1, tasks);
  std::vector<double> parts(wave * slices * part_elems);

  for (int64_t task0 = 0; task0 < tasks; task0 += wave) {
    const int64_t wave_tasks = std::min(wave, tasks - task0);
    if (task0 > 0)  // the first wave finds the buffers zeroed by their construction
      std::fill(parts.begin(), parts.begin() + wave_tasks * slices * part_elems, 0.0);
    at::parallel_for(0, wave_tasks * slices, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch;
      for (int64_t j = begin; j < end; ++j) {
        const int64_t item = zigzag(j, wave_tasks * slices);
        const int64_t task = task0 + item / slices, slice = item % slices;
        const SeqInfo& s = tokens.seqs[task / p.num_heads_kv];
        const int64_t kvh = task % p.num_heads_kv;
        double* dk_acc = parts.data() + item * part_elems;
        double* dv_acc = dk_acc + task_keys(s) * dk;
        const int64_t t_begin = s.q_len * slice / slices, t_end = s.q_len * (slice + 1) / slices;
        for (int64_t t = t_begin; t < t_end; ++t)
          for (int64_t h = kvh * p.group; h < (kvh + 1) * p.group; ++h)
            bwd_row(p, view, s, t, h, scratch, dk_acc, dv_acc);
      }
    });
    // dk/dv rows: the slices' sums in slice order.
    at::parallel_for(0, wave_tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const int64_t task = task0 + w;
        const SeqInfo& s = tokens.seqs[task / p.num_heads_kv];
        const int64_t kvh = task % p.num_heads_kv, keys = task_keys(s), row0 = key_row0(p, s);
        const double* first = parts.data() + w * slices * part_elems;
        for (int64_t r = 0; r < keys; ++r) {
          scalar_t* dk_dst = row_ptr(static_cast<scalar_t*>(p.dk), p.dk_batch_stride,
                                     p.dk_row_stride, p.dk_head_stride, s.batch, row0 + r, kvh);
          scalar_t* dv_dst = row_ptr(static_cast<scalar_t*>(p.dv), p.dv_batch_stride,
                                     p.dv_row_stride, p.dv_head_stride, s.batch, row0 + r, kvh);
          for (int64_t i = 0; i < dk; ++i) {
            double sum = 0;
            for (int64_t sl = 0; sl < slices; ++sl) sum += first[sl * part_elems + r * dk + i];
            dk_dst[i] = static_cast<scalar_t>(sum * p.scale);
          }
          for (int64_t c = 0; c < dv; ++c) {
            double sum = 0;
            for (int64_t sl = 0; sl < slices; ++sl)
              sum += first[sl * part_elems + keys * dk + r * dv + c];
            dv_dst[c] = static_cast<scalar_t>(sum);
          }
        }
      }
    });
  }
}

#define NSA_INSTANTIATE_ATTN(T)                    \
  template void attn_fwd<T>(const AttnFwdParams&); \
  template void attn_bwd<T>(const AttnBwdParams&);
NSA_INSTANTIATE_ATTN(float)
NSA_INSTANTIATE_ATTN(double)
NSA_INSTANTIATE_ATTN(c10::Half)
NSA_INSTANTIATE_ATTN(c10::BFloat16)

}  // namespace nsa::cpu
