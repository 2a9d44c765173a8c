//! The engine thread: continuous batching of concurrent sequences.
//!
//! Requests arrive through a bounded queue ([`Engine::submit`] never blocks: a full queue is an
//! overload the caller turns into a 429). The engine thread owns the model and the batch KV
//! cache. Between decode steps it admits waiting requests (each is prefilled on its own, then
//! joins the batch) and drops finished ones, so sequences join and leave at every step. Rows
//! carry their own hook parameters, so a steered row never changes its neighbours.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::thread::JoinHandle;

use ndarray::Array2;
use serde::{Deserialize, Serialize};

use crate::chat::ChatTokenizer;
use crate::generate::{
    FinishReason, GateVerdict, GenerationEvent, GenerationRequest, Sequence, Usage, room_for,
};
use crate::hook::LayerHook;
use crate::kv::KvCache;
use crate::model::LayerSplitModel;
use crate::{Result, RuntimeError};

/// Engine limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Requests that may wait for a place in the batch before `submit` refuses.
    pub queue_capacity: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 8,
            queue_capacity: 64,
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

/// Handle to the engine thread. Dropping it lets queued and running sequences finish, then
/// joins the thread.
pub struct Engine {
    tx: Option<SyncSender<GenerationRequest>>,
    thread: Option<JoinHandle<()>>,
    tokenizer: Arc<ChatTokenizer>,
    context_length: usize,
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
        if config.max_batch == 0 || config.queue_capacity == 0 {
            return Err(RuntimeError::Input(
                "max_batch and queue_capacity must be at least 1".into(),
            ));
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(config.queue_capacity);
        let context_length = model.manifest().context_length;
        let worker = Worker {
            cache: model.new_cache(),
            eos: model.manifest().tokenizer.eos_token_ids.clone(),
            model,
            tokenizer: tokenizer.clone(),
            hook,
            batch: Vec::new(),
            max_batch: config.max_batch,
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

    /// Queue a request without blocking.
    pub fn submit(&self, request: GenerationRequest) -> std::result::Result<(), SubmitError> {
        let tx = self.tx.as_ref().ok_or(SubmitError::Stopped)?;
        tx.try_send(request).map_err(|e| match e {
            TrySendError::Full(r) => SubmitError::Overloaded(Box::new(r)),
            TrySendError::Disconnected(_) => SubmitError::Stopped,
        })
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
    eos: Vec<u32>,
    max_batch: usize,
}

impl Worker {
    fn run(mut self, rx: Receiver<GenerationRequest>) {
        loop {
            // Admit waiting requests between decode steps; block only when idle.
            while self.batch.len() < self.max_batch {
                let request = if self.batch.is_empty() {
                    match rx.recv() {
                        Ok(r) => r,
                        Err(_) => return, // every handle dropped and nothing running
                    }
                } else {
                    match rx.try_recv() {
                        Ok(r) => r,
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                    }
                };
                self.admit(request);
            }
            if !self.batch.is_empty() {
                self.decode_step();
            }
        }
    }

    /// Prefill a new request on its own, sample its first token, and add it to the batch.
    fn admit(&mut self, request: GenerationRequest) {
        let GenerationRequest {
            prompt,
            params,
            row,
            gate,
            mut sink,
        } = request;
        let span = tracing::debug_span!("prefill", prompt_tokens = prompt.len());
        let _enter = span.enter();
        let prefilled = (|| -> Result<_> {
            let room = room_for(
                prompt.len(),
                self.model.manifest().context_length,
                params.max_new_tokens,
            )?;
            params.sampling.validate()?;
            self.model.check_tokens(&prompt)?;
            let ids = Array2::from_shape_fn((1, prompt.len()), |(_, i)| i64::from(prompt[i]));
            let mut cache = self.model.new_cache_rows(1);
            let mut row = row;
            let mut pass = self.model.begin(&ids, &mut cache)?;
            let hook = self.hook.as_deref_mut();
            if let Some(gate) = gate {
                if !self.model.is_boundary(gate.after_layer) {
                    return Err(RuntimeError::Input(format!(
                        "gate layer {} does not end a segment of this export",
                        gate.after_layer
                    )));
                }
                // Gate on the unsteered residual, keeping the pass state before each segment so
                // that a steered row can resume from the first layer the hook changes.
                let mut before_segment = Vec::new();
                for range in self.model.segment_layers() {
                    if *range.start() > gate.after_layer {
                        break;
                    }
                    before_segment.push((*range.start(), pass.clone()));
                    self.model
                        .run_layers(&mut pass, &mut cache, Some(*range.end()), None, &[])?;
                }
                let last = pass.last_residuals().swap_remove(0);
                row = match (gate.decide)(&last) {
                    GateVerdict::Generate(row) => row,
                    GateVerdict::End => return Ok(None),
                };
                let first = hook.as_deref().and_then(|h| h.first_modified_layer(&row));
                if let Some(first) = first.filter(|&f| f <= gate.after_layer) {
                    // Rerun from the segment holding that layer; its KV slots are rewritten.
                    let (_, state) = before_segment
                        .into_iter()
                        .rev()
                        .find(|(start, _)| *start <= first)
                        .expect("the first segment starts at layer 0");
                    pass = state;
                }
            }
            let rows = std::slice::from_ref(&row);
            self.model
                .run_layers(&mut pass, &mut cache, None, hook, rows)?;
            let logits = self.model.finish(pass, &mut cache)?;
            Ok(Some((room, row, cache, logits)))
        })();
        let (room, row, cache, mut logits) = match prefilled {
            Ok(Some(p)) => p,
            Ok(None) => {
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
            Err(e) => {
                let _ = sink(GenerationEvent::Failed {
                    kind: e.kind(),
                    message: e.to_string(),
                });
                return;
            }
        };
        let mut seq = Sequence::new(&prompt, params, row, self.eos.clone(), room, sink);
        let logits_row = logits.row_mut(0);
        let done = seq.advance(
            &self.tokenizer,
            logits_row.into_slice().expect("a logits row is contiguous"),
        );
        if !done {
            self.cache.append_rows(&cache);
            self.batch.push(seq);
        }
    }

    /// One decode step over every sequence in the batch.
    fn decode_step(&mut self) {
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
                let mut done = Vec::new();
                for (i, (seq, mut row)) in self.batch.iter_mut().zip(logits.rows_mut()).enumerate()
                {
                    let slice = row.as_slice_mut().expect("a logits row is contiguous");
                    if seq.advance(&self.tokenizer, slice) {
                        done.push(i);
                    }
                }
                for i in done.into_iter().rev() {
                    self.batch.remove(i);
                    self.cache.remove_row(i);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "decode step failed; failing its sequences");
                for mut seq in self.batch.drain(..) {
                    seq.fail(&e);
                }
                self.cache = self.model.new_cache();
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
