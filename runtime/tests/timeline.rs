//! The timeline of a traced forward, from the words the kernels write: per
//! kernel (stream, graph) and per task (persistent), busy and idle time, the
//! layer a kernel belongs to, and an unwritten record refused.

#![allow(clippy::unwrap_used)]

use tilefuse_codegen::lower::{TASK_TILE_BITS, TRACE_KERNEL_WORDS, TRACE_TASK_WORDS};
use tilefuse_codegen::passes::run_pipeline;
use tilefuse_codegen::plan::{Plan, PlanOptions};
use tilefuse_model::presets;
use tilefuse_runtime::timeline::Trace;
use tilefuse_runtime::LaunchMode;

fn plan() -> Plan {
    let p = presets::by_name("qwen3-moe-tiny").unwrap();
    let g = p.arch.forward_graph(&p.options).unwrap();
    Plan::new(run_pipeline(g).unwrap(), PlanOptions::new(1)).unwrap()
}

#[test]
fn kernel_records_give_spans_and_idle_time() {
    let plan = plan();
    let n = plan.kernels.len();
    // Kernel i: starts at 10 µs·i (ns since an arbitrary epoch), passes its
    // wait 2 µs later, works 5 µs: 3 µs of every 10 no kernel works. Its
    // last CTA starts 1 µs and passes its wait 3 µs after the first; the
    // longest CTA works 4 µs, the three together 9 µs.
    let t0 = 1_000_000_000u64;
    let mut words = Vec::new();
    for i in 0..n as u64 {
        words.extend([
            t0 + 10_000 * i,
            t0 + 10_000 * i + 2_000,
            t0 + 10_000 * i + 7_000,
            3,
            t0 + 10_000 * i + 1_000,
            t0 + 10_000 * i + 5_000,
            4_000,
            9_000,
        ]);
    }
    assert_eq!(words.len(), TRACE_KERNEL_WORDS * n);
    let tr = Trace::from_words(&plan, LaunchMode::Graph, n, &words, 1.0).unwrap();
    assert_eq!(tr.kernels.len(), n);
    let k1 = &tr.kernels[1];
    assert!((k1.start - 10.0).abs() < 1e-9);
    assert!((k1.waited - 12.0).abs() < 1e-9);
    assert!((k1.end - 17.0).abs() < 1e-9);
    assert!((k1.last_start - 11.0).abs() < 1e-9);
    assert!((k1.last_waited - 15.0).abs() < 1e-9);
    assert!((k1.longest - 4.0).abs() < 1e-9);
    assert!((k1.mean() - 3.0).abs() < 1e-9);
    let s = tr.summary(0..n);
    let span = 10.0 * (n - 1) as f64 + 7.0;
    let busy = 5.0 * n as f64;
    assert!(
        s.contains(&format!("span {span:.1} us, busy {busy:.1} us")),
        "{s}"
    );
    assert!(s.contains(&format!("idle {:.1} us", span - busy)), "{s}");
    // Kernel 1's row ends with its last wait (from the window's start), its
    // longest and its mean CTA.
    let row = s.lines().find(|l| l.contains(&k1.name)).unwrap();
    assert!(row.trim_end().ends_with("15.00     4.00     3.00"), "{row}");
    // Layers: every kernel of layer 0 comes before every kernel of layer 1.
    let l0 = tr.layer_range(0).unwrap();
    let l1 = tr.layer_range(1).unwrap();
    assert!(l0.end <= l1.start, "{l0:?} {l1:?}");
    let svg = tr.svg(l1.clone(), "layer 1");
    assert!(svg.starts_with("<svg") && svg.contains(&tr.kernels[l1.start].name));
    // A kernel that wrote no record is an error, not a zero-length bar.
    words[TRACE_KERNEL_WORDS * (n - 1) + 3] = 0;
    let e = Trace::from_words(&plan, LaunchMode::Graph, n, &words, 1.0).unwrap_err();
    assert!(e.to_string().contains(&plan.kernels[n - 1].name), "{e}");
}

#[test]
fn task_records_fold_into_kernels_and_sms() {
    let plan = plan();
    let mut words = Vec::new();
    let mut tasks = 0usize;
    let t0 = 5_000u64;
    for (k, kernel) in plan.kernels.iter().enumerate() {
        for tile in 0..kernel.tiling.tiles {
            let task = ((k as u64) << TASK_TILE_BITS) | u64::from(tile);
            let sm = (tasks % 4) as u64;
            let s = t0 + 1_000 * tasks as u64;
            words.extend([s, s + 100, s + 900, (sm << 32) | task]);
            tasks += 1;
        }
    }
    assert_eq!(words.len(), TRACE_TASK_WORDS * tasks);
    let tr = Trace::from_words(&plan, LaunchMode::Persistent, tasks, &words, 1.0).unwrap();
    assert_eq!(tr.tasks.len(), tasks);
    // Every task works 0.8 µs; a kernel's last task passes its wait 1 µs per
    // task after its first.
    for (k, kernel) in plan.kernels.iter().enumerate() {
        let ks = &tr.kernels[k];
        assert!((ks.longest - 0.8).abs() < 1e-9 && (ks.mean() - 0.8).abs() < 1e-9);
        let spread = f64::from(kernel.tiling.tiles - 1);
        assert!((ks.last_waited - ks.waited - spread).abs() < 1e-9);
        assert!((ks.last_start - ks.start - spread).abs() < 1e-9);
    }
    let ctas: u64 = tr.kernels.iter().map(|k| k.ctas).sum();
    assert_eq!(ctas as usize, tasks);
    for (k, kernel) in plan.kernels.iter().enumerate() {
        assert_eq!(tr.kernels[k].ctas, u64::from(kernel.tiling.tiles));
    }
    assert!(tr.svg(0..plan.kernels.len(), "all").contains("4 SMs"));
    // An unwritten task record is refused.
    words[0] = 0;
    assert!(Trace::from_words(&plan, LaunchMode::Persistent, tasks, &words, 1.0).is_err());
}

#[test]
fn steps_group_kernels_by_name_over_the_layers() {
    let plan = plan();
    let n = plan.kernels.len();
    // Kernel i works i + 1 µs, back to back.
    let mut words = Vec::new();
    let mut t = 1_000_000u64;
    for i in 0..n as u64 {
        let w = 1_000 * (i + 1);
        words.extend([t, t, t + w, 1, t, t, w, w]);
        t += 1_000 * (i + 1);
    }
    let tr = Trace::from_words(&plan, LaunchMode::Stream, n, &words, 1.0).unwrap();
    let s = tr.steps();
    // Every step appears once, with the count of kernels of that name.
    let mut names: std::collections::BTreeMap<&str, usize> = Default::default();
    for k in &plan.kernels {
        *names.entry(k.name.split_once('_').unwrap().1).or_default() += 1;
    }
    for (name, count) in &names {
        let line = s
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} missing from\n{s}"));
        assert_eq!(
            line.split_whitespace().nth(1),
            Some(count.to_string().as_str()),
            "{line}"
        );
    }
    // Shares add up to the whole span: the kernels run back to back.
    let share: f64 = s
        .lines()
        .skip(1)
        .map(|l| {
            l.split_whitespace()
                .last()
                .unwrap()
                .trim_end_matches('%')
                .parse::<f64>()
                .unwrap()
        })
        .sum();
    assert!(
        (share - 100.0).abs() < 0.1 * names.len() as f64,
        "{share}\n{s}"
    );
    // Largest total first.
    let totals: Vec<f64> = s
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().nth(3).unwrap().parse::<f64>().unwrap())
        .collect();
    assert!(totals.windows(2).all(|w| w[0] >= w[1]), "{s}");
}

#[test]
fn steps_give_the_gap_before_each_wait() {
    let plan = plan();
    let n = plan.kernels.len();
    // Each step gets its own gap before its kernels' waits: 0.2 µs times
    // one more than its place among the step names, and its own start: 0.1 µs
    // times that number before the kernel before ends (launched early), so
    // its wait minus its own start is not the gap.
    let step = |i: usize| plan.kernels[i].name.split_once('_').unwrap().1;
    let mut names: Vec<&str> = (0..n).map(step).collect();
    names.sort_unstable();
    names.dedup();
    let place = |i: usize| names.iter().position(|&s| s == step(i)).unwrap() as u64 + 1;
    let gap_ns = |i: usize| 200 * place(i);
    let early_ns = |i: usize| 100 * place(i);
    let mut words = Vec::new();
    let mut t = 1_000_000u64;
    for i in 0..n {
        let (start, waited) = if i > 0 {
            (t - early_ns(i), t + gap_ns(i))
        } else {
            (t, t)
        };
        words.extend([
            start,
            waited,
            waited + 1_000,
            1,
            start,
            waited,
            1_000,
            1_000,
        ]);
        t = waited + 1_000;
    }
    let tr = Trace::from_words(&plan, LaunchMode::Stream, n, &words, 1.0).unwrap();
    let s = tr.steps();
    let header = s.lines().next().unwrap();
    assert!(
        header.contains("gap us") && header.contains("start us"),
        "{s}"
    );
    for name in &names {
        let line = s
            .lines()
            .find(|l| l.split_whitespace().next() == Some(*name))
            .unwrap_or_else(|| panic!("{name} missing from\n{s}"));
        let gap = line.split_whitespace().nth(5).unwrap();
        let start = line.split_whitespace().nth(6).unwrap();
        let only_first = (0..n).filter(|&i| step(i) == *name).all(|i| i == 0);
        if only_first {
            assert_eq!((gap, start), ("-", "-"), "{line}");
        } else {
            let i = (1..n).find(|&i| step(i) == *name).unwrap();
            assert_eq!(gap, format!("{:.2}", gap_ns(i) as f64 / 1e3), "{line}");
            assert_eq!(
                start,
                format!("{:.2}", -(early_ns(i) as f64) / 1e3),
                "{line}"
            );
        }
    }
}
