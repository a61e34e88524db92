//! `tilefuse generate --draft DIR|PRESET [--block N]`: DFlash speculative
//! decoding of the target (a preset or a checkpoint) with a draft (a
//! checkpoint directory or a built-in random draft), then plain decoding of
//! the same prompt for comparison (τ, draft and verify time per step,
//! tokens/s of both, and for greedy whether the outputs agree). Runs on the
//! GPU or the CPU like plain generation.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use tilefuse::model::dflash;
use tilefuse::model::tokenizer::StreamDecoder;
use tilefuse::runtime::speculative::{DFlashDrafter, SamplingRule, SpecDecoder, SpecOptions};
use tilefuse::runtime::{Backend, Executable, Sampling, Session};

use crate::generate_cmd::{json_str, load, GenerateArgs, Loaded, Prompt};

/// Runs speculative generation, then plain generation, and reports both.
pub fn run(args: GenerateArgs<'_>, draft: &str, block: Option<usize>) -> Result<(), String> {
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        return Err(format!(
            "--temperature must be >= 0 (0 = greedy), found {}",
            args.temperature
        ));
    }
    let t_load = Instant::now();
    let m = load(&args)?;
    let err = |e: tilefuse::ir::IrError| e.to_string();
    let tokenizer = &m.tokenizer;
    let ids = match &args.prompt {
        Prompt::Text(t) => tokenizer.encode(t).map_err(|e| e.to_string())?,
        Prompt::Ids(ids) => ids.clone(),
    };
    if ids.is_empty() {
        return Err(
            "the prompt is empty; pass some text with --prompt (or ids with --prompt-ids)".into(),
        );
    }
    let vocab = m.arch.vocab_size();
    if let Some(&bad) = ids
        .iter()
        .find(|&&i| usize::try_from(i).map_or(true, |i| i >= vocab))
    {
        return Err(format!(
            "prompt token id {bad} is outside the model's vocabulary of {vocab} (ids 0..{vocab})"
        ));
    }
    let (mut spec, dname) = build(&m, draft, block, args.backend, u64::from(args.seed))?;
    let block = spec.options().block;
    let max_rows = m.options.max_tokens;
    let plain_exe =
        Executable::new(m.graph.clone(), m.weights.clone(), args.backend).map_err(err)?;
    let load_time = t_load.elapsed();

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
            "{} + draft {dname} (B = {block}) on {} ({}); loaded in {load_time:.1?}",
            m.name,
            spec.backend(),
            m.describe
        );
        let shown = match &args.prompt {
            Prompt::Text(t) => t.to_string(),
            Prompt::Ids(_) => tokenizer.decode(&ids),
        };
        let _ = out.write_all(shown.as_bytes());
        let _ = out.flush();
    }
    let json = args.json;
    let eos = &m.eos;
    let generated = spec
        .generate(&ids, args.max_tokens, sampling, |tok| {
            if !json {
                let _ = out.write_all(stream.push(tokenizer, tok).as_bytes());
                let _ = out.flush();
            }
            !eos.contains(&i64::from(tok))
        })
        .map_err(err)?;
    if !json {
        let _ = out.write_all(stream.finish(tokenizer).as_bytes());
        let _ = writeln!(out);
    }

    // Plain decoding of the same prompt on the same weights, for comparison.
    let mut session = Session::new(plain_exe, m.context, max_rows).map_err(err)?;
    let plain = session
        .generate(&ids, args.max_tokens, sampling, |tok| {
            !eos.contains(&i64::from(tok))
        })
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
            "{{\"model\":{},\"draft\":{},\"block\":{block},\"backend\":\"{}\",\"prompt_ids\":[{}],\"generated_ids\":[{}],\"text\":{},\"steps\":{},\"tau\":{:.4},\"accepted_histogram\":[{hist}],\"draft_ms_per_step\":{:.4},\"verify_ms_per_step\":{:.4},\"steps_on_gpu\":{},\"prefill_s\":{:.6},\"decode_s\":{:.6},\"tokens_per_s\":{spec_tps:.3},\"plain_generated_ids\":[{}],\"plain_tokens_per_s\":{plain_tps:.3},\"same_as_plain\":{}}}",
            json_str(&m.name),
            json_str(&dname),
            spec.backend(),
            list(&ids),
            list(&generated),
            json_str(&tokenizer.decode(&generated)),
            st.steps.len(),
            st.tau(),
            ms(st.draft_per_step()),
            ms(st.verify_per_step()),
            st.on_device,
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
            "speculative: {} steps, τ = {:.2} tokens/step, draft {:.2} ms + verify {:.2} ms per step{}, \
             {spec_tps:.1} tokens/s after prefill ({:.1?})",
            st.steps.len(),
            st.tau(),
            ms(st.draft_per_step()),
            ms(st.verify_per_step()),
            if st.on_device {
                " (GPU time; steps without host round trips)"
            } else {
                ""
            },
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

/// The speculative decoder of loaded target `m` with `draft` (a draft
/// checkpoint directory or a built-in draft preset with random weights of
/// `seed`), blocks of `block` (default: the draft's), on `backend`; and the
/// draft's name for reports.
pub fn build(
    m: &Loaded,
    draft: &str,
    block: Option<usize>,
    backend: Backend,
    seed: u64,
) -> Result<(SpecDecoder<DFlashDrafter>, String), String> {
    let err = |e: tilefuse::ir::IrError| e.to_string();
    let (dcfg, dgraph, dweights, dname) = if Path::new(draft).is_dir() {
        let d = dflash::load_draft(Path::new(draft), &m.arch, &m.options, &m.weights)?;
        (d.config, d.graph, d.weights, draft.to_string())
    } else {
        let dp = dflash::draft_preset(draft)
            .map_err(|e| format!("--draft {draft}: not a directory, and {e}"))?;
        dp.config
            .check_target(&m.arch)
            .map_err(|e| format!("--draft {} does not fit {}: {e}", dp.name, m.name))?;
        let g = dflash::draft_graph(&dp.config, &dflash::draft_options(&m.options)).map_err(err)?;
        let w = dflash::random_draft_weights(&g, &m.weights, seed).map_err(err)?;
        (dp.config, g, w, dp.name.to_string())
    };
    let max_rows = m.options.max_tokens;
    let block = block.unwrap_or(dcfg.block_size);
    if block < 2 || block > max_rows {
        return Err(format!(
            "--block {block} is outside 2..={max_rows}: the block is one committed token plus \
             drafts, and {} verifies at most {max_rows} tokens per forward",
            m.name
        ));
    }
    let target = dflash::target_graph(&m.arch, &m.options, &dcfg.target_layer_ids).map_err(err)?;
    let target = Executable::new(target, m.weights.clone(), backend).map_err(err)?;
    // On the target's GPU stream: the draft reads the target's features and
    // the target the drafts in place.
    let drafter = DFlashDrafter::new(
        Executable::new_beside(dgraph, dweights, &target).map_err(err)?,
        dcfg.mask_id(),
        dflash::draft_options(&m.options).max_tokens,
    )
    .map_err(err)?;
    let opts = SpecOptions {
        block,
        context: m.context,
        max_tokens: max_rows,
        rule: SamplingRule::Rejection,
        trace_logits: false,
        argmax_outputs: true,
    };
    let spec = SpecDecoder::new(target, drafter, opts).map_err(err)?;
    Ok((spec, dname))
}
