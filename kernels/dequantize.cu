// dequantize: TurboQuant records → vectors (f32 / f16 / bf16), per group
// x_g = Π_gᵀ (n·c[idx] + γ/(mκ)·S_gᵀ z), scattered to the head's channels.
// The CPU reference is tqkv::VectorQuantizer::dequantize (src/quantizer.rs).
//
// Layouts (row-major, contiguous):
//   cache    [B, H, cap, record_bytes] u8, or with a tile table (tile_table.cuh; k_tile and
//            k_head describe the part read) the part's base in an arena
//   out      [B, H, n, head_dim]  (out_dtype 0 f32, 1 f16, 2 bf16): slots 0..n of each (b, h)
//   channels [H, head_dim] int
//   specs    `cycle` specs: slot s was written with specs[s % cycle]
// Grid (n, H, B), TQ_THREADS threads; one block per record.
#include "tqkv_common.cuh"
#include "tile_table.cuh"

template <typename T>
__global__ void tq_dequantize_kernel(const uint8_t* __restrict__ cache, T* __restrict__ out,
                                     const int* __restrict__ channels, TqSpecs specs, TqTiles tt, int H, int cap,
                                     int n) {
  const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const TqSpec& spec = specs.v[t % specs.n];
  const int d = spec.head_dim;
  __shared__ float acc[TQ_MAX_DIM];
  __shared__ float xg[TQ_MAX_DIM];
  __shared__ float z[TQ_MAX_DIM];
  const uint8_t* rec = cache + tq_slot_offset(tt, true, b, h, H, cap, spec.record_bytes, t);
  T* o = out + (((long)b * H + h) * n + t) * d;
  const int* ch = channels + (long)h * d;
  int base = 0;
  for (int gi = 0; gi < spec.num_groups; ++gi) {
    const TqGroup& g = spec.groups[gi];
    for (int i = threadIdx.x; i < g.dim; i += blockDim.x) acc[i] = 0.f;
    if (g.m > 0)
      for (int l = threadIdx.x; l < g.m; l += blockDim.x) z[l] = tq_code_at(rec + g.signs_off, l, 1) ? 1.f : -1.f;
    __syncthreads();
    if (g.m > 0) {
      const float a = tq_read_norm(rec, g.gamma_off, spec.norm_format) * g.qjl_scale;
      for (int i = threadIdx.x; i < g.dim; i += blockDim.x) {
        float s = 0.f;
        for (int l = 0; l < g.m; ++l) s = fmaf(g.sketch[(long)l * g.dim + i], z[l], s);
        acc[i] = a * s;
      }
    }
    if (g.mse_bits > 0) {
      const float nrm = tq_read_norm(rec, g.norm_off, spec.norm_format);
      for (int i = threadIdx.x; i < g.dim; i += blockDim.x)
        acc[i] += nrm * g.centroids[tq_code_at(rec + g.codes_off, i, g.mse_bits)];
      __syncthreads();
      tq_rotate_inverse(g, acc, xg);
    } else {
      __syncthreads();
      for (int i = threadIdx.x; i < g.dim; i += blockDim.x) xg[i] = acc[i];
      __syncthreads();
    }
    for (int j = threadIdx.x; j < g.dim; j += blockDim.x) tq_store<T>(o, ch[base + j], xg[j]);
    __syncthreads();
    base += g.dim;
  }
}

// tiles: null (the contiguous layout, `cap` slots) or a tile table for the part read.
extern "C" int tqkv_dequantize(const uint8_t* cache, void* out, int out_dtype, const int* channels,
                               const TqSpec* spec, int cycle, int B, int H, int cap, int n, const TqTiles* tiles,
                               cudaStream_t stream) {
  TqSpecs specs;
  if (!tq_specs(spec, cycle, &specs)) return (int)cudaErrorInvalidValue;
  if (spec->head_dim > TQ_MAX_DIM || spec->num_groups < 1 || spec->num_groups > 2 || (!tiles && n > cap))
    return (int)cudaErrorInvalidValue;
  if (tiles && (!tiles->table || tiles->per_seq < 1 || tiles->slots < 1)) return (int)cudaErrorInvalidValue;
  for (int g = 0; g < spec->num_groups; ++g)
    if (spec->groups[g].dim > TQ_MAX_DIM || spec->groups[g].m > TQ_MAX_DIM) return (int)cudaErrorInvalidValue;
  if (B == 0 || H == 0 || n == 0) return 0;
  const TqTiles tt = tiles ? *tiles : TqTiles{nullptr, 0, 0, 0, 0, 0, 0};
  dim3 grid(n, H, B);
  switch (out_dtype) {
    case 0:
      {
      auto k = tq_dequantize_kernel<float>;
      TQ_LAUNCH(k, grid, TQ_THREADS, 0, stream, cache, (float*)out, channels, specs, tt, H, cap, n);
    }
      break;
    case 1:
      {
      auto k = tq_dequantize_kernel<__half>;
      TQ_LAUNCH(k, grid, TQ_THREADS, 0, stream, cache, (__half*)out, channels, specs, tt, H, cap, n);
    }
      break;
    case 2:
      {
      auto k = tq_dequantize_kernel<__nv_bfloat16>;
      TQ_LAUNCH(k, grid, TQ_THREADS, 0, stream, cache, (__nv_bfloat16*)out, channels, specs, tt, H, cap, n);
    }
      break;
    default:
      return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}
