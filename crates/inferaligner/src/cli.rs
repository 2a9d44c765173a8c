//! The command line: flags parsed by clap and turned into the library's options
//! ([`CalibrationOptions`], [`EvalOptions`], the sidecar's config). Nothing here decides what
//! a library caller could not decide the same way.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Parser, Subcommand};
use inferaligner_core::{
    GateEstimator, GateReadout, GateView, Policy, PolicyMode, ProbeOptions, SsvSource,
    SteeredAnswers,
};
use inferaligner_runtime::{CpuAllocator, ExecutionProvider, OptimizationLevel, SessionOptions};

use crate::calibrate::{CalibrationOptions, Framings};
use crate::eval::EvalOptions;

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
    Calibrate(CalibrateArgs),
    /// Measure a pack and policy: gate TPR/FPR, ASR with the policy off and on, fluency,
    /// harmless drift, tokens/s.
    Eval(EvalArgs),
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
    pub fn load(&self) -> anyhow::Result<crate::config::Config> {
        crate::config::Config::load(self.config.as_deref(), std::env::vars(), &self.overrides())
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
    /// Policy when the gate fires: steer, block, monitor or off.
    #[arg(long, default_value = "steer", value_parser = parse_setting::<PolicyMode>)]
    pub policy: PolicyMode,
    /// What becomes of a steered answer: as-generated, stop-at-refusal or
    /// refusal-or-fallback (the default is the default policy's).
    #[arg(long, default_value_t = Policy::default().steered_answers, value_parser = parse_setting::<SteeredAnswers>)]
    pub steered_answers: SteeredAnswers,
    /// Steering strength (default: the pack's).
    #[arg(long)]
    pub alpha: Option<f32>,
    /// Gate strictness offset (positive flags more prompts).
    #[arg(long, default_value_t = 0.0)]
    pub offset: f32,
}

/// Arguments of `inferaligner calibrate`.
#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// Export of the target model (the model to gate and steer).
    #[arg(long)]
    pub target: PathBuf,
    /// Export of an aligned sibling (same architecture): its SRVs become the steering vectors.
    /// Without it, the steering vectors come from the target (`--target-source`).
    #[arg(long, conflicts_with = "steering_from")]
    pub aligned: Option<PathBuf>,
    /// Steering vectors from the target itself, without a sibling: `contrastive` (refusal
    /// minus compliance prefills, at the last token) or `refusal-answers` (the residuals over
    /// a refusal of a harmful request minus over the target's own answer to it).
    #[arg(long, default_value = "contrastive", value_parser = parse_setting::<SsvSource>,
          conflicts_with_all = ["aligned", "steering_from"])]
    pub target_source: SsvSource,
    /// Keep the steering of this pack (made for the same target): its vectors, their source,
    /// strength and layers; only the gate is fitted anew (e.g. on the operator's traffic, or
    /// when the sibling that made the vectors is not at hand).
    #[arg(long, conflicts_with_all = ["layers", "alpha_fraction"])]
    pub steering_from: Option<PathBuf>,
    /// Harmful prompts: JSONL (OpenAI request bodies — `messages` or a completions `prompt` —
    /// or `instruction` lines, each with an optional `framing`), or plain text lines. Default:
    /// the prompts built into the binary.
    #[arg(long)]
    pub harmful: Option<PathBuf>,
    /// Harmless prompts (same formats). Default: built in.
    #[arg(long)]
    pub harmless: Option<PathBuf>,
    /// An operator's system prompt (a text file), put before every chat without one of its own:
    /// calibrate behind the system prompt the deployment uses.
    #[arg(long)]
    pub system: Option<PathBuf>,
    /// Folder of framing pieces (system prompts, chat histories, documents, conversational
    /// jailbreak set-ups, raw-completion templates; see `config/calibration/`): the bare
    /// prompts are also calibrated on in each framing. Default: the pieces built in.
    #[arg(long, conflicts_with = "no_framings")]
    pub pieces: Option<PathBuf>,
    /// Calibrate without framings.
    #[arg(long)]
    pub no_framings: bool,
    /// Prompts of each class framed in each framing.
    #[arg(long, default_value_t = CalibrationOptions::default().per_framing)]
    pub per_framing: usize,
    /// What the gate reads: `last-user-turn` (the last user turn alone, whatever the system
    /// prompt, history or endpoint), `last-user-turn-and-tail` (also a long turn's last words
    /// alone, the higher score wins) or `prompt` (the whole rendered prompt, as in the paper).
    #[arg(long, default_value = "last-user-turn", value_parser = parse_setting::<GateView>)]
    pub gate_view: GateView,
    /// How the gate pools what it reads: `last-and-mean` (the last token's residual and the
    /// mean residual over the request's own tokens) or `last-token` (as in the paper).
    #[arg(long, default_value = "last-and-mean", value_parser = parse_setting::<GateReadout>)]
    pub gate_readout: GateReadout,
    /// Where to write the pack (`.safetensors`); a JSON report and an SVG plot go beside it.
    #[arg(long)]
    pub out: PathBuf,
    /// Jailbreak-style wrappers (lines with an `{instruction}` slot): every harmful prompt, and
    /// as many harmless ones, are also calibrated on wrapped in one, so that role play or
    /// fiction framing neither hides a harmful request from the gate nor fires it on a harmless
    /// one. Default: the wrappers built in (config/calibration/wrappers.txt).
    #[arg(long, conflicts_with = "no_wrappers")]
    pub wrappers: Option<PathBuf>,
    /// Calibrate on the plain prompts only.
    #[arg(long)]
    pub no_wrappers: bool,
    /// Gate estimator: `probe` (a logistic-regression probe; on SmolLM2 it met the gate target
    /// where the paper's estimator did not) or `mean-diff` (the paper's).
    #[arg(long, default_value = "probe", value_parser = parse_setting::<GateEstimator>)]
    pub estimator: GateEstimator,
    /// L2 penalty of the `probe` estimator (on standardised weights): larger trusts the
    /// calibration set's particular wording less.
    #[arg(long, default_value_t = ProbeOptions::default().l2)]
    pub probe_l2: f64,
    /// Also write every sample's residuals at the gate view's last token to this folder
    /// (`harmful.f32`, `harmless.f32`: little-endian float32 `[samples, layers, hidden]`, and
    /// `shape.json`), to study a gate outside the binary.
    #[arg(long)]
    pub save_residuals: Option<PathBuf>,
    /// Folds of the per-layer cross-validation.
    #[arg(long, default_value_t = CalibrationOptions::default().folds)]
    pub folds: usize,
    /// The gate's layer (default: the one the per-layer cross-validation ranks best).
    #[arg(long)]
    pub gate_layer: Option<usize>,
    /// Steered layers, e.g. `12-20` or `12,14,16` (default: from 2/5 to 2/3 of the depth,
    /// 12–20 of 30 layers).
    #[arg(long, value_parser = parse_layers)]
    pub layers: Option<LayerList>,
    /// Steering strength as a fraction of the mean residual norm at the steered layers.
    #[arg(long, default_value_t = CalibrationOptions::default().alpha_fraction)]
    pub alpha_fraction: f32,
    /// `--target-source refusal-answers`: how many of the bare harmful prompts it reads.
    #[arg(long, default_value_t = CalibrationOptions::default().refusal_prompts)]
    pub refusal_prompts: usize,
    /// `--target-source refusal-answers`: rounds of refinement against the openings the
    /// answer guard rejects when the target is steered by the vectors so far.
    #[arg(long, default_value_t = CalibrationOptions::default().refine_rounds)]
    pub refine_rounds: usize,
    /// Prompts per forward pass.
    #[arg(long, default_value_t = CalibrationOptions::default().batch)]
    pub batch: usize,
    /// ONNX Runtime settings.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

impl CalibrateArgs {
    /// The library options these flags ask for.
    pub fn options(&self) -> CalibrationOptions {
        let given = |dir: &Option<PathBuf>| match dir {
            Some(path) => Framings::From(path.clone()),
            None => Framings::BuiltIn,
        };
        CalibrationOptions {
            target: self.target.clone(),
            aligned: self.aligned.clone(),
            target_source: self.target_source,
            steering_from: self.steering_from.clone(),
            harmful: self.harmful.clone(),
            harmless: self.harmless.clone(),
            system: self.system.clone(),
            framings: (!self.no_framings).then(|| given(&self.pieces)),
            per_framing: self.per_framing,
            gate_view: self.gate_view,
            gate_readout: self.gate_readout,
            out: self.out.clone(),
            wrappers: (!self.no_wrappers).then(|| given(&self.wrappers)),
            estimator: self.estimator,
            probe: ProbeOptions {
                l2: self.probe_l2,
                ..ProbeOptions::default()
            },
            save_residuals: self.save_residuals.clone(),
            folds: self.folds,
            gate_layer: self.gate_layer,
            layers: self.layers.clone().map(|l| l.0),
            alpha_fraction: self.alpha_fraction,
            refusal_prompts: self.refusal_prompts,
            refine_rounds: self.refine_rounds,
            batch: self.batch,
            session: self.runtime.session_options(),
        }
    }
}

/// Layer numbers given as `12-20` or `12,14,16` (one value to clap, not a list of values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerList(pub Vec<usize>);

/// Steered layers from `12-20` or `12,14,16`.
fn parse_layers(spec: &str) -> Result<LayerList, String> {
    let number = |s: &str| s.trim().parse::<usize>().map_err(|e| format!("{s:?}: {e}"));
    let mut layers = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => layers.extend(number(a)?..=number(b)?),
            None => layers.push(number(part)?),
        }
    }
    if layers.is_empty() {
        return Err("name at least one layer".into());
    }
    layers.sort_unstable();
    layers.dedup();
    Ok(LayerList(layers))
}

/// Arguments of `inferaligner eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Export of the target model.
    #[arg(long)]
    pub model: PathBuf,
    /// Steering pack made for it. Without one, only the model's own answers are judged (e.g. an
    /// aligned sibling's refusals and over-refusals): no gate, no policy-on figures.
    #[arg(long)]
    pub pack: Option<PathBuf>,
    /// Harmful prompts: JSONL (OpenAI request bodies — `messages` or a completions `prompt` —
    /// or `instruction` lines, each with an optional `framing`), or plain lines. Default: built
    /// in.
    #[arg(long)]
    pub harmful: Option<PathBuf>,
    /// Harmless prompts (same formats). Default: built in.
    #[arg(long)]
    pub harmless: Option<PathBuf>,
    /// An operator's system prompt (a text file), put before every chat without one.
    #[arg(long)]
    pub system: Option<PathBuf>,
    /// Jailbreak templates, one per line, each with an `{instruction}` slot: the bare prompts
    /// are also evaluated wrapped in each (framing `jailbreak template N`).
    #[arg(long)]
    pub jailbreaks: Option<PathBuf>,
    /// Policy under test: steer, block, monitor or off.
    #[arg(long, default_value = "steer", value_parser = parse_setting::<PolicyMode>)]
    pub policy: PolicyMode,
    /// What becomes of a steered answer: as-generated, stop-at-refusal or
    /// refusal-or-fallback (the default is the default policy's).
    #[arg(long, default_value_t = Policy::default().steered_answers, value_parser = parse_setting::<SteeredAnswers>)]
    pub steered_answers: SteeredAnswers,
    /// Steering strength (default: the pack's).
    #[arg(long)]
    pub alpha: Option<f32>,
    /// Factor on alpha at generated positions (1: every position, 0: the prompt only; the
    /// default is the default policy's).
    #[arg(long, default_value_t = Policy::default().generated_scale)]
    pub generated_scale: f32,
    /// Factors on alpha to steer a held answer again at, in turn, when the answer guard does
    /// not keep its opening (comma-separated; given with no value: no retries; the default is
    /// the default policy's).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_values_t = Policy::default().retry_scales)]
    pub retry_scales: Vec<f32>,
    /// Gate strictness offset.
    #[arg(long, default_value_t = 0.0)]
    pub offset: f32,
    /// Greedy tokens per answer at most (the sidecar's default `max_tokens`: the clean-refusal
    /// judge needs whole answers; the literature's keyword ASR used 48).
    #[arg(long, default_value_t = EvalOptions::default().max_tokens)]
    pub max_tokens: usize,
    /// Use only the first N prompts of each framing of each set.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Measure the gate only (no answers are generated).
    #[arg(long)]
    pub gate_only: bool,
    /// Write one JSON line per prompt here: class, framing, request, gate score and decision,
    /// action, answers.
    #[arg(long)]
    pub samples: Option<PathBuf>,
    /// Write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a markdown report here.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Write an SVG bar chart of the figures here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// ONNX Runtime settings.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

impl EvalArgs {
    /// The library options these flags ask for.
    pub fn options(&self) -> EvalOptions {
        EvalOptions {
            model: self.model.clone(),
            pack: self.pack.clone(),
            harmful: self.harmful.clone(),
            harmless: self.harmless.clone(),
            system: self.system.clone(),
            jailbreaks: self.jailbreaks.clone(),
            policy: Policy {
                mode: self.policy,
                steered_answers: self.steered_answers,
                alpha: self.alpha,
                generated_scale: self.generated_scale,
                retry_scales: self.retry_scales.clone(),
                offset: self.offset,
                ..Policy::default()
            },
            max_tokens: self.max_tokens,
            limit: self.limit,
            gate_only: self.gate_only,
            samples: self.samples.clone(),
            json: self.json.clone(),
            markdown: self.markdown.clone(),
            plot: self.plot.clone(),
            session: self.runtime.session_options(),
        }
    }
}

/// ONNX Runtime settings on the command line (`generate`, `eval`, `calibrate`): the keys of
/// the sidecar's `[model]` section, turned into session options by the same code.
#[derive(Debug, Clone, clap::Args)]
pub struct RuntimeArgs {
    /// Execution provider: cpu, cuda or tensorrt.
    #[arg(long, default_value = "cpu", value_parser = parse_setting::<ExecutionProvider>)]
    pub provider: ExecutionProvider,
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
        crate::config::ModelConfig {
            provider: self.provider,
            device_id: self.device_id,
            allow_cpu_fallback: self.allow_cpu_fallback,
            threads: self.threads,
            inter_op_threads: self.inter_op_threads,
            spinning: self.spinning,
            optimization_level: self.optimization_level,
            cpu_allocator: self.cpu_allocator,
            tensorrt_fp16: self.tensorrt_fp16,
            tensorrt_engine_cache: self.tensorrt_engine_cache.clone().unwrap_or_default(),
            ..crate::config::ModelConfig::default()
        }
        .session_options()
    }
}

/// A config enum from its config spelling (`"shared-arena"`, `"all"`).
pub(crate) fn parse_setting<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|e| e.to_string())
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect { path, load } if path.is_file() => {
            if load {
                bail!("--load applies to export directories, not packs");
            }
            print!("{}", crate::inspect::inspect_pack(&path)?);
            Ok(())
        }
        Command::Inspect { path, load } => {
            print!("{}", crate::inspect::inspect(&path, load)?);
            Ok(())
        }
        Command::Generate(args) => crate::generate::generate(&args, &mut std::io::stdout()),
        Command::Eval(args) => {
            let report = crate::eval::eval(&args.options())?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Serve(args) => crate::serve::serve(args.load()?),
        Command::CheckConfig(args) => {
            let config = args.load()?;
            print!("{}", toml::to_string_pretty(&config)?);
            eprintln!("config is valid");
            Ok(())
        }
        Command::PrintDefaultConfig => {
            print!("{}", crate::config::Config::default_toml());
            Ok(())
        }
        Command::Compose(args) => {
            let (harmful, harmless) =
                crate::framings::write_framed_sets(&args.pieces, args.per_framing, &args.out)?;
            println!(
                "wrote {harmful} harmful and {harmless} harmless requests to {}",
                args.out.display()
            );
            Ok(())
        }
        Command::Calibrate(args) => {
            let report = crate::calibrate::calibrate(&args.options())?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
    }
}
