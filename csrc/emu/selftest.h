// Unit check of the emulated tensor-core atoms (see selftest.cpp).
#pragma once

namespace nsa::emu {
// a, b: 64 x 64 row-major fp16/bf16. nt = a b^T, nn = a b (float32, row-major).
void gemm_selftest(const void* a, const void* b, bool bf16, float* nt, float* nn);
// The wgmma path (sm90): nt = a b^T, pv = round(a b^T) b (round: to a's dtype).
void gemm_selftest_sm90(const void* a, const void* b, bool bf16, float* nt, float* pv);
// A tiny kernel that is correct (mode 0), races on shared memory (1) or
// deadlocks (2): the emulator must fail the launch of the last two.
void hazard_selftest(int mode);
}  // namespace nsa::emu
