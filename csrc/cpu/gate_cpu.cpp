// sparse_attn's gated sum on the CPU, o = sum_b g_b * o_b, and its gradient,
// d o_b = g_b * d o and d g_b = sum_c d o[c] * o_b[c]: the rule of
// csrc/cuda/gate_combine.cu, in the accumulation type (double for double inputs,
// float otherwise) with one rounding per element.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "cpu/kernels.h"

namespace nsa::cpu {
namespace {

template <typename scalar_t>
using gate_acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// (b, t, h) of flat row (b * T + t) * Hq + h, as offsets into a strided tensor.
struct GateRowIndex {
  int64_t b, t, h;
  int64_t offset(int64_t batch_stride, int64_t row_stride, int64_t head_stride) const {
    return b * batch_stride + t * row_stride + h * head_stride;
  }
};

GateRowIndex gate_row(const GateParams& p, int64_t row) {
  return {row / (p.num_heads * p.seqlen), (row / p.num_heads) % p.seqlen, row % p.num_heads};
}

void for_each_gate_row(const GateParams& p, const auto& body) {
  const int64_t rows = p.batch * p.seqlen * p.num_heads;
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) body(row, gate_row(p, row));
  });
}

template <typename acc_t>
acc_t gate_value(const GateBranch& x, const GateRowIndex& r) {
  return static_cast<const acc_t*>(x.gate)[r.offset(x.gate_batch_stride, x.gate_row_stride,
                                                    x.gate_head_stride)];
}

template <typename scalar_t>
const scalar_t* branch_row(const GateBranch& x, const GateRowIndex& r) {
  return static_cast<const scalar_t*>(x.o) + r.offset(x.o_batch_stride, x.o_row_stride,
                                                       x.o_head_stride);
}

}  // namespace

template <typename scalar_t>
void gate_combine(const GateParams& p) {
  using acc_t = gate_acc_t<scalar_t>;
  for_each_gate_row(p, [&](int64_t, const GateRowIndex& r) {
    scalar_t* o = static_cast<scalar_t*>(p.out) +
                  r.offset(p.out_batch_stride, p.out_row_stride, p.out_head_stride);
    for (int64_t c = 0; c < p.head_dim; ++c) {
      acc_t acc = 0;
      for (int j = 0; j < p.num_branches; ++j)
        acc += gate_value<acc_t>(p.branches[j], r) *
               static_cast<acc_t>(branch_row<scalar_t>(p.branches[j], r)[c]);
      o[c] = static_cast<scalar_t>(acc);
    }
  });
}

template <typename scalar_t>
void gate_combine_bwd(const GateParams& p) {
  using acc_t = gate_acc_t<scalar_t>;
  for_each_gate_row(p, [&](int64_t row, const GateRowIndex& r) {
    const scalar_t* d_out = static_cast<const scalar_t*>(p.out) +
                            r.offset(p.out_batch_stride, p.out_row_stride, p.out_head_stride);
    for (int j = 0; j < p.num_branches; ++j) {
      const GateBranch& x = p.branches[j];
      const acc_t g = gate_value<acc_t>(x, r);
      const scalar_t* o = branch_row<scalar_t>(x, r);
      scalar_t* d_o = x.d_o != nullptr ? static_cast<scalar_t*>(x.d_o) + row * p.head_dim : nullptr;
      acc_t dg = 0, dot = 0;
      for (int64_t c = 0; c < p.head_dim; ++c) {
        const acc_t d = static_cast<acc_t>(d_out[c]);
        dg += d * static_cast<acc_t>(o[c]);
        if (d_o == nullptr) continue;
        d_o[c] = static_cast<scalar_t>(g * d);
        dot += static_cast<acc_t>(o[c]) * static_cast<acc_t>(d_o[c]);
      }
      if (d_o == nullptr) dot = g * dg;  // rowsum(o * g do), no rounded d_o in between
      static_cast<acc_t*>(x.d_gate)[row] = dg;
      if (x.row_dot != nullptr)  // [B, Hq, T]
        static_cast<acc_t*>(x.row_dot)[(r.b * p.num_heads + r.h) * p.seqlen + r.t] = dot;
    }
  });
}

#define NSA_INSTANTIATE_GATE(T)                        \
  template void gate_combine<T>(const GateParams&);    \
  template void gate_combine_bwd<T>(const GateParams&);
NSA_INSTANTIATE_GATE(float)
NSA_INSTANTIATE_GATE(double)
NSA_INSTANTIATE_GATE(c10::Half)
NSA_INSTANTIATE_GATE(c10::BFloat16)

}  // namespace nsa::cpu
