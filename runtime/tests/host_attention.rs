//! The attention header's tiles (`rope_append_tile`, `attention_tile` and
//! its prologue, `attention_combine_tile`, and the row kernels
//! `rms_norm_rows_tile` and `embedding_tile`) run on the CPU under the host
//! emulation (`host_emulation`), against the interpreter, on the cases the
//! GPU test `kernels_attention` runs, so that a machine without a GPU checks
//! their logic: indices, fragments, masks, splits, rings and the cache
//! append. Each step also runs with the RoPE table made by the prologue and
//! with the tile appending the new rows itself; both must give the same
//! bytes. Tolerances as in `kernels_attention`: the caches bit for bit, the
//! output within `|w|/128 + rowmax/64` of the interpreter's `w`, relative L2
//! at most 1e-2, every value written and the row padding untouched. Needs a
//! C++20 compiler (`$CXX` or `c++`); skips without one unless
//! `TILEFUSE_REQUIRE_CXX=1`.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod attention_cases;
mod host_emulation;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::OnceLock;

use attention_cases::*;
use host_emulation::{Batch, HArg, HostProgram};

/// Every layer of the case lists, in a fixed order (its index selects it in
/// the host program).
fn layers() -> Vec<Layer> {
    let mut v: Vec<Layer> = Vec::new();
    for (l, _, _) in causal_cases()
        .into_iter()
        .chain(sliding_cases())
        .chain(block_cases())
        .chain(qk_norm_cases())
        .chain(gqa16_cases())
        .chain(full_width_cases())
    {
        if !v.contains(&l) {
            v.push(l);
        }
    }
    v
}

/// The host program, built once per test process (None: no compiler).
fn program() -> Option<&'static PathBuf> {
    static EXE: OnceLock<Option<(tempfile::TempDir, PathBuf)>> = OnceLock::new();
    EXE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let cxx = host_emulation::compiler(dir.path())?;
        let mut main = String::from(
            "#include \"shim.h\"\n#include \"attention.cuh\"\n#include \"attention_runner.h\"\n\
             int main(int argc, char** argv) {\n  if (argc != 4) return 2;\n  switch (atoi(argv[1])) {\n",
        );
        for (i, l) in layers().iter().enumerate() {
            writeln!(
                main,
                "  case {i}: return run_attention<{}, {}>(argv[2], argv[3]);",
                l.config(),
                l.qk_norm
            )
            .unwrap();
        }
        main.push_str("  }\n  return 2;\n}\n");
        let exe = host_emulation::build(
            &cxx,
            dir.path(),
            &[(
                "attention_runner.h",
                include_str!("host_emulation/attention_runner.h"),
            )],
            &main,
        );
        Some((dir, exe))
    })
    .as_ref()
    .map(|(_, exe)| exe)
}

fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// One step on the host against the interpreter's.
fn check(exe: &PathBuf, index: usize, l: &Layer, s: usize, t: usize, seed: u64, what: &str) {
    let st = reference(l, s, t, seed);
    let (hq, dv) = (l.hq, l.dv);
    let (fused, w) = fused_qkv(l, &st, t);
    // Output rows padded by 8 columns that must stay poisoned.
    let os = hq * dv + 8;
    let mut input = i32_bytes(&[t as i32, s as i32, l.cap as i32, w as i32, os as i32]);
    for x in [l.eps, l.theta, l.scale()] {
        input.extend(x.to_le_bytes());
    }
    input.extend(i32_bytes(&(s as i32..(s + t) as i32).collect::<Vec<_>>()));
    for v in [&fused, &st.qn, &st.kn] {
        input.extend(bf16_bytes(v));
    }
    let sinks: Vec<f32> = (0..hq)
        .map(|h| st.sinks.get(h).copied().unwrap_or(0.0))
        .collect();
    input.extend(bf16_bytes(&sinks));
    input.extend(bf16_bytes(&st.kc0));
    input.extend(bf16_bytes(&st.vc0));
    let dir = tempfile::tempdir().unwrap();
    let (inp, outp) = (dir.path().join("in.bin"), dir.path().join("out.bin"));
    std::fs::write(&inp, input).unwrap();
    let o = std::process::Command::new(exe)
        .arg(index.to_string())
        .arg(&inp)
        .arg(&outp)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{what}: host program failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let raw = std::fs::read(&outp).unwrap();
    let (n_out, n_kc, n_vc) = (t * os * 2, st.kc0.len() * 2, st.vc0.len() * 2);
    let run = n_out + n_kc + n_vc;
    assert_eq!(raw.len(), 3 * run, "{what}: output size");
    let runs: Vec<&[u8]> = raw.chunks(run).collect();
    for (r, name) in runs.iter().zip(["", " (prologue)", " (tile append)"]) {
        let (out, rest) = r.split_at(n_out);
        let (kc, vc) = rest.split_at(n_kc);
        same_bits(
            &bf16_from_bytes(kc),
            &st.kc1,
            &format!("{what}{name}: k cache"),
        );
        same_bits(
            &bf16_from_bytes(vc),
            &st.vc1,
            &format!("{what}{name}: v cache"),
        );
        let mut got = Vec::with_capacity(t * hq * dv);
        for i in 0..t {
            let row = &out[i * os * 2..(i + 1) * os * 2];
            assert!(
                row[hq * dv * 2..].iter().all(|&b| b == 0xff),
                "{what}{name}: token {i}: write past the row"
            );
            got.extend(bf16_from_bytes(&row[..hq * dv * 2]));
        }
        check_rows(&got, &st.o, dv, &format!("{what}{name}"));
    }
    assert!(
        runs[1][..n_out] == runs[0][..n_out] && runs[2][..n_out] == runs[0][..n_out],
        "{what}: the prologue's or the appending tile's output differs from the tile's"
    );
}

fn run_cases(name: &str, cases: &[(Layer, usize, usize)]) {
    let Some(exe) = program() else {
        println!("no C++20 compiler: skipped (set CXX, or TILEFUSE_REQUIRE_CXX=1 to fail)");
        return;
    };
    let all = layers();
    for (i, (l, s, t)) in cases.iter().enumerate() {
        let index = all.iter().position(|x| x == l).unwrap();
        check(
            exe,
            index,
            l,
            *s,
            *t,
            1000 + i as u64,
            &format!("{name}[{i}] {}", l.config()),
        );
    }
}

#[test]
fn host_attention_causal_full_cache() {
    run_cases("causal", &causal_cases());
}

#[test]
fn host_attention_sliding_ring_sinks() {
    run_cases("sliding", &sliding_cases());
}

#[test]
fn host_attention_block_mask() {
    run_cases("block", &block_cases());
}

#[test]
fn host_attention_qk_norm() {
    run_cases("qk_norm", &qk_norm_cases());
}

#[test]
fn host_attention_full_width_decode() {
    run_cases("full_width", &full_width_cases());
}

#[test]
fn host_attention_gqa16_and_split_keys() {
    run_cases("gqa16", &gqa16_cases());
}

/// The rewrite: a known instruction becomes its emulation, an unknown one
/// a call that aborts when it runs; `asm` in comments and strings stays.
#[test]
fn the_rewrite_maps_known_ptx_and_makes_unknown_ptx_abort() {
    let src = "// asm volatile(\"x\");\n\
               const char* s = \"asm(\";\n\
               __device__ void f(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {\n\
               \x20   asm volatile(\"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0}, {%1};\"\n\
               \x20                : \"+f\"(d[0]) : \"r\"(a[0]));\n\
               }\n\
               __device__ unsigned g() { unsigned r; asm(\"mov.u32 %0, %%laneid;\" : \"=r\"(r)); return r; }\n";
    let out = host_emulation::rewrite(src);
    assert!(out.contains("// asm volatile(\"x\");"), "{out}");
    assert!(out.contains("\"asm(\""), "{out}");
    assert!(out.contains("{\n    emu::mma16816(d, a, b);\n}"), "{out}");
    assert!(
        out.contains("unsigned r; emu::unsupported(\"mov.u32 0, laneid;\"); return r;"),
        "{out}"
    );
    assert!(!out.contains("asm volatile(\"mma"), "{out}");
}

/// Row RMSNorm (bit for bit) and the embedding gather (NaN rows and the
/// error flag for out-of-range ids), from the GPU test's source.
#[test]
fn host_rms_norm_rows_and_embedding() {
    let c = rows_case();
    let Some(prog) = HostProgram::build(ROWS_SRC) else {
        println!("no C++20 compiler: skipped (set CXX, or TILEFUSE_REQUIRE_CXX=1 to fail)");
        return;
    };
    let mut batch = Batch::default();
    let x = batch.buffer(bf16_bytes(&c.x_padded()));
    let w = batch.buffer(bf16_bytes(&c.w));
    let y = batch.buffer(vec![0xff; c.r * c.xs * 2]);
    batch.launch(
        prog.kernel("rms"),
        c.r as u32,
        256,
        256 / 32 * 8,
        vec![
            HArg::I32(c.r as i32),
            HArg::Buf(x, 0),
            HArg::I32(c.xs as i32),
            HArg::Buf(w, 0),
            HArg::F32(1e-5),
            HArg::Buf(y, 0),
            HArg::I32(c.xs as i32),
        ],
    );
    let ids = batch.buffer(c.ids_bytes());
    let table = batch.buffer(bf16_bytes(&c.table));
    let e = batch.buffer(vec![0; c.ids.len() * c.h * 2]);
    let err = batch.buffer(0i32.to_le_bytes().to_vec());
    batch.launch(
        prog.kernel("emb"),
        c.ids.len() as u32,
        128,
        0,
        vec![
            HArg::I32(c.ids.len() as i32),
            HArg::Buf(ids, 0),
            HArg::Buf(table, 0),
            HArg::I32(c.vocab as i32),
            HArg::Buf(e, 0),
            HArg::I32(c.h as i32),
            HArg::Buf(err, 0),
        ],
    );
    let out = batch.run(&prog);
    c.check_rms(&out[y]);
    c.check_embedding(&out[e], &out[err]);
}
