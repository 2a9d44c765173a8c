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
    /// ONNX Runtime failed while creating a session or running a graph.
    #[error("ONNX Runtime: {0}")]
    Ort(#[from] ort::Error),
}

impl RuntimeError {
    /// A stable, low-cardinality name for metrics labels and JSON error bodies.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::OrtLibraryMissing { .. } | Self::OrtLibraryUnset => "ort_library_missing",
            Self::OrtLoad { .. } | Self::OrtUnavailable(_) => "ort_load",
            Self::Io { .. } => "io",
            Self::Manifest { .. } => "manifest",
            Self::HashMismatch { .. } => "hash_mismatch",
            Self::Input(_) => "input",
            Self::Provider(_) => "provider",
            Self::Tokenizer(_) => "tokenizer",
            Self::Ort(_) => "onnx_runtime",
        }
    }
}

impl From<ort::Error<ort::session::builder::SessionBuilder>> for RuntimeError {
    fn from(e: ort::Error<ort::session::builder::SessionBuilder>) -> Self {
        Self::Ort(e.into())
    }
}
