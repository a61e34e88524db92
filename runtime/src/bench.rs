//! The benchmark instrument: time per forward as a fraction of the roofline,
//! with the roofline's bandwidth measured in the same run.
//!
//! For a forward of `T` tokens after `S` cached positions, the bytes that
//! must move are: every weight read once, except the embedding table (only
//! the `T` rows looked up) and the routed experts (only the distinct experts
//! the `T` tokens were actually routed to, read back from the router's
//! output after the timed forwards); plus the KV bytes attention reads
//! (`min(S + T, window + T − 1)` positions per layer, keys and values).
//! The roofline time is those bytes over the bandwidth of a large
//! device-to-device copy (bytes read + written) timed in the same run; the
//! reported fraction is roofline time over measured time (median).

use std::collections::{BTreeMap, BTreeSet};

use tilefuse_codegen::KernelKind;
use tilefuse_ir::interp::Tensor;
use tilefuse_ir::{Attn, Bindings, ErrorKind, Graph, IrError, Mask, Nn, Op, Result};

use crate::cuda_exec::{GpuExecutable, LaunchMode, WeightSource};
use crate::gpu::{Gpu, GpuError};

fn gpu_err(e: GpuError) -> IrError {
    IrError::new(ErrorKind::Interp, e.to_string())
}

/// The device-to-device copy bandwidth in bytes per second (read + written),
/// median of `reps` copies of `bytes`.
pub fn measure_bandwidth(gpu: &Gpu, bytes: usize, reps: usize) -> Result<f64> {
    let a = gpu.alloc(bytes, "the bandwidth probe").map_err(gpu_err)?;
    let b = gpu.alloc(bytes, "the bandwidth probe").map_err(gpu_err)?;
    gpu.memset(&a, 0x3c).map_err(gpu_err)?;
    let stream = gpu.stream().clone();
    let ev =
        |e: cudarc::driver::DriverError| IrError::new(ErrorKind::Interp, format!("event: {e:?}"));
    let mut times = Vec::new();
    for i in 0..reps + 2 {
        let e0 = stream
            .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(ev)?;
        gpu.copy(&b, &a, bytes).map_err(gpu_err)?;
        let e1 = stream
            .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(ev)?;
        e1.synchronize().map_err(ev)?;
        if i >= 2 {
            times.push(e0.elapsed_ms(&e1).map_err(ev)?);
        }
    }
    let (ms, _) = median_spread(&mut times);
    Ok(2.0 * bytes as f64 / (ms * 1e-3))
}

/// Bytes a forward must move, by kind.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Bytes {
    /// Weights (dense once each, embedding rows, routed experts actually chosen).
    pub weights: usize,
    /// KV-cache bytes read by attention.
    pub kv: usize,
    /// Distinct experts per MoE layer.
    pub experts: Vec<usize>,
}

/// The bytes of one forward at `(t, s)`, with the distinct experts read back
/// from the executable's router outputs (after a forward has run).
pub fn bytes_moved(exe: &GpuExecutable, t: usize, s: usize) -> Result<Bytes> {
    let (plan, _) = exe
        .program_for(t)
        .ok_or_else(|| IrError::new(ErrorKind::Interp, format!("no bucket for T = {t}")))?;
    let g = &plan.fused.graph;
    let mut out = Bytes::default();
    let mut expert_weights = BTreeSet::new();
    // Routed experts: distinct indices per router, from the device.
    for k in &plan.kernels {
        if let KernelKind::ExpertsDown { experts } = plan.group(k).kind {
            let ins = g.inputs(experts);
            let (idx, w13, w2) = (ins[1], ins[3], ins[4]);
            let top_k = g.node(idx).ty.dims()[1].as_const().unwrap_or(1);
            let raw = exe.read_value(t, idx, 4 * t * top_k)?;
            let ids: BTreeSet<i32> = raw
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let e = g.node(w13).ty.dims()[0].as_const().unwrap_or(1);
            if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as usize >= e) {
                return Err(IrError::new(
                    ErrorKind::Interp,
                    format!(
                        "the router of the T = {t} forward holds expert {bad} of {e}: \
                         the last forward was not one of {t} tokens"
                    ),
                ));
            }
            for w in [w13, w2] {
                expert_weights.insert(w);
                let slot = plan.weight(w).map(|s| s.bytes).unwrap_or(0);
                out.weights += slot / e * ids.len();
            }
            out.experts.push(ids.len());
        }
    }
    for slot in &plan.weights {
        if expert_weights.contains(&slot.node) {
            continue;
        }
        let embedding = g
            .users(slot.node)
            .iter()
            .any(|&u| matches!(g.node(u).op, Op::Nn(Nn::Embedding)));
        out.weights += if embedding {
            let rows = slot.shape[0].max(1);
            slot.bytes / rows * t.min(rows)
        } else {
            slot.bytes
        };
    }
    for n in g.topo_order()? {
        let Op::Attn(Attn::Attention { mask, .. }) = g.node(n).op else {
            continue;
        };
        let ins = g.inputs(n);
        let window = match mask {
            Mask::Causal { window } | Mask::Block { window } => window,
        };
        let l = s + t;
        let seen = window.map_or(l, |w| l.min(w as usize + t - 1));
        for kv in [ins[1], ins[2]] {
            let ty = &g.node(kv).ty;
            let row: usize = ty.dims()[1..].iter().filter_map(|d| d.as_const()).product();
            out.kv += seen * row * ty.dtype.storage_bytes(1, 1).unwrap_or(2);
        }
    }
    Ok(out)
}

/// One measured forward.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Model name.
    pub model: String,
    /// Forward kind: `decode`, `verify`, ...
    pub forward: String,
    /// Tokens of the forward.
    pub t: usize,
    /// Cached positions before it.
    pub context: usize,
    /// Launch mode.
    pub mode: String,
    /// Median time per forward, ms.
    pub ms: f64,
    /// The 10th and 90th percentiles of the timed forwards, ms (none where
    /// the row's time is not a median of forwards: the speculative steps).
    pub spread_ms: Option<(f64, f64)>,
    /// Bytes that must move.
    pub bytes: Bytes,
    /// Roofline time, ms.
    pub roofline_ms: f64,
}

impl Row {
    /// A row of `model`'s forward kind `forward` (`t` tokens after `context`
    /// positions, launch `mode`) timed at `ms`, whose `bytes` at `bandwidth`
    /// (bytes per second) give its roofline.
    #[allow(clippy::too_many_arguments)]
    fn new(
        model: &str,
        forward: String,
        t: usize,
        context: usize,
        mode: LaunchMode,
        ms: f64,
        bytes: Bytes,
        bandwidth: f64,
    ) -> Row {
        Row {
            model: model.to_string(),
            forward,
            t,
            context,
            mode: format!("{mode:?}").to_lowercase(),
            ms,
            spread_ms: None,
            roofline_ms: (bytes.weights + bytes.kv) as f64 / bandwidth * 1e3,
            bytes,
        }
    }

    /// The row with the spread of its timed forwards.
    fn with_spread(mut self, spread: (f64, f64)) -> Row {
        self.spread_ms = Some(spread);
        self
    }

    /// Roofline time over measured time.
    pub fn fraction(&self) -> f64 {
        self.roofline_ms / self.ms
    }
}

/// What [`bench_model`] returns.
pub struct ModelBench {
    /// One row per mode, context and `T`.
    pub rows: Vec<Row>,
    /// Per-kernel decode times (stream mode, each kernel launched alone).
    pub kernel_times: Vec<(String, f32)>,
    /// One traced forward per mode and `T` (at the first context), when
    /// asked: `(T, trace)`.
    pub traces: Vec<(usize, crate::timeline::Trace)>,
    /// The GPU, back.
    pub gpu: Gpu,
}

/// Benchmarks one model's forward graph (random weights made on the GPU) for
/// each `t` in `tokens`, context in `contexts` and mode in `modes`.
#[allow(clippy::too_many_arguments)]
pub fn bench_model(
    gpu: Gpu,
    model: &str,
    graph: &Graph,
    tokens: &[usize],
    contexts: &[usize],
    modes: &[LaunchMode],
    bandwidth: f64,
    reps: usize,
    timeline: bool,
    mut progress: impl FnMut(&str),
) -> Result<ModelBench> {
    let mut rows = Vec::new();
    let mut kernel_times = Vec::new();
    let mut traces = Vec::new();
    let mut gpu = Some(gpu);
    for &mode in modes {
        progress(&format!("{model}: compiling for {mode:?}"));
        let g = gpu
            .take()
            .ok_or_else(|| IrError::new(ErrorKind::Interp, "GPU lost"))?;
        let mut exe = GpuExecutable::with_weights(g, graph, WeightSource::Random(7), tokens, mode)?;
        exe.randomize_caches(11)?;
        for &ctx in contexts {
            for &t in tokens {
                progress(&format!("{model}: {mode:?} T={t} S={ctx}"));
                let mut inputs = BTreeMap::new();
                let ids: Vec<i32> = (0..t as i32).map(|i| (i * 7919 + 13) % 256).collect();
                inputs.insert("ids".to_string(), Tensor::i32(&[t], ids)?);
                inputs.insert(
                    "pos".to_string(),
                    Tensor::i32(&[t], (ctx as i32..(ctx + t) as i32).collect())?,
                );
                let b = Bindings::new().with("T", t).with("S", ctx);
                let mut times = exe.time_forwards(&b, &inputs, 3, reps)?;
                let (ms, spread) = median_spread(&mut times);
                let bytes = bytes_moved(&exe, t, ctx)?;
                let forward = if t == 1 {
                    "decode".into()
                } else {
                    format!("verify/prefill T={t}")
                };
                rows.push(
                    Row::new(model, forward, t, ctx, mode, ms, bytes, bandwidth)
                        .with_spread(spread),
                );
                if mode == LaunchMode::Stream && t == 1 && kernel_times.is_empty() {
                    kernel_times = exe.kernel_times(1, ctx, 20)?;
                }
                if timeline && ctx == contexts[0] {
                    progress(&format!("{model}: tracing {mode:?} T={t} S={ctx}"));
                    traces.push((t, exe.trace_forward(&b, &inputs, 3)?));
                }
            }
        }
        gpu = Some(exe.into_gpu());
    }
    Ok(ModelBench {
        rows,
        kernel_times,
        traces,
        gpu: gpu.ok_or_else(|| IrError::new(ErrorKind::Interp, "GPU lost"))?,
    })
}

/// The median of timed forwards and their 10th and 90th percentiles, ms
/// (nearest rank; `times` is sorted here). Requires at least one time.
pub fn median_spread(times: &mut [f32]) -> (f64, (f64, f64)) {
    times.sort_by(f32::total_cmp);
    let at = |q: usize| f64::from(times[(times.len() - 1) * q / 10]);
    (f64::from(times[times.len() / 2]), (at(1), at(9)))
}

/// The rows as a table.
pub fn table(device: &str, bandwidth: f64, rows: &[Row]) -> String {
    let mut s = format!(
        "device: {device}\nmeasured bandwidth (device-to-device copy, read + write): {:.0} GB/s\n\n",
        bandwidth / 1e9
    );
    s.push_str(&format!(
        "{:<22} {:<20} {:>7} {:<10} {:>9} {:>13} {:>10} {:>8} {:>10} {:>9}\n",
        "model",
        "forward",
        "context",
        "mode",
        "ms",
        "p10-p90",
        "MB weights",
        "MB kv",
        "roofline",
        "fraction"
    ));
    for r in rows {
        let spread = r
            .spread_ms
            .map_or_else(|| "-".to_string(), |(lo, hi)| format!("{lo:.3}-{hi:.3}"));
        s.push_str(&format!(
            "{:<22} {:<20} {:>7} {:<10} {:>9.3} {:>13} {:>10.1} {:>8.1} {:>8.3}ms {:>8.1}%\n",
            r.model,
            r.forward,
            r.context,
            r.mode,
            r.ms,
            spread,
            r.bytes.weights as f64 / 1e6,
            r.bytes.kv as f64 / 1e6,
            r.roofline_ms,
            100.0 * r.fraction()
        ));
    }
    s
}

fn json_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The report as JSON.
pub fn json(device: &str, bandwidth: f64, rows: &[Row], kernels: &[(String, f32)]) -> String {
    let rows: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"model\":{},\"forward\":{},\"t\":{},\"context\":{},\"mode\":{},\"ms\":{:.6},\"ms_p10_p90\":{},\"weight_bytes\":{},\"kv_bytes\":{},\"distinct_experts\":{:?},\"roofline_ms\":{:.6},\"fraction\":{:.6}}}",
                json_str(&r.model),
                json_str(&r.forward),
                r.t,
                r.context,
                json_str(&r.mode),
                r.ms,
                r.spread_ms
                    .map_or_else(|| "null".to_string(), |(lo, hi)| format!("[{lo:.6},{hi:.6}]")),
                r.bytes.weights,
                r.bytes.kv,
                r.bytes.experts,
                r.roofline_ms,
                r.fraction()
            )
        })
        .collect();
    let ks: Vec<String> = kernels
        .iter()
        .map(|(n, t)| format!("{{\"kernel\":{},\"ms\":{t:.6}}}", json_str(n)))
        .collect();
    format!(
        "{{\"device\":{},\"bandwidth_bytes_per_s\":{bandwidth:.0},\"rows\":[{}],\"decode_kernels\":[{}]}}\n",
        json_str(device),
        rows.join(","),
        ks.join(",")
    )
}

/// A bar chart of roofline fractions, one bar per row, as SVG.
pub fn svg(rows: &[Row]) -> String {
    let w = 900.0;
    let bar_h = 18.0;
    let h = 40.0 + bar_h * 1.4 * rows.len() as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"monospace\" font-size=\"11\">\n<text x=\"10\" y=\"18\">fraction of the roofline (bytes that must move / measured bandwidth / time)</text>\n"
    );
    for (i, r) in rows.iter().enumerate() {
        let y = 30.0 + i as f64 * bar_h * 1.4;
        let label = format!("{} {} S={} {}", r.model, r.forward, r.context, r.mode);
        let frac = r.fraction().clamp(0.0, 1.0);
        s.push_str(&format!(
            "<text x=\"10\" y=\"{:.1}\">{}</text><rect x=\"420\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{bar_h}\" fill=\"#4a7\"/><rect x=\"420\" y=\"{y:.1}\" width=\"400\" height=\"{bar_h}\" fill=\"none\" stroke=\"#999\"/><text x=\"826\" y=\"{:.1}\">{:.1}%</text>\n",
            y + 13.0,
            label.replace('&', "&amp;").replace('<', "&lt;"),
            400.0 * frac,
            y + 13.0,
            100.0 * r.fraction()
        ));
    }
    s.push_str("</svg>\n");
    s
}

/// A DFlash pair to benchmark: the target with its context-feature output
/// and the draft, both at real widths with random weights made on the GPU.
pub struct DraftPair<'a> {
    /// Label of the rows.
    pub model: &'a str,
    /// `tilefuse_model`'s `dflash::target_graph` of the target.
    pub target: &'a Graph,
    /// The draft graph (symbols `S`, `C`, `T`).
    pub draft: &'a Graph,
    /// The draft's mask token id.
    pub mask_id: i32,
    /// Block size B.
    pub block: usize,
    /// Rows one draft forward may carry (the draft graph's `max_tokens`).
    pub draft_rows: usize,
    /// Tokens generated for the speculative-step timing.
    pub steps_tokens: usize,
    /// Positions the target's caches hold.
    pub context: usize,
}

/// Seeded values of standard deviation about 1, as a bf16 tensor.
fn random_bf16(shape: &[usize], seed: u32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v = (0..n)
        .map(|i| 3.464 * (tilefuse_ir::interp::uniform(seed, i as u32) - 0.5))
        .collect();
    Tensor::f32(tilefuse_ir::DType::BF16, shape, v)
}

/// Times the draft block forward (`T = B` after `S = context` cached context
/// rows, with one new context row: a step that accepted nothing, as random
/// weights do) and a whole speculative step (greedy: draft, verify,
/// acceptance and the host copies between them, from the engine's own
/// clock over `steps_tokens` generated tokens after a prompt of `context`
/// tokens, the first step left out as it also feeds the drafter the
/// prompt), for each context and mode. The step's roofline is the verify
/// forward's bytes plus the draft's.
#[allow(clippy::too_many_arguments)]
pub fn bench_draft(
    gpu: Gpu,
    pair: &DraftPair<'_>,
    contexts: &[usize],
    modes: &[LaunchMode],
    bandwidth: f64,
    reps: usize,
    mut progress: impl FnMut(&str),
) -> Result<(Vec<Row>, Gpu)> {
    use crate::speculative::{DFlashDrafter, SamplingRule, SpecDecoder, SpecOptions};
    use crate::{Executable, Sampling};
    let b = pair.block;
    let mut rows = Vec::new();
    let feature_width = pair
        .draft
        .inputs_of_kind(tilefuse_ir::InputKind::Activation)
        .into_iter()
        .map(|id| pair.draft.node(id))
        .find(|n| n.ty.rank() == 2)
        .and_then(|n| n.ty.dims()[1].as_const())
        .ok_or_else(|| IrError::new(ErrorKind::Interp, "the draft graph has no feature input"))?;
    let ms_of = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    for &mode in modes {
        progress(&format!("{}: compiling the draft for {mode:?}", pair.model));
        let mut dexe = GpuExecutable::with_weights(
            gpu.clone(),
            pair.draft,
            WeightSource::Random(9),
            &[b],
            mode,
        )?;
        dexe.randomize_caches(13)?;
        for &ctx in contexts {
            progress(&format!("{}: draft {mode:?} B={b} S={ctx}", pair.model));
            let c = 1;
            let mut inputs = BTreeMap::new();
            let mut ids = vec![pair.mask_id; b];
            ids[0] = 17;
            inputs.insert("ids".to_string(), Tensor::i32(&[b], ids)?);
            let at = |from: usize, n: usize| (from as i32..(from + n) as i32).collect();
            inputs.insert("pos".to_string(), Tensor::i32(&[b], at(ctx + c, b))?);
            inputs.insert(
                "context_features".to_string(),
                random_bf16(&[c, feature_width], 5)?,
            );
            inputs.insert("context_pos".to_string(), Tensor::i32(&[c], at(ctx, c))?);
            let bind = Bindings::new().with("S", ctx).with("C", c).with("T", b);
            let mut times = dexe.time_forwards(&bind, &inputs, 3, reps)?;
            let (ms, spread) = median_spread(&mut times);
            let bytes = bytes_moved(&dexe, b, ctx + c)?;
            let forward = format!("draft block B={b}");
            rows.push(
                Row::new(pair.model, forward, b, ctx, mode, ms, bytes, bandwidth)
                    .with_spread(spread),
            );
        }
        // The whole step through the engine, one context at a time.
        drop(dexe);
        for &ctx in contexts {
            if ctx + pair.steps_tokens + b + 1 > pair.context {
                continue;
            }
            progress(&format!(
                "{}: speculative step {mode:?} B={b} S={ctx}",
                pair.model
            ));
            let texe = GpuExecutable::with_weights(
                gpu.clone(),
                pair.target,
                WeightSource::Random(7),
                &[1, b, 64.min(crate::executable::max_tokens(pair.target))],
                mode,
            )?;
            let dexe = GpuExecutable::with_weights(
                gpu.clone(),
                pair.draft,
                WeightSource::Random(9),
                &[1, b],
                mode,
            )?;
            let target = Executable::from_gpu(pair.target.clone(), texe);
            let drafter = DFlashDrafter::new(
                Executable::from_gpu(pair.draft.clone(), dexe),
                pair.mask_id,
                pair.draft_rows,
            )?;
            let mut parts = Some((target, drafter));
            // The step with the host loop (logits copied back each step),
            // then with the GPU loop (argmax outputs, acceptance kernel,
            // features handed over in place).
            for (on_device, how) in [(false, "host loop"), (true, "GPU loop")] {
                let Some((target, drafter)) = parts.take() else {
                    break;
                };
                let opts = SpecOptions {
                    block: b,
                    context: pair.context,
                    max_tokens: 64.min(crate::executable::max_tokens(pair.target)),
                    rule: SamplingRule::Rejection,
                    trace_logits: false,
                    argmax_outputs: on_device,
                };
                let mut spec = SpecDecoder::new(target, drafter, opts)?;
                let prompt: Vec<i32> = (0..ctx as i32).map(|i| (i * 7919 + 13) % 256).collect();
                // Stopped by the callback, so that the last forward is a
                // whole block's verify (its routing gives the step's bytes).
                let mut n = 0;
                spec.generate(&prompt, pair.steps_tokens + b, Sampling::Greedy, |_| {
                    n += 1;
                    n < pair.steps_tokens
                })?;
                // Steady state: the first step also feeds the drafter the
                // whole prompt's context, so it is left out.
                let st = spec.stats.clone();
                let later = st.steps.get(1..).unwrap_or(&[]);
                if later.is_empty() {
                    return Err(IrError::new(
                        ErrorKind::Interp,
                        "the speculative run made fewer than two steps",
                    ));
                }
                let first = st.steps[0].draft + st.steps[0].verify;
                let ms = ms_of(st.decode.saturating_sub(first)) / later.len() as f64;
                let median =
                    |f: &dyn Fn(&crate::speculative::StepRecord) -> std::time::Duration| {
                        let mut v: Vec<f64> = later.iter().map(|s| ms_of(f(s))).collect();
                        v.sort_by(f64::total_cmp);
                        v[v.len() / 2]
                    };
                let (draft_ms, verify_ms) = (median(&|s| s.draft), median(&|s| s.verify));
                let tau =
                    later.iter().map(|s| s.accepted + 1).sum::<usize>() as f64 / later.len() as f64;
                let (mut texe, dexe) = spec.into_parts();
                let mut bytes = match texe.gpu() {
                    Some(g) => bytes_moved(g, b, ctx)?,
                    None => Bytes::default(),
                };
                if let Some(d) = rows
                    .iter()
                    .find(|r| r.context == ctx && r.forward.starts_with("draft block"))
                {
                    bytes.weights += d.bytes.weights;
                    bytes.kv += d.bytes.kv;
                }
                let forward = format!(
                    "spec step B={b}, {how} (τ {tau:.2}; draft {draft_ms:.2} + verify {verify_ms:.2} ms)"
                );
                rows.push(Row::new(
                    pair.model, forward, b, ctx, mode, ms, bytes, bandwidth,
                ));
                parts = Some((texe, dexe));
            }
        }
    }
    Ok((rows, gpu))
}

#[cfg(test)]
mod tests {
    use super::{json, median_spread, table, Bytes, Row};
    use crate::cuda_exec::LaunchMode;

    #[test]
    fn a_row_reports_the_spread_of_its_forwards() {
        // Eleven forwards: the median is the sixth, the 10th and 90th
        // percentiles the second and the tenth (nearest rank).
        let mut times: Vec<f32> = vec![9.0, 1.0, 7.0, 3.0, 5.0, 11.0, 2.0, 8.0, 4.0, 10.0, 6.0];
        let (ms, spread) = median_spread(&mut times);
        assert_eq!((ms, spread), (6.0, (2.0, 10.0)));
        let bytes = Bytes {
            weights: 3_000_000,
            kv: 0,
            experts: vec![],
        };
        let timed = Row::new(
            "m",
            "decode".into(),
            1,
            8,
            LaunchMode::Graph,
            ms,
            bytes.clone(),
            3e12,
        )
        .with_spread(spread);
        let step = Row::new(
            "m",
            "step".into(),
            8,
            8,
            LaunchMode::Graph,
            4.0,
            bytes,
            3e12,
        );
        let t = table("card", 3e12, &[timed.clone(), step.clone()]);
        let lines: Vec<&str> = t.lines().filter(|l| l.starts_with("m ")).collect();
        assert!(t.contains("p10-p90"), "{t}");
        assert!(lines[0].contains(" 2.000-10.000 "), "{t}");
        assert!(lines[1].split_whitespace().nth(5) == Some("-"), "{t}");
        let j = json("card", 3e12, &[timed, step], &[]);
        assert!(j.contains("\"ms_p10_p90\":[2.000000,10.000000]"), "{j}");
        assert!(j.contains("\"ms_p10_p90\":null"), "{j}");
    }
}
