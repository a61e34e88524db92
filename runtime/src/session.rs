//! Prefill and token-by-token decoding over one [`Executable`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tilefuse_ir::interp::{self, Tensor};
use tilefuse_ir::{Bindings, ErrorKind, IrError, Result};

use crate::Executable;

/// How the next token is chosen from the logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampling {
    /// The most likely token (first on ties).
    Greedy,
    /// A draw from `softmax(logits / temperature)` with the IR's counter-based
    /// uniform: draw `n` of a run uses `uniform(seed, n)`, so a seed reproduces a run.
    Temperature {
        /// Temperature, > 0.
        temperature: f32,
        /// Seed.
        seed: u32,
    },
}

/// Where the time of a generation went.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepTimes {
    /// Prefill forwards, all chunks.
    pub prefill: Duration,
    /// Decode forwards, one per generated token after the first.
    pub decode: Vec<Duration>,
}

/// The gap between the two largest logits of a row (`0` when the row has
/// fewer than two finite values): how far rounding would have to move the
/// logits to change a greedy choice.
pub fn top2_margin(row: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in row {
        if x > a {
            b = a;
            a = x;
        } else if x > b {
            b = x;
        }
    }
    if a.is_finite() && b.is_finite() {
        a - b
    } else {
        0.0
    }
}

/// A decoding session: the executable, the committed tokens and the cache length.
#[derive(Debug)]
pub struct Session {
    exe: Executable,
    /// Positions the caches hold (the committed length).
    len: usize,
    context: usize,
    max_tokens: usize,
    vocab: usize,
    draws: u32,
    /// Time spent so far.
    pub times: StepTimes,
    /// [`top2_margin`] of the logits row each token of the last
    /// [`Session::generate`] was chosen from.
    pub margins: Vec<f32>,
}

impl Session {
    /// A session over `exe`, whose graph takes `ids`/`pos` of `[T]` and gives
    /// `logits [T, vocab]`; `context` is the most positions the caches hold,
    /// `max_tokens` the most tokens one forward may take.
    pub fn new(exe: Executable, context: usize, max_tokens: usize) -> Result<Session> {
        let g = exe.graph();
        let logits = g
            .outputs()
            .iter()
            .find(|(n, _)| n == "logits")
            .map(|(_, id)| g.node(*id).ty.clone())
            .ok_or_else(|| {
                IrError::new(
                    ErrorKind::Interp,
                    format!("graph \"{}\" has no output named \"logits\"", g.name),
                )
            })?;
        let vocab = logits
            .dims()
            .last()
            .and_then(|d| d.as_const())
            .ok_or_else(|| {
                IrError::new(
                    ErrorKind::Interp,
                    format!("logits {logits} have no constant vocabulary axis"),
                )
            })?;
        Ok(Session {
            exe,
            len: 0,
            context,
            max_tokens: max_tokens.max(1),
            vocab,
            draws: 0,
            times: StepTimes::default(),
            margins: Vec::new(),
        })
    }

    /// Positions the caches hold.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first forward.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Runs the tokens at positions `len..len+n` (in chunks of at most
    /// `max_tokens`) and returns the logits of the last one.
    pub fn feed(&mut self, tokens: &[i32]) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(IrError::new(
                ErrorKind::Interp,
                "no tokens to run: the prompt is empty",
            ));
        }
        if self.len + tokens.len() > self.context {
            return Err(IrError::new(
                ErrorKind::Interp,
                format!(
                    "{} tokens after {} cached exceed the context limit of {} positions; \
                     use a shorter prompt or fewer new tokens",
                    tokens.len(),
                    self.len,
                    self.context
                ),
            ));
        }
        let mut last = Vec::new();
        for chunk in tokens.chunks(self.max_tokens) {
            let all = self.forward(chunk)?;
            last = all[(chunk.len() - 1) * self.vocab..].to_vec();
        }
        Ok(last)
    }

    /// Teacher-forced scoring: runs `tokens` at positions `len..` and returns
    /// the summed negative log-likelihood (natural log, computed in f64 from
    /// the f32 logits) of each token after the first given the ones before
    /// it, and how many were scored (`tokens.len() − 1`).
    pub fn score(&mut self, tokens: &[i32]) -> Result<(f64, usize)> {
        if self.len + tokens.len() > self.context {
            return Err(IrError::new(
                ErrorKind::Interp,
                format!(
                    "{} tokens after {} cached exceed the context limit of {} positions",
                    tokens.len(),
                    self.len,
                    self.context
                ),
            ));
        }
        let (mut nll, mut n) = (0.0f64, 0usize);
        let mut at = 0;
        for chunk in tokens.chunks(self.max_tokens) {
            let all = self.forward(chunk)?;
            for (i, row) in all.chunks_exact(self.vocab).enumerate() {
                let Some(&next) = tokens.get(at + i + 1) else {
                    break;
                };
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
                nll += m + z.ln() - row[next as usize] as f64;
                n += 1;
            }
            at += chunk.len();
        }
        Ok((nll, n))
    }

    /// Runs one chunk and returns the logits of all its rows.
    fn forward(&mut self, chunk: &[i32]) -> Result<Vec<f32>> {
        let t = chunk.len();
        let pos: Vec<i32> = (self.len..self.len + t).map(|p| p as i32).collect();
        let mut inputs = BTreeMap::new();
        inputs.insert("ids".to_string(), Tensor::i32(&[t], chunk.to_vec())?);
        inputs.insert("pos".to_string(), Tensor::i32(&[t], pos)?);
        let b = Bindings::new().with("S", self.len).with("T", t);
        let out = self.exe.run(&b, inputs)?;
        self.len += t;
        let logits = out
            .get("logits")
            .ok_or_else(|| IrError::new(ErrorKind::Interp, "the forward returned no logits"))?
            .to_f32();
        if logits.len() != t * self.vocab {
            return Err(IrError::new(
                ErrorKind::Interp,
                format!(
                    "the forward returned {} logits for {t} tokens of a {}-token vocabulary",
                    logits.len(),
                    self.vocab
                ),
            ));
        }
        Ok(logits)
    }

    /// Forgets every cached position and the timings: the next call starts
    /// a new sequence at position 0.
    pub fn reset(&mut self) {
        self.len = 0;
        self.times = StepTimes::default();
    }

    /// Chooses a token from one row of logits; an error if the row has no
    /// finite value to choose (NaN logits).
    pub fn choose(&mut self, logits: &[f32], sampling: Sampling) -> Result<i32> {
        let tok = match sampling {
            Sampling::Greedy => interp::argmax_row(logits),
            Sampling::Temperature { temperature, seed } => {
                let u = interp::uniform(seed, self.draws);
                self.draws = self.draws.wrapping_add(1);
                interp::sample_row(logits, temperature, u)
            }
        };
        tok.map(|t| t as i32).ok_or_else(|| {
            IrError::new(
                ErrorKind::Interp,
                format!(
                    "no token can be chosen at position {}: the logits are NaN",
                    self.len
                ),
            )
        })
    }

    /// Prefills `prompt`, then generates up to `max_new` tokens, calling
    /// `on_token` with each as soon as it is chosen (return `false` to stop).
    pub fn generate(
        &mut self,
        prompt: &[i32],
        max_new: usize,
        sampling: Sampling,
        mut on_token: impl FnMut(i32) -> bool,
    ) -> Result<Vec<i32>> {
        if self.len + prompt.len() + max_new.saturating_sub(1) > self.context {
            return Err(IrError::new(
                ErrorKind::Interp,
                format!(
                    "the prompt ({} tokens) plus {max_new} new tokens need {} positions, \
                     past the context limit of {}; shorten the prompt or ask for fewer tokens",
                    prompt.len(),
                    prompt.len() + max_new,
                    self.context
                ),
            ));
        }
        let t0 = Instant::now();
        let mut logits = self.feed(prompt)?;
        self.times.prefill += t0.elapsed();
        let mut out = Vec::with_capacity(max_new);
        self.margins.clear();
        while out.len() < max_new {
            let tok = self.choose(&logits, sampling)?;
            self.margins.push(top2_margin(&logits));
            out.push(tok);
            if !on_token(tok) || out.len() == max_new {
                break;
            }
            let t = Instant::now();
            logits = self.feed(&[tok])?;
            self.times.decode.push(t.elapsed());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::top2_margin;

    #[test]
    fn margin_is_the_gap_between_the_two_best_logits() {
        assert_eq!(top2_margin(&[0.5, 3.0, -1.0, 2.25]), 0.75);
        assert_eq!(top2_margin(&[2.0, 1.0, 2.0]), 0.0);
        assert_eq!(top2_margin(&[-4.0, -6.5]), 2.5);
        assert_eq!(top2_margin(&[1.0]), 0.0);
        assert_eq!(top2_margin(&[f32::NEG_INFINITY, 1.0]), 0.0);
    }
}
