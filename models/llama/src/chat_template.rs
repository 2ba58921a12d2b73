//! Chat templates rendered with minijinja from the model's own Jinja template (Hugging Face
//! `tokenizer_config.json`'s `chat_template`, or GGUF's `tokenizer.chat_template`), with the
//! settings transformers uses (trim_blocks, lstrip_blocks) and the Python string/dict methods
//! and `raise_exception` that common templates call. A ChatML fallback is used only when a
//! model has no template.

use minijinja::value::{Value, ValueKind};
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

const FALLBACK: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn py_method(value: &Value, method: &str, args: &[Value]) -> Result<Value, minijinja::Error> {
    let unknown = || {
        minijinja::Error::new(
            ErrorKind::UnknownMethod,
            format!("no method {method} on {}", value.kind()),
        )
    };
    let arg = |i: usize| args.get(i).and_then(|a| a.as_str().map(String::from));
    match value.kind() {
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            let chars = arg(0);
            Ok(match method {
                "strip" => Value::from(match &chars {
                    Some(c) => s.trim_matches(|x| c.contains(x)),
                    None => s.trim(),
                }),
                "lstrip" => Value::from(match &chars {
                    Some(c) => s.trim_start_matches(|x| c.contains(x)),
                    None => s.trim_start(),
                }),
                "rstrip" => Value::from(match &chars {
                    Some(c) => s.trim_end_matches(|x| c.contains(x)),
                    None => s.trim_end(),
                }),
                "startswith" => Value::from(chars.is_some_and(|p| s.starts_with(&p))),
                "endswith" => Value::from(chars.is_some_and(|p| s.ends_with(&p))),
                "upper" => Value::from(s.to_uppercase()),
                "lower" => Value::from(s.to_lowercase()),
                "title" => Value::from(
                    s.split(' ')
                        .map(|w| {
                            let mut c = w.chars();
                            c.next()
                                .map(|f| {
                                    f.to_uppercase().collect::<String>()
                                        + &c.as_str().to_lowercase()
                                })
                                .unwrap_or_default()
                        })
                        .collect::<Vec<_>>()
                        .join(" "),
                ),
                "replace" => {
                    Value::from(s.replace(&arg(0).unwrap_or_default(), &arg(1).unwrap_or_default()))
                }
                "split" => Value::from(match &chars {
                    Some(sep) => s.split(sep.as_str()).map(Value::from).collect::<Vec<_>>(),
                    None => s.split_whitespace().map(Value::from).collect::<Vec<_>>(),
                }),
                _ => return Err(unknown()),
            })
        }
        ValueKind::Map => match method {
            "items" => Ok(Value::from(
                value
                    .try_iter()?
                    .map(|k| Value::from(vec![k.clone(), value.get_item(&k).unwrap_or_default()]))
                    .collect::<Vec<_>>(),
            )),
            "keys" => Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
            "values" => Ok(Value::from(
                value
                    .try_iter()?
                    .map(|k| value.get_item(&k).unwrap_or_default())
                    .collect::<Vec<_>>(),
            )),
            "get" => {
                let k = args.first().cloned().unwrap_or_default();
                let v = value.get_item(&k).unwrap_or_default();
                Ok(if v.is_undefined() || v.is_none() {
                    args.get(1).cloned().unwrap_or_default()
                } else {
                    v
                })
            }
            _ => Err(unknown()),
        },
        _ => Err(unknown()),
    }
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
        env.set_unknown_method_callback(|_, v, m, a| py_method(v, m, a));
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |_fmt: String| -> Value {
            Value::from("1 January 2026")
        });
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
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| TemplateError(e.to_string()))?;
        t.render(minijinja::context! {
            messages => messages
                .iter()
                .map(|m| Value::from_pairs([("role", m.role.as_str()), ("content", m.content.as_str())]))
                .collect::<Value>(),
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
}
