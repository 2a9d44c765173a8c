//! Which request fields the sidecar knows, and which of them ask for an answer its own
//! generator cannot write (tool calls, more than 16 choices, audio, …).

use serde::Deserialize;
use serde_json::Value;

/// Every top-level request field the sidecar knows: those it reads, those it refuses when it
/// writes the answer ([`AnswerShaping`]), and those that ask nothing of an answer it writes.
/// Anything else is refused where the sidecar writes the answer: it never drops a field.
pub(super) const REQUEST_FIELDS: &[&str] = &[
    "messages",
    "prompt",
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "stop",
    "n",
    // read: log-probabilities and logit bias
    "logprobs",
    "top_logprobs",
    "logit_bias",
    // read: tools
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    // answer-shaping (refused when asked for)
    "response_format",
    "echo",
    "suffix",
    "best_of",
    "audio",
    "prediction",
    "modalities",
    "reasoning_effort",
    "verbosity",
    "web_search_options",
    // accepted without effect on an answer the sidecar writes: identification, storage and
    // routing hints (it stores nothing and has one tier)
    "user",
    "safety_identifier",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
];

/// Most choices (`n`) the sidecar's own generator writes for one request: each is a sequence
/// of the batch, so a request's cost grows with it.
pub(crate) const MAX_CHOICES: u32 = 16;

/// OpenAI request fields that shape the answer in ways the local generator does not implement
/// (more than 16 choices, audio, `echo` on chat, …). Read as raw JSON: only
/// whether they ask for something matters here.
#[derive(Debug, Default, Deserialize)]
pub(super) struct AnswerShaping {
    #[serde(default)]
    echo: Option<Value>,
    #[serde(default)]
    suffix: Option<Value>,
    #[serde(default)]
    best_of: Option<Value>,
    #[serde(default)]
    audio: Option<Value>,
    #[serde(default)]
    prediction: Option<Value>,
    #[serde(default)]
    modalities: Option<Value>,
    #[serde(default)]
    reasoning_effort: Option<Value>,
    #[serde(default)]
    verbosity: Option<Value>,
    #[serde(default)]
    web_search_options: Option<Value>,
}

impl AnswerShaping {
    /// The first field that asks for something beyond plain text, if any, other than what the
    /// generator does for this request (`served`). Values that ask for nothing (`false`, `0`,
    /// `null`, empty, `"none"`, `{"type": "text"}`, `best_of: 1`) pass.
    pub(super) fn first_requested(&self, n: Option<u32>, served: Served) -> Option<&'static str> {
        let asks = |v: &Option<Value>| v.as_ref().is_some_and(asks);
        let text_only = self.modalities.as_ref().is_none_or(|m| match m {
            Value::Null => true,
            Value::Array(a) => a.iter().all(|x| x == "text"),
            _ => false,
        });
        let single = |v: &Option<Value>| {
            v.as_ref()
                .is_none_or(|v| v.is_null() || v.as_u64() == Some(1))
        };
        [
            ("n", n.is_some_and(|n| n > MAX_CHOICES)),
            ("best_of", !served.best_of && !single(&self.best_of)),
            ("response_format", !served.format),
            ("echo", !served.echo && asks(&self.echo)),
            ("suffix", asks(&self.suffix)),
            ("audio", asks(&self.audio)),
            ("prediction", asks(&self.prediction)),
            ("modalities", !text_only),
            ("reasoning_effort", asks(&self.reasoning_effort)),
            ("verbosity", asks(&self.verbosity)),
            // present at all, even `{}`, it turns web search on
            (
                "web_search_options",
                self.web_search_options
                    .as_ref()
                    .is_some_and(|v| !v.is_null()),
            ),
        ]
        .into_iter()
        .find_map(|(name, asked)| asked.then_some(name))
    }
}

/// What the generator does for a request beyond plain text, by field: they are not refused.
#[derive(Debug, Clone, Copy)]
pub(super) struct Served {
    /// Its `response_format` (text, JSON mode, a JSON schema).
    pub format: bool,
    /// `echo` (completions).
    pub echo: bool,
    /// `best_of` up to [`MAX_CHOICES`] (completions).
    pub best_of: bool,
}

/// Whether a field's value asks for something: not `null`, `false`, `0`, empty, or `"none"`.
pub(super) fn asks(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => false,
        Value::Number(x) => x.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty() && s != "none",
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::Bool(true) => true,
    }
}

/// The first top-level field of `body` that is not in [`REQUEST_FIELDS`] and asks for
/// something (not `null`), cut to 64 characters: it goes into an error message.
pub(super) fn first_unknown(body: &Value) -> Option<String> {
    body.as_object()?
        .iter()
        .find(|(k, v)| !v.is_null() && !REQUEST_FIELDS.contains(&k.as_str()))
        .map(|(k, _)| k.chars().take(64).collect())
}
