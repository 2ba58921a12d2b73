//! Malformed tokenizer_config.json / generation_config.json are errors, never a silent fallback.
use tqkv_llama::loader::{parse_generation_eos, parse_tokenizer_config};

#[test]
fn tokenizer_config_parses_what_models_ship_and_rejects_the_rest() {
    let tc = parse_tokenizer_config(
        r#"{"bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": false}, "chat_template": "{{ x }}"}"#,
    )
    .unwrap();
    assert_eq!((tc.bos.as_str(), tc.eos.as_str()), ("<s>", "</s>"));
    assert_eq!(tc.chat_template.as_deref(), Some("{{ x }}"));
    let tc = parse_tokenizer_config(
        r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#,
    )
    .unwrap();
    assert_eq!(tc.chat_template.as_deref(), Some("D"));
    assert_eq!(parse_tokenizer_config("{}").unwrap().chat_template, None);
    for bad in [
        "",
        "{",
        "[]",
        r#"{"chat_template": 3}"#,
        r#"{"chat_template": [{"name": "tool_use", "template": "T"}]}"#,
        r#"{"chat_template": [{"name": 1}]}"#,
        r#"{"bos_token": 5}"#,
        r#"{"eos_token": {"id": 2}}"#,
    ] {
        let e = parse_tokenizer_config(bad).unwrap_err().to_string();
        assert!(e.contains("tokenizer_config.json"), "{bad}: {e}");
    }
}

#[test]
fn generation_config_eos_ids() {
    assert_eq!(
        parse_generation_eos(r#"{"eos_token_id": 2}"#).unwrap(),
        vec![2]
    );
    assert_eq!(
        parse_generation_eos(r#"{"eos_token_id": [2, 7]}"#).unwrap(),
        vec![2, 7]
    );
    assert!(parse_generation_eos(r#"{}"#).unwrap().is_empty());
    for bad in [
        "{",
        r#"{"eos_token_id": -1}"#,
        r#"{"eos_token_id": [1, "x"]}"#,
        r#"{"eos_token_id": 99999999999}"#,
    ] {
        assert!(parse_generation_eos(bad).is_err(), "{bad}");
    }
}
