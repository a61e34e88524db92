//! Runs tilefuse's CUDA tile templates on the CPU, so that a machine without
//! a GPU (CI) checks their logic against the interpreter: `shim.h` emulates
//! the CUDA features they use, [`rewrite`] replaces each inline PTX statement
//! of a header by a call into that emulation, and [`build`] compiles a test
//! program with the host's C++20 compiler. What the emulation cannot check
//! (races, the memory model, timing) stays for the GPU tests and
//! compute-sanitizer.

#![allow(dead_code)] // each test crate uses its own part

use std::path::{Path, PathBuf};
use std::process::Command;

/// The emulation of CUDA (`emu::` and the intrinsics).
pub const SHIM: &str = include_str!("shim.h");

/// What each inline PTX instruction becomes, by a fragment of its text; the
/// variable names are those of the header's helper that holds it. The first
/// rule that matches wins. An instruction no rule names becomes
/// `emu::unsupported`, which aborts the program if it runs.
const RULES: &[(&str, &str)] = &[
    ("mma.sync.aligned.m16n8k16", "emu::mma16816(d, a, b)"),
    (
        "ldmatrix.sync.aligned.m8n8.x4.trans",
        "emu::ldsm(r, 4, true, p)",
    ),
    ("ldmatrix.sync.aligned.m8n8.x4", "emu::ldsm(r, 4, false, p)"),
    (
        "ldmatrix.sync.aligned.m8n8.x2.trans",
        "emu::ldsm(r, 2, true, p)",
    ),
    ("ldmatrix.sync.aligned.m8n8.x2", "emu::ldsm(r, 2, false, p)"),
    ("cp.async.cg.shared.global", "emu::cp_async16(dst, src, ok)"),
    ("cp.async.commit_group", "(void)0"),
    ("cp.async.wait_group", "(void)0"),
    (".v4.u32", "r = *reinterpret_cast<const uint4*>(p)"),
    ("prefetch.global.L2", "(void)0"),
    ("cp.async.bulk.prefetch.L2", "(void)0"),
    ("griddepcontrol", "(void)0"),
    ("prmt.b32", "r = __byte_perm(a, b, sel)"),
];

/// `src` with every `asm(...)` / `asm volatile(...)` statement outside
/// comments and string literals replaced per [`RULES`], and the CUDA
/// headers' includes and NVRTC's hand-made integer typedefs removed (the
/// shim provides them).
pub fn rewrite(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let (mut i, mut copied) = (0usize, 0usize);
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    // Skips a string literal starting at the quote at `j`; returns the index past it.
    let skip_str = |mut j: usize| {
        j += 1;
        while b[j] != b'"' {
            j += if b[j] == b'\\' { 2 } else { 1 };
        }
        j + 1
    };
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i = src[i + 2..].find("*/").map_or(b.len(), |k| i + 2 + k + 2);
            }
            b'"' => i = skip_str(i),
            b'\'' => i += if b.get(i + 1) == Some(&b'\\') { 4 } else { 3 },
            b'a' if src[i..].starts_with("asm")
                && (i == 0 || !ident(b[i - 1]))
                && !ident(*b.get(i + 3).unwrap_or(&b' ')) =>
            {
                let mut j = i + 3;
                let rest = src[j..].trim_start();
                j = src.len() - rest.len();
                if rest.starts_with("volatile") {
                    j += "volatile".len();
                    j = src.len() - src[j..].trim_start().len();
                }
                if b[j] != b'(' {
                    i += 3;
                    continue;
                }
                // The matching parenthesis, past string literals.
                let (start, mut depth) = (i, 0i32);
                loop {
                    match b[j] {
                        b'"' => {
                            j = skip_str(j);
                            continue;
                        }
                        b'(' => depth += 1,
                        b')' => depth -= 1,
                        _ => {}
                    }
                    j += 1;
                    if depth == 0 {
                        break;
                    }
                }
                let stmt = &src[start..j];
                let ptx = stmt
                    .split('"')
                    .nth(1)
                    .unwrap_or("")
                    .replace(['%', '\\'], "");
                let rep = RULES
                    .iter()
                    .find(|(key, _)| stmt.contains(key))
                    .map_or_else(
                        || format!("emu::unsupported(\"{ptx}\")"),
                        |(_, r)| r.to_string(),
                    );
                out.push_str(&src[copied..start]);
                out.push_str(&rep);
                copied = j;
                i = j;
            }
            _ => i += 1,
        }
    }
    out.push_str(&src[copied..]);
    out.replace("#include <cuda_bf16.h>", "")
        .replace("#include <cuda_fp16.h>", "")
        .lines()
        .filter(|l| !(l.starts_with("typedef ") && l.trim_end().ends_with("_t;")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The host C++ compiler: `$CXX`, else `c++`, if it builds C++20 with
/// `<barrier>`. `None` without one: the caller skips, unless
/// `TILEFUSE_REQUIRE_CXX=1` (CI), where it fails.
pub fn compiler(dir: &Path) -> Option<String> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let probe = dir.join("probe.cpp");
    std::fs::write(
        &probe,
        "#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n",
    )
    .ok()?;
    let ok = Command::new(&cxx)
        .args(["-std=c++20", "-pthread", "-o"])
        .arg(dir.join("probe"))
        .arg(&probe)
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(cxx);
    }
    assert!(
        std::env::var("TILEFUSE_REQUIRE_CXX").as_deref() != Ok("1"),
        "TILEFUSE_REQUIRE_CXX=1 but `{cxx}` does not build C++20 with <barrier>: install g++ >= 11 or set CXX"
    );
    None
}

/// Writes the rewritten headers, the shim, `extra` files and `main.cpp`
/// into `dir` and builds `dir/main` with `cxx`.
pub fn build(cxx: &str, dir: &Path, extra: &[(&str, &str)], main: &str) -> PathBuf {
    for (name, text) in tilefuse_codegen::cuda::HEADERS {
        std::fs::write(dir.join(name), rewrite(text)).unwrap();
    }
    std::fs::write(dir.join("shim.h"), SHIM).unwrap();
    for (name, text) in extra {
        std::fs::write(dir.join(name), text).unwrap();
    }
    std::fs::write(dir.join("main.cpp"), main).unwrap();
    let exe = dir.join("main");
    let o = Command::new(cxx)
        .args([
            "-std=c++20",
            "-O1",
            "-ffp-contract=off",
            "-pthread",
            "-w",
            "-o",
        ])
        .arg(&exe)
        .arg(dir.join("main.cpp"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "host build failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    exe
}
