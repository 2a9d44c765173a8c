//! The InferAligner steering core: safety related vectors, the guidance gate and its
//! estimators, cross-validated layer choice, and steering packs (the files they live in).
//!
//! Pure computation on last-token residuals handed in by the caller; its only I/O is reading
//! and writing pack files. It also holds the few request words the runtime and the proxy share
//! (sampling parameters, finish reasons), so that each has one name. It must not depend on
//! tokio, hyper or ONNX Runtime: the runtime and the proxy depend on it, never the other way
//! round.

mod canonical;
mod gate;
mod generation;
mod pack;
mod policy;
mod tools;
mod vectors;

pub use canonical::canonical_json;
pub use gate::{
    Confusion, Gate, GateEstimator, GateReadout, GateView, ProbeOptions, choose_gate_layer,
    cross_validate, fit_gate, fit_mean_diff, fit_probe, roc_auc,
};
pub use generation::{
    FinishReason, JsonSchemaFormat, MESSAGE_ROLES, ResponseFormat, SamplingParams, within_limits,
};
pub use pack::{
    CalibrationSet, ModelFingerprint, PACK_FORMAT, PackMetadata, SsvSource, SteeringPack,
};
pub use policy::{
    Action, Decision, OnError, Policy, PolicyMode, RawCompletions, SteeredAnswers, SteeredEnding,
};
pub use tools::{
    CALL_CLOSE, CALL_OPEN, ToolCall, ToolChoice, ToolFunction, Tools, calls_text,
    in_parameters_terms, result_text,
};
pub use vectors::{
    ClassActivations, contrastive_vector, default_alpha, default_steered_layers, normalized,
    orthogonalized, project, safety_related_vector,
};

/// What can be wrong with the numbers handed to the core.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A class or set is empty.
    #[error("empty input: {0}")]
    Empty(String),
    /// Widths or counts do not agree.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// NaN or infinite values.
    #[error("non-finite values: {0}")]
    NonFinite(String),
    /// The data admits no answer (e.g. identical class means).
    #[error("degenerate input: {0}")]
    Degenerate(String),
    /// A steering pack is malformed or of an unknown format.
    #[error("invalid steering pack: {0}")]
    Pack(String),
    /// A steering pack was made for another model.
    #[error("{0}")]
    WrongModel(String),
    /// A pack file could not be read or written.
    #[error("steering pack {}: {source}", path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl CoreError {
    /// A stable, low-cardinality name for metrics labels and JSON error bodies.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Empty(_) => "empty",
            Self::Shape(_) => "shape",
            Self::NonFinite(_) => "non_finite",
            Self::Degenerate(_) => "degenerate",
            Self::Pack(_) => "pack",
            Self::WrongModel(_) => "wrong_model",
            Self::Io { .. } => "io",
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests;
