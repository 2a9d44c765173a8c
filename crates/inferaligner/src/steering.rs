//! The one glue between a steering pack, a policy and the runtime's early-exit gate. `serve`,
//! `eval` and `generate` all submit the engine request this builds, so the figures `eval`
//! prints come from the path that answers users: the same decision, the same vectors (carried
//! by the row, `AddOwnVectors`), the same alpha and layer fallbacks, and a blocked request
//! that ends after the gate.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, bail};
use inferaligner_core::{Action, Policy, SteeredAnswers, SteeredEnding, SteeringPack};
use inferaligner_proxy::GateReport;
use inferaligner_runtime::{
    AddOwnVectors, AddVectors, AfterGate, ChatTokenizer, EarlyExit, EventSink, FinishReason,
    GenerationEvent, LayerHook, Manifest, RowContext,
};

use crate::refusal::AnswerGuard;

/// How a steered answer held by the policy's `steered_answers` ended (see [`crate::refusal`]);
/// `None` until it is decided, and for answers that are not held.
#[derive(Debug, Clone, Default)]
pub struct Held(Arc<Mutex<Option<AnswerGuard>>>);

impl Held {
    /// How the held answer ended, if it was held and has been decided.
    pub fn ending(&self) -> Option<SteeredEnding> {
        self.guard().as_ref().and_then(AnswerGuard::ending)
    }

    /// The generated answer the policy's fallback replaced, if it did.
    pub fn replaced(&self) -> Option<String> {
        self.guard()
            .as_ref()
            .and_then(|g| g.replaced().map(str::to_owned))
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, Option<AnswerGuard>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
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

    /// Every steered layer must have a vector in the pack, and the export must expose the
    /// residual stream after it and after the gate layer (a hook sees only the last layer of a
    /// multi-layer segment: a vector for an inner layer would be skipped without a word).
    pub fn check_layers(&self, manifest: &Manifest) -> anyhow::Result<()> {
        let num_layers = manifest.num_layers;
        if let Some(bad) = self.layers().iter().find(|&&l| self.pack.ssv(l).is_none()) {
            bail!("steered layer {bad} does not exist in this {num_layers}-layer model");
        }
        let gate = self.pack.metadata.gate_layer;
        let layers = self.layers();
        let acting = layers
            .iter()
            .map(|l| ("steered", *l))
            .chain([("gate", gate)]);
        for (what, layer) in acting {
            if let Some([first, last]) = manifest.inside_segment(layer) {
                bail!(
                    "{what} layer {layer} is inside the export's segment of layers \
                     {first}-{last}, whose graph exposes only layer {last}'s output: export \
                     with a segment boundary after layer {layer}, or choose other layers"
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

    /// One gated request's early exit and event sink. The gate reads `view` (or the prompt
    /// when `None`; see [`crate::view`]) and `report` gets the decision first. A steered row
    /// carries its own vectors, and its answer reaches `sink` as the policy's
    /// `steered_answers` finishes it (`read`: the tokens the gate reads, which a held answer
    /// may name; `held` tells the caller how it ended). A blocked request ends after the gate (its
    /// answer is the policy's refusal), and so does one that passes when `end_unless_steered`
    /// (proxy mode: the upstream answers it).
    pub fn gate(
        &self,
        view: Option<Vec<u32>>,
        end_unless_steered: bool,
        (tokenizer, read): (&ChatTokenizer, &[u32]),
        report: impl FnOnce(GateReport) + Send + 'static,
        (sink, held): (EventSink, &Held),
    ) -> (EarlyExit, EventSink) {
        let mean_from = crate::view::mean_from(self.pack.metadata.gate_readout, tokenizer, read);
        if self.policy.steered_answers == SteeredAnswers::AsGenerated {
            // nothing is held: no request text, no guard between the engine and `sink`
            let exit = self.early_exit((view, mean_from), end_unless_steered, report, || {});
            return (exit, sink);
        }
        let request = tokenizer.decode(read).unwrap_or_default();
        let guard = held.clone();
        let policy = self.policy.clone();
        let on_steer = move || {
            *guard.guard() = AnswerGuard::new(policy.steered_answers, &request, &policy.refusal);
        };
        let exit = self.early_exit((view, mean_from), end_unless_steered, report, on_steer);
        (exit, finish_held(held.clone(), sink))
    }

    /// The gate reads `view` (or the prompt), with its mean from `mean_from` (see
    /// [`crate::view::mean_from`]).
    fn early_exit(
        &self,
        (view, mean_from): (Option<Vec<u32>>, Option<usize>),
        end_unless_steered: bool,
        report: impl FnOnce(GateReport) + Send + 'static,
        on_steer: impl FnOnce() + Send + 'static,
    ) -> EarlyExit {
        let pack = self.pack.clone();
        let policy = self.policy.clone();
        let (alpha, layers) = (self.alpha(), self.layers());
        let generated_scale = self.policy.generated_scale;
        let layer = pack.metadata.gate_layer;
        EarlyExit {
            after_layer: layer,
            view,
            mean_from,
            decide: Box::new(move |residual: &[f32]| {
                let decision = policy.decide(&pack.gate(), ndarray::ArrayView1::from(residual));
                report(GateReport {
                    decision,
                    layer,
                    alpha,
                    layers: layers.clone(),
                });
                match decision.action {
                    Action::Steer => {
                        on_steer();
                        let vectors = layers
                            .iter()
                            .filter_map(|&l| pack.ssv(l).map(|v| (l, v.to_vec())))
                            .collect();
                        AfterGate::Generate(RowContext {
                            params: Some(Arc::new(AddOwnVectors {
                                scale: alpha,
                                vectors: Arc::new(vectors),
                                generated_scale,
                            })),
                            ..RowContext::default()
                        })
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

/// `sink` behind the answer guard of `held`: a held answer's text is what the guard sends,
/// and an answer that is a refusal sentence or the fallback ends with `stop` (whether the
/// guard cancelled it or it reached its token limit).
fn finish_held(held: Held, mut sink: EventSink) -> EventSink {
    Box::new(move |event| {
        let mut guard = held.guard();
        let Some(g) = guard.as_mut() else {
            drop(guard);
            return sink(event);
        };
        match event {
            GenerationEvent::Token { id, text } => {
                let step = g.push(&text);
                drop(guard);
                let flow = sink(GenerationEvent::Token {
                    id,
                    text: step.text,
                });
                if step.stop {
                    return ControlFlow::Break(());
                }
                flow
            }
            GenerationEvent::Finished {
                reason,
                usage,
                tail,
            } => {
                let tail = g.finish(&tail);
                // a refusal sentence or the fallback is a whole answer, however generation ended
                let whole = g.ending().is_some_and(|e| e != SteeredEnding::AsGenerated);
                drop(guard);
                let reason = if whole { FinishReason::Stop } else { reason };
                sink(GenerationEvent::Finished {
                    reason,
                    usage,
                    tail,
                })
            }
            failed @ GenerationEvent::Failed { .. } => {
                drop(guard);
                sink(failed)
            }
        }
    })
}

/// The hook every engine runs: steered rows bring their own vectors, so requests under
/// different policies or packs share one engine.
pub fn hook() -> Box<dyn LayerHook> {
    Box::new(AddVectors::default())
}
