// Host-only check of the CUDA backward's CuTe fragment algebra (no GPU needed):
// for every GEMM of attn_bwd_dq_kernel and attn_bwd_dkdv_kernel, builds the smem
// tensors, tiled copies and fragments exactly as the kernels do (the real
// AttnBwdTraits), fills smem with integers, then emulates each ldmatrix (.trans or
// not) and each mma.sync m16n8k16 from the PTX ISA's per-lane fragment tables (not
// from CuTe's traits) and compares every accumulator element, at the coordinate
// CuTe's partition_C (and the kernels' acc_rowcol view) gives it, with a plain
// float64 matrix product. Covers the transposed (ldmatrix.trans) views sKt, sQt,
// sdOt, the register A operands P^T / dS^T (acc_as_a_operand), the epilogue's
// partition_C staging and the 16-byte chunks of load_rows_async.
//
//   nvcc -std=c++20 --expt-relaxed-constexpr -arch=sm_80 -I csrc/include -I csrc \
//     -I <cutlass>/include bench/bwd_layout_check.cu -o /tmp/bwd_layout_check && /tmp/bwd_layout_check
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/attn_bwd.cuh"

using namespace cute;
using namespace nsa::cuda;

static int g_fail = 0;
#define CHECK(cond, ...)                                      \
  do {                                                        \
    if (!(cond)) {                                            \
      if (g_fail++ < 20) {                                    \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__);      \
        std::printf(__VA_ARGS__);                             \
        std::printf("\n");                                    \
      }                                                       \
    }                                                         \
  } while (0)

constexpr int kThreads = 128;
// Self-test of this checker: -DNSA_MUTATE emulates the B copies of the register-A
// GEMMs as plain (non-.trans) ldmatrix, which must be reported as mismatches.
#ifdef NSA_MUTATE
constexpr bool kTransposedB = false;
#else
constexpr bool kTransposedB = true;
#endif

// One smem arena: element addresses come from the kernels' CuTe tensors, the values
// live in a parallel float64 array indexed by element offset.
template <class Element>
struct Smem {
  alignas(1024) static inline Element buf[1 << 17];
  static inline double val[1 << 17];
  static Element* base() { return buf; }
  static double& at(const Element* p) {
    const long off = p - buf;
    if (off < 0 || off >= (1 << 17)) { std::printf("smem address out of range\n"); std::exit(2); }
    return val[off];
  }
};

// Per-thread register storage (float64 values) for fragments.
struct Regs {
  std::vector<double> r[kThreads];
  explicit Regs(int n) { for (auto& x : r) x.assign(n, 0.0); }
};

// ldmatrix .x4 (optionally .trans) for every warp and every atom call of
// copy(tiled_copy, src, dst): src_of(tid)/dst_of(tid) give the thread's partitioned
// source (smem) and destination (register view) tensors.
template <class Element, class SrcOf, class DstOf>
void emu_ldmatrix(bool trans, const SrcOf& src_of, const DstOf& dst_of) {
  using S = Smem<Element>;
  for (int w = 0; w < kThreads / 32; ++w) {
    auto s0 = src_of(w * 32);
    constexpr int R = decltype(rank(s0))::value;
    auto s0g = group_modes<1, R>(s0);
    const int calls = size<1>(s0g);
    for (int i = 0; i < calls; ++i) {
      double M[4][8][8];
      for (int lane = 0; lane < 32; ++lane) {
        auto s = group_modes<1, R>(src_of(w * 32 + lane));
        CHECK(size<0>(s) == 8, "ldmatrix src has %d values per lane", int(size<0>(s)));
        const Element* p0 = &s(0, i);
        for (int v = 0; v < 8; ++v) CHECK(&s(v, i) == p0 + v, "ldmatrix row not contiguous");
        CHECK((reinterpret_cast<uintptr_t>(p0) & 15) == 0, "ldmatrix row not 16-byte aligned");
        for (int e = 0; e < 8; ++e) M[lane / 8][lane % 8][e] = S::at(p0 + e);
      }
      for (int lane = 0; lane < 32; ++lane) {
        auto d = dst_of(w * 32 + lane);
        constexpr int RD = decltype(rank(d))::value;
        auto dg = group_modes<1, RD>(d);
        CHECK(size<0>(dg) == 8, "ldmatrix dst has %d values per lane", int(size<0>(dg)));
        for (int q = 0; q < 4; ++q) {
          CHECK(&dg(2 * q + 1, i) == &dg(2 * q, i) + 1, "ldmatrix dst register pair not adjacent");
          for (int e = 0; e < 2; ++e) {
            // PTX: lane j gets row j/4, cols 2(j%4)+e of matrix q; .trans the transpose.
            dg(2 * q + e, i) = trans ? M[q][2 * (lane % 4) + e][lane / 4]
                                     : M[q][lane / 4][2 * (lane % 4) + e];
          }
        }
      }
    }
  }
}

// gemm(mma, A(V, M), B(V, N), C(V, M, N)) for every warp, mma.sync m16n8k16 per
// the PTX fragment tables (groupID = lane / 4, tig = lane % 4).
template <class AOf, class BOf, class COf>
void emu_mma(const AOf& a_of, const BOf& b_of, const COf& c_of) {
  for (int w = 0; w < kThreads / 32; ++w) {
    auto a0 = a_of(w * 32);
    auto b0 = b_of(w * 32);
    const int MM = size<1>(a0), NN = size<1>(b0);
    for (int m = 0; m < MM; ++m) {
      for (int n = 0; n < NN; ++n) {
        double A[16][16], B[16][8], C[16][8];
        for (int lane = 0; lane < 32; ++lane) {
          auto a = a_of(w * 32 + lane);
          auto b = b_of(w * 32 + lane);
          auto c = c_of(w * 32 + lane);
          CHECK(size<0>(a) == 8 && size<0>(b) == 4 && size<0>(c) == 4, "mma fragment sizes");
          const int g = lane / 4, t = lane % 4;
          for (int i = 0; i < 8; i += 2) CHECK(&a(i + 1, m) == &a(i, m) + 1, "A pair not adjacent");
          for (int i = 0; i < 4; i += 2) CHECK(&b(i + 1, n) == &b(i, n) + 1, "B pair not adjacent");
          for (int i = 0; i < 8; ++i) A[g + 8 * ((i / 2) % 2)][2 * t + (i % 2) + 8 * (i / 4)] = a(i, m);
          for (int i = 0; i < 4; ++i) B[2 * t + (i % 2) + 8 * (i / 2)][g] = b(i, n);
          for (int i = 0; i < 4; ++i) C[g + 8 * (i / 2)][2 * t + (i % 2)] = c(i, m, n);
        }
        for (int r = 0; r < 16; ++r)
          for (int cc = 0; cc < 8; ++cc)
            for (int k = 0; k < 16; ++k) C[r][cc] += A[r][k] * B[k][cc];
        for (int lane = 0; lane < 32; ++lane) {
          auto c = c_of(w * 32 + lane);
          const int g = lane / 4, t = lane % 4;
          for (int i = 0; i < 4; ++i) c(i, m, n) = C[g + 8 * (i / 2)][2 * t + (i % 2)];
        }
      }
    }
  }
}

// Writes X (rows x cols) into smem tensor s (logical (row, col)); checks the 16-byte
// chunks load_rows_async writes are contiguous and aligned.
template <class Element, class T>
void fill(T& s, const std::vector<double>& X, int rows, int cols) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) {
      Smem<Element>::at(&s(r, c)) = X[r * cols + c];
      if (c % 8 == 0) CHECK((reinterpret_cast<uintptr_t>(&s(r, c)) & 15) == 0, "chunk alignment");
      else CHECK(&s(r, c) == &s(r, c - 1) + 1, "cp.async chunk not contiguous");
    }
}

std::vector<double> rnd(int n) {
  std::vector<double> x(n);
  for (auto& v : x) v = double(std::rand() % 5 - 2);
  return x;
}

// C[m][n] = sum_k A(m, k) * B(n, k) with accessor lambdas.
template <class FA, class FB>
std::vector<double> matmul(int M, int N, int K, const FA& a, const FB& b) {
  std::vector<double> c(M * N, 0.0);
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      double s = 0;
      for (int k = 0; k < K; ++k) s += a(m, k) * b(n, k);
      c[m * N + n] = s;
    }
  return c;
}

// Compares accumulator storage `regs` (layout acc_layout per thread) with the
// expected M x N matrix at partition_C coordinates; also through acc_rowcol.
template <int M, int N, class Mma>
void check_acc(const char* what, const Mma& mma, Regs& regs, const std::vector<double>& want) {
  int bad = 0;
  for (int tid = 0; tid < kThreads; ++tid) {
    auto thr = mma.get_thread_slice(tid);
    Tensor cC = thr.partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    Tensor acc = make_tensor(regs.r[tid].data(), partition_fragment_C(mma, Shape<Int<M>, Int<N>>{}).layout());
    for (int i = 0; i < size(acc); ++i) {
      const int m = get<0>(cC(i)), n = get<1>(cC(i));
      if (acc(i) != want[m * N + n]) ++bad;
    }
    Tensor rc = make_tensor(acc.data(), acc_rowcol(acc.layout()));
    Tensor crc = make_tensor(cC.data(), acc_rowcol(cC.layout()));
    for (int mi = 0; mi < size<0>(rc); ++mi)
      for (int ni = 0; ni < size<1>(rc); ++ni) {
        const int m = get<0>(crc(mi, ni)), n = get<1>(crc(mi, ni));
        if (rc(mi, ni) != want[m * N + n]) ++bad;
      }
  }
  CHECK(bad == 0, "%s: %d accumulator elements differ", what, bad);
  std::printf("  %-34s %s\n", what, bad == 0 ? "ok" : "MISMATCH");
}

template <int kDk, int kDv, class Element>
void run_case() {
  using Traits = AttnBwdTraits<kDk, kDv, Element>;
  using S = Smem<Element>;
  constexpr int kBlockN = Traits::kBlockN;  // 64: fixed tiles
  constexpr int kBlockS = Traits::kBlockS;  // streamed tiles
  std::printf("Dk=%d Dv=%d %s kBlockS=%d\n", kDk, kDv,
              std::is_same_v<Element, cutlass::half_t> ? "fp16" : "bf16", kBlockS);
  typename Traits::TiledMma mma;
  auto copy_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma);
  auto copy_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma);
  auto copy_bt = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, mma);

  // Generic emulated GEMMs over per-thread fragment layouts.
  auto gemm_ss = [&](Regs& acc, auto acc_layout, auto sA, auto sB) {
    auto la = mma.get_thread_slice(0).partition_fragment_A(sA).layout();
    auto lb = mma.get_thread_slice(0).partition_fragment_B(sB).layout();
    Regs ra(size(la)), rb(size(lb));
    for (int k = 0; k < size<2>(la); ++k) {
      emu_ldmatrix<Element>(
          false, [&](int tid) { return copy_a.get_thread_slice(tid).partition_S(sA)(_, _, k); },
          [&](int tid) {
            return copy_a.get_thread_slice(tid).retile_D(make_tensor(ra.r[tid].data(), la))(_, _, k);
          });
      emu_ldmatrix<Element>(
          false, [&](int tid) { return copy_b.get_thread_slice(tid).partition_S(sB)(_, _, k); },
          [&](int tid) {
            return copy_b.get_thread_slice(tid).retile_D(make_tensor(rb.r[tid].data(), lb))(_, _, k);
          });
      emu_mma([&](int tid) { return make_tensor(ra.r[tid].data(), la)(_, _, k); },
              [&](int tid) { return make_tensor(rb.r[tid].data(), lb)(_, _, k); },
              [&](int tid) { return make_tensor(acc.r[tid].data(), acc_layout); });
    }
  };
  // acc += A(registers: an accumulator viewed as an A operand) * B(smem, .trans view).
  auto gemm_rs = [&](Regs& acc, auto acc_layout, Regs& a_acc, auto a_acc_layout, auto sBt,
                     auto sBtNoSwizzle) {
    auto la = acc_as_a_operand(a_acc_layout);
    auto lb = mma.get_thread_slice(0).partition_fragment_B(sBtNoSwizzle).layout();
    CHECK(size<2>(la) == size<2>(lb), "rs gemm: K blocks of A (%d) and B (%d)", int(size<2>(la)),
          int(size<2>(lb)));
    Regs rb(size(lb));
    for (int k = 0; k < size<2>(la); ++k) {
      emu_ldmatrix<Element>(
          kTransposedB, [&](int tid) { return copy_bt.get_thread_slice(tid).partition_S(sBt)(_, _, k); },
          [&](int tid) {
            return copy_bt.get_thread_slice(tid).retile_D(make_tensor(rb.r[tid].data(), lb))(_, _, k);
          });
      emu_mma([&](int tid) { return make_tensor(a_acc.r[tid].data(), la)(_, _, k); },
              [&](int tid) { return make_tensor(rb.r[tid].data(), lb)(_, _, k); },
              [&](int tid) { return make_tensor(acc.r[tid].data(), acc_layout); });
    }
  };
  // Epilogue staging (store_acc_rows): partition_C of the smem tile addresses the
  // element at the accumulator's coordinate.
  auto check_store = [&](const char* what, auto s, auto shape) {
    int bad = 0;
    for (int tid = 0; tid < kThreads; ++tid) {
      auto thr = mma.get_thread_slice(tid);
      Tensor ts = thr.partition_C(s);
      Tensor cC = thr.partition_C(make_identity_tensor(shape));
      CHECK(size(ts) == size(partition_fragment_C(mma, shape)), "store: fragment size");
      for (int i = 0; i < size(ts); ++i)
        if (&ts(i) != &s(get<0>(cC(i)), get<1>(cC(i)))) ++bad;
    }
    CHECK(bad == 0, "%s: %d staged elements misplaced", what, bad);
    std::printf("  %-34s %s\n", what, bad == 0 ? "ok" : "MISMATCH");
  };

  Element* smem = S::base();
  // ---------------- dk/dv kernel ----------------
  {
    Tensor sK = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutK{});
    Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutV{});
    Tensor sQ = make_tensor(sV.data() + size(sV), typename Traits::SmemLayoutSk{});
    Tensor sdO = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutSv{});
    Tensor sQt = make_tensor(sQ.data(), typename Traits::SmemLayoutSkt{});
    Tensor sQtNoSwizzle = make_tensor(sQ.data().get(), typename Traits::SmemLayoutSktNoSwizzle{});
    Tensor sdOt = make_tensor(sdO.data(), typename Traits::SmemLayoutSvt{});
    Tensor sdOtNoSwizzle = make_tensor(sdO.data().get(), typename Traits::SmemLayoutSvtNoSwizzle{});
    // Stage 0 of the streamed tiles; the last stage ends the tiles.
    constexpr int kLastStageBytes = (Traits::kStages - 1) * Traits::kStageElems * int(sizeof(Element));
    CHECK((char*)(sdO.data().get() + size(sdO)) - (char*)smem + kLastStageBytes == Traits::kSmemStreamTiles,
          "dkdv: tiles end at %d, kSmemStreamTiles = %d",
          int((char*)(sdO.data().get() + size(sdO)) - (char*)smem) + kLastStageBytes,
          Traits::kSmemStreamTiles);
    auto K = rnd(kBlockN * kDk), V = rnd(kBlockN * kDv), Q = rnd(kBlockS * kDk), dO = rnd(kBlockS * kDv);
    fill<Element>(sK, K, kBlockN, kDk);
    fill<Element>(sV, V, kBlockN, kDv);
    fill<Element>(sQ, Q, kBlockS, kDk);
    fill<Element>(sdO, dO, kBlockS, kDv);

    auto st_shape = Shape<Int<kBlockN>, Int<kBlockS>>{};
    auto lS = partition_fragment_C(mma, st_shape).layout();
    Regs acc_s(size(lS)), acc_dp(size(lS));
    gemm_ss(acc_s, lS, sK, sQ);
    auto ST = matmul(kBlockN, kBlockS, kDk, [&](int m, int k) { return K[m * kDk + k]; },
                     [&](int n, int k) { return Q[n * kDk + k]; });
    check_acc<kBlockN, kBlockS>("dkdv S^T = K Q^T", mma, acc_s, ST);
    gemm_ss(acc_dp, lS, sV, sdO);
    auto dPT = matmul(kBlockN, kBlockS, kDv, [&](int m, int k) { return V[m * kDv + k]; },
                      [&](int n, int k) { return dO[n * kDv + k]; });
    check_acc<kBlockN, kBlockS>("dkdv dP^T = V dO^T", mma, acc_dp, dPT);

    auto ldv = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kDv>>{}).layout();
    auto ldk = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kDk>>{}).layout();
    Regs acc_dv(size(ldv)), acc_dk(size(ldk));
    gemm_rs(acc_dv, ldv, acc_s, lS, sdOt, sdOtNoSwizzle);
    auto dV = matmul(kBlockN, kDv, kBlockS, [&](int m, int k) { return ST[m * kBlockS + k]; },
                     [&](int n, int k) { return dO[k * kDv + n]; });
    check_acc<kBlockN, kDv>("dkdv dV = P^T dO (ldmatrix.trans)", mma, acc_dv, dV);
    gemm_rs(acc_dk, ldk, acc_dp, lS, sQt, sQtNoSwizzle);
    auto dK = matmul(kBlockN, kDk, kBlockS, [&](int m, int k) { return dPT[m * kBlockS + k]; },
                     [&](int n, int k) { return Q[k * kDk + n]; });
    check_acc<kBlockN, kDk>("dkdv dK = dS^T Q (ldmatrix.trans)", mma, acc_dk, dK);
    check_store("dkdv epilogue dK via sK", sK, Shape<Int<kBlockN>, Int<kDk>>{});
    check_store("dkdv epilogue dV via sV", sV, Shape<Int<kBlockN>, Int<kDv>>{});
  }
  // ---------------- dq kernel ----------------
  {
    constexpr int kBlockM = Traits::kBlockM;
    Tensor sQ = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutQ{});
    Tensor sdO = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutO{});
    Tensor sK = make_tensor(sdO.data() + size(sdO), typename Traits::SmemLayoutSk{});
    Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutSv{});
    Tensor sKt = make_tensor(sK.data(), typename Traits::SmemLayoutSkt{});
    Tensor sKtNoSwizzle = make_tensor(sK.data().get(), typename Traits::SmemLayoutSktNoSwizzle{});
    constexpr int kLastStageBytes = (Traits::kStages - 1) * Traits::kStageElems * int(sizeof(Element));
    CHECK((char*)(sV.data().get() + size(sV)) - (char*)smem + kLastStageBytes == Traits::kSmemStreamTiles,
          "dq: tiles end past kSmemStreamTiles");
    auto Q = rnd(kBlockM * kDk), dO = rnd(kBlockM * kDv), K = rnd(kBlockS * kDk), V = rnd(kBlockS * kDv);
    fill<Element>(sQ, Q, kBlockM, kDk);
    fill<Element>(sdO, dO, kBlockM, kDv);
    fill<Element>(sK, K, kBlockS, kDk);
    fill<Element>(sV, V, kBlockS, kDv);
    auto s_shape = Shape<Int<kBlockM>, Int<kBlockS>>{};
    auto lS = partition_fragment_C(mma, s_shape).layout();
    Regs acc_s(size(lS)), acc_dp(size(lS));
    gemm_ss(acc_s, lS, sQ, sK);
    auto Sm = matmul(kBlockM, kBlockS, kDk, [&](int m, int k) { return Q[m * kDk + k]; },
                     [&](int n, int k) { return K[n * kDk + k]; });
    check_acc<kBlockM, kBlockS>("dq S = Q K^T", mma, acc_s, Sm);
    gemm_ss(acc_dp, lS, sdO, sV);
    auto dP = matmul(kBlockM, kBlockS, kDv, [&](int m, int k) { return dO[m * kDv + k]; },
                     [&](int n, int k) { return V[n * kDv + k]; });
    check_acc<kBlockM, kBlockS>("dq dP = dO V^T", mma, acc_dp, dP);
    auto ldq = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kDk>>{}).layout();
    Regs acc_dq(size(ldq));
    gemm_rs(acc_dq, ldq, acc_dp, lS, sKt, sKtNoSwizzle);
    auto dQ = matmul(kBlockM, kDk, kBlockS, [&](int m, int k) { return dP[m * kBlockS + k]; },
                     [&](int n, int k) { return K[k * kDk + n]; });
    check_acc<kBlockM, kDk>("dq dQ = dS K (ldmatrix.trans)", mma, acc_dq, dQ);
    check_store("dq epilogue dQ via sQ", sQ, Shape<Int<kBlockM>, Int<kDk>>{});
  }
}

int main() {
  std::srand(1);
  run_case<64, 64, cutlass::bfloat16_t>();
#ifndef NSA_MUTATE
  run_case<128, 128, cutlass::bfloat16_t>();
  run_case<192, 128, cutlass::bfloat16_t>();
  run_case<64, 64, cutlass::half_t>();
  run_case<128, 128, cutlass::half_t>();
  run_case<192, 128, cutlass::half_t>();
#endif
  std::printf(g_fail == 0 ? "PASS bwd layout check\n" : "FAIL bwd layout check (%d)\n", g_fail);
  return g_fail == 0 ? 0 : 1;
}
