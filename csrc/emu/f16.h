// IEEE half to float, exactly (subnormals, inf, NaN), for the emulated cuda_fp16.h
// and the emulator's ldmatrix/mma element reads: one copy of the bit layout.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace nsa_emu {

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  const int exp = (h >> 10) & 0x1f;
  const uint32_t man = h & 0x3ff;
  float f;
  if (exp == 0x1f) {
    const uint32_t u = sign | 0x7f800000u | (man << 13);
    std::memcpy(&f, &u, 4);
  } else if (exp == 0) {
    f = std::ldexp(float(man), -24);
    if (sign) f = -f;
  } else {
    const uint32_t u = sign | (uint32_t(exp - 15 + 127) << 23) | (man << 13);
    std::memcpy(&f, &u, 4);
  }
  return f;
}

}  // namespace nsa_emu
