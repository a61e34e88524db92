//! The `tilefuse` command line.

mod bench_cmd;
mod checkpoint_cmds;
mod eval_cmd;
mod generate_cmd;
mod serve;
mod shipped;
mod spec_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tilefuse::model::presets;
use tilefuse::runtime::{Backend, LaunchMode};

#[derive(Parser)]
#[command(
    name = "tilefuse",
    version,
    about = "Fused, memory-bound decoding for Mixture-of-Experts models"
)]
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
enum DtypeArg {
    /// bfloat16.
    Bf16,
    /// float32.
    F32,
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

impl From<ModeArg> for LaunchMode {
    fn from(m: ModeArg) -> LaunchMode {
        match m {
            ModeArg::Stream => LaunchMode::Stream,
            ModeArg::Graph => LaunchMode::Graph,
            ModeArg::Persistent => LaunchMode::Persistent,
        }
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum EmitArg {
    Ir,
    Plan,
    Cuda,
    Ptx,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    /// OCP MXFP4: blocks of 32, E8M0 scales.
    Mxfp4,
    /// NVFP4: blocks of 16, E4M3 scales, one f32 scale per tensor.
    Nvfp4,
}

/// Where and how a model runs: the options `generate` and `serve` share.
#[derive(clap::Args)]
struct RunArgs {
    /// Where to run.
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendArg,
    /// How GPU kernels are launched.
    #[arg(long, value_enum, default_value = "graph")]
    mode: ModeArg,
    /// Positions the KV caches hold [default: the preset's; for a checkpoint
    /// max_position_embeddings, at most 4096].
    #[arg(long)]
    context: Option<usize>,
    /// Activation and dense-weight dtype of a checkpoint [default: the
    /// checkpoint's]; the GPU kernels take bf16.
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
}

impl RunArgs {
    fn backend(&self) -> Backend {
        resolve_backend(self.backend, self.mode)
    }

    fn dtype(&self) -> Option<tilefuse::ir::DType> {
        self.dtype.map(|d| match d {
            DtypeArg::Bf16 => tilefuse::ir::DType::BF16,
            DtypeArg::F32 => tilefuse::ir::DType::F32,
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt with a checkpoint (`--model`) or a built-in
    /// model (`--preset`; the default preset when neither is given).
    Generate {
        /// A Hugging Face checkpoint directory (config.json + safetensors).
        #[arg(long, conflicts_with = "preset")]
        model: Option<std::path::PathBuf>,
        /// Built-in model with random weights (see `tilefuse presets`) [default: mimo-v2-tiny].
        #[arg(long)]
        preset: Option<String>,
        /// The prompt (tokenized by the checkpoint's tokenizer.json, else as bytes).
        #[arg(long, default_value = "def fibonacci(n):")]
        prompt: String,
        /// The prompt as comma-separated token ids instead of text.
        #[arg(long, conflicts_with = "prompt")]
        prompt_ids: Option<String>,
        /// Tokens to generate.
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// 0 for greedy decoding, else the sampling temperature.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Seed of the sampler and of the preset's random weights.
        #[arg(long, default_value_t = 0)]
        seed: u32,
        #[command(flatten)]
        run: RunArgs,
        /// Print one JSON object (prompt and generated ids, text, timings) instead of streaming text.
        #[arg(long)]
        json: bool,
        /// Speculative decoding with this DFlash draft: a draft checkpoint
        /// directory, or a built-in random draft (`mimo-v2-tiny-dflash`,
        /// `qwen3-moe-tiny-dflash`), reported beside plain decoding.
        #[arg(long)]
        draft: Option<String>,
        /// Draft block size B (one committed token plus B − 1 drafts) [default: the draft's].
        #[arg(long, requires = "draft")]
        block: Option<usize>,
    },
    /// Write a built-in model (random weights) as a checkpoint directory
    /// that transformers and `tilefuse generate --model` load.
    Init {
        /// Built-in model (see `tilefuse presets`).
        #[arg(long)]
        preset: String,
        /// The directory to create (must not exist).
        #[arg(long)]
        out: std::path::PathBuf,
        /// Seed of the random weights (as `generate --seed`).
        #[arg(long, default_value_t = 0)]
        seed: u32,
    },
    /// Write a copy of a checkpoint with its routed experts in FP4 (the rest as it was).
    Quantize {
        /// The checkpoint directory to read.
        #[arg(long)]
        model: std::path::PathBuf,
        /// The directory to create (must not exist); written atomically.
        #[arg(long)]
        out: std::path::PathBuf,
        /// The FP4 format of the experts.
        #[arg(long, value_enum)]
        format: FormatArg,
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
        /// The launch mode planned for: tile shapes may differ in the
        /// persistent kernel, which holds one CTA an SM.
        #[arg(long, value_enum, default_value = "graph")]
        mode: ModeArg,
        /// What to write (comma-separated).
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "ir,plan,cuda,ptx"
        )]
        emit: Vec<EmitArg>,
        /// Output folder (replaced whole).
        #[arg(long, default_value = "tilefuse-out")]
        out: std::path::PathBuf,
    },
    /// Evaluate a target and its DFlash drafter on held-out code: perplexity,
    /// τ per step and tokens/s of speculative against plain greedy decoding
    /// [default: the shipped pair `mimo-v2-code`].
    Eval {
        /// Target checkpoint directory, or the name of a shipped model.
        #[arg(long)]
        model: Option<std::path::PathBuf>,
        /// Draft checkpoint directory or built-in draft [default: the shipped pair's drafter].
        #[arg(long)]
        draft: Option<String>,
        /// Draft block size B.
        #[arg(long, default_value_t = 8)]
        block: usize,
        /// Held-out text [default: eval/heldout.txt beside the target].
        #[arg(long)]
        text: Option<std::path::PathBuf>,
        /// Prompts (cut at function definitions of the held-out text).
        #[arg(long, default_value_t = 16)]
        prompts: usize,
        /// Tokens generated per prompt.
        #[arg(long, default_value_t = 96)]
        max_tokens: usize,
        /// Held-out tokens scored for perplexity.
        #[arg(long, default_value_t = 16384)]
        ppl_tokens: usize,
        /// Where to run: `auto` picks the GPU when there is one.
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendArg,
        /// GPU launch mode.
        #[arg(long, value_enum, default_value = "graph")]
        mode: ModeArg,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Time forwards on the GPU as a fraction of the roofline (bandwidth measured in the same run).
    Bench {
        /// Built-in models (comma-separated).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "mimo-v2-flash-4l,qwen3-30b-a3b"
        )]
        preset: Vec<String>,
        /// Cached positions before the timed forwards (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1024,16384")]
        context: Vec<usize>,
        /// Tokens per forward: 1 is decoding, 8 and 16 verification blocks.
        #[arg(long, value_delimiter = ',', default_value = "1,8,16")]
        tokens: Vec<usize>,
        /// Launch modes (comma-separated).
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "stream,graph,persistent"
        )]
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
        /// Also trace one forward per mode and token count (at the first
        /// context) and draw its timeline (timeline-PRESET-MODE.svg and .txt
        /// for decode, timeline-PRESET-MODE-tT.* for T tokens, in the output
        /// folder).
        #[arg(long)]
        timeline: bool,
        /// Skip the draft and speculative-step rows.
        #[arg(long)]
        no_draft: bool,
    },
    /// Serve a model over HTTP with an OpenAI-compatible API (completions,
    /// chat completions, streaming, metrics), one request at a time
    /// [default: the shipped pair `mimo-v2-code` with its drafter].
    Serve {
        /// A checkpoint directory, or the name of a shipped pair.
        #[arg(long)]
        model: Option<std::path::PathBuf>,
        /// Speculative decoding with this DFlash draft: a draft checkpoint
        /// directory or a built-in random draft [default: the shipped pair's
        /// drafter when no --model is given, else none].
        #[arg(long)]
        draft: Option<String>,
        /// Draft block size B [default: the draft's; 8 for the shipped pair].
        #[arg(long)]
        block: Option<usize>,
        #[command(flatten)]
        run: RunArgs,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port to listen on (0: any free port; the address is printed).
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Requests that may wait while one decodes; past that, 429.
        #[arg(long, default_value_t = 32)]
        queue: usize,
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
        Command::Eval {
            model,
            draft,
            block,
            text,
            prompts,
            max_tokens,
            ppl_tokens,
            backend,
            mode,
            json,
        } => eval_cmd::run(eval_cmd::EvalArgs {
            model,
            draft,
            block,
            text,
            prompts,
            max_tokens,
            ppl_tokens,
            backend: resolve_backend(backend, mode),
            json,
        }),
        Command::Bench {
            preset,
            context,
            tokens,
            mode,
            reps,
            peer,
            out,
            timeline,
            no_draft,
        } => {
            let modes: Vec<LaunchMode> = mode.iter().map(|&m| m.into()).collect();
            bench_cmd::run(bench_cmd::BenchArgs {
                presets: &preset,
                contexts: &context,
                tokens: &tokens,
                modes: &modes,
                reps,
                out: &out,
                peer,
                timeline,
                drafts: !no_draft,
            })
        }
        Command::Compile {
            preset,
            layer,
            tokens,
            mode,
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
            let table = tilefuse::runtime::inspect::compile_artifacts(
                &g,
                tokens.max(1),
                mode.into(),
                e,
                &out,
            )?;
            print!("{table}");
            eprintln!("wrote {}", out.display());
            Ok(())
        }
        Command::Generate {
            model,
            preset,
            prompt,
            prompt_ids,
            max_tokens,
            temperature,
            seed,
            run,
            json,
            draft,
            block,
        } => {
            // No model: the shipped pair with its drafter (speculative,
            // block 8), or the default preset where the pair is absent.
            let pair = (model.is_none() && preset.is_none())
                .then(|| shipped::pair_dir(shipped::DEFAULT_PAIR))
                .flatten();
            let model = match (&model, &pair) {
                (Some(m), _) => Some(shipped::resolve_model(m)),
                (None, Some(p)) => Some(p.join("target")),
                (None, None) => None,
            };
            let (draft, block) = match (&draft, &pair) {
                (None, Some(p)) => (
                    Some(p.join("drafter").display().to_string()),
                    block.or(Some(shipped::DEFAULT_BLOCK)),
                ),
                _ => (draft, block),
            };
            let source = match (&model, &preset) {
                (Some(dir), _) => generate_cmd::Source::Model(dir),
                (None, Some(name)) => generate_cmd::Source::Preset(name),
                (None, None) => generate_cmd::Source::Preset(presets::DEFAULT),
            };
            let prompt = match &prompt_ids {
                Some(ids) => generate_cmd::Prompt::Ids(generate_cmd::parse_ids(ids)?),
                None => generate_cmd::Prompt::Text(&prompt),
            };
            let args = generate_cmd::GenerateArgs {
                source,
                prompt,
                max_tokens,
                temperature,
                seed,
                backend: run.backend(),
                context: run.context,
                dtype: run.dtype(),
                json,
            };
            match &draft {
                Some(draft) => spec_cmd::run(args, draft, block),
                None => generate_cmd::run(args),
            }
        }
        Command::Serve {
            model,
            draft,
            block,
            run,
            host,
            port,
            queue,
        } => serve::run(serve::ServeArgs {
            model,
            draft,
            block,
            backend: run.backend(),
            context: run.context,
            dtype: run.dtype(),
            host,
            port,
            queue,
        }),
        Command::Init { preset, out, seed } => {
            checkpoint_cmds::init(&preset, &out, u64::from(seed))
        }
        Command::Quantize { model, out, format } => {
            let format = match format {
                FormatArg::Mxfp4 => tilefuse::ir::fp4::Fp4Format::Mx,
                FormatArg::Nvfp4 => tilefuse::ir::fp4::Fp4Format::Nv,
            };
            checkpoint_cmds::quantize(&model, &out, format)
        }
    }
}

/// The backend a `--backend` choice means on this machine.
fn resolve_backend(backend: BackendArg, mode: ModeArg) -> Backend {
    let mode = LaunchMode::from(mode);
    let has_gpu = tilefuse::runtime::gpu::Gpu::available;
    match backend {
        BackendArg::Cpu => Backend::Cpu,
        BackendArg::Cuda => Backend::Cuda(mode),
        BackendArg::Auto if has_gpu() => Backend::Cuda(mode),
        BackendArg::Auto => Backend::Cpu,
    }
}
