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
