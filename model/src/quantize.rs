//! FP4 expert checkpoints: `tilefuse quantize`, and the on-disk layout of FP4
//! experts that tilefuse writes and reads.
//!
//! # Layout
//!
//! Only the routed experts are quantized; every other tensor keeps its name,
//! dtype and bytes. For each sparse layer the two stacked expert tensors
//! `W` = `model.layers.{i}.mlp.experts.gate_up_proj` (`[E, 2I, H]`, the gate
//! rows `0..I` then the up rows `I..2I`, as transformers' MiMo-V2 / Qwen3-MoE
//! `gate_up_proj`) and `model.layers.{i}.mlp.experts.down_proj` (`[E, H, I]`)
//! are stored as, with `B` the block size along the last axis `K`:
//!
//! | tensor | dtype | shape | holds |
//! |---|---|---|---|
//! | `{W}_blocks` | U8 | `[E, N, K/B, B/2]` | E2M1 codes, two per byte, element `2j` in the low nibble |
//! | `{W}_scales` | MXFP4: U8 (or F8_E8M0); NVFP4: F8_E4M3 | `[E, N, K/B]` | one scale per block: E8M0 `2^(s-127)` / E4M3 |
//! | `{W}_scale_2` | F32 | `[1]` (or `[]`) | NVFP4 only: the per-tensor scale |
//!
//! An element is `e2m1(code) × scale` (MXFP4, `B` = 32) or
//! `e2m1(code) × e4m3(scale) × scale_2` (NVFP4, `B` = 16); see
//! [`tilefuse_ir::fp4`] for the scale choice and its error bound. The MXFP4
//! tensors are the OCP MX layout with gpt-oss's names (`*_blocks` codes and
//! `*_scales` E8M0 bytes), so a checkpoint already in that layout loads as it
//! is; unlike gpt-oss, the gate and up rows are not interleaved.
//!
//! `config.json` gets a `quantization_config`:
//!
//! ```json
//! {"quant_method": "mxfp4", "weight_block_size": 32, "scale_format": "e8m0",
//!  "modules": ["mlp.experts"], "layout": "tilefuse-fp4-v1", "base": {...}}
//! ```
//!
//! (`nvfp4`, 16, `e4m3` for NVFP4), with `base` the checkpoint's previous
//! `quantization_config` (FP8 non-expert weights stay FP8). transformers has
//! no FP4 path for these architectures; tilefuse reads these checkpoints.

use std::borrow::Cow;
use std::path::Path;

use safetensors::Dtype;
use serde_json::{json, Value};
use tilefuse_ir::fp4::{self, Fp4Format, Fp4Tensor};

use crate::checkpoint::{
    self, per_expert_names, Checkpoint, ExpertKind, ExpertWeights, INDEX_FILE, SINGLE_FILE,
};
use crate::error::{fmt_shape, LoadError, Result};
use crate::export::{self, OutTensor, StagingDir};
use crate::presets::Arch;

/// The `layout` string of the `quantization_config` tilefuse writes.
pub const LAYOUT: &str = "tilefuse-fp4-v1";

/// The `quantization_config` of FP4 experts in `format`, keeping `base`.
pub fn quantization_config(format: Fp4Format, base: Option<Value>) -> Value {
    let (method, scale) = match format {
        Fp4Format::Mx => ("mxfp4", "e8m0"),
        Fp4Format::Nv => ("nvfp4", "e4m3"),
    };
    let mut v = json!({
        "quant_method": method,
        "weight_block_size": format.block_size(),
        "scale_format": scale,
        "modules": ["mlp.experts"],
        "layout": LAYOUT,
    });
    if let Some(b) = base {
        v["base"] = b;
    }
    v
}

/// The on-disk tensors of the FP4 stacked expert tensor `name` of `shape`.
pub fn fp4_tensors(
    name: &str,
    shape: &[usize],
    q: &Fp4Tensor,
) -> Result<Vec<(String, OutTensor<'static>)>> {
    let b = q.format.block_size();
    let (lead, k) = match shape.split_last() {
        Some((&k, lead)) if k.is_multiple_of(b) => (lead.to_vec(), k),
        _ => {
            return Err(LoadError::new(format!(
                "FP4 tensor `{name}` of shape {} has no last axis of whole {b}-blocks",
                fmt_shape(shape)
            )))
        }
    };
    let mut blocks_shape = lead.clone();
    blocks_shape.extend([k / b, b / 2]);
    let mut scales_shape = lead;
    scales_shape.push(k / b);
    let scale_dtype = match q.format {
        Fp4Format::Mx => Dtype::U8,
        Fp4Format::Nv => Dtype::F8_E4M3,
    };
    let mut out = vec![
        (
            format!("{name}_blocks"),
            OutTensor {
                dtype: Dtype::U8,
                shape: blocks_shape,
                data: Cow::Owned(q.codes.clone()),
            },
        ),
        (
            format!("{name}_scales"),
            OutTensor {
                dtype: scale_dtype,
                shape: scales_shape,
                data: Cow::Owned(q.scales.clone()),
            },
        ),
    ];
    if q.format == Fp4Format::Nv {
        out.push((
            format!("{name}_scale_2"),
            OutTensor {
                dtype: Dtype::F32,
                shape: vec![1],
                data: Cow::Owned(q.tensor_scale.to_le_bytes().to_vec()),
            },
        ));
    }
    Ok(out)
}

/// Reads the FP4 stacked expert tensor `name` of `shape` `[E, N, K]` (see
/// the module docs); the format follows from the scales' dtype.
pub fn read_fp4(ck: &Checkpoint, name: &str, shape: &[usize]) -> Result<Fp4Tensor> {
    let blocks = ck.require(&format!("{name}_blocks"))?;
    let scales = ck.require(&format!("{name}_scales"))?;
    let format = match scales.dtype {
        Dtype::U8 | Dtype::F8_E8M0 => Fp4Format::Mx,
        Dtype::F8_E4M3 => Fp4Format::Nv,
        other => {
            return Err(LoadError::new(format!(
                "tensor `{}` in {} has dtype {other:?}; FP4 scales are U8 / F8_E8M0 (MXFP4) or F8_E4M3 (NVFP4)",
                scales.name, scales.file
            )))
        }
    };
    let b = format.block_size();
    let Some((&k, lead)) = shape.split_last() else {
        return Err(LoadError::new(format!(
            "`{name}` needs a shape with a last axis"
        )));
    };
    let mut want_blocks = lead.to_vec();
    want_blocks.extend([k / b, b / 2]);
    let mut want_scales = lead.to_vec();
    want_scales.push(k / b);
    let fmt_name = format.dtype().name();
    if !k.is_multiple_of(b) || blocks.dtype != Dtype::U8 || blocks.shape != want_blocks.as_slice() {
        return Err(LoadError::new(format!(
            "tensor `{}` in {} is {:?} {}, expected U8 {} ({fmt_name} codes of a {} weight, as its {:?} scales say)",
            blocks.name,
            blocks.file,
            blocks.dtype,
            fmt_shape(blocks.shape),
            fmt_shape(&want_blocks),
            fmt_shape(shape),
            scales.dtype
        )));
    }
    if scales.shape != want_scales.as_slice() {
        return Err(LoadError::new(format!(
            "tensor `{}` in {} has shape {}, expected {} (one {fmt_name} scale per {b} elements of a {} weight)",
            scales.name,
            scales.file,
            fmt_shape(scales.shape),
            fmt_shape(&want_scales),
            fmt_shape(shape)
        )));
    }
    if format == Fp4Format::Mx {
        if let Some(i) = scales.data.iter().position(|&s| s == 255) {
            return Err(LoadError::new(format!(
                "tensor `{}` in {} holds the NaN scale 255 at index {i}",
                scales.name, scales.file
            )));
        }
    }
    let tensor_scale = match format {
        Fp4Format::Mx => 1.0,
        Fp4Format::Nv => {
            let s2 = ck.require(&format!("{name}_scale_2"))?;
            let one = s2.shape.iter().product::<usize>() == 1 && s2.shape.len() <= 1;
            let v = (s2.dtype == Dtype::F32 && one)
                .then(|| f32::from_le_bytes([s2.data[0], s2.data[1], s2.data[2], s2.data[3]]))
                .filter(|v| *v > 0.0 && v.is_finite());
            v.ok_or_else(|| {
                LoadError::new(format!(
                    "tensor `{}` in {} must be one positive finite F32 (the NVFP4 tensor scale), found {:?} {}",
                    s2.name,
                    s2.file,
                    s2.dtype,
                    fmt_shape(s2.shape)
                ))
            })?
        }
    };
    Ok(Fp4Tensor {
        format,
        codes: blocks.data.to_vec(),
        scales: scales.data.to_vec(),
        tensor_scale,
    })
}

/// The sparse layers of `arch` with the shapes of their two stacked expert
/// tensors: `(layer, [E, 2I, H], [E, H, I])`.
pub fn expert_layers(arch: &Arch) -> Vec<(usize, [usize; 3], [usize; 3])> {
    match arch {
        Arch::MimoV2(c) => (0..c.num_hidden_layers)
            .filter(|&i| !c.dense_layers[i])
            .map(|i| {
                let (e, h, n) = (c.n_routed_experts, c.hidden_size, c.moe_intermediate_size);
                (i, [e, 2 * n, h], [e, h, n])
            })
            .collect(),
        Arch::Qwen3Moe(c) => (0..c.num_hidden_layers)
            .filter(|&i| c.is_sparse(i))
            .map(|i| {
                let (e, h, n) = (c.num_experts, c.hidden_size, c.moe_intermediate_size);
                (i, [e, 2 * n, h], [e, h, n])
            })
            .collect(),
    }
}

/// What [`quantize_checkpoint`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizeReport {
    /// Sparse layers quantized.
    pub layers: usize,
    /// Expert parameters quantized.
    pub parameters: usize,
    /// Bytes of the expert tensors read.
    pub bytes_before: usize,
    /// Bytes of the FP4 expert tensors written.
    pub bytes_after: usize,
    /// Tensors copied unchanged.
    pub copied: usize,
}

/// Writes a copy of checkpoint `src` with its routed experts in `format` to
/// `out` (which must not exist), atomically. Other tensors and files
/// (tokenizer, generation config) are copied as they are.
pub fn quantize_checkpoint(src: &Path, out: &Path, format: Fp4Format) -> Result<QuantizeReport> {
    let cfg = checkpoint::read_config(src)?;
    if let Some(f) = cfg.quantization.fp4 {
        return Err(LoadError::new(format!(
            "{} already has {} experts (quantization_config); quantize the original checkpoint",
            src.display(),
            f.dtype()
        )));
    }
    let ck = Checkpoint::open(src)?;
    let block = checkpoint::fp8_block(&cfg);
    let stage = StagingDir::new(out)?;
    let mut consumed = std::collections::BTreeSet::new();
    let mut tensors: Vec<(String, OutTensor<'_>)> = Vec::new();
    let mut report = QuantizeReport {
        layers: 0,
        parameters: 0,
        bytes_before: 0,
        bytes_after: 0,
        copied: 0,
    };
    for (layer, gate_up, down) in expert_layers(&cfg.arch) {
        let prefix = format!("model.layers.{layer}.mlp.experts");
        for (kind, shape) in [(ExpertKind::GateUp, gate_up), (ExpertKind::Down, down)] {
            let name = format!("{prefix}.{}", kind.stacked_name());
            let values = match checkpoint::read_experts(&ck, &prefix, kind, shape, block)? {
                ExpertWeights::Floats(v) => v,
                ExpertWeights::Fp4(_) => {
                    return Err(LoadError::new(format!(
                        "`{name}` is already FP4 in {}; quantize the original checkpoint",
                        src.display()
                    )))
                }
            };
            // The source tensors this replaces (whichever layout held them).
            let mut sources = vec![name.clone()];
            for e in 0..shape[0] {
                sources.extend(per_expert_names(&prefix, kind, e));
            }
            for s in sources {
                if let Some(t) = ck.get(&s) {
                    report.bytes_before += t.data.len();
                    consumed.insert(s.clone());
                    let scale = format!("{s}_scale_inv");
                    if let Some(t) = ck.get(&scale) {
                        report.bytes_before += t.data.len();
                        consumed.insert(scale);
                    }
                }
            }
            let q = fp4::quantize(&values, shape[2], format)
                .map_err(|m| LoadError::new(format!("`{name}`: {m}")))?;
            report.parameters += values.len();
            report.bytes_after += q.storage_bytes();
            tensors.extend(fp4_tensors(&name, &shape, &q)?);
        }
        report.layers += 1;
    }
    for name in ck.names() {
        if consumed.contains(name) {
            continue;
        }
        let t = ck.require(name)?;
        tensors.push((
            name.to_string(),
            OutTensor {
                dtype: t.dtype,
                shape: t.shape.to_vec(),
                data: Cow::Borrowed(t.data),
            },
        ));
        report.copied += 1;
    }
    export::write_safetensors(&stage.path().join(SINGLE_FILE), tensors)?;

    // config.json: as it was, plus the FP4 quantization_config.
    let cfg_path = src.join("config.json");
    let mut json: Value = serde_json::from_str(&checkpoint::read_text(&cfg_path)?)
        .map_err(|e| LoadError::new(format!("{} is not valid JSON: {e}", cfg_path.display())))?;
    let base = json
        .get("quantization_config")
        .filter(|v| !v.is_null())
        .cloned();
    json["quantization_config"] = quantization_config(format, base);
    export::write_json(&stage.path().join("config.json"), &json)?;

    // Tokenizer and generation files, as they are.
    let entries = std::fs::read_dir(src)
        .map_err(|e| LoadError::new(format!("cannot list {}: {e}", src.display())))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let skip = name == "config.json"
            || name == INDEX_FILE
            || name.ends_with(".safetensors")
            || name.starts_with('.');
        if skip || !entry.path().is_file() {
            continue;
        }
        std::fs::copy(entry.path(), stage.path().join(&name))
            .map_err(|e| LoadError::new(format!("cannot copy {}: {e}", entry.path().display())))?;
    }
    stage.commit()?;
    Ok(report)
}
