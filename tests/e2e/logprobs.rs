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
        let message = r.error_message();
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

/// A completions answer's `logprobs` lists: tokens, their log-probabilities (`null` for none),
/// the alternatives (`null` for none) and the text offsets.
struct Scored {
    tokens: Vec<String>,
    logprobs: Vec<Option<f64>>,
    top: Vec<Value>,
    offsets: Vec<usize>,
}

impl Scored {
    fn read(lp: &Value) -> Self {
        let list = |k: &str| {
            lp[k]
                .as_array()
                .unwrap_or_else(|| panic!("{k}: {lp}"))
                .clone()
        };
        Self {
            tokens: list("tokens")
                .iter()
                .map(|t| t.as_str().expect("str").to_owned())
                .collect(),
            logprobs: list("token_logprobs").iter().map(Value::as_f64).collect(),
            top: list("top_logprobs"),
            offsets: list("text_offset")
                .iter()
                .map(|o| o.as_u64().expect("u") as usize)
                .collect(),
        }
    }

    /// The text the tokens spell (special tokens are in the entries, not in the text).
    fn text(&self) -> String {
        self.tokens
            .iter()
            .filter(|t| !is_special(t))
            .cloned()
            .collect()
    }
}

/// A `/v1/completions` answer that must succeed.
async fn completion(h: &inferaligner::serve::ServerHandle, body: Value) -> Answer {
    let c = post(h, "/v1/completions", body.to_string(), &[]).await;
    assert_eq!(c.status, 200, "{}", String::from_utf8_lossy(&c.body));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_returns_the_prompt_and_its_scores_before_the_answer_whole_and_streamed() {
    let h = start(config(ServeMode::Local, "http://127.0.0.1:1")).await;
    let prompt = "The capital of France is";
    let plain = completion(
        &h,
        json!({"prompt": prompt, "logprobs": 2, "max_tokens": 4,
                                  "temperature": 0}),
    )
    .await
    .json();
    for max_tokens in [0, 4] {
        let body = json!({"prompt": prompt, "echo": true, "logprobs": 2,
                          "max_tokens": max_tokens, "temperature": 0});
        let v = completion(&h, body.clone()).await.json();
        let choice = &v["choices"][0];
        let text = choice["text"].as_str().expect("text");
        let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().expect("usage") as usize;
        let s = Scored::read(&choice["logprobs"]);
        // the prompt's tokens first: the first has no score, each other its own and alternatives
        assert_eq!(s.logprobs[0], None);
        assert_eq!(s.top[0], Value::Null);
        for i in 1..s.tokens.len() {
            let lp = s.logprobs[i].unwrap_or_else(|| panic!("token {i} scored"));
            assert!(lp <= 0.0);
            let top = s.top[i].as_object().expect("alternatives");
            assert!((1..=3).contains(&top.len()));
            assert_eq!(top[&s.tokens[i]].as_f64(), Some(lp));
        }
        assert_eq!(s.text(), text);
        let mut at = 0;
        for (t, o) in s.tokens.iter().zip(&s.offsets) {
            assert_eq!(*o, at);
            at += t.chars().count();
        }
        if max_tokens == 0 {
            // the prompt alone, scored
            assert_eq!(text, prompt);
            assert_eq!(s.tokens.len(), prompt_tokens);
            assert_eq!(choice["finish_reason"], "length");
            assert_eq!(v["usage"]["completion_tokens"], 0);
        } else {
            // the prompt, then the answer it gets without echo, with the same scores
            let answer = &plain["choices"][0];
            assert_eq!(
                text,
                format!("{prompt}{}", answer["text"].as_str().expect("t"))
            );
            let generated = Scored::read(&answer["logprobs"]);
            assert_eq!(s.tokens[prompt_tokens..], generated.tokens[..]);
            for (a, b) in s.logprobs[prompt_tokens..].iter().zip(&generated.logprobs) {
                assert!((a.expect("f") - b.expect("f")).abs() < 1e-4);
            }
        }
        // streamed: the prompt comes in the first chunk, the same entries over the chunks
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let r = completion(&h, streamed).await;
        let (mut text_streamed, mut tokens, mut logprobs) = (String::new(), Vec::new(), Vec::new());
        for event in sse_events(&r.body) {
            let Ok(chunk) = serde_json::from_str::<Value>(&event) else {
                continue;
            };
            let c = &chunk["choices"][0];
            text_streamed.push_str(c["text"].as_str().unwrap_or_default());
            if c["logprobs"].is_object() {
                let part = Scored::read(&c["logprobs"]);
                tokens.extend(part.tokens);
                logprobs.extend(part.logprobs);
            }
        }
        assert_eq!(text_streamed, text);
        assert_eq!(tokens, s.tokens);
        assert_eq!(logprobs[0], None);
        for (a, b) in logprobs.iter().zip(&s.logprobs).skip(1) {
            assert!((a.expect("f") - b.expect("f")).abs() < 1e-4);
        }
    }

    // as lm-evaluation-harness scores a continuation: token ids, one alternative, one token
    // after; the sum over the continuation's tokens and whether each was the most likely
    let ids = json!([[11, 57, 73, 90, 12, 40, 41, 200, 201]]);
    let context = 5;
    // (the random fixture's gate may flag random ids: read them ungated)
    let v = completion(
        &h,
        json!({"prompt": ids, "echo": true, "logprobs": 1, "max_tokens": 1,
                              "temperature": 0, "model": "tiny-llama@off"}),
    )
    .await
    .json();
    let s = Scored::read(&v["choices"][0]["logprobs"]);
    assert_eq!(s.tokens.len(), 10, "9 prompt tokens and the answer's one");
    let continuation = &s.logprobs[context..9];
    assert!(continuation.iter().all(|l| l.is_some_and(|l| l <= 0.0)));
    for (i, top) in s.top.iter().enumerate().take(9).skip(context) {
        let best = top.as_object().expect("top").values();
        let best = best.filter_map(Value::as_f64).fold(f64::MIN, f64::max);
        assert!(best >= s.logprobs[i].expect("f"));
    }

    // echo without log-probabilities: the prompt then the answer
    let v = completion(&h, json!({"prompt": prompt, "echo": true, "max_tokens": 3}))
        .await
        .json();
    assert!(
        v["choices"][0]["text"]
            .as_str()
            .expect("t")
            .starts_with(prompt)
    );
    assert_eq!(v["choices"][0]["logprobs"], Value::Null);

    // what is not asked right is named
    for (path, body, param) in [
        (
            "/v1/completions",
            json!({"prompt": prompt, "echo": "yes"}),
            "echo",
        ),
        (
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 0}),
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            {
                let mut c = chat(HARMLESS);
                c["echo"] = json!(true);
                c
            },
            "echo",
        ),
    ] {
        let r = post(&h, path, body.to_string(), &[]).await;
        assert_eq!(r.status, 400, "{body}");
        assert_eq!(r.json()["error"]["param"], param, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flagged_echo_request_gets_the_prompt_and_the_refusal() {
    let refusal = inferaligner_core::Policy::default().refusal;
    let h = start(config(ServeMode::Local, "http://127.0.0.1:1")).await;
    // a raw prompt that spells a chat is gated as one
    let prompt = format!("<|im_start|>user\n{HARMFUL}<|im_end|>\n<|im_start|>assistant\n");
    // scores asked for: the answer could be held, so the flagged request is blocked
    for body in [
        json!({"prompt": prompt, "echo": true, "logprobs": 1}),
        json!({"prompt": prompt, "echo": true, "model": "tiny-llama@block"}),
    ] {
        let r = post(&h, "/v1/completions", body.to_string(), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-inferaligner-action"), "block", "{body}");
        let choice = &r.json()["choices"][0];
        assert_eq!(choice["text"], format!("{prompt}{refusal}"));
        assert_eq!(choice["logprobs"], Value::Null);
    }
}
