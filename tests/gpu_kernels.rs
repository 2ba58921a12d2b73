//! GPU kernels against the CPU reference (feature `cuda`; each test prints why it is skipped
//! when no CUDA device is present). Fresh random inputs of awkward sizes each run.
//!
//! * quantize-append: packed codes equal to `VectorQuantizer::quantize` except at boundary ties
//!   (counted over the whole test, bounded by 1e-4 of the codes), norms within 1e-3 relative,
//!   slots outside the write window untouched.
//! * dequantize: within 1e-5 (f32), 1e-3 (f16), 8e-3 (bf16) of the largest |value|.
//! * decode attention: relative error ≤ 1e-3 against `attend_packed` on the same packed cache
//!   (the tensor-core kernel, f16 operands: 4e-3; each kernel also through shuffled tile tables
//!   of 64 and of 7 slots per tile: bit-equal to its contiguous run); the exact rows (sinks and
//!   windows) in shuffled tiles of 3 positions, as a cache's arena holds them.
#![cfg(feature = "cuda")]
mod common;
use common::{fresh_seed, kv_data as data, layer_heads};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use half::{bf16, f16};
use std::sync::Arc;
use tqkv::cuda::{
    attention_supported, decode_attention, decode_attention_mixed, decode_attention_with,
    dequantize, quantize_append, AppendShape, AttentionOptions, AttentionShape, DeviceTables,
    ExactPart, StatusWord, TileTable,
};
use tqkv::device_tables::LayerTables;
use tqkv::rng::Rng;
use tqkv::AttentionKernel;
use tqkv::{NormFormat, QuantSpec, VectorQuantizer};

fn gpu() -> Option<Arc<CudaStream>> {
    if !tqkv::cuda::driver_present() {
        eprintln!("SKIPPED: no CUDA driver library on this machine");
        return None;
    }
    match CudaContext::new(0) {
        Ok(ctx) => Some(ctx.default_stream()),
        Err(e) => {
            eprintln!("SKIPPED: no CUDA device ({e})");
            None
        }
    }
}

/// Per-head quantizers of one layer (different outlier channels, one seed).
fn heads(
    rng: &mut Rng,
    bits: &str,
    mode: &str,
    rot: &str,
    d: usize,
    h: usize,
) -> Vec<VectorQuantizer> {
    layer_heads(rng, (bits, mode, rot), d, h, 0.3)
}

const CONFIGS: [(&str, &str, &str, usize); 13] = [
    ("3.5", "mse", "dense", 128),
    ("2.5", "mse", "hadamard", 128),
    ("4", "prod", "dense", 64),
    ("3", "prod-orth", "hadamard", 96),
    ("2.5", "mse", "dense", 256),
    ("paper2.5", "mse", "dense", 128),
    ("1", "prod", "dense", 64),
    ("33@4+66@3", "mse", "dense", 99),
    ("3.5", "mse-projected", "dense", 128),
    ("2", "prod-projected", "hadamard", 64),
    ("1.5", "mse-projected-log8", "hadamard", 64),
    ("3", "prod-log8", "dense", 64),
    ("3", "mse-ls", "hadamard", 128),
];

#[derive(Default)]
struct Tally {
    codes: usize,
    code_diff: usize,
    signs: usize,
    sign_diff: usize,
}

/// Unpacks `n` fields of `bits` at byte `off` of both records; returns (fields, differing).
fn diff_fields(gpu: &[u8], cpu: &[u8], off: usize, n: usize, bits: u8) -> (usize, usize) {
    let len = tqkv::packing::packed_len(n, bits);
    let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
    tqkv::packing::unpack_codes(&gpu[off..][..len], bits, &mut a).unwrap();
    tqkv::packing::unpack_codes(&cpu[off..][..len], bits, &mut b).unwrap();
    (n, a.iter().zip(&b).filter(|(x, y)| x != y).count())
}

/// Asserts that the norms stored at byte `off` of both records agree within 1e-3.
fn same_norm(gpu: &[u8], cpu: &[u8], off: usize, fmt: NormFormat, what: &str) {
    let (ng, nc) = (fmt.read(gpu, off), fmt.read(cpu, off));
    // A log8 norm is a code: sums that differ in the last bits may round to the next one.
    let tol = if fmt == NormFormat::Log8 { 0.095 } else { 1e-3 };
    assert!(
        (ng - nc).abs() <= tol * nc.abs().max(1e-6),
        "{what} {ng} vs {nc}"
    );
}

/// Compares a GPU record with the CPU one field by field.
fn compare(
    q: &VectorQuantizer,
    gpu: &[u8],
    cpu: &[u8],
    f16n: NormFormat,
    tally: &mut Tally,
    ctx: &str,
) {
    let mut codes_equal = true;
    for g in &q.layout().groups {
        if g.mse_bits > 0 {
            let (n, diff) = diff_fields(gpu, cpu, g.codes_offset, g.dim, g.mse_bits);
            tally.codes += n;
            tally.code_diff += diff;
            codes_equal &= diff == 0;
            same_norm(gpu, cpu, g.norm_offset, f16n, &format!("{ctx}: norm"));
        }
        // Signs and residual norms are compared only where the codes agree (a tie moves them).
        if g.sketch_dim > 0 && codes_equal {
            let (n, diff) = diff_fields(gpu, cpu, g.signs_offset, g.sketch_dim, 1);
            tally.signs += n;
            tally.sign_diff += diff;
            same_norm(
                gpu,
                cpu,
                g.gamma_offset,
                f16n,
                &format!("{ctx}: residual norm"),
            );
        }
    }
}

fn to_dtype<T: Copy>(x: &[f32], f: impl Fn(f32) -> T) -> Vec<T> {
    x.iter().map(|&v| f(v)).collect()
}

/// Rounds `x` to what a kernel reads from input dtype `dtype` (0 f32, 1 f16, 2 bf16).
fn round_to(dtype: usize, x: &mut [f32]) {
    match dtype {
        1 => x.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32()),
        2 => x.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32()),
        _ => {}
    }
}

/// Uploads `$x` (f32 on the host) as dtype `$dtype` (0 f32, 1 f16, 2 bf16), binds the device
/// slice to `$xd` and evaluates `$body` with it.
macro_rules! with_input_as {
    ($stream:expr, $dtype:expr, $x:expr, |$xd:ident| $body:expr) => {
        match $dtype {
            0 => {
                let $xd = $stream.clone_htod($x).unwrap();
                $body
            }
            1 => {
                let $xd = $stream.clone_htod(&to_dtype($x, f16::from_f32)).unwrap();
                $body
            }
            _ => {
                let $xd = $stream.clone_htod(&to_dtype($x, bf16::from_f32)).unwrap();
                $body
            }
        }
    };
}

#[test]
fn quantize_append_matches_the_cpu_quantizer() {
    let Some(stream) = gpu() else { return };
    let mut rng = Rng::new(fresh_seed("gpu quantize_append"));
    let mut tally = Tally::default();
    for (ci, &(bits, mode, rot, d)) in CONFIGS.iter().enumerate() {
        for dtype in 0..3 {
            let (b, h, t) = (2usize, 3usize, if ci == 0 { 99 } else { 7 });
            let cap = t + 5;
            let qs = heads(&mut rng, bits, mode, rot, d, h);
            let tables = LayerTables::new(&qs).unwrap();
            let dev = DeviceTables::upload(&tables, &stream).unwrap();
            let rb = tables.record_bytes;
            let mut x = data(&mut rng, b * h * t, d);
            // The CPU sees what the kernel reads: the values rounded to the input dtype.
            round_to(dtype, &mut x);
            let start = [3usize, 0];
            let new = [t, t - 3];
            let fill: Vec<u8> = (0..b * h * cap * rb).map(|i| (i * 7 + 3) as u8).collect();
            let mut cache = stream.clone_htod(&fill).unwrap();
            let mut status = StatusWord::new(&stream).unwrap();
            let shape = AppendShape {
                batch: b,
                heads: h,
                tokens: t,
                capacity: cap,
            };
            with_input_as!(stream, dtype, &x, |xd| quantize_append(
                &stream,
                &dev,
                &xd,
                &mut cache,
                shape,
                &start,
                &new,
                None,
                &mut status,
            ))
            .unwrap();
            status.read(&stream).unwrap();
            let got = stream.clone_dtoh(&cache).unwrap();
            let mut rec = vec![0u8; rb];
            for bi in 0..b {
                for (hi, q) in qs.iter().enumerate() {
                    for slot in 0..cap {
                        let at = ((bi * h + hi) * cap + slot) * rb;
                        let g = &got[at..at + rb];
                        if slot < start[bi] || slot >= start[bi] + new[bi] {
                            assert_eq!(
                                g,
                                &fill[at..at + rb],
                                "slot {slot} outside the window was written"
                            );
                            continue;
                        }
                        let tok = slot - start[bi];
                        let xo = ((bi * h + hi) * t + tok) * d;
                        q.quantize(&x[xo..xo + d], &mut rec).unwrap();
                        let ctx =
                            format!("{bits} {mode} {rot} d={d} dtype {dtype} b{bi} h{hi} t{tok}");
                        compare(q, g, &rec, tables.norm, &mut tally, &ctx);
                    }
                }
            }
        }
    }
    eprintln!(
        "codes differing: {} of {}; QJL signs differing: {} of {}",
        tally.code_diff, tally.codes, tally.sign_diff, tally.signs
    );
    assert!(tally.codes > 100_000);
    assert!(
        (tally.code_diff as f64) <= 1e-4 * tally.codes as f64,
        "{} of {} codes differ",
        tally.code_diff,
        tally.codes
    );
    assert!(
        (tally.sign_diff as f64) <= 1e-4 * tally.signs as f64 + 1.0,
        "{} of {} signs differ",
        tally.sign_diff,
        tally.signs
    );
}

#[test]
fn dequantize_matches_the_cpu_quantizer() {
    let Some(stream) = gpu() else { return };
    let mut rng = Rng::new(fresh_seed("gpu dequantize"));
    for &(bits, mode, rot, d) in &CONFIGS {
        let (b, h, cap, n) = (2usize, 3usize, 40usize, 33usize);
        let qs = heads(&mut rng, bits, mode, rot, d, h);
        let tables = LayerTables::new(&qs).unwrap();
        let dev = DeviceTables::upload(&tables, &stream).unwrap();
        let rb = tables.record_bytes;
        let x = data(&mut rng, b * h * cap, d);
        let mut recs = vec![0u8; b * h * cap * rb];
        let mut want = vec![0f32; b * h * n * d];
        for bi in 0..b {
            for (hi, q) in qs.iter().enumerate() {
                for s in 0..cap {
                    let i = (bi * h + hi) * cap + s;
                    q.quantize(&x[i * d..(i + 1) * d], &mut recs[i * rb..(i + 1) * rb])
                        .unwrap();
                    if s < n {
                        let o = ((bi * h + hi) * n + s) * d;
                        q.dequantize(&recs[i * rb..(i + 1) * rb], &mut want[o..o + d])
                            .unwrap();
                    }
                }
            }
        }
        let cache = stream.clone_htod(&recs).unwrap();
        let shape = AppendShape {
            batch: b,
            heads: h,
            tokens: 0,
            capacity: cap,
        };
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let check = |got: Vec<f32>, tol: f32, what: &str| {
            let err = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= tol * scale,
                "{bits} {mode} {rot} d={d} {what}: max error {err} (scale {scale})"
            );
        };
        let len = b * h * n * d;
        check(
            dequantized::<f32>(&stream, &dev, &cache, shape, n, len),
            1e-5,
            "f32",
        );
        check(
            dequantized::<f16>(&stream, &dev, &cache, shape, n, len),
            1e-3,
            "f16",
        );
        check(
            dequantized::<bf16>(&stream, &dev, &cache, shape, n, len),
            8e-3,
            "bf16",
        );
    }
}

/// Dequantizes `n` slots of every (sequence, head) into `len` elements of `T` on the device
/// and returns them as f32 on the host.
fn dequantized<T>(
    stream: &Arc<CudaStream>,
    dev: &DeviceTables,
    cache: &CudaSlice<u8>,
    shape: AppendShape,
    n: usize,
    len: usize,
) -> Vec<f32>
where
    T: tqkv::cuda::KernelFloat + cudarc::driver::ValidAsZeroBits + Copy,
    f32: From<T>,
{
    let mut out = stream.alloc_zeros::<T>(len).unwrap();
    dequantize(stream, dev, cache, shape, n, None, &mut out).unwrap();
    stream
        .clone_dtoh(&out)
        .unwrap()
        .into_iter()
        .map(f32::from)
        .collect()
}

/// One attention case: packed caches written by the CPU, queries in `dtype`, compared with
/// `attend_packed` per (sequence, KV head).
#[allow(clippy::too_many_arguments)]
fn attention_case(
    stream: &Arc<CudaStream>,
    rng: &mut Rng,
    kcfg: (&str, &str, &str),
    vbits: &str,
    d: usize,
    hkv: usize,
    g: usize,
    t: usize,
    lens: &[usize],
    dtype: usize,
) {
    mixed_attention_case(stream, rng, kcfg, vbits, (d, hkv, g, t), lens, dtype, None)
}

/// [`attention_case`] with an exact part when `exact` = (sinks, window): each query reads its
/// sinks and its last `window` positions from an f16 store, the rest from records (the record
/// slots no query reads hold random bytes), compared with `attend_mixed`.
#[allow(clippy::too_many_arguments)]
fn mixed_attention_case(
    stream: &Arc<CudaStream>,
    rng: &mut Rng,
    kcfg: (&str, &str, &str),
    vbits: &str,
    (d, hkv, g, t): (usize, usize, usize, usize),
    lens: &[usize],
    dtype: usize,
    exact: Option<(usize, usize)>,
) {
    let b = lens.len();
    let hq = hkv * g;
    let cap = lens.iter().max().unwrap() + 9;
    let kq = heads(rng, kcfg.0, kcfg.1, kcfg.2, d, hkv);
    let vq = heads(rng, vbits, "mse", kcfg.2, d, hkv);
    let (kt, vt) = (
        LayerTables::new(&kq).unwrap(),
        LayerTables::new(&vq).unwrap(),
    );
    let (kd, vd) = (
        DeviceTables::upload(&kt, stream).unwrap(),
        DeviceTables::upload(&vt, stream).unwrap(),
    );
    let (rbk, rbv) = (kt.record_bytes, vt.record_bytes);
    // Slots past each length hold random bytes: the kernel must not read them.
    let mut kc: Vec<u8> = (0..b * hkv * cap * rbk)
        .map(|_| rng.next_u64() as u8)
        .collect();
    let mut vc: Vec<u8> = (0..b * hkv * cap * rbv)
        .map(|_| rng.next_u64() as u8)
        .collect();
    for (bi, &len) in lens.iter().enumerate().take(b) {
        for h in 0..hkv {
            let k = data(rng, len, d);
            let v = data(rng, len, d);
            for s in 0..len {
                let i = (bi * hkv + h) * cap + s;
                kq[h]
                    .quantize(&k[s * d..(s + 1) * d], &mut kc[i * rbk..(i + 1) * rbk])
                    .unwrap();
                vq[h]
                    .quantize(&v[s * d..(s + 1) * d], &mut vc[i * rbv..(i + 1) * rbv])
                    .unwrap();
            }
        }
    }
    let mut q: Vec<f32> = (0..b * hq * t * d).map(|_| rng.gaussian() as f32).collect();
    round_to(dtype, &mut q);
    // Causal visibility of the last t tokens (a row that sees nothing when the length is short).
    let visible: Vec<usize> = (0..b)
        .flat_map(|bi| (0..t).map(move |ti| (lens[bi] + ti + 1).saturating_sub(t)))
        .collect();
    // The exact part: sinks and each query's window in an f16 store, a ring of window + t.
    let (sinks, window) = exact.unwrap_or((0, 0));
    let ring = if exact.is_some() { window + t } else { 0 };
    let slots = sinks + ring;
    let slot = |p: usize| {
        if p < sinks {
            p
        } else {
            sinks + p % ring.max(1)
        }
    };
    let packed_end: Vec<usize> = visible
        .iter()
        .map(|&vis| sinks.min(vis).max(vis.saturating_sub(window)))
        .collect();
    let mut ek = vec![half::f16::ZERO; (b * hkv * slots * d).max(1)];
    let mut ev = ek.clone();
    if exact.is_some() {
        for (bi, &len) in lens.iter().enumerate() {
            for h in 0..hkv {
                for p in (0..sinks.min(len)).chain(sinks.max(len.saturating_sub(window + t))..len) {
                    let o = ((bi * hkv + h) * slots + slot(p)) * d;
                    for j in 0..d {
                        ek[o + j] = half::f16::from_f64(rng.gaussian());
                        ev[o + j] = half::f16::from_f64(rng.gaussian());
                    }
                }
                // Records no query reads: garbage.
                let last = packed_end[bi * t + t - 1];
                for p in (0..sinks.min(len)).chain(last..len) {
                    let i = (bi * hkv + h) * cap + p;
                    for x in kc[i * rbk..(i + 1) * rbk].iter_mut() {
                        *x = rng.next_u64() as u8;
                    }
                    for x in vc[i * rbv..(i + 1) * rbv].iter_mut() {
                        *x = rng.next_u64() as u8;
                    }
                }
            }
        }
    }
    let scale = 1.0 / (d as f32).sqrt();
    let (kcd, vcd) = (
        stream.clone_htod(&kc).unwrap(),
        stream.clone_htod(&vc).unwrap(),
    );
    let status = StatusWord::new(stream).unwrap();
    let mut out = stream.alloc_zeros::<f32>(b * hq * t * d).unwrap();
    let shape = AttentionShape {
        batch: b,
        q_heads: hq,
        kv_heads: hkv,
        tokens: t,
        capacity: cap,
    };
    // The exact rows repacked from the ring into shuffled tiles of 3 positions (an arena's
    // layout, tqkv::paged::ExactTiles); tiles no query reads are absent.
    let xt = tqkv::paged::ExactTiles {
        tile_bytes: (3 * hkv * 4 * d).div_ceil(16) * 16,
        heads: hkv,
        dim: d,
        format: tqkv::ExactFormat::F16,
        rows: 3,
    };
    let eper = cap.div_ceil(xt.rows);
    let mut eorder: Vec<usize> = (0..b * eper).collect();
    for i in (1..eorder.len()).rev() {
        eorder.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let mut earena: Vec<u8> = (0..b * eper * xt.tile_bytes)
        .map(|_| rng.next_u64() as u8)
        .collect();
    let mut etable = vec![tqkv::paged::NO_TILE; b * eper];
    if exact.is_some() {
        for bi in 0..b {
            let qs = bi * t..(bi + 1) * t;
            let vis = visible[qs.clone()].iter().copied().max().unwrap_or(0);
            let lo = qs
                .filter(|&j| packed_end[j] < visible[j])
                .map(|j| packed_end[j])
                .min()
                .unwrap_or(vis);
            for p in (0..sinks.min(vis)).chain(lo..vis) {
                let e = &mut etable[bi * eper + p / xt.rows];
                if *e == tqkv::paged::NO_TILE {
                    *e = eorder[bi * eper + p / xt.rows] as u32;
                }
                for h in 0..hkv {
                    let src = ((bi * hkv + h) * slots + slot(p)) * d;
                    let at = xt
                        .rows()
                        .at(&etable[bi * eper..(bi + 1) * eper], p, h)
                        .unwrap();
                    for j in 0..d {
                        earena[at + 2 * j..at + 2 * j + 2]
                            .copy_from_slice(&ek[src + j].to_le_bytes());
                        earena[at + 2 * d + 2 * j..at + 2 * d + 2 * j + 2]
                            .copy_from_slice(&ev[src + j].to_le_bytes());
                    }
                }
            }
        }
    }
    let etables: Vec<&[u32]> = etable.chunks(eper).collect();
    let ehost = tqkv::paged::device_table(&etables, eper);
    let (ead, etd) = (
        stream.clone_htod(&earena).unwrap(),
        stream.clone_htod(&ehost).unwrap(),
    );
    let part = ExactPart {
        arena: &ead,
        table: &etd,
        host_table: &ehost,
        per_seq: eper,
        tiles: xt,
        sinks,
        packed_end: &packed_end,
    };
    let part = exact.map(|_| &part);
    with_input_as!(stream, dtype, &q, |qd| decode_attention_mixed(
        stream, &kd, &vd, &qd, &kcd, &vcd, shape, &visible, part, scale, &status, &mut out,
    ))
    .unwrap();
    // Each kernel that takes the layout, with its tolerance against the CPU reference: the
    // split kernel computes in f32 (1e-3), the tensor-core one with f16 operands (4e-3); each
    // also through tile tables of 64 and of 7 slots over shuffled arenas (then bit-equal to
    // its contiguous run).
    let mut runs = vec![("split", stream.clone_dtoh(&out).unwrap(), 1e-3)];
    // One cached workspace for every run (as a layer reuses it).
    let ws = std::sync::Mutex::new(tqkv::cuda::Workspace::default());
    let run = |kernel: AttentionKernel,
               tiles: Option<TileTable>,
               kc: &cudarc::driver::CudaView<u8>,
               vc: &cudarc::driver::CudaView<u8>| {
        let mut o = stream.alloc_zeros::<f32>(b * hq * t * d).unwrap();
        let opts = AttentionOptions {
            kernel,
            tiles,
            workspace: Some(&ws),
        };
        with_input_as!(stream, dtype, &q, |qd| decode_attention_with(
            stream, &kd, &vd, &qd, kc, vc, shape, &visible, part, &opts, scale, &status, &mut o,
        ))
        .unwrap();
        stream.clone_dtoh(&o).unwrap()
    };
    let kernels = if attention_supported(AttentionKernel::TensorCore, &kd, &vd) {
        vec![AttentionKernel::Split, AttentionKernel::TensorCore]
    } else {
        eprintln!("{kcfg:?}/v{vbits} d={d}: not on the tensor-core kernel's path");
        vec![AttentionKernel::Split]
    };
    // Records the queries read: after the sinks (with an exact part), up to the packed ends.
    let rec_hi: Vec<usize> = (0..b)
        .map(|bi| {
            let ends = if exact.is_some() {
                &packed_end
            } else {
                &visible
            };
            ends[bi * t..(bi + 1) * t]
                .iter()
                .copied()
                .max()
                .unwrap_or(0)
        })
        .collect();
    let lo_rec = if exact.is_some() { sinks } else { 0 };
    for kernel in kernels {
        let plain = run(kernel, None, &kcd.slice(0..), &vcd.slice(0..));
        for slots_per_tile in [64usize, 7] {
            // The arena: tiles [keys hkv × P × rbk | values hkv × P × rbv] in a random order
            // among garbage tiles; tiles holding no record a query reads are absent (−1).
            let rt = tqkv::paged::RecordTiles {
                tile_bytes: (hkv * slots_per_tile * (rbk + rbv)).div_ceil(16) * 16,
                heads: hkv,
                slots: slots_per_tile,
                key_bytes: rbk,
                value_bytes: rbv,
            };
            let per_seq = cap.div_ceil(slots_per_tile);
            let n_tiles = b * per_seq + 3;
            let mut order: Vec<i32> = (0..n_tiles as i32).collect();
            for i in (1..n_tiles).rev() {
                order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
            let mut table = vec![-1i32; b * per_seq];
            let mut arena: Vec<u8> = (0..n_tiles * rt.tile_bytes)
                .map(|_| rng.next_u64() as u8)
                .collect();
            for bi in 0..b {
                for l in 0..per_seq {
                    if (l + 1) * slots_per_tile <= lo_rec || l * slots_per_tile >= rec_hi[bi] {
                        continue;
                    }
                    table[bi * per_seq + l] = order[bi * per_seq + l];
                    let row: Vec<u32> = table[bi * per_seq..(bi + 1) * per_seq]
                        .iter()
                        .map(|&x| {
                            if x < 0 {
                                tqkv::paged::NO_TILE
                            } else {
                                x as u32
                            }
                        })
                        .collect();
                    for h in 0..hkv {
                        for s in l * slots_per_tile..cap.min((l + 1) * slots_per_tile) {
                            for (rows, c, rb) in [(rt.keys(), &kc, rbk), (rt.values(), &vc, rbv)] {
                                let src = ((bi * hkv + h) * cap + s) * rb;
                                let dst = rows.at(&row, s, h).unwrap();
                                arena[dst..dst + rb].copy_from_slice(&c[src..src + rb]);
                            }
                        }
                    }
                }
            }
            let ad = stream.clone_htod(&arena).unwrap();
            let td = stream.clone_htod(&table).unwrap();
            let (kr, vr) = (rt.keys(), rt.values());
            let paged = run(
                kernel,
                Some(TileTable {
                    table: &td,
                    host: &table,
                    per_seq,
                    slots: slots_per_tile,
                    k_tile: kr.tile_bytes,
                    k_head: kr.head_stride,
                    v_tile: vr.tile_bytes,
                    v_head: vr.head_stride,
                }),
                &ad.slice(0..),
                &ad.slice(vr.offset..),
            );
            assert!(
                plain
                    .iter()
                    .zip(&paged)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{kernel}: {kcfg:?}/v{vbits} d={d} G={g} T={t}: tiles of {slots_per_tile} change the result"
            );
        }
        if kernel == AttentionKernel::TensorCore {
            runs.push(("tc", plain, 4e-3));
        }
    }
    let case = common::PackedCase {
        q: &q,
        kc: &kc,
        vc: &vc,
        ek: &ek,
        ev: &ev,
        visible: &visible,
        packed_end: &packed_end,
        lens,
        dims: (hq, hkv, t, d, cap),
        sinks,
        ring,
        exact: exact.is_some(),
        scale,
    };
    for (bi, &n) in lens.iter().enumerate() {
        for h in 0..hkv {
            let (want, vis) = case.reference_head(
                std::slice::from_ref(&kq[h]),
                std::slice::from_ref(&vq[h]),
                bi,
                h,
            );
            for (kernel, got, tol) in &runs {
                for ti in 0..t {
                    for gi in 0..g {
                        let o = ((bi * hq + h * g + gi) * t + ti) * d;
                        let row = &got[o..o + d];
                        let w = &want[(ti * g + gi) * d..][..d];
                        let ctx = format!(
                        "{kernel}: {kcfg:?}/v{vbits} d={d} G={g} T={t} dtype {dtype} exact {exact:?} seq {bi} (len {n}) head {h} row ({ti},{gi}) sees {}",
                        vis[ti * g + gi]
                    );
                        if vis[ti * g + gi] == 0 {
                            assert!(row.iter().all(|&x| x == 0.0), "{ctx}: expected zeros");
                            continue;
                        }
                        let num: f64 = row
                            .iter()
                            .zip(w)
                            .map(|(a, b)| ((a - b) as f64).powi(2))
                            .sum();
                        let den: f64 = w.iter().map(|&b| (b as f64).powi(2)).sum();
                        let rel = (num / den.max(1e-30)).sqrt();
                        assert!(rel <= *tol, "{ctx}: relative error {rel:.2e}");
                    }
                }
            }
        }
    }
}

#[test]
fn decode_attention_matches_attend_packed() {
    let Some(stream) = gpu() else { return };
    let mut rng = Rng::new(fresh_seed("gpu decode attention"));
    // Decode (T = 1), GQA 4, lengths that need several splits and ones shorter than a chunk.
    attention_case(
        &stream,
        &mut rng,
        ("3.5", "mse", "dense"),
        "3.5",
        128,
        2,
        4,
        1,
        &[1, 7, 99, 3001],
        0,
    );
    attention_case(
        &stream,
        &mut rng,
        ("2.5", "mse", "hadamard"),
        "2.5",
        128,
        2,
        4,
        1,
        &[1000, 5],
        1,
    );
    attention_case(
        &stream,
        &mut rng,
        ("4", "prod", "dense"),
        "3",
        64,
        3,
        1,
        1,
        &[777, 2],
        2,
    );
    attention_case(
        &stream,
        &mut rng,
        ("3", "prod-orth", "hadamard"),
        "4",
        96,
        1,
        7,
        1,
        &[1500],
        0,
    );
    attention_case(
        &stream,
        &mut rng,
        ("2.5", "mse", "dense"),
        "2.5",
        256,
        2,
        2,
        1,
        &[300, 64],
        1,
    );
    attention_case(
        &stream,
        &mut rng,
        ("33@4+66@3", "mse", "dense"),
        "3",
        99,
        1,
        3,
        1,
        &[50],
        0,
    );
    // The presets' shape (4-bit keys, 2-bit values, Hadamard), lengths around the 64-slot
    // tiles of the tensor-core kernel.
    attention_case(
        &stream,
        &mut rng,
        ("4", "mse", "hadamard"),
        "2",
        128,
        3,
        4,
        1,
        &[1, 63, 64, 65, 4097],
        1,
    );
    // Several query tokens (prefill-style rows, causal), more rows than one block holds.
    attention_case(
        &stream,
        &mut rng,
        ("3.5", "mse", "dense"),
        "3.5",
        128,
        2,
        4,
        5,
        &[9, 2000],
        2,
    );
    attention_case(
        &stream,
        &mut rng,
        ("1", "prod", "dense"),
        "2",
        64,
        1,
        1,
        3,
        &[2, 40],
        0,
    );
}

/// Sinks and windows read in full precision, merged with the packed part (the CPU reference
/// is `attend_mixed`): decode and several query tokens, windows shorter and longer than a
/// split, a sequence shorter than its sinks.
#[test]
fn mixed_attention_matches_attend_mixed() {
    let Some(stream) = gpu() else { return };
    let mut rng = Rng::new(fresh_seed("gpu mixed attention"));
    for (kcfg, vbits, dims, lens, dtype, exact) in [
        (
            ("4", "mse", "hadamard"),
            "2",
            (64, 3, 3, 1),
            &[600usize, 3, 31][..],
            0,
            (1, 29),
        ),
        (
            ("3.5", "mse", "dense"),
            "2.5",
            (128, 2, 4, 1),
            &[3001, 7],
            1,
            (4, 300),
        ),
        (
            ("4", "prod", "hadamard"),
            "3",
            (96, 1, 7, 5),
            &[40, 900],
            2,
            (2, 9),
        ),
        (
            ("2.5", "mse", "hadamard"),
            "2",
            (128, 2, 2, 16),
            &[2000],
            0,
            (0, 600),
        ),
        (
            ("3", "mse", "dense"),
            "3",
            (64, 2, 1, 1),
            &[100, 2],
            1,
            (8, 0),
        ),
    ] {
        mixed_attention_case(
            &stream,
            &mut rng,
            kcfg,
            vbits,
            dims,
            lens,
            dtype,
            Some(exact),
        );
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let Some(stream) = gpu() else { return };
    let mut rng = Rng::new(fresh_seed("gpu bad inputs"));
    let (h, d, t) = (2usize, 64usize, 3usize);
    let qs = heads(&mut rng, "3.5", "mse", "dense", d, h);
    let tables = LayerTables::new(&qs).unwrap();
    let dev = DeviceTables::upload(&tables, &stream).unwrap();
    let rb = tables.record_bytes;
    let mut x = data(&mut rng, h * t, d);
    x[d + 5] = f32::NAN;
    let xd = stream.clone_htod(&x).unwrap();
    let mut cache = stream.alloc_zeros::<u8>(h * 4 * rb).unwrap();
    let mut status = StatusWord::new(&stream).unwrap();
    let shape = AppendShape {
        batch: 1,
        heads: h,
        tokens: t,
        capacity: 4,
    };
    let append = |cache: &mut CudaSlice<u8>, start: usize, status: &mut StatusWord| {
        quantize_append(
            &stream,
            &dev,
            &xd,
            cache,
            shape,
            &[start],
            &[t],
            None,
            status,
        )
    };
    append(&mut cache, 0, &mut status).unwrap();
    let err = status.read(&stream).unwrap_err().to_string();
    assert!(err.contains("NaN"), "{err}");
    // The poisoned token's record is not written; the others are.
    let got = stream.clone_dtoh(&cache).unwrap();
    assert!(got[rb..2 * rb].iter().all(|&b| b == 0));
    assert!(got[..rb].iter().any(|&b| b != 0));
    // Attention over a cache whose status is set returns NaN, never a silent number.
    let q = stream.clone_htod(&vec![0.5f32; h * d]).unwrap();
    let mut out = stream.alloc_zeros::<f32>(h * d).unwrap();
    let ashape = AttentionShape {
        batch: 1,
        q_heads: h,
        kv_heads: h,
        tokens: 1,
        capacity: 4,
    };
    let mut attend = |visible: usize, status: &StatusWord| {
        decode_attention(
            &stream,
            &dev,
            &dev,
            &q,
            &cache,
            &cache,
            ashape,
            &[visible],
            0.1,
            status,
            &mut out,
        )
    };
    attend(3, &status).unwrap();
    let vis = shape_err(attend(5, &status));
    assert!(vis.contains("sees 5"), "{vis}");
    assert!(stream.clone_dtoh(&out).unwrap().iter().all(|v| v.is_nan()));
    status.clear(&stream).unwrap();
    status.read(&stream).unwrap();
    // Shapes: too small a cache, too many new tokens, a length beyond the capacity.
    let small = shape_err(append(
        &mut stream.alloc_zeros::<u8>(rb).unwrap(),
        0,
        &mut status,
    ));
    assert!(small.contains("cache"), "{small}");
    let over = shape_err(append(&mut cache, 2, &mut status));
    assert!(over.contains("do not fit"), "{over}");
    // Unsupported head_dim for the kernels.
    let big = VectorQuantizer::new(QuantSpec::mse("3".parse().unwrap()), 512, 1).unwrap();
    let e = DeviceTables::upload(&LayerTables::new(&[big]).unwrap(), &stream).unwrap_err();
    assert!(e.to_string().contains("head_dim"), "{e}");
}

fn shape_err(r: tqkv::Result<()>) -> String {
    r.expect_err("expected an error").to_string()
}
