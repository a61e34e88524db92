//! `tilefuse bench`: the benchmark command (the instrument lives in
//! `tilefuse_runtime::bench`; this file parses presets and writes reports).

use std::io::Write;
use std::path::Path;

use tilefuse::model::{dflash, presets};
use tilefuse::runtime::bench::{self, Row};
use tilefuse::runtime::gpu::Gpu;
use tilefuse::runtime::LaunchMode;

/// Options of one bench run.
pub struct BenchArgs<'a> {
    pub presets: &'a [String],
    pub contexts: &'a [usize],
    pub tokens: &'a [usize],
    pub modes: &'a [LaunchMode],
    pub reps: usize,
    pub out: &'a Path,
    pub peer: bool,
    pub timeline: bool,
    pub drafts: bool,
}

fn peer_rows(preset: &presets::Preset, contexts: &[usize]) -> Vec<String> {
    let (arch, layers) = match &preset.arch {
        presets::Arch::MimoV2(c) => ("mimo_v2", c.num_hidden_layers),
        presets::Arch::Qwen3Moe(c) => ("qwen3_moe", c.num_hidden_layers),
    };
    // bf16 experts are 3.8x the MXFP4 bytes: hold at most a few layers.
    let layers = match arch {
        "mimo_v2" => layers.min(4),
        _ => layers.min(24),
    };
    let mut out = Vec::new();
    for &ctx in contexts {
        eprintln!("peer: transformers {arch}, {layers} layers, context {ctx}");
        match std::process::Command::new("python3")
            .args([
                "tools/bench_peer.py",
                "--arch",
                arch,
                "--layers",
                &layers.to_string(),
                "--context",
                &ctx.to_string(),
            ])
            .output()
        {
            Ok(o) if o.status.success() => {
                if let Some(l) = String::from_utf8_lossy(&o.stdout).lines().last() {
                    out.push(l.to_string());
                }
            }
            Ok(o) => eprintln!(
                "peer failed: {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ),
            Err(e) => eprintln!("peer not run: {e}"),
        }
    }
    out
}

/// The forward a timeline shows, for titles, and the suffix of its files:
/// a decode forward keeps the plain names, a forward of `T > 1` tokens adds
/// `-tT`.
fn timeline_names(tokens: usize) -> (String, String) {
    if tokens == 1 {
        ("decode T=1".into(), String::new())
    } else {
        (format!("verify T={tokens}"), format!("-t{tokens}"))
    }
}

/// Writes the timeline pictures of one traced forward of `tokens` tokens
/// (the whole forward, and its middle layer alone) under `out`, and returns
/// the middle layer's summary.
fn write_timeline(
    out: &Path,
    preset: &str,
    arch: &presets::Arch,
    tokens: usize,
    tr: &tilefuse::runtime::timeline::Trace,
) -> Result<String, String> {
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let mode = format!("{:?}", tr.mode).to_lowercase();
    let (what, sfx) = timeline_names(tokens);
    let layer = arch.num_layers() / 2;
    let all = 0..tr.kernels.len();
    let one = tr.layer_range(layer).unwrap_or(all.clone());
    let mut files = vec![(
        format!("timeline-{preset}-{mode}{sfx}.svg"),
        tr.svg(all.clone(), &format!("{preset}, {what}, whole forward")),
    )];
    files.push((
        format!("timeline-{preset}-{mode}{sfx}-layer{layer}.svg"),
        tr.svg(one.clone(), &format!("{preset}, {what}, layer {layer}")),
    ));
    let whole = tr.summary(all);
    let summary = format!(
        "timeline of {preset}, {what}, layer {layer}:\n{}whole forward:\n{}\n",
        tr.summary(one),
        whole.lines().next().unwrap_or("")
    );
    files.push((
        format!("timeline-{preset}-{mode}{sfx}.txt"),
        format!("{whole}\nper step, over the whole forward:\n{}", tr.steps()),
    ));
    for (file, body) in files {
        let tmp = out.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, body).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, out.join(&file)).map_err(|e| format!("cannot write {file}: {e}"))?;
    }
    Ok(summary)
}

/// Shows the bench's progress on one terminal line.
fn progress(m: &str) {
    eprint!("\r\x1b[K{m}");
    let _ = std::io::stderr().flush();
}

/// Runs the benchmark and writes `bench.json`, `bench.svg` and `bench.txt` under `out`.
pub fn run(a: BenchArgs<'_>) -> Result<(), String> {
    let gpu = Gpu::open()
        .map_err(|e| e.to_string())?
        .ok_or("tilefuse bench needs a CUDA GPU; none was found")?;
    let device = format!("{} ({} SMs)", gpu.name, gpu.sms);
    eprintln!("measuring the bandwidth of {device} ...");
    let bandwidth = bench::measure_bandwidth(&gpu, 1 << 30, 20).map_err(|e| e.to_string())?;
    let mut rows: Vec<Row> = Vec::new();
    let mut kernels = Vec::new();
    let mut peers = Vec::new();
    let mut timelines = Vec::new();
    let mut gpu = gpu;
    for name in a.presets {
        let p = presets::by_name(name)?;
        let graph = p
            .arch
            .forward_graph(&p.options)
            .map_err(|e| e.to_string())?;
        let label = format!("{} ({}L)", p.name, p.arch.num_layers());
        let mb = bench::bench_model(
            gpu, &label, &graph, a.tokens, a.contexts, a.modes, bandwidth, a.reps, a.timeline,
            progress,
        )
        .map_err(|e| e.to_string())?;
        eprintln!();
        gpu = mb.gpu;
        rows.extend(mb.rows);
        if kernels.is_empty() {
            kernels = mb.kernel_times;
        }
        for (t, tr) in &mb.traces {
            timelines.push(write_timeline(a.out, p.name, &p.arch, *t, tr)?);
        }
        if !a.drafts {
            if a.peer {
                peers.extend(peer_rows(&p, a.contexts));
            }
            continue;
        }
        // The draft rows, for each built-in draft of this preset.
        for dp in dflash::draft_presets()
            .into_iter()
            .filter(|d| d.targets.contains(&p.name))
        {
            let target = dflash::target_graph(&p.arch, &p.options, &dp.config.target_layer_ids)
                .map_err(|e| e.to_string())?;
            let dopt = dflash::draft_options(&p.options);
            let draft = dflash::draft_graph(&dp.config, &dopt).map_err(|e| e.to_string())?;
            let pair = bench::DraftPair {
                model: &format!("{label} + {}", dp.name),
                target: &target,
                draft: &draft,
                mask_id: dp.config.mask_id(),
                block: dp.config.block_size.min(p.options.max_tokens),
                draft_rows: dopt.max_tokens,
                steps_tokens: 32,
                context: p.options.context,
            };
            let (r, g) =
                bench::bench_draft(gpu, &pair, a.contexts, a.modes, bandwidth, a.reps, progress)
                    .map_err(|e| e.to_string())?;
            eprintln!();
            gpu = g;
            rows.extend(r);
        }
        if a.peer {
            peers.extend(peer_rows(&p, a.contexts));
        }
    }
    let mut text = bench::table(&device, bandwidth, &rows);
    if !kernels.is_empty() {
        text.push_str(
            "\nslowest kernels of the first decode forward (stream mode, median of 20):\n",
        );
        let mut ks = kernels.clone();
        ks.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (n, t) in ks.iter().take(12) {
            text.push_str(&format!("  {t:>9.4} ms  {n}\n"));
        }
    }
    for t in &timelines {
        text.push('\n');
        text.push_str(t);
    }
    if !peers.is_empty() {
        text.push_str("\npeer (transformers, bf16, static cache, same GPU, same run):\n");
        for p in &peers {
            text.push_str(&format!("  {p}\n"));
        }
    }
    print!("{text}");
    std::fs::create_dir_all(a.out)
        .map_err(|e| format!("cannot create {}: {e}", a.out.display()))?;
    let mut json = bench::json(&device, bandwidth, &rows, &kernels);
    if !peers.is_empty() {
        json = json.trim_end().trim_end_matches('}').to_string()
            + ",\"peer\":["
            + &peers.join(",")
            + "]}\n";
    }
    for (file, body) in [
        ("bench.json", json),
        ("bench.svg", bench::svg(&rows)),
        ("bench.txt", text),
    ] {
        let tmp = a.out.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, body).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, a.out.join(file)).map_err(|e| format!("cannot write {file}: {e}"))?;
    }
    eprintln!("wrote {}/bench.{{json,svg,txt}}", a.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::timeline_names;

    #[test]
    fn a_decode_timeline_keeps_its_names_and_a_verify_one_says_its_tokens() {
        assert_eq!(timeline_names(1), ("decode T=1".into(), String::new()));
        assert_eq!(timeline_names(8), ("verify T=8".into(), "-t8".into()));
    }
}
