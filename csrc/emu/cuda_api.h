// Host stand-in for the CUDA runtime API under NSA_CUDA_EMULATION: the types and
// calls the launchers and CuTe's host paths use, answered by the CPU emulator
// (csrc/emu/runtime.h). Attribute queries report an H100-like device so the
// launchers take the same decisions (smem opt-in, split counts) as on the GPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#ifndef NSA_CUDA_EMULATION
#error "csrc/emu is the CPU emulator of the CUDA kernels: compile with -DNSA_CUDA_EMULATION"
#endif

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef struct CUstream_st* cudaStream_t;

// A generic pointer into the launch's dynamic smem -> its shared address (the
// offset; runtime.h). CuTe's cast_smem_ptr_to_uint (wgmma descriptors) calls it:
// the emulator's build defines CUTE_CVTA_GENERIC_TO_SHARED_ACTIVATED.
inline size_t __cvta_generic_to_shared(const void* p);

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace nsa_emu {
constexpr int kSmemOptin = 227 * 1024;  // H100 / H200
constexpr int kSmemPerSm = 228 * 1024;
constexpr int kSmemDefault = 48 * 1024;
constexpr int kNumSms = 132;

inline uint64_t env_u64(const char* name, uint64_t dflt) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 10) : dflt;
}

// The shared memory the emulated device allows a block (opt-in) and has per SM:
// an H100's, or NSA_EMU_SMEM_OPTIN / NSA_EMU_SMEM_PER_SM (read at each query), e.g.
// an sm_86 GPU's 99 KB, for the kernels' choices by device size.
inline int smem_optin() {
  const uint64_t n = env_u64("NSA_EMU_SMEM_OPTIN", kSmemOptin);
  return n > 0 && n <= uint64_t(kSmemOptin) ? int(n) : kSmemOptin;
}
inline int smem_per_sm() {
  const uint64_t n = env_u64("NSA_EMU_SMEM_PER_SM", kSmemPerSm);
  return n > 0 && n <= uint64_t(kSmemPerSm) ? int(n) : kSmemPerSm;
}

// The SM count the emulated device reports: kNumSms, or NSA_EMU_SMS (read at each
// query), e.g. 1 so that the decode kernels run every chunk of a tile in one split.
inline int num_sms() {
  const uint64_t n = env_u64("NSA_EMU_SMS", kNumSms);
  return n > 0 && n < 100000 ? int(n) : kNumSms;
}

struct ApiState {
  std::mutex mu;
  cudaError_t last = cudaSuccess;
  std::string message;
  std::map<const void*, int> smem_limit;  // cudaFuncSetAttribute per kernel
};
inline ApiState& api() {
  static ApiState s;
  return s;
}
inline void set_error(cudaError_t e, const std::string& msg) {
  std::lock_guard<std::mutex> g(api().mu);
  if (api().last == cudaSuccess) api().last = e, api().message = msg;
}
inline int smem_limit_of(const void* fn) {
  std::lock_guard<std::mutex> g(api().mu);
  auto it = api().smem_limit.find(fn);
  return it == api().smem_limit.end() ? kSmemDefault : it->second;
}
}  // namespace nsa_emu

inline cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> g(nsa_emu::api().mu);
  cudaError_t e = nsa_emu::api().last;
  nsa_emu::api().last = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() {
  std::lock_guard<std::mutex> g(nsa_emu::api().mu);
  return nsa_emu::api().last;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  // The emulator's diagnostics are more useful than the code's generic name.
  static thread_local std::string s;
  std::lock_guard<std::mutex> g(nsa_emu::api().mu);
  s = nsa_emu::api().message.empty() ? "emulated CUDA error" : nsa_emu::api().message;
  return s.c_str();
}
inline const char* cudaGetErrorName(cudaError_t) { return "cudaErrorEmulated"; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (a) {
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = nsa_emu::kSmemDefault; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *v = nsa_emu::num_sms(); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = nsa_emu::smem_optin(); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *v = nsa_emu::smem_per_sm(); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *v = 9; return cudaSuccess;  // sm_90
    case cudaDevAttrComputeCapabilityMinor: *v = 0; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <class Fn>
inline cudaError_t cudaFuncSetAttribute(Fn* fn, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > nsa_emu::smem_optin()) {
    nsa_emu::set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: invalid value");
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> g(nsa_emu::api().mu);
  nsa_emu::api().smem_limit[reinterpret_cast<const void*>(fn)] = value;
  return cudaSuccess;
}
