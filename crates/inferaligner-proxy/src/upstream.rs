//! The upstream OpenAI-compatible server of `proxy` mode: verbatim forwarding with streaming
//! pass-through, timeouts, and trace-context injection.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response, Uri};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Sleep;

use crate::ProxyError;
use crate::body::{BoxError, RequestGuard};
use crate::metrics::{Metrics, UpstreamErrorKind};

/// Headers that belong to one connection and are never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether a header is the sidecar's own (`x-inferaligner-*`): never taken from clients or
/// from the upstream, so nobody can forge a decision.
pub fn is_own_header(name: &HeaderName) -> bool {
    name.as_str().starts_with("x-inferaligner-")
}

/// Copy headers minus hop-by-hop ones (and those the `Connection` header names), `Host`,
/// `Content-Length` and the sidecar's own.
pub fn end_to_end_headers(headers: &HeaderMap) -> HeaderMap {
    let named_by_connection: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if HOP_BY_HOP.contains(name)
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            || is_own_header(name)
            || named_by_connection.iter().any(|n| n == name.as_str())
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// Client for the configured upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: Client<HttpConnector, Full<Bytes>>,
    base: Uri,
    read_timeout: Duration,
}

impl Upstream {
    /// A client for `base` (scheme and authority only are used).
    pub fn new(base: Uri, connect_timeout: Duration, read_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self {
            client,
            base,
            read_timeout,
        }
    }

    /// The upstream's address, for messages.
    pub fn authority(&self) -> String {
        self.base
            .authority()
            .map(ToString::to_string)
            .unwrap_or_default()
    }

    /// Forward a request: same method, path and query, end-to-end headers and `body`, plus the
    /// current span's trace context. 5xx answers, connection failures and timeouts become
    /// errors; other answers stream back unbuffered, each chunk as it arrives.
    pub async fn forward(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
        guard: RequestGuard,
        metrics: &Metrics,
    ) -> Result<Response<crate::body::Body>, ProxyError> {
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str);
        let mut uri = http::uri::Parts::from(self.base.clone());
        uri.path_and_query = Some(path.parse().map_err(|e| {
            ProxyError::invalid(format!("request path cannot be forwarded: {e}"), None)
        })?);
        let uri = Uri::from_parts(uri)
            .map_err(|e| ProxyError::Upstream(format!("cannot build the upstream URL: {e}")))?;
        let mut request = Request::builder()
            .method(parts.method.clone())
            .uri(uri)
            .body(Full::new(body))
            .map_err(|e| ProxyError::Upstream(e.to_string()))?;
        *request.headers_mut() = end_to_end_headers(&parts.headers);
        inject_trace_context(request.headers_mut());

        let response =
            match tokio::time::timeout(self.read_timeout, self.client.request(request)).await {
                Err(_) => {
                    metrics.upstream_error(UpstreamErrorKind::timeout);
                    return Err(ProxyError::UpstreamTimeout(format!(
                        "{} sent no response head within {:.1} s",
                        self.authority(),
                        self.read_timeout.as_secs_f64()
                    )));
                }
                Ok(Err(e)) => {
                    metrics.upstream_error(UpstreamErrorKind::connect);
                    let what = if e.is_connect() {
                        "cannot connect to"
                    } else {
                        "request failed at"
                    };
                    return Err(ProxyError::Upstream(format!(
                        "{what} {}: {}",
                        self.authority(),
                        error_chain(&e)
                    )));
                }
                Ok(Ok(r)) => r,
            };
        let (head, incoming) = response.into_parts();
        if head.status.is_server_error() {
            metrics.upstream_error(UpstreamErrorKind::status_5xx);
            // Keep a little of the body for the message; never wait long for it.
            let detail = tokio::time::timeout(Duration::from_secs(1), incoming.collect())
                .await
                .ok()
                .and_then(Result::ok)
                .map(|b| {
                    String::from_utf8_lossy(&b.to_bytes())
                        .chars()
                        .take(200)
                        .collect::<String>()
                })
                .unwrap_or_default();
            return Err(ProxyError::Upstream(format!(
                "{} answered {}: {detail}",
                self.authority(),
                head.status
            )));
        }
        let mut response = Response::new(crate::body::Body::new(PassThrough {
            inner: incoming,
            idle: self.read_timeout,
            sleep: Box::pin(tokio::time::sleep(self.read_timeout)),
            guard: Some(guard),
            span: tracing::Span::current(),
        }));
        *response.status_mut() = head.status;
        *response.headers_mut() = end_to_end_headers(&head.headers);
        Ok(response)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// W3C trace context of the current span into outgoing headers (a no-op without a
/// propagator installed by the binary).
fn inject_trace_context(headers: &mut HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&context, &mut opentelemetry_http::HeaderInjector(headers));
    });
}

/// The upstream body, frame by frame, with an idle timeout between frames; it holds the
/// request's admission guard until the stream ends.
struct PassThrough {
    inner: Incoming,
    idle: Duration,
    sleep: Pin<Box<Sleep>>,
    guard: Option<RequestGuard>,
    /// The request's span: a body that fails after its head was sent is logged in it (the
    /// client sees only its connection closed early).
    span: tracing::Span,
}

impl PassThrough {
    fn failed(&mut self, kind: UpstreamErrorKind, error: BoxError) -> BoxError {
        if let Some(g) = self.guard.take() {
            g.upstream_error(kind);
        }
        self.span.in_scope(|| {
            tracing::warn!(%error, "upstream body failed after the response head was sent; the client's connection is closed early");
        });
        error
    }
}

impl Body for PassThrough {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let deadline = tokio::time::Instant::now() + this.idle;
                this.sleep.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let e = error_chain(&e).into();
                Poll::Ready(Some(Err(this.failed(UpstreamErrorKind::body, e))))
            }
            Poll::Ready(None) => {
                this.guard.take();
                Poll::Ready(None)
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let e = format!(
                        "upstream stalled mid-body for {:.1} s (the read timeout)",
                        this.idle.as_secs_f64()
                    );
                    Poll::Ready(Some(Err(this.failed(UpstreamErrorKind::timeout, e.into()))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_own_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret".parse().expect("valid"));
        h.insert("x-secret", "1".parse().expect("valid"));
        h.insert("host", "evil.example".parse().expect("valid"));
        h.insert("x-inferaligner-gate", "harmless".parse().expect("valid"));
        h.insert("authorization", "Bearer t".parse().expect("valid"));
        h.insert("traceparent", "00-1-2-01".parse().expect("valid"));
        let out = end_to_end_headers(&h);
        let names: Vec<_> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, vec!["authorization", "traceparent"]);
    }
}
