//! `/v1/completions` with several prompts (the fixture, real HTTP on loopback): each answered
//! as a request of its own — its own gate decision — and merged into one answer, whole or
//! streamed, in local mode and in front of an upstream.

use std::collections::BTreeMap;

use inferaligner_e2e::sidecar::*;
use inferaligner_proxy::ServeMode;
use serde_json::{Value, json};
use wiremock::MockServer;

async fn completion(h: &inferaligner::serve::ServerHandle, body: &Value) -> Answer {
    post(h, "/v1/completions", body.to_string(), &[]).await
}

/// Each choice's text of a streamed completions answer, by index, and its usage chunk.
fn streamed(body: &[u8]) -> (BTreeMap<u64, String>, Option<Value>) {
    let (mut texts, mut usage) = (BTreeMap::new(), None);
    for event in sse_events(body).into_iter().filter(|e| e != "[DONE]") {
        let chunk: Value = serde_json::from_str(&event).expect("a JSON chunk");
        if chunk["usage"].is_object() {
            assert!(usage.is_none(), "one usage chunk");
            usage = Some(chunk["usage"].clone());
        }
        for c in chunk["choices"].as_array().expect("choices") {
            let text: &mut String = texts.entry(c["index"].as_u64().expect("i")).or_default();
            text.push_str(c["text"].as_str().expect("text"));
        }
    }
    (texts, usage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_list_is_answered_prompt_by_prompt_and_merged() {
    let h = start(config(ServeMode::Local, "http://127.0.0.1:1")).await;
    let prompts = ["The capital of France is", "Once upon a time", "2 + 2 ="];
    let alone: Vec<Value> = {
        let mut v = Vec::new();
        for p in prompts {
            let body = json!({"prompt": p, "max_tokens": 5, "temperature": 0, "n": 2});
            let a = completion(&h, &body).await;
            assert_eq!(a.status, 200);
            v.push(a.json());
        }
        v
    };
    let body = json!({"prompt": prompts, "max_tokens": 5, "temperature": 0, "n": 2});
    let a = completion(&h, &body).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let v = a.json();
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 6);
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    for (p, one) in alone.iter().enumerate() {
        for j in 0..2 {
            let c = &choices[p * 2 + j];
            assert_eq!(c["index"], p * 2 + j);
            assert_eq!(
                c["text"], one["choices"][j]["text"],
                "prompt {p} choice {j}"
            );
        }
        prompt_tokens += one["usage"]["prompt_tokens"].as_u64().expect("u");
        completion_tokens += one["usage"]["completion_tokens"].as_u64().expect("u");
    }
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(v["usage"]["completion_tokens"], completion_tokens);
    assert_eq!(a.header("x-inferaligner-action"), "generate");

    // streamed: the same texts by index, one usage chunk that sums them, one [DONE]
    let mut stream = body.clone();
    stream["stream"] = json!(true);
    stream["stream_options"] = json!({"include_usage": true});
    let s = completion(&h, &stream).await;
    assert_eq!(s.status, 200);
    let (texts, usage) = streamed(&s.body);
    assert_eq!(texts.len(), 6);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(texts[&(i as u64)], c["text"].as_str().expect("t"));
    }
    let usage = usage.expect("a usage chunk");
    assert_eq!(usage["completion_tokens"], completion_tokens);

    // token-id lists too
    let ids = json!({"prompt": [[11, 57, 73], [90, 12]], "max_tokens": 3, "temperature": 0});
    let a = completion(&h, &ids).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["choices"].as_array().expect("c").len(), 2);

    // one bad prompt fails the request, with its error
    let bad = json!({"prompt": [[11, 57], []], "max_tokens": 3});
    let a = completion(&h, &bad).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["error"]["param"], "prompt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_prompt_gets_its_own_decision_and_the_highest_score_leads_the_headers() {
    let h = start(config(ServeMode::Local, "http://127.0.0.1:1")).await;
    let harmful = format!("<|im_start|>user\n{HARMFUL}<|im_end|>\n<|im_start|>assistant\n");
    let harmless = format!("<|im_start|>user\n{HARMLESS}<|im_end|>\n<|im_start|>assistant\n");
    let alone = |prompt: &str| json!({"prompt": prompt, "max_tokens": 6, "temperature": 0, "model": "tiny-llama@block"});
    let (harmless_alone, harmful_alone) = (
        completion(&h, &alone(&harmless)).await,
        completion(&h, &alone(&harmful)).await,
    );
    assert_eq!(harmful_alone.header("x-inferaligner-action"), "block");
    let body = json!({"prompt": [harmless, harmful], "max_tokens": 6, "temperature": 0,
                      "model": "tiny-llama@block"});
    let a = completion(&h, &body).await;
    assert_eq!(a.status, 200);
    let v = a.json();
    assert_eq!(
        v["choices"][0]["text"],
        harmless_alone.json()["choices"][0]["text"]
    );
    // the refusal, within the token limit
    assert_eq!(
        v["choices"][1]["text"],
        harmful_alone.json()["choices"][0]["text"]
    );
    assert_eq!(harmless_alone.header("x-inferaligner-action"), "generate");
    assert_eq!(a.header("x-inferaligner-action"), "block");
    assert_eq!(a.header("x-inferaligner-gate"), "harmful");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_proxy_mode_each_harmless_prompt_is_forwarded_alone() {
    let upstream = MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::path("/v1/completions"))
        .respond_with(wiremock::ResponseTemplate::new(200).set_body_raw(
            r#"{"id":"up","object":"text_completion","choices":[{"index":0,"text":"up","finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#,
            "application/json",
        ))
        .mount(&upstream)
        .await;
    let mut c = config(ServeMode::Proxy, &upstream.uri());
    c.server.max_concurrent_requests = 3;
    let h = start(c).await;
    let body = json!({"prompt": ["The capital of France is", "Once upon a time"]});
    let a = completion(&h, &body).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let v = a.json();
    assert_eq!(v["choices"][1]["index"], 1);
    assert_eq!(v["usage"]["total_tokens"], 8);
    let received = upstream.received_requests().await.expect("recorded");
    let mut sent: Vec<Value> = received
        .iter()
        .map(|r| serde_json::from_slice::<Value>(&r.body).expect("JSON")["prompt"].clone())
        .collect();
    sent.sort_by_key(Value::to_string);
    assert_eq!(
        sent,
        [json!("Once upon a time"), json!("The capital of France is")]
    );
    // more prompts than requests may run at once: a 400 that says so
    let many = json!({"prompt": ["a", "b", "c", "d"]});
    let a = completion(&h, &many).await;
    assert_eq!(a.status, 400);
    assert!(a.error_message().contains("max_concurrent_requests"));
}
