//! VectorQuantizer: records, scores straight from codes, splits, outlier rule, bad inputs.
mod common;
use common::{dot64, fresh_seed, gaussian_vec};
use tqkv::rng::Rng;
use tqkv::{
    BitsSpec, Error, Mode, NormFormat, NormRule, OutlierRule, QjlSketch, QuantSpec, RotationKind,
    VectorQuantizer,
};

fn specs() -> Vec<QuantSpec> {
    let mut v = Vec::new();
    for bits in ["1", "2", "3", "4", "2.5", "3.5", "paper2.5", "8"] {
        let b: BitsSpec = bits.parse().unwrap();
        for mode in ["mse", "prod", "prod-orth"] {
            let mut s = QuantSpec::mse(b).with_outliers(OutlierRule::Fixed);
            s.mode = mode.parse().unwrap();
            v.push(s);
            if bits == "3.5" {
                v.push(s.with_norm_rule(NormRule::Projected));
                v.push(s.with_norm_rule(NormRule::LeastSquares));
            }
            if bits == "2.5" || bits == "3" {
                v.push(s.with_norm(NormFormat::Log8));
            }
        }
    }
    v.push(QuantSpec::qjl(256));
    v
}

/// ‖x − y‖² / ‖x‖² in f64.
fn rel_err(x: &[f32], y: &[f32]) -> f64 {
    x.iter()
        .zip(y)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        / dot64(x, x)
}

/// NormRule::LeastSquares: the same codes as the exact norm, and the stored norm is the f64
/// least-squares scale of the exact norm's reconstruction, ⟨x, x̂⟩ / ‖x̂‖² · n (within the f16
/// rounding), so no vector's error is above the exact norm's (beyond that rounding) and the
/// mean error is below it; both at the same bytes.
#[test]
fn least_squares_norms_minimise_each_error() {
    let seed = fresh_seed("least_squares_norms");
    let mut rng = Rng::new(seed);
    for (bits, d, rot) in [
        ("2", 128usize, RotationKind::Dense),
        ("3", 17, RotationKind::Dense),
        ("4", 64, RotationKind::Hadamard),
        ("3", 99, RotationKind::Dense),
    ] {
        let exact = QuantSpec::mse(bits.parse().unwrap()).with_rotation(rot);
        let qseed = rng.next_u64();
        let qe = VectorQuantizer::new(exact, d, qseed).unwrap();
        let ql =
            VectorQuantizer::new(exact.with_norm_rule(NormRule::LeastSquares), d, qseed).unwrap();
        let (mut re, mut rl) = (vec![0u8; qe.record_bytes()], vec![0u8; ql.record_bytes()]);
        let (mut xe, mut xl) = (vec![0f32; d], vec![0f32; d]);
        let (mut mse_e, mut mse_l) = (0f64, 0f64);
        let n = 1000;
        for i in 0..n {
            // Gaussian vectors, and every tenth one a single spike (the zero-ish corner).
            let mut x = gaussian_vec(&mut rng, &vec![1.0; d]);
            if i % 10 == 9 {
                x.iter_mut().for_each(|v| *v = 0.0);
                x[i % d] = 3.0;
            }
            qe.quantize(&x, &mut re).unwrap();
            ql.quantize(&x, &mut rl).unwrap();
            assert_eq!(re[2..], rl[2..], "{bits} d={d}: codes differ (seed {seed})");
            qe.dequantize(&re, &mut xe).unwrap();
            ql.dequantize(&rl, &mut xl).unwrap();
            // The least-squares scale of the exact reconstruction, in f64.
            let want = dot64(&x, &xe) / dot64(&xe, &xe);
            let got = dot64(&xl, &xe) / dot64(&xe, &xe);
            assert!(
                (got - want).abs() <= 6e-4 * want.abs(),
                "{bits} d={d}: scale {got} vs {want} (seed {seed})"
            );
            let (ee, el) = (rel_err(&x, &xe), rel_err(&x, &xl));
            assert!(
                el <= ee + 1e-6,
                "{bits} d={d}: error {el} above the exact norm's {ee} (seed {seed})"
            );
            mse_e += ee;
            mse_l += el;
        }
        eprintln!("{bits} d={d}: MSE exact {mse_e:.5}, least squares {mse_l:.5} (sums)");
        assert!(
            mse_l < mse_e,
            "{bits} d={d}: {mse_l} vs {mse_e} (seed {seed})"
        );
    }
}

/// NormRule::Projected: a reconstruction whose projection on x is x (⟨x̂, x⟩ = ‖x‖² within the
/// f16 rounding of the norm), so inner products along x are not shrunk, where the exact norm
/// gives ⟨x̂, x⟩/‖x‖² ≈ 1 − D (TurboQuant's MSE-mode bias); the price is an MSE of at most
/// D / (1 − D) instead of D. Codes are the same for both rules.
#[test]
fn projected_norms_unshrink_inner_products() {
    let mut rng = Rng::new(fresh_seed("projected_norms"));
    for (bits, d) in [("2", 128usize), ("3", 64), ("4", 128)] {
        let exact = QuantSpec::mse(bits.parse().unwrap());
        let seed = rng.next_u64();
        let qe = VectorQuantizer::new(exact, d, seed).unwrap();
        let qp = VectorQuantizer::new(exact.with_norm_rule(NormRule::Projected), d, seed).unwrap();
        let (mut re, mut rp) = (vec![0u8; qe.record_bytes()], vec![0u8; qp.record_bytes()]);
        let (mut xe, mut xp) = (vec![0f32; d], vec![0f32; d]);
        let (mut ae, mut ap, mut mse_e, mut mse_p) = (0f64, 0f64, 0f64, 0f64);
        let n = 2000;
        for _ in 0..n {
            let x = gaussian_vec(&mut rng, &vec![1.0; d]);
            qe.quantize(&x, &mut re).unwrap();
            qp.quantize(&x, &mut rp).unwrap();
            let nb = 2; // the f16 norm comes first; the codes follow and are the same
            assert_eq!(re[nb..], rp[nb..], "{bits} d={d}: codes differ");
            qe.dequantize(&re, &mut xe).unwrap();
            qp.dequantize(&rp, &mut xp).unwrap();
            let xx = dot64(&x, &x);
            let p = dot64(&xp, &x) / xx;
            assert!((p - 1.0).abs() < 1e-3, "{bits} d={d}: ⟨x̂, x⟩/‖x‖² = {p}");
            ae += dot64(&xe, &x) / xx;
            ap += p;
            mse_e += rel_err(&x, &xe);
            mse_p += rel_err(&x, &xp);
        }
        let (ae, ap, mse_e, mse_p) = (
            ae / n as f64,
            ap / n as f64,
            mse_e / n as f64,
            mse_p / n as f64,
        );
        eprintln!("{bits} d={d}: ⟨x̂,x⟩/‖x‖² exact {ae:.4}, projected {ap:.4}; MSE {mse_e:.4} vs {mse_p:.4}");
        // The exact norm shrinks by about D (exactly so for the limiting coordinate density);
        // the projected one costs at most D / (1 − D) of MSE.
        assert!(
            (ae - (1.0 - mse_e)).abs() < 0.15 * mse_e,
            "{ae} vs 1 − {mse_e}"
        );
        assert!(
            ae < 1.0 - 0.8 * mse_e && (ap - 1.0).abs() < 1e-4,
            "{ae} {ap}"
        );
        assert!(mse_p <= 1.05 * mse_e / (1.0 - mse_e), "{mse_p} vs {mse_e}");
    }
}

#[test]
fn score_from_codes_equals_the_inner_product_with_the_dequantized_vector() {
    let seed = fresh_seed("score_equals_dequantized");
    let mut rng = Rng::new(seed);
    for spec in specs() {
        for (d, rot) in [
            (64usize, RotationKind::Dense),
            (128, RotationKind::Hadamard),
            (96, RotationKind::Dense),
            (80, RotationKind::Dense),
        ] {
            let spec = spec.with_rotation(rot);
            let q = match VectorQuantizer::new(spec, d, rng.next_u64()) {
                Ok(q) => q,
                // The plain QJL preset asks for m = 256 which suits any d; everything else must build.
                Err(e) => panic!("{spec:?} d={d}: {e}"),
            };
            let scales = vec![1.0f32; d];
            let mut rec = vec![0u8; q.record_bytes()];
            let mut xh = vec![0.0f32; d];
            for _ in 0..20 {
                let x = gaussian_vec(&mut rng, &scales);
                let y = gaussian_vec(&mut rng, &scales);
                q.quantize(&x, &mut rec).unwrap();
                q.dequantize(&rec, &mut xh).unwrap();
                let p = q.prepare_query(&y).unwrap();
                let s = q.score(&p, &rec).unwrap() as f64;
                let want = dot64(&y, &xh);
                let scale = (dot64(&x, &x) * dot64(&y, &y)).sqrt();
                assert!(
                    (s - want).abs() < 2e-5 * scale,
                    "{spec:?} d={d}: {s} vs {want}"
                );
            }
        }
    }
}

#[test]
fn record_layouts_and_bit_accounting() {
    let q = |bits: &str, mode: &str, norm: NormFormat, d: usize| {
        let mut s = QuantSpec::mse(bits.parse().unwrap())
            .with_outliers(OutlierRule::Fixed)
            .with_norm(norm);
        s.mode = mode.parse().unwrap();
        VectorQuantizer::new(s, d, 0).unwrap()
    };
    // tq3.5 at d=128: 2 f16 norms + 64·4 bits + 64·3 bits = 4 + 32 + 24 = 60 bytes.
    let a = q("3.5", "mse", NormFormat::F16, 128);
    assert_eq!(a.record_bytes(), 60);
    assert_eq!(a.code_bits_per_channel(), 3.5);
    assert_eq!(a.stored_bits_per_channel(), 3.75);
    // 2.5 = half at 3 + half at 2: 4 + 24 + 16 = 44 bytes.
    assert_eq!(q("2.5", "mse", NormFormat::F16, 128).record_bytes(), 44);
    // The paper's literal split is 2.25 code bits; with its two f16 norms it is 2.5 stored bits.
    let p = q("paper2.5", "mse", NormFormat::F16, 128);
    assert_eq!(p.code_bits_per_channel(), 2.25);
    assert_eq!(p.stored_bits_per_channel(), 2.5);
    // prod 3 bits at d=128: n, γ (f16) + 128·2 bits + 128 sign bits = 4 + 32 + 16.
    assert_eq!(q("3", "prod", NormFormat::F16, 128).record_bytes(), 52);
    assert_eq!(q("3", "prod", NormFormat::F32, 128).record_bytes(), 56);
    // Awkward: 4 bits at d=99 → 2 + ⌈396/8⌉ = 52.
    assert_eq!(q("4", "mse", NormFormat::F16, 99).record_bytes(), 52);
    let l = a.layout();
    assert_eq!((l.groups[0].norm_offset, l.groups[1].norm_offset), (0, 2));
    assert_eq!(
        (l.groups[0].codes_offset, l.groups[1].codes_offset),
        (4, 36)
    );
}

#[test]
fn awkward_dimensions_work_with_the_dense_rotation() {
    let seed = fresh_seed("awkward_dimensions");
    let mut rng = Rng::new(seed);
    for (d, bits) in [
        (16usize, "2"),
        (17, "3"),
        (99, "4"),
        (99, "33@4+66@3"),
        (250, "1.5"),
        (256, "paper2.5"),
    ] {
        let spec = QuantSpec::mse(bits.parse().unwrap()).with_outliers(OutlierRule::Fixed);
        let q = VectorQuantizer::new(spec, d, rng.next_u64()).unwrap();
        let x = gaussian_vec(&mut rng, &vec![1.0; d]);
        let mut rec = vec![0u8; q.record_bytes()];
        let mut xh = vec![0.0; d];
        q.quantize(&x, &mut rec).unwrap();
        q.dequantize(&rec, &mut xh).unwrap();
        let err: f64 = x
            .iter()
            .zip(&xh)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let rel = err / dot64(&x, &x);
        assert!(rel < 0.5, "d={d} bits={bits}: relative error {rel}");
    }
    // A split that does not divide the dimension is a clear error.
    let e = VectorQuantizer::new(
        QuantSpec::mse("2.5".parse().unwrap()).with_outliers(OutlierRule::Fixed),
        99,
        0,
    )
    .unwrap_err();
    assert!(e.to_string().contains("split"), "{e}");
}

#[test]
fn the_magnitude_rule_finds_outlier_channels_and_beats_a_fixed_split() {
    let seed = fresh_seed("magnitude_rule");
    let mut rng = Rng::new(seed);
    let d = 128;
    // Keys with a few high-energy channels, as after RoPE in real models.
    let mut outliers: Vec<usize> = Vec::new();
    while outliers.len() < 64 {
        let c = (rng.next_u64() % d as u64) as usize;
        if !outliers.contains(&c) {
            outliers.push(c);
        }
    }
    outliers.sort_unstable();
    let scales: Vec<f32> = (0..d)
        .map(|c| {
            if outliers.contains(&c) {
                1.0 + (c % 5) as f32
            } else {
                0.3
            }
        })
        .collect();
    let calib: Vec<f32> = (0..64)
        .flat_map(|_| gaussian_vec(&mut rng, &scales))
        .collect();
    let spec = QuantSpec::mse("3.5".parse().unwrap());
    let cal = VectorQuantizer::calibrate(spec, d, &calib, rng.next_u64()).unwrap();
    assert_eq!(cal.group_channels(0), &outliers[..]);
    let fixed =
        VectorQuantizer::new(spec.with_outliers(OutlierRule::Fixed), d, rng.next_u64()).unwrap();
    let mse = |q: &VectorQuantizer, rng: &mut Rng| {
        let mut rec = vec![0u8; q.record_bytes()];
        let mut xh = vec![0.0; d];
        let mut s = 0.0;
        for _ in 0..2000 {
            let x = gaussian_vec(rng, &scales);
            q.quantize(&x, &mut rec).unwrap();
            q.dequantize(&rec, &mut xh).unwrap();
            s += x
                .iter()
                .zip(&xh)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                / dot64(&x, &x);
        }
        s / 2000.0
    };
    let (m_cal, m_fixed) = (mse(&cal, &mut rng), mse(&fixed, &mut rng));
    assert!(
        m_cal < 0.8 * m_fixed,
        "calibrated {m_cal} vs fixed {m_fixed}"
    );
    // The rule without samples is an error, not a silent fixed split.
    assert!(VectorQuantizer::new(spec, d, 0)
        .unwrap_err()
        .to_string()
        .contains("calibrat"));
    assert!(VectorQuantizer::calibrate(spec, d, &calib[..100], 0).is_err());
}

#[test]
fn plain_qjl_matches_a_naive_f64_estimator() {
    let seed = fresh_seed("plain_qjl");
    let mut rng = Rng::new(seed);
    let (d, m) = (128usize, 256usize);
    let sk = QjlSketch::new(d, m, false, rng.next_u64()).unwrap();
    let s = sk.matrix();
    for _ in 0..50 {
        let k = gaussian_vec(&mut rng, &vec![1.0; d]);
        let q = gaussian_vec(&mut rng, &vec![1.0; d]);
        let mut signs = vec![0u8; m];
        let norm = sk.sketch(&k, &mut signs).unwrap();
        let mut sq = vec![0.0; m];
        sk.project(&q, &mut sq).unwrap();
        let est = sk.estimate(&sq, &signs, norm) as f64;
        // Naive: √(π/2)/m · ‖k‖ · Σ_i ⟨s_i, q⟩ · sign⟨s_i, k⟩, all in f64.
        let mut acc = 0.0;
        for i in 0..m {
            let row = &s[i * d..(i + 1) * d];
            let sgn = if dot64(row, &k) >= 0.0 { 1.0 } else { -1.0 };
            acc += dot64(row, &q) * sgn;
        }
        let naive = (std::f64::consts::PI / 2.0).sqrt() / m as f64 * dot64(&k, &k).sqrt() * acc;
        assert!(
            (est - naive).abs() < 1e-4 * (1.0 + naive.abs()),
            "{est} vs {naive}"
        );
    }
    // Through the VectorQuantizer (QuantSpec::qjl): 32 bytes of signs + one f16 norm.
    let vq = VectorQuantizer::new(QuantSpec::qjl(m), d, 1).unwrap();
    assert_eq!(vq.record_bytes(), 2 + m / 8);
    assert_eq!(vq.code_bits_per_channel(), 2.0);
}

#[test]
fn same_seed_same_records_other_seed_other_records() {
    let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.7).cos()).collect();
    let rec = |seed| {
        let q = VectorQuantizer::new(QuantSpec::prod(BitsSpec::Uniform(3)), 64, seed).unwrap();
        let mut r = vec![0u8; q.record_bytes()];
        q.quantize(&x, &mut r).unwrap();
        r
    };
    assert_eq!(rec(5), rec(5));
    assert_ne!(rec(5), rec(6));
}

#[test]
fn zero_vectors_give_zeros_not_nan() {
    for spec in specs() {
        let q = VectorQuantizer::new(spec, 64, 3).unwrap();
        let mut rec = vec![0u8; q.record_bytes()];
        q.quantize(&[0.0; 64], &mut rec).unwrap();
        let mut xh = vec![1.0f32; 64];
        q.dequantize(&rec, &mut xh).unwrap();
        assert!(xh.iter().all(|&v| v == 0.0), "{spec:?}: {xh:?}");
        let p = q.prepare_query(&[1.0; 64]).unwrap();
        assert_eq!(q.score(&p, &rec).unwrap(), 0.0);
        // A zero query against a real key: 0, not NaN.
        let x: Vec<f32> = (0..64).map(|i| i as f32).collect();
        q.quantize(&x, &mut rec).unwrap();
        let p = q.prepare_query(&[0.0; 64]).unwrap();
        assert_eq!(q.score(&p, &rec).unwrap(), 0.0);
    }
}

#[test]
fn bad_inputs_are_errors_that_name_the_problem() {
    let q = VectorQuantizer::new(QuantSpec::mse(BitsSpec::Uniform(3)), 64, 0).unwrap();
    let mut rec = vec![0u8; q.record_bytes()];
    let mut x = vec![0.5f32; 64];
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        x[17] = bad;
        let e = q.quantize(&x, &mut rec).unwrap_err();
        assert!(matches!(e, Error::NonFinite { index: 17, .. }), "{e}");
        assert!(q.prepare_query(&x).is_err());
    }
    assert!(matches!(
        q.quantize(&[0.0; 63], &mut rec),
        Err(Error::Shape {
            expected: 64,
            got: 63,
            ..
        })
    ));
    assert!(matches!(
        q.quantize(&[0.0; 64], &mut rec[1..]),
        Err(Error::Shape { .. })
    ));
    let mut out = vec![0.0; 65];
    assert!(q.dequantize(&rec, &mut out).is_err());
    // Unsupported bits and dims name what is supported.
    for b in [
        "0",
        "9",
        "2.7",
        "abc",
        "0.5",
        // Channel counts that would overflow k + j or dim · k.
        "18446744073709551615@3+1@2",
        "1@3+18446744073709551615@2",
        "65537@3+1@2",
    ] {
        let e = b.parse::<BitsSpec>().unwrap_err();
        assert!(e.to_string().contains("1..=8"), "{e}");
    }
    let big: BitsSpec = "65536@3+65536@2".parse().unwrap();
    assert!(big.hi_channels(usize::MAX / 2).is_err());
    assert_eq!(big.hi_channels(128).unwrap(), 64);
    let e = VectorQuantizer::new(QuantSpec::mse(BitsSpec::Uniform(9)), 64, 0).unwrap_err();
    assert!(e.to_string().contains("1, 2, 3, 4"), "{e}");
    let e = VectorQuantizer::new(QuantSpec::mse(BitsSpec::Uniform(3)), 8, 0).unwrap_err();
    assert!(e.to_string().contains("16..=65536"), "{e}");
    let e = VectorQuantizer::new(
        QuantSpec::mse(BitsSpec::Uniform(3)).with_rotation(RotationKind::Hadamard),
        100,
        0,
    )
    .unwrap_err();
    assert!(e.to_string().contains("Hadamard"), "{e}");
    // An explicit sketch size with a split is ambiguous.
    let s = QuantSpec {
        mode: Mode::Prod {
            sketch_dim: Some(64),
            orthogonal: false,
        },
        ..QuantSpec::mse("3.5".parse().unwrap()).with_outliers(OutlierRule::Fixed)
    };
    assert!(VectorQuantizer::new(s, 64, 0).is_err());
    assert!("bogus"
        .parse::<Mode>()
        .unwrap_err()
        .to_string()
        .contains("mse, prod"));
}

#[test]
fn norms_beyond_f16_are_an_error_and_f32_keeps_them() {
    let x = vec![10_000.0f32; 64]; // ‖x‖ = 80 000 > 65 504
    let q = VectorQuantizer::new(QuantSpec::mse(BitsSpec::Uniform(4)), 64, 0).unwrap();
    let mut rec = vec![0u8; q.record_bytes()];
    let e = q.quantize(&x, &mut rec).unwrap_err();
    assert!(
        matches!(e, Error::NormOverflow { .. }) && e.to_string().contains("F32"),
        "{e}"
    );
    let q = VectorQuantizer::new(
        QuantSpec::mse(BitsSpec::Uniform(4)).with_norm(NormFormat::F32),
        64,
        0,
    )
    .unwrap();
    let mut rec = vec![0u8; q.record_bytes()];
    q.quantize(&x, &mut rec).unwrap();
    let mut xh = vec![0.0; 64];
    q.dequantize(&rec, &mut xh).unwrap();
    let rel: f64 = x
        .iter()
        .zip(&xh)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        / dot64(&x, &x);
    assert!(rel < 0.03, "{rel}");
}

/// Log8 norms: one byte per norm, the same codes, each group's reconstruction scaled by its
/// norm's rounding (within ±4.4 % of the f32 norm's), so the relative MSE grows by at most
/// about 2·4.4 %·√D + 4.4 %² over the f32 norm's.
#[test]
fn log8_norms_cost_a_byte_and_scale_the_reconstruction_by_their_rounding() {
    let seed = fresh_seed("log8_norms");
    let mut rng = Rng::new(seed);
    let q = |bits: &str, norm: NormFormat, d: usize| {
        let s = QuantSpec::mse(bits.parse().unwrap())
            .with_outliers(OutlierRule::Fixed)
            .with_norm(norm);
        VectorQuantizer::new(s, d, 7).unwrap()
    };
    // tq3.5 at d = 128: 2 one-byte norms + 32 + 24 bytes of codes.
    assert_eq!(q("3.5", NormFormat::Log8, 128).record_bytes(), 58);
    assert_eq!(q("1.5", NormFormat::Log8, 64).record_bytes(), 2 + 8 + 4);
    for (bits, d) in [
        ("3", 64usize),
        ("1.5", 64),
        ("2.5", 98),
        ("4", 17),
        ("2", 33),
    ] {
        let (a, b) = (q(bits, NormFormat::Log8, d), q(bits, NormFormat::F32, d));
        let (mut ra, mut rb) = (vec![0u8; a.record_bytes()], vec![0u8; b.record_bytes()]);
        let (mut err_a, mut err_b, mut energy) = (0.0, 0.0, 0.0);
        for _ in 0..200 {
            let scale = 2f64.powf(rng.uniform() * 12.0 - 6.0) as f32;
            let x = gaussian_vec(&mut rng, &vec![scale; d]);
            a.quantize(&x, &mut ra).unwrap();
            b.quantize(&x, &mut rb).unwrap();
            let (mut xa, mut xb) = (vec![0.0f32; d], vec![0.0f32; d]);
            a.dequantize(&ra, &mut xa).unwrap();
            b.dequantize(&rb, &mut xb).unwrap();
            for g in 0..a.num_groups() {
                let ch = a.group_channels(g);
                let na: f64 = ch
                    .iter()
                    .map(|&c| (xa[c] as f64).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let nb: f64 = ch
                    .iter()
                    .map(|&c| (xb[c] as f64).powi(2))
                    .sum::<f64>()
                    .sqrt();
                if nb > 0.0 {
                    // The same direction, a norm within half a log8 step.
                    let r = na / nb;
                    assert!(
                        (r - 1.0).abs() < 0.0443,
                        "{bits} d={d} group {g}: ratio {r} (seed {seed})"
                    );
                    for &c in ch {
                        let want = xb[c] as f64 * r;
                        assert!((xa[c] as f64 - want).abs() <= 1e-5 * nb, "{bits} d={d}");
                    }
                }
            }
            let e = |xh: &[f32]| -> f64 {
                x.iter()
                    .zip(xh)
                    .map(|(p, h)| ((p - h) as f64).powi(2))
                    .sum()
            };
            err_a += e(&xa) / dot64(&x, &x);
            err_b += e(&xb) / dot64(&x, &x);
            energy += 1.0;
        }
        let (da, db) = (err_a / energy, err_b / energy);
        eprintln!("{bits} d={d}: relative MSE {db:.4} with f32 norms, {da:.4} with log8");
        assert!(
            da <= db + 2.0 * 0.0443 * db.sqrt() + 0.0443 * 0.0443,
            "{bits} d={d}: {da} vs {db}"
        );
    }
}

#[test]
fn every_code_path_writes_the_same_records() {
    let seed = common::fresh_seed("code_paths_same_records");
    let mut rng = tqkv::rng::Rng::new(seed);
    for (spec, d) in [
        (
            QuantSpec::mse(BitsSpec::Uniform(4)).with_rotation(RotationKind::Hadamard),
            128,
        ),
        (QuantSpec::mse(BitsSpec::Uniform(3)), 64),
        (
            QuantSpec::mse("3.5".parse().unwrap()).with_outliers(OutlierRule::Fixed),
            128,
        ),
        (QuantSpec::prod(BitsSpec::Uniform(3)), 36),
        (QuantSpec::qjl(300), 64),
        (
            QuantSpec::mse(BitsSpec::Uniform(5)).with_norm_rule(tqkv::NormRule::Projected),
            96,
        ),
    ] {
        let q = VectorQuantizer::new(spec, d, rng.next_u64()).unwrap();
        let rb = q.record_bytes();
        for _ in 0..20 {
            let x = common::gaussian_vec(&mut rng, &vec![1.0; d]);
            let mut want = vec![0u8; rb];
            q.quantize_on(tqkv::simd::Isa::Scalar, &x, &mut want)
                .unwrap();
            for isa in tqkv::simd::Isa::available() {
                let mut got = vec![0xFFu8; rb];
                q.quantize_on(isa, &x, &mut got).unwrap();
                assert_eq!(got, want, "{} {spec:?} d {d} (seed {seed})", isa.name());
            }
        }
    }
}

/// `quantize_batch` (a dense rotation as a blocked product of four vectors at a time) writes
/// the records `quantize` writes vector by vector, on every code path: every spec of
/// [`specs`] at awkward dimensions, batches of 1, 2, 3, 5 and 99 vectors (blocks of 4 plus
/// every remainder), and the Hadamard rotation.
#[test]
fn batch_quantize_writes_the_records_of_quantize() {
    let seed = fresh_seed("batch_quantize_same_records");
    let mut rng = Rng::new(seed);
    let mut cases: Vec<(QuantSpec, usize)> = Vec::new();
    for s in specs() {
        for d in [68, 100] {
            cases.push((s, d));
        }
    }
    cases.push((
        QuantSpec::mse(BitsSpec::Uniform(3)).with_rotation(RotationKind::Hadamard),
        64,
    ));
    cases.push((QuantSpec::mse(BitsSpec::Uniform(4)), 128));
    for (spec, d) in cases {
        let q = VectorQuantizer::new(spec, d, rng.next_u64()).unwrap();
        let rb = q.record_bytes();
        for count in [1usize, 2, 3, 5, 99] {
            let xs: Vec<f32> = (0..count)
                .flat_map(|_| gaussian_vec(&mut rng, &vec![1.0; d]))
                .collect();
            let mut want = vec![0u8; count * rb];
            for (x, r) in xs.chunks_exact(d).zip(want.chunks_exact_mut(rb)) {
                q.quantize_on(tqkv::simd::Isa::Scalar, x, r).unwrap();
            }
            for isa in tqkv::simd::Isa::available() {
                let mut got = vec![0xA5u8; count * rb];
                q.quantize_batch_on(isa, &xs, &mut got).unwrap();
                assert_eq!(
                    got,
                    want,
                    "{} {spec:?} d {d}, {count} vectors (seed {seed})",
                    isa.name()
                );
            }
        }
    }
}

#[test]
fn batch_quantize_rejects_bad_input() {
    let d = 17;
    let q = VectorQuantizer::new(QuantSpec::mse(BitsSpec::Uniform(3)), d, 1).unwrap();
    let rb = q.record_bytes();
    let xs = vec![0.5f32; 3 * d];
    let mut recs = vec![0u8; 3 * rb];
    assert!(matches!(
        q.quantize_batch(&xs[..3 * d - 1], &mut recs[..2 * rb]),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        q.quantize_batch(&xs, &mut recs[..2 * rb]),
        Err(Error::Shape { .. })
    ));
    let mut bad = xs.clone();
    bad[2 * d + 3] = f32::NAN;
    assert!(q.quantize_batch(&bad, &mut recs).is_err());
    // Nothing at all is a batch of none.
    q.quantize_batch(&[], &mut []).unwrap();
}
