//! The admin listener: `/live`, `/ready`, `/metrics`, on its own port so that the API's
//! Service never exposes it.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::body::Body;
use crate::metrics::Metrics;

/// Readiness latch: set once models, packs and a warm-up generation are done; cleared when
/// draining starts.
#[derive(Debug, Clone, Default)]
pub struct Ready(Arc<AtomicBool>);

impl Ready {
    /// Whether the sidecar takes traffic.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Set or clear readiness.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }
}

fn text(
    status: StatusCode,
    body: impl Into<bytes::Bytes>,
    content_type: &'static str,
) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn answer(req: &Request<Incoming>, ready: &Ready, metrics: &Metrics) -> Response<Body> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n", PLAIN),
        (&Method::GET, "/ready") if ready.get() => text(StatusCode::OK, "ready\n", PLAIN),
        (&Method::GET, "/ready") => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n", PLAIN),
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            metrics.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n", PLAIN),
    }
}

/// Serve the admin endpoints until `shutdown` resolves.
pub async fn serve_admin(
    listener: TcpListener,
    ready: Ready,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let (ready, metrics) = (ready.clone(), metrics.clone());
                let service = service_fn(move |req| {
                    let response = answer(&req, &ready, &metrics);
                    async move { Ok::<_, Infallible>(response) }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            () = &mut shutdown => return,
        }
    }
}
