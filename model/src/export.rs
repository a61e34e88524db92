//! Writing checkpoint directories: atomically (a staging directory renamed
//! into place), in the on-disk names transformers reads, and `tilefuse init`
//! (a built-in preset as a checkpoint).
//!
//! On-disk names are the inverse of [`crate::checkpoint`]'s mapping, as
//! `save_pretrained` writes them: per-expert
//! `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight` for float
//! experts, `self_attn.attention_sink_bias` for MiMo sinks; FP4 experts in the
//! stacked layout of [`crate::quantize`].

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::tensor::View;
use safetensors::Dtype;
use serde_json::Value;
use tilefuse_ir::interp::{Data, Tensor};
use tilefuse_ir::{Bindings, DType, InputKind};

use crate::checkpoint::{per_expert_names, ExpertKind, SINGLE_FILE};
use crate::config;
use crate::error::{LoadError, Result};
use crate::presets::{self, Preset};
use crate::quantize;

/// A directory being written: files go to a hidden sibling in the same
/// parent (`.NAME.tmp-PID`), which [`StagingDir::commit`] flushes and renames
/// to the destination in one step. Invariant: the destination is either
/// absent (or the empty directory it was) or complete; never half-written.
/// Dropped without a commit (an error), the sibling is removed; a process
/// killed while writing leaves only the hidden sibling, which the next
/// writer of the same destination removes.
#[derive(Debug)]
pub struct StagingDir {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl StagingDir {
    /// Prepares to write `dest`, which must not exist (or be an empty directory).
    pub fn new(dest: &Path) -> Result<StagingDir> {
        if dest.exists() {
            let empty = dest.is_dir()
                && std::fs::read_dir(dest)
                    .map(|mut d| d.next().is_none())
                    .unwrap_or(false);
            if !empty {
                return Err(LoadError::new(format!(
                    "{} already exists; choose a new output directory (tilefuse does not overwrite)",
                    dest.display()
                )));
            }
        }
        let name = dest
            .file_name()
            .ok_or_else(|| {
                LoadError::new(format!(
                    "{} does not name a directory to create",
                    dest.display()
                ))
            })?
            .to_string_lossy()
            .to_string();
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(LoadError::new(format!(
                "the parent directory {} of {} does not exist; create it first",
                parent.display(),
                dest.display()
            )));
        }
        // Leftovers of writers of this destination that were killed (this
        // process's own name included): a staging directory is never shared,
        // so any other one found here belongs to a writer that is gone or
        // writing the same destination, which cannot both succeed anyway.
        let prefix = format!(".{name}.tmp-");
        let tmp = parent.join(format!("{prefix}{}", std::process::id()));
        if let Ok(entries) = std::fs::read_dir(&parent) {
            for e in entries.flatten() {
                let stale = e.file_name().to_string_lossy().starts_with(&prefix)
                    && !pid_alive(&e.file_name().to_string_lossy()[prefix.len()..]);
                if stale || e.path() == tmp {
                    std::fs::remove_dir_all(e.path()).map_err(|err| {
                        LoadError::new(format!(
                            "cannot remove the leftover {}: {err}; remove it by hand",
                            e.path().display()
                        ))
                    })?;
                }
            }
        }
        std::fs::create_dir(&tmp)
            .map_err(|e| LoadError::new(format!("cannot create {}: {e}", tmp.display())))?;
        Ok(StagingDir {
            tmp,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    /// Where to write the files.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Flushes every file to disk and renames the directory into place.
    pub fn commit(mut self) -> Result<()> {
        let entries = std::fs::read_dir(&self.tmp)
            .map_err(|e| LoadError::new(format!("cannot list {}: {e}", self.tmp.display())))?;
        for entry in entries.flatten() {
            if let Ok(f) = File::open(entry.path()) {
                f.sync_all().map_err(|e| {
                    LoadError::new(format!("cannot flush {}: {e}", entry.path().display()))
                })?;
            }
        }
        // rename(2) replaces an empty directory atomically.
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| {
            LoadError::new(format!(
                "cannot move {} to {}: {e}",
                self.tmp.display(),
                self.dest.display()
            ))
        })?;
        self.committed = true;
        Ok(())
    }
}

/// Whether `pid` (decimal) names a running process, as far as this system
/// can tell: on systems without `/proc` every process counts as running, so
/// only leftovers of this process's own id are ever removed.
fn pid_alive(pid: &str) -> bool {
    let Ok(n) = pid.parse::<u32>() else {
        return true;
    };
    if n == std::process::id() {
        return false;
    }
    let proc = Path::new("/proc");
    !proc.join("self").exists() || proc.join(n.to_string()).exists()
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// A tensor to write: its safetensors dtype, shape and little-endian bytes
/// (borrowed from a mapped checkpoint when copied as is).
#[derive(Clone, Debug)]
pub struct OutTensor<'a> {
    /// safetensors dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Bytes.
    pub data: Cow<'a, [u8]>,
}

impl View for OutTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// f32 values as bytes of a float dtype (rounded to nearest even).
pub fn float_bytes(name: &str, dtype: DType, values: &[f32]) -> Result<(Dtype, Vec<u8>)> {
    Ok(match dtype {
        DType::F32 => (
            Dtype::F32,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        DType::BF16 => (
            Dtype::BF16,
            values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
                .collect(),
        ),
        DType::F16 => (
            Dtype::F16,
            values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes())
                .collect(),
        ),
        d => {
            return Err(LoadError::new(format!(
                "tensor `{name}` is {d}; checkpoints are written with f32, bf16 or f16 floats"
            )))
        }
    })
}

/// Writes `tensors` as one safetensors file (`{"format": "pt"}` metadata, as
/// transformers expects).
pub fn write_safetensors(path: &Path, tensors: Vec<(String, OutTensor<'_>)>) -> Result<()> {
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors, Some(meta), path)
        .map_err(|e| LoadError::new(format!("cannot write {}: {e}", path.display())))
}

/// Writes `value` as pretty JSON.
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| LoadError::new(format!("cannot encode {}: {e}", path.display())))?;
    std::fs::write(path, text + "\n")
        .map_err(|e| LoadError::new(format!("cannot write {}: {e}", path.display())))
}

/// The on-disk tensors of graph weights (see the module docs).
pub fn on_disk_tensors(
    weights: &BTreeMap<String, Tensor>,
) -> Result<Vec<(String, OutTensor<'static>)>> {
    let mut out = Vec::new();
    for (name, t) in weights {
        let expert = [ExpertKind::GateUp, ExpertKind::Down]
            .into_iter()
            .find_map(|k| {
                name.strip_suffix(&format!(".{}", k.stacked_name()))
                    .filter(|p| p.ends_with(".mlp.experts"))
                    .map(|p| (p, k))
            });
        match (&t.data, expert) {
            (Data::Fp4(q), Some(_)) => out.extend(quantize::fp4_tensors(name, &t.shape, q)?),
            (Data::F32(v), Some((prefix, kind))) => {
                let &[e, n, k] = t.shape.as_slice() else {
                    return Err(LoadError::new(format!(
                        "expert tensor `{name}` must be 3-d, found {:?}",
                        t.shape
                    )));
                };
                for ei in 0..e {
                    let names = per_expert_names(prefix, kind, ei);
                    let rows = n / names.len();
                    for (j, part) in names.into_iter().enumerate() {
                        let start = (ei * n + j * rows) * k;
                        let (dtype, data) =
                            float_bytes(&part, t.dtype, &v[start..start + rows * k])?;
                        out.push((
                            part,
                            OutTensor {
                                dtype,
                                shape: vec![rows, k],
                                data: Cow::Owned(data),
                            },
                        ));
                    }
                }
            }
            (Data::F32(v), None) => {
                let disk = match name.strip_suffix(".self_attn.sinks") {
                    Some(p) => format!("{p}.self_attn.attention_sink_bias"),
                    None => name.clone(),
                };
                let (dtype, data) = float_bytes(name, t.dtype, v)?;
                out.push((
                    disk,
                    OutTensor {
                        dtype,
                        shape: t.shape.clone(),
                        data: Cow::Owned(data),
                    },
                ));
            }
            _ => {
                return Err(LoadError::new(format!(
                    "weight `{name}` is {}; only float weights and FP4 experts are written",
                    t.dtype
                )))
            }
        }
    }
    Ok(out)
}

/// The most f32 memory `tilefuse init` spends on a preset's weights.
pub const INIT_LIMIT_BYTES: usize = 16 << 30;

/// What [`init`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitReport {
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of `model.safetensors`.
    pub bytes: u64,
}

/// Writes preset `preset` with the random weights of `seed` as a checkpoint
/// directory `out` (which must not exist): `config.json` and
/// `model.safetensors` in the on-disk names transformers reads.
pub fn init(preset: &Preset, seed: u64, out: &Path) -> Result<InitReport> {
    let graph = preset.arch.forward_graph(&preset.options)?;
    let none = Bindings::new();
    let params: usize = graph
        .inputs_of_kind(InputKind::Weight)
        .into_iter()
        .map(|id| {
            graph
                .node(id)
                .ty
                .shape
                .eval(&none)
                .map(|s| s.iter().product::<usize>())
                .unwrap_or(0)
        })
        .sum();
    if params * 4 > INIT_LIMIT_BYTES {
        return Err(LoadError::new(format!(
            "preset {} has {params} parameters; init draws them in memory as f32 ({} GiB), past its limit of {} GiB; \
             use a smaller preset",
            preset.name,
            (params * 4) >> 30,
            INIT_LIMIT_BYTES >> 30
        )));
    }
    let stage = StagingDir::new(out)?;
    let weights = presets::random_weights(&graph, seed)?;
    let tensors = on_disk_tensors(&weights)?;
    let n = tensors.len();
    let st = stage.path().join(SINGLE_FILE);
    write_safetensors(&st, tensors)?;
    let mut cfg = config::to_json(&preset.arch, preset.options.dtype, preset.options.context);
    if preset.options.expert_dtype.is_block_quantized() {
        let format = if preset.options.expert_dtype == DType::MXFP4 {
            tilefuse_ir::fp4::Fp4Format::Mx
        } else {
            tilefuse_ir::fp4::Fp4Format::Nv
        };
        cfg["quantization_config"] = quantize::quantization_config(format, None);
    }
    write_json(&stage.path().join("config.json"), &cfg)?;
    let bytes = std::fs::metadata(&st).map(|m| m.len()).unwrap_or(0);
    stage.commit()?;
    Ok(InitReport { tensors: n, bytes })
}
