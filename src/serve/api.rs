//! The OpenAI-compatible request and response bodies: parsing and checking
//! requests (every refusal names the field and what it accepts), the error
//! body, and the response and stream-chunk shapes.
//!
//! Request bodies are parsed by serde_json into a map; each supported field
//! is taken out and checked, and what is left is ignored with a log line
//! (vLLM's behaviour).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};

/// An error answered with OpenAI's error body
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
    retry_after: Option<u64>,
}

impl ApiError {
    /// 400: the request is invalid; `param` names the field, if one.
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param,
            code: None,
            retry_after: None,
        }
    }

    /// Any status with a message.
    pub fn status(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 429 with `Retry-After: seconds`.
    pub fn queue_full(capacity: usize, seconds: u64) -> ApiError {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "the queue is full ({capacity} requests waiting; this server decodes one \
                 request at a time); retry after {seconds} s"
            ),
            param: None,
            code: Some("queue_full"),
            retry_after: Some(seconds),
        }
    }

    /// 404 for a model this server does not serve.
    pub fn no_model(asked: &str, served: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "the model `{asked}` does not exist; this server serves `{served}` (GET /v1/models)"
            ),
            param: Some("model"),
            code: Some("model_not_found"),
            retry_after: None,
        }
    }

    /// The error object (the value of `error`), also sent as a stream event.
    pub fn body(&self) -> Value {
        let kind = match self.status.as_u16() {
            404 => "not_found_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            503 => "service_unavailable_error",
            _ => "server_error",
        };
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// The request body as a JSON object.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid(
            None,
            "the request body is empty; send a JSON object",
        ));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(ApiError::invalid(
            None,
            format!(
                "the request body must be a JSON object, found {}",
                type_name(&other)
            ),
        )),
        Err(e) => Err(ApiError::invalid(
            None,
            format!("the request body is not valid JSON: {e}"),
        )),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Takes field `key` out of `m`: `None` when absent or null (the default).
fn take(m: &mut Map<String, Value>, key: &str) -> Option<Value> {
    m.remove(key).filter(|v| !v.is_null())
}

/// The fields both endpoints share, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Common {
    /// The model asked for, if named.
    pub model: Option<String>,
    /// Server-sent events instead of one body.
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the token counts.
    pub include_usage: bool,
    /// Tokens to generate at most, if given (>= 1; the context is checked later).
    pub max_tokens: Option<usize>,
    /// 0 is greedy.
    pub temperature: f32,
    /// Sampler seed, if given.
    pub seed: Option<u32>,
    /// Stop strings (at most 4, none empty).
    pub stop: Vec<String>,
}

/// The largest `max_tokens` accepted before the context check: a number no
/// context reaches, kept so the arithmetic cannot overflow.
const MAX_TOKENS_LIMIT: u64 = 1 << 31;

/// Takes and checks the shared fields; `max_keys` are the names under which
/// the token limit may come (chat accepts `max_completion_tokens` too).
pub fn common(
    m: &mut Map<String, Value>,
    max_keys: &[&'static str],
    default_temperature: f32,
) -> Result<Common, ApiError> {
    let model = match take(m, "model") {
        None => None,
        Some(Value::String(s)) => Some(s),
        Some(v) => {
            return Err(ApiError::invalid(
                Some("model"),
                format!("`model` must be a string, found {}", type_name(&v)),
            ))
        }
    };
    let stream = match take(m, "stream") {
        None => false,
        Some(Value::Bool(b)) => b,
        Some(v) => {
            return Err(ApiError::invalid(
                Some("stream"),
                format!("`stream` must be true or false, found {}", type_name(&v)),
            ))
        }
    };
    let include_usage = match take(m, "stream_options") {
        None => false,
        Some(Value::Object(mut o)) => match take(&mut o, "include_usage") {
            None => false,
            Some(Value::Bool(b)) => b,
            Some(v) => {
                return Err(ApiError::invalid(
                    Some("stream_options"),
                    format!(
                        "`stream_options.include_usage` must be true or false, found {}",
                        type_name(&v)
                    ),
                ))
            }
        },
        Some(v) => {
            return Err(ApiError::invalid(
                Some("stream_options"),
                format!(
                    "`stream_options` must be an object, found {}",
                    type_name(&v)
                ),
            ))
        }
    };
    let mut max_tokens = None;
    for &key in max_keys {
        let Some(v) = take(m, key) else { continue };
        let n = match v.as_u64() {
            Some(0) => {
                return Err(ApiError::invalid(
                    Some(key),
                    format!("`{key}` must be at least 1, found 0"),
                ))
            }
            Some(n) if n <= MAX_TOKENS_LIMIT => n,
            Some(n) => {
                return Err(ApiError::invalid(
                    Some(key),
                    format!("`{key}` = {n} is absurdly large; ask for at most the context length"),
                ))
            }
            None => {
                return Err(ApiError::invalid(
                    Some(key),
                    format!("`{key}` must be a positive integer, found {v}"),
                ))
            }
        };
        max_tokens = Some(n as usize);
    }
    let temperature = match take(m, "temperature") {
        None => default_temperature,
        Some(v) => match v.as_f64() {
            Some(t) if (0.0..=2.0).contains(&t) => t as f32,
            _ => {
                return Err(ApiError::invalid(
                    Some("temperature"),
                    format!("`temperature` must be a number from 0 to 2 (0 = greedy), found {v}"),
                ))
            }
        },
    };
    let seed = match take(m, "seed") {
        None => None,
        Some(v) => match v.as_u64().and_then(|s| u32::try_from(s).ok()) {
            Some(s) => Some(s),
            None => {
                return Err(ApiError::invalid(
                    Some("seed"),
                    format!(
                        "`seed` must be an integer from 0 to {}, found {v}",
                        u32::MAX
                    ),
                ))
            }
        },
    };
    let stop = match take(m, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) => a
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                v => Err(ApiError::invalid(
                    Some("stop"),
                    format!("`stop` must be a string or a list of strings, found {v} in the list"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(v) => {
            return Err(ApiError::invalid(
                Some("stop"),
                format!(
                    "`stop` must be a string or a list of strings, found {}",
                    type_name(&v)
                ),
            ))
        }
    };
    if stop.len() > 4 {
        return Err(ApiError::invalid(
            Some("stop"),
            format!("`stop` holds at most 4 strings, found {}", stop.len()),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            Some("stop"),
            "`stop` strings must not be empty",
        ));
    }
    match take(m, "n") {
        None => {}
        Some(v) if v.as_u64() == Some(1) => {}
        Some(v) => {
            return Err(ApiError::invalid(
                Some("n"),
                format!("`n` must be 1, found {v}: this server decodes one sequence per request"),
            ))
        }
    }
    Ok(Common {
        model,
        stream,
        include_usage,
        max_tokens,
        temperature,
        seed,
        stop,
    })
}

/// A completion prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptIn {
    /// Text to tokenize.
    Text(String),
    /// Token ids as given (checked against the vocabulary later).
    Ids(Vec<i64>),
}

/// Takes and checks `prompt`: a string, a list of token ids, or a list of
/// one of those (one prompt per request).
pub fn prompt(m: &mut Map<String, Value>) -> Result<PromptIn, ApiError> {
    let bad = |what: String| ApiError::invalid(Some("prompt"), what);
    let ids = |a: &[Value]| -> Result<Vec<i64>, ApiError> {
        a.iter()
            .map(|v| {
                v.as_i64().ok_or_else(|| {
                    bad(format!(
                        "`prompt` must be a string or a list of token ids, found {v} in the list"
                    ))
                })
            })
            .collect()
    };
    let p = match take(m, "prompt") {
        None => return Err(bad("`prompt` is required: the text to complete".into())),
        Some(Value::String(s)) => PromptIn::Text(s),
        Some(Value::Array(a)) => match a.first() {
            None => PromptIn::Ids(Vec::new()),
            Some(Value::Number(_)) => PromptIn::Ids(ids(&a)?),
            Some(Value::String(_) | Value::Array(_)) if a.len() > 1 => {
                return Err(bad(format!(
                    "`prompt` holds {} prompts; send one per request (batch 1)",
                    a.len()
                )))
            }
            Some(Value::String(s)) => PromptIn::Text(s.clone()),
            Some(Value::Array(inner)) => PromptIn::Ids(ids(inner)?),
            Some(v) => {
                return Err(bad(format!(
                    "`prompt` must be a string or a list of token ids, found {v} in the list"
                )))
            }
        },
        Some(v) => {
            return Err(bad(format!(
                "`prompt` must be a string or a list of token ids, found {}",
                type_name(&v)
            )))
        }
    };
    match &p {
        PromptIn::Text(t) if t.is_empty() => Err(bad("`prompt` is empty; send some text".into())),
        PromptIn::Ids(i) if i.is_empty() => {
            Err(bad("`prompt` is an empty list of token ids".into()))
        }
        _ => Ok(p),
    }
}

/// Takes and checks `messages`: a non-empty list of `{role, content}`, the
/// content a string or a list of text parts.
pub fn messages(m: &mut Map<String, Value>) -> Result<Vec<super::chat::Message>, ApiError> {
    let bad = |what: String| ApiError::invalid(Some("messages"), what);
    let list = match take(m, "messages") {
        None => {
            return Err(bad(
                "`messages` is required: a list of {role, content}".into()
            ))
        }
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(bad(format!(
                "`messages` must be a list, found {}",
                type_name(&v)
            )))
        }
    };
    if list.is_empty() {
        return Err(bad("`messages` is empty; send at least one message".into()));
    }
    list.into_iter()
        .enumerate()
        .map(|(i, msg)| {
            let Value::Object(mut o) = msg else {
                return Err(bad(format!(
                    "`messages[{i}]` must be an object with `role` and `content`"
                )));
            };
            let role = match take(&mut o, "role") {
                Some(Value::String(r)) if !r.is_empty() => r,
                _ => {
                    return Err(bad(format!(
                        "`messages[{i}].role` must be a non-empty string (system, user, assistant)"
                    )))
                }
            };
            let content = match take(&mut o, "content") {
                None => String::new(),
                Some(Value::String(c)) => c,
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.get("type").and_then(Value::as_str), p.get("text")) {
                            (Some("text"), Some(Value::String(t))) => text.push_str(t),
                            _ => {
                                return Err(bad(format!(
                                    "`messages[{i}].content` parts must be {{\"type\": \"text\", \"text\": \"...\"}}; \
                                     this model reads text only"
                                )))
                            }
                        }
                    }
                    text
                }
                Some(v) => {
                    return Err(bad(format!(
                        "`messages[{i}].content` must be a string or a list of text parts, found {}",
                        type_name(&v)
                    )))
                }
            };
            Ok(super::chat::Message { role, content })
        })
        .collect()
}

/// Token counts of a response.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(s: &str) -> Map<String, Value> {
        parse_object(s.as_bytes()).expect("an object")
    }

    #[test]
    fn shared_fields_are_checked_and_unknown_ones_left() {
        let mut m = obj(
            r#"{"model":"m","max_tokens":5,"temperature":0,"seed":7,"stop":"\n","n":1,"top_p":0.5,"stream":true}"#,
        );
        let c = common(&mut m, &["max_tokens"], 1.0).expect("valid");
        assert_eq!(c.max_tokens, Some(5));
        assert_eq!(c.seed, Some(7));
        assert_eq!(c.stop, ["\n"]);
        assert!(c.stream);
        assert_eq!(m.keys().collect::<Vec<_>>(), ["top_p"]);
        for bad in [
            r#"{"max_tokens":0}"#,
            r#"{"max_tokens":-1}"#,
            r#"{"max_tokens":"5"}"#,
            r#"{"max_tokens":1e30}"#,
            r#"{"max_tokens":99999999999}"#,
            r#"{"temperature":-1}"#,
            r#"{"temperature":"hot"}"#,
            r#"{"n":2}"#,
            r#"{"seed":-3}"#,
            r#"{"stop":[1]}"#,
            r#"{"stop":""}"#,
            r#"{"stream":"yes"}"#,
            r#"{"model":3}"#,
        ] {
            let e = common(&mut obj(bad), &["max_tokens"], 1.0).expect_err(bad);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn prompts_take_one_text_or_one_list_of_ids() {
        assert_eq!(
            prompt(&mut obj(r#"{"prompt":"x"}"#)).expect("text"),
            PromptIn::Text("x".into())
        );
        assert_eq!(
            prompt(&mut obj(r#"{"prompt":[[1,2]]}"#)).expect("ids"),
            PromptIn::Ids(vec![1, 2])
        );
        for bad in [
            r#"{}"#,
            r#"{"prompt":""}"#,
            r#"{"prompt":[]}"#,
            r#"{"prompt":["a","b"]}"#,
            r#"{"prompt":[1,"a"]}"#,
            r#"{"prompt":{"a":1}}"#,
        ] {
            assert!(prompt(&mut obj(bad)).is_err(), "{bad}");
        }
        for bad in ["", "  ", "{", "[1]", "nul"] {
            assert!(parse_object(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn messages_take_text_content() {
        let m = messages(&mut obj(
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#,
        ))
        .expect("valid");
        assert_eq!(m[0].content, "ab");
        for bad in [
            r#"{"messages":[]}"#,
            r#"{"messages":"hi"}"#,
            r#"{"messages":[{"content":"x"}]}"#,
            r#"{"messages":[{"role":"user","content":5}]}"#,
            r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
        ] {
            assert!(messages(&mut obj(bad)).is_err(), "{bad}");
        }
    }

    /// Request bodies never panic the server: arbitrary bytes, and objects
    /// built from the fields the endpoints read with values of any JSON type
    /// and size, through every check a request meets before the model (the
    /// body, the shared fields of both endpoints, `prompt`, `messages`).
    /// Every refusal is a 4xx with a message. `TILEFUSE_FUZZ_CASES` sets the
    /// number of cases (CI: the default 2000; long campaigns: millions).
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_map(
                    |f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
                ),
                prop_oneof![Just(0i64), Just(-1), Just(1), Just(1 << 31), Just(i64::MAX)]
                    .prop_map(Value::from),
                ".{0,24}".prop_map(Value::String),
                prop_oneof![
                    Just("user"),
                    Just("system"),
                    Just("assistant"),
                    Just("text"),
                    Just("")
                ]
                .prop_map(|s| Value::String(s.into())),
            ];
            leaf.prop_recursive(3, 24, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::btree_map(
                        prop_oneof![
                            Just("role"),
                            Just("content"),
                            Just("type"),
                            Just("text"),
                            Just("include_usage")
                        ]
                        .prop_map(String::from),
                        inner,
                        0..4
                    )
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        const FIELDS: &[&str] = &[
            "model",
            "prompt",
            "messages",
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "seed",
            "stop",
            "n",
            "stream",
            "stream_options",
            "top_p",
            "logprobs",
            "unknown_field",
        ];

        fn request() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..64),
                prop::collection::vec((prop::sample::select(FIELDS), json_value()), 0..8).prop_map(
                    |kv| {
                        let m: Map<String, Value> =
                            kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                        serde_json::to_vec(&Value::Object(m)).unwrap_or_default()
                    }
                ),
                (
                    prop::collection::vec((prop::sample::select(FIELDS), json_value()), 0..8),
                    0usize..64
                )
                    .prop_map(|(kv, cut)| {
                        let m: Map<String, Value> =
                            kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                        let mut b = serde_json::to_vec(&Value::Object(m)).unwrap_or_default();
                        b.truncate(b.len().saturating_sub(cut));
                        b
                    }),
            ]
        }

        fn refusal(e: ApiError) -> Result<(), TestCaseError> {
            prop_assert!(e.status.is_client_error(), "{:?}", e);
            prop_assert!(!e.message.is_empty());
            Ok(())
        }

        fn cases() -> u32 {
            std::env::var("TILEFUSE_FUZZ_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(2000)
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]
            #[test]
            fn request_bodies_are_answered_never_panic(body in request()) {
                let m = match parse_object(&body) {
                    Ok(m) => m,
                    Err(e) => return refusal(e),
                };
                for (keys, t) in [(&["max_tokens"][..], 1.0), (&["max_tokens", "max_completion_tokens"][..], 0.7)] {
                    let mut c = m.clone();
                    if let Err(e) = common(&mut c, keys, t) {
                        refusal(e)?;
                    }
                }
                if let Err(e) = prompt(&mut m.clone()) {
                    refusal(e)?;
                }
                if let Err(e) = messages(&mut m.clone()) {
                    refusal(e)?;
                }
            }
        }
    }
}
