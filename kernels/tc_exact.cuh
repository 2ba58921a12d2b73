// The exact part of the fused attention on tensor cores (kernel 1): the sinks and each query's
// window of exact tokens, read from the f16 or q8_0 store in tiles of 64 positions into f16
// rows in shared memory, scores and value sums by mma.sync m16n8k16 (16 mma rows = the block's
// R ≤ 16 query rows, the query as f16 hi + lo terms, in the original domain), then each row's
// sum rotated into the merge's value coordinates as exact_attention.cuh's kernel does (the same
// grid, splits and workspace rows, so either kernel may write the exact splits). The CPU
// reference is tqkv::attention::attend_mixed; the emulator (tests/emu) checks it against that.
#pragma once
#include "exact_attention.cuh"
#include "tc_attention.cuh"

template <int D>
struct TqTcExactSmem {
  static constexpr int QS = D + 8, SS = TQ_TC_TILE + 4, PS = TQ_TC_TILE + 8;
  static constexpr int q = 0;                                         // half [terms][16][QS]
  static constexpr int tile = q + TQ_TC_QTERMS * TQ_TC_ROWS * QS * 2;  // half [64][QS] rows
  static constexpr int sc = tile + TQ_TC_TILE * QS * 2;               // float [16][SS]
  static constexpr int pw = sc + TQ_TC_ROWS * SS * 4;                 // half [16][PS]
  static constexpr int out = pw + TQ_TC_ROWS * PS * 2;                // float [16][D] value sums
  static constexpr int bytes = out + TQ_TC_ROWS * D * 4;
};

// The keys or values of rows row_of[0..n) into ct[64][QS] as f16, zero past n; the q8_0 decode
// is tq_exact_at's, bit for bit. All threads.
template <int D, int QS>
__device__ __forceinline__ void tq_tc_exact_rows(const TqExact& ex, bool value, const uint8_t* const* row_of, int n,
                                                 __half* ct) {
  for (int u = threadIdx.x; u < TQ_TC_TILE * D / 8; u += blockDim.x) {
    const int i = u / (D / 8), j = (u % (D / 8)) * 8;
    __half* dst = ct + i * QS + j;
    if (i >= n) {
      *reinterpret_cast<uint4*>(dst) = uint4{0u, 0u, 0u, 0u};
      continue;
    }
    const uint8_t* row = row_of[i];
    if (ex.format == 0) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(row + (value ? 2 * D : 0) + 2 * j);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = __float2half_rn(tq_exact_at(ex, value, row, D, j + e));
    }
  }
}

template <typename T, int D, int R>
__global__ void __launch_bounds__(TQ_THREADS)
    tq_tc_exact_kernel(const T* __restrict__ q, const int* __restrict__ visible, TqExact ex,
                       const int* __restrict__ vch, TqSpecs vss, int Hq, int Hkv, int T_, int tiles, int first_split,
                       int total_splits, float scale, int RT, float* __restrict__ ws) {
  using S = TqTcExactSmem<D>;
  TQ_DYN_SMEM(smem);
  __half* qs = reinterpret_cast<__half*>(smem + S::q);
  __half* ct = reinterpret_cast<__half*>(smem + S::tile);
  float* sc = reinterpret_cast<float*>(smem + S::sc);
  __half* pw = reinterpret_cast<__half*>(smem + S::pw);
  float* osum = reinterpret_cast<float*>(smem + S::out);
  __shared__ int pos_of[TQ_TC_TILE];
  __shared__ const uint8_t* row_of[TQ_TC_TILE];
  __shared__ int vis[R], pend[R];
  __shared__ float run_m[R], run_l[R], alpha[R];
  __shared__ int range[3];
  __shared__ float xg[TQ_MAX_DIM], rot[TQ_MAX_DIM];

  const int subs = RT / R, sub = blockIdx.y % subs, r0 = sub * R;
  const int xs = blockIdx.x, b = blockIdx.z;
  const int h = blockIdx.y / subs / tiles, tile = blockIdx.y / subs % tiles;
  const int G = Hq / Hkv;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  tq_exact_rows_init(visible, ex, b, T_, G, tile * RT + r0, R, vis, pend, run_m, run_l);
  // Query rows (original domain) as f16 hi + lo; rows ≥ R and missing rows zero.
  for (int i = threadIdx.x; i < TQ_TC_ROWS * D; i += blockDim.x) {
    const int r = i / D, j = i % D, gr = tile * RT + r0 + r;
    float x = 0.f;
    if (r < R && gr < G * T_) {
      const int t = gr / G, qh = h * G + gr % G;
      x = tq_load<T>(q, (((long)b * Hq + qh) * T_ + t) * D + j);
    }
    const __half hi = __float2half_rn(x);
    qs[r * S::QS + j] = hi;
    qs[(TQ_TC_ROWS + r) * S::QS + j] = __float2half_rn(x - __half2float(hi));
  }
  for (int i = threadIdx.x; i < TQ_TC_ROWS * S::PS; i += blockDim.x) pw[i] = __float2half_rn(0.f);
  __syncthreads();
  if (threadIdx.x == 0) tq_exact_range(vis, pend, R, ex.sinks, range);
  __syncthreads();
  const int n_sink = range[0], w_lo = range[1], w_hi = range[2];
  const int total = n_sink + (w_hi - w_lo);
  const int per = (total + gridDim.x - 1) / gridDim.x;
  const int i0 = min(total, xs * per), i1 = min(total, i0 + per);

  constexpr int NT = D / 32;  // value n-tiles per warp
  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int k = 0; k < 4; ++k) acc[j][k] = 0.f;

  for (int t0 = i0; t0 < i1; t0 += TQ_TC_TILE) {
    const int n = min(TQ_TC_TILE, i1 - t0);
    if (threadIdx.x < TQ_TC_TILE) {
      const int i = t0 + threadIdx.x;
      const int p = i < n_sink ? i : w_lo + (i - n_sink);
      pos_of[threadIdx.x] = p;
      row_of[threadIdx.x] = i < i1 ? tq_exact_row(ex, b, h, p, D) : nullptr;
    }
    __syncthreads();
    tq_tc_exact_rows<D, S::QS>(ex, false, row_of, n, ct);
    __syncthreads();
    // Scores of positions 16·warp .. +15, both query terms.
    {
      float s2[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int k0 = 0; k0 < D; k0 += 16) {
        uint32_t bb[4];
        const int idx = lane / 8;
        tq_ldsm_x4(bb, ct + (16 * warp + 8 * (idx / 2) + lane % 8) * S::QS + k0 + 8 * (idx % 2));
#pragma unroll
        for (int term = 0; term < TQ_TC_QTERMS; ++term) {
          uint32_t a[4];
          tq_ldsm_x4(a, qs + (term * TQ_TC_ROWS + lane % 16) * S::QS + k0 + 8 * (lane / 16));
          tq_mma(s2[0], a, bb);
          tq_mma(s2[1], a, bb + 2);
        }
      }
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int k = 0; k < 4; ++k)
          sc[(lane / 4 + 8 * (k / 2)) * S::SS + 16 * warp + 8 * j + 2 * (lane % 4) + (k % 2)] = s2[j][k] * scale;
    }
    __syncthreads();
    // Online softmax, one warp per row; the value rows into the same tile.
    for (int r = warp; r < R; r += TQ_THREADS / 32) {
      float sv[2], p[2];
      bool ok[2];
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const int i = lane + 32 * k, pos = pos_of[i];
        ok[k] = i < n && (pos < min(ex.sinks, vis[r]) || (pos >= pend[r] && pos < vis[r]));
        sv[k] = ok[k] ? sc[r * S::SS + i] : -INFINITY;
      }
      tq_tc_warp_softmax(sv, ok, p, r, run_m, run_l, alpha);
#pragma unroll
      for (int k = 0; k < 2; ++k) pw[r * S::PS + lane + 32 * k] = __float2half_rn(p[k]);
    }
    __syncthreads();  // every warp is done with the key rows and has written its weights
    tq_tc_exact_rows<D, S::QS>(ex, true, row_of, n, ct);
    __syncthreads();
    {
      const int ra = lane / 4, rb = ra + 8;
      const float a0 = ra < R ? alpha[ra] : 1.f, a1 = rb < R ? alpha[rb] : 1.f;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        acc[j][0] *= a0;
        acc[j][1] *= a0;
        acc[j][2] *= a1;
        acc[j][3] *= a1;
      }
#pragma unroll
      for (int k0 = 0; k0 < TQ_TC_TILE; k0 += 16) {
        uint32_t a[4];
        tq_ldsm_x4(a, pw + (lane % 16) * S::PS + k0 + 8 * (lane / 16));
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          uint32_t bb[2];
          tq_ldsm_x2_trans(bb, ct + (k0 + lane % 16) * S::QS + (warp * NT + j) * 8);
          tq_mma(acc[j], a, bb);
        }
      }
    }
    __syncthreads();
  }

  // Each row's sum into the merge's value coordinates (exact_attention.cuh's epilogue).
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int row = lane / 4 + 8 * (k / 2), c = (warp * NT + j) * 8 + 2 * (lane % 4) + (k % 2);
      osum[row * D + c] = acc[j][k];
    }
  __syncthreads();
  const int W = vss.n * tq_exact_value_coords(vss.v[0]);
  const long wbase = ((((long)b * Hkv + h) * tiles + tile) * total_splits + first_split + xs) * RT * (W + 2);
  for (int r = 0; r < R; ++r)
    tq_exact_store_row(vss, vch, h, osum + r * D, xg, rot, ws + wbase + (long)(r0 + r) * (W + 2), run_m[r], run_l[r]);
}

// Launches the tensor-core exact kernel over the grid of tq_attn_exact_kernel.
template <typename T, int D, int R>
static int tq_tc_exact_launch(const void* q, const int* visible, const TqExact& ex, const int* vch, const TqSpecs& vs,
                              int B, int Hq, int Hkv, int T_, int tiles, int splits, int total, float scale, int RT,
                              float* ws, cudaStream_t stream) {
  static const cudaError_t attr = cudaFuncSetAttribute(
      tq_tc_exact_kernel<T, D, R>, cudaFuncAttributeMaxDynamicSharedMemorySize, TqTcExactSmem<D>::bytes);
  if (attr != cudaSuccess) return (int)attr;
  auto k = tq_tc_exact_kernel<T, D, R>;
  TQ_LAUNCH(k, dim3(ex.splits, Hkv * tiles * (RT / R), B), TQ_THREADS, TqTcExactSmem<D>::bytes, stream, (const T*)q,
            visible, ex, vch, vs, Hq, Hkv, T_, tiles, splits, total, scale, RT, ws);
  return (int)cudaGetLastError();
}
