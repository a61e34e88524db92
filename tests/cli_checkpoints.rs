//! The `tilefuse` binary on checkpoint directories, as a new user would run
//! it: `init`, `generate --model`, `quantize`, and bad inputs, each of which
//! must exit non-zero with one clear `error:` line and nothing on stdout.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use serde_json::Value;

fn tilefuse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tilefuse"))
        .args(args)
        .output()
        .expect("the tilefuse binary runs")
}

/// Runs and expects success; returns stdout.
fn ok(args: &[&str]) -> String {
    let out = tilefuse(args);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "tilefuse {args:?} failed\nstdout: {stdout}\nstderr: {stderr}"
    );
    stdout.into_owned()
}

/// Runs and expects one `error:` line that contains every one of `expect`.
fn fails(args: &[&str], expect: &[&str]) {
    let out = tilefuse(args);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !out.status.success(),
        "tilefuse {args:?} should fail\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        stdout.is_empty(),
        "tilefuse {args:?}: nothing should reach stdout, found {stdout}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "tilefuse {args:?}: one error line expected, found:\n{stderr}"
    );
    assert!(
        lines[0].starts_with("error: "),
        "tilefuse {args:?}: {stderr}"
    );
    for e in expect {
        assert!(
            lines[0].contains(e),
            "tilefuse {args:?}: the error should mention `{e}`:\n{stderr}"
        );
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temporary path")
}

fn generated_ids(json: &str) -> Vec<i64> {
    let v: Value = serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("{e}: {json}"));
    v["generated_ids"]
        .as_array()
        .expect("generated_ids")
        .iter()
        .filter_map(Value::as_i64)
        .collect()
}

/// `tilefuse init` of `preset` into `dir/name`.
fn init(dir: &Path, preset: &str, name: &str) -> std::path::PathBuf {
    let out = dir.join(name);
    ok(&["init", "--preset", preset, "--out", s(&out)]);
    out
}

/// Rewrites `dir/model.safetensors` through `edit` of its (name, tensor) list.
fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut Vec<(String, TensorView<'_>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut list: Vec<(String, TensorView<'_>)> = st.tensors();
    edit(&mut list);
    let out = safetensors::serialize(list, None).expect("serialize");
    std::fs::write(&path, out).expect("write safetensors");
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("config.json");
    let mut v: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("config")).expect("json");
    f(v.as_object_mut().expect("object"));
    std::fs::write(&path, v.to_string()).expect("write config");
}

const CPU: [&str; 4] = ["--backend", "cpu", "--max-tokens", "6"];

fn generate_model(dir: &Path, extra: &[&str]) -> Vec<&'static str> {
    let mut a: Vec<&'static str> = vec!["generate", "--model"];
    a.push(Box::leak(s(dir).to_string().into_boxed_str()));
    a.extend(CPU);
    a.extend(
        extra
            .iter()
            .map(|x| &*Box::leak(x.to_string().into_boxed_str())),
    );
    a
}

#[test]
fn init_then_generate_matches_the_preset() {
    let tmp = tempfile::tempdir().expect("tmp");
    for preset in ["qwen3-moe-tiny", "mimo-v2-tiny-mxfp4"] {
        let dir = init(tmp.path(), preset, preset);
        let from_dir = ok(&generate_model(&dir, &["--json"]));
        let mut a = vec!["generate", "--preset", preset, "--json"];
        a.extend(CPU);
        let from_preset = ok(&a);
        assert_eq!(
            generated_ids(&from_dir),
            generated_ids(&from_preset),
            "{preset}"
        );
        assert_eq!(generated_ids(&from_dir).len(), 6);
    }
}

#[test]
fn generate_model_reproduces_the_transformers_fixtures() {
    for name in ["mimo_v2_tiny", "qwen3_moe_tiny"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let r: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("reference.json")).expect("reference"),
        )
        .expect("json");
        let ids: Vec<String> = r["prompt_ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.to_string())
            .collect();
        let want: Vec<i64> = r["greedy_ids"]
            .as_array()
            .expect("ids")
            .iter()
            .filter_map(Value::as_i64)
            .collect();
        let n = want.len().to_string();
        let out = ok(&[
            "generate",
            "--model",
            s(&dir),
            "--backend",
            "cpu",
            "--json",
            "--prompt-ids",
            &ids.join(","),
            "--max-tokens",
            &n,
        ]);
        assert_eq!(generated_ids(&out), want, "{name}");
    }
}

#[test]
fn quantize_writes_a_checkpoint_that_generate_reads() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = init(tmp.path(), "mimo-v2-tiny", "src");
    for format in ["mxfp4", "nvfp4"] {
        let out = tmp.path().join(format);
        ok(&[
            "quantize",
            "--model",
            s(&src),
            "--out",
            s(&out),
            "--format",
            format,
        ]);
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("config.json")).expect("config"),
        )
        .expect("json");
        assert_eq!(cfg["quantization_config"]["quant_method"], format);
        assert_eq!(
            generated_ids(&ok(&generate_model(&out, &["--json"]))).len(),
            6
        );
        // Never over an existing directory.
        fails(
            &[
                "quantize",
                "--model",
                s(&src),
                "--out",
                s(&out),
                "--format",
                format,
            ],
            &["already exists"],
        );
    }
    fails(
        &["init", "--preset", "mimo-v2-tiny", "--out", s(&src)],
        &["already exists"],
    );
    fails(
        &[
            "init",
            "--preset",
            "no-such-preset",
            "--out",
            s(&tmp.path().join("x")),
        ],
        &["unknown preset `no-such-preset`"],
    );
    // Nothing half-written was left behind.
    let mut left: Vec<String> = std::fs::read_dir(tmp.path())
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["mxfp4", "nvfp4", "src"]);
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = init(tmp.path(), "qwen3-moe-tiny", "m");
    let path = dir.join("model.safetensors");
    let len = std::fs::metadata(&path).expect("size").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    f.set_len(len - 1000).expect("truncate");
    fails(
        &generate_model(&dir, &[]),
        &[
            "model.safetensors is truncated",
            &format!("holds {} bytes", len - 1000),
        ],
    );
    f.set_len(5).expect("truncate");
    fails(
        &generate_model(&dir, &[]),
        &["model.safetensors is truncated"],
    );
}

#[test]
fn wrong_tensor_name() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = init(tmp.path(), "qwen3-moe-tiny", "m");
    edit_tensors(&dir, |list| {
        for (n, _) in list.iter_mut() {
            if n == "model.layers.1.self_attn.k_norm.weight" {
                *n = "model.layers.1.self_attn.key_norm.weight".into();
            }
        }
    });
    fails(
        &generate_model(&dir, &[]),
        &[
            "tensor `model.layers.1.self_attn.k_norm.weight` is missing",
            "`key_norm.weight`",
        ],
    );
}

#[test]
fn wrong_tensor_shape() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = init(tmp.path(), "mimo-v2-tiny", "m");
    edit_tensors(&dir, |list| {
        for (n, t) in list.iter_mut() {
            if n == "model.layers.2.mlp.experts.6.gate_proj.weight" {
                // bf16 [32, 64] -> [16, 64]
                let half = &t.data()[..16 * 64 * 2];
                *t = TensorView::new(t.dtype(), vec![16, 64], half).expect("view");
            }
        }
    });
    fails(
        &generate_model(&dir, &[]),
        &[
            "tensor `model.layers.2.mlp.experts.6.gate_proj.weight`",
            "has shape [16, 64], expected [32, 64]",
        ],
    );
}

#[test]
fn config_with_a_missing_field() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = init(tmp.path(), "mimo-v2-tiny", "m");
    edit_config(&dir, |c| {
        c.remove("moe_intermediate_size");
    });
    fails(
        &generate_model(&dir, &[]),
        &["config.json", "`moe_intermediate_size` is missing"],
    );
    edit_config(&dir, |c| {
        c.insert("moe_intermediate_size".into(), Value::from(32));
        c.insert("num_key_value_heads".into(), Value::from("one"));
    });
    fails(
        &generate_model(&dir, &[]),
        &["`num_key_value_heads` must be a positive integer, found \"one\""],
    );
    std::fs::remove_file(dir.join("config.json")).expect("rm");
    fails(&generate_model(&dir, &[]), &["has no config.json"]);
}

#[test]
fn unsupported_model_type() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = init(tmp.path(), "qwen3-moe-tiny", "m");
    edit_config(&dir, |c| {
        c.insert("model_type".into(), Value::from("llama"));
    });
    fails(
        &generate_model(&dir, &[]),
        &[
            "model_type `llama` is not supported",
            "mimo_v2_flash",
            "qwen3_moe",
        ],
    );
    edit_config(&dir, |c| {
        c.insert("model_type".into(), Value::from("qwen3_moe"));
        c.insert("use_sliding_window".into(), Value::from(true));
    });
    fails(
        &generate_model(&dir, &[]),
        &["`use_sliding_window` = true is not supported"],
    );
}

#[test]
fn empty_and_too_long_prompts() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = init(tmp.path(), "qwen3-moe-tiny", "m");
    fails(
        &generate_model(&dir, &["--prompt", ""]),
        &["the prompt is empty"],
    );
    fails(
        &generate_model(&dir, &["--prompt-ids", ""]),
        &["--prompt-ids is empty"],
    );
    fails(
        &["generate", "--backend", "cpu", "--prompt", ""],
        &["the prompt is empty"],
    );
    fails(
        &generate_model(&dir, &["--context", "8"]),
        &["the prompt (17 tokens) plus 6 new tokens need 22 positions, past the context limit of 8"],
    );
    fails(
        &generate_model(&dir, &["--prompt-ids", "1,300"]),
        &["prompt token id 300 is outside the model's vocabulary of 256"],
    );
    fails(
        &generate_model(&dir, &["--context", "100000"]),
        &["max_position_embeddings = 512"],
    );
}

#[test]
fn not_a_checkpoint_directory() {
    let tmp = tempfile::tempdir().expect("tmp");
    let missing = tmp.path().join("nothing-here");
    fails(&generate_model(&missing, &[]), &["does not exist"]);
    let dir = init(tmp.path(), "qwen3-moe-tiny", "m");
    std::fs::remove_file(dir.join("model.safetensors")).expect("rm");
    fails(
        &generate_model(&dir, &[]),
        &["has neither model.safetensors nor model.safetensors.index.json"],
    );
}

#[test]
fn tokenizer_json_is_used_when_present() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = init(tmp.path(), "qwen3-moe-tiny", "m");
    let words = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
      "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
      "decoder": null,
      "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2}, "unk_token": "[UNK]"}}"#;
    std::fs::write(dir.join("tokenizer.json"), words).expect("tokenizer.json");
    let out = ok(&generate_model(
        &dir,
        &["--prompt", "hello world", "--json"],
    ));
    let v: Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v["prompt_ids"], serde_json::json!([1, 2]));
    std::fs::write(dir.join("tokenizer.json"), "{").expect("tokenizer.json");
    fails(
        &generate_model(&dir, &["--prompt", "hello"]),
        &["tokenizer.json"],
    );
}

#[test]
fn speculative_generate_and_eval_on_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init(tmp.path(), "mimo-v2-tiny", "target");
    // Speculative decoding of a checkpoint with a built-in draft equals
    // plain decoding of the same checkpoint.
    let spec = ok(&[
        "generate",
        "--model",
        s(&dir),
        "--draft",
        "mimo-v2-tiny-dflash",
        "--block",
        "4",
        "--prompt",
        "def f(x):",
        "--max-tokens",
        "20",
        "--backend",
        "cpu",
        "--json",
    ]);
    let plain = ok(&[
        "generate",
        "--model",
        s(&dir),
        "--prompt",
        "def f(x):",
        "--max-tokens",
        "20",
        "--backend",
        "cpu",
        "--json",
    ]);
    assert_eq!(generated_ids(&spec), generated_ids(&plain));
    assert!(spec.contains("\"same_as_plain\":true"), "{spec}");
    // eval: perplexity, τ and the equality check over prompts cut from text.
    let text = tmp.path().join("heldout.txt");
    std::fs::write(
        &text,
        "import os\n\n\ndef first(a, b):\n    return a + b\n\n\nclass K:\n    def second(self):\n        return os.sep\n",
    )
    .unwrap();
    let out = ok(&[
        "eval",
        "--model",
        s(&dir),
        "--draft",
        "mimo-v2-tiny-dflash",
        "--text",
        s(&text),
        "--prompts",
        "2",
        "--max-tokens",
        "12",
        "--backend",
        "cpu",
        "--json",
    ]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["prompts"], 2, "{out}");
    assert_eq!(v["equal_outputs"], 2, "{out}");
    let ppl = v["perplexity"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0, "{out}");
    let tau = v["tau"].as_f64().unwrap();
    assert!((1.0..=8.0).contains(&tau), "{out}");
    // A directory that is not a draft is refused by name.
    fails(
        &[
            "generate",
            "--model",
            s(&dir),
            "--draft",
            s(tmp.path()),
            "--backend",
            "cpu",
        ],
        &["config.json"],
    );
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `tilefuse init` and `tilefuse quantize` killed (SIGKILL: no clean-up
/// runs) at delays spread over a whole run: the output directory is absent or
/// complete, never partial; a later writer of the same name removes what a
/// killed one left and succeeds.
#[test]
fn writers_killed_midway_leave_no_partial_output() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = init(tmp.path(), "mimo-v2-tiny", "src");
    let runs: [Vec<String>; 2] = [
        ["init", "--preset", "mimo-v2-tiny", "--out"]
            .map(String::from)
            .to_vec(),
        ["quantize", "--format", "mxfp4", "--model", s(&src), "--out"]
            .map(String::from)
            .to_vec(),
    ];
    for args in runs {
        // How long one whole run takes here.
        let t = std::time::Instant::now();
        init_like(&args, &tmp.path().join("timed"));
        let whole = t.elapsed();
        std::fs::remove_dir_all(tmp.path().join("timed")).expect("clean");
        let (mut killed_while_writing, mut complete) = (0, 0);
        for attempt in 0..24u32 {
            let out = tmp.path().join("out");
            let mut child = Command::new(env!("CARGO_BIN_EXE_tilefuse"))
                .args(&args)
                .arg(&out)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn tilefuse");
            // From at once to past the end of a whole run.
            std::thread::sleep(whole * attempt / 16);
            let _ = child.kill();
            let status = child.wait().expect("wait");
            let staging = tmp.path().join(format!(".out.tmp-{}", child.id()));
            if out.exists() {
                // Complete: it loads and generates.
                assert!(
                    !staging.exists(),
                    "{args:?}: staging beside a complete output"
                );
                assert_eq!(
                    generated_ids(&ok(&generate_model(&out, &["--json"]))).len(),
                    6
                );
                std::fs::remove_dir_all(&out).expect("clean");
                complete += 1;
            } else if staging.exists() {
                assert!(!status.success(), "{args:?} succeeded without its output");
                killed_while_writing += 1;
            }
        }
        println!(
            "{}: {killed_while_writing} kills while writing, {complete} complete outputs",
            args[0]
        );
        assert!(
            killed_while_writing > 0,
            "{args:?}: no kill landed while the output was being written ({whole:?} a run)"
        );
        // The next writer clears what the killed ones left and succeeds.
        init_like(&args, &tmp.path().join("out"));
        assert_eq!(names(tmp.path()), ["out", "src"], "{args:?}");
        std::fs::remove_dir_all(tmp.path().join("out")).expect("clean");
    }
}

/// Runs `args` with `out` appended and expects success.
fn init_like(args: &[String], out: &Path) {
    let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
    a.push(s(out));
    ok(&a);
}

/// A writer that fails after it started writing (an expert tensor missing
/// from the source) removes its staging directory and writes nothing.
#[test]
fn a_failed_quantize_leaves_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = init(tmp.path(), "qwen3-moe-tiny", "src");
    edit_tensors(&src, |list| {
        list.retain(|(n, _)| !n.contains("layers.1.mlp.experts.3.down_proj"))
    });
    let out = tmp.path().join("q");
    fails(
        &[
            "quantize",
            "--model",
            s(&src),
            "--out",
            s(&out),
            "--format",
            "nvfp4",
        ],
        &["experts.3.down_proj"],
    );
    assert_eq!(names(tmp.path()), ["src"]);
}
