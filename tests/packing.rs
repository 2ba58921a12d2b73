//! Bit packing against a naive bit-by-bit reference, on awkward sizes.
mod common;
use proptest::prelude::*;
use tqkv::packing::{pack_codes, packed_len, unpack_codes};

/// Naive reference: stream bit i of code j is bit i of code j, at stream position j·b + i.
fn naive_pack(codes: &[u8], bits: u8) -> Vec<u8> {
    let mut out = vec![0u8; (codes.len() * bits as usize).div_ceil(8)];
    for (j, &c) in codes.iter().enumerate() {
        for i in 0..bits as usize {
            if (c >> i) & 1 == 1 {
                let p = j * bits as usize + i;
                out[p / 8] |= 1 << (p % 8);
            }
        }
    }
    out
}

proptest! {
    #[test]
    fn pack_unpack_identity(bits in 1u8..=8, raw in prop::collection::vec(any::<u8>(), 0..300)) {
        let codes: Vec<u8> = raw.iter().map(|&c| if bits == 8 { c } else { c & ((1 << bits) - 1) }).collect();
        let mut packed = vec![0u8; packed_len(codes.len(), bits)];
        pack_codes(&codes, bits, &mut packed).unwrap();
        prop_assert_eq!(&packed, &naive_pack(&codes, bits));
        let mut back = vec![0u8; codes.len()];
        unpack_codes(&packed, bits, &mut back).unwrap();
        prop_assert_eq!(back, codes);
    }
}

#[test]
fn awkward_sizes_round_trip() {
    let mut rng = tqkv::rng::Rng::new(common::fresh_seed("awkward_sizes_round_trip"));
    for n in [1usize, 7, 99, 128, 129, 1000] {
        for bits in 1u8..=8 {
            let codes: Vec<u8> = (0..n)
                .map(|_| (rng.next_u64() % (1u64 << bits)) as u8)
                .collect();
            let mut packed = vec![0u8; packed_len(n, bits)];
            pack_codes(&codes, bits, &mut packed).unwrap();
            assert_eq!(packed, naive_pack(&codes, bits));
            let mut back = vec![0u8; n];
            unpack_codes(&packed, bits, &mut back).unwrap();
            assert_eq!(back, codes, "n={n} bits={bits}");
        }
    }
}

#[test]
fn packing_errors() {
    let mut out = vec![0u8; 1];
    assert!(pack_codes(&[8, 0], 3, &mut out).is_err()); // 8 needs 4 bits
    assert!(pack_codes(&[1, 0, 1], 3, &mut out).is_err()); // needs 2 bytes
    assert!(pack_codes(&[1], 0, &mut out).is_err());
    assert!(pack_codes(&[1], 9, &mut out).is_err());
    let mut back = vec![0u8; 5];
    assert!(unpack_codes(&[0u8; 1], 2, &mut back).is_err());
    assert_eq!(packed_len(128, 3), 48);
    assert_eq!(packed_len(7, 3), 3);
    assert_eq!(packed_len(1, 1), 1);
}
