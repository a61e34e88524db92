//! `tilefuse compile` on a built-in model, and a warm start: a second process
//! with the same cache compiles nothing (`TILEFUSE_NO_COMPILE=1` makes any
//! compile an error). Needs NVRTC (the CI installs the pip wheel), no GPU.

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn compile(
    cache: &std::path::Path,
    out: &std::path::Path,
    no_compile: bool,
) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tilefuse"));
    c.args([
        "compile",
        "--preset",
        "qwen3-moe-tiny",
        "--tokens",
        "8",
        "--out",
    ])
    .arg(out)
    .env("TILEFUSE_CACHE_DIR", cache);
    if no_compile {
        c.env("TILEFUSE_NO_COMPILE", "1");
    }
    c.output().unwrap()
}

/// `tilefuse compile ARGS --out` a fresh folder under `dir` (cache in
/// `dir/cache`); returns the summary table it prints.
fn compile_table(dir: &std::path::Path, args: &[&str]) -> String {
    let out = dir.join(format!("out-{}", args.join("-").replace(['/', ','], "_")));
    let o = Command::new(env!("CARGO_BIN_EXE_tilefuse"))
        .arg("compile")
        .args(args)
        .arg("--out")
        .arg(&out)
        .env("TILEFUSE_CACHE_DIR", dir.join("cache"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn compile_writes_every_artifact_and_a_warm_start_compiles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let out = dir.path().join("out");
    // Cold: the cache is empty, so the switch makes the compile fail, naming the kernel source.
    let o = compile(&cache, &out, true);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("TILEFUSE_NO_COMPILE"), "{err}");
    assert!(
        !out.exists(),
        "a failed compile left {} behind",
        out.display()
    );
    let o = compile(&cache, &out, false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("regs") && table.contains("weight bytes per forward"),
        "{table}"
    );
    // Graph mode (the default): no persistent dispatcher row.
    assert!(!table.contains("persistent_dispatch"), "{table}");
    for f in [
        "plan.txt",
        "fused.dot",
        "summary.txt",
        "cuda/module.cu",
        "ptx/module.ptx",
        "ir/01-canonicalize.txt",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    // Warm: a second process, same cache, no compile allowed.
    let o = compile(&cache, &out, true);
    assert!(
        o.status.success(),
        "warm start compiled: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(std::fs::read_to_string(out.join("ptx/module.ptx"))
        .unwrap()
        .contains(".entry"));
}

/// `--mode` picks the plan: at one token Qwen3-30B-A3B's gate/up kernel is
/// cut in 384 tiles of 16 rows for launches one by one, and keeps 192 of 32
/// in the persistent kernel, whose one CTA an SM would run each of the
/// smaller tiles in turn. Plans only (`--emit plan`): no NVRTC.
#[test]
fn compile_plans_for_the_launch_mode_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let up = |mode: &str| {
        let table = compile_table(
            dir.path(),
            &[
                "--preset",
                "qwen3-30b-a3b",
                "--layer",
                "1",
                "--tokens",
                "1",
                "--emit",
                "plan",
                "--mode",
                mode,
            ],
        );
        let row = table
            .lines()
            .find(|l| l.contains("moe_routed_up"))
            .unwrap_or_else(|| panic!("no gate/up kernel: {table}"))
            .to_string();
        row.split_whitespace()
            .skip_while(|w| !w.starts_with("moe_routed_up"))
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(up("graph"), "moe_routed_up_mxfp4_t1_16x2048 384");
    assert_eq!(up("persistent"), "moe_routed_up_mxfp4_t1_32x2048 192");
}

/// In the persistent mode the summary ends with the dispatcher, which runs
/// every kernel's tiles: its registers and spills, one CTA an SM (132
/// tiles), and it is not counted as a kernel. Needs NVRTC.
#[test]
fn compile_for_the_persistent_mode_shows_the_dispatcher() {
    let dir = tempfile::tempdir().unwrap();
    let table = compile_table(
        dir.path(),
        &[
            "--preset",
            "qwen3-moe-tiny",
            "--tokens",
            "1",
            "--mode",
            "persistent",
            "--emit",
            "plan,ptx",
        ],
    );
    let lines: Vec<&str> = table.lines().collect();
    let n = lines.len();
    let cols: Vec<&str> = lines[n - 2].split_whitespace().collect();
    assert_eq!(
        cols[..4],
        ["all", "=", "persistent_dispatch", "132"],
        "{table}"
    );
    // Registers, spills, stack: numbers from ptxas, not "-".
    for c in &cols[6..9] {
        assert!(c.parse::<u32>().is_ok(), "{table}");
    }
    let kernels = lines[1..n - 2].len();
    assert!(
        lines[n - 1].starts_with(&format!("{kernels} kernels,")),
        "{table}"
    );
}
