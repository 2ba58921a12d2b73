//! Chat templates rendered with minijinja from the model's own Jinja template (Hugging Face
//! `tokenizer_config.json`'s `chat_template`, or GGUF's `tokenizer.chat_template`), with the
//! settings transformers uses (trim_blocks, lstrip_blocks), Python's string/dict/list methods
//! (minijinja-contrib's pycompat), and the globals transformers adds: `raise_exception`,
//! `strftime_now` (local time) and its `tojson` (Python separators, no HTML escaping; tool
//! schemas and tool-call arguments go through it). A ChatML fallback is used only when a model
//! has no template.

use minijinja::value::Value;
use minijinja::{Environment, ErrorKind};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// Template errors.
#[derive(Debug, thiserror::Error)]
#[error("chat template: {0}")]
pub struct TemplateError(String);

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

/// Instructions one render may execute.
const FUEL: u64 = 100_000_000;

const FALLBACK: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Python's `json.dumps` separators without indent: `", "` between items, `": "` after keys.
struct PySeparators;

impl serde_json::ser::Formatter for PySeparators {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// `tojson` as transformers defines it for chat templates (`json.dumps(x, ensure_ascii=False,
/// indent=indent, sort_keys=sort_keys)`): Python's separators, non-ASCII kept, no HTML
/// escaping. minijinja's own `tojson` (its `json` feature) escapes `<`, `>`, `&` and `'` and
/// writes compact JSON, which would change the prompt a model was trained on.
fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let err =
        |e: serde_json::Error| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string());
    // Keys in their order (maps preserve insertion order), or sorted.
    let json = if sort_keys.unwrap_or(false) {
        sorted(serde_json::to_value(&value).map_err(err)?)
    } else {
        serde_json::to_value(&value).map_err(err)?
    };
    let mut out = Vec::new();
    let r = match indent {
        Some(n) => {
            let pad = vec![b' '; n.min(64)];
            let mut ser = serde_json::Serializer::with_formatter(
                &mut out,
                serde_json::ser::PrettyFormatter::with_indent(&pad),
            );
            serde::Serialize::serialize(&json, &mut ser)
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PySeparators);
            serde::Serialize::serialize(&json, &mut ser)
        }
    };
    r.map_err(err)?;
    Ok(Value::from_safe_string(
        String::from_utf8(out).unwrap_or_default(),
    ))
}

fn sorted(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => {
            let mut items: Vec<_> = m.into_iter().collect();
            items.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(items.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        serde_json::Value::Array(a) => {
            serde_json::Value::Array(a.into_iter().map(sorted).collect())
        }
        x => x,
    }
}

/// `strftime_now(fmt)` as transformers provides it: the local time formatted by strftime
/// (`%d %b %Y` in the Llama 3.1 template); a bad format is a template error.
fn strftime_now(fmt: String) -> Result<Value, minijinja::Error> {
    let now = jiff::Zoned::now();
    jiff::fmt::strtime::format(fmt.as_str(), &now)
        .map(Value::from)
        .map_err(|e| {
            minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("strftime_now({fmt:?}): {e}"),
            )
        })
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token` and `eos_token` are passed to it by name.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TemplateError(e.to_string()))?;
        env.set_syntax(syntax);
        // Python's str / dict / list methods (`.strip()`, `.items()`, `.startswith()`, …).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", strftime_now);
        // An execution budget: a template that loops without end (or for billions of steps)
        // is an error after ~10⁸ instructions, not a hung chat. Real templates use ~10² per
        // message.
        env.set_fuel(Some(FUEL));
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| TemplateError(format!("{e:#}")))?;
        Ok(ChatTemplate {
            env,
            bos: bos_token.to_string(),
            eos: eos_token.to_string(),
        })
    }

    /// The ChatML template, for models that have none.
    pub fn fallback(bos_token: &str, eos_token: &str) -> Self {
        Self::new(FALLBACK, bos_token, eos_token).expect("the fallback template compiles")
    }

    /// Renders a conversation; `add_generation_prompt` opens the assistant's turn.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let messages = serde_json::to_value(messages).map_err(|e| TemplateError(e.to_string()))?;
        self.render_json(&messages, None, add_generation_prompt)
    }

    /// Renders messages as a chat API receives them (JSON objects with `role`, `content`,
    /// `tool_calls`, `name`, …) and an optional list of `tools` (function schemas), as
    /// transformers' `apply_chat_template(messages, tools=…)` does.
    pub fn render_json(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        if !messages.is_array() {
            return Err(TemplateError("messages must be a list".into()));
        }
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| TemplateError(e.to_string()))?;
        t.render(minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            tools => tools.map(|t| Value::from(minijinja::value::Serde(t))),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_str(),
            eos_token => self.eos.as_str(),
        })
        .map_err(|e| TemplateError(format!("{e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm2_template_renders_as_transformers_does() {
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let out = t
            .render(
                &[
                    msg("user", "Hi"),
                    msg("assistant", "Hello!"),
                    msg("user", "2+2?"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n\
             <|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(&[msg("system", "Be brief."), msg("user", "Hi")], false)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn llama3_style_template_with_trim_bos_and_raise_exception() {
        let src = "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['user', 'assistant', 'system'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}\n<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";
        let t = ChatTemplate::new(src, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        let out = t.render(&[msg("user", "  Hi  ")], true).unwrap();
        assert_eq!(out, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
        let e = t.render(&[msg("tool", "x")], true).unwrap_err().to_string();
        assert!(e.contains("bad role tool"), "{e}");
    }

    #[test]
    fn python_methods_and_errors() {
        let t = ChatTemplate::new("{% for m in messages %}{{ m['content'].strip().upper() }}|{{ m.get('role') }}|{{ m['content'].startswith(' a') }}{% endfor %}", "", "").unwrap();
        assert_eq!(
            t.render(&[msg("user", " abc ")], false).unwrap(),
            "ABC|user|True"
        );
        assert!(ChatTemplate::new("{% for x in %}", "", "").is_err());
        let f = ChatTemplate::fallback("", "");
        assert_eq!(
            f.render(&[msg("user", "Hi")], true).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    /// Qwen2.5's template (its structure and strings; tools through tojson, tool calls with
    /// `.function` and `| tojson` arguments, consecutive tool results merged).
    const QWEN25: &str = "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";

    #[test]
    fn qwen25_template_with_tools_and_tool_calls() {
        let t = ChatTemplate::new(QWEN25, "", "<|im_end|>").unwrap();
        let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather",
            "description": "Weather <now> & \"here\" in Zürich", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
        let messages = serde_json::json!([
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
            {"role": "tool", "content": "{\"temp\": 21}"},
            {"role": "tool", "content": "{\"temp\": 19}"},
        ]);
        let out = t.render_json(&messages, Some(&tools), true).unwrap();
        let want = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Weather <now> & \\\"here\\\" in Zürich\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"]}}}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 2}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response>\n<tool_response>\n{\"temp\": 19}\n</tool_response><|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(out, want);
        // Without tools: the default system prompt.
        let out = t.render(&[msg("user", "Hi")], true).unwrap();
        assert_eq!(out, "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    /// The parts of Llama 3.1's template that need more than plain Jinja: `strftime_now` behind
    /// `is defined`, `tojson(indent=4)`, `| trim`, `raise_exception`.
    const LLAMA31: &str = "{{- bos_token }}\n{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n    {%- else %}\n        {%- set date_string = \"26 Jul 2024\" %}\n    {%- endif %}\n{%- endif %}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n{%- if tools is not none %}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- \"\\n\\n\" }}\n    {%- endfor %}\n{%- endif %}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n{%- for message in messages %}\n    {%- if message.role not in ['user', 'assistant', 'ipython', 'tool'] %}\n        {{- raise_exception('Unknown role ' + message.role) }}\n    {%- endif %}\n    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n";

    #[test]
    fn llama31_template_with_strftime_now_tojson_indent_and_raise_exception() {
        let t = ChatTemplate::new(LLAMA31, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        let tools = serde_json::json!([{"name": "f", "parameters": {"a": [1, 2]}}]);
        let messages = serde_json::json!([
            {"role": "system", "content": "  Be brief.  "},
            {"role": "user", "content": "Hi "},
        ]);
        let out = t.render_json(&messages, Some(&tools), true).unwrap();
        // Today's date as strftime writes it, in the local time zone (as transformers does).
        let today = jiff::fmt::strtime::format("%d %b %Y", &jiff::Zoned::now()).unwrap();
        let want = format!("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: {today}\n\n{{\n    \"name\": \"f\",\n    \"parameters\": {{\n        \"a\": [\n            1,\n            2\n        ]\n    }}\n}}\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
        assert_eq!(out, want);
        assert_eq!(today.len(), 11, "{today}");
        let e = t
            .render(&[msg("system", "x"), msg("robot", "y")], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Unknown role robot"), "{e}");
        // A bad strftime format is a template error, not a panic.
        let bad = ChatTemplate::new("{{ strftime_now('%Y %') }}", "", "").unwrap();
        assert!(bad.render(&[], false).is_err());
    }

    #[test]
    fn runaway_templates_run_out_of_fuel() {
        let t = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let start = std::time::Instant::now();
        let e = t.render(&[], false).unwrap_err().to_string();
        assert!(e.to_lowercase().contains("fuel"), "{e}");
        assert!(start.elapsed().as_secs() < 30);
        // A long conversation of a real template stays far inside the budget.
        let q = ChatTemplate::new(QWEN25, "", "").unwrap();
        let msgs: Vec<Message> = (0..2000)
            .map(|i| msg(if i % 2 == 0 { "user" } else { "assistant" }, "some text"))
            .collect();
        q.render(&msgs, true).unwrap();
    }

    /// Mistral's alternation check and Python string methods.
    const MISTRAL: &str = "{{- bos_token }}\n{%- for message in messages %}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if message['role'] == 'user' %}\n        {{- '[INST] ' + message['content'].strip() + ' [/INST]' }}\n    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'].strip() + eos_token }}\n    {%- endif %}\n{%- endfor %}\n{%- if messages[-1]['content'].lower().startswith('q:') and not messages[-1]['content'].endswith('?') %}{{ '?' }}{% endif %}{{ '|' ~ 'a,b'.split(',') | join('+') ~ '|' ~ 'x'.join(['1', '2']) ~ '|' ~ messages[0]['content'].replace('Q', 'q', 1).title() }}";

    #[test]
    fn mistral_template_alternation_and_string_methods() {
        let t = ChatTemplate::new(MISTRAL, "<s>", "</s>").unwrap();
        let out = t
            .render(
                &[
                    msg("user", "  Q: hi there "),
                    msg("assistant", " Hello "),
                    msg("user", "Q: more"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "<s>[INST] Q: hi there [/INST] Hello</s>[INST] Q: more [/INST]?|a+b|1x2|  Q: Hi There "
        );
        let e = t
            .render(&[msg("user", "a"), msg("user", "b")], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("must alternate"), "{e}");
    }
}
