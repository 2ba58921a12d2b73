//! The KV pool: one memory budget (`--kv-memory`) shared by every sequence's cache, counted in
//! fixed-size tiles of bytes, so that a kind that stores a token in fewer bytes admits more
//! sequences into the same memory. Two modes:
//!
//! * **Paged** (the TurboQuant kinds, [`tqkv_candle::CacheKind::pages`]): the tiles are where
//!   the bytes live — one [`TileArena`] of `--kv-memory / tile` tiles on the model's device
//!   holds every layer's records and exact rows of every sequence, each sequence reaching its
//!   tiles through its caches' tables, and a tile shared by several sequences (a common prompt
//!   prefix) is stored once. The pool's count is the arena's; a sequence's share is the tiles its
//!   caches reference. Before a step the scheduler asks what a sequence will hold: the layers'
//!   own layouts answer exactly ([`tqkv_candle::KvCache::tiles_for`] of calibrated probe caches).
//! * **Budget** (kinds that keep their own buffers: f16, q8, q4h, KIVI): a sequence holds
//!   `⌈bytes of its caches / tile bytes⌉` tiles (stored tokens plus the per-layer tables each
//!   sequence holds for itself), set from the caches' own [`tqkv_candle::MemoryUsage`] after
//!   every step; predictions come from [`CostCurve`], a probe of the kind's caches measured once
//!   at start-up (bytes at every multiple of [`CostCurve::STEP`] tokens, rounded up between
//!   them), an upper bound that a test holds against real runs.

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::sync::Arc;
use tqkv_candle::{CacheConfig, KvCache, TileArena};

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

/// What a paged pool predicts with: one calibrated cache per layer (in a private arena of the
/// pool's tile size), whose layout gives the tiles any length holds.
pub struct Probes {
    layers: Vec<Box<dyn KvCache>>,
    max_tokens: usize,
}

impl Probes {
    /// Calibrated caches of every layer of `cache` (as a model of `layers` layers with
    /// `kv_heads` heads of `head_dim` builds them), in tiles of `tile_bytes`.
    pub fn new(
        cache: &CacheConfig,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        tile_bytes: usize,
        max_tokens: usize,
    ) -> Result<Self, PoolError> {
        let probe = |e: &dyn std::fmt::Display| PoolError::Probe(e.to_string());
        let dev = Device::Cpu;
        let mut out = Vec::with_capacity(layers);
        for layer in 0..layers {
            let arena = TileArena::growing(&dev, tile_bytes).map_err(|e| probe(&e))?;
            let mut c = cache
                .build_paged(layer, layers, kv_heads, head_dim, &arena)
                .map_err(|e| probe(&e))?;
            let x = |_| Tensor::randn(0f32, 1.0, (1, kv_heads, CostCurve::STEP, head_dim), &dev);
            let (k, v) = (x(0).map_err(|e| probe(&e))?, x(1).map_err(|e| probe(&e))?);
            c.append(&k, &v, None).map_err(|e| probe(&e))?;
            if c.tiles_for(0, 1).is_none() {
                return Err(PoolError::Probe(format!(
                    "layer {layer}'s cache ({}) does not page",
                    c.kind_name()
                )));
            }
            out.push(c);
        }
        Ok(Probes {
            layers: out,
            max_tokens,
        })
    }

    /// (Tiles held right after a step from `have` to `total` tokens, tiles held once it
    /// commits), over all layers; `None` beyond the context.
    pub fn tiles(&self, have: usize, total: usize) -> Option<(usize, usize)> {
        if total > self.max_tokens {
            return None;
        }
        self.layers.iter().try_fold((0, 0), |(p, a), c| {
            let (pp, aa) = c.tiles_for(have, total)?;
            Some((p + pp, a + aa))
        })
    }

    /// Layers.
    pub fn layers(&self) -> usize {
        self.layers.len()
    }
}

enum Mode {
    /// Tiles as a byte budget: `used` of `total`.
    Budget { curve: CostCurve, used: usize },
    /// Tiles of an arena.
    Paged {
        arena: Arc<TileArena>,
        probes: Probes,
    },
}

/// The pool: `total` tiles of `tile_bytes`, held by sequences.
pub struct KvPool {
    tile_bytes: usize,
    total: usize,
    held: HashMap<u64, usize>,
    mode: Mode,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KvPool {{ {} of {} tiles of {} bytes, {} }}",
            self.used(),
            self.total,
            self.tile_bytes,
            if self.is_paged() { "paged" } else { "budget" }
        )
    }
}

impl KvPool {
    /// A budget pool of `budget / tile_bytes` tiles for caches whose bytes `curve` predicts.
    pub fn new(budget: usize, tile_bytes: usize, curve: CostCurve) -> Result<Self, PoolError> {
        let total = Self::count(budget, tile_bytes)?;
        Ok(KvPool {
            tile_bytes,
            total,
            held: HashMap::new(),
            mode: Mode::Budget { curve, used: 0 },
        })
    }

    /// A paged pool: the tiles of `arena` (fixed), predictions from `probes`.
    pub fn paged(arena: Arc<TileArena>, probes: Probes) -> Result<Self, PoolError> {
        if arena.is_growing() {
            return Err(PoolError::Config(
                "a server's arena has a fixed number of tiles".into(),
            ));
        }
        Ok(KvPool {
            tile_bytes: arena.tile_bytes(),
            total: arena.total(),
            held: HashMap::new(),
            mode: Mode::Paged { arena, probes },
        })
    }

    /// Tiles of `tile_bytes` in `budget` (at least one, else an error).
    pub fn count(budget: usize, tile_bytes: usize) -> Result<usize, PoolError> {
        if tile_bytes == 0 {
            return Err(PoolError::Config("the tile size is 0 bytes".into()));
        }
        let total = budget / tile_bytes;
        if total == 0 {
            return Err(PoolError::Config(format!(
                "a budget of {budget} bytes holds no tile of {tile_bytes} bytes"
            )));
        }
        Ok(total)
    }

    /// Whether the tiles are an arena's (else a byte budget).
    pub fn is_paged(&self) -> bool {
        matches!(self.mode, Mode::Paged { .. })
    }

    /// The arena of a paged pool.
    pub fn arena(&self) -> Option<&Arc<TileArena>> {
        match &self.mode {
            Mode::Paged { arena, .. } => Some(arena),
            Mode::Budget { .. } => None,
        }
    }

    /// Tiles covering `bytes` (a budget pool's unit).
    pub fn tiles_for(&self, bytes: usize) -> usize {
        bytes.div_ceil(self.tile_bytes)
    }

    /// Tiles a sequence of `tokens` tokens will hold (`None`: longer than the pool knows).
    pub fn predict(&self, tokens: usize) -> Option<usize> {
        match &self.mode {
            Mode::Budget { curve, .. } => curve.bytes(tokens).map(|b| self.tiles_for(b)),
            Mode::Paged { probes, .. } => probes.tiles(tokens, tokens).map(|t| t.1),
        }
    }

    /// Tiles a sequence holds while a step takes it from `have` to `total` tokens (a paged
    /// cache holds the step's new exact rows until the step commits).
    pub fn step_need(&self, have: usize, total: usize) -> Option<usize> {
        match &self.mode {
            Mode::Budget { .. } => self.predict(total),
            Mode::Paged { probes, .. } => probes.tiles(have, total).map(|t| t.0),
        }
    }

    /// Bytes a sequence of `tokens` tokens holds (an upper bound for a budget pool: its curve;
    /// a paged pool's tiles).
    pub fn bytes_at(&self, tokens: usize) -> Option<usize> {
        match &self.mode {
            Mode::Budget { curve, .. } => curve.bytes(tokens),
            Mode::Paged { .. } => self.predict(tokens).map(|t| t * self.tile_bytes),
        }
    }

    /// Tiles a sequence alone needs to reach `tokens` tokens in its last step of up to `chunk`
    /// tokens (a paged cache holds the step's exact rows until it commits).
    pub fn alone_need(&self, tokens: usize, chunk: usize) -> Option<usize> {
        let have = tokens.saturating_sub(chunk.clamp(1, tokens.max(1)));
        Some(self.step_need(have, tokens)?.max(self.predict(tokens)?))
    }

    /// The longest sequence (tokens) the pool holds alone, decoding one token per step.
    pub fn longest_alone(&self) -> usize {
        let max = match &self.mode {
            Mode::Budget { curve, .. } => curve.max_tokens(),
            Mode::Paged { probes, .. } => probes.max_tokens,
        };
        // What a sequence holds grows with its length: the last length that fits.
        let fits = |n: usize| self.alone_need(n, 1).is_some_and(|t| t <= self.total);
        let (mut lo, mut hi) = (0usize, max + 1);
        while lo + 1 < hi {
            let mid = (lo + hi) / 2;
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Tiles held by `seq`.
    pub fn held(&self, seq: u64) -> usize {
        self.held.get(&seq).copied().unwrap_or(0)
    }

    /// Whether the sequences `(id, tiles wanted)` fit together, counting what they hold now:
    /// their growth within what is free (a paged pool's sequences never give tiles to others
    /// within a step).
    pub fn fits(&self, wants: &[(u64, usize)]) -> bool {
        match &self.mode {
            Mode::Budget { used, .. } => {
                let holding: usize = wants.iter().map(|&(id, _)| self.held(id)).sum();
                let want: usize = wants.iter().map(|&(_, t)| t).sum();
                used - holding + want <= self.total
            }
            Mode::Paged { arena, .. } => {
                let grow: usize = wants
                    .iter()
                    .map(|&(id, t)| t.saturating_sub(self.held(id)))
                    .sum();
                grow <= arena.free()
            }
        }
    }

    /// Sets the tiles `seq` holds to what `bytes` of cache take (a budget pool). Errors (and
    /// changes nothing) when the growth is more than is free.
    pub fn set_bytes(&mut self, seq: u64, bytes: usize) -> Result<(), PoolError> {
        self.set_tiles(seq, self.tiles_for(bytes))
    }

    /// Sets the tiles `seq` holds: a budget pool counts them against its total (errors, and
    /// changes nothing, when the growth is more than is free); a paged pool records what the
    /// sequence's caches reference (the arena counted them already).
    pub fn set_tiles(&mut self, seq: u64, tiles: usize) -> Result<(), PoolError> {
        let have = self.held(seq);
        let (total, free) = (self.total, self.free());
        if let Mode::Budget { used, .. } = &mut self.mode {
            if tiles > have && tiles - have > free {
                return Err(PoolError::Exhausted {
                    need: tiles - have,
                    free,
                    total,
                });
            }
            *used = *used - have + tiles;
        }
        if tiles == 0 {
            self.held.remove(&seq);
        } else {
            self.held.insert(seq, tiles);
        }
        Ok(())
    }

    /// Forgets `seq`'s tiles (a budget pool frees them; in a paged pool the caches' drop does).
    pub fn release(&mut self, seq: u64) {
        if let Some(t) = self.held.remove(&seq) {
            if let Mode::Budget { used, .. } = &mut self.mode {
                *used -= t;
            }
        }
    }

    /// Tiles held.
    pub fn used(&self) -> usize {
        match &self.mode {
            Mode::Budget { used, .. } => *used,
            Mode::Paged { arena, .. } => arena.used(),
        }
    }

    /// Tiles free.
    pub fn free(&self) -> usize {
        self.total - self.used()
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

    /// What the sequences hold together by the pool's own count: tiles referenced (a shared
    /// tile counts once per holder).
    pub fn held_total(&self) -> usize {
        self.held.values().sum()
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
            "10 tiles of 1000 bytes: 6 steps of 1600 bytes (97 tokens take a 7th step)"
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
