//! Models shipped with tilefuse, loaded by name: a trained MiMo-V2 target
//! and its DFlash drafter under `models/<name>/` (`target/`, `drafter/`,
//! `eval/` with held-out text, and a model card `README.md`).

use std::path::{Path, PathBuf};

/// The pair `tilefuse generate` runs when given no model.
pub const DEFAULT_PAIR: &str = "mimo-v2-code";

/// Block size of the default demo.
pub const DEFAULT_BLOCK: usize = 8;

/// The folder of shipped pair `name`: `models/<name>` under the working
/// directory, else under the source tree tilefuse was built from.
pub fn pair_dir(name: &str) -> Option<PathBuf> {
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return None;
    }
    [
        PathBuf::from("models"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models"),
    ]
    .into_iter()
    .map(|m| m.join(name))
    .find(|d| d.join("target").join("config.json").is_file())
}

/// A `--model` argument: a checkpoint directory as given, or the target of
/// a shipped pair by name.
pub fn resolve_model(arg: &Path) -> PathBuf {
    if arg.is_dir() {
        return arg.to_path_buf();
    }
    arg.to_str()
        .and_then(pair_dir)
        .map(|d| d.join("target"))
        .unwrap_or_else(|| arg.to_path_buf())
}

/// The drafter that goes with a resolved `--model` directory, when it is
/// the target of a shipped pair.
pub fn pair_drafter(model_dir: &Path) -> Option<PathBuf> {
    let d = model_dir.parent()?.join("drafter");
    (model_dir.file_name()? == "target" && d.join("config.json").is_file()).then_some(d)
}
