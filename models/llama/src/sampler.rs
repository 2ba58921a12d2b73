//! Token sampling from logits as llama.cpp and vLLM users expect: repeat penalty, temperature,
//! top-k, top-p, min-p, then a seeded draw (greedy at temperature 0).

/// Sampling parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 = greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches top_p (1 = all).
    pub top_p: f32,
    /// Drop tokens whose probability is below min_p × the largest (0 = none).
    pub min_p: f32,
    /// Divide positive / multiply negative logits of recent tokens by this (1 = none).
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    /// Seed of the draws.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            seed: 299_792_458,
        }
    }
}

/// Sampling errors.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    /// A parameter out of range.
    #[error("invalid sampling parameter {0}")]
    Param(String),
    /// No logits.
    #[error("empty logits")]
    Empty,
    /// NaN or Inf among the logits.
    #[error("non-finite logit {value} at index {index}")]
    NonFinite {
        /// Position.
        index: usize,
        /// Value.
        value: f32,
    },
}

/// A seeded sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    p: SamplingParams,
    rng: tqkv::rng::Rng,
}

impl Sampler {
    /// Validates `p`.
    pub fn new(p: SamplingParams) -> Result<Self, SamplingError> {
        let bad = |m: String| Err(SamplingError::Param(m));
        if !(p.temperature >= 0.0 && p.temperature.is_finite()) {
            return bad(format!("temperature {} (must be ≥ 0)", p.temperature));
        }
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            return bad(format!("top_p {} (must be in (0, 1])", p.top_p));
        }
        if !(0.0..1.0).contains(&p.min_p) {
            return bad(format!("min_p {} (must be in [0, 1))", p.min_p));
        }
        if !(p.repeat_penalty > 0.0 && p.repeat_penalty.is_finite()) {
            return bad(format!("repeat_penalty {} (must be > 0)", p.repeat_penalty));
        }
        Ok(Sampler {
            rng: tqkv::rng::Rng::new(p.seed),
            p,
        })
    }

    /// Argmax, no penalty.
    pub fn greedy() -> Self {
        Sampler::new(SamplingParams {
            temperature: 0.0,
            repeat_penalty: 1.0,
            ..Default::default()
        })
        .expect("valid")
    }

    /// Draws the next token from `logits` given the `history` of tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32, SamplingError> {
        if logits.is_empty() {
            return Err(SamplingError::Empty);
        }
        if let Some(index) = logits.iter().position(|x| !x.is_finite()) {
            return Err(SamplingError::NonFinite {
                index,
                value: logits[index],
            });
        }
        let mut l = logits.to_vec();
        if self.p.repeat_penalty != 1.0 {
            let start = history.len().saturating_sub(self.p.repeat_last_n);
            let mut seen = std::collections::HashSet::new();
            for &t in &history[start..] {
                if let Some(v) = l.get_mut(t as usize) {
                    if seen.insert(t) {
                        *v = if *v > 0.0 {
                            *v / self.p.repeat_penalty
                        } else {
                            *v * self.p.repeat_penalty
                        };
                    }
                }
            }
        }
        if self.p.temperature == 0.0 {
            let mut best = 0;
            for (i, &v) in l.iter().enumerate() {
                if v > l[best] {
                    best = i;
                }
            }
            return Ok(best as u32);
        }
        let mut idx: Vec<usize> = (0..l.len()).collect();
        idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
        if self.p.top_k > 0 {
            idx.truncate(self.p.top_k);
        }
        let m = l[idx[0]] as f64;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| ((l[i] as f64 - m) / self.p.temperature as f64).exp())
            .collect();
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
        let mut keep = probs.len();
        if self.p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, &p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        let floor = self.p.min_p as f64 * probs[0];
        keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
        let total: f64 = probs[..keep].iter().sum();
        let mut r = self.rng.uniform() * total;
        for (k, &p) in probs[..keep].iter().enumerate() {
            r -= p;
            if r < 0.0 {
                return Ok(idx[k] as u32);
            }
        }
        Ok(idx[keep - 1] as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(seed: u64) -> Sampler {
        Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 0,
            seed,
        })
        .unwrap()
    }

    #[test]
    fn greedy_is_argmax_with_ties_to_the_lowest_index() {
        let mut s = Sampler::greedy();
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0], &[]).unwrap(), 1);
    }

    #[test]
    fn frequencies_match_the_softmax() {
        let logits = [0.0f32, 1.0, 2.0, -1.0];
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        let mut s = plain(7);
        let mut counts = [0usize; 4];
        let n = 20_000;
        for _ in 0..n {
            counts[s.sample(&logits, &[]).unwrap() as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let p = (logits[i] as f64).exp() / z;
            assert!(
                (c as f64 / n as f64 - p).abs() < 0.01,
                "token {i}: {} vs {p}",
                c as f64 / n as f64
            );
        }
    }

    #[test]
    fn filters_and_determinism() {
        let logits = [0.0f32, 1.0, 2.0, 1.9];
        let draw = |p: SamplingParams| -> Vec<u32> {
            let mut s = Sampler::new(p).unwrap();
            (0..200).map(|_| s.sample(&logits, &[]).unwrap()).collect()
        };
        let base = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 0,
            seed: 3,
        };
        assert_eq!(draw(base.clone()), draw(base.clone()));
        assert_ne!(
            draw(base.clone()),
            draw(SamplingParams {
                seed: 4,
                ..base.clone()
            })
        );
        assert!(draw(SamplingParams {
            top_k: 1,
            ..base.clone()
        })
        .iter()
        .all(|&t| t == 2));
        assert!(draw(SamplingParams {
            top_p: 0.01,
            ..base.clone()
        })
        .iter()
        .all(|&t| t == 2));
        let mp = draw(SamplingParams {
            min_p: 0.5,
            ..base.clone()
        });
        assert!(mp.iter().all(|&t| t == 2 || t == 3) && mp.contains(&3));
        // The penalty makes a repeated favourite lose to the runner-up.
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            repeat_penalty: 2.0,
            repeat_last_n: 64,
            ..base
        })
        .unwrap();
        assert_eq!(s.sample(&logits, &[2]).unwrap(), 3);
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut s = plain(1);
        assert!(matches!(
            s.sample(&[0.0, f32::NAN], &[]),
            Err(SamplingError::NonFinite { index: 1, .. })
        ));
        assert_eq!(s.sample(&[], &[]), Err(SamplingError::Empty));
        for p in [
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                min_p: 1.0,
                ..Default::default()
            },
            SamplingParams {
                repeat_penalty: 0.0,
                ..Default::default()
            },
        ] {
            assert!(Sampler::new(p).is_err());
        }
    }
}
