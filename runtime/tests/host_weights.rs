//! The weight-streaming headers' tiles on the CPU under the host emulation
//! (`host_emulation`), against the interpreter, on the cases of the GPU test
//! `kernels_weights` (shared in `weights_cases`), from that test's own
//! wrapper source: `matvec_tile` (bf16, MXFP4, NVFP4, FP8 and f32 weights,
//! the tensor-core and CUDA-core paths, the RMSNorm prologue, ragged N,
//! chunks of MAX_T tokens), `router_tile` (groups, bias, softmax and sigmoid
//! scores, one to 64 tokens), the expert gate/up and down tiles behind the
//! router (every format, repeated experts), `argmax_tile` and
//! `sample_tile`. Outputs start as 0xFF bytes and must be fully written;
//! tolerances as in `kernels_weights`. Needs a C++20 compiler (`$CXX` or
//! `c++`); skips without one unless `TILEFUSE_REQUIRE_CXX=1`.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod host_emulation;
mod weights_cases;

use host_emulation::{Batch, HArg, HostProgram};
use tilefuse_ir::DType;
use weights_cases::*;

#[test]
fn host_matvec_matches_the_interpreter() {
    let cases = matvec_cases();
    let prepared = matvec_references(&cases);
    let (names, src) = matvec_program(&cases);
    let Some(prog) = HostProgram::build(&src) else {
        println!("no C++20 compiler: skipped (set CXX, or TILEFUSE_REQUIRE_CXX=1 to fail)");
        return;
    };
    let mut batch = Batch::default();
    let mut ys = Vec::new();
    for (ci, d) in prepared.iter().enumerate() {
        let c = &cases[ci];
        let m = &c.mv;
        let x = batch.buffer(kit::act_bytes(&d.x, m.act));
        let gamma = batch.buffer(kit::act_bytes(&d.gamma, m.act));
        let mut args = vec![
            HArg::Buf(x, 0),
            if m.norm {
                HArg::Buf(gamma, 0)
            } else {
                HArg::Null
            },
            HArg::F32(1e-5),
        ];
        for a in &d.w.arrays {
            args.push(HArg::Buf(batch.buffer(a.clone()), 0));
        }
        if m.fmt == Fmt::Nv {
            args.push(HArg::F32(d.w.tensor_scale));
        }
        let y = batch.buffer(vec![0xFF; c.t * c.n * kit::size_of(m.out)]);
        args.extend([
            HArg::Buf(y, 0),
            HArg::I32(c.t as i32),
            HArg::I32(c.n as i32),
        ]);
        batch.launch(
            prog.kernel(&names[ci]),
            c.n.div_ceil(m.rows) as u32,
            m.threads as u32,
            m.smem() as u32,
            args,
        );
        ys.push(y);
    }
    let out = batch.run(&prog);
    for (ci, d) in prepared.iter().enumerate() {
        let (c, m) = (&cases[ci], &cases[ci].mv);
        let got = kit::floats(&out[ys[ci]], m.out);
        let what = format!("{} (N {}, T {})", names[ci], c.n, c.t);
        check_matvec(&got, &d.want, m, &what);
        println!("ok {what}");
    }
}

/// Each router case: the expert indices and the routing table exactly, the
/// weights within 1e-5 relative.
#[test]
fn host_router_matches_the_interpreter() {
    let cases = router_cases();
    let prepared = router_references(&cases);
    let (names, src) = router_program(&cases);
    let Some(prog) = HostProgram::build(&src) else {
        println!("no C++20 compiler: skipped (set CXX, or TILEFUSE_REQUIRE_CXX=1 to fail)");
        return;
    };
    let mut batch = Batch::default();
    let mut outs = Vec::new();
    for (ci, ((r, bias, t), (logits, bv, _, _))) in cases.iter().zip(&prepared).enumerate() {
        let l = batch.buffer(kit::act_bytes(logits, DType::F32));
        let b = batch.buffer(kit::act_bytes(bv, DType::F32));
        let i = batch.buffer(vec![0xFF; t * r.k * 4]);
        let w = batch.buffer(vec![0xFF; t * r.k * 4]);
        let rt = batch.buffer(vec![0xFF; r.table_ints() * 4]);
        batch.launch(
            prog.kernel(&names[ci]),
            1,
            r.threads as u32,
            r.smem() as u32,
            vec![
                HArg::Buf(l, 0),
                if *bias { HArg::Buf(b, 0) } else { HArg::Null },
                HArg::I32(*t as i32),
                HArg::F32(r.norm_eps),
                HArg::F32(r.scale),
                HArg::Buf(i, 0),
                HArg::Buf(w, 0),
                HArg::Buf(rt, 0),
            ],
        );
        outs.push((i, w, rt));
    }
    let out = batch.run(&prog);
    for (ci, ((r, bias, t), (_, _, want_idx, want_w))) in cases.iter().zip(&prepared).enumerate() {
        let (i, w, rt) = outs[ci];
        let what = format!("{} (T {t}, bias {bias})", names[ci]);
        check_router(
            &kit::ints(&out[i]),
            &kit::floats(&out[w], DType::F32),
            &kit::ints(&out[rt]),
            (want_idx, want_w),
            r,
            *t,
            &what,
        );
        println!("ok {what}");
    }
}

/// Each expert case: the router, the gate/up tiles and the down tiles in
/// turn, as the GPU test launches them; y within 2 ulps plus rms/64, every
/// row of h written.
#[test]
fn host_experts_match_the_interpreter() {
    let router = experts_router();
    let cases = experts_cases(&router);
    let prepared = experts_references(&router, &cases);
    let router_for = |max_t: usize| Router { max_t, ..router };
    let src = program(&experts_kernels(&router, &cases));
    let Some(prog) = HostProgram::build(&src) else {
        println!("no C++20 compiler: skipped (set CXX, or TILEFUSE_REQUIRE_CXX=1 to fail)");
        return;
    };
    let mut batch = Batch::default();
    let mut outs = Vec::new();
    for (ci, ((c, t), (x, logits, bias, gu, dn, ..))) in cases.iter().zip(&prepared).enumerate() {
        let t = *t;
        let router = router_for(c.max_t);
        let tag = format!("g{ci}");
        let xb = batch.buffer(kit::act_bytes(x, DType::BF16));
        let lb = batch.buffer(kit::act_bytes(logits, DType::F32));
        let bb = batch.buffer(kit::act_bytes(bias, DType::F32));
        let ib = batch.buffer(vec![0xFF; t * router.k * 4]);
        let wb = batch.buffer(vec![0xFF; t * router.k * 4]);
        let rb = batch.buffer(vec![0xFF; router.table_ints() * 4]);
        let hb = batch.buffer(vec![0xFF; t * router.k * c.i * 2]);
        let yb = batch.buffer(vec![0xFF; t * c.h * 2]);
        let weights = |batch: &mut Batch, w: &Weights| {
            let mut a: Vec<HArg> = w
                .arrays
                .iter()
                .map(|bytes| HArg::Buf(batch.buffer(bytes.clone()), 0))
                .collect();
            if c.fmt == Fmt::Nv {
                a.push(HArg::F32(w.tensor_scale));
            }
            a
        };
        let (ga, da) = (weights(&mut batch, gu), weights(&mut batch, dn));
        batch.launch(
            prog.kernel(&router.name("ex")),
            1,
            router.threads as u32,
            router.smem() as u32,
            vec![
                HArg::Buf(lb, 0),
                HArg::Buf(bb, 0),
                HArg::I32(t as i32),
                HArg::F32(router.norm_eps),
                HArg::F32(router.scale),
                HArg::Buf(ib, 0),
                HArg::Buf(wb, 0),
                HArg::Buf(rb, 0),
            ],
        );
        let mut up = vec![HArg::Buf(xb, 0), HArg::I32(t as i32), HArg::Buf(rb, 0)];
        up.extend(ga);
        up.push(HArg::Buf(hb, 0));
        batch.launch(
            prog.kernel(&c.name(&tag, true)),
            c.up_tiles(t, router.e) as u32,
            c.threads as u32,
            c.smem(true) as u32,
            up,
        );
        let mut down = vec![
            HArg::Buf(hb, 0),
            HArg::Buf(wb, 0),
            HArg::I32(t as i32),
            HArg::Buf(rb, 0),
        ];
        down.extend(da);
        down.push(HArg::Buf(yb, 0));
        batch.launch(
            prog.kernel(&c.name(&tag, false)),
            c.down_tiles() as u32,
            c.threads as u32,
            c.smem(false) as u32,
            down,
        );
        outs.push((ib, wb, rb, hb, yb));
    }
    let out = batch.run(&prog);
    for (ci, ((c, t), (.., want_idx, want_w, want_y))) in cases.iter().zip(&prepared).enumerate() {
        let (ib, wb, rb, hb, yb) = outs[ci];
        let router = router_for(c.max_t);
        let what = format!("{} (T {t})", c.name(&format!("g{ci}"), false));
        check_router(
            &kit::ints(&out[ib]),
            &kit::floats(&out[wb], DType::F32),
            &kit::ints(&out[rb]),
            (want_idx, want_w),
            &router,
            *t,
            &what,
        );
        check_experts(
            &kit::floats(&out[hb], DType::BF16),
            &kit::floats(&out[yb], DType::BF16),
            want_y,
            &what,
        );
        println!("ok {what}");
    }
}

/// Argmax exactly (first index on ties, NaN picked), sampled tokens as
/// `check_samples` allows.
#[test]
fn host_argmax_and_sample_match_the_interpreter() {
    let cases = sample_cases();
    let prepared = sample_references(&cases);
    let threads = SAMPLE_THREADS;
    let src = program(&[
        sample_source("f32", DType::F32, threads),
        sample_source("bf16", DType::BF16, threads),
    ]);
    let Some(prog) = HostProgram::build(&src) else {
        println!("no C++20 compiler: skipped (set CXX, or TILEFUSE_REQUIRE_CXX=1 to fail)");
        return;
    };
    let mut batch = Batch::default();
    let mut outs = Vec::new();
    for (&(v, dt, temp, _, t), (l, _, _)) in cases.iter().zip(&prepared) {
        let tag = if dt == DType::F32 { "f32" } else { "bf16" };
        let lb = batch.buffer(kit::act_bytes(l, dt));
        let sb = batch.buffer(kit::i32_bytes(&SAMPLE_SEED));
        let ab = batch.buffer(vec![0xFF; 4 * t]);
        let ob = batch.buffer(vec![0xFF; 4 * t]);
        batch.launch(
            prog.kernel(&format!("argmax_{tag}")),
            t as u32,
            threads as u32,
            argmax_smem(threads) as u32,
            vec![HArg::Buf(lb, 0), HArg::I32(v as i32), HArg::Buf(ab, 0)],
        );
        batch.launch(
            prog.kernel(&format!("sample_{tag}")),
            t as u32,
            threads as u32,
            sample_smem(threads) as u32,
            vec![
                HArg::Buf(lb, 0),
                HArg::I32(v as i32),
                HArg::F32(temp),
                HArg::Buf(sb, 0),
                HArg::Buf(ob, 0),
            ],
        );
        outs.push((ab, ob));
    }
    let out = batch.run(&prog);
    for (ci, (&(v, dt, temp, _, t), (l, want_a, want_s))) in cases.iter().zip(&prepared).enumerate()
    {
        let (ab, ob) = outs[ci];
        let what = format!("V {v} {dt} T {temp}");
        assert_eq!(&kit::ints(&out[ab]), want_a, "{what}: argmax");
        check_samples(&kit::ints(&out[ob]), want_s, l, v, temp, t, &what);
        println!("ok {what}");
    }
}
