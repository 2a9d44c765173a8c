//! Measures prefill and decode throughput of the runtime on one export, at one batch size, and
//! prints one JSON object. `bench/run.sh` runs it for each configuration in its own process (so
//! peak RSS is per configuration) beside the peers, and prints the ratios.

mod documents;

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use inferaligner_runtime::{
    ChatMessage, ChatTokenizer, LayerHook, LayerSplitModel, RowContext, Sampler, SamplingParams,
    SessionOptions,
};
use ndarray::{Array2, ArrayViewMut3};

/// Throughput of the layer-split runtime.
#[derive(Debug, Parser)]
struct Args {
    /// Export directory.
    #[arg(long)]
    model: PathBuf,
    /// Rows decoded together (every row gets the same prompt).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Tokens to generate per row (end of turn ignored).
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Sampling temperature, as a request's; 0 is greedy. Tokens are chosen by the engine's
    /// sampler, seeded by row.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Top-p, as a request's.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Top-k, as a request's; 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Timed runs after one warm-up; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    runs: u16,
    /// ONNX Runtime intra-op threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Whether idle ONNX Runtime pool threads busy-spin between operators.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    spinning: bool,
    /// Install a hook on every layer segment that reads the residual and does nothing.
    #[arg(long)]
    noop_hook: bool,
    /// Make the prompt about this many tokens long: the question after a pasted document
    /// (this repository's docs), as a retrieval-style request would be.
    #[arg(long)]
    prompt_tokens: Option<usize>,
    /// Write the prompt's token ids here (JSON), for the peers to run the same prompt.
    #[arg(long)]
    dump_prompt: Option<PathBuf>,
    /// Prompt tokens per prefill chunk (the engine's `prefill_chunk_tokens`).
    #[arg(long, default_value_t = inferaligner_runtime::DEFAULT_PREFILL_CHUNK)]
    chunk: usize,
    /// Where ONNX Runtime sessions get CPU memory: shared-arena, session-arenas, malloc.
    #[arg(long, default_value = "shared-arena")]
    cpu_allocator: String,
    /// ONNX Runtime's memory-pattern planning.
    #[arg(long, default_value_t = SessionOptions::default().memory_pattern, action = clap::ArgAction::Set)]
    memory_pattern: bool,
    /// The user message of the chat prompt.
    #[arg(
        long,
        default_value = "Can you explain in a few sentences why the sky is blue during the day?"
    )]
    prompt: String,
    /// Execution provider: cpu, cuda or tensorrt.
    #[arg(long, default_value = "cpu")]
    provider: String,
    /// Write the prefill's last-position logits of the first row here (JSON), to compare
    /// providers.
    #[arg(long)]
    dump_logits: Option<PathBuf>,
}

/// Reads one value of the residual stream so the call cannot be optimised away.
struct NoopHook(f32);

impl LayerHook for NoopHook {
    fn after_layers(
        &mut self,
        _layers: RangeInclusive<usize>,
        residual: ArrayViewMut3<'_, f32>,
        _rows: &[RowContext],
    ) {
        self.0 += residual.first().copied().unwrap_or_default();
    }

    fn first_modified_layer(&self, _row: &RowContext) -> Option<usize> {
        None
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// A field of /proc/self/status in MiB (`VmRSS:` now, `VmHWM:` the peak).
fn rss_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let options = SessionOptions {
        intra_op_threads: args.threads,
        spinning: args.spinning,
        cpu_allocator: serde_json::from_value(serde_json::json!(args.cpu_allocator))
            .context("--cpu-allocator")?,
        memory_pattern: args.memory_pattern,
        provider: serde_json::from_value(serde_json::json!(args.provider)).context("--provider")?,
        ..SessionOptions::default()
    };
    let mut model = LayerSplitModel::load(&args.model, &options).context("loading the export")?;
    let tokenizer = ChatTokenizer::load(model.manifest())?;
    let message = match args.prompt_tokens {
        Some(n) => documents::document_message(&tokenizer, &args.prompt, n, 0)?,
        None => args.prompt.clone(),
    };
    let prompt = tokenizer.encode_chat(&[ChatMessage::new("user", message.as_str())], true)?;
    if let Some(path) = &args.dump_prompt {
        std::fs::write(path, serde_json::to_string(&prompt)?)?;
    }
    let rss_loaded = rss_mib("VmRSS:");
    let mut hook = NoopHook(0.0);
    let rows = vec![RowContext::default(); args.batch];
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        ..SamplingParams::default()
    };
    sampling.validate().map_err(anyhow::Error::msg)?;

    let mut prefill_tps = Vec::new();
    let mut decode_tps = Vec::new();
    let mut generated = Vec::new();
    for run in 0..=args.runs {
        // Each row prefilled on its own and joined into the batch, as the engine does.
        let mut cache = model.new_cache_rows(0);
        let mut samplers: Vec<Sampler> = (0..args.batch as u64)
            .map(|row| {
                let seeded = SamplingParams {
                    seed: Some(row),
                    ..sampling.clone()
                };
                Sampler::new(seeded, &prompt)
            })
            .collect();
        let mut next = Vec::new();
        let t0 = Instant::now();
        for _ in 0..args.batch {
            let hook_ref: Option<&mut dyn LayerHook> = if args.noop_hook {
                Some(&mut hook)
            } else {
                None
            };
            let p = model
                .prefill_prompt(
                    &prompt,
                    args.chunk,
                    hook_ref,
                    RowContext::default(),
                    None,
                    None,
                )?
                .context("no gate, so the prefill always finishes")?;
            if let (Some(path), true) = (&args.dump_logits, next.is_empty()) {
                std::fs::write(path, serde_json::to_string(&p.logits.row(0).to_vec())?)?;
            }
            cache.append_rows(&p.cache);
            let mut first = p.logits.row(0).to_vec();
            next.push(samplers[next.len()].sample(&mut first));
        }
        let prefill = t0.elapsed().as_secs_f64();
        let mut out = vec![next[0]];
        let t1 = Instant::now();
        for _ in 1..args.tokens {
            let ids = Array2::from_shape_fn((args.batch, 1), |(r, _)| i64::from(next[r]));
            let hook_ref: Option<&mut dyn LayerHook> = if args.noop_hook {
                Some(&mut hook)
            } else {
                None
            };
            let mut logits = model.step(&ids, &mut cache, hook_ref, &rows)?;
            next = (logits.rows_mut().into_iter().zip(&mut samplers))
                .map(|(mut r, s)| s.sample(r.as_slice_mut().unwrap_or(&mut [])))
                .collect();
            model.recycle(logits);
            out.push(next[0]);
        }
        let decode = t1.elapsed().as_secs_f64();
        if run > 0 {
            prefill_tps.push((args.batch * prompt.len()) as f64 / prefill);
            decode_tps.push((args.batch * (args.tokens - 1)) as f64 / decode);
        }
        generated = out;
    }
    let report = serde_json::json!({
        "engine": "inferaligner (Rust, layer-split ONNX)",
        "model": args.model.display().to_string(),
        "weights": model.manifest().weights.clone(),
        "batch": args.batch,
        "prompt_tokens": prompt.len(),
        "new_tokens": args.tokens,
        "provider": args.provider,
        "threads": args.threads,
        "noop_hook": args.noop_hook,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "spinning": args.spinning,
        "prefill_tok_s": median(prefill_tps),
        "decode_tok_s": median(decode_tps),
        "chunk": args.chunk,
        "cpu_allocator": args.cpu_allocator,
        "memory_pattern": args.memory_pattern,
        "rss_loaded_mib": rss_loaded,
        "rss_end_mib": rss_mib("VmRSS:"),
        "peak_rss_mib": rss_mib("VmHWM:"),
        "text": tokenizer.decode(&generated)?,
        "hook_checksum": hook.0,
    });
    println!("{report}");
    Ok(())
}
