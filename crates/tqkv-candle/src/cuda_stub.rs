//! Stand-in for `cuda_ops.rs` when the `cuda` feature is off: candle has no CUDA device then,
//! so these are unreachable; they return errors rather than panic.

use crate::ops::{TqAppend, TqAttend, TqDequantize};
use crate::tile_ops::{GatherRows, RowsPlace};
use candle_core::{CudaStorage, Layout, Result, Shape};

fn off() -> candle_core::Error {
    candle_core::Error::msg("tqkv-candle was built without the `cuda` feature")
}

/// Never built without `cuda`.
pub struct GpuTables;

impl GpuTables {
    /// Always an error without `cuda`.
    pub fn new(
        _: &[tqkv::VectorQuantizer],
        _: &[tqkv::VectorQuantizer],
        _: usize,
        _: &candle_core::Device,
    ) -> Result<Self> {
        Err(off())
    }

    /// Always an error without `cuda`.
    pub fn fork(&self, _: &candle_core::Device) -> Result<Self> {
        Err(off())
    }

    /// Always an error without `cuda`.
    pub fn check(&self, _: &candle_core::Device) -> Result<()> {
        Err(off())
    }

    /// Always an error without `cuda`.
    pub fn clear(&self, _: &candle_core::Device) -> Result<()> {
        Err(off())
    }

    /// Always an error without `cuda`.
    pub fn request(&self, _: &candle_core::Device) -> Result<()> {
        Err(off())
    }

    /// Always an error without `cuda`.
    pub fn collect(&self, _: &candle_core::Device) -> Result<()> {
        Err(off())
    }
}

/// Always an error without `cuda`.
pub fn append(
    _: &TqAppend,
    _: &mut CudaStorage,
    _: &Layout,
    _: &CudaStorage,
    _: &Layout,
) -> Result<()> {
    Err(off())
}

/// Always an error without `cuda`.
pub fn attend(
    _: &TqAttend,
    _: &CudaStorage,
    _: &Layout,
    _: &CudaStorage,
    _: &Layout,
) -> Result<(CudaStorage, Shape)> {
    Err(off())
}

/// Always an error without `cuda`.
pub fn scatter_rows(
    _: &RowsPlace,
    _: &mut CudaStorage,
    _: &Layout,
    _: &CudaStorage,
    _: &Layout,
) -> Result<()> {
    Err(off())
}

/// Always an error without `cuda`.
pub fn gather_rows(_: &GatherRows, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
    Err(off())
}

/// Always an error without `cuda`.
pub fn dequantize(_: &TqDequantize, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
    Err(off())
}

/// Always an error without `cuda`.
pub fn check_finite(_: &candle_core::Tensor, _: &GpuTables) -> Result<()> {
    Err(off())
}

/// Never built without `cuda`.
#[derive(Debug)]
pub struct DeviceStatus;

impl DeviceStatus {
    /// Always an error without `cuda`.
    pub fn new(_: &candle_core::Device) -> Result<Self> {
        Err(off())
    }

    /// Always an error without `cuda`.
    pub fn check_finite(&self, _: &candle_core::Tensor) -> Result<()> {
        Err(off())
    }

    /// Always an error without `cuda`.
    pub fn check(&self, _: &candle_core::Device) -> Result<()> {
        Err(off())
    }

    /// Always an error without `cuda`.
    pub fn clear(&self, _: &candle_core::Device) -> Result<()> {
        Err(off())
    }

    /// Always an error without `cuda`.
    pub fn request(&self, _: &candle_core::Device) -> Result<()> {
        Err(off())
    }

    /// Always an error without `cuda`.
    pub fn collect(&self, _: &candle_core::Device) -> Result<()> {
        Err(off())
    }
}
