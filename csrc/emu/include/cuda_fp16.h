// Storage-only __half / __half2 for CUTLASS's host paths (cutlass/half.h
// converts in software). The packed intrinsics are only declared: CUTLASS names
// them in code the kernels never instantiate, so a use fails at link time.
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>

#include "emu/f16.h"
struct __half_raw { unsigned short x; };
struct __half {
  unsigned short __x;
  __half() = default;
  __half(const __half_raw& r) : __x(r.x) {}
  operator __half_raw() const { return __half_raw{__x}; }
};
struct __half2 { __half x, y; };
typedef __half half;
typedef __half2 half2;
inline float __half2float(__half h) { return nsa_emu::f16_to_float(h.__x); }
__half __float2half(float f);
__half __float2half_rn(float f);
__half2 __hfma2(__half2, __half2, __half2);
__half2 __hadd2(__half2, __half2);
__half2 __hsub2(__half2, __half2);
__half2 __hmul2(__half2, __half2);
__half2 __hneg2(__half2);
__half2 __habs2(__half2);
__half2 __hmax2(__half2, __half2);
__half2 __hmin2(__half2, __half2);
__half2 __floats2half2_rn(float, float);
__half2 __float22half2_rn(struct float2);
__half2 __half2half2(__half);
__half __hadd(__half, __half);
__half __hmul(__half, __half);
__half __hsub(__half, __half);
__half __hfma(__half, __half, __half);
__half __hneg(__half);
__half __habs(__half);
__half __hmax(__half, __half);
__half __hmin(__half, __half);
int __dp4a(int, int, int);
unsigned __dp4a(unsigned, unsigned, unsigned);
unsigned __byte_perm(unsigned, unsigned, unsigned);
