// Emulator shadow of CuTe's SM75 copy header (see mma_sm80.hpp here): every
// ldmatrix atom is replaced by the emulator's warp-collective ldmatrix.
#pragma once
#define SM75_U32x1_LDSM_N SM75_U32x1_LDSM_N_hardware
#define SM75_U32x2_LDSM_N SM75_U32x2_LDSM_N_hardware
#define SM75_U32x4_LDSM_N SM75_U32x4_LDSM_N_hardware
#define SM75_U16x2_LDSM_T SM75_U16x2_LDSM_T_hardware
#define SM75_U16x4_LDSM_T SM75_U16x4_LDSM_T_hardware
#define SM75_U16x8_LDSM_T SM75_U16x8_LDSM_T_hardware
#include_next <cute/arch/copy_sm75.hpp>
#undef SM75_U32x1_LDSM_N
#undef SM75_U32x2_LDSM_N
#undef SM75_U32x4_LDSM_N
#undef SM75_U16x2_LDSM_T
#undef SM75_U16x4_LDSM_T
#undef SM75_U16x8_LDSM_T
#include "emu/runtime.h"

namespace cute {

struct SM75_U32x1_LDSM_N {
  using SRegisters = uint128_t[1];
  using DRegisters = uint32_t[1];
  static void copy(uint128_t const& s, uint32_t& d0) { nsa_emu::ldmatrix<1, false>(&s, &d0); }
};
struct SM75_U32x2_LDSM_N {
  using SRegisters = uint128_t[1];
  using DRegisters = uint32_t[2];
  static void copy(uint128_t const& s, uint32_t& d0, uint32_t& d1) {
    uint32_t d[2];
    nsa_emu::ldmatrix<2, false>(&s, d);
    d0 = d[0], d1 = d[1];
  }
};
struct SM75_U32x4_LDSM_N {
  using SRegisters = uint128_t[1];
  using DRegisters = uint32_t[4];
  static void copy(uint128_t const& s, uint32_t& d0, uint32_t& d1, uint32_t& d2, uint32_t& d3) {
    uint32_t d[4];
    nsa_emu::ldmatrix<4, false>(&s, d);
    d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
  }
};
struct SM75_U16x2_LDSM_T {
  using SRegisters = uint128_t[1];
  using DRegisters = uint32_t[1];
  static void copy(uint128_t const& s, uint32_t& d0) { nsa_emu::ldmatrix<1, true>(&s, &d0); }
};
struct SM75_U16x4_LDSM_T {
  using SRegisters = uint128_t[1];
  using DRegisters = uint32_t[2];
  static void copy(uint128_t const& s, uint32_t& d0, uint32_t& d1) {
    uint32_t d[2];
    nsa_emu::ldmatrix<2, true>(&s, d);
    d0 = d[0], d1 = d[1];
  }
};
struct SM75_U16x8_LDSM_T {
  using SRegisters = uint128_t[1];
  using DRegisters = uint32_t[4];
  static void copy(uint128_t const& s, uint32_t& d0, uint32_t& d1, uint32_t& d2, uint32_t& d3) {
    uint32_t d[4];
    nsa_emu::ldmatrix<4, true>(&s, d);
    d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
  }
};

}  // namespace cute
