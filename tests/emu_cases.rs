//! Attention cases for the host emulator of the CUDA kernels (tests/emu, run by
//! scripts/emulate-kernels.sh): each case is a packed cache of fresh random vectors, its
//! layer tables, queries, an optional exact part and the CPU reference's output
//! (`tqkv::attention::attend_cycled`), written to `$TQKV_EMU_DIR/<name>.bin`. The harness runs
//! kernels/decode_attention.cu (both split kernels, several split plans, a shuffled tile table)
//! on the CPU and compares. Ignored by default: it only writes files; the script runs it.
mod common;
use common::{fresh_seed, kv_data as data};
use std::io::Write;
use tqkv::device_tables::LayerTables;
use tqkv::rng::Rng;
use tqkv::VectorQuantizer;

/// One case file: named little-endian arrays (`[u32 name length][name][u8 kind: 0 i32, 1 f32,
/// 2 u8, 3 f16][u64 count][data]`), after the magic `TQEMU1\n`.
struct Case(Vec<u8>);

impl Case {
    fn new() -> Self {
        Case(b"TQEMU1\n".to_vec())
    }
    fn put(&mut self, name: &str, kind: u8, count: usize, data: &[u8]) {
        self.0.extend((name.len() as u32).to_le_bytes());
        self.0.extend(name.as_bytes());
        self.0.push(kind);
        self.0.extend((count as u64).to_le_bytes());
        self.0.extend(data);
    }
    fn ints(&mut self, name: &str, v: &[i32]) {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.put(name, 0, v.len(), &b);
    }
    fn floats(&mut self, name: &str, v: &[f32]) {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.put(name, 1, v.len(), &b);
    }
    fn bytes(&mut self, name: &str, v: &[u8]) {
        self.put(name, 2, v.len(), v);
    }
    fn halves(&mut self, name: &str, v: &[half::f16]) {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.put(name, 3, v.len(), &b);
    }
    /// The tables of one spec variant, as `TqSpec` / `TqGroup` need them.
    fn tables(&mut self, name: &str, t: &LayerTables) {
        let norm = match t.norm {
            tqkv::NormFormat::F32 => 0,
            tqkv::NormFormat::F16 => 1,
            tqkv::NormFormat::Log8 => 2,
        };
        self.ints(
            &format!("{name}.spec"),
            &[
                t.head_dim as i32,
                t.groups.len() as i32,
                t.record_bytes as i32,
                norm,
                tqkv::device_tables::norm_rule_code(t.norm_rule),
            ],
        );
        for (g, gt) in t.groups.iter().enumerate() {
            let p = format!("{name}.g{g}");
            self.ints(
                &p,
                &[
                    gt.dim as i32,
                    gt.mse_bits as i32,
                    gt.m as i32,
                    gt.rot_kind,
                    gt.had_block as i32,
                    gt.offsets[0] as i32,
                    gt.offsets[1] as i32,
                    gt.offsets[2] as i32,
                    gt.offsets[3] as i32,
                ],
            );
            self.floats(&format!("{p}.qjl"), &[gt.qjl_scale]);
            self.floats(&format!("{p}.rot"), &gt.rot);
            // Πᵀ for dense rotations (the kernels' coalesced forward rotation).
            let rot_t: Vec<f32> = if gt.rot_kind == 0 && !gt.rot.is_empty() {
                (0..gt.dim * gt.dim)
                    .map(|k| gt.rot[(k % gt.dim) * gt.dim + k / gt.dim])
                    .collect()
            } else {
                Vec::new()
            };
            self.floats(&format!("{p}.rot_t"), &rot_t);
            self.floats(&format!("{p}.boundaries"), &gt.boundaries);
            self.floats(&format!("{p}.centroids"), &gt.centroids);
            self.floats(&format!("{p}.sketch"), &gt.sketch);
        }
    }
}

/// Quantizers `[head][m]` of one layer: each head calibrated (its own outlier channels), then
/// `cycle − 1` more rotations with the same channels (as `TurboCache` builds a cycle).
fn layer(
    rng: &mut Rng,
    bits: &str,
    mode: &str,
    rot: &str,
    d: usize,
    h: usize,
    cycle: usize,
) -> Vec<Vec<VectorQuantizer>> {
    let heads = common::layer_heads(rng, (bits, mode, rot), d, h, 0.3);
    let seed = rng.next_u64();
    heads
        .into_iter()
        .map(|q| {
            let hi = if q.num_groups() > 1 {
                q.group_channels(0).to_vec()
            } else {
                Vec::new()
            };
            let spec = *q.spec();
            let mut v = vec![q];
            for r in 1..cycle {
                let s = tqkv::rng::derive_seed(seed, 1000 + r as u64);
                v.push(VectorQuantizer::with_channels(spec, d, &hi, s).unwrap());
            }
            v
        })
        .collect()
}

struct Shape<'a> {
    name: &'a str,
    keys: (&'a str, &'a str, &'a str),
    vbits: &'a str,
    vmode: &'a str,
    d: usize,
    hkv: usize,
    g: usize,
    t: usize,
    lens: &'a [usize],
    dtype: i32,
    cycle: usize,
    exact: Option<(usize, usize)>,
    /// The exact rows in q8_0 (the kernel decodes codes and scales) instead of f16.
    q8: bool,
}

/// llama.cpp's q8_0 of one row as crates/tqkv-candle/src/exact.rs writes it (the f16-rounded
/// vector, per 32 channels s = f16(max |x| / 127), code = round(x / s) + 128), and the row as a
/// reader decodes it: f16((code − 128)·s).
fn q8_row(x: &[f32]) -> (Vec<u8>, Vec<half::f16>, Vec<half::f16>) {
    let (mut codes, mut scales, mut back) = (Vec::new(), Vec::new(), Vec::new());
    for blk in x.chunks(32) {
        let xs: Vec<f32> = blk
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect();
        let m = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let s16 = half::f16::from_f32(m / 127.0);
        let s = s16.to_f32();
        let safe = if s == 0.0 { 1.0 } else { s };
        scales.push(s16);
        for &v in &xs {
            let c = ((v / safe).round().clamp(-127.0, 127.0) + 128.0) as u8;
            codes.push(c);
            back.push(half::f16::from_f32((c as f32 - 128.0) * s));
        }
    }
    (codes, scales, back)
}

fn write_case(dir: &std::path::Path, rng: &mut Rng, s: &Shape) {
    let (d, hkv, g, t, cycle) = (s.d, s.hkv, s.g, s.t, s.cycle);
    let b = s.lens.len();
    let hq = hkv * g;
    let cap = s.lens.iter().max().unwrap() + 9;
    let kq = layer(rng, s.keys.0, s.keys.1, s.keys.2, d, hkv, cycle);
    let vq = layer(rng, s.vbits, s.vmode, s.keys.2, d, hkv, cycle);
    let kt: Vec<LayerTables> = (0..cycle)
        .map(|m| LayerTables::new(&kq.iter().map(|v| v[m].clone()).collect::<Vec<_>>()).unwrap())
        .collect();
    let vt: Vec<LayerTables> = (0..cycle)
        .map(|m| LayerTables::new(&vq.iter().map(|v| v[m].clone()).collect::<Vec<_>>()).unwrap())
        .collect();
    let (rbk, rbv) = (kt[0].record_bytes, vt[0].record_bytes);
    let (sinks, window) = s.exact.unwrap_or((0, 0));
    let ring = if s.exact.is_some() { window + t } else { 0 };
    let slots = sinks + ring;
    // Slots no query reads hold random bytes.
    let mut kc: Vec<u8> = (0..b * hkv * cap * rbk)
        .map(|_| rng.next_u64() as u8)
        .collect();
    let mut vc: Vec<u8> = (0..b * hkv * cap * rbv)
        .map(|_| rng.next_u64() as u8)
        .collect();
    // Causal visibility of the last t tokens; each query's records end at its window.
    let visible: Vec<usize> = s
        .lens
        .iter()
        .flat_map(|&len| (0..t).map(move |ti| (len + ti + 1).saturating_sub(t)))
        .collect();
    let packed_end: Vec<usize> = visible
        .iter()
        .map(|&vis| sinks.min(vis).max(vis.saturating_sub(window)))
        .collect();
    let slot = |p: usize| {
        if p < sinks {
            p
        } else {
            sinks + p % ring.max(1)
        }
    };
    let mut ek = vec![half::f16::ZERO; b * hkv * slots * d];
    // q8_0 rows (used when s.q8): codes 128 and scales 0 decode to zeros.
    let (mut ekq, mut evq) = (
        vec![128u8; b * hkv * slots * d],
        vec![128u8; b * hkv * slots * d],
    );
    let (mut eks, mut evs) = (
        vec![half::f16::ZERO; b * hkv * slots * d / 32],
        vec![half::f16::ZERO; b * hkv * slots * d / 32],
    );
    let mut ev = vec![half::f16::ZERO; b * hkv * slots * d];
    for (bi, &len) in s.lens.iter().enumerate() {
        for h in 0..hkv {
            let k = data(rng, len, d);
            let v = data(rng, len, d);
            for p in 0..len {
                let i = (bi * hkv + h) * cap + p;
                let m = p % cycle;
                kq[h][m]
                    .quantize(&k[p * d..(p + 1) * d], &mut kc[i * rbk..(i + 1) * rbk])
                    .unwrap();
                vq[h][m]
                    .quantize(&v[p * d..(p + 1) * d], &mut vc[i * rbv..(i + 1) * rbv])
                    .unwrap();
            }
            if s.exact.is_none() {
                continue;
            }
            for p in (0..sinks.min(len)).chain(sinks.max(len.saturating_sub(window + t))..len) {
                let o = ((bi * hkv + h) * slots + slot(p)) * d;
                for (store, q8, q8s) in
                    [(&mut ek, &mut ekq, &mut eks), (&mut ev, &mut evq, &mut evs)]
                {
                    let x: Vec<f32> = (0..d).map(|_| 2.0 * rng.gaussian() as f32).collect();
                    if s.q8 {
                        let (c, sc, back) = q8_row(&x);
                        q8[o..o + d].copy_from_slice(&c);
                        q8s[o / 32..o / 32 + d / 32].copy_from_slice(&sc);
                        store[o..o + d].copy_from_slice(&back);
                    } else {
                        for j in 0..d {
                            store[o + j] = half::f16::from_f32(x[j]);
                        }
                    }
                }
            }
            // Records no query reads: garbage.
            let last = packed_end[bi * t + t - 1];
            for p in (0..sinks.min(len)).chain(last..len) {
                let i = (bi * hkv + h) * cap + p;
                kc[i * rbk..(i + 1) * rbk]
                    .iter_mut()
                    .for_each(|x| *x = rng.next_u64() as u8);
                vc[i * rbv..(i + 1) * rbv]
                    .iter_mut()
                    .for_each(|x| *x = rng.next_u64() as u8);
            }
        }
    }
    let q = data(rng, b * hq * t, d);
    // The queries as the kernel sees them (rounded to its input dtype).
    let q: Vec<f32> = match s.dtype {
        1 => q.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
        2 => q
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect(),
        _ => q,
    };
    let scale = 1.0 / (d as f32).sqrt();
    let case = common::PackedCase {
        q: &q,
        kc: &kc,
        vc: &vc,
        ek: &ek,
        ev: &ev,
        visible: &visible,
        packed_end: &packed_end,
        lens: s.lens,
        dims: (hq, hkv, t, d, cap),
        sinks,
        ring,
        exact: s.exact.is_some(),
        scale,
    };
    let mut want = vec![0f32; b * hq * t * d];
    for bi in 0..b {
        for h in 0..hkv {
            let (out, _) = case.reference_head(&kq[h], &vq[h], bi, h);
            for ti in 0..t {
                for gi in 0..g {
                    let o = ((bi * hq + h * g + gi) * t + ti) * d;
                    want[o..o + d].copy_from_slice(&out[(ti * g + gi) * d..][..d]);
                }
            }
        }
    }
    let mut c = Case::new();
    c.ints(
        "dims",
        &[
            b as i32,
            hq as i32,
            hkv as i32,
            t as i32,
            cap as i32,
            cycle as i32,
            s.dtype,
            sinks as i32,
            ring as i32,
            s.exact.is_some() as i32,
            d as i32,
            s.q8 as i32,
        ],
    );
    c.floats("scale", &[scale]);
    for m in 0..cycle {
        c.tables(&format!("k{m}"), &kt[m]);
        c.tables(&format!("v{m}"), &vt[m]);
    }
    c.ints("kch", &kt[0].channels);
    c.ints("vch", &vt[0].channels);
    c.bytes("kc", &kc);
    c.bytes("vc", &vc);
    c.floats("q", &q);
    c.ints(
        "visible",
        &visible.iter().map(|&x| x as i32).collect::<Vec<_>>(),
    );
    c.ints(
        "packed_end",
        &packed_end.iter().map(|&x| x as i32).collect::<Vec<_>>(),
    );
    c.bytes("ekq", &ekq);
    c.halves("eks", &eks);
    c.bytes("evq", &evq);
    c.halves("evs", &evs);
    c.halves("ek", &ek);
    c.halves("ev", &ev);
    c.floats("want", &want);
    let path = dir.join(format!("{}.bin", s.name));
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&c.0)
        .unwrap();
    eprintln!("wrote {} ({} bytes)", path.display(), c.0.len());
}

/// (name, keys, values, dims, lengths, query dtype, cycle, exact, q8): one row of the case table.
type CaseRow<'a> = (
    &'a str,
    (&'a str, &'a str, &'a str),
    (&'a str, &'a str),
    (usize, usize, usize, usize),
    &'a [usize],
    i32,
    usize,
    Option<(usize, usize)>,
    bool,
);

#[test]
#[ignore = "writes the emulator's cases; run by scripts/emulate-kernels.sh"]
fn write_emulator_cases() {
    let dir = std::path::PathBuf::from(std::env::var("TQKV_EMU_DIR").expect("TQKV_EMU_DIR"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = Rng::new(fresh_seed("emulator cases"));
    let m = "mse";
    // (name, keys (bits, mode, rotation), values (bits, mode), (d, kv heads, GQA group, query
    // tokens), lengths, query dtype, cycle, exact (sinks, window), exact rows in q8_0):
    // decode at GQA 4 with the paper's 3.5 split and the presets' 4/2 bits, cycles 2 and 4,
    // log8 norms, d = 96 and 256; prefill rows for both tensor-core kernels (the rows kernel from
    // 17 rows per KV head, row tiles of 16, 32, 64); a layout only the split kernel takes.
    #[rustfmt::skip]
    let cases: &[CaseRow] = &[
        ("d128-3.5-dense-g4", ("3.5", m, "dense"), ("3.5", m), (128, 2, 4, 1), &[1, 7, 99, 700], 1, 1, None, false),
        ("d128-k4v2-had-g4-r4", ("4", m, "hadamard"), ("2", m), (128, 2, 4, 1), &[63, 64, 65, 300], 1, 4, None, false),
        ("d64-k4v2-had-g3-r4-exact", ("4", "mse-projected", "hadamard"), ("2", "mse-projected"), (64, 3, 3, 1), &[600, 3, 31], 0, 4, Some((1, 29)), true),
        ("d64-k3v1.5-log8-r2-exact", ("3", m, "hadamard"), ("1.5", "mse-projected-log8"), (64, 1, 3, 1), &[200, 9], 2, 2, Some((2, 40)), false),
        ("d128-ls-k3v2.5-dense-g3", ("3", "mse-ls", "dense"), ("2.5", "mse-ls"), (128, 1, 3, 1), &[130, 5], 1, 1, None, false),
        ("d96-2.5-dense-g7", ("2.5", m, "dense"), ("2.5", m), (96, 1, 7, 1), &[150], 0, 1, None, false),
        ("d256-2.5-had-g2", ("2.5", m, "hadamard"), ("3", m), (256, 1, 2, 1), &[130, 1], 1, 1, None, false),
        ("d128-3.5-prefill-t5", ("3.5", m, "dense"), ("3.5", m), (128, 2, 4, 5), &[9, 200], 2, 1, None, false),
        ("d64-k4v2-prefill-t3-r2-exact", ("4", m, "hadamard"), ("2", m), (64, 1, 3, 3), &[90, 4], 1, 2, Some((1, 20)), true),
        ("d128-k4v2-rows-t9-r4-q8", ("4", "mse-projected", "hadamard"), ("2", "mse-projected"), (128, 2, 4, 9), &[100, 700], 1, 4, Some((1, 40)), true),
        ("d64-3.5-rows-t20-r2-exact", ("3.5", m, "dense"), ("2.5", m), (64, 1, 3, 20), &[70, 5, 300], 0, 2, Some((2, 30)), false),
        ("d96-2.5-rows-t40", ("2.5", m, "hadamard"), ("3", m), (96, 1, 2, 40), &[150], 2, 1, None, false),
        ("d64-qjl-split-only", ("4", "prod", "dense"), ("3", m), (64, 2, 1, 1), &[77, 2], 0, 1, None, false),
    ];
    for &(name, keys, (vbits, vmode), (d, hkv, g, t), lens, dtype, cycle, exact, q8) in cases {
        let s = Shape {
            name,
            keys,
            vbits,
            vmode,
            d,
            hkv,
            g,
            t,
            lens,
            dtype,
            cycle,
            exact,
            q8,
        };
        write_case(&dir, &mut rng, &s);
    }
}
