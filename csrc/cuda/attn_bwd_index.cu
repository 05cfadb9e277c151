// Inverse index of the selected branch (block -> tokens that selected it),
// step 1: the keys (launch.h, run_slc_inverse_keys). The caller sorts them
// (at::sort: equal keys are equal values, so the result is deterministic) and
// the dk/dv kernel binary-searches the run of its block (q_schedule.cuh).
#include <climits>

#include "cuda/common.cuh"

namespace nsa::cuda {

__global__ void __launch_bounds__(256) slc_inverse_keys_kernel(const AttnBwdParams p, int64_t* keys,
                                                                       int64_t total) {
  const int64_t n = p.slc_num_blocks, hkv_count = p.num_heads_kv, rows = p.k_rows;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t slot = idx % n;
    const int64_t h = (idx / n) % hkv_count;
    const int64_t row = (idx / (n * hkv_count)) % rows;
    const int64_t b = idx / (n * hkv_count * rows);
    // The sequence of `row`: batch mode row0 = 0; varlen: the last m with
    // cu_seqlens[m] <= row (rows past cu_seqlens[num_seqs] belong to none).
    int64_t row0 = 0;
    bool ok = true;
    if (p.cu_seqlens != nullptr) {
      ok = row < p.cu_seqlens[p.num_seqs];
      int64_t lo = 0, hi = p.num_seqs;  // invariant: cu[lo] <= row < cu[hi]
      while (ok && hi - lo > 1) {
        const int64_t mid = (lo + hi) / 2;
        if (p.cu_seqlens[mid] <= row) lo = mid;
        else hi = mid;
      }
      row0 = p.cu_seqlens[lo];
    } else {
      ok = row < p.seqlen;
    }
    int64_t key = INT64_MAX;
    if (ok) {
      const int64_t t = row - row0;
      const int64_t j = p.block_indices[b * p.bi_batch_stride + row * p.bi_row_stride +
                                        h * p.bi_head_stride + slot];
      // j * l' <= t also bounds j below num_slc_blocks(len).
      if (j >= 0 && j * p.slc_block_size <= t)
        key = ((b * hkv_count + h) * rows + row0 + j * p.slc_block_size) * rows + row;
    }
    keys[idx] = key;
  }
}

void run_slc_inverse_keys(const AttnBwdParams& p, int64_t* keys, cudaStream_t stream) {
  const int64_t total = slc_inverse_key_count(p);
  if (total == 0) return;
  const int64_t blocks = std::min<int64_t>((total + 255) / 256, 65535 * 16);
  NSA_LAUNCH(unsigned(blocks), 256, 0, stream, slc_inverse_keys_kernel)(p, keys, total);
  check_launch("selected_attn_bwd (inverse index)");
}

}  // namespace nsa::cuda
