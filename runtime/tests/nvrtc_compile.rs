//! NVRTC compiles without a GPU: a kernel over the prelude, errors with the log and numbered source.

#![allow(clippy::unwrap_used)]

use tilefuse_runtime::nvrtc::{self, CompileError, CompileOptions};

#[test]
fn compiles_prelude_kernel_and_reports_resources() {
    let src = "#include \"prelude.cuh\"\nextern \"C\" __global__ void __launch_bounds__(128) add_one(float* x, int n) {\n  int i = blockIdx.x * blockDim.x + threadIdx.x;\n  if (i < n) x[i] += 1.0f;\n}\n";
    let c = nvrtc::compile(
        "add_one",
        src,
        tilefuse_codegen::cuda::HEADERS,
        &CompileOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(!c.cubin.is_empty());
    let r = c
        .resources
        .iter()
        .find(|r| r.name == "add_one")
        .expect("ptxas report for add_one");
    assert!(r.registers > 0 && r.registers < 64, "{r:?}");
    assert_eq!(r.spill_stores, 0);
}

#[test]
fn source_errors_carry_log_options_and_numbered_source() {
    let src = "extern \"C\" __global__ void broken(float* x) {\n  x[0] = undefined_name;\n}\n";
    let e = nvrtc::compile("broken", src, &[], &CompileOptions::default()).unwrap_err();
    let CompileError::Source { .. } = &e else {
        panic!("{e}")
    };
    let msg = e.to_string();
    assert!(msg.contains("NVRTC failed to compile `broken`"), "{msg}");
    assert!(msg.contains("undefined_name"), "{msg}");
    assert!(msg.contains("--gpu-architecture=sm_90a"), "{msg}");
    assert!(msg.contains("    2 |   x[0] = undefined_name;"), "{msg}");
}

#[test]
fn acceptance_kernel_compiles() {
    let c = nvrtc::compile(
        tilefuse_runtime::accept::KERNEL,
        tilefuse_runtime::accept::SOURCE,
        &[],
        &CompileOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(!c.cubin.is_empty());
    assert!(c
        .resources
        .iter()
        .any(|r| r.name == tilefuse_runtime::accept::KERNEL && r.spill_stores == 0));
}

#[test]
fn sampling_kernels_compile_without_spills() {
    use tilefuse_runtime::accept::{ACCEPT_SAMPLED, SAMPLE_DRAFTS, SAMPLING_SOURCE};
    let c = nvrtc::compile(
        "tf_sampled_accept",
        SAMPLING_SOURCE,
        &[],
        &CompileOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    for k in [SAMPLE_DRAFTS, ACCEPT_SAMPLED] {
        let r = c
            .resources
            .iter()
            .find(|r| r.name == k)
            .unwrap_or_else(|| panic!("no ptxas report for {k}"));
        assert_eq!(r.spill_stores, 0, "{r:?}");
    }
}
