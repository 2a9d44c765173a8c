//! `inferaligner inspect`: what an export or a steering pack holds.

use std::path::Path;

use anyhow::Context;
use inferaligner_core::SteeringPack;
use inferaligner_runtime::{LayerSplitModel, Manifest, Segment, SessionOptions};

/// Human-readable summary of a steering pack.
pub fn inspect_pack(path: &Path) -> anyhow::Result<String> {
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
    match &m.target.model_sha256 {
        Some(id) => writeln!(
            s,
            "           model {id}: any export of it (graphs, segments)"
        )?,
        None => writeln!(
            s,
            "           made before model identities: this manifest only"
        )?,
    }
    writeln!(s, "ssv        {:?} from {}", m.ssv_source, m.source.name)?;
    writeln!(
        s,
        "operation  {} at {} ({} layers, {} positions)",
        m.operation, m.hook_site, m.layer_numbering, m.positions
    )?;
    writeln!(
        s,
        "gate       {:?} at layer {} (bias {:.4}), readout {} of view {}",
        m.gate_estimator,
        m.gate_layer,
        pack.gate_bias,
        setting(&m.gate_readout),
        setting(&m.gate_view)
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
pub fn inspect(path: &Path, load: bool) -> anyhow::Result<String> {
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
    writeln!(s, "dtype      {} (weights {})", m.dtype, m.weight_storage())?;
    if let Some(id) = m.model_sha256()? {
        writeln!(s, "identity   model {id} (what packs are checked against)")?;
    }
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
        let addends = match seg {
            Segment::Layers(l) if !l.inputs.addends.is_empty() => {
                let layers: Vec<_> = l.inputs.addends.keys().map(usize::to_string).collect();
                format!("  (steerable inside after {})", layers.join(", "))
            }
            _ => String::new(),
        };
        writeln!(s, "  {what:<12} {}{addends}", seg.file())?;
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

/// A setting as the command line and the pack's JSON spell it (`last-and-mean`).
fn setting(value: &impl serde::Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}
