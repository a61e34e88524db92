//! Every fuzz target for a few thousand cases (`TILEFUSE_FUZZ_CASES` sets
//! how many): seconds in CI. Long campaigns: `cargo run --release -p
//! tilefuse-fuzz -- --cases 1000000`.

use tilefuse_fuzz::targets::ALL;

#[test]
fn every_target_holds_for_a_few_thousand_cases() {
    let cases = std::env::var("TILEFUSE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    for t in ALL {
        match (t.run)(cases, 1) {
            Ok(r) => println!(
                "{}: {} cases in {:.2} s, {} past the first parse",
                r.target, r.cases, r.seconds, r.deep
            ),
            Err(e) => panic!("{e}"),
        }
    }
}
