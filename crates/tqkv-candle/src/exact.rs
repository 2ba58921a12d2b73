//! The exact part of a TurboQuant cache with attention sinks or a window of recent tokens
//! ([`tqkv::KvSpec::sinks`], [`tqkv::KvSpec::window`], [`tqkv::KvSpec::budget_bits`]), in f16
//! or llama.cpp's q8_0 ([`tqkv::KvSpec::exact_format`]).
//!
//! Layout: tensors `[batch, kv_heads, sinks + ring, width]`, contiguous, on the cache's device —
//! f16: keys and values (width head_dim); q8_0: key codes (u8, the integer + 128, width
//! head_dim), key scales (f16, width head_dim / 32), value codes, value scales. Position p <
//! sinks sits at slot p; position p ≥ sinks at slot `sinks + p % ring` — a ring over the most
//! recent positions, which the cache keeps large enough for the window of every query of an
//! append plus the tokens not yet quantized. Keys are stored as the records see them (centred
//! when the spec centres keys), so that scores from both parts differ by nothing but the
//! quantization.

use candle_core::{DType, Device, Result, Tensor};
use std::ops::Range;
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

/// Sinks and the ring of recent tokens.
#[derive(Debug, Clone)]
pub struct ExactStore {
    /// The stored tensors (see the module docs): `[k, v]` in f16, or `[k codes, k scales, v
    /// codes, v scales]` in q8_0.
    pub parts: Vec<Tensor>,
    /// How the vectors are stored.
    pub format: ExactFormat,
    /// Sink slots.
    pub sinks: usize,
    /// Ring slots (0: sinks only).
    pub ring: usize,
}

impl ExactStore {
    /// The slot of position `pos` (a sink, or a ring position when the ring is not empty).
    pub fn slot(&self, pos: usize) -> usize {
        if pos < self.sinks {
            pos
        } else {
            self.sinks + pos % self.ring.max(1)
        }
    }

    /// A store of `ring` ring slots for `batch` sequences of `heads` × `dim`, holding the sinks
    /// of `old` and, of sequence b, the ring positions `keep[b]` of `old` (copied as stored).
    #[allow(clippy::too_many_arguments)]
    pub fn with_ring(
        old: Option<&ExactStore>,
        (batch, heads, dim): (usize, usize, usize),
        format: ExactFormat,
        sinks: usize,
        ring: usize,
        keep: &[Range<usize>],
        device: &Device,
    ) -> Result<Self> {
        let slots = sinks + ring;
        let parts = match format {
            ExactFormat::F16 => {
                let z = || Tensor::zeros((batch, heads, slots, dim), DType::F16, device);
                vec![z()?, z()?]
            }
            ExactFormat::Q8 => {
                let codes = || Tensor::full(128u8, (batch, heads, slots, dim), device);
                let scales = || Tensor::zeros((batch, heads, slots, dim / QB), DType::F16, device);
                vec![codes()?, scales()?, codes()?, scales()?]
            }
        };
        let fresh = ExactStore {
            parts,
            format,
            sinks,
            ring,
        };
        if let Some(old) = old {
            if old.format != format {
                candle_core::bail!("exact store: cannot copy {:?} into {format:?}", old.format);
            }
            if sinks > 0 {
                for (o, f) in old.parts.iter().zip(&fresh.parts) {
                    f.slice_set(&o.narrow(2, 0, sinks)?.contiguous()?, 2, 0)?;
                }
            }
            for (b, r) in keep.iter().enumerate() {
                if old.ring == 0 || r.is_empty() {
                    continue;
                }
                let raw = old.read_raw(b, r.clone())?;
                fresh.write_raw(b, r.start, &raw)?;
            }
        }
        Ok(fresh)
    }

    /// `x` `[.., d]` as this store would give it back: rounded to f16, and for q8_0 quantized.
    pub fn round(&self, x: &Tensor) -> Result<Tensor> {
        match self.format {
            ExactFormat::F16 => x.to_dtype(DType::F16),
            ExactFormat::Q8 => {
                let (c, s) = q8_encode(x)?;
                q8_decode(&c, &s)
            }
        }
    }

    /// The stored tensors of positions `range` (all sinks, or all ring positions) of sequence
    /// `b`, each `[1, heads, range.len(), width]`.
    pub(crate) fn read_raw(&self, b: usize, range: Range<usize>) -> Result<Vec<Tensor>> {
        let mut runs = Vec::new();
        self.pieces(range, |slot, _, len| {
            runs.push((slot, len));
            Ok(())
        })?;
        self.parts
            .iter()
            .map(|t| {
                let t = t.narrow(0, b, 1)?;
                let p: Vec<Tensor> = runs
                    .iter()
                    .map(|&(s, l)| t.narrow(2, s, l))
                    .collect::<Result<_>>()?;
                Tensor::cat(&p, 2)
            })
            .collect()
    }

    /// Writes stored tensors `[1, heads, n, width]` (row i = position p0 + i) into sequence b.
    pub(crate) fn write_raw(&self, b: usize, p0: usize, raw: &[Tensor]) -> Result<()> {
        let n = raw[0].dim(2)?;
        let dst: Vec<Tensor> = self
            .parts
            .iter()
            .map(|t| t.narrow(0, b, 1))
            .collect::<Result<_>>()?;
        self.pieces(p0..p0 + n, |slot, off, len| {
            for (d, r) in dst.iter().zip(raw) {
                d.slice_set(&r.narrow(2, off, len)?.contiguous()?, 2, slot)?;
            }
            Ok(())
        })
    }

    /// Keys and values (f16) of stored tensors.
    fn decode(&self, raw: &[Tensor]) -> Result<(Tensor, Tensor)> {
        match self.format {
            ExactFormat::F16 => Ok((raw[0].clone(), raw[1].clone())),
            ExactFormat::Q8 => Ok((q8_decode(&raw[0], &raw[1])?, q8_decode(&raw[2], &raw[3])?)),
        }
    }

    /// Rows of positions `range` (all sinks, or all ring positions) of sequence `b`: keys and
    /// values `[1, heads, range.len(), dim]` f16.
    pub fn read(&self, b: usize, range: Range<usize>) -> Result<(Tensor, Tensor)> {
        self.decode(&self.read_raw(b, range)?)
    }

    /// Every slot's keys and values as f16 `[batch, heads, sinks + ring, dim]`, contiguous
    /// (fresh tensors for q8_0; the stored ones for f16).
    pub fn slots_f16(&self) -> Result<(Tensor, Tensor)> {
        let (k, v) = self.decode(&self.parts)?;
        Ok((k.contiguous()?, v.contiguous()?))
    }

    /// Writes keys and values `[1, heads, n, dim]` (row i = position p0 + i) into sequence `b`.
    /// The positions must not span the end of the sinks (write sinks and ring positions apart).
    pub fn write(&self, b: usize, p0: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let raw = match self.format {
            ExactFormat::F16 => vec![k.to_dtype(DType::F16)?, v.to_dtype(DType::F16)?],
            ExactFormat::Q8 => {
                let (kc, ks) = q8_encode(k)?;
                let (vc, vs) = q8_encode(v)?;
                vec![kc, ks, vc, vs]
            }
        };
        self.write_raw(b, p0, &raw)
    }

    /// Calls `f(slot, offset in the range, length)` for each run of consecutive slots of
    /// `range`.
    fn pieces(
        &self,
        range: Range<usize>,
        mut f: impl FnMut(usize, usize, usize) -> Result<()>,
    ) -> Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        if range.start < self.sinks {
            if range.end > self.sinks {
                candle_core::bail!(
                    "exact store: positions {range:?} span the end of the {} sinks",
                    self.sinks
                );
            }
            return f(range.start, 0, range.len());
        }
        if self.ring == 0 || range.len() > self.ring {
            candle_core::bail!(
                "exact store: {} positions do not fit a ring of {}",
                range.len(),
                self.ring
            );
        }
        let mut done = 0;
        while done < range.len() {
            let slot = (range.start + done) % self.ring;
            let len = (self.ring - slot).min(range.len() - done);
            f(self.sinks + slot, done, len)?;
            done += len;
        }
        Ok(())
    }
}
