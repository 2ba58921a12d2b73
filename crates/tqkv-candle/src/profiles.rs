//! Per-layer bit allocations measured on known models: a preset's bits moved from the layers
//! whose quantization costs the model least to those where it costs most, at the same average
//! budget (TurboQuant spends the same bits everywhere; the layers of a model do not suffer
//! alike).
//!
//! A profile is measured with `tqkv eval layers --kv <preset>` (each layer's share of the KL
//! divergence when it alone is quantized) on a calibration text, and applies when a cache is
//! built by the preset's name for a model of the profile's shape (layers, KV heads, head_dim).
//! The `up` layers get `up_kind`, the `down` layers `down_kind`, all others the preset; the
//! two kinds' budgets average to the preset's, so the cache's size does not change.
//! docs/QUALITY.md has the measurements.

/// One model's allocation for one preset.
#[derive(Debug, Clone, Copy)]
pub struct LayerProfile {
    /// The model it was measured on.
    pub model: &'static str,
    /// Its shape: layers, KV heads, head_dim.
    pub shape: (usize, usize, usize),
    /// The preset name it refines.
    pub preset: &'static str,
    /// The most sensitive layers, given `up_kind`.
    pub up: &'static [usize],
    /// The kind of the `up` layers.
    pub up_kind: &'static str,
    /// The least sensitive layers, given `down_kind`.
    pub down: &'static [usize],
    /// The kind of the `down` layers.
    pub down_kind: &'static str,
}

/// The profiles shipped. SmolLM2-135M-Instruct's were measured on the GNU Coding Standards
/// (scripts/fetch-texts.sh), 4 windows of 512 tokens, and are evaluated on other texts.
pub const PROFILES: &[LayerProfile] = &[LayerProfile {
    model: "SmolLM2-135M-Instruct",
    shape: (30, 3, 64),
    preset: "tq3.5",
    up: &[23, 8, 20, 24, 17, 7, 18, 5],
    up_kind: "tqk4v3-had-pn-c-s1-b4.5-r4-wq8",
    down: &[27, 11, 29, 25, 13, 16, 19, 1],
    down_kind: "tqk4v2-had-pn-c-s1-b3.5-r4-wq8",
}];

/// The profile of `preset` for a model of `shape`, if one is shipped.
pub fn profile_for(preset: &str, shape: (usize, usize, usize)) -> Option<&'static LayerProfile> {
    PROFILES
        .iter()
        .find(|p| p.preset == preset && p.shape == shape)
}
