// mean_compress: x [B, T, H, D] -> [B, rows_out, H, D], output row i of a
// sequence = mean of its rows [i*d, i*d + l). Varlen: sequence m's blocks start at
// packed_cmp_row_begin(m); output rows past the packed blocks are zero.
// fp32 accumulation, output in x's dtype. One CTA per (output row, batch entry).
#include <algorithm>

#include "cuda/common.cuh"

namespace nsa::cuda {

template <class T>
__global__ void __launch_bounds__(128) mean_compress_kernel(const CompressParams p) {
  const int64_t r = blockIdx.x, b = blockIdx.y;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + r * p.out_row_stride;
  // Locate the output row: (batch entry, first token row) or none.
  int64_t batch = b, row_first = -1;
  if (p.cu_seqlens == nullptr) {
    if (r < num_cmp_blocks(p.seqlen, p.cmp_block_size, p.cmp_stride)) row_first = r * p.cmp_stride;
  } else {
    batch = 0;
    int64_t begin = 0;
    for (int64_t m = 0; m < p.num_seqs; ++m) {
      const int64_t len = p.cu_seqlens[m + 1] - p.cu_seqlens[m];
      const int64_t tc = num_cmp_blocks(len, p.cmp_block_size, p.cmp_stride);
      if (r < begin + tc) {
        row_first = p.cu_seqlens[m] + (r - begin) * p.cmp_stride;
        break;
      }
      begin += tc;
    }
  }
  const float inv = 1.f / float(p.cmp_block_size);
  for (int64_t e = threadIdx.x; e < p.num_heads * p.head_dim; e += blockDim.x) {
    const int64_t h = e / p.head_dim, c = e % p.head_dim;
    float acc = 0.f;
    if (row_first >= 0) {
      const T* src = x + batch * p.x_batch_stride + row_first * p.x_row_stride + h * p.x_head_stride + c;
      for (int64_t k = 0; k < p.cmp_block_size; ++k) acc += float(src[k * p.x_row_stride]);
      acc *= inv;
    }
    out[h * p.out_head_stride + c] = T(acc);
  }
}

// update_cmp_cache: batch entry b grows from cache_seqlens[b] to cache_seqlens[b] +
// num_new tokens (clipped to the capacity, p.seqlen); the blocks that complete on the
// way, [num_cmp_blocks(old), num_cmp_blocks(new)) clipped to rows_out, are written
// (the rule of compress_cpu.cpp's update_cmp_cache). The CTA writes block
// num_cmp_blocks(old) + x if it is one of them; fp32 accumulation as above.
// token(r, h) points at token r, head h of entry b: in the cache, or for the rows
// appended in the same launch at their source (append_kv_to_cache's fused update).
template <class T, class Token>
__device__ void write_completed_cmp_block(const CompressParams& p, int64_t b, int64_t x, Token token) {
  const int64_t l = p.cmp_block_size, d = p.cmp_stride;
  const int64_t grown = int64_t(p.cache_seqlens[b]) + p.num_new;
  const int64_t len = grown < p.seqlen ? grown : p.seqlen;
  int64_t old_len = p.cache_seqlens[b];
  old_len = old_len < 0 ? 0 : (old_len > len ? len : old_len);
  const int64_t blk = num_cmp_blocks(old_len, l, d) + x;
  const int64_t end = num_cmp_blocks(len, l, d);
  if (blk >= end || blk >= p.rows_out) return;  // uniform over the CTA
  // Sources: token rows [blk * d, blk * d + l), all < len <= capacity.
  T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + blk * p.out_row_stride;
  const float inv = 1.f / float(l);
  for (int64_t e = threadIdx.x; e < p.num_heads * p.head_dim; e += blockDim.x) {
    const int64_t h = e / p.head_dim, c = e % p.head_dim;
    float acc = 0.f;
    for (int64_t r = blk * d; r < blk * d + l; ++r) acc += float(token(r, h)[c]);
    out[h * p.out_head_stride + c] = T(acc * inv);
  }
}

template <class T>
__global__ void __launch_bounds__(128) update_cmp_cache_kernel(const CompressParams p) {
  const int64_t b = blockIdx.y;
  const T* x = static_cast<const T*>(p.x) + b * p.x_batch_stride;
  write_completed_cmp_block<T>(p, b, blockIdx.x, [&](int64_t r, int64_t h) {
    return x + r * p.x_row_stride + h * p.x_head_stride;
  });
}

// append_kv_to_cache: CTA (i, b, s) with i < num_new copies new token i of batch
// entry b (all heads) to row cache_seqlens[b] + i of cache s (k, v), or nothing when
// that row is outside the cache. With the compressed caches, CTA (num_new + x, b, s)
// writes completed block x of cache s as update_cmp_cache_kernel would after the
// append. It reads rows >= cache_seqlens[b] from the new tokens: other CTAs of this
// launch are writing them to the cache.
template <class T>
__global__ void __launch_bounds__(128) append_kv_to_cache_kernel(const CacheAppendParams p) {
  const int64_t i = blockIdx.x, b = blockIdx.y;
  const CacheAppendParams::Side& x = p.sides[blockIdx.z];
  const int64_t first_new = p.cache_seqlens[b];
  if (i >= p.num_new) {
    const CompressParams& cmp = p.cmp[blockIdx.z];
    const T* cached = static_cast<const T*>(cmp.x) + b * cmp.x_batch_stride;
    const T* fresh = static_cast<const T*>(x.src) + b * x.src_batch_stride;
    write_completed_cmp_block<T>(cmp, b, i - p.num_new, [&](int64_t r, int64_t h) {
      return r < first_new ? cached + r * cmp.x_row_stride + h * cmp.x_head_stride
                           : fresh + (r - first_new) * x.src_row_stride + h * x.src_head_stride;
    });
    return;
  }
  const int64_t row = first_new + i;
  if (row < 0 || row >= p.capacity) return;  // uniform over the CTA
  const T* src = static_cast<const T*>(x.src) + b * x.src_batch_stride + i * x.src_row_stride;
  T* dst = static_cast<T*>(x.dst) + b * x.dst_batch_stride + row * x.dst_row_stride;
  for (int64_t e = threadIdx.x; e < p.num_heads * x.head_dim; e += blockDim.x) {
    const int64_t h = e / x.head_dim, c = e % x.head_dim;
    dst[h * x.dst_head_stride + c] = src[h * x.src_head_stride + c];
  }
}

// Launches `kernel(tag)` (a lambda that instantiates the kernel for the element
// type of `tag`) on a (rows, batch) grid of 128-thread CTAs.
template <class Launch>
void launch_rows(const char* what, int64_t rows, int64_t batch, DType dtype, Launch launch) {
  if (rows > INT32_MAX || batch > 65535)
    throw std::runtime_error(std::string("nsa_cuda: ") + what + ": problem too large for the grid");
  const dim3 grid{unsigned(rows), unsigned(batch)};
  if (dtype == DType::kFp16)
    launch(cutlass::half_t{}, grid);
  else
    launch(cutlass::bfloat16_t{}, grid);
  check_launch(what);
}

// Blocks completing while a sequence grows by num_new tokens: their ends i*d + l - 1
// are d apart, so at most ceil(num_new / d) of them (+1 spare).
inline int64_t max_completed_blocks(const CompressParams& p) {
  return std::min<int64_t>((p.num_new + p.cmp_stride - 1) / p.cmp_stride + 1, p.rows_out);
}

void run_update_cmp_cache(const CompressParams& p, DType dtype, cudaStream_t stream) {
  if (p.rows_out == 0 || p.batch == 0 || p.num_new <= 0 || p.num_heads * p.head_dim == 0) return;
  const int64_t max_blocks = max_completed_blocks(p);
  launch_rows("update_cmp_cache", max_blocks, p.batch, dtype, [&](auto tag, const dim3& grid) {
    NSA_LAUNCH(grid, 128, 0, stream, update_cmp_cache_kernel<decltype(tag)>)(p);
  });
}

void run_append_kv_to_cache(const CacheAppendParams& p, DType dtype, cudaStream_t stream) {
  if (p.batch == 0 || p.num_new <= 0 || p.capacity == 0 || p.num_heads == 0) return;
  // grid z: the k cache, then the v cache; x: the new rows, then the compressed blocks
  const bool with_cmp = p.cmp[0].out != nullptr && p.cmp[1].out != nullptr;
  const int64_t cmp_ctas = with_cmp ? std::max(max_completed_blocks(p.cmp[0]), max_completed_blocks(p.cmp[1])) : 0;
  launch_rows("append_kv_to_cache", p.num_new + cmp_ctas, p.batch, dtype, [&](auto tag, dim3 grid) {
    grid.z = 2;
    NSA_LAUNCH(grid, 128, 0, stream, append_kv_to_cache_kernel<decltype(tag)>)(p);
  });
}

void run_mean_compress(const CompressParams& p, DType dtype, cudaStream_t stream) {
  if (p.rows_out == 0 || p.batch == 0 || p.num_heads * p.head_dim == 0) return;
  launch_rows("mean_compress", p.rows_out, p.batch, dtype, [&](auto tag, const dim3& grid) {
    NSA_LAUNCH(grid, 128, 0, stream, mean_compress_kernel<decltype(tag)>)(p);
  });
}

// Gradient: token r of a sequence receives d out[i] / l from every block i with
// i*d <= r < i*d + l (i < Tc(len)). CompressParams roles swapped: x <- dx
// (written), out <- d out (read). One CTA per (token row, batch entry); rows
// owned by no sequence (varlen padding) are written as zero.
template <class T>
__global__ void __launch_bounds__(128) mean_compress_bwd_kernel(const CompressParams p) {
  const int64_t r = blockIdx.x, b = blockIdx.y;
  const int64_t l = p.cmp_block_size, d = p.cmp_stride;
  T* dx = static_cast<T*>(const_cast<void*>(p.x)) + b * p.x_batch_stride + r * p.x_row_stride;
  const T* g = static_cast<const T*>(p.out) + b * p.out_batch_stride;
  // The sequence of row r: its length, r's position in it and its first block row.
  int64_t t = r, len = p.seqlen, cmp_row0 = 0;
  if (p.cu_seqlens != nullptr) {
    len = 0;  // padding row unless a sequence holds it
    for (int64_t m = 0; m < p.num_seqs; ++m) {
      const int64_t begin = p.cu_seqlens[m], end = p.cu_seqlens[m + 1];
      if (r >= begin && r < end) {
        t = r - begin, len = end - begin;
        break;
      }
      cmp_row0 += num_cmp_blocks(end - begin, l, d);
    }
  }
  int64_t first = 0, last = 0;  // blocks [first, last)
  if (t < len) {
    first = t - l + 1 > 0 ? (t - l + 1 + d - 1) / d : 0;
    last = min(t / d + 1, num_cmp_blocks(len, l, d));
  }
  const float inv = 1.f / float(l);
  for (int64_t e = threadIdx.x; e < p.num_heads * p.head_dim; e += blockDim.x) {
    const int64_t h = e / p.head_dim, c = e % p.head_dim;
    float acc = 0.f;
    for (int64_t i = first; i < last; ++i)
      acc += float(g[(cmp_row0 + i) * p.out_row_stride + h * p.out_head_stride + c]);
    dx[h * p.x_head_stride + c] = T(acc * inv);
  }
}

void run_mean_compress_bwd(const CompressParams& p, DType dtype, cudaStream_t stream) {
  if (p.seqlen == 0 || p.batch == 0 || p.num_heads * p.head_dim == 0) return;
  launch_rows("mean_compress_bwd", p.seqlen, p.batch, dtype, [&](auto tag, const dim3& grid) {
    NSA_LAUNCH(grid, 128, 0, stream, mean_compress_bwd_kernel<decltype(tag)>)(p);
  });
}

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("nsa_cuda: launching ") + what + " failed: " +
                             cudaGetErrorString(e));
}

}  // namespace nsa::cuda
