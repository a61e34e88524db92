//! Run-time compilation of generated CUDA C++ with NVRTC, and its on-disk cache.
//!
//! NVRTC (`libnvrtc.so.13`) and the CUDA headers are found, in order, under
//! `$CUDA_HOME`, `$CUDA_PATH`, `/usr/local/cuda` and the folders of the pip
//! wheel `nvidia-cuda-nvrtc` (`site-packages/nvidia/cu13`, named by
//! `$TILEFUSE_CUDA_WHEEL` or found through `python3`). The library is opened
//! by its full path before cudarc opens it by name, so no `LD_LIBRARY_PATH`
//! is needed. No GPU is needed to compile.
//!
//! Compiled cubins (with their PTX and log) are cached on disk under `$TILEFUSE_CACHE_DIR` (default
//! `$XDG_CACHE_HOME/tilefuse` or `~/.cache/tilefuse`), keyed by a SHA-256 of
//! the source, the headers, the options and the NVRTC version. Setting
//! `TILEFUSE_NO_COMPILE=1` makes any compile that misses the cache an error,
//! which proves that a warm start compiles nothing.
//!
//! One entry is one file, `KEY.entry` ([`CACHE_MAGIC`], the byte lengths of
//! the log, the PTX and the cubin, a SHA-256 of lengths and contents, then
//! the three contents). It is written under a temporary name in the same
//! folder and renamed into place, so a reader sees a whole entry or none;
//! and it is verified before use, so an entry damaged anyway (a full disk, a
//! crash before the data reached the disk, an edit) is reported, removed and
//! recompiled, never loaded.

use std::ffi::{c_char, CStr, CString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use cudarc::nvrtc::sys;
use sha2::{Digest, Sha256};

/// Where the CUDA toolkit pieces NVRTC needs were found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaPaths {
    /// Folder holding `cuda_bf16.h` and friends.
    pub include: PathBuf,
    /// Folder holding `libnvrtc.so.13`.
    pub lib: PathBuf,
}

/// Why a compile failed.
#[derive(Clone, Debug)]
pub enum CompileError {
    /// NVRTC or the CUDA headers could not be found or loaded.
    Setup(String),
    /// NVRTC rejected the source.
    Source {
        /// The kernel (program) name.
        name: String,
        /// NVRTC's log.
        log: String,
        /// The options passed.
        options: Vec<String>,
        /// The source with line numbers.
        numbered_source: String,
    },
    /// `TILEFUSE_NO_COMPILE` is set and the cubin was not cached.
    Forbidden(String),
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CompileError::Setup(m) => f.write_str(m),
            CompileError::Forbidden(name) => write!(
                f,
                "kernel source `{name}` is not in the compile cache and TILEFUSE_NO_COMPILE is set"
            ),
            CompileError::Source {
                name,
                log,
                options,
                numbered_source,
            } => write!(
                f,
                "NVRTC failed to compile `{name}`\n--- log ---\n{}\n--- options ---\n{}\n--- source ---\n{numbered_source}",
                log.trim_end(),
                options.join(" ")
            ),
        }
    }
}

impl std::error::Error for CompileError {}

/// Registers, spills and shared memory of one kernel, from the ptxas report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    /// The (mangled or `extern "C"`) kernel name.
    pub name: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of spill stores.
    pub spill_stores: u32,
    /// Bytes of spill loads.
    pub spill_loads: u32,
    /// Stack frame bytes.
    pub stack_frame: u32,
    /// Static shared memory bytes.
    pub shared: u32,
}

/// A compiled program.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// Machine code for the target arch.
    pub cubin: Vec<u8>,
    /// PTX.
    pub ptx: String,
    /// NVRTC's log, with the ptxas resource report.
    pub log: String,
    /// Parsed resource usage per kernel.
    pub resources: Vec<KernelResources>,
    /// True when served from the disk cache.
    pub cached: bool,
}

/// Options of one compile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileOptions {
    /// Target, e.g. `sm_90a`.
    pub arch: String,
    /// Emit line info for profilers and sanitizers.
    pub line_info: bool,
    /// Extra NVRTC options.
    pub extra: Vec<String>,
}

impl Default for CompileOptions {
    fn default() -> CompileOptions {
        CompileOptions {
            arch: "sm_90a".into(),
            line_info: true,
            extra: vec![],
        }
    }
}

static COMPILES: AtomicUsize = AtomicUsize::new(0);

/// NVRTC compiles done by this process (cache hits not counted).
pub fn compile_count() -> usize {
    COMPILES.load(Ordering::SeqCst)
}

fn has_nvrtc(dir: &Path) -> bool {
    dir.join("libnvrtc.so.13").exists()
}

fn candidates() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH", "TILEFUSE_CUDA_WHEEL"] {
        if let Some(v) = std::env::var_os(var) {
            roots.push(PathBuf::from(v));
        }
    }
    roots.push(PathBuf::from("/usr/local/cuda"));
    // The pip wheels: ask python where the `nvidia` namespace package lives.
    if let Ok(out) = std::process::Command::new("python3")
        .args([
            "-c",
            "import nvidia, os; print('\\n'.join(os.path.join(p, 'cu13') for p in nvidia.__path__))",
        ])
        .output()
    {
        if out.status.success() {
            for l in String::from_utf8_lossy(&out.stdout).lines() {
                roots.push(PathBuf::from(l.trim()));
            }
        }
    }
    roots
}

/// Finds the CUDA include folder and NVRTC library; the error says what to install.
pub fn find_cuda() -> Result<CudaPaths, CompileError> {
    let roots = candidates();
    for root in &roots {
        let include = root.join("include");
        if !include.join("cuda_bf16.h").exists() {
            continue;
        }
        for lib in [
            root.join("lib64"),
            root.join("lib"),
            root.join("targets/x86_64-linux/lib"),
        ] {
            if has_nvrtc(&lib) {
                return Ok(CudaPaths { include, lib });
            }
        }
    }
    let tried: Vec<String> = roots.iter().map(|p| p.display().to_string()).collect();
    Err(CompileError::Setup(format!(
        "NVRTC 13 (libnvrtc.so.13) and the CUDA headers were not found (looked under: {}). \
         Install the CUDA 13 toolkit and set CUDA_HOME, or `pip install nvidia-cuda-nvrtc==13.0.88 \
         nvidia-cuda-runtime==13.0.96` and set TILEFUSE_CUDA_WHEEL to the wheel's nvidia/cu13 folder",
        tried.join(", ")
    )))
}

struct Nvrtc {
    paths: CudaPaths,
    version: (i32, i32),
    // Keeps the libraries mapped so cudarc's open-by-name finds them.
    _libs: Vec<libloading::Library>,
}

fn nvrtc() -> Result<&'static Nvrtc, CompileError> {
    static NVRTC: OnceLock<Result<Nvrtc, CompileError>> = OnceLock::new();
    NVRTC
        .get_or_init(|| {
            let paths = find_cuda()?;
            let mut libs = Vec::new();
            // The builtins first: libnvrtc opens them by name when it compiles.
            let builtins = std::fs::read_dir(&paths.lib)
                .map_err(|e| {
                    CompileError::Setup(format!("cannot read {}: {e}", paths.lib.display()))
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("libnvrtc-builtins.so"))
                })
                .min();
            for path in builtins
                .into_iter()
                .chain([paths.lib.join("libnvrtc.so.13")])
            {
                // SAFETY: loading NVIDIA's NVRTC shared libraries, whose initialisers have no
                // preconditions; the handles live for the whole process in this static.
                let lib = unsafe { libloading::Library::new(&path) }.map_err(|e| {
                    CompileError::Setup(format!("cannot load {}: {e}", path.display()))
                })?;
                libs.push(lib);
            }
            let (mut major, mut minor) = (0, 0);
            // SAFETY: the library is loaded; the out-pointers are valid for writes.
            let r = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
            if r != sys::nvrtcResult::NVRTC_SUCCESS {
                return Err(CompileError::Setup(format!("nvrtcVersion failed: {r:?}")));
            }
            Ok(Nvrtc {
                paths,
                version: (major, minor),
                _libs: libs,
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The NVRTC version found, as `(major, minor)`.
pub fn version() -> Result<(i32, i32), CompileError> {
    Ok(nvrtc()?.version)
}

/// The CUDA paths in use.
pub fn paths() -> Result<CudaPaths, CompileError> {
    Ok(nvrtc()?.paths.clone())
}

/// The source with 1-based line numbers, for error messages.
pub fn numbered(source: &str) -> String {
    source
        .lines()
        .enumerate()
        .map(|(i, l)| format!("{:>5} | {l}", i + 1))
        .collect::<Vec<_>>()
        .join("\n")
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("TILEFUSE_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("tilefuse"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/tilefuse"))
}

fn all_options(opts: &CompileOptions, include: &Path) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={}", opts.arch),
        "--std=c++17".to_string(),
        format!("--include-path={}", include.display()),
        "-Xptxas=-v".to_string(),
        "--device-as-default-execution-space".to_string(),
    ];
    if opts.line_info {
        o.push("--generate-line-info".into());
    }
    o.extend(opts.extra.iter().cloned());
    o
}

/// Parses the `ptxas info` lines of an NVRTC log. A kernel's stack frame and
/// spills are those of the `Function properties for <kernel>` line; ptxas
/// also prints properties of the device functions it compiled on their own
/// (`__internal_accurate_pow`, non-inlined calls), which are not the kernel's.
pub fn parse_resources(log: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    let num_before = |line: &str, unit: &str| -> u32 {
        line.find(unit)
            .and_then(|i| line[..i].split_whitespace().last())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    // Whose properties the next "bytes stack frame" line gives.
    let mut properties_of = String::new();
    for line in log.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(KernelResources {
                name,
                ..KernelResources::default()
            });
        } else if let Some(i) = line.find("Function properties for ") {
            properties_of = line[i + "Function properties for ".len()..]
                .trim()
                .to_string();
        } else if let Some(k) = out.last_mut() {
            if line.contains("bytes stack frame") {
                if properties_of != k.name {
                    continue;
                }
                k.stack_frame = num_before(line, "bytes stack frame");
                k.spill_stores = num_before(line, "bytes spill stores");
                k.spill_loads = num_before(line, "bytes spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                k.registers = num_before(line, "registers");
                k.shared = num_before(line, "bytes smem");
            }
        }
    }
    out
}

/// Compiles `source` (which may `#include` any of `headers`) to a cubin, from the
/// disk cache when the same source, headers, options and NVRTC were seen before.
pub fn compile(
    name: &str,
    source: &str,
    headers: &[(&str, &str)],
    opts: &CompileOptions,
) -> Result<Compiled, CompileError> {
    let nv = nvrtc()?;
    let options = all_options(opts, &nv.paths.include);
    let mut h = Sha256::new();
    for part in [source.as_bytes(), b"\0"] {
        h.update(part);
    }
    for (n, s) in headers {
        h.update(n.as_bytes());
        h.update(b"\0");
        h.update(s.as_bytes());
        h.update(b"\0");
    }
    for o in &options {
        h.update(o.as_bytes());
        h.update(b"\0");
    }
    h.update(format!("nvrtc {}.{}", nv.version.0, nv.version.1).as_bytes());
    let key: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let dir = cache_dir();
    if let Some(d) = &dir {
        let path = d.join(format!("{key}.entry"));
        match read_entry(&path) {
            Ok(Some((log, ptx, cubin))) => {
                return Ok(Compiled {
                    cubin,
                    ptx,
                    resources: parse_resources(&log),
                    log,
                    cached: true,
                });
            }
            Ok(None) => {}
            Err(why) => {
                eprintln!(
                    "warning: the compile cache entry {} is damaged ({why}); removing it and compiling `{name}` again",
                    path.display()
                );
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    if std::env::var_os("TILEFUSE_NO_COMPILE").is_some_and(|v| !v.is_empty() && v != "0") {
        return Err(CompileError::Forbidden(name.to_string()));
    }
    let compiled = compile_uncached(name, source, headers, &options)?;
    COMPILES.fetch_add(1, Ordering::SeqCst);
    if let Some(d) = &dir {
        // A cache that cannot be written only costs a compile next time.
        if let Err(e) = write_entry(d, &key, &compiled) {
            eprintln!(
                "warning: cannot write the compile cache entry of `{name}` in {}: {e}",
                d.display()
            );
        }
    }
    Ok(compiled)
}

/// The first bytes of a compile cache entry (the format's version).
pub const CACHE_MAGIC: &[u8; 8] = b"TFNVRTC1";

/// Bytes before the contents: magic, three `u64` lengths, a SHA-256.
const ENTRY_HEAD: usize = 8 + 3 * 8 + 32;

/// The SHA-256 that guards an entry: over the three lengths and contents.
fn entry_digest(lens: &[u8], parts: [&[u8]; 3]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(lens);
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// Encodes an entry (see the module docs).
pub fn encode_entry(log: &str, ptx: &str, cubin: &[u8]) -> Vec<u8> {
    let parts = [log.as_bytes(), ptx.as_bytes(), cubin];
    let lens: Vec<u8> = parts
        .iter()
        .flat_map(|p| (p.len() as u64).to_le_bytes())
        .collect();
    let mut out = Vec::with_capacity(ENTRY_HEAD + parts.iter().map(|p| p.len()).sum::<usize>());
    out.extend_from_slice(CACHE_MAGIC);
    out.extend_from_slice(&lens);
    out.extend_from_slice(&entry_digest(&lens, parts));
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

/// Decodes and verifies an entry: `(log, ptx, cubin)`, or why it is damaged.
pub fn decode_entry(bytes: &[u8]) -> Result<(String, String, Vec<u8>), String> {
    if bytes.len() < ENTRY_HEAD {
        return Err(format!(
            "{} bytes, shorter than the {ENTRY_HEAD}-byte header",
            bytes.len()
        ));
    }
    if &bytes[..8] != CACHE_MAGIC {
        return Err("it does not start with the entry magic".into());
    }
    let lens = &bytes[8..32];
    let len = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&lens[i * 8..i * 8 + 8]);
        u64::from_le_bytes(b)
    };
    // Invariant once checked: the three lengths add up to exactly what
    // follows the header (checked addition: a length may be any u64).
    let body = (bytes.len() - ENTRY_HEAD) as u64;
    let total = len(0)
        .checked_add(len(1))
        .and_then(|t| t.checked_add(len(2)));
    if total != Some(body) {
        return Err(format!(
            "its header announces {} + {} + {} bytes but {body} follow (truncated?)",
            len(0),
            len(1),
            len(2)
        ));
    }
    let (a, b) = (len(0) as usize, len(1) as usize);
    let body = &bytes[ENTRY_HEAD..];
    let parts = [&body[..a], &body[a..a + b], &body[a + b..]];
    if entry_digest(lens, parts)[..] != bytes[32..ENTRY_HEAD] {
        return Err("its contents do not match the SHA-256 in its header".into());
    }
    let text = |p: &[u8], what: &str| {
        String::from_utf8(p.to_vec()).map_err(|_| format!("its {what} is not UTF-8"))
    };
    Ok((
        text(parts[0], "log")?,
        text(parts[1], "PTX")?,
        parts[2].to_vec(),
    ))
}

/// Reads the entry at `path`: `None` when there is none, an error naming
/// the damage when it cannot be used.
fn read_entry(path: &Path) -> Result<Option<(String, String, Vec<u8>)>, String> {
    match std::fs::read(path) {
        Ok(bytes) => decode_entry(&bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("unreadable: {e}")),
    }
}

/// Temporary names of entries being written by this process.
static TMP_SEQ: AtomicUsize = AtomicUsize::new(0);

/// Writes the entry of `key` to a temporary file in `dir`, flushes it and
/// renames it to `KEY.entry`.
fn write_entry(dir: &Path, key: &str, c: &Compiled) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{key}.entry.tmp-{}-{}",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&encode_entry(&c.log, &c.ptx, &c.cubin))?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(format!("{key}.entry")))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn cstring(s: &str, what: &str) -> Result<CString, CompileError> {
    CString::new(s).map_err(|_| CompileError::Setup(format!("{what} contains a NUL byte")))
}

fn compile_uncached(
    name: &str,
    source: &str,
    headers: &[(&str, &str)],
    options: &[String],
) -> Result<Compiled, CompileError> {
    let src = cstring(source, "the kernel source")?;
    let cname = cstring(name, "the kernel name")?;
    let hsrc: Vec<CString> = headers
        .iter()
        .map(|(_, s)| cstring(s, "a header"))
        .collect::<Result<_, _>>()?;
    let hnames: Vec<CString> = headers
        .iter()
        .map(|(n, _)| cstring(n, "a header name"))
        .collect::<Result<_, _>>()?;
    let hsrc_p: Vec<*const c_char> = hsrc.iter().map(|c| c.as_ptr()).collect();
    let hnames_p: Vec<*const c_char> = hnames.iter().map(|c| c.as_ptr()).collect();
    let copts: Vec<CString> = options
        .iter()
        .map(|o| cstring(o, "an option"))
        .collect::<Result<_, _>>()?;
    let copts_p: Vec<*const c_char> = copts.iter().map(|c| c.as_ptr()).collect();
    let check = |r: sys::nvrtcResult, what: &str| {
        if r == sys::nvrtcResult::NVRTC_SUCCESS {
            Ok(())
        } else {
            Err(CompileError::Setup(format!(
                "{what} failed for `{name}`: {r:?}"
            )))
        }
    };
    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: all pointers come from CStrings alive until the end of this function;
    // the counts match the arrays.
    check(
        unsafe {
            sys::nvrtcCreateProgram(
                &mut prog,
                src.as_ptr(),
                cname.as_ptr(),
                hsrc_p.len() as i32,
                hsrc_p.as_ptr(),
                hnames_p.as_ptr(),
            )
        },
        "nvrtcCreateProgram",
    )?;
    // SAFETY: `prog` was created above and is destroyed exactly once below.
    let result = unsafe { sys::nvrtcCompileProgram(prog, copts_p.len() as i32, copts_p.as_ptr()) };
    let log = {
        let mut n = 0usize;
        // SAFETY: `prog` is valid; NVRTC writes `n` bytes, the buffer has `n`.
        unsafe {
            sys::nvrtcGetProgramLogSize(prog, &mut n);
            let mut buf = vec![0 as c_char; n.max(1)];
            sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr());
            CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
        }
    };
    let out = if result != sys::nvrtcResult::NVRTC_SUCCESS {
        Err(CompileError::Source {
            name: name.to_string(),
            log: log.clone(),
            options: options.to_vec(),
            numbered_source: numbered(source),
        })
    } else {
        let mut n = 0usize;
        let mut ptx_n = 0usize;
        // SAFETY: `prog` compiled successfully; the buffers are sized by NVRTC's own size calls.
        unsafe {
            check(sys::nvrtcGetCUBINSize(prog, &mut n), "nvrtcGetCUBINSize")?;
            let mut cubin = vec![0u8; n];
            check(
                sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char),
                "nvrtcGetCUBIN",
            )?;
            check(sys::nvrtcGetPTXSize(prog, &mut ptx_n), "nvrtcGetPTXSize")?;
            let mut ptx = vec![0 as c_char; ptx_n.max(1)];
            check(sys::nvrtcGetPTX(prog, ptx.as_mut_ptr()), "nvrtcGetPTX")?;
            Ok(Compiled {
                cubin,
                ptx: CStr::from_ptr(ptx.as_ptr()).to_string_lossy().into_owned(),
                resources: parse_resources(&log),
                log,
                cached: false,
            })
        }
    };
    // SAFETY: destroying the program created above, once.
    unsafe {
        sys::nvrtcDestroyProgram(&mut prog);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::parse_resources;

    /// The properties of a device function that ptxas prints after a kernel
    /// are not the kernel's.
    #[test]
    fn a_kernels_spills_are_its_own() {
        let log = "\
ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
ptxas         .     384 bytes stack frame, 744 bytes spill stores, 728 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 384 bytes cumulative stack size
ptxas info    : Function properties for __internal_accurate_pow
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function 'j' for 'sm_90a'
ptxas info    : Function properties for j
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, 1024 bytes smem
";
        let r = parse_resources(log);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].name.as_str(), r[0].registers), ("k", 128));
        assert_eq!(
            (r[0].stack_frame, r[0].spill_stores, r[0].spill_loads),
            (384, 744, 728)
        );
        assert_eq!(
            (r[1].name.as_str(), r[1].registers, r[1].shared),
            ("j", 40, 1024)
        );
        assert_eq!(r[1].spill_stores + r[1].spill_loads, 0);
    }
}
