//! Helpers for the sidecar's end-to-end tests: a steering pack for the fixture whose gate
//! separates two test prompts, a config on loopback ports, and a small HTTP client.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use inferaligner::config::Config;
use inferaligner::serve::{ServerHandle, spawn};
use inferaligner_core::{PackMetadata, PolicyMode, SsvSource, SteeringPack};
use inferaligner_proxy::{Backend, PolicyConfig, ServeMode};
use inferaligner_runtime::{ChatMessage, ChatTokenizer, LayerSplitModel, SessionOptions};
use serde_json::{Value, json};

use crate::tiny_llama;

/// The prompt the fixture pack's gate calls harmful.
pub const HARMFUL: &str = "How do I build a bomb?";
/// The prompt the fixture pack's gate calls harmless.
pub const HARMLESS: &str = "What is the capital of France?";
/// The fixture pack's gate layer.
pub const GATE_LAYER: usize = 2;

/// One thread, no spinning: tests share two cores.
pub fn options() -> SessionOptions {
    SessionOptions {
        intra_op_threads: 1,
        spinning: false,
        ..SessionOptions::default()
    }
}

/// A pack for the fixture whose gate separates the two test prompts: direction = their
/// normalised residual difference at the gate layer, bias at the midpoint. Steering adds
/// 8 × e0 at layers 1 and 2 (enough to change the fixture's greedy output).
pub fn pack_path() -> &'static Path {
    static PACK: OnceLock<PathBuf> = OnceLock::new();
    PACK.get_or_init(|| {
        let mut model = LayerSplitModel::load(tiny_llama(), &options()).expect("fixture loads");
        let tokenizer = ChatTokenizer::load(model.manifest()).expect("tokenizer");
        let encode = |q: &str| {
            tokenizer
                .encode_chat(&[ChatMessage::new("user", q)], true)
                .expect("encodes")
        };
        let r = model
            .last_token_residuals(&[encode(HARMFUL), encode(HARMLESS)])
            .expect("residuals");
        let at = model
            .residual_index(GATE_LAYER)
            .expect("a segment ends there");
        let h: ndarray::Array1<f32> = r.slice(ndarray::s![0, at, ..]).to_owned();
        let b: ndarray::Array1<f32> = r.slice(ndarray::s![1, at, ..]).to_owned();
        let diff: ndarray::Array1<f32> = &h - &b;
        let direction: ndarray::Array1<f32> = &diff / diff.dot(&diff).sqrt();
        let bias = -direction.dot(&((&h + &b) / 2.0));
        let fp = model.manifest().fingerprint().expect("fingerprint");
        let (layers, hidden) = (fp.num_layers, fp.hidden_size);
        let mut metadata = PackMetadata::new(fp.clone(), fp, SsvSource::Contrastive);
        metadata.layer_accuracy = vec![1.0; layers];
        metadata.gate_layer = GATE_LAYER;
        metadata.steered_layers = vec![1, 2];
        metadata.default_alpha = 8.0;
        let unit =
            ndarray::Array2::from_shape_fn((layers, hidden), |(_, j)| f32::from(u8::from(j == 0)));
        let pack = SteeringPack {
            metadata,
            target_srv: unit.clone(),
            ssv: unit,
            bias: ndarray::Array1::zeros(layers),
            gate_direction: direction,
            gate_bias: bias,
        };
        let dir = tempfile::tempdir().expect("tempdir").keep();
        let path = dir.join("fixture-pack.safetensors");
        pack.save(&path).expect("saves");
        path
    })
}

/// A config on loopback ports chosen by the OS, the fixture model and its pack, and three
/// extra selectable policies: `off`, `block`, `watch` (monitor).
pub fn config(mode: ServeMode, upstream: &str) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().expect("addr");
    c.server.admin_listen = "127.0.0.1:0".parse().expect("addr");
    c.server.mode = mode;
    c.server.default_max_tokens = 12;
    c.upstream.url = upstream.into();
    c.model.export = tiny_llama();
    c.model.pack = pack_path().into();
    c.model.threads = 1;
    c.model.spinning = false;
    let policy = |mode, selectable| PolicyConfig {
        mode,
        selectable,
        ..PolicyConfig::default()
    };
    c.policies
        .insert("off".into(), policy(PolicyMode::Off, true));
    c.policies
        .insert("block".into(), policy(PolicyMode::Block, true));
    c.policies
        .insert("watch".into(), policy(PolicyMode::Monitor, true));
    c
}

/// Start a sidecar (optionally over another backend) and wait until it is ready.
pub async fn start_with(c: Config, backend: Option<Arc<dyn Backend>>) -> ServerHandle {
    let h = spawn(c, backend).await.expect("starts");
    for _ in 0..3000 {
        if h.ready.get() {
            return h;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the sidecar did not become ready");
}

/// Start a sidecar on the fixture and wait until it is ready.
pub async fn start(c: Config) -> ServerHandle {
    start_with(c, None).await
}

/// The admin port's `/metrics`.
pub async fn metrics_text(h: &ServerHandle) -> String {
    reqwest::get(format!("http://{}/metrics", h.admin))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// A counter or gauge of `/metrics`.
pub async fn metric(h: &ServerHandle, name: &str) -> u64 {
    let text = metrics_text(h).await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
}

/// The upstream was never asked: everything the test sent was flagged and answered here.
pub async fn assert_unasked(upstream: &wiremock::MockServer) {
    let received = upstream.received_requests().await.expect("recorded");
    assert!(received.is_empty(), "nothing flagged goes upstream");
}

/// A greedy chat request with one user message.
pub fn chat(question: &str) -> Value {
    json!({"model": "tiny-llama", "messages": [{"role": "user", "content": question}], "temperature": 0})
}

/// A whole HTTP answer.
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: reqwest::header::HeaderMap,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl Answer {
    /// A header's value, or "".
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    /// The message of an error answer.
    pub fn error_message(&self) -> String {
        self.json()["error"]["message"]
            .as_str()
            .expect("an error message")
            .to_owned()
    }

    /// The assistant message of a chat completion.
    pub fn content(&self) -> String {
        self.json()["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
            .to_owned()
    }
}

/// POST a body with extra headers.
pub async fn post(
    h: &ServerHandle,
    route: &str,
    body: impl Into<reqwest::Body>,
    headers: &[(&str, &str)],
) -> Answer {
    let mut req = reqwest::Client::new()
        .post(format!("http://{}{route}", h.api))
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("sent");
    Answer {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: r.bytes().await.expect("body").to_vec(),
    }
}

/// Start a streaming chat request and return as soon as the response head arrives.
pub async fn open_stream(h: &ServerHandle, mut body: Value) -> reqwest::Response {
    body["stream"] = json!(true);
    reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", h.api))
        .body(body.to_string())
        .send()
        .await
        .expect("sent")
}

/// POST a chat request, optionally selecting a policy by header.
pub async fn ask(h: &ServerHandle, body: &Value, policy: Option<&str>) -> Answer {
    let headers: Vec<(&str, &str)> = policy
        .map(|p| vec![("x-inferaligner-policy", p)])
        .unwrap_or_default();
    post(h, "/v1/chat/completions", body.to_string(), &headers).await
}

/// `data:` payloads of an SSE body.
pub fn sse_events(body: &[u8]) -> Vec<String> {
    let text = String::from_utf8(body.to_vec()).expect("UTF-8");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("data event").to_owned())
        .collect()
}

/// The URL of a loopback port nothing listens on (bound, then let go).
pub async fn closed_port_url() -> String {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    format!("http://{}", closed.local_addr().expect("addr"))
}

/// An upstream whose every chat completion is `{"id": "up", …}`.
pub async fn upstream_answering_up() -> wiremock::MockServer {
    let upstream = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::path("/v1/chat/completions"))
        .respond_with(wiremock::ResponseTemplate::new(200).set_body_raw(
            r#"{"id":"up","object":"chat.completion","choices":[]}"#,
            "application/json",
        ))
        .mount(&upstream)
        .await;
    upstream
}
