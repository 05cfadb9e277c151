// The emulator's one-definition pieces: the per-OS-thread dynamic shared memory
// that the kernels' `extern __shared__` arrays (block-scope declarations in
// namespace nsa::cuda) name. Both names get the same poisoned contents.
#include <cuda_runtime.h>

#include <cstdint>

namespace nsa::cuda {
// 1024-byte aligned like the GPU's dynamic smem: CuTe's swizzled smem pointers
// (wgmma layouts) swizzle address bits, and the emulated wgmma swizzles offsets.
__thread __attribute__((aligned(1024))) char smem[nsa_emu::kSmemBytes];
__thread __attribute__((aligned(1024))) uint32_t taken[nsa_emu::kSmemBytes / 4];
}  // namespace nsa::cuda

namespace nsa_emu {
char* dynamic_smem_base() { return nsa::cuda::smem; }
void poison_extra_smem(size_t bytes) { std::memset(nsa::cuda::taken, 0xff, bytes); }
}  // namespace nsa_emu
