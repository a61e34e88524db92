//! `tilefuse eval`: how good and how fast a target and its DFlash drafter are
//! on held-out code. Reports the target's perplexity (and bits per byte) on
//! held-out text, teacher-forced in windows; then, for prompts cut from the
//! same text at function definitions, greedy speculative decoding beside
//! plain decoding: τ per step (mean and histogram of accepted drafts),
//! tokens/s of both after prefill, the speedup, and whether every
//! speculative output equals the plain one.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use tilefuse::runtime::{Backend, Executable, Sampling, Session};

use crate::generate_cmd::{json_str, load, GenerateArgs, Prompt, Source};
use crate::shipped;

/// Options of one evaluation.
pub struct EvalArgs {
    /// Target checkpoint directory or shipped pair name (default: the shipped pair).
    pub model: Option<PathBuf>,
    /// Draft directory or preset (default: the shipped pair's drafter).
    pub draft: Option<String>,
    /// Block size.
    pub block: usize,
    /// Held-out text (default: the pair's `eval/heldout.txt`).
    pub text: Option<PathBuf>,
    /// Prompts to decode.
    pub prompts: usize,
    /// Tokens generated per prompt.
    pub max_tokens: usize,
    /// Held-out tokens scored for perplexity.
    pub ppl_tokens: usize,
    /// Where to run.
    pub backend: Backend,
    /// One JSON object instead of a table.
    pub json: bool,
}

/// Prompts cut from `text`: up to `n` function definitions spread evenly,
/// each with up to `before` bytes of the text ahead of it (from a line
/// start), ending with the `def` line and its newline.
pub fn prompts(text: &str, n: usize, before: usize) -> Vec<String> {
    let mut starts = Vec::new();
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_start().starts_with("def ") && line.ends_with(":\n") {
            starts.push((at, at + line.len()));
        }
        at += line.len();
    }
    if starts.is_empty() || n == 0 {
        return Vec::new();
    }
    let step = (starts.len() as f64 / n as f64).max(1.0);
    (0..n.min(starts.len()))
        .map(|i| starts[(i as f64 * step) as usize])
        .map(|(s, e)| {
            let mut from = s.saturating_sub(before);
            while !text.is_char_boundary(from) {
                from += 1;
            }
            // Start on a line boundary.
            if let Some(nl) = text[from..s].find('\n') {
                if from > 0 {
                    from += nl + 1;
                }
            }
            text[from..e].to_string()
        })
        .collect()
}

/// Runs `tilefuse eval`.
pub fn run(a: EvalArgs) -> Result<(), String> {
    let model_dir = match &a.model {
        Some(m) => shipped::resolve_model(m),
        None => shipped::pair_dir(shipped::DEFAULT_PAIR)
            .map(|d| d.join("target"))
            .ok_or_else(|| {
                format!(
                    "no shipped model `{}` under models/; pass --model DIR (and --draft, --text)",
                    shipped::DEFAULT_PAIR
                )
            })?,
    };
    let draft = match &a.draft {
        Some(d) => d.clone(),
        None => shipped::pair_drafter(&model_dir)
            .map(|d| d.display().to_string())
            .ok_or_else(|| {
                format!(
                    "{} has no drafter beside it; pass --draft",
                    model_dir.display()
                )
            })?,
    };
    let text_path = match &a.text {
        Some(t) => t.clone(),
        None => model_dir
            .parent()
            .map(|p| p.join("eval").join("heldout.txt"))
            .filter(|p| p.is_file())
            .ok_or_else(|| {
                format!(
                    "no held-out text beside {} (eval/heldout.txt); pass --text FILE",
                    model_dir.display()
                )
            })?,
    };
    let text = std::fs::read_to_string(&text_path)
        .map_err(|e| format!("cannot read {}: {e}", text_path.display()))?;
    let gargs = GenerateArgs {
        source: Source::Model(&model_dir),
        prompt: Prompt::Text("eval"),
        max_tokens: a.max_tokens,
        temperature: 0.0,
        seed: 0,
        backend: a.backend,
        context: None,
        dtype: None,
        json: a.json,
    };
    let m = load(&gargs)?;
    let err = |e: tilefuse::ir::IrError| e.to_string();
    let (mut spec, dname) = crate::spec_cmd::build(&m, &draft, Some(a.block), a.backend, 0)?;
    let backend = spec.backend();
    let exe = Executable::new(m.graph.clone(), m.weights.clone(), a.backend).map_err(err)?;
    let mut session = Session::new(exe, m.context, m.options.max_tokens).map_err(err)?;
    let tok = &m.tokenizer;

    // Perplexity: windows of up to 1024 tokens, each from position 0.
    eprintln!("scoring held-out text from {} ...", text_path.display());
    let all = tok.encode(&text).map_err(|e| e.to_string())?;
    let scored: Vec<i32> = all.iter().copied().take(a.ppl_tokens.max(2)).collect();
    let window = m.context.min(1024);
    let (mut nll, mut n) = (0.0f64, 0usize);
    for w in scored.chunks(window) {
        if w.len() < 2 {
            continue;
        }
        session.reset();
        let (s, k) = session.score(w).map_err(err)?;
        nll += s;
        n += k;
    }
    let bytes = tok.decode(&scored[1..]).len().max(1);
    let ppl = (nll / n.max(1) as f64).exp();
    let bpb = nll / std::f64::consts::LN_2 / bytes as f64;

    // Decoding: speculative, then plain, on each prompt.
    let ps = prompts(&text, a.prompts, 600);
    if ps.is_empty() {
        return Err(format!(
            "{} has no `def ...:` line to cut prompts at",
            text_path.display()
        ));
    }
    let b = spec.options().block;
    let mut hist = vec![0usize; b];
    let (mut steps, mut spec_tokens, mut plain_tokens) = (0usize, 0usize, 0usize);
    let (mut spec_time, mut plain_time) = (Duration::ZERO, Duration::ZERO);
    let (mut step_draft, mut step_verify) = (Duration::ZERO, Duration::ZERO);
    let mut on_gpu = !ps.is_empty();
    let mut equal = 0;
    for (i, p) in ps.iter().enumerate() {
        if std::io::stderr().is_terminal() {
            eprint!("\r\x1b[Kdecoding prompt {}/{}", i + 1, ps.len());
        }
        let mut ids = tok.encode(p).map_err(|e| e.to_string())?;
        // Keep the prompt's end where the context is short.
        let room = m.context.saturating_sub(a.max_tokens + b + 1).max(1);
        if ids.len() > room {
            ids.drain(..ids.len() - room);
        }
        let got = spec
            .generate(&ids, a.max_tokens, Sampling::Greedy, |_| true)
            .map_err(err)?;
        for s in &spec.stats.steps {
            hist[s.accepted.min(b - 1)] += 1;
            step_draft += s.draft;
            step_verify += s.verify;
        }
        on_gpu &= spec.stats.on_device;
        steps += spec.stats.steps.len();
        spec_time += spec.stats.decode;
        spec_tokens += spec.stats.step_tokens();
        session.reset();
        let want = session
            .generate(&ids, a.max_tokens, Sampling::Greedy, |_| true)
            .map_err(err)?;
        plain_time += session.times.decode.iter().sum::<Duration>();
        plain_tokens += session.times.decode.len();
        if got == want {
            equal += 1;
        }
    }
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    let per_step = |t: Duration| {
        if steps == 0 {
            0.0
        } else {
            t.as_secs_f64() * 1e3 / steps as f64
        }
    };
    let tau = if steps == 0 {
        0.0
    } else {
        (0..b).map(|a| (a + 1) * hist[a]).sum::<usize>() as f64 / steps as f64
    };
    let rate = |n: usize, t: Duration| {
        if t.is_zero() {
            0.0
        } else {
            n as f64 / t.as_secs_f64()
        }
    };
    let (spec_tps, plain_tps) = (rate(spec_tokens, spec_time), rate(plain_tokens, plain_time));
    let speedup = if plain_tps > 0.0 {
        spec_tps / plain_tps
    } else {
        0.0
    };
    if a.json {
        let h: Vec<String> = hist.iter().map(|x| x.to_string()).collect();
        println!(
            "{{\"model\":{},\"draft\":{},\"backend\":\"{backend}\",\"block\":{b},\"heldout_tokens\":{},\"perplexity\":{ppl:.4},\"bits_per_byte\":{bpb:.4},\"prompts\":{},\"max_tokens\":{},\"steps\":{steps},\"tau\":{tau:.4},\"accepted_histogram\":[{}],\"spec_tokens_per_s\":{spec_tps:.2},\"plain_tokens_per_s\":{plain_tps:.2},\"speedup\":{speedup:.3},\"draft_ms_per_step\":{:.4},\"verify_ms_per_step\":{:.4},\"steps_on_gpu\":{on_gpu},\"equal_outputs\":{equal}}}",
            json_str(&model_dir.display().to_string()),
            json_str(&dname),
            n,
            ps.len(),
            a.max_tokens,
            h.join(","),
            per_step(step_draft),
            per_step(step_verify),
        );
    } else {
        println!(
            "target {} + draft {dname} on {backend}",
            model_dir.display()
        );
        println!("held-out perplexity  {ppl:.3} over {n} tokens ({bpb:.3} bits per byte)");
        println!(
            "prompts              {} (greedy, {} new tokens each)",
            ps.len(),
            a.max_tokens
        );
        println!("tau (block {b})        {tau:.3} tokens per step over {steps} steps");
        let width = hist.iter().copied().max().unwrap_or(1).max(1);
        for (acc, &c) in hist.iter().enumerate() {
            println!(
                "  {:>2} accepted  {:>6}  {}",
                acc,
                c,
                "#".repeat((40 * c).div_ceil(width))
            );
        }
        println!(
            "per step             draft {:.3} ms + verify {:.3} ms{}",
            per_step(step_draft),
            per_step(step_verify),
            if on_gpu {
                " (GPU time; steps without host round trips)"
            } else {
                ""
            }
        );
        println!("plain decoding       {plain_tps:.1} tokens/s");
        println!("speculative          {spec_tps:.1} tokens/s ({speedup:.2}x)");
        println!(
            "outputs equal        {equal}/{} (speculative against plain, token for token)",
            ps.len()
        );
    }
    if equal != ps.len() {
        return Err(format!(
            "{} of {} speculative outputs differ from plain decoding",
            ps.len() - equal,
            ps.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::prompts;

    #[test]
    fn prompts_end_at_definitions() {
        let text = "import os\n\nx = 1\ndef a(x):\n    return x\n\nclass B:\n    def c(self):\n        pass\n";
        let p = prompts(text, 2, 12);
        assert_eq!(p.len(), 2);
        assert!(p[0].ends_with("def a(x):\n"), "{p:?}");
        assert!(p[1].ends_with("    def c(self):\n"), "{p:?}");
        assert!(p.iter().all(|s| !s.is_empty()));
        assert!(prompts("no definitions here\n", 3, 100).is_empty());
    }
}
