//! One ONNX Runtime session per segment, run in order.

use std::path::Path;

use ndarray::{Array2, Array4, ArrayD, Axis, Ix3};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;

use crate::manifest::{Manifest, Segment};
use crate::{Result, RuntimeError, onnx_runtime};

/// How sessions are created.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// Threads inside one operator; 0 lets ONNX Runtime choose (one per core).
    pub intra_op_threads: usize,
    /// Whether idle intra-op threads busy-spin. Off by default: spinning threads on a small
    /// container starve each other.
    pub intra_op_spinning: bool,
}

/// Result of a full prefill: the last token's logits and residual stream at each boundary.
#[derive(Debug, Clone)]
pub struct PrefillOutput {
    /// Logits of the last position, `[vocab]`.
    pub last_logits: Vec<f32>,
    /// Last-position residual after each segment boundary: the embeddings first, then the
    /// output of each layer segment.
    pub last_residuals: Vec<Vec<f32>>,
    /// For each entry of `last_residuals`, how many decoder layers were applied (0 = embeddings).
    pub depths: Vec<usize>,
}

/// A loaded export: its manifest and one session per segment.
pub struct LayerSplitModel {
    manifest: Manifest,
    sessions: Vec<Session>,
}

impl std::fmt::Debug for LayerSplitModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerSplitModel")
            .field("manifest", &self.manifest.path)
            .field("segments", &self.sessions.len())
            .finish()
    }
}

impl LayerSplitModel {
    /// Load and validate `dir/manifest.json`, then create a CPU session for every segment.
    pub fn load(dir: impl AsRef<Path>, options: &SessionOptions) -> Result<Self> {
        let manifest = Manifest::load(dir)?;
        if manifest.dtype != "float32" {
            return Err(RuntimeError::Input(format!(
                "this runtime runs float32 exports; {} is {}",
                manifest.path.display(),
                manifest.dtype
            )));
        }
        let env = onnx_runtime()?;
        let sessions = manifest
            .segments
            .iter()
            .map(|seg| {
                let path = manifest.dir().join(seg.file());
                let mut builder = Session::builder(env)?
                    .with_optimization_level(GraphOptimizationLevel::Level3)?
                    .with_intra_op_spinning(options.intra_op_spinning)?;
                if options.intra_op_threads > 0 {
                    builder = builder.with_intra_threads(options.intra_op_threads)?;
                }
                Ok(builder.commit_from_file(&path)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { manifest, sessions })
    }

    /// The validated manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Run every segment over `input_ids` (batch 1, no KV cache) and return the last token's
    /// logits and residuals. This is the uncached path used for checks; generation with a KV
    /// cache lives in the generation loop.
    pub fn prefill(&mut self, input_ids: &[i64]) -> Result<PrefillOutput> {
        let m = &self.manifest;
        let seq = input_ids.len();
        if seq == 0 {
            return Err(RuntimeError::Input("empty prompt".into()));
        }
        if seq > m.context_length {
            return Err(RuntimeError::Input(format!(
                "prompt of {seq} tokens exceeds the context length {}",
                m.context_length
            )));
        }
        if let Some(&bad) = input_ids
            .iter()
            .find(|&&t| t < 0 || t as usize >= m.vocab_size)
        {
            return Err(RuntimeError::Input(format!(
                "token id {bad} is outside the vocabulary (0..{})",
                m.vocab_size
            )));
        }
        let ids = Array2::from_shape_vec((1, seq), input_ids.to_vec())
            .map_err(|e| RuntimeError::Input(e.to_string()))?;
        let mask = Array2::<i64>::ones((1, seq));
        let positions = Array2::from_shape_fn((1, seq), |(_, s)| s as i64);
        let empty_kv = Array4::<f32>::zeros((1, m.num_key_value_heads, 0, m.head_dim));

        let mut hidden: Option<ArrayD<f32>> = None;
        let mut out = PrefillOutput {
            last_logits: Vec::new(),
            last_residuals: Vec::new(),
            depths: Vec::new(),
        };
        for (seg, session) in m.segments.iter().zip(self.sessions.iter_mut()) {
            match seg {
                Segment::Embed(e) => {
                    let outputs = session.run(ort::inputs![
                        e.inputs.input_ids.as_str() => TensorRef::from_array_view(&ids)?
                    ])?;
                    let h = outputs[e.outputs.hidden_states.as_str()]
                        .try_extract_array::<f32>()?
                        .to_owned();
                    out.last_residuals.push(last_row(&h)?);
                    out.depths.push(0);
                    hidden = Some(h);
                }
                Segment::Layers(l) => {
                    let h = hidden.take().ok_or_else(|| missing_hidden(&l.file))?;
                    let mut inputs = ort::inputs![
                        l.inputs.hidden_states.as_str() => TensorRef::from_array_view(&h)?,
                        l.inputs.position_ids.as_str() => TensorRef::from_array_view(&positions)?,
                        l.inputs.attention_mask.as_str() => TensorRef::from_array_view(&mask)?,
                    ];
                    for name in l.inputs.past_key.iter().chain(&l.inputs.past_value) {
                        inputs.push((
                            name.as_str().into(),
                            TensorRef::from_array_view(&empty_kv)?.into(),
                        ));
                    }
                    let outputs = session.run(inputs)?;
                    let h = outputs[l.outputs.hidden_states.as_str()]
                        .try_extract_array::<f32>()?
                        .to_owned();
                    out.last_residuals.push(last_row(&h)?);
                    out.depths.push(l.layers[1] + 1);
                    hidden = Some(h);
                }
                Segment::Head(hd) => {
                    let h = hidden.take().ok_or_else(|| missing_hidden(&hd.file))?;
                    let outputs = session.run(ort::inputs![
                        hd.inputs.hidden_states.as_str() => TensorRef::from_array_view(&h)?
                    ])?;
                    let logits = outputs[hd.outputs.logits.as_str()].try_extract_array::<f32>()?;
                    out.last_logits = last_row(&logits.to_owned())?;
                }
            }
        }
        Ok(out)
    }
}

fn missing_hidden(file: &str) -> RuntimeError {
    RuntimeError::Input(format!(
        "{file}: no residual stream from the previous segment"
    ))
}

/// The last sequence position of a `[1, seq, width]` tensor.
fn last_row(t: &ArrayD<f32>) -> Result<Vec<f32>> {
    let t = t
        .view()
        .into_dimensionality::<Ix3>()
        .map_err(|e| RuntimeError::Input(format!("expected a [batch, seq, width] tensor: {e}")))?;
    let seq = t.len_of(Axis(1));
    Ok(t.index_axis(Axis(0), 0).row(seq - 1).to_vec())
}
