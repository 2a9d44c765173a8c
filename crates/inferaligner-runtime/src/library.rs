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

/// Threads of the process-wide ONNX Runtime pool, shared by every session.
///
/// One shared pool instead of one per session matters here: an export has a session per layer,
/// and dozens of per-session pools (spinning or not) oversubscribe a small container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadPool {
    /// Threads inside one operator.
    pub intra_op_threads: usize,
    /// Threads running independent operators in parallel.
    pub inter_op_threads: usize,
    /// Whether idle pool threads busy-spin between operators.
    pub spinning: bool,
}

impl Default for ThreadPool {
    fn default() -> Self {
        Self {
            intra_op_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            inter_op_threads: 1,
            spinning: true,
        }
    }
}

/// The process-wide ONNX Runtime environment with the default thread pool (see
/// [`onnx_runtime_with`]).
pub fn onnx_runtime() -> Result<&'static Environment> {
    onnx_runtime_with(ThreadPool::default())
}

/// The process-wide ONNX Runtime environment, loading the library on first use.
///
/// ONNX Runtime allows one environment per process, so the first call's thread pool wins and
/// the outcome (including a failure) is kept and returned to every later caller.
pub fn onnx_runtime_with(pool: ThreadPool) -> Result<&'static Environment> {
    static ENV: OnceLock<(ThreadPool, std::result::Result<Environment, String>)> = OnceLock::new();
    let (first, outcome) = ENV.get_or_init(|| (pool, init(pool).map_err(|e| e.to_string())));
    if *first != pool {
        tracing::warn!(?first, requested = ?pool, "ONNX Runtime thread pool already set up");
    }
    match outcome {
        Ok(env) => Ok(env),
        Err(message) => Err(RuntimeError::OrtUnavailable(message.clone())),
    }
}

fn init(pool: ThreadPool) -> Result<Environment> {
    let path = library_path().ok_or(RuntimeError::OrtLibraryUnset)?;
    if !path.is_file() {
        return Err(RuntimeError::OrtLibraryMissing { path });
    }
    let builder = ort::init_from(&path).map_err(|e| RuntimeError::OrtLoad {
        path: path.clone(),
        message: e.to_string(),
    })?;
    tracing::debug!(path = %path.display(), ?pool, "loaded ONNX Runtime");
    let threads = ort::environment::GlobalThreadPoolOptions::default()
        .with_intra_threads(pool.intra_op_threads.max(1))?
        .with_inter_threads(pool.inter_op_threads.max(1))?
        .with_spin_control(pool.spinning)?;
    Ok(builder
        .with_name("inferaligner")
        .with_global_thread_pool(threads)
        .build()?)
}
