//! The weight-streaming headers: `matvec_tile` (codegen/cuda/matvec.cuh),
//! `router_tile`, `experts_up_tile`, `experts_down_tile` (moe.cuh),
//! `argmax_tile` and `sample_tile` (sample.cuh).
//!
//! - Without a GPU: every template instantiated for representative shapes
//!   (bf16 / MXFP4 / NVFP4 / FP8 / f32 weights; MAX_T 1, 8, 16; MiMo-V2 widths
//!   H 4096, I 2048, E 256, k 8 and Qwen3-30B-A3B H 2048, I 768, E 128) compiles
//!   with NVRTC; the matvec and expert kernels have no spills and no stack
//!   frame; the weight loads are 16-byte non-coherent streaming loads; the Rust
//!   replicas of the shared-memory formulas agree with the headers' constexprs
//!   (a static_assert in every wrapper kernel).
//! - With a GPU: every template against the interpreter on tiny graphs built
//!   with `Builder` (rms_norm + matmul; router_select + router_weights; the
//!   router feeding `moe.experts`; argmax; sample). Inputs are fresh seeded
//!   random values (never zero, representable in their dtype); outputs start
//!   as 0xFF bytes (NaN, or -1 for indices) and must be fully written. Covers
//!   ragged N (not a multiple of ROWS), T = 1, 3, 8, 16 and 40 (chunks of
//!   MAX_T), both inner paths (tensor cores and CUDA cores), the FP4 formats,
//!   experts repeated across tokens (read once per tile), groups and a bias in
//!   the router. Plus a print-only bandwidth check of the matvec against a
//!   device-to-device copy measured in the same run. Without a GPU these print
//!   `Gpu::SKIP`.
//!
//! Tolerances: bf16 outputs of one rounding (matvec): every element within 2
//! bf16 ulps of the interpreter's value plus 1e-3 of the output's rms (f32
//! instead of f64 accumulation can only move a value across one rounding
//! boundary), and relative L2 <= 1e-2. bf16 outputs of the expert FFN (four
//! rounding points): relative L2 <= 1e-2 and every element within 2 ulps plus
//! rms/64. f32 outputs: `|got - want| <= 1e-4 (|want| + rms)`. Expert indices
//! and the routing table exactly; router weights within 1e-5 relative.
//! Sampling: exactly the interpreter's token, except where the target lies
//! within 1e-5 of the total from a cumulative boundary (the documented
//! association difference), where the token must be one whose interval the
//! target touches.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use tilefuse_ir::DType;
use tilefuse_runtime::gpu::{Arg, Buffer, Gpu};
use tilefuse_runtime::nvrtc::{self, CompileOptions, Compiled};

mod weights_cases;

use weights_cases::kit;
use weights_cases::*;

impl Weights {
    /// Uploads the arrays; returns the buffers and the kernel arguments.
    pub fn upload(&self, gpu: &Gpu, what: &str) -> (Vec<Buffer>, Vec<Arg>) {
        let bufs: Vec<Buffer> = self
            .arrays
            .iter()
            .map(|a| gpu.upload(a, what).unwrap())
            .collect();
        let mut args: Vec<Arg> = bufs.iter().map(|b| Arg::Ptr(b.ptr())).collect();
        if self.arrays.len() == 2 && matches!(self.tensor.dtype, DType::NVFP4) {
            args.push(Arg::F32(self.tensor_scale));
        }
        (bufs, args)
    }
}

/// A device buffer of `bytes` 0xFF bytes (NaN as f32 or bf16, -1 as i32).
fn poison(gpu: &Gpu, bytes: usize, what: &str) -> Buffer {
    gpu.upload(&vec![0xFFu8; bytes], what).unwrap()
}

const HEADERS: &[(&str, &str)] = tilefuse_codegen::cuda::HEADERS;

// ---------------------------------------------------------------------------
// Kernel sources.

/// Opens the GPU. Without one, compiles `src` for sm_90a instead (its
/// static_asserts check the smem replicas of these shapes too), checks that
/// nothing spills, prints `Gpu::SKIP` and returns `None`.
fn open_or_compile(name: &str, src: &str) -> Option<Gpu> {
    if let Some(gpu) = Gpu::open().unwrap_or_else(|e| panic!("{e}")) {
        return Some(gpu);
    }
    let c = nvrtc::compile(name, src, HEADERS, &CompileOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    for r in &c.resources {
        assert!(
            r.spill_stores == 0 && r.spill_loads == 0 && r.stack_frame == 0,
            "{r:?}"
        );
    }
    Gpu::skip(" (compiled the kernels for sm_90a only)");
    None
}

// ---------------------------------------------------------------------------
// NVRTC, no GPU.

/// The shapes instantiated by the compile test.
fn compile_matrix() -> (Vec<String>, Vec<String>) {
    let mut kernels = Vec::new();
    let mut names = Vec::new();
    let mut mv = |m: Mv| {
        let n = m.name("c");
        kernels.push(m.source(&n));
        names.push(n);
    };
    let base = |fmt: Fmt, max_t: usize, rows: usize, k: usize| Mv {
        fmt,
        path: "Auto",
        act: DType::BF16,
        out: DType::BF16,
        max_t,
        rows,
        threads: 256,
        k,
        norm: false,
        min_blocks: 1,
    };
    for fmt in [Fmt::Bf16, Fmt::Mx, Fmt::Nv, Fmt::E4m3] {
        for max_t in [1, 8, 16] {
            mv(base(fmt, max_t, 16, 4096)); // MiMo H (q/k/v, gate/up, lm_head)
        }
        mv(base(fmt, 1, 32, 2048)); // MiMo expert I / Qwen H
        mv(base(fmt, 16, 16, 768)); // Qwen expert I
    }
    mv(base(Fmt::Bf16, 1, 16, 16384)); // dense MLP down
    mv(base(Fmt::Bf16, 16, 16, 8192)); // o_proj
    mv(Mv {
        norm: true,
        ..base(Fmt::Bf16, 1, 16, 4096)
    });
    mv(Mv {
        norm: true,
        ..base(Fmt::Bf16, 16, 64, 4096)
    });
    mv(Mv {
        norm: true,
        ..base(Fmt::Mx, 8, 32, 2048)
    });
    // The router projection: f32 weights and f32 logits (CUDA cores), N = E.
    for max_t in [1, 8, 16] {
        mv(Mv {
            out: DType::F32,
            ..base(Fmt::F32, max_t, 2, 4096)
        });
    }
    mv(Mv {
        out: DType::F32,
        norm: true,
        ..base(Fmt::F32, 8, 2, 2048)
    });
    // Forced CUDA-core path and f32 activations.
    mv(Mv {
        path: "Simt",
        ..base(Fmt::Mx, 4, 16, 4096)
    });
    mv(Mv {
        path: "Simt",
        ..base(Fmt::Bf16, 1, 16, 4096)
    });
    mv(Mv {
        act: DType::F32,
        out: DType::F32,
        ..base(Fmt::Bf16, 4, 16, 2048)
    });

    // MiMo-V2 (H 4096, I 2048) and Qwen3-30B-A3B (H 2048, I 768) experts, top-8.
    for (h, i) in [(4096, 2048), (2048, 768)] {
        for fmt in Fmt::ALL {
            for max_t in [1, 8, 16] {
                let ex = Ex {
                    fmt,
                    path: "Auto",
                    max_t,
                    k: 8,
                    h,
                    i,
                    rows_up: 16,
                    rows_down: if fmt == Fmt::Bf16 { 16 } else { 32 },
                    threads: 256,
                };
                kernels.push(ex.source("c"));
                names.push(ex.name("c", true));
                names.push(ex.name("c", false));
            }
        }
    }
    for r in [
        // MiMo-V2: 256 experts, sigmoid, bias, no groups; DeepSeek-style groups; Qwen3 softmax.
        Router {
            max_t: 64,
            e: 256,
            k: 8,
            n_group: 1,
            topk_group: 1,
            softmax: false,
            norm: true,
            threads: 256,
            norm_eps: 1e-20,
            scale: 1.0,
        },
        Router {
            max_t: 64,
            e: 256,
            k: 8,
            n_group: 8,
            topk_group: 4,
            softmax: false,
            norm: true,
            threads: 256,
            norm_eps: 1e-20,
            scale: 2.5,
        },
        Router {
            max_t: 64,
            e: 128,
            k: 8,
            n_group: 1,
            topk_group: 1,
            softmax: true,
            norm: true,
            threads: 256,
            norm_eps: 0.0,
            scale: 1.0,
        },
        Router {
            max_t: 16,
            e: 512,
            k: 8,
            n_group: 1,
            topk_group: 1,
            softmax: false,
            norm: true,
            threads: 256,
            norm_eps: 1e-20,
            scale: 1.0,
        },
    ] {
        let n = r.name("c");
        kernels.push(r.source(&n));
        names.push(n);
    }
    for (tag, dt) in [("c_f32", DType::F32), ("c_bf16", DType::BF16)] {
        kernels.push(sample_source(tag, dt, 1024));
        names.push(format!("argmax_{tag}"));
        names.push(format!("sample_{tag}"));
    }
    (kernels, names)
}

#[test]
fn every_template_compiles_without_spills() {
    let (kernels, names) = compile_matrix();
    // Two programs compiled side by side (NVRTC compiles are independent).
    let half = kernels.len() / 2;
    let parts = [program(&kernels[..half]), program(&kernels[half..])];
    let results: Vec<Compiled> = std::thread::scope(|s| {
        let hs: Vec<_> = parts
            .iter()
            .enumerate()
            .map(|(i, src)| {
                s.spawn(move || {
                    nvrtc::compile(
                        &format!("kernels_weights_{i}"),
                        src,
                        HEADERS,
                        &CompileOptions::default(),
                    )
                    .unwrap_or_else(|e| panic!("{e}"))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for n in &names {
        let r = results
            .iter()
            .flat_map(|c| c.resources.iter())
            .find(|r| &r.name == n)
            .unwrap_or_else(|| panic!("no ptxas report for {n}"));
        println!("{n}: {} registers, {} B static smem", r.registers, r.shared);
    }
    for prefix in ["mv_", "ex_", "router_", "argmax_", "sample_"] {
        kit::assert_no_spills(&results, prefix);
    }
    for c in &results {
        if !c.cached {
            assert!(
                c.ptx.contains("ld.global.nc.L1::no_allocate.v4.u32"),
                "weights must be read with 16-byte streaming loads"
            );
            assert!(
                c.ptx
                    .contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"),
                "tensor-core path missing"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// GPU: matvec.

#[test]
fn matvec_matches_the_interpreter() {
    let cases = matvec_cases();
    let prepared = matvec_references(&cases);
    let (names, src) = matvec_program(&cases);
    let Some(gpu) = open_or_compile("kernels_weights_matvec", &src) else {
        return;
    };
    let module = gpu.load("kernels_weights_matvec", &src, HEADERS).unwrap();
    for (ci, MvData { x, gamma, w, want }) in prepared.into_iter().enumerate() {
        let c = &cases[ci];
        let m = &c.mv;
        let f = module.function(&names[ci]).unwrap();
        let xb = gpu.upload(&kit::act_bytes(&x, m.act), "x").unwrap();
        let gb = gpu.upload(&kit::act_bytes(&gamma, m.act), "gamma").unwrap();
        let (_wbufs, wargs) = w.upload(&gpu, "weights");
        let yb = poison(&gpu, c.t * c.n * kit::size_of(m.out), "y");
        let mut args = vec![
            Arg::Ptr(xb.ptr()),
            Arg::Ptr(if m.norm { gb.ptr() } else { 0 }),
            Arg::F32(1e-5),
        ];
        args.extend(wargs);
        args.extend([
            Arg::Ptr(yb.ptr()),
            Arg::I32(c.t as i32),
            Arg::I32(c.n as i32),
        ]);
        gpu.launch(
            &names[ci],
            &f,
            c.n.div_ceil(m.rows) as u32,
            m.threads as u32,
            m.smem() as u32,
            &args,
        )
        .unwrap();
        gpu.sync(&names[ci]).unwrap();
        let got = kit::floats(&gpu.download(&yb).unwrap(), m.out);
        let what = format!("{} (N {}, T {})", names[ci], c.n, c.t);
        check_matvec(&got, &want, m, &what);
        println!("ok {what}");
    }
}

// ---------------------------------------------------------------------------
// GPU: router and experts.

#[test]
fn router_matches_the_interpreter() {
    let cases = router_cases();
    let prepared = router_references(&cases);
    let (names, src) = router_program(&cases);
    let Some(gpu) = open_or_compile("kernels_weights_router", &src) else {
        return;
    };
    let module = gpu.load("kernels_weights_router", &src, HEADERS).unwrap();
    for (ci, ((r, bias, t), (logits, bv, want_idx, want_w))) in
        cases.iter().zip(prepared).enumerate()
    {
        let f = module.function(&names[ci]).unwrap();
        let lb = gpu
            .upload(&kit::act_bytes(&logits, DType::F32), "logits")
            .unwrap();
        let bb = gpu
            .upload(&kit::act_bytes(&bv, DType::F32), "bias")
            .unwrap();
        let ib = poison(&gpu, t * r.k * 4, "idx");
        let wb = poison(&gpu, t * r.k * 4, "w");
        let rb = poison(&gpu, r.table_ints() * 4, "route");
        let args = [
            Arg::Ptr(lb.ptr()),
            Arg::Ptr(if *bias { bb.ptr() } else { 0 }),
            Arg::I32(*t as i32),
            Arg::F32(r.norm_eps),
            Arg::F32(r.scale),
            Arg::Ptr(ib.ptr()),
            Arg::Ptr(wb.ptr()),
            Arg::Ptr(rb.ptr()),
        ];
        gpu.launch(&names[ci], &f, 1, r.threads as u32, r.smem() as u32, &args)
            .unwrap();
        gpu.sync(&names[ci]).unwrap();
        let what = format!("{} (T {t}, bias {bias})", names[ci]);
        check_router(
            &kit::ints(&gpu.download(&ib).unwrap()),
            &kit::floats(&gpu.download(&wb).unwrap(), DType::F32),
            &kit::ints(&gpu.download(&rb).unwrap()),
            (&want_idx, &want_w),
            r,
            *t,
            &what,
        );
        println!("ok {what}");
    }
}

#[test]
fn experts_match_the_interpreter() {
    let router = experts_router();
    let cases = experts_cases(&router);
    let prepared = experts_references(&router, &cases);
    let router_for = |max_t: usize| Router { max_t, ..router };
    let kernels = experts_kernels(&router, &cases);
    let src = program(&kernels);
    let Some(gpu) = open_or_compile("kernels_weights_experts", &src) else {
        return;
    };
    let module = gpu.load("kernels_weights_experts", &src, HEADERS).unwrap();
    for (ci, ((c, t), (x, logits, bias, gu, dn, want_idx, want_w, want_y))) in
        cases.iter().zip(prepared).enumerate()
    {
        let t = *t;
        let router = router_for(c.max_t);
        let rname = router.name("ex");
        let rf = module.function(&rname).unwrap();
        let tag = format!("g{ci}");
        let (upn, downn) = (c.name(&tag, true), c.name(&tag, false));
        let (uf, df) = (
            module.function(&upn).unwrap(),
            module.function(&downn).unwrap(),
        );
        let xb = gpu.upload(&kit::act_bytes(&x, DType::BF16), "x").unwrap();
        let lb = gpu
            .upload(&kit::act_bytes(&logits, DType::F32), "logits")
            .unwrap();
        let bb = gpu
            .upload(&kit::act_bytes(&bias, DType::F32), "bias")
            .unwrap();
        let ib = poison(&gpu, t * router.k * 4, "idx");
        let wb = poison(&gpu, t * router.k * 4, "w");
        let rb = poison(&gpu, router.table_ints() * 4, "route");
        let hb = poison(&gpu, t * router.k * c.i * 2, "h");
        let yb = poison(&gpu, t * c.h * 2, "y");
        let (_gbufs, gargs) = gu.upload(&gpu, "gate_up");
        let (_dbufs, dargs) = dn.upload(&gpu, "down");
        let rargs = [
            Arg::Ptr(lb.ptr()),
            Arg::Ptr(bb.ptr()),
            Arg::I32(t as i32),
            Arg::F32(router.norm_eps),
            Arg::F32(router.scale),
            Arg::Ptr(ib.ptr()),
            Arg::Ptr(wb.ptr()),
            Arg::Ptr(rb.ptr()),
        ];
        gpu.launch(
            &rname,
            &rf,
            1,
            router.threads as u32,
            router.smem() as u32,
            &rargs,
        )
        .unwrap();
        let mut uargs = vec![Arg::Ptr(xb.ptr()), Arg::I32(t as i32), Arg::Ptr(rb.ptr())];
        uargs.extend(gargs);
        uargs.push(Arg::Ptr(hb.ptr()));
        gpu.launch(
            &upn,
            &uf,
            c.up_tiles(t, router.e) as u32,
            c.threads as u32,
            c.smem(true) as u32,
            &uargs,
        )
        .unwrap();
        let mut dargs_all = vec![
            Arg::Ptr(hb.ptr()),
            Arg::Ptr(wb.ptr()),
            Arg::I32(t as i32),
            Arg::Ptr(rb.ptr()),
        ];
        dargs_all.extend(dargs);
        dargs_all.push(Arg::Ptr(yb.ptr()));
        gpu.launch(
            &downn,
            &df,
            c.down_tiles() as u32,
            c.threads as u32,
            c.smem(false) as u32,
            &dargs_all,
        )
        .unwrap();
        gpu.sync(&downn).unwrap();
        let what = format!("{downn} (T {t})");
        check_router(
            &kit::ints(&gpu.download(&ib).unwrap()),
            &kit::floats(&gpu.download(&wb).unwrap(), DType::F32),
            &kit::ints(&gpu.download(&rb).unwrap()),
            (&want_idx, &want_w),
            &router,
            t,
            &what,
        );
        check_experts(
            &kit::floats(&gpu.download(&hb).unwrap(), DType::BF16),
            &kit::floats(&gpu.download(&yb).unwrap(), DType::BF16),
            &want_y,
            &what,
        );
        println!("ok {what}");
    }
}

// ---------------------------------------------------------------------------
// GPU: argmax and sampling.

#[test]
fn argmax_and_sample_match_the_interpreter() {
    let cases = sample_cases();
    let threads = SAMPLE_THREADS;
    let seed = SAMPLE_SEED;
    let prepared = sample_references(&cases);
    // Row 0 holds a NaN: the oracle's sampling falls back to the last positive e_i;
    // the other rows are ordinary.
    let src = program(&[
        sample_source("f32", DType::F32, threads),
        sample_source("bf16", DType::BF16, threads),
    ]);
    let Some(gpu) = open_or_compile("kernels_weights_sample", &src) else {
        return;
    };
    let module = gpu.load("kernels_weights_sample", &src, HEADERS).unwrap();
    for (&(v, dt, temp, _, t), (l, want_a, want_s)) in cases.iter().zip(prepared) {
        let tag = if dt == DType::F32 { "f32" } else { "bf16" };
        let (an, sn) = (format!("argmax_{tag}"), format!("sample_{tag}"));
        let (af, sf) = (module.function(&an).unwrap(), module.function(&sn).unwrap());
        let lb = gpu.upload(&kit::act_bytes(&l, dt), "logits").unwrap();
        let sb = gpu.upload(&kit::i32_bytes(&seed), "seed").unwrap();
        let ab = poison(&gpu, 4 * t, "argmax");
        let ob = poison(&gpu, 4 * t, "sample");
        gpu.launch(
            &an,
            &af,
            t as u32,
            threads as u32,
            argmax_smem(threads) as u32,
            &[Arg::Ptr(lb.ptr()), Arg::I32(v as i32), Arg::Ptr(ab.ptr())],
        )
        .unwrap();
        gpu.launch(
            &sn,
            &sf,
            t as u32,
            threads as u32,
            sample_smem(threads) as u32,
            &[
                Arg::Ptr(lb.ptr()),
                Arg::I32(v as i32),
                Arg::F32(temp),
                Arg::Ptr(sb.ptr()),
                Arg::Ptr(ob.ptr()),
            ],
        )
        .unwrap();
        gpu.sync(&sn).unwrap();
        let what = format!("V {v} {dt} T {temp}");
        assert_eq!(
            kit::ints(&gpu.download(&ab).unwrap()),
            want_a,
            "{what}: argmax"
        );
        let got = kit::ints(&gpu.download(&ob).unwrap());
        check_samples(&got, &want_s, &l, v, temp, t, &what);
        println!("ok {what}");
    }
}

// ---------------------------------------------------------------------------
// GPU: bandwidth, print only.

#[test]
fn matvec_bandwidth_print_only() {
    let Some(gpu) = Gpu::open_or_skip() else {
        return;
    };
    use cudarc::driver::sys::CUevent_flags;
    // One MiMo expert's gate_up: [2I, H] = [4096, 4096], T = 1. Copies of the
    // weights rotate so that each launch reads from HBM (> 50 MB L2).
    let (n, k) = (4096usize, 4096usize);
    let stream = gpu.stream().clone();
    let time = |f: &mut dyn FnMut()| -> f64 {
        f(); // warm-up
        gpu.sync("warm-up").unwrap();
        let a = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        let reps = 20;
        for _ in 0..reps {
            f();
        }
        let b = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        f64::from(a.elapsed_ms(&b).unwrap()) / 1e3 / f64::from(reps)
    };
    // Device-to-device copy of 512 MiB (the bench's probe: an initialised source).
    let copy_gbs = tilefuse_runtime::bench::measure_bandwidth(&gpu, 512 << 20, 20).unwrap() / 1e9;
    println!("device-to-device copy: {copy_gbs:.0} GB/s (read + write)");

    let mut r = Rng::new(0x5eed_0005);
    for fmt in [Fmt::Bf16, Fmt::Mx] {
        let m = Mv {
            fmt,
            path: "Auto",
            act: DType::BF16,
            out: DType::BF16,
            max_t: 1,
            rows: if fmt == Fmt::Bf16 { 16 } else { 32 },
            threads: 256,
            k,
            norm: false,
            min_blocks: 1,
        };
        let name = m.name("bench");
        let module = gpu
            .load(
                "kernels_weights_bench",
                &program(&[m.source(&name)]),
                HEADERS,
            )
            .unwrap();
        let f = module.function(&name).unwrap();
        let w = Weights::random(&mut r, fmt, &[n, k]);
        let copies = (256usize << 20).div_ceil(fmt.bytes(n, k)).max(2);
        let uploads: Vec<(Vec<Buffer>, Vec<Arg>)> =
            (0..copies).map(|_| w.upload(&gpu, "weights")).collect();
        let x = kit::rand_vals(&mut r, k, DType::BF16, 1.0);
        let xb = gpu.upload(&kit::act_bytes(&x, DType::BF16), "x").unwrap();
        let yb = poison(&gpu, n * 2, "y");
        let mut i = 0usize;
        let s = time(&mut || {
            let mut args = vec![Arg::Ptr(xb.ptr()), Arg::Ptr(0), Arg::F32(0.0)];
            args.extend(uploads[i % copies].1.iter().copied());
            args.extend([Arg::Ptr(yb.ptr()), Arg::I32(1), Arg::I32(n as i32)]);
            gpu.launch(
                &name,
                &f,
                n.div_ceil(m.rows) as u32,
                m.threads as u32,
                m.smem() as u32,
                &args,
            )
            .unwrap();
            i += 1;
        });
        gpu.sync(&name).unwrap();
        let gbs = fmt.bytes(n, k) as f64 / s / 1e9;
        println!(
            "matvec {} [{n} x {k}], T = 1, ROWS {}: {:.1} us, {gbs:.0} GB/s = {:.0}% of the copy",
            fmt.name(),
            m.rows,
            s * 1e6,
            100.0 * gbs / copy_gbs
        );
    }
}
