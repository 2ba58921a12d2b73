//! Quality of a KV cache measured on the model: the next-token distributions of a model run
//! with the cache under test against the same model run with a reference cache (f16) on the
//! same text — mean and maximum KL divergence KL(P_ref ‖ P_test), perplexity of both, and how
//! often their top-1 tokens agree. These are llama.cpp's `perplexity --kl-divergence` measures
//! (the numbers of ../shared/docs/ANCHORS.md), computed in f64.
//!
//! Needle retrieval ([`needle_case`]): a secret number hidden at a chosen depth of a filler text
//! of a chosen length, asked for afterwards in the chat template; found if the greedy answer
//! contains it.
//!
//! Like llama.cpp, a text is cut into windows of `ctx` tokens, each run from an empty cache,
//! and only the second half of each window is scored, so that every scored token has at least
//! `ctx / 2` tokens of context in the cache. Windows run through the model in chunks of
//! `chunk` tokens (chunked prefill: later chunks attend to the quantized past).

use crate::{Error, Llama, Result};
use candle_core::Tensor;

/// Log-softmax of `logits` in f64. Errors on an empty or non-finite row.
pub fn log_softmax(logits: &[f32]) -> Result<Vec<f64>> {
    let lse = log_sum_exp(logits)?;
    Ok(logits.iter().map(|&x| x as f64 - lse).collect())
}

/// log Σ exp(logits), in f64 (what [`log_softmax`] subtracts). Errors: no logits, or one that
/// is not finite.
fn log_sum_exp(logits: &[f32]) -> Result<f64> {
    if logits.is_empty() {
        return Err(Error::Input("empty logits".into()));
    }
    if let Some(i) = logits.iter().position(|x| !x.is_finite()) {
        return Err(Error::Input(format!(
            "logit {i} is not finite ({})",
            logits[i]
        )));
    }
    let m = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    Ok(m + logits
        .iter()
        .map(|&x| (x as f64 - m).exp())
        .sum::<f64>()
        .ln())
}

/// The measures of one scored position.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Position {
    /// KL(P_ref ‖ P_test) in nats.
    pub kld: f64,
    /// −log P_ref(next token).
    pub nll_ref: f64,
    /// −log P_test(next token).
    pub nll: f64,
    /// Whether both distributions have the same most likely token.
    pub top1_same: bool,
}

impl Position {
    /// Measures one position: the reference's and the tested model's logits, and the token
    /// that actually follows.
    pub fn measure(reference: &[f32], test: &[f32], next: u32) -> Result<Position> {
        if reference.len() != test.len() {
            return Err(Error::Input(format!(
                "logit rows of {} and {} entries",
                reference.len(),
                test.len()
            )));
        }
        let n = next as usize;
        if n >= reference.len() {
            return Err(Error::Input(format!(
                "token {next} is outside the vocabulary of {}",
                reference.len()
            )));
        }
        // log_softmax's values, computed where they are used (no row-sized buffers: a pass
        // scores a thousand rows of the vocabulary's size).
        let (sp, sq) = (log_sum_exp(reference)?, log_sum_exp(test)?);
        let lp = |i: usize| reference[i] as f64 - sp;
        let lq = |i: usize| test[i] as f64 - sq;
        let kld: f64 = (0..reference.len())
            .map(|i| {
                let (a, b) = (lp(i), lq(i));
                a.exp() * (a - b)
            })
            .sum::<f64>()
            .max(0.0);
        Ok(Position {
            kld,
            nll_ref: -lp(n),
            nll: -lq(n),
            top1_same: argmax((0..reference.len()).map(lp)) == argmax((0..test.len()).map(lq)),
        })
    }
}

/// Accumulated measures over scored positions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogitStats {
    /// Scored positions.
    pub tokens: usize,
    /// Σ KL(P_ref ‖ P_test) in nats.
    pub kld_sum: f64,
    /// Largest KL of one position.
    pub kld_max: f64,
    /// Σ −log P_ref(next token).
    pub nll_ref: f64,
    /// Σ −log P_test(next token).
    pub nll: f64,
    /// Positions where both distributions have the same most likely token.
    pub top1_same: usize,
}

impl LogitStats {
    /// Scores one position: the reference's and the tested model's logits, and the token that
    /// actually follows.
    pub fn add(&mut self, reference: &[f32], test: &[f32], next: u32) -> Result<()> {
        self.push(&Position::measure(reference, test, next)?);
        Ok(())
    }

    /// Adds a measured position.
    pub fn push(&mut self, p: &Position) {
        self.tokens += 1;
        self.kld_sum += p.kld;
        self.kld_max = self.kld_max.max(p.kld);
        self.nll_ref += p.nll_ref;
        self.nll += p.nll;
        self.top1_same += usize::from(p.top1_same);
    }

    /// Mean KL divergence per scored token (nats).
    pub fn mean_kld(&self) -> f64 {
        self.kld_sum / self.tokens.max(1) as f64
    }

    /// Perplexity of the tested model.
    pub fn ppl(&self) -> f64 {
        (self.nll / self.tokens.max(1) as f64).exp()
    }

    /// Perplexity of the reference.
    pub fn ppl_ref(&self) -> f64 {
        (self.nll_ref / self.tokens.max(1) as f64).exp()
    }

    /// Fraction of scored positions whose top-1 tokens agree.
    pub fn top1(&self) -> f64 {
        self.top1_same as f64 / self.tokens.max(1) as f64
    }
}

fn argmax(x: impl Iterator<Item = f64>) -> usize {
    x.enumerate()
        .fold((0, f64::NEG_INFINITY), |(bi, bv), (i, v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// The windows of `tokens`: consecutive, non-overlapping runs of `ctx` tokens, at most `max`.
/// Errors when `ctx < 3` (nothing would be scored), or the text is shorter than one window.
pub fn windows(tokens: &[u32], ctx: usize, max: usize) -> Result<Vec<&[u32]>> {
    if ctx < 3 {
        return Err(Error::Input(format!(
            "a window needs at least 3 tokens (its second half is scored), not {ctx}"
        )));
    }
    if tokens.len() < ctx {
        return Err(Error::Input(format!(
            "the text has {} tokens, fewer than one window of {ctx}",
            tokens.len()
        )));
    }
    Ok(tokens.chunks_exact(ctx).take(max.max(1)).collect())
}

/// Runs one window from an empty cache in chunks of `chunk` tokens and returns the logits of
/// its scored positions (the second half, each predicting the next token of the window):
/// `[ctx − ctx/2 − 1, vocab]` f32 on the host. The model's caches are reset first, and hold
/// the window afterwards (for [`Llama::kv_memory`]).
pub fn scored_logits(model: &mut Llama, window: &[u32], chunk: usize) -> Result<Tensor> {
    let chunk = chunk.max(1);
    let first = window.len() / 2;
    model.reset();
    let mut rows = Vec::new();
    let mut at = 0;
    for piece in window[..window.len() - 1].chunks(chunk) {
        let lo = first.max(at) - at;
        // A chunk with no scored position needs no logits beyond the last (the LM head is a
        // fifth of the model's work per token).
        let logits = model.forward(piece, lo < piece.len())?;
        if lo < piece.len() {
            rows.push(logits.narrow(0, lo, piece.len() - lo)?);
        }
        at += piece.len();
    }
    Ok(Tensor::cat(&rows, 0)?.to_device(&candle_core::Device::Cpu)?)
}

/// Adds the scored positions of one window to `stats`: `reference` and `test` from
/// [`scored_logits`] on the same `window`.
pub fn score_window(
    stats: &mut LogitStats,
    reference: &Tensor,
    test: &Tensor,
    window: &[u32],
) -> Result<()> {
    use rayon::prelude::*;
    let (r, t) = (reference.dims2()?, test.dims2()?);
    let first = window.len() / 2;
    if r != t || first + r.0 + 1 != window.len() {
        return Err(Error::Input(format!(
            "{} reference and {} tested rows for a window of {}",
            r.0,
            t.0,
            window.len()
        )));
    }
    let vocab = r.1.max(1);
    let (r, t) = (
        reference.flatten_all()?.to_vec1::<f32>()?,
        test.flatten_all()?.to_vec1::<f32>()?,
    );
    // Rows measured in parallel, added in order (the same sums for any thread count).
    let rows: Vec<Position> = r
        .par_chunks(vocab)
        .zip(t.par_chunks(vocab))
        .enumerate()
        .map(|(i, (a, b))| Position::measure(a, b, window[first + i + 1]))
        .collect::<Result<_>>()?;
    rows.iter().for_each(|p| stats.push(p));
    Ok(())
}

/// The filler text cut to its first `tokens` tokens, with `needle` inserted at the sentence
/// boundary (". ") nearest to `depth` (0 = start, 1 = end) of it.
pub fn haystack(
    tokenizer: &tokenizers::Tokenizer,
    filler: &str,
    tokens: usize,
    needle: &str,
    depth: f64,
) -> Result<String> {
    if !(0.0..=1.0).contains(&depth) {
        return Err(Error::Input(format!(
            "needle depth {depth} is not in 0..=1"
        )));
    }
    let enc = tokenizer
        .encode(filler, false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let ids = enc.get_ids();
    if ids.len() < tokens {
        return Err(Error::Input(format!(
            "the filler text has {} tokens, fewer than the {tokens} asked for",
            ids.len()
        )));
    }
    let text = tokenizer
        .decode(&ids[..tokens], false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let target = (depth * text.len() as f64) as usize;
    // Candidate cut points: the start, every ". " boundary, the end.
    let cut = std::iter::once(0)
        .chain(text.match_indices(". ").map(|(i, _)| i + 2))
        .chain(std::iter::once(text.len()))
        .min_by_key(|&i| i.abs_diff(target))
        .unwrap_or(0);
    Ok(format!("{}{} {}", &text[..cut], needle, &text[cut..]))
}

/// The token ids of `content` as one user turn in the model's chat template, ready for the
/// assistant's answer.
pub fn user_prompt_ids(m: &crate::Loaded, content: &str) -> Result<Vec<u32>> {
    let prompt = m
        .template
        .render(
            &[crate::template::Message {
                role: "user".into(),
                content: content.into(),
            }],
            true,
        )
        .map_err(|e| Error::Template(e.to_string()))?;
    Ok(m.tokenizer
        .encode(prompt.as_str(), false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?
        .get_ids()
        .to_vec())
}

/// Greedy decoding: runs `ids` through the model in prefill chunks of `chunk` tokens (appending
/// to what its caches hold), then takes the most likely token at each step until an EOS token
/// or `max_new` tokens; returns the generated ids.
pub fn greedy(
    m: &mut crate::Loaded,
    ids: &[u32],
    chunk: usize,
    max_new: usize,
) -> Result<Vec<u32>> {
    let mut logits = None;
    for piece in ids.chunks(chunk.max(1)) {
        logits = Some(m.model.forward(piece, false)?);
    }
    let mut logits = logits.ok_or_else(|| Error::Input("empty prompt".into()))?;
    let mut out = Vec::new();
    for _ in 0..max_new {
        let next = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
        if m.eos_ids.contains(&next) {
            break;
        }
        out.push(next);
        logits = m.model.forward(&[next], false)?;
    }
    Ok(out)
}

/// Short factual questions and the words a right answer contains (any of them, ignoring
/// case), for `tqkv eval qa`: a cache should give the same greedy answer as f16 where f16 is
/// right.
pub const FACTUAL_QUESTIONS: &[(&str, &[&str])] = &[
    (
        "What is the capital of France? Answer in one word.",
        &["Paris"],
    ),
    ("Who wrote Romeo and Juliet?", &["Shakespeare"]),
    (
        "What is the largest planet in our solar system?",
        &["Jupiter"],
    ),
    ("What is the capital of Japan?", &["Tokyo"]),
    ("How many days are there in a week?", &["7", "seven"]),
    ("What color is the sky on a clear day?", &["blue"]),
    ("Who painted the Mona Lisa?", &["Leonardo", "Vinci"]),
    ("What is the capital of Italy?", &["Rome"]),
    ("How many legs does a spider have?", &["8", "eight"]),
    ("What is the largest ocean on Earth?", &["Pacific"]),
    ("In which country are the pyramids of Giza?", &["Egypt"]),
    ("What is the opposite of hot?", &["cold"]),
    ("What is the capital of Germany?", &["Berlin"]),
    ("Which planet is known as the Red Planet?", &["Mars"]),
    ("What language is spoken in Spain?", &["Spanish"]),
    (
        "Who was the first president of the United States?",
        &["Washington"],
    ),
    (
        "What is the boiling point of water in degrees Celsius?",
        &["100"],
    ),
    ("What is the chemical symbol for gold?", &["Au"]),
    ("How many continents are there on Earth?", &["7", "seven"]),
    ("What animal is known as the king of the jungle?", &["lion"]),
];

/// Whether `answer` contains one of `words` (ignoring case).
pub fn answer_is_right(answer: &str, words: &[&str]) -> bool {
    let a = answer.to_lowercase();
    words.iter().any(|w| a.contains(&w.to_lowercase()))
}

/// The greedy answer to `question` asked as one user turn in the model's chat template, up to
/// `max_new` tokens (the caches are reset first).
pub fn greedy_answer(m: &mut crate::Loaded, question: &str, max_new: usize) -> Result<String> {
    let ids = user_prompt_ids(m, question)?;
    m.model.reset();
    let out = greedy(m, &ids, ids.len(), max_new)?;
    m.tokenizer
        .decode(&out, true)
        .map_err(|e| Error::Tokenizer(e.to_string()))
}

/// One needle-retrieval trial.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NeedleCase {
    /// Tokens of the whole prompt (template, haystack, question).
    pub prompt_tokens: usize,
    /// Where the needle is (0 = start of the haystack, 1 = end).
    pub depth: f64,
    /// The secret.
    pub secret: String,
    /// The model's greedy answer.
    pub answer: String,
    /// Whether the answer contains the secret.
    pub found: bool,
}

/// Hides "The secret number is `secret`." at `depth` of `tokens` tokens of `filler`, asks for it
/// in the model's chat template, prefills in chunks of `chunk` and decodes greedily up to
/// `max_new` tokens. The model's caches are reset first.
pub fn needle_case(
    m: &mut crate::Loaded,
    filler: &str,
    tokens: usize,
    depth: f64,
    secret: u32,
    chunk: usize,
    max_new: usize,
) -> Result<NeedleCase> {
    let secret = secret.to_string();
    let hay = haystack(
        &m.tokenizer,
        filler,
        tokens,
        &format!("The secret number is {secret}."),
        depth,
    )?;
    let content = format!(
        "{hay}\n\nWhat is the secret number mentioned in the text above? Answer with the number only."
    );
    let ids = user_prompt_ids(m, &content)?;
    m.model.reset();
    let out = greedy(m, &ids, chunk, max_new)?;
    let answer = m
        .tokenizer
        .decode(&out, true)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok(NeedleCase {
        prompt_tokens: ids.len(),
        depth,
        found: answer.contains(&secret),
        secret,
        answer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tqkv::rng::Rng;

    fn seed() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    }

    /// KL, NLL and top-1 against a naive f64 computation (softmax by direct exponentials).
    #[test]
    fn stats_match_a_naive_computation() {
        let s = seed();
        eprintln!("seed {s}");
        let mut rng = Rng::new(s);
        for vocab in [1usize, 2, 7, 99, 1000] {
            let mut st = LogitStats::default();
            let (mut kl, mut nq, mut np, mut same) = (0f64, 0f64, 0f64, 0usize);
            for _ in 0..5 {
                let p: Vec<f32> = (0..vocab).map(|_| 3.0 * rng.gaussian() as f32).collect();
                let q: Vec<f32> = p.iter().map(|&x| x + 0.3 * rng.gaussian() as f32).collect();
                let next = (rng.next_u64() % vocab as u64) as u32;
                st.add(&p, &q, next).unwrap();
                let z = |v: &[f32]| v.iter().map(|&x| (x as f64).exp()).sum::<f64>();
                let (zp, zq) = (z(&p), z(&q));
                for i in 0..vocab {
                    let (pi, qi) = ((p[i] as f64).exp() / zp, (q[i] as f64).exp() / zq);
                    kl += pi * (pi / qi).ln();
                }
                np -= ((p[next as usize] as f64).exp() / zp).ln();
                nq -= ((q[next as usize] as f64).exp() / zq).ln();
                let am = |v: &[f32]| {
                    (0..vocab)
                        .max_by(|&a, &b| v[a].partial_cmp(&v[b]).unwrap())
                        .unwrap()
                };
                same += usize::from(am(&p) == am(&q));
            }
            assert!(
                (st.kld_sum - kl.max(0.0)).abs() <= 1e-9 * (1.0 + kl.abs()),
                "{vocab}"
            );
            assert!((st.nll - nq).abs() <= 1e-9 * (1.0 + nq.abs()));
            assert!((st.nll_ref - np).abs() <= 1e-9 * (1.0 + np.abs()));
            assert_eq!(st.top1_same, same);
            assert_eq!(st.tokens, 5);
        }
    }

    #[test]
    fn identical_rows_have_zero_kl_and_uniform_rows_the_vocab_as_perplexity() {
        let mut st = LogitStats::default();
        let row = vec![0.25f32; 64];
        for t in 0..10 {
            st.add(&row, &row, t).unwrap();
        }
        assert_eq!(st.mean_kld(), 0.0);
        assert!((st.ppl() - 64.0).abs() < 1e-9 && (st.ppl_ref() - 64.0).abs() < 1e-9);
        assert_eq!(st.top1(), 1.0);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let mut st = LogitStats::default();
        assert!(st.add(&[1.0, 2.0], &[1.0], 0).is_err());
        assert!(st.add(&[1.0, 2.0], &[1.0, 2.0], 2).is_err());
        assert!(st.add(&[1.0, f32::NAN], &[1.0, 2.0], 0).is_err());
        assert!(st.add(&[], &[], 0).is_err());
        assert_eq!(st, LogitStats::default(), "nothing was counted");
        assert!(windows(&[1, 2, 3], 4, 1).is_err());
        assert!(windows(&[1, 2, 3], 1, 1).is_err());
        assert!(windows(&[1, 2, 3], 2, 1).is_err());
        assert_eq!(windows(&[1, 2, 3, 4, 5, 6, 7], 3, 9).unwrap().len(), 2);
    }
}
