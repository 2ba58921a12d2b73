// The tensor-core split kernel for many query rows (a prefill chunk over a packed past): the
// tile staging, code → f16 decoding and workspace of tc_attention.cuh, with 64 mma rows per
// block instead of 16 — each of the 4 warps owns 16 rows and its own softmax, held in
// registers as FlashAttention-2 does (the score fragments of two n-tiles are the A fragment of
// the value product) — so that a tile of the past is staged and decoded once per 64 rows, not
// once per 16. Rows of a warp: rho = m·RW + r (variant m of query row r, RW = 16 / cycle); the
// block's RB = 4·RW query rows are the workspace's row tile. The CPU reference is
// tqkv::attention::attend_cycled; the emulator (tests/emu) checks it against that.
#pragma once
#include "tc_attention.cuh"

// Shared memory of the rows kernel (16-byte aligned parts).
template <int D>
struct TqTcRowsSmem {
  static constexpr int QS = D + 8;                          // f16 row stride
  static constexpr int q = 0;                               // half [terms][64][QS] rotated queries
  static constexpr int tile = q + TQ_TC_QTERMS * 64 * QS * 2;  // half [64][QS] centroids
  static constexpr int lut = tile + TQ_TC_TILE * QS * 2;    // uint32 [4][256] pair tables
  static constexpr int norms = lut + 4 * 256 * 4;           // float [4][64]
  static constexpr int recs = norms + 4 * TQ_TC_TILE * 4;   // u8 [2][rec_buf]
  static __host__ __device__ int bytes(int rk, int rv) { return recs + 2 * TqTcSmem<D>::rec_buf(rk, rv); }
};

// Whether the rows kernel takes `rows` query rows per KV head with a cycle of `cycle` at
// head_dim d (else the 16-row kernel does): more rows than one mma tile, a cycle dividing 16
// evenly into rows (1, 2, 4), head_dim ≤ 128 (the value accumulators of a warp's 16 rows).
static inline bool tq_tc_rows_fit(int rows, int cycle, int d) {
  return rows > TQ_TC_ROWS && (cycle == 1 || cycle == 2 || cycle == 4) && d <= 128;
}

template <int D, int M>
__global__ void __launch_bounds__(TQ_THREADS)
    tq_tc_rows_kernel(const __half* __restrict__ qt, const uint8_t* __restrict__ kc, const uint8_t* __restrict__ vc,
                      const int* __restrict__ visible, TqSpecs kss, TqSpecs vss, TqTiles tt, int Hq, int Hkv, int T_,
                      int cap, int chunk, int tiles, float scale, int lo, int splits, float* __restrict__ ws) {
  constexpr int RW = 16 / M, RB = 4 * RW;
  using S = TqTcRowsSmem<D>;
  TQ_DYN_SMEM(smem);
  __half* qs = reinterpret_cast<__half*>(smem + S::q);
  __half* ct = reinterpret_cast<__half*>(smem + S::tile);
  uint32_t* lut = reinterpret_cast<uint32_t*>(smem + S::lut);
  float* nrm = reinterpret_cast<float*>(smem + S::norms);
  uint8_t* recs = smem + S::recs;
  __shared__ int vis[RB];

  const int split = blockIdx.x, b = blockIdx.z;
  const int h = blockIdx.y / tiles, tile = blockIdx.y % tiles;
  const TqSpec& ks = kss.v[0];
  const TqSpec& vs = vss.v[0];
  const int G = Hq / Hkv;
  const int rbk = ks.record_bytes, rbv = vs.record_bytes;
  const int rbuf = TqTcSmem<D>::rec_buf(rbk, rbv), voff = ((TQ_TC_TILE * rbk + 15) / 16) * 16;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g8 = lane / 4, q4 = lane % 4;
  const int kd0 = ks.groups[0].dim, vd0 = vs.groups[0].dim;

  tq_tc_pair_tables(ks, vs, lut);
  tq_tc_load_rows<D, S::QS>(qs, qt + (((long)b * Hkv + h) * tiles + tile) * TQ_TC_QTERMS * 64 * D,
                            TQ_TC_QTERMS * 64);
  for (int r = threadIdx.x; r < RB; r += blockDim.x) {
    const int gr = tile * RB + r;
    vis[r] = gr < G * T_ ? visible[b * T_ + gr / G] : 0;
  }
  __syncthreads();

  // This lane's two rows of the warp's mma tile: rho = g8 and g8 + 8, variant m and query row
  // r of each; with a cycle both are variants of one query row (combined in the reductions).
  const int m0 = g8 / RW, r0 = g8 % RW, m1 = (g8 + 8) / RW, r1 = (g8 + 8) % RW;
  const int vis0 = vis[warp * RW + r0], vis1 = vis[warp * RW + r1];
  float rm[2] = {-INFINITY, -INFINITY}, rl[2] = {0.f, 0.f};

  int start, hi;
  tq_tc_range(vis, RB, split, chunk, lo, &start, &hi);

  constexpr int NO = D / 8;  // value n-tiles of a warp's rows (all coordinates)
  float o[NO][4];
#pragma unroll
  for (int j = 0; j < NO; ++j)
#pragma unroll
    for (int k = 0; k < 4; ++k) o[j][k] = 0.f;

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
    // A. Key centroids and the norms.
    tq_tc_decode_tile<D, S::QS>(ks, krec, rbk, lut, ct);
    tq_tc_norms(ks, vs, krec, rbk, vrec, rbv, n, t0, lo, nrm);
    __syncthreads();
    // B. The warp's scores against all 64 slots: sc = Σ_g n_g · (q_g · c_g), scaled.
    float sc[8][4], acc[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) sc[j][k] = acc[j][k] = 0.f;
    auto fold = [&](int g) {  // sc += n_g(slot) · acc; acc = 0
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          sc[j][k] = fmaf(nrm[g * TQ_TC_TILE + 8 * j + 2 * q4 + (k % 2)], acc[j][k], sc[j][k]);
          acc[j][k] = 0.f;
        }
    };
#pragma unroll
    for (int k0 = 0; k0 < D; k0 += 16) {
      if (ks.num_groups > 1 && k0 == kd0) fold(0);
      uint32_t a[TQ_TC_QTERMS][4];
#pragma unroll
      for (int term = 0; term < TQ_TC_QTERMS; ++term)
        tq_ldsm_x4(a[term], qs + (term * 64 + warp * 16 + lane % 16) * S::QS + k0 + 8 * (lane / 16));
      const int idx = lane / 8;
#pragma unroll
      for (int j2 = 0; j2 < 4; ++j2) {
        uint32_t bb[4];
        tq_ldsm_x4(bb, ct + (16 * j2 + 8 * (idx / 2) + lane % 8) * S::QS + k0 + 8 * (idx % 2));
#pragma unroll
        for (int term = 0; term < TQ_TC_QTERMS; ++term) {
          tq_mma(acc[2 * j2], a[term], bb);
          tq_mma(acc[2 * j2 + 1], a[term], bb + 2);
        }
      }
    }
    fold(ks.num_groups > 1 ? 1 : 0);
    // C. Online softmax in registers: mask, row maxima and sums over the 4 lanes of a row
    //    (and, with a cycle, over the variant rows of one query row).
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int i = 8 * j + 2 * q4 + (k % 2), pos = t0 + i, hr = k / 2;
        const int m = hr ? m1 : m0, vr = hr ? vis1 : vis0;
        const bool ok = i < n && pos >= lo && pos < vr && pos % M == m;
        sc[j][k] = ok ? sc[j][k] * scale : -INFINITY;
        mx[hr] = fmaxf(mx[hr], sc[j][k]);
      }
    auto row_reduce = [&](float* v, bool is_max) {
      if (M > 1) v[0] = v[1] = is_max ? fmaxf(v[0], v[1]) : v[0] + v[1];
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        for (int o2 = 1; o2 <= 2; o2 <<= 1) {
          const float w = __shfl_xor_sync(0xffffffffu, v[k], o2);
          v[k] = is_max ? fmaxf(v[k], w) : v[k] + w;
        }
        if (M == 4) {
          const float w = __shfl_xor_sync(0xffffffffu, v[k], 16);
          v[k] = is_max ? fmaxf(v[k], w) : v[k] + w;
        }
      }
    };
    row_reduce(mx, true);
    float mnew[2], alpha[2], ls[2] = {0.f, 0.f};
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      mnew[k] = fmaxf(rm[k], mx[k]);
      alpha[k] = rm[k] == -INFINITY ? 0.f : expf(rm[k] - mnew[k]);
    }
    // Probabilities, and the value weights p · n_g packed as the A fragments of the value
    // product: k-step kk (slots 16kk .. +15) is n-tiles 2kk (a0, a1) and 2kk + 1 (a2, a3).
    uint32_t pa[2][4][4];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float p[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int hr = k / 2;
        p[k] = sc[j][k] == -INFINITY ? 0.f : expf(sc[j][k] - mnew[hr]);
        ls[hr] += p[k];
      }
      const int col = 8 * j + 2 * q4, kk = j / 2, half = j % 2;
#pragma unroll
      for (int g = 0; g < 2; ++g) {
        const float n0 = nrm[(2 + g) * TQ_TC_TILE + col], n1 = nrm[(2 + g) * TQ_TC_TILE + col + 1];
        const __half2 top = __floats2half2_rn(p[0] * n0, p[1] * n1), bot = __floats2half2_rn(p[2] * n0, p[3] * n1);
        memcpy(&pa[g][kk][2 * half], &top, 4);
        memcpy(&pa[g][kk][2 * half + 1], &bot, 4);
      }
    }
    row_reduce(ls, false);
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      rl[k] = rl[k] * alpha[k] + ls[k];
      rm[k] = mnew[k];
    }
    __syncthreads();  // every warp is done with the key centroids
    tq_tc_decode_tile<D, S::QS>(vs, vrec, rbv, lut + 2 * 256, ct);
    __syncthreads();
    // D. Values: o = o · alpha + Σ_s (p · n_g)(s) · c[s] per 8-coordinate n-tile.
#pragma unroll
    for (int j = 0; j < NO; ++j) {
      o[j][0] *= alpha[0];
      o[j][1] *= alpha[0];
      o[j][2] *= alpha[1];
      o[j][3] *= alpha[1];
    }
#pragma unroll
    for (int kk = 0; kk < TQ_TC_TILE / 16; ++kk) {
#pragma unroll
      for (int j = 0; j < NO; ++j) {
        uint32_t bb[2];
        tq_ldsm_x2_trans(bb, ct + (16 * kk + lane % 16) * S::QS + 8 * j);
        const bool g1 = vs.num_groups > 1 && 8 * j >= vd0;
        uint32_t af[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) af[k] = g1 ? pa[1][kk][k] : pa[0][kk][k];
        tq_mma(o[j], af, bb);
      }
    }
    __syncthreads();  // the value centroids are read; the next tile may overwrite them
  }

  // The workspace: row (warp·RW + r) of the row tile, coordinate m·D + c = o[rho][c].
  const int W = M * D;
  const long wbase = ((((long)b * Hkv + h) * tiles + tile) * splits + split) * RB * (W + 2);
#pragma unroll
  for (int j = 0; j < NO; ++j)
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int hr = k / 2, m = hr ? m1 : m0, r = hr ? r1 : r0;
      const int c = 8 * j + 2 * q4 + (k % 2);
      ws[wbase + (long)(warp * RW + r) * (W + 2) + m * D + c] = o[j][k];
    }
  if (q4 == 0)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int m = hr ? m1 : m0, r = hr ? r1 : r0;
      if (m == 0) {
        ws[wbase + (long)(warp * RW + r) * (W + 2) + W] = rm[hr];
        ws[wbase + (long)(warp * RW + r) * (W + 2) + W + 1] = rl[hr];
      }
    }
}

template <int D, int M>
static int tq_tc_rows_split_launch(const __half* qt, const uint8_t* kc, const uint8_t* vc, const int* visible,
                                   const TqSpecs& ks, const TqSpecs& vs, const TqTiles& tt, int B, int Hq, int Hkv,
                                   int T_, int cap, int chunk, int tiles, float scale, int lo, int splits,
                                   int total_splits, float* ws, cudaStream_t stream) {
  const int smem = TqTcRowsSmem<D>::bytes(ks.v[0].record_bytes, vs.v[0].record_bytes);
  static const cudaError_t attr = cudaFuncSetAttribute(
      tq_tc_rows_kernel<D, M>, cudaFuncAttributeMaxDynamicSharedMemorySize,
      TqTcRowsSmem<D>::bytes(8 + D / 2, 8 + D / 2));
  if (attr != cudaSuccess) return (int)attr;
  if (smem > TqTcRowsSmem<D>::bytes(8 + D / 2, 8 + D / 2)) return (int)cudaErrorInvalidValue;
  auto k = tq_tc_rows_kernel<D, M>;
  TQ_LAUNCH(k, dim3(splits, Hkv * tiles, B), TQ_THREADS, smem, stream, qt, kc, vc, visible, ks, vs, tt, Hq, Hkv,
            T_, cap, chunk, tiles, scale, lo, total_splits, ws);
  return (int)cudaGetLastError();
}
