//! `tilefuse init` and `tilefuse quantize`: thin wrappers over
//! [`tilefuse::model::export`] and [`tilefuse::model::quantize`].

use std::path::Path;

use tilefuse::ir::fp4::Fp4Format;
use tilefuse::model::{export, presets, quantize};

/// Writes preset `name` (random weights of `seed`) as a checkpoint in `out`.
pub fn init(name: &str, out: &Path, seed: u64) -> Result<(), String> {
    let p = presets::by_name(name)?;
    let r = export::init(&p, seed, out).map_err(|e| e.to_string())?;
    eprintln!(
        "wrote {}: config.json and model.safetensors ({} tensors, {}) of preset {} with random weights (seed {seed}); \
         run it with `tilefuse generate --model {}`",
        out.display(),
        r.tensors,
        size(r.bytes),
        p.name,
        out.display()
    );
    Ok(())
}

/// Writes `model` with FP4 experts in `format` to `out`.
pub fn quantize(model: &Path, out: &Path, format: Fp4Format) -> Result<(), String> {
    let r = quantize::quantize_checkpoint(model, out, format).map_err(|e| e.to_string())?;
    eprintln!(
        "wrote {}: the experts of {} layers ({} parameters) in {}, {} -> {}; {} other tensors copied as they were",
        out.display(),
        r.layers,
        r.parameters,
        format.dtype(),
        size(r.bytes_before as u64),
        size(r.bytes_after as u64),
        r.copied
    );
    Ok(())
}

/// Bytes in KiB, MiB or GiB.
fn size(b: u64) -> String {
    let b = b as f64;
    if b < (1 << 20) as f64 {
        format!("{:.1} KiB", b / 1024.0)
    } else if b < (1u64 << 30) as f64 {
        format!("{:.1} MiB", b / (1 << 20) as f64)
    } else {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    }
}
