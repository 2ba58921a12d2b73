//! The exact part of a TurboQuant cache with attention sinks or a window of recent tokens
//! ([`tqkv::KvSpec::sinks`], [`tqkv::KvSpec::window`], [`tqkv::KvSpec::budget_bits`]), in f16
//! or llama.cpp's q8_0 ([`tqkv::KvSpec::exact_format`]).
//!
//! The rows live in the cache's arena, in tiles of consecutive positions
//! ([`tqkv::paged::ExactTiles`]): position p of a sequence in entry p / rows of its exact
//! table, a row being the key vector then the value vector — f16, or q8_0 codes (the integer +
//! 128) then the f16 scales of each block of 32 channels. Keys are stored as the records see
//! them (centred when the spec centres keys), so that scores from both parts differ by nothing
//! but the quantization.

use crate::tile_ops::{GatherRows, RowsPlace, ScatterRows};
use candle_core::{DType, Result, Tensor};
use std::ops::Range;
use tqkv::paged::ExactTiles;
use tqkv::ExactFormat;

const QB: usize = ExactFormat::Q8_BLOCK;

/// q8_0 of `x` `[b, h, n, d]` (d a multiple of 32) after rounding it to f16: per block of 32
/// channels the scale s = f16(max |x| / 127) and the codes round(x / s) + 128 (u8); (codes
/// `[b, h, n, d]`, scales `[b, h, n, d / 32]` f16).
pub fn q8_encode(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, h, n, d) = x.dims4()?;
    let nb = d / QB;
    let x = x
        .to_dtype(DType::F16)?
        .to_dtype(DType::F32)?
        .reshape((b, h, n, nb, QB))?;
    let scale16 = (x.abs()?.max_keepdim(4)? / 127.0)?.to_dtype(DType::F16)?;
    let scale = scale16.to_dtype(DType::F32)?;
    let safe = scale.eq(0f32)?.where_cond(&scale.ones_like()?, &scale)?;
    let codes = (x.broadcast_div(&safe)?.round()?.clamp(-127f32, 127f32)? + 128.0)?
        .to_dtype(DType::U8)?
        .reshape((b, h, n, d))?;
    Ok((codes, scale16.reshape((b, h, n, nb))?))
}

/// The f16 vectors of q8_0 `codes` `[b, h, n, d]` and `scales` `[b, h, n, d / 32]`.
pub fn q8_decode(codes: &Tensor, scales: &Tensor) -> Result<Tensor> {
    let (b, h, n, d) = codes.dims4()?;
    let nb = d / QB;
    let c = (codes.to_dtype(DType::F32)? - 128.0)?.reshape((b, h, n, nb, QB))?;
    c.broadcast_mul(&scales.to_dtype(DType::F32)?.reshape((b, h, n, nb, 1))?)?
        .reshape((b, h, n, d))?
        .to_dtype(DType::F16)
}

/// The exact rows of one cache: how they fill tiles, and the writes and reads of one
/// sequence's rows through its exact table.
#[derive(Debug, Clone, Copy)]
pub struct ExactPart {
    /// The layout in the tiles.
    pub tiles: ExactTiles,
}

impl ExactPart {
    /// `x` `[.., d]` as this part would give it back: rounded to f16, and for q8_0 quantized.
    pub fn round(&self, x: &Tensor) -> Result<Tensor> {
        match self.tiles.format {
            ExactFormat::F16 => x.to_dtype(DType::F16),
            ExactFormat::Q8 => {
                let (c, s) = q8_encode(x)?;
                q8_decode(&c, &s)
            }
        }
    }

    /// Writes keys and values `[1, heads, n, dim]` as positions `p0..p0 + n` of the sequence
    /// whose exact table is `table` (every tile of those positions held) into `arena`.
    pub fn write(
        &self,
        arena: &Tensor,
        table: &[u32],
        p0: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        let n = k.dim(2)?;
        if n == 0 {
            return Ok(());
        }
        let parts = match self.tiles.format {
            ExactFormat::F16 => vec![k.to_dtype(DType::F16)?, v.to_dtype(DType::F16)?],
            ExactFormat::Q8 => {
                let (kc, ks) = q8_encode(k)?;
                let (vc, vs) = q8_encode(v)?;
                vec![kc, ks, vc, vs]
            }
        };
        for (i, x) in parts.iter().enumerate() {
            arena.inplace_op2(
                &x.contiguous()?,
                &ScatterRows(RowsPlace {
                    rows: self.tiles.part(i),
                    table: table.to_vec(),
                    first: p0,
                    n,
                }),
            )?;
        }
        Ok(())
    }

    /// Keys and values (f16 `[1, heads, range.len(), dim]`) of positions `range` of the
    /// sequence whose exact table is `table`.
    pub fn read(
        &self,
        arena: &Tensor,
        table: &[u32],
        range: Range<usize>,
    ) -> Result<(Tensor, Tensor)> {
        let gather = |i: usize, dtype: DType| {
            arena.apply_op1_no_bwd(&GatherRows {
                place: RowsPlace {
                    rows: self.tiles.part(i),
                    table: table.to_vec(),
                    first: range.start,
                    n: range.len(),
                },
                dtype,
            })
        };
        match self.tiles.format {
            ExactFormat::F16 => Ok((gather(0, DType::F16)?, gather(1, DType::F16)?)),
            ExactFormat::Q8 => Ok((
                q8_decode(&gather(0, DType::U8)?, &gather(1, DType::F16)?)?,
                q8_decode(&gather(2, DType::U8)?, &gather(3, DType::F16)?)?,
            )),
        }
    }
}
