// The tensor-core split kernel of the fused attention (issue 11): the same split + merge as
// decode_attention.cu's, the same workspace and the same merge kernel, with the two products on
// tensor cores (mma.sync m16n8k16, f16 operands, f32 accumulators) and the cache read through a
// table of 64-slot tiles. Selected by `kernel = 1` of tqkv_decode_attention; the CUDA-core
// split kernel (`kernel = 0`) stays the verified default. The CPU reference is
// tqkv::attention::attend_packed / attend_mixed (src/attention.rs).
//
// What differs from the CUDA-core kernel, and why (docs/KERNELS.md, "Tensor-core kernel"):
// - the queries are rotated once per step by tq_tc_query_kernel (one block per KV head and row
//   tile), not once per split block, and stored as f16 rows [16, HEAD_DIM] per row tile;
// - the 16 rows of the mma are (rotation variant m, query row r) pairs, rho = m·R + r
//   (R · cycle ≤ 16): GQA rows and rotation cycles fill the M dimension together; the score of
//   slot s is read from the row of its variant s % cycle, the others are masked;
// - a tile of 64 slots' records is staged by 16-byte cp.async, its codes are turned into f16
//   centroids in shared memory through a table indexed by two codes at a time (the norms stay
//   apart: scores are n_g · (q_g · c), value weights p · n_g, so f16 never holds a norm times a
//   centroid), and both products read that buffer with ldmatrix;
// - HEAD_DIM is a template parameter (64, 96, 128, 256); code bits 1–4 are template parameters
//   of the decode step, chosen per warp (uniform: a warp decodes one column block of 32 slots).
//
// Layouts (row-major, contiguous unless a tile table says otherwise):
//   qt       [B, Hkv, tiles, 16, HEAD_DIM] f16 (workspace): row rho of a row tile is query row
//            r = rho % R rotated by variant m = rho / R, zero where rho ≥ R · cycle or the row
//            does not exist
//   kcache   [B, Hkv, cap, Rk] u8, or tiles through a table (tile_table.cuh); vcache likewise
//   ws       decode_attention.cu's split workspace [B, Hkv, tiles, splits, R, cycle·Dv + 2] f32
#pragma once
#include "tqkv_common.cuh"
#include "tile_table.cuh"
#ifndef TQ_EMU
#include <cuda_pipeline.h>
#endif

#define TQ_TC_TILE 64  // slots per staged tile
#define TQ_TC_ROWS 16  // rows of the mma (M of m16n8k16)
// Each rotated query row is stored as TQ_TC_QTERMS f16 rows whose sum is the f32 row (hi, then
// lo = f16(x − hi)): the score product runs once per term. Two terms give the query ~22 bits,
// so the scores' error is the centroids' f16 rounding alone (docs/KERNELS.md).
#define TQ_TC_QTERMS 2

// Copies n bytes global → shared: 16-byte asynchronous copies when both ends are 16-byte
// aligned, else 4-byte ones when 4-byte aligned; the tail by plain byte copies (visible after
// the next __syncthreads).
__device__ __forceinline__ void tq_tc_stage(uint8_t* dst, const uint8_t* src, int n) {
  const uintptr_t a = (uintptr_t)src | (uintptr_t)dst;
  const int w = (a & 15) == 0 ? 16 : (a & 3) == 0 ? 4 : 1;
  const int body = w == 1 ? 0 : n / w * w;
  if (w == 16)
    for (int i = threadIdx.x * 16; i < body; i += blockDim.x * 16) __pipeline_memcpy_async(dst + i, src + i, 16);
  else if (w == 4)
    for (int i = threadIdx.x * 4; i < body; i += blockDim.x * 4) __pipeline_memcpy_async(dst + i, src + i, 4);
  for (int i = body + threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
}

#ifndef TQ_EMU
__device__ __forceinline__ uint32_t tq_smem(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void tq_ldsm_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(tq_smem(p)));
}

__device__ __forceinline__ void tq_ldsm_x2_trans(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(tq_smem(p)));
}

// c += a · b, m16n8k16, row-major A (16 × 16 f16), column-major B (16 × 8 f16), f32 C.
__device__ __forceinline__ void tq_mma(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#else
inline void tq_ldsm_x4(uint32_t* r, const void* p) { tq_emu::ldmatrix(r, p, 4, false); }
inline void tq_ldsm_x2_trans(uint32_t* r, const void* p) { tq_emu::ldmatrix(r, p, 2, true); }
inline void tq_mma(float* c, const uint32_t* a, const uint32_t* b) { tq_emu::mma16816(c, a, b); }
#endif

// Eight codes of BITS bits at `codes` (BITS bytes, byte-aligned) → eight f16 centroids at dst
// (16-byte aligned), through `pairs`: the centroids of two codes (low code first) as one half2,
// indexed by the 2·BITS bits of the pair.
template <int BITS>
__device__ __forceinline__ void tq_tc_decode8(const uint8_t* codes, const uint32_t* pairs, __half* dst) {
  uint32_t w = 0;
#pragma unroll
  for (int k = 0; k < BITS; ++k) w |= (uint32_t)codes[k] << (8 * k);
  constexpr uint32_t mask = (1u << (2 * BITS)) - 1u;
  uint4 out;
  out.x = pairs[w & mask];
  out.y = pairs[(w >> (2 * BITS)) & mask];
  out.z = pairs[(w >> (4 * BITS)) & mask];
  out.w = pairs[(w >> (6 * BITS)) & mask];
  *reinterpret_cast<uint4*>(dst) = out;
}

__device__ __forceinline__ void tq_tc_decode8_any(int bits, const uint8_t* codes, const uint32_t* pairs,
                                                  __half* dst) {
  switch (bits) {
    case 1: tq_tc_decode8<1>(codes, pairs, dst); break;
    case 2: tq_tc_decode8<2>(codes, pairs, dst); break;
    case 3: tq_tc_decode8<3>(codes, pairs, dst); break;
    default: tq_tc_decode8<4>(codes, pairs, dst); break;
  }
}

// The f16 centroids of a staged tile of `spec` records (64 slots, `rb` bytes each) into
// ct[slot][QS] (coordinates: group 0's, then group 1's), by the pair tables of its groups
// (pairs + g·256); all threads of the block. A warp decodes one 8-coordinate column of 32
// slots, so the group and the code width are uniform across it.
template <int D, int QS>
__device__ __forceinline__ void tq_tc_decode_tile(const TqSpec& sp, const uint8_t* recs, int rb, const uint32_t* pairs,
                                                  __half* ct) {
  const int d0 = sp.groups[0].dim;
  for (int u = threadIdx.x; u < TQ_TC_TILE * D / 8; u += blockDim.x) {
    const int s = u % TQ_TC_TILE, j = (u / TQ_TC_TILE) * 8;
    const int g = (sp.num_groups > 1 && j >= d0) ? 1 : 0;
    const TqGroup& gg = sp.groups[g];
    const int jl = j - (g ? d0 : 0);
    tq_tc_decode8_any(gg.mse_bits, recs + s * rb + gg.codes_off + jl / 8 * gg.mse_bits, pairs + g * 256, ct + s * QS + j);
  }
}

// The norms of the staged keys and values of slots t0 .. t0 + 63 that some row may read
// (slot < n and position ≥ lo; 0 elsewhere) into nrm[4][64]: key group 0, key group 1,
// value group 0, value group 1. Threads 0..127 (one slot of keys or values each).
__device__ __forceinline__ void tq_tc_norms(const TqSpec& ks, const TqSpec& vs, const uint8_t* krec, int rbk,
                                            const uint8_t* vrec, int rbv, int n, int t0, int lo, float* nrm) {
  const int s = threadIdx.x % TQ_TC_TILE, which = threadIdx.x / TQ_TC_TILE;  // 0: keys, 1: values
  if (which > 1) return;
  const bool valid = s < n && t0 + s >= lo;
  const TqSpec& sp = which ? vs : ks;
  const uint8_t* rec = which ? vrec + s * rbv : krec + s * rbk;
  for (int g = 0; g < 2; ++g)
    nrm[(which * 2 + g) * TQ_TC_TILE + s] =
        (valid && g < sp.num_groups) ? tq_read_norm(rec, sp.groups[g].norm_off, sp.norm_format) : 0.f;
}

// Pair tables of both specs: lut[spec·2 + g][c0 | c1 << bits] = (c[c0], c[c1]) as half2.
__device__ __forceinline__ void tq_tc_pair_tables(const TqSpec& ks, const TqSpec& vs, uint32_t* lut) {
  for (int i = threadIdx.x; i < 4 * 256; i += blockDim.x) {
    const int t = i / 256, pair = i % 256;
    const TqSpec& s = t < 2 ? ks : vs;
    const int g = t % 2;
    uint32_t v = 0;
    if (g < s.num_groups) {
      const int bits = s.groups[g].mse_bits, n = 1 << bits;
      if (pair < n * n) {
        const __half2 hh = __floats2half2_rn(s.groups[g].centroids[pair % n], s.groups[g].centroids[pair / n]);
        memcpy(&v, &hh, 4);
      }
    }
    lut[i] = v;
  }
}

// `rows` f16 rows of D (16-byte aligned) from global src (stride D) into shared dst (stride QS).
template <int D, int QS>
__device__ __forceinline__ void tq_tc_load_rows(__half* dst, const __half* src, int rows) {
  for (int i = threadIdx.x; i < rows * D / 8; i += blockDim.x) {
    const int row = i / (D / 8), c8 = i % (D / 8);
    *reinterpret_cast<uint4*>(dst + row * QS + c8 * 8) = *reinterpret_cast<const uint4*>(src + row * D + c8 * 8);
  }
}

// The slots split `split` (chunk slots from split·chunk) reads for rows that see up to
// vis[0..rows): tiles from *start (a multiple of 64, from lo's tile on) while below *hi.
__device__ __forceinline__ void tq_tc_range(const int* vis, int rows, int split, int chunk, int lo, int* start,
                                            int* hi) {
  const int s0 = split * chunk;
  int h = 0;
  for (int r = 0; r < rows; ++r) h = max(h, min(vis[r], s0 + chunk));
  *hi = h;
  *start = max(s0, lo / TQ_TC_TILE * TQ_TC_TILE);
}

// Stages the key and value records of slots t0 .. min(t0 + 64, hi) of (b, h) into a record
// buffer: keys at dst, values at dst + voff.
__device__ __forceinline__ void tq_tc_stage_tile(uint8_t* dst, int voff, const uint8_t* kc, const uint8_t* vc,
                                                 const TqTiles& tt, int b, int h, int Hkv, int cap, int rbk, int rbv,
                                                 int t0, int hi) {
  const int n = min(TQ_TC_TILE, hi - t0);
  auto copy = [](uint8_t* d, const uint8_t* s, int bytes) { tq_tc_stage(d, s, bytes); };
  tq_stage_slots(dst, kc, tt, true, b, h, Hkv, cap, rbk, t0, n, copy);
  tq_stage_slots(dst + voff, vc, tt, false, b, h, Hkv, cap, rbv, t0, n, copy);
}

// One online-softmax step of query row r over a tile of 64 scores held by a warp (lane and
// lane + 32: sv, valid where ok): p[k] = exp(sv[k] − m_new), 0 where not ok; lane 0 updates
// run_m[r], run_l[r] and alpha[r] (the factor that rescales the row's earlier sums).
__device__ __forceinline__ void tq_tc_warp_softmax(const float* sv, const bool* ok, float* p, int r, float* run_m,
                                                   float* run_l, float* alpha) {
  float mx = fmaxf(sv[0], sv[1]);
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  const float m_old = run_m[r], m_new = fmaxf(m_old, mx);
  float l = 0.f;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    p[k] = ok[k] ? expf(sv[k] - m_new) : 0.f;
    l += p[k];
  }
  for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
  if ((threadIdx.x & 31) == 0) {
    const float a = m_old == -INFINITY ? 0.f : expf(m_old - m_new);
    alpha[r] = a;
    run_l[r] = run_l[r] * a + l;
    run_m[r] = m_new;
  }
}

// Shared memory of the split kernel, carved from one dynamic buffer (16-byte aligned parts).
template <int D>
struct TqTcSmem {
  static constexpr int QS = D + 8;                 // f16 row stride of the query and code tiles
  static constexpr int SS = TQ_TC_TILE + 4;         // f32 row stride of the scores
  static constexpr int PS = TQ_TC_TILE + 8;         // f16 row stride of the value weights
  static constexpr int q = 0;                                    // half [terms][16][QS]
  static constexpr int tile = q + TQ_TC_QTERMS * TQ_TC_ROWS * QS * 2;  // half [64][QS] centroids
  static constexpr int sc = tile + TQ_TC_TILE * QS * 2;          // float [16][SS]
  static constexpr int pw = sc + TQ_TC_ROWS * SS * 4;            // half [2][16][PS]
  static constexpr int lut = pw + 2 * TQ_TC_ROWS * PS * 2;       // uint32 [4][256] pair tables
  static constexpr int norms = lut + 4 * 256 * 4;                // float [4][64]: k g0, k g1, v g0, v g1
  static constexpr int recs = norms + 4 * TQ_TC_TILE * 4;        // u8 [2][rec_buf]
  // Bytes of one record buffer (the keys then, 16-byte aligned, the values of a tile).
  static __host__ __device__ int rec_buf(int rk, int rv) {
    return ((TQ_TC_TILE * rk + 15) / 16) * 16 + ((TQ_TC_TILE * rv + 15) / 16) * 16;
  }
  static __host__ __device__ int bytes(int rk, int rv) { return recs + 2 * rec_buf(rk, rv); }
};

// Rotated queries of one row tile as f16 mma rows: grid (Hkv · tiles, B), TQ_THREADS threads.
// A tile of RT query rows has MR mma rows (16 for the 16-row kernel, 64 for the rows kernel of
// tc_prefill.cuh) in groups of 16: row rho of the tile is group rho / 16, variant
// m = (rho % 16) / RW of query row grp·RW + (rho % 16) % RW (RW query rows per group); zero
// where m ≥ cycle or the query row does not exist. Layout [tiles][term][MR][d] (TQ_TC_QTERMS).
template <typename T>
__global__ void __launch_bounds__(TQ_THREADS)
    tq_tc_query_kernel(const T* __restrict__ q, const int* __restrict__ kch, TqSpecs kss, int Hq, int Hkv, int T_,
                       int tiles, int MR, int RW, int RT, __half* __restrict__ qt) {
  const int b = blockIdx.y, h = blockIdx.x / tiles, tile = blockIdx.x % tiles;
  const TqSpec& ks = kss.v[0];
  const int G = Hq / Hkv, d = ks.head_dim, M = kss.n;
  __shared__ float xs[TQ_MAX_DIM], rot[TQ_MAX_DIM];
  __half* dst = qt + (((long)b * Hkv + h) * tiles + tile) * TQ_TC_QTERMS * MR * d;
  for (int rho = 0; rho < MR; ++rho) {
    const int grp = rho / 16, m = (rho % 16) / RW, r = grp * RW + (rho % 16) % RW, gr = tile * RT + r;
    __half* row = dst + (long)rho * d;
    if (m >= M || r >= RT || gr >= G * T_) {  // uniform across the block
      for (int j = threadIdx.x; j < d; j += blockDim.x)
        for (int term = 0; term < TQ_TC_QTERMS; ++term) row[(long)term * MR * d + j] = __float2half_rn(0.f);
      continue;
    }
    const int t = gr / G, qh = h * G + gr % G;
    const long qoff = (((long)b * Hq + qh) * T_ + t) * d;
    const int* ch = kch + (long)h * d;
    int base = 0;
    for (int g = 0; g < ks.num_groups; ++g) {
      const TqGroup& kg = kss.v[m].groups[g];
      for (int j = threadIdx.x; j < kg.dim; j += blockDim.x) xs[j] = tq_load<T>(q, qoff + ch[base + j]);
      __syncthreads();
      tq_rotate(kg, xs, rot);
      for (int j = threadIdx.x; j < kg.dim; j += blockDim.x) {
        const __half hi = __float2half_rn(rot[j]);
        row[base + j] = hi;
        if (TQ_TC_QTERMS > 1) row[(long)MR * d + base + j] = __float2half_rn(rot[j] - __half2float(hi));
      }
      __syncthreads();
      base += kg.dim;
    }
  }
}

// One block: the R query rows of one row tile of one KV head against slots [s0, s0 + chunk) of
// one sequence (chunk a multiple of 64), tile by tile with an online softmax; writes (acc, m, l)
// of each row to the workspace exactly as tq_attn_split_kernel does. Rows read the records of
// slots lo..visible[row]. 4 warps: in the score product warp w owns slots 16w..16w+15 of the
// tile, in the value product the value coordinates [w·D/4, (w+1)·D/4).
template <int D, int R>
__global__ void __launch_bounds__(TQ_THREADS)
    tq_tc_split_kernel(const __half* __restrict__ qt, const uint8_t* __restrict__ kc, const uint8_t* __restrict__ vc,
                       const int* __restrict__ visible, TqSpecs kss, TqSpecs vss, TqTiles tt, int Hq, int Hkv,
                       int T_, int cap, int chunk, int tiles, float scale, int lo, int splits,
                       float* __restrict__ ws) {
  using S = TqTcSmem<D>;
  TQ_DYN_SMEM(smem);
  __half* qs = reinterpret_cast<__half*>(smem + S::q);
  __half* ct = reinterpret_cast<__half*>(smem + S::tile);
  float* sc = reinterpret_cast<float*>(smem + S::sc);
  __half* pw = reinterpret_cast<__half*>(smem + S::pw);
  uint32_t* lut = reinterpret_cast<uint32_t*>(smem + S::lut);
  float* nrm = reinterpret_cast<float*>(smem + S::norms);
  uint8_t* recs = smem + S::recs;
  __shared__ int vis[R];
  __shared__ float run_m[R], run_l[R], alpha[R];

  const int split = blockIdx.x, b = blockIdx.z;
  const int h = blockIdx.y / tiles, tile = blockIdx.y % tiles;
  const TqSpec& ks = kss.v[0];
  const TqSpec& vs = vss.v[0];
  const int M = kss.n, G = Hq / Hkv;
  const int rbk = ks.record_bytes, rbv = vs.record_bytes;
  const int rbuf = S::rec_buf(rbk, rbv), voff = ((TQ_TC_TILE * rbk + 15) / 16) * 16;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int kd0 = ks.groups[0].dim, vd0 = vs.groups[0].dim;

  tq_tc_pair_tables(ks, vs, lut);
  // The rotated query rows of this row tile; value weights of unused rows stay zero.
  tq_tc_load_rows<D, S::QS>(qs, qt + (((long)b * Hkv + h) * tiles + tile) * TQ_TC_QTERMS * TQ_TC_ROWS * D,
                            TQ_TC_QTERMS * TQ_TC_ROWS);
  for (int i = threadIdx.x; i < 2 * TQ_TC_ROWS * S::PS; i += blockDim.x) pw[i] = __float2half_rn(0.f);
  if (threadIdx.x < R) {
    const int gr = tile * R + threadIdx.x;
    vis[threadIdx.x] = gr < G * T_ ? visible[b * T_ + gr / G] : 0;
    run_m[threadIdx.x] = -INFINITY;
    run_l[threadIdx.x] = 0.f;
  }
  __syncthreads();

  int start, hi;
  tq_tc_range(vis, R, split, chunk, lo, &start, &hi);

  constexpr int NT = D / 32;  // value n-tiles (8 coordinates) per warp
  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int k = 0; k < 4; ++k) acc[j][k] = 0.f;

  auto stage = [&](int buf, int t0) {
    tq_tc_stage_tile(recs + buf * rbuf, voff, kc, vc, tt, b, h, Hkv, cap, rbk, rbv, t0, hi);
  };
  if (start < hi) stage(0, start);
  __pipeline_commit();
  int cur = 0;
  for (int t0 = start; t0 < hi; t0 += TQ_TC_TILE, cur ^= 1) {
    const int n = min(TQ_TC_TILE, hi - t0);
    if (t0 + TQ_TC_TILE < hi) stage(cur ^ 1, t0 + TQ_TC_TILE);
    __pipeline_commit();
    __pipeline_wait_prior(1);
    __syncthreads();
    const uint8_t* krec = recs + cur * rbuf;
    const uint8_t* vrec = krec + voff;
    // A. Key centroids, and the norms of slots some row may read (0 elsewhere).
    tq_tc_decode_tile<D, S::QS>(ks, krec, rbk, lut, ct);
    tq_tc_norms(ks, vs, krec, rbk, vrec, rbv, n, t0, lo, nrm);
    __syncthreads();
    // B. Scores of slots 16·warp .. +15: per key group one accumulator, times that group's norm.
    {
      float sg[2][2][4];
#pragma unroll
      for (int g = 0; g < 2; ++g)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int k = 0; k < 4; ++k) sg[g][j][k] = 0.f;
#pragma unroll
      for (int k0 = 0; k0 < D; k0 += 16) {
        uint32_t bb[4];
        const int idx = lane / 8;  // matrices: (slots +0..7, k lo), (+0..7, k hi), (+8..15, lo), (+8..15, hi)
        tq_ldsm_x4(bb, ct + (16 * warp + 8 * (idx / 2) + lane % 8) * S::QS + k0 + 8 * (idx % 2));
#pragma unroll
        for (int term = 0; term < TQ_TC_QTERMS; ++term) {
          uint32_t a[4];
          tq_ldsm_x4(a, qs + (term * TQ_TC_ROWS + lane % 16) * S::QS + k0 + 8 * (lane / 16));
          if (ks.num_groups > 1 && k0 >= kd0) {
            tq_mma(sg[1][0], a, bb);
            tq_mma(sg[1][1], a, bb + 2);
          } else {
            tq_mma(sg[0][0], a, bb);
            tq_mma(sg[0][1], a, bb + 2);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int row = lane / 4 + 8 * (k / 2), s = 16 * warp + 8 * j + 2 * (lane % 4) + (k % 2);
          const float v = nrm[s] * sg[0][j][k] + nrm[TQ_TC_TILE + s] * sg[1][j][k];
          sc[row * S::SS + s] = v * scale;
        }
    }
    __syncthreads();
    // C. Online softmax, one warp per query row r (over the rows rho = m·R + r of its variants;
    //    slot s counts in the row of variant s % M only), value weights p · n_g per value
    //    group; and the value centroids into the same code tile.
    for (int r = warp; r < R; r += TQ_THREADS / 32) {
      float sv[2];
      bool ok[2];
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const int i = lane + 32 * k, pos = t0 + i, m = pos % M;
        ok[k] = i < n && pos >= lo && pos < vis[r];
        sv[k] = ok[k] ? sc[(m * R + r) * S::SS + i] : -INFINITY;
      }
      float p[2];
      tq_tc_warp_softmax(sv, ok, p, r, run_m, run_l, alpha);
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const int i = lane + 32 * k, m = (t0 + i) % M;
        for (int mm = 0; mm < M; ++mm) {
          const int row = mm * R + r;
#pragma unroll
          for (int g = 0; g < 2; ++g)
            pw[(g * TQ_TC_ROWS + row) * S::PS + i] =
                __float2half_rn(mm == m && p[k] > 0.f ? p[k] * nrm[(2 + g) * TQ_TC_TILE + i] : 0.f);
        }
      }
    }
    tq_tc_decode_tile<D, S::QS>(vs, vrec, rbv, lut + 2 * 256, ct);
    __syncthreads();
    // D. Values: acc[rho][c] = acc · alpha + Σ_s w_g[rho][s] · c[s][c] (g: the group of c).
    {
      const int r0 = lane / 4, r1 = r0 + 8;
      const float a0 = r0 < R * M ? alpha[r0 % R] : 1.f, a1 = r1 < R * M ? alpha[r1 % R] : 1.f;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        acc[j][0] *= a0;
        acc[j][1] *= a0;
        acc[j][2] *= a1;
        acc[j][3] *= a1;
      }
#pragma unroll
      for (int k0 = 0; k0 < TQ_TC_TILE; k0 += 16) {
        uint32_t a[2][4];
        tq_ldsm_x4(a[0], pw + (lane % 16) * S::PS + k0 + 8 * (lane / 16));
        if (vs.num_groups > 1) tq_ldsm_x4(a[1], pw + (TQ_TC_ROWS + lane % 16) * S::PS + k0 + 8 * (lane / 16));
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const int c0 = (warp * NT + j) * 8;
          uint32_t bb[2];
          tq_ldsm_x2_trans(bb, ct + (k0 + lane % 16) * S::QS + c0);
          const bool g1 = vs.num_groups > 1 && c0 >= vd0;
          uint32_t af[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) af[k] = g1 ? a[1][k] : a[0][k];
          tq_mma(acc[j], af, bb);
        }
      }
    }
    __syncthreads();
  }

  // The workspace rows r < R: coordinate m·D + c of row r is acc[rho = m·R + r][c].
  const int W = M * D;
  const long wbase = ((((long)b * Hkv + h) * tiles + tile) * splits + split) * R * (W + 2);
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int rho = lane / 4 + 8 * (k / 2), c = (warp * NT + j) * 8 + 2 * (lane % 4) + (k % 2);
      if (rho < R * M) ws[wbase + (long)(rho % R) * (W + 2) + (rho / R) * D + c] = acc[j][k];
    }
  if (threadIdx.x < R) {
    ws[wbase + (long)threadIdx.x * (W + 2) + W] = run_m[threadIdx.x];
    ws[wbase + (long)threadIdx.x * (W + 2) + W + 1] = run_l[threadIdx.x];
  }
}

// Rows per block of the tensor-core kernel for `rows` query rows per KV head and a cycle of
// `cycle` rotations: the smallest power of two ≥ rows with rows · cycle ≤ 16 (0: none fits).
static inline int tq_tc_rows(int rows, int cycle) {
  if (cycle < 1 || cycle > TQ_TC_ROWS) return 0;
  int r = rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : rows <= 8 ? 8 : 16;
  while (r * cycle > TQ_TC_ROWS) r /= 2;
  return r;
}

// Whether the tensor-core kernel takes this layout (the launcher's checks, in one place):
// head_dim 64, 96, 128 or 256; keys and values MSE-only, 1 or 2 groups of 1–4 bits covering
// head_dim, key groups a multiple of 16 channels (a k-step of the mma), value groups a
// multiple of 8 (an n-tile); a cycle of at most 16 rotations.
static inline bool tq_tc_supports(const TqSpec& ks, const TqSpec& vs, int cycle) {
  const int d = ks.head_dim;
  if (vs.head_dim != d || (d != 64 && d != 96 && d != 128 && d != 256)) return false;
  if (tq_tc_rows(1, cycle) == 0) return false;
  const TqSpec* both[2] = {&ks, &vs};
  for (int k = 0; k < 2; ++k) {
    const TqSpec& s = *both[k];
    if (s.num_groups < 1 || s.num_groups > 2) return false;
    int total = 0;
    for (int g = 0; g < s.num_groups; ++g) {
      const TqGroup& gg = s.groups[g];
      if (gg.m != 0 || gg.mse_bits < 1 || gg.mse_bits > 4 || gg.dim % (k == 0 ? 16 : 8) != 0) return false;
      total += gg.dim;
    }
    if (total != d) return false;
  }
  return true;
}

template <int D, int R>
static int tq_tc_split_launch(const __half* qt, const uint8_t* kc, const uint8_t* vc, const int* visible,
                              const TqSpecs& ks, const TqSpecs& vs, const TqTiles& tt, int B, int Hq, int Hkv,
                              int T_, int cap, int chunk, int tiles, float scale, int lo, int splits,
                              int total_splits, float* ws, cudaStream_t stream) {
  const int smem = TqTcSmem<D>::bytes(ks.v[0].record_bytes, vs.v[0].record_bytes);
  // The dynamic shared-memory limit of this instantiation, raised once to what any supported
  // record of this head_dim needs: two f32 norms (8 bytes) and D codes of ≤ 4 bits.
  static const cudaError_t attr = cudaFuncSetAttribute(
      tq_tc_split_kernel<D, R>, cudaFuncAttributeMaxDynamicSharedMemorySize,
      TqTcSmem<D>::bytes(8 + D / 2, 8 + D / 2));
  if (attr != cudaSuccess) return (int)attr;
  if (smem > TqTcSmem<D>::bytes(8 + D / 2, 8 + D / 2)) return (int)cudaErrorInvalidValue;
  {
    auto k = tq_tc_split_kernel<D, R>;
    TQ_LAUNCH(k, dim3(splits, Hkv * tiles, B), TQ_THREADS, smem, stream, 
      qt, kc, vc, visible, ks, vs, tt, Hq, Hkv, T_, cap, chunk, tiles, scale, lo, total_splits, ws);
  }
  return (int)cudaGetLastError();
}
