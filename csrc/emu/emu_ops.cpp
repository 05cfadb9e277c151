// The CUDA kernels, run by the CPU emulator, as the ops of a separate library
// `nsa_cuda_emu` (same schemas as nsa_cuda, registered for CPU tensors), so it
// never clashes with the real nsa_cuda._C. The op bodies are the shared ones
// (api/op_bodies.h); the backend below mirrors api/cuda_ops.cpp with CPU
// workspaces and outputs always poisoned (NaN / 0x7fffffff) before a launch.
// Built only by tests/_cuda_emu.py (torch JIT) with -DNSA_CUDA_EMULATION.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>

// The schemas of api/ops.cpp, under another library name.
#define nsa_cuda nsa_cuda_emu
#include "api/ops.cpp"
#undef nsa_cuda

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <tuple>
#include <vector>

#define NSA_OP_LIBRARY "nsa_cuda_emu"
#include "api/kernel_instances.h"
#include "api/op_bodies.h"
#include "cuda/decode_plan.h"
#include "cuda/launch.h"
#include "emu/selftest.h"

namespace nsa::api {
namespace {

using nsa::cuda::DType;

void poison(const at::Tensor& t) {
  if (at::isFloatingType(t.scalar_type()))
    const_cast<at::Tensor&>(t).fill_(std::numeric_limits<double>::quiet_NaN());
  else
    const_cast<at::Tensor&>(t).fill_(0x7fffffff);
}

at::Tensor workspace(int64_t numel) { return at::empty({numel}, at::TensorOptions().dtype(at::kFloat)); }

DType dtype_of(at::ScalarType t) { return t == at::kBFloat16 ? DType::kBf16 : DType::kFp16; }

constexpr cudaStream_t kStream = nullptr;

struct EmuBackend {
  static constexpr bool kHasBackward = true;
  static constexpr bool kKeepsDecodeScores = true;
  static constexpr bool kWritesEveryGradElement = true;
  static constexpr bool kFusesDecodeGates = true;
  struct NoGuard {};
  static NoGuard prepare(const at::Tensor&) { return {}; }

  static void check_support(const at::Tensor& q, int64_t dk, int64_t dv, const char* op) {
    TORCH_CHECK(q.is_cpu(), "nsa_cuda_emu.", op, ": the emulator takes CPU tensors");
    TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, "nsa_cuda_emu.",
                op, ": the CUDA kernels support float16 and bfloat16, got ", q.scalar_type());
    if (dk < 0) return;
    if (dv >= 0)
      TORCH_CHECK((dk == 64 && dv == 64) || (dk == 128 && dv == 128) || (dk == 192 && dv == 128),
                  "nsa_cuda_emu.", op, ": unsupported head dims (", dk, ", ", dv, ")");
    TORCH_CHECK(instance_built(dk, dtype_of(q.scalar_type())), "nsa_cuda_emu.", op,
                ": this emulator build has no instance for Dk = ", dk, " and ", q.scalar_type());
  }

  static at::Tensor input(const at::Tensor& t) { return aligned(t); }
  static void fresh(const at::Tensor& t) { poison(t); }

  static void attn_fwd(const AttnFwdParams& p, at::ScalarType t) {
    run_kernel("attn_fwd", [&] {
      with_instance(p.head_dim_qk, dtype_of(t), [&]<int kDk, int kDv, DType kDT>() {
        nsa::cuda::run_attn_fwd<kDk, kDv, kDT>(p, kStream);
      });
    });
  }
  static void select_blocks(const SelectParams& p, at::ScalarType t) {
    run_kernel("select_blocks", [&] {
      with_instance(p.head_dim_qk, dtype_of(t), [&]<int kDk, int kDv, DType kDT>() {
        nsa::cuda::run_select_blocks<kDk, kDT>(p, kStream);
      });
    });
  }
  static void attn_bwd(const AttnBwdParams& p, at::ScalarType t) {
    run_kernel("attn_bwd", [&] {
      const int64_t batches = p.cu_seqlens != nullptr ? 1 : p.num_seqs;
      at::Tensor delta;
      if (p.delta_in == nullptr) {
        delta = workspace(batches * p.lse_batch_stride);
        poison(delta);
      }
      nsa::cuda::AttnBwdWorkspace ws;
      ws.delta = p.delta_in != nullptr ? static_cast<float*>(const_cast<void*>(p.delta_in))
                                       : delta.data_ptr<float>();
      ws.q_rows = p.lse_head_stride;
      std::vector<at::Tensor> scratch;  // NaN-poisoned, like every workspace here
      ws.alloc_ctx = &scratch;
      ws.alloc = [](void* ctx, int64_t bytes) -> void* {
        auto& keep = *static_cast<std::vector<at::Tensor>*>(ctx);
        keep.push_back(workspace((bytes + 3) / 4));
        poison(keep.back());
        return keep.back().data_ptr();
      };
      at::Tensor sorted_keys;
      if (p.branch == Branch::kSelected) {
        at::Tensor keys = at::empty({nsa::cuda::slc_inverse_key_count(p)}, at::kLong);
        poison(keys);
        nsa::cuda::run_slc_inverse_keys(p, keys.data_ptr<int64_t>(), kStream);
        sorted_keys = std::get<0>(at::sort(keys, /*dim=*/0, /*descending=*/false));
        ws.slc_keys = sorted_keys.data_ptr<int64_t>();
        ws.slc_key_count = sorted_keys.numel();
      }
      with_instance(p.head_dim_qk, dtype_of(t), [&]<int kDk, int kDv, DType kDT>() {
        nsa::cuda::run_attn_bwd<kDk, kDv, kDT>(p, ws, kStream);
      });
    });
  }
  static void attn_decode(const AttnFwdParams& p, at::ScalarType t) {
    run_kernel("attn_decode", [&] {
      const int splits = nsa::cuda::decode_num_splits(p, nsa_emu::num_sms());
      const int64_t rows = nsa::cuda::decode_partial_rows(p, splits, /*gated=*/false);
      at::Tensor o_part = workspace(rows * p.head_dim_v);
      at::Tensor lse_part = workspace(rows);
      poison(o_part), poison(lse_part);
      with_instance(p.head_dim_qk, dtype_of(t), [&]<int kDk, int kDv, DType kDT>() {
        nsa::cuda::run_attn_decode<kDk, kDv, kDT>(p, splits, o_part.data_ptr<float>(),
                                                  lse_part.data_ptr<float>(), /*combine=*/true,
                                                  kStream);
      });
    });
  }
  // As cuda_ops.cpp: the branches' unmerged splits in one launch.
  static void attn_decode_partials(std::vector<PendingDecode>& jobs, at::ScalarType t) {
    run_kernel("sparse_attn_decode (attention)", [&] {
      TORCH_CHECK(jobs.size() <= size_t(nsa::cuda::kMaxDecodeJobs), "too many decode branches");
      nsa::cuda::DecodeAttnJob launch[nsa::cuda::kMaxDecodeJobs];
      for (size_t j = 0; j < jobs.size(); ++j) {
        const AttnFwdParams& p = jobs[j].params;
        const int splits = nsa::cuda::decode_num_splits(p, nsa_emu::num_sms());
        const int64_t rows = nsa::cuda::decode_partial_rows(p, splits, /*gated=*/true);
        *jobs[j].partials = DecodePartials{workspace(rows * p.head_dim_v), workspace(rows), splits};
        poison(jobs[j].partials->o_part), poison(jobs[j].partials->lse_part);
        launch[j] = nsa::cuda::DecodeAttnJob{p, splits, jobs[j].partials->o_part.data_ptr<float>(),
                                             jobs[j].partials->lse_part.data_ptr<float>()};
      }
      with_instance(jobs.front().params.head_dim_qk, dtype_of(t), [&]<int kDk, int kDv, DType kDT>() {
        nsa::cuda::run_attn_decode_partials<kDk, kDv, kDT>(launch, int(jobs.size()), kStream);
      });
    });
  }
  static void decode_gate_combine(const DecodeGateParams& p, at::ScalarType t) {
    run_kernel("decode_gate_combine", [&] {
      with_instance(p.head_dim_qk, dtype_of(t), [&]<int kDk, int kDv, DType kDT>() {
        nsa::cuda::run_decode_gate_combine<kDk, kDv, kDT>(p, kStream);
      });
    });
  }
  static void select_blocks_decode(const SelectParams& p, at::ScalarType t) {
    run_kernel("select_blocks_decode", [&] {
      at::Tensor scores =
          workspace(p.num_seqs * p.num_heads_kv * p.seqlen * nsa::cuda::select_score_width(p));
      poison(scores);
      with_instance(p.head_dim_qk, dtype_of(t), [&]<int kDk, int kDv, DType kDT>() {
        nsa::cuda::run_select_blocks_decode<kDk, kDT>(p, scores.data_ptr<float>(), kStream);
      });
    });
  }
  static void mean_compress(const CompressParams& p, at::ScalarType t) {
    run_kernel("mean_compress", [&] { nsa::cuda::run_mean_compress(p, dtype_of(t), kStream); });
  }
  static void mean_compress_bwd(const CompressParams& p, at::ScalarType t) {
    run_kernel("mean_compress_bwd",
               [&] { nsa::cuda::run_mean_compress_bwd(p, dtype_of(t), kStream); });
  }
  static void gate_combine(const GateParams& p, at::ScalarType t) {
    check_gate_head_dim(p, "gate_combine");
    run_kernel("gate_combine", [&] { nsa::cuda::run_gate_combine(p, dtype_of(t), kStream); });
  }
  static void gate_combine_bwd(const GateParams& p, at::ScalarType t) {
    check_gate_head_dim(p, "gate_combine_bwd");
    run_kernel("gate_combine_bwd",
               [&] { nsa::cuda::run_gate_combine_bwd(p, dtype_of(t), kStream); });
  }
  static void append_kv_to_cache(const CacheAppendParams& p, at::ScalarType t) {
    run_kernel("append_kv_to_cache",
               [&] { nsa::cuda::run_append_kv_to_cache(p, dtype_of(t), kStream); });
  }
  static void update_cmp_cache(const CompressParams& p, at::ScalarType t) {
    run_kernel("update_cmp_cache",
               [&] { nsa::cuda::run_update_cmp_cache(p, dtype_of(t), kStream); });
  }
};

// a [64, 64], b [64, 64] (fp16 or bf16, CPU, contiguous) -> (a @ b^T, a @ b) in
// float32, through the forward's TiledMma, ldmatrix atoms and swizzled smem.
std::tuple<at::Tensor, at::Tensor> gemm_selftest_impl(const at::Tensor& a, const at::Tensor& b,
                                                      bool sm90) {
  TORCH_CHECK(a.is_cpu() && a.sizes() == at::IntArrayRef({64, 64}) && b.sizes() == a.sizes() &&
                  a.scalar_type() == b.scalar_type() && a.is_contiguous() && b.is_contiguous() &&
                  (a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16),
              "gemm_selftest: a and b must be contiguous fp16/bf16 [64, 64] CPU tensors");
  at::Tensor nt = at::empty({64, 64}, at::kFloat), nn = at::empty({64, 64}, at::kFloat);
  poison(nt), poison(nn);
  run_kernel("gemm_selftest", [&] {
    (sm90 ? nsa::emu::gemm_selftest_sm90 : nsa::emu::gemm_selftest)(
        a.data_ptr(), b.data_ptr(), a.scalar_type() == at::kBFloat16, nt.data_ptr<float>(),
        nn.data_ptr<float>());
  });
  return {nt, nn};
}
std::tuple<at::Tensor, at::Tensor> gemm_selftest(const at::Tensor& a, const at::Tensor& b) {
  return gemm_selftest_impl(a, b, false);
}
// The same inputs through the wgmma path: (a @ b^T, round(a @ b^T) @ b).
std::tuple<at::Tensor, at::Tensor> gemm_selftest_sm90(const at::Tensor& a, const at::Tensor& b) {
  return gemm_selftest_impl(a, b, true);
}

void hazard_selftest(int64_t mode) {
  run_kernel("hazard_selftest", [&] { nsa::emu::hazard_selftest(int(mode)); });
}

}  // namespace
}  // namespace nsa::api

TORCH_LIBRARY_FRAGMENT(nsa_cuda_emu, m) {
  m.def("gemm_selftest(Tensor a, Tensor b) -> (Tensor, Tensor)");
  m.def("gemm_selftest_sm90(Tensor a, Tensor b) -> (Tensor, Tensor)");
  // No tensor argument to dispatch on: a catch-all kernel.
  m.def("hazard_selftest(int mode) -> ()", &nsa::api::hazard_selftest);
}
TORCH_LIBRARY_IMPL(nsa_cuda_emu, CPU, m) {
  nsa::api::register_backend<nsa::api::EmuBackend>(m);
  m.impl("gemm_selftest", &nsa::api::gemm_selftest);
  m.impl("gemm_selftest_sm90", &nsa::api::gemm_selftest_sm90);
}
