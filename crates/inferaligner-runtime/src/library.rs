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
    pin_mmap_threshold();
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
    let env = builder
        .with_name("inferaligner")
        .with_global_thread_pool(threads)
        .build()?;
    quiet_unheard_logs(&env)?;
    register_shared_cpu_arena(&env)?;
    Ok(env)
}

/// Set ONNX Runtime's own log level to the most verbose one the `tracing` subscriber keeps
/// from it ([`unheard_below`]), so that it formats no message nobody reads. Why: `ort` creates
/// the environment at VERBOSE and leaves the filtering to `tracing`, but ONNX Runtime formats a
/// message (a C++ string stream) before handing it over, and some sit on the hot path: the
/// shared arena logs "Reserving memory in BFCArena…" at INFO for every MatMulNBits run, 151 a
/// token on SmolLM2's int4 export (about 1 % of a batch-1 decode step). The subscriber is
/// installed before the first model loads (`serve` and the CLI do so).
#[allow(unsafe_code)]
fn quiet_unheard_logs(env: &Environment) -> Result<()> {
    use ort::AsPointer;
    // SAFETY: the environment is live; ONNX Runtime only stores the new severity.
    let status =
        unsafe { (ort::api().UpdateEnvWithCustomLogLevel)(env.ptr().cast_mut(), unheard_below()) };
    // SAFETY: `status` was just returned by the ONNX Runtime API and is consumed once.
    unsafe { ort::Error::result_from_status(status) }?;
    Ok(())
}

/// The least severe ONNX Runtime log level the current `tracing` subscriber keeps: `ort`
/// forwards VERBOSE as TRACE, INFO as INFO, WARNING as WARN and ERROR as ERROR, from its
/// `ort::logging` module (a filter on `ort` applies). With no subscriber, errors only.
fn unheard_below() -> ort::sys::OrtLoggingLevel {
    use ort::sys::OrtLoggingLevel as Ort;
    use tracing::Level;
    if tracing::enabled!(target: "ort::logging", Level::TRACE) {
        Ort::ORT_LOGGING_LEVEL_VERBOSE
    } else if tracing::enabled!(target: "ort::logging", Level::INFO) {
        Ort::ORT_LOGGING_LEVEL_INFO
    } else if tracing::enabled!(target: "ort::logging", Level::WARN) {
        Ort::ORT_LOGGING_LEVEL_WARNING
    } else {
        Ort::ORT_LOGGING_LEVEL_ERROR
    }
}

/// Register one CPU arena with the environment, for the sessions that opt in
/// (`session.use_env_allocators`, see [`crate::CpuAllocator::SharedArena`]).
///
/// Why (measured on SmolLM2, 2 threads, bench/prefill.sh): an export has a session per layer,
/// and with ONNX Runtime's default per-session arenas each keeps its own high-water mark — a
/// 1,000-token prompt left 3.6 GB resident even in chunks of 256 (11.7 GB in one pass). One
/// arena shared by every session is sized by the largest single segment run instead, which is
/// all the scratch a pass needs, since segments run one after another on the engine thread:
/// 4,000 tokens in chunks of 128 peak at 1.27 GB with the weights. Without any arena (plain
/// malloc) memory stays low only with glibc's mmap threshold pinned, and prefill is 25–40 %
/// slower from page faults. The arena grows by doubling (`kNextPowerOfTwo`): growing by what is
/// requested (`kSameAsRequested`) reached 2.7 GB, because every chunk's attention scratch is a
/// little larger than the last and never fits the regions freed before it.
#[allow(unsafe_code)]
fn register_shared_cpu_arena(env: &Environment) -> Result<()> {
    use ort::AsPointer;
    use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
    let api = ort::api();
    let info = MemoryInfo::new(
        AllocationDevice::CPU,
        0,
        AllocatorType::Arena,
        MemoryType::Default,
    )?;
    // 0 = kNextPowerOfTwo; the other keys stay at ONNX Runtime's defaults.
    let keys = [c"arena_extend_strategy".as_ptr()];
    let values = [0usize];
    let mut cfg = std::ptr::null_mut();
    // SAFETY: `keys` and `values` have `keys.len()` valid entries (NUL-terminated C strings);
    // `cfg` receives an arena config we own and release below.
    let status =
        unsafe { (api.CreateArenaCfgV2)(keys.as_ptr(), values.as_ptr(), keys.len(), &mut cfg) };
    // SAFETY: `status` was just returned by the ONNX Runtime API and is consumed once.
    unsafe { ort::Error::result_from_status(status) }?;
    // SAFETY: the environment, memory info and arena config are live; ONNX Runtime copies what
    // it needs from `info` and `cfg`.
    let status = unsafe {
        (api.CreateAndRegisterAllocator)(env.ptr().cast_mut(), info.ptr(), cfg.cast_const())
    };
    // SAFETY: `cfg` came from CreateArenaCfgV2 and is released once.
    unsafe { (api.ReleaseArenaCfg)(cfg) };
    // SAFETY: as above.
    unsafe { ort::Error::result_from_status(status) }?;
    Ok(())
}

/// Serve every allocation of 1 MiB or more from a mapping of its own, given back to the system
/// when freed, unless the operator tuned glibc's threshold (`MALLOC_MMAP_THRESHOLD_`,
/// `GLIBC_TUNABLES`). Why: the KV-cache buffers (one per layer for keys and one for values,
/// reallocated as rows join and leave the batch) are ONNX Runtime tensors from glibc's malloc,
/// and glibc's default threshold rises to the largest block freed, after which such buffers come
/// from the heap, where they fragment. Measured on SmolLM2 (local mode, 16 clients,
/// `bench/soak-smollm2.sh`'s realistic mix for 150 s): 2.85 GB peak and 2.74 GB at the end with
/// 0.54 GB of KV cache and 0.09 GB of prefix cache, against 1.80 GB and 1.27 GB pinned, at the
/// same throughput; a 4,000-token prefill peaked at 1.64 GB against 1.33 GB, decode speed alike.
#[allow(unsafe_code)]
fn pin_mmap_threshold() {
    let tuned = std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("mmap_threshold"));
    if tuned {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it takes the allocator's own locks.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Give memory the C allocator holds free back to the operating system. The engine calls it
/// when its batch empties: KV buffers of rows that left are freed to glibc's heap, which keeps
/// them (fragmented, so not reused for larger buffers) unless trimmed; an idle sidecar should
/// not sit at its high-water mark. (The shared ONNX Runtime arena keeps its size: it is the
/// scratch of one layer run, bounded by the prefill chunk.)
#[allow(unsafe_code)]
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use ort::sys::OrtLoggingLevel as Ort;
    use tracing_subscriber::EnvFilter;

    use super::unheard_below;

    fn under(filter: &str) -> Ort {
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new(filter))
            .with_writer(std::io::sink)
            .finish();
        tracing::subscriber::with_default(subscriber, unheard_below)
    }

    #[test]
    fn onnx_runtime_formats_only_what_the_subscriber_keeps() {
        assert_eq!(under("info,ort=warn"), Ort::ORT_LOGGING_LEVEL_WARNING); // serve's default
        assert_eq!(under("warn"), Ort::ORT_LOGGING_LEVEL_WARNING); // the CLI's default
        assert_eq!(under("ort=info"), Ort::ORT_LOGGING_LEVEL_INFO);
        assert_eq!(under("ort::logging=trace"), Ort::ORT_LOGGING_LEVEL_VERBOSE);
        assert_eq!(under("trace"), Ort::ORT_LOGGING_LEVEL_VERBOSE);
        assert_eq!(under("error"), Ort::ORT_LOGGING_LEVEL_ERROR);
        assert_eq!(under("debug,ort=off"), Ort::ORT_LOGGING_LEVEL_ERROR);
        assert_eq!(unheard_below(), Ort::ORT_LOGGING_LEVEL_ERROR); // no subscriber
    }
}
