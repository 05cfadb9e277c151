// The bodies of the nsa_cuda ops, written once for every backend: allocate the
// outputs, fill the plain params, call the backend's kernel. A backend is a
// struct with static functions
//   attn_fwd(const AttnFwdParams&, ScalarType), attn_bwd(const AttnBwdParams&, ScalarType),
//   select_blocks(const SelectParams&, ScalarType),
//   mean_compress(const cpu::CompressParams&, ScalarType),
//   mean_compress_bwd(const cpu::CompressParams&, ScalarType)
// plus `prepare(const at::Tensor&)` returning a guard for the duration of the call.
#pragma once

#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include "api/fill_params.h"
#include "cpu/kernels.h"

namespace nsa::api {

using OptTensor = std::optional<at::Tensor>;

template <class Backend>
std::tuple<at::Tensor, at::Tensor> attn_fwd(Branch branch, const at::Tensor& q,
                                            const at::Tensor& k, const at::Tensor& v,
                                            const OptTensor& block_indices,
                                            const OptTensor& cu_seqlens, int64_t max_seqlen,
                                            double scale, int64_t cmp_block_size,
                                            int64_t cmp_stride, int64_t slc_block_size,
                                            int64_t window_size) {
  [[maybe_unused]] auto guard = Backend::prepare(q);
  auto [o, lse] = alloc_fwd_outputs(q, v);
  AttnFwdParams p = make_fwd_params(branch, q, k, v, o, lse, block_indices, cu_seqlens,
                                    max_seqlen, scale);
  p.cmp_block_size = cmp_block_size;
  p.cmp_stride = cmp_stride;
  p.slc_block_size = slc_block_size;
  p.window_size = window_size;
  if (q.numel() > 0) Backend::attn_fwd(p, q.scalar_type());
  return {o, lse};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd(
    Branch branch, const at::Tensor& dout, const OptTensor& dlse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse,
    const OptTensor& block_indices, const OptTensor& cu_seqlens, int64_t max_seqlen,
    double scale, int64_t cmp_block_size, int64_t cmp_stride, int64_t slc_block_size,
    int64_t window_size) {
  [[maybe_unused]] auto guard = Backend::prepare(q);
  // Zeros: key rows no query visits (extra k_cmp rows, varlen padding) get no write.
  auto dq = at::zeros_like(q);
  auto dk = at::zeros_like(k);
  auto dv = at::zeros_like(v);
  const at::Tensor dout_c = dout.stride(-1) == 1 ? dout : dout.contiguous();
  OptTensor dlse_c;
  if (dlse.has_value()) dlse_c = dlse->to(lse.scalar_type()).contiguous();
  AttnFwdParams fwd = make_fwd_params(branch, q, k, v, o, lse, block_indices, cu_seqlens,
                                      max_seqlen, scale);
  fwd.cmp_block_size = cmp_block_size;
  fwd.cmp_stride = cmp_stride;
  fwd.slc_block_size = slc_block_size;
  fwd.window_size = window_size;
  TORCH_CHECK(lse.is_contiguous(), "nsa_cuda: lse must be contiguous");
  const AttnBwdParams p = make_bwd_params(fwd, dout_c, dlse_c, dq, dk, dv);
  if (q.numel() > 0) Backend::attn_bwd(p, q.scalar_type());
  return {dq, dk, dv};
}

template <class Backend>
at::Tensor select_blocks(const at::Tensor& q, const at::Tensor& k_cmp, const at::Tensor& lse_cmp,
                         const OptTensor& cu_seqlens, int64_t max_seqlen, int64_t cmp_block_size,
                         int64_t cmp_stride, int64_t slc_block_size, int64_t slc_num_blocks,
                         int64_t slc_init_blocks, int64_t slc_local_blocks, double scale) {
  [[maybe_unused]] auto guard = Backend::prepare(q);
  auto block_indices =
      at::empty({q.size(0), q.size(1), k_cmp.size(2), slc_num_blocks}, q.options().dtype(at::kInt));
  TORCH_CHECK(lse_cmp.is_contiguous(), "nsa_cuda: lse_cmp must be contiguous");
  SelectParams p = make_select_params(q, k_cmp, lse_cmp, block_indices, cu_seqlens, max_seqlen, scale);
  p.cmp_block_size = cmp_block_size;
  p.cmp_stride = cmp_stride;
  p.slc_block_size = slc_block_size;
  p.slc_num_blocks = slc_num_blocks;
  p.slc_init_blocks = slc_init_blocks;
  p.slc_local_blocks = slc_local_blocks;
  if (block_indices.numel() > 0) Backend::select_blocks(p, q.scalar_type());
  return block_indices;
}

// Rows of the compressed output: Tc(T) per batch entry, or the shape-only bound
// total // d in varlen mode (packed rows, zero past the last sequence's blocks).
inline int64_t compressed_rows(const at::Tensor& x, const OptTensor& cu_seqlens,
                               int64_t cmp_block_size, int64_t cmp_stride) {
  return cu_seqlens.has_value() ? packed_cmp_rows_bound(x.size(1), cmp_stride)
                                : num_cmp_blocks(x.size(1), cmp_block_size, cmp_stride);
}

inline cpu::CompressParams make_compress_params(const at::Tensor& x, const at::Tensor& out,
                                                const OptTensor& cu_seqlens,
                                                int64_t cmp_block_size, int64_t cmp_stride) {
  cpu::CompressParams p{};
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  p.x_batch_stride = x.stride(0), p.x_row_stride = x.stride(1), p.x_head_stride = x.stride(2);
  p.out_batch_stride = out.stride(0), p.out_row_stride = out.stride(1), p.out_head_stride = out.stride(2);
  p.cu_seqlens = cu_seqlens_ptr(cu_seqlens);
  p.num_seqs = num_seqs(x, cu_seqlens);
  p.seqlen = x.size(1);
  p.num_heads = x.size(2);
  p.head_dim = x.size(3);
  p.cmp_block_size = cmp_block_size;
  p.cmp_stride = cmp_stride;
  return p;
}

template <class Backend>
at::Tensor mean_compress(const at::Tensor& x, const OptTensor& cu_seqlens, int64_t cmp_block_size,
                         int64_t cmp_stride) {
  [[maybe_unused]] auto guard = Backend::prepare(x);
  check_last_dim_contiguous(x, "x");
  auto out = at::zeros({x.size(0), compressed_rows(x, cu_seqlens, cmp_block_size, cmp_stride),
                        x.size(2), x.size(3)},
                       x.options());
  if (out.numel() > 0)
    Backend::mean_compress(make_compress_params(x, out, cu_seqlens, cmp_block_size, cmp_stride),
                           x.scalar_type());
  return out;
}

template <class Backend>
at::Tensor mean_compress_bwd(const at::Tensor& grad_cmp, const at::Tensor& x,
                             const OptTensor& cu_seqlens, int64_t cmp_block_size,
                             int64_t cmp_stride) {
  [[maybe_unused]] auto guard = Backend::prepare(x);
  const at::Tensor g = grad_cmp.contiguous();
  auto dx = at::zeros_like(x, at::MemoryFormat::Contiguous);
  if (dx.numel() > 0)
    Backend::mean_compress_bwd(make_compress_params(dx, g, cu_seqlens, cmp_block_size, cmp_stride),
                               x.scalar_type());
  return dx;
}

// Registers the op bodies above for one dispatch key.
template <class Backend>
void register_backend(torch::Library& m) {
  using namespace nsa;
  m.impl("mean_compress", &mean_compress<Backend>);
  m.impl("mean_compress_bwd", &mean_compress_bwd<Backend>);
  m.impl("compressed_attn_fwd", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const OptTensor& cu, int64_t max_seqlen, int64_t l, int64_t d,
                                   double scale) {
    return attn_fwd<Backend>(Branch::kCompressed, q, k, v, std::nullopt, cu, max_seqlen, scale, l,
                             d, 0, 0);
  });
  m.impl("compressed_attn_bwd",
         [](const at::Tensor& dout, const OptTensor& dlse, const at::Tensor& q, const at::Tensor& k,
            const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse, const OptTensor& cu,
            int64_t max_seqlen, int64_t l, int64_t d, double scale) {
           return attn_bwd<Backend>(Branch::kCompressed, dout, dlse, q, k, v, o, lse, std::nullopt,
                                    cu, max_seqlen, scale, l, d, 0, 0);
         });
  m.impl("select_blocks", &select_blocks<Backend>);
  m.impl("selected_attn_fwd", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& bi, const OptTensor& cu, int64_t max_seqlen,
                                 int64_t lp, double scale) {
    return attn_fwd<Backend>(Branch::kSelected, q, k, v, bi, cu, max_seqlen, scale, 0, 1, lp, 0);
  });
  m.impl("selected_attn_bwd",
         [](const at::Tensor& dout, const OptTensor& dlse, const at::Tensor& q, const at::Tensor& k,
            const at::Tensor& v, const at::Tensor& bi, const at::Tensor& o, const at::Tensor& lse,
            const OptTensor& cu, int64_t max_seqlen, int64_t lp, double scale) {
           return attn_bwd<Backend>(Branch::kSelected, dout, dlse, q, k, v, o, lse, bi, cu,
                                    max_seqlen, scale, 0, 1, lp, 0);
         });
  m.impl("window_attn_fwd", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const OptTensor& cu, int64_t max_seqlen, int64_t w, double scale) {
    return attn_fwd<Backend>(Branch::kWindow, q, k, v, std::nullopt, cu, max_seqlen, scale, 0, 1,
                             0, w);
  });
  m.impl("window_attn_bwd",
         [](const at::Tensor& dout, const OptTensor& dlse, const at::Tensor& q, const at::Tensor& k,
            const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse, const OptTensor& cu,
            int64_t max_seqlen, int64_t w, double scale) {
           return attn_bwd<Backend>(Branch::kWindow, dout, dlse, q, k, v, o, lse, std::nullopt, cu,
                                    max_seqlen, scale, 0, 1, 0, w);
         });
}

}  // namespace nsa::api
