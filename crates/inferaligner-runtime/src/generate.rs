//! Per-sequence generation state: sampling, stop conditions, streamed text.

use std::ops::ControlFlow;

pub use inferaligner_core::FinishReason;
use inferaligner_core::ResponseFormat;
use serde::{Deserialize, Serialize};

use crate::chat::{ChatTokenizer, Detokenizer};
use crate::hook::RowContext;
use crate::sampling::{self, Sampler, SamplingParams};
use crate::structured::Constraint;
use crate::{Result, RuntimeError};

/// What to generate and when to stop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationParams {
    /// Most tokens to generate (further capped by the context length).
    pub max_new_tokens: usize,
    /// Strings that end generation; the text is cut before the first one.
    pub stop: Vec<String>,
    /// An answer that opens with this (after whitespace) is not cut by `stop`: a tool call's
    /// opening tag, when the grammar holds an answer that opens a call to calls, and a stop
    /// string met inside their JSON (`"\n"`, `"}"`) would break them. Until the answer's start
    /// tells, its text is held.
    pub stop_exempt: Option<String>,
    /// Keep generating past EOS tokens (benchmarks).
    pub ignore_eos: bool,
    /// Token choice.
    pub sampling: SamplingParams,
    /// The shape the answer must take (free text, or JSON a schema accepts).
    pub response_format: ResponseFormat,
    /// Report each token's log-probability and those of this many most likely tokens at its
    /// position ([`TokenLogprobs`]); `None` reports none.
    pub logprobs: Option<usize>,
    /// Report the log-probability of each prompt token after the first, given the tokens
    /// before it, and those of this many most likely tokens at its position
    /// ([`GenerationEvent::PromptLogprobs`]; OpenAI's `echo` with `logprobs`). The prompt then
    /// reuses only prefix-cache blocks an earlier scored prompt stored (they keep the head's
    /// inputs; see [`crate::PrefixCache`]).
    pub prompt_logprobs: Option<usize>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            stop: Vec::new(),
            stop_exempt: None,
            ignore_eos: false,
            sampling: SamplingParams::default(),
            response_format: ResponseFormat::Text,
            logprobs: None,
            prompt_logprobs: None,
        }
    }
}

/// Token counts of a finished sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens (including a final EOS).
    pub completion_tokens: usize,
}

/// What a sequence reports while it runs. Exactly one `Finished` or `Failed` ends the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// The prompt's tokens after the first, scored by the model, when
    /// [`GenerationParams::prompt_logprobs`] asks for them: once, before the first token.
    PromptLogprobs(Vec<TokenLogprobs>),
    /// New text (possibly empty while a multi-byte character or a possible stop string is held
    /// back) and the token that produced it.
    Token {
        /// The sampled token.
        id: u32,
        /// Text that is now final.
        text: String,
        /// The token's log-probability, when [`GenerationParams::logprobs`] asks for it.
        logprobs: Option<TokenLogprobs>,
    },
    /// The sequence ended normally.
    Finished {
        /// Why it ended.
        reason: FinishReason,
        /// Token counts.
        usage: Usage,
        /// Text held back for a possible stop string that turned out not to be one.
        tail: String,
    },
    /// The sequence failed; nothing more follows.
    Failed {
        /// What kind of failure.
        kind: crate::ErrorKind,
        /// Human-readable message.
        message: String,
        /// The request field at fault, for an input error that names one.
        field: Option<&'static str>,
    },
}

impl GenerationEvent {
    /// The event that ends a request with `error`.
    pub fn failed(error: &RuntimeError) -> Self {
        Self::Failed {
            kind: error.kind(),
            message: error.to_string(),
            field: error.field(),
        }
    }
}

/// A generated token's log-probability under the model's own distribution (before
/// temperature, penalties, logit bias and a grammar's mask, as vLLM reports by default), and
/// the most likely tokens at its position with theirs, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The generated token's.
    pub logprob: f32,
    /// The most likely tokens' ids and log-probabilities.
    pub top: Vec<(u32, f32)>,
}

/// Receives events; returning `Break` cancels the sequence.
pub type EventSink = Box<dyn FnMut(GenerationEvent) -> ControlFlow<()> + Send>;

/// One request to the engine.
pub struct GenerationRequest {
    /// Prompt token ids (already rendered and tokenized).
    pub prompt: Vec<u32>,
    /// Limits, stops and sampling.
    pub params: GenerationParams,
    /// Per-row hook parameters.
    pub row: RowContext,
    /// Decide the row's parameters from its prompt, after a partial prefill (gating).
    pub gate: Option<EarlyExit>,
    /// Where events go.
    pub sink: EventSink,
}

impl std::fmt::Debug for GenerationRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerationRequest")
            .field("prompt_tokens", &self.prompt.len())
            .field("params", &self.params)
            .field("row", &self.row)
            .field("gate", &self.gate.as_ref().map(|g| g.after_layer))
            .finish()
    }
}

/// How a request goes on after its early exit (the runtime's side of a gate decision: the
/// decision itself is the core's `Decision`).
#[derive(Debug, Clone)]
pub enum AfterGate {
    /// Finish the prefill and generate, with these hook parameters for the row.
    Generate(RowContext),
    /// Stop here: the request ends with [`FinishReason::Gated`] and no tokens (a proxy that only
    /// needed the decision, or a request answered without generating).
    End,
}

/// Maps the gate's activation at the gate layer (the last token's residual, followed by the
/// mean over the tokens from [`EarlyExit::mean_from`] when set) to how the request goes on.
/// With [`EarlyExit::more_views`], one activation per view, in order, end to end.
pub type EarlyExitFn = Box<dyn FnOnce(&[f32]) -> AfterGate + Send>;

/// Early exit for gating: the prefill stops after `after_layer`, `decide` sees the gate's
/// activation there and returns the row's hook parameters for the rest of the request.
/// (The gate itself, direction and bias, is the core's `Gate`; this is where the runtime calls
/// it.)
pub struct EarlyExit {
    /// A layer that ends a segment.
    pub after_layer: usize,
    /// Tokens the gate reads instead of the prompt (its *gate view*, e.g. the last user turn
    /// alone): they run up to the gate layer in a cache of their own, which is then dropped,
    /// and the prompt prefills after the decision. `None`: the gate reads the prompt itself,
    /// in the same pass as the prefill.
    pub view: Option<Vec<u32>>,
    /// `None`: the gate reads the last token's residual. `Some(i)`: the last token's residual
    /// followed by the mean residual over the gate's tokens (the view's, or the prompt's) from
    /// index `i` to the end (`i` is clamped to the last token), `2 × hidden` values. The prefix
    /// cache is then used only for tokens before `i`, whose residuals the mean does not need.
    pub mean_from: Option<usize>,
    /// Further views (with their `mean_from`), each read alone after `view` in a cache of its
    /// own, so that `decide` can score several readings of one request (e.g. the first and the
    /// last paragraph of a long message) and take the highest. Needs `view`.
    pub more_views: Vec<(Vec<u32>, Option<usize>)>,
    /// Called once, on the engine thread.
    pub decide: EarlyExitFn,
}

/// A sequence being generated.
pub(crate) struct Sequence {
    pub(crate) prompt_len: usize,
    pub(crate) last_token: u32,
    pub(crate) generated: usize,
    pub(crate) max_new_tokens: usize,
    pub(crate) row: RowContext,
    sampler: Sampler,
    /// The answer's grammar (`response_format`), if it has one.
    constraint: Option<Constraint>,
    /// Alternatives to report with each token's log-probability, if asked.
    logprobs: Option<usize>,
    detok: Detokenizer,
    stop: Vec<String>,
    /// Whether [`GenerationParams::stop_exempt`] spares this answer, once its start tells.
    stop_exempt: Exempt,
    eos: Vec<u32>,
    ignore_eos: bool,
    /// Final text not yet sent (held back as a possible stop-string prefix).
    pending: String,
    /// A stop string ended the sequence.
    stopped: bool,
    sink: EventSink,
}

impl Sequence {
    /// `max_new_tokens` is already capped by the room left in the context; `constraint` is
    /// the grammar of `params.response_format`.
    pub(crate) fn new(
        prompt: &[u32],
        (params, constraint): (GenerationParams, Option<Constraint>),
        row: RowContext,
        eos: Vec<u32>,
        max_new_tokens: usize,
        sink: EventSink,
    ) -> Self {
        let row = RowContext {
            generating: true,
            ..row
        };
        Self {
            prompt_len: prompt.len(),
            last_token: prompt.last().copied().unwrap_or(0),
            generated: 0,
            max_new_tokens,
            row,
            sampler: Sampler::new(params.sampling, prompt),
            constraint,
            logprobs: params.logprobs,
            detok: Detokenizer::default(),
            // with no stop string there is nothing to be spared
            stop_exempt: match params.stop_exempt {
                Some(open) if !open.is_empty() && params.stop.iter().any(|s| !s.is_empty()) => {
                    Exempt::Undecided(open)
                }
                _ => Exempt::Decided(false),
            },
            stop: params.stop.into_iter().filter(|s| !s.is_empty()).collect(),
            eos,
            ignore_eos: params.ignore_eos,
            pending: String::new(),
            stopped: false,
            sink,
        }
    }

    /// KV slots this sequence may grow to: its prompt and every token it may generate.
    pub(crate) fn reserved(&self) -> usize {
        self.prompt_len + self.max_new_tokens
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated,
        }
    }

    /// Sample from this row's logits, report, and say whether the sequence is done.
    pub(crate) fn advance(&mut self, tokenizer: &ChatTokenizer, logits: &mut [f32]) -> bool {
        // the model's own distribution, before the mask and the sampler change the logits
        let raw = self.logprobs.map(|_| logits.to_vec());
        if let Some(Err(e)) = self.constraint.as_mut().map(|c| c.mask(logits)) {
            return self.fail(&e);
        }
        let token = self.sampler.sample(logits);
        let logprobs = raw.zip(self.logprobs).map(|(raw, top)| {
            let (logprob, top) = sampling::logprobs(&raw, token, top);
            TokenLogprobs { logprob, top }
        });
        self.last_token = token;
        self.generated += 1;
        if !self.ignore_eos && self.eos.contains(&token) {
            return self.finish(tokenizer, FinishReason::Stop);
        }
        // the grammar is complete once nothing but the end may follow
        let complete = match self.constraint.as_mut().map(|c| c.accept(token)) {
            Some(Err(e)) => return self.fail(&e),
            Some(Ok(complete)) => complete,
            None => false,
        };
        match self.detok.push(tokenizer, token) {
            Ok(Some(text)) => {
                self.pending.push_str(&text);
                // undecided, nothing has been sent: `pending` is the whole answer
                self.stop_exempt.read(&self.pending);
            }
            Ok(None) => {}
            Err(e) => return self.fail(&e),
        }
        // A stop string cuts the text before it and ends the sequence (once the answer's start
        // has told that it is not exempt).
        let stops = self.stop_exempt == Exempt::Decided(false);
        if let Some(cut) = (self.stop.iter())
            .filter(|_| stops)
            .filter_map(|s| self.pending.find(s))
            .min()
        {
            self.pending.truncate(cut);
            let text = std::mem::take(&mut self.pending);
            let event = GenerationEvent::Token {
                id: token,
                text,
                logprobs,
            };
            if (self.sink)(event).is_break() {
                return self.finish(tokenizer, FinishReason::Cancelled);
            }
            self.stopped = true;
            return self.finish(tokenizer, FinishReason::Stop);
        }
        let hold = self.held_back();
        let text: String = self.pending.drain(..self.pending.len() - hold).collect();
        let event = GenerationEvent::Token {
            id: token,
            text,
            logprobs,
        };
        if (self.sink)(event).is_break() {
            return self.finish(tokenizer, FinishReason::Cancelled);
        }
        if complete {
            return self.finish(tokenizer, FinishReason::Stop);
        }
        if self.generated >= self.max_new_tokens {
            return self.finish(tokenizer, FinishReason::Length);
        }
        false
    }

    /// Bytes at the end of `pending` that could start a stop string (all of it while the
    /// answer's start has not told whether stop strings apply).
    fn held_back(&self) -> usize {
        let p = &self.pending;
        match self.stop_exempt {
            Exempt::Decided(true) => return 0,
            Exempt::Undecided(_) => return p.len(),
            Exempt::Decided(false) => {}
        }
        self.stop
            .iter()
            .flat_map(|s| {
                (1..s.len().min(p.len() + 1))
                    .rev()
                    .filter(move |&n| s.is_char_boundary(n) && p.ends_with(&s[..n]))
                    .take(1)
            })
            .max()
            .unwrap_or(0)
    }

    pub(crate) fn finish(&mut self, tokenizer: &ChatTokenizer, reason: FinishReason) -> bool {
        let usage = self.usage();
        // After a stop string the rest of the text is cut, held-back bytes included.
        if !self.stopped {
            match self.detok.flush(tokenizer) {
                Ok(rest) => self.pending.push_str(&rest),
                Err(e) => return self.fail(&e),
            }
        }
        let tail = std::mem::take(&mut self.pending);
        let _ = (self.sink)(GenerationEvent::Finished {
            reason,
            usage,
            tail,
        });
        true
    }

    pub(crate) fn fail(&mut self, e: &RuntimeError) -> bool {
        let _ = (self.sink)(GenerationEvent::failed(e));
        true
    }
}

/// Room left for new tokens after a prompt, and a clear error when there is none.
pub(crate) fn room_for(prompt_len: usize, context: usize, requested: usize) -> Result<usize> {
    if prompt_len == 0 {
        return Err(RuntimeError::Input("empty prompt".into()));
    }
    if prompt_len >= context {
        return Err(RuntimeError::Input(format!(
            "prompt of {prompt_len} tokens does not fit the context length {context}"
        )));
    }
    // 0 new tokens: the prompt alone is computed (to score it, `prompt_logprobs`)
    Ok(requested.min(context - prompt_len))
}

/// Whether stop strings spare an answer ([`GenerationParams::stop_exempt`]).
#[derive(Debug, PartialEq, Eq)]
enum Exempt {
    /// Its start has not told yet whether it opens with this prefix.
    Undecided(String),
    /// It opens with the prefix (`true`), or cannot (`false`, also when there is none).
    Decided(bool),
}

impl Exempt {
    /// Decide, if it can, from `answer`, the answer's whole text so far.
    fn read(&mut self, answer: &str) {
        if let Exempt::Undecided(open) = self {
            let start = answer.trim_start();
            if start.starts_with(open.as_str()) {
                *self = Exempt::Decided(true);
            } else if !open.starts_with(start) {
                *self = Exempt::Decided(false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Exempt;

    #[test]
    fn an_answer_is_spared_by_stop_strings_once_it_opens_with_the_prefix() {
        let read = |pieces: &[&str]| {
            let mut e = Exempt::Undecided("<tool_call>".into());
            let mut answer = String::new();
            for p in pieces {
                answer.push_str(p);
                e.read(&answer);
            }
            e
        };
        for open in [
            &["<tool_call>"][..],
            &["\n ", "<tool", "_call>\n{"],
            &["<", "tool_call>"],
        ] {
            assert_eq!(read(open), Exempt::Decided(true), "{open:?}");
        }
        for text in [&["Sure"][..], &["<to", " do>"], &["\n", "I"]] {
            assert_eq!(read(text), Exempt::Decided(false), "{text:?}");
        }
        // not yet told: nothing, whitespace, the start of the tag
        for pending in [&[][..], &["\n  "], &["<tool_"]] {
            assert!(matches!(read(pending), Exempt::Undecided(_)), "{pending:?}");
        }
    }
}
