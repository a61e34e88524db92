//! The `tilefuse` command line.

mod bench_cmd;

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use tilefuse::model::presets;
use tilefuse::runtime::{Backend, Executable, LaunchMode, Sampling, Session};

#[derive(Parser)]
#[command(name = "tilefuse", version, about = "Fused, memory-bound decoding for Mixture-of-Experts models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendArg {
    /// The GPU when one is present, else the CPU.
    Auto,
    /// Generated kernels on the GPU.
    Cuda,
    /// The reference interpreter.
    Cpu,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    /// One launch per kernel.
    Stream,
    /// CUDA graphs replayed per bucket of T.
    Graph,
    /// One persistent kernel per forward.
    Persistent,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum EmitArg {
    Ir,
    Plan,
    Cuda,
    Ptx,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (a built-in model when none is given).
    Generate {
        /// Built-in model (see `tilefuse presets`).
        #[arg(long, default_value = presets::DEFAULT)]
        preset: String,
        /// The prompt (byte-level tokens for built-in models).
        #[arg(long, default_value = "def fibonacci(n):")]
        prompt: String,
        /// Tokens to generate.
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// 0 for greedy decoding, else the sampling temperature.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Seed of the sampler and of the preset's random weights.
        #[arg(long, default_value_t = 0)]
        seed: u32,
        /// Where to run.
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendArg,
        /// How GPU kernels are launched.
        #[arg(long, value_enum, default_value = "graph")]
        mode: ModeArg,
        /// Print one JSON object (prompt and generated ids, text, timings) instead of streaming text.
        #[arg(long)]
        json: bool,
    },
    /// Print a built-in model's IR: the whole forward, or one decoder layer.
    Graph {
        /// Built-in model.
        #[arg(long, default_value = presets::DEFAULT)]
        preset: String,
        /// Only this decoder layer.
        #[arg(long)]
        layer: Option<usize>,
    },
    /// Fuse, plan and lower a model; write the IR after each pass, the plan,
    /// the CUDA source, the PTX and a summary table.
    Compile {
        /// Built-in model.
        #[arg(long, default_value = presets::DEFAULT)]
        preset: String,
        /// Only this decoder layer.
        #[arg(long)]
        layer: Option<usize>,
        /// The bucket: the most tokens per forward.
        #[arg(long, default_value_t = 1)]
        tokens: usize,
        /// What to write (comma-separated).
        #[arg(long, value_enum, value_delimiter = ',', default_value = "ir,plan,cuda,ptx")]
        emit: Vec<EmitArg>,
        /// Output folder (replaced whole).
        #[arg(long, default_value = "tilefuse-out")]
        out: std::path::PathBuf,
    },
    /// Time forwards on the GPU as a fraction of the roofline (bandwidth measured in the same run).
    Bench {
        /// Built-in models (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "mimo-v2-flash-4l,qwen3-30b-a3b")]
        preset: Vec<String>,
        /// Cached positions before the timed forwards (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1024,16384")]
        context: Vec<usize>,
        /// Tokens per forward: 1 is decoding, 8 and 16 verification blocks.
        #[arg(long, value_delimiter = ',', default_value = "1,8,16")]
        tokens: Vec<usize>,
        /// Launch modes (comma-separated).
        #[arg(long, value_enum, value_delimiter = ',', default_value = "stream,graph,persistent")]
        mode: Vec<ModeArg>,
        /// Timed forwards per measurement (the median is reported).
        #[arg(long, default_value_t = 30)]
        reps: usize,
        /// Also run the transformers peer (tools/bench_peer.py) on the same GPU.
        #[arg(long)]
        peer: bool,
        /// Output folder for bench.json, bench.svg, bench.txt.
        #[arg(long, default_value = "bench-out")]
        out: std::path::PathBuf,
    },
    /// List the built-in models.
    Presets,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Presets => {
            for p in presets::all() {
                println!("{:<22} {}", p.name, p.about);
            }
            Ok(())
        }
        Command::Graph { preset, layer } => {
            let p = presets::by_name(&preset)?;
            let g = match layer {
                Some(i) => p.arch.layer_graph(&p.options, i),
                None => p.arch.forward_graph(&p.options),
            }
            .map_err(|e| e.to_string())?;
            print!("{g}");
            Ok(())
        }
        Command::Bench {
            preset,
            context,
            tokens,
            mode,
            reps,
            peer,
            out,
        } => {
            let modes: Vec<LaunchMode> = mode
                .iter()
                .map(|m| match m {
                    ModeArg::Stream => LaunchMode::Stream,
                    ModeArg::Graph => LaunchMode::Graph,
                    ModeArg::Persistent => LaunchMode::Persistent,
                })
                .collect();
            bench_cmd::run(bench_cmd::BenchArgs {
                presets: &preset,
                contexts: &context,
                tokens: &tokens,
                modes: &modes,
                reps,
                out: &out,
                peer,
            })
        }
        Command::Compile {
            preset,
            layer,
            tokens,
            emit,
            out,
        } => {
            let p = presets::by_name(&preset)?;
            let g = match layer {
                Some(i) => p.arch.layer_graph(&p.options, i),
                None => p.arch.forward_graph(&p.options),
            }
            .map_err(|e| e.to_string())?;
            let e = tilefuse::runtime::inspect::Emit {
                ir: emit.contains(&EmitArg::Ir),
                plan: emit.contains(&EmitArg::Plan),
                cuda: emit.contains(&EmitArg::Cuda),
                ptx: emit.contains(&EmitArg::Ptx),
            };
            let table = tilefuse::runtime::inspect::compile_artifacts(&g, tokens.max(1), e, &out)?;
            print!("{table}");
            eprintln!("wrote {}", out.display());
            Ok(())
        }
        Command::Generate {
            preset,
            prompt,
            max_tokens,
            temperature,
            seed,
            backend,
            mode,
            json,
        } => generate(&preset, &prompt, max_tokens, temperature, seed, backend, mode, json),
    }
}

/// Writes the complete UTF-8 prefix of `pending` and keeps an incomplete tail.
fn flush_utf8(pending: &mut Vec<u8>, out: &mut impl Write) {
    let valid = match std::str::from_utf8(pending) {
        Ok(s) => s.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => pending.len(),
    };
    let _ = out.write_all(String::from_utf8_lossy(&pending[..valid]).as_bytes());
    let _ = out.flush();
    pending.drain(..valid);
}

#[allow(clippy::too_many_arguments)]
fn generate(
    preset: &str,
    prompt: &str,
    max_tokens: usize,
    temperature: f32,
    seed: u32,
    backend: BackendArg,
    mode: ModeArg,
    json: bool,
) -> Result<(), String> {
    if prompt.is_empty() {
        return Err("the prompt is empty; pass some text with --prompt".into());
    }
    if !(temperature >= 0.0 && temperature.is_finite()) {
        return Err(format!("--temperature must be >= 0 (0 = greedy), found {temperature}"));
    }
    let p = presets::by_name(preset)?;
    let mode = match mode {
        ModeArg::Stream => LaunchMode::Stream,
        ModeArg::Graph => LaunchMode::Graph,
        ModeArg::Persistent => LaunchMode::Persistent,
    };
    let has_gpu = || matches!(tilefuse::runtime::gpu::Gpu::open(), Ok(Some(_)));
    let backend = match backend {
        BackendArg::Cpu => Backend::Cpu,
        BackendArg::Cuda => Backend::Cuda(mode),
        BackendArg::Auto if has_gpu() => Backend::Cuda(mode),
        BackendArg::Auto => Backend::Cpu,
    };
    let t_load = Instant::now();
    let graph = p.arch.forward_graph(&p.options).map_err(|e| e.to_string())?;
    let weights = presets::random_weights(&graph, u64::from(seed)).map_err(|e| e.to_string())?;
    let exe = Executable::new(graph, weights, backend).map_err(|e| e.to_string())?;
    let load = t_load.elapsed();
    let mut session = Session::new(exe, p.options.context, p.options.max_tokens).map_err(|e| e.to_string())?;
    let vocab = session.vocab();
    // Built-in models read bytes: token id = byte value.
    let ids: Vec<i32> = prompt.bytes().map(i32::from).collect();
    if vocab < 256 {
        return Err(format!("preset {preset} has a vocabulary of {vocab}, too small for byte tokens"));
    }
    let sampling = if temperature == 0.0 {
        Sampling::Greedy
    } else {
        Sampling::Temperature { temperature, seed }
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut pending = Vec::new();
    if !json {
        eprintln!("{} on {backend} (random weights, seed {seed}); loaded in {:.1?}", p.name, load);
        let _ = out.write_all(prompt.as_bytes());
    }
    let generated = session
        .generate(&ids, max_tokens, sampling, |tok| {
            if !json {
                match u8::try_from(tok) {
                    Ok(b) => pending.push(b),
                    Err(_) => pending.extend(format!("<{tok}>").bytes()),
                }
                flush_utf8(&mut pending, &mut out);
            }
            true
        })
        .map_err(|e| e.to_string())?;
    let bytes: Vec<u8> = generated
        .iter()
        .flat_map(|&t| u8::try_from(t).map(|b| vec![b]).unwrap_or_else(|_| format!("<{t}>").into_bytes()))
        .collect();
    let text = String::from_utf8_lossy(&bytes).to_string();
    let ttft = session.times.prefill;
    let decode: std::time::Duration = session.times.decode.iter().sum();
    let n_dec = session.times.decode.len();
    let tps = if decode.is_zero() { 0.0 } else { n_dec as f64 / decode.as_secs_f64() };
    if json {
        let list = |v: &[i32]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
        println!(
            "{{\"preset\":{},\"backend\":\"{backend}\",\"prompt_ids\":[{}],\"generated_ids\":[{}],\"text\":{},\"time_to_first_token_s\":{:.6},\"decode_tokens\":{n_dec},\"decode_s\":{:.6},\"tokens_per_s\":{:.3}}}",
            json_str(p.name),
            list(&ids),
            list(&generated),
            json_str(&text),
            ttft.as_secs_f64(),
            decode.as_secs_f64(),
            tps
        );
    } else {
        flush_utf8(&mut pending, &mut out);
        let _ = writeln!(out);
        eprintln!(
            "time to first token {:.1?} ({} prompt tokens), {n_dec} decode steps at {tps:.1} tokens/s",
            ttft,
            ids.len()
        );
    }
    Ok(())
}

fn json_str(s: &str) -> String {
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
