//! Attention over one KV head's cache, on the CPU: the exact f32 reference and the attention in
//! the rotated domain straight from packed records (DESIGN.md "Attention in the rotated domain";
//! TurboQuant §3 for the estimators, QJL §3 for the sign term).
//!
//! Both take `nq` queries of one KV head's group (GQA: the query heads sharing that KV head, and
//! the tokens of a prefill chunk), each with its own visible length (causal masking and
//! per-sequence lengths are the caller's `visible[i]`: query i sees cache positions
//! 0..visible[i]), and write softmax(scale · q·Kᵀ)·V. A query that sees nothing gets zeros.
//!
//! Packed attention: each query is rotated (and projected by S) once; the records are decoded
//! once per call into their rotated-domain reconstructions n·c[idx] (shared by all queries of
//! the group), so a score is one dot product ⟨Π q, n·c[idx]⟩ in the rotated domain; values are
//! accumulated there too, Σ_i p_i n_i c[idx_i] (+ Sᵀ Σ_i p_i γ_i/(mκ) z_i in prod mode), and
//! un-rotated once per query.
//!
//! Mixed attention ([`attend_mixed`]): the same, with some positions read from full-precision
//! rows ([`ExactRows`]: attention sinks and a per-query sliding window of recent tokens) and one
//! softmax over all positions.

use crate::error::{check_len, Error, Result};
use crate::packing::unpack_codes_unchecked;
use crate::quantizer::VectorQuantizer;
use crate::rotation::dot;

/// Exact attention of `nq` queries over `n` full-precision keys and values of one KV head.
///
/// Layouts (row-major): `q` [nq, d], `k` and `v` [n, d], `out` [nq, d]; `visible` [nq], each ≤ n.
pub fn attend_exact(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: usize,
    visible: &[usize],
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let n = check_dense(q, k, v, d, visible, out)?;
    let mut p = vec![0.0f32; n];
    for (i, &vis) in visible.iter().enumerate() {
        let qi = &q[i * d..(i + 1) * d];
        for (j, pj) in p[..vis].iter_mut().enumerate() {
            *pj = scale * dot(qi, &k[j * d..(j + 1) * d]);
        }
        softmax_in_place(&mut p[..vis]);
        let o = &mut out[i * d..(i + 1) * d];
        o.iter_mut().for_each(|x| *x = 0.0);
        for (j, &pj) in p[..vis].iter().enumerate() {
            for (x, &vv) in o.iter_mut().zip(&v[j * d..(j + 1) * d]) {
                *x += pj * vv;
            }
        }
    }
    Ok(())
}

/// Checks the layouts of exact attention ([`attend_exact`]'s): returns the positions n.
pub(crate) fn check_dense(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: usize,
    visible: &[usize],
    out: &[f32],
) -> Result<usize> {
    let nq = visible.len();
    let n = k.len() / d.max(1);
    check_len("queries", q.len(), nq * d)?;
    check_len("keys", k.len(), n * d)?;
    check_len("values", v.len(), n * d)?;
    check_len("output", out.len(), nq * d)?;
    check_visible(visible, n)?;
    Ok(n)
}

fn check_visible(visible: &[usize], n: usize) -> Result<()> {
    match visible.iter().find(|&&v| v > n) {
        Some(v) => Err(Error::Config(format!(
            "a query sees {v} positions but the cache holds {n}"
        ))),
        None => Ok(()),
    }
}

/// Max-subtracted softmax in place; an empty slice stays empty.
pub fn softmax_in_place(p: &mut [f32]) {
    let m = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if p.is_empty() {
        return;
    }
    let mut s = 0.0f64;
    for x in p.iter_mut() {
        *x = (*x - m).exp();
        s += *x as f64;
    }
    let inv = (1.0 / s) as f32;
    p.iter_mut().for_each(|x| *x *= inv);
}

/// One group's records unpacked: rotated-domain reconstructions, signs as ±1, γ as f32.
struct Unpacked {
    dim: usize,
    mse_bits: u8,
    m: usize,
    /// Rotated-domain reconstructions n·c[idx], row-major [n, dim] (MSE groups).
    rot: Vec<f32>,
    signs: Vec<f32>,
    gammas: Vec<f32>,
}

fn unpack_all(q: &VectorQuantizer, records: &[u8], n: usize) -> Vec<Unpacked> {
    let rb = q.record_bytes();
    let fmt = q.spec().norm;
    q.layout()
        .groups
        .iter()
        .enumerate()
        .map(|(g, gl)| {
            let mut u = Unpacked {
                dim: gl.dim,
                mse_bits: gl.mse_bits,
                m: gl.sketch_dim,
                rot: vec![0.0; if gl.mse_bits > 0 { n * gl.dim } else { 0 }],
                signs: vec![0.0; n * gl.sketch_dim],
                gammas: vec![0.0; n],
            };
            let mut bits = vec![0u8; gl.sketch_dim];
            let mut codes = vec![0u8; gl.dim];
            let cent = q.group_mse(g).map(|m| m.codebook().centroids());
            for i in 0..n {
                let rec = &records[i * rb..(i + 1) * rb];
                if let (true, Some(c)) = (gl.mse_bits > 0, cent) {
                    let len = crate::packing::packed_len(gl.dim, gl.mse_bits);
                    unpack_codes_unchecked(
                        &rec[gl.codes_offset..gl.codes_offset + len],
                        gl.mse_bits,
                        &mut codes,
                    );
                    let nrm = fmt.read(rec, gl.norm_offset);
                    for (r, &k) in u.rot[i * gl.dim..(i + 1) * gl.dim].iter_mut().zip(&codes) {
                        *r = nrm * c[k as usize];
                    }
                }
                if gl.sketch_dim > 0 {
                    let len = gl.sketch_dim.div_ceil(8);
                    unpack_codes_unchecked(
                        &rec[gl.signs_offset..gl.signs_offset + len],
                        1,
                        &mut bits,
                    );
                    for (s, &b) in u.signs[i * gl.sketch_dim..(i + 1) * gl.sketch_dim]
                        .iter_mut()
                        .zip(&bits)
                    {
                        *s = if b != 0 { 1.0 } else { -1.0 };
                    }
                    u.gammas[i] = fmt.read(rec, gl.gamma_offset);
                }
            }
            u
        })
        .collect()
}

/// The full-precision rows of one KV head that a cache with attention sinks or an exact window
/// keeps beside its packed records ([`crate::KvSpec::sinks`], [`crate::KvSpec::window`]).
///
/// Query i, which sees positions `0..vis`, reads positions `0..min(sinks, vis)` from `sink_k` /
/// `sink_v`, positions `packed_end[i]..vis` from `win_k` / `win_v`, and the positions in
/// between from the packed records.
///
/// Layouts (row-major f32): `sink_k`, `sink_v` [rows, d] for positions 0..rows (at least the
/// sinks any query sees); `win_k`, `win_v` [rows, d] for positions `win_start..win_start + rows`
/// (at least the window of every query); `packed_end` [nq], each in `min(sinks, vis)..=vis`.
#[derive(Debug, Clone, Copy)]
pub struct ExactRows<'a> {
    /// Sink tokens S.
    pub sinks: usize,
    /// Per query: the end of the range read from records (the start of its window).
    pub packed_end: &'a [usize],
    /// Keys of the sink positions.
    pub sink_k: &'a [f32],
    /// Values of the sink positions.
    pub sink_v: &'a [f32],
    /// Position of the first window row.
    pub win_start: usize,
    /// Keys of the window rows.
    pub win_k: &'a [f32],
    /// Values of the window rows.
    pub win_v: &'a [f32],
}

impl ExactRows<'_> {
    /// (sinks read exactly, end of the packed range) of query i, which sees `vis` positions:
    /// sinks `0..s`, records `s..p`, window `p..vis`.
    fn split(&self, i: usize, vis: usize) -> (usize, usize) {
        let s = self.sinks.min(vis);
        (
            s,
            self.packed_end.get(i).copied().unwrap_or(vis).clamp(s, vis),
        )
    }

    pub(crate) fn check(&self, d: usize, visible: &[usize]) -> Result<()> {
        let rows = |x: &[f32]| x.len() / d.max(1);
        if self.sink_k.len() != self.sink_v.len()
            || self.win_k.len() != self.win_v.len()
            || self.sink_k.len() % d.max(1) != 0
            || self.win_k.len() % d.max(1) != 0
        {
            return Err(Error::Config(format!(
                "exact rows: keys and values must be whole rows of {d} of the same count"
            )));
        }
        if !self.packed_end.is_empty() && self.packed_end.len() != visible.len() {
            return Err(Error::Config(format!(
                "exact rows: {} packed ends for {} queries",
                self.packed_end.len(),
                visible.len()
            )));
        }
        for (i, &vis) in visible.iter().enumerate() {
            let pe = self.packed_end.get(i).copied().unwrap_or(vis);
            let (s, p) = self.split(i, vis);
            if pe != p {
                return Err(Error::Config(format!(
                    "query {i}: packed end {pe} is outside {s}..={vis}"
                )));
            }
            if s > rows(self.sink_k) {
                return Err(Error::Config(format!(
                    "a query reads {s} sink rows, {} are given",
                    rows(self.sink_k)
                )));
            }
            if p < vis && (p < self.win_start || vis > self.win_start + rows(self.win_k)) {
                return Err(Error::Config(format!(
                    "a query reads window positions {p}..{vis}, the rows given cover {}..{}",
                    self.win_start,
                    self.win_start + rows(self.win_k)
                )));
            }
        }
        Ok(())
    }
}

/// Attention of `nq` queries over `n` packed keys and values of one KV head, computed from the
/// codes (see the module docs). `kq`/`vq` are the quantizers that wrote the records.
///
/// Layouts: `q` [nq, d] f32; `k_records` [n, kq.record_bytes()]; `v_records`
/// [n, vq.record_bytes()]; `visible` [nq]; `out` [nq, d].
#[allow(clippy::too_many_arguments)]
pub fn attend_packed(
    kq: &VectorQuantizer,
    vq: &VectorQuantizer,
    q: &[f32],
    k_records: &[u8],
    v_records: &[u8],
    visible: &[usize],
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    attend_mixed(kq, vq, q, k_records, v_records, None, visible, scale, out)
}

/// [`attend_packed`] where some positions are read from full-precision rows instead of their
/// records ([`ExactRows`]: attention sinks and a sliding window of recent tokens); one softmax
/// over all positions. Record `i` is position `i` (records of exactly-read positions are
/// not read and need not exist: a slot of zeros will do).
#[allow(clippy::too_many_arguments)]
pub fn attend_mixed(
    kq: &VectorQuantizer,
    vq: &VectorQuantizer,
    q: &[f32],
    k_records: &[u8],
    v_records: &[u8],
    exact: Option<&ExactRows>,
    visible: &[usize],
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    attend_cycled(
        std::slice::from_ref(kq),
        std::slice::from_ref(vq),
        q,
        k_records,
        v_records,
        exact,
        visible,
        scale,
        out,
    )
}

/// [`attend_mixed`] where the record of position t was written by quantizer `t % M` of `kqs`
/// (keys) and `vqs` (values), M = their (equal) length: quantizers of one layout and codebooks
/// that differ by their rotations and sketches ([`crate::KvSpec::rotations`]).
#[allow(clippy::too_many_arguments)]
pub fn attend_cycled(
    kqs: &[VectorQuantizer],
    vqs: &[VectorQuantizer],
    q: &[f32],
    k_records: &[u8],
    v_records: &[u8],
    exact: Option<&ExactRows>,
    visible: &[usize],
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let cycle = kqs.len();
    if cycle == 0 || vqs.len() != cycle {
        return Err(Error::Config(format!(
            "{} key and {} value quantizers: need the same number, at least one",
            kqs.len(),
            vqs.len()
        )));
    }
    let (kq, vq) = (&kqs[0], &vqs[0]);
    if kqs.iter().any(|x| x.layout() != kq.layout())
        || vqs.iter().any(|x| x.layout() != vq.layout())
    {
        return Err(Error::Config(
            "cycled quantizers must share one record layout".into(),
        ));
    }
    let d = kq.dim();
    if vq.dim() != d {
        return Err(Error::Config(format!(
            "key dim {d} and value dim {} differ",
            vq.dim()
        )));
    }
    let nq = visible.len();
    let n = k_records.len() / kq.record_bytes();
    check_len("queries", q.len(), nq * d)?;
    check_len("key records", k_records.len(), n * kq.record_bytes())?;
    check_len("value records", v_records.len(), n * vq.record_bytes())?;
    check_len("output", out.len(), nq * d)?;
    check_visible(visible, n)?;
    let none = ExactRows {
        sinks: 0,
        packed_end: &[],
        sink_k: &[],
        sink_v: &[],
        win_start: 0,
        win_k: &[],
        win_v: &[],
    };
    let ex = exact.unwrap_or(&none);
    ex.check(d, visible)?;
    let ku = unpack_all(kq, k_records, n);
    let vu = unpack_all(vq, v_records, n);
    let mut p = vec![0.0f32; n];
    // Full-precision row of position `pos` (a sink or a window position).
    // (Window positions are ≥ the sinks: `split` gives s = S whenever a window exists.)
    let row = |pos: usize, s: usize| -> std::ops::Range<usize> {
        if pos < s {
            pos * d..(pos + 1) * d
        } else {
            (pos - ex.win_start) * d..(pos - ex.win_start + 1) * d
        }
    };
    for (i, &vis) in visible.iter().enumerate() {
        let o = &mut out[i * d..(i + 1) * d];
        o.iter_mut().for_each(|x| *x = 0.0);
        if vis == 0 {
            continue;
        }
        let qi = &q[i * d..(i + 1) * d];
        // Sinks 0..s and window w..vis exact, records s..w.
        let (s, w) = ex.split(i, vis);
        for (pos, pt) in p[..s].iter_mut().enumerate() {
            *pt = dot(qi, &ex.sink_k[row(pos, s)]);
        }
        for (pos, pt) in p.iter_mut().enumerate().take(vis).skip(w) {
            *pt = dot(qi, &ex.win_k[row(pos, s)]);
        }
        // Scores from codes (the query rotated once per quantizer of the cycle).
        if s < w {
            let preps = kqs
                .iter()
                .map(|k| k.prepare_query(qi))
                .collect::<Result<Vec<_>>>()?;
            p[s..w].iter_mut().for_each(|x| *x = 0.0);
            for (g, u) in ku.iter().enumerate() {
                if u.mse_bits > 0 {
                    for (t, pt) in p.iter_mut().enumerate().take(w).skip(s) {
                        let qr = preps[t % cycle].rotated(g);
                        *pt += dot(qr, &u.rot[t * u.dim..(t + 1) * u.dim]);
                    }
                }
                if u.m > 0 {
                    let qjl = kq.group_qjl(g).expect("group has a sketch");
                    let a = (1.0 / (u.m as f64 * qjl.kappa())) as f32;
                    for (t, pt) in p.iter_mut().enumerate().take(w).skip(s) {
                        let sq = preps[t % cycle].projected(g);
                        *pt += a * u.gammas[t] * dot(sq, &u.signs[t * u.m..(t + 1) * u.m]);
                    }
                }
            }
        }
        p[..vis].iter_mut().for_each(|x| *x *= scale);
        softmax_in_place(&mut p[..vis]);
        // Values of the packed range accumulated in the rotated domain (one accumulator per
        // quantizer of the cycle), un-rotated once each.
        if s < w {
            for (g, u) in vu.iter().enumerate() {
                let mut xg = vec![0.0f32; u.dim];
                for (m, vqm) in vqs.iter().enumerate() {
                    let mut acc = vec![0.0f32; u.dim];
                    let first = s + (m + cycle - s % cycle) % cycle;
                    if u.mse_bits > 0 {
                        for t in (first..w).step_by(cycle) {
                            let pt = p[t];
                            for (x, &r) in acc.iter_mut().zip(&u.rot[t * u.dim..(t + 1) * u.dim]) {
                                *x += pt * r;
                            }
                        }
                    }
                    if u.m > 0 {
                        let qjl = vqm.group_qjl(g).expect("group has a sketch");
                        let a = (1.0 / (u.m as f64 * qjl.kappa())) as f32;
                        let mut accz = vec![0.0f32; u.m];
                        for t in (first..w).step_by(cycle) {
                            let wt = p[t] * a * u.gammas[t];
                            for (x, &z) in accz.iter_mut().zip(&u.signs[t * u.m..(t + 1) * u.m]) {
                                *x += wt * z;
                            }
                        }
                        let sm = qjl.matrix();
                        for (l, &z) in accz.iter().enumerate() {
                            for (x, &sv) in acc.iter_mut().zip(&sm[l * u.dim..(l + 1) * u.dim]) {
                                *x += z * sv;
                            }
                        }
                    }
                    match vqm.group_mse(g) {
                        Some(mse) => {
                            let mut x = vec![0.0f32; u.dim];
                            mse.rotation().apply_inverse_unchecked(&acc, &mut x);
                            xg.iter_mut().zip(&x).for_each(|(a, b)| *a += b);
                        }
                        None => xg.iter_mut().zip(&acc).for_each(|(a, b)| *a += b),
                    }
                }
                for (&c, xv) in vq.group_channels(g).iter().zip(xg) {
                    o[c] = xv;
                }
            }
        }
        // Exact values.
        for pos in (0..s).chain(w..vis) {
            let v = if pos < s { ex.sink_v } else { ex.win_v };
            let pt = p[pos];
            for (x, &vv) in o.iter_mut().zip(&v[row(pos, s)]) {
                *x += pt * vv;
            }
        }
    }
    Ok(())
}
