//! The API listener: routing, admission, the `local` and `proxy` request flows, decision
//! headers, SSE, and graceful drain.

/// A span with the fields the request flow records (admission, the gate's decision, usage),
/// after `$extra`: a request's, and each prompt's of a batch.
macro_rules! flow_span {
    ($name:literal, $($extra:tt)*) => {
        tracing::info_span!(
            $name,
            $($extra)*
            otel.status_code = Empty,
            error.type = Empty,
            gen_ai.operation.name = Empty,
            gen_ai.request.model = Empty,
            gen_ai.request.max_tokens = Empty,
            gen_ai.request.temperature = Empty,
            user.id = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            gen_ai.response.finish_reasons = Empty,
            gen_ai.prompt = Empty,
            gen_ai.completion = Empty,
            inferaligner.policy = Empty,
            inferaligner.decision = Empty,
            inferaligner.action = Empty,
            stream = Empty,
        )
    };
}

mod admission;
mod answer;
mod batch;
mod dispatch;
mod responses;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use inferaligner_core::{
    Action, CALL_OPEN, FinishReason, Policy, PolicyMode, RawCompletions, SteeredAnswers, ToolCall,
    within_limits,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::sync::mpsc::{self, UnboundedReceiver};
use tracing::{Instrument, field::Empty};

use crate::ProxyError;
use crate::backend::{
    Backend, BackendError, BackendErrorKind, BackendEvent, GateReport, Job, Prompt, SteeredAnswer,
    TokenLogprob, Tokenized,
};
use crate::body::{Body, PassBody, RequestGuard, full, json_response, sse_response};
use crate::config::{ProxyConfig, ServeMode};
use crate::metrics::{ActionLabel, GateLabel, Metrics, SteeredLabels};
use crate::openai::{self, ApiRequest, Endpoint, ResponseMeta};
use crate::passthrough::Passthrough;
use crate::upstream::Upstream;

/// Header naming who produced an error response: `sidecar` for the proxy's own errors.
pub const ORIGIN_HEADER: &str = "x-inferaligner-origin";
/// Header selecting a policy (only those the config marks `selectable`).
pub const POLICY_HEADER: &str = "x-inferaligner-policy";

/// The sidecar's shared state.
pub struct Sidecar {
    config: ProxyConfig,
    backend: Arc<dyn Backend>,
    policies: BTreeMap<String, (Arc<Policy>, bool)>,
    upstream: Option<Upstream>,
    /// Routes of the upstream passed through ungated.
    passthrough: Passthrough,
    metrics: Arc<Metrics>,
    admission: Arc<Semaphore>,
    /// Set when the drain starts: answers then say `Connection: close`.
    draining: std::sync::atomic::AtomicBool,
    model_id: String,
}

impl std::fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sidecar")
            .field("mode", &self.config.server.mode)
            .field("model", &self.model_id)
            .finish()
    }
}

/// The decision headers' values for one request.
#[derive(Debug, Clone)]
pub(super) struct DecisionHeaders {
    policy: String,
    gate: GateLabel,
    score: Option<f64>,
    threshold: f64,
    action: ActionLabel,
}

impl DecisionHeaders {
    pub(super) fn apply(&self, headers: &mut http::HeaderMap) {
        let mut set = |name: &'static str, value: String| {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(name, v);
            }
        };
        set("x-inferaligner-gate", self.gate.as_str().into());
        if let Some(score) = self.score {
            set("x-inferaligner-score", format!("{score:.4}"));
        }
        set("x-inferaligner-threshold", format!("{:.4}", self.threshold));
        set("x-inferaligner-policy", self.policy.clone());
        set("x-inferaligner-action", action_str(self.action).into());
    }
}

pub(super) fn action_str(a: ActionLabel) -> &'static str {
    match a {
        ActionLabel::generate => "generate",
        ActionLabel::steer => "steer",
        ActionLabel::block => "block",
        ActionLabel::forward => "forward",
        ActionLabel::passthrough => "passthrough",
        ActionLabel::error => "error",
    }
}

/// A choice after a request's first (`n`): its job, not yet submitted, and its events.
type LaterChoice = (Job, UnboundedReceiver<BackendEvent>);

/// A request on its way: parsed, admitted, tokenized, with its policy.
struct Admitted {
    parts: http::request::Parts,
    raw: Bytes,
    api: ApiRequest,
    tokens: Vec<u32>,
    gate_views: Vec<Vec<u32>>,
    max_new_tokens: usize,
    policy_name: String,
    policy: Arc<Policy>,
    guard: RequestGuard,
    meta: ResponseMeta,
    /// The prompt's text, which every choice's text starts with (`echo`).
    echo: Option<String>,
}

impl Admitted {
    /// The backend's job for choice `choice` of this request: the first runs the gate
    /// (`decided: None`), the others follow its decision. A seeded request's choice `i` is
    /// sampled with the seed + `i`, so that its choices differ and each is reproducible.
    fn job(
        &self,
        mode: ServeMode,
        (choice, decided): (usize, Option<Action>),
        events: mpsc::UnboundedSender<BackendEvent>,
    ) -> Job {
        let mut sampling = self.api.sampling.clone();
        sampling.seed = sampling.seed.map(|s| s.wrapping_add(choice as u64));
        Job {
            tokens: self.tokens.clone(),
            gate_views: self.gate_views.clone(),
            max_new_tokens: self.max_new_tokens,
            max_written_tokens: self.max_written_tokens(),
            stop: self.api.stop.clone(),
            // a stop string applies to text, not within a call's JSON
            stop_exempt: (self.api.tools.may_call()).then(|| CALL_OPEN.to_owned()),
            sampling,
            response_format: self.api.response_format.clone(),
            // candidates are ranked by their tokens' log-probabilities
            logprobs: match self.api.best_of > self.api.n {
                true => Some(self.api.logprobs.unwrap_or(0)),
                false => self.api.logprobs,
            },
            prompt_logprobs: self.api.logprobs.filter(|_| self.api.echo),
            decided,
            policy: self.policy.clone(),
            mode,
            events,
        }
    }

    /// See [`Job::max_written_tokens`].
    fn max_written_tokens(&self) -> usize {
        match self.api.max_tokens {
            Some(_) => self.max_new_tokens,
            None => usize::MAX,
        }
    }
}

impl Sidecar {
    /// Check the config and build the state around `backend`.
    pub fn new(
        config: ProxyConfig,
        backend: Arc<dyn Backend>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ProxyError> {
        config.validate()?;
        let upstream = match config.server.mode {
            ServeMode::Proxy => Some(Upstream::new(
                config.upstream_uri()?,
                config.connect_timeout(),
                config.read_timeout(),
            )),
            ServeMode::Local => None,
        };
        let policies = config
            .policies
            .iter()
            .map(|(name, p)| (name.clone(), (Arc::new(p.policy()), p.selectable)))
            .collect();
        let model_id = if config.server.model_name.is_empty() {
            backend.info().id.clone()
        } else {
            config.server.model_name.clone()
        };
        Ok(Self {
            passthrough: Passthrough::new(&config.upstream.passthrough)?,
            admission: Arc::new(Semaphore::new(config.server.max_concurrent_requests)),
            draining: std::sync::atomic::AtomicBool::new(false),
            config,
            backend,
            policies,
            upstream,
            metrics,
            model_id,
        })
    }

    /// The served model id.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// Serve the API on `listener` until `shutdown` resolves, then stop accepting and give
    /// in-flight requests `server.drain_grace_s` to finish.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ProxyError> {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, _) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // e.g. out of file descriptors: back off instead of spinning
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let state = self.clone();
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(state.handle(req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                    });
                }
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        let grace = self.config.drain_grace();
        tracing::info!(grace_s = grace.as_secs_f64(), "draining in-flight requests");
        // Lame duck: keep-alive connections stay open a moment and every answer says
        // `Connection: close`, so a client that sends on an idle pooled connection just as
        // the drain starts is still answered, instead of racing the close and losing its
        // request. Then idle connections close and busy ones finish.
        self.draining
            .store(true, std::sync::atomic::Ordering::Release);
        let lame_duck = (grace / 4).min(Duration::from_secs(1));
        let drained = async {
            tokio::time::sleep(lame_duck).await;
            graceful.shutdown().await;
        };
        tokio::select! {
            () = drained => tracing::info!("drained"),
            () = tokio::time::sleep(grace) => {
                tracing::warn!("drain grace period elapsed with requests still open");
            }
        }
        Ok(())
    }

    /// One request, start to end: exactly one response.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        // The span name (the GenAI operation) must be known when the span opens.
        let operation = match req.uri().path() {
            "/v1/chat/completions" => Endpoint::Chat.as_str(),
            "/v1/completions" => Endpoint::Completions.as_str(),
            "/v1/responses" => Endpoint::Responses.as_str(),
            "/v1/models" => "models",
            p if self.passthrough.matches(p) => "passthrough",
            _ => "request",
        };
        let span = flow_span!(
            "request",
            otel.name = operation,
            otel.kind = "server",
            http.request.method = %req.method(),
            url.path = req.uri().path(),
            http.response.status_code = Empty,
            gen_ai.system = "inferaligner",
            inferaligner.mode = self.config.server.mode.as_str(),
        );
        set_parent_from(&span, req.headers());
        let response = self.route(req).instrument(span.clone()).await;
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                span.record("error.type", e.kind());
                span.record("otel.status_code", "ERROR");
                error_response(&e, self.config.server.retry_after_s)
            }
        };
        span.record("http.response.status_code", response.status().as_u16());
        let mut response = response;
        if self.draining.load(std::sync::atomic::Ordering::Acquire) {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    async fn route(self: &Arc<Self>, req: Request<Incoming>) -> Result<Response<Body>, ProxyError> {
        match (req.method(), req.uri().path()) {
            (&Method::POST, "/v1/chat/completions") => self.api(req, Endpoint::Chat).await,
            (&Method::POST, "/v1/completions") => self.api(req, Endpoint::Completions).await,
            (&Method::POST, "/v1/responses") => self.api(req, Endpoint::Responses).await,
            (&Method::GET, "/v1/models") => Ok(json_response(StatusCode::OK, &self.models())),
            (&Method::GET, p) if p.starts_with("/v1/models/") => {
                let id = p["/v1/models/".len()..]
                    .replace("%40", "@")
                    .replace("%2F", "/")
                    .replace("%2f", "/");
                let models = self.models();
                let found = models["data"]
                    .as_array()
                    .and_then(|d| d.iter().find(|m| m["id"] == id.as_str()));
                match found {
                    Some(model) => Ok(json_response(StatusCode::OK, model)),
                    None => Err(ProxyError::NotFound {
                        method: "GET".into(),
                        path: p.chars().take(200).collect(),
                    }),
                }
            }
            (_, p) if self.passthrough.matches(p) => self.pass_through(req).await,
            (m, p) => {
                let allow = match p {
                    "/v1/chat/completions" | "/v1/completions" | "/v1/responses" => Some("POST"),
                    "/v1/models" => Some("GET"),
                    _ if p.starts_with("/v1/models/") => Some("GET"),
                    _ => None,
                };
                let (method, path) = (m.to_string(), p.chars().take(200).collect());
                Err(match allow {
                    Some(allow) => ProxyError::MethodNotAllowed {
                        method,
                        path,
                        allow,
                    },
                    None => ProxyError::NotFound { method, path },
                })
            }
        }
    }

    fn models(&self) -> serde_json::Value {
        let created = 0;
        let mut data = vec![json!({
            "id": self.model_id, "object": "model", "created": created, "owned_by": "inferaligner",
            "max_model_len": self.backend.info().context_length,
        })];
        for (name, (_, selectable)) in &self.policies {
            if *selectable {
                data.push(json!({
                    "id": format!("{}@{name}", self.model_id), "object": "model",
                    "created": created, "owned_by": "inferaligner", "root": self.model_id,
                }));
            }
        }
        json!({"object": "list", "data": data})
    }

    /// Pick the request's policy: header, then `model_policy` (the `@policy` of `model`), then
    /// the default.
    fn select_policy(
        &self,
        headers: &http::HeaderMap,
        model_policy: Option<&str>,
    ) -> Result<(String, Arc<Policy>), ProxyError> {
        let from_header = headers
            .get(POLICY_HEADER)
            .map(|v| {
                v.to_str()
                    .map(str::to_owned)
                    .map_err(|_| ProxyError::invalid("x-inferaligner-policy is not text", None))
            })
            .transpose()?;
        let from_model = model_policy.map(str::to_owned);
        // the header wins over the model name (the operator's gateway may set it)
        let param = if from_header.is_some() {
            None
        } else {
            Some("model".into())
        };
        let Some(name) = from_header.or(from_model) else {
            let name = self.config.default_policy.clone();
            let (policy, _) = &self.policies[&name];
            return Ok((name, policy.clone()));
        };
        match self.policies.get(&name) {
            Some((policy, true)) => Ok((name, policy.clone())),
            _ if name == self.config.default_policy => {
                Ok((name.clone(), self.policies[&name].0.clone()))
            }
            _ => Err(ProxyError::InvalidRequest {
                message: format!(
                    "policy `{}` does not exist or is not selectable",
                    name.chars().take(64).collect::<String>()
                ),
                param,
                code: Some("policy_not_selectable"),
            }),
        }
    }
}

/// The one place errors become responses: OpenAI error body, status, `Retry-After` on
/// overload, and the header saying the sidecar (not the upstream) answered.
pub fn error_response(e: &ProxyError, retry_after_s: u32) -> Response<Body> {
    let mut r = json_response(e.status(), &e.body());
    r.headers_mut()
        .insert(ORIGIN_HEADER, HeaderValue::from_static("sidecar"));
    if let ProxyError::MethodNotAllowed { allow, .. } = e {
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allow));
    }
    if matches!(e, ProxyError::Overloaded | ProxyError::Unavailable(_)) {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
    }
    if e.status().is_server_error() {
        tracing::warn!(error = %e, kind = e.kind(), "request failed");
    } else {
        tracing::debug!(error = %e, kind = e.kind(), "request refused");
    }
    r
}

/// Continue the caller's trace (W3C `traceparent`), if the binary installed a propagator.
fn set_parent_from(span: &tracing::Span, headers: &http::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&opentelemetry_http::HeaderExtractor(headers))
    });
    let _ = span.set_parent(parent);
}

/// A count as a span attribute: tracing records `usize` as text, `i64` as an OTLP integer
/// (which trace backends can compare and aggregate).
fn int(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn is_gate_failure(e: &BackendError) -> bool {
    e.kind == BackendErrorKind::Model
}

fn backend_error(e: BackendError) -> ProxyError {
    match e.kind {
        BackendErrorKind::InvalidRequest => ProxyError::InvalidRequest {
            param: e.param.map(Cow::Borrowed),
            message: e.message,
            code: None,
        },
        BackendErrorKind::Overloaded => ProxyError::Overloaded,
        BackendErrorKind::Unavailable => ProxyError::Unavailable(e.message),
        BackendErrorKind::Model => ProxyError::Model(e.message),
    }
}
