//! Prometheus metrics. Label values come from enums, never from user input.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The gate's verdict as a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum GateLabel {
    /// Called harmful.
    harmful,
    /// Called harmless.
    harmless,
    /// Not gated (policy `off`, no pack, or the request failed before gating).
    off,
    /// Gating failed; the policy's `on_error` decided.
    error,
}

impl GateLabel {
    /// Header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::harmful => "harmful",
            Self::harmless => "harmless",
            Self::off => "off",
            Self::error => "error",
        }
    }
}

/// What happened to the request as a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ActionLabel {
    /// Generated locally, unsteered.
    generate,
    /// Generated locally with steering.
    steer,
    /// Answered with the refusal.
    block,
    /// Forwarded to the upstream.
    forward,
    /// Passed to the upstream ungated: a route of `upstream.passthrough`.
    passthrough,
    /// Ended in an error response.
    error,
}

/// Labels of `inferaligner_requests_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// Gate verdict.
    pub decision: GateLabel,
    /// What was done.
    pub action: ActionLabel,
}

/// Labels of `inferaligner_upstream_errors_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    /// `connect`, `timeout`, `status_5xx`, `body`.
    pub kind: UpstreamErrorKind,
}

/// Upstream failure kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum UpstreamErrorKind {
    /// Could not connect or send.
    connect,
    /// No answer in time.
    timeout,
    /// Answered 5xx.
    status_5xx,
    /// Failed mid-body.
    body,
}

/// What the engine reports (KV cache, prefix cache, gate batching, view memo, tokens generated),
/// read when `/metrics` is scraped (see [`Metrics::set_engine_probe`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineFigures {
    /// Bytes of KV buffers allocated now.
    pub bytes: u64,
    /// The budget in bytes.
    pub budget_bytes: u64,
    /// Slots the rows in flight may grow to.
    pub reserved_tokens: u64,
    /// The budget in slots (tokens).
    pub budget_tokens: u64,
    /// Bytes the prefix cache holds.
    pub prefix_bytes: u64,
    /// Tokens the prefix cache holds.
    pub prefix_tokens: u64,
    /// Of those, tokens a later lookup reused (protected from one-off prompts).
    pub prefix_protected_tokens: u64,
    /// Prefills that looked a prefix up, since the start.
    pub prefix_lookups: u64,
    /// Lookups that reused a cached prefix.
    pub prefix_hits: u64,
    /// Prompt tokens the lookups covered.
    pub prefix_lookup_tokens: u64,
    /// Prompt tokens whose KV was reused rather than computed.
    pub prefix_reused_tokens: u64,
    /// Gate-phase chunks run for several requests together.
    pub gate_batches: u64,
    /// Requests in those batches.
    pub gate_batched_requests: u64,
    /// Gate views after a request's first looked up among those read before.
    pub view_memo_lookups: u64,
    /// Lookups that found the view (not run again).
    pub view_memo_hits: u64,
    /// Tokens the model generated, since the start.
    pub generated_tokens: u64,
}

/// Reads the engine's figures when `/metrics` is scraped.
pub type EngineProbe = Box<dyn Fn() -> EngineFigures + Send + Sync>;

/// Every metric the sidecar exports.
pub struct Metrics {
    registry: Registry,
    /// Requests by decision and action.
    pub requests: Family<RequestLabels, Counter>,
    /// Seconds from admission to the gate's decision (includes queueing for the engine).
    pub gate_latency: Histogram,
    /// Requests being handled now.
    pub in_flight: Gauge<i64, AtomicI64>,
    /// Requests refused for capacity.
    pub overloaded: Counter,
    /// Upstream failures.
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    /// Steering pack reloads by result.
    pub pack_reloads: Family<ReloadLabels, Counter>,
    /// Steered answers held by the policy, by how they ended.
    pub steered_answers: Family<SteeredLabels, Counter>,
    /// Steered answers steered again at another strength (the policy's `retry_scales`).
    pub steered_retries: Counter,
    /// 1 when a GPU provider failed and the model runs on the CPU (`allow_cpu_fallback`).
    pub cpu_fallback: Gauge<i64, AtomicI64>,
    resident_memory: Gauge<i64, AtomicI64>,
    kv_cache_bytes: Gauge<i64, AtomicI64>,
    kv_cache_budget_bytes: Gauge<i64, AtomicI64>,
    kv_cache_reserved_tokens: Gauge<i64, AtomicI64>,
    kv_cache_budget_tokens: Gauge<i64, AtomicI64>,
    prefix_cache_bytes: Gauge<i64, AtomicI64>,
    prefix_cache_tokens: Gauge<i64, AtomicI64>,
    prefix_cache_protected_tokens: Gauge<i64, AtomicI64>,
    /// The engine's own counts, copied at each scrape: prefix lookups, hits, looked-up tokens,
    /// reused tokens, gate batches, requests in them, view-memo lookups and hits, generated
    /// tokens.
    engine_counts: [Counter<u64, AtomicU64>; 9],
    engine_probe: OnceLock<EngineProbe>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Labels of `inferaligner_steered_answers_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SteeredLabels {
    /// `refusal`, `fallback` or `as-generated`.
    pub ending: String,
}

/// Labels of `inferaligner_pack_reloads_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` or `refused`.
    pub result: ReloadResult,
}

/// Outcome of a pack reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ReloadResult {
    /// The new pack is in use.
    ok,
    /// The new pack was refused; the old one stays.
    refused,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("inferaligner");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "API requests by gate decision and action",
            requests.clone(),
        );
        let gate_latency = Histogram::new([
            0.002, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ]);
        registry.register(
            "gate_latency_seconds",
            "Time from admission to the gate decision",
            gate_latency.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "queue_depth",
            "Requests admitted and not yet answered",
            in_flight.clone(),
        );
        let overloaded = Counter::default();
        registry.register(
            "overloaded",
            "Requests refused with 429 for capacity",
            overloaded.clone(),
        );
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Upstream failures by kind",
            upstream_errors.clone(),
        );
        let pack_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "pack_reloads",
            "Steering pack reloads by result",
            pack_reloads.clone(),
        );
        let steered_answers = Family::<SteeredLabels, Counter>::default();
        registry.register(
            "steered_answers",
            "Steered answers held by the policy's steered_answers, by how they ended (refusal: its \
             first sentence refused; fallback: replaced by the policy's refusal)",
            steered_answers.clone(),
        );
        let steered_retries = Counter::default();
        registry.register(
            "steered_retries",
            "Times a steered answer whose opening the policy did not keep was steered again at \
             another strength (the policy's retry_scales) before it ended",
            steered_retries.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::<i64, AtomicI64>::default();
            registry.register(name, help, g.clone());
            g
        };
        let cpu_fallback = gauge(
            &mut registry,
            "cpu_fallback",
            "1 when the GPU execution provider failed and the model runs on the CPU",
        );
        let resident_memory = gauge(
            &mut registry,
            "process_resident_memory_bytes",
            "Resident memory of the sidecar process (weights, KV cache, scratch)",
        );
        let kv_cache_bytes = gauge(
            &mut registry,
            "kv_cache_bytes",
            "Bytes of KV-cache buffers allocated now",
        );
        let kv_cache_budget_bytes = gauge(
            &mut registry,
            "kv_cache_budget_bytes",
            "The KV-cache budget in bytes (model.engine.max_kv_tokens)",
        );
        let kv_cache_reserved_tokens = gauge(
            &mut registry,
            "kv_cache_reserved_tokens",
            "KV slots the sequences in flight may grow to",
        );
        let kv_cache_budget_tokens = gauge(
            &mut registry,
            "kv_cache_budget_tokens",
            "The KV-cache budget in slots (model.engine.max_kv_tokens)",
        );
        let prefix_cache_bytes = gauge(
            &mut registry,
            "prefix_cache_bytes",
            "Bytes of prompt-prefix KV kept for reuse (model.engine.prefix_cache_tokens)",
        );
        let prefix_cache_tokens = gauge(
            &mut registry,
            "prefix_cache_tokens",
            "Prompt-prefix tokens whose KV is kept for reuse",
        );
        let prefix_cache_protected_tokens = gauge(
            &mut registry,
            "prefix_cache_protected_tokens",
            "Cached prefix tokens a later request reused, kept before one-off prompts (at most 3/4 \
             of model.engine.prefix_cache_tokens)",
        );
        // Counters the engine keeps, copied at each scrape (names as in `engine_counts`).
        let engine_counts = [
            (
                "prefix_cache_lookups",
                "Prefills that looked up a cached prefix",
            ),
            (
                "prefix_cache_hits",
                "Prefix lookups that reused a cached prefix",
            ),
            (
                "prefix_cache_lookup_tokens",
                "Prompt tokens the prefix lookups covered",
            ),
            (
                "prefix_cache_reused_tokens",
                "Prompt tokens whose KV came from the prefix cache",
            ),
            (
                "gate_batches",
                "Gate prefill chunks run for several requests together",
            ),
            (
                "gate_batched_requests",
                "Requests gated in those batches (divided by gate_batches: the mean batch)",
            ),
            (
                "gate_view_memo_lookups",
                "Gate views after a request's first (system prompts, end blocks) looked up among \
                 those read before",
            ),
            (
                "gate_view_memo_hits",
                "Lookups that found the view read before, so it was not run again",
            ),
            (
                "generated_tokens",
                "Tokens the local model generated: answers (streamed to a client that left \
                 included) and steered answers tried again",
            ),
        ]
        .map(|(name, help)| {
            let c = Counter::<u64, AtomicU64>::default();
            registry.register(name, help, c.clone());
            c
        });
        Self {
            registry,
            engine_counts,
            prefix_cache_bytes,
            prefix_cache_tokens,
            prefix_cache_protected_tokens,
            pack_reloads,
            steered_answers,
            steered_retries,
            cpu_fallback,
            resident_memory,
            kv_cache_bytes,
            kv_cache_budget_bytes,
            kv_cache_reserved_tokens,
            kv_cache_budget_tokens,
            engine_probe: OnceLock::new(),
            requests,
            gate_latency,
            in_flight,
            overloaded,
            upstream_errors,
        }
    }
}

impl Metrics {
    /// Count one finished request.
    pub fn request(&self, decision: GateLabel, action: ActionLabel) {
        self.requests
            .get_or_create(&RequestLabels { decision, action })
            .inc();
    }

    /// Count an upstream failure.
    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors
            .get_or_create(&UpstreamErrorLabels { kind })
            .inc();
    }

    /// Count a pack reload.
    pub fn pack_reload(&self, ok: bool) {
        let result = if ok {
            ReloadResult::ok
        } else {
            ReloadResult::refused
        };
        self.pack_reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
    }

    /// Where `/metrics` reads the engine's figures from (set once, when the model has loaded).
    pub fn set_engine_probe(&self, probe: EngineProbe) {
        let _ = self.engine_probe.set(probe);
    }

    /// Prometheus text exposition, with the memory figures read now.
    pub fn encode(&self) -> String {
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        if let Some(rss) = resident_memory_bytes() {
            self.resident_memory.set(gauge(rss));
        }
        if let Some(probe) = self.engine_probe.get() {
            let kv = probe();
            self.kv_cache_bytes.set(gauge(kv.bytes));
            self.kv_cache_budget_bytes.set(gauge(kv.budget_bytes));
            self.kv_cache_reserved_tokens.set(gauge(kv.reserved_tokens));
            self.kv_cache_budget_tokens.set(gauge(kv.budget_tokens));
            self.prefix_cache_bytes.set(gauge(kv.prefix_bytes));
            self.prefix_cache_tokens.set(gauge(kv.prefix_tokens));
            self.prefix_cache_protected_tokens
                .set(gauge(kv.prefix_protected_tokens));
            let counts = [
                kv.prefix_lookups,
                kv.prefix_hits,
                kv.prefix_lookup_tokens,
                kv.prefix_reused_tokens,
                kv.gate_batches,
                kv.gate_batched_requests,
                kv.view_memo_lookups,
                kv.view_memo_hits,
                kv.generated_tokens,
            ];
            for (counter, n) in self.engine_counts.iter().zip(counts) {
                counter.inner().store(n, Ordering::Relaxed);
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// This process's resident memory (`VmRSS` in /proc/self/status; Linux only).
fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}
