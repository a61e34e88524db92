//! The hand-written CUDA header library that generated kernels include.
//!
//! Each header is embedded in the binary and handed to NVRTC as a named
//! header, so generated sources `#include "prelude.cuh"` without any files
//! on disk.

/// `(name, source)` of every header, in dependency order.
pub const HEADERS: &[(&str, &str)] = &[
    ("prelude.cuh", include_str!("../cuda/prelude.cuh")),
    ("matvec.cuh", include_str!("../cuda/matvec.cuh")),
    ("moe.cuh", include_str!("../cuda/moe.cuh")),
    ("sample.cuh", include_str!("../cuda/sample.cuh")),
    ("attention.cuh", include_str!("../cuda/attention.cuh")),
    ("persistent.cuh", include_str!("../cuda/persistent.cuh")),
];

/// The source of the header called `name`.
pub fn header(name: &str) -> Option<&'static str> {
    HEADERS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}
