//! The CPU attention kernel (`tqkv::cpu_attention::attend_tiles`) against the reference
//! `attend_cycled`, on every code path this machine runs (`Isa::available`): every bit width
//! and mode (MSE 1–5 bits, splits, prod, plain QJL), dense and Hadamard rotations, rotation
//! cycles, awkward lengths (1, 7, 99, past a chunk), many queries (past a query block),
//! sinks and windows; records and exact rows in shuffled tiles give bit for bit what dense
//! buffers give; results are bit-identical for 1 and 3 threads.
mod common;
use common::{fresh_seed, gaussian_vec, kv_data};
use tqkv::attention::{attend_cycled, ExactRows};
use tqkv::cpu_attention::{attend_tiles, ExactSource, HeadRecords, PagedExact, CHUNK};
use tqkv::paged::{ExactTiles, RecordTiles, TileRows, NO_TILE};
use tqkv::rng::Rng;
use tqkv::simd::Isa;
use tqkv::{BitsSpec, ExactFormat, OutlierRule, QuantSpec, RotationKind, VectorQuantizer};

fn spec(name: &str) -> QuantSpec {
    let (bits, rest) = name.split_once('-').unwrap_or((name, ""));
    let b: BitsSpec = bits.parse().unwrap();
    let mut s = match rest {
        r if r.contains("qjl") && bits == "1" => QuantSpec::qjl(48),
        r if r.contains("prod") => QuantSpec::prod(b),
        _ => QuantSpec::mse(b),
    }
    .with_outliers(OutlierRule::Fixed);
    if rest.contains("had") {
        s = s.with_rotation(RotationKind::Hadamard);
    }
    s
}

fn quantizers(s: &QuantSpec, d: usize, cycle: usize, seed: u64) -> Vec<VectorQuantizer> {
    (0..cycle)
        .map(|m| VectorQuantizer::new(*s, d, seed + 1000 * m as u64).unwrap())
        .collect()
}

fn records(qs: &[VectorQuantizer], x: &[f32], d: usize) -> Vec<u8> {
    let rb = qs[0].record_bytes();
    let n = x.len() / d;
    let mut out = vec![0u8; n * rb];
    for t in 0..n {
        qs[t % qs.len()]
            .quantize(&x[t * d..(t + 1) * d], &mut out[t * rb..(t + 1) * rb])
            .unwrap();
    }
    out
}

/// Values rounded to f16 (so that exact rows stored as f16 read back equal).
fn f16_round(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
}

/// Dense records scattered into shuffled tiles of `per` slots (a spare tile left unheld in
/// the middle of the arena): (arena, rows of keys, rows of values, table).
fn paged_records(
    krec: &[u8],
    vrec: &[u8],
    kb: usize,
    vb: usize,
    n: usize,
    per: usize,
    rng: &mut Rng,
) -> (Vec<u8>, TileRows, TileRows, Vec<u32>) {
    let tb = RecordTiles::tile_bytes_for(per, 1, kb, vb);
    let rt = RecordTiles::new(tb, 1, kb, vb).unwrap();
    let tiles = n.div_ceil(rt.slots) + 1;
    let mut ids: Vec<u32> = (0..tiles as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.next_u64() as usize % (i + 1));
    }
    ids.truncate(n.div_ceil(rt.slots));
    let mut arena = vec![0xA5u8; tiles * tb];
    rt.keys().scatter(&mut arena, &ids, 0..n, krec).unwrap();
    rt.values().scatter(&mut arena, &ids, 0..n, vrec).unwrap();
    (arena, rt.keys(), rt.values(), ids)
}

struct Setup {
    d: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    q: Vec<f32>,
    vis: Vec<usize>,
    sinks: usize,
    ends: Vec<usize>,
    win_start: usize,
}

fn setup(rng: &mut Rng, d: usize, n: usize, nq: usize, sinks: usize, window: usize) -> Setup {
    let k = f16_round(&kv_data(rng, n, d));
    let v = f16_round(&kv_data(rng, n, d));
    let q = gaussian_vec(rng, &vec![1.0; nq * d]);
    let vis: Vec<usize> = (0..nq)
        .map(|i| match i {
            0 => n,
            1 if nq > 2 => 0,
            _ => rng.next_u64() as usize % (n + 1),
        })
        .collect();
    let ends: Vec<usize> = vis
        .iter()
        .map(|&vv| {
            let s = sinks.min(vv);
            if window == 0 {
                vv
            } else {
                vv.saturating_sub(window).max(s)
            }
        })
        .collect();
    let win_start = ends
        .iter()
        .zip(&vis)
        .filter(|(e, v)| e < v)
        .map(|(e, _)| *e)
        .min()
        .unwrap_or(n)
        .max(sinks.min(n));
    Setup {
        d,
        k,
        v,
        q,
        vis,
        sinks,
        ends,
        win_start,
    }
}

impl Setup {
    /// The exact rows as f32 slices of `ek` / `ev` (every position's stored row decoded).
    fn exact<'a>(&'a self, ek: &'a [f32], ev: &'a [f32]) -> ExactRows<'a> {
        let (d, n) = (self.d, self.k.len() / self.d);
        let s = self.sinks.min(n);
        ExactRows {
            sinks: self.sinks,
            packed_end: &self.ends,
            sink_k: &ek[..s * d],
            sink_v: &ev[..s * d],
            win_start: self.win_start,
            win_k: &ek[self.win_start * d..],
            win_v: &ev[self.win_start * d..],
        }
    }
}

/// Exact rows of every position in tiles of 3 positions in `fmt` (f16: the vectors; q8_0:
/// random codes and scales), and what they decode to: (tiles, arena, table, keys, values).
fn exact_tiles(
    st: &Setup,
    fmt: ExactFormat,
    rng: &mut Rng,
) -> (ExactTiles, Vec<u8>, Vec<u32>, Vec<f32>, Vec<f32>) {
    let (d, n) = (st.d, st.k.len() / st.d);
    let per = 2 * fmt.vector_bytes(d);
    let tb = tqkv::paged::TILE_ALIGN * (3 * per).div_ceil(tqkv::paged::TILE_ALIGN);
    let et = ExactTiles::new(tb, 1, d, fmt).unwrap();
    let er = et.rows();
    let tiles = n.div_ceil(et.rows).max(1);
    let mut arena = vec![0u8; tiles * et.tile_bytes];
    let table: Vec<u32> = (0..tiles as u32).rev().collect();
    let (mut ek, mut ev) = (vec![0f32; n * d], vec![0f32; n * d]);
    for p in 0..n {
        let at = er.at(&table, p, 0).unwrap();
        let row = &mut arena[at..at + er.row_bytes];
        match fmt {
            ExactFormat::F16 => {
                for (j, x) in st.k[p * d..(p + 1) * d]
                    .iter()
                    .chain(&st.v[p * d..(p + 1) * d])
                    .enumerate()
                {
                    row[2 * j..2 * j + 2].copy_from_slice(&half::f16::from_f32(*x).to_le_bytes());
                }
            }
            ExactFormat::Q8 => {
                let vb = fmt.vector_bytes(d);
                let (kh, vh) = row.split_at_mut(vb);
                for half_row in [kh, vh] {
                    for c in half_row[..d].iter_mut() {
                        *c = rng.next_u64() as u8;
                    }
                    for s in half_row[d..].chunks_exact_mut(2) {
                        let sc = 0.005 + 0.04 * rng.uniform() as f32;
                        s.copy_from_slice(&half::f16::from_f32(sc).to_le_bytes());
                    }
                }
            }
        }
        let (k, v) = (&mut ek[p * d..(p + 1) * d], &mut ev[p * d..(p + 1) * d]);
        et.decode_row(&arena[at..at + er.row_bytes], k, v);
    }
    (et, arena, table, ek, ev)
}

#[allow(clippy::too_many_arguments)]
fn check_case(
    rng: &mut Rng,
    seed: u64,
    (kname, vname): (&str, &str),
    d: usize,
    cycle: usize,
    n: usize,
    nq: usize,
    (sinks, window): (usize, usize),
) {
    let what = format!(
        "keys {kname} values {vname} d {d} cycle {cycle} n {n} nq {nq} sinks {sinks} window \
         {window} (seed {seed})"
    );
    let kqs = quantizers(&spec(kname), d, cycle, rng.next_u64());
    let vqs = quantizers(&spec(vname), d, cycle, rng.next_u64());
    let st = setup(rng, d, n, nq, sinks, window);
    let (kb, vb) = (kqs[0].record_bytes(), vqs[0].record_bytes());
    let krec = records(&kqs, &st.k, d);
    let vrec = records(&vqs, &st.v, d);
    let exact_on = sinks > 0 || window > 0;
    let fmt = if n % 2 == 0 {
        ExactFormat::F16
    } else {
        ExactFormat::Q8
    };
    let (et, earena, etable, ek, ev) = exact_tiles(&st, fmt, rng);
    let what = format!("{what} exact rows {fmt:?}");
    let ex = st.exact(&ek, &ev);
    let scale = 1.0 / (d as f32).sqrt();
    let mut want = vec![f32::NAN; nq * d];
    attend_cycled(
        &kqs,
        &vqs,
        &st.q,
        &krec,
        &vrec,
        exact_on.then_some(&ex),
        &st.vis,
        scale,
        &mut want,
    )
    .unwrap();
    let peak = want.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    let (arena, kr, vr, table) = paged_records(&krec, &vrec, kb, vb, n, 7, rng);
    let pex = PagedExact {
        arena: &earena,
        tiles: et,
        table: &etable,
        head: 0,
        sinks,
        packed_end: &st.ends,
    };
    for isa in Isa::available() {
        let run = |paged: bool, threads: usize| -> Vec<f32> {
            let mut out = vec![f32::NAN; nq * d];
            let (keys, values) = if paged {
                let h = |rows| HeadRecords {
                    arena: &arena,
                    rows,
                    table: &table,
                    head: 0,
                };
                (h(kr), h(vr))
            } else {
                (HeadRecords::dense(&krec, kb), HeadRecords::dense(&vrec, vb))
            };
            let exact: Option<&dyn ExactSource> = match (exact_on, paged) {
                (false, _) => None,
                (true, false) => Some(&ex),
                (true, true) => Some(&pex),
            };
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                attend_tiles(
                    isa, &kqs, &vqs, &st.q, keys, values, exact, &st.vis, scale, &mut out,
                )
            })
            .unwrap();
            out
        };
        let dense = run(false, 1);
        for (i, (a, b)) in dense.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 2e-5 * peak,
                "{} {what}: out[{i}] = {a}, reference {b}",
                isa.name()
            );
        }
        for i in 0..nq {
            if st.vis[i] == 0 {
                assert!(
                    dense[i * d..(i + 1) * d].iter().all(|&x| x == 0.0),
                    "{what}"
                );
            }
        }
        assert_eq!(run(true, 1), dense, "{} {what}: paged vs dense", isa.name());
        assert_eq!(
            run(false, 3),
            dense,
            "{} {what}: 3 threads vs 1",
            isa.name()
        );
    }
}

#[test]
fn kernel_matches_reference_across_specs_and_lengths() {
    let seed = fresh_seed("kernel_matches_reference");
    let mut rng = Rng::new(seed);
    let kinds = [
        ("4-had", "2-had"),
        ("3.5-had", "3-had"),
        ("3-had", "1.5-had"),
        ("1-had", "4-had"),
        ("2.5", "5"),
        ("4-prod", "3-prod-had"),
        ("1-qjl", "2"),
    ];
    for (i, &kv) in kinds.iter().enumerate() {
        let d = if i % 2 == 0 { 64 } else { 128 };
        for (n, nq) in [(1usize, 1usize), (7, 3), (99, 5), (99, 40)] {
            let cycle = if n % 2 == 0 { 1 } else { 1 + i % 4 };
            check_case(&mut rng, seed, kv, d, cycle, n, nq, (0, 0));
            check_case(&mut rng, seed, kv, d, cycle, n, nq, (1 + i % 3, 16));
        }
    }
}

#[test]
fn long_contexts_split_in_chunks_match_the_reference() {
    let seed = fresh_seed("long_contexts_chunks");
    let mut rng = Rng::new(seed);
    let n = 2 * CHUNK + 77;
    check_case(&mut rng, seed, ("4-had", "2-had"), 64, 4, n, 3, (0, 0));
    check_case(&mut rng, seed, ("3.5-had", "3-had"), 64, 4, n, 3, (1, 100));
    check_case(&mut rng, seed, ("4-had", "2-had"), 128, 1, n, 1, (4, 0));
}

#[test]
fn dim_not_a_multiple_of_eight_and_dense_rotation() {
    let seed = fresh_seed("odd_dims");
    let mut rng = Rng::new(seed);
    for d in [36usize, 44] {
        check_case(&mut rng, seed, ("4", "3"), d, 2, 99, 4, (1, 8));
        check_case(&mut rng, seed, ("3.5", "2.5"), d, 1, 7, 2, (0, 0));
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let seed = fresh_seed("bad_inputs");
    let mut rng = Rng::new(seed);
    let d = 64;
    let kqs = quantizers(&spec("4-had"), d, 1, 1);
    let vqs = quantizers(&spec("2-had"), d, 1, 2);
    let st = setup(&mut rng, d, 10, 2, 0, 0);
    let krec = records(&kqs, &st.k, d);
    let vrec = records(&vqs, &st.v, d);
    let (kb, vb) = (kqs[0].record_bytes(), vqs[0].record_bytes());
    let mut out = vec![0.0; 2 * d];
    let keys = HeadRecords::dense(&krec, kb);
    let values = HeadRecords::dense(&vrec, vb);
    let isa = Isa::detect();
    // A query that sees more positions than there are records.
    let r = attend_tiles(
        isa,
        &kqs,
        &vqs,
        &st.q,
        keys,
        values,
        None,
        &[11, 3],
        1.0,
        &mut out,
    );
    assert!(r.is_err());
    // Records of the wrong size.
    let r = attend_tiles(
        isa,
        &kqs,
        &vqs,
        &st.q,
        HeadRecords::dense(&krec, kb - 1),
        values,
        None,
        &[1, 1],
        1.0,
        &mut out,
    );
    assert!(r.is_err());
    // A NaN query.
    let mut q = st.q.clone();
    q[3] = f32::NAN;
    let r = attend_tiles(
        isa,
        &kqs,
        &vqs,
        &q,
        keys,
        values,
        None,
        &[1, 1],
        1.0,
        &mut out,
    );
    assert!(r.is_err());
    // A table with a tile not held.
    let (arena, kr, vr, mut table) = paged_records(&krec, &vrec, kb, vb, 10, 4, &mut rng);
    table[1] = NO_TILE;
    let h = |rows| HeadRecords {
        arena: &arena,
        rows,
        table: &table,
        head: 0,
    };
    let r = attend_tiles(
        isa,
        &kqs,
        &vqs,
        &st.q,
        h(kr),
        h(vr),
        None,
        &[10, 2],
        1.0,
        &mut out,
    );
    assert!(r.is_err(), "a record whose tile is not held");
    let r = attend_tiles(
        isa,
        &kqs,
        &vqs,
        &st.q,
        h(kr),
        h(vr),
        None,
        &[3, 2],
        1.0,
        &mut out,
    );
    assert!(r.is_ok(), "positions before the missing tile");
    // Queries that read only exact rows need no records at all (an empty table).
    let (et, earena, etable, ek, ev) = exact_tiles(&st, ExactFormat::F16, &mut rng);
    let ends = [1usize, 1];
    let pex = PagedExact {
        arena: &earena,
        tiles: et,
        table: &etable,
        head: 0,
        sinks: 1,
        packed_end: &ends,
    };
    let none = |rows| HeadRecords {
        arena: &[],
        rows,
        table: &[],
        head: 0,
    };
    attend_tiles(
        isa,
        &kqs,
        &vqs,
        &st.q,
        none(kr),
        none(vr),
        Some(&pex),
        &[1, 2],
        1.0,
        &mut out,
    )
    .unwrap();
    let mut want = vec![0.0; 2 * d];
    tqkv::attention::attend_exact(
        &st.q,
        &ek[..2 * d],
        &ev[..2 * d],
        d,
        &[1, 2],
        1.0,
        &mut want,
    )
    .unwrap();
    for (a, b) in out.iter().zip(&want) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

#[test]
fn scores_match_the_per_record_reference() {
    let seed = fresh_seed("scores_match");
    let mut rng = Rng::new(seed);
    for (i, name) in ["4-had", "3-had", "3.5", "2.5-had", "4-prod", "1-qjl", "5"]
        .iter()
        .enumerate()
    {
        let d = if i % 2 == 0 { 128 } else { 64 };
        let cycle = 1 + i % 3;
        let kqs = quantizers(&spec(name), d, cycle, rng.next_u64());
        for n in [1usize, 7, 99, 300] {
            let k = kv_data(&mut rng, n, d);
            let q = gaussian_vec(&mut rng, &vec![1.0; d]);
            let rec = records(&kqs, &k, d);
            let rb = kqs[0].record_bytes();
            let want: Vec<f32> = (0..n)
                .map(|t| {
                    let kq = &kqs[t % cycle];
                    kq.score(&kq.prepare_query(&q).unwrap(), &rec[t * rb..(t + 1) * rb])
                        .unwrap()
                })
                .collect();
            let peak = want.iter().fold(1.0f32, |m, x| m.max(x.abs()));
            for isa in Isa::available() {
                let mut out = vec![f32::NAN; n];
                tqkv::cpu_attention::score_tiles(
                    isa,
                    &kqs,
                    &q,
                    HeadRecords::dense(&rec, rb),
                    &mut out,
                )
                .unwrap();
                for (t, (a, b)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * peak,
                        "{} {name} d {d} n {n} key {t}: {a} vs {b} (seed {seed})",
                        isa.name()
                    );
                }
            }
        }
    }
}

#[test]
fn dense_attention_matches_attend_exact() {
    let seed = fresh_seed("dense_attention");
    let mut rng = Rng::new(seed);
    for (d, n, nq) in [
        (64usize, 1usize, 1usize),
        (64, 7, 3),
        (36, 99, 5),
        (128, 99, 40),
        (64, 2 * CHUNK + 5, 3),
    ] {
        let q = gaussian_vec(&mut rng, &vec![1.0; nq * d]);
        let k = kv_data(&mut rng, n, d);
        let v = kv_data(&mut rng, n, d);
        let vis: Vec<usize> = (0..nq)
            .map(|i| match i {
                0 => n,
                1 => 0,
                _ => rng.next_u64() as usize % (n + 1),
            })
            .collect();
        let scale = 1.0 / (d as f32).sqrt();
        let mut want = vec![0.0; nq * d];
        tqkv::attention::attend_exact(&q, &k, &v, d, &vis, scale, &mut want).unwrap();
        let peak = want.iter().fold(1.0f32, |m, x| m.max(x.abs()));
        for isa in Isa::available() {
            let mut out = vec![f32::NAN; nq * d];
            tqkv::cpu_attention::attend_dense(isa, &q, &k, &v, d, &vis, scale, &mut out).unwrap();
            for (a, b) in out.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 2e-5 * peak,
                    "{} d {d} n {n} nq {nq}: {a} vs {b} (seed {seed})",
                    isa.name()
                );
            }
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .unwrap();
            let mut out3 = vec![f32::NAN; nq * d];
            pool.install(|| {
                tqkv::cpu_attention::attend_dense(isa, &q, &k, &v, d, &vis, scale, &mut out3)
            })
            .unwrap();
            assert_eq!(out3, out, "3 threads vs the default pool");
        }
        let mut out = vec![0.0; nq * d];
        let bad = tqkv::cpu_attention::attend_dense(
            Isa::Scalar,
            &q,
            &k,
            &v,
            d,
            &[n + 1],
            scale,
            &mut out[..d],
        );
        assert!(bad.is_err());
    }
}
