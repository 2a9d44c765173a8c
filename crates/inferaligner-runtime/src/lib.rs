//! Runs a layer-split ONNX export of a Llama-family decoder with ONNX Runtime (`ort`) and owns
//! the whole generation loop.
//!
//! An export (see `onnx/` and `manifest.json`) has one graph for the embeddings, one per decoder
//! layer (or group of layers) and one for the final norm and LM head. The residual stream between
//! segments is ordinary graph I/O, so a [`LayerHook`] can read and change it between segments —
//! the seam the steering layer uses.
//!
//! - [`onnx_runtime`] loads the ONNX Runtime shared library once per process.
//! - [`Manifest`] reads and validates an export; [`LayerSplitModel`] runs its segments, with
//!   early exit ([`LayerSplitModel::run_layers`] up to a layer) and resumption.
//! - [`KvCache`] is one preallocated buffer per layer; the graphs read it in place (plain graphs
//!   return only the new positions' K/V, fused graphs append them to the bound buffer
//!   themselves), so no step copies the cache wholesale (see the module docs).
//! - [`PrefixCache`] keeps the KV of prompt prefixes (system prompts, earlier turns) for reuse.
//! - [`ChatTokenizer`] renders chat templates (minijinja) and tokenizes (`tokenizers`), keeping
//!   user-typed special-token strings as text; [`Detokenizer`] streams UTF-8-safe text.
//! - [`Sampler`] picks tokens; [`Engine`] batches concurrent sequences on its own thread.
//!
//! This crate must not know about HTTP, policies or the steering math.

mod chat;
mod engine;
mod error;
mod generate;
mod hook;
mod kv;
mod library;
mod manifest;
mod model;
mod prefill;
mod prefix;
mod sampling;
mod structured;

pub use chat::{ChatMessage, ChatTokenizer, Detokenizer};
pub use engine::{Engine, EngineConfig, KvUsage, SubmitError, Submitter, collect_events};
pub use error::{ErrorKind, RuntimeError};
pub use generate::{
    AfterGate, EarlyExit, EarlyExitFn, EventSink, FinishReason, GenerationEvent, GenerationParams,
    GenerationRequest, TokenLogprobs, Usage,
};
pub use hook::{AddOwnVectors, AddScale, AddVectors, LayerHook, RowContext};
pub use kv::KvCache;
pub use library::{ORT_DYLIB_ENV, SETUP_COMMAND, ThreadPool, onnx_runtime, onnx_runtime_with};
pub use manifest::{
    EmbedSegment, ExternalData, HeadSegment, LayerInputs, LayerOutputs, LayerSegment,
    MANIFEST_FORMAT, Manifest, PositionInputs, Segment, TokenizerInfo,
};
pub use model::{
    CpuAllocator, ExecutionProvider, LayerSplitModel, OptimizationLevel, Pass, PrefillOutput,
    SessionOptions,
};
pub use prefill::{ChunkedPrefill, DEFAULT_PREFILL_CHUNK, PrefillStep, Prefilled};
pub use prefix::{PREFIX_BLOCK_TOKENS, PrefixCache, PrefixStats};
pub use sampling::{Sampler, SamplingParams, argmax, logprobs};
pub use structured::{Constraint, Structured};

/// Result alias for this crate.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
