// Finite check of a tensor on the device: any NaN or ±Inf element sets the status word to
// TQ_NONFINITE_INPUT (first error wins), with no host round trip. Used where values enter a
// cache without passing through the quantize-append kernel (exact tokens of a window or sink,
// full-precision caches), so that every device reports bad input the same way: through the
// cache's status word, read when the caller chooses (tqkv::cuda::StatusWord::read).
//
// Layout: x [n] f32 / f16 / bf16 (dtype 0 / 1 / 2), contiguous; status [1] int.
#include "tqkv_common.cuh"

template <typename T>
__global__ void __launch_bounds__(256) tq_check_finite_kernel(const T* __restrict__ x, long n, int* status) {
  bool bad = false;
  for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
    bad |= !isfinite(tq_load<T>(x, i));
  if (bad) atomicCAS(status, TQ_OK, TQ_NONFINITE_INPUT);
}

extern "C" int tqkv_check_finite(const void* x, int dtype, long n, int* status, cudaStream_t stream) {
  if (n < 0 || !status) return (int)cudaErrorInvalidValue;
  if (n == 0) return 0;
  const long blocks = (n + 255) / 256;
  const dim3 grid((unsigned)(blocks < 1024 ? blocks : 1024));
  switch (dtype) {
    case 0: {
      auto k = tq_check_finite_kernel<float>;
      TQ_LAUNCH(k, grid, 256, 0, stream, (const float*)x, n, status);
      break;
    }
    case 1: {
      auto k = tq_check_finite_kernel<__half>;
      TQ_LAUNCH(k, grid, 256, 0, stream, (const __half*)x, n, status);
      break;
    }
    case 2: {
      auto k = tq_check_finite_kernel<__nv_bfloat16>;
      TQ_LAUNCH(k, grid, 256, 0, stream, (const __nv_bfloat16*)x, n, status);
      break;
    }
    default:
      return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}
