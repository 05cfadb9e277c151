// Which keys a query row visits, per branch, as a list of contiguous key
// ranges local to the sequence. The CPU mainloop (attention_cpu.cpp) walks
// these ranges; the CUDA kernels apply the same rules per tile.
#pragma once

#include <algorithm>
#include <cstdint>

#include "nsa/params.h"
#include "nsa/rules.h"

namespace nsa::cpu {

struct KeyRange {
  int64_t begin, end;  // [begin, end), rows local to the sequence's keys
};

// Rows of k/v that exist for this sequence: compressed rows are bounded by the
// rows the caller passed, so a short k_cmp is never read out of bounds.
inline int64_t available_key_rows(const AttnFwdParams& p, const SeqInfo& s) {
  if (p.branch == Branch::kCompressed) return std::max<int64_t>(0, p.k_rows - s.cmp_row0);
  return s.len;
}

// Calls f(KeyRange) for each range query row `i` (position t = q_pos0 + i) of
// head `h` visits, ascending within a range; selected blocks are visited once
// each, in slot order. A row before position 0 (decode only) visits nothing.
template <typename F>
inline void for_each_key_range(const AttnFwdParams& p, const SeqInfo& s, int64_t i, int64_t h,
                               F&& f) {
  const int64_t t = s.q_pos0 + i;
  if (t < 0) return;
  const int64_t avail = available_key_rows(p, s);
  switch (p.branch) {
    case Branch::kCompressed: {
      const int64_t n = std::min(num_visible_cmp_blocks(t, p.cmp_block_size, p.cmp_stride), avail);
      if (n > 0) f(KeyRange{0, n});
      break;
    }
    case Branch::kWindow:
      f(KeyRange{window_begin(t, p.window_size), t + 1});
      break;
    case Branch::kSelected: {
      const int32_t* slots = p.block_indices + s.batch * p.bi_batch_stride +
                             (s.q_row0 + i) * p.bi_row_stride + (h / p.group) * p.bi_head_stride;
      const int64_t num_blocks = num_slc_blocks(s.len, p.slc_block_size);
      for (int64_t a = 0; a < p.slc_num_blocks; ++a) {
        const int64_t j = slots[a];
        if (j < 0 || j >= num_blocks) continue;
        bool seen = false;  // a block listed twice still counts once
        for (int64_t b = 0; b < a && !seen; ++b) seen = slots[b] == j;
        if (seen) continue;
        const int64_t begin = j * p.slc_block_size;
        const int64_t end = selected_block_end(j, t, p.slc_block_size);
        if (begin < end) f(KeyRange{begin, end});
      }
      break;
    }
  }
}

// First row of this sequence's keys in the k/v tensors.
inline int64_t key_row0(const AttnFwdParams& p, const SeqInfo& s) {
  return p.branch == Branch::kCompressed ? s.cmp_row0 : s.row0;
}

}  // namespace nsa::cpu
