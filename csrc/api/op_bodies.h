// The bodies of the nsa_cuda ops, written once for every backend: check the
// arguments, allocate the outputs, fill the plain params, call the backend's
// kernel. A backend is a struct with static members:
//   kHasBackward                       whether it implements the *_bwd ops
//   kKeepsDecodeScores                 compressed_select_decode passes the attention's
//                                      scores to the selection (cmp_scores)
//   prepare(q) -> guard                held for the call (CUDA: the device guard)
//   check_support(q, Dk, Dv, op)       dtype / head dims this backend runs
//   input(t) -> tensor                 layout the kernels need (CUDA: 16-byte aligned rows)
//   fresh(t)                           called on every new output (CUDA: optional NaN poison)
//   attn_fwd(AttnFwdParams, dtype), attn_bwd(AttnBwdParams, dtype),
//   select_blocks(SelectParams, dtype), mean_compress(CompressParams, dtype),
//   mean_compress_bwd(CompressParams, dtype),
//   attn_decode(AttnFwdParams, dtype), select_blocks_decode(SelectParams, dtype),
//   update_cmp_cache(CompressParams, dtype),
//   append_kv_to_cache(CacheAppendParams, dtype)  the KV-cache (decode) kernels
//   gate_combine(GateParams, dtype), gate_combine_bwd(GateParams, dtype)
//                                      sparse_attn's gated sum and its gradient
//   kWritesEveryGradElement            the backward kernels write every element of
//                                      their gradients (zeros where nothing flows), so
//                                      the gradients are not zero-filled first
//   kFusesDecodeGates                  sparse_attn_decode sums the gated branches in
//                                      one kernel; such a backend also has
//   attn_decode_partials(std::vector<PendingDecode>&, dtype)  (the branches' unmerged
//                                      decode attention, in one launch) and
//   decode_gate_combine(DecodeGateParams, dtype)
#pragma once

#include <ATen/ops/arange.h>
#include <ATen/ops/ge.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/isneginf.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <string>
#include <vector>

#include "api/fill_params.h"
#include "cpu/kernels.h"

namespace nsa::api {

using OptTensor = std::optional<at::Tensor>;

// Rows of the compressed output: Tc(T) per batch entry, or the shape-only bound
// total // d in varlen mode (packed rows, zero past the last sequence's blocks).
inline int64_t compressed_rows(const at::Tensor& x, const OptTensor& cu_seqlens,
                               int64_t cmp_block_size, int64_t cmp_stride) {
  return cu_seqlens.has_value() ? packed_cmp_rows_bound(x.size(1), cmp_stride)
                                : num_cmp_blocks(x.size(1), cmp_block_size, cmp_stride);
}

// Decode: seqlens_k is an int32 [B] tensor on q's device, the keys of batch
// entry b. A CPU tensor's values are checked against the cache's capacity here;
// on CUDA that would cost a host sync, so the kernels clamp to the capacity.
inline void check_seqlens_k(const at::Tensor& seqlens_k, const at::Tensor& q, int64_t capacity,
                            bool compressed, int64_t l, int64_t d, const char* op) {
  TORCH_CHECK(seqlens_k.device() == q.device(), "nsa_cuda: ", op, ": seqlens_k is on ",
              seqlens_k.device(), " but q is on ", q.device());
  TORCH_CHECK(seqlens_k.scalar_type() == at::kInt && seqlens_k.dim() == 1 &&
                  seqlens_k.size(0) == q.size(0) && seqlens_k.is_contiguous(),
              "nsa_cuda: ", op, ": seqlens_k must be a contiguous int32 [B] = [", q.size(0),
              "] tensor, got ", seqlens_k.scalar_type(), " ", seqlens_k.sizes());
  if (!seqlens_k.is_cpu()) return;
  const int32_t* len = seqlens_k.data_ptr<int32_t>();
  for (int64_t b = 0; b < seqlens_k.size(0); ++b) {
    const int64_t rows = compressed ? num_cmp_blocks(len[b], l, d) : len[b];
    TORCH_CHECK(len[b] >= 0 && rows <= capacity, "nsa_cuda: ", op, ": batch entry ", b, " has ",
                len[b], " tokens, more than its cache holds (", capacity,
                compressed ? " compressed rows)" : " rows)");
  }
}

// One decode branch's unmerged KV splits (decode_attn's normalised partials), kept
// for the gated sum of sparse_attn_decode.
struct DecodePartials {
  at::Tensor o_part, lse_part;  // fp32 [splits, B, S, Hq, Dv], [splits, B, S, Hq]
  int num_splits = 0;
};

// A decode branch of sparse_attn_decode whose unmerged splits are launched together
// with the step's other branches (Backend::attn_decode_partials): its params, where
// its partials go, and the tensors the params point into, kept alive until then.
struct PendingDecode {
  AttnFwdParams params;
  DecodePartials* partials;
  std::vector<at::Tensor> alive;
};

// What one attention call needs besides q, k, v: the branch and its sizes.
struct AttnSpec {
  Branch branch;
  int64_t cmp_block_size = 1, cmp_stride = 1, slc_block_size = 1, window_size = 1;
  const char* op;
};

template <class Backend>
AttnFwdParams attn_params(const AttnSpec& spec, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse,
                          const OptTensor& block_indices, const OptTensor& cu_seqlens,
                          int64_t seqlen, double scale) {
  AttnFwdParams p = make_fwd_params(spec.branch, q, k, v, o, lse, block_indices, cu_seqlens,
                                    seqlen, scale);
  p.cmp_block_size = spec.cmp_block_size;
  p.cmp_stride = spec.cmp_stride;
  p.slc_block_size = spec.slc_block_size;
  p.window_size = spec.window_size;
  return p;
}

// Varlen: the rows past the last sequence (cu_seqlens[-1] and on) belong to no
// sequence and no kernel writes them. Left as at::empty gives them, a NaN there
// reaches the gate gradients (rowsum(o * do) with do = 0) and, through the layer's
// projections, every weight; so they get the reference's o = 0, lse = -inf. The CPU
// reads the total; on CUDA a device-side mask keeps the call free of host syncs.
inline void clear_padding_rows(at::Tensor& o, at::Tensor& lse, const at::Tensor& cu_seqlens) {
  const int64_t rows = o.size(1);
  if (rows == 0 || cu_seqlens.numel() == 0) return;
  if (cu_seqlens.is_cpu()) {
    const int64_t total = std::min<int64_t>(cu_seqlens.select(0, -1).item<int64_t>(), rows);
    if (total >= rows) return;
    o.narrow(1, total, rows - total).zero_();
    lse.narrow(2, total, rows - total).fill_(-INFINITY);
    return;
  }
  const at::Tensor pad = at::ge(at::arange(rows, cu_seqlens.options().dtype(at::kLong)),
                                cu_seqlens.select(0, -1).to(at::kLong));
  o.masked_fill_(pad.view({1, rows, 1, 1}), 0);
  lse.masked_fill_(pad.view({1, 1, rows}), -INFINITY);
}

// Forward of one branch; with seqlens_k, the decode form (queries at the end of
// each cached sequence, keys from the caches).
template <class Backend>
std::tuple<at::Tensor, at::Tensor> attn_fwd(const AttnSpec& spec, const at::Tensor& q_in,
                                            const at::Tensor& k_in, const at::Tensor& v_in,
                                            const OptTensor& block_indices,
                                            const OptTensor& cu_seqlens, int64_t max_seqlen,
                                            double scale,
                                            const OptTensor& seqlens_k = std::nullopt,
                                            float* cmp_scores = nullptr,
                                            DecodePartials* partials = nullptr,
                                            std::vector<PendingDecode>* pending = nullptr) {
  const bool cmp = spec.branch == Branch::kCompressed;
  const bool decode = seqlens_k.has_value();
  check_attn_inputs(q_in, k_in, v_in, cmp ? "k_cmp" : "k", cmp ? "v_cmp" : "v",
                    !cmp && !decode);
  Backend::check_support(q_in, q_in.size(3), v_in.size(3), spec.op);
  [[maybe_unused]] auto guard = Backend::prepare(q_in);
  const int64_t seqlen = checked_seqlen(q_in, cu_seqlens, max_seqlen);
  if (decode)
    check_seqlens_k(*seqlens_k, q_in, k_in.size(1), cmp, spec.cmp_block_size, spec.cmp_stride,
                    spec.op);
  OptTensor bi;
  if (block_indices.has_value()) bi = checked_block_indices(*block_indices, q_in, k_in.size(2));
  const at::Tensor q = Backend::input(q_in), k = Backend::input(k_in), v = Backend::input(v_in);
  auto [o, lse] = alloc_fwd_outputs(q, v);
  Backend::fresh(o), Backend::fresh(lse);
  AttnFwdParams p = attn_params<Backend>(spec, q, k, v, o, lse, bi, cu_seqlens, seqlen, scale);
  if (decode) p.seqlens_k = seqlens_k->data_ptr<int32_t>();
  p.cmp_scores = cmp_scores;
  if (q.numel() > 0) {
    if (partials != nullptr) {  // launched later, with the step's other branches
      TORCH_CHECK(Backend::kFusesDecodeGates && pending != nullptr, "nsa_cuda: ", spec.op,
                  ": decode partials need a fusing backend and a pending list");
      std::vector<at::Tensor> alive{q, k, v, o, lse};
      if (bi.has_value()) alive.push_back(*bi);
      pending->push_back(PendingDecode{p, partials, std::move(alive)});
    } else if (decode)
      Backend::attn_decode(p, q.scalar_type());
    else
      Backend::attn_fwd(p, q.scalar_type());
  }
  if (cu_seqlens.has_value() && !decode) clear_padding_rows(o, lse, *cu_seqlens);
  return {o, lse};
}

// A gradient like t (contiguous). The CPU kernels leave rows nothing flows to
// unwritten (key rows no query visits: extra k_cmp rows, varlen padding), so their
// gradients start as zeros; the CUDA kernels write every element, and a zero fill
// would be one more pass over each gradient (about 1.6 GB for dq at 64k on the
// paper shape). fresh() poisons it under NSA_POISON_OUTPUTS (CUDA; always in the
// emulator), so an element the kernels miss shows up as NaN in the tests.
template <class Backend>
at::Tensor grad_buffer(const at::Tensor& t) {
  at::Tensor g = Backend::kWritesEveryGradElement
                     ? at::empty_like(t, at::MemoryFormat::Contiguous)
                     : at::zeros_like(t, at::MemoryFormat::Contiguous);
  Backend::fresh(g);
  return g;
}

// Gates (and the backward's dout_scale) are read in the accumulation type: float,
// double for float64.
inline at::ScalarType gate_acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A per-row tensor like a gate: floating-point, shaped as `like`'s first three dims
// (`dims` names them), on its device; returned in the accumulation type of `data`.
inline at::Tensor gate_like(const at::Tensor& g, const at::Tensor& like, at::ScalarType data,
                            const char* op, const std::string& name,
                            const char* dims = "[B, T, Hq]") {
  TORCH_CHECK(g.dim() == 3 && g.sizes() == like.sizes().slice(0, 3) &&
                  at::isFloatingType(g.scalar_type()) && g.device() == like.device(),
              "nsa_cuda: ", op, ": ", name, " must be a floating-point ", dims, " = ",
              like.sizes().slice(0, 3), " tensor on ", like.device(), ", got ", g.scalar_type(),
              " ", g.sizes(), " on ", g.device());
  return g.to(gate_acc_type(data));
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd(
    const AttnSpec& spec, const at::Tensor& dout, const OptTensor& dlse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& o, const at::Tensor& lse,
    const OptTensor& block_indices, const OptTensor& cu_seqlens, int64_t max_seqlen,
    double scale, const OptTensor& dq_in = std::nullopt, const OptTensor& dk_in = std::nullopt,
    const OptTensor& dv_in = std::nullopt, const OptTensor& delta = std::nullopt,
    const OptTensor& dout_scale = std::nullopt) {
  const bool cmp = spec.branch == Branch::kCompressed;
  check_attn_inputs(q_in, k_in, v_in, cmp ? "k_cmp" : "k", cmp ? "v_cmp" : "v", !cmp);
  Backend::check_support(q_in, q_in.size(3), v_in.size(3), spec.op);
  TORCH_CHECK(dout.sizes() == o.sizes() && o.size(3) == v_in.size(3) &&
                  o.sizes().slice(0, 3) == q_in.sizes().slice(0, 3),
              "nsa_cuda: ", spec.op, ": dout and o must be [B, T, Hq, Dv], got ", dout.sizes(),
              " and ", o.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q_in.size(0) && lse.size(1) == q_in.size(2) &&
                  lse.size(2) == q_in.size(1) && lse.scalar_type() == lse_dtype(q_in),
              "nsa_cuda: ", spec.op, ": lse must be ", lse_dtype(q_in), " [B, Hq, T]");
  [[maybe_unused]] auto guard = Backend::prepare(q_in);
  const int64_t seqlen = checked_seqlen(q_in, cu_seqlens, max_seqlen);
  OptTensor bi;
  if (block_indices.has_value()) bi = checked_block_indices(*block_indices, q_in, k_in.size(2));
  const at::Tensor q = Backend::input(q_in), k = Backend::input(k_in), v = Backend::input(v_in);
  auto dq = grad_buffer<Backend>(q), dk = grad_buffer<Backend>(k), dv = grad_buffer<Backend>(v);
  const at::Tensor dout_c = Backend::input(dout.contiguous());
  const at::Tensor o_c = Backend::input(o.contiguous());
  // Standard strides on size-1 dims too (contiguous() keeps whatever stride a size-1
  // dim had): the CUDA backward sizes its delta workspace and its varlen row count
  // (dq rows to zero) from lse's batch and head strides.
  at::Tensor lse_c = lse.contiguous();
  if (lse_c.stride(2) != 1 || lse_c.stride(1) != lse_c.size(2) ||
      lse_c.stride(0) != lse_c.size(1) * lse_c.size(2))
    lse_c = lse_c.clone(at::MemoryFormat::Contiguous);
  OptTensor dlse_c;
  if (dlse.has_value()) dlse_c = dlse->to(lse.scalar_type()).contiguous();
  const AttnFwdParams fwd =
      attn_params<Backend>(spec, q, k, v, o_c, lse_c, bi, cu_seqlens, seqlen, scale);
  AttnBwdParams p = make_bwd_params(fwd, dout_c, dlse_c, dq, dk, dv);
  // dout_scale [B, T, Hq]: the gradient of o is dout_scale * dout (sparse_attn passes
  // the branch's gate and the one d o), read in the accumulation type.
  at::Tensor scale_c;
  if (dout_scale.has_value()) {
    scale_c = gate_like(*dout_scale, dout, q.scalar_type(), spec.op, "dout_scale");
    p.dout_scale = scale_c.data_ptr();
    p.ds_batch_stride = scale_c.stride(0), p.ds_row_stride = scale_c.stride(1);
    p.ds_head_stride = scale_c.stride(2);
  }
  // delta = rowsum(o * dout) given by the caller: dlse and the rule for rows that saw
  // no key (delta 0: the kernels then never meet 0 * inf) folded in here, in lse's
  // layout.
  at::Tensor delta_c;
  if (delta.has_value()) {
    TORCH_CHECK(delta->sizes() == lse.sizes() && delta->scalar_type() == lse.scalar_type() &&
                    delta->device() == lse.device(),
                "nsa_cuda: ", spec.op, ": delta must be like lse (", lse.scalar_type(), " ",
                lse.sizes(), "), got ", delta->scalar_type(), " ", delta->sizes());
    delta_c = dlse_c.has_value() ? delta->sub(*dlse_c) : *delta;
    delta_c = at::where(lse_c.isneginf(), at::zeros({}, delta_c.options()), delta_c).contiguous();
    p.delta_in = delta_c.data_ptr();
  }
  // The gradients to add: checked, in dq / dk / dv's layout (contiguous).
  at::Tensor* outs[3] = {&dq, &dk, &dv};
  const OptTensor* ins[3] = {&dq_in, &dk_in, &dv_in};
  const char* in_names[3] = {"dq_in", "dk_in", "dv_in"};
  at::Tensor added[3];
  for (int j = 0; j < 3; ++j) {
    if (!ins[j]->has_value()) continue;
    const at::Tensor& x = **ins[j];
    TORCH_CHECK(x.sizes() == outs[j]->sizes() && x.scalar_type() == outs[j]->scalar_type() &&
                    x.device() == outs[j]->device(),
                "nsa_cuda: ", spec.op, ": ", in_names[j], " must match the gradient it adds to (",
                outs[j]->scalar_type(), " ", outs[j]->sizes(), " on ", outs[j]->device(),
                "), got ", x.scalar_type(), " ", x.sizes(), " on ", x.device());
    added[j] = Backend::input(x.contiguous());
  }
  if constexpr (Backend::kWritesEveryGradElement) {  // the kernels add them
    p.dq_in = added[0].defined() ? added[0].data_ptr() : nullptr;
    p.dk_in = added[1].defined() ? added[1].data_ptr() : nullptr;
    p.dv_in = added[2].defined() ? added[2].data_ptr() : nullptr;
  }
  const bool launched = q.numel() > 0;
  if (launched)
    Backend::attn_bwd(p, q.scalar_type());
  else  // no query: nothing flows, and no kernel writes the key rows
    dq.zero_(), dk.zero_(), dv.zero_();
  if (!Backend::kWritesEveryGradElement || !launched)
    for (int j = 0; j < 3; ++j)
      if (added[j].defined()) outs[j]->add_(added[j]);
  return {dq, dk, dv};
}

template <class Backend>
at::Tensor select_blocks(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& lse_in,
                         const OptTensor& cu_seqlens, int64_t max_seqlen, int64_t cmp_block_size,
                         int64_t cmp_stride, int64_t slc_block_size, int64_t slc_num_blocks,
                         int64_t slc_init_blocks, int64_t slc_local_blocks, double scale,
                         const OptTensor& seqlens_k = std::nullopt,
                         const float* cmp_scores = nullptr) {
  const char* op = seqlens_k.has_value() ? "select_blocks_decode" : "select_blocks";
  check_attn_inputs(q_in, k_in, k_in, "k_cmp", "k_cmp", /*same_rows=*/false);
  Backend::check_support(q_in, q_in.size(3), -1, op);
  check_nsa_sizes(cmp_block_size, cmp_stride, slc_block_size);
  TORCH_CHECK(slc_num_blocks >= 1 && slc_init_blocks >= 0 && slc_local_blocks >= 1 &&
                  slc_init_blocks + slc_local_blocks <= slc_num_blocks,
              "nsa_cuda: select_blocks needs slc_num_blocks >= 1, slc_init_blocks >= 0, "
              "slc_local_blocks >= 1 and slc_init_blocks + slc_local_blocks <= slc_num_blocks, got ",
              slc_num_blocks, ", ", slc_init_blocks, ", ", slc_local_blocks);
  TORCH_CHECK(lse_in.device() == q_in.device() && lse_in.scalar_type() == lse_dtype(q_in) &&
                  lse_in.dim() == 3 && lse_in.size(0) == q_in.size(0) &&
                  lse_in.size(1) == q_in.size(2) && lse_in.size(2) == q_in.size(1),
              "nsa_cuda: lse_cmp must be a ", lse_dtype(q_in), " [B, Hq, T] = [", q_in.size(0), ", ",
              q_in.size(2), ", ", q_in.size(1), "] tensor on q's device, got ", lse_in.sizes(),
              " ", lse_in.scalar_type());
  [[maybe_unused]] auto guard = Backend::prepare(q_in);
  const int64_t seqlen = checked_seqlen(q_in, cu_seqlens, max_seqlen);
  if (seqlens_k.has_value())
    check_seqlens_k(*seqlens_k, q_in, k_in.size(1), true, cmp_block_size, cmp_stride, op);
  const at::Tensor q = Backend::input(q_in), k = Backend::input(k_in), lse = lse_in.contiguous();
  auto block_indices =
      at::empty({q.size(0), q.size(1), k.size(2), slc_num_blocks}, q.options().dtype(at::kInt));
  Backend::fresh(block_indices);
  SelectParams p = make_select_params(q, k, lse, block_indices, cu_seqlens, seqlen, scale);
  p.cmp_block_size = cmp_block_size;
  p.cmp_stride = cmp_stride;
  p.slc_block_size = slc_block_size;
  p.slc_num_blocks = slc_num_blocks;
  p.slc_init_blocks = slc_init_blocks;
  p.slc_local_blocks = slc_local_blocks;
  if (seqlens_k.has_value()) p.seqlens_k = seqlens_k->data_ptr<int32_t>();
  p.cmp_scores = cmp_scores;
  if (block_indices.numel() > 0) {
    if (seqlens_k.has_value())
      Backend::select_blocks_decode(p, q.scalar_type());
    else
      Backend::select_blocks(p, q.scalar_type());
  }
  return block_indices;
}

// compressed_attn_decode, then select_blocks_decode from its lse. A backend with
// kKeepsDecodeScores has the attention leave its q.k_cmp scores in a workspace
// [B, Hkv, S * G, k_cmp rows] fp32 that the selection reads instead of k_cmp.
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> compressed_select_decode(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& seqlens_k,
    int64_t l, int64_t d, int64_t lp, int64_t n, int64_t n_init, int64_t n_local, double scale) {
  check_nsa_sizes(l, d, lp);
  check_attn_inputs(q, k, v, "k_cmp", "v_cmp", /*same_rows=*/false);
  at::Tensor scores;
  if constexpr (Backend::kKeepsDecodeScores) {
    scores = at::empty({q.size(0), k.size(2), q.size(1) * (q.size(2) / k.size(2)), k.size(1)},
                       q.options().dtype(at::kFloat));
    Backend::fresh(scores);
  }
  float* keep = scores.defined() && scores.numel() > 0 ? scores.data_ptr<float>() : nullptr;
  const AttnSpec spec{Branch::kCompressed, l, d, 1, 1, "compressed_select_decode"};
  auto [o, lse] = attn_fwd<Backend>(spec, q, k, v, std::nullopt, std::nullopt, 0, scale,
                                    seqlens_k, keep);
  at::Tensor block_indices = select_blocks<Backend>(q, k, lse, std::nullopt, 0, l, d, lp, n,
                                                    n_init, n_local, scale, seqlens_k, keep);
  return {o, lse, block_indices};
}

// --- the gated sum ----------------------------------------------------------
// sparse_attn ends with o = sum_j gates[j] * outputs[j] over the branches that are
// on: outputs[j] [B, T, Hq, Dv] of one shape, dtype and device, gates[j] [B, T, Hq]
// of any floating dtype, read in the accumulation type (float; double for
// float64). One pass forward, one backward, one rounding per element.

inline void check_gate_counts(at::TensorList outputs, at::TensorList gates, const char* op) {
  TORCH_CHECK(!outputs.empty() && outputs.size() <= size_t(kMaxGateBranches) &&
                  gates.size() == outputs.size(),
              "nsa_cuda: ", op, ": takes 1 to ", kMaxGateBranches,
              " branch outputs and one gate per output, got ", outputs.size(), " outputs and ",
              gates.size(), " gates");
  TORCH_CHECK(outputs[0].dim() == 4, "nsa_cuda: ", op,
              ": branch outputs must be [B, T, Hq, Dv], got ", outputs[0].sizes());
}

// The checked inputs in the kernels' layout (kept alive for the params' pointers).
struct GateInputs {
  std::vector<at::Tensor> outputs, gates;
  GateParams params{};
};

template <class Backend>
GateInputs gate_inputs(at::TensorList outputs, at::TensorList gates, const char* op) {
  const at::Tensor& o0 = outputs[0];
  Backend::check_support(o0, -1, -1, op);
  GateInputs in;
  GateParams& p = in.params;
  p.batch = o0.size(0), p.seqlen = o0.size(1), p.num_heads = o0.size(2), p.head_dim = o0.size(3);
  p.num_branches = int32_t(outputs.size());
  for (size_t j = 0; j < outputs.size(); ++j) {
    const at::Tensor &o = outputs[j], &g = gates[j];
    TORCH_CHECK(o.sizes() == o0.sizes() && o.scalar_type() == o0.scalar_type() &&
                    o.device() == o0.device(),
                "nsa_cuda: ", op, ": the branch outputs must share one shape, dtype and device; "
                "output ", j, " is ", o.scalar_type(), " ", o.sizes(), " on ", o.device(),
                ", output 0 is ", o0.scalar_type(), " ", o0.sizes(), " on ", o0.device());
    in.outputs.push_back(Backend::input(o.stride(3) == 1 ? o : o.contiguous()));
    in.gates.push_back(gate_like(g, o0, o0.scalar_type(), op, "gate " + std::to_string(j)));
    const at::Tensor &ob = in.outputs.back(), &gb = in.gates.back();
    GateBranch& x = p.branches[j];
    x.o = ob.data_ptr();
    x.o_batch_stride = ob.stride(0), x.o_row_stride = ob.stride(1), x.o_head_stride = ob.stride(2);
    x.gate = gb.data_ptr();
    x.gate_batch_stride = gb.stride(0), x.gate_row_stride = gb.stride(1);
    x.gate_head_stride = gb.stride(2);
  }
  return in;
}

template <class Backend>
at::Tensor gate_combine(at::TensorList outputs, at::TensorList gates) {
  check_gate_counts(outputs, gates, "gate_combine");
  [[maybe_unused]] auto guard = Backend::prepare(outputs[0]);
  GateInputs in = gate_inputs<Backend>(outputs, gates, "gate_combine");
  at::Tensor o = at::empty(outputs[0].sizes(), outputs[0].options());
  Backend::fresh(o);
  GateParams& p = in.params;
  p.out = o.data_ptr();
  p.out_batch_stride = o.stride(0), p.out_row_stride = o.stride(1), p.out_head_stride = o.stride(2);
  if (o.numel() > 0) Backend::gate_combine(p, o.scalar_type());
  return o;
}

// Returns the gradients of the outputs (each [B, T, Hq, Dv], contiguous; only with
// output_grads), then those of the gates (each in its gate's dtype), then with
// row_dots each output's rowsum(o * d o) as an attention backward's delta ([B, Hq,
// T], lse's dtype). Without output_grads the branch backward takes d o and the gate
// (dout_scale) instead of a written g * d o per branch.
template <class Backend>
std::vector<at::Tensor> gate_combine_bwd(const at::Tensor& grad, at::TensorList outputs,
                                         at::TensorList gates, bool row_dots,
                                         bool output_grads) {
  check_gate_counts(outputs, gates, "gate_combine_bwd");
  const at::Tensor& o0 = outputs[0];
  TORCH_CHECK(grad.sizes() == o0.sizes() && grad.scalar_type() == o0.scalar_type() &&
                  grad.device() == o0.device(),
              "nsa_cuda: gate_combine_bwd: grad must match the branch outputs (",
              o0.scalar_type(), " ", o0.sizes(), " on ", o0.device(), "), got ",
              grad.scalar_type(), " ", grad.sizes(), " on ", grad.device());
  [[maybe_unused]] auto guard = Backend::prepare(o0);
  GateInputs in = gate_inputs<Backend>(outputs, gates, "gate_combine_bwd");
  const at::Tensor d_out = Backend::input(grad.stride(3) == 1 ? grad : grad.contiguous());
  GateParams& p = in.params;
  p.out = d_out.data_ptr();
  p.out_batch_stride = d_out.stride(0), p.out_row_stride = d_out.stride(1);
  p.out_head_stride = d_out.stride(2);
  const auto acc = o0.options().dtype(gate_acc_type(o0.scalar_type()));
  std::vector<at::Tensor> d_outputs, d_gates, dots;
  for (size_t j = 0; j < outputs.size(); ++j) {
    if (output_grads) {
      d_outputs.push_back(at::empty(o0.sizes(), o0.options()));
      Backend::fresh(d_outputs.back());
      p.branches[j].d_o = d_outputs.back().data_ptr();
    }
    d_gates.push_back(at::empty(o0.sizes().slice(0, 3), acc));
    Backend::fresh(d_gates.back());
    p.branches[j].d_gate = d_gates.back().data_ptr();
    if (row_dots) {
      dots.push_back(at::empty({o0.size(0), o0.size(2), o0.size(1)}, acc));
      Backend::fresh(dots.back());
      p.branches[j].row_dot = dots.back().data_ptr();
    }
  }
  if (o0.numel() > 0) {
    Backend::gate_combine_bwd(p, o0.scalar_type());
  } else {  // Dv = 0: empty sums
    for (at::Tensor& dg : d_gates) dg.zero_();
    for (at::Tensor& dot : dots) dot.zero_();
  }
  for (size_t j = 0; j < outputs.size(); ++j)
    d_outputs.push_back(d_gates[j].to(gates[j].scalar_type()));
  d_outputs.insert(d_outputs.end(), dots.begin(), dots.end());
  return d_outputs;
}

// One decode step of NSA: the three branches from the caches and their gated
// sum, o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win (a null gate turns its
// branch off). The compressed attention runs when its gate is on or when the
// selection needs its lse (g_slc without block_indices). A backend with
// kFusesDecodeGates leaves the KV splits of each branch unmerged and sums
// everything in one kernel (fp32, one rounding); the others compose the branch
// ops and gate_combine, like sparse_attn. Gates are read in the accumulation type.
template <class Backend>
at::Tensor sparse_attn_decode(const at::Tensor& q, const at::Tensor& k_slc,
                              const at::Tensor& v_slc, const at::Tensor& k_win,
                              const at::Tensor& v_win, const at::Tensor& k_cmp,
                              const at::Tensor& v_cmp,
                              const at::Tensor& seqlens_k, const OptTensor& g_cmp,
                              const OptTensor& g_slc, const OptTensor& g_win,
                              const OptTensor& block_indices, int64_t l, int64_t d, int64_t lp,
                              int64_t n, int64_t n_init, int64_t n_local, int64_t w,
                              double scale) {
  check_nsa_sizes(l, d, lp);
  TORCH_CHECK(w > 0, "nsa_cuda: window_size must be positive, got ", w);
  check_attn_inputs(q, k_slc, v_slc, "k_slc", "v_slc", /*same_rows=*/false);
  check_attn_inputs(q, k_win, v_win, "k_win", "v_win", /*same_rows=*/false);
  check_attn_inputs(q, k_cmp, v_cmp, "k_cmp", "v_cmp", /*same_rows=*/false);
  const int64_t dv = v_slc.size(3);
  TORCH_CHECK(v_cmp.size(3) == dv && v_win.size(3) == dv,
              "nsa_cuda: sparse_attn_decode: v_slc, v_win and v_cmp must have one Dv, got ", dv,
              ", ", v_win.size(3), " and ", v_cmp.size(3));
  Backend::check_support(q, q.size(3), dv, "sparse_attn_decode");
  [[maybe_unused]] auto guard = Backend::prepare(q);
  auto gate_of = [&](const OptTensor& g, const char* name) -> OptTensor {
    if (!g.has_value()) return std::nullopt;
    return gate_like(*g, q, q.scalar_type(), "sparse_attn_decode", name, "[B, S, Hq]");
  };
  const OptTensor gc = gate_of(g_cmp, "g_cmp"), gs = gate_of(g_slc, "g_slc"),
                  gw = gate_of(g_win, "g_win");
  constexpr bool kFused = Backend::kFusesDecodeGates;
  // A branch's result: final (o) or, on a fusing backend, unmerged partials.
  struct Term {
    at::Tensor gate, o;
    DecodePartials parts;
  };
  std::vector<Term> terms;
  terms.reserve(3);  // the pending launches point at their terms' partials
  std::vector<PendingDecode> pending;
  auto branch = [&](const OptTensor& gate, const AttnSpec& spec, const at::Tensor& kb,
                    const at::Tensor& vb, const OptTensor& bi) {
    Term& t = terms.emplace_back(Term{*gate, {}, {}});
    t.o = std::get<0>(attn_fwd<Backend>(spec, q, kb, vb, bi, std::nullopt, 0, scale, seqlens_k,
                                        nullptr, kFused ? &t.parts : nullptr,
                                        kFused ? &pending : nullptr));
  };
  const AttnSpec cmp_spec{Branch::kCompressed, l, d, 1, 1, "sparse_attn_decode (compressed)"};
  OptTensor bi = block_indices;
  if (gs.has_value() && !bi.has_value()) {
    // The selection needs the compressed branch's final lse, so it is merged here.
    auto [o_cmp, lse_cmp, chosen] = compressed_select_decode<Backend>(q, k_cmp, v_cmp, seqlens_k,
                                                                      l, d, lp, n, n_init,
                                                                      n_local, scale);
    if (gc.has_value()) terms.push_back(Term{*gc, o_cmp, {}});
    bi = chosen;
  } else if (gc.has_value()) {
    branch(gc, cmp_spec, k_cmp, v_cmp, std::nullopt);
  }
  if (gs.has_value())
    branch(gs, AttnSpec{Branch::kSelected, 1, 1, lp, 1, "sparse_attn_decode (selected)"}, k_slc,
           v_slc, bi);
  if (gw.has_value())
    branch(gw, AttnSpec{Branch::kWindow, 1, 1, 1, w, "sparse_attn_decode (window)"}, k_win,
           v_win, std::nullopt);

  if constexpr (kFused) {
    // The selected and window branches (and the compressed one when no selection
    // needed its final lse) in one launch.
    if (!pending.empty() && q.numel() > 0) Backend::attn_decode_partials(pending, q.scalar_type());
  }
  if constexpr (!kFused) {
    if (terms.empty()) return at::zeros({q.size(0), q.size(1), q.size(2), dv}, q.options());
    std::vector<at::Tensor> outputs, gates;
    for (const Term& t : terms) outputs.push_back(t.o), gates.push_back(t.gate);
    return gate_combine<Backend>(outputs, gates);
  } else {
    at::Tensor o = at::empty({q.size(0), q.size(1), q.size(2), dv}, q.options());
    Backend::fresh(o);
    DecodeGateParams p{};
    p.o = o.data_ptr();
    p.o_batch_stride = o.stride(0), p.o_row_stride = o.stride(1), p.o_head_stride = o.stride(2);
    p.num_seqs = q.size(0), p.seqlen = q.size(1), p.num_heads_q = q.size(2);
    p.head_dim_v = dv, p.head_dim_qk = q.size(3);
    p.num_branches = int32_t(terms.size());
    for (size_t j = 0; j < terms.size(); ++j) {
      const Term& t = terms[j];
      DecodeGateBranch& x = p.branches[j];
      x.gate = t.gate.data_ptr();
      x.gate_batch_stride = t.gate.stride(0), x.gate_row_stride = t.gate.stride(1);
      x.gate_head_stride = t.gate.stride(2);
      if (t.parts.num_splits == 0) {  // final
        x.o = t.o.data_ptr();
        x.o_batch_stride = t.o.stride(0), x.o_row_stride = t.o.stride(1);
        x.o_head_stride = t.o.stride(2);
      } else {
        x.o_part = static_cast<const float*>(t.parts.o_part.data_ptr());
        x.lse_part = static_cast<const float*>(t.parts.lse_part.data_ptr());
        x.num_splits = t.parts.num_splits;
      }
    }
    if (o.numel() > 0) Backend::decode_gate_combine(p, q.scalar_type());
    return o;
  }
}

inline CompressParams make_compress_params(const at::Tensor& x, const at::Tensor& out,
                                           const OptTensor& cu_seqlens, int64_t cmp_block_size,
                                           int64_t cmp_stride) {
  CompressParams p{};
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  p.x_batch_stride = x.stride(0), p.x_row_stride = x.stride(1), p.x_head_stride = x.stride(2);
  p.out_batch_stride = out.stride(0), p.out_row_stride = out.stride(1), p.out_head_stride = out.stride(2);
  p.cu_seqlens = cu_seqlens_ptr(cu_seqlens);
  p.num_seqs = num_seqs(x, cu_seqlens);
  p.seqlen = x.size(1);
  p.batch = x.size(0);
  p.rows_out = out.size(1);
  p.num_heads = x.size(2);
  p.head_dim = x.size(3);
  p.cmp_block_size = cmp_block_size;
  p.cmp_stride = cmp_stride;
  return p;
}

inline void check_compress_args(const at::Tensor& x, const OptTensor& cu_seqlens,
                                int64_t cmp_block_size, int64_t cmp_stride) {
  check_last_dim_contiguous(x, "x");
  TORCH_CHECK(cmp_block_size > 0 && cmp_stride > 0 && cmp_block_size % cmp_stride == 0,
              "nsa_cuda: cmp_block_size (", cmp_block_size, ") and cmp_stride (", cmp_stride,
              ") must be positive with cmp_stride dividing cmp_block_size");
  checked_seqlen(x, cu_seqlens, 0);
}

template <class Backend>
at::Tensor mean_compress(const at::Tensor& x, const OptTensor& cu_seqlens, int64_t cmp_block_size,
                         int64_t cmp_stride) {
  check_compress_args(x, cu_seqlens, cmp_block_size, cmp_stride);
  Backend::check_support(x, -1, -1, "mean_compress");
  [[maybe_unused]] auto guard = Backend::prepare(x);
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
  check_compress_args(x, cu_seqlens, cmp_block_size, cmp_stride);
  Backend::check_support(x, -1, -1, "mean_compress_bwd");
  const int64_t rows = compressed_rows(x, cu_seqlens, cmp_block_size, cmp_stride);
  TORCH_CHECK(grad_cmp.dim() == 4 && grad_cmp.size(0) == x.size(0) && grad_cmp.size(1) == rows &&
                  grad_cmp.size(2) == x.size(2) && grad_cmp.size(3) == x.size(3) &&
                  grad_cmp.scalar_type() == x.scalar_type() && grad_cmp.device() == x.device(),
              "nsa_cuda: mean_compress_bwd: grad_cmp must match mean_compress's output, got ",
              grad_cmp.sizes());
  [[maybe_unused]] auto guard = Backend::prepare(x);
  const at::Tensor g = grad_cmp.contiguous();
  auto dx = grad_buffer<Backend>(x);
  if (dx.numel() > 0)
    Backend::mean_compress_bwd(make_compress_params(dx, g, cu_seqlens, cmp_block_size, cmp_stride),
                               x.scalar_type());
  return dx;
}

// The compressed cache grows with the token cache: x [B, capacity, H, D] holds
// the tokens, x_cmp [B, rows, H, D] their compressed blocks. The checks and
// parameters of update_cmp_cache, also those of append_kv_to_cache's fused update
// (`what` names the op and the caches in the messages).
inline CompressParams cmp_cache_update_params(const at::Tensor& x, const at::Tensor& x_cmp,
                                              const at::Tensor& cache_seqlens, int64_t num_new,
                                              int64_t cmp_block_size, int64_t cmp_stride,
                                              const char* what, const char* x_name,
                                              const char* x_cmp_name) {
  check_compress_args(x, std::nullopt, cmp_block_size, cmp_stride);
  check_last_dim_contiguous(x_cmp, x_cmp_name);
  TORCH_CHECK(x_cmp.dim() == 4 && x_cmp.device() == x.device() &&
                  x_cmp.scalar_type() == x.scalar_type() && x_cmp.size(0) == x.size(0) &&
                  x_cmp.size(2) == x.size(2) && x_cmp.size(3) == x.size(3),
              "nsa_cuda: ", what, ": the compressed cache ", x_cmp_name, " ", x_cmp.sizes(), " ",
              x_cmp.scalar_type(), " does not match the token cache ", x_name, " ", x.sizes(), " ",
              x.scalar_type(), " (both [B, rows, Hkv, D] of one B, Hkv, D, dtype and device)");
  TORCH_CHECK(num_new >= 0, "nsa_cuda: ", what, ": num_new must be >= 0, got ", num_new);
  CompressParams p = make_compress_params(x, x_cmp, std::nullopt, cmp_block_size, cmp_stride);
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.num_new = num_new;
  return p;
}

template <class Backend>
void update_cmp_cache(const at::Tensor& x, const at::Tensor& x_cmp,
                      const at::Tensor& cache_seqlens, int64_t num_new, int64_t cmp_block_size,
                      int64_t cmp_stride) {
  Backend::check_support(x, -1, -1, "update_cmp_cache");
  TORCH_CHECK(num_new >= 0, "nsa_cuda: update_cmp_cache: num_new must be >= 0, got ", num_new);
  check_seqlens_k(cache_seqlens, x, x.size(1) - num_new, false, 1, 1, "update_cmp_cache");
  const CompressParams p = cmp_cache_update_params(x, x_cmp, cache_seqlens, num_new, cmp_block_size,
                                                   cmp_stride, "update_cmp_cache", "x", "x_cmp");
  [[maybe_unused]] auto guard = Backend::prepare(x);
  if (x_cmp.numel() > 0 && num_new > 0) Backend::update_cmp_cache(p, x.scalar_type());
}

// k_new / v_new [B, S, Hkv, D] into k_cache / v_cache [B, capacity, Hkv, D] at rows
// cache_seqlens[b] + i.
// With k_cmp_cache / v_cmp_cache, also the compressed blocks that complete, as
// update_cmp_cache on each side after the append would write them, in the same launch.
template <class Backend>
void append_kv_to_cache(const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& cache_seqlens, const at::Tensor& k_new,
                        const at::Tensor& v_new, const OptTensor& k_cmp_cache,
                        const OptTensor& v_cmp_cache, int64_t cmp_block_size, int64_t cmp_stride) {
  Backend::check_support(k_cache, -1, -1, "append_kv_to_cache");
  CacheAppendParams p{};
  const at::Tensor* pairs[2][2] = {{&k_cache, &k_new}, {&v_cache, &v_new}};
  for (int s = 0; s < 2; ++s) {
    const at::Tensor &cache = *pairs[s][0], &rows = *pairs[s][1];
    const char* name = s == 0 ? "k" : "v";
    check_last_dim_contiguous(cache, s == 0 ? "k_cache" : "v_cache");
    check_last_dim_contiguous(rows, s == 0 ? "k_new" : "v_new");
    TORCH_CHECK(cache.dim() == 4 && rows.dim() == 4 && cache.size(0) == k_cache.size(0) &&
                    cache.size(1) == k_cache.size(1) && cache.size(2) == k_cache.size(2) &&
                    rows.size(0) == cache.size(0) && rows.size(1) == k_new.size(1) &&
                    rows.size(2) == cache.size(2) && rows.size(3) == cache.size(3) &&
                    cache.scalar_type() == k_cache.scalar_type() &&
                    rows.scalar_type() == cache.scalar_type() &&
                    cache.device() == k_cache.device() && rows.device() == cache.device(),
                "nsa_cuda: append_kv_to_cache: ", name, "_new ", rows.sizes(), " ",
                rows.scalar_type(), " does not fit ", name, "_cache ", cache.sizes(), " ",
                cache.scalar_type(), " (the caches are [B, capacity, Hkv, D] of one B, capacity, "
                "Hkv, dtype and device; the new rows [B, S, Hkv, D] of their cache's D)");
    auto& x = p.sides[s];
    x.src = rows.data_ptr(), x.dst = cache.data_ptr();
    x.src_batch_stride = rows.stride(0), x.src_row_stride = rows.stride(1);
    x.src_head_stride = rows.stride(2);
    x.dst_batch_stride = cache.stride(0), x.dst_row_stride = cache.stride(1);
    x.dst_head_stride = cache.stride(2);
    x.head_dim = cache.size(3);
  }
  check_seqlens_k(cache_seqlens, k_cache, k_cache.size(1) - k_new.size(1), false, 1, 1,
                  "append_kv_to_cache");
  TORCH_CHECK(k_cmp_cache.has_value() == v_cmp_cache.has_value(),
              "nsa_cuda: append_kv_to_cache: pass both k_cmp_cache and v_cmp_cache, or neither");
  if (k_cmp_cache.has_value()) {
    p.cmp[0] = cmp_cache_update_params(k_cache, *k_cmp_cache, cache_seqlens, k_new.size(1),
                                       cmp_block_size, cmp_stride, "append_kv_to_cache", "k_cache",
                                       "k_cmp_cache");
    p.cmp[1] = cmp_cache_update_params(v_cache, *v_cmp_cache, cache_seqlens, k_new.size(1),
                                       cmp_block_size, cmp_stride, "append_kv_to_cache", "v_cache",
                                       "v_cmp_cache");
    if (k_cmp_cache->numel() == 0 || v_cmp_cache->numel() == 0) p.cmp[0].out = p.cmp[1].out = nullptr;
  }
  [[maybe_unused]] auto guard = Backend::prepare(k_cache);
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.batch = k_cache.size(0), p.num_new = k_new.size(1), p.capacity = k_cache.size(1);
  p.num_heads = k_cache.size(2);
  if (k_new.numel() + v_new.numel() > 0) Backend::append_kv_to_cache(p, k_cache.scalar_type());
}

// Registers the op bodies above for one dispatch key.
template <class Backend>
void register_backend(torch::Library& m) {
  m.impl("mean_compress", &mean_compress<Backend>);
  m.impl("compressed_attn_fwd", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const OptTensor& cu, int64_t max_seqlen, int64_t l, int64_t d,
                                   double scale) {
    check_nsa_sizes(l, d, d);
    const AttnSpec spec{Branch::kCompressed, l, d, 1, 1, "compressed_attn_fwd"};
    return attn_fwd<Backend>(spec, q, k, v, std::nullopt, cu, max_seqlen, scale);
  });
  m.impl("select_blocks", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                             const OptTensor& cu, int64_t max_seqlen, int64_t l, int64_t d,
                             int64_t lp, int64_t n, int64_t n_init, int64_t n_local, double scale) {
    return select_blocks<Backend>(q, k, lse, cu, max_seqlen, l, d, lp, n, n_init, n_local, scale);
  });
  m.impl("selected_attn_fwd", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& bi, const OptTensor& cu, int64_t max_seqlen,
                                 int64_t lp, double scale) {
    TORCH_CHECK(lp > 0, "nsa_cuda: slc_block_size must be positive, got ", lp);
    const AttnSpec spec{Branch::kSelected, 1, 1, lp, 1, "selected_attn_fwd"};
    return attn_fwd<Backend>(spec, q, k, v, bi, cu, max_seqlen, scale);
  });
  m.impl("window_attn_fwd", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const OptTensor& cu, int64_t max_seqlen, int64_t w, double scale) {
    TORCH_CHECK(w > 0, "nsa_cuda: window_size must be positive, got ", w);
    const AttnSpec spec{Branch::kWindow, 1, 1, 1, w, "window_attn_fwd"};
    return attn_fwd<Backend>(spec, q, k, v, std::nullopt, cu, max_seqlen, scale);
  });
  m.impl("compressed_attn_decode", [](const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& seqlens_k, int64_t l,
                                      int64_t d, double scale) {
    check_nsa_sizes(l, d, d);
    const AttnSpec spec{Branch::kCompressed, l, d, 1, 1, "compressed_attn_decode"};
    return attn_fwd<Backend>(spec, q, k, v, std::nullopt, std::nullopt, 0, scale, seqlens_k);
  });
  m.impl("compressed_select_decode",
         [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            const at::Tensor& seqlens_k, int64_t l, int64_t d, int64_t lp, int64_t n,
            int64_t n_init, int64_t n_local, double scale) {
           return compressed_select_decode<Backend>(q, k, v, seqlens_k, l, d, lp, n, n_init,
                                                    n_local, scale);
         });
  m.impl("select_blocks_decode",
         [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
            const at::Tensor& seqlens_k, int64_t l, int64_t d, int64_t lp, int64_t n,
            int64_t n_init, int64_t n_local, double scale) {
           return select_blocks<Backend>(q, k, lse, std::nullopt, 0, l, d, lp, n, n_init, n_local,
                                         scale, seqlens_k);
         });
  m.impl("selected_attn_decode", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& bi, const at::Tensor& seqlens_k, int64_t lp,
                                    double scale) {
    TORCH_CHECK(lp > 0, "nsa_cuda: slc_block_size must be positive, got ", lp);
    const AttnSpec spec{Branch::kSelected, 1, 1, lp, 1, "selected_attn_decode"};
    return attn_fwd<Backend>(spec, q, k, v, bi, std::nullopt, 0, scale, seqlens_k);
  });
  m.impl("window_attn_decode", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& seqlens_k, int64_t w, double scale) {
    TORCH_CHECK(w > 0, "nsa_cuda: window_size must be positive, got ", w);
    const AttnSpec spec{Branch::kWindow, 1, 1, 1, w, "window_attn_decode"};
    return attn_fwd<Backend>(spec, q, k, v, std::nullopt, std::nullopt, 0, scale, seqlens_k);
  });
  m.impl("sparse_attn_decode", &sparse_attn_decode<Backend>);
  m.impl("update_cmp_cache", &update_cmp_cache<Backend>);
  m.impl("append_kv_to_cache", &append_kv_to_cache<Backend>);
  m.impl("gate_combine", &gate_combine<Backend>);
  m.impl("gate_combine_bwd", &gate_combine_bwd<Backend>);
  if constexpr (Backend::kHasBackward) {
    m.impl("mean_compress_bwd", &mean_compress_bwd<Backend>);
    m.impl("compressed_attn_bwd",
           [](const at::Tensor& dout, const OptTensor& dlse, const at::Tensor& q,
              const at::Tensor& k, const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse,
              const OptTensor& cu, int64_t max_seqlen, int64_t l, int64_t d, double scale,
              const OptTensor& dq_in, const OptTensor& dk_in, const OptTensor& dv_in,
              const OptTensor& delta, const OptTensor& dout_scale) {
             check_nsa_sizes(l, d, d);
             const AttnSpec spec{Branch::kCompressed, l, d, 1, 1, "compressed_attn_bwd"};
             return attn_bwd<Backend>(spec, dout, dlse, q, k, v, o, lse, std::nullopt, cu,
                                      max_seqlen, scale, dq_in, dk_in, dv_in, delta,
                                      dout_scale);
           });
    m.impl("selected_attn_bwd",
           [](const at::Tensor& dout, const OptTensor& dlse, const at::Tensor& q,
              const at::Tensor& k, const at::Tensor& v, const at::Tensor& bi, const at::Tensor& o,
              const at::Tensor& lse, const OptTensor& cu, int64_t max_seqlen, int64_t lp,
              double scale, const OptTensor& dq_in, const OptTensor& dk_in,
              const OptTensor& dv_in, const OptTensor& delta, const OptTensor& dout_scale) {
             TORCH_CHECK(lp > 0, "nsa_cuda: slc_block_size must be positive, got ", lp);
             const AttnSpec spec{Branch::kSelected, 1, 1, lp, 1, "selected_attn_bwd"};
             return attn_bwd<Backend>(spec, dout, dlse, q, k, v, o, lse, bi, cu, max_seqlen,
                                      scale, dq_in, dk_in, dv_in, delta, dout_scale);
           });
    m.impl("window_attn_bwd",
           [](const at::Tensor& dout, const OptTensor& dlse, const at::Tensor& q,
              const at::Tensor& k, const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse,
              const OptTensor& cu, int64_t max_seqlen, int64_t w, double scale,
              const OptTensor& dq_in, const OptTensor& dk_in, const OptTensor& dv_in,
              const OptTensor& delta, const OptTensor& dout_scale) {
             TORCH_CHECK(w > 0, "nsa_cuda: window_size must be positive, got ", w);
             const AttnSpec spec{Branch::kWindow, 1, 1, 1, w, "window_attn_bwd"};
             return attn_bwd<Backend>(spec, dout, dlse, q, k, v, o, lse, std::nullopt, cu,
                                      max_seqlen, scale, dq_in, dk_in, dv_in, delta,
                                      dout_scale);
           });
  }
}

}  // namespace nsa::api
