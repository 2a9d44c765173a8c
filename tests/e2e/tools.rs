//! Tool calls through the sidecar (the fixture, real HTTP on loopback): the tools shown to the
//! model, its answer held to their calls' grammar, calls returned as `tool_calls` whole and
//! streamed (or as a legacy `function_call`), earlier calls and results read back, and a
//! flagged request refused, not steered.

use inferaligner::serve::ServerHandle;
use inferaligner_e2e::sidecar::*;
use inferaligner_proxy::ServeMode;
use serde_json::{Value, json};

/// A chat request offering `get_weather` (arguments bounded, so that a random model's call
/// ends within the token limit) and `get_time`.
fn with_tools(question: &str, tool_choice: Value) -> Value {
    let mut body = chat(question);
    body["tools"] = json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 10},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": false,
            },
        }},
        {"type": "function", "function": {"name": "get_time"}},
    ]);
    body["tool_choice"] = tool_choice;
    body["parallel_tool_calls"] = json!(false);
    body["max_tokens"] = json!(120);
    body
}

/// Ask with the gate off: the random fixture's gate reads the tools in the system prompt as
/// it reads any text, at random; what the gate makes of tools is measured on SmolLM2
/// (docs/sidecar.md). Flagged requests are asked with the gate on, below.
async fn ask_off(h: &ServerHandle, body: &Value) -> Answer {
    ask(h, body, Some("off")).await
}

/// A whole response's one choice's calls: (name, arguments), checking their shape.
fn calls(choice: &Value) -> Vec<(String, Value)> {
    assert_eq!(choice["finish_reason"], "tool_calls", "{choice}");
    assert_eq!(choice["message"]["content"], Value::Null, "{choice}");
    let calls = choice["message"]["tool_calls"].as_array().expect("calls");
    calls
        .iter()
        .map(|c| {
            assert!(c["id"].as_str().is_some_and(|id| id.starts_with("call_")));
            assert_eq!(c["type"], "function");
            let arguments = c["function"]["arguments"].as_str().expect("a string");
            (
                c["function"]["name"].as_str().expect("name").to_owned(),
                serde_json::from_str(arguments).expect("arguments are JSON"),
            )
        })
        .collect()
}

/// A streamed response's text and calls, checking that the first chunk has the role and the
/// last the finish reason.
fn streamed(body: &[u8]) -> (String, Vec<(String, Value)>, String) {
    let (mut text, mut calls, mut finish) = (String::new(), Vec::new(), String::new());
    for (k, event) in sse_events(body).iter().enumerate() {
        let Ok(chunk) = serde_json::from_str::<Value>(event) else {
            continue;
        };
        let c = &chunk["choices"][0];
        if k == 0 {
            assert_eq!(c["delta"]["role"], "assistant", "{chunk}");
        }
        text.push_str(c["delta"]["content"].as_str().unwrap_or(""));
        for call in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let arguments = call["function"]["arguments"].as_str().expect("arguments");
            calls.push((
                call["function"]["name"].as_str().expect("name").to_owned(),
                serde_json::from_str(arguments).expect("JSON"),
            ));
        }
        if let Some(f) = c["finish_reason"].as_str() {
            assert!(finish.is_empty(), "one finish reason");
            finish = f.to_owned();
        }
    }
    (text, calls, finish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_held_to_the_offered_functions_whole_streamed_and_per_choice() {
    let h = start(config(ServeMode::Local, "http://127.0.0.1:1")).await;
    // a named function: one call of it, whatever the random model would say
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let body = with_tools(HARMLESS, named.clone());
    let a = ask_off(&h, &body).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.header("x-inferaligner-action"), "generate");
    let whole = calls(&a.json()["choices"][0]);
    assert_eq!(whole.len(), 1);
    let (name, args) = &whole[0];
    assert_eq!(name, "get_weather");
    assert!(args["city"].as_str().expect("city").chars().count() <= 10);
    assert!(["celsius", "fahrenheit"].contains(&args["unit"].as_str().expect("unit")));
    // streamed: the same call in one delta, no text, finished for `tool_calls`
    let mut stream = body.clone();
    stream["stream"] = json!(true);
    let s = ask_off(&h, &stream).await;
    assert_eq!(
        streamed(&s.body),
        (String::new(), whole, "tool_calls".into())
    );
    // `required`, several choices: each its own call
    let mut required = with_tools(HARMLESS, json!("required"));
    required["n"] = json!(2);
    required["temperature"] = json!(1.0);
    required["seed"] = json!(3);
    let r = ask_off(&h, &required).await.json();
    let choices = r["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2);
    for c in choices {
        let made = calls(c);
        assert_eq!(made.len(), 1, "parallel_tool_calls: false");
        assert!(["get_weather", "get_time"].contains(&made[0].0.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_closing_tag_the_token_limit_cuts_is_still_a_call() {
    let h = start(config(ServeMode::Local, "http://127.0.0.1:1")).await;
    let named = json!({"type": "function", "function": {"name": "get_time"}});
    let mut body = with_tools(HARMLESS, named);
    let whole = ask_off(&h, &body).await.json();
    let made = calls(&whole["choices"][0]);
    let needed = whole["usage"]["completion_tokens"]
        .as_u64()
        .expect("tokens");
    // one token short: the end of the answer; two: the end of the closing tag too
    for short in [1, 2] {
        body["max_tokens"] = json!(needed - short);
        let cut = ask_off(&h, &body).await.json();
        let choice = &cut["choices"][0];
        assert_eq!(choice["finish_reason"], "length", "{cut}");
        assert_eq!(choice["message"]["content"], Value::Null, "{cut}");
        let call = &choice["message"]["tool_calls"][0]["function"];
        assert_eq!(
            (call["name"].as_str(), call["arguments"].as_str()),
            (
                Some(made[0].0.as_str()),
                Some(made[0].1.to_string().as_str())
            ),
            "{cut}"
        );
        // streamed: the call, sent at the end (it never closed), finished for the cut
        let mut stream = body.clone();
        stream["stream"] = json!(true);
        let s = ask_off(&h, &stream).await;
        assert_eq!(
            streamed(&s.body),
            (String::new(), made.clone(), "length".into())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_with_their_own_definitions_are_held_to_them() {
    // as Pydantic writes nested models (the SDK's `pydantic_function_tool`): `$defs` and
    // `$ref`s from the parameters' own root; two functions, each with its own `Place`
    let h = start(config(ServeMode::Local, "http://127.0.0.1:1")).await;
    let mut body = with_tools(HARMLESS, json!("required"));
    body["tools"] = json!([
        {"type": "function", "function": {"name": "book_trip", "parameters": {
            "$defs": {"Place": {"type": "object",
                "properties": {"city": {"type": "string", "maxLength": 8}},
                "required": ["city"]}},
            "type": "object",
            "properties": {"from": {"$ref": "#/$defs/Place"}, "to": {"$ref": "#/$defs/Place"}},
            "required": ["from", "to"],
        }}},
        {"type": "function", "function": {"name": "find_shop", "parameters": {
            "$defs": {"Place": {"enum": ["north", "south"]}},
            "type": "object",
            "properties": {"area": {"$ref": "#/$defs/Place"}},
            "required": ["area"],
        }}},
    ]);
    for (seed, name) in [(1, "book_trip"), (2, "find_shop")] {
        body["tool_choice"] = json!({"type": "function", "function": {"name": name}});
        body["temperature"] = json!(1.0);
        body["seed"] = json!(seed);
        let a = ask_off(&h, &body).await;
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        let made = calls(&a.json()["choices"][0]);
        assert_eq!(made.len(), 1);
        let args = &made[0].1;
        if name == "book_trip" {
            for end in ["from", "to"] {
                let place = args[end].as_object().expect("a Place object");
                assert_eq!(place.len(), 1, "{args}");
                assert!(place["city"].as_str().expect("city").chars().count() <= 8);
            }
        } else {
            assert!(["north", "south"].contains(&args["area"].as_str().expect("area")));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_answers_stream_as_they_are_and_none_hides_the_tools() {
    let h = start(config(ServeMode::Local, "http://127.0.0.1:1")).await;
    let auto = with_tools(HARMLESS, json!("auto"));
    let whole = ask_off(&h, &auto).await.json();
    let choice = &whole["choices"][0];
    let mut stream = auto.clone();
    stream["stream"] = json!(true);
    let (text, streamed_calls, finish) = streamed(&ask_off(&h, &stream).await.body);
    // whatever the model chose (text or a call), the stream says the same
    match choice["finish_reason"].as_str() {
        Some("tool_calls") => {
            assert_eq!(streamed_calls, calls(choice));
            assert_eq!(text, "");
        }
        _ => {
            assert_eq!(Some(text.as_str()), choice["message"]["content"].as_str());
            assert!(!text.trim_start().starts_with("<tool_call>"), "{text}");
            assert!(streamed_calls.is_empty());
        }
    }
    assert_eq!(Some(finish.as_str()), choice["finish_reason"].as_str());
    // `none`: the answer is text, and the prompt is the request without tools
    let none = ask_off(&h, &with_tools(HARMLESS, json!("none")))
        .await
        .json();
    let mut plain = chat(HARMLESS);
    plain["max_tokens"] = json!(120);
    let plain = ask_off(&h, &plain).await.json();
    assert_eq!(
        none["usage"]["prompt_tokens"],
        plain["usage"]["prompt_tokens"]
    );
    assert_eq!(
        none["choices"][0]["message"]["content"],
        plain["choices"][0]["message"]["content"]
    );
    assert!(
        whole["usage"]["prompt_tokens"].as_u64() > plain["usage"]["prompt_tokens"].as_u64(),
        "the tools are in the prompt"
    );
    // a schema that cannot be compiled is the client's error, named without the schema
    let mut bad = with_tools(HARMLESS, json!("required"));
    bad["tools"][0]["function"]["parameters"] =
        json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}});
    let e = ask_off(&h, &bad).await;
    assert_eq!(e.status, 400, "{}", String::from_utf8_lossy(&e.body));
    let message = e.error_message();
    assert!(
        message.contains("`tools`: a function's `parameters` schema cannot be used"),
        "{message}"
    );
    assert!(
        !message.contains("%json") && !message.contains("anyOf"),
        "{message}"
    );
    // a chat with an earlier call and its result is read: the answer follows them
    let mut follow = with_tools(HARMLESS, json!("auto"));
    follow["messages"] = json!([
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 C, rain"},
    ]);
    let f = ask_off(&h, &follow).await;
    assert_eq!(f.status, 200, "{}", String::from_utf8_lossy(&f.body));
    let tokens = f.json()["usage"]["prompt_tokens"].as_u64().expect("tokens");
    assert!(tokens > whole["usage"]["prompt_tokens"].as_u64().expect("tokens"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flagged_requests_with_tools_are_refused_in_both_modes_and_others_forwarded() {
    let harmless = with_tools(HARMLESS, json!("auto"));
    let sent = blocked_in_both_modes(&with_tools(HARMFUL, json!("required")), &harmless).await;
    assert_eq!(sent["tools"], harmless["tools"]);
    assert_eq!(sent["messages"], harmless["messages"]);
}

/// `harmful` (which may call a tool) is blocked with the policy's refusal in local and in
/// proxy mode, without asking the upstream; `harmless` is forwarded: the body the upstream got.
async fn blocked_in_both_modes(harmful: &Value, harmless: &Value) -> Value {
    let refusal = inferaligner_core::Policy::default().refusal;
    let local = start(config(ServeMode::Local, "http://127.0.0.1:1")).await;
    let a = ask(&local, harmful, None).await;
    assert_eq!(a.header("x-inferaligner-gate"), "harmful");
    assert_eq!(a.header("x-inferaligner-action"), "block");
    assert_eq!(a.content(), refusal);
    assert_eq!(a.json()["choices"][0]["finish_reason"], "stop");
    let upstream = upstream_answering_up().await;
    let proxy = start(config(ServeMode::Proxy, &upstream.uri())).await;
    let p = ask(&proxy, harmful, None).await;
    assert_eq!(p.header("x-inferaligner-action"), "block");
    assert_eq!(p.content(), refusal);
    assert_unasked(&upstream).await;
    let f = ask(&proxy, harmless, Some("off")).await;
    assert_eq!(f.header("x-inferaligner-action"), "forward");
    let received = upstream.received_requests().await.expect("recorded");
    serde_json::from_slice(&received[0].body).expect("JSON")
}

/// `body` (made by [`with_tools`]) in the legacy form: its tools as `functions`, its
/// `tool_choice` as `function_call`.
fn as_functions(mut body: Value) -> Value {
    let o = body.as_object_mut().expect("an object");
    let tools = o.remove("tools").expect("tools");
    let functions: Vec<Value> = tools
        .as_array()
        .expect("tools")
        .iter()
        .map(|t| t["function"].clone())
        .collect();
    o.insert("functions".into(), json!(functions));
    o.remove("parallel_tool_calls");
    let call = match o.remove("tool_choice").expect("a choice") {
        Value::Object(c) => json!({"name": c["function"]["name"]}),
        other => other,
    };
    o.insert("function_call".into(), call);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_functions_answer_as_the_same_tools_do_in_their_own_shape() {
    let h = start(config(ServeMode::Local, "http://127.0.0.1:1")).await;
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let tools = with_tools(HARMLESS, named.clone());
    let functions = as_functions(tools.clone());
    let (t, f) = (ask_off(&h, &tools).await, ask_off(&h, &functions).await);
    assert_eq!(f.status, 200, "{}", String::from_utf8_lossy(&f.body));
    let (t, f) = (t.json(), f.json());
    // the same prompt and the same greedy call, written as `function_call`
    assert_eq!(t["usage"], f["usage"]);
    let choice = &f["choices"][0];
    assert_eq!(choice["finish_reason"], "function_call", "{choice}");
    let message = &choice["message"];
    assert_eq!(message["content"], Value::Null);
    assert!(message.get("tool_calls").is_none(), "{message}");
    let call = &message["function_call"];
    let (name, arguments) = calls(&t["choices"][0]).remove(0);
    assert_eq!(call["name"], name.as_str());
    let sent: Value =
        serde_json::from_str(call["arguments"].as_str().expect("a string")).expect("JSON");
    assert_eq!(sent, arguments);
    // streamed: the role, the call in one delta, then the finish reason
    let mut stream = functions.clone();
    stream["stream"] = json!(true);
    let s = ask_off(&h, &stream).await;
    let chunks: Vec<Value> = sse_events(&s.body)
        .iter()
        .filter_map(|e| serde_json::from_str(e).ok())
        .collect();
    let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
    assert_eq!(deltas[0]["role"], "assistant");
    assert_eq!(&deltas[0]["function_call"], call);
    let finishes: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .collect();
    assert_eq!(finishes, ["function_call"]);
    // `auto` lets the model choose; a call is one, never several
    for seed in 0..4 {
        let mut auto = as_functions(with_tools(HARMLESS, json!("auto")));
        auto["temperature"] = json!(1.0);
        auto["seed"] = json!(seed);
        let a = ask_off(&h, &auto).await.json();
        let choice = &a["choices"][0];
        match choice["finish_reason"].as_str() {
            Some("function_call") => {
                assert!(choice["message"]["function_call"]["name"].is_string())
            }
            _ => assert!(choice["message"]["content"].is_string(), "{choice}"),
        }
        assert!(choice["message"].get("tool_calls").is_none(), "{choice}");
    }
    // a chat written back in the legacy form reads as the same chat written with tools
    let history = |legacy: bool| {
        let call = json!({"name": "get_weather",
            "arguments": "{\"city\": \"Oslo\", \"unit\": \"celsius\"}"});
        let (assistant, result) = if legacy {
            (
                json!({"role": "assistant", "content": null, "function_call": call}),
                json!({"role": "function", "name": "get_weather", "content": "4 C, rain"}),
            )
        } else {
            (
                json!({"role": "assistant", "content": null,
                    "tool_calls": [{"id": "call_1", "type": "function", "function": call}]}),
                json!({"role": "tool", "tool_call_id": "call_1", "content": "4 C, rain"}),
            )
        };
        json!([{"role": "user", "content": "Weather in Oslo?"}, assistant, result])
    };
    let mut follow_tools = with_tools(HARMLESS, json!("auto"));
    follow_tools["messages"] = history(false);
    let mut follow_functions = as_functions(with_tools(HARMLESS, json!("auto")));
    follow_functions["messages"] = history(true);
    let (t, f) = (
        ask_off(&h, &follow_tools).await.json(),
        ask_off(&h, &follow_functions).await.json(),
    );
    assert_eq!(t["usage"]["prompt_tokens"], f["usage"]["prompt_tokens"]);
    // flagged: blocked with the policy's refusal, as with tools; a harmless one forwarded
    let harmful = as_functions(with_tools(HARMFUL, named));
    let sent = blocked_in_both_modes(&harmful, &functions).await;
    assert_eq!(sent["functions"], functions["functions"]);
    assert_eq!(sent["function_call"], functions["function_call"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_sends_each_call_as_it_closes() {
    let h = start(config(ServeMode::Local, "http://127.0.0.1:1")).await;
    let named = json!({"type": "function", "function": {"name": "get_time"}});
    let mut body = with_tools(HARMLESS, named);
    body["parallel_tool_calls"] = json!(true);
    body["temperature"] = json!(1.0);
    body["seed"] = json!(1); // two calls from the fixture
    let whole = calls(&ask_off(&h, &body).await.json()["choices"][0]);
    assert_eq!(whole.len(), 2);
    body["stream"] = json!(true);
    let s = ask_off(&h, &body).await;
    assert_eq!(
        streamed(&s.body),
        (String::new(), whole, "tool_calls".into())
    );
    // each call in a chunk of its own, numbered, and the end in the last
    let chunks: Vec<Value> = sse_events(&s.body)
        .iter()
        .filter_map(|e| serde_json::from_str(e).ok())
        .collect();
    let indexes: Vec<Vec<u64>> = chunks
        .iter()
        .map(|c| {
            let calls = c["choices"][0]["delta"]["tool_calls"].as_array();
            calls
                .into_iter()
                .flatten()
                .map(|call| call["index"].as_u64().expect("index"))
                .collect()
        })
        .collect();
    assert_eq!(indexes, [vec![0], vec![1], vec![]], "{chunks:?}");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[1]["choices"][0]["delta"]["role"], Value::Null);
    // log-probabilities: a stream's chunks carry every token's, as the whole answer does
    let mut asked = body.clone();
    asked["logprobs"] = json!(true);
    asked["stream"] = json!(false);
    let whole = ask_off(&h, &asked).await.json();
    let entries = |choice: &Value| choice["logprobs"]["content"].as_array().map_or(0, Vec::len);
    let expected = entries(&whole["choices"][0]);
    assert!(expected > 0, "{whole}");
    asked["stream"] = json!(true);
    let streamed = |body: &[u8]| -> usize {
        sse_events(body)
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .map(|c| entries(&c["choices"][0]))
            .sum()
    };
    assert_eq!(streamed(&ask_off(&h, &asked).await.body), expected);
    // cut within the second call: the first call's, then the cut one's on the last chunk
    asked["max_tokens"] = json!(80);
    let s = ask_off(&h, &asked).await;
    assert_eq!(streamed(&s.body), 80);
    assert_eq!(self::streamed(&s.body).2, "length");
    // several choices in one stream: each numbers its own calls from 0, and ends once
    body["n"] = json!(3);
    let s = ask_off(&h, &body).await;
    let mut per_choice: Vec<(Vec<u64>, usize)> = vec![(Vec::new(), 0); 3];
    for e in sse_events(&s.body) {
        let Ok(chunk) = serde_json::from_str::<Value>(&e) else {
            continue;
        };
        let c = &chunk["choices"][0];
        let (indexes, ends) = &mut per_choice[c["index"].as_u64().expect("index") as usize];
        assert_eq!(*ends, 0, "nothing after a choice's end: {chunk}");
        for call in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
            indexes.push(call["index"].as_u64().expect("index"));
        }
        *ends += usize::from(c["finish_reason"].is_string());
    }
    for (indexes, ends) in per_choice {
        assert_eq!(ends, 1);
        assert!(!indexes.is_empty());
        assert_eq!(indexes, (0..indexes.len() as u64).collect::<Vec<_>>());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_text_not_a_call() {
    // `"\n"` and `"}"` are in every call's markup and JSON: they must not cut it
    let h = start(config(ServeMode::Local, "http://127.0.0.1:1")).await;
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let mut body = with_tools(HARMLESS, named);
    let whole = calls(&ask_off(&h, &body).await.json()["choices"][0]);
    body["stop"] = json!(["\n", "}"]);
    let stopped = ask_off(&h, &body).await.json();
    assert_eq!(calls(&stopped["choices"][0]), whole, "{stopped}");
    body["stream"] = json!(true);
    let s = ask_off(&h, &body).await;
    assert_eq!(
        streamed(&s.body),
        (String::new(), whole, "tool_calls".into())
    );
    // without tools the same stop strings cut the text
    let mut text = chat(HARMLESS);
    text["stop"] = json!(["\n", "}"]);
    text["max_tokens"] = json!(64);
    let a = ask_off(&h, &text).await.json();
    let content = a["choices"][0]["message"]["content"]
        .as_str()
        .expect("text");
    assert!(!content.contains('\n') && !content.contains('}'), "{a}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_in_its_first_call_shows_no_markup() {
    let h = start(config(ServeMode::Local, "http://127.0.0.1:1")).await;
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let mut body = with_tools(HARMLESS, named);
    // inside the call's JSON, and inside the opening tag
    for max_tokens in [8, 2] {
        body["max_tokens"] = json!(max_tokens);
        body["stream"] = json!(false);
        let whole = ask_off(&h, &body).await.json();
        let choice = &whole["choices"][0];
        assert_eq!(choice["finish_reason"], "length", "{whole}");
        assert_eq!(choice["message"]["content"], Value::Null, "{whole}");
        assert!(choice["message"].get("tool_calls").is_none(), "{whole}");
        body["stream"] = json!(true);
        let s = ask_off(&h, &body).await;
        assert_eq!(
            streamed(&s.body),
            (String::new(), Vec::new(), "length".into())
        );
        // the Responses API: no message, the Response incomplete
        let responses = json!({
            "input": HARMLESS, "max_output_tokens": max_tokens, "tool_choice": "required",
            "tools": [{"type": "function", "name": "get_weather"}],
        });
        let r = post(
            &h,
            "/v1/responses",
            responses.to_string(),
            &[("x-inferaligner-policy", "off")],
        )
        .await
        .json();
        assert_eq!(r["status"], "incomplete", "{r}");
        assert_eq!(r["output"], json!([]), "{r}");
    }
}
