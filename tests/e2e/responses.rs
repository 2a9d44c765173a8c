//! The Responses API through the sidecar (the fixture, real HTTP on loopback): a request read
//! as the chat request it amounts to (the same prompt, the same answer), written back as a
//! Response whole and as its event stream, tools and JSON in their Responses shapes, fields it
//! cannot honour refused by name, and in proxy mode the gate's passes forwarded as sent.

use inferaligner::serve::ServerHandle;
use inferaligner_e2e::sidecar::*;
use inferaligner_proxy::ServeMode;
use serde_json::{Value, json};

/// POST `body` to `/v1/responses`, optionally selecting a policy.
async fn respond(h: &ServerHandle, body: &Value, policy: Option<&str>) -> Answer {
    let headers: Vec<(&str, &str)> = policy
        .map(|p| vec![("x-inferaligner-policy", p)])
        .unwrap_or_default();
    post(h, "/v1/responses", body.to_string(), &headers).await
}

/// A Response's answer text: its message items' `output_text` parts.
fn output_text(response: &Value) -> String {
    let mut text = String::new();
    for item in response["output"].as_array().expect("output") {
        if item["type"] == "message" {
            assert_eq!(item["role"], "assistant");
            for part in item["content"].as_array().expect("content") {
                text.push_str(part["text"].as_str().unwrap_or_default());
            }
        }
    }
    text
}

/// A Response stream's events as (type, body), checking the SSE framing and that sequence
/// numbers count up from 0.
fn read_events(body: &[u8]) -> Vec<(String, Value)> {
    let text = String::from_utf8(body.to_vec()).expect("UTF-8");
    let mut out = Vec::new();
    for (k, event) in text.split("\n\n").filter(|e| !e.is_empty()).enumerate() {
        let (head, data) = event.split_once('\n').expect("event and data lines");
        let kind = head.strip_prefix("event: ").expect("an event line");
        let body: Value =
            serde_json::from_str(data.strip_prefix("data: ").expect("a data line")).expect("JSON");
        assert_eq!(body["type"], kind);
        assert_eq!(body["sequence_number"], k);
        out.push((kind.to_owned(), body));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_is_the_answer_chat_gives_whole_and_streamed() {
    let h = start(config(ServeMode::Local, "http://127.0.0.1:1")).await;
    // `instructions` and `input` items read as the chat's system and user messages
    let request = json!({
        "model": "tiny-llama",
        "instructions": "You answer in one word.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": HARMLESS}]}],
        "temperature": 0,
        "max_output_tokens": 6,
    });
    let mut same_chat = chat(HARMLESS);
    same_chat["messages"] = json!([
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": HARMLESS},
    ]);
    same_chat["max_tokens"] = json!(6);
    let r = respond(&h, &request, Some("off")).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("x-inferaligner-action"), "generate");
    let c = ask(&h, &same_chat, Some("off")).await.json();
    let whole = r.json();
    assert_eq!(whole["object"], "response");
    assert!(
        whole["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("resp_"))
    );
    assert_eq!(output_text(&whole), c["choices"][0]["message"]["content"]);
    assert_eq!(whole["usage"]["input_tokens"], c["usage"]["prompt_tokens"]);
    assert_eq!(
        whole["usage"]["output_tokens"],
        c["usage"]["completion_tokens"]
    );
    assert_eq!(whole["instructions"], request["instructions"]);
    // cut by the token limit: incomplete, and why
    match c["choices"][0]["finish_reason"].as_str() {
        Some("length") => {
            assert_eq!(whole["status"], "incomplete");
            assert_eq!(whole["incomplete_details"]["reason"], "max_output_tokens");
            assert_eq!(whole["output"][0]["status"], "incomplete");
        }
        _ => {
            assert_eq!(whole["status"], "completed");
            assert_eq!(whole["output"][0]["status"], "completed");
        }
    }
    // streamed: the same text in deltas, each part opened and closed, and the whole Response
    // with its usage at the end
    let mut stream = request.clone();
    stream["stream"] = json!(true);
    let s = respond(&h, &stream, Some("off")).await;
    assert_eq!(s.status, 200);
    let events = read_events(&s.body);
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ]
    );
    let n = kinds.len();
    assert_eq!(
        kinds[n - 4..n - 1],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done"
        ]
    );
    let deltas: String = events
        .iter()
        .filter(|(k, _)| k == "response.output_text.delta")
        .map(|(_, e)| e["delta"].as_str().expect("delta"))
        .collect();
    let text = output_text(&whole);
    assert_eq!(deltas, text);
    assert_eq!(events[n - 4].1["text"], text.as_str());
    let (last, end) = &events[n - 1];
    assert_eq!(
        last,
        &format!("response.{}", whole["status"].as_str().expect("status"))
    );
    assert_eq!(output_text(&end["response"]), text);
    assert_eq!(end["response"]["usage"], whole["usage"]);
    // a flagged request under `block`: the policy's refusal, as a Response
    let mut harmful = request.clone();
    harmful["input"] = json!(HARMFUL);
    harmful["max_output_tokens"] = json!(40);
    let b = respond(&h, &harmful, Some("block")).await;
    assert_eq!(b.header("x-inferaligner-action"), "block");
    assert_eq!(
        output_text(&b.json()),
        inferaligner_core::Policy::default().refusal
    );
    harmful["stream"] = json!(true);
    let b = respond(&h, &harmful, Some("block")).await;
    let (_, end) = read_events(&b.body).pop().expect("events");
    assert_eq!(
        output_text(&end["response"]),
        inferaligner_core::Policy::default().refusal
    );
    // steered under the default policy: still a Response
    harmful["stream"] = json!(false);
    let st = respond(&h, &harmful, None).await;
    assert_eq!(st.header("x-inferaligner-action"), "steer");
    assert_eq!(st.json()["object"], "response");
}

/// A request that must call `get_weather` (a city of at most 8 characters).
fn weather_call() -> Value {
    json!({
        "input": "Weather in Oslo?",
        "tools": [{"type": "function", "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                "required": ["city"], "additionalProperties": false}}],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "parallel_tool_calls": false,
        "max_output_tokens": 120,
        "temperature": 0,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_and_json_come_back_in_their_response_shapes_and_unknown_asks_are_refused() {
    let h = start(config(ServeMode::Local, "http://127.0.0.1:1")).await;
    // a named function tool: one `function_call` item whose arguments hold to its schema
    let request = weather_call();
    let r = respond(&h, &request, Some("off")).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let whole = r.json();
    let call = &whole["output"][0];
    assert_eq!(call["type"], "function_call", "{whole}");
    assert_eq!(call["name"], "get_weather");
    assert!(
        call["call_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("call_"))
    );
    let arguments: Value =
        serde_json::from_str(call["arguments"].as_str().expect("a string")).expect("JSON");
    assert!(arguments["city"].as_str().expect("city").chars().count() <= 8);
    let mut stream = request.clone();
    stream["stream"] = json!(true);
    let events = read_events(&respond(&h, &stream, Some("off")).await.body);
    let done = events
        .iter()
        .find(|(k, _)| k == "response.function_call_arguments.done")
        .expect("the call's arguments");
    assert_eq!(done.1["arguments"], call["arguments"]);
    // the call and its output written back: read as chat's tool call and result
    let mut follow = request.clone();
    follow["input"] = json!([
        {"role": "user", "content": "Weather in Oslo?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "4 C, rain"},
    ]);
    follow["tool_choice"] = json!("none");
    let f = respond(&h, &follow, Some("off")).await;
    assert_eq!(f.status, 200, "{}", String::from_utf8_lossy(&f.body));
    let mut same_chat = chat("Weather in Oslo?");
    same_chat["messages"] = json!([
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 C, rain"},
    ]);
    let mut function = request["tools"][0].clone();
    function.as_object_mut().expect("a tool").remove("type");
    same_chat["tools"] = json!([{"type": "function", "function": function}]);
    same_chat["tool_choice"] = json!("none");
    same_chat["max_tokens"] = json!(120);
    let c = ask(&h, &same_chat, Some("off")).await.json();
    assert_eq!(
        f.json()["usage"]["input_tokens"],
        c["usage"]["prompt_tokens"]
    );
    assert_eq!(
        output_text(&f.json()),
        c["choices"][0]["message"]["content"]
    );
    // JSON schema: the answer's text is JSON the schema accepts
    let json_request = json!({
        "input": HARMLESS,
        "text": {"format": {"type": "json_schema", "name": "city", "strict": true,
            "schema": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                "required": ["city"], "additionalProperties": false}}},
        "max_output_tokens": 20,
    });
    let j = respond(&h, &json_request, Some("off")).await;
    assert_eq!(j.status, 200, "{}", String::from_utf8_lossy(&j.body));
    let city: Value = serde_json::from_str(&output_text(&j.json())).expect("JSON");
    assert!(["Paris", "Rome"].contains(&city["city"].as_str().expect("city")));
    // what the sidecar cannot honour is a 400 naming it; what asks nothing passes
    for (field, value, param) in [
        ("reasoning", json!({"effort": "low"}), "reasoning"),
        (
            "previous_response_id",
            json!("resp_1"),
            "previous_response_id",
        ),
        ("n", json!(2), "n"),
        ("text", json!({"verbosity": "low"}), "text.verbosity"),
        (
            "include",
            json!([
                "message.output_text.logprobs",
                "reasoning.encrypted_content"
            ]),
            "include",
        ),
        ("top_logprobs", json!(21), "top_logprobs"),
        (
            "input",
            json!([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
            "input",
        ),
        ("input", json!([{"type": "web_search_call"}]), "input"),
        ("instructions", json!(3), "instructions"),
    ] {
        let mut body = json!({"input": HARMLESS});
        body[field] = value;
        let e = respond(&h, &body, Some("off")).await;
        assert_eq!(
            e.status,
            400,
            "{field}: {}",
            String::from_utf8_lossy(&e.body)
        );
        assert_eq!(e.json()["error"]["param"], param, "{field}");
    }
    let neutral = json!({"input": HARMLESS, "truncation": "disabled", "background": false,
        "include": [], "store": false, "max_output_tokens": 4});
    assert_eq!(respond(&h, &neutral, Some("off")).await.status, 200);
    // chat's token-limit names are not the Responses API's
    let e = respond(
        &h,
        &json!({"input": HARMLESS, "max_output_tokens": 0}),
        Some("off"),
    )
    .await;
    assert_eq!(e.json()["error"]["param"], "max_output_tokens");
}

/// The `logprobs` of a Response's message parts, in order.
fn part_logprobs(response: &Value) -> Vec<Value> {
    let items = response["output"].as_array().expect("output");
    let parts = items.iter().filter(|i| i["type"] == "message");
    parts
        .flat_map(|i| i["content"].as_array().expect("content").clone())
        .flat_map(|p| p["logprobs"].as_array().expect("logprobs").clone())
        .collect()
}

/// Two requests' log-probability entries agree: the same tokens (and bytes where both carry
/// them) with log-probabilities equal up to the floating-point differences of a prefix-cache
/// hit, and the same alternatives.
fn assert_same_entries(a: &[Value], b: &[Value]) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    let same = |x: &Value, y: &Value| {
        assert_eq!(x["token"], y["token"]);
        if !x["bytes"].is_null() && !y["bytes"].is_null() {
            assert_eq!(x["bytes"], y["bytes"]);
        }
        let (p, q) = (x["logprob"].as_f64(), y["logprob"].as_f64());
        assert!(
            (p.expect("logprob") - q.expect("logprob")).abs() < 1e-4,
            "{x} vs {y}"
        );
    };
    for (x, y) in a.iter().zip(b) {
        same(x, y);
        let (tx, ty) = (x["top_logprobs"].as_array(), y["top_logprobs"].as_array());
        let (tx, ty) = (tx.expect("top"), ty.expect("top"));
        assert_eq!(tx.len(), ty.len());
        tx.iter().zip(ty).for_each(|(x, y)| same(x, y));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_come_back_in_the_output_text_whole_and_streamed() {
    let h = start(config(ServeMode::Local, "http://127.0.0.1:1")).await;
    let request = json!({
        "input": HARMLESS,
        "include": ["message.output_text.logprobs"],
        "top_logprobs": 2,
        "temperature": 0,
        "max_output_tokens": 8,
    });
    let mut same_chat = chat(HARMLESS);
    same_chat["max_tokens"] = json!(8);
    same_chat["logprobs"] = json!(true);
    same_chat["top_logprobs"] = json!(2);
    let r = respond(&h, &request, Some("off")).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let c = ask(&h, &same_chat, Some("off")).await.json();
    let entries = c["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("chat's")
        .clone();
    assert!(!entries.is_empty());
    assert!(
        entries
            .iter()
            .all(|e| e["top_logprobs"].as_array().expect("top").len() == 2)
    );
    // whole: chat's entries, in the output text part
    let whole = r.json();
    assert_same_entries(&part_logprobs(&whole), &entries);
    // `top_logprobs` alone asks for them too
    let mut alone = request.clone();
    alone.as_object_mut().expect("object").remove("include");
    let alone = respond(&h, &alone, Some("off")).await.json();
    assert_same_entries(&part_logprobs(&alone), &entries);
    // streamed: the deltas carry them token by token, the done events whole
    let mut stream = request.clone();
    stream["stream"] = json!(true);
    let s = respond(&h, &stream, Some("off")).await;
    assert_eq!(s.status, 200);
    let events = read_events(&s.body);
    let of = |kind: &'static str| {
        events
            .iter()
            .filter(move |(k, _)| k == kind)
            .map(|(_, b)| b)
    };
    let deltas: Vec<Value> = of("response.output_text.delta")
        .flat_map(|d| d["logprobs"].as_array().expect("delta logprobs").clone())
        .collect();
    assert!(deltas.iter().all(|d| d["bytes"].is_null()));
    assert_same_entries(&deltas, &entries);
    let text: String = of("response.output_text.delta")
        .map(|d| d["delta"].as_str().expect("delta").to_owned())
        .collect();
    assert_eq!(text, output_text(&whole));
    let done = of("response.output_text.done").next().expect("text done");
    assert_eq!(done["logprobs"].as_array().expect("done logprobs"), &deltas);
    let completed = of("response.completed")
        .chain(of("response.incomplete"))
        .next()
        .expect("the end");
    let at_the_end = part_logprobs(&completed["response"]);
    assert!(at_the_end.iter().all(|e| e["bytes"].is_array()));
    assert_same_entries(&at_the_end, &entries);
    // not asked for: empty lists, as OpenAI writes them
    let mut plain = request.clone();
    let fields = plain.as_object_mut().expect("object");
    fields.remove("include");
    fields.remove("top_logprobs");
    plain["stream"] = json!(true);
    let events = read_events(&respond(&h, &plain, Some("off")).await.body);
    let deltas: Vec<&Value> = events
        .iter()
        .filter(|(k, _)| k == "response.output_text.delta")
        .map(|(_, b)| &b["logprobs"])
        .collect();
    assert!(
        !deltas.is_empty()
            && deltas
                .iter()
                .all(|l| l.as_array().is_some_and(Vec::is_empty))
    );
    // a forced call with log-probabilities asked for: the call alone, no empty message beside it
    let mut call = weather_call();
    call["include"] = json!(["message.output_text.logprobs"]);
    call["stream"] = json!(true);
    let events = read_events(&respond(&h, &call, Some("off")).await.body);
    let (_, end) = events.last().expect("events");
    let output = end["response"]["output"].as_array().expect("output");
    assert_eq!(output.len(), 1, "{output:?}");
    assert_eq!(output[0]["type"], "function_call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_mode_forwards_what_the_gate_passes_and_answers_the_rest_itself() {
    let upstream = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::path("/v1/responses"))
        .respond_with(wiremock::ResponseTemplate::new(200).set_body_raw(
            r#"{"id":"resp_up","object":"response","output":[]}"#,
            "application/json",
        ))
        .mount(&upstream)
        .await;
    let h = start(config(ServeMode::Proxy, &upstream.uri())).await;
    let harmful = json!({"input": HARMFUL, "max_output_tokens": 8, "temperature": 0});
    let s = respond(&h, &harmful, None).await;
    assert_eq!(s.header("x-inferaligner-gate"), "harmful");
    assert_eq!(s.header("x-inferaligner-action"), "steer");
    assert_eq!(s.json()["object"], "response");
    assert_unasked(&upstream).await;
    // the gate's pass goes upstream as sent, with the sidecar's token limit, and its answer
    // comes back as the upstream wrote it
    let harmless =
        json!({"model": "tiny-llama@watch", "input": HARMLESS, "reasoning": {"effort": "low"}});
    let f = respond(&h, &harmless, None).await;
    assert_eq!(f.header("x-inferaligner-action"), "forward");
    assert_eq!(f.json()["id"], "resp_up");
    let received = upstream.received_requests().await.expect("recorded");
    let sent: Value = serde_json::from_slice(&received[0].body).expect("JSON");
    assert_eq!(sent["model"], "tiny-llama");
    assert_eq!(sent["input"], harmless["input"]);
    assert_eq!(sent["reasoning"], harmless["reasoning"]);
    assert_eq!(sent["max_output_tokens"], 12, "the sidecar's default limit");
    assert!(sent.get("max_tokens").is_none());
    // a stored prompt's variables are read by the gate: a harmful one under a harmless input
    // is flagged (under `block`, answered with the refusal, the upstream not asked), a harmless
    // one forwarded with the prompt as sent
    let stored = |ask: &str| {
        json!({"model": "tiny-llama@block", "input": HARMLESS,
               "prompt": {"id": "pmpt_1", "variables": {"ask": ask}}})
    };
    let asked = upstream.received_requests().await.expect("recorded").len();
    let b = respond(&h, &stored(HARMFUL), None).await;
    assert_eq!(b.header("x-inferaligner-gate"), "harmful");
    assert_eq!(b.header("x-inferaligner-action"), "block");
    let received = upstream.received_requests().await.expect("recorded");
    assert_eq!(
        received.len(),
        asked,
        "a flagged variable never goes upstream"
    );
    let f = respond(&h, &stored(HARMLESS), None).await;
    assert_eq!(f.header("x-inferaligner-action"), "forward");
    let received = upstream.received_requests().await.expect("recorded");
    let sent: Value = serde_json::from_slice(&received[asked].body).expect("JSON");
    assert_eq!(sent["prompt"], stored(HARMLESS)["prompt"]);
    assert!(sent.get("messages").is_none() && sent["input"] == HARMLESS);
}
