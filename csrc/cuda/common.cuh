// Small device helpers shared by the CUDA kernels: element types, cp.async row
// loads with zero fill, warp reductions, CuTe layout reshapes of MMA fragments.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include "cuda/launch.h"
#include "nsa/params.h"
#include "nsa/rules.h"

// Kernel launch: NSA_LAUNCH(grid, block, smem, stream, kernel)(args...). The
// triple chevron, or, under NSA_CUDA_EMULATION, the CPU emulator's launcher
// (csrc/emu), which runs the same kernel source on the host. The kernel comes
// last so that template arguments with commas need no parentheses.
#ifdef NSA_CUDA_EMULATION
#define NSA_LAUNCH(grid, block, smem, stream, ...) NSA_EMU_LAUNCH(grid, block, smem, stream, __VA_ARGS__)
#else
#define NSA_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace nsa::cuda {

template <DType kDType>
struct ElementOf;
template <>
struct ElementOf<DType::kFp16> { using type = cutlass::half_t; };
template <>
struct ElementOf<DType::kBf16> { using type = cutlass::bfloat16_t; };

constexpr float kLog2e = 1.4426950408889634f;

// The SM80 tensor-core instruction of every attention kernel: mma.sync m16n8k16
// with fp32 accumulation (sm_90a runs it too).
template <class Element>
using Sm80MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                       cute::MMA_Atom<cute::SM80_16x8x16_F32F16F16F32_TN>,
                                       cute::MMA_Atom<cute::SM80_16x8x16_F32BF16BF16F32_TN>>;

// 16-byte cp.async; when `pred` is false nothing is read and the 16 smem bytes
// are zeroed. `gmem` must still be a valid address (pass the tensor's base).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool pred) {
  cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
      *reinterpret_cast<const cute::uint128_t*>(gmem), *reinterpret_cast<cute::uint128_t*>(smem),
      pred);
}

// Loads a kRows x kCols tile of 16-bit elements into a (possibly swizzled) smem
// tensor, row by row: row_ptr(r) gives the gmem address of row r or nullptr for
// a row to zero. 16-byte chunks; kCols % 8 == 0.
template <int kRows, int kCols, int kThreads, class SmemTensor, class RowPtr, class T>
__device__ __forceinline__ void load_rows_async(SmemTensor& s, const RowPtr& row_ptr,
                                                const T* fallback, int tid) {
  static_assert(kCols % 8 == 0);
  constexpr int kChunks = kCols / 8;
  constexpr int kTotal = kRows * kChunks;
#pragma unroll
  for (int it = 0; it < (kTotal + kThreads - 1) / kThreads; ++it) {
    const int idx = tid + it * kThreads;
    if (kTotal % kThreads == 0 || idx < kTotal) {
      const int r = idx / kChunks;
      const int c = idx % kChunks;
      const T* src = row_ptr(r);
      const bool pred = src != nullptr;
      cp_async_16(&s(r, c * 8), pred ? src + c * 8 : fallback, pred);
    }
  }
}

// A view of `t` (an smem tensor or a thread's partition of one) moved by `offset`
// elements: another pipeline stage of the same tile. `offset` must be a multiple
// of the layout's swizzle period (512 elements for the 64-wide atom), so that the
// swizzle pattern of the moved view is the same.
template <class Tensor>
__device__ __forceinline__ Tensor shifted(Tensor t, int offset) {
  t.data() = t.data() + offset;
  return t;
}

template <int kWidth, class T, class Op>
__device__ __forceinline__ T quad_allreduce(T x, Op op) {
#pragma unroll
  for (int off = kWidth / 2; off > 0; off /= 2) x = op(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

// MMA accumulator (4, MMA_M, MMA_N) -> (rows=(2, MMA_M), cols=(2, MMA_N)) for the
// SM80 16x8 C fragment: values 0,1 share a row, 2,3 are 8 rows further.
// (Host-callable: bench/bwd_layout_check.cu checks these layouts without a GPU.)
template <class Layout>
CUTE_HOST_DEVICE auto acc_rowcol(Layout acc) {
  using namespace cute;
  static_assert(decltype(rank(acc))::value == 3);
  static_assert(decltype(size<0>(acc))::value == 4);
  auto l = logical_divide(acc, Shape<_2>{});  // ((2, 2), MMA_M, MMA_N)
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

// MMA accumulator (4, MMA_M, MMA_N) of m16n8k16 -> A operand ((4, 2), MMA_M, MMA_N/2):
// two adjacent n8 accumulator tiles form one k16 A fragment.
template <class Layout>
CUTE_HOST_DEVICE auto acc_as_a_operand(Layout acc) {
  using namespace cute;
  static_assert(decltype(size<0>(acc))::value == 4);
  auto l = logical_divide(acc, Shape<Underscore, Underscore, _2>{});  // (4, MMA_M, (2, MMA_N/2))
  return make_layout(make_layout(get<0>(l), get<2, 0>(l)), get<1>(l), get<2, 1>(l));
}

// fp32 fragment -> 16-bit fragment of the same shape (an owning register tensor).
template <class TensorIn, class TensorOut>
__device__ __forceinline__ void convert_fragment(const TensorIn& in, TensorOut& out) {
  using namespace cute;
  using From = typename TensorIn::value_type;
  using To = typename TensorOut::value_type;
  constexpr int N = decltype(size(in))::value;
  static_assert(N == decltype(size(out))::value && N % 2 == 0);
  cutlass::NumericArrayConverter<To, From, N> op;
  *reinterpret_cast<cutlass::Array<To, N>*>(raw_pointer_cast(out.data())) =
      op(*reinterpret_cast<const cutlass::Array<From, N>*>(raw_pointer_cast(in.data())));
}

// acc += A(smem) * B(smem) over the K mode, ldmatrix'ing the next k slice while
// the current one multiplies.
template <class Acc, class RA, class RB, class SA, class SB, class TiledMma, class CopyA,
          class CopyB, class ThrCopyA, class ThrCopyB>
__device__ __forceinline__ void gemm_ss(Acc& acc, RA& rA, RB& rB, const SA& sA, const SB& sB,
                                        TiledMma mma, CopyA copy_a, CopyB copy_b,
                                        ThrCopyA thr_a, ThrCopyB thr_b) {
  using namespace cute;
  auto rA_view = thr_a.retile_D(rA);
  auto rB_view = thr_b.retile_D(rB);
  copy(copy_a, sA(_, _, _0{}), rA_view(_, _, _0{}));
  copy(copy_b, sB(_, _, _0{}), rB_view(_, _, _0{}));
#pragma unroll
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k + 1 < size<2>(rA)) {
      copy(copy_a, sA(_, _, k + 1), rA_view(_, _, k + 1));
      copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    }
    gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// acc += A B^T with both operands in smem, for one thread of a TiledMma: the
// ldmatrix partitions of sA (M x K) and sB (N x K) and their register fragments,
// made once. The returned callable runs gemm_ss(acc) with sB moved by b_offset
// elements (another pipeline stage, or another pass over the rows of a taller B).
template <class TiledMma, class CopyAtomA, class CopyAtomB, class SA, class SB>
__device__ __forceinline__ auto make_smem_gemm(const SA& sA, const SB& sB, int tid) {
  using namespace cute;
  TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  auto rA = thr_mma.partition_fragment_A(sA);
  auto rB = thr_mma.partition_fragment_B(sB);
  auto copy_a = make_tiled_copy_A(CopyAtomA{}, mma);
  auto thr_a = copy_a.get_thread_slice(tid);
  auto copy_b = make_tiled_copy_B(CopyAtomB{}, mma);
  auto thr_b = copy_b.get_thread_slice(tid);
  auto pA = thr_a.partition_S(sA);
  auto pB = thr_b.partition_S(sB);
  return [=](auto& acc, int b_offset) mutable {
    gemm_ss(acc, rA, rB, pA, shifted(pB, b_offset), mma, copy_a, copy_b, thr_a, thr_b);
  };
}

// fn(row, col, value) for each element of this thread's MMA accumulator `acc`, with
// `coords` the same thread's partition of an identity tensor of the tile's shape
// (thr_mma.partition_C): element e of both is the same (row, col).
template <class Acc, class Coords, class Fn>
__device__ __forceinline__ void for_each_element(const Acc& acc, const Coords& coords, Fn&& fn) {
  using namespace cute;
  static_assert(decltype(size(acc))::value == decltype(size(coords))::value);
  CUTE_UNROLL
  for (int e = 0; e < size(acc); ++e) fn(int(get<0>(coords(e))), int(get<1>(coords(e))), acc(e));
}

// acc += A(registers) * B(smem). kPrefetch: ldmatrix the next k slice of B while
// the current one multiplies (two slices live); off for a wide B (N = Dk = 192 in
// the backward) where a second slice costs 48 more registers.
template <bool kPrefetch = true, class Acc, class RA, class RB, class SB, class TiledMma,
          class CopyB, class ThrCopyB>
__device__ __forceinline__ void gemm_rs(Acc& acc, RA& rA, RB& rB, const SB& sB, TiledMma mma,
                                        CopyB copy_b, ThrCopyB thr_b) {
  using namespace cute;
  auto rB_view = thr_b.retile_D(rB);
  if constexpr (kPrefetch) copy(copy_b, sB(_, _, _0{}), rB_view(_, _, _0{}));
#pragma unroll
  for (int k = 0; k < size<2>(rA); ++k) {
    if constexpr (kPrefetch) {
      if (k + 1 < size<2>(rA)) copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    } else {
      copy(copy_b, sB(_, _, k), rB_view(_, _, k));
    }
    gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// 8 elements in one 16-byte access (rows and chunks are 16-byte aligned wherever
// these are used), and their rounding from fp32.
template <class T>
using Vec8 = cutlass::AlignedArray<T, 8>;

template <class T>
__device__ __forceinline__ Vec8<T> load_vec8(const T* src) {
  Vec8<T> v;
  *reinterpret_cast<cute::uint128_t*>(&v) = *reinterpret_cast<const cute::uint128_t*>(src);
  return v;
}

template <class T>
__device__ __forceinline__ void store_vec8(T* dst, const Vec8<T>& v) {
  *reinterpret_cast<cute::uint128_t*>(dst) = *reinterpret_cast<const cute::uint128_t*>(&v);
}

template <class T>
__device__ __forceinline__ Vec8<T> round_vec8(const cutlass::Array<float, 8>& x) {
  Vec8<T> y;
  static_cast<cutlass::Array<T, 8>&>(y) = cutlass::NumericArrayConverter<T, float, 8>{}(x);
  return y;
}

// 8 elements at dst: the staged ones, plus those at `add` when it is not null
// (summed in fp32, rounded once).
template <class Element>
__device__ __forceinline__ void store_chunk(Element* dst, const Element* staged, const Element* add) {
  const Vec8<Element> a = load_vec8(staged);
  if (add == nullptr) {
    store_vec8(dst, a);
    return;
  }
  const Vec8<Element> b = load_vec8(add);
  cutlass::Array<float, 8> sum;
#pragma unroll
  for (int i = 0; i < 8; ++i) sum[i] = float(a[i]) + float(b[i]);
  store_vec8(dst, round_vec8<Element>(sum));
}

struct NoRowAdd {
  template <class T>
  __device__ const T* operator()(int, const T*) const { return nullptr; }
};

// Epilogue of the attention kernels, in two halves. stage_acc: converts the fp32
// accumulator `acc` (a C fragment of `thr_mma`) to Element into the smem tile `s`
// (free for reuse: waits for every cp.async and every thread first; every thread of
// the CTA calls it, through two barriers). store_staged_rows: writes each row r of
// the kRows x kCols staged tile to row_dst(r) (nullptr: skip) in 16-byte stores, by
// kThreads threads. The backward's accumulating form adds the row row_add(r, dst)
// (nullptr: none) of a gradient that earlier branches left (AttnBwdParams::dq_in and
// the like).
template <class Element, class Acc, class SmemTensor, class ThrMma>
__device__ __forceinline__ void stage_acc(const Acc& acc, SmemTensor&& s, const ThrMma& thr_mma) {
  using namespace cute;
  Tensor r = make_tensor<Element>(acc.layout());
  convert_fragment(acc, r);
  cute::cp_async_wait<0>();
  __syncthreads();  // everyone is done reading `s`; no copy in flight
  Tensor ts = thr_mma.partition_C(s);
#pragma unroll
  for (int i = 0; i < size(r); ++i) ts(i) = r(i);
  __syncthreads();
}

template <int kRows, int kCols, int kThreads, class Element, class SmemTensor, class RowDst,
          class RowAdd = NoRowAdd>
__device__ __forceinline__ void store_staged_rows(const SmemTensor& s, int tid, const RowDst& row_dst,
                                                  const RowAdd& row_add = {}) {
  constexpr int kChunks = kCols / 8;
#pragma unroll
  for (int it = 0; it < (kRows * kChunks + kThreads - 1) / kThreads; ++it) {
    const int idx = tid + it * kThreads;
    if (idx < kRows * kChunks) {
      const int row = idx / kChunks, c = idx % kChunks;
      Element* dst = row_dst(row);
      if (dst != nullptr) {
        const Element* add = row_add(row, static_cast<const Element*>(dst));
        store_chunk(dst + c * 8, &s(row, c * 8), add == nullptr ? nullptr : add + c * 8);
      }
    }
  }
}

template <int kRows, int kCols, int kThreads, class Element, class Acc, class SmemTensor,
          class ThrMma, class RowDst, class RowAdd = NoRowAdd>
__device__ __forceinline__ void store_acc_rows(const Acc& acc, SmemTensor& s, const ThrMma& thr_mma,
                                               int tid, const RowDst& row_dst,
                                               const RowAdd& row_add = {}) {
  stage_acc<Element>(acc, s, thr_mma);
  store_staged_rows<kRows, kCols, kThreads, Element>(s, tid, row_dst, row_add);
}

// The token rows of one sequence (selected and window branches: no compressed rows).
__device__ __forceinline__ SeqInfo token_seq_info(const int32_t* cu_seqlens, int64_t seq,
                                                  int64_t seqlen) {
  SeqInfo s;
  if (cu_seqlens == nullptr) {
    s.batch = seq, s.row0 = 0, s.len = seqlen;
  } else {
    s.batch = 0, s.row0 = cu_seqlens[seq], s.len = cu_seqlens[seq + 1] - cu_seqlens[seq];
  }
  s.cmp_row0 = 0;
  s.q_row0 = s.row0, s.q_len = s.len, s.q_pos0 = 0;
  return s;
}

// Sets the dynamic smem limit of `kernel` when it needs more than 48 KB. A request
// beyond what the device offers fails here, before the launch, with `hint` naming
// the argument that sized it (e.g. slc_num_blocks for the selected branch).
template <class Kernel>
inline void set_smem_limit(Kernel kernel, int bytes, const char* what, const std::string& hint = "") {
  if (bytes <= 48 * 1024) return;
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) == cudaSuccess &&
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess &&
      bytes > optin) {
    throw std::runtime_error(std::string("nsa_cuda: ") + what + " needs " + std::to_string(bytes) +
                             " bytes of shared memory per block but this device allows " +
                             std::to_string(optin) + (hint.empty() ? "" : "; " + hint));
  }
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) {
    // Clear the (non-sticky) error: left in the runtime's last-error slot it
    // would surface in the next, unrelated launch check (ours or PyTorch's).
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("nsa_cuda: ") + what + ": cannot use " +
                             std::to_string(bytes) + " bytes of shared memory: " +
                             cudaGetErrorString(e) + (hint.empty() ? "" : "; " + hint));
  }
}

}  // namespace nsa::cuda
