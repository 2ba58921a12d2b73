//! The CUDA kernels of `kernels/*.cu` (feature `cuda`; built by build.rs into
//! `libtqkv_kernels.a`) and their safe wrappers: TurboQuant quantize-append (§3.1–3.2, with the
//! §4.3 channel split and QJL §3 signs), dequantize, and fused decode attention over the packed
//! cache (flash-decoding split + merge; the CPU oracle is [`crate::attention::attend_packed`]).
//!
//! One `extern "C"` launcher per op: it takes a CUDA stream and returns a `cudaError_t`
//! (0 = success). Layouts are written at each wrapper; the record layout is docs/FORMAT.md's,
//! described to the kernels by [`TqSpec`] with the per-layer tables of
//! [`crate::device_tables::LayerTables`] uploaded once by [`DeviceTables::upload`].
//!
//! Memory is cudarc's (the same crate and version candle uses), so candle's `CudaStorage`
//! slices pass straight in. The kernels are launched through the CUDA runtime on the stream's
//! own context (made current first), so they order with candle's work on that stream; nothing
//! here synchronizes with the host except [`StatusWord::read`] and [`StatusWord::collect`].

use crate::device_tables::LayerTables;
use crate::error::{Error, Result};
use crate::kernel::AttentionKernel;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice};
use std::os::raw::{c_int, c_long, c_void};
use std::sync::Arc;

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
    /// Device pointer, dense only: Πᵀ `[dim, dim]` (null for Hadamard).
    pub rot_t: *const f32,
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
    /// Norm storage: 0 f32, 1 f16, 2 log8 ([`crate::lognorm`]).
    pub norm_format: c_int,
    /// The MSE norm ([`crate::NormRule`]): 0 exact, 1 projected, 2 least squares.
    pub norm_rule: c_int,
    /// The groups (the second unused for uniform bits).
    pub groups: [TqGroup; 2],
}

/// The full-precision part of an attention (mirrors `TqExact` in kernels/exact_attention.cuh):
/// rows in an arena's tiles ([`crate::paged::ExactTiles`]).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct TqExact {
    /// Device pointer: the arena.
    base: *const u8,
    /// Device pointer: `[B, per_seq]` int, the tile of (sequence, position / rows).
    table: *const c_int,
    /// Device pointer: `[B, T]` int, where each query's records end (its window starts).
    packed_end: *const c_int,
    /// Table entries per sequence.
    per_seq: c_int,
    /// Positions per tile.
    rows: c_int,
    /// Sink positions.
    sinks: c_int,
    /// Blocks along the exact positions.
    splits: c_int,
    /// 0: f16 rows; 1: q8_0 rows.
    format: c_int,
    /// KV heads.
    heads: c_int,
    /// Bytes between tiles.
    tile_bytes: c_long,
}

/// A per-sequence table of tiles (mirrors `TqTiles` in kernels/tile_table.cuh): slot s of
/// (sequence b, KV head h) is at byte `table[b·per_seq + s/slots]·k_tile + h·k_head +
/// (s % slots)·record_bytes` of the key base (values likewise).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct TqTiles {
    /// Device pointer: `[batch, per_seq]` int.
    table: *const c_int,
    per_seq: c_int,
    slots: c_int,
    k_tile: c_long,
    k_head: c_long,
    v_tile: c_long,
    v_head: c_long,
}

/// Where the rows of one part sit in an arena (mirrors `TqRows` in kernels/tile_rows.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct TqRows {
    /// Device pointer: the tiles of the rows copied, from tile `first / per_tile` on.
    table: *const c_int,
    per_tile: c_int,
    heads: c_int,
    tile_bytes: c_long,
    offset: c_long,
    slot_stride: c_long,
    head_stride: c_long,
    row_bytes: c_long,
}

// The layouts the kernels see (x86-64 / aarch64 Linux: 8-byte pointers and longs).
const _: () = assert!(std::mem::size_of::<TqGroup>() == 88);
const _: () = assert!(std::mem::offset_of!(TqGroup, rot) == 40);
const _: () = assert!(std::mem::offset_of!(TqGroup, qjl_scale) == 80);
const _: () = assert!(std::mem::size_of::<TqSpec>() == 200);
const _: () = assert!(std::mem::offset_of!(TqSpec, groups) == 24);
const _: () = assert!(std::mem::size_of::<TqTiles>() == 48);
const _: () = assert!(std::mem::offset_of!(TqTiles, slots) == 12);
const _: () = assert!(std::mem::offset_of!(TqTiles, k_tile) == 16);
const _: () = assert!(std::mem::size_of::<TqExact>() == 56);
const _: () = assert!(std::mem::offset_of!(TqExact, per_seq) == 24);
const _: () = assert!(std::mem::offset_of!(TqExact, tile_bytes) == 48);
const _: () = assert!(std::mem::size_of::<TqRows>() == 56);
const _: () = assert!(std::mem::offset_of!(TqRows, tile_bytes) == 16);

extern "C" {
    /// `cudaGetErrorString(code)` (kernels/error_string.cu).
    fn tqkv_error_string(code: c_int) -> *const std::os::raw::c_char;
    fn tqkv_quantize_append(
        x: *const c_void,
        x_dtype: c_int,
        cache: *mut u8,
        start: *const c_int,
        new_lens: *const c_int,
        channels: *const c_int,
        spec: *const TqSpec,
        cycle: c_int,
        b: c_int,
        h: c_int,
        t: c_int,
        cap: c_int,
        tiles: *const TqTiles,
        status: *mut c_int,
        stream: *mut c_void,
    ) -> c_int;

    fn tqkv_copy_rows(
        arena: *mut u8,
        dense: *mut u8,
        rows: *const TqRows,
        first: c_int,
        n: c_int,
        to_tiles: c_int,
        stream: *mut c_void,
    ) -> c_int;

    fn tqkv_dequantize(
        cache: *const u8,
        out: *mut c_void,
        out_dtype: c_int,
        channels: *const c_int,
        spec: *const TqSpec,
        cycle: c_int,
        b: c_int,
        h: c_int,
        cap: c_int,
        n: c_int,
        tiles: *const TqTiles,
        stream: *mut c_void,
    ) -> c_int;

    fn tqkv_decode_attention_max_chunk(rows: c_int) -> c_int;
    fn tqkv_decode_attention_rows(
        kernel: c_int,
        rows: c_int,
        cycle: c_int,
        head_dim: c_int,
    ) -> c_int;
    fn tqkv_decode_attention_supported(
        kernel: c_int,
        ks: *const TqSpec,
        vs: *const TqSpec,
        cycle: c_int,
    ) -> c_int;
    fn tqkv_decode_attention_workspace(
        kernel: c_int,
        vs: *const TqSpec,
        cycle: c_int,
        b: c_int,
        hq: c_int,
        hkv: c_int,
        t: c_int,
        splits: c_int,
    ) -> c_long;

    fn tqkv_decode_attention(
        kernel: c_int,
        q: *const c_void,
        q_dtype: c_int,
        kcache: *const u8,
        vcache: *const u8,
        visible: *const c_int,
        kch: *const c_int,
        vch: *const c_int,
        ks: *const TqSpec,
        vs: *const TqSpec,
        cycle: c_int,
        b: c_int,
        hq: c_int,
        hkv: c_int,
        t: c_int,
        cap: c_int,
        tiles: *const TqTiles,
        scale: f32,
        splits: c_int,
        chunk: c_int,
        exact: *const TqExact,
        workspace: *mut f32,
        status: *const c_int,
        out: *mut c_void,
        out_dtype: c_int,
        stream: *mut c_void,
    ) -> c_int;

    fn tqkv_check_finite(
        x: *const c_void,
        dtype: c_int,
        n: c_long,
        status: *mut c_int,
        stream: *mut c_void,
    ) -> c_int;
}

/// Element types the kernels read and write: f32, f16, bf16 (codes 0, 1, 2).
pub trait KernelFloat: DeviceRepr {
    /// The dtype code of the launchers.
    const CODE: c_int;
}
impl KernelFloat for f32 {
    const CODE: c_int = 0;
}
impl KernelFloat for half::f16 {
    const CODE: c_int = 1;
}
impl KernelFloat for half::bf16 {
    const CODE: c_int = 2;
}

fn driver(e: cudarc::driver::DriverError) -> Error {
    Error::Cuda(format!("CUDA driver: {e}"))
}

/// The launchers' status `TQ_ERR_GRID` (kernels/tqkv_common.cuh).
const TQ_ERR_GRID: c_int = 1000;

fn launched(op: &str, code: c_int) -> Result<()> {
    match code {
        0 => Ok(()),
        1 => Err(Error::Cuda(format!(
            "{op}: invalid arguments (cudaErrorInvalidValue): unsupported head_dim, bits or \
             sizes for this kernel"
        ))),
        TQ_ERR_GRID => Err(Error::Cuda(format!(
            "{op}: the launch grid exceeds CUDA's limits (at most 65535 blocks in y and z): \
             too many query rows or sequences for one call — split the prefill into chunks"
        ))),
        c => {
            // SAFETY: cudaGetErrorString returns a static NUL-terminated string for any code.
            let text = unsafe { std::ffi::CStr::from_ptr(tqkv_error_string(c)) };
            Err(Error::Cuda(format!(
                "{op}: CUDA error {c} ({})",
                text.to_string_lossy()
            )))
        }
    }
}

fn int(what: &str, v: usize) -> Result<c_int> {
    c_int::try_from(v)
        .map_err(|_| Error::Config(format!("{what} = {v} exceeds the kernels' range")))
}

fn need<T>(what: &'static str, buf: &impl DeviceSlice<T>, expected: usize) -> Result<()> {
    if buf.len() < expected {
        return Err(Error::Shape {
            what,
            expected,
            got: buf.len(),
        });
    }
    Ok(())
}

fn raw<T>(p: cudarc::driver::sys::CUdeviceptr) -> *const T {
    p as usize as *const T
}

fn raw_mut<T>(p: cudarc::driver::sys::CUdeviceptr) -> *mut T {
    p as usize as *mut T
}

fn ints(stream: &Arc<CudaStream>, v: &[usize], what: &str) -> Result<CudaSlice<i32>> {
    let host = v
        .iter()
        .map(|&x| int(what, x))
        .collect::<Result<Vec<_>>>()?;
    stream.clone_htod(&host).map_err(driver)
}

/// The tables of one layer on the device: rotations, codebooks, sketches and channel orders,
/// with the [`TqSpec`] that points at them — one per rotation of a cycle
/// ([`crate::KvSpec::rotations`]; slot s uses variant s % cycle). Uploaded once per layer and
/// reused by every launch.
pub struct DeviceTables {
    specs: Vec<TqSpec>,
    heads: usize,
    channels: CudaSlice<i32>,
    _tables: Vec<CudaSlice<f32>>,
}

// SAFETY: the raw pointers inside `spec` are device addresses of the `_tables` buffers this
// struct owns; they are never dereferenced on the host.
unsafe impl Send for DeviceTables {}
unsafe impl Sync for DeviceTables {}

impl std::fmt::Debug for DeviceTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTables")
            .field("head_dim", &self.specs[0].head_dim)
            .field("record_bytes", &self.specs[0].record_bytes)
            .field("heads", &self.heads)
            .field("cycle", &self.specs.len())
            .finish()
    }
}

impl DeviceTables {
    /// Uploads `t` on `stream`'s device. Errors on a layout the kernels do not support
    /// (head_dim or a group's dimension or sketch above 256, more than 8 bits).
    pub fn upload(t: &LayerTables, stream: &Arc<CudaStream>) -> Result<Self> {
        Self::upload_cycle(std::slice::from_ref(t), stream)
    }

    /// Uploads the tables of a rotation cycle (variant m = `variants[m]`, 1..=4 of them): the
    /// same layout, codebooks and channel orders, their own rotations and sketches.
    pub fn upload_cycle(variants: &[LayerTables], stream: &Arc<CudaStream>) -> Result<Self> {
        let first = variants
            .first()
            .ok_or_else(|| Error::Config("no tables to upload".into()))?;
        if variants.len() > 4 {
            return Err(Error::Config(format!(
                "the CUDA kernels cycle at most 4 rotations, not {}",
                variants.len()
            )));
        }
        let same = |t: &LayerTables| {
            t.head_dim == first.head_dim
                && t.record_bytes == first.record_bytes
                && t.norm == first.norm
                && t.norm_rule == first.norm_rule
                && t.channels == first.channels
                && t.groups.len() == first.groups.len()
                && t.groups.iter().zip(&first.groups).all(|(a, b)| {
                    (a.dim, a.mse_bits, a.m, a.rot_kind, a.offsets, &a.centroids)
                        == (b.dim, b.mse_bits, b.m, b.rot_kind, b.offsets, &b.centroids)
                })
        };
        if !variants.iter().all(same) {
            return Err(Error::Config(
                "the rotations of a cycle must share layout, codebooks and channels".into(),
            ));
        }
        let mut owned = Vec::new();
        let mut specs = Vec::with_capacity(variants.len());
        for t in variants {
            specs.push(Self::spec_of(t, stream, &mut owned)?);
        }
        let channels = stream.clone_htod(&first.channels).map_err(driver)?;
        Ok(DeviceTables {
            specs,
            heads: first.channels.len() / first.head_dim.max(1),
            channels,
            _tables: owned,
        })
    }

    /// The [`TqSpec`] of `t`, its tables uploaded into `owned`.
    fn spec_of(
        t: &LayerTables,
        stream: &Arc<CudaStream>,
        owned: &mut Vec<CudaSlice<f32>>,
    ) -> Result<TqSpec> {
        const MAX: usize = 256;
        if t.head_dim > MAX || t.groups.is_empty() || t.groups.len() > 2 {
            return Err(Error::UnsupportedDim {
                dim: t.head_dim,
                reason: format!(
                    "the CUDA kernels handle head_dim ≤ {MAX} with 1 or 2 channel groups"
                ),
            });
        }
        let coords: usize = t
            .groups
            .iter()
            .map(|g| if g.mse_bits > 0 { g.dim } else { 0 } + g.m)
            .sum();
        if t.groups.iter().any(|g| g.m > MAX || g.mse_bits > 8) || coords > 2 * MAX {
            return Err(Error::Config(format!(
                "the CUDA kernels handle QJL sketches of ≤ {MAX} bits per group and ≤ 8 code bits"
            )));
        }
        let null = std::ptr::null::<f32>();
        let mut put = |v: &[f32]| -> Result<*const f32> {
            if v.is_empty() {
                return Ok(null);
            }
            let s = stream.clone_htod(v).map_err(driver)?;
            let (p, _sync) = s.device_ptr(stream);
            let p = raw::<f32>(p);
            drop(_sync);
            owned.push(s);
            Ok(p)
        };
        let empty = TqGroup {
            dim: 0,
            mse_bits: 0,
            m: 0,
            rot_kind: 0,
            had_block: 1,
            norm_off: 0,
            gamma_off: 0,
            codes_off: 0,
            signs_off: 0,
            rot: null,
            rot_t: null,
            boundaries: null,
            centroids: null,
            sketch: null,
            qjl_scale: 0.0,
        };
        let mut groups = [empty; 2];
        for (slot, g) in groups.iter_mut().zip(&t.groups) {
            let rot_t: Vec<f32> = if g.rot_kind == 0 && !g.rot.is_empty() {
                (0..g.dim * g.dim)
                    .map(|k| g.rot[(k % g.dim) * g.dim + k / g.dim])
                    .collect()
            } else {
                Vec::new()
            };
            *slot = TqGroup {
                dim: int("group dim", g.dim)?,
                mse_bits: g.mse_bits as c_int,
                m: int("sketch dim", g.m)?,
                rot_kind: g.rot_kind,
                had_block: int("Hadamard block", g.had_block)?,
                norm_off: int("norm offset", g.offsets[0])?,
                gamma_off: int("gamma offset", g.offsets[1])?,
                codes_off: int("codes offset", g.offsets[2])?,
                signs_off: int("signs offset", g.offsets[3])?,
                rot: put(&g.rot)?,
                rot_t: put(&rot_t)?,
                boundaries: put(&g.boundaries)?,
                centroids: put(&g.centroids)?,
                sketch: put(&g.sketch)?,
                qjl_scale: g.qjl_scale,
            };
        }
        Ok(TqSpec {
            head_dim: int("head_dim", t.head_dim)?,
            num_groups: t.groups.len() as c_int,
            record_bytes: int("record bytes", t.record_bytes)?,
            norm_format: match t.norm {
                crate::NormFormat::F32 => 0,
                crate::NormFormat::F16 => 1,
                crate::NormFormat::Log8 => 2,
            },
            norm_rule: crate::device_tables::norm_rule_code(t.norm_rule),
            groups,
        })
    }

    /// The record layout with device pointers (of the cycle's first rotation), as the launchers
    /// take it.
    pub fn spec(&self) -> &TqSpec {
        &self.specs[0]
    }

    /// Rotations in the cycle (1 for plain TurboQuant).
    pub fn cycle(&self) -> usize {
        self.specs.len()
    }

    /// KV heads the channel orders cover.
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// Vector dimension.
    pub fn head_dim(&self) -> usize {
        self.specs[0].head_dim as usize
    }

    /// Bytes per record.
    pub fn record_bytes(&self) -> usize {
        self.specs[0].record_bytes as usize
    }
}

/// A cache's status word on the device: 0, or the first bad input an append met
/// (1 = NaN/Inf in a key or value, 2 = a norm beyond f16). Appends set it without a host round
/// trip; attention over a cache whose status is set returns NaN; [`Self::read`] turns it into
/// an error.
pub struct StatusWord {
    word: CudaSlice<i32>,
    /// Page-locked host copy of the word, written by [`Self::request`].
    host: Option<cudarc::driver::PinnedHostSlice<i32>>,
    /// A copy was requested and not yet collected.
    pending: bool,
}

impl StatusWord {
    /// A cleared status word on `stream`'s device.
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        Ok(StatusWord {
            word: stream.alloc_zeros::<i32>(1).map_err(driver)?,
            host: None,
            pending: false,
        })
    }

    /// Reads the word (synchronizes with the stream) and turns it into a result.
    pub fn read(&self, stream: &Arc<CudaStream>) -> Result<()> {
        let v = stream.clone_dtoh(&self.word).map_err(driver)?;
        Self::status(v[0])
    }

    /// Enqueues a copy of the word into page-locked host memory after the work queued so far,
    /// without waiting; [`Self::collect`] waits for that copy alone. A model requests every
    /// layer's word after its step and then collects them: one wait per step, not one stall per
    /// layer.
    pub fn request(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        if self.host.is_none() {
            // SAFETY: the slice is written by the copy below before it is ever read (`collect`
            // reads it only after a request). Flags 0: cached memory, read by the host.
            self.host = Some(
                unsafe { stream.context().alloc_pinned_with_flags::<i32>(1, 0) }.map_err(driver)?,
            );
        }
        if let Some(h) = self.host.as_mut() {
            stream.memcpy_dtoh(&self.word, h).map_err(driver)?;
        }
        self.pending = true;
        Ok(())
    }

    /// The word as of the last [`Self::request`] (waits for that copy's event only), or, when
    /// none is pending, as [`Self::read`].
    pub fn collect(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        match (self.pending, &self.host) {
            (true, Some(h)) => {
                self.pending = false;
                let v = h.as_slice().map_err(driver)?[0];
                Self::status(v)
            }
            _ => self.read(stream),
        }
    }

    fn status(v: i32) -> Result<()> {
        match v {
            0 => Ok(()),
            1 => Err(Error::NonFinite {
                what: "keys or values appended on the GPU",
                index: 0,
                value: "NaN/Inf".into(),
            }),
            2 => Err(Error::NormOverflow {
                norm: f32::INFINITY,
                format: "f16",
                max: 65504.0,
            }),
            c => Err(Error::Cuda(format!("unknown status {c}"))),
        }
    }

    /// Clears the word (and forgets a requested copy).
    pub fn clear(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        self.pending = false;
        stream.memset_zeros(&mut self.word).map_err(driver)
    }
}

/// Shape of a quantize-append: `x` `[batch, heads, tokens, head_dim]` into a cache
/// `[batch, heads, capacity, record_bytes]`; token t < `new[b]` of sequence b goes to slot
/// `start[b] + t`.
#[derive(Debug, Clone, Copy)]
pub struct AppendShape {
    /// Sequences.
    pub batch: usize,
    /// KV heads.
    pub heads: usize,
    /// Tokens per sequence in `x` (padding included).
    pub tokens: usize,
    /// Slots per (sequence, head) in the cache.
    pub capacity: usize,
}

/// Quantize-append on `stream`: layouts in [`AppendShape`]; `start`, `new` `[batch]` on the
/// host (copied to the device asynchronously). With `tiles`, the cache is an arena and the
/// records go through the table (its `k_tile`, `k_head` describe the part written, keys or
/// values; `capacity` is unused): every tile a written slot lies in must be held. Bad input
/// values set `status` (the affected records are not written); bad shapes are errors here.
#[allow(clippy::too_many_arguments)]
pub fn quantize_append<T: KernelFloat>(
    stream: &Arc<CudaStream>,
    tables: &DeviceTables,
    x: &impl DevicePtr<T>,
    cache: &mut impl DevicePtrMut<u8>,
    shape: AppendShape,
    start: &[usize],
    new: &[usize],
    tiles: Option<&TileTable>,
    status: &mut StatusWord,
) -> Result<()> {
    let AppendShape {
        batch: b,
        heads: h,
        tokens: t,
        capacity: cap,
    } = shape;
    let d = tables.head_dim();
    if h != tables.heads() {
        return Err(Error::Config(format!(
            "{h} heads, but the tables cover {}",
            tables.heads()
        )));
    }
    need("keys/values on the device", x, b * h * t * d)?;
    if start.len() != b || new.len() != b {
        return Err(Error::Shape {
            what: "start/new lengths",
            expected: b,
            got: start.len().min(new.len()),
        });
    }
    if new.iter().any(|&n| n > t) {
        return Err(Error::Config(format!(
            "more new tokens than the {t} appended"
        )));
    }
    let rb = tables.record_bytes();
    match tiles {
        None => {
            need("cache", cache, b * h * cap * rb)?;
            for (i, (&s, &n)) in start.iter().zip(new).enumerate() {
                if s + n > cap {
                    return Err(Error::Config(format!(
                        "sequence {i}: {n} new tokens at slot {s} do not fit {cap} slots"
                    )));
                }
            }
        }
        Some(tt) => {
            let ranges: Vec<_> = start.iter().zip(new).map(|(&s, &n)| s..s + n).collect();
            check_table(
                tt,
                &ranges,
                cache.len(),
                (tt.k_tile, tt.k_head),
                rb,
                h,
                "cache",
            )?;
        }
    }
    if b == 0 || t == 0 {
        return Ok(());
    }
    let start_d = ints(stream, start, "start")?;
    let new_d = ints(stream, new, "new tokens")?;
    stream.context().bind_to_thread().map_err(driver)?;
    let (xp, _g1) = x.device_ptr(stream);
    let (cp, _g2) = cache.device_ptr_mut(stream);
    let (sp, _g3) = start_d.device_ptr(stream);
    let (np, _g4) = new_d.device_ptr(stream);
    let (chp, _g5) = tables.channels.device_ptr(stream);
    let (stp, _g6) = status.word.device_ptr_mut(stream);
    let (tt, _g7) = tiles_arg(tiles, stream)?;
    // SAFETY: every buffer was checked above to hold the elements the kernel touches; the
    // pointers stay valid until the guards drop, after the launch is queued on `stream`.
    let code = unsafe {
        tqkv_quantize_append(
            raw::<c_void>(xp),
            T::CODE,
            raw_mut(cp),
            raw(sp),
            raw(np),
            raw(chp),
            tables.specs.as_ptr(),
            tables.specs.len() as c_int,
            int("batch", b)?,
            int("heads", h)?,
            int("tokens", t)?,
            int("capacity", cap)?,
            tt.as_ref()
                .map_or(std::ptr::null(), |x| x as *const TqTiles),
            raw_mut(stp),
            stream.cu_stream() as *mut c_void,
        )
    };
    launched("tqkv_quantize_append", code)
}

/// Dequantize slots `0..n` of every (sequence, head): `cache` `[batch, heads, capacity,
/// record_bytes]` (or an arena through `tiles`, whose `k_tile`, `k_head` describe the part
/// read) → `out` `[batch, heads, n, head_dim]` in `T`.
#[allow(clippy::too_many_arguments)]
pub fn dequantize<T: KernelFloat>(
    stream: &Arc<CudaStream>,
    tables: &DeviceTables,
    cache: &impl DevicePtr<u8>,
    shape: AppendShape,
    n: usize,
    tiles: Option<&TileTable>,
    out: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    let (b, h, cap) = (shape.batch, shape.heads, shape.capacity);
    if h != tables.heads() {
        return Err(Error::Config(format!(
            "dequantize: {h} heads (tables cover {})",
            tables.heads()
        )));
    }
    let rb = tables.record_bytes();
    match tiles {
        None => {
            if n > cap {
                return Err(Error::Config(format!("dequantize: {n} slots of {cap}")));
            }
            need("cache", cache, b * h * cap * rb)?;
        }
        Some(tt) => {
            let ranges = vec![0..n; b];
            check_table(
                tt,
                &ranges,
                cache.len(),
                (tt.k_tile, tt.k_head),
                rb,
                h,
                "cache",
            )?;
        }
    }
    need("dequantize output", out, b * h * n * tables.head_dim())?;
    if b == 0 || n == 0 {
        return Ok(());
    }
    stream.context().bind_to_thread().map_err(driver)?;
    let (cp, _g1) = cache.device_ptr(stream);
    let (op, _g2) = out.device_ptr_mut(stream);
    let (chp, _g3) = tables.channels.device_ptr(stream);
    let (tt, _g4) = tiles_arg(tiles, stream)?;
    // SAFETY: sizes checked above; guards outlive the queued launch.
    let code = unsafe {
        tqkv_dequantize(
            raw(cp),
            raw_mut::<c_void>(op),
            T::CODE,
            raw(chp),
            tables.specs.as_ptr(),
            tables.specs.len() as c_int,
            int("batch", b)?,
            int("heads", h)?,
            int("capacity", cap)?,
            int("slots", n)?,
            tt.as_ref()
                .map_or(std::ptr::null(), |x| x as *const TqTiles),
            stream.cu_stream() as *mut c_void,
        )
    };
    launched("tqkv_dequantize", code)
}

/// The kernels' view of a tile table (and the guard keeping its device memory readable).
#[allow(clippy::type_complexity)]
fn tiles_arg<'a>(
    tiles: Option<&'a TileTable>,
    stream: &'a Arc<CudaStream>,
) -> Result<(Option<TqTiles>, Option<cudarc::driver::SyncOnDrop<'a>>)> {
    let Some(tt) = tiles else {
        return Ok((None, None));
    };
    let (tp, g) = tt.table.device_ptr(stream);
    Ok((
        Some(TqTiles {
            table: raw(tp),
            per_seq: int("tiles per sequence", tt.per_seq)?,
            slots: int("slots per tile", tt.slots)?,
            k_tile: tt.k_tile as c_long,
            k_head: tt.k_head as c_long,
            v_tile: tt.v_tile as c_long,
            v_head: tt.v_head as c_long,
        }),
        Some(g),
    ))
}

/// Checks a tile table against the cache it points into: `ranges[b]` (slots of sequence b)
/// all lie in held tiles, and every held tile of the table lies inside a cache of `len` bytes
/// (`strides` = bytes between tiles, between heads; `rb`-byte records of `heads` heads).
#[allow(clippy::too_many_arguments)]
fn check_table(
    tt: &TileTable,
    ranges: &[std::ops::Range<usize>],
    len: usize,
    (tile, head): (usize, usize),
    rb: usize,
    heads: usize,
    what: &str,
) -> Result<()> {
    let b = ranges.len();
    if tt.slots == 0 || tt.per_seq == 0 {
        return Err(Error::Config(format!(
            "a tile table of {} tiles of {} slots per sequence",
            tt.per_seq, tt.slots
        )));
    }
    table_shape("tile table", tt.host.len(), tt.table.len(), b * tt.per_seq)?;
    let extent = (heads.max(1) - 1) * head + tt.slots * rb;
    for &p in tt.host.iter().filter(|&&p| p >= 0) {
        let end = (p as usize)
            .checked_mul(tile)
            .and_then(|o| o.checked_add(extent));
        if end.is_none_or(|e| e > len) {
            return Err(Error::Config(format!(
                "tile {p} of the table lies outside the {what} ({len} bytes)"
            )));
        }
    }
    for (i, r) in ranges.iter().enumerate() {
        if r.is_empty() {
            continue;
        }
        let tiles = r.start / tt.slots..(r.end - 1) / tt.slots + 1;
        if tiles.end > tt.per_seq {
            return Err(Error::Config(format!(
                "sequence {i} reaches slot {} but the table has {} tiles of {} slots",
                r.end - 1,
                tt.per_seq,
                tt.slots
            )));
        }
        if let Some(j) = tiles.clone().find(|&j| tt.host[i * tt.per_seq + j] < 0) {
            return Err(Error::Config(format!(
                "sequence {i}: slots {r:?} lie in tile {j}, which the table does not hold"
            )));
        }
    }
    Ok(())
}

/// Writes rows `first .. first + n` of every head from a dense buffer `[heads, n, row_bytes]`
/// (elements of `T`, as bytes) into the tiles of an arena through `table`, the sequence's table
/// for the part ([`crate::paged::TileRows`]; the CPU reference is its `scatter`). Every tile of
/// those rows must be held and inside the arena.
#[allow(clippy::too_many_arguments)]
pub fn scatter_rows<T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    arena: &mut impl DevicePtrMut<u8>,
    dense: &impl DevicePtr<T>,
    rows: &crate::paged::TileRows,
    table: &[u32],
    first: usize,
    n: usize,
) -> Result<()> {
    let bytes = dense.len() * std::mem::size_of::<T>();
    let alen = arena.len();
    let (ap, _g1) = arena.device_ptr_mut(stream);
    let (dp, _g2) = dense.device_ptr(stream);
    copy_rows(stream, (ap, alen), (dp, bytes), rows, table, first, n, true)
}

/// Reads rows `first .. first + n` of every head out of the tiles of an arena into a dense
/// buffer `[heads, n, row_bytes]` (the CPU reference is [`crate::paged::TileRows::gather`]).
#[allow(clippy::too_many_arguments)]
pub fn gather_rows<T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    arena: &impl DevicePtr<u8>,
    dense: &mut impl DevicePtrMut<T>,
    rows: &crate::paged::TileRows,
    table: &[u32],
    first: usize,
    n: usize,
) -> Result<()> {
    let bytes = dense.len() * std::mem::size_of::<T>();
    let alen = arena.len();
    let (ap, _g1) = arena.device_ptr(stream);
    let (dp, _g2) = dense.device_ptr_mut(stream);
    copy_rows(
        stream,
        (ap, alen),
        (dp, bytes),
        rows,
        table,
        first,
        n,
        false,
    )
}

/// The row copy of [`scatter_rows`] and [`gather_rows`] on device pointers (with their sizes
/// in bytes; the callers hold the guards).
#[allow(clippy::too_many_arguments)]
fn copy_rows(
    stream: &Arc<CudaStream>,
    (ap, alen): (cudarc::driver::sys::CUdeviceptr, usize),
    (dp, dbytes): (cudarc::driver::sys::CUdeviceptr, usize),
    rows: &crate::paged::TileRows,
    table: &[u32],
    first: usize,
    n: usize,
    to_tiles: bool,
) -> Result<()> {
    let want = rows.heads * n * rows.row_bytes;
    rows.check_rows(alen, table, first..first + n, want)
        .map_err(|e| Error::Config(format!("rows to or from tiles: {e}")))?;
    if dbytes < want {
        return Err(Error::Shape {
            what: "dense rows",
            expected: want,
            got: dbytes,
        });
    }
    if n == 0 {
        return Ok(());
    }
    // The tiles of the rows only, from tile first / per_tile on.
    let span = rows.tiles_covering(first..first + n);
    let host: Vec<i32> = table[span]
        .iter()
        .map(|&t| int("tile", t as usize))
        .collect::<Result<_>>()?;
    let table_d = stream.clone_htod(&host).map_err(driver)?;
    stream.context().bind_to_thread().map_err(driver)?;
    let (tp, _g) = table_d.device_ptr(stream);
    let r = TqRows {
        table: raw(tp),
        per_tile: int("positions per tile", rows.per_tile)?,
        heads: int("heads", rows.heads)?,
        tile_bytes: rows.tile_bytes as c_long,
        offset: rows.offset as c_long,
        slot_stride: rows.slot_stride as c_long,
        head_stride: rows.head_stride as c_long,
        row_bytes: rows.row_bytes as c_long,
    };
    // SAFETY: the table's tiles and the dense buffer were checked to hold every row; the
    // callers' guards keep the buffers alive until the launch is queued.
    let code = unsafe {
        tqkv_copy_rows(
            raw_mut(ap),
            raw_mut(dp),
            &r,
            int("first row", first)?,
            int("rows", n)?,
            c_int::from(to_tiles),
            stream.cu_stream() as *mut c_void,
        )
    };
    launched("tqkv_copy_rows", code)
}

/// Shape of an attention call: queries `[batch, q_heads, tokens, head_dim]` over caches
/// `[batch, kv_heads, capacity, record_bytes]`.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Sequences.
    pub batch: usize,
    /// Query heads (a multiple of `kv_heads`).
    pub q_heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Query tokens per sequence (1 for decode).
    pub tokens: usize,
    /// Slots per (sequence, head).
    pub capacity: usize,
}

/// How the sequence is split across blocks: `splits` chunks of `chunk` slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitPlan {
    /// Chunks along the sequence.
    pub splits: usize,
    /// Slots per chunk.
    pub chunk: usize,
}

/// The split plan for `shape` when the longest visible length is `max_visible`: enough
/// blocks to fill a large GPU a few times over (about 2048), chunks of at least 256 slots, and
/// at most 128 splits (each costs a query preparation and a share of the merge). Measured on an
/// H100 (docs/KERNELS.md): batch 16 wants the blocks, batch 1 at 128K the cap, 4K the minimum.
/// This is the plan of [`AttentionKernel::Split`]; [`plan_attention_for`] gives each kernel's.
pub fn plan_attention(shape: AttentionShape, max_visible: usize) -> Result<SplitPlan> {
    plan_attention_for(AttentionKernel::Split, 1, 0, 0, shape, max_visible)
}

/// The split plan of `kernel` with a rotation cycle of `cycle` at `head_dim` on a GPU of `sms`
/// multiprocessors (0: unknown). [`AttentionKernel::Split`]: as [`plan_attention`].
/// [`AttentionKernel::TensorCore`]: 16 blocks per multiprocessor (2048 when unknown), chunks
/// of whole 64-slot tiles, at least 256 slots, at most 128 splits (not yet tuned on a GPU).
pub fn plan_attention_for(
    kernel: AttentionKernel,
    cycle: usize,
    head_dim: usize,
    sms: usize,
    shape: AttentionShape,
    max_visible: usize,
) -> Result<SplitPlan> {
    let g = shape.q_heads / shape.kv_heads.max(1);
    let rows = int("query rows per KV head", g * shape.tokens)?;
    // SAFETY: pure functions of their integer arguments.
    let (r, max_chunk) = unsafe {
        (
            tqkv_decode_attention_rows(
                kernel.code(),
                rows,
                int("cycle", cycle)?,
                int("head_dim", head_dim)?,
            ) as usize,
            tqkv_decode_attention_max_chunk(rows) as usize,
        )
    };
    if r == 0 {
        return Err(Error::Config(format!(
            "the {kernel} attention kernel takes no rotation cycle of {cycle}"
        )));
    }
    let tiles = (g * shape.tokens).div_ceil(r);
    let blocks = (shape.batch * shape.kv_heads * tiles).max(1);
    let target = match kernel {
        AttentionKernel::Split => 2048,
        AttentionKernel::TensorCore if sms > 0 => 16 * sms,
        AttentionKernel::TensorCore => 2048,
    };
    let want = target.div_ceil(blocks).clamp(1, 128);
    let n = max_visible.max(1);
    let mut chunk = n.div_ceil(want).clamp(256.min(max_chunk), max_chunk);
    if kernel == AttentionKernel::TensorCore {
        chunk = chunk.div_ceil(TILE_SLOTS) * TILE_SLOTS;
    }
    let splits = n.div_ceil(chunk);
    if splits > 1024 {
        return Err(Error::Config(format!(
            "attention over {n} slots needs more than 1024 splits of {max_chunk} (at most {} \
             slots with {} query rows per KV head)",
            1024 * max_chunk,
            g * shape.tokens
        )));
    }
    Ok(SplitPlan { splits, chunk })
}

/// Slots per tile of the tensor-core kernel's staging (its chunks are multiples of it).
pub const TILE_SLOTS: usize = 64;

/// A per-sequence table of tiles through which the kernels read and write records (a paged
/// arena shared by many sequences, [`crate::paged::RecordTiles`]): slot s of (sequence b, KV
/// head h) is at byte `table[b·per_seq + s/slots]·k_tile + h·k_head + (s % slots)·record_bytes`
/// of the key base, values likewise with `v_tile`, `v_head` from the value base. An arena of
/// tiles `[keys kv_heads × slots × Rk | values kv_heads × slots × Rv]` has `k_tile = v_tile =`
/// the tile bytes, `k_head = slots·Rk`, `v_head = slots·Rv`. Entries −1: tiles not held. Every
/// tile an op reads or writes must be held and in bounds (the wrappers check the entries
/// against the buffers' sizes).
pub struct TileTable<'a> {
    /// `[batch, per_seq]` physical tile indices on the device.
    pub table: &'a CudaSlice<i32>,
    /// The same table on the host (checked against the buffers' sizes before a launch).
    pub host: &'a [i32],
    /// Logical tiles per sequence (columns of the table).
    pub per_seq: usize,
    /// Slots per tile.
    pub slots: usize,
    /// Key bytes between physical tiles.
    pub k_tile: usize,
    /// Key bytes between the KV heads of one tile.
    pub k_head: usize,
    /// Value bytes between physical tiles.
    pub v_tile: usize,
    /// Value bytes between the KV heads of one tile.
    pub v_head: usize,
}

/// How an attention is computed: which split kernel, and a tile table instead of the
/// contiguous `[batch, kv_heads, capacity, record_bytes]` layout.
#[derive(Default)]
pub struct AttentionOptions<'a> {
    /// The split kernel.
    pub kernel: AttentionKernel,
    /// A tile table (None: the contiguous layout).
    pub tiles: Option<TileTable<'a>>,
    /// Buffers to reuse (None: allocated per call).
    pub workspace: Option<&'a std::sync::Mutex<Workspace>>,
}

/// Whether [`AttentionKernel::TensorCore`] takes the layouts of `kt` and `vt` (MSE-only groups
/// of 1–4 bits, key groups of multiples of 16 channels and value groups of 8, head_dim 64, 96,
/// 128 or 256); [`AttentionKernel::Split`] takes every layout the tables accept.
pub fn attention_supported(kernel: AttentionKernel, kt: &DeviceTables, vt: &DeviceTables) -> bool {
    if kt.cycle() != vt.cycle() {
        return false;
    }
    // SAFETY: reads the two host specs.
    unsafe {
        tqkv_decode_attention_supported(kernel.code(), kt.spec(), vt.spec(), kt.cycle() as c_int)
            == 1
    }
}

/// Device buffers an attention call can reuse instead of allocating them (one per layer, as
/// the candle layer keeps it): the split workspace and the per-query lengths, grown on demand
/// (by a quarter more than asked) and never shrunk, and the device's multiprocessor count,
/// asked once. Calls that share one must run on one stream.
#[derive(Default)]
pub struct Workspace {
    floats: Option<CudaSlice<f32>>,
    ints: Option<CudaSlice<i32>>,
    /// The stream's device's multiprocessors, asked once (the split plan's input).
    sms: Option<usize>,
}

impl Workspace {
    /// Multiprocessors of the stream's device, from the driver on first use.
    fn multiprocessors(&mut self, stream: &Arc<CudaStream>) -> usize {
        *self.sms.get_or_insert_with(|| multiprocessors(stream))
    }

    /// Makes room for `floats` workspace floats and `ints` lengths.
    fn reserve(&mut self, stream: &Arc<CudaStream>, floats: usize, ints: usize) -> Result<()> {
        fn grow<T: DeviceRepr>(
            buf: &mut Option<CudaSlice<T>>,
            stream: &Arc<CudaStream>,
            n: usize,
        ) -> Result<()> {
            if buf.as_ref().is_none_or(|b| b.len() < n) {
                let want = n.max(1) + n / 4;
                // SAFETY: every element a launch reads is written first (workspace: by the
                // split kernels before the merge; lengths: by the copy before the launch).
                *buf = Some(unsafe { stream.alloc::<T>(want) }.map_err(driver)?);
            }
            Ok(())
        }
        grow(&mut self.floats, stream, floats)?;
        grow(&mut self.ints, stream, ints.max(1))
    }

    /// Bytes held on the device.
    pub fn bytes(&self) -> usize {
        self.floats.as_ref().map_or(0, |b| b.len() * 4)
            + self.ints.as_ref().map_or(0, |b| b.len() * 4)
    }
}

/// Sets `status` (without a host round trip) when `x` holds a NaN or ±Inf: the device-side
/// check of values that reach a cache without the quantize-append kernel (exact tokens,
/// full-precision caches). `n` elements of `x`, contiguous.
pub fn check_finite<T: KernelFloat>(
    stream: &Arc<CudaStream>,
    x: &impl DevicePtr<T>,
    n: usize,
    status: &mut StatusWord,
) -> Result<()> {
    need("checked values", x, n)?;
    stream.context().bind_to_thread().map_err(driver)?;
    let (xp, _g1) = x.device_ptr(stream);
    let (sp, _g2) = status.word.device_ptr_mut(stream);
    // SAFETY: n elements of x exist (checked); the status word is one int.
    let code = unsafe {
        tqkv_check_finite(
            raw::<c_void>(xp),
            T::CODE,
            n as c_long,
            raw_mut(sp),
            stream.cu_stream() as *mut c_void,
        )
    };
    launched("tqkv_check_finite", code)
}

/// Multiprocessors of the stream's device (0 when the driver does not say).
fn multiprocessors(stream: &Arc<CudaStream>) -> usize {
    use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT as SMS;
    stream
        .context()
        .attribute(SMS)
        .map_or(0, |n| n.max(0) as usize)
}

/// Fused attention over the packed caches: `q` `[batch, q_heads, tokens, head_dim]` in `T`,
/// `kcache`/`vcache` `[batch, kv_heads, capacity, record_bytes]`, `visible` `[batch, tokens]`
/// on the host (query (b, t) sees slots `0..visible[b·tokens + t]`), `out`
/// `[batch, q_heads, tokens, head_dim]` in `O` (f32, f16 or bf16); softmax(scale · q·Kᵀ)·V
/// computed from the codes.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention<T: KernelFloat, O: KernelFloat>(
    stream: &Arc<CudaStream>,
    kt: &DeviceTables,
    vt: &DeviceTables,
    q: &impl DevicePtr<T>,
    kcache: &impl DevicePtr<u8>,
    vcache: &impl DevicePtr<u8>,
    shape: AttentionShape,
    visible: &[usize],
    scale: f32,
    status: &StatusWord,
    out: &mut impl DevicePtrMut<O>,
) -> Result<()> {
    decode_attention_mixed(
        stream, kt, vt, q, kcache, vcache, shape, visible, None, scale, status, out,
    )
}

/// The full-precision part of an attention ([`decode_attention_mixed`]): sinks and windows of
/// exact recent tokens, rows in the tiles of an arena ([`crate::paged::ExactTiles`]: position
/// p of sequence b in tile `table[b·per_seq + p / rows]`, f16 or q8_0 rows).
pub struct ExactPart<'a> {
    /// The arena.
    pub arena: &'a CudaSlice<u8>,
    /// `[batch, per_seq]` tiles on the device (−1: not held).
    pub table: &'a CudaSlice<i32>,
    /// The same table on the host (checked before a launch).
    pub host_table: &'a [i32],
    /// Table entries per sequence.
    pub per_seq: usize,
    /// How the rows fill a tile.
    pub tiles: crate::paged::ExactTiles,
    /// Sink positions.
    pub sinks: usize,
    /// `[batch, tokens]` on the host: query (b, t) reads the records of positions
    /// `sinks..packed_end[b·tokens + t]`, and positions `0..min(sinks, vis)` and
    /// `packed_end..vis` from the rows (each in `min(sinks, vis)..=vis`).
    pub packed_end: &'a [usize],
}

/// [`decode_attention`] where some positions are read in full precision from an
/// [`ExactPart`] (one softmax over all; the CPU reference is
/// [`crate::attention::attend_mixed`]); `None` is [`decode_attention`].
#[allow(clippy::too_many_arguments)]
pub fn decode_attention_mixed<T: KernelFloat, O: KernelFloat>(
    stream: &Arc<CudaStream>,
    kt: &DeviceTables,
    vt: &DeviceTables,
    q: &impl DevicePtr<T>,
    kcache: &impl DevicePtr<u8>,
    vcache: &impl DevicePtr<u8>,
    shape: AttentionShape,
    visible: &[usize],
    exact: Option<&ExactPart>,
    scale: f32,
    status: &StatusWord,
    out: &mut impl DevicePtrMut<O>,
) -> Result<()> {
    decode_attention_with(
        stream,
        kt,
        vt,
        q,
        kcache,
        vcache,
        shape,
        visible,
        exact,
        &AttentionOptions::default(),
        scale,
        status,
        out,
    )
}

/// [`decode_attention_mixed`] with a choice of kernel and, for
/// [`AttentionKernel::TensorCore`], a [`TileTable`] (`capacity` of `shape` is then unused:
/// the caches are the tables' pools, of any size the table's entries fit). A kernel that does
/// not take the layout ([`attention_supported`]) is an error, not a silent fallback.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention_with<T: KernelFloat, O: KernelFloat>(
    stream: &Arc<CudaStream>,
    kt: &DeviceTables,
    vt: &DeviceTables,
    q: &impl DevicePtr<T>,
    kcache: &impl DevicePtr<u8>,
    vcache: &impl DevicePtr<u8>,
    shape: AttentionShape,
    visible: &[usize],
    exact: Option<&ExactPart>,
    opts: &AttentionOptions,
    scale: f32,
    status: &StatusWord,
    out: &mut impl DevicePtrMut<O>,
) -> Result<()> {
    let AttentionShape {
        batch: b,
        q_heads: hq,
        kv_heads: hkv,
        tokens: t,
        capacity: cap,
    } = shape;
    let d = kt.head_dim();
    if vt.head_dim() != d || kt.heads() != hkv || vt.heads() != hkv {
        return Err(Error::Config(format!(
            "attention: key/value tables ({}/{} heads of {}/{}) do not match {hkv} KV heads",
            kt.heads(),
            vt.heads(),
            kt.head_dim(),
            vt.head_dim()
        )));
    }
    if hkv == 0 || hq % hkv != 0 {
        return Err(Error::Config(format!(
            "{hq} query heads are not a multiple of {hkv} KV heads"
        )));
    }
    if visible.len() != b * t {
        return Err(Error::Shape {
            what: "visible lengths",
            expected: b * t,
            got: visible.len(),
        });
    }
    let max_visible = visible.iter().copied().max().unwrap_or(0);
    let kernel = opts.kernel;
    if !attention_supported(kernel, kt, vt) {
        return Err(Error::Config(format!(
            "the {kernel} attention kernel does not take this layout (key groups {:?}, value \
             groups {:?}, head_dim {d}, cycle {})",
            group_shape(kt.spec()),
            group_shape(vt.spec()),
            kt.cycle()
        )));
    }
    need("queries", q, b * hq * t * d)?;
    match &opts.tiles {
        None => {
            if max_visible > cap {
                return Err(Error::Config(format!(
                    "a query sees {max_visible} slots but the cache has {cap}"
                )));
            }
            need("key cache", kcache, b * hkv * cap * kt.record_bytes())?;
            need("value cache", vcache, b * hkv * cap * vt.record_bytes())?;
        }
        Some(tt) => {
            // The records each sequence's queries read: after the sinks, up to their packed
            // ends (with an exact part), else up to what they see.
            let ranges: Vec<_> = (0..b)
                .map(|i| {
                    let (from, ends) = match exact {
                        Some(e) => (e.sinks, &e.packed_end[i * t..(i + 1) * t]),
                        None => (0, &visible[i * t..(i + 1) * t]),
                    };
                    let to = ends.iter().copied().max().unwrap_or(0);
                    from.min(to)..to
                })
                .collect();
            if exact.is_some_and(|e| e.packed_end.len() != b * t) {
                return Err(Error::Shape {
                    what: "packed ends",
                    expected: b * t,
                    got: exact.map_or(0, |e| e.packed_end.len()),
                });
            }
            let (rk, rv) = (kt.record_bytes(), vt.record_bytes());
            check_table(
                tt,
                &ranges,
                kcache.len(),
                (tt.k_tile, tt.k_head),
                rk,
                hkv,
                "key cache",
            )?;
            check_table(
                tt,
                &ranges,
                vcache.len(),
                (tt.v_tile, tt.v_head),
                rv,
                hkv,
                "value cache",
            )?;
        }
    }
    need("attention output", out, b * hq * t * d)?;
    if b == 0 || t == 0 {
        return Ok(());
    }
    // The exact part: where each query's records end, and how many blocks read the rest.
    let mut xsplits = 0usize;
    if let Some(e) = exact {
        if e.packed_end.len() != b * t {
            return Err(Error::Shape {
                what: "packed ends",
                expected: b * t,
                got: e.packed_end.len(),
            });
        }
        if let Some((i, _)) = e
            .packed_end
            .iter()
            .zip(visible)
            .enumerate()
            .find(|(_, (&pe, &vis))| pe < e.sinks.min(vis) || pe > vis)
        {
            return Err(Error::Config(format!(
                "query {i}: packed end {} is outside {}..={}",
                e.packed_end[i],
                e.sinks.min(visible[i]),
                visible[i]
            )));
        }
        check_exact(e, b, t, hkv, d, visible)?;
        // Positions a block may read: its sinks, then window starts to visible ends.
        let lo = e
            .packed_end
            .iter()
            .zip(visible)
            .filter(|(pe, vis)| pe < vis)
            .map(|(&pe, _)| pe)
            .min()
            .unwrap_or(max_visible);
        let positions = e.sinks.min(max_visible) + max_visible.saturating_sub(lo);
        xsplits = positions.div_ceil(256).clamp(1, 64);
    }
    // The caller's cached buffers (and multiprocessor count) when given, else fresh ones.
    let mut cached = match opts.workspace {
        Some(w) => Some(
            w.lock()
                .map_err(|_| Error::Config("the attention workspace lock is poisoned".into()))?,
        ),
        None => None,
    };
    let mut local = Workspace::default();
    let wsp: &mut Workspace = cached.as_deref_mut().unwrap_or(&mut local);
    let sms = wsp.multiprocessors(stream);
    let plan = plan_attention_for(kernel, kt.cycle(), d, sms, shape, max_visible)?;
    let (bi, hqi, hkvi, ti) = (
        int("batch", b)?,
        int("q heads", hq)?,
        int("kv heads", hkv)?,
        int("tokens", t)?,
    );
    let (si, ci) = (int("splits", plan.splits)?, int("chunk", plan.chunk)?);
    let total = int("splits", plan.splits + xsplits)?;
    // SAFETY: pure function of its arguments; reads the host spec.
    if kt.cycle() != vt.cycle() {
        return Err(Error::Config(format!(
            "attention: {} key and {} value rotations in the cycle",
            kt.cycle(),
            vt.cycle()
        )));
    }
    let cycle = kt.cycle() as c_int;
    let ws_len = unsafe {
        tqkv_decode_attention_workspace(kernel.code(), vt.spec(), cycle, bi, hqi, hkvi, ti, total)
    };
    if ws_len < 0 {
        return Err(Error::Config(format!(
            "the {kernel} attention kernel has no workspace for this shape"
        )));
    }
    // The workspace and the per-query lengths (visible, then packed ends).
    let host_ints = visible
        .iter()
        .chain(exact.map_or(&[][..], |e| e.packed_end))
        .map(|&x| int("visible length", x))
        .collect::<Result<Vec<_>>>()?;
    wsp.reserve(stream, ws_len.max(1) as usize, host_ints.len())?;
    let (Some(ws), Some(ints_d)) = (wsp.floats.as_mut(), wsp.ints.as_mut()) else {
        unreachable!("reserved above")
    };
    stream
        .memcpy_htod(&host_ints, &mut ints_d.slice_mut(0..host_ints.len()))
        .map_err(driver)?;
    stream.context().bind_to_thread().map_err(driver)?;
    let (qp, _g1) = q.device_ptr(stream);
    let (kp, _g2) = kcache.device_ptr(stream);
    let (vp, _g3) = vcache.device_ptr(stream);
    let (visp, _g4) = ints_d.device_ptr(stream);
    let pep = visp + (b * t * std::mem::size_of::<c_int>()) as u64;
    let (kchp, _g5) = kt.channels.device_ptr(stream);
    let (vchp, _g6) = vt.channels.device_ptr(stream);
    let (wp, _g7) = ws.device_ptr_mut(stream);
    let (stp, _g8) = status.word.device_ptr(stream);
    let (op, _g9) = out.device_ptr_mut(stream);
    let mut guards = Vec::new();
    let mut guards_t = Vec::new();
    let ex = match exact {
        Some(e) => {
            let (ap, g1) = e.arena.device_ptr(stream);
            let (tp, g2) = e.table.device_ptr(stream);
            guards.push(vec![g1, g2]);
            Some(TqExact {
                base: raw(ap),
                table: raw(tp),
                packed_end: raw(pep),
                per_seq: int("exact tiles per sequence", e.per_seq)?,
                rows: int("exact positions per tile", e.tiles.rows)?,
                sinks: int("sinks", e.sinks)?,
                splits: int("exact splits", xsplits)?,
                format: match e.tiles.format {
                    crate::ExactFormat::F16 => 0,
                    crate::ExactFormat::Q8 => 1,
                },
                heads: int("kv heads", hkv)?,
                tile_bytes: e.tiles.tile_bytes as c_long,
            })
        }
        None => None,
    };
    let (tiles, g_t) = tiles_arg(opts.tiles.as_ref(), stream)?;
    guards_t.extend(g_t);
    // SAFETY: sizes checked above; the workspace is sized by the kernel's own formula for all
    // splits; every slot a block writes is fully written before the merge reads it (same
    // stream); the exact part's pointers outlive the launch (guards held).
    let code = unsafe {
        tqkv_decode_attention(
            kernel.code(),
            raw::<c_void>(qp),
            T::CODE,
            raw(kp),
            raw(vp),
            raw(visp),
            raw(kchp),
            raw(vchp),
            kt.specs.as_ptr(),
            vt.specs.as_ptr(),
            cycle,
            bi,
            hqi,
            hkvi,
            ti,
            int("capacity", cap)?,
            tiles
                .as_ref()
                .map_or(std::ptr::null(), |x| x as *const TqTiles),
            scale,
            si,
            ci,
            ex.as_ref()
                .map_or(std::ptr::null(), |x| x as *const TqExact),
            raw_mut(wp),
            raw(stp),
            raw_mut::<c_void>(op),
            O::CODE,
            stream.cu_stream() as *mut c_void,
        )
    };
    drop(guards);
    drop(guards_t);
    launched("tqkv_decode_attention", code)
}

/// (dim, code bits, sketch bits) of each group of a spec, for messages.
fn group_shape(s: &TqSpec) -> Vec<(c_int, c_int, c_int)> {
    s.groups[..s.num_groups.clamp(0, 2) as usize]
        .iter()
        .map(|g| (g.dim, g.mse_bits, g.m))
        .collect()
}

/// A table's host and device copies both of `expected` entries.
fn table_shape(what: &'static str, host: usize, device: usize, expected: usize) -> Result<()> {
    if host != expected || device != host {
        return Err(Error::Shape {
            what,
            expected,
            got: host.min(device),
        });
    }
    Ok(())
}

/// An exact part's table and tiles against its arena: every row a query reads (its sinks and
/// window) lies in a held tile inside the arena.
fn check_exact(
    e: &ExactPart,
    b: usize,
    t: usize,
    hkv: usize,
    d: usize,
    visible: &[usize],
) -> Result<()> {
    let x = &e.tiles;
    if x.heads != hkv || x.dim != d || x.rows == 0 {
        return Err(Error::Config(format!(
            "exact rows of {} heads × {} channels ({} per tile) for {hkv} heads of {d}",
            x.heads, x.dim, x.rows
        )));
    }
    if x.format == crate::ExactFormat::Q8 && d % 32 != 0 {
        return Err(Error::Config(format!(
            "q8_0 exact rows need a head_dim that is a multiple of 32, not {d}"
        )));
    }
    if x.tile_bytes < x.rows * x.heads * x.row_bytes() || x.tile_bytes % 16 != 0 {
        return Err(Error::Config(format!(
            "tiles of {} bytes do not hold {} exact positions",
            x.tile_bytes, x.rows
        )));
    }
    table_shape(
        "exact table",
        e.host_table.len(),
        e.table.len(),
        b * e.per_seq,
    )?;
    let tiles = e.arena.len() / x.tile_bytes;
    for i in 0..b {
        let row = &e.host_table[i * e.per_seq..(i + 1) * e.per_seq];
        let qs = i * t..(i + 1) * t;
        let vis = visible[qs.clone()].iter().copied().max().unwrap_or(0);
        let lo = qs
            .filter(|&j| e.packed_end[j] < visible[j])
            .map(|j| e.packed_end[j])
            .min()
            .unwrap_or(vis);
        let held = |p: usize| {
            row.get(p / x.rows)
                .is_some_and(|&tile| tile >= 0 && (tile as usize) < tiles)
        };
        if let Some(p) = (0..e.sinks.min(vis)).chain(lo..vis).find(|&p| !held(p)) {
            return Err(Error::Config(format!(
                "sequence {i}: the exact row of position {p} is not in a held tile of the arena"
            )));
        }
    }
    Ok(())
}

/// Whether a CUDA driver answers on this machine (false where the driver library is missing
/// or initialisation fails, e.g. on machines without a GPU), whatever cudarc's linking mode.
pub fn driver_present() -> bool {
    // With run-time loading, cudarc panics when the library is absent: contain that.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let ok = std::panic::catch_unwind(|| cudarc::driver::result::init().is_ok()).unwrap_or(false);
    std::panic::set_hook(hook);
    ok
}
