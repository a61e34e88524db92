//! Chat templates: the Jinja template of a checkpoint's
//! `tokenizer_config.json` (`chat_template`, a string or a list of named
//! templates) or of its `chat_template.jinja`, rendered by minijinja with the
//! Hugging Face conventions (`trim_blocks`, `lstrip_blocks`, Python string
//! methods, `raise_exception`, `bos_token` / `eos_token`,
//! `add_generation_prompt`).

use std::path::Path;

use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;
use serde_json::Value;

/// One chat message as the template sees it.
#[derive(Clone, Debug, Serialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, …
    pub role: String,
    /// The text.
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

/// The template's name inside the environment.
const NAME: &str = "chat";

/// A special token of `tokenizer_config.json`: a string, or an added-token
/// object with `content`.
fn token(cfg: &Value, key: &str) -> String {
    match cfg.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template of checkpoint directory `dir`: `Ok(None)` when it has
    /// none, an error naming the file when it has one that cannot be read or
    /// compiled.
    pub fn for_dir(dir: &Path) -> Result<Option<ChatTemplate>, String> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                format!(
                    "{} is not valid JSON ({e}); fix or remove it",
                    cfg_path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Null,
            Err(e) => return Err(format!("cannot read {}: {e}", cfg_path.display())),
        };
        let jinja_path = dir.join("chat_template.jinja");
        let source = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of {name, template}: the one named "default", else the first.
            Some(Value::Array(list)) => {
                let named = |want: Option<&str>| {
                    list.iter().find_map(|t| {
                        let name = t.get("name").and_then(Value::as_str);
                        let tpl = t.get("template").and_then(Value::as_str)?;
                        (want.is_none() || name == want).then(|| tpl.to_string())
                    })
                };
                named(Some("default")).or_else(|| named(None))
            }
            _ => match std::fs::read_to_string(&jinja_path) {
                Ok(s) => Some(s),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(format!("cannot read {}: {e}", jinja_path.display())),
            },
        };
        let Some(source) = source else {
            return Ok(None);
        };
        ChatTemplate::new(source, token(&cfg, "bos_token"), token(&cfg, "eos_token"))
            .map(Some)
            .map_err(|e| {
                format!(
                    "the chat template of {} does not compile: {e}",
                    dir.display()
                )
            })
    }

    /// Compiles template `source` with the given special tokens.
    pub fn new(
        source: String,
        bos_token: String,
        eos_token: String,
    ) -> Result<ChatTemplate, Error> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(NAME, source)?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    /// The prompt text of `messages`, ending with the assistant's turn
    /// opened (`add_generation_prompt`). The error is the template's own
    /// message (e.g. a `raise_exception` about roles).
    pub fn render(&self, messages: &[Message]) -> Result<String, String> {
        let tpl = self.env.get_template(NAME).map_err(|e| e.to_string())?;
        tpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| match e.detail() {
            Some(d) => d.to_string(),
            None => e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs
            .iter()
            .map(|(r, c)| Message {
                role: r.to_string(),
                content: c.to_string(),
            })
            .collect()
    }

    #[test]
    fn renders_a_hugging_face_style_template() {
        // The shape of common Hub templates: Python string methods,
        // loop.first, whitespace control, raise_exception.
        let src = "{{ bos_token }}{% for message in messages %}\
            {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
            {{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}\
            <|{{ message['role'] }}|>{{ message['content'].strip() }}{{ eos_token }}\n\
            {% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
        let t = ChatTemplate::new(src.into(), "<s>".into(), "</s>".into()).expect("compiles");
        let out = t
            .render(&msgs(&[
                ("user", " hi "),
                ("assistant", "yo"),
                ("user", "x"),
            ]))
            .expect("renders");
        assert_eq!(
            out,
            "<s><|user|>hi</s>\n<|assistant|>yo</s>\n<|user|>x</s>\n<|assistant|>"
        );
        let err = t
            .render(&msgs(&[("assistant", "first")]))
            .expect_err("roles must alternate");
        assert!(err.contains("must alternate"), "{err}");
    }

    #[test]
    fn a_directory_without_a_template_has_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(ChatTemplate::for_dir(dir.path()).expect("reads").is_none());
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages|length }}"}], "eos_token": {"content": "</s>"}}"#,
        )
        .expect("write");
        let t = ChatTemplate::for_dir(dir.path())
            .expect("reads")
            .expect("has one");
        assert_eq!(t.render(&msgs(&[("user", "a")])).expect("renders"), "D1");
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"chat_template": "{% for %}"}"#,
        )
        .expect("write");
        let e = ChatTemplate::for_dir(dir.path()).expect_err("does not compile");
        assert!(e.contains("does not compile"), "{e}");
    }
}
