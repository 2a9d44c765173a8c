//! `tools`, `tool_choice`, `parallel_tool_calls` and the tool parts of messages (an assistant's
//! `tool_calls`, a tool result's `tool_call_id`), read into the sidecar's tool-call format
//! ([`inferaligner_core::Tools`]). A malformed value is a 400 whichever server answers; a
//! well-formed one the sidecar's generator cannot honour (a tool of another type than
//! `function`, a field it does not know) is noted by path for a 400 where it writes the answer.

use serde_json::Value;

use super::Endpoint;
use super::fields::asks;
use super::request::invalid;
use crate::ProxyError;
use inferaligner_core::{ToolCall, ToolChoice, ToolFunction, Tools};

/// The tools a request offers, read from `tools` or from the legacy `functions`.
#[derive(Debug, Default)]
pub(super) struct Offered {
    /// The functions and what the request asks of them.
    pub tools: Tools,
    /// The path of the first part of them the sidecar's generator cannot honour, if any.
    pub unsupported: Option<String>,
    /// They came as legacy `functions` (with `function_call`): the answer's call is written
    /// as `function_call`, one an answer.
    pub functions: bool,
}

/// The request's tools: `tools`, `tool_choice` and `parallel_tool_calls`, or the legacy
/// `functions` and `function_call` (the same functions, one call an answer), never both.
pub(super) fn tools(endpoint: Endpoint, body: &Value) -> Result<Offered, ProxyError> {
    let field = |name| body.get(name).filter(|v| !v.is_null());
    // an empty list offers nothing; any other value is read (and a wrong type is a 400)
    if field("functions").is_some_and(|f| f.as_array().is_none_or(|l| !l.is_empty())) {
        return functions(endpoint, body);
    }
    if let Some(call) = field("function_call") {
        // "none" and "auto" ask nothing of a request without functions; a name does
        let names = !matches!(call.as_str(), Some("none" | "auto"));
        if names || field("tools").is_some_and(asks) {
            return Err(invalid(
                "`function_call` goes with legacy `functions`; with `tools`, use `tool_choice`",
                "function_call",
            ));
        }
    }
    let parallel = match field("parallel_tool_calls") {
        None => true,
        Some(v) => v.as_bool().ok_or_else(|| {
            invalid(
                "`parallel_tool_calls` must be true or false",
                "parallel_tool_calls",
            )
        })?,
    };
    let mut unsupported = None;
    let mut functions: Vec<ToolFunction> = Vec::new();
    if let Some(list) = field("tools") {
        if endpoint == Endpoint::Completions {
            // no tools on raw completions: only an upstream that has them may take them
            return Ok(Offered {
                unsupported: Some("tools".into()),
                ..Offered::default()
            });
        }
        let list = list
            .as_array()
            .ok_or_else(|| invalid("`tools` must be an array of tools", "tools"))?;
        for (i, tool) in list.iter().enumerate() {
            let at = format!("tools[{i}]");
            let tool = tool
                .as_object()
                .ok_or_else(|| invalid(format!("`{at}` must be an object"), "tools"))?;
            match tool.get("type").and_then(Value::as_str) {
                Some("function") => {}
                Some(_) => {
                    unsupported.get_or_insert(format!("{at}.type"));
                    continue;
                }
                None => return Err(invalid(format!("`{at}.type` is required"), "tools")),
            }
            let f = tool
                .get("function")
                .filter(|f| f.is_object())
                .ok_or_else(|| invalid(format!("`{at}.function` must be an object"), "tools"))?;
            let f = function(
                f,
                &format!("{at}.function"),
                "tools",
                &functions,
                &mut unsupported,
            )?;
            if let Some((k, _)) = tool
                .iter()
                .find(|(k, v)| !["type", "function"].contains(&k.as_str()) && !v.is_null())
            {
                unsupported.get_or_insert(format!("{at}.{k}"));
            }
            functions.push(f);
        }
    }
    let choice = match field("tool_choice") {
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            _ => {
                return Err(invalid(
                    "`tool_choice` must be \"none\", \"auto\", \"required\" or a function",
                    "tool_choice",
                ));
            }
        },
        Some(Value::Object(o)) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("`tool_choice.function.name` is required", "tool_choice"))?;
            if unsupported.is_none() && !functions.iter().any(|f| f.name == name) {
                return Err(invalid(
                    "`tool_choice` names a function that is not in `tools`",
                    "tool_choice",
                ));
            }
            ToolChoice::Function(name.to_owned())
        }
        Some(Value::Object(_)) => {
            // `allowed_tools`, `custom`, …: only an upstream may know them
            unsupported.get_or_insert("tool_choice.type".into());
            ToolChoice::Auto
        }
        Some(_) => {
            return Err(invalid(
                "`tool_choice` must be a string or an object",
                "tool_choice",
            ));
        }
    };
    if functions.is_empty()
        && unsupported.is_none()
        && matches!(choice, ToolChoice::Required | ToolChoice::Function(_))
    {
        return Err(invalid(
            "`tool_choice` asks for a call, but the request has no `tools`",
            "tool_choice",
        ));
    }
    Ok(Offered {
        tools: Tools {
            functions,
            choice,
            parallel,
        },
        unsupported,
        functions: false,
    })
}

/// The legacy `functions` (each a function object, as `tools[i].function`) and
/// `function_call` (`"none"`, `"auto"`, or `{"name": …}`): the older form of tools, where an
/// answer makes at most one call.
fn functions(endpoint: Endpoint, body: &Value) -> Result<Offered, ProxyError> {
    let field = |name| body.get(name).filter(|v| !v.is_null());
    if field("tools").is_some_and(asks) {
        return Err(invalid(
            "`functions` and `tools` cannot both be given: `functions` is the older form of \
             `tools`",
            "functions",
        ));
    }
    if field("tool_choice").is_some() {
        return Err(invalid(
            "`tool_choice` goes with `tools`; with legacy `functions`, use `function_call`",
            "tool_choice",
        ));
    }
    if field("parallel_tool_calls").is_some_and(|v| *v != Value::Bool(false)) {
        return Err(invalid(
            "`parallel_tool_calls` goes with `tools`: an answer to legacy `functions` makes \
             at most one call",
            "parallel_tool_calls",
        ));
    }
    if endpoint == Endpoint::Completions {
        // as tools: only an upstream that has them may take them
        return Ok(Offered {
            unsupported: Some("functions".into()),
            functions: true,
            ..Offered::default()
        });
    }
    let list = field("functions")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("`functions` must be an array of functions", "functions"))?;
    let mut unsupported = None;
    let mut functions: Vec<ToolFunction> = Vec::new();
    for (i, f) in list.iter().enumerate() {
        let at = format!("functions[{i}]");
        if !f.is_object() {
            return Err(invalid(format!("`{at}` must be an object"), "functions"));
        }
        let f = function(f, &at, "functions", &functions, &mut unsupported)?;
        functions.push(f);
    }
    let bad_call = || {
        invalid(
            "`function_call` must be \"none\", \"auto\" or {\"name\": a function's name}",
            "function_call",
        )
    };
    let choice = match field("function_call") {
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            _ => return Err(bad_call()),
        },
        Some(Value::Object(o)) => {
            let name = o.get("name").and_then(Value::as_str).ok_or_else(bad_call)?;
            if !functions.iter().any(|f| f.name == name) {
                return Err(invalid(
                    "`function_call` names a function that is not in `functions`",
                    "function_call",
                ));
            }
            if let Some((k, _)) = o.iter().find(|(k, v)| *k != "name" && !v.is_null()) {
                unsupported.get_or_insert(format!("function_call.{k}"));
            }
            ToolChoice::Function(name.to_owned())
        }
        Some(_) => return Err(bad_call()),
    };
    Ok(Offered {
        tools: Tools {
            functions,
            choice,
            parallel: false,
        },
        unsupported,
        functions: true,
    })
}

/// One function (`tools[i].function`, or legacy `functions[i]`, an object) at path `at`,
/// whose errors name `param`; a name already among `before` is a 400, and a key the
/// generator does not know is noted in `unsupported`.
fn function(
    f: &Value,
    at: &str,
    param: &'static str,
    before: &[ToolFunction],
    unsupported: &mut Option<String>,
) -> Result<ToolFunction, ProxyError> {
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| valid_name(n))
        .ok_or_else(|| {
            invalid(
                format!("`{at}.name` must be 1 to 64 letters, digits, `_` or `-`"),
                param,
            )
        })?;
    if before.iter().any(|g| g.name == name) {
        return Err(invalid(
            format!("`{at}.name`: two functions are named `{name}`"),
            param,
        ));
    }
    let description = match f.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(d.clone()),
        Some(_) => {
            return Err(invalid(
                format!("`{at}.description` must be a string"),
                param,
            ));
        }
    };
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => None,
        Some(p @ Value::Object(_)) => Some(p.clone()),
        Some(_) => {
            return Err(invalid(
                format!("`{at}.parameters` must be a JSON Schema object"),
                param,
            ));
        }
    };
    // `strict`: the grammar holds every call to its schema either way
    let known = |k: &str| ["name", "description", "parameters", "strict"].contains(&k);
    if let Some((k, _)) = f
        .as_object()
        .into_iter()
        .flatten()
        .find(|(k, v)| !known(k) && !v.is_null())
    {
        unsupported.get_or_insert(format!("{at}.{k}"));
    }
    Ok(ToolFunction {
        name: name.to_owned(),
        description,
        parameters,
    })
}

/// OpenAI's rule for function names.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// An assistant message's `tool_calls` (earlier calls, written back into the chat), or its
/// legacy `function_call` (one), taken out of its other fields; `at` is the message's path.
pub(super) fn message_calls(
    rest: &mut serde_json::Map<String, Value>,
    at: &str,
) -> Result<Vec<ToolCall>, ProxyError> {
    let bad = |field: &str, what: &str| invalid(format!("`{at}.{field}` {what}"), "messages");
    let one = |f: &Value, field: &str| {
        let text = |k: &str| f.get(k).and_then(Value::as_str).map(str::to_owned);
        match (text("name"), text("arguments")) {
            (Some(name), Some(arguments)) => Ok(ToolCall { name, arguments }),
            _ => Err(bad(field, "needs a `name` and `arguments` (a string)")),
        }
    };
    let mut calls = Vec::new();
    if let Some(list) = rest.remove("tool_calls").filter(|v| !v.is_null()) {
        let list = list
            .as_array()
            .ok_or_else(|| bad("tool_calls", "must be an array"))?;
        for call in list {
            let f = call
                .get("function")
                .ok_or_else(|| bad("tool_calls", "entries need a `function`"))?;
            calls.push(one(f, "tool_calls[].function")?);
        }
    }
    if let Some(f) = rest.remove("function_call").filter(|v| !v.is_null()) {
        calls.push(one(&f, "function_call")?);
    }
    Ok(calls)
}

/// A legacy `function` message's `name` (the function whose result it is), checked and taken
/// out of its other fields; `at` is the message's path. The model reads results in order.
pub(super) fn message_function_result(
    rest: &mut serde_json::Map<String, Value>,
    at: &str,
) -> Result<(), ProxyError> {
    match rest.remove("name") {
        Some(Value::String(_)) => Ok(()),
        _ => Err(invalid(
            format!("`{at}.name` (a string) is required in a `function` message"),
            "messages",
        )),
    }
}

/// A `tool` message's `tool_call_id` (which call it answers), checked and taken out of its
/// other fields; `at` is the message's path. The model reads results in order, not by id.
pub(super) fn message_result(
    rest: &mut serde_json::Map<String, Value>,
    at: &str,
) -> Result<(), ProxyError> {
    match rest.remove("tool_call_id") {
        None | Some(Value::Null | Value::String(_)) => Ok(()),
        Some(_) => Err(invalid(
            format!("`{at}.tool_call_id` must be a string"),
            "messages",
        )),
    }
}
