//! `tools`, `tool_choice`, `parallel_tool_calls` and the tool parts of messages (an assistant's
//! `tool_calls`, a tool result's `tool_call_id`), read into the sidecar's tool-call format
//! ([`inferaligner_core::Tools`]). A malformed value is a 400 whichever server answers; a
//! well-formed one the sidecar's generator cannot honour (a tool of another type than
//! `function`, a field it does not know) is noted by path for a 400 where it writes the answer.

use serde_json::Value;

use super::Endpoint;
use super::request::invalid;
use crate::ProxyError;
use inferaligner_core::{ToolCall, ToolChoice, ToolFunction, Tools};

/// The request's tools, and the path of the first part of them the sidecar's generator cannot
/// honour, if any.
pub(super) fn tools(
    endpoint: Endpoint,
    body: &Value,
) -> Result<(Tools, Option<String>), ProxyError> {
    let field = |name| body.get(name).filter(|v| !v.is_null());
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
            return Ok((Tools::default(), Some("tools".into())));
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
                .and_then(Value::as_object)
                .ok_or_else(|| invalid(format!("`{at}.function` must be an object"), "tools"))?;
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| valid_name(n))
                .ok_or_else(|| {
                    invalid(
                        format!("`{at}.function.name` must be 1 to 64 letters, digits, `_` or `-`"),
                        "tools",
                    )
                })?;
            if functions.iter().any(|g| g.name == name) {
                return Err(invalid(
                    format!("`{at}.function.name`: two tools are named `{name}`"),
                    "tools",
                ));
            }
            let description = match f.get("description") {
                None | Some(Value::Null) => None,
                Some(Value::String(d)) => Some(d.clone()),
                Some(_) => {
                    return Err(invalid(
                        format!("`{at}.function.description` must be a string"),
                        "tools",
                    ));
                }
            };
            let parameters = match f.get("parameters") {
                None | Some(Value::Null) => None,
                Some(p @ Value::Object(_)) => Some(p.clone()),
                Some(_) => {
                    return Err(invalid(
                        format!("`{at}.function.parameters` must be a JSON Schema object"),
                        "tools",
                    ));
                }
            };
            // `strict`: the grammar holds every call to its schema either way
            let known = |k: &str| ["name", "description", "parameters", "strict"].contains(&k);
            if let Some((k, _)) = f.iter().find(|(k, v)| !known(k) && !v.is_null()) {
                unsupported.get_or_insert(format!("{at}.function.{k}"));
            }
            if let Some((k, _)) = tool
                .iter()
                .find(|(k, v)| !["type", "function"].contains(&k.as_str()) && !v.is_null())
            {
                unsupported.get_or_insert(format!("{at}.{k}"));
            }
            functions.push(ToolFunction {
                name: name.to_owned(),
                description,
                parameters,
            });
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
    Ok((
        Tools {
            functions,
            choice,
            parallel,
        },
        unsupported,
    ))
}

/// OpenAI's rule for function names.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// An assistant message's `tool_calls` (earlier calls, written back into the chat), taken out
/// of its other fields; `at` is the message's path.
pub(super) fn message_calls(
    rest: &mut serde_json::Map<String, Value>,
    at: &str,
) -> Result<Vec<ToolCall>, ProxyError> {
    let Some(list) = rest.remove("tool_calls").filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let bad = |what: &str| invalid(format!("`{at}.tool_calls` {what}"), "messages");
    let list = list.as_array().ok_or_else(|| bad("must be an array"))?;
    list.iter()
        .map(|call| {
            let f = call
                .get("function")
                .ok_or_else(|| bad("entries need a `function`"))?;
            let text = |k: &str| f.get(k).and_then(Value::as_str).map(str::to_owned);
            match (text("name"), text("arguments")) {
                (Some(name), Some(arguments)) => Ok(ToolCall { name, arguments }),
                _ => Err(bad(
                    "entries' `function` needs a `name` and `arguments` (a string)",
                )),
            }
        })
        .collect()
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
