//! The Responses API (`POST /v1/responses`, the OpenAI SDK's `client.responses`) as a view of
//! chat: a request is read as the chat request it amounts to (`instructions` as the system
//! message, `input` items as messages, tool calls and their outputs, `text.format` as
//! `response_format`, `max_output_tokens` as the token limit), so that the gate, steering,
//! structured outputs and tools are chat's; where the sidecar writes the answer, chat's answer
//! is written back as a Response (whole: [`response`]; streamed: [`EventStream`]). A request
//! the gate passes in proxy mode goes to the upstream's `/v1/responses` as sent.

use serde_json::{Map, Value, json};

use super::fields::asks;
use super::request::invalid;
use crate::ProxyError;

/// Responses fields the sidecar's generator does not honour (state kept between requests,
/// reasoning, background runs, …): refused by name where the sidecar writes the answer, and
/// forwarded as sent otherwise.
pub(super) const UNHONOURED_FIELDS: &[&str] = &[
    "previous_response_id",
    "conversation",
    "reasoning",
    "include",
    "background",
    "max_tool_calls",
    "truncation",
    "prompt",
];

/// The one `include` value the sidecar's generator honours: each output text's tokens with
/// their log-probabilities (and `top_logprobs` alternatives), as chat's `logprobs: true`.
const LOGPROBS: &str = "message.output_text.logprobs";

/// Chat fields that mean something else on `/v1/responses`, or that a Response cannot carry
/// (several choices, log-probabilities in chat's shape): sent to `/v1/responses`, they are
/// refused by name where the sidecar writes the answer, and forwarded as sent otherwise.
const NOT_RESPONSES_FIELDS: &[&str] = &[
    "messages",
    "n",
    "best_of",
    "logprobs",
    "echo",
    "suffix",
    "functions",
    "function_call",
    "response_format",
    "max_tokens",
    "max_completion_tokens",
];

/// A `/v1/responses` body as the chat body it amounts to, and the first field of it the
/// sidecar's generator cannot honour, if any (refused where the sidecar writes the answer).
/// Malformed `input`, `instructions`, `text`, `tools` and `tool_choice` are 400s whichever
/// server answers, named by their Responses paths.
pub(super) fn chat_body(body: Map<String, Value>) -> Result<(Value, Option<String>), ProxyError> {
    let has_input = body.contains_key("input");
    let mut chat = Map::new();
    let mut unsupported = None;
    let mut messages = Vec::new();
    let mut variables = Vec::new();
    for (key, value) in body {
        match key.as_str() {
            "prompt" if !value.is_null() => {
                variables = prompt_variables(&value)?;
                unsupported.get_or_insert_with(|| key.clone());
            }
            "input" => messages.extend(input(&value)?),
            "instructions" => match &value {
                Value::Null => {}
                Value::String(s) => messages.insert(0, json!({"role": "system", "content": s})),
                _ => return Err(invalid("`instructions` must be a string", "instructions")),
            },
            "max_output_tokens" => {
                chat.insert("max_tokens".into(), value);
            }
            "text" => {
                if let Some(format) = text_format(&value, &mut unsupported)? {
                    chat.insert("response_format".into(), format);
                }
            }
            "tools" => {
                chat.insert("tools".into(), tools(&value)?);
            }
            "tool_choice" => {
                chat.insert("tool_choice".into(), tool_choice(&value));
            }
            // log-probabilities are chat's: `include` asks for them, `top_logprobs` for that many
            // alternatives at each token too (either one asks for them, as chat needs
            // `logprobs: true` beside `top_logprobs`); other `include` values ask for outputs
            // the sidecar does not make (reasoning, tool results, images)
            "include"
                if value
                    .as_array()
                    .is_some_and(|a| a.iter().all(|v| v == LOGPROBS)) =>
            {
                if asks(&value) {
                    chat.insert("logprobs".into(), json!(true));
                }
            }
            "top_logprobs" if !value.is_null() => {
                chat.insert("logprobs".into(), json!(true));
                chat.insert(key, value);
            }
            // asks for nothing: the sidecar never truncates a conversation
            "truncation" if value.is_null() || value == "disabled" => {}
            // a Response's own fields that ask nothing when false or empty
            "background" | "include" | "stream_options" if !asks(&value) => {}
            k if NOT_RESPONSES_FIELDS.contains(&k) || UNHONOURED_FIELDS.contains(&k) => {
                if !value.is_null() {
                    unsupported.get_or_insert_with(|| k.to_owned());
                }
            }
            // the fields chat and Responses share (`model`, `stream`, `temperature`, `top_p`,
            // `parallel_tool_calls`, `user`, `metadata`, `store`, …) and chat's extensions
            // (`seed`, `top_k`, `stop`, …) are chat's; any other (`reasoning`,
            // `previous_response_id`, `include`, …) is unknown to chat, which refuses it by name
            // where the sidecar writes the answer
            k => {
                if !value.is_null() {
                    chat.insert(k.into(), value);
                }
            }
        }
    }
    if !has_input {
        return Err(invalid("`input` is required", "input"));
    }
    if messages.is_empty() {
        return Err(invalid("`input` must not be empty", "input"));
    }
    // read by the gate, each alone, as the turns after the last user turn are; only a request
    // forwarded in proxy mode gets this far with a `prompt`, and its body goes as sent
    messages
        .extend((variables.into_iter()).map(|text| json!({"role": "developer", "content": text})));
    chat.insert("messages".into(), Value::Array(messages));
    Ok((Value::Object(chat), unsupported))
}

/// The texts a stored prompt template's `variables` put into it (strings, `input_text`
/// parts). The template itself is stored upstream and cannot be read; the variables are what
/// the client wrote, so in proxy mode the gate reads them (a harmful request sent as a variable
/// must not pass unread). A variable the gate cannot read (an image, a file) is a 400.
fn prompt_variables(prompt: &Value) -> Result<Vec<String>, ProxyError> {
    let bad = |what: String| invalid(what, "prompt");
    let prompt = prompt
        .as_object()
        .ok_or_else(|| bad("`prompt` must be an object (`id`, `version`, `variables`)".into()))?;
    let Some(variables) = prompt.get("variables").filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let variables = variables
        .as_object()
        .ok_or_else(|| bad("`prompt.variables` must be an object".into()))?;
    let mut texts = Vec::with_capacity(variables.len());
    for (name, value) in variables {
        let text = match value {
            Value::String(s) => s.as_str(),
            Value::Object(part)
                if part.get("type").and_then(Value::as_str) == Some("input_text") =>
            {
                part.get("text").and_then(Value::as_str).ok_or_else(|| {
                    bad(format!(
                        "`prompt.variables.{name}`: an `input_text` needs `text`"
                    ))
                })?
            }
            _ => {
                return Err(bad(format!(
                    "`prompt.variables.{name}`: only text can be gated (a string or an \
                     `input_text` part)"
                )));
            }
        };
        if !text.trim().is_empty() {
            texts.push(text.to_owned());
        }
    }
    Ok(texts)
}

/// `input`: a text (one user message) or a list of items — messages (`role`, `content` as a
/// text or `input_text` / `output_text` parts), `function_call` and `function_call_output` —
/// as chat messages. `reasoning` items (the model's own, often encrypted) are not read.
fn input(value: &Value) -> Result<Vec<Value>, ProxyError> {
    let items = match value {
        Value::String(s) => return Ok(vec![json!({"role": "user", "content": s})]),
        Value::Array(items) => items,
        _ => {
            return Err(invalid(
                "`input` must be a string or an array of input items",
                "input",
            ));
        }
    };
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let bad = |what: &str| invalid(format!("`{at}` {what}"), "input");
        let item = item.as_object().ok_or_else(|| bad("must be an object"))?;
        let text = |k: &str| item.get(k).and_then(Value::as_str);
        match item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message")
        {
            "message" => {
                let role = text("role").ok_or_else(|| bad("needs a `role`"))?;
                let content = match item.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(parts)) => {
                        let mut joined = String::new();
                        for (j, part) in parts.iter().enumerate() {
                            match (part.get("type").and_then(Value::as_str), part.get("text")) {
                                (Some("input_text" | "output_text"), Some(Value::String(t))) => {
                                    joined.push_str(t)
                                }
                                (Some(kind), _) => {
                                    return Err(invalid(
                                        format!(
                                            "`{at}.content[{j}]`: content part type `{}` is not \
                                             supported (text only: `input_text`, `output_text`)",
                                            kind.chars().take(32).collect::<String>()
                                        ),
                                        "input",
                                    ));
                                }
                                (None, _) => {
                                    return Err(bad("has a content part without a `type`"));
                                }
                            }
                        }
                        joined
                    }
                    _ => return Err(bad("needs `content`: a string or an array of parts")),
                };
                messages.push(json!({"role": role, "content": content}));
            }
            "function_call" => {
                let (Some(name), Some(arguments)) = (text("name"), text("arguments")) else {
                    return Err(bad("needs a `name` and `arguments` (a string)"));
                };
                let call = json!({"id": text("call_id").unwrap_or_default(), "type": "function",
                    "function": {"name": name, "arguments": arguments}});
                messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call]}));
            }
            "function_call_output" => {
                let output = match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => return Err(bad("needs an `output`")),
                };
                messages.push(json!({"role": "tool", "content": output,
                    "tool_call_id": text("call_id").unwrap_or_default()}));
            }
            "reasoning" => {}
            other => {
                return Err(invalid(
                    format!(
                        "`{at}.type` `{}` is not supported (messages, `function_call` and \
                         `function_call_output`: the gate reads the conversation's text)",
                        other.chars().take(32).collect::<String>()
                    ),
                    "input",
                ));
            }
        }
    }
    Ok(messages)
}

/// `text`: its `format` as chat's `response_format` (`None` for plain text); other keys
/// (`verbosity`) are noted as unsupported.
fn text_format(
    value: &Value,
    unsupported: &mut Option<String>,
) -> Result<Option<Value>, ProxyError> {
    let Some(text) = value.as_object() else {
        return match value {
            Value::Null => Ok(None),
            _ => Err(invalid("`text` must be an object", "text")),
        };
    };
    if let Some((k, _)) = text.iter().find(|(k, v)| *k != "format" && !v.is_null()) {
        unsupported.get_or_insert_with(|| format!("text.{k}"));
    }
    let Some(format) = text.get("format").filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    let mut format = format
        .as_object()
        .cloned()
        .ok_or_else(|| invalid("`text.format` must be an object", "text"))?;
    Ok(match format.get("type").and_then(Value::as_str) {
        Some("json_schema") => {
            // chat nests the schema's fields under `json_schema`
            format.remove("type");
            Some(json!({"type": "json_schema", "json_schema": format}))
        }
        _ => Some(Value::Object(format)),
    })
}

/// `tools`: Responses' flat function tools (`{"type": "function", "name", …}`) as chat's
/// (`{"type": "function", "function": {"name", …}}`); other tool types (`web_search`, …) as
/// they are, for chat to note as unsupported.
fn tools(value: &Value) -> Result<Value, ProxyError> {
    let Some(list) = value.as_array() else {
        return match value {
            Value::Null => Ok(Value::Null),
            _ => Err(invalid("`tools` must be an array of tools", "tools")),
        };
    };
    let tools = list
        .iter()
        .map(|tool| match tool.as_object() {
            Some(t) if t.get("type").and_then(Value::as_str) == Some("function") => {
                let mut function = t.clone();
                function.remove("type");
                json!({"type": "function", "function": function})
            }
            _ => tool.clone(),
        })
        .collect();
    Ok(Value::Array(tools))
}

/// `tool_choice`: `{"type": "function", "name"}` as chat's `{"type": "function", "function":
/// {"name"}}`; strings and other choices as they are.
fn tool_choice(value: &Value) -> Value {
    match value.as_object() {
        Some(c) if c.get("type").and_then(Value::as_str) == Some("function") => {
            json!({"type": "function", "function": {"name": c.get("name")}})
        }
        _ => value.clone(),
    }
}

/// The Response to `request` (the `/v1/responses` body) that a chat completion the sidecar
/// wrote (`chat`, one choice) amounts to.
pub fn response(chat: &Value, request: &Value) -> Value {
    let choice = &chat["choices"][0];
    let ids = Ids::of(chat);
    let mut output = Vec::new();
    let message = &choice["message"];
    let status = finished(choice["finish_reason"].as_str());
    if let Some(mut part) = content_part(message) {
        if let Some(entries) = choice["logprobs"]["content"].as_array()
            && part["type"] == "output_text"
        {
            part["logprobs"] = Value::Array(entries.clone());
        }
        // A message cut by the token limit is itself `incomplete`, as OpenAI marks it.
        output.push(message_item(&ids, vec![part], status));
    }
    for call in message["tool_calls"].as_array().into_iter().flatten() {
        output.push(call_item(call, "completed"));
    }
    let mut v = envelope(&ids, chat, request, status);
    v["output"] = Value::Array(output);
    v["usage"] = usage(&chat["usage"]);
    v
}

/// The ids of one Response, taken from the chat completion's (`chatcmpl-<hex>`).
struct Ids {
    response: String,
    message: String,
}

impl Ids {
    fn of(chat: &Value) -> Self {
        let hex = chat["id"]
            .as_str()
            .and_then(|id| id.split_once('-'))
            .map_or("0", |(_, hex)| hex);
        Self {
            response: format!("resp_{hex}"),
            message: format!("msg_{hex}"),
        }
    }
}

/// A Response's status for chat's `finish_reason`: cut by the token limit is `incomplete`.
fn finished(finish_reason: Option<&str>) -> &'static str {
    match finish_reason {
        Some("length") => "incomplete",
        _ => "completed",
    }
}

/// A Response without `output` and `usage`: its identity, `status` (`incomplete` with its
/// reason), and the request's settings as the API echoes them.
fn envelope(ids: &Ids, chat: &Value, request: &Value, status: &str) -> Value {
    let setting = |k: &str, default: Value| match request.get(k) {
        Some(v) if !v.is_null() => v.clone(),
        _ => default,
    };
    json!({
        "id": ids.response,
        "object": "response",
        "created_at": chat["created"],
        "status": status,
        "error": null,
        "incomplete_details": (status == "incomplete").then(|| json!({"reason": "max_output_tokens"})),
        "model": chat["model"],
        "output": [],
        "instructions": setting("instructions", Value::Null),
        "max_output_tokens": setting("max_output_tokens", Value::Null),
        "temperature": setting("temperature", json!(1.0)),
        "top_p": setting("top_p", json!(1.0)),
        "parallel_tool_calls": setting("parallel_tool_calls", json!(true)),
        "tool_choice": setting("tool_choice", json!("auto")),
        "tools": setting("tools", json!([])),
        "text": setting("text", json!({"format": {"type": "text"}})),
        "metadata": setting("metadata", json!({})),
        "user": setting("user", Value::Null),
        "store": false,
        "truncation": "disabled",
        "previous_response_id": null,
        "reasoning": null,
        "usage": null,
    })
}

/// Chat's `usage` in a Response's words.
fn usage(chat: &Value) -> Value {
    let n = |k: &str| chat[k].as_u64().unwrap_or(0);
    json!({
        "input_tokens": n("prompt_tokens"),
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": n("completion_tokens"),
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": n("total_tokens"),
    })
}

/// A chat message's text (`output_text`) or refusal (`refusal`) as a content part; `None` for
/// an answer that is only calls.
fn content_part(message: &Value) -> Option<Value> {
    if let Some(refusal) = message["refusal"].as_str() {
        return Some(json!({"type": "refusal", "refusal": refusal}));
    }
    let text = message["content"].as_str()?;
    Some(json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []}))
}

fn message_item(ids: &Ids, content: Vec<Value>, status: &str) -> Value {
    json!({"type": "message", "id": ids.message, "status": status, "role": "assistant",
        "content": content})
}

/// A chat tool call (`{"id": "call_…", "function": {"name", "arguments"}}`) as a
/// `function_call` output item.
fn call_item(call: &Value, status: &str) -> Value {
    let call_id = call["id"].as_str().unwrap_or_default();
    json!({
        "type": "function_call",
        "id": format!("fc_{}", call_id.trim_start_matches("call_")),
        "call_id": call_id,
        "name": call["function"]["name"],
        "arguments": call["function"]["arguments"],
        "status": status,
    })
}

/// Log-probability entries (chat's shape: `token`, `logprob`, `bytes`, `top_logprobs`) as the
/// text delta and done events carry them: `token`, `logprob` and `top_logprobs`, no `bytes`.
fn event_logprobs(entries: &[Value]) -> Value {
    let slim = |e: &Value| json!({"token": e["token"], "logprob": e["logprob"]});
    entries
        .iter()
        .map(|e| {
            let mut v = slim(e);
            v["top_logprobs"] = e["top_logprobs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(slim)
                .collect();
            v
        })
        .collect()
}

/// A chat completion's SSE stream, as the sidecar writes it, rewritten event by event into a
/// Response's: `response.created` and `response.in_progress`, then each output item added,
/// its text in `response.output_text.delta`s (or `response.refusal.delta`s, or a call's
/// arguments) and done, and `response.completed` (or `response.incomplete`) with the whole
/// Response and its usage; a failure mid-stream is an `error` event and `response.failed`.
pub struct EventStream {
    request: Value,
    ids: Option<Ids>,
    /// The first chunk (for the Response's identity).
    first: Value,
    sequence: u64,
    /// The message part being streamed: its content part, as far as it has come.
    open: Option<Value>,
    output: Vec<Value>,
    finish: Option<String>,
    usage: Value,
    failed: Option<Value>,
}

impl EventStream {
    /// A stream answering `request` (the `/v1/responses` body).
    pub fn new(request: Value) -> Self {
        Self {
            request,
            ids: None,
            first: Value::Null,
            sequence: 0,
            open: None,
            output: Vec::new(),
            finish: None,
            usage: usage(&Value::Null),
            failed: None,
        }
    }

    /// The Response events for one chat SSE event's data: a chunk, an error, or `[DONE]`.
    pub fn push(&mut self, data: &str) -> Vec<u8> {
        let mut out = Vec::new();
        if data.trim() == "[DONE]" {
            self.close(&mut out);
            let status = match (&self.failed, &self.finish) {
                (Some(_), _) => "failed",
                (None, f) => finished(f.as_deref()),
            };
            let mut r = self.snapshot(status);
            r["output"] = Value::Array(self.output.clone());
            r["usage"] = self.usage.clone();
            if let Some(error) = &self.failed {
                r["error"] = error.clone();
            }
            let kind = match status {
                "failed" => "response.failed",
                "incomplete" => "response.incomplete",
                _ => "response.completed",
            };
            self.event(&mut out, kind, json!({"response": r}));
            return out;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(data) else {
            return out;
        };
        if let Some(error) = chunk.get("error") {
            let error = json!({"code": error["code"], "message": error["message"]});
            self.event(
                &mut out,
                "error",
                json!({"code": error["code"],
                "message": error["message"], "param": null}),
            );
            self.failed = Some(error);
            return out;
        }
        if self.ids.is_none() {
            self.ids = Some(Ids::of(&chunk));
            self.first = chunk.clone();
            let r = self.snapshot("in_progress");
            self.event(&mut out, "response.created", json!({"response": r.clone()}));
            self.event(&mut out, "response.in_progress", json!({"response": r}));
        }
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            self.usage = usage(u);
        }
        let Some(choice) = chunk["choices"].get(0) else {
            return out;
        };
        let delta = &choice["delta"];
        let logprobs = choice["logprobs"]["content"].as_array();
        let text = match (delta["refusal"].as_str(), delta["content"].as_str()) {
            (Some(r), _) => Some(("refusal", r)),
            (None, Some(t)) => Some(("output_text", t)),
            // a token whose text is held back (an incomplete character) still has its entry;
            // a call's tokens have theirs too (and the end of an answer that called, on its
            // last chunk), but a `function_call` item carries none
            (None, None)
                if delta["tool_calls"].is_null()
                    && choice["finish_reason"].is_null()
                    && logprobs.is_some_and(|l| !l.is_empty()) =>
            {
                Some(("output_text", ""))
            }
            _ => None,
        };
        if let Some((kind, text)) = text {
            self.stream_text(&mut out, kind, text, logprobs.map_or(&[], Vec::as_slice));
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            self.close(&mut out);
            let index = self.output.len();
            let done = call_item(call, "completed");
            let mut added = call_item(call, "in_progress");
            added["arguments"] = json!("");
            self.event(
                &mut out,
                "response.output_item.added",
                json!({"output_index": index, "item": added}),
            );
            let at = json!({"item_id": done["id"], "output_index": index});
            let with = |mut v: Value, k: &str, x: &Value| {
                v[k] = x.clone();
                v
            };
            self.event(
                &mut out,
                "response.function_call_arguments.delta",
                with(at.clone(), "delta", &done["arguments"]),
            );
            self.event(
                &mut out,
                "response.function_call_arguments.done",
                with(at, "arguments", &done["arguments"]),
            );
            self.event(
                &mut out,
                "response.output_item.done",
                json!({"output_index": index, "item": done}),
            );
            self.output.push(done);
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            self.finish = Some(f.to_owned());
            self.close(&mut out);
        }
        out
    }

    /// `text` of a message part of `kind` (`output_text` or `refusal`), with its tokens'
    /// log-probability entries (chat's shape) if asked for, opening the message and the part
    /// at the first.
    fn stream_text(&mut self, out: &mut Vec<u8>, kind: &str, text: &str, logprobs: &[Value]) {
        let (key, delta_event) = match kind {
            "refusal" => ("refusal", "response.refusal.delta"),
            _ => ("text", "response.output_text.delta"),
        };
        if self.open.is_none() {
            let index = self.output.len();
            let item = message_item(self.ids(), vec![], "in_progress");
            self.event(
                out,
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
            );
            let part = match kind {
                "refusal" => json!({"type": "refusal", "refusal": ""}),
                _ => json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []}),
            };
            let at = self.part_at(index);
            let mut added = at.clone();
            added["part"] = part.clone();
            self.event(out, "response.content_part.added", added);
            self.open = Some(part);
        }
        if text.is_empty() && logprobs.is_empty() {
            return;
        }
        if let Some(part) = self.open.as_mut() {
            let so_far = part[key].as_str().unwrap_or_default().to_owned();
            part[key] = json!(so_far + text);
            if let Some(all) = part["logprobs"].as_array_mut() {
                all.extend_from_slice(logprobs);
            }
        }
        let mut delta = self.part_at(self.output.len());
        delta["delta"] = json!(text);
        if kind == "output_text" {
            delta["logprobs"] = event_logprobs(logprobs);
        }
        self.event(out, delta_event, delta);
    }

    /// Ends the message part being streamed, if any: its text done, the part done, the
    /// message done.
    fn close(&mut self, out: &mut Vec<u8>) {
        let Some(part) = self.open.take() else {
            return;
        };
        let index = self.output.len();
        let mut done = self.part_at(index);
        match part["type"].as_str() {
            Some("refusal") => {
                done["refusal"] = part["refusal"].clone();
                self.event(out, "response.refusal.done", done);
            }
            _ => {
                done["text"] = part["text"].clone();
                done["logprobs"] = event_logprobs(part["logprobs"].as_array().map_or(&[], |v| v));
                self.event(out, "response.output_text.done", done);
            }
        }
        let mut part_done = self.part_at(index);
        part_done["part"] = part.clone();
        self.event(out, "response.content_part.done", part_done);
        // Closed by a tool call the message is complete; at the end, as the chat finished.
        let item = message_item(self.ids(), vec![part], finished(self.finish.as_deref()));
        self.event(
            out,
            "response.output_item.done",
            json!({"output_index": index, "item": item.clone()}),
        );
        self.output.push(item);
    }

    fn ids(&self) -> &Ids {
        self.ids.as_ref().expect("set at the first chunk")
    }

    /// Where the message part at output `index` is: its item, output index and content index.
    fn part_at(&self, index: usize) -> Value {
        json!({"item_id": self.ids().message, "output_index": index, "content_index": 0})
    }

    /// The Response as it stands, with `status`, no output and no usage.
    fn snapshot(&self, status: &str) -> Value {
        let empty = Ids {
            response: "resp_0".into(),
            message: "msg_0".into(),
        };
        envelope(
            self.ids.as_ref().unwrap_or(&empty),
            &self.first,
            &self.request,
            status,
        )
    }

    /// One SSE event of `kind` with `body`'s fields, its type and sequence number.
    fn event(&mut self, out: &mut Vec<u8>, kind: &str, mut body: Value) {
        body["type"] = json!(kind);
        body["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        out.extend_from_slice(format!("event: {kind}\ndata: {body}\n\n").as_bytes());
    }
}
