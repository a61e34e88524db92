//! Inputs the fuzz targets found or the issue named, each now a clear error
//! (with the field and what to do) instead of a hang, a panic or a huge
//! allocation. The fuzz crate's allocator aborts on any allocation above
//! 1 GiB, so a test that passes here allocated no such thing.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use tilefuse_fuzz::targets::{check_config, check_safetensors};
use tilefuse_model::checkpoint::Checkpoint;
use tilefuse_model::{config, presets};

fn qwen_tiny_with(key: &str, value: serde_json::Value) -> String {
    let p = presets::by_name("qwen3-moe-tiny").unwrap();
    let mut j = config::to_json(&p.arch, tilefuse_ir::DType::BF16, 4096);
    j[key] = value;
    j.to_string()
}

/// Found by the `config` target: `num_hidden_layers` = 2^64 - 1 parsed, and
/// building the graph of that many layers never ended.
#[test]
fn a_config_with_billions_of_layers_is_refused() {
    let text = qwen_tiny_with("num_hidden_layers", u64::MAX.into());
    let e = config::parse(&text, "config.json").unwrap_err().to_string();
    assert!(
        e.contains(
            "`num_hidden_layers` must be a positive integer below 2^31, found 18446744073709551615"
        ),
        "{e}"
    );
    check_config(&text).unwrap();
    let text = qwen_tiny_with("num_hidden_layers", 1_000_000.into());
    let e = config::parse(&text, "config.json").unwrap_err().to_string();
    assert!(
        e.contains("`num_hidden_layers` = 1000000 is more layers than tilefuse builds (at most 4096); check the config.json"),
        "{e}"
    );
}

#[test]
fn sizes_past_an_int_are_refused() {
    for key in [
        "hidden_size",
        "vocab_size",
        "num_experts",
        "max_position_embeddings",
    ] {
        let text = qwen_tiny_with(key, (1u64 << 31).into());
        let e = config::parse(&text, "config.json").unwrap_err().to_string();
        assert!(e.contains(&format!("`{key}` must be a")), "{key}: {e}");
        assert!(e.contains("below 2^31, found 2147483648"), "{key}: {e}");
    }
}

fn file(header: &str, declared_len: u64, data: usize) -> Vec<u8> {
    let mut out = declared_len.to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend(std::iter::repeat_n(0u8, data));
    out
}

/// A header that claims a terabyte tensor in a file of a few bytes: a clear
/// error naming the file, never an allocation of that size.
#[test]
fn a_header_claiming_a_terabyte_tensor_is_a_clear_error() {
    let h = r#"{"w":{"dtype":"BF16","shape":[1048576,524288],"data_offsets":[0,1099511627776]}}"#;
    let bytes = file(h, h.len() as u64, 64);
    let e = Checkpoint::from_bytes(Path::new("ck"), "model.safetensors", bytes.clone())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors is truncated: its tensors end at byte 1099511627864"),
        "{e}"
    );
    assert!(e.contains("re-download or re-save the checkpoint"), "{e}");
    check_safetensors(bytes).unwrap();
}

/// Header lengths that lie: past the file, or near 2^64.
#[test]
fn header_lengths_that_lie_are_clear_errors() {
    let h = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    for len in [u64::MAX, 1 << 40, h.len() as u64 + 1, 0] {
        let e = Checkpoint::from_bytes(Path::new("ck"), "model.safetensors", file(h, len, 8))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("model.safetensors "), "{len}: {e}");
        assert!(
            e.contains("re-download or re-save the checkpoint"),
            "{len}: {e}"
        );
    }
    // The honest file reads.
    let ck = Checkpoint::from_bytes(
        Path::new("ck"),
        "model.safetensors",
        file(h, h.len() as u64, 8),
    )
    .unwrap();
    assert_eq!(ck.floats("w", &[2], [2, 2]).unwrap(), vec![0.0, 0.0]);
}
