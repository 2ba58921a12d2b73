//! Shared helpers of the integration tests.
#![allow(dead_code)]

/// A fresh seed per run (printed, so that a failure can be replayed with TQKV_TEST_SEED).
pub fn fresh_seed(test: &str) -> u64 {
    let seed = match std::env::var("TQKV_TEST_SEED") {
        Ok(s) => s.parse().expect("TQKV_TEST_SEED must be a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    eprintln!("{test}: seed {seed} (replay with TQKV_TEST_SEED={seed})");
    seed
}

/// Gaussian vector with per-channel scales (f64 Box–Muller from the crate's generator).
pub fn gaussian_vec(rng: &mut tqkv::rng::Rng, scales: &[f32]) -> Vec<f32> {
    scales.iter().map(|&s| s * rng.gaussian() as f32).collect()
}

/// f64 dot product.
pub fn dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Random K/V-like data, `n` vectors of `d`: per-channel scales in [0.2, 4.2) and per-channel
/// Gaussian offsets (so channels differ in size and keys have a mean, as in real caches).
pub fn kv_data(rng: &mut tqkv::rng::Rng, n: usize, d: usize) -> Vec<f32> {
    let scales: Vec<f32> = (0..d).map(|_| 0.2 + rng.uniform() as f32 * 4.0).collect();
    let offs: Vec<f32> = (0..d).map(|_| rng.gaussian() as f32).collect();
    (0..n)
        .flat_map(|_| {
            gaussian_vec(rng, &scales)
                .into_iter()
                .zip(&offs)
                .map(|(x, o)| x + o)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Per-head quantizers of one layer as the TurboQuant cache builds them: one spec and layer
/// seed, each head calibrated on 8 Gaussian vectors with its own channel scales drawn from
/// [min_scale, min_scale + 3) (so each head picks different outlier channels). `mode` is a
/// `Mode` name, optionally with `-projected` for `NormRule::Projected` (`-ls` for
/// `NormRule::LeastSquares`) and then `-log8` for
/// `NormFormat::Log8` norms (else f16).
pub fn layer_heads(
    rng: &mut tqkv::rng::Rng,
    (bits, mode, rot): (&str, &str, &str),
    d: usize,
    h: usize,
    min_scale: f32,
) -> Vec<tqkv::VectorQuantizer> {
    let (mode, norm) = match mode.strip_suffix("-log8") {
        Some(m) => (m, tqkv::NormFormat::Log8),
        None => (mode, tqkv::NormFormat::F16),
    };
    let (mode, rule) = if let Some(m) = mode.strip_suffix("-projected") {
        (m, tqkv::NormRule::Projected)
    } else if let Some(m) = mode.strip_suffix("-ls") {
        (m, tqkv::NormRule::LeastSquares)
    } else {
        (mode, tqkv::NormRule::Exact)
    };
    let mut spec = tqkv::QuantSpec::mse(bits.parse().unwrap())
        .with_rotation(rot.parse().unwrap())
        .with_outliers(tqkv::OutlierRule::Magnitude)
        .with_norm_rule(rule)
        .with_norm(norm);
    spec.mode = mode.parse().unwrap();
    let seed = rng.next_u64();
    (0..h)
        .map(|_| {
            let scales: Vec<f32> = (0..d)
                .map(|_| min_scale + rng.uniform() as f32 * 3.0)
                .collect();
            let calib: Vec<f32> = (0..8).flat_map(|_| gaussian_vec(rng, &scales)).collect();
            tqkv::VectorQuantizer::calibrate(spec, d, &calib, seed).unwrap()
        })
        .collect()
}

/// A packed attention case as the kernel tests lay it out: queries `[batch, q_heads, tokens,
/// d]`, records `[batch, kv_heads, cap, record]`, the exact store `[batch, kv_heads, sinks +
/// ring, d]` f16 (position p < sinks at slot p, else `sinks + p % ring`), per query token its
/// visible length and where its records end (`[batch, tokens]`).
pub struct PackedCase<'a> {
    pub q: &'a [f32],
    pub kc: &'a [u8],
    pub vc: &'a [u8],
    pub ek: &'a [half::f16],
    pub ev: &'a [half::f16],
    pub visible: &'a [usize],
    pub packed_end: &'a [usize],
    pub lens: &'a [usize],
    /// (q_heads, kv_heads, tokens, d, cap)
    pub dims: (usize, usize, usize, usize, usize),
    pub sinks: usize,
    pub ring: usize,
    /// Whether the exact store is read (else every position comes from records).
    pub exact: bool,
    pub scale: f32,
}

impl PackedCase<'_> {
    /// The CPU reference (`attend_cycled`) of sequence `bi`, KV head `h`, with its quantizers
    /// (one per rotation of the cycle): the output rows in query-head order
    /// `[tokens][groups][d]`, and the visible length of each row.
    pub fn reference_head(
        &self,
        kq: &[tqkv::VectorQuantizer],
        vq: &[tqkv::VectorQuantizer],
        bi: usize,
        h: usize,
    ) -> (Vec<f32>, Vec<usize>) {
        let (hq, hkv, t, d, cap) = self.dims;
        let g = hq / hkv;
        let (rbk, rbv) = (kq[0].record_bytes(), vq[0].record_bytes());
        let slots = self.sinks + self.ring;
        let n = self.lens[bi];
        let kr = &self.kc[(bi * hkv + h) * cap * rbk..][..n * rbk];
        let vr = &self.vc[(bi * hkv + h) * cap * rbv..][..n * rbv];
        // Rows of this KV head: (t, g) with query head h·G + g.
        let (mut qq, mut vis, mut ends) = (Vec::new(), Vec::new(), Vec::new());
        for ti in 0..t {
            for gi in 0..g {
                let o = ((bi * hq + h * g + gi) * t + ti) * d;
                qq.extend_from_slice(&self.q[o..o + d]);
                vis.push(self.visible[bi * t + ti]);
                ends.push(self.packed_end[bi * t + ti]);
            }
        }
        // The exact rows in position order: sinks, then the positions from the earliest
        // window start on.
        let slot = |p: usize| {
            if p < self.sinks {
                p
            } else {
                self.sinks + p % self.ring.max(1)
            }
        };
        let row = |x: &[half::f16], p: usize| -> Vec<f32> {
            let o = ((bi * hkv + h) * slots + slot(p)) * d;
            x[o..o + d].iter().map(|v| v.to_f32()).collect()
        };
        let lo = ends
            .iter()
            .zip(&vis)
            .filter(|(e, v)| e < v)
            .map(|(&e, _)| e)
            .min()
            .unwrap_or(n);
        let gather = |x: &[half::f16], r: std::ops::Range<usize>| -> Vec<f32> {
            r.flat_map(|p| row(x, p)).collect()
        };
        let s = self.sinks.min(n);
        let (sk, sv) = (gather(self.ek, 0..s), gather(self.ev, 0..s));
        let (wk, wv) = (gather(self.ek, lo..n), gather(self.ev, lo..n));
        let rows = tqkv::attention::ExactRows {
            sinks: self.sinks,
            packed_end: &ends,
            sink_k: &sk,
            sink_v: &sv,
            win_start: lo,
            win_k: &wk,
            win_v: &wv,
        };
        let mut want = vec![0f32; qq.len()];
        tqkv::attention::attend_cycled(
            kq,
            vq,
            &qq,
            kr,
            vr,
            self.exact.then_some(&rows),
            &vis,
            self.scale,
            &mut want,
        )
        .unwrap();
        (want, vis)
    }
}
