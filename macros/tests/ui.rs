//! Every diagnostic of `#[graph]`, as compile-fail tests with their `.stderr`
//! (create or update with `TRYBUILD=overwrite`, then review each file).

#![allow(clippy::unwrap_used)]

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
