//! Errors, and their one translation into HTTP responses.

use std::borrow::Cow;

use http::StatusCode;

/// Everything that can go wrong in the proxy. `kind()` is a stable label for metrics and the
/// `type` of the OpenAI error body.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Config is unusable (found at start).
    #[error("invalid config: {0}")]
    Config(String),
    /// The request is malformed or breaks a rule (client's fault).
    #[error("{message}")]
    InvalidRequest {
        /// What is wrong.
        message: String,
        /// The offending parameter, if one.
        param: Option<Cow<'static, str>>,
        /// OpenAI-style code, e.g. `context_length_exceeded`.
        code: Option<&'static str>,
    },
    /// The body is larger than `server.max_body_bytes`.
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The policy does not allow what the request asks for.
    #[error("{0}")]
    Forbidden(String),
    /// No such route.
    #[error("no route for {method} {path}")]
    NotFound {
        /// Method.
        method: String,
        /// Path.
        path: String,
    },
    /// The route exists, for another method.
    #[error("{path} takes {allow}, not {method}")]
    MethodNotAllowed {
        /// Method.
        method: String,
        /// Path.
        path: String,
        /// The method it takes (the `Allow` header).
        allow: &'static str,
    },
    /// `model` names another model than the one this sidecar serves.
    #[error("the model `{0}` does not exist here; GET /v1/models lists the ones that do")]
    ModelNotFound(String),
    /// Too many requests at once.
    #[error("the sidecar is at capacity; retry later")]
    Overloaded,
    /// The sidecar is shutting down or the engine stopped.
    #[error("the sidecar is not serving: {0}")]
    Unavailable(String),
    /// The model failed.
    #[error("model error: {0}")]
    Model(String),
    /// The upstream server could not be reached or failed (5xx).
    #[error("upstream error: {0}")]
    Upstream(String),
    /// The upstream server did not answer in time.
    #[error("upstream timeout: {0}")]
    UpstreamTimeout(String),
    /// The request took longer than `server.request_timeout_s`.
    #[error("request timed out after {0:.1} s")]
    Timeout(f64),
    /// I/O while setting up listeners.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl ProxyError {
    /// A client error about `param`.
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: param.map(Cow::Borrowed),
            code: None,
        }
    }

    /// Stable label (metrics, JSON `type`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Config(_) => "config_error",
            Self::InvalidRequest { .. } => "invalid_request_error",
            Self::BodyTooLarge { .. } => "request_too_large",
            Self::NotFound { .. } | Self::ModelNotFound(_) => "not_found_error",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::Forbidden(_) => "permission_error",
            Self::Overloaded => "overloaded_error",
            Self::Unavailable(_) => "unavailable_error",
            Self::Model(_) => "model_error",
            Self::Upstream(_) => "upstream_error",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::Timeout(_) => "timeout_error",
            Self::Io(_) => "io_error",
        }
    }

    /// HTTP status of the error response.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NotFound { .. } | Self::ModelNotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Upstream(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout(_) | Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Config(_) | Self::Model(_) | Self::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(&self) -> serde_json::Value {
        let (param, code) = match self {
            Self::InvalidRequest { param, code, .. } => (param.as_deref(), *code),
            Self::ModelNotFound(_) => (Some("model"), Some("model_not_found")),
            _ => (None, None),
        };
        serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "param": param,
                "code": code,
            }
        })
    }
}
