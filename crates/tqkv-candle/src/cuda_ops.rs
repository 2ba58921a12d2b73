//! The CUDA side of the TurboQuant ops (feature `cuda`): candle's `CudaStorage` handed to the
//! kernels of `tqkv::cuda` on candle's own stream — quantize-append (TurboQuant §3.1–3.2, §4.3
//! split, QJL §3 signs), fused decode attention from the codes, and dequantize for the prefill
//! path. No host round trip: bad input values set the cache's device status word (read at
//! prefill appends and by [`crate::TurboCache::check_status`]; attention over a poisoned cache
//! returns NaN).
//!
//! Layouts are those of [`crate::ops`] and [`crate::tile_ops`]: the arena u8 `[tiles,
//! tile_bytes]` (contiguous, offset 0) reached through the sequences' tables (uploaded per call),
//! inputs and queries f32/f16/bf16 `[batch, heads, tokens, head_dim]` (contiguous), attention
//! output `[batch, q_heads, tokens, head_dim]` in the queries' dtype.

use crate::ops::{TqAppend, TqAttend, TqDequantize};
use crate::tile_ops::{GatherRows, RowsPlace};
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::{CudaStorage, DType, Layout, Result, Shape};
use std::sync::{Arc, Mutex};
use tqkv::cuda::{AppendShape, AttentionShape, DeviceTables, StatusWord, TileTable};
use tqkv::device_tables::LayerTables;

fn wrap(e: tqkv::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// The one dtype dispatch of these ops: binds `$x` to the f32 / f16 / bf16 slice of a
/// `CudaStorageSlice` and evaluates `$body` (generic over `tqkv::cuda::KernelFloat`); any other
/// dtype is an error naming `$what`.
macro_rules! with_float_slice {
    ($slice:expr, $what:expr, |$x:ident| $body:expr) => {
        match $slice {
            CudaStorageSlice::F32($x) => $body,
            CudaStorageSlice::F16($x) => $body,
            CudaStorageSlice::BF16($x) => $body,
            _ => candle_core::bail!("{} must be f32, f16 or bf16", $what),
        }
    };
}

fn lock(m: &Mutex<StatusWord>) -> Result<std::sync::MutexGuard<'_, StatusWord>> {
    m.lock()
        .map_err(|_| candle_core::Error::msg("the cache's status lock is poisoned"))
}

/// One layer's key and value tables on the GPU (shared by a cache and its forks), and the
/// cache's own status word and attention workspace.
pub struct GpuTables {
    k: Arc<DeviceTables>,
    v: Arc<DeviceTables>,
    status: Mutex<StatusWord>,
    /// The attention's workspace and lengths, reused by every call of this layer.
    workspace: Mutex<tqkv::cuda::Workspace>,
}

impl GpuTables {
    /// Uploads the tables of the quantizers `[head · cycle + m]` (rotation m of each KV head's
    /// cycle) on `device` (a CUDA device).
    pub fn new(
        kq: &[tqkv::VectorQuantizer],
        vq: &[tqkv::VectorQuantizer],
        cycle: usize,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let stream = device.as_cuda_device()?.cuda_stream();
        let upload = |qs: &[tqkv::VectorQuantizer]| -> Result<DeviceTables> {
            let c = cycle.max(1);
            let variants = (0..c)
                .map(|m| {
                    let heads: Vec<_> = qs.iter().skip(m).step_by(c).cloned().collect();
                    LayerTables::new(&heads).map_err(wrap)
                })
                .collect::<Result<Vec<_>>>()?;
            DeviceTables::upload_cycle(&variants, &stream).map_err(wrap)
        };
        Ok(GpuTables {
            k: Arc::new(upload(kq)?),
            v: Arc::new(upload(vq)?),
            status: Mutex::new(StatusWord::new(&stream).map_err(wrap)?),
            workspace: Mutex::new(tqkv::cuda::Workspace::default()),
        })
    }

    /// The same tables with a status word and workspace of its own: a forked cache's appends
    /// report their bad values to it alone.
    pub fn fork(&self, device: &candle_core::Device) -> Result<Self> {
        let stream = device.as_cuda_device()?.cuda_stream();
        Ok(GpuTables {
            k: self.k.clone(),
            v: self.v.clone(),
            status: Mutex::new(StatusWord::new(&stream).map_err(wrap)?),
            workspace: Mutex::new(tqkv::cuda::Workspace::default()),
        })
    }

    /// Reads the status word (synchronizes with the device's stream).
    pub fn check(&self, device: &candle_core::Device) -> Result<()> {
        let stream = device.as_cuda_device()?.cuda_stream();
        lock(&self.status)?.read(&stream).map_err(wrap)
    }

    /// Clears the status word.
    pub fn clear(&self, device: &candle_core::Device) -> Result<()> {
        let stream = device.as_cuda_device()?.cuda_stream();
        lock(&self.status)?.clear(&stream).map_err(wrap)
    }

    /// Enqueues a copy of the status word to the host (no wait; [`Self::collect`] reads it).
    pub fn request(&self, device: &candle_core::Device) -> Result<()> {
        let stream = device.as_cuda_device()?.cuda_stream();
        lock(&self.status)?.request(&stream).map_err(wrap)
    }

    /// The status word as of the last [`Self::request`] (waits for that copy only).
    pub fn collect(&self, device: &candle_core::Device) -> Result<()> {
        let stream = device.as_cuda_device()?.cuda_stream();
        lock(&self.status)?.collect(&stream).map_err(wrap)
    }
}

fn gpu_of<'a>(gpu: &'a Option<Arc<GpuTables>>, op: &str) -> Result<&'a GpuTables> {
    gpu.as_deref().ok_or_else(|| {
        candle_core::Error::msg(format!(
            "{op}: the cache's GPU tables are missing (CPU cache on a CUDA tensor?)"
        ))
    })
}

fn offsets(l: &Layout, what: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::msg(format!("{what} must be contiguous")))
}

fn dims4(l: &Layout, what: &str) -> Result<(usize, usize, usize, usize)> {
    match l.shape().dims() {
        &[a, b, c, d] => Ok((a, b, c, d)),
        d => candle_core::bail!("{what} must be [batch, heads, tokens, head_dim], got {d:?}"),
    }
}

/// A table of every sequence's tiles (`[batch, per_seq]`, −1 where none) on the host and the
/// device.
fn upload_tables(
    tables: &[Vec<u32>],
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
) -> Result<(Vec<i32>, CudaSlice<i32>, usize)> {
    let per_seq = tables.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let refs: Vec<&[u32]> = tables.iter().map(Vec::as_slice).collect();
    let host = tqkv::paged::device_table(&refs, per_seq);
    let dev = stream
        .clone_htod(&host)
        .map_err(|e| candle_core::Error::msg(format!("uploading a tile table: {e}")))?;
    Ok((host, dev, per_seq))
}

/// A [`TileTable`] of one part of an arena (its strides in the key fields).
fn part_table<'a>(
    host: &'a [i32],
    dev: &'a CudaSlice<i32>,
    per_seq: usize,
    rows: &tqkv::paged::TileRows,
) -> TileTable<'a> {
    TileTable {
        table: dev,
        host,
        per_seq,
        slots: rows.per_tile,
        k_tile: rows.tile_bytes,
        k_head: rows.head_stride,
        v_tile: rows.tile_bytes,
        v_head: rows.head_stride,
    }
}

/// Quantize-append on the GPU.
pub fn append(
    op: &TqAppend,
    dst: &mut CudaStorage,
    dl: &Layout,
    src: &CudaStorage,
    sl: &Layout,
) -> Result<()> {
    let gpu = gpu_of(&op.gpu, "tqkv-append")?;
    let tables = if op.what == "values" { &gpu.v } else { &gpu.k };
    let stream = dst.device.cuda_stream();
    if offsets(dl, "the arena")?.0 != 0 {
        candle_core::bail!("tqkv-append: the arena must start at offset 0");
    }
    let (b, h, t, _) = dims4(sl, op.what)?;
    let (s, e) = offsets(sl, op.what)?;
    let shape = AppendShape {
        batch: b,
        heads: h,
        tokens: t,
        capacity: 0,
    };
    let (host, dev, per_seq) = upload_tables(&op.tables, &stream)?;
    let tt = part_table(&host, &dev, per_seq, &op.rows);
    let arena = dst.as_cuda_slice_mut::<u8>()?;
    let mut part = arena.slice_mut(op.rows.offset..);
    let mut status = lock(&gpu.status)?;
    let what = || format!("tqkv-append: {}", op.what);
    let r = with_float_slice!(&src.slice, what(), |x| tqkv::cuda::quantize_append(
        &stream,
        tables,
        &x.slice(s..e),
        &mut part,
        shape,
        &op.start,
        &op.new,
        Some(&tt),
        &mut status,
    ));
    r.map_err(wrap)
}

fn arena_slice<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<&'a CudaSlice<u8>> {
    if offsets(l, what)?.0 != 0 {
        candle_core::bail!("{what} must start at offset 0");
    }
    s.as_cuda_slice::<u8>()
}

/// Fused attention over the records (and exact rows) in the arena on the GPU.
pub fn attend(
    op: &TqAttend,
    q: &CudaStorage,
    ql: &Layout,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let gpu = gpu_of(&op.gpu, "tqkv-attend")?;
    let stream = q.device.cuda_stream();
    let (b, hq, t, d) = dims4(ql, "queries")?;
    let (qs, qe) = offsets(ql, "queries")?;
    let arena = arena_slice(s, l, "the arena")?;
    let (kr, vr) = (op.records.keys(), op.records.values());
    let (kc, vc) = (arena.slice(kr.offset..), arena.slice(vr.offset..));
    let visible: Vec<usize> = (0..b)
        .flat_map(|i| (0..t).map(move |r| (i, r)))
        .map(|(i, r)| op.state.visible(i, r))
        .collect();
    let shape = AttentionShape {
        batch: b,
        q_heads: hq,
        kv_heads: op.state.kv_heads,
        tokens: t,
        capacity: 0,
    };
    let (host, dev, per_seq) = upload_tables(&op.tables, &stream)?;
    let tiles = TileTable {
        table: &dev,
        host: &host,
        per_seq,
        slots: op.records.slots,
        k_tile: kr.tile_bytes,
        k_head: kr.head_stride,
        v_tile: vr.tile_bytes,
        v_head: vr.head_stride,
    };
    // The exact part straight from the arena: f16 rows, or q8_0 codes and scales, which the
    // kernel decodes itself.
    let ex_tables = match &op.exact {
        Some(x) => Some(upload_tables(&x.tables, &stream)?),
        None => None,
    };
    let part = match (&op.exact, &ex_tables) {
        (Some(x), Some((h, d_, per))) => Some(tqkv::cuda::ExactPart {
            arena,
            table: d_,
            host_table: h,
            per_seq: *per,
            tiles: x.tiles,
            sinks: x.sinks,
            packed_end: &x.packed_end,
        }),
        _ => None,
    };
    // The chosen kernel where it takes the layout, else the split kernel (documented fallback).
    let kernel = if tqkv::cuda::attention_supported(op.kernel, &gpu.k, &gpu.v) {
        op.kernel
    } else {
        tqkv::AttentionKernel::Split
    };
    let opts = tqkv::cuda::AttentionOptions {
        kernel,
        tiles: Some(tiles),
        workspace: Some(&gpu.workspace),
    };
    let status = lock(&gpu.status)?;
    let n = b * hq * t * d;
    // The output in the queries' dtype, every element written by the kernel (no memset).
    let storage = with_float_slice!(&q.slice, "tqkv-attend: queries", |x| {
        let mut out = uninit_like(x, &stream, n)?;
        tqkv::cuda::decode_attention_with(
            &stream,
            &gpu.k,
            &gpu.v,
            &x.slice(qs..qe),
            &kc,
            &vc,
            shape,
            &visible,
            part.as_ref(),
            &opts,
            op.scale,
            &status,
            &mut out,
        )
        .map_err(wrap)?;
        CudaStorage::wrap_cuda_slice(out, q.device.clone())
    });
    Ok((storage, Shape::from((b, hq, t, d))))
}

/// Writes rows into the arena's tiles on the GPU ([`crate::tile_ops::ScatterRows`]).
pub fn scatter_rows(
    p: &RowsPlace,
    dst: &mut CudaStorage,
    dl: &Layout,
    src: &CudaStorage,
    sl: &Layout,
) -> Result<()> {
    if offsets(dl, "the arena")?.0 != 0 {
        candle_core::bail!("tqkv-scatter-rows: the arena must start at offset 0");
    }
    let stream = dst.device.cuda_stream();
    let (s, e) = offsets(sl, "rows")?;
    let arena = dst.as_cuda_slice_mut::<u8>()?;
    // Rows of any element type, moved as bytes.
    macro_rules! scatter {
        ($($v:ident),*) => {
            match &src.slice {
                $(CudaStorageSlice::$v(x) => tqkv::cuda::scatter_rows(
                    &stream, arena, &x.slice(s..e), &p.rows, &p.table, p.first, p.n,
                ),)*
                _ => candle_core::bail!("tqkv-scatter-rows: rows of u8, f16, bf16 or f32"),
            }
        };
    }
    let r = scatter!(U8, F16, BF16, F32);
    r.map_err(wrap)
}

/// Reads rows out of the arena's tiles on the GPU ([`crate::tile_ops::GatherRows`]).
pub fn gather_rows(op: &GatherRows, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let p = &op.place;
    let w = p.width(op.dtype)?;
    let arena = arena_slice(s, l, "the arena")?;
    let stream = s.device.cuda_stream();
    let n = p.rows.heads * p.n * w;
    fn run<T: cudarc::driver::DeviceRepr + candle_core::cuda_backend::CudaDType>(
        s: &CudaStorage,
        arena: &CudaSlice<u8>,
        p: &RowsPlace,
        n: usize,
    ) -> Result<CudaStorage> {
        let stream = s.device.cuda_stream();
        // SAFETY: the copy below writes every element (heads · n rows of width elements).
        let mut out = unsafe { stream.alloc::<T>(n) }
            .map_err(|e| candle_core::Error::msg(format!("tqkv-gather-rows: {e}")))?;
        tqkv::cuda::gather_rows(&stream, arena, &mut out, &p.rows, &p.table, p.first, p.n)
            .map_err(wrap)?;
        Ok(CudaStorage::wrap_cuda_slice(out, s.device.clone()))
    }
    let _ = &stream;
    let storage = match op.dtype {
        DType::U8 => run::<u8>(s, arena, p, n)?,
        DType::F16 => run::<half::f16>(s, arena, p, n)?,
        DType::BF16 => run::<half::bf16>(s, arena, p, n)?,
        DType::F32 => run::<f32>(s, arena, p, n)?,
        other => candle_core::bail!("tqkv-gather-rows: u8, f16, bf16 or f32, not {other:?}"),
    };
    Ok((storage, Shape::from((1, p.rows.heads, p.n, w))))
}

/// `n` uninitialised elements of `x`'s type on `stream`.
fn uninit_like<T: cudarc::driver::DeviceRepr>(
    _x: &CudaSlice<T>,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    n: usize,
) -> Result<CudaSlice<T>> {
    // SAFETY: the caller's kernel writes every element before anything reads it.
    unsafe { stream.alloc::<T>(n) }
        .map_err(|e| candle_core::Error::msg(format!("tqkv-attend: {e}")))
}

/// Sets the layer's status word, without a host round trip, when `t` (a CUDA tensor) holds
/// NaN or ±Inf: the device-side check of exact tokens appended by decode steps.
pub fn check_finite(t: &candle_core::Tensor, gpu: &GpuTables) -> Result<()> {
    finite_into(t, &gpu.status)
}

fn finite_into(t: &candle_core::Tensor, status: &Mutex<StatusWord>) -> Result<()> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    let candle_core::Storage::Cuda(c) = &*st else {
        candle_core::bail!("check_finite: not a CUDA tensor")
    };
    let (s, e) = offsets(l, "checked values")?;
    let stream = c.device.cuda_stream();
    let mut status = lock(status)?;
    let r = with_float_slice!(&c.slice, "checked values", |x| tqkv::cuda::check_finite(
        &stream,
        &x.slice(s..e),
        e - s,
        &mut status
    ));
    r.map_err(wrap)
}

/// A device status word for a cache without GPU tables (the full-precision caches): decode
/// steps check their keys and values into it on the device, [`DeviceStatus::check`] reads it.
pub struct DeviceStatus(Mutex<StatusWord>);

impl std::fmt::Debug for DeviceStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceStatus")
    }
}

impl DeviceStatus {
    /// A clear status word on `device` (a CUDA device).
    pub fn new(device: &candle_core::Device) -> Result<Self> {
        let stream = device.as_cuda_device()?.cuda_stream();
        Ok(DeviceStatus(Mutex::new(
            StatusWord::new(&stream).map_err(wrap)?,
        )))
    }

    /// Sets the word when `t` holds NaN or ±Inf (no host round trip).
    pub fn check_finite(&self, t: &candle_core::Tensor) -> Result<()> {
        finite_into(t, &self.0)
    }

    /// Reads the word (synchronizes): an error if bad values were appended since the last read.
    pub fn check(&self, device: &candle_core::Device) -> Result<()> {
        let stream = device.as_cuda_device()?.cuda_stream();
        lock(&self.0)?.read(&stream).map_err(wrap)
    }

    /// Clears the word.
    pub fn clear(&self, device: &candle_core::Device) -> Result<()> {
        let stream = device.as_cuda_device()?.cuda_stream();
        lock(&self.0)?.clear(&stream).map_err(wrap)
    }

    /// Enqueues a copy of the word to the host (no wait; [`Self::collect`] reads it).
    pub fn request(&self, device: &candle_core::Device) -> Result<()> {
        let stream = device.as_cuda_device()?.cuda_stream();
        lock(&self.0)?.request(&stream).map_err(wrap)
    }

    /// The word as of the last [`Self::request`] (waits for that copy only).
    pub fn collect(&self, device: &candle_core::Device) -> Result<()> {
        let stream = device.as_cuda_device()?.cuda_stream();
        lock(&self.0)?.collect(&stream).map_err(wrap)
    }
}

/// Dequantize of the first `n` slots of every sequence on the GPU.
pub fn dequantize(op: &TqDequantize, c: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let gpu = gpu_of(&op.gpu, "tqkv-dequantize")?;
    let tables = if op.values { &gpu.v } else { &gpu.k };
    let arena = arena_slice(c, l, "the arena")?;
    let part = arena.slice(op.rows.offset..);
    let (b, h) = (op.tables.len(), tables.heads());
    let d = tables.head_dim();
    let shape = AppendShape {
        batch: b,
        heads: h,
        tokens: 0,
        capacity: 0,
    };
    let stream = c.device.cuda_stream();
    let (host, dev, per_seq) = upload_tables(&op.tables, &stream)?;
    let tt = part_table(&host, &dev, per_seq, &op.rows);
    let storage = match op.dtype {
        DType::F32 => dequantize_as::<f32>(c, tables, &part, shape, op.n, &tt)?,
        DType::F16 => dequantize_as::<half::f16>(c, tables, &part, shape, op.n, &tt)?,
        DType::BF16 => dequantize_as::<half::bf16>(c, tables, &part, shape, op.n, &tt)?,
        other => {
            candle_core::bail!("tqkv-dequantize: output must be f32, f16 or bf16, not {other:?}")
        }
    };
    Ok((storage, Shape::from((b, h, op.n, d))))
}

fn dequantize_as<T>(
    c: &CudaStorage,
    tables: &DeviceTables,
    part: &cudarc::driver::CudaView<'_, u8>,
    shape: AppendShape,
    n: usize,
    tt: &TileTable,
) -> Result<CudaStorage>
where
    T: tqkv::cuda::KernelFloat
        + candle_core::cuda_backend::CudaDType
        + candle_core::cuda_backend::cudarc::driver::DeviceRepr
        + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits,
{
    let stream = c.device.cuda_stream();
    let len = shape.batch * tables.heads() * n * tables.head_dim();
    let mut o = stream
        .alloc_zeros::<T>(len)
        .map_err(|e| candle_core::Error::msg(format!("tqkv-dequantize: {e}")))?;
    tqkv::cuda::dequantize(&stream, tables, part, shape, n, Some(tt), &mut o).map_err(wrap)?;
    Ok(CudaStorage::wrap_cuda_slice(o, c.device.clone()))
}
