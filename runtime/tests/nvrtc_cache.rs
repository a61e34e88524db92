//! The NVRTC disk cache detects damaged entries and recompiles them. Needs
//! NVRTC (the CI installs the pip wheel), no GPU. Only one test here
//! compiles: it sets `TILEFUSE_CACHE_DIR` for the whole process.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use tilefuse_runtime::nvrtc::{self, CompileError, CompileOptions, Compiled};

const SRC: &str = "extern \"C\" __global__ void twice(float* x, int n) {\n  int i = blockIdx.x * blockDim.x + threadIdx.x;\n  if (i < n) x[i] *= 2.0f;\n}\n";

fn compile() -> Result<Compiled, CompileError> {
    nvrtc::compile("twice", SRC, &[], &CompileOptions::default())
}

/// The cache folder's files: the one entry, and no temporary leftovers.
fn entry(dir: &Path) -> PathBuf {
    let names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(
        names[0].extension().is_some_and(|e| e == "entry"),
        "{names:?}"
    );
    names[0].clone()
}

#[test]
fn damaged_cache_entries_are_detected_and_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("TILEFUSE_CACHE_DIR", dir.path());
    let first = compile().unwrap_or_else(|e| panic!("{e}"));
    assert!(!first.cached);
    let path = entry(dir.path());
    let whole = std::fs::read(&path).unwrap();
    let n = nvrtc::compile_count();
    let again = compile().unwrap();
    assert!(again.cached && again.cubin == first.cubin && again.ptx == first.ptx);
    assert!(nvrtc::decode_entry(&whole).is_ok());
    assert_eq!(
        nvrtc::compile_count(),
        n,
        "a whole entry was compiled again"
    );

    // Truncated (a write cut short), cut inside the header, one byte flipped.
    let mut flipped = whole.clone();
    let mid = whole.len() - first.cubin.len() / 2;
    flipped[mid] ^= 0x40;
    let damages: [(&str, Vec<u8>); 3] = [
        ("truncated", whole[..whole.len() / 2].to_vec()),
        ("header cut", whole[..10].to_vec()),
        ("one byte flipped", flipped),
    ];
    for (what, bytes) in damages {
        std::fs::write(&path, &bytes).unwrap();
        // A damaged entry is never loaded, so with compiles forbidden it is an error.
        std::env::set_var("TILEFUSE_NO_COMPILE", "1");
        let e = compile().expect_err(what);
        assert!(matches!(e, CompileError::Forbidden(_)), "{what}: {e}");
        std::env::remove_var("TILEFUSE_NO_COMPILE");
        let n = nvrtc::compile_count();
        let c = compile().unwrap();
        assert!(!c.cached, "{what}: the damaged entry was loaded");
        assert_eq!(nvrtc::compile_count(), n + 1, "{what}");
        assert!(c.cubin == first.cubin, "{what}: another cubin");
        // Rewritten whole (the log, which times the compile, may differ).
        let (_, ptx, cubin) =
            nvrtc::decode_entry(&std::fs::read(entry(dir.path())).unwrap()).unwrap();
        assert!(ptx == first.ptx && cubin == first.cubin, "{what}");
        assert!(compile().unwrap().cached, "{what}");
    }
}

#[test]
fn entry_headers_that_lie_are_errors() {
    let e = nvrtc::encode_entry("log", "ptx", &[1, 2, 3]);
    let (log, ptx, cubin) = nvrtc::decode_entry(&e).unwrap();
    assert_eq!(
        (log.as_str(), ptx.as_str(), cubin.as_slice()),
        ("log", "ptx", &[1u8, 2, 3][..])
    );
    // Lengths that overflow, or claim a terabyte: a clear error, no allocation.
    for lens in [[u64::MAX, 2, 0], [1 << 40, 0, 0], [0, 0, 4]] {
        let mut bad = e.clone();
        for (i, l) in lens.iter().enumerate() {
            bad[8 + 8 * i..16 + 8 * i].copy_from_slice(&l.to_le_bytes());
        }
        let m = nvrtc::decode_entry(&bad).unwrap_err();
        assert!(m.contains("header announces"), "{m}");
    }
    assert!(nvrtc::decode_entry(b"TFNVRTC0").is_err());
}
