//! Structured outputs on the tiny fixture: whatever the (random) model would say, an answer held
//! to a JSON schema parses and follows it, and a schema that cannot be used is refused; an
//! answer held to the tool-call grammar is a well-formed call of an offered function.

use std::sync::Arc;

use inferaligner_core::{JsonSchemaFormat, ResponseFormat, ToolChoice, ToolFunction, Tools};
use inferaligner_e2e::tiny_model;
use inferaligner_runtime::{
    ChatMessage, ChatTokenizer, Engine, EngineConfig, ErrorKind, FinishReason, GenerationEvent,
    GenerationParams, GenerationRequest, RowContext, SamplingParams, collect_events,
};
use serde_json::{Value, json};

fn engine() -> Engine {
    let model = tiny_model();
    let tokenizer = Arc::new(ChatTokenizer::load(model.manifest()).expect("tokenizer"));
    Engine::start(model, tokenizer, None, EngineConfig::default()).expect("engine starts")
}

fn schema(schema: Value) -> ResponseFormat {
    ResponseFormat::JsonSchema {
        json_schema: JsonSchemaFormat {
            name: "answer".into(),
            description: None,
            schema: Some(schema),
            strict: Some(true),
        },
    }
}

/// Generate for a one-turn chat: the text and how it ended (`Err`: the failure's kind, its
/// message, and whether any token came before it).
fn answer(
    engine: &Engine,
    format: &ResponseFormat,
    sampling: SamplingParams,
) -> Result<(String, FinishReason), (ErrorKind, String, bool)> {
    let prompt = engine
        .tokenizer()
        .encode_chat(&[ChatMessage::new("user", "Describe a person.")], true)
        .expect("encodes");
    let request = GenerationRequest {
        prompt,
        params: GenerationParams {
            max_new_tokens: 200,
            sampling,
            response_format: format.clone(),
            ..GenerationParams::default()
        },
        row: RowContext::default(),
        gate: None,
        sink: Box::new(|_| std::ops::ControlFlow::Continue(())),
    };
    let mut text = String::new();
    for event in collect_events(engine, request).expect("accepted") {
        match event {
            GenerationEvent::Token { text: t, .. } => text.push_str(&t),
            GenerationEvent::Finished { reason, tail, .. } => {
                text.push_str(&tail);
                return Ok((text, reason));
            }
            GenerationEvent::Failed { kind, message, .. } => {
                return Err((kind, message, !text.is_empty()));
            }
            GenerationEvent::PromptLogprobs(_) => {}
        }
    }
    panic!("no final event")
}

#[test]
fn answers_held_to_a_schema_parse_and_follow_it_whatever_the_model_samples() {
    let engine = engine();
    // every part bounded, so that each answer can complete within the token limit
    let format = schema(json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest"]},
            "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        },
        "required": ["name", "age", "role", "tags"],
        "additionalProperties": false,
    }));
    let greedy = SamplingParams::default();
    let seeds = (0..6).map(|seed| SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        ..SamplingParams::default()
    });
    let mut answers = Vec::new();
    for sampling in std::iter::once(greedy).chain(seeds) {
        let (text, reason) = answer(&engine, &format, sampling).expect("generates");
        assert_eq!(reason, FinishReason::Stop, "complete: {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let o = v.as_object().expect("an object");
        assert_eq!(o.len(), 4, "{text}");
        assert!(o["name"].as_str().expect("name").chars().count() <= 12);
        assert!(o["age"].as_u64().expect("age") <= 120);
        assert!(["admin", "user", "guest"].contains(&o["role"].as_str().expect("role")));
        let tags = o["tags"].as_array().expect("tags");
        assert!(tags.len() <= 3 && tags.iter().all(Value::is_boolean));
        answers.push(text);
    }
    // the schema's grammar is compiled once and copied for later requests: each copy starts
    // from the beginning (the greedy answer again, unchanged)
    let (again, _) = answer(&engine, &format, SamplingParams::default()).expect("generates");
    assert_eq!(again, answers[0]);
    answers.sort();
    answers.dedup();
    assert!(answers.len() > 1, "sampling still chooses: {answers:?}");
    // free text from the same model is not JSON: the grammar is what made these parse
    let (free, _) = answer(&engine, &ResponseFormat::Text, SamplingParams::default()).expect("ok");
    assert!(serde_json::from_str::<Value>(&free).is_err(), "{free}");
}

#[test]
fn json_mode_opens_an_object_and_a_schema_that_cannot_be_used_is_an_input_error() {
    let engine = engine();
    let (text, _) = answer(
        &engine,
        &ResponseFormat::JsonObject,
        SamplingParams::default(),
    )
    .expect("ok");
    assert!(text.starts_with('{'), "{text}");
    for bad in [
        json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}),
        json!({"type": 5}),
        json!(["not", "an", "object"]),
        // compiles, but admits no value: refused before the answer starts
        json!({"$ref": "#"}),
    ] {
        let Err((kind, message, answered)) =
            answer(&engine, &schema(bad.clone()), SamplingParams::default())
        else {
            panic!("{bad} was used");
        };
        assert_eq!(kind, ErrorKind::Input, "{bad}");
        assert!(!answered, "{bad}: refused before the answer starts");
        // one line that says why, not the grammar engine's state
        assert!(
            !message.contains('\n') && message.len() < 200,
            "{bad}: {message}"
        );
    }
    // the engine goes on serving after refusing them
    assert!(answer(&engine, &ResponseFormat::Text, SamplingParams::default()).is_ok());
}

fn tools(choice: ToolChoice, parallel: bool) -> Tools {
    Tools {
        functions: vec![
            ToolFunction {
                name: "get_weather".into(),
                description: Some("Current weather in a city".into()),
                parameters: Some(json!({
                    "type": "object",
                    "properties": {
                        "city": {"type": "string", "maxLength": 10},
                        "unit": {"enum": ["celsius", "fahrenheit"]},
                    },
                    "required": ["city", "unit"],
                    "additionalProperties": false,
                })),
            },
            ToolFunction {
                name: "get_time".into(),
                description: None,
                parameters: None,
            },
        ],
        choice,
        parallel,
    }
}

fn grammar(tools: &Tools) -> ResponseFormat {
    ResponseFormat::Grammar {
        lark: tools.grammar().expect("a grammar"),
    }
}

#[test]
fn answers_held_to_the_tool_grammar_are_calls_of_offered_functions() {
    let engine = engine();
    let sampled = |seed| SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        ..SamplingParams::default()
    };
    // `required` (one call, or several) and a named function: every answer is calls
    for t in [
        tools(ToolChoice::Required, false),
        tools(ToolChoice::Required, true),
        tools(ToolChoice::Function("get_weather".into()), false),
    ] {
        for seed in 0..4 {
            let (text, reason) = answer(&engine, &grammar(&t), sampled(seed)).expect("generates");
            if reason == FinishReason::Length {
                continue; // cut short: text, as a parse of it says
            }
            let calls = t
                .parse(&text, false)
                .unwrap_or_else(|| panic!("{t:?}: {text}"));
            if !t.parallel {
                assert_eq!(calls.len(), 1, "{text}");
            }
            for c in &calls {
                let args: Value = serde_json::from_str(&c.arguments).expect("JSON");
                if let ToolChoice::Function(name) = &t.choice {
                    assert_eq!(&c.name, name);
                }
                if c.name == "get_weather" {
                    assert!(args["city"].as_str().expect("city").chars().count() <= 10);
                    assert!(["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()));
                }
            }
        }
    }
    // `auto`: the random model writes text that never opens a call, or whole calls
    let auto = tools(ToolChoice::Auto, true);
    let mut texts = 0;
    for seed in 0..6 {
        let (text, reason) = answer(&engine, &grammar(&auto), sampled(seed)).expect("generates");
        match auto.parse(&text, false) {
            Some(_) => {}
            None if reason == FinishReason::Length && auto.may_open_call(&text) => {}
            None => {
                assert!(!text.trim_start().starts_with("<tool_call>"), "{text}");
                texts += 1;
            }
        }
    }
    assert!(
        texts > 0,
        "the random model calls every time: the grammar may not allow text"
    );
}

#[test]
fn a_tool_whose_arguments_admit_no_value_fails_in_one_line_that_names_tools() {
    let engine = engine();
    let mut t = tools(ToolChoice::Function("get_weather".into()), false);
    // the call opens and names the function; its arguments can never be written
    t.functions[0].parameters = Some(json!({"$ref": "#"}));
    let Err((kind, message, _)) = answer(&engine, &grammar(&t), SamplingParams::default()) else {
        panic!("answered");
    };
    assert_eq!(kind, ErrorKind::Input);
    assert!(
        message.contains("`tools`:") && message.contains("cannot be followed"),
        "{message}"
    );
    assert!(!message.contains('\n') && message.len() < 300, "{message}");
}
