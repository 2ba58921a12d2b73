// quantize-append: new keys or values → TurboQuant records written at the cache's write
// positions, in one pass (rotation, norm, codes, packing, QJL signs and residual norm).
// The CPU reference is tqkv::VectorQuantizer::quantize (src/quantizer.rs).
//
// Layouts (row-major, contiguous):
//   x        [B, H, T, head_dim]  f32 / f16 / bf16 (x_dtype 0 / 1 / 2)
//   cache    [B, H, cap, record_bytes] u8, or with a tile table (tile_table.cuh; its k_tile and
//            k_head describe the part written: keys or values) the part's base in an arena
//   start    [B] int  first slot written in sequence b
//   new_lens [B] int  real tokens of sequence b (tokens t ≥ new_lens[b] are padding: skipped)
//   channels [H, head_dim] int  per-head channel order (group 0, then group 1)
//   specs    `cycle` specs (1..=TQ_MAX_CYCLE): slot s is written with specs[s % cycle]
//   status   [1] int  set to TQ_NONFINITE_INPUT / TQ_NORM_OVERFLOW on bad input (else untouched)
// Grid (T, H, B), TQ_THREADS threads; one block per vector.
#include "tqkv_common.cuh"
#include "tile_table.cuh"

template <typename T>
__global__ void tq_quantize_append_kernel(const T* __restrict__ x, uint8_t* __restrict__ cache,
                                          const int* __restrict__ start, const int* __restrict__ new_lens,
                                          const int* __restrict__ channels, TqSpecs specs, TqTiles tt, int H,
                                          int T_, int cap, int* status) {
  const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  if (t >= new_lens[b]) return;
  const TqSpec& spec = specs.v[(start[b] + t) % specs.n];
  const int d = spec.head_dim;
  __shared__ float xs[TQ_MAX_DIM];
  __shared__ float xg[TQ_MAX_DIM];
  __shared__ float rot[TQ_MAX_DIM];
  __shared__ int codes[TQ_MAX_DIM];
  __shared__ float stored_norm, exact_norm;
  const long xoff = (((long)b * H + h) * T_ + t) * d;
  int bad = 0;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float v = tq_load<T>(x, xoff + i);
    bad |= !isfinite(v);
    xs[i] = v;
  }
  if (__syncthreads_or(bad)) {
    if (threadIdx.x == 0) atomicCAS(status, TQ_OK, TQ_NONFINITE_INPUT);
    return;
  }
  uint8_t* rec = cache + tq_slot_offset(tt, true, b, h, H, cap, spec.record_bytes, start[b] + t);
  for (int i = threadIdx.x; i < spec.record_bytes; i += blockDim.x) rec[i] = 0;
  __syncthreads();
  const int* ch = channels + (long)h * d;
  int base = 0;
  for (int gi = 0; gi < spec.num_groups; ++gi) {
    const TqGroup& g = spec.groups[gi];
    for (int j = threadIdx.x; j < g.dim; j += blockDim.x) xg[j] = xs[ch[base + j]];
    __syncthreads();
    // The vector the sketch acts on: the rotated residual, or x_g without an MSE stage.
    float* resid = xg;
    if (g.mse_bits > 0) {
      tq_rotate(g, xg, rot);
      float n2 = 0.f;
      for (int i = threadIdx.x; i < g.dim; i += blockDim.x) n2 += rot[i] * rot[i];
      n2 = tq_block_sum(n2);
      // Codes are of y = rot / n with the unrounded n, as on the CPU.
      if (threadIdx.x == 0) exact_norm = sqrtf(n2);
      __syncthreads();
      const float n = exact_norm;
      const float inv = n > 0.f ? 1.f / n : 0.f;
      const int nb = (1 << g.mse_bits) - 1;
      for (int i = threadIdx.x; i < g.dim; i += blockDim.x) {
        float y = rot[i] * inv;
        int idx = 0;
        for (int k = 0; k < nb; ++k) idx += (y > g.boundaries[k]) ? 1 : 0;
        codes[i] = idx;
      }
      // The stored norm: n, the projected norm n² / ⟨rot, c⟩ or the least-squares norm
      // ⟨rot, c⟩ / ⟨c, c⟩ (both sums positive unless x = 0). (spec.norm_rule is uniform over
      // the block: every thread reaches the block sums.)
      float proj = 0.f, cc = 0.f;
      if (spec.norm_rule != TQ_NORM_EXACT) {
        for (int i = threadIdx.x; i < g.dim; i += blockDim.x) {
          const float c = g.centroids[codes[i]];
          proj = fmaf(rot[i], c, proj);
          cc = fmaf(c, c, cc);
        }
        proj = tq_block_sum(proj);
        if (spec.norm_rule == TQ_NORM_LEAST_SQUARES) cc = tq_block_sum(cc);
      }
      if (threadIdx.x == 0) {
        float nstore = n;
        if (spec.norm_rule == TQ_NORM_PROJECTED && proj > 0.f) nstore = n * n / proj;
        if (spec.norm_rule == TQ_NORM_LEAST_SQUARES && proj > 0.f && cc > 0.f) nstore = proj / cc;
        stored_norm = tq_write_norm(rec, g.norm_off, spec.norm_format, nstore, status);
      }
      __syncthreads();
      const int nbytes = (g.dim * g.mse_bits + 7) / 8;
      for (int k = threadIdx.x; k < nbytes; k += blockDim.x) {
        unsigned v = 0;
        for (int bit = 0; bit < 8; ++bit) {
          int pos = 8 * k + bit;
          if (pos < g.dim * g.mse_bits) v |= ((codes[pos / g.mse_bits] >> (pos % g.mse_bits)) & 1u) << bit;
        }
        rec[g.codes_off + k] = (uint8_t)v;
      }
      if (g.m > 0) {
        for (int i = threadIdx.x; i < g.dim; i += blockDim.x) rot[i] -= stored_norm * g.centroids[codes[i]];
        __syncthreads();
        resid = rot;
      }
    }
    if (g.m > 0) {
      float r2 = 0.f;
      for (int i = threadIdx.x; i < g.dim; i += blockDim.x) r2 += resid[i] * resid[i];
      r2 = tq_block_sum(r2);
      if (threadIdx.x == 0) {
        tq_write_norm(rec, g.gamma_off, spec.norm_format, sqrtf(r2), status);
      }
      const int nbytes = (g.m + 7) / 8;
      for (int k = threadIdx.x; k < nbytes; k += blockDim.x) {
        unsigned v = 0;
        for (int bit = 0; bit < 8 && 8 * k + bit < g.m; ++bit) {
          const float* row = g.sketch + (long)(8 * k + bit) * g.dim;
          float acc = 0.f;
          for (int j = 0; j < g.dim; ++j) acc = fmaf(row[j], resid[j], acc);
          v |= (acc >= 0.f ? 1u : 0u) << bit;
        }
        rec[g.signs_off + k] = (uint8_t)v;
      }
    }
    __syncthreads();
    base += g.dim;
  }
}

// tiles: null (the contiguous layout, `cap` slots) or a tile table for the part written.
extern "C" int tqkv_quantize_append(const void* x, int x_dtype, uint8_t* cache, const int* start,
                                    const int* new_lens, const int* channels, const TqSpec* spec, int cycle,
                                    int B, int H, int T, int cap, const TqTiles* tiles, int* status,
                                    cudaStream_t stream) {
  TqSpecs specs;
  if (!tq_specs(spec, cycle, &specs)) return (int)cudaErrorInvalidValue;
  if (spec->head_dim > TQ_MAX_DIM || spec->num_groups < 1 || spec->num_groups > 2) return (int)cudaErrorInvalidValue;
  for (int g = 0; g < spec->num_groups; ++g)
    if (spec->groups[g].dim > TQ_MAX_DIM || spec->groups[g].m > TQ_MAX_DIM) return (int)cudaErrorInvalidValue;
  if (tiles && (!tiles->table || tiles->per_seq < 1 || tiles->slots < 1)) return (int)cudaErrorInvalidValue;
  if (B == 0 || H == 0 || T == 0) return 0;
  const TqTiles tt = tiles ? *tiles : TqTiles{nullptr, 0, 0, 0, 0, 0, 0};
  dim3 grid(T, H, B);
  switch (x_dtype) {
    case 0:
      {
      auto k = tq_quantize_append_kernel<float>;
      TQ_LAUNCH(k, grid, TQ_THREADS, 0, stream, (const float*)x, cache, start, new_lens, channels, specs, tt, H, T, cap, status);
    }
      break;
    case 1:
      {
      auto k = tq_quantize_append_kernel<__half>;
      TQ_LAUNCH(k, grid, TQ_THREADS, 0, stream, (const __half*)x, cache, start, new_lens, channels, specs, tt, H, T, cap, status);
    }
      break;
    case 2:
      {
      auto k = tq_quantize_append_kernel<__nv_bfloat16>;
      TQ_LAUNCH(k, grid, TQ_THREADS, 0, stream, (const __nv_bfloat16*)x, cache, start, new_lens, channels, specs, tt, H, T, cap, status);
    }
      break;
    default:
      return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}
