// Shared device helpers and the host/device description of a TurboQuant record layout.
// Layouts mirror src/quantizer.rs (RecordLayout) and docs/FORMAT.md exactly.
#pragma once
#ifdef TQ_EMU
// The host emulator (tests/emu/tq_emu.h, scripts/emulate-kernels.sh): the same sources run on
// a CPU against the CPU reference.
#include "tq_emu.h"
#else
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif
#include <stddef.h>
#include <stdint.h>

// Every launch goes through TQ_LAUNCH (kernel: a name or a function-pointer variable) so that
// the emulator can run it; TQ_DYN_SMEM declares a kernel's dynamic shared memory.
// TQ_LAUNCH is used in launchers that return an int status: a grid beyond CUDA's limits
// (x < 2³¹, y and z ≤ 65535 blocks) returns TQ_ERR_GRID instead of failing as an opaque
// "invalid configuration" (a long single prefill has more query-row tiles than 65535 in y);
// an empty grid launches nothing.
#define TQ_ERR_GRID 1000
static inline int tq_grid_check(dim3 g) {
  if (g.x == 0 || g.y == 0 || g.z == 0) return 1;
  return (g.x <= 2147483647u && g.y <= 65535u && g.z <= 65535u) ? 0 : -1;
}
#ifdef TQ_EMU
#define TQ_LAUNCH(kernel, grid, block, smem, stream, ...)                 \
  do {                                                                    \
    const dim3 tq_grid_ = (grid);                                         \
    const int tq_grid_ok_ = tq_grid_check(tq_grid_);                      \
    if (tq_grid_ok_ < 0) return TQ_ERR_GRID;                              \
    if (tq_grid_ok_ == 0)                                                 \
      tq_emu::launch(tq_grid_, block, smem, [&] { kernel(__VA_ARGS__); }); \
  } while (0)
#define TQ_DYN_SMEM(name) uint8_t* name = tq_emu::dyn_smem()
#else
#define TQ_LAUNCH(kernel, grid, block, smem, stream, ...)                  \
  do {                                                                     \
    const dim3 tq_grid_ = (grid);                                          \
    const int tq_grid_ok_ = tq_grid_check(tq_grid_);                       \
    if (tq_grid_ok_ < 0) return TQ_ERR_GRID;                               \
    if (tq_grid_ok_ == 0) kernel<<<tq_grid_, block, smem, stream>>>(__VA_ARGS__); \
  } while (0)
#define TQ_DYN_SMEM(name) extern __shared__ __align__(16) uint8_t name[]
#endif

#define TQ_MAX_DIM 256   // largest head_dim (and group dim, and sketch dim) handled
#define TQ_THREADS 128   // threads per block of the per-vector kernels

// One channel group of a record (an independent TurboQuant instance).
struct TqGroup {
  int dim;          // channels in the group
  int mse_bits;     // bits of the MSE stage (0 = none)
  int m;            // QJL sign bits (0 = none)
  int rot_kind;     // 0 = dense Π (row-major [dim, dim]), 1 = Hadamard (rot = the ±1 signs [dim])
  int had_block;    // Hadamard block size (power of two)
  int norm_off;     // byte offset of n   (if mse_bits > 0)
  int gamma_off;    // byte offset of γ   (if m > 0)
  int codes_off;    // byte offset of the packed codes
  int signs_off;    // byte offset of the packed sign bits
  const float* rot;         // see rot_kind
  const float* rot_t;       // dense only: Πᵀ row-major (coalesced reads in the forward rotation)
  const float* boundaries;  // [2^mse_bits − 1], ascending
  const float* centroids;   // [2^mse_bits], ascending
  const float* sketch;      // S row-major [m, dim]
  float qjl_scale;          // 1 / (m·κ)
};
// Mirrored by tqkv::cuda::TqGroup / TqSpec (the same asserts are in src/cuda.rs).
static_assert(sizeof(TqGroup) == 88 && offsetof(TqGroup, rot) == 40 && offsetof(TqGroup, qjl_scale) == 80,
              "TqGroup layout differs from src/cuda.rs");

// The record layout of one quantizer (shared by the KV heads of a layer; heads differ only by
// their channel assignment, passed separately as channels[head][head_dim]: group 0's channels
// in ascending order, then group 1's).
struct TqSpec {
  int head_dim;
  int num_groups;   // 1 or 2
  int record_bytes;
  int norm_format;  // 0: float, 1: IEEE half, 2: log8 (src/lognorm.rs)
  int norm_rule;  // TQ_NORM_*: the MSE norm stored (NormRule)
  TqGroup groups[2];
};
static_assert(sizeof(TqSpec) == 200 && offsetof(TqSpec, groups) == 24, "TqSpec layout differs from src/cuda.rs");

// The rotations of one layer's quantizer cycled by slot (tqkv::KvSpec::rotations): the record
// of slot s was written with v[s % n]. The variants share everything (layout, codebooks, channel
// orders) but their rotations (rot, rot_t) and sketches. n = 1 is plain TurboQuant.
#define TQ_MAX_CYCLE 4
// TqSpec::norm_rule (NormRule; tqkv::cuda::norm_rule_code).
#define TQ_NORM_EXACT 0
#define TQ_NORM_PROJECTED 1
#define TQ_NORM_LEAST_SQUARES 2
struct TqSpecs {
  int n;
  TqSpec v[TQ_MAX_CYCLE];
};

// Copies `n` specs (1..=TQ_MAX_CYCLE) into a TqSpecs; false when n is out of range.
static inline bool tq_specs(const TqSpec* s, int n, TqSpecs* out) {
  if (n < 1 || n > TQ_MAX_CYCLE) return false;
  out->n = n;
  for (int i = 0; i < n; ++i) out->v[i] = s[i];
  for (int i = n; i < TQ_MAX_CYCLE; ++i) out->v[i] = s[0];
  return true;
}

// Status codes written to the status word (first error wins).
#define TQ_OK 0
#define TQ_NONFINITE_INPUT 1
#define TQ_NORM_OVERFLOW 2

template <typename T> __device__ __forceinline__ float tq_load(const T* p, long i);
template <> __device__ __forceinline__ float tq_load<float>(const float* p, long i) { return p[i]; }
template <> __device__ __forceinline__ float tq_load<__half>(const __half* p, long i) { return __half2float(p[i]); }
template <> __device__ __forceinline__ float tq_load<__nv_bfloat16>(const __nv_bfloat16* p, long i) { return __bfloat162float(p[i]); }

template <typename T> __device__ __forceinline__ void tq_store(T* p, long i, float v);
template <> __device__ __forceinline__ void tq_store<float>(float* p, long i, float v) { p[i] = v; }
template <> __device__ __forceinline__ void tq_store<__half>(__half* p, long i, float v) { p[i] = __float2half_rn(v); }
template <> __device__ __forceinline__ void tq_store<__nv_bfloat16>(__nv_bfloat16* p, long i, float v) { p[i] = __float2bfloat16_rn(v); }

// Block-wide sum of one float per thread (blockDim.x a multiple of 32, ≤ 1024).
__device__ __forceinline__ float tq_block_sum(float v) {
  __shared__ float partial[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  int nw = blockDim.x >> 5;
  v = (threadIdx.x < nw) ? partial[threadIdx.x] : 0.f;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x == 0) partial[0] = v;
  __syncthreads();
  float r = partial[0];
  __syncthreads();
  return r;
}

// In-place normalised Walsh–Hadamard transform of v[0..dim) in blocks of `block` (shared memory).
__device__ __forceinline__ void tq_fwht_blocks(float* v, int dim, int block) {
  for (int h = 1; h < block; h <<= 1) {
    for (int p = threadIdx.x; p < dim / 2; p += blockDim.x) {
      int blk = p / (block / 2), within = p % (block / 2);
      int i = blk * block + (within / h) * (2 * h) + (within % h);
      float a = v[i], b = v[i + h];
      v[i] = a + b;
      v[i + h] = a - b;
    }
    __syncthreads();
  }
  float s = rsqrtf((float)block);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) v[i] *= s;
  __syncthreads();
}

// out = Π in (forward rotation of group g), shared-memory vectors.
__device__ __forceinline__ void tq_rotate(const TqGroup& g, const float* in, float* out) {
  if (g.rot_kind == 0) {
    // (Π in)_i = Σ_j Πᵀ[j][i] in_j: neighbouring threads read neighbouring words.
    for (int i = threadIdx.x; i < g.dim; i += blockDim.x) {
      float acc = 0.f;
      for (int j = 0; j < g.dim; ++j) acc = fmaf(g.rot_t[(long)j * g.dim + i], in[j], acc);
      out[i] = acc;
    }
    __syncthreads();
  } else {
    for (int i = threadIdx.x; i < g.dim; i += blockDim.x) out[i] = in[i] * g.rot[i];
    __syncthreads();
    tq_fwht_blocks(out, g.dim, g.had_block);
  }
}

// out = Πᵀ in (inverse rotation of group g); `in` may be modified (Hadamard works in place).
__device__ __forceinline__ void tq_rotate_inverse(const TqGroup& g, float* in, float* out) {
  if (g.rot_kind == 0) {
    for (int j = threadIdx.x; j < g.dim; j += blockDim.x) {
      float acc = 0.f;
      for (int i = 0; i < g.dim; ++i) acc = fmaf(g.rot[(long)i * g.dim + j], in[i], acc);
      out[j] = acc;
    }
    __syncthreads();
  } else {
    tq_fwht_blocks(in, g.dim, g.had_block);
    for (int i = threadIdx.x; i < g.dim; i += blockDim.x) out[i] = in[i] * g.rot[i];
    __syncthreads();
  }
}

// Online softmax over one tile of n positions for R query rows, one warp per row: the scores
// sc[i·R + r] (−inf where masked) become exp(s − m_new) with m_new the row's new running max;
// run_m, run_l are updated and alpha[r] is the factor that rescales the row's earlier sums.
template <int R>
__device__ __forceinline__ void tq_online_softmax(float* sc, int n, float* run_m, float* run_l, float* alpha) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  for (int r = warp; r < R; r += nwarps) {
    float m = -INFINITY;
    for (int i = lane; i < n; i += 32) m = fmaxf(m, sc[i * R + r]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    const float m_new = fmaxf(run_m[r], m);
    float l = 0.f;
    for (int i = lane; i < n; i += 32) {
      const float s = sc[i * R + r];
      const float p = s == -INFINITY ? 0.f : expf(s - m_new);
      sc[i * R + r] = p;
      l += p;
    }
    for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
    if (lane == 0) {
      const float a = run_m[r] == -INFINITY ? 0.f : expf(run_m[r] - m_new);
      alpha[r] = a;
      run_l[r] = run_l[r] * a + l;
      run_m[r] = m_new;
    }
  }
  __syncthreads();
}

// Code j of a little-endian bit stream of `bits`-bit codes.
__device__ __forceinline__ int tq_code_at(const uint8_t* p, int j, int bits) {
  int bit = j * bits, byte = bit >> 3, shift = bit & 7;
  unsigned w = p[byte];
  if (shift + bits > 8) w |= (unsigned)p[byte + 1] << 8;
  return (w >> shift) & ((1u << bits) - 1u);
}

// 8-bit logarithmic norms (src/lognorm.rs, the same constants): code c in 1..=255 is
// 2^((c − 128)/8), 0 is 0. Exact f32 operations only, so that CPU and GPU agree bit for bit.
static __device__ __constant__ unsigned tq_log8_frac[8] = {0x3f800000u, 0x3f8b95c2u, 0x3f9837f0u, 0x3fa5fed7u,
                                                    0x3fb504f3u, 0x3fc5672au, 0x3fd744fdu, 0x3feac0c7u};
static __device__ __constant__ unsigned tq_log8_thresh[8] = {0x3f85aac3u, 0x3f91c3d3u, 0x3f9ef532u, 0x3fad583fu,
                                                      0x3fbd08a4u, 0x3fce248cu, 0x3fe0ccdfu, 0x3ff5257du};

__device__ __forceinline__ float tq_log8_decode(unsigned c) {
  if (c == 0) return 0.f;
  const int k = (int)c - 128;
  const int q = k >= 0 ? k / 8 : -((-k + 7) / 8);  // floor(k / 8)
  return ldexpf(__uint_as_float(tq_log8_frac[k - 8 * q]), q);
}

// The code of a norm v ≥ 0; 256 when it is too large or not finite (an overflow).
__device__ __forceinline__ unsigned tq_log8_encode(float v) {
  if (!(v >= 0.f) || isinf(v)) return 256u;
  if (v == 0.f) return 0u;
  if (v < 1.17549435e-38f) return 1u;
  const unsigned bits = __float_as_uint(v);
  const int e = (int)((bits >> 23) & 0xffu) - 127;
  const float m = __uint_as_float((bits & 0x007fffffu) | 0x3f800000u);
  int r = 0;
  for (int i = 0; i < 8; ++i) r += m >= __uint_as_float(tq_log8_thresh[i]) ? 1 : 0;
  const int c = 128 + 8 * e + r;
  return c > 255 ? 256u : (unsigned)(c < 1 ? 1 : c);
}

__device__ __forceinline__ float tq_read_norm(const uint8_t* rec, int off, int fmt) {
  if (fmt == 1) {
    __half h;
    memcpy(&h, rec + off, 2);
    return __half2float(h);
  }
  if (fmt == 2) return tq_log8_decode(rec[off]);
  float f;
  memcpy(&f, rec + off, 4);
  return f;
}

// Writes norm v at rec + off in format fmt; returns the value as stored (what a reader sees).
// An overflow (f16: not finite; log8: above its range) sets TQ_NORM_OVERFLOW in *status.
__device__ __forceinline__ float tq_write_norm(uint8_t* rec, int off, int fmt, float v, int* status) {
  if (fmt == 1) {
    __half h = __float2half_rn(v);
    const float s = __half2float(h);
    if (!isfinite(s)) atomicCAS(status, TQ_OK, TQ_NORM_OVERFLOW);
    memcpy(rec + off, &h, 2);
    return s;
  }
  if (fmt == 2) {
    unsigned c = tq_log8_encode(v);
    if (c > 255u) {
      atomicCAS(status, TQ_OK, TQ_NORM_OVERFLOW);
      c = 255u;
    }
    rec[off] = (uint8_t)c;
    return tq_log8_decode(c);
  }
  memcpy(rec + off, &v, 4);
  return v;
}
