// Emulator shadow of CuTe's SM80 copy header (see mma_sm80.hpp here): cp.async
// and its commit / wait go through the emulator, which lands each copy either
// at once or at the issuing thread's wait.
#pragma once
#define SM80_CP_ASYNC_CACHEALWAYS SM80_CP_ASYNC_CACHEALWAYS_hardware
#define SM80_CP_ASYNC_CACHEGLOBAL SM80_CP_ASYNC_CACHEGLOBAL_hardware
#define SM80_CP_ASYNC_CACHEALWAYS_ZFILL SM80_CP_ASYNC_CACHEALWAYS_ZFILL_hardware
#define SM80_CP_ASYNC_CACHEGLOBAL_ZFILL SM80_CP_ASYNC_CACHEGLOBAL_ZFILL_hardware
#define cp_async_fence cp_async_fence_hardware
#define cp_async_wait cp_async_wait_hardware
#include_next <cute/arch/copy_sm80.hpp>
#undef SM80_CP_ASYNC_CACHEALWAYS
#undef SM80_CP_ASYNC_CACHEGLOBAL
#undef SM80_CP_ASYNC_CACHEALWAYS_ZFILL
#undef SM80_CP_ASYNC_CACHEGLOBAL_ZFILL
#undef cp_async_fence
#undef cp_async_wait
#include "emu/runtime.h"

namespace cute {

template <class TS, class TD = TS, bool kZfill = false>
struct NsaEmuCpAsync {
  using SRegisters = TS[1];
  using DRegisters = TD[1];
  static_assert(sizeof(TS) == sizeof(TD) && sizeof(TS) == 16,
                "the emulator models the 16-byte cp.async only");
  static void copy(TS const& gmem_src, TD& smem_dst) {
    nsa_emu::cp_async_16(&smem_dst, &gmem_src, true);
  }
  static void copy(TS const& gmem_src, TD& smem_dst, bool pred) {
    nsa_emu::cp_async_16(&smem_dst, &gmem_src, pred);
  }
};
template <class TS, class TD = TS>
struct SM80_CP_ASYNC_CACHEALWAYS : NsaEmuCpAsync<TS, TD> {};
template <class TS, class TD = TS>
struct SM80_CP_ASYNC_CACHEGLOBAL : NsaEmuCpAsync<TS, TD> {};
template <class TS, class TD = TS>
struct SM80_CP_ASYNC_CACHEALWAYS_ZFILL : NsaEmuCpAsync<TS, TD, true> {};
template <class TS, class TD = TS>
struct SM80_CP_ASYNC_CACHEGLOBAL_ZFILL : NsaEmuCpAsync<TS, TD, true> {};

inline void cp_async_fence() { nsa_emu::cp_async_fence(); }
template <int N>
inline void cp_async_wait() {
  nsa_emu::cp_async_wait(N);
}
template <int N>
inline void cp_async_wait(Int<N>) {
  nsa_emu::cp_async_wait(N);
}

}  // namespace cute
