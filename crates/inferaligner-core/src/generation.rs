//! The vocabulary a generation request and its end share between the runtime (which
//! generates) and the proxy (which speaks OpenAI): how tokens are chosen and why an answer ended.

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
        Ok(())
    }

    /// Whether decoding is deterministic argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
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
