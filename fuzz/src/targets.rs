//! The fuzz targets: each draws inputs (mostly mutations of valid ones, so
//! they get past the first check) and runs them through the code a user's
//! files or flags reach.

use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;
use serde_json::Value;
use tilefuse_ir::Graph;
use tilefuse_model::checkpoint::{self, Checkpoint, LoadOptions};
use tilefuse_model::tokenizer::{self, StreamDecoder, Tokenizer};
use tilefuse_model::{canonical, config, presets};

use crate::Report;

/// A target: its name and its campaign (`cases`, `seed`).
pub struct Target {
    /// Name on the command line.
    pub name: &'static str,
    /// Runs a campaign.
    pub run: fn(u32, u64) -> Result<Report, String>,
}

/// Every target.
pub const ALL: &[Target] = &[
    Target {
        name: "config",
        run: config_json,
    },
    Target {
        name: "safetensors",
        run: safetensors,
    },
    Target {
        name: "ir_text",
        run: ir_text,
    },
    Target {
        name: "tokenizer",
        run: tokenizer_input,
    },
    Target {
        name: "prompt_ids",
        run: prompt_ids,
    },
];

// ---------------------------------------------------------------------------
// Values that break sizes and counts.

/// Integers at the edges: zero, negatives, powers of two near type limits.
fn edge_int() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0i64),
        Just(1),
        Just(-1),
        Just(2),
        Just(3),
        Just(7),
        Just(64),
        Just(1 << 16),
        Just(1 << 31),
        Just((1 << 31) - 1),
        Just(1 << 32),
        Just(1 << 40),
        Just(1 << 62),
        Just(i64::MAX),
        Just(i64::MIN),
        -1000i64..1000,
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => edge_int().prop_map(Value::from),
        1 => Just(Value::from(u64::MAX)),
        1 => any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        1 => prop_oneof![Just(0.5f64), Just(1e-30), Just(1e30), Just(-0.0), Just(2.5)].prop_map(Value::from),
        1 => any::<bool>().prop_map(Value::from),
        1 => Just(Value::Null),
        1 => "[a-z_0-9]{0,10}".prop_map(Value::from),
        1 => prop::collection::vec(edge_int(), 0..4).prop_map(Value::from),
        1 => Just(Value::Object(Default::default())),
    ]
}

// ---------------------------------------------------------------------------
// config.json

fn config_seeds() -> &'static [Value] {
    static SEEDS: OnceLock<Vec<Value>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut v: Vec<Value> = presets::all()
            .iter()
            .map(|p| config::to_json(&p.arch, tilefuse_ir::DType::BF16, 4096))
            .collect();
        for text in [
            include_str!("../../models/mimo-v2-code/target/config.json"),
            include_str!("../../models/mimo-v2-code/drafter/config.json"),
            include_str!("../../tests/fixtures/mimo_v2_tiny/config.json"),
            include_str!("../../tests/fixtures/qwen3_moe_tiny/config.json"),
        ] {
            if let Ok(j) = serde_json::from_str(text) {
                v.push(j);
            }
        }
        v
    })
}

/// One edit of a config.json.
#[derive(Clone, Debug)]
pub enum ConfigEdit {
    /// Sets the `i`-th key (of the sorted keys) to a value.
    Set(usize, Value),
    /// Sets the `j`-th key of the `i`-th object-valued key.
    SetNested(usize, usize, Value),
    /// Removes the `i`-th key.
    Remove(usize),
    /// Replaces one byte of the text.
    Byte(usize, u8),
    /// Cuts the text.
    Truncate(usize),
}

fn config_edit() -> impl Strategy<Value = ConfigEdit> {
    prop_oneof![
        6 => (any::<usize>(), json_value()).prop_map(|(i, v)| ConfigEdit::Set(i, v)),
        2 => (any::<usize>(), any::<usize>(), json_value()).prop_map(|(i, j, v)| ConfigEdit::SetNested(i, j, v)),
        2 => any::<usize>().prop_map(ConfigEdit::Remove),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| ConfigEdit::Byte(i, b)),
        1 => any::<usize>().prop_map(ConfigEdit::Truncate),
    ]
}

/// The text of seed `seed` with `edits` applied.
pub fn edited_config(seed: usize, edits: &[ConfigEdit]) -> String {
    let seeds = config_seeds();
    let mut v = seeds[seed % seeds.len()].clone();
    let mut raw: Vec<(usize, u8)> = Vec::new();
    let mut cut = None;
    if let Some(map) = v.as_object_mut() {
        for e in edits {
            let keys: Vec<String> = map.keys().cloned().collect();
            let nested: Vec<String> = map
                .iter()
                .filter(|(_, x)| x.is_object())
                .map(|(k, _)| k.clone())
                .collect();
            match e {
                ConfigEdit::Set(i, x) if !keys.is_empty() => {
                    map.insert(keys[i % keys.len()].clone(), x.clone());
                }
                ConfigEdit::SetNested(i, j, x) if !nested.is_empty() => {
                    if let Some(inner) = map
                        .get_mut(&nested[i % nested.len()])
                        .and_then(Value::as_object_mut)
                    {
                        let ks: Vec<String> = inner.keys().cloned().collect();
                        if !ks.is_empty() {
                            inner.insert(ks[j % ks.len()].clone(), x.clone());
                        }
                    }
                }
                ConfigEdit::Remove(i) if !keys.is_empty() => {
                    map.remove(&keys[i % keys.len()]);
                }
                ConfigEdit::Byte(i, b) => raw.push((*i, *b)),
                ConfigEdit::Truncate(i) => cut = Some(*i),
                _ => {}
            }
        }
    }
    let mut bytes = v.to_string().into_bytes();
    for (i, b) in raw {
        if !bytes.is_empty() {
            let n = bytes.len();
            bytes[i % n] = b;
        }
    }
    if let Some(i) = cut {
        bytes.truncate(i % (bytes.len() + 1));
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Parses a config.json text, then derives the graph options and builds the
/// forward graph it describes, as `tilefuse generate --model` does.
pub fn check_config(text: &str) -> Result<(), String> {
    let Ok(cfg) = config::parse(text, "config.json") else {
        return Ok(());
    };
    crate::deep();
    let Ok(options) = checkpoint::graph_options(&cfg, &LoadOptions::default()) else {
        return Ok(());
    };
    let _ = cfg.arch.forward_graph(&options);
    Ok(())
}

fn config_json(cases: u32, seed: u64) -> Result<Report, String> {
    crate::run(
        "config",
        (any::<usize>(), prop::collection::vec(config_edit(), 0..5)),
        cases,
        seed,
        |(s, edits)| check_config(&edited_config(*s, edits)),
    )
}

// ---------------------------------------------------------------------------
// safetensors

/// One header entry: `(name, dtype, shape, offsets)`.
pub type StTensor = (String, String, Vec<u64>, Option<Vec<u64>>);

/// A safetensors file, described field by field so that each can lie.
#[derive(Clone, Debug)]
pub struct StFile {
    /// `(name, dtype, shape, offsets)` per tensor; offsets `None` are the
    /// honest ones (tensors back to back, each its shape times its dtype's
    /// size).
    pub tensors: Vec<StTensor>,
    /// What the 8-byte prefix says about the header's length.
    pub length: Lie,
    /// Bytes of data after the header; `None`: exactly what the tensors need.
    pub data: Option<usize>,
    /// One byte of the file replaced, if any: `(position, byte)`.
    pub flip: Option<(usize, u8)>,
}

/// What the header-length prefix says.
#[derive(Clone, Debug)]
pub enum Lie {
    /// The truth.
    Honest,
    /// The truth plus this (wrapping).
    Off(i64),
    /// This value.
    Value(u64),
}

fn dim() -> impl Strategy<Value = u64> {
    prop_oneof![
        40 => 0u64..9,
        2 => Just(16u64),
        1 => Just(128),
        1 => Just(1 << 20),
        1 => Just(1 << 40),
        1 => Just(u64::MAX),
        1 => Just(u64::MAX / 2 + 1),
    ]
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 0u64..80,
        1 => Just(1u64 << 40),
        1 => Just(u64::MAX),
        1 => Just(usize::MAX as u64 - 7),
    ]
}

fn st_file() -> impl Strategy<Value = StFile> {
    let tensor = (
        prop::sample::select(vec![
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.norm.weight",
            "w",
            "w_scale_inv",
            "__metadata__",
            "",
        ]),
        prop::sample::select(vec![
            "F32", "BF16", "F16", "F8_E4M3", "U8", "I8", "I32", "I64", "BOOL", "F64", "X",
        ]),
        prop::collection::vec(dim(), 0..4),
        prop::option::weighted(0.2, prop::collection::vec(offset(), 0..3)),
    )
        .prop_map(|(n, d, s, o)| (n.to_string(), d.to_string(), s, o));
    (
        prop::collection::vec(tensor, 0..4),
        prop_oneof![
            6 => Just(Lie::Honest),
            2 => (-8i64..8).prop_map(Lie::Off),
            1 => prop_oneof![Just(u64::MAX), Just(1u64 << 40), Just(100_000_001), any::<u64>()].prop_map(Lie::Value),
        ],
        prop::option::weighted(0.2, 0usize..160),
        prop::option::weighted(0.1, (any::<usize>(), any::<u8>())),
    )
        .prop_map(|(tensors, length, data, flip)| StFile {
            tensors,
            length,
            data,
            flip,
        })
}

/// The bytes of `f`: the 8-byte header length, the JSON header, the data.
pub fn st_bytes(f: &StFile) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut end = 0u64;
    for (name, dtype, shape, offsets) in &f.tensors {
        let size: u64 = match dtype.as_str() {
            "F32" | "I32" => 4,
            "BF16" | "F16" => 2,
            "F64" | "I64" => 8,
            _ => 1,
        };
        let bytes = shape
            .iter()
            .try_fold(size, |a, &d| a.checked_mul(d))
            .unwrap_or(u64::MAX);
        let offsets = offsets.clone().unwrap_or_else(|| {
            let start = end;
            end = end.saturating_add(bytes);
            vec![start, end]
        });
        let v = if name == "__metadata__" {
            serde_json::json!({"format": "pt"})
        } else {
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": offsets})
        };
        header.insert(name.clone(), v);
    }
    let data = f
        .data
        .unwrap_or(usize::try_from(end).unwrap_or(0).min(1 << 16));
    let h = Value::Object(header).to_string().into_bytes();
    let n = h.len() as u64;
    let len = match f.length {
        Lie::Honest => n,
        Lie::Off(d) => n.wrapping_add_signed(d),
        Lie::Value(v) => v,
    };
    let mut out = len.to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend((0..data).map(|i| (i * 37 % 251) as u8));
    if let Some((i, b)) = f.flip {
        let n = out.len();
        out[i % n] = b;
    }
    out
}

/// Opens the bytes as a checkpoint and reads every tensor's values as the
/// loader does.
pub fn check_safetensors(bytes: Vec<u8>) -> Result<(), String> {
    let Ok(ck) = Checkpoint::from_bytes(Path::new("fuzz"), "model.safetensors", bytes) else {
        return Ok(());
    };
    crate::deep();
    let names: Vec<String> = ck.names().map(str::to_string).collect();
    for name in names {
        let Some(t) = ck.get(&name) else {
            return Err(format!("`{name}` is listed but cannot be fetched"));
        };
        let shape = t.shape.to_vec();
        let _ = ck.floats(&name, &shape, [2, 2]);
    }
    Ok(())
}

fn safetensors(cases: u32, seed: u64) -> Result<Report, String> {
    crate::run("safetensors", st_file(), cases, seed, |f| {
        check_safetensors(st_bytes(f))
    })
}

// ---------------------------------------------------------------------------
// IR text

fn ir_seeds() -> &'static [String] {
    static SEEDS: OnceLock<Vec<String>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut v = Vec::new();
        for g in [
            canonical::norm_linear(tilefuse_ir::DType::MXFP4),
            canonical::attention_block(),
            canonical::full_attention_block(),
            canonical::moe_block(tilefuse_ir::DType::NVFP4),
        ]
        .into_iter()
        .flatten()
        {
            v.push(g.to_string());
        }
        v
    })
}

/// One edit of a printed graph.
#[derive(Clone, Debug)]
pub enum TextEdit {
    /// Replaces the `i`-th token with a piece.
    Token(usize, &'static str),
    /// Deletes the `i`-th line.
    DropLine(usize),
    /// Repeats the `i`-th line.
    DupLine(usize),
    /// Replaces one byte.
    Byte(usize, u8),
}

const PIECES: &[&str] = &[
    "0",
    "1",
    "-1",
    "99999999999999999999",
    "18446744073709551615",
    "4294967296",
    "%0",
    "%999",
    "%-1",
    "T",
    "S+T",
    "2*T",
    "T-S",
    "[",
    "]",
    "{",
    "}",
    "(",
    ")",
    "\"",
    ",",
    "=",
    ":",
    "",
    "bf16",
    "mxfp4",
    "i32",
    "nn.matmul",
    "view.reshape",
    "attn.attention",
    "moe.experts",
    "input",
    "weight",
    "cache",
    "return",
    "nan",
    "inf",
    "1e309",
];

fn text_edit() -> impl Strategy<Value = TextEdit> {
    prop_oneof![
        6 => (any::<usize>(), prop::sample::select(PIECES)).prop_map(|(i, p)| TextEdit::Token(i, p)),
        1 => any::<usize>().prop_map(TextEdit::DropLine),
        1 => any::<usize>().prop_map(TextEdit::DupLine),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| TextEdit::Byte(i, b)),
    ]
}

/// The seed text (a canonical block, or a random graph when `random` is
/// given) with `edits` applied.
pub fn edited_ir(seed: usize, random: &Option<String>, edits: &[TextEdit]) -> String {
    let seeds = ir_seeds();
    let mut text = random
        .clone()
        .unwrap_or_else(|| seeds[seed % seeds.len()].clone());
    for e in edits {
        match e {
            TextEdit::Token(i, p) => {
                // Tokens: maximal runs of letters, digits, `.`, `_`, `%`, `+`, `*`.
                let is_tok = |c: char| c.is_alphanumeric() || "._%+*-".contains(c);
                let mut spans = Vec::new();
                let mut start = None;
                for (k, c) in text.char_indices() {
                    match (is_tok(c), start) {
                        (true, None) => start = Some(k),
                        (false, Some(s)) => {
                            spans.push((s, k));
                            start = None;
                        }
                        _ => {}
                    }
                }
                if let Some(s) = start {
                    spans.push((s, text.len()));
                }
                if !spans.is_empty() {
                    let (a, b) = spans[i % spans.len()];
                    text.replace_range(a..b, p);
                }
            }
            TextEdit::DropLine(i) | TextEdit::DupLine(i) => {
                let mut lines: Vec<&str> = text.lines().collect();
                if !lines.is_empty() {
                    let k = i % lines.len();
                    if matches!(e, TextEdit::DropLine(_)) {
                        lines.remove(k);
                    } else {
                        lines.insert(k, lines[k]);
                    }
                }
                text = lines.join("\n");
            }
            TextEdit::Byte(i, b) => {
                let mut bytes = text.into_bytes();
                if !bytes.is_empty() {
                    let n = bytes.len();
                    bytes[i % n] = *b;
                }
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
        }
    }
    text
}

/// Parses a text; a graph that parses must verify and print to a text that
/// parses back to the same graph.
pub fn check_ir(text: &str) -> Result<(), String> {
    let Ok(g) = text.parse::<Graph>() else {
        return Ok(());
    };
    crate::deep();
    g.verify()
        .map_err(|e| format!("a parsed graph does not verify: {e}"))?;
    let printed = g.to_string();
    let again = printed
        .parse::<Graph>()
        .map_err(|e| format!("the printed graph does not parse back: {e}\n{printed}"))?;
    if again.to_string() != printed {
        return Err(format!("printing is not stable:\n{printed}"));
    }
    Ok(())
}

fn ir_text(cases: u32, seed: u64) -> Result<Report, String> {
    let random = prop::option::weighted(
        0.3,
        tilefuse_ir::testing::arb_graph(10).prop_map(|g| g.to_string()),
    );
    crate::run(
        "ir_text",
        (
            any::<usize>(),
            random,
            prop::collection::vec(text_edit(), 0..4),
        ),
        cases,
        seed,
        |(s, r, e)| check_ir(&edited_ir(*s, r, e)),
    )
}

// ---------------------------------------------------------------------------
// Tokenizer input

fn shipped_tokenizer() -> Option<&'static Tokenizer> {
    static TOK: OnceLock<Option<Tokenizer>> = OnceLock::new();
    TOK.get_or_init(|| {
        Tokenizer::from_json(include_str!(
            "../../models/mimo-v2-code/target/tokenizer.json"
        ))
        .ok()
    })
    .as_ref()
}

/// Arbitrary bytes as a prompt (lossy UTF-8, as the CLI reads text) through
/// the byte tokenizer (which must give the text back) and the shipped
/// tokenizer, and arbitrary ids through both decoders.
pub fn check_tokenizer(bytes: &[u8], ids: &[i32]) -> Result<(), String> {
    let text = String::from_utf8_lossy(bytes);
    crate::deep();
    let bytes_tok = Tokenizer::Bytes;
    let enc = bytes_tok
        .encode(&text)
        .map_err(|e| format!("byte tokens refused text: {e}"))?;
    if bytes_tok.decode(&enc) != text {
        return Err("byte tokens do not give the text back".into());
    }
    let shipped = shipped_tokenizer().ok_or("the shipped tokenizer.json does not load")?;
    for tok in [&bytes_tok, shipped] {
        if let Ok(ids2) = tok.encode(&text) {
            let _ = tok.decode(&ids2);
        }
        let _ = tok.decode(ids);
        let mut s = StreamDecoder::new();
        for &id in ids {
            let _ = s.push(tok, id);
        }
        let _ = s.finish(tok);
    }
    Ok(())
}

fn tokenizer_input(cases: u32, seed: u64) -> Result<Report, String> {
    let text = prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..96),
        1 => "\\PC{0,48}".prop_map(String::into_bytes),
        1 => "(def |class |    |\t|\n|<\\|[a-z_]{0,12}\\|>|[0-9a-z(){}:=]{1,8}){0,12}".prop_map(String::into_bytes),
    ];
    let ids = prop::collection::vec(
        prop_oneof![
            0i32..300,
            Just(-1),
            Just(i32::MAX),
            Just(i32::MIN),
            any::<i32>()
        ],
        0..8,
    );
    crate::run("tokenizer", (text, ids), cases, seed, |(b, i)| {
        check_tokenizer(b, i)
    })
}

// ---------------------------------------------------------------------------
// --prompt-ids

/// Parses `--prompt-ids`: a result holds non-negative ids, one per item; an
/// error names the flag.
pub fn check_prompt_ids(s: &str) -> Result<(), String> {
    match tokenizer::parse_ids(s) {
        Ok(ids) => {
            crate::deep();
            let items = s.split(',').filter(|p| !p.trim().is_empty()).count();
            if ids.len() != items || ids.iter().any(|&i| i < 0) {
                return Err(format!("{s:?} gave {ids:?}"));
            }
            Ok(())
        }
        Err(m) if m.starts_with("--prompt-ids: ") && m.len() < 400 => Ok(()),
        Err(m) => Err(format!("unclear error for {s:?}: {m}")),
    }
}

fn prompt_ids(cases: u32, seed: u64) -> Result<Report, String> {
    let s = prop_oneof![
        3 => "[0-9]{1,5}(,[0-9]{1,5}){0,8}",
        3 => "[0-9, \t+\\-]{0,40}",
        1 => "\\PC{0,40}",
        1 => prop::collection::vec(any::<i64>(), 0..6).prop_map(|v| v.iter().map(i64::to_string).collect::<Vec<_>>().join(",")),
        1 => "[0-9]{9,30}(,[0-9]{1,3}){0,3}",
    ];
    crate::run("prompt_ids", s, cases, seed, |s| check_prompt_ids(s))
}
