//! The main job as a new user runs it: `tilefuse generate` with no model
//! runs the shipped pair (`models/mimo-v2-code`) with DFlash speculative
//! decoding, on the GPU when there is one and on the CPU otherwise, and its
//! output equals plain greedy decoding.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use serde_json::Value;

#[test]
fn default_generate_runs_the_shipped_pair_exactly() {
    let out = Command::new(env!("CARGO_BIN_EXE_tilefuse"))
        .args(["generate", "--max-tokens", "24", "--json"])
        .output()
        .expect("the tilefuse binary runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    let j: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(j["block"], 8, "{j}");
    assert_eq!(j["same_as_plain"], true, "{j}");
    let ids = j["generated_ids"].as_array().unwrap();
    assert!(!ids.is_empty() && ids.len() <= 24, "{j}");
    let tau = j["tau"].as_f64().unwrap();
    assert!((1.0..=8.0).contains(&tau), "{j}");
    // A trained pair writes code: the prompt is a Python definition and the
    // continuation is printable text with indentation or Python keywords.
    let text = j["text"].as_str().unwrap();
    assert!(
        text.chars()
            .all(|c| c == '\n' || c == '\t' || !c.is_control()),
        "{text:?}"
    );
    assert!(
        ["    ", "return", "if ", "=", "("]
            .iter()
            .any(|k| text.contains(k)),
        "not code-like: {text:?}"
    );
}
