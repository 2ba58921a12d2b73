//! Candle ops that move rows between dense tensors and an arena's tiles
//! ([`crate::arena::TileArena`], layouts in `tqkv::paged`): the writes and reads of the exact
//! rows of a TurboQuant cache and of a paged full-precision cache.
//!
//! * [`ScatterRows`] (`InplaceOp2`): dst the arena u8 `[tiles, tile_bytes]` (contiguous, offset
//!   0); src `[heads, n, width]` (or `[1, heads, n, width]`) contiguous, of any dtype whose
//!   `width · size` is the part's row bytes: row (i, h) goes to slot `first + i` of head h.
//! * [`GatherRows`] (`CustomOp1`): the arena → `[1, heads, n, width]` of `dtype`, the same rows.
//!
//! CPU: [`tqkv::paged::TileRows::scatter`] / [`tqkv::paged::TileRows::gather`]. CUDA: the
//! row-copy kernel of `tqkv::cuda` on candle's stream ([`crate::cuda_ops`]).

use candle_core::{CpuStorage, CudaStorage, DType, Layout, Result, Shape};
use tqkv::paged::TileRows;

/// Rows of one sequence's part copied to or from the arena.
#[derive(Debug, Clone)]
pub struct RowsPlace {
    /// Where the part's rows sit.
    pub rows: TileRows,
    /// The sequence's table for the part.
    pub table: Vec<u32>,
    /// First slot (position) copied.
    pub first: usize,
    /// Slots copied.
    pub n: usize,
}

/// Writes rows into the arena: see the module docs.
pub struct ScatterRows(pub RowsPlace);

/// Reads rows out of the arena: see the module docs.
pub struct GatherRows {
    /// The rows.
    pub place: RowsPlace,
    /// dtype of the dense output (its size divides the row bytes).
    pub dtype: DType,
}

/// Bytes of a contiguous CPU storage region (little-endian elements).
pub(crate) fn cpu_bytes(s: &CpuStorage, l: &Layout) -> Result<Vec<u8>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("rows copied to tiles must be contiguous")
    };
    Ok(match s {
        CpuStorage::U8(v) => v[a..b].to_vec(),
        CpuStorage::F16(v) => v[a..b].iter().flat_map(|x| x.to_le_bytes()).collect(),
        CpuStorage::BF16(v) => v[a..b].iter().flat_map(|x| x.to_le_bytes()).collect(),
        CpuStorage::F32(v) => v[a..b].iter().flat_map(|x| x.to_le_bytes()).collect(),
        _ => candle_core::bail!("rows copied to tiles: u8, f16, bf16 or f32"),
    })
}

/// A CPU storage of `dtype` from little-endian bytes.
pub(crate) fn cpu_from_bytes(b: &[u8], dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::U8 => CpuStorage::U8(b.to_vec()),
        DType::F16 => CpuStorage::F16(
            b.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                .collect(),
        ),
        DType::BF16 => CpuStorage::BF16(
            b.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                .collect(),
        ),
        DType::F32 => CpuStorage::F32(
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        other => candle_core::bail!("rows read from tiles: u8, f16, bf16 or f32, not {other:?}"),
    })
}

/// The arena's bytes, mutably (contiguous u8 at offset 0).
pub(crate) fn arena_bytes_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [u8]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::U8(v), Some((0, end))) => Ok(&mut v[..end]),
        _ => candle_core::bail!("the arena must be a contiguous u8 tensor at offset 0"),
    }
}

/// The arena's bytes (contiguous u8 at offset 0).
pub(crate) fn arena_bytes<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u8]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::U8(v), Some((0, end))) => Ok(&v[..end]),
        _ => candle_core::bail!("the arena must be a contiguous u8 tensor at offset 0"),
    }
}

impl RowsPlace {
    /// Elements of `dtype` per row; errors unless they divide the row bytes.
    pub fn width(&self, dtype: DType) -> Result<usize> {
        let rb = self.rows.row_bytes;
        if rb % dtype.size_in_bytes() != 0 {
            candle_core::bail!("rows of {rb} bytes are not a whole number of {dtype:?} elements");
        }
        Ok(rb / dtype.size_in_bytes())
    }

    /// The slots copied.
    pub fn slots(&self) -> std::ops::Range<usize> {
        self.first..self.first + self.n
    }
}

impl candle_core::InplaceOp2 for ScatterRows {
    fn name(&self) -> &'static str {
        "tqkv-scatter-rows"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        let bytes = cpu_bytes(src, sl)?;
        let arena = arena_bytes_mut(dst, dl)?;
        let p = &self.0;
        p.rows
            .scatter(arena, &p.table, p.slots(), &bytes)
            .map_err(candle_core::Error::wrap)
    }

    fn cuda_fwd(
        &self,
        dst: &mut CudaStorage,
        dl: &Layout,
        src: &CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        crate::cuda_ops::scatter_rows(&self.0, dst, dl, src, sl)
    }
}

impl candle_core::CustomOp1 for GatherRows {
    fn name(&self) -> &'static str {
        "tqkv-gather-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = &self.place;
        let w = p.width(self.dtype)?;
        let arena = arena_bytes(s, l)?;
        let mut out = vec![0u8; p.rows.heads * p.n * p.rows.row_bytes];
        p.rows
            .gather(arena, &p.table, p.slots(), &mut out)
            .map_err(candle_core::Error::wrap)?;
        Ok((
            cpu_from_bytes(&out, self.dtype)?,
            Shape::from((1, p.rows.heads, p.n, w)),
        ))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        crate::cuda_ops::gather_rows(self, s, l)
    }
}
