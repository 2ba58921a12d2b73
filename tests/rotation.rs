//! Rotations: orthogonality, agreement with their matrices, determinism, Haar statistics, errors.
mod common;
use common::{dot64, fresh_seed};
use tqkv::rng::Rng;
use tqkv::{Error, Rotation, RotationKind};

fn check_orthogonal(r: &Rotation, tol: f64) {
    let d = r.dim();
    let m = r.to_matrix();
    for i in 0..d {
        for j in 0..d {
            let p = dot64(&m[i * d..(i + 1) * d], &m[j * d..(j + 1) * d]);
            let want = if i == j { 1.0 } else { 0.0 };
            assert!(
                (p - want).abs() < tol,
                "{:?} d={d}: (ΠΠᵀ)[{i}][{j}] = {p}",
                r.kind()
            );
        }
    }
}

#[test]
fn rotations_are_orthogonal_and_match_their_matrices() {
    let seed = fresh_seed("rotations_are_orthogonal");
    let mut rng = Rng::new(seed);
    let cases = [
        (
            RotationKind::Dense,
            vec![1usize, 2, 7, 64, 80, 96, 99, 128, 256],
        ),
        (
            RotationKind::Hadamard,
            vec![16usize, 48, 64, 80, 96, 128, 256],
        ),
    ];
    for (kind, dims) in cases {
        for d in dims {
            let r = Rotation::new(kind, d, rng.next_u64()).unwrap();
            check_orthogonal(&r, 2e-6);
            let m = r.to_matrix();
            let x: Vec<f32> = (0..d).map(|_| rng.gaussian() as f32).collect();
            let mut y = vec![0.0f32; d];
            r.apply(&x, &mut y).unwrap();
            // Π x against the matrix product in f64.
            for i in 0..d {
                let want = dot64(&m[i * d..(i + 1) * d], &x);
                assert!((y[i] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()));
            }
            // Norm preserved; Πᵀ Π x = x.
            assert!((dot64(&x, &x) - dot64(&y, &y)).abs() < 1e-5 * dot64(&x, &x));
            let mut back = vec![0.0f32; d];
            r.apply_inverse(&y, &mut back).unwrap();
            for (a, b) in x.iter().zip(&back) {
                assert!((a - b).abs() < 1e-5 * (1.0 + a.abs()), "{kind:?} d={d}");
            }
        }
    }
}

#[test]
fn same_seed_same_rotation_other_seed_other_rotation() {
    for kind in [RotationKind::Dense, RotationKind::Hadamard] {
        let a = Rotation::new(kind, 64, 42).unwrap().to_matrix();
        let b = Rotation::new(kind, 64, 42).unwrap().to_matrix();
        let c = Rotation::new(kind, 64, 43).unwrap().to_matrix();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}

#[test]
fn dense_rotations_have_haar_statistics() {
    // For a Haar matrix, each entry has mean 0 and E[Π_ij²] = 1/d; the first column is uniform
    // on the sphere, so E|Π_11| = Γ(d/2)/(√π Γ((d+1)/2)).
    let seed = fresh_seed("dense_rotations_have_haar_statistics");
    let d = 8;
    let n = 4000;
    let (mut s1, mut s2, mut sa, mut diag) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for k in 0..n {
        let m = Rotation::new(RotationKind::Dense, d, seed.wrapping_add(k))
            .unwrap()
            .to_matrix();
        s1 += m[0] as f64;
        s2 += (m[0] as f64).powi(2);
        sa += (m[0] as f64).abs();
        diag += (0..d).map(|i| m[i * d + i] as f64).sum::<f64>();
    }
    let n = n as f64;
    assert!(
        (s1 / n).abs() < 4.0 * (1.0 / d as f64 / n).sqrt(),
        "mean {}",
        s1 / n
    );
    assert!(
        (s2 / n - 1.0 / d as f64).abs() < 0.01,
        "E Π11² = {}",
        s2 / n
    );
    let want = tqkv::qjl::mean_abs_sphere_coord(d);
    assert!(
        (sa / n - want).abs() < 0.012,
        "E|Π11| = {} vs {want}",
        sa / n
    );
    // The trace of a Haar orthogonal matrix has mean 0 (a sign-unfixed QR would bias it).
    assert!((diag / n).abs() < 0.08, "mean trace {}", diag / n);
}

#[test]
fn rotation_errors_are_clear() {
    for d in [7usize, 20, 24, 8] {
        let e = Rotation::new(RotationKind::Hadamard, d, 0).unwrap_err();
        assert!(matches!(e, Error::UnsupportedDim { .. }), "{e}");
        assert!(e.to_string().contains("dense"), "{e}");
    }
    assert!(Rotation::new(RotationKind::Dense, 0, 0).is_err());
    assert!(Rotation::new(RotationKind::Dense, 5000, 0).is_err());
    let r = Rotation::new(RotationKind::Dense, 16, 0).unwrap();
    let mut out = vec![0.0; 16];
    assert!(matches!(
        r.apply(&[0.0; 15], &mut out),
        Err(Error::Shape {
            expected: 16,
            got: 15,
            ..
        })
    ));
    assert!("givens"
        .parse::<RotationKind>()
        .unwrap_err()
        .to_string()
        .contains("dense, hadamard"));
}

#[test]
fn fwht_matches_the_hadamard_matrix_and_the_plain_butterflies() {
    let seed = common::fresh_seed("fwht");
    let mut rng = tqkv::rng::Rng::new(seed);
    for n in [1usize, 2, 4, 8, 16, 32, 64, 128, 256] {
        let x: Vec<f32> = (0..n).map(|_| rng.gaussian() as f32).collect();
        let mut got = x.clone();
        tqkv::rotation::fwht(&mut got);
        // H[i][j] = (−1)^popcount(i & j), in f64.
        for (i, g) in got.iter().enumerate() {
            let want: f64 = x
                .iter()
                .enumerate()
                .map(|(j, &v)| {
                    if (i & j).count_ones() % 2 == 0 {
                        v as f64
                    } else {
                        -(v as f64)
                    }
                })
                .sum();
            assert!(
                (*g as f64 - want).abs() < 1e-4 * (n as f64).sqrt(),
                "n {n} (seed {seed})"
            );
        }
        // The plain butterfly loop: the same additions, so the same bits.
        let mut plain = x.clone();
        let mut h = 1;
        while h < n {
            for i in (0..n).step_by(2 * h) {
                for j in i..i + h {
                    let (a, b) = (plain[j], plain[j + h]);
                    plain[j] = a + b;
                    plain[j + h] = a - b;
                }
            }
            h *= 2;
        }
        assert_eq!(got, plain, "n {n}");
    }
}
