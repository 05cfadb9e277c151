// Which kernel family a launch takes on the current device (launch.h). Host code.
#include <cuda_runtime.h>

#include <cstdlib>
#include <stdexcept>
#include <string>

#include "cuda/launch.h"

namespace nsa::cuda {

namespace {

// Compute capability of the current device as 10 * major + minor (cached per
// device: a host query, no sync); 0 when the query fails.
int current_device_sm() {
  static int cache[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
    (void)cudaGetLastError();
    return 0;
  }
  if (cache[dev] == 0) {
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    cache[dev] = 10 * major + minor;
  }
  return cache[dev];
}

}  // namespace

bool use_sm90_kernels() {
  const char* env = std::getenv("NSA_MAINLOOP");
  const std::string mode = env == nullptr || *env == '\0' ? "auto" : env;
  if (mode != "auto" && mode != "sm80" && mode != "sm90")
    throw std::runtime_error("NSA_MAINLOOP must be auto, sm80 or sm90, got '" + mode + "'");
  if (mode == "sm80") return false;
#ifdef NSA_SM90A_BUILT
  const bool built = true;
#else
  const bool built = false;
#endif
  // sm_90a code runs on compute capability 9.0 exactly.
  const bool can = built && current_device_sm() == 90;
  if (mode == "sm90" && !can)
    throw std::runtime_error(
        std::string("NSA_MAINLOOP=sm90: the wgmma kernels need ") +
        (built ? "a compute capability 9.0 device (H100/H200), this one is sm_" +
                     std::to_string(current_device_sm())
               : "a build with sm_90a in NSA_CUDA_ARCHS"));
  return can;
}

int selected_fwd_stages(int two_stage_smem) {
  const char* env = std::getenv("NSA_SLC_FWD_STAGES");
  const std::string value = env == nullptr ? "" : env;
  if (value == "1") return 1;
  if (value == "2") return 2;
  if (!value.empty() && value != "auto")
    throw std::runtime_error("NSA_SLC_FWD_STAGES must be auto, 1 or 2, got '" + value + "'");
  // Two CTAs per SM is the registers' limit either way (255 per thread, 128 threads):
  // two stages where two of its CTAs fit in an SM's shared memory (an H100's 228 KB
  // at every head dim), one where the second stage would cost that CTA (an A100's
  // 164 KB at Dk >= 128, a 100 KB sm_86/89 part at Dk >= 128).
  constexpr int kCtasPerSm = 2, kReservedPerCta = 1024;
  int device = 0, per_sm = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 1;
  }
  const bool fits = two_stage_smem <= optin && kCtasPerSm * (two_stage_smem + kReservedPerCta) <= per_sm;
  return fits ? 2 : 1;
}

}  // namespace nsa::cuda
