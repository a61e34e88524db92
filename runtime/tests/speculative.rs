//! DFlash speculative decoding on the CPU: exactly lossless.
//!
//! - The target graph with context features keeps the plain forward's logits
//!   bit for bit; the draft's cached context equals a one-shot recompute, its
//!   block attention is bidirectional and its sliding window hides old context.
//! - Greedy: speculative output equals plain greedy output token for token
//!   (many prompts and lengths, B = 4, 8, 16, both architectures, random
//!   DFlash drafts).
//! - A replay drafter proposes the target's own greedy tokens with a mistake
//!   at a chosen block position, so every acceptance length 0..B−1 runs and
//!   τ is known; the target logits behind every committed token equal plain
//!   decoding's bit for bit, across the sliding window's ring edge. An
//!   undersized ring is caught by the same comparison.
//! - Sampling: chi-square goodness of fit of the first four tokens against the
//!   target's exact distribution on a 4-token vocabulary (see
//!   `sampling_keeps_the_target_distribution`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use std::collections::BTreeMap;

use tilefuse_ir::interp::{argmax_row, Tensor};
use tilefuse_ir::{Bindings, DType, Graph};
use tilefuse_model::dflash::{self, DraftConfig, DraftLayerType, MaskToken};
use tilefuse_model::presets::{self, Arch, Preset};
use tilefuse_model::{qwen3_moe, GraphOptions};
use tilefuse_runtime::speculative::{
    self, DFlashDrafter, DraftStep, Drafter, SamplingRule, SpecDecoder, SpecOptions,
};
use tilefuse_runtime::{Backend, Executable, Sampling, Session};

type Weights = BTreeMap<String, Tensor>;

/// A target preset with its feature graph and weights, and a draft for it.
struct Fixture {
    preset: Preset,
    draft: DraftConfig,
    target: Graph,
    tw: Weights,
    dgraph: Graph,
    dw: Weights,
}

impl Fixture {
    fn new(target: &str, draft: &str) -> Fixture {
        let p = presets::by_name(target).unwrap();
        Fixture::custom(p, dflash::draft_preset(draft).unwrap().config)
    }

    fn custom(preset: Preset, draft: DraftConfig) -> Fixture {
        draft.check_target(&preset.arch).unwrap();
        let target =
            dflash::target_graph(&preset.arch, &preset.options, &draft.target_layer_ids).unwrap();
        let tw = presets::random_weights(&target, 7).unwrap();
        let dgraph = dflash::draft_graph(&draft, &dflash::draft_options(&preset.options)).unwrap();
        let dw = dflash::random_draft_weights(&dgraph, &tw, 11).unwrap();
        Fixture {
            preset,
            draft,
            target,
            tw,
            dgraph,
            dw,
        }
    }

    fn drafter(&self) -> DFlashDrafter {
        let exe = Executable::new(self.dgraph.clone(), self.dw.clone(), Backend::Cpu).unwrap();
        let rows = dflash::draft_options(&self.preset.options).max_tokens;
        DFlashDrafter::new(exe, self.draft.mask_id(), rows).unwrap()
    }

    fn options(&self, block: usize, rule: SamplingRule) -> SpecOptions {
        SpecOptions {
            block,
            context: self.preset.options.context,
            max_tokens: self.preset.options.max_tokens,
            rule,
            trace_logits: true,
            argmax_outputs: false,
        }
    }

    fn engine<D: Drafter>(&self, d: D, block: usize, rule: SamplingRule) -> SpecDecoder<D> {
        let exe = Executable::new(self.target.clone(), self.tw.clone(), Backend::Cpu).unwrap();
        SpecDecoder::new(exe, d, self.options(block, rule)).unwrap()
    }

    /// Plain decoding through the architecture's own forward graph (not the
    /// feature graph): a session over the same weights.
    fn session(&self) -> Session {
        let g = self
            .preset
            .arch
            .forward_graph(&self.preset.options)
            .unwrap();
        let exe = Executable::new(g, self.tw.clone(), Backend::Cpu).unwrap();
        Session::new(
            exe,
            self.preset.options.context,
            self.preset.options.max_tokens,
        )
        .unwrap()
    }

    /// Plain greedy decoding: the tokens and the logits row each was chosen from.
    fn plain_greedy(&self, prompt: &[i32], n: usize) -> (Vec<i32>, Vec<Vec<f32>>) {
        let mut s = self.session();
        let mut logits = s.feed(prompt).unwrap();
        let (mut toks, mut rows) = (Vec::new(), Vec::new());
        while toks.len() < n {
            let t = argmax_row(&logits).unwrap() as i32;
            toks.push(t);
            rows.push(logits.clone());
            if toks.len() < n {
                logits = s.feed(&[t]).unwrap();
            }
        }
        (toks, rows)
    }
}

fn bits(rows: &[Vec<f32>]) -> Vec<Vec<u32>> {
    rows.iter()
        .map(|r| r.iter().map(|x| x.to_bits()).collect())
        .collect()
}

fn prompt(len: usize, salt: i32) -> Vec<i32> {
    (0..len as i32)
        .map(|i| (i * 37 + 11 + salt * 101) % 256)
        .collect()
}

#[test]
fn interface_names_agree() {
    assert_eq!(speculative::CONTEXT_OUTPUT, dflash::CONTEXT_OUTPUT);
    assert_eq!(speculative::GREEDY_OUTPUT, dflash::GREEDY_OUTPUT);
    assert_eq!(speculative::CONTEXT_POS_INPUT, dflash::CONTEXT_POS_INPUT);
}

#[test]
fn target_graph_keeps_the_logits_and_outputs_the_chosen_layers() {
    for (t, d) in [
        ("mimo-v2-tiny", "mimo-v2-tiny-dflash"),
        ("qwen3-moe-tiny", "qwen3-moe-tiny-dflash"),
    ] {
        let f = Fixture::new(t, d);
        let ids = prompt(10, 0);
        let run = |g: &Graph| {
            let mut e = Executable::new(g.clone(), f.tw.clone(), Backend::Cpu).unwrap();
            let mut inputs = BTreeMap::new();
            inputs.insert("ids".to_string(), Tensor::i32(&[10], ids.clone()).unwrap());
            inputs.insert(
                "pos".to_string(),
                Tensor::i32(&[10], (0..10).collect()).unwrap(),
            );
            e.run(&Bindings::new().with("S", 0).with("T", 10), inputs)
                .unwrap()
        };
        let plain = run(&f.preset.arch.forward_graph(&f.preset.options).unwrap());
        let feat = run(&f.target);
        assert_eq!(plain["logits"], feat["logits"], "{t}: logits changed");
        let h = f.draft.hidden_size;
        let k = f.draft.target_layer_ids.len();
        let ctx = &feat[dflash::CONTEXT_OUTPUT];
        assert_eq!(ctx.shape, vec![10, k * h]);
        let (c, hidden) = (ctx.to_f32(), plain["hidden"].to_f32());
        // Each chosen layer on its own gives the matching column block; the
        // last target layer's block is the forward's `hidden` output.
        for (slot, &id) in f.draft.target_layer_ids.iter().enumerate() {
            let one = dflash::target_graph(&f.preset.arch, &f.preset.options, &[id]).unwrap();
            let one = run(&one)[dflash::CONTEXT_OUTPUT].to_f32();
            for r in 0..10 {
                assert_eq!(
                    c[r * k * h + slot * h..r * k * h + (slot + 1) * h],
                    one[r * h..(r + 1) * h]
                );
                if id + 1 == f.preset.arch.num_layers() {
                    assert_eq!(one[r * h..(r + 1) * h], hidden[r * h..(r + 1) * h]);
                }
            }
        }
    }
}

/// Seeded bf16 features `[rows, width]`.
fn features(rows: usize, width: usize, seed: u32) -> Tensor {
    let v = (0..rows * width)
        .map(|i| {
            let u = tilefuse_ir::interp::uniform(seed, i as u32);
            (u - 0.5) * 4.0
        })
        .collect();
    Tensor::f32(DType::BF16, &[rows, width], v).unwrap()
}

fn rows_of(t: &Tensor, r0: usize, r1: usize) -> Tensor {
    let w = t.shape[1];
    Tensor::f32(t.dtype, &[r1 - r0, w], t.to_f32()[r0 * w..r1 * w].to_vec()).unwrap()
}

#[test]
fn draft_cache_equals_one_shot_recompute() {
    // 40 context rows: past the sliding draft layer's ring (6 + 32 − 1 = 37
    // slots) and its window, fed in uneven chunks (one longer than a forward
    // takes, which the drafter splits), versus one forward with all 40 (a
    // draft graph with a larger ring).
    for d in ["mimo-v2-tiny-dflash", "qwen3-moe-tiny-dflash"] {
        let dp = dflash::draft_preset(d).unwrap();
        let f = Fixture::new(dp.targets[0], d);
        let width = f.draft.feature_width();
        let ctx = features(40, width, 3);
        let tokens: Vec<i32> = (0..41).collect();
        let step = |dr: &mut DFlashDrafter, r0: usize, r1: usize| {
            let c = rows_of(&ctx, r0, r1);
            dr.propose(&DraftStep {
                context_start: r0,
                context: &c,
                first: 77,
                block: 8,
                tokens: &tokens[..=r1],
            })
            .unwrap()
        };
        let mut inc = f.drafter();
        let mut last = Vec::new();
        for (r0, r1) in [(0, 7), (7, 8), (8, 11), (11, 16), (16, 40)] {
            last = step(&mut inc, r0, r1);
        }
        assert_eq!(inc.held(), 40);
        let wide = GraphOptions {
            max_tokens: 64,
            ..f.preset.options
        };
        let g = dflash::draft_graph(&f.draft, &wide).unwrap();
        let exe = Executable::new(g, f.dw.clone(), Backend::Cpu).unwrap();
        let mut one = DFlashDrafter::new(exe, f.draft.mask_id(), 64).unwrap();
        let all = step(&mut one, 0, 40);
        assert!(
            last.iter().all(|x| x.is_finite()),
            "{d}: NaN in draft logits"
        );
        assert_eq!(
            bits(&[last]),
            bits(&[all]),
            "{d}: cached context differs from recompute"
        );
        // A drafter given context out of order refuses.
        let e = inc
            .propose(&DraftStep {
                context_start: 39,
                context: &rows_of(&ctx, 0, 1),
                first: 1,
                block: 4,
                tokens: &tokens,
            })
            .unwrap_err();
        assert!(e.to_string().contains("holds 40 context positions"), "{e}");
    }
}

/// One draft forward at `S = 0`: logits `[T, V]`.
fn draft_forward(f: &Fixture, ctx: &Tensor, ids: &[i32]) -> Vec<f32> {
    let (c, t) = (ctx.shape[0], ids.len());
    let mut e = Executable::new(f.dgraph.clone(), f.dw.clone(), Backend::Cpu).unwrap();
    let mut inputs = BTreeMap::new();
    inputs.insert("ids".to_string(), Tensor::i32(&[t], ids.to_vec()).unwrap());
    inputs.insert(
        "pos".to_string(),
        Tensor::i32(&[t], (c as i32..(c + t) as i32).collect()).unwrap(),
    );
    inputs.insert(dflash::CONTEXT_OUTPUT.to_string(), ctx.clone());
    inputs.insert(
        dflash::CONTEXT_POS_INPUT.to_string(),
        Tensor::i32(&[c], (0..c as i32).collect()).unwrap(),
    );
    let b = Bindings::new().with("S", 0).with("C", c).with("T", t);
    e.run(&b, inputs).unwrap()["logits"].to_f32()
}

#[test]
fn draft_block_is_bidirectional_and_the_window_hides_old_context() {
    // Every layer sliding with window 4: block queries at positions 12..16 see
    // context positions > 12 − 4, i.e. 9, 10, 11 (and the whole block).
    let cfg = DraftConfig {
        layer_types: vec![DraftLayerType::Sliding; 2],
        sliding_window: 4,
        ..DraftConfig::tiny_qwen()
    };
    let f = Fixture::custom(presets::by_name("qwen3-moe-tiny").unwrap(), cfg);
    let v = f.draft.vocab_size;
    let ctx = features(12, f.draft.feature_width(), 5);
    let ids = [65, 0, 0, 0];
    let base = draft_forward(&f, &ctx, &ids);
    // Bidirectional: the last block token changes the first rows.
    let later = draft_forward(&f, &ctx, &[65, 0, 0, 66]);
    assert_ne!(
        base[v..2 * v],
        later[v..2 * v],
        "block position 1 does not see position 3"
    );
    let changed = |row: usize| {
        let w = ctx.shape[1];
        let mut c = ctx.to_f32();
        c[row * w..(row + 1) * w]
            .iter_mut()
            .for_each(|x| *x = -*x + 1.0);
        draft_forward(&f, &Tensor::f32(DType::BF16, &ctx.shape, c).unwrap(), &ids)
    };
    assert_eq!(
        bits(std::slice::from_ref(&base)),
        bits(&[changed(8)]),
        "context position 8 is outside the window"
    );
    assert_ne!(base, changed(9), "context position 9 is inside the window");
    // Causal layers: the last block token no longer reaches earlier rows.
    let causal = DraftConfig {
        is_causal: Some(true),
        ..f.draft.clone()
    };
    let fc = Fixture::custom(presets::by_name("qwen3-moe-tiny").unwrap(), causal);
    let a = draft_forward(&fc, &ctx, &ids);
    let b = draft_forward(&fc, &ctx, &[65, 0, 0, 66]);
    assert_eq!(
        a[..3 * v],
        b[..3 * v],
        "causal: position 3 leaks into rows 0..3"
    );
    assert_ne!(a[3 * v..], b[3 * v..]);
    // The same config with full layers sees position 8.
    let full = Fixture::custom(
        presets::by_name("qwen3-moe-tiny").unwrap(),
        DraftConfig::tiny_qwen(),
    );
    let a = draft_forward(&full, &ctx, &ids);
    let w = ctx.shape[1];
    let mut c = ctx.to_f32();
    c[8 * w..9 * w].iter_mut().for_each(|x| *x = -*x + 1.0);
    let b = draft_forward(
        &full,
        &Tensor::f32(DType::BF16, &ctx.shape, c).unwrap(),
        &ids,
    );
    assert_ne!(a, b);
}

#[test]
fn greedy_speculative_equals_plain_greedy() {
    // Random drafts (τ ≈ 1): the draft graph, context bookkeeping and the
    // rollback after every rejected block all run; prompts longer than a
    // prefill chunk (16) included; lengths that end inside a block.
    let mut runs = 0;
    for (t, d) in [
        ("mimo-v2-tiny", "mimo-v2-tiny-dflash"),
        ("qwen3-moe-tiny", "qwen3-moe-tiny-dflash"),
        ("mimo-v2-tiny-mxfp4", "mimo-v2-tiny-dflash"),
    ] {
        let f = Fixture::new(t, d);
        let prompts: Vec<Vec<i32>> = if t.ends_with("mxfp4") {
            vec![prompt(6, 4)]
        } else {
            vec![prompt(1, 1), prompt(5, 2), prompt(21, 3)]
        };
        for (pi, pr) in prompts.iter().enumerate() {
            let (plain, _) = f.plain_greedy(pr, 37);
            for block in [4, 8, 16] {
                let mut e = f.engine(f.drafter(), block, SamplingRule::Rejection);
                // Without a logits trace greedy runs on the graphs' own argmax
                // outputs (the GPU's fast path): the same tokens and steps.
                let exe = Executable::new(f.target.clone(), f.tw.clone(), Backend::Cpu).unwrap();
                let opts = SpecOptions {
                    trace_logits: false,
                    argmax_outputs: true,
                    ..f.options(block, SamplingRule::Rejection)
                };
                let mut fast = SpecDecoder::new(exe, f.drafter(), opts).unwrap();
                for n in [1, 2, 11, 37] {
                    if (pi + block + n) % 2 == 1 && n != 37 {
                        continue; // a spread of (prompt, block, length), not the full product
                    }
                    let mut streamed = Vec::new();
                    let out = e
                        .generate(pr, n, Sampling::Greedy, |tok| {
                            streamed.push(tok);
                            true
                        })
                        .unwrap();
                    assert_eq!(out, plain[..n], "{t}, prompt {pi}, B = {block}, {n} tokens");
                    assert_eq!(streamed, out);
                    let quick = fast.generate(pr, n, Sampling::Greedy, |_| true).unwrap();
                    assert_eq!(
                        quick, out,
                        "{t}, prompt {pi}, B = {block}, {n} tokens (argmax outputs)"
                    );
                    let accepted = |st: &tilefuse_runtime::speculative::SpecStats| {
                        st.steps.iter().map(|s| s.accepted).collect::<Vec<_>>()
                    };
                    assert_eq!(accepted(&fast.stats), accepted(&e.stats));
                    let st = &e.stats;
                    assert_eq!(st.step_tokens() + 1, n);
                    assert!(st
                        .steps
                        .iter()
                        .all(|s| s.block <= block && s.accepted < s.block));
                    runs += 1;
                }
            }
        }
    }
    println!("{runs} greedy runs equal plain greedy");
}

/// Proposes the target's own greedy continuation (`script`: prompt and plain
/// greedy tokens) with a mistake at block position `a + 1`, `a` taken in turn
/// from `schedule`, so the step accepts exactly `min(a, B' − 1)` drafts.
/// A `shadow` DFlash drafter is given the same steps (so the draft graph and
/// its caches see every context length `a + 1`) and must return finite logits.
struct Replay {
    script: Vec<i32>,
    schedule: Vec<usize>,
    vocab: usize,
    step: usize,
    held: usize,
    shadow: Option<DFlashDrafter>,
}

impl Drafter for Replay {
    fn reset(&mut self) {
        self.step = 0;
        self.held = 0;
        if let Some(d) = &mut self.shadow {
            d.reset();
        }
    }

    fn propose(&mut self, s: &DraftStep<'_>) -> tilefuse_ir::Result<Vec<f32>> {
        let c = s.context.shape[0];
        if let Some(d) = &mut self.shadow {
            let q = d.propose(s)?;
            assert_eq!(q.len(), (s.block - 1) * self.vocab);
            assert!(
                q.iter().all(|x| x.is_finite()),
                "the DFlash draft gave NaN logits"
            );
        }
        assert_eq!(
            s.context_start, self.held,
            "context must continue where it stopped"
        );
        self.held += c;
        // The first token sits at position context_start + C = tokens.len() − 1.
        let n = s.tokens.len() - 1;
        assert_eq!(s.context_start + c, n);
        assert_eq!(
            s.tokens,
            &self.script[..=n],
            "the committed sequence left the greedy path"
        );
        assert_eq!(s.first, self.script[n]);
        let a = self.schedule[self.step % self.schedule.len()];
        self.step += 1;
        let mut logits = vec![0f32; (s.block - 1) * self.vocab];
        for j in 1..s.block {
            let truth = self.script[n + j];
            let tok = if j == a + 1 {
                (truth + 1) % self.vocab as i32
            } else {
                truth
            };
            logits[(j - 1) * self.vocab + tok as usize] = 1.0;
        }
        Ok(logits)
    }
}

/// Runs the replay schedule at block `block`; checks the output, every step's
/// acceptance, τ and the target logits behind every token against plain
/// greedy decoding. Returns τ.
fn replay(f: &Fixture, pr: &[i32], block: usize, schedule: &[usize], max_new: usize) -> f64 {
    let (plain, rows) = f.plain_greedy(pr, max_new);
    let mut script = pr.to_vec();
    script.extend(&plain);
    let d = Replay {
        script,
        schedule: schedule.to_vec(),
        vocab: f.preset.arch.vocab_size(),
        step: 0,
        held: 0,
        shadow: Some(f.drafter()),
    };
    let mut e = f.engine(d, block, SamplingRule::Rejection);
    let out = e.generate(pr, max_new, Sampling::Greedy, |_| true).unwrap();
    assert_eq!(out, plain, "B = {block}: output differs from plain greedy");
    assert_eq!(
        bits(e.trace()),
        bits(&rows),
        "B = {block}: target logits differ from plain decoding"
    );
    let steps = &e.stats.steps;
    for (i, s) in steps.iter().enumerate() {
        let want = schedule[i % schedule.len()].min(s.block - 1);
        assert_eq!(
            s.accepted, want,
            "B = {block}, step {i} (block {})",
            s.block
        );
    }
    let full: Vec<usize> = steps
        .iter()
        .filter(|s| s.block == block)
        .map(|s| s.accepted)
        .collect();
    for a in 0..block {
        if schedule.contains(&a) {
            assert!(
                full.contains(&a),
                "B = {block}: acceptance {a} never ran in a full block"
            );
        }
    }
    let want_tau = steps.iter().map(|s| s.accepted + 1).sum::<usize>() as f64 / steps.len() as f64;
    assert_eq!(e.stats.tau(), want_tau);
    e.stats.tau()
}

#[test]
fn replayed_drafts_run_every_acceptance_length() {
    for (t, d) in [
        ("mimo-v2-tiny", "mimo-v2-tiny-dflash"),
        ("qwen3-moe-tiny", "qwen3-moe-tiny-dflash"),
    ] {
        let f = Fixture::new(t, d);
        for block in [4, 8, 16] {
            // Each acceptance length 0..B−1 in a shuffled order, with enough
            // tokens that every one runs in a full block of B.
            let schedule: Vec<usize> = (0..block).map(|i| (i * 5 + 3) % block).collect();
            let tokens: usize = schedule.iter().map(|a| a + 1).sum::<usize>() + block + 1;
            let tau = replay(&f, &prompt(5, 1), block, &schedule, tokens);
            // Constant acceptance: τ = a + 1 exactly (the tokens after the
            // first are a multiple of a + 1, so no step is cut short, and
            // enough that the first steps are full blocks).
            for a in [0, block / 2, block - 1] {
                let steps = 4 + block.div_ceil(a + 1);
                let tau = replay(&f, &prompt(3, 2), block, &[a], 1 + steps * (a + 1));
                assert_eq!(tau, (a + 1) as f64, "{t}, B = {block}, a = {a}");
            }
            println!(
                "{t}: B = {block}, acceptance lengths 0..={} in turn, τ = {tau:.3}",
                block - 1
            );
        }
    }
}

#[test]
fn sliding_window_rollback_across_the_ring_edge() {
    // MiMo tiny: window 8, rings of 8 + 16 − 1 = 23 slots. Mostly rejected
    // blocks of 16 (15 rows written, 1 kept) with full acceptances between,
    // 120 tokens: the rings wrap ~10 times and every verify writes rejected
    // rows over slots that later positions reuse. The logits behind every
    // token must equal plain decoding's bit for bit.
    let f = Fixture::new("mimo-v2-tiny", "mimo-v2-tiny-dflash");
    for (block, schedule) in [
        (16, vec![0, 0, 15, 0, 3, 0, 0, 9, 14, 0]),
        (8, vec![0, 7, 1, 0, 6]),
        (4, vec![3, 0, 2, 0, 1]),
    ] {
        let tau = replay(&f, &prompt(12, 5), block, &schedule, 120);
        println!("mimo-v2-tiny B = {block}: 120 tokens across the ring edge, τ = {tau:.2}");
    }
}

#[test]
fn an_undersized_ring_is_caught() {
    // The same check with a lie: the target's rings are built for forwards of
    // 4 tokens (8 + 4 − 1 = 11 slots) but the engine is told 16. Verifying
    // blocks of 16 then evicts rows still needed, and the comparison with
    // plain decoding fails (NaN logits or different values). With rings of
    // `window + max_tokens − 1` slots, a forward that is safe on its own is
    // also safe to roll back (a write at `len + B − 1` evicts at most
    // `len − window`), so an undersized ring already breaks the verify
    // forward itself; this shows the comparison sees it.
    let mut p = presets::by_name("mimo-v2-tiny").unwrap();
    p.options.max_tokens = 4;
    let f = Fixture::custom(p, DraftConfig::tiny_mimo());
    let pr = prompt(3, 5);
    let (plain, rows) = f.plain_greedy(&pr, 40);
    let mut script = pr.clone();
    script.extend(&plain);
    let d = Replay {
        script,
        schedule: vec![0, 0, 15],
        vocab: 256,
        step: 0,
        held: 0,
        shadow: None,
    };
    let exe = Executable::new(f.target.clone(), f.tw.clone(), Backend::Cpu).unwrap();
    let opts = SpecOptions {
        max_tokens: 16,
        ..f.options(16, SamplingRule::Rejection)
    };
    let mut e = SpecDecoder::new(exe, d, opts).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        e.generate(&pr, 40, Sampling::Greedy, |_| true)
    }));
    let caught = match r {
        Err(_) => true, // the replay drafter saw the output leave the greedy path
        Ok(Err(_)) => true,
        Ok(Ok(out)) => out != plain || bits(e.trace()) != bits(&rows),
    };
    assert!(caught, "an undersized ring went unnoticed");
    // The engine itself refuses a block larger than the graph's max_tokens.
    let exe = Executable::new(f.target.clone(), f.tw.clone(), Backend::Cpu).unwrap();
    let e = SpecDecoder::new(exe, f.drafter(), f.options(8, SamplingRule::Rejection)).unwrap_err();
    assert!(e.to_string().contains("at most max_tokens = 4"), "{e}");
}

#[test]
fn limits_are_checked() {
    let f = Fixture::new("qwen3-moe-tiny", "qwen3-moe-tiny-dflash");
    let mut e = f.engine(f.drafter(), 4, SamplingRule::Rejection);
    let err = e
        .generate(&prompt(500, 0), 20, Sampling::Greedy, |_| true)
        .unwrap_err();
    assert!(
        err.to_string().contains("past the context limit of 512"),
        "{err}"
    );
    // Up to the limit works: prompt + max_new − 1 = 512 positions.
    let out = e
        .generate(&prompt(500, 0), 13, Sampling::Greedy, |_| true)
        .unwrap();
    assert_eq!(out.len(), 13);
    // Stopping early from the callback.
    let out = e
        .generate(&prompt(4, 0), 30, Sampling::Greedy, |_| false)
        .unwrap();
    assert_eq!(out.len(), 1);
    let target_only = Executable::new(
        f.preset.arch.forward_graph(&f.preset.options).unwrap(),
        f.tw.clone(),
        Backend::Cpu,
    )
    .unwrap();
    let err = SpecDecoder::new(
        target_only,
        f.drafter(),
        f.options(4, SamplingRule::Rejection),
    )
    .unwrap_err();
    assert!(err.to_string().contains("context_features"), "{err}");
}

#[test]
fn a_seed_reproduces_a_run() {
    let f = Fixture::new("mimo-v2-tiny", "mimo-v2-tiny-dflash");
    let mut e = f.engine(f.drafter(), 8, SamplingRule::Rejection);
    let mut run = |seed| {
        e.generate(
            &prompt(6, 0),
            24,
            Sampling::Temperature {
                temperature: 1.0,
                seed,
            },
            |_| true,
        )
        .unwrap()
    };
    let a = run(1);
    assert_eq!(a, run(1));
    assert_ne!(a, run(2));
}

// ---------------------------------------------------------------------------
// Sampling: chi-square goodness of fit.

/// ln Γ(x), Lanczos (g = 7, n = 9), |error| < 1e-13 for x > 0.
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    let x = x - 1.0;
    let t = x + 7.5;
    let s = G[1..]
        .iter()
        .enumerate()
        .fold(G[0], |s, (i, g)| s + g / (x + i as f64 + 1.0));
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + s.ln()
}

/// The chi-square survival function `P(X ≥ x)` for `k` degrees of freedom:
/// the regularised upper incomplete gamma `Q(k/2, x/2)` (series below
/// `a + 1`, Lentz continued fraction above).
fn chi2_sf(x: f64, k: usize) -> f64 {
    let (a, x) = (k as f64 / 2.0, x / 2.0);
    if x <= 0.0 {
        return 1.0;
    }
    let lg = a * x.ln() - x - ln_gamma(a);
    if x < a + 1.0 {
        let (mut sum, mut term, mut n) = (1.0 / a, 1.0 / a, a);
        for _ in 0..10_000 {
            n += 1.0;
            term *= x / n;
            sum += term;
            if term < sum * 1e-16 {
                break;
            }
        }
        1.0 - sum * lg.exp()
    } else {
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..10_000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let del = d * c;
            h *= del;
            if (del - 1.0).abs() < 1e-16 {
                break;
            }
        }
        lg.exp() * h
    }
}

#[test]
fn chi2_tail_is_right() {
    // Known quantiles: P(X ≥ 3.841) = 0.05 (k = 1), P(X ≥ 18.307) = 0.05
    // (k = 10), P(X ≥ 124.342) = 0.05 (k = 100), P(X ≥ 2) = e^-1 (k = 2).
    assert!((chi2_sf(3.841_459, 1) - 0.05).abs() < 1e-6);
    assert!((chi2_sf(18.307_04, 10) - 0.05).abs() < 1e-6);
    assert!((chi2_sf(124.342_1, 100) - 0.05).abs() < 1e-5);
    assert!((chi2_sf(2.0, 2) - (-1.0f64).exp()).abs() < 1e-12);
}

/// Pearson's statistic of `counts` against probabilities `expected` over the
/// same cells, cells with an expected count below 5 pooled into one; returns
/// (statistic, degrees of freedom, p-value).
fn chi_square(counts: &[usize], expected: &[f64]) -> (f64, usize, f64) {
    let n: usize = counts.iter().sum();
    let (mut stat, mut cells) = (0.0, 0);
    let (mut pool_o, mut pool_e) = (0.0, 0.0);
    for (&o, &p) in counts.iter().zip(expected) {
        let e = p * n as f64;
        if e < 5.0 {
            pool_o += o as f64;
            pool_e += e;
        } else {
            stat += (o as f64 - e).powi(2) / e;
            cells += 1;
        }
    }
    if pool_e > 0.0 {
        stat += (pool_o - pool_e).powi(2) / pool_e;
        cells += 1;
    }
    let df = cells - 1;
    (stat, df, chi2_sf(stat, df))
}

/// `softmax(row / t)` in f64.
fn softmax(row: &[f32], t: f32) -> Vec<f64> {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = row
        .iter()
        .map(|&l| ((f64::from(l) - f64::from(m)) / f64::from(t)).exp())
        .collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

#[test]
fn sampling_keeps_the_target_distribution() {
    // A Qwen3-MoE tiny target with a 4-token vocabulary and a random draft
    // (mask embedding at id 4): p and q differ a lot, so most blocks see
    // rejections and residual draws at every block position.
    //
    // Statistic: the joint distribution of the first K = 4 generated tokens
    // (4^4 = 256 cells) of N = 4000 runs with seeds 0..N, blocks of B = 4 and
    // max_new = 5 (so the first step is a full block: token 1 comes from the
    // prefill, tokens 2..4 from block positions 1..3 or a bonus). Expected
    // probabilities are the target's exact ones, products of
    // softmax(logits / t) from plain forwards of every prefix (1 + 4 + 16 + 64).
    // Cells with expected count < 5 are pooled. Significance α = 0.001: a
    // correct rule must have p > 0.001; the deliberately wrong rule (residual
    // replaced by p) must have p < 1e-9. The runs are seeded, so the outcome
    // is fixed; α only states how unlikely a correct rule is to fail.
    const K: usize = 4;
    const N: usize = 4000;
    const V: usize = 4;
    let temperature = 1.0;
    let arch = Arch::Qwen3Moe(qwen3_moe::Config {
        vocab_size: V,
        ..qwen3_moe::Config::tiny()
    });
    let preset = Preset {
        name: "qwen3-moe-tiny-v4",
        about: "",
        arch,
        options: GraphOptions {
            context: 64,
            max_tokens: 8,
            ..presets::by_name("qwen3-moe-tiny").unwrap().options
        },
    };
    let draft = DraftConfig {
        vocab_size: V,
        mask: MaskToken::Embedding,
        ..DraftConfig::tiny_qwen()
    };
    let f = Fixture::custom(preset, draft);
    let pr = vec![1, 3, 2];

    // Exact joint distribution of the first K tokens.
    let mut exact = vec![1.0f64; V.pow(K as u32)];
    for depth in 0..K {
        for prefix in 0..V.pow(depth as u32) {
            let mut seq = pr.clone();
            seq.extend((0..depth).map(|i| ((prefix / V.pow((depth - 1 - i) as u32)) % V) as i32));
            let p = softmax(&f.session().feed(&seq).unwrap(), temperature);
            let span = V.pow((K - depth) as u32);
            for (tok, pt) in p.iter().enumerate() {
                let start = (prefix * V + tok) * V.pow((K - depth - 1) as u32);
                for c in &mut exact[start..start + span / V] {
                    *c *= pt;
                }
            }
        }
    }
    assert!((exact.iter().sum::<f64>() - 1.0).abs() < 1e-9);

    let cell = |toks: &[i32]| toks[..K].iter().fold(0, |c, &t| c * V + t as usize);
    let mut results = Vec::new();
    for (name, rule) in [
        ("rejection", Some(SamplingRule::Rejection)),
        ("match-target", Some(SamplingRule::MatchTarget)),
        ("plain sampling", None),
        (
            "wrong: resample from p",
            Some(SamplingRule::WrongResampleFromTarget),
        ),
    ] {
        let mut counts = vec![0usize; exact.len()];
        let mut accepted = 0usize;
        match rule {
            Some(rule) => {
                let mut e = f.engine(f.drafter(), 4, rule);
                for seed in 0..N as u32 {
                    let out = e
                        .generate(
                            &pr,
                            K + 1,
                            Sampling::Temperature { temperature, seed },
                            |_| true,
                        )
                        .unwrap();
                    counts[cell(&out)] += 1;
                    accepted += e.stats.steps[0].accepted;
                }
            }
            None => {
                for seed in 0..N as u32 {
                    let mut s = f.session();
                    let out = s
                        .generate(&pr, K, Sampling::Temperature { temperature, seed }, |_| {
                            true
                        })
                        .unwrap();
                    counts[cell(&out)] += 1;
                }
            }
        }
        let (stat, df, pv) = chi_square(&counts, &exact);
        let acc = match rule {
            Some(_) => format!(
                ", mean drafts accepted in the first block {:.2}",
                accepted as f64 / N as f64
            ),
            None => String::new(),
        };
        println!("{name:<24} chi2 = {stat:8.1}, df = {df}, p = {pv:.3e}{acc}");
        results.push((name, stat, df, pv));
    }
    for &(name, stat, df, pv) in &results[..3] {
        assert!(
            pv > 1e-3,
            "{name}: chi2 = {stat} (df {df}) rejects the target distribution, p = {pv}"
        );
    }
    let (name, stat, df, pv) = results[3];
    assert!(
        pv < 1e-9,
        "{name}: chi2 = {stat} (df {df}) failed to catch the wrong rule, p = {pv}"
    );
}
