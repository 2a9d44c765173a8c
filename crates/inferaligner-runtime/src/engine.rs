//! The engine thread: continuous batching of concurrent sequences.
//!
//! Requests arrive through a bounded queue ([`Engine::submit`] never blocks: a full queue is an
//! overload the caller turns into a 429). The engine thread owns the model and the batch KV
//! cache. Between decode steps it admits waiting requests and drops finished ones, so sequences
//! join and leave at every step. Prompts are prefilled one chunk per decode step of the batch (a
//! long prompt never stalls the streams in flight), then join the batch. Several requests may be
//! prefilling at once (they count as rows of the batch): their gate phases run together, one padded
//! batch per chunk (concurrent short requests cost little more than one), the rest of their prompts
//! one request at a time, in turn. Admission is by memory as well as by count: the batch with the
//! new row must fit the KV budget (`max_kv_tokens`). Rows carry their own hook parameters, so a
//! steered row never changes its neighbours.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use ndarray::Array2;
use serde::{Deserialize, Serialize};

use crate::chat::ChatTokenizer;
use crate::generate::{
    EventSink, FinishReason, GenerationEvent, GenerationParams, GenerationRequest, Sequence, Usage,
    room_for,
};
use crate::hook::LayerHook;
use crate::kv::{KvCache, slots};
use crate::model::LayerSplitModel;
use crate::prefill::{ChunkedPrefill, PrefillStep, Prefilled};
use crate::prefix::{PrefixCache, PrefixStats};
use crate::structured::{Constraint, Structured};
use crate::{Result, RuntimeError};

/// Engine limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Requests that may wait for a place in the batch before `submit` refuses.
    pub queue_capacity: usize,
    /// Prompt tokens run through the model at once while prefilling: bounds the attention
    /// scratch memory (`heads × chunk × prompt` floats) whatever the prompt's length.
    pub prefill_chunk_tokens: usize,
    /// KV-cache slots the engine may hold, all rows together: the memory budget. The batch
    /// is one rectangular buffer, so a batch costs `rows × its longest row` slots; a request
    /// is admitted only when the batch with it fits, counting every row at its prompt plus
    /// its `max_new_tokens`, and otherwise waits for rows to leave (its place in the queue
    /// counts toward `queue_capacity`). A request that cannot fit even alone is refused.
    pub max_kv_tokens: usize,
    /// Tokens of prompt-prefix KV kept for reuse by later requests (a shared system prompt,
    /// the earlier turns of a chat), least recently used first out, blocks seen by one request
    /// only before reused ones; 0 turns the prefix cache off. Memory of its own, beside
    /// `max_kv_tokens`.
    pub prefix_cache_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 8,
            queue_capacity: 64,
            prefill_chunk_tokens: crate::prefill::DEFAULT_PREFILL_CHUNK,
            max_kv_tokens: 12288,
            prefix_cache_tokens: 2048,
        }
    }
}

/// KV-cache figures of a running engine (for metrics), updated by the engine thread.
#[derive(Debug, Default)]
pub struct KvUsage {
    bytes: AtomicUsize,
    reserved_tokens: AtomicUsize,
    budget_tokens: AtomicUsize,
    bytes_per_token: AtomicUsize,
    prefix_bytes: AtomicUsize,
    prefix_tokens: AtomicUsize,
    prefix_protected_tokens: AtomicUsize,
    prefix_lookups: AtomicU64,
    prefix_hits: AtomicU64,
    prefix_lookup_tokens: AtomicU64,
    prefix_reused_tokens: AtomicU64,
    gate_batches: AtomicU64,
    gate_batched_requests: AtomicU64,
    generated_tokens: AtomicU64,
}

impl KvUsage {
    /// Bytes of KV buffers allocated now (the batch and a prompt being prefilled).
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Slots the rows in flight may grow to (`rows × longest reservation`).
    pub fn reserved_tokens(&self) -> usize {
        self.reserved_tokens.load(Ordering::Relaxed)
    }

    /// The budget, in slots (`max_kv_tokens`).
    pub fn budget_tokens(&self) -> usize {
        self.budget_tokens.load(Ordering::Relaxed)
    }

    /// The budget in bytes.
    pub fn budget_bytes(&self) -> usize {
        self.budget_tokens() * self.bytes_per_token.load(Ordering::Relaxed)
    }

    /// Bytes and tokens the prefix cache holds now, and how many of those tokens are protected.
    pub fn prefix_cached(&self) -> (usize, usize, usize) {
        (
            self.prefix_bytes.load(Ordering::Relaxed),
            self.prefix_tokens.load(Ordering::Relaxed),
            self.prefix_protected_tokens.load(Ordering::Relaxed),
        )
    }

    /// Gate-phase chunks run for several requests together, and the requests in them, since
    /// the engine started (their ratio is the mean batch).
    pub fn gate_batches(&self) -> (u64, u64) {
        (
            self.gate_batches.load(Ordering::Relaxed),
            self.gate_batched_requests.load(Ordering::Relaxed),
        )
    }

    /// Tokens sampled since the engine started (every row's, whoever reads them).
    pub fn generated_tokens(&self) -> u64 {
        self.generated_tokens.load(Ordering::Relaxed)
    }

    /// The prefix cache's counters since the engine started.
    pub fn prefix_stats(&self) -> PrefixStats {
        PrefixStats {
            lookups: self.prefix_lookups.load(Ordering::Relaxed),
            hits: self.prefix_hits.load(Ordering::Relaxed),
            lookup_tokens: self.prefix_lookup_tokens.load(Ordering::Relaxed),
            reused_tokens: self.prefix_reused_tokens.load(Ordering::Relaxed),
        }
    }
}

/// Why a request was not accepted.
#[derive(Debug)]
pub enum SubmitError {
    /// The queue is full; the request is handed back.
    Overloaded(Box<GenerationRequest>),
    /// The engine has stopped.
    Stopped,
}

/// Queues follow-up requests: work that a running request continues with (a steered answer
/// tried again at another strength). They go ahead of the engine's queue and outside its
/// bound — a request already admitted must not be refused for the load that came after it —
/// and are admitted like any other (KV budget first come, first served). Submit from a sink
/// (the engine thread): the engine looks for follow-ups before it waits for new requests.
#[derive(Clone, Default)]
pub struct Submitter(Arc<Mutex<VecDeque<GenerationRequest>>>);

impl std::fmt::Debug for Submitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Submitter").finish()
    }
}

impl Submitter {
    /// Queue `request` as a follow-up.
    pub fn submit(&self, request: GenerationRequest) {
        self.queue().push_back(request);
    }

    fn next(&self) -> Option<GenerationRequest> {
        self.queue().pop_front()
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<GenerationRequest>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Handle to the engine thread. Dropping it lets queued and running sequences finish, then
/// joins the thread.
pub struct Engine {
    tx: Option<SyncSender<GenerationRequest>>,
    thread: Option<JoinHandle<()>>,
    tokenizer: Arc<ChatTokenizer>,
    context_length: usize,
    kv: Arc<KvUsage>,
    follow_ups: Submitter,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl Engine {
    /// Start the engine thread over `model`.
    pub fn start(
        model: LayerSplitModel,
        tokenizer: Arc<ChatTokenizer>,
        hook: Option<Box<dyn LayerHook>>,
        config: EngineConfig,
    ) -> Result<Self> {
        if config.max_batch == 0 || config.queue_capacity == 0 || config.prefill_chunk_tokens == 0 {
            return Err(RuntimeError::Input(
                "max_batch, queue_capacity and prefill_chunk_tokens must be at least 1".into(),
            ));
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(config.queue_capacity);
        let context_length = model.manifest().context_length;
        let kv = Arc::new(KvUsage::default());
        let follow_ups = Submitter::default();
        kv.budget_tokens
            .store(config.max_kv_tokens, Ordering::Relaxed);
        kv.bytes_per_token
            .store(model.manifest().kv_bytes_per_token(), Ordering::Relaxed);
        // the vocabulary's trie for structured outputs, built here rather than at the first
        // request that asks for JSON, in the middle of others' decoding (~0.4 s for 49k tokens)
        let eos = model.manifest().tokenizer.eos_token_ids.first().copied();
        let structured = eos
            .ok_or_else(|| "structured outputs need an EOS token in the export".to_owned())
            .and_then(|eos| {
                Structured::new(&tokenizer, model.manifest().vocab_size, eos)
                    .map_err(|e| e.to_string())
            });
        let worker = Worker {
            cache: model.new_cache(),
            leaving: Vec::new(),
            eos: model.manifest().tokenizer.eos_token_ids.clone(),
            model,
            tokenizer: tokenizer.clone(),
            hook,
            batch: Vec::new(),
            admitting: VecDeque::new(),
            waiting: None,
            prefixes: PrefixCache::new(config.prefix_cache_tokens),
            config,
            kv: kv.clone(),
            follow_ups: follow_ups.clone(),
            structured,
            steered_from: None,
        };
        let thread = std::thread::Builder::new()
            .name("inferaligner-engine".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| RuntimeError::Input(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            tokenizer,
            context_length,
            kv,
            follow_ups,
        })
    }

    /// The model's tokenizer and chat template.
    pub fn tokenizer(&self) -> &Arc<ChatTokenizer> {
        &self.tokenizer
    }

    /// The model's context length.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// KV-cache memory in use and the budget (live figures).
    pub fn kv_usage(&self) -> Arc<KvUsage> {
        self.kv.clone()
    }

    /// Queue a request without blocking.
    pub fn submit(&self, request: GenerationRequest) -> std::result::Result<(), SubmitError> {
        let tx = self.tx.as_ref().ok_or(SubmitError::Stopped)?;
        tx.try_send(request).map_err(|e| match e {
            TrySendError::Full(r) => SubmitError::Overloaded(Box::new(r)),
            TrySendError::Disconnected(_) => SubmitError::Stopped,
        })
    }

    /// This engine's queue of follow-up requests.
    pub fn follow_ups(&self) -> Submitter {
        self.follow_ups.clone()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Worker {
    model: LayerSplitModel,
    tokenizer: Arc<ChatTokenizer>,
    hook: Option<Box<dyn LayerHook>>,
    cache: KvCache,
    batch: Vec<Sequence>,
    /// Rows of `cache` whose sequences ended in the last decode step while others go on: they
    /// leave with the next row that joins (a request admitted in between), or before the next
    /// step — one reallocation of the batch's KV instead of two.
    leaving: Vec<usize>,
    eos: Vec<u32>,
    /// Requests being prefilled, a chunk per loop turn between decode steps: the gate-phase
    /// chunks of all of them together, otherwise one request's in turn.
    admitting: VecDeque<Admitting>,
    /// The oldest request, waiting for the batch to have room for its KV slots (first come,
    /// first served: nothing overtakes it, so a long prompt is never starved by short ones).
    waiting: Option<(GenerationRequest, usize)>,
    /// KV of recent prompts' prefixes (unsteered, and steered per steering), reused by later
    /// prefills (`None`: off).
    prefixes: Option<PrefixCache>,
    config: EngineConfig,
    kv: Arc<KvUsage>,
    /// Requests that running ones continue with, admitted before the queue's.
    follow_ups: Submitter,
    /// Grammars for structured outputs, or why this export's tokenizer cannot have them.
    structured: std::result::Result<Structured, String>,
    /// The first steered layer of the last steered prompt: where unsteered prefills leave a
    /// resume point for later steered ones ([`ChunkedPrefill::leaving_resume_points`]).
    steered_from: Option<usize>,
}

/// A request whose prompt is being prefilled.
struct Admitting {
    prefill: ChunkedPrefill,
    prompt: Vec<u32>,
    params: GenerationParams,
    /// The grammar of `params.response_format`.
    constraint: Option<Constraint>,
    /// KV slots it may grow to: its prompt and every token it may generate.
    reserve: usize,
    sink: EventSink,
}

impl Worker {
    fn run(mut self, rx: Receiver<GenerationRequest>) {
        loop {
            // Prefills start while the batch has room (in rows, the prefills' included, and KV
            // budget); wait for work only when there is nothing at all to do.
            while self.batch.len() + self.admitting.len() < self.config.max_batch {
                let idle = self.batch.is_empty() && self.admitting.is_empty();
                let next = match self.waiting.take() {
                    Some(w) => Some(w),
                    None => match self.follow_ups.next().map_or_else(|| rx.try_recv(), Ok) {
                        Ok(r) => self.reservation(r),
                        Err(TryRecvError::Empty) if idle => {
                            // Idle: give freed KV buffers back before waiting.
                            crate::library::release_free_memory();
                            match rx.recv() {
                                Ok(r) => self.reservation(r),
                                Err(_) => return, // every handle dropped, nothing running
                            }
                        }
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) if idle => return,
                        Err(TryRecvError::Disconnected) => break,
                    },
                };
                match next {
                    Some((request, reserve)) if self.fits(reserve) => self.start(request, reserve),
                    Some(w) => {
                        self.waiting = Some(w);
                        break;
                    }
                    // failed before admission: look at the next one
                    None => {}
                }
            }
            self.prefill_chunk();
            if !self.batch.is_empty() {
                self.decode_step();
            }
            self.publish();
        }
    }

    /// The KV slots `request` may grow to (prompt + its token limit, within the context), or
    /// `None` after failing it when it can never be admitted.
    fn reservation(&self, request: GenerationRequest) -> Option<(GenerationRequest, usize)> {
        let context = self.model.manifest().context_length;
        let reserve = room_for(request.prompt.len(), context, request.params.max_new_tokens)
            .and_then(|room| {
                let reserve = request.prompt.len() + room;
                if slots(reserve) > self.config.max_kv_tokens {
                    return Err(RuntimeError::Input(format!(
                        "a prompt of {} tokens with up to {room} new tokens needs more KV cache \
                     than the engine's budget of {} tokens (model.engine.max_kv_tokens)",
                        request.prompt.len(),
                        self.config.max_kv_tokens
                    )));
                }
                Ok(reserve)
            });
        match reserve {
            Ok(reserve) => Some((request, reserve)),
            Err(e) => {
                let mut sink = request.sink;
                let _ = sink(GenerationEvent::failed(&e));
                None
            }
        }
    }

    /// Whether a row reserving `reserve` slots can join the batch within the budget: the
    /// batch buffer is rectangular, so it may grow to `rows × longest reservation`.
    fn fits(&self, reserve: usize) -> bool {
        let (rows, longest) = self.reserved();
        (rows + 1) * slots(longest.max(reserve)) <= self.config.max_kv_tokens
    }

    /// Rows in flight (the one being prefilled included) and their longest reservation.
    fn reserved(&self) -> (usize, usize) {
        let rows = self.batch.iter().map(Sequence::reserved);
        let admitting = self.admitting.iter().map(|a| a.reserve);
        let longest = rows.chain(admitting).max().unwrap_or(0);
        (self.batch.len() + self.admitting.len(), longest)
    }

    /// Update the figures metrics read.
    fn publish(&self) {
        let (rows, longest) = self.reserved();
        self.kv
            .reserved_tokens
            .store(rows * slots(longest), Ordering::Relaxed);
        let prefilling: usize = self.admitting.iter().map(|a| a.prefill.cache_bytes()).sum();
        self.kv
            .bytes
            .store(self.cache.bytes() + prefilling, Ordering::Relaxed);
        if let Some(p) = &self.prefixes {
            let stats = p.stats();
            let kv = &self.kv;
            kv.prefix_bytes.store(p.bytes(), Ordering::Relaxed);
            kv.prefix_tokens.store(p.tokens(), Ordering::Relaxed);
            kv.prefix_protected_tokens
                .store(p.protected_tokens(), Ordering::Relaxed);
            kv.prefix_lookups.store(stats.lookups, Ordering::Relaxed);
            kv.prefix_hits.store(stats.hits, Ordering::Relaxed);
            kv.prefix_lookup_tokens
                .store(stats.lookup_tokens, Ordering::Relaxed);
            kv.prefix_reused_tokens
                .store(stats.reused_tokens, Ordering::Relaxed);
        }
    }

    /// Begin prefilling `request` (or fail it when its prompt or parameters are invalid).
    fn start(&mut self, request: GenerationRequest, reserve: usize) {
        let GenerationRequest {
            prompt,
            params,
            row,
            gate,
            mut sink,
        } = request;
        let started = params
            .sampling
            .validate()
            .map_err(RuntimeError::Input)
            .and_then(|()| self.constraint(&params))
            .and_then(|constraint| {
                let chunk = self.config.prefill_chunk_tokens;
                let prefill = ChunkedPrefill::new(&self.model, &prompt, chunk, row, gate)?
                    .scoring_prompt(params.prompt_logprobs)
                    .leaving_resume_points(self.steered_from);
                Ok((prefill, constraint))
            });
        match started {
            Ok((prefill, constraint)) => {
                self.admitting.push_back(Admitting {
                    prefill,
                    prompt,
                    params,
                    constraint,
                    reserve,
                    sink,
                });
            }
            Err(e) => {
                let _ = sink(GenerationEvent::failed(&e));
            }
        }
    }

    /// The grammar `params` asks the answer to follow, if any.
    fn constraint(&mut self, params: &GenerationParams) -> Result<Option<Constraint>> {
        if !params.response_format.is_constrained() {
            return Ok(None);
        }
        match &mut self.structured {
            Ok(s) => s.constraint(&params.response_format),
            Err(why) => Err(RuntimeError::Input(why.clone())),
        }
    }

    /// Run a chunk: the next gate-phase chunks of the first prefill and of the prefills after
    /// it gated at the same layer, together, as long as the padded batch holds no more tokens
    /// than one chunk (`prefill_chunk_tokens`, so scratch memory keeps its bound: short
    /// requests batch, long ones run alone); otherwise the first prefill's next chunk (which
    /// then goes to the back, so that long prompts take turns).
    fn prefill_chunk(&mut self) {
        let Some(first) = self.admitting.front() else {
            return;
        };
        let mut gated = Vec::new();
        let gate_layer = first.prefill.gate_layer();
        if let Some(layer) = gate_layer {
            let limit = self.config.prefill_chunk_tokens;
            let mut width = 0;
            for (i, a) in self.admitting.iter_mut().enumerate() {
                if a.prefill.gate_layer() != Some(layer) {
                    continue;
                }
                let next = a
                    .prefill
                    .next_gate_chunk(&self.model, self.prefixes.as_mut());
                // a fused export batches only rows that start from an empty cache
                if !self.model.takes_ragged_batch(a.prefill.cached_tokens() > 0) {
                    if i == 0 {
                        break;
                    }
                    continue;
                }
                let wider = width.max(next.unwrap_or(usize::MAX));
                if wider.saturating_mul(gated.len() + 1) > limit {
                    break;
                }
                width = wider;
                gated.push(i);
            }
        }
        if gated.len() >= 2 {
            let tokens: usize = gated.iter().map(|&i| self.admitting[i].prompt.len()).sum();
            let span =
                tracing::debug_span!("gate_batch", rows = gated.len(), prompt_tokens = tokens);
            let _enter = span.enter();
            self.kv.gate_batches.fetch_add(1, Ordering::Relaxed);
            self.kv
                .gate_batched_requests
                .fetch_add(gated.len() as u64, Ordering::Relaxed);
            let mut prefills: Vec<&mut ChunkedPrefill> = self
                .admitting
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| gated.contains(i))
                .map(|(_, a)| &mut a.prefill)
                .collect();
            let steps = ChunkedPrefill::step_gates(
                &mut prefills,
                &mut self.model,
                self.hook.as_deref(),
                self.prefixes.as_mut(),
            );
            let steps: Vec<_> = match steps {
                Ok(steps) => steps.into_iter().map(Ok).collect(),
                // the batch failed: so does each of its requests
                Err(e) => gated
                    .iter()
                    .map(|_| Err(GenerationEvent::failed(&e)))
                    .collect(),
            };
            for (&i, step) in gated.iter().zip(steps).rev() {
                if !matches!(step, Ok(PrefillStep::Running)) {
                    let admitting = self.admitting.remove(i).expect("index from this queue");
                    self.prefilled(admitting, step);
                }
            }
            return;
        }
        let mut admitting = self.admitting.pop_front().expect("checked above");
        let span = tracing::debug_span!("prefill", prompt_tokens = admitting.prompt.len());
        let _enter = span.enter();
        let step = admitting.prefill.step(
            &mut self.model,
            self.hook.as_deref_mut(),
            self.prefixes.as_mut(),
        );
        if matches!(step, Ok(PrefillStep::Running)) {
            self.admitting.push_back(admitting);
        } else {
            self.prefilled(admitting, step.map_err(|e| GenerationEvent::failed(&e)));
        }
    }

    /// A prefill ended: sample the prompt's first token and add the row to the batch, or end
    /// the request (gated, or failed).
    fn prefilled(
        &mut self,
        admitting: Admitting,
        step: std::result::Result<PrefillStep, GenerationEvent>,
    ) {
        let Admitting {
            prompt,
            params,
            constraint,
            reserve,
            mut sink,
            ..
        } = admitting;
        let room = reserve - prompt.len();
        let Prefilled {
            row,
            cache,
            mut logits,
            prompt_logprobs,
        } = match step {
            Ok(PrefillStep::Running) => unreachable!("only ended prefills come here"),
            Ok(PrefillStep::Done(p)) => *p,
            Ok(PrefillStep::Ended) => {
                let _ = sink(GenerationEvent::Finished {
                    reason: FinishReason::Gated,
                    usage: Usage {
                        prompt_tokens: prompt.len(),
                        completion_tokens: 0,
                    },
                    tail: String::new(),
                });
                return;
            }
            Err(failed) => {
                let _ = sink(failed);
                return;
            }
        };
        if let Some(f) = self
            .hook
            .as_ref()
            .and_then(|h| h.first_modified_layer(&row))
        {
            self.steered_from = Some(f);
        }
        if params.prompt_logprobs.is_some()
            && sink(GenerationEvent::PromptLogprobs(prompt_logprobs)).is_break()
        {
            return;
        }
        if room == 0 {
            // the prompt alone was asked for (scored)
            let _ = sink(GenerationEvent::Finished {
                reason: FinishReason::Length,
                usage: Usage {
                    prompt_tokens: prompt.len(),
                    completion_tokens: 0,
                },
                tail: String::new(),
            });
            return;
        }
        let mut seq = Sequence::new(
            &prompt,
            (params, constraint),
            row,
            self.eos.clone(),
            room,
            sink,
        );
        let logits_row = logits.row_mut(0);
        let done = seq.advance(
            &self.tokenizer,
            logits_row.into_slice().expect("a logits row is contiguous"),
        );
        self.kv.generated_tokens.fetch_add(1, Ordering::Relaxed);
        if !done {
            let leaving = std::mem::take(&mut self.leaving);
            self.cache.replace_rows(&leaving, &cache);
            self.batch.push(seq);
        }
    }

    /// One decode step over every sequence in the batch.
    fn decode_step(&mut self) {
        self.cache.remove_rows(&std::mem::take(&mut self.leaving));
        let ids = Array2::from_shape_fn((self.batch.len(), 1), |(i, _)| {
            i64::from(self.batch[i].last_token)
        });
        let rows: Vec<_> = self.batch.iter().map(|s| s.row.clone()).collect();
        let span = tracing::trace_span!("decode", rows = rows.len());
        let _enter = span.enter();
        match self
            .model
            .step(&ids, &mut self.cache, self.hook.as_deref_mut(), &rows)
        {
            Ok(mut logits) => {
                let rows = self.batch.len() as u64;
                self.kv.generated_tokens.fetch_add(rows, Ordering::Relaxed);
                let mut done = Vec::new();
                for (i, (seq, mut row)) in self.batch.iter_mut().zip(logits.rows_mut()).enumerate()
                {
                    let slice = row.as_slice_mut().expect("a logits row is contiguous");
                    if seq.advance(&self.tokenizer, slice) {
                        done.push(i);
                    }
                }
                self.model.recycle(logits);
                for &i in done.iter().rev() {
                    self.batch.remove(i);
                }
                if self.batch.is_empty() {
                    // nothing to wait for: leaving an empty batch copies nothing
                    self.cache.remove_rows(&done);
                } else {
                    self.leaving = done;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "decode step failed; failing its sequences");
                for mut seq in self.batch.drain(..) {
                    seq.fail(&e);
                }
                self.cache = self.model.new_cache();
                self.leaving.clear();
            }
        }
    }
}

/// Submit one request, wait for it to end and return its events (its own sink is replaced).
/// Handy for tests and one-shot commands.
pub fn collect_events(
    engine: &Engine,
    mut request: GenerationRequest,
) -> std::result::Result<Vec<GenerationEvent>, SubmitError> {
    let (tx, rx) = std::sync::mpsc::channel();
    request.sink = Box::new(move |event| match tx.send(event) {
        Ok(()) => ControlFlow::Continue(()),
        Err(_) => ControlFlow::Break(()),
    });
    engine.submit(request)?;
    let mut events = Vec::new();
    for event in rx {
        let last = matches!(
            event,
            GenerationEvent::Finished { .. } | GenerationEvent::Failed { .. }
        );
        events.push(event);
        if last {
            break;
        }
    }
    Ok(events)
}
