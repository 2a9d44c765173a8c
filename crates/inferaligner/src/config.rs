//! The sidecar's config file: the proxy's sections plus `[model]` and `[telemetry]`, merged
//! with figment from built-in defaults ← a TOML file ← `INFERALIGNER_` env (split on `__`)
//! ← command-line flags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use figment::Figment;
use figment::providers::Serialized;
use inferaligner_proxy::{PolicyConfig, ProxyConfig, ServerConfig, TraceConfig, UpstreamConfig};
use inferaligner_runtime::{
    CpuAllocator, EngineConfig, ExecutionProvider, OptimizationLevel, SessionOptions,
};
use serde::{Deserialize, Serialize};

/// The model the sidecar loads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Layer-split export directory (holds `manifest.json`).
    pub export: PathBuf,
    /// Steering pack made for that export; empty runs without gating (every policy acts as
    /// `off`).
    pub pack: PathBuf,
    /// `cpu`, `cuda` or `tensorrt`.
    pub provider: ExecutionProvider,
    /// GPU index for `cuda` / `tensorrt`.
    pub device_id: i32,
    /// Run on the CPU when the GPU provider cannot be registered (logged loudly, and
    /// `inferaligner_cpu_fallback` is 1).
    pub allow_cpu_fallback: bool,
    /// ONNX Runtime intra-op threads; 0 = the CPUs this process may use.
    pub threads: usize,
    /// ONNX Runtime inter-op threads; 1 runs each graph sequentially.
    pub inter_op_threads: usize,
    /// Whether idle ONNX Runtime threads spin between operators (faster, burns idle CPU).
    pub spinning: bool,
    /// Graph optimisation: `disable`, `basic`, `extended` or `all`.
    pub optimization_level: OptimizationLevel,
    /// Where ONNX Runtime gets scratch memory: `shared-arena` (one arena for every layer
    /// session), `session-arenas` (ONNX Runtime's default) or `malloc`.
    pub cpu_allocator: CpuAllocator,
    /// TensorRT: build fp16 engines.
    pub tensorrt_fp16: bool,
    /// TensorRT: directory to cache built engines in; empty = no cache (start-up then takes
    /// minutes).
    pub tensorrt_engine_cache: PathBuf,
    /// Batch, queue, prefill chunk and KV-cache budget.
    pub engine: EngineConfig,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            export: "models/smollm2-135m-instruct".into(),
            pack: crate::DEFAULT_PACK.into(),
            provider: ExecutionProvider::Cpu,
            device_id: 0,
            allow_cpu_fallback: false,
            threads: 0,
            inter_op_threads: 1,
            spinning: true,
            optimization_level: OptimizationLevel::default(),
            cpu_allocator: CpuAllocator::default(),
            tensorrt_fp16: false,
            tensorrt_engine_cache: PathBuf::new(),
            engine: EngineConfig::default(),
        }
    }
}

impl ModelConfig {
    /// The ONNX Runtime session options these settings ask for: the one place config (and
    /// the command line, see [`crate::RuntimeArgs`]) becomes session options.
    pub fn session_options(&self) -> SessionOptions {
        SessionOptions {
            provider: self.provider,
            device_id: self.device_id,
            allow_cpu_fallback: self.allow_cpu_fallback,
            intra_op_threads: self.threads,
            inter_op_threads: self.inter_op_threads,
            spinning: self.spinning,
            optimization_level: self.optimization_level,
            cpu_allocator: self.cpu_allocator,
            memory_pattern: SessionOptions::default().memory_pattern,
            tensorrt_fp16: self.tensorrt_fp16,
            tensorrt_engine_cache: (!self.tensorrt_engine_cache.as_os_str().is_empty())
                .then(|| self.tensorrt_engine_cache.clone()),
        }
    }

    /// The pack path, if one is configured.
    pub fn pack(&self) -> Option<&Path> {
        (!self.pack.as_os_str().is_empty()).then_some(self.pack.as_path())
    }
}

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

/// Logs and traces. OTLP export itself is configured by the standard `OTEL_EXPORTER_OTLP_*`
/// variables: set `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) to turn it on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// Log filter (`RUST_LOG` syntax); `RUST_LOG` itself wins when set.
    pub log_level: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            log_level: "info,ort=warn".into(),
        }
    }
}

/// The whole config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The policy used when a request picks none.
    pub default_policy: String,
    /// Listeners, mode and limits.
    pub server: ServerConfig,
    /// Upstream of `proxy` mode.
    pub upstream: UpstreamConfig,
    /// Trace content.
    pub trace: TraceConfig,
    /// The model.
    pub model: ModelConfig,
    /// Logs and traces.
    pub telemetry: TelemetryConfig,
    /// Named policies.
    pub policies: BTreeMap<String, PolicyConfig>,
}

impl Default for Config {
    fn default() -> Self {
        let p = ProxyConfig::default();
        Self {
            default_policy: p.default_policy,
            server: p.server,
            upstream: p.upstream,
            trace: p.trace,
            model: ModelConfig::default(),
            telemetry: TelemetryConfig::default(),
            policies: p.policies,
        }
    }
}

impl Config {
    /// The proxy's part.
    pub fn proxy(&self) -> ProxyConfig {
        ProxyConfig {
            server: self.server.clone(),
            upstream: self.upstream.clone(),
            default_policy: self.default_policy.clone(),
            policies: self.policies.clone(),
            trace: self.trace.clone(),
        }
    }

    /// Merge defaults ← `file` ← `INFERALIGNER_*` from `env` ← `overrides`, then validate.
    /// `env` is passed in (not read from the process) so that tests never touch the process
    /// environment.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &figment::value::Dict,
    ) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.is_file() {
                bail!("config file {} does not exist", file.display());
            }
            // Policies are replaced, not merged key by key, when the file names any: a file
            // that lists its policies should get exactly those.
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            let dict: figment::value::Dict =
                toml::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
            if dict.contains_key("policies") {
                figment = Figment::from(Serialized::defaults(Config {
                    policies: BTreeMap::new(),
                    ..Config::default()
                }));
            }
            figment = figment.merge(Named {
                name: file.display().to_string(),
                dict,
            });
        }
        figment = figment.merge(Named {
            name: "the INFERALIGNER_* environment variables".into(),
            dict: env_dict(env),
        });
        figment = figment.merge(Named {
            name: "the command line".into(),
            dict: overrides.clone(),
        });
        let config: Config = figment.extract().map_err(|e| {
            anyhow::anyhow!(
                "invalid config: {}",
                e.into_iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Check the whole config (the proxy's sections, and that the export exists).
    pub fn validate(&self) -> anyhow::Result<()> {
        self.proxy().validate()?;
        let engine = &self.model.engine;
        if engine.max_batch == 0 || engine.queue_capacity == 0 || engine.prefill_chunk_tokens == 0 {
            bail!(
                "model.engine.max_batch, queue_capacity and prefill_chunk_tokens must be at \
                 least 1"
            );
        }
        // One request of the largest allowed size must fit the KV budget on its own, or it
        // could pass the API's limits and still never run.
        let largest = self.server.max_prompt_tokens + self.server.max_new_tokens;
        if engine.max_kv_tokens < largest {
            bail!(
                "model.engine.max_kv_tokens ({}) must hold at least one request of \
                 server.max_prompt_tokens + server.max_new_tokens ({largest}) tokens",
                engine.max_kv_tokens
            );
        }
        Ok(())
    }

    /// The defaults as TOML.
    pub fn default_toml() -> String {
        toml::to_string_pretty(&Config::default()).expect("the default config serializes")
    }
}

/// Prefix of the environment variables that override config keys.
pub const ENV_PREFIX: &str = "INFERALIGNER_";

/// Config keys from one source, named in errors by where they came from (figment would name the
/// type and the line of code that built them).
struct Named {
    name: String,
    dict: figment::value::Dict,
}

impl figment::Provider for Named {
    fn metadata(&self) -> figment::Metadata {
        // keys as written in the file (`server.listen_port`), without figment's profile
        figment::Metadata::named(self.name.clone()).interpolater(|_, keys| keys.join("."))
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        Ok(figment::Profile::Default.collect(self.dict.clone()))
    }
}

/// `INFERALIGNER_SERVER__MODE=proxy` → `server.mode = "proxy"`, values parsed as figment's `Env`
/// parses them. (figment's `Env` reads the process environment; this takes the variables it is
/// handed.) `INFERALIGNER_CONFIG` names the file and is not a key.
fn env_dict(vars: impl IntoIterator<Item = (String, String)>) -> figment::value::Dict {
    let mut dict = figment::value::Dict::new();
    for (key, value) in vars {
        let Some(rest) = key.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        if path.iter().any(String::is_empty) || path[0] == "config" {
            continue;
        }
        let parsed: figment::value::Value = value
            .parse()
            .unwrap_or_else(|_| figment::value::Value::from(value.clone()));
        insert_path(&mut dict, &path, parsed);
    }
    dict
}

fn insert_path(dict: &mut figment::value::Dict, path: &[String], value: figment::value::Value) {
    let (first, rest) = path.split_first().expect("paths are not empty");
    if rest.is_empty() {
        dict.insert(first.clone(), value);
        return;
    }
    let entry = dict
        .entry(first.clone())
        .or_insert_with(|| figment::value::Dict::new().into());
    if let figment::value::Value::Dict(_, inner) = entry {
        insert_path(inner, rest, value);
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use inferaligner_core::PolicyMode;
    use inferaligner_proxy::ServeMode;

    use super::*;

    fn committed() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../config/default.toml")
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_committed_default_config_equals_the_built_in_defaults() {
        let loaded = Config::load(Some(&committed()), env(&[]), &Default::default())
            .expect("config/default.toml loads");
        assert_eq!(loaded, Config::default());
        let printed: Config = toml::from_str(&Config::default_toml()).expect("round trip");
        assert_eq!(printed, Config::default());
    }

    #[test]
    fn env_overrides_the_file_and_flags_override_env() {
        let vars = env(&[
            ("INFERALIGNER_SERVER__MODE", "proxy"),
            ("INFERALIGNER_SERVER__MAX_BODY_BYTES", "1000"),
            ("INFERALIGNER_UPSTREAM__URL", "http://vllm:8000"),
            ("INFERALIGNER_POLICIES__DEFAULT__MODE", "block"),
            ("INFERALIGNER_POLICIES__DEFAULT__LAYERS", "[12, 14]"),
            ("OTHER_VAR", "ignored"),
        ]);
        let mut flags = figment::value::Dict::new();
        let mut server = figment::value::Dict::new();
        server.insert("mode".into(), "local".into());
        flags.insert("server".into(), server.into());
        let c = Config::load(Some(&committed()), vars.clone(), &Default::default()).expect("loads");
        assert_eq!(c.server.mode, ServeMode::Proxy);
        assert_eq!(c.server.max_body_bytes, 1000);
        assert_eq!(c.upstream.url, "http://vllm:8000");
        assert_eq!(c.policies["default"].mode, PolicyMode::Block);
        assert_eq!(c.policies["default"].layers, Some(vec![12, 14]));
        let c = Config::load(Some(&committed()), vars, &flags).expect("loads");
        assert_eq!(c.server.mode, ServeMode::Local);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |text: &str| {
            let path = dir.path().join("c.toml");
            std::fs::write(&path, text).expect("write");
            Config::load(Some(&path), env(&[]), &Default::default())
        };
        let e = write("[server]\nlisten_port = 1\n").expect_err("unknown key");
        // the key as written, and where it was written
        assert!(
            format!("{e:#}").contains("for key \"server.listen_port\" in "),
            "{e:#}"
        );
        assert!(format!("{e:#}").contains("c.toml"), "{e:#}");
        let e = Config::load(
            None,
            env(&[("INFERALIGNER_SERVER__LISTEN_PORT", "1")]),
            &Default::default(),
        )
        .expect_err("unknown key");
        assert!(
            format!("{e:#}").contains("in the INFERALIGNER_* environment variables"),
            "{e:#}"
        );
        let e = write("[sever]\nmode = \"proxy\"\n").expect_err("unknown section");
        assert!(format!("{e:#}").contains("sever"), "{e:#}");
        let e = write("[server]\nmode = \"remote\"\n").expect_err("bad mode");
        assert!(format!("{e:#}").contains("remote"), "{e:#}");
        let e = write("default_policy = \"x\"\n").expect_err("dangling default");
        assert!(format!("{e:#}").contains("default_policy"), "{e:#}");
        assert!(
            Config::load(
                Some(&dir.path().join("none.toml")),
                env(&[]),
                &Default::default()
            )
            .is_err()
        );
    }

    #[test]
    fn a_file_with_policies_replaces_the_built_in_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "default_policy = \"guard\"\n[policies.guard]\nmode = \"block\"\n",
        )
        .expect("write");
        let c = Config::load(Some(&path), env(&[]), &Default::default()).expect("loads");
        assert_eq!(c.policies.keys().collect::<Vec<_>>(), vec!["guard"]);
    }
}
