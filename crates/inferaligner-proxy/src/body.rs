//! Response bodies and the request guard, shared by the server, the upstream client and the
//! admin listener.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::mpsc;

use crate::metrics::{Metrics, UpstreamErrorKind};

/// Boxed error of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Response body of every route.
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
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
    /// Hold `permit` and count the request in flight until the guard drops.
    pub(crate) fn new(permit: OwnedSemaphorePermit, metrics: Arc<Metrics>) -> Self {
        metrics.in_flight.inc();
        Self {
            _permit: permit,
            metrics,
        }
    }

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

/// A streamed body fed by a channel (SSE from local generation, or merged from several
/// answers), holding the request's guard if it has one of its own.
pub(crate) struct PassBody {
    pub(crate) rx: mpsc::Receiver<Bytes>,
    pub(crate) _guard: Option<RequestGuard>,
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

pub(crate) fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(value.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub(crate) fn sse_response(body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
