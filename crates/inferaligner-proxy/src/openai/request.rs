//! Request parsing: the body as JSON, each field group with errors in the API's words, the
//! checks, and the fields only an upstream can honour.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;

use super::Endpoint;
use crate::ProxyError;
use inferaligner_core::{
    JsonSchemaFormat, MESSAGE_ROLES, ResponseFormat, SamplingParams, Tools, calls_text, result_text,
};

use super::fields::{AnswerShaping, MAX_CHOICES, REQUEST_FIELDS, Served, asks, first_unknown};
use super::responses;
use super::tools::{message_calls, message_function_result, message_result, tools};
use crate::backend::{Message, Prompt};

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    /// Anything else (`cache_control`, …): refused where the sidecar writes the answer.
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct MessageIn {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    /// Anything else: an assistant's `tool_calls` and a tool result's `tool_call_id` are read
    /// apart; the rest (`name`, …) is refused where the sidecar writes the answer when it asks
    /// for something; `null` and empty values (an SDK's round-tripped `"refusal": null,
    /// "annotations": []`) pass.
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
    /// Anything else (vLLM's `continuous_usage_stats`, …): refused where the sidecar writes
    /// the answer.
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

/// Fields that ask nothing of an answer the sidecar writes (identification, storage and
/// routing hints): read for their type (a wrong one is still the client's error), and the end
/// user's id for the request's trace.
#[derive(Debug, Deserialize)]
struct Hints {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    safety_identifier: Option<String>,
    #[serde(default, rename = "metadata")]
    _metadata: Option<serde_json::Map<String, Value>>,
    #[serde(default, rename = "store")]
    _store: Option<bool>,
    #[serde(default, rename = "service_tier")]
    _service_tier: Option<String>,
    #[serde(default, rename = "prompt_cache_key")]
    _prompt_cache_key: Option<String>,
}

/// The fields both endpoints share (the rest: [`REQUEST_FIELDS`]).
#[derive(Debug, Deserialize)]
struct Common {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    repetition_penalty: Option<f32>,
    #[serde(default)]
    stop: Option<OneOrMany>,
    #[serde(default)]
    n: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    messages: Vec<MessageIn>,
}

/// `prompt` of `/v1/completions`: text, texts, token ids, or lists of token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptIn {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    prompt: Value,
}

/// A parsed and checked API request.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// `model` as sent.
    pub model: Option<String>,
    /// What to tokenize.
    pub prompt: Prompt,
    /// SSE streaming.
    pub stream: bool,
    /// Send a usage chunk before `[DONE]`.
    pub include_usage: bool,
    /// `max_tokens` / `max_completion_tokens`, if given.
    pub max_tokens: Option<usize>,
    /// The token-limit fields as sent (`max_tokens`, `max_completion_tokens`), so that a
    /// forwarded body is rewritten only when it does not already say the sidecar's limit.
    pub sent_limits: (Option<u64>, Option<u64>),
    /// Stop strings.
    pub stop: Vec<String>,
    /// Token choice.
    pub sampling: SamplingParams,
    /// The shape the answer must take (`response_format`: text, JSON mode or a JSON schema).
    pub response_format: ResponseFormat,
    /// Log-probabilities asked for: of each generated token and of this many most likely
    /// alternatives (chat: `logprobs: true` with `top_logprobs`; completions: `logprobs: N`).
    pub logprobs: Option<usize>,
    /// Choices to write (`n`, at least 1; more than [`MAX_CHOICES`] only upstream).
    pub n: usize,
    /// Candidates to generate, of which the `n` with the highest mean token log-probability are
    /// returned (`/v1/completions` `best_of`, at least `n`; `n` when absent, and on chat).
    pub best_of: usize,
    /// `/v1/completions` `echo`: each choice's text starts with the prompt, and with
    /// `logprobs` its log-probabilities start with the prompt's tokens (the first `null`),
    /// as evaluation harnesses score a text (`max_tokens` may then be 0).
    pub echo: bool,
    /// The tools offered (`tools`, `tool_choice`, `parallel_tool_calls`): where the sidecar
    /// writes the answer, they are in the prompt's system message, the answer is held to
    /// their calls' grammar (`response_format` is then [`ResponseFormat::Grammar`]), and a
    /// call in it is returned as `tool_calls`.
    pub tools: Tools,
    /// The tools came as legacy `functions` (with `function_call`): they are in [`Self::tools`],
    /// and a call in the answer is written as `function_call` (at most one an answer, finished
    /// for `function_call`).
    pub functions: bool,
    /// A field asking for something the sidecar's own generator does not do (`suffix`,
    /// `echo` on chat, more than [`MAX_CHOICES`] choices, …). A request that carries one
    /// is refused with a 400 naming it wherever the sidecar would write the answer (local
    /// mode, a steered request in proxy mode); a forwarded request keeps it for the upstream.
    pub unsupported: Option<Cow<'static, str>>,
    /// Who the client says the end user is (`safety_identifier`, or the older `user`), as the
    /// client sent it: recorded on the request's span (`user.id`), so that the users behind
    /// flagged requests can be found.
    pub end_user: Option<String>,
}

impl ApiRequest {
    /// `model` split at its last `@`: the model's name, and the policy it selects if any.
    pub fn model_and_policy(&self) -> (Option<&str>, Option<&str>) {
        match self.model.as_deref().map(|m| (m, m.rsplit_once('@'))) {
            None => (None, None),
            Some((m, None)) => (Some(m), None),
            Some((_, Some((name, policy)))) => (Some(name), Some(policy)),
        }
    }

    /// Whether a steered answer could be what the client asked for, under a policy whose
    /// `steered_answers` holds steered answers (`holds`) or not. Not when it must be JSON (a
    /// steered answer held to a schema could not be checked by `steered_answers`, whose test is
    /// that its first sentence refuses), nor when it may be a tool call (a steered call is
    /// still a call: its arguments are the harm), nor when it asks for log-probabilities, or
    /// ranks candidates by theirs (`best_of`), and the answer is held (its text may then be the
    /// policy's refusal, which no token of the model wrote; an answer passed on as generated
    /// is the model's tokens, and has theirs): such a request, when the gate flags it under a
    /// policy that steers, is answered with the policy's refusal instead.
    pub fn steerable(&self, holds: bool) -> bool {
        let held_logprobs = holds && (self.logprobs.is_some() || self.best_of > self.n);
        !(self.response_format.is_json() || self.tools.may_call() || held_logprobs)
    }

    /// The 400 for [`ApiRequest::unsupported`], if the request has such a field.
    pub fn refuse_unsupported(&self) -> Result<(), ProxyError> {
        match &self.unsupported {
            None => Ok(()),
            Some(field) => {
                let what = if field == "n" && self.endpoint != Endpoint::Responses {
                    format!("above {MAX_CHOICES} is not supported")
                } else if REQUEST_FIELDS.contains(&field.as_ref())
                    || responses::UNHONOURED_FIELDS.contains(&field.as_ref())
                    || field.contains(['.', '['])
                {
                    "is not supported".to_owned()
                } else {
                    "is not a request field the sidecar knows: it cannot honour it".to_owned()
                };
                Err(ProxyError::InvalidRequest {
                    message: format!(
                        "`{field}` {what} when the sidecar generates the answer itself (local \
                         mode, or a request the gate steers); remove it"
                    ),
                    param: Some(field.clone()),
                    code: None,
                })
            }
        }
    }
}

/// `body` with each `\uXXXX` escape of an unpaired surrogate (a high one not followed by a low
/// one's escape, or a low one alone) written `\ufffd`; `None` when it has none. Only escapes
/// inside strings are read (`\\ud800` is a backslash and text).
fn without_lone_surrogates(body: &[u8]) -> Option<Vec<u8>> {
    let escape = |at: usize| -> Option<u32> {
        let hex = body.get(at..at + 6)?.strip_prefix(b"\\u")?;
        u32::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
    };
    let (mut out, mut changed, mut in_string, mut i) = (Vec::new(), false, false, 0);
    while i < body.len() {
        let step = match (in_string, body[i]) {
            (_, b'"') => {
                in_string = !in_string;
                1
            }
            (true, b'\\') => match escape(i) {
                // a pair, kept
                Some(0xD800..=0xDBFF) if matches!(escape(i + 6), Some(0xDC00..=0xDFFF)) => 12,
                Some(0xD800..=0xDFFF) => {
                    out.extend_from_slice(b"\\ufffd");
                    changed = true;
                    i += 6;
                    continue;
                }
                Some(_) => 6,
                None => 2, // another escape, or a cut one (serde_json says so)
            },
            _ => 1,
        };
        let end = (i + step).min(body.len());
        out.extend_from_slice(&body[i..end]);
        i = end;
    }
    changed.then_some(out)
}

/// A 400 for `param` (one of [`REQUEST_FIELDS`]).
pub(super) fn invalid(message: impl Into<String>, param: &'static str) -> ProxyError {
    ProxyError::invalid(message, Some(param))
}

/// The request body as a JSON object, or a 400 saying why and where it stops being JSON
/// (serde_json's syntax errors quote nothing of the body). A string escape of half a UTF-16
/// surrogate pair reads as U+FFFD, as lenient JSON parsers read it: JavaScript writes one when
/// a client cut text between the halves of an emoji (`JSON.stringify("😀".slice(0, 1))`).
pub(super) fn json_body(body: &[u8]) -> Result<serde_json::Map<String, Value>, ProxyError> {
    let value: Value = serde_json::from_slice(body)
        .or_else(|e| match without_lone_surrogates(body) {
            Some(repaired) => serde_json::from_slice(&repaired).map_err(|_| e),
            None => Err(e),
        })
        .map_err(|e| {
            ProxyError::invalid(format!("the request body is not valid JSON: {e}"), None)
        })?;
    match value {
        Value::Object(body) => Ok(body),
        _ => Err(ProxyError::invalid(
            "the request body must be a JSON object",
            None,
        )),
    }
}

/// Read some fields of the body, with errors in the API's words: the field's path (and the
/// top-level field as `param`), JSON types instead of Rust ones, and never the offending value
/// (it may be part of a prompt, and errors are logged).
fn fields<'a, T: Deserialize<'a>>(body: &'a Value) -> Result<T, ProxyError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path: String = e.path().to_string().chars().take(64).collect();
        let what = api_words(&e.into_inner().to_string());
        if path.is_empty() || path == "." {
            return ProxyError::invalid(format!("invalid request body: {what}"), None);
        }
        let top = path.split(['.', '[']).next().unwrap_or_default();
        ProxyError::InvalidRequest {
            message: format!("`{path}`: {what}"),
            param: REQUEST_FIELDS
                .iter()
                .copied()
                .find(|f| *f == top)
                .map(Into::into),
            code: None,
        }
    })
}

/// serde's message without the value it quotes and with JSON's names for types.
fn api_words(serde_message: &str) -> String {
    // "invalid type: string \"…\", expected u64 at line 1 column 9"
    let message = serde_message
        .split(" at line ")
        .next()
        .unwrap_or(serde_message);
    let message = match (message.find(": string \""), message.rfind("\", expected")) {
        (Some(start), Some(end)) if start < end => {
            format!("{}: a string{}", &message[..start], &message[end + 1..])
        }
        _ => message.to_owned(),
    };
    let mut out = message;
    for (rust, json) in [
        ("u64", "a non-negative integer"),
        ("u32", "a non-negative integer"),
        ("usize", "a non-negative integer"),
        ("i64", "an integer"),
        ("f32", "a number"),
        ("f64", "a number"),
        ("a sequence", "an array"),
        ("a map", "an object"),
        (
            "data did not match any variant of untagged enum OneOrMany",
            "expected a string or an array of strings",
        ),
        (
            "data did not match any variant of untagged enum Content",
            "expected a string or an array of content parts",
        ),
    ] {
        out = out.replace(rust, json);
    }
    if let Some(i) = out.find("untagged enum") {
        out.truncate(i);
        out.push_str("a value of another shape");
    }
    out
}

/// A `/v1/completions` body with several prompts (an array of texts, or of token-id arrays) as
/// one body per prompt, each the request with that prompt alone (`None`: one prompt, or a body
/// [`parse_request`] will refuse). The server answers each as a request of its own and merges
/// the answers.
pub fn split_prompts(body: &[u8]) -> Option<Vec<bytes::Bytes>> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    let prompts: Vec<Value> = match serde_json::from_value::<PromptIn>(value.get("prompt")?.clone())
    {
        Ok(PromptIn::Texts(v)) if v.len() > 1 => v.into_iter().map(Value::from).collect(),
        Ok(PromptIn::IdLists(v)) if v.len() > 1 => v.into_iter().map(Value::from).collect(),
        _ => return None,
    };
    Some(
        prompts
            .into_iter()
            .map(|p| {
                value["prompt"] = p;
                bytes::Bytes::from(value.to_string())
            })
            .collect(),
    )
}

/// Parse a request body for `endpoint` (a completions body with one prompt: several are split
/// first, [`split_prompts`]).
pub fn parse_request(endpoint: Endpoint, body: &[u8]) -> Result<ApiRequest, ProxyError> {
    let body = json_body(body)?;
    if endpoint == Endpoint::Responses {
        let (chat, unsupported) = responses::chat_body(body)?;
        let mut api = parse_value(Endpoint::Chat, chat).map_err(in_responses_words)?;
        api.endpoint = Endpoint::Responses;
        // a Response's last event carries its usage
        api.include_usage = api.stream;
        api.unsupported = unsupported.map(Cow::Owned).or(api.unsupported);
        return Ok(api);
    }
    parse_value(endpoint, Value::Object(body))
}

/// A 400 about the chat request a `/v1/responses` body amounts to, naming the Responses field
/// (the request's own errors, and the model's about it).
pub fn in_responses_words(e: ProxyError) -> ProxyError {
    match e {
        ProxyError::InvalidRequest {
            message,
            param,
            code,
        } => {
            let param = param.map(|p| match p.as_ref() {
                "messages" => Cow::Borrowed("input"),
                "max_tokens" => Cow::Borrowed("max_output_tokens"),
                "response_format" => Cow::Borrowed("text"),
                _ => p,
            });
            let message = message
                .replace("`max_tokens`", "`max_output_tokens`")
                .replace("`response_format", "`text.format");
            ProxyError::InvalidRequest {
                message,
                param,
                code,
            }
        }
        other => other,
    }
}

/// [`parse_request`] of a JSON object, for chat or completions.
fn parse_value(endpoint: Endpoint, value: Value) -> Result<ApiRequest, ProxyError> {
    // the other endpoint's prompt field is a mistake whichever server answers
    let (other, takes) = match endpoint {
        Endpoint::Chat | Endpoint::Responses => ("prompt", "messages"),
        Endpoint::Completions => ("messages", "prompt"),
    };
    if value.get(other).is_some_and(|v| !v.is_null()) {
        return Err(invalid(
            format!(
                "`{other}` is not a field of {}; it takes `{takes}`",
                endpoint.path()
            ),
            other,
        ));
    }
    let offered = tools(endpoint, &value)?;
    let tools = offered.tools;
    // a message's field that asks for something the sidecar's generator does not do
    let mut message_field = None;
    let prompt = match endpoint {
        Endpoint::Chat | Endpoint::Responses => {
            let b: ChatBody = fields(&value)?;
            if b.messages.is_empty() {
                return Err(invalid("`messages` must not be empty", "messages"));
            }
            let mut messages = Vec::with_capacity(b.messages.len());
            for (i, mut m) in b.messages.into_iter().enumerate() {
                if !MESSAGE_ROLES.contains(&m.role.as_str()) {
                    return Err(invalid(
                        format!(
                            "`messages[{i}].role` must be one of {}",
                            MESSAGE_ROLES.join(", ")
                        ),
                        "messages",
                    ));
                }
                let content = match m.content {
                    // an assistant message may carry only tool calls
                    None if m.role == "assistant" => String::new(),
                    None => {
                        return Err(invalid(
                            format!("`messages[{i}].content` is required"),
                            "messages",
                        ));
                    }
                    Some(Content::Text(t)) => t,
                    Some(Content::Parts(parts)) if parts.is_empty() => {
                        return Err(invalid(
                            format!("`messages[{i}].content` must not be an empty array"),
                            "messages",
                        ));
                    }
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for (j, p) in parts.into_iter().enumerate() {
                            let at = format!("messages[{i}].content[{j}]");
                            match (p.kind.as_str(), p.text) {
                                ("text", Some(t)) => text.push_str(&t),
                                ("text", None) => {
                                    return Err(invalid(
                                        format!("`{at}` is of type `text` but has no `text`"),
                                        "messages",
                                    ));
                                }
                                (kind, _) => {
                                    return Err(invalid(
                                        format!(
                                            "`{at}`: content part type `{}` is not supported \
                                             (text only)",
                                            kind.chars().take(32).collect::<String>()
                                        ),
                                        "messages",
                                    ));
                                }
                            }
                            message_field = message_field.or_else(|| asked(&p.rest, &at));
                        }
                        text
                    }
                };
                // earlier calls and their results, as the model reads them
                let at = format!("messages[{i}]");
                let content = match m.role.as_str() {
                    "assistant" => {
                        let calls = message_calls(&mut m.rest, &at)?;
                        calls_text(&content, &calls)
                    }
                    "tool" => {
                        message_result(&mut m.rest, &at)?;
                        result_text(&content)
                    }
                    // a legacy function's result, read as a tool's
                    "function" => {
                        message_function_result(&mut m.rest, &at)?;
                        m.role = "tool".into();
                        result_text(&content)
                    }
                    _ => content,
                };
                message_field = message_field.or_else(|| asked(&m.rest, &at));
                messages.push(Message {
                    role: m.role,
                    content,
                });
            }
            // the tools the answer may call, in the system message (after the request's own)
            if let Some(block) = tools.system_prompt() {
                match messages.first_mut() {
                    Some(first) if ["system", "developer"].contains(&first.role.as_str()) => {
                        first.content = format!("{}\n\n{block}", first.content);
                    }
                    _ => messages.insert(0, Message::new("system", block)),
                }
            }
            Prompt::Chat(messages)
        }
        Endpoint::Completions => {
            let b: CompletionBody = fields(&value)?;
            // Parsed apart so that a bad prompt gets an error in the API's words, not serde's.
            let prompt = serde_json::from_value::<PromptIn>(b.prompt).map_err(|_| {
                invalid(
                    "`prompt` must be a string, or an array of token ids (non-negative integers)",
                    "prompt",
                )
            })?;
            let one = "only one prompt per request is supported";
            let empty = "`prompt` must not be empty";
            match prompt {
                // the model would have no token to continue from (this tokenizer adds none)
                PromptIn::Text(t) if t.is_empty() => return Err(invalid(empty, "prompt")),
                PromptIn::Texts(v) if v.len() == 1 && v[0].is_empty() => {
                    return Err(invalid(empty, "prompt"));
                }
                PromptIn::Text(t) => Prompt::Text(t),
                PromptIn::Texts(mut v) if v.len() == 1 => Prompt::Text(v.remove(0)),
                PromptIn::Ids(ids) if !ids.is_empty() => Prompt::Tokens(ids),
                PromptIn::IdLists(mut v) if v.len() == 1 && !v[0].is_empty() => {
                    Prompt::Tokens(v.remove(0))
                }
                PromptIn::Texts(v) if v.is_empty() => return Err(invalid(empty, "prompt")),
                PromptIn::Ids(_) => return Err(invalid(empty, "prompt")),
                PromptIn::IdLists(v) if v.len() == 1 => return Err(invalid(empty, "prompt")),
                PromptIn::Texts(_) | PromptIn::IdLists(_) => return Err(invalid(one, "prompt")),
            }
        }
    };
    let c: Common = fields(&value)?;
    let hints: Hints = fields(&value)?;
    let stream = c.stream.unwrap_or(false);
    if c.stream_options.is_some() && !stream {
        return Err(invalid(
            "`stream_options` is only allowed when `stream` is true",
            "stream_options",
        ));
    }
    let stream_options = c.stream_options.unwrap_or_default();
    // Fields the sidecar cannot honour when it writes the answer itself; forwarded requests
    // carry them to the upstream untouched. See [`ApiRequest::unsupported`].
    let mut response_format = response_format(endpoint, &value)?;
    let logprobs = logprobs(endpoint, &value)?;
    let logit_bias = logit_bias(&value)?;
    let shaping = fields::<AnswerShaping>(&value)?;
    if let Some(lark) = tools.grammar() {
        // an answer that may be a call cannot also be held to a JSON format
        response_format = response_format
            .filter(|f| !f.is_json())
            .map(|_| ResponseFormat::Grammar { lark });
    }
    let echo = match value.get("echo").filter(|v| !v.is_null()) {
        Some(v) if endpoint == Endpoint::Completions => v
            .as_bool()
            .ok_or_else(|| invalid("`echo` must be true or false", "echo"))?,
        _ => false,
    };
    let n = c.n.map_or(1, |n| n as usize);
    let best_of = best_of(endpoint, &value, n, stream)?;
    let completions = endpoint == Endpoint::Completions;
    let served = Served {
        format: response_format.is_some(),
        echo: completions,
        best_of: completions && best_of <= MAX_CHOICES as usize,
    };
    let unsupported = shaping
        .first_requested(c.n, served)
        .map(Cow::Borrowed)
        .or_else(|| offered.unsupported.map(Cow::Owned))
        .or_else(|| first_unknown(&value).map(Cow::Owned))
        .or_else(|| message_field.map(Cow::Owned))
        .or_else(|| asked(&stream_options.rest, "stream_options").map(Cow::Owned));
    let max_tokens = c.max_completion_tokens.or(c.max_tokens);
    // 0 new tokens: the prompt alone, echoed (and scored, with `logprobs`)
    if max_tokens == Some(0) && !echo {
        return Err(invalid(
            "`max_tokens` must be at least 1 (0 only with `echo`)",
            "max_tokens",
        ));
    }
    // out of range whichever server answers (not "not supported": no server supports 0)
    if c.n == Some(0) {
        return Err(invalid("`n` must be at least 1", "n"));
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(invalid("`temperature` must be in [0, 2]", "temperature"));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(invalid("`top_p` must be in (0, 1]", "top_p"));
    }
    let top_k = match c.top_k {
        None | Some(-1) => 0,
        Some(k) if k >= 0 => k as usize,
        Some(_) => return Err(invalid("`top_k` must be ≥ 0 (or -1 for off)", "top_k")),
    };
    let penalty = |v: Option<f32>, name: &'static str| match v {
        Some(p) if !(-2.0..=2.0).contains(&p) => {
            Err(invalid(format!("`{name}` must be in [-2, 2]"), name))
        }
        v => Ok(v.unwrap_or(0.0)),
    };
    let frequency_penalty = penalty(c.frequency_penalty, "frequency_penalty")?;
    let presence_penalty = penalty(c.presence_penalty, "presence_penalty")?;
    let repetition_penalty = c.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty > 0.0 && repetition_penalty.is_finite()) {
        return Err(invalid(
            "`repetition_penalty` must be > 0",
            "repetition_penalty",
        ));
    }
    let stop = match c.stop {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(invalid("`stop` takes up to 4 non-empty strings", "stop"));
    }
    Ok(ApiRequest {
        endpoint,
        model: c.model,
        prompt,
        stream,
        include_usage: stream_options.include_usage,
        max_tokens: max_tokens.map(|m| usize::try_from(m).unwrap_or(usize::MAX)),
        sent_limits: (c.max_tokens, c.max_completion_tokens),
        stop,
        sampling: SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: c.seed,
            frequency_penalty,
            presence_penalty,
            repetition_penalty,
            logit_bias,
        },
        response_format: response_format.unwrap_or_default(),
        logprobs,
        n,
        best_of,
        echo,
        tools,
        functions: offered.functions,
        unsupported,
        end_user: hints
            .safety_identifier
            .or(hints.user)
            .filter(|id| !id.is_empty()),
    })
}

/// `best_of`: from `n` (its default) up; a number of candidates more than `n` on chat (not a
/// field of OpenAI's chat API) is left to [`AnswerShaping`] to refuse, and it is `n` there.
/// More than `n` cannot be streamed (the best are known when every candidate has ended).
fn best_of(endpoint: Endpoint, body: &Value, n: usize, stream: bool) -> Result<usize, ProxyError> {
    let Some(v) = body.get("best_of").filter(|v| !v.is_null()) else {
        return Ok(n);
    };
    let best_of = match v.as_u64() {
        Some(0) => return Err(invalid("`best_of` must be at least 1", "best_of")),
        Some(b) => usize::try_from(b).unwrap_or(usize::MAX),
        None => return Err(invalid("`best_of` must be an integer", "best_of")),
    };
    if endpoint == Endpoint::Chat {
        return Ok(n);
    }
    if best_of < n {
        return Err(invalid("`best_of` must be at least `n`", "best_of"));
    }
    if best_of > n && stream {
        return Err(invalid(
            "`best_of` above `n` cannot be streamed: the best are known when every candidate \
             has ended",
            "best_of",
        ));
    }
    Ok(best_of)
}

/// Most alternatives a request may ask for at each token (OpenAI's chat limit; its legacy
/// completions stop at 5, vLLM allows 20 there too).
const MAX_TOP_LOGPROBS: u64 = 20;

/// The log-probabilities asked for, as [`ApiRequest::logprobs`]. Chat: `logprobs` true or
/// false, `top_logprobs` 0–20 and only with `logprobs: true`; completions: `logprobs` 0–20
/// (alternatives besides the token's own), and no `top_logprobs`.
fn logprobs(endpoint: Endpoint, body: &Value) -> Result<Option<usize>, ProxyError> {
    let field = |name| body.get(name).filter(|v| !v.is_null());
    let count = |v: &Value, name: &'static str| match v.as_u64() {
        Some(n) if n <= MAX_TOP_LOGPROBS => Ok(n as usize),
        _ => Err(invalid(
            format!("`{name}` must be an integer from 0 to {MAX_TOP_LOGPROBS}"),
            name,
        )),
    };
    match endpoint {
        Endpoint::Chat | Endpoint::Responses => {
            let on = match field("logprobs") {
                None => false,
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| invalid("`logprobs` must be true or false", "logprobs"))?,
            };
            let top = field("top_logprobs")
                .map(|v| count(v, "top_logprobs"))
                .transpose()?;
            if !on && top.is_some_and(|n| n > 0) {
                return Err(invalid(
                    "`top_logprobs` needs `logprobs: true`",
                    "top_logprobs",
                ));
            }
            Ok(on.then(|| top.unwrap_or(0)))
        }
        Endpoint::Completions => {
            if field("top_logprobs").is_some() {
                return Err(invalid(
                    "`top_logprobs` is a field of /v1/chat/completions; on /v1/completions \
                     `logprobs` is the number of alternatives",
                    "top_logprobs",
                ));
            }
            field("logprobs").map(|v| count(v, "logprobs")).transpose()
        }
    }
}

/// `logit_bias`: token ids (as strings, the API's JSON keys) to biases from −100 to 100.
/// Whether the ids are in the model's vocabulary is checked at admission.
fn logit_bias(body: &Value) -> Result<std::collections::BTreeMap<u32, f32>, ProxyError> {
    let bad = |what: &str| invalid(format!("`logit_bias` {what}"), "logit_bias");
    let Some(map) = body.get("logit_bias").filter(|v| !v.is_null()) else {
        return Ok(Default::default());
    };
    let map = map
        .as_object()
        .ok_or_else(|| bad("must be an object of token ids to biases"))?;
    map.iter()
        .map(|(k, v)| {
            let id = k
                .parse::<u32>()
                .map_err(|_| bad("keys must be token ids (non-negative integers as strings)"))?;
            match v.as_f64() {
                Some(b) if (-100.0..=100.0).contains(&b) => Ok((id, b as f32)),
                _ => Err(bad("values must be numbers from -100 to 100")),
            }
        })
        .collect()
}

/// `response_format` as the sidecar's generator holds it: text, and on chat JSON mode and JSON
/// schemas (a malformed one is a 400, as it would be upstream). `None`: a format only an
/// upstream may know (vLLM's `structural_tag`…), or JSON asked of `/v1/completions`, which
/// OpenAI's API does not have there.
fn response_format(endpoint: Endpoint, body: &Value) -> Result<Option<ResponseFormat>, ProxyError> {
    // read through a struct per level, so that an error names its path
    #[derive(Deserialize)]
    struct Format {
        response_format: Schema,
    }
    #[derive(Deserialize)]
    struct Schema {
        json_schema: JsonSchemaFormat,
    }
    let format = body.get("response_format").filter(|f| !f.is_null());
    match (
        endpoint,
        format.map(|f| f.get("type").and_then(Value::as_str)),
    ) {
        (_, None) | (_, Some(Some("text"))) => Ok(Some(ResponseFormat::Text)),
        // JSON mode with anything else (some servers read a `schema` there) is a format only
        // an upstream may know: never held as plain JSON mode with the rest dropped
        (Endpoint::Chat, Some(Some("json_object"))) => Ok(format
            .and_then(Value::as_object)
            .is_some_and(|o| o.iter().all(|(k, v)| k == "type" || v.is_null()))
            .then_some(ResponseFormat::JsonObject)),
        (Endpoint::Chat, Some(Some("json_schema"))) => Ok(Some(ResponseFormat::JsonSchema {
            json_schema: fields::<Format>(body)?.response_format.json_schema,
        })),
        _ => Ok(None),
    }
}

/// `at.key` for the first of `fields` (a message's, a content part's, `stream_options`' own
/// unknown fields) that asks for something, cut to 64 characters: it goes into an error.
fn asked(fields: &serde_json::Map<String, Value>, at: &str) -> Option<String> {
    fields
        .iter()
        .find(|(_, v)| asks(v))
        .map(|(k, _)| format!("{at}.{k}").chars().take(64).collect())
}
