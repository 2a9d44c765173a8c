//! The one glue between a steering pack, a policy and the runtime's early-exit gate. `serve`,
//! `eval` and `generate` all submit the engine request this builds, so the figures `eval`
//! prints come from the path that answers users: the same decision, the same vectors (carried
//! by the row, `AddOwnVectors`), the same alpha and layer fallbacks, and a blocked request
//! that ends after the gate.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, bail};
use inferaligner_core::{
    Action, Policy, SteeredAnswers, SteeredEnding, SteeringPack, within_limits,
};
use inferaligner_proxy::GateReport;
use inferaligner_runtime::{
    AddOwnVectors, AddVectors, AfterGate, ChatTokenizer, EarlyExit, EventSink, FinishReason,
    GenerationEvent, GenerationParams, GenerationRequest, LayerHook, Manifest, RowContext,
    Submitter,
};

use crate::memo::ViewMemo;
use crate::refusal::AnswerGuard;

/// How a steered answer held by the policy's `steered_answers` ended (see [`crate::refusal`]);
/// `None` until it is decided, and for answers that are not held.
#[derive(Debug, Clone, Default)]
pub struct Held(Arc<Mutex<HeldState>>);

#[derive(Debug, Default)]
struct HeldState {
    guard: Option<AnswerGuard>,
    /// Times the answer was steered again (the policy's `retry_scales`).
    retries: usize,
}

impl Held {
    /// How the held answer ended, if it was held and has been decided.
    pub fn ending(&self) -> Option<SteeredEnding> {
        self.state().guard.as_ref().and_then(AnswerGuard::ending)
    }

    /// The generated answer the policy's fallback replaced, if it did (the last try's).
    pub fn replaced(&self) -> Option<String> {
        self.state()
            .guard
            .as_ref()
            .and_then(|g| g.replaced().map(str::to_owned))
    }

    /// Times the answer was steered again at another strength before it ended.
    pub fn retries(&self) -> usize {
        self.state().retries
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HeldState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What steering a held answer again needs (the policy's `retry_scales`): the engine's
/// follow-up queue, and the request as it is submitted.
#[derive(Debug, Clone)]
pub struct Retry {
    /// [`inferaligner_runtime::Engine::follow_ups`].
    pub submitter: Submitter,
    /// Its prompt.
    pub prompt: Vec<u32>,
    /// Its parameters.
    pub params: GenerationParams,
    /// Tokens at most of text the guard writes itself (`Job::max_written_tokens`).
    pub max_written_tokens: usize,
}

/// The rows a held answer may still be steered again with, in turn.
struct Again {
    retry: Retry,
    rows: VecDeque<RowContext>,
}

/// A pack checked against the loaded model, and the policy that uses it.
#[derive(Debug, Clone)]
pub struct Steering {
    /// The pack.
    pub pack: Arc<SteeringPack>,
    /// The policy.
    pub policy: Arc<Policy>,
}

impl Steering {
    /// Load a pack and refuse it unless it was made for `manifest`'s model and has the
    /// policy's layers.
    pub fn load(path: &Path, manifest: &Manifest, policy: Policy) -> anyhow::Result<Self> {
        let pack = SteeringPack::load(path)
            .with_context(|| format!("loading the steering pack {}", path.display()))?;
        pack.check_target(&manifest.fingerprint()?)
            .with_context(|| format!("steering pack {}", path.display()))?;
        let steering = Self {
            pack: Arc::new(pack),
            policy: Arc::new(policy),
        };
        steering.check_layers(manifest)?;
        Ok(steering)
    }

    /// Every steered layer must have a vector in the pack, the export must expose the residual
    /// stream after the gate layer, and after each steered layer or take an addend there (a
    /// hook sees only the last layer of a multi-layer segment: a vector for an inner layer
    /// would otherwise be skipped without a word).
    pub fn check_layers(&self, manifest: &Manifest) -> anyhow::Result<()> {
        let num_layers = manifest.num_layers;
        if let Some(bad) = self.layers().iter().find(|&&l| self.pack.ssv(l).is_none()) {
            bail!("steered layer {bad} does not exist in this {num_layers}-layer model");
        }
        let gate = self.pack.metadata.gate_layer;
        let layers = self.layers();
        if let Some([first, last]) = manifest.inside_segment(gate) {
            bail!(
                "gate layer {gate} is inside the export's segment of layers {first}-{last}, \
                 whose graph exposes only layer {last}'s output: export with a segment boundary \
                 after layer {gate} (--segment-ends), or choose another gate layer"
            );
        }
        for &layer in layers.iter().filter(|&&l| !manifest.takes_addend(l)) {
            if let Some([first, last]) = manifest.inside_segment(layer) {
                bail!(
                    "steered layer {layer} is inside the export's segment of layers \
                     {first}-{last}, whose graph exposes only layer {last}'s output and takes \
                     no addend after layer {layer}: export with --addend-layers (or a segment \
                     boundary) after layer {layer}, or choose other layers"
                );
            }
        }
        Ok(())
    }

    /// Steering strength: the policy's, else the pack's default.
    pub fn alpha(&self) -> f32 {
        self.policy
            .alpha
            .unwrap_or(self.pack.metadata.default_alpha)
    }

    /// Steered layers: the policy's, else the pack's default.
    pub fn layers(&self) -> Vec<usize> {
        self.policy
            .layers
            .clone()
            .unwrap_or_else(|| self.pack.metadata.steered_layers.clone())
    }

    /// One gated request's early exit and event sink. The gate reads `views` (the `prompt`
    /// when there are none; see [`crate::view`]), each alone, and scores the highest; `report`
    /// gets the decision first. A steered row carries its own vectors, and its answer reaches
    /// `sink` as the policy's `steered_answers` finishes it (the text the gate reads is the
    /// request a held answer may name; `held` tells the caller how it ended). A blocked
    /// request ends after the gate (its answer is the policy's refusal), and so does one that
    /// passes when `end_unless_steered` (proxy mode: the upstream answers it). With `retry`, a
    /// held answer whose opening the guard does not keep is steered again at the policy's
    /// `retry_scales` in turn, unseen, before it falls back. Views after the first that `memo`
    /// remembers are not run again; those it does not are remembered once read.
    pub fn gate(
        &self,
        (views, memo): (Vec<Vec<u32>>, Option<Arc<ViewMemo>>),
        end_unless_steered: bool,
        (tokenizer, prompt): (&Arc<ChatTokenizer>, &[u32]),
        report: impl FnOnce(GateReport) + Send + 'static,
        (sink, held): (EventSink, &Held),
        retry: Option<Retry>,
    ) -> (EarlyExit, EventSink) {
        let readout = self.pack.metadata.gate_readout;
        let reads = crate::view::gate_reads(&views, prompt);
        let means: Vec<Option<usize>> = (reads.iter())
            .map(|read| crate::view::mean_from(readout, tokenizer, read))
            .collect();
        let (on_steer, sink) = self.held_answer(&reads, tokenizer, (sink, held), retry);
        let exit = self.early_exit((views, means), memo, end_unless_steered, report, on_steer);
        (exit, sink)
    }

    /// A request steered without a gate, because its gate already decided to steer it (another
    /// choice of the same request, `n`): its steered row, and `sink` behind the policy's
    /// `steered_answers` as [`Self::gate`] would have put it. `views` as there.
    pub fn steer(
        &self,
        views: &[Vec<u32>],
        (tokenizer, prompt): (&Arc<ChatTokenizer>, &[u32]),
        (sink, held): (EventSink, &Held),
        retry: Option<Retry>,
    ) -> (RowContext, EventSink) {
        let reads = crate::view::gate_reads(views, prompt);
        let (on_steer, sink) = self.held_answer(&reads, tokenizer, (sink, held), retry);
        on_steer();
        (self.steered_row(self.alpha()), sink)
    }

    /// How a steered answer reaches `sink` under the policy's `steered_answers`: the guard that
    /// holds it (armed by the returned closure once the request is steered, with the text the
    /// gate read, which a held answer may name) and the sink behind it. `held` tells the caller
    /// how it ended. Nothing is held under `as-generated`.
    fn held_answer(
        &self,
        reads: &[&[u32]],
        tokenizer: &Arc<ChatTokenizer>,
        (sink, held): (EventSink, &Held),
        retry: Option<Retry>,
    ) -> (Box<dyn FnOnce() + Send>, EventSink) {
        if self.policy.steered_answers == SteeredAnswers::AsGenerated {
            return (Box::new(|| {}), sink);
        }
        let request = (reads.iter())
            .map(|read| tokenizer.decode(read).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        let guard = held.clone();
        let policy = self.policy.clone();
        let on_steer = move || {
            guard.state().guard =
                AnswerGuard::new(policy.steered_answers, &request, &policy.refusal);
        };
        let limits = retry.as_ref().map(|r| Limits {
            stop: r.params.stop.clone(),
            max_tokens: r.max_written_tokens,
            tokenizer: tokenizer.clone(),
        });
        let again = retry.map(|retry| Again {
            retry,
            rows: (self.policy.retry_scales.iter())
                .map(|scale| self.steered_row(self.alpha() * scale))
                .collect(),
        });
        let sink = Arc::new(Mutex::new(sink));
        (
            Box::new(on_steer),
            finish_held(held.clone(), sink, again, limits),
        )
    }

    /// A row steered with the pack's vectors at `alpha` on the policy's layers.
    fn steered_row(&self, alpha: f32) -> RowContext {
        steered_row(
            &self.pack,
            &self.layers(),
            alpha,
            self.policy.generated_scale,
        )
    }

    /// The gate reads `views` (or the prompt when there are none), each with its mean from
    /// `means` (see [`crate::view::mean_from`]), and decides on the highest score.
    fn early_exit(
        &self,
        (views, means): (Vec<Vec<u32>>, Vec<Option<usize>>),
        memo: Option<Arc<ViewMemo>>,
        end_unless_steered: bool,
        report: impl FnOnce(GateReport) + Send + 'static,
        on_steer: impl FnOnce() + Send + 'static,
    ) -> EarlyExit {
        let pack = self.pack.clone();
        let policy = self.policy.clone();
        let (alpha, layers) = (self.alpha(), self.layers());
        let generated_scale = self.policy.generated_scale;
        let layer = pack.metadata.gate_layer;
        let mut views = views.into_iter().zip(means.iter().copied());
        let (view, mean_from) = views.next().map_or((None, means[0]), |(v, m)| (Some(v), m));
        // the first view always runs (it is the request); the others may be remembered
        let (mut more_views, mut known) = (Vec::new(), Vec::new());
        for (v, m) in views {
            match memo.as_ref().and_then(|memo| memo.get(layer, &v, m)) {
                Some(activation) => known.push(activation),
                None => more_views.push((v, m)),
            }
        }
        let reads = 1 + more_views.len();
        let fresh = more_views.clone();
        EarlyExit {
            after_layer: layer,
            view,
            mean_from,
            more_views,
            decide: Box::new(move |residual: &[f32]| {
                let gate = pack.gate();
                let read: Vec<&[f32]> = residual.chunks(residual.len() / reads).collect();
                if let Some(memo) = &memo {
                    for ((v, m), activation) in fresh.iter().zip(&read[1..]) {
                        memo.put(layer, v, *m, activation);
                    }
                }
                // one activation per view: the request is as harmful as its most harmful reading
                let activation = (read.into_iter().chain(known.iter().map(Vec::as_slice)))
                    .map(ndarray::ArrayView1::from)
                    .max_by(|a, b| gate.score(*a).total_cmp(&gate.score(*b)))
                    .expect("one activation per view");
                let decision = policy.decide(&gate, activation);
                report(GateReport {
                    decision,
                    layer,
                    alpha,
                    layers: layers.clone(),
                });
                match decision.action {
                    Action::Steer => {
                        on_steer();
                        AfterGate::Generate(steered_row(&pack, &layers, alpha, generated_scale))
                    }
                    Action::Pass if !end_unless_steered => {
                        AfterGate::Generate(RowContext::default())
                    }
                    Action::Pass | Action::Block => AfterGate::End,
                }
            }),
        }
    }
}

/// A row steered with `pack`'s vectors at `alpha` on `layers`.
fn steered_row(
    pack: &SteeringPack,
    layers: &[usize],
    alpha: f32,
    generated_scale: f32,
) -> RowContext {
    let vectors = layers
        .iter()
        .filter_map(|&l| pack.ssv(l).map(|v| (l, v.to_vec())))
        .collect();
    RowContext {
        params: Some(Arc::new(AddOwnVectors {
            scale: alpha,
            vectors: Arc::new(vectors),
            generated_scale,
        })),
        ..RowContext::default()
    }
}

/// The caller's sink, shared by every try of a held answer.
type SharedSink = Arc<Mutex<EventSink>>;

fn forward(sink: &SharedSink, event: GenerationEvent) -> ControlFlow<()> {
    (sink.lock().unwrap_or_else(PoisonError::into_inner))(event)
}

/// What the text a guard writes (a refusal sentence, the fallback) must still obey: the
/// request's stop strings and token limit. The engine applies them to what it generates; the
/// guard's sentence is written after.
#[derive(Clone)]
struct Limits {
    stop: Vec<String>,
    max_tokens: usize,
    tokenizer: Arc<ChatTokenizer>,
}

impl Limits {
    fn tokens(&self, text: &str) -> usize {
        self.tokenizer
            .encode_continuation(text)
            .map_or(0, |ids| ids.len())
    }

    /// `text` cut before the first stop string and to the token limit (none without limits),
    /// with the finish reason when it was cut.
    fn apply(limits: &Option<Self>, text: String) -> (String, Option<FinishReason>) {
        match limits {
            Some(l) => within_limits(&text, &l.stop, l.max_tokens, |t| l.tokens(t)),
            None => (text, None),
        }
    }
}

/// `sink` behind the answer guard of `held`: a held answer's text is what the guard sends. An
/// answer that is a refusal sentence or the fallback ends with `stop` when the guard ended it
/// (at the refusal's end, or with the fallback's whole sentence), with the engine's reason when
/// generation ended first, and with `length` or `stop` when `limits` cut the guard's sentence;
/// its usage counts the tokens sent. When the guard does not keep the opening and `again` has a
/// row left, the request is queued anew steered with that row and this try ends unseen: the
/// caller sees the last try's answer alone.
fn finish_held(
    held: Held,
    sink: SharedSink,
    mut again: Option<Again>,
    limits: Option<Limits>,
) -> EventSink {
    // this try was replaced by another: its end is not the answer's
    let mut retried = false;
    // the guard's own sentence as sent, and how the answer ends, once it is written
    let mut written: Option<(String, FinishReason)> = None;
    Box::new(move |event| {
        if retried {
            return ControlFlow::Break(());
        }
        let mut state = held.state();
        let Some(g) = state.guard.as_mut() else {
            drop(state);
            return forward(&sink, event);
        };
        let undecided = g.ending().is_none();
        match event {
            // a held answer's text is the guard's, not token by token: no log-probabilities
            GenerationEvent::Token { id, text, .. } => {
                let mut step = g.push(&text);
                if undecided && try_again(&mut state, (&held, &sink), &mut again, &limits) {
                    retried = true;
                    return ControlFlow::Break(());
                }
                if undecided && state.guard.as_ref().is_some_and(guard_wrote) {
                    let (text, cut) = Limits::apply(&limits, std::mem::take(&mut step.text));
                    step.text.clone_from(&text);
                    written = Some((text, cut.unwrap_or(FinishReason::Stop)));
                }
                drop(state);
                let flow = forward(
                    &sink,
                    GenerationEvent::Token {
                        id,
                        text: step.text,
                        logprobs: None,
                    },
                );
                if step.stop {
                    return ControlFlow::Break(());
                }
                flow
            }
            GenerationEvent::Finished {
                reason,
                mut usage,
                tail,
            } => {
                let mut tail = g.finish(&tail);
                if undecided && try_again(&mut state, (&held, &sink), &mut again, &limits) {
                    retried = true;
                    return ControlFlow::Break(());
                }
                let ending = state.guard.as_ref().and_then(AnswerGuard::ending);
                if undecided && state.guard.as_ref().is_some_and(guard_wrote) {
                    // decided as generation ended: the fallback is a whole sentence; a refusal
                    // opening ends as generation did (cut by the token limit, say)
                    let (text, cut) = Limits::apply(&limits, std::mem::take(&mut tail));
                    let fallback = ending == Some(SteeredEnding::Fallback);
                    tail.clone_from(&text);
                    let own = if fallback { FinishReason::Stop } else { reason };
                    written = Some((text, cut.unwrap_or(own)));
                }
                drop(state);
                let reason = match &written {
                    Some((text, ends)) => {
                        if let Some(l) = &limits {
                            usage.completion_tokens = l.tokens(text);
                        }
                        *ends
                    }
                    None => reason,
                };
                forward(
                    &sink,
                    GenerationEvent::Finished {
                        reason,
                        usage,
                        tail,
                    },
                )
            }
            // comes before the answer, once a try; held answers never ask for log-probabilities
            // (`ApiRequest::steerable`), so no try's prompt scores reach the client twice
            event @ (GenerationEvent::Failed { .. } | GenerationEvent::PromptLogprobs(_)) => {
                drop(state);
                forward(&sink, event)
            }
        }
    })
}

/// Whether the guard wrote the answer's text (a refusal sentence, the fallback) rather than
/// passing the generated text on.
fn guard_wrote(g: &AnswerGuard) -> bool {
    matches!(
        g.ending(),
        Some(SteeredEnding::Refusal | SteeredEnding::Fallback)
    )
}

/// If the guard has just declined the opening and a retry row is left, queue the request
/// again with it (its guard starts afresh) and say so; otherwise leave the decision be.
fn try_again(
    state: &mut HeldState,
    (held, sink): (&Held, &SharedSink),
    again: &mut Option<Again>,
    limits: &Option<Limits>,
) -> bool {
    let declined = state
        .guard
        .as_ref()
        .and_then(AnswerGuard::ending)
        .is_some_and(|e| e != SteeredEnding::Refusal);
    if !declined {
        return false;
    }
    let Some(Again { retry, mut rows }) = again.take() else {
        return false;
    };
    let Some(row) = rows.pop_front() else {
        return false;
    };
    let request = GenerationRequest {
        prompt: retry.prompt.clone(),
        params: retry.params.clone(),
        row,
        gate: None,
        sink: finish_held(
            held.clone(),
            sink.clone(),
            Some(Again {
                retry: retry.clone(),
                rows,
            }),
            limits.clone(),
        ),
    };
    retry.submitter.submit(request);
    if let Some(g) = state.guard.as_mut() {
        g.restart();
    }
    state.retries += 1;
    true
}

/// The hook every engine runs: steered rows bring their own vectors, so requests under
/// different policies or packs share one engine.
pub fn hook() -> Box<dyn LayerHook> {
    Box::new(AddVectors::default())
}
