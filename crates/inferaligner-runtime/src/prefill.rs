//! Prefill in chunks, with early-exit gating.
//!
//! Why chunks: a layer graph run over `S` new tokens materialises attention intermediates of
//! `[heads, S, past + S]` floats, so one pass over a 4k-token prompt needs gigabytes of scratch
//! memory that grows with the square of the prompt. Run in chunks of `C` tokens, each chunk
//! attends to the KV slots the chunks before it wrote (the cache layout allows exactly that),
//! and the scratch is `[heads, C, prompt]`: linear in the prompt, bounded by the chunk size.
//! The result is the same as one pass (parity-tested).
//!
//! With a gate, every chunk first runs only up to the gate layer (its KV slots for those layers
//! are written, its residual there kept: `[C, hidden]` per chunk). The gate reads the last
//! token's residual; then the cache is rewound and the remaining layers run chunk by chunk from
//! the kept residuals (over slots the gate phase did not write: those layers' K/V). When the decision steers a layer the gate already ran, the prompt runs
//! again from the embeddings with the hook (the unsteered slots of those layers are overwritten).
//!
//! A gate with a *view* (other tokens than the prompt, e.g. the last user turn alone) runs the
//! view's chunks up to the gate layer instead; after the decision the view's slots and
//! residuals are dropped and the prompt prefills through every layer.

use std::collections::VecDeque;

use ndarray::Array2;

use crate::generate::{AfterGate, EarlyExit};
use crate::hook::{LayerHook, RowContext};
use crate::kv::KvCache;
use crate::model::{LayerSplitModel, Pass};
use crate::{Result, RuntimeError};

/// Prompt tokens per chunk when the caller does not choose. Measured on SmolLM2 (2 threads,
/// shared arena): chunks of 128 prefilled a 4,000-token prompt at 287 tok/s with a 1.27 GB
/// peak, 256 at 262 tok/s and 1.37 GB, 512 at 255 tok/s and 1.63 GB, 64 at 241 tok/s and
/// 1.21 GB; a 256-token prompt was fastest in chunks of 128 too.
pub const DEFAULT_PREFILL_CHUNK: usize = 128;

/// A prompt run through the model into a cache of its own (one row).
#[derive(Debug)]
pub struct Prefilled {
    /// The row's hook parameters (the gate's verdict, or the ones given).
    pub row: RowContext,
    /// The prompt's KV, ready to join a batch.
    pub cache: KvCache,
    /// Logits of the last prompt token, `[1, vocab]`.
    pub logits: Array2<f32>,
}

/// What one [`ChunkedPrefill::step`] led to.
#[derive(Debug)]
pub enum PrefillStep {
    /// More chunks to run.
    Running,
    /// The gate ended the request ([`AfterGate::End`]).
    Ended,
    /// The prompt is in the cache.
    Done(Prefilled),
}

/// A prefill in progress, run one chunk per [`ChunkedPrefill::step`], so that an engine can
/// decode its other sequences between chunks instead of stalling them for a whole long prompt.
pub struct ChunkedPrefill {
    /// The chunks of the current phase (the gate view's while a view is gated).
    chunks: Vec<Array2<i64>>,
    /// The prompt's chunks, while the gate reads a view.
    prompt_chunks: Option<Vec<Array2<i64>>>,
    /// Chunks done in the current phase.
    next: usize,
    cache: KvCache,
    row: RowContext,
    /// Pending until every chunk has run up to the gate layer.
    gate: Option<EarlyExit>,
    /// Passes stopped at the gate layer, one per chunk, in order; resumed after the decision.
    kept: VecDeque<Pass>,
}

impl std::fmt::Debug for ChunkedPrefill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkedPrefill")
            .field("chunks", &self.chunks.len())
            .field("next", &self.next)
            .field("gating", &self.gate.is_some())
            .finish()
    }
}

impl ChunkedPrefill {
    /// Check `prompt` (and the gate layer) and split it into chunks of at most `chunk_tokens`.
    pub fn new(
        model: &LayerSplitModel,
        prompt: &[u32],
        chunk_tokens: usize,
        row: RowContext,
        gate: Option<EarlyExit>,
    ) -> Result<Self> {
        if prompt.is_empty() {
            return Err(RuntimeError::Input("empty prompt".into()));
        }
        model.check_tokens(prompt)?;
        let split = |ids: &[u32]| -> Vec<Array2<i64>> {
            ids.chunks(chunk_tokens.max(1))
                .map(|c| Array2::from_shape_fn((1, c.len()), |(_, i)| i64::from(c[i])))
                .collect()
        };
        let mut chunks = split(prompt);
        let mut prompt_chunks = None;
        if let Some(gate) = &gate {
            if !model.is_boundary(gate.after_layer) {
                return Err(RuntimeError::Input(format!(
                    "gate layer {} does not end a segment of this export",
                    gate.after_layer
                )));
            }
            if let Some(view) = &gate.view {
                if view.is_empty() {
                    return Err(RuntimeError::Input("empty gate view".into()));
                }
                model.check_tokens(view)?;
                prompt_chunks = Some(std::mem::replace(&mut chunks, split(view)));
            }
        }
        Ok(Self {
            chunks,
            prompt_chunks,
            next: 0,
            // The buffer grows chunk by chunk, so that each chunk attends to the slots filled
            // before it, not to the whole prompt's worth of empty ones.
            cache: model.new_cache_rows(1),
            row,
            gate,
            kept: VecDeque::new(),
        })
    }

    /// Bytes of KV buffers this prefill holds.
    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// Run the next chunk (up to the gate layer while the gate is pending, through every layer
    /// and the hook after it).
    pub fn step(
        &mut self,
        model: &mut LayerSplitModel,
        hook: Option<&mut (dyn LayerHook + '_)>,
    ) -> Result<PrefillStep> {
        let ids = &self.chunks[self.next];
        if let Some(gate_layer) = self.gate.as_ref().map(|g| g.after_layer) {
            let mut pass = model.begin(ids, &mut self.cache)?;
            model.run_layers(&mut pass, &mut self.cache, Some(gate_layer), None, &[])?;
            self.cache.advance(pass.new_tokens());
            self.kept.push_back(pass);
            self.next += 1;
            if self.next == self.chunks.len() {
                return Ok(self.decide(hook.as_deref()));
            }
            return Ok(PrefillStep::Running);
        }
        let mut pass = match self.kept.pop_front() {
            Some(mut pass) => {
                pass.rebase(&self.cache);
                pass
            }
            None => model.begin(ids, &mut self.cache)?,
        };
        let rows = std::slice::from_ref(&self.row);
        model.run_layers(&mut pass, &mut self.cache, None, hook, rows)?;
        self.next += 1;
        if self.next < self.chunks.len() {
            self.cache.advance(pass.new_tokens());
            return Ok(PrefillStep::Running);
        }
        let logits = model.finish(pass, &mut self.cache)?;
        Ok(PrefillStep::Done(Prefilled {
            row: std::mem::take(&mut self.row),
            cache: std::mem::take(&mut self.cache),
            logits,
        }))
    }

    /// Every chunk ran up to the gate layer: the gate reads the last token's residual, then
    /// the cache is rewound for the remaining layers.
    fn decide(&mut self, hook: Option<&(dyn LayerHook + '_)>) -> PrefillStep {
        let gate = self.gate.take().expect("called while gating");
        let last = self
            .kept
            .back()
            .map(|p| p.last_residuals().swap_remove(0))
            .expect("a non-empty prompt has a chunk");
        self.row = match (gate.decide)(&last) {
            AfterGate::Generate(row) => row,
            AfterGate::End => return PrefillStep::Ended,
        };
        self.cache.truncate(0);
        self.next = 0;
        if let Some(prompt) = self.prompt_chunks.take() {
            // the gate read its view: the prompt itself runs from the embeddings
            self.chunks = prompt;
            self.kept.clear();
            return PrefillStep::Running;
        }
        let first = hook.and_then(|h| h.first_modified_layer(&self.row));
        if first.is_some_and(|f| f <= gate.after_layer) {
            // steered at a layer the gate phase ran unsteered: from the embeddings again
            self.kept.clear();
        }
        PrefillStep::Running
    }
}

impl LayerSplitModel {
    /// Prefill `prompt` in chunks of at most `chunk_tokens`, with the hook applied for `row`
    /// (or for the row the gate decides). Returns `None` when the gate ends the request.
    pub fn prefill_prompt(
        &mut self,
        prompt: &[u32],
        chunk_tokens: usize,
        mut hook: Option<&mut (dyn LayerHook + '_)>,
        row: RowContext,
        gate: Option<EarlyExit>,
    ) -> Result<Option<Prefilled>> {
        let mut prefill = ChunkedPrefill::new(self, prompt, chunk_tokens, row, gate)?;
        loop {
            match prefill.step(self, hook.as_deref_mut())? {
                PrefillStep::Running => {}
                PrefillStep::Ended => return Ok(None),
                PrefillStep::Done(p) => return Ok(Some(p)),
            }
        }
    }
}
