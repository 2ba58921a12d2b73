//! The paged layout of a KV cache (docs/FORMAT.md "Tiles"): every byte a cache stores lives in
//! an arena of equal tiles of `tile_bytes` bytes, and each sequence reaches its tiles through
//! tables — one per part (records, exact rows) — indexed by position. Many sequences (and every
//! layer of a model) share one arena, so the memory a kind saves per token becomes room for more
//! sequences; a tile held by several sequences (a shared prompt prefix) is stored once.
//!
//! A part of a cache is a [`TileRows`]: row (slot `s`, head `h`) of `row_bytes` bytes sits at byte
//! `table[s / per_tile] · tile_bytes + offset + (s % per_tile) · slot_stride + h · head_stride`
//! of the arena. The layouts in use:
//!
//! * TurboQuant records ([`RecordTiles`]): a tile holds `slots` consecutive positions of every KV
//!   head, keys `[heads, slots, key_bytes]` then values `[heads, slots, value_bytes]` — the
//!   layout the CUDA attention kernels stage (one head's records of a tile are contiguous).
//! * Exact rows ([`ExactTiles`]: attention sinks and the window of recent tokens): a tile holds
//!   `rows` consecutive positions, `[rows, heads, row_bytes]`, a row being the key vector then
//!   the value vector in f16 or q8_0 (codes, then the f16 scales of each block of 32). Position
//!   p sits in tile `p / rows`; the tile of the sinks (position 0) is kept while the sequence
//!   lives, the others are released once every position in them has left the window.
//! * Full-precision caches ([`full_tiles`]): keys `[heads, slots, head_dim]` then values, in the
//!   cache's dtype.
//!
//! Tables hold tile indices, [`NO_TILE`] where a sequence holds no tile (positions it never
//! stored, or released). This module is plain arithmetic shared by the CPU ops, the CUDA
//! launchers and the tests; the allocator lives in `tqkv-candle`.

use crate::error::{Error, Result};
use crate::ExactFormat;

/// A table entry for a tile not held.
pub const NO_TILE: u32 = u32::MAX;

/// Bytes of every tile are a multiple of this (16-byte copies stay aligned).
pub const TILE_ALIGN: usize = 16;

/// Where the rows of one part of a cache sit in its tiles (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileRows {
    /// Bytes per tile.
    pub tile_bytes: usize,
    /// Positions per tile.
    pub per_tile: usize,
    /// Bytes of the part's first row from the tile's start.
    pub offset: usize,
    /// Bytes between consecutive positions of one head.
    pub slot_stride: usize,
    /// Bytes between the heads of one position.
    pub head_stride: usize,
    /// Bytes of one row.
    pub row_bytes: usize,
    /// Heads per position.
    pub heads: usize,
}

impl TileRows {
    /// Byte offset in the arena of row (`slot`, `head`) of a sequence whose table is `table`,
    /// or `None` when its tile is not held (or the table is too short).
    pub fn at(&self, table: &[u32], slot: usize, head: usize) -> Option<usize> {
        let t = *table.get(slot / self.per_tile)?;
        if t == NO_TILE {
            return None;
        }
        Some(
            t as usize * self.tile_bytes
                + self.offset
                + (slot % self.per_tile) * self.slot_stride
                + head * self.head_stride,
        )
    }

    /// Index in the table of the tile holding `slot`.
    pub fn tile_of(&self, slot: usize) -> usize {
        slot / self.per_tile
    }

    /// Tiles of a table covering positions `range` (empty for an empty range).
    pub fn tiles_covering(&self, range: std::ops::Range<usize>) -> std::ops::Range<usize> {
        if range.is_empty() {
            return 0..0;
        }
        range.start / self.per_tile..(range.end - 1) / self.per_tile + 1
    }

    /// Copies rows `slots` of every head from `src` (`[heads, slots.len(), row_bytes]`
    /// row-major) into the arena through `table` (the CPU reference of the scatter kernel).
    /// Errors, writing nothing, if a row's tile is not held or lies outside the arena.
    pub fn scatter(
        &self,
        arena: &mut [u8],
        table: &[u32],
        slots: std::ops::Range<usize>,
        src: &[u8],
    ) -> Result<()> {
        self.check_rows(arena.len(), table, slots.clone(), src.len())?;
        let rb = self.row_bytes;
        for (dense, at) in self.pairs(table, slots) {
            arena[at..at + rb].copy_from_slice(&src[dense..dense + rb]);
        }
        Ok(())
    }

    /// Copies rows `slots` of every head out of the arena into `dst` (`[heads, slots.len(),
    /// row_bytes]`): the CPU reference of the gather kernel.
    pub fn gather(
        &self,
        arena: &[u8],
        table: &[u32],
        slots: std::ops::Range<usize>,
        dst: &mut [u8],
    ) -> Result<()> {
        self.check_rows(arena.len(), table, slots.clone(), dst.len())?;
        let rb = self.row_bytes;
        for (dense, at) in self.pairs(table, slots) {
            dst[dense..dense + rb].copy_from_slice(&arena[at..at + rb]);
        }
        Ok(())
    }

    /// (byte in the dense `[heads, n, row_bytes]` buffer, byte in the arena) of every row of
    /// `slots` (their tiles checked held).
    fn pairs<'a>(
        &'a self,
        table: &'a [u32],
        slots: std::ops::Range<usize>,
    ) -> impl Iterator<Item = (usize, usize)> + 'a {
        let n = slots.len();
        (0..self.heads).flat_map(move |h| {
            slots.clone().enumerate().map(move |(i, s)| {
                let at = self.at(table, s, h).expect("rows checked held");
                ((h * n + i) * self.row_bytes, at)
            })
        })
    }

    /// Checks that rows `slots` of every head are held and inside an arena of `arena` bytes,
    /// and that a dense buffer of `dense` bytes matches them.
    pub fn check_rows(
        &self,
        arena: usize,
        table: &[u32],
        slots: std::ops::Range<usize>,
        dense: usize,
    ) -> Result<()> {
        let want = self.heads * slots.len() * self.row_bytes;
        if dense != want {
            return Err(Error::Shape {
                what: "rows copied to or from tiles",
                expected: want,
                got: dense,
            });
        }
        for j in self.tiles_covering(slots.clone()) {
            match table.get(j) {
                Some(&t) if t != NO_TILE && (t as usize + 1) * self.tile_bytes <= arena => {}
                Some(&t) if t != NO_TILE => {
                    return Err(Error::Config(format!(
                        "tile {t} lies outside an arena of {arena} bytes"
                    )))
                }
                _ => {
                    return Err(Error::Config(format!(
                        "positions {slots:?}: tile {j} of the sequence is not held"
                    )))
                }
            }
        }
        Ok(())
    }
}

/// How a TurboQuant cache's records fill a tile: `slots` positions of every KV head, keys then
/// values (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordTiles {
    /// Bytes per tile.
    pub tile_bytes: usize,
    /// KV heads.
    pub heads: usize,
    /// Positions per tile.
    pub slots: usize,
    /// Bytes of a key record.
    pub key_bytes: usize,
    /// Bytes of a value record.
    pub value_bytes: usize,
}

impl RecordTiles {
    /// As many positions per tile as fit (at least one, or an error naming the smallest tile).
    pub fn new(
        tile_bytes: usize,
        heads: usize,
        key_bytes: usize,
        value_bytes: usize,
    ) -> Result<Self> {
        let per = heads * (key_bytes + value_bytes);
        check_tile(tile_bytes)?;
        if per == 0 || tile_bytes < per {
            return Err(Error::Config(format!(
                "a tile of {tile_bytes} bytes holds no position of {heads} heads × {} record bytes",
                key_bytes + value_bytes
            )));
        }
        Ok(RecordTiles {
            tile_bytes,
            heads,
            slots: tile_bytes / per,
            key_bytes,
            value_bytes,
        })
    }

    /// The smallest tile (a multiple of [`TILE_ALIGN`]) holding `slots` positions.
    pub fn tile_bytes_for(
        slots: usize,
        heads: usize,
        key_bytes: usize,
        value_bytes: usize,
    ) -> usize {
        (slots * heads * (key_bytes + value_bytes)).div_ceil(TILE_ALIGN) * TILE_ALIGN
    }

    /// The key records.
    pub fn keys(&self) -> TileRows {
        TileRows {
            tile_bytes: self.tile_bytes,
            per_tile: self.slots,
            offset: 0,
            slot_stride: self.key_bytes,
            head_stride: self.slots * self.key_bytes,
            row_bytes: self.key_bytes,
            heads: self.heads,
        }
    }

    /// The value records.
    pub fn values(&self) -> TileRows {
        TileRows {
            offset: self.heads * self.slots * self.key_bytes,
            slot_stride: self.value_bytes,
            head_stride: self.slots * self.value_bytes,
            row_bytes: self.value_bytes,
            ..self.keys()
        }
    }
}

/// How the exact rows (sinks and window) of a cache fill a tile (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExactTiles {
    /// Bytes per tile.
    pub tile_bytes: usize,
    /// KV heads.
    pub heads: usize,
    /// Channels per vector.
    pub dim: usize,
    /// f16 or q8_0.
    pub format: ExactFormat,
    /// Positions per tile.
    pub rows: usize,
}

impl ExactTiles {
    /// As many positions per tile as fit (at least one, else an error).
    pub fn new(tile_bytes: usize, heads: usize, dim: usize, format: ExactFormat) -> Result<Self> {
        check_tile(tile_bytes)?;
        let per = heads * 2 * format.vector_bytes(dim);
        if per == 0 || tile_bytes < per {
            return Err(Error::Config(format!(
                "a tile of {tile_bytes} bytes holds no exact position of {heads} heads × {per} bytes"
            )));
        }
        Ok(ExactTiles {
            tile_bytes,
            heads,
            dim,
            format,
            rows: tile_bytes / per,
        })
    }

    /// Bytes of one row: the key vector then the value vector.
    pub fn row_bytes(&self) -> usize {
        2 * self.format.vector_bytes(self.dim)
    }

    /// The parts of a row as stored by a write: (offset in the row, bytes) of the f16 key and
    /// value, or of the q8_0 key codes, key scales, value codes and value scales.
    pub fn parts(&self) -> Vec<(usize, usize)> {
        let d = self.dim;
        match self.format {
            ExactFormat::F16 => vec![(0, 2 * d), (2 * d, 2 * d)],
            ExactFormat::Q8 => {
                let s = 2 * d.div_ceil(ExactFormat::Q8_BLOCK);
                vec![(0, d), (d, s), (d + s, d), (2 * d + s, s)]
            }
        }
    }

    /// The whole rows (key and value) as a [`TileRows`].
    pub fn rows(&self) -> TileRows {
        TileRows {
            tile_bytes: self.tile_bytes,
            per_tile: self.rows,
            offset: 0,
            slot_stride: self.heads * self.row_bytes(),
            head_stride: self.row_bytes(),
            row_bytes: self.row_bytes(),
            heads: self.heads,
        }
    }

    /// Part `i` of [`Self::parts`] as a [`TileRows`].
    pub fn part(&self, i: usize) -> TileRows {
        let (off, bytes) = self.parts()[i];
        TileRows {
            offset: off,
            row_bytes: bytes,
            ..self.rows()
        }
    }

    /// Key and value of one stored row, as the readers see them (f32 of the f16 value; q8_0
    /// decoded as f16((code − 128) · scale), bit for bit the CUDA kernels' and
    /// `tqkv-candle`'s `q8_decode`), into `k` and `v` (`dim` each).
    pub fn decode_row(&self, row: &[u8], k: &mut [f32], v: &mut [f32]) {
        let d = self.dim;
        let vb = self.format.vector_bytes(d);
        for (x, out) in [(&row[..vb], k), (&row[vb..2 * vb], v)] {
            match self.format {
                ExactFormat::F16 => {
                    for (j, o) in out.iter_mut().enumerate() {
                        *o = half::f16::from_le_bytes([x[2 * j], x[2 * j + 1]]).to_f32();
                    }
                }
                ExactFormat::Q8 => {
                    for (j, o) in out.iter_mut().enumerate() {
                        let b = d + 2 * (j / ExactFormat::Q8_BLOCK);
                        let s = half::f16::from_le_bytes([x[b], x[b + 1]]).to_f32();
                        *o = half::f16::from_f32((x[j] as f32 - 128.0) * s).to_f32();
                    }
                }
            }
        }
    }
}

/// How a full-precision cache of `elem` bytes per channel fills a tile: keys `[heads, slots,
/// dim]`, then values.
pub fn full_tiles(
    tile_bytes: usize,
    heads: usize,
    dim: usize,
    elem: usize,
) -> Result<(TileRows, TileRows)> {
    let rb = dim * elem;
    let rt = RecordTiles::new(tile_bytes, heads, rb, rb)?;
    Ok((rt.keys(), rt.values()))
}

fn check_tile(tile_bytes: usize) -> Result<()> {
    if tile_bytes == 0 || tile_bytes % TILE_ALIGN != 0 || tile_bytes > 1 << 30 {
        return Err(Error::Config(format!(
            "a tile of {tile_bytes} bytes: tiles are a positive multiple of {TILE_ALIGN} bytes, at most 1 GiB"
        )));
    }
    Ok(())
}

/// A table as the device reads it: `i32` entries, −1 for [`NO_TILE`], `[sequences, per_seq]`
/// (shorter tables padded with −1).
pub fn device_table(tables: &[&[u32]], per_seq: usize) -> Vec<i32> {
    let mut out = vec![-1i32; tables.len() * per_seq];
    for (b, t) in tables.iter().enumerate() {
        for (j, &x) in t.iter().take(per_seq).enumerate() {
            out[b * per_seq + j] = if x == NO_TILE { -1 } else { x as i32 };
        }
    }
    out
}
