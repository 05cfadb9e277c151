// Host check of csrc/cuda/decode_plan.h: the shared-memory carve-ups the decode
// kernels use (decode_attn_smem_layout, select_score_smem_layout) and
// index bounds the plan promises: smem end <= the planned size and 16-byte
// alignment of every cp.async / float4 target; a row tile's tokens <= the plan's
// bound (and < 32: the selected branch's membership bitmask); the score CTA's
// conservative compressed-row range holds every overlapping row and fits
// select_cta_cmp_rows; select_max_tokens is the largest T with Tc(T) <= rows and
// every valid token's last candidate J is < the score width. Plain C++, no GPU:
//   g++ -std=c++20 -O1 -I csrc/include -I csrc bench/decode_plan_check.cpp -o /tmp/dpc && /tmp/dpc
#include <cstdlib>
#include <cstdio>
#include <cstdint>
#include "cuda/decode_plan.h"
using namespace nsa; using namespace nsa::cuda;

// Not assert(): the check must hold with -DNDEBUG too.
#define CHECK(c) \
  do { \
    if (!(c)) { \
      std::fprintf(stderr, "decode_plan_check: %s failed (line %d)\n", #c, __LINE__); \
      std::exit(1); \
    } \
  } while (0)

int main() {
  long checks = 0;
  const int dims[3][2] = {{64, 64}, {128, 128}, {192, 128}};
  for (auto [dk, dv] : dims)
    for (int br = 0; br < 3; ++br)
      for (int64_t G : {1, 2, 3, 4, 5, 7, 8, 16, 17, 32, 64})
        for (int64_t S = 1; S <= 8; ++S)
          for (int64_t n : {1, 2, 16, 33, 256}) {
            AttnFwdParams p{};
            p.branch = br == 0 ? Branch::kCompressed : br == 1 ? Branch::kSelected : Branch::kWindow;
            p.group = G; p.seqlen = S; p.slc_num_blocks = n; p.slc_block_size = 64;
            const int64_t plan = decode_attn_smem(p, dk, dv);
            const int64_t rows_total = S * G;
            for (int64_t r0 = 0; r0 < rows_total; r0 += kDecodeRows) {
              const int64_t rows_here = std::min<int64_t>(kDecodeRows, rows_total - r0);
              const int64_t tile_tokens = (r0 + rows_here - 1) / G - r0 / G + 1;
              CHECK(tile_tokens <= decode_tile_tokens(p) && tile_tokens <= 31);  // sMember bits
              // The carve-up decode_attn.cuh takes (decode_attn_smem_layout): every
              // region 16-byte aligned (cp.async, ldmatrix rows) and in order.
              const DecodeAttnSmem m = decode_attn_smem_layout(p, tile_tokens, dk, dv);
              const int64_t regions[] = {m.q, m.k, m.v, m.s, m.p, m.scale, m.lo, m.hi,
                                         m.tok, m.count, m.cand, m.end};
              for (size_t a = 0; a + 1 < sizeof(regions) / sizeof(regions[0]); ++a)
                CHECK(regions[a] <= regions[a + 1]);
              CHECK(m.q % 16 == 0 && m.k % 16 == 0 && m.v % 16 == 0 && m.s % 16 == 0 && m.p % 16 == 0);
              CHECK(((dk + kDecodePad) * 2) % 16 == 0 && ((dv + kDecodePad) * 2) % 16 == 0);
              CHECK(((kDecodeKeys + kDecodePad) * 2) % 16 == 0);  // sP rows: ldmatrix
              // The sizes of the regions the kernel indexes.
              CHECK(m.k - m.q == int64_t(kDecodeRows) * (dk + kDecodePad) * 2);
              CHECK(m.v - m.k == int64_t(kDecodeStages) * kDecodeKeys * (dk + kDecodePad) * 2);
              CHECK(m.s - m.v == int64_t(kDecodeStages) * kDecodeKeys * (dv + kDecodePad) * 2);
              CHECK(m.p - m.s >= int64_t(kDecodeRows) * (kDecodeKeys + kDecodePad) * 4);
              CHECK(m.p - m.s >= 2 * kDecodeRows * 4);  // the epilogue's sSum, sMax
              CHECK(m.cand - m.count >= 4);
              if (br == 1) CHECK(m.end - m.cand >= 4 * 4 * tile_tokens * n);  // sCand, sKeep, sUnion, sMember
              const int64_t end = m.end;
              CHECK(end <= plan && plan % 16 == 0);
              ++checks;
            }
          }
  // Score CTAs: the conservative row range fits select_cta_cmp_rows.
  for (int64_t d : {1, 2, 4, 8, 16, 32, 64})
    for (int64_t l = d; l <= 128; l += d)
      for (int64_t lp = d; lp <= 256; lp += d) {
        SelectParams p{};
        p.cmp_block_size = l; p.cmp_stride = d; p.slc_block_size = lp;
        const int64_t max_rows = select_cta_cmp_rows(p);
        for (int64_t j0 = 0; j0 < 40 * kSelectBlocksPerCta; j0 += kSelectBlocksPerCta) {
          const int64_t j1 = j0 + kSelectBlocksPerCta;
          const int64_t lo = j0 * lp - l, i_lo = lo > 0 ? lo / d : 0, i_hi = (j1 * lp) / d;
          CHECK(i_hi - i_lo + 1 <= max_rows);
          // exactness of the range: every row overlapping [j0, j1) lies in [i_lo, i_hi]
          for (int64_t i = 0; i <= i_hi + l / d + 2; ++i) {
            const bool overlaps = last_overlapped_slc_block(i, l, d, lp) >= j0 &&
                                  first_overlapped_slc_block(i, d, lp) < j1;
            if (overlaps) CHECK(i >= i_lo && i <= i_hi);
          }
          ++checks;
        }
        for (int dk : {64, 128, 192}) {
          // decode_select_scores' carve-up (select_score_smem_layout): whole MMA passes
          // of rows, 16-byte aligned cp.async / ldmatrix regions, room for every region.
          // With the attention's kept scores (cmp_scores) the K and q regions are empty.
          for (const bool kept : {false, true}) {
            SelectParams pk = p;
            pk.cmp_scores = kept ? reinterpret_cast<const float*>(16) : nullptr;
            const SelectScoreSmem m = select_score_smem_layout(pk, dk);
            const int64_t rows = select_cta_cmp_rows_padded(pk);
            CHECK(rows >= max_rows && rows % kDecodeKeys == 0 && rows - max_rows < kDecodeKeys);
            CHECK(m.k % 16 == 0 && m.q % 16 == 0 && m.p % 16 == 0);
            CHECK(m.q - m.k == (kept ? 0 : rows * (dk + kDecodePad) * 2));
            CHECK(m.p - m.q == (kept ? 0 : int64_t(kSelectHeadsPerPass) * (dk + kDecodePad) * 2));
            CHECK(m.p_stride >= rows && m.psum - m.p == int64_t(kSelectHeadsPerPass) * m.p_stride * 4);
            CHECK(m.lse - m.psum >= rows * 4 && m.end - m.lse >= kSelectHeadsPerPass * 4);
            CHECK(m.end <= select_score_smem(pk, dk));
          }
        }
      }
  // Score width: every candidate J of a valid token is < W.
  for (int64_t d : {4, 8, 16}) for (int64_t l : {d, 2 * d, 4 * d}) for (int64_t lp : {d, 4 * d, int64_t(64)})
    for (int64_t rows = 0; rows < 300; ++rows) {
      SelectParams p{}; p.cmp_block_size = l; p.cmp_stride = d; p.slc_block_size = lp; p.k_rows = rows;
      const int64_t cap = select_max_tokens(rows, l, d);
      CHECK(num_cmp_blocks(cap, l, d) <= std::max<int64_t>(rows, 0));
      CHECK(num_cmp_blocks(cap + 1, l, d) > rows);  // the largest such T
      if (cap > 0) CHECK(last_candidate_slc_block(cap - 1, lp) < select_score_width(p));
      ++checks;
    }
  printf("decode plan host checks OK (%ld)\n", checks);
}
