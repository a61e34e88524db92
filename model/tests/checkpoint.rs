//! Checkpoint directories: the layouts read (per-expert and stacked experts,
//! shards, FP8 block scales, FP4 experts, tied embeddings), `init` and
//! `quantize` round trips, and errors that name the tensor.

#![allow(clippy::unwrap_used)]

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::{json, Value};
use tilefuse_ir::fp4::{self, Fp4Format};
use tilefuse_ir::interp::{Data, Tensor};
use tilefuse_ir::DType;
use tilefuse_model::checkpoint::{self, Checkpoint, LoadOptions};
use tilefuse_model::export::{self, OutTensor};
use tilefuse_model::{presets, quantize};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary directory")
}

/// `init` of a preset into `dir/name`.
fn init(dir: &Path, preset: &str, name: &str) -> PathBuf {
    let out = dir.join(name);
    let p = presets::by_name(preset).expect("preset");
    export::init(&p, 0, &out).unwrap_or_else(|e| panic!("init {preset}: {e}"));
    out
}

/// Every tensor of a checkpoint as owned [`OutTensor`]s, by name.
fn tensors(dir: &Path) -> BTreeMap<String, OutTensor<'static>> {
    let ck = Checkpoint::open(dir).expect("checkpoint");
    ck.names()
        .map(|n| {
            let t = ck.get(n).expect("listed");
            let owned = OutTensor {
                dtype: t.dtype,
                shape: t.shape.to_vec(),
                data: Cow::Owned(t.data.to_vec()),
            };
            (n.to_string(), owned)
        })
        .collect()
}

fn write(dir: &Path, file: &str, t: BTreeMap<String, OutTensor<'static>>) {
    export::write_safetensors(&dir.join(file), t.into_iter().collect()).expect("write safetensors");
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut Value)) {
    let path = dir.join("config.json");
    let mut v: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("config")).expect("json");
    f(&mut v);
    std::fs::write(&path, v.to_string()).expect("write config");
}

fn load(dir: &Path, opts: LoadOptions) -> BTreeMap<String, Tensor> {
    checkpoint::load(dir, &opts)
        .unwrap_or_else(|e| panic!("load {}: {e}", dir.display()))
        .weights
}

fn load_err(dir: &Path) -> String {
    checkpoint::load(dir, &LoadOptions::default())
        .map(|_| ())
        .expect_err("the load must fail")
        .to_string()
}

fn f32s(t: &OutTensor<'_>) -> Vec<f32> {
    match t.dtype {
        Dtype::BF16 => t
            .data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F32 => t
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        d => panic!("unexpected {d:?}"),
    }
}

#[test]
fn init_round_trips_the_preset_weights() {
    let dir = tmp();
    for preset in ["mimo-v2-tiny", "mimo-v2-tiny-mxfp4", "qwen3-moe-tiny"] {
        let out = init(dir.path(), preset, preset);
        let p = presets::by_name(preset).expect("preset");
        let graph = p.arch.forward_graph(&p.options).expect("graph");
        let want = presets::random_weights(&graph, 0).expect("weights");
        let got = load(
            &out,
            LoadOptions {
                context: Some(p.options.context),
                max_tokens: Some(p.options.max_tokens),
                ..LoadOptions::default()
            },
        );
        assert_eq!(got, want, "{preset}");
    }
    // On-disk names: per-expert tensors and attention_sink_bias, as save_pretrained writes.
    let ck = Checkpoint::open(&dir.path().join("mimo-v2-tiny")).expect("open");
    assert!(ck.contains("model.layers.1.mlp.experts.7.up_proj.weight"));
    assert!(ck.contains("model.layers.1.self_attn.attention_sink_bias"));
    assert!(!ck.contains("model.layers.1.self_attn.sinks"));
    assert_eq!(
        ck.get("model.layers.1.mlp.gate.e_score_correction_bias")
            .map(|t| t.dtype),
        Some(Dtype::F32)
    );
}

#[test]
fn stacked_experts_and_shards_load_the_same() {
    let dir = tmp();
    let src = init(dir.path(), "mimo-v2-tiny", "src");
    let want = load(&src, LoadOptions::default());

    // Stacked `gate_up_proj` / `down_proj` (transformers' in-memory names), in two shards.
    let stacked = dir.path().join("stacked");
    std::fs::create_dir(&stacked).expect("mkdir");
    std::fs::copy(src.join("config.json"), stacked.join("config.json")).expect("copy");
    let mut all = tensors(&src);
    let (e, i) = (8, 32);
    for layer in [1, 2] {
        let p = format!("model.layers.{layer}.mlp.experts");
        let (mut gu, mut dn) = (Vec::new(), Vec::new());
        for x in 0..e {
            for part in ["gate_proj", "up_proj"] {
                gu.extend_from_slice(
                    &all.remove(&format!("{p}.{x}.{part}.weight"))
                        .expect("expert")
                        .data,
                );
            }
            dn.extend_from_slice(
                &all.remove(&format!("{p}.{x}.down_proj.weight"))
                    .expect("expert")
                    .data,
            );
        }
        all.insert(
            format!("{p}.gate_up_proj"),
            OutTensor {
                dtype: Dtype::BF16,
                shape: vec![e, 2 * i, 64],
                data: Cow::Owned(gu),
            },
        );
        all.insert(
            format!("{p}.down_proj"),
            OutTensor {
                dtype: Dtype::BF16,
                shape: vec![e, 64, i],
                data: Cow::Owned(dn),
            },
        );
    }
    let mut a = BTreeMap::new();
    let mut b = BTreeMap::new();
    let mut map = serde_json::Map::new();
    for (n, t) in all {
        let file = if n.starts_with("model.layers.2") || n.starts_with("lm_head") {
            "model-00002-of-00002.safetensors"
        } else {
            "model-00001-of-00002.safetensors"
        };
        map.insert(n.clone(), json!(file));
        if file.contains("00001") {
            a.insert(n, t);
        } else {
            b.insert(n, t);
        }
    }
    write(&stacked, "model-00001-of-00002.safetensors", a);
    write(&stacked, "model-00002-of-00002.safetensors", b);
    let index = json!({"metadata": {}, "weight_map": map});
    std::fs::write(stacked.join(checkpoint::INDEX_FILE), index.to_string()).expect("index");
    assert_eq!(load(&stacked, LoadOptions::default()), want);

    // An index that points a tensor at the wrong shard.
    let mut bad = index.clone();
    bad["weight_map"]["lm_head.weight"] = json!("model-00001-of-00002.safetensors");
    std::fs::write(stacked.join(checkpoint::INDEX_FILE), bad.to_string()).expect("index");
    let e = load_err(&stacked);
    assert!(
        e.contains("maps `lm_head.weight` to model-00001-of-00002.safetensors"),
        "{e}"
    );
}

#[test]
fn fp8_weights_dequantize_with_block_scales() {
    let dir = tmp();
    let src = init(dir.path(), "qwen3-moe-tiny", "src");
    let name = "model.layers.0.self_attn.q_proj.weight"; // [64, 64]
    let mut all = tensors(&src);
    let orig = f32s(&all[name]);
    // 32 x 32 blocks: 2 x 2 scales; codes of value / scale.
    let scales = [0.5f32, 0.25, 0.125, 2.0];
    let mut codes = Vec::new();
    let mut want = Vec::new();
    for r in 0..64 {
        for c in 0..64 {
            let s = scales[(r / 32) * 2 + c / 32];
            let byte = fp4::e4m3_encode(orig[r * 64 + c] / s);
            codes.push(byte);
            want.push(half::bf16::from_f32(fp4::e4m3_decode(byte) * s).to_f32());
        }
    }
    all.insert(
        name.into(),
        OutTensor {
            dtype: Dtype::F8_E4M3,
            shape: vec![64, 64],
            data: Cow::Owned(codes),
        },
    );
    let scale_bytes: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
    all.insert(
        format!("{name}_scale_inv"),
        OutTensor {
            dtype: Dtype::F32,
            shape: vec![2, 2],
            data: Cow::Owned(scale_bytes),
        },
    );
    let fp8 = dir.path().join("fp8");
    std::fs::create_dir(&fp8).expect("mkdir");
    std::fs::copy(src.join("config.json"), fp8.join("config.json")).expect("copy");
    edit_config(
        &fp8,
        |v| {
            v["quantization_config"] =
                json!({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [32, 32]})
        },
    );
    let scale_inv = all.remove(&format!("{name}_scale_inv")).expect("scale");
    let mut with_scale = all.clone();
    with_scale.insert(format!("{name}_scale_inv"), scale_inv);
    write(&fp8, checkpoint::SINGLE_FILE, with_scale);
    let got = load(&fp8, LoadOptions::default());
    assert_eq!(got[name].to_f32(), want);

    // Without its scales, the FP8 tensor is named.
    write(&fp8, checkpoint::SINGLE_FILE, all);
    let e = load_err(&fp8);
    assert!(
        e.contains(&format!("`{name}_scale_inv` (its block scales) is missing")),
        "{e}"
    );
}

fn experts_of(w: &BTreeMap<String, Tensor>) -> Vec<(&String, &Tensor)> {
    w.iter().filter(|(n, _)| n.contains(".experts.")).collect()
}

#[test]
fn quantized_checkpoints_load_as_quantizing_at_load() {
    let dir = tmp();
    let src = init(dir.path(), "mimo-v2-tiny", "src");
    for (format, dtype) in [(Fp4Format::Mx, DType::MXFP4), (Fp4Format::Nv, DType::NVFP4)] {
        let out = dir.path().join(format!("{dtype}"));
        let r = quantize::quantize_checkpoint(&src, &out, format).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.layers, 2);
        // The config names the format; the experts load in it without requantizing.
        let cfg = checkpoint::read_config(&out).expect("config");
        assert_eq!(cfg.quantization.fp4, Some(format));
        let from_disk = load(&out, LoadOptions::default());
        let at_load = load(
            &src,
            LoadOptions {
                expert_dtype: Some(dtype),
                ..LoadOptions::default()
            },
        );
        assert_eq!(from_disk, at_load, "{dtype}");
        assert!(experts_of(&from_disk)
            .iter()
            .all(|(_, t)| t.dtype == dtype && matches!(t.data, Data::Fp4(_))));
        // Dequantized (then rounded to bf16) for a bf16 graph.
        let as_bf16 = load(
            &out,
            LoadOptions {
                expert_dtype: Some(DType::BF16),
                ..LoadOptions::default()
            },
        );
        for (n, t) in experts_of(&from_disk) {
            let want: Vec<f32> = t
                .to_f32()
                .into_iter()
                .map(|x| half::bf16::from_f32(x).to_f32())
                .collect();
            assert!(
                as_bf16[n].to_f32() == want,
                "{n}: dequantized values differ"
            );
        }
        // The rest is byte for byte the source.
        let (a, b) = (tensors(&src), tensors(&out));
        for (n, t) in &a {
            if !n.contains(".experts.") {
                assert_eq!(b[n].data, t.data, "{n}");
            }
        }
        // No quantizing twice.
        let e = quantize::quantize_checkpoint(&out, &dir.path().join("again"), format)
            .expect_err("twice")
            .to_string();
        assert!(e.contains("already has"), "{e}");
    }
}

#[test]
fn mxfp4_with_e8m0_scales_loads() {
    // The OCP layout as gpt-oss stores it: `*_blocks` U8 and `*_scales` (here F8_E8M0).
    let dir = tmp();
    let src = init(dir.path(), "mimo-v2-tiny-mxfp4", "src");
    let want = load(&src, LoadOptions::default());
    let mut all = tensors(&src);
    for (n, t) in all.iter_mut() {
        if n.ends_with("_scales") {
            t.dtype = Dtype::F8_E8M0;
        }
    }
    write(&src, checkpoint::SINGLE_FILE, all.clone());
    assert_eq!(load(&src, LoadOptions::default()), want);

    // A wrong block shape names the tensor and both shapes.
    let n = "model.layers.1.mlp.experts.down_proj_blocks";
    all.get_mut(n).expect("blocks").shape = vec![8, 32, 2, 16];
    write(&src, checkpoint::SINGLE_FILE, all);
    let e = load_err(&src);
    assert!(
        e.contains(&format!("tensor `{n}`"))
            && e.contains("[8, 32, 2, 16]")
            && e.contains("[8, 64, 1, 16]"),
        "{e}"
    );
}

#[test]
fn tied_embeddings_and_missing_lm_head() {
    let dir = tmp();
    let src = init(dir.path(), "qwen3-moe-tiny", "src");
    let mut all = tensors(&src);
    all.remove("lm_head.weight");
    write(&src, checkpoint::SINGLE_FILE, all);
    let e = load_err(&src);
    assert!(e.contains("tensor `lm_head.weight` is missing"), "{e}");
    edit_config(&src, |v| v["tie_word_embeddings"] = json!(true));
    let w = load(&src, LoadOptions::default());
    assert_eq!(w["lm_head.weight"], w["model.embed_tokens.weight"]);
}

#[test]
fn staging_never_leaves_a_partial_directory() {
    let dir = tmp();
    let src = init(dir.path(), "qwen3-moe-tiny", "src");
    // An existing output is refused and left alone.
    let e = quantize::quantize_checkpoint(&src, &src, Fp4Format::Mx)
        .expect_err("exists")
        .to_string();
    assert!(e.contains("already exists"), "{e}");
    assert!(src.join("model.safetensors").exists());
    // A failure midway (a truncated expert) removes the staging directory.
    let mut all = tensors(&src);
    all.get_mut("model.layers.1.mlp.experts.5.down_proj.weight")
        .expect("expert")
        .shape = vec![64, 16];
    let t = all
        .get_mut("model.layers.1.mlp.experts.5.down_proj.weight")
        .expect("expert");
    t.data = Cow::Owned(t.data[..64 * 16 * 2].to_vec());
    write(&src, checkpoint::SINGLE_FILE, all);
    let out = dir.path().join("out");
    let e = quantize::quantize_checkpoint(&src, &out, Fp4Format::Mx)
        .expect_err("bad shape")
        .to_string();
    assert!(e.contains("has shape [64, 16], expected [64, 32]"), "{e}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("src")],
        "nothing but the source remains"
    );
}

#[test]
fn unused_tensors_are_reported() {
    let dir = tmp();
    let src = init(dir.path(), "mimo-v2-tiny", "src");
    let m = checkpoint::load(&src, &LoadOptions::default()).expect("load");
    assert!(m.unused.is_empty(), "{:?}", m.unused);
    let mut all = tensors(&src);
    let bias = OutTensor {
        dtype: Dtype::BF16,
        shape: vec![96],
        data: Cow::Owned(vec![0; 192]),
    };
    all.insert("model.layers.0.self_attn.q_proj.bias".into(), bias.clone());
    all.insert("model.mtp.layers.0.self_attn.q_proj.weight".into(), bias);
    write(&src, checkpoint::SINGLE_FILE, all);
    let m = checkpoint::load(&src, &LoadOptions::default()).expect("load");
    assert_eq!(m.unused, ["model.layers.0.self_attn.q_proj.bias"]);
}
