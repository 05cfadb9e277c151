// The CUDA kernel instances a build holds (NSA_HEADDIMS x NSA_DTYPES, as -D macros)
// and the input rule the kernels need, shared by the CUDA backend (cuda_ops.cpp)
// and the CPU emulator's (emu/emu_ops.cpp): the only place that lists the instances.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <stdexcept>

#include "cuda/launch.h"

// The op library named in error messages; the emulator defines its own.
#ifndef NSA_OP_LIBRARY
#define NSA_OP_LIBRARY "nsa_cuda"
#endif

namespace nsa::api {

// Runs a launcher, turning its std::exception (a limit, a launch failure) into a
// torch error that names the op.
template <class F>
void run_kernel(const char* op, F f) {
  try {
    f();
  } catch (const std::exception& e) {
    TORCH_CHECK(false, NSA_OP_LIBRARY ".", op, ": ", e.what());
  }
}

// Calls f.template operator()<Dk, Dv, dtype>() for the built instance of (dk, dt);
// false when this build has none.
template <class F>
bool visit_instance(int64_t dk, cuda::DType dt, F&& f) {
  using cuda::DType;
  const bool bf16 = dt == DType::kBf16;
  (void)bf16;
#if defined(NSA_HDIM_64) && defined(NSA_DTYPE_FP16)
  if (dk == 64 && !bf16) return f.template operator()<64, 64, DType::kFp16>(), true;
#endif
#if defined(NSA_HDIM_64) && defined(NSA_DTYPE_BF16)
  if (dk == 64 && bf16) return f.template operator()<64, 64, DType::kBf16>(), true;
#endif
#if defined(NSA_HDIM_128) && defined(NSA_DTYPE_FP16)
  if (dk == 128 && !bf16) return f.template operator()<128, 128, DType::kFp16>(), true;
#endif
#if defined(NSA_HDIM_128) && defined(NSA_DTYPE_BF16)
  if (dk == 128 && bf16) return f.template operator()<128, 128, DType::kBf16>(), true;
#endif
#if defined(NSA_HDIM_192) && defined(NSA_DTYPE_FP16)
  if (dk == 192 && !bf16) return f.template operator()<192, 128, DType::kFp16>(), true;
#endif
#if defined(NSA_HDIM_192) && defined(NSA_DTYPE_BF16)
  if (dk == 192 && bf16) return f.template operator()<192, 128, DType::kBf16>(), true;
#endif
  return false;
}

template <class F>
void with_instance(int64_t dk, cuda::DType dt, F&& f) {
  if (!visit_instance(dk, dt, f))
    throw std::runtime_error("no kernel instance for these head dims and dtype");
}

inline bool instance_built(int64_t dk, cuda::DType dt) {
  return visit_instance(dk, dt, []<int, int, cuda::DType>() {});
}

// The gate kernels move rows in 16-byte (8-element) vectors.
inline void check_gate_head_dim(const GateParams& p, const char* op) {
  TORCH_CHECK(p.head_dim % 8 == 0, NSA_OP_LIBRARY ".", op, ": the CUDA kernel needs the head dim Dv to be a ",
              "multiple of 8, got ", p.head_dim);
}

// The kernels load 16-byte chunks: base 16-byte aligned, row and head strides
// multiples of 8 elements. Anything else is copied (rare: slices, odd strides).
inline at::Tensor aligned(const at::Tensor& t) {
  auto ok = [](const at::Tensor& x) {
    return reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && x.stride(0) % 8 == 0 &&
           x.stride(1) % 8 == 0 && x.stride(2) % 8 == 0 && x.stride(3) == 1;
  };
  if (ok(t)) return t;
  at::Tensor c = t.contiguous();
  if (!ok(c)) c = t.clone(at::MemoryFormat::Contiguous);
  return c;
}

}  // namespace nsa::api
