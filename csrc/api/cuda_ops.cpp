// CUDA backend of the nsa_cuda ops: the op bodies of op_bodies.h over the
// explicitly instantiated CuTe kernels (csrc/cuda/instantiations). The kernels
// never see torch.
//
// Debug switch: NSA_POISON_OUTPUTS=1 fills every output with NaN (int outputs
// with 0x7fffffff) before the launch, so a test sees any element a kernel forgot.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "api/kernel_instances.h"
#include "api/op_bodies.h"
#include "cuda/decode_plan.h"
#include "cuda/launch.h"
#include "nsa/params.h"
#include "nsa/rules.h"

namespace nsa::api {
namespace {

using nsa::cuda::DType;

bool poison_outputs() {
  static const bool on = [] {
    const char* v = std::getenv("NSA_POISON_OUTPUTS");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return on;
}

void poison(const at::Tensor& t) {
  if (!poison_outputs()) return;
  if (at::isFloatingType(t.scalar_type()))
    const_cast<at::Tensor&>(t).fill_(std::numeric_limits<double>::quiet_NaN());
  else
    const_cast<at::Tensor&>(t).fill_(0x7fffffff);
}

DType cuda_dtype(const at::Tensor& q, const char* op) {
  if (q.scalar_type() == at::kHalf) return DType::kFp16;
  if (q.scalar_type() == at::kBFloat16) return DType::kBf16;
  TORCH_CHECK(false, "nsa_cuda.", op, ": CUDA kernels support float16 and bfloat16, got q of dtype ",
              q.scalar_type());
  return DType::kFp16;
}

void check_built(int64_t dk, DType dt, const char* op) {
  bool hdim_built = false, dtype_built = false;
#ifdef NSA_HDIM_64
  hdim_built |= dk == 64;
#endif
#ifdef NSA_HDIM_128
  hdim_built |= dk == 128;
#endif
#ifdef NSA_HDIM_192
  hdim_built |= dk == 192;
#endif
#ifdef NSA_DTYPE_FP16
  dtype_built |= dt == DType::kFp16;
#endif
#ifdef NSA_DTYPE_BF16
  dtype_built |= dt == DType::kBf16;
#endif
  TORCH_CHECK(hdim_built, "nsa_cuda.", op, ": this build of nsa_cuda was compiled without head dim ",
              dk, " (NSA_HEADDIMS); rebuild with it to use it");
  TORCH_CHECK(dtype_built, "nsa_cuda.", op, ": this build of nsa_cuda was compiled without dtype ",
              dt == DType::kFp16 ? "fp16" : "bf16", " (NSA_DTYPES); rebuild with it to use it");
}

// Calls the attention instance for (Dk, Dv, dtype): only built instances are referenced.
void dispatch_attn(const AttnFwdParams& p, DType dt, cudaStream_t s, const char* op) {
  check_built(p.head_dim_qk, dt, op);
  run_kernel(op, [&] {
    with_instance(p.head_dim_qk, dt, [&]<int kDk, int kDv, DType kDT>() {
      nsa::cuda::run_attn_fwd<kDk, kDv, kDT>(p, s);
    });
  });
}

void dispatch_select(const SelectParams& p, DType dt, cudaStream_t s, const char* op) {
  check_built(p.head_dim_qk, dt, op);
  run_kernel(op, [&] {
    with_instance(p.head_dim_qk, dt, [&]<int kDk, int kDv, DType kDT>() {
      nsa::cuda::run_select_blocks<kDk, kDT>(p, s);
    });
  });
}

// Streaming multiprocessors of the current device (cached per device; a host query,
// no sync): the decode split count fills the GPU from it.
int num_sms() {
  static int cache[64] = {};
  const int dev = c10::cuda::current_device();
  if (dev < 0 || dev >= 64) return 132;
  if (cache[dev] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
      (void)cudaGetLastError();
      n = 132;
    }
    cache[dev] = n;
  }
  return cache[dev];
}

// fp32 workspace on the current device from the torch caching allocator; freed (and
// reusable) in stream order once the kernels that read it have run.
at::Tensor workspace(int64_t numel) {
  return at::empty({numel}, at::TensorOptions().dtype(at::kFloat).device(
                                at::kCUDA, c10::cuda::current_device()));
}

// Decode attention of one branch: split-KV kernel + combine over the splits.
void dispatch_attn_decode(const AttnFwdParams& p, DType dt, cudaStream_t s, const char* op) {
  check_built(p.head_dim_qk, dt, op);
  const int splits = nsa::cuda::decode_num_splits(p, num_sms());
  const int64_t rows = nsa::cuda::decode_partial_rows(p, splits, /*gated=*/false);
  at::Tensor o_part = workspace(rows * p.head_dim_v);
  at::Tensor lse_part = workspace(rows);
  float* op_ = o_part.data_ptr<float>();
  float* lp_ = lse_part.data_ptr<float>();
  run_kernel(op, [&] {
    with_instance(p.head_dim_qk, dt, [&]<int kDk, int kDv, DType kDT>() {
      nsa::cuda::run_attn_decode<kDk, kDv, kDT>(p, splits, op_, lp_, /*combine=*/true, s);
    });
  });
}

// The unmerged decode attention of a step's branches (sparse_attn_decode) in one
// launch: each branch keeps the split count it would have alone.
void dispatch_attn_decode_partials(std::vector<PendingDecode>& jobs, DType dt, cudaStream_t s) {
  const AttnFwdParams& first = jobs.front().params;
  check_built(first.head_dim_qk, dt, "sparse_attn_decode");
  TORCH_CHECK(jobs.size() <= size_t(nsa::cuda::kMaxDecodeJobs), "nsa_cuda: sparse_attn_decode: ",
              jobs.size(), " branches in one decode launch");
  nsa::cuda::DecodeAttnJob launch[nsa::cuda::kMaxDecodeJobs];
  for (size_t j = 0; j < jobs.size(); ++j) {
    const AttnFwdParams& p = jobs[j].params;
    const int splits = nsa::cuda::decode_num_splits(p, num_sms());
    const int64_t rows = nsa::cuda::decode_partial_rows(p, splits, /*gated=*/true);
    *jobs[j].partials = DecodePartials{workspace(rows * p.head_dim_v), workspace(rows), splits};
    launch[j] = nsa::cuda::DecodeAttnJob{p, splits, jobs[j].partials->o_part.data_ptr<float>(),
                                         jobs[j].partials->lse_part.data_ptr<float>()};
  }
  run_kernel("sparse_attn_decode (attention)", [&] {
    with_instance(first.head_dim_qk, dt, [&]<int kDk, int kDv, DType kDT>() {
      nsa::cuda::run_attn_decode_partials<kDk, kDv, kDT>(launch, int(jobs.size()), s);
    });
  });
}

void dispatch_decode_gate_combine(const DecodeGateParams& p, int64_t dk, DType dt, cudaStream_t s) {
  check_built(dk, dt, "sparse_attn_decode");
  run_kernel("decode_gate_combine", [&] {
    with_instance(dk, dt, [&]<int kDk, int kDv, DType kDT>() {
      nsa::cuda::run_decode_gate_combine<kDk, kDv, kDT>(p, s);
    });
  });
}

void dispatch_select_decode(const SelectParams& p, DType dt, cudaStream_t s, const char* op) {
  check_built(p.head_dim_qk, dt, op);
  at::Tensor scores = workspace(p.num_seqs * p.num_heads_kv * p.seqlen *
                                nsa::cuda::select_score_width(p));
  float* sc = scores.data_ptr<float>();
  run_kernel(op, [&] {
    with_instance(p.head_dim_qk, dt, [&]<int kDk, int kDv, DType kDT>() {
      nsa::cuda::run_select_blocks_decode<kDk, kDT>(p, sc, s);
    });
  });
}

// The attention backward instance for (Dk, Dv, dtype), plus its workspace:
// delta (float32, lse's layout) and, for the selected branch, the inverse index
// (keys from a kernel, sorted with at::sort: equal keys are equal values, so the
// order is deterministic). All from the caching allocator on the current
// stream; no host sync.
void dispatch_attn_bwd(const AttnBwdParams& p, DType dt, cudaStream_t s, const char* op) {
  check_built(p.head_dim_qk, dt, op);
  run_kernel(op, [&] {
    const auto opts = at::TensorOptions().device(at::kCUDA, c10::cuda::current_device());
    const int64_t batches = p.cu_seqlens != nullptr ? 1 : p.num_seqs;
    at::Tensor delta;
    if (p.delta_in == nullptr)
      delta = at::empty({batches * p.lse_batch_stride}, opts.dtype(at::kFloat));
    nsa::cuda::AttnBwdWorkspace ws;
    ws.delta = p.delta_in != nullptr ? static_cast<float*>(const_cast<void*>(p.delta_in))
                                     : delta.data_ptr<float>();
    ws.q_rows = p.lse_head_stride;  // lse is a contiguous [B, Hq, T]
    // Scratch the launchers size (the dk/dv split's plan and partial sums), freed when this
    // op returns: the caching allocator reuses it only for later work on this stream.
    std::vector<at::Tensor> scratch;
    ws.alloc_ctx = &scratch;
    ws.alloc = [](void* ctx, int64_t bytes) -> void* {
      auto& keep = *static_cast<std::vector<at::Tensor>*>(ctx);
      keep.push_back(at::empty({bytes}, at::TensorOptions().device(at::kCUDA, c10::cuda::current_device())
                                            .dtype(at::kByte)));
      return keep.back().data_ptr();
    };
    at::Tensor sorted_keys;
    if (p.branch == Branch::kSelected) {
      at::Tensor keys = at::empty({nsa::cuda::slc_inverse_key_count(p)}, opts.dtype(at::kLong));
      nsa::cuda::run_slc_inverse_keys(p, keys.data_ptr<int64_t>(), s);
      sorted_keys = std::get<0>(at::sort(keys, /*dim=*/0, /*descending=*/false));
      ws.slc_keys = sorted_keys.data_ptr<int64_t>();
      ws.slc_key_count = sorted_keys.numel();
    }
    with_instance(p.head_dim_qk, dt, [&]<int kDk, int kDv, DType kDT>() {
      nsa::cuda::run_attn_bwd<kDk, kDv, kDT>(p, ws, s);
    });
  });
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The kernels' dtype (check_support has already refused anything but fp16/bf16).
DType dtype_of(at::ScalarType t) { return t == at::kBFloat16 ? DType::kBf16 : DType::kFp16; }

struct CudaBackend {
  static constexpr bool kHasBackward = true;
  static constexpr bool kKeepsDecodeScores = true;
  static constexpr bool kWritesEveryGradElement = true;
  static constexpr bool kFusesDecodeGates = true;

  static c10::cuda::CUDAGuard prepare(const at::Tensor& q) { return c10::cuda::CUDAGuard(q.device()); }

  // dk/dv < 0: not part of this op (selection reads no values, compression no heads).
  static void check_support(const at::Tensor& q, int64_t dk, int64_t dv, const char* op) {
    TORCH_CHECK(q.is_cuda(), "nsa_cuda.", op, ": q must be a CUDA tensor");
    const DType dt = cuda_dtype(q, op);
    if (dk < 0) return;
    if (dv >= 0) {
      TORCH_CHECK((dk == 64 && dv == 64) || (dk == 128 && dv == 128) || (dk == 192 && dv == 128),
                  "nsa_cuda.", op, ": unsupported head dims (Dk, Dv) = (", dk, ", ", dv,
                  ") on CUDA; supported: (64, 64), (128, 128), (192, 128)");
    } else {
      TORCH_CHECK(dk == 64 || dk == 128 || dk == 192, "nsa_cuda.", op, ": unsupported head dim Dk = ",
                  dk, " on CUDA; supported: 64, 128, 192");
    }
    check_built(dk, dt, op);
  }

  static at::Tensor input(const at::Tensor& t) { return aligned(t); }
  static void fresh(const at::Tensor& t) { poison(t); }

  static void attn_fwd(const AttnFwdParams& p, at::ScalarType t) {
    dispatch_attn(p, dtype_of(t), current_stream(), "attn_fwd");
  }
  static void select_blocks(const SelectParams& p, at::ScalarType t) {
    dispatch_select(p, dtype_of(t), current_stream(), "select_blocks");
  }
  static void attn_bwd(const AttnBwdParams& p, at::ScalarType t) {
    dispatch_attn_bwd(p, dtype_of(t), current_stream(), "attn_bwd");
  }
  static void attn_decode(const AttnFwdParams& p, at::ScalarType t) {
    dispatch_attn_decode(p, dtype_of(t), current_stream(), "attn_decode");
  }
  static void attn_decode_partials(std::vector<PendingDecode>& jobs, at::ScalarType t) {
    dispatch_attn_decode_partials(jobs, dtype_of(t), current_stream());
  }
  static void decode_gate_combine(const DecodeGateParams& p, at::ScalarType t) {
    dispatch_decode_gate_combine(p, p.head_dim_qk, dtype_of(t), current_stream());
  }
  static void select_blocks_decode(const SelectParams& p, at::ScalarType t) {
    dispatch_select_decode(p, dtype_of(t), current_stream(), "select_blocks_decode");
  }
  // Mean compression, its gradient and the cache update take the dtype at run time.
  static void mean_compress(const CompressParams& p, at::ScalarType t) {
    run_kernel("mean_compress", [&] { nsa::cuda::run_mean_compress(p, dtype_of(t), current_stream()); });
  }
  static void mean_compress_bwd(const CompressParams& p, at::ScalarType t) {
    run_kernel("mean_compress_bwd",
               [&] { nsa::cuda::run_mean_compress_bwd(p, dtype_of(t), current_stream()); });
  }
  static void gate_combine(const GateParams& p, at::ScalarType t) {
    check_gate_head_dim(p, "gate_combine");
    run_kernel("gate_combine", [&] { nsa::cuda::run_gate_combine(p, dtype_of(t), current_stream()); });
  }
  static void gate_combine_bwd(const GateParams& p, at::ScalarType t) {
    check_gate_head_dim(p, "gate_combine_bwd");
    run_kernel("gate_combine_bwd",
               [&] { nsa::cuda::run_gate_combine_bwd(p, dtype_of(t), current_stream()); });
  }
  static void append_kv_to_cache(const CacheAppendParams& p, at::ScalarType t) {
    run_kernel("append_kv_to_cache",
               [&] { nsa::cuda::run_append_kv_to_cache(p, dtype_of(t), current_stream()); });
  }
  static void update_cmp_cache(const CompressParams& p, at::ScalarType t) {
    run_kernel("update_cmp_cache",
               [&] { nsa::cuda::run_update_cmp_cache(p, dtype_of(t), current_stream()); });
  }
};

}  // namespace
}  // namespace nsa::api

TORCH_LIBRARY_IMPL(nsa_cuda, CUDA, m) { nsa::api::register_backend<nsa::api::CudaBackend>(m); }
