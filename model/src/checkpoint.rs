//! Hugging Face checkpoint directories: safetensors files (memory-mapped,
//! sharded through `model.safetensors.index.json`), the mapping from on-disk
//! tensor names to the graphs' weight names, and conversion to the dtypes a
//! graph declares.
//!
//! # Tensor names
//!
//! Graph weights carry the transformers in-memory names. On disk:
//!
//! | graph weight | read from |
//! |---|---|
//! | `model.layers.{i}.self_attn.sinks` | `self_attn.attention_sink_bias` (what `save_pretrained` and the hub write), else `self_attn.sinks` |
//! | `model.layers.{i}.mlp.experts.gate_up_proj` `[E, 2I, H]` | stacked `gate_up_proj`; else FP4 `gate_up_proj_blocks` + `_scales` (see [`crate::quantize`]); else per expert `experts.{e}.gate_proj.weight` `[I, H]` then `experts.{e}.up_proj.weight` (gate rows first) |
//! | `model.layers.{i}.mlp.experts.down_proj` `[E, H, I]` | stacked `down_proj`; else FP4 `down_proj_blocks` + `_scales`; else `experts.{e}.down_proj.weight` `[H, I]` |
//! | `lm_head.weight` | `lm_head.weight`, else `model.embed_tokens.weight` when `tie_word_embeddings` |
//! | anything else | the same name |
//!
//! Tensors the graph does not use (`model.mtp.*`, rotary buffers) are ignored.
//!
//! # Dtypes
//!
//! Float tensors (F32, F16, BF16) are converted to the dtype the graph
//! declares (rounded to nearest even). FP8 E4M3 weights with a
//! `{name}_scale_inv` tensor of block scales (`quantization_config.weight_block_size`,
//! 128 × 128 by default) are dequantized as `e4m3 × scale_inv` and rounded to
//! bf16, as transformers does, then to the graph's dtype. Expert weights are
//! quantized to FP4 here when the graph asks for MXFP4 or NVFP4 and the
//! checkpoint holds floats; FP4 experts already in the graph's format are taken
//! as they are, and dequantized when the graph wants floats.
//!
//! Every error names the tensor and the file, and says what was expected and
//! what was found.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde_json::Value;
use tilefuse_ir::fp4::{self, Fp4Format, Fp4Tensor};
use tilefuse_ir::interp::Tensor;
use tilefuse_ir::{Bindings, DType, Graph, InputKind};

use crate::common::GraphOptions;
use crate::config::{self, ModelConfig};
use crate::error::{fmt_shape, LoadError, Result};

/// The file of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The bytes of one safetensors file: mapped from disk, or held in memory
/// ([`Checkpoint::from_bytes`]).
#[derive(Debug)]
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// One safetensors file.
#[derive(Debug)]
struct Shard {
    /// The file name, for errors.
    name: String,
    map: Bytes,
    /// Offset of the tensor data (after the header).
    data_start: usize,
}

/// Where one tensor lives.
#[derive(Clone, Debug)]
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A tensor's raw bytes in a checkpoint.
#[derive(Clone, Copy, Debug)]
pub struct RawTensor<'a> {
    /// Its name.
    pub name: &'a str,
    /// The file that holds it.
    pub file: &'a str,
    /// Its safetensors dtype.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: &'a [usize],
    /// Its bytes, little-endian, row-major.
    pub data: &'a [u8],
}

/// The safetensors files of a checkpoint directory, memory-mapped, with a
/// name → location table over all shards.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, Entry>,
    /// Names fetched with [`Checkpoint::get`] so far.
    read: RefCell<BTreeSet<String>>,
}

/// Reads a file of a checkpoint as text, with an error naming it.
pub fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| LoadError::new(format!("cannot read {}: {e}", path.display())))
}

/// Checks that `dir` is a directory with a `config.json`.
fn check_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Err(LoadError::new(format!(
            "{} does not exist; pass a checkpoint directory",
            dir.display()
        )));
    }
    if !dir.is_dir() {
        return Err(LoadError::new(format!(
            "{} is not a directory; pass the checkpoint directory that holds config.json",
            dir.display()
        )));
    }
    Ok(())
}

/// The parsed `config.json` of a checkpoint directory.
pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    check_dir(dir)?;
    let path = dir.join("config.json");
    if !path.exists() {
        return Err(LoadError::new(format!(
            "{} has no config.json; point at a Hugging Face checkpoint directory",
            dir.display()
        )));
    }
    config::parse(&read_text(&path)?, &path.display().to_string())
}

/// The end-of-sequence token ids of a checkpoint: `eos_token_id` of its
/// config and of its `generation_config.json` (one id or a list), if any.
pub fn eos_token_ids(dir: &Path, cfg: &ModelConfig) -> Vec<i64> {
    let mut ids = cfg.eos_token_ids.clone();
    let generation = std::fs::read_to_string(dir.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok());
    match generation.as_ref().and_then(|g| g.get("eos_token_id")) {
        Some(Value::Number(n)) => ids.extend(n.as_i64()),
        Some(Value::Array(a)) => ids.extend(a.iter().filter_map(Value::as_i64)),
        _ => {}
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Why a safetensors file could not be read, in words.
fn explain(file: &str, len: usize, bytes: &[u8], e: &SafeTensorError) -> String {
    let fix = "re-download or re-save the checkpoint";
    match e {
        SafeTensorError::HeaderTooSmall => {
            format!("{file} is truncated: {len} bytes cannot hold a safetensors header; {fix}")
        }
        SafeTensorError::InvalidHeaderLength => {
            let n = bytes
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_le_bytes);
            format!("{file} is truncated or not a safetensors file: its header claims {n} bytes but the file holds {len}; {fix}")
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            // The header parsed: say where the tensors end.
            let end = header_data_end(bytes);
            match end {
                Some((n, end)) if 8 + n + end > len => format!(
                    "{file} is truncated: its tensors end at byte {} but the file holds {len} bytes; {fix}",
                    8 + n + end
                ),
                Some((n, end)) => format!(
                    "{file} has {} bytes after its last tensor (ending at byte {}); {fix}",
                    len - (8 + n + end),
                    8 + n + end
                ),
                None => format!("{file} is truncated or corrupt (its size does not match its header); {fix}"),
            }
        }
        other => format!("{file} is not a valid safetensors file ({other}); {fix}"),
    }
}

/// The header length and the end of the tensor data a safetensors header declares.
fn header_data_end(bytes: &[u8]) -> Option<(usize, usize)> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header: Value = serde_json::from_slice(bytes.get(8..8 + n)?).ok()?;
    let end = header
        .as_object()?
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    Some((n, usize::try_from(end).ok()?))
}

impl Checkpoint {
    /// Opens the safetensors files of `dir`: the shards listed by
    /// `model.safetensors.index.json`, else `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        check_dir(dir)?;
        let index = dir.join(INDEX_FILE);
        let mut ck = Checkpoint {
            dir: dir.to_path_buf(),
            shards: Vec::new(),
            tensors: BTreeMap::new(),
            read: RefCell::new(BTreeSet::new()),
        };
        if index.exists() {
            let text = read_text(&index)?;
            let v: Value = serde_json::from_str(&text).map_err(|e| {
                LoadError::new(format!("{} is not valid JSON: {e}", index.display()))
            })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    LoadError::new(format!("{} has no `weight_map` object", index.display()))
                })?;
            let mut files: Vec<&str> = Vec::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    LoadError::new(format!(
                        "{}: `weight_map.{name}` must be a file name",
                        index.display()
                    ))
                })?;
                if !files.contains(&file) {
                    files.push(file);
                }
            }
            files.sort_unstable();
            for file in &files {
                ck.add_shard(file)?;
            }
            for (name, file) in map {
                let file = file.as_str().unwrap_or_default();
                let held = ck
                    .tensors
                    .get(name)
                    .map(|e| ck.shards[e.shard].name.as_str());
                if held != Some(file) {
                    return Err(LoadError::new(format!(
                        "{INDEX_FILE} maps `{name}` to {file}, but {file} does not hold it; \
                         the index and the shards disagree (re-download the checkpoint)"
                    )));
                }
            }
        } else if dir.join(SINGLE_FILE).exists() {
            ck.add_shard(SINGLE_FILE)?;
        } else {
            return Err(LoadError::new(format!(
                "{} has neither {SINGLE_FILE} nor {INDEX_FILE}; tilefuse reads safetensors checkpoints",
                dir.display()
            )));
        }
        Ok(ck)
    }

    /// A checkpoint of one safetensors file held in memory (`file` names it
    /// in errors; `dir` stands for its directory), checked as
    /// [`Checkpoint::open`] checks a file.
    pub fn from_bytes(dir: &Path, file: &str, bytes: Vec<u8>) -> Result<Checkpoint> {
        let mut ck = Checkpoint {
            dir: dir.to_path_buf(),
            shards: Vec::new(),
            tensors: BTreeMap::new(),
            read: RefCell::new(BTreeSet::new()),
        };
        ck.add_shard_bytes(file, Bytes::Owned(bytes))?;
        Ok(ck)
    }

    fn add_shard(&mut self, file: &str) -> Result<()> {
        let path = self.dir.join(file);
        let f = File::open(&path)
            .map_err(|e| LoadError::new(format!("cannot open {}: {e}", path.display())))?;
        // SAFETY: the mapping is read-only and private to this process; it is
        // only unsound if another process truncates or rewrites the file while
        // it is mapped, which checkpoint files are not (tilefuse itself writes
        // checkpoints to a fresh directory and renames it into place).
        let map = unsafe { Mmap::map(&f) }
            .map_err(|e| LoadError::new(format!("cannot map {}: {e}", path.display())))?;
        self.add_shard_bytes(file, Bytes::Mapped(map))
    }

    /// Reads the header of `map` and adds its tensors. Invariant: every
    /// entry's `start..end` lies inside the data of its shard (safetensors
    /// checks the offsets against the buffer's length, and that each
    /// tensor's bytes are its shape times its dtype's size).
    fn add_shard_bytes(&mut self, file: &str, map: Bytes) -> Result<()> {
        let (n, meta) = SafeTensors::read_metadata(&map)
            .map_err(|e| LoadError::new(explain(file, map.len(), &map, &e)))?;
        let shard = self.shards.len();
        for (name, info) in meta.tensors() {
            if let Some(prev) = self.tensors.get(&name) {
                return Err(LoadError::new(format!(
                    "tensor `{name}` is in both {} and {file}",
                    self.shards[prev.shard].name
                )));
            }
            self.tensors.insert(
                name,
                Entry {
                    shard,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: info.data_offsets.0,
                    end: info.data_offsets.1,
                },
            );
        }
        self.shards.push(Shard {
            name: file.to_string(),
            map,
            data_start: 8 + n,
        });
        Ok(())
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// True when the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The raw tensor `name` (which then counts as read, see [`Checkpoint::unread`]).
    pub fn get(&self, name: &str) -> Option<RawTensor<'_>> {
        let (key, e) = self.tensors.get_key_value(name)?;
        self.read.borrow_mut().insert(key.clone());
        let shard = &self.shards[e.shard];
        // `read_metadata` checked that the offsets lie inside the file.
        let data = shard
            .map
            .get(shard.data_start + e.start..shard.data_start + e.end)?;
        Some(RawTensor {
            name: key,
            file: &shard.name,
            dtype: e.dtype,
            shape: &e.shape,
            data,
        })
    }

    /// The tensors never fetched with [`Checkpoint::get`], multi-token
    /// prediction layers (`model.mtp.*`, which transformers ignores too) aside.
    pub fn unread(&self) -> Vec<String> {
        let read = self.read.borrow();
        self.names()
            .filter(|n| !read.contains(*n) && !n.starts_with("model.mtp."))
            .map(str::to_string)
            .collect()
    }

    /// The tensor `name`, or an error naming what is missing and what is near.
    pub fn require(&self, name: &str) -> Result<RawTensor<'_>> {
        self.get(name).ok_or_else(|| self.missing(name, &[]))
    }

    /// The error for a missing tensor: what was looked for, and the names
    /// the checkpoint has under the same parent.
    fn missing(&self, name: &str, also: &[String]) -> LoadError {
        let mut looked = String::new();
        if !also.is_empty() {
            looked = format!(
                " (nor {})",
                also.iter()
                    .map(|a| format!("`{a}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        // The nearest enclosing module that holds anything, and what it holds.
        let mut parent = name;
        let mut near: Vec<&str> = Vec::new();
        while let Some((p, _)) = parent.rsplit_once('.') {
            parent = p;
            near = self
                .names()
                .filter(|n| n.starts_with(parent) && n[parent.len()..].starts_with('.'))
                .take(12)
                .collect();
            if !near.is_empty() {
                break;
            }
        }
        let hint = if near.is_empty() {
            format!(
                "; none of its {} tensors shares a prefix with it; is it a model of another architecture?",
                self.tensors.len()
            )
        } else {
            let list: Vec<String> = near
                .iter()
                .map(|n| format!("`{}`", &n[parent.len() + 1..]))
                .collect();
            format!("; under `{parent}` it holds {}", list.join(", "))
        };
        LoadError::new(format!(
            "tensor `{name}` is missing from {}{looked}{hint}",
            self.dir.display()
        ))
    }

    /// The values of a float tensor (F32, F16, BF16, or F8 E4M3 with its
    /// `_scale_inv` block scales, see the module docs) as f32, with its shape
    /// checked against `want`.
    pub fn floats(&self, name: &str, want: &[usize], fp8_block: [usize; 2]) -> Result<Vec<f32>> {
        let t = self.require(name)?;
        check_shape(&t, want)?;
        decode_floats(self, &t, fp8_block)
    }
}

/// Checks a tensor's shape.
fn check_shape(t: &RawTensor<'_>, want: &[usize]) -> Result<()> {
    if t.shape != want {
        return Err(LoadError::new(format!(
            "tensor `{}` in {} has shape {}, expected {} (from config.json)",
            t.name,
            t.file,
            fmt_shape(t.shape),
            fmt_shape(want)
        )));
    }
    Ok(())
}

fn le_u16(b: &[u8]) -> impl Iterator<Item = u16> + '_ {
    b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]))
}

/// The f32 values of a float tensor.
fn decode_floats(ck: &Checkpoint, t: &RawTensor<'_>, fp8_block: [usize; 2]) -> Result<Vec<f32>> {
    Ok(match t.dtype {
        Dtype::F32 => t
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => le_u16(t.data)
            .map(|b| half::bf16::from_bits(b).to_f32())
            .collect(),
        Dtype::F16 => le_u16(t.data)
            .map(|b| half::f16::from_bits(b).to_f32())
            .collect(),
        Dtype::F8_E4M3 => dequantize_fp8(ck, t, fp8_block)?,
        other => {
            return Err(LoadError::new(format!(
                "tensor `{}` in {} has dtype {other:?}; tilefuse reads F32, F16, BF16 and F8_E4M3 \
                 (with `{}_scale_inv`) weights",
                t.name, t.file, t.name
            )))
        }
    })
}

/// `e4m3 × scale_inv[row / block_rows, col / block_cols]`, rounded to bf16.
fn dequantize_fp8(ck: &Checkpoint, t: &RawTensor<'_>, block: [usize; 2]) -> Result<Vec<f32>> {
    let scale_name = format!("{}_scale_inv", t.name);
    let Some(s) = ck.get(&scale_name) else {
        return Err(LoadError::new(format!(
            "tensor `{}` in {} is F8_E4M3 but `{scale_name}` (its block scales) is missing; \
             tilefuse reads FP8 weights with block scales (quant_method \"fp8\")",
            t.name, t.file
        )));
    };
    let &[rows, cols] = t.shape else {
        return Err(LoadError::new(format!(
            "tensor `{}` in {} is F8_E4M3 with shape {}; FP8 block scaling needs a matrix [rows, columns]",
            t.name,
            t.file,
            fmt_shape(t.shape)
        )));
    };
    let want = [rows.div_ceil(block[0]), cols.div_ceil(block[1])];
    if s.shape != want {
        return Err(LoadError::new(format!(
            "tensor `{scale_name}` in {} has shape {}, expected {} for {} of shape {} in {}×{} blocks \
             (quantization_config.weight_block_size)",
            s.file,
            fmt_shape(s.shape),
            fmt_shape(&want),
            t.name,
            fmt_shape(t.shape),
            block[0],
            block[1]
        )));
    }
    let scales = decode_floats(ck, &s, block)?;
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let x = fp4::e4m3_decode(t.data[r * cols + c]);
            let sc = scales[(r / block[0]) * want[1] + c / block[1]];
            out.push(half::bf16::from_f32(x * sc).to_f32());
        }
    }
    Ok(out)
}

/// Which stacked expert tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertKind {
    /// `gate_up_proj` `[E, 2I, H]`: gate rows then up rows.
    GateUp,
    /// `down_proj` `[E, H, I]`.
    Down,
}

impl ExpertKind {
    /// The stacked tensor's last name component.
    pub fn stacked_name(self) -> &'static str {
        match self {
            ExpertKind::GateUp => "gate_up_proj",
            ExpertKind::Down => "down_proj",
        }
    }
}

/// A stacked expert tensor as read from a checkpoint: floats, or FP4 codes.
#[derive(Clone, Debug)]
pub enum ExpertWeights {
    /// f32 values `[E, N, K]`.
    Floats(Vec<f32>),
    /// FP4 codes and scales `[E, N, K]`.
    Fp4(Fp4Tensor),
}

/// The per-expert on-disk names of expert `e` for `kind` under `prefix`
/// (`model.layers.{i}.mlp.experts`).
pub fn per_expert_names(prefix: &str, kind: ExpertKind, e: usize) -> Vec<String> {
    match kind {
        ExpertKind::GateUp => vec![
            format!("{prefix}.{e}.gate_proj.weight"),
            format!("{prefix}.{e}.up_proj.weight"),
        ],
        ExpertKind::Down => vec![format!("{prefix}.{e}.down_proj.weight")],
    }
}

/// Reads the stacked expert tensor `{prefix}.{kind}` of shape `[E, N, K]`
/// (see the module docs for the three layouts accepted).
pub fn read_experts(
    ck: &Checkpoint,
    prefix: &str,
    kind: ExpertKind,
    shape: [usize; 3],
    fp8_block: [usize; 2],
) -> Result<ExpertWeights> {
    let stacked = format!("{prefix}.{}", kind.stacked_name());
    if ck.contains(&format!("{stacked}_blocks")) {
        return crate::quantize::read_fp4(ck, &stacked, &shape).map(ExpertWeights::Fp4);
    }
    if ck.contains(&stacked) {
        return ck
            .floats(&stacked, &shape, fp8_block)
            .map(ExpertWeights::Floats);
    }
    let [e, n, k] = shape;
    let first = per_expert_names(prefix, kind, 0);
    if !ck.contains(&first[0]) {
        return Err(ck.missing(&first[0], &[stacked.clone(), format!("{stacked}_blocks")]));
    }
    let mut out = Vec::with_capacity(e * n * k);
    for ei in 0..e {
        let names = per_expert_names(prefix, kind, ei);
        let rows = n / names.len();
        for name in &names {
            out.extend(ck.floats(name, &[rows, k], fp8_block)?);
        }
    }
    Ok(ExpertWeights::Floats(out))
}

/// The block size of FP8 weights in a checkpoint with `cfg`.
pub fn fp8_block(cfg: &ModelConfig) -> [usize; 2] {
    cfg.quantization.fp8_block.unwrap_or([128, 128])
}

/// The on-disk names a graph weight is read from, in order of preference.
fn plain_sources(name: &str, cfg: &ModelConfig) -> Vec<String> {
    if let Some(p) = name.strip_suffix(".self_attn.sinks") {
        return vec![
            format!("{p}.self_attn.attention_sink_bias"),
            name.to_string(),
        ];
    }
    if name == "lm_head.weight" && cfg.tie_word_embeddings {
        return vec![name.to_string(), "model.embed_tokens.weight".to_string()];
    }
    vec![name.to_string()]
}

/// Converts f32 values to a tensor of `dtype`: rounded for floats, quantized
/// for FP4.
pub fn to_tensor(name: &str, dtype: DType, shape: &[usize], values: Vec<f32>) -> Result<Tensor> {
    let err = |m: String| LoadError::new(format!("weight `{name}`: {m}"));
    match dtype {
        DType::MXFP4 | DType::NVFP4 => {
            let format = if dtype == DType::MXFP4 {
                Fp4Format::Mx
            } else {
                Fp4Format::Nv
            };
            let last = shape.last().copied().unwrap_or(1);
            let q = fp4::quantize(&values, last, format).map_err(err)?;
            Tensor::fp4(shape, q).map_err(|e| err(e.to_string()))
        }
        d if d.is_float() => Tensor::f32(d, shape, values).map_err(|e| err(e.to_string())),
        d => Err(err(format!(
            "the graph declares {d}, which is not a weight dtype tilefuse loads"
        ))),
    }
}

/// Reads every weight input of `graph` from `ck`, in the dtype and shape the
/// graph declares.
pub fn load_weights(
    ck: &Checkpoint,
    cfg: &ModelConfig,
    graph: &Graph,
) -> Result<BTreeMap<String, Tensor>> {
    let none = Bindings::new();
    let block = fp8_block(cfg);
    let mut out = BTreeMap::new();
    for id in graph.inputs_of_kind(InputKind::Weight) {
        let node = graph.node(id);
        let name = node.name.as_str();
        let dtype = node.ty.dtype;
        let shape =
            node.ty.shape.eval(&none).map_err(|m| {
                LoadError::new(format!("weight `{name}` has no constant shape: {m}"))
            })?;
        let expert = [ExpertKind::GateUp, ExpertKind::Down]
            .into_iter()
            .find_map(|k| {
                name.strip_suffix(&format!(".{}", k.stacked_name()))
                    .filter(|p| p.ends_with(".mlp.experts"))
                    .map(|p| (p, k))
            });
        let tensor = if let Some((prefix, kind)) = expert {
            let &[e, n, k] = shape.as_slice() else {
                return Err(LoadError::new(format!(
                    "weight `{name}`: expected a 3-d expert tensor, the graph declares {}",
                    fmt_shape(&shape)
                )));
            };
            match read_experts(ck, prefix, kind, [e, n, k], block)? {
                ExpertWeights::Fp4(q) if q.format.dtype() == dtype => Tensor::fp4(&shape, q)
                    .map_err(|err| LoadError::new(format!("weight `{name}`: {err}")))?,
                ExpertWeights::Fp4(q) => to_tensor(name, dtype, &shape, q.dequantize())?,
                ExpertWeights::Floats(v) => to_tensor(name, dtype, &shape, v)?,
            }
        } else {
            let sources = plain_sources(name, cfg);
            let src = sources
                .iter()
                .find(|s| ck.contains(s))
                .ok_or_else(|| ck.missing(&sources[0], &sources[1..]))?;
            to_tensor(name, dtype, &shape, ck.floats(src, &shape, block)?)?
        };
        out.insert(name.to_string(), tensor);
    }
    Ok(out)
}

/// Choices for [`load`] that the checkpoint does not fix.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadOptions {
    /// Activation and dense-weight dtype; default: the checkpoint's `dtype`
    /// (bf16 for FP8 checkpoints or when absent).
    pub dtype: Option<DType>,
    /// Routed-expert dtype; default: the checkpoint's FP4 format, else `dtype`.
    pub expert_dtype: Option<DType>,
    /// Positions the full-attention caches hold; default:
    /// `max_position_embeddings`, at most [`DEFAULT_CONTEXT`].
    pub context: Option<usize>,
    /// The most tokens one forward takes (the prefill chunk); default 64.
    pub max_tokens: Option<usize>,
}

/// The context a loaded model gets unless asked for another.
pub const DEFAULT_CONTEXT: usize = 4096;

/// A checkpoint ready to run: its config, the graph options chosen, the
/// forward graph and its weights.
#[derive(Debug)]
pub struct LoadedModel {
    /// `config.json`.
    pub config: ModelConfig,
    /// The graph options used.
    pub options: GraphOptions,
    /// The forward graph.
    pub graph: Graph,
    /// Its weights, by graph name.
    pub weights: BTreeMap<String, Tensor>,
    /// Checkpoint tensors the graph did not use (a sign that config.json
    /// does not describe these weights, or of biases tilefuse ignores).
    pub unused: Vec<String>,
}

/// The graph options for a checkpoint with `cfg` under `opts`.
pub fn graph_options(cfg: &ModelConfig, opts: &LoadOptions) -> Result<GraphOptions> {
    let dtype = opts.dtype.or(cfg.dtype).unwrap_or(DType::BF16);
    if !dtype.is_activation() {
        return Err(LoadError::new(format!(
            "the model dtype must be f32, bf16 or f16, not {dtype}"
        )));
    }
    let expert_dtype = opts
        .expert_dtype
        .or(cfg.quantization.fp4.map(Fp4Format::dtype))
        .unwrap_or(dtype);
    if !(expert_dtype.is_activation() || expert_dtype.is_block_quantized()) {
        return Err(LoadError::new(format!(
            "the expert dtype must be f32, bf16, f16, mxfp4 or nvfp4, not {expert_dtype}"
        )));
    }
    let limit = cfg.max_position_embeddings.unwrap_or(usize::MAX);
    let context = match opts.context {
        Some(0) => {
            return Err(LoadError::new(
                "the context must hold at least one position",
            ))
        }
        Some(c) if c > limit => {
            return Err(LoadError::new(format!(
                "a context of {c} positions is past the model's max_position_embeddings = {limit}"
            )))
        }
        Some(c) => c,
        None => limit.min(DEFAULT_CONTEXT),
    };
    let max_tokens = opts.max_tokens.unwrap_or(64).clamp(1, context);
    Ok(GraphOptions {
        context,
        max_tokens,
        dtype,
        expert_dtype,
    })
}

/// Loads the checkpoint in `dir`: config, graph, weights.
pub fn load(dir: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let config = read_config(dir)?;
    let ck = Checkpoint::open(dir)?;
    let options = graph_options(&config, opts)?;
    let graph = config.arch.forward_graph(&options)?;
    let weights = load_weights(&ck, &config, &graph)?;
    Ok(LoadedModel {
        config,
        options,
        graph,
        weights,
        unused: ck.unread(),
    })
}
