// The text of a CUDA runtime status, for the Rust side's error messages (tqkv::cuda).
#include <cuda_runtime.h>

extern "C" const char* tqkv_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }
