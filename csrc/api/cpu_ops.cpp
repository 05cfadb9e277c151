// CPU backend: the C++ kernels of csrc/cpu/ behind the op bodies of op_bodies.h.
#include <ATen/Dispatch.h>

#include "api/op_bodies.h"

namespace nsa::api {
namespace {

struct CpuBackend {
  static constexpr bool kHasBackward = true;
  static constexpr bool kKeepsDecodeScores = false;
  static constexpr bool kWritesEveryGradElement = false;
  static constexpr bool kFusesDecodeGates = false;
  struct NoGuard {};
  static NoGuard prepare(const at::Tensor&) { return {}; }
  static void check_support(const at::Tensor& q, int64_t, int64_t, const char* op) {
    const auto t = q.scalar_type();
    TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                "nsa_cuda: ", op, " on the CPU supports float32, float64, float16 and bfloat16, "
                "got ", t);
  }
  static const at::Tensor& input(const at::Tensor& t) { return t; }
  static void fresh(const at::Tensor&) {}

  static void attn_fwd(const AttnFwdParams& p, at::ScalarType t) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "nsa_cuda attn_fwd (CPU)",
                                    [&] { cpu::attn_fwd<scalar_t>(p); });
  }
  static void attn_bwd(const AttnBwdParams& p, at::ScalarType t) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "nsa_cuda attn_bwd (CPU)",
                                    [&] { cpu::attn_bwd<scalar_t>(p); });
  }
  static void select_blocks(const SelectParams& p, at::ScalarType t) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "nsa_cuda select_blocks (CPU)",
                                    [&] { cpu::select_blocks<scalar_t>(p); });
  }
  static void mean_compress(const CompressParams& p, at::ScalarType t) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "nsa_cuda mean_compress (CPU)",
                                    [&] { cpu::mean_compress<scalar_t>(p); });
  }
  // Decode runs the same kernels: seq_info() places the queries at the cache's end.
  static void attn_decode(const AttnFwdParams& p, at::ScalarType t) { attn_fwd(p, t); }
  static void select_blocks_decode(const SelectParams& p, at::ScalarType t) {
    select_blocks(p, t);
  }
  static void update_cmp_cache(const CompressParams& p, at::ScalarType t) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "nsa_cuda update_cmp_cache (CPU)",
                                    [&] { cpu::update_cmp_cache<scalar_t>(p); });
  }
  static void gate_combine(const GateParams& p, at::ScalarType t) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "nsa_cuda gate_combine (CPU)",
                                    [&] { cpu::gate_combine<scalar_t>(p); });
  }
  static void gate_combine_bwd(const GateParams& p, at::ScalarType t) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t,
                                    "nsa_cuda gate_combine_bwd (CPU)",
                                    [&] { cpu::gate_combine_bwd<scalar_t>(p); });
  }
  static void append_kv_to_cache(const CacheAppendParams& p, at::ScalarType t) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t,
                                    "nsa_cuda append_kv_to_cache (CPU)",
                                    [&] { cpu::append_kv_to_cache<scalar_t>(p); });
  }
  static void mean_compress_bwd(const CompressParams& p, at::ScalarType t) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t,
                                    "nsa_cuda mean_compress_bwd (CPU)",
                                    [&] { cpu::mean_compress_bwd<scalar_t>(p); });
  }
};

}  // namespace
}  // namespace nsa::api

TORCH_LIBRARY_IMPL(nsa_cuda, CPU, m) { nsa::api::register_backend<nsa::api::CpuBackend>(m); }
