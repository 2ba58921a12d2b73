//! tqkv_llama::eval on the real default model, over a text that is always present (this
//! repository's README and docs): the reference against itself is exactly zero, chunked and
//! one-shot prefill agree, and the measures order the caches by their precision.
mod common;
use tqkv_llama::eval::{haystack, needle_case, score_window, scored_logits, windows, LogitStats};
use tqkv_llama::load;

fn text_ids(m: &tqkv_llama::Loaded) -> Vec<u32> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut text = String::new();
    for f in ["README.md", "docs/FORMAT.md", "docs/CACHES.md"] {
        text += &std::fs::read_to_string(root.join(f)).unwrap();
    }
    m.tokenizer
        .encode(text.as_str(), false)
        .unwrap()
        .get_ids()
        .to_vec()
}

#[test]
fn kl_divergence_orders_the_caches_and_the_reference_scores_zero() {
    let gguf =
        tqkv_llama::loader::default_gguf().expect("the default model (scripts/fetch-model.sh)");
    let (ctx, chunk) = (200, 37);
    let mut m = load(&common::options(&gguf, "f16", None)).unwrap();
    let ids = text_ids(&m);
    let wins = windows(&ids, ctx, 1).unwrap();
    let w = wins[0];
    let reference = scored_logits(&mut m.model, w, chunk).unwrap();
    assert_eq!(reference.dims()[0], ctx - ctx / 2 - 1);

    // The reference against itself, run again: exactly zero, perplexity equal.
    let again = scored_logits(&mut m.model, w, chunk).unwrap();
    let mut st = LogitStats::default();
    score_window(&mut st, &reference, &again, w).unwrap();
    assert_eq!(st.kld_sum, 0.0);
    assert_eq!(st.top1(), 1.0);
    assert_eq!(st.ppl(), st.ppl_ref());
    // A sensible perplexity for English prose on a 135M model.
    assert!(
        st.ppl_ref() > 1.5 && st.ppl_ref() < 200.0,
        "{}",
        st.ppl_ref()
    );

    // One-shot prefill of the window against chunks of 37: the same model up to rounding.
    let one = scored_logits(&mut m.model, w, ctx).unwrap();
    let mut st = LogitStats::default();
    score_window(&mut st, &reference, &one, w).unwrap();
    eprintln!(
        "f16, one chunk vs chunks of {chunk}: mean KLD {:.2e}",
        st.mean_kld()
    );
    assert!(st.mean_kld() < 1e-4, "{}", st.mean_kld());

    let kld = |kind: &str| {
        let mut t = load(&common::options(&gguf, kind, None)).unwrap();
        let got = scored_logits(&mut t.model, w, chunk).unwrap();
        let mut st = LogitStats::default();
        score_window(&mut st, &reference, &got, w).unwrap();
        eprintln!(
            "{kind}: mean KLD {:.5}, PPL {:.3} vs {:.3}, top-1 {:.1}%",
            st.mean_kld(),
            st.ppl(),
            st.ppl_ref(),
            100.0 * st.top1()
        );
        st.mean_kld()
    };
    let (f32k, q8, tq35, tq25) = (kld("f32"), kld("q8"), kld("tq3.5"), kld("tq2.5"));
    assert!(f32k < 1e-3, "f32 cache: {f32k}");
    assert!(
        f32k < q8 && q8 < tq35 && tq35 < tq25,
        "{f32k} {q8} {tq35} {tq25}"
    );
    // The paper's 3.5 bits costs more than the preset of the same size.
    let paper = kld("tq3.5-paper");
    assert!(tq35 < paper, "tq3.5 {tq35} vs tq3.5-paper {paper}");

    // Swapping the caches of the loaded model (what `tqkv eval` does) gives the logits of a model
    // loaded with that kind.
    m.model.set_cache_config(&"tq3.5".parse().unwrap()).unwrap();
    let swapped = scored_logits(&mut m.model, w, chunk).unwrap();
    let mut fresh = load(&common::options(&gguf, "tq3.5", None)).unwrap();
    let loaded = scored_logits(&mut fresh.model, w, chunk).unwrap();
    assert_eq!(common::max_abs_diff(&swapped, &loaded), 0.0);
    // A swap starts from empty caches.
    m.model.set_cache_config(&"q8".parse().unwrap()).unwrap();
    assert_eq!((m.model.position(), m.model.kv_memory().logical), (0, 0));
}

#[test]
fn a_text_shorter_than_a_window_is_an_error() {
    assert!(windows(&[1, 2, 3], 512, 4).is_err());
}

#[test]
fn the_needle_is_hidden_where_asked_and_found_with_an_f16_cache() {
    let gguf =
        tqkv_llama::loader::default_gguf().expect("the default model (scripts/fetch-model.sh)");
    let mut m = load(&common::options(&gguf, "f16", None)).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let filler = std::fs::read_to_string(root.join("docs/FORMAT.md")).unwrap();
    let needle = "The secret number is 31337.";
    for depth in [0.0, 0.3, 0.7, 1.0] {
        let h = haystack(&m.tokenizer, &filler, 300, needle, depth).unwrap();
        assert_eq!(h.matches(needle).count(), 1);
        let at = h.find(needle).unwrap() as f64 / (h.len() - needle.len()) as f64;
        // The nearest sentence boundary: within a few sentences of the asked depth.
        assert!((at - depth).abs() < 0.2, "depth {depth}: needle at {at:.2}");
    }
    assert!(haystack(&m.tokenizer, &filler, 300, needle, 1.5).is_err());
    assert!(haystack(&m.tokenizer, "too short", 300, needle, 0.5).is_err());
    let c = needle_case(&mut m, &filler, 300, 0.5, 31337, 64, 32).unwrap();
    eprintln!("{c:?}");
    assert!(c.found && c.answer.contains("31337"), "{c:?}");
    assert!(c.prompt_tokens > 300 && c.prompt_tokens < 400, "{c:?}");
}
