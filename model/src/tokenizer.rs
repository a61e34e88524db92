//! Text to token ids and back: a checkpoint's `tokenizer.json` through the
//! `tokenizers` crate (pure Rust: `fancy-regex`, no Oniguruma), or bytes
//! (token id = byte value) for the built-in presets and checkpoints without
//! a tokenizer.

use std::path::Path;

use crate::error::{LoadError, Result};

/// A tokenizer.
#[derive(Clone, Debug)]
pub enum Tokenizer {
    /// One token per byte of the UTF-8 text; needs a vocabulary of at least 256.
    Bytes,
    /// A Hugging Face `tokenizer.json`.
    Hf(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    /// The tokenizer of a checkpoint directory: its `tokenizer.json`, else
    /// bytes when the vocabulary holds them (`vocab >= 256`).
    pub fn for_dir(dir: &Path, vocab: usize) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        if path.exists() {
            return Tokenizer::from_file(&path);
        }
        if vocab < 256 {
            return Err(LoadError::new(format!(
                "{} has no tokenizer.json and its vocabulary of {vocab} cannot hold byte tokens; \
                 add a tokenizer.json or pass token ids with --prompt-ids",
                dir.display()
            )));
        }
        Ok(Tokenizer::Bytes)
    }

    /// A `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        tokenizers::Tokenizer::from_file(path)
            .map(|t| Tokenizer::Hf(Box::new(t)))
            .map_err(|e| LoadError::new(format!("cannot read {}: {e}", path.display())))
    }

    /// A `tokenizer.json` given as text.
    pub fn from_json(json: &str) -> Result<Tokenizer> {
        tokenizers::Tokenizer::from_bytes(json.as_bytes())
            .map(|t| Tokenizer::Hf(Box::new(t)))
            .map_err(|e| LoadError::new(format!("invalid tokenizer.json: {e}")))
    }

    /// What it is, for messages.
    pub fn describe(&self) -> &'static str {
        match self {
            Tokenizer::Bytes => "byte tokens",
            Tokenizer::Hf(_) => "tokenizer.json",
        }
    }

    /// The token ids of `text` (with the special tokens the tokenizer adds,
    /// as transformers' `tokenizer(text)`).
    pub fn encode(&self, text: &str) -> Result<Vec<i32>> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(i32::from).collect()),
            Tokenizer::Hf(t) => {
                let enc = t
                    .encode(text, true)
                    .map_err(|e| LoadError::new(format!("cannot tokenize the prompt: {e}")))?;
                enc.get_ids()
                    .iter()
                    .map(|&id| {
                        i32::try_from(id).map_err(|_| {
                            LoadError::new(format!("token id {id} does not fit in i32"))
                        })
                    })
                    .collect()
            }
        }
    }

    /// The text of `ids`, special tokens skipped. Byte tokens that are not
    /// valid UTF-8 become U+FFFD; ids past 255 (byte tokenizer) print as `<id>`.
    pub fn decode(&self, ids: &[i32]) -> String {
        match self {
            Tokenizer::Bytes => {
                let mut bytes = Vec::with_capacity(ids.len());
                for &t in ids {
                    match u8::try_from(t) {
                        Ok(b) => bytes.push(b),
                        Err(_) => bytes.extend(format!("<{t}>").bytes()),
                    }
                }
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Tokenizer::Hf(t) => {
                let ids: Vec<u32> = ids.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
                t.decode(&ids, true)
                    .unwrap_or_else(|e| format!("<undecodable: {e}>"))
            }
        }
    }
}

/// Prints generated text as tokens arrive. Each call decodes a short window
/// of the latest tokens (from the token before the last text it returned),
/// and returns what that window's text adds to the window without the new
/// tokens: the work per token does not grow with the length of the text,
/// and tokenizers whose first token decodes differently (a leading space
/// dropped) still give the text of the whole sequence. Text is held back
/// while it ends in an incomplete character (U+FFFD).
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<i32>,
    /// Start of the window: the first token of the text returned last.
    prefix: usize,
    /// Tokens whose text has been returned.
    read: usize,
}

impl StreamDecoder {
    /// A decoder with nothing printed.
    pub fn new() -> StreamDecoder {
        StreamDecoder::default()
    }

    /// Adds `id`; returns the text to print now.
    pub fn push(&mut self, tok: &Tokenizer, id: i32) -> String {
        self.ids.push(id);
        self.take(tok, false)
    }

    /// Whatever is left to print at the end.
    pub fn finish(&mut self, tok: &Tokenizer) -> String {
        self.take(tok, true)
    }

    fn take(&mut self, tok: &Tokenizer, last: bool) -> String {
        let before = tok.decode(&self.ids[self.prefix..self.read]);
        let now = tok.decode(&self.ids[self.prefix..]);
        if now.len() <= before.len() || (!last && now.ends_with('\u{FFFD}')) {
            return String::new();
        }
        // A tokenizer that rewrites earlier text: print nothing rather than
        // a broken character, and wait for the window to settle.
        let Some(new) = now.strip_prefix(before.as_str()) else {
            return String::new();
        };
        let new = new.to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        new
    }
}

/// Parses token ids given as text (`--prompt-ids`): comma-separated
/// non-negative integers that fit an `i32`; blanks around them and empty
/// items are ignored. The error names the item and what is expected.
pub fn parse_ids(s: &str) -> std::result::Result<Vec<i32>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<i32>().ok().filter(|&i| i >= 0).ok_or_else(|| {
                let shown: String = p.chars().take(40).collect();
                let more = if p.chars().count() > 40 { "…" } else { "" };
                format!(
                    "--prompt-ids: `{shown}{more}` is not a token id (a non-negative integer below 2^31); \
                     pass ids separated by commas, such as 1,2,3"
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer with whitespace splitting.
    const WORDS: &str = r###"{
      "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
      "normalizer": null,
      "pre_tokenizer": {"type": "Whitespace"},
      "post_processor": null,
      "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
      "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2, "!": 3}, "unk_token": "[UNK]"}
    }"###;

    #[test]
    fn tokenizer_json_round_trip() {
        let t = Tokenizer::from_json(WORDS).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.encode("hello world !").ok(), Some(vec![1, 2, 3]));
        assert_eq!(t.encode("hello there").ok(), Some(vec![1, 0]));
        assert_eq!(t.decode(&[1, 2]), "hello world");
    }

    #[test]
    fn bytes_stream_whole_characters() {
        let t = Tokenizer::Bytes;
        let ids = t.encode("é!").unwrap_or_default();
        assert_eq!(ids, vec![0xC3, 0xA9, 0x21]);
        let mut s = StreamDecoder::new();
        assert_eq!(s.push(&t, ids[0]), "");
        assert_eq!(s.push(&t, ids[1]), "é");
        assert_eq!(s.push(&t, ids[2]), "!");
        assert_eq!(s.finish(&t), "");
        assert_eq!(t.decode(&[104, 300]), "h<300>");
    }

    /// Streamed pieces add up to the decoded whole: a word-level decoder that
    /// joins words with spaces, and the shipped pair's byte-level BPE over a
    /// text with multi-byte characters, split at every token.
    #[test]
    fn streamed_pieces_add_up_to_the_whole_text() {
        let words = Tokenizer::from_json(WORDS).unwrap_or_else(|e| panic!("{e}"));
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/mimo-v2-code/target/tokenizer.json"
        );
        let json = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let bpe = Tokenizer::from_json(&json).unwrap_or_else(|e| panic!("{e}"));
        let text = "def f(x):\n    return \"é→ 🦀\" * x  # ünïcode\n";
        for (t, ids) in [
            (&words, vec![1, 2, 3, 1, 0, 2]),
            (&bpe, bpe.encode(text).unwrap_or_else(|e| panic!("{e}"))),
            (&Tokenizer::Bytes, text.bytes().map(i32::from).collect()),
        ] {
            let mut s = StreamDecoder::new();
            let mut got: String = ids.iter().map(|&i| s.push(t, i)).collect();
            got.push_str(&s.finish(t));
            assert_eq!(got, t.decode(&ids), "{ids:?}");
        }
        assert!(bpe
            .decode(&bpe.encode(text).unwrap_or_default())
            .contains("🦀"));
    }
}
