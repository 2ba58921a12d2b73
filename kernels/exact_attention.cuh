// The full-precision part of the fused attention: attention sinks and each query's window of
// exact recent tokens (tqkv::KvSpec::sinks / window / budget_bits), read from the cache's f16
// store and merged with the packed part as extra splits of decode_attention.cu's split + merge.
// The CPU reference is tqkv::attention::attend_mixed (src/attention.rs).
//
// Layouts (row-major, contiguous):
//   rows        in the tiles of an arena (tqkv::paged::ExactTiles): position p of sequence b in
//               tile table[b·per_seq + p / rows], [rows, Hkv, row bytes] per tile, a row being the
//               key vector then the value vector — f16 [head_dim] (format 0), or llama.cpp's q8_0
//               (format 1): codes [head_dim] u8 (the integer + 128) then scales [head_dim / 32] f16
//   visible     [B, T] int  query (b, t) sees positions 0..visible[b·T + t]
//   packed_end  [B, T] int  ... of which it reads sinks 0..min(sinks, vis) and the window
//               packed_end..vis from here, the positions between from the records
//   ws          the split workspace of decode_attention.cu; this kernel writes split
//               `first_split + blockIdx.x` of each (b, KV head, tile): the un-normalised value sum
//               rotated into the coordinates of the cycle's first value variant (Π_g of each
//               group's channels; its sign coordinates and every other variant's 0), then the
//               running max m and sum l of the scores.
// Grid (exact splits, Hkv · tiles · RT / R, B); R query rows (row = t·G + g) per block: the
// split kernel's row tiles of RT rows, RT / R blocks each. The exact positions of a block (the sinks its rows see, then the window positions
// from the earliest window start to the latest visible end) are cut into gridDim.x chunks.
#pragma once
#include "tqkv_common.cuh"

// The full-precision part of an attention (mirrored by tqkv::cuda::TqExact).
struct TqExact {
  const uint8_t* base;     // the arena the tiles are in
  const int* table;        // [B, per_seq] tile of (sequence, position / rows)
  const int* packed_end;   // [B, T]
  int per_seq;             // table entries per sequence
  int rows;                // positions per tile
  int sinks;               // sink positions
  int splits;              // blocks along the exact positions (≥ 1)
  int format;              // 0: f16 rows, 1: q8_0 rows
  int heads;               // KV heads (rows of one position)
  long tile_bytes;         // bytes between tiles
};
static_assert(sizeof(TqExact) == 56 && offsetof(TqExact, per_seq) == 24 && offsetof(TqExact, tile_bytes) == 48,
              "TqExact layout differs from src/cuda.rs");

// Bytes of one key or value vector of d channels in the exact rows.
__device__ __forceinline__ int tq_exact_vector_bytes(const TqExact& ex, int d) {
  return ex.format == 0 ? 2 * d : d + d / 16;
}

// The row (key, then value) of position p of (b, h).
__device__ __forceinline__ const uint8_t* tq_exact_row(const TqExact& ex, int b, int h, int p, int d) {
  const long tile = ex.table[(long)b * ex.per_seq + p / ex.rows];
  return ex.base + tile * ex.tile_bytes + ((long)(p % ex.rows) * ex.heads + h) * 2 * tq_exact_vector_bytes(ex, d);
}

// Element j of the key (or value) of a row, as the store's reader sees it: the f16 value, or
// the q8_0 code decoded as f16((code − 128)·scale) — the rounding of
// crates/tqkv-candle/src/exact.rs::q8_decode, bit for bit.
__device__ __forceinline__ float tq_exact_at(const TqExact& ex, bool value, const uint8_t* row, int d, int j) {
  const uint8_t* v = row + (value ? tq_exact_vector_bytes(ex, d) : 0);
  if (ex.format == 0) return __half2float(reinterpret_cast<const __half*>(v)[j]);
  const float x = ((float)v[j] - 128.f) * __half2float(reinterpret_cast<const __half*>(v + d)[j / 32]);
  return __half2float(__float2half_rn(x));
}

// Per row r < rows of a block whose first query row is gr0 (row = t·G + g): what it sees
// (visible), where its records end (packed_end; 0 for rows past G·T) and a fresh softmax state.
// Threads 0 .. rows.
__device__ __forceinline__ void tq_exact_rows_init(const int* visible, const TqExact& ex, int b, int T_, int G,
                                                   int gr0, int rows, int* vis, int* pend, float* run_m,
                                                   float* run_l) {
  if (threadIdx.x < rows) {
    const int gr = gr0 + threadIdx.x;
    const bool real = gr < G * T_;
    vis[threadIdx.x] = real ? visible[b * T_ + gr / G] : 0;
    pend[threadIdx.x] = real ? ex.packed_end[b * T_ + gr / G] : 0;
    run_m[threadIdx.x] = -INFINITY;
    run_l[threadIdx.x] = 0.f;
  }
}

// The exact positions of a block's rows (visible vis[r], records ending at pend[r]): range[0]
// sinks seen by some row, then the window positions range[1] .. range[2] (the earliest window
// start to the latest visible end). One thread.
__device__ __forceinline__ void tq_exact_range(const int* vis, const int* pend, int rows, int sinks, int* range) {
  int s_max = 0, w_lo = 1 << 30, w_hi = 0;
  for (int r = 0; r < rows; ++r) {
    s_max = max(s_max, min(sinks, vis[r]));
    if (pend[r] < vis[r]) {
      w_lo = min(w_lo, pend[r]);
      w_hi = max(w_hi, vis[r]);
    }
  }
  range[0] = s_max;
  range[1] = w_hi > 0 ? w_lo : 0;
  range[2] = w_hi;
}

// Value coordinates of one variant of a spec (MSE coordinates of all groups, then sketches).
__device__ __forceinline__ int tq_exact_value_coords(const TqSpec& vs) {
  int Dv = 0;
  for (int g = 0; g < vs.num_groups; ++g) Dv += (vs.groups[g].mse_bits > 0 ? vs.groups[g].dim : 0) + vs.groups[g].m;
  return Dv;
}

// Writes one row of an exact split into the merge's value coordinates: the value sum xrow[d]
// (original domain, shared memory; overwritten) rotated per group by the cycle's first variant
// (Π_g of the group's channels), its sign coordinates and every other variant's 0, then the
// running max m and sum l. xg, rot: shared scratch of TQ_MAX_DIM floats. All threads.
__device__ __forceinline__ void tq_exact_store_row(const TqSpecs& vss, const int* vch, int h, float* xrow, float* xg,
                                                   float* rot, float* w, float m, float l) {
  const TqSpec& vs = vss.v[0];
  const int d = vs.head_dim;
  int vmo[2], vso[2], Dv = 0;
  for (int g = 0; g < vs.num_groups; ++g) {
    vmo[g] = Dv;
    if (vs.groups[g].mse_bits > 0) Dv += vs.groups[g].dim;
  }
  for (int g = 0; g < vs.num_groups; ++g) {
    vso[g] = Dv;
    Dv += vs.groups[g].m;
  }
  const int W = vss.n * Dv;  // value coordinates of all variants
  for (int c = Dv + threadIdx.x; c < W; c += blockDim.x) w[c] = 0.f;
  int base = 0;
  for (int g = 0; g < vs.num_groups; ++g) {
    const TqGroup& vg = vs.groups[g];
    for (int j = threadIdx.x; j < vg.dim; j += blockDim.x) xg[j] = xrow[vch[(long)h * d + base + j]];
    __syncthreads();
    if (vg.mse_bits > 0) {
      tq_rotate(vg, xg, rot);
      for (int j = threadIdx.x; j < vg.dim; j += blockDim.x) w[vmo[g] + j] = rot[j];
    }
    for (int l2 = threadIdx.x; l2 < vg.m; l2 += blockDim.x) w[vso[g] + l2] = 0.f;
    __syncthreads();
    base += vg.dim;
  }
  if (threadIdx.x == 0) {
    w[W] = m;
    w[W + 1] = l;
  }
  __syncthreads();
}

#define TQ_EX_TILE 32  // positions per tile: 4 threads per position (TQ_THREADS = 128)

template <typename T, int R>
__global__ void __launch_bounds__(TQ_THREADS)
    tq_attn_exact_kernel(const T* __restrict__ q, const int* __restrict__ visible, TqExact ex,
                         const int* __restrict__ vch, TqSpecs vss, int Hq, int Hkv, int T_, int tiles,
                         int first_split, int total_splits, float scale, int RT, float* __restrict__ ws) {
  const TqSpec& vs = vss.v[0];
  const int xs = blockIdx.x, b = blockIdx.z;
  // Grid y: (KV head, row tile, sub-tile of R rows): a row tile of RT rows (the split
  // kernel's, a multiple of R) is covered by RT / R blocks; this one holds rows r0 .. r0 + R.
  const int subs = RT / R, sub = blockIdx.y % subs, r0 = sub * R;
  const int h = blockIdx.y / subs / tiles, tile = blockIdx.y / subs % tiles;
  const int G = Hq / Hkv, d = vs.head_dim;
  __shared__ float qs[TQ_MAX_DIM * R];          // [coordinate][R]
  __shared__ float sc[TQ_EX_TILE * R];          // [position][R] scores, then probabilities
  __shared__ int pos_of[TQ_EX_TILE];
  __shared__ const uint8_t* row_of[TQ_EX_TILE];
  __shared__ int vis[R], pend[R];
  __shared__ float run_m[R], run_l[R], alpha[R];
  __shared__ int range[3];                      // sinks seen, window start, window end
  __shared__ float xrow[TQ_MAX_DIM], xg[TQ_MAX_DIM], rot[TQ_MAX_DIM];
  tq_exact_rows_init(visible, ex, b, T_, G, tile * RT + r0, R, vis, pend, run_m, run_l);
  __syncthreads();
  if (threadIdx.x == 0) tq_exact_range(vis, pend, R, ex.sinks, range);
  // Query rows in the original domain.
  for (int i = threadIdx.x; i < d * R; i += blockDim.x) {
    const int j = i / R, r = i % R, gr = tile * RT + r0 + r;
    float x = 0.f;
    if (gr < G * T_) {
      const int t = gr / G, qh = h * G + gr % G;
      x = tq_load<T>(q, (((long)b * Hq + qh) * T_ + t) * d + j);
    }
    qs[j * R + r] = x;
  }
  __syncthreads();
  const int n_sink = range[0], w_lo = range[1], w_hi = range[2];
  const int total = n_sink + (w_hi - w_lo);
  const int per = (total + gridDim.x - 1) / gridDim.x;
  const int i0 = min(total, xs * per), i1 = min(total, i0 + per);
  // Each thread owns up to 2 output coordinates (head_dim ≤ 2 · TQ_THREADS).
  float acc[2][R];
#pragma unroll
  for (int k = 0; k < 2; ++k)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[k][r] = 0.f;

  for (int t0 = i0; t0 < i1; t0 += TQ_EX_TILE) {
    const int n = min(TQ_EX_TILE, i1 - t0);
    if (threadIdx.x < n) {
      const int i = t0 + threadIdx.x;
      const int p = i < n_sink ? i : w_lo + (i - n_sink);
      pos_of[threadIdx.x] = p;
      row_of[threadIdx.x] = tq_exact_row(ex, b, h, p, d);
    }
    __syncthreads();
    // Scores: four threads per position, each a quarter of the coordinates.
    {
      const int i = threadIdx.x >> 2, part = threadIdx.x & 3;
      const bool valid = i < n;
      const int p = valid ? pos_of[i] : 0;
      float dot[R];
#pragma unroll
      for (int r = 0; r < R; ++r) dot[r] = 0.f;
      if (valid)
        for (int j = part; j < d; j += 4) {
          const float kj = tq_exact_at(ex, false, row_of[i], d, j);
#pragma unroll
          for (int r = 0; r < R; ++r) dot[r] = fmaf(qs[j * R + r], kj, dot[r]);
        }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        dot[r] += __shfl_xor_sync(0xffffffffu, dot[r], 1);
        dot[r] += __shfl_xor_sync(0xffffffffu, dot[r], 2);
      }
      if (valid && part == 0)
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const bool seen = p < min(ex.sinks, vis[r]) || (p >= pend[r] && p < vis[r]);
          sc[i * R + r] = seen ? dot[r] * scale : -INFINITY;
        }
    }
    __syncthreads();
    // Online softmax statistics.
    tq_online_softmax<R>(sc, n, run_m, run_l, alpha);
    // Values in the original domain, each thread its coordinates.
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int c = threadIdx.x + k * TQ_THREADS;
      if (c >= d) break;
#pragma unroll
      for (int r = 0; r < R; ++r) acc[k][r] *= alpha[r];
      for (int i = 0; i < n; ++i) {
        const float x = tq_exact_at(ex, true, row_of[i], d, c);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[k][r] = fmaf(sc[i * R + r], x, acc[k][r]);
      }
    }
    __syncthreads();
  }

  const int W = vss.n * tq_exact_value_coords(vss.v[0]);
  const long wbase = ((((long)b * Hkv + h) * tiles + tile) * total_splits + first_split + xs) * RT * (W + 2);
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int c = threadIdx.x + k * TQ_THREADS;
      if (c < d) xrow[c] = acc[k][r];
    }
    __syncthreads();
    tq_exact_store_row(vss, vch, h, xrow, xg, rot, ws + wbase + (long)(r0 + r) * (W + 2), run_m[r], run_l[r]);
  }
}
