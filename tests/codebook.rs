//! Lloyd–Max codebooks against the papers' numbers and independent f64 references.
mod common;
use tqkv::{Codebook, Error};

/// Exact Lloyd–Max unit-vector MSE (ANCHORS.md, TurboQuant Fig. 3), d = 64 and 128, b = 1..4.
const ANCHORS: [(usize, [f64; 4]); 2] = [
    (64, [0.3584, 0.1145, 0.0334, 0.0091]),
    (128, [0.3609, 0.1160, 0.0340, 0.0093]),
];

#[test]
fn unit_mse_matches_the_papers_values_within_2_percent() {
    for (d, vals) in ANCHORS {
        for (b, &want) in (1u8..=4).zip(vals.iter()) {
            let got = Codebook::get(d, b).unwrap().unit_mse();
            assert!(
                (got / want - 1.0).abs() < 0.02,
                "d={d} b={b}: codebook MSE {got} vs paper {want}"
            );
            // TurboQuant Thm. 1: 4^-b ≤ D_mse ≤ (√3·π/2)·4^-b
            let lo = 4f64.powi(-(b as i32));
            assert!(got >= lo && got <= 3f64.sqrt() * std::f64::consts::PI / 2.0 * lo);
        }
    }
}

#[test]
fn one_bit_codebook_equals_the_closed_form() {
    // At b = 1 the centroids are ±E|t| and D = 1 − d·(E|t|)², E|t| = Γ(d/2)/(√π Γ((d+1)/2)).
    for d in [16usize, 17, 64, 99, 128, 256, 1000] {
        let cb = Codebook::get(d, 1).unwrap();
        // Independent reference: E|t| by f64 Simpson integration of the density.
        let n = 200_000;
        let e = (d as f64 - 3.0) / 2.0;
        let f = |t: f64| (1.0 - t * t).max(0.0).powf(e);
        let h = 1.0 / n as f64;
        let (mut z, mut m1) = (0.0, 0.0);
        for i in 0..=n {
            let t = i as f64 * h;
            let w = if i == 0 || i == n {
                1.0
            } else if i % 2 == 1 {
                4.0
            } else {
                2.0
            };
            z += w * f(t);
            m1 += w * t * f(t);
        }
        let mean_abs = m1 / z;
        let c = cb.centroids_f64();
        assert!(
            (c[1] - mean_abs).abs() < 1e-7 * mean_abs.max(1e-3) + 1e-9,
            "d={d}: {} vs {mean_abs}",
            c[1]
        );
        assert!((c[0] + c[1]).abs() < 1e-15);
        let want = 1.0 - d as f64 * mean_abs * mean_abs;
        assert!(
            (cb.unit_mse() - want).abs() < 1e-6,
            "d={d}: {} vs {want}",
            cb.unit_mse()
        );
        assert!((mean_abs - tqkv::qjl::mean_abs_sphere_coord(d)).abs() < 1e-7);
    }
}

#[test]
fn codebooks_are_symmetric_sorted_and_satisfy_the_lloyd_conditions() {
    for (d, b) in [
        (16usize, 4u8),
        (64, 3),
        (80, 2),
        (96, 4),
        (128, 8),
        (256, 5),
    ] {
        let cb = Codebook::get(d, b).unwrap();
        let c = cb.centroids();
        assert_eq!(c.len(), 1 << b);
        assert_eq!(cb.boundaries().len(), (1 << b) - 1);
        for k in 0..c.len() {
            assert_eq!(c[k], -c[c.len() - 1 - k], "d={d} b={b}: not symmetric");
            if k > 0 {
                assert!(c[k] > c[k - 1]);
                assert!((cb.boundaries()[k - 1] - 0.5 * (c[k] + c[k - 1])).abs() < 1e-7);
            }
        }
        // Nearest-centroid encoding agrees with a brute-force search.
        for i in 0..2000 {
            let t = -0.5 + i as f32 / 2000.0;
            let brute = (0..c.len())
                .min_by(|&a, &b2| (t - c[a]).abs().total_cmp(&(t - c[b2]).abs()))
                .unwrap();
            let got = cb.encode(t) as usize;
            assert!(
                got == brute || ((t - c[got]).abs() - (t - c[brute]).abs()).abs() < 1e-7,
                "d={d} b={b} t={t}: {got} vs {brute}"
            );
        }
        // More bits never hurt; D_mse shrinks by about 4× per bit.
        if b < 8 {
            let next = Codebook::get(d, b + 1).unwrap().unit_mse();
            assert!(next < cb.unit_mse() / 2.5);
        }
    }
}

#[test]
fn the_cache_returns_the_same_codebook() {
    let a = Codebook::get(64, 3).unwrap();
    let b = Codebook::get(64, 3).unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &b));
}

#[test]
fn unsupported_bits_and_dims_name_what_is_supported() {
    for b in [0u8, 9, 16] {
        let e = Codebook::get(128, b).unwrap_err();
        assert!(matches!(e, Error::UnsupportedBits { .. }));
        assert!(e.to_string().contains("1, 2, 3, 4"), "{e}");
    }
    for d in [0usize, 1, 15, 70_000] {
        let e = Codebook::get(d, 2).unwrap_err();
        assert!(matches!(e, Error::UnsupportedDim { .. }));
        assert!(e.to_string().contains("16..=65536"), "{e}");
    }
}

/// A codebook fitted to samples (`Codebook::fitted`) against a naive 1-D k-means in f64 from the
/// same start (the theoretical codebook), on samples of awkward sizes from a skewed mixture; the
/// fit never has a larger squared error on its samples than the start.
#[test]
fn fitted_codebooks_equal_a_naive_lloyd_and_never_fit_worse() {
    let seed = common::fresh_seed("fitted codebooks");
    let mut rng = tqkv::rng::Rng::new(seed);
    for (d, bits, n) in [
        (64usize, 2u8, 7usize),
        (64, 3, 99),
        (128, 4, 5000),
        (99, 1, 1),
    ] {
        let sigma = 1.0 / (d as f64).sqrt();
        let samples: Vec<f32> = (0..n)
            .map(|i| {
                let g = rng.gaussian() * sigma;
                (if i % 3 == 0 { 2.0 * g + 0.5 * sigma } else { g }) as f32
            })
            .collect();
        let base = Codebook::get(d, bits).unwrap();
        let fit = Codebook::fitted(d, bits, &samples, 30).unwrap();
        // Naive Lloyd: nearest centroid by scan, means of the cells, 30 rounds.
        let mut c: Vec<f64> = base.centroids_f64().to_vec();
        for _ in 0..30 {
            let mut sum = vec![0.0f64; c.len()];
            let mut cnt = vec![0usize; c.len()];
            for &x in &samples {
                let x = x as f64;
                let k = (0..c.len())
                    .min_by(|&a, &b| (x - c[a]).abs().total_cmp(&(x - c[b]).abs()))
                    .unwrap();
                sum[k] += x;
                cnt[k] += 1;
            }
            for k in 0..c.len() {
                if cnt[k] > 0 {
                    c[k] = sum[k] / cnt[k] as f64;
                }
            }
            for k in 1..c.len() {
                if c[k] <= c[k - 1] {
                    c[k] = c[k - 1] + 1e-9;
                }
            }
        }
        let err = |cents: &[f64]| -> f64 {
            samples
                .iter()
                .map(|&x| {
                    cents
                        .iter()
                        .map(|&cv| (x as f64 - cv).powi(2))
                        .fold(f64::INFINITY, f64::min)
                })
                .sum::<f64>()
                / n as f64
        };
        let diff = fit
            .centroids_f64()
            .iter()
            .zip(&c)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            diff < 1e-6 * sigma,
            "d={d} b={bits} n={n}: centroids differ by {diff}"
        );
        assert!((fit.coord_mse() - err(fit.centroids_f64())).abs() < 1e-9 * sigma * sigma);
        assert!(
            err(fit.centroids_f64()) <= err(base.centroids_f64()) * (1.0 + 1e-12),
            "d={d} b={bits} n={n}: the fit is worse than its start"
        );
        assert_eq!(fit.boundaries().len(), (1 << bits) - 1);
    }
    assert!(Codebook::fitted(64, 2, &[], 10).is_err());
    assert!(Codebook::fitted(64, 2, &[f32::NAN], 10).is_err());
}
