//! `tilefuse compile`: everything an engineer needs to read what tilefuse
//! makes of a graph — the IR after each pass, the plan, every kernel's
//! source and PTX, a summary table (tiles, registers, shared memory, spills,
//! bytes read) and the fused graph as Graphviz DOT (and SVG when `dot` is
//! installed). The output folder is written whole or not at all.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use tilefuse_codegen::fusion::Fused;
use tilefuse_codegen::lower;
use tilefuse_codegen::passes::run_pipeline_observed;
use tilefuse_codegen::plan::Plan;
use tilefuse_ir::{Graph, InputKind, Op};

use crate::cuda_exec::LaunchMode;
use crate::nvrtc::{self, CompileOptions, KernelResources};

/// What to write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Emit {
    /// The IR after every pass (`ir/NN-pass.txt`).
    pub ir: bool,
    /// The plan (`plan.txt`) and the fused graph (`fused.dot`, `fused.svg`).
    pub plan: bool,
    /// The CUDA source (`cuda/module.cu`, one file per kernel).
    pub cuda: bool,
    /// PTX and the resource report (needs NVRTC).
    pub ptx: bool,
}

/// One row of the summary table.
#[derive(Clone, Debug, PartialEq)]
pub struct SummaryRow {
    /// Kernel name.
    pub name: String,
    /// Tiles and threads per tile.
    pub tiles: u32,
    /// Threads per tile.
    pub threads: u32,
    /// Dynamic shared memory.
    pub smem: u32,
    /// Registers, spills and static shared memory (when compiled).
    pub resources: Option<KernelResources>,
    /// Weight bytes a forward at the bucket's largest `T` reads in this kernel.
    pub weight_bytes: usize,
}

/// Weight bytes a forward at the bucket's largest `T` reads in kernel `k` (routed
/// experts: the expected `min(T·k, E)` of them).
pub fn kernel_weight_bytes(plan: &Plan, k: &tilefuse_codegen::plan::Kernel) -> usize {
    let g = &plan.fused.graph;
    let group = plan.group(k);
    let mut nodes: Vec<_> = group.nodes.iter().copied().collect();
    let mut expert_fraction = 1.0f64;
    match group.kind {
        tilefuse_codegen::KernelKind::ExpertsUp { experts, .. }
        | tilefuse_codegen::KernelKind::ExpertsDown { experts } => {
            let ins = g.inputs(experts);
            let w = if matches!(group.kind, tilefuse_codegen::KernelKind::ExpertsUp { .. }) {
                ins[3]
            } else {
                ins[4]
            };
            let e = g.node(w).ty.dims()[0].as_const().unwrap_or(1);
            let k_sel = g.node(ins[1]).ty.dims()[1].as_const().unwrap_or(1);
            expert_fraction = ((plan.options.max_t * k_sel).min(e)) as f64 / e as f64;
            let slot = plan.weight(w).map(|s| s.bytes).unwrap_or(0);
            return (slot as f64 * expert_fraction) as usize;
        }
        tilefuse_codegen::KernelKind::MatVec { norm: Some(n), .. } => nodes.push(n),
        _ => {}
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0usize;
    for n in nodes {
        for i in g.inputs(n) {
            if matches!(g.node(i).op, Op::Input(InputKind::Weight)) && seen.insert(i) {
                total += plan.weight(i).map(|s| s.bytes).unwrap_or(0);
            }
        }
    }
    (total as f64 * expert_fraction) as usize
}

/// The fused graph as Graphviz DOT: one cluster per kernel.
pub fn dot(f: &Fused) -> String {
    let g = &f.graph;
    let num = g.numbering();
    let mut s = String::from(
        "digraph fused {\n  rankdir=TB;\n  node [shape=box, fontname=monospace, fontsize=10];\n",
    );
    for (i, group) in f.groups.iter().enumerate() {
        let _ = writeln!(
            s,
            "  subgraph cluster_k{i} {{\n    label=\"k{i} {}\";\n    style=rounded;",
            group.kind.short()
        );
        for n in &group.nodes {
            let node = g.node(*n);
            let _ = writeln!(
                s,
                "    n{} [label=\"%{} {}\\n{}\"];",
                num[n],
                num[n],
                node.op.mnemonic(),
                node.name.replace('"', "'")
            );
        }
        s.push_str("  }\n");
    }
    for n in g.topo_order().unwrap_or_default() {
        let node = g.node(n);
        if f.group_of(n).is_none() {
            let shape = if matches!(node.op, Op::Input(_)) {
                "ellipse"
            } else {
                "box"
            };
            let _ = writeln!(
                s,
                "  n{} [label=\"%{} {}\\n{}\", shape={shape}];",
                num[&n],
                num[&n],
                node.op.mnemonic(),
                node.name.replace('"', "'")
            );
        }
        for i in g.inputs(n) {
            let _ = writeln!(s, "  n{} -> n{};", num[&i], num[&n]);
        }
    }
    s.push_str("}\n");
    s
}

/// How many CTAs of a kernel one SM of a Hopper GPU (sm_90) holds at once:
/// the least of what its registers (64 Ki a SM, allocated per warp in units
/// of 256), its threads (2,048 a SM, 32 CTAs at most) and its shared memory
/// (228 KiB a SM, 1 KiB of it reserved per CTA) allow. A kernel whose tiles
/// outnumber this times the SMs runs them in more than one wave.
pub fn ctas_per_sm(registers: u32, threads: u32, shared: u32) -> u32 {
    let warps = threads.div_ceil(32).max(1);
    let per_warp = (registers.max(1) * 32).div_ceil(256) * 256;
    let by_regs = (65_536 / per_warp) / warps;
    let by_threads = (2_048 / (warps * 32)).min(32);
    let by_smem = (228 * 1024) / (shared + 1024);
    by_regs.min(by_threads).min(by_smem)
}

/// Renders the summary rows as a table (`occ`: CTAs an SM holds at once,
/// [`ctas_per_sm`]; `waves`: the kernel's tiles over what the
/// [`lower::SMS`] SMs hold at once, so 1.17 is a full wave and a short
/// second one), then the persistent dispatcher's row when there is one.
pub fn summary_table(rows: &[SummaryRow], dispatcher: Option<&SummaryRow>) -> String {
    let mut s = format!(
        "{:<48} {:>6} {:>4} {:>7} {:>5} {:>6} {:>6} {:>4} {:>5} {:>12}\n",
        "kernel", "tiles", "thr", "smem", "regs", "spills", "stack", "occ", "waves", "weight bytes"
    );
    for r in rows.iter().chain(dispatcher) {
        let (regs, spills, stack, occ, waves) = match &r.resources {
            Some(k) => {
                let occ = ctas_per_sm(k.registers, r.threads, r.smem + k.shared);
                let waves = if occ == 0 {
                    "-".to_string()
                } else {
                    format!(
                        "{:.2}",
                        f64::from(r.tiles) / (f64::from(occ) * lower::SMS as f64)
                    )
                };
                (
                    k.registers.to_string(),
                    (k.spill_stores + k.spill_loads).to_string(),
                    k.stack_frame.to_string(),
                    occ.to_string(),
                    waves,
                )
            }
            None => ("-".into(), "-".into(), "-".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            s,
            "{:<48} {:>6} {:>4} {:>7} {:>5} {:>6} {:>6} {:>4} {:>5} {:>12}",
            r.name, r.tiles, r.threads, r.smem, regs, spills, stack, occ, waves, r.weight_bytes
        );
    }
    let _ = writeln!(
        s,
        "{} kernels, {} weight bytes per forward",
        rows.len(),
        rows.iter().map(|r| r.weight_bytes).sum::<usize>()
    );
    s
}

/// The summary row of the persistent dispatcher, which runs every kernel's
/// tiles in one CTA an SM: its registers and spills are what the persistent
/// mode's tiles get (the rows above are the kernels of the other modes). It
/// reads no weight bytes of its own (the kernels above count them); its
/// tiles are its CTAs, one an SM.
fn dispatcher_row(module: &lower::Module, resources: &[KernelResources]) -> SummaryRow {
    SummaryRow {
        name: format!("all = {}", lower::PERSISTENT),
        tiles: lower::SMS as u32,
        threads: module.persistent_threads,
        smem: module.persistent_smem,
        resources: resources
            .iter()
            .find(|r| r.name == lower::PERSISTENT)
            .cloned(),
        weight_bytes: 0,
    }
}

fn write(dir: &Path, rel: &str, text: &str) -> Result<(), String> {
    let p = dir.join(rel);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    std::fs::write(&p, text).map_err(|e| format!("cannot write {}: {e}", p.display()))
}

/// Compiles `graph` for a bucket of `max_t` tokens launched in `mode` and
/// writes what `emit` asks for under `out` (replacing it atomically).
/// Returns the summary table.
pub fn compile_artifacts(
    graph: &Graph,
    max_t: usize,
    mode: LaunchMode,
    emit: Emit,
    out: &Path,
) -> Result<String, String> {
    // Written in a hidden sibling (`.NAME.tmp-PID`, same parent), which
    // replaces `out` at the end: a crash leaves the old folder, none, or the
    // new one, never a half-written one.
    let tmp: PathBuf = {
        let mut name = std::ffi::OsString::from(".");
        name.push(out.file_name().unwrap_or_default());
        name.push(format!(".tmp-{}", std::process::id()));
        out.with_file_name(name)
    };
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    let result = (|| {
        let mut pass_dumps = Vec::new();
        let fused = run_pipeline_observed(graph.clone(), |name, f| {
            pass_dumps.push((name.to_string(), f.to_string()))
        })
        .map_err(|e| e.to_string())?;
        if emit.ir {
            write(&tmp, "ir/00-input.txt", &graph.to_string())?;
            for (i, (name, text)) in pass_dumps.iter().enumerate() {
                write(&tmp, &format!("ir/{:02}-{name}.txt", i + 1), text)?;
            }
        }
        let dotted = dot(&fused);
        let opt = crate::cuda_exec::plan_options(graph, max_t, mode);
        let plan = Plan::new(fused, opt).map_err(|e| e.to_string())?;
        if emit.plan {
            write(&tmp, "plan.txt", &plan.to_string())?;
            write(&tmp, "fused.dot", &dotted)?;
            if let Ok(o) = std::process::Command::new("dot")
                .args(["-Tsvg", "-o"])
                .arg(tmp.join("fused.svg"))
                .arg(tmp.join("fused.dot"))
                .output()
            {
                if !o.status.success() {
                    eprintln!(
                        "warning: dot failed: {}",
                        String::from_utf8_lossy(&o.stderr)
                    );
                }
            }
        }
        let module = lower::lower(&plan).map_err(|e| e.to_string())?;
        if emit.cuda {
            write(&tmp, "cuda/module.cu", &module.source)?;
            for k in &module.kernels {
                write(&tmp, &format!("cuda/{}.cu", k.name), &k.source())?;
            }
        }
        let mut resources = Vec::new();
        if emit.ptx {
            let c = nvrtc::compile(
                &graph.name,
                &module.source,
                tilefuse_codegen::cuda::HEADERS,
                &CompileOptions::default(),
            )
            .map_err(|e| e.to_string())?;
            write(&tmp, "ptx/module.ptx", &c.ptx)?;
            write(&tmp, "ptx/nvrtc.log", &c.log)?;
            resources = c.resources;
        }
        let rows: Vec<SummaryRow> = plan
            .kernels
            .iter()
            .zip(&module.instances)
            .map(|(k, inst)| SummaryRow {
                name: format!(
                    "{} = {}",
                    k.name.split('_').next().unwrap_or(""),
                    module.kernels[inst.function].name
                ),
                tiles: k.tiling.tiles,
                threads: k.tiling.threads,
                smem: k.tiling.smem,
                resources: resources
                    .iter()
                    .find(|r| r.name == module.kernels[inst.function].name)
                    .cloned(),
                weight_bytes: kernel_weight_bytes(&plan, k),
            })
            .collect();
        // In the persistent mode the dispatcher runs every tile.
        let dispatcher = (mode == LaunchMode::Persistent && module.persistent.is_some())
            .then(|| dispatcher_row(&module, &resources));
        let table = summary_table(&rows, dispatcher.as_ref());
        write(&tmp, "summary.txt", &table)?;
        Ok(table)
    })();
    match result {
        Ok(table) => {
            let _ = std::fs::remove_dir_all(out);
            std::fs::rename(&tmp, out)
                .map_err(|e| format!("cannot move {} to {}: {e}", tmp.display(), out.display()))?;
            Ok(table)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{ctas_per_sm, summary_table, KernelResources, SummaryRow};

    #[test]
    fn the_summary_counts_waves_of_resident_tiles() {
        let row = |tiles: u32, registers: u32| SummaryRow {
            name: "k".into(),
            tiles,
            threads: 256,
            smem: 12_304,
            resources: Some(KernelResources {
                name: "k".into(),
                registers,
                spill_stores: 0,
                spill_loads: 0,
                stack_frame: 0,
                shared: 0,
            }),
            weight_bytes: 0,
        };
        // 80 registers: three CTAs an SM, 396 places on 132 SMs.
        let t = summary_table(&[row(464, 80), row(232, 80), row(256, 247)], None);
        let waves: Vec<&str> = t
            .lines()
            .skip(1)
            .take(3)
            .map(|l| l.split_whitespace().nth(8).unwrap())
            .collect();
        assert_eq!(waves, ["1.17", "0.59", "1.94"], "{t}");
        assert!(t.lines().next().unwrap().contains("waves"), "{t}");
    }

    #[test]
    fn the_dispatcher_row_follows_the_kernels_and_is_not_counted_as_one() {
        let row = |name: &str, tiles: u32, spills: u32, weight_bytes: usize| SummaryRow {
            name: name.into(),
            tiles,
            threads: 256,
            smem: 87_808,
            resources: Some(KernelResources {
                name: name.into(),
                registers: 255,
                spill_stores: spills,
                spill_loads: spills,
                stack_frame: 0,
                shared: 0,
            }),
            weight_bytes,
        };
        let kernels = [row("k00 = a", 128, 0, 1000), row("k01 = b", 64, 0, 24)];
        let d = row("all = persistent_dispatch", 132, 40, 0);
        let t = summary_table(&kernels, Some(&d));
        let lines: Vec<&str> = t.lines().collect();
        let cols: Vec<&str> = lines[3].split_whitespace().collect();
        // name (3 words), tiles, thr, smem, regs, spills, stack, occ, waves.
        assert_eq!(cols[2], "persistent_dispatch", "{t}");
        assert_eq!(
            &cols[3..10],
            ["132", "256", "87808", "255", "80", "0", "1"],
            "{t}"
        );
        assert_eq!(lines[4], "2 kernels, 1024 weight bytes per forward", "{t}");
        assert_eq!(lines.len(), 5, "{t}");
    }

    #[test]
    fn occupancy_follows_registers_threads_and_shared_memory() {
        // 127 registers: 16 units of 256 a warp, 16 warps a SM, two CTAs of 8.
        assert_eq!(ctas_per_sm(127, 256, 4096), 2);
        assert_eq!(ctas_per_sm(128, 256, 4096), 2);
        // 151 registers: 19 units a warp, 13 warps: one CTA of 8.
        assert_eq!(ctas_per_sm(151, 256, 512), 1);
        // Few registers: threads bound it (2,048 a SM), then the CTA cap (32).
        assert_eq!(ctas_per_sm(32, 256, 0), 8);
        assert_eq!(ctas_per_sm(32, 32, 0), 32);
        // 66 registers take 9 units of 256 a warp (not 66 x 32): 28 one-warp CTAs.
        assert_eq!(ctas_per_sm(66, 32, 0), 28);
        // Shared memory bounds it: 78,848 bytes + 1 KiB reserved, twice in 228 KiB;
        // 76 KiB would fit three times but for the reserved KiB.
        assert_eq!(ctas_per_sm(64, 256, 76 * 1024), 2);
        assert_eq!(ctas_per_sm(64, 256, 78_848), 2);
        assert_eq!(ctas_per_sm(64, 256, 120_000), 1);
    }
}
