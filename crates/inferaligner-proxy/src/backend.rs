//! The model behind the proxy. The proxy owns this trait; the binary implements it with the
//! ONNX Runtime engine, so this crate never links ONNX Runtime.

use std::sync::Arc;

use inferaligner_core::{
    Action, Decision, FinishReason, Policy, ResponseFormat, SamplingParams, SteeredEnding,
};
use serde::Serialize;

use crate::config::ServeMode;
use tokio::sync::mpsc::UnboundedSender;

/// A chat message with its content flattened to text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, …
    pub role: String,
    /// Text content (special-token strings in it are plain text).
    pub content: String,
}

impl Message {
    /// A message with the given role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// What to tokenize.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// `/v1/chat/completions`: rendered with the model's chat template.
    Chat(Vec<Message>),
    /// `/v1/completions`: raw text.
    Text(String),
    /// `/v1/completions`: token ids, used as given (checked against the vocabulary).
    Tokens(Vec<u32>),
}

/// A prompt's token ids, and the gate's own reading of the request when it is not the prompt
/// (its *gate view*: e.g. the last user turn alone).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tokenized {
    /// What the model generates from.
    pub tokens: Vec<u32>,
    /// What the gate reads instead of `tokens` (each alone; empty: `tokens`).
    pub gate_views: Vec<Vec<u32>>,
    /// The last this many of `gate_views` read the request's system and developer messages
    /// (a policy may leave them unread: `gate_system_prompts`).
    pub context_views: usize,
}

/// One request for the backend.
#[derive(Debug)]
pub struct Job {
    /// Prompt token ids from [`Backend::tokenize`].
    pub tokens: Vec<u32>,
    /// What the gate reads instead of the prompt ([`Tokenized::gate_views`]).
    pub gate_views: Vec<Vec<u32>>,
    /// New tokens at most.
    pub max_new_tokens: usize,
    /// Tokens at most of text the sidecar writes itself (a steered answer's refusal sentence or
    /// fallback): `max_new_tokens` when the client set `max_tokens`, else unlimited (the
    /// server's default limit bounds generation's cost, which written text does not have).
    pub max_written_tokens: usize,
    /// Stop strings.
    pub stop: Vec<String>,
    /// An answer that opens with this is not cut by `stop` (a tool call's opening tag, when
    /// the request offers tools: see `GenerationParams::stop_exempt`).
    pub stop_exempt: Option<String>,
    /// Token choice.
    pub sampling: SamplingParams,
    /// The shape the answer must take. A request that asks for JSON is never steered (see
    /// `ApiRequest::steerable`): its policy blocks where it would steer.
    pub response_format: ResponseFormat,
    /// Report each generated token's log-probability and this many alternatives
    /// ([`BackendEvent::Logprobs`]). Such a request is steered only under a policy that passes
    /// steered answers on as generated (`ApiRequest::steerable`).
    pub logprobs: Option<usize>,
    /// Also score the prompt's tokens after the first, each with this many alternatives
    /// ([`BackendEvent::PromptLogprobs`]; `/v1/completions` with `echo` and `logprobs`).
    pub prompt_logprobs: Option<usize>,
    /// The policy the request runs under (`off` = no gate).
    pub policy: Arc<Policy>,
    /// The gate's decision for this request, made already (for another of its choices, `n`):
    /// no gate runs and no `Gate` event comes; `Steer` steers it as the gate would have,
    /// anything else generates it unsteered.
    pub decided: Option<Action>,
    /// What follows the gate: in `local` mode the backend generates unless the decision
    /// blocks; in `proxy` mode it generates only when the decision steers and otherwise ends
    /// after the gate (the proxy forwards or refuses).
    pub mode: ServeMode,
    /// Where events go. Dropping the receiver cancels the job.
    pub events: UnboundedSender<BackendEvent>,
}

/// The gate's verdict with what the backend applies.
#[derive(Debug, Clone, PartialEq)]
pub struct GateReport {
    /// The decision under the job's policy.
    pub decision: Decision,
    /// Layer (0-based) whose residual was read.
    pub layer: usize,
    /// Steering strength applied when the decision steers.
    pub alpha: f32,
    /// Layers steered when the decision steers.
    pub layers: Vec<usize>,
}

/// What a job reports. `Gate` comes first when the policy gates; exactly one `Finished` or
/// `Failed` ends the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendEvent {
    /// The gate decided.
    Gate(GateReport),
    /// Final text of one or more tokens.
    Text(String),
    /// A generated token's log-probability, when [`Job::logprobs`] asks for them: it comes
    /// before the token's text (which may come later, held back for a stop string).
    Logprobs(TokenLogprob),
    /// The prompt's tokens after the first, scored, when [`Job::prompt_logprobs`] asks for
    /// them: once, before the answer's first event.
    PromptLogprobs(Vec<TokenLogprob>),
    /// The job ended.
    Finished {
        /// Why.
        reason: FinishReason,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens.
        completion_tokens: usize,
        /// How a steered answer held by the policy's `steered_answers` ended.
        steered: Option<SteeredAnswer>,
    },
    /// The job failed.
    Failed(BackendError),
}

/// A token as OpenAI's log-probabilities show it: its text, its bytes and its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprob {
    /// The token's text (a part of a character shows as U+FFFD; `bytes` has it whole).
    pub token: String,
    /// The token's bytes.
    pub bytes: Vec<u8>,
    /// Its log-probability under the model (before temperature, penalties and bias).
    pub logprob: f32,
}

/// A generated token's log-probability, and the most likely tokens at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The generated token.
    pub chosen: Logprob,
    /// The most likely tokens, best first.
    pub top: Vec<Logprob>,
}

impl TokenLogprob {
    /// A prompt's first token as `echo` shows it: nothing comes before it, so it has no
    /// log-probability (NaN here, `null` in the API) and no alternatives.
    pub fn unscored(token: String, bytes: Vec<u8>) -> Self {
        Self {
            chosen: Logprob {
                token,
                bytes,
                logprob: f32::NAN,
            },
            top: Vec::new(),
        }
    }

    /// Whether the token has a log-probability (see [`Self::unscored`]).
    pub fn is_scored(&self) -> bool {
        !self.chosen.logprob.is_nan()
    }
}

/// How a steered answer held by the policy's `steered_answers` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SteeredAnswer {
    /// Its own refusal, the fallback or as generated.
    pub ending: SteeredEnding,
    /// Times it was steered again at another strength first (the policy's `retry_scales`).
    pub retries: usize,
}

/// Kinds of backend failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendErrorKind {
    /// The request cannot be served as given (e.g. it does not fit the context).
    InvalidRequest,
    /// The engine queue is full.
    Overloaded,
    /// The engine has stopped.
    Unavailable,
    /// The model failed while running.
    Model,
}

/// A backend failure with a message for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    /// What kind.
    pub kind: BackendErrorKind,
    /// What happened.
    pub message: String,
    /// The request field at fault (an invalid request's `param`), when the backend knows it.
    pub param: Option<&'static str>,
}

impl BackendError {
    /// A failure of `kind`.
    pub fn new(kind: BackendErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
        }
    }

    /// The same failure, about the request field `param`.
    pub fn about(self, param: Option<&'static str>) -> Self {
        Self { param, ..self }
    }
}

/// Facts about the served model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// Model id as served.
    pub id: String,
    /// Context length in tokens.
    pub context_length: usize,
    /// Tokens in the vocabulary (token ids are below it).
    pub vocab_size: usize,
    /// Whether a steering pack is loaded (without one, every policy acts as `off`).
    pub has_pack: bool,
}

/// The model: tokenization, gating, generation.
///
/// *When*: `tokenize` is called on the async runtime for every API request (it must be cheap:
/// no model run); `submit` hands the job over without blocking and reports through
/// [`Job::events`] from the backend's own thread.
pub trait Backend: Send + Sync + 'static {
    /// The served model.
    fn info(&self) -> &ModelInfo;
    /// Render (chat template) and tokenize a prompt, and its gate view.
    fn tokenize(&self, prompt: &Prompt) -> Result<Tokenized, BackendError>;
    /// The text of token ids (`echo` of a prompt sent as token ids).
    fn detokenize(&self, tokens: &[u32]) -> Result<String, BackendError>;
    /// Queue a job; a full queue is [`BackendErrorKind::Overloaded`].
    fn submit(&self, job: Job) -> Result<(), BackendError>;
}
