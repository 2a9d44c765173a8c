use std::path::PathBuf;

/// Everything that can go wrong while loading or running an export.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The ONNX Runtime shared library is not where the configuration says.
    #[error(
        "ONNX Runtime library not found at {path}: run `{setup}` to install it, or set \
         ORT_DYLIB_PATH to a libonnxruntime.so (1.31.x)",
        setup = crate::SETUP_COMMAND
    )]
    OrtLibraryMissing {
        /// Where the library was looked for.
        path: PathBuf,
    },
    /// No library path is configured at all.
    #[error(
        "ORT_DYLIB_PATH is not set: run `{setup}` (it installs ONNX Runtime into the project \
         venv), or set ORT_DYLIB_PATH to a libonnxruntime.so (1.31.x)",
        setup = crate::SETUP_COMMAND
    )]
    OrtLibraryUnset,
    /// The library exists but could not be loaded or initialised.
    #[error("could not load ONNX Runtime from {path}: {message}")]
    OrtLoad {
        /// The library file.
        path: PathBuf,
        /// What the loader said.
        message: String,
    },
    /// An earlier attempt to load ONNX Runtime in this process failed (kept: one try per process).
    #[error("{0}")]
    OrtUnavailable(String),
    /// A file of the export could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The manifest is malformed or inconsistent with the files beside it.
    #[error("invalid export manifest {path}: {message}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A file's content does not match the digest the manifest records.
    #[error(
        "{path}: sha256 {actual} does not match the manifest ({expected}); re-export the model"
    )]
    HashMismatch {
        /// The file.
        path: PathBuf,
        /// Digest recorded in the manifest.
        expected: String,
        /// Digest of the file on disk.
        actual: String,
    },
    /// The tokenizer or chat template failed (a broken file, or a template error).
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A configured GPU execution provider could not be used.
    #[error("{0}")]
    Provider(String),
    /// The caller passed something the model cannot take.
    #[error("invalid input: {0}")]
    Input(String),
    /// The caller passed something the model cannot take in one request field (`field`,
    /// as the OpenAI API names it; the message names it too).
    #[error("invalid input: {message}")]
    InputField {
        /// The request field.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// ONNX Runtime failed while creating a session or running a graph.
    #[error("ONNX Runtime: {0}")]
    Ort(#[from] ort::Error),
}

/// What kind of failure a [`RuntimeError`] is: stable and low-cardinality, for metrics labels
/// and error bodies, and for callers to tell a bad request from a broken model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The ONNX Runtime library is missing or unset.
    OrtLibraryMissing,
    /// The ONNX Runtime library failed to load.
    OrtLoad,
    /// A file could not be read.
    Io,
    /// The export's manifest is invalid.
    Manifest,
    /// A file does not match the manifest's hash.
    HashMismatch,
    /// The request cannot be run as given (a prompt over the context, a bad token id, …).
    Input,
    /// A GPU execution provider could not be used.
    Provider,
    /// The tokenizer or chat template failed on this input.
    Tokenizer,
    /// ONNX Runtime failed while running.
    OnnxRuntime,
}

impl ErrorKind {
    /// The kind's name (`input`, `onnx_runtime`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OrtLibraryMissing => "ort_library_missing",
            Self::OrtLoad => "ort_load",
            Self::Io => "io",
            Self::Manifest => "manifest",
            Self::HashMismatch => "hash_mismatch",
            Self::Input => "input",
            Self::Provider => "provider",
            Self::Tokenizer => "tokenizer",
            Self::OnnxRuntime => "onnx_runtime",
        }
    }

    /// Whether the request itself was at fault (a client error), not the model or the host.
    pub fn is_request_error(self) -> bool {
        matches!(self, Self::Input | Self::Tokenizer)
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl RuntimeError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::OrtLibraryMissing { .. } | Self::OrtLibraryUnset => ErrorKind::OrtLibraryMissing,
            Self::OrtLoad { .. } | Self::OrtUnavailable(_) => ErrorKind::OrtLoad,
            Self::Io { .. } => ErrorKind::Io,
            Self::Manifest { .. } => ErrorKind::Manifest,
            Self::HashMismatch { .. } => ErrorKind::HashMismatch,
            Self::Input(_) | Self::InputField { .. } => ErrorKind::Input,
            Self::Provider(_) => ErrorKind::Provider,
            Self::Tokenizer(_) => ErrorKind::Tokenizer,
            Self::Ort(_) => ErrorKind::OnnxRuntime,
        }
    }
}

impl RuntimeError {
    /// The request field an input error is about, if it names one.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Self::InputField { field, .. } => Some(field),
            _ => None,
        }
    }
}

impl From<ort::Error<ort::session::builder::SessionBuilder>> for RuntimeError {
    fn from(e: ort::Error<ort::session::builder::SessionBuilder>) -> Self {
        Self::Ort(e.into())
    }
}
