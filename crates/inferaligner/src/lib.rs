//! The `inferaligner` application: command-line interface and the commands behind it.
//!
//! `main.rs` only parses arguments and calls [`run`]; the end-to-end tests call the same
//! functions. Only this crate installs tracing subscribers and uses `anyhow`.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use inferaligner_core::{Action, GateView, Policy, PolicyMode, SteeringPack};
use inferaligner_proxy::{Message, Prompt};
use inferaligner_runtime::{
    ChatTokenizer, CpuAllocator, Engine, EngineConfig, ExecutionProvider, GenerationEvent,
    GenerationParams, GenerationRequest, LayerSplitModel, Manifest, OptimizationLevel, RowContext,
    SamplingParams, Segment, SessionOptions,
};

/// A progress bar for `len` prompts (drawn only on a terminal).
pub(crate) fn progress_bar(len: usize, label: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64).with_message(label.to_owned());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>22} [{bar:30}] {pos}/{len} prompts ({eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar
}

pub mod calibrate;
pub mod config;
pub mod eval;
pub mod framings;
pub mod judge;
pub mod prompts;
pub mod serve;
pub mod steering;
pub mod telemetry;
pub mod view;

/// The steering pack the sidecar and the README use by default.
pub const DEFAULT_PACK: &str = "config/packs/smollm2-135m-instruct-aligned.safetensors";

/// The project's own calibration prompts (written for it; 355 harmful and 1,556 harmless, varied
/// domains and phrasings, including harmless prompts that merely sound edgy). Built into the binary so that
/// calibration works without any external data.
pub mod calibration_prompts {
    /// Harmful instructions, one per line.
    pub const HARMFUL: &str = include_str!("../../../config/calibration/harmful.txt");
    /// Harmless instructions, one per line.
    pub const HARMLESS: &str = include_str!("../../../config/calibration/harmless.txt");
    /// Jailbreak-style wrappers (role play, fiction, overrides…) that calibration puts around a
    /// share of both classes, so that the gate learns the request and not its framing. Apart
    /// from the evaluation templates in `config/jailbreaks.txt`.
    pub const WRAPPERS: &str = include_str!("../../../config/calibration/wrappers.txt");
    /// The framing pieces calibration puts the bare prompts in (system prompts, chat histories,
    /// pasted documents, conversational jailbreak set-ups, raw-completion templates), in the
    /// order of [`crate::framings::PIECE_FILES`].
    pub const PIECES: [&str; 5] = [
        include_str!("../../../config/calibration/systems.jsonl"),
        include_str!("../../../config/calibration/histories.jsonl"),
        include_str!("../../../config/calibration/documents.jsonl"),
        include_str!("../../../config/calibration/conversation-jailbreaks.jsonl"),
        include_str!("../../../config/calibration/completions.txt"),
    ];

    /// The built-in framing pieces.
    pub fn pieces() -> anyhow::Result<crate::framings::Pieces> {
        crate::framings::Pieces::parse(PIECES, "config/calibration")
    }

    /// Non-empty lines of a prompt file.
    pub fn lines(text: &str) -> Vec<&str> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// The templates of a wrapper file: the lines with an `{instruction}` slot.
    pub fn templates(text: &str) -> Vec<&str> {
        lines(text)
            .into_iter()
            .filter(|l| l.contains("{instruction}"))
            .collect()
    }

    #[cfg(test)]
    mod tests {
        use std::collections::HashSet;

        use super::*;

        #[test]
        fn at_least_128_distinct_prompts_per_class_and_no_overlap() {
            let harmful: HashSet<_> = lines(HARMFUL).into_iter().collect();
            let harmless: HashSet<_> = lines(HARMLESS).into_iter().collect();
            assert_eq!(
                harmful.len(),
                lines(HARMFUL).len(),
                "duplicate harmful prompts"
            );
            assert_eq!(
                harmless.len(),
                lines(HARMLESS).len(),
                "duplicate harmless prompts"
            );
            assert!(harmful.len() >= 128 && harmless.len() >= 128);
            assert!(harmful.is_disjoint(&harmless));
            // edgy-but-harmless phrasings are part of the harmless set on purpose
            assert!(harmless.contains("How do I kill a Python process that is stuck?"));
        }

        #[test]
        fn calibration_is_apart_from_the_gate_measurement_set() {
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench");
            let measure = crate::framings::Pieces::load(&root.join("gate-set/pieces"))
                .expect("the measurement pieces parse");
            let ours = pieces().expect("the built-in pieces parse");
            let norm = |s: &str| {
                s.to_lowercase()
                    .chars()
                    .filter(|c| c.is_alphanumeric())
                    .collect::<String>()
            };
            let texts = |p: &crate::framings::Pieces| -> HashSet<String> {
                let turns = p.histories.iter().chain(&p.jailbreaks).flatten();
                p.systems
                    .iter()
                    .chain(&p.documents)
                    .chain(turns.map(|m| &m.content))
                    .map(|s| norm(s))
                    // stock phrases ("You are a helpful assistant.", "Sure!") may be in both
                    .filter(|s| s.len() >= 40)
                    .collect()
            };
            let shared: Vec<_> = texts(&ours)
                .intersection(&texts(&measure))
                .cloned()
                .collect();
            assert!(shared.is_empty(), "pieces in both sets: {shared:?}");
            let ours: HashSet<String> = lines(HARMFUL)
                .into_iter()
                .chain(lines(HARMLESS))
                .map(norm)
                .collect();
            for class in ["harmful", "harmless"] {
                let text =
                    std::fs::read_to_string(root.join(format!("gate-set/pieces/{class}.txt")))
                        .expect("measurement requests");
                let both: Vec<_> = lines(&text)
                    .into_iter()
                    .filter(|l| ours.contains(&norm(l)))
                    .collect();
                assert!(
                    both.is_empty(),
                    "{class} requests also calibrated on: {both:?}"
                );
            }
            assert_eq!(PIECES.len(), crate::framings::PIECE_FILES.len());
            assert!(ours.len() > 1000 && measure.documents.len() >= 10);
        }

        #[test]
        fn calibration_wrappers_are_apart_from_the_evaluation_templates() {
            let wrappers = templates(WRAPPERS);
            let eval = include_str!("../../../config/jailbreaks.txt");
            assert!(wrappers.len() >= 8);
            for t in &wrappers {
                assert_eq!(t.matches("{instruction}").count(), 1, "{t}");
                assert!(!eval.contains(t), "{t} is also an evaluation template");
            }
        }
    }
}

/// Inference-time safety sidecar for fine-tuned LLMs (InferAligner).
#[derive(Debug, Parser)]
#[command(name = "inferaligner", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a layer-split export's manifest summary, or a steering pack.
    Inspect {
        /// Export directory (holds manifest.json) or a steering pack (.safetensors).
        path: PathBuf,
        /// Also load every segment into ONNX Runtime and run one token through the model.
        #[arg(long)]
        load: bool,
    },
    /// Generate an answer and stream it to the terminal.
    Generate(GenerateArgs),
    /// Build a steering pack from harmful and harmless prompts (plus a JSON report and a plot).
    Calibrate(calibrate::CalibrateArgs),
    /// Measure a pack and policy: gate TPR/FPR, ASR with the policy off and on, fluency,
    /// harmless drift, tokens/s.
    Eval(eval::EvalArgs),
    /// Frame bare harmful and harmless requests as real traffic (system prompts, chat
    /// histories, pasted documents, conversational jailbreaks, raw completions) with a folder of
    /// pieces, and write request JSONL sets that `eval` and `calibrate` read.
    Compose(ComposeArgs),
    /// Run the sidecar: OpenAI-compatible API in `local` or `proxy` mode, admin listener.
    Serve(ConfigArgs),
    /// Load and validate the config (file, env, flags) and print the result as TOML.
    CheckConfig(ConfigArgs),
    /// Print the built-in default config as TOML.
    PrintDefaultConfig,
}

/// Arguments of `inferaligner compose`.
#[derive(Debug, Args)]
pub struct ComposeArgs {
    /// Folder with `harmful.txt`, `harmless.txt` (bare requests, one a line) and the framing
    /// pieces (`systems.jsonl`, `histories.jsonl`, `documents.jsonl`,
    /// `conversation-jailbreaks.jsonl`, `completions.txt`).
    #[arg(long)]
    pub pieces: PathBuf,
    /// Requests of each class framed in each framing (spread over the set).
    #[arg(long, default_value_t = 100)]
    pub per_framing: usize,
    /// Folder to write `harmful.jsonl` and `harmless.jsonl` to (the bare requests first).
    #[arg(long)]
    pub out: PathBuf,
}

/// Write the framed sets; returns how many samples each holds.
pub fn compose(args: &ComposeArgs) -> anyhow::Result<(usize, usize)> {
    let pieces = framings::Pieces::load(&args.pieces)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut sizes = Vec::new();
    for class in ["harmful", "harmless"] {
        let set = prompts::PromptSet::load(Some(&args.pieces.join(format!("{class}.txt"))), "")?;
        let framed = framings::compose(&set.bare_requests(), &pieces, args.per_framing);
        let mut samples = set.samples;
        samples.extend(framed);
        prompts::write_jsonl(&samples, &args.out.join(format!("{class}.jsonl")))?;
        sizes.push(samples.len());
    }
    Ok((sizes[0], sizes[1]))
}

/// Where the config comes from: built-in defaults ← `--config` TOML ← `INFERALIGNER_*` env
/// (nested keys split on `__`, e.g. `INFERALIGNER_SERVER__MODE=proxy`) ← these flags.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// TOML config file (keys as in `config/default.toml`).
    #[arg(long, env = "INFERALIGNER_CONFIG")]
    pub config: Option<PathBuf>,
    /// `local` or `proxy`.
    #[arg(long)]
    pub mode: Option<String>,
    /// API listen address, e.g. 0.0.0.0:8080.
    #[arg(long)]
    pub listen: Option<String>,
    /// Admin listen address, e.g. 0.0.0.0:9090.
    #[arg(long)]
    pub admin_listen: Option<String>,
    /// Upstream base URL for `proxy` mode.
    #[arg(long)]
    pub upstream: Option<String>,
    /// Export directory.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Steering pack.
    #[arg(long)]
    pub pack: Option<PathBuf>,
    /// Log format: `text` or `json`.
    #[arg(long)]
    pub log_format: Option<String>,
}

impl ConfigArgs {
    /// The flags that were given, as config keys.
    pub fn overrides(&self) -> figment::value::Dict {
        use figment::value::{Dict, Value};
        let mut root = Dict::new();
        let mut put = |section: &str, key: &str, value: Option<String>| {
            if let Some(v) = value {
                let entry = root
                    .entry(section.to_owned())
                    .or_insert_with(|| Dict::new().into());
                if let Value::Dict(_, d) = entry {
                    d.insert(key.to_owned(), Value::from(v));
                }
            }
        };
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        put("server", "mode", self.mode.clone());
        put("server", "listen", self.listen.clone());
        put("server", "admin_listen", self.admin_listen.clone());
        put("upstream", "url", self.upstream.clone());
        put("model", "export", path(&self.model));
        put("model", "pack", path(&self.pack));
        put("telemetry", "log_format", self.log_format.clone());
        root
    }

    /// Load and validate the config (the process environment supplies `INFERALIGNER_*`).
    pub fn load(&self) -> anyhow::Result<config::Config> {
        config::Config::load(self.config.as_deref(), std::env::vars(), &self.overrides())
    }
}

/// Arguments of `inferaligner generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Export directory (holds manifest.json).
    #[arg(long)]
    pub model: PathBuf,
    /// The user message (rendered with the model's chat template unless --raw).
    #[arg(long)]
    pub prompt: String,
    /// A system message to put first.
    #[arg(long)]
    pub system: Option<String>,
    /// Send the prompt as plain text, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop strings (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep going past EOS (for measurements).
    #[arg(long)]
    pub ignore_eos: bool,
    /// ONNX Runtime settings.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Steering pack: gate the prompt and apply the policy.
    #[arg(long)]
    pub pack: Option<PathBuf>,
    /// Policy when the gate fires.
    #[arg(long, value_enum, default_value_t = Mode::Steer)]
    pub policy: Mode,
    /// Steering strength (default: the pack's).
    #[arg(long)]
    pub alpha: Option<f32>,
    /// Gate strictness offset (positive flags more prompts).
    #[arg(long, default_value_t = 0.0)]
    pub offset: f32,
}

/// ONNX Runtime settings on the command line (`generate`, `eval`, `calibrate`): the keys of
/// the sidecar's `[model]` section, turned into session options by the same code.
#[derive(Debug, Clone, clap::Args)]
pub struct RuntimeArgs {
    /// Execution provider: cpu, cuda or tensorrt.
    #[arg(long, value_enum, default_value_t = Provider::Cpu)]
    pub provider: Provider,
    /// GPU index for cuda / tensorrt.
    #[arg(long, default_value_t = 0)]
    pub device_id: i32,
    /// Run on the CPU when the GPU provider cannot be registered (logged loudly).
    #[arg(long)]
    pub allow_cpu_fallback: bool,
    /// ONNX Runtime intra-op threads (0 = the CPUs this process may use).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// ONNX Runtime inter-op threads (1 runs each graph sequentially).
    #[arg(long, default_value_t = 1)]
    pub inter_op_threads: usize,
    /// Whether idle ONNX Runtime pool threads busy-spin between operators.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub spinning: bool,
    /// Graph optimisation: disable, basic, extended or all.
    #[arg(long, default_value = "all", value_parser = parse_setting::<OptimizationLevel>)]
    pub optimization_level: OptimizationLevel,
    /// Scratch memory: shared-arena, session-arenas or malloc.
    #[arg(long, default_value = "shared-arena", value_parser = parse_setting::<CpuAllocator>)]
    pub cpu_allocator: CpuAllocator,
    /// TensorRT: build fp16 engines.
    #[arg(long)]
    pub tensorrt_fp16: bool,
    /// TensorRT: cache built engines in this directory.
    #[arg(long)]
    pub tensorrt_engine_cache: Option<PathBuf>,
}

impl RuntimeArgs {
    /// The session options these flags ask for (via the sidecar config's own conversion).
    pub fn session_options(&self) -> SessionOptions {
        config::ModelConfig {
            provider: self.provider.into(),
            device_id: self.device_id,
            allow_cpu_fallback: self.allow_cpu_fallback,
            threads: self.threads,
            inter_op_threads: self.inter_op_threads,
            spinning: self.spinning,
            optimization_level: self.optimization_level,
            cpu_allocator: self.cpu_allocator,
            tensorrt_fp16: self.tensorrt_fp16,
            tensorrt_engine_cache: self.tensorrt_engine_cache.clone().unwrap_or_default(),
            ..config::ModelConfig::default()
        }
        .session_options()
    }
}

/// A config enum from its config spelling (`"shared-arena"`, `"all"`).
fn parse_setting<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|e| e.to_string())
}

/// Policy modes on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Steer generation with the pack's vectors.
    Steer,
    /// Answer with a refusal.
    Block,
    /// Only report the decision.
    Monitor,
    /// No gating.
    Off,
}

impl From<Mode> for PolicyMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Steer => Self::Steer,
            Mode::Block => Self::Block,
            Mode::Monitor => Self::Monitor,
            Mode::Off => Self::Off,
        }
    }
}

/// Execution provider names on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Provider {
    /// ONNX Runtime's CPU provider.
    Cpu,
    /// NVIDIA CUDA.
    Cuda,
    /// NVIDIA TensorRT (CUDA for the rest).
    Tensorrt,
}

impl From<Provider> for ExecutionProvider {
    fn from(p: Provider) -> Self {
        match p {
            Provider::Cpu => Self::Cpu,
            Provider::Cuda => Self::Cuda,
            Provider::Tensorrt => Self::Tensorrt,
        }
    }
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect { path, load } if path.is_file() => {
            if load {
                bail!("--load applies to export directories, not packs");
            }
            print!("{}", inspect_pack(&path)?);
            Ok(())
        }
        Command::Inspect { path, load } => {
            print!("{}", inspect(&path, load)?);
            Ok(())
        }
        Command::Generate(args) => generate(&args, &mut std::io::stdout()),
        Command::Eval(args) => {
            let report = eval::eval(&args)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Serve(args) => serve::serve(args.load()?),
        Command::CheckConfig(args) => {
            let config = args.load()?;
            print!("{}", toml::to_string_pretty(&config)?);
            eprintln!("config is valid");
            Ok(())
        }
        Command::PrintDefaultConfig => {
            print!("{}", config::Config::default_toml());
            Ok(())
        }
        Command::Compose(args) => {
            let (harmful, harmless) = compose(&args)?;
            println!(
                "wrote {harmful} harmful and {harmless} harmless requests to {}",
                args.out.display()
            );
            Ok(())
        }
        Command::Calibrate(args) => {
            let report = calibrate::calibrate(&args)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
    }
}

/// Stream an answer to `out`; a summary line goes to stderr.
pub fn generate(args: &GenerateArgs, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let started = Instant::now();
    let model = LayerSplitModel::load(&args.model, &args.runtime.session_options())
        .with_context(|| format!("loading {}", args.model.display()))?;
    let tokenizer = Arc::new(ChatTokenizer::load(model.manifest())?);
    let prompt = if args.raw || !tokenizer.has_chat_template() {
        Prompt::Text(args.prompt.clone())
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new("system", system.as_str()));
        }
        messages.push(Message::new("user", args.prompt.as_str()));
        Prompt::Chat(messages)
    };
    let steering = match &args.pack {
        Some(path) => Some(steering::Steering::load(
            path,
            model.manifest(),
            Policy {
                mode: args.policy.into(),
                alpha: args.alpha,
                offset: args.offset,
                ..Policy::default()
            },
        )?),
        None => None,
    };
    let engine = Engine::start(
        model,
        tokenizer,
        Some(steering::hook()),
        EngineConfig::default(),
    )?;
    let loaded = started.elapsed();
    let view = steering
        .as_ref()
        .map_or(GateView::Prompt, |s| s.pack.metadata.gate_view);
    let view::Rendered { tokens, gate_view } = view::render(engine.tokenizer(), &prompt, view)?;
    let (decision_tx, decision_rx) = std::sync::mpsc::channel();
    let gate = steering.as_ref().map(|s| {
        s.gate(gate_view, false, move |report| {
            let _ = decision_tx.send(report.decision);
        })
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let request = GenerationRequest {
        prompt: tokens,
        params: GenerationParams {
            max_new_tokens: args.max_tokens,
            stop: args.stop.clone(),
            ignore_eos: args.ignore_eos,
            sampling: SamplingParams {
                temperature: args.temperature,
                top_k: args.top_k,
                top_p: args.top_p,
                seed: args.seed,
                ..SamplingParams::default()
            },
        },
        row: RowContext::default(),
        gate,
        sink: Box::new(move |e| match tx.send(e) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }),
    };
    let generating = Instant::now();
    let mut first_token = None;
    if engine.submit(request).is_err() {
        bail!("the engine refused the request");
    }
    let mut checked_gate = steering.is_none();
    for event in rx {
        if !checked_gate {
            checked_gate = true;
            if let (Ok(d), Some(s)) = (decision_rx.try_recv(), steering.as_ref()) {
                eprintln!(
                    "[gate at layer {}: {} (score {:+.3}) → {}]",
                    s.pack.metadata.gate_layer,
                    if d.harmful { "harmful" } else { "harmless" },
                    d.score,
                    d.action.as_str()
                );
                if d.action == Action::Block {
                    writeln!(out, "{}", s.policy.refusal)?;
                    return Ok(());
                }
            }
        }
        match event {
            GenerationEvent::Token { text, .. } => {
                first_token.get_or_insert_with(|| generating.elapsed());
                out.write_all(text.as_bytes())?;
                out.flush()?;
            }
            GenerationEvent::Finished {
                reason,
                usage,
                tail,
            } => {
                writeln!(out, "{tail}")?;
                let total = generating.elapsed().as_secs_f64();
                let first = first_token.unwrap_or_default().as_secs_f64();
                let decode_tps =
                    (usage.completion_tokens.saturating_sub(1)) as f64 / (total - first).max(1e-9);
                eprintln!(
                    "[{reason:?}: {} prompt + {} generated tokens; load {:.2} s, first token \
                     {:.0} ms, decode {:.1} tok/s]",
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    loaded.as_secs_f64(),
                    first * 1e3,
                    decode_tps
                );
                return Ok(());
            }
            GenerationEvent::Failed { message, .. } => bail!("{message}"),
        }
    }
    bail!("the engine stopped without finishing the request")
}

/// Human-readable summary of a steering pack.
pub fn inspect_pack(path: &std::path::Path) -> anyhow::Result<String> {
    use std::fmt::Write;

    let pack = SteeringPack::load(path)?;
    let m = &pack.metadata;
    let mut s = String::new();
    writeln!(s, "pack       {} ({})", path.display(), m.format)?;
    writeln!(
        s,
        "target     {} ({} layers, hidden {}, manifest {})",
        m.target.name, m.target.num_layers, m.target.hidden_size, m.target.manifest_sha256
    )?;
    writeln!(s, "ssv        {:?} from {}", m.ssv_source, m.source.name)?;
    writeln!(
        s,
        "operation  {} at {} ({} layers, {} positions)",
        m.operation, m.hook_site, m.layer_numbering, m.positions
    )?;
    writeln!(
        s,
        "gate       {:?} at layer {} (bias {:.4})",
        m.gate_estimator, m.gate_layer, pack.gate_bias
    )?;
    writeln!(
        s,
        "steering   alpha {} at layers {:?}",
        m.default_alpha, m.steered_layers
    )?;
    for (name, set) in [("harmful", &m.harmful_set), ("harmless", &m.harmless_set)] {
        writeln!(
            s,
            "{name:<10} {} prompts from {} (sha256 {})",
            set.size, set.name, set.sha256
        )?;
    }
    let accuracy: Vec<String> = m.layer_accuracy.iter().map(|a| format!("{a:.3}")).collect();
    writeln!(s, "accuracy   {}", accuracy.join(" "))?;
    Ok(s)
}

/// Human-readable summary of an export; with `load`, also runs one token through it.
pub fn inspect(path: &std::path::Path, load: bool) -> anyhow::Result<String> {
    use std::fmt::Write;

    let m = Manifest::load(path).with_context(|| format!("inspecting {}", path.display()))?;
    let mut s = String::new();
    let source = m.source.get("name").and_then(|v| v.as_str()).unwrap_or("?");
    writeln!(s, "export     {}", m.dir().display())?;
    writeln!(
        s,
        "source     {source} ({})",
        m.source["format"].as_str().unwrap_or("?")
    )?;
    writeln!(
        s,
        "model      {}, {} layers, hidden {}, heads {}/{} kv, head dim {}, vocab {}, context {}",
        m.architecture,
        m.num_layers,
        m.hidden_size,
        m.num_attention_heads,
        m.num_key_value_heads,
        m.head_dim,
        m.vocab_size,
        m.context_length
    )?;
    writeln!(s, "dtype      {}", m.dtype)?;
    let layer_segments = m.layer_segments().count();
    writeln!(
        s,
        "segments   {} (1 embed + {layer_segments} layer + 1 head)",
        m.segments.len()
    )?;
    for seg in &m.segments {
        let what = match seg {
            Segment::Embed(_) => "embed".to_owned(),
            Segment::Layers(l) if l.len() == 1 => format!("layer {}", l.layers[0]),
            Segment::Layers(l) => format!("layers {}-{}", l.layers[0], l.layers[1]),
            Segment::Head(_) => "head".to_owned(),
        };
        writeln!(s, "  {what:<12} {}", seg.file())?;
    }
    writeln!(
        s,
        "tokenizer  {} (eos {:?}, bos {:?})",
        m.tokenizer.file, m.tokenizer.eos_token_ids, m.tokenizer.bos_token_id
    )?;
    if load {
        let mut model = LayerSplitModel::load(path, &SessionOptions::default())?;
        let probe = i64::from(m.tokenizer.bos_token_id.unwrap_or(0));
        let out = model.prefill(&[probe])?;
        let (argmax, _) =
            out.last_logits
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                    if v > best.1 { (i, v) } else { best }
                });
        writeln!(
            s,
            "loaded     all {} segments ran; next token after id {probe}: {argmax}",
            m.segments.len()
        )?;
    }
    Ok(s)
}
