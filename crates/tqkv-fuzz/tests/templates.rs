//! Fuzz target: `tokenizer_config.json` (tokens, the chat template or the list of named
//! templates) → the compiled template → a rendered conversation with tools.
use tqkv_llama::loader::parse_tokenizer_config;
use tqkv_llama::template::ChatTemplate;

#[global_allocator]
static ALLOC: tqkv_fuzz::Counting = tqkv_fuzz::Counting;

fn seed(template: &str) -> Vec<u8> {
    serde_json::json!({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": template})
        .to_string()
        .into_bytes()
}

fn target(bytes: &[u8]) -> bool {
    let Ok(tc) = parse_tokenizer_config(&String::from_utf8_lossy(bytes)) else {
        return false;
    };
    let Some(src) = tc.chat_template else {
        return false;
    };
    let Ok(t) = ChatTemplate::new(&src, &tc.bos, &tc.eos) else {
        return false;
    };
    let messages = serde_json::json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Hi <b> "},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
        {"role": "tool", "content": "{\"y\": 2}"},
    ]);
    let tools = serde_json::json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    t.render_json(&messages, Some(&tools), true).is_ok()
}

#[test]
fn fuzz_tokenizer_config_and_chat_templates() {
    let seeds = vec![
        seed("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'].strip() + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
        seed("{{- bos_token }}{%- if tools is not none %}{%- for t in tools %}{{- t | tojson(indent=4) }}{%- endfor %}{%- endif %}{%- for m in messages %}{%- if m.role not in ['user', 'assistant', 'system', 'tool'] %}{{ raise_exception('bad role') }}{%- endif %}{{ m['content'] | trim }}{%- if m.tool_calls %}{%- for c in m.tool_calls %}{{ c.function.arguments | tojson }}{%- endfor %}{%- endif %}{%- endfor %}{{ strftime_now('%d %b %Y') }}"),
        seed("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('alternate') }}{% endif %}{{ m['content'].upper().split(' ') | join(',') }}{% endfor %}{{ messages | map(attribute='role') | join('|') }}"),
        serde_json::json!({"chat_template": [{"name": "default", "template": "{{ messages[0].content }}"}, {"name": "tool_use", "template": "{{ tools | tojson }}"}]}).to_string().into_bytes(),
    ];
    for s in &seeds[..2] {
        assert!(target(s), "{}", String::from_utf8_lossy(s));
    }
    let r = tqkv_fuzz::run("templates", &seeds, target);
    assert!(r.accepted > 0);
}
