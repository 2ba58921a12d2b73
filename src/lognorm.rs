//! 8-bit logarithmic norms ([`crate::NormFormat::Log8`]): a norm n > 0 is stored as the code
//! c = 128 + round(8·log₂ n) in 1..=255 (0 is the norm 0), read back as 2^((c − 128)/8): eight
//! steps per octave, a relative error of at most ±4.4 % (2^(1/16) − 1), over 2^−15.9 … 2^15.9
//! (about f16's range). The relative error adds about 6.5·10⁻⁴ to a vector's relative MSE,
//! which is negligible next to what 1–3-bit codes cost (0.03–0.36).
//!
//! Encoding and decoding use only exact f32 operations (bit fields, comparisons with constant
//! thresholds, a multiplication by a power of two), so the CPU reference and the CUDA kernels
//! (`tq_log8_encode` / `tq_log8_decode` in kernels/tqkv_common.cuh, the same constants) agree
//! bit for bit.

/// 2^(r/8), r = 0..8, as f32 bit patterns.
pub const LOG8_FRAC_BITS: [u32; 8] = [
    0x3f800000, 0x3f8b95c2, 0x3f9837f0, 0x3fa5fed7, 0x3fb504f3, 0x3fc5672a, 0x3fd744fd, 0x3feac0c7,
];

/// The rounding thresholds 2^((2k+1)/16), k = 0..8, of a mantissa in [1, 2), as f32 bits.
pub const LOG8_THRESH_BITS: [u32; 8] = [
    0x3f85aac3, 0x3f91c3d3, 0x3f9ef532, 0x3fad583f, 0x3fbd08a4, 0x3fce248c, 0x3fe0ccdf, 0x3ff5257d,
];

/// The code of norm `v` (≥ 0): `None` when it is not finite, negative, or above the largest
/// code's 2^(127/8) ≈ 60 000 (rounded); norms below the smallest code's 2^(−127/8) get code 1.
pub fn log8_encode(v: f32) -> Option<u8> {
    if !(v.is_finite() && v >= 0.0) {
        return None;
    }
    if v == 0.0 {
        return Some(0);
    }
    if v < f32::MIN_POSITIVE {
        return Some(1);
    }
    let bits = v.to_bits();
    let e = ((bits >> 23) & 0xff) as i32 - 127;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    let r = LOG8_THRESH_BITS
        .iter()
        .filter(|&&t| m >= f32::from_bits(t))
        .count() as i32;
    let c = 128 + 8 * e + r;
    if c > 255 {
        None
    } else {
        Some(c.max(1) as u8)
    }
}

/// The norm of code `c`.
pub fn log8_decode(c: u8) -> f32 {
    if c == 0 {
        return 0.0;
    }
    let k = c as i32 - 128;
    f32::from_bits(LOG8_FRAC_BITS[k.rem_euclid(8) as usize]) * 2f32.powi(k.div_euclid(8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_are_the_powers_they_name() {
        for r in 0..8 {
            let f = f32::from_bits(LOG8_FRAC_BITS[r]) as f64;
            assert!((f - 2f64.powf(r as f64 / 8.0)).abs() < 1e-7, "frac {r}");
            let t = f32::from_bits(LOG8_THRESH_BITS[r]) as f64;
            assert!(
                (t - 2f64.powf((2 * r + 1) as f64 / 16.0)).abs() < 1e-7,
                "thresh {r}"
            );
        }
    }

    /// Every code decodes to 2^((c−128)/8) and encodes back to itself; random norms over the
    /// whole range come back within the half-step bound, at the nearest code in log₂.
    #[test]
    fn log8_round_trips_within_half_a_step() {
        for c in 1..=255u8 {
            let v = log8_decode(c);
            let want = 2f64.powf((c as f64 - 128.0) / 8.0);
            assert!(
                (v as f64 / want - 1.0).abs() < 1e-6,
                "code {c}: {v} vs {want}"
            );
            assert_eq!(log8_encode(v), Some(c), "code {c}");
        }
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        eprintln!("log8 norms: seed {seed}");
        let mut rng = crate::rng::Rng::new(seed);
        let bound = 2f64.powf(1.0 / 16.0) - 1.0 + 1e-6;
        for _ in 0..100_000 {
            let v = 2f64.powf(rng.uniform() * 31.5 - 15.75) as f32;
            let c = log8_encode(v).unwrap();
            let back = log8_decode(c) as f64;
            let rel = (back / v as f64 - 1.0).abs();
            assert!(rel <= bound, "{v}: code {c} → {back}, relative error {rel}");
            let exact = 128.0 + 8.0 * (v as f64).log2();
            assert!(
                (c as f64 - exact).abs() <= 0.5 + 1e-5,
                "{v}: code {c} vs {exact}"
            );
        }
        assert_eq!(log8_encode(0.0), Some(0));
        assert_eq!(log8_decode(0), 0.0);
        assert_eq!(log8_encode(1e-30), Some(1));
        assert_eq!(log8_encode(1e6), None);
        assert_eq!(log8_encode(f32::NAN), None);
        assert_eq!(log8_encode(-1.0), None);
        assert_eq!(log8_encode(f32::INFINITY), None);
    }
}
