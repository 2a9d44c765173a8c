//! Several choices of one request (`n`) through the sidecar (the fixture, real HTTP on
//! loopback): each its own sequence, seeded apart, under the first one's gate decision.

use std::collections::BTreeMap;

use inferaligner_e2e::sidecar::*;
use inferaligner_proxy::ServeMode;
use serde_json::{Value, json};
use wiremock::MockServer;

/// The texts of a whole chat response's choices, by index.
fn texts(v: &Value) -> Vec<String> {
    let choices = v["choices"].as_array().expect("choices");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i, "{v}");
        assert!(c["finish_reason"].is_string(), "{v}");
    }
    choices
        .iter()
        .map(|c| {
            c["message"]["content"]
                .as_str()
                .expect("content")
                .to_owned()
        })
        .collect()
}

/// A streamed chat response's text per choice index, checking that each choice's first chunk
/// carries the role and exactly one carries its finish reason.
fn streamed_texts(body: &[u8]) -> (BTreeMap<u64, String>, Option<Value>) {
    let mut text: BTreeMap<u64, String> = BTreeMap::new();
    let mut ends: BTreeMap<u64, usize> = BTreeMap::new();
    let mut usage = None;
    for event in sse_events(body) {
        let Ok(chunk) = serde_json::from_str::<Value>(&event) else {
            continue;
        };
        if !chunk["usage"].is_null() {
            usage = Some(chunk["usage"].clone());
        }
        let Some(c) = chunk["choices"].get(0) else {
            continue;
        };
        let i = c["index"].as_u64().expect("index");
        if !text.contains_key(&i) {
            assert_eq!(c["delta"]["role"], "assistant", "{chunk}");
        }
        let delta = c["delta"]["content"].as_str().unwrap_or("");
        text.entry(i).or_default().push_str(delta);
        if c["finish_reason"].is_string() {
            *ends.entry(i).or_default() += 1;
        }
    }
    assert!(ends.values().all(|&n| n == 1), "{ends:?}");
    assert_eq!(ends.len(), text.len());
    (text, usage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn choices_are_seeded_apart_reproducible_and_streamed_by_index() {
    let mut c = config(ServeMode::Local, "http://127.0.0.1:1");
    // prompts of several chunks, which concurrent prefills would take turns on
    c.model.engine.prefill_chunk_tokens = 16;
    let h = start(c).await;
    let mut body = chat(HARMLESS);
    body["n"] = json!(3);
    body["temperature"] = json!(1.0);
    body["seed"] = json!(5);
    body["max_tokens"] = json!(8);
    let a = ask(&h, &body, None).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.header("x-inferaligner-action"), "generate");
    let three = texts(&a.json());
    assert_eq!(three.len(), 3);
    assert!(three[0] != three[1] || three[1] != three[2], "{three:?}");
    let usage = &a.json()["usage"];
    assert!(usage["completion_tokens"].as_u64().expect("tokens") >= 3);
    // the same request again gives the same choices; choice 0 is the request with n = 1
    assert_eq!(texts(&ask(&h, &body, None).await.json()), three);
    body["n"] = json!(1);
    assert_eq!(texts(&ask(&h, &body, None).await.json()), three[..1]);

    // streamed: chunks by index, the same texts, one usage chunk for all
    body["n"] = json!(3);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let s = ask(&h, &body, None).await;
    let (streamed, streamed_usage) = streamed_texts(&s.body);
    assert_eq!(streamed.into_values().collect::<Vec<_>>(), three);
    assert_eq!(streamed_usage.as_ref(), Some(usage));

    // the later choices start once the first has prefilled, and read its prompt from the
    // prefix cache rather than each prefilling it again
    let reused = "inferaligner_prefix_cache_reused_tokens_total";
    let before = metric(&h, reused).await;
    let long = "Tell me about lighthouses, harbours, tides and ships. ".repeat(5);
    let mut body_long = chat(&long);
    body_long["n"] = json!(3);
    body_long["max_tokens"] = json!(4);
    let a = ask(&h, &body_long, None).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let prompt = a.json()["usage"]["prompt_tokens"].as_u64().expect("usage");
    let after = metric(&h, reused).await;
    assert!(
        after - before >= prompt,
        "reused {} of a {prompt}-token prompt",
        after - before
    );

    // with log-probabilities, each choice has its own
    body["stream"] = json!(false);
    body["stream_options"] = Value::Null;
    body["logprobs"] = json!(true);
    let v = ask(&h, &body, None).await.json();
    for c in v["choices"].as_array().expect("choices") {
        assert!(
            !c["logprobs"]["content"]
                .as_array()
                .expect("content")
                .is_empty()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_choice_of_a_flagged_request_is_steered_or_refused() {
    let refusal = inferaligner_core::Policy::default().refusal;
    let upstream = MockServer::start().await;
    for mode in [ServeMode::Local, ServeMode::Proxy] {
        let h = start(config(mode, &upstream.uri())).await;
        let mut harmful = chat(HARMFUL);
        harmful["n"] = json!(2);
        harmful["temperature"] = json!(0.8);
        harmful["seed"] = json!(1);
        let steered = ask(&h, &harmful, None).await;
        assert_eq!(steered.status, 200, "{mode:?}");
        assert_eq!(steered.header("x-inferaligner-action"), "steer");
        assert_eq!(texts(&steered.json()).len(), 2);
        // blocked: the refusal in every choice, whole and streamed
        let blocked = ask(&h, &harmful, Some("block")).await;
        assert_eq!(blocked.header("x-inferaligner-action"), "block");
        assert_eq!(texts(&blocked.json()), [refusal.clone(), refusal.clone()]);
        harmful["stream"] = json!(true);
        let s = ask(&h, &harmful, Some("block")).await;
        let (streamed, _) = streamed_texts(&s.body);
        assert_eq!(
            streamed.into_values().collect::<Vec<_>>(),
            [refusal.clone(), refusal.clone()]
        );
    }
    assert_unasked(&upstream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_of_returns_the_candidates_with_the_highest_mean_token_logprob() {
    let h = start(config(ServeMode::Local, "http://127.0.0.1:1")).await;
    let prompt = "The capital of France is";
    let sampled = json!({"prompt": prompt, "max_tokens": 6, "temperature": 1.0, "seed": 11});
    // each candidate alone: candidate i is sampled with the seed + i, as choice i would be
    let mut candidates = Vec::new();
    for i in 0..4 {
        let mut one = sampled.clone();
        one["seed"] = json!(11 + i);
        one["logprobs"] = json!(0);
        let r = post(&h, "/v1/completions", one.to_string(), &[]).await;
        let v = r.json();
        let lps: Vec<f64> = v["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .expect("logprobs")
            .iter()
            .map(|l| l.as_f64().expect("f"))
            .collect();
        let mean = lps.iter().sum::<f64>() / lps.len() as f64;
        let text = v["choices"][0]["text"].as_str().expect("text").to_owned();
        let tokens = v["usage"]["completion_tokens"].as_u64().expect("usage");
        candidates.push((mean, text, tokens));
    }
    // sampled apart, so that the ranking has something to rank
    let means: std::collections::BTreeSet<String> =
        candidates.iter().map(|c| format!("{:.4}", c.0)).collect();
    assert!(means.len() >= 3, "{candidates:?}");
    let mut best = sampled.clone();
    best["best_of"] = json!(4);
    best["n"] = json!(2);
    let r = post(&h, "/v1/completions", best.to_string(), &[]).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2);
    let mut ranked = candidates.clone();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(
            c["text"],
            ranked[i].1.as_str(),
            "rank {i} of {candidates:?}"
        );
        // the ranking's log-probabilities were not asked for
        assert_eq!(c["logprobs"], Value::Null);
    }
    // every candidate's tokens are counted, as OpenAI bills them
    let all: u64 = candidates.iter().map(|c| c.2).sum();
    assert_eq!(v["usage"]["completion_tokens"], all);
}
