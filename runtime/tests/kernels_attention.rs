//! The attention header (codegen/cuda/attention.cuh): `rope_append_tile`,
//! `attention_tile`, `attention_combine_tile`, `rms_norm_rows_tile` and
//! `embedding_tile`.
//!
//! - Without a GPU: every template instantiated for the real shapes (MiMo-V2
//!   full width, Qwen3-30B-A3B) and the tiny presets compiles with NVRTC, with
//!   no spills and no stack frame, and the Rust replicas of the shared-memory
//!   formulas agree with the header's constexprs (static_asserts).
//! - With a GPU: rope + KV append + attention against the interpreter (tiny
//!   graphs built with `Builder`, caches prefilled by earlier interpreter
//!   steps) over masks, windows with ring wrap, sinks, GQA 2 and 16, DK != DV,
//!   q/k norms and the split-key path; the row RMSNorm and the embedding
//!   gather; and a print-only decode timing at 16k keys. Inputs are fresh
//!   seeded random values (never zero); outputs start as NaN bytes.
//!   Without a GPU these print `Gpu::SKIP` after building the references.
//!
//! Tolerances (bf16): the KV caches after the append must equal the
//! interpreter's bit for bit (RoPE and the k norm reproduce its rounding). The
//! attention output must have relative L2 error <= 1e-2 and every element
//! within `|w|/128 + rowmax/64` of the interpreter's `w` (`rowmax` = max |w|
//! over the head's DV values): one bf16 ulp of the value plus four of the row
//! scale, which covers the split-key deviation documented in the header
//! (measured <= 2 ulps of the row scale) and f32-vs-f64 summation order.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::fmt::Write as _;

use cudarc::driver::sys::CUevent_flags;
use tilefuse_ir::Mask;
use tilefuse_runtime::gpu::{Arg, Buffer, Gpu};
use tilefuse_runtime::nvrtc::{self, CompileOptions};

mod attention_cases;
use attention_cases::*;

/// The layers `gpu_attention_decode_timing_16k` times (MiMo-V2 full width):
/// split counts that are and are not a multiple of the combine's round of
/// 32, and the sliding layers.
fn timing_variants() -> [(&'static str, Layer); 5] {
    let full = mimo_full();
    [
        ("full, 32 splits x 544", full),
        (
            "full, 33 splits x 512",
            Layer {
                nsplit: 33,
                ch: 512,
                ..full
            },
        ),
        (
            "full, 64 splits x 288",
            Layer {
                nsplit: 64,
                ch: 288,
                ..full
            },
        ),
        ("sliding w128, 1 split", mimo_sliding()),
        (
            "sliding w128, 4 splits x 32",
            Layer {
                nsplit: 4,
                ch: 32,
                ..mimo_sliding()
            },
        ),
    ]
}

// ---------------------------------------------------------------------------
// NVRTC without a GPU.

fn compile_all_source() -> (String, Vec<String>) {
    let layers: Vec<(&str, Layer)> = vec![
        ("mimo_full_decode", mimo_full()),
        (
            "mimo_full_verify",
            Layer {
                tq: 4,
                nsplit: 4,
                ch: 128,
                ..mimo_full()
            },
        ),
        ("mimo_swa_decode", mimo_sliding()),
        (
            "mimo_swa_prefill",
            Layer {
                tq: 2,
                ch: 192,
                ..mimo_sliding()
            },
        ),
        (
            "mimo_draft_block",
            Layer {
                mask: Mask::Block { window: Some(128) },
                tq: 2,
                ch: 256,
                ..mimo_sliding()
            },
        ),
        ("qwen30b_decode", qwen_30b()),
        (
            "qwen30b_prefill",
            Layer {
                tq: 2,
                nsplit: 1,
                ch: 256,
                ..qwen_30b()
            },
        ),
        (
            "mimo_tiny_full",
            Layer {
                tq: 4,
                ch: 128,
                ..mimo_tiny_full()
            },
        ),
        (
            "mimo_tiny_swa",
            Layer {
                tq: 4,
                ch: 32,
                ..mimo_tiny_sliding()
            },
        ),
        (
            "mimo_tiny_split",
            Layer {
                nsplit: 4,
                ..mimo_tiny_full()
            },
        ),
        (
            "qwen_tiny",
            Layer {
                tq: 8,
                ..qwen_tiny()
            },
        ),
        (
            "qwen_tiny_block",
            Layer {
                mask: Mask::Block { window: None },
                ..qwen_tiny()
            },
        ),
    ];
    let mut layers: Vec<(String, Layer)> = layers
        .into_iter()
        .map(|(p, l)| (p.to_string(), l))
        .collect();
    // Every layer the GPU tests below run that the list above lacks: split
    // counts past one round of the combine, a partial last round.
    for (i, (_, l)) in timing_variants().into_iter().enumerate() {
        layers.push((format!("timing_{i}"), l));
    }
    let mut seen: Vec<Layer> = Vec::new();
    for (l, _, _) in gqa16_cases() {
        if !seen.contains(&l) {
            seen.push(l);
        }
    }
    for (i, l) in seen.into_iter().enumerate() {
        layers.push((format!("gqa16_{i}"), l));
    }
    let mut src = String::from("#include \"attention.cuh\"\n");
    let mut attn_kernels = Vec::new();
    for (p, l) in &layers {
        src.push_str(&l.wrappers(p));
        for k in ["rope", "attn", "attn_pre", "attn_app", "comb"] {
            attn_kernels.push(format!("{p}_{k}"));
        }
    }
    // Row RMSNorm (hidden 4096 / 2048 / 64) and embedding gathers.
    for (p, act, w, d, th) in [
        ("rms_mimo", "tf::bf16", "tf::bf16", 4096, 256),
        ("rms_qwen", "tf::bf16", "tf::bf16", 2048, 256),
        ("rms_tiny", "tf::bf16", "tf::bf16", 64, 128),
        ("rms_f32", "float", "float", 4096, 256),
    ] {
        writeln!(
            src,
            "extern \"C\" __global__ void __launch_bounds__({th}, 1) {p}(int R, const {act}* x, int xs, const {w}* w, float eps, {act}* y, int ys) {{\n\
             \x20 extern __shared__ __align__(16) char smem[];\n\
             \x20 tf::rms_norm_rows_tile<{act}, {w}, {d}, {th}>(blockIdx.x, R, x, xs, w, eps, y, ys, smem);\n}}"
        )
        .unwrap();
        attn_kernels.push(p.to_string());
    }
    for (p, t, h, th) in [
        ("emb_mimo", "tf::bf16", 4096, 256),
        ("emb_tiny", "tf::bf16", 64, 128),
        ("emb_f32", "float", 64, 128),
    ] {
        writeln!(
            src,
            "extern \"C\" __global__ void __launch_bounds__({th}, 1) {p}(int n, const int* ids, const {t}* table, int vocab, {t}* y, int ys, int* err) {{\n\
             \x20 extern __shared__ __align__(16) char smem[];\n\
             \x20 tf::embedding_tile<{t}, {h}, {th}>(blockIdx.x, n, ids, table, vocab, y, ys, err, smem);\n}}"
        )
        .unwrap();
        attn_kernels.push(p.to_string());
    }
    (src, attn_kernels)
}

#[test]
fn attention_templates_compile_without_spills() {
    let (src, kernels) = compile_all_source();
    let c = nvrtc::compile(
        "kernels_attention",
        &src,
        tilefuse_codegen::cuda::HEADERS,
        &CompileOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(!c.cubin.is_empty());
    for k in &kernels {
        let r = c
            .resources
            .iter()
            .find(|r| &r.name == k)
            .unwrap_or_else(|| panic!("no ptxas report for {k}; resources: {:?}", c.resources));
        println!(
            "{k}: {} registers, {} B stack, {} B spill stores, {} B spill loads",
            r.registers, r.stack_frame, r.spill_stores, r.spill_loads
        );
        assert_eq!(
            (r.spill_stores, r.spill_loads, r.stack_frame),
            (0, 0, 0),
            "{k}: {r:?}"
        );
        assert!(r.registers > 0 && r.registers <= 255, "{k}: {r:?}");
    }
}

// ---------------------------------------------------------------------------
// The GPU side.

/// Compiled kernels of one layer.
struct Kernels {
    rope: cudarc::driver::CudaFunction,
    attn: cudarc::driver::CudaFunction,
    attn_pre: cudarc::driver::CudaFunction,
    attn_app: cudarc::driver::CudaFunction,
    comb: cudarc::driver::CudaFunction,
    _module: tilefuse_runtime::gpu::Module,
}

fn load(gpu: &Gpu, l: &Layer, name: &str) -> Kernels {
    let src = format!("#include \"attention.cuh\"\n{}", l.wrappers("k"));
    // The program name: the case description with anything but [A-Za-z0-9_] as '_'.
    let prog: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let m = gpu
        .load(&prog, &src, tilefuse_codegen::cuda::HEADERS)
        .unwrap_or_else(|e| panic!("{e}"));
    for r in &m.compiled.resources {
        assert_eq!(
            (r.spill_stores, r.spill_loads, r.stack_frame),
            (0, 0, 0),
            "{name}: {r:?}"
        );
    }
    Kernels {
        rope: m.function("k_rope").unwrap(),
        attn: m.function("k_attn").unwrap(),
        attn_pre: m.function("k_attn_pre").unwrap(),
        attn_app: m.function("k_attn_app").unwrap(),
        comb: m.function("k_comb").unwrap(),
        _module: m,
    }
}

fn upload(gpu: &Gpu, bytes: &[u8], what: &str) -> Buffer {
    gpu.upload(bytes, what).unwrap_or_else(|e| panic!("{e}"))
}

fn ptr_or_null(b: &Option<Buffer>) -> u64 {
    b.as_ref().map_or(0, Buffer::ptr)
}

/// Runs rope_append + attention (+ combine) for one step on the GPU and
/// compares with the interpreter's step.
fn check_step(gpu: &Gpu, l: &Layer, s: usize, t: usize, seed: u64, what: &str) {
    let st = reference(l, s, t, seed);
    let ks = load(gpu, l, what);
    let (hq, hkv, dk, dv) = (l.hq, l.hkv, l.dk, l.dv);
    let (fused, w) = fused_qkv(l, &st, t);
    let qkv = upload(gpu, &bf16_bytes(&fused), "qkv");
    // Token t sits at position S + t (the interpreter step's positions).
    let pos_bytes: Vec<u8> = (s..s + t).flat_map(|p| (p as i32).to_le_bytes()).collect();
    let pos = upload(gpu, &pos_bytes, "positions");
    let kc = upload(gpu, &bf16_bytes(&st.kc0), "k cache");
    let vc = upload(gpu, &bf16_bytes(&st.vc0), "v cache");
    let qn = l
        .qk_norm
        .then(|| upload(gpu, &bf16_bytes(&st.qn), "q norm"));
    let kn = l
        .qk_norm
        .then(|| upload(gpu, &bf16_bytes(&st.kn), "k norm"));
    let sinks = l
        .sinks
        .then(|| upload(gpu, &bf16_bytes(&st.sinks), "sinks"));
    // Output rows padded by 8 columns that must stay poisoned.
    let os = hq * dv + 8;
    let out = gpu.alloc(t * os * 2, "out").unwrap();
    gpu.memset(&out, 0xff).unwrap();
    let ws = gpu.alloc(l.ws_floats(t).max(1) * 4, "ws").unwrap();
    gpu.memset(&ws, 0xff).unwrap();
    let (ti, si, ci) = (t as i32, s as i32, l.cap as i32);
    let k_ptr = qkv.ptr() + (hq * dk * 2) as u64;
    let v_ptr = qkv.ptr() + ((hq + hkv) * dk * 2) as u64;
    let th = l.threads as u32;
    gpu.launch(
        "rope_append",
        &ks.rope,
        t as u32,
        th,
        l.rope_smem() as u32,
        &[
            Arg::I32(ti),
            Arg::I32(si),
            Arg::I32(ci),
            Arg::Ptr(pos.ptr()),
            Arg::Ptr(k_ptr),
            Arg::I32(w as i32),
            Arg::Ptr(v_ptr),
            Arg::I32(w as i32),
            Arg::Ptr(ptr_or_null(&kn)),
            Arg::F32(l.eps),
            Arg::F32(l.theta),
            Arg::Ptr(kc.ptr()),
            Arg::Ptr(vc.ptr()),
        ],
    )
    .unwrap();
    // The attention tile (and its combine) on caches `kc`, `vc` into `out`
    // through `ws`; `extra`: the appending tile's own arguments.
    let attention = |attn: &cudarc::driver::CudaFunction,
                     (kc, vc): (&Buffer, &Buffer),
                     out: &Buffer,
                     ws: &Buffer,
                     extra: &[Arg]| {
        let mut args = vec![
            Arg::I32(ti),
            Arg::I32(si),
            Arg::I32(ci),
            Arg::Ptr(pos.ptr()),
            Arg::Ptr(qkv.ptr()),
            Arg::I32(w as i32),
            Arg::Ptr(ptr_or_null(&qn)),
            Arg::F32(l.eps),
            Arg::F32(l.theta),
            Arg::F32(l.scale()),
            Arg::Ptr(kc.ptr()),
            Arg::Ptr(vc.ptr()),
            Arg::Ptr(ptr_or_null(&sinks)),
            Arg::Ptr(out.ptr()),
            Arg::I32(os as i32),
            Arg::Ptr(ws.ptr()),
        ];
        args.extend_from_slice(extra);
        gpu.launch(
            "attention",
            attn,
            l.tiles(t) as u32,
            th,
            l.smem() as u32,
            &args,
        )
        .unwrap();
        if l.nsplit > 1 {
            gpu.launch(
                "attention_combine",
                &ks.comb,
                (t * hq) as u32,
                th,
                l.combine_smem() as u32,
                &[
                    Arg::I32(ti),
                    Arg::Ptr(ws.ptr()),
                    Arg::Ptr(ptr_or_null(&sinks)),
                    Arg::Ptr(out.ptr()),
                    Arg::I32(os as i32),
                ],
            )
            .unwrap();
        }
    };
    attention(&ks.attn, (&kc, &vc), &out, &ws, &[]);
    gpu.sync(what).unwrap_or_else(|e| panic!("{e}"));
    // The caches: the new rows bit for bit, every other slot untouched.
    same_bits(
        &bf16_from_bytes(&gpu.download(&kc).unwrap()),
        &st.kc1,
        &format!("{what}: k cache"),
    );
    same_bits(
        &bf16_from_bytes(&gpu.download(&vc).unwrap()),
        &st.vc1,
        &format!("{what}: v cache"),
    );
    // The output: every value written, the padding columns not.
    let raw = gpu.download(&out).unwrap();
    let mut got = Vec::with_capacity(t * hq * dv);
    for i in 0..t {
        let row = &raw[i * os * 2..(i + 1) * os * 2];
        assert!(
            row[hq * dv * 2..].iter().all(|&b| b == 0xff),
            "{what}: token {i}: write past the row"
        );
        got.extend(bf16_from_bytes(&row[..hq * dv * 2]));
    }
    let (e, worst) = check_rows(&got, &st.o, dv, what);
    println!("{what}: S={s} T={t}: rel L2 {e:.2e}, max error {worst:.2} x rowmax/256");
    // With the RoPE table made by the prologue: the same bytes, padding
    // included (fresh poisoned buffers).
    let out2 = gpu.alloc(t * os * 2, "out").unwrap();
    gpu.memset(&out2, 0xff).unwrap();
    let ws2 = gpu.alloc(l.ws_floats(t).max(1) * 4, "ws").unwrap();
    gpu.memset(&ws2, 0xff).unwrap();
    attention(&ks.attn_pre, (&kc, &vc), &out2, &ws2, &[]);
    gpu.sync(what).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        gpu.download(&out2).unwrap() == raw,
        "{what}: the tile after its prologue differs from the tile alone"
    );
    // The tile that appends the new rows itself, on the caches before the
    // append: the same caches bit for bit, the same output bytes.
    let kc3 = upload(gpu, &bf16_bytes(&st.kc0), "k cache");
    let vc3 = upload(gpu, &bf16_bytes(&st.vc0), "v cache");
    let out3 = gpu.alloc(t * os * 2, "out").unwrap();
    gpu.memset(&out3, 0xff).unwrap();
    let ws3 = gpu.alloc(l.ws_floats(t).max(1) * 4, "ws").unwrap();
    gpu.memset(&ws3, 0xff).unwrap();
    attention(
        &ks.attn_app,
        (&kc3, &vc3),
        &out3,
        &ws3,
        &[
            Arg::Ptr(k_ptr),
            Arg::I32(w as i32),
            Arg::Ptr(v_ptr),
            Arg::I32(w as i32),
            Arg::Ptr(ptr_or_null(&kn)),
        ],
    );
    gpu.sync(what).unwrap_or_else(|e| panic!("{e}"));
    same_bits(
        &bf16_from_bytes(&gpu.download(&kc3).unwrap()),
        &st.kc1,
        &format!("{what}: k cache (tile append)"),
    );
    same_bits(
        &bf16_from_bytes(&gpu.download(&vc3).unwrap()),
        &st.vc1,
        &format!("{what}: v cache (tile append)"),
    );
    assert!(
        gpu.download(&out3).unwrap() == raw,
        "{what}: the tile that appends differs from the tile after rope_append"
    );
}

/// Opens the GPU, or says why the test skips ([`Gpu::open_or_skip`]).
fn gpu_or_skip() -> Option<Gpu> {
    Gpu::open_or_skip()
}

/// Runs each `(layer, S, T)` case: the interpreter reference always (this
/// checks the graphs), the GPU comparison when there is one.
fn run_cases(name: &str, cases: &[(Layer, usize, usize)]) {
    let gpu = Gpu::open().unwrap_or_else(|e| panic!("{e}"));
    for (i, (l, s, t)) in cases.iter().enumerate() {
        let what = format!("{name}[{i}] {}", l.config());
        match &gpu {
            Some(g) => check_step(g, l, *s, *t, 1000 + i as u64, &what),
            None => {
                let st = reference(l, *s, *t, 1000 + i as u64);
                assert!(
                    st.o.iter().all(|x| x.is_finite()),
                    "{what}: reference not finite"
                );
            }
        }
    }
    if gpu.is_none() {
        Gpu::skip("");
    }
}

// ---------------------------------------------------------------------------
// GPU correctness.

#[test]
fn gpu_attention_causal_full_cache() {
    run_cases("causal", &causal_cases());
}

#[test]
fn gpu_attention_sliding_ring_sinks() {
    run_cases("sliding", &sliding_cases());
}

#[test]
fn gpu_attention_block_mask() {
    run_cases("block", &block_cases());
}

#[test]
fn gpu_attention_qk_norm() {
    run_cases("qk_norm", &qk_norm_cases());
}

#[test]
fn gpu_attention_full_width_decode() {
    run_cases("full_width", &full_width_cases());
}

#[test]
fn gpu_attention_gqa16_and_split_keys() {
    // MiMo full head dims (192/128, 64 rotated) with GQA 16 (32 q heads over 2 kv
    // heads, to keep the interpreter fast); one split, then the flash-decoding
    // path: 8 splits over a few thousand keys (T = 1 and a verify block of 4),
    // also with sub-chunks (4 splits of 128-key sub-chunks), 4 queries per tile,
    // and 40 splits (the combine sums 32 splits' partials, then a partial round
    // of 8).
    run_cases("gqa16", &gqa16_cases());
}

#[test]
fn gpu_rms_norm_rows_and_embedding() {
    // Row RMSNorm against interp nn.rms_norm (bit for bit in bf16), and the
    // embedding gather with out-of-range ids (NaN rows and the error flag).
    let c = rows_case();
    let Some(gpu) = gpu_or_skip() else { return };
    let m = gpu
        .load(
            "attention_rms_emb",
            ROWS_SRC,
            tilefuse_codegen::cuda::HEADERS,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let xb = upload(&gpu, &bf16_bytes(&c.x_padded()), "x");
    let wb = upload(&gpu, &bf16_bytes(&c.w), "w");
    let yb = gpu.alloc(c.r * c.xs * 2, "y").unwrap();
    gpu.memset(&yb, 0xff).unwrap();
    let f = m.function("rms").unwrap();
    gpu.launch(
        "rms",
        &f,
        c.r as u32,
        256,
        256 / 32 * 8,
        &[
            Arg::I32(c.r as i32),
            Arg::Ptr(xb.ptr()),
            Arg::I32(c.xs as i32),
            Arg::Ptr(wb.ptr()),
            Arg::F32(1e-5),
            Arg::Ptr(yb.ptr()),
            Arg::I32(c.xs as i32),
        ],
    )
    .unwrap();
    gpu.sync("rms").unwrap();
    c.check_rms(&gpu.download(&yb).unwrap());
    let tb = upload(&gpu, &bf16_bytes(&c.table), "table");
    let ib = upload(&gpu, &c.ids_bytes(), "ids");
    let eb = upload(&gpu, &0i32.to_le_bytes(), "err");
    let yb = gpu.alloc(c.ids.len() * c.h * 2, "emb out").unwrap();
    gpu.memset(&yb, 0).unwrap();
    let f = m.function("emb").unwrap();
    gpu.launch(
        "emb",
        &f,
        c.ids.len() as u32,
        128,
        0,
        &[
            Arg::I32(c.ids.len() as i32),
            Arg::Ptr(ib.ptr()),
            Arg::Ptr(tb.ptr()),
            Arg::I32(c.vocab as i32),
            Arg::Ptr(yb.ptr()),
            Arg::I32(c.h as i32),
            Arg::Ptr(eb.ptr()),
        ],
    )
    .unwrap();
    gpu.sync("emb").unwrap();
    c.check_embedding(&gpu.download(&yb).unwrap(), &gpu.download(&eb).unwrap());
}

// ---------------------------------------------------------------------------
// Timing (print only).

/// Median of GPU times (ms) of `f` over `n` runs after 3 warm-ups, by CUDA events.
fn time_ms(gpu: &Gpu, n: usize, mut f: impl FnMut(usize)) -> f64 {
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    for i in 0..3 {
        f(i);
    }
    let mut ts = Vec::with_capacity(n);
    for i in 0..n {
        let e0 = gpu.stream().record_event(flags).unwrap();
        f(i);
        let e1 = gpu.stream().record_event(flags).unwrap();
        ts.push(f64::from(e0.elapsed_ms(&e1).unwrap()));
    }
    ts.sort_by(f64::total_cmp);
    ts[n / 2]
}

#[test]
fn gpu_attention_decode_timing_16k() {
    // Decode (T = 1) at S = 16384 for MiMo-V2 full-width layers: achieved GB/s of
    // KV bytes read vs a device-to-device copy (bytes read + written) in the same
    // run. Caches are rotated among copies larger than L2 together; values are
    // random (bf16 of a hash), filled on the GPU.
    let Some(gpu) = gpu_or_skip() else { return };
    let copy_bytes = 1usize << 29;
    let a = gpu.alloc(copy_bytes, "copy src").unwrap();
    let b = gpu.alloc(copy_bytes, "copy dst").unwrap();
    gpu.memset(&a, 0x3c).unwrap();
    let copy_ms = time_ms(&gpu, 10, |_| gpu.copy(&b, &a, copy_bytes).unwrap());
    let copy_gbs = 2.0 * copy_bytes as f64 / (copy_ms * 1e-3) / 1e9;
    println!("device-to-device copy: {copy_gbs:.0} GB/s (read + write, {copy_bytes} bytes in {copy_ms:.3} ms)");
    drop((a, b));

    let fill_src = "#include \"prelude.cuh\"\n\
        extern \"C\" __global__ void fill(tf::bf16* p, unsigned long long n, unsigned seed) {\n\
        \x20 for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x)\n\
        \x20   p[i] = tf::from_float<tf::bf16>(tf::uniform01(seed, (unsigned)i) * 2.f - 1.f);\n}\n";
    let fm = gpu
        .load("attention_fill", fill_src, tilefuse_codegen::cuda::HEADERS)
        .unwrap();
    let fill = fm.function("fill").unwrap();
    let fill_buf = |buf: &Buffer, seed: u32| {
        gpu.launch(
            "fill",
            &fill,
            1024,
            256,
            0,
            &[
                Arg::Ptr(buf.ptr()),
                Arg::Ptr((buf.len() / 2) as u64),
                Arg::I32(seed as i32),
            ],
        )
        .unwrap();
    };
    let (s, t) = (16384usize, 1usize);
    let variants = timing_variants();
    for (vi, (name, l)) in variants.iter().enumerate() {
        let ks = load(&gpu, l, &format!("attention_timing_{vi}"));
        let (kbytes, vbytes) = (l.cap * l.hkv * l.dk * 2, l.cap * l.hkv * l.dv * 2);
        // Enough copies to exceed 2 x 50 MB of L2.
        let copies = (100usize << 20).div_ceil(kbytes + vbytes).max(2);
        let caches: Vec<(Buffer, Buffer)> = (0..copies)
            .map(|c| {
                let k = gpu.alloc(kbytes, "k cache").unwrap();
                let v = gpu.alloc(vbytes, "v cache").unwrap();
                fill_buf(&k, 2 * c as u32);
                fill_buf(&v, 2 * c as u32 + 1);
                (k, v)
            })
            .collect();
        let mut r = Rng(5);
        let q = upload(&gpu, &bf16_bytes(&r.vals(l.hq * l.dk, 1.0)), "q");
        let sinks = upload(&gpu, &bf16_bytes(&r.vals(l.hq, 1.0)), "sinks");
        let out = gpu.alloc(l.hq * l.dv * 2, "out").unwrap();
        let ws = gpu.alloc(l.ws_floats(t).max(1) * 4, "ws").unwrap();
        let pos_bytes: Vec<u8> = (s..s + t).flat_map(|p| (p as i32).to_le_bytes()).collect();
        let pos = upload(&gpu, &pos_bytes, "positions");
        gpu.sync("fill").unwrap();
        let ms = time_ms(&gpu, 50, |i| {
            let (kc, vc) = &caches[i % copies];
            gpu.launch(
                "attention",
                &ks.attn,
                l.tiles(t) as u32,
                l.threads as u32,
                l.smem() as u32,
                &[
                    Arg::I32(t as i32),
                    Arg::I32(s as i32),
                    Arg::I32(l.cap as i32),
                    Arg::Ptr(pos.ptr()),
                    Arg::Ptr(q.ptr()),
                    Arg::I32((l.hq * l.dk) as i32),
                    Arg::Ptr(0),
                    Arg::F32(l.eps),
                    Arg::F32(l.theta),
                    Arg::F32(l.scale()),
                    Arg::Ptr(kc.ptr()),
                    Arg::Ptr(vc.ptr()),
                    Arg::Ptr(sinks.ptr()),
                    Arg::Ptr(out.ptr()),
                    Arg::I32((l.hq * l.dv) as i32),
                    Arg::Ptr(ws.ptr()),
                ],
            )
            .unwrap();
            if l.nsplit > 1 {
                gpu.launch(
                    "attention_combine",
                    &ks.comb,
                    (t * l.hq) as u32,
                    l.threads as u32,
                    l.combine_smem() as u32,
                    &[
                        Arg::I32(t as i32),
                        Arg::Ptr(ws.ptr()),
                        Arg::Ptr(sinks.ptr()),
                        Arg::Ptr(out.ptr()),
                        Arg::I32((l.hq * l.dv) as i32),
                    ],
                )
                .unwrap();
            }
        });
        let keys = match l.mask {
            Mask::Causal { window: Some(w) } => (w as usize).min(s + t),
            _ => s + t,
        };
        let bytes = keys * l.hkv * (l.dk + l.dv) * 2;
        let gbs = bytes as f64 / (ms * 1e-3) / 1e9;
        println!(
            "decode attention S={s} {name}: {:.1} us, {} tiles, {:.1} MB of KV, {gbs:.0} GB/s = {:.0}% of the copy",
            ms * 1e3,
            l.tiles(t),
            bytes as f64 / 1e6,
            100.0 * gbs / copy_gbs
        );
    }
}
