//! Seeded random numbers that never change across versions or platforms.
//!
//! Rotations (TurboQuant §3, random rotation Π) and QJL sketches (QJL §3, Gaussian S) are
//! generated on the CPU from a `u64` seed and uploaded; the GPU never re-derives them. To keep a
//! seed meaning the same matrix forever, this module implements its own generators instead of
//! depending on a crate whose streams may change: SplitMix64 for seeding and xoshiro256++ for
//! the stream, Box–Muller for Gaussians (all in f64).

/// SplitMix64 step (Steele, Lea, Flood 2014). Used to expand seeds.
#[inline]
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Mixes a seed with a stream label so that independent objects (a rotation, a sketch, the
/// samples of an experiment) get independent streams from one user seed.
pub fn derive_seed(seed: u64, label: u64) -> u64 {
    let mut s = seed ^ label.wrapping_mul(0xD1B5_4A32_D192_ED03);
    splitmix64(&mut s)
}

/// xoshiro256++ (Blackman, Vigna 2019).
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
    spare: Option<f64>,
}

impl Rng {
    /// A generator whose whole stream is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        Self { s, spare: None }
    }

    /// Next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let result = (self.s[0].wrapping_add(self.s[3]))
            .rotate_left(23)
            .wrapping_add(self.s[0]);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    #[inline]
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal N(0, 1) (Box–Muller, both outputs used).
    pub fn gaussian(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        // u1 in (0, 1] so that ln(u1) is finite.
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
        self.spare = Some(r * s);
        r * c
    }

    /// A random sign, ±1.
    #[inline]
    pub fn sign(&mut self) -> f64 {
        if self.next_u64() >> 63 == 0 {
            1.0
        } else {
            -1.0
        }
    }

    /// Fills `out` with a vector drawn uniformly from the unit sphere.
    pub fn unit_vector(&mut self, out: &mut [f32]) {
        loop {
            let mut n2 = 0.0f64;
            let g: Vec<f64> = (0..out.len()).map(|_| self.gaussian()).collect();
            for v in &g {
                n2 += v * v;
            }
            if n2 > 0.0 {
                let inv = 1.0 / n2.sqrt();
                for (o, v) in out.iter_mut().zip(&g) {
                    *o = (v * inv) as f32;
                }
                return;
            }
        }
    }
}
