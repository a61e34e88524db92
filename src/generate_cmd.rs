//! `tilefuse generate`: a built-in preset (random weights) or a checkpoint
//! directory, a prompt (text or token ids), chunked prefill, then decoding.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use std::time::Instant;

use tilefuse::ir::interp::Tensor;
use tilefuse::model::checkpoint::{self, LoadOptions};
use tilefuse::model::presets;
use tilefuse::model::tokenizer::{StreamDecoder, Tokenizer};
use tilefuse::runtime::{Backend, Executable, Sampling, Session};

/// Where the model comes from.
pub enum Source<'a> {
    /// A built-in preset with random weights of the seed.
    Preset(&'a str),
    /// A checkpoint directory.
    Model(&'a Path),
}

/// The prompt.
pub enum Prompt<'a> {
    /// Text, tokenized by the model's tokenizer (bytes for presets).
    Text(&'a str),
    /// Token ids as given.
    Ids(Vec<i32>),
}

/// Parses `--prompt-ids`: comma-separated non-negative integers
/// ([`tilefuse::model::tokenizer::parse_ids`]).
pub fn parse_ids(s: &str) -> Result<Vec<i32>, String> {
    tilefuse::model::tokenizer::parse_ids(s)
}

/// Everything `generate` needs.
pub struct GenerateArgs<'a> {
    /// The model.
    pub source: Source<'a>,
    /// The prompt.
    pub prompt: Prompt<'a>,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// 0 for greedy.
    pub temperature: f32,
    /// Sampler seed (and the preset's weights).
    pub seed: u32,
    /// Where to run.
    pub backend: Backend,
    /// Context override (checkpoints).
    pub context: Option<usize>,
    /// Activation and dense-weight dtype of a checkpoint (default: its own).
    pub dtype: Option<tilefuse::ir::DType>,
    /// One JSON object instead of streamed text.
    pub json: bool,
}

/// A model loaded (graph and weights on the host), whichever its source.
pub struct Loaded {
    /// For messages and JSON: the preset name or the directory.
    pub name: String,
    /// The checkpoint directory, if any.
    pub model_dir: Option<PathBuf>,
    /// The architecture.
    pub arch: presets::Arch,
    /// The graph options.
    pub options: tilefuse::model::GraphOptions,
    /// The plain forward graph.
    pub graph: tilefuse::ir::Graph,
    /// Its weights.
    pub weights: BTreeMap<String, Tensor>,
    /// Positions the caches hold.
    pub context: usize,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// End-of-sequence ids.
    pub eos: Vec<i64>,
    /// What the weights are, for the banner.
    pub describe: String,
}

/// Loads the model of `args` (a preset with seeded random weights, or a
/// checkpoint directory with its tokenizer).
pub fn load(args: &GenerateArgs<'_>) -> Result<Loaded, String> {
    match args.source {
        Source::Preset(name) => {
            let p = presets::by_name(name)?;
            let graph = p
                .arch
                .forward_graph(&p.options)
                .map_err(|e| e.to_string())?;
            let weights =
                presets::random_weights(&graph, u64::from(args.seed)).map_err(|e| e.to_string())?;
            let context = args.context.unwrap_or(p.options.context);
            if context > p.options.context {
                return Err(format!(
                    "--context {context} is past preset {name}'s context of {}",
                    p.options.context
                ));
            }
            Ok(Loaded {
                name: p.name.to_string(),
                model_dir: None,
                arch: p.arch.clone(),
                options: p.options,
                graph,
                weights,
                context,
                tokenizer: Tokenizer::Bytes,
                eos: Vec::new(),
                describe: format!("random weights, seed {}", args.seed),
            })
        }
        Source::Model(dir) => {
            let opts = LoadOptions {
                context: args.context,
                dtype: args.dtype,
                ..LoadOptions::default()
            };
            let m = checkpoint::load(dir, &opts).map_err(|e| e.to_string())?;
            let vocab = m.config.arch.vocab_size();
            let tokenizer = match (Tokenizer::for_dir(dir, vocab), &args.prompt) {
                (Ok(t), _) => t,
                // Ids need no tokenizer; generated ids print as `<id>` past 255.
                (Err(_), Prompt::Ids(_)) => Tokenizer::Bytes,
                (Err(e), Prompt::Text(_)) => return Err(e.to_string()),
            };
            let eos = checkpoint::eos_token_ids(dir, &m.config);
            if let Some(first) = m.unused.first() {
                eprintln!(
                    "warning: {} tensors of {} are not used by the {} graph (e.g. `{first}`); \
                     check that config.json describes these weights",
                    m.unused.len(),
                    dir.display(),
                    tilefuse::model::config::model_type_of(&m.config.arch)
                );
            }
            let describe = format!(
                "{} weights, {} experts, {}",
                m.options.dtype,
                m.options.expert_dtype,
                tokenizer.describe()
            );
            Ok(Loaded {
                name: dir.display().to_string(),
                model_dir: Some(dir.to_path_buf()),
                arch: m.config.arch.clone(),
                context: m.options.context,
                options: m.options,
                graph: m.graph,
                weights: m.weights,
                tokenizer,
                eos,
                describe,
            })
        }
    }
}

/// Runs `tilefuse generate`.
pub fn run(args: GenerateArgs<'_>) -> Result<(), String> {
    if let Prompt::Text("") = args.prompt {
        return Err(
            "the prompt is empty; pass some text with --prompt (or token ids with --prompt-ids)"
                .into(),
        );
    }
    if let Prompt::Ids(ids) = &args.prompt {
        if ids.is_empty() {
            return Err("--prompt-ids is empty; pass at least one token id".into());
        }
    }
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        return Err(format!(
            "--temperature must be >= 0 (0 = greedy), found {}",
            args.temperature
        ));
    }
    let t_load = Instant::now();
    let Loaded {
        name,
        model_dir,
        graph,
        weights: tensors,
        context,
        options,
        tokenizer,
        eos,
        describe: weights,
        ..
    } = load(&args)?;
    let exe = Executable::new(graph, tensors, args.backend).map_err(|e| e.to_string())?;
    let load = t_load.elapsed();
    let chunk = options.max_tokens;
    let backend = exe.backend();
    let mut session = Session::new(exe, context, chunk).map_err(|e| e.to_string())?;
    let vocab = session.vocab();
    let ids = match &args.prompt {
        Prompt::Text(t) => tokenizer.encode(t).map_err(|e| e.to_string())?,
        Prompt::Ids(ids) => ids.clone(),
    };
    if ids.is_empty() {
        return Err("the prompt tokenizes to no tokens; pass a longer prompt".into());
    }
    if let Some(&bad) = ids
        .iter()
        .find(|&&i| usize::try_from(i).map_or(true, |i| i >= vocab))
    {
        return Err(format!(
            "prompt token id {bad} is outside the model's vocabulary of {vocab} (ids 0..{vocab})"
        ));
    }
    // Session::generate checks this too; here it comes before any output.
    let needed = ids.len() + args.max_tokens.saturating_sub(1);
    if needed > context {
        return Err(format!(
            "the prompt ({} tokens) plus {} new tokens need {needed} positions, past the context limit of {context}; \
             shorten the prompt, ask for fewer tokens{}",
            ids.len(),
            args.max_tokens,
            if model_dir.is_some() { " or pass a larger --context" } else { "" }
        ));
    }
    let sampling = if args.temperature == 0.0 {
        Sampling::Greedy
    } else {
        Sampling::Temperature {
            temperature: args.temperature,
            seed: args.seed,
        }
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut stream = StreamDecoder::new();
    if !args.json {
        eprintln!("{name} on {backend} ({weights}); loaded in {load:.1?}");
        let shown = match &args.prompt {
            Prompt::Text(t) => t.to_string(),
            Prompt::Ids(_) => tokenizer.decode(&ids),
        };
        let _ = out.write_all(shown.as_bytes());
        let _ = out.flush();
    }
    let json = args.json;
    let generated = session
        .generate(&ids, args.max_tokens, sampling, |tok| {
            if !json {
                let _ = out.write_all(stream.push(&tokenizer, tok).as_bytes());
                let _ = out.flush();
            }
            !eos.contains(&i64::from(tok))
        })
        .map_err(|e| e.to_string())?;
    let text = tokenizer.decode(&generated);
    let ttft = session.times.prefill;
    let decode: std::time::Duration = session.times.decode.iter().sum();
    let n_dec = session.times.decode.len();
    let tps = if decode.is_zero() {
        0.0
    } else {
        n_dec as f64 / decode.as_secs_f64()
    };
    if json {
        let list = |v: &[i32]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let (preset, model) = match &model_dir {
            Some(d) => ("null".to_string(), json_str(&d.display().to_string())),
            None => (json_str(&name), "null".to_string()),
        };
        println!(
            "{{\"preset\":{preset},\"model\":{model},\"backend\":\"{backend}\",\"prompt_ids\":[{}],\"generated_ids\":[{}],\"text\":{},\"time_to_first_token_s\":{:.6},\"decode_tokens\":{n_dec},\"decode_s\":{:.6},\"tokens_per_s\":{:.3},\"margins\":[{}]}}",
            list(&ids),
            list(&generated),
            json_str(&text),
            ttft.as_secs_f64(),
            decode.as_secs_f64(),
            tps,
            session
                .margins
                .iter()
                .map(|m| format!("{m:.5}"))
                .collect::<Vec<_>>()
                .join(",")
        );
    } else {
        let _ = out.write_all(stream.finish(&tokenizer).as_bytes());
        let _ = writeln!(out);
        eprintln!(
            "time to first token {:.1?} ({} prompt tokens), {n_dec} decode steps at {tps:.1} tokens/s",
            ttft,
            ids.len()
        );
    }
    Ok(())
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}
