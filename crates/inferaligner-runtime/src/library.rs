//! Finding and loading the ONNX Runtime shared library (`ort`'s `load-dynamic`).
//!
//! The library comes from the `onnxruntime` PyPI wheel that `make setup` installs into the
//! project venv and links to `.venv/ort/libonnxruntime.so`; `.cargo/config.toml` points
//! `ORT_DYLIB_PATH` there, so `cargo test` and `cargo run` need no manual exports.

use std::path::PathBuf;
use std::sync::OnceLock;

use ort::environment::Environment;

use crate::{Result, RuntimeError};

/// Environment variable naming the ONNX Runtime shared library.
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";
/// The command that installs the library; quoted in errors.
pub const SETUP_COMMAND: &str = "make setup";

/// The library path: `ORT_DYLIB_PATH` at run time, else the value cargo saw at build time.
fn library_path() -> Option<PathBuf> {
    std::env::var_os(ORT_DYLIB_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| option_env!("ORT_DYLIB_PATH").map(PathBuf::from))
}

/// The process-wide ONNX Runtime environment, loading the library on first use.
///
/// ONNX Runtime allows one environment per process, so the outcome (including a failure) is
/// kept and returned to every later caller.
pub fn onnx_runtime() -> Result<&'static Environment> {
    static ENV: OnceLock<std::result::Result<Environment, String>> = OnceLock::new();
    let outcome = ENV.get_or_init(|| init().map_err(|e| e.to_string()));
    match outcome {
        Ok(env) => Ok(env),
        Err(message) => Err(RuntimeError::OrtUnavailable(message.clone())),
    }
}

fn init() -> Result<Environment> {
    let path = library_path().ok_or(RuntimeError::OrtLibraryUnset)?;
    if !path.is_file() {
        return Err(RuntimeError::OrtLibraryMissing { path });
    }
    let builder = ort::init_from(&path).map_err(|e| RuntimeError::OrtLoad {
        path: path.clone(),
        message: e.to_string(),
    })?;
    tracing::debug!(path = %path.display(), "loaded ONNX Runtime");
    Ok(builder.with_name("inferaligner").build()?)
}
