//! Bit packing of b-bit codes and sign bits (the packed format of docs/FORMAT.md).
//!
//! A run of n codes of b bits (1 ≤ b ≤ 8) is one little-endian bit stream: code j occupies
//! stream bits [j·b, (j+1)·b), least significant bit first, and stream bit i is bit (i mod 8) of
//! byte ⌊i/8⌋. The run takes ⌈n·b/8⌉ bytes; unused high bits of the last byte are zero.
//! Sign bits are 1-bit codes with 1 ↔ +1 and 0 ↔ −1.

use crate::error::{check_len, Error, Result};

/// Bytes taken by `n` codes of `bits` bits.
pub fn packed_len(n: usize, bits: u8) -> usize {
    (n * bits as usize).div_ceil(8)
}

/// Packs `codes` (each < 2^bits) into `out` (exactly [`packed_len`] bytes).
pub fn pack_codes(codes: &[u8], bits: u8, out: &mut [u8]) -> Result<()> {
    check_pack_bits(bits)?;
    check_len("packed codes", out.len(), packed_len(codes.len(), bits))?;
    if let Some(i) = codes.iter().position(|&c| bits < 8 && c >> bits != 0) {
        return Err(Error::Config(format!(
            "code {} at index {i} does not fit in {bits} bits",
            codes[i]
        )));
    }
    pack_codes_unchecked(codes, bits, out);
    Ok(())
}

/// Unpacks `out.len()` codes of `bits` bits from `packed`.
pub fn unpack_codes(packed: &[u8], bits: u8, out: &mut [u8]) -> Result<()> {
    check_pack_bits(bits)?;
    check_len("packed codes", packed.len(), packed_len(out.len(), bits))?;
    unpack_codes_unchecked(packed, bits, out);
    Ok(())
}

fn check_pack_bits(bits: u8) -> Result<()> {
    if (1..=8).contains(&bits) {
        Ok(())
    } else {
        Err(Error::UnsupportedBits {
            bits: bits.to_string(),
            supported: "1..=8 for packing",
        })
    }
}

#[inline(always)]
pub(crate) fn pack_codes_unchecked(codes: &[u8], bits: u8, out: &mut [u8]) {
    out.iter_mut().for_each(|b| *b = 0);
    match bits {
        8 => out.copy_from_slice(codes),
        // 8 codes of b bits are b whole bytes: one word per 8 codes.
        3 | 5 | 6 | 7 => {
            let b = bits as usize;
            for (j, chunk) in codes.chunks(8).enumerate() {
                let mut w = 0u64;
                for (k, &c) in chunk.iter().enumerate() {
                    w |= (c as u64) << (k * b);
                }
                let bytes = w.to_le_bytes();
                let start = j * b;
                let len = (chunk.len() * b).div_ceil(8);
                out[start..start + len].copy_from_slice(&bytes[..len]);
            }
        }
        1 | 2 | 4 => {
            let per = 8 / bits as usize;
            for (byte, chunk) in out.iter_mut().zip(codes.chunks(per)) {
                let mut v = 0u8;
                for (k, &c) in chunk.iter().enumerate() {
                    v |= c << (k * bits as usize);
                }
                *byte = v;
            }
        }
        _ => {
            let b = bits as usize;
            for (j, &c) in codes.iter().enumerate() {
                let bit = j * b;
                let (byte, shift) = (bit / 8, bit % 8);
                let wide = (c as u16) << shift;
                out[byte] |= wide as u8;
                if shift + b > 8 {
                    out[byte + 1] |= (wide >> 8) as u8;
                }
            }
        }
    }
}

pub(crate) fn unpack_codes_unchecked(packed: &[u8], bits: u8, out: &mut [u8]) {
    match bits {
        8 => out.copy_from_slice(packed),
        1 | 2 | 4 => {
            let per = 8 / bits as usize;
            let mask = (1u8 << bits) - 1;
            for (chunk, &byte) in out.chunks_mut(per).zip(packed) {
                for (k, c) in chunk.iter_mut().enumerate() {
                    *c = (byte >> (k * bits as usize)) & mask;
                }
            }
        }
        _ => {
            let b = bits as usize;
            let mask = (1u16 << b) - 1;
            for (j, c) in out.iter_mut().enumerate() {
                let bit = j * b;
                let (byte, shift) = (bit / 8, bit % 8);
                let mut wide = packed[byte] as u16;
                if shift + b > 8 {
                    wide |= (packed[byte + 1] as u16) << 8;
                }
                *c = ((wide >> shift) & mask) as u8;
            }
        }
    }
}
