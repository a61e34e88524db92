//! `tilefuse generate --draft PRESET [--block N]`: DFlash speculative
//! decoding of a built-in target with a built-in random draft, then plain
//! decoding of the same prompt for comparison (τ, draft and verify time per
//! step, tokens/s of both, and for greedy whether the outputs agree).
//!
//! CPU only for now: the draft graph's GPU kernels are not written yet.

use std::io::Write;
use std::time::Instant;

use tilefuse::model::dflash;
use tilefuse::model::presets;
use tilefuse::model::tokenizer::{StreamDecoder, Tokenizer};
use tilefuse::runtime::speculative::{DFlashDrafter, SamplingRule, SpecDecoder, SpecOptions};
use tilefuse::runtime::{Backend, Executable, Sampling, Session};

use crate::generate_cmd::{json_str, Prompt};

/// Everything the speculative path needs.
pub struct SpecArgs<'a> {
    /// Target preset.
    pub preset: &'a str,
    /// Draft preset.
    pub draft: &'a str,
    /// Block size (default: the draft's).
    pub block: Option<usize>,
    /// The prompt.
    pub prompt: Prompt<'a>,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// 0 for greedy.
    pub temperature: f32,
    /// Sampler seed and the seed of both models' random weights.
    pub seed: u32,
    /// Where to run (the CPU only, for now).
    pub backend: Backend,
    /// One JSON object instead of streamed text.
    pub json: bool,
}

/// Runs speculative generation, then plain generation, and reports both.
pub fn run(args: SpecArgs<'_>) -> Result<(), String> {
    if let Backend::Cuda(_) = args.backend {
        return Err(
            "--draft runs on the CPU for now (the draft graph's GPU kernels are not \
                    written yet); pass --backend cpu"
                .into(),
        );
    }
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        return Err(format!(
            "--temperature must be >= 0 (0 = greedy), found {}",
            args.temperature
        ));
    }
    let p = presets::by_name(args.preset)?;
    let dp = dflash::draft_preset(args.draft)?;
    dp.config
        .check_target(&p.arch)
        .map_err(|e| format!("--draft {} does not fit --preset {}: {e}", dp.name, p.name))?;
    let block = args.block.unwrap_or(dp.config.block_size);
    if block < 2 || block > p.options.max_tokens {
        return Err(format!(
            "--block {block} is outside 2..={}: the block is one committed token plus drafts, \
             and preset {} verifies at most {} tokens per forward",
            p.options.max_tokens, p.name, p.options.max_tokens
        ));
    }
    let tokenizer = Tokenizer::Bytes;
    let ids = match &args.prompt {
        Prompt::Text(t) => tokenizer.encode(t).map_err(|e| e.to_string())?,
        Prompt::Ids(ids) => ids.clone(),
    };
    if ids.is_empty() {
        return Err(
            "the prompt is empty; pass some text with --prompt (or ids with --prompt-ids)".into(),
        );
    }
    let vocab = p.arch.vocab_size();
    if let Some(&bad) = ids
        .iter()
        .find(|&&i| usize::try_from(i).map_or(true, |i| i >= vocab))
    {
        return Err(format!(
            "prompt token id {bad} is outside the model's vocabulary of {vocab} (ids 0..{vocab})"
        ));
    }

    let t_load = Instant::now();
    let seed = u64::from(args.seed);
    let err = |e: tilefuse::ir::IrError| e.to_string();
    let target =
        dflash::target_graph(&p.arch, &p.options, &dp.config.target_layer_ids).map_err(err)?;
    let tw = presets::random_weights(&target, seed).map_err(err)?;
    let draft = dflash::draft_graph(&dp.config, &p.options).map_err(err)?;
    let dw = dflash::random_draft_weights(&draft, &tw, seed).map_err(err)?;
    let plain_graph = p.arch.forward_graph(&p.options).map_err(err)?;
    let plain_exe = Executable::new(plain_graph, tw.clone(), args.backend).map_err(err)?;
    let drafter = DFlashDrafter::new(
        Executable::new(draft, dw, args.backend).map_err(err)?,
        dp.config.mask_id(),
        p.options.max_tokens,
    )
    .map_err(err)?;
    let opts = SpecOptions {
        block,
        context: p.options.context,
        max_tokens: p.options.max_tokens,
        rule: SamplingRule::Rejection,
        trace_logits: false,
    };
    let mut spec = SpecDecoder::new(
        Executable::new(target, tw, args.backend).map_err(err)?,
        drafter,
        opts,
    )
    .map_err(err)?;
    let load = t_load.elapsed();

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
        eprintln!(
            "{} + draft {} (B = {block}) on {} (random weights, seed {}); loaded in {load:.1?}",
            p.name, dp.name, args.backend, args.seed
        );
        let _ = out.write_all(tokenizer.decode(&ids).as_bytes());
        let _ = out.flush();
    }
    let json = args.json;
    let generated = spec
        .generate(&ids, args.max_tokens, sampling, |tok| {
            if !json {
                let _ = out.write_all(stream.push(&tokenizer, tok).as_bytes());
                let _ = out.flush();
            }
            true
        })
        .map_err(err)?;
    if !json {
        let _ = out.write_all(stream.finish(&tokenizer).as_bytes());
        let _ = writeln!(out);
    }

    // Plain decoding of the same prompt on the same weights, for comparison.
    let mut session =
        Session::new(plain_exe, p.options.context, p.options.max_tokens).map_err(err)?;
    let plain = session
        .generate(&ids, args.max_tokens, sampling, |_| true)
        .map_err(err)?;
    let plain_decode: std::time::Duration = session.times.decode.iter().sum();
    let plain_tps = if plain_decode.is_zero() {
        0.0
    } else {
        session.times.decode.len() as f64 / plain_decode.as_secs_f64()
    };

    let st = &spec.stats;
    let spec_tps = st.decode_tokens_per_s();
    let same = match sampling {
        Sampling::Greedy if generated == plain => "yes",
        Sampling::Greedy => "NO",
        Sampling::Temperature { .. } => "n/a (sampling: same distribution, different draws)",
    };
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    if json {
        let list = |v: &[i32]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let hist = (0..block)
            .map(|a| {
                st.steps
                    .iter()
                    .filter(|s| s.accepted == a)
                    .count()
                    .to_string()
            })
            .collect::<Vec<_>>()
            .join(",");
        println!(
            "{{\"preset\":{},\"draft\":{},\"block\":{block},\"backend\":\"{}\",\"prompt_ids\":[{}],\"generated_ids\":[{}],\"text\":{},\"steps\":{},\"tau\":{:.4},\"accepted_histogram\":[{hist}],\"draft_ms_per_step\":{:.4},\"verify_ms_per_step\":{:.4},\"prefill_s\":{:.6},\"decode_s\":{:.6},\"tokens_per_s\":{spec_tps:.3},\"plain_generated_ids\":[{}],\"plain_tokens_per_s\":{plain_tps:.3},\"same_as_plain\":{}}}",
            json_str(p.name),
            json_str(dp.name),
            args.backend,
            list(&ids),
            list(&generated),
            json_str(&tokenizer.decode(&generated)),
            st.steps.len(),
            st.tau(),
            ms(st.draft_per_step()),
            ms(st.verify_per_step()),
            st.prefill.as_secs_f64(),
            st.decode.as_secs_f64(),
            list(&plain),
            match sampling {
                Sampling::Greedy => (generated == plain).to_string(),
                Sampling::Temperature { .. } => "null".to_string(),
            },
        );
    } else {
        eprintln!(
            "speculative: {} steps, τ = {:.2} tokens/step, draft {:.2} ms + verify {:.2} ms per step, \
             {spec_tps:.1} tokens/s after prefill ({:.1?})",
            st.steps.len(),
            st.tau(),
            ms(st.draft_per_step()),
            ms(st.verify_per_step()),
            st.prefill
        );
        eprintln!(
            "plain:       {} decode steps at {plain_tps:.1} tokens/s; speedup {:.2}x; same output as plain decoding: {same}",
            session.times.decode.len(),
            if plain_tps > 0.0 { spec_tps / plain_tps } else { 0.0 }
        );
    }
    Ok(())
}
