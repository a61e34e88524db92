//! The weight-streaming matvec tile (`matvec_tile`, codegen/cuda/matvec.cuh)
//! on the CPU under the host emulation (`host_emulation`), against the
//! interpreter, on the cases of the GPU test `kernels_weights` (shared in
//! `weights_cases`): bf16, MXFP4, NVFP4, FP8 and f32 weights, the tensor-core
//! and CUDA-core paths, the RMSNorm prologue, ragged N and chunks of MAX_T
//! tokens. The program is the GPU test's own wrapper source. Outputs start
//! as 0xFF bytes and must be fully written; tolerances as in
//! `kernels_weights`. Needs a C++20 compiler (`$CXX` or `c++`); skips
//! without one unless `TILEFUSE_REQUIRE_CXX=1`.

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
    let names: Vec<String> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| c.mv.name(&format!("g{i}")))
        .collect();
    let src = program(
        &cases
            .iter()
            .zip(&names)
            .map(|(c, n)| c.mv.source(n))
            .collect::<Vec<_>>(),
    );
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
        if m.out == DType::F32 {
            kit::check_f32(&got, &d.want, 1e-4, &what);
        } else {
            kit::check_bf16(&got, &d.want, 2.0, 1e-3, &what);
        }
        println!("ok {what}");
    }
}
