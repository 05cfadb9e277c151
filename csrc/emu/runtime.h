// CPU emulator of the CUDA execution model, for running the kernels' own source
// on the host (NSA_CUDA_EMULATION). Each CTA runs on one OS thread; its threads
// are fibers that switch only at barriers and warp-collective operations, so
// host code between two such points runs without interleaving, as one thread.
//
// What it models, and why:
//   - __syncthreads / __syncwarp / shuffles / ballots / mma.sync / ldmatrix are
//     rendezvous points: a collective runs when the last lane of the warp arrives
//     (from every lane's deposited registers), then the lanes resume.
//   - The order in which fibers run between two barriers is shuffled (seeded by
//     NSA_EMU_SEED and the CTA index), so code that relies on an order the GPU
//     does not guarantee (a missing __syncthreads) has a chance to go wrong.
//   - cp.async: the source is read at issue; the 16 bytes land in shared memory
//     either at once or only at the issuing thread's cp.async.wait (chosen at
//     random per copy), so a missing wait or a reload into a tile other threads
//     still read shows up as wrong data.
//   - Dynamic shared memory is filled with 0xff (NaN in every float format) at
//     the start of each CTA; ldmatrix and cp.async check that their shared
//     addresses lie inside the launch's dynamic smem and are 16-byte aligned.
//   - A launch asking for more than 48 KB of dynamic smem fails unless
//     cudaFuncSetAttribute raised the kernel's limit first (as on the GPU).
//   - Deadlocks (lanes of a warp split between different barriers, a collective
//     with exited lanes) and mismatched collectives fail the launch with a
//     message, returned by cudaGetLastError / cudaGetErrorString.
// Not modelled: memory-model effects beyond the above, fast-math intrinsics
// (__expf is expf), tensor-core accumulation order (double, rounded once).
#pragma once

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include "emu/cuda_api.h"
#include "emu/f16.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// ---- keywords ---------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
// Dynamic smem (`extern __shared__ T name[]`) is a per-OS-thread buffer: the
// fibers of a CTA share their OS thread. GCC's __thread, not thread_local: no
// dynamic-initialisation wrapper (whose weak reference breaks extern arrays).
// The emulator defines the buffers (emu_runtime.cpp).
#define __shared__ __thread

namespace nsa_emu {

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 512 * 1024;
constexpr size_t kSmemBytes = 232448;  // 227 KB, the opt-in maximum

enum class State : uint8_t { kRunnable, kBlockBarrier, kWarpBarrier, kDone };
enum Op : int { kOpSyncwarp = 1, kOpShfl, kOpBallot, kOpMma, kOpLdsm };

struct PendingCopy {
  void* dst;
  unsigned char bytes[16];
  int group;  // -1: not yet committed
  uint32_t issue_epoch;
};

// Race detector over the shared-memory accesses the emulator sees (cp.async
// landings, ldmatrix reads), per 16-byte granule: the last write and the last
// read, each as (barrier epoch, thread). Another thread's access to a granule in
// the same epoch (between the same two __syncthreads) is a race; a cp.async is
// in flight from its issue to its wait, so a read by another thread in any epoch
// of that interval is one too. Plain C++ loads and stores are not tracked.
struct Access {
  uint32_t epoch = ~0u;
  int32_t tid = -1;  // -2: several threads read in that epoch
};

struct Cta;

struct Fiber {
  void* sp = nullptr;
  Cta* cta = nullptr;
  int tid = 0;
  uint3 tidx{0, 0, 0};
  State state = State::kRunnable;
  uint64_t warp_ops = 0;
  int next_group = 0;
  std::vector<PendingCopy> pending;
  int wg_commits = 0;  // wgmma.commit_group calls so far
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
};

// One thread's part of a wgmma.mma_async (see wgmma() below).
struct WgmmaLane {
  uint64_t desc_a = 0, desc_b = 0;  // desc_a unused when A comes from registers
  // A from registers: the addresses of the lane's four A registers, read when the
  // wgmma executes (at the wait), as the hardware may: A overwritten before the
  // wait is read as overwritten.
  const uint32_t* a[4] = {nullptr, nullptr, nullptr, nullptr};
  float* d[96] = {};  // n / 2 accumulators (n <= 192)
  int n = 0, group = 0, scale_d = 1;
  bool a_regs = false, bf16 = false, a_mn = false, b_mn = false;
};

// An issued wgmma (all 128 lanes), executed when a wait_group retires its group.
struct WgmmaOp {
  std::vector<WgmmaLane> lanes;
};

struct Warpgroup {
  int arrived = 0;       // lanes at the current wgmma or wait_group
  int wait_n = 0;
  std::vector<WgmmaLane> cur = std::vector<WgmmaLane>(128);
  std::vector<WgmmaOp> in_flight;  // issued, not yet retired, oldest first
};

struct LaneSlot {
  int op;
  uint64_t in[12];
  uint64_t out[4];
};

struct Cta {
  uint3 block_idx{0, 0, 0};
  dim3 grid, block;
  int nthreads = 0;
  size_t smem_bytes = 0;
  char* smem_base = nullptr;  // this OS thread's dynamic smem buffer
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  void* sched_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t sched_uc;
#endif
  int arrived = 0, done = 0;
  uint32_t epoch = 0;  // completed __syncthreads
  std::vector<Access> last_write, last_read;  // per 16-byte granule of dynamic smem
  std::vector<int> warp_arrived;
  std::vector<LaneSlot> slots;  // [2 parities][warps][32 lanes]
  std::vector<Warpgroup> warpgroups;
  std::mt19937_64 rng;
  bool copies_random = true;
  std::string error;
};

inline thread_local Fiber* t_fiber = nullptr;
inline thread_local Cta* t_cta = nullptr;

}  // namespace nsa_emu

#define threadIdx (::nsa_emu::t_fiber->tidx)
#define blockIdx (::nsa_emu::t_cta->block_idx)
#define blockDim (::nsa_emu::t_cta->block)
#define gridDim (::nsa_emu::t_cta->grid)

namespace nsa_emu {

// ---- context switch ---------------------------------------------------------
#if defined(__x86_64__)
// switch(save, to): pushes the callee-saved registers (and mxcsr / x87 control
// word), stores rsp in *save, loads `to`, pops and returns there. Weak: the
// header is included by several translation units.
asm(R"(
.pushsection .text
.weak nsa_emu_switch
.type nsa_emu_switch,@function
nsa_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size nsa_emu_switch,.-nsa_emu_switch
.weak nsa_emu_fiber_start
.type nsa_emu_fiber_start,@function
nsa_emu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
.size nsa_emu_fiber_start,.-nsa_emu_fiber_start
.popsection
)");
extern "C" void nsa_emu_switch(void** save, void* to);
extern "C" void nsa_emu_fiber_start();
#endif

[[noreturn]] inline void fiber_main(Fiber* f);

#if !defined(__x86_64__)
inline void fiber_entry_uc(unsigned lo, unsigned hi) {
  fiber_main(reinterpret_cast<Fiber*>((uintptr_t(hi) << 32) | uintptr_t(lo)));
}
#endif

inline void prepare_fiber(Fiber& f, char* stack_lo, size_t size) {
#if defined(__x86_64__)
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack_lo) + size) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 80);
  uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(*reinterpret_cast<uint16_t*>(&csr[1])));
  std::memcpy(&sp[0], csr, 8);
  sp[1] = 0;                                       // r15
  sp[2] = 0;                                       // r14
  sp[3] = reinterpret_cast<uint64_t>(&fiber_main);  // r13: entry
  sp[4] = reinterpret_cast<uint64_t>(&f);           // r12: its argument
  sp[5] = 0;                                       // rbx
  sp[6] = 0;                                       // rbp
  sp[7] = reinterpret_cast<uint64_t>(&nsa_emu_fiber_start);
  sp[8] = 0;
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = stack_lo;
  f.uc.uc_stack.ss_size = size;
  f.uc.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(&f);
  makecontext(&f.uc, reinterpret_cast<void (*)()>(&fiber_entry_uc), 2, unsigned(p),
              unsigned(p >> 32));
#endif
}

inline void switch_to_fiber(Cta& c, Fiber& f) {
  t_fiber = &f;
#if defined(__x86_64__)
  nsa_emu_switch(&c.sched_sp, f.sp);
#else
  swapcontext(&c.sched_uc, &f.uc);
#endif
  t_fiber = nullptr;
}

// Back to the CTA's scheduler; returns when the scheduler resumes this fiber.
inline void yield_fiber() {
  Fiber* f = t_fiber;
  Cta* c = f->cta;
#if defined(__x86_64__)
  nsa_emu_switch(&f->sp, c->sched_sp);
#else
  swapcontext(&f->uc, &c->sched_uc);
#endif
}

// An error inside a fiber: recorded; the fiber never runs again (the scheduler
// stops the CTA at its next turn).
[[noreturn]] inline void fiber_fail(const std::string& msg) {
  Cta* c = t_cta;
  if (c->error.empty()) {
    char where[160];
    std::snprintf(where, sizeof where, " [block (%u,%u,%u), thread %d]", c->block_idx.x,
                  c->block_idx.y, c->block_idx.z, t_fiber->tid);
    c->error = msg + where;
  }
  for (;;) {
    t_fiber->state = State::kBlockBarrier;
    yield_fiber();
  }
}

inline void release_block_if_complete(Cta& c) {
  if (c.arrived > 0 && c.arrived + c.done == c.nthreads) {
    for (Fiber& f : c.fibers)
      if (f.state == State::kBlockBarrier) f.state = State::kRunnable;
    c.arrived = 0;
    c.epoch++;
  }
}

[[noreturn]] inline void fiber_main(Fiber* f) {
  (*f->cta->body)();
  f->state = State::kDone;
  f->cta->done++;
  release_block_if_complete(*f->cta);
  yield_fiber();
  std::abort();  // a finished fiber is never resumed
}

// ---- barriers and warp collectives -----------------------------------------
inline void syncthreads() {
  Fiber* f = t_fiber;
  Cta& c = *f->cta;
  f->state = State::kBlockBarrier;
  c.arrived++;
  release_block_if_complete(c);
  yield_fiber();
}

inline int warp_size_of(const Cta& c, int warp) { return std::min(32, c.nthreads - warp * 32); }

// Deposits this lane's `in` bytes, waits for all lanes of the warp; the last one
// to arrive runs compute(lanes) over the 32 slots (filling each slot's `out`),
// then every lane gets its own `out`.
template <class Compute>
inline void warp_collective(int op, const void* in, size_t in_bytes, void* out, size_t out_bytes,
                            Compute&& compute) {
  Fiber* f = t_fiber;
  Cta& c = *f->cta;
  const int warp = f->tid / 32, lane = f->tid % 32;
  const int nwarps = (c.nthreads + 31) / 32;
  LaneSlot* lanes = &c.slots[((f->warp_ops++ & 1) * nwarps + warp) * 32];
  LaneSlot& mine = lanes[lane];
  mine.op = op;
  if (in_bytes) std::memcpy(mine.in, in, in_bytes);
  f->state = State::kWarpBarrier;
  if (++c.warp_arrived[warp] == warp_size_of(c, warp)) {
    if (warp_size_of(c, warp) != 32) fiber_fail("warp collective in a partial warp");
    for (int l = 0; l < 32; ++l)
      if (lanes[l].op != op)
        fiber_fail("lanes of a warp reached different warp-collective operations (op " +
                   std::to_string(lanes[l].op) + " vs " + std::to_string(op) + ")");
    compute(lanes);
    c.warp_arrived[warp] = 0;
    for (int l = 0; l < 32; ++l) c.fibers[warp * 32 + l].state = State::kRunnable;
  }
  yield_fiber();
  if (out_bytes) std::memcpy(out, mine.out, out_bytes);
}

inline void check_full_mask(unsigned mask) {
  if (mask != 0xffffffffu) fiber_fail("the emulator supports only full-warp masks");
}

template <class T>
inline T shfl_generic(unsigned mask, T v, int mode, int arg, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  check_full_mask(mask);
  if (width <= 0 || width > 32 || (width & (width - 1))) fiber_fail("shfl: bad width");
  uint64_t in[2] = {0, 0};
  std::memcpy(&in[0], &v, sizeof(T));
  in[1] = (uint64_t(uint32_t(mode)) << 32) | uint32_t(arg);
  uint64_t out = 0;
  warp_collective(kOpShfl, in, sizeof in, &out, sizeof out, [width](LaneSlot* lanes) {
    for (int l = 0; l < 32; ++l) {
      const int mode = int(lanes[l].in[1] >> 32), arg = int(uint32_t(lanes[l].in[1]));
      const int base = l & ~(width - 1);
      int src = l;
      if (mode == 0) src = base + (arg & (width - 1));                    // idx
      else if (mode == 1) src = (l - base) + arg < width ? l + arg : l;   // down
      else if (mode == 2) src = (l - base) - arg >= 0 ? l - arg : l;      // up
      else src = base + (((l - base) ^ arg) & (width - 1));               // xor
      lanes[l].out[0] = lanes[src].in[0];
    }
  });
  T r;
  std::memcpy(&r, &out, sizeof(T));
  return r;
}

inline unsigned ballot(unsigned mask, bool pred) {
  check_full_mask(mask);
  uint64_t in = pred ? 1 : 0, out = 0;
  warp_collective(kOpBallot, &in, sizeof in, &out, sizeof out, [](LaneSlot* lanes) {
    uint64_t b = 0;
    for (int l = 0; l < 32; ++l) b |= (lanes[l].in[0] & 1) << l;
    for (int l = 0; l < 32; ++l) lanes[l].out[0] = b;
  });
  return unsigned(out);
}

inline void syncwarp(unsigned mask) {
  check_full_mask(mask);
  warp_collective(kOpSyncwarp, nullptr, 0, nullptr, 0, [](LaneSlot*) {});
}

// ---- shared memory and cp.async ---------------------------------------------
inline void check_smem(const void* p, size_t bytes, const char* what) {
  Cta& c = *t_cta;
  const char* q = static_cast<const char*>(p);
  if (q < c.smem_base || q + bytes > c.smem_base + c.smem_bytes)
    fiber_fail(std::string(what) + ": shared address outside the launch's dynamic smem (offset " +
               std::to_string(q - c.smem_base) + ", size " + std::to_string(c.smem_bytes) + ")");
  if (reinterpret_cast<uintptr_t>(q) % 16 != 0)
    fiber_fail(std::string(what) + ": shared address not 16-byte aligned");
}

[[noreturn]] inline void report_race(const char* kind, const void* p, int other, uint32_t epoch) {
  Cta& c = *t_cta;
  fiber_fail(std::string("shared-memory race: ") + kind + " at smem offset " +
             std::to_string(static_cast<const char*>(p) - c.smem_base) + " with thread " +
             (other == -2 ? std::string("(several)") : std::to_string(other)) + " in barrier epoch " +
             std::to_string(epoch) + " (no __syncthreads between them)");
}

inline size_t granule(const void* p) {
  return size_t(static_cast<const char*>(p) - t_cta->smem_base) / 16;
}

// A cp.async issued in epoch `issued` lands now (epoch c.epoch).
inline void track_write(const void* p, uint32_t issued) {
  Cta& c = *t_cta;
  const int me = t_fiber->tid;
  const size_t g = granule(p);
  const Access w = c.last_write[g], r = c.last_read[g];
  if (w.epoch == c.epoch && w.tid != me) report_race("cp.async write after another thread's write", p, w.tid, w.epoch);
  if (r.epoch != ~0u && r.epoch >= issued && r.epoch <= c.epoch && r.tid != me)
    report_race("cp.async write while another thread reads (ldmatrix or wgmma)", p, r.tid, r.epoch);
  c.last_write[g] = Access{c.epoch, me};
}

inline void track_read(const void* p, int reader) {
  Cta& c = *t_cta;
  const size_t g = granule(p);
  const Access w = c.last_write[g];
  if (w.epoch == c.epoch && w.tid != reader)
    report_race("ldmatrix read of another thread's cp.async data", p, w.tid, w.epoch);
  Access& r = c.last_read[g];
  if (r.epoch == c.epoch && r.tid != reader) r.tid = -2;
  else if (r.epoch != c.epoch) r = Access{c.epoch, reader};
}

inline void cp_async_16(void* dst, const void* src, bool pred) {
  check_smem(dst, 16, "cp.async");
  PendingCopy pc;
  pc.dst = dst;
  pc.group = -1;
  pc.issue_epoch = t_cta->epoch;
  if (pred) {
    if (reinterpret_cast<uintptr_t>(src) % 16 != 0) fiber_fail("cp.async: global source not 16-byte aligned");
    std::memcpy(pc.bytes, src, 16);
  } else {
    std::memset(pc.bytes, 0, 16);
  }
  Cta& c = *t_cta;
  if (c.copies_random && (c.rng() & 1)) {
    track_write(dst, pc.issue_epoch);
    std::memcpy(dst, pc.bytes, 16);
  } else {
    t_fiber->pending.push_back(pc);
  }
}

inline void cp_async_fence() {
  Fiber* f = t_fiber;
  for (PendingCopy& p : f->pending)
    if (p.group < 0) p.group = f->next_group;
  f->next_group++;
}

// Completes all copies but those of the newest n committed groups (n = 0: all,
// uncommitted ones included, like cp.async.wait_all).
inline void cp_async_wait(int n) {
  Fiber* f = t_fiber;
  if (n == 0) cp_async_fence();
  const int keep_from = f->next_group - n;
  std::vector<PendingCopy> rest;
  for (PendingCopy& p : f->pending) {
    if (p.group >= 0 && p.group < keep_from) {
      track_write(p.dst, p.issue_epoch);
      std::memcpy(p.dst, p.bytes, 16);
    } else {
      rest.push_back(p);
    }
  }
  f->pending.swap(rest);
}

// ---- ldmatrix and mma.sync (PTX ISA definitions) ------------------------------
// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: lanes 8m..8m+7 give the
// row addresses of matrix m; lane l receives, in register m, row l/4, columns
// 2(l%4) and 2(l%4)+1 of matrix m (.trans: of its transpose).
template <int kMats, bool kTrans>
inline void ldmatrix(const void* row_addr, uint32_t* dst) {
  check_smem(row_addr, 16, kTrans ? "ldmatrix.trans" : "ldmatrix");
  uint64_t in = reinterpret_cast<uint64_t>(row_addr);
  uint64_t out[2] = {0, 0};
  warp_collective(kOpLdsm, &in, sizeof in, out, sizeof out, [](LaneSlot* lanes) {
    const int warp0 = t_fiber->tid / 32 * 32;
    for (int r = 0; r < 8 * kMats; ++r)
      track_read(reinterpret_cast<const void*>(lanes[r].in[0]), warp0 + r);
    for (int l = 0; l < 32; ++l) {
      uint32_t regs[4] = {0, 0, 0, 0};
      for (int m = 0; m < kMats; ++m) {
        uint16_t e[2];
        for (int h = 0; h < 2; ++h) {
          const int row = kTrans ? 2 * (l % 4) + h : l / 4;
          const int col = kTrans ? l / 4 : 2 * (l % 4) + h;
          const auto* rp = reinterpret_cast<const uint16_t*>(lanes[m * 8 + row].in[0]);
          e[h] = rp[col];
        }
        regs[m] = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
      }
      std::memcpy(lanes[l].out, regs, sizeof regs);
    }
  });
  std::memcpy(dst, out, kMats * 4);
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: g = lane / 4, t = lane % 4.
//   A (16x16): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B (16x8, k x n): b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8.., n = g)
//   C, D (16x8): c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1)
template <bool kBf16>
inline void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, const float* c) {
  uint64_t in[10];
  std::memcpy(&in[0], a, 16);
  std::memcpy(&in[2], b, 8);
  std::memcpy(&in[3], c, 16);
  uint64_t out[2];
  warp_collective(kOpMma, in, 40, out, 16, [](LaneSlot* lanes) {
    auto elem = [&](int lane, int reg_word, int half) -> float {
      const uint32_t w = uint32_t(lanes[lane].in[reg_word / 2] >> (32 * (reg_word % 2)));
      const uint16_t h = uint16_t(w >> (16 * half));
      return kBf16 ? bf16_to_float(h) : f16_to_float(h);
    };
    auto A = [&](int r, int k) {  // registers a0..a3 are words 0..3
      return elem((r % 8) * 4 + (k % 8) / 2, (r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0), k % 2);
    };
    auto B = [&](int k, int n) {  // b0, b1 are words 4, 5
      return elem(n * 4 + (k % 8) / 2, 4 + (k >= 8 ? 1 : 0), k % 2);
    };
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      float cin[4], dout[4];
      std::memcpy(cin, &lanes[l].in[3], 16);
      for (int i = 0; i < 4; ++i) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i % 2);
        double acc = cin[i];
        for (int k = 0; k < 16; ++k) acc += double(A(row, k)) * double(B(k, col));
        dout[i] = float(acc);
      }
      std::memcpy(lanes[l].out, dout, 16);
    }
  });
  std::memcpy(d, out, 16);
}


// ---- wgmma (PTX ISA: wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16}) -----
// A warpgroup is 128 consecutive threads. Each lane's call deposits its part (the
// descriptors, its A registers, the addresses of its accumulator registers) and
// waits until all 128 lanes have issued the same instruction. The product runs when
// a wgmma.wait_group retires its group (commit_group counts the groups per thread),
// and reads shared memory then, as the asynchronous hardware may: an operand
// overwritten before the wait is read as overwritten, and a cp.async landing in the
// barrier epoch of the read is reported as a race; A registers (RS) are read then
// too.
//
// Shared addresses are offsets from the launch's dynamic smem (the GPU's dynamic
// smem starts 1024-byte aligned; the kernels check it). 16-bit operands; the
// descriptor (bits): start address [0,14) >> 4, leading byte offset (LBO) [16,30) >> 4,
// stride byte offset (SBO) [32,46) >> 4, base offset [49,52) (must be 0), layout
// [62,64) (must be 1, the 128-byte swizzle). Element (mn, k) of a 64 x 16 A or
// N x 16 B operand lies at byte
//   K-major:  start + (mn / 8) SBO + (mn % 8) 128 + 2 k
//   MN-major: start + (mn / 64) LBO + 2 (mn % 64) + (k % 8) 128 + (k / 8) SBO
// with bits [4,7) of the address XOR-ed with bits [7,10) (the 128-byte swizzle).
// Registers of lane l of warp w (g = l / 4, t = l % 4):
//   A (from registers): a0 (16w+g, 2t..2t+1), a1 (16w+g+8, 2t..), a2 (16w+g, 2t+8..),
//   a3 (16w+g+8, 2t+8..); D (f32): d[4j+i] = (16w + g + 8(i/2), 8j + 2t + i%2).
inline uint32_t smem_address(const void* p) {
  Cta& c = *t_cta;
  const char* q = static_cast<const char*>(p);
  if (q < c.smem_base || q >= c.smem_base + c.smem_bytes)
    fiber_fail("shared address outside the launch's dynamic smem");
  return uint32_t(q - c.smem_base);
}

}  // namespace nsa_emu

inline size_t __cvta_generic_to_shared(const void* p) { return nsa_emu::smem_address(p); }

namespace nsa_emu {

inline uint16_t wgmma_operand(uint64_t desc, bool mn_major, int mn, int k) {
  Cta& c = *t_cta;
  const uint32_t start = uint32_t(desc & 0x3fff) << 4;
  const uint32_t lbo = uint32_t((desc >> 16) & 0x3fff) << 4;
  const uint32_t sbo = uint32_t((desc >> 32) & 0x3fff) << 4;
  if (((desc >> 49) & 7) != 0) fiber_fail("wgmma: descriptor base offset != 0 (not modelled)");
  if ((desc >> 62) != 1) fiber_fail("wgmma: only the 128-byte swizzle is modelled");
  uint32_t byte = mn_major ? start + (mn / 64) * lbo + 2 * (mn % 64) + (k % 8) * 128 + (k / 8) * sbo
                           : start + (mn / 8) * sbo + (mn % 8) * 128 + 2 * k;
  byte ^= ((byte >> 7) & 7) << 4;
  if (byte + 2 > c.smem_bytes) fiber_fail("wgmma: operand outside the launch's dynamic smem");
  const char* p = c.smem_base + byte;
  const size_t g = byte / 16;
  const Access w = c.last_write[g];
  if (w.epoch == c.epoch) report_race("wgmma read of cp.async data of this barrier epoch", p, w.tid, w.epoch);
  c.last_read[g] = Access{c.epoch, -2};  // read by the whole warpgroup
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline float half_bits_to_float(uint16_t h, bool bf16) { return bf16 ? bf16_to_float(h) : f16_to_float(h); }

inline void wgmma_execute(const WgmmaOp& op) {
  const WgmmaLane& l0 = op.lanes[0];
  const int n = l0.n;
  std::vector<float> A(64 * 16), B(size_t(n) * 16);
  for (int m = 0; m < 64; ++m)
    for (int k = 0; k < 16; ++k) {
      uint16_t h;
      if (l0.a_regs) {
        const int w = m / 16, g = m % 8, t = (k % 8) / 2;
        const WgmmaLane& ln = op.lanes[w * 32 + g * 4 + t];
        const uint32_t reg = *ln.a[(m % 16 >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
        h = uint16_t(reg >> (16 * (k % 2)));
      } else {
        h = wgmma_operand(l0.desc_a, l0.a_mn, m, k);
      }
      A[m * 16 + k] = half_bits_to_float(h, l0.bf16);
    }
  for (int j = 0; j < n; ++j)
    for (int k = 0; k < 16; ++k) B[j * 16 + k] = half_bits_to_float(wgmma_operand(l0.desc_b, l0.b_mn, j, k), l0.bf16);
  for (int tid = 0; tid < 128; ++tid) {
    const WgmmaLane& ln = op.lanes[tid];
    const int w = tid / 32, g = tid % 32 / 4, t = tid % 4;
    for (int r = 0; r < n / 2; ++r) {
      const int j = r / 4, i = r % 4;
      const int row = 16 * w + g + 8 * (i / 2), col = 8 * j + 2 * t + i % 2;
      double acc = ln.scale_d ? double(*ln.d[r]) : 0.0;
      for (int k = 0; k < 16; ++k) acc += double(A[row * 16 + k]) * double(B[col * 16 + k]);
      *ln.d[r] = float(acc);
    }
  }
}

inline Warpgroup& my_warpgroup(int* lane) {
  Fiber* f = t_fiber;
  Cta& c = *f->cta;
  if (c.nthreads % 128 != 0) fiber_fail("wgmma in a CTA whose size is not a multiple of 128");
  *lane = f->tid % 128;
  return c.warpgroups[f->tid / 128];
}

// Blocks until all 128 lanes of the warpgroup arrive; the last one runs done().
template <class Done>
inline void warpgroup_collective(Warpgroup& wg, Done&& done) {
  Fiber* f = t_fiber;
  Cta& c = *f->cta;
  f->state = State::kWarpBarrier;
  if (++wg.arrived == 128) {
    wg.arrived = 0;
    done();
    const int base = f->tid / 128 * 128;
    for (int i = 0; i < 128; ++i) c.fibers[base + i].state = State::kRunnable;
  }
  yield_fiber();
}

inline void wgmma_issue(WgmmaLane lane_op) {
  int lane;
  Warpgroup& wg = my_warpgroup(&lane);
  lane_op.group = t_fiber->wg_commits;
  wg.cur[lane] = lane_op;
  warpgroup_collective(wg, [&wg] {
    const WgmmaLane& a = wg.cur[0];
    for (const WgmmaLane& b : wg.cur)
      if (b.desc_a != a.desc_a || b.desc_b != a.desc_b || b.n != a.n || b.group != a.group ||
          b.scale_d != a.scale_d || b.a_regs != a.a_regs || b.bf16 != a.bf16 || b.a_mn != a.a_mn ||
          b.b_mn != a.b_mn)
        fiber_fail("lanes of a warpgroup issued different wgmma instructions");
    wg.in_flight.push_back(WgmmaOp{wg.cur});
  });
}

inline void wgmma_commit() { t_fiber->wg_commits++; }

// wgmma.wait_group N: retires every group but the newest N committed ones.
inline void wgmma_wait(int n) {
  int lane;
  Warpgroup& wg = my_warpgroup(&lane);
  const int commits = t_fiber->wg_commits;
  if (lane == 0) wg.wait_n = n;
  warpgroup_collective(wg, [&wg, commits] {
    std::vector<WgmmaOp> rest;
    for (WgmmaOp& op : wg.in_flight) {
      if (op.lanes[0].group < commits - wg.wait_n) wgmma_execute(op);
      else rest.push_back(std::move(op));
    }
    wg.in_flight.swap(rest);
  });
}

// ---- kernel launch ------------------------------------------------------------
struct ThreadResources {
  char* stacks = nullptr;
  size_t stacks_bytes = 0;
  ~ThreadResources() {
    if (stacks) munmap(stacks, stacks_bytes);
  }
  // Stack of fiber i (a PROT_NONE guard page below each turns an overflow into
  // a crash instead of silent corruption).
  char* stack(int i, int n) {
    const size_t per = kStackBytes + 4096;
    if (stacks == nullptr) {
      stacks_bytes = per * kMaxThreads;
      void* p = mmap(nullptr, stacks_bytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("nsa_emu: cannot map fiber stacks");
      stacks = static_cast<char*>(p);
      for (int k = 0; k < kMaxThreads; ++k) mprotect(stacks + k * per, 4096, PROT_NONE);
    }
    (void)n;
    return stacks + i * per + 4096;
  }
};

// Per-OS-thread dynamic smem, defined in emu_runtime.cpp next to the kernels'
// `extern __shared__` names.
char* dynamic_smem_base();
void poison_extra_smem(size_t bytes);

// Runs one CTA to completion on the calling OS thread; returns an error message
// or "".
inline std::string run_cta(const std::function<void()>& body, dim3 grid, dim3 block,
                           uint3 bidx, size_t smem_bytes, char* smem_base, uint64_t seed) {
  static thread_local ThreadResources res;
  Cta c;
  c.block_idx = bidx;
  c.grid = grid;
  c.block = block;
  c.nthreads = int(block.x * block.y * block.z);
  c.smem_bytes = smem_bytes;
  c.smem_base = smem_base;
  c.body = &body;
  c.rng.seed(seed);
  c.copies_random = env_u64("NSA_EMU_SYNC_COPIES", 0) == 0;
  const int nwarps = (c.nthreads + 31) / 32;
  c.warp_arrived.assign(nwarps, 0);
  c.slots.resize(size_t(2) * nwarps * 32);
  c.warpgroups.resize((c.nthreads + 127) / 128);
  c.fibers.resize(c.nthreads);
  c.last_write.assign((smem_bytes + 15) / 16, Access{});
  c.last_read.assign((smem_bytes + 15) / 16, Access{});
  std::memset(smem_base, 0xff, smem_bytes);  // uninitialised smem reads as NaN
  poison_extra_smem(smem_bytes);
  for (int i = 0; i < c.nthreads; ++i) {
    Fiber& f = c.fibers[i];
    f.cta = &c;
    f.tid = i;
    f.tidx = uint3{unsigned(i % block.x), unsigned(i / block.x % block.y),
                   unsigned(i / (block.x * block.y))};
    prepare_fiber(f, res.stack(i, c.nthreads), kStackBytes);
  }
  Cta* prev_cta = t_cta;
  t_cta = &c;
  std::vector<int> order;
  order.reserve(c.nthreads);
  while (c.done < c.nthreads && c.error.empty()) {
    order.clear();
    for (int i = 0; i < c.nthreads; ++i)
      if (c.fibers[i].state == State::kRunnable) order.push_back(i);
    if (order.empty()) {
      std::string s = "deadlock: no thread can proceed (";
      int shown = 0;
      for (int w = 0; w < nwarps; ++w) {
        int at_block = 0, at_warp = 0, exited = 0;
        for (int l = 0; l < warp_size_of(c, w); ++l) {
          const State st = c.fibers[w * 32 + l].state;
          at_block += st == State::kBlockBarrier, at_warp += st == State::kWarpBarrier,
              exited += st == State::kDone;
        }
        if (at_warp && shown++ < 4)
          s += "warp " + std::to_string(w) + ": " + std::to_string(at_warp) +
               " lanes at a warp collective, " + std::to_string(at_block) + " at __syncthreads, " +
               std::to_string(exited) + " exited; ";
      }
      c.error = s + ")";
      break;
    }
    std::shuffle(order.begin(), order.end(), c.rng);
    for (int i : order) {
      if (!c.error.empty()) break;
      if (c.fibers[i].state == State::kRunnable) switch_to_fiber(c, c.fibers[i]);
    }
  }
  if (c.error.empty())
    for (const Warpgroup& wg : c.warpgroups)
      if (!wg.in_flight.empty()) c.error = "a wgmma.mma_async was never retired by wgmma.wait_group";
  t_cta = prev_cta;
  if (!c.error.empty()) {
    char where[96];
    std::snprintf(where, sizeof where, " (block (%u,%u,%u))", bidx.x, bidx.y, bidx.z);
    return c.error.find("[block") == std::string::npos ? c.error + where : c.error;
  }
  return "";
}


inline void launch_grid(const void* kernel_id, const std::function<void()>& body, dim3 grid,
                        dim3 block, size_t smem) {
  const int nthreads = int(block.x * block.y * block.z);
  if (nthreads <= 0 || nthreads > kMaxThreads || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535) {
    set_error(cudaErrorInvalidConfiguration, "invalid launch configuration");
    return;
  }
  if (smem > size_t(smem_limit_of(kernel_id))) {
    set_error(cudaErrorInvalidValue,
              "launch asks for " + std::to_string(smem) + " bytes of dynamic shared memory, the "
              "kernel's limit is " + std::to_string(smem_limit_of(kernel_id)) +
              " (cudaFuncSetAttribute)");
    return;
  }
  const uint64_t total = uint64_t(grid.x) * grid.y * grid.z;
  const uint64_t seed = env_u64("NSA_EMU_SEED", 1);
  unsigned workers = unsigned(env_u64("NSA_EMU_THREADS", std::min(4u, std::max(1u, std::thread::hardware_concurrency()))));
  workers = unsigned(std::max<uint64_t>(1, std::min<uint64_t>(workers, total)));
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::string first_error;
  auto work = [&] {
    for (;;) {
      const uint64_t i = next.fetch_add(1);
      if (i >= total || failed.load()) return;
      const uint3 b{unsigned(i % grid.x), unsigned(i / grid.x % grid.y),
                    unsigned(i / (uint64_t(grid.x) * grid.y))};
      std::string err = run_cta(body, grid, block, b, smem, dynamic_smem_base(),
                                seed * 0x9E3779B97F4A7C15ull + i);
      if (!err.empty()) {
        std::lock_guard<std::mutex> g(mu);
        if (!failed.exchange(true)) first_error = err;
        return;
      }
    }
  };
  if (workers == 1) {
    work();
  } else {
    std::vector<std::thread> ts;
    for (unsigned w = 0; w < workers; ++w) ts.emplace_back(work);
    for (auto& t : ts) t.join();
  }
  if (failed) set_error(cudaErrorLaunchFailure, "emulated kernel failed: " + first_error);
}

template <class... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <class... A>
  void operator()(A&&... args) const {
    // The kernel's parameters, copied once as the launch would (by value).
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    auto k = kernel;
    std::function<void()> body = [&params, k] { std::apply(k, params); };
    launch_grid(reinterpret_cast<const void*>(kernel), body, grid, block, smem);
  }
};
template <class... P>
Launch<P...> make_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t) {
  return Launch<P...>{kernel, grid, block, smem};
}

}  // namespace nsa_emu

#define NSA_EMU_LAUNCH(grid, block, smem, stream, ...) \
  ::nsa_emu::make_launch(__VA_ARGS__, dim3(grid), dim3(block), size_t(smem), stream)

// ---- device intrinsics ------------------------------------------------------------
inline void __syncthreads() { nsa_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { nsa_emu::syncwarp(mask); }
inline void __threadfence_block() {}
inline void __threadfence() {}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return nsa_emu::shfl_generic(mask, v, 0, src, width);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return nsa_emu::shfl_generic(mask, v, 1, int(delta), width);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return nsa_emu::shfl_generic(mask, v, 2, int(delta), width);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return nsa_emu::shfl_generic(mask, v, 3, lane_mask, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return nsa_emu::ballot(mask, pred != 0); }
inline int __any_sync(unsigned mask, int pred) { return nsa_emu::ballot(mask, pred != 0) != 0; }
inline int __all_sync(unsigned mask, int pred) { return nsa_emu::ballot(mask, pred != 0) == mask; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
// Fibers never preempt each other: a read-modify-write is atomic. (CTAs on other
// OS threads share no memory the kernels update atomically.)
template <class T>
inline T atomicAdd(T* p, T v) {
  T old = *p;
  *p = old + v;
  return old;
}
template <class T>
inline T atomicMax(T* p, T v) {
  T old = *p;
  *p = old < v ? v : old;
  return old;
}
template <class T>
inline T atomicMin(T* p, T v) {
  T old = *p;
  *p = v < old ? v : old;
  return old;
}
template <class T>
inline T atomicOr(T* p, T v) {
  T old = *p;
  *p = old | v;
  return old;
}

// CUDA's min/max overloads for device code (non-templates, so that they win
// over cute::min/max for equal argument types, as in nvcc).
#define NSA_EMU_MINMAX(T)                                   \
  inline T min(T a, T b) { return b < a ? b : a; }         \
  inline T max(T a, T b) { return a < b ? b : a; }
NSA_EMU_MINMAX(int)
NSA_EMU_MINMAX(unsigned)
NSA_EMU_MINMAX(long)
NSA_EMU_MINMAX(unsigned long)
NSA_EMU_MINMAX(long long)
NSA_EMU_MINMAX(unsigned long long)
#undef NSA_EMU_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
