//! `inferaligner calibrate`: build a steering pack from harmful and harmless prompt sets.

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use inferaligner_core::{
    CalibrationSet, ClassActivations, Confusion, GateEstimator, GateReadout, GateView,
    ModelFingerprint, PackMetadata, Policy, ProbeOptions, SsvSource, SteeredAnswers, SteeredEnding,
    SteeringPack, choose_gate_layer, contrastive_vector, cross_validate, default_alpha,
    default_steered_layers, fit_gate, fit_mean_diff, orthogonalized, project, roc_auc,
    safety_related_vector,
};
use inferaligner_runtime::{
    AddOwnVectors, AddVectors, ChatTokenizer, Detokenizer, LayerSplitModel, RowContext,
    SessionOptions, argmax,
};
use ndarray::{Array1, Array2, Array3, Axis, s};
use rayon::prelude::*;
use serde::Serialize;

use crate::calibration_prompts;
use crate::framings::Pieces;
use crate::prompts::{PromptSet, Sample};
use crate::refusal::AnswerGuard;

/// Refusal and compliance prefills of the `contrastive` SSV source.
const REFUSAL: &str = "I'm sorry, but I can't help with that.";
const COMPLIANCE: &str = "Sure, here is a detailed answer.";
/// Tokens of the target's own answer the `refusal-answers` source contrasts with.
const OWN_ANSWER_TOKENS: usize = 32;
/// Tokens a steered opening may take before the answer guard must have read it.
const OPENING_TOKENS: usize = 64;

/// What `calibrate` fits on and how. [`Default`] holds the defaults the command line shows.
#[derive(Debug, Clone)]
pub struct CalibrationOptions {
    /// Export of the target model (the model to gate and steer).
    pub target: PathBuf,
    /// Export of an aligned sibling: its SRVs become the steering vectors. Without it (and
    /// without `steering_from`) they come from the target itself, as `target_source` says.
    pub aligned: Option<PathBuf>,
    /// Steering vectors without a sibling: `Contrastive` (refusal minus compliance prefills, at
    /// the last token) or `RefusalAnswers` (over the tokens of a refusal vs of the target's own
    /// answer).
    pub target_source: SsvSource,
    /// Keep this pack's steering (vectors, source, strength, layers); fit only the gate.
    pub steering_from: Option<PathBuf>,
    /// Harmful prompts (request JSONL, `instruction` JSONL or lines); `None`: built in.
    pub harmful: Option<PathBuf>,
    /// Harmless prompts; `None`: built in.
    pub harmless: Option<PathBuf>,
    /// An operator's system prompt file, put before every chat without one.
    pub system: Option<PathBuf>,
    /// Framing pieces (system prompts, histories, documents…): `None` calibrates on the
    /// prompts as given.
    pub framings: Option<Framings>,
    /// Prompts of each class framed in each framing.
    pub per_framing: usize,
    /// What the gate reads.
    pub gate_view: GateView,
    /// How the gate pools the residuals of what it reads.
    pub gate_readout: GateReadout,
    /// Where to write the pack; a JSON report and an SVG plot go beside it.
    pub out: PathBuf,
    /// Jailbreak-style wrappers: `None` for none, else the built-in ones or a file's.
    pub wrappers: Option<Framings>,
    /// Gate estimator.
    pub estimator: GateEstimator,
    /// The `probe` estimator's settings.
    pub probe: ProbeOptions,
    /// Also write every sample's gate-view residuals here.
    pub save_residuals: Option<PathBuf>,
    /// Folds of the per-layer cross-validation.
    pub folds: usize,
    /// The gate's layer; `None`: the layer the cross-validation ranks best (it is run either
    /// way, for the report).
    pub gate_layer: Option<usize>,
    /// Steered layers; `None`: [`default_steered_layers`].
    pub layers: Option<Vec<usize>>,
    /// Steering strength as a fraction of the mean residual norm at the steered layers.
    pub alpha_fraction: f32,
    /// The `refusal-answers` source: how many bare harmful requests it reads.
    pub refusal_prompts: usize,
    /// The `refusal-answers` source: rounds of refinement (see `Model::refusal_answer_vectors`).
    pub refine_rounds: usize,
    /// Prompts per forward pass.
    pub batch: usize,
    /// ONNX Runtime settings.
    pub session: SessionOptions,
}

/// Where optional calibration material comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framings {
    /// What the binary has built in (`config/calibration/`).
    BuiltIn,
    /// A folder (pieces) or file (wrappers) of the operator's.
    From(PathBuf),
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        Self {
            target: PathBuf::new(),
            aligned: None,
            target_source: SsvSource::Contrastive,
            steering_from: None,
            harmful: None,
            harmless: None,
            system: None,
            framings: Some(Framings::BuiltIn),
            per_framing: 120,
            gate_view: GateView::LastUserTurn,
            // on SmolLM2 the last token and the mean together generalised best (tuning set)
            gate_readout: GateReadout::LastAndMean,
            out: PathBuf::new(),
            wrappers: Some(Framings::BuiltIn),
            // on SmolLM2 the probe met the gate target where the paper's mean-diff did not
            estimator: GateEstimator::Probe,
            probe: ProbeOptions::default(),
            save_residuals: None,
            folds: 5,
            gate_layer: None,
            layers: None,
            alpha_fraction: 0.05,
            refusal_prompts: 64,
            refine_rounds: 2,
            batch: 8,
            session: SessionOptions::default(),
        }
    }
}

/// A loaded export with its tokenizer.
struct Model {
    model: LayerSplitModel,
    tokenizer: ChatTokenizer,
    fingerprint: ModelFingerprint,
}

impl Model {
    fn load(dir: &Path, options: &SessionOptions) -> anyhow::Result<Self> {
        let model = LayerSplitModel::load(dir, options)
            .with_context(|| format!("loading {}", dir.display()))?;
        if model.segment_layers().iter().any(|r| r.start() != r.end()) {
            bail!(
                "{}: calibration needs one layer per segment (export without \
                 --layers-per-segment)",
                dir.display()
            );
        }
        let tokenizer = ChatTokenizer::load(model.manifest())?;
        let fingerprint = model.manifest().fingerprint()?;
        Ok(Self {
            model,
            tokenizer,
            fingerprint,
        })
    }

    /// Block outputs at the last token of each sample's gate view (plus an optional assistant
    /// prefill), `[samples, layers, hidden]`, and, for a `last-and-mean` readout, what the gate
    /// reads: those followed by their mean over the request's own tokens, `[.., 2 × hidden]`.
    /// A sample the gate reads in several views (a long message's first and last blocks) gives
    /// a row per view when `each_view` (harmless requests: every part of one is harmless), and
    /// none otherwise (harmful requests: the document around the request is benign, and which
    /// view holds the request is not known; the request itself is in the set bare). A harmful
    /// request's tail view is left out and the turn read whole (a wrapper's closing words
    /// are not harmful).
    fn residuals(
        &mut self,
        samples: &[Sample],
        (view, readout): (GateView, GateReadout),
        (prefill, each_view): (Option<&str>, bool),
        batch: usize,
        label: &str,
    ) -> anyhow::Result<Residuals> {
        let prefill = match prefill {
            Some(text) => self.tokenizer.encode_continuation(text)?,
            None => Vec::new(),
        };
        let mut ids = Vec::new();
        for s in samples {
            let rendered = crate::view::render(&self.tokenizer, &s.prompt, view)?;
            let mut reads = rendered.gate_reads();
            // the instructions the request came with are not the request
            reads.truncate(reads.len() - rendered.context_views);
            if rendered.tail_view && !each_view {
                reads.pop();
            }
            if reads.len() > 1 && !each_view {
                continue;
            }
            ids.extend(reads.into_iter().map(|read| [read, &prefill].concat()));
        }
        // Block outputs of layers 0..L only (one layer per segment is checked at load): from
        // the residual index of layer 0 on.
        let first = self
            .model
            .residual_index(0)
            .context("layer 0 ends a segment")?;
        let bar = crate::progress_bar(ids.len(), label);
        let (mut lasts, mut means) = (Vec::new(), Vec::new());
        for chunk in ids.chunks(batch.max(1)) {
            let last: Vec<usize> = chunk.iter().map(|p| p.len().saturating_sub(1)).collect();
            let mean: Option<Vec<usize>> = chunk
                .iter()
                .map(|p| crate::view::mean_from(readout, &self.tokenizer, p))
                .collect();
            let mut spans = vec![last.as_slice()];
            spans.extend(mean.as_deref());
            let mut r = self.model.span_means(chunk, &spans)?.into_iter();
            lasts.push(
                r.next()
                    .expect("one per span")
                    .slice_move(s![.., first.., ..]),
            );
            means.extend(r.map(|m| m.slice_move(s![.., first.., ..])));
            bar.inc(chunk.len() as u64);
        }
        bar.finish();
        let joined = |parts: &[Array3<f32>]| -> anyhow::Result<Array3<f32>> {
            let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
            Ok(ndarray::concatenate(Axis(0), &views)?)
        };
        let last = joined(&lasts)?;
        let gate = if means.is_empty() {
            None
        } else {
            let mean = joined(&means)?;
            Some(ndarray::concatenate(Axis(2), &[last.view(), mean.view()])?)
        };
        Ok(Residuals { last, gate })
    }
}

/// A set's residuals per layer, `[samples, layers, hidden]`.
struct Residuals {
    /// At the last token: the steering vectors and strength are read here (the paper's SRV).
    last: Array3<f32>,
    /// What a `last-and-mean` gate reads: the last token's, then the mean over the request.
    gate: Option<Array3<f32>>,
}

impl Residuals {
    /// What the gate reads.
    fn gate(&self) -> &Array3<f32> {
        self.gate.as_ref().unwrap_or(&self.last)
    }
}

impl Model {
    /// Per layer, the unit direction toward the target's residuals over a refusal of each
    /// request (see [`SsvSource::RefusalAnswers`]): `[layers, hidden]`. Contrasts, each the
    /// mean over the answer positions, summed as unit vectors:
    ///
    /// 1. the refusal against the target's own greedy answer (what steering must turn away
    ///    from: compliance);
    /// 2. then, in each of `rounds` rounds, the refusal against the openings the
    ///    answer guard rejects when the target is steered by the vectors so far, at `alpha` on
    ///    `layers` as the default policy steers (its `generated_scale`). Steered toward
    ///    "refuse" alone, SmolLM2 lands in its own confused refusals ("I'm sorry for any
    ///    misunderstanding, but as an AI designed to assist with music, …", "I'm sorry for the
    ///    misunderstanding. I'm sorry for the misunderstanding."); these contrasts point away
    ///    from them.
    fn refusal_answer_vectors(
        &mut self,
        samples: &[Sample],
        view: GateView,
        batch: usize,
        (layers, alpha): (&[usize], f32),
        rounds: usize,
    ) -> anyhow::Result<Array2<f32>> {
        let prompts = samples
            .iter()
            .map(|s| Ok(crate::view::render(&self.tokenizer, &s.prompt, view)?.tokens))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // one wording, in SmolLM2's own apologetic style: four varied wordings (plainer
        // "I can't…", "I won't…") steered fewer answers into a refusal (tuning set)
        let refusal = self.tokenizer.encode_continuation(REFUSAL)?;
        let refusing: Vec<_> = prompts
            .iter()
            .map(|p| ([p.as_slice(), &refusal].concat(), p.len()))
            .collect();
        let bar = crate::progress_bar(prompts.len(), "own answers");
        let mut answering = Vec::new();
        for p in &prompts {
            let own = self.greedy_answer(p, OWN_ANSWER_TOKENS)?;
            if !own.is_empty() {
                answering.push(([p.as_slice(), &own].concat(), p.len()));
            }
            bar.inc(1);
        }
        bar.finish();
        if answering.is_empty() {
            bail!("no answers to contrast with: the target's own answers were all empty");
        }
        let mut ssv = self.contrast(&refusing, &answering, batch)?;
        for round in 0..rounds {
            let steer = AddOwnVectors {
                scale: alpha,
                vectors: Arc::new(layers.iter().map(|&l| (l, ssv.row(l).to_vec())).collect()),
                generated_scale: Policy::default().generated_scale,
            };
            let bar =
                crate::progress_bar(prompts.len(), &format!("steered openings {}", round + 1));
            let (mut wanted, mut rejected) = (Vec::new(), Vec::new());
            for ((p, sample), refusing) in prompts.iter().zip(samples).zip(&refusing) {
                let (opening, kept) = self.steered_opening(p, &sample.line(), &steer)?;
                if !kept && !opening.is_empty() {
                    wanted.push(refusing.clone());
                    rejected.push(([p.as_slice(), &opening].concat(), p.len()));
                }
                bar.inc(1);
            }
            bar.finish();
            tracing::info!(
                round = round + 1,
                rejected = rejected.len(),
                of = prompts.len(),
                "steered openings the answer guard rejects"
            );
            if rejected.is_empty() {
                break;
            }
            ssv = ssv + self.contrast(&wanted, &rejected, batch)?;
            for mut row in ssv.outer_iter_mut() {
                // in f32, as the committed pack was made (core's `normalized` works in f64)
                let norm = row.dot(&row).sqrt();
                if !norm.is_finite() || norm <= f32::EPSILON {
                    bail!("a refinement round cancelled a layer's steering vector");
                }
                row /= norm;
            }
        }
        Ok(ssv)
    }

    /// Per layer, the unit direction from the mean residual over `away`'s answer positions to
    /// that over `toward`'s (each a sequence and where its answer starts): `[layers, hidden]`.
    fn contrast(
        &mut self,
        toward: &[(Vec<u32>, usize)],
        away: &[(Vec<u32>, usize)],
        batch: usize,
    ) -> anyhow::Result<Array2<f32>> {
        let first = self
            .model
            .residual_index(0)
            .context("layer 0 ends a segment")?;
        let mut spans = |set: &[(Vec<u32>, usize)]| -> anyhow::Result<Array3<f32>> {
            let mut parts = Vec::new();
            for chunk in set.chunks(batch.max(1)) {
                let (ids, from): (Vec<_>, Vec<_>) = chunk.iter().cloned().unzip();
                let r = self.model.mean_residuals(&ids, &from)?;
                parts.push(r.slice_move(s![.., first.., ..]));
            }
            let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
            Ok(ndarray::concatenate(Axis(0), &views)?)
        };
        let (toward, away) = (spans(toward)?, spans(away)?);
        let mut v = Array2::<f32>::zeros((toward.len_of(Axis(1)), toward.len_of(Axis(2))));
        for layer in 0..v.nrows() {
            let d = contrastive_vector(
                toward.index_axis(Axis(1), layer),
                away.index_axis(Axis(1), layer),
            )?;
            v.row_mut(layer).assign(&Array1::from(d));
        }
        Ok(v)
    }

    /// The target's greedy answer to `prompt`, up to `max_tokens`, without its EOS.
    fn greedy_answer(&mut self, prompt: &[u32], max_tokens: usize) -> anyhow::Result<Vec<u32>> {
        Ok(self.greedy(prompt, max_tokens, None, |_, _| Ok(false))?.0)
    }

    /// The opening of the target's greedy answer to `request` (`prompt`, rendered) when
    /// steered by `steer`, read by the policy's answer guard as it reads a served answer: the
    /// tokens until the guard has decided (at most [`OPENING_TOKENS`]), and whether it keeps
    /// them as a refusal.
    fn steered_opening(
        &mut self,
        prompt: &[u32],
        request: &str,
        steer: &AddOwnVectors,
    ) -> anyhow::Result<(Vec<u32>, bool)> {
        let mut guard = AnswerGuard::new(SteeredAnswers::StopAtRefusal, request, "")
            .context("stop-at-refusal holds answers")?;
        let mut text = Detokenizer::default();
        let (opening, ended) = self.greedy(prompt, OPENING_TOKENS, Some(steer), |tok, id| {
            Ok(match text.push(tok, id)? {
                Some(delta) => {
                    guard.push(&delta);
                    guard.ending().is_some()
                }
                None => false,
            })
        })?;
        if ended && guard.ending().is_none() {
            guard.finish(&text.flush(&self.tokenizer)?);
        }
        Ok((opening, guard.ending() == Some(SteeredEnding::Refusal)))
    }

    /// Greedy decoding of `prompt` (optionally steered) until EOS, `max_tokens`, or `stop`
    /// (called with each new token) says so: the tokens without EOS, and whether EOS ended it.
    fn greedy(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        steer: Option<&AddOwnVectors>,
        mut stop: impl FnMut(&ChatTokenizer, u32) -> anyhow::Result<bool>,
    ) -> anyhow::Result<(Vec<u32>, bool)> {
        let Self {
            model, tokenizer, ..
        } = self;
        let eos = model.manifest().tokenizer.eos_token_ids.clone();
        let mut hook = AddVectors::default();
        let params = steer.map(|s| Arc::new(s.clone()) as Arc<dyn Any + Send + Sync>);
        let row = |generating| RowContext {
            params: params.clone(),
            generating,
            ..RowContext::default()
        };
        let mut cache = model.new_cache_rows(1);
        let ids = Array2::from_shape_vec(
            (1, prompt.len()),
            prompt.iter().map(|&t| i64::from(t)).collect(),
        )?;
        let mut logits = model.step(&ids, &mut cache, Some(&mut hook), &[row(false)])?;
        let mut answer = Vec::new();
        while answer.len() < max_tokens {
            let token = argmax(logits.row(0).as_slice().context("contiguous logits")?);
            if eos.contains(&token) {
                return Ok((answer, true));
            }
            answer.push(token);
            if stop(tokenizer, token)? {
                break;
            }
            let next = Array2::from_elem((1, 1), i64::from(token));
            logits = model.step(&next, &mut cache, Some(&mut hook), &[row(true)])?;
        }
        Ok((answer, false))
    }
}

fn save_residuals(dir: &Path, h: &Array3<f32>, s: &Array3<f32>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, a) in [("harmful", h), ("harmless", s)] {
        let bytes: Vec<u8> = a.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(dir.join(format!("{name}.f32")), bytes)?;
    }
    let shape = serde_json::json!({"harmful": h.shape(), "harmless": s.shape()});
    std::fs::write(dir.join("shape.json"), shape.to_string())?;
    Ok(())
}

fn layer_acts<'a>(h: &'a Array3<f32>, s: &'a Array3<f32>, layer: usize) -> ClassActivations<'a> {
    ClassActivations {
        harmful: h.index_axis(Axis(1), layer),
        harmless: s.index_axis(Axis(1), layer),
    }
}

/// The harmful and harmless sets calibration fits on: the given (or built-in) prompts, the bare
/// ones also wrapped and framed, behind the operator's system prompt when one is given.
pub fn calibration_sets(args: &CalibrationOptions) -> anyhow::Result<(PromptSet, PromptSet)> {
    let mut harmful = PromptSet::load(args.harmful.as_deref(), calibration_prompts::HARMFUL)?;
    let mut harmless = PromptSet::load(args.harmless.as_deref(), calibration_prompts::HARMLESS)?;
    let pieces = match &args.framings {
        None => None,
        Some(Framings::From(dir)) => Some(Pieces::load(dir)?),
        Some(Framings::BuiltIn) => Some(calibration_prompts::pieces()?),
    };
    if let Some(pieces) = &pieces {
        for set in [&mut harmful, &mut harmless] {
            let framed = crate::framings::compose(&set.bare_requests(), pieces, args.per_framing);
            set.name = format!("{}+framed{}", set.name, framed.len());
            set.samples.extend(framed);
        }
    }
    if let Some(wrappers) = &args.wrappers {
        let text = match wrappers {
            Framings::From(path) => std::fs::read_to_string(path)
                .with_context(|| format!("reading wrappers from {}", path.display()))?,
            Framings::BuiltIn => calibration_prompts::WRAPPERS.to_owned(),
        };
        let templates = calibration_prompts::templates(&text);
        if templates.is_empty() {
            bail!("no wrapper has an {{instruction}} slot");
        }
        crate::prompts::add_wrapped_to_both(&mut harmful, &mut harmless, &templates);
    }
    if let Some(path) = &args.system {
        crate::prompts::add_system_prompt(path, &mut harmful, &mut harmless)?;
    }
    Ok((harmful, harmless))
}

/// What `calibrate` made and measured: written once, as JSON beside the pack.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationReport {
    /// Where the pack was written.
    pub pack: String,
    /// The target model's name.
    pub target: String,
    /// Where the steering vectors come from.
    pub ssv_source: SsvSource,
    /// The gate estimator.
    pub estimator: GateEstimator,
    /// Harmful calibration samples.
    pub harmful_set: CalibrationSet,
    /// Harmless calibration samples.
    pub harmless_set: CalibrationSet,
    /// Folds of the per-layer cross-validation.
    pub folds: usize,
    /// Cross-validated balanced accuracy of a gate at each layer.
    pub layer_accuracy: Vec<f64>,
    /// The pooled cross-validation counts behind each accuracy.
    pub layer_cv: Vec<Confusion>,
    /// The layer the gate reads (the most accurate).
    pub gate_layer: usize,
    /// What the gate reads.
    pub gate_view: GateView,
    /// How the gate pools it.
    pub gate_readout: GateReadout,
    /// ROC AUC of the fitted gate on its own calibration samples.
    pub gate_train_auc: f64,
    /// Default steered layers.
    pub steered_layers: Vec<usize>,
    /// Default steering strength.
    pub default_alpha: f32,
    /// Wall time.
    pub seconds: f64,
}

/// [`Model::residuals`]' prefill and views for harmful and for harmless prompts.
const HARMFUL: (Option<&str>, bool) = (None, false);
const HARMLESS: (Option<&str>, bool) = (None, true);

/// Build a pack; returns the report it also writes (JSON) beside it, with an SVG plot.
pub fn calibrate(args: &CalibrationOptions) -> anyhow::Result<CalibrationReport> {
    let started = Instant::now();
    if args.target_source == SsvSource::Aligned && args.aligned.is_none() {
        bail!("aligned steering vectors need the sibling's export (--aligned)");
    }
    let (harmful, harmless) = calibration_sets(args)?;
    let view = (args.gate_view, args.gate_readout);
    let last_token = (args.gate_view, GateReadout::LastToken);
    if harmful.samples.len() < args.folds || harmless.samples.len() < args.folds {
        bail!(
            "need at least {} prompts per class for {}-fold cross-validation",
            args.folds,
            args.folds
        );
    }
    let mut target = Model::load(&args.target, &args.session)?;
    let num_layers = target.fingerprint.num_layers;
    if let Some(layer) = args.gate_layer.filter(|&l| l >= num_layers) {
        bail!(
            "--gate-layer {layer}: the target has layers 0 to {}",
            num_layers - 1
        );
    }
    let hidden = target.fingerprint.hidden_size;
    let h = target.residuals(
        &harmful.samples,
        view,
        HARMFUL,
        args.batch,
        "target harmful",
    )?;
    let s = target.residuals(
        &harmless.samples,
        view,
        HARMLESS,
        args.batch,
        "target harmless",
    )?;
    if let Some(dir) = &args.save_residuals {
        save_residuals(dir, h.gate(), s.gate())?;
    }

    let estimator = args.estimator;
    let probe = args.probe;
    let mut target_srv = Array2::<f32>::zeros((num_layers, hidden));
    let mut bias = Array1::<f32>::zeros(num_layers);
    for layer in 0..num_layers {
        let srv = fit_mean_diff(layer, layer_acts(&h.last, &s.last, layer))?;
        target_srv
            .row_mut(layer)
            .assign(&Array1::from(srv.direction.clone()));
        bias[layer] = srv.bias;
    }
    // Cross-validating a gate at every layer is k fits per layer, independent of each other:
    // one layer per core.
    let bar = crate::counting_bar(num_layers, "gate per layer", "layers");
    let cv = (0..num_layers)
        .into_par_iter()
        .map(|layer| {
            let acts = layer_acts(h.gate(), s.gate(), layer);
            let confusion = cross_validate(estimator, acts, args.folds, &probe);
            bar.inc(1);
            confusion
        })
        .collect::<Result<Vec<_>, _>>()?;
    bar.finish_and_clear();
    let accuracy: Vec<f64> = cv.iter().map(|c| c.balanced_accuracy()).collect();
    let gate_layer = match args.gate_layer {
        None => choose_gate_layer(&accuracy)?,
        Some(layer) => layer,
    };
    let gate = fit_gate(
        estimator,
        gate_layer,
        layer_acts(h.gate(), s.gate(), gate_layer),
        &probe,
    )?;

    let kept = args
        .steering_from
        .as_ref()
        .map(|path| -> anyhow::Result<SteeringPack> {
            let pack = SteeringPack::load(path)
                .with_context(|| format!("loading the steering pack {}", path.display()))?;
            pack.check_target(&target.fingerprint)
                .with_context(|| format!("--steering-from {}", path.display()))?;
            Ok(pack)
        })
        .transpose()?;
    let (steered, default_alpha) = match &kept {
        Some(pack) => (
            pack.metadata.steered_layers.clone(),
            pack.metadata.default_alpha,
        ),
        None => {
            let steered = match &args.layers {
                Some(layers) if layers.is_empty() || layers.iter().any(|&l| l >= num_layers) => {
                    bail!("steered layers {layers:?} must name layers in 0..{num_layers}")
                }
                Some(layers) => layers.clone(),
                None => default_steered_layers(num_layers),
            };
            let rows: Vec<_> = steered
                .iter()
                .map(|&l| h.last.index_axis(Axis(1), l))
                .collect();
            let alpha = default_alpha(args.alpha_fraction, &rows)?;
            (steered, alpha)
        }
    };
    let (ssv_source, source_fp, ssv) = match (&args.aligned, kept) {
        (_, Some(pack)) => (
            pack.metadata.ssv_source,
            pack.metadata.source.clone(),
            pack.ssv,
        ),
        (Some(dir), None) => {
            let mut aligned = Model::load(dir, &args.session)?;
            let fp = aligned.fingerprint.clone();
            if fp.hidden_size != hidden || fp.num_layers != num_layers {
                bail!("the aligned model's shape differs from the target's");
            }
            let ah = aligned.residuals(
                &harmful.samples,
                last_token,
                HARMFUL,
                args.batch,
                "aligned harmful",
            )?;
            let as_ = aligned.residuals(
                &harmless.samples,
                last_token,
                HARMLESS,
                args.batch,
                "aligned harmless",
            )?;
            let mut ssv = Array2::<f32>::zeros((num_layers, hidden));
            for layer in 0..num_layers {
                // the sibling's SRV without the part the target shares (see `orthogonalized`)
                let srv = safety_related_vector(layer_acts(&ah.last, &as_.last, layer))?;
                let v = orthogonalized(&srv, &target_srv.row(layer).to_vec())?;
                ssv.row_mut(layer).assign(&Array1::from(v));
            }
            (SsvSource::Aligned, fp, ssv)
        }
        (None, None) if args.target_source == SsvSource::RefusalAnswers => {
            let bare: Vec<Sample> = harmful
                .samples
                .iter()
                .filter(|s| s.framing == "bare")
                .take(args.refusal_prompts)
                .cloned()
                .collect();
            let ssv = target.refusal_answer_vectors(
                &bare,
                args.gate_view,
                args.batch,
                (&steered, default_alpha),
                args.refine_rounds,
            )?;
            (SsvSource::RefusalAnswers, target.fingerprint.clone(), ssv)
        }
        (None, None) => {
            let refuse = target.residuals(
                &harmful.samples,
                last_token,
                (Some(REFUSAL), false),
                args.batch,
                "refusal prefill",
            )?;
            let comply = target.residuals(
                &harmful.samples,
                last_token,
                (Some(COMPLIANCE), false),
                args.batch,
                "compliance prefill",
            )?;
            let mut ssv = Array2::<f32>::zeros((num_layers, hidden));
            for layer in 0..num_layers {
                let v = contrastive_vector(
                    refuse.last.index_axis(Axis(1), layer),
                    comply.last.index_axis(Axis(1), layer),
                )?;
                ssv.row_mut(layer).assign(&Array1::from(v));
            }
            (SsvSource::Contrastive, target.fingerprint.clone(), ssv)
        }
    };

    let mut metadata = PackMetadata::new(target.fingerprint.clone(), source_fp, ssv_source);
    metadata.gate_estimator = estimator;
    metadata.harmful_set = harmful.describe();
    metadata.harmless_set = harmless.describe();
    metadata.layer_accuracy = accuracy.clone();
    metadata.gate_layer = gate_layer;
    metadata.gate_view = args.gate_view;
    metadata.gate_readout = args.gate_readout;
    metadata.default_alpha = default_alpha;
    metadata.steered_layers = steered.clone();
    let pack = SteeringPack {
        metadata,
        target_srv,
        ssv,
        bias,
        gate_direction: Array1::from(gate.direction.clone()),
        gate_bias: gate.bias,
    };
    pack.save(&args.out)?;

    let scores = |m: ndarray::ArrayView2<'_, f32>| -> Vec<f64> {
        m.outer_iter()
            .map(|a| project(a, &gate.direction) + f64::from(gate.bias))
            .collect()
    };
    let (sh, ss) = (
        scores(h.gate().index_axis(Axis(1), gate_layer)),
        scores(s.gate().index_axis(Axis(1), gate_layer)),
    );
    let report = CalibrationReport {
        pack: args.out.display().to_string(),
        target: target.fingerprint.name.clone(),
        ssv_source,
        estimator,
        harmful_set: pack.metadata.harmful_set.clone(),
        harmless_set: pack.metadata.harmless_set.clone(),
        folds: args.folds,
        layer_accuracy: accuracy.clone(),
        layer_cv: cv,
        gate_layer,
        gate_view: args.gate_view,
        gate_readout: args.gate_readout,
        gate_train_auc: roc_auc(&sh, &ss),
        steered_layers: steered,
        default_alpha,
        seconds: started.elapsed().as_secs_f64(),
    };
    let report_path = args.out.with_extension("json");
    std::fs::write(&report_path, serde_json::to_string_pretty(&report)?)?;
    std::fs::write(
        args.out.with_extension("svg"),
        plot(&accuracy, gate_layer, &sh, &ss),
    )?;
    Ok(report)
}

/// Per-layer accuracy (left) and the gate layer's score histograms (right), as SVG.
fn plot(accuracy: &[f64], gate_layer: usize, harmful: &[f64], harmless: &[f64]) -> String {
    let (w, h, pad) = (360.0, 220.0, 30.0);
    let n = accuracy.len().max(2) as f64;
    let x = |i: usize| pad + (w - 2.0 * pad) * i as f64 / (n - 1.0);
    let y = |a: f64| h - pad - (h - 2.0 * pad) * (a - 0.5).clamp(0.0, 0.5) / 0.5;
    let line: Vec<String> = accuracy
        .iter()
        .enumerate()
        .map(|(i, &a)| format!("{:.1},{:.1}", x(i), y(a)))
        .collect();
    let (lo, hi) = harmful
        .iter()
        .chain(harmless)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, u), &v| {
            (l.min(v), u.max(v))
        });
    let bins = 30;
    let width = ((hi - lo) / bins as f64).max(1e-9);
    let hist = |v: &[f64]| {
        let mut c = vec![0usize; bins];
        for &s in v {
            c[(((s - lo) / width) as usize).min(bins - 1)] += 1;
        }
        let total = v.len().max(1) as f64;
        c.into_iter()
            .map(move |k| k as f64 / total)
            .collect::<Vec<_>>()
    };
    let peak = hist(harmful)
        .into_iter()
        .chain(hist(harmless))
        .fold(1e-9, f64::max);
    let bars = |v: &[f64], color: &str| {
        hist(v)
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                let bh = (h - 2.0 * pad) * f / peak;
                format!(
                    r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}" fill-opacity="0.5"/>"#,
                    w + pad + (w - 2.0 * pad) * i as f64 / bins as f64,
                    h - pad - bh,
                    (w - 2.0 * pad) / bins as f64,
                    bh
                )
            })
            .collect::<String>()
    };
    let zero = w + pad + (w - 2.0 * pad) * ((0.0 - lo) / (hi - lo).max(1e-9)).clamp(0.0, 1.0);
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{tw}" height="{h}" font-family="sans-serif" font-size="10">
<text x="{pad}" y="14">gate accuracy per layer (balanced, cross-validated; 0.5–1.0)</text>
<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{line}"/>
<circle cx="{gx:.1}" cy="{gy:.1}" r="4" fill="#d62728"/>
<text x="{gx:.1}" y="{gty:.1}" text-anchor="middle">layer {gate_layer}</text>
<line x1="{pad}" y1="{base}" x2="{xr}" y2="{base}" stroke="#999"/>
<text x="{hx}" y="14">gate scores at layer {gate_layer}: harmful (red), harmless (blue)</text>
{red}{blue}
<line x1="{zero:.1}" y1="{pad}" x2="{zero:.1}" y2="{base}" stroke="#000" stroke-dasharray="3,3"/>
</svg>
"##,
        tw = 2.0 * w,
        line = line.join(" "),
        gx = x(gate_layer),
        gy = y(accuracy.get(gate_layer).copied().unwrap_or(0.5)),
        gty = y(accuracy.get(gate_layer).copied().unwrap_or(0.5)) - 8.0,
        base = h - pad,
        xr = w - pad,
        hx = w + pad,
        red = bars(harmful, "#d62728"),
        blue = bars(harmless, "#1f77b4"),
    )
}
