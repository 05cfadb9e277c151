// A 64x64x64 product through exactly the forward kernel's machinery: its
// TiledMma (mma.sync m16n8k16, four warps), its swizzled smem layouts filled by
// load_rows_async (cp.async), ldmatrix for A and B (non-transposed for b^T, the
// K operand; transposed through the V^T view for b, the V operand) and gemm_ss.
// Equal to a plain matrix product only if the emulated atoms follow the PTX
// definitions the same way CuTe's MMA_Traits / Copy_Traits layouts describe them.
#include "emu/selftest.h"

#include "cuda/attn_fwd_sm90.cuh"
#include "cuda/attn_traits.cuh"

namespace nsa::cuda {

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads)
    gemm_selftest_kernel(const typename Traits::Element* a, const typename Traits::Element* b,
                         float* nt, float* nn) {
  using namespace cute;
  using Element = typename Traits::Element;
  static_assert(Traits::kBlockM == 64 && Traits::kBlockN == 64 && Traits::kDk == 64 &&
                Traits::kDv == 64);
  extern __shared__ __align__(128) char smem[];
  const int tid = threadIdx.x;
  Tensor sA = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Traits::SmemLayoutQ{});
  Tensor sB = make_tensor(sA.data() + size(sA), typename Traits::SmemLayoutK{});
  Tensor sBt = make_tensor(sB.data(), typename Traits::SmemLayoutVt{});
  Tensor sBtNoSwizzle = make_tensor(sB.data().get(), typename Traits::SmemLayoutVtNoSwizzle{});
  load_rows_async<64, 64, Traits::kThreads>(sA, [&](int r) -> const Element* { return a + r * 64; }, a, tid);
  load_rows_async<64, 64, Traits::kThreads>(sB, [&](int r) -> const Element* { return b + r * 64; }, b, tid);
  cute::cp_async_fence();
  cute::cp_async_wait<0>();
  __syncthreads();

  typename Traits::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor rA = thr_mma.partition_fragment_A(sA);
  Tensor rB = thr_mma.partition_fragment_B(sB);
  Tensor rBt = thr_mma.partition_fragment_B(sBtNoSwizzle);
  auto copy_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma);
  auto thr_a = copy_a.get_thread_slice(tid);
  auto copy_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma);
  auto thr_b = copy_b.get_thread_slice(tid);
  auto copy_bt = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, mma);
  auto thr_bt = copy_bt.get_thread_slice(tid);
  Tensor tsA = thr_a.partition_S(sA);
  Tensor tsB = thr_b.partition_S(sB);
  Tensor tsBt = thr_bt.partition_S(sBt);

  Tensor acc_nt = partition_fragment_C(mma, Shape<_64, _64>{});
  Tensor acc_nn = partition_fragment_C(mma, Shape<_64, _64>{});
  clear(acc_nt);
  clear(acc_nn);
  gemm_ss(acc_nt, rA, rB, tsA, tsB, mma, copy_a, copy_b, thr_a, thr_b);
  gemm_ss(acc_nn, rA, rBt, tsA, tsBt, mma, copy_a, copy_bt, thr_a, thr_bt);

  Tensor tC = thr_mma.partition_C(make_identity_tensor(Shape<_64, _64>{}));
  for (int i = 0; i < size(acc_nt); ++i) {
    const int r = get<0>(tC(i)), c = get<1>(tC(i));
    nt[r * 64 + c] = acc_nt(i);
    nn[r * 64 + c] = acc_nn(i);
  }
}

template <class Element>
void run_gemm_selftest(const void* a, const void* b, float* nt, float* nn) {
  using Traits = AttnTraits<64, 64, Element>;
  NSA_LAUNCH(1, Traits::kThreads, Traits::kSmemQ + Traits::kSmemK, nullptr,
             gemm_selftest_kernel<Traits>)(static_cast<const Element*>(a),
                                           static_cast<const Element*>(b), nt, nn);
  check_launch("gemm_selftest");
}

// The same through the Hopper forward's machinery: its wgmma TiledMmas and GMMA
// smem layouts (descriptors from make_gmma_desc). nt = a b^T (SS, both K-major);
// pv = P b with P = nt rounded to the element type and held in registers as the A
// operand (RS; b through the V^T view, MN-major).
template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads)
    gemm_selftest_sm90_kernel(const typename Traits::Element* a, const typename Traits::Element* b,
                              float* nt, float* pv) {
  using namespace cute;
  using Element = typename Traits::Element;
  static_assert(Traits::kBlockM == 64 && Traits::kBlockN == 64 && Traits::kDk == 64 &&
                Traits::kDv == 64);
  extern __shared__ __align__(1024) char smem[];
  const int tid = threadIdx.x;
  Element* pa = reinterpret_cast<Element*>(smem);
  Element* pb = reinterpret_cast<Element*>(smem + Traits::kSmemQ);
  Tensor sA = make_tensor(make_smem_ptr(pa), typename Traits::SmemLayoutQ{});
  Tensor sB = make_tensor(make_smem_ptr(pb), typename Traits::SmemLayoutK{});
  Tensor sBt = make_tensor(make_smem_ptr(pb), typename Traits::SmemLayoutVt{});
  load_rows_async<64, 64, Traits::kThreads>(sA, [&](int r) -> const Element* { return a + r * 64; }, a, tid);
  load_rows_async<64, 64, Traits::kThreads>(sB, [&](int r) -> const Element* { return b + r * 64; }, b, tid);
  cute::cp_async_fence();
  cute::cp_async_wait<0>();
  fence_smem_for_wgmma();
  __syncthreads();

  typename Traits::TiledMmaS mma_s;
  typename Traits::TiledMmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);
  Tensor rA = thr_s.partition_fragment_A(sA);
  Tensor rB = thr_s.partition_fragment_B(sB);
  Tensor rBt = thr_o.partition_fragment_B(sBt);
  Tensor acc_s = partition_fragment_C(mma_s, Shape<_64, _64>{});
  Tensor acc_o = partition_fragment_C(mma_o, Shape<_64, _64>{});
  gemm_wgmma<true>(mma_s, rA, rB, acc_s);
  Tensor rP = make_tensor<Element>(acc_s.layout());
  convert_fragment(acc_s, rP);
  Tensor tOrP = make_tensor(rP.data(), gmma_acc_as_a_operand(rP.layout()));
  gemm_wgmma<true>(mma_o, tOrP, rBt, acc_o);

  Tensor tS = thr_s.partition_C(make_identity_tensor(Shape<_64, _64>{}));
  Tensor tO = thr_o.partition_C(make_identity_tensor(Shape<_64, _64>{}));
  for (int i = 0; i < size(acc_s); ++i) nt[get<0>(tS(i)) * 64 + get<1>(tS(i))] = acc_s(i);
  for (int i = 0; i < size(acc_o); ++i) pv[get<0>(tO(i)) * 64 + get<1>(tO(i))] = acc_o(i);
}

template <class Element>
void run_gemm_selftest_sm90(const void* a, const void* b, float* nt, float* pv) {
  using Traits = AttnTraitsSm90<64, 64, Element, /*kWarpgroups=*/1>;
  NSA_LAUNCH(1, Traits::kThreads, Traits::kSmemQ + Traits::kSmemK, nullptr,
             gemm_selftest_sm90_kernel<Traits>)(static_cast<const Element*>(a),
                                                static_cast<const Element*>(b), nt, pv);
  check_launch("gemm_selftest_sm90");
}

// The emulator's own checks must keep their teeth. mode 0: cp.async, wait,
// __syncthreads, then warp 0 ldmatrix-reads rows other threads copied (correct);
// mode 1: the same without the __syncthreads (a race); mode 2: half of each warp
// at __syncwarp, the other half at __syncthreads (a deadlock on the GPU).
__global__ void emu_hazard_kernel(const cute::uint128_t* src, float* out, int mode) {
  extern __shared__ __align__(128) char smem[];
  const int tid = threadIdx.x;
  auto* rows = reinterpret_cast<cute::uint128_t*>(smem);
  cp_async_16(&rows[tid], &src[tid], true);
  cute::cp_async_fence();
  cute::cp_async_wait<0>();
  if (mode == 2) {
    if (tid % 32 < 16) __syncwarp();
    else __syncthreads();
  }
  if (mode != 1) __syncthreads();
  if (tid < 32) {
    uint32_t d[4];
    cute::SM75_U32x4_LDSM_N::copy(rows[(tid + 32) % 128], d[0], d[1], d[2], d[3]);
    out[tid] = float(d[0] & 0xffff);
  }
}

void run_hazard_selftest(int mode) {
  static cute::uint128_t src[128];
  static float out[32];
  NSA_LAUNCH(1, 128, 128 * 16, nullptr, emu_hazard_kernel)(src, out, mode);
  check_launch("hazard_selftest");
}

}  // namespace nsa::cuda

namespace nsa::emu {
void hazard_selftest(int mode) { nsa::cuda::run_hazard_selftest(mode); }

void gemm_selftest_sm90(const void* a, const void* b, bool bf16, float* nt, float* pv) {
  if (bf16)
    nsa::cuda::run_gemm_selftest_sm90<cutlass::bfloat16_t>(a, b, nt, pv);
  else
    nsa::cuda::run_gemm_selftest_sm90<cutlass::half_t>(a, b, nt, pv);
}

void gemm_selftest(const void* a, const void* b, bool bf16, float* nt, float* nn) {
  if (bf16)
    nsa::cuda::run_gemm_selftest<cutlass::bfloat16_t>(a, b, nt, nn);
  else
    nsa::cuda::run_gemm_selftest<cutlass::half_t>(a, b, nt, nn);
}
}  // namespace nsa::emu
