//! `tilefuse serve`: an OpenAI-compatible HTTP server over one model
//! (speculative with a DFlash draft, or plain), batch 1.
//!
//! Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both with
//! `stream: true` as server-sent events), `GET /v1/models`, `GET /health`,
//! `GET /metrics` (Prometheus text).
//!
//! Shape: axum on a small tokio runtime parses and checks each request,
//! tokenizes it and puts it in a bounded FIFO ([`engine::Queue`]); one
//! engine thread owns the decoder and answers the queue in order, sending
//! text deltas back over a channel per request. A full queue answers 429
//! with `Retry-After`. The first SIGINT or SIGTERM stops taking requests,
//! answers the queued ones with 503 and lets the running one finish; a
//! second cuts it short. Then the process exits 0.

mod api;
mod chat;
mod engine;
mod metrics;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use tilefuse::model::tokenizer::Tokenizer;
use tilefuse::runtime::{Backend, Executable, Sampling, Session};

use crate::generate_cmd::{self, GenerateArgs, Prompt, Source};
use api::{ApiError, PromptIn, Usage};
use chat::ChatTemplate;
use engine::{Decoder, Event, Job, Queue, Refused};
use metrics::{Endpoint, Metrics, Outcome};

/// Everything `serve` needs.
pub struct ServeArgs {
    /// A checkpoint directory or the name of a shipped pair [default: the shipped pair].
    pub model: Option<PathBuf>,
    /// A DFlash draft: a directory or a built-in draft preset.
    pub draft: Option<String>,
    /// Draft block size.
    pub block: Option<usize>,
    /// Where to run.
    pub backend: Backend,
    /// Context override.
    pub context: Option<usize>,
    /// Dtype override.
    pub dtype: Option<tilefuse::ir::DType>,
    /// Address to listen on.
    pub host: String,
    /// Port (0: any free port, printed at start).
    pub port: u16,
    /// Requests that may wait for the model at once.
    pub queue: usize,
}

/// What the handlers share.
struct AppState {
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    tokenizer: Arc<Tokenizer>,
    /// The chat template, or why there is none (answered as 400).
    chat: Result<ChatTemplate, String>,
    model_id: String,
    context: usize,
    vocab: usize,
    /// Set by the first SIGINT/SIGTERM.
    stopping: AtomicBool,
    /// Set by the second: the running generation stops at its next token.
    abort: Arc<AtomicBool>,
    next_id: AtomicU64,
    started: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs the server until SIGINT or SIGTERM.
pub fn run(args: ServeArgs) -> Result<(), String> {
    if args.queue == 0 {
        return Err("--queue must be at least 1 (requests that wait while one decodes)".into());
    }
    // Same defaults as `generate`: no model is the shipped pair with its drafter.
    let pair = args
        .model
        .is_none()
        .then(|| crate::shipped::pair_dir(crate::shipped::DEFAULT_PAIR))
        .flatten();
    let (model_dir, model_id) = match (&args.model, &pair) {
        (Some(m), _) => {
            let dir = crate::shipped::resolve_model(m);
            let id = if m.is_dir() {
                dir.canonicalize()
                    .ok()
                    .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .unwrap_or_else(|| m.display().to_string())
            } else {
                m.display().to_string()
            };
            (dir, id)
        }
        (None, Some(p)) => (p.join("target"), crate::shipped::DEFAULT_PAIR.to_string()),
        (None, None) => {
            return Err(format!(
            "no --model given and the shipped pair `{}` is not under ./models; pass --model DIR",
            crate::shipped::DEFAULT_PAIR
        ))
        }
    };
    let (draft, block) = match (&args.draft, &pair) {
        (None, Some(p)) => (
            Some(p.join("drafter").display().to_string()),
            args.block.or(Some(crate::shipped::DEFAULT_BLOCK)),
        ),
        _ => (args.draft.clone(), args.block),
    };
    let t_load = Instant::now();
    let gen_args = GenerateArgs {
        source: Source::Model(&model_dir),
        prompt: Prompt::Text("-"),
        max_tokens: 1,
        temperature: 0.0,
        seed: 0,
        backend: args.backend,
        context: args.context,
        dtype: args.dtype,
        json: false,
    };
    let m = generate_cmd::load(&gen_args)?;
    let chat = match ChatTemplate::for_dir(&model_dir) {
        Ok(Some(t)) => Ok(t),
        Ok(None) => Err(format!(
            "the model `{model_id}` has no chat template (no `chat_template` in its \
             tokenizer_config.json, no chat_template.jinja); use /v1/completions"
        )),
        Err(e) => {
            eprintln!("warning: {e}; /v1/chat/completions will answer 400");
            Err(e)
        }
    };
    let context = m.context;
    let vocab = m.arch.vocab_size();
    let tokenizer = Arc::new(m.tokenizer.clone());
    let queue = Arc::new(Queue::new(args.queue));
    let metrics = Arc::new(Metrics::new(&args.backend.to_string()));
    let abort = Arc::new(AtomicBool::new(false));
    let shared = engine::Shared {
        queue: queue.clone(),
        metrics: metrics.clone(),
        abort: abort.clone(),
        tokenizer: tokenizer.clone(),
        eos: m.eos.clone(),
    };
    // The decoder is built, warmed up and run on the engine thread (GPU
    // state stays on the thread that made it); it reports once when ready.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<String, String>>();
    let backend = args.backend;
    let worker = std::thread::Builder::new()
        .name("tilefuse-engine".into())
        .spawn(move || {
            let built = build_decoder(m, draft.as_deref(), block, backend);
            match built {
                Ok((decoder, what)) => {
                    let _ = ready_tx.send(Ok(what));
                    engine::run(decoder, shared);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .map_err(|e| format!("cannot start the engine thread: {e}"))?;
    let what = match ready_rx.recv() {
        Ok(Ok(what)) => what,
        Ok(Err(e)) => {
            let _ = worker.join();
            return Err(e);
        }
        Err(_) => {
            let _ = worker.join();
            return Err(
                "the engine thread stopped while loading the model; see the message above".into(),
            );
        }
    };
    let load = t_load.elapsed();
    let state = Arc::new(AppState {
        queue,
        metrics,
        tokenizer,
        chat,
        model_id: model_id.clone(),
        context,
        vocab,
        stopping: AtomicBool::new(false),
        abort,
        next_id: AtomicU64::new(0),
        started: unix_now(),
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let st = state.clone();
    let served = rt.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| {
            format!("cannot listen on {addr}: {e}; pick another --port or --host")
        })?;
        let local = listener
            .local_addr()
            .map_err(|e| format!("cannot read the listening address: {e}"))?;
        eprintln!(
            "tilefuse serve: {model_id} {what} on {backend}, context {}, queue {}; loaded in {load:.1?}",
            st.context,
            st.queue.capacity()
        );
        eprintln!("tilefuse serve: listening on http://{local}");
        axum::serve(listener, router(st.clone()))
            .with_graceful_shutdown(shutdown(st))
            .await
            .map_err(|e| format!("the server stopped: {e}"))
    });
    // However the server ended, the engine finishes what it runs and stops.
    state.queue.close(&state.metrics);
    drop(rt);
    if worker.join().is_err() {
        return Err("the engine thread panicked; see the message above".into());
    }
    eprintln!("tilefuse serve: stopped");
    served
}

/// The decoder of loaded model `m`: speculative with `draft`, else plain;
/// warmed up by one short generation, so the first request does not pay
/// for first-use setup (kernel compiles, graph captures). Also a phrase
/// saying which, for the banner.
fn build_decoder(
    m: generate_cmd::Loaded,
    draft: Option<&str>,
    block: Option<usize>,
    backend: Backend,
) -> Result<(Decoder, String), String> {
    let mut decoder = match draft {
        Some(d) => {
            let (spec, dname) = crate::spec_cmd::build(&m, d, block, backend, 0)?;
            let what = format!("+ draft {dname} (B = {})", spec.options().block);
            (Decoder::Spec(Box::new(spec)), what)
        }
        None => {
            let exe = Executable::new(m.graph, m.weights, backend).map_err(|e| e.to_string())?;
            let session =
                Session::new(exe, m.context, m.options.max_tokens).map_err(|e| e.to_string())?;
            (Decoder::Plain(Box::new(session)), "(plain decoding)".into())
        }
    };
    let warm = vec![1; m.context.saturating_sub(2).clamp(1, 4)];
    decoder
        .0
        .warm_up(&warm)
        .map_err(|e| format!("the model failed its first generation: {e}"))?;
    Ok(decoder)
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics_text))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Waits for SIGINT or SIGTERM; then stops taking requests, answers the
/// queued ones with 503 and returns (axum then waits for open responses).
/// A second signal cuts the running generation short.
async fn shutdown(state: Arc<AppState>) {
    signal().await;
    eprintln!(
        "tilefuse serve: stopping: new and queued requests get 503, the running one finishes \
         (signal again to cut it short)"
    );
    state.stopping.store(true, Ordering::SeqCst);
    state.queue.close(&state.metrics);
    let abort = state.abort.clone();
    tokio::spawn(async move {
        signal().await;
        eprintln!("tilefuse serve: cutting the running request short");
        abort.store(true, Ordering::SeqCst);
    });
}

/// The next SIGINT or SIGTERM (SIGINT only where SIGTERM cannot be watched).
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    if tokio::signal::ctrl_c().await.is_err() {
        // No way to watch signals: serve until killed.
        std::future::pending::<()>().await;
    }
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    if st.stopping.load(Ordering::SeqCst) {
        ApiError::status(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        )
        .into_response()
    } else {
        Json(json!({"status": "ok"})).into_response()
    }
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    Json(json!({
        "object": "list",
        "data": [{
            "id": st.model_id,
            "object": "model",
            "created": st.started,
            "owned_by": "tilefuse",
            "max_model_len": st.context,
        }],
    }))
    .into_response()
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(st.queue.depth(), st.queue.capacity()),
    )
        .into_response()
}

async fn not_found() -> Response {
    ApiError::status(
        StatusCode::NOT_FOUND,
        "no such endpoint; this server has POST /v1/completions, POST /v1/chat/completions, \
         GET /v1/models, GET /health and GET /metrics",
    )
    .into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::status(
        StatusCode::METHOD_NOT_ALLOWED,
        "wrong method for this endpoint: completions take POST, the others GET",
    )
    .into_response()
}

async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(st, Endpoint::Completions, body).await
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(st, Endpoint::Chat, body).await
}

/// A queued request, as its handler knows it.
struct Ticket {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    stream: bool,
    include_usage: bool,
    prompt_tokens: usize,
}

impl Ticket {
    fn usage(&self, completion_tokens: usize) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens,
            total_tokens: self.prompt_tokens + completion_tokens,
        }
    }

    /// A stream chunk carrying `text` (and `finish`, for the last).
    fn chunk(&self, text: Option<&str>, finish: Option<&str>) -> Value {
        match self.endpoint {
            Endpoint::Completions => json!({
                "id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null,
                             "finish_reason": finish}],
            }),
            Endpoint::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null,
                                 "finish_reason": finish}],
                })
            }
        }
    }

    /// The whole response of a non-streamed request.
    fn response(&self, text: String, finish: &str, completion_tokens: usize) -> Value {
        let usage = self.usage(completion_tokens);
        match self.endpoint {
            Endpoint::Completions => json!({
                "id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
                "usage": usage,
            }),
            Endpoint::Chat => json!({
                "id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0,
                             "message": {"role": "assistant", "content": text},
                             "logprobs": null, "finish_reason": finish}],
                "usage": usage,
            }),
        }
    }
}

async fn handle(
    st: Arc<AppState>,
    endpoint: Endpoint,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    let (ticket, rx) = match admit(&st, endpoint, body, arrived) {
        Ok(t) => t,
        Err(e) => {
            // Refused before queueing: counted here, once.
            st.metrics
                .request(endpoint, Outcome::of_status(e.status.as_u16()));
            eprintln!(
                "tilefuse serve: {} {}: {}",
                e.status.as_u16(),
                path(endpoint),
                e.body()["error"]["message"].as_str().unwrap_or_default()
            );
            return e.into_response();
        }
    };
    if ticket.stream {
        stream(ticket, rx).into_response()
    } else {
        collect(ticket, rx).await
    }
}

fn path(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Completions => "/v1/completions",
        Endpoint::Chat => "/v1/chat/completions",
    }
}

/// Checks, tokenizes and queues a request.
fn admit(
    st: &AppState,
    endpoint: Endpoint,
    body: Result<Bytes, BytesRejection>,
    arrived: Instant,
) -> Result<(Ticket, UnboundedReceiver<Event>), ApiError> {
    if st.stopping.load(Ordering::SeqCst) {
        return Err(ApiError::status(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        ));
    }
    let body = body.map_err(|r| {
        ApiError::status(
            r.status(),
            format!("cannot read the request body: {}", r.body_text()),
        )
    })?;
    let mut m = api::parse_object(&body)?;
    let max_keys: &[&'static str] = match endpoint {
        Endpoint::Completions => &["max_tokens"],
        Endpoint::Chat => &["max_tokens", "max_completion_tokens"],
    };
    let common = api::common(&mut m, max_keys, 1.0)?;
    if let Some(asked) = &common.model {
        if *asked != st.model_id {
            return Err(ApiError::no_model(asked, &st.model_id));
        }
    }
    let (ids, default_max) = match endpoint {
        Endpoint::Completions => {
            let ids = match api::prompt(&mut m)? {
                PromptIn::Text(t) => st.tokenizer.encode(&t).map_err(|e| {
                    ApiError::invalid(Some("prompt"), format!("cannot tokenize `prompt`: {e}"))
                })?,
                PromptIn::Ids(ids) => ids
                    .iter()
                    .map(|&i| {
                        i32::try_from(i)
                            .ok()
                            .filter(|&t| t >= 0 && (t as usize) < st.vocab)
                            .ok_or_else(|| {
                                ApiError::invalid(
                                    Some("prompt"),
                                    format!(
                                        "prompt token id {i} is outside the vocabulary (ids 0..{})",
                                        st.vocab
                                    ),
                                )
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            };
            // OpenAI's default for completions.
            (ids, Some(16))
        }
        Endpoint::Chat => {
            let messages = api::messages(&mut m)?;
            let template = st
                .chat
                .as_ref()
                .map_err(|why| ApiError::invalid(Some("messages"), why.clone()))?;
            let text = template.render(&messages).map_err(|e| {
                ApiError::invalid(
                    Some("messages"),
                    format!("the model's chat template refused these messages: {e}"),
                )
            })?;
            (encode_plain(&st.tokenizer, &text)?, None)
        }
    };
    if !m.is_empty() {
        let names: Vec<&str> = m.keys().map(String::as_str).collect();
        eprintln!(
            "tilefuse serve: {}: ignoring unsupported fields: {}",
            path(endpoint),
            names.join(", ")
        );
    }
    if ids.is_empty() {
        return Err(ApiError::invalid(
            Some("prompt"),
            "the prompt tokenizes to no tokens; send a longer prompt",
        ));
    }
    // A generation of n tokens needs prompt + n − 1 positions.
    let room = (st.context + 1).saturating_sub(ids.len());
    if room == 0 {
        return Err(ApiError::invalid(
            Some("prompt"),
            format!(
                "the prompt is {} tokens, past the context of {} tokens; shorten it",
                ids.len(),
                st.context
            ),
        ));
    }
    let max_tokens = match common.max_tokens {
        Some(n) if n > room => {
            return Err(ApiError::invalid(
                Some(max_keys[0]),
                format!(
                    "`{}` = {n} does not fit: the prompt is {} tokens and the context {}, so at \
                     most {room} tokens can be generated",
                    max_keys[0],
                    ids.len(),
                    st.context
                ),
            ))
        }
        Some(n) => n,
        None => default_max.map_or(room, |d: usize| d.min(room)),
    };
    let sampling = if common.temperature == 0.0 {
        Sampling::Greedy
    } else {
        Sampling::Temperature {
            temperature: common.temperature,
            seed: common.seed.unwrap_or_else(rand::random),
        }
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let n = st.next_id.fetch_add(1, Ordering::Relaxed);
    let ticket = Ticket {
        endpoint,
        id: match endpoint {
            Endpoint::Completions => format!("cmpl-{}-{n}", st.started),
            Endpoint::Chat => format!("chatcmpl-{}-{n}", st.started),
        },
        created: unix_now(),
        model: st.model_id.clone(),
        stream: common.stream,
        include_usage: common.include_usage,
        prompt_tokens: ids.len(),
    };
    let job = Job {
        endpoint,
        ids,
        max_tokens,
        sampling,
        stop: common.stop,
        events: tx,
        arrived,
    };
    match st.queue.push(job, &st.metrics) {
        Ok(()) => Ok((ticket, rx)),
        Err((Refused::Full, _)) => Err(ApiError::queue_full(st.queue.capacity(), 1)),
        Err((Refused::Closed, _)) => Err(ApiError::status(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        )),
    }
}

/// Token ids of rendered chat text: the template wrote the special tokens
/// it wants, so none are added (as transformers' `apply_chat_template`).
fn encode_plain(tok: &Tokenizer, text: &str) -> Result<Vec<i32>, ApiError> {
    let bad = |e: String| {
        ApiError::invalid(
            Some("messages"),
            format!("cannot tokenize the rendered chat: {e}"),
        )
    };
    match tok {
        Tokenizer::Bytes => tok.encode(text).map_err(|e| bad(e.to_string())),
        Tokenizer::Hf(t) => t
            .encode(text, false)
            .map_err(|e| bad(e.to_string()))?
            .get_ids()
            .iter()
            .map(|&id| i32::try_from(id).map_err(|_| bad(format!("token id {id} past i32"))))
            .collect(),
    }
}

/// Waits for the whole completion and answers it in one body.
async fn collect(ticket: Ticket, mut rx: UnboundedReceiver<Event>) -> Response {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Delta(d) => text.push_str(&d),
            Event::Done {
                finish,
                completion_tokens,
            } => {
                return Json(ticket.response(text, finish.reason(), completion_tokens))
                    .into_response()
            }
            Event::Failed { status, message } => {
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return ApiError::status(status, message).into_response();
            }
        }
    }
    ApiError::status(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the model stopped without answering this request; the server log says why",
    )
    .into_response()
}

/// What a stream still has to send.
struct StreamState {
    ticket: Ticket,
    rx: UnboundedReceiver<Event>,
    pending: VecDeque<SseEvent>,
    done: bool,
}

/// One `data:` event of JSON `v`. Compact JSON escapes control characters
/// inside strings, so the text has no carriage return (which axum refuses).
fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

/// Server-sent events: one chunk per delta as the engine commits tokens,
/// then the finish chunk, the usage chunk if asked, and `[DONE]`. Dropping
/// the stream (the client went away) closes the channel, which cancels the
/// job at its next token.
fn stream(
    ticket: Ticket,
    rx: UnboundedReceiver<Event>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let mut pending = VecDeque::new();
    if ticket.endpoint == Endpoint::Chat {
        let mut first = ticket.chunk(Some(""), None);
        first["choices"][0]["delta"] = json!({"role": "assistant", "content": ""});
        pending.push_back(data(&first));
    }
    let state = StreamState {
        ticket,
        rx,
        pending,
        done: false,
    };
    let events = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(ev) = s.pending.pop_front() {
                return Some((Ok(ev), s));
            }
            if s.done {
                return None;
            }
            match s.rx.recv().await {
                Some(Event::Delta(d)) => s.pending.push_back(data(&s.ticket.chunk(Some(&d), None))),
                Some(Event::Done {
                    finish,
                    completion_tokens,
                }) => {
                    s.pending
                        .push_back(data(&s.ticket.chunk(None, Some(finish.reason()))));
                    if s.ticket.include_usage {
                        let mut u = s.ticket.chunk(None, None);
                        u["choices"] = json!([]);
                        u["usage"] = json!(s.ticket.usage(completion_tokens));
                        s.pending.push_back(data(&u));
                    }
                    s.pending.push_back(SseEvent::default().data("[DONE]"));
                    s.done = true;
                }
                Some(Event::Failed { status, message }) => {
                    let status =
                        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                    s.pending
                        .push_back(data(&ApiError::status(status, message).body()));
                    s.pending.push_back(SseEvent::default().data("[DONE]"));
                    s.done = true;
                }
                None => {
                    let e = ApiError::status(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the model stopped without finishing this request; the server log says why",
                    );
                    s.pending.push_back(data(&e.body()));
                    s.done = true;
                }
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
