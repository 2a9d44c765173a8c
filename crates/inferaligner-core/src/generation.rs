//! The vocabulary a generation request and its end share between the runtime (which
//! generates) and the proxy (which speaks OpenAI): how tokens are chosen and why an answer ended.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How to pick tokens. The default is greedy decoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1 keeps all.
    pub top_p: f32,
    /// Seed for reproducible sampling; without one, a seed is drawn from the OS.
    pub seed: Option<u64>,
    /// Hugging Face repetition penalty over prompt and output tokens; 1 is off.
    pub repetition_penalty: f32,
    /// OpenAI frequency penalty: subtracted once per earlier occurrence in the output.
    pub frequency_penalty: f32,
    /// OpenAI presence penalty: subtracted once if the token occurred in the output.
    pub presence_penalty: f32,
    /// OpenAI `logit_bias`: added to a token's logit before every choice (−100 bans it,
    /// +100 all but forces it).
    pub logit_bias: BTreeMap<u32, f32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: BTreeMap::new(),
        }
    }
}

impl SamplingParams {
    /// Reject values outside the ranges the OpenAI API and transformers accept.
    pub fn validate(&self) -> Result<(), String> {
        let bad = |what: &str| Err(what.to_owned());
        if !(0.0..=2.0).contains(&self.temperature) {
            return bad("temperature must be between 0 and 2");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad("repetition_penalty must be positive");
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty)
            || !(-2.0..=2.0).contains(&self.presence_penalty)
        {
            return bad("frequency_penalty and presence_penalty must be between -2 and 2");
        }
        if self
            .logit_bias
            .values()
            .any(|b| !(-100.0..=100.0).contains(b))
        {
            return bad("logit_bias values must be between -100 and 100");
        }
        Ok(())
    }

    /// Whether decoding is deterministic argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// The roles a chat message may have (the OpenAI API's).
pub const MESSAGE_ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// The shape an answer must take (OpenAI's `response_format`): free text, any JSON object, or
/// JSON that a schema accepts. The runtime holds generation to it token by token.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Free text.
    #[default]
    Text,
    /// A JSON object (JSON mode).
    JsonObject,
    /// JSON valid under `json_schema.schema` (structured outputs).
    JsonSchema {
        /// The schema and its name.
        json_schema: JsonSchemaFormat,
    },
    /// Text that a grammar in llguidance's Lark dialect accepts: not an API format, the
    /// sidecar's own for tool calls ([`crate::Tools::grammar`]).
    Grammar {
        /// The grammar.
        lark: String,
    },
}

impl ResponseFormat {
    /// Whether the answer must be JSON.
    pub fn is_json(&self) -> bool {
        matches!(self, Self::JsonObject | Self::JsonSchema { .. })
    }

    /// Whether the answer is held to a grammar (JSON, or [`ResponseFormat::Grammar`]).
    pub fn is_constrained(&self) -> bool {
        !matches!(self, Self::Text)
    }
}

/// `response_format.json_schema`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    /// The schema's name (required by the API; not used to generate).
    pub name: String,
    /// What the schema is for (not used to generate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The JSON Schema; absent: any JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<serde_json::Value>,
    /// OpenAI's strict mode; the answer is held to the schema either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// Why generation ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An EOS token or a stop string.
    Stop,
    /// `max_new_tokens` or the context length.
    Length,
    /// The receiver asked to stop (e.g. the client went away).
    Cancelled,
    /// The gate ended the request after its partial prefill (the runtime's `AfterGate::End`).
    Gated,
}

/// `text` the sidecar writes itself (a policy's refusal, a steered answer's refusal sentence or
/// fallback) cut as the request's limits would have cut a generated answer: before the first of
/// `stop`, then to the longest prefix (at a char boundary) of at most `max_tokens` tokens as
/// `tokens` counts them. Returns the text and the finish reason when it was cut.
pub fn within_limits(
    text: &str,
    stop: &[String],
    max_tokens: usize,
    tokens: impl Fn(&str) -> usize,
) -> (String, Option<FinishReason>) {
    let mut text = text;
    let mut cut = None;
    if let Some(at) = (stop.iter())
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
    {
        text = &text[..at];
        cut = Some(FinishReason::Stop);
    }
    if tokens(text) > max_tokens {
        let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
        let fits = bounds.partition_point(|&b| tokens(&text[..b]) <= max_tokens);
        text = &text[..bounds[fits.saturating_sub(1)]];
        cut = Some(FinishReason::Length);
    }
    (text.to_owned(), cut)
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn written_text_obeys_stop_strings_and_the_token_limit() {
        // one token a word, for the test
        let words = |t: &str| t.split_whitespace().count();
        let refusal = "I'm sorry, but I can't help with that request.";
        assert_eq!(
            within_limits(refusal, &[], 100, words),
            (refusal.into(), None)
        );
        assert_eq!(
            within_limits(refusal, &["sorry".into()], 100, words),
            ("I'm ".into(), Some(FinishReason::Stop))
        );
        let (cut, why) = within_limits(refusal, &[], 2, words);
        assert_eq!(
            (cut.trim_end(), why),
            ("I'm sorry,", Some(FinishReason::Length))
        );
        assert!(words(&cut) <= 2);
        assert_eq!(
            within_limits("", &["x".into()], 0, words),
            (String::new(), None)
        );
    }
}
