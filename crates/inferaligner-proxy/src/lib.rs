//! The sidecar's HTTP side: OpenAI-compatible API, `local` and `proxy` modes, policies,
//! admin listener, metrics and error mapping.
//!
//! It never imports ONNX Runtime: the binary hands it the model behind a trait. The server
//! arrives with the sidecar work; until then this crate only fixes its place in the
//! dependency graph.
