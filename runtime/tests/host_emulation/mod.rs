//! Runs tilefuse's CUDA tile templates on the CPU, so that a machine without
//! a GPU (CI) checks their logic against the interpreter: `shim.h` emulates
//! the CUDA features they use, [`rewrite`] replaces each inline PTX statement
//! of a header by a call into that emulation, and [`build`] compiles a test
//! program with the host's C++20 compiler. What the emulation cannot check
//! (races, the memory model, timing) stays for the GPU tests and
//! compute-sanitizer.

#![allow(dead_code)] // each test crate uses its own part

use std::fmt::Write as _;
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
    ("prmt.b32", "r = emu::prmt(a, b, sel)"),
    ("mul.rn.bf16x2", "r = emu::hmul2_bf16(a, b)"),
    ("no_allocate.u8", "r = *reinterpret_cast<const uint8_t*>(p)"),
    (
        "no_allocate.u16",
        "r = *reinterpret_cast<const uint16_t*>(p)",
    ),
    (
        "ld.global.cg.s32",
        "r = *reinterpret_cast<const volatile int*>(p)",
    ),
    ("globaltimer", "t = 0"),
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
fn compiler(dir: &Path) -> Option<String> {
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

/// Writes the rewritten headers, the shim and `main.cpp` into `dir` and
/// builds `dir/main` with `cxx`.
fn build(cxx: &str, dir: &Path, main: &str) -> PathBuf {
    for (name, text) in tilefuse_codegen::cuda::HEADERS {
        std::fs::write(dir.join(name), rewrite(text)).unwrap();
    }
    std::fs::write(dir.join("shim.h"), SHIM).unwrap();
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

/// The `extern "C" __global__` kernels of a test program's source, in
/// order: name and parameter types (`const tf::bf16*`, `int`, `float`, ...).
fn kernels_of(src: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find("extern \"C\" __global__") {
        rest = &rest[i..];
        let open = rest.find('(').unwrap();
        // Past `__launch_bounds__(...)`, the name and its parameter list.
        let (head, params) = {
            let lb = &rest[..open];
            let after = if lb.contains("__launch_bounds__") {
                let close = rest[open..].find(')').unwrap() + open + 1;
                &rest[close..]
            } else {
                &rest[lb.rfind("void").unwrap()..]
            };
            let p_open = after.find('(').unwrap();
            let p_close = after[p_open..].find(')').unwrap() + p_open;
            (
                after[..p_open].to_string(),
                after[p_open + 1..p_close].to_string(),
            )
        };
        let name = head.split_whitespace().last().unwrap().to_string();
        let types = params
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                let cut = p
                    .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .map_or(0, |k| k + 1);
                p[..cut].trim().to_string()
            })
            .collect();
        out.push((name, types));
        rest = &rest[open..];
    }
    out
}

/// A test program of `extern "C" __global__` wrappers (the source a GPU test
/// loads with NVRTC), built for the host: each kernel runs its grid one CTA
/// at a time under the emulation, on buffers a [`Batch`] lays out.
pub struct HostProgram {
    _dir: tempfile::TempDir,
    exe: PathBuf,
    kernels: Vec<String>,
}

impl HostProgram {
    /// Builds `src` (its `#include`s of the CUDA headers resolved to their
    /// rewritten copies). `None` without a C++20 compiler (the caller skips).
    pub fn build(src: &str) -> Option<HostProgram> {
        let dir = tempfile::tempdir().unwrap();
        let cxx = compiler(dir.path())?;
        let kernels = kernels_of(src);
        let body = rewrite(src).replace(
            "extern __shared__ __align__(16) char smem[];",
            "char* smem = emu::cta_smem();",
        );
        let mut main = format!(
            "#include <type_traits>\n#include \"shim.h\"\n{body}\n\
             struct HArg {{ uint32_t tag, buf; uint64_t v; }};\n\
             static std::vector<char*> g_bufs;\n\
             template <class T> T host_arg(const HArg& a) {{\n\
             \x20 if constexpr (std::is_pointer_v<T>) return a.tag == 1 ? nullptr : reinterpret_cast<T>(g_bufs[a.buf] + a.v);\n\
             \x20 else if constexpr (std::is_same_v<T, float>) {{ float f; uint32_t u = (uint32_t)a.v; memcpy(&f, &u, 4); return f; }}\n\
             \x20 else return (T)(int32_t)(uint32_t)a.v;\n}}\n\
             template <class T> static void rd(FILE* f, T* p, size_t n) {{ if (fread(p, sizeof(T), n, f) != n) exit(3); }}\n\
             int main(int argc, char** argv) {{\n\
             \x20 if (argc != 3) return 2;\n\
             \x20 FILE* f = fopen(argv[1], \"rb\");\n\
             \x20 uint32_t nb; rd(f, &nb, 1);\n\
             \x20 std::vector<std::vector<uint4>> store(nb); std::vector<uint64_t> len(nb);\n\
             \x20 for (uint32_t i = 0; i < nb; ++i) {{ rd(f, &len[i], 1); store[i].assign(len[i] / 16 + 17, uint4{{0, 0, 0, 0}});\n\
             \x20   g_bufs.push_back(reinterpret_cast<char*>(store[i].data())); rd(f, g_bufs[i], len[i]); }}\n\
             \x20 uint32_t nl; rd(f, &nl, 1);\n\
             \x20 for (uint32_t l = 0; l < nl; ++l) {{\n\
             \x20   uint32_t h[5]; rd(f, h, 5); std::vector<HArg> a(h[4]); rd(f, a.data(), h[4]);\n\
             \x20   switch (h[0]) {{\n"
        );
        for (i, (name, types)) in kernels.iter().enumerate() {
            let args: Vec<String> = types
                .iter()
                .enumerate()
                .map(|(j, t)| format!("host_arg<{t}>(a[{j}])"))
                .collect();
            writeln!(
                main,
                "    case {i}: for (uint32_t b = 0; b < h[1]; ++b) emu::run_cta(b, h[2], [&] {{ {name}({}); }}, h[3]); break;",
                args.join(", ")
            )
            .unwrap();
        }
        main.push_str(
            "    default: return 4;\n    }\n  }\n  fclose(f);\n\
             \x20 FILE* o = fopen(argv[2], \"wb\");\n\
             \x20 for (uint32_t i = 0; i < nb; ++i) fwrite(g_bufs[i], 1, len[i], o);\n\
             \x20 fclose(o);\n  return 0;\n}\n",
        );
        let exe = build(&cxx, dir.path(), &main);
        Some(HostProgram {
            _dir: dir,
            exe,
            kernels: kernels.into_iter().map(|(n, _)| n).collect(),
        })
    }

    /// The index of kernel `name`.
    pub fn kernel(&self, name: &str) -> usize {
        self.kernels
            .iter()
            .position(|k| k == name)
            .unwrap_or_else(|| panic!("no kernel {name} in the host program"))
    }
}

/// A kernel argument of a [`Batch`] launch.
#[derive(Clone, Copy, Debug)]
pub enum HArg {
    /// Buffer `.0` at byte offset `.1`.
    Buf(usize, u64),
    Null,
    I32(i32),
    F32(f32),
}

/// Buffers (their initial bytes) and the launches that run on them in order;
/// [`Batch::run`] returns every buffer's bytes after the last launch.
#[derive(Default)]
pub struct Batch {
    bufs: Vec<Vec<u8>>,
    launches: Vec<(usize, [u32; 3], Vec<HArg>)>,
}

impl Batch {
    /// A buffer holding `bytes`; returns its index.
    pub fn buffer(&mut self, bytes: Vec<u8>) -> usize {
        self.bufs.push(bytes);
        self.bufs.len() - 1
    }

    /// Runs `kernel` over `grid` CTAs of `threads` with `smem` bytes of
    /// dynamic shared memory.
    pub fn launch(&mut self, kernel: usize, grid: u32, threads: u32, smem: u32, args: Vec<HArg>) {
        self.launches.push((kernel, [grid, threads, smem], args));
    }

    pub fn run(&self, p: &HostProgram) -> Vec<Vec<u8>> {
        let mut s = Vec::new();
        s.extend((self.bufs.len() as u32).to_le_bytes());
        for b in &self.bufs {
            s.extend((b.len() as u64).to_le_bytes());
            s.extend(b);
        }
        s.extend((self.launches.len() as u32).to_le_bytes());
        for (k, [g, t, m], args) in &self.launches {
            for x in [*k as u32, *g, *t, *m, args.len() as u32] {
                s.extend(x.to_le_bytes());
            }
            for a in args {
                let (tag, buf, v) = match *a {
                    HArg::Buf(b, off) => (0u32, b as u32, off),
                    HArg::Null => (1, 0, 0),
                    HArg::I32(x) => (2, 0, u64::from(x as u32)),
                    HArg::F32(x) => (3, 0, u64::from(x.to_bits())),
                };
                s.extend(tag.to_le_bytes());
                s.extend(buf.to_le_bytes());
                s.extend(v.to_le_bytes());
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let (inp, outp) = (dir.path().join("in.bin"), dir.path().join("out.bin"));
        std::fs::write(&inp, s).unwrap();
        let o = Command::new(&p.exe).arg(&inp).arg(&outp).output().unwrap();
        assert!(
            o.status.success(),
            "host program failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        let raw = std::fs::read(&outp).unwrap();
        let mut out = Vec::with_capacity(self.bufs.len());
        let mut at = 0;
        for b in &self.bufs {
            out.push(raw[at..at + b.len()].to_vec());
            at += b.len();
        }
        out
    }
}
