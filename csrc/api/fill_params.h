// Turns tensors into the plain parameter structs (csrc/include/nsa/params.h).
// The only place, with ops.cpp and the *_ops.cpp backends, that touches torch.
#pragma once

#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/masked_fill.h>
#include <ATen/ops/gt.h>
#include <ATen/ops/lt.h>
#include <ATen/ops/logical_or.h>

#include <algorithm>
#include <limits>
#include <optional>

#include "nsa/params.h"
#include "nsa/rules.h"

namespace nsa::api {

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "nsa_cuda: ", name, " must be 4-D [B, T, H, D], got ", t.dim(), "-D");
  TORCH_CHECK(t.stride(-1) == 1, "nsa_cuda: ", name, " must have a contiguous last dim");
}

// Accumulate type of the softmax statistics: fp64 for fp64 inputs (gradcheck),
// fp32 otherwise.
inline at::ScalarType lse_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline const int32_t* cu_seqlens_ptr(const std::optional<at::Tensor>& cu_seqlens) {
  if (!cu_seqlens.has_value()) return nullptr;
  TORCH_CHECK(cu_seqlens->scalar_type() == at::kInt && cu_seqlens->dim() == 1 &&
                  cu_seqlens->is_contiguous(),
              "nsa_cuda: cu_seqlens must be a contiguous 1-D int32 tensor");
  return cu_seqlens->data_ptr<int32_t>();
}

inline int64_t num_seqs(const at::Tensor& q, const std::optional<at::Tensor>& cu_seqlens) {
  return cu_seqlens.has_value() ? cu_seqlens->size(0) - 1 : q.size(0);
}

inline int64_t seqlen(const at::Tensor& q, const std::optional<at::Tensor>& cu_seqlens,
                      int64_t max_seqlen) {
  return cu_seqlens.has_value() ? max_seqlen : q.size(1);
}

// The ops' own guards, for callers of torch.ops.nsa_cuda.* that skip the Python
// checks (nsa_cuda/_validate.py gives the friendlier messages): whatever passes
// here cannot make a kernel read or write out of bounds.
inline void check_attn_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const char* k_name, const char* v_name, bool same_rows) {
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, k_name);
  check_last_dim_contiguous(v, v_name);
  for (const auto* t : {&k, &v}) {
    const char* name = t == &k ? k_name : v_name;
    TORCH_CHECK(t->device() == q.device(), "nsa_cuda: ", name, " is on ", t->device(),
                " but q is on ", q.device());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "nsa_cuda: ", name, " has dtype ",
                t->scalar_type(), " but q has ", q.scalar_type());
    TORCH_CHECK(t->size(0) == q.size(0), "nsa_cuda: ", name, " has batch ", t->size(0),
                " but q has ", q.size(0));
    if (same_rows)
      TORCH_CHECK(t->size(1) == q.size(1), "nsa_cuda: ", name, " has ", t->size(1),
                  " rows but q has ", q.size(1));
  }
  TORCH_CHECK(k.size(1) == v.size(1) && k.size(2) == v.size(2), "nsa_cuda: ", k_name, " ",
              k.sizes(), " and ", v_name, " ", v.sizes(), " differ in rows or heads");
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "nsa_cuda: Hq (", q.size(2),
              ") must be a multiple of Hkv (", k.size(2), ")");
  TORCH_CHECK(k.size(3) == q.size(3), "nsa_cuda: ", k_name, " has head dim ", k.size(3),
              " but q has ", q.size(3));
}

// Varlen: cu_seqlens on q's device, q packed as [1, total, ...]. Returns the
// token bound the kernels cover: max_seqlen when given (> 0), else the total.
inline int64_t checked_seqlen(const at::Tensor& q, const std::optional<at::Tensor>& cu_seqlens,
                              int64_t max_seqlen) {
  if (!cu_seqlens.has_value()) return q.size(1);
  TORCH_CHECK(cu_seqlens->device() == q.device(), "nsa_cuda: cu_seqlens is on ",
              cu_seqlens->device(), " but q is on ", q.device());
  TORCH_CHECK(cu_seqlens->scalar_type() == at::kInt && cu_seqlens->dim() == 1 &&
                  cu_seqlens->size(0) >= 1,
              "nsa_cuda: cu_seqlens must be a 1-D int32 tensor of N+1 offsets");
  TORCH_CHECK(q.size(0) == 1, "nsa_cuda: with cu_seqlens, q must be packed as [1, total, H, D], "
              "got batch ", q.size(0));
  return max_seqlen > 0 ? std::min<int64_t>(max_seqlen, q.size(1)) : q.size(1);
}

inline void check_nsa_sizes(int64_t l, int64_t d, int64_t lp) {
  TORCH_CHECK(l > 0 && d > 0 && l % d == 0, "nsa_cuda: cmp_block_size (", l, ") and cmp_stride (",
              d, ") must be positive with cmp_stride dividing cmp_block_size");
  TORCH_CHECK(lp > 0 && lp % d == 0, "nsa_cuda: slc_block_size (", lp,
              ") must be a positive multiple of cmp_stride (", d, ")");
}

// int64 block ids beyond int32 become unused slots (-1) rather than wrapping
// around into valid ones.
inline at::Tensor checked_block_indices(const at::Tensor& bi, const at::Tensor& q, int64_t hkv) {
  TORCH_CHECK(bi.device() == q.device(), "nsa_cuda: block_indices is on ", bi.device(),
              " but q is on ", q.device());
  TORCH_CHECK(bi.scalar_type() == at::kInt || bi.scalar_type() == at::kLong,
              "nsa_cuda: block_indices must be int32 or int64, got ", bi.scalar_type());
  TORCH_CHECK(bi.dim() == 4 && bi.size(0) == q.size(0) && bi.size(1) == q.size(1) &&
                  bi.size(2) == hkv && bi.size(3) >= 1,
              "nsa_cuda: block_indices must be [B, T, Hkv, n] = [", q.size(0), ", ", q.size(1),
              ", ", hkv, ", n >= 1], got ", bi.sizes());
  at::Tensor out = bi;
  if (bi.scalar_type() == at::kLong) {
    const auto big = bi.gt(std::numeric_limits<int32_t>::max()).logical_or(bi.lt(-1));
    out = bi.masked_fill(big, -1).to(at::kInt);
  }
  return out.stride(3) == 1 ? out : out.contiguous();
}

// Forward outputs: o [B, T, Hq, Dv] in q's dtype, lse [B, Hq, T].
inline std::tuple<at::Tensor, at::Tensor> alloc_fwd_outputs(const at::Tensor& q,
                                                            const at::Tensor& v) {
  auto o = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  auto lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(lse_dtype(q)));
  return {o, lse};
}

inline AttnFwdParams make_fwd_params(Branch branch, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& o,
                                     const at::Tensor& lse,
                                     const std::optional<at::Tensor>& block_indices,
                                     const std::optional<at::Tensor>& cu_seqlens,
                                     int64_t max_seqlen, double scale) {
  AttnFwdParams p{};
  p.branch = branch;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = o.data_ptr();
  p.lse = lse.data_ptr();
  p.q_batch_stride = q.stride(0), p.q_row_stride = q.stride(1), p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_row_stride = k.stride(1), p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_row_stride = v.stride(1), p.v_head_stride = v.stride(2);
  p.o_batch_stride = o.stride(0), p.o_row_stride = o.stride(1), p.o_head_stride = o.stride(2);
  p.lse_batch_stride = lse.stride(0), p.lse_head_stride = lse.stride(1);
  if (block_indices.has_value()) {
    const auto& bi = *block_indices;
    TORCH_CHECK(bi.scalar_type() == at::kInt && bi.dim() == 4 && bi.stride(3) == 1,
                "nsa_cuda: block_indices must be a 4-D int32 tensor with a contiguous last dim "
                "(checked_block_indices converts)");
    p.block_indices = bi.data_ptr<int32_t>();
    p.bi_batch_stride = bi.stride(0), p.bi_row_stride = bi.stride(1), p.bi_head_stride = bi.stride(2);
    p.slc_num_blocks = bi.size(3);
  }
  p.cu_seqlens = cu_seqlens_ptr(cu_seqlens);
  p.num_seqs = num_seqs(q, cu_seqlens);
  p.seqlen = seqlen(q, cu_seqlens, max_seqlen);
  p.k_rows = k.size(1);
  p.num_heads_q = q.size(2);
  p.num_heads_kv = k.size(2);
  p.group = q.size(2) / k.size(2);
  p.head_dim_qk = q.size(3);
  p.head_dim_v = v.size(3);
  p.scale = scale;
  return p;
}

inline AttnBwdParams make_bwd_params(const AttnFwdParams& fwd, const at::Tensor& dout,
                                     const std::optional<at::Tensor>& dlse,
                                     const at::Tensor& dq, const at::Tensor& dk,
                                     const at::Tensor& dv) {
  AttnBwdParams p{};
  static_cast<AttnFwdParams&>(p) = fwd;
  TORCH_CHECK(dout.stride(-1) == 1, "nsa_cuda: the output gradient must have a contiguous last dim");
  p.dout = dout.data_ptr();
  p.do_batch_stride = dout.stride(0), p.do_row_stride = dout.stride(1), p.do_head_stride = dout.stride(2);
  p.dlse = dlse.has_value() ? dlse->data_ptr() : nullptr;
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_batch_stride = dq.stride(0), p.dq_row_stride = dq.stride(1), p.dq_head_stride = dq.stride(2);
  p.dk_batch_stride = dk.stride(0), p.dk_row_stride = dk.stride(1), p.dk_head_stride = dk.stride(2);
  p.dv_batch_stride = dv.stride(0), p.dv_row_stride = dv.stride(1), p.dv_head_stride = dv.stride(2);
  return p;
}

inline SelectParams make_select_params(const at::Tensor& q, const at::Tensor& k_cmp,
                                       const at::Tensor& lse_cmp, const at::Tensor& block_indices,
                                       const std::optional<at::Tensor>& cu_seqlens,
                                       int64_t max_seqlen, double scale) {
  SelectParams p{};
  p.q = q.data_ptr();
  p.k_cmp = k_cmp.data_ptr();
  p.lse_cmp = lse_cmp.data_ptr();
  p.block_indices = block_indices.data_ptr<int32_t>();
  p.q_batch_stride = q.stride(0), p.q_row_stride = q.stride(1), p.q_head_stride = q.stride(2);
  p.k_batch_stride = k_cmp.stride(0), p.k_row_stride = k_cmp.stride(1), p.k_head_stride = k_cmp.stride(2);
  p.lse_batch_stride = lse_cmp.stride(0), p.lse_head_stride = lse_cmp.stride(1);
  p.bi_batch_stride = block_indices.stride(0), p.bi_row_stride = block_indices.stride(1),
  p.bi_head_stride = block_indices.stride(2);
  p.cu_seqlens = cu_seqlens_ptr(cu_seqlens);
  p.num_seqs = num_seqs(q, cu_seqlens);
  p.seqlen = seqlen(q, cu_seqlens, max_seqlen);
  p.k_rows = k_cmp.size(1);
  p.num_heads_q = q.size(2);
  p.num_heads_kv = k_cmp.size(2);
  p.group = q.size(2) / k_cmp.size(2);
  p.head_dim_qk = q.size(3);
  p.scale = scale;
  return p;
}

}  // namespace nsa::api
