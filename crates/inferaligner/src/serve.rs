//! `inferaligner serve`: the runtime behind the proxy's [`Backend`] trait, model loading and
//! warm-up, readiness, and SIGTERM drain.

use std::future::Future;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use anyhow::{Context, bail};
use inferaligner_core::{Action, GateView, PolicyMode, ResponseFormat, SteeringPack};
use inferaligner_proxy::{
    Backend, BackendError, BackendErrorKind, BackendEvent, EngineFigures, EngineProbe, Job,
    Logprob, Metrics, ModelInfo, Prompt, Ready, ServeMode, Sidecar, SteeredAnswer, TokenLogprob,
    Tokenized, serve_admin,
};
use inferaligner_runtime::{
    ChatTokenizer, EarlyExit, Engine, ErrorKind, EventSink, GenerationEvent, GenerationParams,
    GenerationRequest, LayerSplitModel, Manifest, RowContext, SamplingParams, SubmitError,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::config::{Config, ModelConfig};
use crate::memo::{VIEW_MEMO_ENTRIES, ViewMemo};
use crate::steering::{self, Held, Retry, Steering};
use crate::view::Rendered;

/// The ONNX Runtime engine as the proxy's backend.
pub struct RuntimeBackend {
    engine: Engine,
    /// The steering pack; replaced as a whole by [`RuntimeBackend::reload_pack`]. Requests read
    /// it once, at their gate, and carry their steering vectors with them, so a replacement
    /// never changes a request in flight.
    pack: RwLock<Option<Arc<SteeringPack>>>,
    manifest: Manifest,
    /// Every policy's steered layers (`None` = the pack's), checked against each pack.
    policy_layers: Vec<(String, Option<Vec<usize>>)>,
    info: ModelInfo,
    /// The GPU provider failed and the model runs on the CPU (`allow_cpu_fallback`).
    cpu_fallback: bool,
    /// Gate activations of views read before (an operator's system prompt).
    memo: Arc<ViewMemo>,
}

impl std::fmt::Debug for RuntimeBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeBackend")
            .field("model", &self.info.id)
            .finish()
    }
}

impl RuntimeBackend {
    /// Load the export and the pack (refused unless made for this export), check every
    /// policy's steered layers against the pack, and start the engine.
    pub fn load(model: &ModelConfig, config: &Config) -> anyhow::Result<Self> {
        let loaded = LayerSplitModel::load(&model.export, &model.session_options())
            .with_context(|| format!("loading the export {}", model.export.display()))?;
        let manifest = loaded.manifest().clone();
        let cpu_fallback = loaded.on_cpu_fallback();
        let policy_layers = config
            .policies
            .iter()
            .map(|(name, p)| (name.clone(), p.layers.clone()))
            .collect();
        let tokenizer = Arc::new(ChatTokenizer::load(&manifest)?);
        let engine = Engine::start(
            loaded,
            tokenizer,
            Some(steering::hook()),
            model.engine.clone(),
        )?;
        let mut backend = Self {
            info: ModelInfo {
                // The export directory's name ("smollm2-135m-instruct"): what operators
                // chose; `server.model_name` overrides it.
                id: model
                    .export
                    .canonicalize()
                    .ok()
                    .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .unwrap_or_else(|| "model".into()),
                context_length: manifest.context_length,
                vocab_size: manifest.vocab_size,
                has_pack: false,
            },
            engine,
            pack: RwLock::new(None),
            manifest,
            policy_layers,
            cpu_fallback,
            memo: Arc::new(ViewMemo::new(VIEW_MEMO_ENTRIES)),
        };
        match model.pack() {
            Some(path) => {
                let pack = backend.check_pack(path)?;
                backend.info.has_pack = true;
                backend.pack = RwLock::new(Some(pack));
            }
            None => tracing::warn!("no steering pack configured: requests are not gated"),
        }
        Ok(backend)
    }

    /// Load a pack and check it against the export and every policy's layers.
    fn check_pack(&self, path: &Path) -> anyhow::Result<Arc<SteeringPack>> {
        let pack = SteeringPack::load(path)
            .with_context(|| format!("loading the steering pack {}", path.display()))?;
        pack.check_target(&self.manifest.fingerprint()?)
            .with_context(|| format!("steering pack {}", path.display()))?;
        let pack = Arc::new(pack);
        for (name, layers) in &self.policy_layers {
            let steering = Steering {
                pack: pack.clone(),
                policy: Arc::new(inferaligner_core::Policy {
                    layers: layers.clone(),
                    ..Default::default()
                }),
            };
            steering
                .check_layers(&self.manifest)
                .with_context(|| format!("policy `{name}`"))?;
        }
        Ok(pack)
    }

    /// Replace the steering pack with the one at `path`. A pack that fails to load or is
    /// made for another model is refused and the running one stays; requests in flight keep
    /// the pack they were gated with.
    pub fn reload_pack(&self, path: &Path) -> anyhow::Result<()> {
        let pack = self.check_pack(path)?;
        let mut current = self
            .pack
            .write()
            .map_err(|_| anyhow::anyhow!("the pack lock is poisoned"))?;
        if current.is_none() {
            bail!("the sidecar started without a pack; restart it to start gating");
        }
        *current = Some(pack);
        Ok(())
    }

    /// Whether the model fell back to the CPU because the GPU provider failed.
    pub fn cpu_fallback(&self) -> bool {
        self.cpu_fallback
    }

    /// Reads the engine's figures for `/metrics`.
    pub fn engine_probe(&self) -> EngineProbe {
        let kv = self.engine.kv_usage();
        let memo = self.memo.clone();
        let n = |v: usize| v as u64;
        Box::new(move || {
            let (prefix_bytes, prefix_tokens, prefix_protected_tokens) = kv.prefix_cached();
            let prefix = kv.prefix_stats();
            let (gate_batches, gate_batched_requests) = kv.gate_batches();
            let (view_memo_lookups, view_memo_hits) = memo.counts();
            EngineFigures {
                bytes: n(kv.bytes()),
                budget_bytes: n(kv.budget_bytes()),
                reserved_tokens: n(kv.reserved_tokens()),
                budget_tokens: n(kv.budget_tokens()),
                prefix_bytes: n(prefix_bytes),
                prefix_tokens: n(prefix_tokens),
                prefix_protected_tokens: n(prefix_protected_tokens),
                prefix_lookups: prefix.lookups,
                prefix_hits: prefix.hits,
                prefix_lookup_tokens: prefix.lookup_tokens,
                prefix_reused_tokens: prefix.reused_tokens,
                gate_batches,
                gate_batched_requests,
                view_memo_lookups,
                view_memo_hits,
                generated_tokens: kv.generated_tokens(),
            }
        })
    }

    fn current_pack(&self) -> Option<Arc<SteeringPack>> {
        self.pack.read().ok().and_then(|p| p.clone())
    }

    /// The job's row and gate (no gate under policy `off`, without a pack, or when the job's
    /// gate already decided: a steered one's row carries the vectors), and `sink` as the
    /// policy finishes a steered answer.
    fn gate(
        &self,
        job: &Job,
        params: &GenerationParams,
        (sink, held): (EventSink, &Held),
    ) -> (RowContext, Option<EarlyExit>, EventSink) {
        let pack = self.current_pack();
        let (Some(pack), false) = (pack, job.policy.mode == PolicyMode::Off) else {
            return (RowContext::default(), None, sink);
        };
        // decided to pass already: generated unsteered, as without a gate
        if job.decided.is_some_and(|a| a != Action::Steer) {
            return (RowContext::default(), None, sink);
        }
        let steering = Steering {
            pack,
            policy: job.policy.clone(),
        };
        let retry = Some(Retry {
            submitter: self.engine.follow_ups(),
            prompt: job.tokens.clone(),
            params: params.clone(),
            max_written_tokens: job.max_written_tokens,
        });
        let prompt = (self.engine.tokenizer(), job.tokens.as_slice());
        if job.decided == Some(Action::Steer) {
            let (row, sink) = steering.steer(&job.gate_views, prompt, (sink, held), retry);
            return (row, None, sink);
        }
        let events = job.events.clone();
        let end_unless_steered = job.mode == ServeMode::Proxy;
        let report = move |report| {
            let _ = events.send(BackendEvent::Gate(report));
        };
        let (exit, sink) = steering.gate(
            (job.gate_views.clone(), Some(self.memo.clone())),
            end_unless_steered,
            prompt,
            report,
            (sink, held),
            retry,
        );
        (RowContext::default(), Some(exit), sink)
    }
}

fn runtime_error_kind(kind: ErrorKind) -> BackendErrorKind {
    if kind.is_request_error() {
        BackendErrorKind::InvalidRequest
    } else {
        BackendErrorKind::Model
    }
}

impl Backend for RuntimeBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenize(&self, prompt: &Prompt) -> Result<Tokenized, BackendError> {
        let tokenizer = self.engine.tokenizer();
        let invalid = |e: inferaligner_runtime::RuntimeError| {
            BackendError::new(runtime_error_kind(e.kind()), e.to_string()).about(e.field())
        };
        match prompt {
            Prompt::Chat(_) if !tokenizer.has_chat_template() => {
                return Err(BackendError::new(
                    BackendErrorKind::InvalidRequest,
                    "this model has no chat template; use /v1/completions",
                ));
            }
            Prompt::Tokens(ids) => {
                let vocab = self.manifest.vocab_size;
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                    return Err(BackendError::new(
                        BackendErrorKind::InvalidRequest,
                        format!(
                            "token id {bad} in `prompt` is outside the vocabulary (0..{vocab})"
                        ),
                    ));
                }
            }
            _ => {}
        }
        // The view the current pack was fitted on (none without a pack: nothing is gated).
        let view = self
            .current_pack()
            .map_or(GateView::Prompt, |p| p.metadata.gate_view);
        let Rendered {
            tokens,
            gate_views,
            context_views,
            ..
        } = crate::view::render(tokenizer, prompt, view).map_err(invalid)?;
        Ok(Tokenized {
            tokens,
            gate_views,
            context_views,
        })
    }

    fn detokenize(&self, tokens: &[u32]) -> Result<String, BackendError> {
        self.engine
            .tokenizer()
            .decode_raw(tokens)
            .map_err(|e| BackendError::new(runtime_error_kind(e.kind()), e.to_string()))
    }

    fn submit(&self, job: Job) -> Result<(), BackendError> {
        let events = job.events.clone();
        let held = Held::default();
        let steered = held.clone();
        let tokenizer = self.engine.tokenizer().clone();
        // the prompt's ids, when its tokens are scored (`echo`): the scores name none
        let prompt = job.prompt_logprobs.map(|_| job.tokens.clone());
        let sink = move |event: GenerationEvent| {
            // a token's text (a part of a character shows as U+FFFD) and its bytes
            let spelled = |id: u32| {
                let bytes = tokenizer.token_bytes(id);
                (String::from_utf8_lossy(&bytes).into_owned(), bytes)
            };
            let logprob = |id: u32, logprob: f32| {
                let (token, bytes) = spelled(id);
                Logprob {
                    token,
                    bytes,
                    logprob,
                }
            };
            let entry = |id: u32, l: &inferaligner_runtime::TokenLogprobs| TokenLogprob {
                chosen: logprob(id, l.logprob),
                top: l.top.iter().map(|&(t, lp)| logprob(t, lp)).collect(),
            };
            let out = match event {
                GenerationEvent::PromptLogprobs(scores) => {
                    let ids = prompt.as_deref().unwrap_or_default();
                    let first = ids.first().map(|&id| {
                        let (token, bytes) = spelled(id);
                        TokenLogprob::unscored(token, bytes)
                    });
                    let scored = ids.iter().skip(1).zip(&scores).map(|(&id, l)| entry(id, l));
                    BackendEvent::PromptLogprobs(first.into_iter().chain(scored).collect())
                }
                GenerationEvent::Token {
                    id,
                    text,
                    logprobs: Some(l),
                } => {
                    if events.send(BackendEvent::Logprobs(entry(id, &l))).is_err() {
                        return ControlFlow::Break(());
                    }
                    match text.is_empty() {
                        true => return ControlFlow::Continue(()),
                        false => BackendEvent::Text(text),
                    }
                }
                GenerationEvent::Token { text, .. } if text.is_empty() => {
                    return if events.is_closed() {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    };
                }
                GenerationEvent::Token { text, .. } => BackendEvent::Text(text),
                GenerationEvent::Finished {
                    reason,
                    usage,
                    tail,
                } => {
                    if !tail.is_empty() {
                        let _ = events.send(BackendEvent::Text(tail));
                    }
                    BackendEvent::Finished {
                        reason,
                        prompt_tokens: usage.prompt_tokens,
                        completion_tokens: usage.completion_tokens,
                        steered: steered.ending().map(|ending| SteeredAnswer {
                            ending,
                            retries: steered.retries(),
                        }),
                    }
                }
                GenerationEvent::Failed {
                    kind,
                    message,
                    field,
                } => BackendEvent::Failed(
                    BackendError::new(runtime_error_kind(kind), message).about(field),
                ),
            };
            match events.send(out) {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            }
        };
        let params = GenerationParams {
            max_new_tokens: job.max_new_tokens,
            stop: job.stop.clone(),
            stop_exempt: job.stop_exempt.clone(),
            ignore_eos: false,
            sampling: job.sampling.clone(),
            response_format: job.response_format.clone(),
            logprobs: job.logprobs,
            prompt_logprobs: job.prompt_logprobs,
        };
        let (row, gate, sink) = self.gate(&job, &params, (Box::new(sink), &held));
        let request = GenerationRequest {
            prompt: job.tokens,
            params,
            row,
            gate,
            sink,
        };
        self.engine.submit(request).map_err(|e| match e {
            SubmitError::Overloaded(_) => {
                BackendError::new(BackendErrorKind::Overloaded, "the engine queue is full")
            }
            SubmitError::Stopped => {
                BackendError::new(BackendErrorKind::Unavailable, "the engine has stopped")
            }
        })
    }
}

/// One short generation through the whole path (gate included) before `/ready` turns true.
pub async fn warm_up(
    backend: &dyn Backend,
    policy: Arc<inferaligner_core::Policy>,
) -> anyhow::Result<()> {
    let Tokenized {
        tokens, gate_views, ..
    } = backend
        .tokenize(&Prompt::Chat(vec![inferaligner_proxy::Message {
            role: "user".into(),
            content: "Hello!".into(),
        }]))
        .context("warm-up: tokenizing")?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    backend
        .submit(Job {
            tokens,
            gate_views,
            max_new_tokens: 2,
            max_written_tokens: 2,
            stop: Vec::new(),
            stop_exempt: None,
            sampling: SamplingParams::default(), // greedy
            response_format: ResponseFormat::Text,
            logprobs: None,
            prompt_logprobs: None,
            decided: None,
            policy,
            mode: ServeMode::Local,
            events: tx,
        })
        .context("warm-up: submitting")?;
    while let Some(event) = rx.recv().await {
        match event {
            BackendEvent::Finished { .. } => return Ok(()),
            BackendEvent::Failed(e) => bail!("warm-up generation failed: {e}"),
            BackendEvent::Gate(_)
            | BackendEvent::Text(_)
            | BackendEvent::Logprobs(_)
            | BackendEvent::PromptLogprobs(_) => {}
        }
    }
    bail!("warm-up generation ended without a result")
}

/// A running sidecar (tests and embedding): its addresses and a way to stop it.
#[derive(Debug)]
pub struct ServerHandle {
    /// API address.
    pub api: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    /// Readiness latch.
    pub ready: Ready,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    runtime: Arc<OnceLock<Arc<RuntimeBackend>>>,
    pack: Option<PathBuf>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl ServerHandle {
    /// Begin the drain (like SIGTERM).
    pub fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Load `model.pack` again (after the file was replaced), as SIGHUP does: a bad pack is
    /// refused and the running one stays.
    pub fn reload_pack(&self) -> anyhow::Result<()> {
        reload(self.runtime.get(), self.pack.as_deref(), &self.metrics)
    }

    /// Wait until the sidecar has stopped.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("the server task panicked")?
    }
}

/// Bind the listeners of `config`, then load the model in the background and serve; `/ready`
/// turns true after the warm-up. `backend` replaces the runtime (tests with a fake model).
pub async fn spawn(
    config: Config,
    backend: Option<Arc<dyn Backend>>,
) -> anyhow::Result<ServerHandle> {
    config.validate()?;
    let api = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("binding server.listen {}", config.server.listen))?;
    let admin = TcpListener::bind(config.server.admin_listen)
        .await
        .with_context(|| format!("binding server.admin_listen {}", config.server.admin_listen))?;
    let (api_addr, admin_addr) = (api.local_addr()?, admin.local_addr()?);
    let ready = Ready::default();
    let metrics = Arc::new(Metrics::default());
    let (stop, stopped) = oneshot::channel::<()>();
    let runtime = Arc::new(OnceLock::new());
    let pack = config.model.pack().map(Path::to_path_buf);
    let shared = Shared {
        runtime: runtime.clone(),
        ready: ready.clone(),
        metrics: metrics.clone(),
    };
    let task = tokio::spawn(run(config, backend, (api, admin), shared, async move {
        let _ = stopped.await;
    }));
    Ok(ServerHandle {
        api: api_addr,
        admin: admin_addr,
        ready,
        metrics,
        runtime,
        pack,
        stop: Some(stop),
        task,
    })
}

fn reload(
    runtime: Option<&Arc<RuntimeBackend>>,
    pack: Option<&Path>,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let (Some(runtime), Some(pack)) = (runtime, pack) else {
        bail!("no steering pack is configured or the model has not loaded yet");
    };
    let result = runtime.reload_pack(pack);
    match &result {
        Ok(()) => tracing::info!(pack = %pack.display(), "steering pack reloaded"),
        Err(e) => tracing::error!(
            error = format!("{e:#}"),
            "steering pack refused; the running one stays"
        ),
    }
    metrics.pack_reload(result.is_ok());
    result
}

/// What the server task shares with the [`ServerHandle`] that started it.
struct Shared {
    /// The loaded model, once loaded (for SIGHUP reloads through the handle).
    runtime: Arc<OnceLock<Arc<RuntimeBackend>>>,
    ready: Ready,
    metrics: Arc<Metrics>,
}

/// Load the model (unless `backend` replaces it), warm up, then serve the API listener and
/// the admin listener until `shutdown`.
async fn run(
    config: Config,
    backend: Option<Arc<dyn Backend>>,
    (api, admin): (TcpListener, TcpListener),
    Shared {
        runtime,
        ready,
        metrics,
    }: Shared,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (admin_stop, admin_stopped) = oneshot::channel::<()>();
    let admin_task = tokio::spawn(serve_admin(
        admin,
        ready.clone(),
        metrics.clone(),
        async move {
            let _ = admin_stopped.await;
        },
    ));
    let result = async {
        let backend: Arc<dyn Backend> = match backend {
            Some(b) => b,
            None => {
                let (model, cfg) = (config.model.clone(), config.clone());
                let started = std::time::Instant::now();
                let b = tokio::task::spawn_blocking(move || RuntimeBackend::load(&model, &cfg))
                    .await
                    .context("the model loader panicked")??;
                tracing::info!(model = %b.info().id, seconds = started.elapsed().as_secs_f64(), "model loaded");
                metrics.set_engine_probe(b.engine_probe());
                metrics.cpu_fallback.set(i64::from(b.cpu_fallback()));
                let b = Arc::new(b);
                let _ = runtime.set(b.clone());
                watch_reload_signal(b.clone(), config.model.pack().map(Path::to_path_buf), metrics.clone());
                b
            }
        };
        let proxy = config.proxy();
        let default_policy = Arc::new(proxy.policies[&proxy.default_policy].policy());
        let sidecar = Arc::new(Sidecar::new(proxy, backend.clone(), metrics)?);
        warm_up(backend.as_ref(), default_policy).await?;
        ready.set(true);
        tracing::info!(
            listen = %api.local_addr()?,
            admin = %config.server.admin_listen,
            mode = config.server.mode.as_str(),
            model = sidecar.model_id(),
            "ready"
        );
        let ready = ready.clone();
        sidecar
            .serve(api, async move {
                shutdown.await;
                ready.set(false);
                tracing::info!("shutdown requested");
            })
            .await?;
        anyhow::Ok(())
    }
    .await;
    let _ = admin_stop.send(());
    let _ = admin_task.await;
    result
}

/// Reload the pack on SIGHUP (Unix).
fn watch_reload_signal(runtime: Arc<RuntimeBackend>, pack: Option<PathBuf>, metrics: Arc<Metrics>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            let _ = reload(Some(&runtime), pack.as_deref(), &metrics);
        }
    });
    #[cfg(not(unix))]
    let _ = (runtime, pack, metrics);
}

/// Resolve on SIGTERM or Ctrl-C.
pub async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Run the sidecar in this process until SIGTERM, then drain.
pub fn serve(config: Config) -> anyhow::Result<()> {
    let _telemetry = crate::telemetry::init(&config.telemetry)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("inferaligner-http")
        .build()?;
    runtime.block_on(async {
        let mut handle = spawn(config, None).await?;
        tokio::select! {
            () = termination_signal() => {}
            result = &mut handle.task => {
                return result.context("the server task panicked")?;
            }
        }
        handle.shutdown();
        handle.wait().await
    })
}
