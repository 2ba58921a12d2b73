//! Attention from packed records against exact attention over the dequantized vectors, and
//! exact attention against a naive f64 implementation.
mod common;
use common::{fresh_seed, gaussian_vec};
use tqkv::attention::{attend_exact, attend_packed};
use tqkv::rng::Rng;
use tqkv::{OutlierRule, QuantSpec, VectorQuantizer};

fn naive(q: &[f32], k: &[f32], v: &[f32], d: usize, vis: &[usize], scale: f64) -> Vec<f64> {
    let mut out = vec![0.0f64; vis.len() * d];
    for (i, &n) in vis.iter().enumerate() {
        let s: Vec<f64> = (0..n)
            .map(|j| {
                scale
                    * (0..d)
                        .map(|c| q[i * d + c] as f64 * k[j * d + c] as f64)
                        .sum::<f64>()
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        for j in 0..n {
            let p = (s[j] - m).exp() / z;
            for c in 0..d {
                out[i * d + c] += p * v[j * d + c] as f64;
            }
        }
    }
    out
}

#[test]
fn exact_attention_matches_naive_f64() {
    let mut rng = Rng::new(fresh_seed("exact_attention"));
    for (d, n, nq) in [(64usize, 1usize, 1usize), (64, 7, 3), (128, 99, 5)] {
        let q = gaussian_vec(&mut rng, &vec![1.0; nq * d]);
        let k = gaussian_vec(&mut rng, &vec![1.0; n * d]);
        let v = gaussian_vec(&mut rng, &vec![1.0; n * d]);
        let vis: Vec<usize> = (0..nq)
            .map(|i| {
                if i == 0 {
                    0
                } else {
                    1 + (rng.next_u64() as usize) % n
                }
            })
            .collect();
        let mut out = vec![f32::NAN; nq * d];
        attend_exact(&q, &k, &v, d, &vis, 0.125, &mut out).unwrap();
        let want = naive(&q, &k, &v, d, &vis, 0.125);
        for (a, b) in out.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
        assert!(
            out[..d].iter().all(|&x| x == 0.0),
            "a query that sees nothing gets zeros"
        );
    }
}

#[test]
fn packed_attention_equals_exact_attention_on_the_dequantized_cache() {
    let mut rng = Rng::new(fresh_seed("packed_attention"));
    for (bits, mode, d, n) in [
        ("4", "mse", 64usize, 33usize),
        ("3.5", "mse", 128, 99),
        ("2.5", "prod", 64, 7),
        ("3", "prod-orth", 96, 50),
        ("1", "prod", 64, 1),
    ] {
        let mut spec = QuantSpec::mse(bits.parse().unwrap()).with_outliers(OutlierRule::Fixed);
        spec.mode = mode.parse().unwrap();
        let kq = VectorQuantizer::new(spec, d, rng.next_u64()).unwrap();
        let vq = VectorQuantizer::new(
            QuantSpec::mse(bits.parse().unwrap()).with_outliers(OutlierRule::Fixed),
            d,
            rng.next_u64(),
        )
        .unwrap();
        let nq = 4;
        let q = gaussian_vec(&mut rng, &vec![0.3; nq * d]);
        let k = gaussian_vec(&mut rng, &vec![1.0; n * d]);
        let v = gaussian_vec(&mut rng, &vec![1.0; n * d]);
        let mut kr = vec![0u8; n * kq.record_bytes()];
        let mut vr = vec![0u8; n * vq.record_bytes()];
        let (mut kh, mut vh) = (vec![0.0f32; n * d], vec![0.0f32; n * d]);
        for t in 0..n {
            let (a, b) = (t * kq.record_bytes(), (t + 1) * kq.record_bytes());
            kq.quantize(&k[t * d..(t + 1) * d], &mut kr[a..b]).unwrap();
            kq.dequantize(&kr[a..b], &mut kh[t * d..(t + 1) * d])
                .unwrap();
            let (a, b) = (t * vq.record_bytes(), (t + 1) * vq.record_bytes());
            vq.quantize(&v[t * d..(t + 1) * d], &mut vr[a..b]).unwrap();
            vq.dequantize(&vr[a..b], &mut vh[t * d..(t + 1) * d])
                .unwrap();
        }
        let vis: Vec<usize> = (0..nq).map(|i| n - (i % n.max(1)).min(n - 1)).collect();
        let scale = 1.0 / (d as f32).sqrt();
        let mut got = vec![0.0f32; nq * d];
        attend_packed(&kq, &vq, &q, &kr, &vr, &vis, scale, &mut got).unwrap();
        let mut want = vec![0.0f32; nq * d];
        attend_exact(&q, &kh, &vh, d, &vis, scale, &mut want).unwrap();
        let num: f32 = got.iter().zip(&want).map(|(a, b)| (a - b).powi(2)).sum();
        let den: f32 = want.iter().map(|b| b * b).sum();
        assert!(
            (num / den).sqrt() < 1e-4,
            "{bits} {mode} d={d} n={n}: rel err {}",
            (num / den).sqrt()
        );
    }
}
