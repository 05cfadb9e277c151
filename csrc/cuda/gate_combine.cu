// gate_combine: the gated sum that ends sparse_attn, o = sum_b g_b * o_b over the
// branches that are on, and its gradient, d o_b = g_b * d o and
// d g_b = sum_c d o[c] * o_b[c]. Both are memory-bound: each kernel reads every
// input row once and writes every output row once (torch's elementwise ops take
// five passes forward and about nine backward), in fp32 with one rounding.
// 16 lanes per (b, t, h) row, 16 bytes (8 elements) per lane and step.
#include "cuda/common.cuh"

namespace nsa::cuda {
namespace {

constexpr int kThreads = 128, kLanesPerRow = 16, kVec = 8;
constexpr int kRowsPerCta = kThreads / kLanesPerRow;

template <class T>
using Vec = Vec8<T>;
static_assert(kVec == 8, "rows move in Vec8 chunks");

// This thread's row: its flat index (b * T + t) * Hq + h and the row offset of a
// [B, T, Hq, *] tensor with the given strides.
struct GateRow {
  int64_t index, b, t, h;
  __device__ int64_t offset(int64_t batch_stride, int64_t row_stride, int64_t head_stride) const {
    return b * batch_stride + t * row_stride + h * head_stride;
  }
};

__device__ __forceinline__ GateRow gate_row(const GateParams& p) {
  GateRow r;
  r.index = int64_t(blockIdx.x) * kRowsPerCta + threadIdx.x / kLanesPerRow;
  r.h = r.index % p.num_heads;
  r.t = (r.index / p.num_heads) % p.seqlen;
  r.b = r.index / (p.num_heads * p.seqlen);
  return r;
}

__device__ __forceinline__ float gate_of(const GateBranch& x, const GateRow& r) {
  return static_cast<const float*>(x.gate)[r.offset(x.gate_batch_stride, x.gate_row_stride,
                                                    x.gate_head_stride)];
}

template <class T>
__global__ void __launch_bounds__(kThreads) gate_combine_kernel(const GateParams p) {
  const GateRow r = gate_row(p);
  if (r.index >= p.batch * p.seqlen * p.num_heads) return;
  const int lane = threadIdx.x % kLanesPerRow;
  float g[kMaxGateBranches];
  const T* o_b[kMaxGateBranches];
#pragma unroll
  for (int j = 0; j < kMaxGateBranches; ++j) {
    if (j >= p.num_branches) break;
    const GateBranch& x = p.branches[j];
    g[j] = gate_of(x, r);
    o_b[j] = static_cast<const T*>(x.o) + r.offset(x.o_batch_stride, x.o_row_stride,
                                                    x.o_head_stride);
  }
  T* o = static_cast<T*>(p.out) + r.index * p.head_dim;  // contiguous (gate_combine's)
  for (int64_t c = lane * kVec; c < p.head_dim; c += kLanesPerRow * kVec) {
    cutlass::Array<float, kVec> acc;
    acc.fill(0.f);
#pragma unroll
    for (int j = 0; j < kMaxGateBranches; ++j) {
      if (j >= p.num_branches) break;
      const Vec<T> x = load_vec8(o_b[j] + c);
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] += g[j] * float(x[i]);
    }
    store_vec8(o + c, round_vec8<T>(acc));
  }
}

// Rows past the end still run the lane reduction (the shuffles take all 32
// lanes) and write nothing.
template <class T>
__global__ void __launch_bounds__(kThreads) gate_combine_bwd_kernel(const GateParams p) {
  const GateRow r = gate_row(p);
  const bool valid = r.index < p.batch * p.seqlen * p.num_heads;
  const int lane = threadIdx.x % kLanesPerRow;
  float dg[kMaxGateBranches] = {}, dot[kMaxGateBranches] = {};
  if (valid) {
    const T* d_out = static_cast<const T*>(p.out) + r.offset(p.out_batch_stride,
                                                             p.out_row_stride, p.out_head_stride);
    for (int64_t c = lane * kVec; c < p.head_dim; c += kLanesPerRow * kVec) {
      const Vec<T> d = load_vec8(d_out + c);
#pragma unroll
      for (int j = 0; j < kMaxGateBranches; ++j) {
        if (j >= p.num_branches) break;
        const GateBranch& x = p.branches[j];
        const float g = gate_of(x, r);
        const Vec<T> o = load_vec8(static_cast<const T*>(x.o) +
                                   r.offset(x.o_batch_stride, x.o_row_stride, x.o_head_stride) + c);
#pragma unroll
        for (int i = 0; i < kVec; ++i) dg[j] += float(d[i]) * float(o[i]);
        if (x.d_o == nullptr) continue;  // the branch backward scales do itself
        cutlass::Array<float, kVec> scaled;
#pragma unroll
        for (int i = 0; i < kVec; ++i) scaled[i] = g * float(d[i]);
        const Vec<T> d_o = round_vec8<T>(scaled);
#pragma unroll
        for (int i = 0; i < kVec; ++i) dot[j] += float(o[i]) * float(d_o[i]);
        store_vec8(static_cast<T*>(x.d_o) + r.index * p.head_dim + c, d_o);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kMaxGateBranches; ++j) {
    if (j >= p.num_branches) break;
    const GateBranch& x = p.branches[j];
    const float sum = quad_allreduce<kLanesPerRow>(dg[j], SumOp{});
    // Without d_o: rowsum(o * g do) = g * d_gate, no rounded d_o in between.
    const float row_dot = x.d_o != nullptr ? quad_allreduce<kLanesPerRow>(dot[j], SumOp{})
                                           : (valid ? gate_of(x, r) * sum : 0.f);
    if (valid && lane == 0) {
      static_cast<float*>(x.d_gate)[r.index] = sum;
      if (x.row_dot != nullptr)  // [B, Hq, T]
        static_cast<float*>(x.row_dot)[(r.b * p.num_heads + r.h) * p.seqlen + r.t] = row_dot;
    }
  }
}

template <class Launch>
void launch_gate_rows(const GateParams& p, DType dtype, const char* what, Launch launch) {
  if (p.num_branches < 1 || p.num_branches > kMaxGateBranches || p.head_dim % kVec != 0)
    throw std::runtime_error(std::string("nsa_cuda: ") + what + ": bad problem size");
  const int64_t rows = p.batch * p.seqlen * p.num_heads;
  if (rows == 0 || p.head_dim == 0) return;
  const int64_t ctas = (rows + kRowsPerCta - 1) / kRowsPerCta;
  if (ctas > INT32_MAX)
    throw std::runtime_error(std::string("nsa_cuda: ") + what + ": problem too large for the grid");
  if (dtype == DType::kFp16)
    launch(cutlass::half_t{}, unsigned(ctas));
  else
    launch(cutlass::bfloat16_t{}, unsigned(ctas));
  check_launch(what);
}

}  // namespace

void run_gate_combine(const GateParams& p, DType dtype, cudaStream_t stream) {
  launch_gate_rows(p, dtype, "gate_combine", [&](auto tag, unsigned ctas) {
    NSA_LAUNCH(ctas, kThreads, 0, stream, gate_combine_kernel<decltype(tag)>)(p);
  });
}

void run_gate_combine_bwd(const GateParams& p, DType dtype, cudaStream_t stream) {
  launch_gate_rows(p, dtype, "gate_combine_bwd", [&](auto tag, unsigned ctas) {
    NSA_LAUNCH(ctas, kThreads, 0, stream, gate_combine_bwd_kernel<decltype(tag)>)(p);
  });
}

}  // namespace nsa::cuda
