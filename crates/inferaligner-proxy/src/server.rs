//! The API listener: routing, admission, the `local` and `proxy` request flows, decision
//! headers, SSE, and graceful drain.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use inferaligner_core::{Action, Policy, PolicyMode};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc::{self, UnboundedReceiver};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{Instrument, field::Empty};

use crate::ProxyError;
use crate::backend::{
    Backend, BackendError, BackendErrorKind, BackendEvent, Finish, GateReport, Job, Plan, Prompt,
};
use crate::config::{Mode, ProxyConfig};
use crate::metrics::{ActionLabel, GateLabel, Metrics, UpstreamErrorKind};
use crate::openai::{self, ApiRequest, Endpoint, ResponseMeta};
use crate::upstream::Upstream;

/// Boxed error of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Response body of every route.
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Header naming who produced an error response: `sidecar` for the proxy's own errors.
pub const ORIGIN_HEADER: &str = "x-inferaligner-origin";
/// Header selecting a policy (only those the config marks `selectable`).
pub const POLICY_HEADER: &str = "x-inferaligner-policy";

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

/// Holds a request's admission permit and in-flight count until the response ends (for a
/// stream, until its last chunk).
#[derive(Debug)]
pub struct RequestGuard {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl RequestGuard {
    /// Count an upstream failure seen while the response streams.
    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.metrics.upstream_error(kind);
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
    }
}

/// A streamed body fed by a channel (SSE from local generation).
struct PassBody {
    rx: mpsc::Receiver<Bytes>,
    _guard: RequestGuard,
}

impl http_body::Body for PassBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

/// The sidecar's shared state.
pub struct Sidecar {
    config: ProxyConfig,
    backend: Arc<dyn Backend>,
    policies: BTreeMap<String, (Arc<Policy>, bool)>,
    upstream: Option<Upstream>,
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
struct Verdict {
    policy: String,
    gate: GateLabel,
    score: Option<f64>,
    threshold: f64,
    action: ActionLabel,
}

impl Verdict {
    fn apply(&self, headers: &mut http::HeaderMap) {
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

fn action_str(a: ActionLabel) -> &'static str {
    match a {
        ActionLabel::generate => "generate",
        ActionLabel::steer => "steer",
        ActionLabel::block => "block",
        ActionLabel::forward => "forward",
        ActionLabel::error => "error",
    }
}

/// A request on its way: parsed, admitted, tokenized, with its policy.
struct Admitted {
    parts: http::request::Parts,
    raw: Bytes,
    api: ApiRequest,
    tokens: Vec<u32>,
    max_new_tokens: usize,
    policy_name: String,
    policy: Arc<Policy>,
    guard: RequestGuard,
    meta: ResponseMeta,
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
            Mode::Proxy => Some(Upstream::new(
                config.upstream_uri()?,
                config.connect_timeout(),
                config.read_timeout(),
            )),
            Mode::Local => None,
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
            "/v1/models" => "models",
            _ => "request",
        };
        let span = tracing::info_span!(
            "request",
            otel.name = operation,
            otel.kind = "server",
            otel.status_code = Empty,
            http.request.method = %req.method(),
            url.path = req.uri().path(),
            http.response.status_code = Empty,
            error.type = Empty,
            gen_ai.system = "inferaligner",
            gen_ai.operation.name = Empty,
            gen_ai.request.model = Empty,
            gen_ai.request.max_tokens = Empty,
            gen_ai.request.temperature = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            gen_ai.response.finish_reasons = Empty,
            gen_ai.prompt = Empty,
            gen_ai.completion = Empty,
            inferaligner.mode = self.config.server.mode.as_str(),
            inferaligner.policy = Empty,
            inferaligner.decision = Empty,
            inferaligner.action = Empty,
            stream = Empty,
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
            (m, p) => Err(ProxyError::NotFound {
                method: m.to_string(),
                path: p.chars().take(200).collect(),
            }),
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

    /// Pick the request's policy: header, then `model@policy`, then the default.
    fn select_policy(
        &self,
        headers: &http::HeaderMap,
        model: Option<&str>,
    ) -> Result<(String, Arc<Policy>), ProxyError> {
        let from_header = headers
            .get(POLICY_HEADER)
            .map(|v| {
                v.to_str()
                    .map(str::to_owned)
                    .map_err(|_| ProxyError::invalid("x-inferaligner-policy is not text", None))
            })
            .transpose()?;
        let from_model = model
            .and_then(|m| m.rsplit_once('@'))
            .map(|(_, p)| p.to_owned());
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
                param: Some("model"),
                code: Some("policy_not_selectable"),
            }),
        }
    }

    fn admit_guard(&self) -> Result<RequestGuard, ProxyError> {
        let permit = self.admission.clone().try_acquire_owned().map_err(|_| {
            self.metrics.overloaded.inc();
            ProxyError::Overloaded
        })?;
        self.metrics.in_flight.inc();
        Ok(RequestGuard {
            _permit: permit,
            metrics: self.metrics.clone(),
        })
    }

    async fn admit(
        self: &Arc<Self>,
        req: Request<Incoming>,
        endpoint: Endpoint,
    ) -> Result<Admitted, ProxyError> {
        let span = tracing::Span::current();
        let guard = self.admit_guard()?;
        let limit = self.config.server.max_body_bytes;
        let (parts, body) = req.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(ProxyError::BodyTooLarge { limit });
        }
        let raw = match Limited::new(body, limit).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(ProxyError::BodyTooLarge { limit });
            }
            Err(e) => {
                return Err(ProxyError::invalid(
                    format!("could not read the request body: {e}"),
                    None,
                ));
            }
        };
        let api = openai::parse_request(endpoint, &raw)?;
        if self.config.server.mode == Mode::Local {
            // every answer is written here: refuse what the generator cannot honour up front
            api.refuse_unsupported()?;
        }
        span.record("gen_ai.operation.name", endpoint.as_str());
        span.record("stream", api.stream);
        span.record(
            "gen_ai.request.temperature",
            f64::from(api.sampling.temperature),
        );
        if let Some(m) = &api.model {
            span.record(
                "gen_ai.request.model",
                m.chars().take(128).collect::<String>(),
            );
        }
        if self.config.trace.record_content {
            let prompt = match &api.prompt {
                Prompt::Chat(m) => serde_json::to_string(m).unwrap_or_default(),
                Prompt::Text(t) => t.clone(),
                Prompt::Tokens(ids) => serde_json::to_string(ids).unwrap_or_default(),
            };
            span.record("gen_ai.prompt", prompt);
        }
        let (policy_name, policy) = self.select_policy(&parts.headers, api.model.as_deref())?;
        span.record("inferaligner.policy", policy_name.as_str());

        let backend = self.backend.clone();
        let prompt = api.prompt.clone();
        let tokens = tokio::task::spawn_blocking(move || backend.tokenize(&prompt))
            .await
            .map_err(|e| ProxyError::Model(format!("tokenizer task failed: {e}")))?
            .map_err(backend_error)?;
        let context = self.backend.info().context_length;
        let max_prompt = self
            .config
            .server
            .max_prompt_tokens
            .min(context.saturating_sub(1));
        if tokens.len() > max_prompt {
            return Err(ProxyError::InvalidRequest {
                message: format!(
                    "the prompt is {} tokens; at most {max_prompt} are accepted (model context {context})",
                    tokens.len()
                ),
                param: Some(match endpoint {
                    Endpoint::Chat => "messages",
                    Endpoint::Completions => "prompt",
                }),
                code: Some("context_length_exceeded"),
            });
        }
        let max_new_tokens = api
            .max_tokens
            .unwrap_or(self.config.server.default_max_tokens)
            .min(self.config.server.max_new_tokens)
            .min(context - tokens.len());
        span.record("gen_ai.request.max_tokens", int(max_new_tokens));
        span.record("gen_ai.usage.input_tokens", int(tokens.len()));
        let meta = ResponseMeta::new(endpoint, self.model_id.clone());
        Ok(Admitted {
            parts,
            raw,
            api,
            tokens,
            max_new_tokens,
            policy_name,
            policy,
            guard,
            meta,
        })
    }

    async fn api(
        self: &Arc<Self>,
        req: Request<Incoming>,
        endpoint: Endpoint,
    ) -> Result<Response<Body>, ProxyError> {
        let deadline = Instant::now() + self.config.request_timeout();
        let timeout = self.config.request_timeout().as_secs_f64();
        let admitted = tokio::time::timeout_at(deadline.into(), self.admit(req, endpoint))
            .await
            .map_err(|_| ProxyError::Timeout(timeout))??;
        match tokio::time::timeout_at(deadline.into(), self.dispatch(admitted, deadline)).await {
            Ok(r) => r,
            Err(_) => Err(ProxyError::Timeout(timeout)),
        }
    }

    async fn dispatch(
        self: &Arc<Self>,
        a: Admitted,
        deadline: Instant,
    ) -> Result<Response<Body>, ProxyError> {
        let span = tracing::Span::current();
        let mode = self.config.server.mode;
        let gated = a.policy.mode != PolicyMode::Off && self.backend.info().has_pack;
        // `+ 0.0` turns the -0 of a zero offset into 0
        let threshold = -f64::from(a.policy.offset) + 0.0;
        let mut verdict = Verdict {
            policy: a.policy_name.clone(),
            gate: GateLabel::off,
            score: None,
            threshold,
            action: ActionLabel::generate,
        };
        if mode == Mode::Proxy && !gated {
            verdict.action = ActionLabel::forward;
            return self.forward(a, verdict).await;
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let job = Job {
            tokens: a.tokens.clone(),
            max_new_tokens: a.max_new_tokens,
            stop: a.api.stop.clone(),
            sampling: a.api.sampling.clone(),
            policy: a.policy.clone(),
            plan: match mode {
                Mode::Local => Plan::Local,
                Mode::Proxy => Plan::GateFirst,
            },
            events: tx,
        };
        let gate_span = tracing::info_span!(
            "gate",
            inferaligner.decision = Empty,
            inferaligner.score = Empty,
            inferaligner.threshold = threshold,
            inferaligner.gate_layer = Empty,
            inferaligner.policy = a.policy_name.as_str(),
            inferaligner.action = Empty,
            inferaligner.alpha = Empty,
            inferaligner.steered_layers = Empty,
            error.type = Empty,
        );
        let started = Instant::now();
        // The first event: the gate's decision, or (no gate) the first text, or a failure. A
        // gate that cannot run at all — the engine stopped, or it dropped the request — is a
        // gating failure like a model error: the policy's `on_error` decides.
        let first = match self.backend.submit(job) {
            Err(e) if e.kind == BackendErrorKind::Overloaded => {
                self.metrics.overloaded.inc();
                return Err(backend_error(e));
            }
            Err(e) if gated && e.kind == BackendErrorKind::Unavailable => {
                Some(BackendEvent::Failed(BackendError::new(
                    BackendErrorKind::Model,
                    format!("the gate could not run: {}", e.message),
                )))
            }
            Err(e) => return Err(backend_error(e)),
            Ok(()) if gated => {
                let first = rx.recv().instrument(gate_span.clone()).await;
                self.metrics
                    .gate_latency
                    .observe(started.elapsed().as_secs_f64());
                Some(first.unwrap_or_else(|| {
                    BackendEvent::Failed(BackendError::new(
                        BackendErrorKind::Model,
                        "the engine dropped the request before its gate decision",
                    ))
                }))
            }
            Ok(()) => None,
        };
        match first {
            Some(BackendEvent::Gate(report)) => {
                let GateReport {
                    decision,
                    layer,
                    alpha,
                    ref layers,
                } = report;
                verdict.gate = if decision.harmful {
                    GateLabel::harmful
                } else {
                    GateLabel::harmless
                };
                verdict.score = Some(decision.score);
                verdict.action = match (decision.action, mode) {
                    (Action::Block, _) => ActionLabel::block,
                    (Action::Steer, _) => ActionLabel::steer,
                    (Action::Pass, Mode::Local) => ActionLabel::generate,
                    (Action::Pass, Mode::Proxy) => ActionLabel::forward,
                };
                gate_span.record("inferaligner.decision", verdict.gate.as_str());
                gate_span.record("inferaligner.score", decision.score);
                gate_span.record("inferaligner.gate_layer", int(layer));
                gate_span.record("inferaligner.action", action_str(verdict.action));
                if decision.action == Action::Steer {
                    gate_span.record("inferaligner.alpha", f64::from(alpha));
                    gate_span.record("inferaligner.steered_layers", format!("{layers:?}"));
                }
            }
            Some(BackendEvent::Failed(e)) if is_gate_failure(&e) => {
                gate_span.record("error.type", "gate_failed");
                tracing::warn!(parent: &gate_span, error = %e.message, on_error = ?a.policy.on_error, "gating failed");
                verdict.gate = GateLabel::error;
                verdict.action = match (a.policy.on_failure(), mode) {
                    (Action::Pass, Mode::Proxy) => ActionLabel::forward,
                    (Action::Pass, Mode::Local) => {
                        // fail-open cannot help when the local model itself failed
                        self.metrics.request(GateLabel::error, ActionLabel::error);
                        return Err(ProxyError::Model(e.message));
                    }
                    _ => ActionLabel::block,
                };
                gate_span.record("inferaligner.action", action_str(verdict.action));
            }
            Some(BackendEvent::Failed(e)) => return Err(backend_error(e)),
            Some(other) => {
                return Err(ProxyError::Model(format!(
                    "backend sent {other:?} before its gate decision"
                )));
            }
            None => {}
        }
        drop(gate_span);
        // A steered request in proxy mode is answered here, not by the upstream: a field only
        // the upstream could honour is refused, with the decision that led here.
        let unsupported = match verdict.action {
            ActionLabel::steer | ActionLabel::generate => a.api.refuse_unsupported().err(),
            _ => None,
        };
        if unsupported.is_some() {
            verdict.action = ActionLabel::error;
        }
        span.record("inferaligner.decision", verdict.gate.as_str());
        span.record("inferaligner.action", action_str(verdict.action));
        self.metrics.request(verdict.gate, verdict.action);
        if let Some(e) = unsupported {
            drop(rx);
            let mut response = error_response(&e, self.config.server.retry_after_s);
            verdict.apply(response.headers_mut());
            return Ok(response);
        }
        let outcome = match verdict.action {
            ActionLabel::forward => {
                drop(rx);
                self.forward(a, verdict.clone()).await
            }
            ActionLabel::block => {
                drop(rx);
                self.refuse(a, verdict.clone())
            }
            _ => self.generate(a, verdict.clone(), rx, deadline).await,
        };
        // An error after the gate ran still says what the gate decided.
        outcome.or_else(|e| {
            span.record("error.type", e.kind());
            span.record("otel.status_code", "ERROR");
            let mut response = error_response(&e, self.config.server.retry_after_s);
            verdict.action = ActionLabel::error;
            verdict.apply(response.headers_mut());
            Ok(response)
        })
    }

    async fn forward(
        self: &Arc<Self>,
        a: Admitted,
        verdict: Verdict,
    ) -> Result<Response<Body>, ProxyError> {
        let upstream = self
            .upstream
            .as_ref()
            .ok_or_else(|| ProxyError::Config("no upstream in local mode".into()))?;
        if verdict.gate == GateLabel::off {
            self.metrics.request(verdict.gate, verdict.action);
        }
        let body = forwarded_body(&a.raw, a.api.model.as_deref(), a.max_new_tokens)?;
        let span = tracing::info_span!(
            "forward",
            otel.kind = "client",
            server.address = upstream.authority(),
            http.response.status_code = Empty,
        );
        let mut response = upstream
            .forward(&a.parts, body, a.guard, &self.metrics)
            .instrument(span.clone())
            .await?;
        span.record("http.response.status_code", response.status().as_u16());
        verdict.apply(response.headers_mut());
        Ok(response)
    }

    fn refuse(&self, a: Admitted, verdict: Verdict) -> Result<Response<Body>, ProxyError> {
        let text = a.policy.refusal.clone();
        let completion = self
            .backend
            .tokenize(&Prompt::Text(text.clone()))
            .map_or(0, |t| t.len());
        let usage = (a.tokens.len(), completion);
        tracing::Span::current().record("gen_ai.usage.output_tokens", int(completion));
        tracing::Span::current().record("gen_ai.response.finish_reasons", "stop");
        let mut response = if a.api.stream {
            let mut body = openai::sse(&a.meta.chunk(&text, true, None)).to_vec();
            body.extend(a.meta.stream_end(Finish::Stop, usage, a.api.include_usage));
            sse_response(full(body))
        } else {
            json_response(StatusCode::OK, &a.meta.response(&text, Finish::Stop, usage))
        };
        verdict.apply(response.headers_mut());
        drop(a.guard);
        Ok(response)
    }

    async fn generate(
        self: &Arc<Self>,
        a: Admitted,
        verdict: Verdict,
        mut rx: UnboundedReceiver<BackendEvent>,
        deadline: Instant,
    ) -> Result<Response<Body>, ProxyError> {
        let gen_span = tracing::info_span!(
            "generate",
            inferaligner.steered = verdict.action == ActionLabel::steer,
            gen_ai.usage.input_tokens = a.tokens.len(),
            gen_ai.usage.output_tokens = Empty,
            gen_ai.response.finish_reasons = Empty,
        );
        let request_span = tracing::Span::current();
        let record_content = self.config.trace.record_content;
        let metrics = self.metrics.clone();
        let finish = move |text: &str, reason: Finish, completion: usize| {
            for s in [&gen_span, &request_span] {
                s.record("gen_ai.usage.output_tokens", int(completion));
                s.record(
                    "gen_ai.response.finish_reasons",
                    openai::finish_reason(reason),
                );
            }
            if record_content {
                request_span.record("gen_ai.completion", text);
            }
            metrics.generated_tokens.inc_by(completion as u64);
        };
        if !a.api.stream {
            let mut text = String::new();
            while let Some(event) = rx.recv().await {
                match event {
                    BackendEvent::Text(t) => text.push_str(&t),
                    BackendEvent::Finished {
                        reason,
                        prompt_tokens,
                        completion_tokens,
                    } => {
                        finish(&text, reason, completion_tokens);
                        let body =
                            a.meta
                                .response(&text, reason, (prompt_tokens, completion_tokens));
                        let mut response = json_response(StatusCode::OK, &body);
                        verdict.apply(response.headers_mut());
                        return Ok(response);
                    }
                    BackendEvent::Failed(e) => return Err(backend_error(e)),
                    BackendEvent::Gate(_) => {}
                }
            }
            return Err(ProxyError::Model("the engine dropped the request".into()));
        }
        // Streaming: the head goes out now; a task turns events into SSE chunks. If the
        // client leaves, the channel closes, the task drops `rx`, and the engine cancels.
        let (tx, body_rx) = mpsc::channel::<Bytes>(32);
        let meta = a.meta.clone();
        let include_usage = a.api.include_usage;
        let timeout = self.config.request_timeout().as_secs_f64();
        tokio::spawn(
            async move {
                let mut first = true;
                let mut text = String::new();
                let send = |v: Bytes| tx.send(v);
                loop {
                    let event = match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
                        Ok(Some(e)) => e,
                        Ok(None) => BackendEvent::Failed(BackendError::new(
                            BackendErrorKind::Unavailable,
                            "the engine dropped the request",
                        )),
                        Err(_) => BackendEvent::Failed(BackendError::new(
                            BackendErrorKind::Model,
                            format!("request timed out after {timeout:.1} s"),
                        )),
                    };
                    match event {
                        BackendEvent::Text(t) => {
                            if record_content {
                                text.push_str(&t);
                            }
                            if send(openai::sse(&meta.chunk(&t, first, None)))
                                .await
                                .is_err()
                            {
                                return; // client gone; dropping rx cancels generation
                            }
                            first = false;
                        }
                        BackendEvent::Finished {
                            reason,
                            prompt_tokens,
                            completion_tokens,
                        } => {
                            finish(&text, reason, completion_tokens);
                            let mut out = Vec::new();
                            if first {
                                out.extend_from_slice(&openai::sse(&meta.chunk("", true, None)));
                            }
                            let usage = (prompt_tokens, completion_tokens);
                            out.extend(meta.stream_end(reason, usage, include_usage));
                            let _ = send(Bytes::from(out)).await;
                            return;
                        }
                        BackendEvent::Failed(e) => {
                            let e = backend_error(e);
                            tracing::warn!(error = %e, "generation failed mid-stream");
                            let mut out = openai::sse(&e.body()).to_vec();
                            out.extend_from_slice(openai::SSE_DONE);
                            let _ = send(Bytes::from(out)).await;
                            return;
                        }
                        BackendEvent::Gate(_) => {}
                    }
                }
            }
            .in_current_span(),
        );
        let mut response = sse_response(Body::new(PassBody {
            rx: body_rx,
            _guard: a.guard,
        }));
        verdict.apply(response.headers_mut());
        Ok(response)
    }
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
            message: e.message,
            param: None,
            code: None,
        },
        BackendErrorKind::Overloaded => ProxyError::Overloaded,
        BackendErrorKind::Unavailable => ProxyError::Unavailable(e.message),
        BackendErrorKind::Model => ProxyError::Model(e.message),
    }
}

/// The body to forward: the client's bytes, unless the sidecar must change them. A
/// `model@policy` selection becomes the model alone (the upstream knows only the model), and
/// the token limit says what the sidecar allows, the same as in local mode: `max_tokens` (and
/// `max_completion_tokens`, when sent) set to the request's limit after the sidecar's caps and
/// its default, so an upstream that knows only one of the two names honours it too.
fn forwarded_body(
    raw: &Bytes,
    model: Option<&str>,
    max_new_tokens: usize,
) -> Result<Bytes, ProxyError> {
    let mut v: serde_json::Value = serde_json::from_slice(raw)
        .map_err(|e| ProxyError::invalid(format!("invalid JSON: {e}"), None))?;
    let limit = json!(max_new_tokens);
    let model = model.and_then(|m| m.rsplit_once('@')).map(|(m, _)| m);
    let limit_as_sent = v.get("max_tokens") == Some(&limit)
        && v.get("max_completion_tokens").is_none_or(|m| *m == limit);
    if model.is_none() && limit_as_sent {
        return Ok(raw.clone());
    }
    if let Some(model) = model {
        v["model"] = json!(model);
    }
    v["max_tokens"] = limit.clone();
    if v.get("max_completion_tokens").is_some() {
        v["max_completion_tokens"] = limit;
    }
    Ok(Bytes::from(v.to_string()))
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(value.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn sse_response(body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// The one place errors become responses: OpenAI error body, status, `Retry-After` on
/// overload, and the header saying the sidecar (not the upstream) answered.
pub fn error_response(e: &ProxyError, retry_after_s: u32) -> Response<Body> {
    let mut r = json_response(e.status(), &e.body());
    r.headers_mut()
        .insert(ORIGIN_HEADER, HeaderValue::from_static("sidecar"));
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
