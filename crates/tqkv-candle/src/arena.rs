//! The tile arena: one u8 tensor `[tiles, tile_bytes]` on a device that holds every byte of
//! the paged caches built in it (`tqkv::paged` has the layouts), and the allocator of its tiles
//! — a free list and a reference count per tile, so that a tile shared by several sequences (a
//! common prompt prefix) is stored once and freed when its last holder lets it go.
//!
//! Two kinds: a fixed arena ([`TileArena::new`]: a server's `--kv-memory`, shared by all the
//! sequences and layers it serves; allocation beyond it is [`Error::ArenaFull`]) and a growing
//! one ([`TileArena::growing`]: the private storage of a cache built on its own, which doubles
//! its tiles when full — the old tiles are copied once, their indices stay valid — and gives
//! its memory back when its last tile is released).
//!
//! Allocation is all-or-nothing ([`TileArena::alloc`]), so a failed append leaves the arena as
//! it was; the caches release what they allocated on error, rollback and drop.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::{Arc, Mutex, MutexGuard};
use tqkv::paged::TILE_ALIGN;

/// A fixed or growing pool of equal tiles on one device.
pub struct TileArena {
    device: Device,
    tile_bytes: usize,
    growing: bool,
    inner: Mutex<Inner>,
}

struct Inner {
    /// `[tiles, tile_bytes]` u8 (None while a growing arena holds no tile).
    data: Option<Tensor>,
    /// Holders of each tile (0: free).
    refs: Vec<u32>,
    /// Free tiles, the lowest index last (taken first).
    free: Vec<u32>,
}

impl std::fmt::Debug for TileArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TileArena {{ tiles: {}, used: {}, tile_bytes: {} }}",
            self.total(),
            self.used(),
            self.tile_bytes
        )
    }
}

impl TileArena {
    /// A fixed arena of `tiles` tiles of `tile_bytes` bytes (a positive multiple of 16) on
    /// `device`, allocated and zeroed now.
    pub fn new(device: &Device, tile_bytes: usize, tiles: usize) -> Result<Arc<Self>> {
        check_tile(tile_bytes)?;
        if tiles == 0 || tiles > u32::MAX as usize - 1 {
            return Err(Error::Kind(format!(
                "an arena of {tiles} tiles: at least 1, at most 2³² − 2"
            )));
        }
        let data = Tensor::zeros((tiles, tile_bytes), DType::U8, device)?;
        Ok(Arc::new(TileArena {
            device: device.clone(),
            tile_bytes,
            growing: false,
            inner: Mutex::new(Inner {
                data: Some(data),
                refs: vec![0; tiles],
                free: (0..tiles as u32).rev().collect(),
            }),
        }))
    }

    /// An empty arena of `tile_bytes`-byte tiles on `device` that grows when full.
    pub fn growing(device: &Device, tile_bytes: usize) -> Result<Arc<Self>> {
        check_tile(tile_bytes)?;
        Ok(Arc::new(TileArena {
            device: device.clone(),
            tile_bytes,
            growing: true,
            inner: Mutex::new(Inner {
                data: None,
                refs: Vec::new(),
                free: Vec::new(),
            }),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves counts that are still consistent (every
        // mutation below completes before it returns), so a poisoned lock is taken as is.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes per tile.
    pub fn tile_bytes(&self) -> usize {
        self.tile_bytes
    }

    /// The arena's device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the arena grows when full (private to one cache).
    pub fn is_growing(&self) -> bool {
        self.growing
    }

    /// Tiles in the arena.
    pub fn total(&self) -> usize {
        self.lock().refs.len()
    }

    /// Tiles held by someone.
    pub fn used(&self) -> usize {
        let g = self.lock();
        g.refs.len() - g.free.len()
    }

    /// Free tiles.
    pub fn free(&self) -> usize {
        self.lock().free.len()
    }

    /// Holders of tile `t` (0 when free or out of range).
    pub fn holders(&self, t: u32) -> u32 {
        self.lock().refs.get(t as usize).copied().unwrap_or(0)
    }

    /// The storage tensor `[tiles, tile_bytes]` u8 (shares the arena's storage: in-place ops
    /// on it write the arena). Errors while a growing arena holds no tile.
    pub fn tensor(&self) -> Result<Tensor> {
        self.lock()
            .data
            .clone()
            .ok_or_else(|| Error::Protocol("the arena holds no tile yet".into()))
    }

    /// `n` free tiles, each with one holder, or (changing nothing) [`Error::ArenaFull`]; a
    /// growing arena grows first.
    pub fn alloc(&self, n: usize) -> Result<Vec<u32>> {
        let mut g = self.lock();
        if g.free.len() < n {
            if !self.growing {
                return Err(Error::ArenaFull {
                    need: n,
                    free: g.free.len(),
                    total: g.refs.len(),
                });
            }
            let old = g.refs.len();
            let want = (old + n - g.free.len()).max(2 * old).max(16);
            if want > u32::MAX as usize - 1 {
                return Err(Error::ArenaFull {
                    need: n,
                    free: g.free.len(),
                    total: old,
                });
            }
            let data = Tensor::zeros((want, self.tile_bytes), DType::U8, &self.device)?;
            if let Some(d) = &g.data {
                data.slice_set(d, 0, 0)?;
            }
            g.data = Some(data);
            g.refs.resize(want, 0);
            // New tiles below the old free ones: the lowest free index stays last.
            let mut free: Vec<u32> = (old as u32..want as u32).rev().collect();
            free.extend_from_slice(&g.free);
            g.free = free;
        }
        let at = g.free.len() - n;
        let out: Vec<u32> = g.free.drain(at..).rev().collect();
        for &t in &out {
            g.refs[t as usize] = 1;
        }
        Ok(out)
    }

    /// One more holder for each of `tiles` (held ones; others are a protocol error and change
    /// nothing).
    pub fn retain(&self, tiles: &[u32]) -> Result<()> {
        let mut g = self.lock();
        if let Some(&t) = tiles
            .iter()
            .find(|&&t| g.refs.get(t as usize).is_none_or(|&r| r == 0))
        {
            return Err(Error::Protocol(format!(
                "retain of tile {t}, which is free"
            )));
        }
        for &t in tiles {
            g.refs[t as usize] += 1;
        }
        Ok(())
    }

    /// One holder less for each of `tiles`; a tile nobody holds is free again. Tiles that are
    /// free already are ignored (never counted twice).
    pub fn release(&self, tiles: &[u32]) {
        let mut g = self.lock();
        for &t in tiles {
            let Some(r) = g.refs.get_mut(t as usize) else {
                continue;
            };
            if *r == 0 {
                continue;
            }
            *r -= 1;
            if *r == 0 {
                g.free.push(t);
            }
        }
        // Lowest index last: allocation order stays deterministic.
        g.free.sort_unstable_by(|a, b| b.cmp(a));
        if self.growing && g.free.len() == g.refs.len() {
            // A private arena nobody holds a tile of gives its memory back.
            g.data = None;
            g.refs.clear();
            g.free.clear();
        }
    }

    /// Tile `t` itself when it has one holder; else a fresh copy of it (one holder) and one
    /// holder less for `t`: what a holder about to write into a shared tile needs.
    pub fn make_private(&self, t: u32) -> Result<u32> {
        if self.holders(t) <= 1 {
            return Ok(t);
        }
        let new = self.alloc(1)?[0];
        let data = self.tensor()?;
        let row = data.narrow(0, t as usize, 1)?.copy()?;
        if let Err(e) = data.slice_set(&row, 0, new as usize) {
            self.release(&[new]);
            return Err(e.into());
        }
        self.release(&[t]);
        Ok(new)
    }

    /// Bytes of all tiles (held or free).
    pub fn bytes(&self) -> usize {
        self.total() * self.tile_bytes
    }
}

fn check_tile(tile_bytes: usize) -> Result<()> {
    if tile_bytes == 0 || tile_bytes % TILE_ALIGN != 0 || tile_bytes > 1 << 30 {
        return Err(Error::Kind(format!(
            "tiles of {tile_bytes} bytes: a positive multiple of {TILE_ALIGN}, at most 1 GiB"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_are_counted_shared_and_freed() {
        let a = TileArena::new(&Device::Cpu, 32, 4).unwrap();
        assert_eq!((a.total(), a.used(), a.free()), (4, 0, 4));
        let t = a.alloc(3).unwrap();
        assert_eq!(t, vec![0, 1, 2], "lowest first");
        assert!(matches!(
            a.alloc(2),
            Err(Error::ArenaFull {
                need: 2,
                free: 1,
                total: 4
            })
        ));
        assert_eq!(a.used(), 3, "a refused allocation takes nothing");
        a.retain(&[1]).unwrap();
        assert!(a.retain(&[3]).is_err(), "tile 3 is free");
        a.release(&[1]);
        assert_eq!((a.holders(1), a.used()), (1, 3));
        // Writing into a shared tile: a copy with its bytes.
        let data = a.tensor().unwrap();
        data.slice_set(&Tensor::full(7u8, (1, 32), &Device::Cpu).unwrap(), 0, 1)
            .unwrap();
        a.retain(&[1]).unwrap();
        let p = a.make_private(1).unwrap();
        assert_eq!((p, a.holders(1), a.holders(3)), (3, 1, 1));
        let row: Vec<u8> = a.tensor().unwrap().get(3).unwrap().to_vec1().unwrap();
        assert!(row.iter().all(|&x| x == 7));
        assert_eq!(a.make_private(3).unwrap(), 3, "one holder: itself");
        a.release(&[0, 1, 2, 3, 3]);
        assert_eq!((a.used(), a.free()), (0, 4));
        assert!(TileArena::new(&Device::Cpu, 33, 4).is_err());
        assert!(TileArena::new(&Device::Cpu, 32, 0).is_err());
    }

    #[test]
    fn a_growing_arena_keeps_its_tiles() {
        let a = TileArena::growing(&Device::Cpu, 16).unwrap();
        assert!(a.tensor().is_err());
        let t = a.alloc(5).unwrap();
        assert_eq!((a.total(), &t[..]), (16, &[0, 1, 2, 3, 4][..]));
        a.tensor()
            .unwrap()
            .slice_set(&Tensor::full(9u8, (1, 16), &Device::Cpu).unwrap(), 0, 4)
            .unwrap();
        let more = a.alloc(20).unwrap();
        assert_eq!(more.len(), 20);
        assert_eq!(a.total(), 32);
        let row: Vec<u8> = a.tensor().unwrap().get(4).unwrap().to_vec1().unwrap();
        assert!(row.iter().all(|&x| x == 9), "tile 4 kept its bytes");
        a.release(&t);
        assert_eq!(a.alloc(1).unwrap(), vec![0]);
        a.release(&more);
        a.release(&[0]);
        assert_eq!(
            (a.total(), a.bytes()),
            (0, 0),
            "all free: the memory goes back"
        );
        assert_eq!(a.alloc(2).unwrap(), vec![0, 1]);
    }
}
