//! The `inferaligner` application: command-line interface and the commands behind it.
//!
//! `main.rs` only parses arguments and calls [`run`]; the end-to-end tests call the same
//! functions. Only this crate installs tracing subscribers and uses `anyhow`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use inferaligner_runtime::{LayerSplitModel, Manifest, Segment, SessionOptions};

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
    /// Validate a layer-split export and print its manifest summary.
    Inspect {
        /// Export directory (holds manifest.json).
        path: PathBuf,
        /// Also load every segment into ONNX Runtime and run one token through the model.
        #[arg(long)]
        load: bool,
    },
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect { path, load } => {
            print!("{}", inspect(&path, load)?);
            Ok(())
        }
    }
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
