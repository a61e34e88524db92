//! `TILEFUSE_REQUIRE_GPU=1` turns a GPU test's skip into a failure. One test
//! in its own binary: it sets the variable for the whole process.

use tilefuse_runtime::gpu::Gpu;

#[test]
fn a_required_gpu_that_is_missing_fails_the_test() {
    std::env::set_var("TILEFUSE_REQUIRE_GPU", "1");
    assert!(Gpu::required());
    let opened = std::panic::catch_unwind(Gpu::open_or_skip);
    let skipped = std::panic::catch_unwind(|| Gpu::skip(""));
    if Gpu::available() {
        // With a GPU there is nothing to skip: the open must succeed.
        assert!(
            matches!(opened, Ok(Some(_))),
            "the GPU is present but did not open"
        );
        return;
    }
    for r in [opened.map(|_| ()), skipped] {
        let e = r.expect_err("a missing GPU skipped although TILEFUSE_REQUIRE_GPU=1");
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        assert!(
            msg.contains("TILEFUSE_REQUIRE_GPU is set but this machine has no CUDA GPU"),
            "{msg}"
        );
    }
    std::env::set_var("TILEFUSE_REQUIRE_GPU", "0");
    assert!(!Gpu::required());
    assert!(!Gpu::available_or_skip());
}
