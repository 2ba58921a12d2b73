//! One config value picks the cache kind of every layer: [`CacheKind`] parses the names used on
//! the command line (`f16`, `q8`, `q4h`, `kivi2`, `tq3.5`, …) and [`CacheConfig`] adds per-layer
//! overrides (e.g. the first and last two layers at higher precision) and the capacity limit.

use crate::cache::KvCache;
use crate::codec::{CodecCache, Q4Hadamard, Q5Hadamard, Q8};
use crate::error::{fail, Error, Result};
use crate::full::FullCache;
use crate::kivi::KiviCache;
use crate::turbo::TurboCache;
use candle_core::{DType, Device};
use tqkv::{BitsSpec, ExactFormat, KvSpec, Mode, NormFormat, NormRule, QuantSpec, RotationKind};

/// What a layer's cache stores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CacheKind {
    /// Full precision in f32, f16 or bf16 (any device).
    Full(DType),
    /// q8_0-like: int8 per token in blocks of 32 with an f16 scale.
    Q8,
    /// Hadamard rotation + q4_0 blocks of 32 (llama.cpp's default).
    Q4Hadamard,
    /// Hadamard rotation + q5_0 blocks of 32.
    Q5Hadamard,
    /// KIVI at 2 or 4 bits with a window of `residual` recent tokens in f16.
    Kivi {
        /// 2 or 4.
        bits: u8,
        /// Recent tokens in f16 (KIVI's R; 128 by default).
        residual: usize,
    },
    /// TurboQuant with independent key and value specs.
    Turbo(KvSpec),
}

impl CacheKind {
    /// Whether the kind stores its tokens in a [`crate::TileArena`]'s tiles
    /// ([`CacheConfig::build_paged`]).
    pub fn pages(&self) -> bool {
        matches!(self, CacheKind::Turbo(_) | CacheKind::Full(_))
    }

    /// For a kind that pages, the bytes of one position of one KV head at `head_dim`: (a key
    /// record + a value record — a key and a value vector for a full cache —, an exact row — 0
    /// without exact tokens); `None` for the others.
    pub fn position_bytes(&self, head_dim: usize) -> Result<Option<(usize, usize)>> {
        let spec = match self {
            CacheKind::Turbo(spec) => spec,
            CacheKind::Full(dt) => return Ok(Some((2 * head_dim * dt.size_in_bytes(), 0))),
            _ => return Ok(None),
        };
        let rb = |s: tqkv::QuantSpec| -> Result<usize> {
            Ok(
                tqkv::VectorQuantizer::new(s.with_outliers(tqkv::OutlierRule::Fixed), head_dim, 0)?
                    .record_bytes(),
            )
        };
        let exact = if spec.has_exact() {
            2 * spec.exact_format.vector_bytes(head_dim)
        } else {
            0
        };
        Ok(Some((rb(spec.key)? + rb(spec.value)?, exact)))
    }
}

impl std::str::FromStr for CacheKind {
    type Err = Error;
    /// `f32`, `f16`, `bf16`, `q8`, `q4h`, `q5h`, `kivi2`, `kivi4`, `kivi<b>-r<N>`; the presets
    /// `tq2.5`, `tq3.5`, `tq4` ([`PRESETS`]); `tq<bits>` otherwise and `tq<bits>-paper` (bits
    /// as in [`BitsSpec`]; MSE keys and values, dense rotation, as in the paper) with suffixes:
    /// `tqk<bits>v<bits>` (different key and value bits, e.g. `tqk4v3`),
    /// `tq<bits>-qjl` (prod keys: MSE at bits−1 + QJL; `-qjlv` / `-qjlvo` prod values), `tq<bits>-had` (Hadamard rotation),
    /// `tq<bits>-c` (keys centred by their per-channel mean, [`KvSpec::center_keys`]),
    /// `tq<bits>-cv` (values centred, the mean added back to the output,
    /// [`KvSpec::center_values`]),
    /// `tq<bits>-r<M>` (M rotations cycled by position, [`KvSpec::rotations`]),
    /// `tq<bits>-fc` (codebooks fitted per layer to the first chunk, [`KvSpec::fit_codebooks`]),
    /// `tq<bits>-ks<α>` (per-channel key scales rms^α folded into the query,
    /// [`KvSpec::key_scale`]; `-ks` alone is α = 0.5), `tq<bits>-pn` (projected norms, [`tqkv::NormRule::Projected`]; `-pnk` / `-pnv` for keys
    /// or values only), `tq<bits>-ls` (least-squares norms, [`tqkv::NormRule::LeastSquares`];
    /// `-lsk` / `-lsv`), `tq<bits>-s<N>` (the
    /// first N tokens kept in f16, [`KvSpec::sinks`]), `tq<bits>-w<N>` (each query reads its N
    /// most recent tokens from an f16 copy, [`KvSpec::window`]), `tq<bits>-b<B>` (a window
    /// sized so the whole cache stays within B bits per channel, [`KvSpec::budget_bits`];
    /// capped by `-w<N>` when both are given).
    fn from_str(s: &str) -> Result<Self> {
        if let Some((_, spec)) = PRESETS.iter().find(|(name, _)| *name == s) {
            return spec.parse();
        }
        Ok(match s {
            "f32" => CacheKind::Full(DType::F32),
            "f16" => CacheKind::Full(DType::F16),
            "bf16" => CacheKind::Full(DType::BF16),
            "q8" => CacheKind::Q8,
            "q4h" => CacheKind::Q4Hadamard,
            "q5h" => CacheKind::Q5Hadamard,
            _ if s.starts_with("kivi") => {
                let (b, r) = match s[4..].split_once("-r") {
                    Some((b, r)) => (b, Some(r)),
                    None => (&s[4..], None),
                };
                let bits = match b {
                    "2" => 2,
                    "4" => 4,
                    _ => {
                        fail!(
                            Kind,
                            "unknown KV cache kind {s:?}: KIVI has kivi2 and kivi4"
                        )
                    }
                };
                let residual = match r {
                    None => crate::kivi::RESIDUAL,
                    Some(r) => match count_suffix(&format!("r{r}"), 'r') {
                        Some(Ok(n)) => n,
                        _ => fail!(
                            Kind,
                            "{s:?}: -r<N> takes a number of recent tokens (at most {MAX_EXACT_TOKENS})"
                        ),
                    },
                };
                CacheKind::Kivi { bits, residual }
            }
            _ => {
                let Some(rest) = s.strip_prefix("tq") else {
                    fail!(
                        Kind,
                        "unknown KV cache kind {s:?}: supported are f32, f16, bf16, q8, q4h, q5h, \
                         kivi2, kivi4[-r<N>], tq<bits>[-qjl][-had][-c][-pn] or tqk<bits>v<bits> (e.g. tq2.5, tq3.5, tq4-qjl, tqk4v3)"
                    );
                };
                let mut parts = rest.split('-');
                let head = parts.next().unwrap_or("");
                // `tqk<bits>v<bits>`: independent key and value bits.
                let (kb, vb) = match head.strip_prefix('k').and_then(|h| h.split_once('v')) {
                    Some((k, v)) => (k, v),
                    None => (head, head),
                };
                let kb: BitsSpec = kb.parse()?;
                let vb: BitsSpec = vb.parse()?;
                let mut key = QuantSpec::mse(kb);
                let mut value = QuantSpec::mse(vb);
                let (mut center_keys, mut center_values) = (false, false);
                let (mut sinks, mut window) = (0usize, 0usize);
                let mut budget_bits = None;
                let mut key_scale = None;
                let mut fit_codebooks = false;
                let mut rotations = 1usize;
                let mut exact_format = ExactFormat::F16;
                for p in parts {
                    if let Some(a) = p.strip_prefix("ks") {
                        match if a.is_empty() {
                            Ok(0.5)
                        } else {
                            a.parse::<f32>()
                        } {
                            Ok(x) if x.is_finite() && (0.0..=2.0).contains(&x) => {
                                key_scale = Some(x)
                            }
                            _ => fail!(
                                Kind,
                                "{s:?}: -ks<α> needs an exponent in 0..=2 (-ks alone: 0.5)"
                            ),
                        }
                        continue;
                    }
                    if let Some(b) = p.strip_prefix('b').filter(|b| {
                        !b.is_empty() && b.bytes().all(|c| c.is_ascii_digit() || c == b'.')
                    }) {
                        match b.parse::<f32>() {
                            Ok(x) if x > 0.0 && x <= 16.0 => budget_bits = Some(x),
                            _ => fail!(
                                Kind,
                                "{s:?}: -b{b} needs a budget of bits per channel in (0, 16]"
                            ),
                        }
                        continue;
                    }
                    if let Some(n) = count_suffix(p, 's') {
                        sinks = n.map_err(|e| Error::Kind(format!("{s:?}: {e}")))?;
                        continue;
                    }
                    if let Some(n) = count_suffix(p, 'r') {
                        match n {
                            Ok(m) if (1..=4).contains(&m) => rotations = m,
                            _ => fail!(
                                Kind,
                                "{s:?}: -r<M> takes 1..=4 rotations (what the CUDA kernels cycle)"
                            ),
                        }
                        continue;
                    }
                    if let Some(n) = count_suffix(p, 'w') {
                        window = n.map_err(|e| Error::Kind(format!("{s:?}: {e}")))?;
                        continue;
                    }
                    match p {
                        // The paper's configuration of these bits (what a suffix builds on).
                        "paper" => {}
                        "qjl" => {
                            key = QuantSpec {
                                mode: Mode::Prod {
                                    sketch_dim: None,
                                    orthogonal: false,
                                },
                                ..key
                            }
                        }
                        "qjlv" | "qjlvo" => {
                            value = QuantSpec {
                                mode: Mode::Prod {
                                    sketch_dim: None,
                                    orthogonal: p == "qjlvo",
                                },
                                ..value
                            }
                        }
                        "qjlo" => {
                            key = QuantSpec {
                                mode: Mode::Prod {
                                    sketch_dim: None,
                                    orthogonal: true,
                                },
                                ..key
                            }
                        }
                        "had" => {
                            key = key.with_rotation(RotationKind::Hadamard);
                            value = value.with_rotation(RotationKind::Hadamard);
                        }
                        "c" => center_keys = true,
                        "cv" => center_values = true,
                        "wq8" => exact_format = ExactFormat::Q8,
                        "n8" => {
                            key = key.with_norm(NormFormat::Log8);
                            value = value.with_norm(NormFormat::Log8);
                        }
                        "n8k" => key = key.with_norm(NormFormat::Log8),
                        "n8v" => value = value.with_norm(NormFormat::Log8),
                        "fc" => fit_codebooks = true,
                        "pn" => {
                            key = key.with_norm_rule(NormRule::Projected);
                            value = value.with_norm_rule(NormRule::Projected);
                        }
                        "pnk" => key = key.with_norm_rule(NormRule::Projected),
                        "pnv" => value = value.with_norm_rule(NormRule::Projected),
                        "ls" => {
                            key = key.with_norm_rule(NormRule::LeastSquares);
                            value = value.with_norm_rule(NormRule::LeastSquares);
                        }
                        "lsk" => key = key.with_norm_rule(NormRule::LeastSquares),
                        "lsv" => value = value.with_norm_rule(NormRule::LeastSquares),
                        _ => fail!(
                            Kind,
                            "unknown suffix {p:?} in {s:?}: supported are -paper, -qjl, -qjlo, -qjlv, -qjlvo, -had, -c, \
                             -cv, -ks[α], -fc, -r<M>, -pn, -pnk, -pnv, -ls, -lsk, -lsv, -s<N> (sink tokens), -w<N> (exact window), -b<bits> (window \
                             sized to a budget of bits per channel), -wq8 (sinks and window in q8_0), -n8, -n8k, -n8v (8-bit log norms)"
                        ),
                    }
                }
                let spec = KvSpec {
                    key,
                    value,
                    center_keys,
                    center_values,
                    key_scale,
                    fit_codebooks,
                    rotations,
                    sinks,
                    window,
                    budget_bits,
                    exact_format,
                };
                if exact_format != ExactFormat::F16 && !spec.has_exact() {
                    fail!(
                        Kind,
                        "{s:?}: -wq8 stores the exact tokens in q8_0; give some with -s<N>, -w<N> or -b<bits>"
                    );
                }
                CacheKind::Turbo(spec)
            }
        })
    }
}

/// The named TurboQuant presets: each the best configuration measured at its byte budget on the
/// default model (docs/QUALITY.md), all-in (records, exact tokens, tables) from 512 tokens on:
/// `tq2.5` 3 bits per channel (5.33× smaller than f16), `tq3.5` 4 bits (4×), `tq4` 4.25 bits
/// (3.76×) — the sizes the paper's configurations of those names have. `tq<bits>-paper` is the
/// paper's configuration (MSE keys and values at those bits, dense rotation, exact norms).
pub const PRESETS: [(&str, &str); 3] = [
    ("tq2.5", "tqk3v1.5-had-pn-c-s1-b3-r4-n8v-wq8"),
    ("tq3.5", "tqk4v2-had-pn-c-s1-b4-r4-wq8"),
    ("tq4", "tqk4v3-had-pn-c-s1-b4.25-r4-wq8"),
];

/// The largest number of sink or window tokens a kind may name.
pub const MAX_EXACT_TOKENS: usize = 1 << 20;

/// `Some(count)` when `p` is `<letter><digits>` (e.g. `s4`, `w128`), checked against
/// [`MAX_EXACT_TOKENS`]; `None` when it is another suffix.
fn count_suffix(p: &str, letter: char) -> Option<std::result::Result<usize, String>> {
    let digits = p.strip_prefix(letter)?;
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(match digits.parse::<usize>() {
        Ok(n) if n <= MAX_EXACT_TOKENS => Ok(n),
        _ => Err(format!(
            "-{letter}{digits}: at most {MAX_EXACT_TOKENS} tokens"
        )),
    })
}

/// Cache kinds per layer, and the capacity limit.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// The kind of every layer without an override.
    pub default: CacheKind,
    /// (layer index, kind) overrides.
    pub overrides: Vec<(usize, CacheKind)>,
    /// Largest number of tokens per sequence (None: grow without bound).
    pub max_tokens: Option<usize>,
    /// Seed of rotations and sketches (each layer derives its own).
    pub seed: u64,
    /// (first, last, kind): the first and last layers of the model at another kind, resolved
    /// when the model's layer count is known ([`Self::build_in`]).
    pub outer: Option<(usize, usize, CacheKind)>,
    /// The preset the default kind was named by (`tq3.5`, …), if any: a model with a shipped
    /// per-layer profile for it gets that allocation ([`crate::profiles`]) in
    /// [`Self::build_in`].
    pub preset: Option<&'static str>,
}

/// The largest layer index a per-layer override may name.
pub const MAX_LAYER: usize = 4095;

impl std::str::FromStr for CacheConfig {
    type Err = Error;
    /// A kind for every layer, then per-layer overrides: `<kind>[@<layers>=<kind>]…` where
    /// `<layers>` is a layer index or a range `a-b` (inclusive), e.g. `tq3.5@0-1=q8@29=f16`.
    /// Later overrides win; layers the model does not have are ignored.
    fn from_str(s: &str) -> Result<Self> {
        // `@` also appears inside `K@B+J@C` bits: a part with `=` starts an override, the
        // others continue the kind before them.
        let mut items: Vec<String> = Vec::new();
        for (i, part) in s.split('@').enumerate() {
            match items.last_mut() {
                Some(last) if i > 0 && !part.contains('=') => {
                    last.push('@');
                    last.push_str(part);
                }
                _ => items.push(part.to_string()),
            }
        }
        let head = items.first().map(String::as_str).unwrap_or("");
        let mut cfg = CacheConfig::new(head.parse()?);
        cfg.preset = PRESETS.iter().find(|(n, _)| *n == head).map(|(n, _)| *n);
        for p in items.iter().skip(1).map(String::as_str) {
            let Some((layers, kind)) = p.split_once('=') else {
                fail!(
                    Kind,
                    "{s:?}: a layer override is @<layers>=<kind>, got @{p}"
                );
            };
            let kind: CacheKind = kind.parse()?;
            let num = |x: &str| -> Result<usize> {
                match x.trim().parse::<usize>() {
                    Ok(n) if n <= MAX_LAYER => Ok(n),
                    _ => {
                        fail!(
                            Kind,
                            "{s:?}: layer {x:?} is not an index in 0..={MAX_LAYER}"
                        )
                    }
                }
            };
            let (a, b) = match layers.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => (num(layers)?, num(layers)?),
            };
            if a > b {
                fail!(Kind, "{s:?}: empty layer range {a}-{b}");
            }
            cfg.overrides.extend((a..=b).map(|l| (l, kind)));
        }
        Ok(cfg)
    }
}

impl CacheConfig {
    /// Every layer of `kind`, unbounded, seed 0.
    pub fn new(kind: CacheKind) -> Self {
        CacheConfig {
            default: kind,
            overrides: Vec::new(),
            max_tokens: None,
            seed: 0,
            outer: None,
            preset: None,
        }
    }

    /// Keeps the first `first` and the last `last` of `n_layers` layers at `kind`.
    pub fn with_outer_layers(
        mut self,
        first: usize,
        last: usize,
        n_layers: usize,
        kind: CacheKind,
    ) -> Self {
        for l in (0..first.min(n_layers)).chain(n_layers.saturating_sub(last)..n_layers) {
            self.overrides.push((l, kind));
        }
        self
    }

    /// Keeps the first `first` and the last `last` layers at `kind`, whatever the model's depth
    /// (applied by [`Self::build_in`], which is told the layer count).
    pub fn with_outer(mut self, first: usize, last: usize, kind: CacheKind) -> Self {
        self.outer = Some((first, last, kind));
        self
    }

    /// Sets the capacity limit.
    pub fn with_max_tokens(mut self, max: usize) -> Self {
        self.max_tokens = Some(max);
        self
    }

    /// The kind of layer `layer` (explicit overrides only; see [`Self::kind_in`]).
    pub fn kind_of(&self, layer: usize) -> CacheKind {
        self.overrides
            .iter()
            .rev()
            .find(|(l, _)| *l == layer)
            .map_or(self.default, |(_, k)| *k)
    }

    /// The kind of layer `layer` of a model with `n_layers` layers: explicit overrides first,
    /// then the outer-layer rule, then the default.
    pub fn kind_in(&self, layer: usize, n_layers: usize) -> CacheKind {
        if let Some((_, k)) = self.overrides.iter().rev().find(|(l, _)| *l == layer) {
            return *k;
        }
        match self.outer {
            Some((first, last, k)) if layer < first || layer + last >= n_layers => k,
            _ => self.default,
        }
    }

    /// The kind of layer `layer` of a model of `n_layers` layers with `kv_heads` heads of
    /// `head_dim`: explicit overrides, the outer-layer rule, then the preset's per-layer
    /// profile for that shape ([`crate::profiles`]), then the default.
    pub fn kind_for(
        &self,
        layer: usize,
        n_layers: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<CacheKind> {
        let explicit = self.overrides.iter().any(|(l, _)| *l == layer)
            || matches!(self.outer, Some((f, l, _)) if layer < f || layer + l >= n_layers);
        if !explicit {
            let profile = self
                .preset
                .and_then(|p| crate::profiles::profile_for(p, (n_layers, kv_heads, head_dim)));
            if let Some(p) = profile {
                if p.up.contains(&layer) {
                    return p.up_kind.parse();
                }
                if p.down.contains(&layer) {
                    return p.down_kind.parse();
                }
            }
        }
        Ok(self.kind_in(layer, n_layers))
    }

    /// Builds the cache of layer `layer` of an `n_layers`-layer model (see [`Self::build`]),
    /// of the kind [`Self::kind_for`] gives.
    pub fn build_in(
        &self,
        layer: usize,
        n_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        device: &Device,
    ) -> Result<Box<dyn KvCache>> {
        self.build_layer(layer, n_layers, (kv_heads, head_dim), device, None)
    }

    /// [`Self::build_in`] with the storage in `arena` (shared with every cache built in it)
    /// for the kinds that page ([`CacheKind::pages`]); the other kinds keep their own buffers
    /// on the arena's device.
    pub fn build_paged(
        &self,
        layer: usize,
        n_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        arena: &std::sync::Arc<crate::TileArena>,
    ) -> Result<Box<dyn KvCache>> {
        self.build_layer(
            layer,
            n_layers,
            (kv_heads, head_dim),
            arena.device(),
            Some(arena),
        )
    }

    /// The cache of layer `layer` of an `n_layers`-layer model, of [`Self::kind_for`]'s kind.
    fn build_layer(
        &self,
        layer: usize,
        n_layers: usize,
        (kv_heads, head_dim): (usize, usize),
        device: &Device,
        arena: Option<&std::sync::Arc<crate::TileArena>>,
    ) -> Result<Box<dyn KvCache>> {
        let kind = self.kind_for(layer, n_layers, kv_heads, head_dim)?;
        self.build_kind(kind, layer, kv_heads, head_dim, device, arena)
    }

    /// Builds the cache of layer `layer` for `kv_heads` heads of `head_dim` on `device`.
    pub fn build(
        &self,
        layer: usize,
        kv_heads: usize,
        head_dim: usize,
        device: &Device,
    ) -> Result<Box<dyn KvCache>> {
        self.build_kind(self.kind_of(layer), layer, kv_heads, head_dim, device, None)
    }

    fn build_kind(
        &self,
        kind: CacheKind,
        layer: usize,
        kv_heads: usize,
        head_dim: usize,
        device: &Device,
        arena: Option<&std::sync::Arc<crate::TileArena>>,
    ) -> Result<Box<dyn KvCache>> {
        if kv_heads == 0 || head_dim == 0 {
            fail!(Kind, "a KV cache needs kv_heads ≥ 1 and head_dim ≥ 1");
        }
        let max = self.max_tokens;
        Ok(match kind {
            CacheKind::Full(dt) => Box::new(match arena {
                Some(a) => FullCache::new_in(kv_heads, head_dim, dt, a, max)?,
                None => FullCache::new(kv_heads, head_dim, dt, device, max)?,
            }),
            CacheKind::Q8 => Box::new(CodecCache::new(Q8, kv_heads, head_dim, max)),
            CacheKind::Q4Hadamard => Box::new(CodecCache::new(
                Q4Hadamard::new(
                    head_dim,
                    tqkv::rng::derive_seed(self.seed, 1000 + layer as u64),
                )?,
                kv_heads,
                head_dim,
                max,
            )),
            CacheKind::Q5Hadamard => Box::new(CodecCache::new(
                Q5Hadamard::new(
                    head_dim,
                    tqkv::rng::derive_seed(self.seed, 1000 + layer as u64),
                )?,
                kv_heads,
                head_dim,
                max,
            )),
            CacheKind::Kivi { bits, residual } => {
                Box::new(KiviCache::new(bits, residual, kv_heads, head_dim, max)?)
            }
            CacheKind::Turbo(spec) => {
                let seed = tqkv::rng::derive_seed(self.seed, layer as u64);
                Box::new(match arena {
                    Some(a) => TurboCache::new_in(spec, kv_heads, head_dim, a, seed, max)?,
                    None => TurboCache::new(spec, kv_heads, head_dim, device, seed, max)?,
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_overrides_apply() {
        let k: CacheKind = "tqk4v2.5-qjl".parse().unwrap();
        let CacheKind::Turbo(spec) = k else { panic!() };
        assert_eq!(spec.key.bits, BitsSpec::Uniform(4));
        assert_eq!(spec.value.bits, "2.5".parse().unwrap());
        assert!(matches!(
            spec.key.mode,
            Mode::Prod {
                orthogonal: false,
                ..
            }
        ));
        assert_eq!(spec.value.mode, Mode::Mse);
        let cfg = CacheConfig::new("tq3".parse().unwrap()).with_outer_layers(
            1,
            2,
            6,
            CacheKind::Full(DType::F16),
        );
        let kinds: Vec<CacheKind> = (0..6).map(|l| cfg.kind_of(l)).collect();
        assert_eq!(kinds[0], CacheKind::Full(DType::F16));
        assert!(matches!(kinds[1], CacheKind::Turbo(_)));
        assert!(matches!(kinds[3], CacheKind::Turbo(_)));
        assert_eq!(kinds[4], CacheKind::Full(DType::F16));
        assert_eq!(kinds[5], CacheKind::Full(DType::F16));
        let c = cfg.build(5, 2, 64, &Device::Cpu).unwrap();
        assert_eq!(c.kind_name(), "f16");
        assert_eq!(
            cfg.build(2, 2, 64, &Device::Cpu).unwrap().kind_name(),
            "tq3"
        );
        let outer = CacheConfig::new("tq3".parse().unwrap()).with_outer(1, 2, CacheKind::Q8);
        let kinds: Vec<CacheKind> = (0..6).map(|l| outer.kind_in(l, 6)).collect();
        assert_eq!(kinds[0], CacheKind::Q8);
        assert!(matches!(
            kinds[1..4],
            [
                CacheKind::Turbo(_),
                CacheKind::Turbo(_),
                CacheKind::Turbo(_)
            ]
        ));
        assert_eq!((kinds[4], kinds[5]), (CacheKind::Q8, CacheKind::Q8));
        assert_eq!(
            outer
                .build_in(5, 6, 2, 64, &Device::Cpu)
                .unwrap()
                .kind_name(),
            "q8"
        );
        assert!("tqk4".parse::<CacheKind>().is_err());
        assert!("tq3.5-fast"
            .parse::<CacheKind>()
            .unwrap_err()
            .to_string()
            .contains("-qjl"));
    }

    fn turbo(s: &str) -> KvSpec {
        match s.parse::<CacheKind>().unwrap() {
            CacheKind::Turbo(k) => k,
            other => panic!("{s} parsed as {other:?}"),
        }
    }

    #[test]
    fn presets_expand_and_paper_names_keep_the_paper() {
        for (name, spec) in PRESETS {
            assert_eq!(turbo(name), turbo(spec), "{name}");
        }
        let p = turbo("tq3.5");
        assert_eq!((p.sinks, p.rotations), (1, 4));
        assert!(p.center_keys && p.budget_bits == Some(4.0));
        assert_eq!(p.key.rotation, RotationKind::Hadamard);
        let paper = turbo("tq3.5-paper");
        assert_eq!(paper, KvSpec::mse("3.5".parse().unwrap()));
        assert_eq!(turbo("tq3.5-paper-had"), turbo("tq3.5-had"));
        // Names that are not exactly a preset build on the paper's configuration.
        assert_eq!(turbo("tq3"), KvSpec::mse(BitsSpec::Uniform(3)));
        assert!(!turbo("tq3.5-c").has_exact());
    }

    #[test]
    fn suffixes_parse_with_their_bounds() {
        let s = turbo("tqk4v2-had-pnk-c-cv-ks0.25-fc-r3-s2-w9-b4.5");
        assert_eq!(s.key.norm_rule, NormRule::Projected);
        assert_eq!(s.value.norm_rule, NormRule::Exact);
        assert!(s.center_keys && s.center_values && s.fit_codebooks);
        assert_eq!(s.key_scale, Some(0.25));
        assert_eq!(
            (s.rotations, s.sinks, s.window, s.budget_bits),
            (3, 2, 9, Some(4.5))
        );
        assert_eq!(turbo("tq3-ks").key_scale, Some(0.5));
        assert_eq!(turbo("tq3-pnv").value.norm_rule, NormRule::Projected);
        for bad in [
            "tq3-r0",
            "tq3-r5",
            "tq3-b0",
            "tq3-b17",
            "tq3-b4.x",
            "tq3-ks3",
            "tq3-ksx",
            "tq3-s",
            "kivi3",
            "kivi4-rx",
            "kivi4-r99999999",
        ] {
            assert!(bad.parse::<CacheKind>().is_err(), "{bad}");
        }
        assert_eq!(
            "kivi4-r0".parse::<CacheKind>().unwrap(),
            CacheKind::Kivi {
                bits: 4,
                residual: 0
            }
        );
        assert_eq!("q5h".parse::<CacheKind>().unwrap(), CacheKind::Q5Hadamard);
    }

    #[test]
    fn layer_overrides_and_profiles_pick_each_layers_kind() {
        // `K@B+J@C` bits inside the kind and inside an override are not overrides.
        let cfg: CacheConfig = "tq32@3+96@2-had@0-1=tq16@4+48@3".parse().unwrap();
        assert!(matches!(cfg.default, CacheKind::Turbo(_)));
        assert_eq!(cfg.overrides.len(), 2);
        assert!("tq32@3+96@2@5".parse::<CacheConfig>().is_err());
        let cfg: CacheConfig = "tq3@0-1=q8@4=f16@1=f32".parse().unwrap();
        let kinds: Vec<CacheKind> = (0..6).map(|l| cfg.kind_in(l, 6)).collect();
        assert_eq!(kinds[0], CacheKind::Q8);
        assert_eq!(kinds[1], CacheKind::Full(DType::F32), "later overrides win");
        assert_eq!(kinds[4], CacheKind::Full(DType::F16));
        assert!(matches!(kinds[2], CacheKind::Turbo(_)));
        for bad in [
            "tq3@",
            "tq3@1",
            "tq3@x=q8",
            "tq3@3-1=q8",
            "tq3@1=zz",
            "tq3@99999=q8",
        ] {
            assert!(bad.parse::<CacheConfig>().is_err(), "{bad}");
        }
        // The preset's profile applies to a model of its shape only, and not over explicit
        // overrides.
        let p = crate::profiles::PROFILES[0];
        let (n, h, d) = p.shape;
        let cfg: CacheConfig = format!("{}@{}=q8", p.preset, p.up[1]).parse().unwrap();
        assert_eq!(cfg.preset, Some(p.preset));
        let up: CacheKind = p.up_kind.parse().unwrap();
        let down: CacheKind = p.down_kind.parse().unwrap();
        let base: CacheKind = p.preset.parse().unwrap();
        assert_eq!(cfg.kind_for(p.up[0], n, h, d).unwrap(), up);
        assert_eq!(cfg.kind_for(p.up[1], n, h, d).unwrap(), CacheKind::Q8);
        assert_eq!(cfg.kind_for(p.down[0], n, h, d).unwrap(), down);
        let other = (0..n)
            .find(|l| !p.up.contains(l) && !p.down.contains(l))
            .unwrap();
        assert_eq!(cfg.kind_for(other, n, h, d).unwrap(), base);
        assert_eq!(cfg.kind_for(p.up[0], n + 2, h, d).unwrap(), base);
        let expansion = PRESETS.iter().find(|x| x.0 == p.preset).unwrap().1;
        let plain: CacheConfig = expansion.parse().unwrap();
        assert_eq!(plain.preset, None);
        assert_eq!(plain.kind_for(p.up[0], n, h, d).unwrap(), base);
        // Every profile's up and down kinds average to its preset's budget, on distinct layers.
        let b = |k: CacheKind| match k {
            CacheKind::Turbo(s) => s.budget_bits.unwrap(),
            _ => panic!(),
        };
        for p in crate::profiles::PROFILES {
            let (up, down, base) = (
                p.up_kind.parse().unwrap(),
                p.down_kind.parse().unwrap(),
                p.preset.parse().unwrap(),
            );
            assert_eq!(p.up.len(), p.down.len(), "{}", p.preset);
            assert!(
                (b(up) + b(down) - 2.0 * b(base)).abs() < 1e-6,
                "{}",
                p.preset
            );
            assert!(p.up.iter().all(|l| !p.down.contains(l) && *l < p.shape.0));
            assert!(p.down.iter().all(|l| *l < p.shape.0));
        }
    }
}
