//! Lloyd–Max scalar codebooks for one coordinate of a random unit vector (TurboQuant §3.1).
//!
//! After a uniformly random rotation, each coordinate t of a unit vector in R^d has the density
//! f(t) ∝ (1 − t²)^((d−3)/2) on [−1, 1] (a scaled Beta; → N(0, 1/d) as d grows). TurboQuant's
//! MSE quantizer codes every coordinate with the optimal scalar (Lloyd–Max) quantizer of that
//! density: 2^b centroids, decision boundaries at the midpoints between neighbours.
//!
//! Numerics: the density is integrated exactly as a piecewise-constant function on a grid of
//! 2^17 cells covering ±min(1, 20σ) (σ = 1/√d; the mass beyond is below 1e-80), in f64, with
//! prefix sums of mass and first two moments so that one Lloyd iteration costs O(2^b). Iteration
//! stops when no centroid moves by more than 1e-13·σ. The result is symmetric by construction.
//! At d = 128 the MSE of a unit vector is 0.3609, 0.1160, 0.0340, 0.0093 for b = 1..4.
//!
//! Codebooks are computed once per (d, b) and cached for the life of the process.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

type CodebookCache = HashMap<(usize, u8), Arc<Codebook>>;

/// Smallest dimension a codebook is made for.
pub const MIN_DIM: usize = 16;
/// Largest dimension a codebook is made for.
pub const MAX_DIM: usize = 65536;
/// Bit widths with a codebook.
pub const SUPPORTED_BITS: &str = "1, 2, 3, 4, 5, 6, 7, 8";

const GRID_CELLS: usize = 1 << 17;

/// The Lloyd–Max codebook for dimension `dim` and `bits` bits per coordinate.
#[derive(Debug, Clone)]
pub struct Codebook {
    dim: usize,
    bits: u8,
    centroids: Vec<f32>,
    boundaries: Vec<f32>,
    centroids_f64: Vec<f64>,
    coord_mse: f64,
}

impl Codebook {
    /// The cached codebook for (`dim`, `bits`); computed on first use.
    ///
    /// Errors: `bits` outside 1..=8, `dim` outside 16..=65536.
    pub fn get(dim: usize, bits: u8) -> Result<Arc<Codebook>> {
        check_bits(bits)?;
        check_dim(dim)?;
        static CACHE: OnceLock<Mutex<CodebookCache>> = OnceLock::new();
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        if let Some(cb) = cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(dim, bits))
        {
            return Ok(cb.clone());
        }
        // Computed outside the lock: two threads may both compute it; both results are equal.
        let cb = Arc::new(Self::compute(dim, bits));
        let mut guard = cache.lock().unwrap_or_else(|e| e.into_inner());
        Ok(guard.entry((dim, bits)).or_insert(cb).clone())
    }

    fn compute(dim: usize, bits: u8) -> Codebook {
        let grid = Grid::new(dim);
        let levels = 1usize << bits;
        // Start from the centres of equal-mass intervals.
        let mut c: Vec<f64> = (0..levels)
            .map(|k| grid.quantile((k as f64 + 0.5) / levels as f64))
            .collect();
        let sigma = 1.0 / (dim as f64).sqrt();
        let mut bounds = vec![0.0f64; levels + 1];
        for _ in 0..200_000 {
            bounds[0] = -grid.t_max;
            bounds[levels] = grid.t_max;
            for k in 1..levels {
                bounds[k] = 0.5 * (c[k - 1] + c[k]);
            }
            let mut moved = 0.0f64;
            let mut next = c.clone();
            for k in 0..levels {
                let (m0, m1, _) = grid.moments(bounds[k], bounds[k + 1]);
                if m0 > 0.0 {
                    next[k] = m1 / m0;
                }
            }
            // Enforce the symmetry of the density exactly.
            for k in 0..levels / 2 {
                let v = 0.5 * (next[levels - 1 - k] - next[k]);
                next[k] = -v;
                next[levels - 1 - k] = v;
            }
            for k in 0..levels {
                moved = moved.max((next[k] - c[k]).abs());
            }
            c = next;
            if moved < 1e-13 * sigma {
                break;
            }
        }
        for k in 1..levels {
            bounds[k] = 0.5 * (c[k - 1] + c[k]);
        }
        let mut mse = 0.0;
        for k in 0..levels {
            let (m0, m1, m2) = grid.moments(bounds[k], bounds[k + 1]);
            mse += m2 - 2.0 * c[k] * m1 + c[k] * c[k] * m0;
        }
        Codebook {
            dim,
            bits,
            centroids: c.iter().map(|&v| v as f32).collect(),
            boundaries: bounds[1..levels].iter().map(|&v| v as f32).collect(),
            centroids_f64: c,
            coord_mse: mse,
        }
    }

    /// A codebook of `bits` fitted to measured coordinates (Lloyd–Max on the samples: 1-D
    /// k-means started from the theoretical codebook of `dim`, `iters` rounds), for vectors of
    /// `dim` whose rotated unit coordinates the samples are. Errors on no samples or non-finite
    /// ones. Its `coord_mse` is the fit's mean squared error over the samples.
    pub fn fitted(dim: usize, bits: u8, samples: &[f32], iters: usize) -> Result<Codebook> {
        let base = Self::get(dim, bits)?;
        if samples.is_empty() {
            return Err(Error::Config("a fitted codebook needs samples".into()));
        }
        crate::error::check_finite("codebook samples", samples)?;
        let mut x: Vec<f64> = samples.iter().map(|&v| v as f64).collect();
        x.sort_by(f64::total_cmp);
        let levels = 1usize << bits;
        let mut c = base.centroids_f64.clone();
        let mut bounds = vec![0.0f64; levels - 1];
        for _ in 0..iters.max(1) {
            for k in 1..levels {
                bounds[k - 1] = 0.5 * (c[k - 1] + c[k]);
            }
            // Sorted samples: each cell is a contiguous run.
            let mut start = 0;
            let mut next = c.clone();
            for (k, nk) in next.iter_mut().enumerate() {
                let end = if k + 1 < levels {
                    start + x[start..].partition_point(|&v| v <= bounds[k])
                } else {
                    x.len()
                };
                if end > start {
                    *nk = x[start..end].iter().sum::<f64>() / (end - start) as f64;
                }
                start = end;
            }
            // Keep the levels strictly ascending (an empty cell keeps its old centroid).
            for k in 1..levels {
                if next[k] <= next[k - 1] {
                    next[k] = next[k - 1] + 1e-9;
                }
            }
            c = next;
        }
        for k in 1..levels {
            bounds[k - 1] = 0.5 * (c[k - 1] + c[k]);
        }
        let mut mse = 0.0;
        let mut start = 0;
        for k in 0..levels {
            let end = if k + 1 < levels {
                start + x[start..].partition_point(|&v| v <= bounds[k])
            } else {
                x.len()
            };
            mse += x[start..end]
                .iter()
                .map(|&v| (v - c[k]).powi(2))
                .sum::<f64>();
            start = end;
        }
        Ok(Codebook {
            dim,
            bits,
            centroids: c.iter().map(|&v| v as f32).collect(),
            boundaries: bounds.iter().map(|&v| v as f32).collect(),
            centroids_f64: c,
            coord_mse: mse / x.len() as f64,
        })
    }

    /// Dimension of the vectors this codebook is made for.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Bits per coordinate.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// The 2^b centroids, ascending, for a unit vector's coordinates (multiply by the norm).
    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }

    /// The centroids in f64.
    pub fn centroids_f64(&self) -> &[f64] {
        &self.centroids_f64
    }

    /// The 2^b − 1 decision boundaries (midpoints of neighbouring centroids), ascending.
    pub fn boundaries(&self) -> &[f32] {
        &self.boundaries
    }

    /// Expected squared error of one coordinate, E[(t − Q(t))²].
    pub fn coord_mse(&self) -> f64 {
        self.coord_mse
    }

    /// Expected ‖y − ŷ‖² for a uniformly random unit vector y: `dim · coord_mse`
    /// (TurboQuant's D_mse).
    pub fn unit_mse(&self) -> f64 {
        self.coord_mse * self.dim as f64
    }

    /// Index of the nearest centroid: the number of boundaries strictly below `t`
    /// (a value exactly on a boundary takes the lower level). NaN maps to level 0.
    #[inline]
    pub fn encode(&self, t: f32) -> u8 {
        // Branch-free linear scan: at most 255 comparisons, 15 for 4 bits.
        let mut idx = 0u8;
        for &b in &self.boundaries {
            idx += (t > b) as u8;
        }
        idx
    }

    /// The centroid of level `idx`.
    #[inline]
    pub fn decode(&self, idx: u8) -> f32 {
        self.centroids[idx as usize]
    }
}

/// Returns an error unless `bits` is in 1..=8.
pub fn check_bits(bits: u8) -> Result<()> {
    if (1..=8).contains(&bits) {
        Ok(())
    } else {
        Err(Error::UnsupportedBits {
            bits: bits.to_string(),
            supported: SUPPORTED_BITS,
        })
    }
}

fn check_dim(dim: usize) -> Result<()> {
    if (MIN_DIM..=MAX_DIM).contains(&dim) {
        Ok(())
    } else {
        Err(Error::UnsupportedDim {
            dim,
            reason: format!("codebooks exist for dimensions {MIN_DIM}..={MAX_DIM}"),
        })
    }
}

/// The coordinate density on a grid, with prefix sums of its moments.
struct Grid {
    t_max: f64,
    h: f64,
    /// density (normalised) in each cell
    dens: Vec<f64>,
    /// prefix sums over whole cells: mass, first and second moments
    p0: Vec<f64>,
    p1: Vec<f64>,
    p2: Vec<f64>,
}

impl Grid {
    fn new(dim: usize) -> Self {
        let t_max = (20.0 / (dim as f64).sqrt()).min(1.0);
        let n = GRID_CELLS;
        let h = 2.0 * t_max / n as f64;
        let expo = (dim as f64 - 3.0) / 2.0;
        let mut dens: Vec<f64> = (0..n)
            .map(|i| {
                let t = -t_max + (i as f64 + 0.5) * h;
                (expo * (1.0 - t * t).ln()).exp()
            })
            .collect();
        let total: f64 = dens.iter().sum::<f64>() * h;
        for v in &mut dens {
            *v /= total;
        }
        let mut p0 = vec![0.0; n + 1];
        let mut p1 = vec![0.0; n + 1];
        let mut p2 = vec![0.0; n + 1];
        for i in 0..n {
            let a = -t_max + i as f64 * h;
            let b = a + h;
            let f = dens[i];
            p0[i + 1] = p0[i] + f * (b - a);
            p1[i + 1] = p1[i] + f * (b * b - a * a) / 2.0;
            p2[i + 1] = p2[i] + f * (b * b * b - a * a * a) / 3.0;
        }
        Grid {
            t_max,
            h,
            dens,
            p0,
            p1,
            p2,
        }
    }

    /// (mass, first moment, second moment) of the density on (−t_max, x].
    fn cumulative(&self, x: f64) -> (f64, f64, f64) {
        let n = self.dens.len();
        let pos = ((x + self.t_max) / self.h).clamp(0.0, n as f64);
        let i = (pos.floor() as usize).min(n);
        let mut m = (self.p0[i], self.p1[i], self.p2[i]);
        if i < n {
            let a = -self.t_max + i as f64 * self.h;
            let b = x.max(a);
            let f = self.dens[i];
            m.0 += f * (b - a);
            m.1 += f * (b * b - a * a) / 2.0;
            m.2 += f * (b * b * b - a * a * a) / 3.0;
        }
        m
    }

    fn moments(&self, a: f64, b: f64) -> (f64, f64, f64) {
        let lo = self.cumulative(a);
        let hi = self.cumulative(b);
        (hi.0 - lo.0, hi.1 - lo.1, hi.2 - lo.2)
    }

    /// The p-quantile of the density (bisection on the cumulative mass).
    fn quantile(&self, p: f64) -> f64 {
        let (mut lo, mut hi) = (-self.t_max, self.t_max);
        for _ in 0..100 {
            let mid = 0.5 * (lo + hi);
            if self.cumulative(mid).0 < p {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        0.5 * (lo + hi)
    }
}
