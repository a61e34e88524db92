//! The timeline of one forward: when each kernel started, passed its wait
//! for its inputs and ended, read from a trace the kernels write themselves
//! ([`crate::GpuExecutable::trace_forward`]).
//!
//! In stream and graph modes each kernel records the first start, the first
//! pass of its wait and the last end over its CTAs (one clock for the whole
//! GPU, `%globaltimer`). In persistent mode each task records the same for
//! itself, with its SM. A kernel's *wait* is the time between its first CTA
//! starting and its inputs being ready: with programmatic dependent launch
//! it overlaps the kernel before it, and is where its weight prefetch runs.
//! *Idle* is time in the forward's span during which no kernel was past its
//! wait and working.

use std::collections::BTreeMap;
use std::fmt::Write;

use tilefuse_codegen::plan::Plan;
use tilefuse_ir::{ErrorKind, IrError, Result};

use tilefuse_codegen::lower::{TASK_TILE_BITS, TRACE_KERNEL_WORDS, TRACE_TASK_WORDS};

use crate::cuda_exec::LaunchMode;

/// One kernel of the traced forward; times in microseconds from the
/// forward's first start.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelSpan {
    /// Plan kernel name.
    pub name: String,
    /// The layer its nodes belong to (`layerN.` in their names), if any.
    pub layer: Option<usize>,
    /// First CTA (or task) start.
    pub start: f64,
    /// First CTA (or task) past its wait.
    pub waited: f64,
    /// Last CTA (or task) end.
    pub end: f64,
    /// CTAs (or tasks) that recorded.
    pub ctas: u64,
    /// Last CTA (or task) start.
    pub last_start: f64,
    /// Last CTA (or task) past its wait.
    pub last_waited: f64,
    /// The longest work of one CTA (task): its end minus its own wait.
    pub longest: f64,
    /// The work of its CTAs (tasks) summed ([`KernelSpan::mean`]).
    pub work_sum: f64,
    /// Weight bytes the kernel reads at the bucket's largest `T`.
    pub weight_bytes: usize,
}

impl KernelSpan {
    /// The mean work of its CTAs (tasks), µs.
    pub fn mean(&self) -> f64 {
        if self.ctas == 0 {
            0.0
        } else {
            self.work_sum / self.ctas as f64
        }
    }
}

/// One task of a traced persistent forward.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TaskSpan {
    /// The SM that ran it.
    pub sm: u32,
    /// Plan kernel index.
    pub kernel: usize,
    /// Start, past its wait, end (µs from the forward's first start).
    pub start: f64,
    /// Past its wait.
    pub waited: f64,
    /// End.
    pub end: f64,
}

/// What one traced forward recorded.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    /// Launch mode.
    pub mode: LaunchMode,
    /// Event-timed milliseconds of the traced forward.
    pub ms: f32,
    /// Per kernel, in schedule order.
    pub kernels: Vec<KernelSpan>,
    /// Per task (persistent mode only).
    pub tasks: Vec<TaskSpan>,
}

/// The layer a kernel belongs to: the first `layerN.` in its nodes' names.
fn layer_of(plan: &Plan, k: &tilefuse_codegen::plan::Kernel) -> Option<usize> {
    let g = &plan.fused.graph;
    plan.group(k).nodes.iter().find_map(|&n| {
        let name = &g.node(n).name;
        let rest = name.strip_prefix("layer")?;
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    })
}

impl Trace {
    /// Decodes the trace words of a forward of `plan` in `mode`: `records`
    /// records of [`TRACE_KERNEL_WORDS`] words per kernel (stream, graph) or
    /// [`TRACE_TASK_WORDS`] per task (persistent)
    /// ([`crate::GpuExecutable::trace_forward`]).
    pub fn from_words(
        plan: &Plan,
        mode: LaunchMode,
        records: usize,
        words: &[u64],
        ms: f32,
    ) -> Result<Trace> {
        let width = match mode {
            LaunchMode::Persistent => TRACE_TASK_WORDS,
            _ => TRACE_KERNEL_WORDS,
        };
        if words.len() < width * records {
            return Err(IrError::new(
                ErrorKind::Interp,
                format!(
                    "the trace holds {} words, fewer than the {} of {records} records",
                    words.len(),
                    width * records
                ),
            ));
        }
        let rec = |i: usize| &words[width * i..width * (i + 1)];
        let mut kernels: Vec<KernelSpan> = plan
            .kernels
            .iter()
            .map(|k| KernelSpan {
                name: k.name.clone(),
                layer: layer_of(plan, k),
                start: f64::INFINITY,
                waited: f64::INFINITY,
                end: 0.0,
                ctas: 0,
                last_start: 0.0,
                last_waited: 0.0,
                longest: 0.0,
                work_sum: 0.0,
                weight_bytes: crate::inspect::kernel_weight_bytes(plan, k),
            })
            .collect();
        let mut raw_tasks = Vec::new();
        let mut raw_kernels = Vec::new();
        match mode {
            LaunchMode::Persistent => {
                for i in 0..records {
                    let r = rec(i);
                    let (s, w, e, id) = (r[0], r[1], r[2], r[3]);
                    let task = (id & 0xffff_ffff) as u32;
                    let k = (task >> TASK_TILE_BITS) as usize;
                    if s == 0 || k >= kernels.len() {
                        return Err(IrError::new(
                            ErrorKind::Interp,
                            format!("task record {i} of the persistent trace was not written"),
                        ));
                    }
                    raw_tasks.push(((id >> 32) as u32, k, s, w, e));
                }
            }
            _ => {
                for (i, k) in kernels.iter().enumerate() {
                    let r = rec(i);
                    if r[3] == 0 {
                        return Err(IrError::new(
                            ErrorKind::Interp,
                            format!("kernel {} recorded nothing in the trace", k.name),
                        ));
                    }
                    raw_kernels.push((i, r));
                }
            }
        }
        let t0 = raw_tasks
            .iter()
            .map(|t| t.2)
            .chain(raw_kernels.iter().map(|k| k.1[0]))
            .min()
            .unwrap_or(0);
        let us = |t: u64| t.saturating_sub(t0) as f64 / 1000.0;
        let mut tasks = Vec::new();
        for (sm, k, s, w, e) in raw_tasks {
            let t = TaskSpan {
                sm,
                kernel: k,
                start: us(s),
                waited: us(w),
                end: us(e),
            };
            let ks = &mut kernels[k];
            let work = (t.end - t.waited).max(0.0);
            ks.start = ks.start.min(t.start);
            ks.waited = ks.waited.min(t.waited);
            ks.end = ks.end.max(t.end);
            ks.last_start = ks.last_start.max(t.start);
            ks.last_waited = ks.last_waited.max(t.waited);
            ks.longest = ks.longest.max(work);
            ks.work_sum += work;
            ks.ctas += 1;
            tasks.push(t);
        }
        for (i, r) in raw_kernels {
            let ks = &mut kernels[i];
            ks.start = us(r[0]);
            ks.waited = us(r[1]);
            ks.end = us(r[2]);
            ks.ctas = r[3];
            ks.last_start = us(r[4]);
            ks.last_waited = us(r[5]);
            ks.longest = r[6] as f64 / 1000.0;
            ks.work_sum = r[7] as f64 / 1000.0;
        }
        Ok(Trace {
            mode,
            ms,
            kernels,
            tasks,
        })
    }

    /// The first start and last end of the kernels in `range` (µs).
    fn window(&self, range: &std::ops::Range<usize>) -> (f64, f64) {
        let ks = &self.kernels[range.clone()];
        let lo = ks.iter().map(|k| k.start).fold(f64::INFINITY, f64::min);
        let hi = ks.iter().map(|k| k.end).fold(0.0, f64::max);
        (if lo.is_finite() { lo } else { 0.0 }, hi)
    }

    /// Microseconds in `[lo, hi]` during which some kernel (task) was past
    /// its wait and working.
    fn busy(&self, lo: f64, hi: f64, range: &std::ops::Range<usize>) -> f64 {
        let mut iv: Vec<(f64, f64)> = if self.tasks.is_empty() {
            self.kernels[range.clone()]
                .iter()
                .map(|k| (k.waited, k.end))
                .collect()
        } else {
            self.tasks
                .iter()
                .filter(|t| range.contains(&t.kernel))
                .map(|t| (t.waited, t.end))
                .collect()
        };
        iv.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut total = 0.0;
        let mut cur: Option<(f64, f64)> = None;
        for (a, b) in iv {
            let (a, b) = (a.max(lo), b.min(hi));
            if b <= a {
                continue;
            }
            cur = match cur {
                Some((ca, cb)) if a <= cb => Some((ca, cb.max(b))),
                Some((ca, cb)) => {
                    total += cb - ca;
                    Some((a, b))
                }
                None => Some((a, b)),
            };
        }
        if let Some((a, b)) = cur {
            total += b - a;
        }
        total
    }

    /// The kernels of layer `layer` as a range of plan indices.
    pub fn layer_range(&self, layer: usize) -> Option<std::ops::Range<usize>> {
        let first = self.kernels.iter().position(|k| k.layer == Some(layer))?;
        let last = self.kernels.iter().rposition(|k| k.layer == Some(layer))?;
        Some(first..last + 1)
    }

    /// A text summary of the kernels in `range`: span, busy and idle time,
    /// and per kernel its times, the bandwidth of its weight stream, when its
    /// last CTA passed its wait and how long one CTA works (longest, mean).
    pub fn summary(&self, range: std::ops::Range<usize>) -> String {
        let (lo, hi) = self.window(&range);
        let busy = self.busy(lo, hi, &range);
        let bytes: usize = self.kernels[range.clone()]
            .iter()
            .map(|k| k.weight_bytes)
            .sum();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:?} mode, kernels {}..{}: span {:.1} us, busy {:.1} us ({:.0}%), idle {:.1} us; {} weight bytes, {:.0} GB/s over the span (whole forward: {:.3} ms by events)",
            self.mode,
            range.start,
            range.end,
            hi - lo,
            busy,
            100.0 * busy / (hi - lo).max(1e-9),
            (hi - lo - busy).max(0.0),
            bytes,
            bytes as f64 / ((hi - lo).max(1e-9) * 1e3),
            self.ms
        );
        let _ = writeln!(
            s,
            "  {:<44} {:>9} {:>9} {:>9} {:>8} {:>6} {:>10} {:>7} {:>9} {:>8} {:>8}",
            "kernel",
            "start us",
            "waited",
            "end",
            "work us",
            "CTAs",
            "w. bytes",
            "GB/s",
            "last wait",
            "CTA max",
            "CTA mean"
        );
        for k in &self.kernels[range] {
            let work = (k.end - k.waited).max(0.0);
            let _ = writeln!(
                s,
                "  {:<44} {:>9.2} {:>9.2} {:>9.2} {:>8.2} {:>6} {:>10} {:>7.0} {:>9.2} {:>8.2} {:>8.2}",
                k.name,
                k.start - lo,
                k.waited - lo,
                k.end - lo,
                work,
                k.ctas,
                k.weight_bytes,
                if work > 0.0 {
                    k.weight_bytes as f64 / (work * 1e3)
                } else {
                    0.0
                },
                k.last_waited - lo,
                k.longest,
                k.mean()
            );
        }
        let _ = writeln!(
            s,
            "  (work: the last end minus the first wait; last wait: when the last CTA passed its wait; CTA max and mean: one CTA's end minus its own wait)"
        );
        s
    }

    /// Where the forward's time goes, per step: kernels grouped by their name
    /// without the schedule index (`k241_moe_down_…` and `k250_moe_down_…`
    /// are one step repeated by the layers), with how many there are, the
    /// median and total work (end minus past-the-wait), the median of their
    /// longest CTA's own work, the median gap before them (from the last end
    /// of the kernel before to their first CTA past its wait; "-" for a step
    /// whose only kernel is the forward's first), the median start (from the
    /// same end to their first CTA's start: negative where the CTAs were
    /// resident before the kernel before had ended, so a gap that follows a
    /// late start is the launch's), and the total's share of the forward's
    /// span, largest total first.
    pub fn steps(&self) -> String {
        let mut by: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
        let mut gaps: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
        for (i, k) in self.kernels.iter().enumerate() {
            let step = k.name.split_once('_').map_or(k.name.as_str(), |(_, r)| r);
            by.entry(step)
                .or_default()
                .push(((k.end - k.waited).max(0.0), k.longest));
            if i > 0 {
                let before = self.kernels[i - 1].end;
                gaps.entry(step)
                    .or_default()
                    .push((k.waited - before, k.start - before));
            }
        }
        let (lo, hi) = self.window(&(0..self.kernels.len()));
        let span = (hi - lo).max(1e-9);
        let total = |w: &[(f64, f64)]| -> f64 { w.iter().map(|x| x.0).sum() };
        let mut rows: Vec<(&str, Vec<(f64, f64)>)> = by.into_iter().collect();
        rows.sort_by(|a, b| total(&b.1).total_cmp(&total(&a.1)).then(a.0.cmp(b.0)));
        let mut s = format!(
            "  {:<44} {:>5} {:>10} {:>10} {:>8} {:>7} {:>8} {:>7}\n",
            "step", "count", "median us", "total us", "CTA max", "gap us", "start us", "share"
        );
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        for (step, w) in rows {
            let t = total(&w);
            let (gap, start) = gaps.remove(step).map_or_else(
                || ("-".to_string(), "-".to_string()),
                |g| {
                    (
                        format!("{:.2}", median(g.iter().map(|x| x.0).collect())),
                        format!("{:.2}", median(g.iter().map(|x| x.1).collect())),
                    )
                },
            );
            let _ = writeln!(
                s,
                "  {:<44} {:>5} {:>10.2} {:>10.1} {:>8.2} {:>7} {:>8} {:>6.1}%",
                step,
                w.len(),
                median(w.iter().map(|x| x.0).collect()),
                t,
                median(w.iter().map(|x| x.1).collect()),
                gap,
                start,
                100.0 * t / span
            );
        }
        s
    }

    /// The kernels in `range` drawn as an SVG: time across; one row per
    /// kernel (stream, graph) or per SM (persistent); the light part of a
    /// bar is the wait for inputs, the dark part the work.
    pub fn svg(&self, range: std::ops::Range<usize>, title: &str) -> String {
        let (lo, hi) = self.window(&range);
        let span = (hi - lo).max(1e-3);
        let (left, width, row) = (300.0, 900.0, 14.0);
        let x = |t: f64| left + (t - lo) / span * width;
        let color = |k: usize| {
            let name = &self.kernels[k].name;
            let h = name
                .split_once('_')
                .map(|(_, r)| r)
                .unwrap_or(name)
                .bytes()
                .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
            h % 360
        };
        let mut bars = String::new();
        let mut labels = String::new();
        let rows: usize;
        if self.tasks.is_empty() {
            rows = range.len();
            for (r, k) in range.clone().enumerate() {
                let ks = &self.kernels[k];
                let y = 30.0 + r as f64 * row;
                let hue = color(k);
                let _ = writeln!(
                    bars,
                    "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"hsl({hue},60%,85%)\"/>\n<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"hsl({hue},60%,40%)\"><title>{} {:.2}-{:.2} us</title></rect>",
                    x(ks.start),
                    (x(ks.waited) - x(ks.start)).max(0.5),
                    row - 2.0,
                    x(ks.waited),
                    (x(ks.end) - x(ks.waited)).max(0.5),
                    row - 2.0,
                    ks.name,
                    ks.waited - lo,
                    ks.end - lo,
                );
                let _ = writeln!(
                    labels,
                    "<text x=\"4\" y=\"{:.1}\" font-size=\"10\">{}</text>",
                    y + row - 4.0,
                    ks.name
                );
            }
        } else {
            let sms: BTreeMap<u32, usize> = self
                .tasks
                .iter()
                .map(|t| t.sm)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .enumerate()
                .map(|(i, sm)| (sm, i))
                .collect();
            rows = sms.len();
            let row = 4.0;
            for t in self.tasks.iter().filter(|t| range.contains(&t.kernel)) {
                let y = 30.0 + sms[&t.sm] as f64 * row;
                let hue = color(t.kernel);
                let _ = writeln!(
                    bars,
                    "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"3\" fill=\"hsl({hue},60%,85%)\"/><rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"3\" fill=\"hsl({hue},60%,40%)\"/>",
                    x(t.start),
                    (x(t.waited) - x(t.start)).max(0.3),
                    x(t.waited),
                    (x(t.end) - x(t.waited)).max(0.3),
                );
            }
            let _ = writeln!(
                labels,
                "<text x=\"4\" y=\"44\" font-size=\"11\">one row per SM ({rows} SMs); light: waiting, dark: working</text>"
            );
        }
        let height = 60.0 + rows as f64 * if self.tasks.is_empty() { row } else { 4.0 };
        let busy = self.busy(lo, hi, &range);
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{:.0}\" height=\"{height:.0}\" font-family=\"monospace\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"4\" y=\"16\" font-size=\"12\">{} ({:?}): {:.1} us, busy {:.0}%</text>\n<line x1=\"{left}\" y1=\"24\" x2=\"{:.0}\" y2=\"24\" stroke=\"black\"/>\n<text x=\"{:.0}\" y=\"22\" font-size=\"10\" text-anchor=\"end\">{:.1} us</text>\n{labels}{bars}</svg>\n",
            left + width + 20.0,
            title,
            self.mode,
            span,
            100.0 * busy / span,
            left + width,
            left + width,
            span,
        )
    }
}
