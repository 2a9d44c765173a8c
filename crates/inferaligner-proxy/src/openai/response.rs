//! Response bodies and SSE chunks in OpenAI's shapes.

use serde_json::{Value, json};

use super::Endpoint;
use crate::backend::{Logprob, TokenLogprob};
use inferaligner_core::{FinishReason, ToolCall};

/// OpenAI's `finish_reason`.
pub fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        // a cancelled answer has no reader; a gated one is complete as sent
        FinishReason::Stop | FinishReason::Gated | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
    }
}

/// Identity of one response: id, creation time, model.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    /// `chatcmpl-…` or `cmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// Model id.
    pub model: String,
    /// Endpoint.
    pub endpoint: Endpoint,
    /// The request offered legacy `functions`: a call is written as `function_call`.
    pub functions: bool,
}

impl ResponseMeta {
    /// A fresh id for `endpoint`.
    pub fn new(endpoint: Endpoint, model: String) -> Self {
        let prefix = match endpoint {
            // a Response is written as chat, then rewritten (`responses`)
            Endpoint::Chat | Endpoint::Responses => "chatcmpl",
            Endpoint::Completions => "cmpl",
        };
        Self {
            id: format!("{prefix}-{:016x}{:016x}", unique(), unique()),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model,
            endpoint,
            functions: false,
        }
    }

    /// The `finish_reason` of an answer that calls: `tool_calls`, or `function_call` for
    /// legacy functions.
    pub fn calls_finish_reason(&self) -> &'static str {
        if self.functions {
            "function_call"
        } else {
            "tool_calls"
        }
    }

    /// `calls` as the message's or the delta's fields: `tool_calls`, or legacy functions' one
    /// `function_call` (their grammar allows one call an answer).
    /// `from`: a stream's calls are numbered (`index`), from there.
    fn calls_fields(&self, calls: &[ToolCall], from: Option<usize>) -> Value {
        match (self.functions, calls.first()) {
            (true, Some(c)) => json!({
                "content": null,
                "function_call": {"name": c.name, "arguments": c.arguments},
            }),
            _ => json!({"content": null, "tool_calls": tool_calls(calls, from)}),
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat | Endpoint::Responses, false) => "chat.completion",
            (Endpoint::Chat | Endpoint::Responses, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// A whole response with nothing to show (`content: null`): an answer cut short in its
    /// first tool call, whose text is markup and which makes no call.
    pub fn nothing(&self, finish: FinishReason, usage: (usize, usize)) -> Value {
        let mut v = self.response("", finish, usage);
        v["choices"][0]["message"]["content"] = Value::Null;
        v
    }

    /// A whole (non-streaming) response.
    pub fn response(&self, text: &str, finish: FinishReason, usage: (usize, usize)) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat | Endpoint::Responses => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish_reason(finish),
            }),
            Endpoint::Completions => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish_reason(finish),
            }),
        };
        let mut v = self.envelope(false, json!([choice]));
        v["usage"] = usage_json(usage);
        v
    }

    /// A whole chat response whose answer is a refusal in the message's `refusal` field (no
    /// `content`), as OpenAI's structured outputs refuse.
    pub fn refusal(&self, text: &str, finish: FinishReason, usage: (usize, usize)) -> Value {
        let mut v = self.response(text, finish, usage);
        v["choices"][0]["message"] = json!({"role": "assistant", "content": null, "refusal": text});
        v
    }

    /// The streamed chunk of such a refusal (`delta.refusal`), with the assistant role.
    pub fn refusal_chunk(&self, text: &str) -> Value {
        let mut v = self.chunk("", true, None);
        v["choices"][0]["delta"] = json!({"role": "assistant", "content": null, "refusal": text});
        v
    }

    /// A whole chat response whose answer is `calls` (`tool_calls` or `function_call`, no
    /// `content`), finished for `finish` ([`Self::calls_finish_reason`], or `length` when the
    /// answer was cut after them).
    pub fn calls(&self, calls: &[ToolCall], finish: &str, usage: (usize, usize)) -> Value {
        let mut v = self.response("", FinishReason::Stop, usage);
        let mut message = self.calls_fields(calls, None);
        message["role"] = json!("assistant");
        v["choices"][0]["message"] = message;
        v["choices"][0]["finish_reason"] = json!(finish);
        v
    }

    /// A streamed chunk of an answer that calls tools: `calls`, the answer's calls from number
    /// `from` on (a stream sends each as it closes), with the assistant role when they open
    /// the answer (`first`).
    pub fn calls_chunk(&self, calls: &[ToolCall], from: usize, first: bool) -> Value {
        let mut v = self.chunk("", first, None);
        let mut delta = self.calls_fields(calls, Some(from));
        if first {
            delta["role"] = json!("assistant");
        }
        v["choices"][0]["delta"] = delta;
        v
    }

    /// The last streamed chunk of an answer that called tools, finished for `finish`.
    pub fn calls_end(&self, finish: &str) -> Value {
        let mut end = self.chunk("", false, Some(FinishReason::Stop));
        end["choices"][0]["finish_reason"] = json!(finish);
        end
    }

    /// A streamed chunk: `text` as a delta, and the finish reason on the last one. The first
    /// chat chunk carries the assistant role.
    pub fn chunk(&self, text: &str, first: bool, finish: Option<FinishReason>) -> Value {
        let reason = finish.map(finish_reason);
        let choice = match self.endpoint {
            Endpoint::Chat | Endpoint::Responses => {
                let delta = if first {
                    json!({"role": "assistant", "content": text})
                } else if finish.is_some() && text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason})
            }
            Endpoint::Completions => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": reason})
            }
        };
        self.envelope(true, json!([choice]))
    }

    /// The `logprobs` of a choice whose tokens are `entries`, in the endpoint's shape (chat:
    /// `content`; completions: `tokens`, `token_logprobs`, `top_logprobs` with the token's own
    /// beside its alternatives, `text_offset`). `offset` counts the characters of the tokens
    /// before these (a stream's earlier chunks) and is moved past them.
    pub fn logprobs(&self, entries: &[TokenLogprob], offset: &mut usize) -> Value {
        match self.endpoint {
            Endpoint::Chat | Endpoint::Responses => {
                let one = |l: &Logprob| json!({"token": l.token, "logprob": finite(l.logprob), "bytes": l.bytes});
                let content: Vec<Value> = entries
                    .iter()
                    .map(|e| {
                        let mut v = one(&e.chosen);
                        v["top_logprobs"] = e.top.iter().map(one).collect();
                        v
                    })
                    .collect();
                json!({"content": content, "refusal": null})
            }
            Endpoint::Completions => {
                let mut text_offset = Vec::with_capacity(entries.len());
                for e in entries {
                    text_offset.push(*offset);
                    *offset += e.chosen.token.chars().count();
                }
                // an echoed prompt's first token has neither (`null`, as OpenAI shows it)
                let top: Vec<Value> = entries
                    .iter()
                    .map(|e| {
                        let mut m = serde_json::Map::new();
                        for l in e.top.iter().chain([&e.chosen]) {
                            m.insert(l.token.clone(), json!(finite(l.logprob)));
                        }
                        if e.is_scored() {
                            Value::Object(m)
                        } else {
                            Value::Null
                        }
                    })
                    .collect();
                let own = |e: &TokenLogprob| e.is_scored().then(|| finite(e.chosen.logprob));
                json!({
                    "tokens": entries.iter().map(|e| &e.chosen.token).collect::<Vec<_>>(),
                    "token_logprobs": entries.iter().map(own).collect::<Vec<_>>(),
                    "top_logprobs": top,
                    "text_offset": text_offset,
                })
            }
        }
    }

    /// What ends a stream after every choice's last chunk: the usage chunk when asked, and
    /// `[DONE]`.
    pub fn stream_tail(&self, usage: (usize, usize), include_usage: bool) -> Vec<u8> {
        let mut out = Vec::new();
        if include_usage {
            out.extend_from_slice(&sse(&self.usage_chunk(usage)));
        }
        out.extend_from_slice(SSE_DONE);
        out
    }

    /// The usage chunk sent before `[DONE]` when `stream_options.include_usage` is set.
    pub fn usage_chunk(&self, usage: (usize, usize)) -> Value {
        let mut v = self.envelope(true, json!([]));
        v["usage"] = usage_json(usage);
        v
    }
}

/// `calls` in the API's shape, each with a fresh id; a stream's entries also carry their
/// `index`, counted `from` the first of them.
fn tool_calls(calls: &[ToolCall], from: Option<usize>) -> Value {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut v = json!({
                "id": format!("call_{:016x}{:08x}", unique(), unique() as u32),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            });
            if let Some(from) = from {
                v["index"] = json!(from + i);
            }
            v
        })
        .collect()
}

/// `body` (a response or a chunk of one choice) as choice `index`'s.
pub fn with_index(mut body: Value, index: usize) -> Value {
    body["choices"][0]["index"] = json!(index);
    body
}

/// `body` (a response or a chunk) with `logprobs` as its choice's.
pub fn with_logprobs(mut body: Value, logprobs: Value) -> Value {
    body["choices"][0]["logprobs"] = logprobs;
    body
}

/// A log-probability JSON can hold: −∞ (a token the model gives no chance) as −9999, as
/// OpenAI writes it.
fn finite(logprob: f32) -> f32 {
    if logprob.is_finite() {
        logprob
    } else {
        -9999.0
    }
}

/// A random 64-bit value: std's per-instance random hasher keys are enough for response ids.
fn unique() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

fn usage_json((prompt, completion): (usize, usize)) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// One SSE event.
pub fn sse(data: &Value) -> bytes::Bytes {
    bytes::Bytes::from(format!("data: {data}\n\n"))
}

/// The SSE stream terminator.
pub const SSE_DONE: &[u8] = b"data: [DONE]\n\n";
