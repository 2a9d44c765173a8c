//! The proxy's config sections. The binary merges them from defaults, TOML, env and flags
//! (figment); this crate only defines, defaults and validates them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use inferaligner_core::{OnError, Policy, PolicyMode, RawCompletions, SteeredAnswers};
use serde::{Deserialize, Serialize};

use crate::ProxyError;
use crate::passthrough::Passthrough;

/// How requests are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServeMode {
    /// The sidecar generates every answer itself, steered when the gate fires.
    #[default]
    Local,
    /// The sidecar gates every request and forwards harmless ones to the upstream server.
    Proxy,
}

impl ServeMode {
    /// Stable label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Proxy => "proxy",
        }
    }
}

/// Listeners, mode and request limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// API listener.
    pub listen: SocketAddr,
    /// Admin listener (`/live`, `/ready`, `/metrics`); keep it off the Service.
    pub admin_listen: SocketAddr,
    /// `local` or `proxy`.
    pub mode: ServeMode,
    /// Model id served by `/v1/models` and echoed in responses; empty takes the export's name.
    pub model_name: String,
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// Longest prompt accepted, in tokens (also capped by the model's context).
    pub max_prompt_tokens: usize,
    /// Most new tokens a request may ask for.
    pub max_new_tokens: usize,
    /// New tokens when the request does not say.
    pub default_max_tokens: usize,
    /// Requests handled at once; more are refused with 429 and `Retry-After`.
    pub max_concurrent_requests: usize,
    /// Whole-request deadline in seconds (generation and forwarding).
    pub request_timeout_s: f64,
    /// The gate must decide within this many seconds of the request's submission (waiting in
    /// the engine's queue included); otherwise gating has failed and the policy's `on_error`
    /// decides. Below `request_timeout_s`.
    pub gate_timeout_s: f64,
    /// After SIGTERM, in-flight requests get this long to finish.
    pub drain_grace_s: f64,
    /// `Retry-After` seconds on 429.
    pub retry_after_s: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            mode: ServeMode::Local,
            model_name: String::new(),
            max_body_bytes: 1 << 20,
            max_prompt_tokens: 4096,
            max_new_tokens: 1024,
            default_max_tokens: 256,
            max_concurrent_requests: 64,
            request_timeout_s: 120.0,
            gate_timeout_s: 60.0,
            drain_grace_s: 20.0,
            retry_after_s: 1,
        }
    }
}

/// The upstream OpenAI-compatible server of `proxy` mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL (`http://host:port`); request paths are appended. Only config sets it: no
    /// request field can change where requests go.
    pub url: String,
    /// TCP connect timeout.
    pub connect_timeout_s: f64,
    /// Longest wait for the response head, and between two body chunks.
    pub read_timeout_s: f64,
    /// Routes of the upstream passed through ungated (exact paths, or prefixes written
    /// `/prefix/*`): for those that write no text (embeddings, tokenizing, health). Empty by
    /// default: any other route is a 404.
    pub passthrough: Vec<String>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8000".into(),
            connect_timeout_s: 2.0,
            read_timeout_s: 60.0,
            passthrough: Vec::new(),
        }
    }
}

/// A named policy (the keys of [`Policy`]) and whether clients may pick it. The fields are
/// spelled out rather than `#[serde(flatten)]`ed from `Policy` because serde cannot combine
/// flattening with `deny_unknown_fields`, and a misspelled policy key must be an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// What a harmful decision leads to: `steer`, `block`, `monitor` or `off`.
    pub mode: PolicyMode,
    /// Steering strength; unset takes the pack's default.
    pub alpha: Option<f32>,
    /// Steered layers (0-based); unset takes the pack's default.
    pub layers: Option<Vec<usize>>,
    /// Factor on alpha at generated positions: 1 steers every position (the paper), 0 only the
    /// prompt.
    pub generated_scale: f32,
    /// Added to the gate score: positive is stricter.
    pub offset: f32,
    /// The answer of `block` (and of `fail-closed` on errors).
    pub refusal: String,
    /// `fail-open` (serve unguarded) or `fail-closed` (refuse) when gating fails.
    pub on_error: OnError,
    /// `/v1/completions`: `gate` (read like a chat: see the pack's gate view) or `refuse` (403).
    pub raw_completions: RawCompletions,
    /// Read the request's system and developer messages too (default); off when the system
    /// prompt is the operator's own and clients cannot set it.
    pub gate_system_prompts: bool,
    /// A steered answer: `as-generated`, `stop-at-refusal` (ends with its refusing sentence)
    /// or `refusal-or-fallback` (also replaced by `refusal` when it does not refuse).
    pub steered_answers: SteeredAnswers,
    /// Factors on alpha to steer again at, in turn, when the answer guard does not keep a
    /// steered answer's opening, before the fallback.
    pub retry_scales: Vec<f32>,
    /// Clients may select it with the `x-inferaligner-policy` header or `model: "<id>@<name>"`.
    pub selectable: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self::from_policy(Policy::default(), false)
    }
}

impl PolicyConfig {
    /// A policy entry.
    pub fn from_policy(p: Policy, selectable: bool) -> Self {
        Self {
            mode: p.mode,
            alpha: p.alpha,
            layers: p.layers,
            generated_scale: p.generated_scale,
            offset: p.offset,
            refusal: p.refusal,
            on_error: p.on_error,
            raw_completions: p.raw_completions,
            gate_system_prompts: p.gate_system_prompts,
            steered_answers: p.steered_answers,
            retry_scales: p.retry_scales,
            selectable,
        }
    }

    /// The core policy.
    pub fn policy(&self) -> Policy {
        Policy {
            mode: self.mode,
            alpha: self.alpha,
            layers: self.layers.clone(),
            generated_scale: self.generated_scale,
            offset: self.offset,
            refusal: self.refusal.clone(),
            on_error: self.on_error,
            raw_completions: self.raw_completions,
            gate_system_prompts: self.gate_system_prompts,
            steered_answers: self.steered_answers,
            retry_scales: self.retry_scales.clone(),
        }
    }
}

/// What traces may contain.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TraceConfig {
    /// Record prompts and completions in spans (off: they may hold personal data).
    pub record_content: bool,
}

/// Everything the proxy reads from config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Listeners, mode, limits.
    pub server: ServerConfig,
    /// Upstream of `proxy` mode.
    pub upstream: UpstreamConfig,
    /// The policy used when a request picks none.
    pub default_policy: String,
    /// Named policies.
    pub policies: BTreeMap<String, PolicyConfig>,
    /// Trace content.
    pub trace: TraceConfig,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        let strict = Policy {
            mode: PolicyMode::Block,
            offset: 1.0,
            ..Policy::default()
        };
        let monitor = Policy {
            mode: PolicyMode::Monitor,
            on_error: OnError::FailOpen,
            ..Policy::default()
        };
        Self {
            server: ServerConfig::default(),
            upstream: UpstreamConfig::default(),
            default_policy: "default".into(),
            policies: BTreeMap::from([
                ("default".into(), PolicyConfig::default()),
                ("strict".into(), PolicyConfig::from_policy(strict, true)),
                ("monitor".into(), PolicyConfig::from_policy(monitor, false)),
            ]),
            trace: TraceConfig::default(),
        }
    }
}

fn seconds(name: &str, value: f64) -> Result<Duration, ProxyError> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| ProxyError::Config(format!("{name} must be a positive number of seconds")))
}

impl ProxyConfig {
    /// Check what serde cannot: references between sections, positive limits, a usable
    /// upstream URL.
    pub fn validate(&self) -> Result<(), ProxyError> {
        let bad = |m: String| Err(ProxyError::Config(m));
        if !self.policies.contains_key(&self.default_policy) {
            return bad(format!(
                "default_policy `{}` is not one of the policies ({})",
                self.default_policy,
                self.policies.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        for (name, p) in &self.policies {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return bad(format!(
                    "policy name `{name}` must be letters, digits, `-`, `_` or `.`"
                ));
            }
            if let Some(alpha) = p.alpha
                && !(alpha.is_finite() && alpha >= 0.0)
            {
                return bad(format!("policy `{name}`: alpha must be finite and ≥ 0"));
            }
            if !p.offset.is_finite() {
                return bad(format!("policy `{name}`: offset must be finite"));
            }
            if p.retry_scales.iter().any(|r| !(r.is_finite() && *r >= 0.0)) {
                return bad(format!(
                    "policy `{name}`: retry_scales must be finite and ≥ 0"
                ));
            }
        }
        let s = &self.server;
        for (name, v) in [
            ("server.max_body_bytes", s.max_body_bytes),
            ("server.max_prompt_tokens", s.max_prompt_tokens),
            ("server.max_new_tokens", s.max_new_tokens),
            ("server.default_max_tokens", s.default_max_tokens),
            ("server.max_concurrent_requests", s.max_concurrent_requests),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        if s.default_max_tokens > s.max_new_tokens {
            return bad("server.default_max_tokens must not exceed server.max_new_tokens".into());
        }
        if s.listen == s.admin_listen && s.listen.port() != 0 {
            return bad("server.listen and server.admin_listen must differ".into());
        }
        seconds("server.request_timeout_s", s.request_timeout_s)?;
        seconds("server.gate_timeout_s", s.gate_timeout_s)?;
        if s.gate_timeout_s >= s.request_timeout_s {
            return bad("server.gate_timeout_s must be below server.request_timeout_s".into());
        }
        seconds("server.drain_grace_s", s.drain_grace_s)?;
        seconds(
            "upstream.connect_timeout_s",
            self.upstream.connect_timeout_s,
        )?;
        seconds("upstream.read_timeout_s", self.upstream.read_timeout_s)?;
        if s.mode == ServeMode::Proxy {
            self.upstream_uri()?;
        }
        if !Passthrough::new(&self.upstream.passthrough)?.is_empty() && s.mode != ServeMode::Proxy {
            return bad(
                "upstream.passthrough needs server.mode = \"proxy\" (local mode has no upstream)"
                    .into(),
            );
        }
        Ok(())
    }

    /// The upstream base URL, parsed (`http` only: the sidecar talks to a server in its pod).
    pub fn upstream_uri(&self) -> Result<http::Uri, ProxyError> {
        let uri: http::Uri = self.upstream.url.parse().map_err(|e| {
            ProxyError::Config(format!("upstream.url `{}`: {e}", self.upstream.url))
        })?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(ProxyError::Config(format!(
                "upstream.url `{}` must be an http:// URL with a host",
                self.upstream.url
            )));
        }
        Ok(uri)
    }

    pub(crate) fn gate_timeout(&self) -> Duration {
        seconds("", self.server.gate_timeout_s).unwrap_or(Duration::from_secs(60))
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        seconds("", self.server.request_timeout_s).unwrap_or(Duration::from_secs(120))
    }

    pub(crate) fn drain_grace(&self) -> Duration {
        seconds("", self.server.drain_grace_s).unwrap_or(Duration::from_secs(20))
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        seconds("", self.upstream.connect_timeout_s).unwrap_or(Duration::from_secs(2))
    }

    pub(crate) fn read_timeout(&self) -> Duration {
        seconds("", self.upstream.read_timeout_s).unwrap_or(Duration::from_secs(60))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        ProxyConfig::default()
            .validate()
            .expect("defaults are valid");
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let c = ProxyConfig {
            default_policy: "nope".into(),
            ..ProxyConfig::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("default_policy")
        );
        let mut c = ProxyConfig::default();
        c.server.mode = ServeMode::Proxy;
        c.upstream.url = "https://example.invalid".into();
        assert!(c.validate().unwrap_err().to_string().contains("http://"));
        let mut c = ProxyConfig::default();
        c.server.request_timeout_s = 0.0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("request_timeout_s")
        );
        // a gate deadline at or past the request's is refused at start
        let mut c = ProxyConfig::default();
        c.server.gate_timeout_s = c.server.request_timeout_s;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("gate_timeout_s")
        );
        let mut c = ProxyConfig::default();
        c.server.default_max_tokens = c.server.max_new_tokens + 1;
        assert!(c.validate().is_err());
    }
}
