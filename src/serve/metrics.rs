//! The server's counters, rendered as Prometheus text exposition
//! (`GET /metrics`, format version 0.0.4).
//!
//! Invariant: every request is counted in `tilefuse_requests_total` exactly
//! once, by whoever ends it: the handler for a request refused before it
//! was queued (4xx, 429, 503), the engine for a queued one (ok, cancelled,
//! error), the shutdown path for one still queued when the server stops.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Which endpoint a request came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Endpoint {
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/chat/completions`.
    Chat,
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Endpoint::Completions => "completions",
            Endpoint::Chat => "chat_completions",
        }
    }
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Answered in full.
    Ok,
    /// Refused as invalid (4xx other than 429).
    Invalid,
    /// Refused because the queue was full (429).
    QueueFull,
    /// Refused or dropped because the server is stopping (503).
    Unavailable,
    /// The client went away before it was answered in full.
    Cancelled,
    /// The model failed (5xx).
    Error,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Invalid => "invalid",
            Outcome::QueueFull => "queue_full",
            Outcome::Unavailable => "unavailable",
            Outcome::Cancelled => "cancelled",
            Outcome::Error => "error",
        }
    }

    /// The outcome of a refusal with HTTP status `status`.
    pub fn of_status(status: u16) -> Outcome {
        match status {
            429 => Outcome::QueueFull,
            503 => Outcome::Unavailable,
            400..=499 => Outcome::Invalid,
            _ => Outcome::Error,
        }
    }
}

/// A cumulative histogram with fixed upper bounds.
#[derive(Clone, Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// `counts[i]`: observations `<= bounds[i]` and above the bound before
    /// (not cumulative; summed when rendered).
    counts: Vec<u64>,
    /// Observations above the last bound.
    over: u64,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            over: 0,
            sum: 0.0,
        }
    }

    fn observe(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        self.sum += v;
        match self.bounds.iter().position(|&b| v <= b) {
            Some(i) => self.counts[i] += 1,
            None => self.over += 1,
        }
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cum}");
        }
        cum += self.over;
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cum}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {cum}");
    }
}

const SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const FORWARD_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
const TOKENS_PER_S: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

/// The phase a forward belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// The prompt through the target (all chunks).
    Prefill,
    /// One plain decode forward.
    Decode,
    /// The drafter of one speculative step.
    Draft,
    /// The target's verify forward of one speculative step.
    Verify,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Prefill => "prefill",
            Phase::Decode => "decode",
            Phase::Draft => "draft",
            Phase::Verify => "verify",
        }
    }
}

#[derive(Debug)]
struct Inner {
    requests: BTreeMap<(Endpoint, Outcome), u64>,
    prompt_tokens: u64,
    generation_tokens: u64,
    ttft: Histogram,
    tokens_per_s: Histogram,
    queue_wait: Histogram,
    forward: BTreeMap<Phase, Histogram>,
    spec_steps: u64,
    spec_committed: u64,
    /// Per draft position `k` (1-based, index `k − 1`): steps that drafted a
    /// token at `k`, and steps that accepted it.
    proposed: Vec<u64>,
    accepted: Vec<u64>,
    running: u64,
}

/// All the server's metrics, behind one lock (updates are a few per token).
#[derive(Debug)]
pub struct Metrics {
    inner: Mutex<Inner>,
    backend: String,
}

/// What one finished generation did, for [`Metrics::generation`].
#[derive(Debug, Default)]
pub struct GenerationReport {
    /// Tokens generated.
    pub tokens: usize,
    /// Decode tokens per second (after the first token), if measurable.
    pub tokens_per_s: Option<f64>,
    /// Forward times by phase.
    pub forwards: Vec<(Phase, Duration)>,
    /// Speculative steps: (block, accepted drafts).
    pub steps: Vec<(usize, usize)>,
}

impl Metrics {
    /// Empty metrics of a server running on `backend`.
    pub fn new(backend: &str) -> Metrics {
        Metrics {
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                prompt_tokens: 0,
                generation_tokens: 0,
                ttft: Histogram::new(SECONDS),
                tokens_per_s: Histogram::new(TOKENS_PER_S),
                queue_wait: Histogram::new(SECONDS),
                forward: BTreeMap::new(),
                spec_steps: 0,
                spec_committed: 0,
                proposed: Vec::new(),
                accepted: Vec::new(),
                running: 0,
            }),
            backend: backend.replace(['"', '\\', '\n'], "_"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves counters, never a broken
        // invariant: keep serving them.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a request's end.
    pub fn request(&self, endpoint: Endpoint, outcome: Outcome) {
        *self.lock().requests.entry((endpoint, outcome)).or_default() += 1;
    }

    /// A request leaves the queue for the model after `wait`, with `prompt` tokens.
    pub fn started(&self, wait: Duration, prompt: usize) {
        let mut m = self.lock();
        m.running += 1;
        m.queue_wait.observe(wait.as_secs_f64());
        m.prompt_tokens += prompt as u64;
    }

    /// The first token of a request came `ttft` after it arrived.
    pub fn first_token(&self, ttft: Duration) {
        self.lock().ttft.observe(ttft.as_secs_f64());
    }

    /// A generation ended (in full or not).
    pub fn generation(&self, r: &GenerationReport) {
        let mut m = self.lock();
        m.running = m.running.saturating_sub(1);
        m.generation_tokens += r.tokens as u64;
        if let Some(t) = r.tokens_per_s {
            m.tokens_per_s.observe(t);
        }
        for &(phase, d) in &r.forwards {
            m.forward
                .entry(phase)
                .or_insert_with(|| Histogram::new(FORWARD_SECONDS))
                .observe(d.as_secs_f64());
        }
        for &(block, accepted) in &r.steps {
            m.spec_steps += 1;
            m.spec_committed += accepted as u64 + 1;
            let drafted = block.saturating_sub(1);
            if m.proposed.len() < drafted {
                m.proposed.resize(drafted, 0);
                m.accepted.resize(drafted, 0);
            }
            for k in 0..drafted {
                m.proposed[k] += 1;
                if k < accepted {
                    m.accepted[k] += 1;
                }
            }
        }
    }

    /// The Prometheus text of every metric, with the queue's state now.
    pub fn render(&self, queue_depth: usize, queue_capacity: usize) -> String {
        let m = self.lock();
        let mut o = String::new();
        let head = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} {kind}");
        };
        head(
            &mut o,
            "tilefuse_requests_total",
            "counter",
            "Requests by endpoint and outcome (ok, invalid, queue_full, unavailable, cancelled, error).",
        );
        for ((e, out), n) in &m.requests {
            let _ = writeln!(
                o,
                "tilefuse_requests_total{{endpoint=\"{}\",outcome=\"{}\"}} {n}",
                e.label(),
                out.label()
            );
        }
        head(
            &mut o,
            "tilefuse_prompt_tokens_total",
            "counter",
            "Prompt tokens of requests that reached the model.",
        );
        let _ = writeln!(o, "tilefuse_prompt_tokens_total {}", m.prompt_tokens);
        head(
            &mut o,
            "tilefuse_generation_tokens_total",
            "counter",
            "Tokens generated.",
        );
        let _ = writeln!(
            o,
            "tilefuse_generation_tokens_total {}",
            m.generation_tokens
        );
        head(
            &mut o,
            "tilefuse_time_to_first_token_seconds",
            "histogram",
            "From a request's arrival (queue wait included) to its first generated token.",
        );
        m.ttft
            .render(&mut o, "tilefuse_time_to_first_token_seconds", "");
        head(
            &mut o,
            "tilefuse_decode_tokens_per_second",
            "histogram",
            "Per request: tokens generated after the first, over the time after the first.",
        );
        m.tokens_per_s
            .render(&mut o, "tilefuse_decode_tokens_per_second", "");
        head(
            &mut o,
            "tilefuse_queue_wait_seconds",
            "histogram",
            "Time a request waited in the queue before the model took it.",
        );
        m.queue_wait
            .render(&mut o, "tilefuse_queue_wait_seconds", "");
        head(
            &mut o,
            "tilefuse_forward_seconds",
            "histogram",
            "Forward time by phase (prefill, decode, draft, verify) on the serving backend; GPU event time for speculative steps that stay on the GPU.",
        );
        for (phase, h) in &m.forward {
            let labels = format!("phase=\"{}\",backend=\"{}\"", phase.label(), self.backend);
            h.render(&mut o, "tilefuse_forward_seconds", &labels);
        }
        head(
            &mut o,
            "tilefuse_spec_steps_total",
            "counter",
            "Speculative draft-and-verify steps.",
        );
        let _ = writeln!(o, "tilefuse_spec_steps_total {}", m.spec_steps);
        head(
            &mut o,
            "tilefuse_spec_committed_tokens_total",
            "counter",
            "Tokens committed by speculative steps (accepted drafts + 1 per step).",
        );
        let _ = writeln!(
            o,
            "tilefuse_spec_committed_tokens_total {}",
            m.spec_committed
        );
        head(
            &mut o,
            "tilefuse_spec_tau",
            "gauge",
            "Mean tokens committed per speculative step since start (0 before any step).",
        );
        let tau = if m.spec_steps == 0 {
            0.0
        } else {
            m.spec_committed as f64 / m.spec_steps as f64
        };
        let _ = writeln!(o, "tilefuse_spec_tau {tau}");
        head(
            &mut o,
            "tilefuse_spec_draft_proposed_total",
            "counter",
            "Steps that drafted a token at this position (1 = the first draft).",
        );
        for (k, n) in m.proposed.iter().enumerate() {
            let _ = writeln!(
                o,
                "tilefuse_spec_draft_proposed_total{{position=\"{}\"}} {n}",
                k + 1
            );
        }
        head(
            &mut o,
            "tilefuse_spec_draft_accepted_total",
            "counter",
            "Steps that accepted the draft at this position.",
        );
        for (k, n) in m.accepted.iter().enumerate() {
            let _ = writeln!(
                o,
                "tilefuse_spec_draft_accepted_total{{position=\"{}\"}} {n}",
                k + 1
            );
        }
        head(
            &mut o,
            "tilefuse_spec_acceptance_rate",
            "gauge",
            "Accepted over proposed drafts at this position.",
        );
        for (k, (&p, &a)) in m.proposed.iter().zip(&m.accepted).enumerate() {
            let rate = if p == 0 { 0.0 } else { a as f64 / p as f64 };
            let _ = writeln!(
                o,
                "tilefuse_spec_acceptance_rate{{position=\"{}\"}} {rate}",
                k + 1
            );
        }
        head(
            &mut o,
            "tilefuse_queue_depth",
            "gauge",
            "Requests waiting for the model (not counting the one decoding).",
        );
        let _ = writeln!(o, "tilefuse_queue_depth {queue_depth}");
        head(
            &mut o,
            "tilefuse_queue_capacity",
            "gauge",
            "Requests the queue holds before answering 429.",
        );
        let _ = writeln!(o, "tilefuse_queue_capacity {queue_capacity}");
        head(
            &mut o,
            "tilefuse_requests_running",
            "gauge",
            "Requests decoding now (0 or 1: batch 1).",
        );
        let _ = writeln!(o, "tilefuse_requests_running {}", m.running);
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acceptance_per_position_counts_each_drafted_position() {
        let m = Metrics::new("cpu");
        m.started(Duration::ZERO, 3);
        m.generation(&GenerationReport {
            tokens: 6,
            tokens_per_s: Some(10.0),
            forwards: vec![(Phase::Prefill, Duration::from_millis(3))],
            steps: vec![(4, 2), (4, 0), (2, 1)],
        });
        let text = m.render(0, 4);
        assert!(text.contains("tilefuse_spec_draft_proposed_total{position=\"1\"} 3"));
        assert!(text.contains("tilefuse_spec_draft_accepted_total{position=\"1\"} 2"));
        assert!(text.contains("tilefuse_spec_draft_proposed_total{position=\"3\"} 2"));
        assert!(text.contains("tilefuse_spec_draft_accepted_total{position=\"2\"} 1"));
        assert!(text.contains("tilefuse_spec_tau 2"));
        assert!(text.contains("tilefuse_prompt_tokens_total 3"));
        assert!(text.contains("tilefuse_decode_tokens_per_second_bucket{le=\"10\"} 1"));
    }
}
