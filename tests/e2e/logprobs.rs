//! Log-probabilities and logit bias through the sidecar (the fixture, real HTTP on loopback):
//! OpenAI's shapes on both endpoints, streamed and whole, the checks, and what a flagged
//! request that asks for them gets.

use inferaligner_core::SteeredAnswers;
use inferaligner_e2e::sidecar::*;
use inferaligner_e2e::tiny_llama;
use inferaligner_proxy::{PolicyConfig, ServeMode};
use inferaligner_runtime::{ChatTokenizer, LayerSplitModel};
use serde_json::{Value, json};
use wiremock::MockServer;

/// The bytes of a chat answer's log-probability entries, end to end.
fn entry_bytes(entries: &[Value]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|e| e["bytes"].as_array().expect("bytes").clone())
        .map(|b| b.as_u64().expect("a byte") as u8)
        .collect()
}

/// The fixture's special tokens are spelled `<|…|>`.
fn is_special(token: &str) -> bool {
    token.starts_with("<|") && token.ends_with("|>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_completions_report_logprobs_in_openais_shapes() {
    let h = start(config(ServeMode::Local, "http://127.0.0.1:1")).await;
    let mut body = chat(HARMLESS);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    body["max_tokens"] = json!(8);
    let a = ask(&h, &body, None).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.header("x-inferaligner-action"), "generate");
    let v = a.json();
    let entries = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("content")
        .clone();
    // one entry per token of the answer (an ending EOS has none, as with OpenAI)
    let completion = v["usage"]["completion_tokens"].as_u64().expect("usage") as usize;
    let eos = usize::from(v["choices"][0]["finish_reason"] == "stop");
    assert_eq!(entries.len(), completion - eos);
    for e in &entries {
        let top = e["top_logprobs"].as_array().expect("top");
        assert_eq!(top.len(), 3);
        // greedy: the token is its position's most likely
        assert_eq!(e["token"], top[0]["token"]);
        assert_eq!(e["logprob"], top[0]["logprob"]);
        let lps: Vec<f64> = top
            .iter()
            .map(|t| t["logprob"].as_f64().expect("f"))
            .collect();
        assert!(
            lps.windows(2).all(|w| w[0] >= w[1]) && lps[0] <= 0.0,
            "{lps:?}"
        );
    }
    // the tokens' bytes are the answer, but for special tokens the random fixture writes
    // (`<|endoftext|>`): the entries show them, the text leaves them out
    let text: Vec<Value> = entries
        .iter()
        .filter(|e| !is_special(e["token"].as_str().expect("token")))
        .cloned()
        .collect();
    assert_eq!(String::from_utf8_lossy(&entry_bytes(&text)), a.content());

    // streamed: the same entries, spread over the chunks with their text
    body["stream"] = json!(true);
    let s = ask(&h, &body, None).await;
    let mut streamed = Vec::new();
    for event in sse_events(&s.body) {
        let Ok(chunk) = serde_json::from_str::<Value>(&event) else {
            continue;
        };
        if let Some(c) = chunk["choices"][0]["logprobs"]["content"].as_array() {
            streamed.extend(c.iter().cloned());
        }
    }
    // (the same tokens; log-probabilities to float noise: the second request's prompt comes
    // partly from the prefix cache)
    assert_eq!(streamed.len(), entries.len());
    for (s, e) in streamed.iter().zip(&entries) {
        assert_eq!((&s["token"], &s["bytes"]), (&e["token"], &e["bytes"]));
        let (a, b) = (s["logprob"].as_f64(), e["logprob"].as_f64());
        assert!((a.expect("f") - b.expect("f")).abs() < 1e-4, "{s} vs {e}");
    }

    // raw completions: tokens, their log-probabilities, the alternatives with the token's own,
    // and where each token starts in the text
    let raw = json!({"prompt": "The capital of France is", "logprobs": 2, "max_tokens": 6,
                     "temperature": 0});
    let c = post(&h, "/v1/completions", raw.to_string(), &[]).await;
    assert_eq!(c.status, 200, "{}", String::from_utf8_lossy(&c.body));
    let v = c.json();
    let lp = &v["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_str().expect("str"))
        .collect();
    assert_eq!(
        tokens
            .iter()
            .copied()
            .filter(|t| !is_special(t))
            .collect::<String>(),
        v["choices"][0]["text"].as_str().expect("text")
    );
    let offsets: Vec<usize> = lp["text_offset"]
        .as_array()
        .expect("offsets")
        .iter()
        .map(|o| o.as_u64().expect("u") as usize)
        .collect();
    let mut at = 0;
    for (t, o) in tokens.iter().zip(&offsets) {
        assert_eq!(*o, at);
        at += t.chars().count();
    }
    for (i, top) in lp["top_logprobs"]
        .as_array()
        .expect("top")
        .iter()
        .enumerate()
    {
        let top = top.as_object().expect("object");
        assert!((1..=3).contains(&top.len()), "{top:?}");
        assert_eq!(top[tokens[i]], lp["token_logprobs"][i]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logit_bias_forces_and_bans_tokens_and_bad_values_are_named() {
    let h = start(config(ServeMode::Local, "http://127.0.0.1:1")).await;
    let model = LayerSplitModel::load(tiny_llama(), &options()).expect("fixture loads");
    let tokenizer = ChatTokenizer::load(model.manifest()).expect("tokenizer");
    let vocab = model.manifest().vocab_size;
    // +100 on one token: a greedy answer of that token alone
    let forced = 300u32;
    let mut body = chat(HARMLESS);
    body["max_tokens"] = json!(4);
    body["logit_bias"] = json!({forced.to_string(): 100});
    let a = ask(&h, &body, None).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let want = tokenizer.decode(&[forced; 4]).expect("decodes");
    assert_eq!(a.content(), want);
    // −100 on the token greedy decoding would take first: another first token
    let mut plain = chat(HARMLESS);
    plain["max_tokens"] = json!(1);
    plain["logprobs"] = json!(true);
    let first =
        ask(&h, &plain, None).await.json()["choices"][0]["logprobs"]["content"][0]["bytes"].clone();
    let ids = tokenizer
        .encode_continuation(&a.content())
        .expect("encodes");
    assert_eq!(ids, [forced; 4], "the forced token is one token");
    let greedy_first = (0..vocab as u32)
        .find(|&t| json!(tokenizer.token_bytes(t)) == first)
        .expect("a token with those bytes");
    plain["logit_bias"] = json!({greedy_first.to_string(): -100});
    let banned = ask(&h, &plain, None).await.json();
    assert_ne!(
        banned["choices"][0]["logprobs"]["content"][0]["bytes"],
        first
    );

    // bad values are 400s that name the field, in both endpoints
    for (field, value, says) in [
        (
            "logit_bias",
            json!({vocab.to_string(): 1}),
            "outside the vocabulary",
        ),
        ("logit_bias", json!({"a": 1}), "token ids"),
        ("logit_bias", json!({"5": 101}), "-100 to 100"),
        ("logit_bias", json!([1, 2]), "object"),
        ("top_logprobs", json!(21), "0 to 20"),
        ("logprobs", json!("yes"), "true or false"),
    ] {
        let mut bad = chat(HARMLESS);
        bad[field] = value;
        let r = ask(&h, &bad, None).await;
        assert_eq!(r.status, 400, "{field}");
        assert_eq!(r.json()["error"]["param"], field);
        let message = r.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        assert!(message.contains(says), "{message}");
    }
    let mut alone = chat(HARMLESS);
    alone["top_logprobs"] = json!(2);
    let r = ask(&h, &alone, None).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "top_logprobs");
    alone["top_logprobs"] = json!(0);
    assert_eq!(
        ask(&h, &alone, None).await.status,
        200,
        "0 asks for nothing"
    );
    for raw in [
        json!({"prompt": "Hi", "logprobs": true}),
        json!({"prompt": "Hi", "logprobs": 1, "top_logprobs": 1}),
    ] {
        let r = post(&h, "/v1/completions", raw.to_string(), &[]).await;
        assert_eq!(r.status, 400, "{raw}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flagged_logprobs_requests_are_refused_unless_answers_pass_as_generated() {
    let refusal = inferaligner_core::Policy::default().refusal;
    let upstream = MockServer::start().await;
    for mode in [ServeMode::Local, ServeMode::Proxy] {
        let mut c = config(mode, &upstream.uri());
        let plain = PolicyConfig {
            steered_answers: SteeredAnswers::AsGenerated,
            selectable: true,
            ..PolicyConfig::default()
        };
        c.policies.insert("plain".into(), plain);
        let h = start(c).await;
        // a held steered answer's text may be the policy's, which no token of the model wrote
        let mut harmful = chat(HARMFUL);
        harmful["logprobs"] = json!(true);
        let r = ask(&h, &harmful, None).await;
        assert_eq!(r.status, 200, "{mode:?}");
        assert_eq!(r.header("x-inferaligner-gate"), "harmful");
        assert_eq!(r.header("x-inferaligner-action"), "block");
        assert_eq!(r.content(), refusal);
        assert_eq!(r.json()["choices"][0]["logprobs"], Value::Null);
        // logit bias does not stop steering
        let mut biased = chat(HARMFUL);
        biased["logit_bias"] = json!({"7": -100});
        let r = ask(&h, &biased, None).await;
        assert_eq!(r.status, 200, "{mode:?}");
        assert_eq!(r.header("x-inferaligner-action"), "steer");
        // under a policy that passes steered answers on as generated, the answer is the
        // model's tokens: steered, with their log-probabilities
        let plain = ask(&h, &harmful, Some("plain")).await;
        assert_eq!(plain.header("x-inferaligner-action"), "steer", "{mode:?}");
        let entries = &plain.json()["choices"][0]["logprobs"]["content"];
        assert!(!entries.as_array().expect("content").is_empty());
        // under `monitor` a flagged request is generated, with its log-probabilities
        if mode == ServeMode::Local {
            let watched = ask(&h, &harmful, Some("watch")).await;
            assert_eq!(watched.header("x-inferaligner-action"), "generate");
            assert!(watched.json()["choices"][0]["logprobs"]["content"].is_array());
        }
    }
    assert_unasked(&upstream).await;
}
