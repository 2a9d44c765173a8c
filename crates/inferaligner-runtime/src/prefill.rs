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

use ndarray::Array2;

use crate::generate::{Gate, GateVerdict};
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

impl LayerSplitModel {
    /// Prefill `prompt` in chunks of at most `chunk_tokens`, with the hook applied for `row`
    /// (or for the row the gate decides). Returns `None` when the gate ends the request.
    pub fn prefill_prompt(
        &mut self,
        prompt: &[u32],
        chunk_tokens: usize,
        mut hook: Option<&mut (dyn LayerHook + '_)>,
        row: RowContext,
        gate: Option<Gate>,
    ) -> Result<Option<Prefilled>> {
        if prompt.is_empty() {
            return Err(RuntimeError::Input("empty prompt".into()));
        }
        self.check_tokens(prompt)?;
        let chunks: Vec<Array2<i64>> = prompt
            .chunks(chunk_tokens.max(1))
            .map(|c| Array2::from_shape_fn((1, c.len()), |(_, i)| i64::from(c[i])))
            .collect();
        // The buffer grows chunk by chunk, so that each chunk attends to the slots filled
        // before it, not to the whole prompt's worth of empty ones.
        let mut cache = self.new_cache_rows(1);
        let mut row = row;
        let mut resume: Vec<Pass> = Vec::new();
        if let Some(gate) = gate {
            if !self.is_boundary(gate.after_layer) {
                return Err(RuntimeError::Input(format!(
                    "gate layer {} does not end a segment of this export",
                    gate.after_layer
                )));
            }
            for ids in &chunks {
                let mut pass = self.begin(ids, &mut cache)?;
                self.run_layers(&mut pass, &mut cache, Some(gate.after_layer), None, &[])?;
                cache.advance(pass.new_tokens());
                resume.push(pass);
            }
            let last = resume
                .last()
                .map(|p| p.last_residuals().swap_remove(0))
                .expect("a non-empty prompt has a chunk");
            row = match (gate.decide)(&last) {
                GateVerdict::Generate(row) => row,
                GateVerdict::End => return Ok(None),
            };
            cache.truncate(0);
            let first = hook.as_deref().and_then(|h| h.first_modified_layer(&row));
            if first.is_some_and(|f| f <= gate.after_layer) {
                resume.clear();
            }
        }
        let rows = std::slice::from_ref(&row);
        let mut resume = resume.into_iter();
        let last = chunks.len() - 1;
        for (i, ids) in chunks.iter().enumerate() {
            let mut pass = match resume.next() {
                Some(mut pass) => {
                    pass.rebase(&cache);
                    pass
                }
                None => self.begin(ids, &mut cache)?,
            };
            self.run_layers(&mut pass, &mut cache, None, hook.as_deref_mut(), rows)?;
            if i == last {
                let logits = self.finish(pass, &mut cache)?;
                return Ok(Some(Prefilled { row, cache, logits }));
            }
            cache.advance(pass.new_tokens());
        }
        unreachable!("the last chunk returns")
    }
}
