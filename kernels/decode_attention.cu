// Fused decode attention over the packed TurboQuant cache (flash-decoding: split along the
// sequence, then one reduction). Scores come straight from the key codes in the rotated domain
// (TurboQuant §3: <q, x̃> = n · Σ_j (Π q)_j c[idx_j]; QJL §3 for the prod-mode sign term
// γ/(mκ) · <S Π q, z>), values are accumulated in the rotated domain and un-rotated once per
// query. The CPU reference is tqkv::attention::attend_packed (src/attention.rs).
//
// Layouts (row-major, contiguous):
//   q        [B, Hq, T, head_dim]  f32 / f16 / bf16 (q_dtype 0 / 1 / 2); Hq = G · Hkv (GQA)
//   kcache   [B, Hkv, cap, ks.record_bytes] u8;  vcache [B, Hkv, cap, vs.record_bytes] u8; or,
//            with a tile table (tile_table.cuh), the key and value bases of an arena's tiles
//   visible  [B, T] int  query (b, t) sees slots 0..visible[b·T + t] of its sequence
//   exact    optional (null: none): sinks and windows in f16 or q8_0 rows in an arena's tiles
//            (exact_attention.cuh); query (b, t) then reads records only for slots
//            sinks..packed_end[b·T + t]
//   kch, vch [Hkv, head_dim] int  per-head channel order of keys / values
//   status   [1] int  the cache's status word: non-zero (bad input was appended) → NaN output
//   out      [B, Hq, T, head_dim] f32 / f16 / bf16 (out_dtype 0 / 1 / 2)
//   ks, vs   `cycle` specs each (TqSpecs): slot s was written with variant s % cycle
//   ws       workspace: [B, Hkv, tiles, splits, R, cycle·Dv + 2] f32 (Dv = rotated value
//            coordinates of one variant; variant m's value sums at m·Dv)
// A block of the split kernel handles R query rows (row = t·G + g of one KV head) and one
// chunk of `chunk` slots; grid (splits, Hkv · tiles, B). With an exact part, the exact kernel
// writes `exact->splits` more splits of the same workspace. The merge kernel has grid
// (Hkv · tiles · R, B) and merges all splits. Query rows that see nothing produce zeros.
// kernel 1 replaces the split kernel by the tensor-core one of tc_attention.cuh (same
// workspace, same exact part and merge; R may differ: tqkv_decode_attention_rows). Both read
// the records through a tile table when one is given.
#include "tqkv_common.cuh"
#include "exact_attention.cuh"
#include "tc_attention.cuh"
#include "tc_prefill.cuh"
#include "tc_exact.cuh"
#ifndef TQ_EMU
#include <cuda_pipeline.h>
#endif

// Records of a tile of slots are staged in shared memory by asynchronous 4-byte copies of the
// contiguous slot range, double-buffered (tile k+1 lands while tile k is computed). Slots per
// tile and bytes of each record buffer, by rows per block (static shared memory < 48 KiB):
template <int R> struct TqAttTile { static constexpr int slots = R >= 8 ? 32 : 64, bytes = R >= 8 ? 4096 : 8192; };
#define TQ_ATT_REC_BYTES_MIN 4096

// Copies n bytes global → shared: asynchronous 4-byte copies when both are 4-byte aligned,
// else plain byte copies (visible after the next __syncthreads).
__device__ __forceinline__ void tq_stage(uint8_t* dst, const uint8_t* src, int n) {
  if ((((uintptr_t)src | (uintptr_t)dst) & 3) == 0 && (n & 3) == 0) {
    for (int i = threadIdx.x; i < n / 4; i += blockDim.x) __pipeline_memcpy_async(dst + 4 * i, src + 4 * i, 4);
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
  }
}

// Offsets of each group's coordinates in the rotated space of a spec: MSE coordinates of all
// groups first, then the sketch coordinates; returns the total.
__device__ __forceinline__ int tq_coord_offsets(const TqSpec& s, int* mse_off, int* sgn_off) {
  int off = 0;
  for (int g = 0; g < s.num_groups; ++g) {
    mse_off[g] = off;
    if (s.groups[g].mse_bits > 0) off += s.groups[g].dim;
  }
  for (int g = 0; g < s.num_groups; ++g) {
    sgn_off[g] = off;
    off += s.groups[g].m;
  }
  return off;
}

// dot[r] += Σ_j q[j·R + r] · cent[code_j] over `dim` codes of B bits at p (8 codes = B bytes).
// Reads up to 7 bytes past the codes (the tile buffer is padded).
template <int B, int R>
__device__ __forceinline__ void tq_dot_codes(const uint8_t* p, int dim, const float* cent, const float* q,
                                             float* dot) {
  constexpr unsigned mask = (1u << B) - 1u;
  for (int j0 = 0; j0 < dim; j0 += 8, p += B) {
    unsigned long long w = 0;
#pragma unroll
    for (int k = 0; k < B; ++k) w |= (unsigned long long)p[k] << (8 * k);
    const int n = min(8, dim - j0);
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      if (u < n) {
        const float c = cent[(w >> (u * B)) & mask];
        const float* qj = q + (j0 + u) * R;
#pragma unroll
        for (int r = 0; r < R; ++r) dot[r] = fmaf(qj[r], c, dot[r]);
      }
    }
  }
}

template <int R>
__device__ __forceinline__ void tq_dot_codes_any(int bits, const uint8_t* p, int dim, const float* cent,
                                                 const float* q, float* dot) {
  switch (bits) {
    case 1: tq_dot_codes<1, R>(p, dim, cent, q, dot); break;
    case 2: tq_dot_codes<2, R>(p, dim, cent, q, dot); break;
    case 3: tq_dot_codes<3, R>(p, dim, cent, q, dot); break;
    case 4: tq_dot_codes<4, R>(p, dim, cent, q, dot); break;
    case 5: tq_dot_codes<5, R>(p, dim, cent, q, dot); break;
    case 6: tq_dot_codes<6, R>(p, dim, cent, q, dot); break;
    case 7: tq_dot_codes<7, R>(p, dim, cent, q, dot); break;
    default: tq_dot_codes<8, R>(p, dim, cent, q, dot); break;
  }
}

// One block: R query rows of one KV head against slots [s0, s0 + chunk) of one sequence, in
// tiles of `tt` slots with an online softmax; writes (acc, m, l) of each row to the workspace.
template <typename T, int R>
__global__ void __launch_bounds__(TQ_THREADS, (R >= 8 ? 3 : 6))
    tq_attn_split_kernel(const T* __restrict__ q, const uint8_t* __restrict__ kc, const uint8_t* __restrict__ vc,
                         const int* __restrict__ visible, const int* __restrict__ kch, const int* __restrict__ vch,
                         TqSpecs kss, TqSpecs vss, TqTiles rt, int Hq, int Hkv, int T_, int cap, int chunk,
                         int tiles, float scale, int lo, int splits, float* __restrict__ ws) {
  // Row r reads the records of slots lo..visible[r] (lo = the sink count with an exact part).
  // Variant m of the cycle: the query rotated by kss.v[m] at qr + m·Dk·R; the values of its
  // slots summed in virtual coordinates m·Dv + c.
  const int split = blockIdx.x, b = blockIdx.z;
  const int h = blockIdx.y / tiles, tile = blockIdx.y % tiles;
  const TqSpec& ks = kss.v[0];
  const TqSpec& vs = vss.v[0];
  const int M = kss.n;
  const int G = Hq / Hkv, d = ks.head_dim;
  constexpr int TILE = TqAttTile<R>::slots, REC = TqAttTile<R>::bytes;
  __shared__ __align__(16) float qr[2 * TQ_MAX_DIM * R];  // [coordinate][R] rotated/projected queries
  __shared__ __align__(16) uint32_t recs[2][REC / 4 + 4];
  __shared__ __align__(16) float sc[TILE * R];            // [slot][R] scores, then probabilities
  __shared__ __align__(16) float pw[4][TILE * R];         // [group·2 + sign][slot][R] value weights
  __shared__ float xs[TQ_MAX_DIM];
  __shared__ float kcent[2][256], vcent[2][256];
  __shared__ int vis[R];
  __shared__ float run_m[R], run_l[R], alpha[R];
  int kmo[2], kso[2], vmo[2], vso[2];
  const int Dk = tq_coord_offsets(ks, kmo, kso);
  const int Dv = tq_coord_offsets(vs, vmo, vso);
  const int s0 = split * chunk, first = max(s0, lo);
  const int rbk = ks.record_bytes, rbv = vs.record_bytes;

  for (int g = 0; g < ks.num_groups; ++g)
    if (ks.groups[g].mse_bits > 0)
      for (int i = threadIdx.x; i < (1 << ks.groups[g].mse_bits); i += blockDim.x) kcent[g][i] = ks.groups[g].centroids[i];
  for (int g = 0; g < vs.num_groups; ++g)
    if (vs.groups[g].mse_bits > 0)
      for (int i = threadIdx.x; i < (1 << vs.groups[g].mse_bits); i += blockDim.x) vcent[g][i] = vs.groups[g].centroids[i];
  if (threadIdx.x < R) {
    const int gr = tile * R + threadIdx.x;
    vis[threadIdx.x] = gr < G * T_ ? visible[b * T_ + gr / G] : 0;
    run_m[threadIdx.x] = -INFINITY;
    run_l[threadIdx.x] = 0.f;
  }
  for (int i = threadIdx.x; i < 2 * TQ_MAX_DIM * R; i += blockDim.x) qr[i] = 0.f;
  __syncthreads();

  // 1. Query rows: Π_g q_g per key group and (S_g Π_g q_g)/(mκ) per sketch, as
  //    qr[m·Dk + coord][r] for each variant m of the cycle.
  for (int r = 0; r < R; ++r) {
    if (vis[r] <= first) continue;  // uniform across the block
    const int gr = tile * R + r, t = gr / G, qh = h * G + gr % G;
    const long qoff = (((long)b * Hq + qh) * T_ + t) * d;
    const int* ch = kch + (long)h * d;
    for (int m = 0; m < M; ++m) {
      float* qm = qr + (long)m * Dk * R;
      int base = 0;
      for (int g = 0; g < ks.num_groups; ++g) {
        const TqGroup& kg = kss.v[m].groups[g];
        for (int j = threadIdx.x; j < kg.dim; j += blockDim.x) xs[j] = tq_load<T>(q, qoff + ch[base + j]);
        __syncthreads();
        __shared__ float rot[TQ_MAX_DIM];
        const float* src = xs;
        if (kg.mse_bits > 0) {
          tq_rotate(kg, xs, rot);
          src = rot;
          for (int j = threadIdx.x; j < kg.dim; j += blockDim.x) qm[(kmo[g] + j) * R + r] = rot[j];
        }
        for (int l = threadIdx.x; l < kg.m; l += blockDim.x) {
          float acc = 0.f;
          for (int j = 0; j < kg.dim; ++j) acc = fmaf(kg.sketch[(long)l * kg.dim + j], src[j], acc);
          qm[(kso[g] + l) * R + r] = acc * kg.qjl_scale;
        }
        __syncthreads();
        base += kg.dim;
      }
    }
  }

  int hi = 0;
  for (int r = 0; r < R; ++r) hi = max(hi, min(vis[r], s0 + chunk));
  // Slots per tile: what the record buffer holds, at most TQ_ATT_TILE.
  const int tt = max(1, min(TILE, REC / (rbk + rbv)));
  // Values: each thread owns up to 4 rotated value coordinates (Dv ≤ 4 · TQ_THREADS).
  float acc[4][R];
#pragma unroll
  for (int k = 0; k < 4; ++k)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[k][r] = 0.f;

  // 2. Stage tile 0; each iteration stages the next tile before computing its own.
  auto stage = [&](int buf, int t0) {
    const int n = min(tt, hi - t0);
    uint8_t* dst = reinterpret_cast<uint8_t*>(recs[buf]);
    auto copy = [](uint8_t* d, const uint8_t* s, int bytes) { tq_stage(d, s, bytes); };
    tq_stage_slots(dst, kc, rt, true, b, h, Hkv, cap, rbk, t0, n, copy);
    tq_stage_slots(dst + n * rbk, vc, rt, false, b, h, Hkv, cap, rbv, t0, n, copy);
  };
  if (first < hi) stage(0, first);
  __pipeline_commit();
  int cur = 0;
  for (int t0 = first; t0 < hi; t0 += tt, cur ^= 1) {
    const int n = min(tt, hi - t0);
    if (t0 + tt < hi) stage(cur ^ 1, t0 + tt);
    __pipeline_commit();
    __pipeline_wait_prior(1);
    __syncthreads();
    const uint8_t* krec = reinterpret_cast<const uint8_t*>(recs[cur]);
    const uint8_t* vrec = krec + n * rbk;
    // 3. Scores straight from the codes: two neighbouring threads per slot, each with half of
    //    every group's codes (and signs), summed by one shuffle.
    const int half = threadIdx.x & 1;
    for (int base = 0; base < n; base += blockDim.x >> 1) {
      const int i = base + (threadIdx.x >> 1);
      const bool valid = i < n;
      const uint8_t* rec = krec + (valid ? i : 0) * rbk;
      const float* qv = qr + (long)((t0 + i) % M) * Dk * R;  // this slot's variant
      float score[R];
#pragma unroll
      for (int r = 0; r < R; ++r) score[r] = 0.f;
      for (int g = 0; g < ks.num_groups && valid; ++g) {
        const TqGroup& kg = ks.groups[g];
        if (kg.mse_bits > 0) {
          const int split8 = 8 * (((kg.dim + 7) / 8) / 2);  // codes of half 0, a multiple of 8
          const int j0 = half ? split8 : 0, cnt = half ? kg.dim - split8 : split8;
          float dot[R];
#pragma unroll
          for (int r = 0; r < R; ++r) dot[r] = 0.f;
          if (cnt > 0)
            tq_dot_codes_any<R>(kg.mse_bits, rec + kg.codes_off + j0 / 8 * kg.mse_bits, cnt, kcent[g],
                                qv + (kmo[g] + j0) * R, dot);
          const float nn = tq_read_norm(rec, kg.norm_off, ks.norm_format);
#pragma unroll
          for (int r = 0; r < R; ++r) score[r] = fmaf(nn, dot[r], score[r]);
        }
        if (kg.m > 0) {
          float dot[R];
#pragma unroll
          for (int r = 0; r < R; ++r) dot[r] = 0.f;
          const int l0 = half ? kg.m / 2 : 0, l1 = half ? kg.m : kg.m / 2;
          for (int l = l0; l < l1; ++l) {
            const bool z = (rec[kg.signs_off + (l >> 3)] >> (l & 7)) & 1u;
#pragma unroll
            for (int r = 0; r < R; ++r) dot[r] += z ? qv[(kso[g] + l) * R + r] : -qv[(kso[g] + l) * R + r];
          }
          const float gam = tq_read_norm(rec, kg.gamma_off, ks.norm_format);
#pragma unroll
          for (int r = 0; r < R; ++r) score[r] = fmaf(gam, dot[r], score[r]);
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) score[r] += __shfl_xor_sync(0xffffffffu, score[r], 1);
      if (valid && half == 0)
#pragma unroll
        for (int r = 0; r < R; ++r) sc[i * R + r] = (t0 + i < vis[r]) ? score[r] * scale : -INFINITY;
    }
    __syncthreads();
    // 4. Online softmax statistics.
    tq_online_softmax<R>(sc, n, run_m, run_l, alpha);
    // 5. Value weights per slot: p·n for MSE coordinates, p·γ for sign coordinates.
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const uint8_t* rec = vrec + i * rbv;
      for (int g = 0; g < vs.num_groups; ++g) {
        const TqGroup& vg = vs.groups[g];
        const float nn = vg.mse_bits > 0 ? tq_read_norm(rec, vg.norm_off, vs.norm_format) : 0.f;
        const float gam = vg.m > 0 ? tq_read_norm(rec, vg.gamma_off, vs.norm_format) : 0.f;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          pw[2 * g][i * R + r] = sc[i * R + r] * nn;
          pw[2 * g + 1][i * R + r] = sc[i * R + r] * gam;
        }
      }
    }
    __syncthreads();
    // 6. Values in the rotated domain, each thread its (virtual) coordinates vc = m·Dv + c:
    //    coordinate c of variant m sums the slots written with variant m.
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int vc = threadIdx.x + k * TQ_THREADS;
      if (vc >= M * Dv) break;
      const int m = vc / Dv, c = vc % Dv;
      const int i0 = ((m - t0 % M) % M + M) % M;  // first slot of the tile written with variant m
#pragma unroll
      for (int r = 0; r < R; ++r) acc[k][r] *= alpha[r];
      int g = 0;
      bool sign = false;
      for (int gg = 0; gg < vs.num_groups; ++gg) {
        if (vs.groups[gg].mse_bits > 0 && c >= vmo[gg] && c < vmo[gg] + vs.groups[gg].dim) g = gg;
        if (c >= vso[gg] && c < vso[gg] + vs.groups[gg].m) {
          g = gg;
          sign = true;
        }
      }
      const TqGroup& vg = vs.groups[g];
      const float* w = pw[2 * g + (sign ? 1 : 0)];
      if (!sign) {
        const int j = c - vmo[g], bits = vg.mse_bits;
        const int bit = j * bits, byte = vg.codes_off + (bit >> 3), shift = bit & 7;
        const unsigned msk = (1u << bits) - 1u;
        const float* cent = vcent[g];
        for (int i = i0; i < n; i += M) {
          const uint8_t* p = vrec + i * rbv + byte;
          const unsigned word = (unsigned)p[0] | ((unsigned)p[1] << 8);
          const float x = cent[(word >> shift) & msk];
#pragma unroll
          for (int r = 0; r < R; ++r) acc[k][r] = fmaf(w[i * R + r], x, acc[k][r]);
        }
      } else {
        const int l = c - vso[g];
        const int byte = vg.signs_off + (l >> 3), shift = l & 7;
        for (int i = i0; i < n; i += M) {
          const bool z = (vrec[i * rbv + byte] >> shift) & 1u;
#pragma unroll
          for (int r = 0; r < R; ++r) acc[k][r] += z ? w[i * R + r] : -w[i * R + r];
        }
      }
    }
    __syncthreads();
  }

  const int W = M * Dv;  // value coordinates of all variants
  const long wbase = ((((long)b * Hkv + h) * tiles + tile) * splits + split) * R * (W + 2);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int c = threadIdx.x + k * TQ_THREADS;
    if (c >= W) break;
#pragma unroll
    for (int r = 0; r < R; ++r) ws[wbase + (long)r * (W + 2) + c] = acc[k][r];
  }
  if (threadIdx.x < R) {
    ws[wbase + (long)threadIdx.x * (W + 2) + W] = run_m[threadIdx.x];
    ws[wbase + (long)threadIdx.x * (W + 2) + W + 1] = run_l[threadIdx.x];
  }
}

// Merges the splits of each row, adds the sketch term Sᵀ(Σ p γ z)/(mκ), un-rotates per value
// group and scatters to the head's channels. One block per (b, KV head, tile, row).
template <typename TO, int R>
__global__ void tq_attn_merge_kernel(const float* __restrict__ ws, const int* __restrict__ vch, TqSpecs vss,
                                     int Hq, int Hkv, int T_, int tiles, int splits, const int* __restrict__ status,
                                     TO* __restrict__ out) {
  const int b = blockIdx.y, r = blockIdx.x % R, h = blockIdx.x / R / tiles, tile = blockIdx.x / R % tiles;
  const TqSpec& vs = vss.v[0];
  const int NC = vss.n;  // variants of the cycle
  const int G = Hq / Hkv, d = vs.head_dim;
  __shared__ float acc[2 * TQ_MAX_DIM];
  __shared__ float xg[TQ_MAX_DIM], tmp[TQ_MAX_DIM], xsum[TQ_MAX_DIM];
  __shared__ float wsplit[1024];
  __shared__ float total;
  int vmo[2], vso[2];
  const int Dv = tq_coord_offsets(vs, vmo, vso);
  const int W = NC * Dv;
  const bool poisoned = *status != 0;
  {
    const int gr = tile * R + r;
    if (gr >= G * T_) return;
    const int t = gr / G, qh = h * G + gr % G;
    TO* o = out + (((long)b * Hq + qh) * T_ + t) * d;
    const long base = (((long)b * Hkv + h) * tiles + tile) * splits * R * (W + 2) + (long)r * (W + 2);
    const long stride = (long)R * (W + 2);
    // Split weights exp(m_s − M), in chunks of 1024 splits at most (the launcher checks).
    float M = -INFINITY;
    for (int s = 0; s < splits; ++s) M = fmaxf(M, ws[base + s * stride + W]);
    for (int s = threadIdx.x; s < splits; s += blockDim.x) {
      const float m = ws[base + s * stride + W];
      wsplit[s] = (M == -INFINITY || m == -INFINITY) ? 0.f : expf(m - M);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float L = 0.f;
      for (int s = 0; s < splits; ++s) L += wsplit[s] * ws[base + s * stride + W + 1];
      total = L;
    }
    __syncthreads();
    const float inv = total > 0.f ? 1.f / total : 0.f;
    for (int c = threadIdx.x; c < W; c += blockDim.x) {
      float a = 0.f;
      for (int s = 0; s < splits; ++s) a = fmaf(wsplit[s], ws[base + s * stride + c], a);
      acc[c] = a * inv;
    }
    __syncthreads();
    int chbase = 0;
    for (int g = 0; g < vs.num_groups; ++g) {
      const int gdim = vs.groups[g].dim;
      for (int j = threadIdx.x; j < gdim; j += blockDim.x) xsum[j] = 0.f;
      // Each variant's sums un-rotated with its own tables, then added up.
      for (int m = 0; m < NC; ++m) {
        const TqGroup& vg = vss.v[m].groups[g];
        const float* am = acc + m * Dv;
        for (int j = threadIdx.x; j < vg.dim; j += blockDim.x) {
          float x = vg.mse_bits > 0 ? am[vmo[g] + j] : 0.f;
          if (vg.m > 0) {
            float s = 0.f;
            for (int l = 0; l < vg.m; ++l) s = fmaf(vg.sketch[(long)l * vg.dim + j], am[vso[g] + l], s);
            x = fmaf(vg.qjl_scale, s, x);
          }
          tmp[j] = x;
        }
        __syncthreads();
        if (vg.mse_bits > 0) {
          tq_rotate_inverse(vg, tmp, xg);
        } else {
          for (int j = threadIdx.x; j < vg.dim; j += blockDim.x) xg[j] = tmp[j];
          __syncthreads();
        }
        for (int j = threadIdx.x; j < vg.dim; j += blockDim.x) xsum[j] += xg[j];
        __syncthreads();
      }
      for (int j = threadIdx.x; j < gdim; j += blockDim.x)
        tq_store<TO>(o, vch[(long)h * d + chbase + j], poisoned ? NAN : xsum[j]);
      __syncthreads();
      chbase += gdim;
    }
  }
}

// The merge in the output dtype (0 f32, 1 f16, 2 bf16): grid (Hkv · tiles · R, B).
template <int R>
static int tq_attn_merge_launch(const float* ws, const int* vch, const TqSpecs& vs, int Hq, int Hkv, int T_,
                                int tiles, int total, const int* status, void* out, int out_dtype, int B,
                                cudaStream_t stream) {
  const dim3 grid(Hkv * tiles * R, B);
  switch (out_dtype) {
    case 0: {
      auto k = tq_attn_merge_kernel<float, R>;
      TQ_LAUNCH(k, grid, TQ_THREADS, 0, stream, ws, vch, vs, Hq, Hkv, T_, tiles, total, status, (float*)out);
      break;
    }
    case 1: {
      auto k = tq_attn_merge_kernel<__half, R>;
      TQ_LAUNCH(k, grid, TQ_THREADS, 0, stream, ws, vch, vs, Hq, Hkv, T_, tiles, total, status, (__half*)out);
      break;
    }
    case 2: {
      auto k = tq_attn_merge_kernel<__nv_bfloat16, R>;
      TQ_LAUNCH(k, grid, TQ_THREADS, 0, stream, ws, vch, vs, Hq, Hkv, T_, tiles, total, status,
                (__nv_bfloat16*)out);
      break;
    }
    default:
      return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

// After a split kernel has written its splits: the exact part's splits (blocks of RX ≤ 16 rows
// of each row tile of RT rows; on tensor cores with TC where head_dim allows) and the merge, in
// the output dtype.
template <typename T, int RT, bool TC = false>
static int tq_attn_finish(const void* q, const int* visible, const TqExact* exact, const int* vch,
                          const TqSpecs& vs, int B, int Hq, int Hkv, int T_, int tiles, int splits, float scale,
                          float* ws, const int* status, void* out, int out_dtype, cudaStream_t stream) {
  constexpr int RX = RT < 16 ? RT : 16;
  const int total = splits + (exact ? exact->splits : 0);
  if (exact) {
    int code = -1;
    if (TC) {
      switch (vs.v[0].head_dim) {
        case 64: code = tq_tc_exact_launch<T, 64, RX>(q, visible, *exact, vch, vs, B, Hq, Hkv, T_, tiles, splits, total, scale, RT, ws, stream); break;
        case 96: code = tq_tc_exact_launch<T, 96, RX>(q, visible, *exact, vch, vs, B, Hq, Hkv, T_, tiles, splits, total, scale, RT, ws, stream); break;
        case 128: code = tq_tc_exact_launch<T, 128, RX>(q, visible, *exact, vch, vs, B, Hq, Hkv, T_, tiles, splits, total, scale, RT, ws, stream); break;
        case 256: code = tq_tc_exact_launch<T, 256, RX>(q, visible, *exact, vch, vs, B, Hq, Hkv, T_, tiles, splits, total, scale, RT, ws, stream); break;
        default: break;
      }
    }
    if (code < 0) {
      auto k = tq_attn_exact_kernel<T, RX>;
      TQ_LAUNCH(k, dim3(exact->splits, Hkv * tiles * (RT / RX), B), TQ_THREADS, 0, stream, (const T*)q, visible,
                *exact, vch, vs, Hq, Hkv, T_, tiles, splits, total, scale, RT, ws);
      code = (int)cudaGetLastError();
    }
    if (code != 0) return code;
  }
  return tq_attn_merge_launch<RT>(ws, vch, vs, Hq, Hkv, T_, tiles, total, status, out, out_dtype, B, stream);
}

// The rotated queries of the tensor-core kernels: MR mma rows per row tile of RT query rows, RW
// query rows per 16-row group, into the f16 area after the float workspace.
template <typename T>
static int tq_tc_queries(const void* q, const int* kch, const TqSpecs& ks, int B, int Hq, int Hkv, int T_,
                         int tiles, int MR, int RW, int RT, __half* qt, cudaStream_t stream) {
  auto k = tq_tc_query_kernel<T>;
  TQ_LAUNCH(k, dim3(Hkv * tiles, B), TQ_THREADS, 0, stream, (const T*)q, kch, ks, Hq, Hkv, T_, tiles, MR, RW, RT,
            qt);
  return (int)cudaGetLastError();
}

template <typename T, int R>
static int tq_attn_launch(const void* q, const uint8_t* kc, const uint8_t* vc, const int* visible, const int* kch,
                          const int* vch, const TqSpecs& ks, const TqSpecs& vs, const TqTiles& tt, int B, int Hq,
                          int Hkv, int T_, int cap, float scale, int splits, int chunk, const TqExact* exact,
                          float* ws, const int* status, void* out, int out_dtype, cudaStream_t stream) {
  const int tiles = (Hq / Hkv * T_ + R - 1) / R;
  const int total = splits + (exact ? exact->splits : 0);
  // With an exact part, the records end at each row's packed_end and start after the sinks.
  auto k = tq_attn_split_kernel<T, R>;
  TQ_LAUNCH(k, dim3(splits, Hkv * tiles, B), TQ_THREADS, 0, stream, (const T*)q, kc, vc,
            exact ? exact->packed_end : visible, kch, vch, ks, vs, tt, Hq, Hkv, T_, cap, chunk, tiles, scale,
            exact ? exact->sinks : 0, total, ws);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return (int)e;
  return tq_attn_finish<T, R>(q, visible, exact, vch, vs, B, Hq, Hkv, T_, tiles, splits, scale, ws, status, out,
                              out_dtype, stream);
}

// The tensor-core path: queries rotated once, the 16-row tensor-core split kernel, the exact
// part and the merge as above.
template <typename T, int R, int D>
static int tq_tc_launch(const void* q, const uint8_t* kc, const uint8_t* vc, const int* visible, const int* kch,
                        const int* vch, const TqSpecs& ks, const TqSpecs& vs, const TqTiles& tt, int B, int Hq,
                        int Hkv, int T_, int cap, float scale, int splits, int chunk, const TqExact* exact,
                        float* ws, long ws_floats, const int* status, void* out, int out_dtype,
                        cudaStream_t stream) {
  const int tiles = (Hq / Hkv * T_ + R - 1) / R;
  const int total = splits + (exact ? exact->splits : 0);
  __half* qt = reinterpret_cast<__half*>(ws + ws_floats);
  int code = tq_tc_queries<T>(q, kch, ks, B, Hq, Hkv, T_, tiles, TQ_TC_ROWS, R, R, qt, stream);
  if (code != 0) return code;
  code = tq_tc_split_launch<D, R>(qt, kc, vc, exact ? exact->packed_end : visible, ks, vs, tt, B, Hq, Hkv, T_, cap,
                                  chunk, tiles, scale, exact ? exact->sinks : 0, splits, total, ws, stream);
  if (code != 0) return code;
  return tq_attn_finish<T, R, true>(q, visible, exact, vch, vs, B, Hq, Hkv, T_, tiles, splits, scale, ws, status,
                                    out, out_dtype, stream);
}

// The tensor-core path for many query rows (tc_prefill.cuh): row tiles of RB = 64 / M query
// rows, queries rotated into 64 mma rows, the rows kernel, the exact part in blocks of 16 rows
// of a tile, the merge.
template <typename T, int D, int M>
static int tq_tc_rows_launch(const void* q, const uint8_t* kc, const uint8_t* vc, const int* visible,
                             const int* kch, const int* vch, const TqSpecs& ks, const TqSpecs& vs,
                             const TqTiles& tt, int B, int Hq, int Hkv, int T_, int cap, float scale, int splits,
                             int chunk, const TqExact* exact, float* ws, long ws_floats, const int* status,
                             void* out, int out_dtype, cudaStream_t stream) {
  constexpr int RB = 64 / M;
  const int tiles = (Hq / Hkv * T_ + RB - 1) / RB;
  const int total = splits + (exact ? exact->splits : 0);
  __half* qt = reinterpret_cast<__half*>(ws + ws_floats);
  int code = tq_tc_queries<T>(q, kch, ks, B, Hq, Hkv, T_, tiles, 64, 16 / M, RB, qt, stream);
  if (code != 0) return code;
  code = tq_tc_rows_split_launch<D, M>(qt, kc, vc, exact ? exact->packed_end : visible, ks, vs, tt, B, Hq, Hkv, T_,
                                       cap, chunk, tiles, scale, exact ? exact->sinks : 0, splits, total, ws, stream);
  if (code != 0) return code;
  return tq_attn_finish<T, RB, true>(q, visible, exact, vch, vs, B, Hq, Hkv, T_, tiles, splits, scale, ws, status,
                                     out, out_dtype, stream);
}

// Query rows per row tile for `rows` query rows per KV head (G · T), a cycle of `cycle`
// rotations and head_dim d: kernel 0, the smallest power of two ≥ rows, ≤ 8; kernel 1, 64 /
// cycle where the rows kernel takes the shape (tq_tc_rows_fit), else the smallest power of two
// ≥ rows with rows · cycle ≤ 16. 0 for an unknown kernel.
extern "C" int tqkv_decode_attention_rows(int kernel, int rows, int cycle, int d) {
  if (kernel == 0) return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : 8;
  if (kernel == 1) return tq_tc_rows_fit(rows, cycle, d) ? 64 / cycle : tq_tc_rows(rows, cycle);
  return 0;
}

// Largest chunk (slots per split): any length works (online softmax within a split); chunks
// of kernel 1 must be multiples of 64 (its tiles).
extern "C" int tqkv_decode_attention_max_chunk(int rows) {
  (void)rows;
  return 1 << 30;
}

// Whether `kernel` handles this layout and cycle (1) or not (0): kernel 0 any layout the
// launcher accepts, kernel 1 what tq_tc_supports says.
extern "C" int tqkv_decode_attention_supported(int kernel, const TqSpec* ks, const TqSpec* vs, int cycle) {
  if (kernel == 0) return 1;
  if (kernel == 1) return tq_tc_supports(*ks, *vs, cycle) ? 1 : 0;
  return 0;
}

// The workspace in floats: B · Hkv · tiles · splits · R · (cycle · Dv + 2) (splits: all of
// them, those of the exact part included); kernel 1 adds its f16 query rows
// [B, Hkv, tiles, 16, head_dim] after those (rounded up to whole floats, 16-byte aligned).
static long tq_attn_ws_floats(const TqSpec* vs, int cycle, int R, int B, int Hq, int Hkv, int T, int splits) {
  int Dv = 0;
  for (int g = 0; g < vs->num_groups; ++g) Dv += (vs->groups[g].mse_bits > 0 ? vs->groups[g].dim : 0) + vs->groups[g].m;
  const long tiles = (Hq / Hkv * T + R - 1) / R;
  return ((long)B * Hkv * tiles * splits * R * ((long)cycle * Dv + 2) + 3) / 4 * 4;
}

extern "C" long tqkv_decode_attention_workspace(int kernel, const TqSpec* vs, int cycle, int B, int Hq, int Hkv,
                                                int T, int splits) {
  const int R = tqkv_decode_attention_rows(kernel, Hq / Hkv * T, cycle, vs->head_dim);
  if (R == 0 || Hkv <= 0) return -1;
  const long base = tq_attn_ws_floats(vs, cycle, R, B, Hq, Hkv, T, splits);
  if (kernel == 0) return base;
  const long tiles = (Hq / Hkv * T + R - 1) / R;
  const int mr = tq_tc_rows_fit(Hq / Hkv * T, cycle, vs->head_dim) ? 64 : TQ_TC_ROWS;
  return base + ((long)B * Hkv * tiles * TQ_TC_QTERMS * mr * vs->head_dim + 1) / 2;
}

// ks, vs: `cycle` specs each (1..=TQ_MAX_CYCLE; slot s was written with variant s % cycle).
// kernel: 0 the CUDA-core split kernel, 1 the tensor-core one; tiles: null (the contiguous
// layout) or a tile table. workspace: tqkv_decode_attention_workspace floats;
// out in out_dtype (0 f32, 1 f16, 2 bf16), every element written.
extern "C" int tqkv_decode_attention(int kernel, const void* q, int q_dtype, const uint8_t* kcache,
                                     const uint8_t* vcache, const int* visible, const int* kch, const int* vch,
                                     const TqSpec* ks, const TqSpec* vs, int cycle, int B, int Hq, int Hkv, int T,
                                     int cap, const TqTiles* tiles, float scale, int splits, int chunk,
                                     const TqExact* exact, float* workspace, const int* status, void* out,
                                     int out_dtype, cudaStream_t stream) {
  TqSpecs kss, vss;
  if (!tq_specs(ks, cycle, &kss) || !tq_specs(vs, cycle, &vss)) return (int)cudaErrorInvalidValue;
  if (ks->head_dim != vs->head_dim || ks->head_dim > TQ_MAX_DIM || Hkv <= 0 || Hq % Hkv != 0)
    return (int)cudaErrorInvalidValue;
  if (kernel != 0 && kernel != 1) return (int)cudaErrorInvalidValue;
  if (out_dtype < 0 || out_dtype > 2) return (int)cudaErrorInvalidValue;
  if (kernel == 1 && (!tq_tc_supports(*ks, *vs, cycle) || chunk % TQ_TC_TILE != 0)) return (int)cudaErrorInvalidValue;
  if (tiles && (!tiles->table || tiles->per_seq < 1 || tiles->slots < 1)) return (int)cudaErrorInvalidValue;
  const TqSpec* both[2] = {ks, vs};
  for (const TqSpec* s : both) {
    if (s->num_groups < 1 || s->num_groups > 2) return (int)cudaErrorInvalidValue;
    int coords = 0;
    for (int g = 0; g < s->num_groups; ++g) {
      if (s->groups[g].dim > TQ_MAX_DIM || s->groups[g].m > TQ_MAX_DIM || s->groups[g].mse_bits > 8)
        return (int)cudaErrorInvalidValue;
      coords += (s->groups[g].mse_bits > 0 ? s->groups[g].dim : 0) + s->groups[g].m;
    }
    // The rotated query rows of every variant share qr[2·TQ_MAX_DIM·R]; the value sums of every
    // variant: 4 coordinates per thread and the merge's acc[2·TQ_MAX_DIM].
    if (cycle * coords > 2 * TQ_MAX_DIM) return (int)cudaErrorInvalidValue;
  }
  const int R = tqkv_decode_attention_rows(kernel, Hq / Hkv * T, cycle, vs->head_dim);
  if (splits < 1 || splits > 1024 || chunk < 1) return (int)cudaErrorInvalidValue;
  if (exact) {
    // The exact part's values enter the merge through the MSE coordinates of each value group.
    const bool fmt = exact->format == 0 || (exact->format == 1 && ks->head_dim % 32 == 0);
    const long row = 2L * (exact->format == 0 ? 2 * ks->head_dim : ks->head_dim + ks->head_dim / 16);
    if (!fmt || !exact->base || !exact->table || !exact->packed_end || exact->per_seq < 1 || exact->rows < 1 ||
        exact->heads != Hkv || exact->tile_bytes < exact->rows * Hkv * row || exact->tile_bytes % 16 != 0 ||
        exact->sinks < 0 || exact->splits < 1 || splits + exact->splits > 1024)
      return (int)cudaErrorInvalidValue;
    for (int g = 0; g < vs->num_groups; ++g)
      if (vs->groups[g].mse_bits == 0) return (int)cudaErrorInvalidValue;
  }
  // Staged records: one slot of keys + values must fit the tile buffer.
  if (ks->record_bytes + vs->record_bytes > TQ_ATT_REC_BYTES_MIN) return (int)cudaErrorInvalidValue;
  if (B == 0 || T == 0) return 0;
  const TqTiles tt = tiles ? *tiles : TqTiles{nullptr, 0, 0, 0, 0, 0, 0};
  if (kernel == 1) {
    const int total = splits + (exact ? exact->splits : 0);
    const long wsf = tq_attn_ws_floats(vs, cycle, R, B, Hq, Hkv, T, total);
#define TQ_TC_CASE(TY, RR, DD)                                                                                     \
  return tq_tc_launch<TY, RR, DD>(q, kcache, vcache, visible, kch, vch, kss, vss, tt, B, Hq, Hkv, T, cap, scale,  \
                                  splits, chunk, exact, workspace, wsf, status, out, out_dtype, stream)
#define TQ_TC_DIMS(TY, RR)                     \
  switch (ks->head_dim) {                      \
    case 64: TQ_TC_CASE(TY, RR, 64);           \
    case 96: TQ_TC_CASE(TY, RR, 96);           \
    case 128: TQ_TC_CASE(TY, RR, 128);         \
    case 256: TQ_TC_CASE(TY, RR, 256);         \
    default: return (int)cudaErrorInvalidValue; \
  }
#define TQ_TC_ROWS_(TY)               \
  switch (R) {                        \
    case 1: TQ_TC_DIMS(TY, 1)         \
    case 2: TQ_TC_DIMS(TY, 2)         \
    case 4: TQ_TC_DIMS(TY, 4)         \
    case 8: TQ_TC_DIMS(TY, 8)         \
    case 16: TQ_TC_DIMS(TY, 16)       \
    default: return (int)cudaErrorInvalidValue; \
  }
    if (tq_tc_rows_fit(Hq / Hkv * T, cycle, ks->head_dim)) {
#define TQ_TCR_CASE(TY, DD, MM)                                                                                  \
  return tq_tc_rows_launch<TY, DD, MM>(q, kcache, vcache, visible, kch, vch, kss, vss, tt, B, Hq, Hkv, T, cap,     \
                                       scale, splits, chunk, exact, workspace, wsf, status, out, out_dtype, stream)
#define TQ_TCR_CYCLE(TY, DD)                     \
  switch (cycle) {                               \
    case 1: TQ_TCR_CASE(TY, DD, 1);              \
    case 2: TQ_TCR_CASE(TY, DD, 2);              \
    case 4: TQ_TCR_CASE(TY, DD, 4);              \
    default: return (int)cudaErrorInvalidValue;  \
  }
#define TQ_TCR_DIMS(TY)                          \
  switch (ks->head_dim) {                        \
    case 64: TQ_TCR_CYCLE(TY, 64)                \
    case 96: TQ_TCR_CYCLE(TY, 96)                \
    case 128: TQ_TCR_CYCLE(TY, 128)              \
    default: return (int)cudaErrorInvalidValue;  \
  }
      switch (q_dtype) {
        case 0: TQ_TCR_DIMS(float)
        case 1: TQ_TCR_DIMS(__half)
        case 2: TQ_TCR_DIMS(__nv_bfloat16)
        default: return (int)cudaErrorInvalidValue;
      }
#undef TQ_TCR_DIMS
#undef TQ_TCR_CYCLE
#undef TQ_TCR_CASE
    }
    switch (q_dtype) {
      case 0: TQ_TC_ROWS_(float)
      case 1: TQ_TC_ROWS_(__half)
      case 2: TQ_TC_ROWS_(__nv_bfloat16)
      default: return (int)cudaErrorInvalidValue;
    }
#undef TQ_TC_ROWS_
#undef TQ_TC_DIMS
#undef TQ_TC_CASE
  }
#define TQ_ATT_CASE(TY, RR)                                                                                       \
  return tq_attn_launch<TY, RR>(q, kcache, vcache, visible, kch, vch, kss, vss, tt, B, Hq, Hkv, T, cap, scale, \
                                splits, chunk, exact, workspace, status, out, out_dtype, stream)
#define TQ_ATT_ROWS(TY)      \
  switch (R) {               \
    case 1: TQ_ATT_CASE(TY, 1); \
    case 2: TQ_ATT_CASE(TY, 2); \
    case 4: TQ_ATT_CASE(TY, 4); \
    default: TQ_ATT_CASE(TY, 8); \
  }
  switch (q_dtype) {
    case 0: TQ_ATT_ROWS(float)
    case 1: TQ_ATT_ROWS(__half)
    case 2: TQ_ATT_ROWS(__nv_bfloat16)
    default: return (int)cudaErrorInvalidValue;
  }
#undef TQ_ATT_ROWS
#undef TQ_ATT_CASE
}
