//! GPU executables against the interpreter, in every launch mode, on graphs
//! of every kernel kind that has a lowering. Skips without a GPU.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use tilefuse_ir::interp::{self, Caches, Tensor};
use tilefuse_ir::testing::random_inputs;
use tilefuse_ir::{shape, BinaryOp, Bindings, Builder, DType, Graph, UnaryOp};
use tilefuse_runtime::cuda_exec::{GpuExecutable, LaunchMode};
use tilefuse_runtime::gpu::Gpu;

/// Relative L2 error of `got` against `want`; NaN anywhere is infinite.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    if got.iter().chain(want).any(|x| x.is_nan()) || got.len() != want.len() {
        return f64::INFINITY;
    }
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum();
    let den: f64 = want
        .iter()
        .map(|b| f64::from(*b).powi(2))
        .sum::<f64>()
        .max(1e-30);
    (num / den).sqrt()
}

/// Tolerance by output dtype.
fn tolerance(d: DType) -> f64 {
    match d {
        DType::F32 => 1e-5,
        _ => 1e-2,
    }
}

/// Runs `g` on the GPU in `mode` at each `(S, T)` step with fresh inputs and
/// compares every output with the interpreter. The arena starts poisoned
/// (NaN bytes), so an unwritten output fails the comparison.
fn check(
    gpu: Gpu,
    g: &Graph,
    steps: &[(usize, usize)],
    mode: LaunchMode,
    buckets: &[usize],
) -> Gpu {
    check_with(gpu, g, steps, mode, buckets, None)
}

/// [`check`] with weights from `weights` (else random) and, for whole models,
/// a looser tolerance: bf16 rounding differences compound over the layers.
fn check_with(
    gpu: Gpu,
    g: &Graph,
    steps: &[(usize, usize)],
    mode: LaunchMode,
    buckets: &[usize],
    model_weights: Option<&BTreeMap<String, Tensor>>,
) -> Gpu {
    let b0 = Bindings::new().with("S", 0).with("T", 1);
    let weights: BTreeMap<String, Tensor> = match model_weights {
        Some(w) => w.clone(),
        None => random_inputs(g, &b0, 99)
            .unwrap()
            .into_iter()
            .filter(|(n, _)| {
                g.find_input(n).is_some_and(|id| {
                    g.node(id).op == tilefuse_ir::Op::Input(tilefuse_ir::InputKind::Weight)
                })
            })
            .collect(),
    };
    let mut exe =
        GpuExecutable::new(gpu, g, &weights, buckets, mode).unwrap_or_else(|e| panic!("{e}"));
    let mut caches = Caches::for_graph(g, &Bindings::new()).unwrap();
    for (i, &(s, t)) in steps.iter().enumerate() {
        let b = Bindings::new().with("S", s).with("T", t);
        let mut inputs = random_inputs(g, &b, 1000 + i as u64).unwrap();
        inputs.retain(|n, _| !weights.contains_key(n));
        // Positions continue the cache (the fused attention kernels rely on it).
        if inputs.contains_key("pos") {
            inputs.insert(
                "pos".into(),
                Tensor::i32(&[t], (s as i32..(s + t) as i32).collect()).unwrap(),
            );
        }
        let got = exe.run(&b, &inputs).unwrap_or_else(|e| panic!("{e}"));
        let mut all = weights.clone();
        all.extend(inputs);
        let want = interp::run(g, &b, &all, &mut caches).unwrap();
        for (name, w) in &want {
            let err = rel_l2(&got[name].to_f32(), &w.to_f32());
            println!("{} {mode:?} S={s} T={t} {name}: rel L2 {err:.2e}", g.name);
            let tol = if model_weights.is_some() {
                3e-2
            } else {
                tolerance(w.dtype)
            };
            if err > tol {
                // Which rows (tokens) are off: a first clue for a bad tile or bucket.
                let (gv, wv) = (got[name].to_f32(), w.to_f32());
                let row = wv.len() / w.shape[0].max(1);
                for r in 0..w.shape[0] {
                    let e = rel_l2(&gv[r * row..(r + 1) * row], &wv[r * row..(r + 1) * row]);
                    println!("  row {r}: rel L2 {e:.2e}");
                }
            }
            assert!(
                err <= tol,
                "{} {mode:?} S={s} T={t} output {name}: rel L2 {err}",
                g.name
            );
        }
    }
    exe.into_gpu()
}

fn elementwise_graph() -> Graph {
    let mut b = Builder::new("elementwise", &["T"]);
    let x = b.input("x", DType::BF16, shape![T, 300]).unwrap();
    let y = b.input("y", DType::BF16, shape![T, 300]).unwrap();
    let z = b.input("z", DType::F32, shape![T, 300]).unwrap();
    let s = b.unary(UnaryOp::Silu, x).unwrap();
    let m = b.mul(s, y).unwrap();
    let c = b.scalar(BinaryOp::Add, m, 0.5).unwrap();
    let f = b.cast(c, DType::F32).unwrap();
    let e = b.binary(BinaryOp::Max, f, z).unwrap();
    let r = b.unary(UnaryOp::Exp, e).unwrap();
    b.output("out", r).unwrap();
    b.output("mid", c).unwrap();
    b.finish().unwrap()
}

#[test]
fn elementwise_kernels_match_the_interpreter_in_every_mode() {
    let Some(mut gpu) = Gpu::open_or_skip() else {
        return;
    };
    let g = elementwise_graph();
    for mode in [
        LaunchMode::Stream,
        LaunchMode::Graph,
        LaunchMode::Persistent,
    ] {
        gpu = check(gpu, &g, &[(0, 1), (0, 7), (0, 3), (0, 16)], mode, &[1, 16]);
    }
}

#[test]
fn norm_linear_matches_the_interpreter() {
    let Some(mut gpu) = Gpu::open_or_skip() else {
        return;
    };
    // The canonical 512 x 256 (short tiles on the CUDA cores), 2048 x 256
    // (16-row tiles on the tensor cores) and 128 x 2048 (2-row tiles of long
    // rows, as a router's logits).
    for (dt, rows, k) in [DType::BF16, DType::MXFP4, DType::NVFP4, DType::F8E4M3]
        .into_iter()
        .flat_map(|dt| [(dt, 512, 256), (dt, 2048, 256), (dt, 128, 2048)])
    {
        let g = tilefuse_model::canonical::norm_linear_of(dt, rows, k).unwrap();
        for mode in [
            LaunchMode::Stream,
            LaunchMode::Graph,
            LaunchMode::Persistent,
        ] {
            gpu = check(
                gpu,
                &g,
                &[(0, 1), (0, 5), (0, 8), (0, 16), (0, 40)],
                mode,
                &[1, 8, 16, 64],
            );
        }
    }
}

#[test]
fn attention_block_matches_the_interpreter_across_the_ring() {
    let Some(mut gpu) = Gpu::open_or_skip() else {
        return;
    };
    let g = tilefuse_model::canonical::attention_block().unwrap();
    // Prefill 5, decode, a block of 16, decodes past the ring's 31 slots, a block of 8.
    let steps = [
        (0, 5),
        (5, 1),
        (6, 16),
        (22, 1),
        (23, 1),
        (24, 8),
        (32, 1),
        (33, 16),
        (49, 1),
    ];
    for mode in [
        LaunchMode::Stream,
        LaunchMode::Graph,
        LaunchMode::Persistent,
    ] {
        gpu = check(gpu, &g, &steps, mode, &[1, 8, 16]);
    }
}

#[test]
fn moe_block_matches_the_interpreter() {
    let Some(mut gpu) = Gpu::open_or_skip() else {
        return;
    };
    for dt in [DType::BF16, DType::MXFP4, DType::NVFP4] {
        let g = tilefuse_model::canonical::moe_block(dt).unwrap();
        for mode in [
            LaunchMode::Stream,
            LaunchMode::Graph,
            LaunchMode::Persistent,
        ] {
            gpu = check(
                gpu,
                &g,
                &[(0, 1), (0, 3), (0, 8), (0, 16)],
                mode,
                &[1, 8, 16],
            );
        }
    }
}

#[test]
fn tiny_models_match_the_interpreter_end_to_end() {
    let Some(gpu) = Gpu::open_or_skip() else {
        return;
    };
    let mut gpu = Some(gpu);
    for name in ["mimo-v2-tiny", "mimo-v2-tiny-mxfp4", "qwen3-moe-tiny"] {
        let p = tilefuse_model::presets::by_name(name).unwrap();
        let mut g = p.arch.forward_graph(&p.options).unwrap();
        // Expose every router's choice, so that a token whose experts differ
        // (a near tie of router scores, flipped by bf16 rounding upstream) is
        // told apart from a wrong kernel.
        let routers: Vec<_> = g
            .topo_order()
            .unwrap()
            .into_iter()
            .filter(|&n| {
                matches!(
                    g.node(n).op,
                    tilefuse_ir::Op::Moe(tilefuse_ir::Moe::RouterSelect { .. })
                )
            })
            .collect();
        for (i, &r) in routers.iter().enumerate() {
            g.set_output(&format!("route{i}"), r).unwrap();
        }
        let w = tilefuse_model::presets::random_weights(&g, 5).unwrap();
        let steps = [
            (0usize, 12usize),
            (12, 1),
            (13, 1),
            (14, 8),
            (22, 1),
            (23, 16),
            (39, 1),
        ];
        for mode in [
            LaunchMode::Stream,
            LaunchMode::Graph,
            LaunchMode::Persistent,
        ] {
            let mut exe = GpuExecutable::new(gpu.take().unwrap(), &g, &w, &[1, 8, 16], mode)
                .unwrap_or_else(|e| panic!("{e}"));
            let mut caches = Caches::for_graph(&g, &Bindings::new()).unwrap();
            let (mut compared, mut diverged) = (0, 0);
            for (i, &(s, t)) in steps.iter().enumerate() {
                let b = Bindings::new().with("S", s).with("T", t);
                let mut inputs = BTreeMap::new();
                let ids: Vec<i32> = (0..t)
                    .map(|k| ((s + k) * 37 + 11 + i) as i32 % 256)
                    .collect();
                inputs.insert("ids".to_string(), Tensor::i32(&[t], ids).unwrap());
                inputs.insert(
                    "pos".to_string(),
                    Tensor::i32(&[t], (s as i32..(s + t) as i32).collect()).unwrap(),
                );
                let got = exe.run(&b, &inputs).unwrap_or_else(|e| panic!("{e}"));
                let mut all = w.clone();
                all.extend(inputs);
                let want = interp::run(&g, &b, &all, &mut caches).unwrap();
                for row in 0..t {
                    let same_route = (0..routers.len()).all(|r| {
                        let k = want[&format!("route{r}")].shape[1];
                        got[&format!("route{r}")].as_i32().unwrap()[row * k..(row + 1) * k]
                            == want[&format!("route{r}")].as_i32().unwrap()[row * k..(row + 1) * k]
                    });
                    let v = p.arch.vocab_size();
                    let err = rel_l2(
                        &got["logits"].to_f32()[row * v..(row + 1) * v],
                        &want["logits"].to_f32()[row * v..(row + 1) * v],
                    );
                    println!(
                        "{name} {mode:?} S={s} T={t} row {row}: logits rel L2 {err:.2e}{}",
                        if same_route { "" } else { " (routing differs)" }
                    );
                    if same_route {
                        compared += 1;
                        assert!(err <= 3e-2, "{name} {mode:?} S={s} T={t} row {row}: logits rel L2 {err} with identical routing");
                    } else {
                        diverged += 1;
                    }
                }
            }
            println!("{name} {mode:?}: {compared} positions compared, {diverged} with a flipped expert choice (not compared)");
            assert!(
                compared >= 3 * diverged.max(1),
                "{name}: too few positions route identically ({compared} vs {diverged})"
            );
            gpu = Some(exe.into_gpu());
        }
    }
}

#[test]
fn full_attention_block_matches_the_interpreter_with_split_keys() {
    let Some(mut gpu) = Gpu::open_or_skip() else {
        return;
    };
    let g = tilefuse_model::canonical::full_attention_block().unwrap();
    // Steps whose keys span one split, then several, in each bucket.
    let steps = [
        (0, 12),
        (12, 1),
        (13, 1),
        (14, 8),
        (22, 16),
        (38, 1),
        (39, 5),
        (44, 16),
        (60, 1),
    ];
    for mode in [
        LaunchMode::Stream,
        LaunchMode::Graph,
        LaunchMode::Persistent,
    ] {
        gpu = check(gpu, &g, &steps, mode, &[1, 8, 16]);
    }
}

/// The tiny presets and their built-in DFlash drafts.
const TINY_PAIRS: [(&str, &str); 2] = [
    ("mimo-v2-tiny", "mimo-v2-tiny-dflash"),
    ("qwen3-moe-tiny", "qwen3-moe-tiny-dflash"),
];

/// A tiny target preset with its feature graph and seeded random weights,
/// and its built-in random DFlash draft.
struct DflashPair {
    p: tilefuse_model::presets::Preset,
    dp: tilefuse_model::dflash::DraftPreset,
    tg: Graph,
    tw: BTreeMap<String, Tensor>,
    dg: Graph,
    dw: BTreeMap<String, Tensor>,
}

fn dflash_pair(target: &str, draft: &str) -> DflashPair {
    use tilefuse_model::dflash;
    let p = tilefuse_model::presets::by_name(target).unwrap();
    let dp = dflash::draft_preset(draft).unwrap();
    let tg = dflash::target_graph(&p.arch, &p.options, &dp.config.target_layer_ids).unwrap();
    let tw = tilefuse_model::presets::random_weights(&tg, 7).unwrap();
    let dg = dflash::draft_graph(&dp.config, &dflash::draft_options(&p.options)).unwrap();
    let dw = dflash::random_draft_weights(&dg, &tw, 7).unwrap();
    DflashPair {
        p,
        dp,
        tg,
        tw,
        dg,
        dw,
    }
}

#[test]
fn dflash_graphs_match_the_interpreter() {
    use tilefuse_model::dflash;
    let Some(gpu) = Gpu::open_or_skip() else {
        return;
    };
    let mut gpu = Some(gpu);
    for (target, draft) in TINY_PAIRS {
        let DflashPair {
            p,
            dp,
            tg,
            tw,
            dg,
            dw,
        } = dflash_pair(target, draft);
        let f = dp.config.feature_width();
        let v = p.arch.vocab_size();
        // (S, C, T): context rows already cached, new context rows, block.
        // C + T stays within the draft's max_tokens (twice the target's).
        let steps = [
            (0usize, 12usize, 8usize),
            (12, 3, 8),
            (15, 1, 4),
            (16, 8, 16),
            (24, 16, 16),
            (40, 5, 8),
        ];
        for mode in [
            LaunchMode::Stream,
            LaunchMode::Graph,
            LaunchMode::Persistent,
        ] {
            // The target with its context-feature output, one prefill step.
            let mut exe = GpuExecutable::new(gpu.take().unwrap(), &tg, &tw, &[16], mode)
                .unwrap_or_else(|e| panic!("{e}"));
            let b = Bindings::new().with("S", 0).with("T", 12);
            let mut inputs = BTreeMap::new();
            let ids: Vec<i32> = (0..12).map(|k| (k * 41 + 3) % v as i32).collect();
            inputs.insert("ids".to_string(), Tensor::i32(&[12], ids).unwrap());
            inputs.insert(
                "pos".to_string(),
                Tensor::i32(&[12], (0..12).collect()).unwrap(),
            );
            let got = exe.run(&b, &inputs).unwrap_or_else(|e| panic!("{e}"));
            let mut all = tw.clone();
            all.extend(inputs);
            let mut caches = Caches::for_graph(&tg, &Bindings::new()).unwrap();
            let want = interp::run(&tg, &b, &all, &mut caches).unwrap();
            let err = rel_l2(
                &got[dflash::CONTEXT_OUTPUT].to_f32(),
                &want[dflash::CONTEXT_OUTPUT].to_f32(),
            );
            println!("{target} {mode:?} context features: rel L2 {err:.2e}");
            assert!(
                err <= 3e-2,
                "{target} {mode:?} context features: rel L2 {err}"
            );
            gpu = Some(exe.into_gpu());

            // The draft over several calls: its caches hold context only.
            let mut exe = GpuExecutable::new(gpu.take().unwrap(), &dg, &dw, &[4, 8, 16], mode)
                .unwrap_or_else(|e| panic!("{e}"));
            let mut caches = Caches::for_graph(&dg, &Bindings::new()).unwrap();
            for (i, &(s, c, t)) in steps.iter().enumerate() {
                let b = Bindings::new().with("S", s).with("C", c).with("T", t);
                let mut inputs = random_inputs(&dg, &b, 300 + i as u64).unwrap();
                inputs.retain(|n, _| !dw.contains_key(n));
                let mut ids = vec![dp.config.mask_id(); t];
                ids[0] = ((s * 13 + 5) % v) as i32;
                inputs.insert("ids".to_string(), Tensor::i32(&[t], ids).unwrap());
                let at = |from: usize, n: usize| (from as i32..(from + n) as i32).collect();
                inputs.insert("pos".to_string(), Tensor::i32(&[t], at(s + c, t)).unwrap());
                inputs.insert(
                    dflash::CONTEXT_POS_INPUT.to_string(),
                    Tensor::i32(&[c], at(s, c)).unwrap(),
                );
                assert_eq!(inputs[dflash::CONTEXT_OUTPUT].shape, vec![c, f]);
                let got = exe.run(&b, &inputs).unwrap_or_else(|e| panic!("{e}"));
                let mut all = dw.clone();
                all.extend(inputs);
                let want = interp::run(&dg, &b, &all, &mut caches).unwrap();
                let err = rel_l2(&got["logits"].to_f32(), &want["logits"].to_f32());
                println!("{draft} {mode:?} S={s} C={c} T={t}: logits rel L2 {err:.2e}");
                assert!(
                    err <= 3e-2,
                    "{draft} {mode:?} S={s} C={c} T={t}: logits rel L2 {err}"
                );
                // The greedy output is the argmax of every row of the GPU's own logits.
                let own: Vec<i32> = got["logits"]
                    .to_f32()
                    .chunks(v)
                    .map(|r| interp::argmax_row(r).unwrap() as i32)
                    .collect();
                assert_eq!(
                    got[dflash::GREEDY_OUTPUT].as_i32().unwrap(),
                    &own[..],
                    "{draft} {mode:?} S={s} C={c} T={t}: greedy output"
                );
            }
            gpu = Some(exe.into_gpu());
        }
    }
}

#[test]
fn acceptance_kernel_finds_every_prefix() {
    use tilefuse_runtime::accept::GreedyAccept;
    use tilefuse_runtime::cuda_exec::DeviceRange;
    let Some(gpu) = Gpu::open_or_skip() else {
        return;
    };
    let acc = GreedyAccept::new(&gpu, 16).unwrap_or_else(|e| panic!("{e}"));
    let bytes = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut cases = 0;
    for n in [0usize, 1, 3, 7, 15] {
        let target: Vec<i32> = (0..=n as i32).map(|i| 1000 + 37 * i).collect();
        for a in 0..=n {
            // Drafts equal the target's choices up to position a, then differ.
            let mut drafts: Vec<i32> = target[..n].to_vec();
            if a < n {
                drafts[a] += 1;
                for d in drafts.iter_mut().skip(a + 1) {
                    *d = -5; // later drafts never count
                }
            }
            let tb = gpu.upload(&bytes(&target), "target ids").unwrap();
            let mut dv = bytes(&drafts);
            dv.resize(4 * n.max(1), 0xff);
            let db = gpu.upload(&dv, "draft ids").unwrap();
            acc.enqueue(
                DeviceRange::whole(&db, DType::I32, n),
                DeviceRange::whole(&tb, DType::I32, n + 1),
                n,
            )
            .unwrap_or_else(|e| panic!("{e}"));
            let (got_a, toks) = acc.read(n).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got_a, a, "n = {n}");
            assert_eq!(toks, target[..=a], "n = {n}, a = {a}");
            cases += 1;
        }
    }
    println!("acceptance kernel: {cases} cases");
}

// One test per launch mode, so that each runs under compute-sanitizer's
// racecheck within a call's time. With TILEFUSE_SANITIZE_QUICK=1 (set by
// tools/gpu_sanitize.sh) each runs one block size (8) and one prompt of 17
// new tokens for greedy decoding and both temperature rules: every
// acceptance rule and the handoffs between the host and the GPU loop, in
// about a fifteenth of the decoding steps, since a sanitized launch costs a
// hundred plain ones. Other
// block sizes (other verification buckets) run only unsanitized.
#[test]
fn speculative_steps_on_the_gpu_equal_the_host_loop_in_stream_mode() {
    speculative_steps_equal_the_host_loop(LaunchMode::Stream);
}

#[test]
fn speculative_steps_on_the_gpu_equal_the_host_loop_in_graph_mode() {
    speculative_steps_equal_the_host_loop(LaunchMode::Graph);
}

#[test]
fn speculative_steps_on_the_gpu_equal_the_host_loop_in_persistent_mode() {
    speculative_steps_equal_the_host_loop(LaunchMode::Persistent);
}

fn speculative_steps_equal_the_host_loop(mode: LaunchMode) {
    use tilefuse_model::dflash;
    use tilefuse_runtime::speculative::{DFlashDrafter, SamplingRule, SpecDecoder, SpecOptions};
    use tilefuse_runtime::{Backend, Executable, Sampling};
    if !Gpu::available_or_skip() {
        return;
    }
    for (target, draft) in TINY_PAIRS {
        let DflashPair {
            p,
            dp,
            tg,
            tw,
            dg,
            dw,
        } = dflash_pair(target, draft);
        let v = p.arch.vocab_size() as i32;
        let texe = Executable::new(tg.clone(), tw.clone(), Backend::Cuda(mode))
            .unwrap_or_else(|e| panic!("{e}"));
        let dexe =
            Executable::new_beside(dg.clone(), dw.clone(), &texe).unwrap_or_else(|e| panic!("{e}"));
        let drafter = DFlashDrafter::new(
            dexe,
            dp.config.mask_id(),
            dflash::draft_options(&p.options).max_tokens,
        )
        .unwrap();
        let mut parts = Some((texe, drafter));
        // Greedy, and temperature sampling under both exact rules: the
        // GPU loop draws the same uniforms in the same order as the host
        // loop, so a seed gives the same tokens and acceptances.
        let quick = std::env::var("TILEFUSE_SANITIZE_QUICK").is_ok_and(|v| v == "1");
        let cases = [
            (Sampling::Greedy, SamplingRule::Rejection),
            (
                Sampling::Temperature {
                    temperature: 0.9,
                    seed: 5,
                },
                SamplingRule::Rejection,
            ),
            (
                Sampling::Temperature {
                    temperature: 1.7,
                    seed: 11,
                },
                SamplingRule::MatchTarget,
            ),
        ];
        // Quick: 17 new tokens are still at least two verify steps of a
        // block of 8 after the prefill's token, so the GPU loop takes over
        // from the host and hands back at least once.
        let (cases, blocks, prompts): (&[_], &[usize], &[(usize, usize)]) = if quick {
            (&cases, &[8], &[(21, 17)])
        } else {
            (&cases, &[4, 8, 16], &[(5, 23), (21, 40)])
        };
        let mut compared = 0;
        for &(sampling, rule) in cases {
            for &block in blocks {
                for &(len, n) in prompts {
                    let prompt: Vec<i32> = (0..len as i32).map(|i| (i * 31 + 7) % v).collect();
                    let mut runs = Vec::new();
                    for on_device in [false, true] {
                        let (t, d) = parts.take().unwrap();
                        let opts = SpecOptions {
                            block,
                            context: p.options.context,
                            max_tokens: p.options.max_tokens,
                            rule,
                            trace_logits: false,
                            argmax_outputs: on_device,
                        };
                        let mut e = SpecDecoder::new(t, d, opts).unwrap();
                        let out =
                            e.generate(&prompt, n, sampling, |_| true)
                                .unwrap_or_else(|err| {
                                    panic!("{target} {mode:?} {sampling:?} B={block}: {err}")
                                });
                        assert_eq!(e.stats.on_device, on_device, "{target} {mode:?}");
                        let acc: Vec<usize> = e.stats.steps.iter().map(|s| s.accepted).collect();
                        runs.push((out, acc));
                        parts = Some(e.into_parts());
                    }
                    assert_eq!(
                        runs[0], runs[1],
                        "{target} {mode:?} {sampling:?} {rule:?} B={block} prompt {len}: \
                         host loop vs GPU loop"
                    );
                    assert_eq!(runs[1].0.len(), n);
                    compared += 1;
                }
            }
        }
        println!(
            "{target} {mode:?}: GPU loop equals the host loop in {compared} runs \
             (greedy and sampling, B = {blocks:?})"
        );
    }
}

#[test]
fn a_context_past_the_gpu_memory_is_one_clear_error() {
    let Some(gpu) = Gpu::open_or_skip() else {
        return;
    };
    let (free, _) = gpu.mem_info().unwrap();
    // 2^30 positions of qwen3-moe-tiny: 2 layers x (k, v) x 2 heads x 16
    // dims x 2 bytes = 256 bytes a position, 256 GiB: more than one card has.
    let mut p = tilefuse_model::presets::by_name("qwen3-moe-tiny").unwrap();
    p.options.context = 1 << 30;
    let g = p.arch.forward_graph(&p.options).unwrap();
    let w = tilefuse_model::presets::random_weights(&g, 5).unwrap();
    let err = match GpuExecutable::new(gpu, &g, &w, &[1], LaunchMode::Graph) {
        Ok(_) => panic!("a 256 GiB cache was allocated on a card with {free} bytes free"),
        Err(e) => e.to_string(),
    };
    // "out of GPU memory allocating the KV caches: asked A MiB, F MiB free; ..."
    let rest = err
        .split("out of GPU memory allocating the KV caches: asked ")
        .nth(1)
        .unwrap_or_else(|| panic!("not the KV caches' out-of-memory error: {err}"));
    let (asked, rest) = rest.split_once(" MiB, ").unwrap();
    let (free_said, rest) = rest.split_once(" MiB free; ").unwrap();
    let (asked, free_said): (f64, f64) = (asked.parse().unwrap(), free_said.parse().unwrap());
    assert!(asked >= 262144.0, "{err}");
    // Other processes on the card (the GPU suite runs side by side) move the
    // free memory between the two readings: the error's figure lies between
    // them, within 1 GiB.
    let (after, _) = Gpu::open_or_skip().unwrap().mem_info().unwrap();
    let mib = |b: usize| b as f64 / 1048576.0;
    let (lo, hi) = (mib(free.min(after)), mib(free.max(after)));
    assert!(
        free_said > lo - 1024.0 && free_said < hi + 1024.0,
        "free memory said {free_said} MiB, the card had {lo:.1} to {hi:.1} MiB free: {err}"
    );
    assert!(rest.contains("shorter context"), "{err}");
}
