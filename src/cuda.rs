//! FFI to the CUDA kernels of `kernels/*.cu` (feature `cuda`; built by build.rs into
//! `libtqkv_kernels.a`). One `extern "C"` launcher per op: it takes a CUDA stream and returns a
//! `cudaError_t` (0 = success). The layouts are written at each launcher here and in the `.cu`
//! files; the record layout is docs/FORMAT.md's, described to the kernels by [`TqSpec`].
//!
//! Status: the quantize-append and dequantize kernels compile for sm_80/sm_90; their safe
//! wrappers, the fused decode-attention kernel and the GPU tests against the CPU reference are
//! the rest of issue 5 (they need a GPU session to be checked).

use std::os::raw::{c_int, c_void};

/// One channel group of a record (mirrors `TqGroup` in kernels/tqkv_common.cuh).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct TqGroup {
    /// Channels in the group.
    pub dim: c_int,
    /// Bits of the MSE stage (0 = none).
    pub mse_bits: c_int,
    /// QJL sign bits (0 = none).
    pub m: c_int,
    /// 0 = dense Π (row-major), 1 = Hadamard (`rot` holds the ±1 signs).
    pub rot_kind: c_int,
    /// Hadamard block size.
    pub had_block: c_int,
    /// Byte offset of n.
    pub norm_off: c_int,
    /// Byte offset of γ.
    pub gamma_off: c_int,
    /// Byte offset of the codes.
    pub codes_off: c_int,
    /// Byte offset of the sign bits.
    pub signs_off: c_int,
    /// Device pointer: Π `[dim, dim]` or the Hadamard signs `[dim]`.
    pub rot: *const f32,
    /// Device pointer: decision boundaries `[2^b − 1]`.
    pub boundaries: *const f32,
    /// Device pointer: centroids `[2^b]`.
    pub centroids: *const f32,
    /// Device pointer: S `[m, dim]`.
    pub sketch: *const f32,
    /// 1 / (m·κ).
    pub qjl_scale: f32,
}

/// The record layout of a quantizer (mirrors `TqSpec` in kernels/tqkv_common.cuh).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct TqSpec {
    /// Vector dimension.
    pub head_dim: c_int,
    /// 1 or 2.
    pub num_groups: c_int,
    /// Bytes per record.
    pub record_bytes: c_int,
    /// 1: f16 norms, 0: f32.
    pub norm_f16: c_int,
    /// The groups (the second unused for uniform bits).
    pub groups: [TqGroup; 2],
}

extern "C" {
    /// Quantize-append. `x` `[b, h, t, head_dim]` (x_dtype 0 f32, 1 f16, 2 bf16); `cache`
    /// `[b, h, cap, record_bytes]` u8; `start`, `new_lens` `[b]`; `channels` `[h, head_dim]`;
    /// `status` `[1]` (1 = NaN/Inf input, 2 = norm overflow). All pointers on the device except
    /// `spec` (host; passed to the kernel by value).
    pub fn tqkv_quantize_append(
        x: *const c_void,
        x_dtype: c_int,
        cache: *mut u8,
        start: *const c_int,
        new_lens: *const c_int,
        channels: *const c_int,
        spec: *const TqSpec,
        b: c_int,
        h: c_int,
        t: c_int,
        cap: c_int,
        status: *mut c_int,
        stream: *mut c_void,
    ) -> c_int;

    /// Dequantize slots `0..n` of every (sequence, head): `cache` `[b, h, cap, record_bytes]` →
    /// `out` `[b, h, n, head_dim]` (out_dtype 0 f32, 1 f16, 2 bf16).
    pub fn tqkv_dequantize(
        cache: *const u8,
        out: *mut c_void,
        out_dtype: c_int,
        channels: *const c_int,
        spec: *const TqSpec,
        b: c_int,
        h: c_int,
        cap: c_int,
        n: c_int,
        stream: *mut c_void,
    ) -> c_int;
}
