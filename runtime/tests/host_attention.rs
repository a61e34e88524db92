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

/// The host program of every layer's wrappers (`Layer::wrappers`, the GPU
/// test's own source; layer `i` under the prefix `l{i}`), built once per test
/// process (None: no compiler).
fn program() -> Option<&'static HostProgram> {
    static PROG: OnceLock<Option<HostProgram>> = OnceLock::new();
    PROG.get_or_init(|| {
        let mut src = String::from("#include \"attention.cuh\"\n");
        for (i, l) in layers().iter().enumerate() {
            src.push_str(&l.wrappers(&format!("l{i}")));
        }
        HostProgram::build(&src)
    })
    .as_ref()
}

/// One step on the host against the interpreter's, launched as
/// `kernels_attention` launches it: rope + attention (+ combine); the same
/// after the prologue; the tile appending the new rows itself on the
/// caches before the append.
fn check(prog: &HostProgram, p: &str, l: &Layer, s: usize, t: usize, seed: u64, what: &str) {
    let st = reference(l, s, t, seed);
    let (hq, hkv, dk, dv) = (l.hq, l.hkv, l.dk, l.dv);
    let (fused, w) = fused_qkv(l, &st, t);
    // Output rows padded by 8 columns that must stay poisoned.
    let os = hq * dv + 8;
    let (ti, si, ci, wi) = (t as i32, s as i32, l.cap as i32, w as i32);
    let mut b = Batch::default();
    let qkv = b.buffer(bf16_bytes(&fused));
    let pos = b.buffer(
        (s as i32..(s + t) as i32)
            .flat_map(i32::to_le_bytes)
            .collect(),
    );
    let opt = |b: &mut Batch, on: bool, v: &[f32]| {
        if on {
            HArg::Buf(b.buffer(bf16_bytes(v)), 0)
        } else {
            HArg::Null
        }
    };
    let qn = opt(&mut b, l.qk_norm, &st.qn);
    let kn = opt(&mut b, l.qk_norm, &st.kn);
    let sinks = opt(&mut b, l.sinks, &st.sinks);
    let (k, v) = (
        HArg::Buf(qkv, (hq * dk * 2) as u64),
        HArg::Buf(qkv, ((hq + hkv) * dk * 2) as u64),
    );
    let th = l.threads as u32;
    let mut runs = Vec::new();
    for kind in ["attn", "attn_pre", "attn_app"] {
        let kc = b.buffer(bf16_bytes(&st.kc0));
        let vc = b.buffer(bf16_bytes(&st.vc0));
        let out = b.buffer(vec![0xff; t * os * 2]);
        let ws = b.buffer(vec![0xff; l.ws_floats(t).max(1) * 4]);
        if kind != "attn_app" {
            b.launch(
                prog.kernel(&format!("{p}_rope")),
                t as u32,
                th,
                l.rope_smem() as u32,
                vec![
                    HArg::I32(ti),
                    HArg::I32(si),
                    HArg::I32(ci),
                    HArg::Buf(pos, 0),
                    k,
                    HArg::I32(wi),
                    v,
                    HArg::I32(wi),
                    kn,
                    HArg::F32(l.eps),
                    HArg::F32(l.theta),
                    HArg::Buf(kc, 0),
                    HArg::Buf(vc, 0),
                ],
            );
        }
        let mut args = vec![
            HArg::I32(ti),
            HArg::I32(si),
            HArg::I32(ci),
            HArg::Buf(pos, 0),
            HArg::Buf(qkv, 0),
            HArg::I32(wi),
            qn,
            HArg::F32(l.eps),
            HArg::F32(l.theta),
            HArg::F32(l.scale()),
            HArg::Buf(kc, 0),
            HArg::Buf(vc, 0),
            sinks,
            HArg::Buf(out, 0),
            HArg::I32(os as i32),
            HArg::Buf(ws, 0),
        ];
        if kind == "attn_app" {
            args.extend([k, HArg::I32(wi), v, HArg::I32(wi), kn]);
        }
        b.launch(
            prog.kernel(&format!("{p}_{kind}")),
            l.tiles(t) as u32,
            th,
            l.smem() as u32,
            args,
        );
        if l.nsplit > 1 {
            b.launch(
                prog.kernel(&format!("{p}_comb")),
                (t * hq) as u32,
                th,
                l.combine_smem() as u32,
                vec![
                    HArg::I32(ti),
                    HArg::Buf(ws, 0),
                    sinks,
                    HArg::Buf(out, 0),
                    HArg::I32(os as i32),
                ],
            );
        }
        runs.push((kind, out, kc, vc));
    }
    let res = b.run(prog);
    for &(kind, out, kc, vc) in &runs {
        let what = format!("{what} ({kind})");
        same_bits(
            &bf16_from_bytes(&res[kc]),
            &st.kc1,
            &format!("{what}: k cache"),
        );
        same_bits(
            &bf16_from_bytes(&res[vc]),
            &st.vc1,
            &format!("{what}: v cache"),
        );
        let mut got = Vec::with_capacity(t * hq * dv);
        for i in 0..t {
            let row = &res[out][i * os * 2..(i + 1) * os * 2];
            assert!(
                row[hq * dv * 2..].iter().all(|&b| b == 0xff),
                "{what}: token {i}: write past the row"
            );
            got.extend(bf16_from_bytes(&row[..hq * dv * 2]));
        }
        check_rows(&got, &st.o, dv, &what);
    }
    let first = &res[runs[0].1];
    assert!(
        runs[1..].iter().all(|r| &res[r.1] == first),
        "{what}: the prologue's or the appending tile's output differs from the tile's"
    );
}

fn run_cases(name: &str, cases: &[(Layer, usize, usize)]) {
    let Some(prog) = program() else {
        println!("no C++20 compiler: skipped (set CXX, or TILEFUSE_REQUIRE_CXX=1 to fail)");
        return;
    };
    let all = layers();
    for (i, (l, s, t)) in cases.iter().enumerate() {
        let index = all.iter().position(|x| x == l).unwrap();
        let what = format!("{name}[{i}] {}", l.config());
        check(
            prog,
            &format!("l{index}"),
            l,
            *s,
            *t,
            1000 + i as u64,
            &what,
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
