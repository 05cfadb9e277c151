// ctest: the shared index rules (csrc/include/nsa/rules.h) against the spec's
// definitions, written here the slow, obvious way.
#include <cstdio>
#include <cstdlib>
#include <initializer_list>

#include "nsa/rules.h"

static int failures = 0;
#define EXPECT_EQ(a, b)                                                                   \
  do {                                                                                    \
    const auto va = (a);                                                                  \
    const auto vb = (b);                                                                  \
    if (!(va == vb)) {                                                                    \
      std::printf("%s:%d: %s == %s failed (%g vs %g)\n", __FILE__, __LINE__, #a, #b,      \
                  double(va), double(vb));                                                \
      ++failures;                                                                         \
    }                                                                                     \
  } while (0)

using namespace nsa;

// Tc(T) by counting complete blocks one by one.
static int64_t count_blocks(int64_t T, int64_t l, int64_t d) {
  int64_t n = 0;
  for (int64_t i = 0; i * d + l <= T; ++i) ++n;
  return n;
}

static void test_compressed_counts() {
  const int64_t settings[][2] = {{32, 16}, {64, 64}, {16, 8}, {4, 2}, {8, 8}};
  for (auto [l, d] : settings) {
    for (int64_t T = 0; T < 300; ++T) {
      EXPECT_EQ(num_cmp_blocks(T, l, d), count_blocks(T, l, d));
      // Query t sees the blocks that ended by t: exactly the complete blocks of t+1 tokens.
      EXPECT_EQ(num_visible_cmp_blocks(T, l, d), count_blocks(T + 1, l, d));
      EXPECT_EQ(num_cmp_blocks(T, l, d) <= packed_cmp_rows_bound(T, d), true);
    }
  }
  EXPECT_EQ(num_visible_cmp_blocks(30, 32, 16), 0);
  EXPECT_EQ(num_visible_cmp_blocks(31, 32, 16), 1);
  EXPECT_EQ(num_visible_cmp_blocks(47, 32, 16), 2);
}

static void test_window() {
  for (int64_t w = 1; w < 40; ++w)
    for (int64_t t = 0; t < 100; ++t) {
      const int64_t begin = window_begin(t, w);
      EXPECT_EQ(t + 1 - begin, t + 1 < w ? t + 1 : w);  // min(w, t+1) keys
    }
}

static void test_overlap_weights() {
  // Paper settings: a selection block is overlapped by 5 compressed blocks with
  // weights 1, 2, 2, 2, 1 (in units of d).
  const int64_t l = 32, d = 16, lp = 64;
  const int64_t j = 3;
  float w[8];
  int n = 0;
  for (int64_t i = 0; i < 40; ++i) {
    const float wij = cmp_slc_overlap_weight(i, j, l, d, lp);
    if (wij > 0) w[n++] = wij;
    // The overlapped range helpers agree with the weights.
    const bool in_range = first_overlapped_slc_block(i, d, lp) <= j &&
                          j <= last_overlapped_slc_block(i, l, d, lp);
    EXPECT_EQ(in_range, wij > 0);
  }
  EXPECT_EQ(n, 5);
  const float expected[] = {1, 2, 2, 2, 1};
  for (int a = 0; a < 5 && a < n; ++a) EXPECT_EQ(w[a], expected[a]);
  // The inverse ranges (rows overlapping a block) agree with the weights, also
  // for settings the API rejects (d not dividing l or l').
  for (int64_t l2 : {1, 3, 16, 32, 64, 100})
    for (int64_t d2 : {1, 2, 5, 16, 64})
      for (int64_t lp2 : {1, 7, 16, 64, 128})
        for (int64_t jj = 0; jj < 12; ++jj) {
          const int64_t lo = first_overlapping_cmp_row(jj, l2, d2, lp2);
          const int64_t hi = last_overlapping_cmp_row(jj, d2, lp2);
          for (int64_t i = 0; i <= hi + 3; ++i)
            EXPECT_EQ(lo <= i && i <= hi, cmp_slc_overlap_weight(i, jj, l2, d2, lp2) > 0);
        }
  // l = d = l': the identity.
  for (int64_t i = 0; i < 10; ++i)
    for (int64_t jj = 0; jj < 10; ++jj)
      EXPECT_EQ(cmp_slc_overlap_weight(i, jj, 64, 64, 64), i == jj ? 1.f : 0.f);
}

static void test_selection_rules() {
  // J = t // l'; forced: j < n_init and J - n_local < j <= J.
  EXPECT_EQ(last_candidate_slc_block(63, 64), 0);
  EXPECT_EQ(last_candidate_slc_block(64, 64), 1);
  const int64_t J = 10;
  for (int64_t j = 0; j <= J + 2; ++j) {
    const bool forced = j <= J && (j < 1 || j > J - 2);
    EXPECT_EQ(is_forced_slc_block(j, J, 1, 2), forced);
  }
  EXPECT_EQ(slc_ranks_before(1.0f, 5, 0.5f, 1), true);
  EXPECT_EQ(slc_ranks_before(0.5f, 1, 0.5f, 5), true);   // tie: smaller j first
  EXPECT_EQ(slc_ranks_before(0.5f, 5, 0.5f, 1), false);
  // Selected block end: the part of block j that query t sees.
  EXPECT_EQ(selected_block_end(0, 10, 64), 11);
  EXPECT_EQ(selected_block_end(0, 100, 64), 64);
  EXPECT_EQ(selected_block_end(2, 100, 64) <= 2 * 64, true);  // a future block is empty
  EXPECT_EQ(num_slc_blocks(129, 64), 3);
}

static void test_varlen_offsets() {
  const int32_t cu[] = {0, 5, 100, 101, 300};
  int64_t row = 0;
  for (int64_t s = 0; s < 4; ++s) {
    EXPECT_EQ(packed_cmp_row_begin(cu, s, 32, 16), row);
    const SeqInfo info = seq_info(cu, s, 0, 32, 16);
    EXPECT_EQ(info.row0, cu[s]);
    EXPECT_EQ(info.len, cu[s + 1] - cu[s]);
    EXPECT_EQ(info.cmp_row0, row);
    row += num_cmp_blocks(cu[s + 1] - cu[s], 32, 16);
  }
  const SeqInfo batch = seq_info(nullptr, 3, 77, 32, 16);
  EXPECT_EQ(batch.batch, 3);
  EXPECT_EQ(batch.len, 77);
}

int main() {
  test_compressed_counts();
  test_window();
  test_overlap_weights();
  test_selection_rules();
  test_varlen_offsets();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("all index-rule checks passed\n");
  return EXIT_SUCCESS;
}
