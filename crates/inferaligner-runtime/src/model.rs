//! One ONNX Runtime session per segment, run in order over a batch with a KV cache.

use std::ops::RangeInclusive;
use std::path::Path;

use ndarray::{Array2, Array3, ArrayView1, ArrayView3, ArrayViewD, Axis, Ix3, Ix4, s};
use ort::AsPointer as _;
use ort::ep::{self, ExecutionProvider as _, ExecutionProviderDispatch};
use ort::memory::MemoryInfo;
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::value::{Tensor, TensorRef};
use serde::{Deserialize, Serialize};

use crate::hook::{LayerHook, RowContext};
use crate::kv::KvCache;
use crate::library::{ThreadPool, onnx_runtime_with};
use crate::manifest::{LayerSegment, Manifest, PositionInputs, Segment};
use crate::{Result, RuntimeError};

/// Where segments run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    /// ONNX Runtime's CPU provider.
    #[default]
    Cpu,
    /// NVIDIA CUDA.
    Cuda,
    /// NVIDIA TensorRT, with CUDA for the nodes TensorRT does not take.
    Tensorrt,
}

/// Where sessions get their CPU scratch memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuAllocator {
    /// One arena for every session of the process (see `library.rs`).
    #[default]
    SharedArena,
    /// ONNX Runtime's default: an arena per session, each keeping its own high-water mark.
    SessionArenas,
    /// No arena: every tensor from the C allocator.
    Malloc,
}

/// Graph optimisation level (ONNX Runtime's levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizationLevel {
    /// No graph rewrites.
    Disable,
    /// Constant folding and redundant-node removal.
    Basic,
    /// Plus operator fusions.
    Extended,
    /// Everything, including layout optimisations.
    #[default]
    All,
}

/// How sessions are created. The sidecar's `[model]` section (and the CLI's runtime flags)
/// become these in one place, `ModelConfig::session_options` in the binary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionOptions {
    /// Execution provider.
    pub provider: ExecutionProvider,
    /// GPU index for CUDA/TensorRT.
    pub device_id: i32,
    /// When the GPU provider cannot be registered, run on the CPU (logged loudly) instead of
    /// failing at start-up.
    pub allow_cpu_fallback: bool,
    /// Threads inside one operator; 0 means the CPUs this process may use (its container
    /// limit), not every core of the host. All sessions share one pool (process-wide: the first
    /// model loaded sets it).
    pub intra_op_threads: usize,
    /// Threads running independent operators in parallel; 1 runs the graph sequentially.
    pub inter_op_threads: usize,
    /// Whether idle pool threads busy-spin briefly between operators. On by default: with one
    /// shared pool it took SmolLM2 decode from 33 to 42 tok/s on 2 cores. (With a pool per
    /// session, spinning was 20x *slower*: dozens of pools fought over the cores.)
    pub spinning: bool,
    /// Graph optimisation level.
    pub optimization_level: OptimizationLevel,
    /// Where sessions get their CPU scratch memory.
    pub cpu_allocator: CpuAllocator,
    /// ONNX Runtime's memory-pattern planning (per input shape).
    pub memory_pattern: bool,
    /// TensorRT: build fp16 engines.
    pub tensorrt_fp16: bool,
    /// TensorRT: directory to cache built engines in (start-up takes minutes without it).
    pub tensorrt_engine_cache: Option<std::path::PathBuf>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            provider: ExecutionProvider::Cpu,
            device_id: 0,
            allow_cpu_fallback: false,
            intra_op_threads: 0,
            inter_op_threads: 1,
            spinning: true,
            optimization_level: OptimizationLevel::All,
            cpu_allocator: CpuAllocator::SharedArena,
            memory_pattern: true,
            tensorrt_fp16: false,
            tensorrt_engine_cache: None,
        }
    }
}

impl SessionOptions {
    /// Intra-op threads to use: the configured count, or the CPUs available to this process.
    pub fn effective_intra_threads(&self) -> usize {
        match self.intra_op_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// The process-wide thread pool these options ask for.
    pub fn thread_pool(&self) -> ThreadPool {
        ThreadPool {
            intra_op_threads: self.effective_intra_threads(),
            inter_op_threads: self.inter_op_threads.max(1),
            spinning: self.spinning,
        }
    }

    fn builder(&self, env: &ort::environment::Environment) -> Result<SessionBuilder> {
        let level = match self.optimization_level {
            OptimizationLevel::Disable => GraphOptimizationLevel::Disable,
            OptimizationLevel::Basic => GraphOptimizationLevel::Level1,
            OptimizationLevel::Extended => GraphOptimizationLevel::Level2,
            OptimizationLevel::All => GraphOptimizationLevel::Level3,
        };
        // Threads come from the environment's global pool (see `thread_pool`).
        let mut builder = Session::builder(env)?
            .with_optimization_level(level)?
            .with_parallel_execution(self.inter_op_threads > 1)?
            .with_memory_pattern(self.memory_pattern)?;
        ep::CPU::default()
            .with_arena_allocator(self.cpu_allocator != CpuAllocator::Malloc)
            .register(&mut builder)?;
        if self.cpu_allocator == CpuAllocator::SharedArena {
            builder = builder.with_env_allocators()?;
        }
        Ok(builder)
    }

    fn gpu_providers(&self) -> Vec<ExecutionProviderDispatch> {
        let cuda = || ep::CUDA::default().with_device_id(self.device_id).build();
        match self.provider {
            ExecutionProvider::Cpu => Vec::new(),
            ExecutionProvider::Cuda => vec![cuda().error_on_failure()],
            ExecutionProvider::Tensorrt => {
                let mut trt = ep::TensorRT::default()
                    .with_device_id(self.device_id)
                    .with_fp16(self.tensorrt_fp16);
                if let Some(dir) = &self.tensorrt_engine_cache {
                    trt = trt
                        .with_engine_cache(true)
                        .with_engine_cache_path(dir.display());
                }
                vec![trt.build().error_on_failure(), cuda().error_on_failure()]
            }
        }
    }

    /// Create a session for one graph file with the configured provider. Returns whether the
    /// session fell back to the CPU.
    fn session(&self, env: &ort::environment::Environment, path: &Path) -> Result<(Session, bool)> {
        let providers = self.gpu_providers();
        if providers.is_empty() {
            return Ok((self.builder(env)?.commit_from_file(path)?, false));
        }
        let attempt = self
            .builder(env)
            .and_then(|b| Ok(b.with_execution_providers(&providers)?))
            .and_then(|mut b| Ok(b.commit_from_file(path)?));
        match attempt {
            Ok(session) => Ok((session, false)),
            Err(e) if self.allow_cpu_fallback => {
                tracing::error!(
                    provider = ?self.provider,
                    error = %e,
                    "GPU execution provider unavailable; FALLING BACK TO CPU (allow_cpu_fallback)"
                );
                Ok((self.builder(env)?.commit_from_file(path)?, true))
            }
            Err(e) => Err(RuntimeError::Provider(format!(
                "{:?} execution provider could not be registered for {}: {e} \
                 (set allow_cpu_fallback = true to run on the CPU instead)",
                self.provider,
                path.display()
            ))),
        }
    }
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

    /// Rebuild positions and mask for `cache` as it is now: to resume a pass after the cache
    /// was rewound to where the pass began (its buffer may have grown since).
    pub(crate) fn rebase(&mut self, cache: &KvCache) {
        self.positions = cache.positions(self.new_tokens);
        self.mask = cache.attention_mask(self.new_tokens);
    }

    /// Row `row`'s first `len` positions as a one-row pass (to split a batch that was run
    /// together; its positions and mask are rebuilt by [`Self::rebase`] when it resumes).
    pub(crate) fn row(&self, row: usize, len: usize) -> Pass {
        Pass {
            hidden: self.hidden.slice(s![row..=row, ..len, ..]).to_owned(),
            positions: self.positions.slice(s![row..=row, ..len]).to_owned(),
            mask: Array2::zeros((1, 0)),
            next_segment: self.next_segment,
            new_tokens: len,
        }
    }

    /// Tokens per row that this pass adds to the cache.
    pub fn new_tokens(&self) -> usize {
        self.new_tokens
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
    on_cpu_fallback: bool,
    /// RoPE cos and sin tables, `[context_length, head_dim / 2]`, for fused layer graphs.
    rope: Option<(Tensor<f32>, Tensor<f32>)>,
    /// The memory of logits handed back with [`Self::recycle`], for the next head's logits.
    spare_logits: Vec<f32>,
    /// Whether the sessions were made for the CPU provider. Two things hold only there: a
    /// fused layer graph's binding may be kept between runs (see [`run_fused`]: ONNX Runtime
    /// binds a host tensor by reference on the CPU, while a GPU session copies it when it is
    /// bound, so a kept binding would read the cache as it was then); and GroupQueryAttention
    /// was checked to take right-padded first prompts ([`Self::takes_ragged_batch`]).
    on_cpu: bool,
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
    /// Load and validate `dir/manifest.json`, then create a session for every segment with the
    /// configured execution provider, and check each graph's inputs and outputs against the
    /// manifest.
    pub fn load(dir: impl AsRef<Path>, options: &SessionOptions) -> Result<Self> {
        let manifest = Manifest::load(dir)?;
        if manifest.dtype != "float32" {
            return Err(RuntimeError::Input(format!(
                "this runtime runs float32 exports; {} is {}",
                manifest.path.display(),
                manifest.dtype
            )));
        }
        let env = onnx_runtime_with(options.thread_pool())?;
        let mut sessions = Vec::with_capacity(manifest.segments.len());
        let mut on_cpu_fallback = false;
        for seg in &manifest.segments {
            let path = manifest.dir().join(seg.file());
            let (session, fell_back) = options.session(env, &path)?;
            check_io(&manifest, seg, &session)?;
            on_cpu_fallback |= fell_back;
            sessions.push(session);
        }
        let fused = manifest
            .layer_segments()
            .any(|l| matches!(l.inputs.positions, PositionInputs::Fused { .. }));
        let rope = if fused {
            let (cos, sin) = rope_tables(&manifest.rope_inv_freq, manifest.context_length);
            Some((Tensor::from_array(cos)?, Tensor::from_array(sin)?))
        } else {
            None
        };
        Ok(Self {
            manifest,
            sessions,
            on_cpu_fallback,
            rope,
            spare_logits: Vec::new(),
            on_cpu: options.provider == ExecutionProvider::Cpu,
        })
    }

    /// Whether one pass may add a different number of tokens to each row (right-padded, as
    /// batched gating does) when some row already holds cached tokens (`over_cache`): the
    /// plain variant's mask allows it always; GroupQueryAttention only when every row starts
    /// from an empty cache (the rows' first prompt: each row's padding is written after its
    /// last token, where its next tokens overwrite it, and never read), and fails over a cache.
    /// That was checked on the CPU provider only; the GPU providers' kernels run such rows
    /// alone.
    pub fn takes_ragged_batch(&self, over_cache: bool) -> bool {
        self.rope.is_none() || (!over_cache && self.on_cpu)
    }

    /// Whether a GPU provider failed and the sessions run on the CPU instead.
    pub fn on_cpu_fallback(&self) -> bool {
        self.on_cpu_fallback
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
        self.begin_ragged(input_ids, None, cache)
    }

    /// [`Self::begin`] where row `r` adds only its first `lens[r]` tokens when `lens` is given:
    /// the positions after them are padding, masked out (their K/V land in slots past the row's
    /// fill, never attended to, overwritten later).
    pub(crate) fn begin_ragged(
        &mut self,
        input_ids: &Array2<i64>,
        lens: Option<&[usize]>,
        cache: &mut KvCache,
    ) -> Result<Pass> {
        let (rows, new) = input_ids.dim();
        if rows != cache.rows() {
            return Err(RuntimeError::Input(format!(
                "{rows} rows of input for a cache of {} rows",
                cache.rows()
            )));
        }
        let fill = cache.fill().to_vec();
        let adds = |row: usize| lens.map_or(new, |l| l[row]);
        let longest = (0..rows).map(|r| fill[r] + adds(r)).max().unwrap_or(new);
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
        let (positions, mask) = match lens {
            // a row's padding repeats its last position, which stays within the context
            Some(lens) => (
                Array2::from_shape_fn((rows, new), |(r, j)| {
                    (fill[r] + j.min(lens[r].saturating_sub(1))) as i64
                }),
                cache.ragged_attention_mask(lens, new),
            ),
            None => (cache.positions(new), cache.attention_mask(new)),
        };
        Ok(Pass {
            hidden,
            positions,
            mask,
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
        // GroupQueryAttention's view of the rows (fused exports only): cached tokens + new − 1,
        // and the longest total
        let gqa = if self.rope.is_some() {
            let seqlens = pass
                .positions
                .column(pass.new_tokens - 1)
                .mapv(|p| p as i32);
            let total = ndarray::arr0(seqlens.iter().max().map_or(0, |m| m + 1));
            Some((Tensor::from_array(seqlens)?, Tensor::from_array(total)?))
        } else {
            None
        };
        while let Some(Segment::Layers(l)) = self.manifest.segments.get(pass.next_segment) {
            if until_layer.is_some_and(|k| l.layers[0] > k) {
                break;
            }
            let session = &mut self.sessions[pass.next_segment];
            let addends = addends(l, hook.as_deref(), rows, pass.hidden.dim());
            pass.hidden = match &l.inputs.positions {
                PositionInputs::Plain { .. } => run_plain(session, l, pass, cache, addends)?,
                PositionInputs::Fused { .. } => {
                    let rope = self.rope.as_ref().expect("built for fused exports");
                    let gqa = gqa.as_ref().expect("computed for fused exports");
                    let fused = FusedInputs {
                        rope,
                        gqa,
                        keep_binding: self.on_cpu,
                    };
                    run_fused(session, l, pass, cache, addends, fused)?
                }
            };
            if let Some(hook) = hook.as_deref_mut() {
                hook.after_layers(l.layers[0]..=l.layers[1], pass.hidden.view_mut(), rows);
            }
            pass.next_segment += 1;
        }
        Ok(())
    }

    /// A one-row pass whose residual after `layer` (which ends a segment) is `hidden`
    /// (`[1, positions, hidden]`), to go on from the segment after it: a prefill resuming from
    /// residuals the prefix cache kept. Its positions and mask are set by [`Pass::rebase`].
    pub(crate) fn pass_after(&self, layer: usize, hidden: Array3<f32>) -> Pass {
        let index = self
            .residual_index(layer)
            .expect("a segment ends at the layer");
        Pass {
            new_tokens: hidden.len_of(Axis(1)),
            hidden,
            positions: Array2::zeros((1, 0)),
            mask: Array2::zeros((1, 0)),
            next_segment: index + 1,
        }
    }

    /// Run `hook` on `pass` as [`Self::run_layers`] does after the segment that ends at
    /// `layer` (the segment the pass has just run): for a pass stopped there before the hook.
    pub(crate) fn hook_after(
        &self,
        layer: usize,
        pass: &mut Pass,
        hook: Option<&mut (dyn LayerHook + '_)>,
        rows: &[RowContext],
    ) {
        let index = self
            .residual_index(layer)
            .expect("a segment ends at the layer");
        debug_assert_eq!(
            pass.next_segment,
            index + 1,
            "the pass stopped after the layer"
        );
        if let (Some(hook), Some(Segment::Layers(l))) = (hook, self.manifest.segments.get(index)) {
            hook.after_layers(l.layers[0]..=l.layers[1], pass.hidden.view_mut(), rows);
        }
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
        let last = pass.hidden.len_of(Axis(1)) - 1;
        let logits = self.head(pass.hidden.slice(s![.., last..=last, ..]))?;
        cache.advance(pass.new_tokens);
        Ok(logits.index_axis_move(Axis(1), 0))
    }

    /// The head over every position of `hidden` (`[rows, positions, hidden]`, the residual
    /// stream after the last layer): logits `[rows, positions, vocab]`.
    pub fn head(&mut self, hidden: ArrayView3<'_, f32>) -> Result<Array3<f32>> {
        let head_index = self.manifest.segments.len() - 1;
        let Segment::Head(h) = &self.manifest.segments[head_index] else {
            unreachable!("a validated manifest ends with the head segment")
        };
        // a slice (one position of several rows) is not contiguous: ONNX Runtime needs it to be
        let hidden = hidden.to_owned();
        let outputs = self.sessions[head_index].run(ort::inputs![
            h.inputs.hidden_states.as_str() => TensorRef::from_array_view(&hidden)?
        ])?;
        let logits = outputs[h.outputs.logits.as_str()].try_extract_array()?;
        let (Some(values), &[rows, positions, vocab]) = (logits.as_slice(), logits.shape()) else {
            return to_array3(logits);
        };
        let mut buf = std::mem::take(&mut self.spare_logits);
        buf.clear();
        buf.extend_from_slice(values);
        Ok(Array3::from_shape_vec((rows, positions, vocab), buf).expect("the shape's own values"))
    }

    /// Hand back logits this model returned, once read: the next step's logits are written
    /// into their memory. Why: a batch's logits are megabytes (8 rows × SmolLM2's 49,152
    /// logits: 1.5 MB), which glibc maps afresh for every step and unmaps after it; the page
    /// faults of writing into new pages cost 0.5 ms a step at batch 8, 2.5 % of it.
    pub fn recycle(&mut self, logits: Array2<f32>) {
        let (values, _) = logits.into_raw_vec_and_offset();
        if values.capacity() > self.spare_logits.capacity() {
            self.spare_logits = values;
        }
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

    /// Where the residual stream after `layer` sits in [`Self::last_token_residuals`] and
    /// [`PrefillOutput::last_residuals`]: index 0 is the embeddings, then one entry per layer
    /// segment, so the segment ending at `layer` (`None` when no segment ends there). The one
    /// place the "layer + 1" rule lives.
    pub fn residual_index(&self, layer: usize) -> Option<usize> {
        self.manifest
            .layer_segments()
            .position(|l| l.layers[1] == layer)
            .map(|segment| segment + 1)
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

    /// The residual stream at the last token of each prompt after every segment boundary:
    /// `[prompts, 1 + layer segments, hidden]` (index 0 is the embeddings). Prompts of different
    /// lengths run as one batch, right-padded: a causal model never lets a token see the padding
    /// after it, so no mask is needed. For calibration; nothing is cached.
    pub fn last_token_residuals(&mut self, prompts: &[Vec<u32>]) -> Result<ndarray::Array3<f32>> {
        let last: Vec<usize> = prompts.iter().map(|p| p.len().saturating_sub(1)).collect();
        self.mean_residuals(prompts, &last)
    }

    /// Like [`Self::last_token_residuals`], but the mean over each prompt's positions from
    /// `from[i]` to its end (e.g. the tokens of an answer that follows the prompt).
    pub fn mean_residuals(
        &mut self,
        prompts: &[Vec<u32>],
        from: &[usize],
    ) -> Result<ndarray::Array3<f32>> {
        Ok(self.span_means(prompts, &[from])?.swap_remove(0))
    }

    /// Several [`Self::mean_residuals`] of the same prompts in one pass: one array per list of
    /// span starts in `spans`.
    pub fn span_means(
        &mut self,
        prompts: &[Vec<u32>],
        spans: &[&[usize]],
    ) -> Result<Vec<ndarray::Array3<f32>>> {
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        if prompts.iter().any(Vec::is_empty) || prompts.is_empty() {
            return Err(RuntimeError::Input("empty prompt".into()));
        }
        let bad = |from: &[usize]| {
            from.len() != prompts.len() || prompts.iter().zip(from).any(|(p, &f)| f >= p.len())
        };
        if spans.iter().any(|from| bad(from)) {
            return Err(RuntimeError::Input(
                "each span must start inside its prompt".into(),
            ));
        }
        for p in prompts {
            self.check_tokens(p)?;
        }
        let ids = Array2::from_shape_fn((prompts.len(), longest), |(r, i)| {
            i64::from(prompts[r].get(i).copied().unwrap_or(0))
        });
        let depths = 1 + self.manifest.layer_segments().count();
        let hidden = self.manifest.hidden_size;
        let mut out =
            vec![ndarray::Array3::<f32>::zeros((prompts.len(), depths, hidden)); spans.len()];
        let mut cache = self.new_cache_rows(prompts.len());
        let mut pass = self.begin(&ids, &mut cache)?;
        let mut take = |pass: &Pass, depth: usize| {
            for (out, from) in out.iter_mut().zip(spans) {
                for (r, p) in prompts.iter().enumerate() {
                    let span = pass.hidden.slice(s![r, from[r]..p.len(), ..]);
                    if let Some(mean) = span.mean_axis(Axis(0)) {
                        out.slice_mut(s![r, depth, ..]).assign(&mean);
                    }
                }
            }
        };
        take(&pass, 0);
        for (depth, range) in self.segment_layers().into_iter().enumerate() {
            self.run_layers(&mut pass, &mut cache, Some(*range.end()), None, &[])?;
            take(&pass, depth + 1);
        }
        Ok(out)
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

/// A segment's addend inputs ([`LayerInputs::addends`]), by input name: for each inner layer
/// it lists, `[rows, 1, hidden]` holding the hook's `scale * vector` for each row it steers
/// there (computed as `after_layers` computes it, so the sum is the same bit for bit), zeros
/// for the others.
fn addends<'a>(
    l: &'a LayerSegment,
    hook: Option<&(dyn LayerHook + '_)>,
    rows: &[RowContext],
    (batch, _, hidden): (usize, usize, usize),
) -> Vec<(&'a str, Array3<f32>)> {
    let addend = |layer: usize| {
        let mut a = Array3::zeros((batch, 1, hidden));
        for (mut out, row) in a.outer_iter_mut().zip(rows) {
            if let Some((scale, v)) = hook.and_then(|h| h.addend(layer, row)) {
                out.zip_mut_with(&ArrayView1::from(v), |x, &v| *x = scale * v);
            }
        }
        a
    };
    l.inputs
        .addends
        .iter()
        .map(|(&layer, name)| (name.as_str(), addend(layer)))
        .collect()
}

/// One plain layer segment: the cache buffers in by reference, the new positions' K/V out and
/// written after each row's filled slots. Returns the residual stream after the segment.
fn run_plain(
    session: &mut Session,
    l: &LayerSegment,
    pass: &Pass,
    cache: &mut KvCache,
    addends: Vec<(&str, Array3<f32>)>,
) -> Result<Array3<f32>> {
    let PositionInputs::Plain {
        position_ids,
        attention_mask,
    } = &l.inputs.positions
    else {
        unreachable!("called for plain segments")
    };
    let mut inputs = ort::inputs![
        l.inputs.hidden_states.as_str() => TensorRef::from_array_view(&pass.hidden)?,
        position_ids.as_str() => TensorRef::from_array_view(&pass.positions)?,
        attention_mask.as_str() => TensorRef::from_array_view(&pass.mask)?,
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
    for (name, a) in &addends {
        inputs.push(((*name).into(), TensorRef::from_array_view(a)?.into()));
    }
    let outputs = session.run(inputs)?;
    for (j, layer) in (l.layers[0]..=l.layers[1]).enumerate() {
        let k = outputs[l.outputs.present_key[j].as_str()].try_extract_array()?;
        let v = outputs[l.outputs.present_value[j].as_str()].try_extract_array()?;
        cache.write(layer, to_view4(k)?, to_view4(v)?);
    }
    to_array3(outputs[l.outputs.hidden_states.as_str()].try_extract_array()?)
}

/// What every fused layer graph of a pass takes besides the residual stream and the cache.
struct FusedInputs<'a> {
    /// RoPE cos and sin tables.
    rope: &'a (Tensor<f32>, Tensor<f32>),
    /// GroupQueryAttention's sequence lengths and total length.
    gqa: &'a (Tensor<i32>, Tensor<i32>),
    /// Whether to keep the binding with the cache for the next run.
    keep_binding: bool,
}

/// One fused layer segment. GroupQueryAttention appends to its past buffer in place when the
/// same tensor is bound as `present` (it skips the past → present copy when the two pointers
/// are equal), so each layer's cache buffers are both input and output here. Every input is an
/// owned tensor: ort copies a borrowed one it is asked to bind. The binding is kept with the
/// cache for the next run on the CPU ([`KvCache::keep_binding`]): binding a graph's every input
/// anew took 85 µs of a 5.5 ms decode step (SmolLM2 int4, batch 1); now only what changes
/// between runs is bound again — the residual stream, the sequence lengths and the addends —
/// and the rest only after the cache's buffers changed. Returns the residual stream after the
/// segment (the pass's own is moved into the graph).
fn run_fused(
    session: &mut Session,
    l: &LayerSegment,
    pass: &mut Pass,
    cache: &mut KvCache,
    addends: Vec<(&str, Array3<f32>)>,
    fused: FusedInputs<'_>,
) -> Result<Array3<f32>> {
    let ((cos, sin), (seqlens, total)) = (fused.rope, fused.gqa);
    let PositionInputs::Fused {
        seqlens_k,
        total_sequence_length,
        cos_cache,
        sin_cache,
    } = &l.inputs.positions
    else {
        unreachable!("called for fused segments")
    };
    let (segment, made_for) = (pass.next_segment, session.ptr() as usize);
    let mut binding = match cache.take_binding(segment, made_for) {
        Some(binding) => binding,
        None => {
            let mut binding = session.create_binding()?;
            binding.bind_input(cos_cache.as_str(), cos)?;
            binding.bind_input(sin_cache.as_str(), sin)?;
            for (j, layer) in (l.layers[0]..=l.layers[1]).enumerate() {
                let (k, v) = cache.layer_tensors(layer).ok_or_else(|| {
                    RuntimeError::Input("a pass over a cache with no slots".into())
                })?;
                binding.bind_input(l.inputs.past_key[j].as_str(), k)?;
                binding.bind_input(l.inputs.past_value[j].as_str(), v)?;
                binding.bind_output(l.outputs.present_key[j].as_str(), k)?;
                binding.bind_output(l.outputs.present_value[j].as_str(), v)?;
            }
            binding
        }
    };
    // anew each run: ONNX Runtime keeps the last run's output bound, and its shape is that
    // run's (a prefill chunk's positions, then one)
    binding.bind_output_to_device(l.outputs.hidden_states.as_str(), &MemoryInfo::default())?;
    let hidden = Tensor::from_array(std::mem::take(&mut pass.hidden))?;
    binding.bind_input(l.inputs.hidden_states.as_str(), &hidden)?;
    binding.bind_input(seqlens_k.as_str(), seqlens)?;
    binding.bind_input(total_sequence_length.as_str(), total)?;
    for (name, a) in addends {
        binding.bind_input(name, &Tensor::from_array(a)?)?;
    }
    let hidden = {
        let outputs = session.run_binding(&binding)?;
        to_array3(outputs[l.outputs.hidden_states.as_str()].try_extract_array()?)?
    };
    if fused.keep_binding {
        cache.keep_binding(segment, made_for, binding);
    }
    Ok(hidden)
}

/// cos and sin of `position × inv_freq` for every position of the context, as the exporter's
/// reference computes them (in f64, then rounded).
fn rope_tables(inv_freq: &[f32], positions: usize) -> (Array2<f32>, Array2<f32>) {
    let angle = |p: usize, i: usize| p as f64 * f64::from(inv_freq[i]);
    let shape = (positions, inv_freq.len());
    (
        Array2::from_shape_fn(shape, |(p, i)| angle(p, i).cos() as f32),
        Array2::from_shape_fn(shape, |(p, i)| angle(p, i).sin() as f32),
    )
}

/// The graph's input and output names must be the ones the manifest promises.
fn check_io(manifest: &Manifest, seg: &Segment, session: &Session) -> Result<()> {
    let (inputs, outputs): (Vec<&str>, Vec<&str>) = match seg {
        Segment::Embed(e) => (
            vec![e.inputs.input_ids.as_str()],
            vec![e.outputs.hidden_states.as_str()],
        ),
        Segment::Layers(l) => (
            std::iter::once(&l.inputs.hidden_states)
                .chain(match &l.inputs.positions {
                    PositionInputs::Plain {
                        position_ids,
                        attention_mask,
                    } => vec![position_ids, attention_mask],
                    PositionInputs::Fused {
                        seqlens_k,
                        total_sequence_length,
                        cos_cache,
                        sin_cache,
                    } => vec![seqlens_k, total_sequence_length, cos_cache, sin_cache],
                })
                .chain(&l.inputs.past_key)
                .chain(&l.inputs.past_value)
                .chain(l.inputs.addends.values())
                .map(String::as_str)
                .collect(),
            std::iter::once(&l.outputs.hidden_states)
                .chain(&l.outputs.present_key)
                .chain(&l.outputs.present_value)
                .map(String::as_str)
                .collect(),
        ),
        Segment::Head(h) => (
            vec![h.inputs.hidden_states.as_str()],
            vec![h.outputs.logits.as_str()],
        ),
    };
    let have_in: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
    let have_out: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
    for (want, have, what) in [
        (&inputs, &have_in, "input"),
        (&outputs, &have_out, "output"),
    ] {
        if let Some(missing) = want.iter().find(|n| !have.contains(n)) {
            return Err(RuntimeError::Manifest {
                path: manifest.path.clone(),
                message: format!(
                    "{}: the graph has no {what} {missing:?} (it has {have:?})",
                    seg.file()
                ),
            });
        }
    }
    Ok(())
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
