//! The full-precision part of a TurboQuant cache with attention sinks or a window of exact
//! recent tokens ([`tqkv::KvSpec::sinks`], [`tqkv::KvSpec::window`],
//! [`tqkv::KvSpec::budget_bits`]).
//!
//! Layout: keys and values in f16, each `[batch, kv_heads, sinks + ring, head_dim]`, contiguous,
//! on the cache's device. Position p < sinks sits at slot p; position p ≥ sinks at slot
//! `sinks + p % ring` — a ring over the most recent positions, which the cache keeps large
//! enough for the window of every query of an append plus the tokens not yet quantized. Keys
//! are stored as the records see them (centred when the spec centres keys), so that scores from
//! both parts differ by nothing but the quantization.

use candle_core::{DType, Device, Result, Tensor};
use std::ops::Range;

/// Sinks and the ring of recent tokens, in f16.
#[derive(Debug, Clone)]
pub struct ExactStore {
    /// Keys `[batch, kv_heads, sinks + ring, head_dim]` f16.
    pub k: Tensor,
    /// Values, same layout.
    pub v: Tensor,
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
    /// of `old` and, of sequence b, the ring positions `keep[b]` of `old`.
    pub fn with_ring(
        old: Option<&ExactStore>,
        (batch, heads, dim): (usize, usize, usize),
        sinks: usize,
        ring: usize,
        keep: &[Range<usize>],
        device: &Device,
    ) -> Result<Self> {
        let shape = (batch, heads, sinks + ring, dim);
        let fresh = ExactStore {
            k: Tensor::zeros(shape, DType::F16, device)?,
            v: Tensor::zeros(shape, DType::F16, device)?,
            sinks,
            ring,
        };
        if let Some(old) = old {
            for (o, f) in [(&old.k, &fresh.k), (&old.v, &fresh.v)] {
                if sinks > 0 {
                    f.slice_set(&o.narrow(2, 0, sinks)?.contiguous()?, 2, 0)?;
                }
            }
            for (b, r) in keep.iter().enumerate() {
                if old.ring == 0 || r.is_empty() {
                    continue;
                }
                let (k, v) = old.read(b, r.clone())?;
                fresh.write(b, r.start, &k, &v)?;
            }
        }
        Ok(fresh)
    }

    /// Rows of positions `range` (all sinks, or all ring positions) of sequence `b`: keys and
    /// values `[1, heads, range.len(), dim]`.
    pub fn read(&self, b: usize, range: Range<usize>) -> Result<(Tensor, Tensor)> {
        let mut parts = Vec::new();
        self.pieces(range, |slot, _, len| {
            parts.push((slot, len));
            Ok(())
        })?;
        let get = |t: &Tensor| -> Result<Tensor> {
            let t = t.narrow(0, b, 1)?;
            let p: Vec<Tensor> = parts
                .iter()
                .map(|&(s, l)| t.narrow(2, s, l))
                .collect::<Result<_>>()?;
            Tensor::cat(&p, 2)
        };
        Ok((get(&self.k)?, get(&self.v)?))
    }

    /// Writes keys and values `[1, heads, n, dim]` (row i = position p0 + i) into sequence `b`.
    /// The positions must not span the end of the sinks (write sinks and ring positions apart).
    pub fn write(&self, b: usize, p0: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let n = k.dim(2)?;
        let (dk, dv) = (self.k.narrow(0, b, 1)?, self.v.narrow(0, b, 1)?);
        self.pieces(p0..p0 + n, |slot, off, len| {
            let k16 = k.narrow(2, off, len)?.to_dtype(DType::F16)?.contiguous()?;
            let v16 = v.narrow(2, off, len)?.to_dtype(DType::F16)?.contiguous()?;
            dk.slice_set(&k16, 2, slot)?;
            dv.slice_set(&v16, 2, slot)
        })
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
