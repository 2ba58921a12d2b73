//! Quantization specs for keys and values (DESIGN.md "The math"; TurboQuant §3 and §4.3 for the
//! fractional-bit channel split; QJL §3 for the plain sketch).
//!
//! A [`QuantSpec`] says how one vector is stored: its bits per channel ([`BitsSpec`], an integer
//! or a split of the channels into two groups with their own bits), the mode ([`Mode`]: MSE only,
//! or TurboQuant-prod = MSE at b−1 bits + a QJL sketch of the residual), the rotation, how norms
//! are stored ([`NormFormat`]) and how the high-precision ("outlier") channels of a split are
//! chosen ([`OutlierRule`]). Keys and values have independent specs ([`KvSpec`]).
//!
//! Presets: `"2.5"` = half the channels at 3 bits + half at 2; `"3.5"` = half at 4 + half at 3;
//! `"paper2.5"` = the paper's literal split, a quarter at 3 + the rest at 2 (32@3 + 96@2 at
//! d = 128), which is 2.25 code bits per channel, 2.5 only when its two f16 norms are counted
//! (docs/FORMAT.md). The plain QJL key sketch of the QJL paper is `bits = 1`, `mode = prod`
//! (no MSE stage; m = `sketch_dim` sign bits and the norm).

use crate::error::{Error, Result};
use crate::rotation::RotationKind;

/// Bits per channel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BitsSpec {
    /// Every channel at the same bit width (1..=8).
    Uniform(u8),
    /// `hi_num/hi_den` of the channels (the outliers) at `hi_bits`, the rest at `lo_bits`;
    /// each group has its own rotation, codebook and norm.
    Split {
        /// Numerator of the fraction of high-precision channels.
        hi_num: usize,
        /// Denominator of that fraction.
        hi_den: usize,
        /// Bits of the high-precision group.
        hi_bits: u8,
        /// Bits of the rest.
        lo_bits: u8,
    },
}

impl BitsSpec {
    /// Number of high-precision channels at dimension `dim` (0 for uniform bits).
    pub fn hi_channels(&self, dim: usize) -> Result<usize> {
        match *self {
            BitsSpec::Uniform(_) => Ok(0),
            BitsSpec::Split { hi_num, hi_den, .. } => {
                let split = dim.checked_mul(hi_num);
                if hi_den == 0
                    || hi_num == 0
                    || hi_num >= hi_den
                    || split.is_none_or(|x| x % hi_den != 0)
                {
                    return Err(Error::Config(format!(
                        "channel split {hi_num}/{hi_den} of dim {dim} does not give two non-empty \
                         integer groups"
                    )));
                }
                Ok(dim * hi_num / hi_den)
            }
        }
    }

    /// Code bits per channel at dimension `dim` (norms not counted).
    pub fn code_bits_per_channel(&self, dim: usize) -> Result<f64> {
        match *self {
            BitsSpec::Uniform(b) => Ok(b as f64),
            BitsSpec::Split {
                hi_bits, lo_bits, ..
            } => {
                let k = self.hi_channels(dim)?;
                Ok((k as f64 * hi_bits as f64 + (dim - k) as f64 * lo_bits as f64) / dim as f64)
            }
        }
    }
}

impl std::str::FromStr for BitsSpec {
    type Err = Error;
    /// `"1"`..`"8"`, `"x.5"` (half at ⌈x⌉, half at ⌊x⌋), `"paper2.5"`, or `"K@B+J@C"`
    /// (K channels at B bits and J at C bits; the fraction K/(K+J) is what is kept).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::UnsupportedBits {
            bits: s.to_string(),
            supported: "1..=8, 1.5..=7.5 in steps of 1 (x.5 = half the channels at x+0.5, \
                        half at x−0.5), paper2.5, or K@B+J@C",
        };
        if s == "paper2.5" {
            return Ok(BitsSpec::Split {
                hi_num: 1,
                hi_den: 4,
                hi_bits: 3,
                lo_bits: 2,
            });
        }
        if let Some((hi, lo)) = s.split_once('+') {
            let parse = |p: &str| -> Option<(usize, u8)> {
                let (k, b) = p.split_once('@')?;
                Some((k.trim().parse().ok()?, b.trim().parse().ok()?))
            };
            let ((k, b), (j, c)) = (parse(hi).ok_or_else(bad)?, parse(lo).ok_or_else(bad)?);
            // Channel counts of a head (any real head_dim is far below the cap), so that the
            // split's arithmetic (k + j, dim · k) cannot overflow.
            let cap = 1 << 16;
            if !(1..=8).contains(&b)
                || !(1..=8).contains(&c)
                || !(1..=cap).contains(&k)
                || !(1..=cap).contains(&j)
            {
                return Err(bad());
            }
            return Ok(BitsSpec::Split {
                hi_num: k,
                hi_den: k + j,
                hi_bits: b,
                lo_bits: c,
            });
        }
        if let Ok(b) = s.parse::<u8>() {
            return if (1..=8).contains(&b) {
                Ok(BitsSpec::Uniform(b))
            } else {
                Err(bad())
            };
        }
        if let Some(int) = s.strip_suffix(".5") {
            if let Ok(x) = int.parse::<u8>() {
                if (1..=7).contains(&x) {
                    return Ok(BitsSpec::Split {
                        hi_num: 1,
                        hi_den: 2,
                        hi_bits: x + 1,
                        lo_bits: x,
                    });
                }
            }
        }
        Err(bad())
    }
}

impl std::fmt::Display for BitsSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            BitsSpec::Uniform(b) => write!(f, "{b}"),
            BitsSpec::Split {
                hi_num: 1,
                hi_den: 2,
                hi_bits,
                lo_bits,
            } if hi_bits == lo_bits + 1 => write!(f, "{lo_bits}.5"),
            BitsSpec::Split {
                hi_num: 1,
                hi_den: 4,
                hi_bits: 3,
                lo_bits: 2,
            } => write!(f, "paper2.5"),
            BitsSpec::Split {
                hi_num,
                hi_den,
                hi_bits,
                lo_bits,
            } => write!(f, "{hi_num}@{hi_bits}+{}@{lo_bits}", hi_den - hi_num),
        }
    }
}

/// How the inner product with a query is estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// TurboQuant-MSE: all bits go to the codebook (biased inner products, scale 1 − D_mse).
    Mse,
    /// TurboQuant-prod: MSE at b−1 bits + a QJL sketch of the residual (unbiased).
    Prod {
        /// Sign bits m per group; `None` = the group's dimension. Only settable for uniform bits.
        sketch_dim: Option<usize>,
        /// Orthogonalised (rescaled) sketch rows instead of i.i.d. Gaussian ones.
        orthogonal: bool,
    },
}

impl Mode {
    /// `mse` or `prod`.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Mse => "mse",
            Mode::Prod { .. } => "prod",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = Error;
    /// `mse`, `prod` (Gaussian S) or `prod-orth` (orthogonal S).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mse" => Ok(Mode::Mse),
            "prod" => Ok(Mode::Prod {
                sketch_dim: None,
                orthogonal: false,
            }),
            "prod-orth" => Ok(Mode::Prod {
                sketch_dim: None,
                orthogonal: true,
            }),
            _ => Err(Error::Config(format!(
                "unknown mode {s:?}: supported are mse, prod, prod-orth"
            ))),
        }
    }
}

/// Storage of the per-vector norms (n of the MSE stage, γ of the QJL stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormFormat {
    /// IEEE half: relative error ≤ 2⁻¹¹, largest value 65504 (larger norms are an error).
    F16,
    /// IEEE single.
    F32,
    /// One byte: 2^((c − 128)/8), a relative error within ±4.4 % ([`crate::lognorm`]).
    Log8,
}

impl NormFormat {
    /// Bytes per stored norm.
    pub fn bytes(self) -> usize {
        match self {
            NormFormat::F16 => 2,
            NormFormat::F32 => 4,
            NormFormat::Log8 => 1,
        }
    }

    /// The norm stored at `rec[off..off + self.bytes()]`.
    pub fn read(self, rec: &[u8], off: usize) -> f32 {
        match self {
            NormFormat::F16 => half::f16::from_le_bytes([rec[off], rec[off + 1]]).to_f32(),
            NormFormat::F32 => {
                f32::from_le_bytes([rec[off], rec[off + 1], rec[off + 2], rec[off + 3]])
            }
            NormFormat::Log8 => crate::lognorm::log8_decode(rec[off]),
        }
    }

    /// Stores `v` at `rec[off..off + self.bytes()]`; returns the value as stored (what
    /// [`Self::read`] gives back) and whether `v` fit. A norm that does not fit is stored as
    /// the format saturates it (f16: infinity, log8: its largest code), as a kernel would.
    pub fn write(self, rec: &mut [u8], off: usize, v: f32) -> (f32, bool) {
        match self {
            NormFormat::F16 => {
                let h = half::f16::from_f32(v);
                rec[off..off + 2].copy_from_slice(&h.to_le_bytes());
                (h.to_f32(), h.is_finite())
            }
            NormFormat::F32 => {
                rec[off..off + 4].copy_from_slice(&v.to_le_bytes());
                (v, true)
            }
            NormFormat::Log8 => {
                let c = crate::lognorm::log8_encode(v);
                rec[off] = c.unwrap_or(255);
                (crate::lognorm::log8_decode(rec[off]), c.is_some())
            }
        }
    }

    /// The largest finite norm the format stores.
    pub fn max(self) -> f32 {
        match self {
            NormFormat::F16 => half::f16::MAX.to_f32(),
            NormFormat::F32 => f32::MAX,
            NormFormat::Log8 => crate::lognorm::log8_decode(255),
        }
    }

    /// The format's name (as parsed).
    pub fn name(self) -> &'static str {
        match self {
            NormFormat::F16 => "f16",
            NormFormat::F32 => "f32",
            NormFormat::Log8 => "log8",
        }
    }
}

impl std::str::FromStr for NormFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f16" => Ok(NormFormat::F16),
            "f32" => Ok(NormFormat::F32),
            "log8" => Ok(NormFormat::Log8),
            _ => Err(Error::Config(format!(
                "unknown norm format {s:?}: supported are f16, f32, log8"
            ))),
        }
    }
}

/// Which norm the MSE stage stores with the codes (the codes themselves are the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormRule {
    /// n = ‖x‖ (TurboQuant §3.1). The reconstruction n·c is the Lloyd–Max conditional mean,
    /// whose inner products shrink by about 1 − D_mse.
    Exact,
    /// n = ‖x‖² / ⟨x, ‖x‖·c⟩ = ‖x‖ / ⟨u, c⟩ (u = the rotated unit vector, c its centroids): the
    /// reconstruction's projection on x is exactly x, so ⟨q, x̂⟩ = ⟨q, x⟩ + ⟨q, e⟩ with an error
    /// e orthogonal to x, and scores are not shrunk (a softmax temperature error the exact
    /// norm makes). The MSE grows from D to at most about D / (1 − D).
    Projected,
    /// n = ⟨x, Πᵀc⟩ / ‖c‖² = ‖x‖·⟨u, c⟩ / ‖c‖²: the scale that minimises ‖x − n·Πᵀc‖ for
    /// the codes chosen (least squares), so the MSE is never above the exact norm's, at the same
    /// bytes; inner products shrink about as with the exact norm.
    LeastSquares,
}

impl std::str::FromStr for NormRule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "exact" => Ok(NormRule::Exact),
            "projected" => Ok(NormRule::Projected),
            "ls" | "least-squares" => Ok(NormRule::LeastSquares),
            _ => Err(Error::Config(format!(
                "unknown norm rule {s:?}: supported are exact, projected, ls"
            ))),
        }
    }
}

/// How the high-precision channels of a split are chosen (per layer and KV head, once, from the
/// first prefill's vectors, then fixed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutlierRule {
    /// The first k channels, 0..k (what a rule without statistics can do).
    Fixed,
    /// The k channels with the largest mean square over the calibration vectors
    /// (ties to the lower index). For keys after RoPE this picks the high-energy rotary pairs.
    Magnitude,
}

impl std::str::FromStr for OutlierRule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fixed" => Ok(OutlierRule::Fixed),
            "magnitude" => Ok(OutlierRule::Magnitude),
            _ => Err(Error::Config(format!(
                "unknown outlier rule {s:?}: supported are fixed, magnitude"
            ))),
        }
    }
}

/// How one kind of vector (keys or values) is quantized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantSpec {
    /// Bits per channel.
    pub bits: BitsSpec,
    /// MSE or prod.
    pub mode: Mode,
    /// The rotation family.
    pub rotation: RotationKind,
    /// Norm storage.
    pub norm: NormFormat,
    /// Outlier-channel rule for splits.
    pub outliers: OutlierRule,
    /// Which norm the MSE stage stores.
    pub norm_rule: NormRule,
}

impl QuantSpec {
    /// MSE mode, dense rotation, f16 norms, magnitude outlier rule.
    pub fn mse(bits: BitsSpec) -> Self {
        QuantSpec {
            bits,
            mode: Mode::Mse,
            rotation: RotationKind::Dense,
            norm: NormFormat::F16,
            outliers: OutlierRule::Magnitude,
            norm_rule: NormRule::Exact,
        }
    }

    /// Prod mode with a Gaussian sketch of m = group dimension.
    pub fn prod(bits: BitsSpec) -> Self {
        QuantSpec {
            mode: Mode::Prod {
                sketch_dim: None,
                orthogonal: false,
            },
            ..Self::mse(bits)
        }
    }

    /// The plain QJL key sketch of the QJL paper: m sign bits of S k and ‖k‖.
    pub fn qjl(sketch_dim: usize) -> Self {
        QuantSpec {
            mode: Mode::Prod {
                sketch_dim: Some(sketch_dim),
                orthogonal: false,
            },
            ..Self::mse(BitsSpec::Uniform(1))
        }
    }

    /// Replaces the rotation.
    pub fn with_rotation(mut self, rotation: RotationKind) -> Self {
        self.rotation = rotation;
        self
    }

    /// Replaces the norm format.
    pub fn with_norm(mut self, norm: NormFormat) -> Self {
        self.norm = norm;
        self
    }

    /// Replaces the norm rule.
    pub fn with_norm_rule(mut self, rule: NormRule) -> Self {
        self.norm_rule = rule;
        self
    }

    /// Replaces the outlier rule.
    pub fn with_outliers(mut self, outliers: OutlierRule) -> Self {
        self.outliers = outliers;
        self
    }
}

/// The length from which a window budget holds ([`KvSpec::budget_bits`]); shorter sequences keep
/// the window of one this long, so that short contexts do not lose their exact tokens.
pub const BUDGET_FROM: usize = 512;

/// Independent specs for keys and values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvSpec {
    /// How keys are stored.
    pub key: QuantSpec,
    /// How values are stored.
    pub value: QuantSpec,
    /// Subtract a per-(head, channel) key mean, measured once on the first chunk, before
    /// quantizing keys. Every score of a query moves by the same q·μ, which softmax ignores, so
    /// attention is unchanged while the quantizer sees smaller, centred vectors.
    pub center_keys: bool,
    /// Subtract a per-(head, channel) value mean, measured once on the first chunk, before
    /// quantizing values, and add it back to every attention output (the weights sum to 1, so
    /// the output is unchanged while the quantizer sees smaller, centred vectors).
    pub center_values: bool,
    /// Per-channel key scales folded into the query: with exponent α, each (head, channel) of
    /// the keys is divided by s_c = rms_c^α (rms over the first chunk's keys, after centring;
    /// normalised to a geometric mean of 1) before quantizing, and the queries are multiplied by
    /// s, so q·k = (q∘s)·(k/s) and the quantizer sees flatter keys. `None`: no scaling.
    pub key_scale: Option<f32>,
    /// Codebooks fitted per layer (shared by its KV heads) to the rotated unit coordinates of
    /// the first chunk's keys and values (Lloyd–Max on those samples), instead of the
    /// theoretical ones for uniformly random directions.
    pub fit_codebooks: bool,
    /// Rotations per layer cycled by position: the record of position t is written with
    /// rotation (and sketch) `t % rotations` (same layout and codebooks), so that the
    /// quantization errors of similar vectors at neighbouring positions are not the same error
    /// and average out in the attention sums. 1: one rotation (TurboQuant).
    pub rotations: usize,
    /// Attention sinks: the first `sinks` tokens of every sequence are also kept in full
    /// precision (f16), and every query reads them from there.
    pub sinks: usize,
    /// A sliding window of exact tokens: a query at position p reads the keys and values of
    /// positions p − window + 1 ..= p from a full-precision (f16) copy of the most recent tokens
    /// (KIVI's residual, per query: a prefill chunk sees what token-by-token decoding would).
    /// Older positions are read from their packed records.
    pub window: usize,
    /// Sizes the window from a byte budget: at every length n ≥ [`BUDGET_FROM`] the window
    /// holds the most recent tokens that keep the whole cache (records, exact tokens, per-layer
    /// tables) within `budget_bits` bits per channel, i.e. `16 / budget_bits` times smaller than
    /// f16; a shorter sequence keeps the window of a [`BUDGET_FROM`]-token one (its bytes are
    /// then below that one's). Capped by `window` when that is non-zero. (Exact tokens have no
    /// record: a token is quantized when it leaves the window.)
    pub budget_bits: Option<f32>,
    /// How the sinks and the window are stored: f16, or llama.cpp's q8_0 (blocks of 32
    /// channels, an f16 scale and 8-bit integers: 8.5 bits per channel, about twice the exact
    /// tokens in the same bytes).
    pub exact_format: ExactFormat,
}

/// Storage of a TurboQuant cache's exact tokens (sinks and window).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExactFormat {
    /// IEEE half per channel (16 bits).
    #[default]
    F16,
    /// q8_0: per block of 32 channels an f16 scale m / 127 (m = the largest magnitude) and
    /// round(x / scale) as an 8-bit integer (8.5 bits per channel; head_dim a multiple of 32).
    Q8,
}

impl ExactFormat {
    /// Channels per q8_0 block.
    pub const Q8_BLOCK: usize = 32;

    /// Bytes of one exact vector of `dim` channels.
    pub fn vector_bytes(self, dim: usize) -> usize {
        match self {
            ExactFormat::F16 => 2 * dim,
            ExactFormat::Q8 => dim + 2 * dim.div_ceil(Self::Q8_BLOCK),
        }
    }
}

impl KvSpec {
    /// Keys and values both at `bits`, MSE mode, dense rotation, f16 norms, magnitude split,
    /// no exact tokens.
    pub fn mse(bits: BitsSpec) -> Self {
        KvSpec {
            key: QuantSpec::mse(bits),
            value: QuantSpec::mse(bits),
            center_keys: false,
            center_values: false,
            key_scale: None,
            fit_codebooks: false,
            rotations: 1,
            sinks: 0,
            window: 0,
            exact_format: ExactFormat::F16,
            budget_bits: None,
        }
    }

    /// Whether some tokens are kept in full precision (sinks or a window).
    pub fn has_exact(&self) -> bool {
        self.sinks > 0 || self.has_window()
    }

    /// Whether a window of recent tokens is kept in full precision (fixed or from a budget).
    pub fn has_window(&self) -> bool {
        self.window > 0 || self.budget_bits.is_some()
    }

    /// Exact window tokens of a sequence holding `n` tokens (also: of a query that sees `n`
    /// positions), given the bytes per token and KV head of a record pair (key + value), of an
    /// exact token (key + value) and the table bytes per KV head. Never more than the tokens
    /// after the sinks.
    pub fn window_tokens(
        &self,
        n: usize,
        record_bytes: usize,
        exact_bytes: usize,
        table_bytes: usize,
        head_dim: usize,
    ) -> usize {
        let s = self.sinks.min(n);
        let w = match self.budget_bits {
            None => self.window,
            Some(bits) => {
                // The largest W with (n − s − W)·rb + (s + W)·eb + tables ≤ n·2·d·bits/8, at
                // n ≥ BUDGET_FROM.
                let n = n.max(BUDGET_FROM);
                let s = self.sinks.min(n);
                let (rb, eb) = (record_bytes as f64, exact_bytes as f64);
                let budget = n as f64 * 2.0 * head_dim as f64 * bits as f64 / 8.0;
                let free = budget - table_bytes as f64 - n as f64 * rb - s as f64 * (eb - rb);
                let fit = if eb > rb && free > 0.0 {
                    (free / (eb - rb)).floor() as usize
                } else {
                    0
                };
                if self.window > 0 {
                    fit.min(self.window)
                } else {
                    fit
                }
            }
        };
        w.min(n - s)
    }

    /// First position read from a record by a query that sees `n` positions: the positions
    /// `0..min(sinks, n)` are sinks, `packed_end(n)..n` the window (see [`Self::window_tokens`]).
    pub fn packed_end(
        &self,
        n: usize,
        record_bytes: usize,
        exact_bytes: usize,
        table_bytes: usize,
        head_dim: usize,
    ) -> usize {
        n - self.window_tokens(n, record_bytes, exact_bytes, table_bytes, head_dim)
    }
}
