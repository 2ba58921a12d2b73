//! The table bookkeeping every paged cache shares: which entries of a sequence's tables need a
//! tile before a write (a new one, or a copy of one other holders share), getting those tiles
//! from the arena all at once, and what a rolled-back step gives back.

use crate::arena::TileArena;
use crate::error::Result;
use std::ops::Range;
use tqkv::paged::NO_TILE;

/// A table entry waiting for the tile [`Need`] says (only in an append's own copy).
pub(crate) const PENDING: u32 = NO_TILE - 1;

/// What a table entry needs before a write: a new tile, or a copy of a tile others hold too.
pub(crate) enum Need {
    New,
    Copy(u32),
}

/// One entry that needs a tile: (sequence, part, index in that part's table, what).
pub(crate) type Want = (usize, usize, usize, Need);

/// Adds to `wants` each entry `j` of `tiles` in `table` (grown with [`NO_TILE`]) of
/// (sequence, part) that must get a tile before a write: a new one where none is held, a copy
/// where the tile held is shared. Marks them [`PENDING`], so that ranges covering an entry twice
/// ask once.
pub(crate) fn need_tiles(
    arena: &TileArena,
    table: &mut Vec<u32>,
    tiles: Range<usize>,
    (seq, part): (usize, usize),
    wants: &mut Vec<Want>,
) {
    if table.len() < tiles.end {
        table.resize(tiles.end, NO_TILE);
    }
    for j in tiles {
        match table[j] {
            PENDING => continue,
            NO_TILE => wants.push((seq, part, j, Need::New)),
            t if arena.holders(t) > 1 => wants.push((seq, part, j, Need::Copy(t))),
            _ => continue,
        }
        table[j] = PENDING;
    }
}

/// Gets every tile `wants` asks for from the arena, all or none (`fresh[i]` is for
/// `wants[i]`), copying the bytes of each shared tile into its copy; on error the tiles taken
/// are given back.
pub(crate) fn provide(arena: &TileArena, wants: &[Want]) -> Result<Vec<u32>> {
    let fresh = arena.alloc(wants.len())?;
    let copy = || -> Result<()> {
        if !wants.iter().any(|w| matches!(w.3, Need::Copy(_))) {
            return Ok(());
        }
        let data = arena.tensor()?;
        for (w, &t) in wants.iter().zip(&fresh) {
            if let Need::Copy(old) = w.3 {
                let row = data.narrow(0, old as usize, 1)?.copy()?;
                data.slice_set(&row, 0, t as usize)?;
            }
        }
        Ok(())
    };
    if let Err(e) = copy() {
        arena.release(&fresh);
        return Err(e);
    }
    Ok(fresh)
}

/// The shared tiles `wants` copies: the caller drops its reference to each once its tables
/// hold the copies.
pub(crate) fn copied(wants: &[Want]) -> impl Iterator<Item = u32> + '_ {
    wants.iter().filter_map(|w| match w.3 {
        Need::Copy(old) => Some(old),
        Need::New => None,
    })
}

/// The tiles a rolled-back step took: those the tables hold now, or retired during the step,
/// that the saved tables do not hold.
pub(crate) fn taken_since(
    saved: impl Iterator<Item = u32>,
    now: impl Iterator<Item = u32>,
    retired: &[u32],
) -> Vec<u32> {
    let saved: std::collections::HashSet<u32> = saved.collect();
    now.chain(retired.iter().copied())
        .filter(|t| !saved.contains(t))
        .collect()
}
