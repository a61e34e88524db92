//! Long fuzz campaigns: `tilefuse-fuzz [--cases N] [--seed S] [TARGET ...]`
//! (default: every target, 1,000,000 cases each, seed 1). Prints one line
//! per target: cases, wall time, the largest heap growth of one case.

use std::process::ExitCode;

use tilefuse_fuzz::targets::ALL;

fn main() -> ExitCode {
    let mut cases: u32 = 1_000_000;
    let mut seed: u64 = 1;
    let mut names: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |what: &str| -> Option<String> {
            let v = args.next();
            if v.is_none() {
                eprintln!("error: {what} needs a value");
            }
            v
        };
        match a.as_str() {
            "--cases" => match value("--cases").and_then(|v| v.replace('_', "").parse().ok()) {
                Some(n) => cases = n,
                None => {
                    eprintln!("error: --cases takes a count below 2^32, such as 1000000");
                    return ExitCode::FAILURE;
                }
            },
            "--seed" => match value("--seed").and_then(|v| v.parse().ok()) {
                Some(n) => seed = n,
                None => {
                    eprintln!("error: --seed takes a non-negative integer");
                    return ExitCode::FAILURE;
                }
            },
            name => names.push(name.to_string()),
        }
    }
    for n in &names {
        if !ALL.iter().any(|t| t.name == n) {
            let known: Vec<&str> = ALL.iter().map(|t| t.name).collect();
            eprintln!(
                "error: no fuzz target `{n}`; the targets are {}",
                known.join(", ")
            );
            return ExitCode::FAILURE;
        }
    }
    let mut failed = false;
    for t in ALL
        .iter()
        .filter(|t| names.is_empty() || names.iter().any(|n| n == t.name))
    {
        match (t.run)(cases, seed) {
            Ok(r) => println!(
                "{:<12} {:>9} cases  {:>8.1} s  {:>8.1} us/case  {:>5.1}% past the first parse  largest case +{:.1} MiB",
                r.target,
                r.cases,
                r.seconds,
                r.seconds * 1e6 / f64::from(r.cases.max(1)),
                100.0 * r.deep as f64 / f64::from(r.cases.max(1)),
                r.peak_case_bytes as f64 / f64::from(1u32 << 20)
            ),
            Err(e) => {
                println!("{e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
