//! The instruction sets of the CPU attention kernel ([`crate::cpu_attention`]) and the
//! primitives it is built from: unpacking b-bit codes straight into scaled codebook values,
//! dot products, `y += a·x`, and a vectorisable `exp`.
//!
//! One generic body is compiled once per [`Isa`]: the x86-64 AVX2 + FMA copy runs under
//! `#[target_feature]`, where the plain loops below vectorise to 256-bit instructions and the
//! code unpacking uses `vpsrlvd` + `vpermps` (a codebook of ≤ 16 entries lives in two
//! registers); the scalar copy is portable Rust (the compiler vectorises its loops with the
//! target's baseline: SSE2 on x86-64, NEON on aarch64). [`Isa::detect`] picks the best the
//! machine runs (`TQKV_CPU_ISA=scalar` forces the portable one); tests run every entry of
//! [`Isa::available`] against the scalar reference.

use std::sync::OnceLock;

/// A code path of the CPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust (whatever the compiler's baseline target vectorises).
    Scalar,
    /// x86-64 AVX2 + FMA + F16C, detected at run time.
    Avx2,
}

impl Isa {
    /// The best path this machine runs, once per process; `TQKV_CPU_ISA=scalar` (or `avx2`,
    /// when available) overrides it.
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let avail = Isa::available();
            let forced = std::env::var("TQKV_CPU_ISA").ok();
            match forced.as_deref() {
                Some(name) => avail
                    .iter()
                    .copied()
                    .find(|i| i.name() == name)
                    .unwrap_or(Isa::Scalar),
                None => *avail.last().unwrap_or(&Isa::Scalar),
            }
        })
    }

    /// Every path this machine runs, the portable one first.
    pub fn available() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            v.push(Isa::Avx2);
        }
        v
    }

    /// `scalar` or `avx2`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
        }
    }
}

/// Code unpacking, the one primitive written per ISA (the rest are plain loops, vectorised by
/// the compiler in the ISA's context).
pub(crate) trait Unpack: Copy {
    /// Whether `a·b + c` is one fused instruction here (else it is a multiply and an add:
    /// `f32::mul_add` without FMA hardware is a slow library call).
    const FMA: bool;
    /// `out[j] = scale · table[code_j]` for every j < out.len(), the codes a little-endian
    /// stream of `B`-bit fields from `packed` (docs/FORMAT.md; ⌈len·B/8⌉ bytes). `table` holds
    /// at least 2^B entries (16 when B ≤ 4).
    fn unpack<const B: usize>(self, packed: &[u8], table: &[f32], scale: f32, out: &mut [f32]);

    /// `out[j]` = the little-endian f16 at `src[2j..2j + 2]`.
    fn f16_row(self, src: &[u8], out: &mut [f32]) {
        f16_row_scalar(src, out, 0);
    }

    /// A q8_0 vector (`out.len()` codes, then one f16 scale per block of 32) decoded as the
    /// kernels do: `f16((code − 128) · scale)` ([`crate::paged::ExactTiles::decode_row`]).
    fn q8_row(self, src: &[u8], out: &mut [f32]) {
        q8_row_scalar(src, out, 0);
    }

    /// `outs[v] = M xs[v]` for V vectors (M row-major n×n, every slice n long), each row
    /// summed as [`crate::rotation::dot`] sums it (a multiply and an add per lane, not fused):
    /// the same values as [`crate::rotation::matvec`] per vector, on every ISA.
    fn matvec_many<const V: usize>(m: &[f32], n: usize, xs: [&[f32]; V], outs: [&mut [f32]; V]) {
        for (x, o) in xs.into_iter().zip(outs) {
            crate::rotation::matvec(m, n, x, o);
        }
    }

    /// The dot products of G query rows with K key rows (rows at least as long as `k[0]`),
    /// each summed as [`dot`] sums it (the same value), every key chunk loaded once for all
    /// the queries.
    fn dots<const G: usize, const K: usize>(q: [&[f32]; G], k: [&[f32]; K]) -> [[f32; K]; G] {
        let w = k[0].len();
        let mut out = [[0.0f32; K]; G];
        for g in 0..G {
            for kk in 0..K {
                out[g][kk] = dot::<ScalarUnpack>(&q[g][..w], &k[kk][..w]);
            }
        }
        out
    }
}

/// [`Unpack::f16_row`] of `out[from..]`.
#[inline(always)]
fn f16_row_scalar(src: &[u8], out: &mut [f32], from: usize) {
    for (j, o) in out.iter_mut().enumerate().skip(from) {
        *o = half::f16::from_le_bytes([src[2 * j], src[2 * j + 1]]).to_f32();
    }
}

/// [`Unpack::q8_row`] of `out[from..]`.
#[inline(always)]
fn q8_row_scalar(src: &[u8], out: &mut [f32], from: usize) {
    let d = out.len();
    for (j, o) in out.iter_mut().enumerate().skip(from) {
        let b = d + 2 * (j / crate::ExactFormat::Q8_BLOCK);
        let s = half::f16::from_le_bytes([src[b], src[b + 1]]).to_f32();
        *o = half::f16::from_f32((src[j] as f32 - 128.0) * s).to_f32();
    }
}

/// The portable unpacker.
#[derive(Clone, Copy)]
pub(crate) struct ScalarUnpack;

/// Little-endian value of up to 8 bytes.
#[inline(always)]
fn read_le(b: &[u8]) -> u64 {
    let mut w = 0u64;
    for (i, &x) in b.iter().enumerate().take(8) {
        w |= (x as u64) << (8 * i);
    }
    w
}

impl Unpack for ScalarUnpack {
    const FMA: bool = false;
    #[inline(always)]
    fn unpack<const B: usize>(self, packed: &[u8], table: &[f32], scale: f32, out: &mut [f32]) {
        unpack_scalar::<B>(packed, table, scale, out, 0);
    }
}

/// The scalar unpacking of codes `from..out.len()` (8 codes = B whole bytes, so `from` is a
/// multiple of 8 and the stream restarts at byte `from / 8 · B`).
#[inline(always)]
fn unpack_scalar<const B: usize>(
    packed: &[u8],
    table: &[f32],
    scale: f32,
    out: &mut [f32],
    from: usize,
) {
    let mask = (1u64 << B) - 1;
    let mut j = from;
    while j < out.len() {
        let take = (out.len() - j).min(8);
        let byte = j / 8 * B;
        let w = read_le(&packed[byte..(byte + (take * B).div_ceil(8)).min(packed.len())]);
        for k in 0..take {
            out[j + k] = scale * table[((w >> (k * B)) & mask) as usize];
        }
        j += take;
    }
}

/// The AVX2 unpacker (only constructed where [`Isa::Avx2`] was detected).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Avx2Unpack;

#[cfg(target_arch = "x86_64")]
impl Unpack for Avx2Unpack {
    const FMA: bool = true;
    #[inline(always)]
    fn unpack<const B: usize>(self, packed: &[u8], table: &[f32], scale: f32, out: &mut [f32]) {
        if B > 4 {
            return unpack_scalar::<B>(packed, table, scale, out, 0);
        }
        // SAFETY: Avx2Unpack exists only where AVX2 was detected; every load and store below
        // is inside `packed` / `table` (16 entries for B ≤ 4) / `out`.
        unsafe { unpack_avx2::<B>(packed, table, scale, out) }
    }

    #[inline(always)]
    fn f16_row(self, src: &[u8], out: &mut [f32]) {
        // SAFETY: AVX2 + F16C detected; loads of 16 bytes at 2j for j + 8 ≤ out.len() ≤
        // src.len() / 2, stores of 8 floats inside `out`.
        unsafe {
            use std::arch::x86_64::*;
            let full = out.len() / 8;
            for k in 0..full {
                let h = _mm_loadu_si128(src.as_ptr().add(16 * k) as *const __m128i);
                _mm256_storeu_ps(out.as_mut_ptr().add(8 * k), _mm256_cvtph_ps(h));
            }
            f16_row_scalar(src, out, full * 8);
        }
    }

    #[inline(always)]
    fn q8_row(self, src: &[u8], out: &mut [f32]) {
        // SAFETY: AVX2 + F16C detected; 8 code bytes at j < out.len() (codes come first),
        // stores inside `out`.
        unsafe {
            use std::arch::x86_64::*;
            let d = out.len();
            let full = d / 8;
            let off = _mm256_set1_ps(128.0);
            for k in 0..full {
                let j = 8 * k;
                let b = d + 2 * (j / crate::ExactFormat::Q8_BLOCK);
                let s = half::f16::from_le_bytes([src[b], src[b + 1]]).to_f32();
                let c = _mm_loadl_epi64(src.as_ptr().add(j) as *const __m128i);
                let x = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c));
                let y = _mm256_mul_ps(_mm256_sub_ps(x, off), _mm256_set1_ps(s));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y);
                _mm256_storeu_ps(out.as_mut_ptr().add(j), _mm256_cvtph_ps(h));
            }
            q8_row_scalar(src, out, full * 8);
        }
    }

    #[inline(always)]
    fn dots<const G: usize, const K: usize>(q: [&[f32]; G], k: [&[f32]; K]) -> [[f32; K]; G] {
        // SAFETY: Avx2Unpack exists only where AVX2 and FMA were detected.
        unsafe { dots_avx2::<G, K>(q, k) }
    }

    #[inline(always)]
    fn matvec_many<const V: usize>(m: &[f32], n: usize, xs: [&[f32]; V], outs: [&mut [f32]; V]) {
        // SAFETY: Avx2Unpack exists only where AVX2 was detected.
        unsafe { matvec_many_avx2::<V>(m, n, xs, outs) }
    }
}

/// [`Unpack::matvec_many`]: two rows of M against V vectors per pass (2·V accumulators in
/// registers, each row chunk and vector chunk loaded once per pass), multiply then add per
/// lane, and [`crate::rotation::dot`]'s order of the final sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn matvec_many_avx2<const V: usize>(
    m: &[f32],
    n: usize,
    xs: [&[f32]; V],
    outs: [&mut [f32]; V],
) {
    use std::arch::x86_64::*;
    assert!(m.len() >= n * n);
    for v in 0..V {
        assert!(xs[v].len() >= n && outs[v].len() >= n);
    }
    let full = n / 8 * 8;
    // `dot`'s sum of the eight lanes, then the tail of the row.
    let finish = |a: __m256, row: &[f32], x: &[f32]| -> f32 {
        let mut l = [0.0f32; 8];
        // SAFETY: l holds 8 floats.
        unsafe { _mm256_storeu_ps(l.as_mut_ptr(), a) };
        let mut s = 0.0f32;
        for c in full..n {
            s += row[c] * x[c];
        }
        (l[0] + l[4]) + (l[1] + l[5]) + (l[2] + l[6]) + (l[3] + l[7]) + s
    };
    let mut i = 0;
    while i < n {
        let two = i + 1 < n;
        let r0 = &m[i * n..(i + 1) * n];
        let r1 = if two {
            &m[(i + 1) * n..(i + 2) * n]
        } else {
            r0
        };
        let mut a0 = [_mm256_setzero_ps(); V];
        let mut a1 = [_mm256_setzero_ps(); V];
        let mut c = 0;
        while c < full {
            // SAFETY: c + 8 ≤ full ≤ n, the length of r0, r1 and every xs[v].
            let w0 = _mm256_loadu_ps(r0.as_ptr().add(c));
            let w1 = _mm256_loadu_ps(r1.as_ptr().add(c));
            for v in 0..V {
                let xv = _mm256_loadu_ps(xs[v].as_ptr().add(c));
                a0[v] = _mm256_add_ps(a0[v], _mm256_mul_ps(w0, xv));
                a1[v] = _mm256_add_ps(a1[v], _mm256_mul_ps(w1, xv));
            }
            c += 8;
        }
        for v in 0..V {
            outs[v][i] = finish(a0[v], r0, xs[v]);
            if two {
                outs[v][i + 1] = finish(a1[v], r1, xs[v]);
            }
        }
        i += 2;
    }
}

/// [`Unpack::dots`] with 8-lane FMAs, G·K accumulators in registers, and [`dot`]'s order of
/// the final sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dots_avx2<const G: usize, const K: usize>(
    q: [&[f32]; G],
    k: [&[f32]; K],
) -> [[f32; K]; G] {
    use std::arch::x86_64::*;
    let w = k[0].len();
    let q: [&[f32]; G] = q.map(|x| &x[..w]);
    let k: [&[f32]; K] = k.map(|x| &x[..w]);
    let full = w / 8 * 8;
    let mut acc = [[_mm256_setzero_ps(); K]; G];
    let mut c = 0;
    while c < full {
        // SAFETY: c + 8 ≤ full ≤ w, the length of every row.
        let kv: [__m256; K] = std::array::from_fn(|kk| _mm256_loadu_ps(k[kk].as_ptr().add(c)));
        for g in 0..G {
            let qv = _mm256_loadu_ps(q[g].as_ptr().add(c));
            for kk in 0..K {
                acc[g][kk] = _mm256_fmadd_ps(qv, kv[kk], acc[g][kk]);
            }
        }
        c += 8;
    }
    let mut out = [[0.0f32; K]; G];
    for g in 0..G {
        for kk in 0..K {
            let mut s = 0.0f32;
            for c in full..w {
                s = q[g][c].mul_add(k[kk][c], s);
            }
            // ((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7)), as `dot` sums.
            let a = acc[g][kk];
            let v = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
            let p = _mm_add_ps(v, _mm_shuffle_ps::<0b10_11_00_01>(v, v));
            let r = _mm_cvtss_f32(_mm_add_ss(p, _mm_movehl_ps(p, p)));
            out[g][kk] = r + s;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn unpack_avx2<const B: usize>(packed: &[u8], table: &[f32], scale: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let b = B as i32;
    let shifts = _mm256_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b);
    let mask = _mm256_set1_epi32((1 << B) - 1);
    debug_assert!(table.len() >= 16);
    let lo = _mm256_loadu_ps(table.as_ptr());
    let hi = _mm256_loadu_ps(table.as_ptr().add(8));
    let sv = _mm256_set1_ps(scale);
    let full = out.len() / 8;
    for k in 0..full {
        let w = read_le(&packed[k * B..k * B + B]) as u32 as i32;
        let idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w), shifts), mask);
        let v = if B == 4 {
            let a = _mm256_permutevar8x32_ps(lo, idx);
            let c = _mm256_permutevar8x32_ps(hi, idx);
            _mm256_blendv_ps(a, c, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)))
        } else {
            _mm256_permutevar8x32_ps(lo, idx)
        };
        _mm256_storeu_ps(out.as_mut_ptr().add(8 * k), _mm256_mul_ps(v, sv));
    }
    unpack_scalar::<B>(packed, table, scale, out, full * 8);
}

/// `a·b + c`, fused where the ISA has it.
#[inline(always)]
pub(crate) fn mad<U: Unpack>(a: f32, b: f32, c: f32) -> f32 {
    if U::FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Dot product (8 lanes, vectorised in the caller's ISA).
#[inline(always)]
pub(crate) fn dot<U: Unpack>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] = mad::<U>(x[k], y[k], acc[k]);
        }
    }
    let mut s = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        s = mad::<U>(*x, *y, s);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + s
}

/// Σ x² in f64 with four partial sums (vectorises; the same value on every code path).
#[inline(always)]
pub(crate) fn sumsq64(x: &[f32]) -> f64 {
    let mut acc = [0.0f64; 4];
    let c = x.chunks_exact(4);
    let r = c.remainder();
    for v in c {
        for k in 0..4 {
            acc[k] += v[k] as f64 * v[k] as f64;
        }
    }
    let mut s = (acc[0] + acc[2]) + (acc[1] + acc[3]);
    for &v in r {
        s += v as f64 * v as f64;
    }
    s
}

/// `y += a · x`.
#[inline(always)]
pub(crate) fn axpy<U: Unpack>(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = mad::<U>(a, x, *y);
    }
}

/// e^x for x ≤ 0 (Cephes' `expf` polynomial, ≤ 2 ulp on [−87, 0]; below −87 it returns
/// ~1e−38, which a softmax treats as 0). Branch-free, so a loop of it vectorises.
#[inline(always)]
pub(crate) fn exp_neg<U: Unpack>(x: f32) -> f32 {
    let x = x.clamp(-87.0, 0.0);
    // n = round(x / ln 2) by the 1.5·2^23 trick (exact for |x/ln 2| < 2^22).
    let magic = 12_582_912.0f32;
    let n = (x * std::f32::consts::LOG2_E + magic) - magic;
    let r = mad::<U>(n, -0.693_359_4, x);
    let r = mad::<U>(n, 2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4f32;
    p = mad::<U>(p, r, 1.398_199_9e-3);
    p = mad::<U>(p, r, 8.333_452e-3);
    p = mad::<U>(p, r, 4.166_579_6e-2);
    p = mad::<U>(p, r, 1.666_666_5e-1);
    p = mad::<U>(p, r, 0.5);
    let y = mad::<U>(p, r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packing::pack_codes;
    use crate::rng::Rng;

    /// A fresh seed per run (printed by the tests that use it).
    fn test_seed() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(7, |d| d.as_nanos() as u64)
    }

    fn unpack_with<U: Unpack>(u: U, bits: u8, packed: &[u8], table: &[f32], out: &mut [f32]) {
        match bits {
            1 => u.unpack::<1>(packed, table, 0.5, out),
            2 => u.unpack::<2>(packed, table, 0.5, out),
            3 => u.unpack::<3>(packed, table, 0.5, out),
            4 => u.unpack::<4>(packed, table, 0.5, out),
            5 => u.unpack::<5>(packed, table, 0.5, out),
            8 => u.unpack::<8>(packed, table, 0.5, out),
            _ => unreachable!(),
        }
    }

    #[test]
    fn unpack_matches_codes_on_every_isa() {
        let seed = test_seed();
        println!("seed {seed}");
        let mut rng = Rng::new(seed);
        for bits in [1u8, 2, 3, 4, 5, 8] {
            for n in [1usize, 7, 8, 9, 16, 33, 64, 99, 128] {
                let codes: Vec<u8> = (0..n)
                    .map(|_| (rng.next_u64() % (1u64 << bits)) as u8)
                    .collect();
                let mut packed = vec![0u8; crate::packing::packed_len(n, bits)];
                pack_codes(&codes, bits, &mut packed).unwrap();
                let table: Vec<f32> = (0..(1usize << bits).max(16))
                    .map(|i| i as f32 * 1.5 - 3.0)
                    .collect();
                let want: Vec<f32> = codes.iter().map(|&c| 0.5 * table[c as usize]).collect();
                for isa in Isa::available() {
                    let mut out = vec![f32::NAN; n];
                    match isa {
                        Isa::Scalar => unpack_with(ScalarUnpack, bits, &packed, &table, &mut out),
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx2 => unpack_with(Avx2Unpack, bits, &packed, &table, &mut out),
                        #[cfg(not(target_arch = "x86_64"))]
                        Isa::Avx2 => unreachable!(),
                    }
                    assert_eq!(out, want, "{} bits {bits} n {n} (seed {seed})", isa.name());
                }
            }
        }
    }

    #[test]
    fn exp_neg_matches_f64() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -(i as f32) * 87.0 / 200_000.0;
            let want = (x as f64).exp();
            let got = exp_neg::<ScalarUnpack>(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp_neg::<ScalarUnpack>(0.0), 1.0);
        assert!(exp_neg::<ScalarUnpack>(-1000.0) < 1e-37);
    }

    #[test]
    fn dot_matches_f64() {
        let seed = test_seed();
        let mut rng = Rng::new(seed);
        for n in [1usize, 7, 64, 99] {
            let a: Vec<f32> = (0..n).map(|_| rng.gaussian() as f32).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.gaussian() as f32).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!(
                (dot::<ScalarUnpack>(&a, &b) as f64 - want).abs() < 1e-4 * n as f64,
                "seed {seed}"
            );
        }
    }
}
