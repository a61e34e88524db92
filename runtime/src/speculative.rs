//! Block-diffusion speculative decoding (DFlash): draft a block, verify it
//! with the target in one forward, accept a prefix, roll back, repeat.
//! The output is exactly the target's: greedy decoding is reproduced token
//! for token, and temperature sampling keeps the target's distribution.
//!
//! # Graphs
//!
//! The engine drives two [`Executable`]s and knows them only by their
//! interface (the model crate's `dflash` module builds them):
//!
//! - the **target** with symbols `S` (cached positions) and `T`; inputs
//!   `ids i32[T]`, `pos i32[T]`; outputs `logits f32[T, V]` and
//!   [`CONTEXT_OUTPUT`] `[T, F]` (the hidden states of the chosen target
//!   layers, concatenated);
//! - the **draft** behind a [`Drafter`]; [`DFlashDrafter`] runs a draft graph
//!   with symbols `S` (context positions in its caches), `C` (new context
//!   rows) and `T` (block); inputs `ids i32[T]`, `pos i32[T]`,
//!   [`CONTEXT_OUTPUT`] `[C, F]`, [`CONTEXT_POS_INPUT`] `i32[C]`; output
//!   `logits f32[T, V]`, row `j ≥ 1` proposing the token at block position `j`.
//!
//! # The loop
//!
//! Invariant between steps: the target's caches hold the `len` committed
//! positions `0..len`; the committed sequence has `len + 1` tokens, the last
//! one (`x`, the target's own latest choice) not yet run through the target;
//! the drafter holds context for positions `0..len − C` and `pending` holds the
//! target features of the `C` positions `len − C..len` it has not seen yet.
//!
//! 1. **Prefill**: the prompt through the target in chunks of at most
//!    `max_tokens` (`S` = tokens so far); `x` = the target's choice from the
//!    last row; `pending` = all prompt features.
//! 2. **Draft**: with `B' = min(B, tokens still wanted)` (so a step never
//!    produces more than asked, and never writes past the context limit of
//!    plain decoding), the drafter takes `pending` and the block
//!    `[x, mask × (B' − 1)]` at positions `len..len+B'` and returns `B' − 1`
//!    rows of logits `q`; drafts `d_1..d_{B'−1}` are their argmax, or samples.
//! 3. **Verify**: the target runs `[x, d_1, …]` at `S = len, T = B'`, causally,
//!    which writes `B'` cache rows and gives logits rows `0..B'` (row `i` is the
//!    target's distribution `p_i` for position `len + i + 1`) and features.
//! 4. **Accept** ([`SamplingRule`]): the longest prefix `d_1..d_a` the target
//!    agrees with, then the target's own token at the first disagreement (or
//!    after the last draft), the bonus.
//! 5. **Commit and roll back**: the output gains `d_1..d_a` and the bonus;
//!    `len += a + 1` (positions of `x, d_1..d_a`). Rolling the target back is
//!    binding the smaller `S` next time: the `B' − 1 − a` rows written for
//!    rejected drafts are overwritten by the next verify. Full caches can
//!    always do that; sliding-window rings have `window + max_tokens − 1`
//!    slots (`GraphOptions::ring_capacity`), so a write at position
//!    `len + B' − 1` evicts at most position `len + B' − 1 − cap ≤ len − window`,
//!    which no query at `≥ len` sees. Hence `B ≤ max_tokens` is required. The
//!    draft needs no rollback: it was given committed positions only, and its
//!    block keys are never cached.
//! 6. `pending` = feature rows `0..=a` of the verify (positions `len..len+a+1`
//!    before the update), `x` = the bonus.
//!
//! τ (tokens per step) is `a + 1`, between 1 and `B`.
//!
//! # Sampling
//!
//! Greedy: drafts are the draft's argmax, the target's choice at row `i` is
//! its argmax (first index on ties, as plain decoding), accept while
//! `d_{i+1} = argmax p_i`. Since every row of the verify forward is computed
//! exactly as the one-token forward at that position (the interpreter is
//! row-independent), the output equals [`crate::Session`]'s greedy output.
//!
//! Temperature `t`: `p_i = softmax(target_logits_i / t)`,
//! `q_j = softmax(draft_logits_j / t)`, in f64. Uniforms are
//! [`interp::uniform`]`(seed, n)` with one counter per generation, drawn in a
//! fixed order (the block's draft samples first, then the acceptance draws),
//! so a seed reproduces a run. Tokens are drawn from a distribution by inverse
//! CDF. [`SamplingRule::Rejection`] is the standard rule: `d ~ q` is accepted
//! with probability `min(1, p(d)/q(d))`; on rejection the bonus is drawn from
//! `normalize(max(0, p − q))`. Every draft is drawn independently from its `q`
//! (all rows come from one draft forward), which the rule allows: given the
//! accepted prefix, the next draft is still distributed as its `q`.
//!
//! # On the GPU
//!
//! With [`SpecOptions::argmax_outputs`], target and draft on one GPU stream
//! ([`Executable::new_beside`]) and a [`DFlashDrafter`], greedy decoding and
//! temperature sampling (rules `Rejection` and `MatchTarget`) issue every
//! step after prefill without waiting, computing what the host loop
//! computes, in different places:
//! - the draft forward's context input is a device-to-device copy of rows
//!   `0..=a` of the last verify's [`CONTEXT_OUTPUT`], still in the target's
//!   arena (the first step takes the prompt's features from the host);
//! - the verify forward's `ids` are `x` (written from the host, which knows
//!   it) followed by a copy of the drafts: the draft's [`GREEDY_OUTPUT`]
//!   rows `1..B`, or tokens a kernel drew from its logits rows `1..B`;
//! - a kernel ([`crate::accept`]) compares the drafts with the target's
//!   [`GREEDY_OUTPUT`], or applies the sampling rule to both logits in f64
//!   with the host loop's uniforms in the host loop's order, and writes `a`
//!   and the committed tokens;
//! - one copy of a few ints, the step's only wait, brings them back; the
//!   host then knows `a`, hence the next `S`, `C` and positions.
//!
//! The draft executable uploads its own copy of the target's embedding and
//! LM head (the draft graph names them as its weights); sharing one device
//! buffer between the two would save their bytes of GPU memory and is not
//! done.
//!
//! Draft and verify times of such steps are CUDA event times
//! ([`SpecStats::on_device`]). Otherwise (a logits trace, the CPU, the
//! test-only wrong rule, or executables on different streams) the host loop
//! above runs, copying the logits (or, greedy with `argmax_outputs`, the
//! argmax ids) and the features back each step. A seed gives the same
//! tokens in both loops, up to the order of f64 additions in the running
//! sums and the last bit of `exp` (a uniform within rounding of a boundary). Greedy is reproduced when the verify kernels at `T = B`
//! round every row as the `T = 1` kernels do; otherwise the output is the
//! greedy output of the verify numerics, which may differ from `T = 1`
//! decoding at near-ties (the tests and `notes/measurements.md` say where
//! each was checked).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tilefuse_ir::interp::{self, Data, Tensor};
use tilefuse_ir::{Bindings, ErrorKind, IrError, Result};

use crate::accept::{Draws, GreedyAccept, SampledAccept};
use crate::cuda_exec::{DeviceRange, Feed};
use crate::gpu::GpuError;
use crate::{Executable, Sampling};

/// The target output holding the context features `[T, F]`, and the draft
/// input `[C, F]` that takes them (the model crate's `dflash::CONTEXT_OUTPUT`).
pub const CONTEXT_OUTPUT: &str = "context_features";

/// The draft input holding the context rows' positions `i32[C]`.
pub const CONTEXT_POS_INPUT: &str = "context_pos";

/// The output (of the target and of the draft) holding each row's greedy
/// token `i32[T]` (the model crate's `dflash::GREEDY_OUTPUT`).
pub const GREEDY_OUTPUT: &str = "greedy";

fn err(msg: impl Into<String>) -> IrError {
    IrError::new(ErrorKind::Interp, msg)
}

/// What the engine gives a drafter at each step.
#[derive(Clone, Copy, Debug)]
pub struct DraftStep<'a> {
    /// Absolute position of the first new context row. Invariant: it equals
    /// the number of positions the drafter has been given since its last reset.
    pub context_start: usize,
    /// Target features `[C, F]` of the newly committed positions
    /// `context_start..context_start + C` (`C ≥ 1`).
    pub context: &'a Tensor,
    /// The last committed token, block position 0, at absolute position
    /// `context_start + C`.
    pub first: i32,
    /// Block size `B ≥ 2`: the drafter proposes `B − 1` tokens.
    pub block: usize,
    /// Every committed token so far (prompt and generated, `first` last), for
    /// drafters that replay a known continuation in tests.
    pub tokens: &'a [i32],
}

/// A source of draft blocks.
pub trait Drafter {
    /// Forgets all context: the next step starts a new generation at position 0.
    fn reset(&mut self);

    /// Takes the new context and returns logits `[(B − 1) × V]`, row `j − 1`
    /// for block position `j` (the distribution `q` the draft token is chosen from).
    fn propose(&mut self, step: &DraftStep<'_>) -> Result<Vec<f32>>;

    /// Greedy drafting: takes the new context like [`Drafter::propose`] and
    /// returns the `B − 1` argmax tokens, or `None` (having consumed
    /// nothing) when this drafter only gives logits.
    fn propose_greedy(&mut self, step: &DraftStep<'_>) -> Result<Option<Vec<i32>>> {
        let _ = step;
        Ok(None)
    }

    /// This drafter as a DFlash draft graph, which the engine can run on the
    /// GPU without host round trips when it shares the target's stream.
    fn dflash(&mut self) -> Option<&mut DFlashDrafter> {
        None
    }
}

/// Rows `r0..r1` of a float tensor `[R, F]`.
fn take_rows(t: &Tensor, r0: usize, r1: usize) -> Result<Tensor> {
    let (Data::F32(v), &[rows, f]) = (&t.data, &t.shape[..]) else {
        return Err(err(format!(
            "expected float features [rows, width], found {} {:?}",
            t.dtype, t.shape
        )));
    };
    if r0 > r1 || r1 > rows {
        return Err(err(format!(
            "rows {r0}..{r1} are outside the {rows} feature rows"
        )));
    }
    Ok(Tensor {
        dtype: t.dtype,
        shape: vec![r1 - r0, f],
        data: Data::F32(v[r0 * f..r1 * f].to_vec()),
    })
}

/// Float tensors `[R_i, F]` stacked into `[Σ R_i, F]`.
fn concat_rows(ts: &[Tensor]) -> Result<Tensor> {
    let first = ts.first().ok_or_else(|| err("no feature rows to join"))?;
    let f = first.shape.get(1).copied().unwrap_or(0);
    let mut data = Vec::new();
    let mut rows = 0;
    for t in ts {
        let Data::F32(v) = &t.data else {
            return Err(err("feature rows must hold float values"));
        };
        if t.shape.len() != 2 || t.shape[1] != f || t.dtype != first.dtype {
            return Err(err(format!(
                "feature chunks differ: {} {:?} after {} {:?}",
                t.dtype, t.shape, first.dtype, first.shape
            )));
        }
        rows += t.shape[0];
        data.extend_from_slice(v);
    }
    Ok(Tensor {
        dtype: first.dtype,
        shape: vec![rows, f],
        data: Data::F32(data),
    })
}

/// The constant last axis of graph output `name`, or an error naming it.
fn output_width(exe: &Executable, name: &str) -> Result<usize> {
    let g = exe.graph();
    let (_, id) = g.outputs().iter().find(|(n, _)| n == name).ok_or_else(|| {
        err(format!(
            "graph \"{}\" has no output named \"{name}\"",
            g.name
        ))
    })?;
    let ty = &g.node(*id).ty;
    ty.dims().last().and_then(|d| d.as_const()).ok_or_else(|| {
        err(format!(
            "output \"{name}\" of graph \"{}\" is {ty}: its last axis must be constant",
            g.name
        ))
    })
}

/// A [`Drafter`] running a DFlash draft graph (see the module docs for its
/// interface) on an [`Executable`].
#[derive(Debug)]
pub struct DFlashDrafter {
    exe: Executable,
    mask_id: i32,
    max_rows: usize,
    /// The most context rows one forward takes (the GPU plans' bound on `C`).
    max_context: usize,
    vocab: usize,
    width: usize,
    /// Context positions in the draft caches (`S` of the next call).
    held: usize,
}

impl DFlashDrafter {
    /// A drafter over `exe` (a draft graph) whose mask positions carry
    /// `mask_id`; one forward appends at most `max_rows` rows to the draft
    /// caches, context and block together (`C + T`, the draft graph's
    /// `max_tokens`): longer context is fed in chunks, each with a one-token
    /// block whose output is ignored.
    pub fn new(exe: Executable, mask_id: i32, max_rows: usize) -> Result<DFlashDrafter> {
        let g = exe.graph();
        for s in ["S", "C", "T"] {
            if !g.symbols().any(|x| x == s) {
                return Err(err(format!(
                    "draft graph \"{}\" does not declare the symbol `{s}`; build it with dflash::draft_graph",
                    g.name
                )));
            }
        }
        for i in ["ids", "pos", CONTEXT_OUTPUT, CONTEXT_POS_INPUT] {
            if g.find_input(i).is_none() {
                return Err(err(format!(
                    "draft graph \"{}\" has no input named \"{i}\"",
                    g.name
                )));
            }
        }
        let width = g
            .find_input(CONTEXT_OUTPUT)
            .and_then(|id| g.node(id).ty.dims().last().and_then(|d| d.as_const()))
            .ok_or_else(|| {
                err(format!(
                    "draft input \"{CONTEXT_OUTPUT}\" must have a constant width"
                ))
            })?;
        let vocab = output_width(&exe, "logits")?;
        if max_rows < 2 {
            return Err(err(
                "a draft forward needs max_rows >= 2 (one context row and one block row)",
            ));
        }
        let max_context = exe.symbol_bound("C").unwrap_or(usize::MAX);
        Ok(DFlashDrafter {
            exe,
            mask_id,
            max_rows,
            max_context,
            vocab,
            width,
            held: 0,
        })
    }

    /// Context positions the draft caches hold.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Feature width `F` the draft expects.
    pub fn feature_width(&self) -> usize {
        self.width
    }

    /// One draft forward: appends `ctx` (positions `held..held+C`) and runs
    /// the block `ids` at the positions after it; returns the logits `[T, V]`.
    fn forward(&mut self, ctx: Tensor, ids: Vec<i32>) -> Result<Vec<f32>> {
        let mut out = self.forward_outputs(ctx, ids, &["logits"])?;
        let logits = out
            .remove("logits")
            .ok_or_else(|| err("the draft forward returned no logits"))?;
        Ok(logits.to_f32())
    }

    /// The bindings and the host inputs (all but the context features) of a
    /// draft forward taking `c` context rows and the block `ids`.
    fn block_inputs(
        &self,
        c: usize,
        ids: Vec<i32>,
    ) -> Result<(Bindings, BTreeMap<String, Tensor>)> {
        let t = ids.len();
        let s = self.held;
        let mut inputs = BTreeMap::new();
        inputs.insert("ids".to_string(), Tensor::i32(&[t], ids)?);
        let pos = (s + c..s + c + t).map(|p| p as i32).collect();
        inputs.insert("pos".to_string(), Tensor::i32(&[t], pos)?);
        let cpos = (s..s + c).map(|p| p as i32).collect();
        inputs.insert(CONTEXT_POS_INPUT.to_string(), Tensor::i32(&[c], cpos)?);
        Ok((
            Bindings::new().with("S", s).with("C", c).with("T", t),
            inputs,
        ))
    }

    /// One draft forward returning the outputs named in `wanted`.
    fn forward_outputs(
        &mut self,
        ctx: Tensor,
        ids: Vec<i32>,
        wanted: &[&str],
    ) -> Result<BTreeMap<String, Tensor>> {
        let (b, mut inputs) = self.block_inputs(ctx.shape[0], ids)?;
        let c = ctx.shape[0];
        inputs.insert(CONTEXT_OUTPUT.to_string(), ctx);
        let out = self.exe.run_outputs(&b, inputs, Some(wanted))?;
        // The context rows are now in the caches, whatever the block was.
        self.held += c;
        Ok(out)
    }

    /// On the GPU: issues a draft forward of `block` tokens after `first`,
    /// with new context `ctx` (at most one forward's worth), and returns
    /// where rows `1..block` of its output `output` (the argmax, or the
    /// logits) will be, without waiting.
    fn enqueue_block(
        &mut self,
        ctx: DraftContext,
        first: i32,
        block: usize,
        output: &str,
    ) -> Result<DeviceRange> {
        let c = match &ctx {
            DraftContext::Host(t) => t.shape[0],
            DraftContext::Device(r) => r.rows(),
        };
        let mut ids = vec![self.mask_id; block];
        ids[0] = first;
        let (b, mut inputs) = self.block_inputs(c, ids)?;
        let mut feeds = Vec::new();
        match ctx {
            DraftContext::Host(t) => {
                inputs.insert(CONTEXT_OUTPUT.to_string(), t);
            }
            DraftContext::Device(r) => {
                let want = self.exe.value_range(&b, CONTEXT_OUTPUT)?;
                if r.dtype() != want.dtype() || r.bytes() != want.bytes() {
                    return Err(err(format!(
                        "the target's context features ({} rows of {}, {} bytes) do not fit the \
                         draft's input ({} rows of {}, {} bytes)",
                        r.rows(),
                        r.dtype(),
                        r.bytes(),
                        want.rows(),
                        want.dtype(),
                        want.bytes()
                    )));
                }
                feeds.push(Feed {
                    input: CONTEXT_OUTPUT,
                    offset: 0,
                    src: r,
                });
            }
        }
        self.exe.enqueue(&b, &inputs, &feeds)?;
        self.held += c;
        self.exe.value_range(&b, output)?.rows_range(1, block)
    }

    /// Checks a step and feeds all but the last chunk of its context (with
    /// one-token blocks); returns the first context row of the last forward.
    fn feed_context(&mut self, step: &DraftStep<'_>) -> Result<usize> {
        if step.context_start != self.held {
            return Err(err(format!(
                "the draft holds {} context positions but is given context from position {}; \
                 reset the drafter before a new generation",
                self.held, step.context_start
            )));
        }
        let rows = step.context.shape.first().copied().unwrap_or(0);
        if rows == 0 || step.context.shape.get(1) != Some(&self.width) {
            return Err(err(format!(
                "draft context must be [C >= 1, {}], found {:?}",
                self.width, step.context.shape
            )));
        }
        if step.block < 2 {
            return Err(err(format!(
                "a draft block needs B >= 2, found {}",
                step.block
            )));
        }
        if step.block >= self.max_rows {
            return Err(err(format!(
                "a draft block of {} needs forwards of more than {} rows (context and block)",
                step.block, self.max_rows
            )));
        }
        // Forwards of at most max_rows rows: context chunks with a one-token
        // block whose logits are dropped, then the rest with the real block.
        let mut r0 = 0;
        let last_chunk = (self.max_rows - step.block).min(self.max_context);
        while rows - r0 > last_chunk {
            let r1 = (r0 + (self.max_rows - 1).min(self.max_context)).min(rows - 1);
            self.forward(take_rows(step.context, r0, r1)?, vec![self.mask_id])?;
            r0 = r1;
        }
        Ok(r0)
    }
}

/// New context for a draft forward on the GPU.
enum DraftContext {
    /// Features copied from the host.
    Host(Tensor),
    /// Feature rows of a target forward, still in its arena.
    Device(DeviceRange),
}

impl Drafter for DFlashDrafter {
    fn reset(&mut self) {
        self.held = 0;
    }

    fn dflash(&mut self) -> Option<&mut DFlashDrafter> {
        Some(self)
    }

    fn propose(&mut self, step: &DraftStep<'_>) -> Result<Vec<f32>> {
        let r0 = self.feed_context(step)?;
        let rows = step.context.shape[0];
        let mut ids = vec![self.mask_id; step.block];
        ids[0] = step.first;
        let logits = self.forward(take_rows(step.context, r0, rows)?, ids)?;
        Ok(logits[self.vocab..].to_vec())
    }

    fn propose_greedy(&mut self, step: &DraftStep<'_>) -> Result<Option<Vec<i32>>> {
        if self
            .exe
            .graph()
            .outputs()
            .iter()
            .all(|(n, _)| n != GREEDY_OUTPUT)
        {
            return Ok(None);
        }
        let r0 = self.feed_context(step)?;
        let rows = step.context.shape[0];
        let mut ids = vec![self.mask_id; step.block];
        ids[0] = step.first;
        let mut out =
            self.forward_outputs(take_rows(step.context, r0, rows)?, ids, &[GREEDY_OUTPUT])?;
        let g = out
            .remove(GREEDY_OUTPUT)
            .and_then(|t| t.as_i32().map(<[i32]>::to_vec))
            .ok_or_else(|| err("the draft forward returned no greedy tokens"))?;
        Ok(Some(g[1..].to_vec()))
    }
}

/// How sampled drafts are accepted (greedy decoding ignores it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SamplingRule {
    /// Accept `d ~ q` with probability `min(1, p(d)/q(d))`; on rejection draw
    /// from `normalize(max(0, p − q))`. Exact, the highest acceptance.
    #[default]
    Rejection,
    /// Draw the target's own token at each position and accept while the
    /// draft equals it. Exact, lower acceptance.
    MatchTarget,
    /// **Deliberately wrong**, for tests only: as `Rejection`, but on rejection
    /// draws from `p` instead of the residual, which over-weights tokens the
    /// draft proposes. Exists so the distribution test can show it catches a
    /// wrong rule.
    #[doc(hidden)]
    WrongResampleFromTarget,
}

/// Settings of a [`SpecDecoder`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpecOptions {
    /// Block size B: one committed token plus `B − 1` drafts per step
    /// (`1 ≤ B ≤ max_tokens`; 1 is plain decoding).
    pub block: usize,
    /// Positions the target's caches hold (the context limit).
    pub context: usize,
    /// The most tokens one target forward may carry (the graph's
    /// `GraphOptions::max_tokens`; prefill chunks, and the bound on B that
    /// keeps ring-cache rollback safe).
    pub max_tokens: usize,
    /// Acceptance rule under temperature sampling.
    pub rule: SamplingRule,
    /// Keep the target logits row each generated token was chosen from ([`SpecDecoder::trace`]).
    pub trace_logits: bool,
    /// Tokens are chosen where the logits are. Greedy decoding reads the
    /// graphs' argmax outputs ([`GREEDY_OUTPUT`]) instead of copying logits
    /// to the host, and on one GPU stream greedy and sampled steps stay on
    /// the device (module docs, "On the GPU"). Both loops give the same tokens.
    pub argmax_outputs: bool,
}

/// One draft-and-verify step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepRecord {
    /// Block size of this step (B, or fewer near the end).
    pub block: usize,
    /// Drafts accepted, `0..block`; the step committed `accepted + 1` tokens.
    pub accepted: usize,
    /// Time in the drafter.
    pub draft: Duration,
    /// Time in the target's verify forward.
    pub verify: Duration,
}

/// What one generation did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpecStats {
    /// Prefill of the prompt through the target.
    pub prefill: Duration,
    /// The whole loop after prefill (drafts, verifies, acceptance).
    pub decode: Duration,
    /// Every step in order.
    pub steps: Vec<StepRecord>,
    /// The steps ran on the GPU without host round trips (the greedy GPU
    /// loop); their draft and verify times are GPU event times.
    pub on_device: bool,
}

impl SpecStats {
    /// τ: mean tokens committed per step (`accepted + 1`); 0 without steps.
    pub fn tau(&self) -> f64 {
        if self.steps.is_empty() {
            return 0.0;
        }
        let n: usize = self.steps.iter().map(|s| s.accepted + 1).sum();
        n as f64 / self.steps.len() as f64
    }

    /// Mean draft time per step.
    pub fn draft_per_step(&self) -> Duration {
        mean(self.steps.iter().map(|s| s.draft), self.steps.len())
    }

    /// Mean verify time per step.
    pub fn verify_per_step(&self) -> Duration {
        mean(self.steps.iter().map(|s| s.verify), self.steps.len())
    }

    /// Tokens committed by the steps (every generated token after the first).
    pub fn step_tokens(&self) -> usize {
        self.steps.iter().map(|s| s.accepted + 1).sum()
    }

    /// Tokens per second after prefill: [`SpecStats::step_tokens`] over [`SpecStats::decode`].
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.decode.is_zero() {
            0.0
        } else {
            self.step_tokens() as f64 / self.decode.as_secs_f64()
        }
    }
}

fn mean(it: impl Iterator<Item = Duration>, n: usize) -> Duration {
    if n == 0 {
        Duration::ZERO
    } else {
        it.sum::<Duration>() / n as u32
    }
}

/// `softmax(row / temperature)` in f64; `None` if a logit is NaN or none is finite.
fn probs(row: &[f32], temperature: f32) -> Option<Vec<f64>> {
    if row.iter().any(|x| x.is_nan()) {
        return None;
    }
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !m.is_finite() {
        return None;
    }
    let t = f64::from(temperature);
    let e: Vec<f64> = row
        .iter()
        .map(|&l| ((f64::from(l) - f64::from(m)) / t).exp())
        .collect();
    let s: f64 = e.iter().sum();
    Some(e.into_iter().map(|x| x / s).collect())
}

/// Inverse-CDF draw from non-negative weights `w` (not necessarily
/// normalised) with `u ∈ [0, 1)`: the first index whose running sum exceeds
/// `u · Σw`, else (rounding) the last index with positive weight.
fn draw_index(w: &[f64], u: f64) -> usize {
    let total: f64 = w.iter().sum();
    let target = u * total;
    let mut cum = 0.0;
    for (i, &x) in w.iter().enumerate() {
        cum += x;
        if cum > target {
            return i;
        }
    }
    w.iter().rposition(|&x| x > 0.0).unwrap_or(0)
}

/// The speculative decoding engine over a target [`Executable`] and a [`Drafter`].
#[derive(Debug)]
pub struct SpecDecoder<D> {
    target: Executable,
    drafter: D,
    opts: SpecOptions,
    vocab: usize,
    /// Uniforms drawn in this generation.
    draws: u32,
    trace: Vec<Vec<f32>>,
    /// The acceptance kernels of the GPU loop, built on first use.
    accept: Option<GreedyAccept>,
    sampled: Option<SampledAccept>,
    /// What the last generation did.
    pub stats: SpecStats,
}

/// The state the GPU loop starts from (after prefill and the first token).
struct Resident {
    len: usize,
    tokens: Vec<i32>,
    pending: Tensor,
    max_new: usize,
    sampling: Sampling,
}

impl<D: Drafter> SpecDecoder<D> {
    /// An engine over `target` (outputs `logits` and [`CONTEXT_OUTPUT`]) and `drafter`.
    pub fn new(target: Executable, drafter: D, opts: SpecOptions) -> Result<SpecDecoder<D>> {
        let vocab = output_width(&target, "logits")?;
        output_width(&target, CONTEXT_OUTPUT).map_err(|e| {
            err(format!(
                "{e}; build the target with dflash::target_graph so it outputs the context features"
            ))
        })?;
        if opts.max_tokens == 0 {
            return Err(err("max_tokens must be >= 1"));
        }
        if opts.block == 0 || opts.block > opts.max_tokens {
            return Err(err(format!(
                "block size {} is outside 1..={}: a verify forward may carry at most max_tokens = {} \
                 tokens (the sliding-window rings are sized for that, so rollback never evicts a \
                 needed row); use a smaller block or build the target with larger max_tokens",
                opts.block, opts.max_tokens, opts.max_tokens
            )));
        }
        Ok(SpecDecoder {
            target,
            drafter,
            opts,
            vocab,
            draws: 0,
            trace: Vec::new(),
            accept: None,
            sampled: None,
            stats: SpecStats::default(),
        })
    }

    /// The settings.
    pub fn options(&self) -> &SpecOptions {
        &self.opts
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The drafter.
    pub fn drafter(&self) -> &D {
        &self.drafter
    }

    /// With `trace_logits`, the target logits row each token of the last
    /// generation was chosen from (row `i` for generated token `i`).
    pub fn trace(&self) -> &[Vec<f32>] {
        &self.trace
    }

    /// Where the target runs.
    pub fn backend(&self) -> crate::Backend {
        self.target.backend()
    }

    /// The target executable and the drafter back.
    pub fn into_parts(self) -> (Executable, D) {
        (self.target, self.drafter)
    }

    fn uniform(&mut self, seed: u32) -> f64 {
        let u = interp::uniform(seed, self.draws);
        self.draws = self.draws.wrapping_add(1);
        f64::from(u)
    }

    /// One target forward: the logits `[T × V]` (empty when `greedy`), the
    /// greedy choice of every row (only when `greedy`: then the logits stay
    /// on the device) and the features `[T, F]`.
    fn target_run(
        &mut self,
        len: usize,
        ids: &[i32],
        greedy: bool,
    ) -> Result<(Vec<f32>, Vec<i32>, Tensor)> {
        let t = ids.len();
        let mut inputs = BTreeMap::new();
        inputs.insert("ids".to_string(), Tensor::i32(&[t], ids.to_vec())?);
        let pos = (len..len + t).map(|p| p as i32).collect();
        inputs.insert("pos".to_string(), Tensor::i32(&[t], pos)?);
        let b = Bindings::new().with("S", len).with("T", t);
        let wanted: &[&str] = if greedy {
            &[GREEDY_OUTPUT, CONTEXT_OUTPUT]
        } else {
            &["logits", CONTEXT_OUTPUT]
        };
        let mut out = self.target.run_outputs(&b, inputs, Some(wanted))?;
        let feats = out.remove(CONTEXT_OUTPUT).ok_or_else(|| {
            err(format!(
                "the target forward returned no \"{CONTEXT_OUTPUT}\""
            ))
        })?;
        if greedy {
            let g = out
                .remove(GREEDY_OUTPUT)
                .and_then(|t| t.as_i32().map(<[i32]>::to_vec))
                .ok_or_else(|| err("the target forward returned no greedy tokens"))?;
            return Ok((Vec::new(), g, feats));
        }
        let logits = out
            .remove("logits")
            .ok_or_else(|| err("the target forward returned no logits"))?
            .to_f32();
        Ok((logits, Vec::new(), feats))
    }

    /// Target distribution of one logits row, or an error naming the position.
    fn target_probs(row: &[f32], temperature: f32, pos: usize) -> Result<Vec<f64>> {
        probs(row, temperature).ok_or_else(|| {
            err(format!(
                "no token can be chosen at position {pos}: the target logits are NaN or all -inf"
            ))
        })
    }

    /// The target's own token from one logits row (plain decoding's rule).
    fn choose(&mut self, row: &[f32], sampling: Sampling, pos: usize) -> Result<i32> {
        match sampling {
            Sampling::Greedy => interp::argmax_row(row)
                .filter(|_| !row.iter().any(|x| x.is_nan()))
                .map(|t| t as i32)
                .ok_or_else(|| {
                    err(format!(
                        "no token can be chosen at position {pos}: the logits are NaN"
                    ))
                }),
            Sampling::Temperature { temperature, seed } => {
                let p = Self::target_probs(row, temperature, pos)?;
                let u = self.uniform(seed);
                Ok(draw_index(&p, u) as i32)
            }
        }
    }

    /// Decides a step: `(accepted, bonus)` from the drafts, their
    /// distributions `q` (sampling only) and the verify logits `[(n+1) × V]`.
    /// `pos` is the position of the block's first token.
    fn accept(
        &mut self,
        sampling: Sampling,
        drafts: &[i32],
        q: &[Vec<f64>],
        logits: &[f32],
        pos: usize,
    ) -> Result<(usize, i32)> {
        let v = self.vocab;
        let row = |i: usize| &logits[i * v..(i + 1) * v];
        let n = drafts.len();
        let (temperature, seed) = match sampling {
            Sampling::Greedy => {
                for (i, &d) in drafts.iter().enumerate() {
                    let y = self.choose(row(i), sampling, pos + i + 1)?;
                    if d != y {
                        return Ok((i, y));
                    }
                }
                return Ok((n, self.choose(row(n), sampling, pos + n + 1)?));
            }
            Sampling::Temperature { temperature, seed } => (temperature, seed),
        };
        for (i, &d) in drafts.iter().enumerate() {
            let p = Self::target_probs(row(i), temperature, pos + i + 1)?;
            if self.opts.rule == SamplingRule::MatchTarget {
                let u = self.uniform(seed);
                let y = draw_index(&p, u) as i32;
                if d != y {
                    return Ok((i, y));
                }
                continue;
            }
            let di = d as usize;
            let qd = q[i][di];
            let u = self.uniform(seed);
            // Accept with probability min(1, p(d)/q(d)): u < p/q  <=>  u·q < p.
            if qd > 0.0 && u * qd < p[di] {
                continue;
            }
            let u = self.uniform(seed);
            let residual: Vec<f64> = p.iter().zip(&q[i]).map(|(a, b)| (a - b).max(0.0)).collect();
            let tok = if self.opts.rule == SamplingRule::WrongResampleFromTarget
                || residual.iter().sum::<f64>() <= 0.0
            {
                // (p = q up to rounding: the residual is empty, p itself is exact.)
                draw_index(&p, u)
            } else {
                draw_index(&residual, u)
            };
            return Ok((i, tok as i32));
        }
        let p = Self::target_probs(row(n), temperature, pos + n + 1)?;
        let u = self.uniform(seed);
        Ok((n, draw_index(&p, u) as i32))
    }

    /// True when the steps can stay on the GPU: target and draft run there
    /// on one stream, and the draft outputs its argmax (greedy) or f32
    /// logits of the target's vocabulary (sampling).
    fn resident(&mut self, sampling: Sampling) -> Result<bool> {
        let Some(tg) = self.target.gpu_ref().map(|g| g.gpu().clone()) else {
            return Ok(false);
        };
        let max_block = self.opts.max_tokens;
        let greedy = sampling == Sampling::Greedy;
        let vocab = self.vocab;
        let f32_logits = |g: &tilefuse_ir::Graph| {
            g.outputs().iter().any(|(n, id)| {
                n == "logits"
                    && g.node(*id).ty.dtype == tilefuse_ir::DType::F32
                    && g.node(*id).ty.dims().last().and_then(|d| d.as_const()) == Some(vocab)
            })
        };
        if !greedy && !f32_logits(self.target.graph()) {
            return Ok(false);
        }
        let Some(d) = self.drafter.dflash() else {
            return Ok(false);
        };
        let g = d.exe.graph();
        let draft_ok = d.exe.gpu_ref().is_some_and(|x| x.gpu().same_stream(&tg))
            && if greedy {
                g.outputs().iter().any(|(n, _)| n == GREEDY_OUTPUT)
            } else {
                f32_logits(g)
            };
        // After the first step a draft forward takes C = a + 1 ≤ B context
        // rows and a block of B in one forward, never chunked.
        let b = self.opts.block;
        if !draft_ok || b < 2 || 2 * b > d.max_rows || b > d.max_context {
            return Ok(false);
        }
        if greedy && self.accept.is_none() {
            self.accept = Some(
                GreedyAccept::new(&tg, max_block)
                    .map_err(|e| err(format!("the acceptance kernel: {e}")))?,
            );
        }
        if !greedy && self.sampled.is_none() {
            self.sampled = Some(
                SampledAccept::new(&tg, max_block)
                    .map_err(|e| err(format!("the sampling kernels: {e}")))?,
            );
        }
        Ok(true)
    }

    /// The loop on the GPU (see "On the GPU" in the module docs): per step,
    /// the draft forward reads the last verify's feature rows in place, the
    /// drafts (its argmax, or draws from its logits) go into the verify's
    /// ids in place, a kernel accepts, and one copy of a few ints brings
    /// back the accepted count and the committed tokens — the step's only
    /// wait. Draft and verify times are GPU event times.
    fn decode_resident(
        &mut self,
        st: Resident,
        out: &mut Vec<i32>,
        mut go_on: bool,
        on_token: &mut impl FnMut(i32) -> bool,
    ) -> Result<()> {
        let Resident {
            mut len,
            mut tokens,
            pending,
            max_new,
            sampling,
        } = st;
        let (temperature, seed) = match sampling {
            Sampling::Greedy => (1.0, 0),
            Sampling::Temperature { temperature, seed } => (temperature, seed),
        };
        let greedy = sampling == Sampling::Greedy;
        let rule = i32::from(self.opts.rule == SamplingRule::MatchTarget);
        let vocab = self.vocab;
        let stream = self
            .target
            .gpu_ref()
            .map(|g| g.gpu().stream().clone())
            .ok_or_else(|| err("the target is not on the GPU"))?;
        let ev = |e: cudarc::driver::DriverError| err(format!("event: {e:?}"));
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        // Features of the positions the drafter has not seen: on the host
        // after prefill, then rows of the last verify on the device.
        self.stats.on_device = true;
        let mut host_pending = Some(pending);
        let mut dev_pending: Option<DeviceRange> = None;
        let mut held = 0;
        while go_on && out.len() < max_new {
            let x = *tokens.last().unwrap_or(&0);
            let block = self.opts.block.min(max_new - out.len());
            let e0 = stream.record_event(flags).map_err(ev)?;
            let drafts = if block > 1 {
                let d = self
                    .drafter
                    .dflash()
                    .ok_or_else(|| err("the drafter is not a DFlash graph"))?;
                let ctx = match (host_pending.take(), dev_pending) {
                    (Some(p), _) => {
                        // The prompt's features may need several forwards.
                        let step = DraftStep {
                            context_start: held,
                            context: &p,
                            first: x,
                            block,
                            tokens: &tokens,
                        };
                        let r0 = d.feed_context(&step)?;
                        DraftContext::Host(take_rows(&p, r0, p.shape[0])?)
                    }
                    (None, Some(r)) => DraftContext::Device(r),
                    (None, None) => return Err(err("no context features for the draft")),
                };
                let output = if greedy { GREEDY_OUTPUT } else { "logits" };
                let r = d.enqueue_block(ctx, x, block, output)?;
                held = len;
                if greedy {
                    Some((r, r))
                } else {
                    let sampler = self
                        .sampled
                        .as_ref()
                        .ok_or_else(|| err("the sampling kernels are not built"))?;
                    let draws = Draws {
                        temperature,
                        seed,
                        counter: self.draws,
                    };
                    let ids = sampler
                        .enqueue_drafts(r, block - 1, vocab, draws)
                        .map_err(|e| err(e.to_string()))?;
                    Some((ids, r))
                }
            } else {
                None
            };
            let e1 = stream.record_event(flags).map_err(ev)?;
            let mut ids = vec![0; block];
            ids[0] = x;
            let mut inputs = BTreeMap::new();
            inputs.insert("ids".to_string(), Tensor::i32(&[block], ids)?);
            let pos = (len..len + block).map(|p| p as i32).collect();
            inputs.insert("pos".to_string(), Tensor::i32(&[block], pos)?);
            let b = Bindings::new().with("S", len).with("T", block);
            let feeds: Vec<Feed<'_>> = drafts
                .iter()
                .map(|&(src, _)| Feed {
                    input: "ids",
                    offset: 4,
                    src,
                })
                .collect();
            self.target.enqueue(&b, &inputs, &feeds)?;
            let n = block - 1;
            let step_err = |e: GpuError| err(format!("speculative step at position {len}: {e}"));
            let (accepted, committed, e2) = if greedy {
                let choices = self.target.value_range(&b, GREEDY_OUTPUT)?;
                let accept = self
                    .accept
                    .as_ref()
                    .ok_or_else(|| err("the acceptance kernel is not built"))?;
                let ids = drafts.map_or(choices, |(ids, _)| ids);
                accept.enqueue(ids, choices, n).map_err(step_err)?;
                let e2 = stream.record_event(flags).map_err(ev)?;
                let (a, toks) = accept.read(n).map_err(step_err)?;
                (a, toks, e2)
            } else {
                let target = self
                    .target
                    .value_range(&b, "logits")?
                    .rows_range(0, block)?;
                let sampler = self
                    .sampled
                    .as_ref()
                    .ok_or_else(|| err("the sampling kernels are not built"))?;
                let draft_rows = drafts.map_or(target, |(_, rows)| rows);
                let draws = Draws {
                    temperature,
                    seed,
                    counter: self.draws.wrapping_add(n as u32),
                };
                sampler
                    .enqueue_accept(draft_rows, target, n, vocab, rule, draws)
                    .map_err(step_err)?;
                let e2 = stream.record_event(flags).map_err(ev)?;
                let (a, toks, used) = sampler.read(n).map_err(step_err)?;
                self.draws = self.draws.wrapping_add(n as u32).wrapping_add(used);
                (a, toks, e2)
            };
            if let Some(&bad) = committed
                .iter()
                .find(|&&t| t < 0 || t as usize >= self.vocab)
            {
                return Err(err(format!(
                    "no token can be chosen after position {len}: the device chose {bad} \
                     (NaN logits?)"
                )));
            }
            let ms = |a: &cudarc::driver::CudaEvent, b: &cudarc::driver::CudaEvent| {
                a.elapsed_ms(b)
                    .map(|m| Duration::from_secs_f64(f64::from(m.max(0.0)) / 1e3))
                    .map_err(ev)
            };
            self.stats.steps.push(StepRecord {
                block,
                accepted,
                draft: ms(&e0, &e1)?,
                verify: ms(&e1, &e2)?,
            });
            for &tok in &committed {
                if !go_on {
                    break;
                }
                out.push(tok);
                tokens.push(tok);
                go_on = on_token(tok);
            }
            dev_pending = Some(
                self.target
                    .value_range(&b, CONTEXT_OUTPUT)?
                    .rows_range(0, accepted + 1)?,
            );
            len += accepted + 1;
        }
        Ok(())
    }

    /// Prefills `prompt`, then generates up to `max_new` tokens by
    /// draft-and-verify steps, calling `on_token` with each as soon as it is
    /// committed (return `false` to stop). Each call starts a new generation
    /// (caches from position 0, the drafter reset, the uniform counter at 0).
    pub fn generate(
        &mut self,
        prompt: &[i32],
        max_new: usize,
        sampling: Sampling,
        mut on_token: impl FnMut(i32) -> bool,
    ) -> Result<Vec<i32>> {
        if prompt.is_empty() {
            return Err(err("no tokens to run: the prompt is empty"));
        }
        if let Sampling::Temperature { temperature, .. } = sampling {
            if !(temperature > 0.0 && temperature.is_finite()) {
                return Err(err(format!(
                    "temperature must be > 0 (use greedy for 0), found {temperature}"
                )));
            }
        }
        if prompt.len() + max_new.saturating_sub(1) > self.opts.context {
            return Err(err(format!(
                "the prompt ({} tokens) plus {max_new} new tokens need {} positions, past the \
                 context limit of {}; shorten the prompt or ask for fewer tokens",
                prompt.len(),
                prompt.len() + max_new,
                self.opts.context
            )));
        }
        self.drafter.reset();
        self.draws = 0;
        self.trace.clear();
        self.stats = SpecStats::default();
        let mut out = Vec::with_capacity(max_new);
        if max_new == 0 {
            return Ok(out);
        }

        // Greedy without a logits trace: the GPU picks every token and only
        // the ids and features come back.
        let fast = sampling == Sampling::Greedy
            && self.opts.argmax_outputs
            && !self.opts.trace_logits
            && self
                .target
                .graph()
                .outputs()
                .iter()
                .any(|(n, _)| n == GREEDY_OUTPUT);

        // Prefill.
        let t0 = Instant::now();
        let mut len = 0;
        let mut chunks = Vec::new();
        let mut last = Vec::new();
        let mut last_greedy = 0;
        for chunk in prompt.chunks(self.opts.max_tokens) {
            let (logits, greedy, feats) = self.target_run(len, chunk, fast)?;
            len += chunk.len();
            if fast {
                last_greedy = greedy[chunk.len() - 1];
            } else {
                last = logits[(chunk.len() - 1) * self.vocab..].to_vec();
            }
            chunks.push(feats);
        }
        let mut pending = concat_rows(&chunks)?;
        let mut tokens = prompt.to_vec();
        let first = if fast {
            last_greedy
        } else {
            self.choose(&last, sampling, len)?
        };
        if self.opts.trace_logits {
            self.trace.push(last);
        }
        self.stats.prefill = t0.elapsed();
        let t_loop = Instant::now();
        out.push(first);
        tokens.push(first);
        let mut go_on = on_token(first);
        let device_rules = matches!(
            self.opts.rule,
            SamplingRule::Rejection | SamplingRule::MatchTarget
        );
        let device = self.opts.argmax_outputs
            && !self.opts.trace_logits
            && if sampling == Sampling::Greedy {
                fast
            } else {
                device_rules
            }
            && self.resident(sampling)?;
        if device {
            self.decode_resident(
                Resident {
                    len,
                    tokens,
                    pending,
                    max_new,
                    sampling,
                },
                &mut out,
                go_on,
                &mut on_token,
            )?;
            self.stats.decode = t_loop.elapsed();
            return Ok(out);
        }
        // Context positions the drafter holds.
        let mut held = 0;

        while go_on && out.len() < max_new {
            // Invariants: tokens = committed sequence, the target caches hold
            // positions 0..len = tokens.len() - 1, the drafter holds 0..held,
            // and pending holds the features of held..len.
            debug_assert_eq!(len + 1, tokens.len());
            debug_assert_eq!(held + pending.shape[0], len);
            let x = *tokens.last().unwrap_or(&0);
            let block = self.opts.block.min(max_new - out.len());
            let td = Instant::now();
            let mut drafts = Vec::with_capacity(block.saturating_sub(1));
            let mut q = Vec::new();
            let step = DraftStep {
                context_start: held,
                context: &pending,
                first: x,
                block,
                tokens: &tokens,
            };
            let greedy_drafts = if fast && block > 1 {
                self.drafter.propose_greedy(&step)?
            } else {
                None
            };
            if let Some(g) = greedy_drafts {
                if g.len() != block - 1 {
                    return Err(err(format!(
                        "the drafter returned {} greedy tokens, expected {}",
                        g.len(),
                        block - 1
                    )));
                }
                held = len;
                drafts = g;
            } else if block > 1 {
                let logits = self.drafter.propose(&step)?;
                if logits.len() != (block - 1) * self.vocab {
                    return Err(err(format!(
                        "the drafter returned {} logits, expected {} rows of {}",
                        logits.len(),
                        block - 1,
                        self.vocab
                    )));
                }
                held = len;
                for (j, row) in logits.chunks(self.vocab).enumerate() {
                    let d = match sampling {
                        Sampling::Greedy => interp::argmax_row(row).unwrap_or(0),
                        Sampling::Temperature { temperature, seed } => {
                            let qj = probs(row, temperature).ok_or_else(|| {
                                err(format!(
                                    "the draft logits for position {} are NaN or all -inf",
                                    len + j + 1
                                ))
                            })?;
                            let u = self.uniform(seed);
                            let d = draw_index(&qj, u);
                            q.push(qj);
                            d
                        }
                    };
                    drafts.push(d as i32);
                }
            }
            let draft_time = td.elapsed();

            let tv = Instant::now();
            let mut ids = Vec::with_capacity(block);
            ids.push(x);
            ids.extend_from_slice(&drafts);
            let (logits, greedy, feats) = self.target_run(len, &ids, fast)?;
            let verify_time = tv.elapsed();

            let (accepted, bonus) = if fast {
                // Accept while the draft equals the target's own choice.
                let a = drafts
                    .iter()
                    .zip(&greedy)
                    .take_while(|(d, y)| d == y)
                    .count();
                (a, greedy[a])
            } else {
                self.accept(sampling, &drafts, &q, &logits, len)?
            };
            self.stats.steps.push(StepRecord {
                block,
                accepted,
                draft: draft_time,
                verify: verify_time,
            });
            let v = self.vocab;
            for (i, &tok) in drafts[..accepted].iter().chain([&bonus]).enumerate() {
                if !go_on {
                    break;
                }
                out.push(tok);
                tokens.push(tok);
                if self.opts.trace_logits {
                    self.trace.push(logits[i * v..(i + 1) * v].to_vec());
                }
                go_on = on_token(tok);
            }
            // Roll back: the caches are valid for x, d_1..d_a; rows written for
            // rejected drafts are overwritten by the next verify at S = len.
            let fresh = take_rows(&feats, 0, accepted + 1)?;
            pending = if block > 1 {
                fresh
            } else {
                // No draft ran: the drafter has not seen the older pending rows yet.
                concat_rows(&[pending, fresh])?
            };
            len += accepted + 1;
        }
        self.stats.decode = t_loop.elapsed();
        Ok(out)
    }
}
