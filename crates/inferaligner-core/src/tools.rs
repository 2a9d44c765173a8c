//! Tool calls written by the sidecar's own generator: how a request's tools are shown to the
//! model, how earlier calls and their results are written back into a chat, the grammar that
//! holds the answer to a well-formed call, and how a call is read out of the answer.
//!
//! The format is the Hermes one (Qwen 2.5, NousResearch Hermes, vLLM's `hermes` parser): the
//! tools' signatures as JSON inside `<tools></tools>` in the system prompt, each call as
//! `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`, each result as
//! `<tool_response>\n…\n</tool_response>`. It needs nothing from the chat template, so it works
//! with templates that know no tools (SmolLM2's), and a model trained on it reads it as trained.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Opens one call in the answer.
pub const CALL_OPEN: &str = "<tool_call>";
/// Closes one call.
pub const CALL_CLOSE: &str = "</tool_call>";

/// One function the model may call (`tools[i].function`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolFunction {
    /// Its name: letters, digits, `_` and `-`, at most 64.
    pub name: String,
    /// What it does, for the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON Schema of its arguments object; absent: no arguments (`{}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
}

/// Whether and which function the model must call (`tool_choice`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ToolChoice {
    /// Never: the tools are not shown and the answer is text.
    None,
    /// The model chooses between text and calls.
    #[default]
    Auto,
    /// At least one call.
    Required,
    /// A call of this function.
    Function(String),
}

/// The tools a request offers and what it asks of them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tools {
    /// The functions, in the request's order.
    pub functions: Vec<ToolFunction>,
    /// `tool_choice`.
    pub choice: ToolChoice,
    /// `parallel_tool_calls`: more than one call in an answer.
    pub parallel: bool,
}

/// One call read out of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// The function's name.
    pub name: String,
    /// Its arguments: a JSON object, as compact text (the API's `arguments` string).
    pub arguments: String,
}

impl Tools {
    /// Whether the answer may be a call (tools offered, and `tool_choice` not `none`).
    pub fn may_call(&self) -> bool {
        !self.functions.is_empty() && self.choice != ToolChoice::None
    }

    /// Whether the answer must be a call.
    pub fn must_call(&self) -> bool {
        matches!(self.choice, ToolChoice::Required | ToolChoice::Function(_))
    }

    /// The functions the answer may call: all, or the one `tool_choice` names.
    fn callable(&self) -> impl Iterator<Item = &ToolFunction> {
        self.functions.iter().filter(|f| match &self.choice {
            ToolChoice::Function(name) => f.name == *name,
            _ => true,
        })
    }

    /// The tools' part of the system prompt, or `None` when the answer may not call them.
    pub fn system_prompt(&self) -> Option<String> {
        if !self.may_call() {
            return None;
        }
        let mut out = String::from(
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
             You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
        );
        for f in self.callable() {
            out.push('\n');
            out.push_str(&json!({"type": "function", "function": f}).to_string());
        }
        out.push_str(
            "\n</tools>\n\nFor each function call, return a json object with function name and \
             arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
             {\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
        );
        Some(out)
    }

    /// The grammar (llguidance's Lark) that holds the answer to the choice: text or calls
    /// (`auto`), calls only (`required`, a named function); `None` when the answer is free
    /// text. Each call's JSON is held to `{"name": one of the functions, "arguments": its
    /// parameters' schema}`, written compactly with one space after `,` and `:` (a small
    /// model given the choice pads JSON with newlines until it runs out of tokens). An object
    /// whose schema lists its properties and does not say whether others may follow takes
    /// only those ([`closed`]): JSON Schema would allow any key, and a small model held to
    /// that invents keys until it runs out of tokens.
    pub fn grammar(&self) -> Option<String> {
        if !self.may_call() {
            return None;
        }
        let calls: Vec<Value> = self
            .callable()
            .enumerate()
            .map(|(i, f)| {
                let parameters = f
                    .parameters
                    .clone()
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
                // each schema sits at this place in the one the grammar holds: its own `$ref`s
                // (`#/$defs/…`, as Pydantic writes nested models) must point there
                let place = format!("#{ANY_OF}{i}{ARGUMENTS}");
                json!({
                    "type": "object",
                    "properties": {
                        "name": {"const": f.name},
                        "arguments": rebased(closed(parameters), &place),
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let schema = json!({
            "anyOf": calls,
            "x-guidance": {
                "item_separator": ", ",
                "key_separator": ": ",
                "whitespace_flexible": false,
            },
        });
        let more = if self.parallel {
            " (\"\\n\" call)*"
        } else {
            ""
        };
        let start = if self.must_call() {
            "start: calls"
        } else {
            // text that does not open a call, or calls
            "start: TEXT | calls\nTEXT: /(?s:.*)/ & ~/(?s:\\s*<tool_call>.*)/"
        };
        Some(format!(
            "{start}\ncalls: call{more}\ncall: \"{CALL_OPEN}\\n\" %json {schema} \"\\n{CALL_CLOSE}\"\n"
        ))
    }

    /// The calls an answer makes, or `None` when it is text. An answer `cut` short (out of
    /// tokens) makes the whole calls before the cut, and none of the one it cut (a small model
    /// may repeat a call until the limit) unless only its closing tag was cut; cut within its
    /// first call it makes none ([`Self::cut_in_first_call`]).
    pub fn parse(&self, answer: &str, cut: bool) -> Option<Vec<ToolCall>> {
        if !self.may_call() {
            return None;
        }
        let mut rest = answer.trim_start();
        let mut calls = Vec::new();
        while let Some(after) = rest.strip_prefix(CALL_OPEN) {
            // a call closed, or (cut) one whose JSON is whole and only its closing tag was cut
            let (body, tail, closed) = match after.split_once(CALL_CLOSE) {
                Some((body, tail)) => (body, tail, true),
                None => match cut.then(|| close_cut(after)).flatten() {
                    Some(body) => (body, "", false),
                    None => break,
                },
            };
            #[derive(Deserialize)]
            struct Call {
                name: String,
                arguments: Value,
            }
            let call: Call = match serde_json::from_str(body.trim()) {
                Ok(call) => call,
                Err(_) if !closed => break,
                Err(_) => return None,
            };
            if !call.arguments.is_object() || !self.callable().any(|f| f.name == call.name) {
                return None;
            }
            calls.push(ToolCall {
                name: call.name,
                arguments: call.arguments.to_string(),
            });
            rest = tail.trim_start();
        }
        let ends_well = rest.is_empty() || (cut && self.may_open_call(rest));
        (!calls.is_empty() && ends_well).then_some(calls)
    }

    /// Whether `answer`, cut short without a whole call, was writing its first call: it opened
    /// one, or wrote the start of the opening tag where a call is required. It has nothing to
    /// show: its text is the calls' markup, not an answer, and it makes no call.
    pub fn cut_in_first_call(&self, answer: &str) -> bool {
        let t = answer.trim_start();
        self.may_call()
            && !t.is_empty()
            && (t.starts_with(CALL_OPEN) || (self.must_call() && CALL_OPEN.starts_with(t)))
    }

    /// The calls a streamed answer has closed so far (`text`: its start), each whole with its
    /// closing tag: what a stream may send before the answer ends. `None` while no call has
    /// closed, or when the answer is text.
    pub fn closed_calls(&self, text: &str) -> Option<Vec<ToolCall>> {
        let end = text.rfind(CALL_CLOSE)? + CALL_CLOSE.len();
        self.parse(&text[..end], false)
    }

    /// Whether `text`, the start of an answer, may still become a call: it is empty, opens a
    /// call, or is the start of the tag that opens one. A streamed answer is held while this
    /// holds, and sent as text once it does not.
    pub fn may_open_call(&self, text: &str) -> bool {
        let t = text.trim_start();
        self.may_call() && (CALL_OPEN.starts_with(t) || t.starts_with(CALL_OPEN))
    }
}

/// The JSON of a call whose closing tag the token limit cut: `after` (what follows the opening
/// tag) up to its last `}`, when all that follows that is the start of the closing tag.
fn close_cut(after: &str) -> Option<&str> {
    let end = after.rfind('}')? + 1;
    CALL_CLOSE
        .starts_with(after[end..].trim_start())
        .then_some(&after[..end])
}

/// `schema` with `"additionalProperties": false` in every object schema that lists
/// `properties` and says nothing of others, at any depth (in properties, items, `anyOf`…, and
/// definitions).
fn closed(mut schema: Value) -> Value {
    fn walk(node: &mut Value) {
        let Some(o) = node.as_object_mut() else {
            return;
        };
        if o.contains_key("properties") && !o.contains_key("additionalProperties") {
            o.insert("additionalProperties".into(), Value::Bool(false));
        }
        for (key, value) in o.iter_mut() {
            match key.as_str() {
                // maps of names to schemas
                "properties" | "patternProperties" | "$defs" | "definitions" => {
                    for s in value
                        .as_object_mut()
                        .into_iter()
                        .flat_map(|m| m.values_mut())
                    {
                        walk(s);
                    }
                }
                // lists of schemas
                "anyOf" | "oneOf" | "allOf" | "prefixItems" => {
                    for s in value.as_array_mut().into_iter().flatten() {
                        walk(s);
                    }
                }
                // one schema (or a list of them: `items` of old drafts)
                "items" | "additionalProperties" | "not" | "if" | "then" | "else" | "contains" => {
                    match value {
                        Value::Array(a) => a.iter_mut().for_each(walk),
                        v => walk(v),
                    }
                }
                _ => {}
            }
        }
    }
    walk(&mut schema);
    schema
}

/// Where [`Tools::grammar`] puts function `i`'s parameters in the schema it holds calls to:
/// `{ANY_OF}i{ARGUMENTS}`.
const ANY_OF: &str = "/anyOf/";
const ARGUMENTS: &str = "/properties/arguments";

/// `message`, an error about the schema of [`Tools::grammar`], with the places of the
/// functions' parameters taken out of the JSON pointers it quotes: they read as pointers into
/// the function's own `parameters`, as the client wrote them.
pub fn in_parameters_terms(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(ANY_OF) {
        out.push_str(&rest[..at]);
        let after = &rest[at + ANY_OF.len()..];
        let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        match after[digits..].strip_prefix(ARGUMENTS) {
            Some(tail) if digits > 0 => rest = tail,
            _ => {
                out.push_str(ANY_OF);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `schema` with each local `$ref` (`#`, `#/…`) pointing to the same place below `place`, a
/// local reference to where `schema` is put inside another. Literal values (`const`, `enum`,
/// `default`, `examples`) are left as they are.
fn rebased(mut schema: Value, place: &str) -> Value {
    fn walk(node: &mut Value, place: &str) {
        match node {
            Value::Object(o) => {
                for (key, value) in o.iter_mut() {
                    match (key.as_str(), value) {
                        // JSON pointers; an `$anchor`'s name (`#name`) is found wherever it is
                        ("$ref", Value::String(r)) if r == "#" || r.starts_with("#/") => {
                            *r = format!("{place}{}", &r[1..]);
                        }
                        ("const" | "enum" | "default" | "examples", _) => {}
                        (_, v) => walk(v, place),
                    }
                }
            }
            Value::Array(a) => a.iter_mut().for_each(|v| walk(v, place)),
            _ => {}
        }
    }
    walk(&mut schema, place);
    schema
}

/// An earlier assistant turn's calls as the model writes them, after its text if it had any.
pub fn calls_text(content: &str, calls: &[ToolCall]) -> String {
    let mut out = content.to_owned();
    for c in calls {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&format!(
            "{CALL_OPEN}\n{{\"name\": {}, \"arguments\": {}}}\n{CALL_CLOSE}",
            Value::String(c.name.clone()),
            c.arguments
        ));
    }
    out
}

/// A tool's result (a `tool` message's content) as the model reads it.
pub fn result_text(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Tools {
        Tools {
            functions: vec![
                ToolFunction {
                    name: "get_weather".into(),
                    description: Some("Current weather in a city".into()),
                    parameters: Some(json!({
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    })),
                },
                ToolFunction {
                    name: "get_time".into(),
                    description: None,
                    parameters: None,
                },
            ],
            choice: ToolChoice::Auto,
            parallel: true,
        }
    }

    #[test]
    fn a_call_written_back_into_a_chat_is_read_out_again() {
        let calls = vec![
            ToolCall {
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            },
            ToolCall {
                name: "get_time".into(),
                arguments: "{}".into(),
            },
        ];
        let text = calls_text("", &calls);
        assert!(text.starts_with("<tool_call>\n{\"name\": \"get_weather\""));
        assert_eq!(weather().parse(&text, false), Some(calls.clone()));
        // text before the calls is an earlier turn's content, not an answer's
        assert_eq!(
            weather().parse(&calls_text("Let me check.", &calls), false),
            None
        );
    }

    #[test]
    fn only_whole_calls_of_offered_functions_are_calls() {
        let t = weather();
        let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>";
        let parse = |answer: &str| t.parse(answer, false);
        assert_eq!(parse(call).map(|c| c.len()), Some(1));
        assert_eq!(
            parse(&format!("  {call}\n{call}\n")).map(|c| c.len()),
            Some(2)
        );
        // cut short, text after, another function, arguments not an object, no call at all
        assert_eq!(parse(&call[..call.len() - 3]), None);
        assert_eq!(parse(&format!("{call} and more")), None);
        assert_eq!(parse(&call.replace("get_weather", "rm_rf")), None);
        assert_eq!(
            parse("<tool_call>\n{\"name\": \"get_time\", \"arguments\": 3}\n</tool_call>"),
            None
        );
        assert_eq!(parse("It is sunny."), None);
        // out of tokens: the whole calls before the cut, none within the first
        let repeated = format!("{call}\n{call}\n{}", &call[..30]);
        assert_eq!(t.parse(&repeated, true).map(|c| c.len()), Some(2));
        assert_eq!(t.parse(&repeated, false), None);
        assert_eq!(t.parse(&call[..30], true), None);
        // ... unless only the closing tag was cut: the call is whole
        for closing in ["", "\n", "\n</tool"] {
            let whole_json = call.split("\n</tool_call>").next().expect("a call");
            let answer = format!("{call}\n{whole_json}{closing}");
            assert_eq!(t.parse(&answer, true).map(|c| c.len()), Some(2), "{answer}");
            assert_eq!(t.parse(&answer, false), None);
        }
        // a cut inside the arguments, after a `}` of theirs, is no call
        let inner = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": {}";
        assert_eq!(t.parse(inner, true), None);
        assert_eq!(
            t.parse(&format!("{call}\n{inner}"), true).map(|c| c.len()),
            Some(1)
        );
        let named = Tools {
            choice: ToolChoice::Function("get_time".into()),
            ..weather()
        };
        assert_eq!(named.parse(call, false), None);
        let none = Tools {
            choice: ToolChoice::None,
            ..weather()
        };
        assert_eq!(none.parse(call, false), None);
        assert_eq!(none.system_prompt(), None);
        assert_eq!(none.grammar(), None);
    }

    #[test]
    fn an_answer_cut_in_its_first_call_is_neither_text_nor_a_call() {
        let t = weather();
        let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Os";
        for cut in [call, "\n<tool_call>", &call[..20]] {
            assert!(t.cut_in_first_call(cut), "{cut:?}");
            assert_eq!(t.parse(cut, true), None);
        }
        // the start of the tag: a call where one is required, text where the model may choose
        let required = Tools {
            choice: ToolChoice::Required,
            ..weather()
        };
        assert!(required.cut_in_first_call("<tool_"));
        assert!(!t.cut_in_first_call("<tool_"));
        for text in ["", "  ", "It is", "Sure: <tool_call>"] {
            assert!(!required.cut_in_first_call(text), "{text:?}");
        }
        let none = Tools {
            choice: ToolChoice::None,
            ..weather()
        };
        assert!(!none.cut_in_first_call(call));
    }

    #[test]
    fn objects_that_list_their_properties_take_no_others_unless_they_say_so() {
        let schema = json!({
            "type": "object",
            "properties": {
                "properties": {"type": "object", "properties": {"a": {"type": "string"}}},
                "open": {"type": "object", "properties": {}, "additionalProperties": true},
                "list": {"type": "array", "items": {"properties": {"b": {}}}},
                "either": {"anyOf": [{"properties": {"c": {}}}, {"type": "string"}]},
            },
            "$defs": {"d": {"properties": {"e": {}}}},
        });
        let c = closed(schema);
        assert_eq!(c["additionalProperties"], false);
        let p = &c["properties"];
        // a property named `properties` is a property, not a keyword
        assert_eq!(p["properties"]["additionalProperties"], false);
        assert!(p.get("additionalProperties").is_none());
        assert_eq!(p["open"]["additionalProperties"], true);
        assert_eq!(p["list"]["items"]["additionalProperties"], false);
        assert_eq!(p["either"]["anyOf"][0]["additionalProperties"], false);
        assert!(
            p["either"]["anyOf"][1]
                .get("additionalProperties")
                .is_none()
        );
        assert_eq!(c["$defs"]["d"]["additionalProperties"], false);
    }

    #[test]
    fn an_answer_is_held_only_while_it_may_open_a_call() {
        let t = weather();
        for held in ["", " ", "\n<tool", "<tool_call>", "<tool_call>\n{\"na"] {
            assert!(t.may_open_call(held), "{held:?}");
        }
        for sent in ["I", "<to do>", "Sure: <tool_call>"] {
            assert!(!t.may_open_call(sent), "{sent:?}");
        }
    }

    #[test]
    fn a_stream_has_the_calls_closed_so_far() {
        let t = weather();
        let one = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>";
        let two = format!(
            "{one}\n<tool_call>\n{{\"name\": \"get_time\", \"arguments\": {{}}}}\n</tool_call>"
        );
        for open in [
            "",
            "<tool_call>",
            one.trim_end_matches("</tool_call>"),
            "<tool_call>\n{\"name\": \"get_",
        ] {
            assert_eq!(t.closed_calls(open), None, "{open:?}");
        }
        let names = |text: &str| {
            t.closed_calls(text)
                .map(|c| c.into_iter().map(|c| c.name).collect::<Vec<_>>())
        };
        assert_eq!(names(one), Some(vec!["get_weather".to_owned()]));
        // the next call begun, or all but its closing tag: still the first alone
        for more in ["\n", "\n<tool_call>\n{\"na", &two[one.len()..two.len() - 3]] {
            assert_eq!(
                names(&format!("{one}{more}")),
                Some(vec!["get_weather".to_owned()])
            );
        }
        assert_eq!(
            names(&two),
            Some(vec!["get_weather".to_owned(), "get_time".to_owned()])
        );
        // what a whole answer makes is what the stream had closed
        assert_eq!(t.closed_calls(&two), t.parse(&two, false));
    }

    #[test]
    fn each_function_s_references_point_into_its_own_parameters() {
        let place = |defs: Value| {
            json!({"$defs": {"P": defs}, "type": "object",
                "properties": {"p": {"$ref": "#/$defs/P"}, "q": {"const": {"$ref": "#"}},
                    "r": {"$ref": "#node"}}})
        };
        let t = Tools {
            functions: ["a", "b"]
                .iter()
                .map(|name| ToolFunction {
                    name: (*name).into(),
                    description: None,
                    parameters: Some(place(json!({"type": "string"}))),
                })
                .collect(),
            choice: ToolChoice::Required,
            parallel: false,
        };
        let g = t.grammar().unwrap();
        for i in 0..2 {
            assert!(
                g.contains(&format!(
                    "\"$ref\":\"#/anyOf/{i}/properties/arguments/$defs/P\""
                )),
                "{g}"
            );
        }
        // literal values are not references, nor anchors pointers
        assert!(g.contains("\"const\":{\"$ref\":\"#\"}"), "{g}");
        assert!(g.contains("\"$ref\":\"#node\""), "{g}");
        assert_eq!(
            in_parameters_terms(
                "Pointer '/anyOf/12/properties/arguments/$defs/x' does not exist; /anyOf/x"
            ),
            "Pointer '/$defs/x' does not exist; /anyOf/x"
        );
    }

    #[test]
    fn the_grammar_and_prompt_name_only_the_callable_functions() {
        let t = Tools {
            choice: ToolChoice::Function("get_time".into()),
            parallel: false,
            ..weather()
        };
        let g = t.grammar().unwrap();
        assert!(g.starts_with("start: calls\ncalls: call\n"), "{g}");
        assert!(
            g.contains("\"const\":\"get_time\"") && !g.contains("get_weather"),
            "{g}"
        );
        let p = t.system_prompt().unwrap();
        assert!(
            p.contains("\"name\":\"get_time\"") && !p.contains("get_weather"),
            "{p}"
        );
        let auto = weather().grammar().unwrap();
        assert!(auto.starts_with("start: TEXT | calls"), "{auto}");
        assert!(auto.contains("calls: call (\"\\n\" call)*"), "{auto}");
    }
}
