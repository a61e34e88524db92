//! Checks a DFlash drafter trained by `tools/train` against tilefuse's own
//! graphs, on the CPU reference interpreter in f32.
//!
//! ```text
//! tilefuse-draft-check TARGET_DIR DRAFTER_DIR REFERENCE.safetensors [TOLERANCE]
//! ```
//!
//! `REFERENCE.safetensors` (written by `tools/train/verify.py`) holds the
//! context token ids, the block's ids and positions, and what PyTorch computed
//! from them: the target's context features and logits over the context and
//! the drafter's logits for the block. This program
//!
//! 1. loads the target with `checkpoint::load` (f32) and runs
//!    `dflash::target_graph` over the context: its context features and
//!    logits are compared with PyTorch's;
//! 2. reads the drafter's `config.json` with `DraftConfig::from_hf_json`,
//!    builds `dflash::draft_graph`, loads its weights (the target's embedding
//!    and LM head shared) and runs the block twice, on PyTorch's features and
//!    on tilefuse's: both logit sets are compared with PyTorch's.
//!
//! It passes when every maximum absolute difference, relative to the largest
//! reference magnitude, is under TOLERANCE (default 1e-3) and every row's
//! argmax agrees.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use safetensors::{Dtype, SafeTensors};
use tilefuse_ir::interp::{self, Caches, Tensor};
use tilefuse_ir::{Bindings, DType, InputKind};
use tilefuse_model::checkpoint::{self, Checkpoint, LoadOptions};
use tilefuse_model::dflash::{
    self, DraftConfig, CONTEXT_OUTPUT, CONTEXT_POS_INPUT, SHARED_WEIGHTS,
};

fn main() -> ExitCode {
    match run() {
        Ok(true) => {
            println!("draft check: PASS");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("draft check: FAIL");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("draft check: error: {e}");
            ExitCode::from(2)
        }
    }
}

/// A reference tensor: values as f32 (or i32) and its shape.
struct Ref {
    shape: Vec<usize>,
    f32: Vec<f32>,
    i32: Vec<i32>,
}

fn read_ref(st: &SafeTensors<'_>, name: &str) -> Result<Ref, String> {
    let t = st
        .tensor(name)
        .map_err(|e| format!("reference tensor `{name}`: {e}"))?;
    let data = t.data();
    let (f32s, i32s) = match t.dtype() {
        Dtype::F32 => (
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Vec::new(),
        ),
        Dtype::I32 => (
            Vec::new(),
            data.chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        other => {
            return Err(format!(
                "reference tensor `{name}` is {other:?}, expected F32 or I32"
            ))
        }
    };
    Ok(Ref {
        shape: t.shape().to_vec(),
        f32: f32s,
        i32: i32s,
    })
}

/// Compares `got` with `want` (rows of `cols`); prints the figures and
/// returns whether they agree within `tol` (relative to the largest
/// reference magnitude) with equal argmax in every row when `argmax`.
fn compare(what: &str, got: &[f32], want: &[f32], cols: usize, tol: f32, argmax: bool) -> bool {
    if got.len() != want.len() {
        println!("{what}: {} values, expected {}", got.len(), want.len());
        return false;
    }
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let rows = want.len() / cols;
    let am = |v: &[f32]| {
        v.chunks(cols)
            .map(|r| {
                r.iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
                        if x > bv {
                            (i, x)
                        } else {
                            (bi, bv)
                        }
                    })
                    .0
            })
            .collect::<Vec<_>>()
    };
    let (ga, wa) = (am(got), am(want));
    let same = ga.iter().zip(&wa).filter(|(a, b)| a == b).count();
    let ok = diff / scale < tol && (!argmax || same == rows);
    println!(
        "{what}: max |diff| {diff:.3e} (scale {scale:.3e}, relative {:.3e}){}  {}",
        diff / scale,
        if argmax {
            format!(", argmax equal in {same}/{rows} rows")
        } else {
            String::new()
        },
        if ok { "ok" } else { "MISMATCH" }
    );
    if argmax && same != rows {
        println!("  tilefuse argmax {ga:?}\n  pytorch  argmax {wa:?}");
    }
    ok
}

fn run() -> Result<bool, String> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err(
            "usage: tilefuse-draft-check TARGET_DIR DRAFTER_DIR REFERENCE.safetensors [TOLERANCE]"
                .into(),
        );
    }
    let (tdir, ddir) = (Path::new(&args[1]), Path::new(&args[2]));
    let tol: f32 = match args.get(4) {
        Some(t) => t.parse().map_err(|e| format!("bad tolerance {t}: {e}"))?,
        None => 1e-3,
    };
    let bytes = std::fs::read(&args[3]).map_err(|e| format!("cannot read {}: {e}", args[3]))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| format!("{}: {e}", args[3]))?;
    let ctx_ids = read_ref(&st, "context_ids")?.i32;
    let block_ids = read_ref(&st, "block_ids")?.i32;
    let block_pos = read_ref(&st, "block_pos")?.i32;
    let feats_ref = read_ref(&st, "features")?;
    let tlogits_ref = read_ref(&st, "target_logits")?;
    let logits_ref = read_ref(&st, "logits")?;
    let (c, t) = (ctx_ids.len(), block_ids.len());

    // The target, in f32, with its context-features output.
    let opts = LoadOptions {
        dtype: Some(DType::F32),
        expert_dtype: Some(DType::F32),
        max_tokens: Some(c.max(t)),
        ..LoadOptions::default()
    };
    let m = checkpoint::load(tdir, &opts).map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(ddir.join("config.json"))
        .map_err(|e| format!("cannot read {}: {e}", ddir.join("config.json").display()))?;
    let dcfg = DraftConfig::from_hf_json(&text)?;
    dcfg.check_target(&m.config.arch)
        .map_err(|e| e.to_string())?;
    println!(
        "draft config: {} layers, {} heads ({} kv) x {}, intermediate {}, theta {}, block {}, \
         target layers {:?}, mask {:?}, causal {:?}",
        dcfg.num_hidden_layers,
        dcfg.num_attention_heads,
        dcfg.num_key_value_heads,
        dcfg.head_dim,
        dcfg.intermediate_size,
        dcfg.rope_theta,
        dcfg.block_size,
        dcfg.target_layer_ids,
        dcfg.mask,
        dcfg.is_causal
    );
    let tg = dflash::target_graph(&m.config.arch, &m.options, &dcfg.target_layer_ids)
        .map_err(|e| e.to_string())?;
    let b = Bindings::new().with("S", 0).with("T", c);
    let mut caches = Caches::for_graph(&tg, &b).map_err(|e| e.to_string())?;
    let mut vals: BTreeMap<String, Tensor> = m.weights.clone();
    let pos: Vec<i32> = (0..c as i32).collect();
    let i32s = |v: Vec<i32>| Tensor::i32(&[v.len()], v).map_err(|e| e.to_string());
    vals.insert("ids".into(), i32s(ctx_ids.clone())?);
    vals.insert("pos".into(), i32s(pos.clone())?);
    let outs = interp::run(&tg, &b, &vals, &mut caches).map_err(|e| e.to_string())?;
    let feats = outs[CONTEXT_OUTPUT].to_f32();
    let width = *feats_ref.shape.last().unwrap_or(&1);
    let vocab = *tlogits_ref.shape.last().unwrap_or(&1);
    let mut ok = compare(
        "target context features",
        &feats,
        &feats_ref.f32,
        width,
        tol,
        false,
    );
    ok &= compare(
        "target logits",
        &outs["logits"].to_f32(),
        &tlogits_ref.f32,
        vocab,
        tol,
        true,
    );

    // The draft graph, its own weights from the drafter folder.
    let dg = dflash::draft_graph(&dcfg, &m.options).map_err(|e| e.to_string())?;
    let dck = Checkpoint::open(ddir).map_err(|e| e.to_string())?;
    let mut dvals = BTreeMap::new();
    for id in dg.inputs_of_kind(InputKind::Weight) {
        let n = dg.node(id);
        let tensor = if SHARED_WEIGHTS.contains(&n.name.as_str()) {
            m.weights[&n.name].clone()
        } else {
            let shape = n.ty.shape.eval(&Bindings::new())?;
            let v = dck
                .floats(&n.name, &shape, [128, 128])
                .map_err(|e| e.to_string())?;
            checkpoint::to_tensor(&n.name, n.ty.dtype, &shape, v).map_err(|e| e.to_string())?
        };
        dvals.insert(n.name.clone(), tensor);
    }
    let unused: Vec<&str> = dck.names().filter(|n| !dvals.contains_key(*n)).collect();
    if !unused.is_empty() {
        println!("drafter tensors the draft graph does not read: {unused:?}");
        ok = false;
    }
    let db = Bindings::new().with("S", 0).with("C", c).with("T", t);
    for (label, features) in [
        ("draft logits (PyTorch features)", feats_ref.f32.clone()),
        ("draft logits (tilefuse features)", feats.clone()),
    ] {
        let mut v = dvals.clone();
        v.insert("ids".into(), i32s(block_ids.clone())?);
        v.insert("pos".into(), i32s(block_pos.clone())?);
        v.insert(
            CONTEXT_OUTPUT.into(),
            Tensor::f32(DType::F32, &[c, width], features).map_err(|e| e.to_string())?,
        );
        v.insert(CONTEXT_POS_INPUT.into(), i32s(pos.clone())?);
        let mut caches = Caches::for_graph(&dg, &db).map_err(|e| e.to_string())?;
        let out = interp::run(&dg, &db, &v, &mut caches).map_err(|e| e.to_string())?;
        ok &= compare(
            label,
            &out["logits"].to_f32(),
            &logits_ref.f32,
            vocab,
            tol,
            true,
        );
    }
    Ok(ok)
}
