// The top-n step of block selection (NSA_SPEC "Block selection"), for one query
// row by one warp, shared by the prefill kernels (select_blocks*.cuh) and the
// decode kernel (decode_select.cuh) so that both pick the same blocks from the
// same scores: forced blocks first, then the top scores (slc_ranks_before: ties to
// the smaller j, NaN never taken), the chosen set written ascending, -1 padded.
#pragma once

#include <climits>

#include "cuda/common.cuh"

namespace nsa::cuda {

// Candidates 0..J of a row: `score[j]` for j <= J, `taken` at least J / 32 + 1
// words the warp may overwrite (shared memory), `out` the row's n slots. All 32
// lanes call it.
__device__ __forceinline__ void select_top_n_row(const SelectParams& p, int64_t J, const float* score,
                                                 uint32_t* taken, int32_t* out, int lane) {
  const int64_t n = p.slc_num_blocks;
  const int nwords = int(J / 32) + 1;
  const bool take_all = J + 1 <= n;
  int64_t count = 0;
  for (int w = 0; w < nwords; ++w) {
    const int64_t j = int64_t(w) * 32 + lane;
    const bool forced = j <= J && (take_all || is_forced_slc_block(j, J, p.slc_init_blocks, p.slc_local_blocks));
    const uint32_t bits = __ballot_sync(0xffffffffu, forced);
    if (lane == 0) taken[w] = bits;
    count += __popc(bits);
  }
  __syncwarp();
  const int64_t remaining = min(n, J + 1) - count;
  // Lane l owns the candidates j = l + 32 w. It keeps its kCache best free ones
  // (not forced, not yet chosen, not NaN), best first; each round the warp takes
  // the best of the lanes' heads, and only the winning lane moves on, rescanning
  // its candidates when its cache runs dry. A round is five shuffle steps instead of
  // a scan of all J + 1 scores (13 rounds over 1024 scores at 64k, the paper's n).
  constexpr int kCache = 4;
  float cache_s[kCache];
  int cache_j[kCache];  // INT_MAX: empty
  auto refill = [&]() {
#pragma unroll
    for (int c = 0; c < kCache; ++c) cache_s[c] = 0.f, cache_j[c] = INT_MAX;
    for (int j = lane; j <= J; j += 32) {
      if ((taken[j / 32] >> lane) & 1u) continue;
      const float s = score[j];
      if (!(s == s)) continue;
      // j ascends, so a tie with the last entry keeps the entry.
      if (cache_j[kCache - 1] != INT_MAX && !slc_ranks_before(s, j, cache_s[kCache - 1], cache_j[kCache - 1]))
        continue;
      cache_s[kCache - 1] = s, cache_j[kCache - 1] = j;
#pragma unroll
      for (int c = kCache - 1; c > 0; --c) {
        if (cache_j[c - 1] != INT_MAX && !slc_ranks_before(cache_s[c], cache_j[c], cache_s[c - 1], cache_j[c - 1]))
          break;
        const float ts = cache_s[c];
        const int tj = cache_j[c];
        cache_s[c] = cache_s[c - 1], cache_j[c] = cache_j[c - 1];
        cache_s[c - 1] = ts, cache_j[c - 1] = tj;
      }
    }
  };
  refill();
  for (int64_t it = 0; it < remaining; ++it) {
    float best_s = cache_s[0];
    int best_j = cache_j[0];
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      const float os = __shfl_xor_sync(0xffffffffu, best_s, off);
      const int oj = __shfl_xor_sync(0xffffffffu, best_j, off);
      if (oj != INT_MAX && (best_j == INT_MAX || slc_ranks_before(os, oj, best_s, best_j)))
        best_s = os, best_j = oj;
    }
    if (best_j == INT_MAX) break;  // only NaN scores left
    if (best_j % 32 == lane) {     // this lane's head won: mark it, move on
      taken[best_j / 32] |= 1u << lane;
#pragma unroll
      for (int c = 0; c + 1 < kCache; ++c) cache_s[c] = cache_s[c + 1], cache_j[c] = cache_j[c + 1];
      cache_s[kCache - 1] = 0.f, cache_j[kCache - 1] = INT_MAX;
      if (cache_j[0] == INT_MAX) refill();
    }
    __syncwarp();
  }
  __syncwarp();
  int64_t pos = 0;
  for (int w = 0; w < nwords; ++w) {
    const uint32_t bits = taken[w];
    const int64_t slot = pos + __popc(bits & ((1u << lane) - 1u));
    if (((bits >> lane) & 1u) && slot < n) out[slot] = int32_t(w * 32 + lane);
    pos += __popc(bits);
  }
  for (int64_t s = pos + lane; s < n; s += 32) out[s] = -1;
}

}  // namespace nsa::cuda
