// Emulator shadow of CuTe's SM80 MMA header (NSA_CUDA_EMULATION only: this
// folder is on the include path ahead of CUTLASS's). The real header is
// included with the two atoms the kernels use renamed; the emulated atoms take
// their names, so CUTLASS's own MMA_Traits (layouts) apply to them unchanged.
#pragma once
#define SM80_16x8x16_F32F16F16F32_TN SM80_16x8x16_F32F16F16F32_TN_hardware
#define SM80_16x8x16_F32BF16BF16F32_TN SM80_16x8x16_F32BF16BF16F32_TN_hardware
#include_next <cute/arch/mma_sm80.hpp>
#undef SM80_16x8x16_F32F16F16F32_TN
#undef SM80_16x8x16_F32BF16BF16F32_TN
#include "emu/runtime.h"

namespace cute {

template <bool kBf16>
struct NsaEmuMma16x8x16 {
  using DRegisters = float[4];
  using ARegisters = uint32_t[4];
  using BRegisters = uint32_t[2];
  using CRegisters = float[4];

  static void fma(float& d0, float& d1, float& d2, float& d3, uint32_t const& a0,
                  uint32_t const& a1, uint32_t const& a2, uint32_t const& a3, uint32_t const& b0,
                  uint32_t const& b1, float const& c0, float const& c1, float const& c2,
                  float const& c3) {
    const uint32_t a[4] = {a0, a1, a2, a3}, b[2] = {b0, b1};
    const float c[4] = {c0, c1, c2, c3};
    float d[4];
    nsa_emu::mma_m16n8k16<kBf16>(d, a, b, c);
    d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
  }
};
struct SM80_16x8x16_F32F16F16F32_TN : NsaEmuMma16x8x16<false> {};
struct SM80_16x8x16_F32BF16BF16F32_TN : NsaEmuMma16x8x16<true> {};

}  // namespace cute
