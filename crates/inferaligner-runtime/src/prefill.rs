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
//! the kept residuals (over slots the gate phase did not write: those layers' K/V). When the
//! decision steers a layer the gate already ran, the prompt runs again from the embeddings with
//! the hook (the unsteered slots of those layers are overwritten).
//!
//! A gate with a *view* (other tokens than the prompt, e.g. the last user turn alone) runs the
//! view's chunks up to the gate layer instead; after the decision the view's slots and
//! residuals are dropped and the prompt prefills through every layer. With more views, each
//! runs alone in turn (the cache emptied between them) and the gate reads them all.
//!
//! A gate with a *mean readout* ([`EarlyExit::mean_from`]) also reads the mean of the kept
//! residuals over the request's own tokens; its phase reuses cached blocks only before them,
//! so every residual it averages is computed.
//!
//! With a [`PrefixCache`], each phase first loads the longest cached prefix of its tokens and
//! runs only the rest; the gate phase needs cached layers up to the gate layer, the full phase
//! all of them. What a phase computed goes back into the cache, in the namespace of the KV it
//! holds: unsteered, or the hook's [`LayerHook::prompt_key`] for a steered row (a row whose
//! hook gives no key neither reads nor writes the cache). When the decision steers a layer
//! the gate already ran, the prompt runs again from the embeddings, from the steered prefix
//! that rows steered alike left in the cache.
//!
//! A steered full phase (with a cache) also stops each chunk after the first steered layer `f`
//! to keep its residual there, applies the hook and goes on; at the end it stores, besides its
//! steered blocks, its unsteered part (KV of layers `0..=f`, residuals after `f`) as unsteered
//! blocks. A later steered phase that finds more of its prompt so than in its own namespace (a
//! retry at another strength: `retry_scales`) loads that KV and runs only the layers after `f`
//! over those positions, from the kept residuals. An unsteered full phase does the same at the
//! layer its engine last saw steered rows start at (a hint), so that the first steered prefill
//! of a prefix unsteered rows computed resumes too.

use std::collections::VecDeque;

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, Axis};

use crate::generate::{AfterGate, EarlyExit, TokenLogprobs};
use crate::hook::{LayerHook, RowContext};
use crate::kv::KvCache;
use crate::model::{LayerSplitModel, Pass};
use crate::prefix::{PrefixCache, UNSTEERED};
use crate::sampling;
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
    /// The prompt's tokens after the first, scored ([`ChunkedPrefill::scoring_prompt`]; empty
    /// when not asked).
    pub prompt_logprobs: Vec<TokenLogprobs>,
}

/// What one [`ChunkedPrefill::step`] led to.
#[derive(Debug)]
pub enum PrefillStep {
    /// More chunks to run.
    Running,
    /// The gate ended the request ([`AfterGate::End`]).
    Ended,
    /// The prompt is in the cache (boxed: it is the large one).
    Done(Box<Prefilled>),
}

/// A prefill in progress, run one chunk per [`ChunkedPrefill::step`], so that an engine can
/// decode its other sequences between chunks instead of stalling them for a whole long prompt.
///
/// It runs in up to two phases: while a gate is pending, the gate's tokens (the prompt, or its
/// view) run up to the gate layer; then the prompt runs through every layer. Each phase starts
/// from the longest prefix a [`PrefixCache`] holds for its tokens, when one is given and the
/// row is unsteered.
pub struct ChunkedPrefill {
    prompt: Vec<u32>,
    /// The tokens the gate reads instead of the prompt, until the decision.
    view: Option<Vec<u32>>,
    /// Where the current gate phase's mean starts (see [`EarlyExit::mean_from`]).
    mean_from: Option<usize>,
    /// Views still to read after `view`, with their `mean_from`.
    more_views: VecDeque<(Vec<u32>, Option<usize>)>,
    /// The activations of the views read so far, end to end.
    read: Vec<f32>,
    chunk_tokens: usize,
    /// The chunks of the current phase after its reused prefix; `None` until the phase begins.
    chunks: Option<Vec<Array2<i64>>>,
    /// Chunks done in the current phase.
    next: usize,
    /// Tokens of the current phase whose KV came from the prefix cache, and the layers it holds.
    reused: (usize, usize),
    cache: KvCache,
    row: RowContext,
    /// Pending until every chunk has run up to the gate layer.
    gate: Option<EarlyExit>,
    /// Passes stopped at the gate layer, one per chunk, in order; resumed after the decision.
    kept: VecDeque<Pass>,
    /// Score the prompt's tokens with this many alternatives each (see `scoring_prompt`).
    score: Option<usize>,
    /// The prompt's tokens scored so far.
    scored: Vec<TokenLogprobs>,
    /// While scoring: the head's input at each prompt position so far (row-major
    /// `[positions, hidden]`), reused or computed, for the prefix cache.
    head_inputs: Vec<f32>,
    /// In a full phase with a prefix cache: the layer ([`Self::resume_point`]) after which each
    /// chunk's residual is kept before the hook ...
    resume_after: Option<usize>,
    /// ... here (row-major `[positions, hidden]`), to store the phase's unsteered part.
    resume_residuals: Vec<f32>,
    /// Where an unsteered full phase leaves a resume point ([`Self::leaving_resume_points`]).
    resume_hint: Option<usize>,
    /// The unsteered KV (layers `0..=resume_after`) of the positions the phase resumes, copied
    /// into `cache` chunk by chunk as their passes run (see `resume_from_cache`).
    resumed_kv: Option<KvCache>,
}

impl std::fmt::Debug for ChunkedPrefill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkedPrefill")
            .field("prompt", &self.prompt.len())
            .field("chunks", &self.chunks.as_ref().map(Vec::len))
            .field("next", &self.next)
            .field("reused", &self.reused)
            .field("gating", &self.gate.is_some())
            .finish()
    }
}

impl ChunkedPrefill {
    /// Check `prompt` (and the gate layer and view); it runs in chunks of at most `chunk_tokens`.
    pub fn new(
        model: &LayerSplitModel,
        prompt: &[u32],
        chunk_tokens: usize,
        row: RowContext,
        mut gate: Option<EarlyExit>,
    ) -> Result<Self> {
        if prompt.is_empty() {
            return Err(RuntimeError::Input("empty prompt".into()));
        }
        model.check_tokens(prompt)?;
        let (mut view, mut mean_from, mut more_views) = (None, None, VecDeque::new());
        if let Some(gate) = &mut gate {
            if !model.is_boundary(gate.after_layer) {
                return Err(RuntimeError::Input(format!(
                    "gate layer {} does not end a segment of this export",
                    gate.after_layer
                )));
            }
            view = gate.view.take();
            mean_from = gate.mean_from;
            more_views = std::mem::take(&mut gate.more_views).into();
            if view.is_none() && !more_views.is_empty() {
                return Err(RuntimeError::Input(
                    "more gate views without a first".into(),
                ));
            }
            for v in view.iter().chain(more_views.iter().map(|(v, _)| v)) {
                if v.is_empty() {
                    return Err(RuntimeError::Input("empty gate view".into()));
                }
                model.check_tokens(v)?;
            }
        }
        Ok(Self {
            prompt: prompt.to_vec(),
            view,
            mean_from,
            more_views,
            read: Vec::new(),
            chunk_tokens: chunk_tokens.max(1),
            chunks: None,
            next: 0,
            reused: (0, 0),
            // The buffer grows chunk by chunk, so that each chunk attends to the slots filled
            // before it, not to the whole prompt's worth of empty ones.
            cache: model.new_cache_rows(1),
            row,
            gate,
            kept: VecDeque::new(),
            score: None,
            scored: Vec::new(),
            head_inputs: Vec::new(),
            resume_after: None,
            resume_residuals: Vec::new(),
            resume_hint: None,
            resumed_kv: None,
        })
    }

    /// Also score the prompt: the log-probability of each token after the first given the ones
    /// before it, with `top` alternatives ([`Prefilled::prompt_logprobs`]). The full pass runs
    /// the head over each chunk's positions, not only the last one's, and reuses only cached
    /// blocks that kept the head's inputs (an earlier scored prompt's), whose scores it reads
    /// through the head; it stores its own blocks so (see [`PrefixCache`]).
    pub fn scoring_prompt(mut self, top: Option<usize>) -> Self {
        self.score = top;
        self
    }

    /// With a prefix cache, an unsteered prompt also leaves its blocks a resume point after
    /// `layer` (the first layer steered rows are steered at): the residual there, so that a
    /// steered prefill of the same prefix (a chat turned harmful, a domain bot's system prompt
    /// under a strength not seen yet) runs only the layers after it over them. An unsteered
    /// prompt also resumes from such points when they cover more than its own cached layers.
    pub fn leaving_resume_points(mut self, layer: Option<usize>) -> Self {
        self.resume_hint = layer;
        self
    }

    /// Bytes of KV buffers this prefill holds (with the unsteered KV a resumed one copies in),
    /// and of the residuals it keeps for the prefix cache (a scored one's head inputs, a steered
    /// one's residuals after its first steered layer).
    pub fn cache_bytes(&self) -> usize {
        let residuals = self.head_inputs.len() + self.resume_residuals.len();
        let resumed = self.resumed_kv.as_ref().map_or(0, KvCache::bytes);
        self.cache.bytes() + resumed + residuals * std::mem::size_of::<f32>()
    }

    /// The gate layer while the gate is pending: the next step runs a gate-phase chunk, which
    /// [`Self::step_gates`] can batch with other prefills' gated at the same layer.
    pub fn gate_layer(&self) -> Option<usize> {
        self.gate.as_ref().map(|g| g.after_layer)
    }

    /// Run the next gate-phase chunk of every prefill in `prefills` (all gated after the same
    /// layer) as one batch: rows of different lengths are padded to the longest and the padding
    /// masked out, so each row's KV and residuals are those of running it alone. Each prefill
    /// then goes on as after its own [`Self::step`]; the results are in the same order.
    pub fn step_gates(
        prefills: &mut [&mut ChunkedPrefill],
        model: &mut LayerSplitModel,
        hook: Option<&(dyn LayerHook + '_)>,
        mut prefixes: Option<&mut PrefixCache>,
    ) -> Result<Vec<PrefillStep>> {
        let gate_layer = prefills.first().and_then(|p| p.gate_layer());
        let Some(gate_layer) = gate_layer else {
            return Ok(Vec::new());
        };
        if prefills.iter().any(|p| p.gate_layer() != Some(gate_layer)) {
            return Err(RuntimeError::Input(
                "prefills gated at different layers cannot run together".into(),
            ));
        }
        let mut lens = Vec::with_capacity(prefills.len());
        for p in prefills.iter_mut() {
            let len = p.next_gate_chunk(model, prefixes.as_deref_mut());
            lens.push(len.expect("every prefill is gating"));
        }
        let over_cache = prefills.iter().any(|p| p.cached_tokens() > 0);
        if prefills.len() > 1 && !model.takes_ragged_batch(over_cache) {
            return Err(RuntimeError::Input(
                "this export's layer graphs cannot run rows of different lengths together \
                 over cached tokens"
                    .into(),
            ));
        }
        let mut batch = model.new_cache();
        for p in prefills.iter() {
            batch.append_rows(&p.cache);
        }
        let width = lens.iter().copied().max().unwrap_or(0);
        let ids = Array2::from_shape_fn((prefills.len(), width), |(r, j)| {
            let chunk = prefills[r].next_chunk();
            if j < lens[r] { chunk[[0, j]] } else { 0 }
        });
        let mut pass = model.begin_ragged(&ids, Some(&lens), &mut batch)?;
        model.run_layers(&mut pass, &mut batch, Some(gate_layer), None, &[])?;
        batch.advance_rows(&lens);
        let mut steps = Vec::with_capacity(prefills.len());
        for (r, p) in prefills.iter_mut().enumerate() {
            p.cache = batch.row(r);
            p.kept.push_back(pass.row(r, lens[r]));
            p.next += 1;
            let last = p.next == p.chunks.as_ref().map_or(0, Vec::len);
            steps.push(if last {
                p.decide(model, hook, prefixes.as_deref_mut())
            } else {
                PrefillStep::Running
            });
        }
        Ok(steps)
    }

    /// Tokens already in this prefill's cache (a prefix the cache held, earlier chunks).
    pub fn cached_tokens(&self) -> usize {
        self.cache.fill().first().copied().unwrap_or(0)
    }

    /// While the gate is pending: the tokens of the next gate-phase chunk (its phase begins
    /// here if it has not, with the prefix lookup), so that a caller can size a batch.
    pub fn next_gate_chunk(
        &mut self,
        model: &LayerSplitModel,
        prefixes: Option<&mut PrefixCache>,
    ) -> Option<usize> {
        self.gate.as_ref()?;
        if self.chunks.is_none() {
            self.begin_phase(model, prefixes, Some(UNSTEERED), None);
        }
        Some(self.next_chunk().len_of(Axis(1)))
    }

    fn next_chunk(&self) -> &Array2<i64> {
        &self.chunks.as_ref().expect("the phase has begun")[self.next]
    }

    /// The tokens of the current phase: the gate view's while it is gated, else the prompt's.
    fn phase_tokens(&self) -> &[u32] {
        match (&self.gate, &self.view) {
            (Some(_), Some(view)) => view,
            _ => &self.prompt,
        }
    }

    /// Where the current phase's KV belongs in the prefix cache: the gate phase and an unsteered
    /// row's are unsteered, a steered row's under its hook's key (`None`: nowhere).
    fn namespace(&self, hook: Option<&(dyn LayerHook + '_)>) -> Option<u64> {
        match hook {
            Some(h) if self.gate.is_none() && h.first_modified_layer(&self.row).is_some() => {
                h.prompt_key(&self.row)
            }
            _ => Some(UNSTEERED),
        }
    }

    /// Where a full phase run with a prefix cache keeps residuals, or resumes from them (see the
    /// module doc), when it ends a segment: a steered row's first steered layer, an unsteered
    /// row's hint ([`Self::leaving_resume_points`]).
    fn resume_point(
        &self,
        model: &LayerSplitModel,
        hook: Option<&(dyn LayerHook + '_)>,
        caching: bool,
    ) -> Option<usize> {
        if self.gate.is_some() || self.score.is_some() || !caching {
            return None;
        }
        let layer = match hook.and_then(|h| h.first_modified_layer(&self.row)) {
            // a steered row whose KV is cached (it has a key)
            Some(f) => hook.and_then(|h| h.prompt_key(&self.row)).map(|_| f),
            None => self.resume_hint,
        };
        layer.filter(|&f| model.is_boundary(f))
    }

    /// Begin a phase from an empty cache: load the longest prefix of its tokens cached in
    /// `namespace` (none when `None`) and cut the rest into chunks. A full phase with a resume
    /// point (`resume_after`) takes instead the unsteered part another prefill left there, when
    /// that covers more, and resumes its positions after that layer.
    fn begin_phase(
        &mut self,
        model: &LayerSplitModel,
        prefixes: Option<&mut PrefixCache>,
        namespace: Option<u64>,
        resume_after: Option<usize>,
    ) {
        self.cache.truncate(0);
        self.kept.clear();
        self.resume_after = resume_after;
        self.resume_residuals.clear();
        self.resumed_kv = None;
        let depth = match &self.gate {
            Some(gate) => gate.after_layer + 1,
            None => model.manifest().num_layers,
        };
        let tokens = self.phase_tokens().to_vec();
        // a pooled gate needs the residuals of every token it averages: reuse only before them
        let reusable = match (&self.gate, self.mean_from) {
            (Some(_), Some(from)) => &tokens[..from.min(tokens.len())],
            _ => &tokens[..],
        };
        let scored = self.score.is_some() && self.gate.is_none();
        self.head_inputs.clear();
        if let (Some(p), Some(namespace), Some(f)) = (prefixes.as_deref(), namespace, resume_after)
            && p.resumable(reusable, f) > p.cached(reusable, depth, namespace)
        {
            let p = prefixes.expect("checked");
            self.resume_from_cache(model, &tokens, p, f);
            return;
        }
        self.reused = match (prefixes, namespace) {
            (Some(p), Some(namespace)) if !reusable.is_empty() && scored => {
                p.load_scored(reusable, &mut self.cache, namespace, &mut self.head_inputs)
            }
            (Some(p), Some(namespace)) if !reusable.is_empty() => {
                p.load(reusable, depth, &mut self.cache, namespace)
            }
            _ => (0, 0),
        };
        let chunks = tokens[self.reused.0..]
            .chunks(self.chunk_tokens)
            .map(|c| Array2::from_shape_fn((1, c.len()), |(_, i)| i64::from(c[i])))
            .collect();
        self.chunks = Some(chunks);
        self.next = 0;
    }

    /// Load the unsteered part of `tokens`' longest prefix that resumes after layer `f` and queue
    /// its positions as passes stopped there (a chunk each), then the rest as token chunks.
    fn resume_from_cache(
        &mut self,
        model: &LayerSplitModel,
        tokens: &[u32],
        prefixes: &mut PrefixCache,
        f: usize,
    ) {
        let hidden = model.manifest().hidden_size;
        let mut residuals = Vec::new();
        // Loaded aside, not into the cache: a plain layer graph attends over the cache's every
        // slot (masked), so a cache holding the whole prefix from the start would make each
        // chunk attend to all of it; the cache grows chunk by chunk as in any prefill.
        let mut kv = model.new_cache_rows(1);
        let loaded = prefixes.load_resuming(tokens, f, &mut kv, &mut residuals);
        self.resumed_kv = Some(kv);
        self.reused = (0, 0);
        let ids = |c: &[u32]| Array2::from_shape_fn((1, c.len()), |(_, i)| i64::from(c[i]));
        let mut chunks = Vec::new();
        for (i, c) in tokens[..loaded].chunks(self.chunk_tokens).enumerate() {
            let start = i * self.chunk_tokens * hidden;
            let rows = residuals[start..start + c.len() * hidden].to_vec();
            let rows = Array3::from_shape_vec((1, c.len(), hidden), rows).expect("whole rows");
            self.kept.push_back(model.pass_after(f, rows));
            chunks.push(ids(c));
        }
        chunks.extend(tokens[loaded..].chunks(self.chunk_tokens).map(ids));
        self.chunks = Some(chunks);
        self.next = 0;
    }

    /// Run the next chunk (up to the gate layer while the gate is pending, through every layer
    /// and the hook after it). With `prefixes`, phases start from cached prefixes and store
    /// what they computed.
    pub fn step(
        &mut self,
        model: &mut LayerSplitModel,
        hook: Option<&mut (dyn LayerHook + '_)>,
        mut prefixes: Option<&mut PrefixCache>,
    ) -> Result<PrefillStep> {
        // the gate phase runs unhooked: whatever the row, its KV is unsteered
        let namespace = self.namespace(hook.as_deref());
        if self.chunks.is_none() {
            let resume_after = self.resume_point(model, hook.as_deref(), prefixes.is_some());
            self.begin_phase(model, prefixes.as_deref_mut(), namespace, resume_after);
            if let (Some(top), None) = (self.score, &self.gate) {
                self.score_reused(model, top)?;
            }
        }
        let chunks = self.chunks.as_ref().expect("the phase has begun");
        let last_chunk = self.next + 1 == chunks.len();
        let ids = &chunks[self.next];
        if let Some(gate_layer) = self.gate.as_ref().map(|g| g.after_layer) {
            let mut pass = model.begin(ids, &mut self.cache)?;
            model.run_layers(&mut pass, &mut self.cache, Some(gate_layer), None, &[])?;
            self.cache.advance(pass.new_tokens());
            self.kept.push_back(pass);
            self.next += 1;
            if last_chunk {
                return Ok(self.decide(model, hook.as_deref(), prefixes));
            }
            return Ok(PrefillStep::Running);
        }
        let mut pass = match self.kept.pop_front() {
            Some(mut pass) => {
                if let (Some(kv), Some(f)) = (&self.resumed_kv, self.resume_after) {
                    self.cache.reserve(pass.new_tokens());
                    let slots = self.cache.fill()[0]..self.cache.fill()[0] + pass.new_tokens();
                    for layer in 0..=f {
                        let (k, v) = kv.layer(layer);
                        let s = ndarray::s![.., .., slots.clone(), ..];
                        self.cache.write(layer, k.slice(s), v.slice(s));
                    }
                    if self.kept.is_empty() {
                        self.resumed_kv = None;
                    }
                }
                pass.rebase(&self.cache);
                pass
            }
            None => model.begin(ids, &mut self.cache)?,
        };
        let rows = std::slice::from_ref(&self.row);
        let mut hook = hook;
        if let Some(f) = self.resume_after {
            // up to the resume point unhooked (the hook changes nothing before it; a pass
            // resumed from kept residuals is there already), its residual kept, then the hook
            model.run_layers(&mut pass, &mut self.cache, Some(f), None, rows)?;
            self.resume_residuals.extend(pass.residual().iter());
            model.hook_after(f, &mut pass, hook.as_deref_mut(), rows);
        }
        model.run_layers(&mut pass, &mut self.cache, None, hook, rows)?;
        if let Some(top) = self.score {
            self.score_chunk(model, &pass, top)?;
        }
        self.next += 1;
        if !last_chunk {
            self.cache.advance(pass.new_tokens());
            return Ok(PrefillStep::Running);
        }
        let logits = model.finish(pass, &mut self.cache)?;
        match (prefixes, namespace) {
            (Some(p), Some(namespace)) if self.score.is_some() => {
                let hidden = model.manifest().hidden_size;
                let positions = self.head_inputs.len() / hidden;
                let head_inputs = ArrayView2::from_shape((positions, hidden), &self.head_inputs)
                    .expect("whole positions");
                p.insert_scored(&self.prompt, &self.cache, namespace, head_inputs);
            }
            (Some(p), Some(namespace)) => {
                p.insert(
                    &self.prompt,
                    &self.cache,
                    model.manifest().num_layers,
                    namespace,
                );
                // stored last, so that a retry finds it before the steered blocks are evicted
                if let Some(f) = self.resume_after {
                    let hidden = model.manifest().hidden_size;
                    let positions = self.resume_residuals.len() / hidden;
                    let residuals =
                        ArrayView2::from_shape((positions, hidden), &self.resume_residuals)
                            .expect("whole positions");
                    p.insert_resumable(&self.prompt, &self.cache, f, residuals);
                }
            }
            _ => {}
        }
        Ok(PrefillStep::Done(Box::new(Prefilled {
            row: std::mem::take(&mut self.row),
            cache: std::mem::take(&mut self.cache),
            logits,
            prompt_logprobs: std::mem::take(&mut self.scored),
        })))
    }

    /// Score the prompt tokens that follow the positions of `pass` (a full-phase chunk, which
    /// starts where the cache's fill is): position `p`'s logits give token `p + 1`'s
    /// log-probability. The last prompt position predicts the answer's first token: not scored.
    fn score_chunk(&mut self, model: &mut LayerSplitModel, pass: &Pass, top: usize) -> Result<()> {
        let start = self.cache.fill()[0];
        let logits = model.head(pass.residual())?;
        self.head_inputs.extend(pass.residual().iter());
        self.push_scores(start, &logits, top);
        Ok(())
    }

    /// Score the tokens after the positions a prefix cache's blocks gave this phase, from the
    /// head's inputs they kept, a chunk of positions at a time (the logits of one position are
    /// `vocab` floats).
    fn score_reused(&mut self, model: &mut LayerSplitModel, top: usize) -> Result<()> {
        let hidden = model.manifest().hidden_size;
        let reused = self.head_inputs.len() / hidden;
        for start in (0..reused).step_by(self.chunk_tokens) {
            let end = (start + self.chunk_tokens).min(reused);
            let rows = &self.head_inputs[start * hidden..end * hidden];
            let view =
                ArrayView3::from_shape((1, end - start, hidden), rows).expect("whole positions");
            let logits = model.head(view)?;
            self.push_scores(start, &logits, top);
        }
        Ok(())
    }

    /// Score the prompt tokens after positions `start..` from their logits (`[1, positions,
    /// vocab]`).
    fn push_scores(&mut self, start: usize, logits: &Array3<f32>, top: usize) {
        for (j, row) in logits.index_axis(Axis(0), 0).outer_iter().enumerate() {
            let Some(&next) = self.prompt.get(start + j + 1) else {
                break;
            };
            let row = row.as_standard_layout();
            let (logprob, top) =
                sampling::logprobs(row.as_slice().expect("a standard-layout row"), next, top);
            self.scored.push(TokenLogprobs { logprob, top });
        }
    }

    /// Every chunk ran up to the gate layer: the gate reads the last token's residual (the next
    /// view's phase begins when there is one); the prompt then goes on through the remaining
    /// layers from the kept passes when their KV below the gate layer is what the row needs, or
    /// runs again from the embeddings.
    fn decide(
        &mut self,
        model: &LayerSplitModel,
        hook: Option<&(dyn LayerHook + '_)>,
        prefixes: Option<&mut PrefixCache>,
    ) -> PrefillStep {
        let gate_layer = self.gate.as_ref().expect("called while gating").after_layer;
        if let Some(p) = prefixes {
            let tokens = self.view.as_deref().unwrap_or(&self.prompt);
            p.insert(tokens, &self.cache, gate_layer + 1, UNSTEERED);
        }
        let mut activation = self
            .kept
            .back()
            .map(|p| p.last_residuals().swap_remove(0))
            .expect("a non-empty prompt has a chunk");
        if let Some(from) = self.mean_from {
            activation.extend(self.mean_residual(from));
        }
        self.read.extend(activation);
        if let Some((next, mean_from)) = self.more_views.pop_front() {
            (self.view, self.mean_from) = (Some(next), mean_from);
            self.chunks = None;
            return PrefillStep::Running;
        }
        let gate = self.gate.take().expect("called while gating");
        self.row = match (gate.decide)(&std::mem::take(&mut self.read)) {
            AfterGate::Generate(row) => row,
            AfterGate::End => return PrefillStep::Ended,
        };
        let first = hook.and_then(|h| h.first_modified_layer(&self.row));
        let (reused, depth) = self.reused;
        // after a view, the prompt itself runs from the embeddings
        let read_view = self.view.take().is_some();
        // a scored prompt resumes only a gate phase that reused nothing: its KV has no head
        // inputs, so the full phase begins anew and reuses only blocks that kept them
        let scored_whole = self.score.is_none() || reused == 0;
        let resume = !read_view
            && scored_whole
            && match first {
                // steered after the gate layer: the gate phase's KV is the row's, unless part
                // of it came from the (unsteered) prefix cache
                Some(f) => f > gate.after_layer && reused == 0,
                // unsteered: a reused prefix must hold every layer
                None => reused == 0 || depth == model.manifest().num_layers,
            };
        if resume {
            self.cache.truncate(reused);
            self.next = 0;
        } else {
            self.chunks = None;
        }
        PrefillStep::Running
    }

    /// The mean of the kept residuals over the phase's tokens from `from` on (clamped to the
    /// last token); the kept passes start after the reused prefix, which ends before `from`.
    fn mean_residual(&self, from: usize) -> Vec<f32> {
        let total = self.reused.0 + self.kept.iter().map(Pass::new_tokens).sum::<usize>();
        let from = from.min(total - 1);
        let mut sum = ndarray::Array1::<f32>::zeros(self.kept[0].residual().len_of(Axis(2)));
        let mut start = self.reused.0;
        for pass in &self.kept {
            let n = pass.new_tokens();
            let skip = from.saturating_sub(start).min(n);
            sum += &pass
                .residual()
                .slice(ndarray::s![0, skip..n, ..])
                .sum_axis(Axis(0));
            start += n;
        }
        (sum / (total - from) as f32).to_vec()
    }
}

impl LayerSplitModel {
    /// Prefill `prompt` in chunks of at most `chunk_tokens`, with the hook applied for `row`
    /// (or for the row the gate decides), reusing and filling `prefixes` if given. Returns
    /// `None` when the gate ends the request.
    pub fn prefill_prompt(
        &mut self,
        prompt: &[u32],
        chunk_tokens: usize,
        mut hook: Option<&mut (dyn LayerHook + '_)>,
        row: RowContext,
        gate: Option<EarlyExit>,
        mut prefixes: Option<&mut PrefixCache>,
    ) -> Result<Option<Prefilled>> {
        let mut prefill = ChunkedPrefill::new(self, prompt, chunk_tokens, row, gate)?;
        loop {
            match prefill.step(self, hook.as_deref_mut(), prefixes.as_deref_mut())? {
                PrefillStep::Running => {}
                PrefillStep::Ended => return Ok(None),
                PrefillStep::Done(p) => return Ok(Some(*p)),
            }
        }
    }
}
