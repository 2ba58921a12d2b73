//! The flattened GPU tables reproduce the quantizer: a quantizer run from the tables alone, step
//! by step as kernels/quantize_append.cu does, writes the same records as
//! `VectorQuantizer::quantize` (codes may differ at exact boundary ties, counted and bounded).
mod common;
use common::{fresh_seed, gaussian_vec, layer_heads};
use tqkv::device_tables::LayerTables;
use tqkv::rng::Rng;
use tqkv::{QuantSpec, VectorQuantizer};

#[test]
fn tables_reproduce_the_quantizer_records() {
    let mut rng = Rng::new(fresh_seed("device_tables"));
    for (bits, mode, rot, d) in [
        ("4", "mse", "dense", 64usize),
        ("3.5", "mse", "dense", 128),
        ("2.5", "prod", "hadamard", 128),
        ("3", "prod-orth", "dense", 96),
        ("1", "prod", "dense", 64),
        ("33@4+66@3", "mse", "dense", 99),
        ("3.5", "mse-projected", "hadamard", 64),
        ("2", "prod-projected", "dense", 64),
        ("1.5", "mse-projected-log8", "hadamard", 64),
        ("3", "prod-log8", "dense", 96),
        ("3", "mse-ls", "dense", 64),
        ("2.5", "prod-ls-log8", "hadamard", 128),
    ] {
        // Three heads with different outlier channels, one layer seed.
        let heads = layer_heads(&mut rng, (bits, mode, rot), d, 3, 0.5);
        let t = LayerTables::new(&heads).unwrap();
        assert_eq!(t.channels.len(), 3 * d);
        assert_eq!(t.record_bytes, heads[0].record_bytes());
        let (mut differing, mut total) = (0usize, 0usize);
        for (h, q) in heads.iter().enumerate() {
            for _ in 0..50 {
                let x = gaussian_vec(&mut rng, &vec![1.0; d]);
                let mut a = vec![0u8; q.record_bytes()];
                let mut b = vec![0u8; q.record_bytes()];
                q.quantize(&x, &mut a).unwrap();
                t.quantize_like_kernel(h, &x, &mut b);
                total += a.len();
                differing += a.iter().zip(&b).filter(|(x, y)| x != y).count();
            }
        }
        assert!(
            differing * 10_000 <= total,
            "{bits} {mode} {rot} d={d}: {differing}/{total} bytes differ"
        );
    }
    // Heads that differ beyond their channels are refused.
    let a = VectorQuantizer::new(QuantSpec::mse("4".parse().unwrap()), 64, 1).unwrap();
    let b = VectorQuantizer::new(QuantSpec::mse("4".parse().unwrap()), 64, 2).unwrap();
    assert!(LayerTables::new(&[a, b]).is_err());
    assert!(LayerTables::new(&[]).is_err());
}
