//! Hugging Face `config.json`: read into the architecture configs
//! ([`mimo_v2::Config`], [`qwen3_moe::Config`]) and written back for
//! `tilefuse init`.
//!
//! Two spellings are read. The transformers-native one (what `save_pretrained`
//! of transformers >= 5.17 writes) and, for MiMo-V2, the one of Xiaomi's hub
//! checkpoints (remote code): `hybrid_layer_pattern` (1 = sliding) for
//! `layer_types`, `moe_layer_freq` (1 = MoE) for `mlp_layer_types`,
//! `layernorm_epsilon`, `rope_theta` / `swa_rope_theta`, `sliding_window_size`,
//! `swa_*` head counts, `add_{swa,full}_attention_sink_bias`.
//!
//! Which fields are required: every size (hidden, layers, vocabulary, heads,
//! head dims, MLP and expert widths, expert counts). A missing size is always
//! an error, never the 309B default of the transformers class. Fields that
//! choose a behaviour take transformers' defaults when absent (`rms_norm_eps`,
//! `layer_types`, `mlp_layer_types`, the RoPE parameters, `n_group`,
//! `norm_topk_prob`, ...), so a config transformers reads the same way is read
//! the same way here.
//!
//! Settings the graphs cannot express are refused by name (`attention_bias`,
//! sinks on full layers, a shared expert, RoPE scaling, q/k norms on MiMo,
//! sliding windows on Qwen3-MoE, activations other than SiLU, ...), rather
//! than silently computed differently.

use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};
use tilefuse_ir::fp4::Fp4Format;
use tilefuse_ir::DType;

use crate::error::{LoadError, Result};
use crate::mimo_v2::{self, LayerType};
use crate::presets::Arch;
use crate::qwen3_moe;

/// The `model_type` of MiMo-V2-Flash.
pub const MIMO_V2_MODEL_TYPE: &str = "mimo_v2_flash";
/// The transformers class of MiMo-V2-Flash.
pub const MIMO_V2_ARCHITECTURE: &str = "MiMoV2FlashForCausalLM";
/// The `model_type` of Qwen3-MoE.
pub const QWEN3_MOE_MODEL_TYPE: &str = "qwen3_moe";
/// The transformers class of Qwen3-MoE.
pub const QWEN3_MOE_ARCHITECTURE: &str = "Qwen3MoeForCausalLM";

/// How a checkpoint's weights are quantized (`quantization_config`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Quantization {
    /// FP8 E4M3 weights with `weight_scale_inv` block scales of this
    /// `[rows, columns]` block (`quant_method: "fp8"`, or the `base` of an FP4
    /// config written by `tilefuse quantize` from an FP8 checkpoint).
    pub fp8_block: Option<[usize; 2]>,
    /// Routed experts in this FP4 format (`quant_method: "mxfp4"` or `"nvfp4"`).
    pub fp4: Option<Fp4Format>,
}

/// Everything tilefuse takes from a `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// The architecture and its sizes.
    pub arch: Arch,
    /// `dtype` (or the older `torch_dtype`): the dtype the weights were saved in.
    pub dtype: Option<DType>,
    /// `tie_word_embeddings`: `lm_head.weight` is `model.embed_tokens.weight`.
    pub tie_word_embeddings: bool,
    /// `max_position_embeddings`.
    pub max_position_embeddings: Option<usize>,
    /// `eos_token_id` (one id or a list).
    pub eos_token_ids: Vec<i64>,
    /// `quantization_config`.
    pub quantization: Quantization,
}

/// The largest size (hidden size, vocabulary, heads, experts, ...) a config
/// may give: `2^31 - 1`, an `int` index.
pub const MAX_SIZE: usize = i32::MAX as usize;

/// The most layers a config may give.
pub const MAX_LAYERS: usize = 4096;

const SIZE_WHAT: &str = "a positive integer below 2^31";

/// Parses the text of a `config.json`; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<ModelConfig> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| LoadError::new(format!("{file} is not valid JSON: {e}")))?;
    let map = value.as_object().ok_or_else(|| {
        LoadError::new(format!(
            "{file} must hold a JSON object, found {}",
            short(&value)
        ))
    })?;
    let model_type = model_type(map, file)?;
    let f = Fields {
        map,
        file,
        model_type: &model_type,
        prefix: String::new(),
    };
    let arch = match model_type.as_str() {
        MIMO_V2_MODEL_TYPE => Arch::MimoV2(mimo_config(&f)?),
        QWEN3_MOE_MODEL_TYPE => Arch::Qwen3Moe(qwen_config(&f)?),
        other => {
            let known = format!(
                "`{MIMO_V2_MODEL_TYPE}` ({MIMO_V2_ARCHITECTURE}) and \
                 `{QWEN3_MOE_MODEL_TYPE}` ({QWEN3_MOE_ARCHITECTURE})"
            );
            let msg =
                format!("{file}: model_type `{other}` is not supported; tilefuse runs {known}");
            return Err(LoadError::new(msg));
        }
    };
    let dtype_what = "a dtype name such as \"bfloat16\"";
    let dtype = match f.first::<String>(&["dtype", "torch_dtype"], dtype_what)? {
        None => None,
        Some((key, s)) => Some(torch_dtype(&s).ok_or_else(|| {
            LoadError::new(format!(
                "{file}: `{key}` = \"{s}\" is not a dtype tilefuse loads; \
                 expected \"float32\", \"bfloat16\" or \"float16\""
            ))
        })?),
    };
    let eos_token_ids = match f.raw("eos_token_id") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => match v {
            Value::Array(_) => {
                f.req::<Vec<i64>>("eos_token_id", "a token id or a list of token ids")?
            }
            _ => vec![f.req::<i64>("eos_token_id", "a token id or a list of token ids")?],
        },
    };
    let max_position_embeddings = f.opt_size("max_position_embeddings")?;
    Ok(ModelConfig {
        arch,
        dtype,
        tie_word_embeddings: f.flag("tie_word_embeddings", false)?,
        max_position_embeddings,
        eos_token_ids,
        quantization: quantization(&f)?,
    })
}

/// The `model_type` of an architecture.
pub fn model_type_of(arch: &Arch) -> &'static str {
    match arch {
        Arch::MimoV2(_) => MIMO_V2_MODEL_TYPE,
        Arch::Qwen3Moe(_) => QWEN3_MOE_MODEL_TYPE,
    }
}

/// The dtype of a transformers `dtype` string.
pub fn torch_dtype(s: &str) -> Option<DType> {
    match s.trim_start_matches("torch.") {
        "float32" | "float" => Some(DType::F32),
        "bfloat16" => Some(DType::BF16),
        "float16" | "half" => Some(DType::F16),
        _ => None,
    }
}

/// The transformers `dtype` string of a float dtype.
pub fn torch_dtype_name(d: DType) -> Option<&'static str> {
    match d {
        DType::F32 => Some("float32"),
        DType::BF16 => Some("bfloat16"),
        DType::F16 => Some("float16"),
        _ => None,
    }
}

fn model_type(map: &Map<String, Value>, file: &str) -> Result<String> {
    match map.get("model_type") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(LoadError::new(format!(
            "{file}: `model_type` must be a string, found {}",
            short(v)
        ))),
        None => {
            // Some configs only name the class.
            let arch = map
                .get("architectures")
                .and_then(|a| a.as_array())
                .and_then(|a| a.first())
                .and_then(|a| a.as_str());
            match arch {
                Some(MIMO_V2_ARCHITECTURE) => Ok(MIMO_V2_MODEL_TYPE.into()),
                Some(QWEN3_MOE_ARCHITECTURE) => Ok(QWEN3_MOE_MODEL_TYPE.into()),
                Some(a) => Err(LoadError::new(format!(
                    "{file}: architecture `{a}` is not supported (and `model_type` is missing); \
                     tilefuse runs {MIMO_V2_ARCHITECTURE} and {QWEN3_MOE_ARCHITECTURE}"
                ))),
                None => Err(LoadError::new(format!(
                    "{file}: `model_type` is missing; expected \"{MIMO_V2_MODEL_TYPE}\" or \"{QWEN3_MOE_MODEL_TYPE}\""
                ))),
            }
        }
    }
}

/// A JSON value, cut to a readable length for an error message.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        let cut: String = s.chars().take(77).collect();
        format!("{cut}...")
    } else {
        s
    }
}

/// Typed access to the fields of one config object, with errors that name
/// the file and the field.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    file: &'a str,
    model_type: &'a str,
    /// Where `map` sits in the file (`rope_parameters.full_attention.`), for errors.
    prefix: String,
}

impl<'a> Fields<'a> {
    /// The fields of the object `key` of this one.
    fn sub(&self, map: &'a Map<String, Value>, key: &str) -> Fields<'a> {
        Fields {
            map,
            file: self.file,
            model_type: self.model_type,
            prefix: format!("{}{key}.", self.prefix),
        }
    }

    /// The field as written, `null` included.
    fn raw(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    fn bad(&self, key: &str, what: &str) -> LoadError {
        let found = self.raw(key).map_or("nothing".to_string(), short);
        LoadError::new(format!(
            "{}: `{}{key}` must be {what}, found {found}",
            self.file, self.prefix
        ))
    }

    /// The field, `None` when absent or `null`.
    fn opt<T: DeserializeOwned>(&self, key: &str, what: &str) -> Result<Option<T>> {
        match self.raw(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|_| self.bad(key, what)),
        }
    }

    /// The first present (non-null) field of `keys`, with its key.
    fn first<T: DeserializeOwned>(
        &self,
        keys: &[&'static str],
        what: &str,
    ) -> Result<Option<(&'static str, T)>> {
        for &k in keys {
            if let Some(v) = self.opt(k, what)? {
                return Ok(Some((k, v)));
            }
        }
        Ok(None)
    }

    fn req<T: DeserializeOwned>(&self, key: &str, what: &str) -> Result<T> {
        self.opt(key, what)?.ok_or_else(|| self.missing(key))
    }

    fn missing(&self, key: &str) -> LoadError {
        LoadError::new(format!(
            "{}: `{}{key}` is missing; a {} config needs it",
            self.file, self.prefix, self.model_type
        ))
    }

    /// A required positive integer, from the first present key of `keys`.
    /// Invariant of every size read here: `1 <= n <= MAX_SIZE`, so that
    /// kernels index any one dimension with an `int` and products of a few
    /// sizes (a weight's element count) cannot overflow a `u64`.
    fn size(&self, keys: &[&'static str]) -> Result<usize> {
        match self.first::<usize>(keys, "a positive integer")? {
            Some((k, n)) if n == 0 || n > MAX_SIZE => Err(self.bad(k, SIZE_WHAT)),
            Some((_, n)) => Ok(n),
            None => Err(self.missing(keys[0])),
        }
    }

    /// An optional positive integer, at most `MAX_SIZE` as in [`Fields::size`].
    fn opt_size(&self, key: &str) -> Result<Option<usize>> {
        match self.opt::<usize>(key, "a positive integer")? {
            Some(n) if n == 0 || n > MAX_SIZE => Err(self.bad(key, SIZE_WHAT)),
            n => Ok(n),
        }
    }

    /// `num_hidden_layers`: a size, at most [`MAX_LAYERS`] (the graph has
    /// nodes per layer: a config claiming billions must not hang the load).
    fn layers(&self) -> Result<usize> {
        let n = self.size(&["num_hidden_layers"])?;
        if n > MAX_LAYERS {
            return Err(LoadError::new(format!(
                "{}: `{}num_hidden_layers` = {n} is more layers than tilefuse builds (at most \
                 {MAX_LAYERS}); check the config.json",
                self.file, self.prefix
            )));
        }
        Ok(n)
    }

    fn flag(&self, key: &str, default: bool) -> Result<bool> {
        Ok(self.opt::<bool>(key, "true or false")?.unwrap_or(default))
    }

    /// A positive finite number (as f32), or `default` when absent.
    fn positive(&self, keys: &[&'static str], default: f64) -> Result<f32> {
        match self.first::<f64>(keys, "a positive number")? {
            Some((k, x)) if !(x > 0.0 && x.is_finite() && (x as f32) > 0.0) => {
                Err(self.bad(k, "a positive number"))
            }
            Some((_, x)) => Ok(x as f32),
            None => Ok(default as f32),
        }
    }

    /// Refuses `key` unless it is absent, null or equal to `ok`.
    fn refuse_unless(&self, key: &str, ok: &Value, why: &str) -> Result<()> {
        match self.raw(key) {
            None | Some(Value::Null) => Ok(()),
            Some(v) if v == ok => Ok(()),
            Some(v) => Err(LoadError::new(format!(
                "{}: `{}{key}` = {} is not supported: {why}",
                self.file,
                self.prefix,
                short(v)
            ))),
        }
    }

    /// Errors naming `key` and its value.
    fn invalid(&self, key: &str, why: &str) -> LoadError {
        let found = self.raw(key).map_or("(absent)".to_string(), short);
        LoadError::new(format!(
            "{}: `{}{key}` = {found}: {why}",
            self.file, self.prefix
        ))
    }
}

/// Checks shared by both architectures.
fn check_heads(f: &Fields<'_>, heads: usize, kv_heads: usize, kv_key: &str) -> Result<()> {
    if !heads.is_multiple_of(kv_heads) {
        return Err(f.invalid(
            kv_key,
            &format!("it must divide num_attention_heads = {heads} (grouped-query attention)"),
        ));
    }
    Ok(())
}

/// `silu`, no attention bias: what both graphs compute.
fn check_common(f: &Fields<'_>) -> Result<()> {
    f.refuse_unless(
        "hidden_act",
        &json!("silu"),
        "the MLPs and experts of tilefuse compute SiLU (`silu(gate) * up`)",
    )?;
    f.refuse_unless(
        "attention_bias",
        &json!(false),
        "the attention projections of tilefuse have no bias",
    )?;
    f.refuse_unless(
        "rope_scaling",
        &Value::Null,
        "tilefuse implements plain RoPE only (no YaRN, linear or dynamic scaling)",
    )?;
    Ok(())
}

/// Routing checks: `1 <= top_k <= experts` and consistent groups.
fn check_routing(
    f: &Fields<'_>,
    experts: usize,
    top_k: usize,
    n_group: usize,
    topk_group: usize,
) -> Result<()> {
    if top_k > experts {
        return Err(f.invalid(
            "num_experts_per_tok",
            &format!("a token cannot choose more than the {experts} experts there are"),
        ));
    }
    if !experts.is_multiple_of(n_group) {
        return Err(f.invalid(
            "n_group",
            &format!("it must divide the {experts} routed experts"),
        ));
    }
    if n_group > 1 && experts / n_group < 2 {
        return Err(f.invalid(
            "n_group",
            "each group needs at least 2 experts (a group scores by its top 2)",
        ));
    }
    if topk_group > n_group {
        return Err(f.invalid(
            "topk_group",
            &format!("at most n_group = {n_group} groups can be kept"),
        ));
    }
    if topk_group * (experts / n_group) < top_k {
        return Err(f.invalid(
            "topk_group",
            &format!(
                "the {topk_group} kept groups of {} experts cannot hold num_experts_per_tok = {top_k} experts",
                experts / n_group
            ),
        ));
    }
    Ok(())
}

/// Rotated dims as transformers computes them, `int(head_dim * factor)` in
/// f64, checked against what the graph will compute from the f32 factor.
fn check_rotary(
    f: &Fields<'_>,
    key: &str,
    head_dim: usize,
    factor: f64,
    graph_dims: usize,
) -> Result<()> {
    let dims = (head_dim as f64 * factor) as usize;
    if !(factor > 0.0 && factor <= 1.0) || dims < 2 || !dims.is_multiple_of(2) {
        return Err(f.invalid(
            key,
            &format!(
                "int(head_dim {head_dim} * {factor}) = {dims} rotated dims; RoPE needs an even number of at least 2 (a factor in (0, 1])"
            ),
        ));
    }
    if dims != graph_dims {
        return Err(f.invalid(
            key,
            &format!("transformers rotates {dims} dims but an f32 factor gives {graph_dims}; use a factor that is exact in f32"),
        ));
    }
    Ok(())
}

/// RoPE of one MiMo layer type: `(rope_theta, partial_rotary_factor)`.
fn mimo_rope(f: &Fields<'_>, params: &Map<String, Value>, layer_type: &str) -> Result<(f64, f64)> {
    let entry = params
        .get(layer_type)
        .and_then(|v| v.as_object())
        .ok_or_else(|| {
            LoadError::new(format!(
                "{}: `rope_parameters` has no `{layer_type}` object; MiMo-V2 keeps one per layer type \
                 (`full_attention`, `sliding_attention`)",
                f.file
            ))
        })?;
    let sub = f.sub(entry, &format!("rope_parameters.{layer_type}"));
    sub.refuse_unless(
        "rope_type",
        &json!("default"),
        "tilefuse implements plain RoPE only",
    )?;
    let theta = sub.req::<f64>("rope_theta", "a positive number")?;
    if !(theta > 0.0 && theta.is_finite()) {
        return Err(sub.bad("rope_theta", "a positive number"));
    }
    // transformers: `.get("partial_rotary_factor", 0.334)`.
    let factor = sub
        .opt::<f64>("partial_rotary_factor", "a number in (0, 1]")?
        .unwrap_or(0.334);
    Ok((theta, factor))
}

fn mimo_config(f: &Fields<'_>) -> Result<mimo_v2::Config> {
    check_common(f)?;
    let hidden_size = f.size(&["hidden_size"])?;
    let num_hidden_layers = f.layers()?;
    let vocab_size = f.size(&["vocab_size"])?;
    let num_attention_heads = f.size(&["num_attention_heads"])?;
    let num_key_value_heads = f.size(&["num_key_value_heads"])?;
    let head_dim = f.size(&["head_dim"])?;
    let v_head_dim = f.size(&["v_head_dim"])?;
    check_heads(
        f,
        num_attention_heads,
        num_key_value_heads,
        "num_key_value_heads",
    )?;
    // Hub spellings of the sliding layers' shapes: tilefuse (as transformers)
    // derives them from the full layers', so they must agree.
    for (key, want) in [
        ("swa_num_attention_heads", num_attention_heads),
        ("swa_num_key_value_heads", 2 * num_key_value_heads),
        ("swa_head_dim", head_dim),
        ("swa_v_head_dim", v_head_dim),
    ] {
        if let Some(n) = f.opt::<usize>(key, "a positive integer")? {
            if n != want {
                return Err(f.invalid(
                    key,
                    &format!(
                        "tilefuse (like transformers' MiMoV2Flash) gives sliding layers {want} here \
                         (num_attention_heads, 2 × num_key_value_heads, head_dim, v_head_dim)"
                    ),
                ));
            }
        }
    }
    f.refuse_unless(
        "add_full_attention_sink_bias",
        &json!(false),
        "tilefuse's MiMo-V2 graph has sinks on sliding layers only",
    )?;
    f.refuse_unless(
        "add_swa_attention_sink_bias",
        &json!(true),
        "tilefuse's MiMo-V2 graph always has sinks on sliding layers",
    )?;
    f.refuse_unless(
        "use_qk_norm",
        &json!(false),
        "MiMo-V2 in tilefuse has no q/k norms",
    )?;
    f.refuse_unless(
        "scoring_func",
        &json!("sigmoid"),
        "MiMo-V2 routes with sigmoid scores",
    )?;
    f.refuse_unless(
        "n_shared_experts",
        &json!(0),
        "tilefuse's MiMo-V2 graph has no shared expert",
    )?;

    let layer_types: Vec<LayerType> = if let Some(names) = f.opt::<Vec<String>>(
        "layer_types",
        "a list of \"full_attention\" / \"sliding_attention\"",
    )? {
        let mut out = Vec::with_capacity(names.len());
        for (i, n) in names.iter().enumerate() {
            out.push(match n.as_str() {
                "full_attention" => LayerType::Full,
                "sliding_attention" => LayerType::Sliding,
                other => {
                    return Err(f.invalid(
                        "layer_types",
                        &format!("entry {i} is \"{other}\"; expected \"full_attention\" or \"sliding_attention\""),
                    ))
                }
            });
        }
        if out.len() != num_hidden_layers {
            return Err(f.invalid(
                "layer_types",
                &format!(
                    "it has {} entries for num_hidden_layers = {num_hidden_layers}",
                    out.len()
                ),
            ));
        }
        out
    } else if let Some(p) =
        f.opt::<Vec<i64>>("hybrid_layer_pattern", "a list of 0 (full) / 1 (sliding)")?
    {
        if p.len() != num_hidden_layers || p.iter().any(|&x| x != 0 && x != 1) {
            return Err(f.invalid(
                "hybrid_layer_pattern",
                &format!("expected {num_hidden_layers} entries, each 0 (full) or 1 (sliding)"),
            ));
        }
        p.iter()
            .map(|&x| {
                if x == 1 {
                    LayerType::Sliding
                } else {
                    LayerType::Full
                }
            })
            .collect()
    } else {
        mimo_v2::Config::default_layer_types(num_hidden_layers)
    };
    let any_sliding = layer_types.contains(&LayerType::Sliding);
    let any_full = layer_types.contains(&LayerType::Full);
    if any_sliding && !num_attention_heads.is_multiple_of(2 * num_key_value_heads) {
        return Err(f.invalid(
            "num_key_value_heads",
            &format!(
                "sliding layers use 2 × {num_key_value_heads} KV heads, which must divide num_attention_heads = {num_attention_heads}"
            ),
        ));
    }
    let sliding_window = match f.first::<usize>(
        &["sliding_window", "sliding_window_size"],
        "a positive integer",
    )? {
        Some((k, w)) if w == 0 || u32::try_from(w).is_err() => {
            return Err(f.bad(k, "a positive integer below 2^32"))
        }
        Some((_, w)) => w,
        None => 128,
    };

    // RoPE: native `rope_parameters` per layer type, or the hub's
    // `rope_theta` / `swa_rope_theta` / `partial_rotary_factor`.
    let (full_rope, swa_rope, factor_key) = match f.raw("rope_parameters") {
        Some(Value::Object(params)) => {
            let full = if any_full || !params.contains_key("sliding_attention") {
                mimo_rope(f, params, "full_attention")?
            } else {
                (5_000_000.0, 0.334)
            };
            let swa = if any_sliding || !params.contains_key("full_attention") {
                mimo_rope(f, params, "sliding_attention")?
            } else {
                full
            };
            if any_full && any_sliding && full.1 != swa.1 {
                return Err(f.invalid(
                    "rope_parameters",
                    &format!(
                        "partial_rotary_factor differs between full_attention ({}) and sliding_attention ({}); \
                         tilefuse's MiMo-V2 config has one factor",
                        full.1, swa.1
                    ),
                ));
            }
            let full = if any_full { full } else { (full.0, swa.1) };
            (full, swa, "rope_parameters.partial_rotary_factor")
        }
        None | Some(Value::Null) => {
            let factor = f
                .opt::<f64>("partial_rotary_factor", "a number in (0, 1]")?
                .unwrap_or(0.334);
            let theta = f
                .opt::<f64>("rope_theta", "a positive number")?
                .unwrap_or(5_000_000.0);
            let swa_theta = f
                .opt::<f64>("swa_rope_theta", "a positive number")?
                .unwrap_or(10_000.0);
            (
                (theta, factor),
                (swa_theta, factor),
                "partial_rotary_factor",
            )
        }
        Some(_) => {
            return Err(f.bad(
                "rope_parameters",
                "an object with `full_attention` and `sliding_attention` entries",
            ))
        }
    };
    for (key, theta) in [("rope_theta", full_rope.0), ("swa_rope_theta", swa_rope.0)] {
        if !(theta > 0.0 && theta.is_finite() && (theta as f32).is_finite()) {
            return Err(f.invalid(key, "RoPE theta must be a positive finite number"));
        }
    }

    let rms_norm_eps = f.positive(&["rms_norm_eps", "layernorm_epsilon"], 1e-5)?;
    // Absent: transformers' default 0.707; null: 1.0 (`if ... is not None else 1.0`).
    let attention_value_scale = match f.raw("attention_value_scale") {
        None => 0.707,
        Some(Value::Null) => 1.0,
        Some(_) => {
            let x = f.req::<f64>("attention_value_scale", "a finite number")?;
            if !x.is_finite() {
                return Err(f.bad("attention_value_scale", "a finite number"));
            }
            x as f32
        }
    };

    let dense_layers: Vec<bool> = if let Some(kinds) =
        f.opt::<Vec<String>>("mlp_layer_types", "a list of \"dense\" / \"sparse\"")?
    {
        let mut out = Vec::with_capacity(kinds.len());
        for (i, k) in kinds.iter().enumerate() {
            out.push(match k.as_str() {
                "dense" => true,
                "sparse" => false,
                other => {
                    return Err(f.invalid(
                        "mlp_layer_types",
                        &format!("entry {i} is \"{other}\"; expected \"dense\" or \"sparse\""),
                    ))
                }
            });
        }
        if out.len() != num_hidden_layers {
            return Err(f.invalid(
                "mlp_layer_types",
                &format!(
                    "it has {} entries for num_hidden_layers = {num_hidden_layers}",
                    out.len()
                ),
            ));
        }
        out
    } else if let Some(freq) =
        f.opt::<Vec<i64>>("moe_layer_freq", "a list of 0 (dense) / 1 (MoE)")?
    {
        if freq.len() != num_hidden_layers || freq.iter().any(|&x| x != 0 && x != 1) {
            return Err(f.invalid(
                "moe_layer_freq",
                &format!("expected {num_hidden_layers} entries, each 0 (dense) or 1 (MoE)"),
            ));
        }
        freq.iter().map(|&x| x == 0).collect()
    } else {
        (0..num_hidden_layers).map(|i| i == 0).collect()
    };
    let any_dense = dense_layers.iter().any(|&d| d);
    let any_sparse = dense_layers.iter().any(|&d| !d);
    let intermediate_size = if any_dense {
        f.size(&["intermediate_size"])?
    } else {
        f.opt_size("intermediate_size")?.unwrap_or(0)
    };
    let (moe_intermediate_size, n_routed_experts, num_experts_per_tok) = if any_sparse {
        (
            f.size(&["moe_intermediate_size"])?,
            f.size(&["n_routed_experts", "num_local_experts"])?,
            f.size(&["num_experts_per_tok"])?,
        )
    } else {
        (0, 0, 0)
    };
    let n_group = f.opt_size("n_group")?.unwrap_or(1);
    let topk_group = f.opt_size("topk_group")?.unwrap_or(1);
    if any_sparse {
        check_routing(
            f,
            n_routed_experts,
            num_experts_per_tok,
            n_group,
            topk_group,
        )?;
    }
    let routed_scaling_factor =
        match f.opt::<f64>("routed_scaling_factor", "a finite number or null")? {
            Some(x) if !x.is_finite() => {
                return Err(f.bad("routed_scaling_factor", "a finite number or null"))
            }
            Some(x) => x as f32,
            None => 1.0,
        };
    let cfg = mimo_v2::Config {
        hidden_size,
        num_hidden_layers,
        vocab_size,
        layer_types,
        sliding_window,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        v_head_dim,
        attention_value_scale,
        partial_rotary_factor: swa_rope.1 as f32,
        rope_theta: full_rope.0 as f32,
        swa_rope_theta: swa_rope.0 as f32,
        rms_norm_eps,
        dense_layers,
        intermediate_size,
        moe_intermediate_size,
        n_routed_experts,
        num_experts_per_tok,
        n_group,
        topk_group,
        norm_topk_prob: f.flag("norm_topk_prob", true)?,
        routed_scaling_factor,
    };
    check_rotary(f, factor_key, head_dim, swa_rope.1, cfg.rotary_dims())?;
    Ok(cfg)
}

fn qwen_config(f: &Fields<'_>) -> Result<qwen3_moe::Config> {
    check_common(f)?;
    f.refuse_unless(
        "use_sliding_window",
        &json!(false),
        "tilefuse's Qwen3-MoE graph uses full causal attention in every layer",
    )?;
    let hidden_size = f.size(&["hidden_size"])?;
    let num_hidden_layers = f.layers()?;
    let vocab_size = f.size(&["vocab_size"])?;
    let num_attention_heads = f.size(&["num_attention_heads"])?;
    let num_key_value_heads = f.size(&["num_key_value_heads"])?;
    check_heads(
        f,
        num_attention_heads,
        num_key_value_heads,
        "num_key_value_heads",
    )?;
    // transformers: `getattr(config, "head_dim", None) or hidden_size // num_attention_heads`.
    let head_dim = match f.opt_size("head_dim")? {
        Some(d) => d,
        None => hidden_size / num_attention_heads,
    };
    if head_dim < 2 || !head_dim.is_multiple_of(2) {
        return Err(f.invalid(
            "head_dim",
            "RoPE over the whole head needs an even head_dim",
        ));
    }
    let rope_theta = match f.raw("rope_parameters") {
        Some(Value::Object(p)) => {
            let sub = f.sub(p, "rope_parameters");
            sub.refuse_unless(
                "rope_type",
                &json!("default"),
                "tilefuse implements plain RoPE only",
            )?;
            sub.refuse_unless(
                "partial_rotary_factor",
                &json!(1.0),
                "Qwen3-MoE rotates the whole head",
            )?;
            match sub.opt::<f64>("rope_theta", "a positive number")? {
                Some(t) => t,
                None => f
                    .opt::<f64>("rope_theta", "a positive number")?
                    .unwrap_or(10_000.0),
            }
        }
        None | Some(Value::Null) => f
            .opt::<f64>("rope_theta", "a positive number")?
            .unwrap_or(10_000.0),
        Some(_) => {
            return Err(f.bad(
                "rope_parameters",
                "an object such as {\"rope_type\": \"default\", \"rope_theta\": 1000000.0}",
            ))
        }
    };
    if !(rope_theta > 0.0 && rope_theta.is_finite() && (rope_theta as f32).is_finite()) {
        return Err(f.invalid("rope_theta", "RoPE theta must be a positive finite number"));
    }
    let num_experts = match f.first::<usize>(
        &["num_experts", "num_local_experts"],
        "a non-negative integer",
    )? {
        Some((k, n)) if n > MAX_SIZE => return Err(f.bad(k, "a non-negative integer below 2^31")),
        Some((_, n)) => n,
        None => return Err(f.missing("num_experts")),
    };
    let decoder_sparse_step = f
        .opt::<usize>("decoder_sparse_step", "a positive integer")?
        .unwrap_or(1);
    if num_experts > 0 && decoder_sparse_step == 0 {
        return Err(f.bad("decoder_sparse_step", "a positive integer"));
    }
    let mlp_only_layers = f
        .opt::<Vec<usize>>("mlp_only_layers", "a list of layer indices")?
        .unwrap_or_default();
    if let Some(&bad) = mlp_only_layers.iter().find(|&&i| i >= num_hidden_layers) {
        return Err(f.invalid(
            "mlp_only_layers",
            &format!("layer {bad} does not exist (num_hidden_layers = {num_hidden_layers})"),
        ));
    }
    let mut cfg = qwen3_moe::Config {
        hidden_size,
        num_hidden_layers,
        vocab_size,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rope_theta: rope_theta as f32,
        rms_norm_eps: f.positive(&["rms_norm_eps"], 1e-6)?,
        intermediate_size: 0,
        moe_intermediate_size: 0,
        num_experts,
        num_experts_per_tok: 0,
        norm_topk_prob: f.flag("norm_topk_prob", false)?,
        decoder_sparse_step,
        mlp_only_layers,
    };
    let any_sparse = (0..num_hidden_layers).any(|i| cfg.is_sparse(i));
    let any_dense = (0..num_hidden_layers).any(|i| !cfg.is_sparse(i));
    cfg.intermediate_size = if any_dense {
        f.size(&["intermediate_size"])?
    } else {
        f.opt_size("intermediate_size")?.unwrap_or(0)
    };
    if any_sparse {
        cfg.moe_intermediate_size = f.size(&["moe_intermediate_size"])?;
        cfg.num_experts_per_tok = f.size(&["num_experts_per_tok"])?;
        check_routing(f, num_experts, cfg.num_experts_per_tok, 1, 1)?;
    }
    Ok(cfg)
}

fn quantization(f: &Fields<'_>) -> Result<Quantization> {
    let Some(q) = f.raw("quantization_config") else {
        return Ok(Quantization::default());
    };
    if q.is_null() {
        return Ok(Quantization::default());
    }
    let map = q
        .as_object()
        .ok_or_else(|| f.bad("quantization_config", "an object"))?;
    quant_object(f, map, "quantization_config")
}

fn quant_object(f: &Fields<'_>, map: &Map<String, Value>, key: &str) -> Result<Quantization> {
    let sub = f.sub(map, key);
    let err = |m: String| LoadError::new(format!("{}: `{}{key}`: {m}", f.file, f.prefix));
    let method = sub
        .opt::<String>("quant_method", "a string")?
        .ok_or_else(|| err("`quant_method` is missing".into()))?;
    let mut out = Quantization::default();
    match method.as_str() {
        "fp8" => {
            if let Some(fmt) = sub.opt::<String>("fmt", "a string")? {
                if fmt != "e4m3" {
                    return Err(err(format!("fp8 `fmt` \"{fmt}\" is not supported; tilefuse reads e4m3")));
                }
            }
            let block = sub
                .opt::<Vec<usize>>("weight_block_size", "a list [rows, columns]")?
                .unwrap_or_else(|| vec![128, 128]);
            match block.as_slice() {
                [r, c] if *r > 0 && *c > 0 => out.fp8_block = Some([*r, *c]),
                _ => return Err(err(format!("`weight_block_size` must be [rows, columns], found {block:?}"))),
            }
        }
        "mxfp4" | "nvfp4" => {
            out.fp4 = Some(if method == "mxfp4" { Fp4Format::Mx } else { Fp4Format::Nv });
            if let Some(Value::Object(base)) = map.get("base") {
                out.fp8_block = quant_object(&sub, base, "base")?.fp8_block;
            }
        }
        other => {
            return Err(err(format!(
                "quant_method \"{other}\" is not supported; tilefuse reads \"fp8\" (e4m3 with block scales), \"mxfp4\" and \"nvfp4\""
            )))
        }
    }
    Ok(out)
}

/// The `config.json` of `arch` in the transformers-native spelling, for
/// weights saved in `dtype` and a context of `max_position_embeddings`.
pub fn to_json(arch: &Arch, dtype: DType, max_position_embeddings: usize) -> Value {
    let dtype = torch_dtype_name(dtype).unwrap_or("bfloat16");
    match arch {
        Arch::MimoV2(c) => {
            let types: Vec<&str> = c
                .layer_types
                .iter()
                .map(|t| match t {
                    LayerType::Full => "full_attention",
                    LayerType::Sliding => "sliding_attention",
                })
                .collect();
            let mlp: Vec<&str> = c
                .dense_layers
                .iter()
                .map(|&d| if d { "dense" } else { "sparse" })
                .collect();
            let rope = |theta: f32| json!({"rope_type": "default", "rope_theta": f64::from(theta), "partial_rotary_factor": f32_json(c.partial_rotary_factor)});
            json!({
                "architectures": [MIMO_V2_ARCHITECTURE],
                "model_type": MIMO_V2_MODEL_TYPE,
                "dtype": dtype,
                "vocab_size": c.vocab_size,
                "hidden_size": c.hidden_size,
                "intermediate_size": c.intermediate_size,
                "moe_intermediate_size": c.moe_intermediate_size,
                "num_hidden_layers": c.num_hidden_layers,
                "num_attention_heads": c.num_attention_heads,
                "num_key_value_heads": c.num_key_value_heads,
                "head_dim": c.head_dim,
                "v_head_dim": c.v_head_dim,
                "hidden_act": "silu",
                "attention_bias": false,
                "attention_value_scale": f32_json(c.attention_value_scale),
                "layer_types": types,
                "mlp_layer_types": mlp,
                "sliding_window": c.sliding_window,
                "rope_parameters": {
                    "full_attention": rope(c.rope_theta),
                    "sliding_attention": rope(c.swa_rope_theta),
                },
                "rms_norm_eps": f32_json(c.rms_norm_eps),
                "n_routed_experts": c.n_routed_experts,
                "num_experts_per_tok": c.num_experts_per_tok,
                "n_group": c.n_group,
                "topk_group": c.topk_group,
                "norm_topk_prob": c.norm_topk_prob,
                "routed_scaling_factor": f32_json(c.routed_scaling_factor),
                "max_position_embeddings": max_position_embeddings,
                "tie_word_embeddings": false,
                "bos_token_id": null,
                "eos_token_id": null,
                "pad_token_id": null,
            })
        }
        Arch::Qwen3Moe(c) => json!({
            "architectures": [QWEN3_MOE_ARCHITECTURE],
            "model_type": QWEN3_MOE_MODEL_TYPE,
            "dtype": dtype,
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "moe_intermediate_size": c.moe_intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "hidden_act": "silu",
            "attention_bias": false,
            "rope_parameters": {"rope_type": "default", "rope_theta": f64::from(c.rope_theta)},
            "rms_norm_eps": f32_json(c.rms_norm_eps),
            "num_experts": c.num_experts,
            "num_experts_per_tok": c.num_experts_per_tok,
            "norm_topk_prob": c.norm_topk_prob,
            "decoder_sparse_step": c.decoder_sparse_step,
            "mlp_only_layers": c.mlp_only_layers,
            "use_sliding_window": false,
            "sliding_window": null,
            "max_position_embeddings": max_position_embeddings,
            "tie_word_embeddings": false,
            "bos_token_id": null,
            "eos_token_id": null,
            "pad_token_id": null,
        }),
    }
}

/// An f32 as the shortest decimal that reads back to it (`0.707`, not
/// `0.7070000171661377`), so written configs look like hand-written ones.
fn f32_json(x: f32) -> Value {
    let shortest: f64 = format!("{x}").parse().unwrap_or(f64::from(x));
    json!(shortest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets;

    fn parse_json(v: Value) -> Result<ModelConfig> {
        parse(&v.to_string(), "config.json")
    }

    #[test]
    fn presets_round_trip_through_json() {
        for p in presets::all() {
            let v = to_json(&p.arch, p.options.dtype, p.options.context);
            let back = parse_json(v).unwrap_or_else(|e| panic!("{}: {e}", p.name));
            assert_eq!(back.arch, p.arch, "{}", p.name);
            assert_eq!(back.dtype, Some(DType::BF16));
        }
    }

    #[test]
    fn errors_name_the_field() {
        let mut v = to_json(&Arch::Qwen3Moe(qwen3_moe::Config::tiny()), DType::BF16, 64);
        v.as_object_mut().map(|m| m.remove("hidden_size"));
        let e = parse_json(v)
            .expect_err("the config must be refused")
            .to_string();
        assert!(e.contains("`hidden_size` is missing"), "{e}");

        let mut v = to_json(&Arch::MimoV2(mimo_v2::Config::tiny()), DType::BF16, 64);
        v["num_key_value_heads"] = json!(3);
        let e = parse_json(v)
            .expect_err("the config must be refused")
            .to_string();
        assert!(e.contains("`num_key_value_heads` = 3"), "{e}");

        let mut v = to_json(&Arch::MimoV2(mimo_v2::Config::tiny()), DType::BF16, 64);
        v["hidden_size"] = json!("64");
        let e = parse_json(v)
            .expect_err("the config must be refused")
            .to_string();
        assert!(
            e.contains("`hidden_size` must be a positive integer, found \"64\""),
            "{e}"
        );

        let e = parse_json(json!({"model_type": "llama"}))
            .expect_err("the config must be refused")
            .to_string();
        assert!(e.contains("model_type `llama` is not supported"), "{e}");

        let mut v = to_json(&Arch::MimoV2(mimo_v2::Config::tiny()), DType::BF16, 64);
        v["attention_bias"] = json!(true);
        let e = parse_json(v)
            .expect_err("the config must be refused")
            .to_string();
        assert!(
            e.contains("`attention_bias` = true is not supported"),
            "{e}"
        );

        let mut v = to_json(&Arch::MimoV2(mimo_v2::Config::tiny()), DType::BF16, 64);
        v["rope_parameters"]["sliding_attention"]["rope_type"] = json!("yarn");
        let e = parse_json(v)
            .expect_err("the config must be refused")
            .to_string();
        assert!(
            e.contains("rope_parameters.sliding_attention.rope_type"),
            "{e}"
        );
    }

    #[test]
    fn hub_spelling_of_mimo() {
        // The fields of Xiaomi's hub config.json (remote code).
        let v = json!({
            "architectures": ["MiMoV2FlashForCausalLM"],
            "model_type": "mimo_v2_flash",
            "hidden_size": 64, "num_hidden_layers": 3, "vocab_size": 256,
            "num_attention_heads": 4, "num_key_value_heads": 1,
            "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2,
            "head_dim": 24, "swa_head_dim": 24, "v_head_dim": 16, "swa_v_head_dim": 16,
            "hybrid_layer_pattern": [0, 1, 1], "moe_layer_freq": [0, 1, 1],
            "sliding_window_size": 8, "layernorm_epsilon": 1e-5,
            "rope_theta": 5000000, "swa_rope_theta": 10000, "partial_rotary_factor": 0.334,
            "attention_value_scale": 0.707,
            "intermediate_size": 128, "moe_intermediate_size": 32,
            "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
            "norm_topk_prob": true, "routed_scaling_factor": 1.5, "scoring_func": "sigmoid",
            "topk_method": "noaux_tc", "n_shared_experts": null,
            "add_swa_attention_sink_bias": true, "add_full_attention_sink_bias": false,
            "torch_dtype": "bfloat16",
            "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
        });
        let c = parse_json(v).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.arch, Arch::MimoV2(mimo_v2::Config::tiny()));
        assert_eq!(c.quantization.fp8_block, Some([128, 128]));
    }
}
