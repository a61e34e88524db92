//! The model side of the server: one thread owns the decoder (speculative
//! with a DFlash draft, or plain) and runs one request at a time, taken in
//! arrival order from a bounded queue.
//!
//! Invariants:
//! - Batch 1: only the engine thread touches the decoder; a job is either in
//!   the queue, running, or answered.
//! - A job is cancelled when its event receiver is gone (the client closed
//!   the connection, or the streaming response was dropped). Cancelled jobs
//!   leave the queue at the next push or decode step, and a running one
//!   stops at its next committed token.
//! - Each job gets exactly one final event (`Done` or `Failed`), unless it
//!   was cancelled, in which case nobody listens.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use tilefuse::model::tokenizer::{StreamDecoder, Tokenizer};
use tilefuse::runtime::speculative::{DFlashDrafter, SpecDecoder};
use tilefuse::runtime::{Sampling, Session};

use super::metrics::{Endpoint, GenerationReport, Metrics, Outcome, Phase};

/// Why a generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl Finish {
    /// OpenAI's `finish_reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What the engine tells a request's handler.
#[derive(Debug)]
pub enum Event {
    /// New text, in order; the concatenation of all deltas is the completion.
    Delta(String),
    /// The end.
    Done {
        /// Why it stopped.
        finish: Finish,
        /// Tokens generated (the end-of-sequence token included).
        completion_tokens: usize,
    },
    /// The request failed: an HTTP status and a message.
    Failed {
        /// 500 (the model failed) or 503 (the server is stopping).
        status: u16,
        /// What happened.
        message: String,
    },
}

/// One request, validated and tokenized.
#[derive(Debug)]
pub struct Job {
    /// For metrics.
    pub endpoint: Endpoint,
    /// Prompt token ids (non-empty, inside the vocabulary, fitting the context with `max_tokens`).
    pub ids: Vec<i32>,
    /// Tokens to generate at most (>= 1).
    pub max_tokens: usize,
    /// Greedy or sampled.
    pub sampling: Sampling,
    /// Stop strings (non-empty strings).
    pub stop: Vec<String>,
    /// Where the events go.
    pub events: UnboundedSender<Event>,
    /// When the request arrived.
    pub arrived: Instant,
}

impl Job {
    fn cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// Counts the job's outcome, then sends its last event: a client that
    /// reads the metrics after its answer finds its own request counted.
    fn finish(&self, metrics: &Metrics, outcome: Outcome, last: Event) {
        metrics.request(self.endpoint, outcome);
        let _ = self.events.send(last);
    }
}

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue holds `capacity` jobs already.
    Full,
    /// The server is stopping.
    Closed,
}

#[derive(Debug, Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    closed: bool,
}

/// The bounded FIFO of jobs waiting for the engine.
#[derive(Debug)]
pub struct Queue {
    state: Mutex<QueueState>,
    ready: Condvar,
    capacity: usize,
}

impl Queue {
    /// An empty queue holding at most `capacity` waiting jobs.
    pub fn new(capacity: usize) -> Queue {
        Queue {
            state: Mutex::new(QueueState::default()),
            ready: Condvar::new(),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // The state is a list and a flag, valid after any panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most jobs that wait at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Jobs waiting now (cancelled ones not yet removed included).
    pub fn depth(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Queues `job` behind the others; first drops cancelled jobs, so a
    /// client that went away frees its place.
    pub fn push(&self, job: Job, metrics: &Metrics) -> Result<(), (Refused, Job)> {
        let mut s = self.lock();
        if s.closed {
            return Err((Refused::Closed, job));
        }
        drop_cancelled(&mut s.jobs, metrics);
        if s.jobs.len() >= self.capacity {
            return Err((Refused::Full, job));
        }
        s.jobs.push_back(job);
        self.ready.notify_one();
        Ok(())
    }

    /// Drops cancelled jobs (the engine calls it at each decode step).
    fn purge(&self, metrics: &Metrics) {
        drop_cancelled(&mut self.lock().jobs, metrics);
    }

    /// The next job, waiting for one; `None` once the queue is closed and empty.
    fn pop(&self) -> Option<Job> {
        let mut s = self.lock();
        loop {
            if let Some(j) = s.jobs.pop_front() {
                return Some(j);
            }
            if s.closed {
                return None;
            }
            s = self.ready.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Stops taking jobs and answers every waiting one with 503.
    pub fn close(&self, metrics: &Metrics) {
        let mut s = self.lock();
        s.closed = true;
        for job in s.jobs.drain(..) {
            let outcome = if job.cancelled() {
                Outcome::Cancelled
            } else {
                Outcome::Unavailable
            };
            job.finish(
                metrics,
                outcome,
                Event::Failed {
                    status: 503,
                    message:
                        "the server is shutting down; retry against another instance or after restart"
                            .into(),
                },
            );
        }
        self.ready.notify_all();
    }
}

fn drop_cancelled(jobs: &mut VecDeque<Job>, metrics: &Metrics) {
    jobs.retain(|j| {
        let gone = j.cancelled();
        if gone {
            metrics.request(j.endpoint, Outcome::Cancelled);
        }
        !gone
    });
}

/// The decoder a server runs.
pub enum Decoder {
    /// DFlash speculative decoding.
    Spec(Box<SpecDecoder<DFlashDrafter>>),
    /// One token per target forward.
    Plain(Box<Session>),
}

/// What a decoder reports of one generation.
struct RunStats {
    forwards: Vec<(Phase, Duration)>,
    steps: Vec<(usize, usize)>,
    tokens_per_s: Option<f64>,
}

impl Decoder {
    /// One short greedy generation of `ids`, to pay first-use costs before serving.
    pub fn warm_up(&mut self, ids: &[i32]) -> Result<(), String> {
        self.generate(ids, 2, Sampling::Greedy, |_| true)
            .map(|_| ())
    }

    fn generate(
        &mut self,
        ids: &[i32],
        max_tokens: usize,
        sampling: Sampling,
        on_token: impl FnMut(i32) -> bool,
    ) -> Result<RunStats, String> {
        match self {
            Decoder::Spec(spec) => {
                spec.generate(ids, max_tokens, sampling, on_token)
                    .map_err(|e| e.to_string())?;
                let st = &spec.stats;
                let mut forwards = vec![(Phase::Prefill, st.prefill)];
                for s in &st.steps {
                    forwards.push((Phase::Draft, s.draft));
                    forwards.push((Phase::Verify, s.verify));
                }
                Ok(RunStats {
                    forwards,
                    steps: st.steps.iter().map(|s| (s.block, s.accepted)).collect(),
                    tokens_per_s: (!st.steps.is_empty() && !st.decode.is_zero())
                        .then(|| st.decode_tokens_per_s()),
                })
            }
            Decoder::Plain(session) => {
                session.reset();
                session
                    .generate(ids, max_tokens, sampling, on_token)
                    .map_err(|e| e.to_string())?;
                let t = &session.times;
                let decode: Duration = t.decode.iter().sum();
                let mut forwards = vec![(Phase::Prefill, t.prefill)];
                forwards.extend(t.decode.iter().map(|&d| (Phase::Decode, d)));
                Ok(RunStats {
                    forwards,
                    steps: Vec::new(),
                    tokens_per_s: (!decode.is_zero())
                        .then(|| t.decode.len() as f64 / decode.as_secs_f64()),
                })
            }
        }
    }
}

/// Everything the engine thread needs besides its decoder.
pub struct Shared {
    /// The queue it takes jobs from.
    pub queue: Arc<Queue>,
    /// Where it counts.
    pub metrics: Arc<Metrics>,
    /// Set by a second SIGINT/SIGTERM: stop the running generation now.
    pub abort: Arc<AtomicBool>,
    /// The tokenizer of the model.
    pub tokenizer: Arc<Tokenizer>,
    /// End-of-sequence ids.
    pub eos: Vec<i64>,
}

/// Runs jobs until the queue is closed and empty.
pub fn run(mut decoder: Decoder, shared: Shared) {
    while let Some(job) = shared.queue.pop() {
        if job.cancelled() {
            shared.metrics.request(job.endpoint, Outcome::Cancelled);
            continue;
        }
        if shared.abort.load(Ordering::SeqCst) {
            job.finish(
                &shared.metrics,
                Outcome::Unavailable,
                Event::Failed {
                    status: 503,
                    message: "the server is shutting down".into(),
                },
            );
            continue;
        }
        let endpoint = job.endpoint;
        if std::panic::catch_unwind(AssertUnwindSafe(|| run_job(&mut decoder, &shared, job)))
            .is_err()
        {
            // The job's sender was dropped with the unwound frame: its
            // handler sees a closed channel and answers 500.
            eprintln!("error: the model panicked on a request; answered 500, still serving");
            shared.metrics.generation(&GenerationReport::default());
            shared.metrics.request(endpoint, Outcome::Error);
        }
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of a stop
/// string (text that may yet become a stop string, so is held back).
fn held_back(text: &str, stop: &[String]) -> usize {
    let mut best = 0;
    for s in stop {
        for (i, _) in s.char_indices().skip(1) {
            if i > best && text.ends_with(&s[..i]) {
                best = i;
            }
        }
    }
    best
}

/// The earliest byte offset where a stop string starts in `text`.
fn find_stop(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// Text of a generation, streamed out as deltas, with stop strings cut.
struct TextOut<'a> {
    events: &'a UnboundedSender<Event>,
    stop: &'a [String],
    text: String,
    /// Bytes of `text` already sent (a char boundary).
    sent: usize,
    stopped: bool,
}

impl TextOut<'_> {
    /// Adds decoded text; sends what can no longer be part of a stop string.
    /// Returns false once a stop string was found.
    fn add(&mut self, piece: &str, last: bool) -> bool {
        self.text.push_str(piece);
        let safe = match find_stop(&self.text, self.stop) {
            Some(at) => {
                self.text.truncate(at);
                self.stopped = true;
                at
            }
            None if last => self.text.len(),
            None => self.text.len() - held_back(&self.text, self.stop),
        };
        if safe > self.sent {
            let _ = self
                .events
                .send(Event::Delta(self.text[self.sent..safe].to_string()));
            self.sent = safe;
        }
        !self.stopped
    }
}

/// Runs one job to its last event, its outcome counted ([`Job::finish`]).
fn run_job(decoder: &mut Decoder, shared: &Shared, job: Job) {
    let metrics = &shared.metrics;
    metrics.started(job.arrived.elapsed(), job.ids.len());
    let tokenizer = &*shared.tokenizer;
    let mut stream = StreamDecoder::new();
    let mut out = TextOut {
        events: &job.events,
        stop: &job.stop,
        text: String::new(),
        sent: 0,
        stopped: false,
    };
    let mut n = 0usize;
    let mut eos = false;
    let mut cancelled = false;
    let result = decoder.generate(&job.ids, job.max_tokens, job.sampling, |tok| {
        n += 1;
        if n == 1 {
            metrics.first_token(job.arrived.elapsed());
        }
        if shared.eos.contains(&i64::from(tok)) {
            eos = true;
            return false;
        }
        if !out.add(&stream.push(tokenizer, tok), false) {
            return false;
        }
        shared.queue.purge(metrics);
        if job.cancelled() || shared.abort.load(Ordering::SeqCst) {
            cancelled = true;
            return false;
        }
        true
    });
    let stats = match result {
        Ok(s) => s,
        Err(e) => {
            metrics.generation(&GenerationReport {
                tokens: n,
                ..GenerationReport::default()
            });
            eprintln!("error: generation failed: {e}");
            job.finish(
                metrics,
                Outcome::Error,
                Event::Failed {
                    status: 500,
                    message: format!("the model failed on this request: {e}"),
                },
            );
            return;
        }
    };
    metrics.generation(&GenerationReport {
        tokens: n,
        tokens_per_s: stats.tokens_per_s,
        forwards: stats.forwards,
        steps: stats.steps,
    });
    if cancelled || job.cancelled() {
        job.finish(
            metrics,
            Outcome::Cancelled,
            Event::Failed {
                status: 503,
                message: "the server is shutting down; this request was cut short".into(),
            },
        );
        return;
    }
    if !out.stopped {
        out.add(&stream.finish(tokenizer), true);
    }
    let finish = if eos || out.stopped {
        Finish::Stop
    } else {
        Finish::Length
    };
    job.finish(
        metrics,
        Outcome::Ok,
        Event::Done {
            finish,
            completion_tokens: n,
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_that_may_start_a_stop_string_is_held_back_then_cut() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = vec!["\n\n".to_string(), "END".to_string()];
        let mut out = TextOut {
            events: &tx,
            stop: &stop,
            text: String::new(),
            sent: 0,
            stopped: false,
        };
        assert!(out.add("ab\n", false));
        assert!(out.add("cE", false));
        assert!(out.add("N", false));
        assert!(!out.add("Dxyz", false));
        assert_eq!(out.text, "ab\nc");
        drop(out);
        drop(tx);
        let mut deltas = Vec::new();
        while let Ok(Event::Delta(d)) = rx.try_recv() {
            deltas.push(d);
        }
        assert_eq!(deltas, ["ab", "\nc"]);
    }

    #[test]
    fn held_back_respects_char_boundaries() {
        assert_eq!(held_back("xé", &["éa".to_string()]), 2);
        assert_eq!(held_back("x", &["éa".to_string()]), 0);
        assert_eq!(find_stop("aébc", &["bc".into(), "é".into()]), Some(1));
    }
}
