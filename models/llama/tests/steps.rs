//! A model step is all-or-nothing: a failure in a middle layer (an injected fault in its
//! attend or append, after the layers before it appended) leaves every layer's cache and the
//! position as they were, and continuing gives bit-for-bit the logits of a run that never
//! failed — for prefills (with calibration on the first), decode steps, every cache family.
mod common;

use candle_core::{DType, Device};
use tqkv_candle::fault::{FaultAt, FaultCache, FaultSwitch};
use tqkv_candle::FullCache;
use tqkv_llama::{load, Error, Llama};

fn model(kv: &str) -> tqkv_llama::Loaded {
    let gguf =
        tqkv_llama::loader::default_gguf().expect("the default model (scripts/fetch-model.sh)");
    load(&common::options(&gguf, kv, None)).unwrap()
}

/// Wraps layer `layer`'s cache in a [`FaultCache`].
fn wrap(m: &mut Llama, layer: usize) -> FaultSwitch {
    let placeholder = Box::new(FullCache::new(1, 1, DType::F32, &Device::Cpu, None).unwrap());
    let old = m.set_layer_cache(layer, placeholder).unwrap();
    let (f, switch) = FaultCache::new(old);
    m.set_layer_cache(layer, Box::new(f)).unwrap();
    switch
}

fn bits(t: &candle_core::Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn a_failure_in_a_middle_layer_leaves_every_layer_as_before() {
    let text = "The GNU General Public License is a free, copyleft license for software and \
                other kinds of works, designed to take away your freedom to share and change it.";
    for kv in ["tq3.5", "f16", "kivi2", "q4h"] {
        let mut reference = model(kv);
        let mut faulty = model(kv);
        let ids = reference
            .tokenizer
            .encode(text, false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert!(ids.len() >= 30, "{}", ids.len());
        // Prefill 0..20, prefill 20..27, then decode one token at a time.
        let mut spans = vec![0..20, 20..27];
        spans.extend((27..ids.len()).map(|i| i..i + 1));
        let n = reference.model.config().num_layers;
        let mid = n / 2;
        let switch = wrap(&mut faulty.model, mid);
        for (i, span) in spans.iter().enumerate() {
            let toks = &ids[span.clone()];
            let want = bits(&reference.model.forward(toks, true).unwrap());
            for fault in [FaultAt::Attend(0), FaultAt::Append(0)] {
                let (pos, mem) = (faulty.model.position(), faulty.model.kv_memory().logical);
                switch.arm(fault);
                match faulty.model.forward(toks, true) {
                    Err(Error::Layer { layer, .. }) if layer == mid => {}
                    r => panic!("{kv}: step {i}, {fault:?}: {:?}", r.map(|_| ())),
                }
                assert_eq!(faulty.model.position(), pos, "{kv}: step {i}");
                assert_eq!(faulty.model.kv_memory().logical, mem, "{kv}: step {i}");
            }
            let got = bits(&faulty.model.forward(toks, true).unwrap());
            assert!(
                got == want,
                "{kv}: step {i}: logits differ from the run that never failed"
            );
        }
        assert_eq!(faulty.model.position(), reference.model.position());
        let (a, b) = (faulty.model.kv_memory(), reference.model.kv_memory());
        // A grown allocation may stay grown (as a Vec's capacity does); what is held may not.
        assert_eq!((a.logical, a.tables), (b.logical, b.tables), "{kv}");
    }
}

#[test]
fn rope_tables_grow_with_the_run_not_the_configured_context() {
    let mut m = model("f32");
    let ids: Vec<u32> = (0..300).map(|i| 100 + i % 500).collect();
    // The first table covers 256 positions; a step beyond it grows the tables (recomputed
    // from position 0). One step of 300 tokens and a step of 1 then 299 agree.
    let a = m.model.forward(&ids, false).unwrap();
    m.model.reset();
    let mut m2 = model("f32");
    let _ = m2.model.forward(&ids[..1], false).unwrap();
    let b = m2.model.forward(&ids[1..], false).unwrap();
    let diff = common::max_abs_diff(&a, &b);
    assert!(diff < 1e-3, "{diff}");
    let max = m.model.config().max_position_embeddings;
    m.model.reset();
    match m.model.forward(&vec![100; max + 1], false) {
        Err(Error::ContextFull {
            have: 0,
            add,
            max: mx,
        }) => assert_eq!((add, mx), (max + 1, max)),
        r => panic!("{:?}", r.map(|_| ())),
    }
}
