// Emulator shadow of CuTe's SM90 GMMA header (see mma_sm80.hpp here): the real
// header is included with the warpgroup primitives and the wgmma atoms the kernels
// use renamed (m64n{64,128}k16 SS and RS, m64n{16,32}k16 SS, m64n192k16 RS; f16 and bf16 with f32
// accumulators); the emulated ones take their names, so CUTLASS's MMA_Traits (the
// layouts) and make_gmma_desc (the descriptors) apply to them unchanged.
#pragma once
#define warpgroup_arrive warpgroup_arrive_hardware
#define warpgroup_wait warpgroup_wait_hardware
#define warpgroup_commit_batch warpgroup_commit_batch_hardware
#define MMA_64x16x16_F32F16F16_SS MMA_64x16x16_F32F16F16_SS_hardware
#define MMA_64x16x16_F32BF16BF16_SS MMA_64x16x16_F32BF16BF16_SS_hardware
#define MMA_64x32x16_F32F16F16_SS MMA_64x32x16_F32F16F16_SS_hardware
#define MMA_64x32x16_F32BF16BF16_SS MMA_64x32x16_F32BF16BF16_SS_hardware
#define MMA_64x64x16_F32F16F16_SS MMA_64x64x16_F32F16F16_SS_hardware
#define MMA_64x64x16_F32F16F16_RS MMA_64x64x16_F32F16F16_RS_hardware
#define MMA_64x128x16_F32F16F16_SS MMA_64x128x16_F32F16F16_SS_hardware
#define MMA_64x128x16_F32F16F16_RS MMA_64x128x16_F32F16F16_RS_hardware
#define MMA_64x64x16_F32BF16BF16_SS MMA_64x64x16_F32BF16BF16_SS_hardware
#define MMA_64x64x16_F32BF16BF16_RS MMA_64x64x16_F32BF16BF16_RS_hardware
#define MMA_64x128x16_F32BF16BF16_SS MMA_64x128x16_F32BF16BF16_SS_hardware
#define MMA_64x128x16_F32BF16BF16_RS MMA_64x128x16_F32BF16BF16_RS_hardware
#define MMA_64x192x16_F32F16F16_RS MMA_64x192x16_F32F16F16_RS_hardware
#define MMA_64x192x16_F32BF16BF16_RS MMA_64x192x16_F32BF16BF16_RS_hardware
#include_next <cute/arch/mma_sm90_gmma.hpp>
#undef warpgroup_arrive
#undef warpgroup_wait
#undef warpgroup_commit_batch
#undef MMA_64x16x16_F32F16F16_SS
#undef MMA_64x16x16_F32BF16BF16_SS
#undef MMA_64x32x16_F32F16F16_SS
#undef MMA_64x32x16_F32BF16BF16_SS
#undef MMA_64x64x16_F32F16F16_SS
#undef MMA_64x64x16_F32F16F16_RS
#undef MMA_64x128x16_F32F16F16_SS
#undef MMA_64x128x16_F32F16F16_RS
#undef MMA_64x64x16_F32BF16BF16_SS
#undef MMA_64x64x16_F32BF16BF16_RS
#undef MMA_64x128x16_F32BF16BF16_SS
#undef MMA_64x128x16_F32BF16BF16_RS
#undef MMA_64x192x16_F32F16F16_RS
#undef MMA_64x192x16_F32BF16BF16_RS
#include "emu/runtime.h"

namespace cute {

// wgmma.fence orders register accesses against the asynchronous MMA; the emulator
// reads and writes the registers only at issue (A) and at the wait (D).
inline void warpgroup_arrive() {}
template <int N>
inline void warpgroup_wait() {
  static_assert(N >= 0 && N <= 7, "WGMMA wait: N must be in range [0, 7]");
  nsa_emu::wgmma_wait(N);
}
inline void warpgroup_commit_batch() { nsa_emu::wgmma_commit(); }

namespace SM90::GMMA {

template <size_t>
using NsaEmuFloat = float;

template <bool kBf16, GMMA::Major kMajorA, GMMA::Major kMajorB>
inline void nsa_emu_gmma_issue(nsa_emu::WgmmaLane op, int n, bool a_regs, float* const* d,
                               GMMA::ScaleOut scale_d) {
  op.n = n;
  op.bf16 = kBf16;
  op.a_regs = a_regs;
  op.a_mn = kMajorA == GMMA::Major::MN;
  op.b_mn = kMajorB == GMMA::Major::MN;
  op.scale_d = int(scale_d);
  for (int i = 0; i < n / 2; ++i) op.d[i] = d[i];
  nsa_emu::wgmma_issue(op);
}

// The atoms' fma takes one float& per accumulator: a parameter pack expanded by the
// class (not deduced), so that &fma is an ordinary function pointer (CuTe's
// mma_unpack passes it to explode).
template <int kN, bool kBf16, GMMA::Major tnspA, GMMA::Major tnspB,
          class Seq = std::make_index_sequence<kN / 2>>
struct NsaEmuGmmaSS;
template <int kN, bool kBf16, GMMA::Major tnspA, GMMA::Major tnspB, size_t... I>
struct NsaEmuGmmaSS<kN, kBf16, tnspA, tnspB, std::index_sequence<I...>> {
  static_assert(kN <= 192);
  using DRegisters = void;
  using ARegisters = uint64_t[1];
  using BRegisters = uint64_t[1];
  using CRegisters = float[kN / 2];
  static void fma(uint64_t const& desc_a, uint64_t const& desc_b, NsaEmuFloat<I>&... d,
                  GMMA::ScaleOut const scale_D = GMMA::ScaleOut::One) {
    nsa_emu::WgmmaLane op;
    op.desc_a = desc_a;
    op.desc_b = desc_b;
    float* const regs[] = {&d...};
    nsa_emu_gmma_issue<kBf16, tnspA, tnspB>(op, kN, false, regs, scale_D);
  }
};

template <int kN, bool kBf16, GMMA::Major tnspA, GMMA::Major tnspB,
          class Seq = std::make_index_sequence<kN / 2>>
struct NsaEmuGmmaRS;
template <int kN, bool kBf16, GMMA::Major tnspA, GMMA::Major tnspB, size_t... I>
struct NsaEmuGmmaRS<kN, kBf16, tnspA, tnspB, std::index_sequence<I...>> {
  static_assert(kN <= 192);
  static_assert(tnspA == GMMA::Major::K, "Register source operand A must have K major layout.");
  using DRegisters = void;
  using ARegisters = uint32_t[4];
  using BRegisters = uint64_t[1];
  using CRegisters = float[kN / 2];
  static void fma(uint32_t const& a0, uint32_t const& a1, uint32_t const& a2, uint32_t const& a3,
                  uint64_t const& desc_b, NsaEmuFloat<I>&... d,
                  GMMA::ScaleOut const scale_D = GMMA::ScaleOut::One) {
    nsa_emu::WgmmaLane op;
    op.a[0] = &a0, op.a[1] = &a1, op.a[2] = &a2, op.a[3] = &a3;
    op.desc_b = desc_b;
    float* const regs[] = {&d...};
    nsa_emu_gmma_issue<kBf16, tnspA, tnspB>(op, kN, true, regs, scale_D);
  }
};

#define NSA_EMU_GMMA(NAME, N, BF16, KIND)                                                  \
  template <GMMA::Major tnspA, GMMA::Major tnspB, GMMA::ScaleIn scaleA = GMMA::ScaleIn::One, \
            GMMA::ScaleIn scaleB = GMMA::ScaleIn::One>                                     \
  struct NAME : NsaEmuGmma##KIND<N, BF16, tnspA, tnspB> {                                  \
    static_assert(scaleA == GMMA::ScaleIn::One && scaleB == GMMA::ScaleIn::One,            \
                  "the emulator models unscaled operands only");                           \
  };
NSA_EMU_GMMA(MMA_64x16x16_F32F16F16_SS, 16, false, SS)
NSA_EMU_GMMA(MMA_64x16x16_F32BF16BF16_SS, 16, true, SS)
NSA_EMU_GMMA(MMA_64x32x16_F32F16F16_SS, 32, false, SS)
NSA_EMU_GMMA(MMA_64x32x16_F32BF16BF16_SS, 32, true, SS)
NSA_EMU_GMMA(MMA_64x64x16_F32F16F16_SS, 64, false, SS)
NSA_EMU_GMMA(MMA_64x64x16_F32F16F16_RS, 64, false, RS)
NSA_EMU_GMMA(MMA_64x128x16_F32F16F16_SS, 128, false, SS)
NSA_EMU_GMMA(MMA_64x128x16_F32F16F16_RS, 128, false, RS)
NSA_EMU_GMMA(MMA_64x64x16_F32BF16BF16_SS, 64, true, SS)
NSA_EMU_GMMA(MMA_64x64x16_F32BF16BF16_RS, 64, true, RS)
NSA_EMU_GMMA(MMA_64x128x16_F32BF16BF16_SS, 128, true, SS)
NSA_EMU_GMMA(MMA_64x128x16_F32BF16BF16_RS, 128, true, RS)
NSA_EMU_GMMA(MMA_64x192x16_F32F16F16_RS, 192, false, RS)
NSA_EMU_GMMA(MMA_64x192x16_F32BF16BF16_RS, 192, true, RS)
#undef NSA_EMU_GMMA

}  // namespace SM90::GMMA
}  // namespace cute
