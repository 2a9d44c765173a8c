//! Runs a layer-split ONNX export of a Llama-family decoder with ONNX Runtime (`ort`).
//!
//! An export (see `onnx/` and `manifest.json`) has one graph for the embeddings, one per decoder
//! layer (or group of layers) and one for the final norm and LM head. The residual stream between
//! segments is ordinary graph I/O, so this crate can hand it to the steering layer between
//! segments.
//!
//! This crate owns ONNX Runtime: loading the shared library ([`onnx_runtime`]), reading and
//! validating manifests ([`Manifest`]) and running segments ([`LayerSplitModel`]). It must not
//! know about HTTP, policies or the steering math.

mod error;
mod library;
mod manifest;
mod model;

pub use error::RuntimeError;
pub use library::{ORT_DYLIB_ENV, SETUP_COMMAND, onnx_runtime};
pub use manifest::{
    EmbedSegment, HeadSegment, LayerInputs, LayerOutputs, LayerSegment, MANIFEST_FORMAT, Manifest,
    Segment, TokenizerInfo,
};
pub use model::{LayerSplitModel, PrefillOutput, SessionOptions};

/// Result alias for this crate.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
