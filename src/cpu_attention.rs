//! The CPU attention kernel: attention of one KV head's queries straight from its packed
//! records where they lie (a dense buffer, or the tiles of an arena through a table), with the
//! exact rows of sinks and window, in one online softmax. The math is that of
//! [`crate::attention::attend_cycled`] (the reference it is tested against); what differs is
//! how it is computed:
//!
//! * Positions go by blocks of [`BLOCK`]: the block's keys and values are unpacked once, with
//!   SIMD ([`crate::simd`]), into rotated-domain rows `n·c[idx]` (and `a·γ·z` for QJL signs) in
//!   a buffer that stays in L1, shared by every query of the call; nothing of size n is ever
//!   allocated or unpacked.
//! * A query is rotated (and projected) once per quantizer of the rotation cycle, with the
//!   softmax scale folded in, so a score is one dot product with a key row; the block's scores
//!   update the query's running max and sum (online softmax, a vectorised `exp`), and its values
//!   are accumulated in the rotated domain, one accumulator per quantizer of the cycle,
//!   un-rotated once per query at the end.
//! * Parallel work (rayon): a call with more than [`QUERY_BLOCK`] queries (a prefill chunk) is
//!   split into blocks of queries; one with few (decode) over a context longer than [`CHUNK`]
//!   positions is split into chunks of positions whose partial softmax states are merged in
//!   position order. How a call is split depends only on its shape, never on the threads, so
//!   results are bit-identical for any thread count.
//!
//! Layouts: `q` `[nq, d]` f32 row-major, `out` `[nq, d]`; `visible[i]` the positions query i
//! sees (causal masking and per-sequence lengths are the caller's); records of slot t as
//! [`TileRows`] places them (the key and value records of one head, `row_bytes` each).

use crate::attention::ExactRows;
use crate::error::{check_len, Error, Result};
use crate::packing::packed_len;
use crate::paged::{ExactTiles, TileRows};
use crate::quantizer::VectorQuantizer;
use crate::simd::{self, Isa, ScalarUnpack, Unpack};
use crate::NormFormat;

/// Positions unpacked at once.
pub const BLOCK: usize = 64;
/// Positions per chunk of a long context split over threads (decode).
pub const CHUNK: usize = 1024;
/// Queries per parallel block of a call with many queries (prefill).
pub const QUERY_BLOCK: usize = 32;

/// The records of one KV head: slot t's record at `rows.at(table, t, head)` in `arena`.
#[derive(Debug, Clone, Copy)]
pub struct HeadRecords<'a> {
    /// The bytes the table points into.
    pub arena: &'a [u8],
    /// Where the records sit in their tiles.
    pub rows: TileRows,
    /// The sequence's table.
    pub table: &'a [u32],
    /// The KV head.
    pub head: usize,
}

impl<'a> HeadRecords<'a> {
    /// Records stored densely, `[n, row_bytes]` (one tile holding every slot).
    pub fn dense(records: &'a [u8], row_bytes: usize) -> Self {
        let n = records.len() / row_bytes.max(1);
        HeadRecords {
            arena: records,
            rows: TileRows {
                tile_bytes: records.len(),
                per_tile: n.max(1),
                offset: 0,
                slot_stride: row_bytes,
                head_stride: 0,
                row_bytes,
                heads: 1,
            },
            table: &[0],
            head: 0,
        }
    }

    /// The records of slots `from..` up to `to` or the end of `from`'s tile, whichever comes
    /// first: (bytes starting at slot `from`'s record, slots).
    fn run(&self, from: usize, to: usize) -> Result<(&'a [u8], usize)> {
        let r = &self.rows;
        let end = ((from / r.per_tile + 1) * r.per_tile).min(to);
        let missing = || {
            Error::Config(format!(
                "record of slot {from} (head {}): its tile is not held",
                self.head
            ))
        };
        let at = r.at(self.table, from, self.head).ok_or_else(missing)?;
        let bytes = (end - from - 1) * r.slot_stride + r.row_bytes;
        let s = self.arena.get(at..at + bytes).ok_or_else(missing)?;
        Ok((s, end - from))
    }
}

/// Full-precision rows of one KV head (attention sinks and the window of recent tokens): query
/// i, which sees `vis` positions, reads `0..min(sinks, vis)` and `packed_end(i)..vis` from here
/// and the positions between from records.
pub trait ExactSource: Sync {
    /// Sink tokens S.
    fn sinks(&self) -> usize;
    /// Where query i's window starts (`None`: it has none, every position after the sinks is
    /// read from records).
    fn packed_end(&self, i: usize) -> Option<usize>;
    /// The stored row of position `pos` (its key and value).
    fn row(&self, pos: usize, d: usize) -> Result<ExactRow<'_>>;
    /// Checks the rows against the queries' visible lengths (before anything is read).
    fn check(&self, d: usize, visible: &[usize]) -> Result<()>;
}

/// One exact row as stored: f32 vectors, or a row of an [`ExactTiles`] (the key then the value
/// vector, f16 or q8_0).
#[derive(Debug, Clone, Copy)]
pub enum ExactRow<'a> {
    /// The key and value vectors.
    F32(&'a [f32], &'a [f32]),
    /// A stored row and its format.
    Stored(&'a [u8], crate::ExactFormat),
}

impl ExactRow<'_> {
    /// Key into `k`, value into `v`.
    #[inline(always)]
    fn decode<U: Unpack>(self, u: U, k: &mut [f32], v: &mut [f32]) {
        match self {
            ExactRow::F32(a, b) => {
                k.copy_from_slice(a);
                v.copy_from_slice(b);
            }
            ExactRow::Stored(row, fmt) => {
                let vb = fmt.vector_bytes(k.len());
                for (src, out) in [(&row[..vb], k), (&row[vb..2 * vb], v)] {
                    match fmt {
                        crate::ExactFormat::F16 => u.f16_row(src, out),
                        crate::ExactFormat::Q8 => u.q8_row(src, out),
                    }
                }
            }
        }
    }
}

impl ExactSource for ExactRows<'_> {
    fn sinks(&self) -> usize {
        self.sinks
    }
    fn packed_end(&self, i: usize) -> Option<usize> {
        self.packed_end.get(i).copied()
    }
    fn row(&self, pos: usize, d: usize) -> Result<ExactRow<'_>> {
        let (ks, vs, r) = if pos < self.sinks {
            (self.sink_k, self.sink_v, pos)
        } else {
            let r = pos.checked_sub(self.win_start).ok_or_else(|| {
                Error::Config(format!("exact row of position {pos} is not given"))
            })?;
            (self.win_k, self.win_v, r)
        };
        match (ks.get(r * d..(r + 1) * d), vs.get(r * d..(r + 1) * d)) {
            (Some(a), Some(b)) => Ok(ExactRow::F32(a, b)),
            _ => Err(Error::Config(format!(
                "exact row of position {pos} is not given"
            ))),
        }
    }
    fn check(&self, d: usize, visible: &[usize]) -> Result<()> {
        ExactRows::check(self, d, visible)
    }
}

/// Exact rows in the tiles of an arena ([`ExactTiles`]), reached through a table.
#[derive(Debug, Clone, Copy)]
pub struct PagedExact<'a> {
    /// The bytes the table points into.
    pub arena: &'a [u8],
    /// How the rows fill a tile.
    pub tiles: ExactTiles,
    /// The sequence's table of exact tiles.
    pub table: &'a [u32],
    /// The KV head.
    pub head: usize,
    /// Sink tokens S.
    pub sinks: usize,
    /// Per query: where its window starts.
    pub packed_end: &'a [usize],
}

impl ExactSource for PagedExact<'_> {
    fn sinks(&self) -> usize {
        self.sinks
    }
    fn packed_end(&self, i: usize) -> Option<usize> {
        self.packed_end.get(i).copied()
    }
    fn row(&self, pos: usize, _d: usize) -> Result<ExactRow<'_>> {
        let r = self.tiles.rows();
        let row = r
            .at(self.table, pos, self.head)
            .and_then(|at| self.arena.get(at..at + r.row_bytes))
            .ok_or_else(|| {
                Error::Config(format!(
                    "exact row of position {pos} (head {}): its tile is not held",
                    self.head
                ))
            })?;
        Ok(ExactRow::Stored(row, self.tiles.format))
    }
    fn check(&self, d: usize, visible: &[usize]) -> Result<()> {
        if self.tiles.dim != d {
            return Err(Error::Config(format!(
                "exact tiles of dim {} for queries of dim {d}",
                self.tiles.dim
            )));
        }
        if !self.packed_end.is_empty() && self.packed_end.len() != visible.len() {
            return Err(Error::Config(format!(
                "exact rows: {} packed ends for {} queries",
                self.packed_end.len(),
                visible.len()
            )));
        }
        Ok(())
    }
}

/// One field of a record unpacked into a row: MSE codes (`n·c[idx]`) or QJL signs
/// (`γ/(mκ)·z`).
#[derive(Debug, Clone)]
struct Part {
    group: usize,
    bits: u8,
    len: usize,
    /// Where it goes in the unpacked row.
    row_off: usize,
    /// Packed codes / signs in the record.
    data_off: usize,
    /// The norm n / γ in the record.
    norm_off: usize,
    sign: bool,
}

/// How the records of one side (keys or values) unpack: parts, row width, and per quantizer
/// m of the cycle its tables (`tables[m · parts + p]`, ≥ 16 entries) and multipliers.
struct Side {
    parts: Vec<Part>,
    width: usize,
    norm: NormFormat,
    tables: Vec<Vec<f32>>,
    mult: Vec<f32>,
}

impl Side {
    /// No records (exact attention only).
    fn empty() -> Side {
        Side {
            parts: Vec::new(),
            width: 0,
            norm: NormFormat::F16,
            tables: Vec::new(),
            mult: Vec::new(),
        }
    }

    fn new(qs: &[VectorQuantizer]) -> Result<Side> {
        let layout = qs[0].layout();
        let mut parts = Vec::new();
        let mut off = 0;
        for (g, gl) in layout.groups.iter().enumerate() {
            if gl.mse_bits > 0 {
                parts.push(Part {
                    group: g,
                    bits: gl.mse_bits,
                    len: gl.dim,
                    row_off: off,
                    data_off: gl.codes_offset,
                    norm_off: gl.norm_offset,
                    sign: false,
                });
                off += gl.dim;
            }
        }
        for (g, gl) in layout.groups.iter().enumerate() {
            if gl.sketch_dim > 0 {
                parts.push(Part {
                    group: g,
                    bits: 1,
                    len: gl.sketch_dim,
                    row_off: off,
                    data_off: gl.signs_offset,
                    norm_off: gl.gamma_offset,
                    sign: true,
                });
                off += gl.sketch_dim;
            }
        }
        let mut tables = Vec::new();
        let mut mult = Vec::new();
        for q in qs {
            for p in &parts {
                let entries = (1usize << p.bits).max(16);
                let mut t = vec![0.0f32; entries];
                if p.sign {
                    t[0] = -1.0;
                    t[1] = 1.0;
                    let qjl = q.group_qjl(p.group).ok_or_else(|| {
                        Error::Config("cycled quantizers must share one record layout".into())
                    })?;
                    mult.push((1.0 / (p.len as f64 * qjl.kappa())) as f32);
                } else {
                    let mse = q.group_mse(p.group).ok_or_else(|| {
                        Error::Config("cycled quantizers must share one record layout".into())
                    })?;
                    let c = mse.codebook().centroids();
                    t[..c.len()].copy_from_slice(c);
                    mult.push(1.0);
                }
                tables.push(t);
            }
        }
        Ok(Side {
            parts,
            width: off,
            norm: qs[0].spec().norm,
            tables,
            mult,
        })
    }

    /// Unpacks the record `rec` written by quantizer `m` into `out` (`width` floats).
    #[inline(always)]
    fn unpack_row<U: Unpack>(&self, u: U, rec: &[u8], m: usize, out: &mut [f32]) {
        let np = self.parts.len();
        for (pi, p) in self.parts.iter().enumerate() {
            let scale = self.norm.read(rec, p.norm_off) * self.mult[m * np + pi];
            let table = &self.tables[m * np + pi];
            let src = &rec[p.data_off..p.data_off + packed_len(p.len, p.bits)];
            let dst = &mut out[p.row_off..p.row_off + p.len];
            match p.bits {
                1 => u.unpack::<1>(src, table, scale, dst),
                2 => u.unpack::<2>(src, table, scale, dst),
                3 => u.unpack::<3>(src, table, scale, dst),
                4 => u.unpack::<4>(src, table, scale, dst),
                5 => u.unpack::<5>(src, table, scale, dst),
                6 => u.unpack::<6>(src, table, scale, dst),
                7 => u.unpack::<7>(src, table, scale, dst),
                _ => u.unpack::<8>(src, table, scale, dst),
            }
        }
    }
}

/// The per-query ranges: sinks `0..s`, records `s..w`, window `w..vis`.
#[derive(Debug, Clone, Copy)]
struct Split {
    s: usize,
    w: usize,
    vis: usize,
}

/// A query block's running softmax over the positions seen so far.
struct State {
    /// Per query: running max and sum.
    m: Vec<f32>,
    l: Vec<f32>,
    /// Per query: `cycle` rotated-domain value accumulators of `width_v`, then `d` for the
    /// exact rows.
    acc: Vec<f32>,
}

/// The shared, read-only parts of one call.
struct Call<'a> {
    kqs: &'a [VectorQuantizer],
    vqs: &'a [VectorQuantizer],
    ks: Side,
    vs: Side,
    keys: HeadRecords<'a>,
    values: HeadRecords<'a>,
    exact: Option<&'a dyn ExactSource>,
    d: usize,
    cycle: usize,
    splits: Vec<Split>,
    /// Per query: `cycle` key-side query rows (rotated, projected, scaled) of `ks.width`,
    /// then the scaled query itself (`d`, for exact rows).
    qrows: Vec<f32>,
}

impl Call<'_> {
    fn qstride(&self) -> usize {
        self.cycle * self.ks.width + self.d
    }
    fn astride(&self) -> usize {
        self.cycle * self.vs.width + self.d
    }

    fn new_state(&self, nq: usize) -> State {
        State {
            m: vec![f32::NEG_INFINITY; nq],
            l: vec![0.0; nq],
            acc: vec![0.0; nq * self.astride()],
        }
    }

    /// Runs queries `qs` over positions `pos`, block by block.
    #[inline(always)]
    fn run<U: Unpack>(
        &self,
        u: U,
        qs: std::ops::Range<usize>,
        pos: std::ops::Range<usize>,
    ) -> Result<State> {
        let mut st = self.new_state(qs.len());
        let sp = &self.splits[qs.clone()];
        let (d, wk, wv) = (self.d, self.ks.width, self.vs.width);
        let mut kbuf = vec![0.0f32; BLOCK * wk.max(d)];
        let mut vbuf = vec![0.0f32; BLOCK * wv.max(d)];
        let mut sc = [[0.0f32; BLOCK]; GROUP];
        // Exact rows: sinks, then the window (disjoint: windows start after the sinks).
        if self.exact.is_some() {
            let smax = sp.iter().map(|x| x.s).max().unwrap_or(0);
            let wmin = sp
                .iter()
                .filter(|x| x.w < x.vis)
                .map(|x| x.w)
                .min()
                .unwrap_or(usize::MAX);
            let vmax = sp.iter().map(|x| x.vis).max().unwrap_or(0);
            for region in [0..smax, wmin..vmax] {
                let (lo, hi) = (region.start.max(pos.start), region.end.min(pos.end));
                let mut b0 = lo;
                while b0 < hi {
                    let b1 = (b0 + BLOCK).min(hi);
                    self.exact_block(
                        u,
                        &mut st,
                        qs.clone(),
                        b0..b1,
                        &mut kbuf,
                        &mut vbuf,
                        &mut sc,
                    )?;
                    b0 = b1;
                }
            }
        }
        // Records.
        let pmin = sp
            .iter()
            .filter(|x| x.s < x.w)
            .map(|x| x.s)
            .min()
            .unwrap_or(0);
        let pmax = sp
            .iter()
            .filter(|x| x.s < x.w)
            .map(|x| x.w)
            .max()
            .unwrap_or(0);
        let (lo, hi) = (pmin.max(pos.start), pmax.min(pos.end));
        let mut b0 = lo;
        while b0 < hi {
            let b1 = (b0 + BLOCK).min(hi);
            self.unpack_block(u, &self.keys, &self.ks, b0..b1, &mut kbuf)?;
            self.unpack_block(u, &self.values, &self.vs, b0..b1, &mut vbuf)?;
            let blk = Block {
                kbuf: &kbuf,
                vbuf: &vbuf,
                wk,
                wv,
                b0,
                cycle: self.cycle,
                acc_off: 0,
            };
            let members = sp.iter().enumerate().filter_map(|(j, x)| {
                let (r0, r1) = (b0.max(x.s), b1.min(x.w));
                let at = (qs.start + j) * self.qstride();
                let rows = &self.qrows[at..at + self.cycle * wk];
                (r0 < r1).then_some(Member { j, r0, r1, rows })
            });
            blk.attend_all::<U>(members, &mut st, self.astride(), &mut sc);
            b0 = b1;
        }
        Ok(st)
    }

    /// Unpacks the records of slots `block` into rows of `side.width`.
    #[inline(always)]
    fn unpack_block<U: Unpack>(
        &self,
        u: U,
        recs: &HeadRecords,
        side: &Side,
        block: std::ops::Range<usize>,
        buf: &mut [f32],
    ) -> Result<()> {
        let (w, stride, rb) = (side.width, recs.rows.slot_stride, recs.rows.row_bytes);
        let mut t = block.start;
        while t < block.end {
            let (bytes, count) = recs.run(t, block.end)?;
            for k in 0..count {
                let rec = &bytes[k * stride..k * stride + rb];
                let r = t + k - block.start;
                side.unpack_row(u, rec, (t + k) % self.cycle, &mut buf[r * w..(r + 1) * w]);
            }
            t += count;
        }
        Ok(())
    }

    /// Exact rows of positions `block` for the queries that read them exactly.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn exact_block<U: Unpack>(
        &self,
        u: U,
        st: &mut State,
        qs: std::ops::Range<usize>,
        block: std::ops::Range<usize>,
        kbuf: &mut [f32],
        vbuf: &mut [f32],
        sc: &mut [[f32; BLOCK]; GROUP],
    ) -> Result<()> {
        let d = self.d;
        let ex = self.exact.expect("exact rows");
        for (r, p) in block.clone().enumerate() {
            ex.row(p, d)?.decode(
                u,
                &mut kbuf[r * d..(r + 1) * d],
                &mut vbuf[r * d..(r + 1) * d],
            );
        }
        let blk = Block {
            kbuf: &*kbuf,
            vbuf: &*vbuf,
            wk: d,
            wv: d,
            b0: block.start,
            cycle: 1,
            acc_off: self.cycle * self.vs.width,
        };
        let members = self.splits[qs.clone()]
            .iter()
            .enumerate()
            .filter_map(|(j, x)| {
                // Exact positions of this query inside the block: [0, s) ∪ [w, vis).
                let (r0, r1) = if block.start < x.s {
                    (block.start, block.end.min(x.s))
                } else {
                    (block.start.max(x.w), block.end.min(x.vis))
                };
                let at = (qs.start + j) * self.qstride() + self.cycle * self.ks.width;
                let rows = &self.qrows[at..at + d];
                (r0 < r1).then_some(Member { j, r0, r1, rows })
            });
        blk.attend_all::<U>(members, st, self.astride(), sc);
        Ok(())
    }
}

/// Queries scored together against a block's keys (each key row is loaded once for all).
const GROUP: usize = 4;

/// One query of a [`Group`]: its index in the state, the positions `r0..r1` of the block it
/// reads, and its query rows (one of `wk` per class of the cycle).
#[derive(Clone, Copy, Default)]
struct Member<'a> {
    j: usize,
    r0: usize,
    r1: usize,
    rows: &'a [f32],
}

#[derive(Default)]
struct Group<'a> {
    m: [Member<'a>; GROUP],
    len: usize,
}

impl<'a> Group<'a> {
    fn push(&mut self, x: Member<'a>) {
        self.m[self.len] = x;
        self.len += 1;
    }
}

/// A block of unpacked rows: key rows of `wk` and value rows of `wv` floats for positions
/// `b0..`; position t belongs to class `t % cycle` (the quantizer that wrote it), whose value
/// accumulator is at `acc_off + class · wv` of a query's accumulators.
struct Block<'a> {
    kbuf: &'a [f32],
    vbuf: &'a [f32],
    wk: usize,
    wv: usize,
    b0: usize,
    cycle: usize,
    acc_off: usize,
}

impl Block<'_> {
    /// The first position ≥ `from` of class `m`.
    #[inline(always)]
    fn first(&self, from: usize, m: usize) -> usize {
        from + (m + self.cycle - from % self.cycle) % self.cycle
    }

    /// Attends `members` over their positions of the block, [`GROUP`] at a time.
    #[inline(always)]
    fn attend_all<'q, U: Unpack>(
        &self,
        members: impl Iterator<Item = Member<'q>>,
        st: &mut State,
        astride: usize,
        sc: &mut [[f32; BLOCK]; GROUP],
    ) {
        let mut group = Group::default();
        for x in members {
            group.push(x);
            if group.len == GROUP {
                self.attend::<U>(&mut group, st, astride, sc);
            }
        }
        self.attend::<U>(&mut group, st, astride, sc);
    }

    /// Attends the group's queries over their positions of the block and empties the group:
    /// scores of up to [`GROUP`] queries against two keys of one class at a time, then per query
    /// the online softmax and, per class, the weighted value rows added to its accumulator
    /// (64 columns at a time, kept in registers). Each accumulator sees its positions in
    /// increasing order, as [`crate::attention::attend_cycled`] sums them.
    #[inline(always)]
    fn attend<U: Unpack>(
        &self,
        group: &mut Group,
        st: &mut State,
        astride: usize,
        sc: &mut [[f32; BLOCK]; GROUP],
    ) {
        let members = &group.m[..group.len];
        match members.len() {
            0 => return,
            1 => self.scores::<U, 1>(members, sc),
            2 => self.scores::<U, 2>(members, sc),
            3 => self.scores::<U, 3>(members, sc),
            _ => self.scores::<U, 4>(members, sc),
        }
        let (b0, wv) = (self.b0, self.wv);
        for (x, sc) in members.iter().zip(sc.iter_mut()) {
            let acc = &mut st.acc[x.j * astride..(x.j + 1) * astride];
            let w = &mut sc[x.r0 - b0..x.r1 - b0];
            online::<U>(&mut st.m[x.j], &mut st.l[x.j], acc, w);
            for m in 0..self.cycle {
                let first = self.first(x.r0, m);
                if first >= x.r1 {
                    continue;
                }
                let a = &mut acc[self.acc_off + m * wv..self.acc_off + (m + 1) * wv];
                accumulate::<U>(
                    &sc[..],
                    self.vbuf,
                    wv,
                    (first - b0..x.r1 - b0).step_by(self.cycle),
                    a,
                );
            }
        }
        group.len = 0;
    }

    /// `sc[g][t − b0]` = ⟨query row of class t % cycle of member g, key row t⟩ for every t in
    /// the union of the members' ranges (a position outside a member's own range gets a score
    /// it never reads).
    #[inline(always)]
    fn scores<U: Unpack, const G: usize>(
        &self,
        members: &[Member],
        sc: &mut [[f32; BLOCK]; GROUP],
    ) {
        let (b0, wk, cy) = (self.b0, self.wk, self.cycle);
        let lo = members.iter().map(|x| x.r0).min().unwrap_or(b0);
        let hi = members.iter().map(|x| x.r1).max().unwrap_or(b0);
        let key = |t: usize| &self.kbuf[(t - b0) * wk..(t - b0 + 1) * wk];
        for m in 0..cy {
            let q: [&[f32]; G] = std::array::from_fn(|g| &members[g].rows[m * wk..(m + 1) * wk]);
            let mut t = self.first(lo, m);
            while t + cy < hi {
                let s = U::dots::<G, 2>(q, [key(t), key(t + cy)]);
                for g in 0..G {
                    sc[g][t - b0] = s[g][0];
                    sc[g][t + cy - b0] = s[g][1];
                }
                t += 2 * cy;
            }
            if t < hi {
                let s = U::dots::<G, 1>(q, [key(t)]);
                for g in 0..G {
                    sc[g][t - b0] = s[g][0];
                }
            }
        }
    }
}

/// `acc += Σ_r p[r] · rows[r]` over the rows `rs` of `buf` (rows of `w`), in the order of
/// `rs`, each element by one `mad` per row ([`simd::axpy`]'s arithmetic); 64 columns at a time
/// stay in registers across the rows.
#[inline(always)]
fn accumulate<U: Unpack>(
    p: &[f32],
    buf: &[f32],
    w: usize,
    rs: std::iter::StepBy<std::ops::Range<usize>>,
    acc: &mut [f32],
) {
    const C: usize = 64;
    let mut c0 = 0;
    while c0 + C <= w {
        let mut a: [f32; C] = acc[c0..c0 + C].try_into().expect("64 columns");
        for r in rs.clone() {
            let pr = p[r];
            let v: &[f32; C] = buf[r * w + c0..r * w + c0 + C]
                .try_into()
                .expect("64 columns");
            for c in 0..C {
                a[c] = simd::mad::<U>(pr, v[c], a[c]);
            }
        }
        acc[c0..c0 + C].copy_from_slice(&a);
        c0 += C;
    }
    if c0 < w {
        for r in rs {
            simd::axpy::<U>(p[r], &buf[r * w + c0..(r + 1) * w], &mut acc[c0..w]);
        }
    }
}

/// One block of scores into the running softmax of a query: rescales `acc` when the max
/// grows, turns `sc` into weights e^(s − max), adds them to the sum.
#[inline(always)]
fn online<U: Unpack>(m: &mut f32, l: &mut f32, acc: &mut [f32], sc: &mut [f32]) {
    let bm = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if bm > *m {
        if *l > 0.0 {
            let f = (*m - bm).exp();
            *l *= f;
            acc.iter_mut().for_each(|a| *a *= f);
        }
        *m = bm;
    }
    let mut sum = 0.0f32;
    for x in sc.iter_mut() {
        *x = simd::exp_neg::<U>(*x - *m);
        sum += *x;
    }
    *l += sum;
}

/// Folds `b` (later positions) into `a`.
fn merge(a: &mut State, b: &State, astride: usize) {
    for j in 0..a.m.len() {
        if b.l[j] == 0.0 {
            continue;
        }
        if a.l[j] == 0.0 {
            a.m[j] = b.m[j];
            a.l[j] = b.l[j];
            a.acc[j * astride..(j + 1) * astride]
                .copy_from_slice(&b.acc[j * astride..(j + 1) * astride]);
            continue;
        }
        let mx = a.m[j].max(b.m[j]);
        let (fa, fb) = ((a.m[j] - mx).exp(), (b.m[j] - mx).exp());
        a.m[j] = mx;
        a.l[j] = a.l[j] * fa + b.l[j] * fb;
        for (x, &y) in a.acc[j * astride..(j + 1) * astride]
            .iter_mut()
            .zip(&b.acc[j * astride..(j + 1) * astride])
        {
            *x = *x * fa + y * fb;
        }
    }
}

/// Attention of `q` over the records of `keys` and `values` (and the exact rows of `exact`):
/// [`crate::attention::attend_cycled`]'s result, computed as the module docs say, with the
/// code path `isa` ([`Isa::detect`] for the best).
///
/// The record of slot t was written by quantizer `t % M` of `kqs` / `vqs` (M their equal
/// length, ≥ 1; one record layout). Errors, writing nothing meaningful, on inconsistent shapes
/// or a record or row whose tile is not held.
#[allow(clippy::too_many_arguments)]
pub fn attend_tiles(
    isa: Isa,
    kqs: &[VectorQuantizer],
    vqs: &[VectorQuantizer],
    q: &[f32],
    keys: HeadRecords,
    values: HeadRecords,
    exact: Option<&dyn ExactSource>,
    visible: &[usize],
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let cycle = kqs.len();
    if cycle == 0 || vqs.len() != cycle {
        return Err(Error::Config(format!(
            "{} key and {} value quantizers: need the same number, at least one",
            kqs.len(),
            vqs.len()
        )));
    }
    if kqs.iter().any(|x| x.layout() != kqs[0].layout())
        || vqs.iter().any(|x| x.layout() != vqs[0].layout())
    {
        return Err(Error::Config(
            "cycled quantizers must share one record layout".into(),
        ));
    }
    let d = kqs[0].dim();
    if vqs[0].dim() != d {
        return Err(Error::Config(format!(
            "key dim {d} and value dim {} differ",
            vqs[0].dim()
        )));
    }
    for (what, r, qz) in [("key", &keys, &kqs[0]), ("value", &values, &vqs[0])] {
        if r.rows.row_bytes != qz.record_bytes() || r.rows.per_tile == 0 {
            return Err(Error::Config(format!(
                "{what} records of {} bytes, the quantizer writes {}",
                r.rows.row_bytes,
                qz.record_bytes()
            )));
        }
    }
    let nq = visible.len();
    check_len("queries", q.len(), nq * d)?;
    check_len("output", out.len(), nq * d)?;
    if let Some(ex) = exact {
        ex.check(d, visible)?;
    }
    let sinks = exact.map_or(0, |e| e.sinks());
    let splits = visible
        .iter()
        .enumerate()
        .map(|(i, &vis)| {
            let s = sinks.min(vis);
            let pe = exact.and_then(|e| e.packed_end(i)).unwrap_or(vis);
            if pe < s || pe > vis {
                return Err(Error::Config(format!(
                    "query {i}: packed end {pe} is outside {s}..={vis}"
                )));
            }
            Ok(Split { s, w: pe, vis })
        })
        .collect::<Result<Vec<_>>>()?;
    crate::error::check_finite("queries", q)?;
    let (ks, vs) = (Side::new(kqs)?, Side::new(vqs)?);
    let mut call = Call {
        kqs,
        vqs,
        ks,
        vs,
        keys,
        values,
        exact,
        d,
        cycle,
        splits,
        qrows: Vec::new(),
    };
    call.qrows = query_rows(&call, q, scale);
    execute(isa, &call, out)
}

/// Exact attention of `nq` queries over `n` f32 keys and values ([`crate::attention::attend_exact`]'s
/// result and layouts: `q` `[nq, d]`, `k`, `v` `[n, d]`, `out` `[nq, d]`), computed as the
/// exact rows of [`attend_tiles`] are: blocks of 64 rows, online softmax, SIMD, the same split
/// over threads (bit-identical for any thread count). The baseline caches (q8, q4h, KIVI) use it.
#[allow(clippy::too_many_arguments)]
pub fn attend_dense(
    isa: Isa,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: usize,
    visible: &[usize],
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let n = crate::attention::check_dense(q, k, v, d, visible, out)?;
    // Every position is a "sink": read exactly by every query that sees it.
    let rows = ExactRows {
        sinks: n,
        packed_end: &[],
        sink_k: k,
        sink_v: v,
        win_start: n,
        win_k: &[],
        win_v: &[],
    };
    let mut call = Call {
        kqs: &[],
        vqs: &[],
        ks: Side::empty(),
        vs: Side::empty(),
        keys: HeadRecords::dense(&[], 1),
        values: HeadRecords::dense(&[], 1),
        exact: Some(&rows),
        d,
        cycle: 0,
        splits: visible
            .iter()
            .map(|&vis| Split {
                s: vis,
                w: vis,
                vis,
            })
            .collect(),
        qrows: Vec::new(),
    };
    call.qrows = q.iter().map(|&x| x * scale).collect();
    execute(isa, &call, out)
}

/// Runs a prepared call: the split of the work by the shape only (see the module docs), the
/// partial states merged in position order, the outputs written.
fn execute(isa: Isa, call: &Call, out: &mut [f32]) -> Result<()> {
    use rayon::prelude::*;
    let nq = call.splits.len();
    let vmax = call.splits.iter().map(|x| x.vis).max().unwrap_or(0);
    let qblocks: Vec<std::ops::Range<usize>> = (0..nq.div_ceil(QUERY_BLOCK))
        .map(|b| b * QUERY_BLOCK..((b + 1) * QUERY_BLOCK).min(nq))
        .collect();
    let chunks: Vec<std::ops::Range<usize>> = if nq <= QUERY_BLOCK && vmax > CHUNK {
        (0..vmax.div_ceil(CHUNK))
            .map(|c| c * CHUNK..((c + 1) * CHUNK).min(vmax))
            .collect()
    } else {
        std::iter::once(0..vmax).collect()
    };
    let tasks: Vec<(usize, usize)> = (0..qblocks.len())
        .flat_map(|b| (0..chunks.len()).map(move |c| (b, c)))
        .collect();
    let run = |&(b, c): &(usize, usize)| -> Result<State> {
        let (qs, pos) = (qblocks[b].clone(), chunks[c].clone());
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Isa::Avx2 is only offered where AVX2, FMA and F16C were detected.
            Isa::Avx2 => unsafe { run_avx2(call, qs, pos) },
            _ => call.run(ScalarUnpack, qs, pos),
        }
    };
    let states: Vec<State> = if tasks.len() > 1 {
        tasks.par_iter().map(run).collect::<Result<_>>()?
    } else {
        tasks.iter().map(run).collect::<Result<_>>()?
    };
    let astride = call.astride();
    let mut states = states.into_iter();
    for qs in qblocks {
        let mut st = states.next().expect("one state per task");
        for _ in 1..chunks.len() {
            merge(
                &mut st,
                &states.next().expect("one state per task"),
                astride,
            );
        }
        finish(call, &st, qs, out);
    }
    Ok(())
}

/// The scores ⟨q, k̂_t⟩ of one query against the keys of slots `0..out.len()` (slot t written
/// by `kqs[t % M]`), straight from the codes: what [`VectorQuantizer::score`] gives per record,
/// for a whole context at once (the scoring half of [`attend_tiles`], single-threaded).
pub fn score_tiles(
    isa: Isa,
    kqs: &[VectorQuantizer],
    q: &[f32],
    keys: HeadRecords,
    out: &mut [f32],
) -> Result<()> {
    if kqs.is_empty() || kqs.iter().any(|x| x.layout() != kqs[0].layout()) {
        return Err(Error::Config(
            "cycled quantizers must share one record layout (at least one)".into(),
        ));
    }
    let d = kqs[0].dim();
    check_len("query", q.len(), d)?;
    crate::error::check_finite("query", q)?;
    if keys.rows.row_bytes != kqs[0].record_bytes() || keys.rows.per_tile == 0 {
        return Err(Error::Config(format!(
            "key records of {} bytes, the quantizer writes {}",
            keys.rows.row_bytes,
            kqs[0].record_bytes()
        )));
    }
    let ks = Side::new(kqs)?;
    let qrow = query_rows_of(kqs, &ks, q, 1, 1.0);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Isa::Avx2 is only offered where AVX2, FMA and F16C were detected.
        Isa::Avx2 => unsafe { score_avx2(&ks, &qrow, kqs.len(), keys, out) },
        _ => score_run(ScalarUnpack, &ks, &qrow, kqs.len(), keys, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn score_avx2(
    ks: &Side,
    qrow: &[f32],
    cycle: usize,
    keys: HeadRecords,
    out: &mut [f32],
) -> Result<()> {
    score_run(simd::Avx2Unpack, ks, qrow, cycle, keys, out)
}

#[inline(always)]
fn score_run<U: Unpack>(
    u: U,
    ks: &Side,
    qrow: &[f32],
    cycle: usize,
    keys: HeadRecords,
    out: &mut [f32],
) -> Result<()> {
    let w = ks.width;
    let mut buf = vec![0.0f32; w];
    let (stride, rb) = (keys.rows.slot_stride, keys.rows.row_bytes);
    let n = out.len();
    let mut t = 0;
    while t < n {
        let (bytes, count) = keys.run(t, n)?;
        for k in 0..count {
            let m = (t + k) % cycle;
            ks.unpack_row(u, &bytes[k * stride..k * stride + rb], m, &mut buf);
            out[t + k] = simd::dot::<U>(&qrow[m * w..(m + 1) * w], &buf);
        }
        t += count;
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2(
    call: &Call,
    qs: std::ops::Range<usize>,
    pos: std::ops::Range<usize>,
) -> Result<State> {
    call.run(simd::Avx2Unpack, qs, pos)
}

/// Per query: per quantizer m of the cycle, [Π_g q_g of MSE groups | S_g Π_g q_g of sketched
/// groups] · scale, then q · scale.
fn query_rows(call: &Call, q: &[f32], scale: f32) -> Vec<f32> {
    query_rows_of(call.kqs, &call.ks, q, call.splits.len(), scale)
}

/// [`query_rows`] of `nq` queries for the key side `ks` of `kqs`.
fn query_rows_of(kqs: &[VectorQuantizer], ks: &Side, q: &[f32], nq: usize, scale: f32) -> Vec<f32> {
    let (d, wk, cycle) = (kqs[0].dim(), ks.width, kqs.len());
    let stride = cycle * wk + d;
    let mut rows = vec![0.0f32; nq * stride];
    let mut qg = vec![0.0f32; d];
    let mut qr = vec![0.0f32; d];
    for i in 0..nq {
        let qi = &q[i * d..(i + 1) * d];
        let row = &mut rows[i * stride..(i + 1) * stride];
        for (m, kq) in kqs.iter().enumerate() {
            let r = &mut row[m * wk..(m + 1) * wk];
            for p in &ks.parts {
                let ch = kq.group_channels(p.group);
                let (qg, qr) = (&mut qg[..ch.len()], &mut qr[..ch.len()]);
                for (x, &c) in qg.iter_mut().zip(ch) {
                    *x = qi[c];
                }
                match kq.group_mse(p.group) {
                    Some(mse) => mse.rotation().apply_unchecked(qg, qr),
                    None => qr.copy_from_slice(qg),
                }
                let dst = &mut r[p.row_off..p.row_off + p.len];
                if p.sign {
                    let qjl = kq.group_qjl(p.group).expect("checked in Side::new");
                    for (o, srow) in dst.iter_mut().zip(qjl.matrix().chunks_exact(ch.len())) {
                        *o = crate::rotation::dot(srow, qr);
                    }
                } else {
                    dst.copy_from_slice(qr);
                }
            }
            r.iter_mut().for_each(|x| *x *= scale);
        }
        for (o, &x) in row[cycle * wk..].iter_mut().zip(qi) {
            *o = x * scale;
        }
    }
    rows
}

/// Normalises a query block's state and writes its outputs: per quantizer of the cycle, per
/// group, Π_gᵀ(acc_g + S_gᵀ acc_z), scattered to the group's channels, plus the exact rows.
fn finish(call: &Call, st: &State, qs: std::ops::Range<usize>, out: &mut [f32]) {
    let (d, wv) = (call.d, call.vs.width);
    let astride = call.astride();
    let mut xg = vec![0.0f32; d];
    let mut x = vec![0.0f32; d];
    for (j, i) in qs.enumerate() {
        let o = &mut out[i * d..(i + 1) * d];
        o.iter_mut().for_each(|v| *v = 0.0);
        if st.l[j] == 0.0 {
            continue;
        }
        let inv = 1.0 / st.l[j];
        let acc = &st.acc[j * astride..(j + 1) * astride];
        for (m, vq) in call.vqs.iter().enumerate() {
            let a = &acc[m * wv..(m + 1) * wv];
            for g in 0..vq.num_groups() {
                let ch = vq.group_channels(g);
                let xg = &mut xg[..ch.len()];
                xg.iter_mut().for_each(|v| *v = 0.0);
                for p in call.vs.parts.iter().filter(|p| p.group == g) {
                    let ap = &a[p.row_off..p.row_off + p.len];
                    if p.sign {
                        let sm = vq.group_qjl(g).expect("checked in Side::new").matrix();
                        for (l, &z) in ap.iter().enumerate() {
                            simd::axpy::<ScalarUnpack>(
                                z,
                                &sm[l * ch.len()..(l + 1) * ch.len()],
                                xg,
                            );
                        }
                    } else {
                        xg.iter_mut().zip(ap).for_each(|(v, &y)| *v += y);
                    }
                }
                let x = &mut x[..ch.len()];
                match vq.group_mse(g) {
                    Some(mse) => mse.rotation().apply_inverse_unchecked(xg, x),
                    None => x.copy_from_slice(xg),
                }
                for (&c, &v) in ch.iter().zip(x.iter()) {
                    o[c] += v;
                }
            }
        }
        let ex = &acc[call.cycle * wv..call.cycle * wv + d];
        for (v, &e) in o.iter_mut().zip(ex) {
            *v = (*v + e) * inv;
        }
    }
}
