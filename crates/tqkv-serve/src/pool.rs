//! The KV pool: one memory budget (`--kv-memory`) shared by every sequence's cache, counted in
//! fixed-size tiles of bytes, so that a kind that stores a token in fewer bytes admits more
//! sequences into the same memory.
//!
//! A sequence holds `⌈bytes of its caches / tile bytes⌉` tiles (stored tokens plus the
//! per-layer tables each sequence holds for itself), set from the caches'
//! own [`tqkv_candle::MemoryUsage`] after every step (the accounting is what the caches hold,
//! not an estimate). Before a step the scheduler asks how many tiles a sequence will need at
//! its new length: [`CostCurve`] answers from a probe of the kind's caches measured once at
//! start-up (bytes at every multiple of [`CostCurve::STEP`] tokens, rounded up between them),
//! an upper bound that a test holds against real runs.
//!
//! What this is not (yet): the tiles are a budget, not where the bytes live — each sequence's
//! caches keep their own buffers, and a shared system prompt is held once per sequence. The
//! per-layer tile storage that the CUDA kernel would read through tile tables is the next step.

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use tqkv_candle::CacheConfig;

/// Pool errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    /// A budget or tile size that cannot hold anything.
    #[error("KV pool: {0}")]
    Config(String),
    /// More tiles asked than are free.
    #[error("KV pool exhausted: {need} tiles asked, {free} free of {total}")]
    Exhausted {
        /// Tiles asked beyond what the sequence holds.
        need: usize,
        /// Tiles free.
        free: usize,
        /// Tiles in the pool.
        total: usize,
    },
    /// Measuring the cache kind failed.
    #[error("KV pool: measuring the cache kind: {0}")]
    Probe(String),
}

/// Logical KV bytes of one sequence (all layers) as a function of its length.
#[derive(Debug, Clone)]
pub struct CostCurve {
    /// `bytes[i]`: bytes of a sequence of `i · STEP` tokens.
    bytes: Vec<usize>,
}

impl CostCurve {
    /// Tokens between two measured points.
    pub const STEP: usize = 16;

    /// Measures the kind `cache` up to `max_tokens` tokens: every layer's cache (as a model of
    /// `layers` layers with `kv_heads` heads of `head_dim` builds it) takes random keys and
    /// values `STEP` tokens at a time. The bytes a cache holds depend on the count of tokens
    /// only, not on their values.
    pub fn measure(
        cache: &CacheConfig,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        max_tokens: usize,
    ) -> Result<Self, PoolError> {
        let probe = |e: &dyn std::fmt::Display| PoolError::Probe(e.to_string());
        let dev = Device::Cpu;
        let points = max_tokens.div_ceil(Self::STEP);
        let mut bytes = vec![0usize; points + 1];
        for layer in 0..layers {
            let mut c = cache
                .build_in(layer, layers, kv_heads, head_dim, &dev)
                .map_err(|e| probe(&e))?;
            for b in bytes.iter_mut().skip(1) {
                let k = Tensor::randn(0f32, 1.0, (1, kv_heads, Self::STEP, head_dim), &dev)
                    .map_err(|e| probe(&e))?;
                let v = Tensor::randn(0f32, 1.0, (1, kv_heads, Self::STEP, head_dim), &dev)
                    .map_err(|e| probe(&e))?;
                c.append(&k, &v, None).map_err(|e| probe(&e))?;
                let m = c.memory();
                *b += m.logical + m.tables;
            }
        }
        Ok(CostCurve { bytes })
    }

    /// A curve from measured points (`bytes[i]` at `i · STEP` tokens; tests).
    pub fn from_points(bytes: Vec<usize>) -> Self {
        CostCurve { bytes }
    }

    /// The most tokens the curve knows.
    pub fn max_tokens(&self) -> usize {
        (self.bytes.len().saturating_sub(1)) * Self::STEP
    }

    /// An upper bound of the bytes of a sequence of `tokens` tokens (exact at multiples of
    /// `STEP`); `None` beyond [`Self::max_tokens`].
    pub fn bytes(&self, tokens: usize) -> Option<usize> {
        self.bytes.get(tokens.div_ceil(Self::STEP)).copied()
    }

    /// Bytes per token at the longest measured length.
    pub fn bytes_per_token(&self) -> f64 {
        let n = self.max_tokens().max(1);
        *self.bytes.last().unwrap_or(&0) as f64 / n as f64
    }
}

/// The pool: `total` tiles of `tile_bytes`, held by sequences.
#[derive(Debug, Clone)]
pub struct KvPool {
    tile_bytes: usize,
    total: usize,
    used: usize,
    held: HashMap<u64, usize>,
    curve: CostCurve,
}

impl KvPool {
    /// A pool of `budget / tile_bytes` tiles for caches whose bytes `curve` predicts.
    pub fn new(budget: usize, tile_bytes: usize, curve: CostCurve) -> Result<Self, PoolError> {
        if tile_bytes == 0 {
            return Err(PoolError::Config("the tile size is 0 bytes".into()));
        }
        let total = budget / tile_bytes;
        if total == 0 {
            return Err(PoolError::Config(format!(
                "a budget of {budget} bytes holds no tile of {tile_bytes} bytes"
            )));
        }
        Ok(KvPool {
            tile_bytes,
            total,
            used: 0,
            held: HashMap::new(),
            curve,
        })
    }

    /// Tiles covering `bytes`.
    pub fn tiles_for(&self, bytes: usize) -> usize {
        bytes.div_ceil(self.tile_bytes)
    }

    /// Tiles a sequence of `tokens` tokens will hold (`None`: longer than the curve).
    pub fn predict(&self, tokens: usize) -> Option<usize> {
        self.curve.bytes(tokens).map(|b| self.tiles_for(b))
    }

    /// The longest sequence (tokens) the pool holds alone.
    pub fn longest_alone(&self) -> usize {
        // The curve grows with the length: the last grid point that fits, in tokens.
        let fits = |i: usize| self.tiles_for(self.curve.bytes[i]) <= self.total;
        let (mut lo, mut hi) = (0usize, self.curve.bytes.len());
        while lo + 1 < hi {
            let mid = (lo + hi) / 2;
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo * CostCurve::STEP
    }

    /// Tiles held by `seq`.
    pub fn held(&self, seq: u64) -> usize {
        self.held.get(&seq).copied().unwrap_or(0)
    }

    /// Whether the sequences `(id, tiles wanted)` fit together, counting what they hold now.
    pub fn fits(&self, wants: &[(u64, usize)]) -> bool {
        let holding: usize = wants.iter().map(|&(id, _)| self.held(id)).sum();
        let want: usize = wants.iter().map(|&(_, t)| t).sum();
        self.used - holding + want <= self.total
    }

    /// Sets the tiles `seq` holds to what `bytes` of cache take. Errors (and changes nothing)
    /// when the growth is more than is free.
    pub fn set_bytes(&mut self, seq: u64, bytes: usize) -> Result<(), PoolError> {
        self.set_tiles(seq, self.tiles_for(bytes))
    }

    /// Sets the tiles `seq` holds.
    pub fn set_tiles(&mut self, seq: u64, tiles: usize) -> Result<(), PoolError> {
        let have = self.held(seq);
        if tiles > have && tiles - have > self.free() {
            return Err(PoolError::Exhausted {
                need: tiles - have,
                free: self.free(),
                total: self.total,
            });
        }
        self.used = self.used - have + tiles;
        if tiles == 0 {
            self.held.remove(&seq);
        } else {
            self.held.insert(seq, tiles);
        }
        Ok(())
    }

    /// Frees every tile of `seq`.
    pub fn release(&mut self, seq: u64) {
        if let Some(t) = self.held.remove(&seq) {
            self.used -= t;
        }
    }

    /// Tiles held.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Tiles free.
    pub fn free(&self) -> usize {
        self.total - self.used
    }

    /// Tiles in the pool.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes per tile.
    pub fn tile_bytes(&self) -> usize {
        self.tile_bytes
    }

    /// Sequences holding tiles.
    pub fn sequences(&self) -> usize {
        self.held.len()
    }

    /// The cost curve.
    pub fn curve(&self) -> &CostCurve {
        &self.curve
    }
}

/// Parses a byte size: `2GiB`, `512MiB`, `64KiB`, `1GB`, `1000000` (bytes).
pub fn parse_bytes(s: &str) -> Result<usize, PoolError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num
        .parse()
        .map_err(|_| PoolError::Config(format!("{s:?}: expected a size such as 2GiB or 512MiB")))?;
    let mul: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        u => {
            return Err(PoolError::Config(format!(
                "{s:?}: unknown unit {u:?} (B, KB, MB, GB, KiB, MiB, GiB)"
            )))
        }
    };
    let b = x * mul;
    if !b.is_finite() || b < 1.0 || b > (1u64 << 50) as f64 {
        return Err(PoolError::Config(format!(
            "{s:?}: a size between 1 byte and 1 PiB"
        )));
    }
    Ok(b as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5KiB"), Ok(1536));
        assert_eq!(parse_bytes("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("77"), Ok(77));
        for bad in ["", "GiB", "-1GiB", "2XB", "0", "1e400"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tiles_are_counted_exactly() {
        // A linear curve: 100 bytes per token.
        let curve = CostCurve::from_points((0..=64).map(|i| i * CostCurve::STEP * 100).collect());
        let mut p = KvPool::new(10_000, 1000, curve).unwrap();
        assert_eq!((p.total(), p.used(), p.free()), (10, 0, 10));
        assert_eq!(p.predict(1), Some(2)); // 16 tokens' bytes, rounded up to tiles
        assert_eq!(p.predict(16), Some(2));
        assert_eq!(p.predict(17), Some(4));
        assert_eq!(p.predict(64 * 16 + 1), None);
        assert_eq!(
            p.longest_alone(),
            96,
            "10 tiles of 1000 bytes: 6 steps of 1600 bytes"
        );
        p.set_bytes(1, 2500).unwrap();
        p.set_bytes(2, 1).unwrap();
        assert_eq!((p.held(1), p.held(2), p.used()), (3, 1, 4));
        assert!(p.fits(&[(1, 9), (2, 1)]));
        assert!(!p.fits(&[(1, 9), (2, 2)]));
        assert_eq!(
            p.set_tiles(2, 8),
            Err(PoolError::Exhausted {
                need: 7,
                free: 6,
                total: 10
            })
        );
        assert_eq!(p.used(), 4, "a refused growth changes nothing");
        p.set_tiles(1, 1).unwrap();
        assert_eq!(p.used(), 2);
        p.release(1);
        p.release(1);
        p.set_bytes(2, 0).unwrap();
        assert_eq!((p.used(), p.free(), p.sequences()), (0, 10, 0));
        assert!(KvPool::new(999, 1000, CostCurve::from_points(vec![0])).is_err());
        assert!(KvPool::new(999, 0, CostCurve::from_points(vec![0])).is_err());
    }
}
