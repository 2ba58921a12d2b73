// A host emulator of the CUDA subset the attention kernels use, so that kernels/*.cu can be
// compiled by a C++ compiler (-DTQ_EMU) and checked against the CPU reference on a machine with
// no GPU (scripts/emulate-kernels.sh). Each block runs as TQ_THREADS fibers (ucontext) on one
// host thread, switched at __syncthreads and at warp collectives; static __shared__ arrays are
// function statics (blocks run one after another), dynamic shared memory is a per-block buffer
// filled with a poison byte. Warp collectives (shuffles, ldmatrix, mma.sync m16n8k16) gather
// the 32 lanes' operands and compute what the PTX ISA specifies for each lane's fragment.
//
// What it checks: indexing, fragment layouts, barriers (a barrier reached by part of a block
// while the rest waits at a warp collective is reported as a deadlock), shared-memory bounds
// (every shared access of the kernels goes through plain pointers: out-of-range dynamic
// shared memory is caught by the guard bytes checked after each block), and the numerics (f16
// operands, f32 accumulation). What it does not: timing, memory coalescing, races (fibers are
// switched only at barriers, so a missing barrier between a write and a read of another warp's
// data shows only when the order of fibers matters — the fibers run in reverse order on every
// second block to expose some of those).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <string.h>
#include <ucontext.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __constant__
#undef __shared__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __constant__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

// dim3, uint4, cudaStream_t and cudaError_t come with the CUDA headers above (vector_types.h,
// driver_types.h), host-compatible.
template <typename F>
static inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
using std::isfinite;
using std::isinf;

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline double min(double a, double b) { return a < b ? a : b; }
inline double max(double a, double b) { return a > b ? a : b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline int atomicCAS(int* p, int cmp, int v) {
  int old = *p;
  if (old == cmp) *p = v;
  return old;
}
inline void __pipeline_memcpy_async(void* dst, const void* src, size_t n) { memcpy(dst, src, n); }
inline void __pipeline_commit() {}
inline void __pipeline_wait_prior(int) {}

namespace tq_emu {

constexpr int kMaxThreads = 1024;
constexpr size_t kStack = 256 * 1024;
constexpr size_t kGuard = 256;  // poison bytes after the dynamic shared memory
constexpr unsigned char kPoison = 0xA5;

enum State { Run, BlockWait, WarpWait, Done };

struct Fiber {
  ucontext_t ctx;
  State state = Run;
  int tid = 0;
};

struct Emu {
  std::vector<Fiber> fibers;
  std::vector<std::vector<char>> stacks;
  ucontext_t sched;
  int cur = -1;
  dim3 block_idx, grid_dim, block_dim;
  std::vector<unsigned char> dyn;  // dynamic shared memory + guard
  size_t dyn_bytes = 0;
  const std::function<void()>* body = nullptr;
  // Warp exchange scratch: [warp][lane][words].
  std::vector<uint64_t> scratch;
  long blocks_run = 0;
};

inline Emu& emu() {
  static Emu e;
  return e;
}

inline void yield_to_scheduler() {
  Emu& e = emu();
  swapcontext(&e.fibers[e.cur].ctx, &e.sched);
}

inline void block_barrier() {
  Emu& e = emu();
  e.fibers[e.cur].state = BlockWait;
  yield_to_scheduler();
}

inline void warp_barrier() {
  Emu& e = emu();
  e.fibers[e.cur].state = WarpWait;
  yield_to_scheduler();
}

inline int lane() { return emu().fibers[emu().cur].tid & 31; }
inline int warp() { return emu().fibers[emu().cur].tid >> 5; }
inline uint64_t* slot(int w, int l) { return &emu().scratch[((size_t)w * 32 + l) * 16]; }

inline void fiber_main(int idx) {
  Emu& e = emu();
  (*e.body)();
  e.fibers[idx].state = Done;
  swapcontext(&e.fibers[idx].ctx, &e.sched);
}

inline void trampoline(unsigned lo, unsigned hi) {
  (void)hi;
  fiber_main((int)lo);
}

// Runs one block of `threads` fibers to completion; aborts on a deadlock.
inline void run_block(int threads, bool reverse) {
  Emu& e = emu();
  if ((int)e.fibers.size() < threads) {
    e.fibers.resize(threads);
    e.stacks.resize(threads);
  }
  for (int i = 0; i < threads; ++i) {
    if (e.stacks[i].empty()) e.stacks[i].resize(kStack);
    Fiber& f = e.fibers[i];
    f.state = Run;
    f.tid = i;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = e.stacks[i].data();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, (void (*)())trampoline, 2, (unsigned)i, 0u);
  }
  const int warps = (threads + 31) / 32;
  for (;;) {
    bool ran = false;
    for (int k = 0; k < threads; ++k) {
      const int i = reverse ? threads - 1 - k : k;
      if (e.fibers[i].state != Run) continue;
      e.cur = i;
      swapcontext(&e.sched, &e.fibers[i].ctx);
      ran = true;
    }
    bool all_done = true, released = false;
    for (int i = 0; i < threads; ++i) all_done &= e.fibers[i].state == Done;
    if (all_done) break;
    // Warp collectives: a warp whose live lanes all wait at one.
    for (int w = 0; w < warps; ++w) {
      int live = 0, waiting = 0;
      for (int l = w * 32; l < min(threads, w * 32 + 32); ++l) {
        if (e.fibers[l].state != Done) ++live;
        if (e.fibers[l].state == WarpWait) ++waiting;
      }
      if (live > 0 && waiting == live) {
        if (live != min(threads, w * 32 + 32) - w * 32) {
          fprintf(stderr, "emu: warp %d reaches a collective with %d of its lanes exited\n", w, 32 - live);
          abort();
        }
        for (int l = w * 32; l < min(threads, w * 32 + 32); ++l) e.fibers[l].state = Run;
        released = true;
      }
    }
    if (!released) {
      int live = 0, waiting = 0;
      for (int i = 0; i < threads; ++i) {
        if (e.fibers[i].state != Done) ++live;
        if (e.fibers[i].state == BlockWait) ++waiting;
      }
      if (live > 0 && waiting == live) {
        for (int i = 0; i < threads; ++i)
          if (e.fibers[i].state == BlockWait) e.fibers[i].state = Run;
        released = true;
      }
    }
    if (!released && !ran) {
      fprintf(stderr, "emu: deadlock in block (%u, %u, %u): threads wait at different barriers\n", e.block_idx.x,
              e.block_idx.y, e.block_idx.z);
      abort();
    }
  }
}

// Launches `body` over the grid, one block after another.
inline void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  Emu& e = emu();
  const int threads = (int)(block.x * block.y * block.z);
  if (threads < 1 || threads > kMaxThreads || block.y != 1 || block.z != 1) {
    fprintf(stderr, "emu: unsupported block shape\n");
    abort();
  }
  if (grid.y > 65535 || grid.z > 65535) {
    fprintf(stderr, "emu: grid (%u, %u, %u) exceeds the CUDA limits\n", grid.x, grid.y, grid.z);
    abort();
  }
  e.grid_dim = grid;
  e.block_dim = block;
  e.body = &body;
  e.scratch.assign((size_t)((threads + 31) / 32) * 32 * 16, 0);
  e.dyn_bytes = smem;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        e.block_idx = dim3(x, y, z);
        e.dyn.assign(smem + kGuard, kPoison);
        run_block(threads, (e.blocks_run++ & 1) != 0);
        for (size_t i = smem; i < smem + kGuard; ++i)
          if (e.dyn[i] != kPoison) {
            fprintf(stderr, "emu: write past the %zu bytes of dynamic shared memory\n", smem);
            abort();
          }
      }
}

inline unsigned char* dyn_smem() {
  // 16-byte alignment: vector<unsigned char> storage comes from operator new (≥ 16 on x86-64).
  return emu().dyn.data();
}

struct ThreadIdx {
  unsigned x, y, z;
};
inline dim3 thread_idx() { return dim3(emu().fibers[emu().cur].tid, 0, 0); }

// Shuffle: every lane of the warp deposits its value, then reads lane ^ mask's.
template <typename T>
inline T shfl_xor(T v, int m) {
  static_assert(sizeof(T) <= 8, "shuffle of a wide type");
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  slot(warp(), lane())[0] = bits;
  warp_barrier();
  const uint64_t got = slot(warp(), lane() ^ (m & 31))[0];
  warp_barrier();
  T r;
  memcpy(&r, &got, sizeof(T));
  return r;
}

inline uint16_t half_at(const void* row, int col) {
  uint16_t h;
  memcpy(&h, (const char*)row + 2 * col, 2);
  return h;
}

// ldmatrix.m8n8 (.x2 / .x4, optionally .trans): matrix i's row r is at the address given by
// lane 8i + r; lane t receives (row t/4, cols 2(t%4), +1), or transposed (rows 2(t%4), +1 of
// col t/4), the lower column / row in the low half.
inline void ldmatrix(uint32_t* out, const void* addr, int count, bool trans) {
  slot(warp(), lane())[0] = (uint64_t)(uintptr_t)addr;
  warp_barrier();
  const int t = lane();
  for (int i = 0; i < count; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const void* row = (const void*)(uintptr_t)slot(warp(), 8 * i + t / 4)[0];
      lo = half_at(row, 2 * (t % 4));
      hi = half_at(row, 2 * (t % 4) + 1);
    } else {
      const void* r0 = (const void*)(uintptr_t)slot(warp(), 8 * i + 2 * (t % 4))[0];
      const void* r1 = (const void*)(uintptr_t)slot(warp(), 8 * i + 2 * (t % 4) + 1)[0];
      lo = half_at(r0, t / 4);
      hi = half_at(r1, t / 4);
    }
    out[i] = (uint32_t)lo | ((uint32_t)hi << 16);
  }
  warp_barrier();
}

inline float h2f(uint16_t h) {
  __half x;
  memcpy(&x, &h, 2);
  return __half2float(x);
}

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32, c += a·b, fragments as in the PTX ISA:
// group g = lane/4, q = lane%4; a0: A[g][2q, 2q+1], a1: A[g+8][..], a2: A[g][2q+8, +9],
// a3: A[g+8][2q+8, +9]; b0: B[2q, 2q+1][g], b1: B[2q+8, +9][g]; c0, c1: C[g][2q, 2q+1],
// c2, c3: C[g+8][..].
inline void mma16816(float* c, const uint32_t* a, const uint32_t* b) {
  uint64_t* s = slot(warp(), lane());
  for (int i = 0; i < 4; ++i) s[i] = a[i];
  for (int i = 0; i < 2; ++i) s[4 + i] = b[i];
  warp_barrier();
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const uint64_t* o = slot(warp(), l);
    const int g = l / 4, q = l % 4;
    for (int j = 0; j < 2; ++j) {
      A[g][2 * q + j] = h2f((uint16_t)(o[0] >> (16 * j)));
      A[g + 8][2 * q + j] = h2f((uint16_t)(o[1] >> (16 * j)));
      A[g][2 * q + 8 + j] = h2f((uint16_t)(o[2] >> (16 * j)));
      A[g + 8][2 * q + 8 + j] = h2f((uint16_t)(o[3] >> (16 * j)));
      B[2 * q + j][g] = h2f((uint16_t)(o[4] >> (16 * j)));
      B[2 * q + 8 + j][g] = h2f((uint16_t)(o[5] >> (16 * j)));
    }
  }
  warp_barrier();
  const int g = lane() / 4, q = lane() % 4;
  for (int k = 0; k < 4; ++k) {
    const int row = g + 8 * (k / 2), col = 2 * q + (k % 2);
    float acc = c[k];
    for (int kk = 0; kk < 16; ++kk) acc = fmaf(A[row][kk], B[kk][col], acc);
    c[k] = acc;
  }
}

}  // namespace tq_emu

#define threadIdx (tq_emu::thread_idx())
#define blockIdx (tq_emu::emu().block_idx)
#define blockDim (tq_emu::emu().block_dim)
#define gridDim (tq_emu::emu().grid_dim)
#define __syncthreads() tq_emu::block_barrier()
#define __shfl_xor_sync(mask, v, o) tq_emu::shfl_xor((v), (o))
