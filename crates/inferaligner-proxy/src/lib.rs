//! The sidecar's HTTP side: the OpenAI-compatible API, `local` and `proxy` modes, policies,
//! the admin listener, metrics and the one place errors become responses.
//!
//! It never imports ONNX Runtime: the model arrives behind the [`Backend`] trait, which the
//! binary implements with the runtime. It emits `tracing` spans (`request` with children
//! `gate`, `generate`, `forward`) but installs no subscriber or exporter.

mod admin;
mod backend;
mod body;
mod config;
mod error;
mod metrics;
pub mod openai;
mod passthrough;
mod server;
mod upstream;

pub use admin::{Ready, serve_admin};
pub use backend::{
    Backend, BackendError, BackendErrorKind, BackendEvent, GateReport, Job, Logprob, Message,
    ModelInfo, Prompt, SteeredAnswer, TokenLogprob, Tokenized,
};
pub use body::Body;
pub use config::{PolicyConfig, ProxyConfig, ServeMode, ServerConfig, TraceConfig, UpstreamConfig};
pub use error::ProxyError;
pub use metrics::{ActionLabel, EngineFigures, EngineProbe, GateLabel, Metrics, SteeredLabels};
pub use server::{ORIGIN_HEADER, POLICY_HEADER, Sidecar, error_response};
