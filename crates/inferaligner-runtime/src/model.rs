//! One ONNX Runtime session per segment, run in order over a batch with a KV cache.

use std::ops::RangeInclusive;
use std::path::Path;

use ndarray::{Array2, Array3, ArrayView3, ArrayViewD, Axis, Ix3, Ix4, s};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;

use crate::hook::{LayerHook, RowContext};
use crate::kv::KvCache;
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

/// A forward pass in progress over a batch: the residual stream after the segments run so far.
///
/// A pass can stop after any layer segment (early exit, e.g. to gate a request) and be resumed
/// later without recomputing what already ran, as long as the cache it was started with is
/// passed again untouched.
#[derive(Debug, Clone)]
pub struct Pass {
    hidden: Array3<f32>,
    positions: Array2<i64>,
    mask: Array2<i64>,
    /// Index into the manifest's segments of the next segment to run.
    next_segment: usize,
    new_tokens: usize,
}

impl Pass {
    /// Decoder layers applied so far.
    pub fn depth(&self, manifest: &Manifest) -> usize {
        manifest.segments[..self.next_segment]
            .iter()
            .filter_map(|s| match s {
                Segment::Layers(l) => Some(l.len()),
                _ => None,
            })
            .sum()
    }

    /// The residual stream now, `[rows, new positions, hidden]`.
    pub fn residual(&self) -> ArrayView3<'_, f32> {
        self.hidden.view()
    }

    /// The last position's residual of each row, `[rows][hidden]`.
    pub fn last_residuals(&self) -> Vec<Vec<f32>> {
        let last = self.hidden.len_of(Axis(1)) - 1;
        self.hidden
            .index_axis(Axis(1), last)
            .outer_iter()
            .map(|r| r.to_vec())
            .collect()
    }
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

    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        let m = &self.manifest;
        KvCache::new(m.num_layers, m.num_key_value_heads, m.head_dim)
    }

    /// A cache with `rows` empty rows.
    pub fn new_cache_rows(&self, rows: usize) -> KvCache {
        let m = &self.manifest;
        KvCache::with_rows(m.num_layers, m.num_key_value_heads, m.head_dim, rows, 0)
    }

    /// Check token ids against the vocabulary.
    pub fn check_tokens(&self, ids: &[u32]) -> Result<()> {
        let vocab = self.manifest.vocab_size;
        match ids.iter().find(|&&t| t as usize >= vocab) {
            Some(bad) => Err(RuntimeError::Input(format!(
                "token id {bad} is outside the vocabulary (0..{vocab})"
            ))),
            None => Ok(()),
        }
    }

    /// Start a forward pass of `input_ids` (`[rows, new]`, the same count of new tokens for
    /// every row) on top of `cache`: runs the embeddings.
    pub fn begin(&mut self, input_ids: &Array2<i64>, cache: &mut KvCache) -> Result<Pass> {
        let (rows, new) = input_ids.dim();
        if rows != cache.rows() {
            return Err(RuntimeError::Input(format!(
                "{rows} rows of input for a cache of {} rows",
                cache.rows()
            )));
        }
        let longest = cache.fill().iter().max().copied().unwrap_or(0) + new;
        if longest > self.manifest.context_length {
            return Err(RuntimeError::Input(format!(
                "{longest} tokens exceed the model's context length {}",
                self.manifest.context_length
            )));
        }
        cache.reserve(new);
        let Segment::Embed(e) = &self.manifest.segments[0] else {
            unreachable!("a validated manifest starts with the embedding segment")
        };
        let outputs = self.sessions[0].run(ort::inputs![
            e.inputs.input_ids.as_str() => TensorRef::from_array_view(input_ids)?
        ])?;
        let hidden = to_array3(outputs[e.outputs.hidden_states.as_str()].try_extract_array()?)?;
        Ok(Pass {
            hidden,
            positions: cache.positions(new),
            mask: cache.attention_mask(new),
            next_segment: 1,
            new_tokens: new,
        })
    }

    /// Run layer segments until `until_layer` (inclusive) has run, or all of them if `None`.
    /// `until_layer` must end a segment. The hook, if any, runs after each segment.
    pub fn run_layers(
        &mut self,
        pass: &mut Pass,
        cache: &mut KvCache,
        until_layer: Option<usize>,
        mut hook: Option<&mut (dyn LayerHook + '_)>,
        rows: &[RowContext],
    ) -> Result<()> {
        if let Some(layer) = until_layer
            && !self.is_boundary(layer)
        {
            return Err(RuntimeError::Input(format!(
                "layer {layer} does not end a segment of this export"
            )));
        }
        while let Some(Segment::Layers(l)) = self.manifest.segments.get(pass.next_segment) {
            if until_layer.is_some_and(|k| l.layers[0] > k) {
                break;
            }
            let session = &mut self.sessions[pass.next_segment];
            let mut inputs = ort::inputs![
                l.inputs.hidden_states.as_str() => TensorRef::from_array_view(&pass.hidden)?,
                l.inputs.position_ids.as_str() => TensorRef::from_array_view(&pass.positions)?,
                l.inputs.attention_mask.as_str() => TensorRef::from_array_view(&pass.mask)?,
            ];
            for (j, layer) in (l.layers[0]..=l.layers[1]).enumerate() {
                let (k, v) = cache.layer(layer);
                inputs.push((
                    l.inputs.past_key[j].as_str().into(),
                    TensorRef::from_array_view(k)?.into(),
                ));
                inputs.push((
                    l.inputs.past_value[j].as_str().into(),
                    TensorRef::from_array_view(v)?.into(),
                ));
            }
            let outputs = session.run(inputs)?;
            for (j, layer) in (l.layers[0]..=l.layers[1]).enumerate() {
                let k = outputs[l.outputs.present_key[j].as_str()].try_extract_array::<f32>()?;
                let v = outputs[l.outputs.present_value[j].as_str()].try_extract_array::<f32>()?;
                cache.write(layer, to_view4(k)?, to_view4(v)?);
            }
            pass.hidden =
                to_array3(outputs[l.outputs.hidden_states.as_str()].try_extract_array()?)?;
            drop(outputs);
            if let Some(hook) = hook.as_deref_mut() {
                hook.after_layers(l.layers[0]..=l.layers[1], pass.hidden.view_mut(), rows);
            }
            pass.next_segment += 1;
        }
        Ok(())
    }

    /// Finish a pass whose layers have all run: the head over each row's last position,
    /// `[rows, vocab]`. Counts the new tokens as cached.
    pub fn finish(&mut self, pass: Pass, cache: &mut KvCache) -> Result<Array2<f32>> {
        let head_index = self.manifest.segments.len() - 1;
        if pass.next_segment != head_index {
            return Err(RuntimeError::Input(
                "finish() before every layer segment ran".into(),
            ));
        }
        let Segment::Head(h) = &self.manifest.segments[head_index] else {
            unreachable!("a validated manifest ends with the head segment")
        };
        let last = pass.hidden.len_of(Axis(1)) - 1;
        let hidden = pass.hidden.slice(s![.., last..=last, ..]).to_owned();
        let outputs = self.sessions[head_index].run(ort::inputs![
            h.inputs.hidden_states.as_str() => TensorRef::from_array_view(&hidden)?
        ])?;
        let logits = to_array3(outputs[h.outputs.logits.as_str()].try_extract_array()?)?;
        cache.advance(pass.new_tokens);
        Ok(logits.index_axis_move(Axis(1), 0))
    }

    /// A whole step: embeddings, every layer (with the hook), head. Returns `[rows, vocab]`.
    pub fn step(
        &mut self,
        input_ids: &Array2<i64>,
        cache: &mut KvCache,
        hook: Option<&mut (dyn LayerHook + '_)>,
        rows: &[RowContext],
    ) -> Result<Array2<f32>> {
        let mut pass = self.begin(input_ids, cache)?;
        self.run_layers(&mut pass, cache, None, hook, rows)?;
        self.finish(pass, cache)
    }

    /// Whether some layer segment ends at `layer`.
    pub fn is_boundary(&self, layer: usize) -> bool {
        self.manifest.layer_segments().any(|l| l.layers[1] == layer)
    }

    /// Layer ranges of the segments, in order.
    pub fn segment_layers(&self) -> Vec<RangeInclusive<usize>> {
        self.manifest
            .layer_segments()
            .map(|l| l.layers[0]..=l.layers[1])
            .collect()
    }

    /// Run every segment over `input_ids` (batch 1, empty cache) and return the last token's
    /// logits and the residual at every segment boundary. Used for checks and golden tests.
    pub fn prefill(&mut self, input_ids: &[i64]) -> Result<PrefillOutput> {
        if input_ids.is_empty() {
            return Err(RuntimeError::Input("empty prompt".into()));
        }
        let ids: Vec<u32> = input_ids
            .iter()
            .map(|&t| {
                u32::try_from(t).map_err(|_| {
                    RuntimeError::Input(format!("token id {t} is outside the vocabulary"))
                })
            })
            .collect::<Result<_>>()?;
        self.check_tokens(&ids)?;
        let input = Array2::from_shape_vec((1, input_ids.len()), input_ids.to_vec())
            .map_err(|e| RuntimeError::Input(e.to_string()))?;
        let mut cache = self.new_cache_rows(1);
        let mut pass = self.begin(&input, &mut cache)?;
        let mut out = PrefillOutput {
            last_logits: Vec::new(),
            last_residuals: pass.last_residuals(),
            depths: vec![0],
        };
        for range in self.segment_layers() {
            self.run_layers(&mut pass, &mut cache, Some(*range.end()), None, &[])?;
            out.last_residuals.extend(pass.last_residuals());
            out.depths.push(range.end() + 1);
        }
        out.last_logits = self.finish(pass, &mut cache)?.row(0).to_vec();
        Ok(out)
    }
}

fn to_array3(view: ArrayViewD<'_, f32>) -> Result<Array3<f32>> {
    view.into_dimensionality::<Ix3>()
        .map(|v| v.to_owned())
        .map_err(|e| RuntimeError::Input(format!("expected a [batch, seq, width] tensor: {e}")))
}

fn to_view4(view: ArrayViewD<'_, f32>) -> Result<ndarray::ArrayView4<'_, f32>> {
    view.into_dimensionality::<Ix4>()
        .map_err(|e| RuntimeError::Input(format!("expected a 4-D K/V tensor: {e}")))
}
